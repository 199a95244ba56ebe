use super::*;
use crate::config::{parse, Host};

const TEXT: &str = "\
agent: { interfaces: [lo] }
listeners:
  - { name: site, protocol: http, vip: 10.1.0.1, port: 80, pool: web }
pools:
  - name: web
    backends:
      - { address: 10.0.0.1, port: 80, weight: 2 }
      - { address: 'fd00::2', port: 80 }
";

fn cfg() -> Config {
    parse("t.yaml", TEXT, &Host::default()).unwrap()
}

#[test]
fn weights_and_drains_apply_on_top_of_the_config_until_cleared() {
    let cfg = cfg();
    let (v4, v6): (SocketAddr, SocketAddr) = (
        "10.0.0.1:80".parse().unwrap(),
        "[fd00::2]:80".parse().unwrap(),
    );
    let mut o = Overrides::default();
    assert_eq!(o.weight("web", v4, 2), 2, "the configured weight");
    o.set(&cfg, "web", v4, Change::Weight(7)).unwrap();
    assert_eq!(o.weight("web", v4, 2), 7);
    o.set(&cfg, "web", v4, Change::Drain(true)).unwrap();
    assert_eq!(o.weight("web", v4, 2), 0, "drained: no new traffic");
    assert_eq!(
        o.get("web", v4),
        Override {
            weight: Some(7),
            drained: true
        }
    );
    o.set(&cfg, "web", v4, Change::Drain(false)).unwrap();
    assert_eq!(o.weight("web", v4, 2), 7, "undrained: the override again");
    o.set(&cfg, "web", v6, Change::Weight(0)).unwrap();
    assert_eq!(o.weight("web", v6, 1), 0);
    o.clear();
    assert_eq!(o, Overrides::default());
}

#[test]
fn unknown_pools_backends_and_out_of_range_weights_are_refused_and_change_nothing() {
    let cfg = cfg();
    let mut o = Overrides::default();
    let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
    assert_eq!(
        o.set(&cfg, "api", v4, Change::Drain(true)),
        Err(OverrideError::NoPool("api".into()))
    );
    let other: SocketAddr = "10.0.0.1:81".parse().unwrap();
    let e = o.set(&cfg, "web", other, Change::Drain(true)).unwrap_err();
    assert_eq!(e.to_string(), "pool `web` has no backend 10.0.0.1:81");
    let e = o.set(&cfg, "web", v4, Change::Weight(70000)).unwrap_err();
    assert_eq!(e.to_string(), "weight 70000 is out of range 0-65535");
    assert_eq!(o, Overrides::default());
}

#[test]
fn health_members_get_the_effective_weights_the_l7_pools_pick_by() {
    let cfg = cfg();
    let health = Health::new(&cfg);
    let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let mut o = Overrides::default();
    o.set(&cfg, "web", v4, Change::Drain(true)).unwrap();
    o.apply_to(&health);
    let members = health.pool("web");
    assert_eq!((members[0].weight, members[0].weight_now()), (2, 0));
    assert_eq!(members[0].label(), "draining");
    assert_eq!(members[1].weight_now(), 1);
    o.clear();
    o.apply_to(&health);
    assert_eq!(members[0].weight_now(), 2);
}
