//! `twill-agent debug monitor`: the denied-flow stream, through the real agent and kernel
//! programs. A connection a NetworkPolicy denies shows up with both pods named, the direction,
//! protocol and reason, as JSON and as the one-line table form; a flood of denied packets is
//! cut to the kernel's per-CPU budget and what was cut is reported as lost, not silently missing.
mod agent_common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_common::{start_agent, tcp, wait_for};
use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use twill_lab::{Lab, LabSpec, Node, Pod, bin, require};

/// A running `debug monitor` whose output lines arrive on a channel.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(node: &Node, args: &[&str]) -> Result<Self> {
        let mut cmd = node.cmd(bin("twill-agent"));
        cmd.args(["debug", "monitor"])
            .args(args)
            .args(["--api-socket", &node.api_socket().display().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning debug monitor")?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The next line within `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node, a server pod `mon/server` (app=server, TCP 80 and UDP 53 served) isolated for
/// ingress by a policy that admits nothing, and a client pod `mon/client`.
fn setup(lab: &Lab) -> Result<(Pod, Pod)> {
    let node = lab.node(0);
    let server = node.add_pod("mserver")?;
    let client = node.add_pod("mclient")?;
    // On both families where the lab has them (the Pod objects list every address).
    if server.ip6.is_some() {
        lab.serve_dual(&server, "server", Some(80), Some(53))?;
    } else {
        lab.serve(&server, "server", Some(80), Some(53))?;
    }
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mon"}},
        server.pod_object("mon", "server", &[("app", "server")], &[]),
        client.pod_object("mon", "client", &[("app", "client")], &[]),
    ]});
    lab.apply_manifest("pods.json", &objects.to_string())?;
    lab.apply_manifest(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-server, namespace: mon}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n",
    )?;
    Ok((server, client))
}

/// Connects from `client` to `to` (denied: it times out) until `monitor` prints a line, at most
/// `tries` times: the monitor may subscribe after the first attempts.
fn deny_until_line(client: &Pod, to: &str, monitor: &Monitor, tries: usize) -> Result<String> {
    for _ in 0..tries {
        let (code, out) = client.labtool(&["tcp", "--to", to, "--timeout-ms", "300"])?;
        ensure!(code != 0, "{to} answered although denied: {out}");
        if let Some(line) = monitor.next(Duration::from_millis(700)) {
            return Ok(line);
        }
    }
    bail!("no line from debug monitor after {tries} denied connections to {to}")
}

#[test]
fn a_denied_connection_shows_up_in_debug_monitor() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (server, client) = setup(&lab)?;
    let _agent = start_agent(&lab, 0, &[])?;
    let to = format!("{}:80", server.ip);
    wait_for("the deny policy to apply", Duration::from_secs(20), || {
        Ok(tcp(&client, &to)?.0 != 0)
    })?;

    shows_the_denial(
        &lab,
        &client,
        &to,
        (&client.ip.to_string(), &server.ip.to_string()),
        (
            &format!("mon/client {}:", client.ip),
            &format!("-> mon/server {}:80", server.ip),
        ),
    )
}

/// The IPv6 twin on a dual-stack lab: a connection to the server's IPv6 address, denied by the
/// same policy, shows up with both pods named by their IPv6 addresses, in JSON and as a table
/// line with bracketed addresses.
#[test]
fn a_denied_ipv6_connection_shows_up_in_debug_monitor() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (server, client) = setup(&lab)?;
    let (Some(server6), Some(client6)) = (server.ip6, client.ip6) else {
        bail!("dual-stack pods without IPv6 addresses");
    };
    let _agent = start_agent(&lab, 0, &[])?;
    let to = format!("[{server6}]:80");
    wait_for("the deny policy to apply", Duration::from_secs(20), || {
        Ok(tcp(&client, &to)?.0 != 0)
    })?;

    shows_the_denial(
        &lab,
        &client,
        &to,
        (&client6.to_string(), &server6.to_string()),
        (
            &format!("mon/client [{client6}]:"),
            &format!("-> mon/server [{server6}]:80"),
        ),
    )
}

/// What both families' tests check once the deny policy drops `client`'s connections to `to`:
/// the denial in the JSON stream (kind, direction, reason, protocol, both pods with their
/// addresses `ips`, the time) and as a table line (`table`: how it writes the two ends), and
/// that `--count 1` ends the command.
fn shows_the_denial(
    lab: &Lab,
    client: &Pod,
    to: &str,
    (client_ip, server_ip): (&str, &str),
    (want_from, want_to): (&str, &str),
) -> Result<()> {
    let json = Monitor::start(lab.node(0), &["-o", "json", "--duration", "60"])?;
    let line = deny_until_line(client, to, &json, 30)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("monitor line {line}"))?;
    ensure!(v["kind"] == "deny", "{v}");
    ensure!(v["direction"] == "ingress", "{v}");
    ensure!(v["reason"] == "policy_denied_ingress", "{v}");
    ensure!(v["proto"] == "tcp", "{v}");
    ensure!(
        v["from"]["pod"] == "mon/client" && v["from"]["ip"] == client_ip,
        "{v}"
    );
    ensure!(
        v["to"]["pod"] == "mon/server" && v["to"]["ip"] == server_ip && v["to"]["port"] == 80,
        "{v}"
    );
    ensure!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    drop(json);

    // The table form: one line per flow, and --count ends the command.
    let table = Monitor::start(lab.node(0), &["--count", "1", "--duration", "60"])?;
    let line = deny_until_line(client, to, &table, 30)?;
    for part in [
        " ingress ",
        want_from,
        want_to,
        " tcp ",
        "policy_denied_ingress",
    ] {
        ensure!(line.contains(part), "{part:?} missing from {line:?}");
    }
    let mut table = table;
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.child.try_wait()?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "--count 1 did not end the monitor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Packets the node's programs dropped as `policy_denied_ingress` so far.
fn denied_ingress(node: &Node) -> Result<u64> {
    let drops: Vec<Value> = serde_json::from_str(&node.debug(&["drops", "-o", "json"])?)?;
    Ok(drops
        .iter()
        .find(|d| d["reason"] == "policy_denied_ingress")
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0))
}

/// A burst of denied datagrams: the monitor shows at most the kernel's budget per CPU and
/// second (set by `--monitor-rate`), and reports the rest as lost to the rate limit; shown +
/// lost account for every datagram the programs dropped.
#[test]
fn debug_monitor_reports_events_lost_to_the_rate_limit() -> Result<()> {
    const BURST: u64 = 3_000;
    // Below the default, through the flag: the budget the kernel enforces is the agent's.
    const RATE: u32 = 50;
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (server, client) = setup(&lab)?;
    let _agent = start_agent(&lab, 0, &["--monitor-rate", &RATE.to_string()])?;
    let to = format!("{}:80", server.ip);
    wait_for("the deny policy to apply", Duration::from_secs(20), || {
        Ok(tcp(&client, &to)?.0 != 0)
    })?;
    let monitor = Monitor::start(lab.node(0), &["-o", "json", "--duration", "60"])?;
    // Subscribed once one denied connection is shown; let its second's budget go by.
    deny_until_line(&client, &to, &monitor, 30)?;
    std::thread::sleep(Duration::from_millis(1_100));
    while monitor.next(Duration::from_millis(50)).is_some() {}

    let udp = format!("{}:53", server.ip);
    let before = denied_ingress(lab.node(0))?;
    let (code, out) = client.labtool(&["udp-send", "--to", &udp, "--count", &BURST.to_string()])?;
    ensure!(
        code == 0 && out == format!("sent={BURST}"),
        "udp-send: {code} {out}"
    );
    // Every datagram that reached the server's veth was dropped there (a few may be lost
    // earlier, in the veth's backlog).
    let dropped = denied_ingress(lab.node(0))? - before;
    ensure!(
        dropped >= BURST / 2,
        "only {dropped} of {BURST} datagrams dropped by policy"
    );
    let (mut shown, mut lost) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(15);
    while shown + lost < dropped && Instant::now() < deadline {
        let Some(line) = monitor.next(Duration::from_millis(500)) else {
            continue;
        };
        let v: Value = serde_json::from_str(&line)?;
        match v["kind"].as_str() {
            Some("deny") if v["proto"] == "udp" && v["to"]["port"] == 53 => shown += 1,
            Some("lost") => {
                ensure!(v["cause"] == "rate_limit", "{v}");
                lost += v["count"].as_u64().unwrap_or(0);
            }
            _ => {}
        }
    }
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            let highest = s.trim().rsplit(['-', ',']).next()?.parse::<u64>().ok()?;
            Some(highest + 1)
        })
        .unwrap_or(1);
    let budget = u64::from(RATE) * cpus;
    eprintln!("{BURST} sent, {dropped} dropped by policy: {shown} shown, {lost} reported lost");
    ensure!(
        lost > 0,
        "no events reported lost ({shown} shown of {BURST})"
    );
    // The burst may straddle a second boundary: two seconds' budgets at most.
    ensure!(
        shown <= 2 * budget,
        "{shown} events shown, over the budget of {budget} per second"
    );
    ensure!(
        shown + lost >= dropped,
        "{shown} shown + {lost} lost < {dropped} denied datagrams"
    );
    Ok(())
}
