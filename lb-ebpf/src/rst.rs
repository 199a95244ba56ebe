//! Refusing a TCP connection when a listener has no backend to take it: the SYN itself becomes
//! the RST|ACK the client would get from a closed port and goes straight back. A clear, fast
//! failure instead of a silent drop and client retries.
//!
//! Done in place: swapping addresses and ports leaves both checksums as they are (one's-
//! complement sums do not care about word order); only seq, ack, the flags word and the window
//! change, each with an incremental update. The SYN's options stay: a client in SYN-SENT only
//! checks that a RST acknowledges its SYN (RFC 793, 3.4).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    conn::{TCP_ACK, TCP_RST},
    counters::Counter,
    csum::{apply, diff16, diff32},
    flow::FAMILY_V4,
};

use crate::{
    parse::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet, TCP_CSUM_OFF},
    verdict::Verdict,
};

/// TCP header fields this touches: ports (0..4), seq (4..8), ack (8..12), offset and flags
/// (12..14), window (14..16).
#[repr(C)]
struct TcpHead {
    sport_be: u16,
    dport_be: u16,
    seq: u32,
    ack: u32,
    off_flags: [u8; 2],
    window: u16,
}

#[inline(always)]
#[expect(
    clippy::manual_swap,
    reason = "mem::swap goes byte by byte through the stack"
)]
pub fn refuse(ctx: &XdpContext, pkt: &Packet) -> Result<Verdict, Verdict> {
    let counted = Verdict::drop(Counter::RstNoBackend);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(counted)?;
    // SAFETY: bounds checked by ptr_at.
    #[expect(
        clippy::manual_swap,
        reason = "mem::swap goes byte by byte through the stack"
    )]
    unsafe {
        let src = (*eth).src;
        (*eth).src = (*eth).dst;
        (*eth).dst = src;
    }
    if pkt.flow.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_off).ok_or(counted)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let src = (*ip).saddr_be;
            (*ip).saddr_be = (*ip).daddr_be;
            (*ip).daddr_be = src;
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3_off).ok_or(counted)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let src = (*ip).saddr_be;
            (*ip).saddr_be = (*ip).daddr_be;
            (*ip).daddr_be = src;
        }
    }
    let tcp: *mut TcpHead = ptr_at(ctx, pkt.l4_off).ok_or(counted)?;
    let check: *mut u16 = ptr_at(ctx, pkt.l4_off + TCP_CSUM_OFF).ok_or(counted)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let t = &mut *tcp;
        let (sport, dport) = (t.sport_be, t.dport_be);
        t.sport_be = dport;
        t.dport_be = sport;
        let ack = (u32::from_be(t.seq).wrapping_add(1)).to_be();
        let old_flags = u16::from_ne_bytes(t.off_flags);
        let mut flags = t.off_flags;
        flags[1] = TCP_RST | TCP_ACK;
        let new_flags = u16::from_ne_bytes(flags);
        let mut d = diff32(0, t.seq, 0);
        d = diff32(d, t.ack, ack);
        d = diff16(d, old_flags, new_flags);
        d = diff16(d, t.window, 0);
        t.seq = 0;
        t.ack = ack;
        t.off_flags = flags;
        t.window = 0;
        *check = apply(*check, d);
    }
    Ok(Verdict {
        action: xdp_action::XDP_TX,
        reason: Counter::RstNoBackend,
    })
}
