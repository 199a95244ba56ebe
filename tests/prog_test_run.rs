//! Packet fixtures through BPF_PROG_TEST_RUN: the real program, loaded by the agent's loader and
//! filled from a config, runs on hand-built frames; outputs are parsed and their checksums
//! recomputed by etherparse (an implementation independent of ours). Needs root.
//!
//! The namespace gives the FIB what a real LB has: lb-ext (client side) and lb-int (backend
//! side) with permanent neighbour entries, so the program's redirect decision is deterministic.

#[path = "fixture.rs"]
mod fixture;

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use fixture::*;
use lb_agent::gc;
use lb_common::{
    counters::{Counter, ListenerStats},
    maps::CONNTRACK_SYN_ENTRIES,
};

#[test]
fn syn_to_vip_is_fullnat_rewritten_and_the_syn_ack_comes_back_to_the_client() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let syn = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S");
        let (action, out) = f.run(&syn, f.ext);
        assert_eq!(action, XDP_REDIRECT, "SYN to the VIP goes out lb-int");
        let p = parse_checked(&out);
        assert!(p.syn && !p.ack);
        assert_eq!(p.src.0, SNAT, "source is the SNAT address");
        // The client's port is in the SNAT range, so it is kept (keep-or-probe).
        assert_eq!(p.src.1, CLIENT.1);
        assert_eq!(p.dst.1, 8080);
        let b = (p.dst.0[3] - 11) as usize;
        assert!(b < 3, "destination {:?} is a backend", p.dst.0);
        assert_eq!(p.dst_mac, BACKEND_MACS[b], "next hop MAC from the FIB");
        assert_eq!(p.src_mac, LB_INT_MAC);

        // A retransmitted SYN hits the same conntrack entry: same backend, same port.
        let (action, again) = f.run(&syn, f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, again);

        // The backend's SYN-ACK to SNAT:port is rewritten back to VIP → client.
        let backend = (p.dst.0, p.dst.1);
        let synack = tcp_frame(BACKEND_MACS[b], LB_INT_MAC, backend, (SNAT, p.src.1), "SA");
        let (action, out) = f.run(&synack, f.int);
        assert_eq!(action, XDP_REDIRECT, "reply goes out lb-ext");
        let r = parse_checked(&out);
        assert!(r.syn && r.ack);
        assert_eq!(r.src, VIP);
        assert_eq!(r.dst, CLIENT);
        assert_eq!(r.dst_mac, CLIENT_MAC);
        assert_eq!(r.src_mac, LB_EXT_MAC);

        // The established flow keeps going in both directions.
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&out).dst, backend);
        assert_eq!(
            f.dp.conntrack_entries().len(),
            2,
            "one original and one reply entry"
        );

        // The chosen backend counted the flow and its packets (SYN twice and the ACK in, the
        // SYN-ACK out, by frame length); the others nothing.
        let stats = f.dp.backend_stats(3).unwrap();
        let frame = syn.len() as u64;
        assert_eq!(stats[b].new_flows, 1, "{stats:?}");
        assert_eq!((stats[b].packets_in, stats[b].bytes_in), (3, 3 * frame));
        assert_eq!((stats[b].packets_out, stats[b].bytes_out), (1, frame));
        for (i, s) in stats.iter().enumerate().filter(|&(i, _)| i != b) {
            assert_eq!(s.packets_in + s.packets_out + s.new_flows, 0, "backend {i}");
        }
    });
}

#[test]
fn a_client_port_outside_the_snat_range_gets_one_inside_it() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let (action, out) = f.run(
            &tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 2], 61000), VIP, "S"),
            f.ext,
        );
        assert_eq!(action, XDP_REDIRECT);
        let p = parse_checked(&out);
        assert!((20000..=60000).contains(&p.src.1), "port {}", p.src.1);
    });
}

#[test]
fn packets_not_for_a_vip_pass_unchanged() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        for (dst, iface) in [
            (([10, 91, 0, 1], 22), f.ext),
            (([10, 91, 0, 100], 81), f.ext),
            ((SNAT, 22), f.int),
        ] {
            let frame = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, dst, "S");
            let (action, out) = f.run(&frame, iface);
            assert_eq!(action, XDP_PASS, "{dst:?}");
            assert_eq!(out, frame, "untouched");
        }
        // Not IP at all (ARP).
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(f.run(&arp, f.ext).0, XDP_PASS);
        assert!(f.dp.conntrack_entries().is_empty());
    });
}

#[test]
fn a_mid_stream_packet_without_conntrack_is_dropped() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext);
        assert_eq!(action, XDP_DROP);
        assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropNoConntrack), 1);
    });
}

#[test]
fn truncated_headers_are_dropped_as_malformed() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let syn = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S");
        // Cut inside the TCP header, with the IP total length still claiming the full packet.
        let (action, _) = f.run(&syn[..14 + 20 + 10], f.ext);
        assert_eq!(action, XDP_DROP);
        assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropMalformed), 1);
        assert!(f.dp.conntrack_entries().is_empty());
    });
}

#[test]
fn acl_deny_wins_over_allow_and_refused_clients_are_dropped_and_counted() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let config = CONFIG.replace(
            "pool: web }",
            "pool: web, acl: { allow: [10.91.0.0/24], deny: [10.91.0.66/32] } }",
        );
        let mut f = Fixture::new(&config);
        assert!(
            syn_backend(&mut f, ([10, 91, 0, 2], 40000)).is_ok(),
            "allowed client"
        );
        assert_eq!(
            syn_backend(&mut f, ([10, 91, 0, 66], 40000)),
            Err(XDP_DROP),
            "denied inside allow"
        );
        assert_eq!(
            syn_backend(&mut f, ([10, 92, 0, 2], 40000)),
            Err(XDP_DROP),
            "not in allow list"
        );
        assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropAcl), 2);
        assert_eq!(
            f.dp.conntrack_entries().len(),
            2,
            "only the allowed flow is tracked"
        );

        // Re-applying without the ACL admits everyone again (stale prefixes are removed).
        f.reconfigure(CONFIG);
        assert!(syn_backend(&mut f, ([10, 92, 0, 2], 40001)).is_ok());
    });
}

#[test]
fn source_ip_scheduling_sends_every_flow_of_a_client_to_one_backend() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f =
            Fixture::new(&CONFIG.replace("pool: web }", "pool: web, scheduler: source_ip }"));
        for client in [[10, 91, 0, 2], [10, 91, 0, 3], [10, 91, 0, 4]] {
            let first = syn_backend(&mut f, (client, 30000)).unwrap();
            for port in 30001..30040 {
                assert_eq!(
                    syn_backend(&mut f, (client, port)).unwrap(),
                    first,
                    "{client:?}:{port}"
                );
            }
        }
        // Maglev on the 5-tuple spreads one client's flows over the backends.
        let mut f = Fixture::new(CONFIG);
        let seen: std::collections::BTreeSet<_> = (30000..30040)
            .map(|p| syn_backend(&mut f, ([10, 91, 0, 2], p)).unwrap())
            .collect();
        assert_eq!(seen.len(), 3);
    });
}

#[test]
fn tcp_states_follow_handshake_fin_and_rst_in_both_entries() {
    use lb_common::conn::{
        STATE_CLOSED, STATE_CLOSING, STATE_ESTABLISHED, STATE_SYN_RECV, STATE_SYN_SENT,
    };
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let (_, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S"), f.ext);
        let fwd = parse_checked(&out);
        let (backend, snat) = (fwd.dst, fwd.src);
        let from_backend = |f: &mut Fixture, flags| {
            let (action, _) = f.run(
                &tcp_frame(BACKEND_MACS[0], LB_INT_MAC, backend, snat, flags),
                f.int,
            );
            assert_eq!(action, XDP_REDIRECT);
        };
        let from_client = |f: &mut Fixture, flags| {
            let (action, _) = f.run(
                &tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, flags),
                f.ext,
            );
            assert_eq!(action, XDP_REDIRECT);
        };
        assert_eq!(f.states(), [STATE_SYN_SENT; 2]);
        from_backend(&mut f, "SA");
        assert_eq!(f.states(), [STATE_SYN_RECV; 2]);
        from_client(&mut f, "A");
        assert_eq!(f.states(), [STATE_ESTABLISHED; 2]);
        from_backend(&mut f, "FA");
        assert_eq!(f.states(), [STATE_CLOSING; 2]);
        from_client(&mut f, "R");
        assert_eq!(f.states(), [STATE_CLOSED; 2]);
        // The same tuple opens a new connection to the same backend.
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&out).dst, backend);
        assert_eq!(f.states(), [STATE_SYN_SENT; 2]);
    });
}

#[test]
fn the_sweep_expires_flows_by_state_and_keeps_established_ones_until_idle() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&CONFIG.replace("pool: web }", "pool: web, idle_timeout: 60s }"));
        // One established flow and one that never got past its SYN.
        f.establish(CLIENT);
        f.run(
            &tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 9], 41000), VIP, "S"),
            f.ext,
        );
        assert_eq!(f.dp.conntrack_entries().len(), 4);

        let r = f.gc_after(1);
        assert_eq!((r.entries, r.expired, r.active.clone()), (4, 0, vec![2]));
        let r = f.gc_after(gc::HANDSHAKE_TIMEOUT.as_secs() + 1);
        assert_eq!(
            (r.expired, r.active.clone()),
            (1, vec![1]),
            "the half-open flow goes first"
        );
        assert_eq!(f.dp.conntrack_entries().len(), 2);
        assert_eq!(
            f.gc_after(59).expired,
            0,
            "established: the listener's 60 s idle timeout"
        );
        assert_eq!(f.gc_after(61).expired, 1);
        assert!(f.dp.conntrack_entries().is_empty());
    });
}

#[test]
fn a_listener_inserted_by_a_reload_leaves_the_others_idle_timeouts() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&CONFIG.replace("pool: web }", "pool: web, idle_timeout: 60s }"));
        f.establish(CLIENT);
        // The new listener comes first in the file: ids stay by name, positions move.
        f.reconfigure(&CONFIG.replace(
            "  - { name: web,",
            "  - { name: quick, protocol: tcp, vip: 10.91.0.100, port: 81, pool: web, idle_timeout: 2s }\n  - { name: web, idle_timeout: 60s,",
        ));
        assert_eq!(f.gc_after(30).expired, 0, "web's 60 s, not quick's 2 s");
        assert_eq!(f.gc_after(61).expired, 1);
    });
}

#[test]
fn the_sweep_keeps_a_flow_while_either_direction_is_recent_and_judges_an_orphan_alone() {
    use lb_common::{
        conn::{DIR_ORIGINAL, DIR_REPLY},
        ConnEntry, FlowKey,
    };
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&CONFIG.replace("pool: web }", "pool: web, idle_timeout: 60s }"));
        f.establish(CLIENT);
        let entries = f.dp.conntrack_entries();
        let entry = |dir: u8| *entries.iter().find(|(_, e)| e.dir == dir).unwrap();
        let (original, reply) = (entry(DIR_ORIGINAL), entry(DIR_REPLY));
        let set = |f: &mut Fixture, (k, mut e): (FlowKey, ConnEntry), idle_secs: u64| {
            e.last_seen_ns = gc::monotonic_ns() - idle_secs * 1_000_000_000;
            f.dp.conntrack_insert(k, e).unwrap();
        };

        // A download (only the backend sends), then an upload (only the client does).
        set(&mut f, original, 100);
        let r = f.gc_after(0);
        assert_eq!((r.expired, r.active.clone()), (0, vec![1]), "reply recent");
        set(&mut f, original, 0);
        set(&mut f, reply, 100);
        let r = f.gc_after(0);
        assert_eq!(
            (r.expired, r.active.clone()),
            (0, vec![1]),
            "original recent"
        );
        assert_eq!(f.dp.conntrack_entries().len(), 2);

        set(&mut f, original, 100);
        let r = f.gc_after(0);
        assert_eq!((r.expired, r.active.clone()), (1, vec![0]), "both idle");
        assert!(f.dp.conntrack_entries().is_empty());

        // Entries whose pair is gone (LRU eviction): an idle one goes alone, a recent one stays.
        set(&mut f, reply, 100);
        assert_eq!(f.gc_after(0).expired, 1, "idle orphan reply");
        set(&mut f, original, 30);
        let r = f.gc_after(0);
        assert_eq!(
            (r.expired, r.active.clone()),
            (0, vec![1]),
            "recent orphan original"
        );
        assert_eq!(f.gc_after(31).expired, 1, "then idle");
        assert!(f.dp.conntrack_entries().is_empty());
    });
}

#[test]
fn a_tiny_snat_port_range_is_exhausted_and_recovers_once_flows_close() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let config = CONFIG
            .replace("ports: 20000-60000", "ports: 20000-20003")
            .replace("      - { address: 10.91.2.12, port: 8080 }\n      - { address: 10.91.2.13, port: 8080 }\n", "");
        let mut f = Fixture::new(&config);
        // Client ports inside the range are kept, so four flows take all four ports.
        for port in 20000..20004 {
            assert!(syn_backend(&mut f, ([10, 91, 0, 2], port)).is_ok());
        }
        assert_eq!(syn_backend(&mut f, ([10, 91, 0, 3], 20000)), Err(XDP_DROP));
        assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropSnatExhausted), 1);

        // One flow is reset; once the sweep removes it, its port serves the waiting client.
        let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 2], 20000), VIP, "R"), f.ext);
        assert_eq!(action, XDP_REDIRECT, "the RST is forwarded");
        assert_eq!(f.gc_after(gc::CLOSED_TIMEOUT.as_secs() + 1).expired, 1);
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 3], 20000), VIP, "S"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&out).src, (SNAT, 20000));
    });
}

#[test]
fn a_snat_pool_holds_the_ports_of_all_its_addresses_of_the_family_before_it_is_exhausted() {
    let ns = lb_namespace();
    for a in ["10.91.2.2/24", "10.91.2.3/24"] {
        ns.ip(&["addr", "add", a, "dev", "lb-int"]);
    }
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:91:2::1/64",
        "dev",
        "lb-int",
        "nodad",
    ]);
    let pools: [&[[u8; 4]]; 2] = [
        &[[10, 91, 2, 1], [10, 91, 2, 2]],
        &[[10, 91, 2, 1], [10, 91, 2, 2], [10, 91, 2, 3]],
    ];
    ns.scoped(|| {
        for pool in pools {
            let list: Vec<String> = pool.iter().map(|a| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])).collect();
            let config = CONFIG
                .replace(
                    "addresses: [10.91.2.1], ports: 20000-60000",
                    &format!("addresses: [{}, \"fd00:91:2::1\"], ports: 20000-20000", list.join(", ")),
                )
                .replace("      - { address: 10.91.2.12, port: 8080 }\n      - { address: 10.91.2.13, port: 8080 }\n", "");
            let mut f = Fixture::new(&config);
            // One port per address, so each IPv4 address holds one flow to the backend. The
            // client connects from even ports, as Linux's connect() does.
            let mut sources = Vec::new();
            for port in (40000..).step_by(2).take(pool.len()) {
                let client = ([10, 91, 0, 2], port);
                let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "S"), f.ext);
                assert_eq!(action, XDP_REDIRECT, "pool {list:?}: SYN from port {port} with {sources:?} taken");
                let fwd = parse_checked(&out);
                assert_eq!(fwd.src.1, 20000);
                sources.push(fwd.src.0);
                // The reply comes back through whichever address the flow got.
                let synack = tcp_frame(BACKEND_MACS[0], LB_INT_MAC, fwd.dst, fwd.src, "SA");
                let (action, out) = f.run(&synack, f.int);
                assert_eq!(action, XDP_REDIRECT);
                let back = parse_checked(&out);
                assert_eq!((back.src, back.dst), (VIP, client));
            }
            sources.sort();
            assert_eq!(sources, pool, "every address holds a flow");
            assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropSnatExhausted), 0);

            // Every IPv4 address is full (the IPv6 one is no use to an IPv4 flow): dropped and
            // counted.
            let port = 40000 + 2 * pool.len() as u16;
            assert_eq!(syn_backend(&mut f, ([10, 91, 0, 2], port)), Err(XDP_DROP));
            assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::DropSnatExhausted), 1);
        }
    });
}

#[test]
fn established_flows_keep_their_backend_when_it_leaves_the_pool_and_new_flows_avoid_it() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        // Open flows until every backend has some.
        let mut flows = Vec::new();
        for port in 40000..40060 {
            flows.push((port, syn_backend(&mut f, ([10, 91, 0, 2], port)).unwrap()));
        }
        let victim = flows[0].1;
        let gone = format!("      - {{ address: 10.91.2.{}, port: 8080 }}\n", victim[3]);
        assert!(CONFIG.contains(&gone));
        f.reconfigure(&CONFIG.replace(&gone, ""));

        for (port, backend) in &flows {
            let (action, out) = f.run(
                &tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 2], *port), VIP, "A"),
                f.ext,
            );
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(
                parse_checked(&out).dst.0,
                *backend,
                "flow from port {port} moved"
            );
        }
        for port in 41000..41100 {
            assert_ne!(
                syn_backend(&mut f, ([10, 91, 0, 2], port)).unwrap(),
                victim,
                "new flow to the removed backend"
            );
        }
    });
}

#[test]
fn weight_zero_drains_a_backend_and_weights_split_new_flows() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let weighted = CONFIG
            .replace(
                "10.91.2.11, port: 8080 }",
                "10.91.2.11, port: 8080, weight: 1 }",
            )
            .replace(
                "10.91.2.12, port: 8080 }",
                "10.91.2.12, port: 8080, weight: 3 }",
            )
            .replace(
                "10.91.2.13, port: 8080 }",
                "10.91.2.13, port: 8080, weight: 0 }",
            );
        let mut f = Fixture::new(&weighted);
        let mut count = [0usize; 3];
        for i in 0..4000u32 {
            let client = [10, 91, (i / 250) as u8, (i % 250 + 1) as u8];
            let b = syn_backend(&mut f, (client, 40000)).unwrap();
            count[(b[3] - 11) as usize] += 1;
        }
        assert_eq!(count[2], 0, "weight 0 takes no new flow: {count:?}");
        let share = count[1] as f64 / 4000.0;
        assert!(
            (share - 0.75).abs() < 0.75 * 0.10,
            "weight 3 of 4: {count:?}"
        );
    });
}

#[test]
fn an_icmp_fragmentation_needed_about_a_tracked_flow_is_translated_back_to_the_client() {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Header, Icmpv4Type, Ipv4HeaderSlice};
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let syn = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S");
        let (_, forwarded) = f.run(&syn, f.ext);
        let fwd = parse_checked(&forwarded);
        let b = (fwd.dst.0[3] - 11) as usize;

        // A router on the backend side cannot pass the LB's SYN: it quotes it (IP + TCP header).
        let quoted = &forwarded[14..14 + 40];
        let frag_needed =
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400,
            });
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(BACKEND_MACS[b], LB_INT_MAC)
            .ipv4([10, 91, 2, 254], SNAT, 64)
            .icmpv4(frag_needed.clone())
            .write(&mut icmp, quoted)
            .unwrap();

        let (action, out) = f.run(&icmp, f.int);
        assert_eq!(
            action, XDP_REDIRECT,
            "the error goes out towards the client"
        );
        let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
        let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
            panic!("not IPv4")
        };
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "outer IP checksum"
        );
        assert_eq!((ip.source, ip.destination), (VIP.0, CLIENT.0));
        let Some(TransportHeader::Icmpv4(icmp_hdr)) = &h.transport else {
            panic!("not ICMP")
        };
        assert_eq!(icmp_hdr.icmp_type, frag_needed, "type, code and MTU kept");
        let payload = h.payload.slice();
        assert_eq!(
            icmp_hdr.checksum,
            Icmpv4Header::with_checksum(icmp_hdr.icmp_type.clone(), payload).checksum,
            "ICMP checksum"
        );
        // The quote is now the client's own SYN: client:port → VIP:80.
        let inner = Ipv4HeaderSlice::from_slice(payload).unwrap();
        assert_eq!(
            inner.to_header().header_checksum,
            inner.to_header().calc_header_checksum()
        );
        assert_eq!((inner.source(), inner.destination()), (CLIENT.0, VIP.0));
        let ports = &payload[20..24];
        assert_eq!(u16::from_be_bytes([ports[0], ports[1]]), CLIENT.1);
        assert_eq!(u16::from_be_bytes([ports[2], ports[3]]), VIP.1);
        assert_eq!(
            out[..6],
            CLIENT_MAC,
            "sent to the client's MAC like the flow's replies"
        );

        // An error quoting a flow the LB does not know is the kernel's business.
        let mut stray = Vec::new();
        let unknown = tcp_frame(
            LB_INT_MAC,
            BACKEND_MACS[0],
            (SNAT, 33333),
            ([10, 91, 2, 11], 8080),
            "S",
        );
        PacketBuilder::ethernet2(BACKEND_MACS[0], LB_INT_MAC)
            .ipv4([10, 91, 2, 254], SNAT, 64)
            .icmpv4(frag_needed)
            .write(&mut stray, &unknown[14..54])
            .unwrap();
        assert_eq!(f.run(&stray, f.int), (XDP_PASS, stray.clone()));
    });
}

#[test]
fn passthrough_only_rewrites_the_destination_and_replies_come_from_the_vip() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f =
            Fixture::new(&CONFIG.replace("pool: web }", "pool: web, client_ip: passthrough }"));
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        let p = parse_checked(&out);
        assert_eq!(p.src, CLIENT, "the backend sees the client");
        assert_eq!(p.dst.1, 8080);
        let b = (p.dst.0[3] - 11) as usize;
        let (action, out) = f.run(
            &tcp_frame(BACKEND_MACS[b], LB_INT_MAC, p.dst, CLIENT, "SA"),
            f.int,
        );
        assert_eq!(action, XDP_REDIRECT);
        let r = parse_checked(&out);
        assert_eq!((r.src, r.dst), (VIP, CLIENT));
    });
}

#[test]
fn wlc_sends_new_flows_to_the_least_loaded_backend_per_weight() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&CONFIG.replace("pool: web }", "pool: web, scheduler: wlc }"));
        let count =
            |flows: &[(u16, [u8; 4])], b: [u8; 4]| flows.iter().filter(|(_, x)| *x == b).count();
        let mut flows = Vec::new();
        for port in 40000..40006 {
            flows.push((port, syn_backend(&mut f, ([10, 91, 0, 2], port)).unwrap()));
        }
        for b in 11..14 {
            assert_eq!(count(&flows, [10, 91, 2, b]), 2, "two each: {flows:?}");
        }
        // Reset both flows of one backend: it is now the least loaded and takes the next two.
        let emptied = flows[0].1;
        for (port, _) in flows.iter().filter(|(_, b)| *b == emptied) {
            let rst = tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 2], *port), VIP, "R");
            assert_eq!(f.run(&rst, f.ext).0, XDP_REDIRECT);
        }
        for port in 41000..41002 {
            assert_eq!(
                syn_backend(&mut f, ([10, 91, 0, 2], port)).unwrap(),
                emptied
            );
        }
        // The sweep recounts the same: 2 live flows per backend.
        assert_eq!(f.gc_after(0).backend_active, [2, 2, 2]);

        // Weights scale the share: 1:3 gets 2 and 6 of 8 flows.
        let weighted = CONFIG
            .replace("pool: web }", "pool: web, scheduler: wlc }")
            .replace(
                "10.91.2.12, port: 8080 }",
                "10.91.2.12, port: 8080, weight: 3 }",
            )
            .replace("      - { address: 10.91.2.13, port: 8080 }\n", "");
        let mut f = Fixture::new(&weighted);
        let flows: Vec<_> = (42000..42008)
            .map(|p| (p, syn_backend(&mut f, ([10, 91, 0, 3], p)).unwrap()))
            .collect();
        assert_eq!(
            (
                count(&flows, [10, 91, 2, 11]),
                count(&flows, [10, 91, 2, 12])
            ),
            (2, 6)
        );
    });
}

/// The TOA option (kind 254) in a forwarded frame's TCP options, if any: (port, address).
fn toa_option(frame: &[u8]) -> Option<(u16, [u8; 4])> {
    let tcp = 14 + 20;
    let doff = (frame[tcp + 12] >> 4) as usize;
    let opts = &frame[tcp + 20..tcp + doff * 4];
    opts.windows(8)
        .find(|w| w[0] == 254 && w[1] == 8)
        .map(|w| (u16::from_be_bytes([w[2], w[3]]), [w[4], w[5], w[6], w[7]]))
}

#[test]
fn toa_carries_the_client_to_the_backend_on_the_handshake_only() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&CONFIG.replace("pool: web }", "pool: web, client_ip: toa }"));
        let syn = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S");
        let (action, out) = f.run(&syn, f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out.len(), syn.len() + 8, "the frame grew by the option");
        let p = parse_checked(&out); // both checksums and the payload verified
        assert_eq!(p.src.0, SNAT, "still FullNAT");
        assert_eq!(toa_option(&out), Some((CLIENT.1, CLIENT.0)));

        let b = (p.dst.0[3] - 11) as usize;
        let (_, reply) = f.run(
            &tcp_frame(BACKEND_MACS[b], LB_INT_MAC, p.dst, p.src, "SA"),
            f.int,
        );
        assert_eq!(
            toa_option(&reply),
            None,
            "nothing is added towards the client"
        );
        let ack = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A");
        let (_, out) = f.run(&ack, f.ext);
        parse_checked(&out);
        assert_eq!(
            toa_option(&out),
            Some((CLIENT.1, CLIENT.0)),
            "on the ACK completing the handshake"
        );
        let (_, out) = f.run(&ack, f.ext);
        parse_checked(&out);
        assert_eq!(toa_option(&out), None, "not on later packets");
        assert_eq!(out.len(), ack.len());
    });
}

#[test]
fn a_syn_with_no_backend_to_take_it_is_answered_with_rst() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let drained = CONFIG.replace("port: 8080 }", "port: 8080, weight: 0 }");
        let mut f = Fixture::new(&drained);
        let syn = tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S");
        let (action, out) = f.run(&syn, f.ext);
        assert_eq!(action, XDP_TX, "straight back to the client");
        let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
        let eth = h.link.clone().and_then(|l| l.ethernet2()).unwrap();
        assert_eq!((eth.source, eth.destination), (LB_EXT_MAC, CLIENT_MAC));
        let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert_eq!((ip.source, ip.destination), (VIP.0, CLIENT.0));
        let Some(TransportHeader::Tcp(tcp)) = &h.transport else {
            panic!("not TCP")
        };
        assert!(tcp.rst && tcp.ack && !tcp.syn);
        assert_eq!((tcp.source_port, tcp.destination_port), (VIP.1, CLIENT.1));
        assert_eq!(
            tcp.acknowledgment_number, 1001,
            "acknowledges the SYN (seq 1000)"
        );
        let payload = h.payload.slice();
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(ip, payload).unwrap());
        assert_eq!(f.dp.snapshot(1).unwrap().get(Counter::RstNoBackend), 1);
        assert!(f.dp.conntrack_entries().is_empty());
    });
}

#[test]
fn a_resetting_listener_keeps_each_directions_last_ack() {
    use lb_common::conn::DIR_ORIGINAL;
    let ns = lb_namespace();
    ns.scoped(|| {
        // The original entry keeps the ACK that completed the handshake either way; only a
        // resetting listener keeps the reply direction's (tcp_frame's ACKs acknowledge SEQ + 1).
        for (config, reply) in [
            (CONFIG, 0),
            (
                &*CONFIG.replace("pool: web }", "pool: web, reset_on_idle: true }"),
                SEQ + 1,
            ),
        ] {
            let mut f = Fixture::new(config);
            f.establish(CLIENT);
            let mut acks: Vec<(bool, u32)> =
                f.dp.conntrack_entries()
                    .iter()
                    .map(|(_, e)| (e.dir == DIR_ORIGINAL, u32::from_be(e.ack_be)))
                    .collect();
            acks.sort();
            assert_eq!(acks, [(false, reply), (true, SEQ + 1)], "{config}");
        }
    });
}

#[test]
fn a_syn_flood_only_evicts_unfinished_handshakes_and_never_exhausts_snat_ports() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        // An established flow, idle while the flood goes on.
        let (backend, snat) = f.establish(CLIENT);
        let b = (backend.0[3] - 11) as usize;

        // Distinct spoofed SYNs that are never answered: more flows than the handshake table
        // holds, and more than the 3 backends × 40001 SNAT ports could serve at once. With one
        // table the flood kept its ports for the 10 s handshake timeout and new flows found
        // none free; here it only evicts its own kind, so the ports turn over.
        let flood = 200_000u32;
        for i in 0..flood {
            let src = ([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 20000 + (i * 7919 % 40000) as u16);
            let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, src, VIP, "S"), f.ext);
            assert!(matches!(action, XDP_REDIRECT | XDP_DROP), "SYN {i}: {action}");
        }
        let s = f.dp.snapshot(1).unwrap();
        let exhausted = s.get(Counter::DropSnatExhausted);
        println!(
            "{flood} spoofed SYNs: {} new flows, {exhausted} without a SNAT port, {} conntrack entries",
            s.listeners[0].new_flows,
            f.dp.conntrack_entries().len()
        );
        assert!(exhausted * 1000 <= flood as u64, "SNAT exhausted {exhausted} times");
        assert!(
            f.dp.conntrack_entries().len() <= CONNTRACK_SYN_ENTRIES as usize + 2,
            "the flood stays within the handshake table"
        );

        // The idle established flow was not evicted: both directions still translated.
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&out).dst, backend);
        let (action, out) = f.run(&tcp_frame(BACKEND_MACS[b], LB_INT_MAC, backend, snat, "A"), f.int);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!((parse_checked(&out).src, parse_checked(&out).dst), (VIP, CLIENT));

        // A real client's handshake still completes (and leaves the handshake table).
        let client = ([10, 91, 0, 2], 42000);
        let (action, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "S"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        let fwd = parse_checked(&out);
        let b = (fwd.dst.0[3] - 11) as usize;
        let (action, _) = f.run(&tcp_frame(BACKEND_MACS[b], LB_INT_MAC, fwd.dst, fwd.src, "SA"), f.int);
        assert_eq!(action, XDP_REDIRECT);
        let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "A"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        let established = f
            .dp
            .conntrack_entries()
            .iter()
            .filter(|(_, e)| e.state == lb_common::conn::STATE_ESTABLISHED)
            .count();
        assert_eq!(established, 4, "both real flows, both entries each");
    });
}

#[test]
fn a_handshake_that_lost_one_entry_to_the_lru_gets_it_back_or_starts_over() {
    use lb_common::conn::{DIR_ORIGINAL, DIR_REPLY, STATE_ESTABLISHED};
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        // Key and entry of a client port's handshake entry in one direction.
        let entry = |f: &mut Fixture, port: u16, dir| {
            f.dp.conntrack_table(true)
                .walk()
                .into_iter()
                .find(|(k, e)| {
                    e.dir == dir
                        && port.to_be()
                            == if dir == DIR_ORIGINAL {
                                k.sport_be
                            } else {
                                e.nat_dport_be
                            }
                })
                .expect("a handshake entry")
        };
        let syn = |port| tcp_frame(CLIENT_MAC, LB_EXT_MAC, ([10, 91, 0, 2], port), VIP, "S");
        // The backend's SYN-ACK for the tuple a SYN left with: the action and where it went.
        let syn_ack = |f: &mut Fixture, out: &[u8]| {
            let p = parse_checked(out);
            let mac = BACKEND_MACS[(p.dst.0[3] - 11) as usize];
            let (action, back) = f.run(&tcp_frame(mac, LB_INT_MAC, p.dst, p.src, "SA"), f.int);
            (
                action,
                (action == XDP_REDIRECT).then(|| parse_checked(&back).dst),
            )
        };

        // The original entry evicted (as a flood's inserts can do to one entry of a pair)
        // before the backend answered: the SYN-ACK puts it back, so the client's ACK completes
        // the handshake.
        let (_, out) = f.run(&syn(40000), f.ext);
        let (key, _) = entry(&mut f, 40000, DIR_ORIGINAL);
        f.dp.conntrack_table(true).remove(&key).unwrap();
        assert_eq!(
            syn_ack(&mut f, &out),
            (XDP_REDIRECT, Some(([10, 91, 0, 2], 40000)))
        );
        let (action, ack) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&ack).dst, parse_checked(&out).dst);
        assert_eq!(f.states(), [STATE_ESTABLISHED; 2], "promoted, both entries");

        // The reply entry evicted: the retransmitted SYN puts it back, and the SYN-ACK finds
        // its way.
        let (_, first) = f.run(&syn(40500), f.ext);
        let (key, _) = entry(&mut f, 40500, DIR_REPLY);
        f.dp.conntrack_table(true).remove(&key).unwrap();
        let (action, out) = f.run(&syn(40500), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, first, "the same flow");
        assert_eq!(
            f.dp.conntrack_table(true).walk().len(),
            2,
            "both entries again"
        );
        assert_eq!(
            syn_ack(&mut f, &out),
            (XDP_REDIRECT, Some(([10, 91, 0, 2], 40500)))
        );

        // The reply tuple taken by another flow while its entry was gone: the retransmitted SYN
        // gets another tuple and leaves the other flow alone.
        let (_, first) = f.run(&syn(41000), f.ext);
        let (key, mut other) = entry(&mut f, 41000, DIR_REPLY);
        other.nat_dst_be[0] = u32::from_ne_bytes([10, 91, 0, 3]);
        f.dp.conntrack_table(true).insert(key, other, 0).unwrap();
        let (action, out) = f.run(&syn(41000), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_ne!(
            parse_checked(&out).src,
            parse_checked(&first).src,
            "a new SNAT port"
        );
        assert_eq!(
            f.dp.conntrack_table(true).get(&key).unwrap(),
            other,
            "the other flow's entry"
        );
        assert_eq!(
            syn_ack(&mut f, &out),
            (XDP_REDIRECT, Some(([10, 91, 0, 2], 41000)))
        );

        // A SYN retransmitted on an intact handshake still follows it.
        let (_, again) = f.run(&syn(41000), f.ext);
        assert_eq!(again, out);
    });
}

#[test]
fn a_blind_ack_does_not_complete_a_handshake() {
    use lb_common::conn::{STATE_ESTABLISHED, STATE_SYN_RECV};
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        let (_, out) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S"), f.ext);
        let p = parse_checked(&out);
        let mac = BACKEND_MACS[(p.dst.0[3] - 11) as usize];
        f.run(&tcp_frame(mac, LB_INT_MAC, p.dst, p.src, "SA"), f.int);

        // An ACK that did not see the SYN-ACK (as a spoofed source's): forwarded, for the
        // backend to reset, but the flow stays a handshake.
        let blind = tcp_frame_acking(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A", 0x1234_5678);
        let (action, _) = f.run(&blind, f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(f.states(), [STATE_SYN_RECV; 2]);
        assert_eq!(
            f.dp.conntrack_table(true).walk().len(),
            2,
            "still in the handshake table"
        );

        // The ACK of the SYN-ACK's sequence number completes it.
        let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(f.states(), [STATE_ESTABLISHED; 2]);
        assert_eq!(f.dp.conntrack_table(false).walk().len(), 2, "promoted");
    });
}

#[test]
fn reusing_a_closed_flows_tuple_leaves_a_flow_that_took_its_reply_key_alone() {
    use lb_common::conn::DIR_REPLY;
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        f.establish(CLIENT);
        f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "R"), f.ext);
        // The closed flow's reply entry evicted and its key taken by another flow.
        let (key, mut other) =
            f.dp.conntrack_table(false)
                .walk()
                .into_iter()
                .find(|(_, e)| e.dir == DIR_REPLY)
                .unwrap();
        other.nat_dst_be[0] = u32::from_ne_bytes([10, 91, 0, 3]);
        f.dp.conntrack_table(false).insert(key, other, 0).unwrap();

        let (action, _) = f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "S"), f.ext);
        assert_eq!(action, XDP_REDIRECT, "the SYN starts a new flow");
        assert_eq!(f.dp.conntrack_table(false).get(&key).unwrap(), other);
    });
}

#[test]
fn the_sweeps_batch_read_sees_every_entry_the_per_entry_walk_sees() {
    use lb_common::{flow::FAMILY_V4, ConnEntry, FlowKey};
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        // More entries than one batch call asks for, so the reads continue from a position.
        for i in 0..20_000u32 {
            let key = FlowKey {
                src_be: [
                    u32::from_ne_bytes([100, 64, (i >> 8) as u8, i as u8]),
                    0,
                    0,
                    0,
                ],
                dst_be: [u32::from_ne_bytes([10, 91, 0, 100]), 0, 0, 0],
                sport_be: (1024 + (i % 50_000) as u16).to_be(),
                dport_be: 80u16.to_be(),
                proto: 6,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            let entry = ConnEntry {
                backend_id: i,
                ..Default::default()
            };
            f.dp.conntrack_insert(key, entry).unwrap();
        }
        let table = f.dp.conntrack_table(false);
        let walked: std::collections::HashMap<FlowKey, ConnEntry> =
            table.walk().into_iter().collect();
        let batched = table.batched().unwrap();
        assert_eq!(walked.len(), 20_000);
        assert_eq!(batched.len(), 20_000, "no entry twice, none missed");
        assert!(batched.iter().all(|(k, e)| walked.get(k) == Some(e)));
        // An empty table reads as empty.
        assert!(f.dp.conntrack_table(true).batched().unwrap().is_empty());
    });
}

/// Three rounds of `frames` (each through its interface): the program's outputs, what listener
/// `listener` counted meanwhile, and the flow-cache hits.
fn three_rounds(
    f: &mut Fixture,
    frames: &[(Vec<u8>, u32)],
    listener: usize,
) -> (Vec<(u32, Vec<u8>)>, ListenerStats, u64) {
    let before = f.dp.snapshot(listener + 1).unwrap().listeners[listener];
    let hits = f.dp.flow_cache_hits().unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        for (frame, i) in frames {
            out.push(f.run(frame, *i));
        }
    }
    let after = f.dp.snapshot(listener + 1).unwrap().listeners[listener];
    let moved = ListenerStats {
        packets_in: after.packets_in - before.packets_in,
        bytes_in: after.bytes_in - before.bytes_in,
        packets_out: after.packets_out - before.packets_out,
        bytes_out: after.bytes_out - before.bytes_out,
        ..Default::default()
    };
    (out, moved, f.dp.flow_cache_hits().unwrap() - hits)
}

#[test]
fn plain_packets_of_an_established_flow_leave_the_flow_cache_as_the_conntrack_path_sends_them() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        f.cache_flows_on_one_cpu();
        let (backend, snat) = f.establish(CLIENT);
        let backend_mac = BACKEND_MACS[(backend.0[3] - 11) as usize];
        let frames = [
            (tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "A"), f.ext),
            (
                tcp_frame(backend_mac, LB_INT_MAC, backend, snat, "A"),
                f.int,
            ),
        ];
        let (cached, cached_counts, hits) = three_rounds(&mut f, &frames, 0);
        // The handshake's last ACK left the client side's copy; the backend's first ACK
        // leaves the other.
        assert_eq!(hits, 5, "served from the flow cache");
        f.dp.set_flow_cache(None).unwrap();
        let (looked_up, counts, none) = three_rounds(&mut f, &frames, 0);
        assert_eq!(none, 0, "the cache is off");
        assert_eq!(cached, looked_up, "same frames either way");
        assert_eq!(cached_counts, counts, "counted alike");
        assert_eq!(counts.packets_in, 3);
        assert_eq!(counts.packets_out, 3);
        for (action, frame) in &cached {
            assert_eq!(*action, XDP_REDIRECT);
            parse_checked(frame);
        }
    });
}

/// A UDP/IPv4 frame with a 32-byte payload (long enough for the fast path's bounds check);
/// `zero_checksum` sends it without a checksum (0, allowed over IPv4).
fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    zero_checksum: bool,
) -> Vec<u8> {
    let u = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let payload = [7u8; 32];
    let mut v = Vec::with_capacity(u.size(payload.len()));
    u.write(&mut v, &payload).unwrap();
    if zero_checksum {
        v[14 + 20 + 6..14 + 20 + 8].fill(0);
    }
    v
}

/// A forwarded UDP/IPv4 frame's (source, destination), its IP checksum verified and its UDP
/// checksum too, or found still absent when `zero_checksum`.
fn udp_checked(frame: &[u8], zero_checksum: bool) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("valid frame");
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        panic!("not IPv4")
    };
    let Some(TransportHeader::Udp(udp)) = &h.transport else {
        panic!("not UDP")
    };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    let want = if zero_checksum {
        0
    } else {
        udp.calc_checksum_ipv4(ip, h.payload.slice()).unwrap()
    };
    assert_eq!(udp.checksum, want, "UDP checksum");
    (
        (ip.source, udp.source_port),
        (ip.destination, udp.destination_port),
    )
}

#[test]
fn udp_packets_leave_the_flow_cache_as_the_conntrack_path_sends_them() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(&config_with_udp());
        f.cache_flows_on_one_cpu();
        for (port, zero) in [(41000, false), (41001, true)] {
            let client = (CLIENT.0, port);
            let vip = (VIP.0, 53);
            let first = udp_frame(CLIENT_MAC, LB_EXT_MAC, client, vip, zero);
            let (action, out) = f.run(&first, f.ext);
            assert_eq!(action, XDP_REDIRECT);
            let (snat, backend) = udp_checked(&out, zero);
            let backend_mac = BACKEND_MACS[(backend.0[3] - 11) as usize];
            let frames = [
                (
                    udp_frame(backend_mac, LB_INT_MAC, backend, snat, zero),
                    f.int,
                ),
                (first, f.ext),
            ];
            f.dp.set_flow_cache(Some(std::time::Duration::from_secs(600)))
                .unwrap();
            let (cached, cached_counts, hits) = three_rounds(&mut f, &frames, 1);
            // The first packet of each direction leaves the copy the others use.
            assert!(hits >= 4, "served from the flow cache: {hits} hits");
            f.dp.set_flow_cache(None).unwrap();
            let (looked_up, counts, none) = three_rounds(&mut f, &frames, 1);
            assert_eq!(none, 0, "the cache is off");
            assert_eq!(cached, looked_up, "same frames either way");
            assert_eq!(cached_counts, counts, "counted alike");
            assert_eq!((counts.packets_in, counts.packets_out), (3, 3));
            for (i, (action, frame)) in cached.iter().enumerate() {
                assert_eq!(*action, XDP_REDIRECT);
                let (src, dst) = udp_checked(frame, zero);
                if i % 2 == 0 {
                    assert_eq!((src, dst), (vip, client), "a reply, to the client");
                } else {
                    assert_eq!((src, dst), (snat, backend), "to the backend");
                }
            }
        }
    });
}

#[test]
fn a_flow_cache_copy_is_not_used_once_its_flow_is_gone_or_replaced() {
    let ns = lb_namespace();
    ns.scoped(|| {
        let mut f = Fixture::new(CONFIG);
        f.cache_flows_on_one_cpu();
        let ack = |client| tcp_frame(CLIENT_MAC, LB_EXT_MAC, client, VIP, "A");
        let cached = |f: &mut Fixture, client| {
            let hits = f.dp.flow_cache_hits().unwrap();
            assert_eq!(f.run(&ack(client), f.ext).0, XDP_REDIRECT);
            assert_eq!(
                f.dp.flow_cache_hits().unwrap(),
                hits + 1,
                "a copy served it"
            );
        };

        // The datapath replaces a flow: the client closes it and reuses its port, and the new
        // flow goes elsewhere (its first backend left the pool meanwhile).
        let (first, _) = f.establish(CLIENT);
        cached(&mut f, CLIENT);
        f.run(&tcp_frame(CLIENT_MAC, LB_EXT_MAC, CLIENT, VIP, "R"), f.ext);
        f.reconfigure(&CONFIG.replace(
            &format!(
                "      - {{ address: 10.91.2.{}, port: 8080 }}\n",
                first.0[3]
            ),
            "",
        ));
        let (second, _) = f.establish(CLIENT);
        assert_ne!(second, first);
        let (action, out) = f.run(&ack(CLIENT), f.ext);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(parse_checked(&out).dst, second, "the new flow's backend");

        // The agent's sweep deletes an idle flow.
        let other = ([10, 91, 0, 3], 40001);
        f.establish(other);
        cached(&mut f, other);
        assert_eq!(f.gc_after(100_000).expired, 2);
        let drops = f.dp.snapshot(1).unwrap().get(Counter::DropNoConntrack);
        assert_eq!(f.run(&ack(other), f.ext).0, XDP_DROP);
        assert_eq!(
            f.dp.snapshot(1).unwrap().get(Counter::DropNoConntrack),
            drops + 1
        );

        // A reload removes the listener, and its flows with it.
        f.establish(other);
        cached(&mut f, other);
        f.reconfigure(&CONFIG.replace(
            "  - { name: web, protocol: tcp, vip: 10.91.0.100, port: 80, pool: web }",
            "  - { name: web, protocol: tcp, vip: 10.91.0.100, port: 8000, pool: web }",
        ));
        assert_eq!(
            f.run(&ack(other), f.ext).0,
            XDP_PASS,
            "not the LB's any more"
        );
    });
}
