//! Builds the XDP program (nightly, bpfel-unknown-none) into OUT_DIR so the agent embeds exactly
//! the program its sources describe. `cargo xtask setup` installs what this needs.
//!
//! The package's binaries: `lb-ebpf` (the XDP program) and `lb-reuseport` (the L7 workers'
//! connection selector). With `AYA_BUILD_SKIP=1` (docs, clippy, config-only unit tests) empty
//! objects are written instead, and loading them reports that they were not built.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        for name in ["lb-ebpf", "lb-reuseport"] {
            let object = format!("{out}/{name}");
            std::fs::write(&object, b"").with_context(|| format!("writing {object}"))?;
        }
    }
    let root = format!("{dir}/../lb-ebpf");
    let pkg = aya_build::Package {
        name: "lb-ebpf",
        root_dir: &root,
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
}
