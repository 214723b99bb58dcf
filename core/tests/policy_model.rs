//! Model-based test of the NetworkPolicy compiler (Cyclonus-style): random policies over
//! upstream's e2e topology (namespaces x, y, z; pods a, b, c; ports 80 and 81 over TCP, UDP and
//! SCTP), the expected reachability matrix from a small model written directly from the API
//! reference (crate `twill-policy-model`: it reads the Kubernetes objects itself, shares no code
//! with the compiler and knows nothing of identities or tries; the lab's datapath test uses the
//! same model), compared with `PolicyState::verdict` for every
//! (client, server, port, protocol), between pods and between pods and addresses that are no pod
//! (which only ipBlocks select and on which no named port resolves).
//!
//! Two placements: every pod on this node (both sides judged here), and a random set of pods on
//! another node (only the local sides are judged here; the other node judges the rest).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use serde_json::{Value, json};
use twill_core::policy::{
    Judgement, ParsedPolicy, PolicyIds, PolicyNamespace, PolicyPod, PolicyState, addr_from_be,
    compile, key_bytes,
};
use twill_policy_model::generate::Space;
use twill_policy_model::{ContainerPort, Member, Topology};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROTOS: [(&str, u8); 3] = [("TCP", 6), ("UDP", 17), ("SCTP", 132)];
const NODE: &str = "node-a";

// ---- the topology -------------------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Namespaces labelled `ns` (and `env` but for z); pods labelled `pod` (and `tier` but for c),
/// at 10.244.<namespace>.<pod>, serving 80 and 81 over every protocol under upstream's port
/// names.
fn topology() -> Topology {
    let mut topo = Topology::default();
    for (i, ns) in NAMESPACES.into_iter().enumerate() {
        let env = match ns {
            "x" => Some("prod"),
            "y" => Some("dev"),
            _ => None,
        };
        let mut ns_labels = labels(&[("ns", ns)]);
        if let Some(env) = env {
            ns_labels.insert("env".into(), env.into());
        }
        topo.namespaces.push(twill_policy_model::Namespace {
            name: ns.into(),
            labels: ns_labels,
        });
        for (j, pod) in PODS.into_iter().enumerate() {
            let mut pod_labels = labels(&[("pod", pod)]);
            match pod {
                "a" => pod_labels.insert("tier".into(), "front".into()),
                "b" => pod_labels.insert("tier".into(), "back".into()),
                _ => None,
            };
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for (proto, _) in PROTOS {
                    ports.push(ContainerPort {
                        name: format!("serve-{port}-{}", proto.to_lowercase()),
                        protocol: proto.into(),
                        port,
                    });
                }
            }
            // Pod c serves 81/TCP under another name too: egress named ports resolve per pod.
            if pod == "c" {
                ports.retain(|c| c.name != "serve-81-tcp");
                ports.push(ContainerPort {
                    name: "web".into(),
                    protocol: "TCP".into(),
                    port: 81,
                });
            }
            topo.pods.push(twill_policy_model::Pod {
                namespace: ns.into(),
                name: pod.into(),
                ip: Ipv4Addr::new(
                    10,
                    244,
                    u8::try_from(i + 1).unwrap(),
                    u8::try_from(j + 1).unwrap(),
                ),
                ip6: None,
                labels: pod_labels,
                ports,
            });
        }
    }
    topo
}

fn pod_object(p: &twill_policy_model::Pod, node: &str) -> Pod {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|c| json!({"name": c.name, "protocol": c.protocol, "containerPort": c.port}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIPs": [{"ip": p.ip.to_string()}]},
    }))
    .unwrap()
}

fn namespace_object(ns: &twill_policy_model::Namespace) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": ns.name, "labels": ns.labels}})).unwrap()
}

/// Addresses that are no pod: in a namespace's /24, /30 and /31 but no pod's; in the pod /16
/// only; in the documentation block policies use; in no block at all.
const EXTERNAL: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 244, 2, 0),
    Ipv4Addr::new(10, 244, 1, 9),
    Ipv4Addr::new(192, 0, 2, 7),
    Ipv4Addr::new(203, 0, 113, 5),
];

/// Random policies over the topology (the shared generator: every selector form, ipBlocks
/// around the pods with excepts, numeric, ranged and named ports, every protocol).
fn policies() -> impl Strategy<Value = Vec<NetworkPolicy>> {
    Space::of(&topology()).policies("p")
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
        .pods
        .iter()
        .zip(remote)
        .map(|(p, &r)| {
            PolicyPod::from_k8s(&pod_object(p, if r { "node-b" } else { NODE })).unwrap()
        })
        .collect();
    let namespaces: Vec<PolicyNamespace> = topo
        .namespaces
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
        .pods
        .iter()
        .zip(remote)
        .map(|(p, &r)| (Member::pod(p), !r))
        .chain(EXTERNAL.iter().map(|&ip| (Member::address(ip), false)))
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
                        !client_local || topo.egress_allows(policies, client, server, proto, port);
                    let ingress =
                        !server_local || topo.ingress_allows(policies, client, server, proto, port);
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
