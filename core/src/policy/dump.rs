//! The stable text form of the policy maps, named with what the compile knows about their
//! numbers: what the golden tests compare and `twill-agent debug policy` prints (`HOUSE_STYLE`
//! §13). It renders the maps it is given, so the maps read back from the kernel can be shown
//! against the compiled names; an id the compile does not know shows as `?`.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use twill_common::{
    IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, PEP_F_EGRESS_ISOLATED, PEP_F_INGRESS_ISOLATED,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_PORT_BASE, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP,
};

use super::compile::{
    CidrClass, Direction, IdentityKind, PolicyEntries, PolicyState, RuleRef, addr_from_be,
    addr6_from_be,
};
use super::parse::{Labels, NamedPort};
use super::verdict::{Judgement, Verdict};

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        other => format!("proto{other}"),
    }
}

fn labels_text(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", inner.join(","))
}

fn ports_text(ports: &[NamedPort]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    let inner: Vec<String> = ports
        .iter()
        .map(|p| format!("{}={}/{}", p.name, p.port, proto_name(p.proto)))
        .collect();
    inner.join(",")
}

pub fn class_text(class: &CidrClass) -> String {
    if class.is_empty() {
        return "-".into();
    }
    let inner: Vec<String> = class
        .iter()
        .map(|b| {
            if b.except.is_empty() {
                b.cidr.to_string()
            } else {
                let ex: Vec<String> = b.except.iter().map(ToString::to_string).collect();
                format!("{}-except-{}", b.cidr, ex.join("+"))
            }
        })
        .collect();
    format!("[{}]", inner.join(" "))
}

pub fn identity_text(kind: &IdentityKind) -> String {
    match kind {
        IdentityKind::Pod {
            namespace,
            labels,
            named_ports,
            class,
        } => format!(
            "pod ns={namespace} labels={} ports={} class={}",
            labels_text(labels),
            ports_text(named_ports),
            class_text(class)
        ),
        IdentityKind::Cidr { class } => format!("cidr class={}", class_text(class)),
    }
}

/// Shorter than [`identity_text`]: without named ports, class only when there is one.
pub fn identity_short(kind: &IdentityKind) -> String {
    match kind {
        IdentityKind::Pod {
            namespace,
            labels,
            class,
            ..
        } if class.is_empty() => format!("pods ns={namespace} {}", labels_text(labels)),
        IdentityKind::Pod {
            namespace,
            labels,
            class,
            ..
        } => format!(
            "pods ns={namespace} {} in {}",
            labels_text(labels),
            class_text(class)
        ),
        IdentityKind::Cidr { class } => format!("addresses in {}", class_text(class)),
    }
}

pub fn rule_text(r: &RuleRef) -> String {
    let peers = match r.direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let peer = r
        .peer
        .map_or_else(|| format!("{peers}=all"), |i| format!("{peers}[{i}]"));
    let port = r
        .port
        .map_or_else(|| "ports=all".into(), |i| format!("ports[{i}]"));
    format!(
        "{}/{} {}[{}] {peer} {port}",
        r.namespace,
        r.name,
        r.direction.as_str(),
        r.rule
    )
}

/// `any`, `TCP any-port`, `TCP 80`, `TCP 80-95` from a policy key's protocol/port prefix.
pub fn port_text(proto: u8, port: u16, prefix_len: u32) -> String {
    if prefix_len <= POLICY_PREFIX_ANY_PROTO {
        return "any".into();
    }
    if prefix_len < POLICY_PREFIX_PORT_BASE {
        let suffix = if prefix_len == POLICY_PREFIX_ANY_PORT {
            ""
        } else {
            "?"
        };
        return format!("{} any-port{suffix}", proto_name(proto));
    }
    let bits = prefix_len - POLICY_PREFIX_PORT_BASE;
    if bits >= 16 {
        return format!("{} {port}", proto_name(proto));
    }
    let span = (1u32 << (16 - bits)) - 1;
    format!("{} {port}-{}", proto_name(proto), u32::from(port) + span)
}

fn identity_name(state: &PolicyState, id: u32) -> String {
    match id {
        IDENTITY_ANY => "any".into(),
        IDENTITY_WORLD => "world".into(),
        IDENTITY_HOST => "host".into(),
        other if state.identities.contains_key(&other) => other.to_string(),
        other => format!("{other}?"),
    }
}

fn policy_list(list: &[(std::sync::Arc<str>, std::sync::Arc<str>)]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    let names: Vec<String> = list.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
    names.join(",")
}

/// The `endpoint` lines of [`render_dump`].
fn render_endpoints(maps: &PolicyEntries, state: &PolicyState, out: &mut String) {
    // IPv4 before IPv6 (`IpAddr`'s order), each family by address.
    let mut endpoints: Vec<(IpAddr, _)> = maps
        .endpoints
        .iter()
        .map(|(&a, &e)| (IpAddr::V4(addr_from_be(a)), e))
        .chain(
            maps.endpoints6
                .iter()
                .map(|(&a, &e)| (IpAddr::V6(addr6_from_be(a)), e)),
        )
        .collect();
    endpoints.sort();
    for (ip, ep) in endpoints {
        let mut iso = Vec::new();
        if ep.flags & PEP_F_INGRESS_ISOLATED != 0 {
            iso.push("ingress");
        }
        if ep.flags & PEP_F_EGRESS_ISOLATED != 0 {
            iso.push("egress");
        }
        let iso = if iso.is_empty() {
            "none".into()
        } else {
            iso.join(",")
        };
        match state.local_pods.get(&ep.ep_id) {
            Some(p) => {
                let identity = match ip {
                    IpAddr::V6(_) => p.identity6.unwrap_or(p.identity),
                    IpAddr::V4(_) => p.identity,
                };
                let _ = writeln!(
                    *out,
                    "endpoint {ip} ep={} pod={}/{} identity={identity} isolated={iso} ingress-by={} egress-by={}",
                    ep.ep_id,
                    p.namespace,
                    p.name,
                    policy_list(&p.ingress_policies),
                    policy_list(&p.egress_policies),
                );
            }
            None => {
                let _ = writeln!(*out, "endpoint {ip} ep={}? isolated={iso}", ep.ep_id);
            }
        }
    }
}

/// Renders `maps` (the compiled ones, or what the kernel holds) named after `state`.
pub fn render_dump(maps: &PolicyEntries, state: &PolicyState) -> String {
    let mut out = String::new();
    render_endpoints(maps, state, &mut out);
    for (id, kind) in &state.identities {
        let _ = writeln!(out, "identity {id} {}", identity_text(kind));
    }
    let mut ipcache: Vec<(IpAddr, u32, u32)> = maps
        .ipcache
        .iter()
        .map(|(k, v)| (IpAddr::V4(addr_from_be(k.data.addr_be)), k.prefix_len, v.id))
        .chain(maps.ipcache6.iter().map(|(k, v)| {
            (
                IpAddr::V6(addr6_from_be(k.data.addr_be)),
                k.prefix_len,
                v.id,
            )
        }))
        .collect();
    ipcache.sort_unstable();
    for (addr, len, id) in ipcache {
        let _ = writeln!(out, "ipcache {addr}/{len} -> {}", identity_name(state, id));
    }
    let mut policy: Vec<_> = maps
        .policy
        .iter()
        .map(|(k, v)| {
            let d = &k.data;
            (
                u32::from_be(d.ep_id_be),
                d.direction,
                u32::from_be(d.identity_be),
                d.proto,
                u16::from_be(d.port_be),
                k.prefix_len,
                v.rule_id,
            )
        })
        .collect();
    policy.sort_unstable();
    for (ep, dir, id, proto, port, len, rule) in policy {
        let (dir, peer) = match Direction::from_u8(dir) {
            Some(Direction::Ingress) => ("ingress", "from"),
            Some(Direction::Egress) => ("egress", "to"),
            None => ("direction?", "peer"),
        };
        let known = if state.rules.contains_key(&rule) {
            ""
        } else {
            "?"
        };
        let _ = writeln!(
            out,
            "policy ep={ep} {dir} {peer}={} {} -> rule {rule}{known}",
            identity_name(state, id),
            port_text(proto, port, len)
        );
    }
    for (id, r) in &state.rules {
        let _ = writeln!(out, "rule {id} {}", rule_text(r));
    }
    out
}

impl PolicyState {
    /// The compiled maps, rendered.
    pub fn dump(&self) -> String {
        render_dump(&self.maps, self)
    }
}

/// One allow entry of a local pod, as `debug policy` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EntryView {
    /// `any`, `world`, `host`, or the identity's short description.
    pub peer: String,
    pub identity: u32,
    /// `any`, `TCP any-port`, `TCP 80`, `TCP 80-95`.
    pub ports: String,
    pub rule_id: u32,
    /// The policy part the rule id names (`ns/name ingress[0] from[1] ports[0]`), `?` if unknown.
    pub rule: String,
}

/// A local pod's effective policy: what isolates it, which policies select it, and every allow
/// entry the maps hold for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodPolicyView {
    pub namespace: String,
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub endpoint: u32,
    pub identity: u32,
    /// The IPv6 address's identity, when the pod has one.
    pub identity6: Option<u32>,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    pub ingress: Vec<EntryView>,
    pub egress: Vec<EntryView>,
}

/// The view of every local pod in `maps` that `state` knows, sorted by namespace/name.
pub fn pod_views(maps: &PolicyEntries, state: &PolicyState) -> Vec<PodPolicyView> {
    let describe = |id: u32| match id {
        IDENTITY_ANY | IDENTITY_WORLD | IDENTITY_HOST => identity_name(state, id),
        other => state
            .identities
            .get(&other)
            .map_or_else(|| format!("{other}?"), |k| identity_short(k)),
    };
    let mut by_ep: std::collections::BTreeMap<u32, [Vec<EntryView>; 2]> =
        std::collections::BTreeMap::new();
    for (k, v) in &maps.policy {
        let d = &k.data;
        let Some(dir) = Direction::from_u8(d.direction) else {
            continue;
        };
        let identity = u32::from_be(d.identity_be);
        let entry = EntryView {
            peer: describe(identity),
            identity,
            ports: port_text(d.proto, u16::from_be(d.port_be), k.prefix_len),
            rule_id: v.rule_id,
            rule: state
                .rules
                .get(&v.rule_id)
                .map_or_else(|| "?".into(), rule_text),
        };
        by_ep.entry(u32::from_be(d.ep_id_be)).or_default()[usize::from(dir == Direction::Egress)]
            .push(entry);
    }
    let names = |l: &[(std::sync::Arc<str>, std::sync::Arc<str>)]| -> Vec<String> {
        l.iter().map(|(ns, n)| format!("{ns}/{n}")).collect()
    };
    // A dual-stack pod's endpoint is in both maps; it is shown once.
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<PodPolicyView> = maps
        .endpoints
        .values()
        .chain(maps.endpoints6.values())
        .filter(|ep| seen.insert(ep.ep_id))
        .filter_map(|ep| {
            let p = state.local_pods.get(&ep.ep_id)?;
            let [ingress, egress] = by_ep.remove(&ep.ep_id).unwrap_or_default();
            Some(PodPolicyView {
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
                ip: p.ip,
                ip6: p.ip6,
                endpoint: ep.ep_id,
                identity: p.identity,
                identity6: p.identity6,
                ingress_isolated: ep.flags & PEP_F_INGRESS_ISOLATED != 0,
                egress_isolated: ep.flags & PEP_F_EGRESS_ISOLATED != 0,
                ingress_policies: names(&p.ingress_policies),
                egress_policies: names(&p.egress_policies),
                ingress,
                egress,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// `debug policy`'s text: per pod, its isolation, selecting policies and allow entries.
pub fn render_pod_views(views: &[PodPolicyView]) -> String {
    let mut out = String::new();
    for v in views {
        let addrs: Vec<String> =
            v.ip.map(|a| a.to_string())
                .into_iter()
                .chain(v.ip6.map(|a| a.to_string()))
                .collect();
        let identity6 = match v.identity6 {
            Some(id) if v.ip.is_some() => format!(" identity6={id}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{}/{} {} ep={} identity={}{identity6}",
            v.namespace,
            v.name,
            addrs.join(","),
            v.endpoint,
            v.identity
        );
        for (dir, isolated, policies, entries, peer) in [
            (
                "ingress",
                v.ingress_isolated,
                &v.ingress_policies,
                &v.ingress,
                "from",
            ),
            (
                "egress",
                v.egress_isolated,
                &v.egress_policies,
                &v.egress,
                "to",
            ),
        ] {
            if !isolated {
                let _ = writeln!(out, "  {dir}: not isolated (all allowed)");
                continue;
            }
            let _ = writeln!(out, "  {dir}: isolated by {}", policies.join(","));
            if entries.is_empty() {
                let _ = writeln!(out, "    (nothing allowed)");
            }
            for e in entries {
                let _ = writeln!(
                    out,
                    "    allow {peer} {} {} (rule {}: {})",
                    e.peer, e.ports, e.rule_id, e.rule
                );
            }
        }
    }
    out
}

/// One side of a verdict, named, as `debug explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JudgementView {
    /// `unmanaged`, `not-isolated`, `from-host`, `allowed`, `denied`.
    pub outcome: &'static str,
    /// The local pod judging (`ns/name`), if any.
    pub pod: Option<String>,
    /// The peer's identity and what it stands for, when the trie was consulted.
    pub peer_identity: Option<u32>,
    pub peer: Option<String>,
    pub rule_id: Option<u32>,
    pub rule: Option<String>,
    /// The matching trie entry (`ingress from=256 TCP 80`).
    pub entry: Option<String>,
}

/// `debug explain`'s answer for one connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExplainView {
    pub allowed: bool,
    /// The client's egress.
    pub egress: JudgementView,
    /// The server's ingress.
    pub ingress: JudgementView,
}

/// Names a verdict's numbers with what `state` knows.
pub fn explain_view(state: &PolicyState, verdict: &Verdict) -> ExplainView {
    let pod = |ep: u32| {
        state.local_pods.get(&ep).map_or_else(
            || format!("ep {ep}?"),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    };
    let peer = |id: u32| match id {
        IDENTITY_ANY | IDENTITY_WORLD | IDENTITY_HOST => identity_name(state, id),
        other => state
            .identities
            .get(&other)
            .map_or_else(|| format!("{other}?"), |k| identity_short(k)),
    };
    let side = |j: &Judgement| {
        let empty = JudgementView {
            outcome: "unmanaged",
            pod: None,
            peer_identity: None,
            peer: None,
            rule_id: None,
            rule: None,
            entry: None,
        };
        match *j {
            Judgement::Unmanaged => empty,
            Judgement::NotIsolated { ep_id } => JudgementView {
                outcome: "not-isolated",
                pod: Some(pod(ep_id)),
                ..empty
            },
            Judgement::FromHost { ep_id } => JudgementView {
                outcome: "from-host",
                pod: Some(pod(ep_id)),
                peer_identity: Some(IDENTITY_HOST),
                peer: Some(peer(IDENTITY_HOST)),
                ..empty
            },
            Judgement::Allowed {
                ep_id,
                identity,
                rule_id,
                key,
            } => {
                let d = &key.data;
                let (dir, to) = match Direction::from_u8(d.direction) {
                    Some(Direction::Egress) => ("egress", "to"),
                    _ => ("ingress", "from"),
                };
                JudgementView {
                    outcome: "allowed",
                    pod: Some(pod(ep_id)),
                    peer_identity: Some(identity),
                    peer: Some(peer(identity)),
                    rule_id: Some(rule_id),
                    rule: Some(
                        state
                            .rules
                            .get(&rule_id)
                            .map_or_else(|| "?".into(), rule_text),
                    ),
                    entry: Some(format!(
                        "{dir} {to}={} {}",
                        identity_name(state, u32::from_be(d.identity_be)),
                        port_text(d.proto, u16::from_be(d.port_be), key.prefix_len)
                    )),
                }
            }
            Judgement::Denied { ep_id, identity } => JudgementView {
                outcome: "denied",
                pod: Some(pod(ep_id)),
                peer_identity: Some(identity),
                peer: Some(peer(identity)),
                ..empty
            },
        }
    };
    ExplainView {
        allowed: verdict.allowed(),
        egress: side(&verdict.egress),
        ingress: side(&verdict.ingress),
    }
}

/// `debug explain`'s text.
pub fn render_explain(v: &ExplainView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", if v.allowed { "ALLOWED" } else { "DENIED" });
    for (what, j) in [("egress", &v.egress), ("ingress", &v.ingress)] {
        let who = j.pod.as_deref().unwrap_or("-");
        let line = match j.outcome {
            "unmanaged" => format!("{what}: not a pod of this node, not judged here"),
            "not-isolated" => format!("{what} of {who}: no policy isolates it"),
            "from-host" => format!("{what} of {who}: from this node, always allowed"),
            "allowed" => format!(
                "{what} of {who}: allowed by rule {} ({}), peer {} [{}]",
                j.rule_id.unwrap_or_default(),
                j.rule.as_deref().unwrap_or("?"),
                j.peer.as_deref().unwrap_or("?"),
                j.entry.as_deref().unwrap_or("?")
            ),
            _ => format!(
                "{what} of {who}: denied, no rule allows peer {} (identity {})",
                j.peer.as_deref().unwrap_or("?"),
                j.peer_identity.unwrap_or_default()
            ),
        };
        let _ = writeln!(out, "  {line}");
    }
    out
}
