//! Source-address validation on a pod's veth: a packet the pod sends must carry the pod's own
//! IPv4 address as its source, or it is dropped (`Reason::SourceSpoofed`) before policy,
//! conntrack or routing see it — otherwise a pod could pass as another to a NetworkPolicy (its
//! identity is its address), to a Service backend, or reset another pod's connections.
//!
//! ```text
//!  LOCAL_ENDPOINTS[saddr].ifindex == this veth  ─► own address (one hash lookup, the usual case)
//!  otherwise: FIB lookup of saddr from this veth (the node's own reverse-path check)
//!     route out through this veth             ─► own address (an endpoint the agent has not
//!                                                 written yet, or a stale entry of a reused IP)
//!     another device, a local address, no route ─► spoofed: dropped
//!     lookup impossible (forwarding off)     ─► passed, as the stack would judge it
//! ```
//!
//! The route decides, not the agent's map: twill-cni installs the host route to a pod's address
//! through its veth before the pod runs, so a pod's first packets are never mistaken, whatever
//! the agent has written so far. Non-IPv4 frames (ARP, IPv6) are not checked here.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use twill_common::Reason;

use crate::maps::TWL_LXC_V1;

const AF_INET: u8 = 2;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 bytes"
)]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;

/// `Ok` when `saddr` is the address of the pod behind the veth the packet arrived on.
#[inline(always)]
pub fn check(ctx: &TcContext, saddr: u32) -> Result<(), Reason> {
    // SAFETY: reading the skb's ifindex from our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is read before the next helper call.
    if unsafe { TWL_LXC_V1.get(&saddr) }.is_some_and(|ep| ep.ifindex == ifindex) {
        return Ok(());
    }
    // SAFETY: bpf_fib_lookup is plain old data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_4.ipv4_dst = saddr;
    params.ifindex = ifindex;
    // SAFETY: params is a valid, writable struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
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
