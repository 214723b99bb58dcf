//! eBPF host routing in the agent: the local endpoints the kernel programs deliver into
//! (`TWL_LXC_V1`, `TWL_LXC6_V1`), read from the node's own links, `/32` and `/128` routes and
//! neighbour entries of both families, and the
//! switches and masquerade prefixes (`TWL_FPCFG_V1`, `TWL_MASQ_V1`) from the config and the
//! route plan. The joins are pure (`twill_core::routing::fastpath`); this module only dumps.
//!
//! When it runs: with the pod veth sync (start, every pod veth link event, every resync) and
//! when a neighbour event on a pod veth tells a pod MAC not known yet (the pod answered the
//! stack's first ARP or Neighbour Solicitation for it): from then on, packets to that pod skip
//! the stack.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use twill_core::routing::fastpath::{LocalEndpoints, Neighbour, PodLink, local_endpoints};

use crate::datapath::is_pod_veth;
use crate::policy::links::LinksError;

/// Pod veths and the pod MACs already learnt, for filtering neighbour events.
#[derive(Debug, Default)]
pub struct KnownNeighbours {
    pod_ifindexes: BTreeSet<u32>,
    macs: BTreeSet<(u32, IpAddr, [u8; 6])>,
}

impl KnownNeighbours {
    /// Whether a neighbour event tells a pod MAC not known yet.
    pub fn is_news(&self, m: &NeighbourMessage) -> bool {
        neighbour_of(m).is_some_and(|n| {
            self.pod_ifindexes.contains(&n.ifindex)
                && !self.macs.contains(&(n.ifindex, n.addr, n.mac))
        })
    }
}

fn neighbour_of(m: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                addr = Some(IpAddr::V4(*ip));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                addr = Some(IpAddr::V6(*ip));
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex: m.header.ifindex,
        addr: addr?,
        mac: mac?,
    })
}

fn pod_link_of(m: &LinkMessage) -> Option<PodLink> {
    let mut pod = false;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => pod = is_pod_veth(n),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    pod.then_some(PodLink {
        ifindex: m.header.index,
        mac: mac?,
    })
}

/// A main-table host route (`/32`, `/128`) with an output interface: (destination, oif).
fn host_route_of(m: &RouteMessage) -> Option<(IpAddr, u32)> {
    if m.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let len = m.header.destination_prefix_length;
    let mut dst = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) if len == 32 => {
                dst = Some(IpAddr::V4(*d));
            }
            RouteAttribute::Destination(RouteAddress::Inet6(d)) if len == 128 => {
                dst = Some(IpAddr::V6(*d));
            }
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some((dst?, oif?))
}

/// Dumps links, routes and neighbours of both families and joins them into the local
/// endpoints.
pub async fn dump_endpoints(
    handle: &rtnetlink::Handle,
) -> Result<(LocalEndpoints, KnownNeighbours), LinksError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(LinksError::Dump)?;
    let links: BTreeMap<u32, PodLink> = links
        .iter()
        .filter_map(pod_link_of)
        .map(|l| (l.ifindex, l))
        .collect();
    let mut routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|source| LinksError::DumpOf {
            what: "routes",
            source,
        })?;
    let routes6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|source| LinksError::DumpOf {
            what: "IPv6 routes",
            source,
        })?;
    routes.extend(routes6);
    let routes: Vec<(IpAddr, u32)> = routes.iter().filter_map(host_route_of).collect();
    let neighbours: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| LinksError::DumpOf {
            what: "neighbours",
            source,
        })?;
    let neighbours: Vec<Neighbour> = neighbours
        .iter()
        .filter_map(neighbour_of)
        .filter(|n| links.contains_key(&n.ifindex))
        .collect();
    let endpoints = local_endpoints(&links, &routes, &neighbours);
    let known = KnownNeighbours {
        pod_ifindexes: links.keys().copied().collect(),
        macs: neighbours
            .iter()
            .map(|n| (n.ifindex, n.addr, n.mac))
            .collect(),
    };
    Ok((endpoints, known))
}

/// Errors writing the fast path's switches and prefixes.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("opening the fast path maps")]
    Maps(#[source] Box<crate::datapath::DatapathError>),
    #[error(transparent)]
    Map(#[from] crate::lbmap::MapError),
}

/// Writes the masquerade prefixes of both families (only with `prune`: before the node store
/// synced, a partial exemption set would translate traffic to pods of nodes not known yet, as
/// with the nftables table) and then the switches.
pub fn program(
    datapath: &mut crate::datapath::Datapath,
    config: twill_common::FastPathConfig,
    masquerade: Option<&twill_core::routing::MasqueradeRules>,
    masquerade6: Option<&twill_core::routing::Masquerade6Rules>,
    prune: bool,
) -> Result<(), FastPathError> {
    let maps = datapath
        .fastpath_maps()
        .map_err(|e| FastPathError::Maps(Box::new(e)))?;
    if prune && maps.sync_masq(&twill_core::routing::fastpath::masq_prefixes(masquerade))? {
        log::info!("fast path: masquerade prefixes updated");
    }
    if prune && maps.sync_masq6(&twill_core::routing::fastpath::masq_prefixes(masquerade6))? {
        log::info!("fast path: IPv6 masquerade prefixes updated");
    }
    maps.set_config(config)?;
    Ok(())
}

/// Where the kernel keeps the ports it never hands out as ephemeral ones (per network
/// namespace: the node's, as the agent runs in it).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The NAT port range as `ip_local_reserved_ports` writes it.
fn nat_port_range() -> String {
    format!(
        "{}-{}",
        twill_common::MASQ_PORT_MIN,
        twill_common::MASQ_PORT_MAX
    )
}

/// `current` (the sysctl's comma-separated list) with `range` added; `None` when it is there.
fn with_range(current: &str, range: &str) -> Option<String> {
    let current = current.trim();
    if current.split(',').any(|r| r == range) {
        return None;
    }
    Some(if current.is_empty() {
        range.to_owned()
    } else {
        format!("{current},{range}")
    })
}

/// `current` without `range`; `None` when it is not there. The kernel prints the list merged,
/// so a reservation of someone else's that overlapped or touched the range was merged into
/// it and is not told apart.
fn without_range(current: &str, range: &str) -> Option<String> {
    let current = current.trim();
    if !current.split(',').any(|r| r == range) {
        return None;
    }
    Some(
        current
            .split(',')
            .filter(|r| *r != range)
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Reserves the NAT ports (`MASQ_PORT_MIN..=MASQ_PORT_MAX`: the eBPF masquerade's and the
/// NodePort SNAT's, one range) in this network namespace (`net.ipv4.ip_local_reserved_ports`),
/// so the node's own sockets are never given one as an ephemeral port and never meet a
/// translated flow's replies — also a process connecting later to the very backend address and
/// port a SNATed flow uses. Keeps what was reserved before. Returns whether it wrote.
pub fn reserve_nat_ports() -> std::io::Result<bool> {
    let current = std::fs::read_to_string(RESERVED_PORTS)?;
    let Some(new) = with_range(&current, &nat_port_range()) else {
        return Ok(false);
    };
    std::fs::write(RESERVED_PORTS, new)?;
    Ok(true)
}

/// Undoes [`reserve_nat_ports`] (`twill-agent uninstall`). Returns whether it wrote.
pub fn release_nat_ports() -> std::io::Result<bool> {
    let current = std::fs::read_to_string(RESERVED_PORTS)?;
    let Some(new) = without_range(&current, &nat_port_range()) else {
        return Ok(false);
    };
    // An empty write clears the list (the kernel's parser accepts it).
    std::fs::write(
        RESERVED_PORTS,
        if new.is_empty() { "\n".to_owned() } else { new },
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourMessage,
    };
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};

    use super::{host_route_of, neighbour_of, with_range, without_range};

    fn route(len: u8, table: u8, dst: RouteAddress) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.destination_prefix_length = len;
        m.header.table = table;
        m.attributes = vec![RouteAttribute::Destination(dst), RouteAttribute::Oif(7)];
        m
    }

    #[test]
    fn host_routes_and_neighbours_of_both_families() {
        let pod4 = Ipv4Addr::new(10, 244, 0, 5);
        let pod6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        let main = RouteHeader::RT_TABLE_MAIN;
        assert_eq!(
            host_route_of(&route(32, main, RouteAddress::Inet(pod4))),
            Some((IpAddr::V4(pod4), 7))
        );
        assert_eq!(
            host_route_of(&route(128, main, RouteAddress::Inet6(pod6))),
            Some((IpAddr::V6(pod6), 7))
        );
        // Not a host route of its family, or not the main table.
        assert_eq!(
            host_route_of(&route(32, main, RouteAddress::Inet6(pod6))),
            None
        );
        assert_eq!(
            host_route_of(&route(128, main, RouteAddress::Inet(pod4))),
            None
        );
        assert_eq!(
            host_route_of(&route(24, main, RouteAddress::Inet(pod4))),
            None
        );
        assert_eq!(
            host_route_of(&route(128, 255, RouteAddress::Inet6(pod6))),
            None
        );

        let mut n = NeighbourMessage::default();
        n.header.ifindex = 7;
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(pod6)),
            NeighbourAttribute::LinkLayerAddress(vec![0x0a, 1, 2, 3, 4, 5]),
        ];
        let got = neighbour_of(&n).expect("an IPv6 neighbour with its MAC");
        assert_eq!(
            (got.ifindex, got.addr, got.mac),
            (7, IpAddr::V6(pod6), [0x0a, 1, 2, 3, 4, 5])
        );
        // Still resolving: no link-layer address, nothing to learn.
        n.attributes.pop();
        assert!(neighbour_of(&n).is_none());
    }

    #[test]
    fn the_nat_range_is_added_once_and_removed_alone() {
        let r = "61000-65535";
        assert_eq!(with_range("", r).as_deref(), Some(r));
        assert_eq!(with_range("\n", r).as_deref(), Some(r));
        assert_eq!(
            with_range("100,200-300\n", r).as_deref(),
            Some("100,200-300,61000-65535")
        );
        assert_eq!(with_range("100,61000-65535\n", r), None);
        assert_eq!(
            without_range("100,61000-65535\n", r).as_deref(),
            Some("100")
        );
        assert_eq!(without_range("61000-65535\n", r).as_deref(), Some(""));
        // Someone else's overlapping reservation was merged: not ours to remove.
        assert_eq!(without_range("60000-65535\n", r), None);
        assert_eq!(without_range("", r), None);
    }
}
