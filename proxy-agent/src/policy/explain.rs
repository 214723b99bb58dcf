//! What `twill-agent debug explain` shows, computed from the compiled policy state the kernel
//! maps were written from (never a second implementation of the semantics: verdicts replay the
//! kernel's lookups over the same entries, `PolicyState::verdict`), and for Service targets from
//! the applied service tables, resolved the way the socket hooks resolve a connection. (`debug
//! policy` is `twill_core::policy::pod_views` of the same state; each verdict is named by
//! `twill_core::policy::explain_view`.)
use std::net::{IpAddr, Ipv6Addr};

use std::fmt::Write as _;

use serde::Serialize;
use twill_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCOPE_ANY, SCOPE_INTERNAL, ServiceKey, ServiceKey6, SlotKey,
};
use twill_core::policy::{
    ExplainView, PolicyState, addr_be, addr_from_be, addr6_be, addr6_from_be, explain_view,
    proto_name, render_explain,
};

use crate::compile::DumpModel;
use crate::lbmap::LbState;
use crate::source::PolicyObjects;

/// A `debug explain` question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    /// `NAMESPACE/POD` or an IPv4 or IPv6 address.
    pub from: String,
    /// `NAMESPACE/POD`, `NAMESPACE/SERVICE` or an IPv4 or IPv6 address (a Service's ClusterIP
    /// included), with an optional `:PORT` (`[IPv6]:PORT` with a port).
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
    pub addr: IpAddr,
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
                "  {}  {}",
                std::net::SocketAddr::new(d.addr, d.port),
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
    #[error("{0:?} is neither an IP address nor a known NAMESPACE/POD")]
    UnknownSource(String),
    #[error("{0:?} is neither an IP address nor a known NAMESPACE/POD or NAMESPACE/SERVICE")]
    UnknownTarget(String),
    #[error("{0:?}: the port must be a number 1-65535")]
    BadPort(String),
    #[error("{0:?} needs a :PORT (only a Service target may leave it out)")]
    NeedsPort(String),
    #[error("pod {0} has no IP yet")]
    NoIp(String),
    #[error("pod {0} has no {1} address")]
    NoIpOfFamily(String, &'static str),
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
    // `[IPv6]:PORT`, `[IPv6]`, or a bare IPv6 address (its colons are no port).
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| ExplainError::UnknownTarget(s.to_owned()))?;
        return match after.strip_prefix(':') {
            None if after.is_empty() => Ok((host, None)),
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(|p| (host, Some(p)))
                .ok_or_else(|| ExplainError::BadPort(s.to_owned())),
            None => Err(ExplainError::UnknownTarget(s.to_owned())),
        };
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Ok((s, None));
    }
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

/// Which family a pod's address is wanted in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The pod's first (IPv4 if it has one).
    Any,
    V4,
    V6,
}

impl Want {
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv6() { Want::V6 } else { Want::V4 }
    }
}

impl ExplainInputs<'_> {
    /// The address of pod `name` in the family `want`; `None` when no such pod is known.
    fn pod_ip(&self, name: &str, want: Want) -> Option<Result<IpAddr, ExplainError>> {
        let (ns, n) = name.split_once('/')?;
        let pod = self.objects.pods.get(&(ns.into(), n.into()))?;
        let (v4, v6) = (pod.ip.map(IpAddr::V4), pod.ip6.map(IpAddr::V6));
        Some(match want {
            Want::Any => v4.or(v6).ok_or_else(|| ExplainError::NoIp(name.to_owned())),
            Want::V4 => v4.ok_or_else(|| ExplainError::NoIpOfFamily(name.to_owned(), "IPv4")),
            Want::V6 => v6.ok_or_else(|| ExplainError::NoIpOfFamily(name.to_owned(), "IPv6")),
        })
    }

    /// Backends of the Service frontend `addr:port` (either family) as the socket hooks pick
    /// them: the INTERNAL scope first, then ANY. `None` when it is no frontend.
    fn backends_of(&self, addr: IpAddr, port: u16, proto: u8) -> Option<Vec<(IpAddr, u16)>> {
        let value = [SCOPE_INTERNAL, SCOPE_ANY]
            .iter()
            .find_map(|&scope| match addr {
                IpAddr::V4(a) => self.lb.services.get(&ServiceKey {
                    addr_be: addr_be(a),
                    port_be: port.to_be(),
                    proto,
                    scope,
                }),
                IpAddr::V6(a) => self.lb.services6.get(&ServiceKey6 {
                    addr_be: addr6_be(a),
                    port_be: port.to_be(),
                    proto,
                    scope,
                }),
            })?;
        Some(
            (0..u32::from(value.backend_count))
                .filter_map(|slot| {
                    let id = self.lb.slots.get(&SlotKey {
                        svc_id: value.svc_id,
                        slot,
                    })?;
                    // One id space: the backend is in one of the two tables.
                    if let Some(b) = self.lb.backends.get(id) {
                        let addr = IpAddr::V4(addr_from_be(b.addr_be));
                        return Some((addr, u16::from_be(b.port_be)));
                    }
                    let b = self.lb.backends6.get(id)?;
                    Some((
                        IpAddr::V6(addr6_from_be(b.addr_be)),
                        u16::from_be(b.port_be),
                    ))
                })
                .collect(),
        )
    }

    /// The Service `namespace/name`'s ClusterIP frontends (port, address) for `proto`.
    fn service_frontends(&self, name: &str, proto: u8) -> Vec<(u16, IpAddr)> {
        let Some((ns, n)) = name.split_once('/') else {
            return Vec::new();
        };
        self.model
            .services
            .iter()
            .filter(|sp| &*sp.namespace == ns && &*sp.name == n && sp.proto == proto)
            .flat_map(|sp| {
                // Both families' ClusterIPs: a dual-stack Service's backends of each.
                sp.frontends
                    .iter()
                    .filter_map(|f| Some((u16::from_be(f.key.port_be()), f.key.addr()?)))
            })
            .collect()
    }

    /// The source address of a connection to `dst`: `from` itself, or pod `from`'s address of
    /// `dst`'s family.
    fn source(&self, from: &str, dst: IpAddr) -> Result<IpAddr, ExplainError> {
        if let Ok(ip) = from.parse::<IpAddr>() {
            return Ok(ip);
        }
        self.pod_ip(from, Want::of(dst))
            .ok_or_else(|| ExplainError::UnknownSource(from.to_owned()))?
    }

    pub fn explain(&self, q: &ExplainQuery) -> Result<Explanation, ExplainError> {
        // A pod target is reached in the source's family (IPv4 when the source is a pod that
        // has an IPv4 address).
        let want = match q.from.parse::<IpAddr>() {
            Ok(ip) => Want::of(ip),
            Err(_) => match self.pod_ip(&q.from, Want::Any) {
                Some(ip) => Want::of(ip?),
                None => return Err(ExplainError::UnknownSource(q.from.clone())),
            },
        };
        let (target, port) = split_port(&q.to)?;
        let mut service = None;
        let mut destinations: Vec<(IpAddr, u16)> = Vec::new();
        if let Ok(ip) = target.parse::<IpAddr>() {
            let port = port.ok_or_else(|| ExplainError::NeedsPort(q.to.clone()))?;
            match self.backends_of(ip, port, q.proto) {
                Some(backends) => {
                    service = Some(std::net::SocketAddr::new(ip, port).to_string());
                    destinations = backends;
                }
                None => destinations.push((ip, port)),
            }
        } else if let Some(ip) = self.pod_ip(target, want) {
            let port = port.ok_or_else(|| ExplainError::NeedsPort(q.to.clone()))?;
            destinations.push((ip?, port));
        } else {
            let frontends = self.service_frontends(target, q.proto);
            if frontends.is_empty() {
                return Err(ExplainError::UnknownTarget(q.to.clone()));
            }
            let chosen: Vec<(u16, IpAddr)> = frontends
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
        let mut verdicts = Vec::with_capacity(destinations.len());
        for (addr, port) in destinations {
            let src = match self.source(&q.from, addr) {
                // A dual-stack Service's backends of a family the client has no address of:
                // the client never reaches them.
                Ok(ip) if service.is_some() && ip.is_ipv6() != addr.is_ipv6() => continue,
                Err(ExplainError::NoIpOfFamily(..)) if service.is_some() => continue,
                src => src?,
            };
            let v = self.state.verdict(src, addr, q.proto, port);
            verdicts.push(DestinationVerdict {
                addr,
                port,
                verdict: explain_view(self.state, &v),
            });
        }
        let destinations = verdicts;
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
