//! CNI ADD/DEL benchmark driver (written by the CNI session).
//!
//! Measures what a container runtime sees: the wall time of one plugin process per
//! operation, from spawn to exit, for `twill-cni` and for the reference `ptp` +
//! `host-local` on the same pod CIDR in the same lab node. Plugins are spawned from
//! threads that entered the node's network namespace (`setns` is per thread and a
//! forked child inherits the forking thread's namespace), so no `ip netns exec`
//! wrapper adds its own cost to either contender.
//!
//! Two phases per contender: `cycles` sequential ADD+DEL cycles, then `cycles`
//! cycles spread over `parallel` workers. Like a runtime, which makes one network
//! namespace per pod sandbox and removes it after DEL, every cycle gets a fresh pod
//! namespace (made with unshare(2) + a bind mount, ~0.1 ms, inside the timed wall
//! but outside the per-operation times) and drops it after DEL. Both phases are
//! bounded in count; every plugin call has a deadline.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Node;

/// One plugin call may not take longer than this (a hung plugin fails the bench).
const CALL_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Contender {
    Twill,
    RefPtpHostLocal,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Twill => "twill-cni",
            Contender::RefPtpHostLocal => "ptp+host-local",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OpStats {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseResult {
    pub workers: usize,
    pub cycles: usize,
    pub wall_s: f64,
    /// Completed ADD+DEL cycles per second.
    pub pods_per_s: f64,
    pub add: OpStats,
    pub del: OpStats,
}

#[derive(Clone, Debug, Serialize)]
pub struct CniBenchResult {
    pub contender: Contender,
    pub name: &'static str,
    pub plugin: PathBuf,
    pub pod_cidr: String,
    pub sequential: PhaseResult,
    pub parallel: PhaseResult,
}

/// Runs both phases for one contender. Leaves the node as it found it (checked).
pub fn run(
    lab_node: &Node,
    cycles: usize,
    parallel: usize,
    which: Contender,
) -> Result<CniBenchResult> {
    ensure!(
        cycles > 0 && parallel > 0,
        "cycles and parallel must be positive"
    );
    let setup = Setup::new(lab_node, which)?;
    let baseline = link_count(lab_node)?;
    let sequential = phase(&setup, 1, cycles)?;
    let parallel_phase = phase(&setup, parallel, cycles)?;
    // Work that outlives a call (twill-cni's background reaper, the kernel's
    // namespace cleanup) must finish, and leave nothing, before the next contender.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let after = link_count(lab_node)?;
        if after == baseline {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} left links behind: {baseline} before, {after} after",
            which.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(CniBenchResult {
        contender: which,
        name: which.name(),
        plugin: setup.plugin.clone(),
        pod_cidr: lab_node.pod_cidr.to_string(),
        sequential,
        parallel: parallel_phase,
    })
}

struct Setup<'a> {
    node: &'a Node,
    which: Contender,
    plugin: PathBuf,
    conf: Vec<u8>,
}

impl<'a> Setup<'a> {
    fn new(node: &'a Node, which: Contender) -> Result<Self> {
        // Both speak 1.0.0 (the Debian reference plugins stop there); both log/store
        // state under the node's scratch directory, never shared with other tests.
        let (plugin, conf) = match which {
            Contender::Twill => {
                let mut c = node.plugin_conf()?;
                c["cniVersion"] = json!("1.0.0");
                c["stateDir"] = json!(node.dir.join("bench-twill"));
                (crate::bin("twill-cni"), c)
            }
            Contender::RefPtpHostLocal => (
                PathBuf::from("/usr/lib/cni/ptp"),
                json!({
                    "cniVersion": "1.0.0", "name": "twill-ref", "type": "ptp", "ipMasq": false, "mtu": 1500,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": node.pod_cidr.to_string()}]],
                             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": node.dir.join("bench-host-local")},
                }),
            ),
        };
        ensure!(
            plugin.is_file(),
            "{} not found (build it / install containernetworking-plugins)",
            plugin.display()
        );
        Ok(Setup {
            node,
            which,
            plugin,
            conf: serde_json::to_vec(&conf)?,
        })
    }

    /// One plugin process; returns its wall time.
    fn call(&self, verb: &str, id: &str, ns: &str) -> Result<Duration> {
        let start = Instant::now();
        let mut child = Command::new(&self.plugin)
            .env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.plugin.display()))?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("stdin"))?
            .write_all(&self.conf)?;
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("stdout"))?;
        let mut out = Vec::new();
        // Reading to EOF ends when the plugin exits (or closes stdout).
        stdout.read_to_end(&mut out)?;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > CALL_DEADLINE {
                let _ = child.kill();
                bail!("{} {verb} exceeded {CALL_DEADLINE:?}", self.which.name());
            }
            std::thread::yield_now();
        };
        let took = start.elapsed();
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "{} {verb} {id} failed: {} {err}",
                self.which.name(),
                String::from_utf8_lossy(&out)
            );
        }
        Ok(took)
    }
}

/// A new pod namespace `/var/run/netns/<name>`, as `ip netns add` makes it but
/// without a process: unshare(2) on this thread, bind-mount the thread's
/// namespace onto a file, return the thread to the node namespace.
fn fresh_netns(name: &str, node_ns: &File) -> Result<PodNs> {
    let path = PathBuf::from(format!("/var/run/netns/{name}"));
    File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let made = (|| -> Result<()> {
        // SAFETY: unshare/mount/setns on this thread with valid C strings and fd.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                bail!("unshare: {}", std::io::Error::last_os_error());
            }
            let src = c"/proc/thread-self/ns/net";
            let dst = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
            let mounted = libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            );
            let mount_err = std::io::Error::last_os_error();
            if libc::setns(node_ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                bail!(
                    "setns back into the node: {}",
                    std::io::Error::last_os_error()
                );
            }
            if mounted != 0 {
                bail!("bind-mounting {}: {mount_err}", path.display());
            }
        }
        Ok(())
    })();
    let ns = PodNs { path };
    made.map(|()| ns)
}

/// A pod namespace made by [`fresh_netns`]; dropping it is `ip netns del`
/// (the kernel tears the namespace down asynchronously once unmounted).
struct PodNs {
    path: PathBuf,
}

impl PodNs {
    fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        if let Ok(p) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; failure (never mounted) is fine.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `cycles` ADD+DEL cycles spread over `workers` threads, a fresh pod
/// namespace per cycle.
#[expect(
    clippy::cast_precision_loss,
    reason = "cycle counts are far below 2^52"
)]
fn phase(setup: &Setup<'_>, workers: usize, cycles: usize) -> Result<PhaseResult> {
    let node_ns = File::open(format!("/var/run/netns/{}", setup.node.netns))?;
    let started = Instant::now();
    let per_worker: Vec<Result<(Vec<f64>, Vec<f64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let node_ns = &node_ns;
                s.spawn(move || -> Result<(Vec<f64>, Vec<f64>)> {
                    // SAFETY: setns(2) on this thread only; the fd is a valid netns file.
                    if unsafe { libc::setns(node_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into the node: {}", std::io::Error::last_os_error());
                    }
                    let mine = (w..cycles).step_by(workers).count();
                    let (mut adds, mut dels) = (Vec::with_capacity(mine), Vec::with_capacity(mine));
                    for c in 0..mine {
                        let id = format!("bench{w}x{c}");
                        let ns = fresh_netns(
                            &setup.node.pod_netns_name(&format!("cb{w}x{c}")),
                            node_ns,
                        )?;
                        adds.push(setup.call("ADD", &id, ns.name())?.as_secs_f64() * 1e3);
                        dels.push(setup.call("DEL", &id, ns.name())?.as_secs_f64() * 1e3);
                    }
                    Ok((adds, dels))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked"))))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for r in per_worker {
        let (a, d) = r?;
        adds.extend(a);
        dels.extend(d);
    }
    Ok(PhaseResult {
        workers,
        cycles,
        wall_s: wall,
        pods_per_s: cycles as f64 / wall,
        add: stats(adds),
        del: stats(dels),
    })
}

#[expect(
    clippy::cast_precision_loss,
    reason = "sample counts are far below 2^52"
)]
fn stats(mut v: Vec<f64>) -> OpStats {
    v.sort_by(f64::total_cmp);
    // Nearest-rank percentile.
    let pick = |pct: usize| {
        if v.is_empty() {
            return 0.0;
        }
        v[(v.len() * pct).div_ceil(100).clamp(1, v.len()) - 1]
    };
    OpStats {
        count: v.len(),
        p50_ms: pick(50),
        p99_ms: pick(99),
        mean_ms: if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        },
    }
}

fn link_count(node: &Node) -> Result<usize> {
    Ok(node.run(&["ip", "-o", "link", "show"])?.lines().count())
}

/// Both contenders, Twill first, as one JSON document (what `cargo xtask bench cni` prints).
pub fn run_both(lab_node: &Node, cycles: usize, parallel: usize) -> Result<Value> {
    let twill = run(lab_node, cycles, parallel, Contender::Twill)?;
    let reference = run(lab_node, cycles, parallel, Contender::RefPtpHostLocal)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(json!({
        "twill": twill,
        "reference": reference,
        "speedup_sequential": ratio(twill.sequential.pods_per_s, reference.sequential.pods_per_s),
        "speedup_parallel": ratio(twill.parallel.pods_per_s, reference.parallel.pods_per_s),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = stats((1..=100).map(f64::from).collect());
        assert_eq!((s.count, s.p50_ms, s.p99_ms), (100, 50.0, 99.0));
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(stats(vec![]).count, 0);
    }
}
