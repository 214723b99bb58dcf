//! eBPF host routing (the fast path): a pod's packets are routed by the program on its host
//! veth instead of the node's IP stack, and packets arriving on a device for a local pod are
//! delivered into it the same way.
//!
//! ```text
//!  pod veth tc ingress (twill_pod_ingress), after the sender's egress policy passed:
//!    LOCAL_ENDPOINTS[dst] ─► receiver's ingress policy (judged here: its host veth's own hook
//!                            is skipped) ─► TTL-1, L2 = pod MAC / host veth MAC
//!                            ─► bpf_redirect_peer (straight into the receiver's namespace)
//!    masqueraded by netfilter (--masquerade-mode=nftables) ─► stack
//!    bpf_fib_lookup (as the forwarding path would) ─► TTL-1 ─► bpf_redirect_neigh(next hop)
//!  device tc ingress (twill_tc_ingress), after the north-south translation left the packet
//!  to the stack: LOCAL_ENDPOINTS[dst] ─► as above (replies of pods' flows to other nodes,
//!  NodePort traffic DNATed to a local backend, replies of masqueraded flows)
//! ```
//!
//! Whatever a lookup cannot decide goes to the stack unchanged, counted by why (`Reason` 80..=88):
//! a local pod whose MAC is not known yet, an expiring TTL, no route, a packet over the MTU, the
//! node itself as destination. The stack then handles it exactly as before, including its ICMP
//! answers; the pod's host veth hooks still judge its policy there.
//!
//! Policy stays one judgement per side and node in the one conntrack table: the redirect skips
//! the receiver's `twill_pod_egress`, so the same `policy::judge(.., Side::Ingress)` it would
//! have run runs here first, and a denial drops the packet where it would have been dropped.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_SKIP_NEIGH,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use twill_common::{
    FP_F_HOST_ROUTING, FP_F_MASQ_NFT, FastPathConfig, LXC_F_MAC_KNOWN, LocalEndpoint,
    MASQ_KIND_EXEMPT, MASQ_KIND_SOURCE, MASQ_PREFIX_BASE, MasqKey, Reason,
};

use crate::{
    maps::{TWL_FPCFG_V1, TWL_LXC_V1, TWL_MASQ_V1, count},
    pkt::{ETH_HLEN, Flow, parse},
    policy::{Side, judge},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_DST_OFF: usize = ETH_HLEN + 16;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "20 bytes"
)]
const NH_PARAMS_LEN: i32 = size_of::<bpf_redir_neigh>() as i32;

/// The flow of a packet as NetworkPolicy judges it; `None` for what is not IPv4 and later
/// fragments.
#[inline(always)]
pub fn parse_flow(ctx: &TcContext) -> Result<Option<Flow>, Reason> {
    match parse(ctx)? {
        Some(p) => Flow::of(&p),
        None => Ok(None),
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

/// A packet a pod sent, its egress policy passed (tc ingress of its host veth): routed here, or
/// `TC_ACT_OK` for the stack.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, flow: &Flow) -> i32 {
    let cfg = config();
    if cfg.flags & FP_F_HOST_ROUTING == 0 {
        return TC_ACT_OK;
    }
    finish(try_from_pod(ctx, flow, &cfg))
}

/// A packet on a device's tc ingress that the north-south program left to the stack: delivered
/// into its pod when the destination is a local one, else `TC_ACT_OK`.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext) -> i32 {
    let cfg = config();
    if cfg.flags & FP_F_HOST_ROUTING == 0 {
        return TC_ACT_OK;
    }
    let Ok(Some(flow)) = parse_flow(ctx) else {
        return TC_ACT_OK;
    };
    let Ok(daddr) = ctx.load::<u32>(IP_DST_OFF) else {
        return TC_ACT_OK;
    };
    let Some(ep) = local_endpoint(daddr) else {
        return TC_ACT_OK;
    };
    if cfg.flags & FP_F_MASQ_NFT != 0 && !exempt(ctx_saddr(ctx)) {
        // netfilter must see this flow's first packet, or it masquerades the pod's replies as
        // a new connection of the pod's.
        count(Reason::FallbackMasqNft);
        return TC_ACT_OK;
    }
    finish(deliver(ctx, &flow, &ep))
}

#[inline(always)]
fn try_from_pod(
    ctx: &TcContext,
    flow: &Flow,
    cfg: &FastPathConfig,
) -> Result<(Reason, i32), Reason> {
    // The packet's own destination: for an ICMP error, `flow` is the quoted flow's.
    let daddr: u32 = ctx.load(IP_DST_OFF).map_err(|_| Reason::Malformed)?;
    let saddr = ctx_saddr(ctx);
    if let Some(ep) = local_endpoint(daddr) {
        return deliver(ctx, flow, &ep);
    }
    if cfg.flags & FP_F_MASQ_NFT != 0 && masqueraded(saddr, daddr) {
        return Ok((Reason::FallbackMasqNft, TC_ACT_OK));
    }
    forward(ctx, flow.proto, saddr, daddr)
}

#[inline(always)]
fn ctx_saddr(ctx: &TcContext) -> u32 {
    ctx.load(ETH_HLEN + 12).unwrap_or(0)
}

#[inline(always)]
fn local_endpoint(addr_be: u32) -> Option<LocalEndpoint> {
    // SAFETY: the value is copied out before the next helper call.
    unsafe { TWL_LXC_V1.get(addr_be) }.copied()
}

#[inline(always)]
fn masq_has(kind: u8, addr_be: u32) -> bool {
    let key = Key::new(
        MASQ_PREFIX_BASE + 32,
        MasqKey {
            kind,
            _pad: [0; 3],
            addr_be,
        },
    );
    TWL_MASQ_V1.get(&key).is_some()
}

/// Whether `daddr` is reached untranslated (cluster, pods, nodes, `--non-masquerade-cidrs`).
#[inline(always)]
pub fn exempt(daddr: u32) -> bool {
    masq_has(MASQ_KIND_EXEMPT, daddr)
}

/// Whether a packet from `saddr` to `daddr` leaves the cluster masqueraded.
#[inline(always)]
pub fn masqueraded(saddr: u32, daddr: u32) -> bool {
    masq_has(MASQ_KIND_SOURCE, saddr) && !exempt(daddr)
}

/// Delivers into the local pod `ep`: judges its ingress policy (its own hook is skipped), then
/// sets the frame up as its host veth would have sent it and redirects into its namespace.
#[inline(always)]
fn deliver(ctx: &TcContext, flow: &Flow, ep: &LocalEndpoint) -> Result<(Reason, i32), Reason> {
    if ep.flags & LXC_F_MAC_KNOWN == 0 {
        return Ok((Reason::FallbackNoMac, TC_ACT_OK));
    }
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| Reason::Malformed)?;
    if ttl <= 1 {
        return Ok((Reason::FallbackTtl, TC_ACT_OK));
    }
    count(judge(flow, Side::Ingress)?);
    dec_ttl(ctx, ttl)?;
    let fail = |_| Reason::RewriteFailed;
    ctx.store(0, &ep.pod_mac, 0).map_err(fail)?;
    ctx.store(6, &ep.host_mac, 0).map_err(fail)?;
    // SAFETY: plain helper; flags must be 0.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
    Ok((
        Reason::FastPathPeer,
        i32::try_from(action).unwrap_or(TC_ACT_SHOT),
    ))
}

/// Decrements the TTL as a router does (RFC 1812 5.3.1), fixing the header checksum; the
/// caller checked it is above 1.
#[inline(always)]
fn dec_ttl(ctx: &TcContext, ttl: u8) -> Result<(), Reason> {
    // The 16-bit word the checksum covers: TTL then protocol, as they lie in the packet.
    let old: u16 = ctx.load(IP_TTL_OFF).map_err(|_| Reason::Malformed)?;
    let mut bytes = old.to_ne_bytes();
    bytes[0] = ttl - 1;
    let new = u16::from_ne_bytes(bytes);
    let fail = |_| Reason::RewriteFailed;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 2)
        .map_err(fail)?;
    ctx.store(IP_TTL_OFF, &bytes[0], 0).map_err(fail)
}

/// Routes the packet as the forwarding path would (an input FIB lookup from the pod's veth)
/// and hands it to the output device's neighbour (`bpf_redirect_neigh`, which writes the L2
/// header and resolves the next hop if needed).
#[inline(always)]
fn forward(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32) -> Result<(Reason, i32), Reason> {
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
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
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
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| Reason::Malformed)?;
    if ttl <= 1 {
        return Ok((Reason::FallbackTtl, TC_ACT_OK));
    }
    dec_ttl(ctx, ttl)?;
    // SAFETY: bpf_redir_neigh is plain old data.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    if params.family == AF_INET6 {
        // An IPv4 route with an IPv6 gateway (`via inet6`: a peer's IPv4 pods over an IPv6
        // underlay): the kernel turns the result's family to AF_INET6 and writes the gateway
        // into ipv6_dst (net/core/filter.c, bpf_ipv4_fib_lookup); the redirect resolves it by
        // Neighbour Discovery.
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
    // SAFETY: nh is a valid struct of the size passed.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, &raw mut nh, NH_PARAMS_LEN, 0) };
    Ok((
        Reason::FastPathNeigh,
        i32::try_from(action).unwrap_or(TC_ACT_SHOT),
    ))
}
