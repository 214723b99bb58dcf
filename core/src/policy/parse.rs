//! Pods, Namespaces and NetworkPolicies → the compact, validated forms the stores keep and the
//! compiler reads ("parse, don't validate", `HOUSE_STYLE` §11). One check per API rule, one error
//! kind each, a field path that tells the user where: the agent logs, counts and skips an invalid
//! policy, and keeps compiling the others.
//!
//! Validation follows the API server's (`pkg/apis/networking/validation`), so objects from
//! `--manifests DIR`, which no API server checked, are held to the same rules.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use twill_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::compile::Interner;

/// The label the API server puts on every Namespace (KEP-2161); namespaceSelectors rely on it to
/// pick a namespace by name. Namespaces from `--manifests DIR` get it too.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// Labels of a namespace, and of an identity.
pub type Labels = BTreeMap<String, String>;

/// What a selector matches against: a label's value by key.
pub trait LabelSet {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSet for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A pod's labels as the stores keep them: sorted `(key, value)` pairs of shared strings, one
/// allocation per pod. A `BTreeMap<String, String>` allocates a 540-byte node even for one
/// label, and 10,000 pods repeat the same few keys and values (the policy bench's agent-RSS target).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodLabels(Box<[(Arc<str>, Arc<str>)]>);

impl PodLabels {
    /// Keys and values interned in `interner`; a repeated key keeps its last value.
    pub fn new<'a>(
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        interner: &mut Interner,
    ) -> Self {
        let mut pairs: Vec<(Arc<str>, Arc<str>)> = labels
            .into_iter()
            .map(|(k, v)| (interner.intern(k), interner.intern(v)))
            .collect();
        // Stable: of equal keys the last stays last, and dedup keeps the first of a run.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.reverse();
        pairs.dedup_by(|a, b| a.0 == b.0);
        pairs.reverse();
        Self(pairs.into_boxed_slice())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Sets `key` (a pod whose labels were edited).
    pub fn insert(&mut self, key: &str, value: &str) {
        let mut interner = Interner::default();
        let others = self.iter().filter(|(k, _)| *k != key);
        *self = Self::new(others.chain([(key, value)]), &mut interner);
    }

    pub fn to_labels(&self) -> Labels {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl LabelSet for PodLabels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

/// An object the policy compiler cannot identify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("missing field {0}")]
    MissingField(&'static str),
}

/// `status.phase` of a pod. A pod that has `Succeeded` or `Failed` keeps its `podIPs` in the API
/// while the address may already belong to a new pod, so it is no policy peer any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// A named container port: what a policy's named port resolves to on this pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// What NetworkPolicy needs to know of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPod {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: PodLabels,
    /// The first IPv4 address of `status.podIPs` (or `status.podIP`).
    pub ip: Option<Ipv4Addr>,
    /// The first IPv6 address of `status.podIPs` (or `status.podIP`): a dual-stack or
    /// IPv6-only pod's.
    pub ip6: Option<Ipv6Addr>,
    pub node_name: Option<Arc<str>>,
    pub host_network: bool,
    pub phase: PodPhase,
    /// Named ports of the pod's containers, sorted, without duplicates.
    pub named_ports: Vec<NamedPort>,
}

impl PolicyPod {
    pub fn from_k8s(pod: &Pod) -> Result<Self, ObjectError> {
        Self::from_k8s_interned(pod, &mut Interner::default())
    }

    /// [`Self::from_k8s`] with the namespace, node name and label strings shared through
    /// `interner` (a source keeps one for all its pods).
    pub fn from_k8s_interned(pod: &Pod, interner: &mut Interner) -> Result<Self, ObjectError> {
        let (namespace, name) = names(&pod.metadata)?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let addrs = || {
            status.into_iter().flat_map(|s| {
                let listed = s.pod_ips.iter().flatten().map(|p| p.ip.as_str());
                listed
                    .chain(s.pod_ip.as_deref())
                    .filter_map(|a| a.parse::<IpAddr>().ok())
            })
        };
        let ip = addrs().find_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        let ip6 = addrs().find_map(|a| match a {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        });
        let mut named_ports: Vec<NamedPort> = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.as_deref().filter(|n| !n.is_empty())?;
                // A port the API server would reject cannot be a policy's target.
                let proto = parse_protocol(p.protocol.as_deref()).ok()?;
                let port = u16::try_from(p.container_port).ok().filter(|&p| p != 0)?;
                Some(NamedPort {
                    name: name.to_owned(),
                    proto,
                    port,
                })
            })
            .collect();
        named_ports.sort();
        named_ports.dedup();
        let labels = pod.metadata.labels.iter().flatten();
        Ok(Self {
            namespace: interner.intern(namespace),
            name: name.into(),
            labels: PodLabels::new(labels.map(|(k, v)| (k.as_str(), v.as_str())), interner),
            ip,
            ip6,
            node_name: spec
                .and_then(|s| s.node_name.as_deref())
                .map(|n| interner.intern(n)),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            named_ports,
        })
    }

    /// The address by which policies know this pod, if it is a policy peer at all: hostNetwork
    /// pods use the node's addresses (they are never selected and never get an identity); a pod
    /// without an IP is ignored until it has one; a finished pod's address may be reused.
    pub fn policy_ip(&self) -> Option<Ipv4Addr> {
        if self.host_network || self.phase.is_terminal() {
            return None;
        }
        self.ip
    }

    /// [`Self::policy_ip`] of the IPv6 family.
    pub fn policy_ip6(&self) -> Option<Ipv6Addr> {
        if self.host_network || self.phase.is_terminal() {
            return None;
        }
        self.ip6
    }

    /// Every address by which policies know this pod: IPv4 first, then IPv6.
    pub fn policy_ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        let v4 = self.policy_ip().map(IpAddr::V4);
        let v6 = self.policy_ip6().map(IpAddr::V6);
        v4.into_iter().chain(v6)
    }
}

/// What NetworkPolicy needs to know of a Namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyNamespace {
    pub name: Arc<str>,
    /// Including `kubernetes.io/metadata.name` (added when absent).
    pub labels: Labels,
}

impl PolicyNamespace {
    pub fn new(name: &str, mut labels: Labels) -> Self {
        labels.insert(LABEL_NAMESPACE_NAME.to_owned(), name.to_owned());
        Self {
            name: name.into(),
            labels,
        }
    }

    pub fn from_k8s(ns: &Namespace) -> Result<Self, ObjectError> {
        let name = ns
            .metadata
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or(ObjectError::MissingField("metadata.name"))?;
        Ok(Self::new(
            name,
            ns.metadata.labels.clone().unwrap_or_default(),
        ))
    }
}

fn names(meta: &ObjectMeta) -> Result<(&str, &str), ObjectError> {
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(ObjectError::MissingField("metadata.name"))?;
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    Ok((namespace, name))
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorOp {
    /// The label is present with one of these values (`matchLabels` is `In` with one value).
    In(BTreeSet<String>),
    /// The label is absent or has none of these values.
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: SelectorOp,
}

impl Requirement {
    pub fn matches<L: LabelSet + ?Sized>(&self, labels: &L) -> bool {
        let value = labels.label(&self.key);
        match &self.op {
            SelectorOp::In(values) => value.is_some_and(|v| values.contains(v)),
            SelectorOp::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            SelectorOp::Exists => value.is_some(),
            SelectorOp::DoesNotExist => value.is_none(),
        }
    }
}

/// A validated label selector: all requirements must hold (AND). Empty selects everything.
/// Requirements are sorted and deduplicated, so equal selectors compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches<L: LabelSet + ?Sized>(&self, labels: &L) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    fn parse(sel: &LabelSelector, path: &str) -> Result<Self, PolicyError> {
        let mut requirements: Vec<Requirement> = sel
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement {
                key: k.clone(),
                op: SelectorOp::In(BTreeSet::from([v.clone()])),
            })
            .collect();
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let here = || format!("{path}.matchExpressions[{i}]");
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(PolicyError::new(
                        here(),
                        PolicyErrorKind::SelectorValuesRequired(e.operator.clone()),
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(PolicyError::new(
                        here(),
                        PolicyErrorKind::SelectorValuesForbidden(e.operator.clone()),
                    ));
                }
                "In" => SelectorOp::In(values),
                "NotIn" => SelectorOp::NotIn(values),
                "Exists" => SelectorOp::Exists,
                "DoesNotExist" => SelectorOp::DoesNotExist,
                other => {
                    return Err(PolicyError::new(
                        here(),
                        PolicyErrorKind::UnknownOperator(other.to_owned()),
                    ));
                }
            };
            if e.key.is_empty() {
                return Err(PolicyError::new(here(), PolicyErrorKind::EmptySelectorKey));
            }
            requirements.push(Requirement {
                key: e.key.clone(),
                op,
            });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }
}

/// An `ipBlock` peer: addresses in `cidr` and in none of `except`, of one family (the API
/// server rejects an `except` of the other). Canonical (host bits cleared), `except` sorted and
/// deduplicated, so equal blocks compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlockSel {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
}

impl IpBlockSel {
    /// Whether the block holds `ip` (an address of the other family: never).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let within = |n: &IpNetwork| match (n, ip) {
            (IpNetwork::V4(n), IpAddr::V4(a)) => n.contains(a),
            (IpNetwork::V6(n), IpAddr::V6(a)) => n.contains(a),
            _ => false,
        };
        within(&self.cidr) && !self.except.iter().any(within)
    }
}

/// One peer of a rule (`from`/`to` entry).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods selected by both selectors (AND). `namespaces: None` = the policy's own namespace;
    /// `pods: None` = every pod of the selected namespaces.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// An `ipBlock` of either family.
    IpBlock(IpBlockSel),
}

/// Which ports of a protocol a policy port matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSel {
    /// `port` absent: every port of the protocol.
    Any,
    /// `port` (and `endPort`): `lo..=hi`.
    Range(u16, u16),
    /// A named container port of the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMatch {
    pub proto: u8,
    pub port: PortSel,
}

/// One ingress or egress rule. `peers: None` = every peer (`from`/`to` absent or empty);
/// `ports: None` = every protocol and port (`ports` absent or empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortMatch>>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPolicy {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub pod_selector: Selector,
    /// `Ingress` in the (defaulted) policyTypes: the selected pods are ingress-isolated.
    pub isolates_ingress: bool,
    /// `Egress` in the (defaulted) policyTypes.
    pub isolates_egress: bool,
    /// Empty when not `isolates_ingress`: rules of a direction the policy does not cover have
    /// no effect.
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// Why a NetworkPolicy was rejected: where (`path`, in the object's field names) and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct PolicyError {
    pub path: String,
    #[source]
    pub kind: PolicyErrorKind,
}

impl PolicyError {
    fn new(path: String, kind: PolicyErrorKind) -> Self {
        Self { path, kind }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyErrorKind {
    #[error("missing field")]
    MissingField,
    #[error("{0:?} is not a CIDR")]
    BadCidr(String),
    #[error("except {except} is not a strict subset of cidr {cidr}")]
    ExceptOutsideCidr { cidr: String, except: String },
    #[error("{0:?} is not a CIDR of the same address family as cidr")]
    ExceptFamily(String),
    #[error("unknown protocol {0:?} (TCP, UDP or SCTP)")]
    UnknownProtocol(String),
    #[error("port {0} is outside 1..=65535")]
    PortOutOfRange(i64),
    #[error("{0:?} is not a valid port name (1-15 lowercase letters, digits, '-')")]
    BadPortName(String),
    #[error("endPort {end_port} is below port {port}")]
    EndPortBelowPort { port: u16, end_port: i64 },
    #[error("endPort needs a numeric port, not the named port {0:?}")]
    EndPortWithNamedPort(String),
    #[error("endPort needs a port")]
    EndPortWithoutPort,
    #[error("unknown selector operator {0:?} (In, NotIn, Exists, DoesNotExist)")]
    UnknownOperator(String),
    #[error("operator {0} needs values")]
    SelectorValuesRequired(String),
    #[error("operator {0} takes no values")]
    SelectorValuesForbidden(String),
    #[error("empty label key")]
    EmptySelectorKey,
    #[error("a peer must set podSelector, namespaceSelector or ipBlock")]
    EmptyPeer,
    #[error("ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    #[error("unknown policy type {0:?} (Ingress, Egress)")]
    UnknownPolicyType(String),
}

impl PolicyErrorKind {
    /// Short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PolicyErrorKind::MissingField => "missing_field",
            PolicyErrorKind::BadCidr(_) => "bad_cidr",
            PolicyErrorKind::ExceptOutsideCidr { .. } => "except_outside_cidr",
            PolicyErrorKind::ExceptFamily(_) => "except_family",
            PolicyErrorKind::UnknownProtocol(_) => "unknown_protocol",
            PolicyErrorKind::PortOutOfRange(_) => "port_out_of_range",
            PolicyErrorKind::BadPortName(_) => "bad_port_name",
            PolicyErrorKind::EndPortBelowPort { .. } => "end_port_below_port",
            PolicyErrorKind::EndPortWithNamedPort(_) => "end_port_with_named_port",
            PolicyErrorKind::EndPortWithoutPort => "end_port_without_port",
            PolicyErrorKind::UnknownOperator(_) => "unknown_operator",
            PolicyErrorKind::SelectorValuesRequired(_) => "selector_values_required",
            PolicyErrorKind::SelectorValuesForbidden(_) => "selector_values_forbidden",
            PolicyErrorKind::EmptySelectorKey => "empty_selector_key",
            PolicyErrorKind::EmptyPeer => "empty_peer",
            PolicyErrorKind::IpBlockWithSelector => "ip_block_with_selector",
            PolicyErrorKind::UnknownPolicyType(_) => "unknown_policy_type",
        }
    }
}

/// `protocol` of a policy or container port: TCP when absent.
fn parse_protocol(p: Option<&str>) -> Result<u8, PolicyErrorKind> {
    match p {
        None | Some("TCP") => Ok(PROTO_TCP),
        Some("UDP") => Ok(PROTO_UDP),
        Some("SCTP") => Ok(PROTO_SCTP),
        Some(other) => Err(PolicyErrorKind::UnknownProtocol(other.to_owned())),
    }
}

/// IANA_SVC_NAME, as the API server validates a named port.
fn valid_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn port_number(v: i64) -> Result<u16, PolicyErrorKind> {
    u16::try_from(v)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(PolicyErrorKind::PortOutOfRange(v))
}

fn parse_port(p: &NetworkPolicyPort, path: &str) -> Result<PortMatch, PolicyError> {
    let err = |field: &str, kind| PolicyError::new(format!("{path}.{field}"), kind);
    let proto = parse_protocol(p.protocol.as_deref()).map_err(|k| err("protocol", k))?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSel::Any,
        (None, Some(_)) => return Err(err("endPort", PolicyErrorKind::EndPortWithoutPort)),
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(err(
                    "endPort",
                    PolicyErrorKind::EndPortWithNamedPort(name.clone()),
                ));
            }
            if !valid_port_name(name) {
                return Err(err("port", PolicyErrorKind::BadPortName(name.clone())));
            }
            PortSel::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let lo = port_number(i64::from(*n)).map_err(|k| err("port", k))?;
            let hi = match end {
                None => lo,
                Some(e) => {
                    let hi = port_number(i64::from(e)).map_err(|k| err("endPort", k))?;
                    if hi < lo {
                        return Err(err(
                            "endPort",
                            PolicyErrorKind::EndPortBelowPort {
                                port: lo,
                                end_port: i64::from(e),
                            },
                        ));
                    }
                    hi
                }
            };
            PortSel::Range(lo, hi)
        }
    };
    Ok(PortMatch { proto, port })
}

fn parse_ip_block(b: &IPBlock, path: &str) -> Result<Peer, PolicyError> {
    let cidr = b.cidr.parse::<IpNetwork>().map_err(|_| {
        PolicyError::new(
            format!("{path}.cidr"),
            PolicyErrorKind::BadCidr(b.cidr.clone()),
        )
    })?;
    let mut except = Vec::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let here = || format!("{path}.except[{i}]");
        let net = e
            .parse::<IpNetwork>()
            .map_err(|_| PolicyError::new(here(), PolicyErrorKind::BadCidr(e.clone())))?;
        let inside = match (cidr, net) {
            (IpNetwork::V4(c), IpNetwork::V4(n)) => {
                c.contains(n.network()) && n.prefix() > c.prefix()
            }
            (IpNetwork::V6(c), IpNetwork::V6(n)) => {
                c.contains(n.network()) && n.prefix() > c.prefix()
            }
            _ => {
                return Err(PolicyError::new(
                    here(),
                    PolicyErrorKind::ExceptFamily(e.clone()),
                ));
            }
        };
        if !inside {
            return Err(PolicyError::new(
                here(),
                PolicyErrorKind::ExceptOutsideCidr {
                    cidr: b.cidr.clone(),
                    except: e.clone(),
                },
            ));
        }
        except.push(canonical(net));
    }
    except.sort();
    except.dedup();
    Ok(Peer::IpBlock(IpBlockSel {
        cidr: canonical(cidr),
        except,
    }))
}

/// Host bits cleared: `10.1.2.3/8` and `10.0.0.0/8` are one boundary (`fd00::1/64` and
/// `fd00::/64` too).
pub fn canonical(n: IpNetwork) -> IpNetwork {
    match n {
        IpNetwork::V4(n) => IpNetwork::V4(
            Ipv4Network::new(n.network(), n.prefix()).expect("the prefix of a valid network"),
        ),
        IpNetwork::V6(n) => IpNetwork::V6(
            Ipv6Network::new(n.network(), n.prefix()).expect("the prefix of a valid network"),
        ),
    }
}

fn parse_peer(p: &NetworkPolicyPeer, path: &str) -> Result<Peer, PolicyError> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (None, None, None) => Err(PolicyError::new(
            path.to_owned(),
            PolicyErrorKind::EmptyPeer,
        )),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(PolicyError::new(
            path.to_owned(),
            PolicyErrorKind::IpBlockWithSelector,
        )),
        (Some(b), None, None) => parse_ip_block(b, &format!("{path}.ipBlock")),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns
                .as_ref()
                .map(|s| Selector::parse(s, &format!("{path}.namespaceSelector")))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| Selector::parse(s, &format!("{path}.podSelector")))
                .transpose()?,
        }),
    }
}

fn parse_rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    path: &str,
    peers_field: &str,
) -> Result<Rule, PolicyError> {
    let peers = match peers {
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, p) in list.iter().enumerate() {
                out.push(parse_peer(p, &format!("{path}.{peers_field}[{i}]"))?);
            }
            Some(out)
        }
    };
    let ports = match ports {
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| parse_port(p, &format!("{path}.ports[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

impl ParsedPolicy {
    pub fn from_k8s(np: &NetworkPolicy) -> Result<Self, PolicyError> {
        let (namespace, name) = names(&np.metadata)
            .map_err(|_| PolicyError::new("metadata.name".into(), PolicyErrorKind::MissingField))?;
        let spec = np
            .spec
            .as_ref()
            .ok_or_else(|| PolicyError::new("spec".into(), PolicyErrorKind::MissingField))?;
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::parse(s, "spec.podSelector")?,
            None => Selector::default(),
        };
        // Defaulting as the API server does (SetDefaults_NetworkPolicySpec): Ingress always,
        // Egress when there are egress rules.
        let egress_rules = spec.egress.as_deref().unwrap_or_default();
        let (mut isolates_ingress, mut isolates_egress) = (false, false);
        match spec.policy_types.as_deref() {
            None | Some([]) => {
                isolates_ingress = true;
                isolates_egress = !egress_rules.is_empty();
            }
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => isolates_ingress = true,
                        "Egress" => isolates_egress = true,
                        other => {
                            return Err(PolicyError::new(
                                format!("spec.policyTypes[{i}]"),
                                PolicyErrorKind::UnknownPolicyType(other.to_owned()),
                            ));
                        }
                    }
                }
            }
        }
        // Every rule is validated, including those of a direction the policy does not cover:
        // the API server would reject them too.
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                parse_rule(
                    r.from.as_ref(),
                    r.ports.as_ref(),
                    &format!("spec.ingress[{i}]"),
                    "from",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let egress = egress_rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                parse_rule(
                    r.to.as_ref(),
                    r.ports.as_ref(),
                    &format!("spec.egress[{i}]"),
                    "to",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            pod_selector,
            isolates_ingress,
            isolates_egress,
            ingress: if isolates_ingress {
                ingress
            } else {
                Vec::new()
            },
            egress: if isolates_egress { egress } else { Vec::new() },
        })
    }
}
