//! Model-based test of the NetworkPolicy compiler (Cyclonus-style): random policies over
//! upstream's e2e topology (namespaces x, y, z; pods a, b, c; ports 80 and 81 over TCP, UDP and
//! SCTP), the expected reachability matrix from a small model written directly from the API
//! reference (it reads the Kubernetes objects itself, shares no code with the compiler and knows
//! nothing of identities or tries), compared with `PolicyState::verdict` for every
//! (client, server, port, protocol), between pods and between pods and addresses that are no pod
//! (which only ipBlocks select and on which no named port resolves).
//!
//! Two placements: every pod on this node (both sides judged here), and a random set of pods on
//! another node (only the local sides are judged here; the other node judges the rest).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use serde_json::{Value, json};
use twill_core::policy::{
    Judgement, ParsedPolicy, PolicyIds, PolicyNamespace, PolicyPod, PolicyState, addr_from_be,
    compile, key_bytes,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROTOS: [(&str, u8); 3] = [("TCP", 6), ("UDP", 17), ("SCTP", 132)];
const NODE: &str = "node-a";

// ---- the topology -------------------------------------------------------------------------

struct TopoPod {
    namespace: &'static str,
    name: &'static str,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    /// (name, protocol, port)
    ports: Vec<(String, &'static str, u16)>,
}

fn ns_labels(ns: &str) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([("ns".to_owned(), ns.to_owned())]);
    if ns != "z" {
        l.insert("env".into(), if ns == "x" { "prod" } else { "dev" }.into());
    }
    l
}

fn topology() -> Vec<TopoPod> {
    let mut out = Vec::new();
    for (i, ns) in NAMESPACES.into_iter().enumerate() {
        for (j, pod) in PODS.into_iter().enumerate() {
            let mut labels = BTreeMap::from([("pod".to_owned(), pod.to_owned())]);
            match pod {
                "a" => labels.insert("tier".into(), "front".into()),
                "b" => labels.insert("tier".into(), "back".into()),
                _ => None,
            };
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for (proto, _) in PROTOS {
                    ports.push((
                        format!("serve-{port}-{}", proto.to_lowercase()),
                        proto,
                        port,
                    ));
                }
            }
            // Pod c serves 81/TCP under another name too: egress named ports resolve per pod.
            if pod == "c" {
                ports.retain(|(n, _, _)| n != "serve-81-tcp");
                ports.push(("web".into(), "TCP", 81));
            }
            out.push(TopoPod {
                namespace: ns,
                name: pod,
                ip: Ipv4Addr::new(
                    10,
                    244,
                    u8::try_from(i + 1).unwrap(),
                    u8::try_from(j + 1).unwrap(),
                ),
                labels,
                ports,
            });
        }
    }
    out
}

fn pod_object(p: &TopoPod, node: &str) -> Pod {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "containerPort": port}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIPs": [{"ip": p.ip.to_string()}]},
    }))
    .unwrap()
}

fn namespace_object(ns: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": ns, "labels": ns_labels(ns)}})).unwrap()
}

// ---- the model: the API reference, read literally ----------------------------------------

fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("generator made operator {other}"),
        }
    });
    labels_ok && exprs_ok
}

fn parse_cidr(s: &str) -> (u32, u32) {
    let (addr, len) = s.split_once('/').unwrap();
    let addr = u32::from(addr.parse::<Ipv4Addr>().unwrap());
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (addr & mask, mask)
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, mask) = parse_cidr(cidr);
    u32::from(ip) & mask == net
}

/// One side of a probe: a topology pod, or an address that is no pod (outside the cluster, or
/// an unused address of the pod network).
#[derive(Clone, Copy)]
struct Member<'t> {
    ip: Ipv4Addr,
    pod: Option<&'t TopoPod>,
}

impl Member<'_> {
    fn name(&self) -> String {
        self.pod.map_or_else(
            || self.ip.to_string(),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    }
}

/// Addresses that are no pod: in a namespace's /24, /30 and /31 but no pod's; in the pod /16
/// only; in the documentation block policies use; in no block at all.
const EXTERNAL: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 244, 2, 0),
    Ipv4Addr::new(10, 244, 1, 9),
    Ipv4Addr::new(192, 0, 2, 7),
    Ipv4Addr::new(203, 0, 113, 5),
];

/// A peer of a policy in `policy_ns` selects `m`. Selectors select pods only; ipBlocks select
/// addresses, pods' included.
fn peer_selects(peer: &NetworkPolicyPeer, policy_ns: &str, m: Member<'_>) -> bool {
    if let Some(b) = &peer.ip_block {
        return in_cidr(m.ip, &b.cidr) && !b.except.iter().flatten().any(|e| in_cidr(m.ip, e));
    }
    let Some(pod) = m.pod else {
        return false;
    };
    let mut ns_labels = ns_labels(pod.namespace);
    ns_labels.insert("kubernetes.io/metadata.name".into(), pod.namespace.into());
    let ns_ok = match &peer.namespace_selector {
        Some(sel) => selector_matches(sel, &ns_labels),
        None => pod.namespace == policy_ns,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector_matches(sel, &pod.labels));
    ns_ok && pod_ok
}

/// A policy port admits `proto`/`port` on `server`; a named port needs a pod that has it.
fn port_admits(p: &NetworkPolicyPort, server: Member<'_>, proto: &str, port: u16) -> bool {
    if p.protocol.as_deref().unwrap_or("TCP") != proto {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let lo = i32::from(port) >= *n;
            let hi = i32::from(port) <= p.end_port.unwrap_or(*n);
            lo && hi
        }
        Some(IntOrString::String(name)) => server.pod.is_some_and(|pod| {
            pod.ports
                .iter()
                .any(|(n, pr, po)| n == name && *pr == proto && *po == port)
        }),
    }
}

fn types(np: &NetworkPolicy) -> (bool, bool) {
    let spec = np.spec.as_ref().unwrap();
    match spec.policy_types.as_deref() {
        None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(t) => (
            t.iter().any(|t| t == "Ingress"),
            t.iter().any(|t| t == "Egress"),
        ),
    }
}

fn selects(np: &NetworkPolicy, pod: &TopoPod) -> bool {
    np.metadata.namespace.as_deref() == Some(pod.namespace)
        && selector_matches(
            np.spec.as_ref().unwrap().pod_selector.as_ref().unwrap(),
            &pod.labels,
        )
}

/// `client`'s egress allows the connection to `server` (no policy applies to a non-pod).
fn model_egress(
    pols: &[NetworkPolicy],
    client: Member<'_>,
    server: Member<'_>,
    proto: &str,
    port: u16,
) -> bool {
    let Some(client_pod) = client.pod else {
        return true;
    };
    let mut isolated = false;
    for np in pols
        .iter()
        .filter(|np| types(np).1 && selects(np, client_pod))
    {
        isolated = true;
        let ns = np.metadata.namespace.as_deref().unwrap();
        for r in np.spec.as_ref().unwrap().egress.iter().flatten() {
            let peer_ok = match r.to.as_deref() {
                None | Some([]) => true,
                Some(peers) => peers.iter().any(|p| peer_selects(p, ns, server)),
            };
            let port_ok = match r.ports.as_deref() {
                None | Some([]) => true,
                Some(ports) => ports.iter().any(|p| port_admits(p, server, proto, port)),
            };
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

/// `server`'s ingress allows the connection from `client`.
fn model_ingress(
    pols: &[NetworkPolicy],
    client: Member<'_>,
    server: Member<'_>,
    proto: &str,
    port: u16,
) -> bool {
    let Some(server_pod) = server.pod else {
        return true;
    };
    let mut isolated = false;
    for np in pols
        .iter()
        .filter(|np| types(np).0 && selects(np, server_pod))
    {
        isolated = true;
        let ns = np.metadata.namespace.as_deref().unwrap();
        for r in np.spec.as_ref().unwrap().ingress.iter().flatten() {
            let peer_ok = match r.from.as_deref() {
                None | Some([]) => true,
                Some(peers) => peers.iter().any(|p| peer_selects(p, ns, client)),
            };
            let port_ok = match r.ports.as_deref() {
                None | Some([]) => true,
                Some(ports) => ports.iter().any(|p| port_admits(p, server, proto, port)),
            };
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

// ---- random policies ---------------------------------------------------------------------

fn label_selector(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> BoxedStrategy<Value> {
    let key = prop::sample::select(keys);
    let value_sets = key.clone().prop_flat_map(|(k, vals)| {
        (
            Just(k),
            prop::sample::subsequence(vals.to_vec(), 1..=vals.len()),
        )
    });
    prop_oneof![
        Just(json!({})),
        key.clone().prop_flat_map(|(k, vals)| {
            prop::sample::select(vals.to_vec()).prop_map(move |v| json!({"matchLabels": {k: v}}))
        }),
        (value_sets, prop::sample::select(&["In", "NotIn"][..])).prop_map(|((k, vs), op)| {
            json!({"matchExpressions": [{"key": k, "operator": op, "values": vs}]})
        }),
        (key, prop::sample::select(&["Exists", "DoesNotExist"][..]))
            .prop_map(|((k, _), op)| { json!({"matchExpressions": [{"key": k, "operator": op}]}) }),
    ]
    .boxed()
}

const POD_KEYS: &[(&str, &[&str])] = &[("pod", &["a", "b", "c"]), ("tier", &["front", "back"])];
const NS_KEYS: &[(&str, &[&str])] = &[
    ("ns", &["x", "y", "z"]),
    ("env", &["prod", "dev"]),
    ("kubernetes.io/metadata.name", &["x", "y", "z"]),
];

/// CIDRs over the pod addresses: the pod network, a namespace's /24, a /30 holding a namespace's
/// pods, a /31 or /32 holding one or two pods; excepts strictly inside.
fn ip_block() -> impl Strategy<Value = Value> {
    let cidr = prop_oneof![
        Just("10.244.0.0/16".to_owned()),
        (1u8..=3).prop_map(|n| format!("10.244.{n}.0/24")),
        (1u8..=3).prop_map(|n| format!("10.244.{n}.0/30")),
        (1u8..=3, 0u8..=1).prop_map(|(n, h)| format!("10.244.{n}.{}/31", h * 2)),
        (1u8..=3, 1u8..=3).prop_map(|(n, h)| format!("10.244.{n}.{h}/32")),
        Just("192.0.2.0/24".to_owned()),
    ];
    (
        cidr,
        prop::collection::vec((1u8..=3, 1u8..=3, prop::bool::ANY), 0..=2),
    )
        .prop_map(|(cidr, excepts)| {
            let (net, mask) = parse_cidr(&cidr);
            let len = mask.count_ones();
            let except: Vec<String> = excepts
                .into_iter()
                .filter_map(|(n, h, wide)| {
                    let ip = Ipv4Addr::new(10, 244, n, h);
                    let (e, elen) = if wide {
                        (u32::from(ip) & !1, 31)
                    } else {
                        (u32::from(ip), 32)
                    };
                    (elen > len && (e & mask) == net)
                        .then(|| format!("{}/{elen}", Ipv4Addr::from(e)))
                })
                .collect();
            if except.is_empty() {
                json!({"ipBlock": {"cidr": cidr}})
            } else {
                json!({"ipBlock": {"cidr": cidr, "except": except}})
            }
        })
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        label_selector(POD_KEYS).prop_map(|p| json!({"podSelector": p})),
        label_selector(NS_KEYS).prop_map(|n| json!({"namespaceSelector": n})),
        (label_selector(POD_KEYS), label_selector(NS_KEYS))
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        ip_block(),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let proto = prop::sample::select(&[None, Some("TCP"), Some("UDP"), Some("SCTP")][..]);
    let port = prop_oneof![
        Just(Value::Null),
        prop::sample::select(&[80, 81, 79][..]).prop_map(|p| json!({"port": p})),
        prop::sample::select(&[(80, 81), (79, 80), (81, 90), (1, 65535)][..])
            .prop_map(|(p, e)| json!({"port": p, "endPort": e})),
        prop::sample::select(
            &[
                "serve-80-tcp",
                "serve-81-tcp",
                "serve-80-udp",
                "serve-81-udp",
                "serve-80-sctp",
                "web",
                "none"
            ][..]
        )
        .prop_map(|n| json!({"port": n})),
    ];
    (proto, port).prop_map(|(proto, port)| {
        let mut p = if port.is_null() { json!({}) } else { port };
        if let Some(proto) = proto {
            p["protocol"] = json!(proto);
        }
        p
    })
}

/// `None` = field absent; `Some(vec![])` = present and empty (same meaning, both tested).
fn opt_list<S: Strategy<Value = Value> + 'static>(
    s: S,
) -> impl Strategy<Value = Option<Vec<Value>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => prop::collection::vec(s, 1..=3).prop_map(Some),
    ]
}

fn rule(peers_field: &'static str) -> impl Strategy<Value = Value> {
    (opt_list(peer()), opt_list(port())).prop_map(move |(peers, ports)| {
        let mut r = json!({});
        if let Some(p) = peers {
            r[peers_field] = json!(p);
        }
        if let Some(p) = ports {
            r["ports"] = json!(p);
        }
        r
    })
}

fn policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    let types = prop::sample::select(vec![
        None,
        Some(vec!["Ingress"]),
        Some(vec!["Egress"]),
        Some(vec!["Ingress", "Egress"]),
    ]);
    (
        prop::sample::select(&NAMESPACES[..]),
        label_selector(POD_KEYS),
        types,
        prop::option::of(prop::collection::vec(rule("from"), 0..=2)),
        prop::option::of(prop::collection::vec(rule("to"), 0..=2)),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let mut spec = json!({"podSelector": sel});
            if let Some(t) = types {
                spec["policyTypes"] = json!(t);
            }
            if let Some(r) = ingress {
                spec["ingress"] = json!(r);
            }
            if let Some(r) = egress {
                spec["egress"] = json!(r);
            }
            serde_json::from_value(json!({
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": spec,
            }))
            .unwrap()
        })
}

fn policies() -> impl Strategy<Value = Vec<NetworkPolicy>> {
    (1usize..=4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

// ---- the comparison ----------------------------------------------------------------------

/// What the kernel will be given: canonical LPM keys (no bits past the prefix).
fn check_canonical(state: &PolicyState) -> Result<(), TestCaseError> {
    for k in state.maps.policy.keys() {
        let bytes = key_bytes(&k.data);
        let bits = usize::try_from(k.prefix_len).unwrap();
        for (i, b) in bytes.iter().enumerate() {
            let keep = bits.saturating_sub(i * 8).min(8);
            let mask = if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
            prop_assert_eq!(b & !mask, 0, "policy key {:?} has bits past its prefix", k);
        }
    }
    for k in state.maps.ipcache.keys() {
        let addr = u32::from(addr_from_be(k.data.addr_be));
        let mask = if k.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - k.prefix_len)
        };
        prop_assert_eq!(
            addr & !mask,
            0,
            "ipcache key {:?} has bits past its prefix",
            k
        );
    }
    Ok(())
}

fn check(policies: &[NetworkPolicy], remote: &[bool]) -> Result<(), TestCaseError> {
    let topo = topology();
    let policy_pods: Vec<PolicyPod> = topo
        .iter()
        .zip(remote)
        .map(|(p, &r)| {
            PolicyPod::from_k8s(&pod_object(p, if r { "node-b" } else { NODE })).unwrap()
        })
        .collect();
    let namespaces: Vec<PolicyNamespace> = NAMESPACES
        .iter()
        .map(|ns| PolicyNamespace::from_k8s(&namespace_object(ns)).unwrap())
        .collect();
    let parsed: Vec<ParsedPolicy> = policies
        .iter()
        .map(|np| {
            ParsedPolicy::from_k8s(np)
                .unwrap_or_else(|e| panic!("generated an invalid policy: {e}"))
        })
        .collect();
    let state = compile(
        &policy_pods,
        &namespaces,
        &parsed,
        NODE,
        &[],
        &PolicyIds::default(),
    );
    check_canonical(&state)?;
    // Every pod with every pod, and every pod with every non-pod address both ways. A side is
    // judged here only if it is a pod of this node.
    let members: Vec<(Member<'_>, bool)> = topo
        .iter()
        .zip(remote)
        .map(|(p, &r)| {
            (
                Member {
                    ip: p.ip,
                    pod: Some(p),
                },
                !r,
            )
        })
        .chain(EXTERNAL.iter().map(|&ip| (Member { ip, pod: None }, false)))
        .collect();
    let mut wrong = Vec::new();
    let mut probes = 0;
    for &(client, client_local) in &members {
        for &(server, server_local) in &members {
            if client.pod.is_none() && server.pod.is_none() {
                continue;
            }
            for (proto, proto_num) in PROTOS {
                for port in [80u16, 81] {
                    probes += 1;
                    let egress =
                        !client_local || model_egress(policies, client, server, proto, port);
                    let ingress =
                        !server_local || model_ingress(policies, client, server, proto, port);
                    let want = egress && ingress;
                    let got = state.verdict(client.ip, server.ip, proto_num, port);
                    for j in [got.egress, got.ingress] {
                        if let Judgement::Allowed { rule_id, .. } = j {
                            prop_assert!(
                                state.rules.contains_key(&rule_id),
                                "unknown rule {}",
                                rule_id
                            );
                        }
                    }
                    if got.allowed() != want {
                        wrong.push(format!(
                            "{} -> {} {proto}/{port}: model egress={egress} ingress={ingress}, \
                             compiled {got:?}",
                            client.name(),
                            server.name()
                        ));
                    }
                }
            }
        }
    }
    prop_assert!(
        wrong.is_empty(),
        "{} of {probes} probes differ:\n{}\npolicies:\n{}\ndump:\n{}",
        wrong.len(),
        wrong.join("\n"),
        serde_json::to_string_pretty(policies).unwrap(),
        state.dump()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_pod_local_matches_the_model(pols in policies()) {
        check(&pols, &[false; 9])?;
    }

    #[test]
    fn some_pods_remote_matches_the_model(
        pols in policies(),
        remote in prop::collection::vec(prop::bool::ANY, 9),
    ) {
        check(&pols, &remote)?;
    }
}
