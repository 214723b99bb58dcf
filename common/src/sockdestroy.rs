//! What the socket iterator that destroys stale connected UDP sockets shares with the agent
//! (its map, `SOCK_DESTROY`, is in the [catalogue](crate::catalogue)).
//!
//! ```text
//!  SOCK_DESTROY (backend addr, port) ──► 1: the agent fills it with the UDP backends just
//!  removed, runs the `iter/udp` program in each network namespace, then empties it
//! ```

/// Key of `SOCK_DESTROY`: a removed UDP backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockDestroyKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockDestroyKey>() == 8);

/// The iterator calls the `bpf_sock_destroy` kfunc (kernel >= 6.5) through this number, emitted
/// as an ordinary helper call (`call imm`, `src_reg` 0). A kfunc call needs `src_reg`
/// `BPF_PSEUDO_KFUNC_CALL` and the function's id in the running kernel's BTF as `imm`, which only
/// the loader can know; aya 0.14 does not resolve kfunc externs (its ksym support is unreleased),
/// so the agent rewrites these instructions itself before loading. No helper has this number
/// (helper ids are below 300), so an unpatched program is refused by the verifier, never
/// mis-called.
pub const KFUNC_PLACEHOLDER_SOCK_DESTROY: u32 = 0x7457_0001;

/// Name of the `iter/udp` program in the object.
pub const PROG_UDP_SOCK_DESTROY: &str = "twill_udp_destroy";

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, explicit padding, no invalid bit patterns.
unsafe impl aya::Pod for SockDestroyKey {}
