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

/// An HTTPS server on loopback answering every request with `status`, with a self-signed
/// certificate for `localhost`; returns its address and the certificate's PEM.
async fn https_server(status: u16) -> (SocketAddr, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = cert.pem();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, pem)
}

#[tokio::test]
async fn https_checks_the_status_and_the_certificate_only_when_a_ca_is_configured() {
    let (ok, pem) = https_server(200).await;
    let (failing, _) = https_server(503).await;
    let dir = std::env::temp_dir().join(format!("lb-probe-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (own, other) = (dir.join("own.pem"), dir.join("other.pem"));
    std::fs::write(&own, &pem).unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    std::fs::write(&other, other_cert.pem()).unwrap();

    // Not verified by default (self-signed backends are the norm).
    let check = "{ protocol: https, timeout: 2s }";
    Arc::new(prober(check, ok)).probe().await.unwrap();
    let r = Arc::new(prober(check, failing)).probe().await;
    assert!(matches!(r, Err(ProbeError::Status(503))), "{r:?}");

    let with = |ca: &std::path::Path| {
        format!(
            "{{ protocol: https, host: localhost, ca: {} }}",
            ca.display()
        )
    };
    Arc::new(prober(&with(&own), ok)).probe().await.unwrap();
    let r = Arc::new(prober(&with(&other), ok)).probe().await;
    let reason = r
        .expect_err("a certificate from another CA must fail")
        .to_string();
    assert!(reason.contains("certificate"), "{reason}");
    let r = Arc::new(prober(&with(&dir.join("missing.pem")), ok))
        .probe()
        .await;
    assert!(matches!(r, Err(ProbeError::Tls(_))), "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_http_probe_dropped_at_its_timeout_closes_its_connection() {
    // A backend that accepts and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = Arc::new(prober("{ protocol: http }", l.local_addr().unwrap()));
    let probe =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_millis(200), p.probe()).await },
        );
    let (mut s, _) = l.accept().await.unwrap();
    assert!(probe.await.unwrap().is_err(), "timed out");
    // The request came, then the connection closes (EOF) instead of staying open.
    let mut buf = vec![0; 4096];
    let eof = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    assert!(eof.await.is_ok(), "the probe's connection stayed open");
}
