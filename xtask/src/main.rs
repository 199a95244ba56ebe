//! `cargo xtask setup | build-ebpf | build | demo | test | bench`: what cargo alone cannot do
//! (install the eBPF toolchain pieces, run as root in network namespaces).

mod bench;
mod pgo;
mod setup;

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks for the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, LLVM 22, bpf-linker, test tools. Idempotent.
    Setup,
    /// Build the XDP object alone (target/bpfel-unknown-none/release/lb-ebpf).
    BuildEbpf,
    /// Build the XDP object and the release agent (target/release/lb-agent), optimised with
    /// a profile of its L7 proxy at work (as root; see xtask/src/pgo.rs).
    Build,
    /// Build, create the demo topology in namespaces, send real connections through the LB,
    /// print which backend answered each and the agent's counters, tear everything down.
    Demo {
        /// Connections to open.
        #[arg(long, default_value_t = 30)]
        connections: usize,
    },
    /// Benchmarks, each against a peer measured in the same run (root); all of them also
    /// write BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        which: Option<bench::Part>,
    },
    /// Every test: unit tests, BPF program-test-run fixtures, netns end-to-end tests (root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(true),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => {
            setup::run(false)?;
            println!("{}", pgo::build()?.display());
            Ok(())
        }
        Cmd::Demo { connections } => demo(connections),
        Cmd::Test { args } => test(&args),
        Cmd::Bench { which } => bench(which),
    }
}

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}

/// `cargo` with the toolchain pieces on PATH.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).env("PATH", setup::path());
    c
}

fn status(mut c: Command) -> Result<()> {
    let s = c.status().with_context(|| format!("running {c:?}"))?;
    if !s.success() {
        bail!("{c:?} failed: {s}");
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    setup::run(false)?;
    let mut c = Command::new("rustup");
    c.current_dir(root().join("lb-ebpf"))
        .env("PATH", setup::path());
    // The same flags aya-build uses for the object the agent embeds (BTF for the loader).
    c.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    c.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    status(c)?;
    println!(
        "{}",
        root()
            .join("target/bpfel-unknown-none/release/lb-ebpf")
            .display()
    );
    Ok(())
}

fn demo(connections: usize) -> Result<()> {
    // No training (see `pgo`): the demo shows the datapath, not the proxy's speed, and a
    // first run on a fresh machine is minutes shorter.
    setup::run(false)?;
    pgo::build_as_before()?;
    setup::require_root()?;
    let config =
        std::fs::read_to_string(root().join("examples/demo.yaml")).context("examples/demo.yaml")?;
    std::env::set_var("LB_AGENT_BIN", root().join("target/release/lb-agent"));

    println!("== topology: client ── lb (XDP on lb-ext, lb-int) ── switch ── 3 backends");
    let topo = lb_tests::Topology::new(3);
    let _servers = topo.serve_names(8080);
    println!("== starting lb-agent with examples/demo.yaml");
    let agent = topo.start_agent(&config);
    let vip = "10.91.0.100:80".parse()?;
    println!("== {connections} TCP connections from the client (10.91.0.2) to the VIP {vip}");
    let mut per = BTreeMap::new();
    for (i, answer) in topo.connect_many(vip, connections).into_iter().enumerate() {
        match answer {
            Ok(line) => {
                let (name, peer) = line.split_once(' ').unwrap_or((&line, "?"));
                println!(
                    "  connection {:>3}: answered by {name} (which saw the client as {peer})",
                    i + 1
                );
                *per.entry(name.to_string()).or_insert(0) += 1;
            }
            Err(e) => println!("  connection {:>3}: FAILED: {e}", i + 1),
        }
    }
    println!("== per backend: {per:?}");
    println!("== stopping lb-agent; its counters:");
    print!("{}", agent.stop_cleanly());
    println!("== tearing down the namespaces");
    if per.values().sum::<usize>() != connections {
        bail!("some connections failed");
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::run(false)?;
    setup::require_root()?;
    // The e2e tests run the agent binary; build it first (debug, like the tests).
    let mut c = cargo();
    c.args(["build", "-p", "lb-agent"]);
    status(c)?;
    let mut c = cargo();
    c.env("LB_AGENT_BIN", root().join("target/debug/lb-agent"));
    c.args(["test", "--workspace", "--exclude", "lb-ebpf"])
        .args(args);
    status(c)
}

fn bench(which: Option<bench::Part>) -> Result<()> {
    setup::run(false)?;
    setup::require_root()?;
    let agent = pgo::build()?;
    bench::run(which, &agent)
}
