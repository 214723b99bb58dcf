//! NetworkPolicy map keys and values (design and reasoning: `docs/design/policy.md`).
//!
//! ```text
//!  POLICY_ENDPOINTS  local pod IPv4 ──► PolicyEndpoint { ep_id, flags (isolation) }
//!  IPCACHE (LPM)     peer prefix    ──► PeerIdentity { id }   (pods /32, ipBlock regions)
//!  POLICY  (LPM)     (ep_id, direction, identity, proto, port prefix) ──► PolicyVerdict
//! ```
//!
//! IPv6 has twins of the first two (`POLICY_ENDPOINTS6`: a local pod's IPv6 address → the same
//! endpoint; `IPCACHE6`: IPv6 prefixes → identities from the same id space), and shares the
//! rule trie: a rule names an endpoint and an identity, whatever the family of the packet.

// Names, kernel types and sizes of these maps: `crate::catalogue`.

/// `PolicyEndpoint::flags`: the pod is selected by a policy with `Ingress` in its policyTypes,
/// so only allowed connections may reach it.
pub const PEP_F_INGRESS_ISOLATED: u32 = 1 << 0;
/// The pod is selected by a policy with `Egress` in its policyTypes.
pub const PEP_F_EGRESS_ISOLATED: u32 = 1 << 1;

/// Value of `POLICY_ENDPOINTS` (key: `u32` pod IPv4 address, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEndpoint {
    pub ep_id: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyEndpoint>() == 8);

/// Reserved identities. 0 appears only in `PolicyKey::identity_be` and means "any peer" (a rule
/// without `from`/`to`); it is never assigned to an address.
pub const IDENTITY_ANY: u32 = 0;
/// An address no `IPCACHE` entry covers: outside every ipBlock and not a known pod.
pub const IDENTITY_WORLD: u32 = 1;
/// This node's own addresses: always allowed into its pods (kubelet probes).
pub const IDENTITY_HOST: u32 = 2;
/// First identity the compiler assigns.
pub const IDENTITY_FIRST_ASSIGNED: u32 = 256;

/// Data of the `IPCACHE` LPM-trie key (after the trie's `prefix_len`, 0..=32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpCacheKey {
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<IpCacheKey>() == 4);

/// Data of the `IPCACHE6` LPM-trie key (after the trie's `prefix_len`, 0..=128): the IPv6 twin
/// of [`IpCacheKey`], the address in the maps' form (`crate::addr6_from_octets`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpCacheKey6 {
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<IpCacheKey6>() == 16);

/// Value of `IPCACHE` and `IPCACHE6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdentity {
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<PeerIdentity>() == 4);

/// `PolicyKey::direction`.
pub const POLICY_DIR_INGRESS: u8 = 0;
pub const POLICY_DIR_EGRESS: u8 = 1;

/// Prefix lengths of `POLICY` keys (bits of the key data, in field order).
/// Endpoint, direction and identity always match in full: a rule without `ports`.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 96;
/// ... plus the protocol: a rule for a protocol with no port (or every port).
pub const POLICY_PREFIX_ANY_PORT: u32 = 104;
/// ... plus `_pad2` (always 0) and the port: `POLICY_PREFIX_PORT_BASE + p` matches the top `p`
/// bits of `port_be`. A range `port..=endPort` decomposes into at most 30 such prefixes.
pub const POLICY_PREFIX_PORT_BASE: u32 = 112;

/// Data of the `POLICY` LPM-trie key. Field order is match order; the multi-byte fields are
/// big-endian so the trie's byte-wise prefix match reads them most significant bit first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub ep_id_be: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    pub identity_be: u32,
    pub proto: u8,
    pub _pad2: u8,
    pub port_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);

/// Value of `POLICY`: present = allowed. `rule_id` names the compiled rule that allows, so the
/// debug CLI and the denied-flow monitor can say which policy did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVerdict {
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyVerdict>() == 4);

/// `CtValue::flags` of `CT_SCOPE_POLICY` entries (high bits, apart from the NAT flags). One
/// entry per flow, keyed by the tuple as its originator sends it, records which of the two
/// judgements of the flow this node made and passed: when both pods are local, the same tuple is
/// judged by the client's egress and then by the server's ingress, and a pass of one must not
/// stand in for the other.
///
/// The originator's egress allowed the flow (or the originator is not egress-isolated). Replies
/// (the reverse tuple) may enter the originator; its later packets may leave it.
pub const CT_F_POLICY_EGRESS: u32 = 1 << 16;
/// The responder's ingress allowed the flow (or the responder is not ingress-isolated). The
/// flow's packets may enter the responder; its replies may leave it.
///
/// Policy entries follow the same `CtValue::state` machine as NAT entries (new, established
/// once a reply passed, closing after both FINs or a RST), so the one collector expires them.
pub const CT_F_POLICY_INGRESS: u32 = 1 << 17;

// The denied-flow stream's maps (`MAP_POLICY_EVENTS`, `MAP_POLICY_EVENT_BUDGET`) and its size
// (`POLICY_EVENTS_BYTES`) are catalogue entries (`crate::catalogue`), marked not pinned.
/// Events each CPU may write per second by default; the rest are counted in
/// `EventBudget::lost`. The agent's `--monitor-rate` sets it at load time through the program
/// global [`GLOBAL_MONITOR_RATE`].
pub const POLICY_EVENTS_PER_CPU_SECOND: u32 = 200;
/// Name of the kernel object's read-only global (a `u32`) holding the events each CPU may write
/// per second, patched by the loader (0: no events, every denied packet counted as lost).
pub const GLOBAL_MONITOR_RATE: &str = "TWL_MONITOR_RATE";

/// `PolicyDenyEvent::family`: the addresses are IPv4 (in the first word of each).
pub const EVENT_FAMILY_IPV4: u8 = 4;
/// `PolicyDenyEvent::family`: the addresses are IPv6 (the maps' word form,
/// `crate::addr6_from_octets`).
pub const EVENT_FAMILY_IPV6: u8 = 6;

/// One denied packet (a flow's first, or each retry: a dropped SYN is retransmitted), of either
/// family. Written straight into the ring buffer (reserved, filled, submitted), never built on
/// the programs' stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyDenyEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the packet was dropped.
    pub ktime_ns: u64,
    /// IPv4: the address in word 0, the rest 0; IPv6: all four words (see `family`).
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    /// Ports (0 for protocols without); for an ICMP error, the flow it quotes.
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `Reason` discriminant: `PolicyDeniedIngress` or `PolicyDeniedEgress`.
    pub reason: u8,
    /// `POLICY_DIR_INGRESS` / `POLICY_DIR_EGRESS`: the local pod's side.
    pub direction: u8,
    /// [`EVENT_FAMILY_IPV4`] or [`EVENT_FAMILY_IPV6`].
    pub family: u8,
    /// The local pod's endpoint id and the peer's identity (`IDENTITY_*` or an assigned one).
    pub ep_id: u32,
    pub peer_identity: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyDenyEvent>() == 56);

/// Value of [`crate::MAP_POLICY_EVENT_BUDGET`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventBudget {
    /// The second (`ktime / 1e9`) `used` counts in.
    pub second: u64,
    pub used: u32,
    pub _pad: u32,
    /// Events not written: over the budget, or the ring buffer was full.
    pub lost: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::PolicyEndpoint {}
    unsafe impl aya::Pod for super::IpCacheKey {}
    unsafe impl aya::Pod for super::IpCacheKey6 {}
    unsafe impl aya::Pod for super::PeerIdentity {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyVerdict {}
    unsafe impl aya::Pod for super::PolicyDenyEvent {}
    unsafe impl aya::Pod for super::EventBudget {}
}
