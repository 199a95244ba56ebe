//! `cargo xtask bench l7`: wrk against the agent's L7 proxy and against nginx configured the
//! same way (same backends, two workers, keep-alive both sides, access log on, forwarded
//! headers), in the same run, in a private network namespace (loopback only).

use std::{
    path::Path,
    process::{Child, Command},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const BACKENDS: [u16; 2] = [18081, 18082];
const NGINX_PROXY: u16 = 18080;
const AGENT_PROXY: u16 = 18090;

/// Kills its processes and removes the namespace and files, even on failure.
struct Bench {
    ns: String,
    dir: std::path::PathBuf,
    children: Vec<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = terminate(c.id());
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, so the agent detaches its program and nginx exits cleanly.
fn terminate(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill").arg(pid.to_string()).status()
}

impl Bench {
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(args);
        c
    }

    fn spawn(&mut self, args: &[&str], log: &str) -> Result<()> {
        let out = std::fs::File::create(self.dir.join(log))?;
        let child = self
            .exec(args)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {args:?}"))?;
        self.children.push(child);
        Ok(())
    }

    fn wait_for(&self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok = self
                .exec(&[
                    "curl",
                    "-sf",
                    "-o",
                    "/dev/null",
                    &format!("http://127.0.0.1:{port}/"),
                ])
                .status()?
                .success();
            if ok {
                return Ok(());
            }
            sleep(Duration::from_millis(200));
        }
        bail!(
            "nothing answers on port {port} (logs in {})",
            self.dir.display()
        )
    }

    /// (requests/s, p99 ms)
    fn wrk(&self, port: u16) -> Result<(f64, f64)> {
        let out = self
            .exec(&[
                "wrk",
                "-t2",
                "-c64",
                "-d10s",
                "--latency",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
        let p99 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("99%"))
            .and_then(|v| millis(v.trim()))
            .with_context(|| format!("no 99% latency in wrk's output:\n{text}"))?;
        if text.contains("Non-2xx") || text.contains("Socket errors") {
            println!("{text}");
        }
        Ok((rps, p99))
    }
}

/// wrk's `1.23ms` / `456.00us` / `1.02s` in milliseconds.
fn millis(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

pub fn l7(agent: &Path) -> Result<()> {
    let ns = format!("lb-bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("ip").args(["netns", "add", &ns]).status()?;
    if !status.success() {
        bail!("ip netns add {ns} failed");
    }
    let mut b = Bench {
        ns,
        dir: dir.clone(),
        children: Vec::new(),
    };
    b.exec(&["ip", "link", "set", "lo", "up"]).status()?;
    let d = dir.display();

    let backends: String = BACKENDS
        .iter()
        .map(|p| format!("server {{ listen 127.0.0.1:{p}; access_log off; location / {{ return 200 \"ok {p}\\n\"; }} }}\n"))
        .collect();
    std::fs::write(
        dir.join("backends.conf"),
        format!("daemon off; worker_processes 1; pid {d}/backends.pid; error_log {d}/backends.err;\nevents {{ worker_connections 4096; }}\nhttp {{ keepalive_requests 100000; {backends} }}\n"),
    )?;
    let upstream: String = BACKENDS
        .iter()
        .map(|p| format!("server 127.0.0.1:{p};"))
        .collect();
    std::fs::write(
        dir.join("proxy.conf"),
        format!(
            "daemon off; worker_processes 2; pid {d}/proxy.pid; error_log {d}/proxy.err;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/nginx-access.log combined buffer=64k flush=1s;
  upstream web {{ {upstream} keepalive 256; }}
  server {{
    listen 127.0.0.1:{NGINX_PROXY};
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
    let pool: String = BACKENDS
        .iter()
        .map(|p| format!("      - {{ address: 127.0.0.1, port: {p} }}\n"))
        .collect();
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "agent:\n  interfaces: [lo]\n  xdp_mode: generic\nlisteners:\n  - {{ name: web, protocol: http, vip: 127.0.0.1, port: {AGENT_PROXY}, pool: web, access_log: {d}/agent-access.log }}\npools:\n  - name: web\n    backends:\n{pool}"
        ),
    )?;

    let conf = |f: &str| dir.join(f).display().to_string();
    b.spawn(
        &["nginx", "-c", &conf("backends.conf"), "-p", &d.to_string()],
        "backends.out",
    )?;
    b.spawn(
        &["nginx", "-c", &conf("proxy.conf"), "-p", &d.to_string()],
        "proxy.out",
    )?;
    let agent = agent.display().to_string();
    b.spawn(
        &[&agent, "run", "--config", &conf("agent.yaml")],
        "agent.out",
    )?;
    for p in BACKENDS {
        b.wait_for(p)?;
    }
    b.wait_for(NGINX_PROXY)?;
    b.wait_for(AGENT_PROXY)?;

    println!("== wrk -t2 -c64 -d10s, 2 backends (nginx), keep-alive, access logs on; 2 cores shared by all");
    // Warm both up (backend connections, caches), then measure each in turn.
    b.wrk(AGENT_PROXY)?;
    b.wrk(NGINX_PROXY)?;
    let (n_rps, n_p99) = b.wrk(NGINX_PROXY)?;
    let (a_rps, a_p99) = b.wrk(AGENT_PROXY)?;
    println!("nginx    : {n_rps:>10.0} req/s   p99 {n_p99:>7.2} ms");
    println!("lb-agent : {a_rps:>10.0} req/s   p99 {a_p99:>7.2} ms");
    println!(
        "ratio    : {:>10.2}x req/s   p99 {:>7.2}x  (lb-agent / nginx)",
        a_rps / n_rps,
        a_p99 / n_p99
    );
    Ok(())
}
