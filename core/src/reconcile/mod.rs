//! Applies a desired [`LbState`] to the maps through the [`LbMaps`] seam (`HOUSE_STYLE` §6).
//!
//! The reconciler keeps `applied`: what it believes the maps hold. It is seeded from the maps
//! themselves (`adopt`), and updated entry by entry, only after the write succeeded; so after any
//! failure it still describes the maps exactly and the next `apply` writes just what is missing.
//!
//! Write order keeps the datapath consistent after every single operation — every service's
//! slots (`0..backend_count` and its Maglev table) exist and point at existing backends, and a frontend filtered by
//! `loadBalancerSourceRanges` never turns away a client its desired ranges allow:
//! backends (new/changed) → slots (new/changed) → source ranges (new) → services (new/changed),
//! then, when pruning, services → source ranges no longer desired → slots no service reaches
//! any more → backends no slot references (each flushed of affinity/reverse-NAT state first, so
//! UDP clients stop using it). An entry whose dependency failed to be written is deferred, not
//! written half-ready.
//!
//! # Driving it
//! ```
//! use twill_core::compile::{CompileConfig, Compiler, IdAllocation};
//! use twill_core::lbmap::FakeLbMaps;
//! use twill_core::reconcile::Reconciler;
//!
//! // At start: adopt whatever a previous agent left pinned, and seed the ids from it so
//! // backend sets keep their ids (affinity and socket reverse-NAT entries stay valid).
//! let mut rec = Reconciler::adopt(FakeLbMaps::default())?;
//! let mut compiler = Compiler::new(IdAllocation::from_adopted(rec.applied()));
//! let config = CompileConfig::new("node-a");
//! // On every coalesced change: recompile the Services the stores marked dirty, apply the
//! // difference; prune only once the sources have synced.
//! compiler.update(&config, None, Vec::new());
//! let changes = compiler.take_changes();
//! let synced = true;
//! rec.apply_changes(compiler.state(), &changes, synced)?;
//! # Ok::<(), twill_core::reconcile::ReconcileError>(())
//! ```
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnetwork::IpNetwork;
use twill_common::{SVC_F_SOURCE_RANGES, ServiceKey, ServiceKey6, ServiceValue, SlotKey};

use crate::family::FrontendKey;

use crate::lbmap::{LbMaps, LbState, MapError, MapKind, StateChanges, StateVersion};

/// What one `apply` wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub services_upserted: usize,
    pub services_deleted: usize,
    pub slots_upserted: usize,
    pub slots_deleted: usize,
    pub backends_upserted: usize,
    pub backends_deleted: usize,
    pub backends_flushed: usize,
    pub node_addrs_upserted: usize,
    pub node_addrs_deleted: usize,
    pub source_ranges_upserted: usize,
    pub source_ranges_deleted: usize,
    pub config_written: bool,
    /// Entries not written because something they depend on failed (retried by the next apply).
    pub deferred: usize,
    /// Every entry was compared, not only the changed keys.
    pub compared_all: bool,
}

impl ApplyStats {
    /// Total map operations performed.
    pub fn writes(&self) -> usize {
        self.services_upserted
            + self.services_deleted
            + self.slots_upserted
            + self.slots_deleted
            + self.backends_upserted
            + self.backends_deleted
            + self.backends_flushed
            + self.node_addrs_upserted
            + self.node_addrs_deleted
            + self.source_ranges_upserted
            + self.source_ranges_deleted
            + usize::from(self.config_written)
    }
}

/// Errors of the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the pinned maps to adopt them failed")]
    Adopt(#[source] MapError),
    /// Some writes failed; everything that could be written safely was. `applied` is exact, so
    /// calling `apply` again retries only the rest.
    #[error("{} map write(s) failed, {} entries deferred: {first}", .more.len() + 1, .stats.deferred)]
    Incomplete {
        #[source]
        first: MapError,
        more: Vec<MapError>,
        stats: Box<ApplyStats>,
    },
    /// The desired state references slots, backends or source ranges it does not contain (a
    /// compiler bug).
    #[error(
        "desired state is inconsistent: {deferred} entries reference missing slots, backends or source ranges"
    )]
    Inconsistent {
        deferred: usize,
        stats: Box<ApplyStats>,
    },
}

impl ReconcileError {
    /// Every map a write failed on because it was full.
    pub fn full_maps(&self) -> Vec<MapKind> {
        let mut maps: Vec<MapKind> = self
            .map_errors()
            .filter_map(|e| match e {
                MapError::Full { map, .. } => Some(*map),
                _ => None,
            })
            .collect();
        maps.sort_unstable();
        maps.dedup();
        maps
    }

    /// Whether every failed write failed for want of room (nothing a retry alone can fix, and
    /// nothing wrong with the kernel): what could be written was, the rest waits for room.
    pub fn only_full(&self) -> bool {
        matches!(self, ReconcileError::Incomplete { .. })
            && self
                .map_errors()
                .all(|e| matches!(e, MapError::Full { .. }))
    }

    /// Every underlying map error.
    pub fn map_errors(&self) -> impl Iterator<Item = &MapError> {
        let (first, more): (Option<&MapError>, &[MapError]) = match self {
            ReconcileError::Adopt(e) => (Some(e), &[]),
            ReconcileError::Incomplete { first, more, .. } => (Some(first), more),
            ReconcileError::Inconsistent { .. } => (None, &[]),
        };
        first.into_iter().chain(more)
    }

    /// What the failed apply did write, if it got to writing.
    pub fn stats(&self) -> Option<&ApplyStats> {
        match self {
            ReconcileError::Adopt(_) => None,
            ReconcileError::Incomplete { stats, .. }
            | ReconcileError::Inconsistent { stats, .. } => Some(stats),
        }
    }

    /// Short stable label for the error-counter metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Adopt(_) => "adopt",
            ReconcileError::Incomplete { first, .. } => first.metric_label(),
            ReconcileError::Inconsistent { .. } => "inconsistent",
        }
    }
}

/// Diffs desired against applied state and writes the difference.
#[derive(Debug)]
pub struct Reconciler<M: LbMaps> {
    maps: M,
    applied: Applied,
    /// The desired version `applied` is known to equal (after a clean apply with prune): the
    /// next [`Reconciler::apply_changes`] from that version compares only the changed keys.
    in_sync_with: Option<StateVersion>,
}

impl<M: LbMaps> Reconciler<M> {
    /// A reconciler for maps known to be empty (freshly created).
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            applied: Applied::default(),
            in_sync_with: None,
        }
    }

    /// A reconciler for maps that may hold entries (pinned by a previous agent): reads them
    /// back so nothing is rewritten needlessly and stale entries are pruned once sources sync.
    pub fn adopt(maps: M) -> Result<Self, ReconcileError> {
        let state = maps.dump().map_err(ReconcileError::Adopt)?;
        Ok(Self {
            maps,
            applied: Applied::new(state),
            in_sync_with: None,
        })
    }

    /// What the reconciler believes the maps hold.
    pub fn applied(&self) -> &LbState {
        &self.applied.state
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    /// Writes what `desired` adds or changes; with `prune`, also deletes what it no longer
    /// has. Pass `prune = false` until the sources have synced: an incomplete view of the
    /// cluster must never delete a live Service from the datapath. Compares every entry.
    pub fn apply(&mut self, desired: &LbState, prune: bool) -> Result<ApplyStats, ReconcileError> {
        self.in_sync_with = None;
        self.run(desired, Scope::All, prune)
    }

    /// [`Self::apply`] for a desired state that changed only at the keys of `changes` since
    /// version `changes.since`: when the maps are known to hold exactly that version, only
    /// those keys are compared (the cost of a small change stays small at any cluster size);
    /// otherwise (first apply, a failed or deferred write, no prune yet) everything is.
    pub fn apply_changes(
        &mut self,
        desired: &LbState,
        changes: &StateChanges,
        prune: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let scope = if prune && changes.since.is_some() && changes.since == self.in_sync_with {
            Scope::Changed(changes)
        } else {
            Scope::All
        };
        self.in_sync_with = None;
        let result = self.run(desired, scope, prune);
        if result.is_ok() && prune {
            self.in_sync_with = changes.version;
        }
        result
    }

    fn run(
        &mut self,
        desired: &LbState,
        scope: Scope<'_>,
        prune: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let mut run = Run {
            maps: &mut self.maps,
            applied: &mut self.applied,
            stats: ApplyStats {
                compared_all: matches!(scope, Scope::All),
                ..ApplyStats::default()
            },
            errors: Vec::new(),
        };
        run.upserts(desired, scope);
        if prune {
            let upsert_deferred = run.stats.deferred;
            let deleted_before = run.deleted();
            run.prunes(desired, scope);
            // Entries that found a map full get the room the prunes just freed (a Service
            // replacing another in one change): one more pass, in which what the first wrote
            // compares equal and is skipped. Without it they would wait for the next resync.
            let full = |e: &MapError| matches!(e, MapError::Full { .. });
            if run.deleted() > deleted_before && run.errors.iter().any(full) {
                run.errors.retain(|e| !full(e));
                run.stats.deferred -= upsert_deferred;
                run.upserts(desired, scope);
            }
        }
        let Run { stats, errors, .. } = run;
        let mut errors = errors.into_iter();
        match errors.next() {
            Some(first) => Err(ReconcileError::Incomplete {
                first,
                more: errors.collect(),
                stats: Box::new(stats),
            }),
            None if stats.deferred > 0 => Err(ReconcileError::Inconsistent {
                deferred: stats.deferred,
                stats: Box::new(stats),
            }),
            None => Ok(stats),
        }
    }
}

/// Which entries an apply compares.
#[derive(Clone, Copy)]
enum Scope<'c> {
    All,
    /// Only these keys (`node_addrs` and `config` are always compared whole).
    Changed(&'c StateChanges),
}

impl<'c> Scope<'c> {
    fn services(self) -> Option<&'c BTreeSet<ServiceKey>> {
        match self {
            Scope::All => None,
            Scope::Changed(c) => Some(&c.services),
        }
    }
    fn services6(self) -> Option<&'c BTreeSet<ServiceKey6>> {
        match self {
            Scope::All => None,
            Scope::Changed(c) => Some(&c.services6),
        }
    }
    fn slots(self) -> Option<&'c BTreeSet<SlotKey>> {
        match self {
            Scope::All => None,
            Scope::Changed(c) => Some(&c.slots),
        }
    }
    fn backends(self) -> Option<&'c BTreeSet<u32>> {
        match self {
            Scope::All => None,
            Scope::Changed(c) => Some(&c.backends),
        }
    }
    fn source_ranges(self) -> Option<&'c BTreeSet<(u32, IpNetwork)>> {
        match self {
            Scope::All => None,
            Scope::Changed(c) => Some(&c.source_ranges),
        }
    }
}

/// The applied state with the lookups the write-order rules need, kept up to date entry by
/// entry so that checking a rule never scans the whole state.
#[derive(Debug, Default)]
struct Applied {
    state: LbState,
    /// `svc_id` → the applied frontends using it.
    frontends_of: HashMap<u32, Vec<FrontendKey>>,
    /// Backend id → number of applied slots pointing at it.
    slot_refs: HashMap<u32, u32>,
}

impl Applied {
    fn new(state: LbState) -> Self {
        let mut a = Applied::default();
        for (k, v) in state.frontends() {
            a.frontends_of.entry(v.svc_id).or_default().push(k);
        }
        for id in state.slots.values() {
            *a.slot_refs.entry(*id).or_default() += 1;
        }
        a.state = state;
        a
    }

    fn insert_service(&mut self, key: FrontendKey, value: ServiceValue) {
        let old = self.state.frontend(&key).copied();
        self.state.insert_frontend(key, value);
        if let Some(old) = old {
            if old.svc_id == value.svc_id {
                return;
            }
            self.unlink_frontend(old.svc_id, key);
        }
        self.frontends_of.entry(value.svc_id).or_default().push(key);
    }

    fn remove_service(&mut self, key: FrontendKey) {
        if let Some(old) = self.state.frontend(&key).copied() {
            self.state.remove_frontend(&key);
            self.unlink_frontend(old.svc_id, key);
        }
    }

    fn unlink_frontend(&mut self, svc_id: u32, key: FrontendKey) {
        if let Some(list) = self.frontends_of.get_mut(&svc_id) {
            list.retain(|k| *k != key);
            if list.is_empty() {
                self.frontends_of.remove(&svc_id);
            }
        }
    }

    fn insert_slot(&mut self, key: SlotKey, backend_id: u32) {
        if let Some(old) = self.state.slots.insert(key, backend_id) {
            self.unref_backend(old);
        }
        *self.slot_refs.entry(backend_id).or_default() += 1;
    }

    fn remove_slot(&mut self, key: SlotKey) {
        if let Some(old) = self.state.slots.remove(&key) {
            self.unref_backend(old);
        }
    }

    fn unref_backend(&mut self, id: u32) {
        if let Some(n) = self.slot_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.slot_refs.remove(&id);
            }
        }
    }

    fn applied_frontends(&self, svc_id: u32) -> impl Iterator<Item = &ServiceValue> {
        self.frontends_of
            .get(&svc_id)
            .into_iter()
            .flatten()
            .filter_map(|k| self.state.frontend(k))
    }

    /// Slot `slot` of `svc_id` is read by some applied frontend (its list or Maglev table).
    fn reached(&self, svc_id: u32, slot: u32) -> bool {
        self.applied_frontends(svc_id).any(|v| v.reaches(slot))
    }

    /// Some applied frontend filters clients on the source ranges of `svc_id`.
    fn filtering(&self, svc_id: u32) -> bool {
        self.applied_frontends(svc_id)
            .any(|v| v.flags & SVC_F_SOURCE_RANGES != 0)
    }
}

struct Run<'a, M> {
    maps: &'a mut M,
    applied: &'a mut Applied,
    stats: ApplyStats,
    errors: Vec<MapError>,
}

impl<M: LbMaps> Run<'_, M> {
    /// Entries deleted so far: the room prunes made.
    fn deleted(&self) -> usize {
        let s = &self.stats;
        s.services_deleted + s.slots_deleted + s.backends_deleted + s.source_ranges_deleted
    }

    fn upserts(&mut self, desired: &LbState, scope: Scope<'_>) {
        if self.applied.state.config != desired.config {
            match self.maps.set_config(desired.config) {
                Ok(()) => {
                    self.applied.state.config = desired.config;
                    self.stats.config_written = true;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (addr, flags) in changed(&desired.node_addrs, &self.applied.state.node_addrs) {
            match self.maps.upsert_node_addr(addr, flags) {
                Ok(()) => {
                    self.applied.state.node_addrs.insert(addr, flags);
                    self.stats.node_addrs_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (addr, flags) in changed(&desired.node_addrs6, &self.applied.state.node_addrs6) {
            match self.maps.upsert_node_addr6(addr, flags) {
                Ok(()) => {
                    self.applied.state.node_addrs6.insert(addr, flags);
                    self.stats.node_addrs_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (id, be) in changed_in(
            scope.backends(),
            &desired.backends,
            &self.applied.state.backends,
        ) {
            match self.maps.upsert_backend(id, be) {
                Ok(()) => {
                    self.applied.state.backends.insert(id, be);
                    self.stats.backends_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        self.upsert_backends6(desired, scope);
        for (key, backend_id) in
            changed_in(scope.slots(), &desired.slots, &self.applied.state.slots)
        {
            if !self.applied.state.has_backend(backend_id) {
                self.stats.deferred += 1;
                continue;
            }
            match self.maps.upsert_slot(key, backend_id) {
                Ok(()) => {
                    self.applied.insert_slot(key, backend_id);
                    self.stats.slots_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        let new_ranges = ranges_in(
            scope.source_ranges(),
            &desired.source_ranges,
            &self.applied.state.source_ranges,
        );
        for (svc_id, range) in new_ranges {
            match self.maps.upsert_source_range(svc_id, range) {
                Ok(()) => {
                    self.applied.state.source_ranges.insert((svc_id, range));
                    self.stats.source_ranges_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (key, value) in changed_frontends(scope, desired, &self.applied.state) {
            // Applied slots always point at applied backends (backends are deleted only when
            // no slot references them), so checking that the slots exist is enough.
            let slots_ready = value.slots().all(|slot| {
                self.applied.state.slots.contains_key(&SlotKey {
                    svc_id: value.svc_id,
                    slot,
                })
            });
            // A filtered frontend admits only the ranges of its svc_id that are in the trie, so
            // it goes in once all of them are. Rewriting one that already filters on the same
            // svc_id admits exactly whom it admitted before, so it need not wait.
            let ranges_ready = value.flags & SVC_F_SOURCE_RANGES == 0
                || covered(desired, &self.applied.state.source_ranges, value.svc_id)
                || self
                    .applied
                    .state
                    .frontend(&key)
                    .is_some_and(|a| filters_on(a, value.svc_id));
            if !(slots_ready && ranges_ready) {
                self.stats.deferred += 1;
                continue;
            }
            let written = match key {
                FrontendKey::V4(k) => self.maps.upsert_service(k, value),
                FrontendKey::V6(k) => self.maps.upsert_service6(k, value),
            };
            match written {
                Ok(()) => {
                    self.applied.insert_service(key, value);
                    self.stats.services_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    fn prunes(&mut self, desired: &LbState, scope: Scope<'_>) {
        for key in stale_frontends(scope, desired, &self.applied.state) {
            let deleted = match &key {
                FrontendKey::V4(k) => self.maps.delete_service(k),
                FrontendKey::V6(k) => self.maps.delete_service6(k),
            };
            match deleted {
                Ok(()) => {
                    self.applied.remove_service(key);
                    self.stats.services_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }

        // A range may go once no applied frontend filters on its svc_id, or once every range
        // desired for that svc_id is in. Before that, removing it would turn away clients that
        // still have to be admitted: the replacement ranges failed to be written, or the
        // update dropping the filter did (then the frontend would admit nobody at all).
        let stale_ranges = ranges_in(
            scope.source_ranges(),
            &self.applied.state.source_ranges,
            &desired.source_ranges,
        );
        for (svc_id, range) in stale_ranges {
            if self.applied.filtering(svc_id)
                && !covered(desired, &self.applied.state.source_ranges, svc_id)
            {
                self.stats.deferred += 1;
                continue;
            }
            match self.maps.delete_source_range(svc_id, range) {
                Ok(()) => {
                    self.applied.state.source_ranges.remove(&(svc_id, range));
                    self.stats.source_ranges_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }

        // A slot may go once no applied service reaches it, whatever desired says (a service
        // whose shrinking update failed still reaches its old slots).
        for key in stale_in(scope.slots(), &desired.slots, &self.applied.state.slots) {
            if self.applied.reached(key.svc_id, key.slot) {
                self.stats.deferred += 1;
                continue;
            }
            match self.maps.delete_slot(&key) {
                Ok(()) => {
                    self.applied.remove_slot(key);
                    self.stats.slots_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }

        let stale_backends = stale_in(
            scope.backends(),
            &desired.backends,
            &self.applied.state.backends,
        );
        if !stale_backends.is_empty() {
            let mut removable = Vec::new();
            for id in stale_backends {
                if self.applied.slot_refs.contains_key(&id) {
                    self.stats.deferred += 1;
                } else {
                    removable.push((id, self.applied.state.backends[&id]));
                }
            }
            // Flush first, as one batch: if it fails the backends stay, and the next apply
            // retries flush and delete.
            if let Err(e) = self.maps.flush_backends_state(&removable) {
                self.errors.push(e);
            } else {
                self.stats.backends_flushed += removable.len();
                for (id, _) in removable {
                    match self.maps.delete_backend(id) {
                        Ok(()) => {
                            self.applied.state.backends.remove(&id);
                            self.stats.backends_deleted += 1;
                        }
                        Err(e) => self.errors.push(e),
                    }
                }
            }
        }

        self.prune_backends6(desired, scope);

        for addr in stale(&desired.node_addrs, &self.applied.state.node_addrs) {
            match self.maps.delete_node_addr(addr) {
                Ok(()) => {
                    self.applied.state.node_addrs.remove(&addr);
                    self.stats.node_addrs_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for addr in stale(&desired.node_addrs6, &self.applied.state.node_addrs6) {
            match self.maps.delete_node_addr6(addr) {
                Ok(()) => {
                    self.applied.state.node_addrs6.remove(&addr);
                    self.stats.node_addrs_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// The IPv6 backends of `desired` that differ from the applied ones (before their slots).
    fn upsert_backends6(&mut self, desired: &LbState, scope: Scope<'_>) {
        for (id, be) in changed_in(
            scope.backends(),
            &desired.backends6,
            &self.applied.state.backends6,
        ) {
            match self.maps.upsert_backend6(id, be) {
                Ok(()) => {
                    self.applied.state.backends6.insert(id, be);
                    self.stats.backends_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// Removes the IPv6 backends no slot uses any more, their state flushed first (as IPv4).
    fn prune_backends6(&mut self, desired: &LbState, scope: Scope<'_>) {
        let stale_backends6 = stale_in(
            scope.backends(),
            &desired.backends6,
            &self.applied.state.backends6,
        );
        if !stale_backends6.is_empty() {
            let mut removable = Vec::new();
            for id in stale_backends6 {
                if self.applied.slot_refs.contains_key(&id) {
                    self.stats.deferred += 1;
                } else {
                    removable.push((id, self.applied.state.backends6[&id]));
                }
            }
            if let Err(e) = self.maps.flush_backends6_state(&removable) {
                self.errors.push(e);
            } else {
                self.stats.backends_flushed += removable.len();
                for (id, _) in removable {
                    match self.maps.delete_backend6(id) {
                        Ok(()) => {
                            self.applied.state.backends6.remove(&id);
                            self.stats.backends_deleted += 1;
                        }
                        Err(e) => self.errors.push(e),
                    }
                }
            }
        }
    }
}

/// Whether `svc_id` has at least one desired source range and all of them are applied.
/// The frontends of both families `desired` holds and `applied` does not hold as desired.
fn changed_frontends(
    scope: Scope<'_>,
    desired: &LbState,
    applied: &LbState,
) -> Vec<(FrontendKey, ServiceValue)> {
    let v4 = changed_in(scope.services(), &desired.services, &applied.services);
    let v6 = changed_in(scope.services6(), &desired.services6, &applied.services6);
    v4.into_iter()
        .map(|(k, v)| (FrontendKey::V4(k), v))
        .chain(v6.into_iter().map(|(k, v)| (FrontendKey::V6(k), v)))
        .collect()
}

/// The frontends of both families `applied` holds and `desired` does not.
fn stale_frontends(scope: Scope<'_>, desired: &LbState, applied: &LbState) -> Vec<FrontendKey> {
    let v4 = stale_in(scope.services(), &desired.services, &applied.services);
    let v6 = stale_in(scope.services6(), &desired.services6, &applied.services6);
    v4.into_iter()
        .map(FrontendKey::V4)
        .chain(v6.into_iter().map(FrontendKey::V6))
        .collect()
}

fn covered(desired: &LbState, applied: &BTreeSet<(u32, IpNetwork)>, svc_id: u32) -> bool {
    let mut any = false;
    for r in desired.source_ranges_of(svc_id) {
        if !applied.contains(&(svc_id, r)) {
            return false;
        }
        any = true;
    }
    any
}

/// Whether the frontend `value` filters clients on the source ranges of `svc_id`.
fn filters_on(value: &ServiceValue, svc_id: u32) -> bool {
    value.flags & SVC_F_SOURCE_RANGES != 0 && value.svc_id == svc_id
}

/// [`changed`] over all keys (`keys: None`) or only over `keys`.
fn changed_in<K: Ord + Copy, V: PartialEq + Copy>(
    keys: Option<&BTreeSet<K>>,
    desired: &BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    let Some(keys) = keys else {
        return changed(desired, applied);
    };
    keys.iter()
        .filter_map(|k| {
            let v = desired.get(k)?;
            (applied.get(k) != Some(v)).then_some((*k, *v))
        })
        .collect()
}

/// [`stale`] over all keys (`keys: None`) or only over `keys`.
fn stale_in<K: Ord + Copy, V>(
    keys: Option<&BTreeSet<K>>,
    desired: &BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
) -> Vec<K> {
    let Some(keys) = keys else {
        return stale(desired, applied);
    };
    keys.iter()
        .filter(|k| applied.contains_key(k) && !desired.contains_key(k))
        .copied()
        .collect()
}

/// Entries of `from` missing from `minus`, over all entries or only over `keys`.
fn ranges_in(
    keys: Option<&BTreeSet<(u32, IpNetwork)>>,
    from: &BTreeSet<(u32, IpNetwork)>,
    minus: &BTreeSet<(u32, IpNetwork)>,
) -> Vec<(u32, IpNetwork)> {
    match keys {
        None => from.difference(minus).copied().collect(),
        Some(keys) => keys
            .iter()
            .filter(|r| from.contains(r) && !minus.contains(r))
            .copied()
            .collect(),
    }
}

/// Entries of `desired` that `applied` lacks or holds with another value. Both maps are sorted,
/// so one merged pass replaces a tree lookup per entry.
fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    desired: &BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    let mut out = Vec::new();
    let mut theirs = applied.iter().peekable();
    for (k, v) in desired {
        while theirs.next_if(|(a, _)| *a < k).is_some() {}
        match theirs.peek() {
            Some((a, av)) if *a == k && *av == v => {}
            _ => out.push((*k, *v)),
        }
    }
    out
}

/// Keys of `applied` that `desired` lacks (merged pass, as in [`changed`]).
fn stale<K: Ord + Copy, V>(desired: &BTreeMap<K, V>, applied: &BTreeMap<K, V>) -> Vec<K> {
    let mut out = Vec::new();
    let mut ours = desired.keys().peekable();
    for k in applied.keys() {
        while ours.next_if(|d| *d < k).is_some() {}
        if ours.peek() != Some(&k) {
            out.push(*k);
        }
    }
    out
}

/// Checks the datapath invariant on a map state: every service's slots (list and Maglev table) exist
/// and point at existing backends, and every frontend filtered by source ranges has at least
/// one (without any it admits nobody). Returns the first violation.
pub fn check_invariant(state: &LbState) -> Result<(), String> {
    for (key, v) in state.frontends() {
        if v.flags & SVC_F_SOURCE_RANGES != 0 && state.source_ranges_of(v.svc_id).next().is_none() {
            return Err(format!(
                "service {key:?} (id {}) filters on source ranges but has none",
                v.svc_id
            ));
        }
        for slot in v.slots() {
            let sk = SlotKey {
                svc_id: v.svc_id,
                slot,
            };
            let Some(id) = state.slots.get(&sk) else {
                return Err(format!(
                    "service {key:?} (id {}) has no slot {slot}",
                    v.svc_id
                ));
            };
            if !state.has_backend(*id) {
                return Err(format!(
                    "slot {}/{slot} points at missing backend {id}",
                    v.svc_id
                ));
            }
        }
    }
    Ok(())
}

pub mod policy;

#[cfg(test)]
mod tests;
