//! Source-address validation on a pod's veth: a packet the pod sends must carry one of the pod's
//! own addresses as its source, or it is dropped (`Reason::SourceSpoofed`) before policy,
//! conntrack or routing see it — otherwise a pod could pass as another to a NetworkPolicy (its
//! identity is its address), to a Service backend, or reset another pod's connections.
//!
//! ```text
//!  IPv6: link-local source (fe80::/10) to a link-scope destination ─► own link (ND, MLD, RS)
//!        unspecified source (::) to link-local multicast (ff02::/16) ─► DAD, MLD before DAD
//!        (either to anything else ─► spoofed: the stack would not forward it either)
//!  both: LOCAL_ENDPOINTS[saddr].ifindex == this veth (TWL_LXC_V1 / TWL_LXC6_V1)
//!        ─► own address (one hash lookup, the usual case)
//!  otherwise, both families: FIB lookup of saddr from this veth (the node's reverse-path check)
//!     route out through this veth             ─► own address (an endpoint the agent has not
//!                                                 written yet, or a stale entry of a reused IP)
//!     another device, a local address, no route ─► spoofed: dropped
//!     lookup impossible (forwarding off)     ─► passed, as the stack would judge it
//! ```
//!
//! The route decides, not the agent's map: twill-cni installs the host route to each of a pod's
//! addresses through its veth before the pod runs, so a pod's first packets are never mistaken,
//! whatever the agent has written so far; the endpoint maps (written by the agent from those
//! same routes, for host routing) only spare the usual case the lookup. Link-local sources are
//! not matched against the pod's own link-local address: a link-local packet never leaves the
//! veth's link, whose only other end is the node, and the node keeps its neighbour state per
//! device, so a pod can only ever speak for its own link.
//! Non-IP frames (ARP) are not checked here.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_SKIP_NEIGH,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use twill_common::Reason;

use crate::{
    maps::{TWL_LXC_V1, TWL_LXC6_V1},
    pkt::ETH_HLEN,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;
/// The IPv6 header's addresses (RFC 8200 3), as frame offsets.
const IP6_SRC_AT: usize = ETH_HLEN + 8;
const IP6_DST_AT: usize = ETH_HLEN + 24;

/// `Ok` when `saddr` (IPv4) is the address of the pod behind the veth the packet arrived on.
#[inline(always)]
pub fn check(ctx: &TcContext, saddr: u32) -> Result<(), Reason> {
    let ifindex = ifindex(ctx);
    // SAFETY: the value is read before the next helper call.
    if unsafe { TWL_LXC_V1.get(&saddr) }.is_some_and(|ep| ep.ifindex == ifindex) {
        return Ok(());
    }
    // SAFETY: bpf_fib_lookup is plain old data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_4.ipv4_dst = saddr;
    routes_back(ctx, ifindex, &mut params)
}

/// Whether an IPv6 frame the pod sent carries a source that is not the pod's (dropped then).
/// A function of its own, called from the entry point before the IPv6 policy path, so that its
/// lookup parameters never share a stack frame with that path (see `pod.rs`).
#[inline(never)]
pub fn spoofed6(skb: *mut __sk_buff) -> bool {
    let ctx = TcContext::new(skb);
    // Copied into word-aligned stack by the helper (see `nat6::header6` for why); a frame too
    // short for an IPv6 header is left to the policy path, which drops it as malformed.
    let (Ok(saddr), Ok(daddr)) = (
        ctx.load::<[u32; 4]>(IP6_SRC_AT),
        ctx.load::<[u32; 4]>(IP6_DST_AT),
    ) else {
        return false;
    };
    check6(&ctx, &saddr, &daddr).is_err()
}

/// `Ok` when `saddr` (IPv6, the maps' word form) may be the source of a packet to `daddr` sent
/// by the pod behind this veth.
#[inline(always)]
fn check6(ctx: &TcContext, saddr: &[u32; 4], daddr: &[u32; 4]) -> Result<(), Reason> {
    let s0 = u32::from_be(saddr[0]);
    let d0 = u32::from_be(daddr[0]);
    let link_local = |w: u32| w >> 22 == 0xfe80 >> 6;
    let multicast = |w: u32| w >> 24 == 0xff;
    if link_local(s0) {
        // The pod's own link (ND, MLD, router solicitations): only to link-scope destinations,
        // as the stack would never forward a link-local source (RFC 4291 2.5.6).
        return if link_local(d0) || multicast(d0) {
            Ok(())
        } else {
            Err(Reason::SourceSpoofed)
        };
    }
    if saddr[0] | saddr[1] | saddr[2] | saddr[3] == 0 {
        // `::` is the source of Duplicate Address Detection (RFC 4862 5.4.2) and of MLD
        // reports sent before it (RFC 3810 5.2.13), both to link-local multicast (ff02::/16).
        return if d0 >> 16 == 0xff02 {
            Ok(())
        } else {
            Err(Reason::SourceSpoofed)
        };
    }
    let ifindex = ifindex(ctx);
    // SAFETY: the value is read before the next helper call.
    if unsafe { TWL_LXC6_V1.get(saddr) }.is_some_and(|ep| ep.ifindex == ifindex) {
        return Ok(());
    }
    // SAFETY: bpf_fib_lookup is plain old data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.__bindgen_anon_4.ipv6_dst = *saddr;
    routes_back(ctx, ifindex, &mut params)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading the skb's ifindex from our own context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The reverse-path check both families share: `params` (family and destination = the
/// packet's source) looked up as arriving on `ifindex` must route back out through it.
#[inline(always)]
fn routes_back(ctx: &TcContext, ifindex: u32, params: &mut bpf_fib_lookup) -> Result<(), Reason> {
    params.ifindex = ifindex;
    // SAFETY: params is a valid, writable struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            core::ptr::from_mut(params),
            FIB_PARAMS_LEN,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    match u32::try_from(rc) {
        // A route: its device (written by the lookup) must be this veth.
        Ok(0) if params.ifindex == ifindex => Ok(()),
        Ok(
            0
            | BPF_FIB_LKUP_RET_NOT_FWDED
            | BPF_FIB_LKUP_RET_BLACKHOLE
            | BPF_FIB_LKUP_RET_UNREACHABLE
            | BPF_FIB_LKUP_RET_PROHIBIT,
        ) => Err(Reason::SourceSpoofed),
        // Forwarding disabled on the veth, a tunnel route the helper cannot follow: nothing to
        // compare with; the stack (rp_filter, if set) has the last word.
        _ => Ok(()),
    }
}
