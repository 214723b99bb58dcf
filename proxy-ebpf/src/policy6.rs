//! NetworkPolicy for IPv6 on the pod veths: the twin of `policy.rs` over the IPv6 maps.
//!
//! ```text
//!  link-local or multicast address, Neighbour Discovery, MLD ─► pass (Policy6LinkScope)
//!  later fragment (fragment header, offset ≠ 0)               ─► pass (Policy6LaterFragment)
//!  POLICY_ENDPOINTS6[local pod]   none, or not isolated either way ─► pass (no state)
//!  CT6[tuple] has this side's bit, CT6[reverse] the other side's   ─► pass
//!  IPCACHE_HOSTS6[peer], else IPCACHE6[peer] (LPM) ─► identity (WORLD when no prefix covers
//!      it; HOST into a pod: allowed)
//!  POLICY[(ep, dir, identity, proto, port)] then POLICY[(ep, dir, ANY, …)]   (the one rule
//!      trie: endpoints and identities are shared by both families)
//!      hit ─► record CT6 ─► pass          miss ─► drop (policy_denied_ingress / _egress),
//!                                                 event to the denied-flow stream (monitor.rs)
//! ```
//!
//! Every step is a hash or LPM lookup, as for IPv4. Flows are followed in the IPv6 conntrack
//! table `TWL_CT6_V1` with `CtKey6::scope = CT_SCOPE_POLICY` and the same per-side flags
//! (`CT_F_POLICY_EGRESS` / `_INGRESS`), state machine (`ct_next_state`) and collector as the
//! IPv4 entries in `TWL_CT_V2`.
//!
//! What the parser reads: the fixed header, the extension headers behind it (`pkt6::walk`, the
//! walk `nat6` shares: hop-by-hop, destination options, routing, fragment, authentication),
//! TCP/UDP/SCTP ports, ICMPv6 echo identifiers (as ports, as for IPv4) and ICMPv6 errors
//! (destination unreachable, packet too big, time exceeded, parameter problem) related to the
//! flow they quote. A first fragment carries the transport header and is judged by its ports. A
//! packet the walk finds no transport header in (ESP, a routing header with segments left, a
//! chain longer than the walk follows) is judged as the protocol it stopped on, without ports:
//! only rules without `ports` allow it, so it can never pass where its transport header would
//! not (fail closed).
//!
//! Later fragments (offset ≠ 0) carry no transport header and pass unjudged
//! (`Policy6LaterFragment`), as IPv4's do: they are never judged as a port-less new flow, which
//! would deny the later fragments of an allowed datagram (an isolated pod) or record a flow no
//! rule allowed. Passing them lets nothing through that the policy denied: a datagram whose
//! first fragment was dropped never reassembles, and the receiver discards its other fragments
//! when the reassembly timer ends (RFC 8200 4.5, without an error, since the first never came).
//! What they cost is reassembly memory on the receiver until then, bounded by its kernel.
//!
//! Link scope: a pod's IPv6 neighbours on its veth are the node alone (`fe80::1`, the CNI's
//! gateway), and Neighbour Discovery must keep working for every pod, isolated or not, as ARP
//! does for IPv4 (which policy never sees). Multicast cannot leave the node's veth either.
//!
//! Each direction's IPv6 path is a function of its own (a BPF-to-BPF call from the entry
//! point), so that it never shares a stack frame with the IPv4 path.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    CT_SCOPE_POLICY, CT_STATE_NEW, CtKey6, CtValue6, IDENTITY_HOST, IDENTITY_WORLD, IpCacheKey6,
    PEP_F_EGRESS_ISOLATED, PEP_F_INGRESS_ISOLATED, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    PolicyEndpoint, PolicyEntry, Reason,
};

use crate::{
    maps::{TWL_CT6_V1, TWL_IPC6_V1, TWL_IPCH6_V1, TWL_PEP6_V1, count},
    monitor::Denial,
    pkt::{Data, ETH_HLEN, L4_DPORT, L4_SPORT, PORTS_LEN, TCP_FLAGS, UDP_HLEN, u16_at},
    pkt6::{Frag6, is_ext, l4, walk},
    policy::{Side, allowed},
};

/// An IPv6 address as the maps hold it (`twill_common::addr6_from_octets`).
type A6 = [u32; 4];

/// The fixed IPv6 header (RFC 8200 3).
const IP6_HLEN: usize = 40;
const IP6_NEXT: usize = 6;
const IP6_SRC: usize = 8;
const IP6_DST: usize = 24;
/// Where the transport header starts when no extension header precedes it.
const L4_AT: usize = ETH_HLEN + IP6_HLEN;
const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 (RFC 4443): errors 1..=4, echo; MLD (RFC 2710, 3810) and Neighbour Discovery
/// (RFC 4861).
const ICMP6_ERR_LAST: u8 = 4;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const ICMP6_MLD_QUERY: u8 = 130;
const ICMP6_ND_REDIRECT: u8 = 137;
const ICMP6_MLD2_REPORT: u8 = 143;
const ICMP6_HLEN: usize = 8;
const ICMP6_ECHO_ID: usize = 4;
/// Bits of a full `IpCacheKey6` address.
const IPCACHE6_KEY_BITS: u32 = 128;
/// `BPF_NOEXIST`: create only; another CPU may have created the entry in the meantime.
const BPF_NOEXIST: u64 = 1;

/// The IPv6 flow a packet belongs to (as `pkt::Flow`).
struct Flow6 {
    saddr: A6,
    daddr: A6,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    /// An ICMPv6 error about this flow's reverse (see `pkt::Flow::related`).
    related: bool,
}

impl Flow6 {
    #[inline(always)]
    fn key(&self) -> CtKey6 {
        CtKey6 {
            saddr_be: self.saddr,
            daddr_be: self.daddr,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            scope: CT_SCOPE_POLICY,
            _pad: [0; 2],
        }
    }

    /// The port rules match: the destination port of TCP, UDP and SCTP; none otherwise.
    #[inline(always)]
    fn policy_port(&self) -> u16 {
        if self.proto == PROTO_TCP || self.proto == PROTO_UDP || self.proto == PROTO_SCTP {
            self.dport
        } else {
            0
        }
    }
}

/// `twill_pod_ingress`/`twill_pod_egress` for an IPv6 frame: the pod's egress (`Side::Egress`)
/// or ingress.
#[inline(always)]
pub fn pod6(skb: *mut aya_ebpf::bindings::__sk_buff, egress: bool) -> i32 {
    match verdict6(skb, egress) {
        Ok(reason) => {
            count(reason);
            TC_ACT_OK
        }
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

/// The verdict on an IPv6 frame for the pod's egress (`egress`) or ingress, not counted: `Ok`
/// passes, `Err` drops. Also the receiver's ingress judgement of a packet the fast path
/// delivers into a local pod (`fwd6`), whose own hook it skips.
#[inline(never)]
pub fn verdict6(skb: *mut aya_ebpf::bindings::__sk_buff, egress: bool) -> Result<Reason, Reason> {
    let ctx = TcContext::new(skb);
    let side = if egress { Side::Egress } else { Side::Ingress };
    match parse6(&ctx) {
        Ok(Seen6::Flow(flow)) => judge6(&flow, side),
        Ok(Seen6::Pass(reason)) => Ok(reason),
        Err(reason) => Err(reason),
    }
}

/// Whether an ICMPv6 message of `icmp_type` is Multicast Listener Discovery or Neighbour
/// Discovery: the link's own business.
#[inline(always)]
pub fn nd_or_mld(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP6_MLD_QUERY..=ICMP6_ND_REDIRECT | ICMP6_MLD2_REPORT
    )
}

/// The link-local (`fe80::/10`) or multicast (`ff00::/8`) addresses: the veth's own link.
#[inline(always)]
pub fn link_scope(a: &A6) -> bool {
    let w = u32::from_be(a[0]);
    w >> 22 == 0xfe80 >> 6 || w >> 24 == 0xff
}

/// What the parser made of an IPv6 frame.
enum Seen6 {
    Flow(Flow6),
    /// Left alone by policy, and why (link scope, Neighbour Discovery, MLD, later fragments).
    Pass(Reason),
}

/// The flow of an IPv6 frame, or why policy leaves it alone.
#[inline(always)]
fn parse6(ctx: &TcContext) -> Result<Seen6, Reason> {
    let d = Data::new(ctx, crate::pkt6::USUAL6_LEN);
    let h: [u8; 8] = d.bytes(ETH_HLEN).ok_or(Reason::Malformed)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    // Copied into word-aligned stack by the helper (see `nat6::header6` for why).
    let saddr: A6 = ctx
        .load(ETH_HLEN + IP6_SRC)
        .map_err(|_| Reason::Malformed)?;
    let daddr: A6 = ctx
        .load(ETH_HLEN + IP6_DST)
        .map_err(|_| Reason::Malformed)?;
    if link_scope(&saddr) || link_scope(&daddr) {
        return Ok(Seen6::Pass(Reason::Policy6LinkScope));
    }
    let mut flow = Flow6 {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: h[IP6_NEXT],
        tcp_flags: 0,
        related: false,
    };
    // The transport header: right after the fixed header, or behind extension headers.
    let ext = is_ext(flow.proto);
    let mut off = L4_AT;
    if ext {
        let up = walk(ctx, flow.proto)?;
        if up.frag == Frag6::Later {
            return Ok(Seen6::Pass(Reason::Policy6LaterFragment));
        }
        flow.proto = up.proto;
        off = up.off;
    }
    match flow.proto {
        PROTO_TCP => {
            let t: [u8; TCP_FLAGS + 1] = l4(ctx, &d, ext, off).ok_or(Reason::Malformed)?;
            flow.sport = u16_at(&t, L4_SPORT);
            flow.dport = u16_at(&t, L4_DPORT);
            flow.tcp_flags = t[TCP_FLAGS];
        }
        PROTO_UDP => {
            let u: [u8; UDP_HLEN] = l4(ctx, &d, ext, off).ok_or(Reason::Malformed)?;
            flow.sport = u16_at(&u, L4_SPORT);
            flow.dport = u16_at(&u, L4_DPORT);
        }
        PROTO_SCTP => {
            let p: [u8; PORTS_LEN] = l4(ctx, &d, ext, off).ok_or(Reason::Malformed)?;
            flow.sport = u16_at(&p, L4_SPORT);
            flow.dport = u16_at(&p, L4_DPORT);
        }
        PROTO_ICMPV6 => {
            let i: [u8; ICMP6_HLEN] = l4(ctx, &d, ext, off).ok_or(Reason::Malformed)?;
            match i[0] {
                ICMP6_MLD_QUERY..=ICMP6_ND_REDIRECT | ICMP6_MLD2_REPORT => {
                    return Ok(Seen6::Pass(Reason::Policy6LinkScope));
                }
                ICMP6_ECHO_REQUEST => flow.sport = u16_at(&i, ICMP6_ECHO_ID),
                ICMP6_ECHO_REPLY => flow.dport = u16_at(&i, ICMP6_ECHO_ID),
                1..=ICMP6_ERR_LAST => quote6(ctx, off + ICMP6_HLEN, &mut flow),
                _ => {}
            }
        }
        _ => {}
    }
    Ok(Seen6::Flow(flow))
}

/// Makes `flow` (an ICMPv6 error) the reverse of the TCP/UDP/SCTP flow whose packet it quotes
/// at `off`; a quote of anything else, or cut short, leaves it an ICMPv6 packet. Read through
/// the helper: `off` may lie behind extension headers.
#[inline(always)]
fn quote6(ctx: &TcContext, off: usize, flow: &mut Flow6) {
    let Ok(h) = ctx.load::<[u8; 8]>(off) else {
        return;
    };
    let proto = h[IP6_NEXT];
    if h[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP) {
        return;
    }
    let (Ok(qs), Ok(qd)) = (ctx.load::<A6>(off + IP6_SRC), ctx.load::<A6>(off + IP6_DST)) else {
        return;
    };
    let Ok(ports) = ctx.load::<[u8; PORTS_LEN]>(off + IP6_HLEN) else {
        return;
    };
    // The quoted packet went from its source to its destination; the error travels back.
    flow.saddr = qd;
    flow.daddr = qs;
    flow.sport = u16_at(&ports, L4_DPORT);
    flow.dport = u16_at(&ports, L4_SPORT);
    flow.proto = proto;
    flow.related = true;
}

/// The verdict for `flow` on `side` of its local pod (as `policy::judge`).
#[inline(always)]
fn judge6(flow: &Flow6, side: Side) -> Result<Reason, Reason> {
    let (local, peer) = match side {
        Side::Egress => (&flow.saddr, &flow.daddr),
        Side::Ingress => (&flow.daddr, &flow.saddr),
    };
    // SAFETY: the value is copied out before the next helper call.
    let Some(ep) = (unsafe { TWL_PEP6_V1.get(local) }).copied() else {
        return Ok(Reason::PolicyNotEnforced);
    };
    if ep.flags & (PEP_F_INGRESS_ISOLATED | PEP_F_EGRESS_ISOLATED) == 0 {
        return Ok(Reason::PolicyNotEnforced);
    }
    let key = flow.key();
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if ct_seen6(&key, side.ct_flag(), now, flow.tcp_flags, false)
        || ct_seen6(
            &key.reversed(),
            side.reply_flag(),
            now,
            flow.tcp_flags,
            true,
        )
    {
        return Ok(Reason::PolicyEstablished);
    }
    let isolated = ep.flags & side.isolated_flag() != 0;
    if flow.related {
        // An ICMPv6 error about no flow this side passed: judged as ICMPv6 (only rules
        // without ports allow it), never tracked.
        if isolated {
            let id = identity6(peer);
            if allowed(&ep, side, id, PROTO_ICMPV6, 0).is_none() {
                return Err(deny6(flow, side, &ep, id));
            }
        }
        return Ok(Reason::PolicyAllowed);
    }
    let reason = if isolated {
        judge_new(&ep, side, peer, flow)?
    } else {
        // Not isolated this way, but the other way: remember the flow so its replies pass.
        Reason::PolicyNotEnforced
    };
    ct_record6(&key, side.ct_flag(), now)?;
    Ok(reason)
}

/// A new flow on an isolated side: allowed by a rule for its peer's identity, or dropped.
#[inline(always)]
fn judge_new(ep: &PolicyEndpoint, side: Side, peer: &A6, flow: &Flow6) -> Result<Reason, Reason> {
    let id = identity6(peer);
    // Traffic from this node into its pods is always allowed (kubelet probes).
    if side == Side::Ingress && id == IDENTITY_HOST {
        return Ok(Reason::PolicyAllowed);
    }
    match allowed(ep, side, id, flow.proto, flow.policy_port()) {
        Some(_) => Ok(Reason::PolicyAllowed),
        None => Err(deny6(flow, side, ep, id)),
    }
}

/// The drop reason for `flow` on `side`, reported to the denied-flow stream on the way (as
/// `policy::deny`).
#[inline(always)]
fn deny6(flow: &Flow6, side: Side, ep: &PolicyEndpoint, peer: u32) -> Reason {
    let reason = side.denied();
    let denial = Denial {
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction: side.direction(),
        reason,
        ep_id: ep.ep_id,
        peer,
    };
    crate::monitor::denied6(&flow.saddr, &flow.daddr, &denial);
    reason
}

/// The peer's identity: its pod (or HOST), the ipBlock region its address lies in, or WORLD.
/// The /128 host entries first (exact hash), then the trie of prefixes, as IPv4's `identity`.
#[inline(always)]
fn identity6(addr: &A6) -> u32 {
    let data = IpCacheKey6 { addr_be: *addr };
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { TWL_IPCH6_V1.get(&data) } {
        return v.id;
    }
    TWL_IPC6_V1
        .get(&Key::new(IPCACHE6_KEY_BITS, data))
        .map_or(IDENTITY_WORLD, |v| v.id)
}

/// Whether `key` is tracked with `flag`; if so, refreshes it and moves its state (the one
/// machine, `ct_next_state`; a RST closes).
#[inline(always)]
fn ct_seen6(key: &CtKey6, flag: u32, now: u64, tcp_flags: u8, reply: bool) -> bool {
    let Some(ptr) = TWL_CT6_V1.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer for the program's duration; concurrent writers cost at
    // most one more judgement or an earlier expiry, never a wrong allow (as in `policy.rs`).
    unsafe { (*ptr).policy_pass(flag, now, tcp_flags, reply) }
}

/// Records that `flag`'s side passed the flow `key` (as `policy::ct_record`).
#[inline(always)]
fn ct_record6(key: &CtKey6, flag: u32, now: u64) -> Result<(), Reason> {
    // The tuple itself as the "translation": the collector's counterpart is the reverse tuple.
    let value = CtValue6 {
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
    if TWL_CT6_V1.insert(key, &value, BPF_NOEXIST).is_ok() {
        return Ok(());
    }
    if let Some(ptr) = TWL_CT6_V1.get_ptr_mut(key) {
        // SAFETY: as in ct_seen6.
        unsafe { (*ptr).policy_record(&value, flag, now) };
        return Ok(());
    }
    // Neither created nor found: the table is full. Dropped visibly, never let through
    // without its entry.
    Err(Reason::PolicyCtFull)
}
