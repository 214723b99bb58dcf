//! Raw Kubernetes objects → validated, typed views ("parse, don't validate"). One check per rule;
//! a failed check rejects the object with a reason that tells the user what to fix, and the rest
//! of the cluster keeps being compiled.
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::family::IpFamily;
use std::sync::Arc;

use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use twill_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{CompileConfig, ObjectKind, RejectReason, Rejection, SvcType};
use crate::lbmap::canonical_range;

/// `service.kubernetes.io/service-proxy-name`: the Service belongs to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// `service.kubernetes.io/headless`: set on the Endpoints/Services of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Links an `EndpointSlice` to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The API server caps an `EndpointSlice` at 1000 endpoints; more means a broken producer.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
/// sessionAffinityConfig.clientIP.timeoutSeconds default and bounds (API validation).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i64 = 86_400;

/// Shares the strings many objects repeat (namespaces, node names, port names): one allocation
/// per distinct value instead of one per occurrence (50,000 endpoints name a few hundred nodes).
/// Values nothing else holds any more are dropped when the table has doubled since the last
/// sweep, so churn does not grow it without bound.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Interner {
    const MIN_SWEEP: usize = 1024;

    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        if self.strings.len() >= self.sweep_at {
            self.strings.retain(|a| Arc::strong_count(a) > 1);
            self.sweep_at = (self.strings.len() * 2).max(Self::MIN_SWEEP);
        }
        let a: Arc<str> = s.into();
        self.strings.insert(a.clone());
        a
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPort {
    pub name: Arc<str>,
    pub port: u16,
    pub proto: u8,
    pub node_port: Option<u16>,
}

/// What the compiler reads of a valid Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedService {
    pub ty: SvcType,
    /// `spec.clusterIPs` in API order (the primary family first): one address, or one per
    /// family for a dual-stack Service. The API server allocates them from `ipFamilies` and
    /// `ipFamilyPolicy`; the proxy serves whatever was allocated.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilyPolicy` (`None`: not set, as on objects from before dual-stack).
    pub ip_family_policy: Option<IpFamilyPolicy>,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ips: Vec<Ipv4Addr>,
    /// The IPv6 `spec.externalIPs` and LoadBalancer ingress IPs (frontends of the IPv6 ports).
    pub external_ips6: Vec<Ipv6Addr>,
    pub lb_ips6: Vec<Ipv6Addr>,
    pub ports: Vec<ParsedPort>,
    pub affinity_timeout_s: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub publish_not_ready: bool,
    pub source_ranges: Vec<Ipv4Network>,
    /// The IPv6 `spec.loadBalancerSourceRanges`, canonical: they filter the IPv6 LoadBalancer
    /// IPs (the IPv4 ones the IPv4 LoadBalancer IPs).
    pub source_ranges6: Vec<Ipv6Network>,
    pub health_check_node_port: Option<u16>,
    /// External and load-balancer addresses no Service may take ([`special_address`]), left out
    /// of `external_ips`/`lb_ips`; the compiler reports each while programming the rest.
    pub refused: Vec<RefusedAddress>,
}

/// `spec.ipFamilyPolicy`. Informational for the proxy (shown in the dump): the API server turns
/// it into `clusterIPs`, which is what is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    /// The Kubernetes spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
}

/// An address a Service asked for as an external frontend and did not get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAddress {
    pub field: &'static str,
    pub addr: IpAddr,
    /// What the address is (`"loopback"`, `"a node address"`...).
    pub why: &'static str,
}

/// Why `ip` can never be an externalIP or LoadBalancer IP, if it cannot: capturing it would take
/// traffic that is not any Service's (loopback, the pods' link-local gateway 169.254.1.1,
/// multicast), and the unspecified address would become the `NodePort` wildcard key (address 0)
/// in the services map.
pub fn special_address(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// [`special_address`] for IPv6: the unspecified address (the IPv6 `NodePort` wildcard key),
/// loopback, link-local (the pods' gateway `fe80::1` among them), multicast, and IPv4-mapped
/// addresses (the socket path reads those as IPv4 destinations).
pub fn special_address6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unicast_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped")
    } else {
        None
    }
}

/// A Service as the stores keep it: checked once when it arrives, so the Kubernetes object can
/// be dropped right away. Only the `NodePort` range depends on the agent's config; that check
/// is left to [`ServiceInput::admit`], which reproduces the order of the whole validation (the
/// first failing check names the rejection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInput {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// What the cluster's DNS serves of it (also for the Services the datapath leaves alone:
    /// headless and ExternalName ones exist only in DNS).
    pub dns: crate::dns::DnsService,
    /// Outcome of every config-free check: `Ok(None)` when every port is SCTP.
    outcome: Result<Option<ParsedService>, RejectReason>,
    /// Index of the first SCTP port skipped before `outcome` was decided.
    first_sctp: Option<usize>,
    /// `(port index, nodePort)` of each port whose validation reached the range check, in
    /// port order.
    node_ports: Vec<(usize, u16)>,
}

/// One endpoint of a slice, as the stores keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedEndpoint {
    /// Of the slice's `addressType`.
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Interned: most endpoints share a few node names.
    pub node: Option<Arc<str>>,
}

/// What the compiler reads of a valid `EndpointSlice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSlice {
    /// `addressType`: a family's frontends take endpoints from slices of that family only.
    pub family: IpFamily,
    /// (name, port, protocol); the name is "" for an unnamed port, as on the Service.
    pub ports: Vec<(Arc<str>, u16, u8)>,
    pub endpoints: Vec<ParsedEndpoint>,
    /// `(index in endpoints, hostname)` of the endpoints with a hostname, by index: names under
    /// a headless Service in DNS (sparse, since most endpoints have none).
    pub hostnames: Vec<(u32, Arc<str>)>,
}

/// An `EndpointSlice` as the stores keep it (checked once when it arrives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInput {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label (`None` when missing or empty): which Service the
    /// endpoints belong to.
    pub service: Option<Arc<str>>,
    outcome: Result<ParsedSlice, RejectReason>,
}

fn names(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn proto_of(raw: Option<&str>, field: &'static str) -> Result<u8, RejectReason> {
    match raw.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Ok(PROTO_SCTP),
        other => Err(RejectReason::UnknownValue {
            field,
            value: other.to_owned(),
        }),
    }
}

fn port_of(raw: i32, field: &'static str) -> Result<u16, RejectReason> {
    u16::try_from(raw)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(RejectReason::OutOfRange {
            field,
            value: i64::from(raw),
            min: 1,
            max: 65_535,
        })
}

/// An address of either family, `Err` when it is none.
fn ip_of(raw: &str, field: &'static str) -> Result<IpAddr, RejectReason> {
    raw.trim()
        .parse::<IpAddr>()
        .map_err(|_| RejectReason::BadIp {
            field,
            value: raw.to_owned(),
        })
}

/// `Ok(Some(v4))`, `Ok(None)` for an IPv6 address (skipped), `Err` otherwise.
fn ipv4_of(raw: &str, field: &'static str) -> Result<Option<Ipv4Addr>, RejectReason> {
    match raw.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(Some(a)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(RejectReason::BadIp {
            field,
            value: raw.to_owned(),
        }),
    }
}

fn policy_is_local(raw: Option<&str>, field: &'static str) -> Result<bool, RejectReason> {
    match raw {
        None | Some("" | "Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(RejectReason::UnknownValue {
            field,
            value: other.to_owned(),
        }),
    }
}

impl ServiceInput {
    /// Runs every check that does not depend on the agent's config.
    pub fn parse(svc: &Service, interner: &mut Interner) -> Self {
        let (namespace, name) = names(&svc.metadata);
        let mut first_sctp = None;
        let mut node_ports = Vec::new();
        let outcome = service_inner(svc, interner, &mut first_sctp, &mut node_ports);
        Self {
            namespace: interner.intern(namespace),
            name: name.into(),
            dns: crate::dns::DnsService::parse(svc),
            outcome,
            first_sctp,
            node_ports,
        }
    }

    /// The Service to program under `config`, if any; its rejections go to `rejected`.
    pub fn admit(
        &self,
        config: &CompileConfig,
        rejected: &mut Vec<Rejection>,
    ) -> Option<&ParsedService> {
        let mut reject = |reason| {
            rejected.push(Rejection {
                kind: ObjectKind::Service,
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                reason,
            });
        };
        // A nodePort outside the range fails its port before the SCTP skip and the duplicate
        // checks of that port, and after everything of the ports before it.
        let range = &config.nodeport_range;
        if let Some(&(at, np)) = self.node_ports.iter().find(|(_, np)| !range.contains(np)) {
            if self.first_sctp.is_some_and(|i| i < at) {
                reject(sctp_skipped());
            }
            reject(RejectReason::OutOfRange {
                field: "spec.ports.nodePort",
                value: i64::from(np),
                min: i64::from(*range.start()),
                max: i64::from(*range.end()),
            });
            return None;
        }
        if self.first_sctp.is_some() {
            reject(sctp_skipped());
        }
        match &self.outcome {
            Ok(parsed) => parsed.as_ref(),
            Err(reason) => {
                reject(reason.clone());
                None
            }
        }
    }

    /// The Service as far as the config-free checks go (for tests and tools).
    pub fn parsed(&self) -> Option<&ParsedService> {
        self.outcome.as_ref().ok().and_then(Option::as_ref)
    }
}

fn sctp_skipped() -> RejectReason {
    RejectReason::Unsupported("SCTP port skipped (this kernel has no SCTP)")
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per Service field, in API order"
)]
fn service_inner(
    svc: &Service,
    interner: &mut Interner,
    first_sctp: &mut Option<usize>,
    node_ports: &mut Vec<(usize, u16)>,
) -> Result<Option<ParsedService>, RejectReason> {
    if names(&svc.metadata).1.is_empty() {
        return Err(RejectReason::MissingField("metadata.name"));
    }
    if let Some(labels) = &svc.metadata.labels {
        // kube-proxy skips these whatever the value; another proxy or nobody programs them.
        if labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
            return Err(RejectReason::NotProxied(
                "label service.kubernetes.io/service-proxy-name",
            ));
        }
        if labels.contains_key(LABEL_HEADLESS) {
            return Err(RejectReason::NotProxied(
                "label service.kubernetes.io/headless",
            ));
        }
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or(RejectReason::MissingField("spec"))?;
    let ty = match spec.type_.as_deref() {
        None | Some("" | "ClusterIP") => SvcType::ClusterIp,
        Some("NodePort") => SvcType::NodePort,
        Some("LoadBalancer") => SvcType::LoadBalancer,
        Some("ExternalName") => return Err(RejectReason::NotProxied("type ExternalName")),
        Some(other) => {
            return Err(RejectReason::UnknownValue {
                field: "spec.type",
                value: other.to_owned(),
            });
        }
    };
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    if primary == "None" {
        return Err(RejectReason::NotProxied("headless (clusterIP None)"));
    }
    let raw_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ if primary.is_empty() => return Err(RejectReason::MissingField("spec.clusterIP")),
        _ => vec![primary],
    };
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for raw in raw_ips {
        let ip = raw
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| RejectReason::BadIp {
                field: "spec.clusterIPs",
                value: raw.to_owned(),
            })?;
        // The API server allows at most one address per family (dual-stack KEP-563).
        if cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) {
            return Err(RejectReason::UnknownValue {
                field: "spec.clusterIPs",
                value: format!("a second {} address {ip}", IpFamily::of(ip).as_str()),
            });
        }
        cluster_ips.push(ip);
    }
    for raw in spec.ip_families.as_deref().unwrap_or_default() {
        if raw != "IPv4" && raw != "IPv6" {
            return Err(RejectReason::UnknownValue {
                field: "spec.ipFamilies",
                value: raw.clone(),
            });
        }
    }
    let ip_family_policy = match spec.ip_family_policy.as_deref() {
        None | Some("") => None,
        Some("SingleStack") => Some(IpFamilyPolicy::SingleStack),
        Some("PreferDualStack") => Some(IpFamilyPolicy::PreferDualStack),
        Some("RequireDualStack") => Some(IpFamilyPolicy::RequireDualStack),
        Some(other) => {
            return Err(RejectReason::UnknownValue {
                field: "spec.ipFamilyPolicy",
                value: other.to_owned(),
            });
        }
    };

    let raw_ports = spec.ports.as_deref().unwrap_or_default();
    if raw_ports.is_empty() {
        return Err(RejectReason::MissingField("spec.ports"));
    }
    let mut ports: Vec<ParsedPort> = Vec::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let parsed = service_port(p, ty, interner)?;
        if let Some(np) = parsed.node_port {
            node_ports.push((i, np));
        }
        if parsed.proto == PROTO_SCTP {
            first_sctp.get_or_insert(i);
            continue;
        }
        if ports.iter().any(|q| q.name == parsed.name) {
            return Err(RejectReason::DuplicatePortName(parsed.name.to_string()));
        }
        if ports
            .iter()
            .any(|q| q.port == parsed.port && q.proto == parsed.proto)
        {
            return Err(RejectReason::DuplicatePort {
                port: parsed.port,
                proto: proto_name(parsed.proto),
            });
        }
        if let Some(np) = parsed.node_port
            && ports
                .iter()
                .any(|q| q.node_port == Some(np) && q.proto == parsed.proto)
        {
            return Err(RejectReason::DuplicatePort {
                port: np,
                proto: proto_name(parsed.proto),
            });
        }
        ports.push(parsed);
    }
    if ports.is_empty() {
        return Ok(None);
    }

    let mut refused = Vec::new();
    let mut external_ips = Vec::new();
    let mut external_ips6 = Vec::new();
    let mut lb_ips = Vec::new();
    let mut lb_ips6 = Vec::new();
    let mut admit_external = |ip: IpAddr, field: &'static str, lb: bool| {
        let why = match ip {
            IpAddr::V4(a) => special_address(a),
            IpAddr::V6(a) => special_address6(a),
        };
        match (why, ip) {
            (Some(why), _) => refused.push(RefusedAddress {
                field,
                addr: ip,
                why,
            }),
            (None, IpAddr::V4(a)) if lb => lb_ips.push(a),
            (None, IpAddr::V4(a)) => external_ips.push(a),
            (None, IpAddr::V6(a)) if lb => lb_ips6.push(a),
            (None, IpAddr::V6(a)) => external_ips6.push(a),
        }
    };
    for raw in spec.external_ips.as_deref().unwrap_or_default() {
        admit_external(ip_of(raw, "spec.externalIPs")?, "spec.externalIPs", false);
    }
    if ty == SvcType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.map(Vec::as_slice).unwrap_or_default() {
            // ipMode Proxy: the load balancer itself proxies to the NodePorts, so the node must not
            // capture traffic to the LB IP (KEP-1860).
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(raw) = ing.ip.as_deref() {
                let field = "status.loadBalancer.ingress.ip";
                admit_external(ip_of(raw, field)?, field, true);
            }
        }
    }
    for v in [&mut external_ips6, &mut lb_ips6] {
        v.sort_unstable();
        v.dedup();
    }
    external_ips.sort_unstable();
    external_ips.dedup();
    lb_ips.sort_unstable();
    lb_ips.dedup();
    refused.sort_unstable_by_key(|r| (r.field, r.addr));
    refused.dedup();

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("" | "None") => None,
        Some("ClientIP") => {
            let raw = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match raw {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&i64::from(t)) => {
                    Some(t.unsigned_abs())
                }
                Some(t) => {
                    return Err(RejectReason::OutOfRange {
                        field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        value: i64::from(t),
                        min: 1,
                        max: MAX_AFFINITY_TIMEOUT_S,
                    });
                }
            }
        }
        Some(other) => {
            return Err(RejectReason::UnknownValue {
                field: "spec.sessionAffinity",
                value: other.to_owned(),
            });
        }
    };
    let external_local = policy_is_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_local = policy_is_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;

    let mut source_ranges = Vec::new();
    let mut source_ranges6 = Vec::new();
    if ty == SvcType::LoadBalancer {
        for raw in spec
            .load_balancer_source_ranges
            .as_deref()
            .unwrap_or_default()
        {
            let raw = raw.trim();
            if raw.contains(':') {
                let net = raw
                    .parse::<Ipv6Network>()
                    .map_err(|_| RejectReason::BadCidr {
                        field: "spec.loadBalancerSourceRanges",
                        value: raw.to_owned(),
                    })?;
                source_ranges6.push(Ipv6Network::new(net.network(), net.prefix()).unwrap_or(net));
                continue;
            }
            let net = raw
                .parse::<Ipv4Network>()
                .map_err(|_| RejectReason::BadCidr {
                    field: "spec.loadBalancerSourceRanges",
                    value: raw.to_owned(),
                })?;
            // `10.1.2.3/8` allows what `10.0.0.0/8` does; one form per range, as the kernel's
            // trie key stores it.
            source_ranges.push(canonical_range(net));
        }
        source_ranges.sort_unstable();
        source_ranges.dedup();
        source_ranges6.sort_unstable();
        source_ranges6.dedup();
    }
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => Some(port_of(p, "spec.healthCheckNodePort")?),
    };

    Ok(Some(ParsedService {
        ty,
        cluster_ips,
        ip_family_policy,
        external_ips,
        lb_ips,
        external_ips6,
        lb_ips6,
        ports,
        affinity_timeout_s,
        external_local,
        internal_local,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        source_ranges,
        source_ranges6,
        health_check_node_port,
        refused,
    }))
}

/// One port, SCTP included (the caller skips those); the `nodePort` range is checked later, by
/// [`ServiceInput::admit`].
fn service_port(
    p: &ServicePort,
    ty: SvcType,
    interner: &mut Interner,
) -> Result<ParsedPort, RejectReason> {
    let port = port_of(p.port, "spec.ports.port")?;
    let proto = proto_of(p.protocol.as_deref(), "spec.ports.protocol")?;
    let node_port = match (ty, p.node_port) {
        (SvcType::ClusterIp, _) | (SvcType::LoadBalancer, None | Some(0)) => None,
        (SvcType::NodePort, None | Some(0)) => {
            return Err(RejectReason::MissingField("spec.ports.nodePort"));
        }
        (_, Some(raw)) => Some(port_of(raw, "spec.ports.nodePort")?),
    };
    Ok(ParsedPort {
        name: interner.intern(p.name.as_deref().unwrap_or_default()),
        port,
        proto,
        node_port,
    })
}

pub(crate) fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".to_owned(),
        PROTO_UDP => "UDP".to_owned(),
        PROTO_SCTP => "SCTP".to_owned(),
        other => format!("proto-{other}"),
    }
}

impl SliceInput {
    /// Validates an `EndpointSlice`. An invalid slice is rejected as a whole: programming part
    /// of it would silently shift load onto the endpoints that happened to parse.
    pub fn parse(s: &EndpointSlice, interner: &mut Interner) -> Self {
        let (namespace, name) = names(&s.metadata);
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|n| !n.is_empty())
            .map(|n| Arc::from(n.as_str()));
        Self {
            namespace: interner.intern(namespace),
            name: name.into(),
            outcome: slice_inner(s, name, service.is_some(), interner),
            service,
        }
    }

    /// The endpoints to program, if the slice is valid; else its rejection goes to `rejected`.
    pub fn parsed(&self, rejected: &mut Vec<Rejection>) -> Option<&ParsedSlice> {
        match &self.outcome {
            Ok(parsed) => Some(parsed),
            Err(reason) => {
                rejected.push(Rejection {
                    kind: ObjectKind::EndpointSlice,
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    reason: reason.clone(),
                });
                None
            }
        }
    }
}

fn slice_inner(
    s: &EndpointSlice,
    name: &str,
    labelled: bool,
    interner: &mut Interner,
) -> Result<ParsedSlice, RejectReason> {
    if name.is_empty() {
        return Err(RejectReason::MissingField("metadata.name"));
    }
    if !labelled {
        return Err(RejectReason::MissingField(
            "metadata.labels[kubernetes.io/service-name]",
        ));
    }
    let family = match s.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => {
            return Err(RejectReason::Unsupported(
                "addressType FQDN (deprecated, never proxied)",
            ));
        }
        other => {
            return Err(RejectReason::UnknownValue {
                field: "addressType",
                value: other.to_owned(),
            });
        }
    };
    let raw_eps = s.endpoints.as_deref().unwrap_or_default();
    if raw_eps.len() > MAX_SLICE_ENDPOINTS {
        return Err(RejectReason::OversizedSlice {
            count: raw_eps.len(),
            max: MAX_SLICE_ENDPOINTS,
        });
    }
    let mut ports = Vec::new();
    for p in s.ports.as_deref().unwrap_or_default() {
        // A port without a number means "all ports": only used for headless Services.
        let Some(raw) = p.port else { continue };
        let port = port_of(raw, "ports.port")?;
        let proto = proto_of(p.protocol.as_deref(), "ports.protocol")?;
        ports.push((
            interner.intern(p.name.as_deref().unwrap_or_default()),
            port,
            proto,
        ));
    }
    let mut endpoints = Vec::with_capacity(raw_eps.len());
    let mut hostnames = Vec::new();
    for (i, ep) in raw_eps.iter().enumerate() {
        if let Some(h) = ep.hostname.as_deref().filter(|h| !h.is_empty())
            && let Ok(i) = u32::try_from(i)
        {
            hostnames.push((i, Arc::from(h)));
        }
        // Consumers use the first address; the others are duplicates by API contract.
        let raw = ep
            .addresses
            .first()
            .ok_or(RejectReason::MissingField("endpoints.addresses"))?;
        let addr = raw
            .parse::<IpAddr>()
            .ok()
            .filter(|a| IpFamily::of(*a) == family)
            .ok_or_else(|| RejectReason::BadIp {
                field: "endpoints.addresses",
                value: raw.clone(),
            })?;
        let cond = ep.conditions.as_ref();
        // API semantics: nil ready and nil serving mean true, nil terminating means false.
        endpoints.push(ParsedEndpoint {
            addr,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node: ep
                .node_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(|n| interner.intern(n)),
        });
    }
    Ok(ParsedSlice {
        family,
        ports,
        endpoints,
        hostnames,
    })
}

/// The IPv4 addresses `NodePort` answers on: the configured ones, else this Node's `InternalIP` and
/// `ExternalIP` addresses; filtered by `nodeport_cidrs` when set (kube-proxy's
/// `--nodeport-addresses`).
pub(crate) fn node_addrs(
    node: Option<&Node>,
    config: &CompileConfig,
    rejected: &mut Vec<Rejection>,
) -> Vec<Ipv4Addr> {
    let mut addrs = config.nodeport_addresses.clone();
    if addrs.is_empty()
        && let Some(node) = node
    {
        let name: Arc<str> = names(&node.metadata).1.into();
        if *name == *config.node_name {
            let list = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_deref())
                .unwrap_or_default();
            for a in list
                .iter()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            {
                match ipv4_of(&a.address, "status.addresses") {
                    Ok(Some(ip)) => addrs.push(ip),
                    Ok(None) => {}
                    Err(reason) => rejected.push(Rejection {
                        kind: ObjectKind::Node,
                        namespace: "".into(),
                        name: name.clone(),
                        reason,
                    }),
                }
            }
        } else {
            rejected.push(Rejection {
                kind: ObjectKind::Node,
                namespace: "".into(),
                name,
                reason: RejectReason::NotThisNode(config.node_name.clone()),
            });
        }
    }
    if !config.nodeport_cidrs.is_empty() {
        addrs.retain(|a| config.nodeport_cidrs.iter().any(|n| n.contains(*a)));
    }
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// The IPv6 addresses IPv6 `NodePort` frontends answer on: the configured ones, else this
/// Node's IPv6 `InternalIP` and `ExternalIP` addresses; filtered by `nodeport_cidrs6` when set.
/// Malformed addresses and another Node's object are reported by [`node_addrs`].
pub(crate) fn node_addrs6(node: Option<&Node>, config: &CompileConfig) -> Vec<Ipv6Addr> {
    let mut addrs = config.nodeport_addresses6.clone();
    if addrs.is_empty()
        && let Some(node) = node
        && names(&node.metadata).1 == config.node_name
    {
        addrs.extend(
            node.status
                .as_ref()
                .and_then(|s| s.addresses.as_deref())
                .unwrap_or_default()
                .iter()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| match a.address.trim().parse::<IpAddr>() {
                    Ok(IpAddr::V6(ip)) => Some(ip),
                    _ => None,
                }),
        );
    }
    if !config.nodeport_cidrs6.is_empty() {
        addrs.retain(|a| config.nodeport_cidrs6.iter().any(|n| n.contains(*a)));
    }
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// [`all_node_ips`] for IPv6 ([`CompileConfig::node_ips6`]).
pub fn all_node_ips6<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<Ipv6Addr> {
    let mut out: Vec<Ipv6Addr> = nodes
        .into_iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_deref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| match a.address.trim().parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Every Node's `InternalIP` and `ExternalIP` IPv4 addresses, sorted and deduplicated: the
/// addresses no Service may take as an external frontend ([`CompileConfig::node_ips`]). Malformed
/// addresses are skipped here; the routing plan reports its Nodes' errors.
pub fn all_node_ips<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nodes
        .into_iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_deref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        // A malformed address is reported where the Node itself is parsed; here it only means
        // one address fewer to refuse.
        .filter_map(|a| ipv4_of(&a.address, "status.addresses").unwrap_or_default())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
