//! Lingering close, as nginx's: a request body the answer did not need is still read (and
//! dropped) for a while, so that the client sees the answer.
//!
//! - HTTP/1: the proxy closes the connection after such an answer. Closed with the client's
//!   bytes still unread, the kernel answers them with a reset, which can reach the client
//!   before it has read the answer (curl then reports the upload failed, no status): the
//!   sending side is shut instead, and what still comes is read until the client closes.
//! - HTTP/2: dropping the body resets the stream, even right after the answer (some clients,
//!   curl 7.x among them, then report a failed upload): the rest is read to its end.

use std::{os::fd::AsFd, time::Duration};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// nginx's `lingering_time` and `lingering_timeout`: how long in all, and between two reads.
const LINGER: Duration = Duration::from_secs(30);
const LINGER_PAUSE: Duration = Duration::from_secs(5);

/// Reads and drops the rest of an HTTP/2 request body, then drops it.
pub async fn discard(mut body: Incoming) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(Some(Ok(_))) = tokio::time::timeout(LINGER_PAUSE, body.frame()).await {}
    })
    .await;
}

/// Closes `tcp` (about to be dropped) by lingering: its descriptor is duplicated, so the
/// drop closes nothing yet; a task shuts the sending side (the FIN after the answer) and reads
/// until the client closes.
pub fn close(tcp: &TcpStream) {
    let (Ok(fd), Ok(rt)) = (
        tcp.as_fd().try_clone_to_owned(),
        tokio::runtime::Handle::try_current(),
    ) else {
        return;
    };
    let std = std::net::TcpStream::from(fd);
    rt.spawn(async move {
        // Non-blocking already: the flag belongs to the socket, not the descriptor.
        let Ok(mut tcp) = TcpStream::from_std(std) else {
            return;
        };
        let _ = tcp.shutdown().await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(Ok(1..)) = tokio::time::timeout(LINGER_PAUSE, tcp.read(&mut buf)).await {}
        })
        .await;
    });
}
