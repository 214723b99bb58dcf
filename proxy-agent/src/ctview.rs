//! `twill-agent debug conntrack`: the connection-tracking table (`TWL_CT_V2`) as rows a person
//! reads. Pure — entries, the time and a filter in, rows out — like [`crate::ctgc`], which
//! decides from the same entries what the collector deletes.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use twill_common::{
    CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CT_SCOPE_POLICY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_NEW, CtKey, CtValue, PROTO_TCP, PROTO_UDP, ct_lifetime_ns,
};

const NSEC_PER_SEC: u64 = 1_000_000_000;
const PROTO_ICMP: u8 = 1;
const PROTO_SCTP: u8 = 132;

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
    pub backend: Option<Ipv4Addr>,
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(addr_be)),
        u16::from_be(port_be)
    )
}

fn addr(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr_be))
}

fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
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
fn backend_of(k: &CtKey, v: &CtValue) -> Option<(u32, u16)> {
    if k.scope != CT_SCOPE_NAT {
        None
    } else if v.flags & CT_F_REPLY != 0 {
        Some((k.saddr_be, k.sport_be))
    } else {
        Some((v.new_daddr_be, v.new_dport_be))
    }
}

fn matches(k: &CtKey, v: &CtValue, f: &CtFilter) -> bool {
    if let Some(ids) = &f.svc_ids
        && (k.scope != CT_SCOPE_NAT || !ids.contains(&v.svc_id))
    {
        return false;
    }
    match f.backend {
        None => true,
        Some(ip) => match backend_of(k, v) {
            Some((a, _)) => addr(a) == ip,
            None => addr(k.saddr_be) == ip || addr(k.daddr_be) == ip,
        },
    }
}

/// The rows of `entries` that pass `filter`, at `now_ns` (`CLOCK_MONOTONIC`, the clock of
/// `last_seen_ns`), sorted by scope, protocol, tuple.
pub fn rows(entries: &[(CtKey, CtValue)], now_ns: u64, filter: &CtFilter) -> Vec<CtRow> {
    let mut sorted: Vec<&(CtKey, CtValue)> = entries
        .iter()
        .filter(|(k, v)| matches(k, v, filter))
        .collect();
    sorted.sort_by_key(|(k, _)| {
        (
            k.scope,
            k.proto,
            u32::from_be(k.saddr_be),
            u16::from_be(k.sport_be),
            u32::from_be(k.daddr_be),
            u16::from_be(k.dport_be),
        )
    });
    sorted
        .into_iter()
        .map(|(k, v)| {
            let idle = now_ns.saturating_sub(v.last_seen_ns);
            let left = ct_lifetime_ns(k.proto, v.state).saturating_sub(idle);
            CtRow {
                scope: match k.scope {
                    CT_SCOPE_NAT => "nat".into(),
                    CT_SCOPE_POLICY => "policy".into(),
                    s => s.to_string(),
                },
                protocol: protocol_name(k.proto),
                direction: if v.flags & CT_F_REPLY != 0 {
                    "reply".into()
                } else {
                    "original".into()
                },
                source: endpoint(k.saddr_be, k.sport_be),
                destination: endpoint(k.daddr_be, k.dport_be),
                rewritten_source: endpoint(v.new_saddr_be, v.new_sport_be),
                rewritten_destination: endpoint(v.new_daddr_be, v.new_dport_be),
                backend: backend_of(k, v).map(|(a, p)| endpoint(a, p)),
                svc_id: v.svc_id,
                state: state_name(v.state),
                snat: v.flags & CT_F_SNAT != 0,
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

    #[test]
    fn rows_name_scope_direction_backend_and_expiry() {
        let rows = rows(&table(), 130 * NSEC_PER_SEC, &CtFilter::default());
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
        let late = super::rows(&table(), 1_000 * NSEC_PER_SEC, &CtFilter::default());
        assert!(late.iter().all(|r| r.expires_in_s == 0));
    }

    #[test]
    fn filters_by_service_and_backend() {
        let by_svc = CtFilter {
            svc_ids: Some(BTreeSet::from([7])),
            backend: None,
        };
        assert_eq!(rows(&table(), 0, &by_svc).len(), 2);
        let other_svc = CtFilter {
            svc_ids: Some(BTreeSet::from([8])),
            backend: None,
        };
        assert!(rows(&table(), 0, &other_svc).is_empty());
        let by_backend = |ip: [u8; 4]| CtFilter {
            svc_ids: None,
            backend: Some(Ipv4Addr::from(ip)),
        };
        assert_eq!(rows(&table(), 0, &by_backend([10, 244, 0, 5])).len(), 2);
        // The client is no backend.
        assert!(rows(&table(), 0, &by_backend([172, 30, 0, 99])).is_empty());
        // A policy entry matches either end.
        assert_eq!(rows(&table(), 0, &by_backend([10, 244, 1, 3])).len(), 1);
    }
}
