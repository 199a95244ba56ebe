//! `cargo xtask bench l7`: wrk against the agent's L7 proxy and against nginx configured the
//! same way (same backends, two workers pinned one per core, keep-alive both sides, the same
//! access-log fields as JSON lines, forwarded headers), in the same run, in a private network
//! namespace (loopback only): HTTP and HTTPS, keep-alive and a new connection per request.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use lb_tests::{netns::Children, nginx::ok_server, Agent, Netns};

use super::{wait_listening, wrk, Row, Wrk};

const BACKENDS: [u16; 2] = [18081, 18082];
const NGINX_HTTP: u16 = 18080;
const NGINX_HTTPS: u16 = 18443;
pub const AGENT_HTTP: u16 = 18090;
pub const AGENT_HTTPS: u16 = 18493;
const SECS: u32 = 6;
/// Runs of each side per mode, an even number so each side goes first as often; the best one
/// is kept.
const ROUNDS: usize = 4;

/// An ECDSA P-256 certificate for `localhost` and its key, made with openssl in `dir`.
pub fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join("l7.pem");
    let key = dir.join("l7.key");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !made.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&made.stderr));
    }
    Ok((cert, key))
}

/// The agent (`LB_AGENT_BIN`) in `ns` with its HTTP and HTTPS listeners (ports `AGENT_HTTP`,
/// `AGENT_HTTPS`; the certificate at `cert`) in front of the two nginx backends, all
/// listening when this returns.
pub fn agent_site(ns: &Netns, dir: &Path, cert: &Path, key: &Path) -> Result<(Children, Agent)> {
    let d = dir.display();
    let (cert, key) = (cert.display(), key.display());
    let pool: String = BACKENDS
        .iter()
        .map(|p| format!("      - {{ address: 127.0.0.1, port: {p} }}\n"))
        .collect();
    let config = format!(
        "agent:\n  interfaces: [lo]\n  xdp_mode: generic\nlisteners:
  - {{ name: web, protocol: http, vip: 127.0.0.1, port: {AGENT_HTTP}, pool: web, access_log: {d}/agent-access.log }}
  - {{ name: tls, protocol: https, vip: 127.0.0.1, port: {AGENT_HTTPS}, pool: web, access_log: {d}/agent-access.log,
      tls: {{ certificates: [{{ cert: {cert}, key: {key} }}] }} }}
pools:\n  - name: web\n    backends:\n{pool}"
    );
    let mut servers = Children(Vec::new());
    for p in BACKENDS {
        let name = format!("l7-be{p}");
        servers
            .0
            .push(ok_server(ns, dir, &name, &format!("127.0.0.1:{p}"), 1));
    }
    let agent = Agent::start(ns, &config);
    for p in BACKENDS.into_iter().chain([AGENT_HTTP, AGENT_HTTPS]) {
        wait_listening(ns, p)?;
    }
    Ok((servers, agent))
}

pub fn run(dir: &Path) -> Result<Vec<Row>> {
    let ns = Netns::new("bench-l7");
    let d = dir.display();
    let (cert_path, key_path) = self_signed(dir)?;
    let (cert, key) = (cert_path.display(), key_path.display());
    let upstream: String = BACKENDS
        .iter()
        .map(|p| format!("server 127.0.0.1:{p};"))
        .collect();
    std::fs::write(
        dir.join("l7-proxy.conf"),
        format!(
            "daemon off; worker_processes 2; worker_cpu_affinity auto; pid {d}/l7-proxy.pid; error_log {d}/l7-proxy.err;
events {{ worker_connections 4096; }}
http {{
  # The agent's access-log line, field for field (see lb-agent's proxy::log::FIELDS):
  # the same work per request on both sides.
  log_format lb escape=json '{{\"time\":\"$time_iso8601\",\"listener\":\"web\",\"client\":\"$remote_addr:$remote_port\",'
    '\"host\":\"$host\",\"method\":\"$request_method\",\"path\":\"$request_uri\",\"protocol\":\"$server_protocol\",'
    '\"status\":$status,\"bytes_in\":$request_length,\"bytes_out\":$body_bytes_sent,\"request_time\":\"$request_time\",'
    '\"upstream_addr\":\"$upstream_addr\",\"upstream_status\":\"$upstream_status\",'
    '\"upstream_connect_time\":\"$upstream_connect_time\",\"upstream_header_time\":\"$upstream_header_time\",'
    '\"upstream_response_time\":\"$upstream_response_time\",\"tcpinfo_rtt\":$tcpinfo_rtt}}';
  access_log {d}/nginx-access.log lb buffer=64k flush=1s;
  upstream web {{ {upstream} keepalive 256; }}
  server {{
    listen 127.0.0.1:{NGINX_HTTP};
    listen 127.0.0.1:{NGINX_HTTPS} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.3; ssl_session_cache shared:tls:10m;
    keepalive_timeout 15s; keepalive_requests 100;
    location / {{
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_connect_timeout 5s; proxy_read_timeout 60s;
    }}
  }}
}}
"
        ),
    )?;
    let (mut servers, _agent) = agent_site(&ns, dir, &cert_path, &key_path)?;
    let proxy = dir.join("l7-proxy.conf").display().to_string();
    servers
        .0
        .push(ns.spawn(&["nginx", "-c", &proxy, "-p", &d.to_string()]));
    for p in [NGINX_HTTP, NGINX_HTTPS] {
        wait_listening(&ns, p)?;
    }

    println!("== wrk -t2 -c64 -d{SECS}s, 2 nginx backends, keep-alive to them, access logs on; 2 cores shared by all");
    let modes = [
        ("HTTP keep-alive", "http", NGINX_HTTP, AGENT_HTTP, false),
        (
            "HTTP, new connection per request",
            "http",
            NGINX_HTTP,
            AGENT_HTTP,
            true,
        ),
        ("HTTPS keep-alive", "https", NGINX_HTTPS, AGENT_HTTPS, false),
        (
            "HTTPS, new TLS connection per request",
            "https",
            NGINX_HTTPS,
            AGENT_HTTPS,
            true,
        ),
    ];
    let mut rows = Vec::new();
    for (what, scheme, nginx, ours, close) in modes {
        let url = |port| format!("{scheme}://127.0.0.1:{port}/");
        // Warm both up (backend connections, caches), then measure each in turn, alternating
        // which goes first (nginx, agent, agent, nginx, ...), and keep each one's best run:
        // a busy moment on the shared cores, or the slower phases this VM goes through for
        // minutes at a time, then lowers neither side's figure alone.
        wrk(&ns, &url(ours), 2, close)?;
        wrk(&ns, &url(nginx), 2, close)?;
        // Each side's best run so far: [nginx, lb-agent].
        let mut best: [Option<Wrk>; 2] = [None, None];
        for round in 0..ROUNDS {
            for side in [round % 2, 1 - round % 2] {
                let (port, name) = [(nginx, "nginx"), (ours, "lb-agent")][side];
                let run = wrk(&ns, &url(port), SECS, close)?;
                // Both logs start each run empty: the page cache's writeback of hundreds of
                // megabytes of earlier lines would otherwise land on whichever side runs then.
                for log in ["agent-access.log", "nginx-access.log"] {
                    std::fs::File::create(dir.join(log))?;
                }
                println!(
                    "  {what}, run {}: {name:<8} {:>9.0} req/s p99 {:>6.2} ms",
                    round + 1,
                    run.rps,
                    run.p99_ms
                );
                if best[side].as_ref().is_none_or(|b| run.rps > b.rps) {
                    best[side] = Some(run);
                }
            }
        }
        let [Some(n), Some(a)] = best else {
            bail!("no l7 runs");
        };
        println!(
            "{what:<40} nginx {:>9.0} req/s p99 {:>6.2} ms   lb-agent {:>9.0} req/s p99 {:>6.2} ms",
            n.rps, n.p99_ms, a.rps, a.p99_ms
        );
        rows.push(Row {
            part: "l7",
            measure: format!("{what}: requests/s"),
            ours: a.rps,
            peer: "nginx".into(),
            theirs: Some(n.rps),
        });
        rows.push(Row {
            part: "l7",
            measure: format!("{what}: p99 latency, ms (lower is better)"),
            ours: a.p99_ms,
            peer: "nginx".into(),
            theirs: Some(n.p99_ms),
        });
    }
    Ok(rows)
}
