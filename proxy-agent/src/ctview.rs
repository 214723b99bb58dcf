//! `twill-agent debug conntrack`: the connection-tracking tables (`TWL_CT_V2`, `TWL_CT6_V1`) as rows a person
//! reads. Pure — entries, the time and a filter in, rows out — like [`crate::ctgc`], which
//! decides from the same entries what the collector deletes.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use twill_common::{
    CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CT_SCOPE_POLICY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_NEW, CtKey, CtKey6, CtValue, CtValue6, PROTO_TCP, PROTO_UDP, ct_lifetime_ns,
};
use twill_core::family::addr6_from_be;

const NSEC_PER_SEC: u64 = 1_000_000_000;
const PROTO_ICMP: u8 = 1;
const PROTO_SCTP: u8 = 132;
const PROTO_ICMPV6: u8 = 58;

/// One entry of the table (one direction of a flow).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtRow {
    /// `nat` (north-south translation) or `policy` (a flow NetworkPolicy allowed).
    pub scope: String,
    pub protocol: String,
    /// `original` (client → frontend) or `reply` (backend → client), for `nat` entries.
    pub direction: String,
    /// The tuple as a packet of this direction arrives.
    pub source: String,
    pub destination: String,
    /// What the packet is rewritten to (`nat` entries): source and destination.
    pub rewritten_source: String,
    pub rewritten_destination: String,
    /// The backend the flow goes to (`nat` entries).
    pub backend: Option<String>,
    /// The Service frontend's id (`nat` entries; 0 for `policy`).
    pub svc_id: u32,
    /// `new`, `established`, `closing` (or the raw number).
    pub state: String,
    /// The client's address is translated too (externalTrafficPolicy Cluster, remote backend).
    pub snat: bool,
    /// Seconds since the last packet.
    pub idle_s: u64,
    /// Seconds left before the entry expires (0: expired, waiting for the collector).
    pub expires_in_s: u64,
}

/// Which entries to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtFilter {
    /// Only entries of these Service frontends (`svc_id`).
    pub svc_ids: Option<BTreeSet<u32>>,
    /// Only entries whose backend is this address (`nat`), or with it at either end (`policy`).
    pub backend: Option<IpAddr>,
}

/// An entry of either table (`TWL_CT_V2` or `TWL_CT6_V1`: the same fields with the same
/// meaning, `twill_common::ct6`) with its addresses as addresses, so one code path shows both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    scope: u8,
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    new_src: SocketAddr,
    new_dst: SocketAddr,
    svc_id: u32,
    flags: u32,
    state: u8,
    last_seen_ns: u64,
}

fn v4(addr_be: u32, port_be: u16) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::from(u32::from_be(addr_be)).into(),
        u16::from_be(port_be),
    )
}

fn v6(addr_be: [u32; 4], port_be: u16) -> SocketAddr {
    SocketAddr::new(addr6_from_be(addr_be).into(), u16::from_be(port_be))
}

impl From<&(CtKey, CtValue)> for Entry {
    fn from((k, v): &(CtKey, CtValue)) -> Self {
        Self {
            scope: k.scope,
            proto: k.proto,
            src: v4(k.saddr_be, k.sport_be),
            dst: v4(k.daddr_be, k.dport_be),
            new_src: v4(v.new_saddr_be, v.new_sport_be),
            new_dst: v4(v.new_daddr_be, v.new_dport_be),
            svc_id: v.svc_id,
            flags: v.flags,
            state: v.state,
            last_seen_ns: v.last_seen_ns,
        }
    }
}

impl From<&(CtKey6, CtValue6)> for Entry {
    fn from((k, v): &(CtKey6, CtValue6)) -> Self {
        Self {
            scope: k.scope,
            proto: k.proto,
            src: v6(k.saddr_be, k.sport_be),
            dst: v6(k.daddr_be, k.dport_be),
            new_src: v6(v.new_saddr_be, v.new_sport_be),
            new_dst: v6(v.new_daddr_be, v.new_dport_be),
            svc_id: v.svc_id,
            flags: v.flags,
            state: v.state,
            last_seen_ns: v.last_seen_ns,
        }
    }
}

fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        PROTO_ICMPV6 => "icmpv6".into(),
        PROTO_SCTP => "sctp".into(),
        p => p.to_string(),
    }
}

fn state_name(state: u8) -> String {
    match state {
        CT_STATE_NEW => "new".into(),
        CT_STATE_ESTABLISHED => "established".into(),
        CT_STATE_CLOSING => "closing".into(),
        s => s.to_string(),
    }
}

/// The backend of a `nat` entry: where the original direction is sent, where replies come from.
fn backend_of(e: &Entry) -> Option<SocketAddr> {
    if e.scope != CT_SCOPE_NAT {
        None
    } else if e.flags & CT_F_REPLY != 0 {
        Some(e.src)
    } else {
        Some(e.new_dst)
    }
}

fn matches(e: &Entry, f: &CtFilter) -> bool {
    if let Some(ids) = &f.svc_ids
        && (e.scope != CT_SCOPE_NAT || !ids.contains(&e.svc_id))
    {
        return false;
    }
    match f.backend {
        None => true,
        Some(ip) => match backend_of(e) {
            Some(b) => b.ip() == ip,
            None => e.src.ip() == ip || e.dst.ip() == ip,
        },
    }
}

/// The rows of `entries` (of either table, or both) that pass `filter`, at `now_ns`
/// (`CLOCK_MONOTONIC`, the clock of `last_seen_ns`), sorted by scope, protocol, tuple (IPv4
/// before IPv6).
pub fn rows(
    entries: impl IntoIterator<Item = Entry>,
    now_ns: u64,
    filter: &CtFilter,
) -> Vec<CtRow> {
    let mut sorted: Vec<Entry> = entries.into_iter().filter(|e| matches(e, filter)).collect();
    sorted.sort_by_key(|e| (e.scope, e.proto, e.src, e.dst));
    sorted
        .into_iter()
        .map(|e| {
            let idle = now_ns.saturating_sub(e.last_seen_ns);
            let left = ct_lifetime_ns(e.proto, e.state).saturating_sub(idle);
            CtRow {
                scope: match e.scope {
                    CT_SCOPE_NAT => "nat".into(),
                    CT_SCOPE_POLICY => "policy".into(),
                    s => s.to_string(),
                },
                protocol: protocol_name(e.proto),
                direction: if e.flags & CT_F_REPLY != 0 {
                    "reply".into()
                } else {
                    "original".into()
                },
                source: e.src.to_string(),
                destination: e.dst.to_string(),
                rewritten_source: e.new_src.to_string(),
                rewritten_destination: e.new_dst.to_string(),
                backend: backend_of(&e).map(|b| b.to_string()),
                svc_id: e.svc_id,
                state: state_name(e.state),
                snat: e.flags & CT_F_SNAT != 0,
                idle_s: idle / NSEC_PER_SEC,
                expires_in_s: left.div_ceil(NSEC_PER_SEC),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(a: [u8; 4]) -> u32 {
        u32::from(Ipv4Addr::from(a)).to_be()
    }

    /// A NodePort flow 172.30.0.99:40000 → 172.30.0.11:30053 to backend 10.244.0.5:8080 with
    /// SNAT to the node, both directions, plus a policy entry of another pod.
    fn table() -> Vec<(CtKey, CtValue)> {
        let key = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, scope| CtKey {
            saddr_be: be(s),
            daddr_be: be(d),
            sport_be: sp.to_be(),
            dport_be: dp.to_be(),
            proto: PROTO_UDP,
            scope,
            _pad: [0; 2],
        };
        let val = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, svc_id, flags| CtValue {
            new_saddr_be: be(s),
            new_daddr_be: be(d),
            new_sport_be: sp.to_be(),
            new_dport_be: dp.to_be(),
            svc_id,
            flags,
            state: CT_STATE_ESTABLISHED,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: 100 * NSEC_PER_SEC,
        };
        let (client, node, pod) = ([172, 30, 0, 99], [172, 30, 0, 11], [10, 244, 0, 5]);
        vec![
            (
                key(pod, 8080, node, 40000, CT_SCOPE_NAT),
                val(node, 30053, client, 40000, 7, CT_F_REPLY | CT_F_SNAT),
            ),
            (
                key(client, 40000, node, 30053, CT_SCOPE_NAT),
                val(node, 40000, pod, 8080, 7, CT_F_SNAT),
            ),
            (
                key([10, 244, 0, 9], 5000, [10, 244, 1, 3], 53, CT_SCOPE_POLICY),
                val([10, 244, 0, 9], 5000, [10, 244, 1, 3], 53, 0, 0),
            ),
        ]
    }

    fn entries() -> Vec<Entry> {
        table().iter().map(Entry::from).collect()
    }

    #[test]
    fn rows_name_scope_direction_backend_and_expiry() {
        let rows = rows(entries(), 130 * NSEC_PER_SEC, &CtFilter::default());
        assert_eq!(rows.len(), 3);
        let orig = &rows[1];
        assert_eq!(
            (
                orig.scope.as_str(),
                orig.direction.as_str(),
                orig.protocol.as_str()
            ),
            ("nat", "original", "udp")
        );
        assert_eq!(orig.source, "172.30.0.99:40000");
        assert_eq!(orig.destination, "172.30.0.11:30053");
        assert_eq!(orig.backend.as_deref(), Some("10.244.0.5:8080"));
        assert_eq!(orig.rewritten_source, "172.30.0.11:40000");
        assert!(orig.snat);
        assert_eq!(orig.state, "established");
        // UDP established lives 120 s after its last packet, 30 s ago.
        assert_eq!((orig.idle_s, orig.expires_in_s), (30, 90));
        let reply = &rows[0];
        assert_eq!(reply.direction, "reply");
        assert_eq!(reply.backend.as_deref(), Some("10.244.0.5:8080"));
        assert_eq!(rows[2].scope, "policy");
        assert_eq!(rows[2].backend, None);
        // Long past its lifetime: 0 left, not a wrapped-around number.
        let late = super::rows(entries(), 1_000 * NSEC_PER_SEC, &CtFilter::default());
        assert!(late.iter().all(|r| r.expires_in_s == 0));
    }

    #[test]
    fn filters_by_service_and_backend() {
        let by_svc = CtFilter {
            svc_ids: Some(BTreeSet::from([7])),
            backend: None,
        };
        assert_eq!(rows(entries(), 0, &by_svc).len(), 2);
        let other_svc = CtFilter {
            svc_ids: Some(BTreeSet::from([8])),
            backend: None,
        };
        assert!(rows(entries(), 0, &other_svc).is_empty());
        let by_backend = |ip: [u8; 4]| CtFilter {
            svc_ids: None,
            backend: Some(Ipv4Addr::from(ip).into()),
        };
        assert_eq!(rows(entries(), 0, &by_backend([10, 244, 0, 5])).len(), 2);
        // The client is no backend.
        assert!(rows(entries(), 0, &by_backend([172, 30, 0, 99])).is_empty());
        // A policy entry matches either end.
        assert_eq!(rows(entries(), 0, &by_backend([10, 244, 1, 3])).len(), 1);
    }

    /// The IPv6 table's entries read the same way, addresses in brackets before their port, and
    /// sort after the IPv4 ones of the same scope and protocol.
    #[test]
    fn ipv6_entries_are_shown_with_the_ipv4_ones() {
        use std::net::Ipv6Addr;
        use twill_core::family::addr6_be;
        let (client, node, pod): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
            "fd00:30::99".parse().unwrap(),
            "fd00:30::11".parse().unwrap(),
            "fd00:10:244::5".parse().unwrap(),
        );
        let k = CtKey6 {
            saddr_be: addr6_be(client),
            daddr_be: addr6_be(node),
            sport_be: 40000u16.to_be(),
            dport_be: 30053u16.to_be(),
            proto: PROTO_UDP,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        };
        let v = CtValue6 {
            new_saddr_be: addr6_be(client),
            new_daddr_be: addr6_be(pod),
            new_sport_be: 40000u16.to_be(),
            new_dport_be: 8080u16.to_be(),
            svc_id: 9,
            flags: 0,
            state: CT_STATE_NEW,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: 100 * NSEC_PER_SEC,
        };
        let all: Vec<Entry> = entries()
            .into_iter()
            .chain([Entry::from(&(k, v))])
            .collect();
        let rows = rows(all.clone(), 110 * NSEC_PER_SEC, &CtFilter::default());
        assert_eq!(rows.len(), 4);
        let r = &rows[2];
        assert_eq!(r.source, "[fd00:30::99]:40000");
        assert_eq!(r.destination, "[fd00:30::11]:30053");
        assert_eq!(r.backend.as_deref(), Some("[fd00:10:244::5]:8080"));
        assert_eq!((r.state.as_str(), r.expires_in_s), ("new", 20));
        let by_backend = CtFilter {
            svc_ids: None,
            backend: Some(pod.into()),
        };
        assert_eq!(super::rows(all, 0, &by_backend).len(), 1);
    }
}
