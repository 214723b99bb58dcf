//! eBPF host routing ("fast path") and eBPF masquerade: map names, keys and values
//! (design: `docs/benchmarks.md`, "How the fast path works").
//!
//! ```text
//!  LOCAL_ENDPOINTS  local pod IPv4 ──► LocalEndpoint { host veth ifindex, pod MAC, host MAC }
//!  LOCAL_ENDPOINTS6 local pod IPv6 ──► LocalEndpoint (the same value: one veth, one pod MAC)
//!  FASTPATH_CONFIG  [0] ──► FastPathConfig { flags, masquerade port range, node address }
//!  MASQ (LPM)       (kind, prefix) ──► 1: this node's pod CIDRs (sources that are masqueraded)
//!                   and the destinations reached untranslated (cluster, pod CIDRs, node IPs,
//!                   `--non-masquerade-cidrs`)
//! ```
//!
//! `LOCAL_ENDPOINTS` is written from the kernel's own view of the pod links (link, route and
//! neighbour dumps), not from the API server: it says where a pod's packets can be delivered on
//! this node, which the `POLICY_ENDPOINTS` of the policy compiler (from Pod objects) cannot.

// The maps themselves (names, types, sizes) are entries of `crate::catalogue`.

/// `LocalEndpoint::flags`: the pod-side MAC is known (learned from the host's neighbour entry
/// for the pod). Without it the pod is still an endpoint (its packets may be masqueraded) but
/// packets to it go through the stack, which resolves the MAC.
pub const LXC_F_MAC_KNOWN: u32 = 1 << 0;

/// Value of `LOCAL_ENDPOINTS` (key: `u32` pod IPv4 address, network order) and of
/// `LOCAL_ENDPOINTS6` (key: the pod IPv6 address as `addr6_from_octets` makes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalEndpoint {
    /// ifindex of the pod's host-side veth: `bpf_redirect_peer` target.
    pub ifindex: u32,
    pub flags: u32,
    /// The pod's own interface MAC: the destination of frames delivered into the pod.
    pub pod_mac: [u8; 6],
    /// The host-side veth's MAC: the source of those frames (the pod's gateway).
    pub host_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 20);

/// `FastPathConfig::flags`: packets of local pods are routed by the programs on their veths
/// (`bpf_redirect_peer` into local pods, `bpf_redirect_neigh` after a FIB lookup to the rest).
/// Without it every packet takes the stack, as before.
pub const FP_F_HOST_ROUTING: u32 = 1 << 0;
/// Pod traffic leaving the cluster is masqueraded by the devices' tc egress program.
pub const FP_F_MASQ_BPF: u32 = 1 << 1;
/// Pod traffic leaving the cluster is masqueraded by netfilter (`--masquerade-mode=nftables`):
/// such packets must take the stack, so the fast path leaves them to it.
pub const FP_F_MASQ_NFT: u32 = 1 << 2;

/// Single entry (index 0) of `FASTPATH_CONFIG`. All zero (nothing written yet): no host
/// routing, no masquerade.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FastPathConfig {
    pub flags: u32,
    /// Source ports the eBPF masquerade allocates, inclusive; the agent keeps them outside the
    /// node's ephemeral range (`net.ipv4.ip_local_port_range`) and reserves them
    /// (`ip_local_reserved_ports`), so a node socket never picks one.
    pub masq_port_min: u16,
    pub masq_port_max: u16,
}
const _: () = assert!(core::mem::size_of::<FastPathConfig>() == 8);

/// `MasqKey::kind`.
/// A source prefix whose packets are masqueraded when they leave the cluster: this node's pod
/// CIDRs.
pub const MASQ_KIND_SOURCE: u8 = 1;
/// A destination prefix reached untranslated.
pub const MASQ_KIND_EXEMPT: u8 = 2;
/// Bits of `MasqKey` before the address: the kind and its padding always match in full.
pub const MASQ_PREFIX_BASE: u32 = 32;

/// The NAT source ports, inclusive: the eBPF masquerade's and NodePort SNAT's (towards a backend
/// on another node), one range in the one conntrack table, so a port is unique per (node
/// address, peer address and port, protocol) whichever feature took it. Above Linux's default
/// ephemeral range (`ip_local_port_range` 32768–60999), and reserved by the agent at start
/// whatever the masquerade mode (`ip_local_reserved_ports`; released by `uninstall`), so the
/// kernel never gives a node socket one of them — also not to a process connecting later to a
/// peer a translated flow already uses from that port. Per peer address and port, as many
/// concurrent flows as the range holds.
pub const MASQ_PORT_MIN: u16 = 61_000;
pub const MASQ_PORT_MAX: u16 = 65_535;

/// `CtValue::flags` of the eBPF masquerade's NAT entries (next to `CT_F_REPLY`, `CT_F_SNAT`):
/// the flow belongs to a local pod (the original direction's source, the reply direction's
/// rewritten destination), not to a Service backend; the collector flushes it when that pod's
/// address is gone.
pub const CT_F_MASQ: u32 = 1 << 2;

/// Data of the `MASQ` LPM-trie key: a prefix `a.b.c.d/n` of `kind` is stored with
/// `prefix_len = MASQ_PREFIX_BASE + n`; the value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MasqKey {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<MasqKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::FastPathConfig {}
    unsafe impl aya::Pod for super::MasqKey {}
}

/// The IPv4 header checksum after the TTL went down by one, as the fast path forwards a packet
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`, `m` the TTL/protocol word, which drops by
/// 0x0100; so the one's complement sum gains 0x0100). Incremental, so the programs rewrite TTL
/// and checksum in one store instead of calling a checksum helper.
#[must_use]
pub const fn ttl_dec_csum(csum: u16) -> u16 {
    let sum = csum as u32 + 0x0100;
    // End-around carry: one's complement addition.
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = ((sum & 0xffff) + (sum >> 16)) as u16;
    folded
}

/// What replacing the 32-bit word `old` by `new` adds to a one's complement checksum, as an
/// unfolded partial sum of the kernel's `__wsum` kind (the words as they lie in memory, read
/// natively): for the checksum helpers' "by difference" mode (`bpf_l3_csum_replace` /
/// `bpf_l4_csum_replace` with field size 0), so several rewritten fields cost one helper call.
#[must_use]
pub const fn csum_diff32(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// [`csum_diff32`] of a 16-bit field (a port).
#[must_use]
pub const fn csum_diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

#[cfg(test)]
mod tests {
    use super::{csum_diff16, csum_diff32, ttl_dec_csum};

    /// One's complement sum of native 16-bit words, folded, then complemented: the Internet
    /// checksum of `b` (even length).
    fn inet_csum(b: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for w in b.chunks(2) {
            sum += u32::from(u16::from_ne_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).unwrap()
    }

    /// The kernel's `csum_replace_by_diff`: `fold(diff + ~sum)`, complemented.
    fn replace_by_diff(csum: u16, diff: u32) -> u16 {
        let mut sum = u64::from(diff) + u64::from(!csum);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).unwrap()
    }

    #[test]
    fn rewriting_addresses_and_ports_by_difference_matches_a_full_recomputation() {
        // A 12-byte span (two addresses, two ports) plus filler, rewritten many ways.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..100_000 {
            let (s, d) = (next(), next());
            let (sp, dp) = (
                u16::try_from(next() & 0xffff).unwrap(),
                u16::try_from(next() >> 16).unwrap(),
            );
            let filler = next().to_ne_bytes();
            let bytes = |s: u32, d: u32, sp: u16, dp: u16| {
                let mut b = [0u8; 16];
                let mut at = 0;
                let mut put = |v: &[u8]| {
                    b[at..at + v.len()].copy_from_slice(v);
                    at += v.len();
                };
                put(&s.to_ne_bytes());
                put(&d.to_ne_bytes());
                put(&sp.to_ne_bytes());
                put(&dp.to_ne_bytes());
                put(&filler);
                b
            };
            let before = inet_csum(&bytes(s, d, sp, dp));
            let (s2, d2, sp2, dp2) = (next(), d, sp, u16::try_from(next() & 0xffff).unwrap());
            let want = inet_csum(&bytes(s2, d2, sp2, dp2));
            let diff = csum_diff32(s, s2) + csum_diff16(dp, dp2);
            let got = replace_by_diff(before, diff);
            assert!(
                got == want || (got, want) == (0xffff, 0) || (got, want) == (0, 0xffff),
                "got {got:#06x} want {want:#06x}"
            );
        }
    }

    /// The RFC 791 header checksum of `h` (its checksum field taken as zero).
    fn csum(h: &[u8; 20]) -> u16 {
        let mut sum: u32 = 0;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).unwrap()
    }

    #[test]
    fn ttl_decrement_checksum_matches_a_full_recomputation() {
        // Headers whose checksums cover the whole range, wrap-arounds included.
        let mut h = [
            0x45, 0, 0, 41, 0, 0, 0x40, 0, 0, 6, 0, 0, 10, 244, 0, 5, 10, 244, 0, 6,
        ];
        for seed in 0u32..200_000 {
            h[4..6].copy_from_slice(&u16::try_from(seed & 0xffff).unwrap().to_be_bytes());
            h[8] = u8::try_from(2 + seed % 254).unwrap();
            h[2] = u8::try_from(seed >> 16).unwrap();
            let before = csum(&h);
            h[8] -= 1;
            let after = csum(&h);
            let got = ttl_dec_csum(before);
            // 0x0000 and 0xffff are the same one's complement value: a receiver's sum over the
            // header is 0xffff with either.
            assert!(
                got == after || (got, after) == (0xffff, 0) || (got, after) == (0, 0xffff),
                "checksum {before:#06x} ttl {}: got {got:#06x}, want {after:#06x}",
                h[8] + 1
            );
            h[8] += 1;
        }
    }
}
