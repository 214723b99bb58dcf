//! Source-address validation on pod veths: a pod that sends with an address that is
//! not its own — another pod's on the same node, the node's — has those packets dropped on its
//! veth as `source_spoofed`, counted in `debug drops`, while its own traffic keeps flowing.
//! The spoofed addresses are lab addresses, added inside the pod's own namespace; nothing
//! leaves the lab.
mod agent_common;

use std::time::Duration;

use agent_common::{start_agent, udp, wait_for};
use anyhow::{Result, ensure};
use serde_json::Value;
use twill_lab::{LabSpec, Node, require};

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
    const COUNT: u64 = 20;
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

    for (what, addr) in [("another pod's", other.ip), ("the node's", node.ip)] {
        let before = spoofed(node)?;
        client.run(&[
            "ip",
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            &client.ifname,
        ])?;
        let (code, out) = client.labtool(&[
            "udp-send",
            "--from",
            &addr.to_string(),
            "--to",
            &to,
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
        client.run(&[
            "ip",
            "addr",
            "del",
            &format!("{addr}/32"),
            "dev",
            &client.ifname,
        ])?;
        eprintln!("{what} address {addr}: source_spoofed {before} -> {now}");
    }
    // The pod's own address still works, and nothing legitimate was counted as spoofed.
    let before = spoofed(node)?;
    let (code, out) = udp(&client, &to, false)?;
    ensure!(
        code == 0,
        "the client's own UDP after the spoofing: {code} {out}"
    );
    let (code, out) = udp(&other, &to, false)?;
    ensure!(code == 0, "the other pod's UDP: {code} {out}");
    ensure!(
        spoofed(node)? == before,
        "legitimate datagrams counted as spoofed"
    );
    Ok(())
}
