//! The access log: one JSON object per line and request, written by a background task so
//! request handling never waits on the disk.
//!
//! Fields (strings unless noted): `time` (RFC 3339, UTC, ms), `listener`, `client`
//! (`ip:port`), `host`, `method`, `path` (with the query), `protocol` (`HTTP/1.1`, `HTTP/2.0`),
//! `status` (number; 499 when the client left before the response), `bytes_in` and
//! `bytes_out` (numbers, body bytes), `request_time` (seconds, 3 decimals, until the last
//! response byte), `upstream_addr`, `upstream_status`, `upstream_connect_time`,
//! `upstream_header_time`, `upstream_response_time` (one comma-separated value per backend
//! tried, `-` where there is none, as nginx writes them).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
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
        let out: Box<dyn AsyncWrite + Send + Unpin> = match path {
            Some(p) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await?,
            ),
            None => Box::new(tokio::io::stdout()),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(rx, out));
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

/// Writes in batches and flushes whenever the queue runs dry, so lines reach the file promptly
/// without a write per line under load.
async fn write_lines(mut rx: mpsc::Receiver<String>, mut out: Box<dyn AsyncWrite + Send + Unpin>) {
    let mut buf = String::new();
    while let Some(line) = rx.recv().await {
        buf.push_str(&line);
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(line) => buf.push_str(&line),
                Err(_) => break,
            }
        }
        if let Err(e) = async {
            out.write_all(buf.as_bytes()).await?;
            out.flush().await
        }
        .await
        {
            warn!(error = %e, "writing the access log");
        }
        buf.clear();
    }
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
        let list = |f: &dyn Fn(&Attempt) -> Option<String>| {
            if self.attempts.is_empty() {
                return "-".to_string();
            }
            let v: Vec<String> = self
                .attempts
                .iter()
                .map(|a| f(a).unwrap_or_else(|| "-".into()))
                .collect();
            v.join(", ")
        };
        let secs = |d: Option<Duration>| d.map(|d| format!("{:.3}", d.as_secs_f64()));
        let mut line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "listener": &*self.listener,
            "client": self.client.to_string(),
            "host": self.host,
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "status": self.final_status(),
            "bytes_in": self.bytes_in.load(Ordering::Relaxed),
            "bytes_out": self.bytes_out,
            "request_time": format!("{:.3}", self.start.elapsed().as_secs_f64()),
            "upstream_addr": list(&|a| a.addr.map(|a| a.to_string())),
            "upstream_status": list(&|a| a.status.map(|s| s.to_string())),
            "upstream_connect_time": list(&|a| secs(a.connect)),
            "upstream_header_time": list(&|a| secs(a.header)),
            "upstream_response_time": list(&|a| secs(a.response)),
        })
        .to_string();
        let _ = writeln!(line);
        line
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.requests
            .record(self.final_status(), self.start.elapsed());
        self.log.write(self.line());
    }
}
