//! L7 workers pinned one per CPU (`agent.l7_cpu_affinity`, nginx's `worker_cpu_affinity
//! auto`). Unpinned, the scheduler moves workers between cores and now and then queues both
//! on one while the other runs wrk or a backend: on the 2-core bench the proxy's p99 over
//! keep-alive was 3.5-3.8 ms unpinned and 2.3-2.8 ms pinned, at the same requests/s.

use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};

/// The CPUs the agent may run on, one for each of `workers` workers; `None` when there are
/// more (a CPU quota made the workers fewer: the quota, not a CPU, is what they share) or
/// fewer.
pub fn worker_cpus(workers: usize) -> Option<Vec<usize>> {
    let cpus = members(&sched_getaffinity(Pid::from_raw(0)).ok()?);
    (cpus.len() == workers).then_some(cpus)
}

/// The CPUs in `set`, ascending.
fn members(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_per_worker_only_when_the_counts_match() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpus = worker_cpus(n).expect("one worker per allowed CPU");
        assert_eq!(cpus.len(), n);
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{cpus:?}");
        assert_eq!(worker_cpus(n + 1), None);
    }

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only() {
        let cpu = *worker_cpus(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .unwrap()
            .last()
            .unwrap();
        // In a thread of its own: the test harness's threads keep their affinity.
        let on = std::thread::spawn(move || {
            pin(cpu).unwrap();
            members(&sched_getaffinity(Pid::from_raw(0)).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(on, [cpu]);
    }
}
