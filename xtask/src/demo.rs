//! `cargo xtask demo`: Twill end to end on a local 3-node lab, no Kubernetes needed.
//!
//! Three simulated nodes (network namespaces on a shared underlay), one `twill-agent` per node
//! reading Services/EndpointSlices/Nodes from a shared manifests directory (standing in for the
//! API server), an echo application of three pods created by the real `twill-cni`, and a
//! ClusterIP (dual-stack: it answers on an IPv4 and an IPv6 ClusterIP), a NodePort and a
//! headless Service, their names (and an ExternalName) answered by
//! the node-local DNS responder, then a default-deny NetworkPolicy and an allow rule taking
//! effect. Every step prints what it does and what it saw;
//! the lab is torn down at the end (also on failure or Ctrl-C of a step: the lab guard drops).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use twill_lab::{Lab, LabSpec, Pod, wait_for};

const CLUSTER_IP: &str = "10.96.0.10";
/// The echo Service's IPv6 ClusterIP (dual-stack, from the secondary Service range).
const CLUSTER_IP6: &str = "fd00:10:96::10";
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
    let lab = Lab::new(LabSpec::nodes(3).with_external_client().with_dual_stack())
        .context("building the lab")?;
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
    endpoint_slice_of("IPv4", name, service, pods, ports)
}

/// An EndpointSlice of `family` (`addressType`): the pods' addresses of that family.
fn endpoint_slice_of(
    family: &str,
    name: &str,
    service: &str,
    pods: &[(&Pod, &str)],
    ports: &str,
) -> String {
    let mut endpoints = String::new();
    for (p, node) in pods {
        let addr = if family == "IPv6" {
            p.ip6.map(|a| a.to_string()).unwrap_or_default()
        } else {
            p.ip.to_string()
        };
        let _ = write!(
            endpoints,
            "  - addresses: [\"{addr}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {node}\n    targetRef: {{kind: Pod, namespace: demo, name: {}}}\n",
            p.name
        );
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n{ports}endpoints:\n{endpoints}"
    )
}

fn demo(lab: &Lab) -> Result<()> {
    say("lab: 3 dual-stack nodes on one underlay + an external client (all network namespaces)");
    for n in &lab.nodes {
        println!(
            "    {}  netns {}  node IP {}  pod CIDRs {} {}",
            n.name,
            n.netns,
            n.ip,
            n.pod_cidr,
            n.pod_cidr6.map(|c| c.to_string()).unwrap_or_default()
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
        println!(
            "    {:<7} IPs {} {}",
            p.name,
            p.ip,
            p.ip6.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    for p in &echo {
        // On `[::]`: the echo pods answer on both of their addresses.
        lab.serve_dual(p, &p.name, Some(ECHO_PORT), Some(DNS_PORT))?;
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
    traffic(lab, &echo, &client)?;
    network_policy(lab, &echo, &client)
}

/// Whether `pod` gets an answer from `to` within half a second.
fn reaches(pod: &Pod, to: &str) -> Result<bool> {
    Ok(pod.labtool(&["tcp", "--to", to, "--timeout-ms", "500"])?.0 == 0)
}

/// Waits until `pod` → `to` is (or is not) answered; prints how long the change took.
fn wait_reach(pod: &Pod, to: &str, want: bool, since: Instant) -> Result<()> {
    wait_for(Duration::from_secs(20), "the policy to take effect", || {
        Ok((reaches(pod, to)? == want).then_some(()))
    })?;
    println!(
        "    client → {to}: {} ({:.1} s after the change was written)",
        if want { "answered" } else { "blocked" },
        since.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A default-deny ingress policy for the echo pods, then a rule letting the client in.
fn network_policy(lab: &Lab, echo: &[Pod], client: &Pod) -> Result<()> {
    say("NetworkPolicy: the pods as the API would list them (labels app=echo / app=client)");
    let mut items: Vec<serde_json::Value> = echo
        .iter()
        .map(|p| {
            p.pod_object(
                "demo",
                &p.name,
                &[("app", "echo")],
                &[("http", ECHO_PORT, "TCP")],
            )
        })
        .collect();
    items.push(client.pod_object("demo", "client", &[("app", "client")], &[]));
    items.push(
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    lab.apply_manifest("demo-pods.json", &serde_json::to_string_pretty(&list)?)?;
    let vip = format!("{CLUSTER_IP}:80");

    say("default-deny ingress for app=echo: the ClusterIP stops answering the client");
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: demo}\nspec:\n  podSelector: {matchLabels: {app: echo}}\n  policyTypes: [Ingress]\n";
    let since = Instant::now();
    lab.apply_manifest("demo-deny.yaml", deny)?;
    wait_reach(client, &vip, false, since)?;

    say("allow app=client on the named port http: judged against the backend pod, not the VIP");
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: demo}\nspec:\n  podSelector: {matchLabels: {app: echo}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: http}]\n";
    let since = Instant::now();
    lab.apply_manifest("demo-allow.yaml", allow)?;
    wait_reach(client, &vip, true, since)?;
    let (code, _) = lab.external().labtool(&[
        "tcp",
        "--to",
        &format!("{}:{NODE_PORT}", lab.node(1).ip),
        "--timeout-ms",
        "500",
    ])?;
    println!(
        "    external client → NodePort {NODE_PORT}: {}",
        if code == 0 {
            "answered (?)"
        } else {
            "blocked: only app=client may come in"
        }
    );

    say("why (`twill-agent debug explain --from demo/client --to demo/echo:80` on n1)");
    match lab
        .node(1)
        .debug(&["explain", "--from", "demo/client", "--to", "demo/echo:80"])
    {
        Ok(out) => show(&out),
        Err(e) => println!("    debug CLI failed: {e:#}"),
    }
    say("echo-1's effective rules (`twill-agent debug policy demo/echo-1` on n1)");
    match lab.node(1).debug(&["policy", "demo/echo-1"]) {
        Ok(out) => show(&out),
        Err(e) => println!("    debug CLI failed: {e:#}"),
    }
    say("policy drops and passes per node (`twill-agent debug drops`, policy rows)");
    for n in &lab.nodes {
        match n.debug(&["drops"]) {
            Ok(out) => {
                let rows: Vec<String> = out
                    .lines()
                    .filter(|l| l.starts_with("policy_"))
                    .filter_map(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        Some(format!("{}={}", cols.first()?, cols.last()?))
                    })
                    .collect();
                println!("    {}: {}", n.name, rows.join(" "));
            }
            Err(e) => println!("    {}: debug CLI failed: {e:#}", n.name),
        }
    }
    Ok(())
}

/// The Services of the demo and their EndpointSlices, written to the lab's manifests directory.
fn apply_services(lab: &Lab, echo: &[Pod]) -> Result<()> {
    say(
        "applying Services: echo (ClusterIP, dual-stack), echo-np (NodePort), echo-headless (headless)",
    );
    let pods: Vec<(&Pod, &str)> = echo.iter().zip(["n0", "n1", "n2"]).collect();
    let services = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}, \"{CLUSTER_IP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  ports:\n  - {{name: http, port: 80, targetPort: {ECHO_PORT}, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: {DNS_PORT}, protocol: UDP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo-np, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {{name: http, port: 80, targetPort: {ECHO_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo-headless, namespace: demo}}\nspec:\n  clusterIP: None\n  ports:\n  - {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n"
    );
    let ports = format!(
        "- {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n- {{name: dns, port: {DNS_PORT}, protocol: UDP}}\n"
    );
    let slices = [
        endpoint_slice("echo-abc", "echo", &pods, &ports),
        endpoint_slice_of("IPv6", "echo-v6-abc", "echo", &pods, &ports),
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

/// The node-local DNS responder (169.254.20.10, which the agent added to each node): the
/// Service's name and an ExternalName, asked from the client pod, and the pod's DNS settings as
/// twill-cni handed them to the runtime.
fn dns(lab: &Lab, client: &Pod) -> Result<()> {
    const NODE_LOCAL_DNS: &str = "169.254.20.10:53";
    lab.apply_manifest(
        "demo-externalname.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: docs, namespace: demo}\nspec: {type: ExternalName, externalName: docs.example.com}\n",
    )?;
    say(&format!(
        "DNS from the client pod via the node-local responder {NODE_LOCAL_DNS}"
    ));
    println!(
        "    the pod's resolver settings in twill-cni's result: {}",
        client.result["dns"]
    );
    for (name, qtype) in [
        ("echo.demo.svc.cluster.local", "A"),
        ("_http._tcp.echo.demo.svc.cluster.local", "SRV"),
        ("docs.demo.svc.cluster.local", "A"),
    ] {
        // The ExternalName may land a moment after the Services above: wait for its answer.
        let mut out = String::new();
        wait_for(Duration::from_secs(20), "the DNS answer", || {
            let (code, o) = client.labtool(&[
                "dns",
                "--to",
                NODE_LOCAL_DNS,
                "--name",
                name,
                "--type",
                qtype,
            ])?;
            out = o;
            Ok((code == 0 && out.lines().count() > 1).then_some(()))
        })
        .with_context(|| format!("{name} {qtype}: {out}"))?;
        println!("    {name} {qtype}:");
        show(&out);
    }
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
        "the same Service on its IPv6 ClusterIP [{CLUSTER_IP6}]:80 (AF_INET6 socket, connect6)"
    ));
    let vip6 = format!("[{CLUSTER_IP6}]:80");
    let (_, out) = client.labtool(&["tcp-loop", "--to", &vip6, "--count", "12"])?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let counts: BTreeMap<String, u64> = serde_json::from_value(report["counts"].clone())?;
    for (pod, n) in &counts {
        println!(
            "    {pod:<7} {n:>2} {}",
            "#".repeat(usize::try_from(*n).unwrap_or(0))
        );
    }
    println!("    failures: {}", report["failures"]);
    let (_, out) = client.labtool(&["tcp", "--to", &vip6])?;
    println!(
        "    peer: the IPv6 ClusterIP (getpeername6); the backend sees the pod's IPv6 address:"
    );
    show(&out);
    let (_, out) = client.labtool(&["udp", "--to", &format!("[{CLUSTER_IP6}]:53")])?;
    println!("    UDP over IPv6 (sendmsg6/recvmsg6: the reply comes from the ClusterIP):");
    show(&out);

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

    dns(lab, client)?;

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
