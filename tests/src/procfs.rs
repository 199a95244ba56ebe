//! Readings from `/proc`: a process's memory and CPU time, and the machine's CPU time by kind.
//! The fault tests print them (memory stays bounded under abuse); the benchmarks divide them by
//! the work done (CPU per connection or packet).

use std::ops::Sub;

/// `/proc/stat` and `/proc/PID/stat` count in USER_HZ, which the kernel fixes at 100 for
/// user space whatever its internal tick rate.
const USER_HZ: f64 = 100.0;

/// Resident memory of a process in KiB (`VmRSS`), if it still runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(&format!("/proc/{pid}/status"), "VmRSS:")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The CPUs each thread of a process whose name starts with `name` may run on
/// (`Cpus_allowed_list`, as `0` or `0-1`).
pub fn thread_cpus(pid: u32, name: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            std::fs::read_to_string(t.join("comm"))
                .ok()?
                .starts_with(name)
                .then_some(())?;
            status_field(t.join("status").to_str()?, "Cpus_allowed_list:")
        })
        .collect()
}

/// The value after `key` in a `status` file, trimmed.
fn status_field(path: &str, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(path).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(key))?;
    Some(value.trim().to_string())
}

/// User plus system CPU seconds a process (all its threads) has used.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start at field 3, so utime and stime (fields 14 and 15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The whole machine's CPU time by kind, in seconds summed over all CPUs (`/proc/stat`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
    /// Packet processing: XDP, the kernel's forwarding and NAT, and every namespace's TCP/IP
    /// receive path run here.
    pub softirq: f64,
    pub idle: f64,
}

impl CpuTimes {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<f64> = stat
            .lines()
            .find_map(|l| l.strip_prefix("cpu "))
            .unwrap_or_default()
            .split_whitespace()
            .map(|x| x.parse::<f64>().unwrap_or(0.0) / USER_HZ)
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        // user nice system idle iowait irq softirq steal
        CpuTimes {
            user: at(0) + at(1),
            system: at(2) + at(5),
            softirq: at(6),
            idle: at(3) + at(4),
        }
    }

    /// Everything but idle.
    pub fn busy(&self) -> f64 {
        self.user + self.system + self.softirq
    }
}

impl Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, o: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - o.user,
            system: self.system - o.system,
            softirq: self.softirq - o.softirq,
            idle: self.idle - o.idle,
        }
    }
}
