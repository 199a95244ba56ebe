//! An HTTP/1 client's end of stream that comes while a request is in flight is held back:
//! clients such as `printf … | socat - TCP:…` (or `OPENSSL:…`) shut their sending side once
//! the request is out and wait for the answer, which hyper would otherwise never send (it
//! ends a connection whose client closed mid-request, and the request is logged 499).
//! - Until the answer starts, for up to `GRACE`: nothing tells a client that left from one
//!   that half-closed but this wait, after which the request is given up as before (499).
//! - Once the answer has started, until it is done: a client that left makes the writes fail.
//!
//! TLS without close_notify (a bare FIN) reads as an unexpected end of stream, and is held
//! the same way.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    time::{Instant, Sleep},
};

use super::idle::Activity;

/// How long the end of stream waits for the answer to start: local answers and quick
/// backends, within socat's own wait (0.5 s); short, so that a request whose client left is
/// given up soon.
const GRACE: Duration = Duration::from_millis(250);
/// How often a held end of stream looks whether the answer is done (nothing wakes the read
/// side when it is).
const RECHECK: Duration = Duration::from_millis(20);

/// A connection's end of stream, as far as it is held.
#[derive(Default)]
pub struct HalfClose {
    /// The end of stream came with a request in flight: when the grace ends, and the timer
    /// of the next look.
    held: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl HalfClose {
    /// Reads from `io` into `buf` as `AsyncRead` does, but for an end of stream that comes
    /// while `activity` has a request in flight, held as described above.
    pub fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        activity: &Activity,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.held.is_none() {
            let before = buf.filled().len();
            let end = match ready!(Pin::new(io).poll_read(cx, buf)) {
                Ok(()) => buf.filled().len() == before && buf.remaining() > 0,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if !end || !activity.in_flight() {
                return Poll::Ready(Ok(()));
            }
            let now = Instant::now();
            self.held = Some((
                now + GRACE,
                Box::pin(tokio::time::sleep_until(now + RECHECK)),
            ));
        }
        let Some((grace_end, timer)) = &mut self.held else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let answered = !activity.in_flight();
            let given_up = !activity.answering() && Instant::now() >= *grace_end;
            if answered || given_up {
                return Poll::Ready(Ok(()));
            }
            ready!(timer.as_mut().poll(cx));
            timer.as_mut().reset(Instant::now() + RECHECK);
        }
    }
}
