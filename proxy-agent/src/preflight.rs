//! Start-up checks of `twill-agent run`: refuse to start, with a message that says what to fix,
//! when the agent could only half work. Mounts bpffs when it is missing, as Cilium
//! does (`pkg/bpf/bpffs_linux.go`).
use std::path::{Path, PathBuf};

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); Twill's socket load balancing needs cgroup v2: mount it (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup-root"
    )]
    NoCgroup2,
    #[error(
        "--cgroup-root {0} is not a cgroup v2 directory; pass a directory of the cgroup2 mount"
    )]
    NotCgroup2(PathBuf),
    #[error("--cgroup-root {path}: cannot stat")]
    CgroupStat {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "--bpffs-dir {0} is not on a bpf filesystem and it is not under /sys/fs/bpf (which the agent would mount); mount one: mount -t bpf bpf <dir>"
    )]
    NotBpffs(PathBuf),
    #[error(
        "mounting bpffs at /sys/fs/bpf failed; mount it on the host (mount -t bpf bpf /sys/fs/bpf) or give the agent CAP_SYS_ADMIN and a host /sys/fs/bpf mount"
    )]
    MountBpffs(#[source] nix::Error),
    #[error(
        "missing capabilities: {0}; run the agent as root or grant them (DaemonSet securityContext.capabilities.add)"
    )]
    Capabilities(String),
    #[error(
        "--{flag} {path} cannot be created or written: the agent keeps its {what} there; mount it from the host read-write (DaemonSet hostPath volume)"
    )]
    NotWritable {
        flag: &'static str,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw,...`
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        before
            .split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape_mount_path(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let bytes = p.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8)
        {
            out.push(char::from(v));
            i += 4;
            continue;
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

/// The cgroup2 mount of this machine.
pub fn discover_cgroup2() -> Result<PathBuf, PreflightError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| PreflightError::Read {
        path: path.to_owned(),
        source,
    })?;
    cgroup2_mount_from(&text).ok_or(PreflightError::NoCgroup2)
}

fn fs_magic(path: &Path) -> nix::Result<i64> {
    let st = nix::sys::statfs::statfs(path)?;
    // `f_type` is `__fsword_t`: i64 on 64-bit glibc, other widths elsewhere.
    #[allow(
        clippy::useless_conversion,
        reason = "the conversion is needed where __fsword_t is not i64"
    )]
    Ok(i64::from(st.filesystem_type().0))
}

/// Checks that `cgroup` is a cgroup v2 directory.
pub fn check_cgroup(cgroup: &Path) -> Result<(), PreflightError> {
    let magic = fs_magic(cgroup).map_err(|source| PreflightError::CgroupStat {
        path: cgroup.to_owned(),
        source,
    })?;
    if magic == CGROUP2_MAGIC {
        Ok(())
    } else {
        Err(PreflightError::NotCgroup2(cgroup.to_owned()))
    }
}

/// Makes sure `bpffs_dir` lives on bpffs, mounting `/sys/fs/bpf` when it is missing.
pub fn ensure_bpffs(bpffs_dir: &Path) -> Result<(), PreflightError> {
    let on_bpffs = |p: &Path| {
        p.ancestors()
            .find(|a| a.exists())
            .and_then(|a| fs_magic(a).ok())
            == Some(BPF_FS_MAGIC)
    };
    if on_bpffs(bpffs_dir) {
        return Ok(());
    }
    if !bpffs_dir.starts_with(BPFFS_ROOT) {
        return Err(PreflightError::NotBpffs(bpffs_dir.to_owned()));
    }
    log::info!("bpffs is not mounted at {BPFFS_ROOT}: mounting it");
    std::fs::create_dir_all(BPFFS_ROOT).map_err(|source| PreflightError::Read {
        path: BPFFS_ROOT.into(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(PreflightError::MountBpffs)?;
    if on_bpffs(bpffs_dir) {
        Ok(())
    } else {
        Err(PreflightError::NotBpffs(bpffs_dir.to_owned()))
    }
}

/// Missing capability names given the `CapEff:` hex mask of /proc/self/status.
pub fn missing_caps(cap_eff: u64) -> Vec<&'static str> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Kernels before 5.8 only know CAP_SYS_ADMIN for BPF.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    missing
}

/// `CapEff` of a /proc/<pid>/status text.
pub fn cap_eff_from(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Checks the effective capabilities of this process.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let path = Path::new("/proc/self/status");
    let text = std::fs::read_to_string(path).map_err(|source| PreflightError::Read {
        path: path.to_owned(),
        source,
    })?;
    let missing = missing_caps(cap_eff_from(&text).unwrap_or(0));
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities(missing.join(", ")))
    }
}

/// All checks of `run`; returns the cgroup root to attach to.
pub fn run_checks(
    cgroup_root: Option<&Path>,
    bpffs_dir: &Path,
    cni_conf_dir: &Path,
) -> Result<PathBuf, PreflightError> {
    check_capabilities()?;
    let cgroup = match cgroup_root {
        Some(p) => p.to_owned(),
        None => discover_cgroup2()?,
    };
    check_cgroup(&cgroup)?;
    ensure_bpffs(bpffs_dir)?;
    // Without a writable CNI config directory the agent would run but the node would never get
    // pod networking (the kubelet reports NetworkNotReady until a config appears).
    ensure_writable_dir(cni_conf_dir, "cni-conf-dir", "CNI network config")?;
    Ok(cgroup)
}

/// Creates `dir` if missing and checks that a file can be created in it (the real test of a
/// read-only mount, which permission bits do not show to root).
fn ensure_writable_dir(
    dir: &Path,
    flag: &'static str,
    what: &'static str,
) -> Result<(), PreflightError> {
    let err = |source| PreflightError::NotWritable {
        flag,
        what,
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".twill-preflight-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_conf_dir_is_created_and_must_be_writable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net.d");
        ensure_writable_dir(&dir, "cni-conf-dir", "CNI network config").unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe left behind"
        );
        // A path under a regular file can never be a directory.
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = ensure_writable_dir(&file.join("net.d"), "cni-conf-dir", "CNI network config")
            .unwrap_err();
        assert!(e.to_string().contains("--cni-conf-dir"), "{e}");
    }

    #[test]
    fn finds_the_cgroup2_mount_in_hybrid_and_unified_layouts() {
        let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n\
                      27 25 0:25 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            cgroup2_mount_from(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_from("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
        let escaped = "30 23 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(escaped),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn capabilities() {
        assert!(missing_caps(u64::MAX).is_empty());
        assert_eq!(missing_caps(0), vec!["CAP_NET_ADMIN", "CAP_BPF"]);
        assert!(missing_caps((1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)).is_empty());
        assert_eq!(
            cap_eff_from("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x01ff_ffff_ffff)
        );
    }

    #[test]
    fn a_tmp_dir_is_neither_cgroup2_nor_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_cgroup(dir.path()),
            Err(PreflightError::NotCgroup2(_))
        ));
        assert!(matches!(
            ensure_bpffs(dir.path()),
            Err(PreflightError::NotBpffs(_))
        ));
    }
}
