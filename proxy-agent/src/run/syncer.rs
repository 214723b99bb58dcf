//! One sync of the Services, in the order the parts depend on each other (kube-runtime's
//! `reconcile(obj, ctx)`: here the object is "whatever changed in the stores"):
//!
//! ```text
//!  services: compile + apply ─► report: logs, metrics ─► health: node, healthCheckNodePorts
//!    ─► report: outcome (freshness, applied generation, backoff) ─► publish: API copy
//! ```
//! The DNS names take the changed Service groups inside the compile step, before the compiler.
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use super::Context;
use super::publish::{self, Names};
use super::report::{Reports, VerdictStats};
use super::services::ServicePipeline;
use crate::health::HealthCheckServers;
use crate::lbmap::LbMaps;
use crate::reconcile::Reconciler;

/// The state of the run loop's Service sync: one [`Syncer::sync`] is one compile + apply.
pub struct Syncer<M: LbMaps> {
    ctx: Context,
    services: ServicePipeline<M>,
    reports: Reports,
    /// One server per healthCheckNodePort (externalTrafficPolicy Local).
    hc_servers: HealthCheckServers,
    names: Names,
}

impl<M: LbMaps + VerdictStats> Syncer<M> {
    /// `reconciler` should come from `Reconciler::adopt` so ids stay those of the adopted maps.
    pub fn new(ctx: Context, reconciler: Reconciler<M>) -> Self {
        Self {
            services: ServicePipeline::new(&ctx.cfg, reconciler),
            reports: Reports::default(),
            hc_servers: HealthCheckServers::new(ctx.health.clone(), Ipv4Addr::UNSPECIFIED),
            names: Names::new(&ctx.cfg.cluster_domain, ctx.cfg.dns_ttl),
            ctx,
        }
    }

    pub fn ctx(&self) -> &Context {
        &self.ctx
    }

    /// Publishes the cluster's names to `responder` after every sync.
    pub fn set_dns(&mut self, responder: Arc<crate::dns::DnsResponder>) {
        self.names.set_responder(responder);
    }

    /// See [`ServicePipeline::set_host_netns_cookie`].
    pub fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.services.set_host_netns_cookie(cookie);
    }

    /// Takes the addresses NodePorts answer on into the next compile.
    pub fn set_nodeport_addresses(&mut self, addrs: &[Ipv4Addr]) {
        self.services.set_nodeport_addresses(addrs);
    }

    /// Takes the IPv6 addresses NodePorts answer on into the next compile.
    pub fn set_nodeport_addresses6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        self.services.set_nodeport_addresses6(addrs);
    }

    pub fn reconciler(&self) -> &Reconciler<M> {
        self.services.reconciler()
    }

    pub fn reconciler_mut(&mut self) -> &mut Reconciler<M> {
        self.services.reconciler_mut()
    }

    /// One compile + apply of what changed since the last one, then its reports and the
    /// published copy. Returns whether it fully applied (a full map counts as applied: see
    /// [`Reports::applied`]).
    pub fn sync(&mut self) -> bool {
        let ctx = &self.ctx;
        let applied = self.services.compile_and_apply(ctx, &mut self.names);
        let compiler = self.services.compiler();
        self.reports.compiled(&ctx.metrics, compiler, &applied);
        ctx.health.set_node(applied.node.as_deref());
        // Every time, not only on changes: a port that could not be bound is retried.
        self.hc_servers.update(&compiler.health());

        let unprogrammed = match &applied.result {
            Ok(_) => Vec::new(),
            Err(e) if e.only_full() => self.services.unprogrammed_services(),
            Err(_) => self.reports.unprogrammed().to_vec(),
        };
        let unprogrammed_changed = self.reports.set_unprogrammed(&ctx.metrics, unprogrammed);
        let ok = self.reports.applied(ctx, &applied, unprogrammed_changed);
        // The published copy follows the reconciler's bookkeeping the way the apply did: key
        // by key after an apply of the changed keys, whole after one that compared everything.
        publish::publish(
            &ctx.published,
            self.services.reconciler().applied(),
            self.services.compiler(),
            self.reports.unprogrammed(),
            &applied.changes,
            applied.compared_all(),
            applied.update.recompiled > 0
                || applied.update.rejections_changed
                || unprogrammed_changed,
        );
        ok
    }

    /// Delay before retrying after consecutive failed applies (capped exponential).
    pub fn retry_delay(&self) -> Duration {
        self.reports.retry_delay()
    }

    /// This node's pod CIDRs as of the last compile.
    pub fn pod_cidrs(&self) -> &[ipnetwork::Ipv4Network] {
        self.services.pod_cidrs()
    }

    /// Copies the kernel's verdict counters into the metrics.
    pub fn export_stats(&self) {
        if let Some(totals) = self.services.reconciler().maps().verdict_totals() {
            self.ctx.metrics.set_verdicts(totals);
        }
    }
}
