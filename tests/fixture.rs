//! Shared by the packet fixtures and the XDP benchmark: a namespace shaped like the LB's,
//! the program loaded through the agent's loader, frame builders and checkers.
//! Included with `#[path]`, so some items are unused in one of the two.
#![allow(dead_code, reason = "each includer uses a different subset")]

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use lb_agent::{config, dataplane::Dataplane, gc, plan};
use lb_tests::Netns;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const BACKEND_MACS: [[u8; 6]; 3] = [
    [2, 0, 0, 0, 2, 11],
    [2, 0, 0, 0, 2, 12],
    [2, 0, 0, 0, 2, 13],
];
pub const LB_EXT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const LB_INT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];

pub const CONFIG: &str = "\
agent: { interfaces: [lb-ext, lb-int] }
snat: { addresses: [10.91.2.1], ports: 20000-60000 }
listeners:
  - { name: web, protocol: tcp, vip: 10.91.0.100, port: 80, pool: web }
pools:
  - name: web
    backends:
      - { address: 10.91.2.11, port: 8080 }
      - { address: 10.91.2.12, port: 8080 }
      - { address: 10.91.2.13, port: 8080 }
";

/// `CONFIG` with a UDP listener as well (`dns`, the VIP's port 53, listener id 1).
pub fn config_with_udp() -> String {
    CONFIG.replace(
        "pools:",
        "  - { name: dns, protocol: udp, vip: 10.91.0.100, port: 53, pool: web }\npools:",
    )
}

/// A namespace shaped like the LB's, with the program loaded and configured.
pub struct Fixture {
    pub dp: Dataplane,
    pub plan: plan::Plan,
    pub ext: u32,
    pub int: u32,
}

pub fn lb_namespace() -> Netns {
    let ns = Netns::new("ptr");
    ns.ip(&[
        "link",
        "add",
        "lb-ext",
        "address",
        &mac(LB_EXT_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "ext-peer",
    ]);
    ns.ip(&[
        "link",
        "add",
        "lb-int",
        "address",
        &mac(LB_INT_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "int-peer",
    ]);
    for dev in ["lb-ext", "ext-peer", "lb-int", "int-peer"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["addr", "add", "10.91.0.1/24", "dev", "lb-ext"]);
    ns.ip(&["addr", "add", "10.91.2.1/24", "dev", "lb-int"]);
    ns.ip(&[
        "neigh",
        "add",
        "10.91.0.2",
        "lladdr",
        &mac(CLIENT_MAC),
        "dev",
        "lb-ext",
        "nud",
        "permanent",
    ]);
    for (i, m) in BACKEND_MACS.iter().enumerate() {
        let a = format!("10.91.2.{}", 11 + i);
        ns.ip(&[
            "neigh",
            "add",
            &a,
            "lladdr",
            &mac(*m),
            "dev",
            "lb-int",
            "nud",
            "permanent",
        ]);
    }
    for dev in ["lb-ext", "lb-int"] {
        ns.sysctl(&format!("net.ipv4.conf.{dev}.forwarding"), "1");
    }
    ns
}

impl Fixture {
    /// Must run on a thread inside the namespace.
    pub fn new(text: &str) -> Self {
        let host = config::Host::current().unwrap();
        let cfg = config::parse("fixture.yaml", text, &host).unwrap();
        let mut dp = Dataplane::load().unwrap();
        let plan = plan::build(&cfg);
        dp.apply(&plan).unwrap();
        let idx = |n: &str| nix::net::if_::if_nametoindex(n).unwrap();
        Fixture {
            dp,
            plan,
            ext: idx("lb-ext"),
            int: idx("lb-int"),
        }
    }

    /// Runs the program on `frame` as if received on `ifindex`; returns (action, output frame).
    pub fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Every frame's sequence number; ACKs acknowledge the peer's (so any SYN-ACK's + 1).
pub const SEQ: u32 = 1000;

pub fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: &str,
) -> Vec<u8> {
    tcp_frame_acking(src_mac, dst_mac, src, dst, flags, SEQ + 1)
}

/// `tcp_frame` with the acknowledgment number `ack`.
pub fn tcp_frame_acking(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: &str,
    ack: u32,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.0, dst.0, 64);
    let mut t = b.tcp(src.1, dst.1, SEQ, 64240);
    for f in flags.chars() {
        t = match f {
            'S' => t.syn(),
            'A' => t.ack(ack),
            'F' => t.fin(),
            'R' => t.rst(),
            _ => unreachable!("flag {f}"),
        };
    }
    let payload = b"hello";
    let mut v = Vec::with_capacity(t.size(payload.len()));
    t.write(&mut v, payload).unwrap();
    v
}

/// Parsed TCP/IPv4 frame with both checksums verified by full recompute.
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub syn: bool,
    pub ack: bool,
}

pub fn parse_checked(frame: &[u8]) -> Parsed {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("valid frame");
    let eth = h
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .expect("ethernet");
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        panic!("not IPv4")
    };
    let Some(TransportHeader::Tcp(tcp)) = &h.transport else {
        panic!("not TCP")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = h.payload.slice();
    assert_eq!(
        tcp.checksum,
        tcp.calc_checksum_ipv4(ip, payload).unwrap(),
        "TCP checksum"
    );
    assert_eq!(payload, b"hello", "payload untouched");
    Parsed {
        src_mac: eth.source,
        dst_mac: eth.destination,
        src: (ip.source, tcp.source_port),
        dst: (ip.destination, tcp.destination_port),
        syn: tcp.syn,
        ack: tcp.ack,
    }
}

pub const CLIENT: ([u8; 4], u16) = ([10, 91, 0, 2], 40000);
pub const VIP: ([u8; 4], u16) = ([10, 91, 0, 100], 80);
pub const SNAT: [u8; 4] = [10, 91, 2, 1];

/// The backend a SYN from `client` is sent to, or the action when it is not redirected.
pub fn syn_backend(f: &mut Fixture, client: ([u8; 4], u16)) -> Result<[u8; 4], u32> {
    let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "S"), f.ext);
    if action != XDP_REDIRECT {
        return Err(action);
    }
    Ok(parse_checked(&out).dst.0)
}

impl Fixture {
    /// Completes `client`'s handshake with the VIP: its SYN, the chosen backend's SYN-ACK, its
    /// ACK. Returns the backend and the SNAT address and port the flow got.
    pub fn establish(&mut self, client: ([u8; 4], u16)) -> (([u8; 4], u16), ([u8; 4], u16)) {
        let (_, out) = self.run(
            &tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "S"),
            self.ext,
        );
        let fwd = parse_checked(&out);
        let (backend, snat) = (fwd.dst, fwd.src);
        let mac = BACKEND_MACS[(backend.0[3] - 11) as usize];
        self.run(&tcp_frame(mac, LB_INT_MAC, backend, snat, "SA"), self.int);
        self.run(
            &tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "A"),
            self.ext,
        );
        (backend, snat)
    }

    /// The states of all conntrack entries, sorted.
    pub fn states(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .dp
            .conntrack_entries()
            .iter()
            .map(|(_, e)| e.state)
            .collect();
        v.sort();
        v
    }

    /// Applies another configuration as a reload does: listeners and backends keep their ids.
    pub fn reconfigure(&mut self, text: &str) {
        let host = config::Host::current().unwrap();
        let cfg = config::parse("fixture.yaml", text, &host).unwrap();
        let previous = plan::Ids {
            listeners: self
                .plan
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.id))
                .collect(),
            backends: (self.plan.backends.iter())
                .map(|b| ((b.pool.clone(), (b.address, b.port).into()), b.id))
                .collect(),
        };
        let ids = plan::Ids::assign(&cfg, &previous);
        self.plan = plan::build_with(&cfg, &ids, &Default::default(), |_, _| true);
        self.dp.apply(&self.plan).unwrap();
    }

    /// Keeps this thread's test runs on one CPU, whose flow cache they then share (the
    /// kernel runs a test on the calling thread's CPU), with copies that do not expire during
    /// the test, however slow the machine.
    pub fn cache_flows_on_one_cpu(&mut self) {
        let mut set = nix::sched::CpuSet::new();
        set.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
        self.dp
            .set_flow_cache(Some(std::time::Duration::from_secs(600)))
            .unwrap();
    }

    /// A sweep as if `secs` seconds had passed.
    pub fn gc_after(&mut self, secs: u64) -> gc::Report {
        self.dp
            .gc(&self.plan, gc::monotonic_ns() + secs * 1_000_000_000)
            .unwrap()
    }
}

impl Fixture {
    /// Mean nanoseconds per run of `frame` over `repeat` runs (the kernel's own timing, no
    /// syscall overhead), of the LB program or of the trivial XDP_TX baseline. Repeated runs
    /// reuse the buffer, so a frame the program rewrites is timed as rewritten after the first
    /// run (live-frames mode recycles pages unreset too).
    pub fn time(&mut self, frame: &[u8], ifindex: u32, repeat: u32, baseline: bool) -> f64 {
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let prog = if baseline {
            self.dp.baseline_program().unwrap()
        } else {
            self.dp.program()
        };
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        r.duration.as_nanos() as f64
    }
}
