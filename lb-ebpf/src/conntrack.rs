//! Connection tracking: shared LRU maps, an original and a reply entry per flow (see
//! `lb_common::conn`), both in the same map. New flows get a SNAT address and port here.
//! IPv4 flows are keyed by the 16-byte `FlowKey4` in maps of their own (see `Table`).
//!
//! A new TCP flow starts in `CONNTRACK_SYN` and moves to `CONNTRACK` when the client completes
//! the handshake. A spoofed SYN flood never does (the backend's SYN-ACK goes to an address that
//! does not answer), so it can only evict other unfinished handshakes from that smaller table,
//! never an established flow, and the SNAT ports it holds are bounded by that table's size.
//! Established flows are found by the first lookup, as with a single table.

use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_loop},
    maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{
    conn::{
        reuses_tuple, tcp_next_state, CONN_F_RESET_IDLE, CONN_F_TOA, DIR_ORIGINAL, DIR_REPLY,
        STATE_CLOSED, STATE_CLOSING, STATE_ESTABLISHED, STATE_SYN_RECV, STATE_SYN_SENT, TCP_ACK,
    },
    counters::Counter,
    flow::{FAMILY_V4, PROTO_TCP, VIP_F_PASSTHROUGH, VIP_F_RESET_IDLE, VIP_F_TOA},
    hash::{addr_hash, fmix32},
    maps::MAX_SNAT_ADDRS,
    ConnEntry, FlowKey, FlowKey4, VipMeta,
};

use crate::{
    flowcache,
    maps::{
        BACKENDS, BACKEND_ACTIVE, CONNTRACK, CONNTRACK6, CONNTRACK6_SYN, CONNTRACK_SYN, GLOBAL,
        SNAT_ADDRS,
    },
    parse::{ptr_at, Packet},
    verdict::Verdict,
};

/// Probes for a free port at one SNAT address before the pool's next address is tried (and
/// after the last, the new flow is dropped as exhausted).
const PORT_TRIES: u32 = 8;
/// `last_seen_ns` is refreshed at most this often (and on state changes), so established flows
/// do not write the shared entry (and bounce its cache line between CPUs) on every packet. The
/// agent's idle timeouts are far coarser.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// Now, for timestamps: CLOCK_MONOTONIC nanoseconds (the agent's clock) at jiffy resolution,
/// derived from jiffies with the agent's calibration. The verifier inlines `bpf_jiffies64` (a
/// load), while a `bpf_ktime_get*` helper call cost 20 ns of an established packet's 106 on
/// this machine (its CPU returns from every kernel call through a mitigation thunk).
/// Timeouts are in seconds.
#[inline(always)]
fn now_ns() -> u64 {
    let Some(g) = GLOBAL.get(0) else { return 0 };
    // SAFETY: plain helper call (inlined).
    let jiffies = unsafe { bpf_jiffies64() };
    jiffies
        .wrapping_sub(g.jiffies_base)
        .wrapping_mul(g.ns_per_jiffy)
}

/// A conntrack entry, used in place (no copies on the 512-byte stack), and which map holds it
/// (its pair is in the same one).
#[derive(Clone, Copy)]
pub struct Entry {
    pub ptr: *mut ConnEntry,
    /// In the handshake table.
    pub handshake: bool,
}

/// The handshake (true) or the established table, for either family. Keys are `FlowKey`s
/// here; an IPv4 flow's is narrowed to its `FlowKey4` at the map call.
#[derive(Clone, Copy)]
struct Table(bool);

/// A conntrack key type and its pair of maps.
trait Key: Sized + 'static {
    fn map(handshake: bool) -> &'static LruHashMap<Self, ConnEntry>;
}

impl Key for FlowKey4 {
    #[inline(always)]
    fn map(handshake: bool) -> &'static LruHashMap<Self, ConnEntry> {
        if handshake {
            &CONNTRACK_SYN
        } else {
            &CONNTRACK
        }
    }
}

impl Key for FlowKey {
    #[inline(always)]
    fn map(handshake: bool) -> &'static LruHashMap<Self, ConnEntry> {
        if handshake {
            &CONNTRACK6_SYN
        } else {
            &CONNTRACK6
        }
    }
}

impl Table {
    #[inline(always)]
    fn get(self, key: &FlowKey) -> Option<*mut ConnEntry> {
        if key.family == FAMILY_V4 {
            FlowKey4::map(self.0).get_ptr_mut(&key.v4())
        } else {
            FlowKey::map(self.0).get_ptr_mut(key)
        }
    }

    /// Whether `e` went in (`flags`: 0 or BPF_NOEXIST).
    #[inline(always)]
    fn insert(self, key: &FlowKey, e: &ConnEntry, flags: u64) -> bool {
        if key.family == FAMILY_V4 {
            FlowKey4::map(self.0).insert(&key.v4(), e, flags).is_ok()
        } else {
            FlowKey::map(self.0).insert(key, e, flags).is_ok()
        }
    }

    /// Gone already (LRU eviction, the agent's sweep) is fine.
    #[inline(always)]
    fn remove(self, key: &FlowKey) {
        let _ = if key.family == FAMILY_V4 {
            FlowKey4::map(self.0).remove(&key.v4())
        } else {
            FlowKey::map(self.0).remove(key)
        };
    }
}

const ESTABLISHED: Table = Table(false);
const HANDSHAKE: Table = Table(true);

#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<Entry> {
    if let Some(ptr) = ESTABLISHED.get(flow) {
        return Some(Entry {
            ptr,
            handshake: false,
        });
    }
    HANDSHAKE.get(flow).map(|ptr| Entry {
        ptr,
        handshake: true,
    })
}

/// A pure client SYN on the tuple of a flow that cannot carry it starts a new connection: the
/// old flow's entries are removed (true), and the caller schedules the packet as new. That is
/// a closed flow (the client reuses its port), or a handshake whose reply tuple another flow
/// has taken since the LRU evicted its entry (see `pair`).
#[inline(always)]
pub fn retire_if_stale(entry: Entry, pkt: &Packet) -> bool {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let e = unsafe { &*entry.ptr };
    if pkt.flow.proto != PROTO_TCP || e.dir != DIR_ORIGINAL || !pkt.is_syn() {
        return false;
    }
    let t = Table(entry.handshake);
    if reuses_tuple(e.state, e.dir, pkt.tcp_flags) {
        // Not live any more, so no active count to give back. Its pair key may be another
        // flow's by now (see `pair`): that one stays.
        let pair_key = e.pair_key(pkt.flow.proto, pkt.flow.family);
        if t.get(&pair_key).is_some_and(|p| is_pair(e, &pkt.flow, p)) {
            t.remove(&pair_key);
        }
    } else if entry.handshake && pair(entry, &pkt.flow).is_none() {
        // Still counted as live; the pair key is another flow's.
        active_add(e.backend_id, u64::MAX);
    } else {
        return false;
    }
    t.remove(&pkt.flow);
    flowcache::invalidate(&pkt.flow);
    true
}

/// The other entry of `entry`'s flow (`key` is `entry`'s own key), put back if it is gone.
/// Under a SYN flood the LRU can evict one entry of a real handshake's pair: without its reply
/// entry the backend's SYN-ACK has no way back, without its original entry the client's ACK is
/// dropped, and the surviving entry would carry its retransmissions to nowhere. Each entry's
/// key is the other's rewritten tuple reversed, so the missing one is rebuilt from the
/// survivor. None if another flow has taken the key meanwhile.
#[inline(always)]
fn pair(entry: Entry, key: &FlowKey) -> Option<(FlowKey, *mut ConnEntry)> {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let e = unsafe { &*entry.ptr };
    let t = Table(entry.handshake);
    let pair_key = e.pair_key(key.proto, key.family);
    if let Some(p) = t.get(&pair_key) {
        return is_pair(e, key, p).then_some((pair_key, p));
    }
    let rebuilt = ConnEntry {
        last_seen_ns: e.last_seen_ns,
        nat_src_be: key.dst_be,
        nat_dst_be: key.src_be,
        nat_sport_be: key.dport_be,
        nat_dport_be: key.sport_be,
        listener_id: e.listener_id,
        backend_id: e.backend_id,
        state: e.state,
        dir: e.dir ^ 1,
        flags: e.flags,
        ..ConnEntry::default()
    };
    // BPF_NOEXIST: a flow that took the key since the lookup keeps it.
    if !t.insert(&pair_key, &rebuilt, BPF_NOEXIST as u64) {
        return None;
    }
    t.get(&pair_key).map(|p| (pair_key, p))
}

/// Whether `other` (found at `e`'s pair key) is the other entry of `e`'s flow, whose key is
/// `key`: it rewrites to the sender of `key`.
#[inline(always)]
fn is_pair(e: &ConnEntry, key: &FlowKey, other: *const ConnEntry) -> bool {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let r = unsafe { &*other };
    r.dir != e.dir && r.nat_dst_be == key.src_be && r.nat_dport_be == key.sport_be
}

/// Advances the TCP state (in both entries of the flow) and refreshes the timestamp; a flow
/// whose client completes the handshake moves to the established table and `entry` follows
/// it. Returns the state before this packet.
///
/// Completing the handshake takes the ACK the backend's SYN-ACK asked for (its sequence
/// number + 1, kept in the original entry's `ack_be` meanwhile): a spoofed source never sees
/// the SYN-ACK, so a SYN followed by a blind ACK cannot move flood flows into the established
/// table, whose entries the handshake table protects. Such an ACK still reaches the backend,
/// which resets it.
#[inline(always)]
pub fn touch(ctx: &XdpContext, entry: &mut Entry, pkt: &Packet) -> u8 {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run (RCU).
    let e = unsafe { &mut *entry.ptr };
    let before = e.state;
    let now = now_ns();
    if now.wrapping_sub(e.last_seen_ns) > TOUCH_INTERVAL_NS {
        refresh(e, now);
    }
    if pkt.flow.proto == PROTO_TCP {
        let next = tcp_next_state(e.state, e.dir, pkt.tcp_flags);
        if next == e.state {
            return before;
        }
        // Transitions are rare (handshake, FIN, RST), so what follows costs little.
        if next == STATE_ESTABLISHED && e.ack_be != 0 && tcp_word(ctx, pkt, 8) != Some(e.ack_be) {
            return before;
        }
        if is_live(e.state) != is_live(next) {
            active_add(e.backend_id, if is_live(next) { 1 } else { u64::MAX });
        }
        e.state = next;
        refresh(e, now);
        if let Some((pair_key, pair)) = pair(*entry, &pkt.flow) {
            // SAFETY: as above.
            let p = unsafe { &mut *pair };
            p.state = next;
            p.last_seen_ns = now;
            if next == STATE_SYN_RECV {
                // The SYN-ACK: the client's completing ACK must acknowledge its sequence number.
                if let Some(seq) = tcp_word(ctx, pkt, 4) {
                    p.ack_be = u32::from_be(seq).wrapping_add(1).to_be();
                }
            }
            if entry.handshake && next == STATE_ESTABLISHED {
                promote(entry, &pkt.flow, &pair_key, pair);
            }
        }
    }
    before
}

/// A 32-bit word of the TCP header at `off` (4: sequence number, 8: acknowledgment number),
/// network order.
#[inline(always)]
fn tcp_word(ctx: &XdpContext, pkt: &Packet, off: usize) -> Option<u32> {
    // SAFETY: bounds-checked by ptr_at.
    ptr_at::<u32>(ctx, pkt.l4_off + off).map(|p| unsafe { p.read_unaligned() })
}

/// Keeps the acknowledgment number of an ACK in its direction's entry, for flows whose
/// listener resets them when they idle out (the agent's RSTs need it; see `ConnEntry::ack_be`).
/// Written only when it changed, so a one-way stream does not dirty the entry.
#[inline(always)]
pub fn record_ack(ctx: &XdpContext, entry: Entry, pkt: &Packet) {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run (RCU).
    let e = unsafe { &mut *entry.ptr };
    if e.flags & CONN_F_RESET_IDLE == 0 || pkt.tcp_flags & TCP_ACK == 0 {
        return;
    }
    if let Some(ack) = tcp_word(ctx, pkt, 8) {
        if e.ack_be != ack {
            e.ack_be = ack;
        }
    }
}

/// A new timestamp, and a fresh next-hop lookup on the next packet (route and neighbour
/// changes are seen within about a second).
#[inline(always)]
fn refresh(e: &mut ConnEntry, now: u64) {
    e.last_seen_ns = now;
    e.fwd_ifindex = 0;
}

/// Moves a flow whose client completed the handshake from `CONNTRACK_SYN` to `CONNTRACK`
/// (copied straight from map memory, not through the stack), then points `entry` at its new
/// original entry. The new entries go in before the old ones go, so a packet on another CPU
/// always finds one of them.
#[inline(always)]
fn promote(entry: &mut Entry, key: &FlowKey, pair_key: &FlowKey, pair: *mut ConnEntry) {
    // SAFETY: pointers from successful map lookups stay valid for this program run.
    let (e, p) = unsafe { (&*entry.ptr, &*pair) };
    if !ESTABLISHED.insert(pair_key, p, 0) || !ESTABLISHED.insert(key, e, 0) {
        // Stays a handshake-table flow (an orphan entry left behind is swept by the agent).
        return;
    }
    if let Some(ptr) = ESTABLISHED.get(key) {
        *entry = Entry {
            ptr,
            handshake: false,
        };
        HANDSHAKE.remove(pair_key);
        HANDSHAKE.remove(key);
    }
}

/// Inserts both entries of a new flow to `backend_id` (TCP in the handshake table) and returns
/// the original one. With SNAT the reply entry's insert allocates the SNAT address and port;
/// with `passthrough` (DNAT only) the backend answers the client's own address, so that is the
/// reply key.
#[inline(always)]
pub fn create(pkt: &Packet, vip: &VipMeta, backend_id: u32) -> Result<Entry, Verdict> {
    let (listener_id, passthrough) = (vip.listener_id, vip.flags & VIP_F_PASSTHROUGH != 0);
    let exhausted = Verdict::drop(Counter::DropSnatExhausted);
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Counter::DropNoBackend))?;
    let flow = &pkt.flow;
    let now = now_ns();
    let handshake = flow.proto == PROTO_TCP;
    // One entry on the (512-byte) stack, inserted for the reply direction and then turned into
    // the original direction's.
    let mut e = ConnEntry {
        last_seen_ns: now,
        nat_src_be: flow.dst_be,
        nat_dst_be: flow.src_be,
        nat_sport_be: flow.dport_be,
        nat_dport_be: flow.sport_be,
        listener_id,
        backend_id,
        state: if handshake {
            STATE_SYN_SENT
        } else {
            STATE_ESTABLISHED
        },
        dir: DIR_REPLY,
        flags: if vip.flags & VIP_F_TOA != 0 {
            CONN_F_TOA
        } else {
            0
        } | if vip.flags & VIP_F_RESET_IDLE != 0 {
            CONN_F_RESET_IDLE
        } else {
            0
        },
        ..ConnEntry::default()
    };
    let mut reply = FlowKey {
        src_be: backend.addr_be,
        dst_be: flow.src_be,
        sport_be: backend.port_be,
        dport_be: flow.sport_be,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    if passthrough {
        // Taken only if the same client port reaches the same backend through another VIP.
        if !claim(handshake, &reply, &e) {
            return Err(exhausted);
        }
    } else {
        allocate_snat(handshake, &mut reply, &e)?;
    }
    e.nat_src_be = reply.dst_be;
    e.nat_dst_be = backend.addr_be;
    e.nat_sport_be = reply.dport_be;
    e.nat_dport_be = backend.port_be;
    e.dir = DIR_ORIGINAL;
    let t = Table(handshake);
    let full = Verdict::drop(Counter::DropConntrackFull);
    if !t.insert(flow, &e, 0) {
        t.remove(&reply);
        return Err(full);
    }
    // Other CPUs may hold copies of an earlier flow with either tuple.
    flowcache::invalidate(flow);
    flowcache::invalidate(&reply);
    active_add(backend_id, 1);
    let ptr = t.get(flow).ok_or(full)?;
    Ok(Entry { ptr, handshake })
}

/// Takes the reply tuple `key` for a new flow: inserted into the flow's table only if no flow
/// of either table uses it (an established flow may hold the SNAT port a handshake wants).
#[inline(always)]
fn claim(handshake: bool, key: &FlowKey, e: &ConnEntry) -> bool {
    if handshake && ESTABLISHED.get(key).is_some() {
        return false;
    }
    Table(handshake).insert(key, e, BPF_NOEXIST as u64)
}

/// Whether a flow in `state` counts as an active connection of its backend.
#[inline(always)]
fn is_live(state: u8) -> bool {
    state != STATE_CLOSING && state != STATE_CLOSED
}

/// Adds `delta` (wrapping: `u64::MAX` is -1) to a backend's active-flow count, atomically:
/// every CPU creates and closes flows.
#[inline(always)]
fn active_add(backend_id: u32, delta: u64) {
    if let Some(p) = BACKEND_ACTIVE.get_ptr_mut(backend_id) {
        // SAFETY: an array map slot, valid for the program run; only ever updated atomically
        // by the datapath (the agent's sweep overwrites it with a fresh count). The intrinsic,
        // not AtomicU64: core has no atomic read-modify-write for the BPF target; this lowers
        // to BPF's atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Picks a SNAT address and port for `reply` (backend → SNAT) and inserts the reply entry
/// there. The address is the one a hash of the client's address and port picks; only when that
/// one has no free port toward this backend do the family's other addresses take the flow, in
/// turn, so the pool holds the sum of its addresses' port ranges. At each address the client's
/// port is kept when it is in range (as Cilium does), otherwise probed randomly; the insert with
/// BPF_NOEXIST is the allocation, failing when the tuple is taken.
#[inline(always)]
fn allocate_snat(handshake: bool, reply: &mut FlowKey, e: &ConnEntry) -> Result<(), Verdict> {
    let exhausted = Verdict::drop(Counter::DropSnatExhausted);
    let g = GLOBAL.get(0).ok_or(exhausted)?;
    let (start, count) = if reply.family == FAMILY_V4 {
        (g.snat_v4_start, g.snat_v4_count)
    } else {
        (g.snat_v6_start, g.snat_v6_count)
    };
    if count == 0 || g.port_max < g.port_min {
        return Err(exhausted);
    }
    // The client's tuple, still in the key: it picks the address. fmix32 because Linux
    // connects from even ports while it has them, and the port's low bits alone would give all
    // of a client's flows one address of a pool of two.
    let client_port = u16::from_be(reply.dport_be) as u32;
    let hash = fmix32(addr_hash(&reply.dst_be) ^ client_port);
    // checked_rem: a plain `%` carries a divide-by-zero panic path the verifier rejects.
    let first = hash.checked_rem(count).unwrap_or(0);
    let (min, max) = (g.port_min as u32, g.port_max as u32);
    let span = max - min + 1;
    let port = if client_port >= min && client_port <= max {
        client_port
    } else {
        random_port(min, span)
    };
    let mut probes = Probes {
        reply,
        e,
        start,
        count,
        first,
        port,
        min,
        span,
        handshake,
        claimed: false,
    };
    // Through bpf_loop, whose callback the verifier walks apart from the rest: every inline
    // probe that can succeed is one more path through the rest of the program, which is near
    // the limit of processed instructions (lb_xdp_full: 921k of 1M with 8 inline probes, over
    // it with 8 per address, 801k this way). The count is the agent's, clamped to be sure.
    // SAFETY: the callback has bpf_loop's signature and takes `probes` as its context.
    unsafe {
        bpf_loop(
            count.min(MAX_SNAT_ADDRS) * PORT_TRIES,
            probe as *mut c_void,
            (&raw mut probes).cast(),
            0,
        )
    };
    if probes.claimed {
        Ok(())
    } else {
        Err(exhausted)
    }
}

/// `allocate_snat`'s search of the family's addresses, the context of its `bpf_loop`.
struct Probes<'a> {
    reply: &'a mut FlowKey,
    e: &'a ConnEntry,
    /// The family's addresses: `SNAT_ADDRS[start..start + count]`; `first` is the hashed one.
    start: u32,
    count: u32,
    first: u32,
    /// The first port to try at each address, and the range.
    port: u32,
    min: u32,
    span: u32,
    handshake: bool,
    claimed: bool,
}

/// The `bpf_loop` callback, one probe per call: the `i`-th over the family's addresses from the
/// hashed one, `PORT_TRIES` at each, the address's first at the first port. Returns 1 (stop)
/// once a port is claimed, 0 (go on) otherwise.
#[inline(never)]
extern "C" fn probe(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `allocate_snat` passes its `Probes`, alive for the whole loop.
    let n = unsafe { &mut *ctx.cast::<Probes>() };
    let (nth, tries) = (i as u32 / PORT_TRIES, i as u32 % PORT_TRIES);
    if tries == 0 {
        // nth < count, so this is below 2 * count and one subtraction wraps it.
        let at = n.first + nth;
        let at = if at >= n.count { at - n.count } else { at };
        let Some(addr) = SNAT_ADDRS.get(n.start + at) else {
            return 1;
        };
        n.reply.dst_be = *addr;
        n.reply.dport_be = (n.port as u16).to_be();
    } else {
        n.reply.dport_be = (random_port(n.min, n.span) as u16).to_be();
    }
    n.claimed = claim(n.handshake, n.reply, n.e);
    n.claimed as i64
}

/// A random port of the `span` ports from `min`.
#[inline(always)]
fn random_port(min: u32, span: u32) -> u32 {
    // SAFETY: plain helper call.
    min + unsafe { bpf_get_prandom_u32() }
        .checked_rem(span)
        .unwrap_or(0)
}
