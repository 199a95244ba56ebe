use super::*;
use crate::config::{parse, Host};

const TEXT: &str = "\
agent:
  interfaces: [lo]
snat:
  addresses: [10.0.0.9]
listeners:
  - { name: m, protocol: tcp, vip: 10.1.0.1, port: 80, pool: web, table_size: 7 }
  - { name: r, protocol: tcp, vip: 10.1.0.1, port: 81, pool: web, scheduler: wrr }
  - { name: l, protocol: tcp, vip: 10.1.0.1, port: 82, pool: web, scheduler: wlc }
pools:
  - name: web
    health_check: { protocol: tcp }
    backends:
      - { address: 10.0.0.1, port: 80 }
      - { address: 10.0.0.2, port: 80 }
      - { address: 10.0.0.3, port: 80, backup: true }
";

fn ids(l: &ListenerPlan) -> Vec<u32> {
    let mut v = l.ring.clone();
    v.sort();
    v.dedup();
    v
}

#[test]
fn only_healthy_primaries_are_in_the_tables_and_ids_stay() {
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let all = build(&cfg);
    for l in &all.listeners {
        assert_eq!(
            ids(l),
            [0, 1],
            "{}: the backup idles while primaries are up",
            l.name
        );
    }
    let one_down = build_with(&cfg, &Overrides::default(), |_, b| b != 1);
    assert_eq!(one_down.backends, all.backends, "backend ids do not move");
    for l in &one_down.listeners {
        assert_eq!(ids(l), [0], "{}", l.name);
    }
}

#[test]
fn the_backup_takes_over_when_every_primary_is_down_and_nothing_is_left_after() {
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let failover = build_with(&cfg, &Overrides::default(), |_, b| b == 2);
    for l in &failover.listeners {
        assert_eq!(ids(l), [2], "{}", l.name);
    }
    let all_down = build_with(&cfg, &Overrides::default(), |_, _| false);
    for l in &all_down.listeners {
        assert!(
            l.ring.is_empty(),
            "{}: an empty table (ring_size 0)",
            l.name
        );
    }
}

#[test]
fn admin_overrides_drain_and_reweigh_backends_without_moving_ids() {
    use crate::overrides::Change;
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let (first, second) = (
        "10.0.0.1:80".parse().unwrap(),
        "10.0.0.2:80".parse().unwrap(),
    );
    let mut o = Overrides::default();
    o.set(&cfg, "web", first, Change::Drain(true)).unwrap();
    let drained = build_with(&cfg, &o, |_, _| true);
    assert_eq!(drained.backends.len(), 3, "ids stay");
    for l in &drained.listeners {
        assert_eq!(
            ids(l),
            [1],
            "{}: the drained backend takes no new flows",
            l.name
        );
    }
    assert_eq!(drained.backends[0].slot.weight, 0);

    o.set(&cfg, "web", first, Change::Drain(false)).unwrap();
    o.set(&cfg, "web", second, Change::Weight(3)).unwrap();
    let weighted = build_with(&cfg, &o, |_, _| true);
    assert_eq!(weighted.backends[1].slot.weight, 3, "wlc divides by it");
    let wrr = &weighted.listeners[1].ring;
    let share = wrr.iter().filter(|&&id| id == 1).count() as f64 / wrr.len() as f64;
    assert!(
        (share - 0.75).abs() < 0.01,
        "wrr share of weight 3 against 1: {share}"
    );

    o.clear();
    assert_eq!(build_with(&cfg, &o, |_, _| true), build(&cfg));
}
