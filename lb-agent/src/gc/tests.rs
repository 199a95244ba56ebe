use lb_common::conn::{DIR_ORIGINAL, STATE_SYN_RECV, STATE_SYN_SENT};

use super::*;

#[test]
fn established_flows_use_the_listener_idle_timeout_and_others_the_short_ones() {
    let idle = Duration::from_secs(900);
    assert_eq!(timeout(STATE_ESTABLISHED, idle), idle);
    assert_eq!(timeout(STATE_SYN_SENT, idle), HANDSHAKE_TIMEOUT);
    assert_eq!(timeout(STATE_SYN_RECV, idle), HANDSHAKE_TIMEOUT);
    assert_eq!(timeout(STATE_CLOSING, idle), CLOSING_TIMEOUT);
    assert_eq!(timeout(STATE_CLOSED, idle), CLOSED_TIMEOUT);
    assert!(HANDSHAKE_TIMEOUT < idle && CLOSED_TIMEOUT < CLOSING_TIMEOUT);
}

#[test]
fn the_monotonic_clock_moves_forward() {
    let a = monotonic_ns();
    std::thread::sleep(Duration::from_millis(2));
    assert!(monotonic_ns() > a);
}

#[test]
fn snat_ports_are_counted_per_address_from_reply_entries_with_the_busiest_backend() {
    let addr = |last: u8| [u32::from_ne_bytes([10, 0, 0, last]), 0, 0, 0];
    let snat = [addr(1), addr(2)];
    let mut count = SnatCount::new(&snat);
    let reply = |to: AddrBe, backend_id, port: u16| {
        let key = FlowKey {
            src_be: addr(100 + backend_id as u8),
            dst_be: to,
            dport_be: port.to_be(),
            ..Default::default()
        };
        let e = ConnEntry {
            dir: DIR_REPLY,
            backend_id,
            ..Default::default()
        };
        (key, e)
    };
    for (to, backend, port) in [
        (snat[0], 0, 20000),
        (snat[0], 0, 20001),
        (snat[0], 0, 20002),
        (snat[0], 1, 20000),
        (snat[1], 1, 20000),
        // Passthrough: the reply goes to the client, no SNAT port.
        (addr(50), 0, 40000),
    ] {
        let (key, e) = reply(to, backend, port);
        count.add(&key, &e);
        // The original direction's entry is not a port.
        count.add(
            &key,
            &ConnEntry {
                dir: DIR_ORIGINAL,
                ..e
            },
        );
    }
    assert_eq!(
        count.finish(),
        [
            SnatPorts {
                in_use: 4,
                busiest_backend: 3
            },
            SnatPorts {
                in_use: 1,
                busiest_backend: 1
            }
        ]
    );
}
