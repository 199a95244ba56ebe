use super::*;

/// What a kernel built with `hz` reads `uptime_ns` after boot.
fn reading(hz: u64, uptime_ns: u64) -> Reading {
    Reading {
        jiffies: (1u64 << 32) - 300 * hz + (uptime_ns as u128 * hz as u128 / 1_000_000_000) as u64,
        mono_ns: uptime_ns,
    }
}

fn never() -> Result<Reading, ()> {
    panic!("one reading is enough here")
}

#[test]
fn one_reading_tells_hz_away_from_300_s_of_uptime() {
    for hz in [100, 250, 300, 1000] {
        for uptime_s in [1, 120, 289, 311, 3_600, 86_400 * 400] {
            let r = reading(hz, uptime_s * 1_000_000_000 + 123_456_789);
            let c = Clock::calibrate(r, never).unwrap();
            assert_eq!(
                c.ns_per_jiffy,
                1_000_000_000 / hz,
                "HZ {hz}, uptime {uptime_s} s"
            );
            // The datapath's nanoseconds match CLOCK_MONOTONIC within a tick, then and later
            // (HZ 300 does not divide a second: 0.1 ppm, 9 ms a day).
            for later_s in [0, 1, 900, 86_400] {
                let r = reading(hz, (uptime_s + later_s) * 1_000_000_000 + 123_456_789);
                let off = c.ns_at(r.jiffies).abs_diff(r.mono_ns);
                let drift = later_s * 1_000_000_000 / 10_000_000;
                assert!(
                    off <= 2 * c.ns_per_jiffy + drift,
                    "HZ {hz}: off by {off} ns"
                );
            }
        }
    }
}

#[test]
fn near_300_s_of_uptime_the_ticks_between_two_readings_tell_hz() {
    for hz in [100, 250, 300, 1000] {
        for uptime_ms in [295_000, 300_000, 300_004, 305_500] {
            let first = reading(hz, uptime_ms * 1_000_000);
            let after = SECOND_READING_AFTER.as_nanos() as u64;
            let c = Clock::calibrate(first, || {
                Ok::<_, ()>(reading(hz, uptime_ms * 1_000_000 + after))
            })
            .unwrap();
            assert_eq!(
                c.ns_per_jiffy,
                1_000_000_000 / hz,
                "HZ {hz}, uptime {uptime_ms} ms"
            );
        }
    }
}

#[test]
fn a_failed_second_reading_is_the_error() {
    let first = reading(250, 300_000_000_000);
    assert_eq!(Clock::calibrate(first, || Err("no")), Err("no"));
}
