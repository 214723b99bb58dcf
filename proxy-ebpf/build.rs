//! Rebuild when `bpf-linker` changes: cargo cannot express a dependency on a linker binary
//! (see aya-template's ebpf build.rs for the same workaround).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
