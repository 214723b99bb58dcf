//! The IPv6 half of the executor: converges the kernel to a [`RoutePlan6`] (dual-stack peers'
//! IPv6 pod CIDRs, direct or over the VXLAN device the IPv4 plan made). Same ownership marks
//! as IPv4: routes carry protocol [`ROUTE_PROTO_TWILL`](super::ROUTE_PROTO_TWILL); neighbours and the VTEP6 address live
//! on the agent's own VXLAN device (and only its permanent neighbours are the agent's: the
//! kernel keeps its own multicast entries there).
use std::net::{IpAddr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use ipnetwork::Ipv6Network;
use rtnetlink::packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::InfoKind,
    neighbour::{NeighbourMessage, NeighbourState},
    route::RouteMessage,
};

use twill_core::routing::Masquerade6Rules;
use twill_core::routing::netdiff::{self, Nexthop, Scope};

use super::netlink::link_kind;
use super::{ApplyReport, RouteExecutor, RoutePlan6, RoutingError, VXLAN_DEVICE};

/// One IPv6 route's nexthop as planned or as read back.
type Route6 = Nexthop<Ipv6Addr>;

/// The global (not link-local) IPv6 addresses of link `index`, from an address dump.
pub(super) fn global_ipv6_addrs(addrs: &[AddressMessage], index: u32) -> Vec<Ipv6Network> {
    addrs
        .iter()
        .filter(|a| a.header.index == index)
        .filter_map(|a| {
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            })?;
            (!ip.is_unicast_link_local())
                .then(|| Ipv6Network::new(ip, a.header.prefix_len).ok())
                .flatten()
        })
        .collect()
}

impl RouteExecutor {
    /// Converges the IPv6 routes, after [`Self::apply`] converged the IPv4 plan this one
    /// follows (the overlay device exists exactly when the IPv4 plan has it). `prune` as there.
    pub async fn apply6(
        &self,
        plan: &RoutePlan6,
        prune: bool,
    ) -> Result<ApplyReport, RoutingError> {
        let mut report = ApplyReport::default();
        let vx_index = self
            .find_link(VXLAN_DEVICE)
            .await?
            .filter(|l| link_kind(l) == Some(InfoKind::Vxlan))
            .map(|l| l.header.index);
        if let Some(index) = vx_index {
            self.sync_vtep6(index, plan.vtep).await?;
            // Neighbours before routes, as for IPv4: the first packet finds its entry.
            self.sync_neighbours6(index, plan, prune, &mut report)
                .await?;
        }
        self.sync_routes6(plan, vx_index, prune, &mut report)
            .await?;
        // As for IPv4: the masquerade table only once the node store has synced.
        if prune {
            match &plan.masquerade {
                Some(rules) => super::nft::nft(&rules.render()).await?,
                None => super::nft::nft(&Masquerade6Rules::render_remove()).await?,
            }
        }
        Ok(report)
    }

    /// This node's VTEP6 as the one global IPv6 address of the overlay device (`nodad`: it is
    /// unique by construction and must be usable at once).
    async fn sync_vtep6(&self, index: u32, vtep: Option<Ipv6Addr>) -> Result<(), RoutingError> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(RoutingError::netlink("dump vxlan addresses"))?;
        let mut have = false;
        for a in addrs
            .iter()
            .filter(|a| a.header.family == AddressFamily::Inet6)
        {
            let Some(ip) = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            if ip.is_unicast_link_local() {
                continue;
            }
            if Some(ip) == vtep && a.header.prefix_len == 128 {
                have = true;
            } else {
                self.handle
                    .address()
                    .del(a.clone())
                    .execute()
                    .await
                    .map_err(RoutingError::netlink("delete stale vtep6 address"))?;
            }
        }
        if let (Some(ip), false) = (vtep, have) {
            let mut add = self.handle.address().add(index, IpAddr::V6(ip), 128);
            add.message_mut().header.flags = AddressHeaderFlags::Nodad;
            add.execute()
                .await
                .map_err(RoutingError::netlink("add vtep6 address"))?;
        }
        Ok(())
    }

    async fn sync_neighbours6(
        &self,
        index: u32,
        plan: &RoutePlan6,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        // Only permanent neighbours are the agent's: the kernel keeps its own (multicast,
        // resolved) entries on the device.
        let owned = |n: &NeighbourMessage| n.header.state == NeighbourState::Permanent;
        self.sync_device_neighbours(index, &plan.wanted_neighbours(), owned, prune, report)
            .await
    }

    async fn sync_routes6(
        &self,
        plan: &RoutePlan6,
        vx_index: Option<u32>,
        prune: bool,
        report: &mut ApplyReport,
    ) -> Result<(), RoutingError> {
        let have = self.observed_routes::<Ipv6Addr>().await?;
        let ours: Vec<(Ipv6Network, RouteMessage)> = have
            .iter()
            .filter(|o| o.owned)
            .filter_map(|o| Some((o.key?, o.handle.clone())))
            .collect();
        let ops = netdiff::diff(
            have,
            &plan.wanted_routes(vx_index),
            Scope::SharedTable,
            prune,
        );
        self.execute_routes(onlink_replacements_first(ops, &ours), report)
            .await
    }
}

/// IPv6 checks an `onlink` gateway against the routing table (`ip6_route_check_nh_onlink`,
/// net/ipv6/route.c): a route to the gateway through another device fails with EINVAL. An
/// overlay route's gateway is the peer's VTEP6, inside the very pod CIDR it routes, so our
/// direct route to that CIDR (a peer moving onto the overlay: a mode change, a node moving
/// subnet) blocks its own replacement. Such a replace becomes: delete ours, then create. The
/// gap is one netlink round trip, only on that move; IPv4 has no such check.
fn onlink_replacements_first(
    ops: Vec<netdiff::Op<RouteMessage, Ipv6Network, Route6>>,
    ours: &[(Ipv6Network, RouteMessage)],
) -> Vec<netdiff::Op<RouteMessage, Ipv6Network, Route6>> {
    let mut removes = Vec::new();
    let mut rest = Vec::new();
    for op in ops {
        match op {
            netdiff::Op::Set {
                key,
                value,
                replace: true,
            } if value.onlink && value.gateway.is_some_and(|gw| key.contains(gw)) => {
                removes.extend(
                    ours.iter()
                        .filter(|(dst, _)| *dst == key)
                        .map(|(_, msg)| netdiff::Op::Remove(msg.clone())),
                );
                rest.push(netdiff::Op::Set {
                    key,
                    value,
                    replace: false,
                });
            }
            other => rest.push(other),
        }
    }
    // Removals keep the diff's order: all of them before any write.
    let (mut out, sets): (Vec<_>, Vec<_>) = rest
        .into_iter()
        .partition(|op| matches!(op, netdiff::Op::Remove(_)));
    out.extend(removes);
    out.extend(sets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use netdiff::Op;

    /// A route message told apart by its table byte (the handle the executor deletes with).
    fn msg(tag: u8) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.table = tag;
        m
    }

    #[test]
    fn an_overlay_route_replacing_ours_deletes_it_first() {
        let moved: Ipv6Network = "fd00:10:244:1::/64".parse().unwrap();
        let direct: Ipv6Network = "fd00:10:244:2::/64".parse().unwrap();
        let overlay_hop = Route6 {
            gateway: Some(moved.network()),
            via6: None,
            oif: Some(9),
            onlink: true,
        };
        let direct_hop = Route6 {
            gateway: Some("fd00:172:30::12".parse().unwrap()),
            via6: None,
            oif: Some(2),
            onlink: false,
        };
        let new_overlay: Ipv6Network = "fd00:10:244:3::/64".parse().unwrap();
        let ops = vec![
            Op::Remove(msg(1)),
            Op::Set {
                key: moved,
                value: overlay_hop,
                replace: true,
            },
            Op::Set {
                key: direct,
                value: direct_hop,
                replace: true,
            },
            // A new overlay route has nothing of ours in its way: an exclusive create as before.
            Op::Set {
                key: new_overlay,
                value: overlay_hop,
                replace: false,
            },
        ];
        let ours = vec![(moved, msg(7)), (direct, msg(8))];
        assert_eq!(
            onlink_replacements_first(ops, &ours),
            vec![
                Op::Remove(msg(1)),
                Op::Remove(msg(7)),
                Op::Set {
                    key: moved,
                    value: overlay_hop,
                    replace: false
                },
                Op::Set {
                    key: direct,
                    value: direct_hop,
                    replace: true
                },
                Op::Set {
                    key: new_overlay,
                    value: overlay_hop,
                    replace: false
                },
            ]
        );
    }
}
