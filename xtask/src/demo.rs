//! `cargo xtask demo`: Twill end to end on a local 3-node lab, no Kubernetes needed.
//!
//! Three simulated nodes (network namespaces on a shared underlay), one `twill-agent` per node
//! reading Services/EndpointSlices/Nodes from a shared manifests directory (standing in for the
//! API server), an echo application of three pods created by the real `twill-cni`, and a
//! ClusterIP, a NodePort and a headless Service. Every step prints what it does and what it saw;
//! the lab is torn down at the end (also on failure or Ctrl-C of a step: the lab guard drops).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use twill_lab::{Lab, LabSpec, Pod, wait_for};

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_PORT: u16 = 30080;
const ECHO_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;

fn say(msg: &str) {
    println!("\n\x1b[1m▶ {msg}\x1b[0m");
}

fn show(out: &str) {
    for line in out.lines() {
        println!("    {line}");
    }
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::test::build(false)?;
    let started = Instant::now();
    let lab = Lab::new(LabSpec::nodes(3).with_external_client()).context("building the lab")?;
    let result = demo(&lab);
    say(&format!("tearing the lab down (run id {})", lab.run_id));
    drop(lab);
    match &result {
        Ok(()) => println!(
            "\ndemo finished in {:.0}s; nothing left behind (`ip netns list` is empty of twl-*)",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => println!(
            "\ndemo FAILED after {:.0}s: {e:#}",
            started.elapsed().as_secs_f64()
        ),
    }
    result
}

fn endpoint_slice(name: &str, service: &str, pods: &[(&Pod, &str)], ports: &str) -> String {
    let mut endpoints = String::new();
    for (p, node) in pods {
        let _ = write!(
            endpoints,
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {node}\n    targetRef: {{kind: Pod, namespace: demo, name: {}}}\n",
            p.ip, p.name
        );
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n{ports}endpoints:\n{endpoints}"
    )
}

fn demo(lab: &Lab) -> Result<()> {
    say("lab: 3 nodes on one underlay + an external client (all network namespaces)");
    for n in &lab.nodes {
        println!(
            "    {}  netns {}  node IP {}  pod CIDR {}",
            n.name, n.netns, n.ip, n.pod_cidr
        );
    }
    println!("    external client {}", lab.external().ip);

    say("starting twill-agent on every node (socket LB on the node cgroup, routes, CNI config)");
    let mut agents = Vec::new();
    for n in &lab.nodes {
        agents.push(n.start_agent(&[])?);
    }
    for (n, a) in lab.nodes.iter().zip(agents.iter_mut()) {
        wait_for(Duration::from_secs(30), "agent health", || {
            if !a.is_running() {
                bail!("agent on {} exited:\n{}", n.name, a.log());
            }
            let (code, out) = n.labtool(&[
                "http",
                "--to",
                "127.0.0.1:10256",
                "--path",
                "/livez",
                "--timeout-ms",
                "500",
            ])?;
            Ok((code == 0 && out.starts_with("status=200")).then_some(()))
        })
        .with_context(|| format!("agent on {} never became healthy", n.name))?;
        println!("    {}: agent healthy (/livez 200)", n.name);
    }
    let result = with_agents(lab);
    if result.is_err() {
        for (n, a) in lab.nodes.iter().zip(&agents) {
            let log = a.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            println!("\n    last lines of the agent log on {}:", n.name);
            for line in tail.iter().rev() {
                println!("      {line}");
            }
        }
    }
    for mut a in agents {
        a.stop()?;
    }
    result
}

/// Everything after the agents are healthy.
fn with_agents(lab: &Lab) -> Result<()> {
    say("creating pods through twill-cni: echo-0 on n0, echo-1 on n1, echo-2 on n2, client on n0");
    let echo: Vec<Pod> = (0..3)
        .map(|i| lab.node(i).add_pod(&format!("echo-{i}")))
        .collect::<Result<_>>()?;
    let client = lab.node(0).add_pod("client")?;
    for p in echo.iter().chain(std::iter::once(&client)) {
        println!("    {:<7} IP {}", p.name, p.ip);
    }
    for p in &echo {
        lab.serve(p, &p.name, Some(ECHO_PORT), Some(DNS_PORT))?;
    }

    say("pod → pod across nodes by real IP (routed, no NAT)");
    let (code, out) = client.labtool(&["tcp", "--to", &format!("{}:{ECHO_PORT}", echo[2].ip)])?;
    show(&out);
    if code != 0 {
        bail!("client on n0 could not reach echo-2 on n2");
    }

    apply_services(lab, &echo)?;
    let vip = format!("{CLUSTER_IP}:80");
    wait_for(Duration::from_secs(20), "the ClusterIP to answer", || {
        Ok((client
            .labtool(&["tcp", "--to", &vip, "--timeout-ms", "500"])?
            .0
            == 0)
            .then_some(()))
    })?;
    traffic(lab, &echo, &client)
}

/// The Services of the demo and their EndpointSlices, written to the lab's manifests directory.
fn apply_services(lab: &Lab, echo: &[Pod]) -> Result<()> {
    say("applying Services: echo (ClusterIP), echo-np (NodePort), echo-headless (headless)");
    let pods: Vec<(&Pod, &str)> = echo.iter().zip(["n0", "n1", "n2"]).collect();
    let services = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: http, port: 80, targetPort: {ECHO_PORT}, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: {DNS_PORT}, protocol: UDP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo-np, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {{name: http, port: 80, targetPort: {ECHO_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo-headless, namespace: demo}}\nspec:\n  clusterIP: None\n  ports:\n  - {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n"
    );
    let ports = format!(
        "- {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n- {{name: dns, port: {DNS_PORT}, protocol: UDP}}\n"
    );
    let slices = [
        endpoint_slice("echo-abc", "echo", &pods, &ports),
        endpoint_slice(
            "echo-np-abc",
            "echo-np",
            &pods,
            &format!("- {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n"),
        ),
        endpoint_slice(
            "echo-headless-abc",
            "echo-headless",
            &pods,
            &format!("- {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n"),
        ),
    ]
    .join("---\n");
    lab.apply_manifest("demo-services.yaml", &services)?;
    lab.apply_manifest("demo-endpointslices.yaml", &slices)?;
    Ok(())
}

/// ClusterIP (TCP and UDP), NodePort from outside, headless, and what the agent shows.
fn traffic(lab: &Lab, echo: &[Pod], client: &Pod) -> Result<()> {
    let vip = format!("{CLUSTER_IP}:80");

    say(&format!(
        "12 connections from the client pod to the ClusterIP {vip} (socket-level LB)"
    ));
    let (_, out) = client.labtool(&["tcp-loop", "--to", &vip, "--count", "12"])?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let counts: BTreeMap<String, u64> = serde_json::from_value(report["counts"].clone())?;
    for (pod, n) in &counts {
        println!(
            "    {pod:<7} {n:>2} {}",
            "#".repeat(usize::try_from(*n).unwrap_or(0))
        );
    }
    println!("    failures: {}", report["failures"]);
    let (_, out) = client.labtool(&["tcp", "--to", &vip])?;
    println!(
        "    the application sees the ClusterIP as its peer and the backend sees the pod's own IP:"
    );
    show(&out);

    say(&format!(
        "UDP (DNS pattern: unconnected sendto/recvfrom) to {CLUSTER_IP}:53"
    ));
    let (code, out) = client.labtool(&["udp", "--to", &format!("{CLUSTER_IP}:53")])?;
    show(&out);
    if code != 0 {
        println!("    (UDP via the ClusterIP failed)");
    }

    say(&format!(
        "from the external client (not a node) to NodePort {NODE_PORT} on every node"
    ));
    for n in &lab.nodes {
        let (code, out) = lab.external().labtool(&[
            "tcp",
            "--to",
            &format!("{}:{NODE_PORT}", n.ip),
            "--timeout-ms",
            "2000",
        ])?;
        println!(
            "    via {} ({}): {}",
            n.name,
            n.ip,
            if code == 0 {
                out
            } else {
                format!("FAILED {out}")
            }
        );
    }

    say("headless Service: no virtual IP is programmed; its pods are reached directly");
    let (_, out) = client.labtool(&["tcp", "--to", &format!("{}:{ECHO_PORT}", echo[1].ip)])?;
    show(&out);

    say("what the agent on n0 programmed (`twill-agent debug services`)");
    match lab.node(0).debug(&["services"]) {
        Ok(out) => show(&out),
        Err(e) => println!("    debug CLI failed: {e:#}"),
    }
    say("datapath verdict counters on n0 (`twill-agent debug drops`)");
    match lab.node(0).debug(&["drops"]) {
        Ok(out) => show(&out),
        Err(e) => println!("    debug CLI failed: {e:#}"),
    }
    Ok(())
}
