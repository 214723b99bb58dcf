//! Control-plane scale check: compile and apply (to the in-memory fake) 10,000 Services with
//! 50,000 endpoints, then one more Service; prints times and the heap held by the results.
//! Numbers only, no assertions: `cargo run --release -p twill-agent --example cp_scale`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use twill_agent::compile::{CompileConfig, IdAllocation, Inputs, compile, render_dump};
use twill_agent::lbmap::FakeLbMaps;
use twill_agent::reconcile::Reconciler;

/// Counts live heap bytes, so the size of a structure is the difference around building it.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn heap_of<T: Clone>(value: &T) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    let copy = value.clone();
    let size = LIVE.load(Ordering::Relaxed) - before;
    drop(copy);
    size
}

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 5;

fn objects(n: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i:05}");
        let [_, _, hi, lo] = i.to_be_bytes();
        services.push(Service {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some("bench".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{hi}.{lo}")),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        });
        let endpoints = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let pod = i * ENDPOINTS_PER_SERVICE + e;
                let [_, a, b, c] = pod.to_be_bytes();
                Endpoint {
                    addresses: vec![format!("10.{}.{b}.{c}", 128 + a)],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(format!("node-{}", pod % 100)),
                    ..Endpoint::default()
                }
            })
            .collect();
        slices.push(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-abcde")),
                namespace: Some("bench".into()),
                labels: Some([("kubernetes.io/service-name".to_owned(), name)].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        });
    }
    (services, slices)
}

fn main() {
    let before = LIVE.load(Ordering::Relaxed);
    let (services, slices) = objects(SERVICES + 1);
    let objects_heap = LIVE.load(Ordering::Relaxed) - before;
    let config = CompileConfig::new("node-0");
    let inputs = |n: usize, ids| Inputs {
        services: services.iter().take(n).collect(),
        endpoint_slices: slices.iter().take(n).collect(),
        node: None,
        config: &config,
        ids,
    };

    let empty = IdAllocation::default();
    let t = Instant::now();
    let full = compile(&inputs(SERVICES as usize, &empty));
    let compile_full = t.elapsed();

    let mut rec = Reconciler::new(FakeLbMaps::default());
    let t = Instant::now();
    let stats = rec.apply(&full.state, true).expect("apply");
    let apply_full = t.elapsed();

    let t = Instant::now();
    let plus_one = compile(&inputs(SERVICES as usize + 1, &full.ids));
    let compile_one = t.elapsed();
    let t = Instant::now();
    let stats_one = rec.apply(&plus_one.state, true).expect("apply one more");
    let apply_one = t.elapsed();

    let t = Instant::now();
    let noop = rec.apply(&plus_one.state, true).expect("no-op apply");
    let apply_noop = t.elapsed();

    let t = Instant::now();
    let dump = render_dump(&plus_one.state, &plus_one.model);
    let render = t.elapsed();

    println!(
        "services={} endpoints={}",
        full.counts.services, full.counts.endpoints
    );
    println!(
        "entries: services={} slots={} backends={}",
        full.state.services.len(),
        full.state.slots.len(),
        full.state.backends.len()
    );
    println!("compile 10k: {:.1} ms", compile_full.as_secs_f64() * 1e3);
    println!(
        "apply 10k to fake: {:.1} ms ({} writes)",
        apply_full.as_secs_f64() * 1e3,
        stats.writes()
    );
    println!(
        "compile 10k+1: {:.1} ms; apply the difference: {:.3} ms ({} writes)",
        compile_one.as_secs_f64() * 1e3,
        apply_one.as_secs_f64() * 1e3,
        stats_one.writes()
    );
    println!(
        "no-op apply: {:.1} ms ({} writes)",
        apply_noop.as_secs_f64() * 1e3,
        noop.writes()
    );
    println!(
        "render dump: {:.1} ms ({} bytes)",
        render.as_secs_f64() * 1e3,
        dump.len()
    );
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!("heap: LbState {:.2} MiB", mib(heap_of(&plus_one.state)));
    println!("heap: DumpModel {:.2} MiB", mib(heap_of(&plus_one.model)));
    println!("heap: IdAllocation {:.2} MiB", mib(heap_of(&plus_one.ids)));
    println!(
        "heap: Reconciler.applied {:.2} MiB",
        mib(heap_of(rec.applied()))
    );
    println!(
        "heap: input objects (Services + EndpointSlices) {:.2} MiB",
        mib(objects_heap)
    );
}
