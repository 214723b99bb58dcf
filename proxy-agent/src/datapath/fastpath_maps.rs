//! [`AyaFastPathMaps`]: the eBPF host routing and masquerade maps (`twill_common::fastpath`):
//! local endpoints of both families, the switches and the masquerade prefixes. Each sync reads the map, writes
//! what is new or changed, then deletes what is gone (`twill_core::routing::fastpath::diff`), so
//! a repeated or interrupted sync converges.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnetwork::{Ipv4Network, Ipv6Network};
use twill_common::{
    FastPathConfig, LocalEndpoint, MASQ_PREFIX_BASE, MasqKey, MasqKey6, addr6_from_octets,
    addr6_octets, def,
};
use twill_core::routing::fastpath::{LocalEndpoints, diff};

use super::DatapathError;
use super::maps::{MapSource, collect, map_update_error, remove, syscall};
use crate::lbmap::{MapError, MapKind};

pub struct AyaFastPathMaps {
    endpoints: HashMap<MapData, u32, LocalEndpoint>,
    endpoints6: HashMap<MapData, [u32; 4], LocalEndpoint>,
    config: Array<MapData, FastPathConfig>,
    masq: LpmTrie<MapData, MasqKey, u8>,
    masq6: LpmTrie<MapData, MasqKey6, u8>,
    capacity: BTreeMap<MapKind, u32>,
}

/// What one endpoint sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSync {
    pub written: usize,
    pub deleted: usize,
}

impl AyaFastPathMaps {
    pub(super) fn from_maps(
        get: impl FnMut(&'static str) -> Result<Option<Map>, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let mut src = MapSource::new(get);
        let endpoints = src.take::<def::LocalEndpoints, _>()?;
        let endpoints6 = src.take::<def::LocalEndpoints6, _>()?;
        let config = src.take::<def::FastPathSwitches, _>()?;
        let masq = src.take::<def::Masq, _>()?;
        let masq6 = src.take::<def::Masq6, _>()?;
        Ok(Self {
            endpoints,
            endpoints6,
            config,
            masq,
            masq6,
            capacity: src.capacity,
        })
    }

    /// Opens the maps pinned under `bpffs_dir` (the debug API, tests).
    pub fn open_pinned(bpffs_dir: &Path) -> Result<Self, DatapathError> {
        Self::from_maps(|name| super::open_pinned_map(bpffs_dir, name).map(Some))
    }

    /// Both families' endpoint maps as they are.
    pub fn endpoints(&self) -> Result<LocalEndpoints, MapError> {
        Ok(LocalEndpoints {
            v4: collect(&self.endpoints, MapKind::LocalEndpoints)?
                .into_iter()
                .collect(),
            v6: collect(&self.endpoints6, MapKind::LocalEndpoints6)?
                .into_iter()
                .collect(),
        })
    }

    /// Converges both endpoint maps to `desired` (per map, new and changed entries first).
    pub fn sync_endpoints(&mut self, desired: &LocalEndpoints) -> Result<EndpointSync, MapError> {
        let current = self.endpoints()?;
        let v4 = sync_map(
            &mut self.endpoints,
            &current.v4,
            &desired.v4,
            &self.capacity,
            MapKind::LocalEndpoints,
        )?;
        let v6 = sync_map(
            &mut self.endpoints6,
            &current.v6,
            &desired.v6,
            &self.capacity,
            MapKind::LocalEndpoints6,
        )?;
        Ok(EndpointSync {
            written: v4.written + v6.written,
            deleted: v4.deleted + v6.deleted,
        })
    }

    pub fn config(&self) -> Result<FastPathConfig, MapError> {
        self.config
            .get(&0, 0)
            .map_err(|e| syscall(MapKind::FastPathSwitches, "lookup", e))
    }

    pub fn set_config(&mut self, config: FastPathConfig) -> Result<(), MapError> {
        if self.config()? == config {
            return Ok(());
        }
        self.config
            .set(0, config, 0)
            .map_err(|e| syscall(MapKind::FastPathSwitches, "update", e))
    }

    /// The masquerade prefixes as (kind, prefix).
    pub fn masq_prefixes(&self) -> Result<BTreeSet<(u8, Ipv4Network)>, MapError> {
        let mut out = BTreeSet::new();
        for item in &self.masq {
            let k = match item {
                Ok((k, _)) => k,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(syscall(MapKind::Masq, "iterate", e)),
            };
            let data = k.data();
            let prefix =
                u8::try_from(k.prefix_len().saturating_sub(MASQ_PREFIX_BASE)).unwrap_or(32);
            let addr = Ipv4Addr::from(u32::from_be(data.addr_be));
            if let Ok(net) = Ipv4Network::new(addr, prefix) {
                out.insert((data.kind, net));
            }
        }
        Ok(out)
    }

    /// Converges the masquerade prefixes to `desired` (canonical prefixes).
    pub fn sync_masq(&mut self, desired: &BTreeSet<(u8, Ipv4Network)>) -> Result<bool, MapError> {
        let current = self.masq_prefixes()?;
        if &current == desired {
            return Ok(false);
        }
        // Exemptions before sources (`MASQ_KIND_EXEMPT` sorts after `MASQ_KIND_SOURCE`, so the
        // set is walked backwards): a source prefix written first would, for an instant,
        // masquerade pod↔pod flows whose exemption is not there yet, and their entries would
        // outlive the instant.
        for p in desired.iter().rev().filter(|p| !current.contains(p)) {
            self.masq
                .insert(&masq_key(*p), 1, 0)
                .map_err(|e| map_update_error(&self.capacity, MapKind::Masq, "update", e))?;
        }
        for p in current.difference(desired) {
            match self.masq.remove(&masq_key(*p)) {
                Err(e) if !super::maps::is_not_found(&e) => {
                    return Err(syscall(MapKind::Masq, "delete", e));
                }
                _ => {}
            }
        }
        Ok(true)
    }

    /// The IPv6 masquerade prefixes as (kind, prefix).
    pub fn masq6_prefixes(&self) -> Result<BTreeSet<(u8, Ipv6Network)>, MapError> {
        let mut out = BTreeSet::new();
        for item in &self.masq6 {
            let k = match item {
                Ok((k, _)) => k,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(syscall(MapKind::Masq6, "iterate", e)),
            };
            let data = k.data();
            let prefix =
                u8::try_from(k.prefix_len().saturating_sub(MASQ_PREFIX_BASE)).unwrap_or(128);
            let addr = Ipv6Addr::from(addr6_octets(data.addr_be));
            if let Ok(net) = Ipv6Network::new(addr, prefix) {
                out.insert((data.kind, net));
            }
        }
        Ok(out)
    }

    /// Converges the IPv6 masquerade prefixes to `desired` (canonical prefixes), new ones first.
    pub fn sync_masq6(&mut self, desired: &BTreeSet<(u8, Ipv6Network)>) -> Result<bool, MapError> {
        let current = self.masq6_prefixes()?;
        if &current == desired {
            return Ok(false);
        }
        // Exemptions before sources (`MASQ_KIND_EXEMPT` sorts after `MASQ_KIND_SOURCE`, so the
        // set is walked backwards): a source prefix written first would, for an instant,
        // masquerade pod↔pod flows whose exemption is not there yet, and their entries would
        // outlive the instant.
        for p in desired.iter().rev().filter(|p| !current.contains(p)) {
            self.masq6
                .insert(&masq6_key(*p), 1, 0)
                .map_err(|e| map_update_error(&self.capacity, MapKind::Masq6, "update", e))?;
        }
        for p in current.difference(desired) {
            match self.masq6.remove(&masq6_key(*p)) {
                Err(e) if !super::maps::is_not_found(&e) => {
                    return Err(syscall(MapKind::Masq6, "delete", e));
                }
                _ => {}
            }
        }
        Ok(true)
    }
}

/// Converges one endpoint map from `current` to `desired`: new and changed entries, then
/// deletions.
fn sync_map<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, LocalEndpoint>,
    current: &BTreeMap<K, LocalEndpoint>,
    desired: &BTreeMap<K, LocalEndpoint>,
    capacity: &BTreeMap<MapKind, u32>,
    kind: MapKind,
) -> Result<EndpointSync, MapError> {
    let d = diff(current, desired);
    for (k, v) in &d.upserts {
        map.insert(k, v, 0)
            .map_err(|e| map_update_error(capacity, kind, "update", e))?;
    }
    for k in &d.deletes {
        remove(map, k, kind)?;
    }
    Ok(EndpointSync {
        written: d.upserts.len(),
        deleted: d.deletes.len(),
    })
}

fn masq6_key((kind, net): (u8, Ipv6Network)) -> Key<MasqKey6> {
    Key::new(
        MASQ_PREFIX_BASE + u32::from(net.prefix()),
        MasqKey6 {
            kind,
            _pad: [0; 3],
            addr_be: addr6_from_octets(net.network().octets()),
        },
    )
}

fn masq_key((kind, net): (u8, Ipv4Network)) -> Key<MasqKey> {
    Key::new(
        MASQ_PREFIX_BASE + u32::from(net.prefix()),
        MasqKey {
            kind,
            _pad: [0; 3],
            addr_be: u32::from(net.network()).to_be(),
        },
    )
}
