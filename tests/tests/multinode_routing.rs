//! The pod network across nodes: routes programmed by `twill_agent::routing` inside lab nodes
//! (direct on one subnet, VXLAN across two subnets joined by a router), pod IPs kept end to end,
//! stale routes removed when a node leaves, and pod egress to an outside host masqueraded.
//!
//! The routing executor runs in-process, inside each node's network namespace: a dedicated
//! thread `setns`es into the node and drives the executor on a current-thread tokio runtime —
//! exactly the code `twill-agent run` calls, without a process per node.
use std::thread;

use anyhow::{Context as _, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::Node as K8sNode;
use twill_agent::routing::{
    ApplyReport, RouteExecutor, RoutePlan, RoutingConfig, RoutingMode, VXLAN_DEVICE, cni_mtu,
};
use twill_lab::{Lab, LabSpec, Node, bin, in_netns, require, spawn_and_wait_ready};

/// The Node objects the lab published (what the agent's node store would hold).
fn cluster_nodes(lab: &Lab) -> Result<Vec<K8sNode>> {
    let raw = std::fs::read(lab.manifests_dir().join("nodes.json"))?;
    let list: serde_json::Value = serde_json::from_slice(&raw)?;
    Ok(serde_json::from_value(list["items"].clone())?)
}

/// Runs plan + apply (with prune) for `node` inside its network namespace.
fn converge(
    node: &Node,
    nodes: &[K8sNode],
    config: &RoutingConfig,
) -> Result<(RoutePlan, ApplyReport)> {
    converge_with(node, nodes, config, true)
}

fn converge_with(
    node: &Node,
    nodes: &[K8sNode],
    config: &RoutingConfig,
    prune: bool,
) -> Result<(RoutePlan, ApplyReport)> {
    let (name, nodes, config) = (node.name.clone(), nodes.to_vec(), config.clone());
    in_node(node, move |exec| async move {
        Ok(exec.sync(&name, &nodes, &config, prune).await?)
    })
}

/// Runs `f` with a [`RouteExecutor`] opened inside `node`'s network namespace, on a dedicated
/// thread (`setns` affects only the calling thread) with a current-thread runtime, so every
/// socket and every child process (`nft`) of the executor lives in the node.
fn in_node<T, F, Fut>(node: &Node, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(RouteExecutor) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let netns = node.netns.clone();
    thread::spawn(move || -> Result<T> {
        in_netns(&netns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move { f(RouteExecutor::connect()?).await })
        })
    })
    .join()
    .map_err(|_| anyhow!("routing thread panicked"))?
}

fn converge_all(lab: &Lab, nodes: &[K8sNode], config: &RoutingConfig) -> Result<Vec<RoutePlan>> {
    lab.nodes
        .iter()
        .map(|n| converge(n, nodes, config).map(|(p, _)| p))
        .collect()
}

fn without(nodes: &[K8sNode], name: &str) -> Vec<K8sNode> {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(name))
        .cloned()
        .collect()
}

fn owned_routes(node: &Node) -> Result<String> {
    node.run(&["ip", "-4", "route", "show", "proto", "0xfe"])
}

fn tcp(out: (i32, String), what: &str) -> Result<String> {
    let (code, text) = out;
    ensure!(code == 0, "{what}: labtool exit {code}: {text}");
    Ok(text)
}

#[test]
fn overlay_and_direct_routes_across_two_subnets() -> Result<()> {
    // n0 and n2 on 172.30.0.0/24, n1 on 172.30.1.0/24 behind the lab router.
    let Some(lab) = require(LabSpec::nodes(3).with_two_subnets())? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let config = RoutingConfig::default();
    let (n0, n1, n2) = (lab.node(0), lab.node(1), lab.node(2));

    // Before: n1's VTEP address is unreachable from n0.
    ensure!(
        n0.run(&["ping", "-c1", "-W1", "10.244.1.0"]).is_err(),
        "reachable before any route"
    );

    let plans = converge_all(&lab, &nodes, &config)?;
    let vx = plans[0]
        .vxlan
        .as_ref()
        .ok_or_else(|| anyhow!("n0 planned no overlay"))?;
    ensure!(
        vx.mtu == 1450 && cni_mtu(&config, &plans[0]) == 1450,
        "overlay MTU {vx:?}"
    );

    let routes = owned_routes(n0)?;
    ensure!(
        routes.contains(&format!(
            "10.244.1.0/24 via 10.244.1.0 dev {VXLAN_DEVICE} onlink"
        )),
        "n0 routes: {routes}"
    );
    ensure!(
        routes.contains(&format!("10.244.2.0/24 via {} dev eth0", n2.ip)),
        "n0 routes: {routes}"
    );
    let neigh = n0.run(&["ip", "neigh", "show", "dev", VXLAN_DEVICE])?;
    ensure!(
        neigh.contains("10.244.1.0 lladdr 0e:77:ac:1e:01:0b PERMANENT"),
        "n0 neighbours: {neigh}"
    );
    let fdb = n0.run(&["bridge", "fdb", "show", "dev", VXLAN_DEVICE])?;
    ensure!(
        fdb.contains(&format!("0e:77:ac:1e:01:0b dst {}", n1.ip)),
        "n0 fdb: {fdb}"
    );
    let link = n0.run(&["ip", "-d", "link", "show", VXLAN_DEVICE])?;
    ensure!(
        link.contains("mtu 1450")
            && link.contains("vxlan id 1")
            && link.contains("dstport 8472")
            && link.contains("nolearning"),
        "{link}"
    );
    // n2 shares n0's subnet: direct routes only, no overlay device there... except for n1.
    ensure!(
        owned_routes(n2)?.contains(&format!("10.244.0.0/24 via {} dev eth0", n0.ip)),
        "n2 routes"
    );

    // Traffic through the overlay: n0 → n1's VTEP address, both directions encapsulated.
    n0.run(&["ping", "-c1", "-W2", "10.244.1.0"])
        .context("n0 → n1 VTEP over VXLAN")?;

    // Idempotent: a second apply changes nothing.
    let (_, again) = converge(n0, &nodes, &config)?;
    ensure!(!again.changed(), "second apply changed {again:?}");
    // A restarted agent whose node store has not synced yet sees only itself: without prune
    // it removes nothing (restarts are invisible to traffic).
    let (_, early) = converge_with(n0, &nodes[..1], &config, false)?;
    ensure!(!early.changed(), "unsynced apply changed {early:?}");
    n0.run(&["ping", "-c1", "-W2", "10.244.1.0"])
        .context("overlay after an unsynced apply")?;
    Ok(())
}

#[test]
fn node_removal_and_uninstall_touch_only_owned_state() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(3).with_two_subnets())? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let config = RoutingConfig::default();
    let (n0, n2) = (lab.node(0), lab.node(2));
    converge_all(&lab, &nodes, &config)?;

    // n1 leaves: its route, neighbour and FDB entry go; with no overlay peer left, the device too.
    let (_, report) = converge(n0, &without(&nodes, "n1"), &config)?;
    ensure!(
        report.routes_removed >= 1 && report.device_removed,
        "{report:?}"
    );
    let routes = owned_routes(n0)?;
    ensure!(
        !routes.contains("10.244.1.0/24"),
        "stale route left: {routes}"
    );
    ensure!(
        routes.contains("10.244.2.0/24"),
        "unrelated route removed: {routes}"
    );
    ensure!(
        n0.run(&["ip", "link", "show", VXLAN_DEVICE]).is_err(),
        "overlay device left"
    );
    // And it comes back when n1 rejoins.
    let (_, report) = converge(n0, &nodes, &config)?;
    ensure!(
        report.device_created && report.routes_set == 1,
        "{report:?}"
    );
    n0.run(&["ping", "-c1", "-W2", "10.244.1.0"])
        .context("overlay after rejoin")?;

    // Routes the agent does not own are never touched.
    n0.run(&[
        "ip",
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        &n2.ip.to_string(),
    ])?;
    converge(n0, &without(&nodes, "n2"), &config)?;
    ensure!(
        n0.run(&["ip", "route", "show", "10.99.0.0/24"])?
            .contains("10.99.0.0/24"),
        "foreign route removed"
    );
    ensure!(
        !owned_routes(n0)?.contains("10.244.2.0/24"),
        "n2's route not removed"
    );

    // Uninstall: everything the agent owns goes, nothing else.
    n0.run(&["nft", "list", "table", "ip", "twill"])
        .context("masquerade table before uninstall")?;
    let removed = in_node(n0, |exec| async move { Ok(exec.remove_all().await?) })?;
    ensure!(
        removed.routes_removed == 1 && removed.device_removed,
        "{removed:?}"
    );
    ensure!(owned_routes(n0)?.trim().is_empty(), "owned routes left");
    ensure!(
        n0.run(&["nft", "list", "table", "ip", "twill"]).is_err(),
        "masquerade table left"
    );
    ensure!(
        n0.run(&["ip", "route", "show", "10.99.0.0/24"])?
            .contains("10.99.0.0/24"),
        "foreign route removed"
    );
    Ok(())
}

#[test]
fn vxlan_mode_on_one_subnet_then_switching_to_direct() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2))? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let vxlan = RoutingConfig {
        mode: RoutingMode::Vxlan,
        ..RoutingConfig::default()
    };
    converge_all(&lab, &nodes, &vxlan)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    ensure!(
        owned_routes(n0)?.contains(&format!(
            "10.244.1.0/24 via 10.244.1.0 dev {VXLAN_DEVICE} onlink"
        )),
        "vxlan mode route"
    );
    n1.run(&["ping", "-c1", "-W2", "10.244.0.0"])
        .context("n1 → n0 VTEP")?;
    // Switching to direct: the route is replaced in place and the overlay removed.
    let direct = RoutingConfig {
        mode: RoutingMode::Direct,
        ..RoutingConfig::default()
    };
    let (plan, report) = converge(n0, &nodes, &direct)?;
    ensure!(
        plan.skipped.is_empty() && report.device_removed && report.routes_set == 1,
        "{plan:?} {report:?}"
    );
    ensure!(
        owned_routes(n0)?.contains(&format!("10.244.1.0/24 via {} dev eth0", n1.ip)),
        "direct route"
    );
    Ok(())
}

#[test]
fn pods_reach_pods_on_other_nodes_with_their_own_ips() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(3).with_two_subnets())? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let (n0, n1, n2) = (lab.node(0), lab.node(1), lab.node(2));
    let p0 = n0.add_pod("c0")?;
    let p1 = n1.add_pod("s1")?;
    let p2 = n2.add_pod("s2")?;
    lab.serve(&p1, "s1", Some(8080), None)?;
    lab.serve(&p2, "s2", Some(8080), None)?;
    let to1 = format!("{}:8080", p1.ip);
    let to2 = format!("{}:8080", p2.ip);

    let (code, out) = p0.labtool(&["tcp", "--to", &to2, "--timeout-ms", "500"])?;
    ensure!(
        code != 0,
        "pod reached a remote pod before any route: {out}"
    );

    converge_all(&lab, &nodes, &RoutingConfig::default())?;
    // Direct (n0 → n2, same subnet) and overlay (n0 → n1) paths; the server sees the pod IP.
    let out = tcp(
        p0.labtool(&["tcp", "--to", &to2])?,
        "pod n0 → pod n2 (direct)",
    )?;
    ensure!(
        out.starts_with(&format!("reply=s2 {}:", p0.ip)),
        "client pod IP not preserved: {out}"
    );
    let out = tcp(
        p0.labtool(&["tcp", "--to", &to1])?,
        "pod n0 → pod n1 (vxlan)",
    )?;
    ensure!(
        out.starts_with(&format!("reply=s1 {}:", p0.ip)),
        "client pod IP not preserved: {out}"
    );
    // Node → remote pod, both paths.
    let out = tcp(n0.labtool(&["tcp", "--to", &to2])?, "node n0 → pod n2")?;
    ensure!(out.starts_with(&format!("reply=s2 {}:", n0.ip)), "{out}");
    let out = tcp(n0.labtool(&["tcp", "--to", &to1])?, "node n0 → pod n1")?;
    ensure!(
        out.starts_with("reply=s1 10.244.0.0:"),
        "node traffic into the overlay leaves from the VTEP address: {out}"
    );

    // n2 leaves the cluster: n0 drops its route, the pod there becomes unreachable.
    converge(n0, &without(&nodes, "n2"), &RoutingConfig::default())?;
    let (code, out) = p0.labtool(&["tcp", "--to", &to2, "--timeout-ms", "500"])?;
    ensure!(code != 0, "removed node still reachable: {out}");
    Ok(())
}

#[test]
fn pod_egress_to_an_outside_host_is_masqueraded() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    let ext = lab.external();
    let mut serve = ext.cmd(bin("labtool"));
    serve.args(["serve", "--name", "outside", "--tcp", "9090"]);
    lab.track(spawn_and_wait_ready(serve)?);
    let outside = format!("{}:9090", ext.ip);
    let p0 = n0.add_pod("egress")?;
    let p1 = n1.add_pod("peer")?;
    lab.serve(&p1, "peer", Some(8080), None)?;

    // The outside host has no route to pod CIDRs: without masquerade, replies are lost.
    let (code, out) = p0.labtool(&["tcp", "--to", &outside, "--timeout-ms", "500"])?;
    ensure!(
        code != 0,
        "outside host answered an untranslated pod: {out}"
    );

    let config = RoutingConfig::default();
    converge_all(&lab, &nodes, &config)?;
    let out = tcp(p0.labtool(&["tcp", "--to", &outside])?, "pod → outside")?;
    ensure!(
        out.starts_with(&format!("reply=outside {}:", n0.ip)),
        "not masqueraded to the node IP: {out}"
    );
    // Pod → pod across nodes stays untranslated with masquerade on.
    let out = tcp(
        p0.labtool(&["tcp", "--to", &format!("{}:8080", p1.ip)])?,
        "pod → pod",
    )?;
    ensure!(
        out.starts_with(&format!("reply=peer {}:", p0.ip)),
        "pod traffic masqueraded: {out}"
    );

    // A non-masquerade CIDR covering the outside host: the pod IP goes out as is (and, since
    // that host has no route back to pods, the connection fails — proof the exemption applies).
    let exempt = RoutingConfig {
        non_masquerade_cidrs: vec![format!("{}/32", ext.ip).parse()?],
        ..config.clone()
    };
    converge(n0, &nodes, &exempt)?;
    let (code, out) = p0.labtool(&["tcp", "--to", &outside, "--timeout-ms", "500"])?;
    ensure!(code != 0, "exempted destination still masqueraded: {out}");
    converge(n0, &nodes, &config)?;
    tcp(
        p0.labtool(&["tcp", "--to", &outside])?,
        "pod → outside after re-enabling",
    )?;
    Ok(())
}

/// Sets the MTU in a node's CNI config, as the agent does with [`cni_mtu`].
fn set_cni_mtu(node: &Node, mtu: u32) -> Result<()> {
    let path = node.conflist_path();
    let mut conf: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    conf["plugins"][0]["mtu"] = mtu.into();
    twill_lab::write_atomic(&path, &serde_json::to_vec_pretty(&conf)?)
}

#[test]
fn overlay_mtu_fits_full_size_pod_packets() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_two_subnets())? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let config = RoutingConfig::default();
    let plans = converge_all(&lab, &nodes, &config)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    let mtu = cni_mtu(&config, &plans[0]);
    ensure!(mtu == 1450, "overlay CNI MTU {mtu}");
    let server = n1.add_pod("server")?;

    // A pod with the underlay's MTU sends 1500-byte packets the overlay cannot carry (DF set).
    let fat = n0.add_pod("fat")?;
    let dst = server.ip.to_string();
    let too_big = fat.run(&["ping", "-c1", "-W2", "-M", "do", "-s", "1472", &dst]);
    ensure!(
        too_big.is_err(),
        "1500-byte packet crossed a 1450-byte overlay: {too_big:?}"
    );

    // With the MTU from cni_mtu, full-size pod packets cross the overlay unfragmented.
    set_cni_mtu(n0, mtu)?;
    let fit = n0.add_pod("fit")?;
    let payload = (mtu - 28).to_string(); // IPv4 20 + ICMP 8
    fit.run(&["ping", "-c1", "-W2", "-M", "do", "-s", &payload, &dst])
        .context("full-size packet at the CNI MTU over the overlay")?;
    Ok(())
}

fn synthetic_node(name: &str, ip: &str, cidr: &str) -> Result<K8sNode> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }))?)
}

/// Programming cost at cluster scale: 400 peers (200 direct, 200 over VXLAN) in one node.
/// Asserts only correctness; prints the timings for the report.
#[test]
fn programs_hundreds_of_peers_and_removes_them() -> Result<()> {
    const PEERS: u16 = 400;
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let mut nodes = cluster_nodes(&lab)?;
    for i in 1..=PEERS {
        // Even peers share n0's subnet (direct), odd ones sit on another subnet (VXLAN).
        let ip = if i % 2 == 0 {
            format!("172.30.0.{}", 20 + i / 2)
        } else {
            format!("172.31.0.{}", i.div_ceil(2))
        };
        let cidr = format!("10.{}.{}.0/24", 245 + i / 256, i % 256);
        nodes.push(synthetic_node(&format!("p{i}"), &ip, &cidr)?);
    }
    let config = RoutingConfig::default();
    let started = std::time::Instant::now();
    let (plan, first) = converge(n0, &nodes, &config)?;
    let first_ms = started.elapsed().as_millis();
    ensure!(plan.skipped.is_empty(), "{:?}", plan.skipped);
    ensure!(first.routes_set == usize::from(PEERS), "{first:?}");
    let vx = plan
        .peers
        .iter()
        .filter(|p| matches!(p.via, twill_agent::routing::PeerVia::Vxlan { .. }))
        .count();
    ensure!(
        first.fdb_set == vx && first.neighbours_set == vx,
        "{first:?}"
    );
    let routes = owned_routes(n0)?.lines().count();
    ensure!(
        routes == usize::from(PEERS),
        "{routes} owned routes in the kernel"
    );

    let started = std::time::Instant::now();
    let (_, again) = converge(n0, &nodes, &config)?;
    let again_ms = started.elapsed().as_millis();
    ensure!(!again.changed(), "{again:?}");

    let started = std::time::Instant::now();
    let (_, gone) = converge(n0, &nodes[..1], &config)?;
    let gone_ms = started.elapsed().as_millis();
    ensure!(
        gone.routes_removed == usize::from(PEERS) && gone.device_removed,
        "{gone:?}"
    );
    ensure!(owned_routes(n0)?.trim().is_empty(), "routes left");
    eprintln!(
        "routing scale: {PEERS} peers ({vx} vxlan): first apply {first_ms} ms, no-op resync {again_ms} ms, remove all {gone_ms} ms"
    );
    Ok(())
}

/// A route to a peer's pod CIDR that the agent does not own (an operator's static route, a
/// previous CNI's) is never replaced: the plan skips that peer, and the executor refuses to
/// write over it even when handed a plan made before the route appeared. Routes to the other
/// peers are programmed as usual.
#[test]
fn a_route_the_agent_does_not_own_is_never_replaced() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(3))? else {
        return Ok(());
    };
    let nodes = cluster_nodes(&lab)?;
    let config = RoutingConfig::default();
    let (n0, n1, n2) = (lab.node(0), lab.node(1), lab.node(2));
    let cidr = n1.pod_cidr.to_string();
    // Someone else's route to n1's pods (through n2, so it is told apart from ours).
    n0.run(&[
        "ip",
        "route",
        "add",
        &cidr,
        "via",
        &n2.ip.to_string(),
        "proto",
        "static",
    ])?;
    let foreign = || n0.run(&["ip", "-4", "route", "show", "exact", &cidr]);
    let before = foreign()?;

    let (plan, _) = converge(n0, &nodes, &config)?;
    ensure!(
        plan.skipped
            .iter()
            .any(|s| s.node == n1.name && format!("{:?}", s.reason).starts_with("ForeignRoute")),
        "n1 not skipped: {plan}"
    );
    ensure!(foreign()? == before, "the plan's apply changed {before}");
    let owned = owned_routes(n0)?;
    ensure!(
        owned.contains(&n2.pod_cidr.to_string()) && !owned.contains(&cidr),
        "owned routes: {owned}"
    );

    // A plan from a snapshot that did not see the route yet: the executor checks again.
    let (name, all, cfg) = (n0.name.clone(), nodes.clone(), config.clone());
    let report = in_node(n0, move |exec| async move {
        let mut host = exec.host_network().await?;
        host.foreign_routes.clear();
        let plan = twill_agent::routing::plan_routes(&name, &all, &cfg, &host)?;
        anyhow::ensure!(plan.peers.len() == 2, "{plan}");
        Ok(exec.apply(&plan, true).await?)
    })?;
    ensure!(report.routes_refused == 1, "{report:?}");
    ensure!(foreign()? == before, "the executor replaced {before}");
    Ok(())
}
