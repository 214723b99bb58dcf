//! Compile + apply of the Services: the stores' changes go through the incremental compiler,
//! and the reconciler writes the difference to the maps. No reporting here: the outcome goes to
//! [`super::report`] and [`super::publish`].
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;

use super::Context;
use super::publish::Names;
use crate::compile::{
    CompileConfig, Compiler, IdAllocation, ObjectKind, RejectReason, Rejection, UpdateSummary,
};
use crate::lbmap::{LbMaps, StateChanges};
use crate::reconcile::{ApplyStats, ReconcileError, Reconciler};

/// Compile settings derived from the agent config.
pub fn compile_config(cfg: &crate::config::Config) -> CompileConfig {
    let mut c = CompileConfig::new(cfg.node_name.clone());
    c.nodeport_cidrs.clone_from(&cfg.nodeport_addresses);
    c.nodeport_cidrs6.clone_from(&cfg.nodeport_addresses6);
    c.nodeport_range = cfg.nodeport_range.0..=cfg.nodeport_range.1;
    c.max_frontends_per_service = cfg.max_frontends_per_service;
    c
}

/// The compiler and the reconciler of the Services, and what the compiler is configured with.
pub struct ServicePipeline<M: LbMaps> {
    compile_cfg: CompileConfig,
    compiler: Compiler,
    reconciler: Reconciler<M>,
    /// Whether the compiler has been fed the whole stores once (from then on, changes only).
    loaded: bool,
}

/// One compile + apply: what changed and how the apply went.
pub struct Applied {
    /// The stores' generation compiled.
    pub generation: u64,
    /// When the oldest change of this generation arrived.
    pub pending_since: Option<Instant>,
    /// This node's Node object as compiled.
    pub node: Option<Arc<Node>>,
    pub update: UpdateSummary,
    pub changes: StateChanges,
    /// Whether the apply pruned (every source kind had synced).
    pub prune: bool,
    pub elapsed: Duration,
    pub result: Result<ApplyStats, ReconcileError>,
}

impl Applied {
    /// Whether the apply compared every key (the published copy is then replaced whole).
    pub fn compared_all(&self) -> bool {
        match &self.result {
            Ok(stats) => stats.compared_all,
            Err(e) => e.stats().is_none_or(|s| s.compared_all),
        }
    }
}

impl<M: LbMaps> ServicePipeline<M> {
    /// `reconciler` should come from `Reconciler::adopt` so ids stay those of the adopted maps.
    pub fn new(cfg: &crate::config::Config, reconciler: Reconciler<M>) -> Self {
        Self {
            compile_cfg: compile_config(cfg),
            compiler: Compiler::new(IdAllocation::from_adopted(reconciler.applied())),
            reconciler,
            loaded: false,
        }
    }

    /// The node's own network namespace (where the agent runs), written into the datapath config
    /// so loopback NodePorts are translated there and never inside pods.
    pub fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.compile_cfg.host_netns_cookie = cookie;
    }

    /// The addresses NodePorts answer on, from the last node network sync.
    pub fn set_nodeport_addresses(&mut self, addrs: &[Ipv4Addr]) {
        self.compile_cfg.nodeport_addresses = addrs.to_vec();
    }

    /// The IPv6 addresses NodePorts answer on, from the last node network sync.
    pub fn set_nodeport_addresses6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        self.compile_cfg.nodeport_addresses6 = addrs.to_vec();
    }

    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    pub fn reconciler(&self) -> &Reconciler<M> {
        &self.reconciler
    }

    pub fn reconciler_mut(&mut self) -> &mut Reconciler<M> {
        &mut self.reconciler
    }

    /// This node's pod CIDRs as of the last compile.
    pub fn pod_cidrs(&self) -> &[ipnetwork::Ipv4Network] {
        &self.compile_cfg.pod_cidrs
    }

    /// Compiles what changed since the last call (everything the first time) and applies the
    /// difference; prunes only once every source kind has synced. The changed Service groups
    /// go to `names` before the compiler takes them.
    pub fn compile_and_apply(&mut self, ctx: &Context, names: &mut Names) -> Applied {
        let started = Instant::now();
        let stores = &ctx.stores;
        let pending_since = stores.pending_since();
        let dirty = stores.take_changes(!self.loaded);
        names.update(&dirty.groups, !self.loaded);
        self.loaded = true;
        let node = ctx.node();
        self.compile_cfg.pod_cidrs = node
            .as_deref()
            .map(crate::cniconf::pod_cidrs)
            .unwrap_or_default();
        self.compile_cfg.pod_cidrs6 = node
            .as_deref()
            .map(crate::cniconf::pod_cidrs_all)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| match n {
                ipnetwork::IpNetwork::V6(v6) => Some(v6),
                ipnetwork::IpNetwork::V4(_) => None,
            })
            .collect();
        // Few objects; a list of addresses compared by the compiler, which replans only the
        // Services naming one that came or went.
        self.compile_cfg.node_ips =
            crate::compile::all_node_ips(stores.nodes().values().map(AsRef::as_ref));
        self.compile_cfg.node_ips6 =
            crate::compile::all_node_ips6(stores.nodes().values().map(AsRef::as_ref));
        let update = self
            .compiler
            .update(&self.compile_cfg, node.as_deref(), dirty.groups);
        let changes = self.compiler.take_changes();
        let prune = stores.is_synced();
        let result = self
            .reconciler
            .apply_changes(self.compiler.state(), &changes, prune);
        Applied {
            generation: dirty.generation,
            pending_since,
            node,
            update,
            changes,
            prune,
            elapsed: started.elapsed(),
            result,
        }
    }

    /// The Services with a desired frontend the maps do not hold as desired (after an apply
    /// that ran out of room: the frontend, or a slot, backend or source range it needs, found
    /// no room). Walks every frontend: only on that failure path.
    pub fn unprogrammed_services(&self) -> Vec<Rejection> {
        let desired = self.compiler.state();
        let applied = self.reconciler.applied();
        let mut out: Vec<Rejection> = Vec::new();
        for port in self.compiler.model().services {
            let missing = port
                .frontends
                .iter()
                .any(|fe| applied.frontend(&fe.key) != desired.frontend(&fe.key));
            // Ports are sorted by Service, so one Service's ports are adjacent.
            let seen = out
                .last()
                .is_some_and(|r| r.namespace == port.namespace && r.name == port.name);
            if missing && !seen {
                out.push(Rejection {
                    kind: ObjectKind::Service,
                    namespace: port.namespace.clone(),
                    name: port.name.clone(),
                    reason: RejectReason::MapFull,
                });
            }
        }
        out
    }
}
