//! Lab e2e of the agent's node-local DNS responder, named after the upstream DNS e2e tests
//! (kubernetes/kubernetes test/e2e/network/dns.go). The lab has no resolver: pods ask the agent
//! directly with `labtool dns` (hickory-proto wire format), over UDP and TCP.
mod agent_common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{start_agent, wait_for};
use anyhow::{Context, Result, ensure};
use twill_lab::{Lab, LabSpec, Pod, require};

/// rcode numbers as `labtool dns` prints them.
const NOERROR: &str = "rcode=0";
const NXDOMAIN: &str = "rcode=3";

/// Starts node 0's agent with DNS on its underlay address (reachable from its pods through
/// their default route) and returns that address.
fn dns_agent(lab: &Lab) -> Result<(agent_common::AgentProc, String)> {
    let addr = format!("{}:53", lab.node(0).ip);
    let agent = start_agent(lab, 0, &["--dns-bind-address", &addr, "--dns-ttl", "7"])?;
    Ok((agent, addr))
}

/// `labtool dns` from `pod`: (stdout lines). Fails on a timeout or a client error.
fn ask(pod: &Pod, server: &str, name: &str, qtype: &str, tcp: bool) -> Result<Vec<String>> {
    let mut args = vec!["dns", "--to", server, "--name", name, "--type", qtype];
    if tcp {
        args.push("--tcp");
    }
    let (code, out) = pod.labtool(&args)?;
    ensure!(code == 0, "labtool dns {name} {qtype} exited {code}: {out}");
    Ok(out.lines().map(str::to_owned).collect())
}

/// Waits until `name`/`qtype` answers exactly `want` (rcode line first, then sorted records).
fn wait_answer(pod: &Pod, server: &str, name: &str, qtype: &str, want: &[&str]) -> Result<()> {
    let mut last = Vec::new();
    wait_for(
        &format!("{name} {qtype} → {want:?}"),
        Duration::from_secs(20),
        || {
            let mut got = ask(pod, server, name, qtype, false)?;
            got[1..].sort();
            last.clone_from(&got);
            Ok(got == want)
        },
    )
    .with_context(|| format!("last answer: {last:?}"))
}

fn headless_manifest(svc: &str, eps: &[(Ipv4Addr, Option<&str>, bool)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: default}}\n\
         spec: {{clusterIP: None, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {svc}-1, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for (ip, hostname, ready) in eps {
        let _ = writeln!(
            y,
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}"
        );
        if let Some(h) = hostname {
            let _ = writeln!(y, "  hostname: {h}");
        }
    }
    y
}

/// "should provide DNS for services": a ClusterIP Service (A, SRV, PTR), a headless Service
/// (every ready endpoint, none of the others), NXDOMAIN for a missing one; UDP and TCP.
#[test]
fn should_provide_dns_for_services() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let client = lab.node(0).add_pod("client")?;
    lab.apply_manifest(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n",
    )?;
    let ready = [Ipv4Addr::new(10, 244, 0, 21), Ipv4Addr::new(10, 244, 0, 22)];
    lab.apply_manifest(
        "hl.yaml",
        &headless_manifest(
            "hl",
            &[
                (ready[0], None, true),
                (ready[1], None, true),
                (Ipv4Addr::new(10, 244, 0, 23), None, false),
            ],
        ),
    )?;
    let (_agent, dns) = dns_agent(&lab)?;
    let web = "web.default.svc.cluster.local";
    wait_answer(&client, &dns, web, "A", &[NOERROR, "A 10.96.0.10"])?;
    ensure!(
        ask(&client, &dns, web, "A", true)? == [NOERROR, "A 10.96.0.10"],
        "over TCP"
    );
    wait_answer(
        &client,
        &dns,
        "_http._tcp.web.default.svc.cluster.local",
        "SRV",
        &[NOERROR, "SRV 0 100 80 web.default.svc.cluster.local."],
    )?;
    wait_answer(
        &client,
        &dns,
        "10.0.96.10.in-addr.arpa",
        "PTR",
        &[NOERROR, "PTR web.default.svc.cluster.local."],
    )?;
    wait_answer(
        &client,
        &dns,
        "hl.default.svc.cluster.local",
        "A",
        &[NOERROR, "A 10.244.0.21", "A 10.244.0.22"],
    )?;
    wait_answer(
        &client,
        &dns,
        "nope.default.svc.cluster.local",
        "A",
        &[NXDOMAIN],
    )?;
    // A name that exists, without records of the type: NODATA.
    wait_answer(&client, &dns, web, "AAAA", &[NOERROR])?;
    // `debug dns` answers from the table the responder serves.
    let out = lab
        .node(0)
        .debug(&["dns", "hl.default.svc.cluster.local"])?;
    ensure!(
        out.trim() == "answer\nA 10.244.0.21\nA 10.244.0.22",
        "debug dns: {out:?}"
    );
    let out = lab
        .node(0)
        .debug(&["dns", "nope.default.svc.cluster.local"])?;
    ensure!(out.trim() == "NXDOMAIN", "debug dns: {out:?}");
    Ok(())
}

/// "should provide DNS for ExternalName services": a CNAME, which follows a change of the
/// external name.
#[test]
fn should_provide_dns_for_externalname_services() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let client = lab.node(0).add_pod("client")?;
    let ext = |target: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns-test-service-3, namespace: default}}\n\
             spec: {{type: ExternalName, externalName: {target}}}\n"
        )
    };
    lab.apply_manifest("ext.yaml", &ext("foo.example.com"))?;
    let (_agent, dns) = dns_agent(&lab)?;
    let name = "dns-test-service-3.default.svc.cluster.local";
    wait_answer(
        &client,
        &dns,
        name,
        "CNAME",
        &[NOERROR, "CNAME foo.example.com."],
    )?;
    // An A question gets the CNAME too (the resolver follows it).
    wait_answer(
        &client,
        &dns,
        name,
        "A",
        &[NOERROR, "CNAME foo.example.com."],
    )?;
    lab.apply_manifest("ext.yaml", &ext("bar.example.com"))?;
    wait_answer(
        &client,
        &dns,
        name,
        "CNAME",
        &[NOERROR, "CNAME bar.example.com."],
    )?;
    Ok(())
}

/// "should provide DNS for pods for Hostname and Subdomain": an endpoint with a hostname under a
/// headless Service is `<hostname>.<subdomain>.<ns>.svc.<zone>`; pods are `a-b-c-d.<ns>.pod.<zone>`.
#[test]
fn should_provide_dns_for_pods_for_hostname_and_subdomain() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let client = lab.node(0).add_pod("client")?;
    let ip = client.ip;
    lab.apply_manifest(
        "sub.yaml",
        &headless_manifest("dns-test-service-2", &[(ip, Some("dns-querier-2"), true)]),
    )?;
    let (_agent, dns) = dns_agent(&lab)?;
    let a = format!("A {ip}");
    wait_answer(
        &client,
        &dns,
        "dns-querier-2.dns-test-service-2.default.svc.cluster.local",
        "A",
        &[NOERROR, &a],
    )?;
    let dashed = ip.to_string().replace('.', "-");
    wait_answer(
        &client,
        &dns,
        &format!("{dashed}.default.pod.cluster.local"),
        "A",
        &[NOERROR, &a],
    )?;
    let o = ip.octets();
    wait_answer(
        &client,
        &dns,
        &format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]),
        "PTR",
        &[
            NOERROR,
            "PTR dns-querier-2.dns-test-service-2.default.svc.cluster.local.",
        ],
    )?;
    Ok(())
}

/// Malformed datagrams are dropped and the responder keeps answering (and the agent keeps
/// serving).
#[test]
fn malformed_dns_queries_leave_the_responder_answering() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let client = lab.node(0).add_pod("client")?;
    lab.apply_manifest(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
    )?;
    let (mut agent, dns) = dns_agent(&lab)?;
    let web = "web.default.svc.cluster.local";
    wait_answer(&client, &dns, web, "A", &[NOERROR, "A 10.96.0.10"])?;
    for _ in 0..20 {
        let (code, out) = client.labtool(&["dns", "--to", &dns, "--garbage"])?;
        ensure!(code == 0, "labtool dns --garbage: {out}");
    }
    ensure!(
        ask(&client, &dns, web, "A", false)? == [NOERROR, "A 10.96.0.10"],
        "UDP after garbage"
    );
    ensure!(
        ask(&client, &dns, web, "A", true)? == [NOERROR, "A 10.96.0.10"],
        "TCP after garbage"
    );
    ensure!(agent.is_running(), "the agent died: {}", agent.log());
    Ok(())
}
