//! eBPF host routing of IPv6 packets: the IPv6 [`Family`] of `fwd.rs`'s one routine, and the
//! two IPv6 entries into it (a pod's packet on its host veth, a device's packet for a local
//! pod).
//!
//! ```text
//!  link-local or multicast source or destination, ND/MLD, hop-by-hop header
//!      ─► stack (fastpath_fallback_link_scope: Neighbour Discovery keeps working, its hop
//!         limit 255 untouched; hop-by-hop options are every router's to read)
//!  LOCAL_ENDPOINTS6[dst] ─► the receiver's ingress policy (policy6::verdict6) ─► hop limit − 1
//!      ─► pod MAC / host veth MAC ─► bpf_redirect_peer               (fastpath_redirect_peer6)
//!  else bpf_fib_lookup (AF_INET6) ─► hop limit − 1
//!      ─► bpf_redirect_neigh                                          (fastpath_redirect_neigh6)
//!  fallbacks as IPv4's: hop limit ≤ 1 (the stack sends Time Exceeded), over the output
//!  device's MTU (the stack sends Packet Too Big: routers never fragment IPv6), no route, the
//!  node itself, MAC not known yet, masquerade by nftables
//! ```
//!
//! IPv6 has no header checksum: the hop limit is written alone. Each entry is a function of its
//! own (a BPF-to-BPF call after the IPv6 policy or translation returned), so its frame is never
//! added to theirs: a call chain has 512 bytes of stack in all.
use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh},
    programs::TcContext,
};
use twill_common::{FP_F_HOST_ROUTING, LocalEndpoint, Reason};

use crate::{
    fwd::{Family, Own, config, into_local_pod, route},
    maps::TWL_LXC6_V1,
    nat6::{A6, fib6, masq_has6},
    pkt::ETH_HLEN,
    policy6::{link_scope, nd_or_mld, verdict6},
};

const AF_INET6: u8 = 10;
/// The fixed IPv6 header (RFC 8200 3): next header, hop limit, then the two addresses.
const IP6_HLEN: usize = 40;
const IP6_NEXT: usize = 6;
const IP6_HOP_LIMIT: usize = 7;
const NEXT_HOP_BY_HOP: u8 = 0;
const PROTO_ICMPV6: u8 = 58;

/// IPv6.
pub struct V6;

impl Family for V6 {
    type Addr = A6;
    const SRC_AT: usize = ETH_HLEN + 8;
    const DST_AT: usize = ETH_HLEN + 24;
    const HOP_AT: usize = ETH_HLEN + IP6_HOP_LIMIT;
    const PEER: Reason = Reason::FastPathPeer6;
    const NEIGH: Reason = Reason::FastPathNeigh6;

    #[inline(always)]
    fn local_endpoint(addr: &A6) -> Option<LocalEndpoint> {
        // SAFETY: the value is copied out before the next helper call.
        unsafe { TWL_LXC6_V1.get(addr) }.copied()
    }

    #[inline(always)]
    fn masq_has(kind: u8, addr: &A6) -> bool {
        masq_has6(kind, addr)
    }

    /// Link scope, Neighbour Discovery, MLD and hop-by-hop options are the node's own
    /// business (RFC 4861 7.1.1: ND arrives with hop limit 255 or is discarded; RFC 8200 4.3).
    #[inline(always)]
    fn node_only(ctx: &TcContext) -> Option<Reason> {
        let (Ok(h), Ok(saddr), Ok(daddr)) = (
            ctx.load::<[u8; 8]>(ETH_HLEN),
            ctx.load::<A6>(Self::SRC_AT),
            ctx.load::<A6>(Self::DST_AT),
        ) else {
            return Some(Reason::FallbackOther);
        };
        let next = h[IP6_NEXT];
        if link_scope(&saddr) || link_scope(&daddr) || next == NEXT_HOP_BY_HOP {
            return Some(Reason::FallbackLinkScope);
        }
        if next == PROTO_ICMPV6 {
            return match ctx.load::<u8>(ETH_HLEN + IP6_HLEN) {
                Ok(t) if nd_or_mld(t) => Some(Reason::FallbackLinkScope),
                Ok(_) => None,
                Err(_) => Some(Reason::FallbackOther),
            };
        }
        None
    }

    #[inline(always)]
    fn own(ctx: &TcContext) -> Option<Own<A6>> {
        let hop: u8 = ctx.load(Self::HOP_AT).ok()?;
        Some(Own {
            saddr: ctx.load(Self::SRC_AT).ok()?,
            daddr: ctx.load(Self::DST_AT).ok()?,
            hop: [hop, 0, 0, 0],
        })
    }

    #[inline(always)]
    fn dec_hop(ctx: &TcContext, own: &Own<A6>) -> Result<(), Reason> {
        ctx.store(Self::HOP_AT, &(own.hop[0] - 1), 0)
            .map_err(|_| Reason::RewriteFailed)
    }

    #[inline(always)]
    fn fib(ctx: &TcContext, proto: u8, saddr: &A6, daddr: &A6) -> (i64, bpf_fib_lookup) {
        fib6(ctx, proto, saddr, daddr, 0)
    }

    #[inline(always)]
    fn next_hop(params: &bpf_fib_lookup) -> bpf_redir_neigh {
        // SAFETY: bpf_redir_neigh is plain old data.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = u32::from(AF_INET6);
        // SAFETY: union member written by the kernel for AF_INET6 lookups: with
        // BPF_FIB_LOOKUP_SKIP_NEIGH, the route's gateway, or the destination itself when it is
        // directly connected.
        nh.__bindgen_anon_1.ipv6_nh = unsafe { params.__bindgen_anon_4.ipv6_dst };
        nh
    }
}

/// The receiver's ingress judgement of a packet delivered into a local pod: its own
/// `twill_pod_egress` never sees it.
#[inline(always)]
fn receiver_ingress(skb: *mut aya_ebpf::bindings::__sk_buff) -> Result<Reason, Reason> {
    verdict6(skb, false)
}

/// `twill_pod_ingress` for an IPv6 frame its pod's egress policy passed: routed here, or
/// `TC_ACT_OK` for the stack.
#[inline(never)]
pub fn from_pod(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    // The next header as the FIB's `l4_protocol` (policy routing rules); 0 if unreadable, in
    // which case `node_only` leaves the packet to the stack anyway.
    let next = ctx.load::<u8>(ETH_HLEN + IP6_NEXT).unwrap_or(0);
    route::<V6>(&ctx, next, None, || receiver_ingress(skb))
}

/// `twill_tc_ingress` for an IPv6 frame the north-south program left to the stack (replies of
/// masqueraded flows, IPv6 NodePort traffic DNATed to a local backend, other nodes' pods):
/// delivered into its pod when the destination is a local one, else `TC_ACT_OK`.
#[inline(never)]
pub fn to_local_pod(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let cfg = config();
    if cfg.flags & FP_F_HOST_ROUTING == 0 {
        return TC_ACT_OK;
    }
    into_local_pod::<V6>(&TcContext::new(skb), &cfg, None, || receiver_ingress(skb))
}
