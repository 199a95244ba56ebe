//! The L7 workers' connection selector (`lb-ebpf/src/reuseport.rs`): loaded by the agent's
//! loader onto a real SO_REUSEPORT group on loopback, each new connection queues on the socket
//! of the worker with fewer open and queued connections; in a running agent, connections held open end up
//! spread evenly and `/metrics` counts them per worker until they close. Needs root.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lb_agent::{
    admin::client,
    proxy::balance::{Loads, Open},
};
use lb_tests::{tls::self_signed, Agent, Netns};
use prometheus_parse::{Scrape, Value};
use socket2::{Domain, Socket, Type};

/// Two listening sockets in one SO_REUSEPORT group on an ephemeral loopback port.
fn group() -> [TcpListener; 2] {
    let bind = |addr: SocketAddr| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(128).unwrap();
        s.set_nonblocking(true).unwrap();
        TcpListener::from(s)
    };
    let first = bind("127.0.0.1:0".parse().unwrap());
    let second = bind(first.local_addr().unwrap());
    [first, second]
}

/// Opens `n` connections and returns how many each socket of `group` has queued.
fn spread(group: &[TcpListener; 2], n: usize) -> [usize; 2] {
    let addr = group[0].local_addr().unwrap();
    let _clients: Vec<_> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Connected means queued: the handshake completes in the kernel before `connect` returns.
    group.each_ref().map(|l| {
        std::iter::from_fn(|| match l.accept() {
            Ok(c) => Some(c),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept: {e}"),
        })
        .count()
    })
}

#[test]
fn new_connections_queue_on_the_worker_with_fewer_open_and_queued_connections() {
    let group = group();
    let loads = Loads::balanced(&group).expect("the selector loads and attaches");
    let workers = loads.workers();
    let hold = |w: usize, n: usize| -> Vec<Open> { (0..n).map(|_| workers[w].open()).collect() };

    let busy = hold(0, 30);
    assert_eq!(loads.connections(), [30, 0]);
    // Every connection goes to the idle worker, which counts them as queued (nothing here
    // accepts through the counters).
    assert_eq!(spread(&group, 20), [0, 20]);
    assert_eq!(loads.queued(), [0, 20]);
    drop(busy);
    assert_eq!(loads.connections(), [0, 0]);

    // Worker 1 found its queue empty; worker 0 accepted one connection it never got (never
    // below zero).
    workers[1].queue_empty();
    let _one = workers[0].open();
    assert_eq!(loads.queued(), [0, 0]);
    let _busy = hold(1, 3);
    assert_eq!(spread(&group, 2), [2, 0]);
    assert_eq!(loads.queued(), [2, 0]);
    // Accepting takes a connection off the queued count.
    let _accepted = workers[0].open();
    assert_eq!(loads.queued(), [1, 0]);
}

#[test]
fn a_worker_that_does_not_accept_gets_no_more_than_its_share() {
    let group = group();
    let loads = Loads::balanced(&group).expect("the selector loads and attaches");
    // Neither worker accepts (both stalled, as a worker whose CPU is taken): each new
    // connection goes to the shorter queue, ties by the 4-tuple's hash.
    let [a, b] = spread(&group, 41);
    assert_eq!(a + b, 41);
    assert!(a.abs_diff(b) <= 1, "{a} / {b}");
    let queued = loads.queued();
    assert_eq!(queued, [a as u64, b as u64]);
}

/// An http listener that answers every request itself (a redirect): no backend needed.
const AGENT: &str = "agent:
  interfaces: [lo]
  xdp_mode: generic
listeners:
  - { name: plain, protocol: http, vip: 127.0.0.1, port: 8080, redirect: { to: https, code: 301 } }
  - { name: secure, protocol: https, vip: 127.0.0.1, port: 8443, pool: web,
      tls: { certificates: [{ cert: CERT, key: KEY }] } }
pools:
  - { name: web, backends: [{ address: 127.0.0.1, port: 9 }] }
";

/// `lb_http_connections` of `listener`, by worker.
fn worker_connections(listener: &str) -> Vec<u64> {
    let body = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client::get("127.0.0.1:9100".parse().unwrap(), "/metrics"))
        .expect("/metrics");
    let text = String::from_utf8(body.to_vec()).unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut by_worker: Vec<(u32, u64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "lb_http_connections" && s.labels.get("listener") == Some(listener))
        .map(|s| {
            let Value::Gauge(v) = s.value else {
                panic!("{s:?} is not a gauge")
            };
            (s.labels.get("worker").unwrap().parse().unwrap(), v as u64)
        })
        .collect();
    by_worker.sort();
    by_worker.into_iter().map(|(_, n)| n).collect()
}

/// A connection that got one answer and stays open (HTTP/1.1 keep-alive).
fn answered_connection(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: site\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0; 1024];
    // The redirect's head and its short body; all that matters is that the worker took it.
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 301"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    s
}

#[test]
fn the_agent_spreads_held_connections_evenly_over_its_workers_and_counts_them_until_closed() {
    let ns = Netns::new("rport");
    let dir = tempfile::Builder::new().prefix(&ns.name).tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "site");
    let config = AGENT
        .replace("CERT", &cert.display().to_string())
        .replace("KEY", &key.display().to_string());
    let _agent = Agent::start(&ns, &config);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    ns.scoped(|| {
        let addr = "127.0.0.1:8080".parse().unwrap();
        // Each one answered before the next: the worker counted it before the next SYN came.
        let held: Vec<TcpStream> = (0..100).map(|_| answered_connection(addr)).collect();
        let counts = worker_connections("plain");
        println!("100 connections held: {counts:?} per worker");
        assert_eq!(counts.len(), workers);
        assert_eq!(counts.iter().sum::<u64>(), 100);
        if workers == 2 {
            // By the hash, an even split of 100 has a chance of 8%.
            assert_eq!(counts, [50, 50]);
        }
        assert!(worker_connections("secure").iter().all(|&n| n == 0));
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while worker_connections("plain").iter().any(|&n| n > 0) {
            assert!(
                Instant::now() < deadline,
                "{:?} still counted",
                worker_connections("plain")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}
