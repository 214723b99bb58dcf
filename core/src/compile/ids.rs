//! Stable id allocation for backend sets (`svc_id`) and backends (`backend_id`).
//!
//! Ids key `BACKEND_SLOTS`, `BACKENDS` and, in the kernel, `AFFINITY` and `SOCK_REVNAT` entries
//! that outlive a single compile. So an object keeps its id for as long as it exists, adding one
//! never renumbers another, and a freed id is handed out again only after the cursor has gone
//! round the whole id space (like host-local IPAM's `last_reserved_ip`): an affinity entry of a
//! deleted Service can then never be mistaken for one of a new Service.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::family::{FrontendKey, IpFamily};
use crate::lbmap::LbState;

/// One backend set: the usable endpoints of one Service port under one traffic policy. Several
/// frontends (`ClusterIP`, `NodePort`, External IPs, `LoadBalancer` IPs) of a Service port share it,
/// so session affinity holds across them as it does with kube-proxy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetKey {
    // Shared strings: one compile holds a key per Service port in several maps.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub proto: u8,
    /// Node-local endpoints only (a `Local` traffic policy).
    pub local: bool,
    /// The family of the set's frontends and endpoints: a dual-stack Service port has a set
    /// per family.
    pub family: IpFamily,
}

/// Identity of a backend: ids are stable per (address, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

/// Id 0 is never allocated: the kernel side may use it as "none".
const FIRST_ID: u32 = 1;

/// The id assignment of one compile, input to the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdAllocation {
    sets: BTreeMap<SetKey, u32>,
    backends: BTreeMap<BackendKey, u32>,
    /// The values of `sets` and `backends`: which ids are taken.
    set_ids: HashSet<u32>,
    backend_ids: HashSet<u32>,
    next_set: u32,
    next_backend: u32,
    max_id: u32,
    /// Frontend → `svc_id` as found in adopted (pinned) maps: lets the first compile after an
    /// agent restart give each backend set the id the previous agent used, so affinity and
    /// socket reverse-NAT entries stay valid.
    hints: BTreeMap<FrontendKey, u32>,
}

impl Default for IdAllocation {
    fn default() -> Self {
        Self::with_max_id(u32::MAX)
    }
}

impl IdAllocation {
    /// An empty allocation handing out ids `1..=max_id` (a small `max_id` lets tests wrap).
    pub fn with_max_id(max_id: u32) -> Self {
        let max_id = max_id.max(FIRST_ID);
        Self {
            sets: BTreeMap::new(),
            backends: BTreeMap::new(),
            set_ids: HashSet::new(),
            backend_ids: HashSet::new(),
            next_set: FIRST_ID,
            next_backend: FIRST_ID,
            max_id,
            hints: BTreeMap::new(),
        }
    }

    /// Seeds an allocation from maps a previous agent left pinned: backends keep their ids
    /// exactly, frontends hint their `svc_id`, and both cursors start past every id in use so
    /// stale entries that are not pruned yet are never aliased.
    pub fn from_adopted(state: &LbState) -> Self {
        let mut ids = Self::default();
        for id in state.backends.keys().chain(state.backends6.keys()) {
            let Some(be) = state.backend(*id) else {
                continue;
            };
            let key = BackendKey {
                addr: be.addr(),
                port: be.port(),
                proto: be.proto(),
            };
            ids.backends.entry(key).or_insert(*id);
        }
        ids.backend_ids = ids.backends.values().copied().collect();
        ids.hints = state.frontends().map(|(k, v)| (k, v.svc_id)).collect();
        let max_svc = state
            .frontends()
            .map(|(_, v)| v.svc_id)
            .chain(state.slots.keys().map(|k| k.svc_id))
            .chain(state.source_ranges.iter().map(|(id, _)| *id))
            .max();
        ids.next_set = next_after(max_svc, ids.max_id);
        ids.next_backend = next_after(
            state
                .backends
                .keys()
                .chain(state.backends6.keys())
                .copied()
                .max(),
            ids.max_id,
        );
        ids
    }

    pub fn set_id(&self, key: &SetKey) -> Option<u32> {
        self.sets.get(key).copied()
    }

    pub fn backend_id(&self, key: &BackendKey) -> Option<u32> {
        self.backends.get(key).copied()
    }

    pub fn sets(&self) -> &BTreeMap<SetKey, u32> {
        &self.sets
    }

    pub fn backends(&self) -> &BTreeMap<BackendKey, u32> {
        &self.backends
    }

    /// Frees the id of a set no longer wanted.
    pub(super) fn release_set(&mut self, key: &SetKey) {
        if let Some(id) = self.sets.remove(key) {
            self.set_ids.remove(&id);
        }
    }

    /// Frees the id of a backend no longer wanted.
    pub(super) fn release_backend(&mut self, key: BackendKey) {
        if let Some(id) = self.backends.remove(&key) {
            self.backend_ids.remove(&id);
        }
    }

    /// Frees the ids of every key the predicates reject.
    pub(super) fn retain(
        &mut self,
        keep_set: impl Fn(&SetKey) -> bool,
        keep_backend: impl Fn(&BackendKey) -> bool,
    ) {
        self.sets.retain(|k, _| keep_set(k));
        self.backends.retain(|k, _| keep_backend(k));
        self.set_ids = self.sets.values().copied().collect();
        self.backend_ids = self.backends.values().copied().collect();
    }

    /// Gives ids to keys that have none (release what is no longer wanted first): hinted ids
    /// for sets whose frontends had one in adopted maps, then fresh ones from the cursors, each
    /// in sorted key order (deterministic; `backends` is sorted). A key that finds the id space exhausted is left
    /// out (the caller reports it). Hints are used up by the first call.
    pub(super) fn assign(
        &mut self,
        sets: &BTreeMap<SetKey, Vec<FrontendKey>>,
        backends: &[BackendKey],
    ) {
        let hints = std::mem::take(&mut self.hints);
        let mut unhinted = Vec::new();
        for (key, frontends) in sets {
            if self.sets.contains_key(key) {
                continue;
            }
            let hinted = frontends
                .iter()
                .filter_map(|fe| hints.get(fe).copied())
                .find(|id| *id >= FIRST_ID && *id <= self.max_id && !self.set_ids.contains(id));
            match hinted {
                Some(id) => {
                    self.set_ids.insert(id);
                    self.sets.insert(key.clone(), id);
                }
                None => unhinted.push(key),
            }
        }
        for key in unhinted {
            if let Some(id) = allocate(&mut self.next_set, self.max_id, &self.set_ids) {
                self.set_ids.insert(id);
                self.sets.insert(key.clone(), id);
            }
        }
        for key in backends {
            if self.backends.contains_key(key) {
                continue;
            }
            if let Some(id) = allocate(&mut self.next_backend, self.max_id, &self.backend_ids) {
                self.backend_ids.insert(id);
                self.backends.insert(*key, id);
            }
        }
    }

    /// The allocation for exactly `sets` and `backends`: kept keys keep their ids, new keys get
    /// ids as [`Self::assign`] gives them.
    #[cfg(test)]
    pub(super) fn next(
        &self,
        sets: &BTreeMap<SetKey, Vec<FrontendKey>>,
        backends: &std::collections::BTreeSet<BackendKey>,
    ) -> IdAllocation {
        let mut out = self.clone();
        for key in self.sets.keys().filter(|k| !sets.contains_key(*k)) {
            out.release_set(key);
        }
        for key in self.backends.keys().filter(|k| !backends.contains(*k)) {
            out.release_backend(*key);
        }
        out.assign(sets, &backends.iter().copied().collect::<Vec<_>>());
        out
    }
}

fn next_after(max: Option<u32>, max_id: u32) -> u32 {
    match max {
        Some(m) if m < max_id => m + 1,
        _ => FIRST_ID,
    }
}

/// Hands out the first free id at or after `cursor`, wrapping once round the id space.
fn allocate(cursor: &mut u32, max_id: u32, used: &HashSet<u32>) -> Option<u32> {
    if used.len() >= (max_id - FIRST_ID + 1) as usize {
        return None;
    }
    let mut id = (*cursor).clamp(FIRST_ID, max_id);
    loop {
        let next = if id == max_id { FIRST_ID } else { id + 1 };
        if !used.contains(&id) {
            *cursor = next;
            return Some(id);
        }
        id = next;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn set(name: &str) -> SetKey {
        SetKey {
            namespace: "ns".into(),
            name: name.into(),
            port_name: "".into(),
            proto: 6,
            local: false,
            family: IpFamily::V4,
        }
    }

    fn sets(names: &[&str]) -> BTreeMap<SetKey, Vec<FrontendKey>> {
        names.iter().map(|n| (set(n), Vec::new())).collect()
    }

    #[test]
    fn adding_keeps_existing_ids() {
        let a = IdAllocation::default().next(&sets(&["b", "d"]), &BTreeSet::new());
        let b = a.next(&sets(&["a", "b", "c", "d"]), &BTreeSet::new());
        assert_eq!(b.set_id(&set("b")), a.set_id(&set("b")));
        assert_eq!(b.set_id(&set("d")), a.set_id(&set("d")));
        assert_eq!(b.set_id(&set("a")), Some(3));
        assert_eq!(b.set_id(&set("c")), Some(4));
    }

    #[test]
    fn freed_ids_come_back_only_after_a_full_cycle() {
        let first = IdAllocation::with_max_id(4).next(&sets(&["a", "b"]), &BTreeSet::new());
        // "a" (1) is freed; the next new key must not get 1 while 3 and 4 are unused.
        let second = first.next(&sets(&["b", "c"]), &BTreeSet::new());
        assert_eq!(second.set_id(&set("c")), Some(3));
        let third = second.next(&sets(&["b", "c", "d"]), &BTreeSet::new());
        assert_eq!(third.set_id(&set("d")), Some(4));
        // Wrapped: 1 is free again, 2 is still taken by "b".
        let fourth = third.next(&sets(&["b", "c", "d", "e"]), &BTreeSet::new());
        assert_eq!(fourth.set_id(&set("e")), Some(1));
        // Exhausted: the key is left out.
        let fifth = fourth.next(&sets(&["b", "c", "d", "e", "f"]), &BTreeSet::new());
        assert_eq!(fifth.set_id(&set("f")), None);
    }
}
