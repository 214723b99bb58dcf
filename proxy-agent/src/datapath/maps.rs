//! [`AyaLbMaps`]: the kernel implementation of the [`LbMaps`] seam, plus the read-only views the
//! agent's metrics and debug CLI need (per-reason counters, affinity and socket reverse-NAT
//! dumps).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use twill_common::{
    AffinityKey, AffinityValue, Backend, Backend6, CT_SCOPE_NAT, CtKey, CtKey6, CtValue, CtValue6,
    DatapathConfig, MapDef, NodeAddrValue, PROTO_TCP, PROTO_UDP, Reason, STATS_MAX, ServiceKey,
    ServiceValue, SlotKey, SockRevNatKey, SockRevNatValue, SrcRangeKey, SrcRangeKey6, UdpFlowKey,
    def,
};
use twill_common::{ServiceKey6, SockRevNatKey6, SockRevNatValue6};

use super::{
    DatapathError,
    sockdestroy::{DestroyMethod, SocketDestroyer},
};
use crate::ctgc::{self, AddrOwners, CtGcPlan};
use crate::lbmap::{LbMaps, LbState, MapError, MapKind};
use twill_core::family::addr6_from_be;

/// Per-reason verdict counters summed over all CPUs. Reasons never hit are present with 0, so
/// metrics export every label.
pub type ReasonCounts = BTreeMap<Reason, u64>;

/// What a flush of one backend's state removed (for logs and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub affinity_entries: usize,
    /// Unconnected UDP flows that stuck to the backend.
    pub udp_flow_entries: usize,
    pub revnat_entries: usize,
    /// Per-packet connection-tracking entries (either direction) of UDP flows to the backend
    /// (TCP flows drain: they stay until they close or their pod goes, see [`crate::ctgc`]).
    pub ct_entries: usize,
    pub sockets_destroyed: usize,
    pub namespaces_searched: usize,
    /// How the sockets were destroyed; `None` when no UDP backend was flushed or destruction
    /// is off.
    pub socket_destroy_method: Option<DestroyMethod>,
}

/// An IPv4 address in the maps' form (network order) as an address.
fn addr4(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr_be))
}

/// The load-balancing maps of a loaded (or adopted) datapath.
pub struct AyaLbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    node_addrs: HashMap<MapData, u32, NodeAddrValue>,
    node_addrs6: HashMap<MapData, [u32; 4], NodeAddrValue>,
    config: Array<MapData, DatapathConfig>,
    stats: PerCpuArray<MapData, u64>,
    ct: HashMap<MapData, CtKey, CtValue>,
    src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    src_ranges6: LpmTrie<MapData, SrcRangeKey6, u8>,
    udp_flows: HashMap<MapData, UdpFlowKey, AffinityValue>,
    services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends6: HashMap<MapData, u32, Backend6>,
    revnat6: HashMap<MapData, SockRevNatKey6, SockRevNatValue6>,
    capacity: BTreeMap<MapKind, u32>,
    /// Destroys connected UDP sockets to a backend that goes away; `None` disables it.
    socket_destroyer: Option<SocketDestroyer>,
    /// The last flush, for observability.
    pub last_flush: FlushReport,
}

/// An aya handle whose key and value types are those of catalogue entry `D`: taking a map with
/// [`typed`] into a handle of other types does not compile.
pub(super) trait Handle<D: MapDef>: TryFrom<Map, Error = aya::maps::MapError> {}
impl<D: MapDef> Handle<D> for HashMap<MapData, D::Key, D::Value>
where
    D::Key: aya::Pod,
    D::Value: aya::Pod,
{
}
impl<D: MapDef> Handle<D> for LpmTrie<MapData, D::Key, D::Value>
where
    D::Key: aya::Pod,
    D::Value: aya::Pod,
{
}
impl<D: MapDef<Key = u32>> Handle<D> for Array<MapData, D::Value> where D::Value: aya::Pod {}
impl<D: MapDef<Key = u32>> Handle<D> for PerCpuArray<MapData, D::Value> where D::Value: aya::Pod {}

/// `map` as the typed handle of catalogue entry `D`.
pub(super) fn typed<D: MapDef, H: Handle<D>>(map: Map) -> Result<H, DatapathError> {
    let name = D::KIND.name();
    H::try_from(map).map_err(|source| DatapathError::MapType { name, source })
}

/// Takes maps by catalogue entry from `get` (a loaded object or pins), noting each one's size.
pub(super) struct MapSource<G> {
    get: G,
    pub capacity: BTreeMap<MapKind, u32>,
}

impl<G: FnMut(&'static str) -> Result<Option<Map>, DatapathError>> MapSource<G> {
    pub(super) fn new(get: G) -> Self {
        Self {
            get,
            capacity: BTreeMap::new(),
        }
    }

    /// The map of catalogue entry `D`, typed.
    pub(super) fn take<D: MapDef, H: Handle<D>>(&mut self) -> Result<H, DatapathError> {
        let name = D::KIND.name();
        let map = (self.get)(name)?.ok_or(DatapathError::MissingMap(name))?;
        self.capacity.insert(D::KIND, capacity_of(&map));
        typed::<D, H>(map)
    }
}

pub(super) fn capacity_of(map: &Map) -> u32 {
    let (Map::HashMap(data)
    | Map::LruHashMap(data)
    | Map::Array(data)
    | Map::PerCpuArray(data)
    | Map::LpmTrie(data)) = map
    else {
        return 0;
    };
    data.info().map_or(0, |i| i.max_entries())
}

impl AyaLbMaps {
    /// Builds from maps taken out of a loaded object (or opened from their pins): `get` returns
    /// the map of the given name.
    pub(super) fn from_maps(
        get: impl FnMut(&'static str) -> Result<Option<Map>, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let mut src = MapSource::new(get);
        let services = src.take::<def::Services, _>()?;
        let slots = src.take::<def::BackendSlots, _>()?;
        let backends = src.take::<def::Backends, _>()?;
        let affinity = src.take::<def::Affinity, _>()?;
        let revnat = src.take::<def::SockRevNat, _>()?;
        let node_addrs = src.take::<def::NodeAddrs, _>()?;
        let node_addrs6 = src.take::<def::NodeAddrs6, _>()?;
        let config = src.take::<def::Config, _>()?;
        let stats = src.take::<def::Stats, _>()?;
        let ct = src.take::<def::Ct, _>()?;
        let src_ranges = src.take::<def::SourceRanges, _>()?;
        let src_ranges6 = src.take::<def::SourceRanges6, _>()?;
        let udp_flows = src.take::<def::UdpFlows, _>()?;
        let services6 = src.take::<def::Services6, _>()?;
        let backends6 = src.take::<def::Backends6, _>()?;
        let revnat6 = src.take::<def::SockRevNat6, _>()?;
        Ok(Self {
            services,
            slots,
            backends,
            affinity,
            revnat,
            node_addrs,
            node_addrs6,
            config,
            stats,
            ct,
            src_ranges,
            src_ranges6,
            udp_flows,
            services6,
            backends6,
            revnat6,
            capacity: src.capacity,
            socket_destroyer: None,
            last_flush: FlushReport::default(),
        })
    }

    /// Opens the maps pinned under `bpffs_dir` by a running (or stopped) agent, without loading
    /// any program: for tools and tests that inspect or program a live datapath.
    pub fn open_pinned(bpffs_dir: &Path) -> Result<Self, DatapathError> {
        Self::from_maps(|name| super::open_pinned_map(bpffs_dir, name).map(Some))
    }

    /// Enables destroying connected UDP sockets to removed backends.
    #[must_use]
    pub fn with_socket_destroyer(mut self, destroyer: SocketDestroyer) -> Self {
        self.socket_destroyer = Some(destroyer);
        self
    }

    /// How connected UDP sockets to removed backends are destroyed (`None`: they are not).
    pub fn socket_destroy_method(&self) -> Option<DestroyMethod> {
        self.socket_destroyer.as_ref().map(SocketDestroyer::method)
    }

    /// `max_entries` of each map as created in the kernel.
    pub fn capacities(&self) -> &BTreeMap<MapKind, u32> {
        &self.capacity
    }

    /// Verdict counters per reason, summed over CPUs.
    pub fn stats(&self) -> Result<ReasonCounts, MapError> {
        let mut out: ReasonCounts = Reason::ALL.iter().map(|r| (*r, 0)).collect();
        for reason in Reason::ALL {
            let values = self
                .stats
                .get(&u32::from(*reason as u8), 0)
                .map_err(|e| syscall(MapKind::Stats, "lookup", e))?;
            out.insert(*reason, values.iter().sum());
        }
        debug_assert!(Reason::ALL.iter().all(|r| u32::from(*r as u8) < STATS_MAX));
        Ok(out)
    }

    /// Every session-affinity entry (expired ones included; compare `last_used_ns` with
    /// [`super::monotonic_now_ns`]).
    pub fn dump_affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError> {
        collect(&self.affinity, MapKind::Affinity)
    }

    /// Every unconnected UDP flow entry (idle ones included, as for affinity).
    pub fn dump_udp_flows(&self) -> Result<Vec<(UdpFlowKey, AffinityValue)>, MapError> {
        collect(&self.udp_flows, MapKind::UdpFlows)
    }

    /// Every IPv6 socket reverse-NAT entry.
    pub fn dump_revnat6(&self) -> Result<Vec<(SockRevNatKey6, SockRevNatValue6)>, MapError> {
        collect(&self.revnat6, MapKind::SockRevNat6)
    }

    /// Every socket reverse-NAT entry.
    pub fn dump_revnat(&self) -> Result<Vec<(SockRevNatKey, SockRevNatValue)>, MapError> {
        collect(&self.revnat, MapKind::SockRevNat)
    }

    /// Every per-packet connection-tracking entry (both directions of each north-south flow).
    pub fn dump_ct(&self) -> Result<Vec<(CtKey, CtValue)>, MapError> {
        collect(&self.ct, MapKind::Ct)
    }

    /// Removes the state pointing at a removed backend and destroys connected UDP sockets to it;
    /// returns what was removed.
    pub fn flush_backend(
        &mut self,
        backend_id: u32,
        backend: Backend,
    ) -> Result<FlushReport, MapError> {
        self.flush_backends(&[(backend_id, backend)])
    }

    /// [`Self::flush_backend`] for a batch: each LRU table is scanned once for the whole batch
    /// (a Service set of 2,000 backends going away must not mean 2,000 scans of a 64k-entry
    /// table), and the cgroup's network namespaces are listed once.
    pub fn flush_backends(&mut self, backends: &[(u32, Backend)]) -> Result<FlushReport, MapError> {
        let mut report = FlushReport::default();
        if backends.is_empty() {
            return Ok(report);
        }
        let ids: BTreeSet<u32> = backends.iter().map(|(id, _)| *id).collect();
        let addrs: BTreeSet<(u32, u16)> = backends
            .iter()
            .map(|(_, b)| (b.addr_be, b.port_be))
            .collect();
        let flows: BTreeSet<(u8, u32, u16)> = backends
            .iter()
            .map(|(_, b)| (b.proto, b.addr_be, b.port_be))
            .collect();
        self.flush_backend_ids(&ids, &mut report)?;
        let stale_rn: Vec<SockRevNatKey> = collect(&self.revnat, MapKind::SockRevNat)?
            .into_iter()
            .filter(|(k, _)| addrs.contains(&(k.backend_addr_be, k.backend_port_be)))
            .map(|(k, _)| k)
            .collect();
        // Sockets first: the destroyer recognises the sockets this datapath translated by their
        // reverse-NAT entries. Only UDP needs it: a TCP connection to a gone backend fails by
        // itself (RST/timeout), and kube-proxy leaves TCP alone too.
        let targets: BTreeSet<(IpAddr, u16)> = backends
            .iter()
            .filter(|(_, b)| b.proto == PROTO_UDP)
            .map(|(_, b)| (IpAddr::V4(addr4(b.addr_be)), u16::from_be(b.port_be)))
            .collect();
        let revnat = stale_rn.iter().map(|k| {
            let addr = IpAddr::V4(addr4(k.backend_addr_be));
            (k.cookie, addr, u16::from_be(k.backend_port_be))
        });
        self.destroy_udp_sockets(&targets, revnat, &mut report)?;
        for k in &stale_rn {
            remove(&mut self.revnat, k, MapKind::SockRevNat)?;
        }
        report.revnat_entries = stale_rn.len();
        // North-south UDP flows to the backend (the original direction rewrites to it, the reply
        // direction comes from it): dropping both makes the flow's next datagram pick a live
        // backend, as kube-proxy clears UDP conntrack entries of removed endpoints. TCP flows
        // are left to drain, as kube-proxy does: the pod may still be serving them (terminating,
        // or only unselected), and a new backend would reset them. When the pod itself goes,
        // the collector removes them ([`crate::ctgc`]).
        let stale_ct: Vec<CtKey> = collect(&self.ct, MapKind::Ct)?
            .into_iter()
            .filter(|(k, v)| {
                k.proto != PROTO_TCP
                    && k.scope == CT_SCOPE_NAT
                    && (flows.contains(&(k.proto, v.new_daddr_be, v.new_dport_be))
                        || flows.contains(&(k.proto, k.saddr_be, k.sport_be)))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &stale_ct {
            remove(&mut self.ct, k, MapKind::Ct)?;
        }
        report.ct_entries = stale_ct.len();
        self.last_flush = report.clone();
        Ok(report)
    }

    /// The family-free half of a backend flush (both families share one backend id space):
    /// affinity and unconnected-UDP flow entries naming one of `ids`. The kernel already
    /// ignores a flow whose backend left the Service; removing it also keeps a re-added backend
    /// with the same id from being picked up by an old flow.
    fn flush_backend_ids(
        &mut self,
        ids: &BTreeSet<u32>,
        report: &mut FlushReport,
    ) -> Result<(), MapError> {
        let stale_aff: Vec<AffinityKey> = collect(&self.affinity, MapKind::Affinity)?
            .into_iter()
            .filter(|(_, v)| ids.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &stale_aff {
            remove(&mut self.affinity, k, MapKind::Affinity)?;
        }
        report.affinity_entries = stale_aff.len();
        let stale_flows: Vec<UdpFlowKey> = collect(&self.udp_flows, MapKind::UdpFlows)?
            .into_iter()
            .filter(|(_, v)| ids.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &stale_flows {
            remove(&mut self.udp_flows, k, MapKind::UdpFlows)?;
        }
        report.udp_flow_entries = stale_flows.len();
        Ok(())
    }

    /// [`Self::flush_backends`] for IPv6 backends: affinity and UDP flow entries naming their
    /// ids, connected UDP sockets to them, IPv6 socket reverse-NAT entries naming their
    /// addresses.
    pub fn flush_backends6(
        &mut self,
        backends: &[(u32, Backend6)],
    ) -> Result<FlushReport, MapError> {
        let mut report = FlushReport::default();
        if backends.is_empty() {
            return Ok(report);
        }
        let ids: BTreeSet<u32> = backends.iter().map(|(id, _)| *id).collect();
        let addrs: BTreeSet<([u32; 4], u16)> = backends
            .iter()
            .map(|(_, b)| (b.addr_be, b.port_be))
            .collect();
        self.flush_backend_ids(&ids, &mut report)?;
        let stale_rn: Vec<SockRevNatKey6> = collect(&self.revnat6, MapKind::SockRevNat6)?
            .into_iter()
            .filter(|(k, _)| addrs.contains(&(k.backend_addr_be, k.backend_port_be)))
            .map(|(k, _)| k)
            .collect();
        let targets: BTreeSet<(IpAddr, u16)> = backends
            .iter()
            .filter(|(_, b)| b.proto == PROTO_UDP)
            .map(|(_, b)| {
                (
                    IpAddr::V6(addr6_from_be(b.addr_be)),
                    u16::from_be(b.port_be),
                )
            })
            .collect();
        let revnat = stale_rn.iter().map(|k| {
            let addr = IpAddr::V6(addr6_from_be(k.backend_addr_be));
            (k.cookie, addr, u16::from_be(k.backend_port_be))
        });
        self.destroy_udp_sockets(&targets, revnat, &mut report)?;
        for k in &stale_rn {
            remove(&mut self.revnat6, k, MapKind::SockRevNat6)?;
        }
        report.revnat_entries = stale_rn.len();
        self.last_flush = report.clone();
        Ok(report)
    }

    /// Destroys the connected UDP sockets of this datapath to `targets` (UDP backends just
    /// removed, either family); `revnat`: the (cookie, backend address, port) of the socket
    /// reverse-NAT entries naming them, which mark the sockets this datapath translated.
    fn destroy_udp_sockets(
        &mut self,
        targets: &BTreeSet<(IpAddr, u16)>,
        revnat: impl Iterator<Item = (u64, IpAddr, u16)>,
        report: &mut FlushReport,
    ) -> Result<(), MapError> {
        let Some(destroyer) = &mut self.socket_destroyer else {
            return Ok(());
        };
        if targets.is_empty() {
            return Ok(());
        }
        let cookies: BTreeSet<(u64, IpAddr, u16)> = revnat
            .filter(|(_, a, p)| targets.contains(&(*a, *p)))
            .collect();
        let (r, method) =
            destroyer
                .destroy_udp(targets, &cookies)
                .map_err(|source| MapError::Syscall {
                    map: MapKind::SockRevNat,
                    op: "sock_destroy",
                    source,
                })?;
        report.namespaces_searched = r.namespaces;
        report.sockets_destroyed = r.destroyed;
        report.socket_destroy_method = Some(method);
        Ok(())
    }

    /// One collection pass over the connection-tracking table at `now_ns` (`CLOCK_MONOTONIC`):
    /// deletes what [`ctgc::plan`] says and returns the plan and how many entries were scanned.
    pub fn collect_ct(
        &mut self,
        now_ns: u64,
        owners: &impl AddrOwners,
    ) -> Result<(CtGcPlan, usize), MapError> {
        collect_ct(&mut self.ct, now_ns, owners, MapKind::Ct)
    }

    /// The first half of [`Self::collect_ct`]: the dump and the plan, nothing deleted.
    pub fn plan_ct(
        &self,
        now_ns: u64,
        owners: &impl AddrOwners,
    ) -> Result<(CtGcPlan, usize), MapError> {
        let entries = collect(&self.ct, MapKind::Ct)?;
        Ok((ctgc::plan(&entries, now_ns, owners), entries.len()))
    }

    /// The second half of [`Self::collect_ct`]: deletes what `plan` says where a fresh read
    /// confirms it; returns what was deleted.
    pub fn apply_ct(&mut self, plan: CtGcPlan, now_ns: u64) -> Result<CtGcPlan, MapError> {
        apply_ct_plan(&mut self.ct, plan, now_ns, MapKind::Ct)
    }

    fn full_or_syscall(&self, kind: MapKind, op: &'static str, e: aya::maps::MapError) -> MapError {
        map_update_error(&self.capacity, kind, op, e)
    }
}

/// The entries of the IPv4 and the IPv6 connection-tracking tables.
pub type CtDump = (Vec<(CtKey, CtValue)>, Vec<(CtKey6, CtValue6)>);

/// The connection-tracking table on a handle of its own, so the agent collects it on a blocking
/// thread without holding up the run loop (a pass over 100,000 entries costs two syscalls each,
/// about half a second).
pub struct CtTable {
    ct: HashMap<MapData, CtKey, CtValue>,
    /// The IPv6 twin (`TWL_CT6_V1`): the eBPF masquerade's IPv6 flows.
    ct6: HashMap<MapData, CtKey6, CtValue6>,
    capacity: u32,
}

impl CtTable {
    /// Opens the tables pinned under `bpffs_dir` (by this agent's [`super::Datapath::load`]).
    pub fn open_pinned(bpffs_dir: &Path) -> Result<Self, DatapathError> {
        let map = super::open_pinned_map(bpffs_dir, MapKind::Ct.name())?;
        let map6 = super::open_pinned_map(bpffs_dir, MapKind::Ct6.name())?;
        Ok(Self {
            capacity: capacity_of(&map),
            ct: typed::<def::Ct, _>(map)?,
            ct6: typed::<def::Ct6, _>(map6)?,
        })
    }

    /// `max_entries` of the (IPv4) table.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Every entry of both tables (for `debug conntrack`).
    pub fn dump(&self) -> Result<CtDump, MapError> {
        Ok((
            collect(&self.ct, MapKind::Ct)?,
            collect(&self.ct6, MapKind::Ct6)?,
        ))
    }

    /// As [`AyaLbMaps::collect_ct`].
    pub fn collect(
        &mut self,
        now_ns: u64,
        owners: &impl AddrOwners,
    ) -> Result<(CtGcPlan, usize), MapError> {
        collect_ct(&mut self.ct, now_ns, owners, MapKind::Ct)
    }

    /// One collection pass over the IPv6 table, by the same rules.
    pub fn collect6(
        &mut self,
        now_ns: u64,
        owners: &impl AddrOwners<[u32; 4]>,
    ) -> Result<(CtGcPlan<CtKey6>, usize), MapError> {
        collect_ct(&mut self.ct6, now_ns, owners, MapKind::Ct6)
    }
}

fn collect_ct<K: ctgc::CtEntry + aya::Pod>(
    ct: &mut HashMap<MapData, K, K::Value>,
    now_ns: u64,
    owners: &impl AddrOwners<K::Addr>,
    kind: MapKind,
) -> Result<(CtGcPlan<K>, usize), MapError>
where
    K::Value: aya::Pod,
{
    let entries = collect(ct, kind)?;
    let plan = ctgc::plan(&entries, now_ns, owners);
    Ok((apply_ct_plan(ct, plan, now_ns, kind)?, entries.len()))
}

/// Deletes what `plan` (made at `now_ns` from a dump) says, each expired entry only if a fresh
/// read confirms it ([`ctgc::still_expired`]: its tuple may serve a new flow since the dump).
/// Returns what was deleted.
fn apply_ct_plan<K: ctgc::CtEntry + aya::Pod>(
    ct: &mut HashMap<MapData, K, K::Value>,
    mut plan: CtGcPlan<K>,
    now_ns: u64,
    kind: MapKind,
) -> Result<CtGcPlan<K>, MapError>
where
    K::Value: aya::Pod,
{
    let read = |ct: &HashMap<MapData, K, K::Value>, k: &K| match ct.get(k, 0) {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(syscall(kind, "lookup", e)),
    };
    let mut due = Vec::with_capacity(plan.expired.len());
    for k in plan.expired {
        let fresh = read(ct, &k)?;
        let mut other_err = None;
        let expired = ctgc::still_expired(
            &k,
            fresh.as_ref(),
            |other| {
                read(ct, other).unwrap_or_else(|e| {
                    other_err = Some(e);
                    None
                })
            },
            now_ns,
        );
        if let Some(e) = other_err {
            return Err(e);
        }
        if expired {
            remove(ct, &k, kind)?;
            due.push(k);
        }
    }
    plan.expired = due;
    for k in &plan.orphaned {
        remove(ct, k, kind)?;
    }
    Ok(plan)
}

/// A full hash map answers E2BIG (ENOSPC from some map types): that is `MapError::Full`, a named
/// error with the capacity, never a generic failure.
pub(super) fn map_update_error(
    capacity: &BTreeMap<MapKind, u32>,
    kind: MapKind,
    op: &'static str,
    e: aya::maps::MapError,
) -> MapError {
    let errno = match &e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    };
    if matches!(errno, Some(libc::E2BIG | libc::ENOSPC)) {
        return MapError::Full {
            map: kind,
            capacity: capacity.get(&kind).copied().unwrap_or(0),
        };
    }
    syscall(kind, op, e)
}

/// The trie key of a range: the whole svc_id (32 bits) then the range's prefix; host bits are
/// cleared so one range has one key.
fn src_range_key(svc_id: u32, range: Ipv4Network) -> Key<SrcRangeKey> {
    Key::new(
        32 + u32::from(range.prefix()),
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            addr_be: u32::from(range.network()).to_be(),
        },
    )
}

/// [`src_range_key`] of an IPv6 range (the 160-bit key of `TWL_LBSRC6_V1`).
fn src_range_key6(svc_id: u32, range: Ipv6Network) -> Key<SrcRangeKey6> {
    Key::new(
        32 + u32::from(range.prefix()),
        SrcRangeKey6 {
            svc_id_be: svc_id.to_be(),
            addr_be: twill_core::family::addr6_be(range.network()),
        },
    )
}

/// Every IPv6 source range as (`svc_id`, range), added to `out`.
fn collect_source_ranges6(
    trie: &LpmTrie<MapData, SrcRangeKey6, u8>,
    out: &mut BTreeSet<(u32, IpNetwork)>,
) -> Result<(), MapError> {
    for item in trie {
        let k = match item {
            Ok((k, _)) => k,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(syscall(MapKind::SourceRanges6, "iterate", e)),
        };
        let data = k.data();
        let prefix = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(128);
        let addr = twill_core::family::addr6_from_be(data.addr_be);
        if let Ok(net) = Ipv6Network::new(addr, prefix) {
            out.insert((u32::from_be(data.svc_id_be), net.into()));
        }
    }
    Ok(())
}

/// Every source range of both tries as (`svc_id`, range).
fn collect_source_ranges(
    trie: &LpmTrie<MapData, SrcRangeKey, u8>,
    trie6: &LpmTrie<MapData, SrcRangeKey6, u8>,
) -> Result<BTreeSet<(u32, IpNetwork)>, MapError> {
    let mut out = BTreeSet::new();
    collect_source_ranges6(trie6, &mut out)?;
    for item in trie {
        let k = match item {
            Ok((k, _)) => k,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(syscall(MapKind::SourceRanges, "iterate", e)),
        };
        let data = k.data();
        let prefix = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(32);
        let addr = Ipv4Addr::from(u32::from_be(data.addr_be));
        if let Ok(net) = Ipv4Network::new(addr, prefix) {
            out.insert((u32::from_be(data.svc_id_be), net.into()));
        }
    }
    Ok(out)
}

pub(super) fn syscall(map: MapKind, op: &'static str, e: aya::maps::MapError) -> MapError {
    let source = match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other),
    };
    MapError::Syscall { map, op, source }
}

pub(super) fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    kind: MapKind,
) -> Result<Vec<(K, V)>, MapError> {
    let mut out = Vec::new();
    for item in map {
        match item {
            Ok(kv) => out.push(kv),
            // Deleted between the key walk and the lookup (the kernel or another writer).
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(syscall(kind, "iterate", e)),
        }
    }
    Ok(out)
}

/// Deletes `key`; a missing key is success (deletes are idempotent for the reconciler).
pub(super) fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    kind: MapKind,
) -> Result<(), MapError> {
    match map.remove(key) {
        Err(e) if !is_not_found(&e) => Err(syscall(kind, "delete", e)),
        _ => Ok(()),
    }
}

pub(super) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound => true,
        _ => false,
    }
}

impl LbMaps for AyaLbMaps {
    fn upsert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| self.full_or_syscall(MapKind::Services, "update", e))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        remove(&mut self.services, key, MapKind::Services)
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(|e| self.full_or_syscall(MapKind::BackendSlots, "update", e))
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        remove(&mut self.slots, key, MapKind::BackendSlots)
    }
    fn upsert_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| self.full_or_syscall(MapKind::Backends, "update", e))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        remove(&mut self.backends, &id, MapKind::Backends)
    }
    fn upsert_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<(), MapError> {
        self.services6
            .insert(key, value, 0)
            .map_err(|e| self.full_or_syscall(MapKind::Services6, "update", e))
    }
    fn delete_service6(&mut self, key: &ServiceKey6) -> Result<(), MapError> {
        remove(&mut self.services6, key, MapKind::Services6)
    }
    fn upsert_backend6(&mut self, id: u32, backend: Backend6) -> Result<(), MapError> {
        self.backends6
            .insert(id, backend, 0)
            .map_err(|e| self.full_or_syscall(MapKind::Backends6, "update", e))
    }
    fn delete_backend6(&mut self, id: u32) -> Result<(), MapError> {
        remove(&mut self.backends6, &id, MapKind::Backends6)
    }
    fn upsert_node_addr(&mut self, addr_be: u32, flags: u32) -> Result<(), MapError> {
        self.node_addrs
            .insert(addr_be, NodeAddrValue { flags }, 0)
            .map_err(|e| self.full_or_syscall(MapKind::NodeAddrs, "update", e))
    }
    fn delete_node_addr(&mut self, addr_be: u32) -> Result<(), MapError> {
        remove(&mut self.node_addrs, &addr_be, MapKind::NodeAddrs)
    }
    fn upsert_node_addr6(&mut self, addr_be: [u32; 4], flags: u32) -> Result<(), MapError> {
        self.node_addrs6
            .insert(addr_be, NodeAddrValue { flags }, 0)
            .map_err(|e| self.full_or_syscall(MapKind::NodeAddrs6, "update", e))
    }
    fn delete_node_addr6(&mut self, addr_be: [u32; 4]) -> Result<(), MapError> {
        remove(&mut self.node_addrs6, &addr_be, MapKind::NodeAddrs6)
    }
    fn upsert_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        let kind = crate::lbmap::source_ranges_map(&range);
        let done = match range {
            IpNetwork::V4(r) => self.src_ranges.insert(&src_range_key(svc_id, r), 1, 0),
            IpNetwork::V6(r) => self.src_ranges6.insert(&src_range_key6(svc_id, r), 1, 0),
        };
        done.map_err(|e| self.full_or_syscall(kind, "update", e))
    }
    fn delete_source_range(&mut self, svc_id: u32, range: IpNetwork) -> Result<(), MapError> {
        let kind = crate::lbmap::source_ranges_map(&range);
        let done = match range {
            IpNetwork::V4(r) => self.src_ranges.remove(&src_range_key(svc_id, r)),
            IpNetwork::V6(r) => self.src_ranges6.remove(&src_range_key6(svc_id, r)),
        };
        match done {
            Err(e) if !is_not_found(&e) => Err(syscall(kind, "delete", e)),
            _ => Ok(()),
        }
    }
    fn set_config(&mut self, config: DatapathConfig) -> Result<(), MapError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| syscall(MapKind::Config, "update", e))
    }
    fn dump(&self) -> Result<LbState, MapError> {
        Ok(LbState {
            services: collect(&self.services, MapKind::Services)?
                .into_iter()
                .collect(),
            slots: collect(&self.slots, MapKind::BackendSlots)?
                .into_iter()
                .collect(),
            backends: collect(&self.backends, MapKind::Backends)?
                .into_iter()
                .collect(),
            services6: collect(&self.services6, MapKind::Services6)?
                .into_iter()
                .collect(),
            backends6: collect(&self.backends6, MapKind::Backends6)?
                .into_iter()
                .collect(),
            node_addrs: collect(&self.node_addrs, MapKind::NodeAddrs)?
                .into_iter()
                .map(|(k, v)| (k, v.flags))
                .collect(),
            node_addrs6: collect(&self.node_addrs6, MapKind::NodeAddrs6)?
                .into_iter()
                .map(|(k, v)| (k, v.flags))
                .collect(),
            source_ranges: collect_source_ranges(&self.src_ranges, &self.src_ranges6)?,
            config: self
                .config
                .get(&0, 0)
                .map_err(|e| syscall(MapKind::Config, "lookup", e))?,
        })
    }
    fn flush_backend_state(&mut self, backend_id: u32, backend: Backend) -> Result<(), MapError> {
        self.flush_backends_state(&[(backend_id, backend)])
    }

    fn flush_backends_state(&mut self, backends: &[(u32, Backend)]) -> Result<(), MapError> {
        let report = self.flush_backends(backends)?;
        log::info!(
            "flushed {} removed backends: {} affinity, {} UDP flow, {} reverse-NAT, {} conntrack entries, {} UDP sockets destroyed in {} namespaces",
            backends.len(),
            report.affinity_entries,
            report.udp_flow_entries,
            report.revnat_entries,
            report.ct_entries,
            report.sockets_destroyed,
            report.namespaces_searched
        );
        Ok(())
    }

    fn flush_backends6_state(&mut self, backends: &[(u32, Backend6)]) -> Result<(), MapError> {
        let report = self.flush_backends6(backends)?;
        log::info!(
            "flushed {} removed IPv6 backends: {} affinity, {} UDP flow, {} reverse-NAT entries",
            backends.len(),
            report.affinity_entries,
            report.udp_flow_entries,
            report.revnat_entries,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2big_is_full_with_the_capacity() {
        let err = aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
        });
        // Only the error mapping is exercised; it needs no maps.
        let capacity = BTreeMap::from([(MapKind::Services, 7)]);
        let mapped = map_update_error(&capacity, MapKind::Services, "update", err);
        assert!(
            matches!(
                mapped,
                MapError::Full {
                    map: MapKind::Services,
                    capacity: 7
                }
            ),
            "{mapped:?}"
        );
    }
}
