//! Packet fuzzing through BPF_PROG_TEST_RUN (part of `cargo xtask test`; needs root): a
//! million random and mutated frames (truncated headers, bad lengths, IPv4 options, fragments,
//! odd TCP flags, ICMP errors) through the real program. It must never return XDP_ABORTED,
//! never send out a frame whose checksums are wrong when the input's were right, and its
//! counters must account for every frame.

#[path = "fixture.rs"]
mod fixture;

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use fastrand::Rng;
use fixture::*;

const FRAMES: u64 = 1_000_000;

/// Whether a frame's IPv4 header and L4 checksums verify (false when it does not parse).
fn checksums_ok(frame: &[u8]) -> bool {
    let Ok(h) = PacketHeaders::from_ethernet_slice(frame) else {
        return false;
    };
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        return false;
    };
    if ip.header_checksum != ip.calc_header_checksum() {
        return false;
    }
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => t
            .calc_checksum_ipv4(ip, payload)
            .is_ok_and(|c| c == t.checksum),
        Some(TransportHeader::Udp(u)) => {
            u.checksum == 0
                || u.calc_checksum_ipv4(ip, payload)
                    .is_ok_and(|c| c == u.checksum)
        }
        Some(TransportHeader::Icmpv4(i)) => {
            etherparse::Icmpv4Header::with_checksum(i.icmp_type.clone(), payload).checksum
                == i.checksum
        }
        _ => false,
    }
}

/// A valid frame of a random kind: towards the VIP (TCP with random flags, UDP), towards
/// other addresses, replies from backends, ICMP errors quoting them.
fn seed(rng: &mut Rng) -> (Vec<u8>, u32) {
    let client = (
        [10, 91, (rng.u64(..4)) as u8, rng.u64(..250) as u8 + 1],
        1024 + rng.u64(..60000) as u16,
    );
    let mut v = Vec::new();
    let payload: Vec<u8> = (0..rng.u64(..64)).map(|_| rng.u64(..) as u8).collect();
    let ingress = match rng.u64(..5) {
        0 | 1 => {
            let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_EXT_MAC).ipv4(client.0, VIP.0, 64);
            let mut t = b.tcp(client.1, VIP.1, rng.u64(..) as u32, 64240);
            let flags = rng.u64(..);
            if flags & 1 != 0 || rng.u64(..2) == 0 {
                t = t.syn();
            }
            if flags & 2 != 0 {
                t = t.ack(rng.u64(..) as u32);
            }
            if flags & 4 != 0 {
                t = t.fin();
            }
            if flags & 8 != 0 {
                t = t.rst();
            }
            if flags & 16 != 0 {
                t = t.psh();
            }
            t.write(&mut v, &payload).unwrap();
            0
        }
        2 => {
            let port = if rng.u64(..2) == 0 { 53 } else { VIP.1 };
            PacketBuilder::ethernet2(CLIENT_MAC, LB_EXT_MAC)
                .ipv4(client.0, VIP.0, 64)
                .udp(client.1, port)
                .write(&mut v, &payload)
                .unwrap();
            0
        }
        3 => {
            let backend = ([10, 91, 2, 11 + rng.u64(..3) as u8], 8080);
            let t = PacketBuilder::ethernet2(BACKEND_MACS[0], LB_INT_MAC)
                .ipv4(backend.0, SNAT, 64)
                .tcp(
                    backend.1,
                    20000 + rng.u64(..40000) as u16,
                    rng.u64(..) as u32,
                    64240,
                )
                .ack(rng.u64(..) as u32);
            t.write(&mut v, &payload).unwrap();
            1
        }
        _ => {
            let quoted = tcp_frame(
                LB_INT_MAC,
                BACKEND_MACS[0],
                (SNAT, 20000 + rng.u64(..40000) as u16),
                ([10, 91, 2, 11], 8080),
                "S",
            );
            PacketBuilder::ethernet2(BACKEND_MACS[0], LB_INT_MAC)
                .ipv4([10, 91, 2, 254], SNAT, 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1400,
                    },
                ))
                .write(&mut v, &quoted[14..14 + 20 + rng.u64(..21) as usize])
                .unwrap();
            1
        }
    };
    (v, ingress)
}

/// One random damage: truncation, byte flips, IHL/options, total length, fragment bits, flags.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    match rng.u64(..8) {
        // BPF_PROG_TEST_RUN itself refuses frames shorter than an Ethernet header.
        0 => v.truncate(14 + rng.u64(..v.len() as u64 - 13) as usize),
        1 => {
            for _ in 0..=rng.u64(..4) {
                let i = rng.u64(..v.len() as u64) as usize;
                v[i] = rng.u64(..) as u8;
            }
        }
        2 if v.len() > 14 => v[14] = 0x40 | (rng.u64(..16) as u8), // IHL 0..15
        3 if v.len() > 17 => {
            let len = rng.u64(..) as u16;
            v[16..18].copy_from_slice(&len.to_be_bytes());
        }
        4 if v.len() > 21 => v[20] |= if rng.u64(..2) == 0 { 0x20 } else { 0x1f }, // MF / offset
        5 if v.len() > 47 => v[47] = rng.u64(..) as u8,                            // TCP flags
        6 if v.len() > 34 => {
            // Insert IPv4 options, fixing IHL and total length (checksum left stale).
            let n = 4 * (1 + rng.u64(..10) as usize);
            let opts: Vec<u8> = (0..n).map(|_| rng.u64(..) as u8).collect();
            v.splice(34..34, opts);
            v[14] = 0x45 + (n / 4) as u8;
            let total = (v.len() - 14) as u16;
            v[16..18].copy_from_slice(&total.to_be_bytes());
        }
        _ => {}
    }
}

#[test]
fn a_million_fuzzed_frames_never_abort_never_corrupt_and_are_all_counted() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&config_with_udp());
        // Seeded: every run fuzzes the same frames.
        let mut rng = Rng::with_seed(0x9e37_79b9_7f4a_7c15);
        let (mut sent_out, mut verified, mut mutated) = (0u64, 0u64, 0u64);
        let mut actions = [0u64; 5];
        for _ in 0..FRAMES {
            let (mut frame, ingress) = seed(&mut rng);
            if rng.u64(..2) == 0 {
                mutate(&mut rng, &mut frame);
                mutated += 1;
            }
            let input_ok = checksums_ok(&frame);
            let ifindex = if ingress == 0 { f.ext } else { f.int };
            let (action, out) = f.run(&frame, ifindex);
            assert_ne!(action, 0, "XDP_ABORTED on {frame:02x?}");
            assert!(action <= XDP_REDIRECT, "unknown action {action}");
            actions[action as usize] += 1;
            if action == XDP_TX || action == XDP_REDIRECT {
                sent_out += 1;
                if input_ok {
                    verified += 1;
                    assert!(
                        checksums_ok(&out),
                        "bad checksum out of {frame:02x?}\n-> {out:02x?}"
                    );
                }
            }
        }
        let counted: u64 =
            f.dp.snapshot(2)
                .unwrap()
                .counters
                .iter()
                .map(|(_, n)| n)
                .sum();
        println!(
            "{FRAMES} frames ({mutated} mutated): drop {}, pass {}, tx {}, redirect {}; \
             {sent_out} sent out, {verified} of them from valid input, all with valid checksums",
            actions[1], actions[2], actions[3], actions[4]
        );
        assert_eq!(counted, FRAMES, "every frame is counted exactly once");
    });
}
