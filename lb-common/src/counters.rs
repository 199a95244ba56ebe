//! Per-CPU counters: global ones in `COUNTERS` (indexed by [`Counter`]), per-listener ones in
//! `LISTENER_STATS` and per-backend ones in `BACKEND_STATS`. Every packet bumps exactly one [`Counter`] (its verdict's reason), so the
//! number of packets seen is their sum and costs no update of its own.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Passed to the kernel untouched (not for a VIP, not a tracked reply).
    Pass = 0,
    /// Rewritten and sent with XDP_TX or redirect.
    Forwarded,
    /// Rewritten and handed to the kernel's forwarding: next hop's MAC not resolved yet, or the
    /// packet needs fragmenting.
    FwdKernel,
    /// Rewritten but no route to the destination.
    DropNoRoute,
    /// A new flow for a listener without a usable backend.
    DropNoBackend,
    /// No free SNAT port after the bounded retries.
    DropSnatExhausted,
    /// A TCP packet that is not a SYN, to a VIP, with no conntrack entry.
    DropNoConntrack,
    /// Truncated or invalid headers.
    DropMalformed,
    /// Could not insert a conntrack entry.
    DropConntrackFull,
    /// IPv4 fragments and other packets passed by rule.
    PassFragment,
    /// A new flow from a client the listener's ACL refuses.
    DropAcl,
    /// A SYN for a listener with no backend to take it, answered with RST (sent back).
    RstNoBackend,
}

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Pass,
        Counter::Forwarded,
        Counter::FwdKernel,
        Counter::DropNoRoute,
        Counter::DropNoBackend,
        Counter::DropSnatExhausted,
        Counter::DropNoConntrack,
        Counter::DropMalformed,
        Counter::DropConntrackFull,
        Counter::PassFragment,
        Counter::DropAcl,
        Counter::RstNoBackend,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Pass => "pass",
            Counter::Forwarded => "forwarded",
            Counter::FwdKernel => "fwd_kernel",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropNoConntrack => "drop_no_conntrack",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropConntrackFull => "drop_conntrack_full",
            Counter::PassFragment => "pass_fragment",
            Counter::DropAcl => "drop_acl",
            Counter::RstNoBackend => "rst_no_backend",
        }
    }
}

pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

/// Per-listener traffic. Value of `LISTENER_STATS` (per CPU), indexed by listener id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Client → backend direction.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend → client direction.
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<ListenerStats>() == 40);

impl ListenerStats {
    pub fn add(&mut self, other: &ListenerStats) {
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.new_flows += other.new_flows;
    }
}

/// Per-backend traffic, the same counters as a listener's. Value of `BACKEND_STATS` (per CPU),
/// indexed by backend id.
pub type BackendStats = ListenerStats;

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, only u64 fields.
unsafe impl aya::Pod for ListenerStats {}
