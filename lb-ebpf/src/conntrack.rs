//! Connection tracking: one shared LRU map, an original and a reply entry per flow (see
//! `lb_common::conn`). New flows get a SNAT address and port here.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use lb_common::{
    conn::{
        reuses_tuple, tcp_next_state, CONN_F_RESET_IDLE, CONN_F_TOA, DIR_ORIGINAL, DIR_REPLY,
        STATE_CLOSED, STATE_CLOSING, STATE_ESTABLISHED, STATE_SYN_SENT, TCP_ACK,
    },
    counters::Counter,
    flow::{FAMILY_V4, PROTO_TCP, VIP_F_PASSTHROUGH, VIP_F_RESET_IDLE, VIP_F_TOA},
    hash::addr_hash,
    ConnEntry, FlowKey, VipMeta,
};

use crate::{
    maps::{BACKENDS, BACKEND_ACTIVE, CONNTRACK, GLOBAL, SNAT_ADDRS},
    parse::{ptr_at, Packet},
    verdict::Verdict,
};

// Timestamps use the coarse monotonic clock (jiffy resolution, same base as the agent's
// CLOCK_MONOTONIC): a fraction of `bpf_ktime_get_ns`'s cost on every packet, and timeouts are
// in seconds.

/// Random probes for a free SNAT port before the new flow is dropped as exhausted.
const PORT_TRIES: u32 = 8;
/// `last_seen_ns` is refreshed at most this often (and on state changes), so established flows
/// do not write the shared entry (and bounce its cache line between CPUs) on every packet. The
/// agent's idle timeouts are far coarser.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<*mut ConnEntry> {
    CONNTRACK.get_ptr_mut(flow)
}

/// A pure client SYN on a closed flow's tuple starts a new connection: the old flow's entries
/// are removed (true), and the caller schedules the packet as new.
#[inline(always)]
pub fn retire_if_reused(entry: *mut ConnEntry, pkt: &Packet) -> bool {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run.
    let e = unsafe { &*entry };
    if pkt.flow.proto != PROTO_TCP || !reuses_tuple(e.state, e.dir, pkt.tcp_flags) {
        return false;
    }
    // Not live any more, so no active count to give back.
    let _ = CONNTRACK.remove(&e.pair_key(pkt.flow.proto, pkt.flow.family));
    let _ = CONNTRACK.remove(&pkt.flow);
    true
}

/// Advances the TCP state (in both entries of the flow) and refreshes the timestamp. Returns
/// the state before this packet.
#[inline(always)]
pub fn touch(entry: *mut ConnEntry, pkt: &Packet) -> u8 {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run (RCU).
    let e = unsafe { &mut *entry };
    let before = e.state;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut refresh = now.wrapping_sub(e.last_seen_ns) > TOUCH_INTERVAL_NS;
    if pkt.flow.proto == PROTO_TCP {
        let next = tcp_next_state(e.state, e.dir, pkt.tcp_flags);
        if next != e.state {
            // Transitions are rare (handshake, FIN, RST), so the pair lookup costs little.
            if is_live(e.state) != is_live(next) {
                active_add(e.backend_id, if is_live(next) { 1 } else { u64::MAX });
            }
            e.state = next;
            refresh = true;
            if let Some(pair) = CONNTRACK.get_ptr_mut(&e.pair_key(pkt.flow.proto, pkt.flow.family))
            {
                // SAFETY: as above.
                unsafe {
                    (*pair).state = next;
                    (*pair).last_seen_ns = now;
                }
            }
        }
    }
    if refresh {
        e.last_seen_ns = now;
        e.fwd_ifindex = 0;
    }
    before
}

/// Keeps the acknowledgment number of an ACK in its direction's entry, for flows whose
/// listener resets them when they idle out (the agent's RSTs need it; see `ConnEntry::ack_be`).
/// Written only when it changed, so a one-way stream does not dirty the entry.
#[inline(always)]
pub fn record_ack(ctx: &XdpContext, entry: *mut ConnEntry, pkt: &Packet) {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run (RCU).
    let e = unsafe { &mut *entry };
    if e.flags & CONN_F_RESET_IDLE == 0 || pkt.tcp_flags & TCP_ACK == 0 {
        return;
    }
    // The ACK number: bytes 8..12 of the TCP header.
    if let Some(p) = ptr_at::<u32>(ctx, pkt.l4_off + 8) {
        // SAFETY: bounds-checked by ptr_at.
        let ack = unsafe { p.read_unaligned() };
        if e.ack_be != ack {
            e.ack_be = ack;
        }
    }
}

/// Inserts both entries of a new flow to `backend_id`. With SNAT the reply entry's insert
/// allocates the SNAT address and port; with `passthrough` (DNAT only) the backend answers the
/// client's own address, so that is the reply key.
#[inline(always)]
pub fn create(pkt: &Packet, vip: &VipMeta, backend_id: u32) -> Result<(), Verdict> {
    let (listener_id, passthrough) = (vip.listener_id, vip.flags & VIP_F_PASSTHROUGH != 0);
    let exhausted = Verdict::drop(Counter::DropSnatExhausted);
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Counter::DropNoBackend))?;
    let flow = &pkt.flow;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let state = if flow.proto == PROTO_TCP {
        STATE_SYN_SENT
    } else {
        STATE_ESTABLISHED
    };
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
        state,
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
        CONNTRACK
            .insert(&reply, &e, BPF_NOEXIST as u64)
            .map_err(|_| exhausted)?;
    } else {
        allocate_snat(&mut reply, &e)?;
    }
    e.nat_src_be = reply.dst_be;
    e.nat_dst_be = backend.addr_be;
    e.nat_sport_be = reply.dport_be;
    e.nat_dport_be = backend.port_be;
    e.dir = DIR_ORIGINAL;
    if CONNTRACK.insert(flow, &e, 0).is_err() {
        let _ = CONNTRACK.remove(&reply);
        return Err(Verdict::drop(Counter::DropConntrackFull));
    }
    active_add(backend_id, 1);
    Ok(())
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

/// Picks a SNAT address (by a hash of the client's address and port) and port for `reply` (backend → SNAT) and inserts the
/// reply entry there. Keeps the client's port when it is in range (as Cilium does), otherwise
/// probes randomly; the insert with BPF_NOEXIST is the allocation, failing when the tuple is
/// taken.
#[inline(always)]
fn allocate_snat(reply: &mut FlowKey, e: &ConnEntry) -> Result<(), Verdict> {
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
    // The client's tuple, still in the key: it picks the address.
    let client_port = u16::from_be(reply.dport_be) as u32;
    let hash = addr_hash(&reply.dst_be) ^ client_port;
    // checked_rem: a plain `%` carries a divide-by-zero panic path the verifier rejects.
    reply.dst_be = *SNAT_ADDRS
        .get(start + hash.checked_rem(count).unwrap_or(0))
        .ok_or(exhausted)?;
    let (min, max) = (g.port_min as u32, g.port_max as u32);
    let span = max - min + 1;
    let mut port = if client_port >= min && client_port <= max {
        client_port
    } else {
        min + unsafe { bpf_get_prandom_u32() }
            .checked_rem(span)
            .unwrap_or(0)
    };
    for _ in 0..PORT_TRIES {
        reply.dport_be = (port as u16).to_be();
        if CONNTRACK.insert(&*reply, e, BPF_NOEXIST as u64).is_ok() {
            return Ok(());
        }
        port = min
            + unsafe { bpf_get_prandom_u32() }
                .checked_rem(span)
                .unwrap_or(0);
    }
    Err(exhausted)
}
