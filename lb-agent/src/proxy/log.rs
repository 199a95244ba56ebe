//! The access log: one JSON object per line and request, written by a thread of its own so
//! request handling never waits on the disk (nor on tokio's blocking pool, which
//! `tokio::fs` would go through for every write).
//!
//! Fields (strings unless noted): `time` (RFC 3339, UTC, ms), `listener`, `client`
//! (`ip:port`), `host`, `method`, `path` (with the query), `protocol` (`HTTP/1.1`, `HTTP/2.0`),
//! `status` (number; 499 when the client left before the response), `bytes_in` and
//! `bytes_out` (numbers, body bytes), `request_time` (seconds, 3 decimals, until the last
//! response byte), `upstream_addr`, `upstream_status`, `upstream_connect_time`,
//! `upstream_header_time`, `upstream_response_time` (one comma-separated value per backend
//! tried, `-` where there is none, as nginx writes them).

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use super::metrics::RequestStats;

/// Lines waiting for the writer; beyond this they are dropped (and counted) rather than
/// slowing requests down.
const QUEUE: usize = 65536;

#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Appends to `path`, or writes to stdout.
    pub async fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        // Ends when the last sender (the listener's sites and records) is gone.
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        WRITERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(writer);
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    fn write(&self, line: String) {
        if self.tx.try_send(line).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!("access log queue full; dropping lines");
        }
    }
}

/// The writer threads, so the agent can let them write their last lines before it exits.
static WRITERS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Waits (up to `limit`) for the writers whose listeners are gone to write what they hold.
pub fn finish_writers(limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
        writers.retain(|w| !w.is_finished());
        if writers.is_empty() || Instant::now() >= deadline {
            return;
        }
        drop(writers);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How often the writer collects lines: it polls rather than being woken per line (a wake-up
/// per request cost more than the write), as nginx's `access_log ... flush=` does.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Writes what the queue holds every `FLUSH_EVERY`, and once more when it closes.
fn write_lines(mut rx: mpsc::Receiver<String>, mut out: Box<dyn Write + Send>) {
    use mpsc::error::TryRecvError;
    let mut buf = String::new();
    loop {
        let closed = loop {
            match rx.try_recv() {
                Ok(line) => buf.push_str(&line),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if !buf.is_empty() {
            if let Err(e) = out.write_all(buf.as_bytes()).and_then(|()| out.flush()) {
                warn!(error = %e, "writing the access log");
            }
            buf.clear();
        }
        if closed {
            return;
        }
        std::thread::sleep(FLUSH_EVERY);
    }
}

/// The JSON line's fields, in the order written.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    listener: &'a str,
    client: String,
    host: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    request_time: String,
    upstream_addr: String,
    upstream_status: String,
    upstream_connect_time: String,
    upstream_header_time: String,
    upstream_response_time: String,
}

/// One try at a backend.
#[derive(Debug, Default)]
pub struct Attempt {
    pub addr: Option<SocketAddr>,
    pub status: Option<u16>,
    pub connect: Option<Duration>,
    pub header: Option<Duration>,
    pub response: Option<Duration>,
}

/// What is known about a request; written (and counted in the listener's request metrics)
/// when dropped, which is when the response body has been sent (or abandoned), or — status
/// still unset — when the client left first (499).
#[derive(Debug)]
pub struct Record {
    log: AccessLog,
    requests: Arc<RequestStats>,
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub host: String,
    pub method: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: Option<u16>,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: u64,
    pub attempts: Vec<Attempt>,
    time: SystemTime,
    start: Instant,
}

impl Record {
    pub fn new(
        log: &AccessLog,
        requests: &Arc<RequestStats>,
        listener: Arc<str>,
        client: SocketAddr,
    ) -> Self {
        Self {
            log: log.clone(),
            requests: requests.clone(),
            listener,
            client,
            host: String::new(),
            method: String::new(),
            path: String::new(),
            protocol: "",
            status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            attempts: Vec::new(),
            time: SystemTime::now(),
            start: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The status logged and counted: 499 when the client left before the answer.
    fn final_status(&self) -> u16 {
        self.status.unwrap_or(499)
    }

    fn line(&self) -> String {
        use std::fmt::Write as _;
        let list = |f: &dyn Fn(&Attempt, &mut String) -> std::fmt::Result| {
            if self.attempts.is_empty() {
                return "-".to_string();
            }
            let mut out = String::new();
            for (i, a) in self.attempts.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let before = out.len();
                let _ = f(a, &mut out);
                if out.len() == before {
                    out.push('-');
                }
            }
            out
        };
        let secs = |d: Option<Duration>, out: &mut String| match d {
            Some(d) => write!(out, "{:.3}", d.as_secs_f64()),
            None => Ok(()),
        };
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            listener: &self.listener,
            client: self.client.to_string(),
            host: &self.host,
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            status: self.final_status(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            request_time: format!("{:.3}", self.start.elapsed().as_secs_f64()),
            upstream_addr: list(&|a, o| a.addr.map_or(Ok(()), |x| write!(o, "{x}"))),
            upstream_status: list(&|a, o| a.status.map_or(Ok(()), |x| write!(o, "{x}"))),
            upstream_connect_time: list(&|a, o| secs(a.connect, o)),
            upstream_header_time: list(&|a, o| secs(a.header, o)),
            upstream_response_time: list(&|a, o| secs(a.response, o)),
        };
        let mut out = serde_json::to_string(&line).unwrap_or_default();
        out.push('\n');
        out
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.requests
            .record(self.final_status(), self.start.elapsed());
        self.log.write(self.line());
    }
}
