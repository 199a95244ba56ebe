//! Connection-tracking entries.
//!
//! FullNAT keeps two entries per flow in one shared LRU map: the *original* entry keyed by the
//! client's tuple (client → VIP) and the *reply* entry keyed by the backend's tuple
//! (backend → SNAT address:port). Each entry holds the complete tuple to write into a packet that
//! matches it, so the rewrite is the same code in both directions.

use crate::flow::AddrBe;

pub const DIR_ORIGINAL: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// TCP flow states (UDP flows are `ESTABLISHED` from the first packet). Both entries of a flow
/// carry the same state.
/// The client's SYN was seen.
pub const STATE_SYN_SENT: u8 = 1;
/// The backend answered with SYN-ACK.
pub const STATE_SYN_RECV: u8 = 2;
/// The client completed the handshake, which moves the flow from the handshake table to the
/// main one (a SYN flood never gets here, so its entries keep the short handshake timeout and
/// stay in their own table).
pub const STATE_ESTABLISHED: u8 = 3;
/// A FIN was seen in either direction.
pub const STATE_CLOSING: u8 = 4;
/// A RST was seen.
pub const STATE_CLOSED: u8 = 5;

/// The flow's first packets towards the backend carry the client's address (TOA).
pub const CONN_F_TOA: u8 = 1 << 0;
/// The listener resets idle flows: the datapath keeps `ack_be` for the agent's RSTs.
pub const CONN_F_RESET_IDLE: u8 = 1 << 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a packet starts a new connection on the tuple of a flow in `state`: the client's SYN
/// after the old connection closed. The datapath then retires the old flow and schedules the
/// packet afresh (a removed or drained backend gets no new connection this way).
#[inline(always)]
pub const fn reuses_tuple(state: u8, dir: u8, flags: u8) -> bool {
    dir == DIR_ORIGINAL
        && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
        && (state == STATE_CLOSING || state == STATE_CLOSED)
}

/// The state after a TCP packet with `flags` travelling in direction `dir`.
#[inline(always)]
pub const fn tcp_next_state(state: u8, dir: u8, flags: u8) -> u8 {
    if flags & TCP_RST != 0 {
        return STATE_CLOSED;
    }
    if flags & TCP_FIN != 0 {
        return if state == STATE_CLOSED {
            STATE_CLOSED
        } else {
            STATE_CLOSING
        };
    }
    match state {
        STATE_SYN_SENT if dir == DIR_REPLY && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
            STATE_SYN_RECV
        }
        STATE_SYN_RECV if dir == DIR_ORIGINAL && flags & (TCP_SYN | TCP_ACK) == TCP_ACK => {
            STATE_ESTABLISHED
        }
        s => s,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    /// CLOCK_MONOTONIC nanoseconds (at jiffy resolution, see `conntrack::now_ns`) of the last
    /// packet seen in this direction.
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
    /// `CONN_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// The FIB's answer for this direction, cached so established packets skip the lookup:
    /// egress interface (0: none cached), source and destination MACs, and the largest IP
    /// length the lookup approved (a bigger packet takes a fresh lookup and its MTU check).
    /// Dropped whenever `last_seen_ns` is refreshed, so route and neighbour changes are seen
    /// within about a second.
    pub fwd_ifindex: u32,
    pub fwd_len: u16,
    pub fwd_smac: [u8; 6],
    pub fwd_dmac: [u8; 6],
    pub _pad2: [u8; 2],
    /// Network order. In the original entry during the handshake: the acknowledgment number
    /// that completes it (the backend's SYN-ACK sequence number + 1). With `CONN_F_RESET_IDLE`,
    /// once established: the acknowledgment number of the last packet in this direction, i.e.
    /// the sequence number its sender expects next, which an RST must carry exactly to be
    /// accepted (RFC 5961).
    pub ack_be: u32,
}
const _: () = assert!(core::mem::size_of::<ConnEntry>() == 80);

impl ConnEntry {
    /// Key of the other direction's entry: the reverse of the tuple this entry rewrites to.
    #[inline(always)]
    pub const fn pair_key(&self, proto: u8, family: u8) -> crate::FlowKey {
        crate::FlowKey {
            src_be: self.nat_dst_be,
            dst_be: self.nat_src_be,
            sport_be: self.nat_dport_be,
            dport_be: self.nat_sport_be,
            proto,
            family,
            _pad: [0; 2],
        }
    }
}

/// A CPU's copy of an established flow's entry: a slot of the per-CPU `FLOW_CACHE` (see the
/// datapath's `flowcache`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: crate::FlowKey,
    pub entry: ConnEntry,
    /// When the copy was taken.
    pub filled_jiffies: u64,
    /// `GlobalConfig::flow_gen` and the tuple's `FLOW_GEN` slot, read before the copied entry
    /// was looked up.
    pub flow_gen: u32,
    pub slot_gen: u32,
    /// Packets forwarded from this slot's copies since the program was loaded.
    pub hits: u64,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 144);

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, explicit padding, every bit pattern valid.
unsafe impl aya::Pod for ConnEntry {}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no implicit padding (FlowKey 40 + ConnEntry 80 + 24), every bit
// pattern valid.
unsafe impl aya::Pod for CachedFlow {}

#[cfg(test)]
mod tests;
