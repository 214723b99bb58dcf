//! The real [`Dataplane`]: rtnetlink on a current-thread tokio runtime.
//!
//! Two netlink sockets at most: one in the node namespace (where the plugin runs)
//! and one in the pod namespace. A netlink socket stays bound to the namespace it
//! was created in, so the pod socket is made by entering the pod namespace on this
//! (single) thread for exactly one `socket(2)` call and returning at once; every
//! later request on it acts in the pod namespace with no further `setns`. The
//! runtime is current-thread, so no other thread can observe the switch.
//!
//! ADD is one `RTM_NEWLINK` that creates both veth ends — the peer directly in the
//! pod namespace (`IFLA_NET_NS_FD` in the peer's attributes), both with MTU, MAC and
//! the host end `IFF_UP` — then the pod end up and, per family, its address, gateway neighbour
//! and default route and the host's /32 or /128 route (plus the IPv6 gateway address on the
//! host end), sent back-to-back and acknowledged together.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;

use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::runtime::Runtime;

use crate::dataplane::{
    Dataplane, DataplaneError, LinkState, Observed, PodLinkSpec, is_host_if_name,
    is_retired_if_name, retired_if_name,
};
use crate::result::Route;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// `all.forwarding` turns IPv6 forwarding on for every interface. A node that takes its own
/// IPv6 default route from Router Advertisements must set `accept_ra=2` on that interface,
/// as Kubernetes' dual-stack documentation asks: a forwarding interface ignores RAs otherwise.
const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

pub struct Netlink {
    rt: Runtime,
    host: Option<Handle>,
}

pub struct PodNetns {
    fd: File,
    handle: Handle,
}

fn nl_err(op: impl Into<String>, e: &rtnetlink::Error) -> DataplaneError {
    let source = match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    };
    DataplaneError::Netlink {
        op: op.into(),
        source,
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl Netlink {
    pub fn new() -> Result<Self, DataplaneError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(DataplaneError::Runtime)?;
        Ok(Netlink { rt, host: None })
    }

    /// Names of the veths in the node namespace that `pred` accepts (one link dump).
    fn veth_names(&mut self, pred: fn(&str) -> bool) -> Result<Vec<String>, DataplaneError> {
        let host = self.host()?;
        self.rt.block_on(async {
            let links: Vec<LinkMessage> = host
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("dump links", &e))?;
            Ok(links
                .iter()
                .filter(|m| link_state(m).is_veth)
                .filter_map(link_name)
                .filter(|n| pred(n))
                .map(str::to_owned)
                .collect())
        })
    }

    /// The node-namespace socket, created on first use (STATUS never needs one).
    fn host(&mut self) -> Result<Handle, DataplaneError> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let _guard = self.rt.enter();
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| DataplaneError::Netlink {
                op: "socket".into(),
                source: e,
            })?;
        self.rt.spawn(conn);
        self.host = Some(handle.clone());
        Ok(handle)
    }
}

/// argv\[1\] that makes the executable a reaper instead of a CNI plugin.
pub const REAP_ARG: &str = "--reap-retired-link";

/// Starts `twill-cni --reap-retired-link <name> <ifindex>` detached: own process
/// group, no stdio (so the runtime reading our stdout sees EOF when we exit), not
/// waited for. `posix_spawn` keeps this well under a millisecond.
fn spawn_reaper(name: &str, index: u32) -> io::Result<()> {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg(REAP_ARG)
        .arg(name)
        .arg(index.to_string())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

/// The reaper's work: delete link `index` if it still carries the retired name
/// `name` (an index can be reused once the link is gone, so both must match).
pub fn reap_retired_link(name: &str, index: u32) -> Result<(), DataplaneError> {
    if !is_retired_if_name(name) {
        return Ok(());
    }
    let mut nl = Netlink::new()?;
    let host = nl.host()?;
    nl.rt.block_on(async {
        let link = match host
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
        {
            Ok(m) => m,
            Err(e) if errno(&e) == Some(libc::ENODEV) => None,
            Err(e) => return Err(nl_err(format!("get link {index}"), &e)),
        };
        if link.as_ref().and_then(link_name) != Some(name) {
            return Ok(());
        }
        match host.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err(format!("delete link {name}"), &e)),
        }
    })
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link_state(m: &LinkMessage) -> LinkState {
    let mut s = LinkState {
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        mac: [0; 6],
        is_veth: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => s.mtu = *v,
            LinkAttribute::Address(a) if a.len() == 6 => s.mac.copy_from_slice(a),
            LinkAttribute::LinkInfo(infos) => {
                s.is_veth |= infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    s
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    let mut dst: IpAddr = if m.header.address_family == netlink_packet_route::AddressFamily::Inet6 {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::from([0u8; 4])
    };
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = IpAddr::V4(*d),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = IpAddr::V6(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
            _ => {}
        }
    }
    Some(Route {
        dst: IpNetwork::new(dst, m.header.destination_prefix_length).ok()?,
        gw,
    })
}

/// Main-table routes through link `index`, both families.
async fn routes_via(h: &Handle, index: u32) -> Result<Vec<Route>, rtnetlink::Error> {
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
    let mut all: Vec<RouteMessage> = h.route().get(v4).execute().try_collect().await?;
    let more: Vec<RouteMessage> = h.route().get(v6).execute().try_collect().await?;
    all.extend(more);
    Ok(all
        .iter()
        .filter(|m| route_oif(m) == Some(index) && m.header.table == RouteHeader::RT_TABLE_MAIN)
        .filter_map(route_of)
        .collect())
}

impl Dataplane for Netlink {
    type Netns = PodNetns;

    fn open_netns(&mut self, path: &Path) -> Result<PodNetns, DataplaneError> {
        let bad = |source: io::Error| DataplaneError::Netns {
            path: path.to_owned(),
            source,
        };
        // The host socket must exist before we leave the node namespace.
        self.host()?;
        let fd = File::open(path).map_err(bad)?;
        let home = File::open("/proc/thread-self/ns/net").map_err(|e| DataplaneError::Netns {
            path: "/proc/thread-self/ns/net".into(),
            source: e,
        })?;
        setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| bad(e.into()))?;
        let conn = {
            let _guard = self.rt.enter();
            rtnetlink::new_connection()
        };
        // Staying in the pod namespace would put every later host operation (and
        // /proc/sys writes) in the wrong place; there is no sane way to continue.
        if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the node network namespace: {e}");
        }
        let (conn, handle, _) = conn.map_err(|e| DataplaneError::Netlink {
            op: "socket in pod namespace".into(),
            source: e,
        })?;
        self.rt.spawn(conn);
        Ok(PodNetns { fd, handle })
    }

    fn enable_forwarding(&mut self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError> {
        for (wanted, path) in [(ipv4, IP_FORWARD), (ipv6, IP6_FORWARD)] {
            if !wanted {
                continue;
            }
            let err = |source| DataplaneError::Sysctl {
                path: path.into(),
                source,
            };
            // Read first: the write takes a lock and notifies every device in the
            // namespace even when the value does not change.
            let cur = std::fs::read(path).map_err(err)?;
            if cur.first() != Some(&b'1') {
                std::fs::write(path, b"1").map_err(err)?;
            }
        }
        Ok(())
    }

    fn create(&mut self, ns: &PodNetns, spec: &PodLinkSpec) -> Result<(), DataplaneError> {
        let host = self.host()?;
        let peer = LinkUnspec::new_with_name(&spec.pod_if)
            .address(spec.pod_mac.to_vec())
            .mtu(spec.mtu)
            .setns_by_fd(ns.fd.as_raw_fd())
            .build();
        let msg = LinkVeth::new(&spec.host_if, &spec.pod_if)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .address(spec.host_mac.to_vec())
            .mtu(spec.mtu)
            .up()
            .build();
        let pod = ns.handle.clone();
        let made = self.rt.block_on(async {
            match host.link().add(msg).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(libc::EEXIST) => Err(DataplaneError::LinkExists {
                    host_if: spec.host_if.clone(),
                    pod_if: spec.pod_if.clone(),
                }),
                Err(e) => Err(nl_err(
                    format!("create veth {}/{}", spec.host_if, spec.pod_if),
                    &e,
                )),
            }
        });
        made?;
        let configured = self.rt.block_on(configure(&host, &pod, spec));
        if let Err(e) = configured {
            // Roll back: deleting the host end removes the peer and both ends' routes.
            let _ = self.delete_host_link(&spec.host_if);
            return Err(e);
        }
        Ok(())
    }

    fn delete_host_link(&mut self, name: &str) -> Result<bool, DataplaneError> {
        let host = self.host()?;
        let msg = LinkUnspec::new_with_name(name).build();
        self.rt.block_on(async {
            match host.link().del_with_message(msg).execute().await {
                Ok(()) => Ok(true),
                Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
                Err(e) => Err(nl_err(format!("delete link {name}"), &e)),
            }
        })
    }

    fn retire_host_link(&mut self, name: &str) -> Result<bool, DataplaneError> {
        let host = self.host()?;
        let retired = self.rt.block_on(async {
            let Some(link) = link_by_name(&host, name)
                .await
                .map_err(|e| nl_err(format!("get link {name}"), &e))?
            else {
                return Ok(None);
            };
            let index = link.header.index;
            let tomb = retired_if_name(index);
            let down = LinkUnspec::new_with_index(index).down().build();
            // A link must be down to be renamed; so this order, in two requests.
            let renamed = match host.link().set(down).execute().await {
                Ok(()) => {
                    let rename = LinkUnspec::new_with_index(index).name(tomb.clone()).build();
                    host.link().set(rename).execute().await
                }
                Err(e) => Err(e),
            };
            match renamed {
                Ok(()) => Ok(Some((tomb, index))),
                // Gone between the lookup and the request: nothing left to retire.
                Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
                Err(e) => Err(nl_err(format!("retire link {name}"), &e)),
            }
        })?;
        let Some((tomb, index)) = retired else {
            return Ok(false);
        };
        if spawn_reaper(&tomb, index).is_err() {
            // No background process (exe unreadable, out of pids): pay the delete now.
            self.delete_host_link(&tomb)?;
        }
        Ok(true)
    }

    fn delete_retired_links(&mut self) -> Result<usize, DataplaneError> {
        let mut n = 0;
        for name in self.veth_names(is_retired_if_name)? {
            if self.delete_host_link(&name)? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn list_host_links(&mut self) -> Result<Vec<String>, DataplaneError> {
        self.veth_names(is_host_if_name)
    }

    fn observe(
        &mut self,
        ns: &PodNetns,
        host_if: &str,
        pod_if: &str,
    ) -> Result<Observed, DataplaneError> {
        let host = self.host()?;
        let pod = ns.handle.clone();
        self.rt
            .block_on(async move {
                let mut o = Observed::default();
                if let Some(l) = link_by_name(&host, host_if).await? {
                    o.host_link = Some(link_state(&l));
                    o.host_routes = routes_via(&host, l.header.index)
                        .await?
                        .into_iter()
                        .map(|r| r.dst)
                        .collect();
                    o.host_addrs = addresses_of(&host, l.header.index).await?;
                }
                if let Some(l) = link_by_name(&pod, pod_if).await? {
                    let idx = l.header.index;
                    o.pod_link = Some(link_state(&l));
                    o.pod_addrs = addresses_of(&pod, idx).await?;
                    o.pod_routes = routes_via(&pod, idx).await?;
                    let neighs: Vec<_> = pod.neighbours().get().execute().try_collect().await?;
                    o.pod_neighs = neighs
                        .iter()
                        .filter(|n| {
                            n.header.ifindex == idx && n.header.state == NeighbourState::Permanent
                        })
                        .filter_map(|n| {
                            let ip = n.attributes.iter().find_map(|a| match a {
                                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => {
                                    Some(IpAddr::V4(*d))
                                }
                                NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => {
                                    Some(IpAddr::V6(*d))
                                }
                                _ => None,
                            })?;
                            let mac = n.attributes.iter().find_map(|a| match a {
                                NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                                    let mut mac = [0; 6];
                                    mac.copy_from_slice(m);
                                    Some(mac)
                                }
                                _ => None,
                            })?;
                            Some((ip, mac))
                        })
                        .collect();
                }
                Ok::<_, rtnetlink::Error>(o)
            })
            .map_err(|e| nl_err("inspect interfaces", &e))
    }
}

/// The addresses on link `index`, both families.
async fn addresses_of(h: &Handle, index: u32) -> Result<Vec<IpNetwork>, rtnetlink::Error> {
    let addrs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    let mut out = Vec::new();
    for a in &addrs {
        for attr in &a.attributes {
            if let AddressAttribute::Address(ip) = attr
                && let Ok(n) = IpNetwork::new(*ip, a.header.prefix_len)
            {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Everything after the veth exists. Both link lookups, then the five writes, are
/// sent back-to-back; netlink processes one socket's requests in order, so the
/// route (which needs the link up) always follows link creation.
async fn configure(host: &Handle, pod: &Handle, spec: &PodLinkSpec) -> Result<(), DataplaneError> {
    let (host_link, pod_link) = futures_util::future::try_join(
        link_by_name(host, &spec.host_if),
        link_by_name(pod, &spec.pod_if),
    )
    .await
    .map_err(|e| nl_err("look up the new veth", &e))?;
    let missing = |n: &str| DataplaneError::Netlink {
        op: format!("look up {n}"),
        source: io::Error::from_raw_os_error(libc::ENODEV),
    };
    let host_idx = host_link
        .ok_or_else(|| missing(&spec.host_if))?
        .header
        .index;
    let pod_idx = pod_link.ok_or_else(|| missing(&spec.pod_if))?.header.index;

    // Requests are sent in the order they are first polled, which is this order:
    // `try_join_all` polls its futures front to back. The peer cannot be created up:
    // veth_open() fails with ENOTCONN until both ends are registered, so it is raised
    // here, first in the pipeline (routes need the link up).
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(10);
    let up = pod
        .link()
        .set(LinkUnspec::new_with_index(pod_idx).up().build())
        .execute();
    steps.push(step(up, format!("set {} up", spec.pod_if)));
    if let Some(ip) = spec.pod_ip4 {
        v4_steps(&mut steps, host, pod, spec, ip, (host_idx, pod_idx));
    }
    if let Some(ip) = spec.pod_ip6 {
        v6_steps(&mut steps, host, pod, spec, ip, (host_idx, pod_idx));
    }
    futures_util::future::try_join_all(steps).await?;
    Ok(())
}

/// One netlink request of the ADD pipeline, with what to call it in an error.
type Step<'a> = Pin<Box<dyn Future<Output = Result<(), DataplaneError>> + 'a>>;

fn step<'a>(req: impl Future<Output = Result<(), rtnetlink::Error>> + 'a, op: String) -> Step<'a> {
    Box::pin(async move { req.await.map_err(|e| nl_err(op, &e)) })
}

/// The IPv4 requests: pod address, gateway neighbour, default route, host route.
fn v4_steps<'a>(
    steps: &mut Vec<Step<'a>>,
    host: &'a Handle,
    pod: &'a Handle,
    spec: &'a PodLinkSpec,
    ip: Ipv4Addr,
    (host_idx, pod_idx): (u32, u32),
) {
    let addr = pod.address().add(pod_idx, IpAddr::V4(ip), 32).execute();
    steps.push(step(addr, format!("add {ip}/32 to {}", spec.pod_if)));
    // Static neighbour for the gateway: the pod never ARPs for it, and nothing in
    // the node (no proxy_arp, no route to 169.254.1.1) has to answer.
    let neigh = pod
        .neighbours()
        .add(pod_idx, IpAddr::V4(spec.gateway))
        .link_layer_address(&spec.host_mac)
        .state(NeighbourState::Permanent)
        .execute();
    steps.push(step(
        neigh,
        format!("add gateway neighbour on {}", spec.pod_if),
    ));
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(spec.gateway)
        .output_interface(pod_idx)
        .onlink()
        .build();
    let default = pod.route().add(default).execute();
    steps.push(step(
        default,
        format!("add default route via {}", spec.gateway),
    ));
    let to_pod = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(host_idx)
        .scope(RouteScope::Link)
        .build();
    let to_pod = host.route().add(to_pod).execute();
    steps.push(step(
        to_pod,
        format!("add route {ip}/32 via {}", spec.host_if),
    ));
}

/// The IPv6 requests: pod address, gateway neighbour, default route, the gateway address
/// on the host veth, host route.
fn v6_steps<'a>(
    steps: &mut Vec<Step<'a>>,
    host: &'a Handle,
    pod: &'a Handle,
    spec: &'a PodLinkSpec,
    ip: Ipv6Addr,
    (host_idx, pod_idx): (u32, u32),
) {
    // No DAD: the address is ours by reservation, and a tentative address could not
    // be used as a source for a second or more after ADD answers.
    let mut addr = pod.address().add(pod_idx, IpAddr::V6(ip), 128);
    addr.message_mut().header.flags = AddressHeaderFlags::Nodad;
    steps.push(step(
        addr.execute(),
        format!("add {ip}/128 to {}", spec.pod_if),
    ));
    let neigh = pod
        .neighbours()
        .add(pod_idx, IpAddr::V6(spec.gateway6))
        .link_layer_address(&spec.host_mac)
        .state(NeighbourState::Permanent)
        .execute();
    steps.push(step(
        neigh,
        format!("add IPv6 gateway neighbour on {}", spec.pod_if),
    ));
    // A link-local next hop needs no on-link flag: it is on the given link by definition.
    let default = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
        .gateway(spec.gateway6)
        .output_interface(pod_idx)
        .build();
    let default = pod.route().add(default).execute();
    steps.push(step(
        default,
        format!("add default route via {}", spec.gateway6),
    ));
    let mut gw = host.address().add(host_idx, IpAddr::V6(spec.gateway6), 64);
    gw.message_mut().header.flags = AddressHeaderFlags::Nodad;
    steps.push(step(
        gw.execute(),
        format!("add {}/64 to {}", spec.gateway6, spec.host_if),
    ));
    let to_pod = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(ip, 128)
        .output_interface(host_idx)
        .build();
    let to_pod = host.route().add(to_pod).execute();
    steps.push(step(
        to_pod,
        format!("add route {ip}/128 via {}", spec.host_if),
    ));
}
