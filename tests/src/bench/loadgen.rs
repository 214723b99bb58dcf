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

/// A time-sliced schedule for running contenders side by side: between `from_ns` and `until_ns`
/// (Unix time, which every lab namespace shares) `slots` load clients take turns in windows of
/// `slot_ns`, this one in every window whose index is `k` modulo `slots`.
///
/// Why: this machine's CPU capacity changes by up to 2× from one second to the next (a pure CPU
/// loop alternates between 55 and 110 ms per run; the host shares its cores), so contenders
/// measured one after the other for seconds each see different machines. Taking turns every
/// 100 ms, each contender sees the same mix of fast and slow periods, and the per-round ratio
/// compares paths, not periods. A client starts no new connection (request) outside its own
/// windows; one in flight at a boundary finishes (tens of µs into the next window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub from_ns: u128,
    pub until_ns: u128,
    pub slot_ns: u128,
    pub slots: u32,
    pub k: u32,
}

impl Slots {
    /// One client alone, from now on for `d`.
    pub fn whole(d: Duration) -> Self {
        let now = unix_ns();
        Slots {
            from_ns: now,
            until_ns: now + d.as_nanos(),
            slot_ns: d.as_nanos().max(1),
            slots: 1,
            k: 0,
        }
    }

    /// What a client should do at `now`: `None` once the schedule is over, `Some(0)` in one of
    /// its own windows, else `Some(ns)` to wait for its next one (or for the start).
    pub fn wait(&self, now: u128) -> Option<u128> {
        if now >= self.until_ns {
            return None;
        }
        if now < self.from_ns {
            return Some(self.from_ns - now);
        }
        let slots = u128::from(self.slots.max(1));
        let index = now / self.slot_ns;
        let ahead = (u128::from(self.k) + slots - index % slots) % slots;
        if ahead == 0 {
            return Some(0);
        }
        let next = (index + ahead) * self.slot_ns;
        (next < self.until_ns).then(|| next - now)
    }

    /// How much of the schedule is this client's own (ns): what its rate is per.
    pub fn active_ns(&self) -> u128 {
        if self.until_ns <= self.from_ns {
            return 0;
        }
        let slots = u128::from(self.slots.max(1));
        let mut total = 0;
        // Whole windows between the first and last boundary, then the cut ends.
        let mut index = self.from_ns / self.slot_ns;
        while index * self.slot_ns < self.until_ns {
            if index % slots == u128::from(self.k) {
                let start = (index * self.slot_ns).max(self.from_ns);
                let end = ((index + 1) * self.slot_ns).min(self.until_ns);
                total += end - start;
            }
            index += 1;
        }
        total
    }

    /// The loadgen flags that carry this schedule.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--from-ns".into(),
            self.from_ns.to_string(),
            "--until-ns".into(),
            self.until_ns.to_string(),
            "--slot-ms".into(),
            (self.slot_ns / 1_000_000).to_string(),
            "--slot".into(),
            format!("{}/{}", self.k, self.slots),
        ]
    }
}

/// Nanoseconds since the Unix epoch (the probe and the harness share the machine's clock).
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn run_json<T: for<'de> Deserialize<'de>>(client: &impl Client, args: &[String]) -> Result<T> {
    Running::start(client, args)?.finish()
}

/// A loadgen run started in the background (contenders that take turns run at the same time).
pub struct Running {
    child: Child,
    args: Vec<String>,
}

impl Running {
    pub fn start(client: &impl Client, args: &[String]) -> Result<Self> {
        let child = client
            .command(&bin("loadgen"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning loadgen")?;
        Ok(Running {
            child,
            args: args.to_vec(),
        })
    }

    /// Waits for its end and parses its report.
    pub fn finish<T: for<'de> Deserialize<'de>>(self) -> Result<T> {
        let Running { child, args } = self;
        let out = child.wait_with_output().context("waiting for loadgen")?;
        parse_report(&args, &out)
    }
}

fn parse_report<T: for<'de> Deserialize<'de>>(
    args: &[String],
    out: &std::process::Output,
) -> Result<T> {
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
    let mut args = crr_args(targets, threads);
    args.extend(["--duration-ms".into(), duration.as_millis().to_string()]);
    run_json(client, &args)
}

/// loadgen's arguments for a connection-rate run, without its schedule (`--duration-ms`, or
/// [`Slots::args`]).
pub fn crr_args(targets: &[String], threads: usize) -> Vec<String> {
    vec![
        "crr".into(),
        "--to".into(),
        targets.join(","),
        "--threads".into(),
        threads.to_string(),
    ]
}

/// loadgen's arguments for a latency run, without its schedule.
pub fn rr_args(target: &str) -> Vec<String> {
    vec!["rr".into(), "--to".into(), target.into()]
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

#[cfg(test)]
mod tests {
    use super::Slots;

    const MS: u128 = 1_000_000;

    fn slots(from: u128, until: u128, n: u32, k: u32) -> Slots {
        Slots {
            from_ns: from * MS,
            until_ns: until * MS,
            slot_ns: 100 * MS,
            slots: n,
            k,
        }
    }

    #[test]
    fn a_client_works_only_in_its_own_windows() {
        let s = slots(1_000, 2_000, 3, 1);
        // Before the start: wait for it.
        assert_eq!(s.wait(900 * MS), Some(100 * MS));
        // 1,000 ms is window 10 (10 % 3 = 1): its own.
        assert_eq!(s.wait(1_050 * MS), Some(0));
        // Window 11 is another's: the next own one is 13 (1,300 ms).
        assert_eq!(s.wait(1_150 * MS), Some(150 * MS));
        // Window 19 (1,900 ms) is its own and the last; after it nothing is left.
        assert_eq!(s.wait(1_950 * MS), Some(0));
        assert_eq!(s.wait(2_000 * MS), None);
        // Window 17 is not its own, and its next (19) still starts before the end.
        assert_eq!(s.wait(1_750 * MS), Some(150 * MS));
    }

    #[test]
    fn no_wait_runs_past_the_end() {
        let s = slots(1_000, 1_850, 3, 0);
        // Window 18 (1,800 ms) would be its own but starts... before the end: 50 ms of it.
        assert_eq!(s.wait(1_750 * MS), Some(50 * MS));
        let s = slots(1_000, 1_790, 3, 0);
        assert_eq!(s.wait(1_750 * MS), None);
    }

    #[test]
    fn the_active_time_is_the_own_windows_within_the_schedule() {
        // Windows 10..20: own ones (k = 1 of 3) are 10, 13, 16, 19.
        assert_eq!(slots(1_000, 2_000, 3, 1).active_ns(), 400 * MS);
        assert_eq!(slots(1_000, 2_000, 3, 0).active_ns(), 300 * MS);
        // Cut ends count in part.
        assert_eq!(slots(1_050, 1_950, 3, 1).active_ns(), 300 * MS);
        // The three clients share the whole schedule between them.
        let total: u128 = (0..3).map(|k| slots(1_037, 2_911, 3, k).active_ns()).sum();
        assert_eq!(total, (2_911 - 1_037) * MS);
        // One client alone owns all of it.
        assert_eq!(slots(1_037, 2_911, 1, 0).active_ns(), (2_911 - 1_037) * MS);
    }
}
