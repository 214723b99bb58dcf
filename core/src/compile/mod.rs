//! The pure desired-state compiler (`HOUSE_STYLE` §5): Services, `EndpointSlices`, this Node and the
//! agent's config in; the load-balancing map contents, a dump model, rejected objects and health
//! data out. No I/O, deterministic output, ids stable across compiles ([`IdAllocation`]).
//!
//! Semantics follow kube-proxy (`pkg/proxy`): ready endpoints only, serving+terminating ones when
//! none is ready (KEP-1669, per traffic policy), node-local sets for `Local` traffic policies,
//! session affinity per Service port shared by all its frontends.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use twill_common::{
    BE_F_LOCAL, BE_F_TERMINATING, MAGLEV_SLOT_BASE, SCOPE_ANY, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, SVC_F_TERMINATING_FALLBACK, ServiceValue, SlotKey,
};

pub use crate::family::{AnyBackend, FrontendKey, IpFamily};
use crate::lbmap::LbState;
use crate::maglev;

mod dump;
mod ids;
mod incremental;
mod parse;

pub use dump::{
    DumpView, EndpointView, FrontendView, MaglevView, RejectionView, ServiceView, SlotView,
    dump_view, render_dump, render_view,
};
pub use ids::{BackendKey, IdAllocation, SetKey};
pub use incremental::{Compiler, GroupKey, ServiceGroup, UpdateSummary};
pub use parse::{
    DEFAULT_AFFINITY_TIMEOUT_S, Interner, IpFamilyPolicy, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME, MAX_SLICE_ENDPOINTS, ParsedEndpoint, ParsedPort, ParsedService,
    ParsedSlice, RefusedAddress, ServiceInput, SliceInput, all_node_ips, all_node_ips6,
    special_address, special_address6,
};

/// Default of `--max-frontends-per-service`: a Service asking for more services-map entries is
/// rejected whole. Generous for real Services (100 ports of a LoadBalancer with
/// `externalTrafficPolicy: Local` and one ingress IP need 500), small next to the services map
/// (65,536 entries by default), so one object cannot fill it for everyone else.
pub const DEFAULT_MAX_FRONTENDS_PER_SERVICE: usize = 1024;

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: RangeInclusive<u16> = 30_000..=32_767;

/// `addr_be` form of an address: the octets in network order, as the kernel compares them.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`addr_be`].
pub fn addr_from_be(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

/// What the compiler needs to know about this node and the agent's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Addresses `NodePort` answers on (from the agent's devices). Empty: this Node's `InternalIP` and
    /// `ExternalIP` addresses.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// kube-proxy's `--nodeport-addresses`: when set, only node addresses inside these CIDRs.
    pub nodeport_cidrs: Vec<Ipv4Network>,
    /// IPv6 addresses `NodePort` answers on (from the agent's devices). Empty: this Node's IPv6
    /// `InternalIP` and `ExternalIP` addresses.
    pub nodeport_addresses6: Vec<Ipv6Addr>,
    /// The IPv6 CIDRs of `--nodeport-addresses` (each family is filtered by its own).
    pub nodeport_cidrs6: Vec<Ipv6Network>,
    /// `NodePorts` outside this range cannot be served by the datapath and are rejected.
    pub nodeport_range: RangeInclusive<u16>,
    /// This node's pod CIDRs (from its Node object): an endpoint without a `nodeName` inside
    /// them is local, since in the routed design only this node's pods hold those addresses.
    pub pod_cidrs: Vec<Ipv4Network>,
    /// This node's IPv6 pod CIDRs: the same rule for IPv6 endpoints without a `nodeName`.
    pub pod_cidrs6: Vec<Ipv6Network>,
    /// Every Node's `InternalIP` and `ExternalIP` addresses, sorted: no Service may take one as
    /// an externalIP or LoadBalancer IP (it would capture the node's own ports, its kubelet or
    /// SSH, from every pod of the cluster). This node's `nodeport_addresses` are refused too.
    pub node_ips: Vec<Ipv4Addr>,
    /// Every Node's IPv6 `InternalIP` and `ExternalIP` addresses, sorted: the same rule for
    /// IPv6 externalIPs and LoadBalancer IPs (with this node's `nodeport_addresses6`).
    pub node_ips6: Vec<Ipv6Addr>,
    /// The node's own network-namespace cookie, for `DatapathConfig` (loopback NodePorts).
    pub host_netns_cookie: u64,
    /// A Service needing more frontends (services-map entries) than this is not programmed.
    pub max_frontends_per_service: usize,
}

impl CompileConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            nodeport_addresses: Vec::new(),
            nodeport_cidrs: Vec::new(),
            nodeport_addresses6: Vec::new(),
            nodeport_cidrs6: Vec::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            pod_cidrs: Vec::new(),
            pod_cidrs6: Vec::new(),
            node_ips: Vec::new(),
            node_ips6: Vec::new(),
            host_netns_cookie: 0,
            max_frontends_per_service: DEFAULT_MAX_FRONTENDS_PER_SERVICE,
        }
    }

    /// Whether `ip` is a node's own address (see [`CompileConfig::node_ips`]).
    pub fn is_node_ip(&self, ip: Ipv4Addr) -> bool {
        self.node_ips.binary_search(&ip).is_ok() || self.nodeport_addresses.contains(&ip)
    }

    /// [`Self::is_node_ip`] for IPv6.
    pub fn is_node_ip6(&self, ip: Ipv6Addr) -> bool {
        self.node_ips6.binary_search(&ip).is_ok() || self.nodeport_addresses6.contains(&ip)
    }
}

/// Everything one from-scratch compile reads, as Kubernetes objects (tests, tools; the agent's
/// stores hold the parsed forms and drive a [`Compiler`]).
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub services: Vec<&'a Service>,
    pub endpoint_slices: Vec<&'a EndpointSlice>,
    /// This node's Node object, if known yet.
    pub node: Option<&'a Node>,
    pub config: &'a CompileConfig,
    /// The previous compile's ids (`IdAllocation::default()` at first, or
    /// `IdAllocation::from_adopted` after adopting pinned maps).
    pub ids: &'a IdAllocation,
}

/// Gives an enum one spelling: `as_str()` (text dumps, logs, metric labels) and a `Serialize`
/// that writes the same string (the JSON views), from one table.
macro_rules! one_spelling {
    ($(#[doc = $doc:literal])* $ty:ident { $($variant:ident => $label:literal),* $(,)? }) => {
        impl $ty {
            $(#[doc = $doc])*
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $label,)*
                }
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SvcType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

one_spelling!(
    /// The Kubernetes spelling.
    SvcType {
        ClusterIp => "ClusterIP",
        NodePort => "NodePort",
        LoadBalancer => "LoadBalancer",
    }
);

/// Which kind of address a frontend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

one_spelling!(
    /// The Service API's spelling (`spec.type` values; `ExternalIP` for `spec.externalIPs`):
    /// the one the dump, the JSON view and the map dump's kind flags use.
    FrontendKind {
        ClusterIp => "ClusterIP",
        NodePort => "NodePort",
        ExternalIp => "ExternalIP",
        LoadBalancer => "LoadBalancer",
    }
);

impl FrontendKind {
    /// The `SVC_F_*` bit marking a frontend of this kind in the kernel's service value.
    pub const fn flag(self) -> u16 {
        match self {
            FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
            FrontendKind::NodePort => SVC_F_NODEPORT,
            FrontendKind::ExternalIp => SVC_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_F_LOADBALANCER,
        }
    }
}

/// Kind of a source object, for rejections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

one_spelling!(
    /// The Kubernetes kind, as in the object's `kind` field: the one spelling the dump, the JSON
    /// view, logs and metric labels use.
    ObjectKind {
        Service => "Service",
        EndpointSlice => "EndpointSlice",
        Node => "Node",
    }
);

/// Why (part of) an object is not programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("{field}: {value:?} is not an IP address")]
    BadIp { field: &'static str, value: String },
    #[error("{field}: {value:?} is not an IPv4 CIDR")]
    BadCidr { field: &'static str, value: String },
    #[error("{field}: {value} is outside {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{field}: unknown value {value:?}")]
    UnknownValue { field: &'static str, value: String },
    #[error("duplicate port {port}/{proto}")]
    DuplicatePort { port: u16, proto: String },
    #[error(
        "duplicate port name {0:?} (port names must be unique; they match EndpointSlice ports)"
    )]
    DuplicatePortName(String),
    #[error("{count} endpoints, more than the {max} an EndpointSlice may hold")]
    OversizedSlice { count: usize, max: usize },
    #[error("frontend {frontend} is already served by {owner}")]
    FrontendConflict { frontend: String, owner: String },
    #[error(
        "frontend {frontend} is the ClusterIP of {owner}: a ClusterIP always wins over an \
         externalIP or LoadBalancer IP equal to it (remove the address from this Service)"
    )]
    ClusterIpConflict { frontend: String, owner: String },
    #[error(
        "{field}: {addr} is {why} and is never taken as an external address (remove it from \
         this Service)"
    )]
    RefusedAddress {
        field: &'static str,
        addr: IpAddr,
        why: &'static str,
    },
    #[error("Node is not this node ({0})")]
    NotThisNode(String),
    #[error("no free {0} id left")]
    IdsExhausted(&'static str),
    #[error(
        "{count} frontends (ports × addresses × scopes), more than the {max} a Service may have \
         (--max-frontends-per-service): the Service is not programmed"
    )]
    TooManyFrontends { count: usize, max: usize },
    #[error("{0} usable endpoints; only the first 65535 are programmed")]
    TooManyBackends(usize),
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error(
        "not (fully) programmed: a map is full (twill_map_errors_total{{kind=\"full\"}} names \
         it); raise its --map-size-* or remove Services. Retried on every change and resync"
    )]
    MapFull,
    #[error("not proxied: {0}")]
    NotProxied(&'static str),
}

/// How a rejection counts: only `Invalid` feeds the invalid-object metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectClass {
    /// Broken object: logged and counted.
    Invalid,
    /// Valid, but asks for something Twill does not do (yet).
    Unsupported,
    /// Deliberately not programmed (headless, `ExternalName`, proxy-name labels).
    NotProxied,
}

one_spelling!(RejectClass {
    Invalid => "invalid",
    Unsupported => "unsupported",
    NotProxied => "not-proxied",
});

impl RejectReason {
    pub fn class(&self) -> RejectClass {
        match self {
            RejectReason::Unsupported(_)
            | RejectReason::TooManyBackends(_)
            | RejectReason::IdsExhausted(_)
            | RejectReason::MapFull => RejectClass::Unsupported,
            RejectReason::NotProxied(_) => RejectClass::NotProxied,
            _ => RejectClass::Invalid,
        }
    }

    /// Short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RejectReason::MissingField(_) => "missing_field",
            RejectReason::BadIp { .. } => "bad_ip",
            RejectReason::BadCidr { .. } => "bad_cidr",
            RejectReason::OutOfRange { .. } => "out_of_range",
            RejectReason::UnknownValue { .. } => "unknown_value",
            RejectReason::DuplicatePort { .. } => "duplicate_port",
            RejectReason::DuplicatePortName(_) => "duplicate_port_name",
            RejectReason::OversizedSlice { .. } => "oversized_slice",
            RejectReason::FrontendConflict { .. } => "frontend_conflict",
            RejectReason::ClusterIpConflict { .. } => "cluster_ip_conflict",
            RejectReason::RefusedAddress { .. } => "refused_address",
            RejectReason::NotThisNode(_) => "not_this_node",
            RejectReason::IdsExhausted(_) => "ids_exhausted",
            RejectReason::TooManyBackends(_) => "too_many_backends",
            RejectReason::TooManyFrontends { .. } => "too_many_frontends",
            RejectReason::Unsupported(_) => "unsupported",
            RejectReason::MapFull => "map_full",
            RejectReason::NotProxied(_) => "not_proxied",
        }
    }
}

/// One rejected object (or part of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: ObjectKind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub reason: RejectReason,
}

/// Endpoint condition as the compiler classified it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointState {
    Ready,
    /// Not ready, but serving while terminating: a KEP-1669 fallback candidate.
    ServingTerminating,
    Terminating,
    NotReady,
}

one_spelling!(EndpointState {
    Ready => "ready",
    ServingTerminating => "serving-terminating",
    Terminating => "terminating",
    NotReady => "not-ready",
});

/// One endpoint of a Service port, for the dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    pub addr: IpAddr,
    pub port: u16,
    pub node: Option<Arc<str>>,
    pub local: bool,
    pub state: EndpointState,
    /// In the cluster-wide backend set.
    pub in_cluster_set: bool,
    /// In the node-local backend set.
    pub in_local_set: bool,
}

/// One frontend of a Service port, for the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendModel {
    pub key: FrontendKey,
    pub kind: FrontendKind,
}

/// One Service port: names and everything the map entries alone cannot tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortModel {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub svc_type: SvcType,
    /// The family of this port's frontends and endpoints: a dual-stack Service has one model
    /// per port and family.
    pub family: IpFamily,
    pub proto: u8,
    pub port: u16,
    pub node_port: Option<u16>,
    pub affinity_timeout_s: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub frontends: Vec<FrontendModel>,
    pub endpoints: Vec<EndpointModel>,
    /// The `loadBalancerSourceRanges` of this port's family (kube-proxy's per-family lists:
    /// a family without ranges leaves its LoadBalancer IPs unfiltered).
    pub source_ranges: Vec<IpNetwork>,
    pub health_check_node_port: Option<u16>,
}

/// Names and reasons next to the raw map contents; [`render_dump`] joins both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpModel {
    /// Sorted by namespace, name, port name, protocol. Shared with the compiler's memo, so a
    /// model is cheap to hand out after every change.
    pub services: Vec<Arc<ServicePortModel>>,
    /// Sorted by kind, namespace, name.
    pub rejected: Vec<Rejection>,
}

/// A Service with a `healthCheckNodePort` (`LoadBalancer`, `externalTrafficPolicy` Local): the agent
/// serves kube-proxy's `{"localEndpoints": n}` on that port, 200 when `n > 0`, else 503.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub node_port: u16,
    /// Distinct ready endpoints on this node (terminating ones do not count, as in kube-proxy).
    pub local_endpoints: usize,
}

/// Sizes for metrics (`twill_services`, `twill_endpoints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceCounts {
    /// Services with at least one programmed frontend.
    pub services: usize,
    pub service_ports: usize,
    /// Entries of the services map.
    pub frontends: usize,
    /// Distinct backends.
    pub endpoints: usize,
}

/// The compiler's output.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Desired contents of the load-balancing maps.
    pub state: LbState,
    pub model: DumpModel,
    /// Input to the next compile.
    pub ids: IdAllocation,
    pub health: Vec<HealthCheck>,
    pub counts: ServiceCounts,
}

impl Compiled {
    pub fn rejected(&self) -> &[Rejection] {
        &self.model.rejected
    }

    /// Number of invalid objects (the invalid-object metric).
    pub fn invalid_count(&self) -> usize {
        self.model
            .rejected
            .iter()
            .filter(|r| r.reason.class() == RejectClass::Invalid)
            .count()
    }
}

/// A gathered endpoint of one Service port.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the three EndpointSlice conditions plus locality"
)]
struct Ep<'s> {
    addr: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<&'s Arc<str>>,
    local: bool,
}

impl Ep<'_> {
    fn rank(&self) -> u8 {
        match (self.ready, self.serving) {
            (true, _) => 2,
            (false, true) => 1,
            _ => 0,
        }
    }
    fn state(&self) -> EndpointState {
        match (self.ready, self.serving, self.terminating) {
            (true, _, _) => EndpointState::Ready,
            (false, true, true) => EndpointState::ServingTerminating,
            (false, _, true) => EndpointState::Terminating,
            _ => EndpointState::NotReady,
        }
    }
}

/// A backend set before ids are assigned: sorted (addr, port) plus whether it is the
/// terminating fallback.
#[derive(Clone, Debug, Default)]
struct PlannedSet {
    members: Vec<(IpAddr, u16)>,
    fallback: bool,
}

/// kube-proxy's `CategorizeEndpoints`: ready endpoints; if there are none, the serving and
/// terminating ones (KEP-1669). `publishNotReadyAddresses` makes every endpoint ready.
fn select(eps: &[Ep<'_>], publish_not_ready: bool, local_only: bool) -> PlannedSet {
    let candidates = || eps.iter().filter(move |e| !local_only || e.local);
    let ready: Vec<_> = candidates()
        .filter(|e| publish_not_ready || e.ready)
        .map(|e| (e.addr, e.port))
        .collect();
    if !ready.is_empty() {
        return PlannedSet {
            members: ready,
            fallback: false,
        };
    }
    let members: Vec<_> = candidates()
        .filter(|e| e.serving && e.terminating)
        .map(|e| (e.addr, e.port))
        .collect();
    let fallback = !members.is_empty();
    PlannedSet { members, fallback }
}

struct PlannedFrontend {
    key: FrontendKey,
    kind: FrontendKind,
    local_set: bool,
}

/// What a frontend competes for with other Services: its address, port and protocol, whatever
/// the scope (the datapath falls back from a specific scope to `SCOPE_ANY`, so two owners of one
/// address/port/protocol would mix).
/// (`None`: the `NodePort` wildcard.)
type Claim = (Option<IpAddr>, u16, u8);

fn claim_of(key: FrontendKey) -> Claim {
    (key.addr(), key.port_be(), key.proto())
}

/// How strongly a Service claims an address/port/protocol; the lower rank wins, then the
/// (namespace, name) order. A ClusterIP comes from the API server's allocator, which never gives
/// one address twice, while any user who may create a Service can write an externalIP: ranking
/// ClusterIPs first means a Service naming, say, kube-dns's ClusterIP as its externalIP cannot
/// capture the cluster's DNS, whatever its namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ClaimRank {
    ClusterIp,
    External,
}

fn rank_of(kind: FrontendKind) -> ClaimRank {
    match kind {
        FrontendKind::ClusterIp => ClaimRank::ClusterIp,
        FrontendKind::NodePort | FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
            ClaimRank::External
        }
    }
}

/// One Service's claim on an address/port/protocol, with its strongest rank.
type RankedClaim = (Claim, ClaimRank);

struct PlannedPort {
    model: ServicePortModel,
    frontends: Vec<PlannedFrontend>,
    cluster: PlannedSet,
    local: PlannedSet,
    affinity_timeout_s: Option<u32>,
    source_ranges: bool,
    /// Id keys of the cluster-wide and the node-local set, built once per port.
    set_keys: [SetKey; 2],
}

fn frontend_label(key: FrontendKey) -> String {
    let port = u16::from_be(key.port_be());
    let proto = parse::proto_name(key.proto());
    match key.addr() {
        None => format!("nodeport:{port}/{proto}"),
        Some(IpAddr::V6(a)) if a.is_unspecified() => format!("nodeport6:{port}/{proto}"),
        Some(IpAddr::V4(a)) => format!("{a}:{port}/{proto}"),
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}/{proto}"),
    }
}

/// The `loadBalancerSourceRanges` of `svc` in `family`, as kube-proxy's proxier of that family
/// sees them (`MapCIDRsByIPFamily`): the other family's ranges do not filter this one's
/// LoadBalancer IPs.
fn family_ranges(svc: &parse::ParsedService, family: IpFamily) -> Vec<IpNetwork> {
    match family {
        IpFamily::V4 => svc.source_ranges.iter().map(|&r| r.into()).collect(),
        IpFamily::V6 => svc.source_ranges6.iter().map(|&r| r.into()).collect(),
    }
}

/// The families `svc` is served in: those of its ClusterIPs, primary first.
fn families(svc: &parse::ParsedService) -> impl Iterator<Item = IpFamily> + '_ {
    svc.cluster_ips.iter().map(|ip| IpFamily::of(*ip))
}

/// The frontends one Service port asks for, before conflicts with other Services are resolved.
/// Nodes' own addresses are left out of the external ones ([`refused_node_ips`] reports them).
///
/// Of `family` only: an IPv6 port gets its IPv6 ClusterIP, its `NodePort` (the wildcard `::`,
/// answered on `node_addrs6`) and the Service's IPv6 External and `LoadBalancer` IPs.
fn port_frontends(
    svc: &parse::ParsedService,
    port: &parse::ParsedPort,
    config: &CompileConfig,
    family: IpFamily,
) -> Vec<PlannedFrontend> {
    let mut frontends = Vec::new();
    let port_be = port.port.to_be();
    for &ip in svc
        .cluster_ips
        .iter()
        .filter(|ip| IpFamily::of(**ip) == family)
    {
        let (scope, local_set) = if svc.internal_local {
            (SCOPE_INTERNAL, true)
        } else {
            (SCOPE_ANY, false)
        };
        frontends.push(PlannedFrontend {
            key: FrontendKey::new(Some(ip), port_be, port.proto, scope),
            kind: FrontendKind::ClusterIp,
            local_set,
        });
    }
    if family == IpFamily::V6 {
        let mut externals: Vec<(Ipv6Addr, u16, FrontendKind)> = Vec::new();
        if let Some(np) = port.node_port {
            externals.push((Ipv6Addr::UNSPECIFIED, np.to_be(), FrontendKind::NodePort));
        }
        externals.extend(
            svc.external_ips6
                .iter()
                .filter(|ip| !config.is_node_ip6(**ip))
                .map(|ip| (*ip, port_be, FrontendKind::ExternalIp)),
        );
        externals.extend(
            svc.lb_ips6
                .iter()
                .filter(|ip| !config.is_node_ip6(**ip))
                .map(|ip| (*ip, port_be, FrontendKind::LoadBalancer)),
        );
        for (addr, p, kind) in externals {
            let key = |scope| FrontendKey::new(Some(addr.into()), p, port.proto, scope);
            external_frontends(&mut frontends, svc.external_local, kind, key);
        }
        return frontends;
    }
    let mut externals: Vec<(u32, u16, FrontendKind)> = Vec::new();
    if let Some(np) = port.node_port {
        externals.push((0, np.to_be(), FrontendKind::NodePort));
    }
    externals.extend(
        svc.external_ips
            .iter()
            .filter(|ip| !config.is_node_ip(**ip))
            .map(|ip| (addr_be(*ip), port_be, FrontendKind::ExternalIp)),
    );
    externals.extend(
        svc.lb_ips
            .iter()
            .filter(|ip| !config.is_node_ip(**ip))
            .map(|ip| (addr_be(*ip), port_be, FrontendKind::LoadBalancer)),
    );
    for (addr, p, kind) in externals {
        let key = |scope| {
            FrontendKey::V4(twill_common::ServiceKey {
                addr_be: addr,
                port_be: p,
                proto: port.proto,
                scope,
            })
        };
        external_frontends(&mut frontends, svc.external_local, kind, key);
    }
    frontends
}

/// The frontends of one external address (NodePort, External IP, LoadBalancer IP) of either
/// family, by externalTrafficPolicy.
fn external_frontends(
    frontends: &mut Vec<PlannedFrontend>,
    external_local: bool,
    kind: FrontendKind,
    key: impl Fn(u8) -> FrontendKey,
) {
    if external_local {
        // Traffic from outside gets local endpoints only (client IP preserved); traffic
        // from this node's pods and host to the same address uses every endpoint, as
        // kube-proxy short-circuits local-origin traffic to the cluster policy.
        frontends.push(PlannedFrontend {
            key: key(SCOPE_EXTERNAL),
            kind,
            local_set: true,
        });
        frontends.push(PlannedFrontend {
            key: key(SCOPE_INTERNAL),
            kind,
            local_set: false,
        });
    } else {
        frontends.push(PlannedFrontend {
            key: key(SCOPE_ANY),
            kind,
            local_set: false,
        });
    }
}

/// Every address/port/protocol a Service asks for with the strongest rank it asks with, sorted:
/// what [`plan_service`]'s conflict check is decided on.
fn service_claims(svc: &parse::ParsedService, config: &CompileConfig) -> Vec<RankedClaim> {
    if frontend_count(svc, config) > config.max_frontends_per_service {
        // Not programmed at all, so it holds nothing another Service could want.
        return Vec::new();
    }
    let mut claims: Vec<RankedClaim> = svc
        .ports
        .iter()
        .flat_map(|p| families(svc).flat_map(move |f| port_frontends(svc, p, config, f)))
        .map(|fe| (claim_of(fe.key), rank_of(fe.kind)))
        .collect();
    // Sorted by claim then rank: the first of each claim is its strongest.
    claims.sort_unstable();
    claims.dedup_by_key(|c| c.0);
    claims
}

/// How many services-map entries `svc` asks for, before conflicts.
fn frontend_count(svc: &parse::ParsedService, config: &CompileConfig) -> usize {
    svc.ports
        .iter()
        .flat_map(|p| families(svc).map(move |f| port_frontends(svc, p, config, f).len()))
        .sum()
}

/// The externalIPs and LoadBalancer IPs of `svc` no Service may take: the special addresses
/// parsing refused and the nodes' own addresses.
fn refused_addresses(svc: &parse::ParsedService, config: &CompileConfig) -> Vec<RejectReason> {
    let refused = |field: &'static str, addr: IpAddr, why: &'static str| {
        RejectReason::RefusedAddress { field, addr, why }
    };
    let node_ips = |field: &'static str, ips: &[Ipv4Addr]| {
        ips.iter()
            .filter(|ip| config.is_node_ip(**ip))
            .map(|ip| refused(field, (*ip).into(), "a node's own address"))
            .collect::<Vec<_>>()
    };
    let node_ips6 = |field: &'static str, ips: &[Ipv6Addr]| {
        ips.iter()
            .filter(|ip| config.is_node_ip6(**ip))
            .map(|ip| refused(field, (*ip).into(), "a node's own address"))
            .collect::<Vec<_>>()
    };
    let mut out: Vec<RejectReason> = svc
        .refused
        .iter()
        .map(|r| refused(r.field, r.addr, r.why))
        .collect();
    out.extend(node_ips("spec.externalIPs", &svc.external_ips));
    out.extend(node_ips("status.loadBalancer.ingress.ip", &svc.lb_ips));
    out.extend(node_ips6("spec.externalIPs", &svc.external_ips6));
    out.extend(node_ips6("status.loadBalancer.ingress.ip", &svc.lb_ips6));
    out
}

/// One Service with its slices, planned: every port's frontends and backend sets. A frontend
/// whose address/port/protocol `owner` gives to another Service is rejected: a ClusterIP wins
/// over any external address equal to it, then the first Service in (namespace, name) order that
/// asks for one keeps it, rather than a later one silently overwriting it.
#[expect(
    clippy::too_many_lines,
    reason = "one pass per port: endpoints, sets, frontends, model"
)]
fn plan_service<'a>(
    namespace: &Arc<str>,
    name: &Arc<str>,
    svc: &parse::ParsedService,
    slices: &[&parse::ParsedSlice],
    config: &CompileConfig,
    owner: impl Fn(Claim) -> Option<&'a (ClaimRank, (Arc<str>, Arc<str>))>,
    rejected: &mut Vec<Rejection>,
) -> (Vec<PlannedPort>, Option<HealthCheck>) {
    let mut planned = Vec::new();
    let mut reject = |reason| {
        rejected.push(Rejection {
            kind: ObjectKind::Service,
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        });
    };
    let count = frontend_count(svc, config);
    if count > config.max_frontends_per_service {
        reject(RejectReason::TooManyFrontends {
            count,
            max: config.max_frontends_per_service,
        });
        return (planned, None);
    }
    for reason in refused_addresses(svc, config) {
        reject(reason);
    }
    // Local ready endpoints per family (index: IPv4, IPv6), for the health check.
    let mut local_ready: [BTreeSet<IpAddr>; 2] = Default::default();
    let port_families = svc
        .ports
        .iter()
        .flat_map(|p| families(svc).map(move |f| (p, f)));
    for (port, family) in port_families {
        // Endpoints of this port: slice ports match by name and protocol; each slice carries
        // the number a named targetPort resolved to for its pods. The same endpoint in two
        // slices (during slice churn) counts once, with its best condition. A family's
        // frontends take the endpoints of that family's slices (`addressType`).
        let mut eps: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
        for slice in slices.iter().filter(|s| s.family == family) {
            let Some(&(_, num, _)) = slice
                .ports
                .iter()
                .find(|(n, _, p)| *n == port.name && *p == port.proto)
            else {
                continue;
            };
            for e in &slice.endpoints {
                let ep = Ep {
                    addr: e.addr,
                    port: num,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    node: e.node.as_ref(),
                    // Locality decides the externalTrafficPolicy=Local set and whether
                    // north-south traffic to the endpoint must be SNATed (a local one's replies
                    // never cross the node's device, so must not be). `nodeName` decides, as
                    // in kube-proxy; without one, the address does.
                    local: match e.node.as_deref() {
                        Some(n) => n == config.node_name.as_str(),
                        None => match e.addr {
                            IpAddr::V4(a) => config.pod_cidrs.iter().any(|c| c.contains(a)),
                            IpAddr::V6(a) => config.pod_cidrs6.iter().any(|c| c.contains(a)),
                        },
                    },
                };
                match eps.get(&(e.addr, num)) {
                    Some(old) if old.rank() >= ep.rank() => {}
                    _ => {
                        eps.insert((e.addr, num), ep);
                    }
                }
            }
        }
        let eps: Vec<Ep> = eps.into_values().collect();
        for e in eps
            .iter()
            .filter(|e| e.local && (svc.publish_not_ready || e.ready))
        {
            local_ready[usize::from(family == IpFamily::V6)].insert(e.addr);
        }
        let cluster = select(&eps, svc.publish_not_ready, false);
        let local = select(&eps, svc.publish_not_ready, true);

        let mut frontends = port_frontends(svc, port, config, family);
        frontends.retain(|fe| match owner(claim_of(fe.key)) {
            Some((rank, o)) if o.0 != *namespace || o.1 != *name => {
                let frontend = frontend_label(fe.key);
                let owner = format!("{}/{}", o.0, o.1);
                let reason = if *rank == ClaimRank::ClusterIp && fe.kind != FrontendKind::ClusterIp
                {
                    RejectReason::ClusterIpConflict { frontend, owner }
                } else {
                    RejectReason::FrontendConflict { frontend, owner }
                };
                rejected.push(Rejection {
                    kind: ObjectKind::Service,
                    namespace: namespace.clone(),
                    name: name.clone(),
                    reason,
                });
                false
            }
            _ => true,
        });
        frontends.sort_by_key(|fe| (fe.kind, fe.key.addr(), fe.key.scope()));

        let uses_local = frontends.iter().any(|fe| fe.local_set);
        let endpoints = eps
            .iter()
            .map(|e| EndpointModel {
                addr: e.addr,
                port: e.port,
                node: e.node.cloned(),
                local: e.local,
                state: e.state(),
                // Sets keep the sorted order of `eps`.
                in_cluster_set: cluster.members.binary_search(&(e.addr, e.port)).is_ok(),
                in_local_set: uses_local && local.members.binary_search(&(e.addr, e.port)).is_ok(),
            })
            .collect();
        let model = ServicePortModel {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port.name.clone(),
            svc_type: svc.ty,
            family,
            proto: port.proto,
            port: port.port,
            node_port: port.node_port,
            affinity_timeout_s: svc.affinity_timeout_s,
            external_local: svc.external_local,
            internal_local: svc.internal_local,
            frontends: Vec::new(),
            endpoints,
            source_ranges: family_ranges(svc, family),
            health_check_node_port: svc.health_check_node_port,
        };
        planned.push(PlannedPort {
            model,
            frontends,
            cluster,
            local,
            affinity_timeout_s: svc.affinity_timeout_s,
            source_ranges: !family_ranges(svc, family).is_empty(),
            set_keys: [false, true].map(|local| SetKey {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port.name.clone(),
                proto: port.proto,
                local,
                family,
            }),
        });
    }
    let health = svc
        .health_check_node_port
        .filter(|_| svc.external_local)
        .map(|np| HealthCheck {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node_port: np,
            // Each family's EndpointSlices list the Service's local endpoints (kube-proxy
            // runs a proxier per family, each counting its own family's). A dual-stack pod is
            // one endpoint in each family, so the families are not added up: the larger count
            // is the number of local endpoints, and a Service whose endpoints are in its
            // secondary family only (an IPv6-only pod behind a dual-stack Service) is healthy.
            local_endpoints: local_ready.iter().map(BTreeSet::len).max().unwrap_or(0),
        });
    (planned, health)
}

/// The ids a planned Service needs: every backend set some frontend uses (with those
/// frontends, whose adopted ids are hints), every backend some used set holds.
fn wanted_ids(ports: &[PlannedPort]) -> (Vec<(SetKey, Vec<FrontendKey>)>, Vec<BackendKey>) {
    let mut sets: BTreeMap<&SetKey, Vec<FrontendKey>> = BTreeMap::new();
    let mut backends: BTreeSet<BackendKey> = BTreeSet::new();
    for p in ports {
        let mut used = [false; 2];
        for fe in &p.frontends {
            used[usize::from(fe.local_set)] = true;
            sets.entry(&p.set_keys[usize::from(fe.local_set)])
                .or_default()
                .push(fe.key);
        }
        for (set, _) in [&p.cluster, &p.local]
            .into_iter()
            .zip(used)
            .filter(|(_, u)| *u)
        {
            backends.extend(set.members.iter().map(|&(addr, port)| BackendKey {
                addr,
                port,
                proto: p.model.proto,
            }));
        }
    }
    (
        sets.into_iter().map(|(k, v)| (k.clone(), v)).collect(),
        backends.into_iter().collect(),
    )
}

/// The map entries of one planned Service under `ids`. Every entry but the backends belongs to
/// this Service alone (its frontends by the conflict rule, its slots and source ranges by its
/// sets' ids); a backend may serve several Services, its flags are the union of theirs.
#[derive(Debug, Default)]
struct ServiceEntries {
    /// In write order: a frontend key listed twice (an External IP equal to the ClusterIP)
    /// keeps the last value, as one map would.
    services: Vec<(FrontendKey, ServiceValue)>,
    slots: Vec<(SlotKey, u32)>,
    backends: Vec<(u32, AnyBackend)>,
    source_ranges: Vec<(u32, IpNetwork)>,
    ports: Vec<ServicePortModel>,
    /// Per port: the backend sets its frontends use (bit 0 cluster-wide, bit 1 node-local).
    sets_used: Vec<u8>,
    /// Ports with at least one frontend written.
    programmed_ports: usize,
    /// Some set or backend had no id (the id space is full).
    starved: bool,
}

/// The flags a backend gets from one Service port: those of its endpoint there.
fn endpoint_flags(model: &ServicePortModel, addr: IpAddr, port: u16) -> u8 {
    // Endpoints are sorted by (addr, port): they came out of a BTreeMap.
    let Ok(i) = model
        .endpoints
        .binary_search_by_key(&(addr, port), |e| (e.addr, e.port))
    else {
        return 0;
    };
    let e = &model.endpoints[i];
    let mut flags = 0;
    if e.local {
        flags |= BE_F_LOCAL;
    }
    if matches!(
        e.state,
        EndpointState::ServingTerminating | EndpointState::Terminating
    ) {
        flags |= BE_F_TERMINATING;
    }
    flags
}

/// The Maglev table size of a port's backend set (`local_set`) of `members` backends: a set
/// that traffic from outside the node reaches gets a table, which the per-packet path picks
/// from (`tc.rs` for IPv4, `ns6.rs` for IPv6); the socket path uses the list alone.
fn maglev_size_of(p: &PlannedPort, local_set: bool, members: usize) -> Option<u32> {
    p.frontends
        .iter()
        .any(|f| f.local_set == local_set && f.kind != FrontendKind::ClusterIp)
        .then(|| maglev::table_size(members))
        .flatten()
}

/// The Maglev table of size `m` (none: no table) over a set's `members` (of either family) as
/// `BACKEND_SLOTS` entries of `svc_id`: backend ids, the one table format of both families.
fn maglev_slots(svc_id: u32, members: &[(u32, AnyBackend)], m: Option<u32>) -> Vec<(SlotKey, u32)> {
    let Some(m) = m else {
        return Vec::new();
    };
    let identities: Vec<maglev::Identity> = members
        .iter()
        .map(|(_, be)| maglev::Identity {
            addr: be.addr(),
            port: be.port(),
        })
        .collect();
    (MAGLEV_SLOT_BASE..)
        .zip(maglev::table(&identities, m))
        .map(|(slot, owner)| (SlotKey { svc_id, slot }, members[owner].0))
        .collect()
}

fn build_entries(
    planned: Vec<PlannedPort>,
    ids: &IdAllocation,
    rejected: &mut Vec<Rejection>,
) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    for mut p in planned {
        out.sets_used.push(
            p.frontends
                .iter()
                .fold(0, |used, fe| used | 1 << u8::from(fe.local_set)),
        );
        let mut slots_written: BTreeSet<bool> = BTreeSet::new();
        let mut port_programmed = false;
        let mut kept = Vec::new();
        for fe in &p.frontends {
            let skey = &p.set_keys[usize::from(fe.local_set)];
            let Some(svc_id) = ids.set_id(skey) else {
                out.starved = true;
                rejected.push(Rejection {
                    kind: ObjectKind::Service,
                    namespace: p.model.namespace.clone(),
                    name: p.model.name.clone(),
                    reason: RejectReason::IdsExhausted("service"),
                });
                continue;
            };
            let set = if fe.local_set { &p.local } else { &p.cluster };
            let mut members: Vec<(u32, AnyBackend)> = Vec::with_capacity(set.members.len());
            for &(addr, port) in &set.members {
                let bkey = BackendKey {
                    addr,
                    port,
                    proto: p.model.proto,
                };
                let Some(id) = ids.backend_id(&bkey) else {
                    out.starved = true;
                    continue;
                };
                let flags = endpoint_flags(&p.model, addr, port);
                members.push((id, AnyBackend::new(addr, port, p.model.proto, flags)));
            }
            if members.len() > usize::from(u16::MAX) {
                if slots_written.is_empty() {
                    rejected.push(Rejection {
                        kind: ObjectKind::Service,
                        namespace: p.model.namespace.clone(),
                        name: p.model.name.clone(),
                        reason: RejectReason::TooManyBackends(members.len()),
                    });
                }
                members.truncate(usize::from(u16::MAX));
            }
            let maglev_size = maglev_size_of(&p, fe.local_set, members.len());
            if slots_written.insert(fe.local_set) {
                for (slot, (id, be)) in (0u32..).zip(&members) {
                    out.slots.push((SlotKey { svc_id, slot }, *id));
                    out.backends.push((*id, *be));
                }
                out.slots
                    .extend(maglev_slots(svc_id, &members, maglev_size));
            }
            let mut flags = fe.kind.flag();
            if p.affinity_timeout_s.is_some() {
                flags |= SVC_F_AFFINITY;
            }
            if fe.local_set {
                flags |= SVC_F_LOCAL_ONLY;
            }
            if set.fallback {
                flags |= SVC_F_TERMINATING_FALLBACK;
            }
            if p.source_ranges && fe.kind == FrontendKind::LoadBalancer {
                flags |= SVC_F_SOURCE_RANGES;
                // Keyed by the backend set's id, which unfiltered frontends (ClusterIP,
                // NodePort) share: only flagged ones consult the trie. The two scopes of an
                // `externalTrafficPolicy: Local` LB IP use two sets, so both ids get the ranges.
                out.source_ranges
                    .extend(p.model.source_ranges.iter().map(|&r| (svc_id, r)));
            }
            let value = ServiceValue {
                svc_id,
                backend_count: u16::try_from(members.len()).unwrap_or(u16::MAX),
                flags,
                affinity_timeout_s: p.affinity_timeout_s.unwrap_or(0),
                maglev_size: maglev_size.unwrap_or(0),
            };
            out.services.push((fe.key, value));
            kept.push(FrontendModel {
                key: fe.key,
                kind: fe.kind,
            });
            port_programmed = true;
        }
        p.model.frontends = kept;
        if port_programmed {
            out.programmed_ports += 1;
        }
        out.ports.push(p.model);
    }
    out
}

/// Compiles the inputs into the desired map contents, from scratch. Never fails: invalid objects
/// are rejected one by one and everything else is compiled. The run loop keeps a [`Compiler`]
/// instead and feeds it only what changed; both give the same result.
pub fn compile(inputs: &Inputs<'_>) -> Compiled {
    let mut interner = parse::Interner::default();
    let mut extra = Vec::new();
    let groups = incremental::group_objects(
        inputs
            .services
            .iter()
            .map(|s| ServiceInput::parse(s, &mut interner))
            .collect(),
        inputs
            .endpoint_slices
            .iter()
            .map(|s| SliceInput::parse(s, &mut interner))
            .collect(),
        inputs.config,
        &mut extra,
    );
    let mut compiler = Compiler::new(inputs.ids.clone());
    compiler.update(inputs.config, inputs.node, groups);
    let mut out = compiler.into_compiled();
    if !extra.is_empty() {
        let rejected = &mut out.model.rejected;
        rejected.extend(extra);
        rejected.sort_by_cached_key(|r| {
            (
                r.kind,
                r.namespace.clone(),
                r.name.clone(),
                r.reason.to_string(),
            )
        });
        rejected.dedup();
    }
    out
}

#[cfg(test)]
mod tests;
