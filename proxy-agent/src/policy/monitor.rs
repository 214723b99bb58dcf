//! The denied-flow stream behind `twill-agent debug monitor`.
//!
//! ```text
//!  pod programs ── deny ──► TWL_PEV_V1 ring buffer (≤ POLICY_EVENTS_PER_CPU_SECOND per CPU;
//!                           the rest counted in TWL_PEVB_V1 per CPU)
//!  reader task: ring buffer (epoll) ─► DenyFlow (pods named from the policy inputs)
//!               budget map, every second ─► Lost { cause: rate_limit }
//!      └─► MonitorHub (broadcast) ─► each `GET /v1/monitor` on the API socket: NDJSON lines;
//!                                    a client too slow for the stream gets Lost { slow_reader }
//! ```
//!
//! The kernel bounds what a flood of denied packets costs (a budget check per packet, no ring
//! traffic beyond it); the agent says how many events it did not see, so a quiet monitor never
//! means "nothing was denied" when events were dropped.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::broadcast;
use twill_common::{EVENT_FAMILY_IPV6, POLICY_DIR_INGRESS, PolicyDenyEvent, Reason, addr6_octets};

use crate::api::Published;
use crate::metrics::Metrics;

/// Lines a subscriber may fall behind before it is told it lost some.
const SUBSCRIBER_BACKLOG: usize = 4096;
/// How often the kernel's lost-event counters are read.
const LOST_POLL: Duration = Duration::from_secs(1);

/// One side of a denied flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    /// Either family (the JSON holds the address as text).
    pub ip: IpAddr,
    pub port: u16,
    /// `namespace/name` when the address is a known pod.
    pub pod: Option<String>,
}

/// A denied packet as the monitor shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyFlow {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub unix_ns: u64,
    /// The local pod's side that denied: `ingress` or `egress`.
    pub direction: String,
    pub from: FlowEnd,
    pub to: FlowEnd,
    pub proto: String,
    /// The drop reason (`policy_denied_ingress` / `policy_denied_egress`).
    pub reason: String,
}

/// Why events are missing from the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostCause {
    /// The kernel's per-CPU budget was spent (or the ring buffer was full).
    RateLimit,
    /// This client did not read fast enough.
    SlowReader,
}

/// One line of the stream (NDJSON on the API socket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MonitorLine {
    Deny(DenyFlow),
    Lost { count: u64, cause: LostCause },
}

impl MonitorLine {
    /// The CLI's one line per flow: time, direction, from, to, protocol, reason.
    pub fn render(&self) -> String {
        match self {
            MonitorLine::Deny(d) => {
                // `addr:port`, an IPv6 address in brackets (`[addr]:port`).
                let end = |e: &FlowEnd| {
                    let at = std::net::SocketAddr::new(e.ip, e.port);
                    match &e.pod {
                        Some(p) => format!("{p} {at}"),
                        None => at.to_string(),
                    }
                };
                format!(
                    "{}  {:<7}  {} -> {}  {}  {}",
                    d.time,
                    d.direction,
                    end(&d.from),
                    end(&d.to),
                    d.proto,
                    d.reason
                )
            }
            MonitorLine::Lost { count, cause } => {
                let why = match cause {
                    LostCause::RateLimit => "over the kernel's per-CPU rate limit",
                    LostCause::SlowReader => "this client read too slowly",
                };
                format!("lost {count} event(s): {why}")
            }
        }
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        p => format!("proto-{p}"),
    }
}

/// `unix_ns` as RFC 3339 UTC with microseconds (civil-from-days, H. Hinnant's algorithm).
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3_600,
        (rem % 3_600) / 60,
        rem % 60
    )
}

impl DenyFlow {
    /// The event as shown: `boot_to_unix_ns` converts the kernel's monotonic clock to wall
    /// time; `pod` names an address.
    pub fn from_event(
        ev: &PolicyDenyEvent,
        boot_to_unix_ns: i128,
        mut pod: impl FnMut(IpAddr) -> Option<String>,
    ) -> Self {
        let unix_ns = u64::try_from(i128::from(ev.ktime_ns) + boot_to_unix_ns).unwrap_or(0);
        let v6 = ev.family == EVENT_FAMILY_IPV6;
        let mut end = |addr_be: [u32; 4], port_be: u16| {
            let ip = if v6 {
                IpAddr::V6(Ipv6Addr::from(addr6_octets(addr_be)))
            } else {
                IpAddr::V4(Ipv4Addr::from(u32::from_be(addr_be[0])))
            };
            FlowEnd {
                ip,
                port: u16::from_be(port_be),
                pod: pod(ip),
            }
        };
        let reason = Reason::ALL
            .iter()
            .find(|r| **r as u8 == ev.reason)
            .map_or_else(|| format!("reason-{}", ev.reason), |r| r.name().to_owned());
        Self {
            time: rfc3339(unix_ns),
            unix_ns,
            direction: if ev.direction == POLICY_DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            }
            .into(),
            from: end(ev.saddr_be, ev.sport_be),
            to: end(ev.daddr_be, ev.dport_be),
            proto: proto_name(ev.proto),
            reason,
        }
    }
}

/// Fans the stream out to every `debug monitor` client.
#[derive(Debug)]
pub struct MonitorHub {
    tx: broadcast::Sender<Arc<MonitorLine>>,
}

impl Default for MonitorHub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(SUBSCRIBER_BACKLOG).0,
        }
    }
}

impl MonitorHub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<MonitorLine>> {
        self.tx.subscribe()
    }

    /// Sends to whoever listens (nobody listening is fine: the line is dropped).
    pub fn publish(&self, line: MonitorLine) {
        let _ = self.tx.send(Arc::new(line));
    }

    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

/// Names pod addresses from the policy inputs, rebuilt when they change.
struct PodNames {
    published: Arc<RwLock<Published>>,
    seen: Option<Arc<crate::source::PolicyObjects>>,
    by_ip: HashMap<IpAddr, String>,
}

impl PodNames {
    fn lookup(&mut self, ip: IpAddr) -> Option<String> {
        let objects = self
            .published
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .policy_objects
            .clone();
        if !self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &objects)) {
            self.by_ip = objects
                .pods
                .values()
                .flat_map(|p| {
                    let name = format!("{}/{}", p.namespace, p.name);
                    let v4 = p.ip.map(|ip| (IpAddr::V4(ip), name.clone()));
                    let v6 = p.ip6.map(|ip| (IpAddr::V6(ip), name));
                    v4.into_iter().chain(v6)
                })
                .collect();
            self.seen = Some(objects);
        }
        self.by_ip.get(&ip).cloned()
    }
}

/// Wall clock minus the monotonic clock `bpf_ktime_get_ns` counts in.
fn boot_to_unix_ns() -> i128 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    i128::try_from(wall).unwrap_or(0) - i128::from(crate::datapath::monotonic_now_ns())
}

/// Reads the kernel's stream until the agent stops: events to the hub, lost-event counts from
/// the budget map every [`LOST_POLL`].
pub async fn read_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    budget: aya::maps::PerCpuArray<aya::maps::MapData, twill_common::EventBudget>,
    hub: Arc<MonitorHub>,
    published: Arc<RwLock<Published>>,
    metrics: Arc<Metrics>,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until the
    // AsyncFd (which owns the ring buffer) is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!(
                "denied-flow monitor: polling the ring buffer: {e}; `debug monitor` stays empty"
            );
            return;
        }
    };
    let mut names = PodNames {
        published,
        seen: None,
        by_ip: HashMap::new(),
    };
    let mut lost_seen = lost_total(&budget);
    let mut tick = tokio::time::interval(LOST_POLL);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        log::error!("denied-flow monitor: {e}; stopping");
                        return;
                    }
                };
                let offset = boot_to_unix_ns();
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < std::mem::size_of::<PolicyDenyEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote a PolicyDenyEvent (plain data, any bit pattern
                    // valid); the ring buffer's records are 8-byte aligned but read unaligned
                    // anyway.
                    let ev: PolicyDenyEvent =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    metrics.policy.monitor_events.inc();
                    if hub.has_subscribers() {
                        hub.publish(MonitorLine::Deny(DenyFlow::from_event(&ev, offset, |ip| {
                            names.lookup(ip)
                        })));
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let total = lost_total(&budget);
                if total > lost_seen {
                    metrics.policy.monitor_lost.inc_by(total - lost_seen);
                    hub.publish(MonitorLine::Lost { count: total - lost_seen, cause: LostCause::RateLimit });
                }
                lost_seen = total;
            }
        }
    }
}

/// Events the kernel did not write, summed over CPUs.
fn lost_total(
    budget: &aya::maps::PerCpuArray<aya::maps::MapData, twill_common::EventBudget>,
) -> u64 {
    budget
        .get(&0, 0)
        .map_or(0, |per_cpu| per_cpu.iter().map(|b| b.lost).sum())
}

/// Streams the hub to one API client as NDJSON until it disconnects (or cannot keep up with
/// writes for `write_timeout`).
pub async fn stream<S>(
    mut stream: S,
    mut rx: broadcast::Receiver<Arc<MonitorLine>>,
    write_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut probe = [0u8; 64];
    loop {
        let line = tokio::select! {
            got = rx.recv() => match got {
                Ok(l) => (*l).clone(),
                Err(broadcast::error::RecvError::Lagged(n)) => MonitorLine::Lost {
                    count: n,
                    cause: LostCause::SlowReader,
                },
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // The client sends nothing after its request: a read returns only at its end.
            n = stream.read(&mut probe) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return;
                }
                continue;
            }
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            continue;
        };
        text.push('\n');
        let write = async {
            stream.write_all(text.as_bytes()).await?;
            stream.flush().await
        };
        if !matches!(tokio::time::timeout(write_timeout, write).await, Ok(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> PolicyDenyEvent {
        PolicyDenyEvent {
            ktime_ns: 5_000_000_000,
            saddr_be: [u32::from(Ipv4Addr::new(10, 244, 0, 2)).to_be(), 0, 0, 0],
            daddr_be: [u32::from(Ipv4Addr::new(10, 244, 0, 3)).to_be(), 0, 0, 0],
            sport_be: 40_000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            reason: Reason::PolicyDeniedIngress as u8,
            direction: POLICY_DIR_INGRESS,
            family: twill_common::EVENT_FAMILY_IPV4,
            ep_id: 1,
            peer_identity: 256,
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2026-12-07 10:01:02.123456 UTC
        assert_eq!(
            rfc3339(1_796_637_662_123_456_789),
            "2026-12-07T10:01:02.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn an_event_names_its_pods_and_renders_one_line() {
        let names = |ip: IpAddr| (ip == Ipv4Addr::new(10, 244, 0, 3)).then(|| "x/a".to_owned());
        let d = DenyFlow::from_event(&event(), 1_796_637_657_000_000_000, names);
        assert_eq!(d.unix_ns, 1_796_637_662_000_000_000);
        assert_eq!(d.direction, "ingress");
        assert_eq!(d.from.pod, None);
        assert_eq!(d.to.pod.as_deref(), Some("x/a"));
        assert_eq!((d.from.port, d.to.port), (40_000, 80));
        let line = MonitorLine::Deny(d);
        assert_eq!(
            line.render(),
            "2026-12-07T10:01:02.000000Z  ingress  10.244.0.2:40000 -> x/a 10.244.0.3:80  tcp  policy_denied_ingress"
        );
        let json = serde_json::to_string(&line).unwrap();
        assert!(json.starts_with("{\"kind\":\"deny\""), "{json}");
        assert_eq!(serde_json::from_str::<MonitorLine>(&json).unwrap(), line);
        let lost = MonitorLine::Lost {
            count: 3,
            cause: LostCause::RateLimit,
        };
        assert_eq!(
            serde_json::to_string(&lost).unwrap(),
            "{\"kind\":\"lost\",\"count\":3,\"cause\":\"rate_limit\"}"
        );
    }

    /// An IPv6 event: addresses decoded from the maps' word form, shown as `[addr]:port` in
    /// the table and as plain addresses in the JSON, pods named by their IPv6 address.
    #[test]
    fn an_ipv6_event_shows_bracketed_addresses() {
        let (from, to): (Ipv6Addr, Ipv6Addr) = (
            "fd00:10:244::2".parse().unwrap(),
            "fd00:10:244::3".parse().unwrap(),
        );
        let mut ev = event();
        ev.family = EVENT_FAMILY_IPV6;
        ev.saddr_be = twill_common::addr6_from_octets(from.octets());
        ev.daddr_be = twill_common::addr6_from_octets(to.octets());
        ev.proto = 17;
        ev.dport_be = 53u16.to_be();
        let names = |ip: IpAddr| (ip == IpAddr::V6(to)).then(|| "x/a".to_owned());
        let d = DenyFlow::from_event(&ev, 1_796_637_657_000_000_000, names);
        assert_eq!((d.from.ip, d.to.ip), (IpAddr::V6(from), IpAddr::V6(to)));
        let line = MonitorLine::Deny(d);
        assert_eq!(
            line.render(),
            "2026-12-07T10:01:02.000000Z  ingress  [fd00:10:244::2]:40000 -> x/a [fd00:10:244::3]:53  udp  policy_denied_ingress"
        );
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["to"]["ip"], "fd00:10:244::3");
        assert_eq!(json["to"]["pod"], "x/a");
    }

    /// A client gets the lines published after it subscribed, and one that falls behind the
    /// backlog is told how many it lost.
    #[tokio::test]
    async fn the_stream_writes_ndjson_and_reports_a_slow_reader() {
        let hub = MonitorHub::default();
        let (client, server) = tokio::io::duplex(1 << 20);
        let rx = hub.subscribe();
        for _ in 0..SUBSCRIBER_BACKLOG + 10 {
            hub.publish(MonitorLine::Lost {
                count: 1,
                cause: LostCause::RateLimit,
            });
        }
        let task = tokio::spawn(stream(server, rx, Duration::from_secs(5)));
        let mut reader = tokio::io::BufReader::new(client);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut l)
                .await
                .unwrap();
            if l == "\r\n" {
                break;
            }
            head.push_str(&l);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut first = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut first)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<MonitorLine>(&first).unwrap(),
            MonitorLine::Lost {
                count: 10,
                cause: LostCause::SlowReader
            }
        );
        drop(reader);
        // The client went away: the stream ends.
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
