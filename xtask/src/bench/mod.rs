//! `cargo xtask bench`: the side-by-side benchmark. The lab-facing work lives in
//! `twill_lab::bench` (shared with the smoke test); this module picks the profile, builds the
//! binaries, runs, and writes `results/<timestamp>/{results.json,results.md,conn_rate.png}`.
mod dns;
mod ipv6;
mod plot;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use twill_lab::bench::{
    Contender,
    harness::{Bench, BenchConfig, BenchResults, PolicyBenchConfig},
    report, stats,
};
use twill_lab::{Lab, LabSpec};

#[derive(Args)]
pub struct BenchArgs {
    /// About 4 minutes: N = 10 and 1,000, fewer and shorter rounds, no 10k programming.
    #[arg(long)]
    quick: bool,
    /// Use the debug binaries instead of building release ones (numbers are then not
    /// comparable with published results).
    #[arg(long)]
    debug: bool,
    /// Only these contenders (comma-separated: direct,iptables,iptables-legacy,nftables,twill).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these Service counts for the data-path rounds (comma-separated), e.g. `--sizes 10`:
    /// a focused re-measurement with more rounds in the same time.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Connection-rate rounds per size (east-west and north-south alike), instead of the
    /// profile's 3 (quick) or 5.
    #[arg(long)]
    rounds: Option<usize>,
    /// Skip the IPv6 phase (a lab of its own, after the others).
    #[arg(long)]
    no_ipv6: bool,
    /// Re-render results.md and conn_rate.png of an earlier run from its results.json.
    #[arg(long, value_name = "RESULTS_DIR")]
    render: Option<PathBuf>,
    #[command(subcommand)]
    what: Option<BenchCmd>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// CNI ADD+DEL: twill-cni against the reference ptp + host-local.
    Cni,
    /// NetworkPolicy only: Twill with 0 / 100 / 1,000 policies over 10,000 pods against no
    /// policy and against the kube-network-policies nftables peer; control-plane numbers.
    Policy,
    /// DNS from a pod: the agent's node-local responder against dnsmasq serving the same
    /// records (a Service name and a forwarded name).
    Dns,
    /// IPv6 east-west: Twill via an IPv6 ClusterIP and without a Service against the IPv6
    /// direct path (and the IPv4 pair of the same run), in a two-node dual-stack lab. Also part
    /// of the full and `datapath` runs.
    Ipv6,
    /// The full run's data-path phases only (N = 10 / 1,000 / 10,000 east-west, north-south,
    /// latency, bulk, agent CPU and memory, control plane): no NetworkPolicy phase, no CNI
    /// rounds. For re-measuring the fast path in less time (≤ 21 min after the build).
    Datapath,
}

fn full(contenders: Vec<Contender>) -> BenchConfig {
    BenchConfig {
        contenders,
        sizes: vec![10, 1_000, 10_000],
        program_sizes: vec![1_000, 10_000],
        rounds: 5,
        crr_duration: Duration::from_secs(3),
        crr_threads: 2,
        warmup: Duration::from_secs(1),
        rr_rounds: 3,
        rr_duration: Duration::from_secs(2),
        iperf_rounds: 3,
        iperf_seconds: 2,
        add_one_rounds: 3,
        program_limit: Duration::from_mins(3),
        rss_scale: Some((10_000, 5)),
        north_south: true,
        ns_rounds: 3,
        policy: Some(PolicyBenchConfig::full()),
        // The whole run (after the build) is bounded to 25 minutes: 21 for these phases (the
        // NetworkPolicy phase, first, takes about 5), the CNI rounds start only before
        // RUN_LIMIT − CNI_ROUND_MAX, lab setup/teardown the rest.
        budget: Duration::from_mins(21),
    }
}

fn quick(contenders: Vec<Contender>) -> BenchConfig {
    BenchConfig {
        contenders,
        sizes: vec![10, 1_000],
        program_sizes: vec![1_000],
        rounds: 3,
        crr_duration: Duration::from_millis(1500),
        crr_threads: 2,
        warmup: Duration::from_millis(500),
        rr_rounds: 2,
        rr_duration: Duration::from_secs(1),
        iperf_rounds: 2,
        iperf_seconds: 1,
        add_one_rounds: 2,
        program_limit: Duration::from_mins(1),
        rss_scale: None,
        north_south: true,
        ns_rounds: 2,
        // `cargo xtask bench policy` runs the NetworkPolicy phase alone.
        policy: None,
        budget: Duration::from_mins(3),
    }
}

fn contenders(only: &[String]) -> Result<Vec<Contender>> {
    if only.is_empty() {
        return Ok(Contender::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in only {
        match Contender::SELECTABLE.iter().find(|c| c.name() == name) {
            Some(c) => out.push(*c),
            None => bail!(
                "unknown contender {name:?}; known: {}",
                Contender::SELECTABLE
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if !out.contains(&Contender::Direct) {
        // Every ratio is against the direct path of the same round.
        out.insert(0, Contender::Direct);
    }
    Ok(out)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn build(debug: bool, packages: &[&str]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--bins");
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !debug {
        cmd.arg("--release");
    }
    eprintln!(
        "==> build {packages:?} ({})",
        if debug { "debug" } else { "release" }
    );
    let st = cmd.status().context("spawning cargo build")?;
    if !st.success() {
        bail!("cargo build of {packages:?} failed ({st})");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map_or_else(|_| workspace_root().join("target"), PathBuf::from);
    Ok(target.join(if debug { "debug" } else { "release" }))
}

fn timestamp() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn results_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("results").join(timestamp()?);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_results(results: &BenchResults, dir: PathBuf) -> Result<PathBuf> {
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(results)?,
    )?;
    render(results, &dir)?;
    Ok(dir)
}

fn render(results: &BenchResults, dir: &Path) -> Result<()> {
    let mut md = report::markdown(results);
    let names: Vec<String> = results
        .config
        .contenders
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    if !results.conn_rate.series.is_empty() {
        match plot::conn_rate(&results.conn_rate, &names, &dir.join("conn_rate.png")) {
            Ok(true) => md.push_str("\n![connection rate](conn_rate.png)\n"),
            Ok(false) => {
                let _ = write!(
                    md,
                    "\n![connection rate](conn_rate.png) (no font on this machine: chart without text; colours in \
                     order black, red, magenta, blue, green = {})\n",
                    names.join(", ")
                );
            }
            Err(e) => {
                let _ = write!(md, "\nchart not drawn: {e:#}\n");
            }
        }
    }
    // The IPv6 phase runs in a lab of its own after the others (`ipv6.rs`); its table is kept
    // beside results.json and belongs in the report.
    if let Ok(v6) = std::fs::read_to_string(dir.join("ipv6.md")) {
        let _ = write!(md, "\n## IPv6 east-west\n\n{v6}");
    }
    std::fs::write(dir.join("results.md"), &md)?;
    Ok(())
}

/// Rounds and length of the IPv6 phase: (rounds, seconds per series).
fn ipv6_profile(quick: bool) -> (usize, Duration) {
    if quick {
        (2, Duration::from_millis(1500))
    } else {
        (5, Duration::from_secs(3))
    }
}

/// Runs the IPv6 phase and writes ipv6.{json,md} into `dir`; a failure is written as the
/// phase's result (the other phases' numbers stand).
fn run_ipv6(dir: &Path, quick: bool) -> Result<String> {
    let (rounds, duration) = ipv6_profile(quick);
    let (json, md) = match ipv6::run(rounds, duration, 2) {
        Ok(r) => r,
        Err(e) => {
            let why = format!("{e:#}");
            (
                serde_json::json!({ "unavailable": why }),
                format!("not measured: {why}\n"),
            )
        }
    };
    std::fs::write(dir.join("ipv6.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("ipv6.md"), &md)?;
    Ok(md)
}

/// CNI ADD+DEL, twill-cni against the reference ptp + host-local (the CNI session's driver
/// `twill_lab::cni_bench`), in rounds so the speedups get a median and a range like every
/// other ratio here. A failure is reported as "not measured" with its reason.
/// The full run's bound, measured from the end of the build.
const RUN_LIMIT: Duration = Duration::from_mins(25);
/// Upper estimate of one CNI round (500 sequential + 500 parallel cycles of each plugin); a
/// round is not started unless it fits before [`RUN_LIMIT`].
const CNI_ROUND_MAX: Duration = Duration::from_secs(75);

fn run_cni(
    results: &mut BenchResults,
    rounds: usize,
    cycles: usize,
    parallel: usize,
    deadline: Option<Instant>,
) {
    let mut skipped = 0;
    let outcome = (|| -> Result<serde_json::Value> {
        let lab = Lab::new(LabSpec::nodes(1))?;
        let (mut seq, mut par, mut all) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            if deadline.is_some_and(|d| Instant::now() + CNI_ROUND_MAX > d) {
                skipped = rounds - r;
                break;
            }
            eprintln!(
                "==> CNI ADD+DEL round {}/{rounds}: {cycles} cycles sequential, {parallel} in parallel",
                r + 1
            );
            let v = twill_lab::cni_bench::run_both(lab.node(0), cycles, parallel)?;
            seq.extend(v["speedup_sequential"].as_f64());
            par.extend(v["speedup_parallel"].as_f64());
            all.push(v);
        }
        Ok(serde_json::json!({
            "cycles": cycles,
            "parallel": parallel,
            "speedup_sequential": stats::summarize(&seq),
            "speedup_parallel": stats::summarize(&par),
            "rounds": all,
        }))
    })();
    if skipped > 0 {
        results.notes.push(format!(
            "{skipped} of {rounds} CNI rounds skipped to stay within the {RUN_LIMIT:?} bound"
        ));
    }
    match outcome {
        Ok(_) if skipped == rounds => {
            results.cni_unavailable = Some("no time left for a CNI round".into());
        }
        Ok(v) => results.cni = v,
        Err(e) => results.cni_unavailable = Some(format!("{e:#}")),
    }
}

/// `cargo xtask bench dns`: results/<timestamp>/dns.{json,md}.
fn run_dns(args: &BenchArgs) -> Result<()> {
    let bin_dir = build(args.debug, &["twill-lab", "twill-cni", "twill-agent"])?;
    // SAFETY: set before any thread is spawned; the lab library reads it to find the binaries.
    unsafe { std::env::set_var("TWILL_BIN_DIR", &bin_dir) };
    let (rounds, seconds) = if args.quick { (2, 2) } else { (5, 3) };
    let (json, mut md) = dns::run(rounds, seconds, 4)?;
    if args.debug {
        md.push_str("\ndebug binaries (--debug): not comparable with release numbers\n");
    }
    let dir = results_dir()?;
    std::fs::write(dir.join("dns.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("dns.md"), &md)?;
    println!("{md}");
    println!("results: {}", dir.display());
    Ok(())
}

/// `--sizes` and `--rounds`: a focused re-measurement.
fn focus(mut cfg: BenchConfig, args: &BenchArgs) -> BenchConfig {
    if !args.sizes.is_empty() {
        cfg.sizes.clone_from(&args.sizes);
        cfg.program_sizes.retain(|n| args.sizes.contains(n));
    }
    if let Some(r) = args.rounds {
        cfg.rounds = r;
        cfg.ns_rounds = r;
        // Rounds are what the time goes to: the budget grows with them.
        cfg.budget = cfg
            .budget
            .max(Duration::from_mins(1) * u32::try_from(r).unwrap_or(1));
    }
    cfg
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(dir) = &args.render {
        let json = std::fs::read(dir.join("results.json"))
            .with_context(|| format!("reading {}/results.json", dir.display()))?;
        let results: BenchResults =
            serde_json::from_slice(&json).context("parsing results.json")?;
        render(&results, dir)?;
        println!("{}", std::fs::read_to_string(dir.join("results.md"))?);
        return Ok(());
    }
    if matches!(args.what, Some(BenchCmd::Dns)) {
        return run_dns(args);
    }
    if matches!(args.what, Some(BenchCmd::Ipv6)) {
        let bin_dir = build(args.debug, &["twill-lab", "twill-cni", "twill-agent"])?;
        // SAFETY: set before any thread is spawned; the lab library reads it to find the binaries.
        unsafe { std::env::set_var("TWILL_BIN_DIR", &bin_dir) };
        let dir = results_dir()?;
        let mut md = run_ipv6(&dir, args.quick)?;
        if args.debug {
            md.push_str("\ndebug binaries (--debug): not comparable with release numbers\n");
        }
        println!("{md}");
        println!("results: {}", dir.display());
        return Ok(());
    }
    let cni_only = matches!(args.what, Some(BenchCmd::Cni));
    let policy_only = matches!(args.what, Some(BenchCmd::Policy));
    let datapath_only = matches!(args.what, Some(BenchCmd::Datapath));
    let mut contenders = if policy_only {
        // The peer's table goes into the direct contender's node.
        vec![Contender::Direct, Contender::Twill]
    } else {
        contenders(&args.only)?
    };
    let bin_dir = build(args.debug, &["twill-lab", "twill-cni"])?;
    // The agent is built on its own: when it does not build, the other contenders still run
    // and the report says why Twill has no numbers.
    let mut twill_missing = None;
    if !cni_only
        && contenders.contains(&Contender::Twill)
        && let Err(e) = build(args.debug, &["twill-agent"])
    {
        contenders.retain(|c| *c != Contender::Twill);
        twill_missing = Some(format!("twill-agent did not build: {e:#}"));
    }
    let started = Instant::now();
    // SAFETY: set before any thread is spawned; the lab library reads it to find the binaries.
    unsafe { std::env::set_var("TWILL_BIN_DIR", &bin_dir) };
    let cfg = if cni_only {
        let mut c = quick(vec![]);
        c.sizes.clear();
        c.program_sizes.clear();
        c.north_south = false;
        c
    } else if policy_only {
        let mut c = quick(contenders);
        c.sizes.clear();
        c.program_sizes.clear();
        c.north_south = false;
        c.policy = Some(PolicyBenchConfig::full());
        c.budget = Duration::from_mins(10);
        c
    } else if args.quick {
        quick(contenders)
    } else if datapath_only {
        let mut c = full(contenders);
        c.policy = None;
        c
    } else {
        full(contenders)
    };
    let cfg = focus(cfg, args);
    // No `clean_leftovers()` here: it removes every lab on the machine, including labs of
    // tests running in parallel. `cargo xtask lab clean` is the explicit way.
    let mut spec = LabSpec::nodes(cfg.contenders.len().max(1));
    if cfg.north_south {
        spec = spec.with_external_client();
    }
    let lab = Lab::new(spec)?;
    let mut results = Bench::new(&lab, cfg)?.run()?;
    drop(lab);
    if let Some(why) = twill_missing {
        results
            .unavailable
            .insert(Contender::Twill.name().into(), why);
    }
    let dir = results_dir()?;
    if !cni_only && !policy_only && !args.no_ipv6 {
        run_ipv6(&dir, args.quick)?;
    }
    if cni_only {
        run_cni(&mut results, 3, 500, 16, None);
    } else if !args.quick && !policy_only && !datapath_only {
        run_cni(&mut results, 3, 500, 16, Some(started + RUN_LIMIT));
    }
    if args.debug {
        results
            .notes
            .push("debug binaries (--debug): not comparable with release numbers".into());
    }
    let dir = write_results(&results, dir)?;
    println!("{}", std::fs::read_to_string(dir.join("results.md"))?);
    println!("results: {}", dir.display());
    Ok(())
}
