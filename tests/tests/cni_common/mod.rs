//! Helpers shared by the `cni_*` lab tests: invoke twill-cni, and list what it left
//! behind in a node (host veths, pod routes, IPAM reservations).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use twill_lab::{Node, netns_path, wait_until};

/// Outcome of one plugin run: exit success, and stdout parsed as JSON (Null if empty).
pub struct Run {
    pub ok: bool,
    pub out: Value,
    pub raw: String,
}

impl Run {
    pub fn code(&self) -> u64 {
        self.out["code"].as_u64().unwrap_or(0)
    }
}

pub fn cni(node: &Node, command: &str, id: &str, netns_path: &str, conf: &Value) -> Result<Run> {
    let out = node.cni(command, id, netns_path, "eth0", conf)?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw)
            .with_context(|| format!("stdout of {command} is not JSON: {raw:?}"))?
    };
    if !out.status.success() && !parsed["code"].is_u64() {
        bail!(
            "{command} failed without an error object: {raw:?} stderr={}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Run {
        ok: out.status.success(),
        out: parsed,
        raw,
    })
}

/// Starts twill-cni inside the node without waiting (for kill -9 tests).
pub fn spawn_cni(
    node: &Node,
    command: &str,
    id: &str,
    netns_path: &str,
    conf: &Value,
) -> Result<Child> {
    let mut cmd = node.cmd(twill_lab::bin("twill-cni"));
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    // Closing stdin starts the plugin's work (it reads stdin to EOF first).
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        conf.to_string().as_bytes(),
    )?;
    Ok(child)
}

/// A pod-like network namespace of `node`, named as the lab names pods (teardown deletes it by
/// its run id).
pub fn netns(node: &Node, name: &str) -> Result<(String, String)> {
    let ns = node.pod_netns_name(name);
    twill_lab::run_cmd(Command::new("ip").args(["netns", "add", &ns]))?;
    let path = netns_path(&ns).display().to_string();
    Ok((ns, path))
}

pub fn del_netns(ns: &str) -> Result<()> {
    twill_lab::run_cmd(Command::new("ip").args(["netns", "del", ns])).map(|_| ())
}

/// Names of the links in the node namespace (without the `@peer` suffix).
fn link_names(node: &Node) -> Result<Vec<String>> {
    let out = node.run(&["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// Host-side veths twill-cni names (`twl` + 11 hex digits) present in the node.
pub fn host_links(node: &Node) -> Result<Vec<String>> {
    let mut v = link_names(node)?;
    v.retain(|n| {
        n.len() == 14 && n.starts_with("twl") && n[3..].bytes().all(|b| b.is_ascii_hexdigit())
    });
    Ok(v)
}

/// Host veths a DEL retired (`twx` + ifindex) that their reaper has not deleted yet.
pub fn retired_links(node: &Node) -> Result<Vec<String>> {
    let mut v = link_names(node)?;
    v.retain(|n| n.len() > 3 && n.starts_with("twx") && n[3..].bytes().all(|b| b.is_ascii_digit()));
    Ok(v)
}

/// Waits (bounded) until every retired link's background reaper has deleted it.
pub fn wait_reaped(node: &Node) -> Result<()> {
    let mut left = Vec::new();
    wait_until("retired links reaped", Duration::from_secs(10), || {
        left = retired_links(node)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("still there: {left:?}"))
}

/// Node routes through a twill host veth, live or retired.
pub fn pod_routes(node: &Node) -> Result<Vec<String>> {
    let out = node.run(&["ip", "route", "show"])?;
    Ok(out
        .lines()
        .filter(|l| l.contains(" dev twl") || l.contains(" dev twx"))
        .map(str::to_owned)
        .collect())
}

/// Reserved addresses in `<stateDir>/ipam/<network>`.
pub fn reservations(state_dir: &Path, network: &str) -> Vec<String> {
    let dir = state_dir.join("ipam").join(network);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    v.sort();
    v
}

pub fn assert_clean(node: &Node, state_dir: &Path) -> Result<()> {
    wait_reaped(node)?;
    let (l, r, i) = (
        host_links(node)?,
        pod_routes(node)?,
        reservations(state_dir, "twill"),
    );
    if !(l.is_empty() && r.is_empty() && i.is_empty()) {
        bail!("leaked: links={l:?} routes={r:?} reservations={i:?}");
    }
    Ok(())
}

/// Node IPv6 routes to single pods (`/128`) through a twill host veth, live or retired.
pub fn pod_routes6(node: &Node) -> Result<Vec<String>> {
    let out = node.run(&["ip", "-6", "route", "show"])?;
    Ok(out
        .lines()
        .filter(|l| !l.starts_with("fe80::"))
        .filter(|l| l.contains(" dev twl") || l.contains(" dev twx"))
        .map(str::to_owned)
        .collect())
}
