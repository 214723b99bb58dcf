//! The side-by-side run: one lab node per contender (same pods made by twill-cni, same load
//! client and servers), only the Service translation differs. Measurements are interleaved by
//! round so slow drifts of the machine hit every contender alike; ratios are taken per round
//! against the direct path of the same round.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use twill_core::routing::MasqueradeRules;

use super::{
    Contender,
    loadgen::{self, Probe, Slots, unix_ns},
    rules::{self, BenchService},
    stats::{self, Summary},
};
use crate::{Agent, Lab, Node, Pod, bin, run_cmd, spawn_and_wait_ready, wait_for};

mod policy;
pub use policy::{FromScratch, PEER, PolicyBenchConfig, PolicyResults, PolicySeries, percentile};

/// The Service every data-path round probes (the same address every round: see LAB.md on PAWS).
pub const BENCH_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Single-endpoint Service for iperf3 (its control and data connections must meet one server).
pub const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The last Service of every set: reachable only once the whole set is programmed.
pub const SENTINEL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// The bench Service is also a NodePort on this port: the north-south measurements go from the
/// external client to `<node IP>:BENCH_NODE_PORT`.
pub const BENCH_NODE_PORT: u16 = 30080;
const SERVER_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const MANIFEST_PREFIX: &str = "bench-";

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchConfig {
    pub contenders: Vec<Contender>,
    /// Service counts for the connection-rate, latency and throughput runs.
    pub sizes: Vec<usize>,
    /// Service counts at which programming from scratch and adding one are timed.
    pub program_sizes: Vec<usize>,
    pub rounds: usize,
    pub crr_duration: Duration,
    pub crr_threads: usize,
    pub warmup: Duration,
    pub rr_rounds: usize,
    pub rr_duration: Duration,
    pub iperf_rounds: usize,
    pub iperf_seconds: u32,
    pub add_one_rounds: usize,
    /// Bound for one programming step to become effective.
    pub program_limit: Duration,
    /// (Services, endpoints per Service) for the agent memory measurement.
    pub rss_scale: Option<(usize, usize)>,
    /// Also measure north-south: from the lab's external client (outside every node) through
    /// each node's NodePort, which for Twill is its per-packet tc path. Needs a lab built
    /// `with_external_client()`.
    #[serde(default)]
    pub north_south: bool,
    /// Rounds of the north-south connection-rate and latency runs (each as long as its
    /// east-west counterpart).
    #[serde(default)]
    pub ns_rounds: usize,
    /// The NetworkPolicy phase (run first, in the Twill and direct contenders' nodes).
    #[serde(default)]
    pub policy: Option<PolicyBenchConfig>,
    /// Wall-clock budget; phases that would start after it are skipped and noted.
    #[serde(skip)]
    pub budget: Duration,
}

impl BenchConfig {
    /// The smallest run that exercises every code path (the smoke test).
    pub fn smoke(contenders: Vec<Contender>) -> Self {
        Self {
            contenders,
            sizes: vec![10],
            program_sizes: vec![10],
            rounds: 1,
            crr_duration: Duration::from_millis(800),
            crr_threads: 1,
            warmup: Duration::from_millis(200),
            rr_rounds: 1,
            rr_duration: Duration::from_millis(300),
            iperf_rounds: 1,
            iperf_seconds: 1,
            add_one_rounds: 1,
            program_limit: Duration::from_secs(30),
            rss_scale: None,
            north_south: true,
            ns_rounds: 1,
            policy: Some(PolicyBenchConfig::smoke()),
            budget: Duration::from_mins(2),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub iptables: String,
    pub nft: String,
}

/// One contender's per-round values for one metric at one Service count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    pub contender: String,
    pub services: usize,
    /// Per round; `None` where the round failed (the error is in `errors`).
    pub rounds: Vec<Option<f64>>,
    pub summary: Option<Summary>,
    /// Per-round ratio to the direct path of the same round.
    pub ratios: Vec<f64>,
    pub ratio: Option<Summary>,
    pub failures: u64,
    /// Responses per backend id over all rounds (every backend must have some).
    pub per_backend: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

impl Series {
    fn new(contender: Contender, services: usize) -> Self {
        Self {
            contender: contender.name().into(),
            services,
            rounds: Vec::new(),
            summary: None,
            ratios: Vec::new(),
            ratio: None,
            failures: 0,
            per_backend: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    /// Whether every round produced a number with zero failures and every backend answered.
    /// Round `r`'s outcome: its value, failures and per-backend counts, or a hole and why.
    fn record(&mut self, r: usize, out: Result<RoundValue>) {
        match out {
            Ok((v, failures, per_backend)) => {
                self.rounds.push(Some(v));
                self.failures += failures;
                for (b, c) in per_backend {
                    *self.per_backend.entry(b).or_default() += c;
                }
            }
            Err(e) => {
                self.rounds.push(None);
                self.errors.push(format!("round {r}: {e:#}"));
            }
        }
    }

    pub fn clean(&self, backends: usize) -> bool {
        !self.rounds.is_empty()
            && self.rounds.iter().all(Option::is_some)
            && self.failures == 0
            && self.errors.is_empty()
            && (backends == 0
                || (self.per_backend.len() >= backends
                    && self.per_backend.values().all(|v| *v > 0)))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub higher_is_better: bool,
    /// Backends each round must reach (0: not checked, e.g. one kept-alive connection).
    pub backends: usize,
    pub series: Vec<Series>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlPlane {
    pub contender: String,
    pub services: usize,
    /// From an empty table to the first successful connection to the last Service.
    pub from_scratch_ms: Option<f64>,
    /// How long the programming command itself ran (restore / nft / manifest write).
    pub command_ms: Option<f64>,
    /// One more Service with `services` present, to its first successful connection.
    pub add_one_ms: Vec<f64>,
    pub add_one: Option<Summary>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRss {
    pub services: usize,
    pub endpoints: usize,
    /// Right after the first successful connection (the peak of programming).
    pub rss_kib: u64,
    /// [`RSS_SETTLE`] later, with nothing changing: what the agent holds in steady state.
    #[serde(default)]
    pub settled_kib: Option<u64>,
    pub programmed_ms: f64,
}

/// CPU time the agent used over a wall-clock span.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AgentCpu {
    pub cpu_ms: f64,
    pub wall_ms: f64,
}

/// How long after programming the steady-state RSS is read (the agent returns freed heap at
/// most every 5 s).
pub const RSS_SETTLE: Duration = Duration::from_secs(12);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResults {
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub machine: Machine,
    pub config: BenchConfig,
    pub filler_endpoints: usize,
    /// Contenders that could not run, with the reason.
    pub unavailable: BTreeMap<String, String>,
    pub conn_rate: Metric,
    pub rr_p50: Metric,
    pub rr_p99: Metric,
    pub throughput: Metric,
    /// North-south through the NodePort from outside the node; `direct` here is the external
    /// client routed straight to the pods through the node (no translation).
    #[serde(default)]
    pub ns_conn_rate: Metric,
    #[serde(default)]
    pub ns_rr_p50: Metric,
    #[serde(default)]
    pub ns_rr_p99: Metric,
    pub control_plane: Vec<ControlPlane>,
    pub agent_rss: Option<AgentRss>,
    /// Agent RSS after each data-path size was programmed (KiB), when Twill ran.
    pub agent_rss_by_size: BTreeMap<usize, u64>,
    /// CPU the agent used during each size's data-path rounds (nothing changing meanwhile).
    #[serde(default)]
    pub agent_cpu_by_size: BTreeMap<usize, AgentCpu>,
    /// The NetworkPolicy phase, when it ran.
    #[serde(default)]
    pub policy: Option<PolicyResults>,
    /// CNI ADD+DEL results (filled by the caller; `Null` when not run).
    pub cni: serde_json::Value,
    /// Why the CNI benchmark did not run, when it did not.
    pub cni_unavailable: Option<String>,
    pub notes: Vec<String>,
}

/// Starts `twill-agent run` in the node and checks it is still running after a short grace
/// period (a start-up check failure exits at once).
fn start_agent(node: &Node) -> Result<Agent> {
    const GRACE: Duration = Duration::from_millis(500);
    // Extra agent flags for experiments (`TWILL_BENCH_AGENT_ARGS="--masquerade=false"`).
    let extra = std::env::var("TWILL_BENCH_AGENT_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let mut agent = node.start_agent(&extra)?;
    std::thread::sleep(GRACE);
    if !agent.is_running() {
        bail!(
            "twill-agent exited within {GRACE:?} of its start: {}",
            log_tail(&agent.log())
        );
    }
    Ok(agent)
}

fn log_tail(log: &str) -> String {
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    if tail.is_empty() {
        "empty log".into()
    } else {
        tail
    }
}

/// Which traffic a data-path run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// From the client pod inside the node, through the ClusterIP (Twill's socket path).
    EastWest,
    /// From the lab's external client, through the node's NodePort (Twill's tc path).
    NorthSouth,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::EastWest => "",
            Path::NorthSouth => "north-south ",
        }
    }
}

fn external(lab: &Lab) -> Result<&crate::External> {
    lab.external
        .as_ref()
        .ok_or_else(|| anyhow!("north_south needs a lab with an external client"))
}

/// `perf record -a -g` around one measurement when `TWILL_BENCH_PERF_DIR` names a directory:
/// where a slice's CPU goes (kernel, eBPF programs by their JIT symbols, the agent), for
/// diagnosing a ratio. Off by default: sampling costs every contender alike, but it is not part
/// of the published method.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(name: &str) -> Self {
        let Some(dir) = std::env::var_os("TWILL_BENCH_PERF_DIR") else {
            return Self(None);
        };
        let out = std::path::Path::new(&dir).join(format!("{name}.data"));
        let child = std::process::Command::new("perf")
            .args([
                "record", "-a", "-g", "-k", "realtime", "-F", "1999", "-q", "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        // perf needs a moment to open its events on every CPU.
        std::thread::sleep(Duration::from_millis(300));
        Self(child)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SIGINT makes perf write its file out.
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            let _ = c.wait();
        }
    }
}

/// What one contender's round yields: its value, its failures, its connections per backend.
type RoundValue = (f64, u64, BTreeMap<String, u64>);

/// Per-round medians, ratios against the direct path of the same round, and their summaries.
fn summarize(series: &mut [Series]) {
    let direct = series
        .iter()
        .find(|s| s.contender == Contender::Direct.name())
        .map(|s| s.rounds.clone());
    for se in series {
        let values: Vec<f64> = se.rounds.iter().flatten().copied().collect();
        se.summary = stats::summarize(&values);
        if let Some(d) = &direct {
            se.ratios = stats::ratios(&se.rounds, d);
            se.ratio = stats::summarize(&se.ratios);
        }
    }
}

/// The length of one contender's turn when the contenders of a round take turns: short enough
/// that every contender meets each of this machine's fast and slow spells, long enough that a
/// turn holds hundreds of connections (and the boundary's few in-flight ones do not count).
const SLOT: Duration = Duration::from_millis(100);
/// Launching every contender's client takes some ms each; their schedule starts after this.
const TURNS_START_MARGIN: Duration = Duration::from_millis(300);

/// One contender's node, pods and state.
struct Setup<'a> {
    contender: Contender,
    node: &'a Node,
    client: Pod,
    backends: [Pod; 2],
    agent: Option<Agent>,
    /// Services currently programmed (for kube-proxy's add-one shape).
    programmed: Vec<BenchService>,
    unavailable: Option<String>,
}

fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let version = |prog: &str, arg: &str| {
        run_cmd(std::process::Command::new(prog).arg(arg))
            .map_or_else(|e| format!("unavailable: {e}"), |s| s.trim().to_owned())
    };
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        iptables: version("iptables", "-V"),
        nft: version("nft", "-v"),
    }
}

fn target(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

fn sysctl(cmd: impl FnOnce(&[&str]) -> Result<String>, key: &str, value: &str) -> Result<()> {
    cmd(&["sysctl", "-qw", &format!("{key}={value}")])
        .map(|_| ())
        .with_context(|| format!("sysctl {key}={value}"))
}

/// Runs `prog` in the node with `input` on stdin.
fn run_with_input(node: &Node, prog: &[&str], input: &str) -> Result<()> {
    let path = node.dir.join(format!("{MANIFEST_PREFIX}input.txt"));
    fs::write(&path, input)?;
    let (p, rest) = prog.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let mut cmd = node.cmd(p);
    cmd.args(rest).stdin(Stdio::from(fs::File::open(&path)?));
    run_cmd(&mut cmd).map(|_| ())
}

/// CPU time (user + system) the process has used so far, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .ok_or_else(|| anyhow!("no utime/stime in /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Ok(Duration::from_millis(ticks * 1000 / hz.max(1)))
}

fn kib_rss(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

impl Setup<'_> {
    fn name(&self) -> &'static str {
        self.contender.name()
    }

    fn flush_conntrack(&self) -> Result<()> {
        // conntrack exits 1 when the table is already empty on some versions; the flush is
        // what matters, an empty table is fine.
        let out = self.node.cmd("conntrack").arg("-F").output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("emptied") {
            bail!("conntrack -F in {}: {}", self.node.name, stderr.trim());
        }
        Ok(())
    }

    fn agent_log_tail(&self) -> String {
        log_tail(&self.agent.as_ref().map(Agent::log).unwrap_or_default())
    }

    /// The frontend the load goes to on `path`: the ClusterIP from the client pod, the node's
    /// NodePort from the external client.
    fn frontend(&self, path: Path) -> String {
        match path {
            Path::EastWest => target(BENCH_VIP, 80),
            Path::NorthSouth => target(self.node.ip, BENCH_NODE_PORT),
        }
    }

    /// Address(es) the load goes to: the frontend, or for the direct path the backends
    /// themselves (from outside, routed through the node).
    fn crr_targets(&self, path: Path) -> Vec<String> {
        if self.contender.is_direct() {
            self.backends
                .iter()
                .map(|b| target(b.ip, SERVER_PORT))
                .collect()
        } else {
            vec![self.frontend(path)]
        }
    }

    fn rr_target(&self, path: Path) -> String {
        if self.contender.is_direct() {
            target(self.backends[0].ip, SERVER_PORT)
        } else {
            self.frontend(path)
        }
    }

    /// Starts a connection-rate run on `path` from its client, on `slots`.
    fn start_crr(
        &self,
        lab: &Lab,
        path: Path,
        threads: usize,
        slots: &Slots,
    ) -> Result<loadgen::Running> {
        let mut args = loadgen::crr_args(&self.crr_targets(path), threads);
        args.extend(slots.args());
        match path {
            Path::EastWest => loadgen::Running::start(&self.client, &args),
            Path::NorthSouth => loadgen::Running::start(external(lab)?, &args),
        }
    }

    /// Starts a latency run on `path` from its client, on `slots`.
    fn start_rr(&self, lab: &Lab, path: Path, slots: &Slots) -> Result<loadgen::Running> {
        let mut args = loadgen::rr_args(&self.rr_target(path));
        args.extend(slots.args());
        match path {
            Path::EastWest => loadgen::Running::start(&self.client, &args),
            Path::NorthSouth => loadgen::Running::start(external(lab)?, &args),
        }
    }

    /// One connection-rate run on `path` from its client.
    fn crr(
        &self,
        lab: &Lab,
        path: Path,
        d: Duration,
        threads: usize,
    ) -> Result<loadgen::CrrReport> {
        let targets = self.crr_targets(path);
        match path {
            Path::EastWest => loadgen::crr(&self.client, &targets, d, threads),
            Path::NorthSouth => loadgen::crr(external(lab)?, &targets, d, threads),
        }
    }

    fn iperf_target(&self) -> Ipv4Addr {
        if self.contender.is_direct() {
            self.backends[0].ip
        } else {
            IPERF_VIP
        }
    }

    fn clear(&mut self, lab: &Lab) -> Result<()> {
        match self.contender {
            Contender::Direct | Contender::DirectMasq | Contender::TwillNoService => {}
            Contender::Iptables => {
                run_with_input(self.node, &["iptables-restore"], &rules::iptables_empty())?;
            }
            Contender::IptablesLegacy => run_with_input(
                self.node,
                &["iptables-legacy-restore"],
                &rules::iptables_empty(),
            )?,
            Contender::Nftables => {
                run_with_input(self.node, &["nft", "-f", "-"], &rules::nft_empty())?;
            }
            Contender::Twill => {
                for entry in fs::read_dir(lab.manifests_dir())? {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    if name.starts_with(MANIFEST_PREFIX) {
                        lab.delete_manifest(&name)?;
                    }
                }
                if !self.programmed.is_empty() {
                    // The agent must have withdrawn the old set before a from-scratch timing.
                    let client = &self.client;
                    wait_for(
                        Duration::from_secs(30),
                        "twill to withdraw the bench Services",
                        || {
                            let p = Probe::start(
                                client,
                                &target(SENTINEL_VIP, 80),
                                Duration::from_millis(300),
                            )?;
                            Ok((!p.wait()?.ok).then_some(()))
                        },
                    )?;
                }
            }
        }
        self.programmed.clear();
        Ok(())
    }

    /// Programs `services` from scratch; returns how long the programming command ran.
    fn program_full(&mut self, lab: &Lab, services: &[BenchService]) -> Result<Duration> {
        let t = Instant::now();
        match self.contender {
            Contender::Direct | Contender::DirectMasq | Contender::TwillNoService => {}
            Contender::Iptables => run_with_input(
                self.node,
                &["iptables-restore"],
                &rules::iptables_full(services),
            )?,
            Contender::IptablesLegacy => {
                run_with_input(
                    self.node,
                    &["iptables-legacy-restore"],
                    &rules::iptables_full(services),
                )?;
            }
            Contender::Nftables => {
                run_with_input(self.node, &["nft", "-f", "-"], &rules::nft_full(services))?;
            }
            Contender::Twill => lab.apply_manifest(
                &format!("{MANIFEST_PREFIX}services.yaml"),
                &rules::k8s_manifests(services),
            )?,
        }
        let took = t.elapsed();
        self.programmed = services.to_vec();
        Ok(took)
    }

    fn program_add(&mut self, lab: &Lab, new: &BenchService) -> Result<Duration> {
        let t = Instant::now();
        match self.contender {
            Contender::Direct | Contender::DirectMasq | Contender::TwillNoService => {}
            Contender::Iptables => {
                run_with_input(
                    self.node,
                    &["iptables-restore", "--noflush"],
                    &rules::iptables_add_one(&self.programmed, new),
                )?;
            }
            Contender::IptablesLegacy => run_with_input(
                self.node,
                &["iptables-legacy-restore", "--noflush"],
                &rules::iptables_add_one(&self.programmed, new),
            )?,
            Contender::Nftables => {
                run_with_input(self.node, &["nft", "-f", "-"], &rules::nft_add_one(new))?;
            }
            Contender::Twill => {
                lab.apply_manifest(
                    &format!("{MANIFEST_PREFIX}added-{}.yaml", new.name),
                    &rules::k8s_manifests(std::slice::from_ref(new)),
                )?;
            }
        }
        let took = t.elapsed();
        self.programmed.push(new.clone());
        Ok(took)
    }

    /// Runs `program`, timing it to the first successful exchange with `probe_target`.
    fn timed_to_first_connection(
        &mut self,
        lab: &Lab,
        probe_target: &str,
        limit: Duration,
        program: impl FnOnce(&mut Self, &Lab) -> Result<Duration>,
    ) -> Result<(f64, f64)> {
        self.flush_conntrack()?;
        let probe = Probe::start(&self.client, probe_target, limit)?;
        let t0 = unix_ns();
        let command = program(self, lab)?;
        let report = probe.wait()?;
        if !report.ok {
            bail!(
                "{probe_target} not reachable within {limit:?} after programming ({} attempts, last error: {})",
                report.attempts,
                report.last_error.unwrap_or_default()
            );
        }
        #[expect(clippy::cast_precision_loss, reason = "nanosecond spans of seconds")]
        let ms = report.success_unix_ns.saturating_sub(t0) as f64 / 1e6;
        Ok((ms, command.as_secs_f64() * 1e3))
    }
}

fn backend_set(backends: &[Pod; 2]) -> Vec<Ipv4Addr> {
    backends.iter().map(|b| b.ip).collect()
}

/// The Service set of a data-path run with `n` Services: the probed Service in the middle of
/// the dispatch order (kube-proxy's iptables chain is scanned linearly, the middle is the
/// average), the iperf Service next to it, the sentinel last.
fn data_set(
    n: usize,
    node: &Node,
    backends: &[Pod; 2],
    filler_endpoints: usize,
) -> Vec<BenchService> {
    let eps = backend_set(backends);
    rules::service_set(
        n,
        filler_endpoints,
        &[
            (
                n / 2,
                BenchService::new("bench", BENCH_VIP, 80, SERVER_PORT, eps.clone())
                    .with_node_port(BENCH_NODE_PORT)
                    .on_node(&node.name),
            ),
            (
                n / 2 + 1,
                BenchService::new(
                    "bench-iperf",
                    IPERF_VIP,
                    IPERF_PORT,
                    IPERF_PORT,
                    vec![backends[0].ip],
                )
                .on_node(&node.name),
            ),
            (
                n,
                BenchService::new("bench-sentinel", SENTINEL_VIP, 80, SERVER_PORT, eps)
                    .on_node(&node.name),
            ),
        ],
    )
}

fn added_service(round: usize, node: &Node, backends: &[Pod; 2]) -> BenchService {
    let last = u8::try_from(round % 250 + 1).unwrap_or(1);
    BenchService::new(
        &format!("bench-added-{round}"),
        Ipv4Addr::new(10, 96, 1, last),
        80,
        SERVER_PORT,
        backend_set(backends),
    )
    .on_node(&node.name)
}

/// The nftables table Twill's agent installs on `node` for egress masquerade, from the agent's
/// own renderer with the sets its route plan gives it (this node's pod CIDR masqueraded, every
/// pod CIDR and node IP exempt, pod↔pod untracked). Loaded alone by the `direct-masq`
/// contender, it measures what its netfilter hooks cost untranslated pod↔pod traffic.
fn twill_masquerade_table(lab: &Lab, node: &Node) -> String {
    let pod_cidrs: Vec<Ipv4Network> = lab.nodes.iter().map(|n| n.pod_cidr).collect();
    let mut exempt = pod_cidrs.clone();
    exempt.extend(lab.nodes.iter().map(|n| Ipv4Network::from(n.ip)));
    MasqueradeRules::new(vec![node.pod_cidr], exempt, pod_cidrs).render()
}

/// The p99 series of a latency run: p99 shares the rounds (and failures) of the p50 `series`;
/// its ratios are computed the same way, per round against direct's p99.
fn p99_series(
    series: &[Series],
    p99: &BTreeMap<String, Vec<Option<f64>>>,
    n: usize,
) -> Vec<Series> {
    let direct99 = p99.get(Contender::Direct.name());
    series
        .iter()
        .map(|se| {
            let mut s99 = Series::new(Contender::Direct, n);
            s99.contender.clone_from(&se.contender);
            s99.rounds = p99.get(&se.contender).cloned().unwrap_or_default();
            s99.failures = se.failures;
            s99.errors.clone_from(&se.errors);
            let values: Vec<f64> = s99.rounds.iter().flatten().copied().collect();
            s99.summary = stats::summarize(&values);
            if let Some(d) = direct99 {
                s99.ratios = stats::ratios(&s99.rounds, d);
                s99.ratio = stats::summarize(&s99.ratios);
            }
            s99
        })
        .collect()
}

/// A running side-by-side benchmark.
pub struct Bench<'a> {
    lab: &'a Lab,
    cfg: BenchConfig,
    setups: Vec<Setup<'a>>,
    started: Instant,
    results: BenchResults,
}

impl<'a> Bench<'a> {
    /// Builds each contender's node: sysctls, pods through twill-cni, servers, and for Twill
    /// its agent. A contender whose setup fails is recorded as unavailable.
    pub fn new(lab: &'a Lab, cfg: BenchConfig) -> Result<Self> {
        let started = Instant::now();
        let metric = |name: &str, unit: &str, higher: bool, backends: usize| Metric {
            name: name.into(),
            unit: unit.into(),
            higher_is_better: higher,
            backends,
            series: Vec::new(),
        };
        let mut results = BenchResults {
            started_unix_s: u64::try_from(unix_ns() / 1_000_000_000).unwrap_or(0),
            duration_s: 0.0,
            machine: machine(),
            config: cfg.clone(),
            filler_endpoints: rules::FILLER_ENDPOINTS,
            unavailable: BTreeMap::new(),
            conn_rate: metric("connection rate", "conn/s", true, 2),
            rr_p50: metric("request/response latency p50", "µs", false, 0),
            rr_p99: metric("request/response latency p99", "µs", false, 0),
            throughput: metric("bulk throughput", "Gbit/s", true, 0),
            ns_conn_rate: metric(
                "north-south connection rate via NodePort",
                "conn/s",
                true,
                2,
            ),
            ns_rr_p50: metric("north-south request/response latency p50", "µs", false, 0),
            ns_rr_p99: metric("north-south request/response latency p99", "µs", false, 0),
            control_plane: Vec::new(),
            agent_rss: None,
            agent_rss_by_size: BTreeMap::new(),
            agent_cpu_by_size: BTreeMap::new(),
            policy: None,
            cni: serde_json::Value::Null,
            cni_unavailable: None,
            notes: Vec::new(),
        };
        if lab.nodes.len() < cfg.contenders.len() {
            bail!(
                "the lab has {} nodes for {} contenders",
                lab.nodes.len(),
                cfg.contenders.len()
            );
        }
        let mut setups = Vec::new();
        for (i, &contender) in cfg.contenders.iter().enumerate() {
            let node = lab.node(i);
            match Self::setup(lab, node, contender) {
                Ok(s) => setups.push(s),
                Err(e) if contender.runs_twill() => {
                    results
                        .unavailable
                        .insert(contender.name().into(), format!("{e:#}"));
                }
                Err(e) => {
                    return Err(e.context(format!("setting up the {} contender", contender.name())));
                }
            }
        }
        if cfg.north_south {
            Self::setup_external(lab, &setups)?;
        }
        Ok(Self {
            lab,
            cfg,
            setups,
            started,
            results,
        })
    }

    /// The external client: a route to every contender's pod CIDR via that node (the direct
    /// north-south path), and the same client-port sysctls as the pods.
    fn setup_external(lab: &Lab, setups: &[Setup<'_>]) -> Result<()> {
        let ext = external(lab)?;
        let in_ext = |args: &[&str]| run_cmd(ext.cmd(args[0]).args(&args[1..]));
        sysctl(in_ext, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(in_ext, "net.ipv4.ip_local_port_range", "1024 65000")?;
        for s in setups {
            run_cmd(std::process::Command::new("ip").args([
                "-n",
                &ext.netns,
                "route",
                "replace",
                &s.node.pod_cidr.to_string(),
                "via",
                &s.node.ip.to_string(),
            ]))
            .with_context(|| format!("route to {}'s pods from the external client", s.name()))?;
        }
        Ok(())
    }

    fn setup(lab: &'a Lab, node: &'a Node, contender: Contender) -> Result<Setup<'a>> {
        // NAT benchmarks on this machine collapse when client ports meet old conntrack entries
        // in TIME_WAIT (LAB.md "Benchmark pitfalls"); and the probe needs ICMP errors for
        // unroutable VIPs at once, not rate-limited to one a second.
        sysctl(
            |a| node.run(a),
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
            "1",
        )?;
        sysctl(|a| node.run(a), "net.ipv4.icmp_ratemask", "0")?;
        let client = node
            .add_pod("client")
            .context("creating the client pod with twill-cni")?;
        let backends = [node.add_pod("be-a")?, node.add_pod("be-b")?];
        for pod in std::iter::once(&client).chain(&backends) {
            // Client ports are reused quickly under load: allow reuse of TIME_WAIT ports.
            sysctl(|a| pod.run(a), "net.ipv4.tcp_tw_reuse", "1")?;
            sysctl(|a| pod.run(a), "net.ipv4.ip_local_port_range", "1024 65000")?;
        }
        for (pod, id) in backends.iter().zip(["a", "b"]) {
            let mut cmd = pod.cmd(bin("loadgen"));
            cmd.args(["serve", "--port", &SERVER_PORT.to_string(), "--id", id]);
            lab.track(spawn_and_wait_ready(cmd)?);
        }
        let mut iperf = backends[0].cmd("iperf3");
        iperf
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.track(iperf.spawn().context("spawning iperf3 -s")?);
        wait_for(Duration::from_secs(10), "iperf3 to listen", || {
            Ok(backends[0]
                .run(&["ss", "-Htln"])?
                .contains(&format!(":{IPERF_PORT}"))
                .then_some(()))
        })?;
        if contender == Contender::DirectMasq {
            run_with_input(
                node,
                &["nft", "-f", "-"],
                &twill_masquerade_table(lab, node),
            )?;
        }
        let agent = if contender.runs_twill() {
            Some(start_agent(node)?)
        } else {
            None
        };
        Ok(Setup {
            contender,
            node,
            client,
            backends,
            agent,
            programmed: Vec::new(),
            unavailable: None,
        })
    }

    fn over_budget(&mut self, what: &str) -> bool {
        if self.started.elapsed() > self.cfg.budget {
            self.results.notes.push(format!(
                "time budget {:?} reached: skipped {what}",
                self.cfg.budget
            ));
            true
        } else {
            false
        }
    }

    fn mark_unavailable(&mut self, idx: usize, reason: String) {
        let s = &mut self.setups[idx];
        let reason = if s.contender.runs_twill() {
            format!("{reason} (agent log: {})", s.agent_log_tail())
        } else {
            reason
        };
        self.results
            .unavailable
            .insert(s.name().into(), reason.clone());
        s.unavailable = Some(reason);
    }

    fn active(&self) -> Vec<usize> {
        (0..self.setups.len())
            .filter(|&i| self.setups[i].unavailable.is_none())
            .collect()
    }

    /// Runs everything the config asks for and returns the results.
    pub fn run(mut self) -> Result<BenchResults> {
        // First, while the agent holds no Services: its RSS growth is the policy world's alone.
        self.policy_phase();
        let sizes = self.cfg.sizes.clone();
        let mut all_sizes: Vec<usize> = sizes
            .iter()
            .chain(&self.cfg.program_sizes)
            .copied()
            .collect();
        all_sizes.sort_unstable();
        all_sizes.dedup();
        for n in all_sizes {
            if self.over_budget(&format!("N={n} and larger")) {
                break;
            }
            self.program_size(n)?;
            if sizes.contains(&n) {
                self.data_path(n)?;
            }
        }
        if let Some((services, endpoints)) = self.cfg.rss_scale
            && !self.over_budget("the agent memory measurement")
        {
            self.agent_rss(services, endpoints)?;
        }
        self.fastpath_counters();
        self.results.duration_s = self.started.elapsed().as_secs_f64();
        Ok(self.results)
    }

    /// The fast-path counters of every node running the agent (`twill-agent debug fastpath`),
    /// as notes: whether the rounds took the fast path or fell back to the stack, and why.
    fn fastpath_counters(&mut self) {
        for s in &self.setups {
            if s.agent.is_none() {
                continue;
            }
            let note = match s.node.debug(&["fastpath"]) {
                Ok(out) => {
                    let counters: Vec<String> = out
                        .lines()
                        .filter_map(|l| {
                            let mut w = l.split_whitespace();
                            let (name, n) = (w.next()?, w.next()?);
                            (n.parse::<u64>().ok()? > 0).then(|| format!("{name} {n}"))
                        })
                        .collect();
                    format!("{} fast path: {}", s.name(), counters.join(", "))
                }
                Err(e) => format!("{} fast path counters unavailable: {e:#}", s.name()),
            };
            self.results.notes.push(note);
            // Drops (`debug drops`, KIND drop): a dropped packet of an allowed flow costs a
            // retransmission (a SYN's: a second), visible in a round's rate but not as a failure.
            let note = match s.node.debug(&["drops"]) {
                Ok(out) => {
                    let drops: Vec<String> = out
                        .lines()
                        .filter_map(|l| {
                            let w: Vec<&str> = l.split_whitespace().collect();
                            match w.as_slice() {
                                [name, "drop", n] if n.parse::<u64>().ok()? > 0 => {
                                    Some(format!("{name} {n}"))
                                }
                                _ => None,
                            }
                        })
                        .collect();
                    format!("{} drops: {}", s.name(), drops.join(", "))
                }
                Err(e) => format!("{} drop counters unavailable: {e:#}", s.name()),
            };
            self.results.notes.push(note);
        }
    }

    /// Programs every contender with `n` Services from scratch (timed when `n` is a program
    /// size), then times adding single Services.
    fn program_size(&mut self, n: usize) -> Result<()> {
        let timed = self.cfg.program_sizes.contains(&n);
        let limit = self.cfg.program_limit;
        for idx in self.active() {
            let lab = self.lab;
            let s = &mut self.setups[idx];
            if s.contender.is_direct() {
                continue;
            }
            let set = data_set(n, s.node, &s.backends, rules::FILLER_ENDPOINTS);
            let mut cp = ControlPlane {
                contender: s.name().into(),
                services: n,
                from_scratch_ms: None,
                command_ms: None,
                add_one_ms: Vec::new(),
                add_one: None,
                errors: Vec::new(),
            };
            let outcome = s.clear(lab).and_then(|()| {
                s.timed_to_first_connection(lab, &target(SENTINEL_VIP, 80), limit, |s, lab| {
                    s.program_full(lab, &set)
                })
            });
            match outcome {
                Ok((ms, cmd_ms)) => {
                    cp.from_scratch_ms = Some(ms);
                    cp.command_ms = Some(cmd_ms);
                }
                Err(e) => {
                    let reason = format!("programming {n} Services: {e:#}");
                    if s.contender != Contender::Twill {
                        return Err(anyhow!(reason));
                    }
                    self.mark_unavailable(idx, reason);
                    continue;
                }
            }
            if timed {
                for r in 0..self.cfg.add_one_rounds {
                    let new = added_service(r, s.node, &s.backends);
                    let to = target(new.vip, 80);
                    match s.timed_to_first_connection(lab, &to, limit, |s, lab| {
                        s.program_add(lab, &new)
                    }) {
                        Ok((ms, _)) => cp.add_one_ms.push(ms),
                        Err(e) => cp.errors.push(format!("adding {}: {e:#}", new.name)),
                    }
                }
                cp.add_one = stats::summarize(&cp.add_one_ms);
                self.results.control_plane.push(cp);
            }
            let s = &self.setups[idx];
            if let Some(pid) = s.agent.as_ref().and_then(Agent::pid)
                && let Ok(kib) = kib_rss(pid)
            {
                self.results.agent_rss_by_size.insert(n, kib);
            }
        }
        Ok(())
    }

    /// Rounds of one measurement over every active contender, interleaved and rotated.
    fn rounds<F>(&mut self, rounds: usize, n: usize, mut measure: F) -> Vec<Series>
    where
        F: FnMut(&Setup<'_>) -> Result<(f64, u64, BTreeMap<String, u64>)>,
    {
        let active = self.active();
        let mut series: Vec<Series> = active
            .iter()
            .map(|&i| Series::new(self.setups[i].contender, n))
            .collect();
        for r in 0..rounds {
            for k in 0..active.len() {
                let slot = (k + r) % active.len();
                let s = &self.setups[active[slot]];
                let out = s.flush_conntrack().and_then(|()| measure(s));
                series[slot].record(r, out);
            }
        }
        summarize(&mut series);
        series
    }

    /// Rounds of one load over every active contender at the same time, taking turns in
    /// [`SLOT`] windows (see [`Slots`]), each contender's client active for `active` in all.
    /// Which window of the cycle a contender gets rotates every round. `start` launches a
    /// contender's client on the schedule; `finish` waits for it and reads its value.
    fn taking_turns<S, F>(
        &mut self,
        tag: &str,
        rounds: usize,
        n: usize,
        active: Duration,
        start: S,
        mut finish: F,
    ) -> Vec<Series>
    where
        S: Fn(&Setup<'_>, &Slots) -> Result<loadgen::Running>,
        F: FnMut(&Setup<'_>, loadgen::Running) -> Result<RoundValue>,
    {
        let active_idx = self.active();
        let mut series: Vec<Series> = active_idx
            .iter()
            .map(|&i| Series::new(self.setups[i].contender, n))
            .collect();
        let count = u32::try_from(active_idx.len()).unwrap_or(1).max(1);
        for r in 0..rounds {
            let mut outcomes: Vec<Result<RoundValue>> = Vec::new();
            let mut running = Vec::new();
            for &i in &active_idx {
                if let Err(e) = self.setups[i].flush_conntrack() {
                    outcomes.push(Err(e));
                }
            }
            if outcomes.is_empty() {
                // The whole round (all contenders' turns) when a profile is asked for; its
                // samples carry Unix time (`-k realtime`), so each falls in a known turn.
                let _profile = Profile::start(&format!("{tag}-round{r}"));
                let from_ns = unix_ns() + TURNS_START_MARGIN.as_nanos();
                let until_ns = from_ns + active.as_nanos() * u128::from(count);
                for (pos, &i) in active_idx.iter().enumerate() {
                    let slots = Slots {
                        from_ns,
                        until_ns,
                        slot_ns: SLOT.as_nanos(),
                        slots: count,
                        k: (u32::try_from(pos + r).unwrap_or(0)) % count,
                    };
                    running.push(start(&self.setups[i], &slots));
                }
                for (run, &i) in running.into_iter().zip(&active_idx) {
                    outcomes.push(run.and_then(|run| finish(&self.setups[i], run)));
                }
            } else {
                outcomes = active_idx
                    .iter()
                    .map(|_| Err(anyhow!("conntrack flush before the round failed")))
                    .collect();
            }
            for (se, out) in series.iter_mut().zip(outcomes) {
                se.record(r, out);
            }
        }
        summarize(&mut series);
        series
    }

    fn data_path(&mut self, n: usize) -> Result<()> {
        // The agent shares the machine's CPUs with the load: what it uses while nothing
        // changes is part of Twill's cost.
        let agent_pid = self
            .setups
            .iter()
            .find_map(|s| s.agent.as_ref().and_then(Agent::pid));
        let cpu_start = agent_pid.and_then(|p| cpu_time(p).ok().map(|t| (t, Instant::now())));
        let out = self.data_path_rounds(n);
        if let (Some(pid), Some((t0, w0))) = (agent_pid, cpu_start)
            && let Ok(t1) = cpu_time(pid)
        {
            self.results.agent_cpu_by_size.insert(
                n,
                AgentCpu {
                    cpu_ms: (t1.saturating_sub(t0)).as_secs_f64() * 1e3,
                    wall_ms: w0.elapsed().as_secs_f64() * 1e3,
                },
            );
        }
        out
    }

    fn data_path_rounds(&mut self, n: usize) -> Result<()> {
        let (threads, warm) = (self.cfg.crr_threads, self.cfg.warmup);
        // Warm-up (not recorded): caches, conntrack zones, the pods' first ARP/neighbour entries.
        for idx in self.active() {
            let s = &self.setups[idx];
            if let Err(e) = s
                .flush_conntrack()
                .and_then(|()| s.crr(self.lab, Path::EastWest, warm, threads))
            {
                if s.contender.runs_twill() {
                    self.mark_unavailable(idx, format!("warm-up at N={n}: {e:#}"));
                } else {
                    return Err(e.context(format!("warm-up of {} at N={n}", s.name())));
                }
            }
        }
        let series = self.conn_rate_rounds(self.cfg.rounds, n, Path::EastWest);
        self.results.conn_rate.series.extend(series);
        if self.over_budget(&format!("latency and throughput at N={n}")) {
            return Ok(());
        }
        let (p50, p99) = self.latency_rounds(self.cfg.rr_rounds, n, Path::EastWest);
        self.results.rr_p50.series.extend(p50);
        self.results.rr_p99.series.extend(p99);
        let secs = self.cfg.iperf_seconds;
        let series = self.rounds(self.cfg.iperf_rounds, n, |s| {
            let out = s.client.run(&[
                "iperf3",
                "-c",
                &s.iperf_target().to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ])?;
            let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .ok_or_else(|| anyhow!("iperf3 output without end.sum_received.bits_per_second"))?;
            Ok((bps / 1e9, 0, BTreeMap::new()))
        });
        self.results.throughput.series.extend(series);
        if self.cfg.north_south && !self.over_budget(&format!("north-south at N={n}")) {
            self.north_south(n)?;
        }
        Ok(())
    }

    /// From outside every node to each node's NodePort (Twill: the tc program on the node's
    /// device; iptables/nftables: kube-proxy's NodePort rules with masquerade), against the
    /// external client routed straight to the pods.
    fn north_south(&mut self, n: usize) -> Result<()> {
        // A lab without the external client is a setup error, not a failed round.
        external(self.lab)?;
        let (threads, warm) = (self.cfg.crr_threads, self.cfg.warmup);
        for idx in self.active() {
            let s = &self.setups[idx];
            if let Err(e) = s
                .flush_conntrack()
                .and_then(|()| s.crr(self.lab, Path::NorthSouth, warm, threads))
            {
                // Recorded per round below; a warm-up failure alone does not end the run.
                eprintln!("  north-south warm-up of {} at N={n}: {e:#}", s.name());
            }
        }
        let rounds = self.cfg.ns_rounds;
        let series = self.conn_rate_rounds(rounds, n, Path::NorthSouth);
        self.results.ns_conn_rate.series.extend(series);
        let (p50, p99) = self.latency_rounds(rounds, n, Path::NorthSouth);
        self.results.ns_rr_p50.series.extend(p50);
        self.results.ns_rr_p99.series.extend(p99);
        Ok(())
    }

    /// Connection-rate rounds on `path` over every active contender (printed as they end).
    fn conn_rate_rounds(&mut self, rounds: usize, n: usize, path: Path) -> Vec<Series> {
        let (lab, threads, d) = (self.lab, self.cfg.crr_threads, self.cfg.crr_duration);
        let label = path.label();
        let tag = format!("crr-{}N{n}", label.replace(' ', "-"));
        let series = self.taking_turns(
            &tag,
            rounds,
            n,
            d,
            |s, slots| s.start_crr(lab, path, threads, slots),
            |s, run| {
                let r: loadgen::CrrReport = run.finish()?;
                if let Some(e) = &r.first_error {
                    eprintln!(
                        "  {} N={n}: {label}{} failures, first: {e}",
                        s.name(),
                        r.failures
                    );
                }
                Ok((r.rate, r.failures, r.per_backend))
            },
        );
        for se in &series {
            eprintln!(
                "  {label}conn rate N={n} {:<16} median {:>9.0} conn/s  ratio {}",
                se.contender,
                se.summary.map_or(f64::NAN, |s| s.median),
                se.ratio
                    .map_or_else(|| "-".into(), |r| format!("{:.3}", r.median))
            );
        }
        series
    }

    /// Latency rounds on `path`: the p50 series and the p99 series of the same rounds.
    fn latency_rounds(
        &mut self,
        rounds: usize,
        n: usize,
        path: Path,
    ) -> (Vec<Series>, Vec<Series>) {
        let (lab, d) = (self.lab, self.cfg.rr_duration);
        let mut p99: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
        let tag = format!("rr-{}N{n}", path.label().replace(' ', "-"));
        let series = self.taking_turns(
            &tag,
            rounds,
            n,
            d,
            |s, slots| s.start_rr(lab, path, slots),
            |s, run| {
                let r: loadgen::RrReport = run.finish()?;
                if let Some(e) = &r.first_error {
                    bail!("{e}");
                }
                p99.entry(s.name().into()).or_default().push(Some(r.p99_us));
                Ok((r.p50_us, r.failures, r.per_backend))
            },
        );
        let p99 = p99_series(&series, &p99, n);
        (series, p99)
    }

    /// Twill's agent RSS with `services` Services of `endpoints` endpoints each.
    fn agent_rss(&mut self, services: usize, endpoints: usize) -> Result<()> {
        let Some(idx) = self
            .active()
            .into_iter()
            .find(|&i| self.setups[i].contender == Contender::Twill)
        else {
            return Ok(());
        };
        let lab = self.lab;
        let limit = self.cfg.program_limit;
        let s = &mut self.setups[idx];
        let set = data_set(services, s.node, &s.backends, endpoints);
        let outcome = s.clear(lab).and_then(|()| {
            s.timed_to_first_connection(lab, &target(SENTINEL_VIP, 80), limit, |s, lab| {
                s.program_full(lab, &set)
            })
        });
        match outcome {
            Ok((ms, _)) => {
                let pid = s
                    .agent
                    .as_ref()
                    .and_then(Agent::pid)
                    .ok_or_else(|| anyhow!("agent has no pid"))?;
                let rss_kib = kib_rss(pid)?;
                std::thread::sleep(RSS_SETTLE);
                let settled_kib = Some(kib_rss(pid)?);
                self.results.agent_rss = Some(AgentRss {
                    services,
                    endpoints: services * endpoints,
                    rss_kib,
                    settled_kib,
                    programmed_ms: ms,
                });
            }
            Err(e) => self
                .results
                .notes
                .push(format!("agent RSS at {services} Services: {e:#}")),
        }
        Ok(())
    }
}
