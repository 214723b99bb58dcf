//! The denied-flow event stream (`twill-agent debug monitor`): one event per dropped packet into
//! the ring buffer, within a per-CPU budget per second so a flood of denied packets (a port scan,
//! a client retrying) costs a counter increment, not ring-buffer traffic. Events over the budget
//! or into a full buffer are counted in the budget entry (`EventBudget::lost`), which the agent
//! reads and reports. Both families write the one event type (`PolicyDenyEvent`, a family tag
//! and 16-byte addresses), reserved in the ring buffer and filled in place, so the event never
//! takes room on either path's stack.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use twill_common::{
    EVENT_FAMILY_IPV4, EVENT_FAMILY_IPV6, POLICY_EVENTS_PER_CPU_SECOND, PolicyDenyEvent, Reason,
};

use crate::{
    maps::{TWL_PEV_V1, TWL_PEVB_V1},
    pkt::Flow,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Events per CPU and second (`twill_common::GLOBAL_MONITOR_RATE`): a read-only global the agent
/// sets at load time (`--monitor-rate`); the verifier sees its value as a constant.
#[unsafe(no_mangle)]
static TWL_MONITOR_RATE: u32 = POLICY_EVENTS_PER_CPU_SECOND;

/// What a denied packet's event says besides its addresses.
pub struct Denial {
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub reason: Reason,
    /// The local endpoint's id and the peer's identity.
    pub ep_id: u32,
    pub peer: u32,
}

/// Reports that the IPv4 `flow` was dropped on `direction` of local endpoint `ep_id` (peer
/// identity `peer`) for `reason`.
#[inline(always)]
pub fn denied(flow: &Flow, direction: u8, reason: Reason, ep_id: u32, peer: u32) {
    let d = Denial {
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction,
        reason,
        ep_id,
        peer,
    };
    emit(
        EVENT_FAMILY_IPV4,
        &[flow.saddr, 0, 0, 0],
        &[flow.daddr, 0, 0, 0],
        &d,
    );
}

/// The IPv6 twin of [`denied`]: addresses in the maps' word form.
#[inline(always)]
pub fn denied6(saddr: &[u32; 4], daddr: &[u32; 4], d: &Denial) {
    emit(EVENT_FAMILY_IPV6, saddr, daddr, d);
}

/// One event, if this CPU's budget for the current second allows it.
#[inline(always)]
fn emit(family: u8, saddr: &[u32; 4], daddr: &[u32; 4], d: &Denial) {
    let Some(budget) = TWL_PEVB_V1.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let second = now / NS_PER_SEC;
    // SAFETY: this CPU's slot; no other writer while the program runs on this CPU (tc programs
    // are not preempted by another program on the same CPU for the same slot).
    unsafe {
        if (*budget).second != second {
            (*budget).second = second;
            (*budget).used = 0;
        }
        // Volatile: the compiler must not fold the default in; the loader rewrites it.
        if (*budget).used >= core::ptr::read_volatile(&raw const TWL_MONITOR_RATE) {
            (*budget).lost += 1;
            return;
        }
        (*budget).used += 1;
    }
    let Some(mut entry) = TWL_PEV_V1.reserve::<PolicyDenyEvent>(0) else {
        // The buffer is full: the agent is behind.
        // SAFETY: as above.
        unsafe { (*budget).lost += 1 };
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at the reserved record, exactly one `PolicyDenyEvent`; every field is
    // written before the record is submitted.
    unsafe {
        (*ev).ktime_ns = now;
        (*ev).saddr_be = *saddr;
        (*ev).daddr_be = *daddr;
        (*ev).sport_be = d.sport;
        (*ev).dport_be = d.dport;
        (*ev).proto = d.proto;
        (*ev).reason = d.reason as u8;
        (*ev).direction = d.direction;
        (*ev).family = family;
        (*ev).ep_id = d.ep_id;
        (*ev).peer_identity = d.peer;
    }
    entry.submit(0);
}
