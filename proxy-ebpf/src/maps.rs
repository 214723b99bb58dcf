//! Map definitions: one static per entry of `twill_common::catalogue`, named like the entry, of
//! its type, key and value, sized by its `DEFAULT_*` constant (the agent's unit test
//! `kernel_object_maps_match_the_catalogue` checks the built object against the catalogue).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use twill_common::{
    AffinityKey, AffinityValue, Backend, Backend6, CtKey, CtKey6, CtValue, CtValue6,
    DEFAULT_AFFINITY_MAX, DEFAULT_BACKEND_SLOTS_MAX, DEFAULT_BACKENDS_MAX, DEFAULT_BACKENDS6_MAX,
    DEFAULT_CT_MAX, DEFAULT_CT6_MAX, DEFAULT_FRAGS_MAX, DEFAULT_FRAGS6_MAX,
    DEFAULT_IPCACHE_HOSTS_MAX, DEFAULT_IPCACHE_HOSTS6_MAX, DEFAULT_IPCACHE_MAX,
    DEFAULT_IPCACHE6_MAX, DEFAULT_LB_SRC_RANGES_MAX, DEFAULT_LOCAL_ENDPOINTS_MAX,
    DEFAULT_LOCAL_ENDPOINTS6_MAX, DEFAULT_MASQ_PREFIXES_MAX, DEFAULT_MASQ6_PREFIXES_MAX,
    DEFAULT_NODE_ADDRS_MAX, DEFAULT_POLICY_ENDPOINTS_MAX, DEFAULT_POLICY_ENDPOINTS6_MAX,
    DEFAULT_POLICY_MAX, DEFAULT_SERVICES_MAX, DEFAULT_SERVICES6_MAX, DEFAULT_SOCK_REVNAT_MAX,
    DEFAULT_SOCK_REVNAT6_MAX, DEFAULT_UDP_FLOWS_MAX, DatapathConfig, EventBudget, FastPathConfig,
    FragKey, FragKey6, FragValue, IpCacheKey, IpCacheKey6, LocalEndpoint, MasqKey, MasqKey6,
    NodeAddrValue, POLICY_EVENT_BUDGET_ENTRIES, POLICY_EVENTS_BYTES, PeerIdentity, PolicyEndpoint,
    PolicyKey, PolicyVerdict, Reason, STATS_MAX, ServiceKey, ServiceKey6, ServiceValue, SlotKey,
    SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6, SrcRangeKey, SrcRangeKey6,
    UdpFlowKey,
};

#[map]
pub static TWL_SVC_V1: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES_MAX, 0);

#[map]
pub static TWL_SLOT_V1: HashMap<SlotKey, u32> =
    HashMap::with_max_entries(DEFAULT_BACKEND_SLOTS_MAX, 0);

#[map]
pub static TWL_BE_V1: HashMap<u32, Backend> = HashMap::with_max_entries(DEFAULT_BACKENDS_MAX, 0);

// LRU: affinity entries expire by time, and under pressure the least recently used client loses
// its stickiness rather than new clients failing.
#[map]
pub static TWL_AFF_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_MAX, 0);

// LRU: one entry per (socket, backend); sockets close without telling us, so old entries must be
// evictable.
#[map]
pub static TWL_SKRNAT_V1: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT_MAX, 0);

// LRU: one entry per (unconnected UDP socket, frontend); sockets close without telling us, and
// under pressure the least recently used flow loses its stickiness rather than new flows failing.
#[map]
pub static TWL_UDPFLOW_V1: LruHashMap<UdpFlowKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_UDP_FLOWS_MAX, 0);

// IPv6 Services (docs/design/dualstack.md): the frontend and backend twins of TWL_SVC_V1 and
// TWL_BE_V1 (same value type, one backend id space), and the socket reverse NAT of IPv6
// frontends (LRU, as TWL_SKRNAT_V1).
#[map]
pub static TWL_SVC6_V1: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES6_MAX, 0);

#[map]
pub static TWL_BE6_V1: HashMap<u32, Backend6> = HashMap::with_max_entries(DEFAULT_BACKENDS6_MAX, 0);

#[map]
pub static TWL_SKRNAT6_V1: LruHashMap<SockRevNatKey6, SockRevNatValue6> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT6_MAX, 0);

#[map]
pub static TWL_NODEIP_V1: HashMap<u32, NodeAddrValue> =
    HashMap::with_max_entries(DEFAULT_NODE_ADDRS_MAX, 0);

#[map]
pub static TWL_CFG_V2: Array<DatapathConfig> = Array::with_max_entries(1, 0);

// A plain hash, not an LRU: eviction would push out live flows (an established connection
// whose entry is evicted is reset). Entries expire by state (`ct_lifetime_ns`) and are
// collected by the agent; a full table drops new flows with `CtMapFull`.
#[map]
pub static TWL_CT_V2: HashMap<CtKey, CtValue> = HashMap::with_max_entries(DEFAULT_CT_MAX, 0);

// LpmTrie adds the BPF_F_NO_PREALLOC the kernel requires for tries.
#[map]
pub static TWL_LBSRC_V1: LpmTrie<SrcRangeKey, u8> =
    LpmTrie::with_max_entries(DEFAULT_LB_SRC_RANGES_MAX, 0);

// Its IPv6 twin: the IPv6 ranges of IPv6 LoadBalancer IPs (`ns6.rs`).
#[map]
pub static TWL_LBSRC6_V1: LpmTrie<SrcRangeKey6, u8> =
    LpmTrie::with_max_entries(twill_common::DEFAULT_LB_SRC_RANGES6_MAX, 0);

// LRU: a datagram's fragments follow each other within milliseconds; nothing tells us when the
// last one passed, so old entries are simply pushed out.
#[map]
pub static TWL_FRAG_V1: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGS_MAX, 0);

// The IPv6 twin (`nat6.rs`), LRU for the same reason.
#[map]
pub static TWL_FRAG6_V1: LruHashMap<FragKey6, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGS6_MAX, 0);
// NetworkPolicy (docs/design/policy.md): local pods, peer identities by prefix, and the allowed
// (endpoint, direction, identity, protocol, port) prefixes.
#[map]
pub static TWL_PEP_V1: HashMap<u32, PolicyEndpoint> =
    HashMap::with_max_entries(DEFAULT_POLICY_ENDPOINTS_MAX, 0);

#[map]
pub static TWL_IPC_V1: LpmTrie<IpCacheKey, PeerIdentity> =
    LpmTrie::with_max_entries(DEFAULT_IPCACHE_MAX, 0);

// The host-length (/32) part of the ipcache, looked up before the trie (`policy::identity`).
// Not preallocated: kernel memory follows the cluster's pods, as the trie's does, not the
// flag's maximum.
#[map]
pub static TWL_IPCH_V1: HashMap<IpCacheKey, PeerIdentity> =
    HashMap::with_max_entries(DEFAULT_IPCACHE_HOSTS_MAX, BPF_F_NO_PREALLOC);

#[map]
pub static TWL_POL_V1: LpmTrie<PolicyKey, PolicyVerdict> =
    LpmTrie::with_max_entries(DEFAULT_POLICY_MAX, 0);

// Their IPv6 twins (`twill_common::policy`): a local pod's IPv6 address → its endpoint, IPv6
// prefixes → identities; the rule trie above serves both families.
#[map]
pub static TWL_PEP6_V1: HashMap<[u32; 4], PolicyEndpoint> =
    HashMap::with_max_entries(DEFAULT_POLICY_ENDPOINTS6_MAX, 0);

#[map]
pub static TWL_IPC6_V1: LpmTrie<IpCacheKey6, PeerIdentity> =
    LpmTrie::with_max_entries(DEFAULT_IPCACHE6_MAX, 0);

#[map]
pub static TWL_IPCH6_V1: HashMap<IpCacheKey6, PeerIdentity> =
    HashMap::with_max_entries(DEFAULT_IPCACHE_HOSTS6_MAX, BPF_F_NO_PREALLOC);

// The denied-flow stream (`debug monitor`) and its per-CPU budget; catalogue entries marked
// not pinned (see `twill_common::MapKind::PolicyEvents`).
#[map]
pub static TWL_PEV_V1: RingBuf = RingBuf::with_byte_size(POLICY_EVENTS_BYTES, 0);

#[map]
pub static TWL_PEVB_V1: PerCpuArray<EventBudget> =
    PerCpuArray::with_max_entries(POLICY_EVENT_BUDGET_ENTRIES, 0);

#[map]
pub static TWL_STATS_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_MAX, 0);

/// Counts one occurrence of `reason` on this CPU.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = TWL_STATS_V1.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

// Filled by the agent for one socket-iterator sweep, then emptied (see `sockiter`); not pinned.
#[map]
pub static TWL_SKDEST_V1: HashMap<twill_common::SockDestroyKey, u8> =
    HashMap::with_max_entries(twill_common::DEFAULT_SOCK_DESTROY_MAX, 0);

// eBPF host routing and masquerade (twill_common::fastpath): local pods (per family) as the
// kernel's links show them, the switches, and the masquerade's source and exempt prefixes.
#[map]
pub static TWL_LXC_V1: HashMap<u32, LocalEndpoint> =
    HashMap::with_max_entries(DEFAULT_LOCAL_ENDPOINTS_MAX, 0);

#[map]
pub static TWL_LXC6_V1: HashMap<[u32; 4], LocalEndpoint> =
    HashMap::with_max_entries(DEFAULT_LOCAL_ENDPOINTS6_MAX, 0);

#[map]
pub static TWL_FPCFG_V1: Array<FastPathConfig> = Array::with_max_entries(1, 0);

#[map]
pub static TWL_MASQ_V1: LpmTrie<MasqKey, u8> =
    LpmTrie::with_max_entries(DEFAULT_MASQ_PREFIXES_MAX, 0);

// IPv6 twins of the conntrack table and the masquerade trie (`twill_common::ct6`): a plain
// hash for the same reason as `TWL_CT_V2`.
#[map]
pub static TWL_CT6_V1: HashMap<CtKey6, CtValue6> = HashMap::with_max_entries(DEFAULT_CT6_MAX, 0);

#[map]
pub static TWL_MASQ6_V1: LpmTrie<MasqKey6, u8> =
    LpmTrie::with_max_entries(DEFAULT_MASQ6_PREFIXES_MAX, 0);

// IPv6 twin of TWL_NODEIP_V1: the addresses IPv6 NodePort frontends answer on (`ns6.rs`).
#[map]
pub static TWL_NODEIP6_V1: HashMap<[u32; 4], NodeAddrValue> =
    HashMap::with_max_entries(twill_common::DEFAULT_NODE_ADDRS6_MAX, 0);
