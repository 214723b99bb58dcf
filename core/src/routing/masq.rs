//! Egress masquerade: pods → destinations outside the cluster leave with the node IP.
//!
//! Why nftables and not eBPF: a correct SNAT needs a connection table, port allocation that does
//! not collide with the node's own sockets, reverse translation of replies and ICMP errors, and
//! conntrack-aware expiry. netfilter's `masquerade` does all of it, in the kernel, for the rare
//! flows that leave the cluster (pod↔pod and pod↔node traffic, the hot paths, are never
//! translated and never touch this rule). The tc north-south programs already SNAT one kind of
//! flow in eBPF (NodePort traffic to a backend on another node, with its own CT entries, keeping
//! the client's port when it is free), but not pod egress; moving egress there too (Cilium's
//! `nodeport.h` + `snat.h`) would take netfilter off the node entirely. Until then this ruleset
//! is one table (`ip twill`), replaced atomically in one `nft -f` transaction, inside the node's
//! network namespace only.
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
use std::fmt::Write as _;

use ipnetwork::Ipv4Network;

/// nftables table (family `ip`) the agent owns entirely.
pub const NFT_TABLE: &str = "twill";

/// The masquerade ruleset as values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqueradeRules {
    /// Sources that are masqueraded: this node's pod CIDRs.
    pub sources: Vec<Ipv4Network>,
    /// Destinations reached untranslated: every pod CIDR, every node IP, the cluster CIDRs and
    /// the `--non-masquerade-cidrs`. Collapsed (no entry inside another) and sorted, because
    /// nftables rejects overlapping elements in an interval set.
    pub exempt: Vec<Ipv4Network>,
    /// Every pod CIDR of the cluster (and the cluster CIDRs): packets from one to another are
    /// not tracked.
    pub pod_cidrs: Vec<Ipv4Network>,
}

impl MasqueradeRules {
    pub fn new(
        sources: Vec<Ipv4Network>,
        exempt: Vec<Ipv4Network>,
        pod_cidrs: Vec<Ipv4Network>,
    ) -> Self {
        Self {
            sources: collapse(sources),
            exempt: collapse(exempt),
            pod_cidrs: collapse(pod_cidrs),
        }
    }

    /// The `nft -f` script: create-then-delete-then-define makes the whole replacement one
    /// transaction that works whether or not the table exists.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "table ip {NFT_TABLE}");
        let _ = writeln!(s, "delete table ip {NFT_TABLE}");
        let _ = writeln!(s, "table ip {NFT_TABLE} {{");
        for (name, set) in [
            ("pod_sources", &self.sources),
            ("no_masquerade", &self.exempt),
            ("pod_cidrs", &self.pod_cidrs),
        ] {
            let _ = write!(
                s,
                "\tset {name} {{\n\t\ttype ipv4_addr\n\t\tflags interval\n"
            );
            if !set.is_empty() {
                let elems: Vec<String> = set.iter().map(ToString::to_string).collect();
                let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
            }
            s.push_str("\t}\n");
        }
        s.push_str("\tchain prerouting_notrack {\n");
        s.push_str("\t\ttype filter hook prerouting priority raw; policy accept;\n");
        s.push_str("\t\tip saddr @pod_cidrs ip daddr @pod_cidrs notrack\n");
        s.push_str("\t}\n");
        s.push_str("\tchain postrouting {\n");
        s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        s.push_str("\t\tip saddr @pod_sources ip daddr != @no_masquerade masquerade\n");
        s.push_str("\t}\n}\n");
        s
    }

    /// The `nft -f` script that removes the agent's table (no error when it is absent).
    pub fn render_remove() -> String {
        format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")
    }
}

/// Drops every network contained in another one and sorts by address, in O(n log n): CIDR
/// blocks are either nested or disjoint, so after sorting by (start, prefix) a block is covered
/// by some earlier kept block exactly when it is covered by the last kept one.
fn collapse(mut nets: Vec<Ipv4Network>) -> Vec<Ipv4Network> {
    // Canonical form first, so 10.244.1.7/24 and 10.244.1.0/24 are the same element.
    for n in &mut nets {
        *n = Ipv4Network::new(n.network(), n.prefix()).unwrap_or(*n);
    }
    nets.sort_by_key(|n| (n.network(), n.prefix()));
    let mut kept: Vec<Ipv4Network> = Vec::with_capacity(nets.len());
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
            MasqueradeRules::render_remove(),
            "table ip twill\ndelete table ip twill\n"
        );
    }

    #[test]
    fn empty_sets_render_without_elements() {
        let r = MasqueradeRules::new(Vec::new(), Vec::new(), Vec::new()).render();
        assert!(!r.contains("elements"), "{r}");
    }
}
