//! Connection tracking: one shared LRU map, an original and a reply entry per flow (see
//! `lb_common::conn`). New flows get a SNAT address and port here.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    conn::{tcp_next_state, DIR_ORIGINAL, DIR_REPLY, STATE_ESTABLISHED, STATE_SYN_SENT},
    counters::Counter,
    flow::{FAMILY_V4, PROTO_TCP},
    hash::flow_hash,
    ConnEntry, FlowKey,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, GLOBAL, SNAT_ADDRS},
    parse::Packet,
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

/// Advances the TCP state (in both entries of the flow) and refreshes the timestamp.
#[inline(always)]
pub fn touch(entry: *mut ConnEntry, pkt: &Packet) {
    // SAFETY: a pointer from a successful map lookup stays valid for this program run (RCU).
    let e = unsafe { &mut *entry };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut refresh = now.wrapping_sub(e.last_seen_ns) > TOUCH_INTERVAL_NS;
    if pkt.flow.proto == PROTO_TCP {
        let next = tcp_next_state(e.state, e.dir, pkt.tcp_flags);
        if next != e.state {
            // Transitions are rare (handshake, FIN, RST), so the pair lookup costs little.
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
}

/// Allocates a SNAT address and port for a new flow to `backend_id` and inserts both entries.
#[inline(always)]
pub fn create(pkt: &Packet, listener_id: u32, backend_id: u32) -> Result<(), Verdict> {
    let exhausted = Verdict::drop(Counter::DropSnatExhausted);
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Counter::DropNoBackend))?;
    let g = GLOBAL.get(0).ok_or(exhausted)?;
    let flow = &pkt.flow;
    let (start, count) = if flow.family == FAMILY_V4 {
        (g.snat_v4_start, g.snat_v4_count)
    } else {
        (g.snat_v6_start, g.snat_v6_count)
    };
    if count == 0 || g.port_max < g.port_min {
        return Err(exhausted);
    }
    let hash = flow_hash(flow);
    // checked_rem: a plain `%` carries a divide-by-zero panic path the verifier rejects.
    let snat = *SNAT_ADDRS
        .get(start + hash.checked_rem(count).unwrap_or(0))
        .ok_or(exhausted)?;

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
        ..ConnEntry::default()
    };
    let mut reply = FlowKey {
        src_be: backend.addr_be,
        dst_be: snat,
        sport_be: backend.port_be,
        dport_be: 0,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    // Keep the client's port when it is in range (as Cilium does), otherwise probe randomly.
    // The reply insert with BPF_NOEXIST is the allocation: it fails when the tuple is taken.
    let (min, max) = (g.port_min as u32, g.port_max as u32);
    let span = max - min + 1;
    let client_port = u16::from_be(flow.sport_be) as u32;
    let mut port = if client_port >= min && client_port <= max {
        client_port
    } else {
        min + unsafe { bpf_get_prandom_u32() }
            .checked_rem(span)
            .unwrap_or(0)
    };
    let mut found = false;
    for _ in 0..PORT_TRIES {
        reply.dport_be = (port as u16).to_be();
        if CONNTRACK.insert(&reply, &e, BPF_NOEXIST as u64).is_ok() {
            found = true;
            break;
        }
        port = min
            + unsafe { bpf_get_prandom_u32() }
                .checked_rem(span)
                .unwrap_or(0);
    }
    if !found {
        return Err(exhausted);
    }

    e.nat_src_be = snat;
    e.nat_dst_be = backend.addr_be;
    e.nat_sport_be = reply.dport_be;
    e.nat_dport_be = backend.port_be;
    e.dir = DIR_ORIGINAL;
    if CONNTRACK.insert(flow, &e, 0).is_err() {
        let _ = CONNTRACK.remove(&reply);
        return Err(Verdict::drop(Counter::DropConntrackFull));
    }
    Ok(())
}
