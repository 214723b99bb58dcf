//! Where Services, EndpointSlices and Nodes come from: the Kubernetes API ([`kube`]) or a
//! directory of manifests ([`manifests`]). Both write into the same [`Stores`]; the run loop reads
//! the stores, never the events (level-triggered, HOUSE_STYLE §8).
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;

pub mod kube;
pub mod manifests;

/// `(namespace, name)`; the namespace is empty for Nodes.
pub type ObjKey = (String, String);

/// The object kinds the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Kind::Service => 1,
            Kind::EndpointSlice => 2,
            Kind::Node => 4,
        }
    }
}

/// One decoded object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(s) => &s.metadata,
            Object::EndpointSlice(s) => &s.metadata,
            Object::Node(n) => &n.metadata,
        }
    }

    /// The store key; callers have validated the object ([`validate`]).
    pub fn key(&self) -> ObjKey {
        let m = self.meta();
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }
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
}

impl InvalidObject {
    /// Label of `twill_invalid_objects_total{reason=…}`.
    pub fn metric_label(self) -> &'static str {
        match self {
            InvalidObject::MissingName => "missing_name",
            InvalidObject::MissingNamespace => "missing_namespace",
            InvalidObject::Decode(_) => "decode",
        }
    }
}

/// Checks what the stores need (a key); everything semantic is the compiler's job.
pub fn validate(obj: &Object) -> Result<(), InvalidObject> {
    let m = obj.meta();
    if m.name.as_deref().is_none_or(str::is_empty) {
        return Err(InvalidObject::MissingName);
    }
    let namespaced = !matches!(obj, Object::Node(_));
    if namespaced && m.namespace.as_deref().is_none_or(str::is_empty) {
        return Err(InvalidObject::MissingNamespace);
    }
    Ok(())
}

/// The current view of the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<ObjKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjKey, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<ObjKey, Arc<Node>>,
}

impl Snapshot {
    /// Builds a snapshot from objects; a later duplicate key replaces an earlier one.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut s = Self::default();
        for obj in objects {
            s.insert(obj);
        }
        s
    }

    fn insert(&mut self, obj: Object) {
        let key = obj.key();
        match obj {
            Object::Service(o) => {
                self.services.insert(key, o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(key, o);
            }
            Object::Node(o) => {
                self.nodes.insert(key, o);
            }
        }
    }

    /// Returns whether something was removed.
    fn remove(&mut self, kind: Kind, key: &ObjKey) -> bool {
        match kind {
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(key).is_some(),
            Kind::Node => self.nodes.remove(key).is_some(),
        }
    }

    /// Replaces every object of `kind` by those of `other` of the same kind; whether it changed.
    fn replace_kind(&mut self, kind: Kind, other: &Snapshot) -> bool {
        match kind {
            Kind::Service => replace(&mut self.services, &other.services),
            Kind::EndpointSlice => replace(&mut self.endpoint_slices, &other.endpoint_slices),
            Kind::Node => replace(&mut self.nodes, &other.nodes),
        }
    }

    /// This node's Node object.
    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get(&(String::new(), name.to_owned()))
    }
}

fn replace<V: PartialEq + Clone>(
    mine: &mut BTreeMap<ObjKey, V>,
    theirs: &BTreeMap<ObjKey, V>,
) -> bool {
    if mine == theirs {
        return false;
    }
    mine.clone_from(theirs);
    true
}

/// The stores shared by the sources (writers) and the run loop (reader).
#[derive(Debug)]
pub struct Stores {
    snapshot: RwLock<Snapshot>,
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
            snapshot: RwLock::default(),
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

    /// A consistent copy of the current view (objects are shared, not cloned).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
    /// read [`Stores::snapshot`]). Independent of the run loop's wake-ups.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generations.subscribe()
    }

    /// Wakes the run loop without a change (periodic resync, retry after an error).
    pub fn poke(&self) {
        self.dirty.notify_one();
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds or replaces one object.
    pub fn upsert(&self, obj: Object) {
        let key = obj.key();
        let changed = {
            let mut s = self.write();
            let same = match &obj {
                Object::Service(o) => s.services.get(&key) == Some(o),
                Object::EndpointSlice(o) => s.endpoint_slices.get(&key) == Some(o),
                Object::Node(o) => s.nodes.get(&key) == Some(o),
            };
            if !same {
                s.insert(obj);
            }
            !same
        };
        if changed {
            self.changed();
        }
    }

    /// Removes one object.
    pub fn delete(&self, kind: Kind, key: &ObjKey) {
        let removed = self.write().remove(kind, key);
        if removed {
            self.changed();
        }
    }

    /// Replaces all objects of `kind` (a relist, a manifests re-scan).
    pub fn replace_kind(&self, kind: Kind, objects: &Snapshot) {
        let changed = self.write().replace_kind(kind, objects);
        if changed {
            self.changed();
        }
    }

    /// Replaces everything (manifests re-scan).
    pub fn replace_all(&self, objects: &Snapshot) {
        let changed = {
            let mut s = self.write();
            let mut changed = false;
            for kind in Kind::ALL {
                changed |= s.replace_kind(kind, objects);
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
        *self.synced.borrow() == 7
    }

    /// Waits until every kind has been listed once, at most `timeout`; whether it did.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|bits| *bits == 7))
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

    fn svc(ns: Option<&str>, name: Option<&str>) -> Object {
        let mut s = Service::default();
        s.metadata.namespace = ns.map(Into::into);
        s.metadata.name = name.map(Into::into);
        Object::Service(Arc::new(s))
    }

    #[test]
    fn validation_needs_a_key() {
        assert_eq!(validate(&svc(Some("a"), Some("b"))), Ok(()));
        assert_eq!(
            validate(&svc(Some("a"), None)),
            Err(InvalidObject::MissingName)
        );
        assert_eq!(
            validate(&svc(None, Some("b"))),
            Err(InvalidObject::MissingNamespace)
        );
        let mut n = Node::default();
        n.metadata.name = Some("n".into());
        assert_eq!(validate(&Object::Node(Arc::new(n))), Ok(()));
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
        stores.delete(Kind::Service, &("a".into(), "b".into()));
        assert_eq!(stores.snapshot().services.len(), 1);
        stores.delete(Kind::Service, &("a".into(), "zzz".into()));
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
        assert!(stores.wait_synced(Duration::from_millis(20)).await);
        assert!(stores.is_synced());
    }
}
