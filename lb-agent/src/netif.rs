//! Host network settings the fast path relies on.
//!
//! - Forwarding on every XDP interface (and IPv6 forwarding host-wide when IPv6 is served): `bpf_fib_lookup` refuses to route for a device with
//!   forwarding off, and packets whose next hop is unresolved are handed to the kernel's own
//!   forwarding (which resolves it).
//! - `accept_local` and no reverse-path filter on those interfaces: those handed-over packets
//!   carry a local source (the SNAT address or the VIP).
//! - VIPs as local addresses (IPv4 on `lo`, IPv6 on the first XDP interface, since the kernel
//!   only answers neighbour solicitations for addresses on the receiving interface), so the LB
//!   answers ARP/ND for them. Only addresses this agent added are removed again.
//! - The SNAT port range in `ip_local_reserved_ports`, so the kernel never hands one of those
//!   ports to a local socket (health probes, the L7 proxy) on the same address.

use std::{net::IpAddr, path::Path, process::Command};

use tracing::{info, warn};

use crate::config::PortRange;

#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    #[error("writing {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip`: {0}")]
    Spawn(#[source] std::io::Error),
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetifError> {
    std::fs::write(path, value).map_err(|source| NetifError::Sysctl {
        path: path.into(),
        source,
    })
}

/// A sysctl's value, trimmed; `None` when it cannot be read.
pub fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Enables forwarding and accept_local and disables rp_filter on `iface`.
pub fn prepare_interface(iface: &str) -> Result<(), NetifError> {
    let v4 = format!("/proc/sys/net/ipv4/conf/{iface}");
    write_sysctl(&format!("{v4}/forwarding"), "1")?;
    write_sysctl(&format!("{v4}/accept_local"), "1")?;
    write_sysctl(&format!("{v4}/rp_filter"), "0")?;
    let v6 = format!("/proc/sys/net/ipv6/conf/{iface}/forwarding");
    if Path::new(&v6).exists() {
        write_sysctl(&v6, "1")?;
    }
    // The effective rp_filter is the larger of `all` and the interface's own.
    if read_sysctl("/proc/sys/net/ipv4/conf/all/rp_filter")
        .as_deref()
        .is_some_and(|v| v != "0")
    {
        warn!(
            iface,
            "net.ipv4.conf.all.rp_filter is on: replies handed to the kernel may be dropped"
        );
    }
    Ok(())
}

/// Enables IPv6 forwarding host-wide: unlike IPv4, the kernel only forwards IPv6 (the fallback
/// for packets whose next hop is unresolved) when `all.forwarding` is on.
pub fn enable_ipv6_forwarding() -> Result<(), NetifError> {
    const PATH: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    if read_sysctl(PATH).as_deref() != Some("1") {
        write_sysctl(PATH, "1")?;
        info!("net.ipv6.conf.all.forwarding enabled (IPv6 listeners)");
    }
    Ok(())
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `range` to `net.ipv4.ip_local_reserved_ports` (which also covers IPv6 sockets).
pub fn reserve_ports(range: PortRange) -> Result<(), NetifError> {
    const PATH: &str = RESERVED_PORTS;
    let current = read_sysctl(PATH).unwrap_or_default();
    let entry = range.to_string();
    if current.split(',').any(|r| r == entry) {
        return Ok(());
    }
    let value = if current.is_empty() {
        entry
    } else {
        format!("{current},{entry}")
    };
    write_sysctl(PATH, &value)
}

/// Takes `range` (as `reserve_ports` wrote it) out of the reserved ports again.
pub fn unreserve_ports(range: &str) -> Result<(), NetifError> {
    let current = read_sysctl(RESERVED_PORTS).unwrap_or_default();
    let kept: Vec<&str> = current
        .split(',')
        .filter(|r| !r.is_empty() && *r != range)
        .collect();
    if kept.len() == current.split(',').filter(|r| !r.is_empty()).count() {
        return Ok(());
    }
    // A zero-length write would not reach the sysctl: "\n" clears it.
    write_sysctl(RESERVED_PORTS, &format!("{}\n", kept.join(",")))
}

fn ip(args: &[&str]) -> Result<(), NetifError> {
    ip_output(args).map(drop)
}

/// Runs `ip ARGS`; its standard output.
pub fn ip_output(args: &[&str]) -> Result<String, NetifError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetifError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetifError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// An address the agent added, as `ip addr` takes it: (`cidr`, `dev`).
pub type Added = (String, String);

/// Makes every VIP a local address unless it already is one, and removes the addresses in
/// `added` (what agents added before) that are no VIP any more. Returns what is added now:
/// the addresses stay when the agent exits (the dataplane keeps serving), and
/// `remove_addresses` takes them away on `lb-agent stop --detach`.
pub fn sync_vip_addresses(
    vips: &[IpAddr],
    local: &[IpAddr],
    v6_iface: &str,
    added: &[Added],
) -> Result<Vec<Added>, NetifError> {
    let mut now: Vec<Added> = Vec::new();
    for vip in vips {
        let (cidr, dev) = match vip {
            IpAddr::V4(_) => (format!("{vip}/32"), "lo".to_string()),
            IpAddr::V6(_) => (format!("{vip}/128"), v6_iface.to_string()),
        };
        let entry = (cidr, dev);
        if now.contains(&entry) {
            continue;
        }
        if !added.contains(&entry) {
            if local.contains(vip) {
                continue;
            }
            let mut args = vec!["addr", "add", &entry.0, "dev", &entry.1];
            if vip.is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
            info!(%vip, dev = entry.1, "VIP address added");
        }
        now.push(entry);
    }
    let gone: Vec<Added> = added.iter().filter(|a| !now.contains(a)).cloned().collect();
    remove_addresses(&gone);
    Ok(now)
}

/// Removes addresses the agent added (failures are logged: the interface may be gone).
pub fn remove_addresses(added: &[Added]) {
    for (cidr, dev) in added {
        match ip(&["addr", "del", cidr, "dev", dev]) {
            Ok(()) => info!(address = cidr, dev, "VIP address removed"),
            Err(e) => warn!(error = %e, "removing VIP address"),
        }
    }
}
