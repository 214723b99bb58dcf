//! The small helpers every lab test file needs, defined once (aya's integration tests keep
//! theirs in one `utils` module the same way): bounded polling ([`wait_for`], [`wait_until`]),
//! running code inside a lab network namespace ([`NetnsGuard`], [`in_netns`], [`netns_path`]),
//! addresses as the maps store them ([`addr_be`]), labtool's output ([`replier`]), and atomic
//! file writes ([`write_atomic`]).
use std::{
    fs::{self, File},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::NETNS_RUN_DIR;

/// Polls `f` until it returns `Ok(Some(v))` or `timeout` passes (bounded waits instead of fixed
/// sleeps, so tests are fast when things are fast and still finish when they are not).
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a file atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("no parent dir for {}", path.display()))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// [`wait_for`] for a yes/no condition: polls `f` until it returns `Ok(true)`, at most
/// `timeout`; an `Err` counts as "not yet" and the last one is reported on timeout.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    wait_for(timeout, what, || Ok(f()?.then_some(())))
}

/// Path of a lab network namespace made by `ip netns add <netns>`.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(netns)
}

/// Keeps the calling thread inside a lab network namespace until dropped (also while unwinding
/// from a panic), then moves it back to the namespace it was in. setns(2) with `CLONE_NEWNET`
/// moves only the calling thread, so the rest of the test process stays where it was.
pub struct NetnsGuard {
    home: File,
}

impl NetnsGuard {
    /// Moves the calling thread into `netns` (an `ip netns` name).
    pub fn enter(netns: &str) -> Result<Self> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target =
            File::open(netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
        // SAFETY: setns(2) on this thread with a namespace fd we hold open.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {netns}"));
        }
        Ok(Self { home })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: setns(2) on this thread with the fd of the namespace it came from. Should it
        // fail, the thread stays in the lab namespace, which can reach nothing outside the lab.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// Runs `f` with the calling thread inside `netns` (an `ip netns` name), then moves it back,
/// also when `f` fails or panics.
pub fn in_netns<T>(netns: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _inside = NetnsGuard::enter(netns)?;
    f()
}

/// An IPv4 address in network byte order, as the datapath's map keys and values hold it
/// (`addr_be` fields).
pub fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

/// The server name in labtool's reply to `tcp`/`udp` (`reply=<name> peer=... local=...`).
pub fn replier(out: &str) -> Option<&str> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("reply="))
}
