//! Per-CPU counters: no atomics needed, the agent sums the CPUs.

use lb_common::counters::{Counter, ListenerStats};

use crate::maps::{BACKEND_STATS, COUNTERS, LISTENER_STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// A new flow of `listener_id` to `backend_id`.
#[inline(always)]
pub fn new_flow(listener_id: u32, backend_id: u32) {
    for s in [
        LISTENER_STATS.get_ptr_mut(listener_id),
        BACKEND_STATS.get_ptr_mut(backend_id),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: per-CPU slot.
        unsafe { (*s).new_flows += 1 };
    }
}

/// One packet of a flow of `listener_id` to `backend_id`, client → backend when `original`.
#[inline(always)]
pub fn traffic(listener_id: u32, backend_id: u32, original: bool, len: u64) {
    add(LISTENER_STATS.get_ptr_mut(listener_id), original, len);
    add(BACKEND_STATS.get_ptr_mut(backend_id), original, len);
}

#[inline(always)]
fn add(slot: Option<*mut ListenerStats>, original: bool, len: u64) {
    let Some(s) = slot else { return };
    // SAFETY: per-CPU slot.
    let s = unsafe { &mut *s };
    if original {
        s.packets_in += 1;
        s.bytes_in += len;
    } else {
        s.packets_out += 1;
        s.bytes_out += len;
    }
}
