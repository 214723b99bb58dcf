//! The IPv6 half of the route plan: routes to other nodes' IPv6 pod CIDRs (dual-stack and
//! IPv6-only clusters), planned after the IPv4 plan and following its underlay choice per peer
//! ([`RoutePlan::peer_nodes`], made for every peer with a pod CIDR of either family).
//!
//! - A peer reached **directly** is reached directly over IPv6 too: over an IPv6 underlay via
//!   its underlay address; over an IPv4 one when one of its IPv6 InternalIPs lies in a
//!   connected IPv6 subnet of ours: `podCIDR6 via <peer IPv6 InternalIP> dev <that
//!   interface>`. Without one it is skipped ([`SkipReason6::NotDirectlyReachable`]): the
//!   overlay is only there for peers the underlay plan sends through it.
//! - A peer reached over the **VXLAN overlay** is reached over the same device: VXLAN carries
//!   Ethernet frames, so either underlay carries IPv6 pods as they are. The peer's IPv6 VTEP
//!   address is the network address of its first IPv6 pod CIDR (the subnet-router anycast
//!   address, which twill-cni never assigns), with the peer's VTEP MAC:
//!   `podCIDR6 via <peer VTEP6> dev twill.vxlan onlink`, a permanent neighbour
//!   `<peer VTEP6> lladdr <peer MAC>`; the FDB entry `<peer MAC> dst <peer underlay address>`
//!   is the IPv4 plan's. This node's own VTEP6 goes on the device as a `/128`.
//! - A peer the underlay plan does not reach gets no IPv6 route
//!   ([`SkipReason6::NoUnderlayRoute`]).
//!
//! The overlay's overhead depends on the outer (underlay) family only: 50 bytes over IPv4, 70
//! over IPv6, whatever the inner packet is (the IPv4 plan's device MTU). IPv6 needs a link MTU
//! of at least 1280, which twill-cni checks.
use std::net::{IpAddr, Ipv6Addr};

use ipnetwork::Ipv6Network;
use k8s_openapi::api::core::v1::Node;

use super::{
    HostNetwork, PeerReach, RoutePlan, RoutingConfig,
    masq::Masquerade6Rules,
    plan::{
        mac_str, masquerade_rules, node_internal_ips, node_name, overlaps, parse_pod_cidrs,
        peers_oldest_first,
    },
};

/// The IPv6 routes of this node. Sorted, so equal inputs give equal plans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan6 {
    /// This node's IPv6 pod CIDRs.
    pub local_pod_cidrs: Vec<Ipv6Network>,
    /// This node's IPv6 VTEP address, when the overlay exists and this node has an IPv6 pod
    /// CIDR (put on the overlay device as a `/128`).
    pub vtep: Option<Ipv6Addr>,
    /// One entry per (peer, IPv6 pod CIDR), sorted by destination.
    pub peers: Vec<PeerRoute6>,
    pub skipped: Vec<SkippedPeer6>,
    /// Every IPv6 pod CIDR of the cluster (ours and the routed peers'), sorted: the egress
    /// masquerade leaves traffic between them untranslated.
    pub all_pod_cidrs: Vec<Ipv6Network>,
    /// IPv6 egress masquerade (`None` when masquerade is off or this node has no IPv6 pods).
    pub masquerade: Option<Masquerade6Rules>,
}

/// A route to one IPv6 pod CIDR of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoute6 {
    pub node: String,
    pub pod_cidr: Ipv6Network,
    pub via: PeerVia6,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerVia6 {
    /// `pod_cidr via gateway dev <ifindex>` (the peer's IPv6 InternalIP).
    Direct { gateway: Ipv6Addr, ifindex: u32 },
    /// `pod_cidr via vtep dev twill.vxlan onlink`, neighbour `vtep → mac`.
    Vxlan { vtep: Ipv6Addr, mac: [u8; 6] },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedPeer6 {
    pub node: String,
    pub reason: SkipReason6,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason6 {
    /// The underlay plan does not reach the peer (no InternalIP of the underlay family, not
    /// on a connected subnet in mode `direct`, or refused there).
    NoUnderlayRoute,
    /// Reached directly over IPv4, but no IPv6 InternalIP of the peer is on a connected subnet.
    NotDirectlyReachable,
    /// The pod CIDR overlaps one of this node's own IPv6 pod CIDRs.
    OverlapsLocal(Ipv6Network),
    /// The pod CIDR overlaps one of this node's IPv6 subnets or addresses.
    OverlapsNodeSubnet(Ipv6Network),
    /// The main table has a route to exactly this pod CIDR that the agent does not own.
    ForeignRoute(Ipv6Network),
    /// The pod CIDR overlaps one an older Node already routes.
    OverlapsPeer { node: String, cidr: Ipv6Network },
}

impl SkipReason6 {
    /// As [`super::SkipReason::is_conflict`]: a conflicting Node object, not an incomplete one.
    pub fn is_conflict(&self) -> bool {
        !matches!(
            self,
            SkipReason6::NoUnderlayRoute | SkipReason6::NotDirectlyReachable
        )
    }
}

impl std::fmt::Display for SkipReason6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason6::NoUnderlayRoute => f.write_str("NoUnderlayRoute"),
            SkipReason6::NotDirectlyReachable => f.write_str("NotDirectlyReachable"),
            SkipReason6::OverlapsLocal(n) => write!(f, "OverlapsLocal({n})"),
            SkipReason6::OverlapsNodeSubnet(n) => write!(f, "OverlapsNodeSubnet({n})"),
            SkipReason6::ForeignRoute(n) => write!(f, "ForeignRoute({n})"),
            SkipReason6::OverlapsPeer { node, cidr } => write!(f, "OverlapsPeer({node} {cidr})"),
        }
    }
}

/// The IPv6 pod CIDRs of a Node (`spec.podCIDRs`), canonical; other entries are the IPv4
/// plan's business (it reports unparsable ones).
pub fn node_pod_cidrs6(node: &Node) -> Vec<Ipv6Network> {
    let raw = node.spec.as_ref().and_then(|s| s.pod_cidrs.as_ref());
    parse_pod_cidrs(raw.into_iter().flatten()).0
}

/// The IPv6 InternalIPs of a Node.
pub fn node_internal_ipv6s(node: &Node) -> Vec<Ipv6Addr> {
    node_internal_ips::<Ipv6Network>(node).collect()
}

/// The IPv6 VTEP address of a node: the network address of its first IPv6 pod CIDR.
pub fn vtep_addr6(pod_cidr: Ipv6Network) -> Ipv6Addr {
    pod_cidr.network()
}

/// Plans the IPv6 routes from `this_node`, following `v4` (the IPv4 plan of the same inputs).
pub fn plan_routes6<'a>(
    this_node: &str,
    nodes: impl IntoIterator<Item = &'a Node>,
    config: &RoutingConfig,
    host: &HostNetwork,
    v4: &RoutePlan,
) -> RoutePlan6 {
    let nodes: Vec<&Node> = nodes.into_iter().collect();
    let local_pod_cidrs = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(this_node))
        .map(|n| node_pod_cidrs6(n))
        .unwrap_or_default();
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut all_pod_cidrs = local_pod_cidrs.clone();
    // Oldest first, as the IPv4 plan: an older Node keeps a contested range.
    for peer in peers_oldest_first(&nodes, this_node) {
        let name = node_name(peer);
        let cidrs = node_pod_cidrs6(peer);
        let Some(first) = cidrs.first().copied() else {
            continue;
        };
        let skip = |reason| SkippedPeer6 {
            node: name.clone(),
            reason,
        };
        let Some(underlay) = v4.peer_nodes.iter().find(|p| p.node == name) else {
            skipped.push(skip(SkipReason6::NoUnderlayRoute));
            continue;
        };
        let via = match (underlay.reach, underlay.node_ip) {
            // An IPv6 underlay: the peer's underlay address is the gateway.
            (PeerReach::Direct { ifindex }, IpAddr::V6(gateway)) => {
                PeerVia6::Direct { gateway, ifindex }
            }
            (PeerReach::Direct { .. }, IpAddr::V4(_)) => {
                let direct = node_internal_ipv6s(peer)
                    .into_iter()
                    .find_map(|ip| host.connected_link6(ip).map(|l| (ip, l.index)));
                let Some((gateway, ifindex)) = direct else {
                    skipped.push(skip(SkipReason6::NotDirectlyReachable));
                    continue;
                };
                PeerVia6::Direct { gateway, ifindex }
            }
            (PeerReach::Vxlan { mac }, _) => PeerVia6::Vxlan {
                vtep: vtep_addr6(first),
                mac,
            },
        };
        for cidr in cidrs {
            let reason = if let Some(l) = local_pod_cidrs.iter().find(|l| overlaps(**l, cidr)) {
                Some(SkipReason6::OverlapsLocal(*l))
            } else if let Some(n) = host.node_subnets6().find(|n| overlaps(*n, cidr)) {
                Some(SkipReason6::OverlapsNodeSubnet(n))
            } else if host.foreign_routes6.contains(&cidr) {
                Some(SkipReason6::ForeignRoute(cidr))
            } else {
                peers
                    .iter()
                    .find(|p: &&PeerRoute6| overlaps(p.pod_cidr, cidr))
                    .map(|p| SkipReason6::OverlapsPeer {
                        node: p.node.clone(),
                        cidr: p.pod_cidr,
                    })
            };
            if let Some(reason) = reason {
                skipped.push(skip(reason));
                continue;
            }
            all_pod_cidrs.push(cidr);
            peers.push(PeerRoute6 {
                node: name.clone(),
                pod_cidr: cidr,
                via: via.clone(),
            });
        }
    }
    peers.sort_by_key(|p| (p.pod_cidr.network(), p.pod_cidr.prefix()));
    skipped.sort_by(|a, b| a.node.cmp(&b.node));
    all_pod_cidrs.sort_by_key(|n| (n.network(), n.prefix()));
    // Like the IPv4 plan's: only when there is an IPv4 masquerade (the switch is one flag).
    let masquerade = (v4.masquerade.is_some() && !local_pod_cidrs.is_empty()).then(|| {
        masquerade_rules(
            &local_pod_cidrs,
            &all_pod_cidrs,
            &config.cluster_cidrs6,
            &config.non_masquerade_cidrs6,
            nodes.iter().flat_map(|n| node_internal_ipv6s(n)),
        )
    });
    let vtep = v4
        .vxlan
        .as_ref()
        .and(local_pod_cidrs.first().copied().map(vtep_addr6));
    RoutePlan6 {
        local_pod_cidrs,
        vtep,
        peers,
        skipped,
        all_pod_cidrs,
        masquerade,
    }
}

/// The dump format (debug CLI, logs and golden tests), one object per line, after the IPv4
/// plan's.
impl std::fmt::Display for RoutePlan6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cidrs: Vec<String> = self
            .local_pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        writeln!(f, "ipv6 pod-cidrs [{}]", cidrs.join(", "))?;
        if let Some(v) = self.vtep {
            writeln!(f, "vxlan vtep6 {v}/128")?;
        }
        for p in &self.peers {
            match &p.via {
                PeerVia6::Direct { gateway, ifindex } => writeln!(
                    f,
                    "route {} via {gateway} if {ifindex} ({})",
                    p.pod_cidr, p.node
                )?,
                PeerVia6::Vxlan { vtep, mac } => writeln!(
                    f,
                    "route {} via {vtep} dev {} onlink ({}); neigh {vtep} {}",
                    p.pod_cidr,
                    super::VXLAN_DEVICE,
                    p.node,
                    mac_str(*mac)
                )?,
            }
        }
        for s in &self.skipped {
            writeln!(f, "skip6 {} {}", s.node, s.reason)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{HostLink, RoutingMode, plan_routes, vtep_mac};

    fn node(name: &str, ips: &[&str], cidrs: &[&str]) -> Node {
        let addresses: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
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
            links: vec![HostLink {
                name: "eth0".into(),
                index: 2,
                mtu: 1500,
                addrs: vec!["172.30.0.10/24".parse().unwrap()],
                addrs6: vec!["fd00:172:30::10/64".parse().unwrap()],
                is_loopback: false,
            }],
            default_route_ifindex: None,
            foreign_routes: Vec::new(),
            foreign_routes6: vec!["fd00:10:244:7::/64".parse().unwrap()],
        }
    }

    fn cluster() -> Vec<Node> {
        vec![
            node(
                "n0",
                &["172.30.0.10", "fd00:172:30::10"],
                &["10.244.0.0/24", "fd00:10:244::/64"],
            ),
            // Same subnet, IPv6 first in its podCIDRs.
            node(
                "n1",
                &["172.30.0.11", "fd00:172:30::11"],
                &["fd00:10:244:1::/64", "10.244.1.0/24"],
            ),
            // Another subnet: over the overlay.
            node(
                "n2",
                &["172.30.1.12", "fd00:172:30:1::12"],
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
            ),
            // Same IPv4 subnet, but no IPv6 address on a connected subnet.
            node(
                "n3",
                &["172.30.0.13"],
                &["10.244.3.0/24", "fd00:10:244:3::/64"],
            ),
            // IPv4-only peer: nothing to plan.
            node("n4", &["172.30.0.14"], &["10.244.4.0/24"]),
            // Hostile or misconfigured: n0's range, a foreign route's, the node subnet.
            node(
                "n5",
                &["172.30.0.15", "fd00:172:30::15"],
                &["10.244.5.0/24", "fd00:10:244::/56"],
            ),
            node(
                "n6",
                &["172.30.0.16", "fd00:172:30::16"],
                &["10.244.6.0/24", "fd00:10:244:7::/64"],
            ),
            node(
                "n7",
                &["172.30.0.17", "fd00:172:30::17"],
                &["10.244.8.0/24", "fd00:172:30::/60"],
            ),
        ]
    }

    fn plans(mode: RoutingMode) -> (RoutePlan, RoutePlan6) {
        let cfg = RoutingConfig {
            mode,
            masquerade: false,
            ..RoutingConfig::default()
        };
        let nodes = cluster();
        let v4 = plan_routes("n0", &nodes, &cfg, &host()).unwrap();
        let v6 = plan_routes6("n0", &nodes, &cfg, &host(), &v4);
        (v4, v6)
    }

    #[test]
    fn ipv6_follows_the_ipv4_choice_per_peer() {
        let (_, v6) = plans(RoutingMode::Auto);
        assert_eq!(
            v6.to_string(),
            "ipv6 pod-cidrs [fd00:10:244::/64]\n\
             vxlan vtep6 fd00:10:244::/128\n\
             route fd00:10:244:1::/64 via fd00:172:30::11 if 2 (n1)\n\
             route fd00:10:244:2::/64 via fd00:10:244:2:: dev twill.vxlan onlink (n2); neigh fd00:10:244:2:: 0e:77:ac:1e:01:0c\n\
             skip6 n3 NotDirectlyReachable\n\
             skip6 n5 OverlapsLocal(fd00:10:244::/64)\n\
             skip6 n6 ForeignRoute(fd00:10:244:7::/64)\n\
             skip6 n7 OverlapsNodeSubnet(fd00:172:30::/64)\n"
        );
        assert_eq!(
            v6.all_pod_cidrs,
            [
                "fd00:10:244::/64".parse::<Ipv6Network>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
                "fd00:10:244:2::/64".parse().unwrap()
            ]
        );
        assert!(
            v6.skipped.iter().all(|s| s.reason.is_conflict()
                == !matches!(s.reason, SkipReason6::NotDirectlyReachable))
        );
    }

    #[test]
    fn vxlan_mode_puts_every_ipv6_peer_on_the_overlay() {
        let (v4, v6) = plans(RoutingMode::Vxlan);
        assert!(v4.vxlan.is_some());
        let via: Vec<(&str, bool)> = v6
            .peers
            .iter()
            .map(|p| (p.node.as_str(), matches!(p.via, PeerVia6::Vxlan { .. })))
            .collect();
        assert_eq!(via, [("n1", true), ("n2", true), ("n3", true)]);
        assert_eq!(v6.vtep, Some("fd00:10:244::".parse().unwrap()));
        // The neighbour's MAC is the one the IPv4 plan's FDB entry points at the peer.
        let n1 = &v6.peers[0];
        assert_eq!(
            n1.via,
            PeerVia6::Vxlan {
                vtep: "fd00:10:244:1::".parse().unwrap(),
                mac: vtep_mac("172.30.0.11".parse().unwrap())
            }
        );
    }

    #[test]
    fn direct_mode_and_ipv4_only_clusters() {
        let (v4, v6) = plans(RoutingMode::Direct);
        assert!(v4.vxlan.is_none() && v6.vtep.is_none());
        assert_eq!(v6.peers.len(), 1);
        assert!(
            v6.skipped
                .iter()
                .any(|s| s.node == "n2" && s.reason == SkipReason6::NoUnderlayRoute)
        );
        // An IPv4-only cluster plans nothing in IPv6.
        let nodes = vec![
            node("n0", &["172.30.0.10"], &["10.244.0.0/24"]),
            node("n1", &["172.30.0.11"], &["10.244.1.0/24"]),
        ];
        let v4 = plan_routes("n0", &nodes, &RoutingConfig::default(), &host()).unwrap();
        assert_eq!(
            plan_routes6("n0", &nodes, &RoutingConfig::default(), &host(), &v4),
            RoutePlan6::default()
        );
    }

    #[test]
    fn ipv6_masquerade_exempts_pods_nodes_and_the_ipv6_cluster_and_non_masquerade_cidrs() {
        let cfg = RoutingConfig {
            cluster_cidrs6: vec!["fd00:10:244::/56".parse().unwrap()],
            non_masquerade_cidrs6: vec!["2001:db8:99::/48".parse().unwrap()],
            ..RoutingConfig::default()
        };
        let nodes = cluster();
        let v4 = plan_routes("n0", &nodes, &cfg, &host()).unwrap();
        let m = plan_routes6("n0", &nodes, &cfg, &host(), &v4)
            .masquerade
            .expect("masquerade on by default");
        let exempt: Vec<String> = m.exempt.iter().map(ToString::to_string).collect();
        // The cluster CIDR covers every node's IPv6 pod CIDR in it.
        assert!(
            exempt.contains(&"fd00:10:244::/56".to_owned()),
            "{exempt:?}"
        );
        assert!(
            exempt.contains(&"2001:db8:99::/48".to_owned()),
            "{exempt:?}"
        );
        assert!(
            exempt.contains(&"fd00:172:30::11/128".to_owned()),
            "{exempt:?}"
        );
        assert!(
            !exempt.iter().any(|e| e.starts_with("fd00:10:244:1::")),
            "{exempt:?}"
        );
        assert_eq!(
            m.sources,
            vec!["fd00:10:244::/64".parse::<Ipv6Network>().unwrap()]
        );
        assert!(m.pod_cidrs.contains(&"fd00:10:244::/56".parse().unwrap()));
        // Without them, only pods and nodes.
        let plain = plan_routes6("n0", &nodes, &RoutingConfig::default(), &host(), &v4)
            .masquerade
            .expect("on");
        assert!(
            !plain
                .exempt
                .iter()
                .any(|e| e.to_string() == "2001:db8:99::/48")
        );
    }
}
