//! `cargo xtask bench ipv6` (also part of the full and `datapath` runs): the IPv6 east-west
//! connection rate of Twill against the IPv6 direct path, with the IPv4 pair of the same run
//! beside it for scale.
//!
//! A two-node dual-stack lab, both nodes' pods set up by twill-cni: node 0 runs no agent (the
//! "direct" contender: the client connects to the backends' own addresses, routed through the
//! node as with any routed CNI), node 1 runs the agent (the client connects to a Service's
//! ClusterIP of that family, and, as "no Service", to the backends' own addresses through the
//! agent's datapath). In each round the series take turns in 100 ms windows (all clients run
//! at once, each only in its own windows: `twill_lab::bench::loadgen::Slots`), so a round's
//! ratios compare the same spells of this machine's varying speed; ratios are per round
//! against the direct path of the same family, summarized as median and range.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use twill_lab::{
    Agent, Lab, LabSpec, Node, Pod,
    bench::{
        loadgen::{self, CrrReport, Running, Slots, unix_ns},
        stats::{self, Summary},
    },
    bin, manifests, spawn_and_wait_ready,
};

const PORT: u16 = 8080;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
/// In the lab's IPv6 Service range.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x80);

/// One measured path: which node's client connects to what.
struct Series {
    name: &'static str,
    family: &'static str,
    /// Index of the series this one's ratio is taken against (the same family's direct path).
    baseline: usize,
    client: usize,
    targets: String,
}

fn targets(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(|ip| SocketAddr::new(*ip, PORT).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A client pod and two backends (serving both families) on `node`.
fn pods(lab: &Lab, node: &Node) -> Result<(Pod, [Pod; 2])> {
    let client = node.add_pod("client6")?;
    let backends = [node.add_pod("be6-a")?, node.add_pod("be6-b")?];
    for pod in std::iter::once(&client).chain(&backends) {
        // As in the IPv4 benchmark: client ports are reused quickly under load.
        for kv in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ] {
            pod.run(&["sysctl", "-qw", kv])?;
        }
    }
    for (pod, id) in backends.iter().zip(["a", "b"]) {
        let mut cmd = pod.cmd(bin("loadgen"));
        cmd.args([
            "serve",
            "--addr",
            "::",
            "--port",
            &PORT.to_string(),
            "--id",
            id,
        ]);
        lab.track(spawn_and_wait_ready(cmd)?);
    }
    Ok((client, backends))
}

fn addrs(backends: &[Pod; 2]) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let v4 = backends.iter().map(|p| IpAddr::V4(p.ip)).collect();
    let v6 = backends
        .iter()
        .map(|p| {
            p.ip6
                .map(IpAddr::V6)
                .with_context(|| format!("pod {} has no IPv6 address", p.name))
        })
        .collect::<Result<_>>()?;
    Ok((v4, v6))
}

/// Waits (bounded) until every series' path answers.
fn wait_answering(series: &[Series], clients: &[&Pod], agent: &mut Agent) -> Result<()> {
    for s in series {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let probe = || {
            let r = loadgen::crr(
                clients[s.client],
                std::slice::from_ref(&s.targets),
                Duration::from_millis(200),
                1,
            )?;
            rate(r, &s.targets)
        };
        while let Err(e) = probe() {
            if !agent.is_running() {
                bail!("the agent exited:\n{}", agent.log());
            }
            if std::time::Instant::now() > deadline {
                return Err(e.context(format!("{} ({}) never answered", s.name, s.family)));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}

/// A crr report's rate, or why it has none (any failed connection fails the run).
fn rate(r: CrrReport, to: &str) -> Result<f64> {
    match r.failures {
        0 => Ok(r.rate),
        n => bail!(
            "{n} failed connections to {to}: {}",
            r.first_error.unwrap_or_default()
        ),
    }
}

/// Runs `rounds` rounds of every series (`duration` each, `threads` client threads).
pub fn run(
    rounds: usize,
    duration: Duration,
    threads: usize,
) -> Result<(serde_json::Value, String)> {
    let lab = Lab::new(LabSpec::nodes(2).with_dual_stack())?;
    let (direct, twill) = (lab.node(0), lab.node(1));
    let (direct_client, direct_be) = pods(&lab, direct)?;
    let (twill_client, twill_be) = pods(&lab, twill)?;
    let (direct4, direct6) = addrs(&direct_be)?;
    let (twill4, twill6) = addrs(&twill_be)?;

    let ports = [("tcp", PORT, PORT, "TCP")];
    let slice_ports = [("tcp", PORT, "TCP")];
    let eps = |ips: &[IpAddr]| -> Vec<(IpAddr, &str)> {
        ips.iter().map(|ip| (*ip, twill.name.as_str())).collect()
    };
    let yaml = [
        manifests::service(
            "default",
            "bench6",
            &[IpAddr::V6(VIP6), IpAddr::V4(VIP4)],
            "RequireDualStack",
            &ports,
        ),
        manifests::endpoint_slice(
            "default",
            "bench6",
            "bench6-v6",
            &eps(&twill6),
            &slice_ports,
        ),
        manifests::endpoint_slice(
            "default",
            "bench6",
            "bench6-v4",
            &eps(&twill4),
            &slice_ports,
        ),
    ]
    .join("---\n");
    lab.apply_manifest("bench6.yaml", &yaml)?;
    let mut agent = twill.start_agent(&[])?;
    let clients = [&direct_client, &twill_client];
    let series = [
        Series {
            name: "direct",
            family: "IPv6",
            baseline: 0,
            client: 0,
            targets: targets(&direct6),
        },
        Series {
            name: "twill, no Service",
            family: "IPv6",
            baseline: 0,
            client: 1,
            targets: targets(&twill6),
        },
        Series {
            name: "twill via ClusterIP",
            family: "IPv6",
            baseline: 0,
            client: 1,
            targets: targets(&[IpAddr::V6(VIP6)]),
        },
        Series {
            name: "direct",
            family: "IPv4",
            baseline: 3,
            client: 0,
            targets: targets(&direct4),
        },
        Series {
            name: "twill via ClusterIP",
            family: "IPv4",
            baseline: 3,
            client: 1,
            targets: targets(&[IpAddr::V4(VIP4)]),
        },
    ];
    // Every path answers before anything is measured (the agent programs the Service).
    wait_answering(&series, &clients, &mut agent)?;
    let mut rates: Vec<Vec<Option<f64>>> = vec![Vec::new(); series.len()];
    for round in 0..rounds {
        eprintln!("==> IPv6 east-west round {}/{rounds}", round + 1);
        let round_rates = turns_round(&series, &clients, round, duration, threads);
        for ((s, r), rates) in series.iter().zip(round_rates).zip(&mut rates) {
            // A failed run is a hole in that round, reported, not a zero.
            if let Err(e) = &r {
                eprintln!("   {} ({}): {e:#}", s.name, s.family);
            }
            rates.push(r.ok());
        }
    }
    drop(agent);
    Ok(report(&series, &rates, rounds, duration, threads))
}

/// One round: the series take turns in 100 ms windows, as the main bench's contenders do (see
/// `twill_lab::bench::loadgen::Slots` for why): all clients run at once, each only in its own
/// windows, which rotate by `round`. Each series' rate, or why it has none.
fn turns_round(
    series: &[Series],
    clients: &[&Pod],
    round: usize,
    duration: Duration,
    threads: usize,
) -> Vec<Result<f64>> {
    let count = u32::try_from(series.len()).unwrap_or(1);
    let from_ns = unix_ns() + 300_000_000;
    let running: Vec<Result<Running>> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let slots = Slots {
                from_ns,
                until_ns: from_ns + duration.as_nanos() * u128::from(count),
                slot_ns: 100_000_000,
                slots: count,
                k: u32::try_from(i + round).unwrap_or(0) % count,
            };
            let mut args = loadgen::crr_args(std::slice::from_ref(&s.targets), threads);
            args.extend(slots.args());
            Running::start(clients[s.client], &args)
        })
        .collect();
    series
        .iter()
        .zip(running)
        .map(|(s, run)| rate(run?.finish()?, &s.targets))
        .collect()
}

/// The phase's JSON and Markdown table from every series' per-round rates.
fn report(
    series: &[Series],
    rates: &[Vec<Option<f64>>],
    rounds: usize,
    duration: Duration,
    threads: usize,
) -> (serde_json::Value, String) {
    let mut md = format!(
        "IPv6 east-west: connect + 1 byte + close from a pod, {rounds} rounds of {:.1} s per \
         series (the series taking turns in 100 ms windows), {threads} client threads, 2 backends on the client's node; ratios per round against \
         the direct path of the same family (median, range).\n\n\
         | family | path | conn/s (median) | × direct (median) | × direct (range) |\n\
         |---|---|---|---|---|\n",
        duration.as_secs_f64()
    );
    let mut rows = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let measured: Vec<f64> = rates[i].iter().flatten().copied().collect();
        let rate = stats::summarize(&measured);
        let ratio: Option<Summary> = (i != s.baseline)
            .then(|| stats::summarize(&stats::ratios(&rates[i], &rates[s.baseline])))
            .flatten();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            s.family,
            s.name,
            rate.map_or("–".into(), |r| format!("{:.0}", r.median)),
            ratio.map_or("–".into(), |r| format!("{:.3}", r.median)),
            ratio.map_or("–".into(), |r| format!("{:.3}–{:.3}", r.min, r.max)),
        );
        rows.push(serde_json::json!({
            "family": s.family, "path": s.name, "rate": rate, "ratio_vs_direct": ratio,
            "rounds": rates[i],
        }));
    }
    (
        serde_json::json!({
            "rounds": rounds, "duration_s": duration.as_secs_f64(), "threads": threads,
            "series": rows,
        }),
        md,
    )
}
