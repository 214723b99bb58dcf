//! The narrow seam for kernel map writes (HOUSE_STYLE §6).
//!
//! Everything the reconciler does to the datapath goes through [`LbMaps`]. Three implementations:
//! the aya one (`datapath::AyaLbMaps`, real pinned maps), an in-memory fake ([`FakeLbMaps`]) and a
//! fault injector wrapping any implementation, so the reconciler's diff/apply logic is tested
//! without a kernel, including half-failed applies.
use std::collections::BTreeMap;

use twill_common::{Backend, DatapathConfig, ServiceKey, ServiceValue, SlotKey};

/// Which map an operation touched; used in errors and as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    Services,
    BackendSlots,
    Backends,
    Affinity,
    SockRevNat,
    NodeAddrs,
    Config,
    Stats,
}

impl MapKind {
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Services => twill_common::MAP_SERVICES,
            MapKind::BackendSlots => twill_common::MAP_BACKEND_SLOTS,
            MapKind::Backends => twill_common::MAP_BACKENDS,
            MapKind::Affinity => twill_common::MAP_AFFINITY,
            MapKind::SockRevNat => twill_common::MAP_SOCK_REVNAT,
            MapKind::NodeAddrs => twill_common::MAP_NODE_ADDRS,
            MapKind::Config => twill_common::MAP_CONFIG,
            MapKind::Stats => twill_common::MAP_STATS,
        }
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map has no room for a new key (E2BIG from the kernel): never a silent drop.
    #[error("map {} is full ({capacity} entries); raise its size with the agent's --map-size flags", .map.name())]
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
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    /// Addresses (network order) NodePort frontends answer on.
    pub node_addrs: BTreeMap<u32, u32>,
    pub config: DatapathConfig,
}

/// Writes to and reads from the load-balancing maps.
pub trait LbMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError>;
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError>;
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError>;
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError>;
    /// Reads back everything the service tables hold (used at start to adopt pinned maps, and
    /// by the debug CLI).
    fn dump(&self) -> Result<LbState, MapError>;
    /// Removes affinity entries and socket reverse-NAT entries that point at `backend_id` /
    /// frontend `svc_id`s no longer present, so UDP clients stop using removed backends.
    fn flush_backend_state(&mut self, backend_id: u32, backend: Backend) -> Result<(), MapError>;
}

/// In-memory implementation for tests of the reconciler and the debug CLI.
#[derive(Clone, Debug, Default)]
pub struct FakeLbMaps {
    pub state: LbState,
    /// Capacity of the services map, to test the "map full" path.
    pub services_capacity: Option<u32>,
    pub flushed_backends: Vec<u32>,
}

impl LbMaps for FakeLbMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        if let Some(cap) = self.services_capacity
            && !self.state.services.contains_key(&key)
            && self.state.services.len() >= cap as usize
        {
            return Err(MapError::Full { map: MapKind::Services, capacity: cap });
        }
        self.state.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.state.services.remove(key);
        Ok(())
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError> {
        self.state.slots.insert(key, backend_id);
        Ok(())
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        self.state.slots.remove(key);
        Ok(())
    }
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.state.backends.insert(id, backend);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.state.backends.remove(&id);
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
}
