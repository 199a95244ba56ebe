//! An IPv4 flow's plain packet (no SYN, FIN or RST; no IP options) whose flow this CPU holds a
//! trusted copy of (`flowcache`), forwarded in one pass; every other packet goes on to the
//! full pipeline (`lb_xdp_full`, by tail call).
//!
//! Why a pass of its own: the full pipeline carries a `Packet`, with a key sized for IPv6,
//! across its map lookups, which LLVM treats as calls that clobber r1-r5, so it keeps the
//! packet on the stack and reloads it field by field; here only what an IPv4 packet needs is
//! live. It takes only packets the pipeline would send from the same copy, and does to them
//! what the pipeline does: the same parse rules, rewrite, counters and next hop.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    conn::DIR_ORIGINAL,
    flow::{FAMILY_V4, PROTO_TCP, PROTO_UDP},
    FlowKey,
};

use crate::{
    flowcache, fwd, nat,
    parse::{
        ptr_at, EthHdr, Ipv4Hdr, Ports, ETH_HLEN, ETH_P_IP_BE, TCP_CSUM_OFF, TCP_HLEN, UDP_CSUM_OFF,
    },
    stats,
};

/// An IPv4 header without options.
const IP4_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IP4_HLEN;

/// The XDP action, if the packet was forwarded from this CPU's copy of its flow's entry.
#[inline(always)]
pub fn v4_cached(ctx: &XdpContext) -> Option<u32> {
    // One bounds check for everything read or written below: Ethernet, IPv4 and a TCP
    // header's length (a shorter UDP frame takes the pipeline).
    let frame: *mut u8 = ptr_at::<[u8; L4_OFF + TCP_HLEN]>(ctx, 0)?.cast();
    let len = (ctx.data_end() - ctx.data()) as u64;
    // SAFETY: within the bounds checked above.
    let (eth, ip, l4) = unsafe {
        (
            frame.cast::<EthHdr>(),
            &mut *frame.add(ETH_HLEN).cast::<Ipv4Hdr>(),
            &mut *frame.add(L4_OFF).cast::<[u8; TCP_HLEN]>(),
        )
    };
    let tot_len = u16::from_be(ip.tot_len_be);
    // `parse::packet`'s rules, for the packets taken here: version 4 without options, not a
    // fragment, total length within the frame.
    // SAFETY: within the bounds checked above.
    if unsafe { (*eth).proto_be } != ETH_P_IP_BE
        || ip.ver_ihl != 0x45
        || ip.frag_off_be & 0x3fffu16.to_be() != 0
        || (tot_len as usize) < IP4_HLEN
        || ETH_HLEN as u64 + tot_len as u64 > len
    {
        return None;
    }
    let tcp_flags = match ip.proto {
        // Data offset in the high nibble of byte 12, flags at byte 13.
        PROTO_TCP if l4[12] >> 4 >= 5 => l4[13],
        PROTO_UDP => 0,
        _ => return None,
    };
    let key = FlowKey {
        src_be: [ip.saddr_be, 0, 0, 0],
        dst_be: [ip.daddr_be, 0, 0, 0],
        sport_be: u16::from_ne_bytes([l4[0], l4[1]]),
        dport_be: u16::from_ne_bytes([l4[2], l4[3]]),
        proto: ip.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let entry = flowcache::lookup(&key, tcp_flags, tot_len).ok()?;
    // SAFETY: this CPU's cache slot, valid for the program run.
    let e = unsafe { &*entry };
    let diff = ip.set_addrs(e.nat_src_be[0], e.nat_dst_be[0]);
    let udp = key.proto == PROTO_UDP;
    let csum_off = if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    // SAFETY: both within the TCP header's length checked above.
    let (ports, check) = unsafe {
        let l4 = l4.as_mut_ptr();
        (
            &mut *l4.cast::<Ports>(),
            &mut *l4.add(csum_off).cast::<u16>(),
        )
    };
    nat::rewrite_l4(ports, check, udp, true, diff, e);
    stats::traffic(e.listener_id, e.backend_id, e.dir == DIR_ORIGINAL, len);
    // A copy's next hop is valid for this size (`flowcache::lookup`).
    let v = fwd::emit(ctx, eth, e.fwd_ifindex, &e.fwd_smac, &e.fwd_dmac);
    stats::count(v.reason);
    Some(v.action)
}
