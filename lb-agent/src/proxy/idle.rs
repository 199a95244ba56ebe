//! A client connection's idle timeout (`timeouts.idle`, 15 s by default): the connection closes
//! once no request has been in flight on it for that long. It is the only such timer (hyper's
//! per-request header timer is off): it covers HTTP/1 between requests and slow heads, the
//! wait for the bytes that tell HTTP/1 from HTTP/2 (and the TLS handshake), and HTTP/2, where
//! a client could otherwise hold an idle connection forever. A request is in flight from its
//! head until its response body is dropped (sent, or abandoned), so long uploads and
//! downloads never count as idle.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;

/// One client connection's requests.
pub struct Activity {
    accepted: Instant,
    /// Requests started so far (the 1-based number of the latest).
    started: AtomicU32,
    in_flight: AtomicU32,
    /// When a request last ended, in nanoseconds since `accepted` (0 before the first). A
    /// start needs no timestamp: the request counts as in flight until it ends.
    last_ns: AtomicU64,
    /// The connection has carried all the requests it may (HTTP/2, which asks no single
    /// response to close it: the connection sends GOAWAY).
    spent: tokio::sync::Notify,
    /// The status sent instead of hyper's own answer to an unparsable head (0: none).
    own_answer: std::sync::atomic::AtomicU16,
    /// The connection closes lingering: a request's body or head was left unread (see
    /// `InFlight::linger`, `Activity::answered_with`).
    linger: std::sync::atomic::AtomicBool,
    /// The answer to the request in flight has started (HTTP/1: one at a time).
    answering: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            accepted: Instant::now(),
            started: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            last_ns: AtomicU64::new(0),
            spent: tokio::sync::Notify::new(),
            own_answer: std::sync::atomic::AtomicU16::new(0),
            linger: std::sync::atomic::AtomicBool::new(false),
            answering: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the connection is to close lingering (`super::linger::close`).
    pub fn lingers(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }

    /// Whether the answer to the request in flight has started (`InFlight::answering`).
    pub fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    /// How many requests have started.
    pub fn started(&self) -> u32 {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether a request is in flight (its head came, its answer is not done).
    pub fn in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// The proxy answered an unparsable head with `status` (see `own_answers`). The client
    /// may still be sending it (a head over the limit): the connection closes lingering.
    pub fn answered_with(&self, status: hyper::StatusCode) {
        self.own_answer.store(status.as_u16(), Ordering::Relaxed);
        self.linger.store(true, Ordering::Relaxed);
    }

    /// The status [`Activity::answered_with`] recorded.
    pub fn own_answer(&self) -> Option<u16> {
        Some(self.own_answer.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// The connection may take no more requests (see [`Activity::spent`]).
    pub fn spend(&self) {
        self.spent.notify_one();
    }

    /// Completes once [`Activity::spend`] was called.
    pub async fn spent(&self) {
        self.spent.notified().await;
    }

    /// A request head arrived: returns its number on the connection and the guard that keeps
    /// it in flight (hand it to the response body).
    pub fn start(self: &Arc<Self>) -> (u32, InFlight) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let n = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        (n, InFlight(Some(self.clone())))
    }

    fn end(&self, at: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.answering.store(false, Ordering::Relaxed);
        let ns = at.saturating_duration_since(self.accepted).as_nanos() as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.accepted + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }

    /// Completes once no request has been in flight for `idle` (counting from the accept
    /// before the first one).
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let since = self.last();
            tokio::time::sleep_until(since + idle).await;
            if self.last() != since {
                continue;
            }
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            // A request still in flight (a long upload or download): look again later.
            tokio::time::sleep(idle).await;
        }
    }
}

/// Keeps one request in flight until ended, or dropped.
pub struct InFlight(Option<Arc<Activity>>);

impl InFlight {
    /// The request's answer is ready: its head goes out next.
    pub fn answering(&self) {
        if let Some(a) = &self.0 {
            a.answering.store(true, Ordering::Relaxed);
        }
    }

    /// The request's answer leaves its body unread: the connection is to close lingering.
    pub fn linger(&self) {
        if let Some(a) = &self.0 {
            a.linger.store(true, Ordering::Relaxed);
        }
    }

    /// The request ended at `at` (a clock read the caller made anyway).
    pub fn end_at(mut self, at: std::time::Instant) {
        if let Some(a) = self.0.take() {
            a.end(at.into());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.end(Instant::now());
        }
    }
}
