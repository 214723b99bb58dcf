//! The executor: converges the kernel (in the network namespace the agent runs in) to a
//! [`RoutePlan`] over rtnetlink. Everything it touches is marked as the agent's: routes by
//! protocol [`ROUTE_PROTO_TWILL`], neighbours/FDB entries/addresses by living on the agent's own
//! VXLAN device. Idempotent: a second `apply` of the same plan changes nothing.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use futures_util::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        },
    },
};

use super::{
    HostLink, HostNetwork, PeerVia, ROUTE_PROTO_TWILL, RoutePlan, RoutingConfig, RoutingError,
    VXLAN_DEVICE, VxlanDevicePlan, nft, plan_routes,
};

/// What an `apply` changed (all zero when the kernel already matched the plan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub device_created: bool,
    pub device_removed: bool,
    pub routes_set: usize,
    pub routes_removed: usize,
    pub neighbours_set: usize,
    pub neighbours_removed: usize,
    pub fdb_set: usize,
    pub fdb_removed: usize,
    /// Planned routes not written because a route the agent does not own has their destination.
    pub routes_refused: usize,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        *self != Self::default()
    }
}

/// One route the agent owns, as read back from the kernel (also the debug dump format).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRoute {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

impl std::fmt::Display for OwnedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " oif {oif}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// The rtnetlink side of the routing module.
pub struct RouteExecutor {
    pub(super) handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for RouteExecutor {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl RouteExecutor {
    /// Opens a netlink socket in the calling thread's network namespace and drives it on the
    /// current tokio runtime.
    pub fn connect() -> Result<Self, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Connect)?;
        let connection = tokio::spawn(conn);
        Ok(Self { handle, connection })
    }

    /// A snapshot of the IPv4 interfaces and the default route (input of the planner).
    pub async fn host_network(&self) -> Result<HostNetwork, RoutingError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump links"))?;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump addresses"))?;
        let mut out: Vec<HostLink> = links
            .iter()
            .map(|l| HostLink {
                name: link_name(l).unwrap_or_default(),
                index: l.header.index,
                mtu: link_mtu(l).unwrap_or(1500),
                addrs: addrs
                    .iter()
                    .filter(|a| a.header.index == l.header.index)
                    .filter_map(|a| {
                        let ip = ipv4_of_address(a)?;
                        Ipv4Network::new(ip, a.header.prefix_len).ok()
                    })
                    .collect(),
                addrs6: super::netlink6::global_ipv6_addrs(&addrs, l.header.index),
                is_loopback: l.header.flags.contains(LinkFlags::Loopback),
            })
            .collect();
        out.sort_by_key(|l| l.index);
        let main = self.main_routes().await?;
        let mut foreign_routes: Vec<Ipv4Network> = main
            .iter()
            .filter(|r| r.header.protocol != RouteProtocol::Other(ROUTE_PROTO_TWILL))
            .filter_map(|r| parse_route(r).map(|r| r.dst))
            .collect();
        foreign_routes.sort_by_key(|n| (n.network(), n.prefix()));
        foreign_routes.dedup();
        let default_route_ifindex = main.into_iter().find_map(|r| {
            (r.header.destination_prefix_length == 0)
                .then(|| {
                    r.attributes.iter().find_map(|a| {
                        if let RouteAttribute::Oif(i) = a {
                            Some(*i)
                        } else {
                            None
                        }
                    })
                })
                .flatten()
        });
        let foreign_routes6 = self.foreign_routes6().await?;
        Ok(HostNetwork {
            links: out,
            default_route_ifindex,
            foreign_routes,
            foreign_routes6,
        })
    }

    /// The whole reconcile in one call (what `twill-agent run` does on every Node change and
    /// periodic resync): snapshot the interfaces, plan, apply. `prune` as in [`Self::apply`].
    pub async fn sync<'a>(
        &self,
        this_node: &str,
        nodes: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Node>,
        config: &RoutingConfig,
        prune: bool,
    ) -> Result<(RoutePlan, ApplyReport), RoutingError> {
        let host = self.host_network().await?;
        let plan = plan_routes(this_node, nodes, config, &host)?;
        let report = self.apply(&plan, prune).await?;
        Ok((plan, report))
    }

    /// Converges the kernel to `plan`. With `prune` false (the node store has not completed
    /// its first sync, e.g. right after an agent restart) it only adds and corrects: routes,
    /// neighbours and FDB entries of nodes it does not know yet stay, the overlay device stays,
    /// and the masquerade table is left as it is (a partial exemption set would translate
    /// traffic to pods of not-yet-known nodes).
    pub async fn apply(&self, plan: &RoutePlan, prune: bool) -> Result<ApplyReport, RoutingError> {
        let mut report = ApplyReport::default();
        let vx_index = match &plan.vxlan {
            Some(vx) => Some(self.ensure_vxlan(vx, &mut report).await?),
            None => None,
        };
        if let (Some(index), Some(_)) = (vx_index, &plan.vxlan) {
            // Forwarding entries before routes, so the first packet routed into the overlay
            // already finds its neighbour and FDB entry.
            self.sync_neighbours(index, plan, prune, &mut report)
                .await?;
            self.sync_fdb(index, plan, prune, &mut report).await?;
        }
        self.sync_routes(plan, vx_index, prune, &mut report).await?;
        if !prune {
            return Ok(report);
        }
        if plan.vxlan.is_none() && self.remove_vxlan().await? {
            report.device_removed = true;
        }
        match &plan.masquerade {
            Some(rules) => nft::apply(rules).await?,
            None => nft::remove().await?,
        }
        Ok(report)
    }

    /// Removes everything the agent owns: its routes, the overlay device (with its neighbours
    /// and FDB entries) and the masquerade table. For `--cleanup`-style uninstalls.
    pub async fn remove_all(&self) -> Result<ApplyReport, RoutingError> {
        let mut report = ApplyReport::default();
        for route in self.owned_route_messages().await? {
            self.handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(RoutingError::netlink("delete route"))?;
            report.routes_removed += 1;
        }
        report.routes_removed += self.remove_owned_routes6().await?;
        report.device_removed = self.remove_vxlan().await?;
        nft::remove().await?;
        Ok(report)
    }

    /// The agent's routes as they are in the kernel now, sorted.
    pub async fn owned_routes(&self) -> Result<Vec<OwnedRoute>, RoutingError> {
        let mut out: Vec<OwnedRoute> = self
            .owned_route_messages()
            .await?
            .iter()
            .filter_map(parse_route)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Destinations of every `/32` route of the main table: among them each local pod's host
    /// route (the CNI plugin adds one per pod; it goes with the pod's veth). For the
    /// conntrack collector's [`crate::ctgc::LocalPods`].
    pub async fn host_route_destinations(&self) -> Result<Vec<Ipv4Addr>, RoutingError> {
        Ok(self
            .main_routes()
            .await?
            .iter()
            .filter(|r| r.header.destination_prefix_length == 32)
            .filter_map(parse_route)
            .map(|r| r.dst.ip())
            .collect())
    }

    async fn main_routes(&self) -> Result<Vec<RouteMessage>, RoutingError> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump routes"))?;
        Ok(all
            .into_iter()
            .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    async fn owned_route_messages(&self) -> Result<Vec<RouteMessage>, RoutingError> {
        Ok(self
            .main_routes()
            .await?
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::Other(ROUTE_PROTO_TWILL))
            .collect())
    }

    pub(super) async fn find_link(&self, name: &str) -> Result<Option<LinkMessage>, RoutingError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump links"))?;
        Ok(links
            .into_iter()
            .find(|l| link_name(l).as_deref() == Some(name)))
    }

    /// Creates the overlay device, or recreates it when its identity (VNI, port, local address,
    /// underlay, MAC, learning) differs from the plan; then sets MTU, up and its VTEP address.
    async fn ensure_vxlan(
        &self,
        vx: &VxlanDevicePlan,
        report: &mut ApplyReport,
    ) -> Result<u32, RoutingError> {
        let existing = self.find_link(&vx.name).await?;
        let index = match existing {
            Some(link) if vxlan_matches(&link, vx) => link.header.index,
            other => {
                if let Some(link) = other {
                    if link_kind(&link) != Some(InfoKind::Vxlan) {
                        return Err(RoutingError::Foreign {
                            what: "interface",
                            name: vx.name.clone(),
                            found: format!("kind {:?}", link_kind(&link)),
                        });
                    }
                    self.handle
                        .link()
                        .del(link.header.index)
                        .execute()
                        .await
                        .map_err(RoutingError::netlink("delete outdated vxlan device"))?;
                }
                let msg = LinkVxlan::new(&vx.name, vx.vni)
                    .dev(vx.underlay_index)
                    .local(vx.local)
                    .port(vx.port)
                    .learning(false)
                    .mtu(vx.mtu)
                    .address(vx.mac.to_vec())
                    .up()
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(RoutingError::netlink("create vxlan device"))?;
                report.device_created = true;
                self.find_link(&vx.name)
                    .await?
                    .ok_or_else(|| RoutingError::Foreign {
                        what: "interface",
                        name: vx.name.clone(),
                        found: "vanished right after creation".into(),
                    })?
                    .header
                    .index
            }
        };
        // MTU and up are cheap to re-assert; a changed underlay MTU lands here.
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(vx.mtu).up().build())
            .execute()
            .await
            .map_err(RoutingError::netlink("set vxlan mtu/up"))?;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump vxlan addresses"))?;
        let mut have_vtep = false;
        for a in addrs {
            if ipv4_of_address(&a) == Some(vx.vtep) && a.header.prefix_len == 32 {
                have_vtep = true;
            } else if a.header.family == AddressFamily::Inet {
                self.handle
                    .address()
                    .del(a)
                    .execute()
                    .await
                    .map_err(RoutingError::netlink("delete stale vtep address"))?;
            }
        }
        if !have_vtep {
            self.handle
                .address()
                .add(index, IpAddr::V4(vx.vtep), 32)
                .execute()
                .await
                .map_err(RoutingError::netlink("add vtep address"))?;
        }
        Ok(index)
    }

    /// Deletes the overlay device if it exists (its routes, neighbours and FDB go with it).
    async fn remove_vxlan(&self) -> Result<bool, RoutingError> {
        let Some(link) = self.find_link(VXLAN_DEVICE).await? else {
            return Ok(false);
        };
        if link_kind(&link) != Some(InfoKind::Vxlan) {
            return Ok(false);
        }
        self.handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(RoutingError::netlink("delete vxlan device"))?;
        Ok(true)
    }

    async fn sync_neighbours(
        &self,
        index: u32,
        plan: &RoutePlan,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let want: BTreeMap<Ipv4Addr, [u8; 6]> = plan
            .peers
            .iter()
            .filter_map(|p| match p.via {
                PeerVia::Vxlan { vtep, mac } => Some((vtep, mac)),
                PeerVia::Direct { .. } => None,
            })
            .collect();
        let have: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump neighbours"))?;
        let mut ok = Vec::new();
        for n in have.into_iter().filter(|n| n.header.ifindex == index) {
            let dst = neighbour_ipv4(&n);
            let matches = dst.is_some_and(|d| {
                want.get(&d)
                    .is_some_and(|mac| neighbour_lladdr(&n) == Some(&mac[..]))
                    && n.header.state == NeighbourState::Permanent
            });
            if matches {
                ok.extend(dst);
            } else if prune || dst.is_some_and(|d| want.contains_key(&d)) {
                self.handle
                    .neighbours()
                    .del(n)
                    .execute()
                    .await
                    .map_err(RoutingError::netlink("delete stale neighbour"))?;
                report.neighbours_removed += 1;
            }
        }
        for (vtep, mac) in want.iter().filter(|(v, _)| !ok.contains(v)) {
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(*vtep))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(RoutingError::netlink(format!("add neighbour {vtep}")))?;
            report.neighbours_set += 1;
        }
        Ok(())
    }

    async fn sync_fdb(
        &self,
        index: u32,
        plan: &RoutePlan,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let want: BTreeMap<[u8; 6], Ipv4Addr> = plan
            .peers
            .iter()
            .filter_map(|p| match p.via {
                PeerVia::Vxlan { mac, .. } => Some((mac, p.node_ip)),
                PeerVia::Direct { .. } => None,
            })
            .collect();
        let have: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump fdb"))?;
        let mut ok: Vec<[u8; 6]> = Vec::new();
        for n in have.into_iter().filter(|n| n.header.ifindex == index) {
            let mac: Option<[u8; 6]> = neighbour_lladdr(&n).and_then(|m| m.try_into().ok());
            let matches =
                mac.is_some_and(|m| want.get(&m).copied() == fdb_dst(&n) && !ok.contains(&m));
            if matches {
                ok.extend(mac);
            } else if prune || mac.is_some_and(|m| want.contains_key(&m)) {
                self.handle
                    .neighbours()
                    .del(n)
                    .execute()
                    .await
                    .map_err(RoutingError::netlink("delete stale fdb entry"))?;
                report.fdb_removed += 1;
            }
        }
        for (mac, dst) in want.iter().filter(|(m, _)| !ok.contains(m)) {
            self.handle
                .neighbours()
                .add_bridge(index, mac)
                .destination(IpAddr::V4(*dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(RoutingError::netlink(format!("add fdb entry for {dst}")))?;
            report.fdb_set += 1;
        }
        Ok(())
    }

    async fn sync_routes(
        &self,
        plan: &RoutePlan,
        vx_index: Option<u32>,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let mut want: BTreeMap<Ipv4Network, OwnedRoute> = BTreeMap::new();
        for p in &plan.peers {
            let route = match p.via {
                PeerVia::Direct { ifindex } => OwnedRoute {
                    dst: p.pod_cidr,
                    gateway: Some(p.node_ip),
                    oif: Some(ifindex),
                    onlink: false,
                },
                PeerVia::Vxlan { vtep, .. } => {
                    let Some(index) = vx_index else { continue };
                    OwnedRoute {
                        dst: p.pod_cidr,
                        gateway: Some(vtep),
                        oif: Some(index),
                        onlink: true,
                    }
                }
            };
            want.insert(p.pod_cidr, route);
        }
        // One dump for both: ours to diff against, everybody else's to stay clear of. The plan
        // already left out pod CIDRs equal to a foreign route; this re-checks against the
        // kernel as it is now, since a route may have appeared since the plan's snapshot.
        let (have, foreign): (Vec<RouteMessage>, Vec<RouteMessage>) = self
            .main_routes()
            .await?
            .into_iter()
            .partition(|r| r.header.protocol == RouteProtocol::Other(ROUTE_PROTO_TWILL));
        let foreign: std::collections::BTreeSet<Ipv4Network> = foreign
            .iter()
            .filter_map(parse_route)
            .map(|r| r.dst)
            .collect();
        let mut ours: std::collections::BTreeSet<Ipv4Network> = std::collections::BTreeSet::new();
        let mut current: BTreeMap<Ipv4Network, OwnedRoute> = BTreeMap::new();
        for msg in have {
            if let Some(r) = parse_route(&msg) {
                ours.insert(r.dst);
            }
            match parse_route(&msg) {
                Some(r) if want.get(&r.dst) == Some(&r) && !current.contains_key(&r.dst) => {
                    current.insert(r.dst, r);
                }
                // Stale (node gone, mode or address changed) or a duplicate: remove. New routes
                // are added below with NLM_F_REPLACE, so traffic to a moved CIDR switches over
                // without a gap; only routes with no successor are deleted here.
                Some(r) if want.contains_key(&r.dst) => {}
                _ if prune => {
                    self.handle
                        .route()
                        .del(msg)
                        .execute()
                        .await
                        .map_err(RoutingError::netlink("delete stale route"))?;
                    report.routes_removed += 1;
                }
                _ => {}
            }
        }
        for (dst, r) in &want {
            if current.get(dst) == Some(r) {
                continue;
            }
            if foreign.contains(dst) {
                log::warn!(
                    "not routing {dst}: the main table has a route to it the agent does not own"
                );
                report.routes_refused += 1;
                continue;
            }
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix())
                .protocol(RouteProtocol::Other(ROUTE_PROTO_TWILL));
            if let Some(gw) = r.gateway {
                b = b.gateway(gw);
            }
            if let Some(oif) = r.oif {
                b = b.output_interface(oif);
            }
            if r.onlink {
                b = b.onlink();
            }
            // NLM_F_REPLACE only over a route of ours; otherwise an exclusive create, which
            // fails rather than overwrite a route that appeared since the dump.
            let add = self.handle.route().add(b.build());
            let add = if ours.contains(dst) {
                add.replace()
            } else {
                add
            };
            add.execute()
                .await
                .map_err(RoutingError::netlink(format!("set route {r}")))?;
            report.routes_set += 1;
        }
        Ok(())
    }
}

pub(super) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or_else(|| u32::from(r.header.table))
}

fn parse_route(r: &RouteMessage) -> Option<OwnedRoute> {
    let dst_ip = r
        .attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Destination(RouteAddress::Inet(ip)) = a {
                Some(*ip)
            } else {
                None
            }
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let dst = Ipv4Network::new(dst_ip, r.header.destination_prefix_length).ok()?;
    let gateway = r.attributes.iter().find_map(|a| {
        if let RouteAttribute::Gateway(RouteAddress::Inet(ip)) = a {
            Some(*ip)
        } else {
            None
        }
    });
    let oif = r.attributes.iter().find_map(|a| {
        if let RouteAttribute::Oif(i) = a {
            Some(*i)
        } else {
            None
        }
    });
    Some(OwnedRoute {
        dst,
        gateway,
        oif,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    })
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::IfName(n) = a {
            Some(n.clone())
        } else {
            None
        }
    })
}

fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::Mtu(m) = a {
            Some(*m)
        } else {
            None
        }
    })
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::Address(m) = a {
            Some(&m[..])
        } else {
            None
        }
    })
}

fn link_infos(l: &LinkMessage) -> &[LinkInfo] {
    l.attributes
        .iter()
        .find_map(|a| {
            if let LinkAttribute::LinkInfo(i) = a {
                Some(&i[..])
            } else {
                None
            }
        })
        .unwrap_or(&[])
}

pub(super) fn link_kind(l: &LinkMessage) -> Option<InfoKind> {
    link_infos(l).iter().find_map(|i| {
        if let LinkInfo::Kind(k) = i {
            Some(k.clone())
        } else {
            None
        }
    })
}

fn vxlan_matches(l: &LinkMessage, vx: &VxlanDevicePlan) -> bool {
    if link_kind(l) != Some(InfoKind::Vxlan) || link_mac(l) != Some(&vx.mac[..]) {
        return false;
    }
    let Some(data) = link_infos(l).iter().find_map(|i| {
        if let LinkInfo::Data(InfoData::Vxlan(d)) = i {
            Some(d)
        } else {
            None
        }
    }) else {
        return false;
    };
    let has = |want: &InfoVxlan| data.iter().any(|d| d == want);
    has(&InfoVxlan::Id(vx.vni))
        && has(&InfoVxlan::Port(vx.port))
        && has(&InfoVxlan::Local(vx.local))
        && has(&InfoVxlan::Link(vx.underlay_index))
        && has(&InfoVxlan::Learning(false))
}

fn ipv4_of_address(a: &AddressMessage) -> Option<Ipv4Addr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links.
    let local = a.attributes.iter().find_map(|x| {
        if let AddressAttribute::Local(IpAddr::V4(ip)) = x {
            Some(*ip)
        } else {
            None
        }
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = x {
                Some(*ip)
            } else {
                None
            }
        })
    })
}

fn neighbour_ipv4(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| {
        if let NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) = a {
            Some(*ip)
        } else {
            None
        }
    })
}

pub(super) fn neighbour_lladdr(n: &NeighbourMessage) -> Option<&[u8]> {
    n.attributes.iter().find_map(|a| {
        if let NeighbourAttribute::LinkLayerAddress(m) = a {
            Some(&m[..])
        } else {
            None
        }
    })
}

/// The remote of a VXLAN FDB entry. netlink-packet-route cannot know the address family of
/// `NDA_DST` in an `AF_BRIDGE` message, so it arrives as raw bytes.
fn fdb_dst(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(&b[..]).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}
