//! Abuse of the L7 proxy, with the agent as its own process (so its memory is its own, read
//! from /proc) in front of an nginx backend: slowloris, oversized headers and bodies, malformed
//! requests, TLS garbage and 10,000 idle connections, while a real client keeps requesting.
//! Each case prints what it sent, what happened and what was lost, and the agent's RSS. Needs
//! root; run with `cargo xtask test`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::Children,
    nginx::ok_server,
    procfs::{rss_kib, thread_cpus},
    tls::self_signed,
    Agent, Netns,
};

const HTTP: u16 = 8080;
const HTTPS: u16 = 8443;
const BACKEND: u16 = 18081;
/// The listeners' idle timeout, which also bounds the wait for a request head.
const IDLE: Duration = Duration::from_secs(3);
/// What a timed-out connection may take beyond its timeout to be closed.
const SLACK: Duration = Duration::from_secs(2);
const IDLE_CONNECTIONS: usize = 10_000;

fn http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], HTTP))
}

fn https() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], HTTPS))
}

/// The namespace, the nginx backend and the agent with an http and an https listener.
/// Fields drop in order: the agent first, the namespace and the files last.
struct Site {
    agent: Agent,
    _backend: Children,
    ns: Netns,
    /// The backend's and the certificate's files.
    dir: tempfile::TempDir,
}

impl Site {
    fn start() -> Self {
        let ns = Netns::new("l7");
        let tmp = tempfile::Builder::new().prefix(&ns.name).tempdir().unwrap();
        let dir = tmp.path();
        let nginx = ok_server(&ns, dir, "backend", &format!("127.0.0.1:{BACKEND}"), 1);
        let d = dir.display();
        let (cert, key) = self_signed(dir, "site");
        let listener = |name: &str, protocol: &str, port: u16, tls: &str| {
            format!(
                "  - {{ name: {name}, protocol: {protocol}, vip: 127.0.0.1, port: {port}, pool: web, access_log: {d}/{name}.log,
      max_header_bytes: 8192, max_body_bytes: 1000, timeouts: {{ idle: {}s, request: {}s }}{tls} }}\n",
                IDLE.as_secs(),
                IDLE.as_secs()
            )
        };
        let config = format!(
            "agent:\n  interfaces: [lo]\n  xdp_mode: generic\nlisteners:\n{}{}pools:\n  - name: web\n    backends:\n      - {{ address: 127.0.0.1, port: {BACKEND} }}\n",
            listener("plain", "http", HTTP, ""),
            listener(
                "secure",
                "https",
                HTTPS,
                &format!(
                    ", tls: {{ certificates: [{{ cert: {}, key: {} }}] }}",
                    cert.display(),
                    key.display()
                )
            ),
        );
        let agent = Agent::start(&ns, &config);
        let site = Site {
            agent,
            _backend: Children(vec![nginx]),
            ns,
            dir: tmp,
        };
        // nginx may still be starting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while site.ns.scoped(|| get(http())).is_err() {
            assert!(Instant::now() < deadline, "the proxy never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        site
    }
}

fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid).expect("agent running") as f64 / 1024.0
}

/// Sends `bytes` and returns what the proxy answers until it closes (or 2 × IDLE pass).
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IDLE * 2)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

/// One request on a new connection; the status line.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: real\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let line = status_line(&out).to_string();
    if line.contains(" 200 ") && out.ends_with("ok\n") {
        Ok(line)
    } else {
        Err(format!("answer {out:?}"))
    }
}

/// A client requesting every 20 ms on new connections while the abuse goes on.
struct RealClient {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Tally>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Clone, Debug, Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
    slowest: Duration,
}

impl RealClient {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Tally::default()));
        let (flag, tally, name) = (stop.clone(), log.clone(), ns.name.clone());
        let thread = std::thread::spawn(move || {
            let _in = lb_tests::netns::enter(&name);
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = get(http());
                let mut t = tally.lock().unwrap();
                t.slowest = t.slowest.max(started.elapsed());
                match r {
                    Ok(_) => t.ok += 1,
                    Err(e) => t.failed.push(e),
                }
                drop(t);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RealClient {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// What happened since the last call.
    fn take(&self) -> Tally {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for RealClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints a case's report and checks the real client lost nothing meanwhile (and was served
/// at least once, waiting a moment for that after a quick case).
fn report(pid: u32, real: &RealClient, case: &str, sent: &str, happened: &str) {
    let mut t = real.take();
    let deadline = Instant::now() + Duration::from_secs(2);
    while t.ok == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let more = real.take();
        t.ok += more.ok;
        t.failed.extend(more.failed);
        t.slowest = t.slowest.max(more.slowest);
    }
    println!("{case}:\n  sent: {sent}\n  happened: {happened}\n  real client: {} requests answered 200, slowest {:?}; lost {} {:?}\n  agent RSS: {:.1} MiB", t.ok, t.slowest, t.failed.len(), t.failed, rss_mib(pid));
    assert!(
        t.failed.is_empty(),
        "{case}: the real client lost requests: {:?}",
        t.failed
    );
    assert!(t.ok > 0, "{case}: the real client was not served");
}

/// Whether the proxy has closed `s` (EOF or reset) without waiting.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    s.set_nonblocking(true).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits until every connection is closed or `within` of `since` passes; how many were and
/// when (after `since`) the last one went.
fn wait_closed(conns: &mut [TcpStream], since: Instant, within: Duration) -> (usize, Duration) {
    let mut open: Vec<usize> = (0..conns.len()).collect();
    let mut last = Duration::ZERO;
    while !open.is_empty() && since.elapsed() < within {
        open.retain(|&i| {
            let gone = closed(&mut conns[i]);
            if gone {
                last = since.elapsed();
            }
            !gone
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    (conns.len() - open.len(), last)
}

#[test]
fn the_proxy_refuses_abuse_with_the_right_codes_keeps_serving_and_stays_bounded() {
    // 10,000 connections need as many descriptors on both sides; the agent inherits the limit.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("descriptor limit");
    assert!(
        hard >= IDLE_CONNECTIONS as u64 + 1000,
        "the hard descriptor limit ({hard}) is too low for {IDLE_CONNECTIONS} connections"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the descriptor limit");
    let site = Site::start();
    let pid = site.agent.pid();
    // One L7 worker per CPU, each pinned to its own (agent.l7_cpu_affinity, on by default).
    let mut pinned = thread_cpus(pid, "l7-worker-");
    pinned.sort();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(pinned.len(), cores, "{pinned:?}");
    pinned.dedup();
    assert!(
        pinned.len() == cores && pinned.iter().all(|c| c.parse::<usize>().is_ok()),
        "each worker on one CPU of its own: {pinned:?}"
    );
    let base = rss_mib(pid);
    println!("agent RSS at start: {base:.1} MiB");
    let real = RealClient::start(&site.ns);
    let ns = &site.ns;
    ns.scoped(|| {
        // Slowloris: a request head that never ends, one more header line every 500 ms.
        let started = Instant::now();
        let mut conns: Vec<TcpStream> = (0..100)
            .map(|_| {
                let mut s = TcpStream::connect(http()).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").unwrap();
                s
            })
            .collect();
        let mut open: Vec<usize> = (0..conns.len()).collect();
        let mut last = Duration::ZERO;
        while !open.is_empty() && started.elapsed() < IDLE + SLACK {
            std::thread::sleep(Duration::from_millis(500));
            open.retain(|&i| {
                let s = &mut conns[i];
                let gone = s.write_all(b"X-Slow: yes\r\n").is_err() || closed(s);
                if gone {
                    last = started.elapsed();
                }
                !gone
            });
        }
        let gone = conns.len() - open.len();
        let still: Vec<_> = open.iter().filter_map(|&i| conns[i].local_addr().ok()).collect();
        report(
            pid,
            &real,
            "slowloris",
            "100 connections sending a header line every 500 ms, never ending the head",
            &format!("{gone}/100 closed by the proxy, the last {last:?} after the first bytes (idle timeout {IDLE:?})"),
        );
        assert!(open.is_empty(), "still open after {:?}: {still:?}", IDLE + SLACK);

        // Heads and bodies over the limits, and malformed requests.
        let cases: [(&str, Vec<u8>, &str); 7] = [
            (
                "a 20 KiB header (limit 8 KiB)",
                format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "h".repeat(20 << 10)).into_bytes(),
                " 431 ",
            ),
            (
                "a declared 5000-byte body (limit 1000)",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec(),
                " 413 ",
            ),
            (
                "a 2000-byte chunked body (limit 1000)",
                format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n", "b".repeat(2000)).into_bytes(),
                " 413 ",
            ),
            ("a header without a colon", b"GET / HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), " 400 "),
            ("a request line that is not one", b"HELLO\r\n\r\n".to_vec(), " 400 "),
            ("a control byte in the target", b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), " 400 "),
            ("two lengths that disagree", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), " 400 "),
        ];
        let mut answers = Vec::new();
        for (what, bytes, want) in &cases {
            let answer = raw(http(), bytes);
            answers.push(format!("{what}: {}", status_line(&answer)));
            assert!(status_line(&answer).contains(want), "{what}: want{want}, got {answer:?}");
        }
        report(pid, &real, "oversized and malformed", &format!("{} requests", cases.len()), &answers.join("; "));

        // curl uploading 2 MiB (limit 1000 bytes) goes on sending while the 413 comes; it
        // reports the answer only if the proxy neither resets the connection (HTTP/1) nor the
        // stream (HTTP/2) under it.
        let upload = site.dir.path().join("upload");
        std::fs::write(&upload, vec![b'u'; 2 << 20]).unwrap();
        let file = format!("@{}", upload.display());
        let url = format!("http://127.0.0.1:{HTTP}/up");
        let mut got = Vec::new();
        for (what, options) in [
            ("HTTP/1.1 with a length", &[][..]),
            ("HTTP/1.1 chunked", &["-H", "Transfer-Encoding: chunked"][..]),
            ("HTTP/2 with a length", &["--http2-prior-knowledge"][..]),
            ("HTTP/2 without", &["--http2-prior-knowledge", "-H", "Transfer-Encoding: chunked"][..]),
        ] {
            for _ in 0..5 {
                let mut args = vec!["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"];
                args.extend_from_slice(options);
                args.extend_from_slice(&["--data-binary", &file, &url]);
                let code = String::from_utf8_lossy(&ns.output(&args).stdout).into_owned();
                assert_eq!(code, "413", "{what}");
            }
            got.push(format!("{what}: 413 x5"));
        }
        report(pid, &real, "uploads over the limit", "curl, 2 MiB, 5 times each way", &got.join("; "));

        // TLS garbage, and plain HTTP, on the https port.
        let started = Instant::now();
        let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        garbage[0] = 0x16; // a handshake record type, then nonsense
        let mut conns: Vec<TcpStream> = (0..50)
            .map(|i| {
                let mut s = TcpStream::connect(https()).unwrap();
                let bytes: &[u8] = if i % 2 == 0 { &garbage } else { b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" };
                let _ = s.write_all(bytes);
                s
            })
            .collect();
        let (gone, last) = wait_closed(&mut conns, started, IDLE + SLACK);
        let curl = ns.output(&["curl", "-sk", "--max-time", "5", &format!("https://127.0.0.1:{HTTPS}/")]);
        let served = String::from_utf8_lossy(&curl.stdout).into_owned();
        report(
            pid,
            &real,
            "TLS garbage",
            "25 connections sending 4 KiB of garbage after a handshake record type, 25 sending plain HTTP, to the https port",
            &format!("{gone}/50 closed by the proxy, the last {last:?} after the first was opened; a real TLS client then got {served:?}"),
        );
        assert_eq!(gone, 50);
        assert_eq!(served, "ok\n", "https still serves");
    });

    // Idle connections: open, say nothing.
    let ns = &site.ns;
    ns.scoped(|| {
        let started = Instant::now();
        let mut conns: Vec<TcpStream> = Vec::with_capacity(IDLE_CONNECTIONS);
        while conns.len() < IDLE_CONNECTIONS {
            match TcpStream::connect_timeout(&http(), Duration::from_secs(5)) {
                Ok(s) => conns.push(s),
                Err(e) => panic!("connection {} of {IDLE_CONNECTIONS}: {e}", conns.len()),
            }
        }
        let opened = started.elapsed();
        // Held for a moment, measured at the peak.
        std::thread::sleep(Duration::from_millis(500));
        let peak = rss_mib(pid);
        let (gone, last) = wait_closed(&mut conns, started, opened + IDLE + SLACK);
        report(
            pid,
            &real,
            "idle connections",
            &format!("{IDLE_CONNECTIONS} connections opened in {opened:?}, nothing sent on them"),
            &format!("agent RSS {peak:.1} MiB with all open ({:.1} KiB per connection); {gone}/{IDLE_CONNECTIONS} closed by the proxy, the last {last:?} after the first was opened", (peak - base) * 1024.0 / IDLE_CONNECTIONS as f64),
        );
        assert_eq!(gone, IDLE_CONNECTIONS, "every idle connection closed by the proxy");
        assert!(peak - base < 400.0, "memory bounded: {base:.1} → {peak:.1} MiB");
    });
    let end = rss_mib(pid);
    println!("agent RSS at the end: {end:.1} MiB (start {base:.1} MiB)");
    drop(real);
    let out = site.agent.stop_cleanly();
    assert!(out.contains("counters:"), "{out}");
}
