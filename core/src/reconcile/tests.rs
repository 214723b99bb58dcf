use std::collections::BTreeSet;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use proptest::prelude::*;
use twill_common::{
    Backend, Backend6, DatapathConfig, PROTO_TCP, SCOPE_ANY, SVC_F_LOADBALANCER,
    SVC_F_SOURCE_RANGES, ServiceKey, ServiceKey6, ServiceValue, SlotKey,
};

use super::{Reconciler, check_invariant};
use crate::lbmap::{FakeLbMaps, FaultPlan, FaultyLbMaps, LbMaps, LbState, MapError, MapKind};

/// Fake maps that check the datapath invariant after every successful write and remember the
/// first violation, plus the order of operations.
#[derive(Debug, Default)]
struct CheckedMaps {
    fake: FakeLbMaps,
    violation: Option<String>,
    log: Vec<(&'static str, MapKind)>,
}

impl CheckedMaps {
    fn after(&mut self, op: &'static str, map: MapKind) {
        self.log.push((op, map));
        if self.violation.is_none()
            && let Err(v) = check_invariant(&self.fake.state)
        {
            self.violation = Some(format!("after {op} on {map:?} (#{}): {v}", self.log.len()));
        }
    }
}

impl LbMaps for CheckedMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.fake.upsert_service(key, value)?;
        self.after("upsert", MapKind::Services);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.fake.delete_service(key)?;
        self.after("delete", MapKind::Services);
        Ok(())
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError> {
        self.fake.upsert_slot(key, backend_id)?;
        self.after("upsert", MapKind::BackendSlots);
        Ok(())
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        self.fake.delete_slot(key)?;
        self.after("delete", MapKind::BackendSlots);
        Ok(())
    }
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.fake.upsert_backend(id, backend)?;
        self.after("upsert", MapKind::Backends);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.fake.delete_backend(id)?;
        self.after("delete", MapKind::Backends);
        Ok(())
    }
    fn upsert_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<(), MapError> {
        self.fake.upsert_service6(key, value)?;
        self.after("upsert", MapKind::Services6);
        Ok(())
    }
    fn delete_service6(&mut self, key: &ServiceKey6) -> Result<(), MapError> {
        self.fake.delete_service6(key)?;
        self.after("delete", MapKind::Services6);
        Ok(())
    }
    fn upsert_backend6(&mut self, id: u32, backend: Backend6) -> Result<(), MapError> {
        self.fake.upsert_backend6(id, backend)?;
        self.after("upsert", MapKind::Backends6);
        Ok(())
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapError> {
        self.fake.delete_backend6(id)?;
        self.after("delete", MapKind::Backends6);
        Ok(())
    }
    fn flush_backends6_state(&mut self, backends: &[(u32, Backend6)]) -> Result<(), MapError> {
        self.fake.flush_backends6_state(backends)?;
        self.after("flush", MapKind::Affinity);
        Ok(())
    }
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError> {
        self.fake.upsert_node_addr(addr_be, flags)?;
        self.after("upsert", MapKind::NodeAddrs);
        Ok(())
    }
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError> {
        self.fake.delete_node_addr(addr_be)?;
        self.after("delete", MapKind::NodeAddrs);
        Ok(())
    }
    fn upsert_node_addr6(&mut self, addr_be: [u32; 4], flags: u32) -> Result<(), MapError> {
        self.fake.upsert_node_addr6(addr_be, flags)?;
        self.after("upsert", MapKind::NodeAddrs6);
        Ok(())
    }
    fn delete_node_addr6(&mut self, addr_be: [u32; 4]) -> Result<(), MapError> {
        self.fake.delete_node_addr6(addr_be)?;
        self.after("delete", MapKind::NodeAddrs6);
        Ok(())
    }
    fn upsert_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        self.fake.upsert_source_range(svc_id, range)?;
        self.after("upsert", crate::lbmap::source_ranges_map(&range));
        Ok(())
    }
    fn delete_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        self.fake.delete_source_range(svc_id, range)?;
        self.after("delete", crate::lbmap::source_ranges_map(&range));
        Ok(())
    }
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError> {
        self.fake.set_config(config)?;
        self.after("set", MapKind::Config);
        Ok(())
    }
    fn dump(&self) -> Result<LbState, MapError> {
        self.fake.dump()
    }
    fn flush_backend_state(&mut self, backend_id: u32, backend: Backend) -> Result<(), MapError> {
        self.fake.flush_backend_state(backend_id, backend)?;
        self.after("flush", MapKind::Affinity);
        Ok(())
    }
}

fn key(n: u8) -> ServiceKey {
    ServiceKey {
        addr_be: u32::from_ne_bytes([10, 96, 0, n]),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    }
}

fn backend(n: u32) -> Backend {
    let [_, _, hi, lo] = n.to_be_bytes();
    Backend {
        addr_be: u32::from_ne_bytes([10, 244, hi, lo]),
        port_be: 8080u16.to_be(),
        proto: PROTO_TCP,
        flags: 0,
    }
}

/// A consistent state: `groups` of (`svc_id`, frontend numbers, backend ids).
fn state(groups: &[(u32, &[u8], &[u32])]) -> LbState {
    let mut s = LbState::default();
    for &(svc_id, frontends, backends) in groups {
        for (slot, &b) in (0u32..).zip(backends) {
            s.slots.insert(SlotKey { svc_id, slot }, b);
            s.backends.insert(b, backend(b));
        }
        for &f in frontends {
            let value = ServiceValue {
                svc_id,
                backend_count: u16::try_from(backends.len()).unwrap(),
                flags: 1,
                affinity_timeout_s: 0,
                maglev_size: 0,
            };
            s.services.insert(key(f), value);
        }
    }
    s.node_addrs.insert(u32::from_ne_bytes([172, 30, 0, 10]), 0);
    s.config = DatapathConfig {
        nodeport_min: 30_000,
        nodeport_max: 32_767,
        _pad: 0,
        host_netns_cookie: 7,
    };
    s
}

#[test]
fn applies_to_empty_maps_in_dependency_order() {
    let desired = state(&[(1, &[1, 2], &[10, 11]), (2, &[3], &[11, 12])]);
    let mut rec = Reconciler::new(CheckedMaps::default());
    let stats = rec.apply(&desired, true).expect("clean apply");
    assert_eq!(rec.maps().fake.state, desired);
    assert_eq!(rec.applied(), &desired);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(
        (
            stats.backends_upserted,
            stats.slots_upserted,
            stats.services_upserted
        ),
        (3, 4, 3)
    );
    // Backends first, then slots, then services.
    let kinds: Vec<MapKind> = rec
        .maps()
        .log
        .iter()
        .map(|(_, k)| *k)
        .filter(|k| *k != MapKind::Config && *k != MapKind::NodeAddrs)
        .collect();
    let first_slot = kinds
        .iter()
        .position(|k| *k == MapKind::BackendSlots)
        .unwrap();
    let first_svc = kinds.iter().position(|k| *k == MapKind::Services).unwrap();
    assert!(kinds[..first_slot].iter().all(|k| *k == MapKind::Backends));
    assert!(
        kinds[first_slot..first_svc]
            .iter()
            .all(|k| *k == MapKind::BackendSlots)
    );
    // Nothing to do the second time.
    assert_eq!(rec.apply(&desired, true).expect("no-op").writes(), 0);
}

#[test]
fn shrinking_and_removal_keep_the_invariant_and_flush_removed_backends() {
    let before = state(&[(1, &[1], &[10, 11, 12]), (2, &[2], &[13])]);
    let after = state(&[(1, &[1], &[10])]);
    let mut rec = Reconciler::new(CheckedMaps::default());
    rec.apply(&before, true).unwrap();
    let stats = rec.apply(&after, true).unwrap();
    assert_eq!(rec.maps().fake.state, after);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(stats.services_deleted, 1);
    assert_eq!(stats.slots_deleted, 3);
    let mut flushed = rec.maps().fake.flushed_backends.clone();
    flushed.sort_unstable();
    assert_eq!(flushed, vec![11, 12, 13]);
}

#[test]
fn no_pruning_until_told() {
    let before = state(&[(1, &[1], &[10]), (2, &[2], &[11])]);
    let after = state(&[(1, &[1], &[10])]);
    let mut rec = Reconciler::new(FakeLbMaps::default());
    rec.apply(&before, true).unwrap();
    let stats = rec.apply(&after, false).unwrap();
    assert_eq!(stats.writes(), 0);
    assert_eq!(rec.maps().state, before, "nothing deleted before sync");
    rec.apply(&after, true).unwrap();
    assert_eq!(rec.maps().state, after);
}

#[test]
fn adopting_pinned_maps_rewrites_nothing_and_prunes_stale_entries_later() {
    let pinned = state(&[(1, &[1], &[10]), (7, &[2], &[11])]);
    let maps = FakeLbMaps {
        state: pinned.clone(),
        ..FakeLbMaps::default()
    };
    let mut rec = Reconciler::adopt(maps).unwrap();
    assert_eq!(rec.applied(), &pinned);
    let desired = state(&[(1, &[1], &[10])]);
    assert_eq!(rec.apply(&desired, false).unwrap().writes(), 0);
    let stats = rec.apply(&desired, true).unwrap();
    assert_eq!(
        (
            stats.services_deleted,
            stats.slots_deleted,
            stats.backends_deleted
        ),
        (1, 1, 1)
    );
    assert_eq!(rec.maps().state, desired);
}

#[test]
fn adopt_failure_is_a_typed_error() {
    let maps = FaultyLbMaps::new(FakeLbMaps::default(), FaultPlan::none().fail_dump());
    let err = Reconciler::adopt(maps).unwrap_err();
    assert_eq!(err.metric_label(), "adopt");
}

#[test]
fn full_map_is_named_and_everything_else_is_applied() {
    let desired = state(&[(1, &[1, 2, 3], &[10]), (2, &[4], &[11])]);
    let fake = FakeLbMaps {
        services_capacity: Some(2),
        ..FakeLbMaps::default()
    };
    let mut rec = Reconciler::new(fake);
    let err = rec.apply(&desired, true).unwrap_err();
    assert_eq!(err.full_maps(), vec![MapKind::Services]);
    assert!(err.to_string().contains(MapKind::Services.name()), "{err}");
    assert_eq!(rec.maps().state.services.len(), 2);
    assert_eq!(rec.maps().state.backends, desired.backends);
    assert_eq!(rec.applied(), &rec.maps().state);
    check_invariant(&rec.maps().state).unwrap();
    // Room made (an operator raised the size): the retry writes only what is missing.
    rec.maps_mut().services_capacity = None;
    let stats = rec.apply(&desired, true).unwrap();
    assert_eq!(stats.writes(), 2);
    assert_eq!(rec.maps().state, desired);
}

/// A change that removes one Service and adds another into a full map: the prunes of the same
/// apply make the room, and the new Service gets it in that apply (not at the next resync).
#[test]
fn room_freed_by_prunes_is_used_in_the_same_apply() {
    let fake = FakeLbMaps {
        services_capacity: Some(4),
        ..FakeLbMaps::default()
    };
    let mut rec = Reconciler::new(fake);
    let old = state(&[(1, &[1, 2], &[10]), (2, &[3], &[11])]);
    rec.apply(&old, true).unwrap();
    // Service 2 goes, Service 3 (two frontends) comes: 3 + 2 > 4 until service 2 is pruned.
    let new = state(&[(1, &[1, 2], &[10]), (3, &[4, 5], &[12])]);
    let stats = rec.apply(&new, true).unwrap();
    assert_eq!(rec.maps().state, new);
    assert_eq!(rec.applied(), &new);
    assert_eq!(stats.services_deleted, 1);
    check_invariant(&rec.maps().state).unwrap();
}

#[test]
fn failed_backend_write_defers_its_slots_and_services() {
    let desired = state(&[(1, &[1], &[10]), (2, &[2], &[11])]);
    // Op 0: config, op 1: node addr, op 2: backend 10, op 3: backend 11.
    let maps = FaultyLbMaps::new(CheckedMaps::default(), FaultPlan::none().fail_nth(2));
    let mut rec = Reconciler::new(maps);
    let err = rec.apply(&desired, true).unwrap_err();
    assert_eq!(err.metric_label(), "injected");
    let got = &rec.maps().inner.fake.state;
    assert!(!got.backends.contains_key(&10));
    assert!(
        !got.services.contains_key(&key(1)),
        "service without its backend must not be written"
    );
    assert!(got.services.contains_key(&key(2)));
    assert_eq!(rec.maps().inner.violation, None);
    rec.maps_mut().plan = FaultPlan::none();
    rec.apply(&desired, true).unwrap();
    assert_eq!(rec.maps().inner.fake.state, desired);
}

#[test]
fn inconsistent_desired_state_is_reported() {
    let mut desired = state(&[(1, &[1], &[10])]);
    desired.slots.clear();
    let mut rec = Reconciler::new(FakeLbMaps::default());
    let err = rec.apply(&desired, true).unwrap_err();
    assert_eq!(err.metric_label(), "inconsistent");
    check_invariant(&rec.maps().state).unwrap();
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// Makes frontend `f` a `LoadBalancer` frontend filtered on `ranges` (of its svc_id).
fn filtered(mut s: LbState, f: u8, ranges: &[&str]) -> LbState {
    let value = s.services.get_mut(&key(f)).unwrap();
    value.flags = SVC_F_LOADBALANCER | SVC_F_SOURCE_RANGES;
    let svc_id = value.svc_id;
    s.source_ranges
        .extend(ranges.iter().map(|r| (svc_id, net(r))));
    s
}

/// Position in the log of the first `op` on `map`.
fn first(log: &[(&'static str, MapKind)], op: &str, map: MapKind) -> usize {
    log.iter()
        .position(|&(o, m)| o == op && m == map)
        .unwrap_or_else(|| panic!("no {op} on {map:?} in {log:?}"))
}

#[test]
fn source_ranges_go_in_before_their_frontend_and_out_after_it() {
    let plain = state(&[(1, &[1], &[10])]);
    let lb = filtered(
        state(&[(1, &[1], &[10]), (2, &[2], &[11])]),
        2,
        &["10.0.0.0/8"],
    );
    let mut rec = Reconciler::new(CheckedMaps::default());
    rec.apply(&plain, true).unwrap();
    rec.maps_mut().log.clear();

    // A new filtered frontend: its range is in the trie before the frontend can see a packet.
    let stats = rec.apply(&lb, true).unwrap();
    assert_eq!(rec.maps().fake.state, lb);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(stats.source_ranges_upserted, 1);
    let log = rec.maps().log.clone();
    assert!(
        first(&log, "upsert", MapKind::SourceRanges) < first(&log, "upsert", MapKind::Services),
        "{log:?}"
    );
    assert_eq!(rec.apply(&lb, true).unwrap().writes(), 0);

    // Narrowing the ranges: the new one goes in first, the old one out after.
    let narrowed = filtered(
        state(&[(1, &[1], &[10]), (2, &[2], &[11])]),
        2,
        &["10.1.0.0/16"],
    );
    rec.maps_mut().log.clear();
    let stats = rec.apply(&narrowed, true).unwrap();
    assert_eq!(
        (stats.source_ranges_upserted, stats.source_ranges_deleted),
        (1, 1)
    );
    assert_eq!(
        rec.maps().log,
        vec![
            ("upsert", MapKind::SourceRanges),
            ("delete", MapKind::SourceRanges)
        ]
    );

    // The Service goes away: its frontend is deleted before the ranges it filtered on.
    rec.maps_mut().log.clear();
    let stats = rec.apply(&plain, true).unwrap();
    assert_eq!(rec.maps().fake.state, plain);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(
        (stats.services_deleted, stats.source_ranges_deleted),
        (1, 1)
    );
    let log = rec.maps().log.clone();
    assert!(
        first(&log, "delete", MapKind::Services) < first(&log, "delete", MapKind::SourceRanges),
        "{log:?}"
    );
}

#[test]
fn failed_source_range_write_defers_its_frontend() {
    let lb = filtered(
        state(&[(1, &[1], &[10]), (2, &[2], &[11])]),
        2,
        &["10.0.0.0/8", "192.168.0.0/16"],
    );
    let plan = FaultPlan::none().fail_map(MapKind::SourceRanges);
    let mut rec = Reconciler::new(FaultyLbMaps::new(CheckedMaps::default(), plan));
    let err = rec.apply(&lb, true).unwrap_err();
    assert_eq!(err.metric_label(), "injected");
    let got = &rec.maps().inner.fake.state;
    assert!(
        !got.services.contains_key(&key(2)),
        "a filtered frontend without its ranges must not be written"
    );
    assert!(got.services.contains_key(&key(1)), "unfiltered ones are");
    assert!(got.slots.contains_key(&SlotKey { svc_id: 2, slot: 0 }));
    assert_eq!(rec.applied(), got);
    assert_eq!(rec.maps().inner.violation, None);

    // One of two ranges written is not enough either: the frontend would turn away the rest.
    rec.maps_mut().plan = FaultPlan::none().fail_nth(rec.maps().ops + 1);
    assert!(rec.apply(&lb, true).is_err());
    let got = &rec.maps().inner.fake.state;
    assert_eq!(got.source_ranges.len(), 1);
    assert!(!got.services.contains_key(&key(2)));

    rec.maps_mut().plan = FaultPlan::none();
    let stats = rec.apply(&lb, true).unwrap();
    assert_eq!(
        (stats.source_ranges_upserted, stats.services_upserted),
        (1, 1)
    );
    assert_eq!(rec.maps().inner.fake.state, lb);
}

#[test]
fn stale_ranges_stay_while_their_replacement_is_missing() {
    let old = filtered(state(&[(2, &[2], &[11])]), 2, &["10.0.0.0/8"]);
    let new = filtered(state(&[(2, &[2], &[11])]), 2, &["172.16.0.0/12"]);
    let mut rec = Reconciler::new(FaultyLbMaps::new(CheckedMaps::default(), FaultPlan::none()));
    rec.apply(&old, true).unwrap();
    // The new range fails: deleting the old one would leave the frontend admitting nobody.
    rec.maps_mut().plan = FaultPlan::none().fail_nth(rec.maps().ops);
    let err = rec.apply(&new, true).unwrap_err();
    assert_eq!(err.metric_label(), "injected");
    assert_eq!(rec.maps().inner.fake.state, old);
    assert_eq!(rec.maps().inner.violation, None);
    rec.maps_mut().plan = FaultPlan::none();
    rec.apply(&new, true).unwrap();
    assert_eq!(rec.maps().inner.fake.state, new);
}

#[test]
fn filtered_frontend_without_desired_ranges_is_inconsistent() {
    let mut lb = filtered(state(&[(2, &[2], &[11])]), 2, &["10.0.0.0/8"]);
    lb.source_ranges.clear();
    let mut rec = Reconciler::new(CheckedMaps::default());
    let err = rec.apply(&lb, true).unwrap_err();
    assert_eq!(err.metric_label(), "inconsistent");
    assert_eq!(rec.maps().violation, None);
}

#[test]
fn adopt_reads_source_ranges_back() {
    let pinned = filtered(
        state(&[(1, &[1], &[10]), (2, &[2], &[11])]),
        2,
        &["10.0.0.0/8"],
    );
    let maps = FakeLbMaps {
        state: pinned.clone(),
        ..FakeLbMaps::default()
    };
    let mut rec = Reconciler::adopt(maps).unwrap();
    assert_eq!(rec.applied(), &pinned);
    assert_eq!(rec.apply(&pinned, true).unwrap().writes(), 0);
    // The Service lost its ranges: the flag goes first, then the range.
    let plain = state(&[(1, &[1], &[10]), (2, &[2], &[11])]);
    let stats = rec.apply(&plain, true).unwrap();
    assert_eq!(
        (stats.services_upserted, stats.source_ranges_deleted),
        (1, 1)
    );
    assert_eq!(stats.writes(), 2);
    assert_eq!(rec.maps().state, plain);
}

/// Random consistent desired states from a small key space, so successive states overlap.
fn arb_state() -> impl Strategy<Value = LbState> {
    let group = (
        1u32..6,
        proptest::collection::btree_set(0u8..8, 1..3),
        proptest::collection::vec(1u32..12, 0..5),
        // Source ranges of the group (empty: its frontends are not filtered), from 4 /8s.
        proptest::collection::btree_set(0u8..4, 0..3),
    );
    (
        proptest::collection::vec(group, 0..5),
        proptest::collection::btree_set(0u8..3, 0..3),
        0u16..3,
    )
        .prop_map(|(groups, addrs, cfg)| {
            let mut s = LbState::default();
            let mut taken = BTreeSet::new();
            for (svc_id, frontends, backends, ranges) in groups {
                if !taken.insert(svc_id) {
                    continue;
                }
                let filter = if ranges.is_empty() {
                    0
                } else {
                    SVC_F_SOURCE_RANGES
                };
                // Odd ranges are IPv6 ones (the other trie; the reconciler's rules are the same).
                s.source_ranges.extend(ranges.iter().map(|&r| {
                    let range = if r % 2 == 0 {
                        IpNetwork::V4(Ipv4Network::new([10 + r, 0, 0, 0].into(), 8).unwrap())
                    } else {
                        let a = std::net::Ipv6Addr::new(0xfd00, u16::from(r), 0, 0, 0, 0, 0, 0);
                        IpNetwork::V6(Ipv6Network::new(a, 32).unwrap())
                    };
                    (svc_id, range)
                }));
                for f in frontends {
                    // Frontends 6 and 7 are IPv6 ones (the same value, in `services6`).
                    let fk = if f >= 6 {
                        crate::family::FrontendKey::V6(key6(f))
                    } else {
                        crate::family::FrontendKey::V4(key(f))
                    };
                    if s.frontend(&fk).is_some() {
                        continue;
                    }
                    let value = ServiceValue {
                        svc_id,
                        backend_count: u16::try_from(backends.len()).unwrap(),
                        flags: u16::from(f % 3) | filter,
                        affinity_timeout_s: 0,
                        maglev_size: 0,
                    };
                    s.insert_frontend(fk, value);
                }
                for (slot, &b) in (0u32..).zip(&backends) {
                    s.slots.insert(SlotKey { svc_id, slot }, b);
                    // Backend ids 8.. are IPv6 backends (one id space, one family per id).
                    let flags = u8::from(svc_id % 2 == 0);
                    if b >= 8 {
                        let mut be = backend6(b);
                        be.flags = flags;
                        s.backends6.insert(b, be);
                    } else {
                        let mut be = backend(b);
                        be.flags = flags;
                        s.backends.insert(b, be);
                    }
                }
            }
            s.node_addrs = addrs.into_iter().map(|a| (u32::from(a) + 1, 0)).collect();
            s.config = DatapathConfig {
                nodeport_min: 30_000 + cfg,
                nodeport_max: 32_767,
                _pad: 0,
                host_netns_cookie: u64::from(cfg),
            };
            s
        })
}

fn arb_plan() -> impl Strategy<Value = FaultPlan> {
    let maps = proptest::sample::subsequence(
        vec![
            MapKind::Services,
            MapKind::BackendSlots,
            MapKind::Backends,
            MapKind::NodeAddrs,
            MapKind::Affinity,
            MapKind::SourceRanges,
            MapKind::SourceRanges6,
        ],
        0..2,
    );
    (
        proptest::collection::btree_set(0u64..60, 0..4),
        maps,
        proptest::option::of(0u64..60),
        any::<bool>(),
    )
        .prop_map(|(nth, maps, after, as_full)| FaultPlan {
            nth,
            maps: maps.into_iter().collect(),
            after,
            as_full,
            dump: false,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// From any applied state, a faulty apply of any other state keeps the datapath invariant
    /// after every single operation and keeps the bookkeeping exact; a clean retry converges to
    /// exactly the desired state.
    #[test]
    fn faulty_applies_converge(first in arb_state(), second in arb_state(), plan in arb_plan(), prune in any::<bool>()) {
        let mut rec = Reconciler::new(FaultyLbMaps::new(CheckedMaps::default(), FaultPlan::none()));
        rec.apply(&first, true).unwrap();
        prop_assert_eq!(&rec.maps().inner.fake.state, &first);

        rec.maps_mut().plan = plan;
        let _ = rec.apply(&second, prune);
        prop_assert_eq!(rec.applied(), &rec.maps().inner.fake.state, "bookkeeping drifted from the maps");
        prop_assert_eq!(rec.maps().inner.violation.clone(), None);

        rec.maps_mut().plan = FaultPlan::none();
        rec.apply(&second, true).unwrap();
        prop_assert_eq!(&rec.maps().inner.fake.state, &second);
        prop_assert_eq!(rec.maps().inner.violation.clone(), None);
        // Every backend that left the maps was flushed first.
        for id in first.backends.keys().filter(|id| !second.backends.contains_key(id)) {
            prop_assert!(rec.maps().inner.fake.flushed_backends.contains(id));
        }
    }
}

fn key6(n: u8) -> ServiceKey6 {
    ServiceKey6 {
        addr_be: crate::family::addr6_be(std::net::Ipv6Addr::new(
            0xfd00,
            0x96,
            0,
            0,
            0,
            0,
            0,
            u16::from(n),
        )),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    }
}

fn backend6(n: u32) -> Backend6 {
    Backend6 {
        addr_be: crate::family::addr6_be(std::net::Ipv6Addr::new(
            0xfd00,
            0x244,
            0,
            0,
            0,
            0,
            0,
            u16::try_from(n).unwrap(),
        )),
        port_be: 8080u16.to_be(),
        proto: PROTO_TCP,
        flags: 0,
    }
}

/// `state(groups)` plus one IPv6 group: frontend `fd00:96::<f>` of `svc_id` over IPv6 backends.
fn with_ipv6(mut s: LbState, svc_id: u32, f: u8, backends: &[u32]) -> LbState {
    for (slot, &b) in (0u32..).zip(backends) {
        s.slots.insert(SlotKey { svc_id, slot }, b);
        s.backends6.insert(
            b,
            Backend6 {
                addr_be: crate::family::addr6_be(std::net::Ipv6Addr::new(
                    0xfd00,
                    0x244,
                    0,
                    0,
                    0,
                    0,
                    0,
                    u16::try_from(b).unwrap(),
                )),
                port_be: 8080u16.to_be(),
                proto: PROTO_TCP,
                flags: 0,
            },
        );
    }
    let key = ServiceKey6 {
        addr_be: crate::family::addr6_be(std::net::Ipv6Addr::new(
            0xfd00,
            0x96,
            0,
            0,
            0,
            0,
            0,
            u16::from(f),
        )),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    };
    s.services6.insert(
        key,
        ServiceValue {
            svc_id,
            backend_count: u16::try_from(backends.len()).unwrap(),
            flags: 1,
            affinity_timeout_s: 0,
            maglev_size: 0,
        },
    );
    s
}

#[test]
fn ipv6_frontends_and_backends_follow_the_same_write_order() {
    // A dual-stack Service: one IPv4 set, one IPv6 set (ids from one space).
    let desired = with_ipv6(state(&[(1, &[1], &[10, 11])]), 2, 1, &[20, 21]);
    let mut rec = Reconciler::new(CheckedMaps::default());
    let stats = rec.apply(&desired, true).expect("clean apply");
    assert_eq!(rec.maps().fake.state, desired);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(
        (
            stats.backends_upserted,
            stats.slots_upserted,
            stats.services_upserted
        ),
        (4, 4, 2)
    );
    let log = &rec.maps().log;
    assert!(first(log, "upsert", MapKind::Backends6) < first(log, "upsert", MapKind::BackendSlots));
    assert!(first(log, "upsert", MapKind::BackendSlots) < first(log, "upsert", MapKind::Services6));

    // The IPv6 half goes: frontend first, then its slots, then its backends (flushed).
    let only_v4 = state(&[(1, &[1], &[10, 11])]);
    rec.apply(&only_v4, true).expect("clean prune");
    assert_eq!(rec.maps().fake.state, only_v4);
    assert_eq!(rec.maps().violation, None);
    assert_eq!(rec.maps().fake.flushed_backends, vec![20, 21]);
    let log = &rec.maps().log;
    assert!(first(log, "delete", MapKind::Services6) < first(log, "delete", MapKind::BackendSlots));
    assert!(first(log, "delete", MapKind::BackendSlots) < first(log, "delete", MapKind::Backends6));
}
