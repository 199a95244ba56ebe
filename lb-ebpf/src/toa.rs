//! TOA ("TCP option address", as LVS/DPVS do): with `client_ip: toa` the client's IPv4 address
//! and port travel to the backend in TCP option 254 (kind 254, length 8, port, address) on the
//! connection's first packets (the SYN, its retransmissions, and the ACK completing the
//! handshake), where a TOA module on the backend picks them up.
//!
//! The option goes between the TCP header and the payload. XDP can only grow a frame at the
//! front, so the frame grows by 8 bytes there and the headers move forward into the new space,
//! leaving the gap for the option. Only IPv4 without IP options is handled; a TCP header with no
//! room left (data offset above 13) goes without the option.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    counters::Counter,
    csum::{apply, diff16},
};

use crate::{
    parse::{ptr_at, Ipv4Hdr, Packet, ETH_HLEN, TCP_CSUM_OFF},
    verdict::Verdict,
};

const TOA_KIND: u8 = 254;
const TOA_LEN: usize = 8;
/// Ethernet + IPv4 without options + the largest TCP header that still has room: 14 + 20 + 52.
const MAX_HDR: usize = ETH_HLEN + 20 + 52;

/// Inserts the option into the (already rewritten) frame, carrying the client's address and port
/// as the packet arrived (`pkt.flow`).
#[inline(always)]
pub fn insert(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Verdict> {
    let bad = Verdict::drop(Counter::DropMalformed);
    if pkt.l4_off != ETH_HLEN + 20 {
        return Ok(());
    }
    let tcp: *const [u8; 13] = ptr_at(ctx, pkt.l4_off).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let doff = (unsafe { (*tcp)[12] } >> 4) as usize;
    if doff + TOA_LEN / 4 > 15 {
        return Ok(());
    }
    let hdr_len = pkt.l4_off + doff * 4;
    // SAFETY: plain helper call; on success every packet pointer must be re-derived.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(TOA_LEN as i32)) } != 0 {
        return Ok(());
    }
    // Move the headers to the new front, two bytes at a time (every header length is even).
    for i in 0..MAX_HDR / 2 {
        let off = i * 2;
        if off >= hdr_len {
            break;
        }
        let src: *const [u8; 2] = ptr_at(ctx, off + TOA_LEN).ok_or(bad)?;
        let dst: *mut [u8; 2] = ptr_at(ctx, off).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at; the ranges do not overlap within one step.
        unsafe { *dst = *src };
    }
    let port = pkt.flow.sport_be.to_ne_bytes();
    let addr = pkt.flow.src_be[0].to_ne_bytes();
    let option = [
        TOA_KIND,
        TOA_LEN as u8,
        port[0],
        port[1],
        addr[0],
        addr[1],
        addr[2],
        addr[3],
    ];
    let gap: *mut [u8; TOA_LEN] = ptr_at(ctx, hdr_len).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *gap = option };

    // IPv4 total length and header checksum.
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let old_total = u16::from_be(ip.tot_len_be);
    let new_total_be = (old_total + TOA_LEN as u16).to_be();
    ip.check = apply(ip.check, diff16(0, ip.tot_len_be, new_total_be));
    ip.tot_len_be = new_total_be;

    // TCP: the data-offset word, the pseudo-header's TCP length, and the option's four words.
    let word: *mut u16 = ptr_at(ctx, pkt.l4_off + 12).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let (old_word, new_word) = unsafe {
        let old = *word;
        let mut b = old.to_ne_bytes();
        b[0] += (TOA_LEN as u8 / 4) << 4;
        let new = u16::from_ne_bytes(b);
        *word = new;
        (old, new)
    };
    let tcp_len = old_total - 20;
    let mut d = diff16(0, old_word, new_word);
    d = diff16(d, tcp_len.to_be(), (tcp_len + TOA_LEN as u16).to_be());
    for pair in [
        [option[0], option[1]],
        [option[2], option[3]],
        [option[4], option[5]],
        [option[6], option[7]],
    ] {
        d = diff16(d, 0, u16::from_ne_bytes(pair));
    }
    let check: *mut u16 = ptr_at(ctx, pkt.l4_off + TCP_CSUM_OFF).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = apply(*check, d) };

    pkt.len += TOA_LEN as u64;
    pkt.ip_len += TOA_LEN as u16;
    Ok(())
}
