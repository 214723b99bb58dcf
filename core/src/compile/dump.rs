//! The dump the debug CLI prints (`twill-agent debug maps`) and the golden tests compare: the
//! raw map contents (from the kernel or from a compile) joined with the names of the
//! [`DumpModel`]. One view type serves both the text (`render_dump`) and `-o json`.
//!
//! Whatever the maps hold is shown as found: a frontend missing from the maps, a slot pointing
//! nowhere or entries no Service owns ("unowned", e.g. stale ones adopted from a previous agent
//! and not pruned yet) are visible, never papered over with what the model expected.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use twill_common::{
    BE_F_LOCAL, BE_F_TERMINATING, MAGLEV_SLOT_BASE, SCOPE_ANY, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_F_AFFINITY, SVC_F_LOCAL_ONLY, SVC_F_SOURCE_RANGES, SVC_F_TERMINATING_FALLBACK, SlotKey,
};

use super::parse::proto_name;
use super::{
    DumpModel, EndpointState, FrontendKind, ObjectKind, RejectClass, SvcType, addr_from_be,
};
use crate::family::{FrontendKey, IpFamily};
use crate::lbmap::LbState;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DumpView {
    pub services: Vec<ServiceView>,
    pub rejected: Vec<RejectionView>,
    /// Both families' NodePort addresses (IPv4 first).
    pub node_addrs: Vec<IpAddr>,
    pub nodeport_range: [u16; 2],
    /// Map entries no Service of the model owns, one line each.
    pub unowned: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    #[serde(rename = "type")]
    pub svc_type: SvcType,
    /// `IPv4` or `IPv6`: a dual-stack Service shows each port once per family.
    pub family: IpFamily,
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub affinity_timeout_s: Option<u32>,
    pub external_traffic_policy: &'static str,
    pub internal_traffic_policy: &'static str,
    pub source_ranges: Vec<String>,
    pub health_check_node_port: Option<u16>,
    pub endpoints: Vec<EndpointView>,
    pub frontends: Vec<FrontendView>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointView {
    pub addr: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub local: bool,
    pub state: EndpointState,
    pub in_cluster_set: bool,
    pub in_local_set: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    pub kind: FrontendKind,
    /// `None` for `NodePort` (every address in the node address map).
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub protocol: String,
    pub scope: &'static str,
    /// Whether the maps hold this frontend; the fields below are what they hold.
    pub present: bool,
    pub svc_id: Option<u32>,
    pub backend_count: Option<u16>,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: Option<u32>,
    /// For a frontend filtered by `loadBalancerSourceRanges`: the client ranges the maps allow
    /// for its `svc_id` (empty: nobody is admitted). Empty for an unfiltered frontend.
    pub source_ranges: Vec<String>,
    pub slots: Vec<SlotView>,
    /// The backend set's Maglev table (external frontends of sets with two or more backends).
    pub maglev: Option<MaglevView>,
}

/// A Maglev table as the maps hold it: its size and how many of its positions are missing or
/// point outside the frontend's backend list (both 0 in a consistent state).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MaglevView {
    pub size: u32,
    pub missing: u32,
    pub foreign: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotView {
    pub slot: u32,
    /// `None`: the slot is missing from the maps.
    pub backend_id: Option<u32>,
    /// `addr:port/proto`; `None`: the backend is missing from the maps.
    pub backend: Option<String>,
    pub flags: Vec<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RejectionView {
    pub class: RejectClass,
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    pub reason: String,
    pub label: &'static str,
}

fn scope_name(scope: u8) -> &'static str {
    match scope {
        SCOPE_ANY => "any",
        SCOPE_EXTERNAL => "external",
        SCOPE_INTERNAL => "internal",
        _ => "unknown",
    }
}

fn svc_flag_names(flags: u16) -> Vec<&'static str> {
    // The four kind bits are named by their FrontendKind, so the map dump and the frontend
    // lines spell a kind one way.
    const NAMES: [(u16, &str); 8] = [
        (
            FrontendKind::ClusterIp.flag(),
            FrontendKind::ClusterIp.as_str(),
        ),
        (
            FrontendKind::NodePort.flag(),
            FrontendKind::NodePort.as_str(),
        ),
        (
            FrontendKind::ExternalIp.flag(),
            FrontendKind::ExternalIp.as_str(),
        ),
        (
            FrontendKind::LoadBalancer.flag(),
            FrontendKind::LoadBalancer.as_str(),
        ),
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_LOCAL_ONLY, "local-only"),
        (SVC_F_SOURCE_RANGES, "source-ranges"),
        (SVC_F_TERMINATING_FALLBACK, "terminating-fallback"),
    ];
    let mut out: Vec<&str> = NAMES
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    let known = NAMES.iter().fold(0, |acc, (f, _)| acc | f);
    if flags & !known != 0 {
        out.push("unknown-bits");
    }
    out
}

fn backend_flag_names(flags: u8) -> Vec<&'static str> {
    let mut out = Vec::new();
    if flags & BE_F_LOCAL != 0 {
        out.push("local");
    }
    if flags & BE_F_TERMINATING != 0 {
        out.push("terminating");
    }
    out
}

/// `addr:port`, the IPv6 address in brackets (RFC 3986 §3.2.2).
fn host_port(addr: Option<IpAddr>, port: u16) -> String {
    match addr {
        None => format!("*:{port}"),
        Some(IpAddr::V4(a)) => format!("{a}:{port}"),
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
    }
}

fn frontend_text(key: FrontendKey) -> String {
    format!(
        "{}/{}",
        host_port(key.addr(), u16::from_be(key.port_be())),
        proto_name(key.proto())
    )
}

fn backend_text(state: &LbState, id: u32) -> Option<String> {
    state.backend(id).map(|b| {
        format!(
            "{}/{}",
            host_port(Some(b.addr()), b.port()),
            proto_name(b.proto())
        )
    })
}

/// Joins map contents and model into the serializable view.
#[expect(clippy::too_many_lines, reason = "a flat field-by-field projection")]
pub fn dump_view(state: &LbState, model: &DumpModel) -> DumpView {
    let mut owned_services: BTreeSet<FrontendKey> = BTreeSet::new();
    let mut owned_slots: BTreeSet<SlotKey> = BTreeSet::new();
    let mut owned_backends: BTreeSet<u32> = BTreeSet::new();
    let mut owned_range_ids: BTreeSet<u32> = BTreeSet::new();
    let services = model
        .services
        .iter()
        .map(|m| {
            let frontends = m
                .frontends
                .iter()
                .map(|fe| {
                    let value = state.frontend(&fe.key);
                    owned_services.insert(fe.key);
                    let slots: Vec<SlotView> = value
                        .map(|v| {
                            (0..u32::from(v.backend_count))
                                .map(|slot| {
                                    let key = SlotKey {
                                        svc_id: v.svc_id,
                                        slot,
                                    };
                                    owned_slots.insert(key);
                                    let backend_id = state.slots.get(&key).copied();
                                    if let Some(id) = backend_id {
                                        owned_backends.insert(id);
                                    }
                                    SlotView {
                                        slot,
                                        backend_id,
                                        backend: backend_id.and_then(|id| backend_text(state, id)),
                                        flags: backend_id
                                            .and_then(|id| state.backend(id))
                                            .map(|b| backend_flag_names(b.flags()))
                                            .unwrap_or_default(),
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let maglev = value.filter(|v| v.maglev_size != 0).map(|v| {
                        let members: BTreeSet<u32> =
                            slots.iter().filter_map(|s| s.backend_id).collect();
                        let (mut missing, mut foreign) = (0, 0);
                        for slot in MAGLEV_SLOT_BASE..MAGLEV_SLOT_BASE + v.maglev_size {
                            let key = SlotKey {
                                svc_id: v.svc_id,
                                slot,
                            };
                            owned_slots.insert(key);
                            match state.slots.get(&key) {
                                None => missing += 1,
                                Some(id) if !members.contains(id) => foreign += 1,
                                Some(_) => {}
                            }
                        }
                        MaglevView {
                            size: v.maglev_size,
                            missing,
                            foreign,
                        }
                    });
                    let filtered = value.filter(|v| v.flags & SVC_F_SOURCE_RANGES != 0);
                    let source_ranges = filtered
                        .map(|v| {
                            owned_range_ids.insert(v.svc_id);
                            state
                                .source_ranges_of(v.svc_id)
                                .map(|r| r.to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    FrontendView {
                        kind: fe.kind,
                        addr: fe.key.addr(),
                        port: u16::from_be(fe.key.port_be()),
                        protocol: proto_name(fe.key.proto()),
                        scope: scope_name(fe.key.scope()),
                        present: value.is_some(),
                        svc_id: value.map(|v| v.svc_id),
                        backend_count: value.map(|v| v.backend_count),
                        flags: value.map(|v| svc_flag_names(v.flags)).unwrap_or_default(),
                        affinity_timeout_s: value
                            .filter(|v| v.flags & SVC_F_AFFINITY != 0)
                            .map(|v| v.affinity_timeout_s),
                        source_ranges,
                        slots,
                        maglev,
                    }
                })
                .collect();
            let policy = |local: bool| if local { "Local" } else { "Cluster" };
            ServiceView {
                namespace: m.namespace.to_string(),
                name: m.name.to_string(),
                port_name: m.port_name.to_string(),
                svc_type: m.svc_type,
                family: m.family,
                protocol: proto_name(m.proto),
                port: m.port,
                node_port: m.node_port,
                affinity_timeout_s: m.affinity_timeout_s,
                external_traffic_policy: policy(m.external_local),
                internal_traffic_policy: policy(m.internal_local),
                source_ranges: m.source_ranges.iter().map(ToString::to_string).collect(),
                health_check_node_port: m.health_check_node_port,
                endpoints: m
                    .endpoints
                    .iter()
                    .map(|e| EndpointView {
                        addr: e.addr,
                        port: e.port,
                        node: e.node.as_deref().map(str::to_owned),
                        local: e.local,
                        state: e.state,
                        in_cluster_set: e.in_cluster_set,
                        in_local_set: e.in_local_set,
                    })
                    .collect(),
                frontends,
            }
        })
        .collect();

    let mut unowned = Vec::new();
    let mut stray_services: Vec<_> = state
        .frontends()
        .filter(|(k, _)| !owned_services.contains(k))
        .collect();
    stray_services
        .sort_by_key(|(k, _)| (k.addr(), u16::from_be(k.port_be()), k.proto(), k.scope()));
    for (k, v) in stray_services {
        unowned.push(format!(
            "service {} scope={} id={} count={} flags={}",
            frontend_text(k),
            scope_name(k.scope()),
            v.svc_id,
            v.backend_count,
            svc_flag_names(v.flags).join("|")
        ));
    }
    for (k, id) in state.slots.iter().filter(|(k, _)| !owned_slots.contains(k)) {
        unowned.push(format!("slot {}/{} -> {id}", k.svc_id, k.slot));
    }
    for id in state
        .backends
        .keys()
        .chain(state.backends6.keys())
        .filter(|id| !owned_backends.contains(id))
    {
        unowned.push(format!(
            "backend {id} {}",
            backend_text(state, *id).unwrap_or_default()
        ));
    }
    for (id, range) in state
        .source_ranges
        .iter()
        .filter(|(id, _)| !owned_range_ids.contains(id))
    {
        unowned.push(format!("source-range {id} {range}"));
    }

    // IPv4 first, then IPv6 (`IpAddr`'s order), each sorted.
    let mut node_addrs: Vec<IpAddr> = state
        .node_addrs
        .keys()
        .map(|a| IpAddr::V4(addr_from_be(*a)))
        .chain(
            state
                .node_addrs6
                .keys()
                .map(|a| IpAddr::V6(crate::family::addr6_from_be(*a))),
        )
        .collect();
    node_addrs.sort_unstable();
    DumpView {
        services,
        rejected: model
            .rejected
            .iter()
            .map(|r| RejectionView {
                class: r.reason.class(),
                kind: r.kind,
                namespace: r.namespace.to_string(),
                name: r.name.to_string(),
                reason: r.reason.to_string(),
                label: r.reason.metric_label(),
            })
            .collect(),
        node_addrs,
        nodeport_range: [state.config.nodeport_min, state.config.nodeport_max],
        unowned,
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The text dump: stable line format, one object per line, two-space indentation per level.
pub fn render_dump(state: &LbState, model: &DumpModel) -> String {
    render_view(&dump_view(state, model))
}

/// Renders an already built view (the CLI gets the view as JSON over the API socket).
#[expect(
    clippy::too_many_lines,
    reason = "one line format per object kind, kept together"
)]
pub fn render_view(view: &DumpView) -> String {
    let mut out = String::new();
    for s in &view.services {
        let port_name = if s.port_name.is_empty() {
            "-"
        } else {
            &s.port_name
        };
        let _ = write!(
            out,
            "service {}/{} port={port_name} {}:{} type={} nodePort={} affinity={} eTP={} iTP={}",
            s.namespace,
            s.name,
            s.protocol,
            s.port,
            s.svc_type.as_str(),
            or_dash(s.node_port),
            s.affinity_timeout_s
                .map_or_else(|| "None".to_owned(), |t| format!("ClientIP/{t}s")),
            s.external_traffic_policy,
            s.internal_traffic_policy,
        );
        // IPv4 ports print as they did before dual-stack; IPv6 ones say so.
        if s.family == IpFamily::V6 {
            out.push_str(" family=IPv6");
        }
        if let Some(hc) = s.health_check_node_port {
            let _ = write!(out, " healthCheckNodePort={hc}");
        }
        if !s.source_ranges.is_empty() {
            let _ = write!(out, " sourceRanges={}", s.source_ranges.join(","));
        }
        out.push('\n');
        for e in &s.endpoints {
            let mut sets = Vec::new();
            if e.in_cluster_set {
                sets.push("cluster");
            }
            if e.in_local_set {
                sets.push("local");
            }
            let state = e.state.as_str();
            let _ = writeln!(
                out,
                "  endpoint {} {state} node={}{} sets={}",
                host_port(Some(e.addr), e.port),
                e.node.as_deref().unwrap_or("-"),
                if e.local { " (local)" } else { "" },
                if sets.is_empty() {
                    "-".to_owned()
                } else {
                    sets.join(",")
                },
            );
        }
        if s.frontends.is_empty() {
            out.push_str("  no frontends\n");
        }
        for f in &s.frontends {
            let addr = host_port(f.addr, f.port);
            let kind = f.kind.as_str();
            if !f.present {
                let _ = writeln!(
                    out,
                    "  frontend {kind} {addr}/{} scope={} MISSING",
                    f.protocol, f.scope
                );
                continue;
            }
            let _ = write!(
                out,
                "  frontend {kind} {addr}/{} scope={} id={} count={} flags={}",
                f.protocol,
                f.scope,
                or_dash(f.svc_id),
                or_dash(f.backend_count),
                if f.flags.is_empty() {
                    "-".to_owned()
                } else {
                    f.flags.join("|")
                },
            );
            if let Some(t) = f.affinity_timeout_s {
                let _ = write!(out, " timeout={t}s");
            }
            if let Some(m) = &f.maglev {
                let _ = write!(out, " maglev={}", m.size);
                if m.missing != 0 || m.foreign != 0 {
                    let _ = write!(
                        out,
                        " maglev-missing={} maglev-foreign={}",
                        m.missing, m.foreign
                    );
                }
            }
            if f.flags.contains(&"source-ranges") {
                let _ = write!(
                    out,
                    " allow={}",
                    if f.source_ranges.is_empty() {
                        "NONE".to_owned()
                    } else {
                        f.source_ranges.join(",")
                    }
                );
            }
            out.push('\n');
            for slot in &f.slots {
                match (&slot.backend_id, &slot.backend) {
                    (None, _) => {
                        let _ = writeln!(out, "    slot {} MISSING", slot.slot);
                    }
                    (Some(id), None) => {
                        let _ = writeln!(out, "    slot {} -> backend {id} MISSING", slot.slot);
                    }
                    (Some(id), Some(be)) => {
                        let flags = if slot.flags.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", slot.flags.join("|"))
                        };
                        let _ = writeln!(out, "    slot {} -> backend {id} {be}{flags}", slot.slot);
                    }
                }
            }
        }
    }
    for r in &view.rejected {
        let class = r.class.as_str();
        let object = if r.namespace.is_empty() {
            r.name.clone()
        } else {
            format!("{}/{}", r.namespace, r.name)
        };
        let _ = writeln!(
            out,
            "rejected {class} {} {object}: {}",
            r.kind.as_str(),
            r.reason
        );
    }
    let addrs: Vec<String> = view.node_addrs.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "node-addrs {}",
        if addrs.is_empty() {
            "-".to_owned()
        } else {
            addrs.join(",")
        }
    );
    let _ = writeln!(
        out,
        "nodeport-range {}-{}",
        view.nodeport_range[0], view.nodeport_range[1]
    );
    if view.unowned.is_empty() {
        out.push_str("unowned none\n");
    }
    for u in &view.unowned {
        let _ = writeln!(out, "unowned {u}");
    }
    out
}
