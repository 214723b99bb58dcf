//! Socket-level load balancing on cgroup-v2 `connect4`: the destination of a connect() to a
//! Service frontend is rewritten to a backend before any packet exists, so no per-packet NAT is
//! needed for east-west traffic.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use twill_common::{
    Reason, SCOPE_ANY, SCOPE_INTERNAL, ServiceKey, ServiceValue, SlotKey, SockRevNatKey,
    SockRevNatValue,
};

use crate::maps::{TWL_BE_V1, TWL_SKRNAT_V1, TWL_SLOT_V1, TWL_SVC_V1, count};

/// cgroup/connect4 return values: 1 lets the call proceed, 0 fails it with EPERM (or the errno
/// set with `bpf_set_retval`).
const SOCK_ALLOW: i32 = 1;
const SOCK_REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn twill_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(reason) => {
            count(reason);
            SOCK_ALLOW
        }
        Err(reason) => {
            count(reason);
            SOCK_REJECT
        }
    }
}

fn lookup_service(addr_be: u32, port_be: u16, proto: u8) -> Option<&'static ServiceValue> {
    let mut key = ServiceKey { addr_be, port_be, proto, scope: SCOPE_INTERNAL };
    // SAFETY: read-only lookup; the value is copied out before the program ends.
    if let Some(v) = unsafe { TWL_SVC_V1.get(&key) } {
        return Some(v);
    }
    key.scope = SCOPE_ANY;
    unsafe { TWL_SVC_V1.get(&key) }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr_be = sa.user_ip4;
    // user_port holds the port in network order in its low 16 bits.
    let port_be = sa.user_port as u16;
    let proto = sa.protocol as u8;

    let Some(svc) = lookup_service(addr_be, port_be, proto) else {
        return Ok(Reason::NotService);
    };
    let svc = *svc;
    if svc.backend_count == 0 {
        return Err(Reason::NoBackends);
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % u32::from(svc.backend_count);
    let backend_id = unsafe { TWL_SLOT_V1.get(&SlotKey { svc_id: svc.svc_id, slot }) }
        .copied()
        .ok_or(Reason::BackendMissing)?;
    let backend = unsafe { TWL_BE_V1.get(&backend_id) }
        .copied()
        .ok_or(Reason::BackendMissing)?;

    sa.user_ip4 = backend.addr_be;
    sa.user_port = u32::from(backend.port_be);

    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
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
    if TWL_SKRNAT_V1.insert(&key, &value, 0).is_err() {
        count(Reason::RevNatMapFull);
    }
    Ok(Reason::Translated)
}
