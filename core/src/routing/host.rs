//! This node's interfaces as values: which device holds the node IP, which subnets are directly
//! connected, the `--devices` default and the NodePort addresses. Read from netlink by
//! twill-agent's `RouteExecutor::host_network`; everything here is pure.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::VXLAN_DEVICE;

/// A snapshot of the node's IPv4 interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostNetwork {
    /// Sorted by interface index.
    pub links: Vec<HostLink>,
    /// Output interface of the IPv4 default route of the main table, if any.
    pub default_route_ifindex: Option<u32>,
    /// Destinations of the main table's IPv4 routes the agent does not own (any protocol but
    /// [`super::ROUTE_PROTO_TWILL`]), sorted: a pod CIDR equal to one is never routed, since
    /// writing our route would replace theirs.
    pub foreign_routes: Vec<Ipv4Network>,
    /// The same for the main table's IPv6 routes.
    pub foreign_routes6: Vec<Ipv6Network>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// IPv4 addresses with their prefix length (`172.30.0.10/24`).
    pub addrs: Vec<Ipv4Network>,
    /// IPv6 addresses with their prefix length, link-local ones left out (they name no
    /// subnet another node could be on).
    pub addrs6: Vec<Ipv6Network>,
    pub is_loopback: bool,
}

impl HostNetwork {
    /// The interface that holds `ip` as one of its addresses.
    pub fn link_holding(&self, ip: Ipv4Addr) -> Option<&HostLink> {
        self.links
            .iter()
            .find(|l| l.addrs.iter().any(|a| a.ip() == ip))
    }

    /// The interface that holds `ip` (either family) as one of its addresses: the underlay
    /// device of a node IP.
    pub fn link_holding_ip(&self, ip: IpAddr) -> Option<&HostLink> {
        match ip {
            IpAddr::V4(v4) => self.link_holding(v4),
            IpAddr::V6(v6) => self
                .links
                .iter()
                .find(|l| l.addrs6.iter().any(|a| a.ip() == v6)),
        }
    }

    /// The interface whose connected subnet contains `ip` (a peer reachable without a router).
    /// Loopback, the agent's own overlay device and host routes (/32) do not count.
    pub fn connected_link(&self, ip: Ipv4Addr) -> Option<&HostLink> {
        self.links
            .iter()
            .filter(|l| !l.is_loopback && l.name != VXLAN_DEVICE)
            .find(|l| l.addrs.iter().any(|a| a.prefix() < 32 && a.contains(ip)))
    }

    /// [`Self::connected_link`] for IPv6: the interface whose connected IPv6 subnet holds `ip`.
    pub fn connected_link6(&self, ip: Ipv6Addr) -> Option<&HostLink> {
        self.links
            .iter()
            .filter(|l| !l.is_loopback && l.name != VXLAN_DEVICE)
            .find(|l| l.addrs6.iter().any(|a| a.prefix() < 128 && a.contains(ip)))
    }

    /// [`Self::node_subnets`] for IPv6.
    pub fn node_subnets6(&self) -> impl Iterator<Item = Ipv6Network> + '_ {
        self.links
            .iter()
            .filter(|l| l.name != VXLAN_DEVICE)
            .flat_map(|l| l.addrs6.iter())
            .map(|a| Ipv6Network::new(a.network(), a.prefix()).unwrap_or(*a))
    }

    pub fn link_by_name(&self, name: &str) -> Option<&HostLink> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The node's own subnets and addresses (every address of every interface but the agent's
    /// overlay device, with its prefix): no other node's pod CIDR may overlap one.
    pub fn node_subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        self.links
            .iter()
            .filter(|l| l.name != VXLAN_DEVICE)
            .flat_map(|l| l.addrs.iter())
            .map(|a| Ipv4Network::new(a.network(), a.prefix()).unwrap_or(*a))
    }
}

/// The `--devices` default: the interfaces holding any of the node's InternalIPs (either
/// family: an IPv6-only node's underlay holds only IPv6 ones), else the interface of the
/// default route (kube-proxy / Cilium semantics). Empty when neither exists.
pub fn default_devices(host: &HostNetwork, node_ips: &[IpAddr]) -> Vec<String> {
    let mut devices: Vec<String> = host
        .links
        .iter()
        .filter(|l| {
            l.addrs
                .iter()
                .any(|a| node_ips.contains(&IpAddr::V4(a.ip())))
                || l.addrs6
                    .iter()
                    .any(|a| node_ips.contains(&IpAddr::V6(a.ip())))
        })
        .map(|l| l.name.clone())
        .collect();
    if devices.is_empty()
        && let Some(link) = host
            .default_route_ifindex
            .and_then(|i| host.links.iter().find(|l| l.index == i))
    {
        devices.push(link.name.clone());
    }
    devices.dedup();
    devices
}

/// The addresses NodePorts are served on: the IPv4 addresses of `devices`, filtered by the
/// `--nodeport-addresses` CIDRs when any are given (kube-proxy semantics: an empty list means
/// every address of the chosen devices). Sorted, deduplicated.
pub fn nodeport_addresses(
    host: &HostNetwork,
    devices: &[String],
    cidrs: &[Ipv4Network],
) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = host
        .links
        .iter()
        .filter(|l| devices.contains(&l.name))
        .flat_map(|l| l.addrs.iter().map(|a| a.ip()))
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// [`nodeport_addresses`] for IPv6: the IPv6 addresses of `devices` (link-local ones are never
/// in [`HostLink::addrs6`]), filtered by the IPv6 `--nodeport-addresses` CIDRs when any are given.
pub fn nodeport_addresses6(
    host: &HostNetwork,
    devices: &[String],
    cidrs: &[Ipv6Network],
) -> Vec<Ipv6Addr> {
    let mut out: Vec<Ipv6Addr> = host
        .links
        .iter()
        .filter(|l| devices.contains(&l.name))
        .flat_map(|l| l.addrs6.iter().map(Ipv6Network::ip))
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, index: u32, addrs: &[&str]) -> HostLink {
        HostLink {
            name: name.into(),
            index,
            mtu: 1500,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            addrs6: Vec::new(),
            is_loopback: name == "lo",
        }
    }

    fn host() -> HostNetwork {
        HostNetwork {
            links: vec![
                link("lo", 1, &["127.0.0.1/8"]),
                link("eth0", 2, &["172.30.0.10/24", "172.30.0.99/24"]),
                link("eth1", 3, &["192.168.5.2/24"]),
                link(VXLAN_DEVICE, 4, &["10.244.0.0/32"]),
            ],
            default_route_ifindex: Some(3),
            foreign_routes: Vec::new(),
            foreign_routes6: Vec::new(),
        }
    }

    #[test]
    fn devices_default_to_the_interface_holding_the_node_ip() {
        assert_eq!(
            default_devices(&host(), &[Ipv4Addr::new(172, 30, 0, 10).into()]),
            vec!["eth0"]
        );
        // An IPv6-only node: its underlay holds only its IPv6 InternalIP.
        let mut v6 = host();
        v6.links[2].addrs6 = vec!["fd00:172:30::12/64".parse().unwrap()];
        assert_eq!(
            default_devices(&v6, &["fd00:172:30::12".parse().unwrap()]),
            vec!["eth1"]
        );
        assert_eq!(
            v6.link_holding_ip("fd00:172:30::12".parse().unwrap())
                .map(|l| l.index),
            Some(3)
        );
    }

    #[test]
    fn devices_fall_back_to_the_default_route_interface() {
        assert_eq!(
            default_devices(&host(), &[Ipv4Addr::new(10, 9, 9, 9).into()]),
            vec!["eth1"]
        );
        let no_default = HostNetwork {
            default_route_ifindex: None,
            ..host()
        };
        assert!(default_devices(&no_default, &[Ipv4Addr::new(10, 9, 9, 9).into()]).is_empty());
    }

    #[test]
    fn nodeport_addresses_are_filtered_by_cidrs() {
        let devs = vec!["eth0".to_owned(), "eth1".to_owned()];
        assert_eq!(
            nodeport_addresses(&host(), &devs, &[]),
            vec![
                Ipv4Addr::new(172, 30, 0, 10),
                Ipv4Addr::new(172, 30, 0, 99),
                Ipv4Addr::new(192, 168, 5, 2)
            ]
        );
        assert_eq!(
            nodeport_addresses(&host(), &devs, &["172.30.0.96/28".parse().unwrap()]),
            vec![Ipv4Addr::new(172, 30, 0, 99)]
        );
    }

    #[test]
    fn ipv6_nodeport_addresses_come_from_the_devices_filtered_by_ipv6_cidrs() {
        let mut h = host();
        h.links[1].addrs6 = vec![
            "fd00:172:30::10/64".parse().unwrap(),
            "fd00:99::10/64".parse().unwrap(),
        ];
        h.links[2].addrs6 = vec!["fd00:5::2/64".parse().unwrap()];
        let eth0 = vec!["eth0".to_owned()];
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            nodeport_addresses6(&h, &eth0, &[]),
            vec![v6("fd00:99::10"), v6("fd00:172:30::10")]
        );
        assert_eq!(
            nodeport_addresses6(&h, &eth0, &["fd00:172:30::/64".parse().unwrap()]),
            vec![v6("fd00:172:30::10")]
        );
    }

    #[test]
    fn connected_subnets_ignore_loopback_overlay_and_host_routes() {
        let h = host();
        assert_eq!(
            h.connected_link(Ipv4Addr::new(172, 30, 0, 11))
                .map(|l| l.index),
            Some(2)
        );
        assert!(h.connected_link(Ipv4Addr::new(127, 0, 0, 2)).is_none());
        assert!(h.connected_link(Ipv4Addr::new(10, 244, 0, 0)).is_none());
        assert!(h.connected_link(Ipv4Addr::new(172, 30, 1, 11)).is_none());
        assert_eq!(
            h.link_holding(Ipv4Addr::new(10, 244, 0, 0))
                .map(|l| l.index),
            Some(4)
        );
    }
}
