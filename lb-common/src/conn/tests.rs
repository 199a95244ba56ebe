use super::*;

const O: u8 = DIR_ORIGINAL;
const R: u8 = DIR_REPLY;

fn walk(steps: &[(u8, u8)]) -> u8 {
    steps.iter().fold(STATE_SYN_SENT, |s, &(dir, flags)| {
        tcp_next_state(s, dir, flags)
    })
}

#[test]
fn the_three_way_handshake_establishes() {
    assert_eq!(walk(&[(R, TCP_SYN | TCP_ACK)]), STATE_SYN_RECV);
    assert_eq!(
        walk(&[(R, TCP_SYN | TCP_ACK), (O, TCP_ACK)]),
        STATE_ESTABLISHED
    );
    // Data both ways keeps it established.
    assert_eq!(
        walk(&[
            (R, TCP_SYN | TCP_ACK),
            (O, TCP_ACK),
            (R, TCP_ACK),
            (O, TCP_ACK)
        ]),
        STATE_ESTABLISHED
    );
}

#[test]
fn a_syn_flood_never_establishes() {
    // Retransmitted SYNs, and even the backend's SYN-ACK, without the client's ACK.
    assert_eq!(walk(&[(O, TCP_SYN), (O, TCP_SYN)]), STATE_SYN_SENT);
    assert_eq!(
        walk(&[(R, TCP_SYN | TCP_ACK), (O, TCP_SYN)]),
        STATE_SYN_RECV
    );
    // An ACK before the SYN-ACK does not skip the handshake either.
    assert_eq!(walk(&[(O, TCP_ACK)]), STATE_SYN_SENT);
}

#[test]
fn fin_closes_and_rst_resets_from_any_state() {
    let est = [(R, TCP_SYN | TCP_ACK), (O, TCP_ACK)];
    for (dir, flags) in [(O, TCP_FIN | TCP_ACK), (R, TCP_FIN | TCP_ACK)] {
        assert_eq!(walk(&[est[0], est[1], (dir, flags)]), STATE_CLOSING);
    }
    for s in [
        STATE_SYN_SENT,
        STATE_SYN_RECV,
        STATE_ESTABLISHED,
        STATE_CLOSING,
    ] {
        assert_eq!(tcp_next_state(s, R, TCP_RST), STATE_CLOSED);
        assert_eq!(tcp_next_state(s, O, TCP_RST | TCP_ACK), STATE_CLOSED);
    }
    assert_eq!(
        tcp_next_state(STATE_CLOSED, O, TCP_FIN | TCP_ACK),
        STATE_CLOSED
    );
}

#[test]
fn a_new_syn_on_a_closed_tuple_is_a_new_connection() {
    assert!(reuses_tuple(STATE_CLOSED, O, TCP_SYN));
    assert!(reuses_tuple(STATE_CLOSING, O, TCP_SYN));
    // But not a SYN-ACK from the backend, a retransmitted SYN of an open flow, or the backend's.
    assert!(!reuses_tuple(STATE_CLOSED, R, TCP_SYN | TCP_ACK));
    assert!(!reuses_tuple(STATE_SYN_SENT, O, TCP_SYN));
    assert!(!reuses_tuple(STATE_ESTABLISHED, O, TCP_SYN));
    assert!(!reuses_tuple(STATE_CLOSED, R, TCP_SYN));
    // The state machine itself leaves a closed flow closed.
    assert_eq!(tcp_next_state(STATE_CLOSED, O, TCP_SYN), STATE_CLOSED);
}

#[test]
fn the_pair_key_of_each_entry_is_the_other_entrys_key() {
    let orig = ConnEntry {
        nat_src_be: [1, 0, 0, 0],
        nat_dst_be: [2, 0, 0, 0],
        nat_sport_be: 3,
        nat_dport_be: 4,
        ..Default::default()
    };
    let k = orig.pair_key(6, 4);
    assert_eq!(
        (k.src_be[0], k.dst_be[0], k.sport_be, k.dport_be),
        (2, 1, 4, 3)
    );
}
