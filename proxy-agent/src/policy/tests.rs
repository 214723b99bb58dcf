//! The policy syncer and explain against the fake maps (no kernel); the reconciler's own
//! tests are in `twill_core::reconcile::policy`.

mod syncer {
    use std::net::Ipv4Addr;
    use std::path::Path;

    use twill_common::{
        Backend, PEP_F_INGRESS_ISOLATED, PROTO_TCP, SCOPE_ANY, ServiceKey, ServiceValue, SlotKey,
    };
    use twill_core::policy::addr_be;

    use super::super::explain::{ExplainInputs, ExplainQuery};
    use super::super::*;
    use crate::compile::DumpModel;
    use crate::lbmap::LbState;
    use crate::metrics::Metrics;
    use crate::source::manifests::parse_text;
    use crate::source::{Kind, Snapshot, Stores};

    const OBJECTS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.5}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";
    const ALLOW: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: http}]}]
";
    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

    fn load(stores: &Stores, text: &str) {
        let parsed = parse_text(Path::new("x.yaml"), text, false).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        stores.replace_all(&Snapshot::from_objects(parsed.objects));
    }

    #[test]
    fn store_changes_are_compiled_applied_and_pruned_once_synced() {
        let stores = Stores::new();
        let metrics = Metrics::new();
        load(&stores, &format!("{OBJECTS}---{ALLOW}"));
        let mut s = PolicySyncer::new("n1", PolicyReconciler::new(FakePolicyMaps::default()));
        assert!(s.sync(
            &stores,
            vec![Ipv4Addr::new(172, 30, 0, 11).into()],
            &metrics
        ));
        let maps = &s.reconciler().maps().state;
        assert_eq!(
            maps.endpoints.get(&addr_be(A)).map(|e| e.flags),
            Some(PEP_F_INGRESS_ISOLATED),
            "only the local pod is an endpoint, isolated by the deny policy"
        );
        assert_eq!(maps.endpoints.len(), 1);
        assert!(s.state().verdict(B, A, PROTO_TCP, 80).allowed());
        assert!(!s.state().verdict(B, A, PROTO_TCP, 81).allowed());
        let rules = maps.policy.len();

        // The allow policy goes: recompiled at once, but its entries stay until every source
        // has synced (a partial view must not delete live rules).
        load(&stores, OBJECTS);
        assert!(s.sync(
            &stores,
            vec![Ipv4Addr::new(172, 30, 0, 11).into()],
            &metrics
        ));
        assert!(!s.state().verdict(B, A, PROTO_TCP, 80).allowed());
        assert_eq!(s.reconciler().maps().state.policy.len(), rules);
        for kind in Kind::ALL {
            stores.mark_synced(kind);
        }
        assert!(s.sync(
            &stores,
            vec![Ipv4Addr::new(172, 30, 0, 11).into()],
            &metrics
        ));
        assert_eq!(s.reconciler().maps().state, s.state().maps);
        assert!(
            metrics.render().contains("twill_network_policies 1"),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn a_full_map_is_reported_and_retried() {
        let stores = Stores::new();
        let metrics = Metrics::new();
        load(&stores, &format!("{OBJECTS}---{ALLOW}"));
        let fake = FakePolicyMaps {
            policy_capacity: Some(0),
            ..FakePolicyMaps::default()
        };
        let mut s = PolicySyncer::new("n1", PolicyReconciler::new(fake));
        assert!(!s.sync(&stores, Vec::new(), &metrics));
        assert!(s.retry_delay().is_some());
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "twill_map_errors_total{{map=\"{}\",kind=\"full\"}} 1",
                twill_common::MapKind::Policy.name()
            )) && text.contains("twill_policy_sync_errors_total 1"),
            "{text}"
        );
        s.reconciler_mut().maps_mut().policy_capacity = None;
        assert!(
            s.sync(&stores, Vec::new(), &metrics),
            "retried without a store change"
        );
        assert!(s.retry_delay().is_none());
    }

    #[test]
    fn explain_resolves_a_cluster_ip_to_its_backends() {
        let stores = Stores::new();
        let metrics = Metrics::new();
        load(&stores, &format!("{OBJECTS}---{ALLOW}"));
        let mut s = PolicySyncer::new("n1", PolicyReconciler::new(FakePolicyMaps::default()));
        s.sync(&stores, Vec::new(), &metrics);
        let mut lb = LbState::default();
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        lb.services.insert(
            ServiceKey {
                addr_be: addr_be(vip),
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                scope: SCOPE_ANY,
            },
            ServiceValue {
                svc_id: 1,
                backend_count: 1,
                flags: 0,
                affinity_timeout_s: 0,
                maglev_size: 0,
            },
        );
        lb.slots.insert(SlotKey { svc_id: 1, slot: 0 }, 7);
        lb.backends.insert(
            7,
            Backend {
                addr_be: addr_be(A),
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                flags: 0,
            },
        );
        let state = s.state();
        let objects = s.objects();
        let model = DumpModel::default();
        let inputs = ExplainInputs {
            state: &state,
            objects: &objects,
            lb: &lb,
            model: &model,
        };
        let e = inputs
            .explain(&ExplainQuery {
                from: "x/b".into(),
                to: "10.96.0.10:80".into(),
                proto: PROTO_TCP,
            })
            .unwrap();
        assert_eq!(e.service.as_deref(), Some("10.96.0.10:80"));
        assert_eq!(e.destinations.len(), 1);
        assert_eq!(
            (e.destinations[0].addr, e.destinations[0].port),
            (A.into(), 80)
        );
        assert!(e.destinations[0].verdict.allowed, "{}", e.render());
        assert!(e.render().contains("x/allow-b"), "{}", e.render());
        let denied = inputs
            .explain(&ExplainQuery {
                from: "172.30.0.200".into(),
                to: "x/a:80".into(),
                proto: PROTO_TCP,
            })
            .unwrap();
        assert!(
            !denied.destinations[0].verdict.allowed,
            "{}",
            denied.render()
        );
        assert!(
            inputs
                .explain(&ExplainQuery {
                    from: "x/nope".into(),
                    to: "x/a:80".into(),
                    proto: PROTO_TCP,
                })
                .is_err()
        );
    }

    /// `debug explain` over IPv6: IPv6 addresses (bracketed with a port), a pod target in the
    /// source's family, and an IPv6 ClusterIP resolved to its IPv6 backend.
    #[test]
    fn explain_answers_for_ipv6_addresses_pods_and_cluster_ips() {
        let stores = Stores::new();
        let metrics = Metrics::new();
        let dual = OBJECTS
            .replace(
                "[{ip: 10.244.1.5}]",
                "[{ip: 10.244.1.5}, {ip: \"fd00::a\"}]",
            )
            .replace(
                "[{ip: 10.244.2.5}]",
                "[{ip: 10.244.2.5}, {ip: \"fd00::b\"}]",
            );
        load(&stores, &format!("{dual}---{ALLOW}"));
        let mut s = PolicySyncer::new("n1", PolicyReconciler::new(FakePolicyMaps::default()));
        s.sync(&stores, Vec::new(), &metrics);
        let a6: std::net::Ipv6Addr = "fd00::a".parse().unwrap();
        let vip6: std::net::Ipv6Addr = "fd00:96::10".parse().unwrap();
        let mut lb = LbState::default();
        lb.services6.insert(
            twill_common::ServiceKey6 {
                addr_be: twill_core::policy::addr6_be(vip6),
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                scope: SCOPE_ANY,
            },
            ServiceValue {
                svc_id: 1,
                backend_count: 1,
                flags: 0,
                affinity_timeout_s: 0,
                maglev_size: 0,
            },
        );
        lb.slots.insert(SlotKey { svc_id: 1, slot: 0 }, 7);
        lb.backends6.insert(
            7,
            twill_common::Backend6 {
                addr_be: twill_core::policy::addr6_be(a6),
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                flags: 0,
            },
        );
        let (state, objects, model) = (s.state(), s.objects(), DumpModel::default());
        let inputs = ExplainInputs {
            state: &state,
            objects: &objects,
            lb: &lb,
            model: &model,
        };
        let ask = |from: &str, to: &str| {
            inputs.explain(&ExplainQuery {
                from: from.into(),
                to: to.into(),
                proto: PROTO_TCP,
            })
        };
        // The pod client reaches the IPv6 ClusterIP's backend with its own IPv6 address.
        let e = ask("x/b", "[fd00:96::10]:80").unwrap();
        assert_eq!(e.service.as_deref(), Some("[fd00:96::10]:80"));
        assert_eq!(e.destinations[0].addr, std::net::IpAddr::V6(a6));
        assert!(e.destinations[0].verdict.allowed, "{}", e.render());
        assert!(e.render().contains("[fd00::a]:80"), "{}", e.render());
        // Another IPv6 address: denied by a's ingress, port 80 resolved on a's IPv6 address.
        let e = ask("fd00::99", "x/a:80").unwrap();
        assert_eq!(e.destinations[0].addr, std::net::IpAddr::V6(a6));
        assert!(!e.destinations[0].verdict.allowed, "{}", e.render());
        // Bare IPv6 addresses: b's own is allowed, on the port of the named port only.
        assert!(
            ask("fd00::b", "[fd00::a]:80").unwrap().destinations[0]
                .verdict
                .allowed
        );
        assert!(
            !ask("fd00::b", "[fd00::a]:81").unwrap().destinations[0]
                .verdict
                .allowed
        );
        assert!(matches!(
            ask("fd00::b", "fd00::a"),
            Err(super::super::explain::ExplainError::NeedsPort(_))
        ));
    }
}
