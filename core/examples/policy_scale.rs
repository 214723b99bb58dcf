//! Compile time and memory of the NetworkPolicy compiler at the scale: 1,000 policies
//! over 10,000 pods (100 namespaces of 100 pods, 10 apps each, spread over 91 nodes so this node
//! holds ~110), 10 policies per namespace of the shapes clusters use (default deny, allow from the
//! same app on a port, from a monitoring namespace, from an ingress namespace on a named port,
//! egress to DNS and to an ipBlock with an except). Target: compile ≤ 1 s.
//!
//! `cargo run --release -p twill-core --example policy_scale [wide] [unique]`
//!
//! `wide` makes one policy per namespace allow port 8080 from every namespace
//! (`namespaceSelector: {}`): every local pod then allows every pod identity, the policy map's
//! worst case (endpoints x identities). `unique` gives every pod its own label (as StatefulSet
//! pods have `statefulset.kubernetes.io/pod-name`) and makes a peer selector name that key, so
//! the label tells pods apart: 10,000 pod identities instead of 1,000.
//!
//! Memory is counted by a wrapping global allocator: the peak heap during the compile above what
//! was live before it, and what the resulting `PolicyState` keeps.
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use twill_core::policy::{ParsedPolicy, PolicyIds, PolicyNamespace, PolicyPod, compile};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const APPS_PER_NS: usize = 10;
const NODES: usize = 91;
const NODE: &str = "node-0";

fn mib(bytes: usize) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "a printed size in MiB; the precision loss is far below the last digit"
    )]
    let b = bytes as f64;
    b / (1024.0 * 1024.0)
}

fn pod(n: usize, ns: &str, p: usize, unique: bool) -> Pod {
    let i = n * PODS_PER_NS + p;
    let app = p % APPS_PER_NS;
    let mut labels = json!({"app": format!("app-{app}"), "version": "v1"});
    if unique {
        labels["statefulset.kubernetes.io/pod-name"] = json!(format!("pod-{p:03}"));
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("pod-{p:03}"),
            "namespace": ns,
            "labels": labels,
        },
        "spec": {
            "nodeName": format!("node-{}", i % NODES),
            "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "metrics", "containerPort": 9090},
            ]}],
        },
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)}],
        },
    }))
    .expect("valid Pod")
}

fn objects(wide: bool, unique: bool) -> (Vec<Pod>, Vec<Namespace>, Vec<NetworkPolicy>) {
    let (mut pods, mut namespaces, mut policies) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n:03}");
        let role = match n {
            0 => "monitoring",
            1 => "ingress",
            _ => "app",
        };
        namespaces.push(
            serde_json::from_value(json!({
                "metadata": {"name": ns, "labels": {"role": role, "team": format!("t{}", n % 7)}},
            }))
            .expect("valid Namespace"),
        );
        pods.extend((0..PODS_PER_NS).map(|p| pod(n, &ns, p, unique)));
        let policy = |name: String, spec: serde_json::Value| -> NetworkPolicy {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            }))
            .expect("valid NetworkPolicy")
        };
        policies.push(policy(
            "default-deny".into(),
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ));
        policies.push(policy(
            "allow-dns".into(),
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}},
                        "podSelector": {"matchLabels": {"app": "app-0"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }]}),
        ));
        for app in 0..6 {
            policies.push(policy(
                format!("app-{app}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                    "ingress": [
                        {"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (app + 1) % APPS_PER_NS)}}}],
                         "ports": [{"port": 8080}, {"port": 8443, "endPort": 8450}]},
                        {"from": [{"namespaceSelector": {"matchLabels": {"role": "monitoring"}}}],
                         "ports": [{"port": "metrics"}]},
                    ],
                    "egress": [
                        {"to": [{"podSelector": {"matchExpressions": [
                            {"key": "app", "operator": "In", "values": [format!("app-{}", (app + 2) % APPS_PER_NS)]}]}}],
                         "ports": [{"port": "http"}]},
                    ]}),
            ));
        }
        let from = if wide {
            json!({})
        } else {
            json!({"matchLabels": {"role": "ingress"}})
        };
        let mut peer = json!({"namespaceSelector": from});
        if unique {
            peer["podSelector"] = json!({"matchExpressions": [
                {"key": "statefulset.kubernetes.io/pod-name", "operator": "Exists"}]});
        }
        policies.push(policy(
            "from-ingress".into(),
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["app-9"]}]},
                "ingress": [{"from": [peer], "ports": [{"port": "http"}]}]}),
        ));
        policies.push(policy(
            "egress-external".into(),
            json!({"podSelector": {"matchLabels": {"app": "app-9"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                "except": ["10.0.0.0/8", format!("192.168.{n}.0/24")]}}],
                            "ports": [{"port": 443}]}]}),
        ));
    }
    (pods, namespaces, policies)
}

fn main() {
    let t = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wide = args.iter().any(|a| a == "wide");
    let unique = args.iter().any(|a| a == "unique");
    let (raw_pods, raw_namespaces, raw_policies) = objects(wide, unique);
    let generated = t.elapsed();

    let t = Instant::now();
    let pods: Vec<PolicyPod> = raw_pods
        .iter()
        .map(|p| PolicyPod::from_k8s(p).expect("valid"))
        .collect();
    let namespaces: Vec<PolicyNamespace> = raw_namespaces
        .iter()
        .map(|n| PolicyNamespace::from_k8s(n).expect("valid"))
        .collect();
    let policies: Vec<ParsedPolicy> = raw_policies
        .iter()
        .map(|p| ParsedPolicy::from_k8s(p).expect("valid"))
        .collect();
    let parsed = t.elapsed();
    drop((raw_pods, raw_namespaces, raw_policies));
    let inputs_live = LIVE.load(Ordering::Relaxed);
    let node_addrs = ["192.168.0.10".parse().expect("an address")];

    let mut ids = PolicyIds::default();
    let mut times = Vec::new();
    let mut peak_extra = 0;
    let mut kept = 0;
    for round in 0..5 {
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let t = Instant::now();
        let state = compile(&pods, &namespaces, &policies, NODE, &node_addrs, &ids);
        times.push(t.elapsed());
        peak_extra = peak_extra.max(PEAK.load(Ordering::Relaxed) - before);
        kept = LIVE.load(Ordering::Relaxed) - before;
        if round == 0 {
            let c = state.counts;
            println!(
                "inputs: {} pods, {} namespaces, {} policies (objects built in {generated:?}, parsed in {parsed:?})",
                pods.len(),
                namespaces.len(),
                c.policies
            );
            println!(
                "output: {} local endpoints, {} identities, {} ipBlocks, {} ipcache entries, {} policy entries, {} rules",
                c.local_endpoints,
                c.identities,
                c.ipblocks,
                state.maps.ipcache.len(),
                state.maps.policy.len(),
                state.rules.len()
            );
        }
        ids = black_box(state).ids;
    }
    let first = times[0];
    times.sort();
    println!(
        "compile: first (no previous ids) {first:?}, median of 5 {:?}, max {:?}",
        times[2], times[4]
    );
    println!(
        "memory: parsed inputs {:.1} MiB; peak heap during a compile {:.1} MiB above what was live; \
         the resulting PolicyState holds {:.1} MiB",
        mib(inputs_live),
        mib(peak_extra),
        mib(kept)
    );
}
