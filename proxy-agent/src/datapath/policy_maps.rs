//! [`AyaPolicyMaps`]: the kernel implementation of the [`PolicyMaps`] seam (the three
//! NetworkPolicy maps; each family's ipcache split over a host hash and a prefix trie as
//! [`IpCacheSlot`] places entries).
use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use twill_common::{
    IpCacheKey, IpCacheKey6, PeerIdentity, PolicyEndpoint, PolicyKey, PolicyVerdict, def,
};
use twill_core::policy::LpmKey;
use twill_core::policymap::IpCacheSlot;

use super::DatapathError;
use super::maps::{MapSource, collect, is_not_found, map_update_error, remove, syscall};
use crate::lbmap::{MapError, MapKind};
use crate::policy::{PolicyEntries, PolicyMaps};

/// The NetworkPolicy maps of a loaded (or adopted) datapath.
pub struct AyaPolicyMaps {
    endpoints: HashMap<MapData, u32, PolicyEndpoint>,
    ipcache: LpmTrie<MapData, IpCacheKey, PeerIdentity>,
    ipcache_hosts: HashMap<MapData, IpCacheKey, PeerIdentity>,
    policy: LpmTrie<MapData, PolicyKey, PolicyVerdict>,
    endpoints6: HashMap<MapData, [u32; 4], PolicyEndpoint>,
    ipcache6: LpmTrie<MapData, IpCacheKey6, PeerIdentity>,
    ipcache_hosts6: HashMap<MapData, IpCacheKey6, PeerIdentity>,
    capacity: BTreeMap<MapKind, u32>,
}

impl AyaPolicyMaps {
    /// Builds from the maps `get` returns by name.
    pub(super) fn from_maps(
        get: impl FnMut(&'static str) -> Result<Option<Map>, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let mut src = MapSource::new(get);
        let endpoints = src.take::<def::PolicyEndpoints, _>()?;
        let ipcache = src.take::<def::IpCache, _>()?;
        let policy = src.take::<def::Policy, _>()?;
        let endpoints6 = src.take::<def::PolicyEndpoints6, _>()?;
        let ipcache6 = src.take::<def::IpCache6, _>()?;
        let ipcache_hosts = src.take::<def::IpCacheHosts, _>()?;
        let ipcache_hosts6 = src.take::<def::IpCacheHosts6, _>()?;
        Ok(Self {
            endpoints,
            ipcache,
            ipcache_hosts,
            policy,
            endpoints6,
            ipcache6,
            ipcache_hosts6,
            capacity: src.capacity,
        })
    }

    /// Opens the maps pinned under `bpffs_dir` (tools, tests, the debug API).
    pub fn open_pinned(bpffs_dir: &Path) -> Result<Self, DatapathError> {
        Self::from_maps(|name| super::open_pinned_map(bpffs_dir, name).map(Some))
    }

    /// `max_entries` of each map.
    pub fn capacities(&self) -> &BTreeMap<MapKind, u32> {
        &self.capacity
    }
}

fn ipcache_key(k: LpmKey<IpCacheKey>) -> Key<IpCacheKey> {
    Key::new(k.prefix_len, k.data)
}

fn policy_key(k: LpmKey<PolicyKey>) -> Key<PolicyKey> {
    Key::new(k.prefix_len, k.data)
}

/// Deletes a trie entry; a missing key is success.
fn remove_trie<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    key: &Key<K>,
    kind: MapKind,
) -> Result<(), MapError> {
    match trie.remove(key) {
        Err(e) if !is_not_found(&e) => Err(syscall(kind, "delete", e)),
        _ => Ok(()),
    }
}

/// One family's ipcache as the seam's one longest-prefix table: the trie's entries, then the
/// host hash's as host-length keys (`full_len`). A host-length entry in the trie is one an
/// agent from before the host hash wrote; it is reported (so the reconciler deletes it when its
/// pod goes, from both maps) and shadowed by the hash's entry for the same address, which the
/// programs look up first.
fn collect_ipcache<K: aya::Pod + Ord>(
    trie: &LpmTrie<MapData, K, PeerIdentity>,
    hosts: &HashMap<MapData, K, PeerIdentity>,
    full_len: u32,
    kinds: (MapKind, MapKind),
) -> Result<BTreeMap<LpmKey<K>, PeerIdentity>, MapError> {
    let mut out = collect_trie(trie, kinds.0)?;
    for (data, id) in collect(hosts, kinds.1)? {
        out.insert(
            LpmKey {
                data,
                prefix_len: full_len,
            },
            id,
        );
    }
    Ok(out)
}

/// Every entry of an LPM trie as (prefix, data) keys.
fn collect_trie<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    kind: MapKind,
) -> Result<BTreeMap<LpmKey<K>, V>, MapError> {
    let mut out = BTreeMap::new();
    for item in trie {
        match item {
            Ok((k, v)) => {
                out.insert(
                    LpmKey {
                        data: k.data(),
                        prefix_len: k.prefix_len(),
                    },
                    v,
                );
            }
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(syscall(kind, "iterate", e)),
        }
    }
    Ok(out)
}

impl PolicyMaps for AyaPolicyMaps {
    fn upsert_endpoint(&mut self, addr_be: u32, ep: PolicyEndpoint) -> Result<(), MapError> {
        self.endpoints
            .insert(addr_be, ep, 0)
            .map_err(|e| map_update_error(&self.capacity, MapKind::PolicyEndpoints, "update", e))
    }
    fn delete_endpoint(&mut self, addr_be: u32) -> Result<(), MapError> {
        remove(&mut self.endpoints, &addr_be, MapKind::PolicyEndpoints)
    }
    fn upsert_ipcache(
        &mut self,
        key: LpmKey<IpCacheKey>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        let kind = key.map();
        match key.host() {
            Some(host) => self.ipcache_hosts.insert(host, id, 0),
            None => self.ipcache.insert(&ipcache_key(key), id, 0),
        }
        .map_err(|e| map_update_error(&self.capacity, kind, "update", e))
    }
    fn delete_ipcache(&mut self, key: &LpmKey<IpCacheKey>) -> Result<(), MapError> {
        if let Some(host) = key.host() {
            remove(&mut self.ipcache_hosts, &host, MapKind::IpCacheHosts)?;
        }
        // A host-length key too: an older agent kept hosts in the trie (see `collect_ipcache`).
        remove_trie(&mut self.ipcache, &ipcache_key(*key), MapKind::IpCache)
    }
    fn upsert_endpoint6(&mut self, addr: [u32; 4], ep: PolicyEndpoint) -> Result<(), MapError> {
        self.endpoints6
            .insert(addr, ep, 0)
            .map_err(|e| map_update_error(&self.capacity, MapKind::PolicyEndpoints6, "update", e))
    }
    fn delete_endpoint6(&mut self, addr: [u32; 4]) -> Result<(), MapError> {
        remove(&mut self.endpoints6, &addr, MapKind::PolicyEndpoints6)
    }
    fn upsert_ipcache6(
        &mut self,
        key: LpmKey<IpCacheKey6>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        let kind = key.map();
        match key.host() {
            Some(host) => self.ipcache_hosts6.insert(host, id, 0),
            None => self
                .ipcache6
                .insert(&Key::new(key.prefix_len, key.data), id, 0),
        }
        .map_err(|e| map_update_error(&self.capacity, kind, "update", e))
    }
    fn delete_ipcache6(&mut self, key: &LpmKey<IpCacheKey6>) -> Result<(), MapError> {
        if let Some(host) = key.host() {
            remove(&mut self.ipcache_hosts6, &host, MapKind::IpCacheHosts6)?;
        }
        let trie_key = Key::new(key.prefix_len, key.data);
        remove_trie(&mut self.ipcache6, &trie_key, MapKind::IpCache6)
    }
    fn upsert_policy(
        &mut self,
        key: LpmKey<PolicyKey>,
        verdict: PolicyVerdict,
    ) -> Result<(), MapError> {
        self.policy
            .insert(&policy_key(key), verdict, 0)
            .map_err(|e| map_update_error(&self.capacity, MapKind::Policy, "update", e))
    }
    fn delete_policy(&mut self, key: &LpmKey<PolicyKey>) -> Result<(), MapError> {
        match self.policy.remove(&policy_key(*key)) {
            Err(e) if !is_not_found(&e) => Err(syscall(MapKind::Policy, "delete", e)),
            _ => Ok(()),
        }
    }
    fn dump(&self) -> Result<PolicyEntries, MapError> {
        Ok(PolicyEntries {
            endpoints: collect(&self.endpoints, MapKind::PolicyEndpoints)?
                .into_iter()
                .collect(),
            ipcache: collect_ipcache(
                &self.ipcache,
                &self.ipcache_hosts,
                32,
                (MapKind::IpCache, MapKind::IpCacheHosts),
            )?,
            policy: collect_trie(&self.policy, MapKind::Policy)?,
            endpoints6: collect(&self.endpoints6, MapKind::PolicyEndpoints6)?
                .into_iter()
                .collect(),
            ipcache6: collect_ipcache(
                &self.ipcache6,
                &self.ipcache_hosts6,
                128,
                (MapKind::IpCache6, MapKind::IpCacheHosts6),
            )?,
        })
    }
}
