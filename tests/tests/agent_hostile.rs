//! Lab e2e of hostile Service objects: objects any namespace's user can write must not
//! take traffic that belongs to someone else. There is no upstream e2e for these; kube-proxy
//! leaves them to the `DenyServiceExternalIPs` admission plugin.
mod agent_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{
    ready, replier, service, slice, start_agent, udp, wait_for, wait_tcp_reply, web_and_client,
    web_manifest,
};
use anyhow::{Context as _, Result, ensure};
use twill_lab::{LabSpec, bin, require};

const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HIJACK_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 66);

fn in_namespace(yaml: &str, ns: &str) -> String {
    yaml.replace("namespace: default", &format!("namespace: {ns}"))
}

/// A Service in namespace `apps` naming the cluster DNS's ClusterIP (and the node's own address,
/// and loopback) as externalIPs on port 53/UDP: under a namespace/name order it would own
/// 10.96.0.10:53 ("apps" < "kube-system"). The DNS Service keeps answering on its ClusterIP,
/// the node address is not captured, each refusal is counted, and the hostile Service is still
/// served on its own ClusterIP.
#[test]
fn should_not_let_an_external_ip_capture_a_cluster_ip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (dns, hijacker, client) = (
        n0.add_pod("dns")?,
        n0.add_pod("hijacker")?,
        n0.add_pod("client")?,
    );
    lab.serve(&dns, "dns", None, Some(5353))?;
    lab.serve(&hijacker, "hijacker", None, Some(5353))?;
    lab.apply_manifest(
        "kube-dns.yaml",
        &in_namespace(
            &format!(
                "{}---\n{}",
                service("kube-dns", DNS_VIP, &[("dns", 53, 5353, "UDP")], "", &[]),
                slice(
                    "kube-dns",
                    "kube-dns-1",
                    &[ready(dns.ip, &n0.name)],
                    &[("dns", 5353, "UDP")]
                ),
            ),
            "kube-system",
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    let answered_by = |to: &str| -> Result<Option<String>> {
        let (code, out) = udp(&client, to, false)?;
        Ok((code == 0).then(|| replier(&out)).flatten())
    };
    wait_for("DNS on its ClusterIP", Duration::from_secs(20), || {
        Ok(answered_by("10.96.0.10:53")?.as_deref() == Some("dns"))
    })?;

    let hostile = format!(
        "  externalIPs: [\"{DNS_VIP}\", \"{}\", \"127.0.0.1\"]\n",
        n0.ip
    );
    lab.apply_manifest(
        "hijack.yaml",
        &in_namespace(
            &format!(
                "{}---\n{}",
                service(
                    "hijack",
                    HIJACK_VIP,
                    &[("", 53, 5353, "UDP")],
                    &hostile,
                    &[]
                ),
                slice(
                    "hijack",
                    "hijack-1",
                    &[ready(hijacker.ip, &n0.name)],
                    &[("", 5353, "UDP")]
                ),
            ),
            "apps",
        ),
    )?;
    // The hostile Service is programmed: its own ClusterIP answers.
    wait_for(
        "hijack on its own ClusterIP",
        Duration::from_secs(20),
        || Ok(answered_by("10.96.0.66:53")?.as_deref() == Some("hijacker")),
    )?;
    // Every query to the DNS ClusterIP still reaches the DNS pod.
    for i in 0..20 {
        let got = answered_by("10.96.0.10:53")?;
        ensure!(
            got.as_deref() == Some("dns"),
            "query {i} to the DNS ClusterIP answered by {got:?}"
        );
    }
    // The node's own address was not turned into a frontend: nothing listens on it at 53.
    let (code, out) = udp(&client, &format!("{}:53", n0.ip), false)?;
    ensure!(
        replier(&out).as_deref() != Some("hijacker"),
        "the node's address was captured (exit {code}): {out}"
    );
    // Each refusal is logged, counted and shown by `twill-agent debug maps`.
    let metrics = || -> Result<String> {
        let (code, out) = n0.labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
        ensure!(code == 0, "{out}");
        Ok(out)
    };
    wait_for("refusals counted", Duration::from_secs(20), || {
        let m = metrics()?;
        Ok(m.contains(
            "twill_invalid_objects_total{kind=\"Service\",reason=\"cluster_ip_conflict\"} 1",
        ) && m.contains(
            // Counted once per object and reason (the node address and loopback are one).
            "twill_invalid_objects_total{kind=\"Service\",reason=\"refused_address\"} 1",
        ))
    })?;
    let dump = n0.debug(&["maps"])?;
    ensure!(
        dump.contains("is the ClusterIP of kube-system/kube-dns"),
        "the debug dump does not show the rejection:\n{dump}"
    );
    Ok(())
}

/// The agent's HTTP servers under a bounded connection flood (400 idle connections from one
/// pod) and slow-loris clients (64 connections from another pod, each sending its request a
/// byte every 200 ms): every /healthz probe of the node (kubelet's default 1 s timeout) is
/// still answered, and each client's connections beyond its share are closed by the server at
/// once (before any request timeout could have closed them).
#[test]
fn healthz_answers_under_a_connection_flood_and_slow_loris() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (flooder, loris) = (n0.add_pod("flooder")?, n0.add_pod("loris")?);
    let _agent = start_agent(&lab, 0, &[])?;
    let probe = || -> Result<String> {
        let (code, out) = n0.labtool(&[
            "http",
            "--to",
            "127.0.0.1:10256",
            "--path",
            "/healthz",
            "--timeout-ms",
            "1000",
        ])?;
        ensure!(code == 0, "probe failed: {out}");
        Ok(out)
    };
    wait_for("/healthz 200", Duration::from_secs(20), || {
        Ok(probe()?.starts_with("status=200"))
    })?;

    let target = format!("{}:10256", n0.ip);
    let spawn = |pod: &twill_lab::Pod, conns: &str, slow: bool| {
        let mut cmd = pod.cmd(bin("labtool"));
        // Shorter than the 5 s request timeout: what the server closed in that time it closed
        // for being over the limits, not for being slow.
        cmd.args([
            "flood",
            "--to",
            &target,
            "--conns",
            conns,
            "--hold-ms",
            "3500",
        ]);
        if slow {
            cmd.arg("--slow");
        }
        cmd.stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning labtool flood")
    };
    let flood = spawn(&flooder, "400", false)?;
    let slow = spawn(&loris, "64", true)?;
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..8 {
        let out = probe()?;
        ensure!(
            out.starts_with("status=200"),
            "probe {i} under the flood: {out}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let flood = flood.wait_with_output()?;
    let slow = slow.wait_with_output()?;
    let field = |out: &[u8], name: &str| -> Result<u64> {
        let text = String::from_utf8_lossy(out);
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {text:?}"))
    };
    // One client keeps at most 16 connections (HTTP_LIMITS.max_per_peer); the server closes
    // the rest at once (a connect the loaded machine did not complete in 1 s is not opened).
    for (out, at_least) in [(&flood.stdout, 300), (&slow.stdout, 32)] {
        let text = String::from_utf8_lossy(out);
        let opened = field(out, "opened")?;
        ensure!(opened >= at_least, "too few connections got in: {text}");
        ensure!(
            field(out, "closed_by_server")? >= opened - 16,
            "the server held more than its share: {text}"
        );
    }
    ensure!(probe()?.starts_with("status=200"));
    Ok(())
}

/// Services that cannot be programmed are rejected alone: one over
/// `--max-frontends-per-service`, and one that finds the services map full (4 entries here).
/// The Service programmed first keeps answering, `/livez` and `/healthz` stay 200, the agent
/// keeps running, and both rejections are counted and shown by `twill-agent debug maps`.
#[test]
fn services_that_do_not_fit_are_rejected_alone() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = web_and_client(&lab)?;
    lab.apply_manifest("web.yaml", &web_manifest(DNS_VIP, &web, &n0.name))?;
    let mut agent = start_agent(
        &lab,
        0,
        &[
            "--map-size-services",
            "4",
            "--max-frontends-per-service",
            "3",
        ],
    )?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;

    let ports = |n: u16| -> Vec<(String, u16, u16, &'static str)> {
        (0..n)
            .map(|i| (format!("p{i}"), 81 + i, 8080, "TCP"))
            .collect()
    };
    let manifest = |name: &str, vip: &str, n: u16| {
        let p = ports(n);
        let specs: Vec<(&str, u16, u16, &str)> = p
            .iter()
            .map(|(a, b, c, d)| (a.as_str(), *b, *c, *d))
            .collect();
        service(name, vip.parse().expect("vip"), &specs, "", &[])
    };
    // 4 frontends: over the cap of 3, never programmed.
    lab.apply_manifest("big.yaml", &manifest("big", "10.96.0.20", 4))?;
    // Two frontends: with web's one, 3 of the map's 4 entries are taken.
    lab.apply_manifest("pair.yaml", &manifest("pair", "10.96.0.21", 2))?;
    wait_for("pair programmed", Duration::from_secs(20), || {
        Ok(n0.debug(&["maps"])?.contains("10.96.0.21:82/TCP"))
    })?;
    // Three frontends, within the cap, but one entry is left for them.
    lab.apply_manifest("trio.yaml", &manifest("trio", "10.96.0.22", 3))?;

    let metrics = || -> Result<String> {
        let (code, out) = n0.labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
        ensure!(code == 0, "{out}");
        Ok(out)
    };
    wait_for("both rejections reported", Duration::from_secs(20), || {
        let m = metrics()?;
        Ok(m.contains(
            "twill_invalid_objects_total{kind=\"Service\",reason=\"too_many_frontends\"} 1",
        ) && m.contains("twill_unprogrammed_services 1"))
    })?;
    let dump = n0.debug(&["maps"])?;
    ensure!(
        dump.contains("Service default/big: 4 frontends")
            && dump.contains("Service default/trio: not (fully) programmed: a map is full"),
        "{dump}"
    );
    // Still serving, still live and healthy, still running a few syncs later.
    for path in ["/livez", "/healthz"] {
        let (code, out) = n0.labtool(&["http", "--to", "127.0.0.1:10256", "--path", path])?;
        ensure!(code == 0 && out.starts_with("status=200"), "{path}: {out}");
    }
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(agent.is_running(), "the agent exited:\n{}", agent.log());

    // Room appears: the full-map Service is programmed by the next sync.
    lab.delete_manifest("pair.yaml")?;
    wait_for("trio programmed", Duration::from_secs(20), || {
        Ok(metrics()?.contains("twill_unprogrammed_services 0"))
    })?;
    Ok(())
}
