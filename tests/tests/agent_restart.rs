//! Lab e2e: the agent's operations — restarts invisible to traffic (pinned maps and links),
//! uniform backend selection, the debug CLI, the CNI config it writes, start-up refusals and
//! uninstall.
mod agent_common;

use std::io::Read as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agent_common::{
    ready, repliers, service, slice, start_agent, tcp_loop, wait_agent_ready, wait_tcp_reply,
};
use anyhow::{Context as _, Result, bail, ensure};
use twill_lab::{LabSpec, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 10);
const TO: &str = "10.96.3.10:80";

/// "should work after restarting kube-proxy", made stronger: 60 s of back-to-back connections
/// through a ClusterIP while the agent is restarted 5 times; not one may fail.
#[test]
fn should_work_after_restarting_the_agent_with_zero_failed_connections() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (b0, b1, client) = (n0.add_pod("b0")?, n0.add_pod("b1")?, n0.add_pod("client")?);
    lab.serve(&b0, "b0", Some(8080), None)?;
    lab.serve(&b1, "b1", Some(8080), None)?;
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("restart", VIP, &[("", 80, 8080, "TCP")], "", &[]),
            slice(
                "restart",
                "restart-1",
                &[ready(b0.ip, &n0.name), ready(b1.ip, &n0.name)],
                &[("", 8080, "TCP")]
            )
        ),
    )?;
    let mut agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, TO, "b0").or_else(|_| wait_tcp_reply(&client, TO, "b1"))?;

    let mut load = client
        .cmd(twill_lab::bin("labtool"))
        .args([
            "tcp-loop",
            "--to",
            TO,
            "--duration-ms",
            "60000",
            "--interval-ms",
            "5",
            "--timeout-ms",
            "2000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the load")?;
    let started = Instant::now();
    for i in 1..=5u32 {
        // Restart at 8, 16, ... 40 s into the run.
        while started.elapsed() < Duration::from_secs(u64::from(8 * i)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.restart()?;
        wait_agent_ready(n0, &mut agent)?;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while load.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = load.kill();
            bail!("the load did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut out = String::new();
    load.stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)?;
    let report: serde_json::Value = serde_json::from_str(out.trim())?;
    let ok = report["ok"].as_u64().unwrap_or(0);
    eprintln!("restart soak: {report}");
    ensure!(
        report["failures"] == 0,
        "connections failed across agent restarts: {report}"
    );
    ensure!(ok > 1000, "too few connections to mean anything: {report}");
    let log = agent.log();
    ensure!(
        log.matches("adopted").count() >= 5,
        "restarted agents did not adopt the pinned state:\n{log}"
    );

    // The last agent still programs changes.
    let b2 = n0.add_pod("b2")?;
    lab.serve(&b2, "b2", Some(8080), None)?;
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("restart", VIP, &[("", 80, 8080, "TCP")], "", &[]),
            slice(
                "restart",
                "restart-1",
                &[ready(b2.ip, &n0.name)],
                &[("", 8080, "TCP")]
            )
        ),
    )?;
    wait_tcp_reply(&client, TO, "b2")?;
    Ok(())
}

/// Backend selection is uniform: 2 backends, 2 × 1,000 connections, each backend 40–60 %.
#[test]
fn should_distribute_connections_evenly_across_backends() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (b0, b1, client) = (n0.add_pod("b0")?, n0.add_pod("b1")?, n0.add_pod("client")?);
    lab.serve(&b0, "b0", Some(8080), None)?;
    lab.serve(&b1, "b1", Some(8080), None)?;
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("dist", VIP, &[("", 80, 8080, "TCP")], "", &[]),
            slice(
                "dist",
                "dist-1",
                &[ready(b0.ip, &n0.name), ready(b1.ip, &n0.name)],
                &[("", 8080, "TCP")]
            )
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    agent_common::wait_for("both backends", Duration::from_secs(20), || {
        Ok(repliers(&client, TO, 40)?.len() == 2)
    })?;
    let report = tcp_loop(&client, TO, &["--count", "2000"])?;
    eprintln!("distribution: {report}");
    ensure!(report["failures"] == 0, "{report}");
    for b in ["b0", "b1"] {
        let n = report["counts"][b].as_u64().unwrap_or(0);
        ensure!(
            (800..=1200).contains(&n),
            "{b} got {n} of 2000 connections: {report}"
        );
    }
    Ok(())
}

/// `twill-agent debug …`, the CNI config written from the Node's podCIDRs, and `uninstall`.
#[test]
fn should_serve_the_debug_cli_write_the_cni_config_and_uninstall() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = (n0.add_pod("web0")?, n0.add_pod("client")?);
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service(
                "dbg",
                VIP,
                &[("http", 80, 8080, "TCP")],
                "  sessionAffinity: ClientIP\n",
                &[]
            ),
            slice(
                "dbg",
                "dbg-1",
                &[ready(web.ip, &n0.name)],
                &[("http", 8080, "TCP")]
            )
        ),
    )?;
    let mut agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, TO, "web0")?;

    let maps = n0.debug(&["maps"])?;
    ensure!(
        maps.contains("10.96.3.10") && maps.contains(&web.ip.to_string()),
        "debug maps:\n{maps}"
    );
    let services: serde_json::Value =
        serde_json::from_str(&n0.debug(&["services", "-o", "json"])?)?;
    ensure!(
        services
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "dbg")),
        "{services}"
    );
    let table = n0.debug(&["services"])?;
    ensure!(
        table.starts_with("SERVICE") && table.contains("default/dbg"),
        "{table}"
    );
    let backends = n0.debug(&["backends"])?;
    ensure!(
        backends.contains(&format!("{}:8080/TCP", web.ip)) && backends.contains("default/dbg:http"),
        "{backends}"
    );
    let drops = n0.debug(&["drops"])?;
    ensure!(
        drops.contains("translated") && drops.contains("no_backends"),
        "{drops}"
    );
    let affinity: serde_json::Value =
        serde_json::from_str(&n0.debug(&["affinity", "-o", "json"])?)?;
    ensure!(
        affinity.as_array().is_some_and(|a| !a.is_empty()),
        "no affinity entry after a connection: {affinity}"
    );

    // The CNI config, in twill-cni's format, from the Node's podCIDRs.
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(n0.conflist_path())?)?;
    let plugin = &conf["plugins"][0];
    ensure!(
        conf["cniVersion"] == "1.0.0"
            && conf["cniVersions"] == serde_json::json!(["1.0.0", "1.1.0"])
            && conf["name"] == "twill"
            && plugin["type"] == "twill-cni",
        "{conf}"
    );
    ensure!(
        plugin["podCIDRs"] == serde_json::json!([n0.pod_cidr.to_string()]),
        "{conf}"
    );
    ensure!(
        plugin["logFile"] == n0.state_dir().join("cni.log").display().to_string(),
        "not the agent's config: {conf}"
    );

    // The NAT ports (NodePort SNAT and masquerade) are reserved in the node's namespace.
    ensure!(nat_ports_reserved(n0)?, "NAT ports not reserved");

    // Uninstall after a graceful stop: CNI config, pins and the NAT port reservation gone.
    agent.stop()?;
    uninstall_leaves_nothing(n0)
}

/// `twill-agent uninstall` in the node's namespace (it also removes the agent's routes and
/// nftables table): CNI config, pins and the NAT port reservation are gone afterwards.
fn uninstall_leaves_nothing(n0: &twill_lab::Node) -> Result<()> {
    let out = n0
        .cmd_with_host_mounts(twill_lab::bin("twill-agent"))
        .args(["uninstall", "--bpffs-dir"])
        .arg(&n0.bpffs)
        .arg("--cni-conf-dir")
        .arg(n0.cni_conf_dir())
        .arg("--api-socket")
        .arg(n0.api_socket())
        .output()?;
    ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!n0.conflist_path().exists(), "CNI config still there");
    let left: Vec<_> = std::fs::read_dir(&n0.bpffs)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "pins left after uninstall: {left:?}");
    ensure!(!nat_ports_reserved(n0)?, "NAT ports still reserved");
    Ok(())
}

/// Whether the node's `ip_local_reserved_ports` holds the NAT port range.
fn nat_ports_reserved(node: &twill_lab::Node) -> Result<bool> {
    let range = format!(
        "{}-{}",
        twill_common::MASQ_PORT_MIN,
        twill_common::MASQ_PORT_MAX
    );
    let reserved = node.run(&["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"])?;
    Ok(reserved.contains(&range))
}

/// `run` refuses to start, with a message naming the problem, when the cgroup root is not
/// cgroup v2.
#[test]
fn should_refuse_to_start_without_a_cgroup2_root() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let mut args = n0.agent_args();
    let i = args
        .iter()
        .position(|a| a == "--cgroup-root")
        .context("no --cgroup-root")?;
    args[i + 1] = n0.dir.display().to_string();
    let mut child = n0
        .cmd_with_host_mounts(twill_lab::bin("twill-agent"))
        .args(&args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the agent started with a non-cgroup2 --cgroup-root");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    ensure!(!status.success(), "exit status {status}");
    ensure!(
        err.contains("is not a cgroup v2 directory"),
        "unclear message: {err}"
    );

    Ok(())
}
