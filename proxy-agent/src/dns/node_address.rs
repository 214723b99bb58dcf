//! The responder's address on the node. The default, `169.254.20.10`, is NodeLocal DNSCache's
//! convention: no interface has it until someone adds it. Like NodeLocal DNSCache (which makes
//! a `nodelocaldns` dummy device) the agent adds it itself, in the network namespace it runs in,
//! before binding; an address some interface already has is left alone.
//!
//! A kernel without dummy devices (`CONFIG_DUMMY` off answers EOPNOTSUPP) gets the address on
//! the loopback device instead: either way it is a local address, and pods reach it through
//! their default route to the node.
//! <https://github.com/kubernetes/dns/blob/master/cmd/node-cache/app/cache_app.go>
use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use rtnetlink::LinkDummy;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

/// The device the agent keeps the DNS address on.
pub const DNS_DEVICE: &str = "twill-dns";

/// What [`ensure`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    /// The wildcard or a loopback address: nothing to add.
    NotNeeded,
    /// Some interface already has it (the node's own address, a previous run's device).
    AlreadyThere { device: String },
    /// Added now, on this device.
    Added { device: String },
}

#[derive(Debug, thiserror::Error)]
pub enum NodeAddressError {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("netlink: {op}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no loopback device to hold the address")]
    NoLoopback,
}

fn netlink(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NodeAddressError {
    move |source| NodeAddressError::Netlink { op, source }
}

/// Makes `ip` a local address of this network namespace. Safe to repeat.
pub async fn ensure(ip: IpAddr) -> Result<Owned, NodeAddressError> {
    if ip.is_unspecified() || ip.is_loopback() {
        return Ok(Owned::NotNeeded);
    }
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeAddressError::Connect)?;
    let connection = tokio::spawn(conn);
    let result = ensure_with(&handle, ip).await;
    connection.abort();
    result
}

async fn ensure_with(handle: &rtnetlink::Handle, ip: IpAddr) -> Result<Owned, NodeAddressError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("dump links"))?;
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("dump addresses"))?;
    let name_of = |index: u32| {
        links
            .iter()
            .find(|l| l.header.index == index)
            .and_then(link_name)
            .unwrap_or_default()
    };
    if let Some(a) = addrs.iter().find(|a| address_of(a) == Some(ip)) {
        return Ok(Owned::AlreadyThere {
            device: name_of(a.header.index),
        });
    }
    let index = match dummy_index(handle, &links).await? {
        Some(i) => i,
        None => links
            .iter()
            .find(|l| l.header.flags.contains(LinkFlags::Loopback))
            .map(|l| l.header.index)
            .ok_or(NodeAddressError::NoLoopback)?,
    };
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    handle
        .address()
        .add(index, ip, prefix)
        .execute()
        .await
        .map_err(netlink("add the DNS address"))?;
    Ok(Owned::Added {
        device: name_of(index),
    })
}

/// The index of the agent's dummy device, created (and set up) when missing; `None` when the
/// kernel has no dummy devices.
async fn dummy_index(
    handle: &rtnetlink::Handle,
    links: &[LinkMessage],
) -> Result<Option<u32>, NodeAddressError> {
    if let Some(l) = links
        .iter()
        .find(|l| link_name(l).as_deref() == Some(DNS_DEVICE))
    {
        return Ok(Some(l.header.index));
    }
    match handle
        .link()
        .add(LinkDummy::new(DNS_DEVICE).up().build())
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| -c.get()) == Some(libc::EOPNOTSUPP) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(netlink("create the DNS dummy device")(e)),
    }
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .match_name(DNS_DEVICE.to_owned())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("find the DNS dummy device"))?;
    Ok(links.first().map(|l| l.header.index))
}

/// Removes the agent's dummy device (and the address on it); the `uninstall` path. An address
/// the agent put on the loopback device is removed too. Absent is success.
pub async fn remove(ip: Option<IpAddr>) -> Result<(), NodeAddressError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeAddressError::Connect)?;
    let connection = tokio::spawn(conn);
    let result = remove_with(&handle, ip).await;
    connection.abort();
    result
}

async fn remove_with(
    handle: &rtnetlink::Handle,
    ip: Option<IpAddr>,
) -> Result<(), NodeAddressError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("dump links"))?;
    if let Some(l) = links
        .iter()
        .find(|l| link_name(l).as_deref() == Some(DNS_DEVICE))
    {
        handle
            .link()
            .del(l.header.index)
            .execute()
            .await
            .map_err(netlink("delete the DNS dummy device"))?;
    }
    let Some(ip) = ip.filter(|ip| !ip.is_unspecified() && !ip.is_loopback()) else {
        return Ok(());
    };
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("dump addresses"))?;
    let loopbacks: Vec<u32> = links
        .iter()
        .filter(|l| l.header.flags.contains(LinkFlags::Loopback))
        .map(|l| l.header.index)
        .collect();
    for a in addrs {
        if address_of(&a) == Some(ip) && loopbacks.contains(&a.header.index) {
            handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(netlink("delete the DNS address"))?;
        }
    }
    Ok(())
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The local address of an address message (IFA_LOCAL for IPv4, IFA_ADDRESS otherwise).
fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    a.attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}
