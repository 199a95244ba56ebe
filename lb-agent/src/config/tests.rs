use std::time::Duration;

use super::*;

const EXAMPLE: &str = "\
agent:
  interfaces: [lb-ext, lb-int]     # XDP attaches to each (one-arm: a single interface)
  xdp_mode: auto                   # native | generic | auto (native, falling back to generic)
snat:                              # FullNAT local addresses: the source the backends see
  addresses: [10.91.2.1]
  ports: 20000-60000
listeners:
  - name: web
    protocol: tcp
    vip: 10.91.0.100
    port: 80
    pool: web
pools:
  - name: web
    backends:
      - { address: 10.91.2.11, port: 8080, weight: 1 }
      - { address: 10.91.2.12, port: 8080, weight: 1 }
";

/// The machine the config tests pretend to run on (also used by the fuzz tests).
pub(super) fn host() -> Host {
    Host {
        addresses: Some(vec![
            "10.91.2.1".parse().unwrap(),
            "fd00:91:2::1".parse().unwrap(),
        ]),
        interfaces: Some(vec!["lo".into(), "lb-ext".into(), "lb-int".into()]),
    }
}

fn err(text: &str) -> String {
    parse("lb.yaml", text, &host()).unwrap_err().to_string()
}

#[test]
fn the_issue_example_parses() {
    let c = parse("lb.yaml", EXAMPLE, &host()).unwrap();
    assert_eq!(c.agent.interfaces, ["lb-ext", "lb-int"]);
    assert_eq!(c.agent.xdp_mode, XdpMode::Auto);
    let snat = c.snat.unwrap();
    assert_eq!(
        snat.ports,
        PortRange {
            min: 20000,
            max: 60000
        }
    );
    assert_eq!(c.listeners[0].port, Port(80));
    assert_eq!(c.listeners[0].protocol, Protocol::Tcp);
    assert_eq!(
        c.pools[0].backends[1].address,
        "10.91.2.12".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn defaults_apply_when_fields_are_left_out() {
    let text = EXAMPLE
        .replace("  xdp_mode: auto                   # native | generic | auto (native, falling back to generic)\n", "")
        .replace("  ports: 20000-60000\n", "")
        .replace(", weight: 1 }", " }");
    let c = parse("lb.yaml", &text, &host()).unwrap();
    assert_eq!(c.agent.xdp_mode, XdpMode::Auto);
    assert_eq!(c.snat.unwrap().ports, PortRange::default());
    assert!(c.pools[0].backends.iter().all(|b| b.weight == 1));
    assert!(
        c.agent.l7_cpu_affinity,
        "L7 workers are pinned unless told not to"
    );
    let text = EXAMPLE.replace("  xdp_mode", "  l7_cpu_affinity: false\n  xdp_mode");
    assert!(
        !parse("lb.yaml", &text, &host())
            .unwrap()
            .agent
            .l7_cpu_affinity
    );
}

#[test]
fn an_out_of_range_port_names_file_line_column_and_path() {
    let text = EXAMPLE.replace("    port: 80\n", "    port: 65536\n");
    assert_eq!(
        err(&text),
        "lb.yaml:11:11: listeners[0].port: 65536 is not a valid port"
    );
    let text = EXAMPLE.replace("    port: 80\n", "    port: 0\n");
    assert_eq!(
        err(&text),
        "lb.yaml:11:11: listeners[0].port: 0 is not a valid port"
    );
}

#[test]
fn unknown_fields_are_errors() {
    let text = EXAMPLE.replace("    pool: web\n", "    pool: web\n    colour: blue\n");
    let e = err(&text);
    assert!(
        e.starts_with("lb.yaml:13:13: listeners[0].colour: unknown field `colour`"),
        "{e}"
    );
    let text = EXAMPLE.replace("agent:\n", "agnet: {}\nagent:\n");
    assert!(
        err(&text).contains("unknown field `agnet`"),
        "{}",
        err(&text)
    );
}

#[test]
fn duplicate_listener_names_are_errors() {
    let text = EXAMPLE.replace(
        "pools:\n",
        "  - { name: web, protocol: tcp, vip: 10.91.0.101, port: 80, pool: web }\npools:\n",
    );
    assert_eq!(
        err(&text),
        "lb.yaml:13:13: listeners[1].name: duplicate listener name `web` (also listeners[0])"
    );
}

#[test]
fn duplicate_vip_port_protocol_triples_are_errors() {
    let text = EXAMPLE.replace(
        "pools:\n",
        "  - { name: web2, protocol: tcp, vip: 10.91.0.100, port: 80, pool: web }\npools:\n",
    );
    assert_eq!(
        err(&text),
        "lb.yaml:13:58: listeners[1].port: 10.91.0.100:80/tcp is already used by listener `web`"
    );
    // The same VIP and port over UDP is a different listener.
    let text = EXAMPLE.replace(
        "pools:\n",
        "  - { name: dns, protocol: udp, vip: 10.91.0.100, port: 80, pool: web }\npools:\n",
    );
    parse("lb.yaml", &text, &host()).unwrap();
}

#[test]
fn a_listener_naming_a_missing_pool_is_an_error() {
    let text = EXAMPLE.replace("    pool: web\n", "    pool: api\n");
    assert_eq!(
        err(&text),
        "lb.yaml:12:11: listeners[0].pool: pool `api` does not exist"
    );
}

#[test]
fn a_backend_without_an_address_is_an_error() {
    let text = EXAMPLE.replace("{ address: 10.91.2.12, port: 8080", "{ port: 8080");
    let e = err(&text);
    assert!(
        e.starts_with("lb.yaml:17:9: pools[0].backends[1]: missing field `address`"),
        "{e}"
    );
}

#[test]
fn a_pool_without_backends_is_an_error() {
    let text = format!("{}  - name: empty\n    backends: []\n", EXAMPLE);
    assert_eq!(
        err(&text),
        "lb.yaml:19:15: pools[1].backends: pool `empty` has no backends"
    );
}

#[test]
fn a_snat_address_not_on_this_host_is_an_error() {
    let text = EXAMPLE.replace(
        "addresses: [10.91.2.1]",
        "addresses: [10.91.2.1, 10.91.2.9]",
    );
    assert_eq!(
        err(&text),
        "lb.yaml:5:26: snat.addresses[1]: 10.91.2.9 is not an address of this host"
    );
}

#[test]
fn a_missing_interface_is_an_error() {
    let text = EXAMPLE.replace("[lb-ext, lb-int]", "[lb-ext, eth9]");
    assert_eq!(
        err(&text),
        "lb.yaml:2:24: agent.interfaces[1]: interface `eth9` does not exist on this host"
    );
}

#[test]
fn the_admin_address_defaults_to_loopback_and_is_validated_with_positions() {
    let c = parse("lb.yaml", EXAMPLE, &host()).unwrap();
    assert_eq!(c.agent.admin, "127.0.0.1:9100".parse().unwrap());
    let with = |admin: &str| EXAMPLE.replace("  xdp_mode: auto", &format!("  admin: {admin}"));
    for ok in [
        "0.0.0.0:9200",
        "'[::1]:9100'",
        "10.91.2.1:9100",
        "'[fd00:91:2::1]:80'",
    ] {
        let c = parse("lb.yaml", &with(ok), &host()).unwrap();
        assert_eq!(c.agent.admin.to_string(), ok.trim_matches('\''));
    }
    assert_eq!(
        err(&with("localhost")),
        "lb.yaml:3:10: agent.admin: `localhost` is not an address and port (e.g. 127.0.0.1:9100 \
         or [::1]:9100)"
    );
    assert_eq!(
        err(&with("127.0.0.1:0")),
        "lb.yaml:3:10: agent.admin: 127.0.0.1:0: port 0 is not a port"
    );
    assert_eq!(
        err(&with("10.9.9.9:9100")),
        "lb.yaml:3:10: agent.admin: 10.9.9.9 is not an address of this host"
    );
}

#[test]
fn bad_values_are_errors_with_positions() {
    let e = err(&EXAMPLE.replace("ports: 20000-60000", "ports: 60000-20000"));
    assert_eq!(
        e,
        "lb.yaml:6:10: snat.ports: port range 60000-20000 is empty (MIN is above MAX)"
    );
    let e = err(&EXAMPLE.replace("ports: 20000-60000", "ports: lots"));
    assert!(
        e.starts_with("lb.yaml:6:10: snat.ports: `lots` is not a port range"),
        "{e}"
    );
    let e = err(&EXAMPLE.replace("vip: 10.91.0.100", "vip: 10.91.0.300"));
    assert!(
        e.starts_with("lb.yaml:10:10: listeners[0].vip: invalid IP address syntax"),
        "{e}"
    );
    let e = err(&EXAMPLE.replace("protocol: tcp", "protocol: sctp"));
    assert!(
        e.starts_with("lb.yaml:9:15: listeners[0].protocol: unknown variant `sctp`"),
        "{e}"
    );
    let e = err(&EXAMPLE.replace("xdp_mode: auto", "xdp_mode: turbo"));
    assert!(
        e.starts_with("lb.yaml:3:13: agent.xdp_mode: unknown variant `turbo`"),
        "{e}"
    );
    let e = err(&EXAMPLE.replace(
        "port: 8080, weight: 1 }\n      - {",
        "port: 8080, weight: -1 }\n      - {",
    ));
    assert!(
        e.starts_with("lb.yaml:16:52: pools[0].backends[0].weight: weight -1 is out of range"),
        "{e}"
    );
}

#[test]
fn families_must_match_between_listener_backends_and_snat() {
    let text = EXAMPLE.replace("10.91.2.12, port", "fd00:91:2::12, port");
    assert_eq!(
        err(&text),
        "lb.yaml:17:20: pools[0].backends[1].address: IPv6 backend fd00:91:2::12 cannot serve IPv4 \
         listener `web` (no 6-to-4 translation at L4)"
    );
    let text = EXAMPLE
        .replace("vip: 10.91.0.100", "vip: fd00:91::100")
        .replace("10.91.2.11", "fd00:91:2::11")
        .replace("10.91.2.12", "fd00:91:2::12");
    assert_eq!(
        err(&text),
        "lb.yaml:5:14: snat.addresses: IPv6 listener `web` needs an IPv6 SNAT address"
    );
}

#[test]
fn syntax_errors_and_empty_files_are_reported_with_a_position() {
    let e = err("agent: [unclosed\n");
    assert!(e.starts_with("lb.yaml:"), "{e}");
    assert!(!e.contains(" at line "), "{e}");
    let e = err("");
    assert!(e.starts_with("lb.yaml:1:1: "), "{e}");
}

#[test]
fn syntax_errors_inside_a_listener_point_where_the_parser_stopped() {
    let listener = "agent:\n  interfaces: [lo]\nlisteners:\n  - name: h\n";
    let cases = [
        // An unclosed flow mapping: found where the next block starts.
        (
            "    routes:\n      - { host: a.example.com, pool: web\npools: []\n",
            "lb.yaml:7:6: ",
        ),
        // A key indented one space too far is folded into the value before it.
        (
            "    protocol: http\n     vip: 127.0.0.1\n    port: 80\n",
            "lb.yaml:5:15: ",
        ),
        // An unclosed quote.
        ("    pool: \"web\n", "lb.yaml:6:1: "),
    ];
    for (rest, at) in cases {
        let e = err(&format!("{listener}{rest}"));
        assert!(e.starts_with(at), "{rest:?}: {e}");
    }
    let e = err("agent:\n  interfaces: [lo]\nlisteners:\n\t- name: h\n");
    assert!(e.starts_with("lb.yaml:4:1: "), "{e}");
    // An error serde_yaml gives no position: the node it is about, as far as the document
    // parsed.
    let e = err("agent:\n  interfaces: [lo]\nlisteners:\n  - [\n");
    assert!(e.starts_with("lb.yaml:4:5: listeners[0]"), "{e}");
}

const L7: &str = "\
agent:
  interfaces: [lb-ext]
listeners:
  - name: site
    protocol: https
    vip: 10.91.0.100
    port: 443
    pool: web
    tls:
      certificates:
        - { cert: CERT, key: KEY }
    routes:
      - { host: api.example.com, path_prefix: /v1, pool: api }
    session_persistence: { type: insert_cookie, cookie: SERVERID, timeout: 20m }
    timeouts: { connect: 5s, request: 60s, response: 60s, idle: 15s }
  - name: site-plain
    protocol: http
    vip: 10.91.0.100
    port: 80
    redirect: { to: https, code: 301 }
pools:
  - name: web
    backends:
      - { address: 10.91.2.11, port: 8080 }
  - name: api
    backends:
      - { address: fd00:91:2::12, port: 8080 }
";

/// The issue's L7 example with a real certificate pair in a temporary directory.
fn l7_text() -> (String, std::path::PathBuf) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lb-config-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("site.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("site.key"), key.serialize_pem()).unwrap();
    let text = L7
        .replace("CERT", &dir.join("site.pem").display().to_string())
        .replace("KEY", &dir.join("site.key").display().to_string());
    (text, dir)
}

fn l7_err(edit: impl Fn(&str) -> String) -> String {
    let (text, dir) = l7_text();
    let e = err(&edit(&text));
    let _ = std::fs::remove_dir_all(dir);
    e
}

#[test]
fn the_issue_l7_example_parses_without_snat() {
    let (text, dir) = l7_text();
    let c = parse("lb.yaml", &text, &host()).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    let site = &c.listeners[0];
    assert_eq!(site.protocol, Protocol::Https);
    assert_eq!(site.routes[0].path_prefix.as_deref(), Some("/v1"));
    let p = site.session_persistence.as_ref().unwrap();
    assert_eq!(p.kind, PersistenceKind::InsertCookie);
    assert_eq!(p.timeout, Duration::from_secs(1200));
    assert_eq!(
        site.timeouts.as_ref().unwrap().idle,
        Duration::from_secs(15)
    );
    assert_eq!(
        site.timeouts.as_ref().unwrap().websocket_idle,
        Duration::from_secs(60)
    );
    assert_eq!(c.listeners[1].pool, None);
    assert_eq!(c.https_port(site.vip), Some(Port(443)));
    // L7 listeners never reach the XDP maps.
    assert!(crate::plan::build(&c).listeners.is_empty());
}

#[test]
fn l7_listeners_are_checked_with_positions() {
    assert_eq!(
        l7_err(|t| t.replace("    redirect: { to: https, code: 301 }\n", "")),
        "lb.yaml:16:9: listeners[1]: http listener `site-plain` needs a `pool`, `routes` or a `redirect`"
    );
    assert_eq!(
        l7_err(|t| t.replace("code: 301", "code: 200")),
        "lb.yaml:20:34: listeners[1].redirect.code: 200 is not a redirect code (301, 302, 303, 307, 308)"
    );
    assert_eq!(
        l7_err(|t| t.replace("pool: api }", "pool: apx }")),
        "lb.yaml:13:58: listeners[0].routes[0].pool: pool `apx` does not exist"
    );
    assert_eq!(
        l7_err(|t| {
            t.replace(
            "      - { host: api.example.com, path_prefix: /v1, pool: api }\n",
            "      - { host: '*.example.com', pool: api }\n      - { host: api.example.com, path_prefix: /v1, pool: web }\n"
        )
        }),
        "lb.yaml:14:9: listeners[0].routes[1]: never matches: routes[0] comes first and covers it"
    );
    assert_eq!(
        l7_err(|t| t.replace("path_prefix: /v1", "path_prefix: v1")),
        "lb.yaml:13:47: listeners[0].routes[0].path_prefix: `v1` does not start with /"
    );
    // Prefixes are written as requests are matched: normalized, and only path characters.
    assert_eq!(
        l7_err(|t| t.replace("path_prefix: /v1", "path_prefix: '/%7ev1'")),
        "lb.yaml:13:47: listeners[0].routes[0].path_prefix: `/%7ev1` would never match: paths are matched normalized (escaped unreserved characters decoded, other escapes in upper case, `.` and `..` resolved, `//` merged); write `/~v1`"
    );
    assert_eq!(
        l7_err(|t| t.replace("path_prefix: /v1", "path_prefix: /a%2fb")),
        "lb.yaml:13:47: listeners[0].routes[0].path_prefix: `/a%2fb` would never match: paths are matched normalized (escaped unreserved characters decoded, other escapes in upper case, `.` and `..` resolved, `//` merged); write `/a%2Fb`"
    );
    assert_eq!(
        l7_err(|t| t.replace("path_prefix: /v1", "path_prefix: /a%zz")),
        "lb.yaml:13:47: listeners[0].routes[0].path_prefix: `/a%zz`: a `%` must start an escape of two hex digits"
    );
    assert_eq!(
        l7_err(|t| t.replace("path_prefix: /v1", "path_prefix: '/a b'")),
        "lb.yaml:13:47: listeners[0].routes[0].path_prefix: `/a b`: ' ' cannot appear in a request path (percent-encode it)"
    );
    assert_eq!(
        l7_err(|t| t.replace("connect: 5s", "connect: 5 parsecs")),
        "lb.yaml:15:26: listeners[0].timeouts.connect: `5 parsecs` is not a duration (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)); e.g. 5s, 20m or 500ms"
    );
    assert_eq!(
        l7_err(|t| t.replace("connect: 5s", "connect: 5")),
        "lb.yaml:15:26: listeners[0].timeouts.connect: `5` needs a unit here, such as `5s`"
    );
    assert_eq!(
        l7_err(|t| t.replace("type: insert_cookie, cookie: SERVERID", "type: app_cookie")),
        "lb.yaml:14:26: listeners[0].session_persistence.cookie: app_cookie needs the name of the backend's `cookie`"
    );
    assert_eq!(
        l7_err(|t| t.replace("    port: 80\n", "    port: 443\n")),
        "lb.yaml:19:11: listeners[1].port: 10.91.0.100:443/tcp is already used by listener `site`"
    );
    assert_eq!(
        l7_err(|t| t.replace("host: api.example.com", "host: api..example.com")),
        "lb.yaml:13:17: listeners[0].routes[0].host: `api..example.com` is not a host name or `*.suffix` pattern"
    );
    assert_eq!(
        l7_err(|t| t.replacen(
            "    pool: web\n",
            "    pool: web\n    max_uri_bytes: 0\n",
            1
        )),
        "lb.yaml:9:20: listeners[0].max_uri_bytes: must be above 0"
    );
}

#[test]
fn a_listener_with_routes_needs_no_default_pool() {
    let (text, dir) = l7_text();
    let c = parse("lb.yaml", &text.replacen("    pool: web\n", "", 1), &host());
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(c.unwrap().listeners[0].pool, None);
}

#[test]
fn tls_settings_are_checked() {
    let e = l7_err(|t| t.replace("site.key", "missing.key"));
    assert!(
        e.starts_with("lb.yaml:11:")
            && e.contains("listeners[0].tls.certificates[0].key: ")
            && e.contains("missing.key"),
        "{e}"
    );
    let e = l7_err(|t| {
        let start = t.find("    tls:").unwrap();
        let end = t.find("    routes:").unwrap();
        format!("{}{}", &t[..start], &t[end..])
    });
    assert_eq!(
        e,
        "lb.yaml:4:9: listeners[0]: https listener `site` needs `tls.certificates`"
    );
}

#[test]
fn proxy_settings_on_a_tcp_listener_are_errors() {
    let text = EXAMPLE.replace(
        "    pool: web\n",
        "    pool: web\n    max_body_bytes: 1024\n",
    );
    assert_eq!(
        err(&text),
        "lb.yaml:13:21: listeners[0].max_body_bytes: `max_body_bytes` applies to http/https listeners only (`web` is tcp)"
    );
    // Schedulers apply to both kinds; maglev only to tcp/udp.
    assert!(parse(
        "lb.yaml",
        &EXAMPLE.replace("    pool: web\n", "    pool: web\n    scheduler: wlc\n"),
        &host()
    )
    .is_ok());
    let text = EXAMPLE.replace("    pool: web\n", "");
    assert_eq!(
        err(&text),
        "lb.yaml:8:9: listeners[0]: tcp listener `web` needs a `pool`"
    );
}

#[test]
fn l4_listener_options_parse_with_defaults() {
    let c = parse("lb.yaml", EXAMPLE, &host()).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.scheduler(), Scheduler::Maglev);
    assert_eq!(l.table_size, 65537);
    assert_eq!(l.idle_timeout(), Duration::from_secs(900));
    assert_eq!(l.acl, Acl::default());

    let text = EXAMPLE.replace(
        "    pool: web\n",
        "    pool: web\n    scheduler: source_ip\n    table_size: 251\n    idle_timeout: 2m\n    \
         acl: { allow: [10.0.0.0/8], deny: [10.1.0.0/16, 10.2.3.4/32] }\n",
    );
    let c = parse("lb.yaml", &text, &host()).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.scheduler(), Scheduler::SourceIp);
    assert_eq!(l.table_size, 251);
    assert_eq!(l.idle_timeout(), Duration::from_secs(120));
    assert_eq!(l.acl.allow, ["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(l.acl.deny.len(), 2);

    let udp = EXAMPLE.replace("protocol: tcp", "protocol: udp");
    let c = parse("lb.yaml", &udp, &host()).unwrap();
    assert_eq!(c.listeners[0].idle_timeout(), Duration::from_secs(300));
    let secs = EXAMPLE.replace("    pool: web\n", "    pool: web\n    idle_timeout: 45\n");
    assert_eq!(
        parse("lb.yaml", &secs, &host()).unwrap().listeners[0].idle_timeout(),
        Duration::from_secs(45)
    );
}

#[test]
fn l4_listener_options_are_validated() {
    let with =
        |extra: &str| err(&EXAMPLE.replace("    pool: web\n", &format!("    pool: web\n{extra}")));
    assert_eq!(
        with("    table_size: 1000\n"),
        "lb.yaml:13:17: listeners[0].table_size: 1000 is not a prime up to 65537"
    );
    assert_eq!(
        with("    table_size: 65539\n"),
        "lb.yaml:13:17: listeners[0].table_size: 65539 is not a prime up to 65537"
    );
    // Each backend needs about a slot by weight: weights 1 and 9 take at least 10 (maglev and
    // source_ip; wrr and wlc use no such table).
    let weighted = EXAMPLE.replace(
        "8080, weight: 1 }\n      - { address: 10.91.2.12, port: 8080, weight: 1",
        "8080, weight: 1 }\n      - { address: 10.91.2.12, port: 8080, weight: 9",
    );
    let small = weighted.replace("    pool: web\n", "    pool: web\n    table_size: 7\n");
    assert_eq!(
        err(&small),
        "lb.yaml:13:17: listeners[0].table_size: 7 slots leave some of pool `web`'s backends without one (by their weights it needs at least 10; the default 65537 spreads them evenly)"
    );
    let enough = weighted.replace("    pool: web\n", "    pool: web\n    table_size: 11\n");
    assert!(parse("lb.yaml", &enough, &host()).is_ok());
    let wrr = small.replace(
        "    table_size: 7\n",
        "    table_size: 7\n    scheduler: wrr\n",
    );
    assert!(parse("lb.yaml", &wrr, &host()).is_ok());
    let e = with("    idle_timeout: soon\n");
    assert!(
        e.starts_with("lb.yaml:13:19: listeners[0].idle_timeout: `soon` is not a duration"),
        "{e}"
    );
    let e = with("    idle_timeout: 0s\n");
    assert!(
        e.starts_with("lb.yaml:13:19: listeners[0].idle_timeout: a duration must be above zero"),
        "{e}"
    );
    let e = with("    scheduler: random\n");
    assert!(
        e.starts_with("lb.yaml:13:16: listeners[0].scheduler: unknown variant `random`"),
        "{e}"
    );
    assert_eq!(
        with("    acl: { deny: [\"fd00::/8\"] }\n"),
        "lb.yaml:13:19: listeners[0].acl.deny[0]: fd00::/8 is not of the IPv4 listener's family"
    );
    let e = with("    acl: { allow: [10.0.0.0/33] }\n");
    assert!(
        e.starts_with("lb.yaml:13:20: listeners[0].acl.allow[0]: "),
        "{e}"
    );
}

#[test]
fn client_ip_modes_parse_and_passthrough_needs_no_snat() {
    let c = parse("lb.yaml", EXAMPLE, &host()).unwrap();
    assert_eq!(c.listeners[0].client_ip, ClientIp::Snat);
    let text = EXAMPLE
        .replace("    pool: web\n", "    pool: web\n    client_ip: passthrough\n")
        .replace("snat:                              # FullNAT local addresses: the source the backends see\n  addresses: [10.91.2.1]\n  ports: 20000-60000\n", "");
    let c = parse("lb.yaml", &text, &host()).unwrap();
    assert_eq!(c.listeners[0].client_ip, ClientIp::Passthrough);
    assert!(c.snat.is_none());
    let toa = EXAMPLE.replace("    pool: web\n", "    pool: web\n    client_ip: toa\n");
    assert_eq!(
        parse("lb.yaml", &toa, &host()).unwrap().listeners[0].client_ip,
        ClientIp::Toa
    );
    assert_eq!(
        err(&toa.replace("protocol: tcp", "protocol: udp")),
        "lb.yaml:13:16: listeners[0].client_ip: `toa` carries an IPv4 client in a TCP option: it \
         needs an IPv4 tcp listener"
    );
}

#[test]
fn reset_on_idle_is_for_tcp_listeners() {
    let text = EXAMPLE.replace(
        "    pool: web\n",
        "    pool: web\n    reset_on_idle: true\n",
    );
    assert!(parse("lb.yaml", &text, &host()).unwrap().listeners[0].reset_on_idle);
    assert_eq!(
        err(&text.replace("protocol: tcp", "protocol: udp")),
        "lb.yaml:13:20: listeners[0].reset_on_idle: applies to tcp listeners only (`web` is udp)"
    );
}

#[test]
fn maglev_is_refused_on_http_listeners() {
    let e = l7_err(|t| {
        t.replace(
            "    pool: web\n    tls:",
            "    pool: web\n    scheduler: maglev\n    tls:",
        )
    });
    assert_eq!(
        e,
        "lb.yaml:9:16: listeners[0].scheduler: maglev hashes flows: http/https listeners use wrr, wlc or source_ip"
    );
}

/// EXAMPLE with `hc` as the web pool's `health_check` (flow style, on line 15).
fn with_check(hc: &str) -> String {
    EXAMPLE.replace(
        "  - name: web\n    backends:",
        &format!("  - name: web\n    health_check: {hc}\n    backends:"),
    )
}

#[test]
fn health_check_defaults_are_the_vendors() {
    let c = parse("lb.yaml", &with_check("{ protocol: tcp }"), &host()).unwrap();
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.interval(), Duration::from_secs(2));
    assert_eq!(hc.timeout(), Duration::from_secs(5));
    assert_eq!((hc.healthy_threshold(), hc.unhealthy_threshold()), (3, 3));
    let c = parse("lb.yaml", &with_check("{ protocol: udp }"), &host()).unwrap();
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.interval(), Duration::from_secs(5));
    assert_eq!(hc.timeout(), Duration::from_secs(10));
    let c = parse(
        "lb.yaml",
        &with_check(
            "{ protocol: http, path: /healthz, expected_codes: [200, 300-302], method: GET }",
        ),
        &host(),
    )
    .unwrap();
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.method(), CheckMethod::Get);
    let codes = hc.expected_codes();
    assert!(codes.iter().any(|r| r.contains(200)) && codes.iter().any(|r| r.contains(302)));
    assert!(!codes.iter().any(|r| r.contains(204)));
    let c = parse("lb.yaml", &with_check("{ protocol: http }"), &host()).unwrap();
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!((hc.method(), hc.path()), (CheckMethod::Head, "/"));
    assert!(hc.expected_codes().iter().any(|r| r.contains(399)));
    assert!(!hc.expected_codes().iter().any(|r| r.contains(404)));
}

#[test]
fn expected_codes_take_the_vendors_spellings() {
    let codes = |v: &str| -> Result<Vec<(u16, u16)>, String> {
        let c = parse(
            "lb.yaml",
            &with_check(&format!("{{ protocol: http, expected_codes: {v} }}")),
            &host(),
        )
        .map_err(|e| e.to_string())?;
        let hc = c.pools[0].health_check.as_ref().unwrap();
        Ok(hc.expected_codes().iter().map(|r| (r.min, r.max)).collect())
    };
    // Alibaba SLB's classes, in a list or alone.
    assert_eq!(
        codes("[http_2xx, http_3xx]"),
        Ok(vec![(200, 299), (300, 399)])
    );
    assert_eq!(codes("http_2xx"), Ok(vec![(200, 299)]));
    assert_eq!(codes("[2xx, 404]"), Ok(vec![(200, 299), (404, 404)]));
    // Huawei ELB's string: one code, a range, or a comma-separated list.
    assert_eq!(codes("200"), Ok(vec![(200, 200)]));
    assert_eq!(codes("\"200-204\""), Ok(vec![(200, 204)]));
    assert_eq!(
        codes("\"200, 202,301\""),
        Ok(vec![(200, 200), (202, 202), (301, 301)])
    );
    assert_eq!(codes("[200-399]"), Ok(vec![(200, 399)]));
    let e = codes("\"200,abc\"").unwrap_err();
    assert!(e.ends_with("pools[0].health_check.expected_codes: `abc` is not a status code, a MIN-MAX range of them or a class such as `http_2xx`"), "{e}");
    let e = codes("http_7xx").unwrap_err();
    assert!(
        e.ends_with("700-799 is not a range of HTTP status codes (100-599)"),
        "{e}"
    );
    let e = codes("[http_2xx, 99]").unwrap_err();
    assert!(
        e.ends_with("expected_codes[1]: 99 is not an HTTP status code (100-599)"),
        "{e}"
    );
}

#[test]
fn health_check_errors_name_file_line_column_and_path() {
    let cases = [
        (
            "{ protocol: tcp, interval: 51s }",
            "lb.yaml:15:46: pools[0].health_check.interval: 51s is outside 1s-50s",
        ),
        (
            "{ protocol: tcp, interval: 500ms }",
            "lb.yaml:15:46: pools[0].health_check.interval: 500ms is outside 1s-50s",
        ),
        (
            "{ protocol: tcp, unhealthy_threshold: 0 }",
            "lb.yaml:15:57: pools[0].health_check.unhealthy_threshold: must be 1 to 10",
        ),
        (
            "{ protocol: tcp, path: /x }",
            "lb.yaml:15:42: pools[0].health_check.path: `path` applies to http/https health checks only (this one is tcp)",
        ),
        (
            "{ protocol: http, send: ping }",
            "lb.yaml:15:43: pools[0].health_check.send: `send` applies to udp health checks only (this one is http)",
        ),
        (
            "{ protocol: http, path: healthz }",
            "lb.yaml:15:43: pools[0].health_check.path: `healthz` is not an absolute path (/...)",
        ),
        (
            "{ protocol: http, expected_codes: [200-99] }",
            "lb.yaml:15:54: pools[0].health_check.expected_codes[0]: 200-99 is not a range of HTTP status codes (100-599)",
        ),
        (
            "{ protocol: http, expected_codes: [] }",
            "lb.yaml:15:53: pools[0].health_check.expected_codes: at least one code is needed",
        ),
        (
            "{ protocol: icmp, port: 80 }",
            "lb.yaml:15:43: pools[0].health_check.port: an icmp health check has no port",
        ),
        (
            "{ protocol: http, ca: ca.pem }",
            "lb.yaml:15:41: pools[0].health_check.ca: `ca` applies to https health checks only (this one is http)",
        ),
        (
            "{ protocol: https, ca: /nonexistent/ca.pem }",
            "lb.yaml:15:42: pools[0].health_check.ca: /nonexistent/ca.pem: I/O error: No such file or directory (os error 2)",
        ),
        (
            "{ protocol: udp, expect: '' }",
            "lb.yaml:15:44: pools[0].health_check.expect: must not be empty (leave it out to accept silence)",
        ),
        (
            "{ protocol: none, interval: 2s }",
            "lb.yaml:15:19: pools[0].health_check: `protocol: none` runs no probes: it takes no port, interval or timeout",
        ),
    ];
    for (hc, want) in cases {
        assert_eq!(err(&with_check(hc)), want, "{hc}");
    }
}

#[test]
fn unknown_health_check_fields_and_values_are_errors() {
    let e = err(&with_check("{ protocol: tcp, retries: 3 }"));
    assert!(e.starts_with("lb.yaml:15:45:"), "{e}");
    assert!(
        e.contains("pools[0].health_check") && e.contains("retries"),
        "{e}"
    );
    let e = err(&with_check("{ protocol: grpc }"));
    assert!(
        e.contains("pools[0].health_check.protocol") && e.contains("grpc"),
        "{e}"
    );
    let e = err(&with_check("{ protocol: http, method: POST }"));
    assert!(e.contains("pools[0].health_check.method"), "{e}");
}

#[test]
fn a_backup_needs_a_primary_and_an_active_check() {
    let backup_second = |text: &str| {
        text.replace(
            "{ address: 10.91.2.12, port: 8080, weight: 1 }",
            "{ address: 10.91.2.12, port: 8080, weight: 1, backup: true }",
        )
    };
    let c = parse(
        "lb.yaml",
        &backup_second(&with_check("{ protocol: tcp }")),
        &host(),
    )
    .unwrap();
    assert!(c.pools[0].backends[1].backup && !c.pools[0].backends[0].backup);
    assert_eq!(
        err(&backup_second(EXAMPLE)),
        "lb.yaml:17:63: pools[0].backends[1].backup: a backup needs an active `health_check` on its pool (without probes the primaries never fail)"
    );
    let both = backup_second(&with_check("{ protocol: tcp }")).replace(
        "{ address: 10.91.2.11, port: 8080, weight: 1 }",
        "{ address: 10.91.2.11, port: 8080, weight: 1, backup: true }",
    );
    assert_eq!(
        err(&both),
        "lb.yaml:17:63: pools[0].backends[0].backup: pool `web` has no primary (non-backup) backend"
    );
}

#[test]
fn errors_stay_on_one_line_whatever_the_file_holds() {
    // Found by the fuzz tests: a quoted key with a line break, echoed in "unknown field".
    let e = err("\"~\\n'\": 1\n");
    assert!(!e.contains('\n'), "{e}");
    assert!(e.starts_with("lb.yaml:1:"), "{e}");
    assert!(e.contains("unknown field `~\\n'`"), "{e}");
}

#[test]
fn acl_deny_wins_and_an_empty_allow_admits_everyone() {
    let acl = |allow: &[&str], deny: &[&str]| Acl {
        allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
        deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(acl(&[], &[]).admits(ip("192.0.2.1")));
    assert!(!acl(&[], &["192.0.2.0/24"]).admits(ip("192.0.2.1")));
    assert!(!acl(&["192.0.2.0/24"], &["192.0.2.1/32"]).admits(ip("192.0.2.1")));
    assert!(acl(&["192.0.2.0/24"], &["192.0.2.1/32"]).admits(ip("192.0.2.2")));
    assert!(!acl(&["192.0.2.0/24"], &[]).admits(ip("198.51.100.1")));
    // A dual-stack socket's IPv4 peer is matched as IPv4.
    assert!(!acl(&[], &["192.0.2.0/24"]).admits(ip("::ffff:192.0.2.1")));
    assert!(acl(&["2001:db8::/32"], &[]).admits(ip("2001:db8::1")));
}

#[test]
fn vips_and_backends_are_unicast_and_no_listener_is_its_own_backend() {
    assert_eq!(
        err(&EXAMPLE.replace("vip: 10.91.0.100", "vip: 0.0.0.0")),
        "lb.yaml:10:10: listeners[0].vip: 0.0.0.0 is unspecified: a VIP needs a unicast address"
    );
    assert_eq!(
        err(&EXAMPLE.replace("vip: 10.91.0.100", "vip: 224.0.0.1")),
        "lb.yaml:10:10: listeners[0].vip: 224.0.0.1 is multicast: a VIP needs a unicast address"
    );
    assert_eq!(
        err(&EXAMPLE.replace("address: 10.91.2.12", "address: 255.255.255.255")),
        "lb.yaml:17:20: pools[0].backends[1].address: 255.255.255.255 is the broadcast address: a backend needs a unicast address"
    );
    assert_eq!(
        err(&EXAMPLE.replace("vip: 10.91.0.100", "vip: 10.91.2.1")),
        "lb.yaml:10:10: listeners[0].vip: 10.91.2.1 is also an snat address: the address backends see cannot be a VIP"
    );
    assert_eq!(
        err(&EXAMPLE.replace("address: 10.91.2.12, port: 8080", "address: 10.91.0.100, port: 80")),
        "lb.yaml:17:9: pools[0].backends[1]: 10.91.0.100:80 is listener `web` itself: its traffic would loop"
    );
}

#[test]
fn values_of_the_wrong_shape_say_what_is_expected() {
    let e = err(&with_check("{ protocol: tcp, interval: 1.5 }"));
    assert!(
        e.ends_with("pools[0].health_check.interval: invalid type: floating point `1.5`, expected a duration such as `900s`, `15m` or `1h 30m`, or a whole number of seconds"),
        "{e}"
    );
    let e = err(&with_check("{ protocol: http, expected_codes: [true] }"));
    assert!(
        e.ends_with("invalid type: boolean `true`, expected a status code such as `200`, a range such as `200-399` or a class such as `http_2xx`"),
        "{e}"
    );
    let e = err(&EXAMPLE.replace("port: 80\n", "port: eighty\n"));
    assert_eq!(
        e,
        "lb.yaml:11:11: listeners[0].port: invalid type: string \"eighty\", expected a port number 1-65535"
    );
    let e = err(&EXAMPLE.replace(
        "weight: 1 }\n      - { address: 10.91.2.12",
        "weight: 1.5 }\n      - { address: 10.91.2.12",
    ));
    assert!(
        e.ends_with(
            "weight: invalid type: floating point `1.5`, expected a weight, a whole number 0-65535"
        ),
        "{e}"
    );
    let e = err(&with_check("{ protocol: http, expected_codes: [600] }"));
    assert!(
        e.ends_with("600 is not an HTTP status code (100-599)"),
        "{e}"
    );
    let e = err(&with_check("tcp"));
    assert!(
        e.ends_with("pools[0].health_check: invalid type: string \"tcp\", expected a map such as `{ protocol: tcp }` or `{ protocol: http, path: /health }`"),
        "{e}"
    );
    let e = err(&EXAMPLE
        .replace(
            "    pool: web\n",
            "    pool: web\n    protocol: http\n    redirect: https\n",
        )
        .replace("    protocol: tcp\n", ""));
    assert!(
        e.ends_with(
            "invalid type: string \"https\", expected a map such as `{ to: https, code: 301 }`"
        ),
        "{e}"
    );
}

#[test]
fn a_key_given_twice_is_reported_where_it_comes_again_and_a_tab_as_syntax() {
    assert_eq!(
        err(&EXAMPLE.replace("    port: 80\n", "    port: 80\n    port: 81\n")),
        "lb.yaml:12:5: listeners[0]: duplicate field `port`"
    );
    assert_eq!(
        err(&format!("{EXAMPLE}agent:\n  interfaces: [lo]\n")),
        "lb.yaml:18:1: duplicate field `agent`"
    );
    let e = err(&EXAMPLE.replace("    pool: web\n", "\tpool: web\n"));
    assert!(e.starts_with("lb.yaml:12:1: found a tab character"), "{e}");
}
