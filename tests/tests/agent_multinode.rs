//! Lab e2e of the multi-node shape through the real agent on every node: routes it programs
//! between nodes, NodePort / ExternalIP / LoadBalancer from an "external client" namespace on
//! the underlay (not a node), externalTrafficPolicy, healthCheckNodePort and egress masquerade.
//! Names follow the upstream sig-network tests they mirror where one exists
//! (kubernetes/kubernetes test/e2e/network/service.go).
mod agent_common;

use std::fmt::Write as _;
use std::time::Duration;

use agent_common::{AgentProc, ready, replier, slice, start_agent, tcp, wait_for};
use anyhow::{Result, ensure};
use twill_lab::{Lab, LabSpec, Pod, bin, require, run_cmd, spawn_and_wait_ready};

/// An agent on every node of the lab.
fn agents(lab: &Lab) -> Result<Vec<AgentProc>> {
    (0..lab.nodes.len())
        .map(|i| start_agent(lab, i, &[]))
        .collect()
}

/// A `type` NodePort/LoadBalancer Service `name` with one TCP port 80 → 8080 and the given
/// `nodePort`; `extra` is YAML appended inside `spec:`, `status` a whole `status:` block.
fn np_service(name: &str, ty: &str, cluster_ip: &str, node_port: u16, extra: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         type: {ty}\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n  - \
         {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}\n"
    );
    y.push_str(extra);
    y
}

fn web_slice(svc: &str, pods: &[(&Pod, &str)]) -> String {
    let eps: Vec<_> = pods.iter().map(|(p, n)| ready(p.ip, n)).collect();
    slice(svc, &format!("{svc}-1"), &eps, &[("http", 8080, "TCP")])
}

/// `labtool tcp` from the external client.
fn ext_tcp(lab: &Lab, to: &str) -> Result<(i32, String)> {
    lab.external()
        .labtool(&["tcp", "--to", to, "--timeout-ms", "1000"])
}

fn wait_ext_reply(lab: &Lab, to: &str, name: &str) -> Result<String> {
    let mut last = String::new();
    wait_for(
        &format!("{to} from outside answered by {name}"),
        Duration::from_secs(20),
        || {
            let (code, out) = ext_tcp(lab, to)?;
            let ok = code == 0 && replier(&out).as_deref() == Some(name);
            last = out;
            Ok(ok)
        },
    )?;
    Ok(last)
}

/// The agent-owned routes of a node (`proto 0xfe`).
fn owned_routes(lab: &Lab, i: usize) -> Result<String> {
    lab.node(i).run(&["ip", "route", "show", "proto", "0xfe"])
}

/// Pod ↔ pod and node → pod across nodes with real IPs on routes the agents program; a Node
/// that leaves the cluster takes its route with it.
#[test]
fn pods_reach_pods_on_other_nodes_by_their_own_ips_and_a_removed_node_loses_its_route() -> Result<()>
{
    let Some(lab) = require(LabSpec::nodes(3))? else {
        return Ok(());
    };
    let _agents = agents(&lab)?;
    let p0 = lab.node(0).add_pod("p0")?;
    let p2 = lab.node(2).add_pod("p2")?;
    lab.serve(&p0, "p0", Some(8080), None)?;
    lab.serve(&p2, "p2", Some(8080), None)?;

    let to_p2 = format!("{}:8080", p2.ip);
    let mut out = String::new();
    wait_for("p0 → p2 across nodes", Duration::from_secs(20), || {
        let (code, o) = tcp(&p0, &to_p2)?;
        out = o;
        Ok(code == 0)
    })?;
    ensure!(
        out.starts_with(&format!("reply=p2 {}:", p0.ip)),
        "the remote pod did not see the client pod's own IP: {out}"
    );
    // A node reaches a pod on another node; the pod sees the node's IP.
    let (code, out) = lab
        .node(1)
        .labtool(&["tcp", "--to", &format!("{}:8080", p0.ip)])?;
    ensure!(
        code == 0 && out.starts_with(&format!("reply=p0 {}:", lab.node(1).ip)),
        "node n1 → pod on n0: {out}"
    );
    let routes = owned_routes(&lab, 0)?;
    ensure!(
        routes.contains("10.244.1.0/24") && routes.contains("10.244.2.0/24"),
        "n0's routes: {routes}"
    );

    // n2 leaves the cluster: its Node object disappears from the "API server".
    let nodes_file = lab.manifests_dir().join("nodes.json");
    let mut list: serde_json::Value = serde_json::from_slice(&std::fs::read(&nodes_file)?)?;
    if let Some(items) = list["items"].as_array_mut() {
        items.retain(|n| n["metadata"]["name"] != lab.node(2).name.as_str());
    }
    twill_lab::write_atomic(&nodes_file, &serde_json::to_vec(&list)?)?;
    wait_for(
        "n0 to drop the route to n2",
        Duration::from_secs(20),
        || Ok(!owned_routes(&lab, 0)?.contains("10.244.2.0/24")),
    )?;
    let routes = owned_routes(&lab, 0)?;
    ensure!(
        routes.contains("10.244.1.0/24"),
        "n0 lost n1's route too: {routes}"
    );
    let (code, out) = tcp(&p0, &to_p2)?;
    ensure!(code != 0, "p2 still reachable without a route: {out}");
    Ok(())
}

/// "should be able to create a functioning NodePort service" (+ ClusterIP with every backend on
/// another node, NodePort from a pod and from the node itself).
#[test]
fn should_be_able_to_create_a_functioning_nodeport_service() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(3).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    let client = lab.node(1).add_pod("client")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "np.yaml",
        &format!(
            "{}---\n{}",
            np_service("np", "NodePort", "10.96.0.20", 30080, ""),
            web_slice("np", &[(&web, &lab.node(0).name)])
        ),
    )?;
    let _agents = agents(&lab)?;

    // From outside to every node, the two without a backend included (externalTrafficPolicy
    // Cluster: they translate the client to their own IP so replies come back through them).
    for n in &lab.nodes {
        let out = wait_ext_reply(&lab, &format!("{}:30080", n.ip), "web0")?;
        ensure!(
            out.contains(&format!("peer={}:30080", n.ip)),
            "the client did not see the NodePort as its peer: {out}"
        );
    }
    // ClusterIP from a pod on n1 with the only backend on n0: the backend sees the pod's IP.
    let (code, out) = tcp(&client, "10.96.0.20:80")?;
    ensure!(
        code == 0 && out.starts_with(&format!("reply=web0 {}:", client.ip)),
        "ClusterIP to a backend on another node: {out}"
    );
    // NodePort from a pod, to its own node and to another node.
    for n in [lab.node(1), lab.node(0)] {
        let (code, out) = tcp(&client, &format!("{}:30080", n.ip))?;
        ensure!(
            code == 0 && replier(&out).as_deref() == Some("web0"),
            "pod → {}:30080: {out}",
            n.ip
        );
    }
    // NodePort from the node itself.
    let n2 = lab.node(2);
    let (code, out) = n2.labtool(&["tcp", "--to", &format!("{}:30080", n2.ip)])?;
    ensure!(code == 0, "node → its own NodePort: {out}");
    // Via loopback: only in the node's own network namespace (the agent gives the datapath its
    // cookie); in a pod 127.0.0.1 is the pod itself, where nothing listens on 30080.
    let (code, out) = n2.labtool(&["tcp", "--to", "127.0.0.1:30080"])?;
    ensure!(
        code == 0 && replier(&out).as_deref() == Some("web0"),
        "node → 127.0.0.1:30080: {out}"
    );
    let (code, out) = tcp(&client, "127.0.0.1:30080")?;
    ensure!(code == 2, "pod → 127.0.0.1:30080 was translated: {out}");
    Ok(())
}

/// externalTrafficPolicy: Local keeps the client IP and is answered only where a local backend
/// exists; healthCheckNodePort answers kube-proxy's JSON with 200 there and 503 elsewhere.
#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_health_check_node_port_tells_where()
-> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "local.yaml",
        &format!(
            "{}---\n{}",
            np_service(
                "local",
                "NodePort",
                "10.96.0.21",
                30081,
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n"
            ),
            web_slice("local", &[(&web, &lab.node(0).name)])
        ),
    )?;
    let _agents = agents(&lab)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    let out = wait_ext_reply(&lab, &format!("{}:30081", n0.ip), "web0")?;
    // n1 has programmed the Service once its health check port answers.
    wait_for(
        "n1's health check node port",
        Duration::from_secs(10),
        || {
            Ok(lab
                .external()
                .labtool(&["http", "--to", &format!("{}:32100", n1.ip)])?
                .1
                .starts_with("status="))
        },
    )?;
    ensure!(
        out.starts_with(&format!("reply=web0 {}:", lab.external().ip)),
        "the backend did not see the external client's IP: {out}"
    );
    let (code, out) = ext_tcp(&lab, &format!("{}:30081", n1.ip))?;
    ensure!(
        code != 0,
        "a node without a local backend answered with externalTrafficPolicy=Local: {out}"
    );
    let health = |n: &twill_lab::Node| {
        lab.external().labtool(&[
            "http",
            "--to",
            &format!("{}:32100", n.ip),
            "--timeout-ms",
            "1000",
        ])
    };
    let mut out = String::new();
    wait_for("healthCheckNodePort on n0", Duration::from_secs(10), || {
        out = health(n0)?.1;
        Ok(out.starts_with("status=200"))
    })?;
    let body: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap_or(""))?;
    ensure!(
        body["service"]["namespace"] == "default"
            && body["service"]["name"] == "local"
            && body["localEndpoints"] == 1,
        "kube-proxy's health JSON expected: {out}"
    );
    // Every node serves it (kube-proxy does), 503 where no local endpoint is.
    wait_for(
        "healthCheckNodePort 503 on n1",
        Duration::from_secs(10),
        || {
            out = health(n1)?.1;
            Ok(out.starts_with("status=503"))
        },
    )?;
    Ok(())
}

/// "should be able to connect to an external IP not assigned to a node" (+ a LoadBalancer
/// ingress IP with loadBalancerSourceRanges, allowed and denied).
#[test]
fn should_connect_via_external_ip_and_load_balancer_ip_with_source_ranges() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    let ext = lab.external();
    // The outside world routes these addresses to a node (what a router, BGP or an L2
    // announcement does): the External IP to n1 (no local backend), the LB IPs to n0.
    for (ip, via) in [
        ("198.51.100.7", lab.node(1).ip),
        ("192.0.2.10", lab.node(0).ip),
        ("192.0.2.11", lab.node(0).ip),
    ] {
        run_cmd(std::process::Command::new("ip").args([
            "-n",
            &ext.netns,
            "route",
            "add",
            ip,
            "via",
            &via.to_string(),
        ]))?;
    }
    let mut manifests = String::new();
    let _ = write!(
        manifests,
        "{}---\n{}---\n",
        np_service(
            "eip",
            "ClusterIP",
            "10.96.0.22",
            0,
            "  externalIPs: [198.51.100.7]\n"
        )
        .replace(", nodePort: 0", ""),
        web_slice("eip", &[(&web, &lab.node(0).name)])
    );
    for (name, ip, cluster_ip, np, allowed) in [
        (
            "lb-open",
            "192.0.2.10",
            "10.96.0.23",
            30090,
            "172.30.0.0/24",
        ),
        ("lb-closed", "192.0.2.11", "10.96.0.24", 30091, "10.0.0.0/8"),
    ] {
        let _ = write!(
            manifests,
            "{}status:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n---\n{}---\n",
            np_service(
                name,
                "LoadBalancer",
                cluster_ip,
                np,
                &format!("  loadBalancerSourceRanges: [{allowed}]\n")
            ),
            web_slice(name, &[(&web, &lab.node(0).name)])
        );
    }
    lab.apply_manifest("north-south.yaml", &manifests)?;
    let _agents = agents(&lab)?;

    let out = wait_ext_reply(&lab, "198.51.100.7:80", "web0")?;
    ensure!(out.contains("peer=198.51.100.7:80"), "{out}");
    let out = wait_ext_reply(&lab, "192.0.2.10:80", "web0")?;
    ensure!(
        out.starts_with(&format!("reply=web0 {}:", ext.ip)),
        "LoadBalancer IP to a local backend keeps the client IP: {out}"
    );
    let (code, out) = ext_tcp(&lab, "192.0.2.11:80")?;
    ensure!(
        code != 0,
        "a client outside loadBalancerSourceRanges got in: {out}"
    );
    Ok(())
}

/// "should release NodePorts on delete"
#[test]
fn should_release_nodeports_on_delete() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "np.yaml",
        &format!(
            "{}---\n{}",
            np_service("np", "NodePort", "10.96.0.25", 30085, ""),
            web_slice("np", &[(&web, &lab.node(0).name)])
        ),
    )?;
    let _agents = agents(&lab)?;
    let to = format!("{}:30085", lab.node(0).ip);
    wait_ext_reply(&lab, &to, "web0")?;
    lab.delete_manifest("np.yaml")?;
    wait_for(
        "the NodePort to be released",
        Duration::from_secs(20),
        || Ok(ext_tcp(&lab, &to)?.0 != 0),
    )?;
    // The port is free for a new Service.
    lab.apply_manifest(
        "np2.yaml",
        &format!(
            "{}---\n{}",
            np_service("np2", "NodePort", "10.96.0.26", 30085, ""),
            web_slice("np2", &[(&web, &lab.node(0).name)])
        ),
    )?;
    wait_ext_reply(&lab, &to, "web0")?;
    Ok(())
}

/// Pod egress to a host outside the cluster leaves with the node's IP, and the reply finds its
/// way back; pod ↔ pod traffic stays untranslated.
#[test]
fn pod_egress_to_an_outside_host_is_masqueraded_by_the_agent() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let ext = lab.external();
    let mut serve = ext.cmd(bin("labtool"));
    serve.args(["serve", "--name", "outside", "--tcp", "9090"]);
    lab.track(spawn_and_wait_ready(serve)?);
    let p0 = lab.node(0).add_pod("egress")?;
    let p1 = lab.node(1).add_pod("peer")?;
    lab.serve(&p1, "peer", Some(8080), None)?;
    // The nftables fallback (the default, eBPF, is `tests/tests/fastpath.rs`'s).
    let _agents = (0..lab.nodes.len())
        .map(|i| start_agent(&lab, i, &["--masquerade-mode", "nftables"]))
        .collect::<Result<Vec<_>>>()?;
    let outside = format!("{}:9090", ext.ip);
    let mut out = String::new();
    wait_for("pod → outside host", Duration::from_secs(20), || {
        let (code, o) = tcp(&p0, &outside)?;
        out = o;
        Ok(code == 0)
    })?;
    ensure!(
        out.starts_with(&format!("reply=outside {}:", lab.node(0).ip)),
        "not masqueraded to the node IP: {out}"
    );
    // Only n0's agent was waited for: n1 may still be programming its route back to n0.
    let to_p1 = format!("{}:8080", p1.ip);
    let mut out = String::new();
    let reached = wait_for("pod → pod across nodes", Duration::from_secs(20), || {
        let (code, o) = tcp(&p0, &to_p1)?;
        out = o;
        Ok(code == 0)
    });
    ensure!(
        reached.is_ok() && out.starts_with(&format!("reply=peer {}:", p0.ip)),
        "pod → pod was translated: {out}"
    );
    // The masquerade's NAT hook must not make every pod ↔ pod connection pay for conntrack:
    // the egress flow is tracked (it is translated), the pod ↔ pod one is not.
    let flows = |dst: &str| -> Result<String> {
        let out = lab
            .node(0)
            .cmd("conntrack")
            .args(["-L", "-p", "tcp", "-s", &p0.ip.to_string(), "-d", dst])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let egress = flows(&ext.ip.to_string())?;
    ensure!(
        egress.contains("dport=9090"),
        "egress flow not tracked: {egress:?}"
    );
    let pods = flows(&p1.ip.to_string())?;
    ensure!(pods.trim().is_empty(), "pod ↔ pod flow tracked: {pods}");
    Ok(())
}

/// "should be able to update service type to NodePort listening on same port number but
/// different protocols"
#[test]
fn should_serve_the_same_nodeport_number_over_tcp_and_udp() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), Some(8080))?;
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: default}\nspec:\n  \
               type: NodePort\n  clusterIP: 10.96.0.27\n  ports:\n  - {name: tcp, port: 53, \
               targetPort: 8080, nodePort: 30053, protocol: TCP}\n  - {name: udp, port: 53, \
               targetPort: 8080, nodePort: 30053, protocol: UDP}\n";
    let eps = [ready(web.ip, &lab.node(0).name)];
    lab.apply_manifest(
        "dual.yaml",
        &format!(
            "{svc}---\n{}",
            slice(
                "dual",
                "dual-1",
                &eps,
                &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")]
            )
        ),
    )?;
    let _agents = agents(&lab)?;
    for n in &lab.nodes {
        let to = format!("{}:30053", n.ip);
        wait_ext_reply(&lab, &to, "web0")?;
        let mut out = String::new();
        wait_for(
            &format!("UDP {to} from outside"),
            Duration::from_secs(10),
            || {
                let (code, o) =
                    lab.external()
                        .labtool(&["udp", "--to", &to, "--timeout-ms", "1000"])?;
                out = o;
                Ok(code == 0)
            },
        )?;
        ensure!(
            replier(&out).as_deref() == Some("web0") && out.contains(&format!("from={to}")),
            "UDP NodePort reply must come from the NodePort: {out}"
        );
    }
    Ok(())
}

/// "should have session affinity work for NodePort service"
#[test]
fn should_have_session_affinity_work_for_nodeport_service() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let b0 = lab.node(0).add_pod("be0")?;
    let b1 = lab.node(1).add_pod("be1")?;
    lab.serve(&b0, "be0", Some(8080), None)?;
    lab.serve(&b1, "be1", Some(8080), None)?;
    let pods = [
        (&b0, lab.node(0).name.as_str()),
        (&b1, lab.node(1).name.as_str()),
    ];
    let write = |affinity: &str| {
        lab.apply_manifest(
            "aff.yaml",
            &format!(
                "{}---\n{}",
                np_service("aff", "NodePort", "10.96.0.28", 30086, affinity),
                web_slice("aff", &pods)
            ),
        )
    };
    write("  sessionAffinity: ClientIP\n")?;
    let _agents = agents(&lab)?;
    let to = format!("{}:30086", lab.node(0).ip);
    wait_for("the NodePort", Duration::from_secs(20), || {
        Ok(ext_tcp(&lab, &to)?.0 == 0)
    })?;
    let counts = |lab: &Lab| -> Result<serde_json::Value> {
        let (code, out) = lab.external().labtool(&[
            "tcp-loop",
            "--to",
            &to,
            "--count",
            "30",
            "--timeout-ms",
            "2000",
        ])?;
        ensure!(code == 0, "tcp-loop: {out}");
        Ok(serde_json::from_str::<serde_json::Value>(&out)?["counts"].clone())
    };
    let c = counts(&lab)?;
    ensure!(
        c.as_object().is_some_and(|m| m.len() == 1),
        "one client IP must stick to one backend: {c}"
    );
    // Switching affinity off spreads the same client again.
    write("")?;
    wait_for("affinity off", Duration::from_secs(20), || {
        Ok(counts(&lab)?.as_object().is_some_and(|m| m.len() == 2))
    })?;
    Ok(())
}

/// The externalTrafficPolicy variants of "should fallback to terminating endpoints when there
/// are no ready endpoints" (KEP-1669): Local falls back to local serving-terminating endpoints,
/// Cluster to serving-terminating endpoints anywhere.
#[test]
fn should_fallback_to_terminating_endpoints_with_external_traffic_policy_local_and_cluster()
-> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(1).add_pod("web1")?;
    lab.serve(&web, "web1", Some(8080), None)?;
    // Only a serving, terminating endpoint on n1.
    let eps = [(web.ip, lab.node(1).name.as_str(), false, true, true)];
    let mut m = String::new();
    for (name, ip, np, etp) in [
        ("term-local", "10.96.0.29", 30087, "Local"),
        ("term-cluster", "10.96.0.30", 30088, "Cluster"),
    ] {
        let _ = write!(
            m,
            "{}---\n{}---\n",
            np_service(
                name,
                "NodePort",
                ip,
                np,
                &format!("  externalTrafficPolicy: {etp}\n")
            ),
            slice(name, &format!("{name}-1"), &eps, &[("http", 8080, "TCP")])
        );
    }
    lab.apply_manifest("term.yaml", &m)?;
    let _agents = agents(&lab)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    // Local: the node with the terminating endpoint serves it, keeping the client IP.
    let out = wait_ext_reply(&lab, &format!("{}:30087", n1.ip), "web1")?;
    ensure!(
        out.starts_with(&format!("reply=web1 {}:", lab.external().ip)),
        "{out}"
    );
    let (code, out) = ext_tcp(&lab, &format!("{}:30087", n0.ip))?;
    ensure!(
        code != 0,
        "Local must not fall back to a remote endpoint: {out}"
    );
    // Cluster: any node falls back to it.
    wait_ext_reply(&lab, &format!("{}:30088", n0.ip), "web1")?;
    Ok(())
}

/// Nodes on two subnets joined by a router (no shared L2): the agents in `auto` mode reach
/// each other's pods over the VXLAN overlay, untranslated, with the overlay MTU in the CNI
/// config.
#[test]
fn pods_on_nodes_in_different_subnets_talk_over_the_vxlan_overlay() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_two_subnets().with_external_client())? else {
        return Ok(());
    };
    let _agents = agents(&lab)?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    wait_for(
        "the overlay MTU in n0's CNI config",
        Duration::from_secs(20),
        || {
            let conf = std::fs::read_to_string(n0.conflist_path()).unwrap_or_default();
            Ok(conf.contains("\"mtu\": 1450") || conf.contains("\"mtu\":1450"))
        },
    )?;
    let p0 = n0.add_pod("p0")?;
    let p1 = n1.add_pod("p1")?;
    lab.serve(&p1, "p1", Some(8080), None)?;
    let mut out = String::new();
    wait_for(
        "p0 → p1 over the overlay",
        Duration::from_secs(20),
        || {
            let (code, o) = tcp(&p0, &format!("{}:8080", p1.ip))?;
            out = o;
            Ok(code == 0)
        },
    )?;
    ensure!(out.starts_with(&format!("reply=p1 {}:", p0.ip)), "{out}");
    let dev = n0.run(&["ip", "-d", "link", "show", "twill.vxlan"])?;
    ensure!(dev.contains("vxlan id 1"), "{dev}");
    // NodePort from outside on both nodes, the only backend behind the overlay from n0: n0's tc
    // path sends the translated packet into the VXLAN device, and the reply, addressed to n0's
    // own IP, comes back over the underlay to be translated back.
    lab.apply_manifest(
        "np-vx.yaml",
        &format!(
            "{}---\n{}",
            np_service("np-vx", "NodePort", "10.96.0.90", 30090, ""),
            web_slice("np-vx", &[(&p1, &n1.name)])
        ),
    )?;
    for n in [n0, n1] {
        let out = wait_ext_reply(&lab, &format!("{}:30090", n.ip), "p1")?;
        ensure!(
            out.contains(&format!("peer={}:30090", n.ip)),
            "the client did not see the NodePort as its peer: {out}"
        );
    }
    // A pod on n0 reaching n1's NodePort, whose backend is local to n1: n1 translates it on
    // its underlay device and the backend's reply to the pod leaves n1 through the overlay,
    // where the tc programs translate it back too.
    let to = format!("{}:30090", n1.ip);
    let (code, out) = tcp(&p0, &to)?;
    ensure!(
        code == 0 && replier(&out).as_deref() == Some("p1") && out.contains(&format!("peer={to}")),
        "pod → another node's NodePort over the overlay: {code} {out}"
    );
    Ok(())
}

/// "should allow pods to hairpin back to themselves through services", through a NodePort:
/// the only backend reaches itself via its own node's address (translated at the socket, so it
/// sees its own IP) and via another node's (that node's tc path translates it to the node IP,
/// externalTrafficPolicy Cluster, so the reply returns through it).
#[test]
fn a_pod_reaches_itself_through_a_nodeport_hairpin() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2))? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "hp.yaml",
        &format!(
            "{}---\n{}",
            np_service("hp", "NodePort", "10.96.0.31", 30089, ""),
            web_slice("hp", &[(&web, &lab.node(0).name)])
        ),
    )?;
    let _agents = agents(&lab)?;
    for n in &lab.nodes {
        let to = format!("{}:30089", n.ip);
        let mut out = String::new();
        wait_for(
            &format!("hairpin via {to}"),
            Duration::from_secs(20),
            || {
                let (code, o) = tcp(&web, &to)?;
                out = o;
                Ok(code == 0)
            },
        )?;
        let seen = if n.name == lab.node(0).name {
            web.ip
        } else {
            n.ip
        };
        ensure!(
            out.starts_with(&format!("reply=web0 {seen}:")),
            "hairpin via {to}: want the pod itself, seeing {seen}: {out}"
        );
    }
    Ok(())
}

/// `twill-agent debug conntrack` shows a NodePort flow the tc programs track: from outside to a
/// node without the backend (externalTrafficPolicy Cluster, so SNAT), both directions, by
/// Service and by backend, with state and expiry; other filters leave it out.
#[test]
fn debug_conntrack_shows_a_nodeport_flow_by_service_and_backend() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let web = lab.node(0).add_pod("web0")?;
    lab.serve(&web, "web0", None, Some(8080))?;
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: ctudp, namespace: default}\nspec:\n  \
               type: NodePort\n  clusterIP: 10.96.0.28\n  ports:\n  - {name: udp, port: 53, \
               targetPort: 8080, nodePort: 30054, protocol: UDP}\n";
    let eps = [ready(web.ip, &lab.node(0).name)];
    lab.apply_manifest(
        "ctudp.yaml",
        &format!(
            "{svc}---\n{}",
            slice("ctudp", "ctudp-1", &eps, &[("udp", 8080, "UDP")])
        ),
    )?;
    let _agents = agents(&lab)?;
    let n1 = lab.node(1);
    let to = format!("{}:30054", n1.ip);
    wait_for(
        &format!("UDP {to} from outside"),
        Duration::from_secs(20),
        || {
            let (code, out) =
                lab.external()
                    .labtool(&["udp", "--to", &to, "--timeout-ms", "1000"])?;
            Ok(code == 0 && replier(&out).as_deref() == Some("web0"))
        },
    )?;
    let backend = format!("{}:8080", web.ip);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&n1.debug(&[
        "conntrack",
        "--service",
        "default/ctudp",
        "-o",
        "json",
    ])?)?;
    let original = rows
        .iter()
        .find(|r| r["direction"] == "original" && r["destination"] == to.as_str())
        .ok_or_else(|| anyhow::anyhow!("no original-direction entry to {to}: {rows:?}"))?;
    ensure!(
        original["scope"] == "nat"
            && original["protocol"] == "udp"
            && original["backend"] == backend.as_str()
            && original["snat"] == true
            && original["state"] == "established"
            && original["expires_in_s"].as_u64().unwrap_or(0) > 0,
        "{original}"
    );
    ensure!(
        rows.iter()
            .any(|r| r["direction"] == "reply" && r["backend"] == backend.as_str()),
        "no reply-direction entry: {rows:?}"
    );
    let by_backend: Vec<serde_json::Value> = serde_json::from_str(&n1.debug(&[
        "conntrack",
        "--backend",
        &web.ip.to_string(),
        "-o",
        "json",
    ])?)?;
    ensure!(by_backend.len() >= 2, "{by_backend:?}");
    let other: Vec<serde_json::Value> = serde_json::from_str(&n1.debug(&[
        "conntrack",
        "--backend",
        "10.244.9.9",
        "-o",
        "json",
    ])?)?;
    ensure!(other.is_empty(), "{other:?}");
    let table = n1.debug(&["conntrack", "--service", "default/ctudp"])?;
    ensure!(
        table.starts_with("SCOPE") && table.contains(&backend) && table.contains("established"),
        "{table}"
    );
    ensure!(
        n1.debug(&["conntrack", "--service", "default/nope"])
            .is_err(),
        "an unknown Service must be an error"
    );
    Ok(())
}
