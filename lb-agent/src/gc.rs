//! Conntrack garbage collection rules: how long a flow may stay idle in each state. The
//! datapath only records state and last-seen time; the agent deletes expired flows (both
//! entries, which frees the SNAT port) on a timer.

use std::time::Duration;

use lb_common::conn::{STATE_CLOSED, STATE_CLOSING, STATE_ESTABLISHED};

/// An unanswered or half-open handshake: short, so a SYN flood's entries go quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a FIN: long enough for the close to finish and the last ACKs to pass.
pub const CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// After a RST: a moment for retransmitted RSTs to be translated too.
pub const CLOSED_TIMEOUT: Duration = Duration::from_secs(2);
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

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries in both conntrack tables before the sweep (two per flow).
    pub entries: usize,
    /// Flows deleted.
    pub expired: usize,
    /// Live flows (not closing or closed) per listener id.
    pub active: Vec<u64>,
    /// Live flows per backend id.
    pub backend_active: Vec<u64>,
}

#[cfg(test)]
mod tests;
