//! The datapath's clock. Conntrack timestamps are CLOCK_MONOTONIC nanoseconds (what the sweep
//! compares with `gc::monotonic_ns`), but the XDP program derives them from jiffies, which the
//! verifier inlines as a load: a `bpf_ktime_get*` helper call cost a fifth of an established
//! packet's time. The kernel does not export HZ, so the agent works it out from readings of
//! both clocks taken at one instant by the `lb_clock` program, and hands the program the
//! conversion in `GlobalConfig`.

#[cfg(test)]
mod tests;

/// `bpf_jiffies64()` and `bpf_ktime_get_ns()` read at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub jiffies: u64,
    pub mono_ns: u64,
}

/// CLOCK_MONOTONIC nanoseconds are `(jiffies - jiffies_base) * ns_per_jiffy`, within a tick
/// (plus 0.1 ppm at HZ 300, whose tick is not a whole number of nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub jiffies_base: u64,
    pub ns_per_jiffy: u64,
}

/// The HZ values kernels are configured with, the common ones first.
const HZ: [u64; 13] = [
    100, 250, 300, 1000, 24, 32, 48, 64, 128, 200, 256, 512, 1024,
];

/// Closer than this to 300 s of uptime, the first reading cannot tell HZ (see `calibrate`).
const AMBIGUOUS_S: f64 = 10.0;

/// How far apart the two readings are when one is not enough: at least 20 ticks at HZ 100.
pub const SECOND_READING_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

impl Clock {
    /// From `first`, or with `later` (a reading taken `SECOND_READING_AFTER` later) when
    /// `first` is ambiguous. Jiffies start at 2^32 - 300 HZ (the kernel's INITIAL_JIFFIES, so
    /// that 32-bit wrap bugs show 5 minutes after boot), so `jiffies - 2^32 = HZ * (uptime -
    /// 300 s)`; near 300 s of uptime that says nothing, and the ticks between two readings
    /// tell HZ instead.
    pub fn calibrate<E>(
        first: Reading,
        later: impl FnOnce() -> Result<Reading, E>,
    ) -> Result<Self, E> {
        let uptime_s = first.mono_ns as f64 / 1e9;
        let measured = if (uptime_s - 300.0).abs() >= AMBIGUOUS_S {
            (first.jiffies as f64 - 4_294_967_296.0) / (uptime_s - 300.0)
        } else {
            let second = later()?;
            second.jiffies.wrapping_sub(first.jiffies) as f64
                / (second.mono_ns.saturating_sub(first.mono_ns).max(1) as f64 / 1e9)
        };
        let hz = HZ
            .into_iter()
            .min_by(|a, b| {
                let off = |h: u64| (measured - h as f64).abs() / h as f64;
                off(*a).total_cmp(&off(*b))
            })
            .unwrap_or(250);
        let ns_per_jiffy = 1_000_000_000 / hz;
        Ok(Clock {
            jiffies_base: first.jiffies.wrapping_sub(first.mono_ns / ns_per_jiffy),
            ns_per_jiffy,
        })
    }

    /// The nanoseconds the datapath stamps at `jiffies`.
    pub fn ns_at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_sub(self.jiffies_base)
            .wrapping_mul(self.ns_per_jiffy)
    }
}
