//! `twill-cni`: a CNI 1.1 plugin that gives each pod a routed veth (no bridge, no
//! NAT) and an address from the node's pod CIDR. See `README.md` for the design.
//!
//! The whole plugin runs in-process through [`run`] with injected environment,
//! stdin and stdout; the binary only wires the real process streams to it.

pub mod check;
pub mod commands;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod env;
pub mod ipam;
pub mod logger;
pub mod netlink;
pub mod result;
pub mod version;

#[cfg(test)]
mod tests;

pub use commands::{CniError, run};
