//! Egress masquerade for IPv6 pods: the IPv6 twin of [`super::masq`], one `ip6 twill` table
//! next to the `ip twill` one, rendered the same way (see that module for why nftables and why
//! pod↔pod packets are `notrack`). Its exceptions are IPv6 ones: every IPv6 pod CIDR of the
//! cluster and every node's IPv6 InternalIP.
use std::fmt::Write as _;

use ipnetwork::Ipv6Network;

use super::masq::NFT_TABLE;

/// The IPv6 masquerade ruleset as values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masquerade6Rules {
    /// Sources that are masqueraded: this node's IPv6 pod CIDRs.
    pub sources: Vec<Ipv6Network>,
    /// Destinations reached untranslated (collapsed, sorted: nftables rejects overlapping
    /// elements in an interval set).
    pub exempt: Vec<Ipv6Network>,
    /// Every IPv6 pod CIDR of the cluster: packets from one to another are not tracked.
    pub pod_cidrs: Vec<Ipv6Network>,
}

impl Masquerade6Rules {
    pub fn new(
        sources: Vec<Ipv6Network>,
        exempt: Vec<Ipv6Network>,
        pod_cidrs: Vec<Ipv6Network>,
    ) -> Self {
        Self {
            sources: collapse(sources),
            exempt: collapse(exempt),
            pod_cidrs: collapse(pod_cidrs),
        }
    }

    /// The `nft -f` script, one transaction whether or not the table exists.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "table ip6 {NFT_TABLE}");
        let _ = writeln!(s, "delete table ip6 {NFT_TABLE}");
        let _ = writeln!(s, "table ip6 {NFT_TABLE} {{");
        for (name, set) in [
            ("pod_sources", &self.sources),
            ("no_masquerade", &self.exempt),
            ("pod_cidrs", &self.pod_cidrs),
        ] {
            let _ = write!(
                s,
                "\tset {name} {{\n\t\ttype ipv6_addr\n\t\tflags interval\n"
            );
            if !set.is_empty() {
                let elems: Vec<String> = set.iter().map(ToString::to_string).collect();
                let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
            }
            s.push_str("\t}\n");
        }
        s.push_str("\tchain prerouting_notrack {\n");
        s.push_str("\t\ttype filter hook prerouting priority raw; policy accept;\n");
        s.push_str("\t\tip6 saddr @pod_cidrs ip6 daddr @pod_cidrs notrack\n");
        s.push_str("\t}\n");
        s.push_str("\tchain postrouting {\n");
        s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        s.push_str("\t\tip6 saddr @pod_sources ip6 daddr != @no_masquerade masquerade\n");
        s.push_str("\t}\n}\n");
        s
    }

    /// The `nft -f` script that removes the IPv6 table (no error when it is absent).
    pub fn render_remove() -> String {
        format!("table ip6 {NFT_TABLE}\ndelete table ip6 {NFT_TABLE}\n")
    }
}

/// As the IPv4 `collapse`: drop networks inside another, sort by address.
fn collapse(mut nets: Vec<Ipv6Network>) -> Vec<Ipv6Network> {
    for n in &mut nets {
        *n = Ipv6Network::new(n.network(), n.prefix()).unwrap_or(*n);
    }
    nets.sort_by_key(|n| (n.network(), n.prefix()));
    let mut kept: Vec<Ipv6Network> = Vec::with_capacity(nets.len());
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

    fn nets(v: &[&str]) -> Vec<Ipv6Network> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn renders_an_ip6_table_with_collapsed_sets() {
        let r = Masquerade6Rules::new(
            nets(&["fd00:10:244::/64"]),
            nets(&[
                "fd00:10:244:1::/64",
                "fd00:10:244::/48",
                "fd00:172:30::11/128",
            ]),
            nets(&["fd00:10:244::/64", "fd00:10:244:1::/64"]),
        );
        assert_eq!(r.exempt, nets(&["fd00:10:244::/48", "fd00:172:30::11/128"]));
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
