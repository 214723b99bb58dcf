//! eBPF host routing (the fast path): a pod's packets are routed by the program on its host
//! veth instead of the node's IP stack, and packets arriving on a device for a local pod are
//! delivered into it the same way. One routine for both families, generic over [`Family`]:
//! IPv4 here ([`V4`]), IPv6 in `fwd6.rs`.
//!
//! ```text
//!  pod veth tc ingress (twill_pod_ingress), after the sender's egress policy passed:
//!    (IPv6: link-local or multicast address, ND/MLD, hop-by-hop header ─► stack, `fwd6`)
//!    LOCAL_ENDPOINTS[dst] ─► receiver's ingress policy (judged here: its host veth's own hook
//!                            is skipped) ─► TTL/hop limit − 1, L2 = pod MAC / host veth MAC
//!                            ─► bpf_redirect_peer (straight into the receiver's namespace)
//!    masqueraded by netfilter (--masquerade-mode=nftables) ─► stack
//!    bpf_fib_lookup (as the forwarding path would) ─► TTL/hop limit − 1
//!                            ─► bpf_redirect_neigh(next hop)
//!  device tc ingress (twill_tc_ingress), after the north-south translation left the packet
//!  to the stack: LOCAL_ENDPOINTS[dst] ─► as above (replies of pods' flows to other nodes,
//!  NodePort traffic DNATed to a local backend, replies of masqueraded flows)
//! ```
//!
//! Whatever a lookup cannot decide goes to the stack unchanged, counted by why (`Reason` 80..=88
//! for both families, and 46 for IPv6's link scope): a local pod whose MAC is not known yet, an
//! expiring TTL or hop limit, no route, a packet over the output device's MTU, the node itself
//! as destination. The stack then handles it exactly as before, including its ICMP answers
//! (time exceeded, IPv6's Packet Too Big); the pod's host veth hooks still judge its policy
//! there. Delivered and forwarded packets count per family (80 and 81; IPv6 44 and 45).
//!
//! The MTU is the output device's (`bpf_fib_lookup` without `tot_len` checks the skb against
//! it, and lets GSO packets through as the device segments them); a route's own `mtu` is not
//! consulted, as twill's routes carry none (the overlay's overhead is in the pods' MTU).
//!
//! Forwarded packets leave through the output device's tc egress (`bpf_redirect_neigh` queues
//! them with `dev_queue_xmit`), so the eBPF masquerade (`masq.rs`, `nat6.rs`) translates them
//! there exactly as it does the stack's.
//!
//! Policy stays one judgement per side and node in the one conntrack table: the redirect skips
//! the receiver's `twill_pod_egress`, so the same ingress judgement it would have run runs here
//! first (IPv4: `policy::judge(.., Side::Ingress)`, reusing the sender's lookups; IPv6:
//! `policy6::verdict6`), and a denial drops the packet where it would have been dropped.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_redirect_neigh, bpf_redirect_peer},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    FP_F_HOST_ROUTING, FP_F_MASQ_NFT, FastPathConfig, LXC_F_MAC_KNOWN, LocalEndpoint,
    MASQ_KIND_EXEMPT, MASQ_KIND_SOURCE, MASQ_PREFIX_BASE, MasqKey, Reason,
};

use crate::{
    maps::{TWL_FPCFG_V1, TWL_LXC_V1, TWL_MASQ_V1, count},
    pkt::{ETH_HLEN, Flow, IP_DST_AT, IP_SRC_AT, Packet, parse},
    policy::{CtSeen, Side, judge},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "20 bytes"
)]
const NH_PARAMS_LEN: i32 = size_of::<bpf_redir_neigh>() as i32;

/// What the fast path needs of an address family: where its header keeps the addresses and
/// the hop count, its endpoint and masquerade maps, its FIB query and next hop.
pub trait Family {
    /// An address as the packet and the family's maps hold it (network order).
    type Addr: Copy;
    /// Frame offsets of the source and destination addresses and of the TTL (hop limit).
    const SRC_AT: usize;
    const DST_AT: usize;
    const HOP_AT: usize;
    /// Counted for a delivery into a local pod and for a forward.
    const PEER: Reason;
    const NEIGH: Reason;
    fn local_endpoint(addr: &Self::Addr) -> Option<LocalEndpoint>;
    /// Whether `addr` lies in a masquerade prefix of `kind`.
    fn masq_has(kind: u8, addr: &Self::Addr) -> bool;
    /// Why a packet must take the stack whatever its destination (IPv6 link scope), if so.
    fn node_only(ctx: &TcContext) -> Option<Reason>;
    /// The packet's own header fields, read from the packet (when no parse has them yet).
    fn own(ctx: &TcContext) -> Option<Own<Self::Addr>>;
    /// Decrements the TTL (hop limit) as a router does; the caller checked it is above 1.
    fn dec_hop(ctx: &TcContext, own: &Own<Self::Addr>) -> Result<(), Reason>;
    /// `bpf_fib_lookup` from `saddr` to `daddr` as the forwarding path routes a packet that
    /// arrived on this skb's device (`BPF_FIB_LOOKUP_SKIP_NEIGH`).
    fn fib(
        ctx: &TcContext,
        proto: u8,
        saddr: &Self::Addr,
        daddr: &Self::Addr,
    ) -> (i64, bpf_fib_lookup);
    /// The neighbour a successful lookup hands the packet to.
    fn next_hop(params: &bpf_fib_lookup) -> bpf_redir_neigh;
}

/// What the fast path reads of a packet's own IP header (for an ICMP error, not the quoted
/// flow's that policy judged): its addresses and its hop count, with (IPv4) the protocol and
/// header checksum that share the TTL's store.
#[derive(Clone, Copy)]
pub struct Own<A> {
    pub saddr: A,
    pub daddr: A,
    /// IPv4: TTL, protocol, checksum (as stored); IPv6: the hop limit, then zeros.
    pub hop: [u8; 4],
}

impl Own<u32> {
    /// From the IPv4 parse, which read these already.
    #[inline(always)]
    pub fn of(p: &Packet) -> Self {
        Own {
            saddr: p.saddr,
            daddr: p.daddr,
            hop: p.ttl_word,
        }
    }
}

/// IPv4.
pub struct V4;

impl Family for V4 {
    type Addr = u32;
    const SRC_AT: usize = IP_SRC_AT;
    const DST_AT: usize = IP_DST_AT;
    const HOP_AT: usize = IP_TTL_OFF;
    const PEER: Reason = Reason::FastPathPeer;
    const NEIGH: Reason = Reason::FastPathNeigh;

    #[inline(always)]
    fn local_endpoint(addr: &u32) -> Option<LocalEndpoint> {
        // SAFETY: the value is copied out before the next helper call.
        unsafe { TWL_LXC_V1.get(addr) }.copied()
    }

    #[inline(always)]
    fn masq_has(kind: u8, addr: &u32) -> bool {
        let key = Key::new(
            MASQ_PREFIX_BASE + 32,
            MasqKey {
                kind,
                _pad: [0; 3],
                addr_be: *addr,
            },
        );
        TWL_MASQ_V1.get(&key).is_some()
    }

    #[inline(always)]
    fn node_only(_ctx: &TcContext) -> Option<Reason> {
        None
    }

    #[inline(always)]
    fn own(ctx: &TcContext) -> Option<Own<u32>> {
        Some(Own {
            saddr: ctx.load(IP_SRC_AT).ok()?,
            daddr: ctx.load(IP_DST_AT).ok()?,
            hop: ctx.load(IP_TTL_OFF).ok()?,
        })
    }

    /// RFC 1812 5.3.1, fixing the header checksum: TTL, protocol and checksum are written
    /// back in one store, the checksum updated incrementally (`ttl_dec_csum`) — one helper
    /// call where `bpf_l3_csum_replace` and a store would be two.
    #[inline(always)]
    fn dec_hop(ctx: &TcContext, own: &Own<u32>) -> Result<(), Reason> {
        let mut h = own.hop;
        h[0] -= 1;
        let csum = twill_common::ttl_dec_csum(u16::from_be_bytes([h[2], h[3]]));
        h[2..4].copy_from_slice(&csum.to_be_bytes());
        ctx.store(IP_TTL_OFF, &h, 0)
            .map_err(|_| Reason::RewriteFailed)
    }

    #[inline(always)]
    fn fib(ctx: &TcContext, proto: u8, saddr: &u32, daddr: &u32) -> (i64, bpf_fib_lookup) {
        crate::tc::route(ctx, proto, *saddr, *daddr, 0)
    }

    #[inline(always)]
    fn next_hop(params: &bpf_fib_lookup) -> bpf_redir_neigh {
        // SAFETY: bpf_redir_neigh is plain old data.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        if params.family == AF_INET6 {
            // An IPv4 route with an IPv6 gateway (`via inet6`: a peer's IPv4 pods over an IPv6
            // underlay): the kernel turns the result's family to AF_INET6 and writes the
            // gateway into ipv6_dst (net/core/filter.c, bpf_ipv4_fib_lookup); the redirect
            // resolves it by Neighbour Discovery.
            nh.nh_family = u32::from(AF_INET6);
            // SAFETY: union member written by the kernel when it set family AF_INET6.
            nh.__bindgen_anon_1.ipv6_nh = unsafe { params.__bindgen_anon_4.ipv6_dst };
        } else {
            nh.nh_family = u32::from(AF_INET);
            // SAFETY: union member written by the kernel for AF_INET lookups: with
            // BPF_FIB_LOOKUP_SKIP_NEIGH, the next hop (the gateway, or the destination when
            // directly connected), so the redirect does not look the route up a second time.
            nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
        }
        nh
    }
}

/// The fast path's switches (all off until the agent wrote them).
#[inline(always)]
pub fn config() -> FastPathConfig {
    TWL_FPCFG_V1.get(0).copied().unwrap_or_default()
}

/// The single exit of the fast path: counts its outcome; a policy denial drops.
#[inline(always)]
fn finish(verdict: Result<(Reason, i32), Reason>) -> i32 {
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

/// A packet an IPv4 pod sent, its egress policy passed (tc ingress of its host veth): routed
/// here, or `TC_ACT_OK` for the stack.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, packet: &Packet, flow: &Flow, seen: CtSeen) -> i32 {
    route::<V4>(ctx, flow.proto, Some(Own::of(packet)), || {
        judge(flow, Side::Ingress, seen).map(|(reason, _)| reason)
    })
}

/// An IPv4 packet on a device's tc ingress that the north-south program left to the stack:
/// delivered into its pod when the destination is a local one, else `TC_ACT_OK`.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext) -> i32 {
    let cfg = config();
    if cfg.flags & FP_F_HOST_ROUTING == 0 {
        return TC_ACT_OK;
    }
    let Ok(Some(packet)) = parse(ctx) else {
        return TC_ACT_OK;
    };
    let Ok(Some(flow)) = Flow::of(&packet) else {
        return TC_ACT_OK;
    };
    into_local_pod::<V4>(ctx, &cfg, Some(Own::of(&packet)), || {
        judge(&flow, Side::Ingress, CtSeen::Nothing).map(|(reason, _)| reason)
    })
}

/// A packet a pod sent, its egress policy passed: routed here, or `TC_ACT_OK` for the stack.
/// `ingress` judges the receiver's ingress policy when the destination is a local pod (`Ok`:
/// the reason it passed, counted; `Err`: dropped).
#[inline(always)]
pub fn route<F: Family>(
    ctx: &TcContext,
    proto: u8,
    own: Option<Own<F::Addr>>,
    ingress: impl FnOnce() -> Result<Reason, Reason>,
) -> i32 {
    let cfg = config();
    if cfg.flags & FP_F_HOST_ROUTING == 0 {
        return TC_ACT_OK;
    }
    finish(try_route::<F>(ctx, proto, &cfg, own, ingress))
}

/// A packet on a device's tc ingress that the north-south program left to the stack, delivered
/// into its pod when the destination is a local one (`ingress` as for [`route`]), else
/// `TC_ACT_OK`. The caller checked that `cfg` turns host routing on.
#[inline(always)]
pub fn into_local_pod<F: Family>(
    ctx: &TcContext,
    cfg: &FastPathConfig,
    own: Option<Own<F::Addr>>,
    ingress: impl FnOnce() -> Result<Reason, Reason>,
) -> i32 {
    let Some(own) = own.or_else(|| F::own(ctx)) else {
        return TC_ACT_OK;
    };
    let Some(ep) = F::local_endpoint(&own.daddr) else {
        return TC_ACT_OK;
    };
    if let Some(reason) = F::node_only(ctx) {
        count(reason);
        return TC_ACT_OK;
    }
    if cfg.flags & FP_F_MASQ_NFT != 0 && !exempt::<F>(&own.saddr) {
        // netfilter must see this flow's first packet, or it masquerades the pod's replies as
        // a new connection of the pod's.
        count(Reason::FallbackMasqNft);
        return TC_ACT_OK;
    }
    finish(deliver::<F>(ctx, &ep, &own, ingress))
}

#[inline(always)]
fn try_route<F: Family>(
    ctx: &TcContext,
    proto: u8,
    cfg: &FastPathConfig,
    own: Option<Own<F::Addr>>,
    ingress: impl FnOnce() -> Result<Reason, Reason>,
) -> Result<(Reason, i32), Reason> {
    if let Some(reason) = F::node_only(ctx) {
        return Ok((reason, TC_ACT_OK));
    }
    // The packet's own addresses: for an ICMP error, the flow policy judged is the quoted one's.
    let own = own.or_else(|| F::own(ctx)).ok_or(Reason::Malformed)?;
    if let Some(ep) = F::local_endpoint(&own.daddr) {
        return deliver::<F>(ctx, &ep, &own, ingress);
    }
    if cfg.flags & FP_F_MASQ_NFT != 0 && masqueraded_by::<F>(&own.saddr, &own.daddr) {
        return Ok((Reason::FallbackMasqNft, TC_ACT_OK));
    }
    forward::<F>(ctx, proto, &own)
}

/// Whether `daddr` is reached untranslated (cluster, pods, nodes, `--non-masquerade-cidrs`).
#[inline(always)]
fn exempt<F: Family>(daddr: &F::Addr) -> bool {
    F::masq_has(MASQ_KIND_EXEMPT, daddr)
}

/// Whether a packet from `saddr` to `daddr` leaves the cluster masqueraded.
#[inline(always)]
fn masqueraded_by<F: Family>(saddr: &F::Addr, daddr: &F::Addr) -> bool {
    F::masq_has(MASQ_KIND_SOURCE, saddr) && !exempt::<F>(daddr)
}

/// Whether an IPv4 packet from `saddr` to `daddr` leaves the cluster masqueraded.
#[inline(always)]
pub fn masqueraded(saddr: u32, daddr: u32) -> bool {
    masqueraded_by::<V4>(&saddr, &daddr)
}

/// Delivers into the local pod `ep`: judges its ingress policy (its own hook is skipped), then
/// sets the frame up as its host veth would have sent it and redirects into its namespace.
#[inline(always)]
fn deliver<F: Family>(
    ctx: &TcContext,
    ep: &LocalEndpoint,
    own: &Own<F::Addr>,
    ingress: impl FnOnce() -> Result<Reason, Reason>,
) -> Result<(Reason, i32), Reason> {
    if ep.flags & LXC_F_MAC_KNOWN == 0 {
        return Ok((Reason::FallbackNoMac, TC_ACT_OK));
    }
    if own.hop[0] <= 1 {
        return Ok((Reason::FallbackTtl, TC_ACT_OK));
    }
    count(ingress()?);
    F::dec_hop(ctx, own)?;
    // Both MACs in one store: destination (the pod), source (its host veth).
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&ep.pod_mac);
    l2[6..].copy_from_slice(&ep.host_mac);
    ctx.store(0, &l2, 0).map_err(|_| Reason::RewriteFailed)?;
    // SAFETY: plain helper; flags must be 0.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
    Ok((F::PEER, i32::try_from(action).unwrap_or(TC_ACT_SHOT)))
}

/// Routes the packet as the forwarding path would (an input FIB lookup from the pod's veth)
/// and hands it to the output device's neighbour (`bpf_redirect_neigh`, which writes the L2
/// header and resolves the next hop if needed).
#[inline(always)]
fn forward<F: Family>(
    ctx: &TcContext,
    proto: u8,
    own: &Own<F::Addr>,
) -> Result<(Reason, i32), Reason> {
    let (rc, params) = F::fib(ctx, proto, &own.saddr, &own.daddr);
    let fallback = match u32::try_from(rc) {
        Ok(0) => None,
        Ok(
            BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT,
        ) => Some(Reason::FallbackNoRoute),
        Ok(BPF_FIB_LKUP_RET_NOT_FWDED) => Some(Reason::FallbackToHost),
        Ok(BPF_FIB_LKUP_RET_FRAG_NEEDED) => Some(Reason::FallbackFragNeeded),
        _ => Some(Reason::FallbackOther),
    };
    if let Some(reason) = fallback {
        return Ok((reason, TC_ACT_OK));
    }
    if own.hop[0] <= 1 {
        return Ok((Reason::FallbackTtl, TC_ACT_OK));
    }
    F::dec_hop(ctx, own)?;
    let mut nh = F::next_hop(&params);
    // SAFETY: nh is a valid struct of the size passed.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, &raw mut nh, NH_PARAMS_LEN, 0) };
    Ok((F::NEIGH, i32::try_from(action).unwrap_or(TC_ACT_SHOT)))
}
