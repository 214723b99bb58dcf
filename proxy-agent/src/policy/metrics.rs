//! NetworkPolicy's Prometheus metrics (registered with the agent's others). Denied packets are
//! in `twill_datapath_verdicts_total{reason="policy_denied_ingress|policy_denied_egress"}`, a
//! full policy map in `twill_map_errors_total{map=<MapKind::Policy.name()>,kind="full"}`.
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::metrics::registered;

#[derive(Debug)]
pub struct PolicyMetrics {
    /// One compile + apply of the policy maps.
    pub sync_duration: Histogram,
    pub policies: Gauge,
    /// Local pods with a policy endpoint.
    pub endpoints: Gauge,
    pub identities: Gauge,
    /// Entries of the rule trie.
    pub rules: Gauge,
    pub sync_errors: Counter,
    /// Pod veths carrying the policy programs.
    pub pod_links: Gauge,
    pub pod_link_errors: Counter,
    /// Denied-flow events read from the kernel (`debug monitor`).
    pub monitor_events: Counter,
    /// Denied-flow events the kernel did not write (per-CPU rate limit or full ring buffer).
    pub monitor_lost: Counter,
}

impl PolicyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let buckets = || exponential_buckets(0.001, 2.0, 15);
        Self {
            sync_duration: registered(
                registry,
                "twill_policy_sync_duration_seconds",
                "Time one compile + apply of the NetworkPolicy maps took",
                Histogram::new(buckets()),
            ),
            policies: registered(
                registry,
                "twill_network_policies",
                "NetworkPolicies compiled (valid ones)",
                Gauge::default(),
            ),
            endpoints: registered(
                registry,
                "twill_policy_endpoints",
                "Local pods with a NetworkPolicy endpoint",
                Gauge::default(),
            ),
            identities: registered(
                registry,
                "twill_policy_identities",
                "Peer identities (distinct label sets and ipBlock regions)",
                Gauge::default(),
            ),
            rules: registered(
                registry,
                "twill_policy_rules",
                "Entries of the NetworkPolicy rule trie",
                Gauge::default(),
            ),
            sync_errors: registered(
                registry,
                "twill_policy_sync_errors",
                "NetworkPolicy applies that did not fully apply",
                Counter::default(),
            ),
            pod_links: registered(
                registry,
                "twill_pod_links",
                "Pod veths carrying the NetworkPolicy programs",
                Gauge::default(),
            ),
            pod_link_errors: registered(
                registry,
                "twill_pod_link_errors",
                "Failed attaches of the NetworkPolicy programs to pod veths",
                Counter::default(),
            ),
            monitor_events: registered(
                registry,
                "twill_policy_monitor_events",
                "Denied-flow events read from the kernel's ring buffer",
                Counter::default(),
            ),
            monitor_lost: registered(
                registry,
                "twill_policy_monitor_lost",
                "Denied-flow events not written by the kernel (per-CPU rate limit or full buffer)",
                Counter::default(),
            ),
        }
    }
}
