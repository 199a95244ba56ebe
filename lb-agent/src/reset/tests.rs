use lb_common::conn::{DIR_ORIGINAL, DIR_REPLY, STATE_CLOSING};

use super::*;
use crate::plan::addr_be;

fn key(src: &str, dst: &str) -> FlowKey {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    FlowKey {
        src_be: addr_be(s.ip()),
        dst_be: addr_be(d.ip()),
        sport_be: s.port().to_be(),
        dport_be: d.port().to_be(),
        proto: PROTO_TCP,
        family: if s.is_ipv4() {
            FAMILY_V4
        } else {
            lb_common::flow::FAMILY_V6
        },
        _pad: [0; 2],
    }
}

fn entry(dir: u8, ack: u32) -> ConnEntry {
    ConnEntry {
        state: STATE_ESTABLISHED,
        dir,
        flags: CONN_F_RESET_IDLE,
        ack_be: ack.to_be(),
        ..ConnEntry::default()
    }
}

#[test]
fn each_end_gets_an_rst_from_the_address_it_talks_to_with_the_sequence_it_expects() {
    let original = key("10.0.0.2:40000", "10.0.0.100:80");
    let reply = key("10.0.2.11:8080", "10.0.2.1:40000");
    let resets = for_flow(
        &original,
        &entry(DIR_ORIGINAL, 7),
        &reply,
        &entry(DIR_REPLY, 9),
    );
    assert_eq!(
        resets,
        [
            Reset {
                src: "10.0.0.100:80".parse().unwrap(),
                dst: "10.0.0.2:40000".parse().unwrap(),
                seq: 7
            },
            Reset {
                src: "10.0.2.1:40000".parse().unwrap(),
                dst: "10.0.2.11:8080".parse().unwrap(),
                seq: 9
            },
        ]
    );
    // Closing flows, other listeners and ends never heard from get none.
    let closing = ConnEntry {
        state: STATE_CLOSING,
        ..entry(DIR_ORIGINAL, 7)
    };
    assert!(for_flow(&original, &closing, &reply, &entry(DIR_REPLY, 9)).is_empty());
    let quiet = ConnEntry {
        flags: 0,
        ..entry(DIR_ORIGINAL, 7)
    };
    assert!(for_flow(&original, &quiet, &reply, &entry(DIR_REPLY, 9)).is_empty());
    assert_eq!(
        for_flow(
            &original,
            &entry(DIR_ORIGINAL, 0),
            &reply,
            &entry(DIR_REPLY, 9)
        )
        .len(),
        1
    );
}

#[test]
fn segments_carry_valid_ip_and_tcp_checksums() {
    for (src, dst) in [
        ("10.0.0.100:80", "10.0.0.2:40000"),
        ("[fd00::100]:80", "[fd00::2]:40000"),
    ] {
        let r = Reset {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq: 0x1234_5678,
        };
        let p = segment(&r);
        let (ip_len, pseudo) = if r.src.is_ipv4() {
            assert_eq!(csum::fold(csum::sum_be(&p[..20], 0)), 0xffff, "IPv4 header");
            (20, csum::sum_be(&p[12..20], PROTO_TCP as u64 + 20))
        } else {
            (40, csum::sum_be(&p[8..40], PROTO_TCP as u64 + 20))
        };
        let tcp = &p[ip_len..];
        assert_eq!(tcp.len(), 20);
        assert_eq!(
            csum::fold(csum::sum_be(tcp, pseudo)),
            0xffff,
            "TCP over {src}"
        );
        assert_eq!(tcp[13], TCP_RST);
        assert_eq!(&tcp[4..8], &0x1234_5678u32.to_be_bytes());
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 80);
    }
}
