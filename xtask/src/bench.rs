//! `cargo xtask bench [xdp | l4 | l7 | scale]`: every figure next to a peer measured in the same
//! run on this machine, each peer set up by the bench itself in network namespaces. Prints one
//! table of figures and ratios; the full suite also writes it, with the method, the commands and
//! the machine, to BENCHMARKS.md.

mod l4;
pub mod l7;
mod scale;

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use lb_tests::{procfs, Netns};

#[derive(Subcommand, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// The XDP program's ns per packet (established, new flow) vs a trivial XDP_TX program.
    Xdp,
    /// End to end at L4: this LB vs nftables DNAT+SNAT vs HAProxy (TCP mode), same topology.
    L4,
    /// wrk against the L7 proxy and against nginx set up the same way (HTTP, HTTPS).
    L7,
    /// New-connection rate and memory with 10, 100, 1000 backends and a 10%/90% full conntrack.
    Scale,
}

impl Part {
    const ALL: [Part; 4] = [Part::Xdp, Part::L4, Part::L7, Part::Scale];

    fn name(self) -> &'static str {
        match self {
            Part::Xdp => "xdp",
            Part::L4 => "l4",
            Part::L7 => "l7",
            Part::Scale => "scale",
        }
    }
}

/// One figure and the peer figure it is compared with.
pub struct Row {
    pub part: &'static str,
    pub measure: String,
    pub ours: f64,
    pub peer: String,
    /// `None` where the peer cannot do it (HAProxy and UDP) or has no such figure.
    pub theirs: Option<f64>,
}

/// Runs `which` (all parts when `None`) with the release agent at `agent`.
pub fn run(which: Option<Part>, agent: &Path) -> Result<()> {
    // The namespace harness starts this binary.
    std::env::set_var("LB_AGENT_BIN", agent);
    let tmp = tempfile::Builder::new().prefix("lb-bench-").tempdir()?;
    let dir = tmp.path();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut conditions = Vec::new();
    for part in which.map_or(Part::ALL.to_vec(), |p| vec![p]) {
        let background = background_busy();
        println!(
            "== bench {}: the machine was {background:.0}% busy before it started",
            part.name()
        );
        let part_started = Instant::now();
        rows.extend(match part {
            Part::Xdp => xdp()?,
            Part::L4 => l4::run(dir)?,
            Part::L7 => l7::run(dir)?,
            Part::Scale => scale::run(dir)?,
        });
        conditions.push(format!(
            "- `{}`: {:.0} s; CPU {background:.0}% busy with other work just before",
            part.name(),
            part_started.elapsed().as_secs_f64()
        ));
    }
    let table = table(&rows);
    println!("\n{table}");
    if which.is_none() {
        let md = markdown(&table, &conditions, started.elapsed());
        let path = crate::root().join("BENCHMARKS.md");
        std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// `cargo bench --bench xdp` (tests/bench_xdp.rs), whose `row` lines become table rows.
fn xdp() -> Result<Vec<Row>> {
    let mut c = crate::cargo();
    crate::pgo::same_flags(&mut c);
    c.args(["bench", "-p", "lb-tests", "--bench", "xdp"])
        .stderr(Stdio::inherit());
    let out = c.output().context("cargo bench --bench xdp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the xdp bench failed:\n{text}");
    }
    let mut rows = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("row\t") {
            Some(row) => {
                let f: Vec<&str> = row.split('\t').collect();
                let [measure, ours, peer, theirs] = f[..] else {
                    bail!("bad row from the xdp bench: {line}")
                };
                rows.push(Row {
                    part: "xdp",
                    measure: measure.into(),
                    ours: ours.parse()?,
                    peer: peer.into(),
                    theirs: Some(theirs.parse()?),
                });
            }
            None => println!("{line}"),
        }
    }
    Ok(rows)
}

/// The figures as a markdown table.
fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| part | measure | lb-agent | peer | peer's figure | lb-agent / peer |\n| --- | --- | ---: | --- | ---: | ---: |\n",
    );
    for r in rows {
        let (theirs, ratio) = match r.theirs {
            Some(v) if v != 0.0 => (figure(v), format!("{:.2}x", r.ours / v)),
            Some(v) => (figure(v), "-".into()),
            None => ("n/a".into(), "-".into()),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {theirs} | {ratio} |",
            r.part,
            r.measure,
            figure(r.ours),
            r.peer
        );
    }
    t
}

/// Three significant digits or so, thousands separated.
fn figure(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// How busy the machine is without us: CPU use over two quiet seconds, in percent.
fn background_busy() -> f64 {
    let before = procfs::CpuTimes::now();
    sleep(Duration::from_secs(2));
    let d = procfs::CpuTimes::now() - before;
    100.0 * d.busy() / (d.busy() + d.idle).max(f64::EPSILON)
}

fn shell(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn markdown(table: &str, conditions: &[String], took: Duration) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("?".into(), |(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    let version = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output();
        out.map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
    };
    format!(
        "# Benchmarks

Written by `cargo xtask bench` (root) on {date}, in {took:.0} s. Every figure is next to a
peer measured in the same run, on the same machine, with the same load generator and backends;
the peers are set up by the bench itself in network namespaces. Rerun with the commands below;
the figures are only meaningful as ratios on one machine.

**Machine**: {cpu}, {cpus} vCPUs, {mem_gib:.0} GiB, kernel {kernel}. A 2-core VM shared with
builds and other test runs: the load generators, the backends and the LB under test share these
two cores, so absolute figures are low and a busy neighbour lowers them (the CPU use of other work
just before each part is noted below; rerun a part whose figures look disturbed).

Tools: {wrk}; {iperf3}; {haproxy}; {nginx}; {nft}.

## Commands

| what | command |
| --- | --- |
| everything, and this file | `cargo xtask bench` |
| the XDP program's cost per packet | `cargo xtask bench xdp` |
| L4 end to end vs nftables and HAProxy | `cargo xtask bench l4` |
| L7 vs nginx | `cargo xtask bench l7` |
| backends and conntrack fill | `cargo xtask bench scale` |

## Method

- **xdp**: `BPF_PROG_TEST_RUN` of the real program (loaded by the agent's loader, maps filled
  from a config) and of a program that only returns `XDP_TX`, on the same frames: an
  established flow's ACK (5 alternating batches of 1,000,000 repeats per program, the fastest
  kept), served from the per-CPU flow cache as deployed and again with the cache off (every
  packet looks its conntrack entry up), and 20,000 distinct SYNs (new flows: Maglev pick,
  SNAT port, conntrack inserts). Kernel-timed ns per packet.
- **l4**: one topology (client ── LB ── switch ── 3 backends, veth, native XDP). Backends: nginx
  (one worker each) answering `ok`, and iperf3 on the first. In turn in the LB namespace: the
  agent (XDP FullNAT, Maglev); nftables DNAT (jhash over the 3 backends) + SNAT to the same
  address, the kernel's conntrack with the same 10 s for closed flows; HAProxy 2.6 in TCP mode
  (2 threads, round robin). Each is measured twice, alternating, and the better run is kept.
  New connections: `wrk -t2 -c64 -d8s -H 'Connection: close'` (a TCP connection per request).
  Throughput: `iperf3 -P2 -t6` to the first backend (XDP handles the stream frame by frame,
  while the kernel's forwarding and HAProxy work on the 64 KB packets GRO merges). UDP:
  `iperf3 -u -b0 -l64 -t6` (64-byte datagrams, packets received per second; one iperf3 sender
  thread is the limit, so compare the CPU per packet; HAProxy does not balance UDP). CPU:
  `/proc/stat` deltas over each run for the whole machine (client, LB and backends all share
  it, so the differences between peers are the LB's) and its softirq share (where XDP,
  netfilter and every namespace's TCP/IP receive path run); the LB process's own CPU from
  `/proc/PID/stat` (HAProxy; for lb-agent, the agent's sweeps and health checks, the datapath
  being in softirq).
- **l7**: `wrk -t2 -c64 -d6s` against the agent's proxy and against nginx configured alike (two
  workers, keep-alive to the same two nginx backends, an access log of the same 16 fields as
  JSON lines, forwarded headers), on loopback in one namespace; HTTP and HTTPS (TLS 1.3, ECDSA
  P-256), keep-alive and a new connection per request. Each side is measured four times,
  alternating which goes first (nginx, agent, agent, nginx, ...), both access logs emptied
  after every run, and its best run (with that run's p99) is kept; every run is printed. This VM goes through slower phases
  lasting minutes in which every side loses 10-20%: single runs differ more than the sides.
  The agent is the one `cargo xtask build` makes: profile-guided, trained on this same site
  (see the README); nginx is Debian's package.
- **scale**: one backend namespace answering on 1000 addresses (nginx, two workers), the agent
  configured with 10, 100 and 1000 of them: new connections per second as in l4, the agent's
  RSS and the kernel memory of its maps (`memlock` of the map descriptors, fully preallocated).
  Then 10 backends with the conntrack table prefilled to 10% and 90% of its 1,048,576 entries
  with synthetic established flows (through the agent's map, as a restored state would be): the
  same rate, plus the agent's CPU (its once-a-second sweep reads the whole table; the empty
  table still holds the run's own closed flows, about 10 s worth of connections).

## Results

{table}
## Conditions of this run

{conditions}
",
        date = shell(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        took = took.as_secs_f64(),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel = shell(&["uname", "-r"]),
        wrk = version(&["wrk", "-v"]),
        iperf3 = version(&["iperf3", "--version"]),
        haproxy = version(&["haproxy", "-v"]),
        nginx = version(&["nginx", "-v"]),
        nft = version(&["nft", "--version"]),
        conditions = conditions.join("\n"),
    )
}

/// Waits until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = ns.output(&["ss", "-Hltn", &format!("sport = :{port}")]);
        if !out.stdout.is_empty() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on port {port} in {}", ns.name)
}

/// What wrk measured.
pub struct Wrk {
    pub rps: f64,
    pub p99_ms: f64,
    pub requests: f64,
}

/// `wrk -t2 -c64` for `secs` from `ns`; `close` makes every request a new connection.
pub fn wrk(ns: &Netns, url: &str, secs: u32, close: bool) -> Result<Wrk> {
    let mut c = ns.command("wrk");
    c.args(["-t2", "-c64", &format!("-d{secs}s"), "--latency"]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    let out = c.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no `{prefix}` in wrk's output:\n{text}"))
    };
    let rps = field("Requests/sec:")?.parse()?;
    let p99_ms = millis(field("99%")?).context("wrk's 99% latency")?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        println!("{text}");
    }
    Ok(Wrk {
        rps,
        p99_ms,
        requests,
    })
}

/// wrk's `1.23ms` / `456.00us` / `1.02s` in milliseconds.
fn millis(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// CPU used while something ran: the whole machine's, and one process's (seconds).
#[derive(Clone, Copy, Default)]
pub struct CpuUse {
    pub machine: procfs::CpuTimes,
    pub process: Option<f64>,
    pub wall: f64,
}

/// Runs `f`, measuring the machine's CPU and that of process `pid` meanwhile.
pub fn with_cpu<T>(pid: Option<u32>, f: impl FnOnce() -> Result<T>) -> Result<(T, CpuUse)> {
    let (m0, p0, t0) = (
        procfs::CpuTimes::now(),
        pid.and_then(procfs::cpu_secs),
        Instant::now(),
    );
    let r = f()?;
    let wall = t0.elapsed().as_secs_f64();
    let machine = procfs::CpuTimes::now() - m0;
    let process = match (p0, pid.and_then(procfs::cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((
        r,
        CpuUse {
            machine,
            process,
            wall,
        },
    ))
}
