//! twill-agent: turns Services, EndpointSlices and Nodes (and Pods, Namespaces and
//! NetworkPolicies) into eBPF map contents and keeps the kernel datapath programmed.
pub mod api;
pub mod cniconf;
pub mod compile;
pub mod config;
pub mod datapath;
pub mod debug_cli;
pub mod health;
pub mod lbmap;
pub mod metrics;
pub mod node_net;
pub mod policy;
pub mod preflight;
pub mod reconcile;
pub mod routing;
pub mod run;
pub mod source;
