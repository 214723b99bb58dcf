//! The pure route planner: Node objects + config + interface snapshot → [`RoutePlan`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;

use super::{
    HostLink, HostNetwork, PlanError, RoutingConfig, RoutingMode, VXLAN_DEVICE, VXLAN_OVERHEAD,
    VXLAN_OVERHEAD6,
    masq::MasqueradeRules,
    plan6::{node_internal_ipv6s, node_pod_cidrs6},
};

/// Everything the executor converges this node to. Sorted, so equal inputs give equal plans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    pub node_name: String,
    /// This node's underlay address: its IPv4 InternalIP, else (a node with only IPv6
    /// InternalIPs) its IPv6 InternalIP. Peers are reached over the same family.
    pub node_ip: IpAddr,
    /// This node's IPv4 pod CIDRs.
    pub local_pod_cidrs: Vec<Ipv4Network>,
    /// MTU of the interface holding the node IP (1500 when it is on no local interface).
    pub underlay_mtu: u32,
    /// The overlay device, when at least one peer is reached through it (or mode is `vxlan`).
    pub vxlan: Option<VxlanDevicePlan>,
    /// One entry per (peer, IPv4 pod CIDR), sorted by destination.
    pub peers: Vec<PeerRoute>,
    /// Every peer reached over the underlay and how, whatever the families of its pod CIDRs
    /// (the IPv6 plan follows it per peer; the FDB comes from it), sorted by name.
    pub peer_nodes: Vec<PeerNode>,
    /// Nodes that get no route, and why (logged by the agent; not an error).
    pub skipped: Vec<SkippedPeer>,
    /// Egress masquerade ruleset (`None` when `masquerade` is off).
    pub masquerade: Option<MasqueradeRules>,
}

/// The VXLAN device of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevicePlan {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// Local tunnel address (this node's underlay address, either family: the device's
    /// sockets and every FDB remote are of this family).
    pub local: IpAddr,
    /// Interface index of the underlay device holding `local`.
    pub underlay_index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// This node's VTEP address (put on the device as a /32); `None` on a node without an
    /// IPv4 pod CIDR (an IPv6-only node: its VTEP6 is the IPv6 plan's).
    pub vtep: Option<Ipv4Addr>,
}

/// A peer node reached over the underlay, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerNode {
    pub node: String,
    /// The peer's underlay address (its InternalIP of this node's underlay family).
    pub node_ip: IpAddr,
    pub reach: PeerReach,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerReach {
    /// On a connected subnet of interface `ifindex`.
    Direct { ifindex: u32 },
    /// Through the overlay: FDB `mac → node_ip`.
    Vxlan { mac: [u8; 6] },
}

/// A route to one pod CIDR of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    pub node: String,
    /// The peer's underlay address (an IPv4 pod CIDR may be routed via an IPv6 one).
    pub node_ip: IpAddr,
    pub pod_cidr: Ipv4Network,
    pub via: PeerVia,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerVia {
    /// `pod_cidr via node_ip dev <ifindex>` (`via inet6 node_ip` over an IPv6 underlay).
    Direct { ifindex: u32 },
    /// `pod_cidr via vtep dev twill.vxlan onlink`, neighbour `vtep → mac`, FDB `mac → node_ip`.
    Vxlan { vtep: Ipv4Addr, mac: [u8; 6] },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedPeer {
    pub node: String,
    pub reason: SkipReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    NoPodCidr,
    NoInternalIp,
    /// Mode `direct` and the peer's IP is on no connected subnet.
    NotDirectlyReachable,
    /// The peer is reached over the other underlay family than this node's overlay device's,
    /// or its own device's (a dual-stack node and an IPv6-only one: IPv6 between them, while
    /// the dual-stack node's VXLAN device is IPv4), and is on no connected subnet (or mode
    /// `vxlan`): one device has one underlay family, so the pair meets only directly.
    OverlayFamilyMismatch,
    /// A pod CIDR that does not parse (kept as text for the log).
    BadPodCidr(String),
    /// The peer's pod CIDR overlaps this node's own (a misconfigured IPAM).
    OverlapsLocal(Ipv4Network),
    /// The pod CIDR is not inside `--cluster-cidr`.
    OutsideClusterCidr(Ipv4Network),
    /// The pod CIDR overlaps one of this node's subnets or addresses (routing it would cut the
    /// node off its own network).
    OverlapsNodeSubnet(Ipv4Network),
    /// The pod CIDR holds a Node's InternalIP.
    ContainsNodeIp(Ipv4Addr),
    /// The main table has a route to exactly this pod CIDR that the agent does not own (ours
    /// would replace it).
    ForeignRoute(Ipv4Network),
    /// The pod CIDR overlaps one of an older Node (first created, then first by name, keeps it).
    OverlapsPeer {
        node: String,
        cidr: Ipv4Network,
    },
    /// The peer's derived VTEP MAC equals that of `node` (this node or an older peer) at
    /// another underlay address: one FDB entry cannot point at both. Only possible over an
    /// IPv6 underlay, whose MACs are a 32-bit hash of the address (see [`vtep_mac6`]).
    VtepMacCollision {
        node: String,
    },
}

impl SkipReason {
    /// Whether the skip points at a conflicting or hostile Node object (logged as a warning)
    /// rather than one that is merely incomplete or unreachable.
    pub fn is_conflict(&self) -> bool {
        !matches!(
            self,
            SkipReason::NoPodCidr
                | SkipReason::NoInternalIp
                | SkipReason::NotDirectlyReachable
                | SkipReason::OverlayFamilyMismatch
        )
    }
}

/// The VTEP address of a node: the network address of its first IPv4 pod CIDR (never a pod IP).
pub fn vtep_addr(pod_cidr: Ipv4Network) -> Ipv4Addr {
    pod_cidr.network()
}

/// The VTEP MAC of a node, derived from its InternalIP: `0e:77:a:b:c:d`. 0x0e has the
/// locally-administered bit set and the multicast bit clear; 0x77 ('w') keeps the range apart
/// from other locally administered MACs. Every node computes the same MAC for a peer, so no
/// annotation exchange is needed.
pub fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = node_ip.octets();
    [0x0e, 0x77, a, b, c, d]
}

/// The VTEP MAC of a node on an IPv6 underlay: `0e:76` and the 32-bit FNV-1a hash of its
/// IPv6 InternalIP. 128 bits do not fit in the 32 a MAC has left, and the low 32 bits alone
/// collide in the most common numbering (`…:1::10` and `…:2::10` on two subnets); a hash
/// spreads them, and the planner refuses the rare collision
/// ([`SkipReason::VtepMacCollision`]) rather than mis-deliver. 0x76 keeps IPv6-derived MACs
/// apart from IPv4-derived ones.
pub fn vtep_mac6(node_ip: Ipv6Addr) -> [u8; 6] {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in node_ip.octets() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, d] = hash.to_be_bytes();
    [0x0e, 0x76, a, b, c, d]
}

/// The VTEP MAC of an underlay address of either family.
pub fn underlay_mac(node_ip: IpAddr) -> [u8; 6] {
    match node_ip {
        IpAddr::V4(v4) => vtep_mac(v4),
        IpAddr::V6(v6) => vtep_mac6(v6),
    }
}

/// What the overlay adds in front of an inner frame's IP packet: it depends on the outer
/// (underlay) family only, whatever the inner packet is.
pub fn vxlan_overhead(underlay: IpAddr) -> u32 {
    if underlay.is_ipv6() {
        VXLAN_OVERHEAD6
    } else {
        VXLAN_OVERHEAD
    }
}

/// The MTU the agent writes into the CNI config.
pub fn cni_mtu(config: &RoutingConfig, plan: &RoutePlan) -> u32 {
    if plan.vxlan.is_some() || config.mode == RoutingMode::Vxlan {
        plan.underlay_mtu
            .saturating_sub(vxlan_overhead(plan.node_ip))
    } else {
        plan.underlay_mtu
    }
}

/// This node's underlay address: its first IPv4 InternalIP; a node without one (IPv6-only)
/// uses its IPv6 InternalIP, preferring one held by a local interface.
pub fn node_underlay_ip(node: &Node, host: &HostNetwork) -> Option<IpAddr> {
    if let Some(v4) = node_internal_ipv4(node) {
        return Some(IpAddr::V4(v4));
    }
    let v6 = node_internal_ipv6s(node);
    v6.iter()
        .copied()
        .find(|ip| host.link_holding_ip(IpAddr::V6(*ip)).is_some())
        .or_else(|| v6.first().copied())
        .map(IpAddr::V6)
}

/// A peer's underlay address, chosen per peer: IPv4 when this node's underlay (`ours`) is IPv4
/// and the peer has an IPv4 InternalIP; else IPv6 when both have an IPv6 InternalIP
/// (`ours_has_ipv6`: an IPv6-only node, or a dual-stack node meeting an IPv6-only peer): the
/// peer's IPv6 InternalIP on a connected subnet if it has one, else its first.
fn peer_underlay_ip(
    peer: &Node,
    ours: IpAddr,
    ours_has_ipv6: bool,
    host: &HostNetwork,
) -> Option<IpAddr> {
    if ours.is_ipv4() {
        if let Some(v4) = node_internal_ipv4(peer) {
            return Some(IpAddr::V4(v4));
        }
        if !ours_has_ipv6 {
            return None;
        }
    }
    let v6 = node_internal_ipv6s(peer);
    v6.iter()
        .copied()
        .find(|ip| host.connected_link6(*ip).is_some())
        .or_else(|| v6.first().copied())
        .map(IpAddr::V6)
}

fn connected_link(host: &HostNetwork, ip: IpAddr) -> Option<&HostLink> {
    match ip {
        IpAddr::V4(v4) => host.connected_link(v4),
        IpAddr::V6(v6) => host.connected_link6(v6),
    }
}

/// The first IPv4 InternalIP of a Node.
pub fn node_internal_ipv4(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        })
}

/// IPv4 pod CIDRs of a Node (`spec.podCIDRs`, else the legacy `spec.podCIDR`); IPv6 entries are
/// ignored for now, unparsable ones returned as errors.
fn node_pod_cidrs(node: &Node) -> (Vec<Ipv4Network>, Vec<String>) {
    let Some(spec) = node.spec.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let raw: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    let mut v4 = Vec::new();
    let mut bad = Vec::new();
    for s in raw {
        match s.parse::<ipnetwork::IpNetwork>() {
            // Canonicalise (10.244.1.7/24 → 10.244.1.0/24): routes need the network address.
            Ok(ipnetwork::IpNetwork::V4(n)) => match Ipv4Network::new(n.network(), n.prefix()) {
                Ok(n) => v4.push(n),
                Err(_) => bad.push(s.clone()),
            },
            Ok(ipnetwork::IpNetwork::V6(_)) => {}
            Err(_) => bad.push(s.clone()),
        }
    }
    (v4, bad)
}

fn node_name(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

/// Why a peer's pod CIDR must not be routed, if it must not: everything it could collide with
/// on this node (its own pods, network, addresses and routes) and in the cluster (the cluster
/// CIDR, other nodes' addresses, pod CIDRs already given to older peers).
fn check_peer_cidr(
    cidr: Ipv4Network,
    local_pod_cidrs: &[Ipv4Network],
    config: &RoutingConfig,
    host: &HostNetwork,
    node_ips: &[Ipv4Addr],
    routed: &[(String, Ipv4Network)],
) -> Option<SkipReason> {
    if let Some(local) = local_pod_cidrs.iter().find(|l| overlaps(**l, cidr)) {
        return Some(SkipReason::OverlapsLocal(*local));
    }
    if !config.cluster_cidrs.is_empty()
        && !config
            .cluster_cidrs
            .iter()
            .any(|c| c.prefix() <= cidr.prefix() && c.contains(cidr.network()))
    {
        return Some(SkipReason::OutsideClusterCidr(cidr));
    }
    if let Some(net) = host.node_subnets().find(|n| overlaps(*n, cidr)) {
        return Some(SkipReason::OverlapsNodeSubnet(net));
    }
    if let Some(ip) = node_ips.iter().find(|ip| cidr.contains(**ip)) {
        return Some(SkipReason::ContainsNodeIp(*ip));
    }
    if host.foreign_routes.contains(&cidr) {
        return Some(SkipReason::ForeignRoute(cidr));
    }
    if let Some((node, other)) = routed.iter().find(|(_, c)| overlaps(*c, cidr)) {
        return Some(SkipReason::OverlapsPeer {
            node: node.clone(),
            cidr: *other,
        });
    }
    None
}

/// Plans routes from `this_node` to every other node.
#[expect(
    clippy::too_many_lines,
    reason = "one pass over the peers, then the overlay and masquerade that follow from it"
)]
pub fn plan_routes<'a>(
    this_node: &str,
    nodes: impl IntoIterator<Item = &'a Node>,
    config: &RoutingConfig,
    host: &HostNetwork,
) -> Result<RoutePlan, PlanError> {
    let nodes: Vec<&Node> = nodes.into_iter().collect();
    let me = nodes
        .iter()
        .copied()
        .find(|n| n.metadata.name.as_deref() == Some(this_node))
        .ok_or_else(|| PlanError::ThisNodeMissing(this_node.to_owned()))?;
    let node_ip = node_underlay_ip(me, host)
        .ok_or_else(|| PlanError::ThisNodeNoAddress(this_node.to_owned()))?;
    let (local_pod_cidrs, _) = node_pod_cidrs(me);
    let has_ipv6 = !node_internal_ipv6s(me).is_empty();
    let underlay = host.link_holding_ip(node_ip);
    let underlay_mtu = underlay.map_or(1500, |l| l.mtu);

    let mut peers = Vec::new();
    let mut peer_nodes = Vec::new();
    let mut skipped = Vec::new();
    let mut all_pod_cidrs = local_pod_cidrs.clone();
    // Every IPv4 InternalIP: never inside a routed pod CIDR, never masqueraded to.
    let every_node_ip: Vec<Ipv4Addr> = nodes.iter().filter_map(|n| node_internal_ipv4(n)).collect();
    // Overlay MACs handed out so far (this node's first), with their underlay address.
    let mut macs: Vec<([u8; 6], IpAddr, String)> =
        vec![(underlay_mac(node_ip), node_ip, this_node.to_owned())];
    // Oldest first: when two Nodes claim overlapping pod CIDRs, the one that was there first
    // keeps its route, so a new (misconfigured or hostile) Node cannot take it over.
    let mut sorted: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| n.metadata.name.as_deref() != Some(this_node))
        .collect();
    sorted.sort_by_key(|n| (n.metadata.creation_timestamp.clone(), node_name(n)));
    let mut routed: Vec<(String, Ipv4Network)> = Vec::new();
    for peer in sorted {
        let name = node_name(peer);
        let skip = |reason| SkippedPeer {
            node: name.clone(),
            reason,
        };
        let (cidrs, bad) = node_pod_cidrs(peer);
        skipped.extend(bad.into_iter().map(|b| skip(SkipReason::BadPodCidr(b))));
        let Some(peer_ip) = peer_underlay_ip(peer, node_ip, has_ipv6, host) else {
            skipped.push(skip(SkipReason::NoInternalIp));
            continue;
        };
        // A peer with only IPv6 pod CIDRs is still reached here: the IPv6 plan follows.
        if cidrs.is_empty() && node_pod_cidrs6(peer).is_empty() {
            skipped.push(skip(SkipReason::NoPodCidr));
            continue;
        }
        let reach = match (config.mode, connected_link(host, peer_ip)) {
            (RoutingMode::Auto | RoutingMode::Direct, Some(link)) => PeerReach::Direct {
                ifindex: link.index,
            },
            (RoutingMode::Direct, None) => {
                skipped.push(skip(SkipReason::NotDirectlyReachable));
                continue;
            }
            // One VXLAN device has one underlay family, this node's and the peer's own (each
            // node's device uses its `node_underlay_ip`): a pair of nodes whose underlays
            // differ (a dual-stack node and an IPv6-only one) meets only directly.
            (RoutingMode::Auto | RoutingMode::Vxlan, _)
                if peer_ip.is_ipv4() != node_ip.is_ipv4()
                    || node_underlay_ip(peer, host)
                        .is_some_and(|u| u.is_ipv4() != peer_ip.is_ipv4()) =>
            {
                skipped.push(skip(SkipReason::OverlayFamilyMismatch));
                continue;
            }
            (RoutingMode::Auto | RoutingMode::Vxlan, _) => PeerReach::Vxlan {
                mac: underlay_mac(peer_ip),
            },
        };
        if let PeerReach::Vxlan { mac } = reach {
            if let Some((_, _, owner)) = macs.iter().find(|(m, ip, _)| *m == mac && *ip != peer_ip)
            {
                skipped.push(skip(SkipReason::VtepMacCollision {
                    node: owner.clone(),
                }));
                continue;
            }
            macs.push((mac, peer_ip, name.clone()));
        }
        peer_nodes.push(PeerNode {
            node: name.clone(),
            node_ip: peer_ip,
            reach,
        });
        let via = match (reach, cidrs.first()) {
            (PeerReach::Direct { ifindex }, _) => PeerVia::Direct { ifindex },
            (PeerReach::Vxlan { mac }, Some(first)) => PeerVia::Vxlan {
                vtep: vtep_addr(*first),
                mac,
            },
            // No IPv4 pod CIDR: nothing to route in IPv4.
            (PeerReach::Vxlan { .. }, None) => continue,
        };
        for cidr in cidrs {
            if let Some(reason) = check_peer_cidr(
                cidr,
                &local_pod_cidrs,
                config,
                host,
                &every_node_ip,
                &routed,
            ) {
                skipped.push(skip(reason));
                continue;
            }
            routed.push((name.clone(), cidr));
            all_pod_cidrs.push(cidr);
            peers.push(PeerRoute {
                node: name.clone(),
                node_ip: peer_ip,
                pod_cidr: cidr,
                via: via.clone(),
            });
        }
    }
    peers.sort_by_key(|p| (p.pod_cidr.network(), p.pod_cidr.prefix()));
    peer_nodes.sort_by(|a, b| a.node.cmp(&b.node));
    skipped.sort_by(|a, b| a.node.cmp(&b.node));

    // Any peer over the overlay needs the device, whichever family its pod CIDRs are.
    let needs_vxlan = config.mode == RoutingMode::Vxlan
        || peer_nodes
            .iter()
            .any(|p| matches!(p.reach, PeerReach::Vxlan { .. }));
    let vxlan = if needs_vxlan {
        let has_cidr6 = !node_pod_cidrs6(me).is_empty();
        Some(vxlan_device(
            this_node,
            node_ip,
            underlay,
            &local_pod_cidrs,
            has_cidr6,
            config,
        )?)
    } else {
        None
    };

    let masquerade = config.masquerade.then(|| {
        let mut exempt: Vec<Ipv4Network> = all_pod_cidrs.clone();
        exempt.extend(config.cluster_cidrs.iter().copied());
        exempt.extend(config.non_masquerade_cidrs.iter().copied());
        exempt.extend(every_node_ip.iter().map(|ip| Ipv4Network::from(*ip)));
        let mut pod_cidrs = all_pod_cidrs.clone();
        pod_cidrs.extend(config.cluster_cidrs.iter().copied());
        MasqueradeRules::new(local_pod_cidrs.clone(), exempt, pod_cidrs)
    });

    Ok(RoutePlan {
        node_name: this_node.to_owned(),
        node_ip,
        local_pod_cidrs,
        underlay_mtu,
        vxlan,
        peers,
        peer_nodes,
        skipped,
        masquerade,
    })
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The dump format of a plan (debug CLI, logs and golden tests), one object per line.
impl std::fmt::Display for RoutePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cidrs: Vec<String> = self
            .local_pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        writeln!(
            f,
            "node {} ip {} pod-cidrs [{}] underlay-mtu {}",
            self.node_name,
            self.node_ip,
            cidrs.join(", "),
            self.underlay_mtu
        )?;
        if let Some(v) = &self.vxlan {
            writeln!(
                f,
                "vxlan {} vni {} port {} local {} underlay-if {} mac {} mtu {}{}",
                v.name,
                v.vni,
                v.port,
                v.local,
                v.underlay_index,
                mac_str(v.mac),
                v.mtu,
                v.vtep.map(|v| format!(" vtep {v}/32")).unwrap_or_default()
            )?;
        }
        for p in &self.peers {
            match &p.via {
                PeerVia::Direct { ifindex } => writeln!(
                    f,
                    "route {} via {}{} if {} ({})",
                    p.pod_cidr,
                    if p.node_ip.is_ipv6() { "inet6 " } else { "" },
                    p.node_ip,
                    ifindex,
                    p.node
                )?,
                PeerVia::Vxlan { vtep, mac } => writeln!(
                    f,
                    "route {} via {vtep} dev {VXLAN_DEVICE} onlink ({}); neigh {vtep} {}; fdb {} dst {}",
                    p.pod_cidr,
                    p.node,
                    mac_str(*mac),
                    mac_str(*mac),
                    p.node_ip
                )?,
            }
        }
        // Overlay peers without an IPv4 route (IPv6 pod CIDRs only) still have their FDB entry.
        for p in &self.peer_nodes {
            if let PeerReach::Vxlan { mac } = p.reach
                && !self.peers.iter().any(|r| r.node == p.node)
            {
                writeln!(f, "fdb {} dst {} ({})", mac_str(mac), p.node_ip, p.node)?;
            }
        }
        for s in &self.skipped {
            writeln!(f, "skip {} {:?}", s.node, s.reason)?;
        }
        if let Some(m) = &self.masquerade {
            let list = |v: &[Ipv4Network]| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "masquerade from [{}] except [{}]",
                list(&m.sources),
                list(&m.exempt)
            )?;
        }
        Ok(())
    }
}

fn vxlan_device(
    this_node: &str,
    node_ip: IpAddr,
    underlay: Option<&HostLink>,
    local_pod_cidrs: &[Ipv4Network],
    has_cidr6: bool,
    config: &RoutingConfig,
) -> Result<VxlanDevicePlan, PlanError> {
    let link = underlay.ok_or(PlanError::NodeIpNotLocal(node_ip))?;
    if local_pod_cidrs.is_empty() && !has_cidr6 {
        return Err(PlanError::ThisNodeNoPodCidr(this_node.to_owned()));
    }
    Ok(VxlanDevicePlan {
        name: VXLAN_DEVICE.to_owned(),
        vni: config.vxlan_vni,
        port: config.vxlan_port,
        local: node_ip,
        underlay_index: link.index,
        mac: underlay_mac(node_ip),
        mtu: link.mtu.saturating_sub(vxlan_overhead(node_ip)),
        vtep: local_pod_cidrs.first().copied().map(vtep_addr),
    })
}

pub(crate) fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::routing::{VXLAN_PORT, VXLAN_VNI};

    fn node(name: &str, ip: Option<&str>, cidrs: &[&str]) -> Node {
        let addresses: Vec<serde_json::Value> = ip
            .into_iter()
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
            .chain(std::iter::once(
                serde_json::json!({"type": "Hostname", "address": name}),
            ))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDRs": cidrs},
            "status": {"addresses": addresses},
        }))
        .unwrap()
    }

    fn host() -> HostNetwork {
        HostNetwork {
            links: vec![
                HostLink {
                    name: "lo".into(),
                    index: 1,
                    mtu: 65536,
                    addrs: vec!["127.0.0.1/8".parse().unwrap()],
                    addrs6: Vec::new(),
                    is_loopback: true,
                },
                HostLink {
                    name: "eth0".into(),
                    index: 2,
                    mtu: 1500,
                    addrs: vec!["172.30.0.10/24".parse().unwrap()],
                    addrs6: Vec::new(),
                    is_loopback: false,
                },
            ],
            default_route_ifindex: None,
            foreign_routes: vec![
                "0.0.0.0/0".parse().unwrap(),
                "10.244.9.0/24".parse().unwrap(),
            ],
            foreign_routes6: Vec::new(),
        }
    }

    fn cluster() -> Vec<Node> {
        vec![
            node("n0", Some("172.30.0.10"), &["10.244.0.0/24"]),
            node(
                "n1",
                Some("172.30.0.11"),
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
            ),
            node("n2", Some("172.30.1.12"), &["10.244.2.0/24"]),
        ]
    }

    fn cfg(mode: RoutingMode) -> RoutingConfig {
        RoutingConfig {
            mode,
            ..RoutingConfig::default()
        }
    }

    #[test]
    fn auto_mode_routes_same_subnet_directly_and_others_over_vxlan() {
        let plan = plan_routes("n0", &cluster(), &cfg(RoutingMode::Auto), &host()).unwrap();
        assert_eq!(plan.node_ip, IpAddr::V4(Ipv4Addr::new(172, 30, 0, 10)));
        assert_eq!(plan.peers.len(), 2, "IPv6 CIDR ignored: {:?}", plan.peers);
        assert_eq!(plan.peers[0].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(plan.peers[0].via, PeerVia::Direct { ifindex: 2 });
        assert_eq!(plan.peers[1].pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(
            plan.peers[1].via,
            PeerVia::Vxlan {
                vtep: Ipv4Addr::new(10, 244, 2, 0),
                mac: [0x0e, 0x77, 172, 30, 1, 12]
            }
        );
        let vx = plan.vxlan.as_ref().expect("overlay needed for n2");
        assert_eq!(
            (vx.vni, vx.port, vx.mtu, vx.underlay_index),
            (VXLAN_VNI, VXLAN_PORT, 1450, 2)
        );
        assert_eq!(vx.vtep, Some(Ipv4Addr::new(10, 244, 0, 0)));
        assert_eq!(vx.mac, vtep_mac(Ipv4Addr::new(172, 30, 0, 10)));
        assert_eq!(cni_mtu(&cfg(RoutingMode::Auto), &plan), 1450);
        assert!(plan.skipped.is_empty());
    }

    #[test]
    fn dump_format_is_stable() {
        let mut nodes = cluster();
        nodes.push(node("n3", None, &["10.244.3.0/24"]));
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert_eq!(
            plan.to_string(),
            "node n0 ip 172.30.0.10 pod-cidrs [10.244.0.0/24] underlay-mtu 1500\n\
             vxlan twill.vxlan vni 1 port 8472 local 172.30.0.10 underlay-if 2 mac 0e:77:ac:1e:00:0a mtu 1450 vtep 10.244.0.0/32\n\
             route 10.244.1.0/24 via 172.30.0.11 if 2 (n1)\n\
             route 10.244.2.0/24 via 10.244.2.0 dev twill.vxlan onlink (n2); neigh 10.244.2.0 0e:77:ac:1e:01:0c; fdb 0e:77:ac:1e:01:0c dst 172.30.1.12\n\
             skip n3 NoInternalIp\n\
             masquerade from [10.244.0.0/24] except [10.244.0.0/24, 10.244.1.0/24, 10.244.2.0/24, 172.30.0.10/32, 172.30.0.11/32, 172.30.1.12/32]\n"
        );
    }

    #[test]
    fn auto_mode_on_one_subnet_needs_no_overlay() {
        let nodes = &cluster()[..2];
        let plan = plan_routes("n0", nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert!(plan.vxlan.is_none());
        assert_eq!(cni_mtu(&cfg(RoutingMode::Auto), &plan), 1500);
    }

    #[test]
    fn direct_mode_skips_peers_off_subnet() {
        let plan = plan_routes("n0", &cluster(), &cfg(RoutingMode::Direct), &host()).unwrap();
        assert_eq!(plan.peers.len(), 1);
        assert!(plan.vxlan.is_none());
        assert_eq!(
            plan.skipped,
            vec![SkippedPeer {
                node: "n2".into(),
                reason: SkipReason::NotDirectlyReachable
            }]
        );
    }

    #[test]
    fn vxlan_mode_tunnels_everything_and_lowers_the_mtu() {
        let plan = plan_routes("n0", &cluster(), &cfg(RoutingMode::Vxlan), &host()).unwrap();
        assert!(
            plan.peers
                .iter()
                .all(|p| matches!(p.via, PeerVia::Vxlan { .. }))
        );
        assert_eq!(cni_mtu(&cfg(RoutingMode::Vxlan), &plan), 1450);
        // Even alone, vxlan mode keeps the device so the MTU never changes under running pods.
        let alone = plan_routes("n0", &cluster()[..1], &cfg(RoutingMode::Vxlan), &host()).unwrap();
        assert!(alone.vxlan.is_some());
        assert_eq!(cni_mtu(&cfg(RoutingMode::Vxlan), &alone), 1450);
    }

    #[test]
    fn nodes_without_pod_cidr_or_address_are_skipped() {
        let mut nodes = cluster();
        nodes.push(node("n3", None, &["10.244.3.0/24"]));
        nodes.push(node("n4", Some("172.30.0.14"), &[]));
        nodes.push(node("n5", Some("fd00::5"), &["10.244.5.0/24"]));
        nodes.push(node("n6", Some("172.30.0.16"), &["bogus"]));
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert_eq!(plan.peers.len(), 2);
        assert_eq!(
            plan.skipped,
            vec![
                SkippedPeer {
                    node: "n3".into(),
                    reason: SkipReason::NoInternalIp
                },
                SkippedPeer {
                    node: "n4".into(),
                    reason: SkipReason::NoPodCidr
                },
                SkippedPeer {
                    node: "n5".into(),
                    reason: SkipReason::NoInternalIp
                },
                SkippedPeer {
                    node: "n6".into(),
                    reason: SkipReason::BadPodCidr("bogus".into())
                },
                SkippedPeer {
                    node: "n6".into(),
                    reason: SkipReason::NoPodCidr
                },
            ]
        );
    }

    #[test]
    fn overlapping_peer_cidr_is_refused() {
        let mut nodes = cluster();
        nodes.push(node("n9", Some("172.30.0.19"), &["10.244.0.0/16"]));
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert!(plan.peers.iter().all(|p| p.node != "n9"));
        assert!(matches!(
            plan.skipped[0].reason,
            SkipReason::OverlapsLocal(_)
        ));
    }

    fn created(mut n: Node, at: &str) -> Node {
        n.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            at.parse().unwrap(),
        ));
        n
    }

    /// Hostile or misconfigured peers: a pod CIDR outside the cluster CIDR, over
    /// this node's subnet, over the default route or another foreign route, holding a node's
    /// address, or overlapping an older peer's, gets no route; the honest peers keep theirs.
    #[test]
    #[expect(clippy::too_many_lines, reason = "one case per kind of hostile CIDR")]
    fn hostile_peer_cidrs_are_refused() {
        let mut nodes = vec![
            node("n0", Some("172.30.0.10"), &["10.244.0.0/24"]),
            created(
                node("z-old", Some("172.30.0.11"), &["10.244.1.0/24"]),
                "2026-01-01T00:00:00Z",
            ),
        ];
        for (name, ip, cidr) in [
            ("a-outside", "172.30.0.20", "10.99.0.0/24"),
            ("b-subnet", "172.30.0.21", "172.30.0.0/25"),
            ("c-default", "172.30.0.22", "0.0.0.0/0"),
            ("d-foreign", "172.30.0.23", "10.244.9.0/24"),
            ("e-node-ip", "172.30.0.24", "10.244.16.0/20"),
            ("f-steals", "172.30.0.25", "10.244.1.0/25"),
            ("g-honest", "172.30.0.26", "10.244.3.0/24"),
        ] {
            nodes.push(created(
                node(name, Some(ip), &[cidr]),
                "2026-06-01T00:00:00Z",
            ));
        }
        // e-node-ip's CIDR holds another node's InternalIP.
        nodes.push(created(
            node("h-odd-ip", Some("10.244.17.5"), &["10.244.4.0/24"]),
            "2026-06-01T00:00:00Z",
        ));
        let config = RoutingConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..cfg(RoutingMode::Auto)
        };
        let plan = plan_routes("n0", &nodes, &config, &host()).unwrap();
        let routed: Vec<(String, String)> = plan
            .peers
            .iter()
            .map(|p| (p.node.clone(), p.pod_cidr.to_string()))
            .collect();
        assert_eq!(
            routed,
            [
                ("z-old".to_owned(), "10.244.1.0/24".to_owned()),
                ("g-honest".to_owned(), "10.244.3.0/24".to_owned()),
                ("h-odd-ip".to_owned(), "10.244.4.0/24".to_owned()),
            ]
        );
        let net = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let skip = |node: &str, reason| SkippedPeer {
            node: node.into(),
            reason,
        };
        assert_eq!(
            plan.skipped,
            vec![
                skip(
                    "a-outside",
                    SkipReason::OutsideClusterCidr(net("10.99.0.0/24"))
                ),
                skip(
                    "b-subnet",
                    SkipReason::OutsideClusterCidr(net("172.30.0.0/25"))
                ),
                // 0.0.0.0/0 overlaps everything: the local pod CIDR is checked first.
                skip("c-default", SkipReason::OverlapsLocal(net("10.244.0.0/24"))),
                skip("d-foreign", SkipReason::ForeignRoute(net("10.244.9.0/24"))),
                skip(
                    "e-node-ip",
                    SkipReason::ContainsNodeIp(Ipv4Addr::new(10, 244, 17, 5))
                ),
                skip(
                    "f-steals",
                    SkipReason::OverlapsPeer {
                        node: "z-old".into(),
                        cidr: net("10.244.1.0/24")
                    }
                ),
            ]
        );
        assert!(plan.skipped.iter().all(|s| s.reason.is_conflict()));

        // Without a cluster CIDR the node's own network still stops it.
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        let reasons: BTreeMap<String, SkipReason> = plan
            .skipped
            .into_iter()
            .map(|s| (s.node, s.reason))
            .collect();
        assert_eq!(
            reasons["b-subnet"],
            SkipReason::OverlapsNodeSubnet(net("172.30.0.0/24"))
        );
        assert!(!reasons.contains_key("a-outside"), "routed: {reasons:?}");
        // The older Node keeps its CIDR whatever the names: swap the ages, the other one wins.
        let swapped: Vec<Node> = nodes
            .iter()
            .cloned()
            .map(|n| match n.metadata.name.as_deref() {
                Some("z-old") => created(n, "2026-07-01T00:00:00Z"),
                Some("f-steals") => created(n, "2026-01-01T00:00:00Z"),
                _ => n,
            })
            .collect();
        let plan = plan_routes("n0", &swapped, &config, &host()).unwrap();
        assert!(
            plan.peers
                .iter()
                .any(|p| p.node == "f-steals" && p.pod_cidr == net("10.244.1.0/25"))
        );
        assert!(plan.peers.iter().all(|p| p.node != "z-old"));
    }

    #[test]
    fn this_node_errors_are_typed() {
        assert!(matches!(
            plan_routes("nX", &cluster(), &cfg(RoutingMode::Auto), &host()),
            Err(PlanError::ThisNodeMissing(_))
        ));
        let nodes = vec![node("n0", None, &["10.244.0.0/24"])];
        assert!(matches!(
            plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()),
            Err(PlanError::ThisNodeNoAddress(_))
        ));
        // The overlay needs the node IP on a local interface.
        let nodes = vec![node("n0", Some("192.0.2.1"), &["10.244.0.0/24"])];
        assert!(matches!(
            plan_routes("n0", &nodes, &cfg(RoutingMode::Vxlan), &host()),
            Err(PlanError::NodeIpNotLocal(_))
        ));
    }

    #[test]
    fn plan_is_independent_of_node_order_and_canonicalises_cidrs() {
        let mut nodes = cluster();
        nodes[1] = node("n1", Some("172.30.0.11"), &["10.244.1.7/24"]);
        let a = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        nodes.reverse();
        let b = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.peers[0].pod_cidr.to_string(), "10.244.1.0/24");
    }

    /// An IPv6 underlay: eth0 holds only an IPv6 address.
    fn host6() -> HostNetwork {
        HostNetwork {
            links: vec![HostLink {
                name: "eth0".into(),
                index: 2,
                mtu: 1500,
                addrs: Vec::new(),
                addrs6: vec!["fd00:172:30::10/64".parse().unwrap()],
                is_loopback: false,
            }],
            default_route_ifindex: None,
            foreign_routes: Vec::new(),
            foreign_routes6: Vec::new(),
        }
    }

    /// Nodes with only IPv6 InternalIPs; n1 on n0's subnet, n2 on another one. `cidrs4` adds
    /// an IPv4 pod CIDR per node (dual-stack pods over an IPv6 underlay).
    fn cluster6(cidrs4: bool) -> Vec<Node> {
        let cidrs = |i: u8| {
            let mut c = vec![format!("fd00:10:244:{i}::/64")];
            if cidrs4 {
                c.push(format!("10.244.{i}.0/24"));
            }
            c
        };
        let n = |name: &str, ip: &str, i: u8| {
            let c = cidrs(i);
            let c: Vec<&str> = c.iter().map(String::as_str).collect();
            node(name, Some(ip), &c)
        };
        vec![
            n("n0", "fd00:172:30::10", 0),
            n("n1", "fd00:172:30::11", 1),
            n("n2", "fd00:172:30:1::12", 2),
        ]
    }

    #[test]
    fn ipv6_only_nodes_use_an_ipv6_underlay_direct_and_over_vxlan() {
        let nodes = cluster6(false);
        let config = cfg(RoutingMode::Auto);
        let plan = plan_routes("n0", &nodes, &config, &host6()).unwrap();
        let n1: IpAddr = "fd00:172:30::11".parse().unwrap();
        let n2: IpAddr = "fd00:172:30:1::12".parse().unwrap();
        assert_eq!(plan.node_ip, "fd00:172:30::10".parse::<IpAddr>().unwrap());
        assert!(plan.peers.is_empty(), "no IPv4 pod CIDRs: {plan}");
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
        let mac2 = vtep_mac6("fd00:172:30:1::12".parse().unwrap());
        assert_eq!(
            plan.to_string(),
            format!(
                "node n0 ip fd00:172:30::10 pod-cidrs [] underlay-mtu 1500\n\
                 vxlan twill.vxlan vni 1 port 8472 local fd00:172:30::10 underlay-if 2 mac {} mtu 1430\n\
                 fdb {} dst fd00:172:30:1::12 (n2)\n\
                 masquerade from [] except []\n",
                mac_str(underlay_mac(plan.node_ip)),
                mac_str(mac2)
            )
        );
        assert_eq!(
            plan.peer_nodes,
            vec![
                PeerNode {
                    node: "n1".into(),
                    node_ip: n1,
                    reach: PeerReach::Direct { ifindex: 2 }
                },
                PeerNode {
                    node: "n2".into(),
                    node_ip: n2,
                    reach: PeerReach::Vxlan { mac: mac2 }
                },
            ]
        );
        // The device: IPv6 local address, 70 bytes of overhead, no IPv4 VTEP.
        let vx = plan.vxlan.as_ref().expect("n2 needs the overlay");
        assert_eq!((vx.local, vx.mtu, vx.vtep), (plan.node_ip, 1430, None));
        assert_eq!(vx.mac, underlay_mac(plan.node_ip));
        assert_eq!(cni_mtu(&config, &plan), 1430);
        assert_eq!(
            plan.wanted_fdb(),
            std::collections::BTreeMap::from([(mac2, n2)])
        );
        // The IPv6 pod CIDRs follow: n1 via its underlay address, n2 over the overlay.
        let plan6 = crate::routing::plan_routes6("n0", &nodes, &config, &host6(), &plan);
        assert_eq!(
            plan6.to_string(),
            format!(
                "ipv6 pod-cidrs [fd00:10:244::/64]\n\
                 vxlan vtep6 fd00:10:244::/128\n\
                 route fd00:10:244:1::/64 via fd00:172:30::11 if 2 (n1)\n\
                 route fd00:10:244:2::/64 via fd00:10:244:2:: dev twill.vxlan onlink (n2); neigh fd00:10:244:2:: {}\n",
                mac_str(mac2)
            )
        );
        // A masquerade without IPv4 pods has no IPv4 source to translate.
        assert!(
            plan.masquerade
                .as_ref()
                .is_some_and(|m| m.sources.is_empty())
        );
        assert!(plan6.masquerade.is_some());
    }

    #[test]
    fn ipv4_pod_cidrs_cross_an_ipv6_underlay_via_inet6_or_the_overlay() {
        let nodes = cluster6(true);
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host6()).unwrap();
        let mac2 = vtep_mac6("fd00:172:30:1::12".parse().unwrap());
        assert_eq!(
            plan.to_string(),
            format!(
                "node n0 ip fd00:172:30::10 pod-cidrs [10.244.0.0/24] underlay-mtu 1500\n\
                 vxlan twill.vxlan vni 1 port 8472 local fd00:172:30::10 underlay-if 2 mac {} mtu 1430 vtep 10.244.0.0/32\n\
                 route 10.244.1.0/24 via inet6 fd00:172:30::11 if 2 (n1)\n\
                 route 10.244.2.0/24 via 10.244.2.0 dev twill.vxlan onlink (n2); neigh 10.244.2.0 {}; fdb {} dst fd00:172:30:1::12\n\
                 masquerade from [10.244.0.0/24] except [10.244.0.0/24, 10.244.1.0/24, 10.244.2.0/24]\n",
                mac_str(underlay_mac(plan.node_ip)),
                mac_str(mac2),
                mac_str(mac2),
            )
        );
        // The direct IPv4 route has an IPv6 nexthop (RTA_VIA), no IPv4 gateway.
        let routes = plan.wanted_routes(Some(9));
        let direct = routes[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(
            (direct.gateway, direct.via6, direct.oif, direct.onlink),
            (
                None,
                Some("fd00:172:30::11".parse().unwrap()),
                Some(2),
                false
            )
        );
        let overlay = routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (overlay.gateway, overlay.via6, overlay.oif),
            (Some(Ipv4Addr::new(10, 244, 2, 0)), None, Some(9))
        );
        // Mode vxlan: every peer over the IPv6-underlay overlay, MTU 1500 − 70.
        let all = plan_routes("n0", &nodes, &cfg(RoutingMode::Vxlan), &host6()).unwrap();
        assert!(
            all.peer_nodes
                .iter()
                .all(|p| matches!(p.reach, PeerReach::Vxlan { .. }))
        );
        assert_eq!(all.wanted_fdb().len(), 2);
        assert_eq!(cni_mtu(&cfg(RoutingMode::Vxlan), &all), 1430);
        // Mode direct: the peer on another subnet is skipped, in both families.
        let direct = plan_routes("n0", &nodes, &cfg(RoutingMode::Direct), &host6()).unwrap();
        assert!(direct.vxlan.is_none());
        assert_eq!(
            direct.skipped,
            vec![SkippedPeer {
                node: "n2".into(),
                reason: SkipReason::NotDirectlyReachable
            }]
        );
        let plan6 = crate::routing::plan_routes6(
            "n0",
            &nodes,
            &cfg(RoutingMode::Direct),
            &host6(),
            &direct,
        );
        assert_eq!(plan6.peers.len(), 1);
        assert_eq!(
            plan6.skipped[0].reason,
            crate::routing::SkipReason6::NoUnderlayRoute
        );
    }

    #[test]
    fn a_dual_stack_node_keeps_the_ipv4_underlay_and_skips_ipv6_only_peers() {
        let mut nodes = cluster6(false);
        nodes[0] = node(
            "n0",
            Some("172.30.0.10"),
            &["10.244.0.0/24", "fd00:10:244::/64"],
        );
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host()).unwrap();
        assert!(plan.node_ip.is_ipv4());
        assert!(plan.peer_nodes.is_empty());
        assert!(
            plan.skipped
                .iter()
                .all(|s| s.reason == SkipReason::NoInternalIp),
            "{:?}",
            plan.skipped
        );
    }

    /// A Node with InternalIPs `ips` (either family) and pod CIDRs `cidrs`.
    fn node_ips(name: &str, ips: &[&str], cidrs: &[&str]) -> Node {
        let mut n = node(name, None, cidrs);
        let addrs = n.status.as_mut().unwrap().addresses.as_mut().unwrap();
        for ip in ips {
            addrs.push(
                serde_json::from_value(serde_json::json!({"type": "InternalIP", "address": ip}))
                    .unwrap(),
            );
        }
        n
    }

    /// eth0 holds an address of each family (a dual-stack node's underlay interface).
    fn host_dual() -> HostNetwork {
        let mut h = host();
        h.links[1].addrs6 = vec!["fd00:172:30::10/64".parse().unwrap()];
        h
    }

    /// n0 and n3 dual-stack, n1 and n2 IPv6-only (n2 on another IPv6 subnet), all in one
    /// cluster.
    fn mixed_cluster() -> Vec<Node> {
        vec![
            node_ips(
                "n0",
                &["172.30.0.10", "fd00:172:30::10"],
                &["10.244.0.0/24", "fd00:10:244::/64"],
            ),
            node_ips("n1", &["fd00:172:30::11"], &["fd00:10:244:1::/64"]),
            node_ips("n2", &["fd00:172:30:1::12"], &["fd00:10:244:2::/64"]),
            node_ips(
                "n3",
                &["172.30.0.13", "fd00:172:30::13"],
                &["10.244.3.0/24", "fd00:10:244:3::/64"],
            ),
        ]
    }

    /// The underlay family is chosen per peer: a dual-stack node reaches a dual-stack peer over
    /// IPv4 and an IPv6-only peer over IPv6 (directly: its VXLAN device is IPv4, so an
    /// IPv6-only peer off its subnets is skipped, `OverlayFamilyMismatch`); the IPv6 plan
    /// follows each peer's choice.
    #[test]
    fn a_dual_stack_node_reaches_ipv6_only_peers_over_ipv6_and_dual_stack_ones_over_ipv4() {
        let nodes = mixed_cluster();
        let config = cfg(RoutingMode::Auto);
        let plan = plan_routes("n0", &nodes, &config, &host_dual()).unwrap();
        assert_eq!(plan.node_ip, "172.30.0.10".parse::<IpAddr>().unwrap());
        assert!(plan.vxlan.is_none(), "{plan}");
        assert_eq!(
            plan.peer_nodes,
            vec![
                PeerNode {
                    node: "n1".into(),
                    node_ip: "fd00:172:30::11".parse().unwrap(),
                    reach: PeerReach::Direct { ifindex: 2 }
                },
                PeerNode {
                    node: "n3".into(),
                    node_ip: "172.30.0.13".parse().unwrap(),
                    reach: PeerReach::Direct { ifindex: 2 }
                },
            ]
        );
        assert_eq!(
            plan.skipped,
            vec![SkippedPeer {
                node: "n2".into(),
                reason: SkipReason::OverlayFamilyMismatch
            }]
        );
        let plan6 = crate::routing::plan_routes6("n0", &nodes, &config, &host_dual(), &plan);
        assert_eq!(
            plan6.to_string(),
            "ipv6 pod-cidrs [fd00:10:244::/64]\n\
             route fd00:10:244:1::/64 via fd00:172:30::11 if 2 (n1)\n\
             route fd00:10:244:3::/64 via fd00:172:30::13 if 2 (n3)\n\
             skip6 n2 NoUnderlayRoute\n"
        );
        // Mode vxlan: the dual-stack peer over the (IPv4) overlay, the IPv6-only ones nowhere.
        let all = plan_routes("n0", &nodes, &cfg(RoutingMode::Vxlan), &host_dual()).unwrap();
        let vx = all.vxlan.as_ref().expect("n3 over the overlay");
        assert!(vx.local.is_ipv4());
        assert_eq!(
            all.peer_nodes
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>(),
            ["n3"]
        );
        assert!(
            all.skipped
                .iter()
                .all(|s| s.reason == SkipReason::OverlayFamilyMismatch)
                && all.skipped.len() == 2,
            "{:?}",
            all.skipped
        );
    }

    /// The other side: an IPv6-only node reaches every peer over IPv6, a dual-stack peer
    /// directly (the peer's VXLAN device is IPv4, so never over the overlay), an IPv6-only
    /// peer off its subnet over its IPv6 overlay.
    #[test]
    fn an_ipv6_only_node_reaches_dual_stack_peers_directly_over_ipv6() {
        let nodes = mixed_cluster();
        let mut h = host6();
        h.links[0].addrs6 = vec!["fd00:172:30::11/64".parse().unwrap()];
        let plan = plan_routes("n1", &nodes, &cfg(RoutingMode::Auto), &h).unwrap();
        assert_eq!(plan.node_ip, "fd00:172:30::11".parse::<IpAddr>().unwrap());
        let reach: Vec<(&str, IpAddr, bool)> = plan
            .peer_nodes
            .iter()
            .map(|p| {
                (
                    p.node.as_str(),
                    p.node_ip,
                    matches!(p.reach, PeerReach::Direct { .. }),
                )
            })
            .collect();
        assert_eq!(
            reach,
            [
                ("n0", "fd00:172:30::10".parse().unwrap(), true),
                ("n2", "fd00:172:30:1::12".parse().unwrap(), false),
                ("n3", "fd00:172:30::13".parse().unwrap(), true),
            ]
        );
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
        let plan6 = crate::routing::plan_routes6("n1", &nodes, &cfg(RoutingMode::Auto), &h, &plan);
        assert!(
            plan6
                .to_string()
                .contains("route fd00:10:244::/64 via fd00:172:30::10 if 2 (n0)\n"),
            "{plan6}"
        );
        // Mode vxlan: the dual-stack peers' devices are IPv4, so only n2 is reached.
        let all = plan_routes("n1", &nodes, &cfg(RoutingMode::Vxlan), &h).unwrap();
        assert_eq!(
            all.peer_nodes
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>(),
            ["n2"]
        );
        assert_eq!(
            all.skipped
                .iter()
                .map(|s| (s.node.as_str(), &s.reason))
                .collect::<Vec<_>>(),
            [
                ("n0", &SkipReason::OverlayFamilyMismatch),
                ("n3", &SkipReason::OverlayFamilyMismatch)
            ]
        );
    }

    /// Two IPv6 underlay addresses whose FNV-1a hashes collide (found by search): the older
    /// peer keeps the MAC, the other is refused rather than sharing its FDB entry.
    #[test]
    fn colliding_ipv6_vtep_macs_are_refused() {
        let (a, b) = ("fd00:172:30:6351::54b5", "fd00:172:30:5620::5621");
        assert_eq!(vtep_mac6(a.parse().unwrap()), vtep_mac6(b.parse().unwrap()));
        let mut nodes = cluster6(false);
        nodes.push(created(
            node("p-old", Some(a), &["fd00:10:244:7::/64"]),
            "2026-01-01T00:00:00Z",
        ));
        nodes.push(created(
            node("a-new", Some(b), &["fd00:10:244:8::/64"]),
            "2026-06-01T00:00:00Z",
        ));
        let plan = plan_routes("n0", &nodes, &cfg(RoutingMode::Auto), &host6()).unwrap();
        assert_eq!(
            plan.skipped,
            vec![SkippedPeer {
                node: "a-new".into(),
                reason: SkipReason::VtepMacCollision {
                    node: "p-old".into()
                }
            }]
        );
        assert!(plan.skipped[0].reason.is_conflict());
        assert!(plan.peer_nodes.iter().any(|p| p.node == "p-old"));
        // Distinct addresses of the usual numbering never collide in one subnet's worth.
        let macs: std::collections::BTreeSet<[u8; 6]> = (1..=4096u16)
            .flat_map(|h| {
                [0u16, 1].map(|s| vtep_mac6(Ipv6Addr::new(0xfd00, 0x172, 0x30, s, 0, 0, 0, h)))
            })
            .collect();
        assert_eq!(macs.len(), 8192);
    }

    #[test]
    fn ipv6_only_node_errors_are_typed() {
        // An IPv6 InternalIP on no local interface cannot be the overlay's local address.
        let nodes = vec![node("n0", Some("fd00:99::1"), &["fd00:10:244::/64"])];
        assert!(matches!(
            plan_routes("n0", &nodes, &cfg(RoutingMode::Vxlan), &host6()),
            Err(PlanError::NodeIpNotLocal(IpAddr::V6(_)))
        ));
        // No pod CIDR of either family: no VTEP to give the device.
        let nodes = vec![node("n0", Some("fd00:172:30::10"), &[])];
        assert!(matches!(
            plan_routes("n0", &nodes, &cfg(RoutingMode::Vxlan), &host6()),
            Err(PlanError::ThisNodeNoPodCidr(_))
        ));
    }

    #[test]
    fn masquerade_exempts_pods_nodes_and_configured_cidrs() {
        let config = RoutingConfig {
            non_masquerade_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
            ..cfg(RoutingMode::Auto)
        };
        let plan = plan_routes("n0", &cluster(), &config, &host()).unwrap();
        let m = plan.masquerade.expect("masquerade on by default");
        assert_eq!(
            m.sources,
            vec!["10.244.0.0/24".parse::<Ipv4Network>().unwrap()]
        );
        let exempt: Vec<String> = m.exempt.iter().map(ToString::to_string).collect();
        assert_eq!(
            exempt,
            [
                "10.244.0.0/24",
                "10.244.1.0/24",
                "10.244.2.0/24",
                "172.30.0.10/32",
                "172.30.0.11/32",
                "172.30.1.12/32",
                "192.168.0.0/16"
            ]
        );
        let off = plan_routes(
            "n0",
            &cluster(),
            &RoutingConfig {
                masquerade: false,
                ..config
            },
            &host(),
        )
        .unwrap();
        assert!(off.masquerade.is_none());
    }
}
