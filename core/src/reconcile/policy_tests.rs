//! Reconciler tests against the fake and the fault injector (no kernel).
use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::lbmap::{FaultPlan, MapError, MapKind};
use crate::policy::LpmKey;
use crate::policymap::{FakePolicyMaps, FaultyPolicyMaps};
use twill_common::{
    IpCacheKey, IpCacheKey6, PEP_F_INGRESS_ISOLATED, POLICY_DIR_INGRESS, POLICY_PREFIX_ANY_PROTO,
    PeerIdentity, PolicyEndpoint, PolicyKey, PolicyVerdict,
};

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

/// `fd00::<last>` in the maps' form.
fn addr6(last: u8) -> [u32; 4] {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[15] = last;
    twill_common::addr6_from_octets(o)
}

/// Pod `.1` (endpoint 1, ingress-isolated, dual-stack: `10.244.0.1` and `fd00::1`) admits
/// identity `allowed`; pods `.2`/`.3` carry identities 256/257 (`.2` on both families).
fn state(allowed: u32, second_peer_id: u32) -> PolicyEntries {
    let ep = PolicyEndpoint {
        ep_id: 1,
        flags: PEP_F_INGRESS_ISOLATED,
    };
    PolicyEntries {
        endpoints: [(u32::from_ne_bytes([10, 244, 0, 1]), ep)].into(),
        ipcache: [peer(2, 256), peer(3, second_peer_id)].into(),
        policy: [rule(1, allowed, 7)].into(),
        endpoints6: [(addr6(1), ep)].into(),
        ipcache6: [(
            LpmKey {
                data: IpCacheKey6 { addr_be: addr6(2) },
                prefix_len: 128,
            },
            PeerIdentity { id: 256 },
        )]
        .into(),
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
    fn upsert_endpoint6(&mut self, a: [u32; 4], ep: PolicyEndpoint) -> Result<(), MapError> {
        self.log
            .borrow_mut()
            .push(("upsert", MapKind::PolicyEndpoints6));
        self.inner.upsert_endpoint6(a, ep)
    }
    fn delete_endpoint6(&mut self, a: [u32; 4]) -> Result<(), MapError> {
        self.log
            .borrow_mut()
            .push(("delete", MapKind::PolicyEndpoints6));
        self.inner.delete_endpoint6(a)
    }
    fn upsert_ipcache6(
        &mut self,
        k: LpmKey<IpCacheKey6>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        self.log.borrow_mut().push(("upsert", MapKind::IpCache6));
        self.inner.upsert_ipcache6(k, id)
    }
    fn delete_ipcache6(&mut self, k: &LpmKey<IpCacheKey6>) -> Result<(), MapError> {
        self.log.borrow_mut().push(("delete", MapKind::IpCache6));
        self.inner.delete_ipcache6(k)
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
    assert_eq!(stats.writes(), 6);
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
            ("upsert", MapKind::IpCache6),
            ("upsert", MapKind::PolicyEndpoints),
            ("upsert", MapKind::PolicyEndpoints6),
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
    // Pod peers (/32) live in the host ipcache hash (`IpCacheSlot`).
    r.maps_mut().plan = FaultPlan::none().fail_map(MapKind::IpCacheHosts);
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
    to.endpoints6.clear();
    to.ipcache6.clear();
    for n in 0..16 {
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
    assert_eq!(r.apply(&empty, true).unwrap().writes(), 6);
    assert_eq!(r.maps().state, empty);
}

#[test]
fn host_length_ipcache_entries_live_in_the_host_hash_and_prefixes_in_the_trie() {
    use crate::policymap::IpCacheSlot as _;
    let (host, _) = peer(2, 256);
    assert_eq!(host.map(), MapKind::IpCacheHosts);
    assert_eq!(host.host(), Some(host.data));
    let block = LpmKey {
        prefix_len: 24,
        ..host
    };
    assert_eq!(block.map(), MapKind::IpCache);
    assert_eq!(block.host(), None);
    let host6 = LpmKey {
        data: IpCacheKey6 { addr_be: addr6(2) },
        prefix_len: 128,
    };
    assert_eq!(host6.map(), MapKind::IpCacheHosts6);
    let block6 = LpmKey {
        prefix_len: 64,
        ..host6
    };
    assert_eq!((block6.map(), block6.host()), (MapKind::IpCache6, None));
}

#[test]
fn a_full_host_ipcache_is_named_apart_from_the_trie() {
    // Room for one pod in the host hash, none in the trie: the second pod is refused by the
    // hash, named as such; an ipBlock prefix by the trie.
    let fake = FakePolicyMaps {
        ipcache_hosts_capacity: Some(1),
        ipcache_capacity: Some(0),
        ..FakePolicyMaps::default()
    };
    let mut r = PolicyReconciler::new(fake);
    let mut desired = state(256, 257);
    desired.ipcache6.clear();
    let err = r.apply(&desired, true).unwrap_err();
    assert_eq!(err.full_maps(), vec![MapKind::IpCacheHosts]);
    assert_eq!(r.maps().state.ipcache.len(), 1);
    r.maps_mut().ipcache_hosts_capacity = None;
    r.apply(&desired, true).unwrap();
    assert_eq!(r.maps().state, desired);
    let (host, id) = peer(9, 300);
    desired.ipcache.insert(
        LpmKey {
            prefix_len: 24,
            ..host
        },
        id,
    );
    let err = r.apply(&desired, true).unwrap_err();
    assert_eq!(err.full_maps(), vec![MapKind::IpCache]);
}
