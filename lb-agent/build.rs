//! Builds the XDP program (nightly, bpfel-unknown-none) into OUT_DIR so the agent embeds exactly
//! the program its sources describe. `cargo xtask setup` installs what this needs.
//!
//! With `AYA_BUILD_SKIP=1` (docs, clippy, config-only unit tests) an empty object is written
//! instead and `Dataplane::load` reports that the program was not built.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let object = format!("{out}/lb-ebpf");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        std::fs::write(&object, b"").with_context(|| format!("writing {object}"))?;
    }
    let root = format!("{dir}/../lb-ebpf");
    let pkg = aya_build::Package {
        name: "lb-ebpf",
        root_dir: &root,
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
}
