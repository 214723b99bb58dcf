//! Library side of the kernel crate: empty on purpose. It exists so `twill-agent` can declare a
//! build-dependency on this crate (cargo then rebuilds the agent when the kernel crate's inputs
//! change); the programs are the `twill` binary target.
#![no_std]
