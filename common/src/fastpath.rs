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
