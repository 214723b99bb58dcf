//! IPv6 on the devices' tc programs: the eBPF masquerade of IPv6 pods, the IPv6 twin of
//! `masq.rs` with its entries in the IPv6 conntrack table (`TWL_CT6_V1`, same state machine,
//! same collector).
//!
//! ```text
//!  egress (twill_tc_egress), an IPv6 frame:
//!    TCP/UDP, CT6 hit ─► state ─► rewrite (later packets of a masqueraded flow)
//!             miss    ─► source ∈ this node's IPv6 pod CIDRs, destination not exempt (MASQ6)?
//!                        TCP without SYN ─► untouched (MasqNotOpened)
//!                        source: the route's preferred source (bpf_fib_lookup, BPF_FIB_LOOKUP_SRC)
//!                        port: the masquerade range (reserved by the agent), random start,
//!                              skipping ports a node socket would receive the reply on and
//!                              reply tuples already taken (BPF_NOEXIST)
//!                        CT6: reply entry first, then the original ─► rewrite (Masq6Snat)
//!    ICMPv6 error quoting a tracked flow ─► translated back (a local pod's error about a reply)
//!    first fragment: a flow as any (its ports recorded in FRAG6); later fragment: its first
//!      fragment's flow (FRAG6 → CT6, addresses rewritten), else dropped when it would leave
//!      masqueraded (Masq6Fragment)
//!  ingress (twill_tc_ingress):
//!    TCP/UDP, CT6 hit ─► rewrite (replies: node:port ⇒ pod) ─► the stack routes it to the pod
//!                        (a north-south flow SNATed to a node address: redirected out, `ns6`)
//!             miss    ─► IPv6 NodePort / External IP / LoadBalancer IP (`ns6::open`)
//!    ICMPv6 error quoting a tracked flow (Packet Too Big, unreachable, time exceeded) ─►
//!      outer destination and quoted source back to the pod, checksums fixed
//!  everything else (Neighbour Discovery, MLD, echo, other protocols) ─► untouched
//! ```
//!
//! IPv6 has no header checksum; the TCP/UDP and ICMPv6 checksums cover the addresses through
//! the pseudo-header (RFC 8200 8.1), so every address change is one 16-byte `bpf_csum_diff`
//! folded into the transport checksum. Neighbour Discovery and MLD are ICMPv6 messages that are
//! neither TCP/UDP nor errors: never touched, on any device.
//!
//! Extension headers: the transport header is found behind hop-by-hop, destination options,
//! routing (segments left 0) and authentication headers by the walk `policy6` shares
//! (`pkt6::walk`), and translated at its offset (the checksum covers the transport header and
//! the pseudo-header, never the extension headers between them; an AH-protected flow is
//! translated too, and its receiver's integrity check fails as after any NAT, RFC 3715). A
//! packet the walk finds no transport header in (a routing header with segments left, a chain
//! longer than the walk follows) is left untouched (`Ipv6ExtHeaders`), as is an ICMPv6 message
//! behind extension headers.
//!
//! Fragments: a first fragment carries the transport header and is translated as any packet
//! of its flow; its ports are recorded under the datagram's identity (source, destination,
//! 32-bit identification, protocol) in `TWL_FRAG6_V1`, so the later fragments find the flow
//! and have their addresses rewritten as the first's were (the transport checksum, in the first
//! fragment, took the whole change), as IPv4's `TWL_FRAG_V1` does. A later fragment whose
//! first was not seen (out of order, or the datagram's first fragment went elsewhere) opens
//! nothing: left to the stack on ingress (`Ipv6Fragment`), dropped on egress when it would
//! leave masqueraded (`Masq6Fragment`: untranslated it would leak the pod's address).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    CT_F_MASQ, CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CT_STATE_CLOSING, CT_STATE_NEW, CtKey6,
    CtValue6, FP_F_MASQ_BPF, FragKey6, FragValue, MASQ_KIND_EXEMPT, MASQ_KIND_SOURCE,
    MASQ_PREFIX_BASE, MasqKey6, PROTO_TCP, PROTO_UDP, Reason, ct_lifetime_ns, ct_next_state,
};

use crate::{
    fwd::config,
    maps::{TWL_CT6_V1, TWL_FRAG6_V1, TWL_MASQ6_V1, count},
    natport::{self, Ct6},
    pkt::{
        Data, ETH_HLEN, L4_DPORT, L4_SPORT, PORTS_LEN, TCP_ACK, TCP_CSUM, TCP_FLAGS, TCP_RST,
        TCP_SYN, UDP_CSUM, UDP_HLEN, u16_at,
    },
    pkt6::{Frag6, USUAL6_LEN, is_ext, l4, walk},
    tc::Verdict,
};

const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET6: u8 = 10;
/// The fixed IPv6 header (RFC 8200 3): next header, then the two addresses.
const IP6_HLEN: usize = 40;
const IP6_NEXT: usize = 6;
const IP6_SRC: usize = 8;
const IP6_DST: usize = 24;
const IP6_SRC_AT: usize = ETH_HLEN + IP6_SRC;
const IP6_DST_AT: usize = ETH_HLEN + IP6_DST;
/// Where the transport header starts when no extension header precedes it.
const L4_AT: usize = ETH_HLEN + IP6_HLEN;
const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 errors (RFC 4443 3): destination unreachable, packet too big, time exceeded.
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_HLEN: usize = 8;
const ICMP6_CSUM: usize = 2;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;

/// A TCP/UDP packet (addresses as in the packet, ports in network order).
pub struct Pkt6 {
    pub saddr: A6,
    pub daddr: A6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    tcp_flags: u8,
    /// UDP: the datagram carries a checksum (mandatory in IPv6; 0 is left alone).
    udp_csum: bool,
    /// Where the transport header starts (behind any extension headers).
    l4_off: usize,
    /// A fragment after the first: no transport header (the ports are its first fragment's,
    /// from `TWL_FRAG6_V1`), so only the addresses are rewritten.
    later_fragment: bool,
}

impl Pkt6 {
    #[inline(always)]
    pub fn key(&self) -> CtKey6 {
        CtKey6 {
            saddr_be: self.saddr,
            daddr_be: self.daddr,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// An ICMPv6 error and the header of the TCP/UDP packet it quotes.
struct IcmpErr6 {
    saddr: A6,
    daddr: A6,
    /// Where the quoted IPv6 header starts.
    quote_off: usize,
    q: CtKey6,
}

enum Parsed6 {
    Flow(Pkt6),
    IcmpError(IcmpErr6),
    /// A later fragment of a datagram whose first fragment was not seen, or of a protocol
    /// other than TCP and UDP.
    Fragment {
        saddr: A6,
        daddr: A6,
    },
    /// Extension headers the walk found no transport header behind.
    ExtHeaders,
    /// Not IPv6, or nothing this program translates (ND, MLD, echo, other protocols).
    Other,
}

/// An IPv6 address as the maps hold it (`twill_common::addr6_from_octets`).
pub type A6 = [u32; 4];

/// Two addresses compared word by word (an array comparison may become a `bcmp` call, which
/// BPF has not).
#[inline(always)]
pub fn eq16(a: &A6, b: &A6) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// The IPv6 header at `off`: its next header and addresses. The addresses are copied by
/// `bpf_skb_load_bytes` into word-aligned stack, not read through the packet pointer: at the
/// packet's 2-byte alignment the compiler would read them byte by byte and keep each byte in a
/// register of its own, spilling more stack than a BPF call chain has.
#[inline(always)]
fn header6(ctx: &TcContext, d: &Data, off: usize) -> Option<(u8, A6, A6)> {
    let h: [u8; 8] = d.bytes(off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let saddr: A6 = ctx.load(off + IP6_SRC).ok()?;
    let daddr: A6 = ctx.load(off + IP6_DST).ok()?;
    Some((h[IP6_NEXT], saddr, daddr))
}

/// Whether the frame is IPv6 (its EtherType), read before anything else so that the two
/// families' paths never share a stack frame.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    // The skb's protocol (set from the EtherType by `eth_type_trans` on receive, by the stack
    // on transmit): a context field, where reading the frame would be a helper call on every
    // packet of every program. The IPv4 parser checks the frame's own EtherType again.
    // SAFETY: reading a field of our own context.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    protocol == u32::from(ETH_P_IPV6.to_be())
}

#[inline(always)]
fn parse6(ctx: &TcContext) -> Result<Parsed6, Reason> {
    let d = Data::new(ctx, USUAL6_LEN);
    let (next, saddr, daddr) = header6(ctx, &d, ETH_HLEN).ok_or(Reason::Malformed)?;
    // The transport header: right after the fixed header, or behind extension headers.
    let ext = is_ext(next);
    let (proto, l4_off, frag, frag_id) = if ext {
        let up = walk(ctx, next)?;
        (up.proto, up.off, up.frag, up.frag_id)
    } else {
        (next, L4_AT, Frag6::Whole, 0)
    };
    let mut frag_key = FragKey6 {
        saddr_be: saddr,
        daddr_be: daddr,
        id_be: frag_id,
        proto,
        _pad: [0; 3],
    };
    if frag == Frag6::Later {
        // No transport header: the flow is its datagram's first fragment's, if that one was
        // seen (fragments may arrive out of order; those then pass untouched).
        // SAFETY: the value is copied out at once.
        let seen = (unsafe { TWL_FRAG6_V1.get(&frag_key) }).copied();
        return Ok(match seen {
            Some(ports) if proto == PROTO_TCP || proto == PROTO_UDP => Parsed6::Flow(Pkt6 {
                saddr,
                daddr,
                sport: ports.sport_be,
                dport: ports.dport_be,
                proto,
                tcp_flags: 0,
                udp_csum: false,
                l4_off: 0,
                later_fragment: true,
            }),
            _ => Parsed6::Fragment { saddr, daddr },
        });
    }
    let (sport, dport, tcp_flags, udp_csum) = match proto {
        PROTO_TCP => {
            let h: [u8; TCP_FLAGS + 1] = l4(ctx, &d, ext, l4_off).ok_or(Reason::Malformed)?;
            (
                u16_at(&h, L4_SPORT),
                u16_at(&h, L4_DPORT),
                h[TCP_FLAGS],
                false,
            )
        }
        PROTO_UDP => {
            let h: [u8; UDP_HLEN] = l4(ctx, &d, ext, l4_off).ok_or(Reason::Malformed)?;
            let csum = u16_at(&h, UDP_CSUM) != 0;
            (u16_at(&h, L4_SPORT), u16_at(&h, L4_DPORT), 0, csum)
        }
        // An error's quote lies beyond the usual headers.
        PROTO_ICMPV6 if !ext => return Ok(parse_icmp6(ctx, &Data::full(ctx), saddr, daddr)),
        // The walk stopped on an extension header: no transport header to translate.
        p if is_ext(p) => return Ok(Parsed6::ExtHeaders),
        _ => return Ok(Parsed6::Other),
    };
    if frag == Frag6::First {
        // Its ports for the later fragments; recorded for every fragmented datagram, translated
        // or not (fragmentation is rare), as IPv4's `TWL_FRAG_V1`.
        frag_key.proto = proto;
        let _ = TWL_FRAG6_V1.insert(
            &frag_key,
            &FragValue {
                sport_be: sport,
                dport_be: dport,
            },
            0,
        );
    }
    Ok(Parsed6::Flow(Pkt6 {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        udp_csum,
        l4_off,
        later_fragment: false,
    }))
}

/// An ICMPv6 error quoting a TCP/UDP packet (with no extension header); anything else —
/// Neighbour Discovery and MLD among it — is `Other`.
#[inline(always)]
fn parse_icmp6(ctx: &TcContext, d: &Data, saddr: A6, daddr: A6) -> Parsed6 {
    let Some(h) = d.bytes::<ICMP6_HLEN>(L4_AT) else {
        return Parsed6::Other;
    };
    // Types 1..=3: destination unreachable, packet too big, time exceeded.
    if !(ICMP6_DEST_UNREACH..=ICMP6_TIME_EXCEEDED).contains(&h[0]) {
        return Parsed6::Other;
    }
    let quote_off = L4_AT + ICMP6_HLEN;
    let Some((proto, qs, qd)) = header6(ctx, d, quote_off) else {
        return Parsed6::Other;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed6::Other;
    }
    let Some(ports) = d.bytes::<PORTS_LEN>(quote_off + IP6_HLEN) else {
        return Parsed6::Other;
    };
    Parsed6::IcmpError(IcmpErr6 {
        saddr,
        daddr,
        quote_off,
        q: CtKey6 {
            saddr_be: qs,
            daddr_be: qd,
            sport_be: u16_at(&ports, L4_SPORT),
            dport_be: u16_at(&ports, L4_DPORT),
            proto,
            scope: CT_SCOPE_NAT,
            _pad: [0; 2],
        },
    })
}

/// `twill_tc_egress` for an IPv6 frame.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<Verdict, Reason> {
    match parse6(ctx)? {
        Parsed6::Flow(p) => match ct_lookup6(ctx, &p) {
            Some(verdict) => verdict,
            // A later fragment opens nothing (its first fragment did, or was not translated).
            None if p.later_fragment => unfollowed6(&p.saddr, &p.daddr),
            None => open(ctx, &p),
        },
        Parsed6::IcmpError(e) => icmp_error6(ctx, &e, false),
        Parsed6::Fragment { saddr, daddr } => unfollowed6(&saddr, &daddr),
        Parsed6::ExtHeaders => Ok((Reason::Ipv6ExtHeaders, TC_ACT_OK)),
        Parsed6::Other => Ok((Reason::NotService, TC_ACT_OK)),
    }
}

/// `twill_tc_ingress` for an IPv6 frame: replies of masqueraded flows, north-south flows
/// (`ns6`) and ICMPv6 errors about either.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Result<Verdict, Reason> {
    match parse6(ctx)? {
        Parsed6::Flow(p) => match ct_lookup6(ctx, &p) {
            Some(verdict) => verdict,
            // A later fragment opens nothing: its first fragment did, or it stays untranslated.
            None if p.later_fragment => Ok((Reason::Ipv6Fragment, TC_ACT_OK)),
            // A new flow from outside: NodePort, External IP or LoadBalancer IP (`ns6`).
            None => crate::ns6::open(ctx, &p),
        },
        Parsed6::IcmpError(e) => icmp_error6(ctx, &e, true),
        Parsed6::ExtHeaders => Ok((Reason::Ipv6ExtHeaders, TC_ACT_OK)),
        // Not followed (see the module doc): the stack has it, counted.
        Parsed6::Fragment { .. } => Ok((Reason::Ipv6Fragment, TC_ACT_OK)),
        Parsed6::Other => Ok((Reason::NotService, TC_ACT_OK)),
    }
}

/// A pod's fragment no tracked flow takes (its datagram's first fragment unseen or not
/// translated): dropped if it would leave masqueraded — untranslated it would leak the pod's
/// address and its answer could not come back — else untouched.
#[inline(always)]
fn unfollowed6(saddr: &A6, daddr: &A6) -> Result<Verdict, Reason> {
    if config().flags & FP_F_MASQ_BPF != 0 && masqueraded6(saddr, daddr) {
        return Err(Reason::Masq6Fragment);
    }
    Ok((Reason::NotService, TC_ACT_OK))
}

/// Whether `addr` lies in an IPv6 masquerade prefix of `kind` (also the fast path's question,
/// `fwd6`).
#[inline(always)]
pub fn masq_has6(kind: u8, addr: &A6) -> bool {
    let key = Key::new(
        MASQ_PREFIX_BASE + 128,
        MasqKey6 {
            kind,
            _pad: [0; 3],
            addr_be: *addr,
        },
    );
    TWL_MASQ6_V1.get(&key).is_some()
}

/// Whether a packet from `saddr` to `daddr` leaves the cluster masqueraded.
#[inline(always)]
fn masqueraded6(saddr: &A6, daddr: &A6) -> bool {
    masq_has6(MASQ_KIND_SOURCE, saddr) && !masq_has6(MASQ_KIND_EXEMPT, daddr)
}

/// The tracked flow of `p`, its state moved on and the packet translated; `None` when there is
/// none (or a SYN reuses a finished flow's tuple, whose entries are then removed).
#[inline(always)]
fn ct_lookup6(ctx: &TcContext, p: &Pkt6) -> Option<Result<Verdict, Reason>> {
    let key = p.key();
    let ptr = TWL_CT6_V1.get_ptr_mut(&key)?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value pointer for the program's duration. Read in place rather than
    // copied: a 56-byte copy would cost stack the IPv6 path does not have; the fields read are
    // only ever written with the same values by a concurrent packet of the flow.
    let ct = unsafe { &mut *ptr };
    let reply = ct.flags & CT_F_REPLY != 0;
    let other = key.counterpart(ct);
    if !reply
        && p.is_syn()
        && (ct.state == CT_STATE_CLOSING
            || now.saturating_sub(ct.last_seen_ns) > ct_lifetime_ns(p.proto, ct.state))
    {
        // The pod reuses the port of a finished flow: masqueraded afresh.
        let _ = TWL_CT6_V1.remove(&key);
        let _ = TWL_CT6_V1.remove(&other);
        count(Reason::CtReopened);
        return None;
    }
    let (state, fin) = ct_next_state(ct.state, ct.tcp_fin, reply, p.tcp_flags);
    ct.last_seen_ns = now;
    if state != ct.state || fin != ct.tcp_fin {
        ct.state = state;
        ct.tcp_fin = fin;
        // Only on a transition: both entries always tell the same state.
        if let Some(o) = TWL_CT6_V1.get_ptr_mut(&other) {
            // SAFETY: as above.
            unsafe {
                (*o).state = state;
                (*o).tcp_fin = fin;
            }
        }
    }
    let verdict = rewrite6(
        ctx,
        p,
        &ct.new_saddr_be,
        ct.new_sport_be,
        &ct.new_daddr_be,
        ct.new_dport_be,
    )
    .and_then(|()| {
        let reason = if reply {
            Reason::RevNatApplied
        } else {
            Reason::CtHit
        };
        if ct.flags & CT_F_SNAT != 0 {
            // As IPv4's `apply_ct`: a north-south flow SNATed to a node address, in either
            // direction, is sent straight out through the route's device.
            return Ok((
                reason,
                forward6(ctx, p.proto, &ct.new_saddr_be, &ct.new_daddr_be)?,
            ));
        }
        Ok((reason, TC_ACT_OK))
    });
    if p.tcp_flags & TCP_RST != 0 {
        let _ = TWL_CT6_V1.remove(&key);
        let _ = TWL_CT6_V1.remove(&other);
    }
    Some(verdict)
}

/// A local pod's packet no CT6 entry knows: masqueraded when it opens a flow out of the
/// cluster, else untouched.
#[inline(always)]
fn open(ctx: &TcContext, p: &Pkt6) -> Result<Verdict, Reason> {
    let cfg = config();
    if cfg.flags & FP_F_MASQ_BPF == 0 || !masqueraded6(&p.saddr, &p.daddr) {
        return Ok((Reason::NotService, TC_ACT_OK));
    }
    if p.proto == PROTO_TCP && !p.is_syn() {
        return Ok((Reason::MasqNotOpened, TC_ACT_OK));
    }
    let snat = route_src6(ctx, p)?;
    let min = u32::from(cfg.masq_port_min);
    if min == 0 {
        return Err(Reason::MasqPortsExhausted);
    }
    let span = u32::from(cfg.masq_port_max).saturating_sub(min) + 1;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // One value, the reply entry's first and then the original's, and one key: the IPv6 path
    // has little stack to spare.
    let mut value = CtValue6 {
        new_saddr_be: p.daddr,
        new_daddr_be: p.saddr,
        new_sport_be: p.dport,
        new_dport_be: p.sport,
        svc_id: 0,
        flags: CT_F_REPLY | CT_F_MASQ,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let mut key = CtKey6 {
        saddr_be: p.daddr,
        daddr_be: snat,
        sport_be: p.dport,
        dport_be: 0,
        proto: p.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    };
    let Some(port_be) = natport::claim::<Ct6>(ctx, &mut key, &value, None, (min, span), now)?
    else {
        return Err(Reason::MasqPortsExhausted);
    };
    value.new_saddr_be = snat;
    value.new_daddr_be = p.daddr;
    value.new_sport_be = port_be;
    value.new_dport_be = p.dport;
    value.flags = CT_F_MASQ;
    natport::open::<Ct6>(&p.key(), &value, &key)?;
    rewrite6(ctx, p, &snat, port_be, &p.daddr, p.dport)?;
    Ok((Reason::Masq6Snat, TC_ACT_OK))
}

/// The source address the node's routing picks towards the packet's destination
/// (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_SRC`, Linux 6.7+), as the forwarding path would route
/// the packet from this device (see `tc::route` for why an input lookup).
#[inline(always)]
fn route_src6(ctx: &TcContext, p: &Pkt6) -> Result<A6, Reason> {
    route_src_to6(ctx, p.proto, &p.saddr, &p.daddr)
}

/// `bpf_fib_lookup` of an IPv6 packet from `saddr` to `daddr` arriving on this device (see
/// `tc::route`); `extra` may add `BPF_FIB_LOOKUP_SRC`.
#[inline(always)]
pub fn fib6(
    ctx: &TcContext,
    proto: u8,
    saddr: &A6,
    daddr: &A6,
    extra: u32,
) -> (i64, bpf_fib_lookup) {
    // SAFETY: bpf_fib_lookup is plain old data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.l4_protocol = proto;
    params.__bindgen_anon_3.ipv6_src = *saddr;
    params.__bindgen_anon_4.ipv6_dst = *daddr;
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

/// Routes a translated IPv6 packet to `daddr` and redirects it to the output device, the
/// kernel resolving the neighbour (`bpf_redirect_neigh`), as IPv4's `tc::forward`.
#[inline(always)]
pub fn forward6(ctx: &TcContext, proto: u8, saddr: &A6, daddr: &A6) -> Result<i32, Reason> {
    let (rc, params) = fib6(ctx, proto, saddr, daddr, 0);
    if rc != 0 {
        return Err(Reason::RewriteFailed);
    }
    // SAFETY: no neighbour parameters: the kernel looks the next hop up itself.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) };
    // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
    Ok(i32::try_from(action).unwrap_or(TC_ACT_SHOT))
}

/// The preferred source address of the route from `saddr` to `daddr` (`BPF_FIB_LOOKUP_SRC`,
/// Linux 6.7+).
#[inline(always)]
pub fn route_src_to6(ctx: &TcContext, proto: u8, saddr: &A6, daddr: &A6) -> Result<A6, Reason> {
    let (rc, params) = fib6(ctx, proto, saddr, daddr, BPF_FIB_LOOKUP_SRC);
    // SAFETY: union member written by the kernel for AF_INET6 lookups.
    let src = unsafe { params.__bindgen_anon_3.ipv6_src };
    if rc != 0 || eq16(&src, &[0; 4]) {
        return Err(Reason::RewriteFailed);
    }
    Ok(src)
}

/// The checksum difference of replacing `old` by `new` (16 bytes each).
#[inline(always)]
fn csum_diff16(old: &A6, new: &A6) -> Result<u64, Reason> {
    // SAFETY: both point at 16 readable bytes, the sizes passed; the helper only reads them
    // (its `*mut` is the C prototype's).
    let d = unsafe { bpf_csum_diff(old.as_ptr().cast_mut(), 16, new.as_ptr().cast_mut(), 16, 0) };
    u64::try_from(d).map_err(|_| Reason::RewriteFailed)
}

/// Replaces the 16 bytes at `at` by `new`, folding the change into the checksum at `csum_off`
/// (`pseudo`: the bytes are covered through the pseudo-header only, as the outer addresses).
#[inline(always)]
fn replace16(
    ctx: &TcContext,
    at: usize,
    old: &A6,
    new: &A6,
    csum_off: Option<usize>,
    flags: u64,
) -> Result<(), Reason> {
    if eq16(old, new) {
        return Ok(());
    }
    let fail = |_| Reason::RewriteFailed;
    if let Some(off) = csum_off {
        // Size 0: `to` is a checksum difference rather than the new value of a field.
        ctx.l4_csum_replace(off, 0, csum_diff16(old, new)?, flags)
            .map_err(fail)?;
    }
    ctx.store(at, new, 0).map_err(fail)
}

/// Rewrites addresses and ports of a TCP/UDP packet, fixing its checksum (at the transport
/// header's own offset, behind any extension headers).
#[inline(always)]
pub fn rewrite6(
    ctx: &TcContext,
    p: &Pkt6,
    saddr: &A6,
    sport: u16,
    daddr: &A6,
    dport: u16,
) -> Result<(), Reason> {
    let csum_off = p.l4_off
        + if p.proto == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    // A later fragment has no transport header: only its addresses change (its first
    // fragment's checksum took the whole datagram's change).
    let csum = (!p.later_fragment && (p.proto == PROTO_TCP || p.udp_csum)).then_some(csum_off);
    let mangled = if p.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    replace16(ctx, IP6_SRC_AT, &p.saddr, saddr, csum, pseudo)?;
    replace16(ctx, IP6_DST_AT, &p.daddr, daddr, csum, pseudo)?;
    let fail = |_| Reason::RewriteFailed;
    for (off, old, new) in [
        (p.l4_off + L4_SPORT, p.sport, sport),
        (p.l4_off + L4_DPORT, p.dport, dport),
    ] {
        if old == new || p.later_fragment {
            continue;
        }
        if let Some(c) = csum {
            ctx.l4_csum_replace(c, u64::from(old), u64::from(new), mangled | 2)
                .map_err(fail)?;
        }
        ctx.store(off, &new, 0).map_err(fail)?;
    }
    Ok(())
}

/// Translates an ICMPv6 error about a tracked flow back, as `tc::icmp_error` does for IPv4: the
/// quote becomes what the other side of the translation sent, and the error goes to the quote's
/// new source. On ingress that is a router's Packet Too Big (path-MTU discovery) or
/// unreachable about a masqueraded packet, delivered to the pod; on egress a pod's error about
/// a reply it received, sent from the node's address. The ICMPv6 checksum covers the quote and,
/// through the pseudo-header, the outer addresses; the quoted transport checksum is left alone
/// (it covers bytes the quote does not hold, and no receiver checks it). An error about a
/// north-south flow SNATed to a node address arriving on `ingress` (a remote backend's
/// unreachable, a router's Packet Too Big about a reply) is sent out through the route's device
/// as the flow's packets are.
#[inline(always)]
fn icmp_error6(ctx: &TcContext, e: &IcmpErr6, ingress: bool) -> Result<Verdict, Reason> {
    let q = &e.q;
    // SAFETY: the value is copied out at once.
    let Some(ct) = (unsafe { TWL_CT6_V1.get(&q.reversed()) }).copied() else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    let csum = Some(L4_AT + ICMP6_CSUM);
    let qs = e.quote_off + IP6_HLEN;
    replace16(
        ctx,
        e.quote_off + IP6_SRC,
        &q.saddr_be,
        &ct.new_daddr_be,
        csum,
        0,
    )?;
    replace16(
        ctx,
        e.quote_off + IP6_DST,
        &q.daddr_be,
        &ct.new_saddr_be,
        csum,
        0,
    )?;
    let fail = |_| Reason::RewriteFailed;
    for (off, old, new) in [
        (qs + L4_SPORT, q.sport_be, ct.new_dport_be),
        (qs + L4_DPORT, q.dport_be, ct.new_sport_be),
    ] {
        if old != new {
            ctx.l4_csum_replace(L4_AT + ICMP6_CSUM, u64::from(old), u64::from(new), 2)
                .map_err(fail)?;
            ctx.store(off, &new, 0).map_err(fail)?;
        }
    }
    let new_saddr = if eq16(&e.saddr, &q.daddr_be) {
        ct.new_saddr_be
    } else {
        e.saddr
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    replace16(ctx, IP6_SRC_AT, &e.saddr, &new_saddr, csum, pseudo)?;
    replace16(ctx, IP6_DST_AT, &e.daddr, &ct.new_daddr_be, csum, pseudo)?;
    if ingress && ct.flags & CT_F_SNAT != 0 {
        return Ok((
            Reason::IcmpErrorTranslated,
            forward6(ctx, PROTO_ICMPV6, &new_saddr, &ct.new_daddr_be)?,
        ));
    }
    Ok((Reason::IcmpErrorTranslated, TC_ACT_OK))
}
