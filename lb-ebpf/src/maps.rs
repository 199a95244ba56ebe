//! Map definitions. Statics are named exactly like the `lb_common::maps` constants the agent
//! uses to find them.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    conn::CachedFlow,
    counters::{BackendStats, ListenerStats, COUNTER_COUNT},
    flow::AddrBe,
    maps::{
        CONNTRACK6_ENTRIES, CONNTRACK6_SYN_ENTRIES, CONNTRACK_ENTRIES, CONNTRACK_SYN_ENTRIES,
        FLOW_CACHE_SLOTS, FLOW_GEN_SLOTS, MAX_ACL_ENTRIES, MAX_BACKENDS, MAX_LISTENERS,
        MAX_SNAT_ADDRS, RING_ENTRIES,
    },
    AclKey, Backend, ConnEntry, FlowKey, FlowKey4, GlobalConfig, VipKey, VipMeta,
};

#[map]
pub static VIPS: aya_ebpf::maps::HashMap<VipKey, VipMeta> =
    aya_ebpf::maps::HashMap::with_max_entries(MAX_LISTENERS, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static RING: Array<u32> = Array::with_max_entries(RING_ENTRIES, 0);

/// Shared (not per-CPU): a reply may arrive on another CPU than the request. Established
/// flows, UDP flows and TCP flows closing after their handshake; IPv4 here, IPv6 in
/// `CONNTRACK6`.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey4, ConnEntry> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// TCP flows until the client completes the handshake, then moved to `CONNTRACK` (see
/// `conntrack`).
#[map]
pub static CONNTRACK_SYN: LruHashMap<FlowKey4, ConnEntry> =
    LruHashMap::with_max_entries(CONNTRACK_SYN_ENTRIES, 0);

#[map]
pub static CONNTRACK6: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(CONNTRACK6_ENTRIES, 0);

#[map]
pub static CONNTRACK6_SYN: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(CONNTRACK6_SYN_ENTRIES, 0);

#[map]
pub static SNAT_ADDRS: Array<AddrBe> = Array::with_max_entries(MAX_SNAT_ADDRS, 0);

#[map]
pub static GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub static LISTENER_STATS: PerCpuArray<ListenerStats> =
    PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

/// Per-backend traffic and new flows, indexed by backend id (a backend of two pools has two
/// ids, so these are per pool and backend).
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// aya-ebpf adds the BPF_F_NO_PREALLOC that LPM tries require.
#[map]
pub static ACL_ALLOW: LpmTrie<AclKey, u8> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

#[map]
pub static ACL_DENY: LpmTrie<AclKey, u8> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

/// Per-CPU round-robin position per listener: no shared cursor for CPUs to fight over.
#[map]
pub static WRR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

/// Live (not closing) flows per backend id: incremented when a flow is created, decremented
/// when it closes, and set to the exact count by the agent's sweep every second (which also
/// accounts for flows that expired without closing).
#[map]
pub static BACKEND_ACTIVE: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Each CPU's copies of established flows' entries (see `flowcache`).
#[map]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Generations of flow-cache tuples, bumped when a flow with such a tuple is created or retired.
#[map]
pub static FLOW_GEN: Array<u32> = Array::with_max_entries(FLOW_GEN_SLOTS, 0);

/// Slot 0: `lb_xdp_full`, the pipeline `lb_xdp` tail-calls for packets its fast path does not
/// take (set by the agent after loading).
#[map]
pub static PIPELINE: ProgramArray = ProgramArray::with_max_entries(1, 0);
