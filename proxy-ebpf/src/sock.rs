//! Socket-level load balancing on the cgroup-v2 `sock_addr` hooks. The destination of a
//! `connect()` (TCP, connected UDP) or of an unconnected UDP `sendto()` to a Service frontend is
//! rewritten to a backend before any packet exists, so east-west traffic needs no per-packet NAT.
//! `recvmsg` and `getpeername` translate the backend back to the frontend the application asked
//! for, so it only ever sees the ClusterIP (DNS clients check the reply's source).
//!
//! ```text
//!  connect / sendmsg:  (dst addr, port, proto) ─► SERVICES (INTERNAL, then ANY scope;
//!                      NodePort `addr 0` when dst is a node address, or loopback from the
//!                      node's own network namespace)
//!                      ─► affinity? / UDP flow (sendmsg) ─► BACKEND_SLOTS[rand % count]
//!                      ─► BACKENDS ─► rewrite dst, remember (socket cookie, backend) ─► frontend
//!  recvmsg / getpeername: (socket cookie, peer) ─► SOCK_REVNAT ─► rewrite peer to frontend
//! ```
//!
//! Every hook exists twice. The IPv6 ones serve two kinds of destination:
//! - IPv4-mapped addresses (`::ffff:a.b.c.d`) of AF_INET6 sockets, the default of the JVM and of
//!   .NET's dual-mode sockets: the kernel hands such a `connect()` to the IPv4 stack only after
//!   the IPv6 hook ran (`tcp_v6_connect`, `ip6_datagram_connect`), so without them the ClusterIP
//!   escapes untranslated. They run the IPv4 body on the mapped address (`V4`/`V6` say where it
//!   lives in the `bpf_sock_addr`).
//! - real IPv6 Service frontends (dual-stack and IPv6-only Services): the same steps with the
//!   IPv6 twins of the tables (`SERVICES6`, `BACKENDS6`, `SOCK_REVNAT6`); slots, affinity and
//!   UDP flows are shared, keyed by the frontend's `svc_id` (docs/design/dualstack.md); an
//!   IPv6 NodePort answers on the node's IPv6 NodePort addresses (`NODE_ADDRS6`) and on `[::1]`
//!   in the node's own namespace, as IPv4's.
//!
//! Other IPv6 destinations pass untouched (`NotV4Mapped`).
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use twill_common::{
    Reason, SCOPE_INTERNAL, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6,
};

use crate::{
    lb::{
        V4 as Be4, V6 as Be6, is_node_addr, is_node_addr6, lookup_scoped, lookup_scoped6,
        lookup_service, select_backend, select_udp_flow_backend,
    },
    maps::{TWL_CFG_V2, TWL_SKRNAT_V1, TWL_SKRNAT6_V1, count},
};

/// `sock_addr` program return values: 1 lets the call proceed; 0 fails it with the errno set by
/// `bpf_set_retval`, or EPERM when none was set (kernel `bpf_prog_run_array_cg`).
const SOCK_ALLOW: i32 = 1;
const SOCK_REJECT: i32 = 0;
/// connect()/sendmsg() to a Service without usable backends fails with ECONNREFUSED at once, as
/// kube-proxy's REJECT rule does, instead of timing out. `bpf_set_retval` is available to
/// cgroup `sock_addr` programs since Linux 5.19.
const ECONNREFUSED: i32 = 111;

/// Which address fields of the `bpf_sock_addr` a hook uses. The verifier lets each attach type
/// touch only its own family's fields (`sock_addr_is_valid_access`), so this is a const generic
/// parameter: the other family's accesses are compiled out of each program.
const V4: bool = false;
const V6: bool = true;

/// The IPv4 address in a hook's address fields: `user_ip4`, or the low 32 bits of an IPv4-mapped
/// `user_ip6` (`::ffff:0:0/96`, RFC 4291 §2.5.5.2). `None`: a real IPv6 address.
#[inline(always)]
fn ipv4_of<const FAMILY: bool>(sa: &bpf_sock_addr) -> Option<u32> {
    if FAMILY == V6 {
        // Network order: 0000:0000 0000:0000 0000:ffff a.b.c.d
        (sa.user_ip6[0] == 0 && sa.user_ip6[1] == 0 && sa.user_ip6[2] == 0xffff_u32.to_be())
            .then_some(sa.user_ip6[3])
    } else {
        Some(sa.user_ip4)
    }
}

/// The IPv6 address of an IPv6 hook (`user_ip6`, network order). Read word by word: the
/// verifier takes 4-byte (or aligned 8-byte) accesses to `user_ip6` only
/// (`sock_addr_is_valid_access`), and volatile reads keep LLVM from merging them otherwise.
#[inline(always)]
fn ipv6_of(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: reads of the program's own context fields.
    unsafe {
        [
            core::ptr::read_volatile(&raw const sa.user_ip6[0]),
            core::ptr::read_volatile(&raw const sa.user_ip6[1]),
            core::ptr::read_volatile(&raw const sa.user_ip6[2]),
            core::ptr::read_volatile(&raw const sa.user_ip6[3]),
        ]
    }
}

/// Writes an IPv6 address into `user_ip6`, one 4-byte store per word (see [`ipv6_of`]).
#[inline(always)]
fn set_ipv6(sa: &mut bpf_sock_addr, addr_be: [u32; 4]) {
    // SAFETY: writes of the program's own context fields, which sock_addr programs may write.
    unsafe {
        core::ptr::write_volatile(&raw mut sa.user_ip6[0], addr_be[0]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[1], addr_be[1]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[2], addr_be[2]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[3], addr_be[3]);
    }
}

/// Writes an IPv4 address back where [`ipv4_of`] found one (the mapped prefix stays).
#[inline(always)]
fn set_ipv4<const FAMILY: bool>(sa: &mut bpf_sock_addr, addr_be: u32) {
    if FAMILY == V6 {
        sa.user_ip6[3] = addr_be;
    } else {
        sa.user_ip4 = addr_be;
    }
}

#[cgroup_sock_addr(connect4)]
pub fn twill_connect4(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate::<V4>(&ctx, Datagrams::Connected))
}

#[cgroup_sock_addr(connect6)]
pub fn twill_connect6(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate::<V6>(&ctx, Datagrams::Connected))
}

/// Unconnected UDP `sendto()`/`sendmsg()` with a destination (the DNS client pattern). Runs on
/// every call; the socket's datagrams to one frontend stay on one backend (a UDP flow) while it
/// is in the Service and the flow is not idle.
#[cgroup_sock_addr(sendmsg4)]
pub fn twill_sendmsg4(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate::<V4>(&ctx, Datagrams::Flow))
}

/// As sendmsg4. Current kernels divert a v4-mapped destination to `udp_sendmsg` (and so to
/// sendmsg4) before this hook runs (`udpv6_sendmsg`); it is attached so no kernel lets a mapped
/// ClusterIP through untranslated.
#[cgroup_sock_addr(sendmsg6)]
pub fn twill_sendmsg6(ctx: SockAddrContext) -> i32 {
    exit_translate(try_translate::<V6>(&ctx, Datagrams::Flow))
}

/// UDP `recvmsg()`/`recvfrom()`: show the frontend as the datagram's source.
#[cgroup_sock_addr(recvmsg4)]
pub fn twill_recvmsg4(ctx: SockAddrContext) -> i32 {
    count(rev_translate::<V4>(&ctx));
    // recvmsg programs must return 1; the kernel rejects any other value at load time.
    SOCK_ALLOW
}

/// As recvmsg4, for an AF_INET6 socket receiving from an IPv4 peer (`::ffff:backend`).
#[cgroup_sock_addr(recvmsg6)]
pub fn twill_recvmsg6(ctx: SockAddrContext) -> i32 {
    count(rev_translate::<V6>(&ctx));
    SOCK_ALLOW
}

/// `getpeername()`: show the frontend as the peer of a connected socket.
#[cgroup_sock_addr(getpeername4)]
pub fn twill_getpeername4(ctx: SockAddrContext) -> i32 {
    count(rev_translate::<V4>(&ctx));
    SOCK_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn twill_getpeername6(ctx: SockAddrContext) -> i32 {
    count(rev_translate::<V6>(&ctx));
    SOCK_ALLOW
}

/// How the backend of a translated call is chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Datagrams {
    /// connect(): once per socket (TCP, connected UDP).
    Connected,
    /// sendmsg() without connect(): per datagram, sticky per (socket, frontend) flow.
    Flow,
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

/// Whether a network-order address is in 127.0.0.0/8.
#[inline(always)]
fn is_loopback(addr_be: u32) -> bool {
    // The first octet of a network-order address is its lowest byte in memory.
    addr_be.to_ne_bytes()[0] == 127
}

/// The node's own network namespace, as the agent wrote it (0 = not known yet).
#[inline(always)]
fn host_netns_cookie() -> u64 {
    TWL_CFG_V2.get(0).map_or(0, |c| c.host_netns_cookie)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens u16 port and u8 protocol to u32 fields (kernel ABI)"
)]
fn try_translate<const FAMILY: bool>(
    ctx: &SockAddrContext,
    datagrams: Datagrams,
) -> Result<Reason, Reason> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(addr_be) = ipv4_of::<FAMILY>(sa) else {
        // Only an IPv6 hook gets here; the condition keeps `user_ip6` out of the IPv4 programs
        // whatever the optimiser does (the verifier rejects it there).
        return if FAMILY == V6 {
            try_translate6(ctx, datagrams)
        } else {
            Ok(Reason::NotV4Mapped)
        };
    };
    // user_port holds the port in network order in its low 16 bits.
    let port_be = sa.user_port as u16;
    let proto = sa.protocol as u8;

    // The socket's network namespace: one per pod, the host's for node processes. Read only
    // when needed, so connections to non-Service addresses cost what they did before.
    // SAFETY: ctx is the program's own context pointer.
    let netns = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let in_host_netns = || {
        let host = host_netns_cookie();
        host != 0 && netns() == host
    };
    // NodePort answers inside the node on its own addresses, from pods too (kube-proxy does the
    // same), and on loopback only in the node's namespace: a pod's 127.0.0.1 is the pod itself.
    let nodeport_ok = |a: u32| {
        if is_loopback(a) {
            in_host_netns()
        } else {
            is_node_addr(a)
        }
    };
    let Some(svc) = lookup_service(addr_be, port_be, proto, SCOPE_INTERNAL, nodeport_ok) else {
        if is_loopback(addr_be)
            && lookup_scoped(0, port_be, proto, SCOPE_INTERNAL).is_some()
            && !in_host_netns()
        {
            return Ok(Reason::LoopbackNotHostNetns);
        }
        return Ok(Reason::NotService);
    };
    let netns = netns();
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // sessionAffinity on the socket path: the client is the socket's network namespace, standing
    // in for kube-proxy's client IP. No usable backend (Err): refused. kube-proxy drops instead
    // of rejecting only for traffic arriving from outside; inside the node a Local policy
    // without local endpoints is refused too, counted apart (NoLocalBackend).
    let (backend, reason) = match datagrams {
        Datagrams::Connected => select_backend::<Be4>(&svc, netns)?,
        Datagrams::Flow => select_udp_flow_backend::<Be4>(&svc, netns, cookie)?,
    };

    set_ipv4::<FAMILY>(sa, backend.addr_be);
    sa.user_port = u32::from(backend.port_be);

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

/// Whether an IPv6 address (`user_ip6` words) is `::1`.
#[inline(always)]
fn is_loopback6(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

/// [`try_translate`] for a real IPv6 destination of an IPv6 hook: an IPv6 ClusterIP, External
/// IP or LoadBalancer IP by its address; an IPv6 NodePort on one of the node's IPv6 NodePort
/// addresses (from pods too), or on `[::1]` in the node's own namespace only, as IPv4's.
#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens u16 port and u8 protocol to u32 fields (kernel ABI)"
)]
#[inline(always)]
fn try_translate6(ctx: &SockAddrContext, datagrams: Datagrams) -> Result<Reason, Reason> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr_be = ipv6_of(sa);
    let port_be = sa.user_port as u16;
    let proto = sa.protocol as u8;
    // SAFETY: ctx is the program's own context pointer.
    let netns = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let in_host_netns = || {
        let host = host_netns_cookie();
        host != 0 && netns() == host
    };
    let svc = match lookup_scoped6(addr_be, port_be, proto, SCOPE_INTERNAL) {
        Some(svc) => svc,
        None => {
            let loopback = is_loopback6(&addr_be);
            if !loopback && !is_node_addr6(&addr_be) {
                return Ok(Reason::NotV4Mapped);
            }
            let Some(svc) = lookup_scoped6([0; 4], port_be, proto, SCOPE_INTERNAL) else {
                return Ok(Reason::NotV4Mapped);
            };
            if loopback && !in_host_netns() {
                return Ok(Reason::LoopbackNotHostNetns);
            }
            svc
        }
    };
    let netns = netns();
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The same selection as IPv4 (affinity per client netns, unconnected UDP flows per socket),
    // over the IPv6 backend table.
    let (backend, reason) = match datagrams {
        Datagrams::Connected => select_backend::<Be6>(&svc, netns)?,
        Datagrams::Flow => select_udp_flow_backend::<Be6>(&svc, netns, cookie)?,
    };
    set_ipv6(sa, backend.addr_be);
    sa.user_port = u32::from(backend.port_be);
    let key = SockRevNatKey6 {
        cookie,
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        _pad: [0; 6],
    };
    let value = SockRevNatValue6 {
        frontend_addr_be: addr_be,
        frontend_port_be: port_be,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    if TWL_SKRNAT6_V1.insert(key, value, 0).is_err() {
        count(Reason::RevNat6MapFull);
    }
    Ok(match reason {
        Reason::Translated => Reason::Translated6,
        other => other,
    })
}

/// [`rev_translate`] for a real IPv6 peer: the backend of an IPv6 frontend shows as the frontend.
#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens the u16 port to a u32 field (kernel ABI)"
)]
#[inline(always)]
fn rev_translate6(ctx: &SockAddrContext) -> Reason {
    // SAFETY: as in try_translate.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the context pointer is the program's own, valid for the call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey6 {
        cookie,
        backend_addr_be: ipv6_of(sa),
        backend_port_be: sa.user_port as u16,
        _pad: [0; 6],
    };
    // SAFETY: the value is copied out at once, before any other helper call.
    match unsafe { TWL_SKRNAT6_V1.get(key) }.copied() {
        Some(v) => {
            set_ipv6(sa, v.frontend_addr_be);
            sa.user_port = u32::from(v.frontend_port_be);
            Reason::RevNatApplied6
        }
        None => Reason::NotV4Mapped,
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_sock_addr widens the u16 port to a u32 field (kernel ABI)"
)]
fn rev_translate<const FAMILY: bool>(ctx: &SockAddrContext) -> Reason {
    // SAFETY: as in try_translate.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(addr_be) = ipv4_of::<FAMILY>(sa) else {
        return if FAMILY == V6 {
            rev_translate6(ctx)
        } else {
            Reason::NotV4Mapped
        };
    };
    // SAFETY: the context pointer is the program's own, valid for the call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        backend_addr_be: addr_be,
        backend_port_be: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: the value's fields are read at once, before any other helper call.
    match unsafe { TWL_SKRNAT_V1.get(key) } {
        Some(v) => {
            set_ipv4::<FAMILY>(sa, v.frontend_addr_be);
            sa.user_port = u32::from(v.frontend_port_be);
            Reason::RevNatApplied
        }
        None => Reason::NotService,
    }
}
