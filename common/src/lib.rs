//! The one definition of every type shared between Twill's kernel programs (`proxy-ebpf`) and
//! user space (`twill-agent`, the debug CLI, tests).
//!
//! Layout rules (see `HOUSE_STYLE.md` §1–3): every map key/value is `#[repr(C)]`, `Copy`, has
//! named padding, carries byte order in field names (`_be` = network byte order), and has a
//! compile-time size assertion. Every map is described once, in [`catalogue`]: its module doc says
//! how to add one.
#![no_std]

pub mod catalogue;
pub mod ct6;
pub mod fastpath;
pub mod maps;
pub mod policy;
pub mod reason;
pub mod sockdestroy;

pub use catalogue::*;
pub use ct6::*;
pub use fastpath::*;
pub use maps::*;
pub use policy::*;
pub use reason::Reason;
pub use sockdestroy::*;
