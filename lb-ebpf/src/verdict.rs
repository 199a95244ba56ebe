//! The outcome of the pipeline: an XDP action plus the counter that explains it.

use aya_ebpf::bindings::xdp_action;
use lb_common::counters::Counter;

#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub reason: Counter,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: Counter) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }

    #[inline(always)]
    pub const fn drop(reason: Counter) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }

    #[inline(always)]
    pub const fn tx() -> Self {
        Self {
            action: xdp_action::XDP_TX,
            reason: Counter::Forwarded,
        }
    }

    #[inline(always)]
    pub const fn redirect(action: u32) -> Self {
        Self {
            action,
            reason: Counter::Forwarded,
        }
    }
}
