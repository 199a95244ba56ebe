//! The YAML topology: serde model, validation, and errors that name `file:line:column`.
//!
//! Loading is `load` → `parse` (serde_yaml, unknown fields rejected) → `validate` (cross-field
//! rules and facts about this host). Every error is a [`ConfigError::Invalid`] carrying the
//! position of the offending node, found through [`locate::Positions`].

mod locate;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};

pub use locate::{Position, Positions};

/// Largest backend weight accepted.
pub const MAX_WEIGHT: u32 = 65535;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{}:{}: {message}", at.line, at.column)]
    Invalid {
        file: String,
        at: Position,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    /// FullNAT local addresses: the source the backends see. Required for tcp/udp listeners.
    #[serde(default)]
    pub snat: Option<SnatConfig>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub pools: Vec<Pool>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Interfaces the XDP program attaches to (one for a one-arm LB).
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver (native) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
    /// Native, falling back to generic where the driver has no XDP support.
    #[default]
    Auto,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    pub addresses: Vec<IpAddr>,
    /// Source ports for FullNAT flows, `MIN-MAX` inclusive. Reserved on the host
    /// (`ip_local_reserved_ports`) so the kernel's own sockets never take them.
    #[serde(default)]
    pub ports: PortRange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            min: 20000,
            max: 60000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: Port,
    pub pool: String,
    /// How new flows pick a backend (established flows never move).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Maglev table size: a prime up to 65537.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// How long an established flow may be idle before its state is dropped. Default: TCP
    /// 900 s, UDP 300 s (the vendors' values).
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Client address filter; `deny` wins over `allow`; an empty `allow` admits everyone.
    #[serde(default)]
    pub acl: Acl,
    /// What source address the backends see.
    #[serde(default)]
    pub client_ip: ClientIp,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientIp {
    /// FullNAT: a SNAT address; replies return to the LB by plain routing.
    #[default]
    Snat,
    /// FullNAT, with the client's address and port in TCP option 254 (as LVS/DPVS do).
    Toa,
    /// DNAT only: the backend sees the client; its route back must go through the LB.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing on the 5-tuple.
    #[default]
    Maglev,
    /// Consistent hashing on the client address only: one client, one backend while it is up
    /// (the vendors' source-IP algorithm and L4 session persistence).
    SourceIp,
    /// Weighted round robin: new flows take turns in proportion to the weights.
    Wrr,
    /// Weighted least connections: a new flow goes to the backend with the fewest active
    /// flows per unit of weight.
    Wlc,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    #[serde(default)]
    pub allow: Vec<ipnetwork::IpNetwork>,
    #[serde(default)]
    pub deny: Vec<ipnetwork::IpNetwork>,
}

fn default_table_size() -> u32 {
    lb_common::maps::MAX_RING
}

/// A duration as `90s`, `15m`, `1h 30m` (humantime), or a bare number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let parsed = match Raw::deserialize(d)? {
        Raw::Seconds(s) => Duration::from_secs(s),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            de::Error::custom(format!("`{t}` is not a duration ({e}); e.g. 900s or 15m"))
        })?,
    };
    if parsed.is_zero() {
        return Err(de::Error::custom("a duration must be above zero"));
    }
    Ok(Some(parsed))
}

impl Listener {
    /// `idle_timeout`, or the protocol's default.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(match self.protocol {
            Protocol::Tcp => Duration::from_secs(900),
            Protocol::Udp => Duration::from_secs(300),
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: Port,
    /// Share of new connections; 0 drains (no new connections, existing ones continue).
    #[serde(default = "default_weight", deserialize_with = "weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let w = i64::deserialize(d)?;
    u32::try_from(w)
        .ok()
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| de::Error::custom(format!("weight {w} is out of range 0-{MAX_WEIGHT}")))
}

/// A TCP/UDP port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = i64::deserialize(d)?;
        match u16::try_from(p) {
            Ok(p) if p != 0 => Ok(Port(p)),
            _ => Err(de::Error::custom(format!("{p} is not a valid port"))),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port range (expected MIN-MAX, e.g. 20000-60000)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let parse = |x: &str| x.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let (min, max) = (parse(a).ok_or_else(bad)?, parse(b).ok_or_else(bad)?);
        if min > max {
            return Err(format!(
                "port range {min}-{max} is empty (MIN is above MAX)"
            ));
        }
        Ok(PortRange { min, max })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What validation needs to know about the machine. `None` fields skip that check.
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub addresses: Option<Vec<IpAddr>>,
    pub interfaces: Option<Vec<String>>,
}

impl Host {
    /// The addresses and interfaces of the current network namespace.
    pub fn current() -> Result<Self, std::io::Error> {
        let mut addresses = Vec::new();
        let mut interfaces = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs()? {
            if !interfaces.contains(&ifa.interface_name) {
                interfaces.push(ifa.interface_name.clone());
            }
            let Some(addr) = ifa.address else { continue };
            if let Some(a) = addr.as_sockaddr_in() {
                addresses.push(IpAddr::V4(a.ip()));
            } else if let Some(a) = addr.as_sockaddr_in6() {
                addresses.push(IpAddr::V6(a.ip()));
            }
        }
        Ok(Self {
            addresses: Some(addresses),
            interfaces: Some(interfaces),
        })
    }
}

/// Reads, parses and validates `path` against the current host.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let host = Host::current().map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&path.display().to_string(), &text, &host)
}

/// Parses and validates `text`; `file` only names it in errors.
pub fn parse(file: &str, text: &str, host: &Host) -> Result<Config, ConfigError> {
    let invalid = |at, message| ConfigError::Invalid {
        file: file.to_string(),
        at,
        message,
    };
    let positions = Positions::index(text);
    let config: Config = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = match (path.as_str(), inner.location()) {
                // Syntax errors and the like: serde_yaml knows best where it stopped.
                (".", Some(l)) => Position {
                    line: l.line(),
                    column: l.column(),
                },
                _ => positions.of(&path),
            };
            invalid(at, yaml_message(&path, &inner))
        })?;
    config
        .validate(host)
        .map_err(|(path, message)| invalid(positions.of(&path), format!("{path}: {message}")))?;
    Ok(config)
}

/// `path: message`, without serde_yaml's own (coarser) path prefix and its position suffix.
fn yaml_message(path: &str, e: &serde_yaml::Error) -> String {
    let mut msg = e.to_string();
    if let Some(l) = e.location() {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = msg.strip_suffix(&suffix) {
            msg.truncate(stripped.len());
        }
    }
    if let Some((prefix, rest)) = msg.split_once(": ") {
        if !prefix.contains(' ') && path.starts_with(prefix) {
            msg = rest.to_string();
        }
    }
    if path == "." {
        msg
    } else {
        format!("{path}: {msg}")
    }
}

/// A validation failure: the serde_yaml-style path of the node, and what is wrong.
type Invalid = (String, String);

impl Config {
    fn validate(&self, host: &Host) -> Result<(), Invalid> {
        use lb_common::maps::{MAX_BACKENDS, MAX_LISTENERS, MAX_SNAT_ADDRS};

        if self.agent.interfaces.is_empty() {
            return Err((
                "agent.interfaces".into(),
                "at least one interface is needed".into(),
            ));
        }
        for (i, name) in self.agent.interfaces.iter().enumerate() {
            let path = format!("agent.interfaces[{i}]");
            if self.agent.interfaces[..i].contains(name) {
                return Err((path, format!("interface `{name}` is listed twice")));
            }
            if let Some(ifs) = &host.interfaces {
                if !ifs.contains(name) {
                    return Err((
                        path,
                        format!("interface `{name}` does not exist on this host"),
                    ));
                }
            }
        }

        let mut pools = HashMap::new();
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.name.is_empty() {
                return Err((format!("pools[{i}].name"), "must not be empty".into()));
            }
            if pools.insert(pool.name.as_str(), (i, pool)).is_some() {
                return Err((
                    format!("pools[{i}].name"),
                    format!("duplicate pool name `{}`", pool.name),
                ));
            }
            if pool.backends.is_empty() {
                return Err((
                    format!("pools[{i}].backends"),
                    format!("pool `{}` has no backends", pool.name),
                ));
            }
            let mut seen = HashSet::new();
            for (j, b) in pool.backends.iter().enumerate() {
                if !seen.insert((b.address, b.port)) {
                    return Err((
                        format!("pools[{i}].backends[{j}]"),
                        format!(
                            "backend {} is listed twice in pool `{}`",
                            sock(b.address, b.port),
                            pool.name
                        ),
                    ));
                }
            }
        }
        let backend_count: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        if backend_count > MAX_BACKENDS as usize {
            return Err((
                "pools".into(),
                format!("{backend_count} backends exceed the limit of {MAX_BACKENDS}"),
            ));
        }

        if self.listeners.len() > MAX_LISTENERS as usize {
            return Err((
                "listeners".into(),
                format!("at most {MAX_LISTENERS} listeners are supported"),
            ));
        }
        let mut names = HashMap::new();
        let mut triples = HashMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() {
                return Err((format!("listeners[{i}].name"), "must not be empty".into()));
            }
            if let Some(first) = names.insert(l.name.as_str(), i) {
                return Err((
                    format!("listeners[{i}].name"),
                    format!(
                        "duplicate listener name `{}` (also listeners[{first}])",
                        l.name
                    ),
                ));
            }
            if let Some(first) = triples.insert((l.vip, l.port, l.protocol), i) {
                return Err((
                    format!("listeners[{i}].port"),
                    format!(
                        "{}/{} is already used by listener `{}`",
                        sock(l.vip, l.port),
                        l.protocol,
                        self.listeners[first].name
                    ),
                ));
            }
            if !is_prime(l.table_size) || l.table_size > lb_common::maps::MAX_RING {
                return Err((
                    format!("listeners[{i}].table_size"),
                    format!(
                        "{} is not a prime up to {}",
                        l.table_size,
                        lb_common::maps::MAX_RING
                    ),
                ));
            }
            for (kind, list) in [("allow", &l.acl.allow), ("deny", &l.acl.deny)] {
                for (j, net) in list.iter().enumerate() {
                    if net.is_ipv4() != l.vip.is_ipv4() {
                        return Err((
                            format!("listeners[{i}].acl.{kind}[{j}]"),
                            format!("{net} is not of the {} listener's family", family(l.vip)),
                        ));
                    }
                }
            }
            let Some((p, pool)) = pools.get(l.pool.as_str()) else {
                return Err((
                    format!("listeners[{i}].pool"),
                    format!("pool `{}` does not exist", l.pool),
                ));
            };
            let max_wlc = lb_common::maps::MAX_WLC_BACKENDS as usize;
            if l.scheduler == Scheduler::Wlc && pool.backends.len() > max_wlc {
                return Err((
                    format!("listeners[{i}].scheduler"),
                    format!(
                        "wlc handles pools of at most {max_wlc} backends; `{}` has {}",
                        pool.name,
                        pool.backends.len()
                    ),
                ));
            }
            for (j, b) in pool.backends.iter().enumerate() {
                if b.address.is_ipv4() != l.vip.is_ipv4() {
                    return Err((
                        format!("pools[{p}].backends[{j}].address"),
                        format!(
                            "{} backend {} cannot serve {} listener `{}` (no 6-to-4 translation at L4)",
                            family(b.address),
                            b.address,
                            family(l.vip),
                            l.name
                        ),
                    ));
                }
            }
            if l.client_ip == ClientIp::Toa && (l.protocol != Protocol::Tcp || !l.vip.is_ipv4()) {
                return Err((
                    format!("listeners[{i}].client_ip"),
                    "`toa` carries an IPv4 client in a TCP option: it needs an IPv4 tcp listener"
                        .into(),
                ));
            }
            if l.client_ip == ClientIp::Passthrough {
                continue;
            }
            let snat = self.snat.as_ref().ok_or_else(|| {
                (
                    format!("listeners[{i}]"),
                    format!(
                        "{} listener `{}` needs `snat` addresses",
                        l.protocol, l.name
                    ),
                )
            })?;
            if !snat
                .addresses
                .iter()
                .any(|a| a.is_ipv4() == l.vip.is_ipv4())
            {
                return Err((
                    "snat.addresses".into(),
                    format!(
                        "{} listener `{}` needs an {} SNAT address",
                        family(l.vip),
                        l.name,
                        family(l.vip)
                    ),
                ));
            }
        }

        if let Some(snat) = &self.snat {
            if snat.addresses.len() > MAX_SNAT_ADDRS as usize {
                return Err((
                    "snat.addresses".into(),
                    format!("at most {MAX_SNAT_ADDRS} addresses"),
                ));
            }
            for (i, a) in snat.addresses.iter().enumerate() {
                let path = format!("snat.addresses[{i}]");
                if snat.addresses[..i].contains(a) {
                    return Err((path, format!("{a} is listed twice")));
                }
                if let Some(addrs) = &host.addresses {
                    if !addrs.contains(a) {
                        return Err((path, format!("{a} is not an address of this host")));
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_prime(n: u32) -> bool {
    let n = n as u64;
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// `addr:port`, with brackets for IPv6.
pub fn sock(a: IpAddr, p: Port) -> String {
    std::net::SocketAddr::new(a, p.0).to_string()
}
