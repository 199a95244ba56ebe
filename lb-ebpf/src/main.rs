//! XDP L4 FullNAT fast path.
//!
//! `lb_xdp`, the attached program, forwards an established IPv4 flow's plain packets from this
//! CPU's flow cache (`fastpath`) and tail-calls `lb_xdp_full` for everything else.
//!
//! Pipeline (each stage returns `Result<_, Verdict>`, `Err` being an early verdict):
//! `parse` → `flowcache` (this CPU's copy of an established flow's entry, for its plain
//! packets) or `conntrack` lookup (either direction) → on a miss, `sched` (VIP lookup, Maglev
//! pick) and `conntrack::create` (SNAT port, both entries) → `nat` rewrite → `fwd` (FIB lookup,
//! MACs, XDP_TX or redirect). Every verdict is counted by reason in `stats`; nothing is logged.
#![no_std]
#![no_main]
// For the atomic add intrinsic (see conntrack::active_add); the program builds on nightly.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics, for BPF atomics")]
// Map keys are passed by reference on purpose: by value they would be copied onto the
// 512-byte stack before the helper takes their address anyway.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "stack budget (see above)"
)]

mod acl;
mod conntrack;
mod copy;
mod fastpath;
mod flowcache;
mod fwd;
mod maps;
mod nat;
mod parse;
mod rst;
mod runtime;
mod sched;
mod stats;
mod toa;
mod verdict;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    conn::{CONN_F_TOA, DIR_ORIGINAL, STATE_ESTABLISHED, STATE_SYN_RECV, STATE_SYN_SENT},
    counters::Counter,
    flow::PROTO_TCP,
};
use verdict::Verdict;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    if let Some(action) = fastpath::v4_cached(&ctx) {
        return action;
    }
    // SAFETY: a tail call into an XDP program of this object; it returns only on failure.
    unsafe { maps::PIPELINE.tail_call(&ctx, 0) };
    // No pipeline in the array (the agent sets it right after loading): the kernel decides.
    stats::count(Counter::Pass);
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Every packet the fast path did not take: reached by tail call from `lb_xdp`, with a stack
/// of its own (the pipeline's 500 bytes and the fast path's do not fit in one).
#[xdp]
pub fn lb_xdp_full(ctx: XdpContext) -> u32 {
    let v = match pipeline(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count(v.reason);
    v.action
}

/// The reference for `cargo xtask bench xdp`: the least an XDP forwarder can do. Never loaded
/// into the kernel unless a benchmark asks for it.
#[xdp]
pub fn xdp_tx_baseline(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_TX
}

/// Writes `bpf_jiffies64()` and `bpf_ktime_get_ns()`, read at one instant, over the first 16
/// bytes of the frame, for the agent to calibrate the conntrack clock (`conntrack::now_ns`).
/// Never attached: the agent runs it through BPF_PROG_TEST_RUN.
#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    if let Some(p) = parse::ptr_at::<[u64; 2]>(&ctx, 0) {
        // SAFETY: bounds-checked by ptr_at; plain helper calls.
        unsafe {
            p.write_unaligned([
                aya_ebpf::helpers::bpf_jiffies64(),
                aya_ebpf::helpers::bpf_ktime_get_ns(),
            ])
        };
    }
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

#[inline(always)]
fn pipeline(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let mut pkt = parse::packet(ctx)?;
    if pkt.is_icmp_error() {
        // An error about a tracked flow goes where that flow's packets go (path-MTU discovery
        // through the LB); about anything else, it is the kernel's business.
        let entry = conntrack::lookup(&pkt.flow).ok_or(Verdict::pass(Counter::Pass))?;
        // SAFETY: a pointer from a successful map lookup stays valid for this program run.
        let e = unsafe { &*entry.ptr };
        nat::rewrite_icmp_error(ctx, &pkt, e)?;
        // Same direction as the flow's own packets: same next hop.
        return fwd::forward(ctx, &pkt, entry.ptr);
    }
    // Entries are used in place (no copies on the 512-byte stack): the NAT tuple never changes
    // after creation; other CPUs only write state, timestamp and the cached next hop. A plain
    // packet of an established flow usually finds this CPU's copy (see `flowcache`).
    let (entry, before, fill) = match flowcache::lookup(&pkt.flow, pkt.tcp_flags, pkt.ip_len) {
        Ok(copy) => (copy, STATE_ESTABLISHED, None),
        Err(fill) => {
            let hit =
                conntrack::lookup(&pkt.flow).filter(|&e| !conntrack::retire_if_stale(e, &pkt));
            match hit {
                Some(mut entry) => {
                    // After touch: the handshake check reads what record_ack would overwrite.
                    let before = conntrack::touch(ctx, &mut entry, &pkt);
                    conntrack::record_ack(ctx, entry, &pkt);
                    (entry.ptr, before, fill.map(|f| (f, entry)))
                }
                None => (new_flow(ctx, &pkt)?, 0, None),
            }
        }
    };
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let e = unsafe { &*entry };
    nat::rewrite(ctx, &pkt, e)?;
    // TOA rides on the SYN (new, or retransmitted) and on the ACK completing the handshake.
    if e.flags & CONN_F_TOA != 0
        && e.dir == DIR_ORIGINAL
        && matches!(before, 0 | STATE_SYN_SENT | STATE_SYN_RECV)
    {
        toa::insert(ctx, &mut pkt)?;
    }
    stats::traffic(e.listener_id, e.backend_id, e.dir == DIR_ORIGINAL, pkt.len);
    let v = fwd::forward(ctx, &pkt, entry)?;
    if let Some((f, entry)) = fill {
        flowcache::fill(f, &pkt.flow, entry);
    }
    Ok(v)
}

/// A packet no flow matched: a new flow if it may start one (scheduled, its entries
/// created), else its verdict.
#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &parse::Packet) -> Result<*mut lb_common::ConnEntry, Verdict> {
    let vip = sched::vip_lookup(&pkt.flow)?;
    if pkt.flow.proto == PROTO_TCP && !pkt.is_syn() {
        // Mid-stream packet for a flow we do not know (expired, or forged): never send it
        // to a backend that has no such connection.
        return Err(Verdict::drop(Counter::DropNoConntrack));
    }
    acl::check(&vip, &pkt.flow)?;
    let backend_id = match sched::pick_backend(vip, &pkt.flow) {
        Ok(id) => id,
        // No backend can take it (all down or drained): refuse the TCP connection.
        Err(_) if pkt.flow.proto == PROTO_TCP => {
            return Err(match rst::refuse(ctx, pkt) {
                Ok(v) | Err(v) => v,
            })
        }
        Err(v) => return Err(v),
    };
    let entry = conntrack::create(pkt, &vip, backend_id)?;
    stats::new_flow(vip.listener_id, backend_id);
    Ok(entry.ptr)
}
