//! The executor: converges the kernel (in the network namespace the agent runs in) to a
//! [`RoutePlan`] over rtnetlink. Everything it touches is marked as the agent's: routes by
//! protocol [`ROUTE_PROTO_TWILL`], neighbours/FDB entries/addresses by living on the agent's own
//! VXLAN device. Idempotent: a second `apply` of the same plan changes nothing.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use ipnetwork::{Ipv4Network, Ipv6Network};
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
            RouteVia,
        },
    },
};

use twill_core::routing::masq::MasqFamily;
use twill_core::routing::netdiff::{self, Nexthop, Observed, Op, Scope};

use super::{
    HostLink, HostNetwork, ROUTE_PROTO_TWILL, RoutePlan, RoutingConfig, RoutingError, VXLAN_DEVICE,
    VxlanDevicePlan, nft, plan_routes,
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
    /// An IPv6 nexthop (`via inet6`): a peer's IPv4 pods over an IPv6 underlay.
    pub via6: Option<Ipv6Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

impl std::fmt::Display for OwnedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(gw) = self.via6 {
            write!(f, " via inet6 {gw}")?;
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
        let main = self.main_routes::<Ipv4Addr>().await?;
        let foreign_routes = unowned_destinations::<Ipv4Addr>(&main);
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
        let foreign_routes6 =
            unowned_destinations::<Ipv6Addr>(&self.main_routes::<Ipv6Addr>().await?);
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
        report.routes_removed += self.remove_owned_routes::<Ipv4Addr>().await?;
        report.routes_removed += self.remove_owned_routes::<Ipv6Addr>().await?;
        report.device_removed = self.remove_vxlan().await?;
        nft::remove().await?;
        Ok(report)
    }

    /// The agent's routes as they are in the kernel now, sorted.
    pub async fn owned_routes(&self) -> Result<Vec<OwnedRoute>, RoutingError> {
        let mut out: Vec<OwnedRoute> = self
            .main_routes::<Ipv4Addr>()
            .await?
            .iter()
            .filter(|r| is_owned(r))
            .filter_map(owned_route)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Destinations of every `/32` route of the main table: among them each local pod's host
    /// route (the CNI plugin adds one per pod; it goes with the pod's veth). For the
    /// conntrack collector's [`crate::ctgc::LocalPods`].
    pub async fn host_route_destinations(&self) -> Result<Vec<Ipv4Addr>, RoutingError> {
        Ok(self
            .main_routes::<Ipv4Addr>()
            .await?
            .iter()
            .filter(|r| r.header.destination_prefix_length == 32)
            .filter_map(owned_route)
            .map(|r| r.dst.ip())
            .collect())
    }

    /// The main table's routes of family `A`.
    async fn main_routes<A: RouteFamily>(&self) -> Result<Vec<RouteMessage>, RoutingError> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(A::dump_request())
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink(format!("dump {}", A::ROUTES)))?;
        Ok(all
            .into_iter()
            .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    /// Removes every route of family `A` the agent owns; returns how many.
    async fn remove_owned_routes<A: RouteFamily>(&self) -> Result<usize, RoutingError> {
        let mut n = 0;
        for r in self.main_routes::<A>().await? {
            if is_owned(&r) {
                self.handle
                    .route()
                    .del(r)
                    .execute()
                    .await
                    .map_err(RoutingError::netlink(format!("delete {}", A::ROUTE)))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The main table's routes of family `A` as the diff sees them: one dump for both, ours
    /// to diff against, everybody else's to stay clear of.
    pub(super) async fn observed_routes<A: RouteFamily>(
        &self,
    ) -> Result<Vec<Observed<RouteMessage, A::Net, Nexthop<A>>>, RoutingError> {
        Ok(self
            .main_routes::<A>()
            .await?
            .into_iter()
            .map(|msg| {
                let parsed = parse_route::<A>(&msg);
                Observed {
                    key: parsed.map(|(dst, _)| dst),
                    value: parsed.map(|(_, hop)| hop),
                    owned: is_owned(&msg),
                    handle: msg,
                }
            })
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
                let builder = LinkVxlan::new(&vx.name, vx.vni).dev(vx.underlay_index);
                // The local address's family decides the device's socket family, and with it
                // the family of every FDB remote.
                let builder = match vx.local {
                    IpAddr::V4(v4) => builder.local(v4),
                    IpAddr::V6(v6) => builder.local6(v6),
                };
                let msg = builder
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
            if vx.vtep.is_some() && ipv4_of_address(&a) == vx.vtep && a.header.prefix_len == 32 {
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
        if let (Some(vtep), false) = (vx.vtep, have_vtep) {
            self.handle
                .address()
                .add(index, IpAddr::V4(vtep), 32)
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
        // Every IPv4 neighbour on the agent's device is the agent's (unlike IPv6, the kernel
        // keeps none of its own there).
        self.sync_device_neighbours(index, &plan.wanted_neighbours(), |_| true, prune, report)
            .await
    }

    /// Converges the neighbours of family `A` on the agent's device `index` to `wanted`;
    /// `owned` tells the agent's entries from the kernel's.
    pub(super) async fn sync_device_neighbours<A: RouteFamily>(
        &self,
        index: u32,
        wanted: &std::collections::BTreeMap<A, [u8; 6]>,
        owned: impl Fn(&NeighbourMessage) -> bool,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let have = self
            .device_neighbours(A::FAMILY, index)
            .await?
            .into_iter()
            .map(|n| Observed {
                key: n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(d) => A::neighbour_address(d),
                    _ => None,
                }),
                value: permanent_lladdr(&n),
                owned: owned(&n),
                handle: n,
            })
            .collect();
        let ops = netdiff::diff(have, wanted, Scope::OwnDevice, prune);
        self.execute_neighbours(index, ops, report).await
    }

    async fn sync_fdb(
        &self,
        index: u32,
        plan: &RoutePlan,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let have = self
            .device_neighbours(AddressFamily::Bridge, index)
            .await?
            .into_iter()
            .map(|n| {
                let remote = fdb_dst(&n);
                Observed {
                    key: neighbour_lladdr(&n).and_then(|m| <[u8; 6]>::try_from(m).ok()),
                    value: remote,
                    // An entry without a remote is the device's own address, not a tunnel
                    // endpoint the agent wrote: it stays unless it holds a peer's MAC.
                    owned: remote.is_some(),
                    handle: n,
                }
            })
            .collect();
        let ops = netdiff::diff(have, &plan.wanted_fdb(), Scope::OwnDevice, prune);
        for op in ops {
            match op {
                Op::Remove(n) => {
                    self.handle
                        .neighbours()
                        .del(n)
                        .execute()
                        .await
                        .map_err(RoutingError::netlink("delete stale fdb entry"))?;
                    report.fdb_removed += 1;
                }
                Op::Set {
                    key: mac,
                    value: dst,
                    ..
                } => {
                    self.handle
                        .neighbours()
                        .add_bridge(index, &mac)
                        .destination(dst)
                        .flags(NeighbourFlags::Own)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(RoutingError::netlink(format!("add fdb entry for {dst}")))?;
                    report.fdb_set += 1;
                }
                Op::Refuse(mac) => refused_on_own_device("fdb entry", &format!("{mac:02x?}")),
            }
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
        // The plan already left out pod CIDRs equal to a foreign route; this re-checks against
        // the kernel as it is now, since a route may have appeared since the plan's snapshot.
        let have = self.observed_routes::<Ipv4Addr>().await?;
        let ops = netdiff::diff(
            have,
            &plan.wanted_routes(vx_index),
            Scope::SharedTable,
            prune,
        );
        self.execute_routes(ops, report).await
    }

    /// The neighbours (`Inet`, `Inet6`) or FDB entries (`Bridge`) of device `index`.
    async fn device_neighbours(
        &self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<NeighbourMessage>, RoutingError> {
        let all: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink(format!("dump {family:?} neighbours")))?;
        Ok(all
            .into_iter()
            .filter(|n| n.header.ifindex == index)
            .collect())
    }

    /// Performs the neighbour ops of either family on device `index`: permanent entries,
    /// written with `NLM_F_REPLACE`.
    async fn execute_neighbours<A: Copy + Into<IpAddr> + std::fmt::Display>(
        &self,
        index: u32,
        ops: Vec<Op<NeighbourMessage, A, [u8; 6]>>,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        for op in ops {
            match op {
                Op::Remove(n) => {
                    self.handle
                        .neighbours()
                        .del(n)
                        .execute()
                        .await
                        .map_err(RoutingError::netlink("delete stale neighbour"))?;
                    report.neighbours_removed += 1;
                }
                Op::Set { key, value, .. } => {
                    self.handle
                        .neighbours()
                        .add(index, key.into())
                        .link_layer_address(&value)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(RoutingError::netlink(format!("add neighbour {key}")))?;
                    report.neighbours_set += 1;
                }
                Op::Refuse(key) => refused_on_own_device("neighbour", &key.to_string()),
            }
        }
        Ok(())
    }

    /// Performs the route ops of either family.
    pub(super) async fn execute_routes<A: RouteFamily>(
        &self,
        ops: Vec<Op<RouteMessage, A::Net, Nexthop<A>>>,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        for op in ops {
            match op {
                Op::Remove(msg) => {
                    self.handle
                        .route()
                        .del(msg)
                        .execute()
                        .await
                        .map_err(RoutingError::netlink("delete stale route"))?;
                    report.routes_removed += 1;
                }
                Op::Set {
                    key,
                    value,
                    replace,
                } => {
                    let add = self.handle.route().add(route_message(key, &value));
                    let add = if replace { add.replace() } else { add };
                    add.execute()
                        .await
                        .map_err(RoutingError::netlink(format!("set route {key}")))?;
                    report.routes_set += 1;
                }
                Op::Refuse(dst) => {
                    log::warn!(
                        "not routing {dst}: the main table has a route to it the agent does not own"
                    );
                    report.routes_refused += 1;
                }
            }
        }
        Ok(())
    }
}

/// What differs between the IPv4 and IPv6 route messages the executor writes and reads back
/// (rtnetlink types the builder by address family); everything else is one generic code path.
pub(super) trait RouteFamily: Copy + Ord + Into<IpAddr> + std::fmt::Display {
    type Net: MasqFamily<Addr = Self>;
    /// A route of this family, and the dump of them, in error messages.
    const ROUTE: &'static str;
    const ROUTES: &'static str;
    const UNSPECIFIED: Self;
    /// The family of its neighbour dumps.
    const FAMILY: AddressFamily;
    /// The address of a neighbour attribute, if it is of this family.
    fn neighbour_address(a: &NeighbourAddress) -> Option<Self>;
    /// The request that dumps every route of this family.
    fn dump_request() -> RouteMessage;
    /// The address in a route attribute, if it is of this family.
    fn route_address(a: &RouteAddress) -> Option<Self>;
    fn network(addr: Self, prefix: u8) -> Option<Self::Net>;
    /// The IPv6 nexthop of a route read back: `RTA_VIA` on an IPv4 route; an IPv6 route holds
    /// its nexthop in the gateway, so none.
    fn read_via6(r: &RouteMessage) -> Option<Ipv6Addr>;
    fn route_to(dst: Self::Net) -> RouteMessageBuilder<Self>;
    fn via(b: RouteMessageBuilder<Self>, gateway: Self) -> RouteMessageBuilder<Self>;
    /// An IPv6 nexthop (`RTA_VIA` on an IPv4 route; the plain gateway on an IPv6 one).
    fn via6(b: RouteMessageBuilder<Self>, gateway: Ipv6Addr) -> RouteMessageBuilder<Self>;
}

impl RouteFamily for Ipv4Addr {
    type Net = Ipv4Network;
    const ROUTE: &'static str = "route";
    const ROUTES: &'static str = "routes";
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    const FAMILY: AddressFamily = AddressFamily::Inet;
    fn neighbour_address(a: &NeighbourAddress) -> Option<Self> {
        match a {
            NeighbourAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }
    fn dump_request() -> RouteMessage {
        RouteMessageBuilder::<Self>::new().build()
    }
    fn route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }
    fn network(addr: Self, prefix: u8) -> Option<Ipv4Network> {
        Ipv4Network::new(addr, prefix).ok()
    }
    fn read_via6(r: &RouteMessage) -> Option<Ipv6Addr> {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Via(RouteVia::Inet6(ip)) => Some(*ip),
            _ => None,
        })
    }
    fn route_to(dst: Ipv4Network) -> RouteMessageBuilder<Self> {
        RouteMessageBuilder::<Self>::new().destination_prefix(dst.network(), dst.prefix())
    }
    fn via(b: RouteMessageBuilder<Self>, gateway: Self) -> RouteMessageBuilder<Self> {
        b.gateway(gateway)
    }
    fn via6(b: RouteMessageBuilder<Self>, gateway: Ipv6Addr) -> RouteMessageBuilder<Self> {
        b.via(gateway)
    }
}

impl RouteFamily for Ipv6Addr {
    type Net = Ipv6Network;
    const ROUTE: &'static str = "IPv6 route";
    const ROUTES: &'static str = "IPv6 routes";
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    fn neighbour_address(a: &NeighbourAddress) -> Option<Self> {
        match a {
            NeighbourAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
    fn dump_request() -> RouteMessage {
        RouteMessageBuilder::<Self>::new().build()
    }
    fn route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
    fn network(addr: Self, prefix: u8) -> Option<Ipv6Network> {
        Ipv6Network::new(addr, prefix).ok()
    }
    fn read_via6(_: &RouteMessage) -> Option<Ipv6Addr> {
        None
    }
    fn route_to(dst: Ipv6Network) -> RouteMessageBuilder<Self> {
        RouteMessageBuilder::<Self>::new().destination_prefix(dst.network(), dst.prefix())
    }
    fn via(b: RouteMessageBuilder<Self>, gateway: Self) -> RouteMessageBuilder<Self> {
        b.gateway(gateway)
    }
    fn via6(b: RouteMessageBuilder<Self>, gateway: Ipv6Addr) -> RouteMessageBuilder<Self> {
        b.gateway(gateway)
    }
}

/// The message that writes route `dst → hop`, marked as the agent's.
fn route_message<A: RouteFamily>(dst: A::Net, hop: &Nexthop<A>) -> RouteMessage {
    let mut b = A::route_to(dst).protocol(RouteProtocol::Other(ROUTE_PROTO_TWILL));
    if let Some(gw) = hop.gateway {
        b = A::via(b, gw);
    }
    if let Some(gw) = hop.via6 {
        b = A::via6(b, gw);
    }
    if let Some(oif) = hop.oif {
        b = b.output_interface(oif);
    }
    if hop.onlink {
        b = b.onlink();
    }
    b.build()
}

/// [`netdiff::diff`] refuses only in a shared table; on the agent's own device nothing is
/// foreign. Logged rather than unreachable, so a future change of the diff cannot crash the
/// agent.
fn refused_on_own_device(what: &str, key: &str) {
    log::error!("internal: the netlink diff refused {what} {key} on the agent's own device");
}

/// The MAC of a permanent neighbour: what the agent writes. `None` for any other state (a
/// neighbour the kernel resolved or is resolving), so it never counts as the agent's entry.
fn permanent_lladdr(n: &NeighbourMessage) -> Option<[u8; 6]> {
    (n.header.state == NeighbourState::Permanent)
        .then(|| neighbour_lladdr(n).and_then(|m| m.try_into().ok()))
        .flatten()
}

fn route_table(r: &RouteMessage) -> u32 {
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

/// Whether a route is the agent's (its protocol mark).
fn is_owned(r: &RouteMessage) -> bool {
    r.header.protocol == RouteProtocol::Other(ROUTE_PROTO_TWILL)
}

/// Destinations of the main table's routes (`main`) the agent does not own, sorted (an input
/// of the plan, which keeps clear of them).
fn unowned_destinations<A: RouteFamily>(main: &[RouteMessage]) -> Vec<A::Net> {
    let mut out: Vec<A::Net> = main
        .iter()
        .filter(|r| !is_owned(r))
        .filter_map(|r| parse_route::<A>(r).map(|(dst, _)| dst))
        .collect();
    out.sort_by_key(|n| (n.network(), n.prefix()));
    out.dedup();
    out
}

/// A route read back: its destination and nexthop (`None`: not a route of family `A`).
fn parse_route<A: RouteFamily>(r: &RouteMessage) -> Option<(A::Net, Nexthop<A>)> {
    let dst_ip = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => A::route_address(d),
            _ => None,
        })
        .unwrap_or(A::UNSPECIFIED);
    let dst = A::network(dst_ip, r.header.destination_prefix_length)?;
    let gateway = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => A::route_address(g),
        _ => None,
    });
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    Some((
        dst,
        Nexthop {
            gateway,
            via6: A::read_via6(r),
            oif,
            onlink: r.header.flags.contains(RouteFlags::Onlink),
        },
    ))
}

/// An IPv4 route in the debug dump's form.
fn owned_route(r: &RouteMessage) -> Option<OwnedRoute> {
    let (dst, hop) = parse_route::<Ipv4Addr>(r)?;
    Some(OwnedRoute {
        dst,
        gateway: hop.gateway,
        via6: hop.via6,
        oif: hop.oif,
        onlink: hop.onlink,
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
    let local = match vx.local {
        IpAddr::V4(v4) => InfoVxlan::Local(v4),
        IpAddr::V6(v6) => InfoVxlan::Local6(v6),
    };
    has(&InfoVxlan::Id(vx.vni))
        && has(&InfoVxlan::Port(vx.port))
        && has(&local)
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

fn neighbour_lladdr(n: &NeighbourMessage) -> Option<&[u8]> {
    n.attributes.iter().find_map(|a| {
        if let NeighbourAttribute::LinkLayerAddress(m) = a {
            Some(&m[..])
        } else {
            None
        }
    })
}

/// The remote of a VXLAN FDB entry. netlink-packet-route cannot know the address family of
/// `NDA_DST` in an `AF_BRIDGE` message, so it arrives as raw bytes: 4 of them over an IPv4
/// underlay, 16 over an IPv6 one.
fn fdb_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            match <[u8; 4]>::try_from(&b[..]) {
                Ok(v4) => Some(IpAddr::V4(Ipv4Addr::from(v4))),
                Err(_) => <[u8; 16]>::try_from(&b[..])
                    .ok()
                    .map(|v6| IpAddr::V6(Ipv6Addr::from(v6))),
            }
        }
        _ => None,
    })
}
