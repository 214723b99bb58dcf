//! Heap of the agent's NetworkPolicy inputs at the policy bench's scale (the policy bench's agent RSS
//! growth ≤ 50 MiB with 1,000 policies over 10,000 pods). Counted by a global allocator, so
//! the numbers are exact and the same on a loaded machine; no root, no lab.
//!
//! The allocator keeps most of a transient peak as RSS after it is freed, so the peak of
//! reading the manifests matters as much as what the stores keep: reading the bench's 3 MiB
//! Pod list as one `serde_json::Value` tree peaked 45 MiB above its result, streamed it peaks
//! about 1 MiB above.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use twill_agent::metrics::Metrics;
use twill_agent::source::Stores;
use twill_agent::source::manifests::{ManifestDir, parse_text};
use twill_lab::bench::policies::{BenchPods, Variant, World};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is `System.dealloc`'s.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// Runs `f`; returns its result, the bytes it left allocated and its peak above the start.
/// (Other threads of the test binary allocate little; this file has one test so none run.)
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = f();
    let live = LIVE.load(Ordering::Relaxed).saturating_sub(start);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(start);
    (out, live, peak)
}

fn world() -> (String, String) {
    let bench = BenchPods {
        client: [10, 1, 0, 2].into(),
        server: [10, 1, 0, 3].into(),
        other: [10, 1, 0, 4].into(),
    };
    let world = World::new(10_000, bench, "n1");
    let policies = Variant::Policies {
        fillers: 1_000,
        marker: 9100,
        extra: None,
    };
    (world.objects_json(), World::policies_json(policies))
}

#[test]
fn bench_world_inputs_stay_compact_and_parse_without_a_peak() {
    let (objects, policies) = world();
    // Streamed parse: the transient above the result is one item's tree, not the file's.
    for (what, text) in [
        ("Pods+Namespaces", &objects),
        ("NetworkPolicies", &policies),
    ] {
        let (parsed, live, peak) = measured(|| parse_text(Path::new("w.json"), text, true));
        let parsed = parsed.expect("the bench world parses");
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let over = peak - live;
        eprintln!(
            "{what}: {} KiB of JSON, {} objects: {live} B kept, peak {} B above that",
            text.len() / 1024,
            parsed.objects.len(),
            over
        );
        assert!(
            over < 2 * MIB,
            "{what}: parse peaked {over} B above its result"
        );
    }

    // The directory source and the stores, as the agent runs them (both share the objects).
    let dir = tempfile_dir();
    std::fs::write(dir.join("objects.json"), &objects).unwrap();
    std::fs::write(dir.join("policies.json"), &policies).unwrap();
    drop((objects, policies));
    let metrics = Metrics::new();
    let stores = Stores::new();
    let (md, live, peak) = measured(|| {
        let mut md = ManifestDir::new(dir.clone());
        stores.apply(md.scan(&metrics).expect("files read"));
        md
    });
    eprintln!("manifest source + stores: {live} B kept, peak {peak} B");
    assert_eq!(stores.snapshot().policy.pods.len(), 10_003);
    // 10,003 Pods, 101 Namespaces and 1,002 NetworkPolicies: 6.5 MiB (12 MiB with each
    // pod's labels in a `BTreeMap<String, String>` and its strings not shared).
    assert!(live < 8 * MIB, "stores and source keep {live} B");
    assert!(
        peak < live + 5 * MIB,
        "reading the files peaked at {peak} B"
    );

    let inputs = stores.take_policy(true).expect("inputs");
    let (state, live, peak) = measured(|| {
        twill_core::policy::compile(
            inputs.pods.values().map(|p| &**p),
            inputs.namespaces.values().map(|n| &**n),
            inputs.policies.values().map(|p| &**p),
            "n1",
            &[],
            &twill_core::policy::PolicyIds::default(),
        )
    });
    eprintln!(
        "compiled state: {live} B kept, peak {peak} B; {:?}",
        state.counts
    );
    assert_eq!(state.counts.policies, 1_002);
    assert!(live < 4 * MIB, "compiled state keeps {live} B");
    drop((md, state));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("twill-policy-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
