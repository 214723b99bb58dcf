//! The pod network across nodes: routes to every other node's pod CIDRs (direct or over a
//! VXLAN overlay), egress masquerade, and the node's devices and addresses.
//!
//! Values first, executed second (house style 13):
//! - [`plan_routes`] (pure, in `twill_core::routing`, which also describes the direct-route and
//!   VXLAN schemes and the MTU) turns the Node objects, the agent's config and a snapshot of this
//!   node's interfaces ([`HostNetwork`]) into a [`RoutePlan`] without any I/O;
//! - [`RouteExecutor::apply`] diffs that plan against what the agent owns in the kernel and
//!   converges it (idempotent; stale routes, neighbours and FDB entries are removed);
//! - [`MasqueradeRules`] is the egress SNAT ruleset, applied atomically with `nft -f` by [`nft`].
//!
//! # Ownership marks
//! Every route the agent adds carries route protocol [`ROUTE_PROTO_TWILL`] (`proto 0xfe`), so
//! stale routes are found and removed without touching anybody else's routes; every neighbour and
//! FDB entry lives on the agent's own VXLAN device.
//!
//! # Wiring into `twill-agent run`
//! ```text
//! let routing = RouteExecutor::connect()?;                 // once, inside the runtime
//! let rcfg = RoutingConfig::from(&cfg);                    // --routing-mode, --cluster-cidr, ...
//! // on every Node change and periodic resync; prune only once the node store has synced:
//! let (plan, report) = routing.sync(&cfg.node_name, snapshot.nodes.values().map(AsRef::as_ref),
//!                                   &rcfg, stores.is_synced()).await?;
//! let mtu = cfg.cni_mtu.min(cni_mtu(&rcfg, &plan));         // into cniconf::render
//! // --devices default / NodePort addresses, from the same interface snapshot:
//! let host = routing.host_network().await?;
//! let devices = default_devices(&host, &[plan.node_ip]);           // either family
//! let addrs = nodeport_addresses(&host, &devices, &cfg.nodeport_addresses);
//! // `twill-agent uninstall`: routing.remove_all().await?
//! ```
pub mod netlink;
pub mod netlink6;
pub mod nft;

// The plan, the interface snapshot and the masquerade ruleset are pure values (twill-core); the
// agent's paths stay as they were.
pub use netlink::{ApplyReport, OwnedRoute, RouteExecutor};
pub use twill_core::routing::{
    HostLink, HostNetwork, MasqueradeRules, PeerRoute, PeerVia, PlanError, RoutePlan,
    RoutingConfig, RoutingMode, SkipReason, SkippedPeer, VXLAN_DEVICE, VXLAN_OVERHEAD, VXLAN_PORT,
    VXLAN_VNI, VxlanDevicePlan, cni_mtu, default_devices, host, masq, node_internal_ipv4,
    nodeport_addresses, plan, plan_routes, vtep_addr, vtep_mac,
};
pub use twill_core::routing::{PeerVia6, RoutePlan6, nodeport_addresses6, plan_routes6};

/// Route protocol number that marks the agent's routes (`ip route show proto 0xfe`).
/// 0xfe is not assigned in iproute2's `rt_protos` and not used by the usual routing daemons.
pub const ROUTE_PROTO_TWILL: u8 = 0xfe;

/// Errors of the routing layer.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// This node's Node object or interfaces lack what the plan is built from.
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("netlink {op} failed")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "{what} {name:?} exists but is not what the agent made ({found}); remove it or rename ours"
    )]
    Foreign {
        what: &'static str,
        name: String,
        found: String,
    },
    #[error("running `nft -f -` (is nftables installed?)")]
    NftSpawn(#[source] std::io::Error),
    #[error("`nft -f -` rejected the masquerade ruleset ({status}): {stderr}")]
    NftFailed { status: String, stderr: String },
}

impl From<&crate::config::Config> for RoutingConfig {
    fn from(cfg: &crate::config::Config) -> Self {
        Self {
            mode: cfg.routing_mode,
            cluster_cidrs: cfg.cluster_cidr.into_iter().collect(),
            non_masquerade_cidrs: cfg.non_masquerade_cidrs.clone(),
            cluster_cidrs6: cfg.cluster_cidr6.into_iter().collect(),
            non_masquerade_cidrs6: cfg.non_masquerade_cidrs6.clone(),
            masquerade: cfg.masquerade,
            ..Self::default()
        }
    }
}

impl RoutingError {
    pub(crate) fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| Self::Netlink { op, source }
    }

    /// A short label for metrics (`twill_routing_errors_total{reason=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Plan(e) => e.metric_label(),
            Self::Connect(_) => "netlink_connect",
            Self::Netlink { .. } => "netlink",
            Self::Foreign { .. } => "foreign_object",
            Self::NftSpawn(_) | Self::NftFailed { .. } => "nft",
        }
    }
}
