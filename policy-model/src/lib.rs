//! The oracle of Twill's model-based NetworkPolicy tests (Cyclonus-style): a small model of the
//! networking.k8s.io/v1 API written directly from the API reference, and a generator of random
//! policies over a topology.
//!
//! The model reads the Kubernetes objects themselves and shares no code with the compiler in
//! `twill-core` (no identities, no tries, no parsed forms), so a misreading of the API has to be
//! made twice, independently, to go unnoticed. Two tests use it: the compiler's (`twill-core`
//! `tests/policy_model.rs`, against `PolicyState::verdict`) and the datapath's (`twill-lab`
//! `tests/netpol/random.rs`, against the reachability matrix probed through the kernel programs).
pub mod generate;
mod model;

pub use model::{ContainerPort, Member, Namespace, Pod, Topology};
