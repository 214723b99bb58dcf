//! The Service sync against fake maps: prune after sync, a full map, failed applies.
use std::path::Path;

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::report::RETRY_MIN;
use super::*;
use crate::compile::{Compiler, IdAllocation};
use crate::config::{FileConfig, merge};
use crate::lbmap::LbMaps;
use crate::lbmap::{FakeLbMaps, FaultPlan, FaultyLbMaps};
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::source::Stores;
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

fn syncer<M: LbMaps + VerdictStats>(dir: &Path, maps: M) -> (Syncer<M>, Arc<Stores>, Arc<Metrics>) {
    let ctx = Context::new(config(dir));
    let (stores, metrics) = (ctx.stores.clone(), ctx.metrics.clone());
    (
        Syncer::new(ctx, Reconciler::adopt(maps).unwrap()),
        stores,
        metrics,
    )
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
    // (The CNI config from the Node's podCIDRs: `cniconf::tests`, written by `NodeNetwork`.)
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
    let ctx = Context::new(config(dir.path()));
    let (stores, metrics) = (ctx.stores.clone(), ctx.metrics.clone());
    let (health, published) = (ctx.health.clone(), ctx.published.clone());
    let mut s = Syncer::new(ctx, Reconciler::adopt(fake).unwrap());
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
