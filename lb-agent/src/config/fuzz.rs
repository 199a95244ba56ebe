//! Config fuzzing (proptest): random damage to valid files, and random YAML built from the
//! config's own vocabulary. The loader must never panic, and every rejection must be one line
//! of the form `file:line:column: message`.

use proptest::prelude::*;

use super::{tests::host, *};

const VALID: &str = "\
agent:
  interfaces: [lb-ext, lb-int]
  xdp_mode: auto
snat:
  addresses: [10.91.2.1]
  ports: 20000-60000
listeners:
  - name: web
    protocol: tcp
    vip: 10.91.0.100
    port: 80
    pool: web
    scheduler: wlc
    idle_timeout: 15m
    acl: { allow: [10.0.0.0/8], deny: [10.6.0.0/16] }
  - { name: site, protocol: http, vip: 10.91.0.100, port: 8080, pool: web, timeouts: { idle: 15s } }
pools:
  - name: web
    backends:
      - { address: 10.91.2.11, port: 8080, weight: 1 }
      - { address: 10.91.2.12, port: 8080, weight: 0 }
";

/// Fragments that matter to YAML or to the config.
const TOKENS: &[&str] = &[
    ":",
    "- ",
    "  ",
    "\n",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "\"",
    "#",
    "&a",
    "*a",
    "!!str",
    "~",
    "null",
    "65536",
    "-1",
    "0",
    "1e9",
    "80",
    "tcp",
    "udp",
    "http",
    "https",
    "pool",
    "port",
    "vip",
    "name",
    "backends",
    "weight",
    "10.91.0.100",
    "::1",
    "fd00::/8",
    "20000-10000",
    "15m",
    "0s",
    "listeners",
    "pools",
    "agent",
    "snat",
    "acl",
    "scheduler",
    "maglev",
    "client_ip",
    "toa",
    "\u{feff}",
    "\t",
    "é",
];

/// Parses and checks the contract: Ok, or a one-line `lb.yaml:L:C: message` error.
fn check(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse("lb.yaml", text, &host()) {
        let msg = e.to_string();
        let mut parts = msg.splitn(4, ':');
        let (file, line, col, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        prop_assert_eq!(file, Some("lb.yaml"), "{}", msg);
        prop_assert!(
            line.is_some_and(|l| l.parse::<usize>().is_ok_and(|l| l >= 1)),
            "{}",
            msg
        );
        prop_assert!(
            col.is_some_and(|c| c.parse::<usize>().is_ok_and(|c| c >= 1)),
            "{}",
            msg
        );
        prop_assert!(rest.is_some_and(|r| r.len() > 1), "{}", msg);
        prop_assert!(!msg.contains('\n'), "one line: {}", msg);
    }
    Ok(())
}

/// An edit: at a byte position, delete some bytes and insert some tokens.
fn edit() -> impl Strategy<Value = (usize, usize, Vec<usize>)> {
    (
        0..VALID.len(),
        0..8usize,
        prop::collection::vec(0..TOKENS.len(), 0..4),
    )
}

fn apply(text: &str, (at, del, ins): &(usize, usize, Vec<usize>)) -> String {
    let bytes = text.as_bytes();
    let at = (*at).min(bytes.len());
    let end = (at + del).min(bytes.len());
    let mut out = bytes[..at].to_vec();
    for &t in ins {
        out.extend_from_slice(TOKENS[t].as_bytes());
    }
    out.extend_from_slice(&bytes[end..]);
    // Invalid UTF-8 cannot come from a file read as text; keep what the loader can be given.
    String::from_utf8_lossy(&out).into_owned()
}

proptest! {
    // A fixed seed keeps CI deterministic; no regression files written into the tree.
    #![proptest_config(ProptestConfig {
        cases: 3000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x4c42_5f46_555a),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn damaged_configs_never_panic_and_errors_name_a_position(edits in prop::collection::vec(edit(), 1..4)) {
        let mut text = VALID.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        check(&text)?;
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(0..TOKENS.len(), 0..60)) {
        let text: String = tokens.iter().map(|&t| TOKENS[t]).collect();
        check(&text)?;
    }
}

#[test]
fn the_fuzz_seed_is_valid() {
    parse("lb.yaml", VALID, &host()).unwrap();
}
