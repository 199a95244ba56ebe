//! `SK_REUSEPORT` program for the L7 proxy's listeners (one copy loaded per listener): picks
//! the worker socket a new connection queues on. The kernel's default is a hash of the
//! 4-tuple, blind to how loaded each worker is; this takes two workers the hash names and
//! gives the connection to the one with fewer open and queued connections ("power of two
//! choices"; with two workers, simply the less loaded). Anything it cannot decide falls back
//! to the hash.
#![no_std]
#![no_main]
// For the atomic add intrinsic (see `queue`); the program builds on nightly.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics, for BPF atomics")]

use core::{
    cell::UnsafeCell,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use aya_ebpf::{
    bindings::{
        bpf_map_def, bpf_map_type::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, sk_action::SK_PASS,
        sk_reuseport_md, BPF_F_MMAPABLE,
    },
    helpers::bpf_sk_select_reuseport,
    macros::map,
    maps::Array,
};
use lb_common::reuseport::{WorkerLoad, MAX_WORKERS};

mod runtime;

/// aya-ebpf has no `REUSEPORT_SOCKARRAY` type; the map is only ever handed to the helper.
#[repr(transparent)]
struct SockArray(UnsafeCell<bpf_map_def>);
// SAFETY: the definition is only read (by the loader, and as the helper's map argument).
unsafe impl Sync for SockArray {}

#[map]
static WORKER_SOCKETS: SockArray = SockArray(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
    key_size: 4,
    // A socket's descriptor when the agent stores it (u32).
    value_size: 4,
    max_entries: MAX_WORKERS,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

#[map]
static WORKER_LOAD: Array<WorkerLoad> = Array::with_max_entries(MAX_WORKERS, BPF_F_MMAPABLE);

/// The listener's worker count, set by the agent at load (read volatile: the compiler must
/// not fold the placeholder).
#[no_mangle]
static WORKERS: u32 = 0;

#[link_section = "sk_reuseport"]
#[no_mangle]
pub fn lb_pick_worker(ctx: *mut sk_reuseport_md) -> u32 {
    // SAFETY: a global of this object.
    let n = unsafe { core::ptr::read_volatile(&WORKERS) };
    if n < 2 {
        return SK_PASS;
    }
    // SAFETY: the kernel passes a valid context; `hash` is readable in it.
    let hash = unsafe { (*ctx).hash };
    // Two distinct workers from the 4-tuple's hash.
    let a = hash % n;
    let b = (a + 1 + (hash >> 16) % (n - 1)) % n;
    let mut pick = if load(b) < load(a) { b } else { a };
    // SAFETY: plain helper call; a failure (no socket at `pick`) leaves the hash's choice.
    let picked = unsafe {
        bpf_sk_select_reuseport(
            ctx,
            WORKER_SOCKETS.0.get().cast(),
            (&mut pick as *mut u32).cast(),
            0,
        )
    };
    if picked == 0 {
        queue(pick);
    }
    SK_PASS
}

/// A worker's open and queued connections (`u64::MAX` for one without a slot).
#[inline(always)]
fn load(worker: u32) -> u64 {
    WORKER_LOAD
        .get_ptr(worker)
        // SAFETY: a pointer from a successful lookup; every store to these fields is a whole
        // aligned word.
        .map_or(u64::MAX, |w| unsafe {
            core::ptr::read_volatile(&(*w).connections)
                .saturating_add(core::ptr::read_volatile(&(*w).queued))
        })
}

/// Counts a connection queued on `worker`'s socket.
#[inline(always)]
fn queue(worker: u32) {
    if let Some(w) = WORKER_LOAD.get_ptr_mut(worker) {
        // SAFETY: a pointer from a successful lookup. The intrinsic, not AtomicU64: core has
        // no atomic read-modify-write for the BPF target; this lowers to BPF's atomic add.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                core::ptr::addr_of_mut!((*w).queued),
                1,
            )
        };
    }
}
