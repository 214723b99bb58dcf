//! The load client's reports (written by the `loadgen` binary as one JSON line, parsed here) and
//! the driver that runs it inside a lab pod.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{External, Pod, bin};

/// Where the load client runs: a pod inside a node (east-west), or the lab's external client
/// (north-south, through a node's NodePort).
pub trait Client {
    fn command(&self, program: &std::path::Path) -> std::process::Command;
}

impl Client for Pod {
    fn command(&self, program: &std::path::Path) -> std::process::Command {
        self.cmd(program)
    }
}

impl Client for External {
    fn command(&self, program: &std::path::Path) -> std::process::Command {
        self.cmd(program)
    }
}

/// `loadgen crr`: connect, 1-byte request, 1-byte response, close, repeated for a fixed time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CrrReport {
    pub connections: u64,
    pub failures: u64,
    pub elapsed_s: f64,
    /// Completed connections per second.
    pub rate: f64,
    /// Completed connections per backend id (the response byte).
    pub per_backend: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

/// `loadgen rr`: 1-byte request/response on one kept-alive connection.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RrReport {
    pub requests: u64,
    pub failures: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_backend: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

/// `loadgen probe`: the wall-clock time of the first successful request/response.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    pub ok: bool,
    pub attempts: u64,
    /// Failed attempts that ran into the connect timeout (no answer at all, not even ICMP).
    pub timeouts: u64,
    pub success_unix_ns: u128,
    pub last_error: Option<String>,
}

/// `loadgen connect-cost`: what one `socket()` + `connect()` + `close()` costs towards each
/// target, timed by the client itself in interleaved rounds (each round times every target once,
/// in an order rotated per round, so a change of the machine's load falls on all of them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectCostReport {
    /// The targets, in the order of each round's values.
    pub targets: Vec<String>,
    /// `tcp` or `udp`.
    pub proto: String,
    pub per_round: u32,
    /// Mean ns per connect, per round and target: wall-clock.
    pub ns: Vec<Vec<f64>>,
    /// The same in the client thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): the calls' own
    /// cost, without the time other processes held the CPU. Work the kernel defers (RCU
    /// callbacks freeing a closed socket) is not in it.
    pub cpu_ns: Vec<Vec<f64>>,
    pub failures: u64,
    pub first_error: Option<String>,
}

/// Nanoseconds since the Unix epoch (the probe and the harness share the machine's clock).
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn run_json<T: for<'de> Deserialize<'de>>(client: &impl Client, args: &[String]) -> Result<T> {
    let out = client
        .command(&bin("loadgen"))
        .args(args)
        .output()
        .context("spawning loadgen")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "loadgen {args:?} failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_str(stdout.trim()).with_context(|| format!("loadgen output {stdout}"))
}

/// Runs a connection-rate round from `client` against `targets` (round-robin over them).
pub fn crr(
    client: &impl Client,
    targets: &[String],
    duration: Duration,
    threads: usize,
) -> Result<CrrReport> {
    run_json(
        client,
        &[
            "crr".into(),
            "--to".into(),
            targets.join(","),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
            "--threads".into(),
            threads.to_string(),
        ],
    )
}

/// Runs a latency round on one persistent connection.
pub fn rr(client: &impl Client, target: &str, duration: Duration) -> Result<RrReport> {
    run_json(
        client,
        &[
            "rr".into(),
            "--to".into(),
            target.into(),
            "--duration-ms".into(),
            duration.as_millis().to_string(),
        ],
    )
}

/// A probe running in a pod, retrying until the first successful request/response.
pub struct Probe {
    child: Child,
    output: std::sync::mpsc::Receiver<String>,
}

impl Probe {
    /// Starts the probe and waits (bounded) until it runs; it gives up by itself after `limit`.
    pub fn start(client: &Pod, target: &str, limit: Duration) -> Result<Self> {
        Self::start_until(client, target, limit, false)
    }

    /// [`Probe::start`]; with `refused`, the first connection refused is the success (the
    /// target port is closed: a reset arrives once nothing drops the SYN any more).
    pub fn start_until(client: &Pod, target: &str, limit: Duration, refused: bool) -> Result<Self> {
        let mut cmd = client.cmd(bin("loadgen"));
        cmd.args([
            "probe",
            "--to",
            target,
            "--limit-ms",
            &limit.as_millis().to_string(),
            "--until",
            if refused { "refused" } else { "ok" },
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning loadgen probe")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("loadgen probe did not start: {line:?}");
        }
        // Hand the rest of stdout back for `wait`.
        child.stdout = None;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
            let _ = tx.send(rest);
        });
        Ok(Self { child, output: rx })
    }

    /// Waits for the probe's report.
    pub fn wait(mut self) -> Result<ProbeReport> {
        let status = self.child.wait()?;
        let rest = self
            .output
            .recv_timeout(Duration::from_secs(5))
            .context("reading probe output")?;
        if !status.success() {
            bail!("loadgen probe failed ({status}): {}", rest.trim());
        }
        serde_json::from_str(rest.trim()).with_context(|| format!("probe output {rest}"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
