//! A client's TCP connection as the proxy serves it, without two system calls per connection
//! that nginx does not make either:
//! - hyper-util tells HTTP/1 from HTTP/2 by reading the first 24 bytes on their own, then
//!   reads the rest of the request: two reads where one does. A read that small is served
//!   from a read-ahead of [`READ_AHEAD`] bytes instead.
//! - hyper shuts the sending side down before it drops a connection it closes; the close
//!   that follows sends the FIN just the same.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// What a small read asks the socket for: a whole ordinary request head.
const READ_AHEAD: usize = 4 << 10;
/// Reads asking for less than this go through the read-ahead.
const SMALL_READ: usize = 1 << 10;

pub struct ClientTcp {
    tcp: TcpStream,
    ahead: BytesMut,
}

impl ClientTcp {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            ahead: BytesMut::new(),
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
            if buf.remaining() >= SMALL_READ {
                return Pin::new(&mut this.tcp).poll_read(cx, buf);
            }
            this.ahead.reserve(READ_AHEAD);
            if ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.tcp),
                cx,
                &mut this.ahead
            ))? == 0
            {
                return Poll::Ready(Ok(()));
            }
        }
        let n = this.ahead.len().min(buf.remaining());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    #[tokio::test]
    async fn small_reads_come_from_one_read_ahead_and_large_ones_go_straight_through() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let mut served = ClientTcp::new(l.accept().await.unwrap().0);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut first = [0u8; 4];
        served.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET ");
        assert_eq!(
            served.ahead.as_ref(),
            b"/ HTTP/1.1\r\n\r\n",
            "the rest came along"
        );
        let mut rest = vec![0u8; 8192];
        let n = served.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"/ HTTP/1.1\r\n\r\n");
        client.write_all(b"more").await.unwrap();
        let n = served.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"more");
        assert!(served.ahead.is_empty());
        drop(client);
        assert_eq!(served.read(&mut first).await.unwrap(), 0, "end of stream");
    }
}
