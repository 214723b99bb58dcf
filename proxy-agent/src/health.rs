//! kube-proxy compatible health (`pkg/proxy/healthcheck` in kubernetes/kubernetes):
//! - `/healthz` on `--healthz-bind-address`: `{lastUpdated, currentTime, nodeEligible}`, 200 when
//!   programming is fresh and the node is not being deleted, else 503;
//! - `/livez`: the same without the node check (a node being drained must not get its proxy
//!   restarted by the liveness probe);
//! - one server per `healthCheckNodePort` (externalTrafficPolicy Local): `{"service":{…},
//!   "localEndpoints":N,"serviceProxyHealthy":…}`, 200 when N > 0, so external load balancers
//!   only send to nodes with local endpoints.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use crate::api::{Request, Response};
use crate::compile::HealthCheck;
use crate::source::Stores;

/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// JSON body of `/healthz` and `/livez` (kube-proxy's field names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub last_updated: String,
    pub current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
}

/// Whether this node should receive traffic from load balancers: not being deleted and not
/// marked for deletion by the cluster autoscaler. An unknown Node counts as eligible.
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else { return true };
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    !tainted
}

/// Programming is healthy when nothing waits to be applied, or the oldest pending change is
/// younger than `stale_after`; never before the first successful apply.
pub fn programming_healthy(
    applied_once: bool,
    pending_for: Option<Duration>,
    stale_after: Duration,
) -> bool {
    applied_once && pending_for.is_none_or(|p| p < stale_after)
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// Status code and body of `/healthz` (`check_node`) or `/livez`.
pub fn evaluate(
    now: SystemTime,
    last_updated: Option<SystemTime>,
    pending_for: Option<Duration>,
    stale_after: Duration,
    eligible: bool,
    check_node: bool,
) -> (u16, HealthBody) {
    let healthy = programming_healthy(last_updated.is_some(), pending_for, stale_after);
    let ok = healthy && (!check_node || eligible);
    let body = HealthBody {
        // kube-proxy reports the zero time before the first update.
        last_updated: last_updated.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
        current_time: rfc3339(now),
        node_eligible: check_node.then_some(eligible),
    };
    (if ok { 200 } else { 503 }, body)
}

/// Health state shared by the run loop (writer) and the servers (readers).
#[derive(Debug)]
pub struct Health {
    stores: Arc<Stores>,
    stale_after: Duration,
    last_updated: Mutex<Option<SystemTime>>,
    eligible: AtomicBool,
}

impl Health {
    /// `stale_after`: how long a change may wait before `/healthz` fails (2 × sync period).
    pub fn new(stores: Arc<Stores>, stale_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            stores,
            stale_after,
            last_updated: Mutex::new(None),
            eligible: AtomicBool::new(true),
        })
    }

    /// Records a successful apply.
    pub fn updated(&self) {
        *self
            .last_updated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(SystemTime::now());
    }

    pub fn set_node(&self, node: Option<&Node>) {
        self.eligible.store(node_eligible(node), Ordering::Relaxed);
    }

    fn evaluate(&self, check_node: bool) -> (u16, HealthBody) {
        let last = *self
            .last_updated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pending_for = self
            .stores
            .pending_since()
            .map(|t| Instant::now().saturating_duration_since(t));
        evaluate(
            SystemTime::now(),
            last,
            pending_for,
            self.stale_after,
            self.eligible.load(Ordering::Relaxed),
            check_node,
        )
    }

    /// Whether programming is healthy (the `serviceProxyHealthy` of health check node ports).
    pub fn proxy_healthy(&self) -> bool {
        self.evaluate(false).0 == 200
    }

    /// Handler of the `--healthz-bind-address` server.
    pub fn handle(&self, req: &Request) -> Response {
        let check_node = match req.path.as_str() {
            "/healthz" => true,
            "/livez" => false,
            _ => return Response::not_found(),
        };
        let (status, body) = self.evaluate(check_node);
        Response::json(status, &body)
    }
}

/// Body of a health check node port answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealthBody {
    pub service: ServiceName,
    pub local_endpoints: usize,
    pub service_proxy_healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// Answer of a health check node port for `check`.
pub fn service_health(check: &HealthCheck, proxy_healthy: bool) -> Response {
    let body = ServiceHealthBody {
        service: ServiceName {
            namespace: check.namespace.clone(),
            name: check.name.clone(),
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    Response::json(if check.local_endpoints > 0 { 200 } else { 503 }, &body)
}

/// The per-Service health check node port listeners.
pub struct HealthCheckServers {
    health: Arc<Health>,
    bind_ip: Ipv4Addr,
    current: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    tasks: BTreeMap<u16, tokio::task::JoinHandle<()>>,
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>, bind_ip: Ipv4Addr) -> Self {
        Self {
            health,
            bind_ip,
            current: Arc::default(),
            tasks: BTreeMap::new(),
        }
    }

    /// Ports currently listened on.
    pub fn ports(&self) -> Vec<u16> {
        self.tasks.keys().copied().collect()
    }

    /// Makes the listeners match `checks`: opens new ports, closes ports no longer needed and
    /// updates the answers of the others. A port that cannot be bound is logged and retried on
    /// the next update.
    pub fn update(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, HealthCheck> =
            checks.iter().map(|c| (c.node_port, c.clone())).collect();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted.clone();
        self.tasks.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for port in wanted.keys() {
            if self.tasks.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from((self.bind_ip, *port));
            let std_listener = match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    log::warn!("health check node port {addr}: {e}");
                    continue;
                }
            };
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                continue;
            };
            let current = self.current.clone();
            let health = self.health.clone();
            let port = *port;
            let handler = move |req: &Request| {
                if req.path != "/" && req.path != "/healthz" {
                    return Response::not_found();
                }
                let check = current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&port)
                    .cloned();
                match check {
                    Some(c) => service_health(&c, health.proxy_healthy()),
                    None => Response::not_found(),
                }
            };
            log::info!("serving health check node port {addr}");
            self.tasks
                .insert(port, tokio::spawn(crate::api::serve_tcp(listener, handler)));
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    const STALE: Duration = Duration::from_mins(1);

    #[test]
    fn healthy_when_fresh_and_node_eligible() {
        let now = SystemTime::now();
        let (code, body) = evaluate(now, Some(now), None, STALE, true, true);
        assert_eq!(code, 200);
        assert_eq!(body.node_eligible, Some(true));
        let json = serde_json::to_value(&body).unwrap();
        assert!(json["lastUpdated"].as_str().unwrap().ends_with('Z'));
        assert!(json.get("currentTime").is_some());
    }

    #[test]
    fn stale_programming_is_503_on_both_endpoints() {
        let now = SystemTime::now();
        assert_eq!(
            evaluate(
                now,
                Some(now),
                Some(Duration::from_secs(61)),
                STALE,
                true,
                true
            )
            .0,
            503
        );
        assert_eq!(
            evaluate(
                now,
                Some(now),
                Some(Duration::from_secs(61)),
                STALE,
                true,
                false
            )
            .0,
            503
        );
        // Pending but young: fine.
        assert_eq!(
            evaluate(
                now,
                Some(now),
                Some(Duration::from_secs(1)),
                STALE,
                true,
                true
            )
            .0,
            200
        );
        // Never applied: not ready yet.
        let (code, body) = evaluate(now, None, None, STALE, true, true);
        assert_eq!(code, 503);
        assert_eq!(body.last_updated, "0001-01-01T00:00:00Z");
    }

    #[test]
    fn node_being_deleted_fails_healthz_but_not_livez() {
        let mut node = Node::default();
        node.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!node_eligible(Some(&node)));
        let now = SystemTime::now();
        assert_eq!(evaluate(now, Some(now), None, STALE, false, true).0, 503);
        let (code, body) = evaluate(now, Some(now), None, STALE, false, false);
        assert_eq!((code, body.node_eligible), (200, None));

        let tainted = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: TAINT_TO_BE_DELETED.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        assert!(!node_eligible(Some(&tainted)));
        assert!(node_eligible(Some(&Node::default())));
        assert!(node_eligible(None));
    }

    #[test]
    fn service_health_answers() {
        let mut c = HealthCheck {
            namespace: "ns".into(),
            name: "lb".into(),
            node_port: 32000,
            local_endpoints: 2,
        };
        let r = service_health(&c, true);
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service":{"namespace":"ns","name":"lb"},"localEndpoints":2,"serviceProxyHealthy":true})
        );
        c.local_endpoints = 0;
        assert_eq!(service_health(&c, true).status, 503);
    }

    #[tokio::test]
    async fn health_check_node_port_listeners_follow_updates() {
        let stores = Stores::new();
        let health = Health::new(stores, STALE);
        health.updated();
        let mut servers = HealthCheckServers::new(health, Ipv4Addr::LOCALHOST);
        // Find a free port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let check = HealthCheck {
            namespace: "ns".into(),
            name: "lb".into(),
            node_port: port,
            local_endpoints: 1,
        };
        servers.update(std::slice::from_ref(&check));
        assert_eq!(servers.ports(), vec![port]);
        let (status, body) = http_get(port).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"localEndpoints\":1"), "{body}");
        servers.update(&[HealthCheck {
            local_endpoints: 0,
            ..check
        }]);
        assert_eq!(http_get(port).await.0, 503);
        servers.update(&[]);
        assert!(servers.ports().is_empty());
    }

    async fn http_get(port: u16) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let (status, body) = crate::api::parse_response(&buf).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}
