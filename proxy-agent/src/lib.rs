//! twill-agent: turns Services, EndpointSlices and Nodes into eBPF map contents and keeps the
//! kernel datapath programmed.
pub mod datapath;
pub mod lbmap;
