//! twill-agent: turns Services, EndpointSlices and Nodes into eBPF map contents and keeps the
//! kernel datapath programmed.
pub mod datapath;
pub mod lbmap;
pub mod compile;
pub mod reconcile;
pub mod routing;
pub mod api;
pub mod cniconf;
pub mod config;
pub mod debug_cli;
pub mod health;
pub mod metrics;
pub mod preflight;
pub mod run;
pub mod source;
