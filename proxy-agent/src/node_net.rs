//! The node's own network, driven by the run loop: routes to the other nodes' pod CIDRs (and
//! the egress masquerade that comes with the route plan), the per-packet north-south programs
//! on the node's devices, the addresses NodePorts answer on, and the CNI config that tells the
//! runtime this node's pod CIDRs and the MTU its route plan allows.
//!
//! It runs when the routing-relevant part of the Node objects changes and on the periodic
//! resync, not on every Service change: one sync dumps the node's links, addresses and routes
//! and may run `nft`, which would put milliseconds on the path of every Service update.
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::Node;

use twill_core::routing::fastpath::MasqueradeMode;

use crate::cniconf::CniConfWriter;
use crate::config::Config;
use crate::datapath::{Datapath, DatapathError};
use crate::routing::{
    ApplyReport, RouteExecutor, RoutingConfig, RoutingError, VXLAN_DEVICE, cni_mtu,
    default_devices, node_internal_ipv4, nodeport_addresses, nodeport_addresses6, plan_routes,
    plan_routes6,
};
use crate::source::Nodes;

/// What the rest of the agent needs from the last network sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkState {
    /// The node's devices NodePorts answer on; the north-south programs run on them (and on
    /// the overlay device when there is one).
    pub devices: Vec<String>,
    /// Addresses of those devices NodePorts answer on (filtered by `--nodeport-addresses`).
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// The devices' IPv6 addresses NodePorts answer on (filtered by the IPv6 CIDRs).
    pub nodeport_addresses6: Vec<Ipv6Addr>,
    /// MTU pods must use on this node's route plan (the overlay's when it is in use); `None`
    /// until routes were planned once.
    pub pod_mtu: Option<u32>,
    /// Peer routes in the last applied plan.
    pub peer_routes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("programming the routes to the other nodes")]
    Routing(#[from] RoutingError),
    #[error("attaching the north-south programs to device {device}")]
    Attach {
        device: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("programming the fast path")]
    FastPath(#[from] crate::fastpath::FastPathError),
}

impl NetworkError {
    /// Label of `twill_network_errors_total{reason=...}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Routing(e) => e.metric_label(),
            Self::Attach { .. } => "attach_tc",
            Self::FastPath(_) => "fastpath",
        }
    }
}

/// The routing-relevant view of one Node: what changes the route plan.
/// (name, IPv4 InternalIP, IPv6 InternalIPs for dual-stack direct routes, podCIDRs).
type NodeRouting = (
    Option<String>,
    Option<Ipv4Addr>,
    Vec<std::net::Ipv6Addr>,
    Option<Vec<String>>,
);

fn routing_view(nodes: &Nodes) -> Vec<NodeRouting> {
    nodes
        .values()
        .map(|n| {
            (
                n.metadata.name.clone(),
                node_internal_ipv4(n),
                twill_core::routing::plan6::node_internal_ipv6s(n),
                n.spec.as_ref().and_then(|s| s.pod_cidrs.clone()),
            )
        })
        .collect()
}

pub struct NodeNetwork {
    routing: RouteExecutor,
    config: RoutingConfig,
    node_name: String,
    /// `--devices`; empty: the interfaces holding the node's InternalIP (else the default
    /// route's).
    devices_flag: Vec<String>,
    nodeport_cidrs: Vec<Ipv4Network>,
    /// The IPv6 `--nodeport-addresses` CIDRs.
    np_cidrs6: Vec<Ipv6Network>,
    /// Routing view of the last fully successful sync (`None`: sync needed).
    synced: Option<Vec<NodeRouting>>,
    /// Devices with the north-south programs attached by this agent.
    attached: BTreeSet<String>,
    /// Peers' pod CIDRs refused as conflicting in the last plan, so each is warned about once.
    refused: BTreeSet<String>,
    state: NetworkState,
    /// `--host-routing`.
    host_routing: bool,
    /// `--masquerade-mode`.
    masquerade_mode: twill_core::routing::fastpath::MasqueradeMode,
    cni_conf: CniConfWriter,
}

impl NodeNetwork {
    /// Opens the netlink socket; call inside the tokio runtime.
    pub fn new(cfg: &Config) -> Result<Self, RoutingError> {
        // Whatever the masquerade mode: NodePort SNAT draws from the same range.
        match crate::fastpath::reserve_nat_ports() {
            Ok(true) => log::info!(
                "reserved ports {}-{} for NodePort SNAT and the eBPF masquerade \
                 (ip_local_reserved_ports)",
                twill_common::MASQ_PORT_MIN,
                twill_common::MASQ_PORT_MAX
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "reserving the NAT ports in ip_local_reserved_ports: {e}; a node socket given \
                 one of them as its ephemeral port would miss its replies"
            ),
        }
        Ok(Self {
            routing: RouteExecutor::connect()?,
            config: RoutingConfig::from(cfg),
            node_name: cfg.node_name.clone(),
            devices_flag: cfg.devices.clone(),
            nodeport_cidrs: cfg.nodeport_addresses.clone(),
            np_cidrs6: cfg.nodeport_addresses6.clone(),
            synced: None,
            attached: BTreeSet::new(),
            refused: BTreeSet::new(),
            state: NetworkState::default(),
            host_routing: cfg.host_routing,
            masquerade_mode: cfg.masquerade_mode,
            cni_conf: CniConfWriter::new(cfg),
        })
    }

    pub fn state(&self) -> &NetworkState {
        &self.state
    }

    /// Writes the CNI config for `node` (this node's object) when its pod CIDRs or the pod MTU
    /// of the last route plan changed.
    pub fn write_cni_conf(&mut self, node: &Node) {
        self.cni_conf.write(node, self.state.pod_mtu);
    }

    /// Destinations of the node's `/32` routes (local pods' host routes among them).
    pub async fn host_routes(&self) -> Result<Vec<Ipv4Addr>, RoutingError> {
        self.routing.host_route_destinations().await
    }

    /// Whether the Node objects changed in a way that matters since the last successful sync
    /// (or that sync failed).
    pub fn needs_sync(&self, nodes: &Nodes) -> bool {
        self.synced
            .as_ref()
            .is_none_or(|v| *v != routing_view(nodes))
    }

    /// Devices, north-south attachment, NodePort addresses, then routes. `prune` (the node
    /// store has synced once) lets stale routes of unknown nodes be removed. On error, what
    /// succeeded before the failing step is kept in [`Self::state`] and the next call retries.
    pub async fn sync(
        &mut self,
        nodes: &Nodes,
        datapath: &mut Datapath,
        prune: bool,
    ) -> Result<ApplyReport, NetworkError> {
        let view = routing_view(nodes);
        // Cleared until this sync succeeds: a failure is retried even with unchanged Nodes.
        self.synced = None;
        let host = self.routing.host_network().await?;
        let me: Option<&Node> = nodes
            .get(&("".into(), self.node_name.as_str().into()))
            .map(AsRef::as_ref);
        let node_ips = me.map(internal_ips).unwrap_or_default();
        let devices = if self.devices_flag.is_empty() {
            default_devices(&host, &node_ips)
        } else {
            self.devices_flag.clone()
        };
        // New devices first, before the routes: NodePorts work even when routing fails.
        self.attach(&devices, datapath, false)?;
        self.state.nodeport_addresses = nodeport_addresses(&host, &devices, &self.nodeport_cidrs);
        self.state.nodeport_addresses6 = nodeport_addresses6(&host, &devices, &self.np_cidrs6);
        self.state.devices.clone_from(&devices);

        let plan = plan_routes(
            &self.node_name,
            nodes.values().map(AsRef::as_ref),
            &self.config,
            &host,
        )
        .map_err(RoutingError::from)?;
        let mut refused = BTreeSet::new();
        for s in &plan.skipped {
            if s.reason.is_conflict() {
                let line = format!("no route to node {}: {:?}", s.node, s.reason);
                if !self.refused.contains(&line) {
                    log::warn!("{line}");
                }
                refused.insert(line);
            } else {
                log::debug!("no route to node {}: {:?}", s.node, s.reason);
            }
        }
        self.refused = refused;
        // The nftables table only in its mode; in eBPF mode the executor removes a table an
        // earlier agent (or mode) left.
        let report = if self.masquerade_mode == MasqueradeMode::Nftables {
            self.routing.apply(&plan, prune).await?
        } else {
            let without_table = crate::routing::RoutePlan {
                masquerade: None,
                ..plan.clone()
            };
            self.routing.apply(&without_table, prune).await?
        };
        // Dual-stack: the IPv6 pod CIDRs follow the IPv4 plan's choice per peer.
        let mut plan6 = plan_routes6(
            &self.node_name,
            nodes.values().map(AsRef::as_ref),
            &self.config,
            &host,
            &plan,
        );
        let masquerade6 = masquerade6_for_programs(self.masquerade_mode, &mut plan6);
        let fastpath = twill_core::routing::fastpath::config(
            self.host_routing,
            plan.masquerade.as_ref().map(|_| self.masquerade_mode),
        );
        crate::fastpath::program(
            datapath,
            fastpath,
            plan.masquerade.as_ref(),
            masquerade6.as_ref(),
            prune,
        )?;
        for s in &plan6.skipped {
            if s.reason.is_conflict() {
                log::warn!("no IPv6 route to node {}: {}", s.node, s.reason);
            } else {
                log::debug!("no IPv6 route to node {}: {}", s.node, s.reason);
            }
        }
        let report6 = self.routing.apply6(&plan6, prune).await?;
        if report6.changed() {
            log::info!(
                "IPv6 routes: {} peer routes ({report6:?})",
                plan6.peers.len()
            );
        }
        // The overlay device too: replies of local backends to pods on other nodes behind the
        // overlay (a pod reaching this node's NodePort) leave through it and must be
        // translated back like those leaving through the underlay. It carries no NodePort
        // address.
        let mut tc_devices = devices;
        if plan.vxlan.is_some() && !tc_devices.iter().any(|d| d == VXLAN_DEVICE) {
            tc_devices.push(VXLAN_DEVICE.to_owned());
        }
        self.attach(&tc_devices, datapath, true)?;
        if report.changed() {
            log::info!(
                "routes: {} peer routes via {} ({report:?})",
                plan.peers.len(),
                if plan.vxlan.is_some() {
                    "direct routes and the VXLAN overlay"
                } else {
                    "direct routes"
                }
            );
        }
        self.state.pod_mtu = Some(cni_mtu(&self.config, &plan));
        self.state.peer_routes = plan.peers.len();
        self.synced = Some(view);
        Ok(report)
    }

    /// Attaches the tc programs to devices new in `devices` and, with `detach`, detaches them
    /// from devices that left the set. Pinned links of an earlier agent are taken over in place
    /// (no gap).
    fn attach(
        &mut self,
        devices: &[String],
        datapath: &mut Datapath,
        detach: bool,
    ) -> Result<(), NetworkError> {
        for dev in devices {
            if self.attached.contains(dev) {
                continue;
            }
            let outcomes = datapath
                .attach_tc(dev)
                .map_err(|source| NetworkError::Attach {
                    device: dev.clone(),
                    source: Box::new(source),
                })?;
            log::info!("north-south programs on {dev}: {outcomes:?}");
            self.attached.insert(dev.clone());
        }
        if !detach {
            return Ok(());
        }
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|d| !devices.contains(d))
            .cloned()
            .collect();
        for dev in gone {
            match datapath.detach_tc(&dev) {
                Ok(()) => log::info!("north-south programs detached from {dev}"),
                Err(e) => log::warn!("detaching from {dev}: {e}"),
            }
            self.attached.remove(&dev);
        }
        Ok(())
    }
}

/// A Node's InternalIPs of both families: an IPv6-only node's devices hold only IPv6 ones.
fn internal_ips(node: &Node) -> Vec<std::net::IpAddr> {
    node_internal_ipv4(node)
        .map(std::net::IpAddr::V4)
        .into_iter()
        .chain(
            twill_core::routing::plan6::node_internal_ipv6s(node)
                .into_iter()
                .map(std::net::IpAddr::V6),
        )
        .collect()
}

/// The IPv6 masquerade follows the IPv4 one's mode: in eBPF mode its rules leave the plan (so
/// `apply6` removes the `ip6 twill` table) and become the kernel programs' prefixes; in
/// nftables mode they stay in the plan and the programs get them too, as IPv4's, so that the
/// fast path leaves the flows netfilter masquerades to the stack (`FP_F_MASQ_NFT`: the eBPF
/// masquerade itself is off then).
fn masquerade6_for_programs(
    mode: MasqueradeMode,
    plan6: &mut twill_core::routing::RoutePlan6,
) -> Option<twill_core::routing::Masquerade6Rules> {
    match mode {
        MasqueradeMode::Ebpf => plan6.masquerade.take(),
        MasqueradeMode::Nftables => plan6.masquerade.clone(),
    }
}
