use std::collections::{HashMap, HashSet};

use prometheus_parse::{LineInfo, Sample, SampleType, Scrape, Value};

use super::*;
use crate::{
    admin::tests::Fixture,
    overrides::{Change, Overrides},
};

/// Parses `text` with a real Prometheus parser, after checking what that lenient parser lets
/// pass: every line is a comment or a sample, each family has HELP and TYPE before its
/// samples, its samples are contiguous, and counters end in `_total`.
fn scrape(text: &str) -> Scrape {
    let mut types: HashMap<String, SampleType> = HashMap::new();
    let mut helped = HashSet::new();
    let mut done = HashSet::new();
    let mut current = String::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(helped.insert(metric_name.to_string()), "HELP twice: {line}");
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                assert!(helped.contains(&family), "TYPE before HELP: {line}");
                if sample_type == SampleType::Counter {
                    assert!(family.ends_with("_total"), "counter without _total: {line}");
                }
                types.insert(family, sample_type);
            }
            LineInfo::Sample { metric_name, .. } => {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        let base = metric_name.strip_suffix(s)?;
                        (types.get(base) == Some(&SampleType::Histogram)).then_some(base)
                    })
                    .unwrap_or(metric_name);
                assert!(types.contains_key(family), "sample before TYPE: {line}");
                if family != current {
                    assert!(done.insert(current.clone()), "{family} interleaved: {line}");
                    current = family.to_string();
                }
            }
            other => panic!("not a comment or sample: {line:?} ({other:?})"),
        }
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the one sample of `metric` with exactly these labels.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| {
            x.metric == metric
                && x.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .collect();
    assert_eq!(hits.len(), 1, "{metric}{labels:?}: {hits:?}");
    match hits[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric}: {other:?}"),
    }
}

#[test]
fn the_rendering_parses_and_every_metric_has_its_value_and_labels() {
    let f = Fixture::new();
    let text = render(&f.view(&Overrides::default()));
    let s = scrape(&text);
    assert!(s.docs.contains_key("lb_http_request_duration_seconds"));

    assert_eq!(
        value(&s, "lb_xdp_packets_total", &[("reason", "forwarded")]),
        11.0
    );
    assert_eq!(
        value(&s, "lb_xdp_packets_total", &[("reason", "drop_acl")]),
        20.0
    );
    let web = [("listener", "web"), ("direction", "in")];
    assert_eq!(value(&s, "lb_listener_packets_total", &web), 40.0);
    assert_eq!(value(&s, "lb_listener_bytes_total", &web), 4000.0);
    let web = [("listener", "web"), ("direction", "out")];
    assert_eq!(value(&s, "lb_listener_bytes_total", &web), 4100.0);
    assert_eq!(
        value(&s, "lb_listener_new_flows_total", &[("listener", "web")]),
        20.0
    );
    assert_eq!(
        value(&s, "lb_listener_active_flows", &[("listener", "web")]),
        6.0
    );
    assert!(
        !text.contains("lb_listener_packets_total{listener=\"site\""),
        "http listeners have request metrics, not packet counters"
    );

    // Backend ids 0, 1 (pool web) and 2 (pool api): each once, though the http listener
    // shows pool web too.
    let b1 = [("pool", "web"), ("backend", "10.0.0.2:80")];
    let b1_in = [b1[0], b1[1], ("direction", "in")];
    assert_eq!(value(&s, "lb_backend_packets_total", &b1_in), 1.0);
    assert_eq!(value(&s, "lb_backend_bytes_total", &b1_in), 100.0);
    let api = [("pool", "api"), ("backend", "10.0.0.3:81")];
    assert_eq!(value(&s, "lb_backend_new_flows_total", &api), 1.0);
    assert_eq!(value(&s, "lb_backend_active_flows", &b1), 2.0);
    assert_eq!(value(&s, "lb_backend_weight", &b1), 1.0);
    assert_eq!(value(&s, "lb_backend_drained", &b1), 0.0);
    // Probed, no answer yet: pending and down; the unchecked pool is up.
    assert_eq!(value(&s, "lb_backend_up", &b1), 0.0);
    assert_eq!(value(&s, "lb_backend_up", &api), 1.0);
    for (state, v) in [
        ("pending", 1.0),
        ("healthy", 0.0),
        ("unhealthy", 0.0),
        ("unchecked", 0.0),
    ] {
        let l = [b1[0], b1[1], ("state", state)];
        assert_eq!(value(&s, "lb_backend_health_state", &l), v, "{state}");
    }
    assert!(
        !text.contains("lb_backend_probe_latency_seconds{"),
        "no probe ran yet"
    );

    let v4 = [("snat_address", "10.0.0.9")];
    assert_eq!(value(&s, "lb_snat_ports_in_use", &v4), 6.0);
    assert_eq!(value(&s, "lb_snat_busiest_backend_ports_in_use", &v4), 4.0);
    assert_eq!(
        value(&s, "lb_snat_ports_in_use", &[("snat_address", "fd00::9")]),
        0.0
    );
    assert_eq!(value(&s, "lb_snat_port_range_size", &[]), 100.0);
    assert_eq!(value(&s, "lb_conntrack_entries", &[]), 12.0);
    assert_eq!(value(&s, "lb_conntrack_entries_limit", &[]), 1392640.0);
    let table = |t| [("table", t)];
    assert_eq!(value(&s, "lb_conntrack_table_entries", &table("ipv6")), 2.0);
    assert_eq!(
        value(
            &s,
            "lb_conntrack_table_entries_limit",
            &table("ipv4_handshake")
        ),
        65536.0
    );

    let site = |code| [("listener", "site"), ("code", code)];
    assert_eq!(value(&s, "lb_http_requests_total", &site("200")), 2.0);
    assert_eq!(value(&s, "lb_http_requests_total", &site("503")), 1.0);
    let h = s
        .samples
        .iter()
        .find(|x| x.metric == "lb_http_request_duration_seconds")
        .expect("histogram");
    let Value::Histogram(buckets) = &h.value else {
        panic!("{h:?}")
    };
    let at = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
    assert_eq!(
        (at(0.005), at(0.025), at(0.05), at(f64::INFINITY)),
        (2.0, 2.0, 3.0, 3.0)
    );
    let count = value(
        &s,
        "lb_http_request_duration_seconds_count",
        &[("listener", "site")],
    );
    assert_eq!(count, 3.0);
    let sum = value(
        &s,
        "lb_http_request_duration_seconds_sum",
        &[("listener", "site")],
    );
    assert!((sum - 0.033).abs() < 1e-9, "{sum}");
}

#[test]
fn drained_backends_and_weights_show_and_label_values_are_escaped() {
    let f = Fixture::new();
    let mut o = Overrides::default();
    let b0 = "10.0.0.1:80".parse().unwrap();
    o.set(&f.config, "web", b0, Change::Drain(true)).unwrap();
    o.apply_to(&f.health);
    let s = scrape(&render(&f.view(&o)));
    let l = [("pool", "web"), ("backend", "10.0.0.1:80")];
    assert_eq!(value(&s, "lb_backend_drained", &l), 1.0);
    assert_eq!(value(&s, "lb_backend_weight", &l), 0.0);

    let mut w = Writer::default();
    w.family("x_total", "counter", "a \\ and a\nline break");
    w.sample("x_total", &[("l", "say \"hi\"\\\n".into())], 1);
    assert_eq!(
        w.out,
        "# HELP x_total a \\\\ and a\\nline break\n# TYPE x_total counter\n\
         x_total{l=\"say \\\"hi\\\"\\\\\\n\"} 1\n"
    );
}
