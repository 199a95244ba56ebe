//! Listener lookup and backend choice. The agent builds the Maglev tables; this side only
//! indexes them with the flow hash.

use lb_common::{
    counters::Counter,
    flow::{VIP_F_SOURCE_IP, VIP_F_WLC, VIP_F_WRR},
    hash::{addr_hash, flow_hash},
    maps::{ring_base, MAX_WLC_BACKENDS, NO_BACKEND},
    FlowKey, VipKey, VipMeta,
};

use crate::{
    maps::{BACKENDS, BACKEND_ACTIVE, RING, VIPS, WRR_CURSOR},
    verdict::Verdict,
};

/// The listener for the packet's destination, copied so a concurrent agent update cannot change
/// it halfway through the packet. Not a VIP: pass to the kernel untouched.
#[inline(always)]
pub fn vip_lookup(flow: &FlowKey) -> Result<VipMeta, Verdict> {
    let key = VipKey {
        addr_be: flow.dst_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: VipMeta is plain data; the copy is taken at once.
    unsafe { VIPS.get(&key) }
        .copied()
        .ok_or(Verdict::pass(Counter::Pass))
}

/// The listener's next round-robin position on this CPU.
#[inline(always)]
fn next_turn(listener_id: u32) -> u32 {
    match WRR_CURSOR.get_ptr_mut(listener_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        Some(c) => unsafe {
            let turn = *c;
            *c = turn.wrapping_add(1);
            turn
        },
        None => 0,
    }
}

/// Weighted least connections: the backend with the lowest `active / weight` (compared
/// cross-multiplied, no division). The scan starts at a hash-chosen position so that ties
/// (e.g. short connections, all counts 0) spread instead of piling onto the first backend.
#[inline(always)]
fn least_loaded(vip: &VipMeta, flow: &FlowKey) -> Result<u32, Verdict> {
    let base = ring_base(vip.listener_id, vip.ring_half);
    let n = vip.ring_size;
    let start = flow_hash(flow).checked_rem(n).unwrap_or(0);
    let (mut best, mut best_active, mut best_weight) = (NO_BACKEND, 0u64, 0u64);
    for i in 0..MAX_WLC_BACKENDS {
        if i >= n {
            break;
        }
        let Some(&id) = RING.get(base + (start + i).checked_rem(n).unwrap_or(0)) else {
            break;
        };
        let Some(b) = BACKENDS.get(id) else { continue };
        let weight = b.weight as u64;
        // A count can dip below zero between a close and the agent's next sweep.
        let active = BACKEND_ACTIVE
            .get(id)
            .map_or(0, |a| (*a as i64).max(0) as u64);
        if weight != 0 && (best == NO_BACKEND || active * best_weight < best_active * weight) {
            (best, best_active, best_weight) = (id, active, weight);
        }
    }
    if best == NO_BACKEND {
        Err(Verdict::drop(Counter::DropNoBackend))
    } else {
        Ok(best)
    }
}

/// Backend id for a new flow from the listener's live Maglev table, keyed by the 5-tuple or,
/// for source-IP scheduling, by the client address alone.
#[inline(always)]
pub fn pick_backend(vip: VipMeta, flow: &FlowKey) -> Result<u32, Verdict> {
    let none = Verdict::drop(Counter::DropNoBackend);
    if vip.ring_size == 0 {
        return Err(none);
    }
    if vip.flags & VIP_F_WLC != 0 {
        return least_loaded(&vip, flow);
    }
    let hash = if vip.flags & VIP_F_WRR != 0 {
        next_turn(vip.listener_id)
    } else if vip.flags & VIP_F_SOURCE_IP != 0 {
        addr_hash(&flow.src_be)
    } else {
        flow_hash(flow)
    };
    let slot =
        ring_base(vip.listener_id, vip.ring_half) + hash.checked_rem(vip.ring_size).unwrap_or(0);
    match RING.get(slot) {
        Some(&id) if id != NO_BACKEND => Ok(id),
        _ => Err(none),
    }
}
