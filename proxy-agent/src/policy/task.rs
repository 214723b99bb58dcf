//! NetworkPolicy's part of the agent's run loop: the policy compile + apply after each Service
//! sync, and the pod veths' programs on link events and every resync. (Policy conntrack entries
//! are expired by the table's one collector, `crate::ctgc`.)
use std::sync::{Arc, RwLock};

use super::links::{LinksError, PodVeths};
use super::{PolicyReconciler, PolicySyncer, node_addresses};
use crate::api::Published;
use crate::datapath::{AyaPolicyMaps, Datapath};
use crate::metrics::Metrics;
use crate::node_net::NetworkState;
use crate::source::Stores;
use crate::source::manifests::error_chain;

pub struct PolicyTask {
    node_name: String,
    syncer: PolicySyncer<AyaPolicyMaps>,
    veths: PodVeths,
    metrics: Arc<Metrics>,
    published: Arc<RwLock<Published>>,
}

impl PolicyTask {
    /// Starts watching the pod veths and brings the programs onto those that exist.
    pub async fn start(
        cfg: &crate::config::Config,
        reconciler: PolicyReconciler<AyaPolicyMaps>,
        datapath: &mut Datapath,
        metrics: &Arc<Metrics>,
        published: &Arc<RwLock<Published>>,
    ) -> Result<Self, LinksError> {
        let task = Self {
            node_name: cfg.node_name.clone(),
            syncer: PolicySyncer::new(cfg.node_name.clone(), reconciler),
            veths: PodVeths::start()?,
            metrics: metrics.clone(),
            published: published.clone(),
        };
        task.sync_links(datapath).await;
        Ok(task)
    }

    /// Resolves when a pod veth appeared, was renamed or went.
    pub async fn links_changed(&self) {
        self.veths.changed().await;
    }

    /// Brings the policy programs onto exactly the pod veths that exist now.
    pub async fn sync_links(&self, datapath: &mut Datapath) {
        let metrics = &self.metrics;
        let veths = match self.veths.list().await {
            Ok(v) => v,
            Err(e) => {
                log::error!("{}", error_chain(&e));
                metrics.policy.pod_link_errors.inc();
                return;
            }
        };
        let report = datapath.sync_pod_links(&veths);
        for name in &report.attached {
            log::debug!("NetworkPolicy programs on pod veth {name}");
        }
        for (name, e) in &report.failed {
            // A veth removed between the dump and the attach fails here too; the next event
            // or resync settles it.
            log::warn!("pod veth {name}: {}", error_chain(e));
            metrics.policy.pod_link_errors.inc();
        }
        metrics
            .policy
            .pod_links
            .set(i64::try_from(datapath.pod_links().len()).unwrap_or(i64::MAX));
        self.sync_endpoints(datapath).await;
    }

    /// The fast path's local endpoints from the same pod veths (`crate::fastpath`).
    async fn sync_endpoints(&self, datapath: &mut Datapath) {
        let endpoints = match self.veths.endpoints().await {
            Ok(e) => e,
            Err(e) => {
                log::warn!("fast path endpoints: {}", error_chain(&e));
                return;
            }
        };
        let maps = match datapath.fastpath_maps() {
            Ok(m) => m,
            Err(e) => {
                log::error!("fast path maps: {}", error_chain(&e));
                return;
            }
        };
        match maps.sync_endpoints(&endpoints) {
            Ok(done) if done.written + done.deleted > 0 => {
                log::debug!("fast path endpoints: {done:?}");
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("fast path endpoints: {}", error_chain(&e));
                self.metrics.map_error(e.map().name(), e.metric_label());
            }
        }
        let known = endpoints
            .values()
            .filter(|e| e.flags & twill_common::LXC_F_MAC_KNOWN != 0)
            .count();
        self.metrics
            .set_fastpath_endpoints(known, endpoints.len() - known);
    }

    /// Compiles and applies what changed, then hands the compiled state to the API.
    pub fn sync(&mut self, stores: &Stores, network: &NetworkState) {
        let node = stores.node(&self.node_name);
        let addrs = node_addresses(node.as_deref(), &network.nodeport_addresses);
        self.syncer.sync(stores, addrs, &self.metrics);
        let state = self.syncer.state();
        let mut p = self
            .published
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !Arc::ptr_eq(&p.policy, &state) {
            p.policy = state;
            p.policy_objects = self.syncer.objects();
        }
    }

    /// When to retry after a failed apply.
    pub fn retry_delay(&self) -> Option<std::time::Duration> {
        self.syncer.retry_delay()
    }
}
