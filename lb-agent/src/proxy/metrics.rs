//! Counters of one http/https listener, for the admin API's `/metrics`: requests by status
//! code and a latency histogram, and its workers' open connections (`super::balance`).
//! Requests are recorded when their access log record is written; a few relaxed atomic adds,
//! no lock, in counters of the worker thread's own (`super::thread_slot`): workers never write
//! to the same cache line. Reads add them up.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use super::{balance::Loads, thread_slot, SLOTS};

/// Upper bounds of the latency buckets, in seconds (Prometheus' default buckets).
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 599;

#[derive(Debug)]
pub struct RequestStats {
    pub listener: String,
    shards: Box<[Shard; SLOTS]>,
    /// The workers serving the listener (none when it is served without them, in tests); the
    /// latest ones when a reload replaced them.
    workers: Mutex<Option<Arc<Loads>>>,
}

#[derive(Debug)]
#[repr(align(64))]
struct Shard {
    /// Requests by status code, indexed from 100 (the codes hyper can produce).
    codes: [AtomicU64; (LAST_CODE - FIRST_CODE + 1) as usize],
    /// Requests per latency bucket, not cumulative; the last one is over the largest bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram as Prometheus exposes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// (upper bound in seconds, requests at or below it), cumulative, without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl RequestStats {
    pub fn new(listener: &str) -> Self {
        Self {
            listener: listener.into(),
            shards: Box::new(std::array::from_fn(|_| Shard {
                codes: std::array::from_fn(|_| AtomicU64::new(0)),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
            })),
            workers: Mutex::new(None),
        }
    }

    pub(super) fn set_workers(&self, loads: Arc<Loads>) {
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) = Some(loads);
    }

    /// Open client connections of each worker, in worker order.
    pub fn connections(&self) -> Vec<u64> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(Vec::new, |l| l.connections())
    }

    /// A counter summed over the shards.
    fn sum(&self, counter: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .sum()
    }

    /// One finished request: its status (499: the client left first) and how long it took
    /// until the last byte of the answer.
    pub fn record(&self, status: u16, took: Duration) {
        let shard = &self.shards[thread_slot().0];
        let code = status.clamp(FIRST_CODE, LAST_CODE) - FIRST_CODE;
        shard.codes[code as usize].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// (status code, requests) for every code seen, in code order.
    pub fn codes(&self) -> Vec<(u16, u64)> {
        (FIRST_CODE..=LAST_CODE)
            .enumerate()
            .map(|(i, code)| (code, self.sum(|s| &s.codes[i])))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.codes().iter().map(|&(_, n)| n).sum()
    }

    /// The latency histogram so far. Read without a lock, so a request being recorded may
    /// show in some fields and not yet in others.
    pub fn latency(&self) -> Histogram {
        let mut running = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, &le)| {
                running += self.sum(|s| &s.buckets[i]);
                (le, running)
            })
            .collect();
        let over = self.sum(|s| &s.buckets[LATENCY_BUCKETS.len()]);
        Histogram {
            buckets,
            count: running + over,
            sum_seconds: self.sum(|s| &s.sum_ns) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_code_and_fall_into_cumulative_latency_buckets() {
        let s = RequestStats::new("site");
        s.record(200, Duration::from_millis(3));
        // From other threads: counted in their own shards, read as one.
        std::thread::scope(|t| {
            t.spawn(|| s.record(200, Duration::from_millis(10)));
            t.spawn(|| s.record(502, Duration::from_millis(300)));
        });
        s.record(499, Duration::from_secs(30));
        assert_eq!(s.codes(), [(200, 2), (499, 1), (502, 1)]);
        assert_eq!(s.total(), 4);
        let h = s.latency();
        assert_eq!(h.count, 4);
        assert_eq!(h.buckets[0], (0.005, 1));
        assert_eq!(h.buckets[1], (0.01, 2), "a bound is inclusive");
        assert_eq!(h.buckets[5], (0.25, 2));
        assert_eq!(h.buckets[6], (0.5, 3));
        assert_eq!(
            h.buckets.last(),
            Some(&(10.0, 3)),
            "30 s is over every bound"
        );
        assert!((h.sum_seconds - 30.313).abs() < 1e-9, "{}", h.sum_seconds);
    }
}
