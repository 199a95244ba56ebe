//! The YAML topology: serde model, validation, and errors that name `file:line:column`.
//!
//! Loading is `load` → `parse` (serde_yaml, unknown fields rejected) → `validate` (cross-field
//! rules and facts about this host). Every error is a [`ConfigError::Invalid`] carrying the
//! position of the offending node, found through [`locate::Positions`].

#[cfg(test)]
mod fuzz;
mod locate;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
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
#[serde(expecting = "a map such as `{ interfaces: [eth0] }`")]
pub struct AgentConfig {
    /// Interfaces the XDP program attaches to (one for a one-arm LB).
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Where the dataplane's pins (in a bpffs the agent mounts at `{state_dir}/bpf`) and the
    /// agent's pid live, so a restarted agent adopts the running dataplane.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Reload when the config file changes (checked every second), as on SIGHUP.
    #[serde(default)]
    pub watch_config: bool,
    /// Where the admin API (`crate::admin`: status, metrics, weight and drain) listens: a
    /// loopback, wildcard or local address and a port. Default 127.0.0.1:9100.
    #[serde(default = "default_admin", deserialize_with = "admin_addr")]
    pub admin: SocketAddr,
    /// Pin each L7 worker thread to a CPU of its own when there is one worker per CPU the
    /// agent may use (nginx's `worker_cpu_affinity auto`).
    #[serde(default = "yes")]
    pub l7_cpu_affinity: bool,
}

fn yes() -> bool {
    true
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(crate::state::DEFAULT_STATE_DIR)
}

/// The admin API's default address: loopback only, Prometheus' usual exporter port range.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9100);

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN
}

/// `IP:PORT` or `[IPv6]:PORT`, with a message that shows the expected form.
fn admin_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    let addr: SocketAddr = text.parse().map_err(|_| {
        de::Error::custom(format!(
            "`{text}` is not an address and port (e.g. 127.0.0.1:9100 or [::1]:9100)"
        ))
    })?;
    if addr.port() == 0 {
        return Err(de::Error::custom(format!("{addr}: port 0 is not a port")));
    }
    Ok(addr)
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
#[serde(expecting = "a map such as `{ addresses: [10.0.0.1], ports: 20000-60000 }`")]
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
#[serde(
    expecting = "a listener: a map such as `{ name: web, protocol: tcp, vip: 10.0.0.100, port: 80, pool: web }`"
)]
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: Port,
    /// The pool for tcp/udp, and the default pool for http/https (which may omit it only when
    /// they `redirect`).
    #[serde(default)]
    pub pool: Option<String>,
    /// How new connections (tcp/udp) or requests (http/https) pick a backend. Default: maglev
    /// for tcp/udp, wrr for http/https (see `Listener::scheduler`).
    #[serde(default)]
    pub scheduler: Option<Scheduler>,
    // tcp/udp only:
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
    /// tcp only: when an established flow idles out, send RST to both ends (the vendors'
    /// behaviour) instead of forgetting it silently.
    #[serde(default)]
    pub reset_on_idle: bool,
    // The fields below apply to http/https listeners only (validation rejects them elsewhere);
    // `proxy::Settings` applies their defaults.
    /// Certificates (chosen by SNI) and optional client-certificate CA; https only.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Host/path rules, first match wins; no match goes to `pool`.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Answer every request with a redirect (http → the https listener on the same VIP).
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub session_persistence: Option<Persistence>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// http (default) or https (full-path TLS; backend certificates are not verified, as
    /// the vendors' L7 does by default).
    #[serde(default)]
    pub backend_protocol: Option<BackendProtocol>,
    /// Largest request body (default 10 GiB) → 413.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Largest request head, request line and headers (default 64 KiB) → 431.
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    /// Longest request target (default 8 KiB) → 414.
    #[serde(default)]
    pub max_uri_bytes: Option<usize>,
    /// Requests per client connection before it is closed (default 100).
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// JSON-lines access log file (appended); stdout when left out.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
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

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing on the 5-tuple (tcp/udp only: it is per flow).
    Maglev,
    /// Consistent hashing on the client address only: one client, one backend while it is up
    /// (the vendors' source-IP algorithm and L4 session persistence).
    SourceIp,
    /// Weighted round robin: new flows (requests) take turns in proportion to the weights.
    Wrr,
    /// Weighted least connections: a new flow (request) goes to the backend with the fewest
    /// active connections per unit of weight.
    Wlc,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ allow: [10.0.0.0/8], deny: [10.6.6.0/24] }`")]
pub struct Acl {
    #[serde(default)]
    pub allow: Vec<ipnetwork::IpNetwork>,
    #[serde(default)]
    pub deny: Vec<ipnetwork::IpNetwork>,
}

impl Acl {
    /// Whether `client` may connect: `deny` wins over `allow`; an empty `allow` admits all.
    /// An IPv4 client on a dual-stack socket (`::ffff:a.b.c.d`) is matched as IPv4.
    pub fn admits(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        !self.deny.iter().any(|n| n.contains(client))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(client)))
    }
}

fn default_table_size() -> u32 {
    lb_common::maps::MAX_RING
}

/// A YAML scalar read as a whole number or as text.
enum Scalar {
    Number(i64),
    Text(String),
}

/// Reads a [`Scalar`] (text only when `text`); anything else is refused with what is
/// expected (an untagged enum would only say that nothing matched, a plain integer name its
/// Rust type).
struct NumberOrText {
    expecting: &'static str,
    text: bool,
}

impl de::Visitor<'_> for NumberOrText {
    type Value = Scalar;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        i64::try_from(v)
            .map(Scalar::Number)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Number(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        if self.text {
            Ok(Scalar::Text(v.to_owned()))
        } else {
            Err(E::invalid_type(de::Unexpected::Str(v), &self))
        }
    }
}

/// A whole number, or an error saying `expecting`.
fn whole<'de, D: Deserializer<'de>>(d: D, expecting: &'static str) -> Result<i64, D::Error> {
    match d.deserialize_any(NumberOrText {
        expecting,
        text: false,
    })? {
        Scalar::Number(n) => Ok(n),
        Scalar::Text(t) => Err(de::Error::invalid_type(de::Unexpected::Str(&t), &expecting)),
    }
}

/// A duration as `5s`, `20m`, `500ms` (humantime): the unit is required.
fn duration_with_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match d.deserialize_any(NumberOrText {
        expecting: "a duration with its unit, such as `5s`, `20m` or `500ms`",
        text: true,
    })? {
        Scalar::Number(n) => Err(de::Error::custom(format!(
            "`{n}` needs a unit here, such as `{n}s`"
        ))),
        Scalar::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            de::Error::custom(format!(
                "`{t}` is not a duration ({e}); e.g. 5s, 20m or 500ms"
            ))
        }),
    }
}

/// A duration as `90s`, `15m`, `1h 30m` (humantime), or a bare number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let parsed = match d.deserialize_any(NumberOrText {
        expecting: "a duration such as `900s`, `15m` or `1h 30m`, or a whole number of seconds",
        text: true,
    })? {
        // Negative: as zero, below.
        Scalar::Number(s) => Duration::from_secs(s.max(0) as u64),
        Scalar::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            de::Error::custom(format!("`{t}` is not a duration ({e}); e.g. 900s or 15m"))
        })?,
    };
    if parsed.is_zero() {
        return Err(de::Error::custom("a duration must be above zero"));
    }
    Ok(Some(parsed))
}

impl Listener {
    /// `idle_timeout`, or the protocol's default (tcp/udp flows).
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(match self.protocol {
            Protocol::Udp => Duration::from_secs(300),
            _ => Duration::from_secs(900),
        })
    }

    /// `scheduler`, or the protocol's default: maglev for tcp/udp, wrr for http/https.
    pub fn scheduler(&self) -> Scheduler {
        self.scheduler.unwrap_or(if self.protocol.is_l7() {
            Scheduler::Wrr
        } else {
            Scheduler::Maglev
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Http,
    Https,
}

impl Protocol {
    /// Served by the agent's proxy rather than by the XDP program.
    pub fn is_l7(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }

    /// The transport the listener occupies on its VIP and port.
    fn transport(self) -> Protocol {
        match self {
            Protocol::Udp => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ certificates: [{ cert: site.pem, key: site.key }] }`")]
pub struct TlsConfig {
    pub certificates: Vec<CertificatePair>,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// A PEM certificate chain (leaf first) and its PEM private key (PKCS#8, RSA or EC).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ cert: site.pem, key: site.key }`")]
pub struct CertificatePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(
    expecting = "a route: a map such as `{ host: api.example.com, path_prefix: /v1, pool: api }`"
)]
pub struct Route {
    /// `api.example.com` or `*.example.com` (any name ending in `.example.com`); any host
    /// when left out.
    #[serde(default)]
    pub host: Option<String>,
    /// Matches paths that start with it; any path when left out.
    #[serde(default)]
    pub path_prefix: Option<String>,
    pub pool: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ to: https, code: 301 }`")]
pub struct Redirect {
    pub to: RedirectTarget,
    #[serde(default = "default_redirect_code")]
    pub code: u16,
}

fn default_redirect_code() -> u16 {
    301
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedirectTarget {
    Https,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ type: insert_cookie, cookie: SERVERID, timeout: 20m }`")]
pub struct Persistence {
    #[serde(rename = "type")]
    pub kind: PersistenceKind,
    /// insert_cookie: the LB's cookie (default SERVERID); app_cookie: the backend's cookie.
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(
        default = "default_persistence_timeout",
        deserialize_with = "duration_with_unit"
    )]
    pub timeout: Duration,
}

fn default_persistence_timeout() -> Duration {
    Duration::from_secs(20 * 60)
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PersistenceKind {
    InsertCookie,
    AppCookie,
    SourceIp,
}

/// Durations as `5s`, `20m`, `500ms`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ connect: 5s, request: 60s, response: 60s, idle: 15s }`")]
pub struct Timeouts {
    /// TCP connect to a backend; then the next backend is tried.
    #[serde(default = "default_connect", deserialize_with = "duration_with_unit")]
    pub connect: Duration,
    /// Longest pause while receiving a request body → 408.
    #[serde(default = "default_request", deserialize_with = "duration_with_unit")]
    pub request: Duration,
    /// From sending a request to the backend's response head → 504.
    #[serde(default = "default_response", deserialize_with = "duration_with_unit")]
    pub response: Duration,
    /// Keep-alive idle time between two requests of a client connection.
    #[serde(default = "default_idle", deserialize_with = "duration_with_unit")]
    pub idle: Duration,
    /// An upgraded (WebSocket) connection with no traffic either way is closed.
    #[serde(
        default = "default_websocket_idle",
        deserialize_with = "duration_with_unit"
    )]
    pub websocket_idle: Duration,
}

fn default_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_request() -> Duration {
    Duration::from_secs(60)
}
fn default_response() -> Duration {
    Duration::from_secs(60)
}
fn default_idle() -> Duration {
    Duration::from_secs(15)
}
fn default_websocket_idle() -> Duration {
    Duration::from_secs(60)
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            request: default_request(),
            response: default_response(),
            idle: default_idle(),
            websocket_idle: default_websocket_idle(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Http,
    Https,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a pool: a map such as `{ name: web, backends: [...] }`")]
pub struct Pool {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    /// Active probes; without it every backend counts as healthy (as with `protocol: none`).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Active health probes of a pool's backends (`crate::health`). Unset fields take the
/// vendors' defaults for the protocol (see the accessors).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a map such as `{ protocol: tcp }` or `{ protocol: http, path: /health }`")]
pub struct HealthCheck {
    pub protocol: CheckProtocol,
    /// Default: each backend's own port.
    #[serde(default)]
    pub port: Option<Port>,
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Consecutive successes that bring an unhealthy backend back.
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures that take a healthy backend out.
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
    // http/https only:
    #[serde(default)]
    pub method: Option<CheckMethod>,
    #[serde(default)]
    pub path: Option<String>,
    /// Sent as Host; the backend's address when left out.
    #[serde(default)]
    pub host: Option<String>,
    /// Status codes or `MIN-MAX` ranges that count as healthy (default 200-399).
    #[serde(default)]
    pub expected_codes: Option<Codes>,
    // https only:
    /// PEM CA bundle: when set, backend certificates must chain to it and name `host` (or the
    /// backend's address); without it they are not verified (the vendors' default).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    // udp only:
    /// Payload of the UDP probe (default: an empty datagram).
    #[serde(default)]
    pub send: Option<String>,
    /// When set, the backend must answer with a datagram containing it (silence fails).
    #[serde(default)]
    pub expect: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    Icmp,
    Tcp,
    Udp,
    Http,
    Https,
    /// No probes: every backend is always healthy.
    None,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum CheckMethod {
    /// The vendors' default for HTTP health checks.
    #[default]
    Head,
    Get,
}

/// An inclusive range of HTTP status codes: `200` or `200-399`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRange {
    pub min: u16,
    pub max: u16,
}

impl CodeRange {
    pub fn contains(&self, code: u16) -> bool {
        (self.min..=self.max).contains(&code)
    }
}

impl CodeRange {
    /// One entry: `200`, `200-399`, or a class as Alibaba SLB writes it, `http_2xx` (also `2xx`).
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "`{s}` is not a status code, a MIN-MAX range of them or a class such as `http_2xx`"
            )
        };
        let class = s.strip_prefix("http_").unwrap_or(s);
        let (min, max) = if let Some(d) = class.strip_suffix("xx").filter(|d| d.len() == 1) {
            let d: u16 = d.parse().map_err(|_| bad())?;
            (d * 100, d * 100 + 99)
        } else if let Some((a, b)) = s.split_once('-') {
            match (a.trim().parse(), b.trim().parse()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return Err(bad()),
            }
        } else {
            let c = s.parse().map_err(|_| bad())?;
            (c, c)
        };
        Self::new(min, max)
    }

    fn new(min: u16, max: u16) -> Result<Self, String> {
        if !(100..=599).contains(&min) || !(100..=599).contains(&max) || min > max {
            return Err(if min == max {
                format!("{min} is not an HTTP status code (100-599)")
            } else {
                format!("{min}-{max} is not a range of HTTP status codes (100-599)")
            });
        }
        Ok(CodeRange { min, max })
    }
}

const CODE_EXPECTED: &str =
    "a status code such as `200`, a range such as `200-399` or a class such as `http_2xx`";

impl<'de> Deserialize<'de> for CodeRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(NumberOrText {
            expecting: CODE_EXPECTED,
            text: true,
        })? {
            Scalar::Number(c) => u16::try_from(c)
                .map_err(|_| format!("{c} is not an HTTP status code (100-599)"))
                .and_then(|c| Self::new(c, c)),
            Scalar::Text(s) => Self::parse(&s),
        }
        .map_err(de::Error::custom)
    }
}

/// `expected_codes`: a list of entries (`[200, 300-302]`), or one entry, or entries separated
/// by commas in one string as Huawei ELB writes them (`"200,202"`, `"200-204"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Codes(pub Vec<CodeRange>);

impl<'de> Deserialize<'de> for Codes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Codes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a list of status codes, ranges or classes, or {CODE_EXPECTED}"
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Codes, A::Error> {
                let mut codes = Vec::new();
                while let Some(c) = seq.next_element()? {
                    codes.push(c);
                }
                Ok(Codes(codes))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Codes, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Codes, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Codes, E> {
                v.split(',')
                    .map(CodeRange::parse)
                    .collect::<Result<_, _>>()
                    .map(Codes)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl HealthCheck {
    /// A check of `protocol` with `timeout` and every other setting at its default: what
    /// `lb-agent diagnose` runs once against a backend.
    pub fn once(protocol: CheckProtocol, timeout: Duration) -> Self {
        Self {
            protocol,
            port: None,
            interval: None,
            timeout: Some(timeout),
            healthy_threshold: None,
            unhealthy_threshold: None,
            method: None,
            path: None,
            host: None,
            expected_codes: None,
            ca: None,
            send: None,
            expect: None,
        }
    }

    /// Whether probes run at all.
    pub fn active(&self) -> bool {
        self.protocol != CheckProtocol::None
    }

    /// Default: 5 s for udp, 2 s otherwise (the vendors' recommended values).
    pub fn interval(&self) -> Duration {
        self.interval
            .unwrap_or(Duration::from_secs(match self.protocol {
                CheckProtocol::Udp => 5,
                _ => 2,
            }))
    }

    /// Default: 10 s for udp, 5 s otherwise.
    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(Duration::from_secs(match self.protocol {
                CheckProtocol::Udp => 10,
                _ => 5,
            }))
    }

    pub fn healthy_threshold(&self) -> u32 {
        self.healthy_threshold.unwrap_or(3)
    }

    pub fn unhealthy_threshold(&self) -> u32 {
        self.unhealthy_threshold.unwrap_or(3)
    }

    pub fn method(&self) -> CheckMethod {
        self.method.unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// Default: 2xx and 3xx.
    pub fn expected_codes(&self) -> Vec<CodeRange> {
        self.expected_codes
            .clone()
            .map_or_else(|| vec![CodeRange { min: 200, max: 399 }], |c| c.0)
    }
}

impl fmt::Display for CheckProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckProtocol::Icmp => "icmp",
            CheckProtocol::Tcp => "tcp",
            CheckProtocol::Udp => "udp",
            CheckProtocol::Http => "http",
            CheckProtocol::Https => "https",
            CheckProtocol::None => "none",
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a backend: a map such as `{ address: 10.0.0.11, port: 8080, weight: 1 }`")]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: Port,
    /// Share of new connections; 0 drains (no new connections, existing ones continue).
    #[serde(default = "default_weight", deserialize_with = "weight")]
    pub weight: u32,
    /// Gets traffic only while no primary (non-backup) backend of the pool is healthy.
    #[serde(default)]
    pub backup: bool,
}

fn default_weight() -> u32 {
    1
}

fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let w = whole(d, "a weight, a whole number 0-65535")?;
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
        let p = whole(d, "a port number 1-65535")?;
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
            Protocol::Http => "http",
            Protocol::Https => "https",
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
    let invalid = |at, message: String| ConfigError::Invalid {
        file: file.to_string(),
        at,
        // One line whatever the file holds: YAML keys and values may contain line breaks.
        message: message
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    };
    let positions = Positions::index(text);
    let mut config: Config = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
        text,
    ))
    .map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let serde_at = inner.location().map(|l| Position {
            line: l.line(),
            column: l.column(),
        });
        // Syntax errors: serde_yaml knows best where it stopped. Other errors point at the
        // node (serde_yaml's position may be past it, as for a missing field).
        let syntax = !positions.complete;
        // A key given twice: at its second occurrence.
        let twice = (inner.to_string().split_once("duplicate field `"))
            .and_then(|(_, rest)| rest.split_once('`'))
            .and_then(|(key, _)| match path.as_str() {
                "." => positions.key(key),
                _ => positions.key(&format!("{path}.{key}")),
            });
        let at = match (twice, serde_at) {
            (Some(at), _) => at,
            (None, Some(at)) if path == "." || syntax => at,
            _ => positions
                .find(&path)
                .or(serde_at)
                .unwrap_or(Position::START),
        };
        // A syntax error is about the text where it stopped, not the node serde was reading.
        invalid(at, yaml_message(if syntax { "." } else { &path }, &inner))
    })?;
    config.resolve_paths(Path::new(file).parent().unwrap_or(Path::new("")));
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

        if !self.agent.state_dir.is_absolute() {
            return Err(("agent.state_dir".into(), "must be an absolute path".into()));
        }

        let admin = self.agent.admin.ip();
        if !admin.is_loopback() && !admin.is_unspecified() {
            if let Some(addrs) = &host.addresses {
                if !addrs.contains(&admin) {
                    return Err((
                        "agent.admin".into(),
                        format!("{admin} is not an address of this host"),
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
            validate_health_check(i, pool)?;
            let mut seen = HashSet::new();
            for (j, b) in pool.backends.iter().enumerate() {
                if let Some(kind) = not_unicast(b.address) {
                    return Err((
                        format!("pools[{i}].backends[{j}].address"),
                        format!("{} is {kind}: a backend needs a unicast address", b.address),
                    ));
                }
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

        let l4_count = self
            .listeners
            .iter()
            .filter(|l| !l.protocol.is_l7())
            .count();
        if l4_count > MAX_LISTENERS as usize {
            return Err((
                "listeners".into(),
                format!("at most {MAX_LISTENERS} tcp/udp listeners are supported"),
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
            if let Some(kind) = not_unicast(l.vip) {
                return Err((
                    format!("listeners[{i}].vip"),
                    format!("{} is {kind}: a VIP needs a unicast address", l.vip),
                ));
            }
            let named = l.pool.iter().chain(l.routes.iter().map(|r| &r.pool));
            for (p, pool) in named.filter_map(|n| pools.get(n.as_str())) {
                if let Some(j) =
                    (pool.backends.iter()).position(|b| (b.address, b.port) == (l.vip, l.port))
                {
                    return Err((
                        format!("pools[{p}].backends[{j}]"),
                        format!(
                            "{} is listener `{}` itself: its traffic would loop",
                            sock(l.vip, l.port),
                            l.name
                        ),
                    ));
                }
            }
            if !l.protocol.is_l7()
                && self
                    .snat
                    .as_ref()
                    .is_some_and(|s| s.addresses.contains(&l.vip))
            {
                return Err((
                    format!("listeners[{i}].vip"),
                    format!(
                        "{} is also an snat address: the address backends see cannot be a VIP",
                        l.vip
                    ),
                ));
            }
            // http/https occupy the TCP port too.
            let transport = l.protocol.transport();
            if let Some(first) = triples.insert((l.vip, l.port, transport), i) {
                return Err((
                    format!("listeners[{i}].port"),
                    format!(
                        "{}/{} is already used by listener `{}`",
                        sock(l.vip, l.port),
                        transport,
                        self.listeners[first].name
                    ),
                ));
            }
            let pool = match &l.pool {
                Some(name) => match pools.get(name.as_str()) {
                    Some(p) => Some(*p),
                    None => {
                        return Err((
                            format!("listeners[{i}].pool"),
                            format!("pool `{name}` does not exist"),
                        ))
                    }
                },
                None => None,
            };
            if l.protocol.is_l7() {
                if l.scheduler == Some(Scheduler::Maglev) {
                    return Err((
                        format!("listeners[{i}].scheduler"),
                        "maglev hashes flows: http/https listeners use wrr, wlc or source_ip"
                            .into(),
                    ));
                }
                self.validate_l7(i, l, &pools)?;
                if l.reset_on_idle {
                    return Err((
                        format!("listeners[{i}].reset_on_idle"),
                        format!(
                            "applies to tcp listeners only (`{}` is {})",
                            l.name, l.protocol
                        ),
                    ));
                }
                continue;
            }
            self.validate_l4_only_fields(i, l)?;
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
            let Some((p, pool)) = pool else {
                return Err((
                    format!("listeners[{i}]"),
                    format!("{} listener `{}` needs a `pool`", l.protocol, l.name),
                ));
            };
            if matches!(l.scheduler(), Scheduler::Maglev | Scheduler::SourceIp) {
                let needed = maglev_slots_needed(pool);
                if u64::from(l.table_size) < needed {
                    return Err((
                        format!("listeners[{i}].table_size"),
                        format!(
                            "{} slots leave some of pool `{}`'s backends without one (by their weights it needs at least {needed}; the default {} spreads them evenly)",
                            l.table_size,
                            pool.name,
                            lb_common::maps::MAX_RING
                        ),
                    ));
                }
            }
            let max_wlc = lb_common::maps::MAX_WLC_BACKENDS as usize;
            if l.scheduler() == Scheduler::Wlc && pool.backends.len() > max_wlc {
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
            if l.reset_on_idle && l.protocol != Protocol::Tcp {
                return Err((
                    format!("listeners[{i}].reset_on_idle"),
                    format!(
                        "applies to tcp listeners only (`{}` is {})",
                        l.name, l.protocol
                    ),
                ));
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

/// Largest healthy/unhealthy threshold (the vendors' "max retries" range is 1-10).
const MAX_THRESHOLD: u32 = 10;

fn validate_health_check(i: usize, pool: &Pool) -> Result<(), Invalid> {
    let at = |field: &str| format!("pools[{i}].health_check.{field}");
    if let Some(j) = pool.backends.iter().position(|b| b.backup) {
        let at = format!("pools[{i}].backends[{j}].backup");
        if pool.backends.iter().all(|b| b.backup) {
            return Err((
                at,
                format!("pool `{}` has no primary (non-backup) backend", pool.name),
            ));
        }
        if !pool.health_check.as_ref().is_some_and(HealthCheck::active) {
            return Err((
                at,
                "a backup needs an active `health_check` on its pool (without probes the primaries never fail)".into(),
            ));
        }
    }
    let Some(hc) = &pool.health_check else {
        return Ok(());
    };
    if let Some(d) = hc.interval {
        if d < Duration::from_secs(1) || d > Duration::from_secs(50) {
            return Err((
                at("interval"),
                format!("{} is outside 1s-50s", humantime::format_duration(d)),
            ));
        }
    }
    for (field, t) in [
        ("healthy_threshold", hc.healthy_threshold),
        ("unhealthy_threshold", hc.unhealthy_threshold),
    ] {
        if t.is_some_and(|t| t == 0 || t > MAX_THRESHOLD) {
            return Err((at(field), format!("must be 1 to {MAX_THRESHOLD}")));
        }
    }
    let http = matches!(hc.protocol, CheckProtocol::Http | CheckProtocol::Https);
    let http_only = [
        ("method", hc.method.is_some()),
        ("path", hc.path.is_some()),
        ("host", hc.host.is_some()),
        ("expected_codes", hc.expected_codes.is_some()),
    ];
    let udp_only = [("send", hc.send.is_some()), ("expect", hc.expect.is_some())];
    let https_only = [("ca", hc.ca.is_some())];
    for (fields, applies, what) in [
        (&http_only[..], http, "http/https"),
        (
            &https_only[..],
            hc.protocol == CheckProtocol::Https,
            "https",
        ),
        (&udp_only[..], hc.protocol == CheckProtocol::Udp, "udp"),
    ] {
        if let Some((field, _)) = fields.iter().find(|(_, set)| *set && !applies) {
            return Err((
                at(field),
                format!(
                    "`{field}` applies to {what} health checks only (this one is {})",
                    hc.protocol
                ),
            ));
        }
    }
    if !hc.active() && (hc.port.is_some() || hc.interval.is_some() || hc.timeout.is_some()) {
        return Err((
            format!("pools[{i}].health_check"),
            "`protocol: none` runs no probes: it takes no port, interval or timeout".into(),
        ));
    }
    if let Some(ca) = &hc.ca {
        crate::proxy::tls::load_roots(ca).map_err(|e| (at("ca"), e.to_string()))?;
    }
    if hc.protocol == CheckProtocol::Icmp && hc.port.is_some() {
        return Err((at("port"), "an icmp health check has no port".into()));
    }
    if hc.expect.as_ref().is_some_and(String::is_empty) {
        return Err((
            at("expect"),
            "must not be empty (leave it out to accept silence)".into(),
        ));
    }
    if let Some(p) = &hc.path {
        if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err((at("path"), format!("`{p}` is not an absolute path (/...)")));
        }
    }
    if let Some(h) = &hc.host {
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            return Err((at("host"), format!("`{h}` is not a host name")));
        }
    }
    if hc.expected_codes.as_ref().is_some_and(|c| c.0.is_empty()) {
        return Err((at("expected_codes"), "at least one code is needed".into()));
    }
    Ok(())
}

/// The smallest Maglev table in which each of `pool`'s backends with a weight gets about
/// one slot or more (slots go in proportion to weight), for the primaries and for the backups
/// (the table holds one set or the other).
fn maglev_slots_needed(pool: &Pool) -> u64 {
    [false, true]
        .iter()
        .map(|&backup| {
            let weights = pool
                .backends
                .iter()
                .filter(|b| b.backup == backup && b.weight > 0)
                .map(|b| u64::from(b.weight));
            let (sum, min) = weights.fold((0, u64::MAX), |(s, m), w| (s + w, m.min(w)));
            sum.div_ceil(min.max(1))
        })
        .max()
        .unwrap_or(0)
}

fn is_prime(n: u32) -> bool {
    let n = n as u64;
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl Config {
    /// tcp/udp listeners are served by the XDP program: the proxy settings mean nothing there.
    fn validate_l4_only_fields(&self, i: usize, l: &Listener) -> Result<(), Invalid> {
        let set = [
            ("tls", l.tls.is_some()),
            ("routes", !l.routes.is_empty()),
            ("redirect", l.redirect.is_some()),
            ("session_persistence", l.session_persistence.is_some()),
            ("timeouts", l.timeouts.is_some()),
            ("backend_protocol", l.backend_protocol.is_some()),
            ("max_body_bytes", l.max_body_bytes.is_some()),
            ("max_header_bytes", l.max_header_bytes.is_some()),
            ("max_uri_bytes", l.max_uri_bytes.is_some()),
            (
                "max_requests_per_connection",
                l.max_requests_per_connection.is_some(),
            ),
            ("access_log", l.access_log.is_some()),
        ];
        match set.iter().find(|(_, is_set)| *is_set) {
            Some((field, _)) => Err((
                format!("listeners[{i}].{field}"),
                format!(
                    "`{field}` applies to http/https listeners only (`{}` is {})",
                    l.name, l.protocol
                ),
            )),
            None => Ok(()),
        }
    }

    fn validate_l7(
        &self,
        i: usize,
        l: &Listener,
        pools: &HashMap<&str, (usize, &Pool)>,
    ) -> Result<(), Invalid> {
        let at = |field: &str| format!("listeners[{i}].{field}");
        match (&l.redirect, &l.pool) {
            // Routes alone are enough: what none matches gets 404.
            (None, None) if l.routes.is_empty() => {
                return Err((
                    format!("listeners[{i}]"),
                    format!(
                        "{} listener `{}` needs a `pool`, `routes` or a `redirect`",
                        l.protocol, l.name
                    ),
                ))
            }
            (Some(r), _) => {
                if !matches!(r.code, 301 | 302 | 303 | 307 | 308) {
                    return Err((
                        at("redirect.code"),
                        format!(
                            "{} is not a redirect code (301, 302, 303, 307, 308)",
                            r.code
                        ),
                    ));
                }
                if l.protocol == Protocol::Https {
                    return Err((
                        at("redirect"),
                        "an https listener cannot redirect to https".into(),
                    ));
                }
                if self.https_port(l.vip).is_none() {
                    return Err((
                        at("redirect"),
                        format!("no https listener on {} to redirect to", l.vip),
                    ));
                }
                if !l.routes.is_empty() {
                    return Err((
                        at("routes"),
                        "a redirecting listener has no routes (every request is redirected)".into(),
                    ));
                }
            }
            (None, _) => {}
        }
        match (l.protocol, &l.tls) {
            (Protocol::Https, None) => {
                return Err((
                    format!("listeners[{i}]"),
                    format!("https listener `{}` needs `tls.certificates`", l.name),
                ))
            }
            (Protocol::Http, Some(_)) => {
                return Err((
                    at("tls"),
                    format!(
                        "`tls` applies to https listeners only (`{}` is http)",
                        l.name
                    ),
                ))
            }
            (_, Some(tls)) => {
                if tls.certificates.is_empty() {
                    return Err((
                        at("tls.certificates"),
                        "at least one certificate is needed".into(),
                    ));
                }
                for (j, c) in tls.certificates.iter().enumerate() {
                    crate::proxy::tls::load_certified_key(&c.cert, &c.key).map_err(|e| {
                        let field = if e.is_key() { "key" } else { "cert" };
                        (at(&format!("tls.certificates[{j}].{field}")), e.to_string())
                    })?;
                }
                if let Some(ca) = &tls.client_ca {
                    crate::proxy::tls::load_roots(ca)
                        .map_err(|e| (at("tls.client_ca"), e.to_string()))?;
                }
            }
            (_, None) => {}
        }
        for (j, r) in l.routes.iter().enumerate() {
            let path = |f: &str| at(&format!("routes[{j}].{f}"));
            if !pools.contains_key(r.pool.as_str()) {
                return Err((path("pool"), format!("pool `{}` does not exist", r.pool)));
            }
            if let Some(h) = &r.host {
                let name = h.strip_prefix("*.").unwrap_or(h);
                if name.split('.').any(str::is_empty)
                    || name.contains('*')
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err((
                        path("host"),
                        format!("`{h}` is not a host name or `*.suffix` pattern"),
                    ));
                }
            }
            if let Some(p) = &r.path_prefix {
                if !p.starts_with('/') {
                    return Err((path("path_prefix"), format!("`{p}` does not start with /")));
                }
                // RFC 3986 pchar and `/`: anything else cannot come in a request path.
                let pchar =
                    |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c);
                if let Some(c) = p.chars().find(|&c| !pchar(c)) {
                    return Err((
                        path("path_prefix"),
                        format!("`{p}`: {c:?} cannot appear in a request path (percent-encode it)"),
                    ));
                }
                let Some(normal) = crate::proxy::path::normalized(p) else {
                    return Err((
                        path("path_prefix"),
                        format!("`{p}`: a `%` must start an escape of two hex digits"),
                    ));
                };
                if normal != p.as_str() {
                    return Err((
                        path("path_prefix"),
                        format!("`{p}` would never match: paths are matched normalized (escaped unreserved characters decoded, other escapes in upper case, `.` and `..` resolved, `//` merged); write `{normal}`"),
                    ));
                }
            }
            if r.host.is_none() && r.path_prefix.is_none() {
                return Err((
                    format!("listeners[{i}].routes[{j}]"),
                    "a route needs a `host` or a `path_prefix` (the listener's `pool` is the default)"
                        .into(),
                ));
            }
            if let Some(k) = l.routes[..j].iter().position(|e| route_covers(e, r)) {
                return Err((
                    format!("listeners[{i}].routes[{j}]"),
                    format!("never matches: routes[{k}] comes first and covers it"),
                ));
            }
        }
        if let Some(p) = &l.session_persistence {
            if p.kind == PersistenceKind::AppCookie && p.cookie.is_none() {
                return Err((
                    at("session_persistence.cookie"),
                    "app_cookie needs the name of the backend's `cookie`".into(),
                ));
            }
            if let Some(c) = &p.cookie {
                if c.is_empty()
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err((
                        at("session_persistence.cookie"),
                        format!("`{c}` is not a cookie name"),
                    ));
                }
            }
            if p.timeout.is_zero() {
                return Err((at("session_persistence.timeout"), "must be above 0".into()));
            }
        }
        if let Some(t) = &l.timeouts {
            for (field, d) in [
                ("connect", t.connect),
                ("request", t.request),
                ("response", t.response),
                ("idle", t.idle),
                ("websocket_idle", t.websocket_idle),
            ] {
                if d.is_zero() {
                    return Err((at(&format!("timeouts.{field}")), "must be above 0".into()));
                }
            }
        }
        if l.max_header_bytes.is_some_and(|b| b < 8192) {
            return Err((
                at("max_header_bytes"),
                "must be at least 8192 (the HTTP/1 parser's smallest buffer)".into(),
            ));
        }
        if l.max_requests_per_connection == Some(0) {
            return Err((at("max_requests_per_connection"), "must be above 0".into()));
        }
        if l.max_uri_bytes == Some(0) {
            return Err((at("max_uri_bytes"), "must be above 0".into()));
        }
        Ok(())
    }

    /// The port of the https listener on `vip`, the target of http → https redirects.
    pub fn https_port(&self, vip: IpAddr) -> Option<Port> {
        self.listeners
            .iter()
            .find(|l| l.protocol == Protocol::Https && l.vip == vip)
            .map(|l| l.port)
    }

    /// Relative certificate and log paths are relative to the config file's directory.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut self.listeners {
            if let Some(tls) = &mut l.tls {
                for c in &mut tls.certificates {
                    fix(&mut c.cert);
                    fix(&mut c.key);
                }
                if let Some(ca) = &mut tls.client_ca {
                    fix(ca);
                }
            }
            if let Some(log) = &mut l.access_log {
                fix(log);
            }
        }
        for p in &mut self.pools {
            if let Some(ca) = p.health_check.as_mut().and_then(|h| h.ca.as_mut()) {
                fix(ca);
            }
        }
    }
}

/// Whether every request `later` matches is already taken by `earlier` (first match wins).
fn route_covers(earlier: &Route, later: &Route) -> bool {
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => {
            let (e, l) = (e.to_ascii_lowercase(), l.to_ascii_lowercase());
            match e.strip_prefix('*') {
                // `*.example.com` covers `a.example.com` and `*.a.example.com`.
                Some(suffix) => l.ends_with(suffix),
                None => e == l,
            }
        }
    };
    let path = match (&earlier.path_prefix, &later.path_prefix) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => l.starts_with(e.as_str()),
    };
    host && path
}

/// What `a` is when it is no single host's address.
fn not_unicast(a: IpAddr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("unspecified")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a == IpAddr::from(std::net::Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
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
