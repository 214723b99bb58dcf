//! Prometheus metrics (kube-proxy's names where kube-proxy has one).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Handles to every metric of the agent. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    pub programming_duration: Histogram,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    verdicts: Family<Labels, Counter>,
    map_errors: Family<Labels, Counter>,
    invalid_objects: Family<Labels, Counter>,
    pub sync_errors: Counter,
    pub manifest_errors: Counter,
    network_errors: Family<Labels, Counter>,
    pub peer_routes: Gauge,
    source_errors: Family<Labels, Counter>,
    /// NetworkPolicy's metrics.
    pub policy: crate::policy::PolicyMetrics,
    /// Entries of the connection-tracking table at the last collection.
    pub conntrack_entries: Gauge,
    /// Local pods the fast path delivers into, and those of them whose MAC is known.
    pub fastpath_endpoints: Family<Labels, Gauge>,
    conntrack_collected: Family<Labels, Counter>,
    dns_queries: Family<Labels, Counter>,
    /// DNS packets dropped without an answer (not a DNS query, or not one that parses).
    pub dns_dropped: Counter,
    /// The DNS forwarder's cache and upstream metrics.
    pub dns_forward: std::sync::Arc<crate::dns::ForwardMetrics>,
    /// Services the compiler programmed that the maps have no room for.
    pub unprogrammed_services: Gauge,
    /// Last absolute kernel counter per verdict: the kernel's counters are absolute, Prometheus
    /// counters only go up by deltas.
    last_verdicts: Mutex<BTreeMap<String, u64>>,
    /// Rejections already counted, so an invalid object counts once, not once per compile.
    counted_rejections: Mutex<BTreeSet<(String, String, String, String)>>,
}

/// Registers `metric` under `name` and returns the handle the agent updates (the registry keeps
/// a clone; both share one value).
pub(crate) fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The connection-tracking collector's metrics.
fn register_conntrack(registry: &mut Registry) -> (Gauge, Family<Labels, Counter>) {
    let entries = registered(
        registry,
        "twill_conntrack_entries",
        "Entries of the per-packet connection-tracking table (two per flow) at the last collection",
        Gauge::default(),
    );
    let collected = registered(
        registry,
        "twill_conntrack_collected",
        "Connection-tracking entries removed by the collector, by reason (expired, orphaned)",
        Family::<Labels, Counter>::default(),
    );
    (entries, collected)
}

/// The DNS responder's metrics.
fn register_dns(registry: &mut Registry) -> (Family<Labels, Counter>, Counter) {
    let queries = registered(
        registry,
        "twill_dns_queries",
        "DNS queries answered, by question type, response code and transport",
        Family::<Labels, Counter>::default(),
    );
    let dropped = registered(
        registry,
        "twill_dns_dropped",
        "DNS packets dropped without an answer (malformed, or not a query)",
        Counter::default(),
    );
    (queries, dropped)
}

/// Buckets of kube-proxy's sync histogram (exponential from 1 ms).
fn sync_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Sets the fast path's endpoint gauges.
    pub fn set_fastpath_endpoints(&self, known: usize, unknown: usize) {
        for (label, n) in [("known", known), ("unknown", unknown)] {
            self.fastpath_endpoints
                .get_or_create(&labels(&[("mac", label)]))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one registration per exported metric, in one place, so the list reads as the agent's metric catalogue"
    )]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_duration = registered(
            &mut registry,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one compile + apply of the datapath maps took",
            Histogram::new(sync_buckets()),
        );
        let programming_duration = registered(
            &mut registry,
            "kubeproxy_network_programming_duration_seconds",
            "Time from a Service/EndpointSlice change being seen to the datapath applying it",
            Histogram::new(sync_buckets()),
        );
        let services = registered(
            &mut registry,
            "twill_services",
            "Services with at least one programmed frontend",
            Gauge::default(),
        );
        let endpoints = registered(
            &mut registry,
            "twill_endpoints",
            "Distinct backends programmed",
            Gauge::default(),
        );
        let last_sync_timestamp = registered(
            &mut registry,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful apply",
            Gauge::<f64, AtomicU64>::default(),
        );
        let verdicts = registered(
            &mut registry,
            "twill_datapath_verdicts",
            "Datapath verdicts by reason (kernel per-CPU counters)",
            Family::<Labels, Counter>::default(),
        );
        let map_errors = registered(
            &mut registry,
            "twill_map_errors",
            "Failed map writes by map and kind (full, syscall)",
            Family::<Labels, Counter>::default(),
        );
        let invalid_objects = registered(
            &mut registry,
            "twill_invalid_objects",
            "Objects skipped as invalid, by kind and reason",
            Family::<Labels, Counter>::default(),
        );
        let sync_errors = registered(
            &mut registry,
            "twill_sync_errors",
            "Compile/apply runs that did not fully apply",
            Counter::default(),
        );
        let manifest_errors = registered(
            &mut registry,
            "twill_manifest_errors",
            "Manifest files that failed to parse",
            Counter::default(),
        );
        let network_errors = registered(
            &mut registry,
            "twill_network_errors",
            "Failed syncs of the node network (routes, overlay, masquerade, tc attach), by reason",
            Family::<Labels, Counter>::default(),
        );
        let peer_routes = registered(
            &mut registry,
            "twill_peer_routes",
            "Routes to other nodes' pod CIDRs in the applied route plan",
            Gauge::default(),
        );
        let source_errors = registered(
            &mut registry,
            "twill_source_errors",
            "Watch/list errors of the Kubernetes source, by kind",
            Family::<Labels, Counter>::default(),
        );
        let policy = crate::policy::PolicyMetrics::register(&mut registry);
        let (conntrack_entries, conntrack_collected) = register_conntrack(&mut registry);
        let (dns_queries, dns_dropped) = register_dns(&mut registry);
        let dns_forward = std::sync::Arc::new(crate::dns::ForwardMetrics::register(&mut registry));
        let fastpath_endpoints = registered(
            &mut registry,
            "twill_fastpath_endpoints",
            "Local pod addresses (both families) in the host-routing endpoint maps, by whether \
             their MAC is known (mac=\"known\": delivered with bpf_redirect_peer; \"unknown\": \
             through the stack)",
            Family::<Labels, Gauge>::default(),
        );
        let unprogrammed_services = registered(
            &mut registry,
            "twill_unprogrammed_services",
            "Services with frontends the maps had no room for (a full map; retried on every change and resync)",
            Gauge::default(),
        );
        Self {
            policy,
            registry: Mutex::new(registry),
            conntrack_entries,
            fastpath_endpoints,
            conntrack_collected,
            dns_queries,
            dns_dropped,
            dns_forward,
            sync_duration,
            programming_duration,
            services,
            endpoints,
            last_sync_timestamp,
            verdicts,
            map_errors,
            invalid_objects,
            sync_errors,
            manifest_errors,
            network_errors,
            peer_routes,
            source_errors,
            unprogrammed_services,
            last_verdicts: Mutex::default(),
            counted_rejections: Mutex::default(),
        }
    }

    pub fn invalid_object(&self, kind: &str, reason: &str) {
        self.invalid_objects
            .get_or_create(&labels(&[("kind", kind), ("reason", reason)]))
            .inc();
    }

    /// Counts the compiler's invalid objects that were not counted before; forgets those that
    /// disappeared, so an object fixed and broken again counts again.
    pub fn compiler_rejections<'a>(
        &self,
        current: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a str)>,
    ) {
        let current: BTreeSet<(String, String, String, String)> = current
            .into_iter()
            .map(|(k, ns, n, r)| (k.to_owned(), ns.to_owned(), n.to_owned(), r.to_owned()))
            .collect();
        let mut seen = self
            .counted_rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, _, _, reason) in current.difference(&seen) {
            self.invalid_object(kind, reason);
        }
        *seen = current;
    }

    pub fn map_error(&self, map: &str, kind: &str) {
        self.map_errors
            .get_or_create(&labels(&[("map", map), ("kind", kind)]))
            .inc();
    }

    pub fn network_error(&self, reason: &str) {
        self.network_errors
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    pub fn conntrack_collected(&self, reason: &str, n: usize) {
        self.conntrack_collected
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn dns_query(&self, qtype: &str, rcode: &str, transport: &str) {
        self.dns_queries
            .get_or_create(&labels(&[
                ("type", qtype),
                ("rcode", rcode),
                ("transport", transport),
            ]))
            .inc();
    }

    pub fn source_error(&self, kind: &str) {
        self.source_errors
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
    }

    /// Feeds absolute kernel counters (`reason` → total over CPUs).
    pub fn set_verdicts<'a>(&self, totals: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut last = self
            .last_verdicts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (reason, total) in totals {
            let prev = last.insert(reason.to_owned(), total).unwrap_or(0);
            let counter = self.verdicts.get_or_create(&labels(&[("reason", reason)]));
            // A smaller total means the maps were recreated: count from the new base.
            counter.inc_by(if total >= prev { total - prev } else { total });
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_kube_proxy_names() {
        let m = Metrics::new();
        m.sync_duration.observe(0.01);
        m.invalid_object("Service", "bad_ip");
        m.map_error("map_a", "full");
        m.sync_errors.inc();
        m.services.set(3);
        let text = m.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds",
            "twill_services 3",
            "twill_endpoints",
            "twill_invalid_objects_total{kind=\"Service\",reason=\"bad_ip\"} 1",
            "twill_map_errors_total{map=\"map_a\",kind=\"full\"} 1",
            "twill_sync_errors_total 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn rejections_count_once_per_appearance() {
        let m = Metrics::new();
        let r = [("Service", "a", "b", "bad_ip")];
        m.compiler_rejections(r);
        m.compiler_rejections(r);
        assert!(
            m.render()
                .contains("twill_invalid_objects_total{kind=\"Service\",reason=\"bad_ip\"} 1")
        );
        m.compiler_rejections([]);
        m.compiler_rejections(r);
        assert!(
            m.render()
                .contains("twill_invalid_objects_total{kind=\"Service\",reason=\"bad_ip\"} 2")
        );
    }

    #[test]
    fn verdicts_follow_absolute_kernel_counters() {
        let m = Metrics::new();
        m.set_verdicts([("forwarded", 10)]);
        m.set_verdicts([("forwarded", 15)]);
        assert!(
            m.render()
                .contains("twill_datapath_verdicts_total{reason=\"forwarded\"} 15")
        );
    }
}
