//! Per-packet north-south load balancing on the node's devices (tc/tcx ingress and egress):
//! NodePort, External IPs and LoadBalancer ingress IPs for clients outside the node.
//!
//! ```text
//!  ingress: CT hit ─► state (both entries) ─► rewrite (later packets; replies of SNATed flows)
//!           miss  ─► SERVICES (EXTERNAL, then ANY; NodePort when dst ∈ NODE_ADDRS)
//!                 ─► TCP without SYN: pass to the stack untouched (CtNonSynMiss)
//!                 ─► loadBalancerSourceRanges (LPM) ─► select backend by the tuple's hash
//!                 ─► local backend (or eTP=Local): DNAT, client IP kept
//!                    remote backend (eTP=Cluster): DNAT + SNAT to the node address that routes
//!                    to the backend, so replies come back through this node
//!                 ─► two CT entries (original and reply direction), state NEW
//!  egress:  CT hit ─► state ─► rewrite (replies of local backends leaving towards the client)
//! ```
//!
//! Connection tracking: only a SYN (or a UDP datagram) opens a flow; a tracked flow keeps its
//! backend for its whole life, also after the backend left the Service (it drains, as with
//! kube-proxy). State (`CT_STATE_*`) moves NEW → ESTABLISHED on the first packet from the other
//! side and → CLOSING once both sides sent a FIN; a reset removes the flow at once. Entries
//! expire `ct_lifetime_ns(proto, state)` after their last packet and are collected by the agent
//! (`twill_agent::ctgc`); a SYN meeting a CLOSING or expired flow's tuple opens a new flow.
//!
//! Packets from inside the node never need this: the socket hooks translated them before they
//! existed. Non-first IPv4 fragments and non-TCP/UDP packets pass untouched.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh,
    },
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    AFFINITY_CLIENT_IP, BE_F_LOCAL, Backend, CT_F_REPLY, CT_F_SNAT, CT_FIN_ORIG, CT_FIN_REPLY,
    CT_SCOPE_NAT, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtKey, CtValue, PROTO_TCP,
    PROTO_UDP, Reason, SCOPE_EXTERNAL, SVC_F_EXTERNAL_IP, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceValue, SrcRangeKey, ct_lifetime_ns,
};

use crate::{
    lb::{flow_hash, is_node_addr, lookup_service, select_backend_by},
    maps::{TWL_CT_V1, TWL_LBSRC_V1, count},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const AF_INET: u8 = 2;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;
/// Source ports tried for SNAT when the client's own port is taken towards that backend.
const SNAT_PORT_TRIES: u32 = 8;
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_RANGE: u32 = 28_232;
/// Frontend kinds served to traffic from outside the node (a ClusterIP is not).
const EXTERNAL_KINDS: u16 = SVC_F_NODEPORT | SVC_F_EXTERNAL_IP | SVC_F_LOADBALANCER;
/// TCP header flag bits (byte 13).
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `-EEXIST`: a `BPF_NOEXIST` insert met an existing key.
const EEXIST: i32 = 17;

#[classifier]
pub fn twill_tc_ingress(ctx: TcContext) -> i32 {
    exit(try_ingress(&ctx))
}

#[classifier]
pub fn twill_tc_egress(ctx: TcContext) -> i32 {
    exit(try_egress(&ctx))
}

/// A verdict and the tc action carrying it out (pass on, or redirect).
type Verdict = (Reason, i32);

/// The single exit: counts the verdict; errors drop the packet.
#[inline(always)]
fn exit(verdict: Result<Verdict, Reason>) -> i32 {
    match verdict {
        Ok((reason, action)) => {
            count(reason);
            action
        }
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

/// The parts of an IPv4 TCP/UDP packet the datapath reads.
struct Pkt {
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
}

impl Pkt {
    /// A TCP SYN without ACK: the only packet that may open a TCP flow.
    fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    fn key(&self) -> CtKey {
        CtKey {
            saddr_be: self.saddr,
            daddr_be: self.daddr,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        }
    }
}

/// `Ok(None)`: not a packet this datapath translates (not IPv4, not TCP/UDP, a later fragment).
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Option<Pkt>, Reason> {
    let eth_proto: u16 = ctx.load(12).map_err(|_| Reason::Malformed)?;
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Reason::Malformed)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::Malformed);
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Reason::Malformed)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| Reason::Malformed)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return Ok(None);
    }
    let l4_off = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load(l4_off + 13).map_err(|_| Reason::Malformed)?
    } else {
        0
    };
    Ok(Some(Pkt {
        l4_off,
        tcp_flags,
        saddr: ctx.load(IP_SRC_OFF).map_err(|_| Reason::Malformed)?,
        daddr: ctx.load(IP_DST_OFF).map_err(|_| Reason::Malformed)?,
        sport: ctx.load(l4_off).map_err(|_| Reason::Malformed)?,
        dport: ctx.load(l4_off + 2).map_err(|_| Reason::Malformed)?,
        proto,
    }))
}

/// Rewrites addresses and ports, fixing the IP checksum and the TCP/UDP checksum (which covers
/// the addresses through the pseudo-header). A UDP checksum of 0 means "none" and stays 0.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Pkt,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), Reason> {
    let csum_off = if p.proto == PROTO_TCP {
        p.l4_off + 16
    } else {
        p.l4_off + 6
    };
    let l4_csum = if p.proto == PROTO_UDP {
        let c: u16 = ctx.load(csum_off).map_err(|_| Reason::Malformed)?;
        c != 0
    } else {
        true
    };
    let mangled = if p.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let fail = |_| Reason::RewriteFailed;
    for (off, old, new) in [(IP_SRC_OFF, p.saddr, saddr), (IP_DST_OFF, p.daddr, daddr)] {
        if old == new {
            continue;
        }
        if l4_csum {
            ctx.l4_csum_replace(
                csum_off,
                u64::from(old),
                u64::from(new),
                u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
            )
            .map_err(fail)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
            .map_err(fail)?;
        ctx.store(off, &new, 0).map_err(fail)?;
    }
    for (off, old, new) in [(p.l4_off, p.sport, sport), (p.l4_off + 2, p.dport, dport)] {
        if old == new {
            continue;
        }
        if l4_csum {
            ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), mangled | 2)
                .map_err(fail)?;
        }
        ctx.store(off, &new, 0).map_err(fail)?;
    }
    Ok(())
}

/// Applies a CT entry to the packet it matched. SNATed flows carry one of this node's
/// addresses as their source after translation, which the stack would drop as a martian on
/// input, so they are sent straight out through the route's device instead.
#[inline(always)]
fn apply_ct(ctx: &TcContext, p: &Pkt, ct: &CtValue) -> Result<Verdict, Reason> {
    rewrite(
        ctx,
        p,
        ct.new_saddr_be,
        ct.new_sport_be,
        ct.new_daddr_be,
        ct.new_dport_be,
    )?;
    let reason = if ct.flags & CT_F_REPLY != 0 {
        Reason::RevNatApplied
    } else {
        Reason::CtHit
    };
    if ct.flags & CT_F_SNAT != 0 {
        return Ok((
            reason,
            forward(ctx, p.proto, ct.new_saddr_be, ct.new_daddr_be)?,
        ));
    }
    Ok((reason, TC_ACT_OK))
}

/// Routes a translated packet to `daddr` and redirects it to the output device, the kernel
/// resolving the neighbour (`bpf_redirect_neigh`, Linux 5.10+).
#[inline(always)]
fn forward(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32) -> Result<i32, Reason> {
    let (rc, params) = route(ctx, proto, saddr, daddr, 0);
    if rc != 0 {
        return Err(Reason::RewriteFailed);
    }
    // SAFETY: no neighbour parameters: the kernel looks the next hop up itself.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) };
    // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
    Ok(i32::try_from(action).unwrap_or(TC_ACT_SHOT))
}

/// `bpf_fib_lookup` towards `daddr` as the forwarding path routes a packet from `saddr` that
/// arrived on this device. An input lookup on purpose: an output lookup
/// (`BPF_FIB_LOOKUP_OUTPUT`) is bound to the ifindex passed — this device — and so misses
/// routes through any other, such as a backend behind the VXLAN overlay. `extra` may add
/// `BPF_FIB_LOOKUP_SRC` (Linux 6.7+) for the route's preferred source address.
#[inline(always)]
fn route(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32, extra: u32) -> (i64, bpf_fib_lookup) {
    // SAFETY: bpf_fib_lookup is plain old data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: reading the skb's ifindex from our own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: params is a valid, writable struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            FIB_PARAMS_LEN,
            BPF_FIB_LOOKUP_SKIP_NEIGH | extra,
        )
    };
    (rc, params)
}

/// Outcome of looking a packet up in the conntrack table.
enum Ct {
    /// A tracked flow: translated (or dropped) by its entry.
    Hit(Result<Verdict, Reason>),
    /// No entry.
    Miss,
    /// A SYN reusing the tuple of a closed or expired flow, whose entries were removed: to be
    /// balanced as a new flow.
    Reopen,
}

#[inline(always)]
fn ct_lookup(ctx: &TcContext, p: &Pkt) -> Ct {
    let key = p.key();
    let Some(ptr) = TWL_CT_V1.get_ptr_mut(key) else {
        return Ct::Miss;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value pointer for the program's duration; copied out at once.
    let ct = unsafe { *ptr };
    let reply = ct.flags & CT_F_REPLY != 0;
    let other = key.counterpart(&ct);
    if !reply
        && p.is_syn()
        && (ct.state == CT_STATE_CLOSING
            || now.saturating_sub(ct.last_seen_ns) > ct_lifetime_ns(p.proto, ct.state))
    {
        // The client reuses the port of a finished flow (its own TIME_WAIT is over): a new
        // connection, which may belong to another backend now.
        let _ = TWL_CT_V1.remove(key);
        let _ = TWL_CT_V1.remove(other);
        return Ct::Reopen;
    }
    let mut state = ct.state;
    let mut fin = ct.tcp_fin;
    if reply && state == CT_STATE_NEW {
        // The first answer: a TCP SYN-ACK (a reset is handled below) or a UDP reply.
        state = CT_STATE_ESTABLISHED;
    }
    if p.tcp_flags & TCP_FIN != 0 {
        fin |= if reply { CT_FIN_REPLY } else { CT_FIN_ORIG };
        if fin == CT_FIN_ORIG | CT_FIN_REPLY {
            state = CT_STATE_CLOSING;
        }
    }
    // SAFETY: as above; a torn write of these plain fields by two CPUs at once is harmless
    // (both write the same transition).
    unsafe {
        (*ptr).last_seen_ns = now;
        if state != ct.state || fin != ct.tcp_fin {
            (*ptr).state = state;
            (*ptr).tcp_fin = fin;
        }
    }
    if state != ct.state || fin != ct.tcp_fin {
        // Transitions are rare (a few per flow): only then is the other direction's entry
        // written, so both always tell the same state.
        if let Some(o) = TWL_CT_V1.get_ptr_mut(other) {
            // SAFETY: as above.
            unsafe {
                (*o).state = state;
                (*o).tcp_fin = fin;
            }
        }
    }
    let verdict = apply_ct(ctx, p, &ct);
    if p.tcp_flags & TCP_RST != 0 {
        // A reset ends the flow at once: forget both directions so a reused client port is
        // balanced afresh and the table does not hold dead flows.
        let _ = TWL_CT_V1.remove(key);
        let _ = TWL_CT_V1.remove(other);
    }
    Ct::Hit(verdict)
}

fn try_egress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let Some(p) = parse(ctx)? else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    match ct_lookup(ctx, &p) {
        Ct::Hit(verdict) => verdict,
        // New flows are opened on ingress only; a SYN leaving the node is not ours.
        Ct::Miss | Ct::Reopen => Ok((Reason::NotService, TC_ACT_OK)),
    }
}

fn try_ingress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let Some(p) = parse(ctx)? else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    match ct_lookup(ctx, &p) {
        Ct::Hit(verdict) => return verdict,
        Ct::Reopen => count(Reason::CtReopened),
        Ct::Miss => {}
    }
    let Some(svc) = lookup_service(p.daddr, p.dport, p.proto, SCOPE_EXTERNAL, is_node_addr) else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    if svc.flags & EXTERNAL_KINDS == 0 {
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    if p.proto == PROTO_TCP && !p.is_syn() {
        // The middle of a flow we do not track (expired, flushed, or opened before this
        // program ran): a backend picked now would not know the connection and reset it.
        // The stack answers for the frontend instead, as kube-proxy's conntrack does.
        return Ok((Reason::CtNonSynMiss, TC_ACT_OK));
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SrcRangeKey {
                svc_id_be: svc.svc_id.to_be(),
                addr_be: p.saddr,
            },
        );
        if TWL_LBSRC_V1.get(&key).is_none() {
            return Err(Reason::SourceRangeDenied);
        }
    }
    // Per-packet affinity is per client IP, as in kube-proxy. Without it the tuple's hash picks
    // the backend, so a flow whose entry was lost comes back to the same one.
    let (be, reason) = select_backend_by(
        &svc,
        AFFINITY_CLIENT_IP | u64::from(p.saddr),
        flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto),
    )?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if be.flags & BE_F_LOCAL != 0 || svc.flags & SVC_F_LOCAL_ONLY != 0 {
        dnat_local(ctx, &p, &svc, &be, now)?;
        return Ok((reason, TC_ACT_OK));
    }
    dnat_snat(ctx, &p, &svc, &be, now)
}

/// DNAT only: the backend sees the client's address (externalTrafficPolicy=Local keeps it by
/// construction: its SCOPE_EXTERNAL entry lists local backends only).
#[inline(always)]
fn dnat_local(
    ctx: &TcContext,
    p: &Pkt,
    svc: &ServiceValue,
    be: &Backend,
    now: u64,
) -> Result<(), Reason> {
    let orig = CtValue {
        new_saddr_be: p.saddr,
        new_daddr_be: be.addr_be,
        new_sport_be: p.sport,
        new_dport_be: be.port_be,
        svc_id: svc.svc_id,
        flags: 0,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        saddr_be: be.addr_be,
        daddr_be: p.saddr,
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    };
    let reply = CtValue {
        new_saddr_be: p.daddr,
        new_daddr_be: p.saddr,
        new_sport_be: p.dport,
        new_dport_be: p.sport,
        flags: CT_F_REPLY,
        ..orig
    };
    // Reply entry first: a reply can never find its flow missing. The table is a plain hash
    // (no eviction, so a live flow is never pushed out): when it is full the new flow is
    // dropped and its client retries.
    TWL_CT_V1
        .insert(reply_key, reply, 0)
        .map_err(|_| Reason::CtMapFull)?;
    if TWL_CT_V1.insert(p.key(), orig, 0).is_err() {
        let _ = TWL_CT_V1.remove(reply_key);
        return Err(Reason::CtMapFull);
    }
    rewrite(ctx, p, p.saddr, p.sport, be.addr_be, be.port_be)?;
    Ok(())
}

/// Backend on another node (externalTrafficPolicy=Cluster): DNAT and SNAT to this node's address
/// towards the backend, so the reply returns here to be translated back.
#[inline(always)]
fn dnat_snat(
    ctx: &TcContext,
    p: &Pkt,
    svc: &ServiceValue,
    be: &Backend,
    now: u64,
) -> Result<Verdict, Reason> {
    let snat = snat_addr(ctx, p, be.addr_be)?;
    let mut reply_key = CtKey {
        saddr_be: be.addr_be,
        daddr_be: snat,
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    };
    let reply = CtValue {
        new_saddr_be: p.daddr,
        new_daddr_be: p.saddr,
        new_sport_be: p.dport,
        new_dport_be: p.sport,
        svc_id: svc.svc_id,
        flags: CT_F_REPLY | CT_F_SNAT,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    // The client's port first; another random port when that reply tuple is taken (BPF_NOEXIST
    // makes the claim atomic against other CPUs).
    let mut tries = 0;
    loop {
        match TWL_CT_V1.insert(reply_key, reply, u64::from(aya_ebpf::bindings::BPF_NOEXIST)) {
            Ok(()) => break,
            Err(e) if e != -EEXIST => return Err(Reason::CtMapFull),
            Err(_) => {}
        }
        tries += 1;
        if tries >= SNAT_PORT_TRIES {
            return Err(Reason::SnatPortsExhausted);
        }
        // SAFETY: helper without arguments.
        let port = SNAT_PORT_MIN + unsafe { bpf_get_prandom_u32() } % SNAT_PORT_RANGE;
        // Below SNAT_PORT_MIN + SNAT_PORT_RANGE = 61000: always fits.
        reply_key.dport_be = u16::try_from(port).unwrap_or(u16::MAX).to_be();
    }
    let orig = CtValue {
        new_saddr_be: snat,
        new_daddr_be: be.addr_be,
        new_sport_be: reply_key.dport_be,
        new_dport_be: be.port_be,
        svc_id: svc.svc_id,
        flags: CT_F_SNAT,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    if TWL_CT_V1.insert(p.key(), orig, 0).is_err() {
        let _ = TWL_CT_V1.remove(reply_key);
        return Err(Reason::CtMapFull);
    }
    rewrite(ctx, p, snat, reply_key.dport_be, be.addr_be, be.port_be)?;
    Ok((
        Reason::ForwardedRemote,
        forward(ctx, p.proto, snat, be.addr_be)?,
    ))
}

/// The source address for SNAT towards `backend`: the frontend itself when it is a node address
/// (NodePort), else the route's preferred source (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_SRC`,
/// Linux 6.7+).
#[inline(always)]
fn snat_addr(ctx: &TcContext, p: &Pkt, backend: u32) -> Result<u32, Reason> {
    if is_node_addr(p.daddr) {
        return Ok(p.daddr);
    }
    let (rc, params) = route(ctx, p.proto, p.saddr, backend, BPF_FIB_LOOKUP_SRC);
    // SAFETY: union member written by the kernel for AF_INET lookups.
    let src = unsafe { params.__bindgen_anon_3.ipv4_src };
    if rc != 0 || src == 0 {
        return Err(Reason::RewriteFailed);
    }
    Ok(src)
}
