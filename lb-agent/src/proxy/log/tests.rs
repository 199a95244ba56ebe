use super::*;

fn record(log: &AccessLog) -> Box<Record> {
    let sink = Arc::new(Sink {
        log: log.clone(),
        requests: Arc::new(RequestStats::new("site")),
    });
    Record::new(&sink, "192.0.2.7:40000".parse().unwrap())
}

/// The line as JSON, after checking it is one line with the documented fields in order.
fn parsed(r: &Record) -> serde_json::Map<String, serde_json::Value> {
    let mut out = Vec::new();
    r.line(r.start.elapsed(), &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
    let at: Vec<usize> = FIELDS
        .iter()
        .map(|k| {
            text.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k}: {text}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "field order: {text}");
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).expect("the line is JSON");
    assert_eq!(map.len(), FIELDS.len(), "{text}");
    map
}

#[tokio::test]
async fn a_line_is_json_with_every_field_escaped() {
    let log = AccessLog::open(Some(&std::env::temp_dir().join("lb-log-unit.log")))
        .await
        .unwrap();
    let mut r = record(&log);
    r.host = "a\"b\\c".into();
    r.method = Some(hyper::Method::GET);
    r.path = "/x?q=\u{1}\n".into();
    r.protocol = "HTTP/1.1";
    r.status = Some(200);
    r.bytes_out = 12;
    r.tcpinfo_rtt = Some(1234);
    r.attempts.push(Attempt {
        addr: Some("10.0.0.1:80".parse().unwrap()),
        status: Some(502),
        connect: Some(Duration::from_micros(1500)),
        header: Some(Duration::from_millis(2)),
        response: None,
    });
    r.attempts.push(Attempt {
        addr: Some("[2001:db8::1]:8080".parse().unwrap()),
        status: Some(200),
        connect: None,
        header: Some(Duration::from_secs(61)),
        response: Some(Duration::from_millis(61_250)),
    });
    let l = parsed(&r);
    assert_eq!(l["host"], "a\"b\\c");
    assert_eq!(l["path"], "/x?q=\u{1}\n");
    assert_eq!(l["client"], "192.0.2.7:40000");
    assert_eq!(l["status"], 200);
    assert_eq!(l["bytes_out"], 12);
    assert_eq!(l["upstream_addr"], "10.0.0.1:80, [2001:db8::1]:8080");
    assert_eq!(l["upstream_status"], "502, 200");
    assert_eq!(l["upstream_connect_time"], "0.002, -");
    assert_eq!(l["upstream_header_time"], "0.002, 61.000");
    assert_eq!(l["upstream_response_time"], "-, 61.250");
    assert_eq!(l["tcpinfo_rtt"], 1234);
    let time = l["time"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
}

#[tokio::test]
async fn a_client_gone_before_the_answer_is_499_with_no_upstream() {
    let log = AccessLog::open(Some(&std::env::temp_dir().join("lb-log-unit.log")))
        .await
        .unwrap();
    let l = parsed(&record(&log));
    assert_eq!(l["status"], 499);
    assert!(l["tcpinfo_rtt"].is_null(), "not read: {l:?}");
    for k in [
        "upstream_addr",
        "upstream_status",
        "upstream_connect_time",
        "upstream_header_time",
        "upstream_response_time",
    ] {
        assert_eq!(l[k], "-", "{k}");
    }
    assert!(l["request_time"].as_str().unwrap().starts_with("0.0"));
}

#[tokio::test]
async fn lines_reach_the_file_and_the_writer_ends_with_the_log() {
    let path = std::env::temp_dir().join(format!("lb-log-unit-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log = AccessLog::open(Some(&path)).await.unwrap();
    for _ in 0..3 {
        let mut r = record(&log);
        r.status = Some(204);
    }
    drop(log);
    finish_writers(Duration::from_secs(5));
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains("\"status\":204")), "{text}");
}

#[test]
fn times_have_three_decimals() {
    let mut out = Vec::new();
    for ms in [0, 7, 999, 1000, 61_250] {
        secs(&mut out, Duration::from_millis(ms));
        out.push(b' ');
    }
    // Rounded to the nearest millisecond, carrying into the seconds.
    for d in [499_999, 500_000, 1_999_500_000] {
        secs(&mut out, Duration::from_nanos(d));
        out.push(b' ');
    }
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "0.000 0.007 0.999 1.000 61.250 0.000 0.001 2.000 "
    );
}

#[test]
fn instants_are_written_as_the_wall_clock_time_they_were() {
    let wall = |at: Instant| {
        let mut out = Vec::new();
        rfc3339_millis(&mut out, at);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), "2026-11-22T02:21:07.123Z".len(), "{text}");
        humantime::parse_rfc3339(&text).unwrap()
    };
    let now = Instant::now();
    let off = SystemTime::now()
        .duration_since(wall(now))
        .unwrap_or_default();
    assert!(off < Duration::from_millis(10), "{off:?}");
    // Placed from the same reading of the wall clock (within a second of it), either side,
    // and from a new one (further away).
    for ms in [250, 999] {
        let later = wall(now + Duration::from_millis(ms));
        let earlier = wall(now.checked_sub(Duration::from_millis(ms)).unwrap());
        let spread = later.duration_since(earlier).unwrap();
        assert!(
            spread.abs_diff(Duration::from_millis(2 * ms)) <= Duration::from_millis(2),
            "{spread:?}"
        );
    }
    let away = wall(now + Duration::from_secs(30));
    let ahead = away.duration_since(wall(now)).unwrap();
    assert!(
        ahead.abs_diff(Duration::from_secs(30)) <= Duration::from_millis(10),
        "{ahead:?}"
    );
}

#[test]
fn addresses_are_written_as_display_writes_them() {
    for a in [
        "0.0.0.0:0",
        "10.0.0.1:80",
        "192.0.2.255:8080",
        "255.255.255.255:65535",
        "[2001:db8::1]:443",
        "[::ffff:192.0.2.1]:1",
    ] {
        let a: SocketAddr = a.parse().unwrap();
        let mut out = Vec::new();
        addr(&mut out, a);
        assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
        let mut out = Vec::new();
        ip(&mut out, a.ip());
        assert_eq!(String::from_utf8(out).unwrap(), a.ip().to_string());
    }
    // Every octet value, in every position (1, 2 and 3 digits, zeros inside).
    for o in 0..=255u8 {
        let a = std::net::Ipv4Addr::new(o, o / 10, 255 - o, o % 100).into();
        let mut out = Vec::new();
        ip(&mut out, a);
        assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
    }
}
