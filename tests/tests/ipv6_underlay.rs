//! The pod network over an IPv6 underlay, through the real agent on every node: nodes whose
//! uplinks hold only IPv6 addresses and whose Node objects list only IPv6 InternalIPs. Peers'
//! pod CIDRs of both families are routed directly (IPv6 ones via the peer, IPv4 ones `via
//! inet6` the peer) or over a VXLAN device with an IPv6 local address (70 bytes of overhead);
//! and an IPv6-only cluster (IPv6 pod CIDRs only) runs pods and an IPv6 ClusterIP Service with
//! no IPv4 in the agent's config. There is no upstream e2e test for the underlay; an IPv6-only
//! cluster is what upstream's conformance suite runs on in its IPv6 jobs.
mod agent_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use agent_common::{AgentProc, replier, start_agent, tcp, wait_for};
use anyhow::{Context as _, Result, ensure};
use twill_lab::{Lab, LabSpec, Node, Pod, manifests, require};

/// An address of the lab's IPv6 Service range.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x66);

fn agents(lab: &Lab, extra: &[&str]) -> Result<Vec<AgentProc>> {
    (0..lab.nodes.len())
        .map(|i| start_agent(lab, i, extra))
        .collect()
}

/// The agent-owned routes of a node of one family (`-4` / `-6`), `proto 0xfe`.
fn owned_routes(node: &Node, family: &str) -> Result<String> {
    node.run(&["ip", family, "route", "show", "proto", "0xfe"])
}

fn ip6(pod: &Pod) -> Result<Ipv6Addr> {
    pod.ip6
        .with_context(|| format!("pod {} has no IPv6 address", pod.name))
}

/// Waits until `from` reaches `to` (an `ip:port`) and the reply names `server` and shows
/// `source` as the client's address (no translation on the way).
fn wait_reply(from: &Pod, to: &str, server: &str, source: &str) -> Result<()> {
    let want = format!("reply={server} {source}:");
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

/// `ip:port` with brackets around an IPv6 address; the peer as labtool prints it.
fn at(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}
fn seen(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Both families from `client` to `server` on port 8080, each keeping the client's address.
fn wait_both_families(client: &Pod, server: &Pod) -> Result<()> {
    for (to, from) in [
        (IpAddr::V6(ip6(server)?), IpAddr::V6(ip6(client)?)),
        (IpAddr::V4(server.ip), IpAddr::V4(client.ip)),
    ] {
        wait_reply(client, &at(to, 8080), &server.name, &seen(from))?;
    }
    Ok(())
}

/// A full-size packet of the pod MTU `mtu` with "don't fragment" crosses: ICMP echo of
/// `mtu − 28` bytes over IPv4 and `mtu − 48` over IPv6.
fn full_size_pings(client: &Pod, server: &Pod, mtu: u32) -> Result<()> {
    let cases = [
        ("-4", (mtu - 28).to_string(), server.ip.to_string()),
        ("-6", (mtu - 48).to_string(), ip6(server)?.to_string()),
    ];
    for (family, size, to) in cases {
        let out = client.run(&[
            "ping", family, "-c", "1", "-W", "5", "-M", "do", "-s", &size, &to,
        ])?;
        ensure!(out.contains("1 received"), "{family} -s {size}: {out}");
    }
    Ok(())
}

/// A counter of `twill-agent debug fastpath -o json`.
fn fastpath_counter(node: &Node, name: &str) -> Result<u64> {
    let out = node.debug(&["fastpath", "-o", "json"])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("debug fastpath: {out}"))?;
    Ok(v["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or(0))
}

/// The MTU the agent wrote into node `node`'s CNI config, once it is `want`.
fn wait_conflist_mtu(node: &Node, want: u32) -> Result<()> {
    wait_for(
        &format!("{}'s conflist with mtu {want}", node.name),
        Duration::from_secs(20),
        || {
            let conf = std::fs::read_to_string(node.conflist_path()).unwrap_or_default();
            Ok(conf.contains("cniVersions") && conf.contains(&format!("\"mtu\": {want}")))
        },
    )
}

/// Nodes joined by an IPv6-only underlay, pods of both families. With the default routing mode
/// (one subnet) the agent routes the peers' IPv6 pod CIDRs via their IPv6 InternalIP and their
/// IPv4 pod CIDRs `via inet6` the same address, and pods reach each other on both families
/// keeping their addresses. Restarted with `--routing-mode vxlan`, the agents move every peer
/// onto the overlay: a VXLAN device with the node's IPv6 address as its local address, FDB
/// remotes that are the peers' IPv6 addresses, MTU 1500 − 70, so new pods get 1430 and
/// full-size packets of both families cross with "don't fragment".
#[test]
fn pods_reach_pods_on_other_nodes_over_an_ipv6_underlay_direct_and_vxlan() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_ipv6_underlay())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    let n1_ip6 = n1.ip6.context("IPv6 underlay")?;
    let v4 = n0.run(&["ip", "-4", "addr", "show", "dev", "eth0"])?;
    ensure!(!v4.contains("inet "), "IPv4 on an IPv6 underlay: {v4}");
    let agents_direct = agents(&lab, &[])?;
    let routes6 = format!(
        "{} via {n1_ip6} dev eth0",
        n1.pod_cidr6.context("dual-stack pods")?
    );
    let routes4 = format!("{} via inet6 {n1_ip6} dev eth0", n1.pod_cidr);
    wait_for("n0's direct routes to n1", Duration::from_secs(20), || {
        Ok(
            owned_routes(n0, "-6")?.contains(&routes6)
                && owned_routes(n0, "-4")?.contains(&routes4),
        )
    })?;
    wait_conflist_mtu(n0, 1500)?;
    let c0 = n0.add_pod("c0")?;
    let s1 = n1.add_pod("s1")?;
    lab.serve_dual(&s1, "s1", Some(8080), None)?;
    wait_both_families(&c0, &s1)?;
    full_size_pings(&c0, &s1, 1500)?;
    // The IPv4 packets take eBPF host routing: the FIB lookup's IPv6 next hop is handed to
    // bpf_redirect_neigh (at least SYN, ACK and the request of each connection).
    let before = fastpath_counter(n0, "fastpath_redirect_neigh")?;
    for _ in 0..10 {
        let (code, out) = tcp(&c0, &at(IpAddr::V4(s1.ip), 8080))?;
        ensure!(code == 0, "{out}");
    }
    let neigh = fastpath_counter(n0, "fastpath_redirect_neigh")? - before;
    ensure!(
        neigh >= 10 * 3,
        "redirect_neigh grew by {neigh} for 10 IPv4 connections via inet6:\n{}",
        n0.debug(&["fastpath"])?
    );
    ensure!(
        n0.run(&["ip", "link", "show", "twill.vxlan"]).is_err(),
        "an overlay device on one subnet in mode auto"
    );

    // Over the overlay with IPv6 outer headers.
    drop(agents_direct);
    let _agents = agents(&lab, &["--routing-mode", "vxlan"])?;
    let vtep1 = n1.pod_cidr.network();
    wait_for("n0's overlay routes to n1", Duration::from_secs(20), || {
        let (r4, r6) = (owned_routes(n0, "-4")?, owned_routes(n0, "-6")?);
        Ok(
            r4.contains(&format!("{} via {vtep1} dev twill.vxlan", n1.pod_cidr))
                && r6.contains(&format!(
                    "{} via {} dev twill.vxlan",
                    n1.pod_cidr6.context("dual-stack pods")?,
                    n1.pod_cidr6.context("dual-stack pods")?.network()
                )),
        )
    })?;
    let link = n0.run(&["ip", "-d", "link", "show", "twill.vxlan"])?;
    ensure!(
        link.contains("mtu 1430")
            && link.contains(&format!("local {}", n0.ip6.context("IPv6 underlay")?)),
        "{link}"
    );
    let fdb = n0.run(&["bridge", "fdb", "show", "dev", "twill.vxlan"])?;
    ensure!(fdb.contains(&format!("dst {n1_ip6}")), "n0 fdb: {fdb}");
    wait_conflist_mtu(n0, 1430)?;
    wait_conflist_mtu(n1, 1430)?;
    let c0v = n0.add_pod("c0v")?;
    let s1v = n1.add_pod("s1v")?;
    lab.serve_dual(&s1v, "s1v", Some(8080), None)?;
    wait_both_families(&c0v, &s1v)?;
    full_size_pings(&c0v, &s1v, 1430)?;
    // The pods made before keep working over the overlay (their larger MTU is theirs to
    // discover by PMTU; small requests cross as they are).
    wait_both_families(&c0, &s1)?;
    Ok(())
}

/// Waits until the agent of `node` answers `/healthz` 200 on the node's IPv6 address.
fn wait_healthz6(node: &Node) -> Result<()> {
    let to = at(IpAddr::V6(node.ip6.context("IPv6 underlay")?), 10256);
    wait_for(
        &format!("{}'s /healthz on {to}", node.name),
        Duration::from_secs(20),
        || {
            let (code, out) = node.labtool(&[
                "http",
                "--to",
                &to,
                "--path",
                "/healthz",
                "--timeout-ms",
                "1000",
            ])?;
            Ok(code == 0 && out.starts_with("status=200"))
        },
    )
}

/// An IPv6-only cluster: Nodes with only IPv6 InternalIPs and only an IPv6 podCIDR, agents with
/// no IPv4 in their flags (servers on IPv6 addresses). The agent writes only the IPv6 range,
/// twill-cni gives pods only an IPv6 address, pods reach pods on the other node directly over
/// IPv6, and a SingleStack IPv6 ClusterIP Service spreads a pod's connections over backends
/// on both nodes; the agents' health endpoints answer over IPv6. Restarted with
/// `--routing-mode vxlan`, the same pods and Service work over the overlay (IPv6 outer headers,
/// no IPv4 address on the device) and a new pod gets the overlay's MTU (1430).
#[test]
fn ipv6_only_cluster_pods_and_services_work() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_ipv6_only())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    let cidr6 = n0.pod_cidr6.context("IPv6-only")?;
    let direct_agents = agents(&lab, &[])?;
    wait_for(
        "the agent's conflist with only the IPv6 range",
        Duration::from_secs(20),
        || {
            let conf = std::fs::read_to_string(n0.conflist_path()).unwrap_or_default();
            Ok(conf.contains("cniVersions")
                && conf.contains(&cidr6.to_string())
                && !conf.contains(&n0.pod_cidr.to_string()))
        },
    )?;
    let peer = format!(
        "{} via {} dev eth0",
        n1.pod_cidr6.context("IPv6-only")?,
        n1.ip6.context("IPv6-only")?
    );
    wait_for("n0's route to n1's pods", Duration::from_secs(20), || {
        Ok(owned_routes(n0, "-6")?.contains(&peer))
    })?;
    ensure!(
        owned_routes(n0, "-4")?.trim().is_empty(),
        "IPv4 routes in an IPv6-only cluster"
    );
    let client = n0.add_pod("client")?;
    let web0 = n0.add_pod("web0")?;
    let web1 = n1.add_pod("web1")?;
    for p in [&client, &web0, &web1] {
        ensure!(
            p.ip == Ipv4Addr::UNSPECIFIED
                && p.ip6.is_some_and(|a| p.node != "n0" || cidr6.contains(a)),
            "pod {} of an IPv6-only network: {}",
            p.name,
            p.result
        );
        let v4 = p.run(&["ip", "-4", "addr", "show", "dev", "eth0"])?;
        ensure!(!v4.contains("inet "), "IPv4 on pod {}: {v4}", p.name);
    }
    lab.serve_dual(&web0, "web0", Some(8080), None)?;
    lab.serve_dual(&web1, "web1", Some(8080), None)?;
    let c6 = IpAddr::V6(ip6(&client)?);
    wait_reply(
        &client,
        &at(IpAddr::V6(ip6(&web1)?), 8080),
        "web1",
        &seen(c6),
    )?;

    let svc = manifests::service(
        "default",
        "web",
        &[IpAddr::V6(VIP6)],
        "SingleStack",
        &[("http", 80, 8080, "TCP")],
    );
    let eps = manifests::endpoint_slice(
        "default",
        "web",
        "web-v6",
        &[
            (IpAddr::V6(ip6(&web0)?), "n0"),
            (IpAddr::V6(ip6(&web1)?), "n1"),
        ],
        &[("http", 8080, "TCP")],
    );
    lab.apply_manifest("web.yaml", &format!("{svc}---\n{eps}"))?;
    wait_both_backends(&client, &["web0", "web1"])?;

    // Health on the node's IPv6 InternalIP (the agent's only bind family here).
    for node in [n0, n1] {
        wait_healthz6(node)?;
    }

    // The same cluster over the overlay: the VXLAN device has an IPv6 local address and no
    // IPv4 one at all (no IPv4 pod CIDR, no IPv4 VTEP).
    drop(direct_agents);
    over_the_overlay(&lab, &web1)
}

/// The IPv6-only lab's second half: agents restarted with `--routing-mode vxlan`; a new pod on
/// n0 reaches `web1` on n1 and both backends of the ClusterIP over the overlay.
fn over_the_overlay(lab: &Lab, web1: &Pod) -> Result<()> {
    let (n0, n1) = (lab.node(0), lab.node(1));
    let _agents = agents(lab, &["--routing-mode", "vxlan"])?;
    let cidr1 = n1.pod_cidr6.context("IPv6-only")?;
    let overlay = format!("{cidr1} via {} dev twill.vxlan", cidr1.network());
    wait_for("n0's overlay route to n1", Duration::from_secs(20), || {
        Ok(owned_routes(n0, "-6")?.contains(&overlay))
    })?;
    let v4 = n0.run(&["ip", "-4", "addr", "show", "dev", "twill.vxlan"])?;
    ensure!(v4.trim().is_empty(), "IPv4 on the overlay device: {v4}");
    wait_conflist_mtu(n0, 1430)?;
    let cv = n0.add_pod("cv")?;
    wait_reply(
        &cv,
        &at(IpAddr::V6(ip6(web1)?), 8080),
        "web1",
        &seen(IpAddr::V6(ip6(&cv)?)),
    )?;
    let out = cv.run(&[
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "5",
        "-M",
        "do",
        "-s",
        "1382",
        &ip6(web1)?.to_string(),
    ])?;
    ensure!(out.contains("1 received"), "{out}");
    wait_both_backends(&cv, &["web0", "web1"])
}

/// Waits until TCP connections from `client` to the IPv6 ClusterIP [`VIP6`] have been
/// answered by every backend in `backends`, each seeing the client's own address.
fn wait_both_backends(client: &Pod, backends: &[&str]) -> Result<()> {
    let to = at(IpAddr::V6(VIP6), 80);
    let me = seen(IpAddr::V6(ip6(client)?));
    let mut by = std::collections::BTreeSet::new();
    wait_for(
        &format!("{backends:?} behind the IPv6 ClusterIP"),
        Duration::from_secs(30),
        || {
            let (code, out) = tcp(client, &to)?;
            if code == 0 {
                // The backend sees the pod's own address: no translation on the way.
                ensure!(out.contains(&me), "{out}");
                by.extend(replier(&out));
            }
            Ok(backends.iter().all(|b| by.contains(*b)))
        },
    )
    .map_err(|e| e.context(format!("answered by {by:?}")))
}

/// A cluster mixing a dual-stack node (n0: IPv4 and IPv6 InternalIPs and pod CIDRs) with an
/// IPv6-only one (n1): the underlay family is chosen per peer, so n0 keeps its IPv4 underlay
/// (and its VXLAN device's family) but reaches n1 over IPv6, directly on their shared subnet
/// (`fd00:10:244:1::/64 via` n1's IPv6 InternalIP), and n1 reaches n0 the same way. Pods of the
/// two nodes talk over IPv6 in both directions, keeping their addresses.
#[test]
fn a_cluster_mixing_dual_stack_and_ipv6_only_nodes_routes_between_them_over_ipv6() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_ipv6_only_nodes(1))? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    ensure!(!n0.ipv6_only && n1.ipv6_only, "n0 dual-stack, n1 IPv6-only");
    let _agents = agents(&lab, &[])?;
    for (from, to) in [(n0, n1), (n1, n0)] {
        let route = format!(
            "{} via {} dev eth0",
            to.pod_cidr6.context("dual-stack lab")?,
            to.ip6.context("dual-stack lab")?
        );
        wait_for(
            &format!("{}'s route to {}'s IPv6 pods", from.name, to.name),
            Duration::from_secs(20),
            || Ok(owned_routes(from, "-6")?.contains(&route)),
        )
        .map_err(|e| e.context(owned_routes(from, "-6").unwrap_or_default()))?;
    }
    let client0 = n0.add_pod("client0")?;
    let web0 = n0.add_pod("web0")?;
    let client1 = n1.add_pod("client1")?;
    let web1 = n1.add_pod("web1")?;
    ensure!(
        client1.ip == Ipv4Addr::UNSPECIFIED && client0.ip != Ipv4Addr::UNSPECIFIED,
        "pods: {} / {}",
        client0.result,
        client1.result
    );
    lab.serve_dual(&web0, "web0", Some(8080), None)?;
    lab.serve_dual(&web1, "web1", Some(8080), None)?;
    for (client, server) in [(&client0, &web1), (&client1, &web0)] {
        wait_reply(
            client,
            &at(IpAddr::V6(ip6(server)?), 8080),
            &server.name,
            &seen(IpAddr::V6(ip6(client)?)),
        )?;
    }
    // n1 has no IPv4 pods, so n0 routes nothing of IPv4 to it.
    ensure!(
        owned_routes(n0, "-4")?.trim().is_empty(),
        "IPv4 routes towards an IPv6-only node: {}",
        owned_routes(n0, "-4")?
    );
    Ok(())
}
