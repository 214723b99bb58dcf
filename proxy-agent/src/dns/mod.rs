//! The node-local DNS responder: answers the cluster's names (Kubernetes DNS-Based Service
//! Discovery) from the [`DnsTable`] the run loop publishes after each sync, over UDP and TCP.
//! The wire format is hickory-proto's; the names are twill-core's ([`twill_core::dns`]).
//!
//! Names outside the cluster's zone (and reverse names of addresses that are not the cluster's)
//! go to the node's resolvers through [`forward::Forwarder`], with a cache; without upstream
//! resolvers they are answered REFUSED. Negative answers of the cluster's zone carry its SOA, so
//! clients cache them (RFC 2308). A packet that is not a DNS query, or does not parse, is
//! dropped and counted; it never stops the server.
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData as WireData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use twill_core::dns::{DnsTable, Lookup, QType, RData};

use crate::metrics::Metrics;

pub mod forward;
pub mod node_address;

pub use forward::{ForwardMetrics, Forwarder};

/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
const UDP_MIN: u16 = 512;
/// Largest UDP answer we send with EDNS, whatever the client offers: the DNS Flag Day 2020
/// value, below the fragmentation risk on every common path.
const UDP_EDNS_MAX: u16 = 1232;
/// A TCP client gets this long for each message before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once; more wait in the kernel's backlog.
const TCP_MAX_CONNECTIONS: usize = 256;
/// UDP questions waiting on the upstream at once. Beyond it a forwarded question is answered
/// SERVFAIL at once (the client retries), so a flood of unique external names cannot pile up
/// tasks and memory without bound.
const UDP_MAX_FORWARDS: usize = 1024;

/// Which transport a query came over (it decides truncation and the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The published table and what answering needs. Shared by the servers and the run loop.
#[derive(Debug)]
pub struct DnsResponder {
    /// `None` until the first sync: before it, every name would look absent.
    table: RwLock<Option<Arc<DnsTable>>>,
    ttl: u32,
    metrics: Arc<Metrics>,
    /// Set once when DNS starts with upstream resolvers; unset means REFUSED out of zone.
    forwarder: OnceLock<Forwarder>,
}

/// A question that waits on the upstream resolvers.
#[derive(Debug)]
pub struct Pending {
    /// The client's request, decoded.
    req: Message,
    /// For an ExternalName: the table's answer so far (the CNAME) and the question about its
    /// target, whose records the upstream adds (a stub resolver does not follow a CNAME itself,
    /// so an A question must get the target's addresses in the same answer, as CoreDNS does).
    chase: Option<(Message, &'static str, Query)>,
}

/// What the first, synchronous step of answering a packet decided.
#[derive(Debug)]
pub enum Handled {
    /// The encoded answer.
    Reply(Vec<u8>),
    /// A question for the upstream resolvers.
    Forward(Box<Pending>),
    /// Nothing to send.
    Drop,
}

impl DnsResponder {
    pub fn new(ttl: u32, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            table: RwLock::new(None),
            ttl,
            metrics,
            forwarder: OnceLock::new(),
        })
    }

    /// Turns on forwarding of names outside the cluster. Once: a second call is ignored.
    pub fn set_forwarder(&self, forwarder: Forwarder) {
        if self.forwarder.set(forwarder).is_err() {
            log::warn!("DNS forwarder already set; keeping the first");
        }
    }

    pub fn forwarder(&self) -> Option<&Forwarder> {
        self.forwarder.get()
    }

    /// Swaps in the table of the latest sync: a query sees one sync's names, never a mix.
    pub fn publish(&self, table: Arc<DnsTable>) {
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(table);
    }

    /// The table of the latest sync; `None` before the first.
    pub fn table(&self) -> Option<Arc<DnsTable>> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// What the table answers for `name` and `qtype` (a type name like `A` or `SRV`): the
    /// `debug dns` view, from the same table the responder serves.
    pub fn debug(&self, name: &str, qtype: &str) -> DebugAnswer {
        let t = qtype.parse::<RecordType>().map_or(QType::Other, qtype_of);
        let Some(table) = self.table() else {
            return DebugAnswer {
                result: "not synced yet",
                records: Vec::new(),
            };
        };
        let (result, records) = match table.lookup(name, t) {
            Lookup::Answer(r) => ("answer", r),
            Lookup::NoData => ("NODATA", Vec::new()),
            Lookup::NxDomain => ("NXDOMAIN", Vec::new()),
            Lookup::OutOfZone => return self.debug_forwarded(name, qtype),
        };
        DebugAnswer {
            result,
            records: records.iter().map(describe).collect(),
        }
    }

    /// `debug dns` of a name outside the cluster: what the forwarder's cache holds of it (the
    /// debug view never sends a question upstream itself).
    fn debug_forwarded(&self, name: &str, qtype: &str) -> DebugAnswer {
        let Some(fwd) = self.forwarder() else {
            return DebugAnswer {
                result: "out of zone (REFUSED: no upstream resolvers)",
                records: Vec::new(),
            };
        };
        let cached = Name::from_ascii(name).ok().and_then(|mut n| {
            n.set_fqdn(true);
            let t = qtype.parse::<RecordType>().unwrap_or(RecordType::A);
            fwd.cached(&Query::query(n, t))
        });
        match cached {
            None => DebugAnswer {
                result: "out of zone (forwarded upstream; not cached)",
                records: Vec::new(),
            },
            Some(f) => DebugAnswer {
                result: "out of zone (forwarded upstream; cached)",
                records: std::iter::once(format!("rcode {}", rcode_label(f.rcode)))
                    .chain(
                        f.answers
                            .iter()
                            .chain(&f.authorities)
                            .map(|r| format!("{} {}", r.record_type(), r.data)),
                    )
                    .collect(),
            },
        }
    }

    /// The answer to one DNS message, encoded, forwarding it upstream when it is not the
    /// cluster's; `None` when the packet is dropped.
    pub async fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.handle(packet, transport) {
            Handled::Reply(out) => Some(out),
            Handled::Drop => None,
            Handled::Forward(p) => self.forwarded(&p, transport).await,
        }
    }

    /// Answers what the table answers; hands out-of-zone questions back for forwarding (so the
    /// UDP loop never waits on the upstream).
    pub fn handle(&self, packet: &[u8], transport: Transport) -> Handled {
        let Ok(req) = Message::from_vec(packet) else {
            self.metrics.dns_dropped.inc();
            return Handled::Drop;
        };
        // Answering a response would let two responders ping-pong forever.
        if req.metadata.message_type != MessageType::Query {
            self.metrics.dns_dropped.inc();
            return Handled::Drop;
        }
        let (resp, qtype) = match self.respond(&req) {
            Responded::OutOfZone => {
                return Handled::Forward(Box::new(Pending { req, chase: None }));
            }
            Responded::Chase(resp, qtype, target) if self.forwarder().is_some() => {
                return Handled::Forward(Box::new(Pending {
                    req,
                    chase: Some((resp, qtype, target)),
                }));
            }
            // Without an upstream to ask, an ExternalName gets its CNAME alone.
            Responded::Local(resp, qtype) | Responded::Chase(resp, qtype, _) => (resp, qtype),
        };
        self.finish(&req, &resp, qtype, transport)
            .map_or(Handled::Drop, Handled::Reply)
    }

    /// The upstream's answer to an out-of-zone question, encoded.
    pub async fn forwarded(&self, pending: &Pending, transport: Transport) -> Option<Vec<u8>> {
        let req = &pending.req;
        if let Some((partial, label, target)) = &pending.chase {
            let mut resp = partial.clone();
            if let Some(fwd) = self.forwarder() {
                let f = fwd.forward(target).await;
                resp.metadata.recursion_available = true;
                // The code of the last name in the chain (RFC 6604 §3); a failure upstream
                // leaves the CNAME alone for the client to follow.
                if matches!(f.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
                    resp.metadata.response_code = f.rcode;
                    resp.add_answers(f.answers);
                }
            }
            return self.finish(req, &resp, label, transport);
        }
        let q = req.queries.first()?;
        let mut resp = response_to(req);
        resp.add_query(q.clone());
        match self.forwarder() {
            None => resp.metadata.response_code = ResponseCode::Refused,
            Some(fwd) => {
                let f = fwd.forward(q).await;
                resp.metadata.recursion_available = true;
                resp.metadata.response_code = f.rcode;
                resp.add_answers(f.answers);
                resp.add_authorities(f.authorities);
            }
        }
        self.finish(req, &resp, qtype_label(q.query_type()), transport)
    }

    /// SERVFAIL for a question the upstream cannot take now (too many in flight).
    pub fn busy(&self, pending: &Pending) -> Option<Vec<u8>> {
        let req = &pending.req;
        let q = req.queries.first()?;
        let mut resp = response_to(req);
        resp.add_query(q.clone());
        resp.metadata.response_code = ResponseCode::ServFail;
        self.finish(req, &resp, qtype_label(q.query_type()), Transport::Udp)
    }

    /// Counts the answer and encodes it within the transport's size limit.
    fn finish(
        &self,
        req: &Message,
        resp: &Message,
        qtype: &'static str,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        self.metrics.dns_query(
            qtype,
            rcode_label(resp.metadata.response_code),
            transport.as_str(),
        );
        let limit = match (transport, &req.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => usize::from(UDP_MIN),
            (Transport::Udp, Some(e)) => usize::from(e.max_payload().clamp(UDP_MIN, UDP_EDNS_MAX)),
        };
        let bytes = resp.to_vec().ok()?;
        if bytes.len() <= limit {
            return Some(bytes);
        }
        // Too big for the datagram: header, question and OPT with TC set, so the client retries
        // over TCP (RFC 7766 §5).
        resp.truncate().to_vec().ok()
    }

    /// The table's response and the question type's metric label, or `OutOfZone`.
    fn respond(&self, req: &Message) -> Responded {
        let mut resp = response_to(req);
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return Responded::Local(resp, "other");
        }
        let [q] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return Responded::Local(resp, "other");
        };
        resp.add_query(q.clone());
        let qtype = qtype_of(q.query_type());
        let label = qtype_label(q.query_type());
        if q.query_class() != DNSClass::IN {
            resp.metadata.response_code = ResponseCode::Refused;
            return Responded::Local(resp, label);
        }
        let Some(table) = self.table() else {
            // The stores have not synced yet: "try again", not "does not exist".
            resp.metadata.response_code = ResponseCode::ServFail;
            return Responded::Local(resp, label);
        };
        let negative = |resp: &mut Message| {
            // The zone's SOA, so the client caches the negative answer for its minimum
            // (RFC 2308 §3); its TTL is that minimum too (§5).
            let soa = table.soa();
            if let Some(r) = soa_record(&table, &soa) {
                resp.add_authority(r);
            }
        };
        match table.lookup(&q.name().to_ascii(), qtype) {
            Lookup::Answer(records) => {
                resp.metadata.authoritative = true;
                resp.add_answers(records.iter().filter_map(|r| self.record(q, r)));
                if let [RData::Cname(target)] = records.as_slice()
                    && !matches!(q.query_type(), RecordType::CNAME | RecordType::ANY)
                    && let Ok(name) = Name::from_ascii(format!("{target}."))
                {
                    let tq = Query::query(name, q.query_type());
                    match table.lookup(target, qtype) {
                        // A CNAME to another of the cluster's names: one more step here.
                        Lookup::Answer(more) => {
                            resp.add_answers(more.iter().filter_map(|r| self.record(&tq, r)));
                        }
                        Lookup::OutOfZone => return Responded::Chase(resp, label, tq),
                        Lookup::NoData | Lookup::NxDomain => {}
                    }
                }
            }
            Lookup::NoData => {
                resp.metadata.authoritative = true;
                negative(&mut resp);
            }
            Lookup::NxDomain => {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
                negative(&mut resp);
            }
            Lookup::OutOfZone => return Responded::OutOfZone,
        }
        Responded::Local(resp, label)
    }

    /// One answer record, owned by the question's name as asked (its case preserved, as
    /// clients using 0x20 randomisation check).
    fn record(&self, q: &Query, r: &RData) -> Option<Record> {
        let name = |n: &str| Name::from_ascii(format!("{n}.")).ok();
        let data = match r {
            RData::A(ip) => WireData::A(A(*ip)),
            RData::Aaaa(ip) => WireData::AAAA(AAAA(*ip)),
            RData::Soa(soa) => WireData::SOA(wire_soa(soa)?),
            RData::Cname(n) => WireData::CNAME(CNAME(name(n)?)),
            RData::Ptr(n) => WireData::PTR(PTR(name(n)?)),
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => WireData::SRV(SRV::new(*priority, *weight, *port, name(target)?)),
            RData::Txt(t) => WireData::TXT(TXT::new(vec![t.clone()])),
        };
        Some(Record::from_rdata(q.name().clone(), self.ttl, data))
    }
}

/// A response to `req` with its id, opcode, RD flag and (when the client uses EDNS) an OPT.
fn response_to(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_EDNS_MAX);
        resp.set_edns(edns);
    }
    resp
}

/// The zone's SOA as an authority record, owned by the zone's apex.
fn soa_record(table: &DnsTable, soa: &twill_core::dns::Soa) -> Option<Record> {
    let apex = Name::from_ascii(format!("{}.", table.zone())).ok()?;
    Some(Record::from_rdata(
        apex,
        soa.minimum,
        WireData::SOA(wire_soa(soa)?),
    ))
}

/// The table's part of answering.
enum Responded {
    /// Answered from the table (the message and the question type's metric label).
    Local(Message, &'static str),
    /// Not the cluster's name: the upstream's question.
    OutOfZone,
    /// An ExternalName's CNAME whose target's records the upstream has.
    Chase(Message, &'static str, Query),
}

fn wire_soa(soa: &twill_core::dns::Soa) -> Option<SOA> {
    let name = |n: &str| Name::from_ascii(format!("{n}.")).ok();
    let secs = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    Some(SOA::new(
        name(&soa.mname)?,
        name(&soa.rname)?,
        soa.serial,
        secs(soa.refresh),
        secs(soa.retry),
        secs(soa.expire),
        soa.minimum,
    ))
}

/// `debug dns`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DebugAnswer {
    pub result: &'static str,
    /// One `<type> <data>` line per record, in zone-file order.
    pub records: Vec<String>,
}

fn describe(r: &RData) -> String {
    match r {
        RData::A(ip) => format!("A {ip}"),
        RData::Aaaa(ip) => format!("AAAA {ip}"),
        RData::Soa(s) => format!(
            "SOA {}. {}. {} {} {} {} {}",
            s.mname, s.rname, s.serial, s.refresh, s.retry, s.expire, s.minimum
        ),
        RData::Cname(n) => format!("CNAME {n}."),
        RData::Ptr(n) => format!("PTR {n}."),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => format!("SRV {priority} {weight} {port} {target}."),
        RData::Txt(t) => format!("TXT {t:?}"),
    }
}

fn qtype_of(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::SOA => QType::Soa,
        RecordType::CNAME => QType::Cname,
        RecordType::SRV => QType::Srv,
        RecordType::PTR => QType::Ptr,
        RecordType::TXT => QType::Txt,
        RecordType::ANY => QType::Any,
        _ => QType::Other,
    }
}

/// The conventional (dig) spelling of the codes we answer with.
fn rcode_label(c: ResponseCode) -> &'static str {
    match c {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "other",
    }
}

/// A bounded set of metric labels: a client cannot mint a series per type number.
fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::CNAME => "CNAME",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// Adds `addr`'s address to the node when no interface has it, sets up forwarding to
/// `upstream`, binds UDP and TCP on `addr` and serves until aborted. A failure (the address
/// cannot be added, a port in use) is logged and leaves DNS off, and unreadable upstreams leave
/// forwarding off: the Services themselves must not depend on DNS.
pub async fn start(
    responder: Arc<DnsResponder>,
    addr: SocketAddr,
    upstream: &crate::config::DnsUpstream,
) -> Vec<tokio::task::JoinHandle<()>> {
    match node_address::ensure(addr.ip()).await {
        Ok(node_address::Owned::Added { device }) => {
            log::info!("DNS address {} added to {device}", addr.ip());
        }
        Ok(_) => {}
        Err(e) => log::warn!("adding the DNS address {}: {e:#}", addr.ip()),
    }
    match forward::upstream_servers(upstream, Some(addr)) {
        Ok(None) => log::info!("DNS forwarding off: names outside the cluster are REFUSED"),
        Ok(Some(servers)) => {
            match Forwarder::new(servers.clone(), responder.metrics.dns_forward.clone()) {
                Ok(f) => {
                    log::info!("DNS forwarding to {servers:?}");
                    responder.set_forwarder(f);
                }
                Err(e) => log::warn!("DNS forwarding off: {e}"),
            }
        }
        Err(e) => log::warn!("DNS forwarding off: {e}"),
    }
    let udp = match UdpSocket::bind(addr).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!("DNS responder off: binding UDP {addr}: {e}");
            return Vec::new();
        }
    };
    let tcp = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            log::warn!("DNS responder off: binding TCP {addr}: {e}");
            return Vec::new();
        }
    };
    log::info!("DNS responder on {addr} (UDP and TCP)");
    vec![
        tokio::spawn(serve_udp(responder.clone(), Arc::new(udp))),
        tokio::spawn(serve_tcp(responder, tcp)),
    ]
}

async fn serve_udp(responder: Arc<DnsResponder>, socket: Arc<UdpSocket>) {
    let forwards = Arc::new(tokio::sync::Semaphore::new(UDP_MAX_FORWARDS));
    // Larger than any EDNS payload a client may send; a longer datagram is cut and fails to
    // parse, which drops it.
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier replies surface here (ECONNREFUSED): not fatal.
                log::debug!("DNS UDP receive: {e}");
                continue;
            }
        };
        let out = match responder.handle(&buf[..n], Transport::Udp) {
            Handled::Reply(out) => out,
            Handled::Drop => continue,
            Handled::Forward(req) => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    if let Some(out) = responder.busy(&req)
                        && let Err(e) = socket.send_to(&out, peer).await
                    {
                        log::debug!("DNS UDP reply to {peer}: {e}");
                    }
                    continue;
                };
                // The upstream may take seconds: answer it in its own task so the questions
                // behind it (a pod's A+AAAA pair on one socket, say) are not held up.
                let (responder, socket) = (responder.clone(), socket.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(out) = responder.forwarded(&req, Transport::Udp).await
                        && let Err(e) = socket.send_to(&out, peer).await
                    {
                        log::debug!("DNS UDP reply to {peer}: {e}");
                    }
                });
                continue;
            }
        };
        if let Err(e) = socket.send_to(&out, peer).await {
            log::debug!("DNS UDP reply to {peer}: {e}");
        }
    }
}

async fn serve_tcp(responder: Arc<DnsResponder>, listener: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(TCP_MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::debug!("DNS TCP accept: {e}");
                // EMFILE and friends: give the table a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp_conn(&responder, stream).await;
        });
    }
}

/// Length-prefixed messages (RFC 1035 §4.2.2, RFC 7766) until the client closes, idles or
/// sends something that is not a query.
async fn serve_tcp_conn(responder: &DnsResponder, mut stream: TcpStream) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut msg = vec![0u8; usize::from(len)];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(out) = responder.answer(&msg, Transport::Tcp).await else {
            return;
        };
        let Ok(out_len) = u16::try_from(out.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&out_len.to_be_bytes());
        framed.extend_from_slice(&out);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
