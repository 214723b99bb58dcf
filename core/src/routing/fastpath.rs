//! The pure half of eBPF host routing and masquerade: what `TWL_LXC_V1`, `TWL_LXC6_V1`,
//! `TWL_MASQ_V1` and `TWL_FPCFG_V1` should hold, from snapshots the agent takes (links, routes,
//! neighbours) and the route plan's masquerade ruleset; and the diff that converges a map to it.
//!
//! A local endpoint is a pod veth (twill-cni's host side) with its `/32` (IPv6: `/128`) route:
//! the route says which pod address lives behind which veth, the link gives the host side's
//! MAC, and the host's neighbour entry for the pod address (the pod answered an ARP or a
//! Neighbour Solicitation, or twill-cni wrote it) gives the pod's MAC. Without a known MAC the
//! endpoint is still written (the masquerade and the device programs need to know the address
//! is a local pod), flagged so that packets to it take the stack until the MAC is learnt.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use twill_common::{
    FP_F_HOST_ROUTING, FP_F_MASQ_BPF, FP_F_MASQ_NFT, FastPathConfig, LXC_F_MAC_KNOWN,
    LocalEndpoint, MASQ_KIND_EXEMPT, MASQ_KIND_SOURCE, MASQ_PORT_MAX, MASQ_PORT_MIN,
    addr6_from_octets, addr6_octets,
};

use super::MasqueradeRules;
use super::masq::MasqFamily;

/// A pod veth as the link dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLink {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// A neighbour entry with a link-layer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub mac: [u8; 6],
}

/// The local endpoints of both families, keyed as their maps are: `TWL_LXC_V1` by the IPv4
/// address in network order, `TWL_LXC6_V1` by the IPv6 address as `addr6_from_octets` makes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoints {
    pub v4: BTreeMap<u32, LocalEndpoint>,
    pub v6: BTreeMap<[u32; 4], LocalEndpoint>,
}

impl LocalEndpoints {
    /// Every endpoint of both families.
    pub fn values(&self) -> impl Iterator<Item = &LocalEndpoint> {
        self.v4.values().chain(self.v6.values())
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every endpoint with its address, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &LocalEndpoint)> {
        self.v4
            .iter()
            .map(|(k, ep)| (IpAddr::V4(Ipv4Addr::from(u32::from_be(*k))), ep))
            .chain(
                self.v6
                    .iter()
                    .map(|(k, ep)| (IpAddr::V6(Ipv6Addr::from(addr6_octets(*k))), ep)),
            )
    }
}

/// The local endpoints: every host route (`/32` or `/128`, the caller's filter) through a pod
/// veth of `links`, with the MAC of its neighbour entry on that veth when there is one. A route
/// through a link that is not a pod veth is ignored.
pub fn local_endpoints(
    links: &BTreeMap<u32, PodLink>,
    host_routes: &[(IpAddr, u32)],
    neighbours: &[Neighbour],
) -> LocalEndpoints {
    let macs: BTreeMap<(u32, IpAddr), [u8; 6]> = neighbours
        .iter()
        .filter(|n| n.mac != [0; 6])
        .map(|n| ((n.ifindex, n.addr), n.mac))
        .collect();
    let mut out = LocalEndpoints::default();
    for &(addr, oif) in host_routes {
        let Some(link) = links.get(&oif) else {
            continue;
        };
        let pod_mac = macs.get(&(oif, addr)).copied();
        let ep = LocalEndpoint {
            ifindex: oif,
            flags: if pod_mac.is_some() {
                LXC_F_MAC_KNOWN
            } else {
                0
            },
            pod_mac: pod_mac.unwrap_or([0; 6]),
            host_mac: link.mac,
        };
        match addr {
            IpAddr::V4(a) => {
                out.v4.insert(u32::from(a).to_be(), ep);
            }
            IpAddr::V6(a) => {
                out.v6.insert(addr6_from_octets(a.octets()), ep);
            }
        }
    }
    out
}

/// How pod traffic leaving the cluster is masqueraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasqueradeMode {
    /// By the devices' tc egress program: no netfilter rule on the node.
    #[default]
    Ebpf,
    /// By an nftables table (`ip twill`): the fallback for kernels or setups where the eBPF
    /// masquerade cannot run.
    Nftables,
}

impl std::str::FromStr for MasqueradeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ebpf" => Ok(Self::Ebpf),
            "nftables" => Ok(Self::Nftables),
            other => Err(format!("{other:?}: expected ebpf or nftables")),
        }
    }
}

/// The fast path's switches. `masquerade`: whether pod egress is masqueraded at all, and how.
pub fn config(host_routing: bool, masquerade: Option<MasqueradeMode>) -> FastPathConfig {
    let mut flags = 0;
    if host_routing {
        flags |= FP_F_HOST_ROUTING;
    }
    let mut ports = (0, 0);
    match masquerade {
        Some(MasqueradeMode::Ebpf) => {
            flags |= FP_F_MASQ_BPF;
            ports = (MASQ_PORT_MIN, MASQ_PORT_MAX);
        }
        Some(MasqueradeMode::Nftables) => flags |= FP_F_MASQ_NFT,
        None => {}
    }
    FastPathConfig {
        flags,
        masq_port_min: ports.0,
        masq_port_max: ports.1,
    }
}

/// `TWL_MASQ_V1`'s (IPv4) or `TWL_MASQ6_V1`'s (IPv6) contents as (kind, canonical prefix): the
/// rules' sources and exempt destinations; nothing when masquerade is off.
pub fn masq_prefixes<N: MasqFamily>(rules: Option<&MasqueradeRules<N>>) -> BTreeSet<(u8, N)> {
    let Some(rules) = rules else {
        return BTreeSet::new();
    };
    rules
        .sources
        .iter()
        .map(|n| (MASQ_KIND_SOURCE, n.canonical()))
        .chain(
            rules
                .exempt
                .iter()
                .map(|n| (MASQ_KIND_EXEMPT, n.canonical())),
        )
        .collect()
}

/// What to write and delete to turn a map holding `current` into one holding `desired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// New or changed entries (written before anything is deleted).
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upserts: desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        deletes: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect(),
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `twill-agent debug fastpath`'s endpoint table: one line per local endpoint, IPv4 first, by
/// address.
pub fn render_endpoints(endpoints: &LocalEndpoints) -> String {
    let mut s = String::new();
    for (addr, ep) in endpoints.iter() {
        let pod_mac = if ep.flags & LXC_F_MAC_KNOWN != 0 {
            mac(ep.pod_mac)
        } else {
            "unknown (via the stack)".to_owned()
        };
        let _ = writeln!(
            s,
            "{addr} ifindex {} pod {} host {}",
            ep.ifindex,
            pod_mac,
            mac(ep.host_mac)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::Ipv4Network;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_join_routes_links_and_neighbours() {
        let links = BTreeMap::from([
            (
                7,
                PodLink {
                    ifindex: 7,
                    mac: [0xee, 1, 2, 3, 4, 5],
                },
            ),
            (
                9,
                PodLink {
                    ifindex: 9,
                    mac: [0xee, 9, 9, 9, 9, 9],
                },
            ),
        ]);
        let routes = [
            (ip("10.244.0.5"), 7),
            (ip("10.244.0.6"), 9),
            // A dual-stack pod's IPv6 address on the same veth as its IPv4 one.
            (ip("fd00:10:244::5"), 7),
            (ip("fd00:10:244::6"), 9),
            // Through the underlay, not a pod veth: not an endpoint.
            (ip("172.30.0.11"), 2),
            (ip("fd00:172:30::11"), 2),
        ];
        let neighbours = [
            Neighbour {
                ifindex: 7,
                addr: ip("10.244.0.5"),
                mac: [0x0a, 1, 1, 1, 1, 1],
            },
            // The right address on the wrong link says nothing about 10.244.0.6's MAC.
            Neighbour {
                ifindex: 7,
                addr: ip("10.244.0.6"),
                mac: [0x0a, 2, 2, 2, 2, 2],
            },
            // Learnt by Neighbour Discovery, per address: fd00:10:244::5's is not known yet.
            Neighbour {
                ifindex: 9,
                addr: ip("fd00:10:244::6"),
                mac: [0x0a, 6, 6, 6, 6, 6],
            },
        ];
        let eps = local_endpoints(&links, &routes, &neighbours);
        assert_eq!((eps.v4.len(), eps.v6.len(), eps.len()), (2, 2, 4));
        let a = eps.v4[&u32::from_ne_bytes([10, 244, 0, 5])];
        assert_eq!(
            a,
            LocalEndpoint {
                ifindex: 7,
                flags: LXC_F_MAC_KNOWN,
                pod_mac: [0x0a, 1, 1, 1, 1, 1],
                host_mac: [0xee, 1, 2, 3, 4, 5],
            }
        );
        let b = eps.v4[&u32::from_ne_bytes([10, 244, 0, 6])];
        assert_eq!((b.ifindex, b.flags, b.pod_mac), (9, 0, [0; 6]));
        let key6 = |s: &str| addr6_from_octets(s.parse::<Ipv6Addr>().unwrap().octets());
        let a6 = eps.v6[&key6("fd00:10:244::5")];
        assert_eq!((a6.ifindex, a6.flags, a6.host_mac), (7, 0, a.host_mac));
        let b6 = eps.v6[&key6("fd00:10:244::6")];
        assert_eq!(
            (b6.ifindex, b6.flags, b6.pod_mac),
            (9, LXC_F_MAC_KNOWN, [0x0a, 6, 6, 6, 6, 6])
        );
        assert_eq!(
            render_endpoints(&eps),
            "10.244.0.5 ifindex 7 pod 0a:01:01:01:01:01 host ee:01:02:03:04:05\n\
             10.244.0.6 ifindex 9 pod unknown (via the stack) host ee:09:09:09:09:09\n\
             fd00:10:244::5 ifindex 7 pod unknown (via the stack) host ee:01:02:03:04:05\n\
             fd00:10:244::6 ifindex 9 pod 0a:06:06:06:06:06 host ee:09:09:09:09:09\n"
        );
        assert_eq!(eps.values().filter(|e| e.flags != 0).count(), 2);
    }

    #[test]
    fn diff_writes_changes_and_deletes_the_rest() {
        let current = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
        let desired = BTreeMap::from([(2, 'b'), (3, 'x'), (4, 'd')]);
        let d = diff(&current, &desired);
        assert_eq!(d.upserts, vec![(3, 'x'), (4, 'd')]);
        assert_eq!(d.deletes, vec![1]);
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn masq_prefixes_follow_the_rules() {
        assert!(masq_prefixes::<Ipv4Network>(None).is_empty());
        let rules = <MasqueradeRules>::new(
            vec!["10.244.0.0/24".parse().unwrap()],
            vec![
                "10.244.0.0/16".parse().unwrap(),
                "172.30.0.11/32".parse().unwrap(),
            ],
            Vec::new(),
        );
        let p: Vec<_> = masq_prefixes(Some(&rules)).into_iter().collect();
        assert_eq!(
            p,
            vec![
                (MASQ_KIND_SOURCE, "10.244.0.0/24".parse().unwrap()),
                (MASQ_KIND_EXEMPT, "10.244.0.0/16".parse().unwrap()),
                (MASQ_KIND_EXEMPT, "172.30.0.11/32".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn config_flags() {
        assert_eq!(config(false, None).flags, 0);
        assert_eq!(
            config(true, Some(MasqueradeMode::Nftables)).flags,
            FP_F_HOST_ROUTING | FP_F_MASQ_NFT
        );
        let ebpf = config(true, Some(MasqueradeMode::Ebpf));
        assert_eq!(ebpf.flags, FP_F_HOST_ROUTING | FP_F_MASQ_BPF);
        assert_eq!(
            (ebpf.masq_port_min, ebpf.masq_port_max),
            (MASQ_PORT_MIN, MASQ_PORT_MAX)
        );
        assert_eq!(
            config(true, Some(MasqueradeMode::Nftables)).masq_port_min,
            0
        );
        assert_eq!("nftables".parse(), Ok(MasqueradeMode::Nftables));
        assert!("iptables".parse::<MasqueradeMode>().is_err());
    }
}

/// `twill-agent debug fastpath` (`/v1/fastpath`): the switches, the outcome counters and the
/// endpoint table, read from the kernel's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FastPathView {
    pub host_routing: bool,
    /// `ebpf`, `nftables` or `off`.
    pub masquerade: String,
    /// (reason name, packets) of every fast path and masquerade reason, zeros included.
    pub counters: Vec<(String, u64)>,
    /// One line per local endpoint ([`render_endpoints`]).
    pub endpoints: Vec<String>,
}

impl FastPathView {
    pub fn new(
        config: FastPathConfig,
        counters: Vec<(String, u64)>,
        endpoints: &LocalEndpoints,
    ) -> Self {
        let masquerade = if config.flags & FP_F_MASQ_BPF != 0 {
            "ebpf"
        } else if config.flags & FP_F_MASQ_NFT != 0 {
            "nftables"
        } else {
            "off"
        };
        Self {
            host_routing: config.flags & FP_F_HOST_ROUTING != 0,
            masquerade: masquerade.to_owned(),
            counters,
            endpoints: render_endpoints(endpoints)
                .lines()
                .map(str::to_owned)
                .collect(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "host routing: {}\nmasquerade: {}\n",
            if self.host_routing { "ebpf" } else { "stack" },
            self.masquerade
        );
        let width = self
            .counters
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(0);
        for (name, count) in &self.counters {
            let _ = writeln!(s, "{name:<width$}  {count}");
        }
        let _ = writeln!(s, "\nlocal endpoints: {}", self.endpoints.len());
        for e in &self.endpoints {
            let _ = writeln!(s, "  {e}");
        }
        s
    }
}
