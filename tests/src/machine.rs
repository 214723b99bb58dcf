//! What the lab needs from the machine: root, cgroup2, bpffs, tools on PATH, the workspace's
//! binaries and the cache directory.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{BPFFS_ROOT, run_cmd};

/// Path of a workspace binary (`target/<profile>/<name>`). Build first (`cargo xtask test` does).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TWILL_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // Integration tests run from target/<profile>/deps/; binaries live one level up.
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
    {
        for dir in [deps, deps.parent().unwrap_or(deps)] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug").join(name)
}

/// Whether the lab can run here (root, cgroup2, `ip`). Under `CI=true` tests must fail, not
/// skip, when this is false: use [`require`].
pub fn available() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, cgroups, bpffs)");
    }
    cgroup2_mount()?;
    which("ip")?;
    Ok(())
}

pub(crate) fn which(prog: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{prog}` not found on PATH (run `cargo xtask setup`)"))
}

/// The cgroup-v2 mount point, read from /proc/self/mountinfo (never hard-coded: it is
/// /sys/fs/cgroup/unified on hybrid hosts and /sys/fs/cgroup on most Kubernetes nodes).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted"))
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    })
}

/// Mounts bpffs at /sys/fs/bpf when missing (a fresh machine has none).
pub fn ensure_bpffs() -> Result<()> {
    if !bpffs_mounted() {
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]))
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    Ok(())
}

/// The machine's cache directory for Twill (`$XDG_CACHE_HOME/twill`, else `~/.cache/twill`),
/// where `cargo xtask setup` keeps its LLVM links and the lab its built images.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("twill")
}

/// A fresh uniquely named directory under `parent` (pid + random suffix), for work that is
/// renamed into place when done so concurrent builders never share one.
pub(crate) fn scratch_dir(parent: &Path, prefix: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{prefix}-{}-{}", std::process::id(), random_id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub(crate) fn random_id() -> String {
    let mut buf = [0u8; 3];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
