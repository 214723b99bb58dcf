//! Lab e2e of eBPF host routing (the fast path) through the real agents: pod → pod on one node
//! is delivered by `bpf_redirect_peer` from the sender's veth, pod → pod across nodes leaves
//! with `bpf_redirect_neigh` after a FIB lookup and enters the receiver with `bpf_redirect_peer`
//! from the device, in direct and VXLAN modes; the receiver's NetworkPolicy ingress is still
//! judged although its veth hook is skipped; `--host-routing=false` leaves it all to the stack.
//! The same over IPv6 on dual-stack labs (`fwd6.rs`): pod → pod on one node and across nodes
//! (direct, VXLAN), an IPv6 ClusterIP and an IPv6 NodePort to a local backend, ICMPv6 echo
//! redirected while an expiring hop limit and a packet over the output MTU take the stack (Time
//! Exceeded, Packet Too Big), Neighbour Discovery untouched. The counters come from
//! `twill-agent debug fastpath -o json`, the kernel's own per-reason counters (IPv6 deliveries
//! and forwards have their own, so these tests fail if IPv6 is not redirected).
mod agent_common;

use std::net::{IpAddr, SocketAddr};
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
    wait_endpoint_mac_of(node, IpAddr::V4(pod.ip))
}

/// [`wait_endpoint_mac`] for one of a pod's addresses (IPv6: learnt by Neighbour Discovery).
fn wait_endpoint_mac_of(node: &Node, addr: IpAddr) -> Result<()> {
    let prefix = format!("{addr} ");
    wait_for(
        &format!("{addr} with its MAC in {}'s endpoints", node.name),
        Duration::from_mins(1),
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
    connections_between(from, IpAddr::V4(from.ip), IpAddr::V4(to.ip), name, n)
}

/// `n` connections from the pod `from` (its address `src`) to `dst`:8080, each answered by
/// `name` and seeing `src`.
fn connections_between(from: &Pod, src: IpAddr, dst: IpAddr, name: &str, n: usize) -> Result<()> {
    let addr = SocketAddr::new(dst, 8080).to_string();
    // The reply names the peer as `ip:port` (IPv6: `[ip]:port`).
    let seen = SocketAddr::new(src, 0).to_string();
    let want = format!("reply={name} {}", seen.trim_end_matches('0'));
    for _ in 0..n {
        let (code, out) = tcp(from, &addr)?;
        ensure!(code == 0 && out.starts_with(&want), "{src} → {addr}: {out}");
    }
    Ok(())
}

/// A pod's IPv6 address (dual-stack labs).
fn v6(pod: &Pod) -> Result<IpAddr> {
    pod.ip6
        .map(IpAddr::V6)
        .with_context(|| format!("pod {} has no IPv6 address", pod.name))
}

/// How much the fast-path counter `name` grew from `before` to `after`.
fn grew(before: &serde_json::Value, after: &serde_json::Value, name: &str) -> u64 {
    counter(after, name).saturating_sub(counter(before, name))
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
    // A dual-stack lab's servers listen on both families.
    let dual = a.ip6.is_some();
    for (pod, name) in [(&b, "b"), (&c, "c")] {
        if dual {
            lab.serve_dual(pod, name, Some(8080), None)?;
        } else {
            lab.serve(pod, name, Some(8080), None)?;
        }
    }
    for (to, name) in [(&b, "b"), (&c, "c")] {
        let addrs = std::iter::once(IpAddr::V4(to.ip)).chain(to.ip6.map(IpAddr::V6));
        for ip in addrs {
            let addr = SocketAddr::new(ip, 8080).to_string();
            wait_for(
                &format!("a → {name} ({ip})"),
                Duration::from_mins(1),
                || Ok(tcp(&a, &addr)?.0 == 0),
            )?;
        }
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

/// Labels pods a and b (`app: a`, `app: b`) so that policies can select them.
fn label_pods(s: &Setup) -> Result<()> {
    let objects: Vec<serde_json::Value> = [(&s.a, "a"), (&s.b, "b")]
        .iter()
        .map(|(p, name)| p.pod_object("default", name, &[("app", name)], &[]))
        .collect();
    s.lab.apply_manifest(
        "pods.yaml",
        &serde_json::to_string(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}),
        )?,
    )
}

/// Denies every ingress of b until a's connections to `to_b` fail and node 0 counted the
/// denial, runs `meanwhile`, then lifts the policy and waits until a reaches `to_b` again.
fn with_b_denied(s: &Setup, to_b: &str, meanwhile: impl FnOnce() -> Result<()>) -> Result<()> {
    let n0 = s.lab.node(0);
    let before = verdicts(n0, "policy_denied_ingress")?;
    s.lab.apply_manifest(
        "deny-b.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-b, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n",
    )?;
    wait_for(
        &format!("a → {to_b} denied"),
        Duration::from_secs(20),
        || Ok(tcp(&s.a, to_b)?.0 != 0),
    )?;
    let after = verdicts(n0, "policy_denied_ingress")?;
    ensure!(
        after > before,
        "no ingress denial counted on n0 ({before} → {after})"
    );
    meanwhile()?;
    s.lab.delete_manifest("deny-b.yaml")?;
    wait_for(
        &format!("a → {to_b} allowed again"),
        Duration::from_secs(20),
        || Ok(tcp(&s.a, to_b)?.0 == 0),
    )
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
    label_pods(&s)?;
    let to_b = format!("{}:8080", s.b.ip);
    // c on the other node is not affected while b is denied.
    with_b_denied(&s, &to_b, || connections(&s.a, &s.c, "c", 1))?;
    connections(&s.a, &s.b, "b", 3)?;
    Ok(())
}

/// `--host-routing=false`: the stack routes every packet of both families, and the fast path
/// counts nothing (neither family's deliveries, forwards or fallbacks).
#[test]
fn host_routing_off_leaves_every_packet_to_the_stack() -> Result<()> {
    let Some(s) = setup(
        LabSpec::nodes(2).with_dual_stack(),
        &["--host-routing=false"],
    )?
    else {
        return Ok(());
    };
    connections(&s.a, &s.b, "b", 5)?;
    connections(&s.a, &s.c, "c", 5)?;
    let a6 = v6(&s.a)?;
    connections_between(&s.a, a6, v6(&s.b)?, "b", 5)?;
    connections_between(&s.a, a6, v6(&s.c)?, "c", 5)?;
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

/// Over IPv6 on a dual-stack lab: pod → pod on one node is delivered by `bpf_redirect_peer`
/// from the sender's veth, across nodes it leaves by `bpf_redirect_neigh` and enters the
/// receiver from the device by `bpf_redirect_peer` — every packet of both directions counted as
/// IPv6's own (`fastpath_redirect_peer6`, `fastpath_redirect_neigh6`) — and ICMPv6 echo takes
/// the same path.
fn ipv6_pods_take_the_fast_path(spec: LabSpec, extra: &[&str]) -> Result<Option<Setup>> {
    let Some(s) = setup(spec.with_dual_stack(), extra)? else {
        return Ok(None);
    };
    let (n0, n1) = (s.lab.node(0), s.lab.node(1));
    let (a6, b6, c6) = (v6(&s.a)?, v6(&s.b)?, v6(&s.c)?);
    // The first packets to each pod took the stack, whose Neighbour Discovery taught the node
    // the pods' MACs.
    wait_endpoint_mac_of(n0, b6)?;
    wait_endpoint_mac_of(n0, a6)?;
    wait_endpoint_mac_of(n1, c6)?;

    let before = view(n0)?;
    connections_between(&s.a, a6, b6, "b", 10)?;
    let after = view(n0)?;
    let peer = grew(&before, &after, "fastpath_redirect_peer6");
    // A connection is at least SYN, SYN-ACK, ACK, request, reply, FIN, FIN, ACK.
    ensure!(
        peer >= 10 * 6,
        "redirect_peer6 grew by {peer} for 10 IPv6 connections: {after}"
    );

    let (b0, b1) = (view(n0)?, view(n1)?);
    connections_between(&s.a, a6, c6, "c", 10)?;
    let (a0, a1) = (view(n0)?, view(n1)?);
    for (what, got) in [
        (
            "n0 redirect_neigh6",
            grew(&b0, &a0, "fastpath_redirect_neigh6"),
        ),
        (
            "n1 redirect_peer6",
            grew(&b1, &a1, "fastpath_redirect_peer6"),
        ),
        (
            "n1 redirect_neigh6 (c's replies)",
            grew(&b1, &a1, "fastpath_redirect_neigh6"),
        ),
        (
            "n0 redirect_peer6 (c's replies)",
            grew(&b0, &a0, "fastpath_redirect_peer6"),
        ),
    ] {
        ensure!(got >= 10 * 3, "{what} grew by {got}: n0 {a0}\nn1 {a1}");
    }

    // ICMPv6 echo across nodes: requests out by the FIB, replies delivered from the device.
    let before = view(n0)?;
    let out =
        s.a.cmd("ping")
            .args([
                "-6",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                &c6.to_string(),
            ])
            .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ping6 a → c: {text}");
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_redirect_neigh6") >= 3
            && grew(&before, &after, "fastpath_redirect_peer6") >= 3,
        "ICMPv6 echo not on the fast path: {after}"
    );

    let table = n0.debug(&["fastpath"])?;
    ensure!(
        table.contains("fastpath_redirect_peer6") && table.contains(&b6.to_string()),
        "debug fastpath: {table}"
    );
    Ok(Some(s))
}

/// `ping -6` from pod `from` to `to` with `args`; its output.
fn ping6(from: &Pod, to: IpAddr, args: &[&str]) -> Result<String> {
    let out = from
        .cmd("ping")
        .args(["-6", "-n", "-c", "1", "-W", "2"])
        .args(args)
        .arg(to.to_string())
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// IPv6 pods take the fast path on one node and across nodes on a shared link; what the fast
/// path must not decide takes the stack and still works: a ping whose hop limit expires at the
/// node gets the node's Time Exceeded, one over the output device's MTU its Packet Too Big (an
/// IPv6 router never fragments), each counted by why; Neighbour Discovery between node and pod
/// is never redirected (`fastpath_fallback_link_scope`) and keeps resolving the pod.
#[test]
fn ipv6_pods_on_one_node_and_across_nodes_take_the_fast_path() -> Result<()> {
    let Some(s) = ipv6_pods_take_the_fast_path(LabSpec::nodes(2), &[])? else {
        return Ok(());
    };
    let n0 = s.lab.node(0);
    let (b6, c6) = (v6(&s.b)?, v6(&s.c)?);

    // Hop limit 1: the node must not forward it; its stack answers.
    let before = view(n0)?;
    let out = ping6(&s.a, c6, &["-t", "1"])?;
    ensure!(out.contains("Time exceeded"), "ping6 -t 1: {out}");
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_fallback_ttl") >= 1,
        "hop limit 1 not left to the stack: {after}"
    );

    // Neighbour Discovery: the node forgets b's MAC and resolves it again through the pod's
    // veth; the pod's Neighbour Advertisement (to the node's link-local address) is never
    // redirected.
    let before = view(n0)?;
    n0.run(&["ip", "-6", "neigh", "flush", "to", &b6.to_string()])?;
    let out = n0
        .cmd("ping")
        .args(["-6", "-n", "-c", "1", "-W", "2", &b6.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "node → b over IPv6 after flushing its neighbour: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let neigh = n0.run(&["ip", "-6", "neigh", "show", "to", &b6.to_string()])?;
    ensure!(neigh.contains("lladdr"), "b's neighbour entry: {neigh}");
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_fallback_link_scope") >= 1,
        "no Neighbour Discovery left to the stack: {after}"
    );
    connections_between(&s.a, v6(&s.a)?, b6, "b", 3)?;

    // A packet over n0's output MTU: Packet Too Big from the node's stack, counted.
    n0.run(&["ip", "link", "set", "dev", "eth0", "mtu", "1280"])?;
    let before = view(n0)?;
    let out = ping6(&s.a, c6, &["-M", "do", "-s", "1400"])?;
    ensure!(out.contains("1280"), "ping6 -s 1400 over MTU 1280: {out}");
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_fallback_frag_needed") >= 1,
        "an oversized IPv6 packet was not left to the stack: {after}"
    );
    // Packets that fit still take the fast path.
    let out = ping6(&s.a, c6, &["-s", "1000"])?;
    ensure!(out.contains(" 0% packet loss"), "ping6 -s 1000: {out}");
    Ok(())
}

#[test]
fn ipv6_pods_across_the_vxlan_overlay_take_the_fast_path() -> Result<()> {
    ipv6_pods_take_the_fast_path(LabSpec::nodes(2), &["--routing-mode", "vxlan"]).map(|_| ())
}

/// The IPv6 twin of `a_redirected_packet_is_still_judged_by_the_receivers_ingress_policy`: a
/// default-deny ingress on b stops a's IPv6 connections on the same node (judged on a's veth,
/// counted there), and lifting it lets them through again.
#[test]
fn a_redirected_ipv6_packet_is_still_judged_by_the_receivers_ingress_policy() -> Result<()> {
    let Some(s) = setup(LabSpec::nodes(2).with_dual_stack(), &[])? else {
        return Ok(());
    };
    let n0 = s.lab.node(0);
    let (a6, b6) = (v6(&s.a)?, v6(&s.b)?);
    wait_endpoint_mac_of(n0, b6)?;
    label_pods(&s)?;
    let to_b = SocketAddr::new(b6, 8080).to_string();
    let redirected = counter(&view(n0)?, "fastpath_redirect_peer6");
    with_b_denied(&s, &to_b, || Ok(()))?;
    connections_between(&s.a, a6, b6, "b", 3)?;
    ensure!(
        counter(&view(n0)?, "fastpath_redirect_peer6") > redirected,
        "a → b over IPv6 was not redirected"
    );
    Ok(())
}

/// An IPv6 ClusterIP (translated at `connect()`, so its packets carry the backend's address)
/// and an IPv6 NodePort with externalTrafficPolicy Local, from outside, to a backend on the
/// node: both delivered by `bpf_redirect_peer` (from the client's veth; from the device after
/// the north-south DNAT), the backend's replies to the outside client forwarded by
/// `bpf_redirect_neigh` and translated back on the device's egress.
#[test]
fn an_ipv6_cluster_ip_and_node_port_to_a_local_backend_take_the_fast_path() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack().with_external_client())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let web = n0.add_pod("web")?;
    let client = n0.add_pod("client")?;
    lab.serve_dual(&web, "web", Some(8080), None)?;
    let _agent = start_agent(&lab, 0, &[])?;
    let vip6: IpAddr = "fd00:10:96::61".parse()?;
    let web6 = v6(&web)?;
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: default}}\n\
         spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  ipFamilies: [IPv6]\n  \
         ipFamilyPolicy: SingleStack\n  clusterIP: {vip6}\n  clusterIPs: [{vip6}]\n  ports:\n  \
         - {{name: http, port: 80, targetPort: 8080, nodePort: 30081, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web6-v6\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: web6}}\naddressType: IPv6\n\
         endpoints:\n- addresses: [\"{web6}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n\
         ports:\n- {{name: http, port: 8080, protocol: TCP}}\n",
        n0.name
    );
    lab.apply_manifest("web6.yaml", &svc)?;
    let vip = SocketAddr::new(vip6, 80).to_string();
    wait_for("the IPv6 ClusterIP", Duration::from_secs(30), || {
        Ok(tcp(&client, &vip)?.0 == 0)
    })?;
    wait_endpoint_mac_of(n0, web6)?;
    let before = view(n0)?;
    for _ in 0..5 {
        let (code, out) = tcp(&client, &vip)?;
        ensure!(code == 0 && out.starts_with("reply=web "), "{vip}: {out}");
    }
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_redirect_peer6") >= 5 * 6,
        "IPv6 ClusterIP connections not redirected: {after}"
    );

    let node6 = n0.ip6.context("dual-stack node")?;
    let np = SocketAddr::new(IpAddr::V6(node6), 30081).to_string();
    let ext = lab.external();
    wait_for(
        "the IPv6 NodePort from outside",
        Duration::from_secs(30),
        || {
            Ok(ext
                .labtool(&["tcp", "--to", &np, "--timeout-ms", "1000"])?
                .0
                == 0)
        },
    )?;
    let before = view(n0)?;
    for _ in 0..5 {
        let (code, out) = ext.labtool(&["tcp", "--to", &np, "--timeout-ms", "1000"])?;
        // externalTrafficPolicy Local: the backend sees the client's own address.
        ensure!(
            code == 0 && out.starts_with("reply=web [fd00:172:30::"),
            "{np}: {out}"
        );
    }
    let after = view(n0)?;
    ensure!(
        grew(&before, &after, "fastpath_redirect_peer6") >= 5 * 3
            && grew(&before, &after, "fastpath_redirect_neigh6") >= 5 * 3,
        "IPv6 NodePort traffic to a local backend not redirected: {after}"
    );
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
