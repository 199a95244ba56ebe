//! `reset_on_idle`: when an established TCP flow idles out, the agent resets both ends, as the
//! vendors' load balancers do, so neither keeps a connection the LB has forgotten (the next
//! packet would be dropped as a mid-stream miss and the peer would hang until its own timeout).
//!
//! Each RST carries exactly the sequence number its receiver expects next, which is the last
//! acknowledgment number the datapath saw from that receiver (`ConnEntry::ack_be`): RFC 5961
//! receivers accept only that. The segments are written whole (IP header included) to a raw
//! socket, so the client's RST leaves from the VIP and the backend's from the SNAT address.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    conn::{CONN_F_RESET_IDLE, STATE_ESTABLISHED, TCP_RST},
    csum,
    flow::{FAMILY_V4, PROTO_TCP},
    ConnEntry, FlowKey,
};
use socket2::{Domain, Protocol, Socket, Type};

/// One RST: from `src` to `dst` with sequence number `seq` (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
}

/// The two RSTs for an idled-out flow: (`key`, `e`) is its original entry (client → VIP),
/// (`pair_key`, `pair`) its reply entry (backend → SNAT address). None for flows that are not
/// established TCP flows of a resetting listener, or that never carried an ACK.
pub fn for_flow(key: &FlowKey, e: &ConnEntry, pair_key: &FlowKey, pair: &ConnEntry) -> Vec<Reset> {
    if key.proto != PROTO_TCP || e.state != STATE_ESTABLISHED || e.flags & CONN_F_RESET_IDLE == 0 {
        return Vec::new();
    }
    // Packets of `k` came from its source; the RST goes back to it, from its destination.
    let back = |k: &FlowKey, ack_be: u32| {
        (ack_be != 0).then(|| Reset {
            src: SocketAddr::new(addr(k, &k.dst_be), u16::from_be(k.dport_be)),
            dst: SocketAddr::new(addr(k, &k.src_be), u16::from_be(k.sport_be)),
            seq: u32::from_be(ack_be),
        })
    };
    [back(key, e.ack_be), back(pair_key, pair.ack_be)]
        .into_iter()
        .flatten()
        .collect()
}

fn addr(k: &FlowKey, a: &[u32; 4]) -> IpAddr {
    let bytes: Vec<u8> = a.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if k.family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&bytes);
        IpAddr::from(v6)
    }
}

/// The IP packet of `r`: a 20-byte TCP header with only RST set, checksums filled in.
pub fn segment(r: &Reset) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&r.src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&r.dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&r.seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST;
    let (mut packet, pseudo) = match (r.src.ip(), r.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let check = csum::checksum_be(&ip, 0);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            let pseudo = csum::sum_be(&ip[12..20], PROTO_TCP as u64 + 20);
            (ip, pseudo)
        }
        (s, d) => {
            let (s, d) = (v6(s), v6(d));
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64];
            ip.extend_from_slice(&s);
            ip.extend_from_slice(&d);
            let pseudo = csum::sum_be(&ip[8..40], PROTO_TCP as u64 + 20);
            (ip, pseudo)
        }
    };
    let check = csum::checksum_be(&tcp, pseudo);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    packet.extend_from_slice(&tcp);
    packet
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

/// Sends `resets` through raw sockets (IPPROTO_RAW: the IP header is ours). Returns how many
/// left; failures are reported once, with the count.
pub fn send(resets: &[Reset]) -> std::io::Result<usize> {
    let mut sent = 0;
    let mut last_err = None;
    let mut sockets: [Option<Socket>; 2] = [None, None];
    for r in resets {
        let (slot, domain) = match r.dst {
            SocketAddr::V4(_) => (0, Domain::IPV4),
            SocketAddr::V6(_) => (1, Domain::IPV6),
        };
        let sock = match &mut sockets[slot] {
            Some(s) => s,
            none => none.insert(Socket::new(
                domain,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )?),
        };
        // The kernel takes the destination from the header; the address only picks the route
        // (and must carry no port for raw IPv6 sockets).
        let dst = SocketAddr::new(r.dst.ip(), 0);
        match sock.send_to(&segment(r), &dst.into()) {
            Ok(_) => sent += 1,
            Err(e) => last_err = Some(e),
        }
    }
    match (sent, last_err) {
        (0, Some(e)) => Err(e),
        _ => Ok(sent),
    }
}

#[cfg(test)]
mod tests;
