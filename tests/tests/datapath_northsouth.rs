//! Per-packet north-south load balancing on real traffic: the tc programs attached (tcx) to the
//! underlay device of lab nodes, maps programmed through `AyaLbMaps`, and an external client
//! namespace on the underlay (not a node) reaching NodePorts, External IPs and LoadBalancer IPs.
//! The rolling-update test runs the real agent on every node instead.
mod agent_common;

use std::{net::Ipv4Addr, process::Stdio, time::Duration};

use anyhow::{Result, ensure};
use ipnetwork::IpNetwork;
use twill_agent::{
    datapath::{AttachOutcome, AyaLbMaps, Datapath, DatapathOptions},
    lbmap::LbMaps,
};
use twill_common::{
    BE_F_LOCAL, Backend, CT_STATE_ESTABLISHED, PROTO_TCP, PROTO_UDP, Reason, SCOPE_ANY,
    SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_EXTERNAL_IP, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SlotKey,
};
use twill_lab::{
    Lab, LabSpec, Node, Pod, addr_be as be,
    bench::loadgen::{CrrReport, RrReport},
    bin, in_netns, require, spawn_and_wait_ready,
};

/// A datapath on `node`: tc programs on its `eth0`, its address as a NodePort address.
fn datapath_on(node: &Node) -> Result<(Datapath, AyaLbMaps)> {
    let mut dp = Datapath::load(&DatapathOptions::pinned(node.bpffs.join("twill")))?;
    let outcomes = in_netns(&node.netns, || Ok(dp.attach_tc("eth0")?))?;
    ensure!(
        outcomes.iter().all(|(_, o)| *o == AttachOutcome::Created),
        "{outcomes:?}"
    );
    let mut maps = dp.lb_maps()?;
    maps.upsert_node_addr(be(node.ip), 0)?;
    Ok((dp, maps))
}

struct Frontend {
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    scope: u8,
    flags: u16,
}

fn program(
    maps: &mut AyaLbMaps,
    svc_id: u32,
    fe: &Frontend,
    backends: &[(Ipv4Addr, u16, u8)],
) -> Result<()> {
    for (i, (ip, port, flags)) in backends.iter().enumerate() {
        let id = svc_id * 100 + u32::try_from(i)?;
        maps.upsert_backend(
            id,
            Backend {
                addr_be: be(*ip),
                port_be: port.to_be(),
                proto: fe.proto,
                flags: *flags,
            },
        )?;
        maps.upsert_slot(
            SlotKey {
                svc_id,
                slot: u32::try_from(i)?,
            },
            id,
        )?;
    }
    let key = ServiceKey {
        addr_be: be(fe.addr),
        port_be: fe.port.to_be(),
        proto: fe.proto,
        scope: fe.scope,
    };
    let value = ServiceValue {
        svc_id,
        backend_count: u16::try_from(backends.len())?,
        flags: fe.flags,
        affinity_timeout_s: 0,
        maglev_size: 0,
    };
    maps.upsert_service(key, value)?;
    Ok(())
}

fn nodeport(port: u16, proto: u8, scope: u8, extra: u16) -> Frontend {
    Frontend {
        addr: Ipv4Addr::UNSPECIFIED,
        port,
        proto,
        scope,
        flags: SVC_F_NODEPORT | extra,
    }
}

/// Two nodes, an external client, a backend pod on node 0 serving TCP 8080 and UDP 5353.
fn lab() -> Result<Option<(Lab, Pod)>> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(None);
    };
    let pod = lab.node(0).add_pod("web0")?;
    lab.serve(&pod, "web0", Some(8080), Some(5353))?;
    Ok(Some((lab, pod)))
}

#[test]
fn nodeport_from_outside_to_a_local_backend_keeps_the_client_ip() -> Result<()> {
    let Some((lab, pod)) = lab()? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (_dp, mut maps) = datapath_on(n0)?;
    program(
        &mut maps,
        1,
        &nodeport(30080, PROTO_TCP, SCOPE_ANY, 0),
        &[(pod.ip, 8080, BE_F_LOCAL)],
    )?;
    program(
        &mut maps,
        2,
        &nodeport(30053, PROTO_UDP, SCOPE_ANY, 0),
        &[(pod.ip, 5353, BE_F_LOCAL)],
    )?;
    let ext = lab.external();

    let to = format!("{}:30080", n0.ip);
    let (code, out) = ext.labtool(&["tcp", "--to", &to])?;
    ensure!(code == 0, "NodePort TCP from outside failed: {out}");
    ensure!(
        out.starts_with(&format!("reply=web0 {}:", ext.ip)),
        "client IP not kept: {out}"
    );
    ensure!(
        out.contains(&format!("peer={to}")),
        "reply did not come from the NodePort: {out}"
    );

    let to = format!("{}:30053", n0.ip);
    let (code, out) = ext.labtool(&["udp", "--to", &to])?;
    ensure!(code == 0, "NodePort UDP from outside failed: {out}");
    ensure!(
        out.starts_with(&format!("reply=web0 {}:", ext.ip)),
        "client IP not kept: {out}"
    );
    ensure!(
        out.ends_with(&format!("from={to}")),
        "UDP reply not from the NodePort: {out}"
    );

    // Many connections: every one is translated both ways.
    let (_, out) = ext.labtool(&[
        "tcp-loop",
        "--to",
        &format!("{}:30080", n0.ip),
        "--count",
        "100",
    ])?;
    ensure!(
        out.contains("\"ok\":100") && out.contains("\"failures\":0"),
        "{out}"
    );
    let stats = maps.stats()?;
    ensure!(
        stats[&Reason::Translated] >= 102 && stats[&Reason::RevNatApplied] >= 102,
        "{stats:?}"
    );
    let ct = maps.dump_ct()?;
    ensure!(!ct.is_empty(), "no connection-tracking entries");

    // The backend goes away: its UDP flows are forgotten (both directions), its TCP flows are
    // left to drain (they end by FIN/RST, expiry, or when the pod itself goes).
    let udp_flows = |maps: &AyaLbMaps| -> Result<usize> {
        Ok(maps
            .dump_ct()?
            .into_iter()
            .filter(|(k, v)| {
                k.proto == PROTO_UDP && (k.saddr_be == be(pod.ip) || v.new_daddr_be == be(pod.ip))
            })
            .count())
    };
    ensure!(udp_flows(&maps)? == 2, "no UDP flow tracked");
    let tcp_before = maps.dump_ct()?.len() - 2;
    for (id, port, proto) in [(100, 8080u16, PROTO_TCP), (200, 5353, PROTO_UDP)] {
        maps.flush_backend(
            id,
            Backend {
                addr_be: be(pod.ip),
                port_be: port.to_be(),
                proto,
                flags: BE_F_LOCAL,
            },
        )?;
    }
    ensure!(
        maps.last_flush.ct_entries == 2 && udp_flows(&maps)? == 0,
        "UDP conntrack not flushed: {:?}",
        maps.last_flush
    );
    ensure!(
        maps.dump_ct()?.len() == tcp_before,
        "TCP flows were flushed with their backend instead of draining"
    );
    Ok(())
}

#[test]
fn nodeport_on_a_node_without_backend_snats_for_cluster_and_drops_for_local() -> Result<()> {
    let Some((lab, pod)) = lab()? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    // Node 1 reaches node 0's pods through node 0 (what the routing component programs).
    n1.run(&[
        "ip",
        "route",
        "add",
        &n0.pod_cidr.to_string(),
        "via",
        &n0.ip.to_string(),
    ])?;
    let (_dp, mut maps) = datapath_on(n1)?;
    // externalTrafficPolicy=Cluster: the backend lives on node 0 (no BE_F_LOCAL here).
    program(
        &mut maps,
        1,
        &nodeport(30080, PROTO_TCP, SCOPE_ANY, 0),
        &[(pod.ip, 8080, 0)],
    )?;
    program(
        &mut maps,
        2,
        &nodeport(30053, PROTO_UDP, SCOPE_ANY, 0),
        &[(pod.ip, 5353, 0)],
    )?;
    let ext = lab.external();

    let to = format!("{}:30080", n1.ip);
    let (code, out) = ext.labtool(&["tcp", "--to", &to])?;
    ensure!(
        code == 0,
        "NodePort via a node without backend failed: {out}"
    );
    // The backend saw node 1's address (SNAT), and the client the NodePort.
    ensure!(
        out.starts_with(&format!("reply=web0 {}:", n1.ip)),
        "not SNATed to the node: {out}"
    );
    ensure!(out.contains(&format!("peer={to}")), "{out}");
    let to = format!("{}:30053", n1.ip);
    let (code, out) = ext.labtool(&["udp", "--to", &to])?;
    ensure!(
        code == 0 && out.ends_with(&format!("from={to}")),
        "UDP via remote backend: {out}"
    );
    let stats = maps.stats()?;
    ensure!(stats[&Reason::ForwardedRemote] >= 2, "{stats:?}");

    // externalTrafficPolicy=Local: the SCOPE_EXTERNAL entry lists only local backends — none on
    // node 1 — so external clients are dropped (they time out), as kube-proxy does.
    program(
        &mut maps,
        3,
        &nodeport(30081, PROTO_TCP, SCOPE_EXTERNAL, SVC_F_LOCAL_ONLY),
        &[],
    )?;
    let (code, out) = ext.labtool(&[
        "tcp",
        "--to",
        &format!("{}:30081", n1.ip),
        "--timeout-ms",
        "500",
    ])?;
    ensure!(
        code == 3,
        "eTP=Local without local backend was not dropped: {code} {out}"
    );
    let stats = maps.stats()?;
    ensure!(stats[&Reason::NoLocalBackend] >= 1, "{stats:?}");
    Ok(())
}

#[test]
fn external_ip_and_load_balancer_ip_with_source_ranges() -> Result<()> {
    let Some((lab, pod)) = lab()? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (_dp, mut maps) = datapath_on(n0)?;
    let external_ip = Ipv4Addr::new(198, 51, 100, 7);
    let lb_ip = Ipv4Addr::new(192, 0, 2, 10);
    let ext = lab.external();
    // The outside world routes these addresses to node 0 (what a router / BGP / L2 announce do).
    for ip in [external_ip, lb_ip] {
        twill_lab::run_cmd(std::process::Command::new("ip").args([
            "-n",
            &ext.netns,
            "route",
            "add",
            &ip.to_string(),
            "via",
            &n0.ip.to_string(),
        ]))?;
    }
    let local = [(pod.ip, 8080, BE_F_LOCAL)];
    let fe = Frontend {
        addr: external_ip,
        port: 80,
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
        flags: SVC_F_EXTERNAL_IP,
    };
    program(&mut maps, 1, &fe, &local)?;
    let (code, out) = ext.labtool(&["tcp", "--to", "198.51.100.7:80"])?;
    ensure!(
        code == 0 && out.contains("peer=198.51.100.7:80"),
        "External IP failed: {out}"
    );

    let fe = Frontend {
        addr: lb_ip,
        port: 80,
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
        flags: SVC_F_LOADBALANCER | SVC_F_SOURCE_RANGES,
    };
    program(&mut maps, 2, &fe, &local)?;
    maps.upsert_source_range(2, "10.0.0.0/8".parse::<IpNetwork>()?)?;
    let (code, out) = ext.labtool(&["tcp", "--to", "192.0.2.10:80", "--timeout-ms", "500"])?;
    ensure!(
        code == 3,
        "client outside loadBalancerSourceRanges was let in: {code} {out}"
    );
    ensure!(
        maps.stats()?[&Reason::SourceRangeDenied] >= 1,
        "denial not counted"
    );
    maps.upsert_source_range(2, "172.30.0.0/24".parse::<IpNetwork>()?)?;
    let (code, out) = ext.labtool(&["tcp", "--to", "192.0.2.10:80"])?;
    ensure!(
        code == 0 && out.contains("peer=192.0.2.10:80"),
        "allowed client refused: {out}"
    );
    let ranges = maps.dump()?.source_ranges;
    ensure!(
        ranges.len() == 2 && ranges.iter().all(|(id, _)| *id == 2),
        "{ranges:?}"
    );
    // A Service edit dropping the client's range (what the reconciler's prune does).
    maps.delete_source_range(2, "172.30.0.0/24".parse()?)?;
    let only: IpNetwork = "10.0.0.0/8".parse()?;
    let ranges = maps.dump()?.source_ranges;
    ensure!(
        ranges == std::collections::BTreeSet::from([(2, only)]),
        "{ranges:?}"
    );
    // New flows are denied (a new connection uses a new client port, so no tracked flow).
    let (code, out) = ext.labtool(&["tcp", "--to", "192.0.2.10:80", "--timeout-ms", "500"])?;
    ensure!(
        code == 3,
        "client let in after its range was removed: {code} {out}"
    );
    Ok(())
}

/// sessionAffinity ClientIP on NodePort: an external client sticks to one backend.
#[test]
fn nodeport_session_affinity_sticks_per_client_ip() -> Result<()> {
    let Some((lab, pod)) = lab()? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let pod2 = n0.add_pod("web1")?;
    lab.serve(&pod2, "web1", Some(8080), None)?;
    let (_dp, mut maps) = datapath_on(n0)?;
    let backends = [(pod.ip, 8080, BE_F_LOCAL), (pod2.ip, 8080, BE_F_LOCAL)];
    let fe = nodeport(30080, PROTO_TCP, SCOPE_ANY, SVC_F_AFFINITY);
    program(&mut maps, 1, &fe, &backends)?;
    let key = ServiceKey {
        addr_be: 0,
        port_be: 30080u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    };
    let mut value = maps.dump()?.services[&key];
    value.affinity_timeout_s = 60;
    maps.upsert_service(key, value)?;
    let to = format!("{}:30080", n0.ip);
    let (_, out) = lab
        .external()
        .labtool(&["tcp-loop", "--to", &to, "--count", "30"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["ok"] == 30, "NodePort connections failed: {out}");
    // Chance of one backend for 30 connections without affinity: 2^-29.
    ensure!(
        v["counts"].as_object().map(serde_json::Map::len) == Some(1),
        "affinity did not stick: {out}"
    );
    let aff = maps.dump_affinity()?;
    ensure!(
        aff.iter().any(|(k, _)| k.client_id
            == twill_common::AFFINITY_CLIENT_IP | u64::from(be(lab.external().ip))),
        "no per-client-IP affinity entry: {aff:?}"
    );
    Ok(())
}

/// Pinned tc links survive the loader and are adopted (program swapped in place) by the next.
#[test]
fn pinned_tc_links_are_adopted_by_the_next_agent() -> Result<()> {
    let Some((lab, pod)) = lab()? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (dp, mut maps) = datapath_on(n0)?;
    program(
        &mut maps,
        1,
        &nodeport(30080, PROTO_TCP, SCOPE_ANY, 0),
        &[(pod.ip, 8080, BE_F_LOCAL)],
    )?;
    drop((dp, maps));
    let to = format!("{}:30080", n0.ip);
    let (code, out) = lab.external().labtool(&["tcp", "--to", &to])?;
    ensure!(
        code == 0,
        "NodePort stopped working without a loader: {out}"
    );
    let mut dp = Datapath::load(&DatapathOptions::pinned(n0.bpffs.join("twill")))?;
    let outcomes = in_netns(&n0.netns, || Ok(dp.attach_tc("eth0")?))?;
    ensure!(
        outcomes.iter().all(|(_, o)| *o == AttachOutcome::Replaced),
        "{outcomes:?}"
    );
    let (code, out) = lab.external().labtool(&["tcp", "--to", &to])?;
    ensure!(code == 0, "NodePort broken after adoption: {out}");
    in_netns(&n0.netns, || Ok(dp.detach_tc("eth0")?))?;
    let (code, _) = lab
        .external()
        .labtool(&["tcp", "--to", &to, "--timeout-ms", "300"])?;
    ensure!(code != 0, "NodePort still answers after detach_tc");
    Ok(())
}

/// A NodePort Service `roll` (80 → 8080, nodePort 30080) with the given ready endpoints.
fn roll_manifests(eps: &[(Ipv4Addr, &str)]) -> String {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: roll, namespace: default}\nspec:\n  \
               type: NodePort\n  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30]\n  ports:\n  - \
               {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}\n";
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, node)| agent_common::ready(*ip, node))
        .collect();
    format!(
        "{svc}---\n{}",
        agent_common::slice("roll", "roll-1", &eps, &[("http", 8080, "TCP")])
    )
}

/// Waits until `node`'s conntrack table holds `n` open (established, no FIN) flows from
/// `client` to `backend`.
fn wait_open_flows(node: &Node, client: Ipv4Addr, backend: Ipv4Addr, n: usize) -> Result<()> {
    let maps = AyaLbMaps::open_pinned(&node.bpffs)?;
    agent_common::wait_for(
        &format!("{n} open flows {client} → {backend} through {}", node.name),
        Duration::from_secs(20),
        || {
            let open = maps
                .dump_ct()?
                .into_iter()
                .filter(|(k, v)| {
                    k.saddr_be == be(client)
                        && v.new_daddr_be == be(backend)
                        && v.state == CT_STATE_ESTABLISHED
                        && v.tcp_fin == 0
                })
                .count();
            Ok(open >= n)
        },
    )
}

/// Waits until the agent on `node` reports at least `n` conntrack entries collected as
/// orphaned (flows to an address no local pod holds).
fn wait_orphans_collected(node: &Node, n: u64) -> Result<()> {
    let orphaned = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("twill_conntrack_collected_total{reason=\"orphaned\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    agent_common::wait_for(
        &format!("{}'s collector removing flows to a deleted pod", node.name),
        Duration::from_secs(25),
        || {
            let (_, out) =
                node.labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
            Ok(orphaned(&out) >= n)
        },
    )
}

/// "Rolling update under north-south load with zero resets": long-lived TCP connections from
/// outside through NodePorts (on the backend's node: DNAT only; on another node: DNAT + SNAT),
/// then the backend is replaced in the EndpointSlice mid-stream. Every existing connection keeps
/// working to its end on the old backend (it drains, as with kube-proxy); new connections go to
/// the new backend. Before the fix every one of them was reset at the update.
#[test]
fn rolling_update_under_north_south_load_with_zero_resets() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    let old = n0.add_pod("web0")?;
    let new = n0.add_pod("web1")?;
    for (pod, id) in [(&old, "A"), (&new, "B")] {
        let mut cmd = pod.cmd(bin("loadgen"));
        cmd.args(["serve", "--port", "8080", "--id", id, "--threads", "16"]);
        cmd.args(["--max-seconds", "300"]);
        lab.track(spawn_and_wait_ready(cmd)?);
    }
    lab.apply_manifest("roll.yaml", &roll_manifests(&[(old.ip, &n0.name)]))?;
    let _agents = [
        agent_common::start_agent(&lab, 0, &[])?,
        agent_common::start_agent(&lab, 1, &[])?,
    ];
    let ext = lab.external();
    let crr = |to: &str| -> Result<CrrReport> {
        let out = ext
            .cmd(bin("loadgen"))
            .args(["crr", "--to", to, "--duration-ms", "200", "--threads", "1"])
            .output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let targets: Vec<String> = [n0, n1].iter().map(|n| format!("{}:30080", n.ip)).collect();
    for to in &targets {
        agent_common::wait_for(
            &format!("{to} answered by the old backend"),
            Duration::from_secs(20),
            || Ok(crr(to)?.per_backend.contains_key("A")),
        )?;
    }

    // Long-lived connections: request/response without pause for 12 s each (longer than the
    // agent's conntrack collection period, so a collection runs while they drain).
    let mut clients = Vec::new();
    for to in &targets {
        for _ in 0..3 {
            let child = ext
                .cmd(bin("loadgen"))
                .args(["rr", "--to", to, "--duration-ms", "12000"])
                .stdout(Stdio::piped())
                .spawn()?;
            clients.push((to.clone(), child));
        }
    }
    // Every one of them is established (on a loaded machine a client may take a moment to
    // start): three open flows from the client to the old backend in each node's table.
    for n in [n0, n1] {
        wait_open_flows(n, ext.ip, old.ip, 3)?;
    }
    std::thread::sleep(Duration::from_millis(500));

    // The rolling update: the new pod replaces the old one in the EndpointSlice.
    lab.apply_manifest("roll.yaml", &roll_manifests(&[(new.ip, &n0.name)]))?;
    for to in &targets {
        agent_common::wait_for(
            &format!("new connections to {to} on the new backend only"),
            Duration::from_secs(10),
            || {
                let r = crr(to)?;
                Ok(r.failures == 0 && r.connections > 0 && r.per_backend.keys().eq(["B"]))
            },
        )?;
    }

    // Every existing connection worked to its end, on the backend it started with.
    for (to, child) in clients {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "rr via {to} failed: {text}");
        let r: RrReport = serde_json::from_str(text.trim())?;
        ensure!(
            r.failures == 0 && r.requests > 1000 && r.per_backend.keys().eq(["A"]),
            "a long-lived connection via {to} broke or moved during the update: {r:?}"
        );
    }
    // New connections still go to the new backend only.
    for to in &targets {
        let r = crr(to)?;
        ensure!(
            r.failures == 0 && r.per_backend.keys().eq(["B"]),
            "new connections via {to} after the update: {r:?}\nn0 drops:\n{}\nn1 drops:\n{}",
            n0.debug(&["drops"]).unwrap_or_default(),
            n1.debug(&["drops"]).unwrap_or_default()
        );
    }
    // The old pod is deleted: n0's collector removes the flows to its address (no pod holds it
    // any more) without waiting for them to expire.
    lab.node(0).del_pod(&old)?;
    wait_orphans_collected(n0, 6)?;
    Ok(())
}
