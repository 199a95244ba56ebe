use super::*;
use crate::{
    admin::tests::Fixture,
    overrides::{Change, Overrides},
};

#[test]
fn listeners_hold_their_pools_and_backends_with_health_weights_and_counters() {
    let f = Fixture::new();
    let s = f.view(&Overrides::default()).status;
    assert_eq!(s.agent.config, Path::new("/etc/lb/lb.yaml"));
    assert_eq!(s.agent.interfaces, ["lo"]);
    assert_eq!(s.packets["forwarded"], 11);
    let tables: Vec<(&str, u64, u64)> = s
        .conntrack
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.entries, t.capacity))
        .collect();
    assert_eq!(
        tables,
        [
            ("ipv4", 8, 1 << 20),
            ("ipv6", 2, 1 << 18),
            ("ipv4_handshake", 2, 1 << 16),
            ("ipv6_handshake", 0, 1 << 14)
        ]
    );
    assert_eq!(
        (s.conntrack.entries, s.conntrack.capacity),
        (12, (1 << 20) + (1 << 18) + (1 << 16) + (1 << 14)),
        "all tables"
    );
    let snat: Vec<(String, u64, u64, u64)> = s
        .snat
        .iter()
        .map(|n| {
            let a = n.address.to_string();
            (a, n.ports_in_use, n.busiest_backend_ports, n.port_range)
        })
        .collect();
    assert_eq!(
        snat,
        [
            ("10.0.0.9".to_string(), 6, 4, 100),
            ("fd00::9".to_string(), 0, 0, 100)
        ]
    );

    let [web, site] = &s.listeners[..] else {
        panic!("{:?}", s.listeners)
    };
    assert_eq!((web.name.as_str(), web.protocol.as_str()), ("web", "tcp"));
    assert_eq!(web.address, "10.1.0.1:80".parse().unwrap());
    let t = web.traffic.expect("tcp listener traffic");
    assert_eq!((t.packets_in, t.new_flows, t.active_flows), (40, 20, 6));
    assert_eq!(web.requests, None);
    let pools: Vec<&str> = web.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pools, ["web"]);

    assert_eq!((site.traffic, site.requests), (None, Some(3)));
    let pools: Vec<&str> = site.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pools, ["web", "api"], "the default pool, then the routes'");

    let b0 = &web.pools[0].backends[0];
    assert_eq!(b0.address, "10.0.0.1:80".parse().unwrap());
    assert_eq!(b0.health, HealthState::Pending, "probed, no answer yet");
    assert_eq!((b0.weight, b0.configured_weight), (2, 2));
    assert!(!b0.drained && !b0.backup && !b0.serving);
    assert_eq!((b0.reason.as_deref(), b0.probe_latency_ms), (None, None));
    assert_eq!(
        b0.traffic,
        Traffic {
            packets_in: 0,
            bytes_in: 0,
            packets_out: 1,
            bytes_out: 100,
            new_flows: 0,
            active_flows: 4
        }
    );
    let api = &site.pools[1].backends[0];
    assert_eq!(api.health, HealthState::Unchecked);
    assert!(api.serving, "an unchecked backend takes traffic");
    assert_eq!(
        (api.traffic.packets_in, api.traffic.new_flows),
        (2, 1),
        "backend id 2"
    );
    assert_eq!(s.pools().len(), 2, "each pool once");
}

#[test]
fn a_drain_shows_with_both_weights_and_the_json_reads_back_the_same() {
    let f = Fixture::new();
    let mut o = Overrides::default();
    let api = "10.0.0.3:81".parse().unwrap();
    o.set(&f.config, "api", api, Change::Weight(9)).unwrap();
    o.set(&f.config, "api", api, Change::Drain(true)).unwrap();
    o.apply_to(&f.health);
    let s = f.view(&o).status;
    let b = s.backend("api", api).unwrap();
    assert!(b.drained && !b.serving, "{b:?}");
    assert_eq!((b.weight, b.configured_weight), (0, 1));
    // Weight 0 shows as draining, whatever the probes say (this pool has none).
    assert_eq!(b.health, HealthState::Draining);
    assert!(b.up);

    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"health\":\"draining\""), "{json}");
    let back: Status = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}
