//! `cargo xtask bench scale`: how the cost grows. New TCP connections per second, the agent's
//! memory and its maps' with 10, 100 and 1000 backends; then the same rate and the agent's CPU
//! with the conntrack table 10% and 90% full.
//!
//! The backends are 1000 addresses of one backend namespace (a local route, nginx on all of
//! them), routed from the LB through its first address: the LB sees 1000 backends, the machine
//! runs one server.

use std::path::Path;

use anyhow::Result;
use lb_common::maps::CONNTRACK_ENTRIES;
use lb_tests::{
    maps,
    netns::Children,
    nginx::ok_server,
    procfs,
    topology::{backend_addr, SNAT, VIP},
    Agent, Topology,
};

use super::{wait_listening, with_cpu, wrk, Row};

const PORT: u16 = 8080;
const SECS: u32 = 8;

/// Backend `i` of the many.
fn many(i: usize) -> String {
    format!("10.92.{}.{}", i / 250, 1 + i % 250)
}

fn config(backends: usize) -> String {
    let mut c = format!(
        "agent:\n  interfaces: [lb-ext, lb-int]\n  xdp_mode: native\n\
         snat:\n  addresses: [{SNAT}]\n\
         listeners:\n  - {{ name: web, protocol: tcp, vip: {VIP}, port: 80, pool: web }}\n\
         pools:\n  - name: web\n    backends:\n"
    );
    for i in 0..backends {
        c += &format!("      - {{ address: {}, port: {PORT} }}\n", many(i));
    }
    c
}

/// One run: the rate, the agent's CPU (share of one core) during it, its RSS and map memory
/// (MiB).
struct Run {
    conns: f64,
    agent_cpu: f64,
    rss: f64,
    maps: f64,
}

fn measure(topo: &Topology, agent: &Agent) -> Result<Run> {
    let pid = agent.pid();
    let (w, cpu) = with_cpu(Some(pid), || {
        wrk(&topo.client, &format!("http://{VIP}/"), SECS, true)
    })?;
    Ok(Run {
        conns: w.rps,
        agent_cpu: 100.0 * cpu.process.unwrap_or(0.0) / cpu.wall,
        rss: procfs::rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
        maps: maps::memory(pid) as f64 / (1 << 20) as f64,
    })
}

/// Rows of `(measure, ours, theirs)` figures, the measures qualified by `case`.
fn compare(rows: &mut Vec<Row>, case: &str, peer: &str, figures: [(&str, f64, f64); 3]) {
    for (measure, ours, theirs) in figures {
        rows.push(Row {
            part: "scale",
            measure: format!("{measure}, {case}"),
            ours,
            peer: peer.into(),
            theirs: Some(theirs),
        });
    }
}

pub fn run(dir: &Path) -> Result<Vec<Row>> {
    let topo = Topology::new(1);
    let be = &topo.backends[0];
    be.ip(&["route", "add", "local", "10.92.0.0/16", "dev", "lo"]);
    topo.lb
        .ip(&["route", "add", "10.92.0.0/16", "via", &backend_addr(0)]);
    let _server = Children(vec![ok_server(be, dir, "scale-be", &PORT.to_string(), 2)]);
    wait_listening(be, PORT)?;

    let mut rows = Vec::new();
    let mut base: Option<Run> = None;
    for n in [10, 100, 1000] {
        let agent = Agent::start(&topo.lb, &config(n));
        let r = measure(&topo, &agent)?;
        drop(agent);
        println!(
            "{n:>5} backends: {:.0} conn/s, agent RSS {:.1} MiB, maps {:.1} MiB",
            r.conns, r.rss, r.maps
        );
        if let Some(b) = &base {
            compare(
                &mut rows,
                &format!("{n} backends"),
                "10 backends",
                [
                    ("new TCP connections/s", r.conns, b.conns),
                    ("agent RSS, MiB", r.rss, b.rss),
                    ("kernel memory of the maps, MiB", r.maps, b.maps),
                ],
            );
        } else {
            base = Some(r);
        }
    }
    let base = base.expect("the 10-backend run");
    for percent in [10, 90] {
        let agent = Agent::start(&topo.lb, &config(10));
        let flows = CONNTRACK_ENTRIES / 2 * percent / 100;
        let filled = maps::prefill_conntrack(agent.pid(), flows, (VIP.parse()?, 80), SNAT.parse()?);
        let r = measure(&topo, &agent)?;
        drop(agent);
        println!(
            "conntrack {percent}% full ({filled} flows): {:.0} conn/s, agent {:.0}% of a core, RSS {:.1} MiB",
            r.conns, r.agent_cpu, r.rss
        );
        compare(
            &mut rows,
            &format!("conntrack {percent}% full"),
            "conntrack empty (10 backends)",
            [
                ("new TCP connections/s", r.conns, base.conns),
                ("agent CPU, % of one core", r.agent_cpu, base.agent_cpu),
                ("agent RSS, MiB", r.rss, base.rss),
            ],
        );
    }
    Ok(rows)
}
