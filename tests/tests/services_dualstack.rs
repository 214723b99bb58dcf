//! IPv6 and dual-stack Services on the socket path, in a dual-stack lab: each test is named
//! after the upstream "[Feature:IPv6DualStack]" e2e test it mirrors
//! (kubernetes/kubernetes test/e2e/network/dual_stack.go). Clients are real AF_INET6 sockets
//! (labtool) in pods; servers listen on `[::]` and report the peer they saw.
mod agent_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use agent_common::{AgentProc, replier, repliers, start_agent, tcp, udp, wait_for};
use anyhow::{Context as _, Result, ensure};
use twill_lab::{Lab, LabSpec, Pod, manifests, require};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
/// An address of the lab's IPv6 Service range (the API server's secondary `--service-cluster-ip-range`).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x60);

/// `ip:port` with the IPv6 address in brackets.
fn at(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn ip6(pod: &Pod) -> Result<Ipv6Addr> {
    pod.ip6
        .with_context(|| format!("pod {} has no IPv6 address", pod.name))
}

/// The Service `web` with `cluster_ips`, backed by `backends` (each serving TCP 8080 and UDP
/// 5353 on both families) through one EndpointSlice per family.
fn web(lab: &Lab, cluster_ips: &[IpAddr], policy: &str, backends: &[(&Pod, &str)]) -> Result<()> {
    web_with(lab, cluster_ips, policy, "", backends)
}

/// [`web`] with `extra` YAML inside `spec:` (2-space indent).
fn web_with(
    lab: &Lab,
    cluster_ips: &[IpAddr],
    policy: &str,
    extra: &str,
    backends: &[(&Pod, &str)],
) -> Result<()> {
    let ports = [("http", 80, 8080, "TCP"), ("dns", 53, 5353, "UDP")];
    let slice_ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let mut docs = vec![manifests::service("default", "web", cluster_ips, policy, &ports) + extra];
    let v4: Vec<(IpAddr, &str)> = backends
        .iter()
        .map(|(p, n)| (IpAddr::V4(p.ip), *n))
        .collect();
    let v6: Vec<(IpAddr, &str)> = backends
        .iter()
        .map(|(p, n)| Ok((IpAddr::V6(ip6(p)?), *n)))
        .collect::<Result<_>>()?;
    // The EndpointSlice controller writes one slice per family of the Service's ipFamilies.
    if cluster_ips.iter().any(IpAddr::is_ipv4) {
        docs.push(manifests::endpoint_slice(
            "default",
            "web",
            "web-v4",
            &v4,
            &slice_ports,
        ));
    }
    if cluster_ips.iter().any(IpAddr::is_ipv6) {
        docs.push(manifests::endpoint_slice(
            "default",
            "web",
            "web-v6",
            &v6,
            &slice_ports,
        ));
    }
    lab.apply_manifest("web.yaml", &docs.join("---\n"))
}

/// Waits until a TCP request from `pod` to `to` is answered by `server` (any server: `None`);
/// returns the output.
fn wait_tcp_by(pod: &Pod, to: &str, server: Option<&str>) -> Result<String> {
    let mut last = String::new();
    wait_for(
        &format!("{to} answered by {server:?}"),
        Duration::from_mins(1),
        || {
            let (code, out) = tcp(pod, to)?;
            let ok = code == 0 && server.is_none_or(|s| replier(&out).as_deref() == Some(s));
            last = out;
            Ok(ok)
        },
    )
    .map_err(|e| e.context(format!("last: {last:?}")))?;
    Ok(last)
}

fn wait_tcp(pod: &Pod, to: &str, server: &str) -> Result<String> {
    wait_tcp_by(pod, to, Some(server))
}

/// A dual-stack lab's pods and agents: (backend pod, its node's name) per node, the client.
type DualLab = (Vec<(Pod, String)>, Pod, Vec<AgentProc>);

/// Serves `web0` (and `web1` on the second node, if any) on both families and adds a client
/// pod on the last node.
fn dual_lab(lab: &Lab) -> Result<DualLab> {
    let mut backends = Vec::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        let name = format!("web{i}");
        let pod = node.add_pod(&name)?;
        lab.serve_dual(&pod, &name, Some(8080), Some(5353))?;
        backends.push((pod, node.name.clone()));
    }
    let client = lab.nodes[lab.nodes.len() - 1].add_pod("client")?;
    let agents = (0..lab.nodes.len())
        .map(|i| start_agent(lab, i, &[]))
        .collect::<Result<Vec<_>>>()?;
    Ok((backends, client, agents))
}

/// The `debug services -o json` frontends of `web` as (family, address).
fn frontends(lab: &Lab) -> Result<Vec<(String, String)>> {
    let json = lab.node(0).debug(&["services", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("debug services -o json")?;
    let mut out = Vec::new();
    for sp in v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "web")
    {
        for f in sp["frontends"].as_array().into_iter().flatten() {
            out.push((
                sp["family"].as_str().unwrap_or_default().to_owned(),
                f["addr"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// "[Feature:IPv6DualStack] should create a single stack service with cluster ip from primary
/// service range": an IPv4 SingleStack Service in a dual-stack cluster is served on its IPv4
/// ClusterIP, by AF_INET and AF_INET6 (v4-mapped) clients alike, and has no IPv6 frontend.
#[test]
fn should_create_a_single_stack_service_with_cluster_ip_from_primary_service_range() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let (web0, node) = &backends[0];
    web(&lab, &[IpAddr::V4(VIP4)], "SingleStack", &[(web0, node)])?;
    let out = wait_tcp(&client, &at(IpAddr::V4(VIP4), 80), "web0")?;
    ensure!(out.contains(&format!("peer={VIP4}:80")), "{out}");
    let (code, out) = tcp(&client, &format!("[::ffff:{VIP4}]:80"))?;
    ensure!(
        code == 0 && replier(&out).as_deref() == Some("web0"),
        "{out}"
    );
    ensure!(
        frontends(&lab)? == vec![("IPv4".to_owned(), VIP4.to_string())],
        "{:?}",
        frontends(&lab)?
    );
    Ok(())
}

/// "[Feature:IPv6DualStack] should create a single stack service with cluster ip from secondary
/// service range": an IPv6 SingleStack Service. An AF_INET6 client connects to the IPv6
/// ClusterIP: connect6 sends it to the backend's IPv6 address, the backend sees the client's own
/// IPv6 address (no NAT), and getpeername6 shows the client the ClusterIP.
#[test]
fn should_create_a_single_stack_service_with_cluster_ip_from_secondary_service_range() -> Result<()>
{
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let (web0, node) = &backends[0];
    web(&lab, &[IpAddr::V6(VIP6)], "SingleStack", &[(web0, node)])?;
    let out = wait_tcp(&client, &at(IpAddr::V6(VIP6), 80), "web0")?;
    let client6 = ip6(&client)?;
    ensure!(
        out.contains(&format!("reply=web0 [{client6}]:")),
        "the backend did not see the client's IPv6 address: {out}"
    );
    ensure!(
        out.contains(&format!("peer=[{VIP6}]:80")),
        "getpeername6 does not show the IPv6 ClusterIP: {out}"
    );
    ensure!(
        frontends(&lab)? == vec![("IPv6".to_owned(), VIP6.to_string())],
        "{:?}",
        frontends(&lab)?
    );
    // The backends view lists the IPv6 backend.
    let backends_text = lab.node(0).debug(&["backends"])?;
    ensure!(
        backends_text.contains(&format!("[{}]:8080/TCP", ip6(web0)?)),
        "{backends_text}"
    );
    // The IPv4 ClusterIP range has nothing for this Service.
    let (code, _) = tcp(&client, &at(IpAddr::V4(VIP4), 80))?;
    ensure!(
        code != 0,
        "an IPv6-only Service answered on an IPv4 address"
    );
    Ok(())
}

/// "[Feature:IPv6DualStack] should create service with ipv4,v6 cluster ip": RequireDualStack
/// with both ClusterIPs; both answer, each with its own family's backend address, and each
/// shows its own ClusterIP as the peer.
#[test]
fn should_create_service_with_ipv4_v6_cluster_ip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let (web0, node) = &backends[0];
    let ips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    web(&lab, &ips, "RequireDualStack", &[(web0, node)])?;
    let out4 = wait_tcp(&client, &at(ips[0], 80), "web0")?;
    ensure!(
        out4.contains(&format!("reply=web0 {}:", client.ip))
            && out4.contains(&format!("peer={VIP4}:80")),
        "{out4}"
    );
    let out6 = wait_tcp(&client, &at(ips[1], 80), "web0")?;
    ensure!(
        out6.contains(&format!("reply=web0 [{}]:", ip6(&client)?))
            && out6.contains(&format!("peer=[{VIP6}]:80")),
        "{out6}"
    );
    let want = vec![
        ("IPv4".to_owned(), VIP4.to_string()),
        ("IPv6".to_owned(), VIP6.to_string()),
    ];
    ensure!(frontends(&lab)? == want, "{:?}", frontends(&lab)?);
    Ok(())
}

/// "[Feature:IPv6DualStack] should function for pod-Service: http": a dual-stack Service with
/// a backend on each of two nodes; a client pod reaches both backends through each family's
/// ClusterIP (IPv6 across nodes over the agents' IPv6 routes).
#[test]
fn should_function_for_pod_service_http() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let eps: Vec<(&Pod, &str)> = backends.iter().map(|(p, n)| (p, n.as_str())).collect();
    let ips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    web(&lab, &ips, "PreferDualStack", &eps)?;
    for ip in ips {
        let to = at(ip, 80);
        wait_tcp_by(&client, &to, None)?;
        // Both backends answer (random pick per connection; 40 tries miss one with 2^-39).
        let mut seen = std::collections::BTreeMap::new();
        wait_for(
            &format!("both backends via {to}"),
            Duration::from_secs(30),
            || {
                for (name, n) in repliers(&client, &to, 40)? {
                    *seen.entry(name).or_insert(0) += n;
                }
                Ok(seen.len() == 2)
            },
        )
        .map_err(|e| e.context(format!("{seen:?}")))?;
        ensure!(seen.keys().all(|k| k == "web0" || k == "web1"), "{seen:?}");
    }
    Ok(())
}

/// "[Feature:IPv6DualStack] should function for pod-Service: udp": through each family's
/// ClusterIP, unconnected UDP (sendmsg6/recvmsg6: the reply's source is the ClusterIP, and the
/// socket's datagrams stay on one backend) and connected UDP work.
#[test]
fn should_function_for_pod_service_udp() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let eps: Vec<(&Pod, &str)> = backends.iter().map(|(p, n)| (p, n.as_str())).collect();
    let ips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    web(&lab, &ips, "PreferDualStack", &eps)?;
    for ip in ips {
        let to = at(ip, 53);
        let mut last = String::new();
        wait_for(&format!("UDP {to}"), Duration::from_secs(30), || {
            let (code, out) = udp(&client, &to, false)?;
            let ok = code == 0;
            last = out;
            Ok(ok)
        })
        .map_err(|e| e.context(format!("last: {last:?}")))?;
        ensure!(
            last.contains(&format!("from={to}")),
            "recvmsg does not show the ClusterIP as the source: {last}"
        );
        // Connected: the socket gets one backend at connect(), possibly the one on the other
        // node, whose routes the agents may still be programming (the wait above needed only
        // one backend to answer), so this polls too.
        wait_for(
            &format!("connected UDP {to}"),
            Duration::from_secs(30),
            || {
                let (code, out) = udp(&client, &to, true)?;
                let ok = code == 0 && out.contains(&format!("from={to}"));
                last = out;
                Ok(ok)
            },
        )
        .map_err(|e| e.context(format!("connected UDP to {to}, last: {last:?}")))?;
        // One unconnected socket, many datagrams: one flow, one backend.
        let (code, out) = client.labtool(&[
            "udp-loop",
            "--to",
            &to,
            "--count",
            "20",
            "--one-socket",
            "--timeout-ms",
            "2000",
        ])?;
        ensure!(code == 0, "{out}");
        let report: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(
            report["failures"] == 0
                && report["counts"].as_object().map(serde_json::Map::len) == Some(1),
            "an unconnected socket's datagrams were spread over backends: {report}"
        );
    }
    Ok(())
}

/// Session affinity and internalTrafficPolicy on the IPv6 ClusterIP of a dual-stack Service
/// (the upstream affinity and traffic-policy tests, per family): the socket path shares slots,
/// affinity and scopes by the frontend's backend set, so each family keeps its own stickiness
/// and its own node-local set.
#[test]
fn ipv6_cluster_ip_honours_session_affinity_and_internal_traffic_policy_local() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, client, _agents) = dual_lab(&lab)?;
    let eps: Vec<(&Pod, &str)> = backends.iter().map(|(p, n)| (p, n.as_str())).collect();
    let ips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    let to6 = at(ips[1], 80);

    // ClientIP affinity: every connection of the client lands on one backend, per family.
    web_with(
        &lab,
        &ips,
        "RequireDualStack",
        "  sessionAffinity: ClientIP\n",
        &eps,
    )?;
    wait_tcp_by(&client, &to6, None)?;
    for ip in ips {
        let seen = repliers(&client, &at(ip, 80), 20)?;
        ensure!(seen.len() == 1, "affinity on {ip}: {seen:?}");
    }

    // internalTrafficPolicy Local: the client (on the second node) reaches only the backend on
    // its own node, through either family.
    web_with(
        &lab,
        &ips,
        "RequireDualStack",
        "  internalTrafficPolicy: Local\n",
        &eps,
    )?;
    let local = &backends[1].0.name;
    for ip in ips {
        let to = at(ip, 80);
        wait_for(&format!("{to} only local"), Duration::from_mins(1), || {
            let seen = repliers(&client, &to, 10)?;
            Ok(seen.len() == 1 && seen.contains_key(local))
        })?;
        // Settled: a larger sample must be all local too (the wait alone could pass by chance).
        let seen = repliers(&client, &to, 40)?;
        ensure!(
            seen.len() == 1 && seen.contains_key(local),
            "{to}: {seen:?}"
        );
    }
    Ok(())
}

/// External client's view of `[node]:port` through the per-packet path: `labtool` from the lab's
/// external namespace (on the nodes' underlay, both families; no route to any pod range).
fn ext_labtool(lab: &Lab, args: &[&str]) -> Result<(i32, String)> {
    lab.external().labtool(args)
}

/// The dual-stack NodePort Service `web` (RequireDualStack; http 80 → 8080 on nodePort 30080,
/// dns 53/UDP → 5353 on nodePort 30053) over every node's backend, eTP `policy`.
fn node_port_web(lab: &Lab, backends: &[(Pod, String)], policy: &str) -> Result<()> {
    let eps: Vec<(&Pod, &str)> = backends.iter().map(|(p, n)| (p, n.as_str())).collect();
    let extra = format!("  externalTrafficPolicy: {policy}\n");
    web_with(
        lab,
        &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
        "RequireDualStack",
        &extra,
        &eps,
    )?;
    // `manifests::service` writes a ClusterIP Service; the NodePort form of the same manifest.
    let path = lab.manifests_dir().join("web.yaml");
    let yaml = std::fs::read_to_string(&path)?
        .replacen("type: ClusterIP", "type: NodePort", 1)
        .replacen("    port: 80\n", "    port: 80\n    nodePort: 30080\n", 1)
        .replacen("    port: 53\n", "    port: 53\n    nodePort: 30053\n", 1);
    lab.apply_manifest("web.yaml", &yaml)
}

/// Backend pods with their node's name, and the agents.
type NodeServiceLab = (Vec<(Pod, String)>, Vec<AgentProc>);

/// A two-node dual-stack lab with an external client: `web0`/`web1` serving both families
/// (TCP 8080, UDP 5353) on nodes 0 and 1, an agent on each.
fn node_service_lab(lab: &Lab) -> Result<NodeServiceLab> {
    let mut backends = Vec::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        let name = format!("web{i}");
        let pod = node.add_pod(&name)?;
        lab.serve_dual(&pod, &name, Some(8080), Some(5353))?;
        backends.push((pod, node.name.clone()));
    }
    let agents = (0..lab.nodes.len())
        .map(|i| start_agent(lab, i, &[]))
        .collect::<Result<Vec<_>>>()?;
    Ok((backends, agents))
}

/// The node's address of `family`.
fn node_ip(node: &twill_lab::Node, v6: bool) -> Result<IpAddr> {
    Ok(if v6 {
        IpAddr::V6(node.ip6.context("node without IPv6 address")?)
    } else {
        IpAddr::V4(node.ip)
    })
}

/// How often `node`'s datapath counted `reason` (`debug drops -o json`).
fn verdicts(node: &twill_lab::Node, reason: &str) -> Result<u64> {
    let json = node.debug(&["drops", "-o", "json"])?;
    let rows: serde_json::Value = serde_json::from_str(&json).context("debug drops -o json")?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["reason"] == reason)
        .filter_map(|r| r["count"].as_u64())
        .sum())
}

/// "[Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family should function for
/// node-Service: http", from outside the cluster: the external client reaches a dual-stack
/// NodePort (externalTrafficPolicy Cluster) on every node's IPv6 address — and its IPv4 one —
/// and both backends answer through each node: the node's own by DNAT (the backend sees the
/// client's IPv6 address), the other node's by DNAT + SNAT to the node's IPv6 address.
#[test]
fn should_function_for_node_service_http() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack().with_external_client())? else {
        return Ok(());
    };
    let (backends, _agents) = node_service_lab(&lab)?;
    node_port_web(&lab, &backends, "Cluster")?;
    let client6 = "fd00:172:30::200";
    for v6 in [true, false] {
        for (i, node) in lab.nodes.iter().enumerate() {
            let to = at(node_ip(node, v6)?, 30080);
            let mut seen = std::collections::BTreeMap::new();
            let mut last = String::new();
            wait_for(
                &format!("both backends via {to} from outside"),
                Duration::from_mins(1),
                || {
                    let (code, out) = ext_labtool(
                        &lab,
                        &[
                            "tcp-loop",
                            "--to",
                            &to,
                            "--timeout-ms",
                            "2000",
                            "--count",
                            "30",
                        ],
                    )?;
                    if code == 0 {
                        let report: serde_json::Value = serde_json::from_str(&out)?;
                        for (k, v) in report["counts"].as_object().into_iter().flatten() {
                            *seen.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
                        }
                    }
                    last = out;
                    Ok(seen.len() == 2)
                },
            )
            .map_err(|e| e.context(format!("{seen:?}, last: {last}")))?;
            ensure!(seen.keys().all(|k| k == "web0" || k == "web1"), "{seen:?}");
            if v6 {
                // The node's own backend sees the external client's IPv6 address (DNAT only).
                let own = format!("web{i}");
                let mut out = String::new();
                wait_for(
                    &format!("{own} via {to} sees the client"),
                    Duration::from_mins(1),
                    || {
                        let (code, o) =
                            ext_labtool(&lab, &["tcp", "--to", &to, "--timeout-ms", "1000"])?;
                        out = o;
                        Ok(code == 0 && replier(&out).as_deref() == Some(own.as_str()))
                    },
                )
                .map_err(|e| e.context(out.clone()))?;
                ensure!(
                    out.contains(client6),
                    "the local backend did not see the client's IPv6 address: {out}"
                );
            }
            if v6 && i == 0 {
                conntrack_shows_ipv6_flows(node, &to, client6, &backends[i].0)?;
            }
        }
    }
    // Both IPv6 paths were taken on node 0 (counted by the kernel, read back by the agent).
    let (dnat, forwarded) = (
        verdicts(lab.node(0), "ns6_dnat")?,
        verdicts(lab.node(0), "ns6_forwarded")?,
    );
    ensure!(
        dnat > 0 && forwarded > 0,
        "IPv6 north-south verdicts on node 0: ns6_dnat {dnat}, ns6_forwarded {forwarded}"
    );
    Ok(())
}

/// `debug conntrack` shows the IPv6 table's flows beside the IPv4 ones: the external client's
/// (`client6`) flows to the NodePort `to` of `node`, to a backend's IPv6 address; `--backend`
/// takes `web`'s IPv6 address.
fn conntrack_shows_ipv6_flows(
    node: &twill_lab::Node,
    to: &str,
    client6: &str,
    web: &Pod,
) -> Result<()> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&node.debug(&["conntrack", "-o", "json"])?)?;
    let backend6 = ip6(web)?;
    let flow6 = rows
        .iter()
        .find(|r| {
            r["scope"] == "nat"
                && r["direction"] == "original"
                && r["destination"] == to
                && r["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("[{client6}]:")))
        })
        .ok_or_else(|| anyhow::anyhow!("no IPv6 NodePort flow to {to} in {rows:?}"))?;
    ensure!(
        flow6["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with('[') && b.ends_with("]:8080")),
        "{flow6}"
    );
    let by_backend: Vec<serde_json::Value> = serde_json::from_str(&node.debug(&[
        "conntrack",
        "--backend",
        &backend6.to_string(),
        "-o",
        "json",
    ])?)?;
    ensure!(
        !by_backend.is_empty()
            && by_backend.iter().all(|r| r["backend"]
                .as_str()
                .is_some_and(|b| b.starts_with(&format!("[{backend6}]:")))),
        "{by_backend:?}"
    );
    Ok(())
}

/// "[Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family should function for
/// node-Service: udp", from outside the cluster: UDP datagrams to the IPv6 NodePort of every
/// node are answered from the NodePort address by both backends (each datagram from a new
/// source port is a new flow), through DNAT and DNAT + SNAT alike.
#[test]
fn should_function_for_node_service_udp() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack().with_external_client())? else {
        return Ok(());
    };
    let (backends, _agents) = node_service_lab(&lab)?;
    node_port_web(&lab, &backends, "Cluster")?;
    for node in &lab.nodes {
        let to = at(node_ip(node, true)?, 30053);
        let mut seen = std::collections::BTreeSet::new();
        let mut last = String::new();
        wait_for(
            &format!("both backends via UDP {to} from outside"),
            Duration::from_mins(1),
            || {
                let (code, out) = ext_labtool(&lab, &["udp", "--to", &to, "--timeout-ms", "1000"])?;
                if code == 0
                    && let Some(name) = replier(&out)
                {
                    seen.insert(name);
                }
                last = out;
                Ok(seen.len() == 2)
            },
        )
        .map_err(|e| e.context(format!("{seen:?}, last: {last}")))?;
    }
    Ok(())
}

/// externalTrafficPolicy Local over IPv6 from outside: a node with a local backend answers on
/// its IPv6 NodePort with the client's IPv6 address kept; a node without one drops.
#[test]
fn ipv6_node_port_external_traffic_policy_local_keeps_the_client_address() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack().with_external_client())? else {
        return Ok(());
    };
    let (mut backends, _agents) = node_service_lab(&lab)?;
    // Only node 0's backend is an endpoint.
    backends.truncate(1);
    node_port_web(&lab, &backends, "Local")?;
    let to0 = at(node_ip(lab.node(0), true)?, 30080);
    let mut out = String::new();
    wait_for(
        &format!("{to0} from outside"),
        Duration::from_mins(1),
        || {
            let (code, o) = ext_labtool(&lab, &["tcp", "--to", &to0, "--timeout-ms", "1000"])?;
            out = o;
            Ok(code == 0)
        },
    )
    .map_err(|e| e.context(out.clone()))?;
    ensure!(
        replier(&out).as_deref() == Some("web0") && out.contains("fd00:172:30::200"),
        "eTP Local did not keep the client's IPv6 address: {out}"
    );
    // Node 1 drops (its program's no_local_backend, not merely a closed port before the
    // programs are attached).
    let to1 = at(node_ip(lab.node(1), true)?, 30080);
    wait_for(
        &format!("{to1} dropped for want of a local backend"),
        Duration::from_mins(1),
        || {
            let (code, out) = ext_labtool(&lab, &["tcp", "--to", &to1, "--timeout-ms", "1000"])?;
            ensure!(
                code != 0,
                "a node without a local backend answered with externalTrafficPolicy=Local: {out}"
            );
            Ok(verdicts(lab.node(1), "no_local_backend")? > 0)
        },
    )
}

/// IPv6 NodePort on the socket path: a pod reaches the Service on every node's IPv6 address and
/// the NodePort (translated at connect(), as IPv4's), the node itself on its own IPv6 address and
/// on `[::1]`; a pod's `[::1]` is the pod itself and stays untranslated.
#[test]
fn ipv6_node_port_from_pods_and_the_node_itself() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_dual_stack())? else {
        return Ok(());
    };
    let (backends, _agents) = node_service_lab(&lab)?;
    node_port_web(&lab, &backends, "Cluster")?;
    let client = lab.node(1).add_pod("client")?;
    // Generous: the first answer waits for both agents' first sync on a loaded machine.
    for node in &lab.nodes {
        let to = at(node_ip(node, true)?, 30080);
        let mut out = String::new();
        wait_for(&format!("{to} from a pod"), Duration::from_mins(1), || {
            let (code, o) = tcp(&client, &to)?;
            out = o;
            Ok(code == 0 && replier(&out).is_some())
        })
        .map_err(|e| e.context(out.clone()))?;
    }
    let n0 = lab.node(0);
    for to in [
        at(node_ip(n0, true)?, 30080),
        at(Ipv6Addr::LOCALHOST.into(), 30080),
    ] {
        let mut out = String::new();
        wait_for(&format!("{to} from node 0"), Duration::from_mins(1), || {
            let (code, o) = n0.labtool(&["tcp", "--to", &to, "--timeout-ms", "1000"])?;
            out = o;
            Ok(code == 0 && replier(&out).is_some())
        })
        .map_err(|e| e.context(out.clone()))?;
    }
    let (code, out) = tcp(&client, &at(Ipv6Addr::LOCALHOST.into(), 30080))?;
    ensure!(code != 0, "a pod's [::1] was translated: {out}");
    Ok(())
}

/// The external client's IPv6 address (the lab's external namespace, `::200` of the underlay).
const EXT6: &str = "fd00:172:30::200";
/// The dual-stack LoadBalancer IPs of [`should_only_allow_access_from_service_loadbalancer_source_ranges`].
const LB4: &str = "192.0.2.40";
const LB6: &str = "2001:db8:1::40";

/// The dual-stack LoadBalancer Service `web` (RequireDualStack, eTP Cluster) over `backends`,
/// ingress IPs [`LB4`] and [`LB6`], with `ranges` as its `loadBalancerSourceRanges` (none:
/// the field left out).
fn lb_web(lab: &Lab, backends: &[(Pod, String)], ranges: &[&str]) -> Result<()> {
    let eps: Vec<(&Pod, &str)> = backends.iter().map(|(p, n)| (p, n.as_str())).collect();
    let quoted: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
    let field = if ranges.is_empty() {
        String::new()
    } else {
        format!("  loadBalancerSourceRanges: [{}]\n", quoted.join(", "))
    };
    let extra = format!(
        "{field}status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB6}\"}}, {{ip: {LB4}}}]\n"
    );
    web_with(
        lab,
        &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
        "RequireDualStack",
        &extra,
        &eps,
    )?;
    let path = lab.manifests_dir().join("web.yaml");
    let yaml = std::fs::read_to_string(&path)?
        .replacen("type: ClusterIP", "type: LoadBalancer", 1)
        .replacen("    port: 80\n", "    port: 80\n    nodePort: 30080\n", 1)
        .replacen("    port: 53\n", "    port: 53\n    nodePort: 30053\n", 1);
    lab.apply_manifest("web.yaml", &yaml)
}

/// Waits until the external client's TCP connections to `to` are answered (`open`) or all
/// fail (not `open`).
fn wait_ext_open(lab: &Lab, to: &str, open: bool) -> Result<()> {
    let mut last = String::new();
    wait_for(
        &format!(
            "{to} from outside {}",
            if open { "answered" } else { "refused" }
        ),
        Duration::from_mins(1),
        || {
            let (code, out) = ext_labtool(lab, &["tcp", "--to", to, "--timeout-ms", "1000"])?;
            last = out;
            Ok((code == 0 && replier(&last).as_deref() == Some("web0")) == open)
        },
    )
    .map_err(|e| e.context(format!("last: {last}")))
}

/// "[sig-network] LoadBalancers should only allow access from service loadbalancer source
/// ranges", over both families of a dual-stack LoadBalancer: the external client reaches both
/// LoadBalancer IPs while each family's ranges hold its address; after an update to ranges
/// that do not, neither answers (the IPv6 LoadBalancer IP is dropped in the kernel as
/// `ns6_source_range_denied`); with the ranges removed both answer again. The LoadBalancer IPs
/// are routed to node 0 (what an L2 announcement or BGP does), whose pod is the backend.
#[test]
fn should_only_allow_access_from_service_loadbalancer_source_ranges() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack().with_external_client())? else {
        return Ok(());
    };
    let (backends, _agents) = node_service_lab(&lab)?;
    let ext = lab.external();
    let n0 = lab.node(0);
    for (lb, via) in [(LB4, node_ip(n0, false)?), (LB6, node_ip(n0, true)?)] {
        let family = if via.is_ipv6() { "-6" } else { "-4" };
        twill_lab::run_cmd(std::process::Command::new("ip").args([
            family,
            "-n",
            &ext.netns,
            "route",
            "add",
            lb,
            "via",
            &via.to_string(),
        ]))?;
    }
    let to = [at(LB4.parse()?, 80), at(LB6.parse()?, 80)];
    let client4 = format!("{}/32", ext.ip);
    let client6 = format!("{EXT6}/128");
    // Each family's ranges hold the client (the IPv6 one as a /64 around it).
    lb_web(&lab, &backends, &[&client4, "fd00:172:30::/64"])?;
    for t in &to {
        wait_ext_open(&lab, t, true)?;
    }
    // Ranges of both families that leave the client out: refused on both LoadBalancer IPs.
    lb_web(&lab, &backends, &["10.0.0.0/8", "2001:db8:ffff::/48"])?;
    for t in &to {
        wait_ext_open(&lab, t, false)?;
    }
    let denied = verdicts(n0, "ns6_source_range_denied")?;
    ensure!(
        denied > 0,
        "the IPv6 client outside the ranges was not dropped by the kernel: {denied}"
    );
    // Only the client's own IPv6 address: the IPv6 LoadBalancer IP admits it again, the IPv4
    // one (whose ranges still leave it out) does not.
    lb_web(&lab, &backends, &["10.0.0.0/8", &client6])?;
    wait_ext_open(&lab, &to[1], true)?;
    wait_ext_open(&lab, &to[0], false)?;
    // No ranges at all: both open.
    lb_web(&lab, &backends, &[])?;
    for t in &to {
        wait_ext_open(&lab, t, true)?;
    }
    Ok(())
}
