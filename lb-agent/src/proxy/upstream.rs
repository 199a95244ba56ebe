//! Backends of a listener's pools: selection (wrr, wlc, source_ip, sticky cookies), passive
//! health, and HTTP/1.1 connections to them, kept alive for reuse.
//!
//! Connections are made and pooled here (each worker keeps its own) and carry exchanges
//! driven by the request's task (`super::h1`). The proxy needs what a pooled client would
//! hide: the connect time on its own (for the access log and the "connect timeout, then next
//! backend" rule) and the request body back when a connect fails, so a POST can still go to
//! the next backend.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::ThreadId,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::{h1, thread_slot, SLOTS};
use crate::{
    config::{self, Scheduler},
    health,
};

/// How long a backend that refused or timed out a connect gets no new requests (nginx's
/// `fail_timeout`).
const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle kept-alive backend connections per backend and worker (nginx's `keepalive 256` is
/// per worker too), and how long they are kept.
const MAX_IDLE_PER_BACKEND: usize = 256;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// CLOCK_MONOTONIC in milliseconds at the kernel tick's resolution (a few ms): a read of the
/// last tick, not of the clock source, for the fail timeout and the idle connections' ages
/// (tens of seconds), which every request looks at. At least 1, so 0 can mean "never".
pub fn coarse_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).map_or(1, |t| {
        t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000 + 1
    })
}

/// What is left of a fail timeout that ends at `until_ms` (`coarse_ms`; 0: none), if any.
pub fn down_for(until_ms: u64) -> Option<Duration> {
    if until_ms == 0 {
        return None;
    }
    let now = coarse_ms();
    (until_ms > now).then(|| Duration::from_millis(until_ms - now))
}

/// Whether connection `c`, idle since `since_ms` (`coarse_ms`), can take a request at
/// `now_ms`: not idle past the idle timeout, and nothing (the backend's close among it) came.
fn reusable(c: &h1::Conn, since_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(since_ms) < IDLE_TIMEOUT.as_millis() as u64 && c.is_reusable()
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// As configured; [`Backend::weight`] is what scheduling uses.
    weight: u32,
    /// The value of the insert_cookie cookie that pins a client to this backend.
    pub cookie: String,
    /// Gets requests only while no primary backend of the pool is available.
    pub backup: bool,
    /// Active health (`crate::health`); `None` in pools built without it.
    health: Option<Arc<health::Member>>,
    /// Requests in flight (for wlc).
    active: AtomicUsize,
    /// When the fail timeout of a connect failure ends (`coarse_ms`); 0: none. An atomic:
    /// every request's pick reads it. The health member's when there is one (see
    /// `Backend::down_until_ms`).
    down_until_ms: AtomicU64,
    /// Kept-alive connections in the shard of the worker thread whose runtime drives each
    /// (`super::thread_slot`), with when each went idle (`coarse_ms`) and that thread: a
    /// worker only takes its own (the connection's task stays on one thread, as nginx's
    /// per-worker pools).
    idle: [IdleShard; SLOTS],
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct IdleShard(Mutex<Vec<(h1::Conn, u64, ThreadId)>>);

impl Backend {
    fn new(pool: &str, b: &config::BackendConfig, health: Option<Arc<health::Member>>) -> Self {
        let addr = SocketAddr::new(b.address, b.port.0);
        // Stable across restarts and agents, so cookies survive both; says nothing readable.
        let mut h = DefaultHasher::new();
        (pool, addr).hash(&mut h);
        Self {
            addr,
            weight: b.weight,
            backup: b.backup,
            health,
            cookie: format!("{:016x}", h.finish()),
            active: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
            idle: Default::default(),
        }
    }

    /// The weight new requests see: the health member's (which the admin API may have changed
    /// or drained), or the configured one in pools built without health.
    pub fn weight(&self) -> u32 {
        self.health.as_ref().map_or(self.weight, |h| h.weight_now())
    }

    /// Takes new requests: weight above 0, healthy by its probes and no recent connect
    /// failure (whether a backup is used is the pool's decision: `Pool::pick`).
    pub fn available(&self) -> bool {
        self.weight() > 0
            && self.health.as_ref().is_none_or(|h| h.is_up())
            && down_for(self.down_until_ms().load(Ordering::Relaxed)).is_none()
    }

    /// Where the end of the fail timeout is kept: in the health member, shared by every
    /// listener of the pool and shown by the status, or (pools built without health) here.
    fn down_until_ms(&self) -> &AtomicU64 {
        self.health
            .as_ref()
            .map_or(&self.down_until_ms, |h| h.l7_down_until_ms())
    }

    fn mark_failed(&self) {
        let until = coarse_ms() + FAIL_TIMEOUT.as_millis() as u64;
        self.down_until_ms().store(until, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// A kept-alive connection ready for a request, or a new one (with its connect time).
    pub async fn connection(
        &self,
        connect_timeout: Duration,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<(h1::Conn, Option<Duration>), ConnectError> {
        if let Some(c) = self.take_idle() {
            return Ok((c, None));
        }
        // Boxed: the connect and TLS handshake futures are large, and every request's future
        // would otherwise carry (and copy) their space.
        Box::pin(self.connect(connect_timeout, tls)).await
    }

    /// A new connection, with its connect time.
    async fn connect(
        &self,
        connect_timeout: Duration,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<(h1::Conn, Option<Duration>), ConnectError> {
        let started = Instant::now();
        let tcp =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
                Err(_) => Err(ConnectError::Timeout(self.addr)),
                Ok(Err(source)) => Err(ConnectError::Io {
                    addr: self.addr,
                    source,
                }),
                Ok(Ok(s)) => Ok(s),
            }
            .inspect_err(|_| self.mark_failed())?;
        let _ = tcp.set_nodelay(true);
        let io = match tls {
            Some(tls) => {
                let name = ServerName::IpAddress(self.addr.ip().into());
                let remaining = connect_timeout.saturating_sub(started.elapsed());
                let stream = match tokio::time::timeout(remaining, tls.connect(name, tcp)).await {
                    Err(_) => Err(ConnectError::Timeout(self.addr)),
                    Ok(r) => r.map_err(|source| ConnectError::Io {
                        addr: self.addr,
                        source,
                    }),
                }
                .inspect_err(|_| self.mark_failed())?;
                Either::Right(Box::new(stream))
            }
            None => Either::Left(tcp),
        };
        Ok((h1::Conn::new(io), Some(started.elapsed())))
    }

    fn take_idle(&self) -> Option<h1::Conn> {
        let (slot, here) = thread_slot();
        let mut idle = self.idle[slot].0.lock().ok()?;
        loop {
            let i = idle.iter().rposition(|(_, _, t)| *t == here)?;
            let (c, since, _) = idle.swap_remove(i);
            if reusable(&c, since, coarse_ms()) {
                return Some(c);
            }
        }
    }

    /// Keeps a connection whose exchange finished cleanly for the next request.
    pub fn put_idle(&self, c: h1::Conn) {
        let (slot, here) = thread_slot();
        if let Ok(mut idle) = self.idle[slot].0.lock() {
            if idle.len() >= MAX_IDLE_PER_BACKEND {
                prune(&mut idle);
            }
            if idle.len() < MAX_IDLE_PER_BACKEND {
                idle.push((c, coarse_ms(), here));
            }
        }
    }

    /// Closes the calling worker's idle connections that the backend closed (or sent
    /// anything on) or that were idle past the idle timeout, as nginx closes an idle upstream
    /// connection when the backend does: none lingers in CLOSE_WAIT until the next request.
    pub fn sweep_idle(&self) {
        if let Ok(mut idle) = self.idle[thread_slot().0].0.lock() {
            prune(&mut idle);
        }
    }
}

/// Drops the connections of a shard that cannot take a request (those of workers that are
/// gone, after a reload, among them: their runtime's registration fails).
fn prune(idle: &mut Vec<(h1::Conn, u64, ThreadId)>) {
    let now = coarse_ms();
    idle.retain(|(c, since, _)| reusable(c, *since, now));
}

/// A request in flight at a backend (for wlc), until dropped; the response body holds it, and
/// through it the backend its connection goes back to.
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Backend {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool as one listener uses it.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    scheduler: Scheduler,
    /// Smooth WRR state (nginx's algorithm): current weight per backend.
    wrr: Mutex<Vec<i64>>,
    /// app_cookie: the backend's cookie value → the backend that set it, and when it expires.
    learned: Mutex<HashMap<String, (usize, Instant)>>,
}

impl Pool {
    /// `health`: the pool's members in `crate::health::Health`, in backend order.
    pub fn new(pool: &config::Pool, scheduler: Scheduler, health: &[Arc<health::Member>]) -> Self {
        Self {
            name: pool.name.clone(),
            backends: pool
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| Arc::new(Backend::new(&pool.name, b, health.get(i).cloned())))
                .collect(),
            scheduler,
            wrr: Mutex::new(vec![0; pool.backends.len()]),
            learned: Mutex::new(HashMap::new()),
        }
    }

    /// [`Backend::sweep_idle`] for each backend.
    pub fn sweep_idle(&self) {
        self.backends.iter().for_each(|b| b.sweep_idle());
    }

    /// The next backend for a new request, skipping unavailable ones and those in `tried`;
    /// backups only when no primary is left.
    pub fn pick(&self, client: IpAddr, tried: &[usize]) -> Option<usize> {
        let candidates = health::serving_indices(
            self.backends.len(),
            |i| self.backends[i].backup,
            |i| self.backends[i].available() && !tried.contains(&i),
        );
        match self.scheduler {
            Scheduler::Wrr => self.smooth_wrr(candidates),
            Scheduler::Wlc => {
                // active / weight, compared cross-multiplied (no division); backends tied
                // for the least take turns by weight, as with nginx's least_conn (else
                // sequential requests, every count 0, would all go to one backend).
                let load = |i: usize| {
                    let b = &self.backends[i];
                    (
                        b.active.load(Ordering::Relaxed) as u64,
                        u64::from(b.weight()),
                    )
                };
                let candidates: smallvec::SmallVec<[usize; 16]> = candidates.collect();
                let (la, wa) = load(*candidates.iter().min_by(|&&a, &&b| {
                    let ((la, wa), (lb, wb)) = (load(a), load(b));
                    (la * wb).cmp(&(lb * wa))
                })?);
                self.smooth_wrr(candidates.into_iter().filter(|&i| {
                    let (l, w) = load(i);
                    l * wa == la * w
                }))
            }
            // Validation refuses maglev on http/https; a client hash is the nearest meaning.
            Scheduler::SourceIp | Scheduler::Maglev => self.by_source(client, candidates),
        }
    }

    /// Smooth weighted round robin (nginx's) over `candidates`: each gains its weight, the
    /// highest goes and gives back the total.
    fn smooth_wrr(&self, candidates: impl Iterator<Item = usize>) -> Option<usize> {
        // One pass: each candidate's availability and weight are read once, so the total
        // taken back matches the weights just added.
        let mut cw = self.wrr.lock().ok()?;
        let (mut total, mut best) = (0, None);
        for i in candidates {
            let w = i64::from(self.backends[i].weight());
            total += w;
            cw[i] += w;
            // Ties go to the lower index (the first seen).
            if best.is_none_or(|b: usize| cw[i] > cw[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        cw[best] -= total;
        Some(best)
    }

    /// A stable choice by client address (rendezvous hashing: few clients move when the set of
    /// available backends changes).
    pub fn by_source(
        &self,
        client: IpAddr,
        candidates: impl Iterator<Item = usize>,
    ) -> Option<usize> {
        candidates.max_by_key(|&i| {
            let mut h = DefaultHasher::new();
            (client, self.backends[i].addr).hash(&mut h);
            h.finish()
        })
    }

    pub fn available_by_cookie(&self, value: &str) -> Option<usize> {
        self.backends
            .iter()
            .position(|b| b.cookie == value && b.available())
    }

    pub fn learn(&self, value: &str, backend: usize, ttl: Duration) {
        if let Ok(mut m) = self.learned.lock() {
            let now = Instant::now();
            // Bounded by pruning expired entries whenever the table doubles.
            if m.len() >= 1024 && m.len().is_power_of_two() {
                m.retain(|_, (_, exp)| *exp > now);
            }
            m.insert(value.to_string(), (backend, now + ttl));
        }
    }

    /// The backend that set `value`, while it is available. Each use keeps the value mapped
    /// for another `ttl`: an idle timeout, as nginx's `sticky learn ... timeout=`, so a session
    /// in use never moves.
    pub fn learned(&self, value: &str, ttl: Duration) -> Option<usize> {
        let mut m = self.learned.lock().ok()?;
        let now = Instant::now();
        let (i, exp) = m.get_mut(value)?;
        if *exp <= now || !self.backends[*i].available() {
            return None;
        }
        *exp = now + ttl;
        Some(*i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(scheduler: Scheduler) -> Pool {
        let def: config::Pool = serde_yaml::from_str(
            "name: web\nbackends:\n  - { address: 127.0.0.1, port: 1 }\n  - { address: 127.0.0.1, port: 2, weight: 2 }\n",
        )
        .unwrap();
        Pool::new(&def, scheduler, &[])
    }

    fn picks(p: &Pool, n: usize) -> [usize; 2] {
        let mut count = [0; 2];
        for _ in 0..n {
            count[p.pick(IpAddr::from([10, 0, 0, 1]), &[]).unwrap()] += 1;
        }
        count
    }

    /// A refused connect keeps new requests away from the backend for the fail timeout in
    /// every pool holding it (each listener builds its own) and shows in its health member,
    /// which the status reads.
    #[tokio::test]
    async fn a_refused_connect_backs_the_backend_off_for_every_listener_and_the_status() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let text = format!(
            "agent: {{ interfaces: [lo] }}\nlisteners:\n  - {{ name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web }}\npools:\n  - name: web\n    backends:\n      - {{ address: 127.0.0.1, port: {closed} }}\n"
        );
        let cfg = config::parse("lb.yaml", &text, &config::Host::default()).expect("valid config");
        let health = health::Health::new(&cfg);
        let members = health.pool("web");
        let [a, b] = [0, 1].map(|_| Pool::new(&cfg.pools[0], Scheduler::Wrr, members));
        assert!(a.backends[0].available() && b.backends[0].available());
        let failed = a.backends[0]
            .connection(Duration::from_secs(1), None)
            .await
            .err();
        assert!(
            matches!(failed, Some(ConnectError::Io { .. })),
            "{failed:?}"
        );
        assert!(!a.backends[0].available() && !b.backends[0].available());
        let left = members[0].l7_down_until_ms().load(Ordering::Relaxed) - coarse_ms();
        assert!((9_000..=10_000).contains(&left), "{left} ms left");
    }

    #[test]
    fn wlc_sends_to_the_least_loaded_and_ties_take_turns_by_weight() {
        let p = pool(Scheduler::Wlc);
        // Nothing in flight (sequential requests): every pick a tie, shared 1:2.
        assert_eq!(picks(&p, 30), [10, 20]);
        // Two in flight at the heavier one: 2/2 against 0/1, the lighter is less loaded.
        let _busy = [p.backends[1].start(), p.backends[1].start()];
        assert_eq!(picks(&p, 5), [5, 0]);
    }

    #[test]
    fn a_learned_cookie_stays_mapped_while_requests_carry_it() {
        let p = pool(Scheduler::Wrr);
        let ttl = Duration::from_millis(1000);
        p.learn("s1", 1, ttl);
        // Used every 600 ms: past the ttl since it was learned, never idle for the ttl.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(600));
            assert_eq!(p.learned("s1", ttl), Some(1));
        }
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(p.learned("s1", ttl), None, "idle for longer than the ttl");
        assert_eq!(p.learned("unknown", ttl), None);
    }

    #[test]
    fn wrr_follows_the_weights() {
        assert_eq!(picks(&pool(Scheduler::Wrr), 30), [10, 20]);
    }
}
