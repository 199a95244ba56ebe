//! The standard test topology, the one `examples/demo.yaml` describes:
//!
//! ```text
//!  client ns            lb ns                          switch ns (br0)      backend ns × N
//!  eth0 10.91.0.2 ── lb-ext 10.91.0.1                    ├── eth0 10.91.2.11, .12, …
//!                     lb-int 10.91.2.1 (SNAT) ───────── br0
//!                     lo: VIP 10.91.0.100 (added by the agent)
//! ```
//! IPv6 runs alongside: fd00:91:0::/64 outside, fd00:91:2::/64 inside, same host numbers.
//! GRO is on at every veth end: veth only polls frames sent to it by XDP_TX/redirect when the
//! receiving end has GRO (or an XDP program). TX checksum offload is off where traffic enters
//! the LB: with it, veth hands over CHECKSUM_PARTIAL frames whose TCP checksum field holds only
//! the pseudo-header sum, which XDP cannot see as such (a real NIC delivers full checksums).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const VIP: &str = "10.91.0.100";
pub const VIP6: &str = "fd00:91::100";
pub const CLIENT: &str = "10.91.0.2";
pub const SNAT: &str = "10.91.2.1";
pub const SNAT6: &str = "fd00:91:2::1";

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
    pub backends: Vec<Netns>,
}

/// IPv4 address of backend `i` (0-based).
pub fn backend_addr(i: usize) -> String {
    format!("10.91.2.{}", 11 + i)
}

pub fn backend_addr6(i: usize) -> String {
    format!("fd00:91:2::{}", 11 + i)
}

fn gro_on(ns: &Netns, dev: &str) {
    ns.run(&["ethtool", "-K", dev, "gro", "on"]);
}

/// A veth pair with one end in each namespace. Created from inside them, so interface names
/// never clash between concurrent tests.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ]);
}

/// Enslaves `port` to the switch's bridge and brings it up.
fn bridge_port(sw: &Netns, port: &str) {
    sw.ip(&["link", "set", port, "master", "br0", "up"]);
    gro_on(sw, port);
}

/// A host interface sending through the LB: full checksums on the wire.
fn host_iface(ns: &Netns, dev: &str) {
    ns.run(&["ethtool", "-K", dev, "gro", "on", "tx", "off"]);
}

impl Topology {
    /// Two-arm: the client reaches the LB on `lb-ext`, backends sit behind `lb-int`.
    pub fn new(backends: usize) -> Self {
        let t = Self::namespaces(backends);
        let (c, lb, sw) = (&t.client, &t.lb, &t.switch);
        veth(lb, "lb-ext", c, "eth0");
        veth(lb, "lb-int", sw, "to-lb");
        bridge_port(sw, "to-lb");

        c.ip(&["addr", "add", "10.91.0.2/24", "dev", "eth0"]);
        c.ip(&["addr", "add", "fd00:91::2/64", "dev", "eth0", "nodad"]);
        c.ip(&["link", "set", "eth0", "up"]);
        host_iface(c, "eth0");

        lb.ip(&["addr", "add", "10.91.0.1/24", "dev", "lb-ext"]);
        lb.ip(&["addr", "add", "fd00:91::1/64", "dev", "lb-ext", "nodad"]);
        lb.ip(&["addr", "add", "10.91.2.1/24", "dev", "lb-int"]);
        lb.ip(&["addr", "add", "fd00:91:2::1/64", "dev", "lb-int", "nodad"]);
        for dev in ["lb-ext", "lb-int"] {
            lb.ip(&["link", "set", dev, "up"]);
            gro_on(lb, dev);
        }
        t.wire_backends();
        t
    }

    /// One-arm: client, LB (`lb-arm` only) and backends share one segment (10.91.2.0/24); the
    /// client routes the VIP via the LB, and the LB sends everything back out with XDP_TX.
    pub fn one_arm(backends: usize) -> Self {
        let t = Self::namespaces(backends);
        let (c, lb, sw) = (&t.client, &t.lb, &t.switch);
        veth(lb, "lb-arm", sw, "to-lb");
        veth(sw, "to-cli", c, "eth0");
        bridge_port(sw, "to-lb");
        bridge_port(sw, "to-cli");
        c.ip(&["addr", "add", "10.91.2.2/24", "dev", "eth0"]);
        c.ip(&["link", "set", "eth0", "up"]);
        c.ip(&["route", "add", "10.91.0.0/24", "via", SNAT]);
        host_iface(c, "eth0");
        lb.ip(&["addr", "add", "10.91.2.1/24", "dev", "lb-arm"]);
        lb.ip(&["link", "set", "lb-arm", "up"]);
        gro_on(lb, "lb-arm");
        t.wire_backends();
        t
    }

    /// The namespaces and the switch's bridge, nothing wired yet.
    fn namespaces(backends: usize) -> Self {
        let t = Topology {
            client: Netns::new("cli"),
            lb: Netns::new("lb"),
            switch: Netns::new("sw"),
            backends: (0..backends)
                .map(|i| Netns::new(&format!("be{i}")))
                .collect(),
        };
        t.switch.ip(&["link", "add", "br0", "type", "bridge"]);
        t.switch.ip(&["link", "set", "br0", "up"]);
        t
    }

    /// Each backend on its own switch port.
    fn wire_backends(&self) {
        let sw = &self.switch;
        for (i, be) in self.backends.iter().enumerate() {
            let port = format!("be{i}");
            veth(sw, &port, be, "eth0");
            bridge_port(sw, &port);
            be.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(i)),
                "dev",
                "eth0",
            ]);
            be.ip(&[
                "addr",
                "add",
                &format!("{}/64", backend_addr6(i)),
                "dev",
                "eth0",
                "nodad",
            ]);
            be.ip(&["link", "set", "eth0", "up"]);
            host_iface(be, "eth0");
            // Client networks via the LB, as `client_ip: passthrough` needs (SNAT replies go to
            // the on-link SNAT address either way).
            be.ip(&["route", "add", "10.91.0.0/24", "via", SNAT]);
            be.ip(&["-6", "route", "add", "fd00:91::/64", "via", SNAT6]);
        }
    }

    /// The config of `examples/demo.yaml` for `n` backends on `port` (all weight 1).
    pub fn config(&self, backend_port: u16) -> String {
        let mut s = format!(
            "agent:\n  interfaces: [lb-ext, lb-int]\n  xdp_mode: native\n\
             snat:\n  addresses: [{SNAT}]\n  ports: 20000-60000\n\
             listeners:\n  - name: web\n    protocol: tcp\n    vip: {VIP}\n    port: 80\n    pool: web\n\
             pools:\n  - name: web\n    backends:\n"
        );
        for i in 0..self.backends.len() {
            s += &format!(
                "      - {{ address: {}, port: {backend_port}, weight: 1 }}\n",
                backend_addr(i)
            );
        }
        s
    }

    /// TCP and UDP listeners over IPv4 and IPv6 (`web`, `dns`, `web6`, `dns6`), all to the
    /// backends' `backend_port`.
    pub fn config_dual_stack(&self, backend_port: u16) -> String {
        let mut s = format!(
            "agent:\n  interfaces: [lb-ext, lb-int]\n\
             snat:\n  addresses: [{SNAT}, {SNAT6}]\n\
             listeners:\n\
             \x20 - {{ name: web, protocol: tcp, vip: {VIP}, port: 80, pool: v4 }}\n\
             \x20 - {{ name: dns, protocol: udp, vip: {VIP}, port: 53, pool: v4 }}\n\
             \x20 - {{ name: web6, protocol: tcp, vip: \"{VIP6}\", port: 80, pool: v6 }}\n\
             \x20 - {{ name: dns6, protocol: udp, vip: \"{VIP6}\", port: 53, pool: v6 }}\n\
             pools:\n"
        );
        for (pool, addr) in [
            ("v4", backend_addr as fn(usize) -> String),
            ("v6", backend_addr6),
        ] {
            s += &format!("  - name: {pool}\n    backends:\n");
            for i in 0..self.backends.len() {
                s += &format!(
                    "      - {{ address: \"{}\", port: {backend_port} }}\n",
                    addr(i)
                );
            }
        }
        s
    }

    /// Starts `lb-agent run` in the LB namespace and waits until it has attached.
    pub fn start_agent(&self, config: &str) -> Agent {
        Agent::start(&self.lb, config)
    }

    /// A TCP and UDP server in every backend answering each connection or datagram with
    /// `"<name> <peer address>\n"` (names `backend-1`, `backend-2`, …).
    pub fn serve_names(&self, port: u16) -> Vec<NameServer> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| NameServer::start(ns, port, format!("backend-{}", i + 1)))
            .collect()
    }

    /// Opens `n` TCP connections from the client to `addr` and returns each answer line (or the
    /// error). Sequential: every connection is a new flow through the LB.
    pub fn connect_many(&self, addr: SocketAddr, n: usize) -> Vec<Result<String, String>> {
        self.client
            .scoped(|| (0..n).map(|_| fetch_line(addr)).collect())
    }

    /// Sends one datagram from each of `n` new sockets (so `n` flows) to `addr` and returns
    /// each answer.
    pub fn udp_many(&self, addr: SocketAddr, n: usize) -> Vec<Result<String, String>> {
        self.client
            .scoped(|| (0..n).map(|_| udp_exchange(addr)).collect())
    }
}

/// Sends a datagram, waits for the answer (retrying a few times: UDP may lose the first one
/// while the LB resolves a neighbour), checks it came from `addr`.
pub fn udp_exchange(addr: SocketAddr) -> Result<String, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("addr");
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    for _ in 0..6 {
        s.send_to(b"who?", addr).map_err(|e| e.to_string())?;
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if from != addr {
                return Err(format!("answer from {from}, not {addr}"));
            }
            return Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
        }
    }
    Err(format!("no UDP answer from {addr}"))
}

/// IPv4 peers of a dual-stack socket show as ::ffff:a.b.c.d.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Counts answers per backend name, asserting every flow succeeded and every backend saw
/// `peer` (the SNAT address) as the client. `what` labels panics.
pub fn tally(
    what: &str,
    answers: &[Result<String, String>],
    peer: &str,
) -> BTreeMap<String, usize> {
    let mut per_backend = BTreeMap::new();
    for (i, a) in answers.iter().enumerate() {
        let line = a
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: flow {i} failed: {e}"));
        let (name, seen) = line.split_once(' ').expect("`name peer` answer");
        assert_eq!(seen, peer, "{what}: backend {name} saw {seen}, not {peer}");
        *per_backend.entry(name.to_string()).or_insert(0) += 1;
    }
    println!("{what}: flows per backend: {per_backend:?}");
    per_backend
}

/// Connects, reads one line, checks the peer is `addr`.
pub fn fetch_line(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    if peer != addr {
        return Err(format!("peer is {peer}, not {addr}"));
    }
    let mut line = String::new();
    BufReader::new(&mut s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_string())
}

/// A name-answering TCP and UDP server on a thread inside a namespace; stops on drop.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NameServer {
    pub fn start(ns: &Netns, port: u16, name: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns_name = ns.name.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let entered = crate::netns::enter(&ns_name);
            let l = TcpListener::bind(("::", port)).expect("bind backend");
            l.set_nonblocking(true).expect("nonblocking");
            let u = UdpSocket::bind(("::", port)).expect("bind backend (udp)");
            u.set_nonblocking(true).expect("nonblocking");
            drop(entered);
            let mut buf = [0u8; 2048];
            ready_tx.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                let mut idle = true;
                if let Ok((mut s, peer)) = l.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = writeln!(s, "{name} {}", unmapped(peer.ip()));
                    idle = false;
                }
                if let Ok((_, peer)) = u.recv_from(&mut buf) {
                    let answer = format!("{name} {}\n", unmapped(peer.ip()));
                    let _ = u.send_to(answer.as_bytes(), peer);
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("backend server started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `lb-agent run` as a child process in a namespace; SIGTERM (then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    ns: String,
    config_path: PathBuf,
    stderr: mpsc::Receiver<String>,
    pub log: Vec<String>,
    /// Whether dropping this handle detaches the dataplane (not when a successor adopted it).
    owns_dataplane: bool,
    /// Whether dropping this handle removes the config file (not when a successor reads it).
    owns_config: bool,
}

/// The agent binary: `LB_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent")
        })
}

impl Agent {
    pub fn start(ns: &Netns, config: &str) -> Self {
        let config_path = std::env::temp_dir().join(format!("{}.yaml", ns.name));
        std::fs::write(&config_path, config).expect("write config");
        Self::spawn(&ns.name, config_path)
    }

    fn spawn(ns: &str, config_path: PathBuf) -> Self {
        let bin = agent_bin();
        assert!(
            bin.exists(),
            "{} not built (cargo xtask build, or set LB_AGENT_BIN)",
            bin.display()
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, bin.to_str().expect("utf-8 path")])
            .args(["run", "--config", config_path.to_str().expect("utf-8 path")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lb-agent");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child: Some(child),
            ns: ns.to_string(),
            config_path,
            stderr: rx,
            log: Vec::new(),
            owns_dataplane: true,
            owns_config: true,
        };
        agent.wait_for("running", Duration::from_secs(30));
        agent
    }

    /// The agent's process id (`ip netns exec` execs it in place), for /proc and its maps.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for a log line containing `needle`; panics with the log on timeout or exit.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log.push(line);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("lb-agent never logged `{needle}`:\n{}", self.log.join("\n"));
    }

    /// SIGTERM, wait, and return what the agent printed on stdout (its counters).
    pub fn stop(mut self) -> String {
        self.terminate().0
    }

    /// Runs `lb-agent <args>` in the agent's namespace (e.g. `reload`, `stop --detach`).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                agent_bin().to_str().expect("utf-8 path"),
            ])
            .args(args)
            .output()
            .expect("spawn lb-agent")
    }

    /// Sends `signal` (SIGTERM, SIGKILL), waits for the exit, and starts a new agent with the
    /// same config, which adopts the pinned dataplane.
    pub fn restart(mut self, signal: nix::sys::signal::Signal) -> Agent {
        self.signal_and_wait(signal);
        self.owns_dataplane = false;
        self.owns_config = false;
        Agent::spawn(&self.ns, self.config_path.clone())
    }

    /// SIGINT (what Ctrl-C sends): the agent removes its dataplane itself. Returns stdout.
    pub fn interrupt(mut self) -> String {
        let (out, _) = self.signal_and_wait(nix::sys::signal::Signal::SIGINT);
        self.owns_dataplane = false;
        out
    }

    /// Rewrites the config file (for reloads).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).expect("write config");
    }

    fn terminate(&mut self) -> (String, bool) {
        let (out, clean) = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
        if self.owns_dataplane {
            self.owns_dataplane = false;
            let detach = self.cli(&["stop", "--detach"]);
            if !detach.status.success() {
                self.log
                    .push(String::from_utf8_lossy(&detach.stderr).into_owned());
                return (out, false);
            }
        }
        (out, clean)
    }

    fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> (String, bool) {
        let Some(mut child) = self.child.take() else {
            return (String::new(), true);
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut clean = true;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    clean &= status.success();
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    clean = false;
                    break;
                }
            }
        }
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        while let Ok(line) = self.stderr.try_recv() {
            self.log.push(line);
        }
        (out, clean)
    }

    /// Stops the agent and asserts it exited cleanly; returns its stdout.
    pub fn stop_cleanly(mut self) -> String {
        let (out, clean) = self.terminate();
        assert!(
            clean,
            "lb-agent did not exit cleanly:\n{}",
            self.log.join("\n")
        );
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let (out, _) = self.terminate();
        // A failing test shows what the agent saw and counted (the harness prints captured
        // output of failed tests only).
        if std::thread::panicking() {
            println!(
                "lb-agent log:\n{}\nlb-agent counters:\n{out}",
                self.log.join("\n")
            );
        }
        // Also after `stop_cleanly`, which has already detached the dataplane.
        if self.owns_config {
            let _ = std::fs::remove_file(&self.config_path);
        }
    }
}

/// A TCP echo server on a thread inside a namespace (a thread per connection); stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let _in = ns.enter();
            TcpListener::bind(("::", port)).expect("bind echo server")
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                        let flag = flag.clone();
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while !flag.load(Ordering::Relaxed) {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if e.kind() == std::io::ErrorKind::WouldBlock
                                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Long-lived connections from the client namespace, each sending a numbered 64-byte message
/// every `every` and checking its echo, until `finish`.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ChatterReport>>,
}

/// What the chatter saw: connections that broke (with why), messages and bytes echoed intact.
#[derive(Debug, Default)]
pub struct ChatterReport {
    pub connections: usize,
    pub broken: Vec<String>,
    pub messages: u64,
    pub bytes: u64,
}

impl Chatter {
    pub fn start(ns: &Netns, addr: SocketAddr, connections: usize, every: Duration) -> Self {
        let streams: Vec<TcpStream> = ns.scoped(|| {
            (0..connections)
                .map(|i| {
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        .unwrap_or_else(|e| panic!("chatter connection {i}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(3)))
                        .expect("timeout");
                    s.set_nodelay(true).expect("nodelay");
                    s
                })
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut report = ChatterReport {
                connections: streams.len(),
                ..Default::default()
            };
            let mut live: Vec<Option<TcpStream>> = streams.into_iter().map(Some).collect();
            let mut round = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for (i, slot) in live.iter_mut().enumerate() {
                    let Some(s) = slot else { continue };
                    let msg = format!("{i:>8} {round:>16} {}", "x".repeat(38));
                    let mut back = [0u8; 64];
                    let result = s
                        .write_all(msg.as_bytes())
                        .and_then(|()| s.read_exact(&mut back));
                    match result {
                        Ok(()) if back == msg.as_bytes() => {
                            report.messages += 1;
                            report.bytes += 64;
                        }
                        Ok(()) => {
                            report.broken.push(format!("connection {i}: garbled echo"));
                            *slot = None;
                        }
                        Err(e) => {
                            report
                                .broken
                                .push(format!("connection {i} round {round}: {e}"));
                            *slot = None;
                        }
                    }
                }
                round += 1;
                std::thread::sleep(every);
            }
            report
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> ChatterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("not finished yet")
            .join()
            .expect("chatter thread")
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal HTTP/1.1 server on a thread inside a namespace, over TLS (a self-signed
/// certificate) when asked: answers every request with the current status (settable, for
/// health checks) and its name; stops on drop.
pub struct HttpServer {
    status: Arc<std::sync::atomic::AtomicU16>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(ns: &Netns, port: u16, name: String) -> Self {
        Self::serve(ns, port, name, None)
    }

    pub fn start_tls(ns: &Netns, port: u16, name: String) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.clone()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        Self::serve(ns, port, name, Some(Arc::new(config)))
    }

    fn serve(ns: &Netns, port: u16, name: String, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = {
            let _in = ns.enter();
            TcpListener::bind(("::", port)).expect("bind http server")
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let (code, flag) = (status.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let answer = |io: &mut dyn ReadWrite| {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match io.read(&mut buf) {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let body = format!("{name}\n");
                    let _ = write!(
                        io,
                        "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        code.load(Ordering::Relaxed),
                        body.len()
                    );
                    let _ = io.flush();
                };
                match &tls {
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                            continue;
                        };
                        let mut stream = rustls::StreamOwned::new(conn, s);
                        answer(&mut stream);
                        stream.conn.send_close_notify();
                        let _ = stream.flush();
                    }
                    None => answer(&mut s),
                }
            }
        });
        Self {
            status,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::Relaxed);
    }
}

/// A byte stream: plain TCP or TLS over it.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
