//! `cargo xtask bench l4`: this LB against the kernel's own NAT (nftables DNAT+SNAT) and against
//! HAProxy in TCP mode, each in turn in the LB namespace of one topology (client ── LB ── 3
//! backends), with the same backends and the same load: new TCP connections per second,
//! long-stream throughput, small UDP packets per second, and the CPU each costs.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use lb_tests::{
    netns::Children,
    nginx::ok_server,
    topology::{backend_addr, SNAT, VIP},
    Agent, Topology,
};

use super::{wait_listening, with_cpu, wrk, CpuUse, Row};

const WEB: u16 = 8080;
/// iperf3, TCP and UDP, on the first backend.
const PERF: u16 = 5201;
const BACKENDS: usize = 3;
const ROUNDS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Ours,
    Nft,
    Haproxy,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Ours => "lb-agent",
            Peer::Nft => "nftables DNAT+SNAT",
            Peer::Haproxy => "HAProxy (TCP mode)",
        }
    }
}

/// One peer's figures from one round.
#[derive(Clone, Copy, Default)]
struct Figures {
    conns: f64,
    conns_cpu: CpuUse,
    conns_done: f64,
    gbps: f64,
    gbps_cpu: CpuUse,
    udp_pps: f64,
    udp_cpu: CpuUse,
    udp_packets: f64,
}

pub fn run(dir: &Path) -> Result<Vec<Row>> {
    let topo = Topology::new(BACKENDS);
    let mut servers = Children(Vec::new());
    for (i, be) in topo.backends.iter().enumerate() {
        servers.0.push(ok_server(
            be,
            dir,
            &format!("l4-be{i}"),
            &WEB.to_string(),
            1,
        ));
        wait_listening(be, WEB)?;
    }
    servers
        .0
        .push(topo.backends[0].spawn(&["iperf3", "-s", "-p", &PERF.to_string()]));
    wait_listening(&topo.backends[0], PERF)?;

    let peers = [Peer::Ours, Peer::Nft, Peer::Haproxy];
    let mut best = [Figures::default(); 3];
    for round in 1..=ROUNDS {
        for (i, &peer) in peers.iter().enumerate() {
            println!("== round {round}/{ROUNDS}: {}", peer.name());
            let lb = Lb::start(peer, &topo, dir)?;
            let f = measure(&topo, lb.pid(), peer != Peer::Haproxy)?;
            drop(lb);
            println!(
                "   {:.0} conn/s, {:.2} Gbit/s, {:.0} UDP packets/s",
                f.conns, f.gbps, f.udp_pps
            );
            let b = &mut best[i];
            if f.conns > b.conns {
                (b.conns, b.conns_cpu, b.conns_done) = (f.conns, f.conns_cpu, f.conns_done);
            }
            if f.gbps > b.gbps {
                (b.gbps, b.gbps_cpu) = (f.gbps, f.gbps_cpu);
            }
            if f.udp_pps > b.udp_pps {
                (b.udp_pps, b.udp_cpu, b.udp_packets) = (f.udp_pps, f.udp_cpu, f.udp_packets);
            }
        }
    }
    Ok(rows(&best))
}

/// `total` CPU seconds per unit of `work`, times `scale` (µs, ns); none without work.
fn per(total: Option<f64>, work: f64, scale: f64) -> Option<f64> {
    total.filter(|_| work > 0.0).map(|s| s * scale / work)
}

/// Ours against each peer, metric by metric.
fn rows(best: &[Figures; 3]) -> Vec<Row> {
    type Metric = (&'static str, fn(&Figures) -> Option<f64>);
    let metrics: [Metric; 9] = [
        (
            "new TCP connections/s (wrk, 64 clients, a connection per request)",
            |f| Some(f.conns),
        ),
        (
            "machine CPU per connection, µs (client, LB and backends)",
            |f| per(Some(f.conns_cpu.machine.busy()), f.conns_done, 1e6),
        ),
        ("softirq CPU per connection, µs (packet processing)", |f| {
            per(Some(f.conns_cpu.machine.softirq), f.conns_done, 1e6)
        }),
        (
            "LB process CPU per connection, µs (lb-agent: the agent, not the datapath)",
            |f| per(f.conns_cpu.process, f.conns_done, 1e6),
        ),
        ("TCP throughput, Gbit/s (iperf3, 2 streams)", |f| {
            Some(f.gbps)
        }),
        ("machine CPU per GB of TCP stream, ms", |f| {
            per(
                Some(f.gbps_cpu.machine.busy()),
                f.gbps * f.gbps_cpu.wall / 8.0,
                1e3,
            )
        }),
        ("UDP packets/s received (iperf3, 64-byte datagrams)", |f| {
            (f.udp_pps > 0.0).then_some(f.udp_pps)
        }),
        ("machine CPU per UDP packet, ns", |f| {
            per(Some(f.udp_cpu.machine.busy()), f.udp_packets, 1e9)
        }),
        ("softirq CPU per UDP packet, ns", |f| {
            per(Some(f.udp_cpu.machine.softirq), f.udp_packets, 1e9)
        }),
    ];
    let mut rows = Vec::new();
    for (measure, get) in metrics {
        let Some(ours) = get(&best[0]) else { continue };
        for (i, peer) in [Peer::Nft, Peer::Haproxy].iter().enumerate() {
            let theirs = get(&best[i + 1]);
            // A peer without the figure shows once, where it cannot do the work at all.
            if theirs.is_none() && !measure.starts_with("UDP packets/s") {
                continue;
            }
            rows.push(Row {
                part: "l4",
                measure: measure.into(),
                ours,
                peer: peer.name().into(),
                theirs,
            });
        }
    }
    rows
}

/// The LB under test in the LB namespace; removed on drop.
struct Lb<'a> {
    topo: &'a Topology,
    agent: Option<Agent>,
    haproxy: Option<Children>,
    peer: Peer,
}

impl<'a> Lb<'a> {
    fn start(peer: Peer, topo: &'a Topology, dir: &Path) -> Result<Self> {
        let lb = &topo.lb;
        let mut this = Lb {
            topo,
            agent: None,
            haproxy: None,
            peer,
        };
        let backends: Vec<String> = (0..BACKENDS).map(backend_addr).collect();
        match peer {
            Peer::Ours => {
                let mut c = format!(
                    "agent:\n  interfaces: [lb-ext, lb-int]\n  xdp_mode: native\n\
                     snat:\n  addresses: [{SNAT}]\n\
                     listeners:\n\
                     \x20 - {{ name: web, protocol: tcp, vip: {VIP}, port: 80, pool: web }}\n\
                     \x20 - {{ name: perf, protocol: tcp, vip: {VIP}, port: {PERF}, pool: perf }}\n\
                     \x20 - {{ name: perf-udp, protocol: udp, vip: {VIP}, port: {PERF}, pool: perf }}\n\
                     pools:\n  - name: perf\n    backends: [{{ address: {}, port: {PERF} }}]\n  - name: web\n    backends:\n",
                    backends[0]
                );
                for b in &backends {
                    c += &format!("      - {{ address: {b}, port: {WEB} }}\n");
                }
                this.agent = Some(Agent::start(lb, &c));
            }
            Peer::Nft => {
                lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                lb.sysctl("net.ipv4.ip_forward", "1");
                // The same 10 s as this LB keeps a closed flow.
                lb.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "10");
                let map: Vec<String> = backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {b}"))
                    .collect();
                let rules = format!(
                    "table ip lbbench {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} tcp dport 80 dnat to jhash ip saddr . tcp sport mod {BACKENDS} map {{ {} }} : {WEB}
    ip daddr {VIP} tcp dport {PERF} dnat to {}:{PERF}
    ip daddr {VIP} udp dport {PERF} dnat to {}:{PERF}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"lb-int\" snat to {SNAT}
  }}
}}
",
                    map.join(", "),
                    backends[0],
                    backends[0]
                );
                let file = dir.join("l4.nft");
                std::fs::write(&file, rules)?;
                let out = lb.output(&["nft", "-f", &file.display().to_string()]);
                if !out.status.success() {
                    bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
            Peer::Haproxy => {
                lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                // The agent reserved its SNAT ports in this namespace (and leaves them
                // reserved): HAProxy's own connections to the backends need them.
                lb.sysctl("net.ipv4.ip_local_reserved_ports", "");
                let servers = |port: u16, n: usize| -> String {
                    backends[..n]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| format!("  server be{i} {b}:{port}\n"))
                        .collect()
                };
                let cfg = format!(
                    "global\n  nbthread 2\n  maxconn 9000\n\
                     defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend web\n  bind {VIP}:80\n  default_backend web\n\
                     backend web\n  balance roundrobin\n{}\
                     frontend perf\n  bind {VIP}:{PERF}\n  default_backend perf\n\
                     backend perf\n{}",
                    servers(WEB, BACKENDS),
                    servers(PERF, 1)
                );
                let file = dir.join("l4-haproxy.cfg");
                std::fs::write(&file, cfg)?;
                let file = file.display().to_string();
                this.haproxy = Some(Children(vec![lb.spawn(&["haproxy", "-db", "-f", &file])]));
                wait_listening(lb, 80)?;
            }
        }
        Ok(this)
    }

    /// The process whose CPU counts as the LB's own.
    fn pid(&self) -> Option<u32> {
        let haproxy = self
            .haproxy
            .as_ref()
            .and_then(|c| c.0.first())
            .map(|c| c.id());
        self.agent.as_ref().map(Agent::pid).or(haproxy)
    }
}

impl Drop for Lb<'_> {
    fn drop(&mut self) {
        let lb = &self.topo.lb;
        self.agent = None;
        self.haproxy = None;
        if self.peer == Peer::Nft {
            let _ = lb.output(&["nft", "delete", "table", "ip", "lbbench"]);
        }
        if self.peer != Peer::Ours {
            let _ = lb.output(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
        }
    }
}

fn measure(topo: &Topology, pid: Option<u32>, udp: bool) -> Result<Figures> {
    // The previous peer's closed connections: a backend's TIME_WAIT socket for a tuple this
    // peer reuses, with timestamps from another clock (HAProxy's own connections), turns the
    // SYN away and costs the client a 1 s retry; each peer starts without them.
    for ns in [&topo.client, &topo.lb].into_iter().chain(&topo.backends) {
        let _ = ns.output(&["ss", "-K", "state", "time-wait"]);
    }
    let mut f = Figures::default();
    let (w, cpu) = with_cpu(pid, || {
        wrk(&topo.client, &format!("http://{VIP}/"), 8, true)
    })?;
    (f.conns, f.conns_cpu, f.conns_done) = (w.rps, cpu, w.requests);

    let (j, cpu) = with_cpu(pid, || iperf3(topo, &["-t", "6", "-P", "2"]))?;
    f.gbps = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no received bits/s")?
        / 1e9;
    f.gbps_cpu = cpu;

    if udp {
        let (j, cpu) = with_cpu(pid, || {
            iperf3(topo, &["-u", "-b", "0", "-l", "64", "-t", "6"])
        })?;
        let sum = &j["end"]["sum"];
        let packets = sum["packets"].as_f64().context("iperf3: no packets")?;
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let secs = sum["seconds"].as_f64().unwrap_or(6.0);
        f.udp_packets = packets - lost;
        f.udp_pps = f.udp_packets / secs;
        f.udp_cpu = cpu;
    }
    Ok(f)
}

/// iperf3 from the client to the VIP, its JSON report.
fn iperf3(topo: &Topology, args: &[&str]) -> Result<serde_json::Value> {
    let out = topo
        .client
        .command("iperf3")
        .args(["-J", "-c", VIP, "-p", &PERF.to_string()])
        .args(args)
        .output()
        .context("running iperf3")?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 {args:?}: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = j["error"].as_str() {
        bail!("iperf3 {args:?}: {e}");
    }
    Ok(j)
}
