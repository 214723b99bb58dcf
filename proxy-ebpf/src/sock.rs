//! Socket-level load balancing on the cgroup-v2 `sock_addr` hooks. The destination of a
//! `connect()` (TCP, connected UDP) or of an unconnected UDP `sendto()` to a Service frontend is
//! rewritten to a backend before any packet exists, so east-west traffic needs no per-packet NAT.
//! `recvmsg4` and `getpeername4` translate the backend back to the frontend the application asked
//! for, so it only ever sees the ClusterIP (DNS clients check the reply's source).
//!
//! ```text
//!  connect4 / sendmsg4:  (dst addr, port, proto) ─► SERVICES (INTERNAL, then ANY scope;
//!                        NodePort `addr 0` when dst is a node address or loopback)
//!                        ─► affinity? ─► BACKEND_SLOTS[rand % count] ─► BACKENDS
//!                        ─► rewrite dst, remember (socket cookie, backend) ─► frontend
//!  recvmsg4 / getpeername4: (socket cookie, peer) ─► SOCK_REVNAT ─► rewrite peer to frontend
//! ```
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use twill_common::{Reason, SCOPE_INTERNAL, SockRevNatKey, SockRevNatValue};

use crate::{
    lb::{is_node_addr, lookup_service, select_backend},
    maps::{TWL_SKRNAT_V1, count},
};

/// `sock_addr` program return values: 1 lets the call proceed; 0 fails it with the errno set by
/// `bpf_set_retval`, or EPERM when none was set (kernel `bpf_prog_run_array_cg`).
const SOCK_ALLOW: i32 = 1;
const SOCK_REJECT: i32 = 0;
/// connect()/sendmsg() to a Service without usable backends fails with ECONNREFUSED at once, as
/// kube-proxy's REJECT rule does, instead of timing out. `bpf_set_retval` is available to
/// cgroup `sock_addr` programs since Linux 5.19.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn twill_connect4(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate(&ctx))
}

/// Unconnected UDP `sendto()`/`sendmsg()` with a destination (the DNS client pattern). Runs on
/// every call, so each datagram is balanced afresh and a removed backend is never used again.
#[cgroup_sock_addr(sendmsg4)]
pub fn twill_sendmsg4(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate(&ctx))
}

/// UDP `recvmsg()`/`recvfrom()`: show the frontend as the datagram's source.
#[cgroup_sock_addr(recvmsg4)]
pub fn twill_recvmsg4(ctx: SockAddrContext) -> i32 {
    count(rev_translate(&ctx));
    // recvmsg programs must return 1; the kernel rejects any other value at load time.
    SOCK_ALLOW
}

/// `getpeername()`: show the frontend as the peer of a connected socket.
#[cgroup_sock_addr(getpeername4)]
pub fn twill_getpeername4(ctx: SockAddrContext) -> i32 {
    count(rev_translate(&ctx));
    SOCK_ALLOW
}

/// The single exit of the translating hooks: counts the verdict and refuses on error.
#[inline(always)]
fn exit_translate(verdict: Result<Reason, Reason>) -> i32 {
    match verdict {
        Ok(reason) => {
            count(reason);
            SOCK_ALLOW
        }
        Err(reason) => {
            count(reason);
            // SAFETY: helper with a plain integer argument; fails only outside cgroup programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SOCK_REJECT
        }
    }
}

/// NodePort frontends answer inside the node on its own addresses and on loopback 127.0.0.0/8.
#[inline(always)]
fn is_node_local(addr_be: u32) -> bool {
    // The first octet of a network-order address is its lowest byte in memory.
    addr_be.to_ne_bytes()[0] == 127 || is_node_addr(addr_be)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens u16 port and u8 protocol to u32 fields (kernel ABI)"
)]
fn try_translate(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr_be = sa.user_ip4;
    // user_port holds the port in network order in its low 16 bits.
    let port_be = sa.user_port as u16;
    let proto = sa.protocol as u8;

    let Some(svc) = lookup_service(addr_be, port_be, proto, SCOPE_INTERNAL, is_node_local) else {
        return Ok(Reason::NotService);
    };
    // sessionAffinity on the socket path: the client is the socket's network namespace (one per
    // pod; the host's for node processes), standing in for kube-proxy's client IP.
    // SAFETY: ctx is the program's own context pointer.
    let client_id = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // No usable backend (Err): refused. kube-proxy drops instead of rejecting only for traffic
    // arriving from outside; inside the node a Local policy without local endpoints is refused
    // too, counted apart (NoLocalBackend).
    let (backend, reason) = select_backend(&svc, client_id)?;

    sa.user_ip4 = backend.addr_be;
    sa.user_port = u32::from(backend.port_be);

    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        _pad: 0,
    };
    let value = SockRevNatValue {
        frontend_addr_be: addr_be,
        frontend_port_be: port_be,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    if TWL_SKRNAT_V1.insert(key, value, 0).is_err() {
        // Traffic still flows; only the application sees the backend address as its peer.
        count(Reason::RevNatMapFull);
    }
    Ok(reason)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens the u16 port to a u32 field (kernel ABI)"
)]
fn rev_translate(ctx: &SockAddrContext) -> Reason {
    // SAFETY: as in try_translate.
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        backend_addr_be: sa.user_ip4,
        backend_port_be: sa.user_port as u16,
        _pad: 0,
    };
    match unsafe { TWL_SKRNAT_V1.get(key) } {
        Some(v) => {
            sa.user_ip4 = v.frontend_addr_be;
            sa.user_port = u32::from(v.frontend_port_be);
            Reason::RevNatApplied
        }
        None => Reason::NotService,
    }
}
