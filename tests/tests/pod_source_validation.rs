//! Source-address validation on pod veths: a pod that sends with an address that is
//! not its own — another pod's on the same node, the node's — has those packets dropped on its
//! veth as `source_spoofed`, counted in `debug drops`, while its own traffic keeps flowing; in
//! both families (IPv6 on a dual-stack lab, where Neighbour Discovery, Duplicate Address
//! Detection from `::` and link-local traffic with the node keep working).
//! The spoofed addresses are lab addresses, added inside the pod's own namespace; nothing
//! leaves the lab.
mod agent_common;

use std::net::IpAddr;
use std::time::Duration;

use agent_common::{start_agent, udp, wait_for};
use anyhow::{Result, ensure};
use serde_json::Value;
use twill_lab::{LabSpec, Node, Pod, require};

/// Packets the node's programs counted under `reason` so far.
fn counted(node: &Node, reason: &str) -> Result<u64> {
    let drops: Vec<Value> = serde_json::from_str(&node.debug(&["drops", "-o", "json"])?)?;
    Ok(drops
        .iter()
        .find(|d| d["reason"] == reason)
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0))
}

fn spoofed(node: &Node) -> Result<u64> {
    counted(node, "source_spoofed")
}

#[test]
fn a_pod_sending_with_an_address_not_its_own_is_dropped_as_source_spoofed() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let node = lab.node(0);
    let server = node.add_pod("savsrv")?;
    let client = node.add_pod("savcli")?;
    let other = node.add_pod("savoth")?;
    lab.serve(&server, "server", None, Some(53))?;
    let _agent = start_agent(&lab, 0, &[])?;
    let to = format!("{}:53", server.ip);
    // The pod programs are on the veths once the client's answered datagrams are counted by
    // them (no policy selects these pods: passed as not enforced).
    wait_for(
        "the pod programs to see the client's UDP",
        Duration::from_secs(20),
        || {
            let before = node
                .debug(&["drops", "-o", "json"])
                .ok()
                .and(counted(node, "policy_not_enforced").ok());
            Ok(udp(&client, &to, false)?.0 == 0
                && before
                    .is_some_and(|b| counted(node, "policy_not_enforced").is_ok_and(|n| n > b)))
        },
    )?;

    spoof(
        node,
        &client,
        &to,
        &[
            ("another pod's", other.ip.into()),
            ("the node's", node.ip.into()),
        ],
    )?;
    // The pod's own address still works, and nothing legitimate was counted as spoofed.
    let before = spoofed(node)?;
    legitimate_traffic_passes(node, &[&client, &other], &to, before, "UDP")
}

/// `pods`' own datagrams to `to` still pass, and the spoofed counter is where it was
/// (`before`): nothing legitimate was taken for spoofed since.
fn legitimate_traffic_passes(
    node: &Node,
    pods: &[&Pod],
    to: &str,
    before: u64,
    what: &str,
) -> Result<()> {
    for pod in pods {
        let (code, out) = udp(pod, to, false)?;
        ensure!(code == 0, "{}'s own {what}: {code} {out}", pod.name);
    }
    let after = spoofed(node)?;
    ensure!(
        after == before,
        "legitimate {what} traffic counted as spoofed ({before} -> {after})"
    );
    Ok(())
}

/// Sends `COUNT` datagrams from `client` to `to` from each of `addrs` (added to the client's
/// interface for the while), each batch dropped and counted as `source_spoofed`.
fn spoof(node: &Node, client: &Pod, to: &str, addrs: &[(&str, IpAddr)]) -> Result<()> {
    const COUNT: u64 = 20;
    for (what, addr) in addrs {
        let before = spoofed(node)?;
        let (family, prefix) = if addr.is_ipv6() {
            ("-6", 128)
        } else {
            ("-4", 32)
        };
        let cidr = format!("{addr}/{prefix}");
        // No duplicate address detection: the address is usable at once (and the node, which
        // owns it, must not see it defended).
        let mut add = vec!["ip", family, "addr", "add", &cidr, "dev", &client.ifname];
        if addr.is_ipv6() {
            add.push("nodad");
        }
        client.run(&add)?;
        let (code, out) = client.labtool(&[
            "udp-send",
            "--from",
            &addr.to_string(),
            "--to",
            to,
            "--count",
            &COUNT.to_string(),
        ])?;
        ensure!(
            code == 0 && out == format!("sent={COUNT}"),
            "udp-send: {code} {out}"
        );
        let mut now = before;
        wait_for(
            &format!("{COUNT} datagrams from {what} address dropped as source_spoofed"),
            Duration::from_secs(10),
            || {
                now = spoofed(node)?;
                Ok(now >= before + COUNT)
            },
        )?;
        client.run(&["ip", family, "addr", "del", &cidr, "dev", &client.ifname])?;
        eprintln!("{what} address {addr}: source_spoofed {before} -> {now}");
    }
    Ok(())
}

/// The IPv6 twin: another pod's and the node's IPv6 addresses are dropped and counted, while
/// the pod's own IPv6 traffic, Duplicate Address Detection (from `::`) of an address it adds,
/// and a link-local exchange with its gateway (Neighbour Discovery's addresses) are not.
#[test]
fn a_pod_sending_with_an_ipv6_address_not_its_own_is_dropped_as_source_spoofed() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let node = lab.node(0);
    let server = node.add_pod("sav6srv")?;
    let client = node.add_pod("sav6cli")?;
    let other = node.add_pod("sav6oth")?;
    let ip6 = |p: &Pod| {
        p.ip6
            .ok_or_else(|| anyhow::anyhow!("{} has no IPv6 address", p.name))
    };
    let node_ip6 = node
        .ip6
        .ok_or_else(|| anyhow::anyhow!("the node has no IPv6 address"))?;
    lab.serve_dual(&server, "server", None, Some(53))?;
    let _agent = start_agent(&lab, 0, &[])?;
    let to = format!("[{}]:53", ip6(&server)?);
    wait_for(
        "the pod programs to see the client's IPv6 UDP",
        Duration::from_secs(20),
        || {
            let before = counted(node, "policy_not_enforced").ok();
            Ok(udp(&client, &to, false)?.0 == 0
                && before
                    .is_some_and(|b| counted(node, "policy_not_enforced").is_ok_and(|n| n > b)))
        },
    )?;

    spoof(
        node,
        &client,
        &to,
        &[
            ("another pod's IPv6", ip6(&other)?.into()),
            ("the node's IPv6", node_ip6.into()),
        ],
    )?;

    let before = spoofed(node)?;
    // Duplicate Address Detection: solicitations from `::` to the solicited-node multicast
    // address (and MLD reports), sent while a new address is tentative. An address of a lab
    // prefix no route leads to; removed once DAD is over.
    let fresh = "fd00:ffff:5a7::1/128";
    // DAD on, whatever the pod's defaults: a solicitation from `::` is then sent, and would be
    // counted as spoofed if the check refused it (DAD itself succeeds either way).
    for (knob, value) in [("accept_dad", "1"), ("dad_transmits", "1")] {
        let path = format!("net.ipv6.conf.{}.{knob}={value}", client.ifname);
        client.run(&["sysctl", "-q", "-w", &path])?;
    }
    let link_scope = counted(node, "policy6_link_scope")?;
    client.run(&["ip", "-6", "addr", "add", fresh, "dev", &client.ifname])?;
    wait_for(
        "duplicate address detection of a new address to end",
        Duration::from_secs(10),
        || {
            let tentative = client.run(&[
                "ip",
                "-6",
                "addr",
                "show",
                "dev",
                &client.ifname,
                "tentative",
            ])?;
            Ok(!tentative.contains("fd00:ffff:5a7::1"))
        },
    )?;
    let dadfailed = client.run(&[
        "ip",
        "-6",
        "addr",
        "show",
        "dev",
        &client.ifname,
        "dadfailed",
    ])?;
    ensure!(dadfailed.trim().is_empty(), "DAD failed: {dadfailed}");
    client.run(&["ip", "-6", "addr", "del", fresh, "dev", &client.ifname])?;
    // The solicitation and the MLD reports reached the pod programs (policy leaves them alone
    // by their multicast destination) and were not dropped before.
    ensure!(
        counted(node, "policy6_link_scope")? > link_scope,
        "no DAD/MLD packet from the pod seen by its programs"
    );
    // Link-local both ways with the pod's gateway (`fe80::1` on the host veth).
    let gateway = format!("fe80::1%{}", client.ifname);
    client.run(&["ping", "-6", "-c", "2", "-W", "2", &gateway])?;
    // The pod's own IPv6 address still works, and nothing legitimate was counted as spoofed.
    legitimate_traffic_passes(
        node,
        &[&client, &other],
        &to,
        before,
        "IPv6 (UDP, ND, DAD, link-local)",
    )
}
