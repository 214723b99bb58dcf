//! The one definition of every type shared between Twill's kernel programs (`proxy-ebpf`) and
//! user space (`twill-agent`, the debug CLI, tests).
//!
//! Layout rules (see `HOUSE_STYLE.md` §1–3): every map key/value is `#[repr(C)]`, `Copy`, has
//! named padding, carries byte order in field names (`_be` = network byte order), and has a
//! compile-time size assertion. Pinned map names carry a `_V1` suffix: a layout change bumps the
//! suffix so a restarted agent never reinterprets old bytes.
#![no_std]

pub mod fastpath;
pub mod maps;
pub mod policy;
pub mod reason;

pub use fastpath::*;
pub use maps::*;
pub use policy::*;
pub use reason::Reason;
