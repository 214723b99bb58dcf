//! The incremental form of the compiler: the run loop feeds it the Services whose inputs changed
//! (a Service with the `EndpointSlices` labelled with its name: a [`ServiceGroup`]) and it
//! recompiles only those, patching a desired [`LbState`] it keeps, so one change costs work in
//! proportion to that Service, not to the cluster.
//!
//! The result is by construction the from-scratch [`compile`](super::compile) of the same inputs
//! (which is this compiler fed everything once); `proxy-agent/tests/incremental.rs` checks it
//! over random sequences of changes. What couples Services is handled explicitly:
//! - frontend conflicts: a Service asking for an address/port/protocol as its ClusterIP owns
//!   it, else the first Service in (namespace, name) order asking for it, so a change of owner
//!   replans every Service asking for it; a change of the nodes' addresses (never an external
//!   frontend) replans the Services asking for an address that came or went;
//! - ids: freed before new ones are handed out, new ones in sorted key order over every
//!   recompiled Service, exactly as [`IdAllocation`] does for a whole compile; a Service that
//!   found the id space full is recompiled on every update until it gets its ids;
//! - backends shared by Services: their flags are the union of every Service's use, counted.
//!
//! Every update also records which keys of the desired state it touched ([`StateChanges`]), so
//! the reconciler diffs only those.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use twill_common::{BE_F_LOCAL, BE_F_TERMINATING, DatapathConfig, MAGLEV_SLOT_BASE, SlotKey};

use super::parse::{ParsedSlice, ServiceInput, SliceInput};
use super::{
    BackendKey, Claim, ClaimRank, CompileConfig, Compiled, DumpModel, HealthCheck, IdAllocation,
    ObjectKind, RankedClaim, Rejection, ServiceCounts, ServicePortModel, SetKey, addr_be,
    build_entries, endpoint_flags, parse, plan_service, service_claims, wanted_ids,
};
use crate::family::{AnyBackend, FrontendKey};
use crate::lbmap::{LbState, StateChanges, StateVersion};

/// `(namespace, name)` of a Service. Slices without the `kubernetes.io/service-name` label
/// form the group with the empty name (no Service can have it): they are only rejected.
pub type GroupKey = (Arc<str>, Arc<str>);

/// The current inputs of one Service: the Service itself (absent when deleted or not yet seen)
/// and every `EndpointSlice` labelled with its name, sorted by slice name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceGroup {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub service: Option<Arc<ServiceInput>>,
    pub slices: Vec<Arc<SliceInput>>,
}

/// Sort key of a rejection in the dump: kind, namespace, name, reason text.
type RejKey = (ObjectKind, Arc<str>, Arc<str>, String);

fn rej_key(r: &Rejection) -> RejKey {
    (
        r.kind,
        r.namespace.clone(),
        r.name.clone(),
        r.reason.to_string(),
    )
}

/// What one Service group was compiled from and what it contributed. Kept small (there is one
/// per Service): the entries it wrote are found again from its port models and its sets' ids.
#[derive(Debug, Default)]
struct Memo {
    service: Option<Arc<ServiceInput>>,
    slices: Vec<Arc<SliceInput>>,
    /// Sorted by port name and protocol; their frontends are the frontend keys written.
    ports: Vec<Arc<ServicePortModel>>,
    /// Per port: the backend sets its planned frontends use (bit 0: cluster-wide, bit 1:
    /// node-local), which are the set ids it wants; slots and source ranges are written
    /// under those ids, the backends of their members are the backend ids it wants.
    sets_used: Vec<u8>,
    rejected: Vec<RejKey>,
    programmed_ports: u32,
}

impl Memo {
    /// The set keys this group wants, with the index of their port.
    fn sets(&self) -> impl Iterator<Item = (usize, SetKey)> + '_ {
        self.ports
            .iter()
            .zip(&self.sets_used)
            .enumerate()
            .flat_map(|(i, (p, used))| {
                [false, true]
                    .into_iter()
                    .filter(move |local| used & (1 << u8::from(*local)) != 0)
                    .map(move |local| (i, set_key(p, local)))
            })
    }

    /// The backends this group wants ids for: the members of the sets it uses, sorted, each
    /// once (as [`wanted_ids`] lists them).
    fn backends(&self) -> Vec<BackendKey> {
        let mut out: Vec<BackendKey> = self
            .ports
            .iter()
            .zip(&self.sets_used)
            .flat_map(|(p, used)| {
                let cluster = used & 1 != 0;
                p.endpoints
                    .iter()
                    .filter(move |e| (cluster && e.in_cluster_set) || e.in_local_set)
                    .map(move |e| BackendKey {
                        addr: e.addr,
                        port: e.port,
                        proto: p.proto,
                    })
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn set_key(p: &ServicePortModel, local: bool) -> SetKey {
    SetKey {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        port_name: p.port_name.clone(),
        proto: p.proto,
        local,
        family: p.family,
    }
}

/// One backend: how many Services want an id for it, how many written slots use it and with
/// which flags (its map value carries the union).
#[derive(Debug, Default)]
struct BackendRefs {
    wants: u32,
    uses: u32,
    local: u32,
    terminating: u32,
}

impl BackendRefs {
    fn value(&self, key: BackendKey) -> AnyBackend {
        let mut flags = 0;
        if self.local > 0 {
            flags |= BE_F_LOCAL;
        }
        if self.terminating > 0 {
            flags |= BE_F_TERMINATING;
        }
        AnyBackend::new(key.addr, key.port, key.proto, flags)
    }
}

fn backend_key(be: AnyBackend) -> BackendKey {
    BackendKey {
        addr: be.addr(),
        port: be.port(),
        proto: be.proto(),
    }
}

/// What an update changed besides the map entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    /// Service groups recompiled.
    pub recompiled: usize,
    pub rejections_changed: bool,
    pub health_changed: bool,
}

/// One planned group of an update, between planning and writing.
struct Planned {
    key: GroupKey,
    ports: Vec<super::PlannedPort>,
    health: Option<HealthCheck>,
    rejected: Vec<Rejection>,
    sets: Vec<(SetKey, Vec<FrontendKey>)>,
    backends: Vec<BackendKey>,
    /// The ids the group's previous sets had: (port index in the old memo, id).
    old_set_ids: Vec<(usize, u32)>,
}

/// The keys an update touches, once a version of the state was handed out (before that,
/// everything is new to the reconciler and nothing needs recording).
#[derive(Debug, Default)]
struct Recorder {
    on: bool,
    keys: StateChanges,
}

impl Recorder {
    fn service(&mut self, k: FrontendKey) {
        if self.on {
            match k {
                FrontendKey::V4(k) => self.keys.services.insert(k),
                FrontendKey::V6(k) => self.keys.services6.insert(k),
            };
        }
    }

    fn slot(&mut self, k: SlotKey) {
        if self.on {
            self.keys.slots.insert(k);
        }
    }

    fn backend(&mut self, id: u32) {
        if self.on {
            self.keys.backends.insert(id);
        }
    }

    fn source_range(&mut self, r: (u32, IpNetwork)) {
        if self.on {
            self.keys.source_ranges.insert(r);
        }
    }
}

/// The claims a group's Service makes under `config` (none without either).
fn claims_of(svc: Option<&ServiceInput>, config: Option<&CompileConfig>) -> Vec<RankedClaim> {
    let mut scratch = Vec::new();
    svc.zip(config)
        .and_then(|(s, c)| Some(service_claims(s.admit(c, &mut scratch)?, c)))
        .unwrap_or_default()
}

/// Distinguishes the versions of different compilers (a reconciler must not take one
/// compiler's changes as relative to another's state).
static ORIGINS: AtomicU64 = AtomicU64::new(1);

/// The incremental compiler; see the module documentation.
#[derive(Debug)]
pub struct Compiler {
    /// The config the memo was compiled under; `None` before the first update.
    config: Option<CompileConfig>,
    ids: IdAllocation,
    groups: BTreeMap<GroupKey, Box<Memo>>,
    /// Address/port/protocol → the Services asking for it with their rank, sorted: the first
    /// one owns it.
    claimants: HashMap<Claim, Vec<(ClaimRank, GroupKey)>>,
    backends: HashMap<BackendKey, BackendRefs>,
    /// Every rejection with the number of places it comes from (the dump lists it once).
    rejections: BTreeMap<RejKey, (Rejection, u32)>,
    node_rejections: Vec<RejKey>,
    health: BTreeMap<GroupKey, HealthCheck>,
    programmed: usize,
    service_ports: usize,
    /// Groups with a key the id space had no room for.
    starved: BTreeSet<GroupKey>,
    /// Set until the first update: the ids passed in are held by no group yet.
    ids_unclaimed: bool,
    state: LbState,
    origin: u64,
    seq: u64,
    /// The version of the state last handed out with [`Compiler::take_changes`].
    handed_out: Option<StateVersion>,
    /// Keys touched since then (not recorded before the first hand-out: everything is new).
    changes: Recorder,
}

impl Compiler {
    /// A compiler with nothing compiled yet; `ids` as for [`compile`](super::compile).
    pub fn new(ids: IdAllocation) -> Self {
        Self {
            config: None,
            ids,
            groups: BTreeMap::new(),
            claimants: HashMap::new(),
            backends: HashMap::new(),
            rejections: BTreeMap::new(),
            node_rejections: Vec::new(),
            health: BTreeMap::new(),
            programmed: 0,
            service_ports: 0,
            starved: BTreeSet::new(),
            ids_unclaimed: true,
            state: LbState::default(),
            origin: ORIGINS.fetch_add(1, Ordering::Relaxed),
            seq: 0,
            handed_out: None,
            changes: Recorder::default(),
        }
    }

    /// Recompiles the groups in `changed` (their complete current inputs; a group with neither
    /// Service nor slices is removed) and whatever they affect. `node` is this node's Node.
    ///
    /// The phases, in the order the rules need: what the config change makes dirty → this
    /// node's entries → take in the changed groups → settle the claims (owners of addresses)
    /// → plan every dirty group → allocate ids → take the old entries out → write the new ones.
    pub fn update(
        &mut self,
        config: &CompileConfig,
        node: Option<&Node>,
        changed: impl IntoIterator<Item = ServiceGroup>,
    ) -> UpdateSummary {
        let mut summary = UpdateSummary::default();
        let old_config = self.config.replace(config.clone());
        let mut dirty = self.dirty_after_config(old_config.as_ref(), config);
        summary.rejections_changed |= self.update_node(config, node);
        let old_claims = self.take_in(changed, old_config.as_ref(), &mut dirty);
        dirty.extend(std::mem::take(&mut self.starved));
        let reclaimed = self.settle_claims(&dirty, old_claims, old_config.as_ref(), config);
        dirty.extend(reclaimed);
        let planned = self.plan(dirty, config);
        summary.recompiled = planned.len();
        self.allocate_ids(&planned);
        let memos = self.take_out(&planned, &mut summary);
        self.write(planned, memos, &mut summary);
        summary
    }

    /// The groups a config change makes dirty: all of them when the plan of every Service
    /// depends on what changed, else only the Services naming an address that became or
    /// stopped being a node's own.
    fn dirty_after_config(
        &self,
        old: Option<&CompileConfig>,
        config: &CompileConfig,
    ) -> BTreeSet<GroupKey> {
        let mut dirty = BTreeSet::new();
        let replan_all = old.is_none_or(|c| {
            c.node_name != config.node_name
                || c.nodeport_range != config.nodeport_range
                || c.pod_cidrs != config.pod_cidrs
                || c.pod_cidrs6 != config.pod_cidrs6
                || c.max_frontends_per_service != config.max_frontends_per_service
        });
        if replan_all {
            dirty.extend(self.groups.keys().cloned());
        } else if let Some(old) = old
            && (old.node_ips != config.node_ips
                || old.nodeport_addresses != config.nodeport_addresses
                || old.node_ips6 != config.node_ips6
                || old.nodeport_addresses6 != config.nodeport_addresses6)
        {
            let flipped = |ip: &std::net::Ipv4Addr| old.is_node_ip(*ip) != config.is_node_ip(*ip);
            let flipped6 =
                |ip: &std::net::Ipv6Addr| old.is_node_ip6(*ip) != config.is_node_ip6(*ip);
            for (key, memo) in &self.groups {
                let asks = memo
                    .service
                    .as_deref()
                    .and_then(ServiceInput::parsed)
                    .is_some_and(|s| {
                        s.external_ips.iter().chain(&s.lb_ips).any(flipped)
                            || s.external_ips6.iter().chain(&s.lb_ips6).any(flipped6)
                    });
                if asks {
                    dirty.insert(key.clone());
                }
            }
        }
        dirty
    }

    /// This node's part: a handful of entries, rebuilt every time. Returns whether the
    /// rejections changed.
    fn update_node(&mut self, config: &CompileConfig, node: Option<&Node>) -> bool {
        let mut changed = false;
        let mut node_rejected = Vec::new();
        let addrs = parse::node_addrs(node, config, &mut node_rejected);
        self.state.node_addrs = addrs.iter().map(|a| (addr_be(*a), 0)).collect();
        self.state.node_addrs6 = parse::node_addrs6(node, config)
            .iter()
            .map(|a| (twill_common::addr6_from_octets(a.octets()), 0))
            .collect();
        self.state.config = DatapathConfig {
            nodeport_min: *config.nodeport_range.start(),
            nodeport_max: *config.nodeport_range.end(),
            _pad: 0,
            host_netns_cookie: config.host_netns_cookie,
        };
        let old = std::mem::take(&mut self.node_rejections);
        for key in &old {
            changed |= self.unref_rejection(key);
        }
        for r in node_rejected {
            let key = rej_key(&r);
            changed |= self.ref_rejection(key.clone(), r);
            self.node_rejections.push(key);
        }
        changed
    }

    /// Stores the changed groups' inputs and marks them dirty; returns the claims each had
    /// (from its previous Service under the previous config).
    fn take_in(
        &mut self,
        changed: impl IntoIterator<Item = ServiceGroup>,
        old_config: Option<&CompileConfig>,
        dirty: &mut BTreeSet<GroupKey>,
    ) -> HashMap<GroupKey, Vec<RankedClaim>> {
        let mut old_claims: HashMap<GroupKey, Vec<RankedClaim>> = HashMap::new();
        for g in changed {
            let key = (g.namespace, g.name);
            let memo = self.groups.entry(key.clone()).or_default();
            if !old_claims.contains_key(&key) {
                old_claims.insert(key.clone(), claims_of(memo.service.as_deref(), old_config));
            }
            memo.service = g.service;
            memo.slices = g.slices;
            dirty.insert(key);
        }
        old_claims
    }

    /// Claims first: when the owner of an address/port/protocol changes, every Service asking
    /// for it is replanned (one gains or loses the frontend, the others' rejections name the
    /// new owner). Returns those Services.
    fn settle_claims(
        &mut self,
        dirty: &BTreeSet<GroupKey>,
        mut old_claims: HashMap<GroupKey, Vec<RankedClaim>>,
        old_config: Option<&CompileConfig>,
        config: &CompileConfig,
    ) -> BTreeSet<GroupKey> {
        let mut reclaimed = BTreeSet::new();
        for key in dirty {
            let Some(memo) = self.groups.get(key) else {
                continue;
            };
            let new = claims_of(memo.service.as_deref(), Some(config));
            let old = old_claims
                .remove(key)
                .unwrap_or_else(|| claims_of(memo.service.as_deref(), old_config));
            if new == old {
                continue;
            }
            // A claim whose rank changed is taken out and put back in its new place.
            for (c, _) in old.iter().filter(|c| new.binary_search(c).is_err()) {
                if let Some(list) = self.claimants.get_mut(c) {
                    let was_owner = list.first().is_some_and(|(_, k)| k == key);
                    list.retain(|(_, k)| k != key);
                    if was_owner {
                        reclaimed.extend(list.iter().map(|(_, k)| k.clone()));
                    }
                    if list.is_empty() {
                        self.claimants.remove(c);
                    }
                }
            }
            for &(c, rank) in new.iter().filter(|c| old.binary_search(c).is_err()) {
                let list = self.claimants.entry(c).or_default();
                let at = list.partition_point(|(r, k)| (*r, k) < (rank, key));
                list.insert(at, (rank, key.clone()));
                if at == 0 && list.len() > 1 {
                    reclaimed.extend(list[1..].iter().map(|(_, k)| k.clone()));
                }
            }
        }
        reclaimed
    }

    /// Plans every dirty group against the settled claims.
    fn plan(&self, dirty: BTreeSet<GroupKey>, config: &CompileConfig) -> Vec<Planned> {
        let mut planned: Vec<Planned> = Vec::with_capacity(dirty.len());
        for key in dirty {
            let Some(memo) = self.groups.get(&key) else {
                continue;
            };
            let mut rejected = Vec::new();
            let svc = memo
                .service
                .as_deref()
                .and_then(|s| s.admit(config, &mut rejected));
            let slices: Vec<&ParsedSlice> = memo
                .slices
                .iter()
                .filter_map(|s| s.parsed(&mut rejected))
                .collect();
            let (ports, health) = match svc {
                Some(svc) => plan_service(
                    &key.0,
                    &key.1,
                    svc,
                    &slices,
                    config,
                    |c| self.claimants.get(&c).and_then(|l| l.first()),
                    &mut rejected,
                ),
                None => (Vec::new(), None),
            };
            let (sets, backends) = wanted_ids(&ports);
            let old_set_ids = memo
                .sets()
                .filter_map(|(i, k)| Some((i, self.ids.set_id(&k)?)))
                .collect();
            planned.push(Planned {
                key,
                ports,
                health,
                rejected,
                sets,
                backends,
                old_set_ids,
            });
        }
        planned
    }

    /// Ids: new wants are counted before old ones are dropped, so a backend moving between
    /// two recompiled Services keeps its id; every id freed is free before any is handed out;
    /// fresh keys get theirs in sorted order over all recompiled Services.
    fn allocate_ids(&mut self, planned: &[Planned]) {
        for p in planned {
            for b in &p.backends {
                self.backends.entry(*b).or_default().wants += 1;
            }
        }
        for p in planned {
            let memo = &self.groups[&p.key];
            for b in memo.backends() {
                if let Some(refs) = self.backends.get_mut(&b) {
                    refs.wants -= 1;
                    if refs.wants == 0 {
                        self.ids.release_backend(b);
                        if refs.uses == 0 {
                            self.backends.remove(&b);
                        }
                    }
                }
            }
            for (_, s) in memo.sets() {
                if !p.sets.iter().any(|(k, _)| *k == s) {
                    self.ids.release_set(&s);
                }
            }
        }
        if self.ids_unclaimed {
            // The ids came from outside (a previous compile, adopted maps): whatever no
            // Service of this first update wants is free, as in a whole compile.
            self.ids_unclaimed = false;
            let sets: std::collections::HashSet<&SetKey> = planned
                .iter()
                .flat_map(|p| p.sets.iter().map(|(k, _)| k))
                .collect();
            self.ids.retain(
                |k| sets.contains(k),
                |k| self.backends.get(k).is_some_and(|r| r.wants > 0),
            );
        }
        let mut fresh_sets: BTreeMap<SetKey, Vec<FrontendKey>> = BTreeMap::new();
        let mut fresh_backends: Vec<BackendKey> = Vec::new();
        for p in planned {
            for (s, frontends) in &p.sets {
                if self.ids.set_id(s).is_none() {
                    fresh_sets.insert(s.clone(), frontends.clone());
                }
            }
            fresh_backends.extend(
                p.backends
                    .iter()
                    .filter(|b| self.ids.backend_id(b).is_none())
                    .copied(),
            );
        }
        fresh_backends.sort_unstable();
        fresh_backends.dedup();
        // Also when there is nothing to assign: adopted hints are for the first compile only.
        self.ids.assign(&fresh_sets, &fresh_backends);
    }

    /// Takes every recompiled group's old entries out before any new ones are written: a
    /// frontend, or a freed id handed out again, may move from one group to another. Returns
    /// the groups' memos, emptied of their entries.
    #[expect(
        clippy::vec_box,
        reason = "the memos go back into `groups`, boxed; unboxing would move each twice"
    )]
    fn take_out(&mut self, planned: &[Planned], summary: &mut UpdateSummary) -> Vec<Box<Memo>> {
        let mut memos = Vec::with_capacity(planned.len());
        for p in planned {
            let mut memo = self.groups.remove(&p.key).unwrap_or_default();
            for port in &memo.ports {
                for fe in &port.frontends {
                    self.state.remove_frontend(&fe.key);
                    self.changes.service(fe.key);
                }
            }
            for &(i, svc_id) in &p.old_set_ids {
                self.take_out_set(svc_id, &memo.ports[i]);
            }
            for k in std::mem::take(&mut memo.rejected) {
                summary.rejections_changed |= self.unref_rejection(&k);
            }
            self.service_ports -= memo.programmed_ports as usize;
            if memo.programmed_ports > 0 {
                self.programmed -= 1;
            }
            memos.push(memo);
        }
        memos
    }

    /// Writes each planned group's entries, rejections, health check and memo.
    #[expect(
        clippy::vec_box,
        reason = "the memos go back into `groups`, boxed; unboxing would move each twice"
    )]
    fn write(&mut self, planned: Vec<Planned>, memos: Vec<Box<Memo>>, summary: &mut UpdateSummary) {
        for (p, mut memo) in planned.into_iter().zip(memos) {
            let mut rejected = p.rejected;
            let mut entries = build_entries(p.ports, &self.ids, &mut rejected);
            for (k, v) in entries.services {
                self.state.insert_frontend(k, v);
                self.changes.service(k);
            }
            for (k, id) in entries.slots {
                self.state.slots.insert(k, id);
                self.changes.slot(k);
            }
            for (id, be) in entries.backends {
                self.use_backend(id, be);
                self.changes.backend(id);
            }
            for r in entries.source_ranges {
                self.state.source_ranges.insert(r);
                self.changes.source_range(r);
            }
            for r in rejected {
                let key = rej_key(&r);
                summary.rejections_changed |= self.ref_rejection(key.clone(), r);
                memo.rejected.push(key);
            }
            // Ports in the dump's order; the sets each uses, in the same order.
            let mut order: Vec<usize> = (0..entries.ports.len()).collect();
            order.sort_by(|&a, &b| {
                let (a, b) = (&entries.ports[a], &entries.ports[b]);
                (&a.port_name, a.proto).cmp(&(&b.port_name, b.proto))
            });
            memo.sets_used = order.iter().map(|&i| entries.sets_used[i]).collect();
            let mut ports: Vec<Option<ServicePortModel>> =
                entries.ports.drain(..).map(Some).collect();
            memo.ports = order
                .iter()
                .filter_map(|&i| ports[i].take().map(Arc::new))
                .collect();
            memo.programmed_ports = u32::try_from(entries.programmed_ports).unwrap_or(u32::MAX);
            self.service_ports += entries.programmed_ports;
            if memo.programmed_ports > 0 {
                self.programmed += 1;
            }
            let old_health = match &p.health {
                Some(h) => self.health.insert(p.key.clone(), h.clone()),
                None => self.health.remove(&p.key),
            };
            summary.health_changed |= old_health != p.health;
            if entries.starved {
                self.starved.insert(p.key.clone());
            }
            if memo.service.is_some() || !memo.slices.is_empty() {
                self.groups.insert(p.key, memo);
            }
        }
    }

    /// Removes the slots and source ranges written under `svc_id`, the set of `port`, and
    /// that set's share of its backends' flags.
    fn take_out_set(&mut self, svc_id: u32, port: &ServicePortModel) {
        let slots: Vec<(SlotKey, u32)> = self
            .state
            .slots
            .range(
                SlotKey { svc_id, slot: 0 }..=SlotKey {
                    svc_id,
                    slot: u32::MAX,
                },
            )
            .map(|(k, v)| (*k, *v))
            .collect();
        for (k, id) in slots {
            self.state.slots.remove(&k);
            self.changes.slot(k);
            // A backend is used once per set it is a member of: by its slot in the list (the
            // Maglev table's slots repeat members of that list).
            if k.slot >= MAGLEV_SLOT_BASE {
                continue;
            }
            if let Some(be) = self.state.backend(id) {
                let flags = endpoint_flags(port, be.addr(), be.port());
                self.unuse_backend(id, be, flags);
                self.changes.backend(id);
            }
        }
        let ranges: Vec<(u32, IpNetwork)> = self
            .state
            .source_ranges_of(svc_id)
            .map(|r| (svc_id, r))
            .collect();
        for r in ranges {
            self.state.source_ranges.remove(&r);
            self.changes.source_range(r);
        }
    }

    /// Records one more use of a rejection; whether the dump's list changed.
    fn ref_rejection(&mut self, key: RejKey, r: Rejection) -> bool {
        let entry = self.rejections.entry(key).or_insert((r, 0));
        entry.1 += 1;
        entry.1 == 1
    }

    /// Drops one use of a rejection; whether the dump's list changed.
    fn unref_rejection(&mut self, key: &RejKey) -> bool {
        let Some(entry) = self.rejections.get_mut(key) else {
            return false;
        };
        entry.1 -= 1;
        if entry.1 == 0 {
            self.rejections.remove(key);
            return true;
        }
        false
    }

    fn use_backend(&mut self, id: u32, be: AnyBackend) {
        let key = backend_key(be);
        let refs = self.backends.entry(key).or_default();
        refs.uses += 1;
        refs.local += u32::from(be.flags() & BE_F_LOCAL != 0);
        refs.terminating += u32::from(be.flags() & BE_F_TERMINATING != 0);
        self.state.insert_backend(id, refs.value(key));
    }

    fn unuse_backend(&mut self, id: u32, be: AnyBackend, flags: u8) {
        let key = backend_key(be);
        let Some(refs) = self.backends.get_mut(&key) else {
            return;
        };
        refs.uses -= 1;
        refs.local -= u32::from(flags & BE_F_LOCAL != 0);
        refs.terminating -= u32::from(flags & BE_F_TERMINATING != 0);
        if refs.uses == 0 {
            self.state.remove_backend(id);
            if refs.wants == 0 {
                self.backends.remove(&key);
            }
        } else {
            self.state.insert_backend(id, refs.value(key));
        }
    }

    /// The desired map contents.
    pub fn state(&self) -> &LbState {
        &self.state
    }

    /// The ids of the current state (what a from-scratch compile would return as `ids`).
    pub fn ids(&self) -> &IdAllocation {
        &self.ids
    }

    /// Hands out the current state's version with the keys changed since the version handed
    /// out before (`since: None` the first time: diff everything).
    pub fn take_changes(&mut self) -> StateChanges {
        self.seq += 1;
        let version = StateVersion {
            origin: self.origin,
            seq: self.seq,
        };
        let since = self.handed_out.replace(version);
        self.changes.on = true;
        StateChanges {
            since,
            version: Some(version),
            ..std::mem::take(&mut self.changes.keys)
        }
    }

    /// Names and reasons for the dump; shares the per-port models with the memo.
    pub fn model(&self) -> DumpModel {
        DumpModel {
            services: self
                .groups
                .values()
                .flat_map(|m| m.ports.iter().cloned())
                .collect(),
            rejected: self.rejected(),
        }
    }

    /// Rejected objects, in the dump's order.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.rejections.values().map(|(r, _)| r.clone()).collect()
    }

    pub fn health(&self) -> Vec<HealthCheck> {
        self.health.values().cloned().collect()
    }

    pub fn counts(&self) -> ServiceCounts {
        ServiceCounts {
            services: self.programmed,
            service_ports: self.service_ports,
            frontends: self.state.frontend_count(),
            endpoints: self.state.backend_count(),
        }
    }

    pub fn into_compiled(self) -> Compiled {
        Compiled {
            model: self.model(),
            health: self.health(),
            counts: self.counts(),
            state: self.state,
            ids: self.ids,
        }
    }
}

/// Groups parsed objects by Service, for a compile from a list of objects (which, unlike the
/// stores, may hold one key twice: the first copy of a Service that can be programmed wins, the
/// rejections of the others go to `extra`; duplicate slices all count).
pub(super) fn group_objects(
    services: Vec<ServiceInput>,
    slices: Vec<SliceInput>,
    config: &CompileConfig,
    extra: &mut Vec<Rejection>,
) -> Vec<ServiceGroup> {
    let mut groups: BTreeMap<GroupKey, ServiceGroup> = BTreeMap::new();
    for s in services {
        let g = groups
            .entry((s.namespace.clone(), s.name.clone()))
            .or_insert_with(|| ServiceGroup {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                service: None,
                slices: Vec::new(),
            });
        let Some(first) = &g.service else {
            g.service = Some(Arc::new(s));
            continue;
        };
        let mut first_rejected = Vec::new();
        let first_ok = first.admit(config, &mut first_rejected).is_some();
        if !first_ok && s.admit(config, &mut Vec::new()).is_some() {
            extra.extend(first_rejected);
            g.service = Some(Arc::new(s));
        } else {
            s.admit(config, extra);
        }
    }
    for s in slices {
        let name = s.service.clone().unwrap_or_else(|| "".into());
        let g = groups
            .entry((s.namespace.clone(), name.clone()))
            .or_insert_with(|| ServiceGroup {
                namespace: s.namespace.clone(),
                name,
                service: None,
                slices: Vec::new(),
            });
        g.slices.push(Arc::new(s));
    }
    let mut out: Vec<ServiceGroup> = groups.into_values().collect();
    for g in &mut out {
        g.slices.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}
