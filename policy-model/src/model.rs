//! The API reference, read literally: a connection needs the client's egress and the server's
//! ingress to allow it; a pod is isolated in a direction by any policy that selects it and has
//! that policy type; an isolated pod's direction allows what any rule of those policies allows.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label the API server puts on every Namespace (immutable, since Kubernetes 1.21).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

/// A container port as a Pod declares it (`containers[].ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// A dual-stack pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug)]
pub struct Namespace {
    pub name: String,
    /// The labels as written; the model adds `kubernetes.io/metadata.name` as the API server does.
    pub labels: Labels,
}

/// The pods and namespaces policies are judged over.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
}

/// One side of a connection: a pod of the topology, or an address that is no pod (outside the
/// cluster, or an unused address of the pod network), which only ipBlocks select.
#[derive(Clone, Copy, Debug)]
pub struct Member<'t> {
    pub ip: IpAddr,
    pub pod: Option<&'t Pod>,
}

impl<'t> Member<'t> {
    /// The pod by its IPv4 address.
    pub fn pod(pod: &'t Pod) -> Self {
        Self {
            ip: IpAddr::V4(pod.ip),
            pod: Some(pod),
        }
    }

    /// The pod by its IPv6 address (a dual-stack pod's).
    pub fn pod6(pod: &'t Pod) -> Self {
        Self {
            ip: IpAddr::V6(pod.ip6.expect("a dual-stack pod")),
            pod: Some(pod),
        }
    }

    pub fn address(ip: impl Into<IpAddr>) -> Self {
        Self {
            ip: ip.into(),
            pod: None,
        }
    }

    /// `namespace/pod`, or the address.
    pub fn name(&self) -> String {
        self.pod.map_or_else(
            || self.ip.to_string(),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    }
}

impl Topology {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// A namespace's labels as selectors see them.
    fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.name == namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), namespace.into());
        labels
    }

    /// A peer of a policy in `policy_ns` selects `m`. Selectors select pods only; ipBlocks select
    /// addresses, pods' included.
    fn peer_selects(&self, peer: &NetworkPolicyPeer, policy_ns: &str, m: Member<'_>) -> bool {
        if let Some(b) = &peer.ip_block {
            return in_cidr(m.ip, &b.cidr) && !b.except.iter().flatten().any(|e| in_cidr(m.ip, e));
        }
        let Some(pod) = m.pod else {
            return false;
        };
        let ns_ok = match &peer.namespace_selector {
            Some(sel) => selector_matches(sel, &self.namespace_labels(&pod.namespace)),
            None => pod.namespace == policy_ns,
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, &pod.labels));
        ns_ok && pod_ok
    }

    /// `client`'s egress allows the connection to `server` on `proto`/`port` (no policy applies
    /// to an address that is no pod).
    pub fn egress_allows(
        &self,
        policies: &[NetworkPolicy],
        client: Member<'_>,
        server: Member<'_>,
        proto: &str,
        port: u16,
    ) -> bool {
        let Some(client_pod) = client.pod else {
            return true;
        };
        let mut isolated = false;
        for np in policies
            .iter()
            .filter(|np| types(np).1 && selects(np, client_pod))
        {
            isolated = true;
            let ns = np.metadata.namespace.as_deref().unwrap_or("default");
            for r in spec(np).egress.iter().flatten() {
                let peer_ok = match r.to.as_deref() {
                    None | Some([]) => true,
                    Some(peers) => peers.iter().any(|p| self.peer_selects(p, ns, server)),
                };
                let port_ok = match r.ports.as_deref() {
                    None | Some([]) => true,
                    Some(ports) => ports.iter().any(|p| port_admits(p, server, proto, port)),
                };
                if peer_ok && port_ok {
                    return true;
                }
            }
        }
        !isolated
    }

    /// `server`'s ingress allows the connection from `client` on `proto`/`port`.
    pub fn ingress_allows(
        &self,
        policies: &[NetworkPolicy],
        client: Member<'_>,
        server: Member<'_>,
        proto: &str,
        port: u16,
    ) -> bool {
        let Some(server_pod) = server.pod else {
            return true;
        };
        let mut isolated = false;
        for np in policies
            .iter()
            .filter(|np| types(np).0 && selects(np, server_pod))
        {
            isolated = true;
            let ns = np.metadata.namespace.as_deref().unwrap_or("default");
            for r in spec(np).ingress.iter().flatten() {
                let peer_ok = match r.from.as_deref() {
                    None | Some([]) => true,
                    Some(peers) => peers.iter().any(|p| self.peer_selects(p, ns, client)),
                };
                let port_ok = match r.ports.as_deref() {
                    None | Some([]) => true,
                    Some(ports) => ports.iter().any(|p| port_admits(p, server, proto, port)),
                };
                if peer_ok && port_ok {
                    return true;
                }
            }
        }
        !isolated
    }

    /// Both sides allow it.
    pub fn allows(
        &self,
        policies: &[NetworkPolicy],
        client: Member<'_>,
        server: Member<'_>,
        proto: &str,
        port: u16,
    ) -> bool {
        self.egress_allows(policies, client, server, proto, port)
            && self.ingress_allows(policies, client, server, proto, port)
    }

    /// The policies (`namespace/name`) isolating `pod`'s ingress and its egress.
    pub fn selecting(&self, policies: &[NetworkPolicy], pod: &Pod) -> (Vec<String>, Vec<String>) {
        let mut out = (Vec::new(), Vec::new());
        for np in policies.iter().filter(|np| selects(np, pod)) {
            let name = format!(
                "{}/{}",
                np.metadata.namespace.as_deref().unwrap_or("default"),
                np.metadata.name.as_deref().unwrap_or_default()
            );
            let (ingress, egress) = types(np);
            if ingress {
                out.0.push(name.clone());
            }
            if egress {
                out.1.push(name);
            }
        }
        out.0.sort();
        out.1.sort();
        out
    }
}

fn spec(np: &NetworkPolicy) -> &k8s_openapi::api::networking::v1::NetworkPolicySpec {
    np.spec.as_ref().expect("a NetworkPolicy has a spec")
}

fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("the API server rejects operator {other}"),
        }
    });
    labels_ok && exprs_ok
}

/// (network, mask) of `a.b.c.d/len`.
pub(crate) fn parse_cidr(s: &str) -> (u32, u32) {
    let (addr, len) = s.split_once('/').expect("CIDR with a prefix length");
    let addr = u32::from(addr.parse::<Ipv4Addr>().expect("an IPv4 CIDR"));
    let len: u32 = len.parse().expect("a prefix length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (addr & mask, mask)
}

/// `ip` lies in `cidr`; never when they are of different families.
fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    match ip {
        IpAddr::V4(ip) if !cidr.contains(':') => {
            let (net, mask) = parse_cidr(cidr);
            u32::from(ip) & mask == net
        }
        IpAddr::V6(ip) if cidr.contains(':') => {
            let (addr, len) = cidr.split_once('/').expect("CIDR with a prefix length");
            let net = u128::from(addr.parse::<Ipv6Addr>().expect("an IPv6 CIDR"));
            let len: u32 = len.parse().expect("a prefix length");
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(ip) & mask == net & mask
        }
        _ => false,
    }
}

/// A policy port admits `proto`/`port` on `server`; a named port needs a pod that declares it
/// (with that protocol and number).
fn port_admits(p: &NetworkPolicyPort, server: Member<'_>, proto: &str, port: u16) -> bool {
    if p.protocol.as_deref().unwrap_or("TCP") != proto {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let lo = i32::from(port) >= *n;
            let hi = i32::from(port) <= p.end_port.unwrap_or(*n);
            lo && hi
        }
        Some(IntOrString::String(name)) => server.pod.is_some_and(|pod| {
            pod.ports
                .iter()
                .any(|c| &c.name == name && c.protocol == proto && c.port == port)
        }),
    }
}

/// (ingress, egress) policy types, defaulted as the API does: Ingress always, Egress when the
/// policy has egress rules.
fn types(np: &NetworkPolicy) -> (bool, bool) {
    let spec = spec(np);
    match spec.policy_types.as_deref() {
        None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(t) => (
            t.iter().any(|t| t == "Ingress"),
            t.iter().any(|t| t == "Egress"),
        ),
    }
}

/// `np` selects `pod`: same namespace, and its podSelector matches (empty = all).
fn selects(np: &NetworkPolicy, pod: &Pod) -> bool {
    np.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace
        && spec(np)
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, &pod.labels))
}
