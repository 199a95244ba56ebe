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

/// Ids in config order, as a first start gives them.
fn order(cfg: &Config) -> Ids {
    Ids::assign(cfg, &Ids::default())
}

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
    let one_down = build_with(&cfg, &order(&cfg), &Overrides::default(), |_, b| b != 1);
    assert_eq!(one_down.backends, all.backends, "backend ids do not move");
    for l in &one_down.listeners {
        assert_eq!(ids(l), [0], "{}", l.name);
    }
}

#[test]
fn the_backup_takes_over_when_every_primary_is_down_and_nothing_is_left_after() {
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let failover = build_with(&cfg, &order(&cfg), &Overrides::default(), |_, b| b == 2);
    for l in &failover.listeners {
        assert_eq!(ids(l), [2], "{}", l.name);
    }
    let all_down = build_with(&cfg, &order(&cfg), &Overrides::default(), |_, _| false);
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
    let drained = build_with(&cfg, &order(&cfg), &o, |_, _| true);
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
    let weighted = build_with(&cfg, &order(&cfg), &o, |_, _| true);
    assert_eq!(weighted.backends[1].slot.weight, 3, "wlc divides by it");
    let wrr = &weighted.listeners[1].ring;
    let share = wrr.iter().filter(|&&id| id == 1).count() as f64 / wrr.len() as f64;
    assert!(
        (share - 0.75).abs() < 0.01,
        "wrr share of weight 3 against 1: {share}"
    );

    o.clear();
    assert_eq!(build_with(&cfg, &order(&cfg), &o, |_, _| true), build(&cfg));
}

#[test]
fn ids_survive_reloads_that_reorder_and_remove_and_new_ones_take_unused_ids() {
    let cfg = parse("t.yaml", TEXT, &Host::default()).unwrap();
    let first = order(&cfg);
    let names = |ids: &Ids| -> Vec<(String, u32)> { ids.listeners.clone() };
    assert_eq!(
        names(&first),
        [("m".into(), 0), ("r".into(), 1), ("l".into(), 2)]
    );
    // `m` moves to the end, `r` goes, `n` comes; the first backend goes and a new one comes.
    let text = TEXT
        .replace("  - { name: m, protocol: tcp, vip: 10.1.0.1, port: 80, pool: web, table_size: 7 }\n", "")
        .replace("  - { name: r, protocol: tcp, vip: 10.1.0.1, port: 81, pool: web, scheduler: wrr }\n", "")
        .replace(
            "pools:",
            "  - { name: n, protocol: udp, vip: 10.1.0.1, port: 53, pool: web }\n  - { name: m, protocol: tcp, vip: 10.1.0.1, port: 80, pool: web, table_size: 7 }\npools:",
        )
        .replace("      - { address: 10.0.0.1, port: 80 }\n", "")
        .replace("backup: true }", "backup: true }\n      - { address: 10.0.0.4, port: 80 }");
    let cfg2 = parse("t.yaml", &text, &Host::default()).unwrap();
    let second = Ids::assign(&cfg2, &first);
    assert_eq!(
        names(&second),
        [("l".into(), 2), ("n".into(), 3), ("m".into(), 0)],
        "kept by name; the new one takes an id no one had"
    );
    let plan = build_with(&cfg2, &second, &Overrides::default(), |_, _| true);
    let by_addr: Vec<(String, u32)> = plan
        .backends
        .iter()
        .map(|b| (format!("{}:{}", b.address, b.port), b.id))
        .collect();
    assert_eq!(
        by_addr,
        [
            ("10.0.0.2:80".into(), 1),
            ("10.0.0.3:80".into(), 2),
            ("10.0.0.4:80".into(), 3)
        ]
    );
    assert_eq!(
        plan.listeners.iter().map(|l| l.id).collect::<Vec<_>>(),
        [2, 3, 0]
    );
    assert_eq!((plan.listener_slots(), plan.backend_slots()), (4, 4));
    // The tables name backends by id: 10.0.0.2 and 10.0.0.4 serve.
    for l in &plan.listeners {
        assert_eq!(ids(l), [1, 3], "{}", l.name);
    }
    // Counters start from zero for what got an id it did not have.
    assert_eq!(second.fresh(&first), (vec![3], vec![3]));
    assert_eq!(second.fresh(&second), (vec![], vec![]));
    // The next agent reads them back.
    let json = serde_json::to_string(&second).unwrap();
    assert_eq!(serde_json::from_str::<Ids>(&json).unwrap(), second);
}

#[test]
fn freed_ids_are_reused_once_no_unused_one_is_left() {
    let keys = |n: u32| (0..n).map(|i| format!("k{i}")).collect::<Vec<_>>();
    let previous: Vec<(String, u32)> = keys(3).into_iter().zip(0..).collect();
    // k1 goes, k3 and k4 come, with room for 4 ids: k3 takes the unused 3, k4 the freed 1.
    let now = allocate(
        vec!["k0".to_string(), "k2".into(), "k3".into(), "k4".into()],
        &previous,
        4,
    );
    let ids: Vec<u32> = now.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [0, 2, 3, 1]);
}
