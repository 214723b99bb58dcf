//! Running programs: in the machine, in a lab namespace (with or without the namespace's own
//! sysfs), in a node's cgroup; waiting for a server's `ready` line.
use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::NETNS_RUN_DIR;

/// Runs a command; error with its stderr on a non-zero exit; returns stdout.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

pub(crate) fn ns_ip(netns: &str, args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").arg("-n").arg(netns).args(args))
}

pub(crate) fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run_cmd(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]))
    .map(|_| ())
}

/// A command running inside `netns` and, when given, inside `cgroup` (moved there between fork
/// and exec, so the program's sockets are created inside it and the node's socket hooks see
/// them). Goes through `ip netns exec`, which also mounts the namespace's own sysfs in a private
/// mount namespace, so `/sys/class/net` shows the lab's devices (podman and the reference CNI
/// plugins read it).
pub(crate) fn netns_command(
    netns: &str,
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    if let Some(cg) = cgroup {
        join_cgroup_before_exec(&mut cmd, cg);
    }
    cmd
}

/// A command that switches only its network namespace to `netns` (setns(2) between fork and
/// exec) and joins `cgroup`, keeping the machine's mounts. The agent needs that: the private
/// sysfs of `ip netns exec` hides the cgroup2 mount under `/sys/fs/cgroup` that it attaches its
/// socket hooks to and the bpffs under `/sys/fs/bpf` it pins in.
pub(crate) fn netns_only_command(
    netns: &str,
    cgroup: &Path,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new(program);
    // Opened before fork: the child may only make async-signal-safe calls.
    let ns = fs::File::open(Path::new(NETNS_RUN_DIR).join(netns));
    // SAFETY: setns(2) on an fd opened before fork; no allocation in the child.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd as _;
            let fd = match &ns {
                Ok(f) => f.as_raw_fd(),
                Err(_) => return Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            };
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    join_cgroup_before_exec(&mut cmd, cgroup);
    cmd
}

/// Moves the child into `cgroup` between fork and exec.
fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: only async-signal-safe calls in the child (open/write/close on a path built
    // before fork).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns a command that prints `ready` once it serves, and waits (bounded) for that line.
pub fn spawn_and_wait_ready(mut cmd: Command) -> Result<Child> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "ready" => Ok(child),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not become ready: {other:?}")
        }
    }
}

/// Runs a `labtool` command (made by a node's, pod's or the external client's `cmd`): its exit
/// code (-1 when killed by a signal) and its stdout, trimmed. A non-zero exit is an answer here
/// (refused, timed out), not an error.
pub(crate) fn labtool_in(cmd: &mut Command) -> Result<(i32, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Stops `child` with SIGTERM and waits for it; one still running `grace` later is killed and
/// reported as an error naming `what`.
pub(crate) fn terminate(mut child: Child, what: &str, grace: Duration) -> Result<()> {
    let pid = i32::try_from(child.id())?;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not exit within {grace:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
