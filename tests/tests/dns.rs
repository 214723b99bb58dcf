//! Lab e2e of the agent's node-local DNS responder, named after the upstream DNS e2e tests
//! (kubernetes/kubernetes test/e2e/network/dns.go). Pods ask the agent directly with
//! `labtool dns` (hickory-proto wire format, UDP and TCP), or through glibc (`getent`) with the
//! resolv.conf a runtime writes from twill-cni's result. The upstream resolver, where a test
//! needs one, is dnsmasq in a lab pod serving a hosts file: nothing leaves the lab.
mod agent_common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{AgentProc, start_agent, wait_for};
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

/// One row of an answer table: `name`, `qtype` and the answer expected (rcode line first, then
/// the records sorted).
type Answer<'a> = (&'a str, &'a str, &'a [&'a str]);

/// [`wait_answer`] for every row of `table`, in order.
fn wait_answers(pod: &Pod, server: &str, table: &[Answer<'_>]) -> Result<()> {
    for (name, qtype, want) in table {
        wait_answer(pod, server, name, qtype, want)?;
    }
    Ok(())
}

/// Asks `name`/`qtype` once over UDP, then once over TCP: each must answer exactly `want`
/// (`when` says at which point of the test, for the failure message).
fn ask_udp_and_tcp(
    pod: &Pod,
    server: &str,
    (name, qtype, want): Answer<'_>,
    when: &str,
) -> Result<()> {
    for (tcp, transport) in [(false, "UDP"), (true, "TCP")] {
        let got = ask(pod, server, name, qtype, tcp)?;
        ensure!(got == want, "{transport} {when}: {got:?}");
    }
    Ok(())
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
    wait_answers(
        &client,
        &dns,
        &[
            (
                "_http._tcp.web.default.svc.cluster.local",
                "SRV",
                &[NOERROR, "SRV 0 100 80 web.default.svc.cluster.local."],
            ),
            (
                "10.0.96.10.in-addr.arpa",
                "PTR",
                &[NOERROR, "PTR web.default.svc.cluster.local."],
            ),
            (
                "hl.default.svc.cluster.local",
                "A",
                &[NOERROR, "A 10.244.0.21", "A 10.244.0.22"],
            ),
            ("nope.default.svc.cluster.local", "A", &[NXDOMAIN]),
            // A name that exists, without records of the type: NODATA.
            (web, "AAAA", &[NOERROR]),
        ],
    )?;
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
    wait_answers(
        &client,
        &dns,
        &[
            (name, "CNAME", &[NOERROR, "CNAME foo.example.com."]),
            // An A question gets the CNAME too (the resolver follows it).
            (name, "A", &[NOERROR, "CNAME foo.example.com."]),
        ],
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
    let pod_name = format!(
        "{}.default.pod.cluster.local",
        ip.to_string().replace('.', "-")
    );
    let o = ip.octets();
    let reverse = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    wait_answers(
        &client,
        &dns,
        &[
            (
                "dns-querier-2.dns-test-service-2.default.svc.cluster.local",
                "A",
                &[NOERROR, &a],
            ),
            (&pod_name, "A", &[NOERROR, &a]),
            (
                &reverse,
                "PTR",
                &[
                    NOERROR,
                    "PTR dns-querier-2.dns-test-service-2.default.svc.cluster.local.",
                ],
            ),
        ],
    )
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
    ask_udp_and_tcp(
        &client,
        &dns,
        (web, "A", &[NOERROR, "A 10.96.0.10"]),
        "after garbage",
    )?;
    ensure!(agent.is_running(), "the agent died: {}", agent.log());
    Ok(())
}

/// The node-local address the agent owns by default (NodeLocal DNSCache's).
const NODE_LOCAL: &str = "169.254.20.10:53";

/// Node 0's agent on its default DNS address, forwarding to `upstream` (an IP) when given.
fn node_local_agent(lab: &Lab, upstream: Option<&str>) -> Result<AgentProc> {
    if let Some(ip) = upstream {
        std::fs::write(lab.node(0).resolv_conf_path(), format!("nameserver {ip}\n"))?;
    }
    start_agent(lab, 0, &["--dns-ttl", "7"])
}

/// The resolv.conf a runtime writes from the CNI result's `dns` section, where `ip netns exec`
/// shows it to the pod (it bind-mounts `/etc/netns/<name>/` files over `/etc`). Removed on drop.
struct PodResolvConf(std::path::PathBuf);

impl PodResolvConf {
    fn write(pod: &Pod, extra_options: &[&str]) -> Result<Self> {
        let dns = &pod.result["dns"];
        let strings = |k: &str| -> Vec<String> {
            dns[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let servers = strings("nameservers");
        ensure!(
            !servers.is_empty(),
            "CNI result without dns: {}",
            pod.result
        );
        let mut conf = String::new();
        for s in servers {
            let _ = writeln!(conf, "nameserver {s}");
        }
        let _ = writeln!(conf, "search {}", strings("search").join(" "));
        let mut options = strings("options");
        options.extend(extra_options.iter().map(|s| (*s).to_owned()));
        let _ = writeln!(conf, "options {}", options.join(" "));
        let dir = std::path::Path::new("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        let guard = Self(dir);
        std::fs::write(guard.0.join("resolv.conf"), conf)?;
        Ok(guard)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adds a pod once the agent has rewritten the CNI config with its DNS settings.
fn add_pod_with_dns(lab: &Lab, name: &str) -> Result<Pod> {
    wait_for(
        "the agent's conflist carries dns",
        Duration::from_secs(20),
        || Ok(lab.node(0).plugin_conf()?.get("dns").is_some()),
    )?;
    lab.node(0).add_pod(name)
}

/// `getent <db> <name>` in the pod (glibc's resolver); stdout, or an error.
fn getent(pod: &Pod, db: &str, name: &str) -> Result<String> {
    // A bound on a stuck lookup, far above any healthy answer.
    pod.run(&["timeout", "20", "getent", db, name])
        .with_context(|| format!("getent {db} {name}"))
}

fn kubernetes_service() -> &'static str {
    "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: default}\n\
     spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443}]}\n"
}

/// The `kubernetes` Service's A question and answer.
const KUBERNETES_A: Answer<'static> = (
    "kubernetes.default.svc.cluster.local",
    "A",
    &[NOERROR, "A 10.96.0.1"],
);

/// The start of the node-local tests: the `kubernetes` Service, node 0's agent on the
/// node-local address with no upstream, and a pod `client` added once the agent's CNI config
/// carries its DNS settings; returns once the agent answers the client for that Service.
fn node_local_client(lab: &Lab) -> Result<(AgentProc, Pod)> {
    lab.apply_manifest("k.yaml", kubernetes_service())?;
    let agent = node_local_agent(lab, None)?;
    let client = add_pod_with_dns(lab, "client")?;
    wait_answers(&client, NODE_LOCAL, &[KUBERNETES_A])?;
    Ok((agent, client))
}

/// "should provide DNS for the cluster": the API Service's name resolves from a pod through
/// glibc with the nameserver, search list and ndots twill-cni handed the runtime, over the
/// node-local address the agent put on the node.
#[test]
fn should_provide_dns_for_the_cluster() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (_agent, client) = node_local_client(&lab)?;
    ensure!(
        client.result["dns"]
            == serde_json::json!({
                "nameservers": ["169.254.20.10"],
                "domain": "cluster.local",
                "search": ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"],
                "options": ["ndots:5"],
            }),
        "CNI dns section: {}",
        client.result["dns"]
    );
    let _conf = PodResolvConf::write(&client, &[])?;
    let out = getent(&client, "hosts", "kubernetes.default.svc.cluster.local")?;
    ensure!(out.starts_with("10.96.0.1 "), "getent: {out:?}");
    ask_udp_and_tcp(&client, NODE_LOCAL, KUBERNETES_A, "once resolved")?;
    Ok(())
}

/// "should resolve DNS of partially qualified names for the cluster": `kubernetes`,
/// `kubernetes.default` and `kubernetes.default.svc` through the pod's search list.
#[test]
fn should_resolve_dns_of_partially_qualified_names() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (_agent, client) = node_local_client(&lab)?;
    let _conf = PodResolvConf::write(&client, &[])?;
    for name in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
        let out = getent(&client, "hosts", name)?;
        ensure!(
            out.starts_with("10.96.0.1 ") && out.contains("kubernetes.default.svc.cluster.local"),
            "getent hosts {name}: {out:?}"
        );
    }
    Ok(())
}

/// glibc asks A and AAAA at once from one socket (getaddrinfo with AF_UNSPEC); the classic
/// conntrack race drops one of the two answers and the lookup waits out its timeout. With one
/// attempt and a timeout longer than the test's bound, a lost answer fails the lookup instead of
/// hiding in a retry. Every round must answer.
#[test]
fn parallel_a_and_aaaa_lookups_over_one_socket_never_stall() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (_agent, client) = node_local_client(&lab)?;
    let _conf = PodResolvConf::write(&client, &["attempts:1", "timeout:30"])?;
    wait_answer(
        &client,
        NODE_LOCAL,
        "kubernetes.default.svc.cluster.local",
        "AAAA",
        &[NOERROR],
    )?;
    for round in 0..40 {
        let out = getent(&client, "ahosts", "kubernetes.default.svc.cluster.local.")
            .with_context(|| format!("round {round}"))?;
        ensure!(out.starts_with("10.96.0.1 "), "round {round}: {out:?}");
    }
    Ok(())
}

/// Names outside the cluster go to the node's resolver (here dnsmasq in a lab pod) and come
/// back from the cache the second time; NXDOMAIN is relayed; an answer too big for UDP is
/// fetched upstream over TCP and reaches a TCP client whole; an ExternalName's A question gets
/// the target's addresses too (what a pod's glibc needs, since it does not follow CNAMEs).
#[test]
fn should_forward_names_outside_the_cluster_to_the_nodes_resolver() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let resolver = lab.node(0).add_pod("resolver")?;
    let mut hosts = String::from("10.77.0.1 www.example.test\n");
    for i in 1..=120 {
        let _ = writeln!(hosts, "10.77.1.{i} big.example.test");
    }
    // `example.test` is dnsmasq's local zone: other names there are NXDOMAIN.
    let upstream = lab.dnsmasq(&resolver, &hosts, &["--local=/example.test/"])?;
    lab.apply_manifest(
        "ext.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\n\
         spec: {type: ExternalName, externalName: www.example.test}\n",
    )?;
    let upstream_ip = upstream.trim_end_matches(":53").to_owned();
    let _agent = node_local_agent(&lab, Some(&upstream_ip))?;
    let client = add_pod_with_dns(&lab, "client")?;
    wait_answer(
        &client,
        NODE_LOCAL,
        "www.example.test",
        "A",
        &[NOERROR, "A 10.77.0.1"],
    )?;
    ensure!(
        ask(&client, NODE_LOCAL, "nope.example.test", "A", false)?[0] == NXDOMAIN,
        "NXDOMAIN relayed"
    );
    let big = ask(&client, NODE_LOCAL, "big.example.test", "A", true)?;
    ensure!(
        big[0] == NOERROR && big.len() == 121,
        "TCP: {} lines",
        big.len()
    );
    let mut ext = ask(
        &client,
        NODE_LOCAL,
        "ext.default.svc.cluster.local",
        "A",
        false,
    )?;
    ext[1..].sort();
    ensure!(
        ext == [NOERROR, "A 10.77.0.1", "CNAME www.example.test."],
        "ExternalName: {ext:?}"
    );
    // From a pod's glibc too, through the resolv.conf the runtime writes.
    let _conf = PodResolvConf::write(&client, &[])?;
    let out = getent(&client, "hosts", "ext")?;
    ensure!(out.starts_with("10.77.0.1 "), "getent hosts ext: {out:?}");
    let (code, metrics) =
        lab.node(0)
            .labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
    ensure!(code == 0, "metrics: {metrics}");
    let hits = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twill_dns_forward_cache_total{result=\"hit\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    ensure!(hits >= 1, "no cache hit counted:\n{metrics}");
    ensure!(
        metrics.contains("twill_dns_upstream_duration_seconds_count"),
        "no upstream latency:\n{metrics}"
    );
    Ok(())
}

/// Oversized datagrams and TCP messages, malformed packets and a flood of questions from one
/// socket: the responder keeps answering and the agent stays healthy.
#[test]
fn oversized_and_flooded_dns_queries_leave_the_responder_and_agent_healthy() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (mut agent, client) = node_local_client(&lab)?;
    for _ in 0..5 {
        let (code, out) = client.labtool(&["dns", "--to", NODE_LOCAL, "--oversized"])?;
        ensure!(code == 0, "labtool dns --oversized: {out}");
        let (code, out) = client.labtool(&["dns", "--to", NODE_LOCAL, "--garbage"])?;
        ensure!(code == 0, "labtool dns --garbage: {out}");
    }
    // Unique names (NXDOMAIN) and out-of-zone names (REFUSED without an upstream).
    for flood_name in [None, Some("flood.example.test.")] {
        let mut args = vec![
            "dns",
            "--to",
            NODE_LOCAL,
            "--flood",
            "20000",
            "--timeout-ms",
            "3000",
        ];
        if let Some(n) = flood_name {
            args.extend(["--name", n]);
        }
        let (code, out) = client.labtool(&args)?;
        ensure!(code == 0, "labtool dns --flood: {out}");
        ensure!(out.contains("answered="), "flood: {out}");
    }
    ask_udp_and_tcp(&client, NODE_LOCAL, KUBERNETES_A, "after the flood")?;
    ensure!(agent.is_running(), "the agent died: {}", agent.log());
    let (code, out) =
        lab.node(0)
            .labtool(&["http", "--to", "127.0.0.1:10256", "--path", "/healthz"])?;
    ensure!(code == 0 && out.starts_with("status=200"), "healthz: {out}");
    Ok(())
}
