//! The `--manifests DIR` source: every `*.yaml`, `*.yml` and `*.json` file in DIR (not
//! recursive), multi-document YAML and `kind: List` included, holding Services, EndpointSlices
//! and Nodes. Other kinds are ignored.
//!
//! The directory is scanned (file name, size, mtime and inode) right after inotify reports a
//! *finished* change — a file closed after writing, renamed into place or removed — and also
//! polled every 250 ms. The poll is the safety net for what inotify misses (editors' rename
//! dances, bind-mounted ConfigMaps swapping `..data` symlinks, a directory created after the
//! agent started); inotify is what makes a change reach the datapath in milliseconds.
//! Modify events of a file still being written do not trigger a scan, so a writer that is not
//! atomic is not read half-way on purpose.
//!
//! A file that fails to parse is logged and counted (`twill_manifest_errors_total`), and its
//! **last good objects stay served**: a half-written or mistyped edit must not tear down the
//! Services it describes (kubectl apply of a broken file changes nothing either). Deleting the
//! file removes its objects. Objects that parse but are invalid are skipped one by one and
//! counted in `twill_invalid_objects_total`.
//!
//! Only what a scan changed reaches the stores: the objects of the files that changed, each
//! resolved against the others (a later file's object replaces an earlier one with the same
//! kind, namespace and name), so adding one file to a directory of 10,000 Services costs the
//! parse of that file.
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::json_stream;
use super::{Change, InvalidObject, Kind, ObjKey, Object, Stores, report_invalid};
use crate::compile::Interner;
use crate::metrics::Metrics;

/// How often the directory is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A manifest file that cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// An object of the file that was skipped.
#[derive(Debug, PartialEq, Eq)]
pub struct Skipped {
    pub kind: Kind,
    pub error: InvalidObject,
}

/// What one file holds.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub skipped: Vec<Skipped>,
}

/// Whether a file name is a manifest.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Parses one file's text. `json` picks the JSON parser (better error positions); YAML is
/// otherwise used, which also reads JSON. Each document is turned into the stores' form as soon
/// as it is read.
pub fn parse_text(path: &Path, text: &str, json: bool) -> Result<Parsed, ManifestError> {
    let mut parsed = Parsed::default();
    let mut interner = Interner::default();
    if json {
        // Streamed: a 10,000-pod List is never one `serde_json::Value` tree (see
        // `json_stream`).
        json_stream::parse(text, &mut parsed, &mut interner).map_err(|source| {
            ManifestError::Json {
                path: path.to_owned(),
                source,
            }
        })?;
    } else {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_yaml::Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
                path: path.to_owned(),
                source,
            })?;
            // YAML → JSON values so that k8s-openapi sees one data model for both formats.
            let v: serde_json::Value =
                serde_json::to_value(v).map_err(|source| ManifestError::Json {
                    path: path.to_owned(),
                    source,
                })?;
            collect(v, &mut parsed, &mut interner);
        }
    }
    Ok(parsed)
}

/// What the items of a list are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListOf<'k> {
    /// A `List`: each item names its kind.
    Any,
    /// A typed list (`PodList`): items without a kind are of this one.
    Kind(&'k str),
}

/// The list a kind names, or `None` when it is no list the agent reads.
pub(super) fn list_item_kind(kind: &str) -> Option<ListOf<'_>> {
    match kind {
        "List" => Some(ListOf::Any),
        "ServiceList" | "EndpointSliceList" | "NodeList" | "PodList" | "NamespaceList"
        | "NetworkPolicyList" => kind.strip_suffix("List").map(ListOf::Kind),
        _ => None,
    }
}

/// One item of a list: typed lists may omit kind/apiVersion on their items.
pub(super) fn collect_item(
    mut item: serde_json::Value,
    list: ListOf<'_>,
    out: &mut Parsed,
    interner: &mut Interner,
) {
    if let (ListOf::Kind(k), Some(map)) = (list, item.as_object_mut()) {
        map.entry("kind").or_insert_with(|| k.into());
        let api = match k {
            "EndpointSlice" => "discovery.k8s.io/v1",
            "NetworkPolicy" => "networking.k8s.io/v1",
            _ => "v1",
        };
        map.entry("apiVersion").or_insert_with(|| api.into());
    }
    collect(item, out, interner);
}

/// One document (or list item) into the stores' form.
pub(super) fn collect(doc: serde_json::Value, out: &mut Parsed, interner: &mut Interner) {
    let kind = doc
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if let Some(item_kind) = list_item_kind(&kind) {
        // Taken, not cloned: the items are the bulk of the document.
        if let serde_json::Value::Object(mut map) = doc
            && let Some(serde_json::Value::Array(items)) = map.remove("items")
        {
            for item in items {
                collect_item(item, item_kind, out, interner);
            }
        }
        return;
    }
    let decoded = match kind.as_str() {
        "" if doc.is_null() => return, // empty document (`---` at the end)
        "Service" => serde_json::from_value(doc)
            .map(|o| Object::service(&o, interner))
            .map_err(|e| (Kind::Service, e)),
        "EndpointSlice" => serde_json::from_value(doc)
            .map(|o| Object::slice(&o, interner))
            .map_err(|e| (Kind::EndpointSlice, e)),
        "Node" => serde_json::from_value(doc)
            .map(Object::node)
            .map_err(|e| (Kind::Node, e)),
        "Pod" => serde_json::from_value(doc)
            .map(|o| Object::pod(&o))
            .map_err(|e| (Kind::Pod, e)),
        "Namespace" => serde_json::from_value(doc)
            .map(|o| Object::namespace(&o))
            .map_err(|e| (Kind::Namespace, e)),
        "NetworkPolicy" => serde_json::from_value(doc)
            .map(|o| Object::network_policy(&o))
            .map_err(|e| (Kind::NetworkPolicy, e)),
        other => {
            log::debug!("ignoring manifest object of kind {other:?}");
            return;
        }
    };
    match decoded {
        Ok(Ok(obj)) => out.objects.push(obj),
        Ok(Err(error)) => out.skipped.push(Skipped {
            kind: match kind.as_str() {
                "Service" => Kind::Service,
                "EndpointSlice" => Kind::EndpointSlice,
                "Pod" => Kind::Pod,
                "Namespace" => Kind::Namespace,
                "NetworkPolicy" => Kind::NetworkPolicy,
                _ => Kind::Node,
            },
            error,
        }),
        Err((kind, e)) => {
            log::warn!("{} does not decode: {e}", kind.as_str());
            out.skipped.push(Skipped {
                kind,
                error: InvalidObject::Decode(kind.as_str()),
            });
        }
    }
}

/// Identity of a file version: changes when it is rewritten or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Signature {
    len: u64,
    mtime: Option<SystemTime>,
    inode: u64,
}

/// A file's objects by kind and key (a later duplicate in the file replaces an earlier one).
type FileObjects = BTreeMap<(Kind, ObjKey), Object>;

struct FileState {
    sig: Signature,
    /// Last good objects (kept when a later version is broken).
    objects: FileObjects,
}

/// The directory watcher's state.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Set after a directory read error was logged, to log it once.
    dir_error: bool,
    poll_interval: Duration,
}

impl ManifestDir {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            dir_error: false,
            poll_interval: POLL_INTERVAL,
        }
    }

    /// Polls every `interval` instead of [`POLL_INTERVAL`] (tests isolate the inotify path
    /// with a very long one).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Re-reads changed files; returns what that changed in the union of all files' objects,
    /// or `None` when no file changed. Files are merged in name order: a later file's object
    /// replaces an earlier one with the same kind, namespace and name.
    pub fn scan(&mut self, metrics: &Metrics) -> Option<Vec<Change>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => {
                self.dir_error = false;
                e
            }
            Err(e) => {
                if !self.dir_error {
                    log::error!("reading manifests directory {}: {e}", self.dir.display());
                    self.dir_error = true;
                }
                // An absent directory means "no objects", like an empty one.
                if self.files.is_empty() {
                    return None;
                }
                let affected: BTreeSet<(Kind, ObjKey)> = self
                    .files
                    .values()
                    .flat_map(|f| f.objects.keys().cloned())
                    .collect();
                self.files.clear();
                return Some(self.resolve(affected));
            }
        };
        let mut present: BTreeMap<PathBuf, Signature> = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // Follow symlinks (ConfigMap volumes).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            present.insert(
                path,
                Signature {
                    len: meta.len(),
                    mtime: meta.modified().ok(),
                    inode: meta.ino(),
                },
            );
        }
        let mut changed = false;
        let mut affected: BTreeSet<(Kind, ObjKey)> = BTreeSet::new();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(f) = self.files.remove(&path) {
                affected.extend(f.objects.into_keys());
            }
            changed = true;
        }
        for (path, sig) in present {
            if self.files.get(&path).is_some_and(|f| f.sig == sig) {
                continue;
            }
            changed = true;
            let objects = match read_file(&path, metrics) {
                Ok(objects) => {
                    let objects: FileObjects = objects
                        .into_iter()
                        .map(|o| ((o.kind(), o.key()), o))
                        .collect();
                    if let Some(old) = self.files.get(&path) {
                        affected.extend(old.objects.keys().cloned());
                    }
                    affected.extend(objects.keys().cloned());
                    objects
                }
                Err(e) => {
                    log::error!("{}; keeping its last good objects", error_chain(&e));
                    metrics.manifest_errors.inc();
                    self.files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default()
                }
            };
            self.files.insert(path, FileState { sig, objects });
        }
        changed.then(|| self.resolve(affected))
    }

    /// The store change of each affected key: the object of the last file (in name order)
    /// holding it, or its deletion.
    fn resolve(&self, affected: BTreeSet<(Kind, ObjKey)>) -> Vec<Change> {
        affected
            .into_iter()
            .map(
                |key| match self.files.values().rev().find_map(|f| f.objects.get(&key)) {
                    Some(obj) => Change::Upsert(obj.clone()),
                    None => Change::Delete(key.0, key.1),
                },
            )
            .collect()
    }

    /// Every object the files hold now, merged as [`Self::scan`] merges them.
    pub fn objects(&self) -> Vec<Object> {
        let mut merged: BTreeMap<&(Kind, ObjKey), &Object> = BTreeMap::new();
        for f in self.files.values() {
            merged.extend(f.objects.iter());
        }
        merged.into_values().cloned().collect()
    }

    /// Scans on every finished change and every poll interval, forever, feeding `stores`.
    /// Marks every kind synced after the first scan.
    pub async fn run(mut self, stores: Arc<Stores>, metrics: Arc<Metrics>) {
        let mut first = true;
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = Arc::new(tokio::sync::Notify::new());
        // Kept alive for the loop's lifetime; dropping it stops the inotify thread.
        let _watcher = watch_finished_changes(&self.dir, wake.clone());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = wake.notified() => {}
            }
            if let Some(changes) = self.scan(&metrics) {
                let n = changes.len();
                stores.apply(changes);
                let (services, slices, nodes) = stores.counts();
                log::info!(
                    "manifests: {n} objects changed; {services} Services, {slices} EndpointSlices, {nodes} Nodes"
                );
            }
            if first {
                for kind in Kind::ALL {
                    stores.mark_synced(kind);
                }
                first = false;
            }
        }
    }
}

/// An inotify watch on `dir` that wakes `wake` when a change is complete: a file closed after
/// writing, something renamed into the directory (atomic writes, ConfigMap symlink swaps),
/// created (symlinks) or removed. `None` (polling only) when the watch cannot be set up, e.g.
/// the directory does not exist yet.
fn watch_finished_changes(
    dir: &Path,
    wake: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    use notify::{EventKind, RecursiveMode, Watcher as _};
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        let finished = matches!(
            ev.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                | EventKind::Create(_)
                | EventKind::Remove(_)
        );
        if finished {
            wake.notify_one();
        }
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!(
                "no inotify watch on {} ({e}): changes are picked up by polling every {POLL_INTERVAL:?}",
                dir.display()
            );
            None
        }
    }
}

fn read_file(path: &Path, metrics: &Metrics) -> Result<Vec<Object>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let json = path.extension().is_some_and(|e| e == "json");
    let parsed = parse_text(path, &text, json)?;
    let origin = path.display().to_string();
    for s in parsed.skipped {
        report_invalid(metrics, s.kind, &origin, s.error);
    }
    Ok(parsed.objects)
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5], conditions: {ready: true}}]
ports: [{port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored, namespace: default}
---
";

    fn parse(text: &str) -> Parsed {
        parse_text(Path::new("x.yaml"), text, false).unwrap()
    }

    #[test]
    fn multi_document_yaml() {
        let p = parse(MULTI);
        let kinds: Vec<_> = p.objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, vec![Kind::Service, Kind::EndpointSlice]);
        assert!(p.skipped.is_empty());
        let Object::Service(s) = &p.objects[0] else {
            panic!()
        };
        assert_eq!(
            s.parsed().unwrap().cluster_ips,
            vec![std::net::Ipv4Addr::new(10, 96, 0, 10)]
        );
    }

    #[test]
    fn kind_list_and_typed_lists() {
        let p = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n  spec: {podCIDRs: [10.244.1.0/24]}\n\
             - apiVersion: v1\n  kind: Service\n  metadata: {name: s, namespace: d}\n",
        );
        assert_eq!(p.objects.len(), 2);
        let p = parse(
            "apiVersion: v1\nkind: NodeList\nitems:\n- metadata: {name: n1}\n- metadata: {name: n2}\n",
        );
        assert_eq!(
            p.objects.iter().map(Object::key).collect::<Vec<_>>(),
            vec![("".into(), "n1".into()), ("".into(), "n2".into())]
        );
    }

    #[test]
    fn json_files() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n0"}}]}"#;
        let p = parse_text(Path::new("n.json"), text, true).unwrap();
        assert_eq!(p.objects.len(), 1);
        assert!(matches!(
            parse_text(Path::new("n.json"), "{", true),
            Err(ManifestError::Json { .. })
        ));
    }

    #[test]
    fn invalid_objects_are_skipped_not_fatal() {
        let p = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: nons}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: d}\nspec: {ports: \"nope\"}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: d}\n",
        );
        assert_eq!(p.objects.len(), 1);
        assert_eq!(
            p.skipped,
            vec![
                Skipped {
                    kind: Kind::Service,
                    error: InvalidObject::MissingNamespace
                },
                Skipped {
                    kind: Kind::Service,
                    error: InvalidObject::Decode("Service")
                },
            ]
        );
    }

    #[test]
    fn broken_yaml_is_a_file_error() {
        assert!(matches!(
            parse_text(Path::new("b.yaml"), "kind: Service\n  metadata: [", false),
            Err(ManifestError::Yaml { .. })
        ));
    }

    /// (Services, EndpointSlices, Nodes) among `objects`.
    fn counts<'a>(objects: impl IntoIterator<Item = &'a Object>) -> (usize, usize, usize) {
        objects
            .into_iter()
            .fold((0, 0, 0), |(s, e, n), o| match o.kind() {
                Kind::Service => (s + 1, e, n),
                Kind::EndpointSlice => (s, e + 1, n),
                Kind::Node => (s, e, n + 1),
                Kind::Pod | Kind::Namespace | Kind::NetworkPolicy => (s, e, n),
            })
    }

    fn upserts(changes: &[Change]) -> Vec<&Object> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Upsert(o) => Some(o),
                Change::Delete(..) => None,
            })
            .collect()
    }

    #[test]
    fn directory_scan_keeps_last_good_objects_of_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let mut md = ManifestDir::new(dir.path().to_owned());
        assert!(md.scan(&metrics).is_none(), "empty dir, nothing changed");
        std::fs::write(dir.path().join("a.yaml"), MULTI).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let changes = md.scan(&metrics).expect("changed");
        assert_eq!(counts(upserts(&changes)), (1, 1, 0));
        assert_eq!(counts(&md.objects()), (1, 1, 0));
        assert!(md.scan(&metrics).is_none(), "unchanged");

        // Broken rewrite (different size): last good objects stay, nothing changes.
        std::fs::write(dir.path().join("a.yaml"), "kind: [").unwrap();
        let changes = md.scan(&metrics).expect("rescanned");
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(counts(&md.objects()), (1, 1, 0));
        assert!(metrics.render().contains("twill_manifest_errors_total 1"));

        // Another file keeps working next to the broken one; only its object is a change.
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}"#,
        )
        .unwrap();
        let changes = md.scan(&metrics).expect("new file");
        assert_eq!(counts(upserts(&changes)), (0, 0, 1));
        assert_eq!(changes.len(), 1);
        assert_eq!(counts(&md.objects()), (1, 1, 1));

        // Deleting the file removes its objects.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let changes = md.scan(&metrics).expect("deleted");
        assert_eq!(changes.len(), 2);
        assert!(upserts(&changes).is_empty());
        assert_eq!(counts(&md.objects()), (0, 0, 1));
    }

    #[test]
    fn a_later_file_overrides_and_removing_it_restores_the_earlier_object() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let mut md = ManifestDir::new(dir.path().to_owned());
        std::fs::write(dir.path().join("a.yaml"), MULTI).unwrap();
        md.scan(&metrics).expect("first");
        std::fs::write(
            dir.path().join("b.yaml"),
            MULTI.replace("10.96.0.10", "10.96.0.20"),
        )
        .unwrap();
        let stores = Stores::new();
        stores.replace_kind(Kind::Service, md.objects());
        let ip = |stores: &Stores| {
            stores
                .snapshot()
                .services
                .values()
                .next()
                .unwrap()
                .parsed()
                .unwrap()
                .cluster_ips[0]
        };
        assert_eq!(ip(&stores), std::net::Ipv4Addr::new(10, 96, 0, 10));
        stores.apply(md.scan(&metrics).expect("b"));
        assert_eq!(ip(&stores), std::net::Ipv4Addr::new(10, 96, 0, 20));
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        stores.apply(md.scan(&metrics).expect("b removed"));
        assert_eq!(ip(&stores), std::net::Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(stores.counts(), (1, 1, 0));
    }

    #[tokio::test]
    async fn run_feeds_the_stores_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yml"), MULTI).unwrap();
        let stores = Stores::new();
        let task = tokio::spawn(
            ManifestDir::new(dir.path().to_owned()).run(stores.clone(), Arc::new(Metrics::new())),
        );
        assert!(stores.wait_synced(Duration::from_secs(5)).await);
        assert_eq!(stores.snapshot().services.len(), 1);
        std::fs::remove_file(dir.path().join("a.yml")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !stores.snapshot().services.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "deletion not seen within 2 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }

    /// With polling pushed out to an hour, only inotify can deliver these changes: an atomic
    /// rename into place, a plain write closed after writing, and a removal.
    #[tokio::test]
    async fn finished_changes_are_picked_up_without_polling() {
        async fn until(stores: &Stores, what: &str, f: impl Fn(&crate::source::Snapshot) -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !f(&stores.snapshot()) {
                assert!(tokio::time::Instant::now() < deadline, "{what} never seen");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new();
        let task = tokio::spawn(
            ManifestDir::new(dir.path().to_owned())
                .with_poll_interval(Duration::from_hours(1))
                .run(stores.clone(), Arc::new(Metrics::new())),
        );
        assert!(stores.wait_synced(Duration::from_secs(5)).await);
        let tmp = dir.path().join(".a.yml.tmp");
        std::fs::write(&tmp, MULTI).unwrap();
        std::fs::rename(&tmp, dir.path().join("a.yml")).unwrap();
        until(&stores, "the renamed file", |s| s.services.len() == 1).await;
        std::fs::write(
            dir.path().join("b.yml"),
            MULTI.replace("name: web", "name: web2"),
        )
        .unwrap();
        until(&stores, "the written file", |s| s.services.len() == 2).await;
        std::fs::remove_file(dir.path().join("a.yml")).unwrap();
        until(&stores, "the removal", |s| s.services.len() == 1).await;
        task.abort();
    }
}
