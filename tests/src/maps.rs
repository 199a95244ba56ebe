//! A running agent's BPF maps, found through its file descriptors (so concurrent agents never
//! mix): their memory, and its conntrack table, which tests and benchmarks fill with synthetic
//! established flows to put the table under pressure in seconds.

use std::net::Ipv4Addr;

use aya::{
    maps::{HashMap, Map, MapData, MapInfo},
    Pod,
};
use lb_common::{
    conn::{DIR_ORIGINAL, DIR_REPLY, STATE_ESTABLISHED},
    flow::{FAMILY_V4, PROTO_TCP},
    maps, ConnEntry, FlowKey, FlowKey4,
};

/// `(map id, memlock bytes)` of every BPF map the process holds a descriptor for.
fn map_fds(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, u64)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Some((field("map_id:")? as u32, field("memlock:").unwrap_or(0)))
        })
        .collect();
    out.sort_unstable();
    out.dedup_by_key(|m| m.0);
    out
}

/// Kernel memory charged to the agent's maps, in bytes (preallocated tables count in full).
pub fn memory(pid: u32) -> u64 {
    map_fds(pid).iter().map(|m| m.1).sum()
}

/// One of the agent's conntrack maps: `K` is `FlowKey4` for the IPv4 ones (`maps::CONNTRACK`,
/// `maps::CONNTRACK_SYN`), `FlowKey` for the IPv6 ones.
pub fn conntrack<K: Pod>(pid: u32, name: &str) -> HashMap<MapData, K, ConnEntry> {
    let id = map_fds(pid)
        .into_iter()
        .map(|(id, _)| id)
        .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some(name)))
        .unwrap_or_else(|| panic!("process {pid} holds no {name} map"));
    let map = Map::from_map_data(MapData::from_id(id).expect("open map by id")).expect(name);
    HashMap::try_from(map).expect("conntrack key and value types")
}

/// Entries (two per flow) in the agent's conntrack tables, both families: (established,
/// handshake).
pub fn conntrack_len(pid: u32) -> (usize, usize) {
    (
        distinct::<FlowKey4>(pid, maps::CONNTRACK) + distinct::<FlowKey>(pid, maps::CONNTRACK6),
        distinct::<FlowKey4>(pid, maps::CONNTRACK_SYN)
            + distinct::<FlowKey>(pid, maps::CONNTRACK6_SYN),
    )
}

/// Distinct keys: a walk restarts from the first key when the datapath deletes the current
/// one, so a busy table yields some keys twice.
fn distinct<K: Pod + Eq + std::hash::Hash>(pid: u32, name: &str) -> usize {
    let keys: std::collections::HashSet<K> = conntrack::<K>(pid, name)
        .keys()
        .filter_map(Result::ok)
        .collect();
    keys.len()
}

fn addr(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

/// Inserts `flows` established TCP flows (both entries each) for listener 0, seen just now:
/// clients from 100.64.0.0 up to `vip`, "backends" from 100.96.0.0 up (addresses nothing
/// uses, so no real flow's tuple or SNAT port is taken). Returns the flows inserted before
/// the first failure.
pub fn prefill_conntrack(pid: u32, flows: u32, vip: (Ipv4Addr, u16), snat: Ipv4Addr) -> u32 {
    let mut ct = conntrack::<FlowKey4>(pid, maps::CONNTRACK);
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    // The clock of conntrack timestamps, so the agent's sweep sees fresh flows.
    let now = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
    for i in 0..flows {
        let client = addr(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i));
        let backend = addr(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 96, 0, 0)) + i));
        let (sport, bport) = (40000u16.to_be(), 8080u16.to_be());
        let original = FlowKey {
            src_be: client,
            dst_be: addr(vip.0),
            sport_be: sport,
            dport_be: vip.1.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let entry = ConnEntry {
            last_seen_ns: now,
            nat_src_be: addr(snat),
            nat_dst_be: backend,
            nat_sport_be: sport,
            nat_dport_be: bport,
            // No real backend: the sweep's per-backend counts ignore unknown ids.
            backend_id: u32::MAX,
            state: STATE_ESTABLISHED,
            dir: DIR_ORIGINAL,
            ..ConnEntry::default()
        };
        let reply = ConnEntry {
            nat_src_be: original.dst_be,
            nat_dst_be: original.src_be,
            nat_sport_be: original.dport_be,
            nat_dport_be: original.sport_be,
            dir: DIR_REPLY,
            ..entry
        };
        let reply_key = entry.pair_key(PROTO_TCP, FAMILY_V4);
        if ct.insert(original.v4(), entry, 0).is_err()
            || ct.insert(reply_key.v4(), reply, 0).is_err()
        {
            return i;
        }
    }
    flows
}
