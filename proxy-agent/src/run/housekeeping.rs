//! The run loop's periodic chores, apart from the syncs: collecting the connection-tracking
//! table, returning freed heap to the kernel, and the open-file limit set at start.
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datapath::CtTable;
use crate::metrics::Metrics;
use crate::node_net::NodeNetwork;
use crate::source::manifests::error_chain;

/// Minimum time between two returns of freed heap to the kernel ([`release_free_heap`]).
const TRIM_PERIOD: Duration = Duration::from_secs(5);
/// How often the connection-tracking table is collected. Closed TCP flows live 10 s
/// (`CT_LIFETIME_TCP_CLOSING_NS`), so a closed flow holds its entries at most ~20 s.
const CT_GC_PERIOD: Duration = Duration::from_secs(10);
/// The period when the last pass left the table at least [`CT_GC_BUSY_FILL`] full: under a
/// high rate of new flows, closed ones are freed soon after their 10 s, before the table fills
/// and new flows are dropped.
pub const CT_GC_BUSY_PERIOD: Duration = Duration::from_secs(2);
const CT_GC_BUSY_FILL: f64 = 0.25;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old, new) soft limits. The
/// default soft limit (often 1024) is shared by every map, link, netlink socket and client
/// connection; the servers cap their connections ([`crate::api::HTTP_LIMITS`]) well below the
/// raised limit, so a connection flood cannot starve the rest. Raising up to the hard limit
/// needs no privilege.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// [`raise_open_file_limit`], logged; `main` calls it before the runtime starts its threads.
pub fn log_open_file_limit() {
    match raise_open_file_limit() {
        Ok((from, to)) if from != to => log::info!("open-file limit raised from {from} to {to}"),
        Ok(_) => {}
        Err(e) => log::warn!("raising the open-file limit: {e}"),
    }
}

/// Runs [`release_free_heap`] off the run loop, at most every [`TRIM_PERIOD`].
pub struct HeapTrimmer {
    last: Instant,
}

impl Default for HeapTrimmer {
    fn default() -> Self {
        Self {
            last: Instant::now(),
        }
    }
}

impl HeapTrimmer {
    pub fn maybe_trim(&mut self) {
        if self.last.elapsed() >= TRIM_PERIOD {
            self.last = Instant::now();
            tokio::task::spawn_blocking(release_free_heap);
        }
    }
}

/// Hands freed heap pages back to the kernel. A compile of 10,000 Services (and the parse of
/// their manifests) allocates hundreds of MiB of short-lived objects; glibc keeps freed memory
/// in its arenas, so without this the agent's RSS stays at its peak, several times what it
/// holds. Costs a walk of the free lists (tens of milliseconds at that size).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; 0 keeps no extra pad at the heap top.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Collects the connection-tracking table every [`CT_GC_PERIOD`] on a blocking thread (a pass
/// costs two syscalls per entry), with this node's pods known by their host routes. A pass
/// still running when the next is due makes that one skip.
pub struct CtCollector {
    table: Arc<std::sync::Mutex<CtTable>>,
    capacity: u32,
    metrics: Arc<Metrics>,
    running: Option<tokio::task::JoinHandle<()>>,
    last_start: Option<Instant>,
    /// Entries left by the last pass.
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl CtCollector {
    pub fn new(table: CtTable, metrics: Arc<Metrics>) -> Self {
        Self {
            capacity: table.capacity(),
            table: Arc::new(std::sync::Mutex::new(table)),
            metrics,
            running: None,
            last_start: None,
            left: Arc::default(),
        }
    }

    /// Called every [`CT_GC_BUSY_PERIOD`]: starts a pass when one is due (every
    /// [`CT_GC_PERIOD`], or every tick while the table is busy) and none is running. Without
    /// pod CIDRs (or when the routes cannot be read) nothing is judged orphaned: expiry only.
    pub async fn tick(&mut self, network: &NodeNetwork, pod_cidrs: &[ipnetwork::Ipv4Network]) {
        if self.running.as_ref().is_some_and(|j| !j.is_finished()) {
            return;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a fill ratio; map sizes are far below 2^52"
        )]
        let fill = self.left.load(std::sync::atomic::Ordering::Relaxed) as f64
            / f64::from(self.capacity.max(1));
        let period = if fill >= CT_GC_BUSY_FILL {
            CT_GC_BUSY_PERIOD
        } else {
            CT_GC_PERIOD
        };
        if self.last_start.is_some_and(|t| t.elapsed() < period) {
            return;
        }
        self.last_start = Some(Instant::now());
        // The routes are read before the table: a pod created in between would look unowned,
        // but a pod gets its host route at CNI ADD, long before it is ready and listed as an
        // endpoint, so no flow to it can exist yet.
        let owners = if pod_cidrs.is_empty() {
            crate::ctgc::LocalPods::default()
        } else {
            match network.host_routes().await {
                Ok(routes) => crate::ctgc::LocalPods::new(pod_cidrs.to_vec(), routes),
                Err(e) => {
                    log::warn!(
                        "reading host routes for the conntrack collector: {}",
                        error_chain(&e)
                    );
                    crate::ctgc::LocalPods::default()
                }
            }
        };
        let (table, metrics, left) = (self.table.clone(), self.metrics.clone(), self.left.clone());
        self.running = Some(tokio::task::spawn_blocking(move || {
            let mut table = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = crate::datapath::monotonic_now_ns();
            let result = table.collect(now, &owners);
            // The IPv6 table (eBPF masquerade of IPv6 pods) by expiry: the owners above know
            // this node's IPv4 pods only.
            let result6 = table.collect6(now, &crate::ctgc::AssumeOwned);
            let left4 = result
                .as_ref()
                .map_or(0, |(p, scanned)| scanned.saturating_sub(p.len()));
            let left6 = result6
                .as_ref()
                .map_or(0, |(p, scanned)| scanned.saturating_sub(p.len()));
            left.store(left4 + left6, std::sync::atomic::Ordering::Relaxed);
            report_collection(&metrics, result, crate::lbmap::MapKind::Ct);
            report_collection(&metrics, result6, crate::lbmap::MapKind::Ct6);
        }));
    }
}

fn report_collection<K>(
    metrics: &Metrics,
    result: Result<(crate::ctgc::CtGcPlan<K>, usize), crate::lbmap::MapError>,
    table: crate::lbmap::MapKind,
) {
    match result {
        Ok((plan, scanned)) => {
            let left = scanned.saturating_sub(plan.len());
            if table == crate::lbmap::MapKind::Ct {
                metrics
                    .conntrack_entries
                    .set(i64::try_from(left).unwrap_or(i64::MAX));
            }
            metrics.conntrack_collected("expired", plan.expired.len());
            metrics.conntrack_collected("orphaned", plan.orphaned.len());
            if !plan.orphaned.is_empty() {
                log::info!(
                    "conntrack: removed {} entries of flows to addresses no local pod holds any more",
                    plan.orphaned.len()
                );
            }
            log::debug!(
                "conntrack: {scanned} entries, {} expired, {} orphaned",
                plan.expired.len(),
                plan.orphaned.len()
            );
        }
        Err(e) => {
            log::warn!("collecting the conntrack table: {}", error_chain(&e));
            metrics.map_error(table.name(), e.metric_label());
        }
    }
}
