//! Applies desired NetworkPolicy map contents through the [`PolicyMaps`] seam, following the
//! service reconciler's rules ([`super`]): `applied` is seeded from the maps
//! themselves and updated entry by entry only after a write succeeded, so after any failure it
//! still describes the kernel exactly and the next apply writes just what is missing.
//!
//! Write order: rule trie entries (new/changed) → ipcache → endpoints; then, when pruning,
//! endpoints → ipcache → rule trie (each family's ipcache and endpoint map at its step: the
//! IPv6 twins follow the IPv4 maps). So:
//! - a pod that becomes isolated finds its allow rules already in place (no moment of denying
//!   what the new state allows);
//! - a peer whose identity changes (labels, namespace labels, an ipBlock drawn around it) is
//!   switched only once the rules for its new identity exist;
//! - rules go only after nothing points at them any more. While an ipcache or endpoint write
//!   failed, the old rules stay (their peer may still carry the old identity): removing them
//!   would deny a flow both states allow.
//!
//! A write that fails leaves the datapath *more* restrictive, never less: an endpoint whose
//! rules could not all be written is still isolated (it denies what is missing), and a full
//! map is [`MapError::Full`], reported by name and counted — never a silent allow.
use std::collections::BTreeMap;

use crate::lbmap::{MapError, MapKind};
use crate::policy::PolicyEntries;
use crate::policymap::PolicyMaps;

/// What one apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyApplyStats {
    pub endpoints_upserted: usize,
    pub endpoints_deleted: usize,
    pub ipcache_upserted: usize,
    pub ipcache_deleted: usize,
    pub rules_upserted: usize,
    pub rules_deleted: usize,
    /// Rule deletions held back because an ipcache or endpoint write failed.
    pub deferred: usize,
}

impl PolicyApplyStats {
    pub fn writes(&self) -> usize {
        self.endpoints_upserted
            + self.endpoints_deleted
            + self.ipcache_upserted
            + self.ipcache_deleted
            + self.rules_upserted
            + self.rules_deleted
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyReconcileError {
    #[error("reading the pinned policy maps to adopt them failed")]
    Adopt(#[source] MapError),
    /// Some writes failed; `applied` is exact, the next apply retries only the rest.
    #[error("{} policy map write(s) failed, {} rule deletions deferred: {first}", .more.len() + 1, .stats.deferred)]
    Incomplete {
        #[source]
        first: MapError,
        more: Vec<MapError>,
        stats: Box<PolicyApplyStats>,
    },
}

impl PolicyReconcileError {
    pub fn map_errors(&self) -> impl Iterator<Item = &MapError> {
        let (first, more): (&MapError, &[MapError]) = match self {
            PolicyReconcileError::Adopt(e) => (e, &[]),
            PolicyReconcileError::Incomplete { first, more, .. } => (first, more),
        };
        std::iter::once(first).chain(more)
    }

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
}

/// Diffs desired against applied policy map contents and writes the difference.
#[derive(Debug)]
pub struct PolicyReconciler<M> {
    maps: M,
    applied: PolicyEntries,
}

impl<M: PolicyMaps> PolicyReconciler<M> {
    /// For maps known to be empty.
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            applied: PolicyEntries::default(),
        }
    }

    /// For maps that may hold entries (pinned by a previous agent): nothing is rewritten
    /// needlessly and leftovers are pruned once the sources synced.
    pub fn adopt(maps: M) -> Result<Self, PolicyReconcileError> {
        let applied = maps.dump().map_err(PolicyReconcileError::Adopt)?;
        Ok(Self { maps, applied })
    }

    /// What the reconciler believes the maps hold.
    pub fn applied(&self) -> &PolicyEntries {
        &self.applied
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Writes what `desired` adds or changes; with `prune`, also deletes what it no longer
    /// has (pass `false` until every source synced: a partial view of the cluster must not
    /// drop a live policy's rules).
    pub fn apply(
        &mut self,
        desired: &PolicyEntries,
        prune: bool,
    ) -> Result<PolicyApplyStats, PolicyReconcileError> {
        let mut stats = PolicyApplyStats::default();
        let mut errors = Vec::new();
        let maps = &mut self.maps;
        let applied = &mut self.applied;
        let e = &mut errors;

        let n = &mut stats.rules_upserted;
        upsert(&desired.policy, &mut applied.policy, e, n, |k, v| {
            maps.upsert_policy(k, v)
        });
        let before = e.len();
        let n = &mut stats.ipcache_upserted;
        upsert(&desired.ipcache, &mut applied.ipcache, e, n, |k, v| {
            maps.upsert_ipcache(k, v)
        });
        upsert(&desired.ipcache6, &mut applied.ipcache6, e, n, |k, v| {
            maps.upsert_ipcache6(k, v)
        });
        let n = &mut stats.endpoints_upserted;
        upsert(&desired.endpoints, &mut applied.endpoints, e, n, |k, v| {
            maps.upsert_endpoint(k, v)
        });
        upsert(
            &desired.endpoints6,
            &mut applied.endpoints6,
            e,
            n,
            |k, v| maps.upsert_endpoint6(k, v),
        );
        if prune {
            let n = &mut stats.endpoints_deleted;
            delete(&desired.endpoints, &mut applied.endpoints, e, n, |k| {
                maps.delete_endpoint(k)
            });
            delete(&desired.endpoints6, &mut applied.endpoints6, e, n, |k| {
                maps.delete_endpoint6(k)
            });
            let n = &mut stats.ipcache_deleted;
            delete(&desired.ipcache, &mut applied.ipcache, e, n, |k| {
                maps.delete_ipcache(&k)
            });
            delete(&desired.ipcache6, &mut applied.ipcache6, e, n, |k| {
                maps.delete_ipcache6(&k)
            });
            if e.len() > before {
                stats.deferred += stale(&desired.policy, &applied.policy).len();
            } else {
                let n = &mut stats.rules_deleted;
                delete(&desired.policy, &mut applied.policy, e, n, |k| {
                    maps.delete_policy(&k)
                });
            }
        }
        let mut errors = errors.into_iter();
        match errors.next() {
            None => Ok(stats),
            Some(first) => Err(PolicyReconcileError::Incomplete {
                first,
                more: errors.collect(),
                stats: Box::new(stats),
            }),
        }
    }
}

/// Writes each entry of `desired` that `applied` lacks or holds with another value, recording
/// in `applied` (and counting in `n`) those written, collecting the errors of the others.
fn upsert<K: Ord + Copy, V: PartialEq + Copy>(
    desired: &BTreeMap<K, V>,
    applied: &mut BTreeMap<K, V>,
    errors: &mut Vec<MapError>,
    n: &mut usize,
    mut write: impl FnMut(K, V) -> Result<(), MapError>,
) {
    for (k, v) in changed(desired, applied) {
        match write(k, v) {
            Ok(()) => {
                applied.insert(k, v);
                *n += 1;
            }
            Err(e) => errors.push(e),
        }
    }
}

/// Deletes each key of `applied` that `desired` lacks, as [`upsert`] writes.
fn delete<K: Ord + Copy, V>(
    desired: &BTreeMap<K, V>,
    applied: &mut BTreeMap<K, V>,
    errors: &mut Vec<MapError>,
    n: &mut usize,
    mut remove: impl FnMut(K) -> Result<(), MapError>,
) {
    for k in stale(desired, applied) {
        match remove(k) {
            Ok(()) => {
                applied.remove(&k);
                *n += 1;
            }
            Err(e) => errors.push(e),
        }
    }
}

/// Entries of `desired` that `applied` lacks or holds with another value (one merged pass).
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

/// Keys of `applied` that `desired` lacks.
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

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
