//! twill-cni on dual-stack and IPv6-only networks, in a lab node. Test names follow the
//! upstream "[Feature:IPv6DualStack]" e2e suite (test/e2e/network/dual_stack.go).
mod cni_common;

use anyhow::{Result, ensure};
use cni_common::{assert_clean, cni, host_links, pod_routes6, reservations};
use serde_json::json;
use twill_lab::{LabSpec, require};

const GATEWAY6: &str = "fe80::1";

/// "[Feature:IPv6DualStack] should create pod, add ipv6 and ipv4 ip to pod ips": one ADD
/// gives the pod an address of each family (IPv4 first, as the Node lists them), wires both
/// families in the pod and the node, and CHECK, DEL and GC cover both.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn should_create_pod_add_ipv6_and_ipv4_ip_to_pod_ips() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let cidr6 = n0.pod_cidr6.expect("dual-stack lab");
    let a = n0.add_pod("a")?;
    let ip6 = a
        .ip6
        .ok_or_else(|| anyhow::anyhow!("no IPv6 address: {}", a.result))?;
    ensure!(
        n0.pod_cidr.contains(a.ip) && cidr6.contains(ip6),
        "{} {ip6}",
        a.ip
    );
    let ips = &a.result["ips"];
    ensure!(
        ips.as_array().map(Vec::len) == Some(2)
            && ips[0]["address"] == format!("{}/32", a.ip)
            && ips[1]["address"] == format!("{ip6}/128")
            && ips[1]["gateway"] == GATEWAY6
            && ips[1]["interface"] == 1,
        "{}",
        a.result
    );
    ensure!(
        a.result["routes"][1] == json!({"dst": "::/0", "gw": GATEWAY6}),
        "{}",
        a.result
    );
    let host_if = a.result["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // Pod side: the /128 usable at once (no DAD, so not tentative), the default route via
    // the link-local gateway, its permanent neighbour entry.
    let addr = a.run(&["ip", "-o", "-6", "addr", "show", "dev", "eth0"])?;
    ensure!(
        addr.lines()
            .any(|l| l.contains(&format!("{ip6}/128")) && !l.contains("tentative")),
        "{addr}"
    );
    let routes = a.run(&["ip", "-6", "route"])?;
    ensure!(
        routes.contains(&format!("default via {GATEWAY6} dev eth0")),
        "{routes}"
    );
    let neigh = a.run(&["ip", "-6", "neigh", "show", GATEWAY6])?;
    ensure!(neigh.contains("PERMANENT"), "{neigh}");
    // Node side: the /128 route, the gateway address on the host veth, forwarding on.
    ensure!(
        pod_routes6(n0)?
            .iter()
            .any(|r| r.starts_with(&format!("{ip6} dev {host_if}"))),
        "{:?}",
        pod_routes6(n0)?
    );
    let host_addr = n0.run(&["ip", "-o", "-6", "addr", "show", "dev", &host_if])?;
    ensure!(
        host_addr
            .lines()
            .any(|l| l.contains(&format!("{GATEWAY6}/64")) && !l.contains("tentative")),
        "{host_addr}"
    );
    ensure!(
        n0.run(&["cat", "/proc/sys/net/ipv6/conf/all/forwarding"])?
            .trim()
            == "1",
        "IPv6 forwarding"
    );
    let state = n0.state_dir();
    let mut want = vec![a.ip.to_string(), ip6.to_string()];
    want.sort();
    ensure!(
        reservations(&state, "twill") == want,
        "{:?}",
        reservations(&state, "twill")
    );

    // CHECK passes, then names the IPv6 piece that is broken.
    let mut conf = n0.plugin_conf()?;
    conf["prevResult"] = a.result.clone();
    let path = format!("/var/run/netns/{}", a.netns);
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(r.ok && r.raw.is_empty(), "CHECK on a good pod: {}", r.raw);
    a.run(&["ip", "-6", "neigh", "del", GATEWAY6, "dev", "eth0"])?;
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(
        !r.ok && r.code() == 104 && r.out["msg"].as_str().unwrap_or("").contains(GATEWAY6),
        "{}",
        r.raw
    );
    a.run(&[
        "ip",
        "-6",
        "neigh",
        "add",
        GATEWAY6,
        "lladdr",
        a.result["interfaces"][0]["mac"]
            .as_str()
            .unwrap_or_default(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    n0.run(&["ip", "-6", "route", "del", &format!("{ip6}/128")])?;
    let r = cni(n0, "CHECK", &a.container_id, &path, &conf)?;
    ensure!(
        !r.ok
            && r.out["msg"]
                .as_str()
                .unwrap_or("")
                .contains(&ip6.to_string()),
        "{}",
        r.raw
    );

    // DEL releases both families; GC of a pod the runtime forgot releases both too.
    let r = cni(n0, "DEL", &a.container_id, &path, &conf)?;
    ensure!(r.ok && r.raw.is_empty(), "{}", r.raw);
    let b = n0.add_pod("b")?;
    ensure!(b.ip6.is_some(), "{}", b.result);
    let mut gc = n0.plugin_conf()?;
    gc["cni.dev/valid-attachments"] = json!([]);
    let r = cni(n0, "GC", "-", "", &gc)?;
    ensure!(r.ok, "GC: {}", r.raw);
    ensure!(host_links(n0)?.is_empty(), "{:?}", host_links(n0)?);
    assert_clean(n0, &state)?;
    ensure!(pod_routes6(n0)?.is_empty(), "{:?}", pod_routes6(n0)?);
    Ok(())
}

/// "[Feature:IPv6DualStack] should be able to reach pod on ipv4 and ipv6 ip": TCP and UDP
/// between two pods and from the node, on each family, with the real source address.
#[test]
fn should_be_able_to_reach_pod_on_ipv4_and_ipv6_ip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let a = n0.add_pod("a")?;
    let b = n0.add_pod("b")?;
    let (a6, b6) = (a.ip6.expect("dual-stack"), b.ip6.expect("dual-stack"));
    lab.serve_dual(&b, "b", Some(8080), Some(8081))?;
    for (to, from) in [
        (format!("{}:8080", b.ip), format!("reply=b {}:", a.ip)),
        (format!("[{b6}]:8080"), format!("reply=b [{a6}]:")),
    ] {
        let (code, out) = a.labtool(&["tcp", "--to", &to])?;
        ensure!(code == 0 && out.contains(&from), "tcp {to}: {out}");
        let udp_to = to.replace(":8080", ":8081");
        let (code, out) = a.labtool(&["udp", "--to", &udp_to])?;
        ensure!(code == 0 && out.contains(&from), "udp {udp_to}: {out}");
    }
    // The node reaches the pod over IPv6 too (its source is one of its own addresses).
    let (code, out) = n0.labtool(&["tcp", "--to", &format!("[{b6}]:8080")])?;
    ensure!(
        code == 0 && out.contains("reply=b ["),
        "node->pod tcp6: {out}"
    );
    Ok(())
}

/// An IPv6-only network: the Node's only pod CIDR is IPv6, so pods get no IPv4 at all and
/// reach each other over IPv6.
#[test]
fn ipv6_only_network_wires_only_ipv6() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let cidr6 = n0.pod_cidr6.expect("dual-stack lab").to_string();
    let mut conf = n0.plugin_conf()?;
    conf["podCIDRs"] = json!([cidr6]);
    let (ns_a, path_a) = cni_common::netns(n0, "a")?;
    let (ns_b, path_b) = cni_common::netns(n0, "b")?;
    let ra = cni(n0, "ADD", "v6only-a", &path_a, &conf)?;
    let rb = cni(n0, "ADD", "v6only-b", &path_b, &conf)?;
    ensure!(ra.ok && rb.ok, "{} {}", ra.raw, rb.raw);
    ensure!(
        ra.out["ips"].as_array().map(Vec::len) == Some(1)
            && ra.out["routes"] == json!([{"dst": "::/0", "gw": GATEWAY6}]),
        "{}",
        ra.raw
    );
    let b6 = rb.out["ips"][0]["address"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let in_ns = |ns: &str, args: &[&str]| {
        twill_lab::run_cmd(
            std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args),
        )
    };
    let v4 = in_ns(&ns_a, &["ip", "-4", "addr", "show", "dev", "eth0"])?;
    ensure!(!v4.contains("inet "), "IPv4 on an IPv6-only pod: {v4}");
    in_ns(&ns_a, &["ip", "link", "set", "lo", "up"])?;
    in_ns(&ns_b, &["ip", "link", "set", "lo", "up"])?;
    // ICMPv6 echo across the node: the node resolves b's address by Neighbour Discovery
    // from its gateway address on the host veth, the pod's gateway is a static entry.
    let out = in_ns(&ns_a, &["ping", "-6", "-c", "1", "-W", "5", &b6])?;
    ensure!(out.contains("1 received"), "{out}");
    for (id, path) in [("v6only-a", &path_a), ("v6only-b", &path_b)] {
        let r = cni(n0, "DEL", id, path, &conf)?;
        ensure!(r.ok, "{}", r.raw);
    }
    assert_clean(n0, &n0.state_dir())?;
    Ok(())
}
