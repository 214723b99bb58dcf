//! The pure half of the pod network across nodes: which routes, overlay entries and masquerade
//! ruleset this node should have, as values. twill-agent's `routing` module snapshots the
//! interfaces, executes the plan over netlink and applies the ruleset with `nft -f`.
//!
//! - [`plan_routes`] turns the Node objects, the agent's config and a snapshot of this node's
//!   interfaces ([`HostNetwork`]) into a [`RoutePlan`] without any I/O;
//! - [`masq::MasqueradeRules`] is the egress SNAT ruleset and its `nft -f` script;
//! - [`netdiff::diff`] turns a dump of the kernel's routes, neighbours or FDB entries and the
//!   plan's wanted ones into the netlink operations the agent's executor performs.
//!
//! # Direct routes
//! A peer whose InternalIP is inside a subnet directly connected to one of our interfaces gets
//! `podCIDR via <peer node IP> dev <that interface>` (modes `auto` and `direct`).
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
//! - per peer: route `podCIDR via <peer VTEP> dev twill.vxlan onlink`, a permanent
//!   neighbour `<peer VTEP> lladdr <peer MAC>` and an FDB entry `<peer MAC> dst <peer node IP>`.
//!
//! Traffic the node itself sends into the overlay leaves from its VTEP address (the only
//! address on the VXLAN device), so a remote pod sees `10.244.0.0` for node n0; replies return
//! through the overlay. IPv6 pod CIDRs (dual-stack) are planned by [`plan6`], after this plan
//! and following its choice per peer.
//!
//! # IPv6 underlay
//! A node whose Node object lists no IPv4 InternalIP (an IPv6-only node) uses its IPv6
//! InternalIP as its underlay address ([`node_underlay_ip`]), and reaches each peer by the
//! peer's IPv6 InternalIP: directly when it is on a connected IPv6 subnet (IPv6 pod CIDRs
//! `via <peer>`, IPv4 ones `via inet6 <peer>`, an IPv4 route with an IPv6 nexthop, RTA_VIA),
//! else over the VXLAN device, created with an IPv6 local address so that its FDB remotes are
//! IPv6 (one VXLAN device has sockets of one family only). The VTEP MAC of an IPv6 underlay
//! address is a hash of it ([`vtep_mac6`]). A dual-stack node keeps the IPv4 underlay, so a
//! cluster mixing dual-stack nodes with IPv6-only ones does not reach the IPv6-only ones over
//! the overlay (they have no IPv4 InternalIP: `NoInternalIp`).
//!
//! # MTU
//! The VXLAN device's MTU is the underlay device's MTU − [`VXLAN_OVERHEAD`] (50 bytes: outer
//! IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14), or − [`VXLAN_OVERHEAD6`] (70: the outer header
//! is IPv6's 40 bytes) over an IPv6 underlay. [`cni_mtu`] gives the MTU the agent writes into the
//! CNI config: the underlay MTU − that overhead whenever the plan uses the overlay, the underlay
//! MTU otherwise. In mode `auto` the overlay appears only once a peer needs it; pods created before
//! keep the larger MTU, so clusters that span subnets should run with `--routing-mode vxlan`.
pub mod fastpath;
pub mod host;
pub mod masq;
pub mod netdiff;
pub mod plan;
pub mod plan6;

use std::net::IpAddr;

use serde::Deserialize;

pub use host::{HostLink, HostNetwork, default_devices, nodeport_addresses, nodeport_addresses6};
pub use masq::{Masquerade6Rules, MasqueradeRules};
pub use plan::{
    PeerNode, PeerReach, PeerRoute, PeerVia, RoutePlan, SkipReason, SkippedPeer, VxlanDevicePlan,
    cni_mtu, node_internal_ipv4, node_underlay_ip, plan_routes, underlay_mac, vtep_addr, vtep_mac,
    vtep_mac6, vxlan_overhead,
};
pub use plan6::{PeerRoute6, PeerVia6, RoutePlan6, SkipReason6, SkippedPeer6, plan_routes6};

/// Name of the overlay device (`twill.vxlan`; ≤ 15 bytes, the kernel's IFNAMSIZ − 1).
pub const VXLAN_DEVICE: &str = "twill.vxlan";
/// VXLAN network identifier of the overlay.
pub const VXLAN_VNI: u32 = 1;
/// UDP port of the overlay: the Linux default (8472), as flannel and Cilium use, not IANA's 4789.
pub const VXLAN_PORT: u16 = 8472;
/// Bytes the overlay adds in front of an inner IP packet over an IPv4 underlay: outer IPv4
/// (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The same over an IPv6 underlay: the outer IPv6 header is 40 bytes, so 70.
pub const VXLAN_OVERHEAD6: u32 = 70;

/// How cross-node pod traffic is carried (`--routing-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// Direct routes to peers on a connected subnet, VXLAN to the others.
    #[default]
    Auto,
    /// Only direct routes; peers on other subnets are skipped (and reported).
    Direct,
    /// Every peer through the VXLAN overlay.
    Vxlan,
}

/// The routing part of the agent's validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    /// `--cluster-cidr`: never masqueraded (in addition to every node's pod CIDRs).
    pub cluster_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// `--non-masquerade-cidrs`: destinations reached with the pod IP unchanged.
    pub non_masquerade_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// The IPv6 entries of `--cluster-cidr` (both flags take either family, as kube-proxy's
    /// `--cluster-cidr` and ip-masq-agent's `nonMasqueradeCIDRs` do): exceptions of the IPv6
    /// masquerade.
    pub cluster_cidrs6: Vec<ipnetwork::Ipv6Network>,
    /// The IPv6 entries of `--non-masquerade-cidrs`.
    pub non_masquerade_cidrs6: Vec<ipnetwork::Ipv6Network>,
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
            cluster_cidrs6: Vec::new(),
            non_masquerade_cidrs6: Vec::new(),
            masquerade: true,
            vxlan_vni: VXLAN_VNI,
            vxlan_port: VXLAN_PORT,
        }
    }
}

/// Why no plan could be made for this node: its own Node object or interfaces lack what the
/// plan is built from.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("this node {0:?} is not among the Node objects (is --node-name right?)")]
    ThisNodeMissing(String),
    #[error("this node {0:?} has no InternalIP (IPv4 or IPv6) in its Node status")]
    ThisNodeNoAddress(String),
    #[error("this node {0:?} has no pod CIDR: the VXLAN overlay takes its VTEP address from it")]
    ThisNodeNoPodCidr(String),
    #[error(
        "this node's InternalIP {0} is on no local interface: the VXLAN overlay needs it as its \
         local tunnel address"
    )]
    NodeIpNotLocal(IpAddr),
}

impl PlanError {
    /// A short label for metrics (`twill_routing_errors_total{reason=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ThisNodeMissing(_) => "this_node_missing",
            Self::ThisNodeNoAddress(_) => "this_node_no_address",
            Self::NodeIpNotLocal(_) => "node_ip_not_local",
            Self::ThisNodeNoPodCidr(_) => "this_node_no_pod_cidr",
        }
    }
}
