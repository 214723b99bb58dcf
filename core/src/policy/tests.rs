use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use serde_json::json;
use twill_common::{
    IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, PEP_F_EGRESS_ISOLATED, PEP_F_INGRESS_ISOLATED,
    POLICY_PREFIX_ANY_PROTO, PROTO_TCP, PROTO_UDP,
};

use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn pod(ns: &str, name: &str, app: &str, addr: &str, node: &str) -> PolicyPod {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        ]}]},
        // Dual-stack, the IPv6 address listed first: each family's first address is taken.
        "status": {"phase": "Running", "podIPs": [{"ip": format!("fd00::{addr}")}, {"ip": addr}]},
    }))
    .unwrap();
    PolicyPod::from_k8s(&p).unwrap()
}

fn policy(ns: &str, name: &str, spec: &serde_json::Value) -> Result<ParsedPolicy, PolicyError> {
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .unwrap();
    ParsedPolicy::from_k8s(&np)
}

fn run(pods: &[PolicyPod], policies: &[ParsedPolicy], prev: &PolicyIds) -> PolicyState {
    let nss = [PolicyNamespace::new("x", Labels::new())];
    compile(
        pods,
        &nss,
        policies,
        "node-a",
        &[ip("192.168.0.10").into()],
        prev,
    )
}

proptest! {
    /// The prefixes cover exactly `lo..=hi`, are aligned, and are at most 30.
    #[test]
    fn port_prefixes_cover_exactly_the_range(a in 1u16.., b in 1u16..) {
        let (lo, hi) = (a.min(b), a.max(b));
        let prefixes = port_prefixes(lo, hi);
        prop_assert!(prefixes.len() <= 30);
        let mut next = u32::from(lo);
        for (base, bits) in prefixes {
            let size = 1u32 << (16 - bits);
            prop_assert_eq!(u32::from(base), next, "contiguous, in order");
            prop_assert_eq!(u32::from(base) % size, 0, "aligned");
            next += size;
        }
        prop_assert_eq!(next, u32::from(hi) + 1);
    }
}

#[test]
fn port_prefixes_of_known_ranges() {
    assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
    assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
    assert_eq!(port_prefixes(79, 82), vec![(79, 16), (80, 15), (82, 16)]);
    assert_eq!(port_prefixes(1, 65535).len(), 16);
    assert_eq!(port_prefixes(1, 65534).len(), 30);
}

#[test]
fn pods_parse_to_what_policies_need() {
    let p = pod("x", "a", "web", "10.244.0.5", "node-a");
    // The first IPv4 address of a dual-stack pod.
    assert_eq!(p.ip, Some(ip("10.244.0.5")));
    assert_eq!(
        p.named_ports,
        vec![
            NamedPort {
                name: "dns".into(),
                proto: PROTO_UDP,
                port: 53
            },
            NamedPort {
                name: "http".into(),
                proto: PROTO_TCP,
                port: 8080
            },
        ]
    );
    assert_eq!(p.policy_ip(), Some(ip("10.244.0.5")));
    let host = PolicyPod {
        host_network: true,
        ..p.clone()
    };
    assert_eq!(
        host.policy_ip(),
        None,
        "hostNetwork pods use node addresses"
    );
    let done = PolicyPod {
        phase: PodPhase::Failed,
        ..p
    };
    assert_eq!(
        done.policy_ip(),
        None,
        "a finished pod's address may be reused"
    );

    let ns = PolicyNamespace::new("x", Labels::from([("team".into(), "red".into())]));
    assert_eq!(ns.labels[LABEL_NAMESPACE_NAME], "x");
}

#[test]
fn policies_parse_canonical_and_defaulted() {
    let p = policy(
        "x",
        "p",
        &json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/8", "except": ["10.9.0.0/16", "10.1.0.0/16", "10.9.0.0/16"]}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/64"}}]}],
        }),
    )
    .unwrap();
    assert!(
        p.isolates_ingress && p.isolates_egress,
        "egress rules imply Egress"
    );
    let Some(Peer::IpBlock(b)) = p.ingress[0].peers.as_ref().map(|v| v[0].clone()) else {
        panic!("{p:?}");
    };
    assert_eq!(b.cidr.to_string(), "10.0.0.0/8");
    let except: Vec<String> = b.except.iter().map(ToString::to_string).collect();
    assert_eq!(except, ["10.1.0.0/16", "10.9.0.0/16"]);
    // An IPv6 block is a block like any other.
    let Some(Peer::IpBlock(b6)) = p.egress[0].peers.as_ref().map(|v| v[0].clone()) else {
        panic!("{p:?}");
    };
    assert_eq!(b6.cidr.to_string(), "fd00::/64");

    // Explicit policyTypes win; the other direction's rules have no effect.
    let e = policy(
        "x",
        "e",
        &json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
    )
    .unwrap();
    assert!(!e.isolates_ingress && e.isolates_egress);
    assert!(e.ingress.is_empty() && e.egress.is_empty());
}

#[test]
fn invalid_policies_name_the_field() {
    let cases = [
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "except_outside_cidr",
        ),
        (
            json!({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "spec.egress[0].ports[0].endPort",
            "end_port_below_port",
        ),
        (
            json!({"podSelector": {}, "egress": [{"ports": [{"endPort": 80}]}]}),
            "spec.egress[0].ports[0].endPort",
            "end_port_without_port",
        ),
        (
            json!({"podSelector": {}, "egress": [{"ports": [{"port": 70000}]}]}),
            "spec.egress[0].ports[0].port",
            "port_out_of_range",
        ),
        (
            json!({"podSelector": {}, "egress": [{"ports": [{"port": "Not_A_Name"}]}]}),
            "spec.egress[0].ports[0].port",
            "bad_port_name",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.podSelector.matchExpressions[0]",
            "selector_values_required",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}}),
            "spec.podSelector.matchExpressions[0]",
            "selector_values_forbidden",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "except_family",
        ),
    ];
    for (spec, path, label) in cases {
        let e = policy("x", "bad", &spec).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.kind.metric_label()),
            (path, label),
            "{e}"
        );
    }
}

#[test]
fn verdict_says_why() {
    let pods = [
        pod("x", "server", "web", "10.244.0.5", "node-a"),
        pod("x", "client", "cli", "10.244.0.6", "node-a"),
        pod("x", "open", "open", "10.244.0.7", "node-a"),
        pod("x", "remote", "cli", "10.244.1.6", "node-b"),
    ];
    let policies = [
        policy(
            "x",
            "web",
            &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": "http"}]},
                {"ports": [{"port": 9000, "endPort": 9001, "protocol": "UDP"}]},
            ]}),
        )
        .unwrap(),
    ];
    let s = run(&pods, &policies, &PolicyIds::default());
    let (server, client, open) = (ip("10.244.0.5"), ip("10.244.0.6"), ip("10.244.0.7"));

    let v = s.verdict(client, server, PROTO_TCP, 8080);
    assert!(v.allowed());
    assert!(matches!(v.egress, Judgement::NotIsolated { .. }), "{v:?}");
    let Judgement::Allowed {
        rule_id, identity, ..
    } = v.ingress
    else {
        panic!("{v:?}");
    };
    let client_id = s
        .local_pods
        .values()
        .find(|p| p.ip == Some(client))
        .unwrap()
        .identity;
    assert_eq!(identity, client_id);
    let r = &s.rules[&rule_id];
    assert_eq!(
        (&*r.name, r.direction, r.rule, r.peer, r.port),
        ("web", Direction::Ingress, 0, Some(0), Some(0))
    );
    // The remote client shares the local client's identity.
    assert!(
        s.verdict(ip("10.244.1.6"), server, PROTO_TCP, 8080)
            .allowed()
    );
    assert_eq!(s.maps.identity_of(ip("10.244.1.6")), client_id);

    // Wrong port, wrong peer: denied, with the identity the kernel would have used.
    assert!(!s.verdict(client, server, PROTO_TCP, 8081).allowed());
    let v = s.verdict(open, server, PROTO_TCP, 8080);
    assert!(matches!(v.ingress, Judgement::Denied { .. }), "{v:?}");

    // The ANY fallback: rule 1 has no `from`.
    let v = s.verdict(open, server, PROTO_UDP, 9001);
    let Judgement::Allowed { key, rule_id, .. } = v.ingress else {
        panic!("{v:?}");
    };
    assert_eq!(u32::from_be(key.data.identity_be), IDENTITY_ANY);
    assert_eq!(s.rules[&rule_id].rule, 1);
    // From outside the cluster: WORLD, still allowed by the ANY entry.
    assert_eq!(s.maps.identity_of(ip("203.0.113.1")), IDENTITY_WORLD);
    assert!(
        s.verdict(ip("203.0.113.1"), server, PROTO_UDP, 9000)
            .allowed()
    );

    // The node itself: always into its pods.
    let v = s.verdict(ip("192.168.0.10"), server, PROTO_TCP, 1);
    assert!(matches!(v.ingress, Judgement::FromHost { .. }), "{v:?}");
    assert!(v.allowed());
    assert_eq!(s.maps.identity_of(ip("192.168.0.10")), IDENTITY_HOST);

    // Not a local pod: this node does not judge it.
    let v = s.verdict(server, ip("10.244.1.6"), PROTO_TCP, 80);
    assert_eq!(v.ingress, Judgement::Unmanaged);

    let flags = |a| s.maps.endpoints[&addr_be(a)].flags;
    assert_eq!(flags(server), PEP_F_INGRESS_ISOLATED);
    assert_eq!(flags(client), 0);
    assert_eq!(s.counts.local_endpoints, 3);
}

#[test]
fn exactly_overlapping_rules_name_the_lowest_rule() {
    let pods = [pod("x", "server", "web", "10.244.0.5", "node-a")];
    let first = policy("x", "a", &json!({"podSelector": {}, "ingress": [{}]})).unwrap();
    let second = policy("x", "b", &json!({"podSelector": {}, "ingress": [{}]})).unwrap();
    let state = run(&pods, &[second, first], &PolicyIds::default());
    assert_eq!(state.maps.policy.len(), 1);
    let (key, value) = state.maps.policy.iter().next().unwrap();
    assert_eq!(key.prefix_len, POLICY_PREFIX_ANY_PROTO);
    assert_eq!(&*state.rules[&value.rule_id].name, "a");
}

/// [`pod`] without its IPv6 address.
fn pod4(ns: &str, name: &str, app: &str, addr: &str, node: &str) -> PolicyPod {
    PolicyPod {
        ip6: None,
        ..pod(ns, name, app, addr, node)
    }
}

#[test]
fn ids_survive_changes_elsewhere() {
    let base_pods = vec![
        pod4("x", "b", "web", "10.244.0.5", "node-a"),
        pod4("x", "d", "cli", "10.244.0.6", "node-a"),
    ];
    let allow = policy(
        "x",
        "m",
        &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}]}),
    )
    .unwrap();
    let first = run(
        &base_pods,
        std::slice::from_ref(&allow),
        &PolicyIds::default(),
    );

    // A pod, a label set, an ipBlock and a policy that sort before everything else appear.
    let mut pods = base_pods.clone();
    pods.push(pod4("x", "a", "aaa", "10.244.0.4", "node-a"));
    let early = policy(
        "x",
        "a-early",
        &json!({"podSelector": {"matchLabels": {"app": "aaa"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
    )
    .unwrap();
    let second = run(&pods, &[early, allow.clone()], &first.ids);
    for (ep, p) in &first.local_pods {
        let q = &second.local_pods[ep];
        assert_eq!((&p.name, p.ip), (&q.name, q.ip), "endpoint {ep} renumbered");
    }
    // The block covers every pod: each identity's class changed, so each is a new identity.
    assert!(
        first
            .identities
            .keys()
            .all(|id| !second.identities.contains_key(id))
    );
    assert!(second.rules.len() > first.rules.len());
    for (id, r) in &first.rules {
        assert_eq!(&second.rules[id], r, "rule {id} renumbered");
    }

    // Back to the first inputs: the same ids as the first compile, so the same entries.
    let third = run(&base_pods, std::slice::from_ref(&allow), &second.ids);
    assert_eq!(third.maps.endpoints, first.maps.endpoints);
    assert_eq!(
        third.rules, first.rules,
        "rules keep their ids across the detour"
    );
    // Identities that went away are not reused right away.
    let max_first = first.identities.keys().max().unwrap();
    assert!(third.identities.keys().all(|id| id > max_first));
}

/// A dual-stack pod's two addresses share one endpoint and, until an ipBlock tells them apart,
/// one identity; a block of one family changes only that address's identity, and rules follow
/// each address's identity.
#[test]
fn a_cidr_class_is_per_address() {
    let pods = [
        pod("x", "s", "web", "10.244.0.5", "node-a"),
        pod("x", "c", "cli", "10.244.0.6", "node-a"),
    ];
    let (s4, c4) = (ip("10.244.0.5"), ip("10.244.0.6"));
    let s6: std::net::Ipv6Addr = "fd00::10.244.0.5".parse().unwrap();
    let c6: std::net::Ipv6Addr = "fd00::10.244.0.6".parse().unwrap();
    let plain = run(&pods, &[], &PolicyIds::default());
    let server = plain.local_pods.values().find(|p| &*p.name == "s").unwrap();
    assert_eq!(server.identity6, Some(server.identity));
    assert_eq!(
        plain.maps.endpoints[&addr_be(s4)],
        plain.maps.endpoints6[&addr6_be(s6)]
    );
    // Ingress of s from c's IPv6 block only.
    let block6 = policy(
        "x",
        "v6-only",
        &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "fd00::10.244.0.0/120", "except": ["fd00::10.244.0.7/128"]}}]}]}),
    )
    .unwrap();
    let s = run(&pods, &[block6], &PolicyIds::default());
    let client = s.local_pods.values().find(|p| &*p.name == "c").unwrap();
    assert_ne!(client.identity6, Some(client.identity));
    assert!(s.verdict(c6, s6, PROTO_TCP, 80).allowed());
    assert!(!s.verdict(c4, s4, PROTO_TCP, 80).allowed());
    // Outside the block, and in its except: WORLD or the except's region, denied.
    let other: std::net::Ipv6Addr = "fd00::10.244.0.7".parse().unwrap();
    assert!(!s.verdict(other, s6, PROTO_TCP, 80).allowed());
    assert!(
        !s.verdict(
            "fd01::1".parse::<std::net::Ipv6Addr>().unwrap(),
            s6,
            PROTO_TCP,
            80
        )
        .allowed()
    );
    assert_eq!(
        s.maps
            .identity_of("fd01::1".parse::<std::net::Ipv6Addr>().unwrap()),
        IDENTITY_WORLD
    );
    // Addresses in the block that are no pod: its region identity, allowed.
    let region: std::net::Ipv6Addr = "fd00::10.244.0.99".parse().unwrap();
    assert!(s.verdict(region, s6, PROTO_TCP, 80).allowed());
}

#[test]
fn pod_and_node_address_conflicts_resolve_deterministically() {
    let pods = [
        pod("x", "b", "web", "10.244.0.5", "node-a"),
        pod("x", "a", "old", "10.244.0.5", "node-a"),
        pod("x", "n", "web", "192.168.0.10", "node-a"),
    ];
    let s = run(&pods, &[], &PolicyIds::default());
    // Per address: a and b clash on both families, n with the node on IPv4.
    assert_eq!(s.counts.ip_conflicts, 3);
    assert_eq!(s.maps.endpoints6.len(), 2);
    let owner = &s.local_pods[&s.maps.endpoints[&addr_be(ip("10.244.0.5"))].ep_id];
    assert_eq!(&*owner.name, "a");
    assert!(!s.maps.endpoints.contains_key(&addr_be(ip("192.168.0.10"))));
}

#[test]
fn egress_to_the_node_follows_ip_blocks() {
    let pods = [pod("x", "c", "cli", "10.244.0.6", "node-a")];
    let to_nodes = policy(
        "x",
        "to-nodes",
        &json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "192.168.0.0/24"}}]}]}),
    )
    .unwrap();
    let s = run(&pods, &[to_nodes], &PolicyIds::default());
    let c = ip("10.244.0.6");
    assert_eq!(s.maps.endpoints[&addr_be(c)].flags, PEP_F_EGRESS_ISOLATED);
    assert!(s.verdict(c, ip("192.168.0.10"), PROTO_TCP, 10250).allowed());
    assert!(s.verdict(c, ip("192.168.0.11"), PROTO_TCP, 10250).allowed());
    assert!(!s.verdict(c, ip("192.168.1.1"), PROTO_TCP, 10250).allowed());
}

#[test]
fn dump_names_what_it_does_not_know() {
    let pods = [pod("x", "server", "web", "10.244.0.5", "node-a")];
    let p = policy("x", "p", &json!({"podSelector": {}, "ingress": [{}]})).unwrap();
    let s = run(&pods, &[p], &PolicyIds::default());
    let mut maps = s.maps.clone();
    let (k, _) = maps.policy.iter().next().map(|(k, v)| (*k, *v)).unwrap();
    maps.policy
        .insert(k, twill_common::PolicyVerdict { rule_id: 999 });
    let text = render_dump(&maps, &s);
    assert!(text.contains("-> rule 999?"), "{text}");
    assert!(
        s.dump()
            .contains("policy ep=1 ingress from=any any -> rule 1\n"),
        "{}",
        s.dump()
    );
}

#[test]
fn pod_views_serialize_for_debug_policy_json() {
    let pods = [
        pod("x", "server", "web", "10.244.0.5", "node-a"),
        pod("x", "client", "cli", "10.244.0.6", "node-b"),
    ];
    let p = policy(
        "x",
        "web",
        &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": 80, "endPort": 81}]}]}),
    )
    .unwrap();
    let s = run(&pods, &[p], &PolicyIds::default());
    let json = serde_json::to_value(pod_views(&s.maps, &s)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "only local pods: {json}");
    let v = &json[0];
    assert_eq!(v["ip"], "10.244.0.5");
    assert_eq!(v["ingress_isolated"], true);
    assert_eq!(v["egress_isolated"], false);
    assert_eq!(v["ingress_policies"], json!(["x/web"]));
    assert_eq!(v["ingress"][0]["peer"], "pods ns=x {app=cli}");
    assert_eq!(v["ingress"][0]["ports"], "TCP 80-81");
    assert_eq!(v["ingress"][0]["rule"], "x/web ingress[0] from[0] ports[0]");
}

/// Upstream's "updated" cases at the compiler: a recompile with the previous ids follows label,
/// namespace and policy changes, and leaves the entries of what did not change alone.
#[test]
fn recompiles_follow_updates_and_keep_the_rest() {
    let nss = |team: &str| {
        vec![
            PolicyNamespace::new("x", Labels::new()),
            PolicyNamespace::new("y", Labels::from([("team".into(), team.into())])),
        ]
    };
    let mut pods = vec![
        pod("x", "server", "web", "10.244.0.5", "node-a"),
        pod("x", "other", "db", "10.244.0.8", "node-a"),
        pod("y", "client", "cli", "10.244.0.6", "node-a"),
    ];
    let policies = vec![
        policy(
            "x",
            "from-red-cli",
            &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"team": "red"}},
                 "podSelector": {"matchLabels": {"app": "cli"}}}]}]}),
        )
        .unwrap(),
        policy(
            "x",
            "db",
            &json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
        )
        .unwrap(),
    ];
    let compile_with =
        |pods: &[PolicyPod], team: &str, policies: &[ParsedPolicy], prev: &PolicyIds| {
            compile(pods, &nss(team), policies, "node-a", &[], prev)
        };
    let (server, client) = (ip("10.244.0.5"), ip("10.244.0.6"));
    let db_entries = |s: &PolicyState| -> Vec<_> {
        let ep = s.maps.endpoints[&addr_be(ip("10.244.0.8"))].ep_id;
        s.maps
            .policy
            .iter()
            .filter(|(k, _)| u32::from_be(k.data.ep_id_be) == ep)
            .map(|(k, v)| (*k, *v))
            .collect()
    };

    let s1 = compile_with(&pods, "red", &policies, &PolicyIds::default());
    assert!(s1.verdict(client, server, PROTO_TCP, 80).allowed());

    // Updated namespace labels: the client's namespace leaves team red.
    let s2 = compile_with(&pods, "blue", &policies, &s1.ids);
    assert!(!s2.verdict(client, server, PROTO_TCP, 80).allowed());
    assert_eq!(
        db_entries(&s2),
        db_entries(&s1),
        "unrelated entries rewritten"
    );
    assert_eq!(s2.maps.endpoints, s1.maps.endpoints);

    // Back, then updated pod labels: the client is no `cli` any more.
    let s3 = compile_with(&pods, "red", &policies, &s2.ids);
    assert!(s3.verdict(client, server, PROTO_TCP, 80).allowed());
    pods[2].labels.insert("app", "batch");
    let s4 = compile_with(&pods, "red", &policies, &s3.ids);
    assert!(!s4.verdict(client, server, PROTO_TCP, 80).allowed());
    assert_eq!(db_entries(&s4), db_entries(&s3));

    // Updated pod IP: the new address is known, the old one is WORLD.
    pods[2].labels.insert("app", "cli");
    pods[2].ip = Some(ip("10.244.0.9"));
    let s5 = compile_with(&pods, "red", &policies, &s4.ids);
    assert!(
        s5.verdict(ip("10.244.0.9"), server, PROTO_TCP, 80)
            .allowed()
    );
    assert!(!s5.verdict(client, server, PROTO_TCP, 80).allowed());
    assert_eq!(s5.maps.identity_of(client), IDENTITY_WORLD);

    // Deleted policy: the server stops being isolated.
    let s6 = compile_with(&pods, "red", &policies[1..], &s5.ids);
    assert!(s6.verdict(client, server, PROTO_TCP, 80).allowed());
    let v = s6.verdict(client, server, PROTO_TCP, 80);
    assert!(matches!(v.ingress, Judgement::NotIsolated { .. }), "{v:?}");
    assert_eq!(db_entries(&s6), db_entries(&s5));
}

#[test]
fn explain_names_the_rule_or_says_none_allows() {
    let pods = [
        pod("x", "server", "web", "10.244.0.5", "node-a"),
        pod("x", "client", "cli", "10.244.0.6", "node-a"),
    ];
    let policies = [
        policy(
            "x",
            "web",
            &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": 80}]}]}),
        )
        .unwrap(),
    ];
    let s = run(&pods, &policies, &PolicyIds::default());
    let (server, client) = (ip("10.244.0.5"), ip("10.244.0.6"));
    let text = render_explain(&explain_view(&s, &s.verdict(client, server, PROTO_TCP, 80)));
    assert_eq!(
        text,
        "ALLOWED\n  egress of x/client: no policy isolates it\n  ingress of x/server: allowed by \
         rule 1 (x/web ingress[0] from[0] ports[0]), peer pods ns=x {app=cli} [ingress \
         from=256 TCP 80]\n"
    );
    let denied = explain_view(&s, &s.verdict(ip("203.0.113.1"), server, PROTO_TCP, 80));
    assert!(!denied.allowed);
    assert_eq!(
        render_explain(&denied),
        "DENIED\n  egress: not a pod of this node, not judged here\n  ingress of x/server: \
         denied, no rule allows peer world (identity 1)\n"
    );
    let json = serde_json::to_value(&denied).unwrap();
    assert_eq!(json["ingress"]["outcome"], "denied");
    assert_eq!(json["egress"]["outcome"], "unmanaged");
}
