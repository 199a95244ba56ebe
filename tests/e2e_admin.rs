//! End to end: the admin API and the CLI of a running agent, from inside the LB's namespace.
//! /metrics parsed by a real Prometheus parser moves with traffic; weight and drain changes
//! show in /status and in where new connections go; `lb-agent diagnose` names each fault of a
//! broken setup. Needs root; run with `cargo xtask test`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_agent::admin::{client, status::Status};
use lb_tests::{
    topology::{agent_bin, backend_addr, tally, NameServer, SNAT},
    Topology,
};
use prometheus_parse::{Scrape, Value};

const PORT: u16 = 8080;
/// Where the agent's admin API listens by default, inside the LB's namespace.
const ADMIN: &str = "127.0.0.1:9100";
/// Bound for waiting on the next conntrack sweep's numbers (one per second).
const LIMIT: Duration = Duration::from_secs(10);

fn vip() -> SocketAddr {
    "10.91.0.100:80".parse().unwrap()
}

/// Runs an admin API call from inside the LB's namespace.
fn in_lb<T: Send>(topo: &Topology, f: impl std::future::Future<Output = T> + Send) -> T {
    topo.lb.scoped(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

fn admin() -> SocketAddr {
    ADMIN.parse().unwrap()
}

fn scrape(topo: &Topology) -> Scrape {
    let body = in_lb(topo, client::get(admin(), "/metrics")).unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn status(topo: &Topology) -> Status {
    in_lb(topo, client::status(admin())).unwrap()
}

fn post(topo: &Topology, path: &str, body: &str) -> serde_json::Value {
    in_lb(topo, client::post(admin(), path, body)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value of the sample of `metric` whose labels include `labels`; 0 when there is none.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{metric}: {other:?}"),
        })
        .sum()
}

/// Scrapes until `done` holds (the numbers come with the next sweep); the last scrape.
fn scrape_until(topo: &Topology, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + LIMIT;
    loop {
        let s = scrape(topo);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn backend(i: usize) -> String {
    format!("{}:{PORT}", backend_addr(i))
}

#[test]
fn metrics_parse_and_move_with_traffic_and_a_healthy_setup_diagnoses_clean() {
    let topo = Topology::new(3);
    let _servers = topo.serve_names(PORT);
    let agent = topo.start_agent(&topo.config(PORT));

    let before = scrape(&topo);
    let web = [("listener", "web")];
    assert_eq!(value(&before, "lb_listener_new_flows_total", &web), 0.0);
    assert!(
        before.docs.contains_key("lb_xdp_packets_total")
            && before.docs.contains_key("lb_backend_health_state"),
        "every family has its HELP"
    );
    assert_eq!(
        value(
            &before,
            "lb_conntrack_table_entries_limit",
            &[("table", "ipv4")]
        ),
        (1 << 20) as f64
    );

    tally("tcp", &topo.connect_many(vip(), 30), SNAT);
    let after = scrape_until(&topo, "30 new flows counted", |s| {
        value(s, "lb_listener_new_flows_total", &web) == 30.0
    });
    let per_backend: f64 = (0..3)
        .map(|i| {
            value(
                &after,
                "lb_backend_new_flows_total",
                &[("backend", &backend(i))],
            )
        })
        .sum();
    assert_eq!(per_backend, 30.0, "the per-backend counters add up");
    let inbound = [("listener", "web"), ("direction", "in")];
    assert!(value(&after, "lb_listener_packets_total", &inbound) >= 90.0);
    assert!(value(&after, "lb_listener_bytes_total", &inbound) > 0.0);
    assert!(value(&after, "lb_backend_bytes_total", &[("direction", "out")]) > 0.0);
    assert!(value(&after, "lb_xdp_packets_total", &[("reason", "forwarded")]) >= 150.0);
    // Closed flows stay in the table for a few seconds, holding their SNAT ports.
    let snat = [("snat_address", SNAT)];
    let after = scrape_until(&topo, "SNAT ports counted", |s| {
        value(s, "lb_snat_ports_in_use", &snat) > 0.0
    });
    assert!(value(&after, "lb_conntrack_entries", &[]) > 0.0);
    assert_eq!(
        value(&after, "lb_conntrack_table_entries", &[("table", "ipv4")]),
        value(&after, "lb_conntrack_entries", &[]),
        "IPv4 flows, established"
    );
    assert_eq!(value(&after, "lb_snat_port_range_size", &[]), 40001.0);
    let b0 = [("backend", backend(0)), ("state", "unchecked".into())];
    let b0: Vec<(&str, &str)> = b0.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(value(&after, "lb_backend_health_state", &b0), 1.0);

    let out = topo
        .lb
        .command(agent_bin().to_str().unwrap())
        .args(["diagnose", "--client", "10.91.0.2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok    interface lb-ext: lb_xdp attached in native mode"),
        "{text}"
    );
    assert!(text.ends_with("no problem found\n"), "{text}");
    agent.stop_cleanly();
}

/// Connections per backend name over `n` new connections.
fn spread(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    tally("tcp", &topo.connect_many(vip(), n), SNAT)
}

#[test]
fn weight_and_drain_change_the_status_and_where_new_connections_go() {
    let topo = Topology::new(3);
    let _servers = topo.serve_names(PORT);
    let agent = topo.start_agent(&topo.config(PORT));

    let answer = post(&topo, &format!("/backends/web/{}/drain", backend(0)), "");
    assert_eq!(answer["drained"], true, "{answer}");
    let b = |s: &Status, i: usize| {
        s.backend("web", backend(i).parse().unwrap())
            .cloned()
            .unwrap()
    };
    let s = status(&topo);
    assert!(b(&s, 0).drained && b(&s, 0).weight == 0 && !b(&s, 0).serving);
    assert_eq!(b(&s, 0).health.as_str(), "draining");
    let per = spread(&topo, 60);
    assert_eq!(
        per.get("backend-1"),
        None,
        "drained: no new connections {per:?}"
    );

    let answer = post(
        &topo,
        &format!("/backends/web/{}/weight", backend(1)),
        "{\"weight\": 4}",
    );
    assert_eq!(
        (
            answer["weight"].as_u64(),
            answer["configured_weight"].as_u64()
        ),
        (Some(4), Some(1))
    );
    let per = spread(&topo, 100);
    let heavy = per.get("backend-2").copied().unwrap_or(0);
    assert!(heavy >= 65, "weight 4 against 1 takes about 80%: {per:?}");
    assert_eq!(per.get("backend-1"), None, "still drained {per:?}");

    post(
        &topo,
        &format!("/backends/web/{}/drain", backend(0)),
        "false",
    );
    assert!(b(&status(&topo), 0).serving);
    let per = spread(&topo, 60);
    assert!(per.contains_key("backend-1"), "back in service {per:?}");

    // The datapath's per-backend counters saw the same: nothing for backend 1 while drained.
    let s = scrape_until(&topo, "220 new flows counted", |s| {
        value(s, "lb_listener_new_flows_total", &[("listener", "web")]) == 220.0
    });
    let flows = |i| {
        value(
            &s,
            "lb_backend_new_flows_total",
            &[("backend", &backend(i))],
        )
    };
    assert_eq!(flows(0) as usize, per["backend-1"]);
    assert_eq!(flows(0) + flows(1) + flows(2), 220.0);
    agent.stop_cleanly();
}

#[test]
fn counters_stay_with_their_listener_and_backend_through_reloads_that_reorder_and_a_restart() {
    let topo = Topology::new(3);
    let _servers = topo.serve_names(PORT);
    // `web` on port 80, `alt` on 81, both to the three backends.
    let two = topo.config(PORT).replace(
        "pools:",
        &format!(
            "  - {{ name: alt, protocol: tcp, vip: {}, port: 81, pool: web }}\npools:",
            vip().ip()
        ),
    );
    let agent = topo.start_agent(&two);
    spread(&topo, 30);
    let flows = |s: &Scrape, l: &str| value(s, "lb_listener_new_flows_total", &[("listener", l)]);
    let by_backend = |s: &Scrape| -> Vec<f64> {
        (0..3)
            .map(|i| value(s, "lb_backend_new_flows_total", &[("backend", &backend(i))]))
            .collect()
    };
    let before = scrape_until(&topo, "30 flows counted", |s| flows(s, "web") == 30.0);
    let per_backend = by_backend(&before);
    assert_eq!(flows(&before, "alt"), 0.0);

    // `alt` first, and the backends in reverse order: every counter keeps its name.
    let web_line = format!(
        "  - name: web\n    protocol: tcp\n    vip: {}\n    port: 80\n    pool: web\n",
        vip().ip()
    );
    let mut reordered = two
        .replace(&web_line, "")
        .replace("pools:", &format!("{web_line}pools:"));
    let lines: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "      - {{ address: {}, port: {PORT}, weight: 1 }}\n",
                backend_addr(i)
            )
        })
        .collect();
    for l in &lines {
        reordered = reordered.replace(l.as_str(), "");
    }
    reordered.extend(lines.iter().rev().map(String::as_str));
    agent.write_config(&reordered);
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = scrape(&topo);
    assert_eq!((flows(&after, "web"), flows(&after, "alt")), (30.0, 0.0));
    assert_eq!(by_backend(&after), per_backend);
    // New flows land on the listener and backends they went to.
    tally(
        "alt",
        &topo.connect_many("10.91.0.100:81".parse().unwrap(), 10),
        SNAT,
    );
    let after = scrape_until(&topo, "10 flows on alt", |s| flows(s, "alt") == 10.0);
    assert_eq!(flows(&after, "web"), 30.0);
    let total: f64 = by_backend(&after).iter().sum();
    assert_eq!(total, 40.0);

    // A restarted agent with the original order takes the same ids back from the state
    // directory.
    agent.write_config(&two);
    let agent = agent.restart(nix::sys::signal::Signal::SIGTERM);
    let restarted = scrape_until(&topo, "the restarted agent's metrics", |s| {
        flows(s, "web") > 0.0
    });
    assert_eq!(
        (flows(&restarted, "web"), flows(&restarted, "alt")),
        (30.0, 10.0)
    );
    assert_eq!(by_backend(&restarted), by_backend(&after));
    agent.stop_cleanly();
}

#[test]
fn diagnose_names_a_dead_backend_an_acl_deny_and_a_missing_listener() {
    let topo = Topology::new(3);
    // backend-3 is dead: nothing listens on it.
    let _servers: Vec<NameServer> = (0..2)
        .map(|i| NameServer::start(&topo.backends[i], PORT, format!("backend-{}", i + 1)))
        .collect();
    let config = topo
        .config(PORT)
        .replace(
            "    pool: web\n",
            "    pool: web\n    acl: { deny: [10.91.0.2/32] }\n",
        )
        .replace(
            "    backends:\n",
            "    health_check: { protocol: tcp, interval: 1s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1 }\n    backends:\n",
        );
    let agent = topo.start_agent(&config);
    // Each backend's first probe comes at its own random point of the first interval.
    let settled = |s: &Status| {
        (0..3).all(|i| {
            let want = if i == 2 { "unhealthy" } else { "healthy" };
            s.backend("web", backend(i).parse().unwrap())
                .is_some_and(|b| b.health.as_str() == want)
        })
    };
    let deadline = Instant::now() + LIMIT;
    while !settled(&status(&topo)) {
        assert!(
            Instant::now() < deadline,
            "backend-3 found unhealthy, the others healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let diagnose = |args: &[&str]| {
        let out = topo
            .lb
            .command(agent_bin().to_str().unwrap())
            .arg("diagnose")
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("$ lb-agent diagnose {}\n{text}", args.join(" "));
        assert_eq!(
            out.status.code(),
            Some(1),
            "a fault is an exit status 1\n{text}"
        );
        text
    };
    let text = diagnose(&["--client", "10.91.0.2"]);
    for fault in [
        "FAIL  backend web/10.91.2.13:8080: unhealthy (refused): no new flows or requests — fix: ",
        "FAIL  backend web/10.91.2.13:8080: tcp port 8080 from 10.91.2.1: refused (the host is up, nothing listens) — fix: start the service on 10.91.2.13:8080",
        "FAIL  client 10.91.0.2: denied by listener `web`'s acl.deny 10.91.0.2/32 — fix: remove 10.91.0.2/32 from listeners[0].acl.deny",
    ] {
        assert!(text.contains(fault), "missing `{fault}` in\n{text}");
    }
    for healthy in [0, 1] {
        let ok = format!(
            "ok    backend web/{}: tcp port 8080 answers",
            backend(healthy)
        );
        assert!(text.contains(&ok), "missing `{ok}` in\n{text}");
    }
    assert!(text.ends_with("3 problem(s) found\n"), "{text}");

    let text = diagnose(&["--listener", "nope", "--admin", ADMIN]);
    assert!(
        text.contains("FAIL  listener nope: listener `nope` not found (there are: web) — fix: "),
        "{text}"
    );
    agent.stop_cleanly();
}
