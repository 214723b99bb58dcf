//! The catalogue of maps: each eBPF map's pinned name, kernel map type, key and value types,
//! default size, size flag and whether it is pinned, written once, in the [`catalogue!`] invocation at the end of this
//! file. Everything else is derived from it:
//!
//! - the `MAP_*` name constants and `DEFAULT_*` size constants (the kernel definitions use the
//!   sizes, the agent the names),
//! - [`MapKind`] (errors, metric labels, the seams' fault injectors), with [`MapKind::name`] and
//!   [`MapKind::spec`],
//! - [`ALL_MAPS`] (the agent's load-time check that the object defines every map) and
//!   [`MapKind::pinned`] (what the agent pins, adopts and uninstalls: every map but those marked
//!   `pinned: false`),
//! - the agent's expected layouts (load-time and adoption checks of pinned maps against
//!   [`MapSpec`]; the test that parses the kernel object checks every map, pinned or not),
//! - [`MapSizes`] and the agent's `--map-size-*` flags and config-file keys (one per map with a
//!   [`MapSpec::size_flag`]),
//! - the marker types in [`def`], whose [`MapDef::Key`]/[`MapDef::Value`] the agent's typed map
//!   handles are built from, so a handle of the wrong type does not compile.
//!
//! ## Adding a map
//! 1. Add one entry to the [`catalogue!`] invocation below (name with a `_V1` suffix, type,
//!    key/value types defined in this crate, default size, and a `flag` unless the size is
//!    fixed by the layout; `pinned: false` for a map each agent makes afresh).
//! 2. Define the map in `proxy-ebpf/src/maps.rs` as a static named exactly like the entry's
//!    name, of the entry's type, with `DEFAULT_*` as its size.
//!
//! Nothing else: the agent creates, pins, adopts, checks, sizes (flag and config key) and
//! uninstalls it from this entry, and refuses to start when the kernel object's definition
//! disagrees with it (name, type, key or value size).
//!
//! BPF object names are limited to 15 bytes plus NUL (`BPF_OBJ_NAME_LEN`), so names stay short;
//! a layout change bumps the name's suffix (`_V2`) so a restarted agent never reinterprets old
//! bytes, and the old name goes to [`RETIRED_MAPS`].
use core::mem::size_of;

use crate::{
    AffinityKey, AffinityValue, Backend, CtKey, CtKey6, CtValue, CtValue6, DatapathConfig,
    EventBudget, FastPathConfig, FragKey, FragKey6, FragValue, IpCacheKey, IpCacheKey6,
    LocalEndpoint, MasqKey, MasqKey6, NodeAddrValue, PeerIdentity, PolicyEndpoint, PolicyKey,
    PolicyVerdict, ServiceKey, ServiceValue, SlotKey, SockDestroyKey, SockRevNatKey,
    SockRevNatValue, SrcRangeKey, UdpFlowKey,
};
use crate::{Backend6, ServiceKey6, SockRevNatKey6, SockRevNatValue6, SrcRangeKey6};

/// The kernel map types Twill uses (`enum bpf_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BpfMapType {
    Hash,
    Array,
    PerCpuArray,
    LruHash,
    /// Keys are `struct bpf_lpm_trie_key`: a `u32` prefix length, then the catalogue's key type.
    LpmTrie,
    /// No key or value (the catalogue's are `()`); the size is the buffer's bytes.
    RingBuf,
}

impl BpfMapType {
    /// The kernel's key size for a catalogue key type of `data` bytes.
    pub const fn key_size(self, data: usize) -> usize {
        match self {
            BpfMapType::LpmTrie => size_of::<u32>() + data,
            _ => data,
        }
    }
}

/// One entry of the catalogue, as the agent checks and sizes the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub kind: MapKind,
    /// Pinned name, and the name of the kernel crate's static.
    pub name: &'static str,
    pub map_type: BpfMapType,
    /// Key size as the kernel sees it (LPM tries: with the prefix length).
    pub key_size: usize,
    pub value_size: usize,
    /// `max_entries` unless the operator sets another.
    pub default_size: u32,
    /// `map-size-…`: the agent flag (and config-file key) that sets `max_entries`; `None` when
    /// the size is fixed by the layout (an array indexed by something of known range).
    pub size_flag: Option<&'static str>,
    /// Help text of the flag.
    pub size_help: &'static str,
    /// Pinned on bpffs and adopted by the next agent (contents kept across restarts). `false`
    /// for a map each agent makes afresh and reads itself: never pinned, adopted or uninstalled.
    pub pinned: bool,
}

/// A map's key and value types, for typed handles (`aya::maps::HashMap<_, D::Key, D::Value>`).
pub trait MapDef {
    const KIND: MapKind;
    type Key: Copy;
    type Value: Copy;
}

/// `max_entries` of every map, indexed by [`MapKind`]; defaults from the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes([u32; MapKind::COUNT]);

impl Default for MapSizes {
    fn default() -> Self {
        let mut sizes = [0; MapKind::COUNT];
        let mut i = 0;
        while i < MapKind::COUNT {
            sizes[i] = MapKind::ALL[i].spec().default_size;
            i += 1;
        }
        Self(sizes)
    }
}

impl MapSizes {
    /// The size `kind` is created with.
    pub const fn get(&self, kind: MapKind) -> u32 {
        self.0[kind as usize]
    }

    /// With `kind` sized `max_entries`. A map without a size flag keeps its fixed size: the
    /// programs index it by values of a known range.
    #[must_use]
    pub const fn with(mut self, kind: MapKind, max_entries: u32) -> Self {
        if kind.spec().size_flag.is_some() {
            self.0[kind as usize] = max_entries;
        }
        self
    }
}

/// Writes the catalogue's derived items from one table (see the module doc).
macro_rules! catalogue {
    ($(
        $(#[doc = $doc:literal])*
        $kind:ident {
            name: $name_const:ident = $name:literal,
            map_type: $map_type:ident,
            key: $key:ty,
            value: $value:ty,
            size: $size_const:ident = $size:expr,
            $(flag: $flag:literal, help: $help:literal,)?
            $(pinned: $pinned:literal,)?
        }
    )*) => {
        $(
            #[doc = concat!("Pinned name of [`MapKind::", stringify!($kind), "`].")]
            pub const $name_const: &str = $name;
            #[doc = concat!("Default `max_entries` of [`MapKind::", stringify!($kind), "`].")]
            pub const $size_const: u32 = $size;
        )*

        /// Which map: errors, metric labels (with [`MapKind::name`]) and the seams' fault
        /// injectors name maps by it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum MapKind {
            $( $(#[doc = $doc])* $kind, )*
        }

        impl MapKind {
            /// Every map, in catalogue order.
            pub const ALL: &[MapKind] = &[$(MapKind::$kind),*];
            pub const COUNT: usize = Self::ALL.len();

            /// The catalogue entry.
            pub const fn spec(self) -> MapSpec {
                match self {
                    $(MapKind::$kind => MapSpec {
                        kind: MapKind::$kind,
                        name: $name,
                        map_type: BpfMapType::$map_type,
                        key_size: BpfMapType::$map_type.key_size(size_of::<$key>()),
                        value_size: size_of::<$value>(),
                        default_size: $size,
                        size_flag: catalogue!(@opt $($flag)?),
                        size_help: catalogue!(@str $($help)?),
                        pinned: catalogue!(@pinned $($pinned)?),
                    },)*
                }
            }

            /// Pinned name (also the kernel static's name).
            pub const fn name(self) -> &'static str {
                self.spec().name
            }

            /// The maps the agent pins, adopts and uninstalls, in catalogue order.
            pub fn pinned() -> impl Iterator<Item = MapKind> {
                Self::ALL.iter().copied().filter(|k| k.spec().pinned)
            }
        }

        /// Every map the kernel object must define (pinned or not), in catalogue order.
        pub const ALL_MAPS: &[&str] = &[$($name),*];

        /// One marker type per map, carrying its key and value types.
        pub mod def {
            use super::*;
            $(
                #[doc = concat!("[`MapKind::", stringify!($kind), "`].")]
                pub struct $kind;
                impl MapDef for $kind {
                    const KIND: MapKind = MapKind::$kind;
                    type Key = $key;
                    type Value = $value;
                }
            )*
        }
    };
    (@opt) => { None };
    (@opt $flag:literal) => { Some($flag) };
    (@str) => { "" };
    (@str $help:literal) => { $help };
    (@pinned) => { true };
    (@pinned $pinned:literal) => { $pinned };
}

/// Pinned map names of earlier layouts, which no program uses any more: `uninstall` removes
/// them too, so an upgraded node keeps no stale pin.
pub const RETIRED_MAPS: &[&str] = &["TWL_CFG_V1", "TWL_CT_V1"];

catalogue! {
    /// Service frontends: (address, port, protocol, scope) → the frontend's id and backends.
    Services {
        name: MAP_SERVICES = "TWL_SVC_V1",
        map_type: Hash,
        key: ServiceKey,
        value: ServiceValue,
        size: DEFAULT_SERVICES_MAX = 65_536,
        flag: "map-size-services", help: "Max entries of the services map",
    }
    /// (frontend id, slot) → backend id.
    BackendSlots {
        name: MAP_BACKEND_SLOTS = "TWL_SLOT_V1",
        map_type: Hash,
        key: SlotKey,
        value: u32,
        size: DEFAULT_BACKEND_SLOTS_MAX = 262_144,
        flag: "map-size-backend-slots", help: "Max entries of the backend slots map",
    }
    /// Backend id → backend address, port, protocol and flags.
    Backends {
        name: MAP_BACKENDS = "TWL_BE_V1",
        map_type: Hash,
        key: u32,
        value: Backend,
        size: DEFAULT_BACKENDS_MAX = 131_072,
        flag: "map-size-backends", help: "Max entries of the backends map",
    }
    /// Session affinity (LRU: under pressure the least recently used client loses stickiness).
    Affinity {
        name: MAP_AFFINITY = "TWL_AFF_V1",
        map_type: LruHash,
        key: AffinityKey,
        value: AffinityValue,
        size: DEFAULT_AFFINITY_MAX = 65_536,
        flag: "map-size-affinity", help: "Max entries of the session affinity map",
    }
    /// Socket reverse NAT (LRU): which frontend a socket's backend stands for.
    SockRevNat {
        name: MAP_SOCK_REVNAT = "TWL_SKRNAT_V1",
        map_type: LruHash,
        key: SockRevNatKey,
        value: SockRevNatValue,
        size: DEFAULT_SOCK_REVNAT_MAX = 262_144,
        flag: "map-size-sock-revnat", help: "Max entries of the socket reverse-NAT map",
    }
    /// Addresses NodePort frontends answer on.
    NodeAddrs {
        name: MAP_NODE_ADDRS = "TWL_NODEIP_V1",
        map_type: Hash,
        key: u32,
        value: NodeAddrValue,
        size: DEFAULT_NODE_ADDRS_MAX = 256,
        flag: "map-size-node-addrs", help: "Max entries of the NodePort addresses map",
    }
    /// IPv6 twin of [`MapKind::NodeAddrs`]: the IPv6 addresses (four network-order words, as
    /// `addr6_from_octets` makes them) NodePort frontends answer on.
    NodeAddrs6 {
        name: MAP_NODE_ADDRS6 = "TWL_NODEIP6_V1",
        map_type: Hash,
        key: [u32; 4],
        value: NodeAddrValue,
        size: DEFAULT_NODE_ADDRS6_MAX = 256,
        flag: "map-size-node-addrs6", help: "Max entries of the IPv6 NodePort addresses map",
    }
    /// The datapath configuration (one entry). V2: `DatapathConfig` grew `host_netns_cookie`
    /// (8 → 16 bytes).
    Config {
        name: MAP_CONFIG = "TWL_CFG_V2",
        map_type: Array,
        key: u32,
        value: DatapathConfig,
        size: CONFIG_ENTRIES = 1,
    }
    /// Per-CPU verdict and drop counters, one slot per `Reason` discriminant value.
    Stats {
        name: MAP_STATS = "TWL_STATS_V1",
        map_type: PerCpuArray,
        key: u32,
        value: u64,
        size: STATS_MAX = 256,
    }
    /// Per-packet connection tracking: north-south translation and NetworkPolicy flows, two
    /// entries per translated flow (one per direction). V2: a plain hash (was LRU) whose value
    /// carries the TCP state; a V1 pin is never adopted.
    Ct {
        name: MAP_CT = "TWL_CT_V2",
        map_type: Hash,
        key: CtKey,
        value: CtValue,
        size: DEFAULT_CT_MAX = 262_144,
        flag: "map-size-ct",
        help: "Max entries of the per-packet connection-tracking map (north-south translation and NetworkPolicy flows)",
    }
    /// `loadBalancerSourceRanges` LPM trie.
    SourceRanges {
        name: MAP_LB_SRC_RANGES = "TWL_LBSRC_V1",
        map_type: LpmTrie,
        key: SrcRangeKey,
        value: u8,
        size: DEFAULT_LB_SRC_RANGES_MAX = 16_384,
        flag: "map-size-lb-source-ranges",
        help: "Max entries of the loadBalancerSourceRanges trie",
    }
    /// IPv6 twin of [`MapKind::SourceRanges`]: the IPv6 `loadBalancerSourceRanges` of IPv6
    /// LoadBalancer IPs (keyed by the same Service ids).
    SourceRanges6 {
        name: MAP_LB_SRC_RANGES6 = "TWL_LBSRC6_V1",
        map_type: LpmTrie,
        key: SrcRangeKey6,
        value: u8,
        size: DEFAULT_LB_SRC_RANGES6_MAX = 4_096,
        flag: "map-size-lb-source-ranges6",
        help: "Max entries of the IPv6 loadBalancerSourceRanges trie",
    }
    /// NetworkPolicy: local pod endpoints.
    PolicyEndpoints {
        name: MAP_POLICY_ENDPOINTS = "TWL_PEP_V1",
        map_type: Hash,
        key: u32,
        value: PolicyEndpoint,
        size: DEFAULT_POLICY_ENDPOINTS_MAX = 4_096,
        flag: "map-size-policy-endpoints",
        help: "Max entries of the NetworkPolicy endpoint map (local pods)",
    }
    /// NetworkPolicy: peer prefix → identity (LPM trie).
    IpCache {
        name: MAP_IPCACHE = "TWL_IPC_V1",
        map_type: LpmTrie,
        key: IpCacheKey,
        value: PeerIdentity,
        size: DEFAULT_IPCACHE_MAX = 131_072,
        flag: "map-size-ipcache",
        help: "Max entries of the NetworkPolicy ipcache trie (ipBlock prefixes; pod IPs: map-size-ipcache-hosts)",
    }
    /// NetworkPolicy: host-length ipcache entries (a pod's or the node's address /32) →
    /// identity, an exact-match hash the programs look up before the [`MapKind::IpCache`] trie.
    /// A /32 is always the longest match, so hash-then-trie answers what one trie holding both
    /// would; a new flow's identity costs a hash lookup instead of the trie's deepest walk.
    IpCacheHosts {
        name: MAP_IPCACHE_HOSTS = "TWL_IPCH_V1",
        map_type: Hash,
        key: IpCacheKey,
        value: PeerIdentity,
        size: DEFAULT_IPCACHE_HOSTS_MAX = 131_072,
        flag: "map-size-ipcache-hosts",
        help: "Max entries of the NetworkPolicy host ipcache (pod and node IPv4 addresses)",
    }
    /// NetworkPolicy: allowed (endpoint, direction, identity, protocol, port) prefixes.
    Policy {
        name: MAP_POLICY = "TWL_POL_V1",
        map_type: LpmTrie,
        key: PolicyKey,
        value: PolicyVerdict,
        size: DEFAULT_POLICY_MAX = 262_144,
        flag: "map-size-policy", help: "Max entries of the NetworkPolicy rule trie",
    }
    /// Unconnected UDP flow stickiness (socket path; one entry per (socket, frontend) that sent
    /// to a Service recently).
    UdpFlows {
        name: MAP_UDP_FLOWS = "TWL_UDPFLOW_V1",
        map_type: LruHash,
        key: UdpFlowKey,
        value: AffinityValue,
        size: DEFAULT_UDP_FLOWS_MAX = 65_536,
        flag: "map-size-udp-flows",
        help: "Max entries of the unconnected UDP flow map (socket path stickiness)",
    }
    /// Ports of fragmented datagrams' first fragments (LRU; the fragments arrive within
    /// milliseconds of each other).
    Frags {
        name: MAP_FRAGS = "TWL_FRAG_V1",
        map_type: LruHash,
        key: FragKey,
        value: FragValue,
        size: DEFAULT_FRAGS_MAX = 8_192,
        flag: "map-size-frags",
        help: "Max entries of the fragment map (first-fragment ports of fragmented datagrams in flight)",
    }
    /// IPv6 twin of `Frags`: the first fragment's ports of fragmented IPv6 datagrams arriving on
    /// the devices, so their later fragments follow the first one's north-south translation.
    Frags6 {
        name: MAP_FRAGS6 = "TWL_FRAG6_V1",
        map_type: LruHash,
        key: FragKey6,
        value: FragValue,
        size: DEFAULT_FRAGS6_MAX = 8_192,
        flag: "map-size-frags6",
        help: "Max entries of the IPv6 fragment map (first-fragment ports of fragmented IPv6 datagrams in flight)",
    }
    /// Removed UDP backends whose connected sockets the socket iterator destroys: filled for one
    /// sweep, then emptied (and emptied before each fill, so a pinned leftover of a crashed
    /// agent dooms nothing). The agent splits a larger flush into sweeps of this size.
    SockDestroy {
        name: MAP_SOCK_DESTROY = "TWL_SKDEST_V1",
        map_type: Hash,
        key: SockDestroyKey,
        value: u8,
        size: DEFAULT_SOCK_DESTROY_MAX = 256,
    }
    /// IPv6 Service frontends: (address, port, protocol, scope) → the same value as
    /// [`MapKind::Services`] (docs/design/dualstack.md).
    Services6 {
        name: MAP_SERVICES6 = "TWL_SVC6_V1",
        map_type: Hash,
        key: ServiceKey6,
        value: ServiceValue,
        size: DEFAULT_SERVICES6_MAX = 16_384,
        flag: "map-size-services6", help: "Max entries of the IPv6 services map",
    }
    /// Backend id → IPv6 backend (one id space with [`MapKind::Backends`]).
    Backends6 {
        name: MAP_BACKENDS6 = "TWL_BE6_V1",
        map_type: Hash,
        key: u32,
        value: Backend6,
        size: DEFAULT_BACKENDS6_MAX = 32_768,
        flag: "map-size-backends6", help: "Max entries of the IPv6 backends map",
    }
    /// Socket reverse NAT for IPv6 frontends (LRU).
    SockRevNat6 {
        name: MAP_SOCK_REVNAT6 = "TWL_SKRNAT6_V1",
        map_type: LruHash,
        key: SockRevNatKey6,
        value: SockRevNatValue6,
        size: DEFAULT_SOCK_REVNAT6_MAX = 65_536,
        flag: "map-size-sock-revnat6",
        help: "Max entries of the IPv6 socket reverse-NAT map",
    }
    /// eBPF host routing: local pods' host veths and MACs (`crate::fastpath`).
    LocalEndpoints {
        name: MAP_LOCAL_ENDPOINTS = "TWL_LXC_V1",
        map_type: Hash,
        key: u32,
        value: LocalEndpoint,
        size: DEFAULT_LOCAL_ENDPOINTS_MAX = 4_096,
        flag: "map-size-local-endpoints",
        help: "Max entries of the host-routing endpoint map (local pods)",
    }
    /// IPv6 twin of `LocalEndpoints`: local pods' IPv6 addresses (`addr6_from_octets`), the
    /// same value.
    LocalEndpoints6 {
        name: MAP_LOCAL_ENDPOINTS6 = "TWL_LXC6_V1",
        map_type: Hash,
        key: [u32; 4],
        value: LocalEndpoint,
        size: DEFAULT_LOCAL_ENDPOINTS6_MAX = 4_096,
        flag: "map-size-local-endpoints6",
        help: "Max entries of the IPv6 host-routing endpoint map (local pods)",
    }
    /// eBPF host routing and masquerade switches (one entry).
    FastPathSwitches {
        name: MAP_FASTPATH_CONFIG = "TWL_FPCFG_V1",
        map_type: Array,
        key: u32,
        value: FastPathConfig,
        size: DEFAULT_FASTPATH_CONFIG_MAX = 1,
    }
    /// Masquerade source and exempt prefixes (LPM trie).
    Masq {
        name: MAP_MASQ = "TWL_MASQ_V1",
        map_type: LpmTrie,
        key: MasqKey,
        value: u8,
        size: DEFAULT_MASQ_PREFIXES_MAX = 1_024,
        flag: "map-size-masq",
        help: "Max entries of the masquerade prefix trie (pod CIDRs and exempt destinations)",
    }
    /// IPv6 twin of `Ct` (`crate::ct6`): the eBPF masquerade's IPv6 flows, same state machine
    /// and collector.
    Ct6 {
        name: MAP_CT6 = "TWL_CT6_V1",
        map_type: Hash,
        key: CtKey6,
        value: CtValue6,
        size: DEFAULT_CT6_MAX = 65_536,
        flag: "map-size-ct6",
        help: "Max entries of the IPv6 per-packet connection-tracking map",
    }
    /// IPv6 twin of `Masq`: this node's IPv6 pod CIDRs and the IPv6 destinations reached
    /// untranslated (LPM trie).
    Masq6 {
        name: MAP_MASQ6 = "TWL_MASQ6_V1",
        map_type: LpmTrie,
        key: MasqKey6,
        value: u8,
        size: DEFAULT_MASQ6_PREFIXES_MAX = 1_024,
        flag: "map-size-masq6",
        help: "Max entries of the IPv6 masquerade prefix trie",
    }
    /// The denied-flow event stream (`twill-agent debug monitor`): a ring buffer the pod
    /// programs write one `PolicyDenyEvent` into per dropped packet, within a budget per CPU and
    /// second kept in [`MapKind::PolicyEventBudget`], so a flood of denied packets costs the
    /// datapath a counter increment, not ring-buffer traffic. Not pinned: each agent makes its
    /// own and reads it (a program left attached while no agent runs keeps writing into the old
    /// one, which nobody reads; its events are lost, never misdelivered). The size is in bytes
    /// (a power of two, a multiple of the page size): 8,192 events.
    PolicyEvents {
        name: MAP_POLICY_EVENTS = "TWL_PEV_V1",
        map_type: RingBuf,
        key: (),
        value: (),
        size: POLICY_EVENTS_BYTES = 256 * 1024,
        pinned: false,
    }
    /// Per-CPU `EventBudget` of the denied-flow stream (one entry); not pinned, as the stream.
    PolicyEventBudget {
        name: MAP_POLICY_EVENT_BUDGET = "TWL_PEVB_V1",
        map_type: PerCpuArray,
        key: u32,
        value: EventBudget,
        size: POLICY_EVENT_BUDGET_ENTRIES = 1,
        pinned: false,
    }
    /// NetworkPolicy: local pods' IPv6 addresses → the same endpoint as their IPv4 address's
    /// (an IPv6-only pod's own).
    PolicyEndpoints6 {
        name: MAP_POLICY_ENDPOINTS6 = "TWL_PEP6_V1",
        map_type: Hash,
        key: [u32; 4],
        value: PolicyEndpoint,
        size: DEFAULT_POLICY_ENDPOINTS6_MAX = 4_096,
        flag: "map-size-policy-endpoints6",
        help: "Max entries of the NetworkPolicy IPv6 endpoint map (local pods)",
    }
    /// NetworkPolicy: IPv6 peer prefix → identity (LPM trie; one identity space with `IpCache`).
    IpCache6 {
        name: MAP_IPCACHE6 = "TWL_IPC6_V1",
        map_type: LpmTrie,
        key: IpCacheKey6,
        value: PeerIdentity,
        size: DEFAULT_IPCACHE6_MAX = 65_536,
        flag: "map-size-ipcache6",
        help: "Max entries of the NetworkPolicy IPv6 ipcache trie (IPv6 ipBlock prefixes; pod addresses: map-size-ipcache-hosts6)",
    }
    /// IPv6 twin of [`MapKind::IpCacheHosts`]: host-length (/128) entries of the IPv6 ipcache,
    /// looked up before the [`MapKind::IpCache6`] trie.
    IpCacheHosts6 {
        name: MAP_IPCACHE_HOSTS6 = "TWL_IPCH6_V1",
        map_type: Hash,
        key: IpCacheKey6,
        value: PeerIdentity,
        size: DEFAULT_IPCACHE_HOSTS6_MAX = 65_536,
        flag: "map-size-ipcache-hosts6",
        help: "Max entries of the NetworkPolicy IPv6 host ipcache (pod and node IPv6 addresses)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_bpf_obj_name_len() {
        for (i, a) in MapKind::ALL.iter().enumerate() {
            let spec = a.spec();
            assert_eq!(spec.kind, *a);
            assert!(spec.name.len() <= 15, "{}", spec.name);
            assert!(spec.default_size > 0, "{}", spec.name);
            for b in &MapKind::ALL[i + 1..] {
                assert_ne!(spec.name, b.name());
                assert!(spec.size_flag.is_none() || spec.size_flag != b.spec().size_flag);
            }
            assert!(!RETIRED_MAPS.contains(&spec.name));
            assert_eq!(spec.size_flag.is_some(), !spec.size_help.is_empty());
        }
        assert_eq!(ALL_MAPS.len(), MapKind::COUNT);
    }

    #[test]
    fn sizes_default_from_the_catalogue_and_fixed_ones_stay() {
        let s = MapSizes::default()
            .with(MapKind::Ct, 7)
            .with(MapKind::Stats, 7);
        assert_eq!(s.get(MapKind::Ct), 7);
        assert_eq!(s.get(MapKind::Stats), STATS_MAX);
        assert_eq!(s.get(MapKind::Services), DEFAULT_SERVICES_MAX);
    }

    #[test]
    fn the_monitor_maps_are_the_only_unpinned_ones() {
        let mut unpinned = MapKind::ALL.iter().filter(|k| !k.spec().pinned);
        assert_eq!(unpinned.next(), Some(&MapKind::PolicyEvents));
        assert_eq!(unpinned.next(), Some(&MapKind::PolicyEventBudget));
        assert_eq!(unpinned.next(), None);
        assert_eq!(MapKind::pinned().count() + 2, ALL_MAPS.len());
        assert_eq!(MapKind::PolicyEvents.spec().key_size, 0);
    }

    #[test]
    fn lpm_keys_carry_the_prefix_length() {
        assert_eq!(MapKind::Policy.spec().key_size, 4 + size_of::<PolicyKey>());
        assert_eq!(MapKind::Services.spec().key_size, size_of::<ServiceKey>());
    }
}
