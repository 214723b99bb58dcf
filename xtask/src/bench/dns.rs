//! `cargo xtask bench dns`: the node-local DNS responder against a standard caching forwarder
//! (Debian's dnsmasq) serving the same records, both asked from a pod of a one-node lab.
//!
//! Two names: a Service name (`echo.demo.svc.cluster.local`: the agent answers from its table,
//! dnsmasq from a hosts file) and a forwarded name (`www.example.test`: both forward to the same
//! upstream dnsmasq in another pod and answer later questions from their caches). Each
//! measurement is closed-loop (`labtool dns-load`: a thread asks, waits, asks again) over UDP;
//! rounds are bounded in count and time.
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use twill_lab::{Lab, LabSpec, Pod, bench::stats};

const CLUSTER_IP: &str = "10.96.0.10";
const SERVICE_NAME: &str = "echo.demo.svc.cluster.local";
const FORWARDED_NAME: &str = "www.example.test";
/// The agent's default (node-local) address.
const TWILL: &str = "169.254.20.10:53";

/// One `labtool dns-load` run.
fn load(
    client: &Pod,
    to: &str,
    name: &str,
    seconds: u64,
    threads: u64,
) -> Result<serde_json::Value> {
    let (code, out) = client.labtool(&[
        "dns-load",
        "--to",
        to,
        "--name",
        name,
        "--threads",
        &threads.to_string(),
        "--duration-ms",
        &(seconds * 1000).to_string(),
    ])?;
    if code != 0 {
        bail!("labtool dns-load {to} {name}: {out}");
    }
    serde_json::from_str(&out).with_context(|| format!("dns-load output {out:?}"))
}

/// Runs the DNS benchmark: `rounds` of `seconds` each per (server, name).
pub fn run(rounds: usize, seconds: u64, threads: u64) -> Result<(serde_json::Value, String)> {
    let lab = Lab::new(LabSpec::nodes(1))?;
    let node = lab.node(0);
    let upstream = node.add_pod("upstream")?;
    let upstream_addr = lab.dnsmasq(
        &upstream,
        &format!("10.77.0.1 {FORWARDED_NAME}\n"),
        &["--local=/example.test/"],
    )?;
    let upstream_ip = upstream_addr.trim_end_matches(":53").to_owned();
    std::fs::write(
        node.resolv_conf_path(),
        format!("nameserver {upstream_ip}\n"),
    )?;
    lab.apply_manifest(
        "echo.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\n\
             spec: {{clusterIP: {CLUSTER_IP}, ports: [{{name: http, port: 80}}]}}\n"
        ),
    )?;
    let mut agent = node.start_agent(&[])?;
    let peer = node.add_pod("dnsmasq")?;
    let peer_addr = lab.dnsmasq(
        &peer,
        &format!("{CLUSTER_IP} {SERVICE_NAME}\n"),
        &[&format!("--server={upstream_ip}"), "--cache-size=1000"],
    )?;
    let client = node.add_pod("client")?;
    // Both servers answer both names before measuring (and hold the forwarded one in cache).
    for to in [TWILL, peer_addr.as_str()] {
        for name in [SERVICE_NAME, FORWARDED_NAME] {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let (code, out) = client.labtool(&["dns", "--to", to, "--name", name])?;
                if code == 0 && out.lines().count() > 1 {
                    break;
                }
                if !agent.is_running() {
                    bail!("the agent exited:\n{}", agent.log());
                }
                if std::time::Instant::now() > deadline {
                    bail!("{to} did not answer {name} within 30 s: {out}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let mut rows = Vec::new();
    let mut md = String::from(
        "| name | server | qps (median) | p50 µs (median) | p99 µs (median) | timeouts |\n|---|---|---|---|---|---|\n",
    );
    for (label, name) in [("Service", SERVICE_NAME), ("forwarded", FORWARDED_NAME)] {
        for (server, to) in [("twill", TWILL), ("dnsmasq", peer_addr.as_str())] {
            let runs: Vec<serde_json::Value> = (0..rounds)
                .map(|_| load(&client, to, name, seconds, threads))
                .collect::<Result<_>>()?;
            let pick =
                |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
            let (qps, p50, p99) = (
                stats::summarize(&pick("qps")),
                stats::summarize(&pick("p50_us")),
                stats::summarize(&pick("p99_us")),
            );
            let timeouts: f64 = pick("timeouts").iter().sum();
            let median = |s: Option<stats::Summary>| s.map_or(0.0, |s| s.median);
            let _ = writeln!(
                md,
                "| {label} `{name}` | {server} | {:.0} | {:.0} | {:.0} | {timeouts} |",
                median(qps),
                median(p50),
                median(p99),
            );
            rows.push(serde_json::json!({
                "name": name, "kind": label, "server": server,
                "qps": qps, "p50_us": p50, "p99_us": p99, "runs": runs,
            }));
        }
    }
    Ok((
        serde_json::json!({
            "rounds": rounds, "seconds": seconds, "threads": threads, "results": rows,
        }),
        md,
    ))
}
