//! What a sync tells the operator: logs (each invalid object and each Service left out of a
//! full map once), metrics, and health (`/healthz` freshness, retry backoff).
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::Context;
use super::services::Applied;
use crate::compile::{Compiler, RejectClass, Rejection};
use crate::datapath::AyaLbMaps;
use crate::lbmap::LbMaps;
use crate::metrics::Metrics;
use crate::reconcile::ReconcileError;
use crate::source::manifests::error_chain;

/// Retry delays after a failed apply: doubling from the first to the last.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Capped exponential delay after `failures` consecutive failures (≥ 1).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    (RETRY_MIN * 2u32.pow(exp)).min(RETRY_MAX)
}

/// Where the run loop gets kernel verdict counters from (the real maps; fakes have none).
pub trait VerdictStats {
    /// `(reason, total over CPUs)`, or `None` when there are no counters.
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>>;
}

impl VerdictStats for AyaLbMaps {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        match self.stats() {
            Ok(counts) => Some(counts.iter().map(|(r, n)| (r.name(), *n)).collect()),
            Err(e) => {
                log::debug!("reading verdict counters: {}", error_chain(&e));
                None
            }
        }
    }
}

impl VerdictStats for crate::lbmap::FakeLbMaps {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }
}

impl<M: LbMaps> VerdictStats for crate::lbmap::FaultyLbMaps<M> {
    fn verdict_totals(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }
}

/// What the reports remember between syncs, so each problem is logged when it appears rather
/// than on every sync.
#[derive(Default)]
pub struct Reports {
    /// Consecutive failed applies (0 after a success).
    failures: u32,
    /// Invalid objects of the last compile.
    logged_rejections: BTreeSet<(String, String, String)>,
    /// Services with frontends a full map had no room for at the last apply (reported as
    /// rejections in the debug dump, counted in `twill_unprogrammed_services`).
    unprogrammed: Vec<Rejection>,
}

impl Reports {
    /// Delay before retrying after consecutive failed applies (capped exponential).
    pub fn retry_delay(&self) -> Duration {
        backoff(self.failures)
    }

    /// The Services a full map left out at the last apply.
    pub fn unprogrammed(&self) -> &[Rejection] {
        &self.unprogrammed
    }

    /// After a compile: the sync's duration, newly invalid objects and the Service and
    /// endpoint gauges.
    pub fn compiled(&mut self, metrics: &Metrics, compiler: &Compiler, applied: &Applied) {
        metrics.sync_duration.observe(applied.elapsed.as_secs_f64());
        if applied.update.rejections_changed {
            self.rejections(metrics, compiler);
        }
        let counts = compiler.counts();
        metrics
            .services
            .set(i64::try_from(counts.services).unwrap_or(i64::MAX));
        metrics
            .endpoints
            .set(i64::try_from(counts.endpoints).unwrap_or(i64::MAX));
    }

    /// Logs newly invalid objects once and counts them in `twill_invalid_objects_total`.
    fn rejections(&mut self, metrics: &Metrics, compiler: &Compiler) {
        let rejected = compiler.rejected();
        let invalid: Vec<_> = rejected
            .iter()
            .filter(|r| r.reason.class() == RejectClass::Invalid)
            .collect();
        let key = |r: &Rejection| {
            (
                r.namespace.to_string(),
                r.name.to_string(),
                r.reason.to_string(),
            )
        };
        let current: BTreeSet<(String, String, String)> = invalid.iter().map(|r| key(r)).collect();
        for r in &invalid {
            if !self.logged_rejections.contains(&key(r)) {
                log::warn!(
                    "skipping invalid {} {}/{}: {}",
                    r.kind.as_str(),
                    r.namespace,
                    r.name,
                    r.reason
                );
            }
        }
        metrics.compiler_rejections(invalid.iter().map(|r| {
            (
                r.kind.as_str(),
                &*r.namespace,
                &*r.name,
                r.reason.metric_label(),
            )
        }));
        self.logged_rejections = current;
    }

    /// Logs the Services that newly lost (or got back) room in the maps and sets the gauge.
    /// Returns whether the set changed.
    pub fn set_unprogrammed(&mut self, metrics: &Metrics, now: Vec<Rejection>) -> bool {
        if now == self.unprogrammed {
            return false;
        }
        for r in now.iter().filter(|r| !self.unprogrammed.contains(r)) {
            log::warn!("Service {}/{}: {}", r.namespace, r.name, r.reason);
        }
        for r in self.unprogrammed.iter().filter(|r| !now.contains(r)) {
            log::info!(
                "Service {}/{} is fully programmed again",
                r.namespace,
                r.name
            );
        }
        metrics
            .unprogrammed_services
            .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
        self.unprogrammed = now;
        true
    }

    /// Records how the apply went (logs, metrics, `/healthz` freshness, the stores' applied
    /// generation, the retry backoff). Returns whether the agent is up to date.
    ///
    /// A full map is the cluster outgrowing a flag, not a broken kernel: every entry with room
    /// was written, so the Services left out are reported on their own and the agent counts as
    /// up to date (no fast retry, `/healthz` and `/livez` stay green). The next change or
    /// resync compares everything again and fills any room that appeared.
    pub fn applied(
        &mut self,
        ctx: &Context,
        applied: &Applied,
        unprogrammed_changed: bool,
    ) -> bool {
        let generation = applied.generation;
        let metrics = &ctx.metrics;
        match &applied.result {
            Err(e) if e.only_full() => {
                if unprogrammed_changed {
                    log::error!("applying generation {generation}: {}", error_chain(e));
                } else {
                    log::debug!("applying generation {generation}: {}", error_chain(e));
                }
                metrics.sync_errors.inc();
                count_map_errors(metrics, e);
                ctx.health.updated();
                ctx.stores.mark_applied(generation);
                self.failures = 0;
                true
            }
            Ok(stats) => {
                log::debug!(
                    "applied generation {generation} in {:?} (prune={}, {} Services recompiled, {} keys changed): {stats:?}",
                    applied.elapsed,
                    applied.prune,
                    applied.update.recompiled,
                    applied.changes.len()
                );
                ctx.health.updated();
                ctx.stores.mark_applied(generation);
                if let Some(since) = applied.pending_since {
                    metrics
                        .programming_duration
                        .observe(since.elapsed().as_secs_f64());
                }
                metrics.last_sync_timestamp.set(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
                self.failures = 0;
                true
            }
            Err(e) => {
                log::error!("applying generation {generation}: {}", error_chain(e));
                metrics.sync_errors.inc();
                count_map_errors(metrics, e);
                self.failures = self.failures.saturating_add(1);
                false
            }
        }
    }
}

/// `twill_map_errors_total{map, kind}` for each map error of a failed apply.
fn count_map_errors(metrics: &Metrics, e: &ReconcileError) {
    for me in e.map_errors() {
        metrics.map_error(me.map().name(), me.metric_label());
    }
}
