//! Operations end to end: long-lived connections through reloads and agent restarts (the
//! dataplane is pinned and adopted), invalid reloads, removed listeners and weight changes.
//! Needs root; run with `cargo xtask test`.

use std::time::{Duration, Instant};

use lb_tests::{
    topology::{backend_addr, tally, Chatter, EchoServer, NameServer, SNAT, VIP},
    Topology,
};
use nix::sys::signal::Signal;

const ECHO_PORT: u16 = 9000;
const NAME_PORT: u16 = 8080;

/// `chat` (tcp/80, echo backends) plus `names` (tcp/81, name backends) whose weights the test
/// varies, and `extra` listeners on ports 1000.. (the unrelated changes of reloads).
fn config(weights: [u32; 3], extra: usize) -> String {
    let mut s = format!(
        "agent:\n  interfaces: [lb-ext, lb-int]\n  xdp_mode: native\n\
         snat:\n  addresses: [{SNAT}]\n\
         listeners:\n\
         \x20 - {{ name: chat, protocol: tcp, vip: {VIP}, port: 80, pool: echo }}\n\
         \x20 - {{ name: names, protocol: tcp, vip: {VIP}, port: 81, pool: names, scheduler: wrr }}\n"
    );
    for i in 0..extra {
        s += &format!(
            "  - {{ name: extra{i}, protocol: udp, vip: {VIP}, port: {}, pool: names }}\n",
            1000 + i
        );
    }
    s += "pools:\n  - name: echo\n    backends:\n";
    for i in 0..3 {
        s += &format!(
            "      - {{ address: {}, port: {ECHO_PORT} }}\n",
            backend_addr(i)
        );
    }
    s += "  - name: names\n    backends:\n";
    for (i, w) in weights.iter().enumerate() {
        s += &format!(
            "      - {{ address: {}, port: {NAME_PORT}, weight: {w} }}\n",
            backend_addr(i)
        );
    }
    s
}

fn reload(agent: &lb_tests::topology::Agent) -> Result<String, String> {
    let out = agent.cli(&["reload"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Three backends, each with an echo server and a name server.
fn topology() -> (Topology, (Vec<EchoServer>, Vec<NameServer>)) {
    let topo = Topology::new(3);
    let echo = topo
        .backends
        .iter()
        .map(|b| EchoServer::start(b, ECHO_PORT))
        .collect();
    let names = topo.serve_names(NAME_PORT);
    (topo, (echo, names))
}

#[test]
fn fifty_connections_survive_ten_reloads_a_sigterm_restart_and_a_sigkill_restart() {
    let (topo, _servers) = topology();
    let mut agent = topo.start_agent(&config([1, 1, 1], 0));
    let chat = Chatter::start(
        &topo.client,
        format!("{VIP}:80").parse().unwrap(),
        50,
        Duration::from_millis(100),
    );
    std::thread::sleep(Duration::from_millis(500));

    // (a) Ten reloads with unrelated changes: listeners come and go, `names` weights move.
    for i in 1..=10 {
        let weights = [1 + i as u32 % 3, 1, 2];
        agent.write_config(&config(weights, i % 4));
        let started = Instant::now();
        let out = reload(&agent).unwrap_or_else(|e| panic!("reload {i}: {e}"));
        println!("reload {i}: {} in {:?}", out.trim(), started.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let same = reload(&agent).expect("reloading the same file");
    assert!(same.contains("unchanged, nothing to apply"), "{same}");

    // An invalid file: reported with its position, nothing changes (the status included).
    let status = || String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    let before = status();
    agent.write_config(&config([1, 1, 1], 2).replace("port: 81", "port: 81x"));
    let err = reload(&agent).expect_err("an invalid config must be refused");
    println!("invalid reload: {}", err.trim());
    assert!(err.contains(".yaml:") && err.contains("port"), "{err}");
    assert!(before.contains("listener chat"), "{before}");
    assert_eq!(
        status(),
        before,
        "the status changed after an invalid reload"
    );
    let names: std::net::SocketAddr = format!("{VIP}:81").parse().unwrap();
    let answers = topo.connect_many(names, 30);
    tally("names after the invalid reload", &answers, SNAT);

    // (b) SIGTERM and a new agent; (c) SIGKILL and a new agent: both adopt the pins.
    agent.write_config(&config([1, 1, 1], 0));
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let started = Instant::now();
        agent = agent.restart(signal);
        println!(
            "{signal:?} + restart: running again after {:?}",
            started.elapsed()
        );
        assert!(
            agent
                .log
                .iter()
                .any(|l| l.contains("XDP program swapped in")),
            "the new agent did not adopt the pinned links:\n{}",
            agent.log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(1000));
    }

    let report = chat.finish();
    println!(
        "{} connections, {} broken, {} messages ({} bytes) echoed intact, 0 lost",
        report.connections,
        report.broken.len(),
        report.messages,
        report.bytes
    );
    assert!(report.broken.is_empty(), "broken: {:?}", report.broken);
    // Each connection exchanged a message about every 100 ms for the whole run.
    assert!(report.messages > 50 * 30, "{report:?}");
    println!("{}", agent.stop_cleanly());
}

#[test]
fn weight_changes_apply_to_new_flows_and_a_removed_listener_stops_at_once() {
    let (topo, _servers) = topology();
    let agent = topo.start_agent(&config([1, 1, 1], 0));
    let names: std::net::SocketAddr = format!("{VIP}:81").parse().unwrap();

    // backend-1 drained by weight 0 in a reload: new flows avoid it right after.
    agent.write_config(&config([0, 1, 1], 0));
    reload(&agent).expect("reload");
    let per = tally(
        "names, backend-1 at weight 0",
        &topo.connect_many(names, 30),
        SNAT,
    );
    assert!(!per.contains_key("backend-1"), "{per:?}");
    agent.write_config(&config([4, 1, 1], 0));
    reload(&agent).expect("reload");
    let per = tally("names, weights 4:1:1", &topo.connect_many(names, 60), SNAT);
    // 40 exactly on one CPU; each CPU keeps its own round-robin cursor.
    let b1 = per.get("backend-1").copied().unwrap_or(0);
    assert!((36..=44).contains(&b1), "wrr 4:1:1 over 60 flows: {per:?}");

    // A connection on `chat`, then `chat` removed: its next exchange goes nowhere.
    let chat = Chatter::start(
        &topo.client,
        format!("{VIP}:80").parse().unwrap(),
        1,
        Duration::from_millis(100),
    );
    std::thread::sleep(Duration::from_millis(300));
    let without_chat = config([4, 1, 1], 0).replace(
        &format!("  - {{ name: chat, protocol: tcp, vip: {VIP}, port: 80, pool: echo }}\n"),
        "",
    );
    agent.write_config(&without_chat);
    reload(&agent).expect("reload");
    std::thread::sleep(Duration::from_millis(500));
    let report = chat.finish();
    println!("chat after its listener was removed: {report:?}");
    assert_eq!(report.broken.len(), 1, "{report:?}");

    // A new xdp_mode takes effect on reload.
    agent.write_config(&without_chat.replace("xdp_mode: native", "xdp_mode: generic"));
    reload(&agent).expect("reload");
    let link = topo.lb.output(&["ip", "link", "show", "lb-ext"]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("xdpgeneric"), "{link}");
    tally("names in generic mode", &topo.connect_many(names, 10), SNAT);
    agent.stop_cleanly();
}

#[test]
fn sigint_removes_the_dataplane_where_sigterm_leaves_it_forwarding() {
    let (topo, _servers) = topology();
    let attached = || {
        let out = topo.lb.output(&["ip", "link", "show", "lb-ext"]);
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    let vip_on_lo = || {
        let out = topo.lb.output(&["ip", "addr", "show", "lo"]);
        String::from_utf8_lossy(&out.stdout).contains(VIP)
    };
    let names: std::net::SocketAddr = format!("{VIP}:81").parse().unwrap();
    let agent = topo.start_agent(&config([1, 1, 1], 0));
    // SIGTERM: the agent goes, the dataplane stays and serves.
    let agent = agent.restart(Signal::SIGTERM);
    assert!(attached() && vip_on_lo());
    tally(
        "names after a SIGTERM restart",
        &topo.connect_many(names, 10),
        SNAT,
    );
    // SIGINT: everything the agent set up is gone.
    println!("{}", agent.interrupt());
    assert!(!attached(), "XDP still attached after SIGINT");
    assert!(!vip_on_lo(), "VIP left on lo after SIGINT");
}

#[test]
fn a_restart_keeps_probed_backends_serving_and_refuses_no_new_connection() {
    let (topo, _servers) = topology();
    let probed = config([1, 1, 1], 0).replace(
        "  - name: names\n",
        "  - name: names\n    health_check: { protocol: tcp, interval: 1s, timeout: 1s }\n",
    );
    let agent = topo.start_agent(&probed);
    let names: std::net::SocketAddr = format!("{VIP}:81").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&agent.cli(&["status"]).stdout).contains("healthy") {
        assert!(Instant::now() < deadline, "backends healthy within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    tally("names before", &topo.connect_many(names, 10), SNAT);
    // New connections every 20 ms from before the restart until well after the new agent
    // runs: its backends must not start pending (out of the tables) while it probes them.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (agent, results) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let mut all = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                all.extend(topo.connect_many(names, 1));
                std::thread::sleep(Duration::from_millis(20));
            }
            all
        });
        std::thread::sleep(Duration::from_millis(300));
        let agent = agent.restart(Signal::SIGTERM);
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (agent, client.join().unwrap())
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "{} new connections across the restart, {} failed: {failed:?}",
        results.len(),
        failed.len()
    );
    assert!(results.len() > 20, "{}", results.len());
    assert!(failed.is_empty(), "{failed:?}");
    agent.stop_cleanly();
}

/// One request on an open HTTP/1.1 connection; the status code and the body.
fn exchange(s: &mut std::net::TcpStream) -> std::io::Result<(u16, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")?;
    let mut r = BufReader::new(&*s);
    let mut line = String::new();
    let (mut code, mut length) = (0, 0);
    while r.read_line(&mut line)? > 0 && line != "\r\n" {
        let lower = line.to_ascii_lowercase();
        if let Some(c) = lower.strip_prefix("http/1.1 ") {
            code = c[..3].parse().unwrap_or(0);
        } else if let Some(n) = lower.strip_prefix("content-length:") {
            length = n.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    if code == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// The requests `/metrics` counts for `listener`.
fn requests_counted(ns: &lb_tests::Netns, listener: &str) -> f64 {
    let body = ns.scoped(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(lb_agent::admin::client::get(
                "127.0.0.1:9100".parse().unwrap(),
                "/metrics",
            ))
            .unwrap()
    });
    let scrape = prometheus_parse::Scrape::parse(
        String::from_utf8_lossy(&body)
            .lines()
            .map(|l| Ok(l.to_string())),
    )
    .unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "lb_http_requests_total")
        .filter(|s| s.labels.get("listener") == Some(listener))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn a_reload_that_changes_one_l7_listener_leaves_the_others_connections_and_counters() {
    let ns = lb_tests::Netns::new("l7reload");
    let tmp = tempfile::Builder::new().prefix(&ns.name).tempdir().unwrap();
    let backends = lb_tests::netns::Children(
        [18181, 18182]
            .iter()
            .map(|p| {
                let listen = format!("127.0.0.1:{p}");
                lb_tests::nginx::ok_server(&ns, tmp.path(), &format!("be{p}"), &listen, 1)
            })
            .collect(),
    );
    let config = |second_backends: &[u16]| {
        let mut s = "agent:\n  interfaces: [lo]\n  xdp_mode: generic\nlisteners:
  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: a }
  - { name: site2, protocol: http, vip: 127.0.0.1, port: 8081, pool: b }
pools:
  - name: a\n    backends: [{ address: 127.0.0.1, port: 18181 }]
  - name: b\n    backends:\n"
            .to_string();
        for p in second_backends {
            s += &format!("      - {{ address: 127.0.0.1, port: {p} }}\n");
        }
        s
    };
    let agent = lb_tests::Agent::start(&ns, &config(&[18182]));
    let connect = |port: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = ns.scoped(|| std::net::TcpStream::connect(("127.0.0.1", port)));
            if let Ok(mut s) = s {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if exchange(&mut s).is_ok_and(|(code, _)| code == 200) {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "no answer on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut untouched = connect(8080);
    let mut changed = connect(8081);
    for _ in 0..4 {
        assert_eq!(exchange(&mut untouched).unwrap(), (200, "ok\n".into()));
        assert_eq!(exchange(&mut changed).unwrap(), (200, "ok\n".into()));
    }
    // (The first tries may have met a backend still starting.)
    let before = (
        requests_counted(&ns, "site"),
        requests_counted(&ns, "site2"),
    );
    assert!(before.0 >= 5.0 && before.1 >= 5.0, "{before:?}");

    // Pool b, which only site2 uses, gets a second backend.
    agent.write_config(&config(&[18182, 18181]));
    let reloaded = reload(&agent).expect("reload");
    assert!(reloaded.contains("reloaded"), "{reloaded}");

    // site's connection carries on; site2's old one is closed once idle (its listener was
    // replaced), and new ones get the new listener.
    for _ in 0..5 {
        assert_eq!(exchange(&mut untouched).unwrap(), (200, "ok\n".into()));
    }
    let mut replaced = connect(8081);
    assert_eq!(exchange(&mut replaced).unwrap(), (200, "ok\n".into()));
    // Counters go on from where they were for both.
    assert_eq!(requests_counted(&ns, "site"), before.0 + 5.0);
    assert_eq!(requests_counted(&ns, "site2"), before.1 + 2.0);
    drop(agent);
    drop(backends);
}

#[test]
fn a_reload_moves_the_admin_api_and_one_to_a_taken_address_changes_nothing() {
    let ns = lb_tests::Netns::new("admmove");
    let config = |admin: &str| {
        format!(
            "agent:\n  interfaces: [lo]\n  xdp_mode: generic\n  admin: {admin}\nlisteners:
  - {{ name: site, protocol: http, vip: 127.0.0.1, port: 7000, pool: p }}
pools:\n  - name: p\n    backends: [{{ address: 127.0.0.1, port: 7001 }}]\n"
        )
    };
    let agent = lb_tests::Agent::start(&ns, &config("127.0.0.1:9100"));
    let answers = |addr: &str| {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        ns.scoped(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(lb_agent::admin::client::get(addr, "/status"))
                .is_ok()
        })
    };
    assert!(answers("127.0.0.1:9100"));

    agent.write_config(&config("127.0.0.1:9101"));
    let reloaded = reload(&agent).expect("reload");
    assert!(reloaded.contains("reloaded"), "{reloaded}");
    assert!(answers("127.0.0.1:9101"), "the API moved");
    assert!(!answers("127.0.0.1:9100"), "and left its old address");
    // To every address on the same port: its own socket holds the port until it moves.
    agent.write_config(&config("0.0.0.0:9101"));
    let reloaded = reload(&agent).expect("reload to 0.0.0.0 on the same port");
    assert!(reloaded.contains("reloaded"), "{reloaded}");
    assert!(answers("127.0.0.1:9101"));
    agent.write_config(&config("127.0.0.1:9101"));
    reload(&agent).expect("and back");

    // A taken address fails the reload, which changes nothing.
    let _taken = ns.scoped(|| std::net::TcpListener::bind("127.0.0.1:9102").unwrap());
    agent.write_config(&config("127.0.0.1:9102"));
    let refused = reload(&agent).expect_err("reload to a taken address");
    assert!(refused.contains("127.0.0.1:9102"), "{refused}");
    assert!(answers("127.0.0.1:9101"), "still where it was");
    drop(agent);
}
