use super::*;
use crate::{
    admin::tests::Fixture,
    config::{parse, Host},
    overrides::Overrides,
};

#[test]
fn xdp_attachments_are_read_from_ip_link_json() {
    let one = r#"[{"ifname":"lb-ext","xdp":{"mode":1,"prog":{"id":7,"name":"lb_xdp","tag":"ab"},
        "attached":[{"mode":1,"prog":{"id":7,"name":"lb_xdp"}}]}}]"#;
    assert_eq!(xdp_attachment(one), Some(("native", "lb_xdp".into())));
    let multi = r#"[{"ifname":"x","xdp":{"mode":4,"attached":[{"mode":2,"prog":{"id":9,"name":"other"}}]}}]"#;
    assert_eq!(xdp_attachment(multi), Some(("generic", "other".into())));
    assert_eq!(xdp_attachment(r#"[{"ifname":"lo","mtu":65536}]"#), None);
    assert_eq!(xdp_attachment("not json"), None);
}

const ACL: &str = "\
agent: { interfaces: [lo] }
snat: { addresses: [10.0.0.9] }
listeners:
  - { name: open, protocol: tcp, vip: 10.1.0.1, port: 80, pool: p }
  - name: guarded
    protocol: tcp
    vip: 10.1.0.1
    port: 81
    pool: p
    acl: { allow: [10.0.0.0/8], deny: [10.6.6.0/24] }
pools:
  - { name: p, backends: [{ address: 10.0.0.1, port: 80 }] }
";

#[test]
fn the_acl_verdict_names_the_rule_and_the_fix() {
    let cfg = parse("lb.yaml", ACL, &Host::default()).unwrap();
    let verdict = |listener, client: &str| {
        acl_verdict(&cfg, listener, client.parse().unwrap())
            .unwrap()
            .to_string()
    };
    assert_eq!(
        verdict("open", "192.0.2.1"),
        "ok    client 192.0.2.1: admitted by listener `open`'s ACL"
    );
    assert_eq!(
        verdict("guarded", "10.6.6.7"),
        "FAIL  client 10.6.6.7: denied by listener `guarded`'s acl.deny 10.6.6.0/24 — fix: \
         remove 10.6.6.0/24 from listeners[1].acl.deny (deny wins over allow)"
    );
    assert_eq!(
        verdict("guarded", "192.0.2.1"),
        "FAIL  client 192.0.2.1: not in listener `guarded`'s acl.allow (10.0.0.0/8) — fix: add \
         192.0.2.1 (or its network) to listeners[1].acl.allow"
    );
    assert!(verdict("guarded", "10.2.3.4").starts_with("ok "));
    assert!(
        acl_verdict(&cfg, "open", "fd00::1".parse().unwrap()).is_none(),
        "other family"
    );
    assert!(acl_verdict(&cfg, "nope", "10.2.3.4".parse().unwrap()).is_none());
}

#[test]
fn recent_5xx_are_counted_by_code_with_the_last_upstream() {
    let now = humantime::parse_rfc3339("2026-05-01T12:00:00Z").unwrap();
    let line = |time: &str, listener: &str, status: u16, upstream: &str| {
        format!(
            "{{\"time\":\"{time}\",\"listener\":\"{listener}\",\"status\":{status},\"upstream_addr\":\"{upstream}\"}}\n"
        )
    };
    let log = [
        line("2026-05-01T11:30:00.000Z", "site", 502, "10.0.0.1:80"),
        line("2026-05-01T11:50:00.000Z", "site", 502, "10.0.0.1:80"),
        line("2026-05-01T11:55:00.000Z", "site", 502, "10.0.0.2:80"),
        line("2026-05-01T11:56:00.000Z", "site", 503, "-"),
        line("2026-05-01T11:57:00.000Z", "site", 200, "10.0.0.1:80"),
        line("2026-05-01T11:58:00.000Z", "other", 500, "10.0.0.1:80"),
        "garbage\n".into(),
    ]
    .concat();
    let counted = count_5xx(&log, "site", now);
    assert_eq!(
        counted,
        BTreeMap::from([(502, (2, Some("10.0.0.2:80".into()))), (503, (1, None))]),
        "the 11:30 one is older than 15 minutes"
    );
    assert!(advice(502).contains("keep-alive"));
}

#[test]
fn pressure_and_drops_are_reported_from_the_status() {
    let mut s = Fixture::new().view(&Overrides::default()).status;
    let lines =
        |s: &Status| -> Vec<String> { pressure(s, None).iter().map(ToString::to_string).collect() };
    let before = lines(&s);
    assert!(
        before.contains(
            &"ok    snat 10.0.0.9: 6 ports in use, 4 of 100 towards the busiest backend (4%)"
                .to_string()
        ),
        "{before:#?}"
    );
    assert!(
        before
            .iter()
            .any(|l| l
                .starts_with("FAIL  datapath: 15 new flows dropped for want of a free SNAT port")),
        "{before:#?}"
    );
    // Seen twice a sweep apart: still rising is a problem, stopped is worth knowing.
    let mut later = s.clone();
    *later.packets.get_mut("drop_snat_exhausted").unwrap() += 3;
    let rising: Vec<String> = pressure(&later, Some(&s))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        rising.iter().any(|l| l.starts_with(
            "FAIL  datapath: 3 new flows dropped for want of a free SNAT port (drop_snat_exhausted) in the last second, 18 since the agent started"
        )),
        "{rising:#?}"
    );
    let stopped: Vec<String> = pressure(&s, Some(&s))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        stopped.iter().any(|l| l.starts_with(
            "info  datapath: 15 new flows dropped for want of a free SNAT port (drop_snat_exhausted) since the agent started; none now"
        )),
        "{stopped:#?}"
    );
    s.snat[0].busiest_backend_ports = 90;
    s.conntrack.tables[0].entries = 900_000;
    s.conntrack.tables[3].entries = 16_000;
    let after = lines(&s);
    assert!(
        after.iter().any(|l| l.starts_with("WARN  snat 10.0.0.9:")
            && l.contains("(90%) — fix: add SNAT addresses")),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|l| l.starts_with("WARN  conntrack ipv4: 900000 of 1048576 entries (86%)")),
        "{after:#?}"
    );
    assert!(
        after.iter().any(|l| l
            .starts_with("WARN  conntrack ipv6_handshake: 16000 of 16384 entries (98%)")
            && l.contains("SYN flood")),
        "{after:#?}"
    );
}

#[test]
fn a_backend_that_gets_packets_and_answers_none_is_flagged() {
    let traffic = |packets_in, packets_out| crate::admin::status::Traffic {
        packets_in,
        packets_out,
        new_flows: packets_in,
        ..Default::default()
    };
    let said =
        |protocol, t| unanswered("backend web/10.0.0.1:80", protocol, &t).map(|f| f.to_string());
    let silent = said("tcp", traffic(300, 0)).unwrap();
    assert!(
        silent.starts_with("FAIL  backend web/10.0.0.1:80: got 300 packets of 300 flows through the LB and sent none back — fix: its route to the SNAT addresses"),
        "{silent}"
    );
    assert!(said("udp", traffic(300, 0)).unwrap().starts_with("WARN "));
    assert_eq!(said("tcp", traffic(300, 1)), None, "it answers");
    assert_eq!(said("tcp", traffic(2, 0)), None, "too early to tell");
}

#[test]
fn a_backend_the_l7_proxy_backs_off_from_is_a_warning() {
    let f = crate::admin::tests::Fixture::new();
    let mut b = f
        .view(&crate::overrides::Overrides::default())
        .status
        .backend("api", "10.0.0.3:81".parse().unwrap())
        .unwrap()
        .clone();
    assert!(
        backend_state("backend api/10.0.0.3:81", &b).is_none(),
        "serving, no back-off"
    );
    b.l7_backoff_s = Some(6.4);
    let said = backend_state("backend api/10.0.0.3:81", &b)
        .unwrap()
        .to_string();
    assert!(
        said.starts_with("WARN  backend api/10.0.0.3:81: a connect from the L7 proxy failed (refused or timed out): no new requests for 6 s more"),
        "{said}"
    );
}
