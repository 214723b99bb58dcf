//! The narrow seam between command orchestration and the kernel.
//!
//! Commands compute a [`PodLinkSpec`] (a plain value: names, MACs, addresses) and
//! hand it to a [`Dataplane`]; the netlink implementation lives in
//! [`crate::netlink`], an in-memory fake in the unit tests. Names and MACs are
//! derived from the container ID so DEL and GC can find what an ADD made even when
//! the ADD was killed before it could record anything.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use crate::result::Route;

/// Prefix of every host-side interface this plugin creates.
pub const HOST_IF_PREFIX: &str = "twl";
/// Hex digits of sha256(containerID) after the prefix: 3 + 11 = 14 < IFNAMSIZ.
const HOST_IF_HASH_LEN: usize = 11;

/// Host-side veth name: `twl` + the first 11 hex digits of sha256(containerID).
pub fn host_if_name(container_id: &str) -> String {
    let h = Sha256::digest(container_id.as_bytes());
    let hex = h.iter().fold(String::with_capacity(64), |mut acc, b| {
        let _ = write!(acc, "{b:02x}");
        acc
    });
    format!("{HOST_IF_PREFIX}{}", &hex[..HOST_IF_HASH_LEN])
}

/// True for names [`host_if_name`] can produce; GC only ever deletes those.
pub fn is_host_if_name(name: &str) -> bool {
    name.len() == HOST_IF_PREFIX.len() + HOST_IF_HASH_LEN
        && name.starts_with(HOST_IF_PREFIX)
        && name[HOST_IF_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Prefix of a host veth that DEL has taken out of service but not yet deleted.
pub const RETIRED_IF_PREFIX: &str = "twx";

/// Name a retired host veth is renamed to: `twx` + its ifindex, unique in the
/// namespace while the link exists and never a name [`host_if_name`] produces.
pub fn retired_if_name(ifindex: u32) -> String {
    format!("{RETIRED_IF_PREFIX}{ifindex}")
}

/// True for names [`retired_if_name`] can produce; only those are reaped.
pub fn is_retired_if_name(name: &str) -> bool {
    name.len() > RETIRED_IF_PREFIX.len()
        && name.starts_with(RETIRED_IF_PREFIX)
        && name[RETIRED_IF_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit())
}

/// Host-side MAC: locally administered unicast (`ee:` like Calico's), stable per
/// container so the pod's static neighbour entry for the gateway can be written
/// without asking the kernel what MAC it picked.
pub fn host_mac(container_id: &str) -> [u8; 6] {
    let h = Sha256::digest(container_id.as_bytes());
    [0xee, h[8], h[9], h[10], h[11], h[12]]
}

/// Pod-side MAC: locally administered unicast, stable per attachment.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let mut d = Sha256::new();
    d.update(container_id.as_bytes());
    d.update([0]);
    d.update(ifname.as_bytes());
    let h = d.finalize();
    [0x0a, h[0], h[1], h[2], h[3], h[4]]
}

/// Everything the kernel side of an ADD needs, computed before any syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLinkSpec {
    pub host_if: String,
    pub host_mac: [u8; 6],
    pub pod_if: String,
    pub pod_mac: [u8; 6],
    pub mtu: u32,
    /// The pod's IPv4 address, when the network has IPv4 ranges.
    pub pod_ip4: Option<Ipv4Addr>,
    pub gateway: Ipv4Addr,
    /// The pod's IPv6 address, when the network has IPv6 ranges.
    pub pod_ip6: Option<Ipv6Addr>,
    /// Link-local; also put on the host veth (see [`Dataplane::create`]).
    pub gateway6: Ipv6Addr,
}

impl PodLinkSpec {
    /// The pod's addresses, IPv4 first.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        self.pod_ip4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.pod_ip6.map(IpAddr::V6))
            .collect()
    }
}

/// A link as CHECK sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub mtu: u32,
    pub up: bool,
    pub mac: [u8; 6],
    pub is_veth: bool,
}

/// What CHECK found in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub host_link: Option<LinkState>,
    /// Destinations of routes through the host link (main table, both families).
    pub host_routes: Vec<IpNetwork>,
    /// Addresses on the host link.
    pub host_addrs: Vec<IpNetwork>,
    pub pod_link: Option<LinkState>,
    pub pod_addrs: Vec<IpNetwork>,
    /// Routes through the pod link (main table, both families).
    pub pod_routes: Vec<Route>,
    /// Permanent neighbour entries on the pod link: address and link-layer address.
    pub pod_neighs: Vec<(IpAddr, [u8; 6])>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("CNI_NETNS={path:?} cannot be used as a network namespace: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "interface {host_if} (host) or {pod_if} (pod) already exists: a previous ADD for this container was not cleaned up; run DEL for it first"
    )]
    LinkExists { host_if: String, pod_if: String },
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {path} failed: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// Kernel operations of the plugin. Every method is safe to repeat.
pub trait Dataplane {
    /// An opened pod network namespace (with whatever handle the implementation keeps).
    type Netns;

    /// Opens `CNI_NETNS`; fails before anything is reserved if it is not a netns.
    fn open_netns(&mut self, path: &Path) -> Result<Self::Netns, DataplaneError>;
    /// `net.ipv4.ip_forward=1` (`ipv4`) and `net.ipv6.conf.all.forwarding=1` (`ipv6`)
    /// in the namespace the plugin runs in (the node's).
    fn enable_forwarding(&mut self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError>;
    /// Creates the veth pair with the peer directly in `ns` and configures both
    /// ends: per family the pod's address, its default route via the gateway and a
    /// permanent neighbour entry for the gateway, and the host's route to the pod.
    /// With IPv6 the host veth also carries the gateway address itself, without DAD:
    /// the kernel sends no Neighbour Solicitation from an interface whose only
    /// link-local address is still tentative (`ndisc_send_ns()`), so without it the
    /// node could not resolve the pod's address for the first second or two.
    /// On error it removes what it made before returning.
    fn create(&mut self, ns: &Self::Netns, spec: &PodLinkSpec) -> Result<(), DataplaneError>;
    /// Deletes a host-side link (its peer and routes go with it). `Ok(false)` if absent.
    fn delete_host_link(&mut self, name: &str) -> Result<bool, DataplaneError>;
    /// Takes a host-side link out of service now and deletes it later. Deleting a
    /// veth costs ~20 ms of kernel time (an RCU barrier after RTNL is released),
    /// which would otherwise be the bulk of every DEL. Retiring is two cheap
    /// requests: down — the kernel drops every route through the link and the pod
    /// end loses carrier, so the pod's address is unreachable and may be reused —
    /// then a rename to [`retired_if_name`], so the container's name is free for
    /// its next ADD. The deletion then runs off the runtime's critical path; a
    /// retired link that outlives it (reaper killed) is removed by GC or by the
    /// next ADD that collides with it. `Ok(false)` if absent.
    fn retire_host_link(&mut self, name: &str) -> Result<bool, DataplaneError>;
    /// Deletes every retired link now; returns how many there were.
    fn delete_retired_links(&mut self) -> Result<usize, DataplaneError>;
    /// Names of veths in the node namespace that match [`is_host_if_name`].
    fn list_host_links(&mut self) -> Result<Vec<String>, DataplaneError>;
    /// Reads the state CHECK compares against the previous result.
    fn observe(
        &mut self,
        ns: &Self::Netns,
        host_if: &str,
        pod_if: &str,
    ) -> Result<Observed, DataplaneError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_short() {
        let n = host_if_name("abc");
        assert_eq!(n, host_if_name("abc"));
        assert_ne!(n, host_if_name("abd"));
        assert_eq!(n.len(), 14);
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(n, "twlba7816bf8f0");
        assert!(is_host_if_name(&n));
        assert!(!is_host_if_name("twl-vxlan"));
        assert!(!is_host_if_name("twlBA7816BF8F0"));
        assert!(!is_host_if_name("eth0"));
        let r = retired_if_name(4_294_967_295);
        assert!(r.len() < 16, "fits IFNAMSIZ");
        assert!(is_retired_if_name(&r) && !is_host_if_name(&r));
        assert!(!is_retired_if_name("twx") && !is_retired_if_name("twxa1"));
        assert!(!is_retired_if_name(&n));
    }

    #[test]
    fn macs_are_local_unicast() {
        for m in [host_mac("a"), pod_mac("a", "eth0")] {
            assert_eq!(m[0] & 1, 0, "unicast");
            assert_eq!(m[0] & 2, 2, "locally administered");
        }
        assert_ne!(pod_mac("a", "eth0"), pod_mac("a", "eth1"));
    }
}
