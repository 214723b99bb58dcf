//! The pod network across nodes: routes to every other node's pod CIDRs (direct or over a
//! VXLAN overlay), egress masquerade, and the node's devices and addresses.
//!
//! Values first, executed second (house style 13):
//! - [`plan_routes`] turns the Node objects, the agent's config and a snapshot of this node's
//!   interfaces ([`HostNetwork`]) into a [`RoutePlan`] without any I/O;
//! - [`RouteExecutor::apply`] diffs that plan against what the agent owns in the kernel and
//!   converges it (idempotent; stale routes, neighbours and FDB entries are removed);
//! - [`masq::MasqueradeRules`] is the egress SNAT ruleset, applied atomically with `nft -f`.
//!
//! # Direct routes
//! A peer whose InternalIP is inside a subnet directly connected to one of our interfaces gets
//! `podCIDR via <peer node IP> dev <that interface> proto 0xfe` (modes `auto` and `direct`).
//! Pod IPs are never translated: the underlay carries pod-to-pod packets as they are.
//!
//! # VXLAN overlay (flannel's `vxlan` backend scheme, with a derived MAC)
//! Peers that are not on a connected subnet (mode `auto`), or all peers (mode `vxlan`), are
//! reached through one kernel VXLAN device [`VXLAN_DEVICE`] (VNI 1, UDP 8472, `nolearning`, no
//! remote/group: every forwarding entry is programmed by the agent):
//! - the **VTEP address** of a node is the *network address* of its first IPv4 pod CIDR
//!   (`10.244.1.0` for `10.244.1.0/24`), put as a `/32` on the node's VXLAN device. twill-cni
//!   never hands out a pod CIDR's network address, so it cannot collide with a pod IP, and it
//!   needs no allocation or API round trip;
//! - the **VTEP MAC** of a node is derived from its InternalIP: `0e:77:a:b:c:d` (locally
//!   administered unicast, see [`vtep_mac`]), so no node annotation has to be published;
//! - per peer: route `podCIDR via <peer VTEP> dev twill.vxlan onlink proto 0xfe`, a permanent
//!   neighbour `<peer VTEP> lladdr <peer MAC>` and an FDB entry `<peer MAC> dst <peer node IP>`.
//!
//! Traffic the node itself sends into the overlay leaves from its VTEP address (the only
//! address on the VXLAN device), so a remote pod sees `10.244.0.0` for node n0; replies return
//! through the overlay. IPv6 pod CIDRs and node addresses are ignored for now.
//!
//! # MTU
//! The VXLAN device's MTU is the underlay device's MTU − [`VXLAN_OVERHEAD`] (50 bytes: outer
//! IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14). [`cni_mtu`] gives the MTU the agent writes into the
//! CNI config: the underlay MTU − 50 whenever the plan uses the overlay, the underlay MTU
//! otherwise. In mode `auto` the overlay appears only once a peer needs it; pods created before
//! keep the larger MTU, so clusters that span subnets should run with `--routing-mode vxlan`.
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
//! let devices = default_devices(&host, &[plan.node_ip]);
//! let addrs = nodeport_addresses(&host, &devices, &cfg.nodeport_addresses);
//! // `twill-agent uninstall`: routing.remove_all().await?
//! ```
pub mod host;
pub mod masq;
pub mod netlink;
pub mod plan;

use std::net::Ipv4Addr;

/// `--routing-mode` (`auto`: direct routes to peers on a connected subnet, VXLAN to the others;
/// `direct`: only direct routes, other peers are skipped and reported; `vxlan`: every peer
/// through the overlay). One definition, in the agent's config.
pub use crate::config::RoutingMode;

pub use host::{HostLink, HostNetwork, default_devices, nodeport_addresses};
pub use masq::MasqueradeRules;
pub use netlink::{ApplyReport, OwnedRoute, RouteExecutor};
pub use plan::{
    PeerRoute, PeerVia, RoutePlan, SkipReason, SkippedPeer, VxlanDevicePlan, cni_mtu,
    node_internal_ipv4, plan_routes, vtep_addr, vtep_mac,
};

/// Route protocol number that marks the agent's routes (`ip route show proto 0xfe`).
/// 0xfe is not assigned in iproute2's `rt_protos` and not used by the usual routing daemons.
pub const ROUTE_PROTO_TWILL: u8 = 0xfe;
/// Name of the overlay device (`twill.vxlan`; ≤ 15 bytes, the kernel's IFNAMSIZ − 1).
pub const VXLAN_DEVICE: &str = "twill.vxlan";
/// VXLAN network identifier of the overlay.
pub const VXLAN_VNI: u32 = 1;
/// UDP port of the overlay: the Linux default (8472), as flannel and Cilium use, not IANA's 4789.
pub const VXLAN_PORT: u16 = 8472;
/// Bytes the overlay adds in front of an inner IPv4 packet: outer IPv4 (20) + UDP (8) +
/// VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The routing part of the agent's validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    /// `--cluster-cidr`: never masqueraded (in addition to every node's pod CIDRs).
    pub cluster_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// `--non-masquerade-cidrs`: destinations reached with the pod IP unchanged.
    pub non_masquerade_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// Whether pod egress to outside destinations is masqueraded to the node IP.
    pub masquerade: bool,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            mode: RoutingMode::Auto,
            cluster_cidrs: Vec::new(),
            non_masquerade_cidrs: Vec::new(),
            masquerade: true,
            vxlan_vni: VXLAN_VNI,
            vxlan_port: VXLAN_PORT,
        }
    }
}

/// Errors of the routing layer.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("this node {0:?} is not among the Node objects (is --node-name right?)")]
    ThisNodeMissing(String),
    #[error("this node {0:?} has no IPv4 InternalIP in its Node status")]
    ThisNodeNoAddress(String),
    #[error(
        "this node {0:?} has no IPv4 pod CIDR: the VXLAN overlay takes its VTEP address from it"
    )]
    ThisNodeNoPodCidr(String),
    #[error(
        "this node's InternalIP {0} is on no local interface: the VXLAN overlay needs it as its \
         local tunnel address"
    )]
    NodeIpNotLocal(Ipv4Addr),
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
            Self::ThisNodeMissing(_) => "this_node_missing",
            Self::ThisNodeNoAddress(_) => "this_node_no_address",
            Self::NodeIpNotLocal(_) => "node_ip_not_local",
            Self::Connect(_) => "netlink_connect",
            Self::Netlink { .. } => "netlink",
            Self::ThisNodeNoPodCidr(_) => "this_node_no_pod_cidr",
            Self::Foreign { .. } => "foreign_object",
            Self::NftSpawn(_) | Self::NftFailed { .. } => "nft",
        }
    }
}
