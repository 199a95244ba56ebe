//! Conntrack garbage collection rules: how long a flow may stay idle in each state. The
//! datapath only records state and last-seen time; the agent deletes expired flows (both
//! entries, which frees the SNAT port) on a timer.

use std::{collections::HashMap, time::Duration};

use lb_common::{
    conn::{DIR_REPLY, STATE_CLOSED, STATE_CLOSING, STATE_ESTABLISHED},
    flow::AddrBe,
    maps::{CONNTRACK6_ENTRIES, CONNTRACK6_SYN_ENTRIES, CONNTRACK_ENTRIES, CONNTRACK_SYN_ENTRIES},
    ConnEntry, FlowKey,
};

/// An unanswered or half-open handshake: short, so a SYN flood's entries go quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a FIN: long enough for the close to finish and the last ACKs to pass.
pub const CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// After a RST: a moment for retransmitted RSTs to be translated too.
pub const CLOSED_TIMEOUT: Duration = Duration::from_secs(2);
/// The idle timeout of established flows whose listener is gone from the config (a removed
/// listener's flows are no longer forwarded; their entries go after this).
pub const UNKNOWN_LISTENER_IDLE: Duration = Duration::from_secs(900);
/// How often the agent sweeps.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The idle time after which a flow in `state` is dropped; `idle` is the listener's
/// `idle_timeout` for established flows.
pub fn timeout(state: u8, idle: Duration) -> Duration {
    match state {
        STATE_ESTABLISHED => idle,
        STATE_CLOSING => CLOSING_TIMEOUT,
        STATE_CLOSED => CLOSED_TIMEOUT,
        _ => HANDSHAKE_TIMEOUT,
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of conntrack timestamps (see `clock`).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The conntrack tables, in the order of [`Report::tables`]: name and capacity in entries.
/// Each fills on its own (a SYN flood fills a handshake table), evicting its oldest.
pub const TABLES: [(&str, u32); 4] = [
    ("ipv4", CONNTRACK_ENTRIES),
    ("ipv6", CONNTRACK6_ENTRIES),
    ("ipv4_handshake", CONNTRACK_SYN_ENTRIES),
    ("ipv6_handshake", CONNTRACK6_SYN_ENTRIES),
];

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries in the conntrack tables (both families) before the sweep (two per flow).
    pub entries: usize,
    /// The same, per table of [`TABLES`].
    pub tables: [usize; 4],
    /// Flows deleted.
    pub expired: usize,
    /// Live flows (not closing or closed) per listener id.
    pub active: Vec<u64>,
    /// Live flows per backend id.
    pub backend_active: Vec<u64>,
    /// RSTs sent for idled-out flows of `reset_on_idle` listeners.
    pub resets: usize,
    /// SNAT ports in use, per SNAT address (in the plan's order).
    pub snat: Vec<SnatPorts>,
}

/// How many ports of one SNAT address flows hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnatPorts {
    /// Over all backends.
    pub in_use: u64,
    /// Towards the backend with the most: a port is unique per SNAT address *and* backend
    /// (the reply tuple), so this is what runs out first, at the port range's size.
    pub busiest_backend: u64,
}

/// Counts SNAT ports from the reply entries of a conntrack scan: their key is
/// backend → SNAT address:port.
pub struct SnatCount<'a> {
    addrs: &'a [AddrBe],
    /// (SNAT address index, backend id) → ports.
    ports: HashMap<(usize, u32), u64>,
}

impl<'a> SnatCount<'a> {
    pub fn new(addrs: &'a [AddrBe]) -> Self {
        Self {
            addrs,
            ports: HashMap::new(),
        }
    }

    /// Counts `key` if it is the reply entry of a SNAT flow (passthrough replies are keyed on
    /// the client, not a SNAT address).
    pub fn add(&mut self, key: &FlowKey, e: &ConnEntry) {
        if e.dir != DIR_REPLY {
            return;
        }
        if let Some(i) = self.addrs.iter().position(|a| *a == key.dst_be) {
            *self.ports.entry((i, e.backend_id)).or_insert(0) += 1;
        }
    }

    pub fn finish(self) -> Vec<SnatPorts> {
        let mut out = vec![SnatPorts::default(); self.addrs.len()];
        for ((i, _), n) in self.ports {
            out[i].in_use += n;
            out[i].busiest_backend = out[i].busiest_backend.max(n);
        }
        out
    }
}

#[cfg(test)]
mod tests;
