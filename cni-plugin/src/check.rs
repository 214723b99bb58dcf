//! CHECK: compare what the kernel has against the previous result, naming the
//! first thing that is wrong. Pure, so every mismatch is unit-tested.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::dataplane::Observed;
use crate::result::{AddResult, mac_string};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("CHECK needs \"prevResult\" in the configuration (the result of ADD)")]
    NoPrevResult,
    #[error("\"prevResult\" is malformed: {0}")]
    BadPrevResult(String),
    #[error("\"prevResult\" has no address for sandbox interface {0}")]
    NoAddressInPrevResult(String),
    #[error("host interface {0} is missing")]
    HostLinkMissing(String),
    #[error("host interface {0} is not a veth")]
    HostLinkNotVeth(String),
    #[error("interface {0} is down")]
    LinkDown(String),
    #[error("interface {ifname} has MTU {got}, expected {want}")]
    Mtu { ifname: String, want: u32, got: u32 },
    #[error("interface {0} is missing from the pod namespace")]
    PodLinkMissing(String),
    #[error("interface {ifname} has MAC {got}, prevResult says {want}")]
    Mac {
        ifname: String,
        want: String,
        got: String,
    },
    #[error("address {addr} is missing from interface {ifname}")]
    AddressMissing { ifname: String, addr: IpNetwork },
    #[error("route {dst} via {gw} is missing from the pod namespace")]
    RouteMissing { dst: IpNetwork, gw: String },
    #[error("the host has no route to {ip} via {host_if}")]
    HostRouteMissing { ip: IpAddr, host_if: String },
    #[error(
        "the pod's neighbour entry for gateway {gateway} is {got}, expected {want} (the host veth's MAC)"
    )]
    GatewayNeighbour {
        gateway: IpAddr,
        want: String,
        got: String,
    },
    #[error("the host interface {host_if} lacks the IPv6 gateway address {gateway}")]
    HostGatewayMissing { gateway: Ipv6Addr, host_if: String },
    #[error("IPAM has no reservation of {ip} for this container and interface")]
    ReservationMissing { ip: IpAddr },
}

/// What CHECK expects, from the configuration and prevResult.
pub struct Expected<'a> {
    pub prev: &'a AddResult,
    pub host_if: &'a str,
    pub host_mac: [u8; 6],
    pub pod_if: &'a str,
    pub mtu: u32,
    pub gateway: Ipv4Addr,
    pub gateway6: Ipv6Addr,
}

/// The pod addresses prevResult assigns to `pod_if` (an IP whose `interface`
/// points at a sandbox interface of that name).
pub fn pod_addresses(prev: &AddResult, pod_if: &str) -> Vec<IpNetwork> {
    prev.ips
        .iter()
        .filter(|ip| {
            ip.interface
                .and_then(|i| prev.interfaces.get(i))
                .is_some_and(|i| i.name == pod_if && i.sandbox.is_some())
        })
        .map(|ip| ip.address)
        .collect()
}

pub fn compare(want: &Expected<'_>, got: &Observed) -> Result<(), CheckError> {
    let addrs = pod_addresses(want.prev, want.pod_if);
    if addrs.is_empty() {
        return Err(CheckError::NoAddressInPrevResult(want.pod_if.to_owned()));
    }
    let host = got
        .host_link
        .as_ref()
        .ok_or_else(|| CheckError::HostLinkMissing(want.host_if.to_owned()))?;
    if !host.is_veth {
        return Err(CheckError::HostLinkNotVeth(want.host_if.to_owned()));
    }
    if !host.up {
        return Err(CheckError::LinkDown(want.host_if.to_owned()));
    }
    if host.mtu != want.mtu {
        return Err(CheckError::Mtu {
            ifname: want.host_if.to_owned(),
            want: want.mtu,
            got: host.mtu,
        });
    }
    let pod = got
        .pod_link
        .as_ref()
        .ok_or_else(|| CheckError::PodLinkMissing(want.pod_if.to_owned()))?;
    if !pod.up {
        return Err(CheckError::LinkDown(want.pod_if.to_owned()));
    }
    if pod.mtu != want.mtu {
        return Err(CheckError::Mtu {
            ifname: want.pod_if.to_owned(),
            want: want.mtu,
            got: pod.mtu,
        });
    }
    // A chained plugin (tuning) may have changed the MAC; prevResult is then updated
    // by it, so compare against prevResult, not our derivation.
    if let Some(i) = want
        .prev
        .interfaces
        .iter()
        .find(|i| i.name == want.pod_if && i.sandbox.is_some())
        && i.mac != [0; 6]
        && i.mac != pod.mac
    {
        return Err(CheckError::Mac {
            ifname: want.pod_if.to_owned(),
            want: mac_string(&i.mac),
            got: mac_string(&pod.mac),
        });
    }
    for a in &addrs {
        if !got.pod_addrs.contains(a) {
            return Err(CheckError::AddressMissing {
                ifname: want.pod_if.to_owned(),
                addr: *a,
            });
        }
        let host_dst = IpNetwork::new(a.ip(), if a.is_ipv4() { 32 } else { 128 })
            .expect("host prefix is valid");
        if !got.host_routes.contains(&host_dst) {
            return Err(CheckError::HostRouteMissing {
                ip: a.ip(),
                host_if: want.host_if.to_owned(),
            });
        }
    }
    for r in &want.prev.routes {
        if !got
            .pod_routes
            .iter()
            .any(|o| o.dst == r.dst && (r.gw.is_none() || o.gw == r.gw))
        {
            return Err(CheckError::RouteMissing {
                dst: r.dst,
                gw: r
                    .gw
                    .map_or_else(|| "(direct)".to_owned(), |g| g.to_string()),
            });
        }
    }
    gateways(want, got, &addrs)
}

/// The gateway of each family the pod has an address in: its permanent neighbour entry in
/// the pod, and for IPv6 the gateway address on the host veth.
fn gateways(want: &Expected<'_>, got: &Observed, addrs: &[IpNetwork]) -> Result<(), CheckError> {
    let mut gateways = Vec::with_capacity(2);
    if addrs.iter().any(IpNetwork::is_ipv4) {
        gateways.push(IpAddr::V4(want.gateway));
    }
    if addrs.iter().any(IpNetwork::is_ipv6) {
        gateways.push(IpAddr::V6(want.gateway6));
        let on_host = IpNetwork::new(IpAddr::V6(want.gateway6), 64).expect("/64 is valid");
        if !got.host_addrs.contains(&on_host) {
            return Err(CheckError::HostGatewayMissing {
                gateway: want.gateway6,
                host_if: want.host_if.to_owned(),
            });
        }
    }
    for gw in gateways {
        let neigh = got
            .pod_neighs
            .iter()
            .find(|(ip, _)| *ip == gw)
            .map(|(_, mac)| *mac);
        if neigh != Some(want.host_mac) {
            return Err(CheckError::GatewayNeighbour {
                gateway: gw,
                want: mac_string(&want.host_mac),
                got: neigh.map_or_else(|| "absent".to_owned(), |m| mac_string(&m)),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::LinkState;
    use crate::result::{Interface, IpConfig, Route};

    const HM: [u8; 6] = [0xee, 1, 2, 3, 4, 5];
    const PM: [u8; 6] = [0x0a, 1, 2, 3, 4, 5];

    fn prev() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "twlx".into(),
                    mac: HM,
                    mtu: 0,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: PM,
                    mtu: 0,
                    sandbox: Some("/ns".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.0.2/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: crate::dns::Dns::default(),
        }
    }

    fn good() -> Observed {
        Observed {
            host_link: Some(LinkState {
                mtu: 1500,
                up: true,
                mac: HM,
                is_veth: true,
            }),
            host_routes: vec!["10.0.0.2/32".parse().unwrap()],
            host_addrs: Vec::new(),
            pod_link: Some(LinkState {
                mtu: 1500,
                up: true,
                mac: PM,
                is_veth: true,
            }),
            pod_addrs: vec!["10.0.0.2/32".parse().unwrap()],
            pod_routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            pod_neighs: vec![("169.254.1.1".parse().unwrap(), HM)],
        }
    }

    fn check(o: &Observed) -> Result<(), CheckError> {
        let p = prev();
        compare(
            &Expected {
                prev: &p,
                host_if: "twlx",
                host_mac: HM,
                pod_if: "eth0",
                mtu: 1500,
                gateway: "169.254.1.1".parse().unwrap(),
                gateway6: "fe80::1".parse().unwrap(),
            },
            o,
        )
    }

    #[test]
    fn good_state_passes() {
        check(&good()).unwrap();
    }

    #[test]
    fn names_what_is_wrong() {
        let mut o = good();
        o.host_link = None;
        assert_eq!(check(&o), Err(CheckError::HostLinkMissing("twlx".into())));
        let mut o = good();
        o.pod_link.as_mut().unwrap().mtu = 9000;
        assert!(matches!(check(&o), Err(CheckError::Mtu { got: 9000, .. })));
        let mut o = good();
        o.pod_link.as_mut().unwrap().up = false;
        assert_eq!(check(&o), Err(CheckError::LinkDown("eth0".into())));
        let mut o = good();
        o.pod_addrs.clear();
        assert!(matches!(check(&o), Err(CheckError::AddressMissing { .. })));
        let mut o = good();
        o.host_routes.clear();
        assert!(matches!(
            check(&o),
            Err(CheckError::HostRouteMissing { .. })
        ));
        let mut o = good();
        o.pod_routes.clear();
        let e = check(&o).unwrap_err();
        assert!(
            e.to_string().contains("route 0.0.0.0/0 via 169.254.1.1"),
            "{e}"
        );
        let mut o = good();
        o.pod_neighs.clear();
        assert!(matches!(
            check(&o),
            Err(CheckError::GatewayNeighbour { .. })
        ));
        let mut o = good();
        o.pod_link.as_mut().unwrap().mac = [0x0a, 0, 0, 0, 0, 0];
        assert!(matches!(check(&o), Err(CheckError::Mac { .. })));
        let mut o = good();
        o.host_link.as_mut().unwrap().is_veth = false;
        assert_eq!(check(&o), Err(CheckError::HostLinkNotVeth("twlx".into())));
    }

    /// A dual-stack result: both addresses, both default routes, both gateway neighbours
    /// and the IPv6 gateway on the host veth are each checked.
    #[test]
    fn dual_stack_checks_each_family() {
        let mut p = prev();
        p.ips.push(IpConfig {
            address: "fd00::2/128".parse().unwrap(),
            gateway: Some("fe80::1".parse().unwrap()),
            interface: Some(1),
        });
        p.routes.push(Route {
            dst: "::/0".parse().unwrap(),
            gw: Some("fe80::1".parse().unwrap()),
        });
        let mut o = good();
        o.host_routes.push("fd00::2/128".parse().unwrap());
        o.host_addrs.push("fe80::1/64".parse().unwrap());
        o.pod_addrs.push("fd00::2/128".parse().unwrap());
        o.pod_routes.push(Route {
            dst: "::/0".parse().unwrap(),
            gw: Some("fe80::1".parse().unwrap()),
        });
        o.pod_neighs.push(("fe80::1".parse().unwrap(), HM));
        let run = |o: &Observed| {
            compare(
                &Expected {
                    prev: &p,
                    host_if: "twlx",
                    host_mac: HM,
                    pod_if: "eth0",
                    mtu: 1500,
                    gateway: "169.254.1.1".parse().unwrap(),
                    gateway6: "fe80::1".parse().unwrap(),
                },
                o,
            )
        };
        run(&o).unwrap();
        let mut bad = o.clone();
        bad.pod_addrs.retain(IpNetwork::is_ipv4);
        assert!(
            matches!(run(&bad), Err(CheckError::AddressMissing { addr, .. }) if addr.is_ipv6())
        );
        let mut bad = o.clone();
        bad.host_routes.retain(IpNetwork::is_ipv4);
        assert!(matches!(run(&bad), Err(CheckError::HostRouteMissing { ip, .. }) if ip.is_ipv6()));
        let mut bad = o.clone();
        bad.pod_routes.retain(|r| r.dst.is_ipv4());
        let e = run(&bad).unwrap_err();
        assert!(e.to_string().contains("route ::/0 via fe80::1"), "{e}");
        let mut bad = o.clone();
        bad.pod_neighs.retain(|(ip, _)| ip.is_ipv4());
        assert!(
            matches!(run(&bad), Err(CheckError::GatewayNeighbour { gateway, .. }) if gateway.is_ipv6())
        );
        let mut bad = o.clone();
        bad.host_addrs.clear();
        assert!(matches!(
            run(&bad),
            Err(CheckError::HostGatewayMissing { .. })
        ));
        // An IPv4-only pod is not asked for IPv6 state.
        check(&good()).unwrap();
    }
}
