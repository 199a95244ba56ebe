//! An HTTP/1 client's end of stream that comes while a request is in flight is held back for
//! up to `GRACE`. Clients such as `printf … | socat - TCP:…` (or `OPENSSL:…`, which sends
//! TLS's close_notify) shut their sending side once the request is out and wait for the
//! answer, which hyper would otherwise never send: it ends a connection whose client closed
//! mid-request, and the request is logged 499. A client that really left still ends as 499,
//! `GRACE` later; nothing tells the two apart but the wait.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

use super::idle::Activity;

/// How long the end of stream waits for the request in flight to be answered: local answers
/// and quick backends, within socat's own wait (0.5 s); short, so that a request whose
/// client left is given up soon.
const GRACE: Duration = Duration::from_millis(250);

pub struct HalfClose<T> {
    io: T,
    activity: Arc<Activity>,
    /// The end of stream came with a request in flight: until when it is held.
    held: Option<Pin<Box<Sleep>>>,
}

impl<T> HalfClose<T> {
    pub fn new(io: T, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            held: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HalfClose<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(grace) = &mut this.held {
            // Let through once the answer is done (hyper reads on after writing it) or the
            // grace is over.
            if this.activity.in_flight() && grace.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let eof = buf.filled().len() == before && buf.remaining() > 0;
        if eof && this.activity.in_flight() {
            let mut grace = Box::pin(tokio::time::sleep(GRACE));
            // Polled once, to be woken when it is over.
            if grace.as_mut().poll(cx).is_pending() {
                this.held = Some(grace);
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HalfClose<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
