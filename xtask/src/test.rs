//! `cargo xtask test`: the one test command of the README and of CI.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run_step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{name} failed ({st})");
    }
    Ok(())
}

/// Builds every binary the lab needs (twill-cni, twill-agent with the embedded eBPF object,
/// labtool).
pub fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run_step("build", &mut cmd)
}

/// Release builds of the two binaries the node image carries.
pub fn build_release_binaries() -> Result<()> {
    run_step(
        "build (release)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "twill-agent",
            "-p",
            "twill-cni",
            "--bins",
        ]),
    )
}

fn have_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(filter: Option<&str>, no_lint: bool) -> Result<()> {
    crate::setup::run()?;
    if !no_lint {
        run_step("fmt", cargo().args(["fmt", "--all", "--check"]))?;
        run_step(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    build(false)?;
    // Leftovers of a killed earlier run would only confuse. Labs whose owning process still runs
    // (a parallel `xtask test` in another checkout) are left alone.
    for r in twill_lab::clean_leftovers()? {
        eprintln!("removed leftover {r}");
    }
    let mut cmd = cargo();
    if have_nextest() {
        cmd.args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--failure-output",
            "final",
        ]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run_step("tests", &mut cmd)
}
