//! A per-CPU exact-match flow cache in front of the conntrack maps (like Open vSwitch's EMC):
//! a CPU keeps a copy of an established flow's entry, and that flow's plain packets (no SYN,
//! FIN or RST) are forwarded from the copy without a conntrack lookup, whose kernel call chain
//! (hash, bucket walk, key compare, each returning through this CPU's return thunk) is most of
//! an established packet's cost.
//!
//! A copy is used only while it can be trusted:
//! - for `GlobalConfig::flow_cache_jiffies` after it was taken; then a packet takes the
//!   conntrack path again, which refreshes the entry's timestamp and next hop as before;
//! - while its tuple's generation in `FLOW_GEN` is unchanged: creating or retiring a flow
//!   bumps it (on any CPU), so a reused tuple never reaches the old flow's backend;
//! - while `GlobalConfig::flow_gen` is unchanged: the agent bumps it after deleting or
//!   writing entries (idle sweep, removed listeners).
//!
//! Skipping the conntrack path is exact for these packets: past the handshake only SYN, FIN
//! and RST change a flow's state (`tcp_next_state`), flows whose ACK numbers are recorded
//! (`reset_on_idle`) are never cached, and the counters still count every packet.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    conn::{CachedFlow, CONN_F_RESET_IDLE, STATE_ESTABLISHED, TCP_FIN, TCP_RST, TCP_SYN},
    flow::FAMILY_V4,
    hash::fmix32,
    maps::{FLOW_CACHE_SLOTS, FLOW_GEN_SLOTS},
    ConnEntry, FlowKey,
};

use crate::{
    conntrack::Entry,
    copy,
    maps::{FLOW_CACHE, FLOW_GEN, GLOBAL},
};

// The slot indices below are bits of one 32-bit hash.
const _: () = assert!(FLOW_GEN_SLOTS == 1 << 16 && FLOW_CACHE_SLOTS <= 1 << 16);

/// A miss's packet's slot, for `fill`, with the generations read before its conntrack lookup.
pub struct Fill {
    slot: *mut CachedFlow,
    flow_gen: u32,
    slot_gen: u32,
    jiffies: u64,
}

/// The cache and generation slots of a tuple: the low and the high bits of one hash. One
/// mixing round over the folded tuple, not `hash::flow_hash`'s one per word: this runs for
/// every plain packet.
#[inline(always)]
fn slots(k: &FlowKey) -> (u32, u32) {
    let src = k.src_be[0] ^ k.src_be[1] ^ k.src_be[2] ^ k.src_be[3];
    let dst = k.dst_be[0] ^ k.dst_be[1] ^ k.dst_be[2] ^ k.dst_be[3];
    let ports = ((k.sport_be as u32) << 16) | k.dport_be as u32;
    let h = fmix32(src ^ dst.rotate_left(16) ^ ports ^ k.proto as u32);
    (h & (FLOW_CACHE_SLOTS - 1), h >> 16)
}

/// Field by field: a derived `==` may become a call to `memcmp`, which BPF does not have. An
/// IPv4 key's other address words are zero (`parse`), so for IPv4 the first ones decide.
#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    let rest = |k: &FlowKey| {
        (k.sport_be as u64)
            | (k.dport_be as u64) << 16
            | (k.proto as u64) << 32
            | (k.family as u64) << 40
    };
    let mut diff = (a.src_be[0] ^ b.src_be[0]) | (a.dst_be[0] ^ b.dst_be[0]);
    if b.family != FAMILY_V4 {
        for i in 1..4 {
            diff |= (a.src_be[i] ^ b.src_be[i]) | (a.dst_be[i] ^ b.dst_be[i]);
        }
    }
    (diff as u64 | (rest(a) ^ rest(b))) == 0
}

/// This CPU's trusted copy of the entry for a packet with tuple `key`, TCP flags `tcp_flags`
/// and IP length `ip_len` (the copy's cached next hop valid for that size), or where to keep
/// one if the conntrack path finds an entry worth caching (`None`: the packet is not plain, or
/// the cache is off).
#[inline(always)]
pub fn lookup(key: &FlowKey, tcp_flags: u8, ip_len: u16) -> Result<*mut ConnEntry, Option<Fill>> {
    if tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return Err(None);
    }
    let g = GLOBAL.get(0).ok_or(None)?;
    if g.flow_cache_jiffies == 0 {
        return Err(None);
    }
    let (cache_slot, gen_slot) = slots(key);
    let slot = FLOW_CACHE.get_ptr_mut(cache_slot).ok_or(None)?;
    // SAFETY: a per-CPU slot, only this CPU uses it while the program runs.
    let c = unsafe { &mut *slot };
    // Compared before the lookups below, which are calls to LLVM: the tuple need not be kept
    // on the stack across them.
    let fits = same(&c.key, key) && ip_len <= c.entry.fwd_len;
    // Read before the conntrack lookup a miss goes on to (loads are not reordered with
    // loads), so a copy is never newer than the generations it carries.
    let slot_gen = *FLOW_GEN.get(gen_slot).ok_or(None)?;
    // SAFETY: plain helper call (inlined by the verifier).
    let jiffies = unsafe { bpf_jiffies64() };
    if fits
        && jiffies.wrapping_sub(c.filled_jiffies) < g.flow_cache_jiffies as u64
        && c.flow_gen == g.flow_gen
        && c.slot_gen == slot_gen
    {
        c.hits += 1;
        return Ok(&mut c.entry);
    }
    Err(Some(Fill {
        slot,
        flow_gen: g.flow_gen,
        slot_gen,
        jiffies,
    }))
}

/// Keeps a copy of `entry` (found for `key` by the conntrack path, its packet forwarded) if
/// its flow is established, not recording ACKs, and has a cached next hop. The slot's hit
/// count carries on.
#[inline(always)]
pub fn fill(f: Fill, key: &FlowKey, entry: Entry) {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let e = unsafe { &*entry.ptr };
    if entry.handshake
        || e.state != STATE_ESTABLISHED
        || e.flags & CONN_F_RESET_IDLE != 0
        || e.fwd_ifindex == 0
    {
        return;
    }
    // SAFETY: a per-CPU slot, only this CPU uses it while the program runs.
    let c = unsafe { &mut *f.slot };
    c.key = *key;
    // SAFETY: a field of this CPU's slot.
    unsafe { copy::words::<_, 10>(&raw mut c.entry, e) };
    c.filled_jiffies = f.jiffies;
    c.flow_gen = f.flow_gen;
    c.slot_gen = f.slot_gen;
}

/// Makes every CPU's copy for tuple `key` stale: called after a flow with it was created or
/// removed by the datapath.
#[inline(always)]
pub fn invalidate(key: &FlowKey) {
    if let Some(p) = FLOW_GEN.get_ptr_mut(slots(key).1) {
        // SAFETY: an array map slot, valid for the program run; CPUs bump it concurrently.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}
