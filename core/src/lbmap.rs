//! The narrow seam for kernel map writes (`HOUSE_STYLE` §6).
//!
//! Everything the reconciler does to the datapath goes through [`LbMaps`]. Three implementations:
//! the aya one (`datapath::AyaLbMaps`, real pinned maps), an in-memory fake ([`FakeLbMaps`]) and a
//! fault injector wrapping any implementation, so the reconciler's diff/apply logic is tested
//! without a kernel, including half-failed applies.
use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::{IpNetwork, Ipv4Network};
use twill_common::{
    Backend, Backend6, DatapathConfig, ServiceKey, ServiceKey6, ServiceValue, SlotKey,
};

use crate::family::{AnyBackend, FrontendKey};

/// Which map an operation touched; used in errors and as a metric label (the catalogue's).
pub use twill_common::MapKind;

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map has no room for a new key (E2BIG from the kernel): never a silent drop.
    #[error("map {} is full ({capacity} entries); raise its size with the agent's --{}", .map.name(), .map.spec().size_flag.unwrap_or("map-size-* flags"))]
    Full { map: MapKind, capacity: u32 },
    #[error("{op} on map {} failed", .map.name())]
    Syscall {
        map: MapKind,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Injected by the fault injector in tests.
    #[error("injected fault on {op} of map {}", .map.name())]
    Injected { map: MapKind, op: &'static str },
}

impl MapError {
    /// The map the failed operation touched (a metric label, with [`MapKind::name`]).
    pub fn map(&self) -> MapKind {
        match self {
            MapError::Full { map, .. }
            | MapError::Syscall { map, .. }
            | MapError::Injected { map, .. } => *map,
        }
    }

    /// Short stable label for the `twill_map_errors_total{kind=…}` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MapError::Full { .. } => "full",
            MapError::Syscall { .. } => "syscall",
            MapError::Injected { .. } => "injected",
        }
    }
}

/// What the load-balancing maps hold (or should hold). Sorted maps so dumps are stable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// IPv6 frontends (`SERVICES6`); their values key the same slots as IPv4 ones.
    pub services6: BTreeMap<ServiceKey6, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    /// IPv6 backends (`BACKENDS6`), from the same id space as `backends`: an id is in one of the
    /// two maps.
    pub backends6: BTreeMap<u32, Backend6>,
    /// Addresses (network order) `NodePort` frontends answer on.
    pub node_addrs: BTreeMap<u32, u32>,
    /// IPv6 addresses (`addr6_from_octets` words) IPv6 `NodePort` frontends answer on.
    pub node_addrs6: BTreeMap<[u32; 4], u32>,
    /// `loadBalancerSourceRanges` as (`svc_id`, allowed client range): a frontend whose flags
    /// carry `SVC_F_SOURCE_RANGES` admits only clients inside a range of its `svc_id` (none: no
    /// client). Ranges are canonical (host bits zero), as the kernel's trie key stores them, so
    /// desired and dumped sets compare equal. Both families: an IPv4 range lives in
    /// `LB_SRC_RANGES`, an IPv6 one in `LB_SRC_RANGES6` ([`source_ranges_map`]); a backend set
    /// has one family, so its `svc_id` has ranges of that family only.
    pub source_ranges: BTreeSet<(u32, IpNetwork)>,
    pub config: DatapathConfig,
}

impl LbState {
    /// The frontend at `key`, of either family.
    pub fn frontend(&self, key: &FrontendKey) -> Option<&ServiceValue> {
        match key {
            FrontendKey::V4(k) => self.services.get(k),
            FrontendKey::V6(k) => self.services6.get(k),
        }
    }

    pub fn insert_frontend(&mut self, key: FrontendKey, value: ServiceValue) {
        match key {
            FrontendKey::V4(k) => self.services.insert(k, value),
            FrontendKey::V6(k) => self.services6.insert(k, value),
        };
    }

    pub fn remove_frontend(&mut self, key: &FrontendKey) {
        match key {
            FrontendKey::V4(k) => self.services.remove(k),
            FrontendKey::V6(k) => self.services6.remove(k),
        };
    }

    /// Every frontend of both families: IPv4 first, each family in key order.
    pub fn frontends(&self) -> impl Iterator<Item = (FrontendKey, &ServiceValue)> {
        self.services
            .iter()
            .map(|(k, v)| (FrontendKey::V4(*k), v))
            .chain(self.services6.iter().map(|(k, v)| (FrontendKey::V6(*k), v)))
    }

    /// The backend with id `id`, of either family.
    pub fn backend(&self, id: u32) -> Option<AnyBackend> {
        self.backends
            .get(&id)
            .map(|b| AnyBackend::V4(*b))
            .or_else(|| self.backends6.get(&id).map(|b| AnyBackend::V6(*b)))
    }

    pub fn has_backend(&self, id: u32) -> bool {
        self.backends.contains_key(&id) || self.backends6.contains_key(&id)
    }

    /// Sets backend `id` (an id lives in one family's map: the other's entry goes).
    pub fn insert_backend(&mut self, id: u32, be: AnyBackend) {
        match be {
            AnyBackend::V4(b) => {
                self.backends6.remove(&id);
                self.backends.insert(id, b);
            }
            AnyBackend::V6(b) => {
                self.backends.remove(&id);
                self.backends6.insert(id, b);
            }
        }
    }

    pub fn remove_backend(&mut self, id: u32) {
        self.backends.remove(&id);
        self.backends6.remove(&id);
    }

    /// Number of frontends of both families.
    pub fn frontend_count(&self) -> usize {
        self.services.len() + self.services6.len()
    }

    /// Number of backends of both families.
    pub fn backend_count(&self) -> usize {
        self.backends.len() + self.backends6.len()
    }

    /// The source ranges of `svc_id`, sorted.
    pub fn source_ranges_of(&self, svc_id: u32) -> impl Iterator<Item = IpNetwork> + '_ {
        // `0.0.0.0/0` is the smallest range in `IpNetwork`'s order (IPv4 first, then address,
        // then prefix).
        let first = IpNetwork::V4(
            Ipv4Network::new_checked(std::net::Ipv4Addr::UNSPECIFIED, 0)
                .expect("prefix 0 is valid"),
        );
        self.source_ranges
            .range((svc_id, first)..)
            .take_while(move |(id, _)| *id == svc_id)
            .map(|(_, r)| *r)
    }
}

/// One version of a desired state, as one [`Compiler`](crate::compile::Compiler) handed it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateVersion {
    /// Which compiler (versions of different compilers are unrelated).
    pub origin: u64,
    pub seq: u64,
}

/// Keys of a desired [`LbState`] whose entries may differ from those of version `since` (a
/// superset: listed entries may be unchanged). `node_addrs`, `node_addrs6` and `config` are
/// small and always compared whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateChanges {
    /// `None`: relative to nothing known, compare everything.
    pub since: Option<StateVersion>,
    /// The version the desired state now is.
    pub version: Option<StateVersion>,
    pub services: BTreeSet<ServiceKey>,
    pub services6: BTreeSet<ServiceKey6>,
    pub slots: BTreeSet<SlotKey>,
    /// Backend ids of either family.
    pub backends: BTreeSet<u32>,
    pub source_ranges: BTreeSet<(u32, IpNetwork)>,
}

impl StateChanges {
    /// Number of keys listed.
    pub fn len(&self) -> usize {
        self.services.len()
            + self.services6.len()
            + self.slots.len()
            + self.backends.len()
            + self.source_ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LbState {
    /// Makes `self`, a copy of `from` before `from` changed only at the keys of `changes`,
    /// equal to `from` again, in time proportional to the change.
    pub fn copy_changes(&mut self, from: &LbState, changes: &StateChanges) {
        fn copy<K: Ord + Copy, V: Copy>(
            mine: &mut BTreeMap<K, V>,
            theirs: &BTreeMap<K, V>,
            keys: &BTreeSet<K>,
        ) {
            for k in keys {
                match theirs.get(k) {
                    Some(v) => {
                        mine.insert(*k, *v);
                    }
                    None => {
                        mine.remove(k);
                    }
                }
            }
        }
        copy(&mut self.services, &from.services, &changes.services);
        copy(&mut self.slots, &from.slots, &changes.slots);
        copy(&mut self.services6, &from.services6, &changes.services6);
        copy(&mut self.backends, &from.backends, &changes.backends);
        copy(&mut self.backends6, &from.backends6, &changes.backends);
        for r in &changes.source_ranges {
            if from.source_ranges.contains(r) {
                self.source_ranges.insert(*r);
            } else {
                self.source_ranges.remove(r);
            }
        }
        self.node_addrs.clone_from(&from.node_addrs);
        self.node_addrs6.clone_from(&from.node_addrs6);
        self.config = from.config;
    }
}

/// `range` with its host bits cleared (`10.1.2.3/8` → `10.0.0.0/8`): the one form a range has
/// in the maps.
pub fn canonical_range(range: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(range.network(), range.prefix()).unwrap_or(range)
}

/// [`canonical_range`] of a range of either family.
pub fn canonical_net(range: IpNetwork) -> IpNetwork {
    match range {
        IpNetwork::V4(r) => IpNetwork::V4(canonical_range(r)),
        IpNetwork::V6(r) => {
            IpNetwork::V6(ipnetwork::Ipv6Network::new(r.network(), r.prefix()).unwrap_or(r))
        }
    }
}

/// The trie a source range of `range`'s family lives in.
pub fn source_ranges_map(range: &IpNetwork) -> MapKind {
    match range {
        IpNetwork::V4(_) => MapKind::SourceRanges,
        IpNetwork::V6(_) => MapKind::SourceRanges6,
    }
}

/// Writes to and reads from the load-balancing maps.
pub trait LbMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError>;
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn upsert_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<(), MapError>;
    fn delete_service6(&mut self, key: &ServiceKey6) -> Result<(), MapError>;
    fn upsert_backend6(&mut self, id: u32, backend: Backend6) -> Result<(), MapError>;
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapError>;
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError>;
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError>;
    fn upsert_node_addr6(&mut self, addr_be: [u32; 4], flags: u32) -> Result<(), MapError>;
    fn delete_node_addr6(&mut self, addr_be: [u32; 4]) -> Result<(), MapError>;
    /// Allows clients in `range` to reach the frontends of `svc_id` that carry
    /// `SVC_F_SOURCE_RANGES` (written to the trie of `range`'s family, [`source_ranges_map`]).
    fn upsert_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError>;
    fn delete_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError>;
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError>;
    /// Reads back everything the service tables hold (used at start to adopt pinned maps, and
    /// by the debug CLI).
    fn dump(&self) -> Result<LbState, MapError>;
    /// Removes affinity entries and socket reverse-NAT entries that point at `backend_id` /
    /// frontend `svc_id`s no longer present, so UDP clients stop using removed backends.
    fn flush_backend_state(&mut self, backend_id: u32, backend: Backend) -> Result<(), MapError>;
    /// [`Self::flush_backend_state`] for several backends at once; on error none of them may
    /// be considered flushed (flushing is idempotent, the next apply repeats it). The kernel
    /// implementation overrides it to scan each table once per batch.
    fn flush_backends_state(&mut self, backends: &[(u32, Backend)]) -> Result<(), MapError> {
        for &(id, backend) in backends {
            self.flush_backend_state(id, backend)?;
        }
        Ok(())
    }
    /// [`Self::flush_backends_state`] for IPv6 backends: the affinity and UDP flow entries
    /// naming their ids, the IPv6 socket reverse-NAT entries naming their addresses.
    fn flush_backends6_state(&mut self, backends: &[(u32, Backend6)]) -> Result<(), MapError>;
}

/// In-memory implementation for tests of the reconciler and the debug CLI.
#[derive(Clone, Debug, Default)]
pub struct FakeLbMaps {
    pub state: LbState,
    /// Capacity of the services map, to test the "map full" path.
    pub services_capacity: Option<u32>,
    /// Capacity of the backend slots map.
    pub slots_capacity: Option<u32>,
    /// Capacity of the backends map.
    pub backends_capacity: Option<u32>,
    /// Capacity of each source-range trie (the entries of one family).
    pub source_ranges_capacity: Option<u32>,
    /// Capacity of the IPv6 services map.
    pub services6_capacity: Option<u32>,
    /// Capacity of the IPv6 backends map.
    pub backends6_capacity: Option<u32>,
    pub flushed_backends: Vec<u32>,
}

/// `Err(Full)` when inserting a new key into a map already holding `capacity` entries, like the
/// kernel's E2BIG for a full hash map (updating an existing key always succeeds).
fn check_capacity<K: Ord, V>(
    map: &BTreeMap<K, V>,
    key: &K,
    capacity: Option<u32>,
    kind: MapKind,
) -> Result<(), MapError> {
    check_room(map.contains_key(key), map.len(), capacity, kind)
}

/// [`check_capacity`] for a map whose key is `present` or not among `len` entries.
fn check_room(
    present: bool,
    len: usize,
    capacity: Option<u32>,
    kind: MapKind,
) -> Result<(), MapError> {
    match capacity {
        Some(cap) if !present && len >= cap as usize => Err(MapError::Full {
            map: kind,
            capacity: cap,
        }),
        _ => Ok(()),
    }
}

impl LbMaps for FakeLbMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        check_capacity(
            &self.state.services,
            &key,
            self.services_capacity,
            MapKind::Services,
        )?;
        self.state.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.state.services.remove(key);
        Ok(())
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError> {
        check_capacity(
            &self.state.slots,
            &key,
            self.slots_capacity,
            MapKind::BackendSlots,
        )?;
        self.state.slots.insert(key, backend_id);
        Ok(())
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        self.state.slots.remove(key);
        Ok(())
    }
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        check_capacity(
            &self.state.backends,
            &id,
            self.backends_capacity,
            MapKind::Backends,
        )?;
        self.state.backends.insert(id, backend);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.state.backends.remove(&id);
        Ok(())
    }
    fn upsert_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<(), MapError> {
        check_capacity(
            &self.state.services6,
            &key,
            self.services6_capacity,
            MapKind::Services6,
        )?;
        self.state.services6.insert(key, value);
        Ok(())
    }
    fn delete_service6(&mut self, key: &ServiceKey6) -> Result<(), MapError> {
        self.state.services6.remove(key);
        Ok(())
    }
    fn upsert_backend6(&mut self, id: u32, backend: Backend6) -> Result<(), MapError> {
        check_capacity(
            &self.state.backends6,
            &id,
            self.backends6_capacity,
            MapKind::Backends6,
        )?;
        self.state.backends6.insert(id, backend);
        Ok(())
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapError> {
        self.state.backends6.remove(&id);
        Ok(())
    }
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError> {
        self.state.node_addrs.insert(addr_be, flags);
        Ok(())
    }
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError> {
        self.state.node_addrs.remove(&addr_be);
        Ok(())
    }
    fn upsert_node_addr6(&mut self, addr_be: [u32; 4], flags: u32) -> Result<(), MapError> {
        self.state.node_addrs6.insert(addr_be, flags);
        Ok(())
    }
    fn delete_node_addr6(&mut self, addr_be: [u32; 4]) -> Result<(), MapError> {
        self.state.node_addrs6.remove(&addr_be);
        Ok(())
    }
    fn upsert_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        // Stored canonical, like the kernel's trie key.
        let entry = (svc_id, canonical_net(range));
        let same_family = self
            .state
            .source_ranges
            .iter()
            .filter(|(_, r)| r.is_ipv4() == range.is_ipv4())
            .count();
        check_room(
            self.state.source_ranges.contains(&entry),
            same_family,
            self.source_ranges_capacity,
            source_ranges_map(&range),
        )?;
        self.state.source_ranges.insert(entry);
        Ok(())
    }
    fn delete_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        self.state
            .source_ranges
            .remove(&(svc_id, canonical_net(range)));
        Ok(())
    }
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError> {
        self.state.config = config;
        Ok(())
    }
    fn dump(&self) -> Result<LbState, MapError> {
        Ok(self.state.clone())
    }
    fn flush_backend_state(&mut self, backend_id: u32, _backend: Backend) -> Result<(), MapError> {
        self.flushed_backends.push(backend_id);
        Ok(())
    }
    fn flush_backends6_state(&mut self, backends: &[(u32, Backend6)]) -> Result<(), MapError> {
        self.flushed_backends
            .extend(backends.iter().map(|(id, _)| *id));
        Ok(())
    }
}

/// Which operations a [`FaultyLbMaps`] fails. Rules combine: an operation fails when any rule
/// matches. Operation numbers count every write-side call (upserts, deletes, `set_config`,
/// `flush_backend_state`) from 0, failed ones included; `dump` is not counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail exactly these operation numbers.
    pub nth: BTreeSet<u64>,
    /// Fail every write to these maps.
    pub maps: BTreeSet<MapKind>,
    /// Fail every operation numbered `k` or higher (a connection to the kernel "going away").
    pub after: Option<u64>,
    /// Report the map as full (`MapError::Full`) instead of an injected error, for rules matching
    /// by map; lets tests drive the "map full" path through any implementation.
    pub as_full: bool,
    /// Fail `dump()` (adoption at start).
    pub dump: bool,
}

/// What a fault injector does with write operation number `n` to `map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultDecision {
    Pass,
    /// Fail as `MapError::Injected`.
    Inject,
    /// Fail as `MapError::Full` (a rule matching by map with `as_full`).
    Full,
}

impl FaultPlan {
    /// The one decision every fault injector (service maps, policy maps) makes per operation.
    pub fn decide(&self, n: u64, map: MapKind) -> FaultDecision {
        let by_map = self.maps.contains(&map);
        if !(by_map || self.nth.contains(&n) || self.after.is_some_and(|k| n >= k)) {
            FaultDecision::Pass
        } else if by_map && self.as_full {
            FaultDecision::Full
        } else {
            FaultDecision::Inject
        }
    }

    /// No faults: the wrapper passes everything through.
    pub fn none() -> Self {
        Self::default()
    }
    /// Fail operation number `n` (0-based).
    #[must_use]
    pub fn fail_nth(mut self, n: u64) -> Self {
        self.nth.insert(n);
        self
    }
    /// Fail every write to `map`.
    #[must_use]
    pub fn fail_map(mut self, map: MapKind) -> Self {
        self.maps.insert(map);
        self
    }
    /// Fail every operation from number `k` on.
    #[must_use]
    pub fn fail_after(mut self, k: u64) -> Self {
        self.after = Some(k);
        self
    }
    /// Matching map rules report `MapError::Full`.
    #[must_use]
    pub fn full(mut self) -> Self {
        self.as_full = true;
        self
    }
    /// Fail `dump()`.
    #[must_use]
    pub fn fail_dump(mut self) -> Self {
        self.dump = true;
        self
    }
}

/// Fault injector wrapping any [`LbMaps`]: fails the operations its [`FaultPlan`] names and
/// passes everything else to the inner implementation. A failed operation does not reach the
/// inner maps, like a syscall that returned an error.
#[derive(Clone, Debug, Default)]
pub struct FaultyLbMaps<M> {
    pub inner: M,
    pub plan: FaultPlan,
    /// Operations attempted so far (the numbering `FaultPlan` uses).
    pub ops: u64,
    /// Operations failed on purpose so far.
    pub injected: u64,
}

impl<M: LbMaps> FaultyLbMaps<M> {
    pub fn new(inner: M, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan,
            ops: 0,
            injected: 0,
        }
    }

    /// Counts one operation and decides whether it fails.
    fn gate(&mut self, map: MapKind, op: &'static str) -> Result<(), MapError> {
        let n = self.ops;
        self.ops += 1;
        let decision = self.plan.decide(n, map);
        if decision == FaultDecision::Pass {
            return Ok(());
        }
        self.injected += 1;
        if decision == FaultDecision::Full {
            // The capacity is unknown to the wrapper; report what the inner map holds.
            let capacity = self.inner.dump().map_or(0, |s| match map {
                MapKind::Services => s.services.len(),
                MapKind::BackendSlots => s.slots.len(),
                MapKind::Backends => s.backends.len(),
                MapKind::Services6 => s.services6.len(),
                MapKind::Backends6 => s.backends6.len(),
                MapKind::NodeAddrs => s.node_addrs.len(),
                MapKind::NodeAddrs6 => s.node_addrs6.len(),
                MapKind::SourceRanges => s.source_ranges.iter().filter(|r| r.1.is_ipv4()).count(),
                MapKind::SourceRanges6 => s.source_ranges.iter().filter(|r| r.1.is_ipv6()).count(),
                _ => 0,
            });
            return Err(MapError::Full {
                map,
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            });
        }
        Err(MapError::Injected { map, op })
    }
}

impl<M: LbMaps> LbMaps for FaultyLbMaps<M> {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.gate(MapKind::Services, "update")?;
        self.inner.upsert_service(key, value)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.gate(MapKind::Services, "delete")?;
        self.inner.delete_service(key)
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError> {
        self.gate(MapKind::BackendSlots, "update")?;
        self.inner.upsert_slot(key, backend_id)
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        self.gate(MapKind::BackendSlots, "delete")?;
        self.inner.delete_slot(key)
    }
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.gate(MapKind::Backends, "update")?;
        self.inner.upsert_backend(id, backend)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.gate(MapKind::Backends, "delete")?;
        self.inner.delete_backend(id)
    }
    fn upsert_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<(), MapError> {
        self.gate(MapKind::Services6, "update")?;
        self.inner.upsert_service6(key, value)
    }
    fn delete_service6(&mut self, key: &ServiceKey6) -> Result<(), MapError> {
        self.gate(MapKind::Services6, "delete")?;
        self.inner.delete_service6(key)
    }
    fn upsert_backend6(&mut self, id: u32, backend: Backend6) -> Result<(), MapError> {
        self.gate(MapKind::Backends6, "update")?;
        self.inner.upsert_backend6(id, backend)
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapError> {
        self.gate(MapKind::Backends6, "delete")?;
        self.inner.delete_backend6(id)
    }
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError> {
        self.gate(MapKind::NodeAddrs, "update")?;
        self.inner.upsert_node_addr(addr_be, flags)
    }
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError> {
        self.gate(MapKind::NodeAddrs, "delete")?;
        self.inner.delete_node_addr(addr_be)
    }
    fn upsert_node_addr6(&mut self, addr_be: [u32; 4], flags: u32) -> Result<(), MapError> {
        self.gate(MapKind::NodeAddrs6, "update")?;
        self.inner.upsert_node_addr6(addr_be, flags)
    }
    fn delete_node_addr6(&mut self, addr_be: [u32; 4]) -> Result<(), MapError> {
        self.gate(MapKind::NodeAddrs6, "delete")?;
        self.inner.delete_node_addr6(addr_be)
    }
    fn upsert_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        self.gate(source_ranges_map(&range), "update")?;
        self.inner.upsert_source_range(svc_id, range)
    }
    fn delete_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        self.gate(source_ranges_map(&range), "delete")?;
        self.inner.delete_source_range(svc_id, range)
    }
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError> {
        self.gate(MapKind::Config, "update")?;
        self.inner.set_config(config)
    }
    fn dump(&self) -> Result<LbState, MapError> {
        if self.plan.dump {
            return Err(MapError::Injected {
                map: MapKind::Services,
                op: "dump",
            });
        }
        self.inner.dump()
    }
    fn flush_backend_state(&mut self, backend_id: u32, backend: Backend) -> Result<(), MapError> {
        self.gate(MapKind::Affinity, "flush")?;
        self.inner.flush_backend_state(backend_id, backend)
    }
    fn flush_backends6_state(&mut self, backends: &[(u32, Backend6)]) -> Result<(), MapError> {
        self.gate(MapKind::Affinity, "flush")?;
        self.inner.flush_backends6_state(backends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(n: u8) -> Backend {
        Backend {
            addr_be: u32::from_ne_bytes([10, 0, 0, n]),
            port_be: 80u16.to_be(),
            proto: 6,
            flags: 0,
        }
    }

    #[test]
    fn fake_reports_full_only_for_new_keys() {
        let mut fake = FakeLbMaps {
            backends_capacity: Some(1),
            ..FakeLbMaps::default()
        };
        fake.upsert_backend(1, be(1)).unwrap();
        fake.upsert_backend(1, be(2)).unwrap();
        let err = fake.upsert_backend(2, be(2)).unwrap_err();
        assert!(matches!(
            err,
            MapError::Full {
                map: MapKind::Backends,
                capacity: 1
            }
        ));
        assert_eq!(err.metric_label(), "full");
        assert_eq!(err.map(), MapKind::Backends);
    }

    #[test]
    fn fake_stores_canonical_source_ranges_and_reports_full() {
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        let mut fake = FakeLbMaps {
            source_ranges_capacity: Some(1),
            ..FakeLbMaps::default()
        };
        fake.upsert_source_range(7, net("10.1.2.3/8")).unwrap();
        assert_eq!(
            fake.dump().unwrap().source_ranges,
            BTreeSet::from([(7, net("10.0.0.0/8"))])
        );
        // The same range again is an update, not a new key.
        fake.upsert_source_range(7, net("10.0.0.0/8")).unwrap();
        let err = fake.upsert_source_range(8, net("10.0.0.0/8")).unwrap_err();
        assert!(
            matches!(
                err,
                MapError::Full {
                    map: MapKind::SourceRanges,
                    capacity: 1
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(MapKind::SourceRanges.name()),
            "{err}"
        );
        // Each family's trie has its own room: an IPv6 range still fits, canonical too.
        fake.upsert_source_range(8, net("fd00:1::5/64")).unwrap();
        let err = fake.upsert_source_range(9, net("fd00:2::/64")).unwrap_err();
        assert_eq!(err.map(), MapKind::SourceRanges6);
        assert!(fake.state.source_ranges.contains(&(8, net("fd00:1::/64"))));
        fake.delete_source_range(7, net("10.9.9.9/8")).unwrap();
        fake.delete_source_range(8, net("fd00:1::1/64")).unwrap();
        assert!(fake.state.source_ranges.is_empty());
    }

    #[test]
    fn injector_fails_exactly_what_the_plan_names() {
        let plan = FaultPlan::none()
            .fail_nth(1)
            .fail_map(MapKind::BackendSlots);
        let mut maps = FaultyLbMaps::new(FakeLbMaps::default(), plan);
        assert!(maps.upsert_backend(1, be(1)).is_ok()); // op 0
        assert!(matches!(
            maps.upsert_backend(2, be(2)),
            Err(MapError::Injected {
                map: MapKind::Backends,
                ..
            })
        )); // op 1
        assert!(maps.upsert_slot(SlotKey { svc_id: 1, slot: 0 }, 1).is_err()); // op 2: by map
        assert!(maps.delete_backend(1).is_ok()); // op 3
        assert_eq!((maps.ops, maps.injected), (4, 2));
        // A failed operation never reaches the inner maps.
        assert!(maps.inner.state.backends.is_empty());
        assert!(maps.inner.state.slots.is_empty());
    }

    #[test]
    fn injector_after_k_and_as_full() {
        let mut maps = FaultyLbMaps::new(FakeLbMaps::default(), FaultPlan::none().fail_after(2));
        assert!(maps.upsert_backend(1, be(1)).is_ok());
        assert!(maps.upsert_backend(2, be(2)).is_ok());
        assert!(maps.upsert_backend(3, be(3)).is_err());
        assert!(maps.set_config(DatapathConfig::default()).is_err());

        let plan = FaultPlan::none().fail_map(MapKind::Services).full();
        let mut maps = FaultyLbMaps::new(FakeLbMaps::default(), plan);
        let key = ServiceKey {
            addr_be: 1,
            port_be: 80u16.to_be(),
            proto: 6,
            scope: 0,
        };
        let value = ServiceValue {
            svc_id: 1,
            backend_count: 0,
            flags: 0,
            affinity_timeout_s: 0,
            maglev_size: 0,
        };
        let err = maps.upsert_service(key, value).unwrap_err();
        assert!(
            matches!(
                err,
                MapError::Full {
                    map: MapKind::Services,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(MapKind::Services.name()));
        assert_eq!(err.map(), MapKind::Services);
        assert!(maps.dump().is_ok());
        maps.plan = FaultPlan::none().fail_dump();
        assert!(maps.dump().is_err());
    }
}
