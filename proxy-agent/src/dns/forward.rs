//! Forwarding of names outside the cluster's zone to the node's resolvers, with a cache.
//!
//! The upstream side is hickory-resolver's name-server pool: UDP with EDNS0, a retry over TCP
//! when an answer comes back truncated, retries across the configured servers, and its
//! resolv.conf parser for the default (`/etc/resolv.conf`, the node's resolvers as NodeLocal
//! DNSCache uses them). Its own cache is off: ours sits in front of it so every answer is
//! counted as a hit or a miss, and a cached answer's TTLs count down as it ages (a client
//! never caches a record longer than the upstream allowed).
//!
//! Negative answers (NXDOMAIN and NODATA) are cached for the SOA's negative TTL (RFC 2308 §5)
//! and relayed with that SOA in the authority section. Failures (timeouts, SERVFAIL, REFUSED)
//! are never cached: the next query tries again.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::{LowerName, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::DnsUpstream;

/// Answers kept at most (each a few hundred bytes): a node's working set of external names
/// is far smaller; a flood of unique names evicts the least used.
const CACHE_CAPACITY: u64 = 10_000;
/// The longest a positive answer is kept, whatever its TTL says: a changed record upstream is
/// seen within this (CoreDNS's cache plugin uses an hour; NodeLocal DNSCache 30 s).
const MAX_POSITIVE_TTL: u32 = 300;
/// The longest a negative answer is kept (RFC 2308 §5 suggests at most 3 hours; a name that
/// appears upstream should work soon).
const MAX_NEGATIVE_TTL: u32 = 30;
/// Per attempt, per server; glibc's default is 5 s with 2 attempts, which a client waiting on
/// us would exceed.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const UPSTREAM_ATTEMPTS: usize = 2;

/// Why forwarding could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("reading the resolvers from {path}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    ParseResolvConf {
        path: PathBuf,
        #[source]
        source: NetError,
    },
    #[error("no upstream resolvers (none configured, or only the responder's own address)")]
    NoServers,
    #[error("building the upstream resolver")]
    Build(#[source] NetError),
}

/// The upstream servers `upstream` names, without `own` (forwarding to ourselves would loop
/// until the client gives up, as a node whose resolv.conf points at the node-local address
/// would). `None` when forwarding is off.
pub fn upstream_servers(
    upstream: &DnsUpstream,
    own: Option<SocketAddr>,
) -> Result<Option<Vec<SocketAddr>>, ForwardError> {
    let servers = match upstream {
        DnsUpstream::None => return Ok(None),
        DnsUpstream::Servers(s) => s.clone(),
        DnsUpstream::ResolvConf(path) => resolv_conf_servers(path)?,
    };
    let servers: Vec<SocketAddr> = servers.into_iter().filter(|s| Some(*s) != own).collect();
    if servers.is_empty() {
        return Err(ForwardError::NoServers);
    }
    Ok(Some(servers))
}

/// The `nameserver` lines of a resolv.conf (port 53; resolv.conf has no port syntax).
fn resolv_conf_servers(path: &Path) -> Result<Vec<SocketAddr>, ForwardError> {
    let data = std::fs::read(path).map_err(|source| ForwardError::ResolvConf {
        path: path.to_owned(),
        source,
    })?;
    let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|source| {
        ForwardError::ParseResolvConf {
            path: path.to_owned(),
            source,
        }
    })?;
    let mut out: Vec<SocketAddr> = Vec::new();
    for ns in config.name_servers() {
        let addr = SocketAddr::new(ns.ip, 53);
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// The forwarder's metrics.
#[derive(Debug)]
pub struct ForwardMetrics {
    cache: Family<ResultLabel, Counter>,
    /// Time to an upstream answer (or failure), cache misses only.
    pub upstream_duration: Histogram,
    upstream_errors: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl ForwardMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            cache: Family::default(),
            // 100 µs .. ~3 s.
            upstream_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 15)),
            upstream_errors: Family::default(),
        };
        registry.register(
            "twill_dns_forward_cache",
            "Forwarded DNS questions by cache result (hit, miss)",
            m.cache.clone(),
        );
        registry.register(
            "twill_dns_upstream_duration_seconds",
            "Time the upstream resolvers took to answer a forwarded question (cache misses)",
            m.upstream_duration.clone(),
        );
        registry.register(
            "twill_dns_upstream_errors",
            "Forwarded questions the upstream resolvers did not answer, by result (timeout, servfail, refused, other)",
            m.upstream_errors.clone(),
        );
        m
    }

    fn cache(&self, result: &'static str) {
        self.cache.get_or_create(&ResultLabel { result }).inc();
    }

    /// Cache hits so far (the unit tests read it).
    pub fn hits(&self) -> u64 {
        self.cache
            .get_or_create(&ResultLabel { result: "hit" })
            .get()
    }
}

/// An answer as the upstream gave it, when it was stored and how long it may be served.
#[derive(Debug)]
struct Cached {
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    stored: Instant,
    ttl: Duration,
}

/// What a forwarded question gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    /// Served from the cache.
    pub cached: bool,
}

/// Each entry expires after its own TTL.
struct ByTtl;

impl moka::Expiry<(LowerName, RecordType), Arc<Cached>> for ByTtl {
    fn expire_after_create(
        &self,
        _key: &(LowerName, RecordType),
        value: &Arc<Cached>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The upstream resolvers and the cache in front of them.
pub struct Forwarder {
    resolver: TokioResolver,
    cache: moka::sync::Cache<(LowerName, RecordType), Arc<Cached>>,
    servers: Vec<SocketAddr>,
    metrics: Arc<ForwardMetrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("servers", &self.servers)
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(
        servers: Vec<SocketAddr>,
        metrics: Arc<ForwardMetrics>,
    ) -> Result<Self, ForwardError> {
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                ns.connections = vec![udp, tcp];
                ns
            })
            .collect();
        // No search list and no domain: every question is forwarded as the client spelled it
        // (the client's own resolver already applied its search list).
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);
        let mut opts = ResolverOpts::default();
        opts.timeout = UPSTREAM_TIMEOUT;
        opts.attempts = UPSTREAM_ATTEMPTS;
        opts.edns0 = true;
        opts.cache_size = 0;
        // The node's /etc/hosts is the node's business, not its pods'.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.recursion_desired = true;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(ForwardError::Build)?;
        Ok(Self {
            resolver,
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(ByTtl)
                .build(),
            servers,
            metrics,
        })
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The cached answer to `q`, its TTLs aged; `None` when there is none (or it expired).
    pub fn cached(&self, q: &Query) -> Option<Forwarded> {
        let key = (LowerName::new(q.name()), q.query_type());
        let c = self.cache.get(&key)?;
        let age = c.stored.elapsed();
        if age >= c.ttl {
            return None;
        }
        let age_secs = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        let aged = |rs: &[Record]| {
            rs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(age_secs);
                    r
                })
                .collect()
        };
        Some(Forwarded {
            rcode: c.rcode,
            answers: aged(&c.answers),
            authorities: aged(&c.authorities),
            cached: true,
        })
    }

    /// The answer to `q`: from the cache, or from the upstream resolvers (and then cached).
    pub async fn forward(&self, q: &Query) -> Forwarded {
        if let Some(hit) = self.cached(q) {
            self.metrics.cache("hit");
            return hit;
        }
        self.metrics.cache("miss");
        let start = Instant::now();
        let result = self.resolver.lookup(q.name().clone(), q.query_type()).await;
        self.metrics
            .upstream_duration
            .observe(start.elapsed().as_secs_f64());
        let (rcode, answers, authorities, ttl) = match result {
            Ok(lookup) => {
                let answers = lookup.answers().to_vec();
                let ttl = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
                (
                    ResponseCode::NoError,
                    answers,
                    Vec::new(),
                    ttl.min(MAX_POSITIVE_TTL),
                )
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                let rcode = if none.response_code == ResponseCode::NXDomain {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let soa: Vec<Record> = none
                    .soa
                    .map(|s| (*s).into_record_of_rdata())
                    .into_iter()
                    .collect();
                // Without an SOA a negative answer must not be cached (RFC 2308 §5).
                let ttl = none.negative_ttl.unwrap_or(0).min(MAX_NEGATIVE_TTL);
                (rcode, Vec::new(), soa, ttl)
            }
            Err(e) => {
                let (rcode, label) = failure(&e);
                self.metrics
                    .upstream_errors
                    .get_or_create(&ResultLabel { result: label })
                    .inc();
                log::debug!("DNS forward of {} {}: {e}", q.name(), q.query_type());
                return Forwarded {
                    rcode,
                    answers: Vec::new(),
                    authorities: Vec::new(),
                    cached: false,
                };
            }
        };
        if ttl > 0 {
            self.cache.insert(
                (LowerName::new(q.name()), q.query_type()),
                Arc::new(Cached {
                    rcode,
                    answers: answers.clone(),
                    authorities: authorities.clone(),
                    stored: Instant::now(),
                    ttl: Duration::from_secs(u64::from(ttl)),
                }),
            );
        }
        Forwarded {
            rcode,
            answers,
            authorities,
            cached: false,
        }
    }
}

/// The code a failed forward answers with, and its metric label. An upstream's own error code
/// is relayed; anything else (a timeout, no connection) is SERVFAIL.
fn failure(e: &NetError) -> (ResponseCode, &'static str) {
    match e {
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => {
            (ResponseCode::Refused, "refused")
        }
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => {
            (ResponseCode::ServFail, "servfail")
        }
        NetError::Timeout => (ResponseCode::ServFail, "timeout"),
        _ => (ResponseCode::ServFail, "other"),
    }
}
