//! Human-readable counter tables.

use std::fmt::Write as _;

use crate::{dataplane::Snapshot, health::Health, plan::Plan};

/// The global counters, then one line per listener (`active`: live flows per listener at the
/// last conntrack sweep).
pub fn render(s: &Snapshot, plan: &Plan, active: &[u64]) -> String {
    let mut out = String::from("counters:\n");
    let rx: u64 = s.counters.iter().map(|(_, v)| v).sum();
    let _ = writeln!(out, "  {:<22} {rx}", "rx_packets");
    for (c, v) in &s.counters {
        let _ = writeln!(out, "  {:<22} {v}", c.name());
    }
    let _ = writeln!(
        out,
        "listeners:\n  {:<16} {:>10} {:>12} {:>10} {:>12} {:>8} {:>10}",
        "name", "pkts_in", "bytes_in", "pkts_out", "bytes_out", "active", "new_flows"
    );
    for l in &plan.listeners {
        let (i, zero) = (l.id as usize, Default::default());
        let st = s.listeners.get(i).unwrap_or(&zero);
        let _ = writeln!(
            out,
            "  {:<16} {:>10} {:>12} {:>10} {:>12} {:>8} {:>10}",
            l.name,
            st.packets_in,
            st.bytes_in,
            st.packets_out,
            st.bytes_out,
            active.get(i).copied().unwrap_or(0),
            st.new_flows
        );
    }
    out
}

/// One line per backend: its health (or draining), the last failure reason and probe latency.
pub fn render_health(health: &Health) -> String {
    let mut out = format!(
        "backends:\n  {:<16} {:<24} {:<22} {:<18} {:>10}\n",
        "pool", "backend", "health", "reason", "latency"
    );
    for m in health.members() {
        let status = m.status();
        let latency = status
            .latency
            .map_or("-".into(), |l| format!("{:.1}ms", l.as_secs_f64() * 1e3));
        let _ = writeln!(
            out,
            "  {:<16} {:<24} {:<22} {:<18} {:>10}",
            m.pool,
            format!("{}{}", m.addr, if m.backup { " (backup)" } else { "" }),
            m.label(),
            status.reason.as_deref().unwrap_or("-"),
            latency
        );
    }
    out
}
