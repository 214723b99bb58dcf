//! Applies a desired [`LbState`] to the maps through the [`LbMaps`] seam (`HOUSE_STYLE` §6).
//!
//! The reconciler keeps `applied`: what it believes the maps hold. It is seeded from the maps
//! themselves (`adopt`), and updated entry by entry, only after the write succeeded; so after any
//! failure it still describes the maps exactly and the next `apply` writes just what is missing.
//!
//! Write order keeps the datapath consistent after every single operation — every service's
//! slots `0..backend_count` exist and point at existing backends, and a frontend filtered by
//! `loadBalancerSourceRanges` never turns away a client its desired ranges allow:
//! backends (new/changed) → slots (new/changed) → source ranges (new) → services (new/changed),
//! then, when pruning, services → source ranges no longer desired → slots no service reaches
//! any more → backends no slot references (each flushed of affinity/reverse-NAT state first, so
//! UDP clients stop using it). An entry whose dependency failed to be written is deferred, not
//! written half-ready.
//!
//! # Driving it
//! ```
//! use twill_agent::compile::{CompileConfig, IdAllocation, Inputs, compile};
//! use twill_agent::lbmap::FakeLbMaps;
//! use twill_agent::reconcile::Reconciler;
//!
//! // At start: adopt whatever a previous agent left pinned, and seed the ids from it so
//! // backend sets keep their ids (affinity and socket reverse-NAT entries stay valid).
//! let mut rec = Reconciler::adopt(FakeLbMaps::default())?;
//! let mut ids = IdAllocation::from_adopted(rec.applied());
//! let config = CompileConfig::new("node-a");
//! // On every coalesced change: compile everything from the stores, apply the difference;
//! // prune only once the sources have synced.
//! let inputs = Inputs { services: vec![], endpoint_slices: vec![], node: None, config: &config, ids: &ids };
//! let compiled = compile(&inputs);
//! let synced = true;
//! let result = rec.apply(&compiled.state, synced);
//! // Keep the new ids even if some writes failed: the maps may hold entries under them.
//! ids = compiled.ids;
//! result?;
//! # let _ = ids;
//! # Ok::<(), twill_agent::reconcile::ReconcileError>(())
//! ```
use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::Ipv4Network;
use twill_common::{SVC_F_SOURCE_RANGES, ServiceValue, SlotKey};

use crate::lbmap::{LbMaps, LbState, MapError, MapKind};

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

    /// Every underlying map error.
    pub fn map_errors(&self) -> impl Iterator<Item = &MapError> {
        let (first, more): (Option<&MapError>, &[MapError]) = match self {
            ReconcileError::Adopt(e) => (Some(e), &[]),
            ReconcileError::Incomplete { first, more, .. } => (Some(first), more),
            ReconcileError::Inconsistent { .. } => (None, &[]),
        };
        first.into_iter().chain(more)
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
    applied: LbState,
}

impl<M: LbMaps> Reconciler<M> {
    /// A reconciler for maps known to be empty (freshly created).
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            applied: LbState::default(),
        }
    }

    /// A reconciler for maps that may hold entries (pinned by a previous agent): reads them
    /// back so nothing is rewritten needlessly and stale entries are pruned once sources sync.
    pub fn adopt(maps: M) -> Result<Self, ReconcileError> {
        let applied = maps.dump().map_err(ReconcileError::Adopt)?;
        Ok(Self { maps, applied })
    }

    /// What the reconciler believes the maps hold.
    pub fn applied(&self) -> &LbState {
        &self.applied
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
    /// cluster must never delete a live Service from the datapath.
    pub fn apply(&mut self, desired: &LbState, prune: bool) -> Result<ApplyStats, ReconcileError> {
        let mut run = Run {
            maps: &mut self.maps,
            applied: &mut self.applied,
            stats: ApplyStats::default(),
            errors: Vec::new(),
        };
        run.upserts(desired);
        if prune {
            run.prunes(desired);
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

struct Run<'a, M> {
    maps: &'a mut M,
    applied: &'a mut LbState,
    stats: ApplyStats,
    errors: Vec<MapError>,
}

impl<M: LbMaps> Run<'_, M> {
    fn upserts(&mut self, desired: &LbState) {
        if self.applied.config != desired.config {
            match self.maps.set_config(desired.config) {
                Ok(()) => {
                    self.applied.config = desired.config;
                    self.stats.config_written = true;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (addr, flags) in changed(&desired.node_addrs, &self.applied.node_addrs) {
            match self.maps.upsert_node_addr(addr, flags) {
                Ok(()) => {
                    self.applied.node_addrs.insert(addr, flags);
                    self.stats.node_addrs_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (id, be) in changed(&desired.backends, &self.applied.backends) {
            match self.maps.upsert_backend(id, be) {
                Ok(()) => {
                    self.applied.backends.insert(id, be);
                    self.stats.backends_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        for (key, backend_id) in changed(&desired.slots, &self.applied.slots) {
            if !self.applied.backends.contains_key(&backend_id) {
                self.stats.deferred += 1;
                continue;
            }
            match self.maps.upsert_slot(key, backend_id) {
                Ok(()) => {
                    self.applied.slots.insert(key, backend_id);
                    self.stats.slots_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        let new_ranges: Vec<(u32, Ipv4Network)> = desired
            .source_ranges
            .difference(&self.applied.source_ranges)
            .copied()
            .collect();
        for (svc_id, range) in new_ranges {
            match self.maps.upsert_source_range(svc_id, range) {
                Ok(()) => {
                    self.applied.source_ranges.insert((svc_id, range));
                    self.stats.source_ranges_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
        let ranges_written = covered_ids(&desired.source_ranges, &self.applied.source_ranges);
        for (key, value) in changed(&desired.services, &self.applied.services) {
            // Applied slots always point at applied backends (backends are deleted only when
            // no slot references them), so checking that the slots exist is enough.
            let slots_ready = (0..u32::from(value.backend_count)).all(|slot| {
                self.applied.slots.contains_key(&SlotKey {
                    svc_id: value.svc_id,
                    slot,
                })
            });
            // A filtered frontend admits only the ranges of its svc_id that are in the trie, so
            // it goes in once all of them are. Rewriting one that already filters on the same
            // svc_id admits exactly whom it admitted before, so it need not wait.
            let ranges_ready = value.flags & SVC_F_SOURCE_RANGES == 0
                || ranges_written.contains(&value.svc_id)
                || self
                    .applied
                    .services
                    .get(&key)
                    .is_some_and(|a| filters_on(a, value.svc_id));
            if !(slots_ready && ranges_ready) {
                self.stats.deferred += 1;
                continue;
            }
            match self.maps.upsert_service(key, value) {
                Ok(()) => {
                    self.applied.services.insert(key, value);
                    self.stats.services_upserted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    fn prunes(&mut self, desired: &LbState) {
        for key in stale(&desired.services, &self.applied.services) {
            match self.maps.delete_service(&key) {
                Ok(()) => {
                    self.applied.services.remove(&key);
                    self.stats.services_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }

        let stale_ranges: Vec<(u32, Ipv4Network)> = self
            .applied
            .source_ranges
            .difference(&desired.source_ranges)
            .copied()
            .collect();
        if !stale_ranges.is_empty() {
            // A range may go once no applied frontend filters on its svc_id, or once every
            // range desired for that svc_id is in. Before that, removing it would turn away
            // clients that still have to be admitted: the replacement ranges failed to be
            // written, or the update dropping the filter did (then the frontend would admit
            // nobody at all).
            let filtering: BTreeSet<u32> = self
                .applied
                .services
                .values()
                .filter(|v| v.flags & SVC_F_SOURCE_RANGES != 0)
                .map(|v| v.svc_id)
                .collect();
            let written = covered_ids(&desired.source_ranges, &self.applied.source_ranges);
            for (svc_id, range) in stale_ranges {
                if filtering.contains(&svc_id) && !written.contains(&svc_id) {
                    self.stats.deferred += 1;
                    continue;
                }
                match self.maps.delete_source_range(svc_id, range) {
                    Ok(()) => {
                        self.applied.source_ranges.remove(&(svc_id, range));
                        self.stats.source_ranges_deleted += 1;
                    }
                    Err(e) => self.errors.push(e),
                }
            }
        }

        let stale_slots = stale(&desired.slots, &self.applied.slots);
        if !stale_slots.is_empty() {
            // A slot may go once no applied service reaches it, whatever desired says (a
            // service whose shrinking update failed still reaches its old slots).
            let mut reach: BTreeMap<u32, u16> = BTreeMap::new();
            for v in self.applied.services.values() {
                let r = reach.entry(v.svc_id).or_default();
                *r = (*r).max(v.backend_count);
            }
            for key in stale_slots {
                if reach
                    .get(&key.svc_id)
                    .is_some_and(|&count| key.slot < u32::from(count))
                {
                    self.stats.deferred += 1;
                    continue;
                }
                match self.maps.delete_slot(&key) {
                    Ok(()) => {
                        self.applied.slots.remove(&key);
                        self.stats.slots_deleted += 1;
                    }
                    Err(e) => self.errors.push(e),
                }
            }
        }

        let stale_backends = stale(&desired.backends, &self.applied.backends);
        if !stale_backends.is_empty() {
            let referenced: BTreeSet<u32> = self.applied.slots.values().copied().collect();
            let mut removable = Vec::new();
            for id in stale_backends {
                if referenced.contains(&id) {
                    self.stats.deferred += 1;
                } else {
                    removable.push((id, self.applied.backends[&id]));
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
                            self.applied.backends.remove(&id);
                            self.stats.backends_deleted += 1;
                        }
                        Err(e) => self.errors.push(e),
                    }
                }
            }
        }

        for addr in stale(&desired.node_addrs, &self.applied.node_addrs) {
            match self.maps.delete_node_addr(addr) {
                Ok(()) => {
                    self.applied.node_addrs.remove(&addr);
                    self.stats.node_addrs_deleted += 1;
                }
                Err(e) => self.errors.push(e),
            }
        }
    }
}

/// The svc_ids with at least one desired source range and all of their desired ranges applied.
fn covered_ids(
    desired: &BTreeSet<(u32, Ipv4Network)>,
    applied: &BTreeSet<(u32, Ipv4Network)>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut missing = BTreeSet::new();
    for entry @ (svc_id, _) in desired {
        if applied.contains(entry) {
            out.insert(*svc_id);
        } else {
            missing.insert(*svc_id);
        }
    }
    &out - &missing
}

/// Whether the frontend `value` filters clients on the source ranges of `svc_id`.
fn filters_on(value: &ServiceValue, svc_id: u32) -> bool {
    value.flags & SVC_F_SOURCE_RANGES != 0 && value.svc_id == svc_id
}

/// Entries of `desired` that `applied` lacks or holds with another value. Both maps are sorted,
/// so one merged pass replaces a tree lookup per entry (the no-op apply at 10k Services is the
/// common case and should cost next to nothing).
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

/// Checks the datapath invariant on a map state: every service's slots `0..backend_count` exist
/// and point at existing backends, and every frontend filtered by source ranges has at least
/// one (without any it admits nobody). Returns the first violation.
pub fn check_invariant(state: &LbState) -> Result<(), String> {
    for (key, v) in &state.services {
        if v.flags & SVC_F_SOURCE_RANGES != 0 && state.source_ranges_of(v.svc_id).next().is_none() {
            return Err(format!(
                "service {key:?} (id {}) filters on source ranges but has none",
                v.svc_id
            ));
        }
        for slot in 0..u32::from(v.backend_count) {
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
            if !state.backends.contains_key(id) {
                return Err(format!(
                    "slot {}/{slot} points at missing backend {id}",
                    v.svc_id
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
