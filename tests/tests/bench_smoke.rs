//! Smoke of `cargo xtask bench`: the harness's whole code path (pods through twill-cni, rule
//! generators loaded by iptables-restore and nft, the load client, probes, per-round ratios) at
//! N=10 with sub-second rounds. It checks that numbers come out and nothing failed; it makes no
//! timing assertions.
use anyhow::{Context as _, Result, ensure};
use twill_lab::{
    bench::{
        Contender,
        harness::{Bench, BenchConfig, BenchResults},
    },
    require,
};

#[test]
fn bench_harness_produces_numbers_without_failures() -> Result<()> {
    let cfg = BenchConfig::smoke(vec![
        Contender::Direct,
        Contender::Iptables,
        Contender::Nftables,
        Contender::Twill,
    ]);
    let Some(lab) =
        require(twill_lab::LabSpec::nodes(cfg.contenders.len()).with_external_client())?
    else {
        return Ok(());
    };
    let results = Bench::new(&lab, cfg)?.run()?;
    // Every contender, Twill included, must produce numbers: a Twill that cannot program
    // Services is the regression this smoke exists to catch.
    for name in ["direct", "iptables", "nftables", "twill"] {
        ensure!(
            !results.unavailable.contains_key(name),
            "{name} unavailable: {:?}",
            results.unavailable.get(name)
        );
    }
    let expected = 4;
    for metric in [
        &results.conn_rate,
        &results.rr_p50,
        &results.rr_p99,
        &results.throughput,
        &results.ns_conn_rate,
        &results.ns_rr_p50,
        &results.ns_rr_p99,
    ] {
        ensure!(
            metric.series.len() == expected,
            "{}: {} series, want {expected}",
            metric.name,
            metric.series.len()
        );
        for s in &metric.series {
            ensure!(
                s.clean(metric.backends),
                "{} of {} not clean: {s:?}",
                metric.name,
                s.contender
            );
            let v = s.summary.map_or(0.0, |x| x.median);
            ensure!(
                v > 0.0 && v.is_finite(),
                "{} of {}: no number ({v})",
                metric.name,
                s.contender
            );
            if s.contender != "direct" {
                ensure!(
                    s.ratio.is_some(),
                    "{} of {}: no ratio to direct",
                    metric.name,
                    s.contender
                );
            }
        }
    }
    let cp: Vec<&str> = results
        .control_plane
        .iter()
        .map(|c| c.contender.as_str())
        .collect();
    for name in ["iptables", "nftables"] {
        ensure!(
            cp.contains(&name),
            "no control-plane numbers for {name}: {cp:?}"
        );
    }
    check_policy(&results)?;
    for c in &results.control_plane {
        ensure!(c.errors.is_empty(), "{}: {:?}", c.contender, c.errors);
        ensure!(
            c.from_scratch_ms.is_some_and(|v| v > 0.0),
            "{}: no programming time",
            c.contender
        );
        ensure!(
            c.add_one_ms.len() == 1,
            "{}: add-one rounds {:?}",
            c.contender,
            c.add_one_ms
        );
    }
    Ok(())
}

/// The NetworkPolicy phase: Twill and the kube-network-policies peer, each with no policy and
/// with every policy count, every round clean; from-scratch programming, the changes'
/// enforcement latencies and the agent's RSS measured.
fn check_policy(results: &BenchResults) -> Result<()> {
    let cfg = results
        .config
        .policy
        .clone()
        .context("the smoke config runs the policy phase")?;
    let p = results.policy.as_ref().context("no policy results")?;
    ensure!(p.errors.is_empty(), "policy phase errors: {:?}", p.errors);
    ensure!(
        p.conn_rate.len() == 2 * (1 + cfg.policy_counts.len()),
        "policy series: {:?}",
        p.conn_rate
    );
    for s in &p.conn_rate {
        ensure!(s.clean(), "policy series not clean: {s:?}");
        ensure!(
            s.summary.is_some_and(|v| v.median > 0.0) && s.ratio.is_some(),
            "policy series without numbers: {s:?}"
        );
        if s.contender == "twill" {
            ensure!(s.ratio_to_peer.is_some(), "no ratio to the peer: {s:?}");
        }
    }
    ensure!(
        p.from_scratch.len() == cfg.from_scratch_rounds
            && p.from_scratch.iter().all(|f| f.enforced_ms > 0.0),
        "from-scratch timings: {:?}",
        p.from_scratch
    );
    ensure!(
        p.enforcement_ms.len() == cfg.changes,
        "enforcement latencies: {:?}",
        p.enforcement_ms
    );
    ensure!(
        p.rss_before_kib.is_some() && p.rss_after_kib.is_some(),
        "agent RSS not measured"
    );
    Ok(())
}
