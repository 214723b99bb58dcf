//! The pure route planner: Node objects + config + interface snapshot → [`RoutePlan`].
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;

use super::{
    HostLink, HostNetwork, PlanError, RoutingConfig, RoutingMode, VXLAN_DEVICE, VXLAN_OVERHEAD,
    masq::MasqueradeRules,
};

/// Everything the executor converges this node to. Sorted, so equal inputs give equal plans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    pub node_name: String,
    /// This node's InternalIP.
    pub node_ip: Ipv4Addr,
    /// This node's IPv4 pod CIDRs.
    pub local_pod_cidrs: Vec<Ipv4Network>,
    /// MTU of the interface holding the node IP (1500 when it is on no local interface).
    pub underlay_mtu: u32,
    /// The overlay device, when at least one peer is reached through it (or mode is `vxlan`).
    pub vxlan: Option<VxlanDevicePlan>,
    /// One entry per (peer, IPv4 pod CIDR), sorted by destination.
    pub peers: Vec<PeerRoute>,
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
    /// Local tunnel address (this node's InternalIP).
    pub local: Ipv4Addr,
    /// Interface index of the underlay device holding `local`.
    pub underlay_index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// This node's VTEP address (put on the device as a /32).
    pub vtep: Ipv4Addr,
}

/// A route to one pod CIDR of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Network,
    pub via: PeerVia,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerVia {
    /// `pod_cidr via node_ip dev <ifindex>`.
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
    /// A pod CIDR that does not parse (kept as text for the log).
    BadPodCidr(String),
    /// The peer's pod CIDR overlaps this node's own (a misconfigured IPAM).
    OverlapsLocal(Ipv4Network),
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

/// The MTU the agent writes into the CNI config.
pub fn cni_mtu(config: &RoutingConfig, plan: &RoutePlan) -> u32 {
    if plan.vxlan.is_some() || config.mode == RoutingMode::Vxlan {
        plan.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    } else {
        plan.underlay_mtu
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

/// Plans routes from `this_node` to every other node.
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
    let node_ip =
        node_internal_ipv4(me).ok_or_else(|| PlanError::ThisNodeNoAddress(this_node.to_owned()))?;
    let (local_pod_cidrs, _) = node_pod_cidrs(me);
    let underlay = host.link_holding(node_ip);
    let underlay_mtu = underlay.map_or(1500, |l| l.mtu);

    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut all_pod_cidrs = local_pod_cidrs.clone();
    let mut node_ips = vec![node_ip];
    let mut sorted: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| n.metadata.name.as_deref() != Some(this_node))
        .collect();
    sorted.sort_by_key(|n| node_name(n));
    for peer in sorted {
        let name = node_name(peer);
        let skip = |reason| SkippedPeer {
            node: name.clone(),
            reason,
        };
        let (cidrs, bad) = node_pod_cidrs(peer);
        skipped.extend(bad.into_iter().map(|b| skip(SkipReason::BadPodCidr(b))));
        let Some(peer_ip) = node_internal_ipv4(peer) else {
            skipped.push(skip(SkipReason::NoInternalIp));
            continue;
        };
        node_ips.push(peer_ip);
        let Some(first) = cidrs.first().copied() else {
            skipped.push(skip(SkipReason::NoPodCidr));
            continue;
        };
        let direct = host.connected_link(peer_ip);
        let via = match (config.mode, direct) {
            (RoutingMode::Auto | RoutingMode::Direct, Some(link)) => PeerVia::Direct {
                ifindex: link.index,
            },
            (RoutingMode::Direct, None) => {
                skipped.push(skip(SkipReason::NotDirectlyReachable));
                continue;
            }
            (RoutingMode::Auto | RoutingMode::Vxlan, _) => PeerVia::Vxlan {
                vtep: vtep_addr(first),
                mac: vtep_mac(peer_ip),
            },
        };
        for cidr in cidrs {
            if let Some(local) = local_pod_cidrs.iter().find(|l| overlaps(**l, cidr)) {
                skipped.push(skip(SkipReason::OverlapsLocal(*local)));
                continue;
            }
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

    let needs_vxlan = config.mode == RoutingMode::Vxlan
        || peers.iter().any(|p| matches!(p.via, PeerVia::Vxlan { .. }));
    let vxlan = if needs_vxlan {
        Some(vxlan_device(
            this_node,
            node_ip,
            underlay,
            &local_pod_cidrs,
            config,
        )?)
    } else {
        None
    };

    let masquerade = config.masquerade.then(|| {
        let mut exempt: Vec<Ipv4Network> = all_pod_cidrs.clone();
        exempt.extend(config.cluster_cidrs.iter().copied());
        exempt.extend(config.non_masquerade_cidrs.iter().copied());
        exempt.extend(node_ips.iter().map(|ip| Ipv4Network::from(*ip)));
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
                "vxlan {} vni {} port {} local {} underlay-if {} mac {} mtu {} vtep {}/32",
                v.name,
                v.vni,
                v.port,
                v.local,
                v.underlay_index,
                mac_str(v.mac),
                v.mtu,
                v.vtep
            )?;
        }
        for p in &self.peers {
            match &p.via {
                PeerVia::Direct { ifindex } => writeln!(
                    f,
                    "route {} via {} if {} ({})",
                    p.pod_cidr, p.node_ip, ifindex, p.node
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
    node_ip: Ipv4Addr,
    underlay: Option<&HostLink>,
    local_pod_cidrs: &[Ipv4Network],
    config: &RoutingConfig,
) -> Result<VxlanDevicePlan, PlanError> {
    let link = underlay.ok_or(PlanError::NodeIpNotLocal(node_ip))?;
    let first = local_pod_cidrs
        .first()
        .copied()
        .ok_or_else(|| PlanError::ThisNodeNoPodCidr(this_node.to_owned()))?;
    Ok(VxlanDevicePlan {
        name: VXLAN_DEVICE.to_owned(),
        vni: config.vxlan_vni,
        port: config.vxlan_port,
        local: node_ip,
        underlay_index: link.index,
        mac: vtep_mac(node_ip),
        mtu: link.mtu.saturating_sub(VXLAN_OVERHEAD),
        vtep: vtep_addr(first),
    })
}

pub(crate) fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

#[cfg(test)]
mod tests {
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
                    is_loopback: true,
                },
                HostLink {
                    name: "eth0".into(),
                    index: 2,
                    mtu: 1500,
                    addrs: vec!["172.30.0.10/24".parse().unwrap()],
                    is_loopback: false,
                },
            ],
            default_route_ifindex: None,
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
        assert_eq!(plan.node_ip, Ipv4Addr::new(172, 30, 0, 10));
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
        assert_eq!(vx.vtep, Ipv4Addr::new(10, 244, 0, 0));
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
