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
mod maps;
mod metrics;
pub mod monitor;
mod reconcile;
mod syncer;
pub mod task;

/// The exact contents of the three policy maps (the compiler's output, the seam's unit).
pub use twill_core::policy::PolicyMaps as PolicyEntries;

pub use self::{
    maps::{FakePolicyMaps, FaultyPolicyMaps, PolicyMaps},
    metrics::PolicyMetrics,
    reconcile::{PolicyApplyStats, PolicyReconcileError, PolicyReconciler},
    syncer::{PolicySyncer, node_addresses},
};

#[cfg(test)]
mod tests;
