//! Pods, Namespaces, NetworkPolicies → the exact contents of the three policy maps
//! (`docs/design/policy.md`): endpoints, the ipcache of peer identities, and the per-endpoint
//! allow trie. Deterministic; ids stable across compiles through [`PolicyIds`].
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::rc::Rc;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use twill_common::{
    IDENTITY_ANY, IDENTITY_FIRST_ASSIGNED, IDENTITY_HOST, IDENTITY_WORLD, IpCacheKey, IpCacheKey6,
    PEP_F_EGRESS_ISOLATED, PEP_F_INGRESS_ISOLATED, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_PORT_BASE, PeerIdentity,
    PolicyEndpoint, PolicyKey, PolicyVerdict,
};

use super::parse::{
    IpBlockSel, LABEL_NAMESPACE_NAME, Labels, NamedPort, ParsedPolicy, Peer, PolicyNamespace,
    PolicyPod, PortSel, Rule,
};

/// `addr_be` form of an address: the octets in network order, as the kernel compares them.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`addr_be`].
pub fn addr_from_be(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

pub use crate::family::{addr6_be, addr6_from_be};

/// An LPM-trie key: `prefix_len` leading bits of `data` (in memory order) are significant, the
/// rest are zero. Ordered by data first, so the entries of one (endpoint, direction, identity)
/// are adjacent in a `BTreeMap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmKey<K> {
    pub data: K,
    pub prefix_len: u32,
}

/// Direction of a rule, as seen from the selected (local) pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => POLICY_DIR_INGRESS,
            Direction::Egress => POLICY_DIR_EGRESS,
        }
    }

    pub fn from_u8(d: u8) -> Option<Self> {
        match d {
            POLICY_DIR_INGRESS => Some(Direction::Ingress),
            POLICY_DIR_EGRESS => Some(Direction::Egress),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Which part of which policy a `rule_id` names. `peer`/`port` index the rule's `from`/`to` and
/// `ports` lists as written; `None` when the list is absent or empty (every peer / every port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub direction: Direction,
    pub rule: u32,
    pub peer: Option<u32>,
    pub port: Option<u32>,
}

/// The set of ipBlock selectors that contain an address (sorted). Empty = no ipBlock does.
pub type CidrClass = Vec<IpBlockSel>;

/// What an identity stands for; identities are hash-consed on this value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKind {
    /// Pods with the same namespace, labels, named ports and CIDR class. `labels` holds only
    /// the keys some peer podSelector names and `named_ports` only the names some egress rule
    /// names: pods that differ in anything else are indistinguishable to every policy (a
    /// StatefulSet's per-pod label would otherwise make every pod its own identity, and the
    /// policy map grows with identities).
    Pod {
        namespace: Arc<str>,
        labels: Labels,
        named_ports: Vec<NamedPort>,
        class: CidrClass,
    },
    /// Addresses that are no known pod, by CIDR class (never empty: that is WORLD).
    Cidr { class: CidrClass },
}

/// The ids of the previous compile, so that unchanged identities, endpoints and rules keep their
/// numbers and a change rewrites only the map entries it affects. `PolicyIds::default()` for the
/// first compile: ids are then assigned in sorted order of what they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyIds {
    identities: HashMap<Arc<IdentityKind>, u32>,
    next_identity: u32,
    endpoints: HashMap<(Arc<str>, Arc<str>), u32>,
    next_endpoint: u32,
    rules: HashMap<RuleRef, u32>,
    next_rule: u32,
}

/// First endpoint and rule id (0 stays "none").
const FIRST_ID: u32 = 1;

/// Keeps the ids of keys seen before; gives new keys (taken in sorted order) the next ids. When
/// the counter would wrap, renumbers everything from `first` (a one-off full rewrite after four
/// billion allocations beats reusing an id a stale map entry may still carry). Hash lookups for
/// the known keys; only new ones are sorted (comparing identities compares label maps).
fn allocate<K: Ord + Hash + Clone>(
    keys: impl IntoIterator<Item = K>,
    prev: &HashMap<K, u32>,
    prev_next: u32,
    first: u32,
) -> (HashMap<K, u32>, u32) {
    let mut out = HashMap::new();
    let mut fresh = Vec::new();
    for k in keys {
        match prev.get(&k) {
            Some(&id) => {
                out.insert(k, id);
            }
            None => fresh.push(k),
        }
    }
    fresh.sort_unstable();
    fresh.dedup();
    let mut next = prev_next.max(first);
    let fits = u32::try_from(fresh.len()).is_ok_and(|n| next.checked_add(n).is_some());
    if !fits {
        let mut all: Vec<K> = out.into_keys().chain(fresh).collect();
        all.sort_unstable();
        let ids = (first..).zip(all).map(|(id, k)| (k, id));
        let out: HashMap<K, u32> = ids.collect();
        let next = first + u32::try_from(out.len()).expect("fewer than 2^32 keys");
        return (out, next);
    }
    for k in fresh {
        out.insert(k, next);
        next += 1;
    }
    (out, next)
}

/// The policy maps' exact contents: the three maps, and the IPv6 twins of the endpoint map and
/// the ipcache (the rule trie is keyed by endpoint and identity, which both families share).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    /// `MapKind::PolicyEndpoints`: local pod address (`addr_be`) → endpoint.
    pub endpoints: BTreeMap<u32, PolicyEndpoint>,
    /// `MapKind::IpCache`.
    pub ipcache: BTreeMap<LpmKey<IpCacheKey>, PeerIdentity>,
    /// `MapKind::PolicyEndpoints6`: local pod IPv6 address ([`addr6_be`]) → the same endpoint as
    /// its IPv4 address's.
    pub endpoints6: BTreeMap<[u32; 4], PolicyEndpoint>,
    /// `MapKind::IpCache6`.
    pub ipcache6: BTreeMap<LpmKey<IpCacheKey6>, PeerIdentity>,
    /// `MapKind::Policy`.
    pub policy: BTreeMap<LpmKey<PolicyKey>, PolicyVerdict>,
}

/// A local pod as `debug policy` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The pod's addresses (one at least).
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    /// The identity of its first address (IPv4 when it has one).
    pub identity: u32,
    /// The identity of its IPv6 address: the same as `identity` unless an ipBlock tells the two
    /// addresses apart (a CIDR class is per address).
    pub identity6: Option<u32>,
    /// Policies (namespace, name) selecting it with `Ingress` / `Egress` in their policyTypes.
    pub ingress_policies: Vec<(Arc<str>, Arc<str>)>,
    pub egress_policies: Vec<(Arc<str>, Arc<str>)>,
}

/// Sizes, for metrics and the scale benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounts {
    pub policies: usize,
    pub peer_pods: usize,
    pub local_endpoints: usize,
    pub identities: usize,
    pub ipblocks: usize,
    /// Pods skipped because an earlier pod (by namespace/name) or a node address holds their IP.
    pub ip_conflicts: usize,
}

/// Everything the compiler produces: the maps, and what their numbers mean.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub maps: PolicyEntries,
    /// Assigned identities (not the reserved ones).
    pub identities: BTreeMap<u32, Arc<IdentityKind>>,
    pub rules: BTreeMap<u32, RuleRef>,
    /// By endpoint id.
    pub local_pods: BTreeMap<u32, LocalPod>,
    pub counts: PolicyCounts,
    /// Pass to the next compile.
    pub ids: PolicyIds,
}

/// `port..=end` as LPM prefixes over the 16 port bits: `(first port, significant bits)`.
/// At most 30 prefixes for any range.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest aligned block starting at `lo` that stays inside the range.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let port = u16::try_from(lo).expect("lo <= hi <= 65535");
        out.push((port, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn policy_key(ep: u32, dir: Direction, identity: u32, proto: u8, port: u16) -> PolicyKey {
    PolicyKey {
        ep_id_be: ep.to_be(),
        direction: dir.as_u8(),
        _pad: [0; 3],
        identity_be: identity.to_be(),
        proto,
        _pad2: 0,
        port_be: port.to_be(),
    }
}

/// An address as an integer of its family's width (IPv4 in the low 32 bits), and that width.
fn addr_bits(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// The first `len` of `width` bits.
fn prefix_mask(len: u32, width: u32) -> u128 {
    if len == 0 {
        return 0;
    }
    let ones = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    (u128::MAX << (width - len)) & ones
}

/// Longest-prefix lookup of one family's boundary prefixes' classes.
#[derive(Default)]
struct ClassTrie {
    /// By prefix length, longest first: network address → class index.
    levels: Vec<(u32, HashMap<u128, usize>)>,
}

impl ClassTrie {
    fn lookup(&self, a: u128, width: u32) -> usize {
        for (len, nets) in &self.levels {
            if let Some(&c) = nets.get(&(a & prefix_mask(*len, width))) {
                return c;
            }
        }
        0
    }
}

/// `inner` lies within `outer` (both of one family).
fn contains_net(outer: IpNetwork, inner: IpNetwork) -> bool {
    match (outer, inner) {
        (IpNetwork::V4(o), IpNetwork::V4(i)) => o.prefix() <= i.prefix() && o.contains(i.network()),
        (IpNetwork::V6(o), IpNetwork::V6(i)) => o.prefix() <= i.prefix() && o.contains(i.network()),
        _ => false,
    }
}

type GroupKey<'k> = (&'k str, &'k Labels, &'k [NamedPort], usize);

/// A group of pods sharing one identity.
struct PodGroup<'a> {
    namespace: &'a Arc<str>,
    /// The identity's labels (see [`IdentityKind::Pod`]).
    labels: Labels,
    named_ports: Vec<NamedPort>,
    class: usize,
    id: u32,
}

/// The ipBlocks of all policies and the CIDR classes of their boundary prefixes.
struct Cidrs {
    /// Sorted, distinct.
    blocks: Vec<IpBlockSel>,
    /// Class index → sorted indices of the blocks containing its addresses; 0 is the empty class.
    classes: Vec<Vec<usize>>,
    /// Every `cidr` and `except` prefix with its class (IPv4 before IPv6).
    boundaries: Vec<(IpNetwork, usize)>,
    /// One trie per family: an IPv4 block never holds an IPv6 address, so the classes of one
    /// family's addresses hold only that family's blocks.
    trie4: ClassTrie,
    trie6: ClassTrie,
}

impl Cidrs {
    fn new(policies: &[&ParsedPolicy]) -> Self {
        let blocks: Vec<IpBlockSel> = policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()))
            .flat_map(|r| r.peers.iter().flatten())
            .filter_map(|p| match p {
                Peer::IpBlock(b) => Some(b.clone()),
                Peer::Pods { .. } => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let prefixes: BTreeSet<IpNetwork> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        // Prefixes are nested or disjoint, so every address whose longest matching prefix is
        // `b` is in exactly the blocks that contain `b` and do not except a prefix holding it.
        let mut classes: Vec<Vec<usize>> = vec![Vec::new()];
        let mut class_index: HashMap<Vec<usize>, usize> = HashMap::from([(Vec::new(), 0)]);
        let mut boundaries = Vec::with_capacity(prefixes.len());
        for b in prefixes {
            let members: Vec<usize> = blocks
                .iter()
                .enumerate()
                .filter(|(_, blk)| {
                    contains_net(blk.cidr, b) && !blk.except.iter().any(|&e| contains_net(e, b))
                })
                .map(|(i, _)| i)
                .collect();
            let next = classes.len();
            let c = *class_index.entry(members.clone()).or_insert_with(|| {
                classes.push(members);
                next
            });
            boundaries.push((b, c));
        }
        let trie = |v6: bool| {
            let mut levels: BTreeMap<u32, HashMap<u128, usize>> = BTreeMap::new();
            for &(net, c) in boundaries.iter().filter(|(n, _)| n.is_ipv6() == v6) {
                levels
                    .entry(u32::from(net.prefix()))
                    .or_default()
                    .insert(addr_bits(net.network()).0, c);
            }
            ClassTrie {
                levels: levels.into_iter().rev().collect(),
            }
        };
        let (trie4, trie6) = (trie(false), trie(true));
        Self {
            blocks,
            classes,
            boundaries,
            trie4,
            trie6,
        }
    }

    /// The class of `ip`: of the longest boundary prefix holding it, 0 when none does.
    fn lookup(&self, ip: IpAddr) -> usize {
        let (a, width) = addr_bits(ip);
        if ip.is_ipv6() {
            self.trie6.lookup(a, width)
        } else {
            self.trie4.lookup(a, width)
        }
    }

    fn class_value(&self, c: usize) -> CidrClass {
        self.classes[c]
            .iter()
            .map(|&i| self.blocks[i].clone())
            .collect()
    }

    fn in_class(&self, block: usize, class: usize) -> bool {
        self.classes[class].binary_search(&block).is_ok()
    }
}

/// Peer pods, one entry per address (a dual-stack pod has two): of pods sharing an address
/// the first by namespace/name wins, and node addresses win over pods (they are HOST). Returns
/// the entries (by pod, IPv4 first) and how many addresses were lost.
fn peer_pods<'p>(
    pods: impl IntoIterator<Item = &'p PolicyPod>,
    node_addrs: &BTreeSet<IpAddr>,
) -> (Vec<(&'p PolicyPod, IpAddr)>, usize) {
    let mut pods: Vec<&PolicyPod> = pods.into_iter().collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    pods.dedup_by(|b, a| (&a.namespace, &a.name) == (&b.namespace, &b.name));
    let mut peers: Vec<(&PolicyPod, IpAddr)> = pods
        .into_iter()
        .flat_map(|p| p.policy_ips().map(move |ip| (p, ip)))
        .collect();
    let mut taken = node_addrs.clone();
    let before = peers.len();
    peers.retain(|&(_, ip)| taken.insert(ip));
    let conflicts = before - peers.len();
    (peers, conflicts)
}

/// Namespace labels; a namespace known only through its pods still has its name label.
fn namespace_labels<'n>(
    namespaces: impl IntoIterator<Item = &'n PolicyNamespace>,
    peers: &[(&PolicyPod, IpAddr)],
) -> BTreeMap<Arc<str>, Labels> {
    let mut out: BTreeMap<Arc<str>, Labels> = BTreeMap::new();
    for ns in namespaces {
        out.entry(ns.name.clone())
            .or_insert_with(|| ns.labels.clone());
    }
    for (p, _) in peers {
        out.entry(p.namespace.clone()).or_insert_with(|| {
            Labels::from([(LABEL_NAMESPACE_NAME.to_owned(), p.namespace.to_string())])
        });
    }
    out
}

/// The identities of a compile, hash-consed, with their ids.
struct Identities<'p> {
    groups: Vec<PodGroup<'p>>,
    /// Group of each peer pod (same order).
    peer_group: Vec<usize>,
    /// Class → id of each non-empty class some boundary has.
    regions: BTreeMap<usize, u32>,
    ids: HashMap<Arc<IdentityKind>, u32>,
    next: u32,
}

impl<'p> Identities<'p> {
    /// `taken`: pod and node addresses, whose /32 entries hide a /32 boundary. `label_keys`: the
    /// keys peer podSelectors name; `port_names`: the named ports egress rules name.
    fn new(
        peers: &[(&'p PolicyPod, IpAddr)],
        label_keys: &BTreeSet<&str>,
        port_names: &BTreeSet<&str>,
        cidrs: &Cidrs,
        taken: &BTreeSet<IpAddr>,
        prev: &PolicyIds,
    ) -> Self {
        let relevant: Vec<Labels> = peers
            .iter()
            .map(|(p, _)| {
                p.labels
                    .iter()
                    .filter(|(k, _)| label_keys.contains(k))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .collect();
        let mut group_of: HashMap<GroupKey<'_>, usize> = HashMap::new();
        let mut groups: Vec<PodGroup<'p>> = Vec::new();
        let mut peer_group = Vec::with_capacity(peers.len());
        let ports: Vec<Vec<NamedPort>> = peers
            .iter()
            .map(|(p, _)| {
                p.named_ports
                    .iter()
                    .filter(|np| port_names.contains(np.name.as_str()))
                    .cloned()
                    .collect()
            })
            .collect();
        for ((&(p, ip), labels), ports) in peers.iter().zip(&relevant).zip(&ports) {
            let class = cidrs.lookup(ip);
            let key = (&*p.namespace, labels, ports.as_slice(), class);
            let next = groups.len();
            let g = *group_of.entry(key).or_insert_with(|| {
                groups.push(PodGroup {
                    namespace: &p.namespace,
                    labels: labels.clone(),
                    named_ports: ports.clone(),
                    class,
                    id: 0,
                });
                next
            });
            peer_group.push(g);
        }
        let group_kinds: Vec<Arc<IdentityKind>> = groups
            .iter()
            .map(|g| {
                Arc::new(IdentityKind::Pod {
                    namespace: g.namespace.clone(),
                    labels: g.labels.clone(),
                    named_ports: g.named_ports.clone(),
                    class: cidrs.class_value(g.class),
                })
            })
            .collect();
        let region_kinds: BTreeMap<usize, Arc<IdentityKind>> = cidrs
            .boundaries
            .iter()
            .filter(|&&(net, c)| c != 0 && !hidden(net, taken))
            .map(|&(_, c)| {
                let kind = IdentityKind::Cidr {
                    class: cidrs.class_value(c),
                };
                (c, Arc::new(kind))
            })
            .collect();
        let (ids, next) = allocate(
            group_kinds.iter().chain(region_kinds.values()).cloned(),
            &prev.identities,
            prev.next_identity,
            IDENTITY_FIRST_ASSIGNED,
        );
        for (g, kind) in groups.iter_mut().zip(&group_kinds) {
            g.id = ids[kind];
        }
        let regions = region_kinds
            .iter()
            .map(|(&c, kind)| (c, ids[kind]))
            .collect();
        Self {
            groups,
            peer_group,
            regions,
            ids,
            next,
        }
    }

    fn region_id(&self, class: usize) -> u32 {
        if class == 0 {
            IDENTITY_WORLD
        } else {
            self.regions[&class]
        }
    }
}

/// A host-length boundary (/32, /128) that is a pod's or the node's address: its ipcache entry
/// is the pod's identity (which holds the class) or HOST, so it needs no region identity.
fn hidden(net: IpNetwork, taken: &BTreeSet<IpAddr>) -> bool {
    let full = if net.is_ipv6() { 128 } else { 32 };
    net.prefix() == full && taken.contains(&net.network())
}

/// Both families' IPCACHE entries, filled by [`Ipcaches::insert`].
#[derive(Default)]
struct Ipcaches {
    v4: BTreeMap<LpmKey<IpCacheKey>, PeerIdentity>,
    v6: BTreeMap<LpmKey<IpCacheKey6>, PeerIdentity>,
}

impl Ipcaches {
    fn insert(&mut self, net: IpNetwork, id: u32) {
        let prefix_len = u32::from(net.prefix());
        match net.network() {
            IpAddr::V4(a) => {
                let data = IpCacheKey {
                    addr_be: addr_be(a),
                };
                self.v4
                    .insert(LpmKey { data, prefix_len }, PeerIdentity { id });
            }
            IpAddr::V6(a) => {
                let data = IpCacheKey6 {
                    addr_be: addr6_be(a),
                };
                self.v6
                    .insert(LpmKey { data, prefix_len }, PeerIdentity { id });
            }
        }
    }
}

/// IPCACHE (both families): every boundary prefix → its class's identity, and node and pod
/// host prefixes (/32, /128).
fn ipcache(
    cidrs: &Cidrs,
    idents: &Identities<'_>,
    node_addrs: &BTreeSet<IpAddr>,
    peers: &[(&PolicyPod, IpAddr)],
    taken: &BTreeSet<IpAddr>,
) -> Ipcaches {
    let mut out = Ipcaches::default();
    for &(net, c) in cidrs.boundaries.iter().filter(|(n, _)| !hidden(*n, taken)) {
        out.insert(net, idents.region_id(c));
    }
    for &ip in node_addrs {
        out.insert(IpNetwork::from(ip), IDENTITY_HOST);
    }
    for (&(_, ip), &g) in peers.iter().zip(&idents.peer_group) {
        out.insert(IpNetwork::from(ip), idents.groups[g].id);
    }
    out
}

/// What can tell pods apart: the label keys peer podSelectors name, and the port names egress
/// rules name (see [`IdentityKind::Pod`]).
fn identity_keys<'p>(policies: &[&'p ParsedPolicy]) -> (BTreeSet<&'p str>, BTreeSet<&'p str>) {
    let label_keys = policies
        .iter()
        .flat_map(|p| p.ingress.iter().chain(p.egress.iter()))
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|peer| match peer {
            Peer::Pods {
                pods: Some(sel), ..
            } => Some(sel),
            _ => None,
        })
        .flat_map(|sel| sel.requirements.iter().map(|r| r.key.as_str()))
        .collect();
    let port_names = policies
        .iter()
        .flat_map(|p| p.egress.iter())
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|pm| match &pm.port {
            PortSel::Named(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    (label_keys, port_names)
}

/// Every (policy, direction, rule, peer, port) of every valid policy: what rule ids name.
fn rule_refs(policies: &[&ParsedPolicy]) -> Vec<RuleRef> {
    let mut out = Vec::new();
    for p in policies {
        for dir in [Direction::Ingress, Direction::Egress] {
            for (ri, r) in rules_of(p, dir).iter().enumerate() {
                for peer in indices(r.peers.as_ref().map(Vec::len)) {
                    for port in indices(r.ports.as_ref().map(Vec::len)) {
                        out.push(RuleRef {
                            namespace: p.namespace.clone(),
                            name: p.name.clone(),
                            direction: dir,
                            rule: idx32(ri),
                            peer,
                            port,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The runs of `peers` (sorted by pod, a pod's addresses adjacent) that are one pod each, of
/// pods on node `node` (`None`: every pod).
fn local_runs(peers: &[(&PolicyPod, IpAddr)], node: Option<&str>) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for i in (0..peers.len()).filter(|&i| node.is_none() || peers[i].0.node_name.as_deref() == node)
    {
        match runs.last_mut() {
            Some(run) if std::ptr::eq(peers[run[0]].0, peers[i].0) => run.push(i),
            _ => runs.push(vec![i]),
        }
    }
    runs
}

impl LocalPod {
    /// Of identity `identity`, with no address and no policy yet.
    fn new(pod: &PolicyPod, identity: u32) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ip: None,
            ip6: None,
            identity,
            identity6: None,
            ingress_policies: Vec::new(),
            egress_policies: Vec::new(),
        }
    }
}

impl PolicyEntries {
    /// Enters local pod `local`'s endpoint `value` under its address `ip` (of identity `id`).
    fn enter_endpoint(&mut self, local: &mut LocalPod, ip: IpAddr, id: u32, value: PolicyEndpoint) {
        match ip {
            IpAddr::V4(ip) => {
                local.ip = Some(ip);
                self.endpoints.insert(addr_be(ip), value);
            }
            IpAddr::V6(ip) => {
                local.ip6 = Some(ip);
                local.identity6 = Some(id);
                self.endpoints6.insert(addr6_be(ip), value);
            }
        }
    }
}

/// Compile the policy maps of node `node_name`, whose own addresses (either family) are
/// `node_addrs`.
///
/// - Every address of every pod that is not hostNetwork (and has not finished) gets an identity
///   (a dual-stack pod's two addresses share one unless an ipBlock tells them apart); only pods
///   with `nodeName == node_name` get an endpoint, one per pod, entered under each address.
/// - Invalid policies must have been filtered out by the caller ([`ParsedPolicy::from_k8s`]);
///   duplicates (same namespace/name) count once, the first wins.
/// - `prev`: the ids of the previous compile ([`PolicyState::ids`]), or the default.
pub fn compile<'a>(
    pods: impl IntoIterator<Item = &'a PolicyPod>,
    namespaces: impl IntoIterator<Item = &'a PolicyNamespace>,
    policies: impl IntoIterator<Item = &'a ParsedPolicy>,
    node_name: &str,
    node_addrs: &[IpAddr],
    prev: &PolicyIds,
) -> PolicyState {
    let mut policies: Vec<&ParsedPolicy> = policies.into_iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    policies.dedup_by(|b, a| (&a.namespace, &a.name) == (&b.namespace, &b.name));
    let node_addrs: BTreeSet<IpAddr> = node_addrs.iter().copied().collect();
    let (peers, ip_conflicts) = peer_pods(pods, &node_addrs);
    let ns_labels = namespace_labels(namespaces, &peers);
    let cidrs = Cidrs::new(&policies);
    let taken: BTreeSet<IpAddr> = node_addrs
        .iter()
        .copied()
        .chain(peers.iter().map(|&(_, ip)| ip))
        .collect();
    let (label_keys, port_names) = identity_keys(&policies);
    let idents = Identities::new(&peers, &label_keys, &port_names, &cidrs, &taken, prev);
    let ipcaches = ipcache(&cidrs, &idents, &node_addrs, &peers, &taken);
    let mut maps = PolicyEntries {
        ipcache: ipcaches.v4,
        ipcache6: ipcaches.v6,
        ..PolicyEntries::default()
    };
    let (rule_ids, next_rule) =
        allocate(rule_refs(&policies), &prev.rules, prev.next_rule, FIRST_ID);
    let locals = local_runs(&peers, Some(node_name));
    let (endpoint_ids, next_endpoint) = allocate(
        locals.iter().map(|run| {
            (
                peers[run[0]].0.namespace.clone(),
                peers[run[0]].0.name.clone(),
            )
        }),
        &prev.endpoints,
        prev.next_endpoint,
        FIRST_ID,
    );

    let ctx = Ctx {
        ns_labels: &ns_labels,
        cidrs: &cidrs,
        idents: &idents,
        node_addrs: &node_addrs,
        by_namespace: group_index_by_namespace(&idents.groups),
        group_by_id: idents
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id, i))
            .collect(),
        rule_ids: &rule_ids,
    };
    // Peer identities per (policy, direction, rule, peer), computed once for the policies that
    // select some local pod.
    let mut peer_cache = PeerCache::default();
    let mut entries = Entries::default();
    let mut local_pods = BTreeMap::new();
    for run in &locals {
        let pod = peers[run[0]].0;
        let ep = endpoint_ids[&(pod.namespace.clone(), pod.name.clone())];
        let identity_of = |i: usize| idents.groups[idents.peer_group[i]].id;
        let mut local = LocalPod::new(pod, identity_of(run[0]));
        let flags = ctx.endpoint(
            ep,
            pod,
            &policies,
            &mut peer_cache,
            &mut local,
            &mut entries,
        );
        let value = PolicyEndpoint { ep_id: ep, flags };
        for &i in run {
            maps.enter_endpoint(&mut local, peers[i].1, identity_of(i), value);
        }
        local_pods.insert(ep, local);
    }
    drop(ctx); // It borrows the id tables moved into the result.
    maps.policy = entries.into_map();

    PolicyState {
        maps,
        identities: idents.ids.iter().map(|(k, &v)| (v, k.clone())).collect(),
        rules: rule_ids.iter().map(|(k, &v)| (v, k.clone())).collect(),
        counts: PolicyCounts {
            policies: policies.len(),
            // Pods, not addresses.
            peer_pods: local_runs(&peers, None).len(),
            local_endpoints: local_pods.len(),
            identities: idents.ids.len(),
            ipblocks: cidrs.blocks.len(),
            ip_conflicts,
        },
        local_pods,
        ids: PolicyIds {
            identities: idents.ids,
            next_identity: idents.next,
            endpoints: endpoint_ids,
            next_endpoint,
            rules: rule_ids,
            next_rule,
        },
    }
}

/// Identities of each peer of each rule of a policy, by direction (0 ingress, 1 egress).
type PolicyPeers = [Vec<Vec<Rc<[u32]>>>; 2];

/// Peer identities, computed once per policy that selects a local pod, and once per distinct
/// peer: many policies repeat the same peers ("from the monitoring namespace").
#[derive(Default)]
struct PeerCache<'p> {
    by_policy: HashMap<usize, PolicyPeers>,
    by_peer: HashMap<PeerKey<'p>, Rc<[u32]>>,
}

/// A peer, the policy's namespace if the peer depends on it, the direction if it depends on it.
type PeerKey<'p> = (&'p Peer, Option<&'p str>, Option<Direction>);

fn rules_of(pol: &ParsedPolicy, dir: Direction) -> &[Rule] {
    match dir {
        Direction::Ingress => &pol.ingress,
        Direction::Egress => &pol.egress,
    }
}

fn idx32(i: usize) -> u32 {
    u32::try_from(i).expect("a list of an API object has fewer than 2^32 entries")
}

/// `None` for an absent list (one "every" entry), else each index.
fn indices(len: Option<usize>) -> Vec<Option<u32>> {
    match len {
        None => vec![None],
        Some(n) => (0..n).map(|i| Some(idx32(i))).collect(),
    }
}

fn group_index_by_namespace<'g>(groups: &'g [PodGroup<'_>]) -> HashMap<&'g str, Vec<usize>> {
    let mut out: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, g) in groups.iter().enumerate() {
        out.entry(&**g.namespace).or_default().push(i);
    }
    out
}

/// What peer evaluation needs of the compile.
struct Ctx<'c, 'g> {
    ns_labels: &'c BTreeMap<Arc<str>, Labels>,
    cidrs: &'c Cidrs,
    idents: &'c Identities<'g>,
    node_addrs: &'c BTreeSet<IpAddr>,
    by_namespace: HashMap<&'c str, Vec<usize>>,
    group_by_id: HashMap<u32, usize>,
    rule_ids: &'c HashMap<RuleRef, u32>,
}

impl Ctx<'_, '_> {
    /// Entries of one local endpoint; returns its isolation flags and fills in which policies
    /// select it.
    fn endpoint<'p>(
        &self,
        ep: u32,
        pod: &PolicyPod,
        policies: &[&'p ParsedPolicy],
        peer_cache: &mut PeerCache<'p>,
        local: &mut LocalPod,
        out: &mut Entries,
    ) -> u32 {
        let mut flags = 0;
        for (pi, pol) in policies.iter().enumerate() {
            if pol.namespace != pod.namespace || !pol.pod_selector.matches(&pod.labels) {
                continue;
            }
            let name = (pol.namespace.clone(), pol.name.clone());
            if pol.isolates_ingress {
                flags |= PEP_F_INGRESS_ISOLATED;
                local.ingress_policies.push(name.clone());
            }
            if pol.isolates_egress {
                flags |= PEP_F_EGRESS_ISOLATED;
                local.egress_policies.push(name);
            }
            let by_peer = &mut peer_cache.by_peer;
            let cached = peer_cache.by_policy.entry(pi).or_insert_with(|| {
                [Direction::Ingress, Direction::Egress].map(|dir| {
                    rules_of(pol, dir)
                        .iter()
                        .map(|r| {
                            r.peers
                                .iter()
                                .flatten()
                                .map(|peer| {
                                    let key = match peer {
                                        Peer::Pods {
                                            namespaces: None, ..
                                        } => (peer, Some(&*pol.namespace), None),
                                        Peer::Pods { .. } => (peer, None, None),
                                        Peer::IpBlock(_) => (peer, None, Some(dir)),
                                    };
                                    by_peer
                                        .entry(key)
                                        .or_insert_with(|| {
                                            self.peer_identities(pol, dir, peer).into()
                                        })
                                        .clone()
                                })
                                .collect()
                        })
                        .collect()
                })
            });
            for (di, dir) in [Direction::Ingress, Direction::Egress]
                .into_iter()
                .enumerate()
            {
                for (ri, rule) in rules_of(pol, dir).iter().enumerate() {
                    let emit = Emit {
                        ep,
                        dir,
                        pod,
                        rule,
                        peer_ids: &cached[di][ri],
                        rule_id: |peer: Option<u32>, port: Option<u32>| {
                            self.rule_ids[&RuleRef {
                                namespace: pol.namespace.clone(),
                                name: pol.name.clone(),
                                direction: dir,
                                rule: idx32(ri),
                                peer,
                                port,
                            }]
                        },
                    };
                    emit.run(self, out);
                }
            }
        }
        flags
    }

    /// Identities a peer of `pol` selects (sorted, deduplicated).
    fn peer_identities(&self, pol: &ParsedPolicy, dir: Direction, peer: &Peer) -> Vec<u32> {
        let mut out = Vec::new();
        match peer {
            Peer::Pods { namespaces, pods } => {
                let in_ns = |ns: &str, out: &mut Vec<u32>| {
                    for &g in self.by_namespace.get(ns).into_iter().flatten() {
                        let group = &self.idents.groups[g];
                        if pods.as_ref().is_none_or(|s| s.matches(&group.labels)) {
                            out.push(group.id);
                        }
                    }
                };
                match namespaces {
                    None => in_ns(&pol.namespace, &mut out),
                    Some(sel) => {
                        for (ns, labels) in self.ns_labels {
                            if sel.matches(labels) {
                                in_ns(ns, &mut out);
                            }
                        }
                    }
                }
            }
            Peer::IpBlock(b) => {
                let bi = self
                    .cidrs
                    .blocks
                    .binary_search(b)
                    .expect("every policy's blocks were collected");
                out.extend(
                    self.idents
                        .groups
                        .iter()
                        .filter(|g| self.cidrs.in_class(bi, g.class))
                        .map(|g| g.id),
                );
                out.extend(
                    self.idents
                        .regions
                        .iter()
                        .filter(|&(&c, _)| self.cidrs.in_class(bi, c))
                        .map(|(_, &id)| id),
                );
                // This node's own addresses are HOST, whatever their class: a pod's egress to
                // them is allowed by a block holding any of them (ingress from HOST is always
                // allowed, see the design).
                if dir == Direction::Egress && self.node_addrs.iter().any(|&a| b.contains(a)) {
                    out.push(IDENTITY_HOST);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Emits one rule's entries for one endpoint.
struct Emit<'r, R> {
    ep: u32,
    dir: Direction,
    pod: &'r PolicyPod,
    rule: &'r Rule,
    /// Identities of each of the rule's peers.
    peer_ids: &'r [Rc<[u32]>],
    rule_id: R,
}

impl<R: Fn(Option<u32>, Option<u32>) -> u32> Emit<'_, R> {
    fn run(&self, ctx: &Ctx<'_, '_>, out: &mut Entries) {
        let any = [IDENTITY_ANY];
        let peer_lists: Vec<(Option<u32>, &[u32])> = if self.rule.peers.is_none() {
            vec![(None, &any)]
        } else {
            self.peer_ids
                .iter()
                .enumerate()
                .map(|(i, ids)| (Some(idx32(i)), &**ids))
                .collect()
        };
        for &(peer_i, ids) in &peer_lists {
            let Some(ports) = &self.rule.ports else {
                let rid = (self.rule_id)(peer_i, None);
                for &id in ids {
                    out.push(
                        policy_key(self.ep, self.dir, id, 0, 0),
                        POLICY_PREFIX_ANY_PROTO,
                        rid,
                    );
                }
                continue;
            };
            for (port_i, pm) in ports.iter().enumerate() {
                let rid = (self.rule_id)(peer_i, Some(idx32(port_i)));
                match &pm.port {
                    PortSel::Any => {
                        for &id in ids {
                            out.push(
                                policy_key(self.ep, self.dir, id, pm.proto, 0),
                                POLICY_PREFIX_ANY_PORT,
                                rid,
                            );
                        }
                    }
                    PortSel::Range(lo, hi) => {
                        for (base, bits) in port_prefixes(*lo, *hi) {
                            for &id in ids {
                                out.push(
                                    policy_key(self.ep, self.dir, id, pm.proto, base),
                                    POLICY_PREFIX_PORT_BASE + bits,
                                    rid,
                                );
                            }
                        }
                    }
                    PortSel::Named(name) => {
                        let resolve = |ports: &[NamedPort]| -> Vec<u16> {
                            ports
                                .iter()
                                .filter(|np| np.name == *name && np.proto == pm.proto)
                                .map(|np| np.port)
                                .collect()
                        };
                        match self.dir {
                            // The local pod is the destination.
                            Direction::Ingress => {
                                for port in resolve(&self.pod.named_ports) {
                                    for &id in ids {
                                        out.push(
                                            policy_key(self.ep, self.dir, id, pm.proto, port),
                                            POLICY_PREFIX_PORT_BASE + 16,
                                            rid,
                                        );
                                    }
                                }
                            }
                            // The destination is the peer: resolve per peer identity. "Any peer"
                            // means every pod identity with that port (regions have none).
                            Direction::Egress => {
                                let targets: Vec<(u32, &[NamedPort])> = if peer_i.is_none() {
                                    ctx.idents
                                        .groups
                                        .iter()
                                        .map(|g| (g.id, g.named_ports.as_slice()))
                                        .collect()
                                } else {
                                    ids.iter()
                                        .filter_map(|id| ctx.group_by_id.get(id))
                                        .map(|&g| {
                                            (
                                                ctx.idents.groups[g].id,
                                                ctx.idents.groups[g].named_ports.as_slice(),
                                            )
                                        })
                                        .collect()
                                };
                                for (id, named) in targets {
                                    for port in resolve(named) {
                                        out.push(
                                            policy_key(self.ep, self.dir, id, pm.proto, port),
                                            POLICY_PREFIX_PORT_BASE + 16,
                                            rid,
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The policy entries, collected unsorted and sorted once: a million `BTreeMap` inserts compare
/// keys field by field (`_pad` by `memcmp`), a sort by one integer does not.
#[derive(Default)]
struct Entries(Vec<(u128, LpmKey<PolicyKey>, u32)>);

impl Entries {
    /// The key's position in `PolicyKey`'s derived order (field by field, arrays bytewise).
    fn order(k: &PolicyKey) -> u128 {
        let pad = u32::from_be_bytes([0, k._pad[0], k._pad[1], k._pad[2]]);
        (u128::from(k.ep_id_be) << 96)
            | (u128::from(k.direction) << 88)
            | (u128::from(pad) << 64)
            | (u128::from(k.identity_be) << 32)
            | (u128::from(k.proto) << 24)
            | (u128::from(k._pad2) << 16)
            | u128::from(k.port_be)
    }

    fn push(&mut self, data: PolicyKey, prefix_len: u32, rule_id: u32) {
        self.0
            .push((Self::order(&data), LpmKey { data, prefix_len }, rule_id));
    }

    /// Where rules overlap exactly, the lowest rule id names the entry (deterministic).
    fn into_map(mut self) -> BTreeMap<LpmKey<PolicyKey>, PolicyVerdict> {
        self.0
            .sort_unstable_by_key(|&(order, k, rule)| (order, k.prefix_len, rule));
        self.0
            .dedup_by_key(|&mut (order, k, _)| (order, k.prefix_len));
        self.0
            .into_iter()
            .map(|(_, k, rule_id)| (k, PolicyVerdict { rule_id }))
            .collect()
    }
}
