//! NetworkPolicy in the agent (design: `docs/design/policy.md`; the pure compiler is
//! `twill_core::policy`, the kernel side `proxy-ebpf/src/policy.rs` + `pod.rs`).
//!
//! ```text
//!  stores: Pods, Namespaces, NetworkPolicies (compact parsed forms)
//!    └─ PolicySyncer: compile (twill_core) ─► PolicyReconciler ─(PolicyMaps seam)─► maps
//!                                                         PolicyEndpoints, IpCache, Policy
//!  pod veths (links: dump + RTMGRP_LINK events) ─► Datapath::sync_pod_links (tcx, pinned)
//!  Ct policy-scope entries ─► the one conntrack collector (`crate::ctgc`)
//!  debug policy / explain ─► the compiled PolicyState (verdict replays the kernel's lookups)
//!  debug monitor ─► denied flows from the kernel's ring buffer (`monitor`)
//! ```
//!
//! Established connections: a flow allowed once is followed by its conntrack entry, so a policy
//! change that would now deny it does not cut it; it ends when it goes idle or closes (the
//! table's collector, `crate::ctgc`, expires policy entries by the same states as NAT ones). New connections are judged by the new rules within the run loop's apply latency.
pub mod explain;
pub mod links;
mod metrics;
pub mod monitor;
mod syncer;
pub mod task;

// The seam, its fake and fault injector, and the reconciler are pure (twill-core), beside the
// service maps' (`twill_core::lbmap`, `twill_core::reconcile`); the agent's paths stay.
pub use twill_core::policy::PolicyEntries;
pub use twill_core::policymap::{FakePolicyMaps, FaultyPolicyMaps, PolicyMaps};
pub use twill_core::reconcile::policy::{PolicyApplyStats, PolicyReconcileError, PolicyReconciler};

pub use self::{
    metrics::PolicyMetrics,
    syncer::{PolicySyncer, node_addresses},
};

#[cfg(test)]
mod tests;
