//! Twill's pure compilers: Kubernetes objects in, the exact contents of the datapath's maps out.
//! No I/O, no aya: everything here is unit-testable without a kernel (`HOUSE_STYLE` §5).

pub mod policy;
