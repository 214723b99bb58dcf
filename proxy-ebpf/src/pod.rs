//! The programs on each pod's host-side veth (tcx): NetworkPolicy for the pod.
//!
//! ```text
//!  pod ──► host veth  tc ingress  twill_pod_ingress  = the pod's egress   (source is the pod)
//!  pod ◄── host veth  tc egress   twill_pod_egress   = the pod's ingress  (destination is the pod)
//! ```
//!
//! Service translation happened before either sees a packet: east-west connections were
//! rewritten to the backend at `connect()` by the socket hooks, and north-south traffic was
//! translated on the node's device before being routed here. So a pod's egress is judged
//! against the backend it reaches, never a virtual IP, and a backend's ingress against the real
//! client (or, for externalTrafficPolicy=Cluster from another node, that node's address).
//!
//! A packet the pod sent must carry the pod's own address (`sav.rs`, source-address
//! validation) before anything else looks at it, in both families.
//!
//! IPv6 frames take `policy6.rs` (the same judgement over the IPv6 maps).
//!
//! A packet the pod sent that its egress policy passed is then routed by the fast path
//! (`fwd.rs`; IPv6: `fwd6.rs`): into a local pod (after that pod's ingress policy) or out
//! through the FIB's device, or left to the stack.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use twill_common::Reason;

use crate::{
    fwd,
    maps::count,
    pkt::{Flow, parse},
    policy::{CtSeen, Side, judge},
    sav,
};

// Each entry point only dispatches by family: the IPv4 and IPv6 paths are functions of their
// own (BPF-to-BPF calls, not inlined), because a call chain has 512 bytes of stack in all and
// each path needs about half of it (as `tc.rs`'s entry points).
#[classifier]
pub fn twill_pod_ingress(ctx: TcContext) -> i32 {
    if crate::nat6::is_ipv6(&ctx) {
        // Its source first, as for IPv4 (each a call of its own: see above).
        if sav::spoofed6(ctx.skb.skb) {
            return exit(Err(Reason::SourceSpoofed));
        }
        // IPv6 has its own path (`policy6`, then `fwd6`: one call after the other, so their
        // frames never stack up).
        return match crate::policy6::pod6(ctx.skb.skb, true) {
            TC_ACT_OK => crate::fwd6::from_pod(ctx.skb.skb),
            action => action,
        };
    }
    ipv4_pod_ingress(ctx.skb.skb)
}

#[inline(never)]
fn ipv4_pod_ingress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let packet = match parse(&ctx) {
        Ok(Some(p)) => p,
        // Not IPv4 (ARP): the stack.
        Ok(None) => return exit(Ok(Reason::PolicyNotEnforced)),
        Err(reason) => return exit(Err(reason)),
    };
    // Every IPv4 packet, later fragments included: the packet's own source, not the flow's
    // (an ICMP error's flow is the one it quotes).
    if let Err(reason) = sav::check(&ctx, packet.saddr) {
        return exit(Err(reason));
    }
    let flow = match Flow::of(&packet) {
        Ok(Some(flow)) => flow,
        // A later fragment: the stack.
        Ok(None) => return exit(Ok(Reason::PolicyNotEnforced)),
        Err(reason) => return exit(Err(reason)),
    };
    match judge(&flow, Side::Egress, CtSeen::Nothing) {
        // The lookups the egress judgement made serve the receiver's ingress judgement when
        // the fast path delivers into a local pod.
        Ok((reason, seen)) => {
            count(reason);
            fwd::from_pod(&ctx, &packet, &flow, seen)
        }
        Err(reason) => exit(Err(reason)),
    }
}

#[classifier]
pub fn twill_pod_egress(ctx: TcContext) -> i32 {
    if crate::nat6::is_ipv6(&ctx) {
        return crate::policy6::pod6(ctx.skb.skb, false);
    }
    ipv4_pod_egress(ctx.skb.skb)
}

#[inline(never)]
fn ipv4_pod_egress(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    exit(try_pod(&TcContext::new(skb), Side::Ingress))
}

/// The single exit: counts the verdict; errors drop the packet.
#[inline(always)]
fn exit(verdict: Result<Reason, Reason>) -> i32 {
    match verdict {
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

#[inline(always)]
fn try_pod(ctx: &TcContext, side: Side) -> Result<Reason, Reason> {
    let flow = match parse(ctx)? {
        Some(p) => Flow::of(&p)?,
        // Not IPv4 (ARP; IPv6 took `policy6`).
        None => None,
    };
    match flow {
        Some(flow) => judge(&flow, side, CtSeen::Nothing).map(|(reason, _)| reason),
        // Not IPv4, or a later fragment.
        None => Ok(Reason::PolicyNotEnforced),
    }
}
