//! Policy through Services: a connection to a frontend is judged as the connection to the
//! backend it reaches, the client's egress against the backend pod (never the frontend's
//! address), the backend's ingress against the address the packet arrives with.
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use twill_lab::LabSpec;

use super::agent_common::{ready, service, slice};
use super::{CONVERGE, Cluster, PROBE_TIMEOUT_MS, Reachability, policy};

/// A connection to a ClusterIP is judged as the connection to the backend it reaches: the
/// client's egress against the backend pod (never the virtual IP), the backend's ingress against
/// the real client (kube-router #905, Calico #1683 and #2088 are this confusion).
#[test]
fn should_judge_a_connection_to_a_cluster_ip_by_its_backend_and_real_client() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    let backend = c.pod("x", "b");
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 80);
    c.apply(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("web", vip, &[("http", 80, 80, "TCP")], "", &[]).replace("default", "x"),
            slice(
                "web",
                "web-1",
                &[ready(backend.ip, &backend.node)],
                &[("http", 80, "TCP")]
            )
            .replace("default", "x"),
        ),
    )?;
    // x/a may only talk to x/b (its egress names the pod, not the Service); x/b accepts only
    // y/a.
    c.apply(
        "p.yaml",
        &format!(
            "{}---\n{}",
            policy(
                "x",
                "a-egress-to-b",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - \
                 to:\n    - podSelector: {matchLabels: {pod: b}}\n",
            ),
            policy(
                "x",
                "b-ingress-from-x-a-and-y-a",
                "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from:\n    - \
                 podSelector: {matchLabels: {pod: a}}\n    - namespaceSelector: {matchLabels: \
                 {ns: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
            ),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.egress(("x", "a"), false)
        .ingress(("x", "b"), false)
        .set(("x", "a"), ("x", "b"), true)
        .set(("y", "a"), ("x", "b"), true);
    c.expect(&want, 80, false)?;
    let through_vip = |ns: &str, name: &str| -> Result<bool> {
        let (code, _) = c.pod(ns, name).labtool(&[
            "tcp",
            "--to",
            &format!("{vip}:80"),
            "--timeout-ms",
            PROBE_TIMEOUT_MS,
        ])?;
        Ok(code == 0)
    };
    ensure!(
        through_vip("x", "a")?,
        "x/a's egress to its allowed backend through the ClusterIP"
    );
    ensure!(
        through_vip("y", "a")?,
        "the backend's ingress saw the real client y/a"
    );
    ensure!(
        !through_vip("z", "a")?,
        "z/a is not allowed into the backend, ClusterIP or not"
    );
    // explain resolves the Service to its backend, as the datapath does.
    let explain = c.debug_on_node_of("x", "b", &["explain", "--from", "z/a", "--to", "x/web"])?;
    ensure!(
        explain.contains("via Service x/web")
            && explain.contains(&format!("{}:80  DENIED", backend.ip)),
        "{explain}"
    );
    Ok(())
}

/// NodePort traffic reaches a backend DNATed: with the backend on the node the client came in
/// through, the backend's ingress judges the real client; through another node (eTP=Cluster) it
/// judges that node's address, which the SNAT put there (the documented behaviour, tested).
#[test]
fn should_judge_nodeport_traffic_by_the_client_or_the_forwarding_node() -> Result<()> {
    let Some(c) = Cluster::with(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let (home, other) = backend_nodes(&c);
    c.apply(
        "svc.yaml",
        &web_service(
            &c,
            "  type: NodePort\n  ports:\n  - {name: http, port: 80, targetPort: 80, nodePort: 30081, \
             protocol: TCP}\n",
            "",
        ),
    )?;
    judged_by_the_address_the_backend_sees(
        &c,
        &format!("{}:30081", home.ip),
        &format!("{}:30081", other.ip),
    )
}

/// The same through a LoadBalancer ingress IP and an External IP: the outside world routes
/// the LoadBalancer IP to the backend's node (its client address stays) and the External IP to
/// the other node (which forwards it SNATed to its own address).
#[test]
fn should_judge_load_balancer_and_external_ip_traffic_by_the_client_or_the_forwarding_node()
-> Result<()> {
    let Some(c) = Cluster::with(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let (home, other) = backend_nodes(&c);
    let (lb_ip, external_ip) = ("192.0.2.80", "198.51.100.80");
    for (ip, via) in [(lb_ip, home.ip), (external_ip, other.ip)] {
        twill_lab::run_cmd(std::process::Command::new("ip").args([
            "-n",
            &c.lab.external().netns,
            "route",
            "add",
            ip,
            "via",
            &via.to_string(),
        ]))?;
    }
    c.apply(
        "svc.yaml",
        &web_service(
            &c,
            &format!(
                "  type: LoadBalancer\n  externalIPs: [{external_ip}]\n  ports:\n  - {{name: http, \
                 port: 80, targetPort: 80, nodePort: 30082, protocol: TCP}}\n"
            ),
            &format!("status:\n  loadBalancer:\n    ingress: [{{ip: {lb_ip}}}]\n"),
        ),
    )?;
    judged_by_the_address_the_backend_sees(&c, &format!("{lb_ip}:80"), &format!("{external_ip}:80"))
}

/// The nodes of the backend x/b and of no backend.
fn backend_nodes(c: &Cluster) -> (&twill_lab::Node, &twill_lab::Node) {
    let backend = &c.pod("x", "b").node;
    let node = |home: bool| {
        c.lab
            .nodes
            .iter()
            .find(|n| (&n.name == backend) == home)
            .expect("two nodes")
    };
    (node(true), node(false))
}

/// Service x/web (ClusterIP 10.96.0.81; `spec` holds its type, ports and frontends) with x/b
/// as its one backend.
fn web_service(c: &Cluster, spec: &str, status: &str) -> String {
    let backend = c.pod("x", "b");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\nspec:\n  \
         clusterIP: 10.96.0.81\n  clusterIPs: [10.96.0.81]\n{spec}{status}---\n{}",
        slice(
            "web",
            "web-1",
            &[ready(backend.ip, &backend.node)],
            &[("http", 80, "TCP")]
        )
        .replace("default", "x"),
    )
}

/// The external client reaches x/web through `via_home` (a frontend the outside world routes
/// to the backend's node) and `via_other` (one routed to the other node). With x/b admitting
/// only the client's address, only the first gets in; admitting the other node's address too
/// (what its SNAT puts there), both do.
fn judged_by_the_address_the_backend_sees(
    c: &Cluster,
    via_home: &str,
    via_other: &str,
) -> Result<()> {
    let (_, other) = backend_nodes(c);
    let external = c.lab.external().ip;
    let from_outside = |to: &str| -> Result<bool> {
        let (code, _) =
            c.lab
                .external()
                .labtool(&["tcp", "--to", to, "--timeout-ms", PROBE_TIMEOUT_MS])?;
        Ok(code == 0)
    };
    let wait_until = |what: &str, home: bool, other: bool| -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        while (from_outside(via_home)?, from_outside(via_other)?) != (home, other) {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    wait_until("both frontends to answer before any policy", true, true)?;
    let allow = |cidrs: &[String]| -> Result<()> {
        let mut blocks = String::new();
        for c in cidrs {
            let _ = writeln!(blocks, "    - ipBlock: {{cidr: {c}}}");
        }
        c.apply(
            "p.yaml",
            &policy(
                "x",
                "b-from-outside",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: b}}}}\n  ingress:\n  - from:\n{blocks}"
                ),
            ),
        )
    };
    allow(&[format!("{external}/32")])?;
    wait_until("the client through the backend's node only", true, false)?;
    allow(&[format!("{external}/32"), format!("{}/32", other.ip)])?;
    wait_until("the forwarding node's address admitted", true, true)?;
    // Between pods x/b admits none: its rule names only addresses outside the pod network.
    let mut want = Reachability::all(true);
    want.ingress(("x", "b"), false);
    c.expect(&want, 80, false)
}
