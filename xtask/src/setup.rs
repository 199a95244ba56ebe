//! Installs what building and testing need, only where missing:
//! - the nightly toolchain's `rust-src` (the XDP program is built with `-Z build-std=core`);
//! - Debian's LLVM 22 (bpf-linker links against it; nightly's LLVM is 22 too);
//! - `bpf-linker` 0.13.0 built against LLVM 22;
//! - the tools the tests drive (iproute2, ethtool; nginx, socat and curl for the fault
//!   and abuse suite) and the benchmarks' peers and load generators (wrk, iperf3, haproxy,
//!   nftables; openssl makes the L7 bench's certificate and the L7 tests' RSA and
//!   traditionally encoded keys; h2load drives HTTP/2 when the release agent is trained for
//!   its profile).

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("nginx", "/usr/sbin/nginx"),
    ("socat", "/usr/bin/socat"),
    ("curl", "/usr/bin/curl"),
    ("wrk", "/usr/bin/wrk"),
    ("iperf3", "/usr/bin/iperf3"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("nftables", "/usr/sbin/nft"),
    ("openssl", "/usr/bin/openssl"),
    ("nghttp2-client", "/usr/bin/h2load"),
];

/// PATH with LLVM 22 and cargo's bin directory first.
pub fn path() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!(
        "{LLVM_BIN}:{home}/.cargo/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn ok(cmd: &mut Command) -> bool {
    cmd.env("PATH", path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.env("PATH", path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn exec(cmd: &mut Command) -> Result<()> {
    cmd.env("PATH", path());
    eprintln!("setup: {cmd:?}");
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

pub fn require_root() -> Result<()> {
    if !nix_is_root() {
        bail!("this needs root (network namespaces, XDP)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

/// Installs whatever is missing; `verbose` also reports what is already there.
pub fn run(verbose: bool) -> Result<()> {
    let say = |m: &str| {
        if verbose {
            eprintln!("setup: {m}");
        }
    };

    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if components.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly rust-src: present");
    } else {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        say("LLVM 22 and the test and benchmark tools: present");
    } else {
        require_root().context("installing Debian packages")?;
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let linker = output(Command::new("bpf-linker").arg("--version"));
    if linker.contains(BPF_LINKER_VERSION) {
        say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        exec(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }
    Ok(())
}
