//! Active health checks: one tokio task per backend of every pool with a `health_check`, a
//! threshold state machine per backend, and the shared view the L4 plan and the L7 pools read.
//!
//! Semantics are the vendors' (Alibaba SLB, Huawei ELB): the first probe runs at a random point
//! of the first interval; a new backend is online after its first success; after that it takes
//! `unhealthy_threshold` consecutive failures to go offline and `healthy_threshold`
//! consecutive successes to come back.

mod probe;
#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    future::Future,
    hash::{BuildHasher, Hasher},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::Poll,
    time::Duration,
};

use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tracing::{info, warn};

pub use probe::{ProbeError, Prober};

use crate::config::{self, Config};

/// Where a backend stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Probed but never succeeded yet: offline, as a newly added backend is.
    Pending,
    Healthy,
    Unhealthy,
}

/// The last transition and probe of a backend, for logs and the status output.
#[derive(Clone, Debug)]
pub struct Status {
    pub state: State,
    /// Why the last failing probe failed (timeout, refused, status 500, port unreachable).
    pub reason: Option<String>,
    pub latency: Option<Duration>,
}

/// One backend of one pool, as health checking sees it. Shared with the L7 pools.
#[derive(Debug)]
pub struct Member {
    pub pool: String,
    pub addr: SocketAddr,
    /// As configured.
    pub weight: u32,
    pub backup: bool,
    /// Whether the pool is probed at all (`false`: always healthy).
    pub checked: bool,
    up: AtomicBool,
    /// The weight new traffic sees: the configured one unless the admin API changed or
    /// drained it (`crate::overrides`).
    weight_now: AtomicU32,
    status: Mutex<Status>,
    /// Until when (`crate::proxy::upstream::coarse_ms`) the L7 proxy sends it no new requests
    /// because a connect to it failed (nginx's `fail_timeout`); 0: never. Here, not in the
    /// proxy's pools, so every listener using the pool and the status see the same.
    l7_down_until_ms: AtomicU64,
}

impl Member {
    /// Healthy (or not checked): may take new traffic if its weight and group allow.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn weight_now(&self) -> u32 {
        self.weight_now.load(Ordering::Relaxed)
    }

    pub fn set_weight_now(&self, weight: u32) {
        self.weight_now.store(weight, Ordering::Relaxed);
    }

    /// See `l7_down_until_ms`.
    pub fn l7_down_until_ms(&self) -> &AtomicU64 {
        &self.l7_down_until_ms
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// What the status output shows: weight 0 is draining whatever the probes say.
    pub fn label(&self) -> &'static str {
        match (self.weight_now(), self.checked, self.status().state) {
            (0, ..) => "draining",
            (_, false, _) => "healthy (not checked)",
            (_, true, State::Pending) => "pending",
            (_, true, State::Healthy) => "healthy",
            (_, true, State::Unhealthy) => "unhealthy",
        }
    }

    /// Records one probe result; true when the backend changed state.
    fn record(
        &self,
        tracker: &mut Tracker,
        result: Result<(), ProbeError>,
        latency: Duration,
    ) -> bool {
        let reason = result.as_ref().err().map(ToString::to_string);
        let transition = tracker.record(result.is_ok());
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.latency = Some(latency);
        if reason.is_some() || transition.is_some() {
            status.reason = reason.clone();
        }
        let Some(state) = transition else {
            return false;
        };
        status.state = state;
        self.up.store(state == State::Healthy, Ordering::Relaxed);
        let latency_ms = latency.as_secs_f64() * 1e3;
        let reason = reason.as_deref().unwrap_or("ok");
        match state {
            State::Healthy => {
                info!(pool = %self.pool, backend = %self.addr, reason, latency_ms, "backend healthy")
            }
            _ => {
                warn!(pool = %self.pool, backend = %self.addr, reason, latency_ms, "backend unhealthy")
            }
        }
        true
    }
}

/// Up or not, per pool and backend (config order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot(pub Vec<Vec<bool>>);

impl Snapshot {
    pub fn is_up(&self, pool: usize, backend: usize) -> bool {
        self.0[pool][backend]
    }

    pub fn healthy(&self) -> usize {
        self.0.iter().flatten().filter(|&&up| up).count()
    }

    /// The backends out of service as `pool/address:port`, comma-separated, at most `max` of
    /// them (then `+N`); `-` when all are up. One token, so a log line stays greppable.
    pub fn down(&self, cfg: &Config, max: usize) -> String {
        let all: Vec<String> = cfg
            .pools
            .iter()
            .zip(&self.0)
            .flat_map(|(p, up)| {
                p.backends
                    .iter()
                    .zip(up)
                    .filter(|(_, up)| !**up)
                    .map(|(b, _)| format!("{}/{}", p.name, SocketAddr::new(b.address, b.port.0)))
            })
            .collect();
        match all.len() {
            0 => "-".into(),
            n if n <= max => all.join(","),
            n => format!("{},+{}", all[..max].join(","), n - max),
        }
    }
}

/// The consecutive-result thresholds; pure, so its rules are tested without time or sockets.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    /// Consecutive results that disagree with `state`.
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Tracker {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            state: State::Pending,
            streak: 0,
            healthy_threshold,
            unhealthy_threshold,
        }
    }

    /// The tracker of a backend already in `state` (carried over a reload, or resumed after a
    /// restart): its next results count from there, so no transition is logged for a state
    /// it already had.
    pub fn starting_at(mut self, state: State) -> Self {
        self.state = state;
        self
    }

    /// Feeds one probe result; returns the new state on a transition.
    pub fn record(&mut self, ok: bool) -> Option<State> {
        let (next, needed) = match (self.state, ok) {
            // A new backend goes online after one success.
            (State::Pending, true) => (State::Healthy, 1),
            (State::Pending | State::Healthy, false) => {
                (State::Unhealthy, self.unhealthy_threshold)
            }
            (State::Unhealthy, true) => (State::Healthy, self.healthy_threshold),
            (State::Healthy, true) | (State::Unhealthy, false) => {
                self.streak = 0;
                return None;
            }
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.state = next;
        Some(next)
    }
}

/// Which backends of a pool take new traffic: the available primaries, or the available
/// backups while no primary is available (`backup[i]`, `available[i]` per backend).
pub fn serving(backup: &[bool], available: &[bool]) -> Vec<bool> {
    let mut out = vec![false; backup.len()];
    for i in serving_indices(backup.len(), |i| backup[i], |i| available[i]) {
        out[i] = true;
    }
    out
}

/// `serving` as the indices of the backends that take new traffic, for a pool of `n` with
/// `backup(i)` and `available(i)` asked as needed (the L7 proxy's pick, on every request).
pub fn serving_indices(
    n: usize,
    backup: impl Fn(usize) -> bool,
    available: impl Fn(usize) -> bool,
) -> impl Iterator<Item = usize> {
    let primary_up = (0..n).any(|i| !backup(i) && available(i));
    (0..n).filter(move |&i| backup(i) != primary_up && available(i))
}

/// Health of every backend of every pool, indexed like the config.
#[derive(Debug)]
pub struct Health {
    pools: Vec<Vec<Arc<Member>>>,
    changed: Notify,
}

impl Health {
    /// Backends of probed pools start pending (offline until a first success); the others are
    /// healthy for good.
    pub fn new(cfg: &Config) -> Self {
        Self::carrying(cfg, None)
    }

    /// Like `new`, but a backend `previous` knew (same pool, address, role and probing) keeps
    /// its state: a reload takes no healthy backend out of service. With its weight unchanged
    /// too it keeps the member itself, so L7 pools still holding it keep seeing its probes.
    pub fn carrying(cfg: &Config, previous: Option<&Health>) -> Self {
        let pools = cfg
            .pools
            .iter()
            .map(|p| {
                let checked = p.health_check.as_ref().is_some_and(|h| h.active());
                p.backends
                    .iter()
                    .map(|b| {
                        let addr = SocketAddr::new(b.address, b.port.0);
                        let known = previous.and_then(|h| {
                            h.pool(&p.name).iter().find(|m| {
                                (m.addr, m.backup, m.checked) == (addr, b.backup, checked)
                            })
                        });
                        match known {
                            Some(m) if m.weight == b.weight => m.clone(),
                            _ => Arc::new(Member {
                                pool: p.name.clone(),
                                addr,
                                weight: b.weight,
                                backup: b.backup,
                                checked,
                                up: AtomicBool::new(known.map_or(!checked, |m| m.is_up())),
                                weight_now: AtomicU32::new(b.weight),
                                l7_down_until_ms: AtomicU64::new(0),
                                status: Mutex::new(known.map_or(
                                    Status {
                                        state: if checked {
                                            State::Pending
                                        } else {
                                            State::Healthy
                                        },
                                        reason: None,
                                        latency: None,
                                    },
                                    |m| m.status(),
                                )),
                            }),
                        }
                    })
                    .collect()
            })
            .collect();
        Self {
            pools,
            changed: Notify::new(),
        }
    }

    pub fn is_up(&self, pool: usize, backend: usize) -> bool {
        self.pools[pool][backend].is_up()
    }

    /// The probed backends that are up, as (pool, address): what a restarted agent resumes
    /// from ([`Health::resume`]).
    pub fn up_members(&self) -> Vec<(String, SocketAddr)> {
        self.members()
            .filter(|m| m.checked && m.is_up())
            .map(|m| (m.pool.clone(), m.addr))
            .collect()
    }

    /// Marks the probed backends `up` lists healthy instead of pending: an agent that adopts a
    /// running dataplane keeps serving what its predecessor served (a restart refuses no
    /// connection) until their own probes say otherwise, after `unhealthy_threshold` failures.
    pub fn resume(&self, up: &[(String, SocketAddr)]) {
        for m in self.members().filter(|m| m.checked) {
            if up.iter().any(|(p, a)| *p == m.pool && *a == m.addr) {
                m.up.store(true, Ordering::Relaxed);
                m.status.lock().unwrap_or_else(|e| e.into_inner()).state = State::Healthy;
            }
        }
    }

    /// The members of the pool named `name` (empty if there is none).
    pub fn pool(&self, name: &str) -> &[Arc<Member>] {
        self.pools
            .iter()
            .find(|p| p.first().is_some_and(|m| m.pool == name))
            .map_or(&[], Vec::as_slice)
    }

    pub fn members(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.pools.iter().flatten()
    }

    /// Which backends are up, per pool, at one moment: a table update is built from one
    /// snapshot and logged with it.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(
            self.pools
                .iter()
                .map(|p| p.iter().map(|m| m.is_up()).collect())
                .collect(),
        )
    }

    /// Resolves when some backend changed state since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Spawns the probe tasks (on the current runtime); dropping the set stops them.
    /// Probes leave from the SNAT address of the backend's family, when there is one.
    pub fn start(self: &Arc<Self>, cfg: &Config) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        for (pool, members) in cfg.pools.iter().zip(&self.pools) {
            let Some(hc) = pool.health_check.as_ref().filter(|h| h.active()) else {
                continue;
            };
            for m in members {
                let source = cfg.snat.as_ref().and_then(|s| {
                    s.addresses
                        .iter()
                        .copied()
                        .find(|a| a.is_ipv4() == m.addr.is_ipv4())
                });
                let prober = Arc::new(Prober::new(hc, m.addr, source));
                let timing = Timing::of(hc);
                let (health, member) = (self.clone(), m.clone());
                tasks.spawn(async move {
                    run(
                        &member,
                        timing,
                        || prober.clone().probe(),
                        || health.changed.notify_one(),
                    )
                    .await
                });
            }
        }
        tasks
    }
}

/// When and how often one backend is probed.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub interval: Duration,
    /// How long one probe may take in all: the timeout, twice for udp (the echo and the
    /// datagram each get it).
    pub limit: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Timing {
    pub fn of(hc: &config::HealthCheck) -> Self {
        Self {
            interval: hc.interval(),
            limit: match hc.protocol {
                config::CheckProtocol::Udp => hc.timeout() * 2,
                _ => hc.timeout(),
            },
            healthy_threshold: hc.healthy_threshold(),
            unhealthy_threshold: hc.unhealthy_threshold(),
        }
    }
}

/// A random number from the standard library's per-process random keys (no extra crate for
/// jitter and ICMP identifiers).
fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Probes `member` forever: first at a random point of the first interval, then every
/// interval from the previous probe's start, whether or not that one has finished. Waiting
/// for a slow probe would stretch the gap between probes to the timeout, and a silent backend
/// (every probe times out) would take `unhealthy_threshold × timeout` and more to go out
/// instead of the bound the vendors and the docs give, `interval × unhealthy_threshold +
/// timeout`. `changed` runs after every transition.
///
/// When `limit` exceeds `interval` probes overlap, at most `ceil(limit / interval) + 1` at a
/// time (each ends by its `limit`). Results are judged oldest first; a probe still running
/// when a newer one finishes is cancelled unjudged, because the newer result describes the
/// backend more recently: a late timeout never undoes a newer success (so recovery stays
/// within `interval × healthy_threshold` of the backend's return), nor a late success a newer
/// failure.
async fn run<P, F>(member: &Member, t: Timing, mut probe: P, changed: impl Fn())
where
    P: FnMut() -> F,
    F: Future<Output = Result<(), ProbeError>>,
{
    let jitter = t.interval.mul_f64((random() % 1000) as f64 / 1000.0);
    let mut ticks = tokio::time::interval_at(Instant::now() + jitter, t.interval);
    // A stalled runtime shifts the schedule rather than firing the missed probes in a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracker =
        Tracker::new(t.healthy_threshold, t.unhealthy_threshold).starting_at(member.status().state);
    // The probes in flight, oldest first.
    let mut running = VecDeque::new();
    loop {
        let finished = tokio::select! {
            _ = ticks.tick() => None,
            done = oldest_finished(&mut running) => Some(done),
        };
        let Some((index, (result, latency))) = finished else {
            let probe = probe();
            running.push_back(Box::pin(async move {
                let began = Instant::now();
                let result = tokio::time::timeout(t.limit, probe)
                    .await
                    .unwrap_or(Err(ProbeError::Timeout));
                (result, began.elapsed())
            }));
            continue;
        };
        // The probe that finished, and the older ones it supersedes.
        running.drain(..=index);
        if member.record(&mut tracker, result, latency) {
            changed();
        }
    }
}

/// The oldest of `running` that has finished: its index and output. Pending while none has
/// (or none runs).
fn oldest_finished<'a, F, T>(
    running: &'a mut VecDeque<Pin<Box<F>>>,
) -> impl Future<Output = (usize, T)> + 'a
where
    F: Future<Output = T> + 'a,
{
    std::future::poll_fn(move |cx| {
        running
            .iter_mut()
            .enumerate()
            .find_map(|(i, p)| match p.as_mut().poll(cx) {
                Poll::Ready(out) => Some((i, out)),
                Poll::Pending => None,
            })
            .map_or(Poll::Pending, Poll::Ready)
    })
}

/// `addr`, with brackets for IPv6 (an HTTP Host value).
pub fn host_of(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
