use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use super::*;

#[test]
fn a_new_backend_is_online_after_one_success_then_thresholds_apply() {
    let mut t = Tracker::new(2, 3);
    assert_eq!(t.record(true), Some(State::Healthy));
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    // A success in between restarts the count.
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), Some(State::Unhealthy));
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(true), Some(State::Healthy));
}

#[test]
fn a_carried_state_logs_no_transition_and_thresholds_count_from_it() {
    let mut t = Tracker::new(2, 2).starting_at(State::Healthy);
    assert_eq!(t.record(true), None, "already healthy");
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), Some(State::Unhealthy));
    let mut t = Tracker::new(2, 2).starting_at(State::Unhealthy);
    assert_eq!(
        t.record(true),
        None,
        "not a new backend: the threshold applies"
    );
    assert_eq!(t.record(true), Some(State::Healthy));
}

#[test]
fn a_new_backend_that_never_answers_turns_unhealthy_after_the_threshold() {
    let mut t = Tracker::new(3, 2);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), Some(State::Unhealthy));
    // From unhealthy, the healthy threshold applies (not the first-success rule).
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(true), Some(State::Healthy));
}

#[test]
fn backups_serve_only_while_no_primary_is_available() {
    let backup = [false, false, true];
    assert_eq!(serving(&backup, &[true, false, true]), [true, false, false]);
    assert_eq!(
        serving(&backup, &[false, false, true]),
        [false, false, true]
    );
    assert_eq!(
        serving(&backup, &[false, false, false]),
        [false, false, false]
    );
}

fn member(checked: bool) -> Member {
    Member {
        pool: "web".into(),
        addr: "10.0.0.1:80".parse().unwrap(),
        weight: 1,
        backup: false,
        checked,
        up: AtomicBool::new(!checked),
        weight_now: AtomicU32::new(1),
        status: Mutex::new(Status {
            state: State::Pending,
            reason: None,
            latency: None,
        }),
        l7_down_until_ms: AtomicU64::new(0),
    }
}

/// Runs the real probe loop on a scripted probe under paused time; returns the virtual times
/// (since start) of the transitions and the state after each.
async fn transitions(
    t: Timing,
    script: Vec<Result<(), ProbeError>>,
    run_for: Duration,
) -> Vec<(Duration, bool, Option<String>)> {
    let m = Arc::new(member(true));
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let (m2, seen2) = (m.clone(), seen.clone());
    let task = tokio::spawn(async move {
        run(
            &m2,
            t,
            || {
                let next = script.lock().unwrap().pop_front().unwrap_or(Ok(()));
                async move { next }
            },
            || {
                seen2
                    .lock()
                    .unwrap()
                    .push((start.elapsed(), m2.is_up(), m2.status().reason))
            },
        )
        .await
    });
    tokio::time::sleep(run_for).await;
    task.abort();
    let out = seen.lock().unwrap().clone();
    out
}

const TIMING: Timing = Timing {
    interval: Duration::from_secs(2),
    limit: Duration::from_secs(5),
    healthy_threshold: 3,
    unhealthy_threshold: 3,
};

#[tokio::test(start_paused = true)]
async fn detection_and_recovery_follow_interval_and_thresholds() {
    let script = vec![
        Ok(()),
        Ok(()),
        Err(ProbeError::Refused),
        Err(ProbeError::Refused),
        Err(ProbeError::Refused),
        Ok(()),
        Ok(()),
        Ok(()),
    ];
    let seen = transitions(TIMING, script, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    let first = seen[0].0;
    // The first probe is at a random point of the first interval.
    assert!(first < TIMING.interval, "{seen:?}");
    assert!(seen[0].1);
    // Down at the third failure: probes 3, 4, 5, two intervals apart each.
    assert_eq!(seen[1].0 - first, TIMING.interval * 4);
    assert!(!seen[1].1);
    assert_eq!(seen[1].2.as_deref(), Some("refused"));
    // Back after three successes: probes 6, 7, 8.
    assert_eq!(seen[2].0 - seen[1].0, TIMING.interval * 3);
    assert!(seen[2].1);
}

/// Runs the real probe loop on a backend that answers at once before `silent_from` and from
/// `back_at` on, and never in between (its probes time out), under paused time. Returns the
/// virtual times (since start) of the transitions with the state after each, and the most
/// probes ever in flight at once.
async fn silent_between(
    t: Timing,
    silent_from: Duration,
    back_at: Duration,
    run_for: Duration,
) -> (Vec<(Duration, bool)>, usize) {
    let m = Arc::new(member(true));
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(Mutex::new((0usize, 0usize)));
    let (m2, seen2, in_flight2) = (m.clone(), seen.clone(), in_flight.clone());
    /// Counts a probe in flight until it is dropped: finished, timed out or cancelled.
    struct InFlight(Arc<Mutex<(usize, usize)>>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.lock().unwrap().0 -= 1;
        }
    }
    let task = tokio::spawn(async move {
        run(
            &m2,
            t,
            || {
                let in_flight = in_flight2.clone();
                async move {
                    {
                        let mut n = in_flight.lock().unwrap();
                        n.0 += 1;
                        n.1 = n.1.max(n.0);
                    }
                    let _counted = InFlight(in_flight);
                    let now = start.elapsed();
                    if now >= silent_from && now < back_at {
                        std::future::pending().await
                    }
                    Ok(())
                }
            },
            || seen2.lock().unwrap().push((start.elapsed(), m2.is_up())),
        )
        .await
    });
    tokio::time::sleep(run_for).await;
    task.abort();
    let seen = seen.lock().unwrap().clone();
    let most = in_flight.lock().unwrap().1;
    (seen, most)
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_never_answers_is_down_within_interval_times_threshold_plus_timeout() {
    let (seen, most) = silent_between(
        TIMING,
        Duration::ZERO,
        Duration::MAX,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (down, up) = seen[0];
    assert!(!up);
    // Probes start every interval even while the previous ones are still timing out: the
    // third times out 2 × 2 s + 5 s after the first starts (in the first interval). Waiting
    // for each timeout before the next probe took 3 × 5 s and more.
    let bound = TIMING.interval * TIMING.unhealthy_threshold + TIMING.limit;
    assert!(down <= bound, "down after {down:?}, bound {bound:?}");
    assert!(
        down < TIMING.limit * 3,
        "down after {down:?}: probes waited for timeouts"
    );
    assert!(
        down >= TIMING.interval * (TIMING.unhealthy_threshold - 1) + TIMING.limit,
        "{down:?}"
    );
    // A probe lasts at most its limit and they start an interval apart: ceil(5 / 2) overlap.
    assert_eq!(most, 3);
}

#[tokio::test(start_paused = true)]
async fn a_backend_gone_silent_is_down_within_the_bound_and_back_within_interval_times_threshold() {
    let detection = TIMING.interval * TIMING.unhealthy_threshold + TIMING.limit;
    let recovery = TIMING.interval * TIMING.healthy_threshold;
    // Silences starting at different points of the probe schedule.
    for tenths in [0u64, 3, 7, 10, 13, 19] {
        let silent_from = Duration::from_secs(10) + Duration::from_millis(tenths * 100);
        let back_at = silent_from + Duration::from_secs(30);
        let (seen, most) =
            silent_between(TIMING, silent_from, back_at, Duration::from_secs(80)).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen[0].1, "online after the first success: {seen:?}");
        assert!(!seen[1].1 && seen[2].1, "{seen:?}");
        let down = seen[1].0 - silent_from;
        assert!(down <= detection, "down {down:?} after silence: {seen:?}");
        // The probes started before the backend came back still time out after its first
        // answers; a newer success cancels them, so they do not restart the count.
        let back = seen[2].0 - back_at;
        assert!(back <= recovery, "up {back:?} after return: {seen:?}");
        assert!(most <= 3, "{most} probes in flight");
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_hangs_counts_as_a_timeout_and_the_next_starts_on_time() {
    let t = Timing {
        unhealthy_threshold: 2,
        ..TIMING
    };
    let m = Arc::new(member(true));
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (m2, seen2) = (m.clone(), seen.clone());
    let calls = Arc::new(Mutex::new(0u32));
    let task = tokio::spawn(async move {
        run(
            &m2,
            t,
            || {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                async move {
                    if n == 1 {
                        Ok(())
                    } else {
                        std::future::pending().await
                    }
                }
            },
            || seen2.lock().unwrap().push(start.elapsed()),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    task.abort();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Probes 2 and 3 start one and two intervals after probe 1 (2 still running when 3
    // starts); 3 times out its limit later.
    assert_eq!(seen[1] - seen[0], t.interval * 2 + t.limit);
    assert!(!m.is_up());
    assert_eq!(m.status().reason.as_deref(), Some("timeout"));
    assert_eq!(m.status().state, State::Unhealthy);
}

#[test]
fn unchecked_pools_are_healthy_and_checked_ones_start_pending() {
    let text = "\
agent:
  interfaces: [lo]
pools:
  - name: a
    backends: [{ address: 10.0.0.1, port: 80 }]
  - name: b
    health_check: { protocol: tcp }
    backends: [{ address: 10.0.0.2, port: 80 }, { address: 10.0.0.3, port: 80, weight: 0 }]
  - name: c
    health_check: { protocol: none }
    backends: [{ address: 10.0.0.4, port: 80 }]
";
    let cfg = crate::config::parse("t.yaml", text, &Default::default()).unwrap();
    let h = Health::new(&cfg);
    assert!(h.is_up(0, 0));
    assert!(!h.is_up(1, 0));
    assert!(h.is_up(2, 0));
    assert_eq!(h.pool("b")[0].label(), "pending");
    assert_eq!(h.pool("b")[1].label(), "draining");
    assert_eq!(h.pool("c")[0].label(), "healthy (not checked)");
    assert!(h.pool("nope").is_empty());

    // A restarted agent resumes what its predecessor had up: only probed backends are
    // recorded, and only those it names leave pending.
    assert!(h.up_members().is_empty());
    h.resume(&[("b".into(), "10.0.0.2:80".parse().unwrap())]);
    assert!(h.is_up(1, 0) && !h.is_up(1, 1));
    assert_eq!(h.pool("b")[0].label(), "healthy");
    assert_eq!(
        h.up_members(),
        [("b".to_string(), "10.0.0.2:80".parse().unwrap())]
    );
}

#[test]
fn a_reload_keeps_the_state_of_known_backends_even_when_reweighted() {
    let config = |weight: u32| {
        format!(
            "\
agent:
  interfaces: [lo]
pools:
  - name: b
    health_check: {{ protocol: tcp }}
    backends: [{{ address: 10.0.0.2, port: 80 }}, {{ address: 10.0.0.3, port: 80, weight: {weight} }}]
"
        )
    };
    let parse = |text: &str| crate::config::parse("t.yaml", text, &Default::default()).unwrap();
    let before = Health::new(&parse(&config(1)));
    for m in before.pool("b") {
        m.record(&mut Tracker::new(1, 1), Ok(()), Duration::from_millis(1));
    }
    assert_eq!(before.snapshot(), Snapshot(vec![vec![true, true]]));

    let after = Health::carrying(&parse(&config(5)), Some(&before));
    // The same member (L7 pools holding it keep seeing its probes), still healthy.
    assert!(Arc::ptr_eq(&after.pool("b")[0], &before.pool("b")[0]));
    assert_eq!(after.pool("b")[0].label(), "healthy");
    // A changed weight makes a new member (L7 pools read weights from members), which keeps
    // the state: reweighting takes nothing out of service.
    assert!(!Arc::ptr_eq(&after.pool("b")[1], &before.pool("b")[1]));
    assert_eq!(after.pool("b")[1].weight, 5);
    assert_eq!(after.pool("b")[1].label(), "healthy");
    assert_eq!(after.snapshot().down(&parse(&config(5)), 10), "-");
}
