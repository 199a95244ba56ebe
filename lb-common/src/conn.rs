//! Connection-tracking entries.
//!
//! FullNAT keeps two entries per flow in one shared LRU map: the *original* entry keyed by the
//! client's tuple (client → VIP) and the *reply* entry keyed by the backend's tuple
//! (backend → SNAT address:port). Each entry holds the complete tuple to write into a packet that
//! matches it, so the rewrite is the same code in both directions.

use crate::flow::AddrBe;

pub const DIR_ORIGINAL: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// TCP flow states (UDP flows stay `ESTABLISHED`).
pub const STATE_SYN_SENT: u8 = 1;
pub const STATE_ESTABLISHED: u8 = 2;
pub const STATE_CLOSING: u8 = 3;
pub const STATE_CLOSED: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    /// `bpf_ktime_get_ns()` of the last packet seen in this direction.
    pub last_seen_ns: u64,
    /// The tuple a matching packet leaves with.
    pub nat_src_be: AddrBe,
    pub nat_dst_be: AddrBe,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    pub listener_id: u32,
    pub backend_id: u32,
    pub state: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConnEntry>() == 56);

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, explicit padding, every bit pattern valid.
unsafe impl aya::Pod for ConnEntry {}
