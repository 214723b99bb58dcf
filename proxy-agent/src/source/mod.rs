//! Where Services, EndpointSlices and Nodes (and, for NetworkPolicy, Pods, Namespaces and
//! NetworkPolicies) come from: the Kubernetes API ([`kube`]) or a directory of manifests
//! ([`manifests`]). Both write into the same [`Stores`]; the run loop reads the stores, never the
//! events (level-triggered, HOUSE_STYLE §8).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{Notify, watch};
use twill_core::policy::{ParsedPolicy, PolicyNamespace, PolicyPod};

use crate::compile::{GroupKey, Interner, ServiceGroup, ServiceInput, SliceInput};
use crate::metrics::Metrics;

mod json_stream;
pub mod kube;
pub mod manifests;

/// `(namespace, name)`; the namespace is empty for Nodes.
pub type ObjKey = (Arc<str>, Arc<str>);

/// The Node objects by key.
pub type Nodes = BTreeMap<ObjKey, Arc<Node>>;

/// The object kinds the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// NetworkPolicy's inputs.
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Kind::Service => 1,
            Kind::EndpointSlice => 2,
            Kind::Node => 4,
            Kind::Pod => 8,
            Kind::Namespace => 16,
            Kind::NetworkPolicy => 32,
        }
    }
}

/// `Kind::bit` of every kind: all synced.
const ALL_SYNCED: u8 = 63;

/// One object as the stores keep it: Services and EndpointSlices parsed into what the compiler
/// reads (the Kubernetes objects are dropped on arrival; at 10,000 Services they were most of
/// the agent's memory), Nodes — few — whole but for the parts nothing reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<ServiceInput>),
    EndpointSlice(Arc<SliceInput>),
    Node(Arc<Node>),
    /// What NetworkPolicy reads of a Pod (labels, IP, node, named ports, …).
    Pod(Arc<PolicyPod>),
    Namespace(Arc<PolicyNamespace>),
    /// A validated NetworkPolicy (invalid ones are skipped at the source).
    NetworkPolicy(Arc<ParsedPolicy>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    /// The store key.
    pub fn key(&self) -> ObjKey {
        match self {
            Object::Service(s) => (s.namespace.clone(), s.name.clone()),
            Object::EndpointSlice(s) => (s.namespace.clone(), s.name.clone()),
            Object::Node(n) => meta_key(&n.metadata),
            Object::Pod(p) => (p.namespace.clone(), p.name.clone()),
            Object::Namespace(n) => ("".into(), n.name.clone()),
            Object::NetworkPolicy(p) => (p.namespace.clone(), p.name.clone()),
        }
    }

    /// Checks the key, then keeps what NetworkPolicy reads of the Pod.
    pub fn pod(pod: &Pod) -> Result<Object, InvalidObject> {
        validate(&pod.metadata, true)?;
        PolicyPod::from_k8s(pod)
            .map(|p| Object::Pod(Arc::new(p)))
            .map_err(|_| InvalidObject::MissingName)
    }

    /// Checks the key, then keeps the Namespace's name and labels.
    pub fn namespace(ns: &Namespace) -> Result<Object, InvalidObject> {
        validate(&ns.metadata, false)?;
        PolicyNamespace::from_k8s(ns)
            .map(|n| Object::Namespace(Arc::new(n)))
            .map_err(|_| InvalidObject::MissingName)
    }

    /// Checks the key, then validates and parses the policy as the API server would; an invalid
    /// one is logged with the field at fault and skipped.
    pub fn network_policy(np: &NetworkPolicy) -> Result<Object, InvalidObject> {
        validate(&np.metadata, true)?;
        ParsedPolicy::from_k8s(np)
            .map(|p| Object::NetworkPolicy(Arc::new(p)))
            .map_err(|e| {
                let (ns, name) = meta_key(&np.metadata);
                log::warn!("NetworkPolicy {ns}/{name} is invalid: {e}");
                InvalidObject::Policy(e.kind.metric_label())
            })
    }

    /// Checks the key, then parses the Service (its rejections, if any, travel with it).
    pub fn service(svc: &Service, interner: &mut Interner) -> Result<Object, InvalidObject> {
        validate(&svc.metadata, true)?;
        Ok(Object::Service(Arc::new(ServiceInput::parse(
            svc, interner,
        ))))
    }

    /// Checks the key, then parses the slice (its rejection, if any, travels with it).
    pub fn slice(slice: &EndpointSlice, interner: &mut Interner) -> Result<Object, InvalidObject> {
        validate(&slice.metadata, true)?;
        Ok(Object::EndpointSlice(Arc::new(SliceInput::parse(
            slice, interner,
        ))))
    }

    /// Checks the key, then keeps what the agent reads of a Node: name, deletion mark, pod
    /// CIDRs, taints and addresses (a Node's status also lists every image on it, and its
    /// managed fields repeat the rest).
    pub fn node(node: Node) -> Result<Object, InvalidObject> {
        validate(&node.metadata, false)?;
        let Node {
            metadata,
            spec,
            status,
            ..
        } = node;
        Ok(Object::Node(Arc::new(Node {
            metadata: ObjectMeta {
                name: metadata.name,
                deletion_timestamp: metadata.deletion_timestamp,
                ..ObjectMeta::default()
            },
            spec: spec.map(|s| NodeSpec {
                pod_cidr: s.pod_cidr,
                pod_cidrs: s.pod_cidrs,
                taints: s.taints,
                ..NodeSpec::default()
            }),
            status: status.map(|s| NodeStatus {
                addresses: s.addresses,
                ..NodeStatus::default()
            }),
        })))
    }
}

/// The store key of an object's metadata (empty parts where missing).
pub fn meta_key(meta: &ObjectMeta) -> ObjKey {
    (
        meta.namespace.as_deref().unwrap_or_default().into(),
        meta.name.as_deref().unwrap_or_default().into(),
    )
}

/// Why a source skipped an object before the compiler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidObject {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("metadata.namespace is missing")]
    MissingNamespace,
    #[error("the object does not decode as {0}")]
    Decode(&'static str),
    /// A NetworkPolicy the API server would reject (the label names the rule).
    #[error("invalid NetworkPolicy ({0})")]
    Policy(&'static str),
}

impl InvalidObject {
    /// Label of `twill_invalid_objects_total{reason=…}`.
    pub fn metric_label(self) -> &'static str {
        match self {
            InvalidObject::MissingName => "missing_name",
            InvalidObject::MissingNamespace => "missing_namespace",
            InvalidObject::Decode(_) => "decode",
            InvalidObject::Policy(label) => label,
        }
    }
}

/// Checks what the stores need (a key); everything semantic is the compiler's job.
pub fn validate(meta: &ObjectMeta, namespaced: bool) -> Result<(), InvalidObject> {
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(InvalidObject::MissingName);
    }
    if namespaced && meta.namespace.as_deref().is_none_or(str::is_empty) {
        return Err(InvalidObject::MissingNamespace);
    }
    Ok(())
}

/// A copy of the stores' contents (objects are shared, not cloned). Tests and tools; the run
/// loop reads only what changed ([`Stores::take_changes`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<ObjKey, Arc<ServiceInput>>,
    pub endpoint_slices: BTreeMap<ObjKey, Arc<SliceInput>>,
    pub nodes: BTreeMap<ObjKey, Arc<Node>>,
    pub policy: PolicyObjects,
}

/// NetworkPolicy's inputs, by store key (Namespaces: `("", name)`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyObjects {
    pub pods: BTreeMap<ObjKey, Arc<PolicyPod>>,
    pub namespaces: BTreeMap<ObjKey, Arc<PolicyNamespace>>,
    pub policies: BTreeMap<ObjKey, Arc<ParsedPolicy>>,
}

impl PolicyObjects {
    fn contains(&self, kind: Kind, key: &ObjKey) -> bool {
        match kind {
            Kind::Pod => self.pods.contains_key(key),
            Kind::Namespace => self.namespaces.contains_key(key),
            Kind::NetworkPolicy => self.policies.contains_key(key),
            Kind::Service | Kind::EndpointSlice | Kind::Node => false,
        }
    }

    fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        let pods = self.pods.values().cloned().map(Object::Pod);
        let namespaces = self.namespaces.values().cloned().map(Object::Namespace);
        let policies = self.policies.values().cloned().map(Object::NetworkPolicy);
        pods.chain(namespaces).chain(policies)
    }
}

impl Snapshot {
    /// Builds a snapshot from objects; a later duplicate key replaces an earlier one.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut s = Self::default();
        for obj in objects {
            let key = obj.key();
            match obj {
                Object::Service(o) => {
                    s.services.insert(key, o);
                }
                Object::EndpointSlice(o) => {
                    s.endpoint_slices.insert(key, o);
                }
                Object::Node(o) => {
                    s.nodes.insert(key, o);
                }
                Object::Pod(o) => {
                    s.policy.pods.insert(key, o);
                }
                Object::Namespace(o) => {
                    s.policy.namespaces.insert(key, o);
                }
                Object::NetworkPolicy(o) => {
                    s.policy.policies.insert(key, o);
                }
            }
        }
        s
    }

    /// Every object, Services first.
    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        let services = self.services.values().cloned().map(Object::Service);
        let slices = self
            .endpoint_slices
            .values()
            .cloned()
            .map(Object::EndpointSlice);
        let nodes = self.nodes.values().cloned().map(Object::Node);
        services
            .chain(slices)
            .chain(nodes)
            .chain(self.policy.objects())
    }

    /// This node's Node object.
    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get(&node_key(name))
    }
}

fn node_key(name: &str) -> ObjKey {
    ("".into(), name.into())
}

/// One change a source makes to the stores.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Upsert(Object),
    Delete(Kind, ObjKey),
}

/// The Service groups changed since the run loop last looked, with their current contents.
#[derive(Clone, Debug, Default)]
pub struct StoreChanges {
    /// The store generation these contents are of.
    pub generation: u64,
    pub groups: Vec<ServiceGroup>,
}

/// Which Service group a slice belongs to: its namespace and `kubernetes.io/service-name`
/// label; slices without the label share the group with the empty name.
fn group_of(slice: &SliceInput) -> GroupKey {
    (
        slice.namespace.clone(),
        slice.service.clone().unwrap_or_else(|| "".into()),
    )
}

/// The objects, plus what level-triggered incremental compiles need: which slices belong to
/// which Service, and which Services changed.
#[derive(Debug, Default)]
struct Contents {
    services: BTreeMap<ObjKey, Arc<ServiceInput>>,
    slices: BTreeMap<ObjKey, Arc<SliceInput>>,
    nodes: BTreeMap<ObjKey, Arc<Node>>,
    /// Slice names of each Service group, sorted.
    slices_of: HashMap<GroupKey, Vec<Arc<str>>>,
    /// Groups changed since the last [`Stores::take_changes`] (HOUSE_STYLE §8: an event only
    /// marks its Service dirty; the compile reads the stores).
    dirty: BTreeSet<GroupKey>,
    /// NetworkPolicy's inputs; policy state is compiled from all of them at once.
    policy: PolicyObjects,
    /// A Pod, Namespace or NetworkPolicy changed since the last [`Stores::take_policy`].
    policy_dirty: bool,
}

impl Contents {
    /// Applies one change; whether anything changed.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert(Object::Service(o)) => {
                let key = (o.namespace.clone(), o.name.clone());
                if self.services.get(&key) == Some(&o) {
                    return false;
                }
                self.services.insert(key.clone(), o);
                self.dirty.insert(key);
            }
            Change::Upsert(Object::EndpointSlice(o)) => {
                let key = (o.namespace.clone(), o.name.clone());
                match self.slices.get(&key) {
                    Some(old) if *old == o => return false,
                    Some(old) => {
                        let old_group = group_of(old);
                        self.unlink_slice(&old_group, &key.1);
                        self.dirty.insert(old_group);
                    }
                    None => {}
                }
                let group = group_of(&o);
                let names = self.slices_of.entry(group.clone()).or_default();
                if let Err(at) = names.binary_search(&key.1) {
                    names.insert(at, key.1.clone());
                }
                self.slices.insert(key, o);
                self.dirty.insert(group);
            }
            Change::Upsert(Object::Node(o)) => {
                let key = meta_key(&o.metadata);
                if self.nodes.get(&key) == Some(&o) {
                    return false;
                }
                self.nodes.insert(key, o);
            }
            Change::Delete(Kind::Service, key) => {
                if self.services.remove(&key).is_none() {
                    return false;
                }
                self.dirty.insert(key);
            }
            Change::Delete(Kind::EndpointSlice, key) => {
                let Some(old) = self.slices.remove(&key) else {
                    return false;
                };
                let group = group_of(&old);
                self.unlink_slice(&group, &key.1);
                self.dirty.insert(group);
            }
            Change::Delete(Kind::Node, key) => return self.nodes.remove(&key).is_some(),
            Change::Upsert(Object::Pod(o)) => {
                let key = (o.namespace.clone(), o.name.clone());
                return self.upsert_policy_input(|p| &mut p.pods, o, key);
            }
            Change::Upsert(Object::Namespace(o)) => {
                let key = ("".into(), o.name.clone());
                return self.upsert_policy_input(|p| &mut p.namespaces, o, key);
            }
            Change::Upsert(Object::NetworkPolicy(o)) => {
                let key = (o.namespace.clone(), o.name.clone());
                return self.upsert_policy_input(|p| &mut p.policies, o, key);
            }
            Change::Delete(kind @ (Kind::Pod | Kind::Namespace | Kind::NetworkPolicy), key) => {
                let removed = match kind {
                    Kind::Pod => self.policy.pods.remove(&key).is_some(),
                    Kind::Namespace => self.policy.namespaces.remove(&key).is_some(),
                    _ => self.policy.policies.remove(&key).is_some(),
                };
                self.policy_dirty |= removed;
                return removed;
            }
        }
        true
    }

    /// Stores a Pod, Namespace or NetworkPolicy; whether it changed anything (a Pod's status
    /// updates that NetworkPolicy does not read compare equal and cost nothing).
    fn upsert_policy_input<T: PartialEq>(
        &mut self,
        map: impl FnOnce(&mut PolicyObjects) -> &mut BTreeMap<ObjKey, Arc<T>>,
        obj: Arc<T>,
        key: ObjKey,
    ) -> bool {
        let map = map(&mut self.policy);
        if map.get(&key) == Some(&obj) {
            return false;
        }
        map.insert(key, obj);
        self.policy_dirty = true;
        true
    }

    fn unlink_slice(&mut self, group: &GroupKey, name: &Arc<str>) {
        if let Some(names) = self.slices_of.get_mut(group) {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.slices_of.remove(group);
            }
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ObjKey> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Node => self.nodes.keys().cloned().collect(),
            Kind::Pod => self.policy.pods.keys().cloned().collect(),
            Kind::Namespace => self.policy.namespaces.keys().cloned().collect(),
            Kind::NetworkPolicy => self.policy.policies.keys().cloned().collect(),
        }
    }

    fn group(&self, key: &GroupKey) -> ServiceGroup {
        let slices = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())).cloned())
            .collect();
        ServiceGroup {
            namespace: key.0.clone(),
            name: key.1.clone(),
            service: self.services.get(key).cloned(),
            slices,
        }
    }
}

/// The stores shared by the sources (writers) and the run loop (reader).
#[derive(Debug)]
pub struct Stores {
    contents: RwLock<Contents>,
    /// Bumped on every change; the run loop compares it with what it applied.
    generation: AtomicU64,
    /// Oldest change not yet applied (network programming latency, /healthz staleness).
    pending_since: RwLock<Option<Instant>>,
    dirty: Notify,
    /// The generation, for other consumers than the run loop (e.g. routing): each subscriber
    /// sees the latest value, bursts coalesce.
    generations: watch::Sender<u64>,
    synced: watch::Sender<u8>,
}

impl Default for Stores {
    fn default() -> Self {
        Self {
            contents: RwLock::default(),
            generation: AtomicU64::new(0),
            pending_since: RwLock::new(None),
            dirty: Notify::new(),
            generations: watch::channel(0).0,
            synced: watch::channel(0).0,
        }
    }
}

impl Stores {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Contents> {
        self.contents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Contents> {
        self.contents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A consistent copy of everything (objects are shared, not cloned; costs a walk of the
    /// stores: for tests and tools, not the run loop).
    pub fn snapshot(&self) -> Snapshot {
        let c = self.read();
        Snapshot {
            services: c.services.clone(),
            endpoint_slices: c.slices.clone(),
            nodes: c.nodes.clone(),
            policy: c.policy.clone(),
        }
    }

    /// NetworkPolicy's inputs when any changed since the last call (always with `all`); the
    /// objects are shared, not copied. One reader: the run loop's policy compile.
    pub fn take_policy(&self, all: bool) -> Option<PolicyObjects> {
        let mut c = self.write();
        if !(all || c.policy_dirty) {
            return None;
        }
        c.policy_dirty = false;
        Some(c.policy.clone())
    }

    /// Every Node (there are few).
    pub fn nodes(&self) -> Nodes {
        self.read().nodes.clone()
    }

    /// The Node called `name`.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.read().nodes.get(&node_key(name)).cloned()
    }

    /// How many Services, EndpointSlices and Nodes the stores hold.
    pub fn counts(&self) -> (usize, usize, usize) {
        let c = self.read();
        (c.services.len(), c.slices.len(), c.nodes.len())
    }

    /// The Service groups changed since the last call (every group with `all`), with their
    /// current contents, and the generation they are of. There is one such reader: the run
    /// loop's compiler.
    pub fn take_changes(&self, all: bool) -> StoreChanges {
        let mut c = self.write();
        let generation = self.generation();
        let dirty = std::mem::take(&mut c.dirty);
        let groups = if all {
            let keys: BTreeSet<GroupKey> = c
                .services
                .keys()
                .cloned()
                .chain(c.slices_of.keys().cloned())
                .chain(dirty)
                .collect();
            keys.iter().map(|k| c.group(k)).collect()
        } else {
            dirty.iter().map(|k| c.group(k)).collect()
        };
        StoreChanges { generation, groups }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// When the oldest unapplied change happened, if any.
    pub fn pending_since(&self) -> Option<Instant> {
        *self
            .pending_since
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called by the run loop after applying generation `applied`: clears the pending marker
    /// unless something changed meanwhile.
    pub fn mark_applied(&self, applied: u64) {
        let mut p = self
            .pending_since
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.generation() == applied {
            *p = None;
        }
    }

    fn changed(&self) {
        {
            let mut p = self
                .pending_since
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            p.get_or_insert_with(Instant::now);
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.generations.send_replace(generation);
        // Notify keeps one permit: many changes before the loop wakes coalesce into one run.
        self.dirty.notify_one();
    }

    /// Waits until something changed since the last wake-up.
    pub async fn changed_notification(&self) {
        self.dirty.notified().await;
    }

    /// A receiver that is marked changed on every store change (use `changed().await`, then
    /// read the stores). Independent of the run loop's wake-ups.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generations.subscribe()
    }

    /// Wakes the run loop without a change (periodic resync, retry after an error).
    pub fn poke(&self) {
        self.dirty.notify_one();
    }

    /// Applies several changes as one (one generation, one wake-up).
    pub fn apply(&self, batch: impl IntoIterator<Item = Change>) {
        let changed = {
            let mut c = self.write();
            let mut changed = false;
            for change in batch {
                changed |= c.apply(change);
            }
            changed
        };
        if changed {
            self.changed();
        }
    }

    /// Adds or replaces one object.
    pub fn upsert(&self, obj: Object) {
        self.apply([Change::Upsert(obj)]);
    }

    /// Removes one object.
    pub fn delete(&self, kind: Kind, key: &ObjKey) {
        self.apply([Change::Delete(kind, key.clone())]);
    }

    /// Replaces all objects of `kind` by `objects` (a relist); a later duplicate key replaces
    /// an earlier one.
    pub fn replace_kind(&self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        let changed = {
            let mut c = self.write();
            let mut changed = false;
            let mut kept = BTreeSet::new();
            for obj in objects.into_iter().filter(|o| o.kind() == kind) {
                kept.insert(obj.key());
                changed |= c.apply(Change::Upsert(obj));
            }
            for key in c.keys(kind) {
                if !kept.contains(&key) {
                    changed |= c.apply(Change::Delete(kind, key));
                }
            }
            changed
        };
        if changed {
            self.changed();
        }
    }

    /// Replaces everything by the contents of `snapshot`.
    pub fn replace_all(&self, snapshot: &Snapshot) {
        let changed = {
            let mut c = self.write();
            let mut changed = false;
            for obj in snapshot.objects() {
                changed |= c.apply(Change::Upsert(obj));
            }
            for kind in Kind::ALL {
                for key in c.keys(kind) {
                    let present = match kind {
                        Kind::Service => snapshot.services.contains_key(&key),
                        Kind::EndpointSlice => snapshot.endpoint_slices.contains_key(&key),
                        Kind::Node => snapshot.nodes.contains_key(&key),
                        Kind::Pod | Kind::Namespace | Kind::NetworkPolicy => {
                            snapshot.policy.contains(kind, &key)
                        }
                    };
                    if !present {
                        changed |= c.apply(Change::Delete(kind, key));
                    }
                }
            }
            changed
        };
        if changed {
            self.changed();
        }
    }

    /// Records that the first full list of `kind` is in the store.
    pub fn mark_synced(&self, kind: Kind) {
        let newly = self.synced.send_if_modified(|bits| {
            let before = *bits;
            *bits |= kind.bit();
            before != *bits
        });
        if newly {
            log::info!("{} store synced", kind.as_str());
            self.poke();
        }
    }

    /// Whether every kind has been listed once.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow() == ALL_SYNCED
    }

    /// Waits until every kind has been listed once, at most `timeout`; whether it did.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|bits| *bits == ALL_SYNCED))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Records an object a source skipped.
pub fn report_invalid(metrics: &Metrics, kind: Kind, origin: &str, err: InvalidObject) {
    log::warn!("skipping invalid {} from {origin}: {err}", kind.as_str());
    metrics.invalid_object(kind.as_str(), err.metric_label());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_svc(ns: Option<&str>, name: Option<&str>) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = ns.map(Into::into);
        s.metadata.name = name.map(Into::into);
        s
    }

    fn svc(ns: Option<&str>, name: Option<&str>) -> Object {
        Object::service(&raw_svc(ns, name), &mut Interner::default()).unwrap()
    }

    fn slice(ns: &str, name: &str, service: Option<&str>) -> Object {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        };
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.metadata.labels =
            service.map(|n| [(crate::compile::LABEL_SERVICE_NAME.to_owned(), n.to_owned())].into());
        Object::slice(&s, &mut Interner::default()).unwrap()
    }

    fn key(ns: &str, name: &str) -> ObjKey {
        (ns.into(), name.into())
    }

    #[test]
    fn validation_needs_a_key() {
        let mut i = Interner::default();
        assert!(Object::service(&raw_svc(Some("a"), Some("b")), &mut i).is_ok());
        assert_eq!(
            Object::service(&raw_svc(Some("a"), None), &mut i),
            Err(InvalidObject::MissingName)
        );
        assert_eq!(
            Object::service(&raw_svc(None, Some("b")), &mut i),
            Err(InvalidObject::MissingNamespace)
        );
        let mut n = Node::default();
        n.metadata.name = Some("n".into());
        assert!(Object::node(n).is_ok());
        assert_eq!(
            Object::node(Node::default()),
            Err(InvalidObject::MissingName)
        );
    }

    #[test]
    fn nodes_keep_only_what_the_agent_reads() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"a": "b"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "k", "effect": "NoSchedule"}], "providerID": "x"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"}],
                       "images": [{"names": ["registry/image:1"], "sizeBytes": 1}]},
        }))
        .unwrap();
        let Ok(Object::Node(slim)) = Object::node(node) else {
            panic!("valid node")
        };
        assert_eq!(slim.metadata.name.as_deref(), Some("n1"));
        assert!(slim.metadata.labels.is_none() && slim.metadata.managed_fields.is_none());
        let spec = slim.spec.as_ref().unwrap();
        assert_eq!(
            spec.pod_cidrs.as_deref(),
            Some(&["10.244.1.0/24".to_owned()][..])
        );
        assert_eq!(spec.taints.as_ref().map(Vec::len), Some(1));
        assert!(spec.provider_id.is_none());
        let status = slim.status.as_ref().unwrap();
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
        assert!(status.images.is_none());
    }

    #[test]
    fn changes_mark_the_service_groups_dirty() {
        let stores = Stores::new();
        stores.upsert(svc(Some("d"), Some("web")));
        stores.upsert(slice("d", "web-1", Some("web")));
        stores.upsert(slice("d", "orphan", None));
        let all = stores.take_changes(true);
        let names: Vec<&str> = all.groups.iter().map(|g| &*g.name).collect();
        assert_eq!(names, ["", "web"]);
        assert_eq!(all.groups[1].slices.len(), 1);
        assert!(stores.take_changes(false).groups.is_empty(), "taken");

        // A slice relabelled to another Service dirties both.
        stores.upsert(slice("d", "web-1", Some("api")));
        let changed = stores.take_changes(false);
        let names: Vec<(&str, usize)> = changed
            .groups
            .iter()
            .map(|g| (&*g.name, g.slices.len()))
            .collect();
        assert_eq!(names, [("api", 1), ("web", 0)]);
        assert!(changed.groups[1].service.is_some());

        // Unchanged objects mark nothing; deletions do.
        stores.upsert(svc(Some("d"), Some("web")));
        assert!(stores.take_changes(false).groups.is_empty());
        stores.delete(Kind::EndpointSlice, &key("d", "web-1"));
        stores.delete(Kind::Service, &key("d", "web"));
        let changed = stores.take_changes(false);
        assert_eq!(changed.generation, stores.generation());
        let names: Vec<&str> = changed.groups.iter().map(|g| &*g.name).collect();
        assert_eq!(names, ["api", "web"]);
        assert!(
            changed
                .groups
                .iter()
                .all(|g| g.service.is_none() && g.slices.is_empty())
        );
    }

    #[tokio::test]
    async fn changes_bump_the_generation_and_coalesce() {
        let stores = Stores::new();
        stores.upsert(svc(Some("a"), Some("b")));
        stores.upsert(svc(Some("a"), Some("b"))); // identical: no change
        assert_eq!(stores.generation(), 1);
        stores.upsert(svc(Some("a"), Some("c")));
        assert_eq!(stores.generation(), 2);
        assert!(stores.pending_since().is_some());
        // Two changes, one wake-up.
        tokio::time::timeout(Duration::from_secs(1), stores.changed_notification())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), stores.changed_notification())
                .await
                .is_err()
        );
        stores.mark_applied(1);
        assert!(
            stores.pending_since().is_some(),
            "generation 2 is not applied yet"
        );
        stores.mark_applied(2);
        assert!(stores.pending_since().is_none());
        stores.delete(Kind::Service, &key("a", "b"));
        assert_eq!(stores.snapshot().services.len(), 1);
        stores.delete(Kind::Service, &key("a", "zzz"));
        assert_eq!(stores.generation(), 3);
        let mut rx = stores.subscribe();
        stores.upsert(svc(Some("a"), Some("d")));
        stores.upsert(svc(Some("a"), Some("e")));
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), 5);
    }

    #[tokio::test]
    async fn sync_waits_for_every_kind() {
        let stores = Stores::new();
        stores.mark_synced(Kind::Service);
        stores.mark_synced(Kind::Node);
        assert!(!stores.wait_synced(Duration::from_millis(20)).await);
        stores.mark_synced(Kind::EndpointSlice);
        stores.mark_synced(Kind::Pod);
        stores.mark_synced(Kind::Namespace);
        assert!(
            !stores.wait_synced(Duration::from_millis(20)).await,
            "NetworkPolicies not listed yet"
        );
        stores.mark_synced(Kind::NetworkPolicy);
        assert!(stores.wait_synced(Duration::from_millis(20)).await);
        assert!(stores.is_synced());
    }
}
