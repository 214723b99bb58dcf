//! Egress masquerade by nftables (`--masquerade-mode nftables`): pods → destinations outside
//! the cluster leave with the node IP. The default mode is eBPF's (`proxy-ebpf/src/masq.rs`,
//! `nat6.rs` for IPv6), which takes the same sources and exceptions as prefixes
//! ([`super::fastpath::masq_prefixes`]) and leaves netfilter off the node; this ruleset is the
//! fallback for kernels or setups where it cannot run. One table per family (`ip twill`,
//! `ip6 twill`), rendered by one generic [`MasqueradeRules`], each replaced atomically in one
//! `nft -f` transaction, inside the node's network namespace only.
//!
//! A NAT hook makes netfilter track *every* connection of the namespace, and a conntrack entry
//! per connection costs pod↔pod connection rate what it costs kube-proxy's iptables mode (≈ 0.8×
//! the untracked path measured here). Pod↔pod packets are never translated, so the table also
//! marks them `notrack` at the raw priority, before conntrack sees them (what Cilium's
//! `--install-no-conntrack-iptables-rules` does). Traffic to or from node addresses (hostPorts,
//! probes, masqueraded replies arriving for the node IP) stays tracked. A NetworkPolicy engine
//! that matches on conntrack state between pods would see these packets as untracked.
//!
//! This module only renders the script (pure, shared with the lab's benchmark peers);
//! twill-agent's `routing::nft` feeds it to `nft -f` inside the node's namespace.
use std::{fmt::Write as _, net::IpAddr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// nftables table (families `ip` and `ip6`) the agent owns entirely.
pub const NFT_TABLE: &str = "twill";

/// What the ruleset needs of an address family's networks: the two families share every line
/// of it but these words. The route planner (`plan.rs`, `plan6.rs`) reads Node addresses and
/// pod CIDRs through it too, so both families' plans share one parser per field.
pub trait MasqFamily: Copy + Ord + std::fmt::Display + std::fmt::Debug {
    type Addr: Copy + Ord;
    /// nftables table family (`ip`, `ip6`), also the match keyword (`ip saddr`, `ip6 saddr`).
    const NFT_FAMILY: &'static str;
    /// nftables set element type.
    const NFT_ADDR_TYPE: &'static str;
    fn network(&self) -> Self::Addr;
    fn prefix(&self) -> u8;
    fn contains(&self, addr: Self::Addr) -> bool;
    /// The network with its host bits cleared (10.244.1.7/24 → 10.244.1.0/24).
    #[must_use]
    fn canonical(&self) -> Self;
    /// `ip` if it is of this family.
    fn addr_of(ip: IpAddr) -> Option<Self::Addr>;
    /// `net`, canonical, if it is of this family.
    fn network_of(net: IpNetwork) -> Option<Self>;
    /// The host network of `addr` (`/32`, `/128`).
    fn host(addr: Self::Addr) -> Self;
}

impl MasqFamily for Ipv4Network {
    type Addr = std::net::Ipv4Addr;
    const NFT_FAMILY: &'static str = "ip";
    const NFT_ADDR_TYPE: &'static str = "ipv4_addr";
    fn network(&self) -> Self::Addr {
        Ipv4Network::network(self)
    }
    fn prefix(&self) -> u8 {
        Ipv4Network::prefix(*self)
    }
    fn contains(&self, addr: Self::Addr) -> bool {
        Ipv4Network::contains(self, addr)
    }
    fn canonical(&self) -> Self {
        Ipv4Network::new(self.network(), self.prefix()).unwrap_or(*self)
    }
    fn addr_of(ip: IpAddr) -> Option<Self::Addr> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }
    fn network_of(net: IpNetwork) -> Option<Self> {
        match net {
            IpNetwork::V4(n) => Some(n.canonical()),
            IpNetwork::V6(_) => None,
        }
    }
    fn host(addr: Self::Addr) -> Self {
        Ipv4Network::from(addr)
    }
}

impl MasqFamily for Ipv6Network {
    type Addr = std::net::Ipv6Addr;
    const NFT_FAMILY: &'static str = "ip6";
    const NFT_ADDR_TYPE: &'static str = "ipv6_addr";
    fn network(&self) -> Self::Addr {
        Ipv6Network::network(self)
    }
    fn prefix(&self) -> u8 {
        Ipv6Network::prefix(self)
    }
    fn contains(&self, addr: Self::Addr) -> bool {
        Ipv6Network::contains(self, addr)
    }
    fn canonical(&self) -> Self {
        Ipv6Network::new(self.network(), self.prefix()).unwrap_or(*self)
    }
    fn addr_of(ip: IpAddr) -> Option<Self::Addr> {
        match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }
    }
    fn network_of(net: IpNetwork) -> Option<Self> {
        match net {
            IpNetwork::V6(n) => Some(n.canonical()),
            IpNetwork::V4(_) => None,
        }
    }
    fn host(addr: Self::Addr) -> Self {
        Ipv6Network::from(addr)
    }
}

/// The masquerade ruleset of one address family as values (IPv4 by default; the IPv6 one is
/// [`Masquerade6Rules`], an `ip6 twill` table next to the `ip twill` one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqueradeRules<N = Ipv4Network> {
    /// Sources that are masqueraded: this node's pod CIDRs.
    pub sources: Vec<N>,
    /// Destinations reached untranslated: every pod CIDR, every node IP, the cluster CIDRs and
    /// the `--non-masquerade-cidrs`. Collapsed (no entry inside another) and sorted, because
    /// nftables rejects overlapping elements in an interval set.
    pub exempt: Vec<N>,
    /// Every pod CIDR of the cluster (and the cluster CIDRs): packets from one to another are
    /// not tracked.
    pub pod_cidrs: Vec<N>,
}

/// The IPv6 ruleset: exceptions are IPv6 ones (every IPv6 pod CIDR, every node's IPv6
/// InternalIP, the IPv6 cluster and non-masquerade CIDRs).
pub type Masquerade6Rules = MasqueradeRules<Ipv6Network>;

impl<N: MasqFamily> MasqueradeRules<N> {
    pub fn new(sources: Vec<N>, exempt: Vec<N>, pod_cidrs: Vec<N>) -> Self {
        Self {
            sources: collapse(sources),
            exempt: collapse(exempt),
            pod_cidrs: collapse(pod_cidrs),
        }
    }

    /// The `nft -f` script: create-then-delete-then-define makes the whole replacement one
    /// transaction that works whether or not the table exists.
    pub fn render(&self) -> String {
        let (family, ty) = (N::NFT_FAMILY, N::NFT_ADDR_TYPE);
        let mut s = String::new();
        let _ = writeln!(s, "table {family} {NFT_TABLE}");
        let _ = writeln!(s, "delete table {family} {NFT_TABLE}");
        let _ = writeln!(s, "table {family} {NFT_TABLE} {{");
        for (name, set) in [
            ("pod_sources", &self.sources),
            ("no_masquerade", &self.exempt),
            ("pod_cidrs", &self.pod_cidrs),
        ] {
            let _ = write!(s, "\tset {name} {{\n\t\ttype {ty}\n\t\tflags interval\n");
            if !set.is_empty() {
                let elems: Vec<String> = set.iter().map(ToString::to_string).collect();
                let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
            }
            s.push_str("\t}\n");
        }
        s.push_str("\tchain prerouting_notrack {\n");
        s.push_str("\t\ttype filter hook prerouting priority raw; policy accept;\n");
        let _ = writeln!(
            s,
            "\t\t{family} saddr @pod_cidrs {family} daddr @pod_cidrs notrack"
        );
        s.push_str("\t}\n");
        s.push_str("\tchain postrouting {\n");
        s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        let _ = writeln!(
            s,
            "\t\t{family} saddr @pod_sources {family} daddr != @no_masquerade masquerade"
        );
        s.push_str("\t}\n}\n");
        s
    }

    /// The `nft -f` script that removes the agent's table of this family (no error when it is
    /// absent).
    pub fn render_remove() -> String {
        let family = N::NFT_FAMILY;
        format!("table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n")
    }
}

/// Drops every network contained in another one and sorts by address, in O(n log n): CIDR
/// blocks are either nested or disjoint, so after sorting by (start, prefix) a block is covered
/// by some earlier kept block exactly when it is covered by the last kept one.
fn collapse<N: MasqFamily>(mut nets: Vec<N>) -> Vec<N> {
    // Canonical form first, so 10.244.1.7/24 and 10.244.1.0/24 are the same element.
    for n in &mut nets {
        *n = n.canonical();
    }
    nets.sort_by_key(|n| (n.network(), n.prefix()));
    let mut kept: Vec<N> = Vec::with_capacity(nets.len());
    for n in nets {
        if !kept.last().is_some_and(|k| k.contains(n.network())) {
            kept.push(n);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<Ipv4Network> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn exempt_set_is_collapsed_and_sorted() {
        let m = MasqueradeRules::new(
            nets(&["10.244.0.0/24"]),
            nets(&[
                "10.244.1.0/24",
                "10.244.0.0/16",
                "172.30.0.10/32",
                "172.30.0.0/24",
                "10.244.1.9/24",
            ]),
            nets(&["10.244.1.0/24", "10.244.0.0/24"]),
        );
        assert_eq!(m.exempt, nets(&["10.244.0.0/16", "172.30.0.0/24"]));
        assert_eq!(m.pod_cidrs, nets(&["10.244.0.0/24", "10.244.1.0/24"]));
        // Disjoint neighbours and a block after a covered one both stay.
        let m = MasqueradeRules::new(
            Vec::new(),
            nets(&[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "11.0.0.0/24",
                "10.255.255.255/32",
                "11.0.1.0/24",
            ]),
            Vec::new(),
        );
        assert_eq!(
            m.exempt,
            nets(&["10.0.0.0/8", "11.0.0.0/24", "11.0.1.0/24"])
        );
    }

    #[test]
    fn render_is_one_atomic_replacement() {
        let m = MasqueradeRules::new(
            nets(&["10.244.0.0/24"]),
            nets(&["10.244.0.0/16", "172.30.0.10/32"]),
            nets(&["10.244.0.0/16"]),
        );
        assert_eq!(
            m.render(),
            "table ip twill\ndelete table ip twill\ntable ip twill {\n\
             \tset pod_sources {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/24 }\n\t}\n\
             \tset no_masquerade {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16, 172.30.0.10/32 }\n\t}\n\
             \tset pod_cidrs {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }\n\t}\n\
             \tchain prerouting_notrack {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\
             \t\tip saddr @pod_cidrs ip daddr @pod_cidrs notrack\n\t}\n\
             \tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr @pod_sources ip daddr != @no_masquerade masquerade\n\t}\n}\n"
        );
    }

    #[test]
    fn removal_script_tolerates_a_missing_table() {
        // Declaring the table first makes the delete succeed whether or not it exists.
        assert_eq!(
            <MasqueradeRules>::render_remove(),
            "table ip twill\ndelete table ip twill\n"
        );
    }

    #[test]
    fn empty_sets_render_without_elements() {
        let r = <MasqueradeRules>::new(Vec::new(), Vec::new(), Vec::new()).render();
        assert!(!r.contains("elements"), "{r}");
    }

    fn nets6(v: &[&str]) -> Vec<Ipv6Network> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn renders_an_ip6_table_with_collapsed_sets() {
        let r = Masquerade6Rules::new(
            nets6(&["fd00:10:244::/64"]),
            nets6(&[
                "fd00:10:244:1::/64",
                "fd00:10:244::/48",
                "fd00:172:30::11/128",
            ]),
            nets6(&["fd00:10:244::/64", "fd00:10:244:1::/64"]),
        );
        assert_eq!(
            r.exempt,
            nets6(&["fd00:10:244::/48", "fd00:172:30::11/128"])
        );
        assert_eq!(
            r.render(),
            "table ip6 twill\ndelete table ip6 twill\ntable ip6 twill {\n\
             \tset pod_sources {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00:10:244::/64 }\n\t}\n\
             \tset no_masquerade {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00:10:244::/48, fd00:172:30::11/128 }\n\t}\n\
             \tset pod_cidrs {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00:10:244::/64, fd00:10:244:1::/64 }\n\t}\n\
             \tchain prerouting_notrack {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\
             \t\tip6 saddr @pod_cidrs ip6 daddr @pod_cidrs notrack\n\t}\n\
             \tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip6 saddr @pod_sources ip6 daddr != @no_masquerade masquerade\n\t}\n}\n"
        );
        assert_eq!(
            Masquerade6Rules::render_remove(),
            "table ip6 twill\ndelete table ip6 twill\n"
        );
    }
}
