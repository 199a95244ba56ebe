//! A client's TCP connection as the proxy serves it, without two system calls per connection
//! that nginx does not make either:
//! - Telling HTTP/1 from HTTP/2 without TLS takes the client's first bytes; they are read
//!   with room for a whole ordinary request head and kept for the HTTP/1 parser, so the
//!   request costs one read.
//! - hyper shuts the sending side down before it drops a connection it closes; the close
//!   that follows sends the FIN just the same (unless the connection closes lingering, see
//!   `super::linger`).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::idle::Activity;

/// What the first read asks the socket for: a whole ordinary request head.
const READ_AHEAD: usize = 4 << 10;

/// What an HTTP/2 client without TLS ("prior knowledge") sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct ClientTcp {
    tcp: TcpStream,
    /// Read, not yet handed on.
    ahead: BytesMut,
    /// The connection's requests: whether it closes lingering.
    activity: Arc<Activity>,
}

impl ClientTcp {
    pub fn new(tcp: TcpStream, activity: Arc<Activity>) -> Self {
        Self {
            tcp,
            ahead: BytesMut::new(),
            activity,
        }
    }

    /// Whether the client opens with HTTP/2's preface: reads (as a rule once) until its first
    /// bytes tell. What was read is read again by the reads that follow. A client that closes
    /// first counts as HTTP/1, whose parser sees the end.
    pub async fn starts_with_h2_preface(&mut self) -> io::Result<bool> {
        loop {
            let n = self.ahead.len().min(H2_PREFACE.len());
            if self.ahead[..n] != H2_PREFACE[..n] {
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            self.ahead.reserve(READ_AHEAD);
            if self.tcp.read_buf(&mut self.ahead).await? == 0 {
                return Ok(false);
            }
        }
    }
}

impl AsyncRead for ClientTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        let n = this.ahead.len().min(buf.remaining());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        if this.ahead.is_empty() {
            // Handed on whole: the buffer is not needed for the rest of the connection.
            this.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    /// Nothing: the connection is dropped (closed) right after, which sends the FIN.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for ClientTcp {
    fn drop(&mut self) {
        if self.activity.lingers() {
            super::linger::close(&self.tcp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, ClientTcp) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (
            client,
            ClientTcp::new(l.accept().await.unwrap().0, Activity::new()),
        )
    }

    #[tokio::test]
    async fn an_http1_request_is_told_by_its_first_read_and_read_again_whole() {
        let (mut client, mut served) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(!served.starts_with_h2_preface().await.unwrap());
        let mut first = [0u8; 4];
        served.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET ");
        let mut rest = vec![0u8; 8192];
        let n = served.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"/ HTTP/1.1\r\n\r\n");
        client.write_all(b"more").await.unwrap();
        let n = served.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"more");
        assert_eq!(
            served.ahead.capacity(),
            0,
            "the buffer is released once read"
        );
        drop(client);
        assert_eq!(served.read(&mut first).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn the_h2_preface_is_recognised_even_when_it_comes_in_pieces() {
        let (mut client, mut served) = pair().await;
        let sniff = tokio::spawn(async move {
            let h2 = served.starts_with_h2_preface().await.unwrap();
            (h2, served)
        });
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let (h2, mut served) = sniff.await.unwrap();
        assert!(h2);
        let mut all = vec![0u8; H2_PREFACE.len() + 6];
        served.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..H2_PREFACE.len()], H2_PREFACE);
        assert_eq!(&all[H2_PREFACE.len()..], b"frames");
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_or_starts_like_the_preface_is_http1() {
        let (client, mut served) = pair().await;
        drop(client);
        assert!(!served.starts_with_h2_preface().await.unwrap());
        let (mut client, mut served) = pair().await;
        client.write_all(b"PRI * HTTP/1.1\r\n").await.unwrap();
        assert!(!served.starts_with_h2_preface().await.unwrap());
    }
}
