//! The `/status` model: listeners → pools → backends with health, weights, flows and
//! counters, built from one moment's state. The CLI (`lb-agent status | stats | diagnose`)
//! reads it back, so it derives both directions of serde.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
};

use lb_common::{
    counters::{BackendStats, ListenerStats},
    flow::AddrBe,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    dataplane::Snapshot,
    gc,
    health::{self, Health, State},
    overrides::Overrides,
    plan::Plan,
    proxy::metrics::RequestStats,
    proxy::upstream::down_for,
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: Agent,
    /// Packets by the datapath's verdict reason (every packet counts once), since the program
    /// was loaded.
    pub packets: BTreeMap<String, u64>,
    pub conntrack: Conntrack,
    /// Per SNAT address.
    pub snat: Vec<Snat>,
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub version: String,
    /// The config file the agent runs (diagnose reads it for what the status does not say).
    pub config: PathBuf,
    pub interfaces: Vec<String>,
}

/// Entries at the last sweep (two per flow) and how many the tables hold, in all and per
/// table (`gc::TABLES`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Conntrack {
    pub entries: u64,
    pub capacity: u64,
    #[serde(default)]
    pub tables: Vec<ConntrackTable>,
}

/// One conntrack table: its name in `gc::TABLES`, entries at the last sweep, capacity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConntrackTable {
    pub table: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snat {
    pub address: IpAddr,
    /// Ports held by flows, over all backends, at the last sweep.
    pub ports_in_use: u64,
    /// Ports held towards the busiest backend: a port is unique per SNAT address and
    /// backend, so this is what runs out first, at `port_range`.
    pub busiest_backend_ports: u64,
    pub port_range: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub protocol: String,
    pub address: SocketAddr,
    /// tcp/udp listeners: the datapath's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
    /// http/https listeners: requests answered (any status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// The listener's pool, then those its routes name.
    pub pools: Vec<Pool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub address: SocketAddr,
    /// `draining` while its weight is 0 (configured, or set or drained through the admin
    /// API), whatever its probes say; else what they say.
    pub health: HealthState,
    /// Passes its health checks (or has none), drained or not.
    pub up: bool,
    /// Why the last failing probe failed.
    pub reason: Option<String>,
    pub probe_latency_ms: Option<f64>,
    /// What new flows and requests see: 0 while drained.
    pub weight: u32,
    pub configured_weight: u32,
    pub drained: bool,
    pub backup: bool,
    /// Takes new flows and requests now: up, weight above 0, and a primary (or a backup while
    /// no primary is).
    pub serving: bool,
    /// For this many more seconds the L7 proxy sends it no new requests: a connect to it
    /// failed (refused or timed out), as nginx's `max_fails=1 fail_timeout=10s` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7_backoff_s: Option<f64>,
    /// The datapath's counters for this pool's backend (tcp/udp listeners only).
    pub traffic: Traffic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Healthy,
    Unhealthy,
    /// Probed, no success yet: offline.
    Pending,
    /// The pool has no health check: always online.
    Unchecked,
    /// Weight 0: takes no new flows or requests, finishes those it has.
    Draining,
}

impl HealthState {
    pub const ALL: [HealthState; 5] = [
        HealthState::Healthy,
        HealthState::Unhealthy,
        HealthState::Pending,
        HealthState::Unchecked,
        HealthState::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Pending => "pending",
            HealthState::Unchecked => "unchecked",
            HealthState::Draining => "draining",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    /// Live flows at the last conntrack sweep.
    pub active_flows: u64,
}

impl Traffic {
    fn of(s: &ListenerStats, active_flows: u64) -> Self {
        Self {
            packets_in: s.packets_in,
            bytes_in: s.bytes_in,
            packets_out: s.packets_out,
            bytes_out: s.bytes_out,
            new_flows: s.new_flows,
            active_flows,
        }
    }
}

/// Everything a status is made of, at one moment.
pub struct Inputs<'a> {
    pub config_path: &'a Path,
    pub config: &'a Config,
    pub plan: &'a Plan,
    pub overrides: &'a Overrides,
    pub health: &'a Health,
    pub sweep: &'a gc::Report,
    /// Global counters and per-listener traffic (indexed by listener id).
    pub counters: &'a Snapshot,
    /// Indexed by backend id.
    pub backends: &'a [BackendStats],
    /// One per http/https listener, in config order.
    pub requests: &'a [Arc<RequestStats>],
}

impl Status {
    pub fn build(i: &Inputs) -> Self {
        let listeners = i
            .config
            .listeners
            .iter()
            .map(|l| {
                let mut pools: Vec<&str> = l.pool.iter().map(String::as_str).collect();
                for r in &l.routes {
                    if !pools.contains(&r.pool.as_str()) {
                        pools.push(&r.pool);
                    }
                }
                let id = i
                    .plan
                    .listeners
                    .iter()
                    .find(|p| p.name == l.name)
                    .map(|p| p.id as usize);
                Listener {
                    name: l.name.clone(),
                    protocol: l.protocol.to_string(),
                    address: SocketAddr::new(l.vip, l.port.0),
                    traffic: id.map(|id| {
                        Traffic::of(
                            i.counters.listeners.get(id).unwrap_or(&Default::default()),
                            i.sweep.active.get(id).copied().unwrap_or(0),
                        )
                    }),
                    requests: i
                        .requests
                        .iter()
                        .find(|r| r.listener == l.name)
                        .map(|r| r.total()),
                    pools: pools.into_iter().map(|p| pool(i, p)).collect(),
                }
            })
            .collect();
        let g = &i.plan.global;
        let port_range = if g.port_max >= g.port_min && !i.plan.snat_addrs.is_empty() {
            u64::from(g.port_max - g.port_min) + 1
        } else {
            0
        };
        let snat = i
            .plan
            .snat_addrs
            .iter()
            .enumerate()
            .map(|(n, a)| {
                let used = i.sweep.snat.get(n).cloned().unwrap_or_default();
                Snat {
                    address: ip_of(a, n as u32 >= g.snat_v6_start && g.snat_v6_count > 0),
                    ports_in_use: used.in_use,
                    busiest_backend_ports: used.busiest_backend,
                    port_range,
                }
            })
            .collect();
        Status {
            agent: Agent {
                version: env!("CARGO_PKG_VERSION").into(),
                config: i.config_path.into(),
                interfaces: i.config.agent.interfaces.clone(),
            },
            packets: i
                .counters
                .counters
                .iter()
                .map(|(c, n)| (c.name().to_string(), *n))
                .collect(),
            conntrack: Conntrack {
                entries: i.sweep.entries as u64,
                capacity: gc::TABLES.iter().map(|(_, c)| u64::from(*c)).sum(),
                tables: gc::TABLES
                    .iter()
                    .zip(i.sweep.tables)
                    .map(|((table, capacity), entries)| ConntrackTable {
                        table: table.to_string(),
                        entries: entries as u64,
                        capacity: (*capacity).into(),
                    })
                    .collect(),
            },
            snat,
            listeners,
        }
    }

    /// Every pool some listener uses, once, in the order they first appear.
    pub fn pools(&self) -> Vec<&Pool> {
        let mut out: Vec<&Pool> = Vec::new();
        for p in self.listeners.iter().flat_map(|l| &l.pools) {
            if !out.iter().any(|o| o.name == p.name) {
                out.push(p);
            }
        }
        out
    }

    /// A backend of a pool some listener uses.
    pub fn backend(&self, pool: &str, address: SocketAddr) -> Option<&Backend> {
        self.pools()
            .into_iter()
            .filter(|p| p.name == pool)
            .flat_map(|p| &p.backends)
            .find(|b| b.address == address)
    }
}

fn pool(i: &Inputs, name: &str) -> Pool {
    let members = i.health.pool(name);
    let weights: Vec<u32> = members.iter().map(|m| m.weight_now()).collect();
    let backup: Vec<bool> = members.iter().map(|m| m.backup).collect();
    let available: Vec<bool> = members
        .iter()
        .zip(&weights)
        .map(|(m, w)| m.is_up() && *w > 0)
        .collect();
    let serving = health::serving(&backup, &available);
    // Backend ids: the datapath counts by them.
    let ids: HashMap<SocketAddr, usize> = i
        .plan
        .backends
        .iter()
        .filter(|b| b.pool == name)
        .map(|b| (SocketAddr::new(b.address, b.port), b.id as usize))
        .collect();
    let backends = members
        .iter()
        .zip(weights)
        .zip(serving)
        .map(|((m, weight), serving)| {
            let status = m.status();
            let id = ids.get(&m.addr).copied();
            let stats = id.and_then(|id| i.backends.get(id)).copied();
            let active = id.and_then(|id| i.sweep.backend_active.get(id)).copied();
            Backend {
                address: m.addr,
                health: match (weight, m.checked, status.state) {
                    (0, ..) => HealthState::Draining,
                    (_, false, _) => HealthState::Unchecked,
                    (_, true, State::Pending) => HealthState::Pending,
                    (_, true, State::Healthy) => HealthState::Healthy,
                    (_, true, State::Unhealthy) => HealthState::Unhealthy,
                },
                up: m.is_up(),
                reason: status.reason,
                probe_latency_ms: status.latency.map(|l| l.as_secs_f64() * 1e3),
                weight,
                configured_weight: m.weight,
                drained: i.overrides.get(name, m.addr).drained,
                backup: m.backup,
                serving,
                l7_backoff_s: down_for(m.l7_down_until_ms().load(Ordering::Relaxed))
                    .map(|d| d.as_secs_f64()),
                traffic: Traffic::of(&stats.unwrap_or_default(), active.unwrap_or(0)),
            }
        })
        .collect();
    Pool {
        name: name.into(),
        backends,
    }
}

/// The address a datapath key holds (the inverse of `plan::addr_be`).
fn ip_of(a: &AddrBe, v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        for (chunk, w) in o.chunks_exact_mut(4).zip(a) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()))
    }
}

#[cfg(test)]
mod tests;
