//! The Kubernetes API source: one kube-rs watcher per kind (Services, EndpointSlices, Nodes, and
//! for NetworkPolicy Pods, Namespaces and NetworkPolicies).
//!
//! kube-runtime's watcher lists (with `resourceVersion`), then watches from the list's version;
//! on `410 Gone` it relists, and `default_backoff` spaces out retries after errors. Like a
//! reflector, a (re)list is buffered between `Init` and `InitDone` and then replaces the kind's
//! store contents at once, so objects deleted while the watch was broken disappear and the run
//! loop never sees a half-listed cluster. The first `InitDone` of each kind marks it synced; the
//! run loop prunes nothing before every kind has synced.
//!
//! Each object is parsed into the stores' slim form as soon as it is decoded and the Kubernetes
//! object dropped: at most one list page of full objects is alive at a time.
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::{InvalidObject, Kind, Object, Stores, meta_key, report_invalid};
use crate::compile::Interner;
use crate::metrics::Metrics;

/// The API resources and verbs the agent uses: the single table the deploy RBAC is checked
/// against. (group, resource, verbs)
pub const WATCHED_RESOURCES: &[(&str, &str, &[&str])] = &[
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "nodes", &["list", "watch"]),
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    ("networking.k8s.io", "networkpolicies", &["list", "watch"]),
];

/// Building a client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster and no kubeconfig found; pass --kubeconfig or --manifests"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `--kubeconfig`, else in-cluster config / `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    Client::try_from(config).map_err(ClientError::Client)
}

/// Runs the watchers (one per [`Kind`]) until the returned tasks are aborted.
pub fn spawn(
    client: &Client,
    stores: &Arc<Stores>,
    metrics: &Arc<Metrics>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // One interner per watcher: namespaces, node and port names (and pods' labels) repeat
    // across its objects.
    let mut services = Interner::default();
    let mut slices = Interner::default();
    let mut pods = Interner::default();
    vec![
        tokio::spawn(watch_kind(
            Api::<Service>::all(client.clone()),
            Kind::Service,
            move |o: Service| Object::service(&o, &mut services),
            stores.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            move |o: EndpointSlice| Object::slice(&o, &mut slices),
            stores.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<Node>::all(client.clone()),
            Kind::Node,
            Object::node,
            stores.clone(),
            metrics.clone(),
        )),
        // Every Pod of the cluster, not only this node's: remote pods are policy peers, matched
        // by their IPs. Only the few fields NetworkPolicy reads are kept.
        tokio::spawn(watch_kind(
            Api::<Pod>::all(client.clone()),
            Kind::Pod,
            move |o: Pod| Object::pod(&o, &mut pods),
            stores.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            |o: Namespace| Object::namespace(&o),
            stores.clone(),
            metrics.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<NetworkPolicy>::all(client.clone()),
            Kind::NetworkPolicy,
            |o: NetworkPolicy| Object::network_policy(&o),
            stores.clone(),
            metrics.clone(),
        )),
    ]
}

/// Feeds one kind's watch events into the stores, forever.
pub async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    mut ingest: impl FnMut(K) -> Result<Object, InvalidObject> + Send,
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let origin = format!("the API ({})", kind.as_str());
    let mut stream = watcher(api).default_backoff().boxed();
    let mut buffer: Option<Vec<Object>> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => buffer = Some(Vec::new()),
            Ok(Event::InitApply(o)) => match ingest(o) {
                Ok(obj) => buffer.get_or_insert_with(Vec::new).push(obj),
                Err(e) => report_invalid(&metrics, kind, &origin, e),
            },
            Ok(Event::InitDone) => {
                let objects = buffer.take().unwrap_or_default();
                log::info!("listed {} {}s", objects.len(), kind.as_str());
                stores.replace_kind(kind, objects);
                stores.mark_synced(kind);
            }
            Ok(Event::Apply(o)) => match ingest(o) {
                Ok(obj) => stores.upsert(obj),
                Err(e) => report_invalid(&metrics, kind, &origin, e),
            },
            Ok(Event::Delete(o)) => stores.delete(kind, &meta_key(o.meta())),
            Err(e) => {
                // The watcher recovers by itself (relist on 410, re-watch otherwise); the
                // backoff wrapper delays the retry.
                log::warn!(
                    "watching {}s: {}",
                    kind.as_str(),
                    super::manifests::error_chain(&e)
                );
                metrics.source_error(kind.as_str());
            }
        }
    }
}

fn watcher<K>(
    api: Api<K>,
) -> impl futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    // Bookmarks keep the resume version fresh on quiet clusters, so a broken watch resumes
    // instead of relisting.
    watcher::watcher(api, watcher::Config::default())
}
