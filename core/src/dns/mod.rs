//! The cluster's DNS names, following the Kubernetes DNS-Based Service Discovery specification
//! (<https://github.com/kubernetes/dns/blob/master/docs/specification.md>, schema 1.1.0): a pure
//! name table built from the same parsed Services and EndpointSlices the service compiler reads,
//! and the lookup that answers a (name, type) question from it. No sockets and no wire format:
//! the agent's responder turns [`Lookup`] into DNS messages.
//!
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of the ClusterIPs (each address its family's record, so a
//!   dual-stack Service answers both from one record set); of a headless Service, A/AAAA of
//!   every ready endpoint (every endpoint with `publishNotReadyAddresses`); of an ExternalName,
//!   a CNAME.
//! - `<hostname>.<svc>.<ns>.svc.<zone>`: A of a headless Service's endpoint with that hostname
//!   (endpoints without one get the dashed-address label CoreDNS uses, `10-244-1-5`).
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for each named port.
//! - `<d>.<c>.<b>.<a>.in-addr.arpa` and the nibble `….ip6.arpa` names: PTR of ClusterIPs and
//!   headless endpoints.
//! - `a-b-c-d.<ns>.pod.<zone>`: A `a.b.c.d`, unverified (CoreDNS's `pods insecure`, its
//!   default): the answer is the address the name spells.
//! - `dns-version.<zone>`: TXT of the schema version.
//! - `<zone>`: SOA, which the responder also puts in the authority section of every negative
//!   answer so clients cache NXDOMAIN and NODATA (RFC 2308 §3).
//!
//! A name that exists, or has names below it (`<ns>.svc.<zone>` while a Service lives there),
//! answers NODATA for a type it has no records of; any other name in the zone is NXDOMAIN.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use twill_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::compile::{GroupKey, ServiceGroup};

#[cfg(test)]
mod tests;

/// The specification's schema version, answered as TXT at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// SRV priority and weight of every record: one target per record set is as good as another.
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 100;

/// A Service port as DNS sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPort {
    /// "" for an unnamed port (no SRV record).
    pub name: Arc<str>,
    pub port: u16,
    pub proto: u8,
}

/// What DNS serves of a Service, parsed once when it arrives (next to what the service compiler
/// reads, in [`crate::compile::ServiceInput`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsService {
    /// A Service with ClusterIPs (ClusterIP, NodePort, LoadBalancer).
    ClusterIp {
        /// Either family: an IPv6 ClusterIP is served as AAAA.
        ips: Vec<IpAddr>,
        ports: Vec<DnsPort>,
    },
    /// `clusterIP: None`: the endpoints' addresses.
    Headless {
        ports: Vec<DnsPort>,
        publish_not_ready: bool,
    },
    /// `type: ExternalName`: a CNAME to this name (lower case, no trailing dot).
    ExternalName { target: Arc<str> },
    /// Nothing to serve (no ClusterIP yet, a malformed one).
    Nothing,
}

impl DnsService {
    /// Reads a Service's DNS-relevant fields. Never fails: what cannot be served is `Nothing`.
    pub fn parse(svc: &Service) -> Self {
        let Some(spec) = svc.spec.as_ref() else {
            return Self::Nothing;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return spec
                .external_name
                .as_deref()
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .filter(|n| is_dns_name(n))
                .map_or(Self::Nothing, |n| Self::ExternalName { target: n.into() });
        }
        let ports = spec
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => PROTO_TCP,
                    "UDP" => PROTO_UDP,
                    "SCTP" => PROTO_SCTP,
                    _ => return None,
                };
                Some(DnsPort {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                    proto,
                })
            })
            .collect();
        if spec.cluster_ip.as_deref() == Some("None") {
            return Self::Headless {
                ports,
                publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
            };
        }
        let raw: Vec<&str> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let ips: Vec<IpAddr> = raw.iter().filter_map(|r| r.parse().ok()).collect();
        if ips.is_empty() {
            Self::Nothing
        } else {
            Self::ClusterIp { ips, ports }
        }
    }
}

/// A plausible DNS name: labels of 1..=63 characters, 253 in all (RFC 1035 §2.3.4).
fn is_dns_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 253 && n.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// A record's data. Names are absolute, lower case, without the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(Arc<str>),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Arc<str>,
    },
    Ptr(Arc<str>),
    Txt(String),
    Soa(Soa),
}

/// The zone's SOA (RFC 1035 §3.3.13). Its `minimum` is the negative-caching TTL (RFC 2308 §4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Soa {
    pub mname: Arc<str>,
    pub rname: Arc<str>,
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    pub minimum: u32,
}

impl RData {
    /// The address record of `ip`'s family.
    pub fn addr(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => RData::A(v4),
            IpAddr::V6(v6) => RData::Aaaa(v6),
        }
    }

    pub fn qtype(&self) -> QType {
        match self {
            RData::A(_) => QType::A,
            RData::Aaaa(_) => QType::Aaaa,
            RData::Cname(_) => QType::Cname,
            RData::Srv { .. } => QType::Srv,
            RData::Ptr(_) => QType::Ptr,
            RData::Txt(_) => QType::Txt,
            RData::Soa(_) => QType::Soa,
        }
    }
}

/// The question types the table holds records of; every other type is `Other` (NODATA at a
/// name that exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QType {
    A,
    Aaaa,
    Cname,
    Srv,
    Ptr,
    Txt,
    Soa,
    Any,
    Other,
}

/// The table's answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Records of the asked type at the name (or the CNAME standing in for them).
    Answer(Vec<RData>),
    /// The name exists but has no record of that type (NOERROR, empty answer).
    NoData,
    /// The name is in the cluster's zone and does not exist.
    NxDomain,
    /// Not the cluster's business: the responder forwards or refuses it.
    OutOfZone,
}

/// Records of one Service group, by owner name relative to `<svc>.<ns>.svc.<zone>`
/// ("" for the Service name itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct GroupRecords {
    /// Relative owner name → records.
    names: BTreeMap<String, Vec<RData>>,
    /// Address → names (absolute) for PTR.
    ptrs: Vec<(IpAddr, Arc<str>)>,
}

/// The cluster's names. Built incrementally from the Service groups the service compiler is fed
/// ([`DnsTable::update`]); cheap to clone (the agent publishes a copy after each sync and swaps
/// it in whole, so a lookup never sees half a sync).
#[derive(Clone, Debug)]
pub struct DnsTable {
    /// Lower case, no trailing dot (`cluster.local`).
    zone: Arc<str>,
    groups: BTreeMap<GroupKey, Arc<GroupRecords>>,
    /// Address → every name pointing back to it.
    ptrs: BTreeMap<IpAddr, BTreeSet<Arc<str>>>,
    /// Namespaces with at least one Service (so `<ns>.svc.<zone>` is NODATA, not NXDOMAIN).
    namespaces: BTreeMap<Arc<str>, usize>,
    /// The SOA serial: bumped by every update, so a secondary (or a curious operator) sees
    /// that the zone changed.
    serial: u32,
    /// The SOA's `minimum`: how long clients cache a negative answer (RFC 2308 §4).
    negative_ttl: u32,
}

/// SOA timers of a zone nobody transfers, as CoreDNS's kubernetes plugin sets them.
const SOA_REFRESH: u32 = 7200;
const SOA_RETRY: u32 = 1800;
const SOA_EXPIRE: u32 = 86400;
/// Negative-caching TTL until [`DnsTable::with_negative_ttl`] sets one.
const DEFAULT_NEGATIVE_TTL: u32 = 30;

impl DnsTable {
    pub fn new(zone: &str) -> Self {
        Self {
            zone: zone.trim_end_matches('.').to_ascii_lowercase().into(),
            groups: BTreeMap::new(),
            ptrs: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            serial: 1,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
        }
    }

    /// Sets how long clients may cache this zone's negative answers (the SOA's `minimum`).
    #[must_use]
    pub fn with_negative_ttl(mut self, ttl: u32) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// The zone's SOA: the answer at the apex and the authority record of negative answers.
    pub fn soa(&self) -> Soa {
        Soa {
            mname: format!("ns.dns.{}", self.zone).into(),
            rname: format!("hostmaster.{}", self.zone).into(),
            serial: self.serial,
            refresh: SOA_REFRESH,
            retry: SOA_RETRY,
            expire: SOA_EXPIRE,
            minimum: self.negative_ttl,
        }
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Number of Services with records.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Replaces the records of each group with what its current contents give (a group without
    /// a Service loses its records).
    pub fn update<'a>(&mut self, groups: impl IntoIterator<Item = &'a ServiceGroup>) {
        self.serial = self.serial.wrapping_add(1).max(1);
        for g in groups {
            let key: GroupKey = (g.namespace.clone(), g.name.clone());
            if let Some(old) = self.groups.remove(&key) {
                self.forget(&key, &old);
            }
            if let Some(new) = self.records_of(g) {
                for (ip, name) in &new.ptrs {
                    self.ptrs.entry(*ip).or_default().insert(name.clone());
                }
                *self.namespaces.entry(key.0.clone()).or_default() += 1;
                self.groups.insert(key, Arc::new(new));
            }
        }
    }

    fn forget(&mut self, key: &GroupKey, old: &GroupRecords) {
        for (ip, name) in &old.ptrs {
            if let Some(set) = self.ptrs.get_mut(ip) {
                set.remove(name);
                if set.is_empty() {
                    self.ptrs.remove(ip);
                }
            }
        }
        if let Some(n) = self.namespaces.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(&key.0);
            }
        }
    }

    fn svc_name(&self, ns: &str, svc: &str) -> String {
        format!("{svc}.{ns}.svc.{}", self.zone)
    }

    fn records_of(&self, g: &ServiceGroup) -> Option<GroupRecords> {
        let svc = g.service.as_ref()?;
        let fqdn: Arc<str> = self
            .svc_name(&g.namespace, &g.name)
            .to_ascii_lowercase()
            .into();
        let mut r = GroupRecords::default();
        match &svc.dns {
            DnsService::Nothing => return None,
            DnsService::ExternalName { target } => {
                r.names
                    .insert(String::new(), vec![RData::Cname(target.clone())]);
            }
            DnsService::ClusterIp { ips, ports } => {
                r.names.insert(
                    String::new(),
                    ips.iter().copied().map(RData::addr).collect(),
                );
                for ip in ips {
                    r.ptrs.push((*ip, fqdn.clone()));
                }
                for p in ports.iter().filter(|p| !p.name.is_empty()) {
                    r.names.insert(
                        srv_label(&p.name, p.proto),
                        vec![RData::Srv {
                            priority: SRV_PRIORITY,
                            weight: SRV_WEIGHT,
                            port: p.port,
                            target: fqdn.clone(),
                        }],
                    );
                }
            }
            DnsService::Headless {
                ports,
                publish_not_ready,
            } => headless(&mut r, g, &fqdn, ports, *publish_not_ready),
        }
        Some(r)
    }

    /// Answers one question. `name` may carry a trailing dot and any case.
    pub fn lookup(&self, name: &str, qtype: QType) -> Lookup {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            return self.reverse(reverse_v4(rev), qtype);
        }
        if let Some(rev) = name.strip_suffix(".ip6.arpa") {
            return self.reverse(reverse_v6(rev), qtype);
        }
        let rel = if name == *self.zone {
            ""
        } else if let Some(rel) = name
            .strip_suffix(&*self.zone)
            .and_then(|r| r.strip_suffix('.'))
        {
            rel
        } else {
            return Lookup::OutOfZone;
        };
        // Labels from the zone outwards: svc, <ns>, <svc>, then what is below the Service.
        let labels: Vec<&str> = if rel.is_empty() {
            Vec::new()
        } else {
            rel.rsplit('.').collect()
        };
        match labels.as_slice() {
            [] => answer(vec![RData::Soa(self.soa())], qtype),
            ["svc" | "pod"] => Lookup::NoData,
            ["dns-version"] => answer(vec![RData::Txt(SCHEMA_VERSION.to_owned())], qtype),
            ["svc", ns] => {
                if self.namespaces.contains_key(*ns) {
                    Lookup::NoData
                } else {
                    Lookup::NxDomain
                }
            }
            ["svc", ns, svc, below @ ..] => self.service_name(ns, svc, below, qtype),
            ["pod", _ns] => Lookup::NoData,
            ["pod", _ns, dashed] => match undash(dashed) {
                Some(ip) => answer(vec![RData::A(ip)], qtype),
                None => Lookup::NxDomain,
            },
            _ => Lookup::NxDomain,
        }
    }

    fn service_name(&self, ns: &str, svc: &str, below: &[&str], qtype: QType) -> Lookup {
        let Some(g) = self
            .groups
            .get(&(Arc::<str>::from(ns), Arc::<str>::from(svc)))
        else {
            return Lookup::NxDomain;
        };
        // `below` runs outwards-in; the relative owner names are written inwards-out.
        let rel: Vec<&str> = below.iter().rev().copied().collect();
        let rel = rel.join(".");
        if let Some(records) = g.names.get(&rel) {
            // A CNAME stands in for every type (RFC 1034 §3.6.2).
            if let [RData::Cname(_)] = records.as_slice()
                && qtype != QType::Cname
            {
                return Lookup::Answer(records.clone());
            }
            return answer(records.clone(), qtype);
        }
        // An empty non-terminal (`_tcp.<svc>…` under `_http._tcp.<svc>…`) exists.
        let suffix = format!(".{rel}");
        if g.names.keys().any(|k| k.ends_with(&suffix)) {
            Lookup::NoData
        } else {
            Lookup::NxDomain
        }
    }

    fn reverse(&self, ip: Option<IpAddr>, qtype: QType) -> Lookup {
        // Only the cluster's own addresses are ours; every other reverse name goes upstream.
        match ip.and_then(|ip| self.ptrs.get(&ip)) {
            Some(names) => answer(names.iter().cloned().map(RData::Ptr).collect(), qtype),
            None => Lookup::OutOfZone,
        }
    }
}

/// The address a `<d>.<c>.<b>.<a>` reverse name (without `.in-addr.arpa`) spells.
fn reverse_v4(rev: &str) -> Option<IpAddr> {
    let octets: Vec<&str> = rev.rsplit('.').collect();
    match octets.as_slice() {
        [a, b, c, d] => format!("{a}.{b}.{c}.{d}")
            .parse::<Ipv4Addr>()
            .ok()
            .map(IpAddr::V4),
        _ => None,
    }
}

/// The address 32 reversed nibbles (without `.ip6.arpa`, RFC 3596 §2.5) spell.
fn reverse_v6(rev: &str) -> Option<IpAddr> {
    let mut bits: u128 = 0;
    let mut n = 0;
    for nibble in rev.rsplit('.') {
        let [c] = nibble.as_bytes() else {
            return None;
        };
        bits = (bits << 4) | u128::from(char::from(*c).to_digit(16)?);
        n += 1;
    }
    (n == 32).then(|| IpAddr::V6(Ipv6Addr::from(bits)))
}

/// `_<port>._<proto>`: the relative owner name of a named port's SRV record.
fn srv_label(port: &str, proto: u8) -> String {
    let proto = match proto {
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        _ => "tcp",
    };
    format!("_{}._{proto}", port.to_ascii_lowercase())
}

/// The records of a headless Service: its endpoints' addresses, one name per endpoint, SRV per
/// named port and endpoint, PTR per endpoint.
fn headless(
    r: &mut GroupRecords,
    g: &ServiceGroup,
    fqdn: &Arc<str>,
    ports: &[DnsPort],
    publish_not_ready: bool,
) {
    let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
    // (label, address, endpoint port by name)
    let mut eps: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut srv: BTreeMap<String, BTreeSet<(u16, String)>> = BTreeMap::new();
    for slice in &g.slices {
        let Some(parsed) = slice.parsed(&mut Vec::new()) else {
            continue;
        };
        for (i, ep) in parsed.endpoints.iter().enumerate() {
            if !(ep.ready || publish_not_ready) {
                continue;
            }
            let hostname = parsed
                .hostnames
                .binary_search_by_key(&i, |(at, _)| *at as usize)
                .ok()
                .map(|at| parsed.hostnames[at].1.to_ascii_lowercase());
            let addr = ep.addr;
            let label = hostname.unwrap_or_else(|| dashed(addr));
            addrs.insert(addr);
            eps.entry(label.clone()).or_default().insert(addr);
            for (name, port, proto) in parsed.ports.iter().filter(|p| !p.0.is_empty()) {
                // The Service's named port decides which names exist; the slice the number.
                if ports
                    .iter()
                    .any(|sp| sp.name == *name && sp.proto == *proto)
                {
                    srv.entry(srv_label(name, *proto))
                        .or_default()
                        .insert((*port, label.clone()));
                }
            }
        }
    }
    r.names
        .insert(String::new(), addrs.into_iter().map(RData::addr).collect());
    for (label, ips) in eps {
        let owner: Arc<str> = format!("{label}.{fqdn}").into();
        for ip in &ips {
            r.ptrs.push((*ip, owner.clone()));
        }
        r.names
            .insert(label, ips.into_iter().map(RData::addr).collect());
    }
    for p in ports.iter().filter(|p| !p.name.is_empty()) {
        // A named port without ready endpoints still names an existing (empty) record set.
        r.names.entry(srv_label(&p.name, p.proto)).or_default();
    }
    for (owner, targets) in srv {
        r.names.insert(
            owner,
            targets
                .into_iter()
                .map(|(port, label)| RData::Srv {
                    priority: SRV_PRIORITY,
                    weight: SRV_WEIGHT,
                    port,
                    target: format!("{label}.{fqdn}").into(),
                })
                .collect(),
        );
    }
}

/// Records of the asked type (all of them for ANY); NODATA when there are none.
fn answer(records: Vec<RData>, qtype: QType) -> Lookup {
    let picked: Vec<RData> = records
        .into_iter()
        .filter(|r| qtype == QType::Any || r.qtype() == qtype)
        .collect();
    if picked.is_empty() {
        Lookup::NoData
    } else {
        Lookup::Answer(picked)
    }
}

/// `10-244-1-5` for 10.244.1.5; `fd00--5` for fd00::5 (CoreDNS's endpoint label).
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The address a dashed label spells (`10-244-1-5`), in canonical form only.
fn undash(label: &str) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = label.replace('-', ".").parse().ok()?;
    (dashed(IpAddr::V4(ip)) == label).then_some(ip)
}
