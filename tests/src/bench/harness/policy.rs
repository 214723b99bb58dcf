//! The NetworkPolicy phase of the benchmark: connection rate between two pods under a
//! default deny + one allow policy with 0 / 100 / 1,000 more policies and 10,000 pods known,
//! against the same pods with no policy at all, for Twill and for the kube-network-policies
//! nftables peer (`super::super::policies`), rounds interleaved; then the control plane: 1,000
//! policies from scratch to enforced, the agent's RSS growth, and the enforcement latency of
//! single policy changes measured by probing.
//!
//! Twill runs in its contender's node (the agent reads the world from the manifests directory);
//! the peer's table is loaded into the `direct` contender's node, which has no rules of its own.
//! Both use their node's `client` → `be-a` (port 8080) as the bench namespace's client → server.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{Bench, RSS_SETTLE, Setup, cpu_time, kib_rss, run_with_input, target};
use crate::{
    Agent,
    bench::{
        Contender,
        loadgen::{self, Probe, unix_ns},
        policies::{
            self, BenchPods, CHANGE_BASE, DENIED_PORT, MARKER_BASE, SERVE_PORT, Variant, World,
        },
        stats::{self, Summary},
    },
    wait_for,
};

const OBJECTS_FILE: &str = "bench-policy-objects.json";
const POLICIES_FILE: &str = "bench-policy-policies.json";
/// The peer's name in the results.
pub const PEER: &str = "knp-nft";
/// How long a check connection may wait: a dropped SYN shows as a timeout, a reset at once.
const CHECK_TIMEOUT_MS: &str = "300";

/// What the policy phase runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyBenchConfig {
    /// Filler pods (the bench namespace's three real pods come on top).
    pub filler_pods: usize,
    /// Filler policies on top of the default deny + allow, one data-path variant each.
    pub policy_counts: Vec<usize>,
    pub rounds: usize,
    pub crr_duration: Duration,
    pub crr_threads: usize,
    pub warmup: Duration,
    /// From-scratch timings of the largest policy count (from the default deny alone).
    pub from_scratch_rounds: usize,
    /// Single policy changes whose enforcement latency is probed.
    pub changes: usize,
    /// Bound for one change to take effect.
    pub limit: Duration,
    /// Wait before the settled RSS is read (the agent returns freed heap every few seconds).
    pub rss_settle: Duration,
    /// Also run the kube-network-policies peer (in the direct contender's node).
    pub peer: bool,
}

impl PolicyBenchConfig {
    /// The scale: 10,000 pods, 0 / 100 / 1,000 policies.
    pub fn full() -> Self {
        Self {
            filler_pods: 10_000,
            policy_counts: vec![0, 100, 1_000],
            rounds: 5,
            crr_duration: Duration::from_secs(3),
            crr_threads: 2,
            warmup: Duration::from_secs(1),
            from_scratch_rounds: 3,
            changes: 20,
            limit: Duration::from_secs(30),
            rss_settle: RSS_SETTLE,
            peer: true,
        }
    }

    /// The smallest run through every code path (the smoke test).
    pub fn smoke() -> Self {
        Self {
            filler_pods: 1_000,
            policy_counts: vec![0, 100],
            rounds: 1,
            crr_duration: Duration::from_millis(500),
            crr_threads: 1,
            warmup: Duration::from_millis(200),
            from_scratch_rounds: 1,
            changes: 2,
            limit: Duration::from_secs(30),
            rss_settle: Duration::ZERO,
            peer: true,
        }
    }
}

/// Connection rate of one contender under one policy set, per round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicySeries {
    /// `twill` or [`PEER`].
    pub contender: String,
    /// Filler policies on top of deny + allow; `None`: no policy at all.
    pub policies: Option<usize>,
    pub rounds: Vec<Option<f64>>,
    pub summary: Option<Summary>,
    /// Per round, against the same contender with no policy in the same round.
    pub ratio: Option<Summary>,
    /// Twill only: per round, against the peer with the same policies in the same round.
    pub ratio_to_peer: Option<Summary>,
    pub failures: u64,
    pub errors: Vec<String>,
    /// Twill only: CPU time the agent used during each round's connections (its conntrack
    /// collector's share of a policy's cost shows here, not in the datapath's).
    #[serde(default)]
    pub agent_cpu_ms: Vec<Option<f64>>,
}

impl PolicySeries {
    /// Every round produced a number and no connection failed.
    pub fn clean(&self) -> bool {
        !self.rounds.is_empty()
            && self.rounds.iter().all(Option::is_some)
            && self.failures == 0
            && self.errors.is_empty()
    }
}

/// One from-scratch programming of the largest policy set.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FromScratch {
    /// From the manifest write to the first connection the new allow rule lets through.
    pub enforced_ms: f64,
    /// The agent's own compile + apply time over that span (its
    /// `twill_policy_sync_duration_seconds`), and how many syncs it took.
    pub agent_sync_ms: Option<f64>,
    pub agent_syncs: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyResults {
    /// Pods known to the agent (fillers + the bench namespace's three).
    pub pods: usize,
    pub policy_counts: Vec<usize>,
    pub conn_rate: Vec<PolicySeries>,
    pub from_scratch_policies: usize,
    pub from_scratch: Vec<FromScratch>,
    /// Enforcement latency of single policy changes (manifest write → first connection the
    /// changed rule allows), in order.
    pub enforcement_ms: Vec<f64>,
    /// The agent's VmRSS before the world was written and, settled, with the largest set.
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// The agent's policy gauges with the largest set (identities, rule entries, endpoints).
    pub agent_gauges: BTreeMap<String, f64>,
    /// Why a part did not run or failed.
    pub errors: Vec<String>,
}

/// Nearest-rank percentile of `v` (`q` in 0..=1).
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a short list"
    )]
    let rank = ((s.len() as f64) * q).ceil().max(1.0) as usize;
    s.get(rank - 1).copied()
}

/// What one node runs: Twill (manifests, the agent) or the peer (its nftables table).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Twill,
    Peer,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Twill => Contender::Twill.name(),
            Who::Peer => PEER,
        }
    }
}

/// One node of the phase: its setup, world and the policy set in force.
struct Side {
    who: Who,
    idx: usize,
    world: World,
    current: Variant,
}

fn agent_metrics(setup: &Setup<'_>) -> Result<String> {
    let (code, out) =
        setup
            .node
            .labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
    if code != 0 {
        bail!("GET /metrics in {}: exit {code}: {out}", setup.node.name);
    }
    Ok(out)
}

/// The value of an unlabelled sample `name` in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn bench_pods(s: &Setup<'_>) -> BenchPods {
    BenchPods {
        client: s.client.ip,
        server: s.backends[0].ip,
        other: s.backends[1].ip,
    }
}

impl Side {
    fn setup<'s, 'a>(&self, bench: &'s Bench<'a>) -> &'s Setup<'a> {
        &bench.setups[self.idx]
    }

    /// Puts `variant` in force and waits (bounded) until the client sees it.
    fn switch(&mut self, bench: &Bench<'_>, variant: Variant, limit: Duration) -> Result<()> {
        self.write(bench, variant)?;
        self.wait_applied(bench, variant, limit)?;
        self.current = variant;
        Ok(())
    }

    /// Writes `variant` (the manifest or the table) without waiting.
    fn write(&self, bench: &Bench<'_>, variant: Variant) -> Result<()> {
        match self.who {
            Who::Twill => bench
                .lab
                .apply_manifest(POLICIES_FILE, &World::policies_json(variant)),
            Who::Peer => run_with_input(
                self.setup(bench).node,
                &["nft", "-f", "-"],
                &self.world.knp_nft(variant),
            ),
        }
    }

    /// Whether the client's view matches `variant`: the denied port refused without policies and
    /// dropped with them, the variant's marker (and extra) port refused (allowed, nothing
    /// listens), the previous variant's marker dropped again under the default deny alone; for
    /// Twill also the agent's policy count.
    fn applied(&self, bench: &Bench<'_>, variant: Variant) -> Result<bool> {
        let s = self.setup(bench);
        let server = s.backends[0].ip;
        let mut want: Vec<(u16, &str)> = Vec::new();
        let policies = match variant {
            Variant::NoPolicy => {
                want.push((DENIED_PORT, "refused"));
                0.0
            }
            Variant::DenyOnly => {
                want.push((DENIED_PORT, "timeout"));
                if let Variant::Policies { marker, extra, .. } = self.current {
                    want.push((marker, "timeout"));
                    want.extend(extra.map(|p| (p, "timeout")));
                }
                1.0
            }
            Variant::Policies {
                fillers,
                marker,
                extra,
            } => {
                want.push((DENIED_PORT, "timeout"));
                want.push((marker, "refused"));
                want.extend(extra.map(|p| (p, "refused")));
                #[expect(clippy::cast_precision_loss, reason = "policy counts are small")]
                let n = (fillers + 2) as f64;
                n
            }
        };
        if self.who == Who::Twill
            && metric(&agent_metrics(s)?, "twill_network_policies") != Some(policies)
        {
            return Ok(false);
        }
        let to: Vec<String> = want.iter().map(|(p, _)| target(server, *p)).collect();
        let (_, out) = s.client.labtool(&[
            "probe",
            "--to",
            &to.join(","),
            "--timeout-ms",
            CHECK_TIMEOUT_MS,
        ])?;
        Ok(want.iter().zip(&to).all(|((_, expect), t)| {
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [t.as_str(), *expect])
        }))
    }

    fn wait_applied(&self, bench: &Bench<'_>, variant: Variant, limit: Duration) -> Result<()> {
        wait_for(
            limit,
            &format!("{} to enforce {variant:?}", self.who.name()),
            || Ok(self.applied(bench, variant)?.then_some(())),
        )
    }

    fn crr(&self, bench: &Bench<'_>, d: Duration, threads: usize) -> Result<loadgen::CrrReport> {
        let s = self.setup(bench);
        s.flush_conntrack()?;
        loadgen::crr(
            &s.client,
            &[target(s.backends[0].ip, SERVE_PORT)],
            d,
            threads,
        )
    }
}

/// The data-path variant with `fillers` filler policies (its marker tells it apart).
fn with_fillers(counts: &[usize], fillers: usize) -> Variant {
    let i = counts.iter().position(|c| *c == fillers).unwrap_or(0);
    Variant::Policies {
        fillers,
        marker: MARKER_BASE + u16::try_from(i).unwrap_or(0),
        extra: None,
    }
}

impl Bench<'_> {
    /// Runs the policy phase when configured; records what it measured (and what failed) in
    /// `results.policy`.
    pub(super) fn policy_phase(&mut self) {
        let Some(cfg) = self.cfg.policy.clone() else {
            return;
        };
        let find = |c: Contender| {
            self.active()
                .into_iter()
                .find(|&i| self.setups[i].contender == c)
        };
        let mut res = PolicyResults {
            policy_counts: cfg.policy_counts.clone(),
            ..PolicyResults::default()
        };
        let mut sides = Vec::new();
        if let Some(idx) = find(Contender::Twill) {
            let s = &self.setups[idx];
            let world = World::new(cfg.filler_pods, bench_pods(s), &s.node.name);
            res.pods = world.pod_count();
            sides.push(Side {
                who: Who::Twill,
                idx,
                world,
                current: Variant::NoPolicy,
            });
        } else {
            res.errors
                .push("twill is not running: no Twill policy numbers".into());
        }
        if cfg.peer
            && let Some(idx) = find(Contender::Direct)
        {
            let s = &self.setups[idx];
            let world = World::new(cfg.filler_pods, bench_pods(s), &s.node.name);
            res.pods = world.pod_count();
            sides.push(Side {
                who: Who::Peer,
                idx,
                world,
                current: Variant::NoPolicy,
            });
        }
        eprintln!(
            "==> NetworkPolicy: {} pods, filler policies {:?}",
            res.pods, cfg.policy_counts
        );
        let outcome = self.policy_run(&cfg, &mut sides, &mut res);
        if let Err(e) = outcome {
            res.errors.push(format!("{e:#}"));
        }
        // Back to the state the other phases expect: no policy objects, no peer table.
        for side in &sides {
            let cleanup = match side.who {
                Who::Twill => self
                    .lab
                    .delete_manifest(POLICIES_FILE)
                    .and_then(|()| self.lab.delete_manifest(OBJECTS_FILE))
                    .and_then(|()| side.wait_applied(self, Variant::NoPolicy, cfg.limit)),
                Who::Peer => run_with_input(
                    side.setup(self).node,
                    &["nft", "-f", "-"],
                    &policies::knp_delete(),
                ),
            };
            if let Err(e) = cleanup {
                res.errors
                    .push(format!("cleaning up {}: {e:#}", side.who.name()));
            }
        }
        self.results.policy = Some(res);
    }

    fn policy_run(
        &mut self,
        cfg: &PolicyBenchConfig,
        sides: &mut [Side],
        res: &mut PolicyResults,
    ) -> Result<()> {
        let largest = cfg.policy_counts.iter().copied().max().unwrap_or(0);
        // The world: Twill's agent reads it from the manifests; the peer's table is rendered
        // from the same world per variant.
        for side in sides.iter_mut() {
            match side.who {
                Who::Twill => {
                    let pid = side
                        .setup(self)
                        .agent
                        .as_ref()
                        .and_then(Agent::pid)
                        .ok_or_else(|| anyhow!("the agent has no pid"))?;
                    res.rss_before_kib = kib_rss(pid).ok();
                    self.lab
                        .apply_manifest(OBJECTS_FILE, &side.world.objects_json())?;
                    side.switch(self, Variant::DenyOnly, cfg.limit)?;
                    self.policy_from_scratch(cfg, side, largest, res)?;
                    self.policy_changes(cfg, side, largest, res);
                    let v = with_fillers(&cfg.policy_counts, largest);
                    side.switch(self, v, cfg.limit)?;
                    std::thread::sleep(cfg.rss_settle);
                    res.rss_after_kib = kib_rss(pid).ok();
                    if let Ok(text) = agent_metrics(side.setup(self)) {
                        for g in [
                            "twill_network_policies",
                            "twill_policy_endpoints",
                            "twill_policy_identities",
                            "twill_policy_rules",
                            "twill_policy_sync_errors_total",
                        ] {
                            if let Some(v) = metric(&text, g) {
                                res.agent_gauges.insert(g.into(), v);
                            }
                        }
                    }
                }
                Who::Peer => side.switch(self, Variant::NoPolicy, cfg.limit)?,
            }
        }
        self.policy_rounds(cfg, sides, res)
    }

    /// From the default deny alone to deny + allow + `largest` fillers, to the first
    /// connection the allow rule lets through; the agent's own share from its sync histogram.
    fn policy_from_scratch(
        &self,
        cfg: &PolicyBenchConfig,
        side: &mut Side,
        largest: usize,
        res: &mut PolicyResults,
    ) -> Result<()> {
        res.from_scratch_policies = largest + 2;
        for r in 0..cfg.from_scratch_rounds {
            let marker = MARKER_BASE + 50 + u16::try_from(r % 40).unwrap_or(0);
            let v = Variant::Policies {
                fillers: largest,
                marker,
                extra: None,
            };
            let s = side.setup(self);
            let before = agent_metrics(s).ok();
            let probe = Probe::start_until(
                &s.client,
                &target(s.backends[0].ip, marker),
                cfg.limit,
                true,
            )?;
            let t0 = unix_ns();
            side.write(self, v)?;
            let report = probe.wait()?;
            if !report.ok {
                bail!(
                    "{largest} policies not enforced within {:?} ({} attempts, last error {:?})",
                    cfg.limit,
                    report.attempts,
                    report.last_error
                );
            }
            #[expect(clippy::cast_precision_loss, reason = "nanosecond spans of seconds")]
            let enforced_ms = report.success_unix_ns.saturating_sub(t0) as f64 / 1e6;
            side.wait_applied(self, v, cfg.limit)?;
            side.current = v;
            let after = agent_metrics(side.setup(self)).ok();
            let delta = |name: &str| {
                Some(metric(after.as_deref()?, name)? - metric(before.as_deref()?, name)?)
            };
            res.from_scratch.push(FromScratch {
                enforced_ms,
                agent_sync_ms: delta("twill_policy_sync_duration_seconds_sum").map(|s| s * 1e3),
                agent_syncs: delta("twill_policy_sync_duration_seconds_count"),
            });
            eprintln!(
                "  {} policies over {} pods from scratch: enforced in {enforced_ms:.0} ms",
                largest + 2,
                res.pods
            );
            side.switch(self, Variant::DenyOnly, cfg.limit)?;
        }
        Ok(())
    }

    /// Single changes to the allow policy (one more port each) with `largest` fillers in force:
    /// manifest write → the first connection to the new port that is not dropped.
    fn policy_changes(
        &self,
        cfg: &PolicyBenchConfig,
        side: &mut Side,
        largest: usize,
        res: &mut PolicyResults,
    ) {
        let base = with_fillers(&cfg.policy_counts, largest);
        if let Err(e) = side.switch(self, base, cfg.limit) {
            res.errors.push(format!("before the changes: {e:#}"));
            return;
        }
        let Variant::Policies { marker, .. } = base else {
            return;
        };
        for i in 0..cfg.changes {
            let port = CHANGE_BASE + u16::try_from(i % 200).unwrap_or(0);
            let v = Variant::Policies {
                fillers: largest,
                marker,
                extra: Some(port),
            };
            let outcome = (|| -> Result<f64> {
                let s = side.setup(self);
                let probe = Probe::start_until(
                    &s.client,
                    &target(s.backends[0].ip, port),
                    cfg.limit,
                    true,
                )?;
                let t0 = unix_ns();
                side.write(self, v)?;
                let report = probe.wait()?;
                if !report.ok {
                    bail!("change {i} not enforced within {:?}", cfg.limit);
                }
                #[expect(clippy::cast_precision_loss, reason = "nanosecond spans of seconds")]
                let ms = report.success_unix_ns.saturating_sub(t0) as f64 / 1e6;
                Ok(ms)
            })();
            match outcome {
                Ok(ms) => res.enforcement_ms.push(ms),
                Err(e) => res.errors.push(format!("{e:#}")),
            }
            side.current = v;
            // Changes a little apart, as objects change in a cluster (not one coalesced burst).
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(p99) = percentile(&res.enforcement_ms, 0.99) {
            eprintln!(
                "  policy change → enforced: p50 {:.1} ms, p99 {p99:.1} ms over {} changes",
                percentile(&res.enforcement_ms, 0.5).unwrap_or(f64::NAN),
                res.enforcement_ms.len()
            );
        }
    }

    /// Connection-rate rounds over every (node, policy set), order rotated every round.
    /// One round of one (contender, policy set): `variant` put in force, then the connection
    /// rate; for Twill also the agent's CPU time (ms) over the connections.
    fn policy_round(
        &self,
        cfg: &PolicyBenchConfig,
        side: &mut Side,
        variant: Variant,
    ) -> (Result<loadgen::CrrReport>, Option<f64>) {
        let pid = match side.who {
            Who::Twill => side.setup(self).agent.as_ref().and_then(Agent::pid),
            Who::Peer => None,
        };
        let mut cpu = None;
        let out = side.switch(self, variant, cfg.limit).and_then(|()| {
            let t0 = pid.and_then(|p| cpu_time(p).ok());
            let rep = side.crr(self, cfg.crr_duration, cfg.crr_threads)?;
            cpu = t0
                .zip(pid.and_then(|p| cpu_time(p).ok()))
                .map(|(t0, t1)| t1.saturating_sub(t0).as_secs_f64() * 1e3);
            Ok(rep)
        });
        (out, cpu)
    }

    fn policy_rounds(
        &self,
        cfg: &PolicyBenchConfig,
        sides: &mut [Side],
        res: &mut PolicyResults,
    ) -> Result<()> {
        let mut entries: Vec<(usize, Option<usize>)> = Vec::new();
        for k in 0..sides.len() {
            entries.push((k, None));
            entries.extend(cfg.policy_counts.iter().map(|&n| (k, Some(n))));
        }
        let mut series: Vec<PolicySeries> = entries
            .iter()
            .map(|&(k, n)| PolicySeries {
                contender: sides[k].who.name().into(),
                policies: n,
                rounds: Vec::new(),
                summary: None,
                ratio: None,
                ratio_to_peer: None,
                failures: 0,
                errors: Vec::new(),
                agent_cpu_ms: Vec::new(),
            })
            .collect();
        let variant =
            |n: Option<usize>| n.map_or(Variant::NoPolicy, |n| with_fillers(&cfg.policy_counts, n));
        // Warm-up (not recorded), each node with no policy.
        for side in sides.iter_mut() {
            side.switch(self, Variant::NoPolicy, cfg.limit)?;
            side.crr(self, cfg.warmup, cfg.crr_threads)?;
        }
        let started = Instant::now();
        for r in 0..cfg.rounds {
            for e in 0..entries.len() {
                let slot = (e + r) % entries.len();
                let (k, n) = entries[slot];
                let (out, cpu) = self.policy_round(cfg, &mut sides[k], variant(n));
                let se = &mut series[slot];
                if sides[k].who == Who::Twill {
                    se.agent_cpu_ms.push(cpu);
                }
                match out {
                    Ok(rep) => {
                        se.rounds.push(Some(rep.rate));
                        se.failures += rep.failures;
                        if let Some(err) = rep.first_error {
                            se.errors.push(format!(
                                "round {r}: {} failures, first: {err}",
                                rep.failures
                            ));
                        }
                    }
                    Err(err) => {
                        se.rounds.push(None);
                        se.errors.push(format!("round {r}: {err:#}"));
                    }
                }
            }
        }
        for i in 0..series.len() {
            let values: Vec<f64> = series[i].rounds.iter().flatten().copied().collect();
            series[i].summary = stats::summarize(&values);
            let base = series
                .iter()
                .find(|s| s.contender == series[i].contender && s.policies.is_none())
                .map(|s| s.rounds.clone());
            if let Some(b) = base {
                series[i].ratio = stats::summarize(&stats::ratios(&series[i].rounds, &b));
            }
            if series[i].contender == Who::Twill.name() {
                let peer = series
                    .iter()
                    .find(|s| s.contender == PEER && s.policies == series[i].policies)
                    .map(|s| s.rounds.clone());
                if let Some(p) = peer {
                    series[i].ratio_to_peer =
                        stats::summarize(&stats::ratios(&series[i].rounds, &p));
                }
            }
        }
        for se in &series {
            let cpu: Vec<f64> = se.agent_cpu_ms.iter().flatten().copied().collect();
            eprintln!(
                "  policy conn rate {:<8} {:>14} median {:>9.0} conn/s  ratio to no policy {}  agent CPU {} ms/round",
                se.contender,
                se.policies
                    .map_or_else(|| "no policy".into(), |n| format!("deny+allow+{n}")),
                se.summary.map_or(f64::NAN, |s| s.median),
                se.ratio
                    .map_or_else(|| "-".into(), |r| format!("{:.3}", r.median)),
                stats::summarize(&cpu).map_or_else(|| "-".into(), |s| format!("{:.0}", s.median)),
            );
        }
        eprintln!(
            "  policy rounds took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        res.conn_rate = series;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(10.0));
        assert_eq!(percentile(&v, 0.99), Some(20.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn metric_reads_unlabelled_samples_only() {
        let text = "# HELP x\ntwill_network_policies 1002\ntwill_network_policies_x 3\n\
                    twill_policy_sync_duration_seconds_sum 0.25\n";
        assert_eq!(metric(text, "twill_network_policies"), Some(1002.0));
        assert_eq!(
            metric(text, "twill_policy_sync_duration_seconds_sum"),
            Some(0.25)
        );
        assert_eq!(metric(text, "twill_policy_rules"), None);
    }

    #[test]
    fn data_path_variants_differ_by_marker() {
        let counts = [0, 100, 1_000];
        let markers: Vec<Variant> = counts.iter().map(|&n| with_fillers(&counts, n)).collect();
        assert_eq!(
            markers[2],
            Variant::Policies {
                fillers: 1_000,
                marker: MARKER_BASE + 2,
                extra: None
            }
        );
        assert_ne!(markers[0], markers[1]);
    }
}
