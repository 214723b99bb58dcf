//! The narrow seam for NetworkPolicy map writes (`HOUSE_STYLE` §6), like [`crate::lbmap`] for
//! the service tables: the aya implementation (the agent's `datapath::AyaPolicyMaps`), an in-memory fake and
//! a fault injector, so the reconciler is tested without a kernel, including half-failed applies
//! and full maps.
use crate::lbmap::{FaultDecision, FaultPlan, MapError, MapKind};
use crate::policy::{LpmKey, PolicyEntries};
use twill_common::{
    IpCacheKey, IpCacheKey6, PeerIdentity, PolicyEndpoint, PolicyKey, PolicyVerdict,
};

/// Writes to and reads from the three policy maps and the IPv6 twins of the first two (each
/// ipcache split over a hash and a trie by [`IpCacheSlot`]).
pub trait PolicyMaps {
    fn upsert_endpoint(&mut self, addr_be: u32, ep: PolicyEndpoint) -> Result<(), MapError>;
    fn delete_endpoint(&mut self, addr_be: u32) -> Result<(), MapError>;
    fn upsert_ipcache(&mut self, key: LpmKey<IpCacheKey>, id: PeerIdentity)
    -> Result<(), MapError>;
    fn delete_ipcache(&mut self, key: &LpmKey<IpCacheKey>) -> Result<(), MapError>;
    fn upsert_endpoint6(&mut self, addr: [u32; 4], ep: PolicyEndpoint) -> Result<(), MapError>;
    fn delete_endpoint6(&mut self, addr: [u32; 4]) -> Result<(), MapError>;
    fn upsert_ipcache6(
        &mut self,
        key: LpmKey<IpCacheKey6>,
        id: PeerIdentity,
    ) -> Result<(), MapError>;
    fn delete_ipcache6(&mut self, key: &LpmKey<IpCacheKey6>) -> Result<(), MapError>;
    fn upsert_policy(
        &mut self,
        key: LpmKey<PolicyKey>,
        verdict: PolicyVerdict,
    ) -> Result<(), MapError>;
    fn delete_policy(&mut self, key: &LpmKey<PolicyKey>) -> Result<(), MapError>;
    /// Everything the maps hold (adoption at start, the debug CLI).
    fn dump(&self) -> Result<PolicyEntries, MapError>;
}

/// Where the kernel keeps an ipcache entry. [`PolicyEntries::ipcache`] (and `ipcache6`) is one
/// longest-prefix table; the kernel splits it in two: host-length keys (a pod's or the node's
/// address, /32 and /128) in an exact-match hash ([`MapKind::IpCacheHosts`], `…Hosts6`) that
/// the programs look up first, every shorter prefix (ipBlock regions) in the LPM trie behind it
/// ([`MapKind::IpCache`], `IpCache6`). A host-length entry is always the longest match for its
/// address, so hash-then-trie answers exactly what the one table says, and a pod peer costs a
/// hash lookup instead of the trie's deepest walk. Every implementation of [`PolicyMaps`]
/// places entries by these functions.
pub trait IpCacheSlot {
    /// The exact-match key when this is a host-length entry.
    type Host;
    fn host(&self) -> Option<Self::Host>;
    /// The map holding this entry.
    fn map(&self) -> MapKind;
}

impl IpCacheSlot for LpmKey<IpCacheKey> {
    type Host = IpCacheKey;
    fn host(&self) -> Option<IpCacheKey> {
        (self.prefix_len == 32).then_some(self.data)
    }
    fn map(&self) -> MapKind {
        if self.host().is_some() {
            MapKind::IpCacheHosts
        } else {
            MapKind::IpCache
        }
    }
}

impl IpCacheSlot for LpmKey<IpCacheKey6> {
    type Host = IpCacheKey6;
    fn host(&self) -> Option<IpCacheKey6> {
        (self.prefix_len == 128).then_some(self.data)
    }
    fn map(&self) -> MapKind {
        if self.host().is_some() {
            MapKind::IpCacheHosts6
        } else {
            MapKind::IpCache6
        }
    }
}

/// In-memory implementation with optional capacities (to drive the "map full" path).
#[derive(Clone, Debug, Default)]
pub struct FakePolicyMaps {
    pub state: PolicyEntries,
    pub endpoints_capacity: Option<u32>,
    /// The ipcache trie (prefixes shorter than /32), as [`IpCacheSlot`] places entries.
    pub ipcache_capacity: Option<u32>,
    /// The host ipcache hash (/32 entries).
    pub ipcache_hosts_capacity: Option<u32>,
    pub policy_capacity: Option<u32>,
    pub endpoints6_capacity: Option<u32>,
    pub ipcache6_capacity: Option<u32>,
    pub ipcache_hosts6_capacity: Option<u32>,
}

/// `Err(Full)` when a new key would exceed `capacity` (E2BIG from the kernel); updating an
/// existing key always succeeds.
fn room(present: bool, len: usize, capacity: Option<u32>, map: MapKind) -> Result<(), MapError> {
    match capacity {
        Some(capacity) if !present && len >= capacity as usize => {
            Err(MapError::Full { map, capacity })
        }
        _ => Ok(()),
    }
}

/// How many of `keys` the map `kind` holds; counted only when it has a capacity to check.
fn slot_len<'k, K: IpCacheSlot + 'k>(
    keys: impl Iterator<Item = &'k K>,
    kind: MapKind,
    capacity: Option<u32>,
) -> usize {
    if capacity.is_none() {
        return 0;
    }
    keys.filter(|k| k.map() == kind).count()
}

impl PolicyMaps for FakePolicyMaps {
    fn upsert_endpoint(&mut self, addr_be: u32, ep: PolicyEndpoint) -> Result<(), MapError> {
        let m = &mut self.state.endpoints;
        room(
            m.contains_key(&addr_be),
            m.len(),
            self.endpoints_capacity,
            MapKind::PolicyEndpoints,
        )?;
        m.insert(addr_be, ep);
        Ok(())
    }
    fn delete_endpoint(&mut self, addr_be: u32) -> Result<(), MapError> {
        self.state.endpoints.remove(&addr_be);
        Ok(())
    }
    fn upsert_ipcache(
        &mut self,
        key: LpmKey<IpCacheKey>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        let kind = key.map();
        let capacity = if kind == MapKind::IpCacheHosts {
            self.ipcache_hosts_capacity
        } else {
            self.ipcache_capacity
        };
        let m = &mut self.state.ipcache;
        let len = slot_len(m.keys(), kind, capacity);
        room(m.contains_key(&key), len, capacity, kind)?;
        m.insert(key, id);
        Ok(())
    }
    fn delete_ipcache(&mut self, key: &LpmKey<IpCacheKey>) -> Result<(), MapError> {
        self.state.ipcache.remove(key);
        Ok(())
    }
    fn upsert_endpoint6(&mut self, addr: [u32; 4], ep: PolicyEndpoint) -> Result<(), MapError> {
        let m = &mut self.state.endpoints6;
        room(
            m.contains_key(&addr),
            m.len(),
            self.endpoints6_capacity,
            MapKind::PolicyEndpoints6,
        )?;
        m.insert(addr, ep);
        Ok(())
    }
    fn delete_endpoint6(&mut self, addr: [u32; 4]) -> Result<(), MapError> {
        self.state.endpoints6.remove(&addr);
        Ok(())
    }
    fn upsert_ipcache6(
        &mut self,
        key: LpmKey<IpCacheKey6>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        let kind = key.map();
        let capacity = if kind == MapKind::IpCacheHosts6 {
            self.ipcache_hosts6_capacity
        } else {
            self.ipcache6_capacity
        };
        let m = &mut self.state.ipcache6;
        let len = slot_len(m.keys(), kind, capacity);
        room(m.contains_key(&key), len, capacity, kind)?;
        m.insert(key, id);
        Ok(())
    }
    fn delete_ipcache6(&mut self, key: &LpmKey<IpCacheKey6>) -> Result<(), MapError> {
        self.state.ipcache6.remove(key);
        Ok(())
    }
    fn upsert_policy(
        &mut self,
        key: LpmKey<PolicyKey>,
        verdict: PolicyVerdict,
    ) -> Result<(), MapError> {
        let m = &mut self.state.policy;
        room(
            m.contains_key(&key),
            m.len(),
            self.policy_capacity,
            MapKind::Policy,
        )?;
        m.insert(key, verdict);
        Ok(())
    }
    fn delete_policy(&mut self, key: &LpmKey<PolicyKey>) -> Result<(), MapError> {
        self.state.policy.remove(key);
        Ok(())
    }
    fn dump(&self) -> Result<PolicyEntries, MapError> {
        Ok(self.state.clone())
    }
}

/// Fault injector around any [`PolicyMaps`], driven by the same [`FaultPlan`] as the service
/// tables' (operation numbers count every write, failed ones included). A failed operation
/// never reaches the inner maps.
#[derive(Clone, Debug, Default)]
pub struct FaultyPolicyMaps<M> {
    pub inner: M,
    pub plan: FaultPlan,
    pub ops: u64,
    pub injected: u64,
}

impl<M: PolicyMaps> FaultyPolicyMaps<M> {
    pub fn new(inner: M, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan,
            ops: 0,
            injected: 0,
        }
    }

    fn gate(&mut self, map: MapKind, op: &'static str) -> Result<(), MapError> {
        let n = self.ops;
        self.ops += 1;
        match self.plan.decide(n, map) {
            FaultDecision::Pass => Ok(()),
            FaultDecision::Full => {
                self.injected += 1;
                Err(MapError::Full { map, capacity: 0 })
            }
            FaultDecision::Inject => {
                self.injected += 1;
                Err(MapError::Injected { map, op })
            }
        }
    }
}

impl<M: PolicyMaps> PolicyMaps for FaultyPolicyMaps<M> {
    fn upsert_endpoint(&mut self, addr_be: u32, ep: PolicyEndpoint) -> Result<(), MapError> {
        self.gate(MapKind::PolicyEndpoints, "update")?;
        self.inner.upsert_endpoint(addr_be, ep)
    }
    fn delete_endpoint(&mut self, addr_be: u32) -> Result<(), MapError> {
        self.gate(MapKind::PolicyEndpoints, "delete")?;
        self.inner.delete_endpoint(addr_be)
    }
    fn upsert_ipcache(
        &mut self,
        key: LpmKey<IpCacheKey>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        self.gate(key.map(), "update")?;
        self.inner.upsert_ipcache(key, id)
    }
    fn delete_ipcache(&mut self, key: &LpmKey<IpCacheKey>) -> Result<(), MapError> {
        self.gate(key.map(), "delete")?;
        self.inner.delete_ipcache(key)
    }
    fn upsert_endpoint6(&mut self, addr: [u32; 4], ep: PolicyEndpoint) -> Result<(), MapError> {
        self.gate(MapKind::PolicyEndpoints6, "update")?;
        self.inner.upsert_endpoint6(addr, ep)
    }
    fn delete_endpoint6(&mut self, addr: [u32; 4]) -> Result<(), MapError> {
        self.gate(MapKind::PolicyEndpoints6, "delete")?;
        self.inner.delete_endpoint6(addr)
    }
    fn upsert_ipcache6(
        &mut self,
        key: LpmKey<IpCacheKey6>,
        id: PeerIdentity,
    ) -> Result<(), MapError> {
        self.gate(key.map(), "update")?;
        self.inner.upsert_ipcache6(key, id)
    }
    fn delete_ipcache6(&mut self, key: &LpmKey<IpCacheKey6>) -> Result<(), MapError> {
        self.gate(key.map(), "delete")?;
        self.inner.delete_ipcache6(key)
    }
    fn upsert_policy(
        &mut self,
        key: LpmKey<PolicyKey>,
        verdict: PolicyVerdict,
    ) -> Result<(), MapError> {
        self.gate(MapKind::Policy, "update")?;
        self.inner.upsert_policy(key, verdict)
    }
    fn delete_policy(&mut self, key: &LpmKey<PolicyKey>) -> Result<(), MapError> {
        self.gate(MapKind::Policy, "delete")?;
        self.inner.delete_policy(key)
    }
    fn dump(&self) -> Result<PolicyEntries, MapError> {
        if self.plan.dump {
            return Err(MapError::Injected {
                map: MapKind::Policy,
                op: "dump",
            });
        }
        self.inner.dump()
    }
}
