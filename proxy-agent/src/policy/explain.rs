//! What `twill-agent debug explain` shows, computed from the compiled policy state the kernel
//! maps were written from (never a second implementation of the semantics: verdicts replay the
//! kernel's lookups over the same entries, `PolicyState::verdict`), and for Service targets from
//! the applied service tables, resolved the way the socket hooks resolve a connection. (`debug
//! policy` is `twill_core::policy::pod_views` of the same state; each verdict is named by
//! `twill_core::policy::explain_view`.)
use std::net::Ipv4Addr;

use std::fmt::Write as _;

use serde::Serialize;
use twill_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCOPE_ANY, SCOPE_INTERNAL, ServiceKey, SlotKey,
};
use twill_core::policy::{
    ExplainView, PolicyState, addr_be, addr_from_be, explain_view, proto_name, render_explain,
};

use crate::compile::DumpModel;
use crate::lbmap::LbState;
use crate::source::PolicyObjects;

/// A `debug explain` question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    /// `NAMESPACE/POD` or an IPv4 address.
    pub from: String,
    /// `NAMESPACE/POD`, `NAMESPACE/SERVICE` or an IPv4 address (a Service's ClusterIP
    /// included), with an optional `:PORT`.
    pub to: String,
    pub proto: u8,
}

/// The answer: one verdict per destination the connection could reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: String,
    /// `namespace/name` (or `address:port`) of the Service when the target was one; its
    /// backends follow.
    pub service: Option<String>,
    pub destinations: Vec<DestinationVerdict>,
}

/// One destination's verdict, named by the compiler's explain view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationVerdict {
    pub addr: Ipv4Addr,
    pub port: u16,
    #[serde(flatten)]
    pub verdict: ExplainView,
}

impl Explanation {
    /// The text `debug explain` prints: the question, then per destination the compiler's
    /// rendering of its verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let via = self
            .service
            .as_ref()
            .map_or_else(String::new, |s| format!(" via Service {s}"));
        let _ = writeln!(out, "{} -> {}/{}{via}", self.from, self.to, self.protocol);
        if self.destinations.is_empty() {
            let _ = writeln!(
                out,
                "  no backends: the connection is refused before any policy"
            );
        }
        for d in &self.destinations {
            let text = render_explain(&d.verdict);
            let mut lines = text.lines();
            let _ = writeln!(
                out,
                "  {}:{}  {}",
                d.addr,
                d.port,
                lines.next().unwrap_or_default()
            );
            for l in lines {
                let _ = writeln!(out, "  {l}");
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("{0:?} is neither an IPv4 address nor a known NAMESPACE/POD")]
    UnknownSource(String),
    #[error("{0:?} is neither an IPv4 address nor a known NAMESPACE/POD or NAMESPACE/SERVICE")]
    UnknownTarget(String),
    #[error("{0:?}: the port must be a number 1-65535")]
    BadPort(String),
    #[error("{0:?} needs a :PORT (only a Service target may leave it out)")]
    NeedsPort(String),
    #[error("pod {0} has no IP yet")]
    NoIp(String),
    #[error("Service {0} has no {1} port {2}")]
    NoServicePort(String, String, u16),
}

/// Everything `explain` reads: the compiled policy state, the policy inputs (pod names → IPs),
/// and the applied service tables with their names.
pub struct ExplainInputs<'a> {
    pub state: &'a PolicyState,
    pub objects: &'a PolicyObjects,
    pub lb: &'a LbState,
    pub model: &'a DumpModel,
}

/// `host[:port]` split; a bare `NAMESPACE/NAME` has no port.
fn split_port(s: &str) -> Result<(&str, Option<u16>), ExplainError> {
    match s.rsplit_once(':') {
        Some((host, port)) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|p| (host, Some(p)))
            .ok_or_else(|| ExplainError::BadPort(s.to_owned())),
        None => Ok((s, None)),
    }
}

impl ExplainInputs<'_> {
    fn pod_ip(&self, name: &str) -> Option<Result<Ipv4Addr, ExplainError>> {
        let (ns, n) = name.split_once('/')?;
        let pod = self.objects.pods.get(&(ns.into(), n.into()))?;
        Some(pod.ip.ok_or_else(|| ExplainError::NoIp(name.to_owned())))
    }

    /// Backends of the Service frontend `key` as the socket hooks pick them: the INTERNAL
    /// scope first, then ANY.
    fn backends_of(&self, addr: Ipv4Addr, port: u16, proto: u8) -> Option<Vec<(Ipv4Addr, u16)>> {
        let value = [SCOPE_INTERNAL, SCOPE_ANY].iter().find_map(|&scope| {
            self.lb.services.get(&ServiceKey {
                addr_be: addr_be(addr),
                port_be: port.to_be(),
                proto,
                scope,
            })
        })?;
        Some(
            (0..u32::from(value.backend_count))
                .filter_map(|slot| {
                    let id = self.lb.slots.get(&SlotKey {
                        svc_id: value.svc_id,
                        slot,
                    })?;
                    let b = self.lb.backends.get(id)?;
                    Some((addr_from_be(b.addr_be), u16::from_be(b.port_be)))
                })
                .collect(),
        )
    }

    /// The Service `namespace/name`'s ClusterIP frontends (port, address) for `proto`.
    fn service_frontends(&self, name: &str, proto: u8) -> Vec<(u16, Ipv4Addr)> {
        let Some((ns, n)) = name.split_once('/') else {
            return Vec::new();
        };
        self.model
            .services
            .iter()
            .filter(|sp| &*sp.namespace == ns && &*sp.name == n && sp.proto == proto)
            .flat_map(|sp| {
                // NetworkPolicy is IPv4 (docs/design/dualstack.md): IPv4 frontends only.
                sp.frontends.iter().filter_map(|f| match f.key.addr() {
                    Some(std::net::IpAddr::V4(a)) => Some((u16::from_be(f.key.port_be()), a)),
                    _ => None,
                })
            })
            .collect()
    }

    pub fn explain(&self, q: &ExplainQuery) -> Result<Explanation, ExplainError> {
        let src = match q.from.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => self
                .pod_ip(&q.from)
                .ok_or_else(|| ExplainError::UnknownSource(q.from.clone()))??,
        };
        let (target, port) = split_port(&q.to)?;
        let mut service = None;
        let mut destinations: Vec<(Ipv4Addr, u16)> = Vec::new();
        if let Ok(ip) = target.parse::<Ipv4Addr>() {
            let port = port.ok_or_else(|| ExplainError::NeedsPort(q.to.clone()))?;
            match self.backends_of(ip, port, q.proto) {
                Some(backends) => {
                    service = Some(format!("{ip}:{port}"));
                    destinations = backends;
                }
                None => destinations.push((ip, port)),
            }
        } else if let Some(ip) = self.pod_ip(target) {
            let port = port.ok_or_else(|| ExplainError::NeedsPort(q.to.clone()))?;
            destinations.push((ip?, port));
        } else {
            let frontends = self.service_frontends(target, q.proto);
            if frontends.is_empty() {
                return Err(ExplainError::UnknownTarget(q.to.clone()));
            }
            let chosen: Vec<(u16, Ipv4Addr)> = frontends
                .into_iter()
                .filter(|(p, _)| port.is_none_or(|want| *p == want))
                .collect();
            if chosen.is_empty() {
                return Err(ExplainError::NoServicePort(
                    target.to_owned(),
                    proto_name(q.proto),
                    port.unwrap_or(0),
                ));
            }
            service = Some(target.to_owned());
            for (p, ip) in chosen {
                destinations.extend(self.backends_of(ip, p, q.proto).unwrap_or_default());
            }
            destinations.sort_unstable();
            destinations.dedup();
        }
        let destinations = destinations
            .into_iter()
            .map(|(addr, port)| {
                let v = self.state.verdict(src, addr, q.proto, port);
                DestinationVerdict {
                    addr,
                    port,
                    verdict: explain_view(self.state, &v),
                }
            })
            .collect();
        Ok(Explanation {
            from: q.from.clone(),
            to: q.to.clone(),
            protocol: proto_name(q.proto),
            service,
            destinations,
        })
    }
}

/// `tcp`, `udp`, `sctp` (any case).
pub fn parse_proto(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "sctp" => Some(PROTO_SCTP),
        _ => None,
    }
}
