//! Per-packet north-south load balancing on the node's devices (tc/tcx ingress and egress):
//! NodePort, External IPs and LoadBalancer ingress IPs for clients outside the node.
//!
//! ```text
//!  ingress: CT hit ─► state (both entries) ─► rewrite (later packets; replies of SNATed flows)
//!           miss  ─► SERVICES (EXTERNAL, then ANY; NodePort when dst ∈ NODE_ADDRS)
//!                 ─► TCP without SYN: pass to the stack untouched (CtNonSynMiss)
//!                 ─► loadBalancerSourceRanges (LPM) ─► backend by the tuple's hash (Maglev)
//!                 ─► local backend (or eTP=Local): DNAT, client IP kept
//!                    remote backend (eTP=Cluster): DNAT + SNAT to the node address that routes
//!                    to the backend and a port of the reserved range (61000–65535, shared with
//!                    the masquerade), so replies come back through this node
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
//! ICMP errors about a translated flow (fragmentation needed, unreachable, time exceeded) are
//! translated back, outer and quoted header both, so path-MTU discovery works through NodePort.
//!
//! A fragmented datagram's later fragments (no TCP/UDP header) follow its first one: the first
//! records its ports in `TWL_FRAG_V1` under the datagram's identity, the others find the flow
//! with them and get the same address translation.
//!
//! Packets from inside the node never need Service translation: the socket hooks translated
//! them before they existed. On egress, a local pod's flow leaving the cluster is masqueraded
//! (`masq.rs`) with entries of the same table, so its later packets, replies and ICMP errors
//! take the paths above. Other protocols pass untouched.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    AFFINITY_CLIENT_IP, BE_F_LOCAL, Backend, CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CT_STATE_CLOSING,
    CT_STATE_NEW, CtKey, CtValue, FragKey, FragValue, MASQ_PORT_MAX, MASQ_PORT_MIN, PROTO_TCP,
    PROTO_UDP, Reason, SCOPE_EXTERNAL, SVC_F_EXTERNAL_IP, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceValue, SrcRangeKey, csum_diff16, csum_diff32,
    ct_lifetime_ns, ct_next_state, flow_hash,
};

use crate::{
    lb::{Pick, is_node_addr, lookup_service, select_backend_by},
    maps::{TWL_CT_V2, TWL_FRAG_V1, TWL_LBSRC_V1, count},
    natport::{self, Ct4},
    pkt::{
        Flow, ICMP_CSUM, ICMP_ECHO_ID, IP_CSUM_AT, IP_DST_AT, IP_SRC_AT, L4, L4_DPORT, L4_SPORT,
        PROTO_ICMP, Ports, QUOTE_CSUM, QUOTE_DST, QUOTE_SRC, Quote, TCP_CSUM, TCP_RST, UDP_CSUM,
        parse,
    },
};

const AF_INET: u8 = 2;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;
/// SNAT draws from the masquerade's port range: the one range the agent reserves in
/// `ip_local_reserved_ports` (and keeps out of `ip_local_port_range`), so the kernel never gives
/// a node socket one of its ports — also not to a process connecting later to the same backend
/// address and port, whose SYN would otherwise meet the SNATed flow's reply tuple. Both
/// features share it through the one conntrack table, whose `BPF_NOEXIST` insert of the reply
/// tuple keeps a port unique per (node address, peer address and port, protocol).
pub const SNAT_PORT_MIN: u32 = MASQ_PORT_MIN as u32;
pub const SNAT_PORT_SPAN: u32 = MASQ_PORT_MAX as u32 - SNAT_PORT_MIN + 1;
/// Frontend kinds served to traffic from outside the node (a ClusterIP is not).
pub const EXTERNAL_KINDS: u16 = SVC_F_NODEPORT | SVC_F_EXTERNAL_IP | SVC_F_LOADBALANCER;
/// A `TWL_LBSRC_V1` lookup matches its whole key: the Service id and the client's address.
const LB_SRC_KEY_BITS: u32 = 64;

// Each entry point only dispatches by family: the IPv4 and IPv6 paths are functions of their
// own (BPF-to-BPF calls, not inlined), because a BPF call chain has 512 bytes of stack in all
// and each family's path needs most of it, so they must not share one frame.
#[classifier]
pub fn twill_tc_ingress(ctx: TcContext) -> i32 {
    if crate::nat6::is_ipv6(&ctx) {
        // IPv6 has its own translator (`nat6`). Left to the stack, a local pod's packets are
        // delivered straight into it (`fwd6`, a call of its own after the translator's).
        return match ipv6_ingress(ctx.skb.skb) {
            TC_ACT_OK => crate::fwd6::to_local_pod(ctx.skb.skb),
            action => action,
        };
    }
    ipv4_ingress(ctx.skb.skb)
}

#[classifier]
pub fn twill_tc_egress(ctx: TcContext) -> i32 {
    if crate::nat6::is_ipv6(&ctx) {
        return ipv6_egress(ctx.skb.skb);
    }
    ipv4_egress(ctx.skb.skb)
}

#[inline(never)]
fn ipv4_ingress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    match exit(try_ingress(&ctx)) {
        // Left to the stack (untranslated, or translated in place): a local pod's packets are
        // delivered straight into it (replies, NodePort to a local backend, other nodes' pods).
        TC_ACT_OK => crate::fwd::to_local_pod(&ctx),
        action => action,
    }
}

#[inline(never)]
fn ipv4_egress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    exit(try_egress(&TcContext::new(skb)))
}

#[inline(never)]
fn ipv6_egress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    exit(crate::nat6::egress(&TcContext::new(skb)))
}

#[inline(never)]
fn ipv6_ingress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    exit(crate::nat6::ingress(&TcContext::new(skb)))
}

/// A verdict and the tc action carrying it out (pass on, or redirect).
pub type Verdict = (Reason, i32);

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

/// A TCP/UDP packet as the translator reads it: its flow and where to rewrite it.
pub struct Pkt {
    pub flow: Flow,
    l4_off: usize,
    /// UDP: the datagram carries a checksum (0 means none and stays 0).
    udp_csum: bool,
    /// A fragment after the first: no TCP/UDP header (the ports come from `TWL_FRAG_V1`), so
    /// only the addresses are rewritten and it never opens a flow.
    pub later_fragment: bool,
    /// ICMP only: an echo request (its identifier is the flow's source port) rather than a
    /// reply (the identifier is the destination port, see `pkt.rs`).
    pub echo_request: bool,
}

/// What a packet is to this datapath.
enum Parsed {
    /// A TCP/UDP packet or an ICMP echo request or reply (or a fragment of one whose first
    /// fragment was seen).
    Flow(Pkt),
    /// An ICMP error quoting a TCP/UDP packet: translated like the flow it is about.
    IcmpError(IcmpErr),
    /// Not IPv4, another protocol, a later fragment of no known datagram, an ICMP message of
    /// no flow.
    Other,
}

/// An ICMP error (destination unreachable — fragmentation needed among them — or time
/// exceeded) and the header of the packet it quotes.
struct IcmpErr {
    saddr: u32,
    daddr: u32,
    icmp_off: usize,
    quote: Quote,
}

/// The packet through the one parser (`pkt::parse`), narrowed to what this datapath serves.
#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Parsed, Reason> {
    let Some(p) = parse(ctx)? else {
        return Ok(Parsed::Other);
    };
    // ICMP echo is a flow too (the eBPF masquerade translates pods' pings: the identifier
    // plays the port); any other ICMP message is an error about a flow or nothing to us.
    let echo = p.proto == PROTO_ICMP && matches!(p.l4, L4::Echo { .. } | L4::LaterFragment);
    if p.proto != PROTO_TCP && p.proto != PROTO_UDP && !echo {
        return Ok(match p.l4 {
            L4::IcmpError(quote) if quote.translatable() => Parsed::IcmpError(IcmpErr {
                saddr: p.saddr,
                daddr: p.daddr,
                icmp_off: p.l4_off,
                quote,
            }),
            _ => Parsed::Other,
        });
    }
    let frag_key = FragKey {
        saddr_be: p.saddr,
        daddr_be: p.daddr,
        id_be: p.id_be,
        proto: p.proto,
        _pad: 0,
    };
    let ports = match p.l4 {
        L4::Ports(ports) => Some(ports),
        // Echo: the identifier is the source port of a request and the destination port of a
        // reply, as the one parser's `Flow::of` has it.
        L4::Echo { request, id_be } => Some(Ports {
            sport: if request { id_be } else { 0 },
            dport: if request { 0 } else { id_be },
            tcp_flags: 0,
            udp_csum: false,
        }),
        _ => None,
    };
    let (sport, dport, tcp_flags, udp_csum, later_fragment) = if let Some(ports) = ports {
        if p.first_fragment() {
            // The first fragment of a datagram: remember its ports for the others. Recorded
            // for every datagram, translated or not; fragmentation is rare enough that this
            // costs nothing worth a second lookup.
            let seen = FragValue {
                sport_be: ports.sport,
                dport_be: ports.dport,
            };
            let _ = TWL_FRAG_V1.insert(frag_key, seen, 0);
        }
        (
            ports.sport,
            ports.dport,
            ports.tcp_flags,
            ports.udp_csum,
            false,
        )
    } else {
        // A later fragment: it belongs to the flow of its datagram's first fragment, if that
        // one was seen (fragments may arrive out of order; those then pass untouched).
        // SAFETY: the value is copied out at once.
        let Some(seen) = (unsafe { TWL_FRAG_V1.get(frag_key) }).copied() else {
            return Ok(Parsed::Other);
        };
        (seen.sport_be, seen.dport_be, 0, false, true)
    };
    Ok(Parsed::Flow(Pkt {
        flow: Flow {
            saddr: p.saddr,
            daddr: p.daddr,
            sport,
            dport,
            proto: p.proto,
            tcp_flags,
            related: false,
        },
        l4_off: p.l4_off,
        udp_csum,
        later_fragment,
        echo_request: matches!(p.l4, L4::Echo { request: true, .. }),
    }))
}

/// Translates an ICMP error about a translated flow back to what the other side of the
/// translation sent, so path-MTU discovery (fragmentation needed) and unreachable errors reach
/// the endpoint whose packet caused them: a router's "fragmentation needed" for a backend's
/// reply to an external client goes to the backend, about the packet as the backend sent it; a
/// backend's "port unreachable" goes to the client, about the datagram as the client sent it.
///
/// The quoted packet went the opposite way of the error, already translated; the entry of the
/// reversed quoted tuple is the one of the flow's other direction, and the quote becomes the
/// reverse of that entry's rewrite (what the sender of the quoted packet had sent). The error
/// goes to the new quote's source; when it came from the quote's destination host itself, it
/// now comes from the new quote's destination.
#[inline(always)]
fn icmp_error(ctx: &TcContext, e: &IcmpErr, ingress: bool) -> Result<Verdict, Reason> {
    let q = &e.quote;
    let key = CtKey {
        saddr_be: q.saddr,
        daddr_be: q.daddr,
        sport_be: q.sport,
        dport_be: q.dport,
        proto: q.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    }
    .reversed();
    // SAFETY: the value is copied out at once.
    let Some(ct) = (unsafe { TWL_CT_V2.get(key) }).copied() else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    let fail = |_| Reason::RewriteFailed;
    let icmp_csum = e.icmp_off + ICMP_CSUM;
    // Quoted addresses: the quoted header's own checksum absorbs the change, so the bytes the
    // ICMP checksum covers sum to the same value and it needs no update for them.
    for (off, old, new) in [
        (q.off + QUOTE_SRC, q.saddr, ct.new_daddr_be),
        (q.off + QUOTE_DST, q.daddr, ct.new_saddr_be),
    ] {
        if old != new {
            ctx.l3_csum_replace(q.off + QUOTE_CSUM, u64::from(old), u64::from(new), 4)
                .map_err(fail)?;
            ctx.store(off, &new, 0).map_err(fail)?;
        }
    }
    // Quoted ports: covered by the ICMP checksum (no pseudo-header). The quoted L4 checksum is
    // left alone: it covers bytes the quote does not hold, and no receiver checks it. A quoted
    // ping has one "port", its identifier (the reply entry's destination port is the original).
    let ports = if q.proto == PROTO_ICMP {
        [
            (q.l4_off + ICMP_ECHO_ID, q.sport, ct.new_dport_be),
            (0, 0, 0),
        ]
    } else {
        [
            (q.l4_off + L4_SPORT, q.sport, ct.new_dport_be),
            (q.l4_off + L4_DPORT, q.dport, ct.new_sport_be),
        ]
    };
    for (off, old, new) in ports {
        if old != new {
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 2)
                .map_err(fail)?;
            ctx.store(off, &new, 0).map_err(fail)?;
        }
    }
    let new_daddr = ct.new_daddr_be;
    let new_saddr = if e.saddr == q.daddr {
        ct.new_saddr_be
    } else {
        e.saddr
    };
    for (off, old, new) in [
        (IP_SRC_AT, e.saddr, new_saddr),
        (IP_DST_AT, e.daddr, new_daddr),
    ] {
        if old != new {
            ctx.l3_csum_replace(IP_CSUM_AT, u64::from(old), u64::from(new), 4)
                .map_err(fail)?;
            ctx.store(off, &new, 0).map_err(fail)?;
        }
    }
    if ingress && ct.flags & CT_F_SNAT != 0 {
        // As in `apply_ct`: the error may now come from a node address or go to another node.
        return Ok((
            Reason::IcmpErrorTranslated,
            forward(ctx, PROTO_ICMP, new_saddr, new_daddr)?,
        ));
    }
    Ok((Reason::IcmpErrorTranslated, TC_ACT_OK))
}

/// Rewrites addresses and ports, fixing the IP checksum and the TCP/UDP checksum (which covers
/// the addresses through the pseudo-header). A UDP checksum of 0 means "none" and stays 0. An
/// ICMP echo's "port" is its identifier, under the ICMP checksum (no pseudo-header).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    p: &Pkt,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), Reason> {
    let f = &p.flow;
    if f.proto == PROTO_ICMP {
        return rewrite_echo(ctx, p, saddr, sport, daddr, dport);
    }
    let csum_off = p.l4_off
        + if f.proto == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    // A later fragment has no TCP/UDP header: only its IP header changes (the first fragment's
    // L4 checksum update covers the whole datagram).
    let l4_csum = !p.later_fragment && (f.proto == PROTO_TCP || p.udp_csum);
    let mangled = if f.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let fail = |_| Reason::RewriteFailed;
    // What the rewrite adds to the checksums, summed over the changed fields, so each checksum
    // takes one helper call ("by difference", field size 0) however many fields change. The
    // addresses are under the IP checksum and, through the pseudo-header, the TCP/UDP one; the
    // ports only under the latter, and apart: with CHECKSUM_PARTIAL (a local sender's segment
    // on a veth) the checksum field holds the pseudo-header's sum alone, which a port is not in.
    let mut addr_diff = 0;
    for (old, new) in [(f.saddr, saddr), (f.daddr, daddr)] {
        if old != new {
            addr_diff += csum_diff32(old, new);
        }
    }
    let mut port_diff = 0;
    if !p.later_fragment {
        for (old, new) in [(f.sport, sport), (f.dport, dport)] {
            if old != new {
                port_diff += csum_diff16(old, new);
            }
        }
    }
    if addr_diff == 0 && port_diff == 0 {
        // An untranslated flow's entry (see `masq::inbound`): nothing to write.
        return Ok(());
    }
    // A difference of 0 leaves a checksum as it is: no branch per field, which keeps the
    // verifier's paths through the many callers of this function few.
    if l4_csum {
        ctx.l4_csum_replace(
            csum_off,
            0,
            u64::from(addr_diff),
            u64::from(BPF_F_PSEUDO_HDR) | mangled,
        )
        .map_err(fail)?;
        ctx.l4_csum_replace(csum_off, 0, u64::from(port_diff), mangled)
            .map_err(fail)?;
    }
    ctx.l3_csum_replace(IP_CSUM_AT, 0, u64::from(addr_diff), 0)
        .map_err(fail)?;
    let mut span = [0u8; 12];
    span[0..4].copy_from_slice(&saddr.to_ne_bytes());
    span[4..8].copy_from_slice(&daddr.to_ne_bytes());
    span[8..10].copy_from_slice(&sport.to_ne_bytes());
    span[10..12].copy_from_slice(&dport.to_ne_bytes());
    if p.l4_off == IP_SRC_AT + 8 && !p.later_fragment {
        // No IP options: addresses and ports are one span, written in one store.
        return ctx.store(IP_SRC_AT, &span, 0).map_err(fail);
    }
    let addrs: [u8; 8] = [
        span[0], span[1], span[2], span[3], span[4], span[5], span[6], span[7],
    ];
    ctx.store(IP_SRC_AT, &addrs, 0).map_err(fail)?;
    if !p.later_fragment {
        let ports: [u8; 4] = [span[8], span[9], span[10], span[11]];
        ctx.store(p.l4_off + L4_SPORT, &ports, 0).map_err(fail)?;
    }
    Ok(())
}

/// [`rewrite`] of an ICMP echo request or reply: the addresses (the IP checksum only) and the
/// identifier, which is the flow's source port in a request and its destination port in a
/// reply (the other "port" is always 0 on both sides of the translation).
#[inline(always)]
fn rewrite_echo(
    ctx: &TcContext,
    p: &Pkt,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), Reason> {
    let f = &p.flow;
    let fail = |_| Reason::RewriteFailed;
    for (off, old, new) in [(IP_SRC_AT, f.saddr, saddr), (IP_DST_AT, f.daddr, daddr)] {
        if old != new {
            ctx.l3_csum_replace(IP_CSUM_AT, u64::from(old), u64::from(new), 4)
                .map_err(fail)?;
            ctx.store(off, &new, 0).map_err(fail)?;
        }
    }
    let (old, new) = if p.echo_request {
        (f.sport, sport)
    } else {
        (f.dport, dport)
    };
    if old != new && !p.later_fragment {
        ctx.l4_csum_replace(p.l4_off + ICMP_CSUM, u64::from(old), u64::from(new), 2)
            .map_err(fail)?;
        ctx.store(p.l4_off + ICMP_ECHO_ID, &new, 0).map_err(fail)?;
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
            forward(ctx, p.flow.proto, ct.new_saddr_be, ct.new_daddr_be)?,
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
pub fn route(
    ctx: &TcContext,
    proto: u8,
    saddr: u32,
    daddr: u32,
    extra: u32,
) -> (i64, bpf_fib_lookup) {
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
    let f = &p.flow;
    let key = f.nat_key();
    let Some(ptr) = TWL_CT_V2.get_ptr_mut(key) else {
        return Ct::Miss;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value pointer for the program's duration; copied out at once.
    let ct = unsafe { *ptr };
    let reply = ct.flags & CT_F_REPLY != 0;
    let other = key.counterpart(&ct);
    if !reply
        && f.is_syn()
        && (ct.state == CT_STATE_CLOSING
            || now.saturating_sub(ct.last_seen_ns) > ct_lifetime_ns(f.proto, ct.state))
    {
        // The client reuses the port of a finished flow (its own TIME_WAIT is over): a new
        // connection, which may belong to another backend now.
        let _ = TWL_CT_V2.remove(key);
        let _ = TWL_CT_V2.remove(other);
        return Ct::Reopen;
    }
    // The first answer establishes (a reset is handled below); two FINs close.
    let (state, fin) = ct_next_state(ct.state, ct.tcp_fin, reply, f.tcp_flags);
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
        if let Some(o) = TWL_CT_V2.get_ptr_mut(other) {
            // SAFETY: as above.
            unsafe {
                (*o).state = state;
                (*o).tcp_fin = fin;
            }
        }
    }
    let verdict = apply_ct(ctx, p, &ct);
    if f.tcp_flags & TCP_RST != 0 {
        // A reset ends the flow at once: forget both directions so a reused client port is
        // balanced afresh and the table does not hold dead flows.
        let _ = TWL_CT_V2.remove(key);
        let _ = TWL_CT_V2.remove(other);
    }
    Ct::Hit(verdict)
}

fn try_egress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let p = match classify(ctx)? {
        Parsed::Flow(p) => p,
        Parsed::IcmpError(e) => return icmp_error(ctx, &e, false),
        Parsed::Other => return Ok((Reason::NotService, TC_ACT_OK)),
    };
    match ct_lookup(ctx, &p) {
        Ct::Hit(verdict) => verdict,
        // Service flows are opened on ingress; a local pod's flow leaving the cluster is
        // masqueraded here (when the masquerade is eBPF's).
        Ct::Miss | Ct::Reopen => crate::masq::open(ctx, &p),
    }
}

fn try_ingress(ctx: &TcContext) -> Result<Verdict, Reason> {
    let p = match classify(ctx)? {
        Parsed::Flow(p) => p,
        Parsed::IcmpError(e) => return icmp_error(ctx, &e, true),
        Parsed::Other => return Ok((Reason::NotService, TC_ACT_OK)),
    };
    match ct_lookup(ctx, &p) {
        Ct::Hit(verdict) => return verdict,
        Ct::Reopen => count(Reason::CtReopened),
        Ct::Miss => {}
    }
    let f = &p.flow;
    if f.proto == PROTO_ICMP {
        // Echo: only the masquerade's flows (found above); Services serve TCP and UDP.
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    let Some(svc) = lookup_service(f.daddr, f.dport, f.proto, SCOPE_EXTERNAL, is_node_addr)
        .filter(|svc| svc.flags & EXTERNAL_KINDS != 0)
    else {
        // Not for a Service: perhaps a flow from outside to a pod's own address.
        return crate::masq::inbound(&p);
    };
    if p.later_fragment {
        // Its first fragment opened no flow (it was not for a Service, or was dropped).
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    if f.proto == PROTO_TCP && !f.is_syn() {
        // The middle of a flow we do not track (expired, flushed, or opened before this
        // program ran): a backend picked now would not know the connection and reset it.
        // The stack answers for the frontend instead, as kube-proxy's conntrack does.
        return Ok((Reason::CtNonSynMiss, TC_ACT_OK));
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        let key = Key::new(
            LB_SRC_KEY_BITS,
            SrcRangeKey {
                svc_id_be: svc.svc_id.to_be(),
                addr_be: f.saddr,
            },
        );
        if TWL_LBSRC_V1.get(&key).is_none() {
            return Err(Reason::SourceRangeDenied);
        }
    }
    // Per-packet affinity is per client IP, as in kube-proxy. Without it the tuple's hash picks
    // the backend in the set's Maglev table, so a flow whose entry was lost comes back to the
    // same one, and only flows of a backend that left move.
    let (be, reason) = select_backend_by::<crate::lb::V4>(
        &svc,
        AFFINITY_CLIENT_IP | u64::from(f.saddr),
        Pick::Flow(flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto)),
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
    let f = &p.flow;
    let key = f.nat_key();
    let orig = CtValue {
        new_saddr_be: f.saddr,
        new_daddr_be: be.addr_be,
        new_sport_be: f.sport,
        new_dport_be: be.port_be,
        svc_id: svc.svc_id,
        flags: 0,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let reply_key = key.counterpart(&orig);
    let reply = CtValue {
        new_saddr_be: f.daddr,
        new_daddr_be: f.saddr,
        new_sport_be: f.dport,
        new_dport_be: f.sport,
        flags: CT_F_REPLY,
        ..orig
    };
    // Reply entry first: a reply can never find its flow missing. The table is a plain hash
    // (no eviction, so a live flow is never pushed out): when it is full the new flow is
    // dropped and its client retries.
    TWL_CT_V2
        .insert(reply_key, reply, 0)
        .map_err(|_| Reason::CtMapFull)?;
    natport::open::<Ct4>(&key, &orig, &reply_key)?;
    rewrite(ctx, p, f.saddr, f.sport, be.addr_be, be.port_be)?;
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
    let f = &p.flow;
    let key = f.nat_key();
    let snat = snat_addr(ctx, f, be.addr_be)?;
    // The client's port first when it lies in the range (nothing to rewrite).
    let client_port = u32::from(u16::from_be(f.sport));
    let preferred = (SNAT_PORT_MIN..SNAT_PORT_MIN + SNAT_PORT_SPAN)
        .contains(&client_port)
        .then(|| client_port - SNAT_PORT_MIN);
    let mut orig = CtValue {
        new_saddr_be: snat,
        new_daddr_be: be.addr_be,
        new_sport_be: f.sport,
        new_dport_be: be.port_be,
        svc_id: svc.svc_id,
        flags: CT_F_SNAT,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let reply = CtValue {
        new_saddr_be: f.daddr,
        new_daddr_be: f.saddr,
        new_sport_be: f.dport,
        new_dport_be: f.sport,
        svc_id: svc.svc_id,
        flags: CT_F_REPLY | CT_F_SNAT,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    // The reply tuple (backend → node address:port) claims the port: see `natport`.
    let mut reply_key = key.counterpart(&orig);
    let Some(port_be) = natport::claim::<Ct4>(
        ctx,
        &mut reply_key,
        &reply,
        preferred,
        (SNAT_PORT_MIN, SNAT_PORT_SPAN),
        now,
    )?
    else {
        return Err(Reason::SnatPortsExhausted);
    };
    orig.new_sport_be = port_be;
    natport::open::<Ct4>(&key, &orig, &reply_key)?;
    rewrite(ctx, p, snat, orig.new_sport_be, be.addr_be, be.port_be)?;
    Ok((
        Reason::ForwardedRemote,
        forward(ctx, f.proto, snat, be.addr_be)?,
    ))
}

/// The source address for SNAT towards `backend`: the frontend itself when it is a node address
/// (NodePort), else the route's preferred source (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_SRC`,
/// Linux 6.7+).
#[inline(always)]
fn snat_addr(ctx: &TcContext, f: &Flow, backend: u32) -> Result<u32, Reason> {
    if is_node_addr(f.daddr) {
        return Ok(f.daddr);
    }
    let (rc, params) = route(ctx, f.proto, f.saddr, backend, BPF_FIB_LOOKUP_SRC);
    // SAFETY: union member written by the kernel for AF_INET lookups.
    let src = unsafe { params.__bindgen_anon_3.ipv4_src };
    if rc != 0 || src == 0 {
        return Err(Reason::RewriteFailed);
    }
    Ok(src)
}
