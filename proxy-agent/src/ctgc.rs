//! Collection of the connection-tracking table (`MapKind::Ct`): which entries go. Pure — the
//! entries, the time and who owns which pod address in, the keys to delete out — so every rule
//! is unit-tested without a kernel; [`crate::datapath::AyaLbMaps::collect_ct`] reads the table,
//! asks [`plan`], and deletes each planned entry that [`still_expired`] confirms on a fresh read.
//!
//! The table is a plain hash (no LRU eviction, which would push live flows out), so nothing
//! leaves it unless it is collected here or a reset removes it in the kernel. Rules, for every
//! scope (north-south NAT and NetworkPolicy entries alike):
//! - **Expired**: an entry whose last packet is older than `ct_lifetime_ns(proto, state)` goes —
//!   but only with its counterpart (the other direction of the same flow, when present), and only
//!   when that one is expired too, since a one-way stream refreshes just one of the two.
//! - **Orphaned** (NAT entries only): a flow whose backend address no pod owns any more goes at
//!   once, whatever its state: its packets could only reach nothing, or a new pod that was given
//!   the address. Flows to a backend that merely left its Service are *not* orphaned: they drain
//!   (as with kube-proxy) while the pod lives.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use twill_common::{
    CT_F_MASQ, CT_F_REPLY, CT_SCOPE_NAT, CtKey, CtKey6, CtValue, CtValue6, ct_lifetime_ns,
};

use crate::compile::addr_be;

/// Who owns pod addresses (`u32` IPv4 or `[u32; 4]` IPv6, in the maps' form), as far as this
/// node can tell.
pub trait AddrOwners<A = u32> {
    /// Whether a pod still holds `addr`. `true` when unknown.
    fn owned(&self, addr: A) -> bool;
}

/// Every address is owned: collection by expiry only.
#[derive(Clone, Copy, Debug, Default)]
pub struct AssumeOwned;

impl<A> AddrOwners<A> for AssumeOwned {
    fn owned(&self, _addr: A) -> bool {
        true
    }
}

/// An entry of one of the two conntrack tables (IPv4 `CtKey`, IPv6 `CtKey6`): what the
/// collector reads of it. Both tables hold the same fields with the same meaning
/// (`twill_common::ct6`), so every rule below is one code path for both.
pub trait CtEntry: Copy + Ord {
    type Value: Copy;
    /// An address in the maps' form.
    type Addr;
    fn scope(&self) -> u8;
    fn proto(&self) -> u8;
    #[must_use]
    fn counterpart_of(&self, value: &Self::Value) -> Self;
    fn last_seen_ns(value: &Self::Value) -> u64;
    fn state(value: &Self::Value) -> u8;
    fn flags(value: &Self::Value) -> u32;
    fn saddr(&self) -> Self::Addr;
    fn new_daddr(value: &Self::Value) -> Self::Addr;
}

impl CtEntry for CtKey {
    type Value = CtValue;
    type Addr = u32;
    fn scope(&self) -> u8 {
        self.scope
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn counterpart_of(&self, value: &CtValue) -> Self {
        self.counterpart(value)
    }
    fn last_seen_ns(value: &CtValue) -> u64 {
        value.last_seen_ns
    }
    fn state(value: &CtValue) -> u8 {
        value.state
    }
    fn flags(value: &CtValue) -> u32 {
        value.flags
    }
    fn saddr(&self) -> u32 {
        self.saddr_be
    }
    fn new_daddr(value: &CtValue) -> u32 {
        value.new_daddr_be
    }
}

impl CtEntry for CtKey6 {
    type Value = CtValue6;
    type Addr = [u32; 4];
    fn scope(&self) -> u8 {
        self.scope
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn counterpart_of(&self, value: &CtValue6) -> Self {
        self.counterpart(value)
    }
    fn last_seen_ns(value: &CtValue6) -> u64 {
        value.last_seen_ns
    }
    fn state(value: &CtValue6) -> u8 {
        value.state
    }
    fn flags(value: &CtValue6) -> u32 {
        value.flags
    }
    fn saddr(&self) -> [u32; 4] {
        self.saddr_be
    }
    fn new_daddr(value: &CtValue6) -> [u32; 4] {
        value.new_daddr_be
    }
}

/// This node's pods, known by their host routes: the CNI plugin gives every pod a `/32` route
/// through its veth and the route goes with the veth when the pod is deleted. Addresses in this
/// node's pod CIDRs without such a route belong to no pod; addresses elsewhere (other nodes'
/// pods) cannot be judged from here and count as owned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPods {
    pub pod_cidrs: Vec<Ipv4Network>,
    /// Addresses with a host route (network order).
    pub live: BTreeSet<u32>,
}

impl LocalPods {
    /// From this node's pod CIDRs and the destinations of its `/32` routes.
    pub fn new(
        pod_cidrs: Vec<Ipv4Network>,
        host_routes: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Self {
        Self {
            pod_cidrs,
            live: host_routes.into_iter().map(addr_be).collect(),
        }
    }
}

impl AddrOwners for LocalPods {
    fn owned(&self, addr: u32) -> bool {
        let ip = crate::compile::addr_from_be(addr);
        !self.pod_cidrs.iter().any(|c| c.contains(ip)) || self.live.contains(&addr)
    }
}

/// What one collection removes (of the IPv4 table by default, `CtGcPlan<CtKey6>` of the IPv6
/// one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtGcPlan<K = CtKey> {
    /// Entries past their state's lifetime (with their counterpart).
    pub expired: Vec<K>,
    /// NAT entries of flows to an address no pod owns.
    pub orphaned: Vec<K>,
}

impl<K> Default for CtGcPlan<K> {
    fn default() -> Self {
        Self {
            expired: Vec::new(),
            orphaned: Vec::new(),
        }
    }
}

impl<K> CtGcPlan<K> {
    pub fn len(&self) -> usize {
        self.expired.len() + self.orphaned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key to delete.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.expired.iter().chain(&self.orphaned)
    }
}

fn is_expired<K: CtEntry>(key: &K, value: &K::Value, now_ns: u64) -> bool {
    now_ns.saturating_sub(K::last_seen_ns(value)) > ct_lifetime_ns(key.proto(), K::state(value))
}

/// The backend a NAT entry's flow goes to: the reply direction comes from it, the original
/// direction is rewritten to it.
pub fn backend_of<K: CtEntry>(key: &K, value: &K::Value) -> K::Addr {
    let reply = K::flags(value) & CT_F_REPLY != 0;
    if K::flags(value) & CT_F_MASQ != 0 {
        // A masqueraded flow belongs to the local pod that opened it.
        return if reply {
            K::new_daddr(value)
        } else {
            key.saddr()
        };
    }
    if reply {
        key.saddr()
    } else {
        K::new_daddr(value)
    }
}

/// Decides which entries of `entries` (a dump of either table) to delete at `now_ns`
/// (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`).
pub fn plan<K: CtEntry>(
    entries: &[(K, K::Value)],
    now_ns: u64,
    owners: &impl AddrOwners<K::Addr>,
) -> CtGcPlan<K> {
    let by_key: BTreeMap<&K, &K::Value> = entries.iter().map(|(k, v)| (k, v)).collect();
    let mut out = CtGcPlan::default();
    for (key, value) in entries {
        if key.scope() == CT_SCOPE_NAT && !owners.owned(backend_of(key, value)) {
            out.orphaned.push(*key);
            continue;
        }
        if expired_with_counterpart(key, value, |other| by_key.get(other).copied(), now_ns) {
            out.expired.push(*key);
        }
    }
    out
}

/// The expiry rule of [`plan`] for one entry: `key` (holding `value`) is past its lifetime and
/// so is its counterpart (`lookup` finds it), if it has one.
fn expired_with_counterpart<'v, K: CtEntry>(
    key: &K,
    value: &K::Value,
    lookup: impl FnOnce(&K) -> Option<&'v K::Value>,
    now_ns: u64,
) -> bool
where
    K::Value: 'v,
{
    if !is_expired(key, value, now_ns) {
        return false;
    }
    let other = key.counterpart_of(value);
    other == *key || lookup(&other).is_none_or(|v| is_expired(&other, v, now_ns))
}

/// Whether `key`, planned as expired from a dump, is still due when read again right before its
/// delete: `fresh` is its entry now (`None`: already gone), `counterpart` what its counterpart's
/// lookup returns now. A pass over a large table takes hundreds of milliseconds, and in that
/// time a client may reuse the tuple of a closed flow (`tcp_tw_reuse`, or a NAT port taken
/// over): the datapath then rewrites the entry with a fresh time, and deleting it would cut
/// the new flow (a policy flow's replies judged as new flows and denied, a NAT flow's packets
/// untranslated). Orphaned entries need no second look: their address has no pod.
pub fn still_expired<K: CtEntry>(
    key: &K,
    fresh: Option<&K::Value>,
    counterpart: impl FnOnce(&K) -> Option<K::Value>,
    now_ns: u64,
) -> bool {
    let Some(value) = fresh else {
        return false;
    };
    let other = counterpart(&key.counterpart_of(value));
    expired_with_counterpart(key, value, |_| other.as_ref(), now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_common::{
        CT_F_SNAT, CT_LIFETIME_DGRAM_ESTABLISHED_NS, CT_LIFETIME_TCP_CLOSING_NS,
        CT_LIFETIME_TCP_ESTABLISHED_NS, CT_SCOPE_POLICY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
        CT_STATE_NEW, PROTO_TCP, PROTO_UDP,
    };

    const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 200);
    const NODE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const S: u64 = 1_000_000_000;

    /// Both entries of a DNAT-only NodePort flow CLIENT:40000 → NODE:30080 → POD:8080.
    fn flow(proto: u8, state: u8, orig_seen: u64, reply_seen: u64) -> [(CtKey, CtValue); 2] {
        let orig_key = CtKey {
            saddr_be: addr_be(CLIENT),
            daddr_be: addr_be(NODE),
            sport_be: 40000u16.to_be(),
            dport_be: 30080u16.to_be(),
            proto,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        };
        let orig = CtValue {
            new_saddr_be: addr_be(CLIENT),
            new_daddr_be: addr_be(POD),
            new_sport_be: 40000u16.to_be(),
            new_dport_be: 8080u16.to_be(),
            svc_id: 1,
            flags: 0,
            state,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: orig_seen,
        };
        let reply_key = orig_key.counterpart(&orig);
        let reply = CtValue {
            new_saddr_be: addr_be(NODE),
            new_daddr_be: addr_be(CLIENT),
            new_sport_be: 30080u16.to_be(),
            new_dport_be: 40000u16.to_be(),
            flags: CT_F_REPLY,
            last_seen_ns: reply_seen,
            ..orig
        };
        [(orig_key, orig), (reply_key, reply)]
    }

    fn pods(live: &[Ipv4Addr]) -> LocalPods {
        LocalPods::new(vec!["10.244.0.0/24".parse().unwrap()], live.iter().copied())
    }

    #[test]
    fn counterparts_pair_up() {
        let [(ok, ov), (rk, rv)] = flow(PROTO_TCP, CT_STATE_ESTABLISHED, 0, 0);
        assert_eq!(ok.counterpart(&ov), rk);
        assert_eq!(rk.counterpart(&rv), ok);
        assert_eq!(backend_of(&ok, &ov), backend_of(&rk, &rv));
        assert_eq!(backend_of(&ok, &ov), addr_be(POD));
    }

    #[test]
    fn closed_flows_go_after_the_close_lifetime_established_ones_stay() {
        let now = 1000 * S;
        let closed_at = now - CT_LIFETIME_TCP_CLOSING_NS - S;
        let closed = flow(PROTO_TCP, CT_STATE_CLOSING, closed_at, closed_at);
        let recent_close = flow(PROTO_TCP, CT_STATE_CLOSING, now - 5 * S, now - 5 * S);
        let mut idle = flow(
            PROTO_TCP,
            CT_STATE_ESTABLISHED,
            now - 900 * S,
            now - 900 * S,
        );
        // Another client port, so the keys differ.
        for (k, v) in &mut idle {
            if v.flags & CT_F_REPLY == 0 {
                k.sport_be = 40001u16.to_be();
                v.new_sport_be = 40001u16.to_be();
            } else {
                k.dport_be = 40001u16.to_be();
                v.new_dport_be = 40001u16.to_be();
            }
        }
        let mut all: Vec<_> = closed.to_vec();
        all.extend(idle);
        let p = plan(&all, now, &pods(&[POD]));
        assert_eq!(p.expired, vec![closed[0].0, closed[1].0]);
        assert!(p.orphaned.is_empty());
        let p = plan(&recent_close, now, &pods(&[POD]));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_pair_expires_only_when_both_directions_are_idle() {
        let now = 10_000 * S;
        let old = now - CT_LIFETIME_DGRAM_ESTABLISHED_NS - S;
        // A one-way UDP stream: the client keeps sending, the backend answered long ago.
        let stream = flow(PROTO_UDP, CT_STATE_ESTABLISHED, now - S, old);
        assert!(plan(&stream, now, &pods(&[POD])).is_empty());
        let dead = flow(PROTO_UDP, CT_STATE_ESTABLISHED, old, old);
        assert_eq!(plan(&dead, now, &pods(&[POD])).expired.len(), 2);
        // An unanswered UDP flow lives 30 s.
        let unanswered = flow(PROTO_UDP, CT_STATE_NEW, now - 31 * S, now - 31 * S);
        assert_eq!(plan(&unanswered, now, &pods(&[POD])).expired.len(), 2);
        let est = flow(
            PROTO_TCP,
            CT_STATE_ESTABLISHED,
            now - CT_LIFETIME_TCP_ESTABLISHED_NS.min(now) / 2,
            0,
        );
        assert!(plan(&est, now, &pods(&[POD])).is_empty());
    }

    #[test]
    fn a_planned_entry_is_deleted_only_if_a_fresh_read_still_finds_it_expired() {
        let now = 10_000 * S;
        let closed_at = now - CT_LIFETIME_TCP_CLOSING_NS - S;
        let [(k, v), (rk, rv)] = flow(PROTO_TCP, CT_STATE_CLOSING, closed_at, closed_at);
        assert_eq!(
            plan(&[(k, v), (rk, rv)], now, &pods(&[POD])).expired,
            vec![k, rk]
        );
        // Unchanged since the dump, counterpart unchanged or already deleted: due.
        assert!(still_expired(&k, Some(&v), |_| Some(rv), now));
        assert!(still_expired(&k, Some(&v), |_| None, now));
        // Gone already: nothing to do.
        assert!(!still_expired(&k, None, |_| Some(rv), now));
        // The tuple was reused by a new flow since the dump: spared.
        let reused = CtValue {
            state: CT_STATE_NEW,
            tcp_fin: 0,
            last_seen_ns: now + S,
            ..v
        };
        assert!(!still_expired(&k, Some(&reused), |_| Some(rv), now));
        // Its counterpart was refreshed (a one-way stream's live half): spared too.
        let live = CtValue {
            state: CT_STATE_ESTABLISHED,
            last_seen_ns: now,
            ..rv
        };
        assert!(!still_expired(&k, Some(&v), |_| Some(live), now));
    }

    #[test]
    fn flows_to_an_address_no_local_pod_owns_are_orphaned_at_once() {
        let now = 100 * S;
        let f = flow(PROTO_TCP, CT_STATE_ESTABLISHED, now, now);
        // The pod is gone (no host route): both directions go, though the flow is fresh.
        let p = plan(&f, now, &pods(&[]));
        assert_eq!(p.orphaned, vec![f[0].0, f[1].0]);
        assert!(p.expired.is_empty());
        // Other nodes' pods cannot be judged here: kept.
        let remote = LocalPods::new(vec!["10.244.1.0/24".parse().unwrap()], []);
        assert!(plan(&f, now, &remote).is_empty());
        assert!(plan(&f, now, &AssumeOwned).is_empty());
    }

    #[test]
    fn snat_flows_and_policy_entries_follow_the_same_rules() {
        let now = 100 * S;
        let [(ok, mut ov), (_, mut rv)] = flow(PROTO_TCP, CT_STATE_CLOSING, 0, 0);
        ov.flags |= CT_F_SNAT;
        ov.new_saddr_be = addr_be(NODE);
        ov.new_sport_be = 50000u16.to_be();
        rv.flags |= CT_F_SNAT;
        let rk = ok.counterpart(&ov);
        let entries = [(ok, ov), (rk, rv)];
        assert_eq!(rk.saddr_be, addr_be(POD));
        assert_eq!(rk.daddr_be, addr_be(NODE));
        assert_eq!(plan(&entries, now, &pods(&[POD])).expired.len(), 2);
        // A policy entry (untranslated, reversed tuple as counterpart) is never orphaned, only
        // expired.
        let mut pk = ok;
        pk.scope = CT_SCOPE_POLICY;
        let pv = CtValue {
            new_saddr_be: ok.saddr_be,
            new_daddr_be: ok.daddr_be,
            new_sport_be: ok.sport_be,
            new_dport_be: ok.dport_be,
            flags: 0,
            state: CT_STATE_ESTABLISHED,
            last_seen_ns: now,
            ..ov
        };
        assert!(plan(&[(pk, pv)], now, &pods(&[])).is_empty());
        let stale = CtValue {
            state: CT_STATE_NEW,
            last_seen_ns: 0,
            ..pv
        };
        assert_eq!(plan(&[(pk, stale)], now, &pods(&[])).expired, vec![pk]);
    }

    #[test]
    fn masqueraded_flows_belong_to_their_pod() {
        let now = 100 * S;
        let outside = Ipv4Addr::new(192, 0, 2, 7);
        let ok = CtKey {
            saddr_be: addr_be(POD),
            daddr_be: addr_be(outside),
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: PROTO_TCP,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        };
        let ov = CtValue {
            new_saddr_be: addr_be(NODE),
            new_daddr_be: addr_be(outside),
            new_sport_be: 61234u16.to_be(),
            new_dport_be: 443u16.to_be(),
            svc_id: 0,
            flags: CT_F_MASQ,
            state: CT_STATE_ESTABLISHED,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: now,
        };
        let rk = ok.counterpart(&ov);
        let rv = CtValue {
            new_saddr_be: addr_be(outside),
            new_daddr_be: addr_be(POD),
            new_sport_be: 443u16.to_be(),
            new_dport_be: 40000u16.to_be(),
            flags: CT_F_MASQ | CT_F_REPLY,
            ..ov
        };
        assert_eq!(rk.counterpart(&rv), ok);
        let entries = [(ok, ov), (rk, rv)];
        // The outside host is nobody's pod, yet the flow lives while its pod does.
        assert!(plan(&entries, now, &pods(&[POD])).is_empty());
        assert_eq!(plan(&entries, now, &pods(&[])).orphaned, vec![ok, rk]);
    }

    /// No pod owns any IPv6 address.
    struct NoneOwned;
    impl AddrOwners<[u32; 4]> for NoneOwned {
        fn owned(&self, _addr: [u32; 4]) -> bool {
            false
        }
    }

    #[test]
    fn ipv6_entries_follow_the_same_rules() {
        use twill_common::{CtKey6, CtValue6, addr6_from_octets};
        let now = 1000 * S;
        let pod = addr6_from_octets(
            "fd00:10:244::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        let node = addr6_from_octets(
            "fd00:172:30::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        let out = addr6_from_octets(
            "2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        let ok = CtKey6 {
            saddr_be: pod,
            daddr_be: out,
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: PROTO_UDP,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        };
        let ov = CtValue6 {
            new_saddr_be: node,
            new_daddr_be: out,
            new_sport_be: 61234u16.to_be(),
            new_dport_be: 443u16.to_be(),
            svc_id: 0,
            flags: CT_F_MASQ,
            state: CT_STATE_ESTABLISHED,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: now - S,
        };
        let rk = ok.counterpart(&ov);
        let rv = CtValue6 {
            new_saddr_be: out,
            new_daddr_be: pod,
            new_sport_be: 443u16.to_be(),
            new_dport_be: 40000u16.to_be(),
            flags: CT_F_MASQ | CT_F_REPLY,
            last_seen_ns: now - CT_LIFETIME_DGRAM_ESTABLISHED_NS - S,
            ..ov
        };
        assert_eq!(rk.counterpart(&rv), ok);
        assert_eq!(backend_of(&ok, &ov), pod);
        assert_eq!(backend_of(&rk, &rv), pod);
        // One direction still fresh: the pair stays; both idle: both go.
        let entries = [(ok, ov), (rk, rv)];
        assert!(plan(&entries, now, &AssumeOwned).is_empty());
        let idle = CtValue6 {
            last_seen_ns: rv.last_seen_ns,
            ..ov
        };
        let p = plan(&[(ok, idle), (rk, rv)], now, &AssumeOwned);
        assert_eq!(p.expired, vec![ok, rk]);
        // An IPv6 NetworkPolicy entry (`policy6.rs`: untranslated, one per flow) is expired by
        // its state's lifetime like an IPv4 one, never orphaned (even when no pod owns any
        // address).
        let pk = CtKey6 {
            scope: CT_SCOPE_POLICY,
            ..ok
        };
        let pv = CtValue6 {
            new_saddr_be: pk.saddr_be,
            new_daddr_be: pk.daddr_be,
            new_sport_be: pk.sport_be,
            new_dport_be: pk.dport_be,
            flags: twill_common::CT_F_POLICY_EGRESS,
            last_seen_ns: now - S,
            ..ov
        };
        assert!(plan(&[(pk, pv)], now, &NoneOwned).is_empty());
        let stale = CtValue6 {
            last_seen_ns: now - CT_LIFETIME_DGRAM_ESTABLISHED_NS - S,
            ..pv
        };
        assert_eq!(plan(&[(pk, stale)], now, &NoneOwned).expired, vec![pk]);
    }
}
