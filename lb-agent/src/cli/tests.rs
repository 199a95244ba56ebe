use super::*;
use crate::{
    admin::tests::Fixture,
    overrides::{Change, Overrides},
};

#[test]
fn the_admin_address_comes_from_the_flag_then_the_config_then_the_default() {
    let flag: SocketAddr = "127.0.0.1:9999".parse().unwrap();
    assert_eq!(admin_address(Some(flag), None).unwrap(), flag);
    assert_eq!(admin_address(None, None).unwrap(), config::DEFAULT_ADMIN);
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.yaml");
    std::fs::write(
        &path,
        "agent: { interfaces: [lo], admin: '127.0.0.1:9200' }\n",
    )
    .unwrap();
    assert_eq!(
        admin_address(None, Some(&path)).unwrap(),
        "127.0.0.1:9200".parse().unwrap()
    );
    std::fs::write(&path, "agent: { interfaces: [lo], admin: nowhere }\n").unwrap();
    let e = admin_address(None, Some(&path)).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "agent.admin: `nowhere` is not an address and port (e.g. 127.0.0.1:9100 or [::1]:9100)"
        ),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_status_table_shows_each_backend_with_health_weight_flows_and_serving() {
    let f = Fixture::new();
    let mut o = Overrides::default();
    o.set(
        &f.config,
        "api",
        "10.0.0.3:81".parse().unwrap(),
        Change::Drain(true),
    )
    .unwrap();
    o.apply_to(&f.health);
    let table = status_table(&f.view(&o).status);
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "listener web (tcp 10.1.0.1:80): 6 active flows, 20 new"
    );
    assert_eq!(lines[1], "  pool web");
    let row = |addr: &str| {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(addr))
            .unwrap();
        line.split_whitespace().collect::<Vec<_>>()
    };
    assert_eq!(
        row("10.0.0.1:80"),
        ["10.0.0.1:80", "pending", "2", "4", "no", "-"]
    );
    assert_eq!(
        row("10.0.0.3:81"),
        ["10.0.0.3:81", "draining", "0", "(1)", "0", "drained", "-"]
    );
    assert!(
        table.contains("listener site (http 10.1.0.1:8080): 3 requests\n"),
        "{table}"
    );
}

#[test]
fn the_stats_table_has_drops_by_reason_and_traffic_per_listener_and_backend() {
    let table = stats_table(&Fixture::new().view(&Overrides::default()).status);
    println!("{table}");
    let fields = |prefix: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap();
        line.split_whitespace().map(String::from).collect()
    };
    assert_eq!(fields("drop_acl"), ["drop_acl", "20"]);
    assert_eq!(
        fields("total"),
        ["total", &(10..22).sum::<u64>().to_string()]
    );
    assert_eq!(
        fields("web "),
        ["web", "40", "4000", "41", "4100", "20", "6"]
    );
    assert_eq!(fields("site"), ["site", "3", "requests", "(http)"]);
    assert_eq!(
        fields("web/10.0.0.2:80"),
        ["web/10.0.0.2:80", "1", "100", "2", "200", "0", "2"]
    );
    assert_eq!(
        fields("api/10.0.0.3:81")[5],
        "1",
        "new flows of backend id 2"
    );
    assert!(table.contains("conntrack: 12 of 1392640 entries\n  ipv4: 8 of 1048576\n"));
    assert!(table.contains("snat 10.0.0.9: 6 ports in use, 4 of 100 towards the busiest backend\n"));
}

/// The L7 proxy's back-off after a failed connect (kept in the health member) shows in the
/// status, the metrics and the status table.
#[test]
fn an_l7_back_off_shows_in_the_status_the_metrics_and_the_table() {
    let f = Fixture::new();
    let api = &f.health.pool("api")[0];
    let now = crate::proxy::upstream::coarse_ms();
    api.l7_down_until_ms()
        .store(now + 7_000, std::sync::atomic::Ordering::Relaxed);
    let view = f.view(&Overrides::default());
    let b = view
        .status
        .backend("api", "10.0.0.3:81".parse().unwrap())
        .unwrap();
    let left = b.l7_backoff_s.unwrap();
    assert!((6.0..=7.0).contains(&left), "{left}");
    let others = view.status.backend("web", "10.0.0.1:80".parse().unwrap());
    assert_eq!(others.unwrap().l7_backoff_s, None);
    let metrics = crate::admin::metrics::render(&view);
    assert!(
        metrics.contains("lb_backend_l7_backoff_seconds{pool=\"api\",backend=\"10.0.0.3:81\"} 6.")
            && metrics.contains(
                "lb_backend_l7_backoff_seconds{pool=\"web\",backend=\"10.0.0.1:80\"} 0\n"
            ),
        "{metrics}"
    );
    let table = status_table(&view.status);
    assert!(
        table.contains("L7 connect failed, no requests for 7 s"),
        "{table}"
    );
}
