//! Dual-stack pod network across nodes, through the real agent on every node: the agent reads
//! both families of podCIDRs and InternalIPs, writes both ranges into the CNI config, and
//! routes other nodes' IPv6 pod CIDRs directly (shared link) and over the VXLAN overlay with an
//! IPv4 underlay. Names follow the upstream "[Feature:IPv6DualStack]" e2e tests where one
//! exists (test/e2e/network/dual_stack.go).
mod agent_common;

use std::time::Duration;

use agent_common::{AgentProc, start_agent, tcp, wait_for};
use anyhow::{Result, ensure};
use twill_common::{MASQ_PORT_MAX, MASQ_PORT_MIN};
use twill_lab::{Lab, LabSpec, Node, require};

fn agents(lab: &Lab) -> Result<Vec<AgentProc>> {
    (0..lab.nodes.len())
        .map(|i| start_agent(lab, i, &[]))
        .collect()
}

/// The agent-owned IPv6 routes of a node (`proto 0xfe`).
fn owned_routes6(node: &Node) -> Result<String> {
    node.run(&["ip", "-6", "route", "show", "proto", "0xfe"])
}

/// Waits until `from` reaches `to` (an `[ip]:port`) and the reply names `server` and sees
/// `source` as the client address.
fn wait_reply(from: &twill_lab::Pod, to: &str, server: &str, source: &str) -> Result<()> {
    let want = format!("reply={server} [{source}]:");
    let mut last = String::new();
    wait_for(
        &format!("{to} from {}", from.name),
        Duration::from_secs(20),
        || {
            let (code, out) = tcp(from, to)?;
            let ok = code == 0 && out.starts_with(&want);
            last = out;
            Ok(ok)
        },
    )
    .map_err(|e| e.context(format!("last reply: {last:?}, wanted {want:?}")))
}

/// "[Feature:IPv6DualStack] should have ipv4 and ipv6 internal node ip": each Node lists an
/// InternalIP of each family and a pod CIDR of each family; the agent takes both. It writes
/// both ranges into the CNI config (pods then get both addresses), and routes the peer's IPv6
/// pod CIDR via the peer's IPv6 InternalIP on the shared link.
#[test]
fn should_have_ipv4_and_ipv6_internal_node_ip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    let _agents = agents(&lab)?;
    let cidr6 = n0.pod_cidr6.expect("dual-stack lab").to_string();
    wait_for(
        "the agent's conflist with both ranges",
        Duration::from_mins(1),
        || {
            let conf = std::fs::read_to_string(n0.conflist_path()).unwrap_or_default();
            Ok(conf.contains("cniVersions")
                && conf.contains(&n0.pod_cidr.to_string())
                && conf.contains(&cidr6))
        },
    )?;
    let peer6 = format!(
        "{} via {} dev eth0",
        n1.pod_cidr6.expect("dual-stack lab"),
        n1.ip6.expect("dual-stack lab")
    );
    wait_for(
        "the direct IPv6 route to n1",
        Duration::from_secs(20),
        || Ok(owned_routes6(n0)?.contains(&peer6)),
    )?;
    let p0 = n0.add_pod("c0")?;
    let p1 = n1.add_pod("s1")?;
    let (ip0, ip1) = (p0.ip6.expect("IPv6"), p1.ip6.expect("IPv6"));
    ensure!(
        n0.pod_cidr6.is_some_and(|c| c.contains(ip0)),
        "{}",
        p0.result
    );
    lab.serve_dual(&p1, "s1", Some(8080), None)?;
    // Pod → pod on another node over IPv6 (direct) and IPv4; the server sees the pod's own
    // addresses.
    wait_reply(&p0, &format!("[{ip1}]:8080"), "s1", &ip0.to_string())?;
    let (code, out) = tcp(&p0, &format!("{}:8080", p1.ip))?;
    ensure!(
        code == 0 && out.starts_with(&format!("reply=s1 {}:", p0.ip)),
        "{out}"
    );
    Ok(())
}

/// A pod on node A reaches pods on nodes B over IPv6, directly (same subnet) and over the VXLAN
/// overlay with an IPv4 underlay (nodes on two subnets joined by a router that forwards only
/// IPv4); a node that leaves takes its IPv6 route with it.
#[test]
fn pods_reach_pods_on_other_nodes_over_ipv6_direct_and_vxlan() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(3).with_two_subnets().with_dual_stack())? else {
        return Ok(());
    };
    // n0 and n2 share subnet 0; n1 is on subnet 1, reached over the overlay.
    let (n0, n1, n2) = (lab.node(0), lab.node(1), lab.node(2));
    let mut agents = agents(&lab)?;
    wait_for("n0's IPv6 routes", Duration::from_mins(1), || {
        let r = owned_routes6(n0)?;
        Ok(r.contains(&format!(
            "{} via {} dev eth0",
            n2.pod_cidr6.expect("dual-stack"),
            n2.ip6.expect("dual-stack")
        )) && r.contains(&format!(
            "{} via {} dev twill.vxlan",
            n1.pod_cidr6.expect("dual-stack"),
            n1.pod_cidr6.expect("dual-stack").network()
        )))
    })?;
    let p0 = n0.add_pod("c0")?;
    let p1 = n1.add_pod("s1")?;
    let p2 = n2.add_pod("s2")?;
    let ip0 = p0.ip6.expect("IPv6").to_string();
    lab.serve_dual(&p1, "s1", Some(8080), None)?;
    lab.serve_dual(&p2, "s2", Some(8080), None)?;
    let to1 = format!("[{}]:8080", p1.ip6.expect("IPv6"));
    let to2 = format!("[{}]:8080", p2.ip6.expect("IPv6"));
    wait_reply(&p0, &to2, "s2", &ip0)?;
    wait_reply(&p0, &to1, "s1", &ip0)?;
    // The overlay's MTU (underlay − 50) carries full-size IPv6 pod packets: a 1400-byte ICMPv6
    // echo with "don't fragment" semantics (IPv6 never fragments in flight).
    let out = p0.run(&[
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "5",
        "-s",
        "1400",
        &p1.ip6.expect("IPv6").to_string(),
    ])?;
    ensure!(out.contains("1 received"), "{out}");

    // n2 leaves the cluster: n0 drops its IPv6 route, its pod becomes unreachable.
    agents.truncate(2);
    let nodes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.manifests_dir().join("nodes.json"))?)?;
    let mut nodes = nodes;
    if let Some(items) = nodes["items"].as_array_mut() {
        items.retain(|n| n["metadata"]["name"] != "n2");
    }
    twill_lab::write_atomic(
        &lab.manifests_dir().join("nodes.json"),
        &serde_json::to_vec_pretty(&nodes)?,
    )?;
    wait_for(
        "n2's IPv6 route gone from n0",
        Duration::from_secs(20),
        || Ok(!owned_routes6(n0)?.contains(&n2.pod_cidr6.expect("dual-stack").to_string())),
    )?;
    let (code, out) = p0.labtool(&["tcp", "--to", &to2, "--timeout-ms", "500"])?;
    ensure!(code != 0, "removed node still reachable over IPv6: {out}");
    Ok(())
}

/// NetworkPolicy is enforced on IPv6 as on IPv4 (the pod programs' IPv6 path over the IPv6
/// endpoint map and ipcache): a pod whose ingress admits one client answers that client on both
/// families and no other pod on either; a pod whose egress admits one server reaches it on both
/// families and nothing else; replies of allowed flows pass; a pod no policy selects keeps
/// answering everyone; `debug explain` and `debug drops` tell the IPv6 verdicts.
#[test]
fn ipv6_of_a_policy_isolated_pod_is_enforced_as_ipv4() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let _agent = start_agent(&lab, 0, &[])?;
    wait_for("the agent's conflist", Duration::from_secs(20), || {
        Ok(std::fs::read_to_string(n0.conflist_path())?.contains("cniVersions"))
    })?;
    let client = n0.add_pod("c")?;
    let other = n0.add_pod("x")?;
    let locked = n0.add_pod("l")?;
    let open = n0.add_pod("o")?;
    for (p, name) in [(&locked, "l"), (&open, "o"), (&client, "c")] {
        lab.serve_dual(p, name, Some(8080), None)?;
    }
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        client.pod_object("default", "c", &[("app", "c")], &[]),
        other.pod_object("default", "x", &[("app", "x")], &[]),
        locked.pod_object("default", "l", &[("app", "l")], &[]),
        open.pod_object("default", "o", &[("app", "o")], &[]),
    ]});
    lab.apply_manifest("pods.json", &serde_json::to_string_pretty(&objects)?)?;
    let six = |p: &twill_lab::Pod| format!("[{}]:8080", p.ip6.expect("IPv6"));
    let four = |p: &twill_lab::Pod| format!("{}:8080", p.ip);
    let (c6, x6) = (
        client.ip6.expect("IPv6").to_string(),
        other.ip6.expect("IPv6").to_string(),
    );
    for p in [&locked, &open] {
        wait_reply(&client, &six(p), &p.name, &c6)?;
    }
    // l admits c only; x may reach o only.
    lab.apply_manifest(
        "policies.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: l-from-c, \
         namespace: default}\nspec:\n  podSelector: {matchLabels: {app: l}}\n  ingress:\n  \
         - from: [{podSelector: {matchLabels: {app: c}}}]\n---\napiVersion: \
         networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x-to-o, namespace: \
         default}\nspec:\n  podSelector: {matchLabels: {app: x}}\n  policyTypes: [Egress]\n  \
         egress:\n  - to: [{podSelector: {matchLabels: {app: o}}}]\n",
    )?;
    let blocked = |from: &twill_lab::Pod, to: &str| -> Result<bool> {
        let (code, _) = from.labtool(&["tcp", "--to", to, "--timeout-ms", "300"])?;
        Ok(code != 0)
    };
    wait_for(
        "l closed to x and x's egress cut, on both families",
        Duration::from_secs(20),
        || {
            Ok(blocked(&other, &six(&locked))?
                && blocked(&other, &four(&locked))?
                && blocked(&other, &six(&client))?
                && blocked(&other, &four(&client))?)
        },
    )?;
    // The allowed peers still pass, over IPv6 and IPv4, replies included.
    wait_reply(&client, &six(&locked), "l", &c6)?;
    wait_reply(&other, &six(&open), "o", &x6)?;
    let (code, out) = tcp(&client, &four(&locked))?;
    ensure!(code == 0, "c to l over IPv4: {out}");
    let (code, out) = tcp(&other, &four(&open))?;
    ensure!(code == 0, "x to o over IPv4: {out}");
    // The unselected pod answers everyone on both families.
    wait_reply(&other, &six(&open), "o", &x6)?;
    wait_reply(&client, &six(&open), "o", &c6)?;
    // Neighbour Discovery keeps working for the isolated pods: their neighbour entry of the
    // gateway is refreshed through the veth (a probe after the policies went in succeeds).
    let out = locked.run(&["ip", "-6", "neigh", "show", "fe80::1"])?;
    ensure!(out.contains("fe80::1"), "{out}");
    // The verdicts, named: debug explain over IPv6 addresses and the drops by reason.
    let explain = |from: &str, to: &str| n0.debug(&["explain", "--from", from, "--to", to]);
    let out = explain(&x6, &six(&locked))?;
    ensure!(
        out.contains("DENIED") && out.contains("ingress of default/l: denied"),
        "{out}"
    );
    let out = explain("default/c", &six(&locked))?;
    ensure!(
        out.contains("ALLOWED") && out.contains("default/l-from-c"),
        "{out}"
    );
    let out = explain("default/x", &six(&client))?;
    ensure!(
        out.contains("DENIED") && out.contains("egress of default/x: denied"),
        "{out}"
    );
    let drops = n0.debug(&["drops"])?;
    ensure!(
        drops.contains("policy_denied_ingress") && drops.contains("policy_denied_egress"),
        "{drops}"
    );
    Ok(())
}

/// The source port `out` (a labtool reply `reply=<name> [<addr>]:<port> ...`) shows, when the
/// address is `addr`.
fn seen_port(out: &str, name: &str, addr: &str) -> Option<u16> {
    out.strip_prefix(&format!("reply={name} [{addr}]:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A fast path / masquerade counter of `twill-agent debug fastpath -o json`.
fn fastpath_counter(node: &Node, name: &str) -> Result<u64> {
    let out = node.debug(&["fastpath", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or(0))
}

/// IPv6 pod egress to a host outside the cluster leaves with the node's IPv6 address (the
/// outside host has no route to pod ranges, so only a masqueraded connection is answered),
/// while pod → pod across nodes keeps the pod's own IPv6 address. With the default flags the
/// masquerade is eBPF's: a port of the masquerade range, TCP and UDP, the outside host's
/// ICMPv6 port unreachable translated back to the pod (its connected UDP socket learns
/// ECONNREFUSED), no `ip6 twill` table nor any Twill rule in the node's nftables, no netfilter
/// conntrack entry; Neighbour Discovery keeps working (every exchange above needs it, and the
/// node holds a resolved neighbour entry for the outside host).
#[test]
fn ipv6_pod_egress_to_an_outside_host_is_masqueraded() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client().with_dual_stack())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    let mut serve = lab.external().cmd(twill_lab::bin("labtool"));
    serve.args([
        "serve", "--name", "outside", "--tcp", "9090", "--udp", "9091", "--ipv6",
    ]);
    lab.track(twill_lab::spawn_and_wait_ready(serve)?);
    let _agents = agents(&lab)?;
    wait_for("the agent's conflist", Duration::from_secs(20), || {
        Ok(std::fs::read_to_string(n0.conflist_path())?.contains("cniVersions"))
    })?;
    let p0 = n0.add_pod("egress")?;
    let p1 = n1.add_pod("peer")?;
    lab.serve_dual(&p1, "peer", Some(8080), None)?;
    let node6 = n0.ip6.expect("dual-stack").to_string();
    let outside = "[fd00:172:30::200]";
    wait_reply(&p0, &format!("{outside}:9090"), "outside", &node6)?;
    for _ in 0..3 {
        let (code, out) = tcp(&p0, &format!("{outside}:9090"))?;
        let port = seen_port(&out, "outside", &node6);
        ensure!(
            code == 0 && port.is_some_and(|p| (MASQ_PORT_MIN..=MASQ_PORT_MAX).contains(&p)),
            "not masqueraded to the node's IPv6 address and a masquerade port: {out}"
        );
    }
    let (code, out) = agent_common::udp(&p0, &format!("{outside}:9091"), true)?;
    ensure!(
        code == 0 && seen_port(&out, "outside", &node6).is_some(),
        "UDP not masqueraded: {out}"
    );
    // Nobody listens on 9097: the outside host answers the node's address with an ICMPv6
    // port unreachable, which only reaches the pod's socket translated back (exit code 2:
    // refused; untranslated it would be lost and the client time out).
    let (code, out) = agent_common::udp(&p0, &format!("{outside}:9097"), true)?;
    ensure!(
        code == 2,
        "ICMPv6 error not translated back to the pod ({code}): {out}"
    );
    wait_reply(
        &p0,
        &format!("[{}]:8080", p1.ip6.expect("IPv6")),
        "peer",
        &p0.ip6.expect("IPv6").to_string(),
    )?;
    ensure!(
        fastpath_counter(n0, "masq6_snat")? >= 5,
        "IPv6 masquerade counters: {}",
        n0.debug(&["fastpath"])?
    );
    let ruleset = n0.run(&["nft", "list", "ruleset"])?;
    ensure!(!ruleset.contains("twill"), "nft ruleset: {ruleset}");
    let ct = n0.cmd("conntrack").args(["-L", "-f", "ipv6"]).output()?;
    let ct = String::from_utf8_lossy(&ct.stdout);
    ensure!(!ct.contains("dport=9090"), "tracked by netfilter: {ct}");
    let neigh = n0.run(&["ip", "-6", "neigh", "show", "fd00:172:30::200"])?;
    ensure!(neigh.contains("lladdr"), "no resolved neighbour: {neigh}");
    Ok(())
}

/// `--masquerade-mode nftables` keeps the `ip6 twill` table, which masquerades IPv6 pod egress
/// as before (and the eBPF masquerade leaves it alone).
#[test]
fn ipv6_pod_egress_is_masqueraded_by_nftables_in_its_mode() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_external_client().with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let mut serve = lab.external().cmd(twill_lab::bin("labtool"));
    serve.args(["serve", "--name", "outside", "--tcp", "9090", "--ipv6"]);
    lab.track(twill_lab::spawn_and_wait_ready(serve)?);
    let _agent = start_agent(&lab, 0, &["--masquerade-mode", "nftables"])?;
    wait_for("the ip6 twill table", Duration::from_secs(20), || {
        Ok(n0
            .run(&["nft", "list", "table", "ip6", "twill"])
            .is_ok_and(|t| t.contains("masquerade")))
    })?;
    let p0 = n0.add_pod("egress")?;
    let node6 = n0.ip6.expect("dual-stack").to_string();
    wait_reply(&p0, "[fd00:172:30::200]:9090", "outside", &node6)?;
    ensure!(
        fastpath_counter(n0, "masq6_snat")? == 0,
        "the eBPF masquerade ran in nftables mode: {}",
        n0.debug(&["fastpath"])?
    );
    Ok(())
}

/// IPv6 `--non-masquerade-cidrs` (and `--cluster-cidr` with an IPv6 entry) are exceptions of
/// the IPv6 masquerade in both modes: with the outside host exempted (and given a route back to
/// the node's IPv6 pod CIDR), it sees the pod's own IPv6 address.
#[test]
fn ipv6_non_masquerade_cidrs_keep_the_pod_address_in_both_modes() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_external_client().with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let ext = lab.external();
    let mut serve = ext.cmd(twill_lab::bin("labtool"));
    serve.args(["serve", "--name", "outside", "--tcp", "9090", "--ipv6"]);
    lab.track(twill_lab::spawn_and_wait_ready(serve)?);
    let cidr6 = n0.pod_cidr6.expect("dual-stack").to_string();
    let node6 = n0.ip6.expect("dual-stack").to_string();
    twill_lab::run_cmd(
        ext.cmd("ip")
            .args(["-6", "route", "add", &cidr6, "via", &node6]),
    )?;
    let outside = "[fd00:172:30::200]:9090";
    for mode in ["ebpf", "nftables"] {
        let agent = start_agent(
            &lab,
            0,
            &[
                "--masquerade-mode",
                mode,
                "--cluster-cidr",
                "10.244.0.0/16,fd00:10:244::/56",
                "--non-masquerade-cidrs",
                "fd00:172:30::200/128",
            ],
        )?;
        wait_for("the agent's conflist", Duration::from_secs(20), || {
            Ok(std::fs::read_to_string(n0.conflist_path())?.contains("cniVersions"))
        })?;
        let pod = n0.add_pod(&format!("exempt-{mode}"))?;
        let ip6 = pod.ip6.expect("IPv6").to_string();
        wait_reply(&pod, outside, "outside", &ip6)
            .map_err(|e| e.context(format!("--masquerade-mode {mode}")))?;
        drop(agent);
    }
    Ok(())
}
