//! The Kubernetes source against an in-process fake API server that speaks the real list/watch
//! protocol over HTTP: lists carry a `resourceVersion`, watches stream `ADDED`/`MODIFIED`/
//! `DELETED`/`BOOKMARK` events (chunked), and an `ERROR` event with code 410 (Gone) forces the
//! client to relist. kube-rs's own client and watcher talk to it.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twill_agent::metrics::Metrics;
use twill_agent::source::{Kind, Stores};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const NETPOLS: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// One resource collection of the fake API server.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// Every event with its resourceVersion, for watches that start from an older version.
    history: Vec<(u64, Value)>,
    /// Watches from versions below this get 410 Gone (the "compacted" history).
    min_rv: u64,
    watchers: Vec<mpsc::UnboundedSender<Value>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: BTreeMap<&'static str, Collection>,
    /// Requests seen, for assertions on the protocol (`path?query`).
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

fn key(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl FakeApi {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// Applies a change and sends it to the live watches. `silent`: change the stored objects
    /// without any event (what a client misses while its watch is broken).
    fn event(&self, path: &'static str, kind: &str, mut obj: Value, silent: bool) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = st.collections.entry(path).or_default();
        if kind == "DELETED" {
            c.objects.remove(&key(&obj));
        } else {
            c.objects.insert(key(&obj), obj.clone());
        }
        if silent {
            return;
        }
        let ev = json!({"type": kind, "object": obj});
        c.history.push((rv, ev.clone()));
        c.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    fn bookmark(&self, path: &'static str, api_version: &str, kind: &str) {
        let mut st = self.lock();
        let rv = st.rv.to_string();
        let c = st.collections.entry(path).or_default();
        let ev = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}}});
        c.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    /// Compacts the history: live watches get `410 Gone` and end; watches from older versions
    /// are refused the same way, so the client must relist.
    fn expire(&self, path: &'static str) {
        let mut st = self.lock();
        let rv = st.rv;
        let c = st.collections.entry(path).or_default();
        c.min_rv = rv + 1;
        c.history.clear();
        for w in c.watchers.drain(..) {
            let _ = w.send(gone());
        }
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move { me.conn(stream).await });
        }
    }

    async fn conn(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        self.lock().requests.push(target.clone());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let Some(path) = [SERVICES, SLICES, NODES, PODS, NAMESPACES, NETPOLS]
            .into_iter()
            .find(|p| *p == path)
        else {
            let body = json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":404,"reason":"NotFound"}).to_string();
            let _ = stream
                .write_all(format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                .await;
            return;
        };
        if params.get("watch") == Some(&"true") {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.watch(stream, path, from).await;
        } else {
            let body = {
                let st = self.lock();
                let items: Vec<Value> = st
                    .collections
                    .get(path)
                    .map(|c| c.objects.values().cloned().collect())
                    .unwrap_or_default();
                let kind = match path {
                    SERVICES => "ServiceList",
                    SLICES => "EndpointSliceList",
                    PODS => "PodList",
                    NAMESPACES => "NamespaceList",
                    NETPOLS => "NetworkPolicyList",
                    _ => "NodeList",
                };
                let api = match path {
                    SLICES => "discovery.k8s.io/v1",
                    NETPOLS => "networking.k8s.io/v1",
                    _ => "v1",
                };
                json!({"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}).to_string()
            };
            let _ = stream
                .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                .await;
        }
    }

    async fn watch(self, mut stream: TcpStream, path: &'static str, from: u64) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        {
            let mut st = self.lock();
            let c = st.collections.entry(path).or_default();
            if from < c.min_rv {
                let _ = tx.send(gone());
            } else {
                for (rv, ev) in &c.history {
                    if *rv > from {
                        let _ = tx.send(ev.clone());
                    }
                }
                c.watchers.push(tx);
            }
        }
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let line = format!("{ev}\n");
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            if ev["type"] == "ERROR" {
                break;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

fn svc(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}})
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service_ips(stores: &Stores) -> BTreeMap<String, String> {
    stores
        .snapshot()
        .services
        .iter()
        .map(|((_, name), s)| {
            (
                name.to_string(),
                s.parsed()
                    .and_then(|s| s.cluster_ips.first())
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one protocol scenario, step by step")]
async fn list_watch_bookmark_and_relist_after_410() {
    let api = FakeApi::default();
    api.event(SERVICES, "ADDED", svc("a", "10.96.0.1"), false);
    api.event(
        NODES,
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.244.1.0/24"]}}),
        false,
    );
    api.event(SLICES, "ADDED", json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "a-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "a"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}]}), false);
    api.event(
        PODS,
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]}}),
        false,
    );
    api.event(
        NAMESPACES,
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"team": "a"}}}),
        false,
    );
    api.event(
        NETPOLS,
        "ADDED",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
        false,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api.clone().serve(listener));

    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let stores = Stores::new();
    let metrics = Arc::new(Metrics::new());
    let tasks = twill_agent::source::kube::spawn(&client, &stores, &metrics);

    // First sync: every kind listed.
    assert!(
        stores.wait_synced(Duration::from_secs(10)).await,
        "not synced; requests: {:?}",
        api.requests()
    );
    let snap = stores.snapshot();
    assert_eq!(
        service_ips(&stores),
        BTreeMap::from([("a".into(), "10.96.0.1".into())])
    );
    assert_eq!(snap.endpoint_slices.len(), 1);
    assert!(snap.node("n1").is_some());
    // NetworkPolicy's inputs, in their compact forms.
    let pod = &snap.policy.pods[&("default".into(), "web".into())];
    assert_eq!(pod.ip, Some("10.244.1.5".parse().unwrap()));
    assert_eq!(pod.labels["app"], "web");
    assert_eq!(
        snap.policy.namespaces[&("".into(), "default".into())].labels["team"],
        "a"
    );
    assert!(
        snap.policy.policies[&("default".into(), "deny".into())].isolates_ingress,
        "the policy parsed"
    );
    // The client listed, then watched from the list's version.
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with(SERVICES) && !r.contains("watch=true")),
        "{reqs:?}"
    );
    eventually("a services watch", || {
        api.requests()
            .iter()
            .any(|r| r.starts_with(SERVICES) && r.contains("watch=true"))
    })
    .await;

    // ADDED, MODIFIED, DELETED through the watch.
    api.event(SERVICES, "ADDED", svc("b", "10.96.0.2"), false);
    eventually("b added", || service_ips(&stores).contains_key("b")).await;
    api.event(SERVICES, "MODIFIED", svc("a", "10.96.0.9"), false);
    eventually("a modified", || {
        service_ips(&stores).get("a").map(String::as_str) == Some("10.96.0.9")
    })
    .await;
    api.event(SERVICES, "DELETED", svc("b", "10.96.0.2"), false);
    eventually("b deleted", || !service_ips(&stores).contains_key("b")).await;

    // A bookmark changes nothing and is not an error.
    let generation = stores.generation();
    api.bookmark(SERVICES, "v1", "Service");
    api.event(SERVICES, "ADDED", svc("c", "10.96.0.3"), false);
    eventually("c added after the bookmark", || {
        service_ips(&stores).contains_key("c")
    })
    .await;
    assert_eq!(
        stores.generation(),
        generation + 1,
        "the bookmark must not change the store"
    );
    assert!(
        !metrics
            .render()
            .contains("twill_source_errors_total{kind=\"Service\"}")
    );

    // Changes the client misses, then 410 Gone: the relist replaces the store's contents.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.starts_with(SERVICES) && !r.contains("watch=true"))
        .count();
    api.event(SERVICES, "DELETED", svc("a", ""), true);
    api.event(SERVICES, "ADDED", svc("d", "10.96.0.4"), true);
    api.expire(SERVICES);
    eventually("relisted state", || {
        service_ips(&stores)
            == BTreeMap::from([
                ("c".into(), "10.96.0.3".into()),
                ("d".into(), "10.96.0.4".into()),
            ])
    })
    .await;
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.starts_with(SERVICES) && !r.contains("watch=true"))
        .count();
    assert!(lists_after > lists_before, "no relist after 410");
    assert!(
        metrics
            .render()
            .contains("twill_source_errors_total{kind=\"Service\"}"),
        "{}",
        metrics.render()
    );

    // The watch resumes after the relist.
    api.event(SERVICES, "ADDED", svc("e", "10.96.0.5"), false);
    eventually("e added after the relist", || {
        service_ips(&stores).contains_key("e")
    })
    .await;

    // Dual-stack objects arrive whole: a ClusterIP per family, an IPv6 EndpointSlice.
    api.event(
        SERVICES,
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "ds", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.6", "clusterIPs": ["10.96.0.6", "fd00:10:96::6"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"port": 80, "protocol": "TCP"}]}}),
        false,
    );
    api.event(SLICES, "ADDED", json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "ds-v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "ds"}},
        "addressType": "IPv6", "endpoints": [{"addresses": ["fd00:244:1::5"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}]}), false);
    eventually("the dual-stack Service and its IPv6 slice", || {
        let snap = stores.snapshot();
        let ips = snap
            .services
            .iter()
            .find(|((_, n), _)| &**n == "ds")
            .and_then(|(_, s)| s.parsed().map(|p| p.cluster_ips.clone()));
        let family = snap
            .endpoint_slices
            .iter()
            .find(|((_, n), _)| &**n == "ds-v6")
            .and_then(|(_, s)| s.parsed(&mut Vec::new()).map(|p| p.family));
        ips == Some(vec![
            "10.96.0.6".parse().unwrap(),
            "fd00:10:96::6".parse().unwrap(),
        ]) && family == Some(twill_core::family::IpFamily::V6)
    })
    .await;

    // An object without a namespace is skipped and counted.
    api.event(
        SERVICES,
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nons"}}),
        false,
    );
    eventually("invalid object counted", || {
        metrics.render().contains(
            "twill_invalid_objects_total{kind=\"Service\",reason=\"missing_namespace\"} 1",
        )
    })
    .await;
    assert!(!service_ips(&stores).contains_key("nons"));
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn unreachable_api_never_syncs_and_counts_errors() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://127.0.0.1:{port}").parse().unwrap(),
    ))
    .unwrap();
    let stores = Stores::new();
    let metrics = Arc::new(Metrics::new());
    let tasks = twill_agent::source::kube::spawn(&client, &stores, &metrics);
    assert!(
        !stores.wait_synced(Duration::from_millis(1500)).await,
        "synced without an API server"
    );
    assert!(!stores.is_synced());
    assert!(
        metrics
            .render()
            .contains("twill_source_errors_total{kind=\"Node\"}")
    );
    let _ = Kind::Node;
    for t in tasks {
        t.abort();
    }
}
