//! The L7 proxy for `http` and `https` listeners: accept loop, TLS, routing, forwarding with
//! retries, error answers, persistence, WebSocket tunnels and graceful shutdown.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (ALPN on https, the preface on http); backends get
//! HTTP/1.1. Defaults are the vendors' (Alibaba SLB / Huawei ELB, nginx/Tengine based).

mod affinity;
pub mod balance;
mod client_tcp;
pub mod errors;
mod h1;
mod half_close;
pub mod headers;
mod idle;
mod linger;
pub mod log;
pub mod metrics;
mod own_answers;
pub(crate) mod path;
pub mod tls;
pub mod upstream;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    server::conn::{http1, http2},
    service::service_fn,
    Method, Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
    time::Sleep,
};
use tracing::{debug, info, warn};

use self::{
    client_tcp::ClientTcp,
    h1::ExchangeError,
    log::{AccessLog, Attempt, Record, Sink},
    metrics::RequestStats,
    own_answers::OwnAnswers,
    upstream::{ActiveGuard, ConnectError, Pool},
};
use crate::{
    config::{BackendProtocol, Config, Listener, Persistence, PersistenceKind, Timeouts},
    health::Health,
};

/// Defaults of the optional listener settings (the vendors' values; 8 KiB for the request
/// target is nginx's `large_client_header_buffers`).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 << 30;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
pub const DEFAULT_MAX_URI_BYTES: usize = 8 << 10;
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: u32 = 100;
pub const DEFAULT_PERSISTENCE_COOKIE: &str = "SERVERID";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listener `{listener}`: listening on {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("listener `{listener}`: {source}")]
    Tls {
        listener: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("listener `{listener}`: opening the access log {}: {source}", path.display())]
    AccessLog {
        listener: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting an L7 worker: {source}")]
    Worker {
        #[source]
        source: io::Error,
    },
}

/// Shards of state every worker thread touches per request (access log buffers, idle backend
/// connections): a worker only takes its own shard's lock, so workers share no lock or cache
/// line. More threads than slots (tests on a multi-threaded runtime) share them.
const SLOTS: usize = 8;

/// The calling thread's shard (threads take the next one the first time they ask), and its id.
fn thread_slot() -> (usize, std::thread::ThreadId) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SLOT: (usize, std::thread::ThreadId) =
            (NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS, std::thread::current().id());
    }
    SLOT.with(|s| *s)
}

/// Everything one http/https listener's servers are built from: its own settings, the pools
/// it names and the https port its redirect points to. A reload keeps a listener's servers
/// (and its connections) while this stays the same.
#[derive(Debug, PartialEq)]
pub struct Basis {
    listener: Listener,
    pools: Vec<crate::config::Pool>,
    redirect_port: Option<u16>,
    cpu_affinity: bool,
}

impl Basis {
    pub fn of(cfg: &Config, l: &Listener) -> Self {
        let named = |p: &&crate::config::Pool| {
            l.pool.as_deref() == Some(p.name.as_str()) || l.routes.iter().any(|r| r.pool == p.name)
        };
        Self {
            listener: l.clone(),
            pools: cfg.pools.iter().filter(named).cloned().collect(),
            redirect_port: l
                .redirect
                .as_ref()
                .and_then(|_| cfg.https_port(l.vip))
                .map(|p| p.0),
            cpu_affinity: cfg.agent.l7_cpu_affinity,
        }
    }
}

/// Builds a server for each of `listeners` (http/https listeners of `cfg`), listening on what
/// `bind` returns for it (the VIP and port in production, an ephemeral loopback port in
/// tests). A listener counts its requests on from its entry in `carried`, if any: a reload
/// that replaces its servers keeps its counters.
pub async fn servers<'a>(
    cfg: &Config,
    listeners: impl IntoIterator<Item = &'a Listener>,
    health: &Health,
    carried: &[Arc<RequestStats>],
    mut bind: impl FnMut(&Listener) -> io::Result<std::net::TcpListener>,
) -> Result<Vec<Server>, ProxyError> {
    let mut out = Vec::new();
    for l in listeners {
        let addr = SocketAddr::new(l.vip, l.port.0);
        let bind_err = |source| ProxyError::Bind {
            listener: l.name.clone(),
            addr,
            source,
        };
        let tcp = listening(bind(l).map_err(bind_err)?).map_err(bind_err)?;
        let requests = carried
            .iter()
            .find(|r| r.listener == l.name)
            .cloned()
            .unwrap_or_else(|| Arc::new(RequestStats::new(&l.name)));
        let site = Site::new(cfg, health, l, requests).await?;
        let tls = match &l.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(
                tls::server_config(t).map_err(|source| ProxyError::Tls {
                    listener: l.name.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The connection's idle timer (`idle::Activity`) closes a connection whose next
            // request head has not come in within the idle timeout, slow heads included;
            // hyper's own header timer would arm and cancel a second timer per request.
            .header_read_timeout(None)
            // Heads beyond the limit are refused with 431 by hyper itself: measured on the
            // parsed head, since a read may take the buffer past its size with a whole head
            // in it (TLS hands over records of up to 16 KiB).
            .max_buf_size(l.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES))
            .max_header_size(l.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            // Twice the limit: lists between the two get the proxy's 431 (`Site::handle`);
            // beyond, h2 answers a bare 431 and resets the stream.
            .max_header_list_size(
                u32::try_from(
                    l.max_header_bytes
                        .unwrap_or(DEFAULT_MAX_HEADER_BYTES)
                        .saturating_mul(2),
                )
                .unwrap_or(u32::MAX),
            );
        out.push(Server {
            tcp,
            site: Arc::new(site),
            tls,
            http: Arc::new(Http { h1, h2 }),
            worker: None,
        });
    }
    Ok(out)
}

/// One listener's accept loop.
pub struct Server {
    tcp: TcpListener,
    site: Arc<Site>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Arc<Http>,
    /// This worker's connection count, when a selector balances the listener's workers.
    worker: Option<Arc<balance::Worker>>,
}

impl Server {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The listener's request counters.
    pub fn requests(&self) -> Arc<RequestStats> {
        self.site.sink.requests.clone()
    }

    /// What a worker thread needs to serve this listener too: the same site on a socket of its
    /// own (SO_REUSEPORT: the kernel spreads new connections over the workers' sockets).
    fn twin(&self) -> io::Result<Twin> {
        Ok(Twin {
            tcp: bind_shared(self.tcp.local_addr()?)?,
            site: self.site.clone(),
            tls: self.tls.clone(),
            http: self.http.clone(),
            worker: None,
        })
    }

    /// This server as a twin for a worker thread (its socket leaves this runtime).
    fn into_twin(self) -> io::Result<Twin> {
        Ok(Twin {
            tcp: self.tcp.into_std()?,
            site: self.site,
            tls: self.tls,
            http: self.http,
            worker: self.worker,
        })
    }

    /// The next connection. A worker that finds its queue empty tells the selector (see
    /// `balance::Worker::queue_empty`).
    fn accept(&self) -> impl Future<Output = io::Result<(tokio::net::TcpStream, SocketAddr)>> + '_ {
        std::future::poll_fn(|cx| {
            let polled = self.tcp.poll_accept(cx);
            if let (Poll::Pending, Some(worker)) = (&polled, &self.worker) {
                worker.queue_empty();
            }
            polled
        })
    }

    /// Serves until `shutdown` changes (or its sender goes), then stops accepting and gives
    /// in-flight requests up to `grace` to finish.
    pub async fn run(self, mut shutdown: watch::Receiver<()>, grace: Duration) {
        // Each connection holds a receiver: true asks it to finish, and the sender's
        // `closed()` is all of them gone.
        let (drain, draining) = watch::channel(false);
        info!(listener = %self.site.sink.listener(), addr = ?self.tcp.local_addr().ok(), "proxy listening");
        let mut sweep = tokio::time::interval(SWEEP_IDLE_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                accepted = self.accept() => match accepted {
                    Ok((stream, peer)) if !self.site.acl.admits(peer.ip()) => {
                        debug!(listener = %self.site.sink.listener(), client = %peer, "refused by the ACL");
                        // A reset, not a close: the client learns at once, nothing is sent
                        // (a zero linger does not block).
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                    Ok((stream, peer)) => {
                        let conn = Conn {
                            site: self.site.clone(),
                            tls: self.tls.clone(),
                            http: self.http.clone(),
                            peer,
                            _open: self.worker.as_ref().map(balance::Worker::open),
                        };
                        // Boxed: the runtime moves a task's future by value through the
                        // spawn's layers and again when it ends (about 1 KiB, each a memcpy);
                        // a box is one allocation instead.
                        tokio::spawn(Box::pin(conn.serve(stream, draining.clone())));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        warn!(listener = %self.site.sink.listener(), error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = sweep.tick() => self.site.pools.iter().for_each(|p| p.sweep_idle()),
                _ = shutdown.changed() => break,
            }
        }
        drop(self.tcp);
        info!(listener = %self.site.sink.listener(), "proxy stopped accepting; draining");
        drop(draining);
        let _ = drain.send(true);
        if tokio::time::timeout(grace, drain.closed()).await.is_err() {
            warn!(listener = %self.site.sink.listener(), grace = ?grace, "connections still open at the shutdown deadline");
        }
    }
}

struct Conn {
    site: Arc<Site>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Arc<Http>,
    peer: SocketAddr,
    /// Counted on its worker until the connection ends.
    _open: Option<balance::Open>,
}

impl Conn {
    async fn serve(self, stream: tokio::net::TcpStream, mut draining: watch::Receiver<bool>) {
        let fd = stream.as_raw_fd();
        let activity = idle::Activity::new();
        let stream = ClientTcp::new(stream, activity.clone());
        let (site, peer, tls) = (self.site, self.peer, self.tls.is_some());
        // For X-Forwarded-For and X-Real-IP: formatted once per connection, shared by its
        // requests.
        let client_ip = {
            let mut text = Vec::with_capacity(39);
            log::ip(&mut text, peer.ip());
            HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
        };
        let svc = {
            let (site, activity) = (site.clone(), activity.clone());
            service_fn(move |req: Request<Incoming>| {
                let (n, in_flight) = activity.start();
                // The client is asked to close after the last request a connection may carry:
                // HTTP/1 in that response, HTTP/2 by GOAWAY (streams in flight finish).
                let h2 = req.version() == Version::HTTP_2;
                if h2 && n == site.max_requests {
                    activity.spend();
                }
                let last = !h2 && n >= site.max_requests;
                // Streams past the last that the client opened before the GOAWAY reached it
                // are refused unprocessed (REFUSED_STREAM: safe to retry on a new connection,
                // RFC 9113 §8.7), as nginx refuses them.
                let answer = (!h2 || n <= site.max_requests).then(|| {
                    let client = Client {
                        addr: peer,
                        ip: client_ip.clone(),
                        tls,
                        fd,
                    };
                    site.handle(req, client)
                });
                async move {
                    let mut res = match answer {
                        Some(Answer::Now(res)) => *res,
                        Some(Answer::Later(relay)) => relay.await,
                        None => return Err(h2::Error::from(h2::Reason::REFUSED_STREAM)),
                    };
                    if last {
                        res.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    if res.extensions().get::<UnreadBody>().is_some() {
                        in_flight.linger();
                    }
                    in_flight.answering();
                    res.body_mut().request = Some(in_flight);
                    Ok(res)
                }
            })
        };
        // One wait for the drain and one idle timer over the connection's life, not one per
        // phase: each registers with the listener's channel or the timer wheel.
        let drained = drained(&mut draining);
        tokio::pin!(drained);
        let idle = activity.idle_for(site.timeouts.idle);
        tokio::pin!(idle);
        let (io, h2) = tokio::select! {
            opened = open(stream, self.tls, site.timeouts.request, peer) => match opened {
                Some(opened) => opened,
                None => return,
            },
            () = &mut idle => {
                debug!(client = %peer, "no request within the idle timeout; closing");
                return;
            }
            () = &mut drained => return,
        };
        // The connections are boxed: passed to `drive` inline, hyper's connection is copied
        // into its future, which measured about 200 instructions more per connection than
        // the allocation (callgrind).
        let result = if h2 {
            let conn = self.http.h2.serve_connection(TokioIo::new(io), svc);
            let spent = activity.spent();
            tokio::pin!(spent);
            drive(Box::pin(conn), peer, idle, drained, spent).await
        } else {
            let io = TokioIo::new(OwnAnswers::new(io, activity.clone()));
            let conn = self.http.h1.serve_connection(io, svc).with_upgrades();
            let never = std::future::pending();
            tokio::pin!(never);
            drive(Box::pin(conn), peer, idle, drained, never).await
        };
        if let Err(e) = result {
            // A request head hyper could not parse: answered (431 when it outgrew
            // `max_header_bytes`, 501 for its transfer coding, else 400; see `own_answers`)
            // and closed; it is logged and counted like any other answer.
            if e.is_parse() {
                let own = activity.own_answer();
                let status = own.unwrap_or(if e.is_parse_too_large() { 431 } else { 400 });
                let mut record = Record::unparsed(&site.sink, peer, status);
                // The proxy's page went out in place of hyper's empty answer.
                record.bytes_out = own
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .map_or(0, |s| errors::body(s).len() as u64);
                drop(record);
            }
            debug!(client = %peer, error = %e, "client connection ended with an error");
        }
    }
}

/// A client connection ready for HTTP: TLS's handshake done (within `handshake_timeout`, as
/// part of receiving the request), and whether it speaks HTTP/2, as TLS's ALPN agreed or
/// (without TLS) as the client's first bytes say. `None`: the client is gone.
async fn open(
    mut stream: ClientTcp,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    peer: SocketAddr,
) -> Option<(Box<dyn ClientIo>, bool)> {
    let Some(acceptor) = tls else {
        return match stream.starts_with_h2_preface().await {
            Ok(h2) => Some((Box::new(stream), h2)),
            Err(e) => {
                debug!(client = %peer, error = %e, "reading the first request failed");
                None
            }
        };
    };
    // Boxed: the handshake's state is most of this future, which plain HTTP would otherwise
    // carry (and the runtime copy) for nothing.
    match tokio::time::timeout(handshake_timeout, Box::pin(acceptor.accept(stream))).await {
        Ok(Ok(s)) => {
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            Some((Box::new(s), h2))
        }
        Ok(Err(e)) => {
            debug!(client = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(client = %peer, "TLS handshake timed out");
            None
        }
    }
}

/// The HTTP/1 and HTTP/2 settings of a listener's client connections.
struct Http {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// A client connection as hyper serves it, over HTTP/1 or HTTP/2.
trait Served: Future<Output = Result<(), hyper::Error>> {
    /// Finish what is in flight, then end (HTTP/2: GOAWAY first).
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<S> Served for http1::UpgradeableConnection<TokioIo<OwnAnswers<Box<dyn ClientIo>>>, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<S> Served for http2::Connection<TokioIo<Box<dyn ClientIo>>, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// Serves a client connection until it ends. Idle, draining or `spent` (it carried all the
/// requests it may), it is asked to finish gracefully: HTTP/2 sends GOAWAY and ends once its
/// streams are done, HTTP/1 closes after the response in progress.
async fn drive(
    mut conn: Pin<Box<impl Served>>,
    peer: SocketAddr,
    idle: Pin<&mut impl Future<Output = ()>>,
    drained: Pin<&mut impl Future<Output = ()>>,
    spent: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), hyper::Error> {
    tokio::select! {
        r = conn.as_mut() => r,
        () = idle => {
            debug!(client = %peer, "no request within the idle timeout; closing");
            // Nothing is in flight, so nothing is cut short: HTTP/1 between requests closes
            // at once, HTTP/2 gets its GOAWAY out. A head still arriving (slowloris) is not
            // waited for.
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
        () = drained => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = spent => {
            debug!(client = %peer, "the connection's last request; closing");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Completes when the server asks its connections to finish (or is gone).
async fn drained(draining: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not Send).
    let _ = draining.wait_for(|d| *d).await;
}

/// A request's answer: at once (a local answer), or once a backend gave one. Boxed: relaying
/// takes a few KiB of state, which hyper's dispatcher would otherwise copy whole whenever it
/// moves the answer's future.
enum Answer {
    /// Boxed, as local answers are rare: inline, every `Later` would be as large.
    Now(Box<Response<ResponseBody>>),
    Later(Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>),
}

/// A request ready for its backends (`Site::prepare`): nothing in it refers to the client's
/// request any more.
struct Forward {
    record: Box<Record>,
    method: Method,
    peer: std::net::IpAddr,
    /// Its pool, in `Site::pools`.
    pool: usize,
    head: h1::Head,
    /// `RequestBody(None)` when the request has none.
    body: RequestBody,
    /// The backend persistence pins it to.
    sticky: Option<usize>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Who sent a request.
struct Client {
    addr: SocketAddr,
    /// The address as a header value.
    ip: HeaderValue,
    tls: bool,
    /// The connection's socket, open while its requests are served.
    fd: RawFd,
}

/// The kernel's smoothed round-trip time of TCP socket `fd`, in µs (`TCP_INFO`'s `tcpi_rtt`,
/// nginx's `$tcpinfo_rtt`).
fn tcp_rtt_us(fd: RawFd) -> Option<u32> {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` describe a writable buffer of that size; a closed `fd` only
    // makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_rtt)
}

/// A client connection's transport: TCP, or TLS over it.
trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// A route with its pool (an index in `Site::pools`).
struct Rule {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    pool: usize,
}

/// A route's host, lower case; requests' hosts are compared ignoring ASCII case (DNS names
/// are case-insensitive), without lowering a copy of each.
enum HostMatch {
    Exact(String),
    /// `*.example.com` as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                let (host, s) = (host.as_bytes(), s.as_bytes());
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// A listener's settings (defaults applied) and state.
struct Site {
    /// The listener's configured port, for X-Forwarded-Port.
    port: u16,
    /// The listener's VIP and port (the port left out when the scheme's default): the Host
    /// sent for a request without one (HTTP/1.0), since HTTP/1.1 requires it (RFC 9112 §3.2).
    authority: HeaderValue,
    rules: Vec<Rule>,
    /// The default pool, in `pools`.
    default: Option<usize>,
    /// Every pool the rules and the default use, once.
    pools: Vec<Pool>,
    /// Where to redirect every request to.
    redirect: Option<Redirect>,
    persistence: Option<Persistence>,
    timeouts: Timeouts,
    max_body_bytes: u64,
    max_uri_bytes: usize,
    max_header_bytes: usize,
    max_requests: u32,
    backend_tls: Option<tokio_rustls::TlsConnector>,
    /// Which clients may connect (checked at accept, as the datapath does for tcp/udp).
    acl: crate::config::Acl,
    sink: Arc<Sink>,
}

impl Site {
    async fn new(
        cfg: &Config,
        health: &Health,
        l: &Listener,
        requests: Arc<RequestStats>,
    ) -> Result<Self, ProxyError> {
        let scheduler = l.scheduler();
        let mut pools: Vec<Pool> = Vec::new();
        let mut pool = |name: &str| -> usize {
            if let Some(i) = pools.iter().position(|p| p.name == name) {
                return i;
            }
            // Validation guarantees the pool exists.
            let def = cfg.pools.iter().find(|p| p.name == name);
            pools.push(Pool::new(
                def.unwrap_or(&crate::config::Pool {
                    name: name.into(),
                    backends: Vec::new(),
                    health_check: None,
                }),
                scheduler,
                health.pool(name),
            ));
            pools.len() - 1
        };
        let rules = l
            .routes
            .iter()
            .map(|r| Rule {
                host: r.host.as_ref().map(|h| {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('*') {
                        Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                        None => HostMatch::Exact(h),
                    }
                }),
                path_prefix: r.path_prefix.clone(),
                pool: pool(&r.pool),
            })
            .collect();
        let default = l.pool.as_deref().map(&mut pool);
        let redirect = l.redirect.as_ref().map(|r| Redirect {
            code: StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
            port: cfg.https_port(l.vip).map_or(443, |p| p.0),
            vip: crate::health::host_of(l.vip),
        });
        let log = AccessLog::open(l.access_log.as_deref())
            .await
            .map_err(|source| ProxyError::AccessLog {
                listener: l.name.clone(),
                path: l.access_log.clone().unwrap_or_default(),
                source,
            })?;
        let host = crate::health::host_of(l.vip);
        let default_port = if l.protocol == crate::config::Protocol::Https {
            443
        } else {
            80
        };
        let authority = if l.port.0 == default_port {
            HeaderValue::from_str(&host)
        } else {
            HeaderValue::from_str(&format!("{host}:{}", l.port.0))
        }
        .expect("an address and a port are a valid header value");
        Ok(Self {
            port: l.port.0,
            authority,
            rules,
            default,
            pools,
            redirect,
            persistence: l.session_persistence.clone(),
            timeouts: l.timeouts.clone().unwrap_or_default(),
            max_body_bytes: l.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            max_uri_bytes: l.max_uri_bytes.unwrap_or(DEFAULT_MAX_URI_BYTES),
            max_header_bytes: l.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES),
            max_requests: l
                .max_requests_per_connection
                .unwrap_or(DEFAULT_MAX_REQUESTS_PER_CONNECTION),
            backend_tls: (l.backend_protocol.unwrap_or_default() == BackendProtocol::Https)
                .then(|| tokio_rustls::TlsConnector::from(tls::backend_client_config())),
            acl: l.acl.clone(),
            sink: Arc::new(Sink { log, requests }),
        })
    }

    /// The pool (its index in `pools`) a request for `path` (normalized: `path::normalized`)
    /// goes to: the first rule that matches, else the default.
    fn route(&self, host: &str, path: &str) -> Option<usize> {
        // A fully qualified name (`example.com.`) is the same host.
        let host = host.strip_suffix('.').unwrap_or(host);
        self.rules
            .iter()
            .find(|r| {
                r.host.as_ref().is_none_or(|h| h.matches(host))
                    && r.path_prefix
                        .as_ref()
                        .is_none_or(|p| path.starts_with(p.as_str()))
            })
            .map(|r| r.pool)
            .or(self.default)
    }

    /// A request, as far as it goes without waiting: its access-log record, a local answer
    /// (redirect, refusal), or all a backend needs, copied out of it. The request is gone
    /// when this returns: its head shares hyper's read buffer, which hyper reads the
    /// connection's next bytes into right after, and reuses only once nothing else holds it
    /// (else it takes 8 KiB anew for every request).
    fn handle(self: &Arc<Self>, req: Request<Incoming>, client: Client) -> Answer {
        let mut record = Record::new(&self.sink, client.addr);
        record.tcpinfo_rtt = tcp_rtt_us(client.fd);
        let host = request_host(&req);
        let bad_host = host.is_err();
        record.host = host.unwrap_or_default();
        record.method = Some(req.method().clone());
        record.path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        record.protocol = match req.version() {
            Version::HTTP_2 => "HTTP/2.0",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        if bad_host {
            debug!(listener = %self.sink.listener(), client = %client.addr, "missing, repeated or invalid Host");
            return early(local_error(StatusCode::BAD_REQUEST, record), req);
        }
        // hyper's HTTP/2 takes header lists up to twice the limit (see `servers`), so that
        // these get a 431 as over HTTP/1 rather than the stream refused.
        if req.version() == Version::HTTP_2 && headers::list_size(&req) > self.max_header_bytes {
            return early(
                local_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, record),
                req,
            );
        }
        // A tunnel to an arbitrary host is not what a reverse proxy offers (nginx refuses it
        // the same way); relayed, the backend would get a target it cannot make sense of.
        if req.method() == Method::CONNECT {
            return early(local_error(StatusCode::METHOD_NOT_ALLOWED, record), req);
        }
        match &self.redirect {
            // `OPTIONS *` asks about the server, not a resource there is a URL for.
            Some(_) if record.path == "*" => {
                early(local_error(StatusCode::BAD_REQUEST, record), req)
            }
            Some(r) => {
                let port = if r.port == 443 {
                    String::new()
                } else {
                    format!(":{}", r.port)
                };
                // HTTP/1.0 may come without a Host: the address it reached stands in.
                let host = match headers::without_port(&record.host) {
                    "" => r.vip.as_str(),
                    h => h,
                };
                let location = format!("https://{host}{port}{}", record.path);
                early(local(errors::redirect(r.code, &location), record), req)
            }
            None => match self.refusal(&req, &record) {
                Ok(pool) => Answer::Later(Box::pin(
                    self.clone().relay(self.prepare(req, record, client, pool)),
                )),
                Err(status) => early(local_error(status, record), req),
            },
        }
    }

    /// Why a request cannot go to a backend, or the pool (its index in `pools`) it goes to.
    fn refusal(&self, req: &Request<Incoming>, record: &Record) -> Result<usize, StatusCode> {
        if record.path.len() > self.max_uri_bytes {
            return Err(StatusCode::URI_TOO_LONG);
        }
        if let Some(coding) = headers::unsupported_transfer_encoding(req.headers()) {
            debug!(listener = %self.sink.listener(), coding, "unsupported transfer-encoding");
            return Err(StatusCode::NOT_IMPLEMENTED);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return Err(StatusCode::PAYLOAD_TOO_LARGE);
        }
        let path = path::normalized(req.uri().path()).ok_or(StatusCode::BAD_REQUEST)?;
        self.route(headers::without_port(&record.host), &path)
            .ok_or(StatusCode::NOT_FOUND)
    }

    /// A request `refusal` let through to `pool`, ready for its backends.
    fn prepare(
        &self,
        mut req: Request<Incoming>,
        mut record: Box<Record>,
        client: Client,
        pool: usize,
    ) -> Forward {
        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let forwarded = headers::Forwarded {
            client: &client.ip,
            scheme: if client.tls { "https" } else { "http" },
            port: self.port,
            upgrade,
            // The target's authority (HTTP/2's :authority, an absolute-form target) is the
            // host, whatever a Host header says (RFC 9112 §3.2.2, RFC 9113 §8.3.1); a request
            // with neither (HTTP/1.0) gets the listener's.
            host: match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                // `request_host` found neither (only HTTP/1.0 may do without).
                None if record.host.is_empty() => Some(self.authority.clone()),
                None => None,
            },
            join_cookies: parts.version == Version::HTTP_2,
        };
        let has_body = !body.is_end_stream();
        let head = h1::Head::new(
            &parts.method,
            // Origin form (what HTTP/1.1 backends expect).
            parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            &parts.headers,
            &forwarded,
            has_body,
        );
        let body = if has_body {
            let bytes_in = Arc::new(AtomicU64::new(0));
            record.bytes_in = Some(bytes_in.clone());
            RequestBody::new(
                body,
                parts.version == Version::HTTP_2,
                self.max_body_bytes,
                self.timeouts.request,
                bytes_in,
            )
        } else {
            RequestBody(None)
        };
        Forward {
            sticky: self.sticky_backend(&self.pools[pool], &parts.headers, client.addr),
            method: parts.method,
            record,
            peer: client.addr.ip(),
            pool,
            head,
            body,
            client_upgrade,
        }
    }

    /// Sends a prepared request to its pool's backends, the next one after a failure where
    /// that is harmless, and answers with the first response.
    async fn relay(self: Arc<Self>, fwd: Forward) -> Response<ResponseBody> {
        let Forward {
            mut record,
            method,
            peer,
            pool,
            head,
            body,
            sticky,
            client_upgrade,
        } = fwd;
        let pool = &self.pools[pool];
        let has_body = body.0.is_some();
        // May go again to another backend after one failed (with no body and no persistence).
        let idempotent = matches!(
            method,
            Method::GET
                | Method::HEAD
                | Method::PUT
                | Method::DELETE
                | Method::OPTIONS
                | Method::TRACE
        );
        let mut body = Some(body);
        // Inline: almost every request tries one backend.
        let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        // What to answer when no backend answers; 503 until one was reached.
        let mut failure = StatusCode::SERVICE_UNAVAILABLE;
        loop {
            let pick = match (tried.is_empty(), sticky) {
                (true, Some(i)) => Some(i),
                _ => pool.pick(peer, &tried),
            };
            let Some(idx) = pick else { break };
            tried.push(idx);
            let backend = &pool.backends[idx];
            let active = backend.start();
            // In the record from the start: a client that leaves mid-exchange (499) is
            // logged with the backend it was sent to.
            record.attempts.push(Attempt {
                addr: Some(backend.addr),
                ..Attempt::default()
            });
            let (mut conn, connect_time) = match backend
                .connection(self.timeouts.connect, self.backend_tls.as_ref())
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    warn!(listener = %self.sink.listener(), pool = %pool.name, error = %e, "backend connect failed; trying the next");
                    failure = match e {
                        ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                        _ => failure,
                    };
                    continue;
                }
            };
            let sent = Instant::now();
            record.attempt().connect = Some(connect_time.unwrap_or_default());
            let exchange = conn
                .exchange(
                    &head,
                    body.take().unwrap_or(RequestBody(None)),
                    h1::Wait {
                        sent,
                        timeout: self.timeouts.response,
                    },
                )
                .await;
            // With the error, whether the connection had been kept alive and nothing came back.
            let outcome = match exchange {
                Ok(mut res) => h1::Incoming::new(conn, &method, &mut res, self.timeouts.response)
                    .map(|body| res.map(|()| body))
                    .map_err(|e| (e, false)),
                Err(e) => Err((e, connect_time.is_none() && conn.nothing_received())),
            };
            let error = match outcome {
                Ok(res) => {
                    let a = record.attempt();
                    a.header = Some(sent.elapsed());
                    a.status = Some(res.status().as_u16());
                    return self.respond(
                        res,
                        record,
                        Upstream {
                            pool,
                            idx,
                            active,
                            sent,
                        },
                        client_upgrade,
                    );
                }
                Err((ExchangeError::Body(e), _)) => {
                    let mut res = local_error(
                        match e {
                            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
                            BodyError::Client(_) => StatusCode::BAD_REQUEST,
                        },
                        record,
                    );
                    // What is left of the body is not read (see `early`).
                    res.extensions_mut().insert(UnreadBody);
                    return res;
                }
                Err((ExchangeError::Timeout(_), _)) => {
                    record.attempt().status = Some(504);
                    failure = StatusCode::GATEWAY_TIMEOUT;
                    warn!(listener = %self.sink.listener(), backend = %backend.addr, timeout = ?self.timeouts.response, "backend stalled: took none of the request body, or sent no response head, in time");
                    StatusCode::GATEWAY_TIMEOUT
                }
                Err((_, true)) if !has_body && idempotent => {
                    // A kept-alive connection the backend closed as the request went out:
                    // nothing came back and nothing is lost, so the request goes again.
                    tried.pop();
                    debug!(listener = %self.sink.listener(), backend = %backend.addr, "stale backend connection; retrying");
                    continue;
                }
                Err((e, _)) => {
                    record.attempt().status = Some(502);
                    failure = StatusCode::BAD_GATEWAY;
                    warn!(listener = %self.sink.listener(), backend = %backend.addr, error = %e, "backend failed");
                    StatusCode::BAD_GATEWAY
                }
            };
            // Until it failed: nginx's upstream_response_time (its upstream_header_time stays
            // `-`, no head came).
            record.attempt().response = Some(sent.elapsed());
            // A request that reached a backend is repeated only when that is harmless and
            // the route is not pinned to this backend.
            if !(idempotent && !has_body && self.persistence.is_none()) {
                return local_error(error, record);
            }
        }
        local_error(failure, record)
    }

    /// The backend a persistence rule pins this request to, if it is available.
    fn sticky_backend(
        &self,
        pool: &Pool,
        headers: &header::HeaderMap,
        peer: SocketAddr,
    ) -> Option<usize> {
        let p = self.persistence.as_ref()?;
        match p.kind {
            PersistenceKind::InsertCookie => headers::request_cookie(headers, self.cookie_name())
                .and_then(|v| pool.available_by_cookie(v)),
            PersistenceKind::AppCookie => headers::request_cookie(headers, self.cookie_name())
                .and_then(|v| pool.learned(v, p.timeout)),
            PersistenceKind::SourceIp => {
                let up = (0..pool.backends.len()).filter(|&i| pool.backends[i].available());
                pool.by_source(peer.ip(), up)
            }
        }
    }

    fn cookie_name(&self) -> &str {
        self.persistence
            .as_ref()
            .and_then(|p| p.cookie.as_deref())
            .unwrap_or(DEFAULT_PERSISTENCE_COOKIE)
    }

    fn respond(
        &self,
        mut res: Response<h1::Incoming>,
        mut record: Box<Record>,
        up: Upstream<'_>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        let status = res.status();
        record.status = Some(status.as_u16());
        // The client hears this proxy's version, not the backend's (RFC 9110 §2.5): an
        // HTTP/1.0 backend must not end the client's keep-alive.
        *res.version_mut() = Version::HTTP_11;
        let upgraded = status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_some();
        if let (true, Some(client)) = (upgraded, client_upgrade) {
            if let Some(backend) = res.body_mut().take_upgraded() {
                tokio::spawn(tunnel(client, backend, self.timeouts.websocket_idle));
            }
        }
        headers::strip_hop_by_hop(res.headers_mut(), upgraded);
        // A 204 has no content and must not say a length (RFC 9110 §8.6): HTTP/2 clients
        // refuse the stream when it does (hyper's HTTP/1 drops it itself).
        if status == StatusCode::NO_CONTENT {
            res.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if let Some(p) = &self.persistence {
            match p.kind {
                // Not on 4xx answers (as the vendors do): those may come from anywhere.
                PersistenceKind::InsertCookie if !status.is_client_error() => {
                    let cookie = format!(
                        "{}={}; Path=/; Max-Age={}; HttpOnly",
                        self.cookie_name(),
                        up.active.backend().cookie,
                        p.timeout.as_secs()
                    );
                    // Sent every time, so the expiry slides with use.
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        res.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                PersistenceKind::AppCookie => {
                    if let Some(v) = headers::response_cookie(res.headers(), self.cookie_name()) {
                        up.pool.learn(v, up.idx, p.timeout);
                    }
                }
                _ => {}
            }
        }
        let (parts, body) = res.into_parts();
        Response::from_parts(
            parts,
            ResponseBody {
                inner: Inner::Upstream(body),
                record: Some(record),
                upstream_sent: Some(up.sent),
                active: Some(up.active),
                request: None,
                done: false,
            },
        )
    }
}

/// An http listener's redirect to the https one.
struct Redirect {
    code: StatusCode,
    /// The https listener's port.
    port: u16,
    /// The listener's address as a URL host, for requests that name none.
    vip: String,
}

/// The backend (`pool.backends[idx]`) a request's answer came from.
struct Upstream<'a> {
    pool: &'a Pool,
    idx: usize,
    active: ActiveGuard,
    sent: Instant,
}

/// Where a request is for: the target's authority (an absolute-form target, HTTP/2's
/// :authority), else its Host header; empty for an HTTP/1.0 request with neither. `Err` for
/// what nginx answers 400 as well (RFC 9112 §3.2): an HTTP/1.1 (or later) request without a
/// host, more than one Host header, or an invalid one.
fn request_host(req: &Request<Incoming>) -> Result<String, ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (header, more) = (hosts.next(), hosts.next().is_some());
    if more {
        return Err(());
    }
    let host = match (req.uri().authority(), header) {
        // An authority without a scheme is the authority form (`GET foo`), which only
        // CONNECT may use (RFC 9112 §3.2.3); CONNECT itself is refused further on.
        (Some(_), _) if req.uri().scheme().is_none() && req.method() != Method::CONNECT => {
            return Err(())
        }
        (Some(a), _) => a.as_str(),
        (None, Some(h)) => h.to_str().map_err(|_| ())?,
        (None, None) if req.version() == Version::HTTP_10 => return Ok(String::new()),
        (None, None) => return Err(()),
    };
    if headers::valid_host(host) {
        Ok(host.to_owned())
    } else {
        Err(())
    }
}

/// Copies between the client and the backend of an upgraded connection until either side
/// closes or neither sends anything for `idle`.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: h1::Conn, idle: Duration) {
    let Ok(client) = client.await else {
        debug!("the client's upgrade failed");
        return;
    };
    let (backend, early) = backend.into_parts();
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(client));
    let (mut br, mut bw) = tokio::io::split(backend);
    // What the backend sent right behind its 101.
    if !early.is_empty() && cw.write_all(&early).await.is_err() {
        return;
    }
    let (mut cbuf, mut bbuf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        tokio::select! {
            n = cr.read(&mut cbuf) => match n {
                Ok(n) if n > 0 => if bw.write_all(&cbuf[..n]).await.is_err() { break },
                _ => break,
            },
            n = br.read(&mut bbuf) => match n {
                Ok(n) if n > 0 => if cw.write_all(&bbuf[..n]).await.is_err() { break },
                _ => break,
            },
            _ = tokio::time::sleep(idle) => {
                debug!(idle = ?idle, "upgraded connection idle; closing");
                break;
            }
        }
    }
    let _ = cw.shutdown().await;
    let _ = bw.shutdown().await;
}

fn local(res: Response<Bytes>, mut record: Box<Record>) -> Response<ResponseBody> {
    record.status = Some(res.status().as_u16());
    let (parts, body) = res.into_parts();
    Response::from_parts(
        parts,
        ResponseBody {
            inner: Inner::Full(Some(body), None),
            record: Some(record),
            upstream_sent: None,
            active: None,
            request: None,
            done: false,
        },
    )
}

/// A local answer to a request whose body was not read. Over HTTP/2 the body is kept open
/// until the answer is sent (dropped first, the stream is reset with CANCEL and the client
/// may never see the answer), then read to its end; over HTTP/1 the connection closes
/// lingering (see `linger`).
fn early(mut res: Response<ResponseBody>, req: Request<Incoming>) -> Answer {
    if !req.body().is_end_stream() {
        if req.version() == Version::HTTP_2 {
            if let Inner::Full(_, unread) = &mut res.body_mut().inner {
                *unread = Some(Box::new(req.into_body()));
            }
        } else {
            res.extensions_mut().insert(UnreadBody);
        }
    }
    Answer::Now(Box::new(res))
}

/// Marks an answer given with the request's body not read to its end: its connection closes
/// lingering (`linger::close`).
#[derive(Clone, Copy)]
struct UnreadBody;

fn local_error(status: StatusCode, record: Box<Record>) -> Response<ResponseBody> {
    local(errors::page(status), record)
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body over the limit")]
    TooLarge,
    #[error("request body stalled")]
    Timeout,
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
}

/// The client's request body on its way to the backend, enforcing the size limit and the
/// request timeout (the longest pause between two pieces). `None`: nothing (more) to send, as
/// for a request without a body, which then costs no allocation.
pub struct RequestBody(Option<Streaming>);

struct Streaming {
    inner: Incoming,
    /// An HTTP/2 stream's, whose rest is read after a body over the limit (`linger`).
    h2: bool,
    limit: u64,
    seen: u64,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    bytes_in: Arc<AtomicU64>,
}

impl RequestBody {
    fn new(
        inner: Incoming,
        h2: bool,
        limit: u64,
        timeout: Duration,
        bytes_in: Arc<AtomicU64>,
    ) -> Self {
        Self(Some(Streaming {
            inner,
            h2,
            limit,
            seen: 0,
            timeout,
            sleep: None,
            bytes_in,
        }))
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let (Some(s), BodyError::TooLarge) = (self.0.take(), &e) {
            // Dropped, the stream would be reset before the client sees the 413.
            if s.h2 {
                tokio::spawn(linger::discard(s.inner));
            }
        }
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(s) = this.0.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                s.sleep = None;
                if let Some(data) = frame.data_ref() {
                    s.seen += data.len() as u64;
                    s.bytes_in.store(s.seen, Ordering::Relaxed);
                    if s.seen > s.limit {
                        return this.fail(BodyError::TooLarge);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(BodyError::Client(e)),
            Poll::Ready(None) => {
                this.0 = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = s.timeout;
                let sleep = s
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(BodyError::Timeout),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Some(s) => s.inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

enum Inner {
    /// A whole body, and the request's unread body kept open until it is sent (`early`).
    Full(Option<Bytes>, Option<Box<Incoming>>),
    Upstream(h1::Incoming),
}

/// The response on its way to the client: counts bytes, hands the backend connection back for
/// reuse once the backend's body is complete, and writes the access log line when dropped.
pub struct ResponseBody {
    inner: Inner,
    record: Option<Box<Record>>,
    upstream_sent: Option<Instant>,
    /// The backend answering, counted busy until the body is dropped; its connection goes
    /// back to it once the body is complete (not after a 101: the tunnel has it).
    active: Option<ActiveGuard>,
    /// Keeps the request in flight on its client connection until the body is sent.
    request: Option<idle::InFlight>,
    done: bool,
}

impl ResponseBody {
    /// The upstream body ended: note the response time, keep the connection.
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // One clock read for the record, the backend's response time and the connection's
        // idle timer.
        let now = Instant::now();
        if let Some(rec) = self.record.as_mut() {
            if let (Some(a), Some(sent)) = (rec.attempts.last_mut(), self.upstream_sent) {
                a.response = Some(now - sent);
            }
            rec.ended(now);
        }
        if let Some(request) = self.request.take() {
            request.end_at(now);
        }
        if let (Some(active), Inner::Upstream(body)) = (&self.active, &mut self.inner) {
            if let Some(conn) = body.take_reusable() {
                active.backend().put_idle(conn);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let frame = match &mut this.inner {
            Inner::Full(b, _) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(i) => Pin::new(i).poll_frame(cx),
        };
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(rec)) = (f.data_ref(), this.record.as_mut()) {
                    rec.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b, _) => b.is_none(),
            Inner::Upstream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b, _) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(i) => i.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Inner::Full(_, unread @ Some(_)) = &mut self.inner {
            if let (Some(body), Ok(rt)) = (unread.take(), tokio::runtime::Handle::try_current()) {
                rt.spawn(linger::discard(*body));
            }
        }
        // Bodies hyper never polls (HEAD, 204, 304) end here.
        if self.is_end_stream() {
            self.finish();
        } else if let (Some(rec), Some(sent)) = (self.record.as_mut(), self.upstream_sent) {
            if let Some(a) = rec.attempts.last_mut() {
                a.response.get_or_insert(sent.elapsed());
            }
        }
    }
}

/// Pending connections a listener queues for its accept loop. std's 128 overflows as soon as
/// a burst of connections outpaces the accept loop, and every SYN dropped then costs its client
/// a second; nginx uses 511, and Linux caps it at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: i32 = 4096;

/// How long an idle connection asked to close may take to do so (HTTP/2's GOAWAY and the
/// PING that confirms it) before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How often each worker closes the idle backend connections the backends closed.
const SWEEP_IDLE_EVERY: Duration = Duration::from_secs(1);

/// A listening socket with SO_REUSEPORT, so a reloaded proxy listens next to the one it
/// replaces until that one stops accepting: no connection is refused in between.
fn bind_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s.into())
}

/// A bound listening socket as a worker's runtime serves it. TCP_NODELAY is set here once:
/// Linux gives it to every accepted connection, which saves a system call per connection.
fn listening(std: std::net::TcpListener) -> io::Result<TcpListener> {
    std.set_nonblocking(true)?;
    socket2::SockRef::from(&std).set_tcp_nodelay(true)?;
    TcpListener::from_std(std)
}

/// A listener's servers, running.
pub struct Started {
    pub basis: Basis,
    pub requests: Arc<RequestStats>,
    /// Sending on it, or dropping it, tells the listener's servers to stop accepting and
    /// give their connections up to the grace period to finish.
    pub stop: watch::Sender<()>,
}

/// Starts servers for `listeners` (http/https listeners of `cfg`) on their VIPs and ports,
/// next to any still running there (SO_REUSEPORT), on worker threads of their own. Returns
/// each one's handle, in order, and a future that resolves once all have drained.
pub async fn start(
    cfg: &Config,
    listeners: &[&Listener],
    health: &Health,
    carried: &[Arc<RequestStats>],
    grace: Duration,
) -> Result<(Vec<Started>, impl Future<Output = ()>), ProxyError> {
    let servers = servers(cfg, listeners.iter().copied(), health, carried, |l| {
        bind_shared(SocketAddr::new(l.vip, l.port.0))
    })
    .await?;
    let (stops, stopped): (Vec<_>, Vec<_>) = servers.iter().map(|_| watch::channel(())).unzip();
    let requests: Vec<Arc<RequestStats>> = servers.iter().map(Server::requests).collect();
    let worker_err = |source| ProxyError::Worker { source };
    // One worker thread per core, each with a runtime of its own and every listener on a socket
    // of its own, as nginx's workers: a connection lives on one thread, no task migrates.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = cfg
        .agent
        .l7_cpu_affinity
        .then(|| affinity::worker_cpus(workers))
        .flatten();
    let mut sets: Vec<Vec<Twin>> = Vec::new();
    for _ in 1..workers {
        sets.push(
            servers
                .iter()
                .map(Server::twin)
                .collect::<io::Result<_>>()
                .map_err(worker_err)?,
        );
    }
    sets.push(
        servers
            .into_iter()
            .map(Server::into_twin)
            .collect::<io::Result<_>>()
            .map_err(worker_err)?,
    );
    // Each listener's sockets (one per worker) get a selector that gives new connections to
    // the worker with fewer (`balance`).
    for (l, stats) in requests.iter().enumerate() {
        let sockets: Vec<_> = sets.iter().map(|set| &set[l].tcp).collect();
        let loads = balance::Loads::balanced(&sockets).unwrap_or_else(|e| {
            warn!(listener = %stats.listener, error = %e, "new connections spread over the L7 workers by hash, not by load");
            balance::detach(sockets[0]);
            balance::Loads::unbalanced(sockets.len())
        });
        for (set, worker) in sets.iter_mut().zip(loads.workers()) {
            set[l].worker = Some(worker);
        }
        stats.set_workers(loads);
    }
    let mut threads = Vec::new();
    for (i, set) in sets.into_iter().enumerate() {
        let stopped = stopped.clone();
        let cpu = cpus.as_ref().map(|c| c[i]);
        let thread = std::thread::Builder::new()
            .name(format!("l7-worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = affinity::pin(cpu) {
                        warn!(worker = i, cpu, error = %e, "L7 worker left unpinned");
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return warn!(error = %e, "L7 worker runtime"),
                };
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for (twin, stopped) in set.into_iter().zip(stopped) {
                        match twin.into_server() {
                            Ok(s) => {
                                tasks.spawn(s.run(stopped, grace));
                            }
                            Err(e) => warn!(error = %e, "L7 worker socket"),
                        }
                    }
                    while tasks.join_next().await.is_some() {}
                });
            })
            .map_err(worker_err)?;
        threads.push(thread);
    }
    let started = listeners
        .iter()
        .zip(requests)
        .zip(stops)
        .map(|((l, requests), stop)| Started {
            basis: Basis::of(cfg, l),
            requests,
            stop,
        })
        .collect();
    Ok((started, async move {
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }))
}

/// A server's parts on their way to a worker thread.
struct Twin {
    tcp: std::net::TcpListener,
    site: Arc<Site>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Arc<Http>,
    worker: Option<Arc<balance::Worker>>,
}

impl Twin {
    /// Registers the socket with the calling thread's runtime.
    fn into_server(self) -> io::Result<Server> {
        Ok(Server {
            tcp: listening(self.tcp)?,
            site: self.site,
            tls: self.tls,
            http: self.http,
            worker: self.worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_get_nodelay_from_the_listener() {
        let l = listening(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        let _client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = l.accept().await.unwrap();
        assert!(served.nodelay().unwrap());
    }
}
