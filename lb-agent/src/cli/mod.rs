//! `lb-agent status | stats | diagnose`: the operator's side of the admin API. Each finds the
//! API from `--admin`, else from `agent.admin` in `--config`, else at the default address.

pub mod diagnose;
#[cfg(test)]
mod tests;

use std::{fmt::Write as _, net::SocketAddr, path::Path};

use crate::{
    admin::status::{Backend, Status, Traffic},
    config::{self, ConfigError},
};

/// Where the admin API is: `admin` when given, else the config's `agent.admin`, else the
/// default.
pub fn admin_address(
    admin: Option<SocketAddr>,
    config: Option<&Path>,
) -> Result<SocketAddr, ConfigError> {
    match (admin, config) {
        (Some(a), _) => Ok(a),
        (None, Some(path)) => Ok(config::load(path)?.agent.admin),
        (None, None) => Ok(config::DEFAULT_ADMIN),
    }
}

/// `lb-agent status`: listeners, their pools and backends with health, weight and flows.
pub fn status_table(s: &Status) -> String {
    let mut out = String::new();
    for l in &s.listeners {
        let load = match (&l.traffic, l.requests) {
            (Some(t), _) => format!("{} active flows, {} new", t.active_flows, t.new_flows),
            (None, Some(n)) => format!("{n} requests"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "listener {} ({} {}): {load}",
            l.name, l.protocol, l.address
        );
        for p in &l.pools {
            let _ = writeln!(
                out,
                "  pool {}\n    {:<28} {:<10} {:>7} {:>7} {:<8} reason",
                p.name, "backend", "health", "weight", "active", "serving"
            );
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "    {:<28} {:<10} {:>7} {:>7} {:<8} {}",
                    backend_label(b),
                    b.health.as_str(),
                    weight_label(b),
                    b.traffic.active_flows,
                    serving_label(b),
                    reason_label(b)
                );
            }
        }
    }
    if s.listeners.is_empty() {
        out.push_str("no listeners\n");
    }
    out
}

fn backend_label(b: &Backend) -> String {
    if b.backup {
        format!("{} (backup)", b.address)
    } else {
        b.address.to_string()
    }
}

/// `2`, or `0 (2)` when the admin API changed the configured weight.
fn weight_label(b: &Backend) -> String {
    if b.weight == b.configured_weight {
        b.weight.to_string()
    } else {
        format!("{} ({})", b.weight, b.configured_weight)
    }
}

/// The last failing probe's reason, and the L7 proxy's back-off after a failed connect.
fn reason_label(b: &Backend) -> String {
    let backoff = b
        .l7_backoff_s
        .map(|s| format!("L7 connect failed, no requests for {s:.0} s"));
    match (b.reason.as_deref(), backoff) {
        (Some(r), Some(o)) => format!("{r}; {o}"),
        (Some(r), None) => r.into(),
        (None, Some(o)) => o,
        (None, None) => "-".into(),
    }
}

fn serving_label(b: &Backend) -> &'static str {
    match (b.serving, b.drained) {
        (true, _) => "yes",
        (false, true) => "drained",
        (false, false) => "no",
    }
}

/// `lb-agent stats`: packets by verdict, traffic per listener and per backend, and the
/// conntrack and SNAT gauges.
pub fn stats_table(s: &Status) -> String {
    let mut out = String::from("packets by verdict:\n");
    for (reason, n) in &s.packets {
        let _ = writeln!(out, "  {reason:<22} {n:>14}");
    }
    let total: u64 = s.packets.values().sum();
    let _ = writeln!(out, "  {:<22} {total:>14}", "total");
    let header = |out: &mut String, what: &str| {
        let _ = writeln!(
            out,
            "{what}:\n  {:<36} {:>12} {:>14} {:>12} {:>14} {:>10} {:>8}",
            "name", "pkts_in", "bytes_in", "pkts_out", "bytes_out", "new_flows", "active"
        );
    };
    let row = |out: &mut String, name: &str, t: &Traffic| {
        let _ = writeln!(
            out,
            "  {name:<36} {:>12} {:>14} {:>12} {:>14} {:>10} {:>8}",
            t.packets_in, t.bytes_in, t.packets_out, t.bytes_out, t.new_flows, t.active_flows
        );
    };
    header(&mut out, "listeners");
    for l in &s.listeners {
        match (&l.traffic, l.requests) {
            (Some(t), _) => row(&mut out, &l.name, t),
            (None, n) => {
                let _ = writeln!(
                    out,
                    "  {:<36} {} requests ({})",
                    l.name,
                    n.unwrap_or(0),
                    l.protocol
                );
            }
        }
    }
    header(&mut out, "backends");
    for p in s.pools() {
        for b in &p.backends {
            row(&mut out, &format!("{}/{}", p.name, b.address), &b.traffic);
        }
    }
    let _ = writeln!(
        out,
        "conntrack: {} of {} entries",
        s.conntrack.entries, s.conntrack.capacity
    );
    for t in &s.conntrack.tables {
        let _ = writeln!(out, "  {}: {} of {}", t.table, t.entries, t.capacity);
    }
    for n in &s.snat {
        let _ = writeln!(
            out,
            "snat {}: {} ports in use, {} of {} towards the busiest backend",
            n.address, n.ports_in_use, n.busiest_backend_ports, n.port_range
        );
    }
    out
}
