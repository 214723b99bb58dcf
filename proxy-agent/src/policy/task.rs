//! NetworkPolicy's part of the agent's run loop: the policy compile + apply after each Service
//! sync, the pod veths' programs on link events and every resync, and the conntrack sweep.
use std::sync::{Arc, RwLock};

use super::links::{LinksError, PodVeths};
use super::{PolicyReconciler, PolicySyncer, ct, node_addresses};
use crate::api::Published;
use crate::datapath::{AyaPolicyMaps, Datapath, monotonic_now_ns};
use crate::metrics::Metrics;
use crate::node_net::NetworkState;
use crate::source::Stores;
use crate::source::manifests::error_chain;

/// What woke the policy task.
pub enum PolicyEvent {
    /// A pod veth appeared, was renamed or went.
    Links,
    /// Time to collect expired conntrack entries.
    Sweep,
}

pub struct PolicyTask {
    node_name: String,
    syncer: PolicySyncer<AyaPolicyMaps>,
    veths: PodVeths,
    sweep: tokio::time::Interval,
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
        let mut sweep = tokio::time::interval(ct::SWEEP_PERIOD);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let task = Self {
            node_name: cfg.node_name.clone(),
            syncer: PolicySyncer::new(cfg.node_name.clone(), reconciler),
            veths: PodVeths::start()?,
            sweep,
            metrics: metrics.clone(),
            published: published.clone(),
        };
        task.sync_links(datapath).await;
        Ok(task)
    }

    /// The next link event or sweep time.
    pub async fn next_event(&mut self) -> PolicyEvent {
        tokio::select! {
            () = self.veths.changed() => PolicyEvent::Links,
            _ = self.sweep.tick() => PolicyEvent::Sweep,
        }
    }

    pub async fn handle(&mut self, event: PolicyEvent, datapath: &mut Datapath) {
        match event {
            PolicyEvent::Links => self.sync_links(datapath).await,
            PolicyEvent::Sweep => self.sweep_ct(),
        }
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
    }

    /// Removes expired NetworkPolicy conntrack entries.
    fn sweep_ct(&mut self) {
        let metrics = &self.metrics;
        let maps = self.syncer.reconciler_mut().maps_mut();
        match maps.sweep_ct(monotonic_now_ns(), ct::expired) {
            Ok(sweep) => {
                metrics
                    .policy
                    .ct_expired
                    .inc_by(u64::try_from(sweep.removed).unwrap_or(u64::MAX));
            }
            Err(e) => log::warn!(
                "sweeping NetworkPolicy conntrack entries: {}",
                error_chain(&e)
            ),
        }
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
