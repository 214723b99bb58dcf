//! Per-packet north-south load balancing on the node's devices (tc/tcx ingress and egress):
//! NodePort, External IPs and LoadBalancer ingress IPs for clients outside the node.
//!
//! ```text
//!  ingress: CT hit ─► rewrite (later packets of a flow; replies of SNATed flows)
//!           miss  ─► SERVICES (EXTERNAL, then ANY; NodePort when dst ∈ NODE_ADDRS)
//!                 ─► loadBalancerSourceRanges (LPM) ─► select backend
//!                 ─► local backend (or eTP=Local): DNAT, client IP kept
//!                    remote backend (eTP=Cluster): DNAT + SNAT to the node address that routes
//!                    to the backend, so replies come back through this node
//!                 ─► two CT entries (original and reply direction)
//!  egress:  CT hit ─► rewrite (replies of local backends leaving towards the client)
//! ```
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
    AFFINITY_CLIENT_IP, BE_F_LOCAL, Backend, CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CtKey, CtValue,
    PROTO_TCP, PROTO_UDP, Reason, SCOPE_EXTERNAL, SVC_F_EXTERNAL_IP, SVC_F_LOADBALANCER,
    SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceValue, SrcRangeKey,
};

use crate::{
    lb::{is_node_addr, lookup_service, select_backend},
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
}

impl Pkt {
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
    Ok(Some(Pkt {
        l4_off,
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

#[inline(always)]
fn ct_hit(ctx: &TcContext, p: &Pkt) -> Option<Result<Verdict, Reason>> {
    let key = p.key();
    let ptr = TWL_CT_V1.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer for the program's duration; a torn timestamp write is
    // harmless (it is informational).
    let ct = unsafe {
        (*ptr).last_seen_ns = bpf_ktime_get_ns();
        *ptr
    };
    let verdict = apply_ct(ctx, p, &ct);
    if p.proto == PROTO_TCP && is_rst(ctx, p) {
        // A reset ends the flow at once: forget both directions so the map does not fill with
        // dead flows and a reused client port is balanced afresh. (FIN-closed flows age out of
        // the LRU instead: their last ACK still needs the entry.)
        let _ = TWL_CT_V1.remove(key);
        let _ = TWL_CT_V1.remove(counterpart(&ct, p.proto));
    }
    Some(verdict)
}

#[inline(always)]
fn is_rst(ctx: &TcContext, p: &Pkt) -> bool {
    const TCP_RST: u8 = 0x04;
    ctx.load::<u8>(p.l4_off + 13)
        .is_ok_and(|f| f & TCP_RST != 0)
}

/// The CT key of the other direction of the flow `ct` translates: the packet `ct` produces,
/// answered. (Both directions' entries map to each other this way.)
#[inline(always)]
fn counterpart(ct: &CtValue, proto: u8) -> CtKey {
    CtKey {
        saddr_be: ct.new_daddr_be,
        daddr_be: ct.new_saddr_be,
        sport_be: ct.new_dport_be,
        dport_be: ct.new_sport_be,
        proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    }
}

fn try_egress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let Some(p) = parse(ctx)? else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    ct_hit(ctx, &p).unwrap_or(Ok((Reason::NotService, TC_ACT_OK)))
}

fn try_ingress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let Some(p) = parse(ctx)? else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    if let Some(verdict) = ct_hit(ctx, &p) {
        return verdict;
    }
    let Some(svc) = lookup_service(p.daddr, p.dport, p.proto, SCOPE_EXTERNAL, is_node_addr) else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    if svc.flags & EXTERNAL_KINDS == 0 {
        return Ok((Reason::NotService, TC_ACT_OK));
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
    // Per-packet affinity is per client IP, as in kube-proxy.
    let (be, reason) = select_backend(&svc, AFFINITY_CLIENT_IP | u64::from(p.saddr))?;
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
        _pad: 0,
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
    // Reply entry first: a reply can never find its flow missing.
    TWL_CT_V1
        .insert(reply_key, reply, 0)
        .map_err(|_| Reason::CtMapFull)?;
    TWL_CT_V1
        .insert(p.key(), orig, 0)
        .map_err(|_| Reason::CtMapFull)?;
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
        _pad: 0,
        last_seen_ns: now,
    };
    // The client's port first; another random port when that reply tuple is taken (BPF_NOEXIST
    // makes the claim atomic against other CPUs).
    let mut tries = 0;
    loop {
        if TWL_CT_V1
            .insert(reply_key, reply, u64::from(aya_ebpf::bindings::BPF_NOEXIST))
            .is_ok()
        {
            break;
        }
        tries += 1;
        if tries >= SNAT_PORT_TRIES {
            return Err(Reason::CtMapFull);
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
        _pad: 0,
        last_seen_ns: now,
    };
    TWL_CT_V1
        .insert(p.key(), orig, 0)
        .map_err(|_| Reason::CtMapFull)?;
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
