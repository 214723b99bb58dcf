//! The agent's local API (Unix socket, HTTP/1.1, one request per connection) used by
//! `twill-agent debug`, plus the tiny HTTP/1.1 responder the health and metrics servers share.
//!
//! Routes (all `GET`):
//! - `/v1/services`: programmed Service ports with frontends and endpoints (JSON);
//! - `/v1/backends`: backends in the maps and the Service ports using them (JSON);
//! - `/v1/affinity`: session-affinity entries read from the kernel (JSON);
//! - `/v1/drops`: verdict counters per reason read from the kernel (JSON);
//! - `/v1/maps`: the compiler's golden dump format of what the kernel maps hold (text), or the
//!   same as JSON with `?format=json`;
//! - `/v1/policy[?pod=NS/NAME][&format=text]`: the effective NetworkPolicy rules of local pods
//!   (JSON, or the text form of the compiler's golden per-pod views);
//! - `/v1/explain?from=…&to=…&proto=tcp|udp`: a connection's verdict from the compiled policy
//!   state, Service targets resolved to their backends (JSON);
//! - `/v1/monitor`: the denied-flow stream, one JSON object per line until the client closes
//!   (`crate::policy::monitor`).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::compile::{DumpModel, dump_view, render_dump};
pub use crate::ctview::CtRow;
use crate::lbmap::LbState;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// What one server holds at once and how long it waits for a client. Every connection costs a
/// file descriptor and a task until it ends, so without these a flood of connections, or a few
/// clients sending their request (slow loris) or taking the response byte by byte, would run
/// the agent out of descriptors (its maps, netlink and the API server need them too) and keep
/// the kubelet's probes from being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_conns: usize,
    /// Connections served at once from one client address, so one noisy client (a pod, say)
    /// cannot take every slot from the kubelet's probes and the Prometheus scraper.
    pub max_per_peer: usize,
    /// Time a client has to send its whole request head.
    pub read_timeout: Duration,
    /// Time a client has to take the whole response.
    pub write_timeout: Duration,
}

/// Limits of the TCP servers: `/healthz` and `/livez`, `/metrics`, healthCheckNodePorts. The
/// probes and scrapers they serve send their request at once and read a response of at most a
/// few hundred KiB, well within the timeouts.
pub const HTTP_LIMITS: ConnLimits = ConnLimits {
    max_conns: 256,
    max_per_peer: 16,
    read_timeout: Duration::from_secs(5),
    write_timeout: Duration::from_secs(10),
};

/// Limits of the debug API on its Unix socket (local root only; every client is one peer).
pub const API_LIMITS: ConnLimits = ConnLimits {
    max_conns: 32,
    max_per_peer: 32,
    read_timeout: Duration::from_secs(5),
    // `debug maps` of a large cluster is tens of MiB.
    write_timeout: Duration::from_mins(1),
};

/// Counts the connections a server holds, overall and per peer.
#[derive(Debug)]
struct ConnGate {
    limits: ConnLimits,
    held: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

/// One admitted connection; gives its slot back when dropped.
struct ConnSlot {
    gate: Arc<ConnGate>,
    peer: std::net::IpAddr,
}

impl ConnGate {
    fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            held: std::sync::Mutex::default(),
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (usize, std::collections::HashMap<std::net::IpAddr, usize>)>
    {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a connection from `peer`, if the limits leave one.
    fn admit(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<ConnSlot> {
        let mut held = self.lock();
        let per_peer = held.1.get(&peer).copied().unwrap_or(0);
        if held.0 >= self.limits.max_conns || per_peer >= self.limits.max_per_peer {
            return None;
        }
        held.0 += 1;
        held.1.insert(peer, per_peer + 1);
        Some(ConnSlot {
            gate: self.clone(),
            peer,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut held = self.gate.lock();
        held.0 -= 1;
        if let Some(n) = held.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.1.remove(&self.peer);
            }
        }
    }
}

/// A parsed request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
}

/// A complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes()),
        }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Parses the request line of a request head.
pub fn parse_request(head: &str) -> Option<Request> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
    })
}

/// Serves one connection: reads the request head, answers, closes. Bodies are not read (no
/// route takes one). A client gets `limits.read_timeout` for its whole request head and
/// `limits.write_timeout` for the whole response, then is dropped.
pub async fn serve_conn<S, F>(mut stream: S, limits: ConnLimits, handler: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&Request) -> Response,
{
    let Some(head) = read_head(&mut stream, limits).await else {
        return;
    };
    write_response(stream, limits, respond(&head, handler)).await;
}

/// Reads a request head within `limits.read_timeout`; `None` when the client closed, sent too
/// much or took too long (it is dropped without an answer).
async fn read_head<S>(stream: &mut S, limits: ConnLimits) -> Option<Vec<u8>>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(limits.read_timeout, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if buf.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    matches!(read, Ok(Ok(true))).then_some(buf)
}

/// The answer to a request head: the handler's for GET (and HEAD, without the body).
fn respond<F>(head: &[u8], handler: F) -> Response
where
    F: FnOnce(&Request) -> Response,
{
    match parse_request(&String::from_utf8_lossy(head)) {
        Some(req) if req.method == "GET" || req.method == "HEAD" => {
            let head_only = req.method == "HEAD";
            let mut r = handler(&req);
            if head_only {
                r.body.clear();
            }
            r
        }
        Some(_) => Response::text(405, "only GET\n"),
        None => Response::text(400, "bad request\n"),
    }
}

/// Writes `response` and closes, within `limits.write_timeout`.
async fn write_response<S>(mut stream: S, limits: ConnLimits, response: Response)
where
    S: AsyncWrite + Unpin,
{
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&response.body).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(limits.write_timeout, write)
        .await
        .is_err()
    {
        log::debug!(
            "dropped a client that did not take its response within {:?}",
            limits.write_timeout
        );
    }
}

/// Serves HTTP on a TCP listener forever, with [`HTTP_LIMITS`].
pub async fn serve_tcp<F>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(&Request) -> Response + Clone + Send + Sync + 'static,
{
    serve_tcp_with(listener, HTTP_LIMITS, handler).await;
}

/// Serves HTTP on a TCP listener forever. A connection over `limits` is closed at once: the
/// client sees a reset or an empty reply and retries, and the slots go on serving others.
pub async fn serve_tcp_with<F>(listener: tokio::net::TcpListener, limits: ConnLimits, handler: F)
where
    F: Fn(&Request) -> Response + Clone + Send + Sync + 'static,
{
    let gate = ConnGate::new(limits);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = gate.admit(peer.ip()) else {
                    drop(stream);
                    continue;
                };
                let h = handler.clone();
                tokio::spawn(async move {
                    serve_conn(stream, limits, |r| h(r)).await;
                    drop(slot);
                });
            }
            Err(e) => {
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the run loop publishes after each apply.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// What the reconciler believes the kernel maps hold.
    pub applied: LbState,
    pub model: DumpModel,
    /// The compiled NetworkPolicy state the policy maps were written from, and its inputs.
    pub policy: Arc<twill_core::policy::PolicyState>,
    pub policy_objects: Arc<crate::source::PolicyObjects>,
}

/// Reads kernel-only state (affinity entries, verdict counters) for the API.
pub trait KernelView: Send + Sync {
    fn affinity(&self) -> Result<Vec<AffinityRow>, String>;
    fn drops(&self) -> Result<Vec<DropRow>, String>;
    /// The connection-tracking entries `filter` selects.
    fn conntrack(&self, filter: &crate::ctview::CtFilter) -> Result<Vec<CtRow>, String>;
    /// The fast path's switches, counters and endpoints (`/v1/fastpath`).
    fn fastpath(&self) -> Result<twill_core::routing::fastpath::FastPathView, String> {
        Err("this view of the kernel has no fast path maps".to_owned())
    }
}

/// One session-affinity entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityRow {
    pub client_id: u64,
    pub svc_id: u32,
    pub backend_id: u32,
    /// The backend as programmed, if it still exists.
    pub backend: Option<String>,
    /// Seconds since the entry was last used.
    pub idle_s: u64,
}

/// One verdict counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRow {
    pub reason: String,
    pub drop: bool,
    pub count: u64,
}

/// One backend and who uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    pub id: u32,
    /// IPv4 or IPv6 (`BACKENDS` or `BACKENDS6`).
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub protocol: String,
    pub flags: Vec<String>,
    /// `namespace/name:port-name` of the Service ports whose backend sets hold it.
    pub services: Vec<String>,
}

/// [`KernelView`] over the maps pinned in a bpffs directory, opened per request.
pub struct PinnedKernelView {
    pub bpffs_dir: PathBuf,
}

impl KernelView for PinnedKernelView {
    fn conntrack(&self, filter: &crate::ctview::CtFilter) -> Result<Vec<CtRow>, String> {
        let table =
            crate::datapath::CtTable::open_pinned(&self.bpffs_dir).map_err(|e| err_chain(&e))?;
        let (v4, v6) = table.dump().map_err(|e| err_chain(&e))?;
        let entries = v4
            .iter()
            .map(crate::ctview::Entry::from)
            .chain(v6.iter().map(crate::ctview::Entry::from));
        Ok(crate::ctview::rows(
            entries,
            crate::datapath::monotonic_now_ns(),
            filter,
        ))
    }

    fn affinity(&self) -> Result<Vec<AffinityRow>, String> {
        let maps =
            crate::datapath::AyaLbMaps::open_pinned(&self.bpffs_dir).map_err(|e| err_chain(&e))?;
        let entries = maps.dump_affinity().map_err(|e| err_chain(&e))?;
        let backends = crate::lbmap::LbMaps::dump(&maps).map_err(|e| err_chain(&e))?;
        let now = crate::datapath::monotonic_now_ns();
        let mut rows: Vec<AffinityRow> = entries
            .into_iter()
            .map(|(k, v)| AffinityRow {
                client_id: k.client_id,
                svc_id: k.svc_id,
                backend_id: v.backend_id,
                backend: backends
                    .backend(v.backend_id)
                    .map(|b| std::net::SocketAddr::new(b.addr(), b.port()).to_string()),
                idle_s: now.saturating_sub(v.last_used_ns) / 1_000_000_000,
            })
            .collect();
        rows.sort_by_key(|r| (r.svc_id, r.client_id));
        Ok(rows)
    }

    fn fastpath(&self) -> Result<twill_core::routing::fastpath::FastPathView, String> {
        let lb =
            crate::datapath::AyaLbMaps::open_pinned(&self.bpffs_dir).map_err(|e| err_chain(&e))?;
        let stats = lb.stats().map_err(|e| err_chain(&e))?;
        let counters = stats
            .into_iter()
            .filter(|(r, _)| r.is_fast_path())
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        let fp = crate::datapath::AyaFastPathMaps::open_pinned(&self.bpffs_dir)
            .map_err(|e| err_chain(&e))?;
        let config = fp.config().map_err(|e| err_chain(&e))?;
        let endpoints = fp.endpoints().map_err(|e| err_chain(&e))?;
        Ok(twill_core::routing::fastpath::FastPathView::new(
            config, counters, &endpoints,
        ))
    }

    fn drops(&self) -> Result<Vec<DropRow>, String> {
        let maps =
            crate::datapath::AyaLbMaps::open_pinned(&self.bpffs_dir).map_err(|e| err_chain(&e))?;
        let stats = maps.stats().map_err(|e| err_chain(&e))?;
        Ok(stats
            .into_iter()
            .map(|(r, count)| DropRow {
                reason: r.name().to_owned(),
                drop: r.is_drop(),
                count,
            })
            .collect())
    }
}

fn err_chain(e: &dyn std::error::Error) -> String {
    crate::source::manifests::error_chain(e)
}

/// Shared state of the API server.
#[derive(Clone)]
pub struct ApiState {
    pub published: Arc<RwLock<Published>>,
    pub kernel: Arc<dyn KernelView>,
    /// The DNS table's publisher (`/v1/dns`); `None` in tests without one.
    pub dns: Option<Arc<crate::dns::DnsResponder>>,
    /// The denied-flow stream (`/v1/monitor`); `None` in tests without one.
    pub monitor: Option<Arc<crate::policy::monitor::MonitorHub>>,
}

impl ApiState {
    fn published(&self) -> Published {
        self.published
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Routes one request.
    pub fn handle(&self, req: &Request) -> Response {
        match req.path.as_str() {
            "/v1/services" => {
                let p = self.published();
                Response::json(200, &dump_view(&p.applied, &p.model).services)
            }
            "/v1/backends" => Response::json(200, &backend_rows(&self.published())),
            "/v1/affinity" => match self.kernel.affinity() {
                Ok(rows) => Response::json(200, &rows),
                Err(e) => Response::text(500, format!("{e}\n")),
            },
            "/v1/drops" => match self.kernel.drops() {
                Ok(rows) => Response::json(200, &rows),
                Err(e) => Response::text(500, format!("{e}\n")),
            },
            "/v1/fastpath" => match self.kernel.fastpath() {
                Ok(view) if query_value(&req.query, "format") == Some("text") => {
                    Response::text(200, view.render())
                }
                Ok(view) => Response::json(200, &view),
                Err(e) => Response::text(500, format!("{e}\n")),
            },
            "/v1/policy" => {
                let p = self.published();
                let only = query_value(&req.query, "pod").and_then(|v| v.split_once('/'));
                let views: Vec<_> = twill_core::policy::pod_views(&p.policy.maps, &p.policy)
                    .into_iter()
                    .filter(|v| only.is_none_or(|(ns, n)| v.namespace == ns && v.name == n))
                    .collect();
                if query_value(&req.query, "format") == Some("text") {
                    Response::text(200, twill_core::policy::render_pod_views(&views))
                } else {
                    Response::json(200, &views)
                }
            }
            "/v1/explain" => explain(&self.published(), &req.query),
            "/v1/conntrack" => match conntrack_filter(&self.published(), &req.query) {
                Err(resp) => resp,
                Ok(filter) => match self.kernel.conntrack(&filter) {
                    Ok(rows) => Response::json(200, &rows),
                    Err(e) => Response::text(500, format!("{e}\n")),
                },
            },
            "/v1/dns" => match (&self.dns, query_value(&req.query, "name")) {
                (_, None) => Response::text(400, "dns needs name=\n"),
                (None, _) => Response::not_found(),
                (Some(dns), Some(name)) => {
                    let qtype = query_value(&req.query, "type").unwrap_or("A");
                    Response::json(200, &dns.debug(name, qtype))
                }
            },
            "/v1/maps" => {
                let p = self.published();
                if req.query.split('&').any(|q| q == "format=json") {
                    Response::json(200, &dump_view(&p.applied, &p.model))
                } else {
                    Response::text(200, render_dump(&p.applied, &p.model))
                }
            }
            _ => Response::not_found(),
        }
    }
}

/// The value of `key` in a query string (`a=1&b=2`); values are sent unencoded (names and
/// addresses need no escaping).
fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// The `/v1/conntrack` filter: `service=NS/NAME` (its frontends' ids in the applied state) and
/// `backend=IP`.
fn conntrack_filter(p: &Published, query: &str) -> Result<crate::ctview::CtFilter, Response> {
    let mut filter = crate::ctview::CtFilter::default();
    if let Some(svc) = query_value(query, "service").filter(|v| !v.is_empty()) {
        let Some((ns, name)) = svc.split_once('/') else {
            return Err(Response::text(
                400,
                format!("service {svc:?}: expected NAMESPACE/NAME\n"),
            ));
        };
        let ports: Vec<_> = p
            .model
            .services
            .iter()
            .filter(|sp| &*sp.namespace == ns && &*sp.name == name)
            .collect();
        if ports.is_empty() {
            return Err(Response::text(
                404,
                format!("no Service {ns}/{name} is programmed\n"),
            ));
        }
        filter.svc_ids = Some(
            ports
                .iter()
                .flat_map(|sp| &sp.frontends)
                .filter_map(|fe| p.applied.frontend(&fe.key).map(|v| v.svc_id))
                .collect(),
        );
    }
    if let Some(ip) = query_value(query, "backend").filter(|v| !v.is_empty()) {
        filter.backend = Some(ip.parse().map_err(|_| {
            Response::text(400, format!("backend {ip:?}: expected an IP address\n"))
        })?);
    }
    Ok(filter)
}

fn explain(p: &Published, query: &str) -> Response {
    let (Some(from), Some(to)) = (query_value(query, "from"), query_value(query, "to")) else {
        return Response::text(400, "explain needs from= and to=\n");
    };
    let proto = query_value(query, "proto").unwrap_or("tcp");
    let Some(proto) = crate::policy::explain::parse_proto(proto) else {
        return Response::text(
            400,
            format!("unknown protocol {proto:?} (tcp, udp, sctp)\n"),
        );
    };
    let inputs = crate::policy::explain::ExplainInputs {
        state: &p.policy,
        objects: &p.policy_objects,
        lb: &p.applied,
        model: &p.model,
    };
    let q = crate::policy::explain::ExplainQuery {
        from: from.to_owned(),
        to: to.to_owned(),
        proto,
    };
    match inputs.explain(&q) {
        Ok(e) if query_value(query, "format") == Some("text") => Response::text(200, e.render()),
        Ok(e) => Response::json(200, &e),
        Err(e) => Response::text(400, format!("{e}\n")),
    }
}

/// Backends of the applied state, with the Service ports that use them.
pub fn backend_rows(p: &Published) -> Vec<BackendRow> {
    // svc_id → Service port names, through the frontends of the model.
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for sp in &p.model.services {
        let label = format!(
            "{}/{}:{}",
            sp.namespace,
            sp.name,
            if sp.port_name.is_empty() {
                "-"
            } else {
                &sp.port_name
            }
        );
        for fe in &sp.frontends {
            if let Some(v) = p.applied.frontend(&fe.key) {
                let names = users.entry(v.svc_id).or_default();
                if !names.contains(&label) {
                    names.push(label.clone());
                }
            }
        }
    }
    let mut by_backend: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (slot, backend_id) in &p.applied.slots {
        for name in users.get(&slot.svc_id).into_iter().flatten() {
            let v = by_backend.entry(*backend_id).or_default();
            if !v.contains(name) {
                v.push(name.clone());
            }
        }
    }
    p.applied
        .backends
        .keys()
        .chain(p.applied.backends6.keys())
        .filter_map(|id| Some((id, p.applied.backend(*id)?)))
        .map(|(id, b)| {
            let mut flags = Vec::new();
            if b.flags() & twill_common::BE_F_LOCAL != 0 {
                flags.push("local".to_owned());
            }
            if b.flags() & twill_common::BE_F_TERMINATING != 0 {
                flags.push("terminating".to_owned());
            }
            BackendRow {
                id: *id,
                addr: b.addr(),
                port: b.port(),
                protocol: match b.proto() {
                    twill_common::PROTO_TCP => "TCP".into(),
                    twill_common::PROTO_UDP => "UDP".into(),
                    twill_common::PROTO_SCTP => "SCTP".into(),
                    other => other.to_string(),
                },
                flags,
                services: by_backend.remove(id).unwrap_or_default(),
            }
        })
        .collect()
}

/// Binds the API socket (replacing a stale one) and serves it forever.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Root-only: the API shows the cluster's Services and the kernel's state.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve_unix(listener: tokio::net::UnixListener, state: ApiState) {
    let gate = ConnGate::new(API_LIMITS);
    let local = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(slot) = gate.admit(local) else {
                    drop(stream);
                    continue;
                };
                let s = state.clone();
                tokio::spawn(async move {
                    serve_api_conn(stream, &s).await;
                    drop(slot);
                });
            }
            Err(e) => {
                log::warn!("api socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One API connection: the monitor stream holds it open, every other route answers once.
async fn serve_api_conn(mut stream: tokio::net::UnixStream, state: &ApiState) {
    let Some(head) = read_head(&mut stream, API_LIMITS).await else {
        return;
    };
    let req = parse_request(&String::from_utf8_lossy(&head));
    if let (Some(req), Some(hub)) = (&req, &state.monitor)
        && req.method == "GET"
        && req.path == "/v1/monitor"
    {
        crate::policy::monitor::stream(stream, hub.subscribe(), API_LIMITS.write_timeout).await;
        return;
    }
    write_response(stream, API_LIMITS, respond(&head, |r| state.handle(r))).await;
}

/// Client side: `GET path` over the Unix socket; (status, body).
pub async fn get(socket: &Path, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: twill-agent\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the agent did not answer within 30 s",
            )
        })??;
    parse_response(&buf).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

/// Splits a raw `Connection: close` response into status and body.
pub fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /` from `src` (a loopback address) to `to`: the status, or `None` when the server
    /// closed the connection without answering.
    async fn get_from(src: Ipv4Addr, to: std::net::SocketAddr) -> Option<u16> {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((src, 0).into()).unwrap();
        let mut s = sock.connect(to).await.ok()?;
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        parse_response(&buf).map(|(status, _)| status)
    }

    async fn server(limits: ConnLimits, body_len: usize) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_tcp_with(l, limits, move |_| Response {
            status: 200,
            content_type: "text/plain",
            body: vec![b'x'; body_len],
        }));
        addr
    }

    /// A client holding every slot it may have (idle connections that never send a request)
    /// is turned away beyond them; another client is still served, and once the idle ones time
    /// out their slots serve again.
    #[tokio::test]
    async fn one_client_cannot_take_every_connection_slot() {
        let limits = ConnLimits {
            max_conns: 8,
            max_per_peer: 3,
            read_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(1),
        };
        let addr = server(limits, 10).await;
        let flooder = Ipv4Addr::LOCALHOST;
        let mut idle = Vec::new();
        for _ in 0..limits.max_per_peer {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them before the next ones arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get_from(flooder, addr).await, None, "over its share");
        assert_eq!(get_from(Ipv4Addr::new(127, 0, 0, 2), addr).await, Some(200));
        tokio::time::sleep(limits.read_timeout + Duration::from_millis(200)).await;
        assert_eq!(get_from(flooder, addr).await, Some(200), "slots came back");
        drop(idle);
    }

    /// Slow loris (a request head sent a byte at a time) and a client that never reads its
    /// response are dropped after their timeouts; the only slot then serves the next client.
    #[tokio::test]
    async fn slow_clients_are_dropped_after_their_timeouts() {
        let limits = ConnLimits {
            max_conns: 1,
            max_per_peer: 1,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
        };
        // Larger than any socket buffer: the server's write blocks on a client not reading.
        let addr = server(limits, 32 << 20).await;
        let started = std::time::Instant::now();
        let mut loris = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut dropped = false;
        for b in b"GET / HTTP/1.1\r\nX-Slow: 1111111111111111111111111111\r\n" {
            if loris.write_all(&[*b]).await.is_err() {
                dropped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut rest = Vec::new();
        let _ = loris.read_to_end(&mut rest).await;
        assert!(dropped || rest.is_empty(), "the slow request got an answer");
        assert!(started.elapsed() < Duration::from_secs(3));

        let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
        reader.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // Never read: the server's write times out and it drops the connection.
        tokio::time::sleep(limits.write_timeout + Duration::from_millis(300)).await;
        let status = get_from(Ipv4Addr::new(127, 0, 0, 3), addr).await;
        assert_eq!(status, Some(200), "the slot was freed");
        drop(reader);
    }

    struct NoKernel;
    impl KernelView for NoKernel {
        fn affinity(&self) -> Result<Vec<AffinityRow>, String> {
            Ok(vec![AffinityRow {
                client_id: 1,
                svc_id: 2,
                backend_id: 3,
                backend: None,
                idle_s: 4,
            }])
        }
        fn drops(&self) -> Result<Vec<DropRow>, String> {
            Err("no kernel".into())
        }
        fn conntrack(&self, filter: &crate::ctview::CtFilter) -> Result<Vec<CtRow>, String> {
            // Echoes the filter it was given, so the test sees what the route parsed.
            Ok(vec![CtRow {
                scope: "nat".into(),
                protocol: "udp".into(),
                direction: "original".into(),
                source: format!("{:?}", filter.svc_ids),
                destination: format!("{:?}", filter.backend),
                rewritten_source: String::new(),
                rewritten_destination: String::new(),
                backend: None,
                svc_id: 0,
                state: "new".into(),
                snat: false,
                idle_s: 0,
                expires_in_s: 0,
            }])
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request("GET /v1/maps?format=json HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Request {
                method: "GET".into(),
                path: "/v1/maps".into(),
                query: "format=json".into()
            })
        );
        assert_eq!(parse_request("GET /\r\n"), None);
        assert_eq!(parse_request(""), None);
    }

    #[tokio::test]
    async fn unix_socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/agent.sock");
        let state = ApiState {
            published: Arc::default(),
            kernel: Arc::new(NoKernel),
            dns: None,
            monitor: None,
        };
        let task = tokio::spawn(serve_unix(bind(&sock).unwrap(), state));
        let (status, body) = get(&sock, "/v1/services").await.unwrap();
        assert_eq!((status, body.as_slice()), (200, b"[]".as_slice()));
        let (status, body) = get(&sock, "/v1/affinity").await.unwrap();
        assert_eq!(status, 200);
        let rows: Vec<AffinityRow> = serde_json::from_slice(&body).unwrap();
        assert_eq!(rows[0].backend_id, 3);
        let (status, body) = get(&sock, "/v1/drops").await.unwrap();
        assert_eq!(
            (status, String::from_utf8(body).unwrap()),
            (500, "no kernel\n".into())
        );
        assert_eq!(get(&sock, "/nope").await.unwrap().0, 404);
        let (status, body) = get(&sock, "/v1/conntrack?backend=10.244.0.5")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let rows: Vec<CtRow> = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (rows[0].source.as_str(), rows[0].destination.as_str()),
            ("None", "Some(10.244.0.5)")
        );
        assert_eq!(
            get(&sock, "/v1/conntrack?backend=nope").await.unwrap().0,
            400
        );
        // No Service is programmed in this state.
        assert_eq!(
            get(&sock, "/v1/conntrack?service=default/web")
                .await
                .unwrap()
                .0,
            404
        );
        assert_eq!(
            get(&sock, "/v1/conntrack?service=web").await.unwrap().0,
            400
        );
        let (status, _) = get(&sock, "/v1/maps").await.unwrap();
        assert_eq!(status, 200);
        task.abort();
    }

    /// `/v1/monitor` holds the connection open and streams what the hub publishes.
    #[tokio::test]
    async fn monitor_streams_over_the_unix_socket() {
        use crate::policy::monitor::{LostCause, MonitorHub, MonitorLine};
        use tokio::io::AsyncBufReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let hub = Arc::new(MonitorHub::default());
        let state = ApiState {
            published: Arc::default(),
            kernel: Arc::new(NoKernel),
            dns: None,
            monitor: Some(hub.clone()),
        };
        let task = tokio::spawn(serve_unix(bind(&sock).unwrap(), state));
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"GET /v1/monitor HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut lines = tokio::io::BufReader::new(s).lines();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        while !lines.next_line().await.unwrap().unwrap().is_empty() {}
        let sent = MonitorLine::Lost {
            count: 7,
            cause: LostCause::RateLimit,
        };
        // The head is written once the stream subscribed: what is published now arrives.
        hub.publish(sent.clone());
        let got = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::from_str::<MonitorLine>(&got).unwrap(), sent);
        task.abort();
    }
}
