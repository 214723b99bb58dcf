//! Control-plane scale check at 10,000 Services with 50,000 endpoints, in process: the agent's
//! path (objects parsed into the stores, the incremental compiler, the reconciler applying to
//! the in-memory fake) for the whole cluster, for one more Service, for one changed endpoint and
//! for nothing; the from-scratch compile for comparison; the heap each part holds.
//! Numbers only, no assertions: `cargo run --release -p twill-agent --example cp_scale`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use twill_agent::compile::{
    CompileConfig, Compiler, IdAllocation, Inputs, Interner, compile, render_dump,
};
use twill_agent::lbmap::FakeLbMaps;
use twill_agent::reconcile::Reconciler;
use twill_agent::source::{Change, Object, Stores};

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

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[expect(clippy::cast_precision_loss, reason = "display only")]
fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// What a source hands the stores for Service `i` and its slice.
fn ingest(
    services: &[Service],
    slices: &[EndpointSlice],
    i: usize,
    interner: &mut Interner,
) -> [Change; 2] {
    [
        Change::Upsert(Object::service(&services[i], interner).expect("keyed")),
        Change::Upsert(Object::slice(&slices[i], interner).expect("keyed")),
    ]
}

#[expect(clippy::too_many_lines, reason = "one measurement after the other")]
fn main() {
    let before = live();
    let (services, mut slices) = objects(SERVICES + 1);
    let objects_heap = live() - before;
    let config = CompileConfig::new("node-0");
    let n = SERVICES as usize;

    // From scratch, as every change cost before the incremental compiler.
    let inputs = |n: usize, ids| Inputs {
        services: services.iter().take(n).collect(),
        endpoint_slices: slices.iter().take(n).collect(),
        node: None,
        config: &config,
        ids,
    };
    let empty = IdAllocation::default();
    let t = Instant::now();
    let scratch = compile(&inputs(n, &empty));
    let scratch_full = t.elapsed();
    let t = Instant::now();
    let scratch_one = compile(&inputs(n + 1, &scratch.ids));
    let scratch_plus_one = t.elapsed();
    drop(scratch_one);

    // The agent's path: the stores, the incremental compiler, the reconciler.
    let mut interner = Interner::default();
    let stores = Stores::new();
    let before = live();
    let t = Instant::now();
    stores.apply((0..n).flat_map(|i| ingest(&services, &slices, i, &mut interner)));
    let ingest_full = t.elapsed();
    let stores_heap = live() - before;

    let before = live();
    let mut compiler = Compiler::new(IdAllocation::default());
    let t = Instant::now();
    compiler.update(&config, None, stores.take_changes(true).groups);
    let changes = compiler.take_changes();
    let compile_full = t.elapsed();
    let compiler_heap = live() - before;

    let before = live();
    let mut rec = Reconciler::new(FakeLbMaps::default());
    let t = Instant::now();
    let stats = rec
        .apply_changes(compiler.state(), &changes, true)
        .expect("apply");
    let apply_full = t.elapsed();
    // Less the fake's copy of the maps, which are the kernel's memory in the agent.
    let reconciler_heap = live() - before - heap_of(&rec.maps().state);

    // One more Service: the source's parse, the stores, the compile, the diff and the writes.
    let t0 = Instant::now();
    stores.apply(ingest(&services, &slices, n, &mut interner));
    let t1 = Instant::now();
    let dirty = stores.take_changes(false);
    let update = compiler.update(&config, None, dirty.groups);
    let changes = compiler.take_changes();
    let t2 = Instant::now();
    let stats_one = rec
        .apply_changes(compiler.state(), &changes, true)
        .expect("apply one more");
    let t3 = Instant::now();

    // One endpoint of one Service becomes not ready.
    let mut slice = slices[n / 2].clone();
    if let Some(e) = slice.endpoints.as_mut().and_then(|e| e.first_mut()) {
        e.conditions = Some(EndpointConditions {
            ready: Some(false),
            serving: Some(false),
            terminating: Some(true),
        });
    }
    slices[n / 2] = slice;
    let t = Instant::now();
    stores.apply([Change::Upsert(
        Object::slice(&slices[n / 2], &mut interner).expect("keyed"),
    )]);
    compiler.update(&config, None, stores.take_changes(false).groups);
    let changes_ep = compiler.take_changes();
    let stats_ep = rec
        .apply_changes(compiler.state(), &changes_ep, true)
        .expect("apply endpoint change");
    let endpoint_change = t.elapsed();

    let t = Instant::now();
    compiler.update(&config, None, stores.take_changes(false).groups);
    let noop_changes = compiler.take_changes();
    let noop = rec
        .apply_changes(compiler.state(), &noop_changes, true)
        .expect("no-op apply");
    let apply_noop = t.elapsed();

    let t = Instant::now();
    let noop_full = rec.apply(compiler.state(), true).expect("full no-op apply");
    let apply_noop_full = t.elapsed();

    let t = Instant::now();
    let model = compiler.model();
    let model_time = t.elapsed();
    let t = Instant::now();
    let dump = render_dump(compiler.state(), &model);
    let render = t.elapsed();

    let counts = compiler.counts();
    println!(
        "services={} endpoints={}",
        counts.services, counts.endpoints
    );
    println!(
        "entries: services={} slots={} backends={}",
        compiler.state().services.len(),
        compiler.state().slots.len(),
        compiler.state().backends.len()
    );
    println!(
        "from scratch: compile 10k: {:.1} ms; compile 10k+1: {:.1} ms",
        ms(scratch_full),
        ms(scratch_plus_one)
    );
    println!(
        "ingest 10k into the stores (parse at arrival): {:.1} ms",
        ms(ingest_full)
    );
    println!(
        "compile 10k (incremental, all new): {:.1} ms",
        ms(compile_full)
    );
    println!(
        "apply 10k to fake: {:.1} ms ({} writes)",
        ms(apply_full),
        stats.writes()
    );
    println!(
        "add one with 10k present: {:.3} ms = ingest {:.3} + compile {:.3} ({} Service recompiled, {} keys changed) + apply {:.3} ({} writes)",
        ms(t3 - t0),
        ms(t1 - t0),
        ms(t2 - t1),
        update.recompiled,
        changes.len(),
        ms(t3 - t2),
        stats_one.writes()
    );
    println!(
        "one endpoint not ready: {:.3} ms ({} writes)",
        ms(endpoint_change),
        stats_ep.writes()
    );
    println!(
        "no-op sync: {:.3} ms ({} writes); no-op full diff: {:.1} ms ({} writes)",
        ms(apply_noop),
        noop.writes(),
        ms(apply_noop_full),
        noop_full.writes()
    );
    println!(
        "dump model: {:.3} ms; render dump: {:.1} ms ({} bytes)",
        ms(model_time),
        ms(render),
        dump.len()
    );
    println!(
        "heap: stores (10k Services + 10k EndpointSlices, parsed) {:.2} MiB",
        mib(stores_heap)
    );
    println!(
        "heap: Compiler (desired LbState, ids, per-Service memo and models) {:.2} MiB",
        mib(compiler_heap)
    );
    println!(
        "heap: of which LbState {:.2} MiB, IdAllocation {:.2} MiB",
        mib(heap_of(compiler.state())),
        mib(heap_of(compiler.ids()))
    );
    println!(
        "heap: Reconciler (applied + index) {:.2} MiB",
        mib(reconciler_heap)
    );
    println!(
        "heap: DumpModel handed out {:.2} MiB (the port models are shared with the memo)",
        mib(heap_of(&model))
    );
    println!(
        "heap: the same inputs as k8s-openapi objects {:.2} MiB (no longer kept)",
        mib(objects_heap)
    );
}
