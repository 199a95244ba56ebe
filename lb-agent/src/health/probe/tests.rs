//! The TCP and UDP probes against loopback sockets (no root needed; ICMP needs a raw socket and
//! is covered end to end in tests/e2e_health.rs).

use super::*;

fn prober(check: &str, target: SocketAddr) -> Prober {
    let hc: HealthCheck = serde_yaml::from_str(check).unwrap();
    Prober::new(&hc, target, Some("127.0.0.1".parse().unwrap()))
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn tcp_passes_on_a_listener_and_is_refused_on_a_closed_port() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = Arc::new(prober("{ protocol: tcp }", l.local_addr().unwrap()));
    p.probe().await.unwrap();
    let p = Arc::new(prober("{ protocol: tcp }", closed_port()));
    assert!(matches!(p.probe().await, Err(ProbeError::Refused)));
}

#[tokio::test]
async fn udp_silence_passes_and_port_unreachable_fails() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let p = prober(
        "{ protocol: udp, timeout: 1s }",
        silent.local_addr().unwrap(),
    );
    p.udp().await.unwrap();
    let p = prober("{ protocol: udp, timeout: 1s }", closed_port());
    assert!(matches!(p.udp().await, Err(ProbeError::PortUnreachable)));
}

#[tokio::test]
async fn udp_expect_needs_an_answer_containing_it() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = server.recv_from(&mut buf).await {
            let answer = if &buf[..n] == b"ping" {
                "pong!"
            } else {
                "what?"
            };
            let _ = server.send_to(answer.as_bytes(), peer).await;
        }
    });
    let check = "{ protocol: udp, timeout: 1s, send: ping, expect: pong }";
    prober(check, addr).udp().await.unwrap();
    let check = "{ protocol: udp, timeout: 1s, send: hello, expect: pong }";
    assert!(matches!(
        prober(check, addr).udp().await,
        Err(ProbeError::UnexpectedAnswer)
    ));
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let check = "{ protocol: udp, timeout: 1s, send: ping, expect: pong }";
    assert!(matches!(
        prober(check, silent.local_addr().unwrap()).udp().await,
        Err(ProbeError::Timeout)
    ));
}
