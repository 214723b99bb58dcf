//! The denied-flow event stream (`twill-agent debug monitor`): one event per dropped packet into
//! the ring buffer, within a per-CPU budget per second so a flood of denied packets (a port scan,
//! a client retrying) costs a counter increment, not ring-buffer traffic. Events over the budget
//! or into a full buffer are counted in the budget entry (`EventBudget::lost`), which the agent
//! reads and reports.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use twill_common::{POLICY_EVENTS_PER_CPU_SECOND, PolicyDenyEvent, Reason};

use crate::{
    maps::{TWL_PEV_V1, TWL_PEVB_V1},
    pkt::Flow,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Events per CPU and second (`twill_common::GLOBAL_MONITOR_RATE`): a read-only global the agent
/// sets at load time (`--monitor-rate`); the verifier sees its value as a constant.
#[unsafe(no_mangle)]
static TWL_MONITOR_RATE: u32 = POLICY_EVENTS_PER_CPU_SECOND;

/// Reports that `flow` was dropped on `direction` of local endpoint `ep_id` (peer identity
/// `peer`) for `reason`.
#[inline(always)]
pub fn denied(flow: &Flow, direction: u8, reason: Reason, ep_id: u32, peer: u32) {
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
    let event = PolicyDenyEvent {
        ktime_ns: now,
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        sport_be: flow.sport,
        dport_be: flow.dport,
        proto: flow.proto,
        reason: reason as u8,
        direction,
        _pad: 0,
        ep_id,
        peer_identity: peer,
    };
    if TWL_PEV_V1.output::<PolicyDenyEvent>(&event, 0).is_err() {
        // SAFETY: as above.
        unsafe { (*budget).lost += 1 };
    }
}
