use lb_common::conn::{STATE_SYN_RECV, STATE_SYN_SENT};

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
