//! Reconciler tests against the fake and the fault injector (no kernel).
use std::cell::RefCell;
use std::rc::Rc;

use twill_common::{
    IpCacheKey, PEP_F_INGRESS_ISOLATED, POLICY_DIR_INGRESS, POLICY_PREFIX_ANY_PROTO, PeerIdentity,
    PolicyEndpoint, PolicyKey, PolicyVerdict,
};
use twill_core::policy::LpmKey;

use super::*;
use crate::lbmap::{FaultPlan, MapError, MapKind};

fn rule(ep: u32, identity: u32, rule_id: u32) -> (LpmKey<PolicyKey>, PolicyVerdict) {
    (
        LpmKey {
            data: PolicyKey {
                ep_id_be: ep.to_be(),
                direction: POLICY_DIR_INGRESS,
                _pad: [0; 3],
                identity_be: identity.to_be(),
                proto: 0,
                _pad2: 0,
                port_be: 0,
            },
            prefix_len: POLICY_PREFIX_ANY_PROTO,
        },
        PolicyVerdict { rule_id },
    )
}

fn peer(last_octet: u8, id: u32) -> (LpmKey<IpCacheKey>, PeerIdentity) {
    (
        LpmKey {
            data: IpCacheKey {
                addr_be: u32::from_ne_bytes([10, 244, 0, last_octet]),
            },
            prefix_len: 32,
        },
        PeerIdentity { id },
    )
}

/// Pod `.1` (endpoint 1, ingress-isolated) admits identity `allowed`; pods `.2`/`.3` carry
/// identities 256/257.
fn state(allowed: u32, second_peer_id: u32) -> PolicyEntries {
    PolicyEntries {
        endpoints: [(
            u32::from_ne_bytes([10, 244, 0, 1]),
            PolicyEndpoint {
                ep_id: 1,
                flags: PEP_F_INGRESS_ISOLATED,
            },
        )]
        .into(),
        ipcache: [peer(2, 256), peer(3, second_peer_id)].into(),
        policy: [rule(1, allowed, 7)].into(),
    }
}

/// A [`PolicyMaps`] that logs (operation, map) and forwards to a fake.
#[derive(Default)]
struct Recording {
    inner: FakePolicyMaps,
    log: Rc<RefCell<Vec<(&'static str, MapKind)>>>,
}

impl PolicyMaps for Recording {
    fn upsert_endpoint(&mut self, a: u32, ep: PolicyEndpoint) -> Result<(), MapError> {
        self.log
            .borrow_mut()
            .push(("upsert", MapKind::PolicyEndpoints));
        self.inner.upsert_endpoint(a, ep)
    }
    fn delete_endpoint(&mut self, a: u32) -> Result<(), MapError> {
        self.log
            .borrow_mut()
            .push(("delete", MapKind::PolicyEndpoints));
        self.inner.delete_endpoint(a)
    }
    fn upsert_ipcache(&mut self, k: LpmKey<IpCacheKey>, id: PeerIdentity) -> Result<(), MapError> {
        self.log.borrow_mut().push(("upsert", MapKind::IpCache));
        self.inner.upsert_ipcache(k, id)
    }
    fn delete_ipcache(&mut self, k: &LpmKey<IpCacheKey>) -> Result<(), MapError> {
        self.log.borrow_mut().push(("delete", MapKind::IpCache));
        self.inner.delete_ipcache(k)
    }
    fn upsert_policy(&mut self, k: LpmKey<PolicyKey>, v: PolicyVerdict) -> Result<(), MapError> {
        self.log.borrow_mut().push(("upsert", MapKind::Policy));
        self.inner.upsert_policy(k, v)
    }
    fn delete_policy(&mut self, k: &LpmKey<PolicyKey>) -> Result<(), MapError> {
        self.log.borrow_mut().push(("delete", MapKind::Policy));
        self.inner.delete_policy(k)
    }
    fn dump(&self) -> Result<PolicyEntries, MapError> {
        self.inner.dump()
    }
}

#[test]
fn applies_and_then_writes_nothing() {
    let mut r = PolicyReconciler::new(FakePolicyMaps::default());
    let desired = state(256, 257);
    let stats = r.apply(&desired, true).unwrap();
    assert_eq!(stats.writes(), 4);
    assert_eq!(r.maps().state, desired);
    assert_eq!(r.apply(&desired, true).unwrap().writes(), 0);
}

#[test]
fn new_rules_go_in_before_what_points_at_them_and_out_after() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let maps = Recording {
        log: log.clone(),
        ..Recording::default()
    };
    let mut r = PolicyReconciler::new(maps);
    r.apply(&state(256, 257), true).unwrap();
    assert_eq!(
        *log.borrow(),
        [
            ("upsert", MapKind::Policy),
            ("upsert", MapKind::IpCache),
            ("upsert", MapKind::IpCache),
            ("upsert", MapKind::PolicyEndpoints),
        ]
    );
    // Peer .3 moves to the identity that is allowed, the old rule goes: the new rule first,
    // then the peer's identity, and the old rule last.
    log.borrow_mut().clear();
    let next = state(258, 258);
    r.apply(&next, true).unwrap();
    assert_eq!(
        *log.borrow(),
        [
            ("upsert", MapKind::Policy),
            ("upsert", MapKind::IpCache),
            ("delete", MapKind::Policy),
        ]
    );
    assert_eq!(r.maps().inner.state, next);
}

#[test]
fn a_full_rule_map_is_a_named_error_and_the_pod_stays_isolated() {
    let fake = FakePolicyMaps {
        policy_capacity: Some(0),
        ..FakePolicyMaps::default()
    };
    let mut r = PolicyReconciler::new(fake);
    let desired = state(256, 257);
    let err = r.apply(&desired, true).unwrap_err();
    assert_eq!(err.full_maps(), vec![MapKind::Policy]);
    assert!(
        err.to_string()
            .contains(&format!("{} is full", MapKind::Policy.name())),
        "{err}"
    );
    // Fail closed: the endpoint is isolated even though its allow rule is missing.
    assert_eq!(r.maps().state.endpoints, desired.endpoints);
    assert!(r.maps().state.policy.is_empty());
    assert_eq!(r.applied(), &r.maps().state, "bookkeeping is exact");
    // Room again: the next apply writes just the rule.
    r.maps_mut().policy_capacity = None;
    assert_eq!(r.apply(&desired, true).unwrap().rules_upserted, 1);
    assert_eq!(r.maps().state, desired);
}

#[test]
fn rules_stay_while_an_identity_switch_failed() {
    let mut r = PolicyReconciler::new(FaultyPolicyMaps::new(
        FakePolicyMaps::default(),
        FaultPlan::none(),
    ));
    r.apply(&state(256, 257), true).unwrap();
    // The allowed identity changes and the peer's switch to it fails: the old rule must stay
    // (the peer still carries the old identity in the kernel).
    r.maps_mut().plan = FaultPlan::none().fail_map(MapKind::IpCache);
    let mut next = state(258, 258);
    next.ipcache.insert(peer(2, 258).0, peer(2, 258).1);
    let err = r.apply(&next, true).unwrap_err();
    let Some(stats) = (match &err {
        PolicyReconcileError::Incomplete { stats, .. } => Some(stats),
        PolicyReconcileError::Adopt(_) => None,
    }) else {
        panic!("{err}")
    };
    assert_eq!(stats.deferred, 1);
    assert!(r.maps().inner.state.policy.contains_key(&rule(1, 256, 7).0));
    r.maps_mut().plan = FaultPlan::none();
    r.apply(&next, true).unwrap();
    assert_eq!(r.maps().inner.state, next);
}

#[test]
fn converges_after_a_failure_at_every_operation() {
    let from = state(256, 257);
    let mut to = state(258, 259);
    to.ipcache.insert(peer(4, 258).0, peer(4, 258).1);
    to.endpoints.clear();
    for n in 0..12 {
        let mut r = PolicyReconciler::new(FaultyPolicyMaps::new(
            FakePolicyMaps::default(),
            FaultPlan::none(),
        ));
        r.apply(&from, true).unwrap();
        r.maps_mut().plan = FaultPlan::none().fail_nth(r.maps().ops + n);
        let _ = r.apply(&to, true);
        assert_eq!(
            r.applied(),
            &r.maps().inner.state,
            "bookkeeping exact after a failure at operation {n}"
        );
        r.apply(&to, true).unwrap();
        assert_eq!(r.maps().inner.state, to, "converged (failure at {n})");
    }
}

#[test]
fn nothing_is_pruned_before_the_sources_synced_and_adoption_reads_the_maps() {
    let fake = FakePolicyMaps {
        state: state(256, 257),
        ..FakePolicyMaps::default()
    };
    let mut r = PolicyReconciler::adopt(fake).unwrap();
    assert_eq!(r.applied(), &state(256, 257));
    let empty = PolicyEntries::default();
    assert_eq!(r.apply(&empty, false).unwrap().writes(), 0);
    assert_eq!(r.maps().state, state(256, 257));
    assert_eq!(r.apply(&empty, true).unwrap().writes(), 4);
    assert_eq!(r.maps().state, empty);
}

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
        assert!(s.sync(&stores, vec![Ipv4Addr::new(172, 30, 0, 11)], &metrics));
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
        assert!(s.sync(&stores, vec![Ipv4Addr::new(172, 30, 0, 11)], &metrics));
        assert!(!s.state().verdict(B, A, PROTO_TCP, 80).allowed());
        assert_eq!(s.reconciler().maps().state.policy.len(), rules);
        for kind in Kind::ALL {
            stores.mark_synced(kind);
        }
        assert!(s.sync(&stores, vec![Ipv4Addr::new(172, 30, 0, 11)], &metrics));
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
        assert_eq!((e.destinations[0].addr, e.destinations[0].port), (A, 80));
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
}
