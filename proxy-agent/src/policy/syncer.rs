//! The run loop's NetworkPolicy step: when a Pod, Namespace or NetworkPolicy changed (or this
//! node's addresses did), compile the whole policy state (`twill_core::policy::compile`, ids kept
//! stable across compiles) and apply the difference through the reconciler. Level-triggered like
//! the Service path: the stores only say *that* something changed; the compile reads them.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use twill_core::policy::PolicyState;

use super::PolicyMaps;
use super::{PolicyApplyStats, PolicyReconcileError, PolicyReconciler};
use crate::metrics::Metrics;
use crate::source::manifests::error_chain;
use crate::source::{PolicyObjects, Stores};

/// Retry delays after a failed apply: doubling from the first to the last.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// One node's policy compile and apply.
pub struct PolicySyncer<M> {
    node_name: String,
    reconciler: PolicyReconciler<M>,
    inputs: Arc<PolicyObjects>,
    node_addrs: Vec<IpAddr>,
    state: Arc<PolicyState>,
    /// Whether the compiler has been fed the whole stores once.
    loaded: bool,
    /// The compiled state differs from what was last applied in full (new compile, failed
    /// apply, or pruning not done yet).
    needs_apply: bool,
    pruned: bool,
    failures: u32,
}

impl<M: PolicyMaps> PolicySyncer<M> {
    /// `reconciler` should come from `PolicyReconciler::adopt`.
    pub fn new(node_name: impl Into<String>, reconciler: PolicyReconciler<M>) -> Self {
        Self {
            node_name: node_name.into(),
            reconciler,
            inputs: Arc::default(),
            node_addrs: Vec::new(),
            state: Arc::default(),
            loaded: false,
            needs_apply: true,
            pruned: false,
            failures: 0,
        }
    }

    /// The last compiled state (what `debug policy` and `debug explain` answer from).
    pub fn state(&self) -> Arc<PolicyState> {
        self.state.clone()
    }

    /// The Pods, Namespaces and NetworkPolicies the state was compiled from.
    pub fn objects(&self) -> Arc<PolicyObjects> {
        self.inputs.clone()
    }

    pub fn reconciler(&self) -> &PolicyReconciler<M> {
        &self.reconciler
    }

    pub fn reconciler_mut(&mut self) -> &mut PolicyReconciler<M> {
        &mut self.reconciler
    }

    /// Delay before retrying after consecutive failed applies (capped exponential); `None`
    /// when the last apply succeeded.
    pub fn retry_delay(&self) -> Option<Duration> {
        (self.failures > 0).then(|| {
            let exp = self.failures.saturating_sub(1).min(10);
            (RETRY_MIN * 2u32.pow(exp)).min(RETRY_MAX)
        })
    }

    /// Compiles if anything changed and applies what differs. `node_addrs`: this node's own
    /// addresses (identity HOST: always allowed into its pods). Prunes once every source
    /// synced. Returns whether the maps hold the compiled state.
    pub fn sync(
        &mut self,
        stores: &Stores,
        mut node_addrs: Vec<IpAddr>,
        metrics: &Metrics,
    ) -> bool {
        let started = Instant::now();
        node_addrs.sort_unstable();
        node_addrs.dedup();
        let mut recompile = false;
        if let Some(inputs) = stores.take_policy(!self.loaded) {
            self.inputs = Arc::new(inputs);
            self.loaded = true;
            recompile = true;
        }
        if node_addrs != self.node_addrs {
            self.node_addrs = node_addrs;
            recompile = true;
        }
        if recompile {
            let prev = self.state.ids.clone();
            self.state = Arc::new(twill_core::policy::compile(
                self.inputs.pods.values().map(|p| &**p),
                self.inputs.namespaces.values().map(|n| &**n),
                self.inputs.policies.values().map(|p| &**p),
                &self.node_name,
                &self.node_addrs,
                &prev,
            ));
            self.needs_apply = true;
            let counts = self.state.counts;
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            metrics.policy.policies.set(gauge(counts.policies));
            metrics.policy.endpoints.set(gauge(counts.local_endpoints));
            metrics.policy.identities.set(gauge(counts.identities));
            metrics
                .policy
                .rules
                .set(gauge(self.state.maps.policy.len()));
        }
        let prune = stores.is_synced();
        if prune && !self.pruned {
            self.needs_apply = true;
        }
        if !self.needs_apply {
            return true;
        }
        let result = self.reconciler.apply(&self.state.maps, prune);
        metrics
            .policy
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.report(&result, metrics, prune)
    }

    fn report(
        &mut self,
        result: &Result<PolicyApplyStats, PolicyReconcileError>,
        metrics: &Metrics,
        prune: bool,
    ) -> bool {
        match result {
            Ok(stats) => {
                if stats.writes() > 0 {
                    log::debug!("policy maps applied (prune={prune}): {stats:?}");
                }
                self.needs_apply = false;
                self.pruned |= prune;
                self.failures = 0;
                true
            }
            Err(e) => {
                let full = e.full_maps();
                if full.is_empty() {
                    log::error!("applying the NetworkPolicy maps: {}", error_chain(e));
                } else {
                    // Never a silent allow: what could not be written leaves pods isolated
                    // (denying), and the operator is told which map to grow.
                    log::error!(
                        "NetworkPolicy map(s) full: {}; raise {}: {}",
                        full.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
                        full.iter()
                            .filter_map(|m| m.spec().size_flag)
                            .map(|f| format!("--{f}"))
                            .collect::<Vec<_>>()
                            .join(" / "),
                        error_chain(e)
                    );
                }
                metrics.policy.sync_errors.inc();
                for me in e.map_errors() {
                    metrics.map_error(me.map().name(), me.metric_label());
                }
                self.failures = self.failures.saturating_add(1);
                false
            }
        }
    }
}

/// This node's own addresses as the policy compiler needs them (identity HOST): the Node's
/// InternalIP and ExternalIP addresses and the addresses of its devices.
pub fn node_addresses(node: Option<&Node>, device_addrs: &[Ipv4Addr]) -> Vec<IpAddr> {
    // Both families of the Node's addresses: a dual-stack node's IPv6 InternalIP is the source
    // of its IPv6 traffic into its pods (kubelet probes of an IPv6 pod).
    let from_node = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok());
    from_node
        .chain(device_addrs.iter().copied().map(IpAddr::V4))
        .collect()
}
