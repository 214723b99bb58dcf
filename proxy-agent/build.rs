//! Builds the `proxy-ebpf` kernel object for the bpf target (nightly + bpf-linker, both installed
//! by `cargo xtask setup`) and leaves it in OUT_DIR, where `src/datapath/` embeds it with
//! `include_bytes_aligned!`. This keeps `cargo build` at the root a one-step build.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["metadata", "--format-version=1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("parse cargo metadata")?;
    let manifest = metadata["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "proxy-ebpf"))
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or_else(|| anyhow!("proxy-ebpf package not found in cargo metadata"))?;
    let root_dir = std::path::Path::new(manifest)
        .parent()
        .and_then(|p| p.to_str())
        .ok_or_else(|| anyhow!("bad manifest path {manifest}"))?
        .to_owned();
    // aya-build forwards every stderr line of the nested cargo as a `cargo:warning`, which buries
    // real warnings under "Compiling ..." lines; quiet still shows compile errors.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src and bpf-linker)",
    )
}
