//! Forwarding of a rewritten packet: a FIB lookup for the new destination gives the egress
//! interface and both MACs; the frame leaves with XDP_TX (same interface) or a redirect.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{counters::Counter, flow::FAMILY_V4, ConnEntry};

use crate::{
    copy,
    parse::{ptr_at, EthHdr, Packet},
    verdict::Verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends the rewritten frame towards the entry's `nat_dst`, through the next hop cached in the
/// entry when it is valid for this packet's size, else through a FIB lookup whose answer is then
/// cached.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, entry: *mut ConnEntry) -> Result<Verdict, Verdict> {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run; other
    // CPUs write the same cached answer, or clear it.
    let e = unsafe { &mut *entry };
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Counter::DropMalformed))?;
    if e.fwd_ifindex != 0 && pkt.ip_len <= e.fwd_len {
        return Ok(emit(ctx, eth, e.fwd_ifindex, &e.fwd_smac, &e.fwd_dmac));
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: FibParams = unsafe { zeroed() };
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.l4_protocol = pkt.flow.proto;
    p.sport = e.nat_sport_be;
    p.dport = e.nat_dport_be;
    p.__bindgen_anon_1.tot_len = pkt.ip_len;
    if pkt.flow.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = e.nat_src_be[0];
        p.__bindgen_anon_4.ipv4_dst = e.nat_dst_be[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = e.nat_src_be;
        p.__bindgen_anon_4.ipv6_dst = e.nat_dst_be;
    }
    // SAFETY: the helper reads and writes only `p`.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, &mut p, size_of::<FibParams>() as i32, 0) }
        as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The next hop's MAC is not resolved yet, or the packet needs fragmenting: the kernel's
        // forwarding does both (the agent enables forwarding and accept_local on its interfaces).
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            return Ok(Verdict::pass(Counter::FwdKernel))
        }
        _ => return Err(Verdict::drop(Counter::DropNoRoute)),
    }
    e.fwd_len = if e.fwd_ifindex == p.ifindex && e.fwd_len > pkt.ip_len {
        e.fwd_len
    } else {
        pkt.ip_len
    };
    e.fwd_smac = p.smac;
    e.fwd_dmac = p.dmac;
    e.fwd_ifindex = p.ifindex;
    Ok(emit(ctx, eth, p.ifindex, &p.smac, &p.dmac))
}

/// Sets the MACs of the frame's Ethernet header `eth` (bounds checked by the caller) and sends
/// the frame out of `ifindex`.
#[inline(always)]
pub fn emit(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ifindex: u32,
    smac: &[u8; 6],
    dmac: &[u8; 6],
) -> Verdict {
    // SAFETY: the caller checked the header's bounds.
    unsafe {
        copy::elements(&raw mut (*eth).dst, dmac);
        copy::elements(&raw mut (*eth).src, smac);
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        Verdict::tx()
    } else {
        // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
        Verdict::redirect(unsafe { bpf_redirect(ifindex, 0) } as u32)
    }
}
