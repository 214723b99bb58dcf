//! The Markdown report of a run: tables per measurement and the targets of ANCHORS.md marked
//! met / not met / not measured. Pure formatting of [`BenchResults`].
use std::fmt::Write as _;

use super::{
    harness::{BenchResults, Metric, PEER, PolicyResults, Series, percentile},
    stats::{self, Summary},
};

fn fmt_summary(s: Option<Summary>, digits: usize) -> String {
    s.map_or_else(
        || "–".into(),
        |s| format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits),
    )
}

fn series<'a>(m: &'a Metric, contender: &str, n: usize) -> Option<&'a Series> {
    m.series
        .iter()
        .find(|s| s.contender == contender && s.services == n)
}

fn sizes(m: &Metric) -> Vec<usize> {
    let mut v: Vec<usize> = m.series.iter().map(|s| s.services).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn contenders(r: &BenchResults) -> Vec<String> {
    r.config
        .contenders
        .iter()
        .map(|c| c.name().to_owned())
        .collect()
}

fn metric_table(out: &mut String, r: &BenchResults, m: &Metric, digits: usize) {
    let _ = writeln!(out, "\n### {} ({})\n", m.name, m.unit);
    let _ = writeln!(
        out,
        "median (min–max) per round; ratio = per-round value / direct of the same round\n"
    );
    let _ = writeln!(
        out,
        "| Services | contender | {} | ratio vs direct | clean |",
        m.unit
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---|");
    for n in sizes(m) {
        for c in contenders(r) {
            let Some(s) = series(m, &c, n) else { continue };
            let clean = if s.clean(m.backends) {
                "yes".to_owned()
            } else {
                format!(
                    "NO: {} failures, backends {:?}, {}",
                    s.failures,
                    s.per_backend,
                    s.errors.join("; ")
                )
            };
            let _ = writeln!(
                out,
                "| {n} | {c} | {} | {} | {clean} |",
                fmt_summary(s.summary, digits),
                fmt_summary(s.ratio, 3)
            );
        }
    }
}

/// Per-round ratio between two contenders of one metric at one size.
fn pair_ratio(m: &Metric, a: &str, b: &str, n: usize) -> Option<Summary> {
    let (sa, sb) = (series(m, a, n)?, series(m, b, n)?);
    stats::summarize(&stats::ratios(&sa.rounds, &sb.rounds))
}

struct Target {
    what: String,
    goal: String,
    measured: String,
    verdict: &'static str,
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

fn targets(r: &BenchResults) -> Vec<Target> {
    let mut t = Vec::new();
    let twill_down = r
        .unavailable
        .get("twill")
        .map(|_| "twill unavailable (see above)".to_owned());
    let na = |why: &Option<String>| why.clone().unwrap_or_else(|| "not in this run".into());
    let mut ratio_target =
        |what: String, goal: String, s: Option<Summary>, ok: &dyn Fn(f64) -> bool| {
            t.push(Target {
                what,
                goal,
                measured: s.map_or_else(
                    || na(&twill_down),
                    |s| format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
                ),
                verdict: verdict(s.map(|s| ok(s.median))),
            });
        };
    for n in sizes(&r.conn_rate) {
        let s = series(&r.conn_rate, "twill", n).and_then(|s| s.ratio);
        ratio_target(
            format!("conn rate via ClusterIP, N={n}"),
            "≥ 1.00× direct (socket LB + eBPF host routing)".into(),
            s,
            &|v| v >= 1.0,
        );
    }
    for n in sizes(&r.ns_conn_rate) {
        let s = series(&r.ns_conn_rate, "twill", n).and_then(|s| s.ratio);
        ratio_target(
            format!("conn rate north-south via NodePort, N={n}"),
            "≥ 0.95× direct (per-packet tc)".into(),
            s,
            &|v| v >= 0.95,
        );
    }
    for n in sizes(&r.conn_rate) {
        ratio_target(
            format!("conn rate vs nftables, N={n}"),
            "≥ 1.05× nftables".into(),
            pair_ratio(&r.conn_rate, "twill", "nftables", n),
            &|v| v >= 1.05,
        );
    }
    if let Some(&max) = sizes(&r.conn_rate).last() {
        if max >= 10_000 {
            ratio_target(
                format!("conn rate vs iptables, N={max}"),
                "≥ 2× iptables at 10k".into(),
                pair_ratio(&r.conn_rate, "twill", "iptables", max),
                &|v| v >= 2.0,
            );
        }
        // Flat in N: the ratio to direct at the largest N over the one at the smallest. The
        // sizes run minutes apart, and this machine's speed changes more than that between
        // them, so absolute rates of different sizes do not compare; ratios to the direct
        // path measured in the same rounds do.
        let flat = (|| {
            let lo = series(&r.conn_rate, "twill", *sizes(&r.conn_rate).first()?)?
                .ratio?
                .median;
            let hi = series(&r.conn_rate, "twill", max)?.ratio?.median;
            Some(Summary {
                median: hi / lo,
                min: hi / lo,
                max: hi / lo,
            })
        })();
        ratio_target(
            format!("twill÷direct at N={max} / at smallest N"),
            "≥ 0.97".into(),
            flat,
            &|v| v >= 0.97,
        );
    }
    for n in sizes(&r.rr_p50) {
        let s = series(&r.rr_p50, "twill", n).and_then(|s| s.ratio);
        ratio_target(
            format!("latency p50, N={n}"),
            "≤ 1.05× direct".into(),
            s,
            &|v| v <= 1.05,
        );
        let s = series(&r.rr_p99, "twill", n).and_then(|s| s.ratio);
        ratio_target(
            format!("latency p99, N={n}"),
            "≤ 1.10× direct".into(),
            s,
            &|v| v <= 1.10,
        );
    }
    for n in sizes(&r.throughput) {
        let s = series(&r.throughput, "twill", n).and_then(|s| s.ratio);
        ratio_target(
            format!("bulk throughput, N={n}"),
            "≥ 0.97× direct".into(),
            s,
            &|v| v >= 0.97,
        );
    }
    control_targets(r, &mut t, &na(&twill_down));
    t
}

/// NetworkPolicy targets (docs/benchmarks.md, "NetworkPolicy").
fn policy_targets(p: &PolicyResults, t: &mut Vec<Target>) {
    let summary = |s: Option<Summary>| {
        s.map_or_else(
            || "–".into(),
            |s| format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
        )
    };
    for se in p.conn_rate.iter().filter(|s| s.contender == "twill") {
        let Some(n) = se.policies else { continue };
        t.push(Target {
            what: format!(
                "pod→pod conn rate, deny + allow + {n} policies, {} pods",
                p.pods
            ),
            goal: "≥ 0.95× no policy".into(),
            measured: summary(se.ratio),
            verdict: verdict(se.ratio.map(|s| s.median >= 0.95)),
        });
    }
    let scratch: Vec<f64> = p.from_scratch.iter().map(|f| f.enforced_ms).collect();
    let s = stats::summarize(&scratch);
    t.push(Target {
        what: format!(
            "{} policies over {} pods compiled and programmed",
            p.from_scratch_policies, p.pods
        ),
        goal: "≤ 1 s (manifest write → enforced)".into(),
        measured: s.map_or_else(
            || "–".into(),
            |s| format!("{:.0} ms ({:.0}–{:.0})", s.median, s.min, s.max),
        ),
        verdict: verdict(s.map(|s| s.max <= 1000.0)),
    });
    #[expect(clippy::cast_precision_loss, reason = "KiB counts")]
    let growth = p
        .rss_before_kib
        .zip(p.rss_after_kib)
        .map(|(b, a)| (a.saturating_sub(b)) as f64 / 1024.0);
    t.push(Target {
        what: format!(
            "agent RSS growth, {} policies over {} pods",
            p.from_scratch_policies, p.pods
        ),
        goal: "≤ 50 MiB".into(),
        measured: growth.map_or_else(|| "–".into(), |g| format!("{g:.1} MiB")),
        verdict: verdict(growth.map(|g| g <= 50.0)),
    });
    let p99 = percentile(&p.enforcement_ms, 0.99);
    t.push(Target {
        what: format!(
            "policy change enforced, p99 of {} changes",
            p.enforcement_ms.len()
        ),
        goal: "≤ 1 s".into(),
        measured: p99.map_or_else(
            || "–".into(),
            |v| {
                format!(
                    "{v:.0} ms (p50 {:.0} ms)",
                    percentile(&p.enforcement_ms, 0.5).unwrap_or(f64::NAN)
                )
            },
        ),
        verdict: verdict(p99.map(|v| v <= 1000.0)),
    });
}

fn policy_section(out: &mut String, p: &PolicyResults) {
    let _ = writeln!(
        out,
        "\n## NetworkPolicy\n\nConnection rate client → server pod (connect + 1 byte + close, port {}) in one \
         node, {} pods known, under the bench namespace's default deny (Ingress + Egress) and one allow policy \
         (both directions), plus N filler policies; `ratio` is per round against the same contender with no \
         policy at all in the same round, `vs {PEER}` per round against the peer with the same policies \
         (another node: noisier). `{PEER}` is kube-network-policies' nftables table with the userspace \
         verdict (nfqueue, absent from this kernel) rendered as nftables chains per pod (see docs/benchmarks.md).\n",
        super::policies::SERVE_PORT,
        p.pods
    );
    let _ = writeln!(
        out,
        "| contender | policies | conn/s | ratio to no policy | vs {PEER} | agent CPU ms/round | clean |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---|");
    for se in &p.conn_rate {
        let clean = if se.clean() {
            "yes".to_owned()
        } else {
            format!("NO: {} failures; {}", se.failures, se.errors.join("; "))
        };
        let cpu: Vec<f64> = se.agent_cpu_ms.iter().flatten().copied().collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {clean} |",
            se.contender,
            se.policies
                .map_or_else(|| "none".into(), |n| format!("deny + allow + {n}")),
            fmt_summary(se.summary, 0),
            fmt_summary(se.ratio, 3),
            fmt_summary(se.ratio_to_peer, 3),
            fmt_summary(stats::summarize(&cpu), 0),
        );
    }
    let _ = writeln!(
        out,
        "\nControl plane ({} policies over {} pods; from the default deny alone to the first connection the \
         allow rule lets through; the agent's share is its own compile + apply time over that span):\n",
        p.from_scratch_policies, p.pods
    );
    for (i, f) in p.from_scratch.iter().enumerate() {
        let _ = writeln!(
            out,
            "- round {}: enforced in {:.0} ms; agent compile + apply {} over {} sync(s)",
            i + 1,
            f.enforced_ms,
            f.agent_sync_ms
                .map_or_else(|| "–".into(), |v| format!("{v:.0} ms")),
            f.agent_syncs
                .map_or_else(|| "–".into(), |v| format!("{v:.0}"))
        );
    }
    if !p.enforcement_ms.is_empty() {
        let _ = writeln!(
            out,
            "\nEnforcement latency of {} single policy changes (one more allowed port each, manifest write → first \
             connection to that port not dropped): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.",
            p.enforcement_ms.len(),
            percentile(&p.enforcement_ms, 0.5).unwrap_or(f64::NAN),
            percentile(&p.enforcement_ms, 0.99).unwrap_or(f64::NAN),
            p.enforcement_ms.iter().copied().fold(f64::NAN, f64::max)
        );
    }
    if let (Some(b), Some(a)) = (p.rss_before_kib, p.rss_after_kib) {
        let _ = writeln!(
            out,
            "\nAgent VmRSS {b} KiB before the world was written, {a} KiB with it and the largest policy set (settled)."
        );
    }
    if !p.agent_gauges.is_empty() {
        let _ = writeln!(
            out,
            "\nAgent gauges with the largest set: {:?}",
            p.agent_gauges
        );
    }
    for e in &p.errors {
        let _ = writeln!(out, "\n- error: {e}");
    }
}

/// Control-plane, CNI and memory targets.
fn control_targets(r: &BenchResults, t: &mut Vec<Target>, na: &str) {
    let cp = r.control_plane.iter().filter(|c| c.contender == "twill");
    let mut any_cp = false;
    for c in cp {
        any_cp = true;
        if c.services >= 10_000 {
            t.push(Target {
                what: format!("program {} Services from scratch", c.services),
                goal: "≤ 1 s to first connection".into(),
                measured: c
                    .from_scratch_ms
                    .map_or_else(|| "–".into(), |v| format!("{v:.0} ms")),
                verdict: verdict(c.from_scratch_ms.map(|v| v <= 1000.0)),
            });
        }
        t.push(Target {
            what: format!("add one Service with {} present", c.services),
            goal: "≤ 10 ms end to end".into(),
            measured: c.add_one.map_or_else(
                || "–".into(),
                |s| format!("{:.1} ms ({:.1}–{:.1})", s.median, s.min, s.max),
            ),
            verdict: verdict(c.add_one.map(|s| s.median <= 10.0)),
        });
    }
    if !any_cp {
        t.push(Target {
            what: "programming 10k Services / adding one".into(),
            goal: "≤ 1 s / ≤ 10 ms".into(),
            measured: na.to_owned(),
            verdict: "not measured",
        });
    }
    for (key, goal, min) in [
        (
            "speedup_sequential",
            "≥ 2× ptp+host-local sequentially",
            2.0,
        ),
        ("speedup_parallel", "≥ 1.5× at 16 in parallel", 1.5),
    ] {
        let s: Option<Summary> = serde_json::from_value(r.cni[key].clone()).ok().flatten();
        t.push(Target {
            what: format!("CNI ADD+DEL {}", key.trim_start_matches("speedup_")),
            goal: goal.into(),
            measured: s.map_or_else(
                || {
                    r.cni_unavailable
                        .clone()
                        .unwrap_or_else(|| "not in this run".into())
                },
                |s| format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max),
            ),
            verdict: verdict(s.map(|s| s.median >= min)),
        });
    }
    #[expect(clippy::cast_precision_loss, reason = "KiB counts")]
    let rss = r.agent_rss.as_ref().map(|a| {
        (
            a.settled_kib.unwrap_or(a.rss_kib) as f64 / 1024.0,
            a.services,
            a.endpoints,
        )
    });
    t.push(Target {
        what: "agent RSS at 10k Services / 50k endpoints".into(),
        goal: "≤ 64 MiB".into(),
        measured: rss.map_or_else(
            || na.to_owned(),
            |(m, s, e)| format!("{m:.1} MiB ({s} Services, {e} endpoints)"),
        ),
        verdict: verdict(rss.map(|(m, s, _)| m <= 64.0 && s >= 10_000)),
    });
    if let Some(p) = &r.policy {
        policy_targets(p, t);
    }
}

/// The whole report.
pub fn markdown(r: &BenchResults) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "# Twill side-by-side benchmark\n");
    let _ = writeln!(
        out,
        "Machine: {} × {}, {} GiB RAM, kernel {}; {}; {}. Run took {:.0} s.\n",
        m.cpus, m.cpu, m.mem_gib, m.kernel, m.iptables, m.nft, r.duration_s
    );
    let c = &r.config;
    let _ = writeln!(
        out,
        "Config: Service counts {:?} (programming timed at {:?}), {} filler endpoints per Service; {} connection-rate \
         rounds of {:?} with {} client threads (warm-up {:?}); {} latency rounds of {:?}; {} iperf3 rounds of {} s; {} add-one rounds.\n",
        c.sizes,
        c.program_sizes,
        r.filler_endpoints,
        c.rounds,
        c.crr_duration,
        c.crr_threads,
        c.warmup,
        c.rr_rounds,
        c.rr_duration,
        c.iperf_rounds,
        c.iperf_seconds,
        c.add_one_rounds
    );
    if !r.unavailable.is_empty() {
        let _ = writeln!(out, "## Unavailable contenders\n");
        for (k, v) in &r.unavailable {
            let _ = writeln!(out, "- **{k}**: {v}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "## Targets (ANCHORS.md)\n\n| target | goal | measured | verdict |\n|---|---|---|---|"
    );
    for t in targets(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            t.what, t.goal, t.measured, t.verdict
        );
    }
    let _ = writeln!(out, "\n## Data path");
    metric_table(&mut out, r, &r.conn_rate, 0);
    metric_table(&mut out, r, &r.rr_p50, 1);
    metric_table(&mut out, r, &r.rr_p99, 1);
    metric_table(&mut out, r, &r.throughput, 2);
    if !r.ns_conn_rate.series.is_empty() {
        let _ = writeln!(
            out,
            "\n## North-south: NodePort from outside the node\n\nThe load client runs in the lab's external \
             namespace (on the underlay, outside every node) and connects to `<node IP>:{}`: Twill \
             translates in its tc program on the node's device (per packet), iptables and nftables \
             with kube-proxy's NodePort rules (externalTrafficPolicy Cluster: DNAT plus masquerade). \
             `direct` is the same client routed through the node straight to the pod IPs.",
            super::harness::BENCH_NODE_PORT
        );
        metric_table(&mut out, r, &r.ns_conn_rate, 0);
        metric_table(&mut out, r, &r.ns_rr_p50, 1);
        metric_table(&mut out, r, &r.ns_rr_p99, 1);
    }
    if let Some(p) = &r.policy {
        policy_section(&mut out, p);
    }
    control_plane_section(&mut out, r);
    cni_section(&mut out, r);
    if !r.notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

fn control_plane_section(out: &mut String, r: &BenchResults) {
    let _ = writeln!(
        out,
        "\n## Control plane\n\nFrom an empty table to the first successful connection to the last Service of the set, and \
         one more Service with N present to its first connection (probe resolution ≈ 1 ms). Rules take \
         effect when the command commits, which can be before the command has exited.\n"
    );
    let _ = writeln!(
        out,
        "| contender | Services | from scratch | of which the command | add one: median (min–max) | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for cp in &r.control_plane {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            cp.contender,
            cp.services,
            cp.from_scratch_ms
                .map_or_else(|| "–".into(), |v| format!("{v:.0} ms")),
            cp.command_ms
                .map_or_else(|| "–".into(), |v| format!("{v:.0} ms")),
            cp.add_one.map_or_else(
                || "–".into(),
                |s| format!("{:.1} ms ({:.1}–{:.1})", s.median, s.min, s.max)
            ),
            if cp.errors.is_empty() {
                "–".into()
            } else {
                cp.errors.join("; ")
            }
        );
    }
    if let Some(a) = &r.agent_rss {
        let _ = writeln!(
            out,
            "\n## Agent memory\n\nVmRSS {} KiB right after programming {} Services / {} endpoints (in {:.0} ms); {} KiB {:?} later (steady state, the target's measure).",
            a.rss_kib,
            a.services,
            a.endpoints,
            a.programmed_ms,
            a.settled_kib
                .map_or_else(|| "not measured".into(), |k| k.to_string()),
            crate::bench::harness::RSS_SETTLE
        );
    }
    if !r.agent_rss_by_size.is_empty() {
        let _ = writeln!(
            out,
            "\nAgent VmRSS after each size: {:?} (Services → KiB)",
            r.agent_rss_by_size
        );
    }
    if !r.agent_cpu_by_size.is_empty() {
        let _ = writeln!(
            out,
            "\nAgent CPU during the data-path rounds of each size (nothing changing; the load runs on the same CPUs):\n"
        );
        for (n, c) in &r.agent_cpu_by_size {
            let _ = writeln!(
                out,
                "- N={n}: {:.0} ms of CPU over {:.1} s ({:.2} % of one CPU)",
                c.cpu_ms,
                c.wall_ms / 1e3,
                if c.wall_ms > 0.0 {
                    c.cpu_ms / c.wall_ms * 100.0
                } else {
                    0.0
                }
            );
        }
    }
}

fn cni_section(out: &mut String, r: &BenchResults) {
    let _ = writeln!(out, "\n## CNI ADD+DEL\n");
    if let Some(why) = &r.cni_unavailable {
        let _ = writeln!(out, "Not measured: {why}");
    } else if !r.cni.is_null() {
        let _ = writeln!(
            out,
            "{} ADD+DEL cycles sequentially and over {} parallel workers per round; pods/s (p50 ADD / p50 DEL in ms).\n",
            r.cni["cycles"], r.cni["parallel"]
        );
        let _ = writeln!(
            out,
            "| round | plugin | sequential | parallel |\n|---:|---|---:|---:|"
        );
        let empty = Vec::new();
        for (i, round) in r.cni["rounds"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .enumerate()
        {
            for key in ["twill", "reference"] {
                let c = &round[key];
                let phase = |p: &serde_json::Value| {
                    format!(
                        "{:.1} ({:.1} / {:.1})",
                        p["pods_per_s"].as_f64().unwrap_or(f64::NAN),
                        p["add"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
                        p["del"]["p50_ms"].as_f64().unwrap_or(f64::NAN)
                    )
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    i + 1,
                    c["name"].as_str().unwrap_or(key),
                    phase(&c["sequential"]),
                    phase(&c["parallel"])
                );
            }
        }
        let sum = |k: &str| fmt_summary(serde_json::from_value(r.cni[k].clone()).ok().flatten(), 2);
        let _ = writeln!(
            out,
            "\nSpeedup twill-cni / reference: sequential {}, parallel {}.",
            sum("speedup_sequential"),
            sum("speedup_parallel")
        );
    } else {
        let _ = writeln!(out, "Not in this run (`cargo xtask bench cni`).");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::{
        Contender,
        harness::{BenchConfig, FromScratch, Machine, PolicySeries},
    };

    fn series(contender: &str, n: usize, rounds: &[f64], ratios: &[f64]) -> Series {
        Series {
            contender: contender.into(),
            services: n,
            rounds: rounds.iter().copied().map(Some).collect(),
            summary: stats::summarize(rounds),
            ratios: ratios.to_vec(),
            ratio: stats::summarize(ratios),
            failures: 0,
            per_backend: BTreeMap::from([("a".into(), 5), ("b".into(), 5)]),
            errors: Vec::new(),
        }
    }

    fn metric(series: Vec<Series>) -> Metric {
        Metric {
            name: "connection rate".into(),
            unit: "conn/s".into(),
            higher_is_better: true,
            backends: 2,
            series,
        }
    }

    fn results(twill: Option<f64>) -> BenchResults {
        let mut conn = vec![
            series("direct", 10, &[100.0, 110.0], &[1.0, 1.0]),
            series("nftables", 10, &[90.0, 100.0], &[0.9, 0.9]),
        ];
        if let Some(r) = twill {
            conn.push(series("twill", 10, &[100.0 * r, 110.0 * r], &[r, r]));
        }
        let empty = || metric(Vec::new());
        BenchResults {
            started_unix_s: 0,
            duration_s: 1.0,
            machine: Machine {
                cpu: "cpu".into(),
                cpus: 2,
                mem_gib: 1.0,
                kernel: "6".into(),
                iptables: "i".into(),
                nft: "n".into(),
            },
            config: BenchConfig::smoke(vec![
                Contender::Direct,
                Contender::Nftables,
                Contender::Twill,
            ]),
            filler_endpoints: 2,
            unavailable: if twill.is_none() {
                BTreeMap::from([("twill".into(), "agent exited".into())])
            } else {
                BTreeMap::new()
            },
            conn_rate: metric(conn),
            rr_p50: empty(),
            rr_p99: empty(),
            throughput: empty(),
            ns_conn_rate: empty(),
            ns_rr_p50: empty(),
            ns_rr_p99: empty(),
            control_plane: Vec::new(),
            agent_rss: None,
            agent_rss_by_size: BTreeMap::new(),
            agent_cpu_by_size: BTreeMap::new(),
            policy: None,
            cni: serde_json::Value::Null,
            cni_unavailable: None,
            notes: Vec::new(),
        }
    }

    fn policy_series(contender: &str, policies: Option<usize>, ratio: f64) -> PolicySeries {
        let s = Summary {
            median: ratio,
            min: ratio,
            max: ratio,
        };
        PolicySeries {
            contender: contender.into(),
            policies,
            rounds: vec![Some(1000.0 * ratio)],
            summary: Some(Summary {
                median: 1000.0 * ratio,
                min: 1000.0 * ratio,
                max: 1000.0 * ratio,
            }),
            ratio: Some(s),
            ratio_to_peer: None,
            failures: 0,
            errors: Vec::new(),
            agent_cpu_ms: Vec::new(),
        }
    }

    #[test]
    fn policy_targets_follow_the_issue() {
        let mut r = results(Some(1.0));
        r.policy = Some(PolicyResults {
            pods: 10_003,
            policy_counts: vec![100, 1_000],
            conn_rate: vec![
                policy_series("twill", None, 1.0),
                policy_series("twill", Some(100), 0.96),
                policy_series("twill", Some(1_000), 0.93),
                policy_series(PEER, Some(1_000), 0.8),
            ],
            from_scratch_policies: 1_002,
            from_scratch: vec![FromScratch {
                enforced_ms: 420.0,
                agent_sync_ms: Some(80.0),
                agent_syncs: Some(1.0),
            }],
            enforcement_ms: (1..=20).map(f64::from).collect(),
            rss_before_kib: Some(20_000),
            rss_after_kib: Some(20_000 + 60 * 1024),
            agent_gauges: BTreeMap::new(),
            errors: Vec::new(),
        });
        let pods = "10003 pods";
        assert_eq!(
            verdict_of(
                &r,
                &format!("pod→pod conn rate, deny + allow + 100 policies, {pods}")
            ),
            "met"
        );
        assert_eq!(
            verdict_of(
                &r,
                &format!("pod→pod conn rate, deny + allow + 1000 policies, {pods}")
            ),
            "NOT met"
        );
        assert_eq!(
            verdict_of(
                &r,
                &format!("1002 policies over {pods} compiled and programmed")
            ),
            "met"
        );
        assert_eq!(
            verdict_of(&r, &format!("agent RSS growth, 1002 policies over {pods}")),
            "NOT met"
        );
        assert_eq!(
            verdict_of(&r, "policy change enforced, p99 of 20 changes"),
            "met"
        );
        let md = markdown(&r);
        assert!(
            md.contains("| knp-nft | deny + allow + 1000 | 800 (800–800) |"),
            "{md}"
        );
    }

    fn verdict_of(r: &BenchResults, what: &str) -> &'static str {
        targets(r)
            .into_iter()
            .find(|t| t.what == what)
            .map_or("missing", |t| t.verdict)
    }

    #[test]
    fn targets_are_marked_from_per_round_ratios() {
        let r = results(Some(1.01));
        assert_eq!(verdict_of(&r, "conn rate via ClusterIP, N=10"), "met");
        // 1.01 / 0.9 ≈ 1.12 ≥ 1.05 against nftables.
        assert_eq!(verdict_of(&r, "conn rate vs nftables, N=10"), "met");
        // The east-west target is ≥ 1.00× direct since eBPF host routing.
        let r = results(Some(0.98));
        assert_eq!(verdict_of(&r, "conn rate via ClusterIP, N=10"), "NOT met");
    }

    #[test]
    fn an_unavailable_twill_is_not_measured_and_says_why() {
        let r = results(None);
        assert_eq!(
            verdict_of(&r, "conn rate via ClusterIP, N=10"),
            "not measured"
        );
        let md = markdown(&r);
        assert!(md.contains("**twill**: agent exited"), "{md}");
        assert!(
            md.contains("| 10 | nftables | 95 (90–100) | 0.900 (0.900–0.900) | yes |"),
            "{md}"
        );
        assert!(
            !md.contains("| met |"),
            "nothing can be met without twill: {md}"
        );
    }
}
