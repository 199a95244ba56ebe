//! Turns a validated [`Config`] into the contents of the datapath's maps. Pure: unit-testable
//! without a kernel.

use std::net::IpAddr;

use lb_common::{
    flow::{AddrBe, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP},
    Backend, GlobalConfig, VipKey,
};

use crate::{
    config::{Config, Protocol},
    maglev,
};

/// Everything the datapath needs, indexed the way its maps are.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub global: GlobalConfig,
    pub snat_addrs: Vec<AddrBe>,
    /// Indexed by backend id.
    pub backends: Vec<BackendPlan>,
    /// Indexed by listener id.
    pub listeners: Vec<ListenerPlan>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendPlan {
    pub pool: String,
    pub address: IpAddr,
    pub port: u16,
    pub slot: Backend,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerPlan {
    pub name: String,
    pub key: VipKey,
    /// Maglev table of backend ids; empty when no backend takes new flows.
    pub ring: Vec<u32>,
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

pub fn build(config: &Config) -> Plan {
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
    // (first id, members) per pool, in config order.
    let mut pools = Vec::new();
    for pool in &config.pools {
        let first = backends.len() as u32;
        let mut members = Vec::new();
        for b in &pool.backends {
            members.push(maglev::Member {
                key: maglev::member_key(b.address, b.port.0),
                weight: b.weight,
            });
            backends.push(BackendPlan {
                pool: pool.name.clone(),
                address: b.address,
                port: b.port.0,
                slot: Backend {
                    addr_be: addr_be(b.address),
                    port_be: b.port.0.to_be(),
                    family: family(b.address),
                    _pad: 0,
                },
            });
        }
        pools.push((pool.name.as_str(), first, members));
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
                .map(|(_, first, members)| {
                    maglev::build(members, maglev::DEFAULT_TABLE_SIZE)
                        .into_iter()
                        .map(|i| first + i)
                        .collect()
                })
                .unwrap_or_default();
            ListenerPlan {
                name: l.name.clone(),
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
