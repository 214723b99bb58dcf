//! NetworkPolicy verdicts for the pod programs (`pod.rs`); the map contents and the reasoning
//! behind their shape are in `docs/design/policy.md` and `twill_common::policy`.
//!
//! ```text
//!  POLICY_ENDPOINTS[local pod]        none, or not isolated either way ─► pass (no state)
//!  CT[tuple] has this side's bit      ─► pass (a later packet of an allowed flow)
//!  CT[reverse] has the other side's   ─► pass (a reply of an allowed flow)
//!  not isolated in this direction     ─► record CT (so replies pass the other direction) ─► pass
//!  IPCACHE_HOSTS[peer], else IPCACHE[peer] (LPM) ─► identity (WORLD when no prefix covers it;
//!      HOST into a pod: allowed)
//!  POLICY[(ep, dir, identity, proto, port)] then POLICY[(ep, dir, ANY, proto, port)]
//!      hit ─► record CT ─► pass            miss ─► drop (policy_denied_ingress / _egress),
//!                                                  event to the denied-flow stream (monitor.rs)
//! ```
//!
//! Every step is a hash or LPM lookup: the cost of a packet does not depend on how many
//! policies, rules or pods exist. A flow is judged once per node and side, then followed by its
//! conntrack entry in the shared `TWL_CT_V2` table (`CtKey::scope = CT_SCOPE_POLICY`, keyed by
//! the tuple as the flow's originator sends it, with a flag per side that passed — see
//! `CT_F_POLICY_EGRESS`). Entries carry the table's state machine (`CT_STATE_*`: new, established
//! once a reply passed, closing after both FINs or a RST) and are expired by the agent's one
//! conntrack collector like NAT entries.
//!
//! When both pods are on this node, the fast path judges a packet twice in one program run: the
//! sender's egress (`pod.rs`), then the receiver's ingress (`fwd::deliver`), on the same tuple.
//! The second starts from the conntrack entry the first passed the packet on ([`CtSeen`]): the
//! same entries with the same flags decide, one to two hash lookups fewer per packet.
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use twill_common::{
    CT_F_POLICY_EGRESS, CT_F_POLICY_INGRESS, CT_SCOPE_POLICY, CT_STATE_NEW, CtKey, CtValue,
    IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, IpCacheKey, PEP_F_EGRESS_ISOLATED,
    PEP_F_INGRESS_ISOLATED, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, PolicyEndpoint, PolicyEntry,
    PolicyKey, Reason,
};

use crate::{
    maps::{TWL_CT_V2, TWL_IPC_V1, TWL_IPCH_V1, TWL_PEP_V1, TWL_POL_V1},
    pkt::{Flow, PROTO_ICMP},
};

/// Bits of a full `PolicyKey` (every field matched).
const POLICY_KEY_BITS: u32 = 128;
/// Bits of an `IpCacheKey` address.
const IPCACHE_KEY_BITS: u32 = 32;
/// `BPF_NOEXIST`: create only; another CPU may have created the entry in the meantime.
const BPF_NOEXIST: u64 = 1;

/// Which side of a flow a program judges for its local pod.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local pod sends the packet (tc ingress of its host veth).
    Egress,
    /// The local pod receives the packet (tc egress of its host veth).
    Ingress,
}

impl Side {
    #[inline(always)]
    pub fn direction(self) -> u8 {
        match self {
            Side::Egress => POLICY_DIR_EGRESS,
            Side::Ingress => POLICY_DIR_INGRESS,
        }
    }
    #[inline(always)]
    pub fn isolated_flag(self) -> u32 {
        match self {
            Side::Egress => PEP_F_EGRESS_ISOLATED,
            Side::Ingress => PEP_F_INGRESS_ISOLATED,
        }
    }
    /// The CT flag this side sets on the tuple it judged.
    #[inline(always)]
    pub fn ct_flag(self) -> u32 {
        match self {
            Side::Egress => CT_F_POLICY_EGRESS,
            Side::Ingress => CT_F_POLICY_INGRESS,
        }
    }
    /// The CT flag that lets this side's packet through as a reply: the other side's pass.
    #[inline(always)]
    pub fn reply_flag(self) -> u32 {
        match self {
            Side::Egress => CT_F_POLICY_INGRESS,
            Side::Ingress => CT_F_POLICY_EGRESS,
        }
    }
    #[inline(always)]
    pub fn denied(self) -> Reason {
        match self {
            Side::Egress => Reason::PolicyDeniedEgress,
            Side::Ingress => Reason::PolicyDeniedIngress,
        }
    }
}

/// The conntrack entry a judgement passed a packet on, for the next judgement of the same packet.
/// For a node-local flow on the fast path the sender's egress and the receiver's ingress judge
/// the same packet one after the other (`pod.rs` then `fwd::deliver`), on the same tuple: the
/// second starts from the entry the first passed on instead of looking it up again (one hash
/// lookup fewer for a packet of the flow's originator, two for a reply). Only the two
/// established cases are handed on, so the verifier walks the receiver's judgement three ways,
/// not once per outcome of the sender's.
#[derive(Clone, Copy)]
pub enum CtSeen {
    /// Nothing known: every lookup is made.
    Nothing,
    /// The packet's tuple has this entry (its fields are read afresh: the same element a new
    /// lookup would find).
    Tuple(*mut CtValue),
    /// The packet's tuple has no entry; its reverse has this one.
    Reverse(*mut CtValue),
}

/// The verdict for `flow` on `side` of its local pod: `Ok` passes (the reason says why, and the
/// entry it passed on), `Err` drops. `seen`: what an earlier judgement of this very packet
/// passed on ([`CtSeen::Nothing`] when there was none).
#[inline(always)]
pub fn judge(flow: &Flow, side: Side, seen: CtSeen) -> Result<(Reason, CtSeen), Reason> {
    let (local, peer) = match side {
        Side::Egress => (flow.saddr, flow.daddr),
        Side::Ingress => (flow.daddr, flow.saddr),
    };
    let Some(ep) = endpoint(local) else {
        return Ok((Reason::PolicyNotEnforced, CtSeen::Nothing));
    };
    if ep.flags & (PEP_F_INGRESS_ISOLATED | PEP_F_EGRESS_ISOLATED) == 0 {
        return Ok((Reason::PolicyNotEnforced, CtSeen::Nothing));
    }
    let key = flow.ct_key(CT_SCOPE_POLICY);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = match seen {
        CtSeen::Nothing => TWL_CT_V2.get_ptr_mut(&key),
        CtSeen::Tuple(ptr) => Some(ptr),
        CtSeen::Reverse(_) => None,
    };
    if let Some(ptr) = fwd
        && ct_pass(ptr, side.ct_flag(), now, flow.tcp_flags, false)
    {
        return Ok((Reason::PolicyEstablished, CtSeen::Tuple(ptr)));
    }
    let rev = match seen {
        CtSeen::Reverse(ptr) => Some(ptr),
        _ => TWL_CT_V2.get_ptr_mut(&key.reversed()),
    };
    if let Some(ptr) = rev
        && ct_pass(ptr, side.reply_flag(), now, flow.tcp_flags, true)
    {
        let seen = if fwd.is_none() {
            CtSeen::Reverse(ptr)
        } else {
            CtSeen::Nothing
        };
        return Ok((Reason::PolicyEstablished, seen));
    }
    if flow.related {
        // An ICMP error about no flow this side passed: judged as the ICMP packet it is (only
        // rules without ports allow it), and never tracked (its tuple is not its own).
        if ep.flags & side.isolated_flag() == 0 {
            return Ok((Reason::PolicyNotEnforced, CtSeen::Nothing));
        }
        let id = identity(peer, side);
        if allowed(&ep, side, id, PROTO_ICMP, 0).is_none() {
            return Err(deny(flow, side, &ep, id));
        }
        return Ok((Reason::PolicyAllowed, CtSeen::Nothing));
    }
    let reason = if ep.flags & side.isolated_flag() == 0 {
        // Not isolated this way, but the other way: remember the flow so its replies pass.
        Reason::PolicyNotEnforced
    } else {
        let id = identity(peer, side);
        // Traffic from this node into its pods is always allowed (kubelet probes).
        if !(side == Side::Ingress && id == IDENTITY_HOST) {
            if allowed(&ep, side, id, flow.proto, flow.policy_port()).is_none() {
                return Err(deny(flow, side, &ep, id));
            }
        }
        Reason::PolicyAllowed
    };
    ct_record(&key, fwd, side.ct_flag(), now)?;
    Ok((reason, CtSeen::Nothing))
}

/// The drop reason for `flow` on `side`, reported to the denied-flow stream on the way.
#[inline(always)]
fn deny(flow: &Flow, side: Side, ep: &PolicyEndpoint, peer: u32) -> Reason {
    let reason = side.denied();
    crate::monitor::denied(flow, side.direction(), reason, ep.ep_id, peer);
    reason
}

#[inline(always)]
fn endpoint(addr_be: u32) -> Option<PolicyEndpoint> {
    // SAFETY: the value is copied out before the next helper call.
    unsafe { TWL_PEP_V1.get(addr_be) }.copied()
}

/// The peer's identity: its pod (or HOST), or the ipBlock region its address lies in, or WORLD.
/// Pod and node addresses are /32 entries of the exact-match hash, which holds the longest
/// match whenever it has the address; only other addresses walk the trie of ipBlock prefixes.
#[inline(always)]
fn identity(addr_be: u32, _side: Side) -> u32 {
    let data = IpCacheKey { addr_be };
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { TWL_IPCH_V1.get(&data) } {
        return v.id;
    }
    TWL_IPC_V1
        .get(&Key::new(IPCACHE_KEY_BITS, data))
        .map_or(IDENTITY_WORLD, |v| v.id)
}

/// The rule allowing `identity` (then any peer) to reach `proto`/`port_be` on `side` of `ep`:
/// the LPM match covers rules without ports, protocol-only rules and port ranges.
#[inline(always)]
pub fn allowed(
    ep: &PolicyEndpoint,
    side: Side,
    identity: u32,
    proto: u8,
    port_be: u16,
) -> Option<u32> {
    let mut key = Key::new(
        POLICY_KEY_BITS,
        PolicyKey {
            ep_id_be: ep.ep_id.to_be(),
            direction: side.direction(),
            _pad: [0; 3],
            identity_be: identity.to_be(),
            proto,
            _pad2: 0,
            port_be,
        },
    );
    if let Some(v) = TWL_POL_V1.get(&key) {
        return Some(v.rule_id);
    }
    key.data.identity_be = IDENTITY_ANY.to_be();
    TWL_POL_V1.get(&key).map(|v| v.rule_id)
}

/// Whether the entry at `ptr` is tracked with `flag`; if so, refreshes its timestamp and moves
/// its state: a reply (`reply`: the packet travels against the entry's tuple) establishes the
/// flow, a FIN from each side or a RST closes it.
#[inline(always)]
fn ct_pass(ptr: *mut CtValue, flag: u32, now: u64, tcp_flags: u8, reply: bool) -> bool {
    // SAFETY: a valid map value pointer for the program's duration. Concurrent writers on
    // other CPUs may interleave: a lost timestamp, flag or state step costs at most one more
    // judgement or an earlier expiry, never a wrong allow.
    unsafe { (*ptr).policy_pass(flag, now, tcp_flags, reply) }
}

/// Records that `flag`'s side passed the flow `key`: a new entry, or the flag added to the
/// entry the other side of a node-local flow made (`found`: that entry, when the judgement
/// already looked it up).
#[inline(always)]
fn ct_record(key: &CtKey, found: Option<*mut CtValue>, flag: u32, now: u64) -> Result<(), Reason> {
    // The tuple itself as the "translation": untranslated, so the collector's counterpart of
    // the entry is simply the reversed tuple.
    let value = CtValue {
        new_saddr_be: key.saddr_be,
        new_daddr_be: key.daddr_be,
        new_sport_be: key.sport_be,
        new_dport_be: key.dport_be,
        svc_id: 0,
        flags: flag,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let found = match found {
        Some(ptr) => Some(ptr),
        None if TWL_CT_V2.insert(key, value, BPF_NOEXIST).is_ok() => return Ok(()),
        // Another CPU created it since the lookup.
        None => TWL_CT_V2.get_ptr_mut(key),
    };
    if let Some(ptr) = found {
        // SAFETY: as in ct_pass.
        unsafe { (*ptr).policy_record(&value, flag, now) };
        return Ok(());
    }
    // Neither created nor found: the table could not take the flow. Its replies would be
    // dropped later, so it is dropped now, visibly.
    Err(Reason::PolicyCtFull)
}
