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
    let one_down = build_with(&cfg, |_, b| b != 1);
    assert_eq!(one_down.backends, all.backends, "backend ids do not move");
    for l in &one_down.listeners {
        assert_eq!(ids(l), [0], "{}", l.name);
    }
}

#[test]
fn the_backup_takes_over_when_every_primary_is_down_and_nothing_is_left_after() {
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let failover = build_with(&cfg, |_, b| b == 2);
    for l in &failover.listeners {
        assert_eq!(ids(l), [2], "{}", l.name);
    }
    let all_down = build_with(&cfg, |_, _| false);
    for l in &all_down.listeners {
        assert!(
            l.ring.is_empty(),
            "{}: an empty table (ring_size 0)",
            l.name
        );
    }
}
