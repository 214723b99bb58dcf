//! `iter/udp`: destroys the connected UDP sockets this datapath aimed at a removed backend.
//!
//! Socket-level load balancing rewrites a connected UDP socket's peer once, at `connect()`; its
//! datagrams then go straight to the backend, so removing the backend from the maps does not move
//! it (kubernetes #19029). The agent lists the removed backends in `SOCK_DESTROY` and runs this
//! iterator; each connected UDP socket whose peer is one of them *and* whose (cookie, peer) is in
//! `SOCK_REVNAT` (so this datapath translated it: a pod talking to a backend's address directly,
//! or a socket of another Twill instance, is left alone) is destroyed with the `bpf_sock_destroy`
//! kfunc. The application gets `ECONNABORTED` on its next call and reconnects, which balances it
//! afresh. The cookie of every destroyed socket is written to the iterator's output, so the agent
//! counts them.
//!
//! A socket iterator sees the sockets of the network namespace the agent created the iterator in
//! (`seq_sk_match` in net/ipv4/udp.c), so the agent creates one per pod namespace.
//! bpf_iter_udp_seq_show holds the socket lock while this runs, which `bpf_sock_destroy`
//! requires (`udp_abort` skips locking when called from BPF).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::seq_file,
    helpers::generated::{bpf_get_socket_cookie, bpf_seq_write},
};
use twill_common::{KFUNC_PLACEHOLDER_SOCK_DESTROY, SockDestroyKey, SockRevNatKey};

use crate::maps::{TWL_SKDEST_V1, TWL_SKRNAT_V1};

/// `struct bpf_iter_meta` (include/linux/bpf.h): only `seq` is read.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
}

/// `struct bpf_iter__udp` (net/ipv4/udp.c); the kernel checks every context access against it.
#[repr(C)]
struct IterUdp {
    meta: *const IterMeta,
    /// NULL once, at the end of the walk.
    udp_sk: *const u8,
}

// Offsets in `struct sock_common`, the first member of every socket (include/net/sock.h,
// https://elixir.bootlin.com/linux/v6.5/source/include/net/sock.h#L150). These lead the struct
// unconditionally (no config option moves them) and have since 2.6.3x; the verifier checks every
// load against the kernel's BTF.
/// `skc_daddr`: the IPv4 peer. An AF_INET6 socket connected to a v4-mapped address has it too
/// (`__ip6_datagram_connect` goes through `__ip4_datagram_connect`); one connected to a real IPv6
/// address has `LOOPBACK4_IPV6` (127.0.0.6) here, which is never a backend.
const SKC_DADDR: usize = 0;
/// `skc_dport`, network order.
const SKC_DPORT: usize = 12;
/// `skc_state`: a connected UDP socket is `TCP_ESTABLISHED`.
const SKC_STATE: usize = 18;
const TCP_ESTABLISHED: u8 = 1;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub extern "C" fn twill_udp_destroy(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a `struct bpf_iter__udp`; the verifier checks each access.
    unsafe { try_destroy(ctx.cast::<IterUdp>()) };
    // An iterator program must return 0 (1 would retry the same element forever).
    0
}

#[inline(always)]
unsafe fn try_destroy(ctx: *const IterUdp) {
    // SAFETY: context access checked by the verifier (8-byte load of a pointer field).
    let sk = unsafe { (*ctx).udp_sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is a trusted BTF pointer; these loads are checked against its type.
    let (daddr_be, dport_be, state) = unsafe {
        (
            sk.add(SKC_DADDR).cast::<u32>().read(),
            sk.add(SKC_DPORT).cast::<u16>().read(),
            sk.add(SKC_STATE).read(),
        )
    };
    if state != TCP_ESTABLISHED {
        return;
    }
    let doomed = SockDestroyKey {
        addr_be: daddr_be,
        port_be: dport_be,
        _pad: 0,
    };
    // SAFETY: map lookups with keys on this stack.
    if unsafe { TWL_SKDEST_V1.get(&doomed) }.is_none() {
        return;
    }
    // SAFETY: the tracing variant of the helper takes any socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast_mut().cast()) };
    let ours = SockRevNatKey {
        cookie,
        backend_addr_be: daddr_be,
        backend_port_be: dport_be,
        _pad: 0,
    };
    // SAFETY: as above.
    if unsafe { TWL_SKRNAT_V1.get(&ours) }.is_none() {
        return;
    }
    // SAFETY: a call to a fixed number, as aya-ebpf calls helpers; the agent turns it into the
    // kfunc call before loading (see `KFUNC_PLACEHOLDER_SOCK_DESTROY`).
    let sock_destroy: unsafe extern "C" fn(*const u8) -> i32 =
        unsafe { core::mem::transmute(KFUNC_PLACEHOLDER_SOCK_DESTROY as usize) };
    // SAFETY: `sk` is the iterator's locked socket, as the kfunc requires.
    if unsafe { sock_destroy(sk) } == 0 {
        // SAFETY: `meta` and its `seq` are trusted pointers of the iterator context.
        unsafe {
            let seq = (*(*ctx).meta).seq;
            bpf_seq_write(seq, (&raw const cookie).cast(), 8);
        }
    }
}
