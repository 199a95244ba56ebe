//! Map names and capacities. The eBPF statics are named exactly like these constants (the
//! `#[map]` macro only takes literals), and the agent always looks maps up through them.

pub const VIPS: &str = "VIPS";
pub const BACKENDS: &str = "BACKENDS";
pub const RING: &str = "RING";
/// The conntrack tables: IPv4 flows (keyed by `FlowKey4`), IPv6 flows (keyed by `FlowKey`).
pub const CONNTRACK: &str = "CONNTRACK";
pub const CONNTRACK_SYN: &str = "CONNTRACK_SYN";
pub const CONNTRACK6: &str = "CONNTRACK6";
pub const CONNTRACK6_SYN: &str = "CONNTRACK6_SYN";
pub const SNAT_ADDRS: &str = "SNAT_ADDRS";
pub const GLOBAL: &str = "GLOBAL";
pub const COUNTERS: &str = "COUNTERS";
pub const LISTENER_STATS: &str = "LISTENER_STATS";
pub const ACL_ALLOW: &str = "ACL_ALLOW";
pub const ACL_DENY: &str = "ACL_DENY";
pub const WRR_CURSOR: &str = "WRR_CURSOR";
pub const BACKEND_ACTIVE: &str = "BACKEND_ACTIVE";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
pub const FLOW_CACHE: &str = "FLOW_CACHE";
pub const FLOW_GEN: &str = "FLOW_GEN";
pub const PIPELINE: &str = "PIPELINE";

/// The XDP program's name in the object.
pub const PROG_LB: &str = "lb_xdp";
/// The full pipeline `PROG_LB` tail-calls through `PIPELINE` for what its fast path leaves.
pub const PROG_FULL: &str = "lb_xdp_full";
/// A program that only returns XDP_TX: the benchmark's reference.
pub const PROG_BASELINE: &str = "xdp_tx_baseline";
/// Reads the datapath's clocks for the agent (see `lb-agent`'s `clock`); never attached.
pub const PROG_CLOCK: &str = "lb_clock";

pub const MAX_LISTENERS: u32 = 32;
pub const MAX_BACKENDS: u32 = 4096;
pub const MAX_SNAT_ADDRS: u32 = 64;
/// Largest Maglev table per listener (a prime); each listener owns two slices of this size.
pub const MAX_RING: u32 = 65537;
pub const RING_ENTRIES: u32 = MAX_LISTENERS * 2 * MAX_RING;
/// Backends a `wlc` listener's pool may have (the datapath scans them all per new flow).
pub const MAX_WLC_BACKENDS: u32 = 64;
/// ACL prefixes over all listeners, per list.
pub const MAX_ACL_ENTRIES: u32 = 16384;
/// Two entries per flow. IPv4 flows; IPv6 flows have `CONNTRACK6_ENTRIES`.
pub const CONNTRACK_ENTRIES: u32 = 1 << 20;
/// A quarter of the IPv4 capacity: the tables are preallocated, and a second million-entry
/// table would double the agent's kernel memory for what is most often the smaller share of
/// traffic.
pub const CONNTRACK6_ENTRIES: u32 = CONNTRACK_ENTRIES / 4;
pub const CONNTRACK6_SYN_ENTRIES: u32 = CONNTRACK_SYN_ENTRIES / 4;
/// TCP flows whose handshake the client has not completed (two entries each): a table of their
/// own, so a SYN flood evicts only its own kind and never an established flow, and holds at
/// most this many SNAT ports. Big enough that, at the rate of a flood that fills it in a
/// second, a real handshake still completes long before its entries would be evicted.
pub const CONNTRACK_SYN_ENTRIES: u32 = 1 << 16;

/// Per-CPU flow-cache slots (direct-mapped by a hash of the 5-tuple), and the shared
/// generation counters that invalidate them (a finer hash of the same tuple).
pub const FLOW_CACHE_SLOTS: u32 = 1 << 10;
pub const FLOW_GEN_SLOTS: u32 = 1 << 16;

/// `RING` value for a slot with no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// First index of a listener's ring slice.
#[inline(always)]
pub const fn ring_base(listener_id: u32, half: u32) -> u32 {
    (listener_id * 2 + (half & 1)) * MAX_RING
}
