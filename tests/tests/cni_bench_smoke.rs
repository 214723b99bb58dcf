//! The CNI benchmark driver runs end to end on a small count for both contenders
//! (the full run is `cargo xtask bench cni`). `CNI_BENCH_CYCLES` / `CNI_BENCH_PARALLEL`
//! scale it up for a manual run; the JSON is printed.
use anyhow::{Result, ensure};
use twill_lab::{LabSpec, require};

#[test]
fn cni_bench_driver_measures_both_contenders() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (cycles, parallel) = (env("CNI_BENCH_CYCLES", 12), env("CNI_BENCH_PARALLEL", 4));
    let v = twill_lab::cni_bench::run_both(lab.node(0), cycles, parallel)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    for c in ["twill", "reference"] {
        for p in ["sequential", "parallel"] {
            ensure!(
                v[c][p]["add"]["count"] == cycles && v[c][p]["del"]["count"] == cycles,
                "{c} {p}: {v}"
            );
            ensure!(
                v[c][p]["pods_per_s"].as_f64().is_some_and(|x| x > 0.0),
                "{c} {p}"
            );
        }
    }
    Ok(())
}
