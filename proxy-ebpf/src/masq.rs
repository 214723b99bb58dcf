//! eBPF masquerade on the devices' tc egress (`twill_tc_egress`): a local pod's flow leaving
//! the cluster gets the node's address and a port of the masquerade range, with its two
//! entries in the one conntrack table; netfilter is not involved.
//!
//! ```text
//!  egress, CT miss: source ∈ this node's pod CIDRs, destination not exempt (MASQ LPM)
//!    TCP without SYN / ICMP echo reply / later fragment ─► untouched (MasqNotOpened: no flow
//!    to continue; a pod answering an outside TCP client or pinger)
//!    source address: the route's preferred source (bpf_fib_lookup + BPF_FIB_LOOKUP_SRC)
//!    port: from FastPathConfig's range (the agent reserves it with ip_local_reserved_ports
//!          and keeps it out of ip_local_port_range, so no node socket picks one), claimed
//!          by `natport::claim` (random probes, skipping node sockets' tuples, taking over
//!          closed flows' ports)
//!    ICMP echo request: the identifier is the port (same range; replies carry it back)
//!    CT: reply entry (remote → node:port ⇒ pod) first, then the original (pod ⇒ node:port)
//!  ingress, CT miss, not a Service: UDP from outside the cluster to a local pod's own address
//!    ─► both entries untranslated (MasqInbound), so the pod's answers are recognized as
//!    replies and leave with the pod's address instead of opening a masqueraded flow
//!  later packets, replies, ICMP errors: the NAT path's CT lookup and rewrite (`tc.rs`), the
//!  reply then delivered into the pod by the fast path
//! ```
//!
//! Expiry is the table's: state machine in the kernel, collection by the agent (`ctgc`), the
//! entries owned by the pod (`CT_F_MASQ`), so a gone pod's flows are flushed at once.
use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use twill_common::{
    CT_F_MASQ, CT_F_REPLY, CT_SCOPE_NAT, CT_STATE_NEW, CtKey, CtValue, FP_F_MASQ_BPF, PROTO_TCP,
    PROTO_UDP, Reason,
};

use crate::{
    fwd::{config, masqueraded},
    maps::TWL_CT_V2,
    natport::{self, Ct4},
    pkt::PROTO_ICMP,
    tc::{Pkt, Verdict, rewrite, route},
};

/// `-EEXIST`: a `BPF_NOEXIST` insert met an existing key.
const EEXIST: i64 = -17;

/// A packet leaving through this device that no CT entry knows: masqueraded when it is a local
/// pod's new flow out of the cluster, else untouched (`NotService`).
#[inline(always)]
pub fn open(ctx: &TcContext, p: &Pkt) -> Result<Verdict, Reason> {
    let cfg = config();
    if cfg.flags & FP_F_MASQ_BPF == 0
        || (p.flow.proto != PROTO_TCP && p.flow.proto != PROTO_UDP && p.flow.proto != PROTO_ICMP)
        || !masqueraded(p.flow.saddr, p.flow.daddr)
    {
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    if p.later_fragment
        || (p.flow.proto == PROTO_TCP && !p.flow.is_syn())
        || (p.flow.proto == PROTO_ICMP && !p.echo_request)
    {
        // The middle of a flow without an entry (expired, flushed, or opened before the
        // masquerade ran): rewriting it to a new port would only confuse the peer.
        return Ok((Reason::MasqNotOpened, TC_ACT_OK));
    }
    let (rc, params) = route(
        ctx,
        p.flow.proto,
        p.flow.saddr,
        p.flow.daddr,
        BPF_FIB_LOOKUP_SRC,
    );
    // SAFETY: union member written by the kernel for AF_INET lookups.
    let snat = unsafe { params.__bindgen_anon_3.ipv4_src };
    if rc != 0 || snat == 0 {
        return Err(Reason::RewriteFailed);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = CtValue {
        new_saddr_be: p.flow.daddr,
        new_daddr_be: p.flow.saddr,
        new_sport_be: p.flow.dport,
        new_dport_be: p.flow.sport,
        svc_id: 0,
        flags: CT_F_REPLY | CT_F_MASQ,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let min = u32::from(cfg.masq_port_min);
    let span = u32::from(cfg.masq_port_max).saturating_sub(min) + 1;
    if min == 0 {
        return Err(Reason::MasqPortsExhausted);
    }
    let mut key = reply_key(p, snat, 0);
    let Some(port_be) = natport::claim::<Ct4>(ctx, &mut key, &reply, None, (min, span), now)?
    else {
        return Err(Reason::MasqPortsExhausted);
    };
    let orig = CtValue {
        new_saddr_be: snat,
        new_daddr_be: p.flow.daddr,
        new_sport_be: port_be,
        new_dport_be: p.flow.dport,
        flags: CT_F_MASQ,
        ..reply
    };
    natport::open::<Ct4>(&p.flow.nat_key(), &orig, &key)?;
    rewrite(ctx, p, snat, port_be, p.flow.daddr, p.flow.dport)?;
    Ok((Reason::MasqSnat, TC_ACT_OK))
}

/// The key the flow's replies arrive with: from the destination to the node's `port_be`.
#[inline(always)]
fn reply_key(p: &Pkt, snat: u32, port_be: u16) -> CtKey {
    CtKey {
        saddr_be: p.flow.daddr,
        daddr_be: snat,
        sport_be: p.flow.dport,
        dport_be: port_be,
        proto: p.flow.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    }
}

/// A packet arriving on a device that no CT entry knows and no Service frontend takes: a UDP
/// datagram from outside the cluster to a local pod's own address opens an untranslated flow
/// (both entries rewrite nothing), so the pod's answers find it as their reply entry on egress
/// and leave from the pod's address — without it they would look like the pod's own new flow
/// and be masqueraded, and the client would get its answer from an unknown address and port.
/// (TCP needs no entry: an answer is never a SYN. ICMP neither: an echo reply opens nothing.)
#[inline(always)]
pub fn inbound(p: &Pkt) -> Result<Verdict, Reason> {
    let f = &p.flow;
    if config().flags & FP_F_MASQ_BPF == 0
        || f.proto != PROTO_UDP
        || p.later_fragment
        || !masqueraded(f.daddr, f.saddr)
    {
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let orig = CtValue {
        new_saddr_be: f.saddr,
        new_daddr_be: f.daddr,
        new_sport_be: f.sport,
        new_dport_be: f.dport,
        svc_id: 0,
        flags: 0,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let key = f.nat_key();
    let reply_key = key.reversed();
    // Never over a flow of the pod's own with that tuple (it keeps its translation).
    let reply = CtValue {
        new_saddr_be: f.daddr,
        new_daddr_be: f.saddr,
        new_sport_be: f.dport,
        new_dport_be: f.sport,
        flags: CT_F_REPLY,
        ..orig
    };
    match TWL_CT_V2.insert(&reply_key, &reply, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if i64::from(e) == EEXIST => return Ok((Reason::NotService, TC_ACT_OK)),
        Err(_) => return Err(Reason::CtMapFull),
    }
    if TWL_CT_V2.insert(&key, &orig, 0).is_err() {
        let _ = TWL_CT_V2.remove(&reply_key);
        return Err(Reason::CtMapFull);
    }
    Ok((Reason::MasqInbound, TC_ACT_OK))
}
