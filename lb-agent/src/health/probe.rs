//! The probes: TCP connect, HTTP(S) request, ICMP echo, UDP (echo, then a datagram). Each
//! leaves from the configured source (the SNAT address), so backends see one known address.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use crate::config::{CheckMethod, CheckProtocol, CodeRange, HealthCheck};

#[cfg(test)]
mod tests;

/// Why a probe failed; the text is the `reason` in logs and the status output.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timeout")]
    Timeout,
    #[error("refused")]
    Refused,
    #[error("status {0}")]
    Status(u16),
    #[error("port unreachable")]
    PortUnreachable,
    #[error("no echo reply")]
    NoEchoReply,
    #[error("unexpected answer")]
    UnexpectedAnswer,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("tls: {0}")]
    Tls(String),
}

fn io_err(e: io::Error) -> ProbeError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ProbeError::Refused,
        io::ErrorKind::TimedOut => ProbeError::Timeout,
        _ => ProbeError::Io(e),
    }
}

/// One backend's probe, built once from the pool's `health_check`.
#[derive(Debug)]
pub struct Prober {
    protocol: CheckProtocol,
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    method: CheckMethod,
    path: String,
    host: String,
    expected: Vec<CodeRange>,
    send: Vec<u8>,
    expect: Option<Vec<u8>>,
    /// https: how backend certificates are checked (not at all unless a CA is configured); a
    /// CA that no longer loads fails every probe with the reason.
    tls: Result<Arc<rustls::ClientConfig>, String>,
}

impl Prober {
    pub fn new(hc: &HealthCheck, backend: SocketAddr, source: Option<IpAddr>) -> Self {
        let port = hc.port.map_or(backend.port(), |p| p.0);
        Self {
            protocol: hc.protocol,
            target: SocketAddr::new(backend.ip(), port),
            source,
            timeout: hc.timeout(),
            method: hc.method(),
            path: hc.path().to_string(),
            host: hc
                .host
                .clone()
                .unwrap_or_else(|| super::host_of(backend.ip())),
            expected: hc.expected_codes(),
            send: hc.send.clone().unwrap_or_default().into_bytes(),
            expect: hc.expect.clone().map(String::into_bytes),
            tls: match &hc.ca {
                Some(ca) => crate::proxy::tls::verifying_client_config(ca)
                    .map_err(|e| format!("CA {}: {e}", ca.display())),
                None => Ok(crate::proxy::tls::backend_client_config()),
            },
        }
    }

    /// One probe; the caller bounds it (`super::Timing::limit`).
    pub async fn probe(self: Arc<Self>) -> Result<(), ProbeError> {
        match self.protocol {
            CheckProtocol::None => Ok(()),
            CheckProtocol::Tcp => {
                let s = self.connect().await?;
                // Reset rather than close, as the vendors' probes do: no TIME_WAIT per probe.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                Ok(())
            }
            CheckProtocol::Http => self.http(self.connect().await?).await,
            CheckProtocol::Https => {
                let config = self.tls.clone().map_err(ProbeError::Tls)?;
                let tls = tokio_rustls::TlsConnector::from(config);
                let name = ServerName::try_from(self.host.clone())
                    .unwrap_or_else(|_| ServerName::IpAddress(self.target.ip().into()));
                let stream = tls
                    .connect(name, self.connect().await?)
                    .await
                    .map_err(io_err)?;
                self.http(stream).await
            }
            CheckProtocol::Icmp => echo(self.source, self.target.ip()).await,
            CheckProtocol::Udp => {
                // No echo reply within the timeout: the host is down, whatever UDP would say.
                tokio::time::timeout(self.timeout, echo(self.source, self.target.ip()))
                    .await
                    .map_err(|_| ProbeError::NoEchoReply)??;
                self.udp().await
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, ProbeError> {
        let s = match self.target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(src) = self.source {
            s.bind(SocketAddr::new(src, 0))?;
        }
        s.connect(self.target).await.map_err(io_err)
    }

    async fn http<T>(&self, io: T) -> Result<(), ProbeError>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let conn = tokio::spawn(conn);
        let method = match self.method {
            CheckMethod::Head => hyper::Method::HEAD,
            CheckMethod::Get => hyper::Method::GET,
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(&self.path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::USER_AGENT, "lb-agent-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Io(io::Error::other(e)))?;
        let status = sender.send_request(req).await?.status().as_u16();
        conn.abort();
        if self.expected.iter().any(|r| r.contains(status)) {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        }
    }

    /// A datagram to the port: an ICMP port unreachable within the timeout fails, silence
    /// passes, unless `expect` asks for a real answer.
    async fn udp(&self) -> Result<(), ProbeError> {
        let local = SocketAddr::new(
            self.source.unwrap_or(match self.target {
                SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
                SocketAddr::V6(_) => IpAddr::from([0u8; 16]),
            }),
            0,
        );
        let s = UdpSocket::bind(local).await?;
        // Connected, so the kernel reports the ICMP error as ECONNREFUSED on this socket.
        s.connect(self.target).await?;
        s.send(&self.send).await.map_err(udp_err)?;
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(self.timeout, s.recv(&mut buf)).await {
            Err(_) if self.expect.is_some() => Err(ProbeError::Timeout),
            Err(_) => Ok(()),
            Ok(r) => {
                let n = r.map_err(udp_err)?;
                match &self.expect {
                    Some(e) if !buf[..n].windows(e.len().max(1)).any(|w| w == e.as_slice()) => {
                        Err(ProbeError::UnexpectedAnswer)
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

fn udp_err(e: io::Error) -> ProbeError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ProbeError::PortUnreachable,
        _ => io_err(e),
    }
}

/// ICMP (or ICMPv6) echo request on a raw socket; waits for the matching reply.
async fn echo(source: Option<IpAddr>, target: IpAddr) -> Result<(), ProbeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v4 = target.is_ipv4();
    let (domain, proto, request, reply) = if v4 {
        (Domain::IPV4, Protocol::ICMPV4, 8, 0)
    } else {
        (Domain::IPV6, Protocol::ICMPV6, 128, 129)
    };
    let raw = Socket::new(domain, Type::RAW, Some(proto))?;
    if let Some(src) = source {
        raw.bind(&SocketAddr::new(src, 0).into())?;
    }
    raw.set_nonblocking(true)?;
    // A raw socket reads and writes whole datagrams: tokio's UDP socket type drives it.
    let sock = UdpSocket::from_std(std::net::UdpSocket::from(raw))?;
    let r = super::random();
    let (id, seq) = ((r >> 16) as u16, r as u16);
    let mut pkt = [0u8; 16];
    pkt[0] = request;
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"lb-probe");
    if v4 {
        // The kernel fills in ICMPv6 checksums only.
        let sum = lb_common::csum::checksum_be(&pkt, 0);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    sock.send_to(&pkt, SocketAddr::new(target, 0)).await?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        let icmp = if v4 {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            &buf[ihl.min(n)..n]
        } else {
            &buf[..n]
        };
        if from.ip() == target
            && icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(());
        }
    }
}
