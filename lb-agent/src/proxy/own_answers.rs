//! hyper answers an HTTP/1 request head it cannot parse by itself, before the proxy sees a
//! request: 400, or 431 for a head over `max_header_bytes`, each with an empty body. Written
//! through this wrapper, they become the proxy's short error pages that say the code, and a
//! head refused for a transfer coding the proxy does not implement (hyper refuses any that
//! does not end in chunked, RFC 9112 §6.3) gets the vendors' 501.
//!
//! hyper's own answers are told from answers to requests by when they are written: with no
//! request in flight on the connection (`idle::Activity`), and shaped as hyper writes them
//! (a 4xx status line, `content-length: 0`). The head they answer is the bytes read while no
//! request was in flight, kept (up to `KEEP` bytes) to look for the transfer coding.
//!
//! Being the HTTP/1 client connection's wrapper, it also reads through `half_close`.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{errors, half_close::HalfClose, idle::Activity};

/// How much of a request head is kept to look for its Transfer-Encoding.
const KEEP: usize = 8 << 10;

pub struct OwnAnswers<T> {
    io: T,
    activity: Arc<Activity>,
    /// The bytes read with no request in flight since the last one started (the head being
    /// read), and how many had started then.
    head: Vec<u8>,
    started: u32,
    /// The page replacing hyper's answer: its bytes, how many went out, and the length of
    /// hyper's answer (reported written once the page is).
    page: Option<(Vec<u8>, usize, usize)>,
    /// The connection was upgraded (101): what follows is not HTTP.
    tunnel: bool,
    /// The client's end of stream, held while a request is in flight.
    half_close: HalfClose,
}

impl<T> OwnAnswers<T> {
    pub fn new(io: T, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            head: Vec::new(),
            started: 0,
            page: None,
            tunnel: false,
            half_close: HalfClose::default(),
        }
    }

    /// Starts sending a page instead when `first` (of `len` bytes hyper writes) is the start
    /// of an answer hyper wrote itself.
    fn check(&mut self, first: &[u8], len: usize) {
        if let Some(status) = self.replaces(first) {
            self.activity.answered_with(status);
            self.page = Some((errors::page_bytes(status), 0, len));
        }
    }

    /// The status to answer instead, if `buf` is the start of an answer hyper wrote itself.
    fn replaces(&mut self, buf: &[u8]) -> Option<StatusCode> {
        if self.tunnel || self.page.is_some() || self.activity.in_flight() {
            return None;
        }
        let status = buf.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
        if status == b"101" {
            self.tunnel = true;
            return None;
        }
        let own = status.starts_with(b"4")
            && buf
                .windows(19)
                .take(64)
                .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0"));
        if !own {
            return None;
        }
        Some(if unsupported_coding(&self.head) {
            StatusCode::NOT_IMPLEMENTED
        } else {
            StatusCode::from_bytes(status).ok()?
        })
    }
}

/// Whether a request head names a Transfer-Encoding whose codings are not only chunked and
/// identity.
fn unsupported_coding(head: &[u8]) -> bool {
    const NAME: &[u8] = b"transfer-encoding:";
    head.split(|&b| b == b'\n')
        .filter(|line| line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
        .flat_map(|line| line[NAME.len()..].split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|c| {
            !c.is_empty()
                && !c.eq_ignore_ascii_case(b"chunked")
                && !c.eq_ignore_ascii_case(b"identity")
        })
}

impl<T: AsyncRead + Unpin> AsyncRead for OwnAnswers<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(this
            .half_close
            .poll_read(&mut this.io, &this.activity, cx, buf))?;
        if this.tunnel {
            return Poll::Ready(Ok(()));
        }
        let started = this.activity.started();
        if started != this.started {
            this.head.clear();
            this.started = started;
        }
        if !this.activity.in_flight() {
            let new = &buf.filled()[before..];
            let room = KEEP.saturating_sub(this.head.len());
            this.head.extend_from_slice(&new[..new.len().min(room)]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> OwnAnswers<T> {
    /// Sends the page; done, hyper's answer counts as written.
    fn poll_page(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((page, sent, len)) = &mut self.page else {
            return Poll::Ready(Ok(0));
        };
        while *sent < page.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &page[*sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => *sent += n,
            }
        }
        let len = *len;
        self.page = None;
        // Nothing else is looked at: the connection closes after hyper's answer.
        self.tunnel = true;
        Poll::Ready(Ok(len))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for OwnAnswers<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.page.is_none() {
            this.check(buf, buf.len());
        }
        if this.page.is_some() {
            return this.poll_page(cx);
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.page.is_none() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            this.check(first, bufs.iter().map(|b| b.len()).sum());
        }
        if this.page.is_some() {
            return this.poll_page(cx);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codings_other_than_chunked_and_identity_are_found_in_a_head() {
        for (head, unsupported) in [
            (
                &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
                true,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nTRANSFER-ENCODING:xchunked\r\n\r\n",
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nX-Transfer-Encoding: gzip\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", false),
        ] {
            assert_eq!(
                unsupported_coding(head),
                unsupported,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
