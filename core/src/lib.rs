//! twill-core: the pure part of Twill's control plane. Kubernetes objects and the agent's
//! config in, desired datapath state out, and the reconciler that converges the kernel's maps to
//! it through the narrow [`lbmap::LbMaps`] seam. No I/O and no aya: it builds and its tests run
//! without the eBPF toolchain or root.
//!
//! - [`compile`]: Services, EndpointSlices and Nodes → `LbState` (the service maps' contents).
//! - [`policy`]: Pods, Namespaces and NetworkPolicies → `PolicyState` (the policy maps' contents).
//! - [`dns`]: the same Services and EndpointSlices → the cluster's DNS names.
//! - [`family`]: the IPv4/IPv6 twins of frontend and backend entries.
//! - [`maglev`]: the per-packet path's consistent-hashing table of a backend set.
//! - [`reconcile`]: `LbState` → kernel maps through [`lbmap::LbMaps`]; [`reconcile::policy`]:
//!   the policy maps' contents ([`policy::PolicyEntries`]) → kernel maps through
//!   [`policymap::PolicyMaps`].
//! - [`routing`]: the route plan and the masquerade ruleset.
pub mod compile;
pub mod dns;
pub mod family;
pub mod lbmap;
pub mod maglev;
pub mod policy;
pub mod policymap;
pub mod reconcile;
pub mod routing;
