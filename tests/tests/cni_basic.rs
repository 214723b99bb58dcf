//! twill-cni in a lab node: ADD/CHECK/DEL, routed connectivity with real source
//! addresses, DEL idempotence, pool exhaustion, GC and chaining with the reference
//! plugins. Each test builds its own lab.
mod cni_common;

use anyhow::{Result, ensure};
use cni_common::{assert_clean, cni, del_netns, host_links, netns, pod_routes, reservations};
use serde_json::{Value, json};
use twill_lab::{LabSpec, POD_GATEWAY, require};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn add_check_del_and_routed_connectivity() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let state = n0.state_dir();
    let a = n0.add_pod("a")?;
    let b = n0.add_pod("b")?;
    ensure!(
        a.ip != b.ip && n0.pod_cidr.contains(a.ip) && n0.pod_cidr.contains(b.ip),
        "{} {}",
        a.ip,
        b.ip
    );
    ensure!(a.result["cniVersion"] == "1.1.0", "{}", a.result);
    let host_if = a.result["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        a.result["interfaces"][1]["name"] == "eth0" && a.result["interfaces"][1]["mtu"] == 1500,
        "{}",
        a.result
    );

    // Pod side: /32, default route via the link-local gateway, static neighbour.
    let addr = a.run(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"])?;
    ensure!(addr.contains(&format!("{}/32", a.ip)), "{addr}");
    let routes = a.run(&["ip", "route"])?;
    ensure!(
        routes.contains(&format!("default via {POD_GATEWAY} dev eth0"))
            && routes.contains("onlink"),
        "{routes}"
    );
    let neigh = a.run(&["ip", "neigh", "show", POD_GATEWAY])?;
    ensure!(neigh.contains("PERMANENT"), "{neigh}");
    ensure!(
        a.run(&["ip", "link", "show", "eth0"])?.contains("mtu 1500"),
        "pod mtu"
    );
    // Node side: /32 route via the host veth, forwarding on.
    let node_routes = n0.run(&["ip", "route"])?;
    ensure!(
        node_routes.contains(&format!("{} dev {host_if} ", a.ip)),
        "{node_routes}"
    );
    ensure!(
        n0.run(&["cat", "/proc/sys/net/ipv4/ip_forward"])?.trim() == "1",
        "ip_forward"
    );
    ensure!(reservations(&state, "twill").len() == 2);

    // pod -> pod and node -> pod, TCP and UDP, and the peer sees the real source.
    lab.serve(&b, "b", Some(8080), Some(8081))?;
    let (code, out) = a.labtool(&["tcp", "--to", &format!("{}:8080", b.ip)])?;
    ensure!(
        code == 0 && out.contains(&format!("reply=b {}:", a.ip)),
        "pod->pod tcp: {out}"
    );
    let (code, out) = a.labtool(&["udp", "--to", &format!("{}:8081", b.ip)])?;
    ensure!(
        code == 0 && out.contains(&format!("reply=b {}:", a.ip)),
        "pod->pod udp: {out}"
    );
    let (code, out) = n0.labtool(&["tcp", "--to", &format!("{}:8080", b.ip)])?;
    ensure!(
        code == 0 && out.contains(&format!("reply=b {}:", n0.ip)),
        "node->pod tcp: {out}"
    );

    // CHECK passes on the real state, and names what is wrong once it is broken.
    let mut conf = n0.plugin_conf()?;
    conf["prevResult"] = a.result.clone();
    let path = format!("/var/run/netns/{}", a.netns);
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(r.ok && r.raw.is_empty(), "CHECK on a good pod: {}", r.raw);
    a.run(&["ip", "link", "set", "eth0", "mtu", "1400"])?;
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(
        !r.ok && r.code() == 104 && r.out["msg"].as_str().unwrap_or("").contains("MTU 1400"),
        "{}",
        r.raw
    );
    a.run(&["ip", "link", "set", "eth0", "mtu", "1500"])?;
    n0.run(&["ip", "route", "del", &format!("{}/32", a.ip)])?;
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(
        !r.ok && r.out["msg"].as_str().unwrap_or("").contains("no route to"),
        "{}",
        r.raw
    );

    // DEL: normal, repeated, unknown container, and after the namespace is gone.
    let r = cni(n0, "DEL", &a.container_id, &path, &conf)?;
    ensure!(r.ok && r.raw.is_empty(), "{}", r.raw);
    // DEL returned with the link retired: the name and the pod's route are gone at
    // once; the link itself is deleted by the background reaper shortly after.
    ensure!(
        !n0.run(&["ip", "route"])?.contains(&format!("{} ", a.ip)),
        "route to the pod survives DEL"
    );
    ensure!(
        n0.run(&["ip", "link", "show", &host_if]).is_err(),
        "{host_if} survives DEL"
    );
    cni_common::wait_reaped(n0)?;
    let pod_links = a.run(&["ip", "-o", "link"])?;
    ensure!(
        !pod_links.contains("eth0"),
        "pod end survives the reaper: {pod_links}"
    );
    // The same container again in the same namespace, DEL right after ADD right after DEL.
    let again = cni(n0, "ADD", &a.container_id, &path, &n0.plugin_conf()?)?;
    ensure!(again.ok, "re-ADD: {}", again.raw);
    ensure!(cni(n0, "DEL", &a.container_id, &path, &conf)?.ok, "DEL");
    let again = cni(n0, "ADD", &a.container_id, &path, &n0.plugin_conf()?)?;
    ensure!(
        again.ok,
        "ADD right after DEL, reaper maybe still running: {}",
        again.raw
    );
    ensure!(cni(n0, "DEL", &a.container_id, &path, &conf)?.ok, "DEL");
    ensure!(
        cni(n0, "DEL", &a.container_id, &path, &conf)?.ok,
        "second DEL"
    );
    ensure!(
        cni(n0, "DEL", "never-added", "", &n0.plugin_conf()?)?.ok,
        "DEL of an unknown container"
    );
    let mut conf_b = n0.plugin_conf()?;
    conf_b["prevResult"] = b.result.clone();
    del_netns(&b.netns)?;
    let r = cni(
        n0,
        "DEL",
        &b.container_id,
        &format!("/var/run/netns/{}", b.netns),
        &conf_b,
    )?;
    ensure!(r.ok, "DEL after the netns is gone: {}", r.raw);
    assert_clean(n0, &state)
}

#[test]
fn a_tiny_pool_runs_out_cleanly() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let state = n0.dir.join("state-tiny");
    let mut conf = n0.plugin_conf()?;
    conf["podCIDRs"] = json!(["10.244.0.0/29"]);
    conf["stateDir"] = json!(state);
    conf["mtu"] = json!(1400);
    let mut ips = Vec::new();
    let mut spaces = Vec::new();
    for i in 0..6 {
        let (ns, path) = netns(n0, &format!("t{i}"))?;
        spaces.push(ns);
        let r = cni(n0, "ADD", &format!("tiny{i}"), &path, &conf)?;
        ensure!(r.ok, "ADD {i}: {}", r.raw);
        ips.push(
            r.out["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    ensure!(
        ips == [
            "10.244.0.1/32",
            "10.244.0.2/32",
            "10.244.0.3/32",
            "10.244.0.4/32",
            "10.244.0.5/32",
            "10.244.0.6/32"
        ],
        "never network or broadcast: {ips:?}"
    );
    // The configured MTU on both ends.
    let pod_link = twill_lab::run_cmd(
        std::process::Command::new("ip").args(["-n", &spaces[0], "link", "show", "eth0"]),
    )?;
    ensure!(pod_link.contains("mtu 1400"), "{pod_link}");
    for l in host_links(n0)? {
        let host = n0.run(&["ip", "link", "show", &l])?;
        ensure!(host.contains("mtu 1400"), "{host}");
    }
    let (ns, path) = netns(n0, "t6")?;
    let r = cni(n0, "ADD", "tiny6", &path, &conf)?;
    ensure!(!r.ok && r.code() == 100, "{}", r.raw);
    ensure!(
        r.out["msg"]
            .as_str()
            .unwrap_or("")
            .contains("10.244.0.0/29"),
        "{}",
        r.raw
    );
    // Nothing half-made for the loser.
    let links =
        twill_lab::run_cmd(std::process::Command::new("ip").args(["-n", &ns, "-o", "link"]))?;
    ensure!(!links.contains("eth0"), "{links}");
    ensure!(host_links(n0)?.len() == 6 && reservations(&state, "twill").len() == 6);
    let r = cni(n0, "STATUS", "", "", &conf)?;
    ensure!(!r.ok && r.code() == 50, "STATUS on a full pool: {}", r.raw);
    for i in 0..6 {
        ensure!(cni(n0, "DEL", &format!("tiny{i}"), "", &conf)?.ok);
    }
    ensure!(cni(n0, "STATUS", "", "", &conf)?.ok, "STATUS after release");
    assert_clean(n0, &state)
}

#[test]
fn gc_releases_what_the_runtime_no_longer_knows() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let state = n0.state_dir();
    let pods = [n0.add_pod("a")?, n0.add_pod("b")?, n0.add_pod("c")?];
    // A veth of an attachment IPAM never recorded, and a foreign veth GC must not touch.
    n0.run(&[
        "ip",
        "link",
        "add",
        "twl0123456789a",
        "type",
        "veth",
        "peer",
        "name",
        "ghostp",
    ])?;
    n0.run(&[
        "ip", "link", "add", "keepme0", "type", "veth", "peer", "name", "keepme1",
    ])?;
    // A link a DEL retired whose reaper was killed.
    n0.run(&[
        "ip", "link", "add", "twx4242", "type", "veth", "peer", "name", "twx4242p",
    ])?;
    let mut conf = n0.plugin_conf()?;
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[1].container_id, "ifname": "eth0"}]);
    let r = cni(n0, "GC", "", "", &conf)?;
    ensure!(r.ok && r.raw.is_empty(), "GC: {}", r.raw);
    let links = host_links(n0)?;
    ensure!(links.len() == 1, "only b's veth survives: {links:?}");
    ensure!(
        cni_common::retired_links(n0)?.is_empty(),
        "GC leaves a retired link"
    );
    ensure!(
        n0.run(&["ip", "link", "show", "keepme0"]).is_ok(),
        "GC removed a foreign veth"
    );
    ensure!(reservations(&state, "twill") == [pods[1].ip.to_string()]);
    ensure!(pod_routes(n0)?.len() == 1);
    let (code, _) = n0.labtool(&[
        "tcp",
        "--to",
        &format!("{}:1", pods[1].ip),
        "--timeout-ms",
        "2000",
    ])?;
    // Exit 2 is ECONNREFUSED: the pod answered (with a RST), so it is still wired.
    ensure!(
        code == 2,
        "b should still be reachable (refused), got {code}"
    );
    n0.del_pod(&pods[1])?;
    assert_clean(n0, &state)
}

/// twill-cni first in a chain with the reference tuning, bandwidth and portmap:
/// each accepts our result as prevResult, and DEL runs in reverse.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn chains_with_tuning_bandwidth_and_portmap() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2))? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    // The Debian reference plugins speak up to 1.0.0.
    let mut ours = n0.plugin_conf()?;
    ours["cniVersion"] = json!("1.0.0");
    let base = json!({"cniVersion": "1.0.0", "name": "twill"});
    let with = |mut v: Value, extra: Value| {
        for (k, x) in extra.as_object().cloned().unwrap_or_default() {
            v[k] = x;
        }
        v
    };
    let tuning = with(
        base.clone(),
        json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}}),
    );
    let bandwidth = with(
        base.clone(),
        json!({"type": "bandwidth", "ingressRate": 100_000_000, "ingressBurst": 1_000_000}),
    );
    let portmap = with(
        base.clone(),
        json!({"type": "portmap", "capabilities": {"portMappings": true},
               "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}}),
    );
    let (ns, path) = netns(n0, "chain")?;
    let id = format!("{}chain", lab.run_id);
    let run_plugin = |plugin: &str, cmd: &str, conf: &Value| -> Result<Value> {
        let mut c = n0.cmd(format!("/usr/lib/cni/{plugin}"));
        c.env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", &path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn()?;
        std::io::Write::write_all(
            &mut child.stdin.take().expect("stdin"),
            conf.to_string().as_bytes(),
        )?;
        let out = child.wait_with_output()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "{plugin} {cmd} failed: {s} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(if s.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&s)?
        })
    };
    let r0 = cni(n0, "ADD", &id, &path, &ours)?;
    ensure!(r0.ok, "{}", r0.raw);
    let r1 = run_plugin(
        "tuning",
        "ADD",
        &with(tuning.clone(), json!({"prevResult": r0.out})),
    )?;
    let r2 = run_plugin(
        "bandwidth",
        "ADD",
        &with(bandwidth.clone(), json!({"prevResult": r1})),
    )?;
    let r3 = run_plugin(
        "portmap",
        "ADD",
        &with(portmap.clone(), json!({"prevResult": r2})),
    )?;
    ensure!(
        r3["ips"][0]["address"] == r0.out["ips"][0]["address"],
        "the chain kept our address: {r3}"
    );

    let somaxconn = twill_lab::run_cmd(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "cat",
        "/proc/sys/net/core/somaxconn",
    ]))?;
    ensure!(
        somaxconn.trim() == "777",
        "tuning did not apply: {somaxconn}"
    );
    let host_if = r0.out["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let qdisc = n0.run(&["tc", "qdisc", "show", "dev", &host_if])?;
    ensure!(
        qdisc.contains("tbf"),
        "bandwidth did not shape {host_if}: {qdisc}"
    );
    // Our CHECK accepts the final (chained) result as prevResult.
    let mut check = ours.clone();
    check["prevResult"] = r3.clone();
    let r = cni(n0, "CHECK", &id, &path, &check)?;
    ensure!(r.ok, "CHECK with the chain's result: {}", r.raw);

    // portmap: another node reaches the pod through n0's host port, source preserved.
    let mut server = std::process::Command::new("ip");
    server
        .args(["netns", "exec", &ns])
        .arg(twill_lab::bin("labtool"))
        .args(["serve", "--name", "chained", "--tcp", "8080"]);
    lab.track(twill_lab::spawn_and_wait_ready(server)?);
    let (code, out) = n1.labtool(&["tcp", "--to", &format!("{}:18080", n0.ip)])?;
    ensure!(
        code == 0 && out.contains(&format!("reply=chained {}:", n1.ip)),
        "hostPort via portmap: {out}"
    );

    // DEL in reverse order with the final result.
    let del = |c: &Value| with(c.clone(), json!({"prevResult": r3}));
    run_plugin("portmap", "DEL", &del(&portmap))?;
    run_plugin("bandwidth", "DEL", &del(&bandwidth))?;
    run_plugin("tuning", "DEL", &del(&tuning))?;
    let r = cni(n0, "DEL", &id, &path, &del(&ours))?;
    ensure!(r.ok, "{}", r.raw);
    let nat = n0.run(&["iptables-save", "-t", "nat"])?;
    ensure!(!nat.contains("18080"), "portmap left rules: {nat}");
    assert_clean(n0, &n0.state_dir())
}

/// Failures before and after the reservation leave nothing behind.
#[test]
fn failed_adds_leave_nothing() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let state = n0.state_dir();
    let conf = n0.plugin_conf()?;
    // Not a network namespace: rejected before anything is reserved.
    let r = cni(n0, "ADD", "notns", "/etc/hostname", &conf)?;
    ensure!(!r.ok && r.code() == 4, "{}", r.raw);
    ensure!(
        r.out["msg"].as_str().unwrap_or("").contains("CNI_NETNS"),
        "{}",
        r.raw
    );
    // The pod namespace already has an eth0: the veth cannot be made; the IP is released.
    let (ns, path) = netns(n0, "busy")?;
    twill_lab::run_cmd(std::process::Command::new("ip").args([
        "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]))?;
    let r = cni(n0, "ADD", "busy", &path, &conf)?;
    ensure!(!r.ok && r.code() == 102, "{}", r.raw);
    // Garbage on stdin and an unknown verb are answered with error objects.
    let out = n0.cni("ADD", "x", &path, "eth0", &json!("not a config"))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(!out.status.success() && v["code"] == 7, "{v}");
    let out = n0.cni("FROB", "x", &path, "eth0", &conf)?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(!out.status.success() && v["code"] == 4, "{v}");
    // VERSION and STATUS.
    let out = n0.cni("VERSION", "", "", "", &json!({"cniVersion": "1.0.0"}))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["cniVersion"] == "1.0.0"
            && v["supportedVersions"]
                .as_array()
                .is_some_and(|a| a.len() == 5),
        "{v}"
    );
    ensure!(
        cni(n0, "STATUS", "", "", &conf)?.ok,
        "STATUS on a fresh node"
    );
    assert_clean(n0, &state)
}
