//! A SYN flood from random spoofed sources at a set rate, through a raw socket: what
//! `hping3 --flood --rand-source` sends, paced. An unpaced flood on a machine whose few cores
//! also run the clients, the LB and the backends takes them all: past the rate the LB
//! forwards, the veth queues drop real packets as often as the flood's, and the softirq load
//! starves every thread (on CI, 208k SYN/s held 6 established flows' echoes back for 3 s).
//! At a paced rate the flood still turns the LB's handshake table over many times, and what
//! real traffic loses is the LB's doing.

use std::{
    net::SocketAddrV4,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use fastrand::Rng;
use lb_common::csum::{checksum_be, sum_be};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

use crate::Netns;

/// Sending happens in bursts this far apart (timer slack makes finer sleeps inexact).
const TICK: Duration = Duration::from_millis(1);

/// A running flood; stopped (and its sender thread joined) by `stop` or on drop.
pub struct SynFlood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl SynFlood {
    /// Starts sending `per_sec` SYNs a second from `ns` to `dst`, each from a random source
    /// address and port. A sender that falls behind does not catch up in bursts.
    pub fn start(ns: &Netns, dst: SocketAddrV4, per_sec: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, ns) = (stop.clone(), ns.name.clone());
        let thread = std::thread::spawn(move || {
            let entered = crate::netns::enter(&ns);
            // IPPROTO_RAW: the IP header is ours; the kernel fills in its length and checksum.
            let fd = socket::socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::Raw,
            )
            .expect("raw socket");
            drop(entered);
            let to = socket::SockaddrIn::from(dst);
            let per_tick = (u64::from(per_sec) * TICK.as_nanos() as u64 / 1_000_000_000).max(1);
            let mut rng = Rng::new();
            let (mut sent, mut next) = (0, Instant::now());
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..per_tick {
                    let syn = syn(&mut rng, dst);
                    if socket::sendto(fd.as_raw_fd(), &syn, &to, MsgFlags::empty()).is_ok() {
                        sent += 1;
                    }
                }
                next += TICK;
                let now = Instant::now();
                match next.checked_duration_since(now) {
                    Some(wait) => std::thread::sleep(wait),
                    None => next = now,
                }
            }
            sent
        });
        SynFlood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the flood; the number of SYNs sent.
    pub fn stop(mut self) -> u64 {
        self.halt().map_or(0, |r| r.expect("flood thread"))
    }

    fn halt(&mut self) -> Option<std::thread::Result<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(JoinHandle::join)
    }
}

impl Drop for SynFlood {
    fn drop(&mut self) {
        // A test that failed first is unwinding already: not a second panic here.
        let _ = self.halt();
    }
}

/// A TCP SYN to `dst` in an IPv4 header (no options, as hping3 sends it) from a random
/// unicast source outside 10/8 (the test topologies' addresses) and 127/8.
fn syn(rng: &mut Rng, dst: SocketAddrV4) -> [u8; 40] {
    let src = loop {
        let a = rng.u32(..);
        if !matches!(a >> 24, 0 | 10 | 127 | 224..) {
            break a.to_be_bytes();
        }
    };
    let (sport, seq) = (rng.u16(1024..), rng.u32(..));
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst.ip().octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // RFC 793 pseudo-header: source, destination, protocol, TCP length.
    let pseudo = sum_be(&src, 0) + sum_be(&dst.ip().octets(), 0) + 6 + 20;
    let check = checksum_be(tcp, pseudo);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice};

    use super::*;

    #[test]
    fn syns_carry_a_valid_tcp_checksum_and_a_spoofable_source() {
        let mut rng = Rng::new();
        let dst = SocketAddrV4::new([192, 0, 2, 7].into(), 9000);
        for _ in 0..1000 {
            let p = syn(&mut rng, dst);
            let ip = Ipv4HeaderSlice::from_slice(&p).unwrap();
            let tcp = TcpHeaderSlice::from_slice(&p[20..]).unwrap();
            let src = ip.source_addr();
            assert!(src.octets()[0] != 10 && !src.is_loopback() && !src.is_multicast());
            assert_eq!(
                (ip.destination_addr(), tcp.destination_port()),
                (*dst.ip(), 9000)
            );
            assert!(tcp.syn() && !tcp.ack());
            let want = tcp
                .to_header()
                .calc_checksum_ipv4_raw(ip.source(), ip.destination(), &[])
                .unwrap();
            assert_eq!(tcp.checksum(), want);
        }
    }
}
