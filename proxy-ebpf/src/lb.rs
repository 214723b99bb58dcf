//! Service lookup and backend selection shared by the socket hooks and the per-packet tc
//! programs: one service/backend table, one selection algorithm (the socket path picks a slot of
//! the backend list at random, the per-packet path by a hash of the flow's tuple in the set's
//! Maglev table, `twill_core::maglev`). Stickiness (sessionAffinity per client, unconnected UDP
//! flows per socket) is one routine over two LRU tables.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::LruHashMap,
};
use twill_common::{
    AffinityKey, AffinityValue, Backend, Backend6, MAGLEV_SLOT_BASE, Reason, SCOPE_ANY,
    SVC_F_AFFINITY, SVC_F_LOCAL_ONLY, ServiceKey, ServiceKey6, ServiceValue, SlotKey,
    UDP_FLOW_TIMEOUT_S, UdpFlowKey,
};

use crate::maps::{
    TWL_AFF_V1, TWL_BE_V1, TWL_BE6_V1, TWL_NODEIP_V1, TWL_NODEIP6_V1, TWL_SLOT_V1, TWL_SVC_V1,
    TWL_SVC6_V1, TWL_UDPFLOW_V1, count,
};

/// The backend table of one address family. Slots, affinity and UDP flows are keyed by
/// `svc_id` and backend id whatever the family, so selection is one routine over either table.
pub trait Backends {
    type Backend: Copy;
    fn get(id: u32) -> Option<Self::Backend>;
}

/// IPv4 backends (`TWL_BE_V1`).
pub struct V4;
/// IPv6 backends (`TWL_BE6_V1`).
pub struct V6;

impl Backends for V4 {
    type Backend = Backend;
    #[inline(always)]
    fn get(id: u32) -> Option<Backend> {
        // SAFETY: the value is copied out at once.
        unsafe { TWL_BE_V1.get(id) }.copied()
    }
}

impl Backends for V6 {
    type Backend = Backend6;
    #[inline(always)]
    fn get(id: u32) -> Option<Backend6> {
        // SAFETY: the value is copied out at once.
        unsafe { TWL_BE6_V1.get(id) }.copied()
    }
}

/// Looks up an IPv6 frontend: `scope` first, then `SCOPE_ANY` (as [`lookup_scoped`]).
#[inline(always)]
pub fn lookup_scoped6(
    addr_be: [u32; 4],
    port_be: u16,
    proto: u8,
    scope: u8,
) -> Option<ServiceValue> {
    let mut key = ServiceKey6 {
        addr_be,
        port_be,
        proto,
        scope,
    };
    // SAFETY: the value is copied out before the next helper call.
    if let Some(v) = unsafe { TWL_SVC6_V1.get(key) } {
        return Some(*v);
    }
    key.scope = SCOPE_ANY;
    // SAFETY: as above.
    unsafe { TWL_SVC6_V1.get(key) }.copied()
}

/// How many slots are scanned to re-find a remembered affinity backend whose slot moved (the
/// compiler renumbers slots when backends come and go). Beyond this the client is re-balanced,
/// which is the only cost of a miss.
const MAX_AFFINITY_SCAN: u32 = 128;
const NSEC_PER_SEC: u64 = 1_000_000_000;

/// Looks up `scope` first, then `SCOPE_ANY`.
#[inline(always)]
pub fn lookup_scoped(addr_be: u32, port_be: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr_be,
        port_be,
        proto,
        scope,
    };
    // SAFETY: the value is copied out before the next helper call.
    if let Some(v) = unsafe { TWL_SVC_V1.get(key) } {
        return Some(*v);
    }
    key.scope = SCOPE_ANY;
    // SAFETY: as above.
    unsafe { TWL_SVC_V1.get(key) }.copied()
}

/// Whether `addr_be` is one of this node's IPv6 NodePort addresses (`NODE_ADDRS6`).
#[inline(always)]
pub fn is_node_addr6(addr_be: &[u32; 4]) -> bool {
    // SAFETY: only the presence is read; the value is never touched.
    unsafe { TWL_NODEIP6_V1.get(addr_be) }.is_some()
}

/// Whether `addr_be` is one of this node's NodePort addresses (`NODE_ADDRS`).
#[inline(always)]
pub fn is_node_addr(addr_be: u32) -> bool {
    // SAFETY: only the presence is read; the value is never touched.
    unsafe { TWL_NODEIP_V1.get(addr_be) }.is_some()
}

/// The Service frontend a destination stands for: the exact address first (ClusterIP, External
/// IP, LoadBalancer IP), then NodePort (`addr 0`) when `nodeport_ok` says the destination is an
/// address NodePort answers on.
#[inline(always)]
pub fn lookup_service(
    addr_be: u32,
    port_be: u16,
    proto: u8,
    scope: u8,
    nodeport_ok: impl FnOnce(u32) -> bool,
) -> Option<ServiceValue> {
    if let Some(v) = lookup_scoped(addr_be, port_be, proto, scope) {
        return Some(v);
    }
    if addr_be != 0 && nodeport_ok(addr_be) {
        return lookup_scoped(0, port_be, proto, scope);
    }
    None
}

#[inline(always)]
fn backend_at(svc_id: u32, slot: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once (a concurrent update by the agent writes the
    // whole u32).
    unsafe { TWL_SLOT_V1.get(SlotKey { svc_id, slot }) }.copied()
}

/// Whether `backend_id` is still one of the Service's usable backends; returns its slot.
#[inline(always)]
fn find_slot(svc: &ServiceValue, backend_id: u32, hint: u32) -> Option<u32> {
    let n = u32::from(svc.backend_count);
    if hint < n && backend_at(svc.svc_id, hint) == Some(backend_id) {
        return Some(hint);
    }
    let mut slot = 0;
    while slot < MAX_AFFINITY_SCAN && slot < n {
        if backend_at(svc.svc_id, slot) == Some(backend_id) {
            return Some(slot);
        }
        slot += 1;
    }
    None
}

/// How a new connection's backend is picked.
#[derive(Clone, Copy)]
pub enum Pick {
    /// Uniformly at random from the backend list (the socket path).
    Random(u32),
    /// By the hash of a flow's tuple, in the set's Maglev table when it has one (the
    /// per-packet path): the same flow gets the same backend while the set is unchanged.
    Flow(u32),
}

/// The usable backend `pick` selects: (id, slot, backend).
#[inline(always)]
fn backend_by<T: Backends>(
    svc: &ServiceValue,
    pick: Pick,
) -> Result<(u32, u32, T::Backend), Reason> {
    let slot = match pick {
        Pick::Flow(hash) if svc.maglev_size != 0 => MAGLEV_SLOT_BASE + hash % svc.maglev_size,
        Pick::Random(n) | Pick::Flow(n) => n % u32::from(svc.backend_count),
    };
    let id = backend_at(svc.svc_id, slot).ok_or(Reason::BackendMissing)?;
    let be = T::get(id).ok_or(Reason::BackendMissing)?;
    Ok((id, slot, be))
}

/// A uniformly random pick for [`backend_by`].
#[inline(always)]
fn random_pick() -> Pick {
    // SAFETY: helper without arguments.
    Pick::Random(unsafe { bpf_get_prandom_u32() })
}

/// Which sticky table a selection remembers its backend in, and how it is counted.
struct Sticky<'a, K> {
    map: &'a LruHashMap<K, AffinityValue>,
    key: K,
    timeout_ns: u64,
    /// Counted (returned) when the remembered backend is used.
    hit: Reason,
    /// Counted when the table has no room (the traffic proceeds without stickiness).
    full: Reason,
}

#[inline(always)]
fn remember<K>(sticky: &Sticky<'_, K>, backend_id: u32, slot: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        slot_hint: slot,
        last_used_ns: now,
    };
    if sticky.map.insert(&sticky.key, value, 0).is_err() {
        count(sticky.full);
    }
}

/// The remembered backend while it is fresh (used within `timeout_ns`, like kube-proxy's
/// `recent` match) and still one of the Service's backends; otherwise a uniformly random one,
/// remembered from now on (the one at `pick`). `svc` has at least one backend.
#[inline(always)]
fn sticky_backend<T: Backends, K>(
    svc: &ServiceValue,
    sticky: &Sticky<'_, K>,
    pick: Pick,
) -> Result<(T::Backend, Reason), Reason> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY (both lookups): the values are copied out at once; a concurrent update of the LRU
    // entry may tear it, which at worst re-balances this one client.
    if let Some(old) = unsafe { sticky.map.get(&sticky.key) }.copied()
        && now.saturating_sub(old.last_used_ns) <= sticky.timeout_ns
        && let Some(slot) = find_slot(svc, old.backend_id, old.slot_hint)
        && let Some(be) = T::get(old.backend_id)
    {
        remember(sticky, old.backend_id, slot, now);
        return Ok((be, sticky.hit));
    }
    // Expired, or the remembered backend left the Service: balance afresh and remember.
    let (id, slot, be) = backend_by::<T>(svc, pick)?;
    remember(sticky, id, slot, now);
    Ok((be, Reason::Translated))
}

/// Refuses a Service without usable backends, with the reason kube-proxy would have.
#[inline(always)]
fn require_backends(svc: &ServiceValue) -> Result<(), Reason> {
    if svc.backend_count != 0 {
        return Ok(());
    }
    Err(if svc.flags & SVC_F_LOCAL_ONLY != 0 {
        Reason::NoLocalBackend
    } else {
        Reason::NoBackends
    })
}

/// Picks the backend for a new connection of `client_id` to `svc`: the remembered one under
/// sessionAffinity (`affinity_timeout_s` since last use) while it is still one of the Service's
/// backends; otherwise uniformly at random.
#[inline(always)]
pub fn select_backend<T: Backends>(
    svc: &ServiceValue,
    client_id: u64,
) -> Result<(T::Backend, Reason), Reason> {
    select_backend_by::<T>(svc, client_id, random_pick())
}

/// [`select_backend`] with the pick given: `Pick::Flow(flow_hash(..))` on the per-packet path.
#[inline(always)]
pub fn select_backend_by<T: Backends>(
    svc: &ServiceValue,
    client_id: u64,
    pick: Pick,
) -> Result<(T::Backend, Reason), Reason> {
    require_backends(svc)?;
    if svc.flags & SVC_F_AFFINITY == 0 {
        let (_, _, be) = backend_by::<T>(svc, pick)?;
        return Ok((be, Reason::Translated));
    }
    let sticky = Sticky {
        map: &TWL_AFF_V1,
        key: AffinityKey {
            client_id,
            svc_id: svc.svc_id,
            _pad: 0,
        },
        timeout_ns: u64::from(svc.affinity_timeout_s) * NSEC_PER_SEC,
        hit: Reason::AffinityHit,
        full: Reason::AffinityMapFull,
    };
    sticky_backend::<T, _>(svc, &sticky, pick)
}

/// Picks the backend for an unconnected UDP datagram of socket `cookie` (client `client_id`)
/// to `svc`. sessionAffinity, when set, decides as for connections; otherwise the socket's
/// datagrams to this frontend are one flow that keeps its backend while it is not idle for
/// `UDP_FLOW_TIMEOUT_S` and the backend stays in the Service.
#[inline(always)]
pub fn select_udp_flow_backend<T: Backends>(
    svc: &ServiceValue,
    client_id: u64,
    cookie: u64,
) -> Result<(T::Backend, Reason), Reason> {
    if svc.flags & SVC_F_AFFINITY != 0 {
        return select_backend::<T>(svc, client_id);
    }
    require_backends(svc)?;
    let sticky = Sticky {
        map: &TWL_UDPFLOW_V1,
        key: UdpFlowKey {
            cookie,
            svc_id: svc.svc_id,
            _pad: 0,
        },
        timeout_ns: UDP_FLOW_TIMEOUT_S * NSEC_PER_SEC,
        hit: Reason::UdpFlowHit,
        full: Reason::UdpFlowMapFull,
    };
    sticky_backend::<T, _>(svc, &sticky, random_pick())
}
