//! twill-agent: turns Services, EndpointSlices and Nodes (and Pods, Namespaces and
//! NetworkPolicies) into eBPF map contents and keeps the kernel datapath programmed.
// The pure compiler, the map seam with its fakes and the reconciler live in twill-core; the
// agent's paths (`twill_agent::compile`, …) stay as they were.
pub use twill_core::{compile, lbmap, reconcile};

pub mod api;
pub mod cniconf;
pub mod config;
pub mod ctgc;
pub mod ctview;
pub mod datapath;
pub mod debug_cli;
pub mod dns;
pub mod fastpath;
pub mod health;
pub mod metrics;
pub mod node_net;
pub mod policy;
pub mod preflight;
pub mod routing;
pub mod run;
pub mod source;
pub mod uninstall;
