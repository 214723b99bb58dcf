//! The node-local DNS responder: answers the cluster's names (Kubernetes DNS-Based Service
//! Discovery) from the [`DnsTable`] the run loop publishes after each sync, over UDP and TCP.
//! The wire format is hickory-proto's; the names are twill-core's ([`twill_core::dns`]).
//!
//! Names outside the cluster's zone are answered REFUSED: forwarding to the node's resolvers is
//! not built yet. A packet that is not a DNS query, or does not parse, is dropped and counted;
//! it never stops the server.
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData as WireData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use twill_core::dns::{DnsTable, Lookup, QType, RData};

use crate::metrics::Metrics;

/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
const UDP_MIN: u16 = 512;
/// Largest UDP answer we send with EDNS, whatever the client offers: the DNS Flag Day 2020
/// value, below the fragmentation risk on every common path.
const UDP_EDNS_MAX: u16 = 1232;
/// A TCP client gets this long for each message before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once; more wait in the kernel's backlog.
const TCP_MAX_CONNECTIONS: usize = 256;

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
}

impl DnsResponder {
    pub fn new(ttl: u32, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            table: RwLock::new(None),
            ttl,
            metrics,
        })
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
            Lookup::OutOfZone => ("out of zone (REFUSED)", Vec::new()),
        };
        DebugAnswer {
            result,
            records: records.iter().map(describe).collect(),
        }
    }

    /// The answer to one DNS message, encoded; `None` when the packet is dropped.
    pub fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let Ok(req) = Message::from_vec(packet) else {
            self.metrics.dns_dropped.inc();
            return None;
        };
        // Answering a response would let two responders ping-pong forever.
        if req.metadata.message_type != MessageType::Query {
            self.metrics.dns_dropped.inc();
            return None;
        }
        let (resp, qtype) = self.respond(&req);
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

    /// The response message and the question type's metric label.
    fn respond(&self, req: &Message) -> (Message, &'static str) {
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_EDNS_MAX);
            resp.set_edns(edns);
        }
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return (resp, "other");
        }
        let [q] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return (resp, "other");
        };
        resp.add_query(q.clone());
        let qtype = qtype_of(q.query_type());
        let label = qtype_label(q.query_type());
        if q.query_class() != DNSClass::IN {
            resp.metadata.response_code = ResponseCode::Refused;
            return (resp, label);
        }
        let Some(table) = self.table() else {
            // The stores have not synced yet: "try again", not "does not exist".
            resp.metadata.response_code = ResponseCode::ServFail;
            return (resp, label);
        };
        match table.lookup(&q.name().to_ascii(), qtype) {
            Lookup::Answer(records) => {
                resp.metadata.authoritative = true;
                resp.add_answers(records.iter().filter_map(|r| self.record(q, r)));
            }
            Lookup::NoData => resp.metadata.authoritative = true,
            Lookup::NxDomain => {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            Lookup::OutOfZone => resp.metadata.response_code = ResponseCode::Refused,
        }
        (resp, label)
    }

    /// One answer record, owned by the question's name as asked (its case preserved, as
    /// clients using 0x20 randomisation check).
    fn record(&self, q: &Query, r: &RData) -> Option<Record> {
        let name = |n: &str| Name::from_ascii(format!("{n}.")).ok();
        let data = match r {
            RData::A(ip) => WireData::A(A(*ip)),
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
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// Binds UDP and TCP on `addr` and serves until aborted. A bind failure (the default link-local
/// address not configured on this node, a port in use) is logged and leaves DNS off: the
/// Services themselves must not depend on it.
pub async fn start(
    responder: Arc<DnsResponder>,
    addr: SocketAddr,
) -> Vec<tokio::task::JoinHandle<()>> {
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
        tokio::spawn(serve_udp(responder.clone(), udp)),
        tokio::spawn(serve_tcp(responder, tcp)),
    ]
}

async fn serve_udp(responder: Arc<DnsResponder>, socket: UdpSocket) {
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
        if let Some(out) = responder.answer(&buf[..n], Transport::Udp)
            && let Err(e) = socket.send_to(&out, peer).await
        {
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
        let Some(out) = responder.answer(&msg, Transport::Tcp) else {
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
