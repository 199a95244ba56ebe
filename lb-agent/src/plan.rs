//! Turns a validated [`Config`] into the contents of the datapath's maps. Pure: unit-testable
//! without a kernel.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    flow::{
        AddrBe, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_ACL_ALLOW, VIP_F_ACL_DENY,
        VIP_F_PASSTHROUGH, VIP_F_RESET_IDLE, VIP_F_SOURCE_IP, VIP_F_TOA, VIP_F_WLC, VIP_F_WRR,
    },
    Backend, GlobalConfig, VipKey,
};

use crate::{
    config::{ClientIp, Config, Protocol, Scheduler},
    health, maglev,
    overrides::Overrides,
    wrr,
};

#[cfg(test)]
mod tests;

/// Everything the datapath needs, with the ids its maps are indexed by.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub global: GlobalConfig,
    pub snat_addrs: Vec<AddrBe>,
    /// In config order, each with its id.
    pub backends: Vec<BackendPlan>,
    /// The tcp/udp listeners in config order, each with its id.
    pub listeners: Vec<ListenerPlan>,
}

impl Plan {
    /// How many listener ids the per-listener maps' counters are read for: up to the highest
    /// in use (ids of removed listeners may leave gaps).
    pub fn listener_slots(&self) -> usize {
        self.listeners
            .iter()
            .map(|l| l.id as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// The same for backends.
    pub fn backend_slots(&self) -> usize {
        self.backends
            .iter()
            .map(|b| b.id as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

/// The ids listeners (by name) and backends (by pool and address) have in the datapath's
/// maps. Kept across reloads, and restarts through the state directory: ids count traffic
/// per listener and backend and are written into every flow's entry, so a reload that
/// reorders or removes listeners or backends must not move them. New ones take ids no one
/// used before where there are any left, so they neither inherit a removed one's counters
/// nor its remaining flows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ids {
    pub listeners: Vec<(String, u32)>,
    pub backends: Vec<((String, SocketAddr), u32)>,
}

impl Ids {
    /// Ids for `config`'s tcp/udp listeners and backends, keeping those `previous` gave.
    pub fn assign(config: &Config, previous: &Ids) -> Ids {
        use lb_common::maps::{MAX_BACKENDS, MAX_LISTENERS};
        let listeners: Vec<String> = config
            .listeners
            .iter()
            .filter(|l| !l.protocol.is_l7())
            .map(|l| l.name.clone())
            .collect();
        let backends: Vec<(String, SocketAddr)> = config
            .pools
            .iter()
            .flat_map(|p| {
                p.backends
                    .iter()
                    .map(|b| (p.name.clone(), SocketAddr::new(b.address, b.port.0)))
            })
            .collect();
        Ids {
            listeners: allocate(listeners, &previous.listeners, MAX_LISTENERS),
            backends: allocate(backends, &previous.backends, MAX_BACKENDS),
        }
    }

    /// The ids given here to listeners and backends that did not have them in `previous`:
    /// their counters start from zero.
    pub fn fresh(&self, previous: &Ids) -> (Vec<u32>, Vec<u32>) {
        (
            fresh(&self.listeners, &previous.listeners),
            fresh(&self.backends, &previous.backends),
        )
    }

    fn listener(&self, name: &str) -> u32 {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |&(_, id)| id)
    }

    fn backend(&self, pool: &str, addr: SocketAddr) -> u32 {
        self.backends
            .iter()
            .find(|((p, a), _)| p == pool && *a == addr)
            .map_or(0, |&(_, id)| id)
    }
}

/// Ids for `keys` (validation keeps them fewer than `max`, and unique): what `previous` gave
/// each, else the lowest id neither taken nor used by `previous`, else the lowest not taken.
fn allocate<K: PartialEq>(keys: Vec<K>, previous: &[(K, u32)], max: u32) -> Vec<(K, u32)> {
    let kept: Vec<Option<u32>> = keys
        .iter()
        .map(|k| previous.iter().find(|(p, _)| p == k).map(|&(_, id)| id))
        .collect();
    let mut taken: Vec<u32> = kept.iter().flatten().copied().collect();
    let mut out = Vec::with_capacity(keys.len());
    for (k, kept) in keys.into_iter().zip(kept) {
        let id = kept.unwrap_or_else(|| {
            let free = |id: &u32| !taken.contains(id);
            let id = (0..max)
                .find(|id| free(id) && !previous.iter().any(|(_, p)| p == id))
                .or_else(|| (0..max).find(free))
                .unwrap_or(max - 1);
            taken.push(id);
            id
        });
        out.push((k, id));
    }
    out
}

fn fresh<K: PartialEq>(now: &[(K, u32)], previous: &[(K, u32)]) -> Vec<u32> {
    now.iter()
        .filter(|(k, id)| !previous.iter().any(|(p, pid)| p == k && pid == id))
        .map(|&(_, id)| id)
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendPlan {
    pub id: u32,
    pub pool: String,
    pub address: IpAddr,
    pub port: u16,
    pub slot: Backend,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerPlan {
    pub id: u32,
    pub name: String,
    pub key: VipKey,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Idle timeout of established flows.
    pub idle_timeout: std::time::Duration,
    /// Maglev table of backend ids; empty when no backend takes new flows.
    pub ring: Vec<u32>,
    /// ACL prefixes: (prefix length in bits, address) for the allow and deny tries.
    pub allow: Vec<(u32, AddrBe)>,
    pub deny: Vec<(u32, AddrBe)>,
}

/// A 16-byte, network-order address as the datapath keys it.
pub fn addr_be(a: IpAddr) -> AddrBe {
    match a {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

pub fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// The plan with every backend healthy (backups idle, since their primaries are up), the
/// configured weights and ids in config order.
pub fn build(config: &Config) -> Plan {
    let ids = Ids::assign(config, &Ids::default());
    build_with(config, &ids, &Overrides::default(), |_, _| true)
}

/// The plan for the backends `up(pool, backend)` says are healthy (indices into
/// `config.pools`), with the weights `overrides` gives them and the ids `ids` assigned
/// (from [`Ids::assign`] for this config). Unhealthy, drained and weight-0 backends and idle
/// backups keep their ids, so existing flows to them are untouched, but leave every
/// listener's table; a listener with no backend left gets an empty one.
pub fn build_with(
    config: &Config,
    ids: &Ids,
    overrides: &Overrides,
    up: impl Fn(usize, usize) -> bool,
) -> Plan {
    let mut global = GlobalConfig::default();
    let mut snat_addrs = Vec::new();
    if let Some(snat) = &config.snat {
        let v4: Vec<_> = snat.addresses.iter().filter(|a| a.is_ipv4()).collect();
        let v6: Vec<_> = snat.addresses.iter().filter(|a| a.is_ipv6()).collect();
        global.snat_v4_start = 0;
        global.snat_v4_count = v4.len() as u32;
        global.snat_v6_start = v4.len() as u32;
        global.snat_v6_count = v6.len() as u32;
        global.port_min = snat.ports.min;
        global.port_max = snat.ports.max;
        snat_addrs.extend(v4.into_iter().chain(v6).map(|a| addr_be(*a)));
    }

    let mut backends = Vec::new();
    // (name, member ids, members) per pool, in config order.
    let mut pools = Vec::new();
    for (p, pool) in config.pools.iter().enumerate() {
        let mut member_ids = Vec::new();
        let mut members = Vec::new();
        let weights: Vec<u32> = pool
            .backends
            .iter()
            .map(|b| overrides.weight(&pool.name, SocketAddr::new(b.address, b.port.0), b.weight))
            .collect();
        let backup: Vec<bool> = pool.backends.iter().map(|b| b.backup).collect();
        let available: Vec<bool> = (0..pool.backends.len())
            .map(|i| up(p, i) && weights[i] > 0)
            .collect();
        let serving = health::serving(&backup, &available);
        for ((b, serving), weight) in pool.backends.iter().zip(serving).zip(weights) {
            members.push(maglev::Member {
                key: maglev::member_key(b.address, b.port.0),
                // Weight 0 keeps the member's identity (and so everyone else's slots) stable.
                weight: if serving { weight } else { 0 },
            });
            let id = ids.backend(&pool.name, SocketAddr::new(b.address, b.port.0));
            member_ids.push(id);
            backends.push(BackendPlan {
                id,
                pool: pool.name.clone(),
                address: b.address,
                port: b.port.0,
                slot: Backend {
                    addr_be: addr_be(b.address),
                    port_be: b.port.0.to_be(),
                    family: family(b.address),
                    _pad: 0,
                    weight,
                },
            });
        }
        pools.push((pool.name.as_str(), member_ids, members));
    }

    // http/https listeners are the proxy's: without a VIP entry, the XDP program passes their
    // traffic to the kernel, where the proxy listens.
    let listeners = config
        .listeners
        .iter()
        .filter(|l| !l.protocol.is_l7())
        .map(|l| {
            let ring = pools
                .iter()
                .find(|(name, ..)| Some(*name) == l.pool.as_deref())
                .map(|(_, member_ids, members)| {
                    let slots = match l.scheduler() {
                        // Every table below is empty when no member has a weight.
                        Scheduler::Wrr => {
                            let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
                            wrr::sequence(&weights, lb_common::maps::MAX_RING)
                        }
                        Scheduler::Maglev | Scheduler::SourceIp => {
                            maglev::build(members, l.table_size)
                        }
                        // The pool itself; the datapath picks by live counts.
                        Scheduler::Wlc => (0..members.len() as u32)
                            .filter(|&i| members[i as usize].weight > 0)
                            .collect(),
                    };
                    slots.into_iter().map(|i| member_ids[i as usize]).collect()
                })
                .unwrap_or_default();
            let prefixes = |nets: &[ipnetwork::IpNetwork]| -> Vec<(u32, AddrBe)> {
                nets.iter()
                    .map(|n| (n.prefix() as u32, addr_be(n.network())))
                    .collect()
            };
            let (allow, deny) = (prefixes(&l.acl.allow), prefixes(&l.acl.deny));
            let mut flags = 0;
            flags |= match l.scheduler() {
                Scheduler::Maglev => 0,
                Scheduler::SourceIp => VIP_F_SOURCE_IP,
                Scheduler::Wrr => VIP_F_WRR,
                Scheduler::Wlc => VIP_F_WLC,
            };
            flags |= match l.client_ip {
                ClientIp::Snat => 0,
                ClientIp::Toa => VIP_F_TOA,
                ClientIp::Passthrough => VIP_F_PASSTHROUGH,
            };
            if l.reset_on_idle {
                flags |= VIP_F_RESET_IDLE;
            }
            if !allow.is_empty() {
                flags |= VIP_F_ACL_ALLOW;
            }
            if !deny.is_empty() {
                flags |= VIP_F_ACL_DENY;
            }
            ListenerPlan {
                id: ids.listener(&l.name),
                name: l.name.clone(),
                flags,
                idle_timeout: l.idle_timeout(),
                allow,
                deny,
                key: VipKey {
                    addr_be: addr_be(l.vip),
                    port_be: l.port.0.to_be(),
                    proto: match l.protocol {
                        Protocol::Udp => PROTO_UDP,
                        Protocol::Tcp | Protocol::Http | Protocol::Https => PROTO_TCP,
                    },
                    family: family(l.vip),
                },
                ring,
            }
        })
        .collect();

    Plan {
        global,
        snat_addrs,
        backends,
        listeners,
    }
}
