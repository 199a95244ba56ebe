//! The access log: one JSON object per line and request, written by a thread of its own so
//! request handling never waits on the disk (nor on tokio's blocking pool, which
//! `tokio::fs` would go through for every write).
//!
//! Fields (strings unless noted): `time` (RFC 3339, UTC, ms; when the line is written, as
//! nginx's `$time_iso8601`), `listener`, `client`
//! (`ip:port`), `host` (`-` when the request had none), `method`, `path` (with the query), `protocol` (`HTTP/1.1`, `HTTP/2.0`),
//! `status` (number; 499 when the client left before the response), `bytes_in` and
//! `bytes_out` (numbers, body bytes), `request_time` (seconds, 3 decimals, until the last
//! response byte), `upstream_addr`, `upstream_status`, `upstream_connect_time`,
//! `upstream_header_time`, `upstream_response_time` (one comma-separated value per backend
//! tried, `-` where there is none, as nginx writes them), `tcpinfo_rtt` (number: the
//! kernel's smoothed round-trip time of the client connection in µs when the request came, as
//! nginx's `$tcpinfo_rtt`; `null` when unknown). A request head that could not be parsed
//! (answered 400 or 431 by hyper) has `-` for its method, host, path and protocol.

use std::{
    cell::{Cell, RefCell},
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use tracing::warn;

use super::{metrics::RequestStats, thread_slot, SLOTS};

/// A line's fields, in the order written (see the module's documentation).
pub const FIELDS: [&str; 17] = [
    "time",
    "listener",
    "client",
    "host",
    "method",
    "path",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "request_time",
    "upstream_addr",
    "upstream_status",
    "upstream_connect_time",
    "upstream_header_time",
    "upstream_response_time",
    "tcpinfo_rtt",
];

/// Bytes waiting for the writer; beyond this, lines are dropped (and counted) rather than
/// slowing requests down.
const MAX_PENDING: usize = 16 << 20;

/// The writer thread holds one reference to `shared` and ends (after writing what is pending)
/// once it holds the only one: every clone is gone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Pending lines, a buffer per worker thread (`super::thread_slot`): workers share no
    /// lock or cache line while logging; the writer collects them all.
    shards: [Shard; SLOTS],
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<Vec<u8>>);

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
        let shared = Arc::new(Shared::default());
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&shared, out))?
        };
        WRITERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(writer);
        Ok(Self { shared })
    }

    fn write(&self, record: &Record, took: Duration) {
        thread_local! {
            // Formatting happens outside the shared buffer's lock, in a buffer each worker
            // thread reuses: no allocation per line.
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            record.line(took, line);
            let mut pending = self.shared.shards[thread_slot().0]
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if pending.len() + line.len() <= MAX_PENDING / SLOTS {
                pending.extend_from_slice(line);
            } else if self.shared.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                warn!("access log writer behind; dropping lines");
            }
        });
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
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Writes what is pending every `FLUSH_EVERY`, and once more when the log is closed.
fn write_lines(shared: &Arc<Shared>, mut out: Box<dyn Write + Send>) {
    // Swapped with each pending buffer in turn, so all keep their capacity.
    let mut batch = Vec::new();
    loop {
        let closed = Arc::strong_count(shared) == 1;
        for shard in &shared.shards {
            std::mem::swap(
                &mut batch,
                &mut shard.0.lock().unwrap_or_else(|e| e.into_inner()),
            );
            if !batch.is_empty() {
                if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                    warn!(error = %e, "writing the access log");
                }
                batch.clear();
            }
        }
        if closed {
            return;
        }
        std::thread::sleep(FLUSH_EVERY);
    }
}

/// Where a listener's finished requests go: its access log and its request counters (which
/// carry the listener's name). One reference per request instead of one per part.
#[derive(Debug)]
pub struct Sink {
    pub log: AccessLog,
    pub requests: Arc<RequestStats>,
}

impl Sink {
    pub fn listener(&self) -> &str {
        &self.requests.listener
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
    sink: Arc<Sink>,
    pub client: SocketAddr,
    pub host: String,
    /// `None`: the request could not be parsed (logged as `-`).
    pub method: Option<hyper::Method>,
    pub path: String,
    pub protocol: &'static str,
    pub status: Option<u16>,
    /// Request body bytes read so far; `None`: the request has no body.
    pub bytes_in: Option<Arc<AtomicU64>>,
    pub bytes_out: u64,
    /// The client connection's round-trip time (µs), read when the request came.
    pub tcpinfo_rtt: Option<u32>,
    /// Inline: almost every request tries one backend.
    pub attempts: smallvec::SmallVec<[Attempt; 1]>,
    start: Instant,
    /// When the response's last byte came, if that was noted; else the drop's time is used.
    end: Option<Instant>,
}

impl Record {
    /// Boxed: the record travels with the response through hyper, which moves it several
    /// times per request.
    pub fn new(sink: &Arc<Sink>, client: SocketAddr) -> Box<Self> {
        Box::new(Self {
            sink: sink.clone(),
            client,
            host: String::new(),
            method: None,
            path: String::new(),
            protocol: "",
            status: None,
            bytes_in: None,
            bytes_out: 0,
            tcpinfo_rtt: None,
            attempts: smallvec::SmallVec::new(),
            start: Instant::now(),
            end: None,
        })
    }

    /// A request hyper could not parse and answered with `status` itself, before any service
    /// saw it: logged (when dropped) with `-` for what is unknown, as nginx logs its 400s.
    pub fn unparsed(sink: &Arc<Sink>, client: SocketAddr, status: u16) -> Box<Self> {
        let mut r = Self::new(sink, client);
        r.host = "-".into();
        r.path = "-".into();
        r.protocol = "-";
        r.status = Some(status);
        r
    }

    /// The response is complete at `now` (the caller's clock read, saving the drop one).
    pub fn ended(&mut self, now: Instant) {
        self.end = Some(now);
    }

    /// The backend try in progress (the last one started).
    pub fn attempt(&mut self) -> &mut Attempt {
        if self.attempts.is_empty() {
            self.attempts.push(Attempt::default());
        }
        let last = self.attempts.len() - 1;
        &mut self.attempts[last]
    }

    /// The status logged and counted: 499 when the client left before the answer.
    fn final_status(&self) -> u16 {
        self.status.unwrap_or(499)
    }

    /// The JSON line, appended to `out`; `took`: the request time. Written piece by piece
    /// (no `format!` machinery): it runs for every request.
    fn line(&self, took: Duration, out: &mut Vec<u8>) {
        // Strings that may hold anything (host, path, ...) go through serde_json's escaping;
        // addresses, numbers and times need none.
        let text = |out: &mut Vec<u8>, key: &[u8], v: &str| {
            out.extend_from_slice(key);
            let _ = serde_json::to_writer(&mut *out, v);
        };
        let num = |out: &mut Vec<u8>, key: &[u8], v: u64| {
            out.extend_from_slice(key);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        };
        // One value per backend tried, `-` where there is none.
        let list = |out: &mut Vec<u8>, key: &[u8], f: &dyn Fn(&Attempt, &mut Vec<u8>)| {
            out.extend_from_slice(key);
            if self.attempts.is_empty() {
                out.push(b'-');
            }
            for (i, a) in self.attempts.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                let before = out.len();
                f(a, out);
                if out.len() == before {
                    out.push(b'-');
                }
            }
            out.push(b'"');
        };
        out.extend_from_slice(b"{\"time\":\"");
        rfc3339_millis(out, self.start + took);
        out.push(b'"');
        text(out, b",\"listener\":", self.sink.listener());
        out.extend_from_slice(b",\"client\":\"");
        addr(out, self.client);
        out.push(b'"');
        // `-` for a request without one (HTTP/1.0), as for every field not sent.
        text(
            out,
            b",\"host\":",
            if self.host.is_empty() {
                "-"
            } else {
                &self.host
            },
        );
        text(
            out,
            b",\"method\":",
            self.method.as_ref().map_or("-", hyper::Method::as_str),
        );
        text(out, b",\"path\":", &self.path);
        text(out, b",\"protocol\":", self.protocol);
        num(out, b",\"status\":", self.final_status().into());
        num(
            out,
            b",\"bytes_in\":",
            self.bytes_in
                .as_ref()
                .map_or(0, |b| b.load(Ordering::Relaxed)),
        );
        num(out, b",\"bytes_out\":", self.bytes_out);
        out.extend_from_slice(b",\"request_time\":\"");
        secs(out, took);
        out.push(b'"');
        list(out, b",\"upstream_addr\":\"", &|a, o| {
            if let Some(x) = a.addr {
                addr(o, x);
            }
        });
        list(out, b",\"upstream_status\":\"", &|a, o| {
            if let Some(x) = a.status {
                o.extend_from_slice(itoa::Buffer::new().format(x).as_bytes());
            }
        });
        list(out, b",\"upstream_connect_time\":\"", &|a, o| {
            a.connect.inspect(|d| secs(o, *d));
        });
        list(out, b",\"upstream_header_time\":\"", &|a, o| {
            a.header.inspect(|d| secs(o, *d));
        });
        list(out, b",\"upstream_response_time\":\"", &|a, o| {
            a.response.inspect(|d| secs(o, *d));
        });
        match self.tcpinfo_rtt {
            Some(rtt) => num(out, b",\"tcpinfo_rtt\":", rtt.into()),
            None => out.extend_from_slice(b",\"tcpinfo_rtt\":null"),
        }
        out.extend_from_slice(b"}\n");
    }
}

/// `ip:port`, as `SocketAddr`'s `Display` writes it.
fn addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            ip(out, IpAddr::V4(*v4.ip()));
            out.push(b':');
            out.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// An address as `IpAddr`'s `Display` writes it; IPv4 without the formatting machinery,
/// which cost more than the rest of a log line, and built on the stack to be appended in
/// one copy (this runs two or three times per request).
pub fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15]; // 255.255.255.255
            let mut len = 0;
            let mut put = |b: u8| {
                text[len] = b;
                len += 1;
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    put(b'.');
                }
                if octet >= 100 {
                    put(b'0' + octet / 100);
                }
                if octet >= 10 {
                    put(b'0' + octet / 10 % 10);
                }
                put(b'0' + octet % 10);
            }
            out.extend_from_slice(&text[..len]);
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Seconds with 3 decimals, as nginx logs times.
fn secs(out: &mut Vec<u8>, d: Duration) {
    // In u64: `as_nanos` is a u128, whose division is a library call (four per log line).
    let ms = d
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from((d.subsec_nanos() + 500_000) / 1_000_000));
    out.extend_from_slice(itoa::Buffer::new().format(ms / 1000).as_bytes());
    dot_millis(out, (ms % 1000) as u32);
}

/// `.mmm`, for `ms` below 1000.
fn dot_millis(out: &mut Vec<u8>, ms: u32) {
    let digit = |n: u32| b'0' + (n % 10) as u8;
    out.extend_from_slice(&[b'.', digit(ms / 100), digit(ms / 10), digit(ms)]);
}

/// `at` as wall-clock time in RFC 3339, UTC, with milliseconds. The wall clock is read about
/// once a second per thread and `at` placed from there, since every request's line needs one
/// and a clock read costs about 50 ns here; the date and time of day are formatted once a
/// second too.
fn rfc3339_millis(out: &mut Vec<u8>, at: Instant) {
    thread_local! {
        // The wall clock (since the Unix epoch) at an instant.
        static ANCHOR: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
        // (Unix second, "YYYY-MM-DDTHH:MM:SS")
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    const FRESH: Duration = Duration::from_secs(1);
    let since = ANCHOR.with(|anchor| {
        let (then, wall) = match anchor.get() {
            Some((then, wall))
                if at.saturating_duration_since(then) < FRESH
                    && then.saturating_duration_since(at) < FRESH =>
            {
                (then, wall)
            }
            _ => {
                let fresh = (
                    Instant::now(),
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                );
                anchor.set(Some(fresh));
                fresh
            }
        };
        (wall + at.saturating_duration_since(then))
            .saturating_sub(then.saturating_duration_since(at))
    });
    SECOND.with_borrow_mut(|(sec, text)| {
        if *sec != since.as_secs() {
            *sec = since.as_secs();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(*sec);
            *text = humantime::format_rfc3339_seconds(whole).to_string();
            text.pop(); // the `Z`
        }
        out.extend_from_slice(text.as_bytes());
    });
    dot_millis(out, since.subsec_millis());
    out.push(b'Z');
}

impl Drop for Record {
    fn drop(&mut self) {
        let took = self.end.unwrap_or_else(Instant::now) - self.start;
        self.sink.requests.record(self.final_status(), took);
        self.sink.log.write(self, took);
    }
}

#[cfg(test)]
mod tests;
