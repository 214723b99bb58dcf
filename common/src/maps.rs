//! Map names, keys and values.
//!
//! The service tables are shared by every datapath: the socket-level hooks (connect, sendmsg,
//! recvmsg, getpeername; IPv4 and, for v4-mapped destinations, IPv6) and the per-packet tc
//! programs look up the same `SERVICES` entry and pick from the same `BACKEND_SLOTS`/`BACKENDS`.
//!
//! ```text
//!  SERVICES  (addr, port, proto, scope) ──► ServiceValue { svc_id, count, flags, affinity }
//!  SERVICES6 (addr6, port, proto, scope) ──► ServiceValue (the same value: IPv6 frontends)
//!  BACKEND_SLOTS (svc_id, slot 0..count) ──► backend_id
//!  BACKENDS  backend_id ──► Backend { addr, port, proto, flags }
//!  BACKENDS6 backend_id ──► Backend6 { addr6, port, proto, flags } (one id space with BACKENDS)
//!  AFFINITY  (client_id, svc_id) ──► { backend_id, last_used_ns }
//!  SOCK_REVNAT (socket cookie, backend addr, port) ──► frontend (addr, port)
//!  SOCK_REVNAT6 (socket cookie, backend addr6, port) ──► frontend (addr6, port)
//!  UDP_FLOWS (socket cookie, svc_id) ──► { backend_id, last_used_ns }: unconnected UDP stickiness
//!  CT        (saddr, daddr, sport, dport, proto, scope) ──► rewrite to (saddr', daddr', sport',
//!            dport'), flow state, last packet; one entry per direction of a per-packet
//!            (north-south) translated flow; expired by state (`ct_lifetime_ns`)
//!  LB_SRC_RANGES (LPM: svc_id, client prefix) ──► allowed (loadBalancerSourceRanges)
//!  LB_SRC_RANGES6 (LPM: svc_id, IPv6 client prefix) ──► allowed (the IPv6 ranges)
//!  FRAGS     (saddr, daddr, IP id, proto) ──► ports of a fragmented datagram's first fragment
//! ```

// Names, kernel types, key/value types and sizes of these maps: `crate::catalogue`.

/// An unconnected UDP socket keeps its backend for a frontend while it sends to it at least this
/// often (QUIC, SIP and TFTP exchanges pause far less; conntrack's UDP timeout is 30 s too).
pub const UDP_FLOW_TIMEOUT_S: u64 = 30;

/// IP protocol numbers as carried in `proto` fields (IANA).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Which traffic a `SERVICES` entry applies to. Most frontends are written once with
/// `SCOPE_ANY`. When a Service's traffic policies make the backend set depend on where the
/// traffic comes from (externalTrafficPolicy=Local, internalTrafficPolicy=Local), the compiler
/// writes two entries: `SCOPE_EXTERNAL` (traffic entering the node from outside: per-packet path)
/// and `SCOPE_INTERNAL` (traffic originating on this node: pods and host, socket path). Programs
/// look up their own scope first, then `SCOPE_ANY`.
pub const SCOPE_ANY: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;
pub const SCOPE_INTERNAL: u8 = 2;

/// Key of `SERVICES`: one Service frontend (ClusterIP, NodePort, External IP or LoadBalancer
/// ingress IP) with its port and protocol. NodePort frontends use `addr_be == 0`, meaning "any
/// address in `NODE_ADDRS`".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// `ServiceValue::flags` bits.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_F_NODEPORT: u16 = 1 << 1;
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_F_LOADBALANCER: u16 = 1 << 3;
/// sessionAffinity: ClientIP. `affinity_timeout_s` holds the timeout.
pub const SVC_F_AFFINITY: u16 = 1 << 4;
/// Only node-local backends are in the slot list (eTP/iTP=Local). With no local backend,
/// packets arriving from outside (tc path) are dropped, as kube-proxy drops them; a pod's or the
/// node's own connect() (socket path) is refused at once. Both count `NoLocalBackend`.
pub const SVC_F_LOCAL_ONLY: u16 = 1 << 5;
/// `loadBalancerSourceRanges` is set: check `LB_SRC_RANGES` before translating.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 6;
/// The backends are terminating ones used as a fallback (KEP-1669); informational.
pub const SVC_F_TERMINATING_FALLBACK: u16 = 1 << 7;

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Stable id of this frontend (and scope); keys `BACKEND_SLOTS` and `AFFINITY`.
    pub svc_id: u32,
    /// Number of usable backends: slots `0..backend_count` in `BACKEND_SLOTS`. Zero means the
    /// Service exists but has no usable endpoint: connections are refused.
    pub backend_count: u16,
    pub flags: u16,
    /// sessionAffinity timeout; meaningful with `SVC_F_AFFINITY`.
    pub affinity_timeout_s: u32,
    /// Size of the backend set's Maglev lookup table: slots `MAGLEV_SLOT_BASE..+maglev_size`
    /// of `BACKEND_SLOTS` (a prime, see `twill_core::maglev`). The per-packet path picks a new
    /// flow's backend there by the hash of its tuple, so a flow whose conntrack entry was lost
    /// returns to its backend while the set is unchanged, and only the flows of a backend that
    /// left move when it does. 0: no table (fewer than two backends, or a set no external
    /// frontend uses); the pick is then `hash % backend_count`. (Was padding, always 0, so
    /// values written before the field existed read as "no table".)
    pub maglev_size: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// The first `BACKEND_SLOTS` slot of a Maglev lookup table, above every slot of the backend
/// list (`backend_count` is a u16). One map holds both regions of a backend set: the list
/// `0..backend_count` (the socket path's uniform pick, affinity checks) and the table.
pub const MAGLEV_SLOT_BASE: u32 = 1 << 16;

/// murmur3's 32-bit finaliser: every input bit moves every output bit.
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A hash of a flow's 5-tuple (as the client sent it, network order). The per-packet path picks
/// a new flow's backend at `MAGLEV_SLOT_BASE + flow_hash(..) % maglev_size` (else
/// `% backend_count`) instead of at random, so a flow whose entry was lost (expired, flushed)
/// lands on the same backend again while the backend set is unchanged. Here, not in the kernel
/// crate, so tests predict the kernel's choice with the same function.
#[must_use]
pub const fn flow_hash(
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let ports = ((sport_be as u32) << 16) | dport_be as u32;
    fmix32(fmix32(fmix32(saddr_be) ^ daddr_be) ^ ports ^ ((proto as u32) << 24))
}

/// An IPv6 address (four network-order words, `addr6_from_octets`) folded to 32 bits.
const fn fold6(a: &[u32; 4]) -> u32 {
    fmix32(fmix32(fmix32(a[0]) ^ a[1]) ^ a[2]) ^ a[3]
}

/// [`flow_hash`] of an IPv6 flow: each address folded to 32 bits first, so both families pick
/// their backend the same way (and tests predict the kernel's choice with this function).
#[must_use]
pub const fn flow_hash6(
    saddr_be: &[u32; 4],
    daddr_be: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    flow_hash(fold6(saddr_be), fold6(daddr_be), sport_be, dport_be, proto)
}

impl ServiceValue {
    /// Whether this frontend reads `slot` of its `svc_id`: its backend list and its Maglev
    /// table.
    #[must_use]
    pub const fn reaches(&self, slot: u32) -> bool {
        slot < self.backend_count as u32
            || (slot >= MAGLEV_SLOT_BASE && slot - MAGLEV_SLOT_BASE < self.maglev_size)
    }

    /// Every slot this frontend reads (see [`ServiceValue::reaches`]).
    pub fn slots(&self) -> impl Iterator<Item = u32> + use<> {
        (0..u32::from(self.backend_count))
            .chain(MAGLEV_SLOT_BASE..MAGLEV_SLOT_BASE + self.maglev_size)
    }
}

/// Key of `BACKEND_SLOTS`: the `slot`-th backend of frontend `svc_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// `Backend::flags` bits.
pub const BE_F_LOCAL: u8 = 1 << 0;
pub const BE_F_TERMINATING: u8 = 1 << 1;

/// Value of `BACKENDS` (key: `u32` backend id, stable per (addr, port, proto)).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// Key of `AFFINITY`. `client_id` is the client's network-namespace cookie on the socket path
/// (every pod has its own netns, so this is per-pod like kube-proxy's per-client-IP affinity) and
/// `AFFINITY_CLIENT_IP | addr_be` (the client IPv4 address, network order) on the per-packet
/// path; the high bit keeps the two id spaces apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client_id: u64,
    pub svc_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Marks a per-packet (client IP) `AffinityKey::client_id`.
pub const AFFINITY_CLIENT_IP: u64 = 1 << 63;

/// Marks a per-packet IPv6 client's `AffinityKey::client_id` (both top bits: never an IPv4
/// client's [`AFFINITY_CLIENT_IP`] id, nor a socket cookie).
pub const AFFINITY_CLIENT_IP6: u64 = 3 << 62;

/// The `AffinityKey::client_id` of an IPv6 client on the per-packet path: its 128-bit address
/// hashed into the 62 bits below [`AFFINITY_CLIENT_IP6`] (the /64 prefix and the interface
/// identifier 31 bits each), as the key has 64 bits for IPv4's 32-bit address. Two clients
/// share stickiness only if both halves collide.
#[must_use]
pub const fn affinity_client6(addr_be: &[u32; 4]) -> u64 {
    let hi = fmix32(addr_be[0] ^ fmix32(addr_be[1])) as u64;
    let lo = fmix32(addr_be[2] ^ fmix32(addr_be[3])) as u64;
    AFFINITY_CLIENT_IP6 | (((hi << 32) | lo) & !AFFINITY_CLIENT_IP6)
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Slot of `backend_id` in `BACKEND_SLOTS` when the entry was written: checked first (one
    /// lookup) when validating that the remembered backend is still one of the Service's; only
    /// when the slots moved is the slot list scanned.
    pub slot_hint: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last use.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Key of `SOCK_REVNAT`: which frontend a socket's backend address stands for, so recvmsg4 and
/// getpeername4 can show the application the ClusterIP it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

/// Value of `SOCK_REVNAT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    pub frontend_addr_be: u32,
    pub frontend_port_be: u16,
    pub _pad: u16,
    /// Id of the frontend, so entries of a deleted Service can be found and flushed.
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 12);

/// Key of `UDP_FLOWS`: the datagrams an unconnected UDP socket sends to one frontend (`svc_id`)
/// are one flow and stay on one backend, so multi-datagram protocols (QUIC, SIP, TFTP) work.
/// The value is an [`AffinityValue`]: the remembered backend, its slot and the last use, with the
/// same checks (still a backend of the Service, not idle longer than `UDP_FLOW_TIMEOUT_S`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// `bpf_get_socket_cookie()` of the sending socket.
    pub cookie: u64,
    pub svc_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 16);

/// Value of `NODE_ADDRS` (key: `u32` address in network order): addresses NodePort answers on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddrValue {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<NodeAddrValue>() == 4);

/// Single entry (index 0) of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DatapathConfig {
    pub nodeport_min: u16,
    pub nodeport_max: u16,
    pub _pad: u32,
    /// Network-namespace cookie (`SO_NETNS_COOKIE`) of the node's own namespace, where the agent
    /// runs. Loopback NodePorts (`127.0.0.1:<nodePort>`) are translated only for sockets of that
    /// namespace: inside a pod, 127.0.0.1 is the pod itself. 0 (unknown) translates them nowhere.
    pub host_netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 16);

/// Key of `CT`: one direction of a translated north-south flow, as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Which feature owns the entry: `CT_SCOPE_NAT` (north-south translation) or
    /// `CT_SCOPE_POLICY` (a flow NetworkPolicy allowed). One table serves both, so the same
    /// tuple can be tracked by each without the entries colliding.
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// `CtKey::scope` values.
pub const CT_SCOPE_NAT: u8 = 0;
pub const CT_SCOPE_POLICY: u8 = 1;

/// `CtValue::flags` bits.
/// The entry translates replies (backend → client) rather than the original direction.
pub const CT_F_REPLY: u32 = 1 << 0;
/// The client's address is translated too (backend on another node, externalTrafficPolicy
/// Cluster), so replies return through this node.
pub const CT_F_SNAT: u32 = 1 << 1;

/// `CtValue::state`: where a flow is in its life. Both entries of a translated flow (original
/// and reply direction) carry the same state; the program that sees a transition writes both.
/// The meaning is the same for every `CtKey::scope`, so one collector expires every entry.
///
/// A flow whose opening packet was seen, but nothing from the other side yet (TCP: the SYN).
pub const CT_STATE_NEW: u8 = 1;
/// Packets were seen both ways (TCP: the SYN was answered).
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// TCP only: both sides sent a FIN. Kept briefly for the last ACK and retransmitted FINs; a
/// SYN reusing the tuple starts a new flow.
pub const CT_STATE_CLOSING: u8 = 3;

/// `CtValue::tcp_fin` bits: which side has sent a FIN.
pub const CT_FIN_ORIG: u8 = 1 << 0;
pub const CT_FIN_REPLY: u8 = 1 << 1;
/// Also in `CtValue::tcp_fin`: the original direction (the client) sent the first FIN. Its
/// peer (the backend, or the outside server of a masqueraded flow) then leaves the
/// connection on the last ACK without a TIME_WAIT, so the translated port may serve a new flow
/// as soon as the close is over (see [`ct_nat_port_reusable`]).
pub const CT_FIN_ORIG_FIRST: u8 = 1 << 2;

const NSEC_PER_SEC: u64 = 1_000_000_000;
/// TCP flow opened (SYN seen) but not answered: as long as a client keeps retrying its SYN.
pub const CT_LIFETIME_TCP_NEW_NS: u64 = 60 * NSEC_PER_SEC;
/// Idle established TCP flow: kube-proxy's `conntrack.tcpEstablishedTimeout` default (24 h),
/// so a long idle connection survives as it does with kube-proxy.
pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 24 * 3600 * NSEC_PER_SEC;
/// TCP flow closed by both sides (Cilium's `CT_CLOSE_TIMEOUT`): enough for the last ACK.
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * NSEC_PER_SEC;
/// UDP (and any other protocol) without an answer yet (netfilter's `udp_timeout`).
pub const CT_LIFETIME_DGRAM_NEW_NS: u64 = 30 * NSEC_PER_SEC;
/// UDP flow answered at least once (netfilter's `udp_timeout_stream`).
pub const CT_LIFETIME_DGRAM_ESTABLISHED_NS: u64 = 120 * NSEC_PER_SEC;
/// How quiet a TCP flow closed by its client must be before its translated port is reused:
/// the last ACK (and a retransmitted FIN, whose first retransmission timeout is 200 ms) is
/// over by then, so the peer holds nothing of the old connection.
pub const CT_NAT_PORT_QUIET_NS: u64 = NSEC_PER_SEC;

/// How long an entry in `state` of protocol `proto` lives after its last packet. Unknown
/// states get the short lifetime of a new flow.
pub const fn ct_lifetime_ns(proto: u8, state: u8) -> u64 {
    if proto == PROTO_TCP {
        match state {
            CT_STATE_ESTABLISHED => CT_LIFETIME_TCP_ESTABLISHED_NS,
            CT_STATE_CLOSING => CT_LIFETIME_TCP_CLOSING_NS,
            _ => CT_LIFETIME_TCP_NEW_NS,
        }
    } else if state == CT_STATE_ESTABLISHED {
        CT_LIFETIME_DGRAM_ESTABLISHED_NS
    } else {
        CT_LIFETIME_DGRAM_NEW_NS
    }
}

/// Whether the entry of a translated flow (`proto`, its `state`, `tcp_fin` and last packet
/// time) no longer holds its port at `now`, so a new flow needing that port may take it over:
/// - expired (what the agent's collector would remove on its next pass), or
/// - a TCP flow that its client closed first and that has been quiet for
///   [`CT_NAT_PORT_QUIET_NS`]. Netfilter's NAT reuses the tuple of such a TIME_WAIT flow too.
///   Without it a port stays taken for the whole closing lifetime, which caps a node at a few
///   hundred new connections per second to one backend (the range is 4,536 ports).
///
/// A flow that the peer closed first is not reused early: the peer's TIME_WAIT could answer a
/// new SYN on the same tuple with an ACK, which the new client would reset.
pub const fn ct_nat_port_reusable(
    proto: u8,
    state: u8,
    tcp_fin: u8,
    last_seen_ns: u64,
    now: u64,
) -> bool {
    let idle = now.saturating_sub(last_seen_ns);
    idle > ct_lifetime_ns(proto, state)
        || (proto == PROTO_TCP
            && state == CT_STATE_CLOSING
            && tcp_fin & CT_FIN_ORIG_FIRST != 0
            && idle >= CT_NAT_PORT_QUIET_NS)
}

/// Value of `CT`: the addresses and ports a matching packet is rewritten to (all network order),
/// and the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub new_saddr_be: u32,
    pub new_daddr_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub svc_id: u32,
    pub flags: u32,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_FIN_*` (TCP).
    pub tcp_fin: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns()` of the last packet matching this entry (best effort: not updated
    /// atomically). The flow expires `ct_lifetime_ns` after the later of its two entries'.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 32);

impl CtKey {
    /// The key of the other direction of the flow `value` translates: the packet `value`
    /// produces, answered. (The two entries of a translated flow map to each other this way;
    /// for an untranslated entry it is simply the reversed tuple.)
    #[must_use]
    pub const fn counterpart(&self, value: &CtValue) -> CtKey {
        CtKey {
            saddr_be: value.new_daddr_be,
            daddr_be: value.new_saddr_be,
            sport_be: value.new_dport_be,
            dport_be: value.new_sport_be,
            proto: self.proto,
            scope: self.scope,
            _pad: [0; 2],
        }
    }

    /// The same flow seen from the other side: addresses and ports swapped (the counterpart of
    /// an entry that translates nothing).
    #[must_use]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            saddr_be: self.daddr_be,
            daddr_be: self.saddr_be,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            scope: self.scope,
            _pad: [0; 2],
        }
    }
}

/// Data of the `LB_SRC_RANGES` LPM-trie key (after the trie's `prefix_len`): the Service's
/// `svc_id` (always matched in full) then the client prefix. A range `a.b.c.d/n` of Service `s`
/// is stored with `prefix_len = 32 + n`; the value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// Big-endian so the trie's byte-wise prefix match covers it as a whole.
    pub svc_id_be: u32,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRangeKey>() == 8);

/// Data of the `LB_SRC_RANGES6` LPM-trie key: the IPv6 twin of [`SrcRangeKey`] (the same
/// Service id first, then the client prefix as four network-order words). A range `p/n` of
/// Service `s` is stored with `prefix_len = 32 + n`; a lookup uses all 160 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey6 {
    /// Big-endian, as [`SrcRangeKey::svc_id_be`].
    pub svc_id_be: u32,
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SrcRangeKey6>() == 20);

/// Key of `FRAGS`: one fragmented IPv4 datagram as it arrived, identified as RFC 791 does
/// (source, destination, protocol, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// Value of `FRAGS`: the ports of the datagram's first fragment, so its later fragments (which
/// carry no TCP/UDP header) find the flow and follow the first one's translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 4);

/// Key of `SERVICES6`: an IPv6 Service frontend (the twin of [`ServiceKey`]; its value is the
/// same [`ServiceValue`], so everything after the frontend lookup is one code path keyed by
/// `svc_id`). The address is in network order, as the kernel's `bpf_sock_addr.user_ip6` holds
/// it: four big-endian words. Twins rather than one 16-byte key for both families so that the
/// IPv4 hooks, which run on every connect(), keep hashing 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);

/// Value of `BACKENDS6` (key: `u32` backend id, from the same id space as `BACKENDS`, so a
/// `BACKEND_SLOTS` entry names one backend of one family): an IPv6 backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend6 {
    /// Network order, as [`ServiceKey6::addr_be`].
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

/// Key of `SOCK_REVNAT6`: the IPv6 twin of [`SockRevNatKey`] (recvmsg6 and getpeername6 show the
/// IPv6 ClusterIP the application asked for).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey6 {
    pub cookie: u64,
    pub backend_addr_be: [u32; 4],
    pub backend_port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey6>() == 32);

/// Value of `SOCK_REVNAT6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatValue6 {
    pub frontend_addr_be: [u32; 4],
    pub frontend_port_be: u16,
    pub _pad: u16,
    /// Id of the frontend's backend set, as in [`SockRevNatValue::svc_id`].
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue6>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::NodeAddrValue {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::SrcRangeKey {}
    unsafe impl aya::Pod for super::SrcRangeKey6 {}
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::SockRevNatKey6 {}
    unsafe impl aya::Pod for super::SockRevNatValue6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_affinity_ids_never_meet_ipv4_ones_and_differ_per_client() {
        let a =
            crate::addr6_from_octets([0xfd, 0, 0x17, 0x2, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        let mut b = a;
        b[3] ^= 1;
        let id = affinity_client6(&a);
        assert_eq!(id & AFFINITY_CLIENT_IP6, AFFINITY_CLIENT_IP6);
        // IPv4 ids are `AFFINITY_CLIENT_IP | addr`: bit 62 clear.
        assert_ne!(id & AFFINITY_CLIENT_IP6, AFFINITY_CLIENT_IP);
        assert_ne!(id, affinity_client6(&b));
        assert_eq!(id, affinity_client6(&a));
    }

    #[test]
    fn ipv6_flow_hash_depends_on_every_address_word() {
        let s = [1, 2, 3, 4];
        let d = [5, 6, 7, 8];
        let h = flow_hash6(&s, &d, 1000, 80, 6);
        for i in 0..4 {
            let mut s2 = s;
            s2[i] ^= 1;
            assert_ne!(h, flow_hash6(&s2, &d, 1000, 80, 6), "word {i}");
            let mut d2 = d;
            d2[i] ^= 1;
            assert_ne!(h, flow_hash6(&s, &d2, 1000, 80, 6), "word {i}");
        }
        assert_ne!(h, flow_hash6(&s, &d, 1001, 80, 6));
    }
}
