//! `twill-agent run`: start-up, the level-triggered run loop and shutdown.
//!
//! Start-up: preflight checks → bind the health, metrics and API servers → load the datapath
//! (adopting pinned maps) and attach it to the cgroup root → adopt what the maps hold → start the
//! source → wait (bounded) for its first full sync → apply with prune.
//!
//! Run loop: sources only mark the stores dirty; one task wakes up, waits a few milliseconds to
//! coalesce a burst of changes, recompiles the Services the stores marked dirty and applies the
//! difference through the reconciler (both in time proportional to the change). Failed applies are retried with a capped backoff; a periodic resync applies
//! again even without changes (repairing anything that changed the maps behind our back).
//!
//! NetworkPolicy rides the same loop: after the Service apply, the policy state is recompiled
//! when a Pod, Namespace or NetworkPolicy changed and applied through its own reconciler; pod
//! veth events (and the periodic resync) bring the policy programs onto new pods' veths.
//!
//! SIGTERM/SIGINT: stop serving and exit, leaving pinned maps and links in place so traffic keeps
//! flowing until the next agent adopts them.
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::api::{ApiState, PinnedKernelView, Published};
use crate::compile::{CompileConfig, Compiler, IdAllocation};
use crate::config::{Config, SourceConfig};
use crate::datapath::{AyaLbMaps, CtTable, Datapath, DatapathError, DatapathOptions};
use crate::health::{Health, HealthCheckServers};
use crate::lbmap::{LbMaps, StateChanges};
use crate::metrics::Metrics;
use crate::node_net::{NetworkError, NetworkState, NodeNetwork};
use crate::policy::PolicyReconciler;
use crate::policy::task::PolicyTask;
use crate::preflight::PreflightError;
use crate::reconcile::{ReconcileError, Reconciler};
use crate::source::manifests::{ManifestDir, error_chain};
use crate::source::{Nodes, Stores};

/// How long start-up waits for the sources' first full sync before applying without pruning.
pub const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Coalescing window: changes arriving within this time after a sync started wait for its end,
/// so a burst of events becomes one apply. A change after a quiet period is applied at once (a
/// sync costs in proportion to the change, so waiting would only add latency).
pub const DEBOUNCE: Duration = Duration::from_millis(5);
/// Retry delays after a failed apply: doubling from the first to the last.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Minimum time between two returns of freed heap to the kernel ([`release_free_heap`]).
const TRIM_PERIOD: Duration = Duration::from_secs(5);
/// How often kernel verdict counters are copied into metrics.
const STATS_PERIOD: Duration = Duration::from_secs(5);
/// How often the connection-tracking table is collected. Closed TCP flows live 10 s
/// (`CT_LIFETIME_TCP_CLOSING_NS`), so a closed flow holds its entries at most ~20 s.
const CT_GC_PERIOD: Duration = Duration::from_secs(10);
/// The period when the last pass left the table at least [`CT_GC_BUSY_FILL`] full: under a
/// high rate of new flows, closed ones are freed soon after their 10 s, before the table fills
/// and new flows are dropped.
const CT_GC_BUSY_PERIOD: Duration = Duration::from_secs(2);
const CT_GC_BUSY_FILL: f64 = 0.25;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("start-up check failed")]
    Preflight(#[from] PreflightError),
    #[error("binding the {what} server on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the datapath")]
    Datapath(#[from] DatapathError),
    #[error("adopting the pinned maps")]
    Adopt(#[source] ReconcileError),
    #[error("adopting the pinned NetworkPolicy maps")]
    AdoptPolicy(#[source] crate::policy::PolicyReconcileError),
    #[error("watching the pod veths")]
    PodLinks(#[from] crate::policy::links::LinksError),
    #[error("connecting to the Kubernetes API")]
    Client(#[from] crate::source::kube::ClientError),
    #[error("installing the signal handler")]
    Signal(#[source] std::io::Error),
    #[error("opening netlink for the node network")]
    Network(#[source] crate::routing::RoutingError),
}

/// Compile settings derived from the agent config.
pub fn compile_config(cfg: &Config) -> CompileConfig {
    let mut c = CompileConfig::new(cfg.node_name.clone());
    c.nodeport_cidrs.clone_from(&cfg.nodeport_addresses);
    c.nodeport_range = cfg.nodeport_range.0..=cfg.nodeport_range.1;
    c.max_frontends_per_service = cfg.max_frontends_per_service;
    c
}

/// Where the run loop gets kernel verdict counters from (the real maps; fakes have none).
pub trait VerdictStats {
    /// `(reason, total over CPUs)`, or `None` when there are no counters.
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>>;
}

impl VerdictStats for AyaLbMaps {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        match self.stats() {
            Ok(counts) => Some(counts.iter().map(|(r, n)| (r.name(), *n)).collect()),
            Err(e) => {
                log::debug!("reading verdict counters: {}", error_chain(&e));
                None
            }
        }
    }
}

impl VerdictStats for crate::lbmap::FakeLbMaps {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }
}

impl<M: LbMaps> VerdictStats for crate::lbmap::FaultyLbMaps<M> {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }
}

/// The state of the run loop: one [`Syncer::sync`] is one compile + apply.
pub struct Syncer<M: LbMaps> {
    cfg: Config,
    compile_cfg: CompileConfig,
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    hc_servers: HealthCheckServers,
    published: Arc<RwLock<Published>>,
    reconciler: Reconciler<M>,
    compiler: Compiler,
    /// Whether the compiler has been fed the whole stores once (from then on, changes only).
    loaded: bool,
    /// The CNI config last written (or found identical on disk).
    cni_conf: Option<Vec<u8>>,
    /// MTU written into the CNI config: `--cni-mtu`, lowered to what the route plan allows.
    cni_mtu: u32,
    failures: u32,
    /// Invalid objects of the last compile, so each is logged once, not once per sync.
    logged_rejections: std::collections::BTreeSet<(String, String, String)>,
    /// Services with frontends a full map had no room for at the last apply (reported as
    /// rejections in the debug dump, counted in `twill_unprogrammed_services`).
    unprogrammed: Vec<crate::compile::Rejection>,
    /// The cluster's DNS names, fed the same Service groups as the compiler.
    dns_table: twill_core::dns::DnsTable,
    /// Where each sync's names are published, when DNS is on.
    dns: Option<Arc<crate::dns::DnsResponder>>,
}

impl<M: LbMaps + VerdictStats> Syncer<M> {
    /// `reconciler` should come from `Reconciler::adopt` so ids stay those of the adopted maps.
    pub fn new(
        cfg: Config,
        stores: Arc<Stores>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        published: Arc<RwLock<Published>>,
        reconciler: Reconciler<M>,
    ) -> Self {
        let cfg_domain = cfg.cluster_domain.clone();
        Self {
            compile_cfg: compile_config(&cfg),
            hc_servers: HealthCheckServers::new(health.clone(), Ipv4Addr::UNSPECIFIED),
            compiler: Compiler::new(IdAllocation::from_adopted(reconciler.applied())),
            loaded: false,
            cni_mtu: cfg.cni_mtu,
            cfg,
            stores,
            metrics,
            health,
            published,
            reconciler,
            cni_conf: None,
            failures: 0,
            logged_rejections: std::collections::BTreeSet::new(),
            unprogrammed: Vec::new(),
            dns_table: twill_core::dns::DnsTable::new(&cfg_domain),
            dns: None,
        }
    }

    /// The Service groups changed since the last sync (all of them the first time), which the
    /// DNS table takes in before the compiler does.
    fn take_changes(&mut self) -> crate::source::StoreChanges {
        let dirty = self.stores.take_changes(!self.loaded);
        self.update_dns(&dirty.groups, !self.loaded);
        self.loaded = true;
        dirty
    }

    /// Feeds the changed groups to the DNS table and publishes a copy when it changed (and
    /// after the first sync, even of an empty cluster: until then the responder says SERVFAIL).
    /// The names follow the very groups the compiler reads, so DNS answers what the datapath
    /// serves after this sync; the responder swaps the whole table in at once.
    fn update_dns(&mut self, groups: &[crate::compile::ServiceGroup], first: bool) {
        self.dns_table.update(groups);
        if (first || !groups.is_empty())
            && let Some(dns) = &self.dns
        {
            dns.publish(Arc::new(self.dns_table.clone()));
        }
    }

    /// Publishes the cluster's names to `responder` after every sync.
    pub fn set_dns(&mut self, responder: Arc<crate::dns::DnsResponder>) {
        self.dns = Some(responder);
    }

    /// The node's own network namespace (where the agent runs), written into the datapath config
    /// so loopback NodePorts are translated there and never inside pods.
    pub fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.compile_cfg.host_netns_cookie = cookie;
    }

    /// Takes the node network's devices and MTU into the next compile and CNI config.
    pub fn set_network(&mut self, net: &NetworkState) {
        self.compile_cfg
            .nodeport_addresses
            .clone_from(&net.nodeport_addresses);
        self.cni_mtu = net
            .pod_mtu
            .map_or(self.cfg.cni_mtu, |m| m.min(self.cfg.cni_mtu));
        self.metrics
            .peer_routes
            .set(i64::try_from(net.peer_routes).unwrap_or(i64::MAX));
    }

    pub fn reconciler(&self) -> &Reconciler<M> {
        &self.reconciler
    }

    pub fn reconciler_mut(&mut self) -> &mut Reconciler<M> {
        &mut self.reconciler
    }

    /// One compile + apply of what changed since the last one. Returns whether it fully
    /// applied. Prunes only once every source kind has synced.
    pub fn sync(&mut self) -> bool {
        let started = Instant::now();
        let pending_since = self.stores.pending_since();
        let dirty = self.take_changes();
        let generation = dirty.generation;
        let node = self.stores.node(&self.cfg.node_name);
        self.compile_cfg.pod_cidrs = node
            .as_deref()
            .map(crate::cniconf::pod_cidrs)
            .unwrap_or_default();
        // Few objects; a list of addresses compared by the compiler, which replans only the
        // Services naming one that came or went.
        self.compile_cfg.node_ips =
            crate::compile::all_node_ips(self.stores.nodes().values().map(AsRef::as_ref));
        let update = self
            .compiler
            .update(&self.compile_cfg, node.as_deref(), dirty.groups);
        let changes = self.compiler.take_changes();
        let prune = self.stores.is_synced();
        let result = self
            .reconciler
            .apply_changes(self.compiler.state(), &changes, prune);
        let elapsed = started.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());

        if update.rejections_changed {
            self.report_rejections();
        }
        let counts = self.compiler.counts();
        self.metrics
            .services
            .set(i64::try_from(counts.services).unwrap_or(i64::MAX));
        self.metrics
            .endpoints
            .set(i64::try_from(counts.endpoints).unwrap_or(i64::MAX));

        self.health.set_node(node.as_deref());
        // Every time, not only on changes: a port that could not be bound is retried.
        self.hc_servers.update(&self.compiler.health());
        if let Some(node) = &node {
            self.write_cni_conf(node);
        }

        // A full map is the cluster outgrowing a flag, not a broken kernel: every entry with room
        // was written, so the Services left out are reported on their own and the agent counts
        // as up to date (no fast retry, `/healthz` and `/livez` stay green). The next change or
        // resync compares everything again and fills any room that appeared.
        let unprogrammed = match &result {
            Ok(_) => Vec::new(),
            Err(e) if e.only_full() => self.unprogrammed_services(),
            Err(_) => self.unprogrammed.clone(),
        };
        let unprogrammed_changed = unprogrammed != self.unprogrammed;
        if unprogrammed_changed {
            self.report_unprogrammed(unprogrammed);
        }
        let ok = match &result {
            Err(e) if e.only_full() => {
                if unprogrammed_changed {
                    log::error!("applying generation {generation}: {}", error_chain(e));
                } else {
                    log::debug!("applying generation {generation}: {}", error_chain(e));
                }
                self.metrics.sync_errors.inc();
                self.count_map_errors(e);
                self.health.updated();
                self.stores.mark_applied(generation);
                self.failures = 0;
                true
            }
            Ok(stats) => {
                log::debug!(
                    "applied generation {generation} in {elapsed:?} (prune={prune}, {} Services recompiled, {} keys changed): {stats:?}",
                    update.recompiled,
                    changes.len()
                );
                self.health.updated();
                self.stores.mark_applied(generation);
                if let Some(since) = pending_since {
                    self.metrics
                        .programming_duration
                        .observe(since.elapsed().as_secs_f64());
                }
                self.metrics.last_sync_timestamp.set(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
                self.failures = 0;
                true
            }
            Err(e) => {
                log::error!("applying generation {generation}: {}", error_chain(e));
                self.metrics.sync_errors.inc();
                self.count_map_errors(e);
                self.failures = self.failures.saturating_add(1);
                false
            }
        };
        // The published copy follows the reconciler's bookkeeping the way the apply did: key
        // by key after an apply of the changed keys, whole after one that compared everything.
        let compared_all = match &result {
            Ok(stats) => stats.compared_all,
            Err(e) => e.stats().is_none_or(|s| s.compared_all),
        };
        self.publish(
            &changes,
            compared_all,
            update.recompiled > 0 || update.rejections_changed || unprogrammed_changed,
        );
        ok
    }

    /// Updates the copy the API serves: the applied state (whole after an apply that compared
    /// everything, else the changed keys) and, when `model_changed` or after a whole compare,
    /// the dump model with the Services a full map left out.
    fn publish(&self, changes: &StateChanges, compared_all: bool, model_changed: bool) {
        let mut published = self
            .published
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if compared_all {
            published.applied.clone_from(self.reconciler.applied());
        } else {
            published
                .applied
                .copy_changes(self.reconciler.applied(), changes);
        }
        if model_changed || compared_all {
            published.model = self.compiler.model();
            if !self.unprogrammed.is_empty() {
                let rejected = &mut published.model.rejected;
                rejected.extend(self.unprogrammed.iter().cloned());
                rejected.sort_by_cached_key(|r| {
                    (
                        r.kind,
                        r.namespace.clone(),
                        r.name.clone(),
                        r.reason.to_string(),
                    )
                });
            }
        }
    }

    fn count_map_errors(&self, e: &ReconcileError) {
        for me in e.map_errors() {
            let map = match me {
                crate::lbmap::MapError::Full { map, .. }
                | crate::lbmap::MapError::Syscall { map, .. }
                | crate::lbmap::MapError::Injected { map, .. } => map.name(),
            };
            self.metrics.map_error(map, me.metric_label());
        }
    }

    /// The Services with a desired frontend the maps do not hold as desired (after an apply
    /// that ran out of room: the frontend, or a slot, backend or source range it needs, found
    /// no room). Walks every frontend: only on that failure path.
    fn unprogrammed_services(&self) -> Vec<crate::compile::Rejection> {
        let desired = &self.compiler.state().services;
        let applied = &self.reconciler.applied().services;
        let mut out: Vec<crate::compile::Rejection> = Vec::new();
        for port in self.compiler.model().services {
            let missing = port
                .frontends
                .iter()
                .any(|fe| applied.get(&fe.key) != desired.get(&fe.key));
            // Ports are sorted by Service, so one Service's ports are adjacent.
            let seen = out
                .last()
                .is_some_and(|r| r.namespace == port.namespace && r.name == port.name);
            if missing && !seen {
                out.push(crate::compile::Rejection {
                    kind: crate::compile::ObjectKind::Service,
                    namespace: port.namespace.clone(),
                    name: port.name.clone(),
                    reason: crate::compile::RejectReason::MapFull,
                });
            }
        }
        out
    }

    /// Logs the Services that newly lost (or got back) room in the maps and sets the gauge.
    fn report_unprogrammed(&mut self, now: Vec<crate::compile::Rejection>) {
        for r in now.iter().filter(|r| !self.unprogrammed.contains(r)) {
            log::warn!("Service {}/{}: {}", r.namespace, r.name, r.reason);
        }
        for r in self.unprogrammed.iter().filter(|r| !now.contains(r)) {
            log::info!(
                "Service {}/{} is fully programmed again",
                r.namespace,
                r.name
            );
        }
        self.metrics
            .unprogrammed_services
            .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
        self.unprogrammed = now;
    }

    /// Logs newly invalid objects once and counts them in `twill_invalid_objects_total`.
    fn report_rejections(&mut self) {
        let rejected = self.compiler.rejected();
        let invalid: Vec<_> = rejected
            .iter()
            .filter(|r| r.reason.class() == crate::compile::RejectClass::Invalid)
            .collect();
        let key = |r: &crate::compile::Rejection| {
            (
                r.namespace.to_string(),
                r.name.to_string(),
                r.reason.to_string(),
            )
        };
        let current: std::collections::BTreeSet<(String, String, String)> =
            invalid.iter().map(|r| key(r)).collect();
        for r in &invalid {
            if !self.logged_rejections.contains(&key(r)) {
                log::warn!(
                    "skipping invalid {} {}/{}: {}",
                    r.kind.as_str(),
                    r.namespace,
                    r.name,
                    r.reason
                );
            }
        }
        self.metrics.compiler_rejections(invalid.iter().map(|r| {
            (
                r.kind.as_str(),
                &*r.namespace,
                &*r.name,
                r.reason.metric_label(),
            )
        }));
        self.logged_rejections = current;
    }

    fn write_cni_conf(&mut self, node: &k8s_openapi::api::core::v1::Node) {
        let mut cidrs = crate::cniconf::pod_cidrs_all(node);
        if self.cni_mtu < twill_cni::config::IPV6_MIN_MTU
            && cidrs.iter().any(ipnetwork::IpNetwork::is_ipv6)
        {
            // twill-cni refuses the whole config otherwise: keep IPv4 pods working.
            log::error!(
                "pod MTU {} is below IPv6's minimum of 1280: IPv6 pod CIDRs left out of the CNI config",
                self.cni_mtu
            );
            cidrs.retain(ipnetwork::IpNetwork::is_ipv4);
        }
        if cidrs.is_empty() {
            return;
        }
        let content = crate::cniconf::render(
            &cidrs,
            self.cni_mtu,
            &self.cfg.state_dir,
            self.cfg.cni_chain_portmap,
        );
        if self.cni_conf.as_ref() == Some(&content) {
            return;
        }
        match crate::cniconf::write_if_changed(&self.cfg.cni_conf_dir, &content) {
            Ok(wrote) => {
                if wrote {
                    log::info!(
                        "wrote CNI config for pod CIDRs {cidrs:?} into {}",
                        self.cfg.cni_conf_dir.display()
                    );
                }
                self.cni_conf = Some(content);
            }
            Err(e) => log::error!("{}", error_chain(&e)),
        }
    }

    /// Delay before retrying after consecutive failed applies (capped exponential).
    pub fn retry_delay(&self) -> Duration {
        backoff(self.failures)
    }

    /// This node's pod CIDRs as of the last compile.
    pub fn pod_cidrs(&self) -> &[ipnetwork::Ipv4Network] {
        &self.compile_cfg.pod_cidrs
    }

    /// Copies the kernel's verdict counters into the metrics.
    pub fn export_stats(&self) {
        if let Some(totals) = self.reconciler.maps().verdict_totals() {
            self.metrics.set_verdicts(totals);
        }
    }
}

/// Capped exponential delay after `failures` consecutive failures (≥ 1).
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    (RETRY_MIN * 2u32.pow(exp)).min(RETRY_MAX)
}

async fn bind_tcp(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Binds the health, metrics and API servers. A port clash is a start-up error, not a silent
/// half-working agent.
async fn start_servers(
    cfg: &Config,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    published: &Arc<RwLock<Published>>,
    dns: &Arc<crate::dns::DnsResponder>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    let mut servers = Vec::new();
    if let Some(addr) = cfg.healthz_bind_address {
        let l = bind_tcp("healthz", addr).await?;
        let h = health.clone();
        servers.push(tokio::spawn(crate::api::serve_tcp(l, move |r| h.handle(r))));
    }
    if let Some(addr) = cfg.metrics_bind_address {
        let l = bind_tcp("metrics", addr).await?;
        let m = metrics.clone();
        servers.push(tokio::spawn(crate::api::serve_tcp(l, move |r| {
            if r.path == "/metrics" {
                crate::api::Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: m.render().into_bytes(),
                }
            } else {
                crate::api::Response::not_found()
            }
        })));
    }
    let api_listener = crate::api::bind(&cfg.api_socket).map_err(|source| RunError::Bind {
        what: "API",
        addr: cfg.api_socket.display().to_string(),
        source,
    })?;
    let api_state = ApiState {
        published: published.clone(),
        dns: Some(dns.clone()),
        kernel: Arc::new(PinnedKernelView {
            bpffs_dir: cfg.bpffs_dir.clone(),
        }),
    };
    servers.push(tokio::spawn(crate::api::serve_unix(
        api_listener,
        api_state,
    )));
    Ok(servers)
}

/// Loads the datapath (adopting pinned maps with their contents), swaps our programs into the
/// pinned links and adopts what the maps hold.
fn start_datapath(
    cfg: &Config,
    cgroup: &std::path::Path,
) -> Result<
    (
        Datapath,
        Reconciler<AyaLbMaps>,
        PolicyReconciler<crate::datapath::AyaPolicyMaps>,
    ),
    RunError,
> {
    let mut datapath = Datapath::load(&DatapathOptions {
        bpffs_dir: Some(cfg.bpffs_dir.clone()),
        map_sizes: cfg.map_sizes,
    })?;
    for a in datapath.adopted_maps() {
        log::info!(
            "adopted pinned map {} ({} entries max)",
            a.name,
            a.max_entries
        );
    }
    let outcomes = datapath.attach_cgroup(cgroup)?;
    log::info!("socket programs on {}: {outcomes:?}", cgroup.display());
    let policy_maps = datapath.policy_maps()?;
    let maps = datapath.lb_maps()?;
    let reconciler = Reconciler::adopt(maps).map_err(RunError::Adopt)?;
    log::info!(
        "adopted {} service entries from the pinned maps",
        reconciler.applied().services.len()
    );
    let policy = PolicyReconciler::adopt(policy_maps).map_err(RunError::AdoptPolicy)?;
    Ok((datapath, reconciler, policy))
}

/// This network namespace's cookie (the agent runs in the node's): 0, which translates
/// loopback NodePorts nowhere, when the kernel cannot tell it.
fn host_netns_cookie() -> u64 {
    crate::datapath::current_netns_cookie().unwrap_or_else(|e| {
        log::warn!(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {e}; \
             127.0.0.1:<nodePort> is not translated"
        );
        0
    })
}

async fn start_sources(
    cfg: &Config,
    stores: &Arc<Stores>,
    metrics: &Arc<Metrics>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    Ok(match &cfg.source {
        SourceConfig::Manifests(dir) => {
            log::info!(
                "reading Services, EndpointSlices and Nodes from {}",
                dir.display()
            );
            vec![tokio::spawn(
                ManifestDir::new(dir.clone()).run(stores.clone(), metrics.clone()),
            )]
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = crate::source::kube::client(kubeconfig.as_deref()).await?;
            crate::source::kube::spawn(&client, stores, metrics)
        }
    })
}

/// Hands the DNS table's publisher to the syncer (`debug dns` answers from it even with DNS
/// off) and starts the responder when `--dns-bind-address` is set.
async fn start_dns<M: LbMaps + VerdictStats>(
    agent: &mut Syncer<M>,
    responder: Arc<crate::dns::DnsResponder>,
) -> Vec<tokio::task::JoinHandle<()>> {
    agent.set_dns(responder.clone());
    match agent.cfg.dns_bind_address {
        Some(addr) => crate::dns::start(responder, addr).await,
        None => Vec::new(),
    }
}

fn log_start(cfg: &Config, cgroup: &std::path::Path) {
    log::info!(
        "twill-agent {} on node {}: cgroup {}, bpffs {}",
        env!("CARGO_PKG_VERSION"),
        cfg.node_name,
        cgroup.display(),
        cfg.bpffs_dir.display()
    );
}

/// A periodic timer that skips ticks missed while the loop was busy.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Runs the agent until SIGTERM/SIGINT.
#[expect(
    clippy::too_many_lines,
    reason = "start-up in its documented order and the one select loop; NetworkPolicy adds only \
              calls into PolicyTask (start, link events, sync, retry)"
)]
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let cgroup = crate::preflight::run_checks(
        cfg.cgroup_root.as_deref(),
        &cfg.bpffs_dir,
        &cfg.cni_conf_dir,
    )?;
    log_start(&cfg, &cgroup);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(RunError::Signal)?;

    let stores = Stores::new();
    let metrics = Arc::new(Metrics::new());
    let health = Health::new(stores.clone(), cfg.sync_period * 2);
    let published: Arc<RwLock<Published>> = Arc::default();
    let dns = crate::dns::DnsResponder::new(cfg.dns_ttl, metrics.clone());
    let mut tasks = start_servers(&cfg, &health, &metrics, &published, &dns).await?;
    let (mut datapath, reconciler, pol) = start_datapath(&cfg, &cgroup)?;
    let mut network = NodeNetwork::new(&cfg).map_err(RunError::Network)?;
    // Pod veths are watched before the sources start: a pod created meanwhile is an event.
    let mut policy = PolicyTask::start(&cfg, pol, &mut datapath, &metrics, &published).await?;
    let mut collector = CtCollector::new(CtTable::open_pinned(&cfg.bpffs_dir)?, metrics.clone());
    tasks.extend(start_sources(&cfg, &stores, &metrics).await?);
    let mut agent = Syncer::new(cfg, stores.clone(), metrics, health, published, reconciler);
    agent.set_host_netns_cookie(host_netns_cookie());
    tasks.extend(start_dns(&mut agent, dns).await);

    let synced = tokio::select! {
        s = stores.wait_synced(FIRST_SYNC_TIMEOUT) => Some(s),
        _ = sigterm.recv() => None,
        _ = sigint.recv() => None,
    };
    match synced {
        None => {
            abort_all(&tasks);
            return Ok(());
        }
        Some(false) => log::warn!(
            "sources not synced after {FIRST_SYNC_TIMEOUT:?}: applying without pruning until they are"
        ),
        Some(true) => {}
    }

    let mut resync = ticker(agent.cfg.sync_period);
    let mut stats = ticker(STATS_PERIOD);
    let mut ct_gc = ticker(CT_GC_BUSY_PERIOD);
    // Apply once right away (the adopted state may need pruning even with no change).
    let mut retry_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut network_due = true;
    let mut network_failures = 0u32;
    let mut trimmer = HeapTrimmer::default();
    let mut last_sync: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stores.changed_notification() => {}
            () = retry => {}
            // Not debounced: a new pod's veth gets its programs at once.
            () = policy.links_changed() => {
                policy.sync_links(&mut datapath).await;
                continue;
            }
            _ = resync.tick() => {
                network_due = true;
                policy.sync_links(&mut datapath).await;
            }
            _ = stats.tick() => {
                agent.export_stats();
                // Also here, so a burst that ended within TRIM_PERIOD of the last trim is
                // returned too.
                trimmer.maybe_trim();
                continue;
            }
            _ = ct_gc.tick() => {
                collector.tick(&network, agent.pod_cidrs()).await;
                continue;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        // Coalesce a burst of changes into one apply.
        if let Some(t) = last_sync {
            tokio::time::sleep_until(t + DEBOUNCE).await;
        }
        last_sync = Some(tokio::time::Instant::now());
        // One copy of the Nodes for the check and the sync (few objects; the Services are the
        // compiler's business).
        let nodes = stores.nodes();
        if network_due || network.needs_sync(&nodes) {
            network_due = false;
            if sync_network(&mut network, &mut datapath, &nodes, &stores, &mut agent).await {
                network_failures = 0;
            } else {
                network_failures = network_failures.saturating_add(1);
            }
        }
        let ok = agent.sync();
        policy.sync(&stores, network.state());
        // NetworkPolicy is enforced for IPv4 only: isolated pods lose IPv6 rather than have it
        // bypass their policy (see docs/design/dualstack.md).
        network.cut_ipv6_of(&policy.isolated_pods()).await;
        // After the maps are written, so it never delays programming.
        trimmer.maybe_trim();
        // Each part retries on its own backoff: a persistent routing error (a Node without
        // InternalIP, say) must not turn into a 100 ms retry loop of map applies, nor the
        // reverse.
        let delays = [
            (!ok).then(|| agent.retry_delay()),
            (network_failures > 0).then(|| backoff(network_failures)),
            policy.retry_delay(),
        ];
        retry_at = delays
            .into_iter()
            .flatten()
            .min()
            .map(|d| tokio::time::Instant::now() + d);
    }
    log::info!("terminating: pinned maps and links stay in place, traffic keeps flowing");
    abort_all(&tasks);
    drop(agent);
    drop(datapath);
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old, new) soft limits. The
/// default soft limit (often 1024) is shared by every map, link, netlink socket and client
/// connection; the servers cap their connections ([`crate::api::HTTP_LIMITS`]) well below the
/// raised limit, so a connection flood cannot starve the rest. Raising up to the hard limit
/// needs no privilege.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// [`raise_open_file_limit`], logged; `main` calls it before the runtime starts its threads.
pub fn log_open_file_limit() {
    match raise_open_file_limit() {
        Ok((from, to)) if from != to => log::info!("open-file limit raised from {from} to {to}"),
        Ok(_) => {}
        Err(e) => log::warn!("raising the open-file limit: {e}"),
    }
}

/// Runs [`release_free_heap`] off the run loop, at most every [`TRIM_PERIOD`].
struct HeapTrimmer {
    last: Instant,
}

impl Default for HeapTrimmer {
    fn default() -> Self {
        Self {
            last: Instant::now(),
        }
    }
}

impl HeapTrimmer {
    fn maybe_trim(&mut self) {
        if self.last.elapsed() >= TRIM_PERIOD {
            self.last = Instant::now();
            tokio::task::spawn_blocking(release_free_heap);
        }
    }
}

/// Hands freed heap pages back to the kernel. A compile of 10,000 Services (and the parse of
/// their manifests) allocates hundreds of MiB of short-lived objects; glibc keeps freed memory
/// in its arenas, so without this the agent's RSS stays at its peak, several times what it
/// holds. Costs a walk of the free lists (tens of milliseconds at that size).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; 0 keeps no extra pad at the heap top.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Collects the connection-tracking table every [`CT_GC_PERIOD`] on a blocking thread (a pass
/// costs two syscalls per entry), with this node's pods known by their host routes. A pass
/// still running when the next is due makes that one skip.
struct CtCollector {
    table: Arc<std::sync::Mutex<CtTable>>,
    capacity: u32,
    metrics: Arc<Metrics>,
    running: Option<tokio::task::JoinHandle<()>>,
    last_start: Option<Instant>,
    /// Entries left by the last pass.
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl CtCollector {
    fn new(table: CtTable, metrics: Arc<Metrics>) -> Self {
        Self {
            capacity: table.capacity(),
            table: Arc::new(std::sync::Mutex::new(table)),
            metrics,
            running: None,
            last_start: None,
            left: Arc::default(),
        }
    }

    /// Called every [`CT_GC_BUSY_PERIOD`]: starts a pass when one is due (every
    /// [`CT_GC_PERIOD`], or every tick while the table is busy) and none is running. Without
    /// pod CIDRs (or when the routes cannot be read) nothing is judged orphaned: expiry only.
    async fn tick(&mut self, network: &NodeNetwork, pod_cidrs: &[ipnetwork::Ipv4Network]) {
        if self.running.as_ref().is_some_and(|j| !j.is_finished()) {
            return;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a fill ratio; map sizes are far below 2^52"
        )]
        let fill = self.left.load(std::sync::atomic::Ordering::Relaxed) as f64
            / f64::from(self.capacity.max(1));
        let period = if fill >= CT_GC_BUSY_FILL {
            CT_GC_BUSY_PERIOD
        } else {
            CT_GC_PERIOD
        };
        if self.last_start.is_some_and(|t| t.elapsed() < period) {
            return;
        }
        self.last_start = Some(Instant::now());
        // The routes are read before the table: a pod created in between would look unowned,
        // but a pod gets its host route at CNI ADD, long before it is ready and listed as an
        // endpoint, so no flow to it can exist yet.
        let owners = if pod_cidrs.is_empty() {
            crate::ctgc::LocalPods::default()
        } else {
            match network.host_routes().await {
                Ok(routes) => crate::ctgc::LocalPods::new(pod_cidrs.to_vec(), routes),
                Err(e) => {
                    log::warn!(
                        "reading host routes for the conntrack collector: {}",
                        error_chain(&e)
                    );
                    crate::ctgc::LocalPods::default()
                }
            }
        };
        let (table, metrics, left) = (self.table.clone(), self.metrics.clone(), self.left.clone());
        self.running = Some(tokio::task::spawn_blocking(move || {
            let mut table = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let result = table.collect(crate::datapath::monotonic_now_ns(), &owners);
            if let Ok((plan, scanned)) = &result {
                left.store(
                    scanned.saturating_sub(plan.len()),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            report_collection(&metrics, result);
        }));
    }
}

fn report_collection(
    metrics: &Metrics,
    result: Result<(crate::ctgc::CtGcPlan, usize), crate::lbmap::MapError>,
) {
    match result {
        Ok((plan, scanned)) => {
            let left = scanned.saturating_sub(plan.len());
            metrics
                .conntrack_entries
                .set(i64::try_from(left).unwrap_or(i64::MAX));
            metrics.conntrack_collected("expired", plan.expired.len());
            metrics.conntrack_collected("orphaned", plan.orphaned.len());
            if !plan.orphaned.is_empty() {
                log::info!(
                    "conntrack: removed {} entries of flows to addresses no local pod holds any more",
                    plan.orphaned.len()
                );
            }
            log::debug!(
                "conntrack: {scanned} entries, {} expired, {} orphaned",
                plan.expired.len(),
                plan.orphaned.len()
            );
        }
        Err(e) => {
            log::warn!("collecting the conntrack table: {}", error_chain(&e));
            metrics.map_error(crate::lbmap::MapKind::Ct.name(), e.metric_label());
        }
    }
}

/// One node-network sync; its devices and MTU go into the next compile even when a later step
/// (routes) failed. Returns whether it fully succeeded.
async fn sync_network<M: LbMaps + VerdictStats>(
    network: &mut NodeNetwork,
    datapath: &mut Datapath,
    nodes: &Nodes,
    stores: &Stores,
    agent: &mut Syncer<M>,
) -> bool {
    let result = network.sync(nodes, datapath, stores.is_synced()).await;
    agent.set_network(network.state());
    match result {
        Ok(_) => true,
        Err(e) => {
            log_network_error(&e, &agent.metrics);
            false
        }
    }
}

fn log_network_error(e: &NetworkError, metrics: &Metrics) {
    log::error!("{}", error_chain(e));
    metrics.network_error(e.metric_label());
}

fn abort_all(tasks: &[tokio::task::JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{FileConfig, merge};
    use crate::lbmap::{FakeLbMaps, FaultPlan, FaultyLbMaps};
    use crate::source::manifests::parse_text;
    use crate::source::{Kind, Snapshot};

    const OBJECTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5], nodeName: n1, conditions: {ready: true}}]
ports: [{port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDRs: [10.244.1.0/24]}
";

    fn config(dir: &Path) -> Config {
        let file = FileConfig {
            node_name: Some("n1".into()),
            manifests: Some(dir.join("m")),
            cni_conf_dir: Some(dir.join("net.d")),
            state_dir: Some(dir.join("state")),
            ..FileConfig::default()
        };
        merge(crate::config::RunArgs::default(), file).unwrap()
    }

    fn syncer<M: LbMaps + VerdictStats>(
        dir: &Path,
        maps: M,
    ) -> (Syncer<M>, Arc<Stores>, Arc<Metrics>) {
        let stores = Stores::new();
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(stores.clone(), Duration::from_mins(1));
        let reconciler = Reconciler::adopt(maps).unwrap();
        let s = Syncer::new(
            config(dir),
            stores.clone(),
            metrics.clone(),
            health,
            Arc::default(),
            reconciler,
        );
        (s, stores, metrics)
    }

    fn load(stores: &Stores) {
        let parsed = parse_text(Path::new("x.yaml"), OBJECTS, false).unwrap();
        stores.replace_all(&Snapshot::from_objects(parsed.objects));
    }

    fn frontends(state: &crate::lbmap::LbState) -> Vec<Ipv4Addr> {
        state
            .services
            .keys()
            .map(|k| crate::compile::addr_from_be(k.addr_be))
            .collect()
    }

    #[test]
    fn prunes_adopted_leftovers_only_after_the_sources_synced() {
        let dir = tempfile::tempdir().unwrap();
        // A previous agent left a Service the cluster no longer has.
        let stale = {
            let parsed = parse_text(
                Path::new("x.yaml"),
                &OBJECTS.replace("10.96.0.10", "10.96.0.99"),
                false,
            )
            .unwrap();
            let stores = Stores::new();
            stores.replace_all(&Snapshot::from_objects(parsed.objects));
            let cfg = compile_config(&config(dir.path()));
            let mut compiler = Compiler::new(IdAllocation::default());
            compiler.update(
                &cfg,
                stores.node("n1").as_deref(),
                stores.take_changes(true).groups,
            );
            compiler.state().clone()
        };
        let mut fake = FakeLbMaps::default();
        let mut r = Reconciler::new(fake.clone());
        r.apply(&stale, true).unwrap();
        fake.state = r.applied().clone();
        let (mut s, stores, metrics) = syncer(dir.path(), fake);
        load(&stores);

        assert!(s.sync());
        let before_sync = s.reconciler().maps().dump().unwrap();
        assert_eq!(
            frontends(&before_sync),
            vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 99)],
            "no prune before sync"
        );
        assert!(
            stores.pending_since().is_none(),
            "applied generation clears the pending marker"
        );

        for kind in Kind::ALL {
            stores.mark_synced(kind);
        }
        assert!(s.sync());
        let after_sync = s.reconciler().maps().dump().unwrap();
        assert_eq!(
            frontends(&after_sync),
            vec![Ipv4Addr::new(10, 96, 0, 10)],
            "pruned after sync"
        );
        let text = metrics.render();
        assert!(text.contains("twill_services 1"), "{text}");
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 1"),
            "{text}"
        );

        // The Node's podCIDRs produced the CNI config.
        let conf: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("net.d/10-twill.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            conf["plugins"][0]["podCIDRs"],
            serde_json::json!(["10.244.1.0/24"])
        );
    }

    /// A full services map: the Service without room is reported alone (gauge, debug dump),
    /// the one with room is served, and the agent counts as up to date (no pending change for
    /// `/healthz`/`/livez`, no fast retry). Once room appears, the next sync programs it.
    #[test]
    fn a_full_map_rejects_the_services_without_room_and_stays_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeLbMaps {
            services_capacity: Some(1),
            ..FakeLbMaps::default()
        };
        let published: Arc<RwLock<Published>> = Arc::default();
        let stores = Stores::new();
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(stores.clone(), Duration::from_mins(1));
        let mut s = Syncer::new(
            config(dir.path()),
            stores.clone(),
            metrics.clone(),
            health.clone(),
            published.clone(),
            Reconciler::adopt(fake).unwrap(),
        );
        let two = format!(
            "{OBJECTS}---\n{}",
            OBJECTS
                .split("---")
                .next()
                .unwrap()
                .replace("name: web,", "name: zz-web,")
                .replace("10.96.0.10", "10.96.0.11")
        );
        let parsed = parse_text(Path::new("x.yaml"), &two, false).unwrap();
        stores.replace_all(&Snapshot::from_objects(parsed.objects));
        for kind in Kind::ALL {
            stores.mark_synced(kind);
        }

        assert!(s.sync(), "a full map is reported, not retried as a failure");
        assert_eq!(s.retry_delay(), RETRY_MIN);
        assert!(stores.pending_since().is_none(), "nothing left pending");
        assert!(health.proxy_healthy(), "/livez answers 200");
        assert_eq!(
            frontends(&s.reconciler().maps().dump().unwrap()),
            vec![Ipv4Addr::new(10, 96, 0, 10)]
        );
        let text = metrics.render();
        assert!(text.contains("twill_unprogrammed_services 1"), "{text}");
        assert!(
            text.contains(&format!(
                "twill_map_errors_total{{map=\"{}\",kind=\"full\"}} 1",
                twill_common::MAP_SERVICES
            )),
            "{text}"
        );
        let rejected: Vec<String> = published
            .read()
            .unwrap()
            .model
            .rejected
            .iter()
            .map(|r| format!("{}/{} {}", r.namespace, r.name, r.reason.metric_label()))
            .collect();
        assert_eq!(rejected, ["default/zz-web map_full"]);

        // Room appears (a bigger map after an agent upgrade, another Service deleted): the
        // periodic resync compares everything and programs it.
        s.reconciler_mut().maps_mut().services_capacity = None;
        assert!(s.sync());
        assert_eq!(
            frontends(&s.reconciler().maps().dump().unwrap()),
            vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 11)]
        );
        assert!(metrics.render().contains("twill_unprogrammed_services 0"));
        assert!(published.read().unwrap().model.rejected.is_empty());
    }

    #[test]
    fn failed_applies_are_counted_and_retried_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = FaultyLbMaps::new(FakeLbMaps::default(), FaultPlan::none().fail_after(0));
        let (mut s, stores, metrics) = syncer(dir.path(), faulty);
        load(&stores);
        for kind in Kind::ALL {
            stores.mark_synced(kind);
        }
        assert!(!s.sync());
        assert!(!s.sync());
        assert!(s.retry_delay() > RETRY_MIN, "backoff grows");
        let text = metrics.render();
        assert!(text.contains("twill_sync_errors_total 2"), "{text}");
        assert!(text.contains("twill_map_errors_total{"), "{text}");
        assert!(
            stores.pending_since().is_some(),
            "still pending: /healthz will turn stale"
        );

        // The kernel recovers: the next sync converges.
        s.reconciler_mut().maps_mut().plan = FaultPlan::none();
        assert!(s.sync());
        assert_eq!(s.retry_delay(), RETRY_MIN);
        assert!(stores.pending_since().is_none());
        assert_eq!(
            frontends(&s.reconciler().maps().dump().unwrap()),
            vec![Ipv4Addr::new(10, 96, 0, 10)]
        );
    }
}
