//! `lb-agent diagnose`: the vendors' "why can't I reach the load balancer" and "why 502"
//! checklists (Alibaba SLB, Huawei ELB), run on the LB against the running agent: listener
//! present, VIP local, XDP attached and how, interface settings (forwarding, rp_filter), route
//! and ACL verdict for a client, backends healthy, serving and answering on their port from
//! the SNAT address, SNAT port and conntrack pressure, datapath drops, recent 5xx in the
//! access logs. Every finding is one line, with a one-line fix when something is wrong.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::task::JoinSet;

use crate::{
    admin::{
        client,
        status::{HealthState, Status},
    },
    config::{self, CheckProtocol, Config, HealthCheck},
    health::{ProbeError, Prober},
    netif,
};

/// How long one backend check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pressure from which SNAT ports and conntrack entries are reported.
const PRESSURE_WARN: f64 = 0.8;
/// How far back the access logs are read for 5xx answers.
const RECENT: Duration = Duration::from_secs(15 * 60);
/// How much of the end of an access log is read.
const LOG_TAIL_BYTES: u64 = 1 << 20;

pub struct Options {
    pub admin: SocketAddr,
    /// The agent's config; by default the one `/status` names.
    pub config: Option<PathBuf>,
    /// A client to check the route and the ACLs for.
    pub client: Option<IpAddr>,
    /// Only this listener (and its pools); all by default.
    pub listener: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Worth knowing, nothing wrong.
    Info,
    /// May explain trouble.
    Warn,
    /// Wrong: clients are or will be refused.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `listener web`, `backend web/10.0.0.1:80`, `xdp lb-ext`.
    pub subject: String,
    pub text: String,
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{level:<5} {}: {}", self.subject, self.text)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

fn finding(level: Level, subject: impl Into<String>, text: impl Into<String>) -> Finding {
    Finding {
        level,
        subject: subject.into(),
        text: text.into(),
        fix: None,
    }
}

fn problem(
    level: Level,
    subject: impl Into<String>,
    text: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        fix: Some(fix.into()),
        ..finding(level, subject, text)
    }
}

/// Runs every check that applies; findings in the order checked.
pub async fn run(o: &Options) -> Vec<Finding> {
    let mut out = Vec::new();
    let asked = Instant::now();
    let status = match client::status(o.admin).await {
        Ok(s) => {
            out.push(finding(
                Level::Ok,
                "agent",
                format!("lb-agent {} answers on {}", s.agent.version, o.admin),
            ));
            Some(s)
        }
        Err(e) => {
            out.push(problem(
                Level::Fail,
                "agent",
                e.to_string(),
                "start it (`lb-agent run --config FILE`), or point --admin or --config at it",
            ));
            None
        }
    };
    let path = o
        .config
        .clone()
        .or_else(|| status.as_ref().map(|s| s.agent.config.clone()));
    let cfg = match path.as_deref().map(config::load) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            out.push(problem(
                Level::Fail,
                "config",
                e.to_string(),
                "correct the file (`lb-agent check --config FILE` shows the same)",
            ));
            None
        }
        None => None,
    };
    let (Some(scope), interfaces) = scope(o, status.as_ref(), cfg.as_ref(), &mut out) else {
        return out;
    };
    let local = config::Host::current()
        .ok()
        .and_then(|h| h.addresses)
        .unwrap_or_default();
    for l in &scope {
        if !local.contains(&l.address.ip()) {
            out.push(problem(
                Level::Fail,
                format!("listener {}", l.name),
                format!(
                    "VIP {} is not an address of this host: nothing answers ARP/ND for it",
                    l.address.ip()
                ),
                "run the agent (it adds each VIP), or add the address by hand",
            ));
        }
    }
    for iface in &interfaces {
        out.extend(interface(iface));
    }
    if let Some(client) = o.client {
        out.push(route_back(client));
        if let Some(cfg) = &cfg {
            for l in &scope {
                out.extend(acl_verdict(cfg, &l.name, client));
            }
        }
    }
    if let Some(s) = &status {
        out.extend(backends(s, &scope).await);
        // The drop counters count since the agent started: a second view, a sweep later,
        // tells whether they still rise.
        tokio::time::sleep_until((asked + COUNTERS_MOVE).into()).await;
        match client::status(o.admin).await {
            Ok(now) => out.extend(pressure(&now, Some(s))),
            Err(_) => out.extend(pressure(s, None)),
        }
    }
    if let Some(cfg) = &cfg {
        for l in &scope {
            out.extend(recent_errors(cfg, &l.name, SystemTime::now()));
        }
    }
    out
}

/// A listener as both the status and the config know it.
struct Scoped {
    name: String,
    address: SocketAddr,
}

/// The listeners to check (and the interfaces the program should be on), with a finding for
/// each listener: present, and running (in the status) when there is one.
fn scope(
    o: &Options,
    status: Option<&Status>,
    cfg: Option<&Config>,
    out: &mut Vec<Finding>,
) -> (Option<Vec<Scoped>>, Vec<String>) {
    let known: Vec<Scoped> = match (status, cfg) {
        (Some(s), _) => s
            .listeners
            .iter()
            .map(|l| Scoped {
                name: l.name.clone(),
                address: l.address,
            })
            .collect(),
        (None, Some(c)) => c
            .listeners
            .iter()
            .map(|l| Scoped {
                name: l.name.clone(),
                address: SocketAddr::new(l.vip, l.port.0),
            })
            .collect(),
        (None, None) => return (None, Vec::new()),
    };
    let interfaces = match (status, cfg) {
        (Some(s), _) => s.agent.interfaces.clone(),
        (None, Some(c)) => c.agent.interfaces.clone(),
        (None, None) => Vec::new(),
    };
    let names: Vec<String> = known.iter().map(|l| l.name.clone()).collect();
    let chosen: Vec<Scoped> = match &o.listener {
        None => known,
        Some(want) => {
            let in_config = cfg.is_some_and(|c| c.listeners.iter().any(|l| &l.name == want));
            match known.into_iter().find(|l| &l.name == want) {
                Some(l) => vec![l],
                None if in_config => {
                    out.push(problem(
                        Level::Fail,
                        format!("listener {want}"),
                        "in the config file but not running",
                        "restart the agent so it takes the config",
                    ));
                    return (None, interfaces);
                }
                None => {
                    out.push(problem(
                        Level::Fail,
                        format!("listener {want}"),
                        format!(
                            "listener `{want}` not found (there are: {})",
                            if names.is_empty() { "none".to_string() } else { names.join(", ") }
                        ),
                        "add it under `listeners:` in the config and restart the agent, or name an existing one",
                    ));
                    return (None, interfaces);
                }
            }
        }
    };
    if chosen.is_empty() {
        out.push(problem(
            Level::Fail,
            "listeners",
            "no listener is configured: nothing serves the VIPs",
            "add one under `listeners:` in the config",
        ));
    }
    for l in &chosen {
        out.push(finding(
            Level::Ok,
            format!("listener {}", l.name),
            format!("present on {}", l.address),
        ));
    }
    (Some(chosen), interfaces)
}

/// XDP attached (and how), forwarding on, reverse-path filter off.
fn interface(iface: &str) -> Vec<Finding> {
    let subject = format!("interface {iface}");
    let mut out = Vec::new();
    match netif::ip_output(&["-j", "-d", "link", "show", "dev", iface]) {
        Err(e) => out.push(problem(
            Level::Fail,
            &subject,
            e.to_string(),
            "create the interface or correct `agent.interfaces`",
        )),
        Ok(json) => out.push(match xdp_attachment(&json) {
            Some((mode, name)) if name == lb_common::maps::PROG_LB => finding(
                Level::Ok,
                &subject,
                format!("{name} attached in {mode} mode"),
            ),
            Some((mode, name)) => problem(
                Level::Fail,
                &subject,
                format!("another XDP program ({name}, {mode} mode) is attached"),
                format!("detach it (`ip link set dev {iface} xdp off`) and restart the agent"),
            ),
            None => problem(
                Level::Fail,
                &subject,
                "no XDP program attached: the VIPs' traffic is not load balanced",
                "start the agent, or see its log for the attach error",
            ),
        }),
    }
    let sysctl = |key: &str| {
        netif::read_sysctl(&format!("/proc/sys/net/ipv4/conf/{key}"))
            .and_then(|v| v.parse::<u32>().ok())
    };
    if sysctl(&format!("{iface}/forwarding")) == Some(0) {
        out.push(problem(
            Level::Fail,
            &subject,
            "IPv4 forwarding is off: the program's next-hop lookups fail",
            format!(
                "sysctl -w net.ipv4.conf.{iface}.forwarding=1 (the agent sets it when it starts)"
            ),
        ));
    }
    // The kernel applies the larger of `all` and the interface's own.
    let rp = sysctl("all/rp_filter")
        .unwrap_or(0)
        .max(sysctl(&format!("{iface}/rp_filter")).unwrap_or(0));
    if rp != 0 {
        out.push(problem(
            Level::Fail,
            &subject,
            format!("rp_filter is {rp}: packets handed to the kernel with a SNAT or VIP source are dropped"),
            format!("sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{iface}.rp_filter=0"),
        ));
    } else {
        out.push(finding(Level::Ok, &subject, "forwarding on, rp_filter off"));
    }
    out
}

/// (mode, program name) of the XDP program `ip -j -d link show` reports, if any.
fn xdp_attachment(json: &str) -> Option<(&'static str, String)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let xdp = v.get(0)?.get("xdp")?;
    // One program: `xdp.prog`; several (multi-attach): the first of `xdp.attached`.
    let (mode, prog) = match xdp.get("prog") {
        Some(p) => (xdp.get("mode"), p),
        None => {
            let first = xdp.get("attached")?.get(0)?;
            (first.get("mode"), first.get("prog")?)
        }
    };
    // XDP_ATTACHED_DRV, _SKB, _HW from the kernel's uapi.
    let mode = match mode.and_then(serde_json::Value::as_u64) {
        Some(1) => "native",
        Some(2) => "generic",
        Some(3) => "offload",
        _ => "unknown",
    };
    let name = prog
        .get("name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("?");
    Some((mode, name.to_string()))
}

/// The LB answers the client through its own routing table.
fn route_back(client: IpAddr) -> Finding {
    let subject = format!("client {client}");
    match netif::ip_output(&["route", "get", &client.to_string()]) {
        Ok(route) => finding(
            Level::Ok,
            subject,
            format!(
                "routed back via `{}`",
                route.lines().next().unwrap_or("").trim()
            ),
        ),
        Err(e) => problem(
            Level::Fail,
            subject,
            format!("no route back from the LB: {e}"),
            format!("add a route to {client} on the LB (or a default route)"),
        ),
    }
}

/// Whether the listener's ACL admits `client`, and by which rule.
fn acl_verdict(cfg: &Config, listener: &str, client: IpAddr) -> Option<Finding> {
    let (i, l) = cfg
        .listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.name == listener)?;
    let subject = format!("client {client}");
    let family = |n: &ipnetwork::IpNetwork| n.ip().is_ipv4() == client.is_ipv4();
    if l.vip.is_ipv4() != client.is_ipv4() {
        return None;
    }
    if let Some(n) = l.acl.deny.iter().find(|n| n.contains(client)) {
        return Some(problem(
            Level::Fail,
            subject,
            format!("denied by listener `{listener}`'s acl.deny {n}"),
            format!("remove {n} from listeners[{i}].acl.deny (deny wins over allow)"),
        ));
    }
    let allow: Vec<_> = l.acl.allow.iter().filter(|n| family(n)).collect();
    if !allow.is_empty() && !allow.iter().any(|n| n.contains(client)) {
        let list: Vec<String> = allow.iter().map(|n| n.to_string()).collect();
        return Some(problem(
            Level::Fail,
            subject,
            format!(
                "not in listener `{listener}`'s acl.allow ({})",
                list.join(", ")
            ),
            format!("add {client} (or its network) to listeners[{i}].acl.allow"),
        ));
    }
    Some(finding(
        Level::Ok,
        subject,
        format!("admitted by listener `{listener}`'s ACL"),
    ))
}

/// Each backend of the scoped listeners' pools: health and weight as the agent sees them,
/// then a live check from the LB (the listener's transport, from the SNAT address). Pools
/// without a serving backend first, then two lines at most per backend.
async fn backends(s: &Status, scope: &[Scoped]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut rows: Vec<[Option<Finding>; 2]> = Vec::new();
    let mut probes = JoinSet::new();
    let mut seen = Vec::new();
    for l in s
        .listeners
        .iter()
        .filter(|l| scope.iter().any(|x| x.name == l.name))
    {
        let protocol = if l.protocol == "udp" {
            CheckProtocol::Udp
        } else {
            CheckProtocol::Tcp
        };
        let (what, refusal) = match l.requests {
            Some(_) => ("requests", "503"),
            None => ("flows", "RST or drops"),
        };
        for p in &l.pools {
            if !p.backends.iter().any(|b| b.serving) {
                out.push(problem(
                    Level::Fail,
                    format!("pool {}", p.name),
                    format!(
                        "no backend takes new {what} (listener `{}` answers them with {refusal})",
                        l.name
                    ),
                    "bring a backend back (see below), or give one a weight above 0",
                ));
            }
            for b in &p.backends {
                if seen.contains(&(&p.name, b.address)) {
                    continue;
                }
                seen.push((&p.name, b.address));
                let subject = format!("backend {}/{}", p.name, b.address);
                let state = backend_state(&subject, b);
                let state = match l.requests {
                    // The proxy's backend connections are its own: the datapath counts none.
                    None => state.or_else(|| unanswered(&subject, &l.protocol, &b.traffic)),
                    Some(_) => state,
                };
                rows.push([state, None]);
                let source = s
                    .snat
                    .iter()
                    .map(|n| n.address)
                    .find(|a| a.is_ipv4() == b.address.is_ipv4());
                let (row, addr) = (rows.len() - 1, b.address);
                probes.spawn(
                    async move { (row, probe_backend(subject, protocol, addr, source).await) },
                );
            }
        }
    }
    while let Some(Ok((row, f))) = probes.join_next().await {
        rows[row][1] = Some(f);
    }
    out.extend(rows.into_iter().flatten().flatten());
    out
}

fn backend_state(subject: &str, b: &crate::admin::status::Backend) -> Option<Finding> {
    let reason = b.reason.as_deref().unwrap_or("no reason recorded");
    Some(match b.health {
        HealthState::Unhealthy => problem(
            Level::Fail,
            subject,
            format!("unhealthy ({reason}): no new flows or requests"),
            "check the service on the backend and that its firewall admits the SNAT address",
        ),
        HealthState::Pending => problem(
            Level::Warn,
            subject,
            "no health check has passed yet: no new flows or requests",
            "wait one check interval, or look at why its checks fail",
        ),
        _ if b.drained => problem(
            Level::Warn,
            subject,
            "drained through the admin API: no new flows or requests",
            format!(
                "POST /backends/POOL/{}/drain with `false`, or reload the config",
                b.address
            ),
        ),
        _ if b.weight == 0 => problem(
            Level::Warn,
            subject,
            "weight 0: no new flows or requests",
            "give it a weight above 0",
        ),
        _ if !b.serving => finding(
            Level::Info,
            subject,
            "standby backup (its primaries are up)",
        ),
        _ => match b.l7_backoff_s {
            Some(s) => problem(
                Level::Warn,
                subject,
                format!(
                    "a connect from the L7 proxy failed (refused or timed out): no new requests \
                     for {s:.0} s more"
                ),
                "check the service on the backend; the proxy tries it again after the 10 s",
            ),
            None => return None,
        },
    })
}

/// Packets the datapath passed a backend while none came back: its answers do not return
/// through the LB, or it drops what it gets. Telling for TCP (a handshake always answers);
/// for UDP only a hint, since some services never answer.
fn unanswered(subject: &str, protocol: &str, t: &crate::admin::status::Traffic) -> Option<Finding> {
    if t.packets_in < UNANSWERED_AFTER || t.packets_out > 0 {
        return None;
    }
    let tcp = protocol == "tcp";
    Some(problem(
        if tcp { Level::Fail } else { Level::Warn },
        subject,
        format!(
            "got {} packets of {} flows through the LB and sent none back{}",
            t.packets_in,
            t.new_flows,
            if tcp { "" } else { " (fine for a service that never answers)" }
        ),
        "its route to the SNAT addresses must go through the LB; its firewall must admit them;          and senders must send valid checksums (on veth, turn TX checksum offload off:          `ethtool -K DEV tx off`; the backend's `nstat TcpInCsumErrors` counts those it drops)",
    ))
}

/// Packets a backend gets before its silence counts (a SYN and its retransmissions).
const UNANSWERED_AFTER: u64 = 3;

/// Connects (tcp) or sends a datagram (udp) to the backend from `source`; when that fails,
/// pings it to tell a closed port from an unreachable host.
async fn probe_backend(
    subject: String,
    protocol: CheckProtocol,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Finding {
    let run = |protocol| {
        let p = Arc::new(Prober::new(
            &HealthCheck::once(protocol, PROBE_TIMEOUT),
            addr,
            source,
        ));
        async move {
            tokio::time::timeout(PROBE_TIMEOUT * 2, p.probe())
                .await
                .unwrap_or(Err(ProbeError::Timeout))
        }
    };
    let from = source.map_or_else(|| "the LB".to_string(), |s| s.to_string());
    let what = if protocol == CheckProtocol::Udp {
        "udp"
    } else {
        "tcp"
    };
    let e = match run(protocol).await {
        Ok(()) => {
            return finding(
                Level::Ok,
                subject,
                format!("{what} port {} answers from {from}", addr.port()),
            )
        }
        Err(e) => e,
    };
    let pings = run(CheckProtocol::Icmp).await.is_ok();
    let text = format!("{what} port {} from {from}: {e}", addr.port());
    match (e, pings) {
        (ProbeError::Refused | ProbeError::PortUnreachable, _) => problem(
            Level::Fail,
            subject,
            format!("{text} (the host is up, nothing listens)"),
            format!("start the service on {addr}, listening on the backend's address (not only 127.0.0.1)"),
        ),
        (_, true) => problem(
            Level::Fail,
            subject,
            format!("{text} (it answers ping)"),
            format!("open {what} port {} to {from} in the backend's firewall", addr.port()),
        ),
        (_, false) => problem(
            Level::Fail,
            subject,
            format!("{text}; no ping answer either: unreachable from the LB"),
            "check that the backend is up and routed from the LB's backend-side interface",
        ),
    }
}

/// SNAT ports, conntrack entries and what the datapath dropped, from the status.
/// How long after the first view of the status a second one shows the counters moved (the
/// agent refreshes them every sweep, `gc::INTERVAL`).
const COUNTERS_MOVE: Duration = Duration::from_millis(1100);

/// Table and port pressure in `s`, and the drops it counts: a problem while they rise since
/// `earlier` (or always without it), worth knowing when they stopped.
fn pressure(s: &Status, earlier: Option<&Status>) -> Vec<Finding> {
    let mut out = Vec::new();
    let count = |name: &str| s.packets.get(name).copied().unwrap_or(0);
    for n in &s.snat {
        let subject = format!("snat {}", n.address);
        let used = n.busiest_backend_ports as f64 / n.port_range.max(1) as f64;
        let text = format!(
            "{} ports in use, {} of {} towards the busiest backend ({:.0}%)",
            n.ports_in_use,
            n.busiest_backend_ports,
            n.port_range,
            used * 100.0
        );
        out.push(if used >= PRESSURE_WARN {
            problem(
                Level::Warn,
                subject,
                text,
                "add SNAT addresses (snat.addresses) or widen snat.ports",
            )
        } else {
            finding(Level::Ok, subject, text)
        });
    }
    // Each table fills on its own (a SYN flood fills a handshake table): each is judged alone.
    let pressed: Vec<_> = s
        .conntrack
        .tables
        .iter()
        .filter(|t| t.entries as f64 >= t.capacity.max(1) as f64 * PRESSURE_WARN)
        .collect();
    for t in &pressed {
        let text = format!(
            "{} of {} entries ({:.0}%)",
            t.entries,
            t.capacity,
            t.entries as f64 * 100.0 / t.capacity.max(1) as f64
        );
        let fix = if t.table.ends_with("handshake") {
            "unanswered handshakes (a SYN flood?): filter the source with the listener's acl"
        } else {
            "lower idle_timeout on busy listeners; the oldest flows are evicted when full"
        };
        out.push(problem(
            Level::Warn,
            format!("conntrack {}", t.table),
            text,
            fix,
        ));
    }
    if pressed.is_empty() {
        let (entries, capacity) = (s.conntrack.entries, s.conntrack.capacity.max(1));
        let text = format!(
            "{entries} of {capacity} entries ({:.0}%)",
            entries as f64 * 100.0 / capacity as f64
        );
        out.push(finding(Level::Ok, "conntrack", text));
    }
    for (counter, level, what, fix) in [
        (
            "drop_snat_exhausted",
            Level::Fail,
            "new flows dropped for want of a free SNAT port",
            "add SNAT addresses (snat.addresses) or widen snat.ports",
        ),
        (
            "drop_conntrack_full",
            Level::Fail,
            "new flows dropped: the conntrack table refused the entry",
            "lower idle_timeout on busy listeners",
        ),
        (
            "drop_no_route",
            Level::Warn,
            "packets dropped: no route to their rewritten destination",
            "add routes from the LB to the backends and the clients",
        ),
        (
            "drop_no_backend",
            Level::Warn,
            "new flows dropped: no backend could take them (all down or drained)",
            "bring backends back or raise their weights",
        ),
        (
            "rst_no_backend",
            Level::Warn,
            "TCP connections refused with RST: no backend could take them",
            "bring backends back or raise their weights",
        ),
        (
            "drop_acl",
            Level::Info,
            "new flows refused by listener ACLs",
            "check acl.allow / acl.deny if a client should get in (--client tells)",
        ),
    ] {
        let n = count(counter);
        let before = earlier.map(|e| e.packets.get(counter).copied().unwrap_or(0));
        match before {
            Some(b) if n > 0 && n <= b => out.push(problem(
                Level::Info,
                "datapath",
                format!("{n} {what} ({counter}) since the agent started; none now"),
                fix,
            )),
            _ if n > 0 => out.push(problem(
                level,
                "datapath",
                match before {
                    Some(b) => format!(
                        "{} {what} ({counter}) in the last second, {n} since the agent started",
                        n - b
                    ),
                    None => format!("{n} {what} ({counter}) since the agent started"),
                },
                fix,
            )),
            _ => {}
        }
    }
    out
}

/// 5xx answers of an http/https listener in the last `RECENT`, from its access log.
fn recent_errors(cfg: &Config, listener: &str, now: SystemTime) -> Option<Finding> {
    let l = cfg
        .listeners
        .iter()
        .find(|l| l.name == listener && l.protocol.is_l7())?;
    let subject = format!("listener {listener}");
    let Some(path) = &l.access_log else {
        return Some(finding(
            Level::Info,
            subject,
            "access log goes to the agent's stdout: recent 5xx not checked (set access_log)",
        ));
    };
    let text = match tail(path) {
        Ok(t) => t,
        Err(e) => {
            return Some(problem(
                Level::Warn,
                subject,
                format!("cannot read the access log {}: {e}", path.display()),
                "check the path and its permissions",
            ))
        }
    };
    let errors = count_5xx(&text, listener, now);
    if errors.is_empty() {
        return Some(finding(
            Level::Ok,
            subject,
            format!(
                "no 5xx in the last {} min of {}",
                RECENT.as_secs() / 60,
                path.display()
            ),
        ));
    }
    let total: u64 = errors.values().map(|(n, _)| n).sum();
    let parts: Vec<String> = errors
        .iter()
        .map(|(code, (n, upstream))| match upstream {
            Some(u) => format!("{code}×{n} (last via {u})"),
            None => format!("{code}×{n}"),
        })
        .collect();
    let (&worst, _) = errors.iter().max_by_key(|(_, (n, _))| *n)?;
    Some(problem(
        Level::Fail,
        subject,
        format!(
            "{total} answers 5xx in the last {} min: {}",
            RECENT.as_secs() / 60,
            parts.join(", ")
        ),
        advice(worst),
    ))
}

/// What the vendors' 5xx checklists say to look at first, by code.
fn advice(code: u16) -> &'static str {
    match code {
        500 => "the backend's own error: read its application log",
        502 => "backends reset or answered non-HTTP: check their logs, and that their keep-alive timeout is longer than the LB's",
        503 => "no backend was available: check their health and weights (diagnose lists them above)",
        504 => "backends too slow or unreachable: check them, or raise timeouts.connect / timeouts.response",
        _ => "check the backends' logs for the failing requests",
    }
}

/// The last `LOG_TAIL_BYTES` of a file, from its first whole line.
fn tail(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(match (start, text.split_once('\n')) {
        (0, _) | (_, None) => text,
        (_, Some((_, rest))) => rest.to_string(),
    })
}

/// 5xx answers of `listener` at most `RECENT` before `now`, by status: (count, the upstream
/// of the last one, if any).
fn count_5xx(log: &str, listener: &str, now: SystemTime) -> BTreeMap<u16, (u64, Option<String>)> {
    let mut out: BTreeMap<u16, (u64, Option<String>)> = BTreeMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let status = v
            .get("status")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if !(500..600).contains(&status)
            || v.get("listener").and_then(|l| l.as_str()) != Some(listener)
        {
            continue;
        }
        let recent = v
            .get("time")
            .and_then(|t| humantime::parse_rfc3339(t.as_str()?).ok())
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() <= RECENT);
        if !recent {
            continue;
        }
        let upstream = v
            .get("upstream_addr")
            .and_then(|u| u.as_str())
            .filter(|u| *u != "-")
            .map(str::to_string);
        let e = out.entry(status as u16).or_default();
        e.0 += 1;
        if upstream.is_some() {
            e.1 = upstream;
        }
    }
    out
}

#[cfg(test)]
mod tests;
