//! Lab e2e of eBPF host routing (the fast path) through the real agents: pod → pod on one node
//! is delivered by `bpf_redirect_peer` from the sender's veth, pod → pod across nodes leaves
//! with `bpf_redirect_neigh` after a FIB lookup and enters the receiver with `bpf_redirect_peer`
//! from the device, in direct and VXLAN modes; the receiver's NetworkPolicy ingress is still
//! judged although its veth hook is skipped; `--host-routing=false` leaves it all to the stack.
//! The counters come from `twill-agent debug fastpath -o json`, the kernel's own per-reason
//! counters.
mod agent_common;

use std::time::Duration;

use agent_common::{AgentProc, start_agent, tcp, wait_for};
use anyhow::{Context as _, Result, ensure};
use twill_lab::{Lab, LabSpec, Node, Pod, require};

fn view(node: &Node) -> Result<serde_json::Value> {
    let out = node.debug(&["fastpath", "-o", "json"])?;
    serde_json::from_str(&out).with_context(|| format!("debug fastpath: {out}"))
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or(0)
}

/// A verdict counter of `twill-agent debug drops` (every reason, not only the fast path's).
fn verdicts(node: &Node, reason: &str) -> Result<u64> {
    let out = node.debug(&["drops", "-o", "json"])?;
    let rows: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("debug drops: {out}"))?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["reason"] == reason)
        .and_then(|r| r["count"].as_u64())
        .unwrap_or(0))
}

/// Waits until `node`'s agent lists `pod` as an endpoint with a known MAC (learnt from the
/// neighbour entry the stack's first ARP made).
fn wait_endpoint_mac(node: &Node, pod: &Pod) -> Result<()> {
    let prefix = format!("{} ", pod.ip);
    wait_for(
        &format!("{} with its MAC in {}'s endpoints", pod.ip, node.name),
        Duration::from_secs(20),
        || {
            let v = view(node)?;
            Ok(v["endpoints"].as_array().into_iter().flatten().any(|e| {
                e.as_str()
                    .is_some_and(|e| e.starts_with(&prefix) && !e.contains("unknown"))
            }))
        },
    )
}

/// `n` connections from `from` to `to`, each answered by `name` and seeing `from`'s own IP.
fn connections(from: &Pod, to: &Pod, name: &str, n: usize) -> Result<()> {
    let addr = format!("{}:8080", to.ip);
    for _ in 0..n {
        let (code, out) = tcp(from, &addr)?;
        ensure!(
            code == 0 && out.starts_with(&format!("reply={name} {}:", from.ip)),
            "{} → {addr}: {out}",
            from.ip
        );
    }
    Ok(())
}

struct Setup {
    a: Pod,
    b: Pod,
    c: Pod,
    _agents: Vec<AgentProc>,
    lab: Lab,
}

/// Pods a, b on n0 and c on n1 (b and c serve TCP 8080), an agent per node with `extra`, and
/// a first connection a → b and a → c.
fn setup(spec: LabSpec, extra: &[&str]) -> Result<Option<Setup>> {
    let Some(lab) = require(spec)? else {
        return Ok(None);
    };
    let agents = (0..2)
        .map(|i| start_agent(&lab, i, extra))
        .collect::<Result<Vec<_>>>()?;
    let a = lab.node(0).add_pod("a")?;
    let b = lab.node(0).add_pod("b")?;
    let c = lab.node(1).add_pod("c")?;
    lab.serve(&b, "b", Some(8080), None)?;
    lab.serve(&c, "c", Some(8080), None)?;
    for (to, name) in [(&b, "b"), (&c, "c")] {
        let addr = format!("{}:8080", to.ip);
        wait_for(&format!("a → {name}"), Duration::from_secs(20), || {
            Ok(tcp(&a, &addr)?.0 == 0)
        })?;
    }
    Ok(Some(Setup {
        a,
        b,
        c,
        _agents: agents,
        lab,
    }))
}

fn pods_take_the_fast_path(spec: LabSpec, extra: &[&str]) -> Result<()> {
    let Some(s) = setup(spec, extra)? else {
        return Ok(());
    };
    let (n0, n1) = (s.lab.node(0), s.lab.node(1));
    wait_endpoint_mac(n0, &s.b)?;
    wait_endpoint_mac(n0, &s.a)?;
    wait_endpoint_mac(n1, &s.c)?;

    // Same node: every packet of both directions is redirected from one veth into the other
    // pod, none is left to the stack.
    let before = view(n0)?;
    connections(&s.a, &s.b, "b", 10)?;
    let after = view(n0)?;
    let peer =
        counter(&after, "fastpath_redirect_peer") - counter(&before, "fastpath_redirect_peer");
    // A connection is at least SYN, SYN-ACK, ACK, request, reply, FIN, FIN, ACK.
    ensure!(
        peer >= 10 * 6,
        "redirect_peer grew by {peer} for 10 connections: {after}"
    );

    // Across nodes: out through the FIB's device on n0, into c from n1's device.
    let (b0, b1) = (view(n0)?, view(n1)?);
    connections(&s.a, &s.c, "c", 10)?;
    let (a0, a1) = (view(n0)?, view(n1)?);
    let neigh0 = counter(&a0, "fastpath_redirect_neigh") - counter(&b0, "fastpath_redirect_neigh");
    let peer1 = counter(&a1, "fastpath_redirect_peer") - counter(&b1, "fastpath_redirect_peer");
    let neigh1 = counter(&a1, "fastpath_redirect_neigh") - counter(&b1, "fastpath_redirect_neigh");
    ensure!(neigh0 >= 10 * 3, "n0 redirect_neigh grew by {neigh0}: {a0}");
    ensure!(peer1 >= 10 * 3, "n1 redirect_peer grew by {peer1}: {a1}");
    ensure!(
        neigh1 >= 10 * 3,
        "n1 redirect_neigh (c's replies) grew by {neigh1}: {a1}"
    );
    // And back into a on n0 from the device.
    let peer0 = counter(&a0, "fastpath_redirect_peer") - counter(&b0, "fastpath_redirect_peer");
    ensure!(
        peer0 >= 10 * 3,
        "n0 redirect_peer (c's replies) grew by {peer0}: {a0}"
    );

    let table = n0.debug(&["fastpath"])?;
    ensure!(
        table.contains("host routing: ebpf") && table.contains(&s.b.ip.to_string()),
        "debug fastpath: {table}"
    );
    Ok(())
}

#[test]
fn pods_on_one_node_and_across_nodes_take_the_fast_path() -> Result<()> {
    pods_take_the_fast_path(LabSpec::nodes(2), &[])
}

#[test]
fn pods_across_the_vxlan_overlay_take_the_fast_path() -> Result<()> {
    pods_take_the_fast_path(LabSpec::nodes(2), &["--routing-mode", "vxlan"])
}

/// The receiver's host veth hook never sees a redirected packet: its ingress policy is judged
/// on the sender's veth instead, so a default-deny ingress on b stops a on the same node, and
/// lifting it lets a through again.
#[test]
fn a_redirected_packet_is_still_judged_by_the_receivers_ingress_policy() -> Result<()> {
    let Some(s) = setup(LabSpec::nodes(2), &[])? else {
        return Ok(());
    };
    let n0 = s.lab.node(0);
    wait_endpoint_mac(n0, &s.b)?;
    let objects: Vec<serde_json::Value> = [(&s.a, "a"), (&s.b, "b")]
        .iter()
        .map(|(p, name)| p.pod_object("default", name, &[("app", name)], &[]))
        .collect();
    s.lab.apply_manifest(
        "pods.yaml",
        &serde_json::to_string(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}),
        )?,
    )?;
    let to_b = format!("{}:8080", s.b.ip);
    let before = verdicts(n0, "policy_denied_ingress")?;
    s.lab.apply_manifest(
        "deny-b.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-b, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n",
    )?;
    wait_for("a → b denied", Duration::from_secs(20), || {
        Ok(tcp(&s.a, &to_b)?.0 != 0)
    })?;
    let after = verdicts(n0, "policy_denied_ingress")?;
    ensure!(
        after > before,
        "no ingress denial counted on n0 ({before} → {after})"
    );
    // c on the other node is not affected.
    connections(&s.a, &s.c, "c", 1)?;
    s.lab.delete_manifest("deny-b.yaml")?;
    wait_for("a → b allowed again", Duration::from_secs(20), || {
        Ok(tcp(&s.a, &to_b)?.0 == 0)
    })?;
    connections(&s.a, &s.b, "b", 3)?;
    Ok(())
}

/// `--host-routing=false`: the stack routes every packet, and the fast path counts nothing.
#[test]
fn host_routing_off_leaves_every_packet_to_the_stack() -> Result<()> {
    let Some(s) = setup(LabSpec::nodes(2), &["--host-routing=false"])? else {
        return Ok(());
    };
    connections(&s.a, &s.b, "b", 5)?;
    connections(&s.a, &s.c, "c", 5)?;
    for node in [s.lab.node(0), s.lab.node(1)] {
        let v = view(node)?;
        ensure!(v["host_routing"] == false, "{v}");
        for (name, count) in v["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c[0].as_str()?, c[1].as_u64()?)))
            // The view also shows the masquerade's counters, which run whatever the host
            // routing (and count, e.g., the nodes' own MLD reports with their hop-by-hop header).
            .filter(|(name, _)| name.starts_with("fastpath_"))
        {
            ensure!(
                count == 0,
                "{}: {name} = {count} with host routing off",
                node.name
            );
        }
    }
    Ok(())
}

/// With the default flags the masquerade is eBPF's: a pod's connection to a host outside the
/// cluster leaves with the node's address and a port of the masquerade range, its replies come
/// back, and the node holds no Twill rule in nftables or iptables (checked inside the lab node's
/// network namespace) and no netfilter conntrack entry for the flow.
#[test]
fn pod_egress_is_masqueraded_in_ebpf_with_no_netfilter_rule_on_the_node() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let ext = lab.external();
    let mut serve = ext.cmd(twill_lab::bin("labtool"));
    serve.args([
        "serve", "--name", "outside", "--tcp", "9090", "--udp", "9091",
    ]);
    lab.track(twill_lab::spawn_and_wait_ready(serve)?);
    let p0 = lab.node(0).add_pod("egress")?;
    let p1 = lab.node(1).add_pod("peer")?;
    lab.serve(&p1, "peer", Some(8080), None)?;
    let _agents = (0..2)
        .map(|i| start_agent(&lab, i, &[]))
        .collect::<Result<Vec<_>>>()?;
    let n0 = lab.node(0);
    let outside = format!("{}:9090", ext.ip);
    let mut out = String::new();
    wait_for("pod → outside host", Duration::from_secs(20), || {
        let (code, o) = tcp(&p0, &outside)?;
        out = o;
        Ok(code == 0)
    })?;
    let seen = out
        .strip_prefix(&format!("reply=outside {}:", n0.ip))
        .with_context(|| format!("not masqueraded to the node IP: {out}"))?;
    let port: u16 = seen.split_whitespace().next().unwrap_or("").parse()?;
    ensure!(
        (twill_common::MASQ_PORT_MIN..=twill_common::MASQ_PORT_MAX).contains(&port),
        "source port {port} outside the masquerade range: {out}"
    );
    for _ in 0..5 {
        let (code, o) = tcp(&p0, &outside)?;
        ensure!(
            code == 0 && o.starts_with(&format!("reply=outside {}:", n0.ip)),
            "{o}"
        );
    }
    let (code, o) = agent_common::udp(&p0, &format!("{}:9091", ext.ip), true)?;
    ensure!(
        code == 0 && o.starts_with(&format!("reply=outside {}:", n0.ip)),
        "UDP not masqueraded: {o}"
    );
    // Pod ↔ pod is never translated.
    let to_p1 = format!("{}:8080", p1.ip);
    let mut o = String::new();
    let reached = wait_for("pod → pod across nodes", Duration::from_secs(20), || {
        let (code, out) = tcp(&p0, &to_p1)?;
        o = out;
        Ok(code == 0)
    });
    ensure!(
        reached.is_ok() && o.starts_with(&format!("reply=peer {}:", p0.ip)),
        "pod → pod: {o}\nn0: {}\nn1: {}\n{}",
        n0.debug(&["fastpath"])?,
        lab.node(1).debug(&["fastpath"])?,
        n0.debug(&["drops"])?
    );
    let v = view(n0)?;
    ensure!(v["masquerade"] == "ebpf", "{v}");
    ensure!(counter(&v, "masq_snat") >= 7, "masquerade counters: {v}");
    // No netfilter on the node: no Twill table, no Twill or kube-proxy rule, and the egress
    // flows are not in netfilter's conntrack.
    let ruleset = n0.run(&["nft", "list", "ruleset"])?;
    ensure!(!ruleset.contains("twill"), "nft ruleset: {ruleset}");
    for save in ["iptables-save", "iptables-legacy-save"] {
        let rules = n0.run(&[save])?;
        ensure!(
            !rules.to_lowercase().contains("twill") && !rules.contains("KUBE-"),
            "{save}: {rules}"
        );
    }
    let ct = n0
        .cmd("conntrack")
        .args(["-L", "-s", &p0.ip.to_string()])
        .output()?;
    let ct = String::from_utf8_lossy(&ct.stdout);
    ensure!(!ct.contains("dport=9090"), "tracked by netfilter: {ct}");
    Ok(())
}

/// One node with the default flags (eBPF masquerade) and an external client; a pod `name` on
/// it, its agent running.
fn masq_lab(name: &str) -> Result<Option<(Lab, Pod, AgentProc)>> {
    let Some(lab) = require(LabSpec::nodes(1).with_external_client())? else {
        return Ok(None);
    };
    let pod = lab.node(0).add_pod(name)?;
    let agent = start_agent(&lab, 0, &[])?;
    Ok(Some((lab, pod, agent)))
}

/// A pod's ping to a host outside the cluster is masqueraded by the eBPF masquerade, its echo
/// identifier taking the place of the port: the outside host, which has no route to the pods,
/// answers the node, and the replies are translated back to the pod. Before, ICMP echo left
/// with the pod's address and its replies went nowhere.
#[test]
fn a_pods_ping_to_outside_the_cluster_is_masqueraded_in_ebpf() -> Result<()> {
    let Some((lab, pod, _agent)) = masq_lab("pinger")? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let ext = lab.external().ip.to_string();
    let ping = || -> Result<(bool, String)> {
        let out = pod
            .cmd("ping")
            .args(["-n", "-c", "3", "-i", "0.2", "-W", "2", &ext])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let mut last = String::new();
    let reached = wait_for(
        "pod pings the outside host",
        Duration::from_secs(30),
        || {
            let (ok, out) = ping()?;
            last = out;
            Ok(ok)
        },
    );
    ensure!(
        reached.is_ok(),
        "ping from the pod: {last}\n{}\n{}",
        n0.debug(&["fastpath"])?,
        n0.debug(&["drops"])?
    );
    let before = counter(&view(n0)?, "masq_snat");
    let (ok, out) = ping()?;
    ensure!(ok && out.contains("3 received"), "second ping: {out}");
    let v = view(n0)?;
    ensure!(
        counter(&v, "masq_snat") > before,
        "the ping opened no masqueraded flow: {v}"
    );
    // The flow is the eBPF table's: an ICMP entry towards the outside host.
    let ct = n0.debug(&["conntrack"])?;
    ensure!(
        ct.lines().any(|l| l.contains("icmp") && l.contains(&ext)),
        "no ICMP conntrack entry: {ct}"
    );
    Ok(())
}

/// An ICMP error about a pod's masqueraded ping reaches the pod, translated back as the
/// errors about TCP and UDP flows are: a router (here the outside host, with an `unreachable`
/// route) answers the node's address about the echo request with the masquerade's identifier;
/// the node rewrites the outer destination, the quoted source and the quoted identifier, and
/// `ping` in the pod reports the unreachable destination instead of silence. Before, only
/// errors quoting TCP or UDP were translated and the pod's ping timed out.
#[test]
fn an_icmp_error_about_a_pods_ping_reaches_the_pod() -> Result<()> {
    let Some((lab, pod, _agent)) = masq_lab("pinger")? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let ext = lab.external();
    // A documentation prefix behind the outside host, which has no way there.
    let unreachable = "203.0.113.0/24";
    n0.run(&[
        "ip",
        "route",
        "add",
        unreachable,
        "via",
        &ext.ip.to_string(),
    ])?;
    twill_lab::run_cmd(
        ext.cmd("ip")
            .args(["route", "add", "unreachable", unreachable]),
    )?;
    // A host that does not forward drops such a packet without a word (`ip_error`); a router
    // answers. (The outside host's own namespace: a lab one.)
    twill_lab::run_cmd(ext.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    let ping = || -> Result<String> {
        let out = pod
            .cmd("ping")
            .args(["-n", "-c", "1", "-W", "2", "203.0.113.5"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut last = String::new();
    let seen = wait_for("the error about the ping", Duration::from_secs(30), || {
        last = ping()?;
        Ok(last.contains("Unreachable"))
    });
    ensure!(
        seen.is_ok(),
        "ping from the pod got no error back: {last}\n{}\n{}",
        n0.debug(&["fastpath"])?,
        n0.debug(&["drops"])?
    );
    // It came from the router, about the pod's own ping.
    ensure!(
        last.contains(&format!("From {}", ext.ip)),
        "the error's source: {last}"
    );
    Ok(())
}

/// A client outside the cluster that reaches a pod's own address (routed to the node, no
/// Service) over UDP gets the pod's answer from the pod's address and port: the eBPF masquerade
/// recognizes it as a reply (the incoming datagram opened an untranslated flow) instead of
/// masquerading it as a new flow of the pod's, which the client would see come from the node's
/// address and a port it never talked to.
#[test]
fn a_pods_udp_reply_to_an_outside_client_is_not_masqueraded() -> Result<()> {
    let Some((lab, pod, _agent)) = masq_lab("udpsrv")? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    lab.serve(&pod, "udpsrv", None, Some(9091))?;
    let ext = lab.external();
    // First the masquerade is seen at work: the pod's own flow to the outside host leaves with
    // the node's address.
    let mut serve = ext.cmd(twill_lab::bin("labtool"));
    serve.args(["serve", "--name", "outside", "--udp", "9092"]);
    lab.track(twill_lab::spawn_and_wait_ready(serve)?);
    let outside = format!("{}:9092", ext.ip);
    let masqueraded = format!("reply=outside {}:", n0.ip);
    let mut out = String::new();
    let seen = wait_for(
        "pod → outside host, masqueraded",
        Duration::from_secs(30),
        || {
            let (code, o) = agent_common::udp(&pod, &outside, true)?;
            out = o;
            Ok(code == 0 && out.starts_with(&masqueraded))
        },
    );
    ensure!(seen.is_ok(), "pod → outside host: {out}");
    // The outside client routes this one pod address to its node (a lab namespace's route).
    let via = format!("{}/32", pod.ip);
    twill_lab::run_cmd(
        ext.cmd("ip")
            .args(["route", "add", &via, "via", &n0.ip.to_string()]),
    )?;
    let to = format!("{}:9091", pod.ip);
    let answered = wait_for(
        "outside client → pod over UDP",
        Duration::from_secs(30),
        || {
            let (code, o) = ext.labtool(&["udp", "--to", &to, "--timeout-ms", "1000"])?;
            out = o;
            Ok(code == 0)
        },
    );
    ensure!(
        answered.is_ok(),
        "no answer: {out}\n{}\n{}",
        n0.debug(&["fastpath"])?,
        n0.debug(&["drops"])?
    );
    ensure!(
        out.contains(&format!("from={to}")),
        "the pod's reply did not come from its own address: {out}"
    );
    // A connected socket accepts nothing but the address it sent to.
    let (code, o) = ext.labtool(&["udp", "--to", &to, "--timeout-ms", "2000", "--connected"])?;
    ensure!(code == 0, "connected client got no reply: {o}");
    let v = view(n0)?;
    ensure!(
        counter(&v, "masq_inbound") >= 1,
        "the incoming flow was not tracked: {v}"
    );
    Ok(())
}
