//! Removing what labs leave behind: killing and removing cgroup trees (v2 and a runtime's v1),
//! unmounting, and [`clean_leftovers`] for the remains of killed runs (never a lab whose owner
//! still runs).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{BPFFS_ROOT, LAB_DIR_NAME, PREFIX, cgroup2_mount, ip};

pub(crate) fn list_netns() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Kills every process in a cgroup subtree (cgroup.kill, kernel ≥ 5.14).
pub(crate) fn kill_cgroup_tree(cg: &Path) {
    if !cg.exists() {
        return;
    }
    let _ = fs::write(cg.join("cgroup.kill"), "1");
    // cgroup.kill is asynchronous; wait (bounded) for the subtree to empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !cgroup_tree_empty(cg) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_tree_empty(cg: &Path) -> bool {
    fs::read_to_string(cg.join("cgroup.events"))
        .map_or(true, |e| e.lines().any(|l| l == "populated 0"))
}

pub(crate) fn remove_cgroup_tree(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(cg)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // Removing a cgroup directory also detaches every BPF program attached to it.
    fs::remove_dir(cg).with_context(|| format!("rmdir {}", cg.display()))
}

/// Every cgroup-v1 hierarchy's mount point (hybrid hosts; none on a cgroup-v2-only host).
fn cgroup_v1_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Removes `<v1 hierarchy>/<rel>` with its subtree in every cgroup-v1 hierarchy, deepest first
/// (what runc's cgroupfs driver made for a lab's pods). The processes must be gone already;
/// returns what could not be removed.
pub(crate) fn remove_v1_cgroup_dirs(rel: &Path) -> Vec<String> {
    cgroup_v1_mounts()
        .into_iter()
        .map(|root| root.join(rel))
        .filter(|dir| dir.is_dir())
        .filter_map(|dir| remove_cgroup_tree(&dir).err().map(|e| format!("{e:#}")))
        .collect()
}

/// Lazily unmounts every mount point at or below `dir`, deepest first: a container runtime's
/// pod network namespaces, shm and root filesystem mounts outlive it when it is killed, and
/// removing a directory tree must never descend into (or trip over) them.
pub(crate) fn unmount_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal (`\040`).
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    let mut errors = Vec::new();
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: already unmounted (a parent's lazy unmount took it along).
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                errors.push(format!("umount {}: {e}", p.display()));
            }
        }
    }
    errors
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes leftovers of killed lab runs: namespaces named `twl-*`, the lab cgroup subtree, lab
/// bpffs pins and scratch directories. Returns a description of what was removed.
pub fn clean_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let cg_root = cgroup2_mount()?.join(LAB_DIR_NAME);
    let bpffs_root = Path::new(BPFFS_ROOT).join(LAB_DIR_NAME);
    let tmp_root = std::env::temp_dir().join(LAB_DIR_NAME);
    let netns = list_netns();
    // Every run id with anything left on the machine, from each kind of lab object.
    let mut ids: Vec<String> = netns
        .iter()
        .filter_map(|n| n.strip_prefix(&format!("{PREFIX}-")))
        .filter_map(|rest| rest.split('-').next())
        .map(str::to_owned)
        .collect();
    for root in [&cg_root, &bpffs_root, &tmp_root] {
        if let Ok(entries) = fs::read_dir(root) {
            ids.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        // A lab whose owner still runs belongs to a parallel test run (another checkout's
        // `xtask test`, a bench): never touch it.
        if owner_alive(&tmp_root.join(&id)) {
            continue;
        }
        let cg = cg_root.join(&id);
        kill_cgroup_tree(&cg);
        let mut namespaces: Vec<&String> = netns
            .iter()
            .filter(|n| n.starts_with(&format!("{PREFIX}-{id}-")))
            .collect();
        namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for ns in namespaces {
            ip(&["netns", "del", ns])?;
            removed.push(format!("netns {ns}"));
        }
        if cg.exists() {
            remove_cgroup_tree(&cg)?;
            removed.push(format!("cgroup {}", cg.display()));
        }
        let v1_errors = remove_v1_cgroup_dirs(&Path::new(LAB_DIR_NAME).join(&id));
        if let Some(e) = v1_errors.first() {
            bail!("{e}");
        }
        let mut unmount_errors = unmount_under(&tmp_root.join(&id));
        unmount_errors.extend(unmount_under(&bpffs_root.join(&id)));
        if let Some(e) = unmount_errors.first() {
            bail!("{e}");
        }
        for dir in [bpffs_root.join(&id), tmp_root.join(&id)] {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
                removed.push(format!("dir {}", dir.display()));
            }
        }
    }
    Ok(removed)
}

/// File in a lab's scratch dir naming the process that owns the lab: `<pid> <start time>`
/// (the start time, field 22 of /proc/<pid>/stat, tells a reused pid apart).
const OWNER_FILE: &str = "owner";

fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing paren don't.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned)
}

pub(crate) fn write_owner(dir: &Path) -> Result<()> {
    let pid = std::process::id();
    let start = process_start_time(pid).context("reading own /proc stat")?;
    fs::write(dir.join(OWNER_FILE), format!("{pid} {start}\n")).context("writing lab owner file")
}

fn owner_alive(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next())
    else {
        return false;
    };
    process_start_time(pid).is_some_and(|s| s == start)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(super::unescape_mountinfo(r"/tmp/a\040b/c"), "/tmp/a b/c");
        assert_eq!(super::unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(super::unescape_mountinfo("/plain/é"), "/plain/é");
        assert_eq!(super::unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }
}
