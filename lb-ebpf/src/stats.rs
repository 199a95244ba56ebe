//! Per-CPU counters: no atomics needed, the agent sums the CPUs.

use lb_common::counters::Counter;

use crate::maps::{COUNTERS, LISTENER_STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn new_flow(listener_id: u32) {
    if let Some(s) = LISTENER_STATS.get_ptr_mut(listener_id) {
        // SAFETY: per-CPU slot.
        unsafe { (*s).new_flows += 1 };
    }
}

#[inline(always)]
pub fn listener_bytes(listener_id: u32, original: bool, len: u64) {
    if let Some(s) = LISTENER_STATS.get_ptr_mut(listener_id) {
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
}
