//! The release agent, built with profile-guided optimisation: an instrumented build serves the
//! L7 bench's site (HTTP and HTTPS, keep-alive and a connection per request, HTTP/2) for about
//! 20 s in a network namespace, and the release build is laid out and inlined by what that
//! run executed. Under callgrind, a proxied request on a new connection took 17% fewer
//! instructions in the L7 workers (27.2k against 32.8k) and 29% fewer instruction-cache
//! misses: the workers' code (tokio, hyper, rustls, the proxy) outgrows the L1 instruction
//! cache, nginx's does not.
//!
//! Training needs root (namespaces), nginx, wrk and h2load (`cargo xtask setup`); without
//! them the agent is built with the profile an earlier training left, if any, and if the build
//! with a profile fails (an LLVM whose profile format rustc's does not read), without one;
//! each time saying why.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};
use lb_tests::Netns;

use crate::{
    bench::{self, l7},
    cargo, root, setup, status,
};

/// Builds target/release/lb-agent, with a profile when it can.
pub fn build() -> Result<PathBuf> {
    let profile = profile_path();
    let dir = root().join("target/pgo");
    match profile_of(&dir, &profile) {
        Ok(()) => with_fallback(Some(&profile)),
        Err(e) => {
            eprintln!("pgo: not trained ({e:#}); building with an earlier profile if any");
            build_as_before()
        }
    }?;
    Ok(root().join("target/release/lb-agent"))
}

/// Builds target/release/lb-agent with the profile an earlier `build` left, if any, without
/// training: the same flags as that build, so nothing is rebuilt for nothing.
pub fn build_as_before() -> Result<()> {
    let profile = profile_path();
    with_fallback(profile.exists().then_some(profile.as_path()))
}

/// Gives `c` (a cargo build in target/release, e.g. a benchmark's) the flags the agent's
/// build with the profile had, if there is a profile: other flags would make cargo rebuild
/// every dependency there, and the agent's next build rebuild them again.
pub fn same_flags(c: &mut Command) {
    let profile = profile_path();
    if profile.exists() {
        c.env("RUSTFLAGS", use_flags(&profile));
    }
}

fn profile_path() -> PathBuf {
    root().join("target/pgo/lb-agent.profdata")
}

fn use_flags(profile: &Path) -> String {
    format!("-Cprofile-use={}", profile.display())
}

fn with_fallback(profile: Option<&Path>) -> Result<()> {
    release(profile).or_else(|e| match profile {
        Some(_) => {
            eprintln!("pgo: the build with the profile failed ({e:#}); building without");
            release(None)
        }
        None => Err(e),
    })
}

/// The release build, optimised with `profile` if given.
fn release(profile: Option<&Path>) -> Result<()> {
    let mut c = cargo();
    if let Some(p) = profile {
        c.env("RUSTFLAGS", use_flags(p));
    }
    c.args(["build", "--release", "-p", "lb-agent"]);
    status(c)
}

/// Builds the instrumented agent in `dir` and, unless `profile` is newer than it, trains it
/// and merges what it recorded into `profile`.
fn profile_of(dir: &Path, profile: &Path) -> Result<()> {
    setup::require_root()?;
    let raw = dir.join("raw");
    let mut c = cargo();
    c.env("CARGO_TARGET_DIR", dir)
        .env("RUSTFLAGS", format!("-Cprofile-generate={}", raw.display()))
        .args(["build", "--release", "-p", "lb-agent"]);
    status(c)?;
    let instrumented = dir.join("release/lb-agent");
    if modified(profile).is_some_and(|p| modified(&instrumented).is_some_and(|i| p > i)) {
        eprintln!("pgo: {} is up to date", profile.display());
        return Ok(());
    }
    // The build scripts ran instrumented too: only the agent's run counts.
    let _ = std::fs::remove_dir_all(&raw);
    train(&instrumented)?;
    let mut merge = Command::new("llvm-profdata");
    merge
        .env("PATH", setup::path())
        .arg("merge")
        .arg("-o")
        .arg(profile)
        .arg(&raw);
    status(merge)
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Serves the L7 workload with the agent at `agent`; it writes its profile when it exits.
fn train(agent: &Path) -> Result<()> {
    eprintln!("pgo: training {} (about 20 s)", agent.display());
    std::env::set_var("LB_AGENT_BIN", agent);
    let work = std::env::temp_dir().join(format!("lb-pgo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let trained = (|| {
        let ns = Netns::new("pgo");
        let (cert, key) = l7::self_signed(&work)?;
        let (_servers, agent) = l7::agent_site(&ns, &work, &cert, &key)?;
        for (scheme, port) in [("http", l7::AGENT_HTTP), ("https", l7::AGENT_HTTPS)] {
            let url = format!("{scheme}://127.0.0.1:{port}/");
            for close in [false, true] {
                bench::wrk(&ns, &url, 3, close)?;
            }
            // HTTP/2: ALPN over TLS, prior knowledge over plain TCP.
            let h2 = ns.output(&["h2load", "-n", "20000", "-c", "8", "-m", "8", &url]);
            if !h2.status.success() {
                bail!("h2load: {}", String::from_utf8_lossy(&h2.stderr));
            }
        }
        agent.stop();
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    trained.context("training")
}
