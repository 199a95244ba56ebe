//! Rebuild the program when bpf-linker changes (it is the linker, so cargo cannot see it).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
