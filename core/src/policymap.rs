//! The narrow seam for NetworkPolicy map writes (`HOUSE_STYLE` §6), like [`crate::lbmap`] for
//! the service tables: the aya implementation (the agent's `datapath::AyaPolicyMaps`), an in-memory fake and
//! a fault injector, so the reconciler is tested without a kernel, including half-failed applies
//! and full maps.
use crate::lbmap::{FaultDecision, FaultPlan, MapError, MapKind};
use crate::policy::{LpmKey, PolicyEntries};
use twill_common::{
    IpCacheKey, IpCacheKey6, PeerIdentity, PolicyEndpoint, PolicyKey, PolicyVerdict,
};

/// Writes to and reads from the three policy maps and the IPv6 twins of the first two.
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

/// In-memory implementation with optional capacities (to drive the "map full" path).
#[derive(Clone, Debug, Default)]
pub struct FakePolicyMaps {
    pub state: PolicyEntries,
    pub endpoints_capacity: Option<u32>,
    pub ipcache_capacity: Option<u32>,
    pub policy_capacity: Option<u32>,
    pub endpoints6_capacity: Option<u32>,
    pub ipcache6_capacity: Option<u32>,
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
        let m = &mut self.state.ipcache;
        room(
            m.contains_key(&key),
            m.len(),
            self.ipcache_capacity,
            MapKind::IpCache,
        )?;
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
        let m = &mut self.state.ipcache6;
        room(
            m.contains_key(&key),
            m.len(),
            self.ipcache6_capacity,
            MapKind::IpCache6,
        )?;
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
        self.gate(MapKind::IpCache, "update")?;
        self.inner.upsert_ipcache(key, id)
    }
    fn delete_ipcache(&mut self, key: &LpmKey<IpCacheKey>) -> Result<(), MapError> {
        self.gate(MapKind::IpCache, "delete")?;
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
        self.gate(MapKind::IpCache6, "update")?;
        self.inner.upsert_ipcache6(key, id)
    }
    fn delete_ipcache6(&mut self, key: &LpmKey<IpCacheKey6>) -> Result<(), MapError> {
        self.gate(MapKind::IpCache6, "delete")?;
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
