//! `twill-agent run`: start-up, the level-triggered run loop and shutdown.
//!
//! Start-up ([`start`]): preflight checks → bind the health, metrics and API servers → load the
//! datapath (adopting pinned maps) and attach it to the cgroup root → adopt what the maps hold →
//! start the source → wait (bounded) for its first full sync → apply with prune.
//!
//! Run loop ([`Agent::run_until_signal`]): sources only mark the stores dirty; one task wakes
//! up, waits a few milliseconds to coalesce a burst of changes, then syncs each part of the node
//! over one shared [`Context`] (kube-runtime's `reconcile(obj, ctx)` shape, one module per
//! concept):
//!
//! ```text
//!  node network (NodeNetwork: devices, routes, MTU)   when Nodes changed or on resync
//!  Services (Syncer): services → report → publish     in time proportional to the change
//!  CNI config (NodeNetwork: pod CIDRs + MTU)          when either changed
//!  NetworkPolicy (PolicyTask): compile → apply        when Pods/Namespaces/policies changed
//! ```
//! Each part retries a failure on its own capped backoff; a periodic resync applies again even
//! without changes (repairing anything that changed the maps behind our back). Pod veth events
//! (and the resync) bring the policy programs onto new pods' veths; the conntrack collector and
//! the heap trimmer run on their own timers ([`housekeeping`]).
//!
//! SIGTERM/SIGINT: stop serving and exit, leaving pinned maps and links in place so traffic keeps
//! flowing until the next agent adopts them.
mod context;
mod housekeeping;
mod publish;
mod report;
mod services;
mod start;
mod syncer;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use self::context::Context;
use self::housekeeping::{CT_GC_BUSY_PERIOD, CtCollector, HeapTrimmer};
pub use self::housekeeping::{log_open_file_limit, raise_open_file_limit};
pub use self::report::VerdictStats;
use self::report::backoff;
pub use self::services::compile_config;
pub use self::syncer::Syncer;
use crate::config::Config;
use crate::datapath::{AyaLbMaps, Datapath, DatapathError};
use crate::node_net::NodeNetwork;
use crate::policy::task::PolicyTask;
use crate::preflight::PreflightError;
use crate::reconcile::ReconcileError;
use crate::source::manifests::error_chain;

/// How long start-up waits for the sources' first full sync before applying without pruning.
pub const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Coalescing window: changes arriving within this time after a sync started wait for its end,
/// so a burst of events becomes one apply. A change after a quiet period is applied at once (a
/// sync costs in proportion to the change, so waiting would only add latency).
pub const DEBOUNCE: Duration = Duration::from_millis(5);
/// How often kernel verdict counters are copied into metrics.
const STATS_PERIOD: Duration = Duration::from_secs(5);

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

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let cgroup = crate::preflight::run_checks(
        cfg.cgroup_root.as_deref(),
        &cfg.bpffs_dir,
        &cfg.cni_conf_dir,
    )?;
    start::log_start(&cfg, &cgroup);
    let mut signals = Signals::new()?;
    let (mut agent, tasks) = start::start(cfg, &cgroup).await?;
    let stores = agent.syncer.ctx().stores.clone();
    let synced = tokio::select! {
        s = stores.wait_synced(FIRST_SYNC_TIMEOUT) => Some(s),
        () = signals.recv() => None,
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
    agent.run_until_signal(&mut signals).await;
    log::info!("terminating: pinned maps and links stay in place, traffic keeps flowing");
    abort_all(&tasks);
    drop(agent);
    Ok(())
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, RunError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(RunError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The run loop's parts (each syncs on its own and retries on its own backoff).
pub(crate) struct Agent {
    syncer: Syncer<AyaLbMaps>,
    datapath: Datapath,
    network: NodeNetwork,
    policy: PolicyTask,
    collector: CtCollector,
    trimmer: HeapTrimmer,
    /// The node network syncs at the next wake-up (start, resync) even with unchanged Nodes.
    network_due: bool,
    network_failures: u32,
}

impl Agent {
    fn new(
        syncer: Syncer<AyaLbMaps>,
        datapath: Datapath,
        network: NodeNetwork,
        policy: PolicyTask,
        collector: CtCollector,
    ) -> Self {
        Self {
            syncer,
            datapath,
            network,
            policy,
            collector,
            trimmer: HeapTrimmer::default(),
            network_due: true,
            network_failures: 0,
        }
    }

    /// Wakes up on store changes, retries, pod veth events and its timers until a signal.
    async fn run_until_signal(&mut self, signals: &mut Signals) {
        let stores = self.syncer.ctx().stores.clone();
        let mut resync = ticker(self.syncer.ctx().cfg.sync_period);
        let mut stats = ticker(STATS_PERIOD);
        let mut ct_gc = ticker(CT_GC_BUSY_PERIOD);
        // Apply once right away (the adopted state may need pruning even with no change).
        let mut retry_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
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
                () = self.policy.links_changed() => {
                    self.policy.sync_links(&mut self.datapath).await;
                    continue;
                }
                _ = resync.tick() => {
                    self.network_due = true;
                    self.policy.sync_links(&mut self.datapath).await;
                }
                _ = stats.tick() => {
                    self.syncer.export_stats();
                    // Also here, so a burst that ended within the trim period of the last
                    // trim is returned too.
                    self.trimmer.maybe_trim();
                    continue;
                }
                _ = ct_gc.tick() => {
                    self.collector.tick(&self.network, self.syncer.pod_cidrs()).await;
                    continue;
                }
                () = signals.recv() => break,
            }
            // Coalesce a burst of changes into one apply.
            if let Some(t) = last_sync {
                tokio::time::sleep_until(t + DEBOUNCE).await;
            }
            last_sync = Some(tokio::time::Instant::now());
            retry_at = self.sync().await.map(|d| tokio::time::Instant::now() + d);
        }
    }

    /// One pass over every part; returns when to retry, if a part failed.
    async fn sync(&mut self) -> Option<Duration> {
        let ctx = self.syncer.ctx().clone();
        // One copy of the Nodes for the check and the sync (few objects; the Services are the
        // compiler's business).
        let nodes = ctx.stores.nodes();
        if self.network_due || self.network.needs_sync(&nodes) {
            self.network_due = false;
            if self.sync_network(&ctx, &nodes).await {
                self.network_failures = 0;
            } else {
                self.network_failures = self.network_failures.saturating_add(1);
            }
        }
        let ok = self.syncer.sync();
        if let Some(node) = ctx.node() {
            self.network.write_cni_conf(&node);
        }
        self.policy.sync(&ctx.stores, self.network.state());
        // After the maps are written, so it never delays programming.
        self.trimmer.maybe_trim();
        // Each part retries on its own backoff: a persistent routing error (a Node without
        // InternalIP, say) must not turn into a 100 ms retry loop of map applies, nor the
        // reverse.
        [
            (!ok).then(|| self.syncer.retry_delay()),
            (self.network_failures > 0).then(|| backoff(self.network_failures)),
            self.policy.retry_delay(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// One node-network sync; its NodePort addresses go into the next compile even when a
    /// later step (routes) failed. Returns whether it fully succeeded.
    async fn sync_network(&mut self, ctx: &Context, nodes: &crate::source::Nodes) -> bool {
        let result = self
            .network
            .sync(nodes, &mut self.datapath, ctx.stores.is_synced())
            .await;
        let state = self.network.state();
        self.syncer
            .set_nodeport_addresses(&state.nodeport_addresses);
        self.syncer
            .set_nodeport_addresses6(&state.nodeport_addresses6);
        ctx.metrics
            .peer_routes
            .set(i64::try_from(state.peer_routes).unwrap_or(i64::MAX));
        match result {
            Ok(_) => true,
            Err(e) => {
                log::error!("{}", error_chain(&e));
                ctx.metrics.network_error(e.metric_label());
                false
            }
        }
    }
}

/// A periodic timer that skips ticks missed while the loop was busy.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn abort_all(tasks: &[tokio::task::JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}
