//! IPv6 north-south: NodePort, External IPs and LoadBalancer IPs reached over IPv6 from outside
//! the node, the IPv6 twin of `tc.rs`'s Service path with the same semantics, on the IPv6
//! parser, rewrite and conntrack table of `nat6.rs` (`TWL_CT6_V1`).
//!
//! ```text
//!  ingress, TCP/UDP, no CT6 entry (nat6::ingress):
//!    SERVICES6 (EXTERNAL, then ANY) by exact address; NodePort ([::]) when dst ∈ NODE_ADDRS6
//!    ─► TCP without SYN: to the stack untouched (CtNonSynMiss)
//!    ─► loadBalancerSourceRanges (LPM, TWL_LBSRC6_V1): outside them dropped (Ns6SourceRangeDenied)
//!    ─► backend: affinity per client address (affinity_client6), else the tuple's hash
//!    ─► local backend (or eTP=Local): DNAT, client kept, left to the stack (Ns6Dnat)
//!       remote backend (eTP=Cluster): DNAT + SNAT to the node address (the frontend when it
//!       is a NodePort address, else the route's preferred source) and a port of the reserved
//!       range claimed by `natport::claim::<Ct6>`, redirected out (Ns6Forwarded)
//!    ─► two CT6 entries, reply first; later packets, replies and ICMPv6 errors take nat6's
//!       CT6 paths (SNATed flows redirected there too)
//! ```
//!
//! No IPv6 header checksum; the TCP/UDP checksum follows the addresses through the
//! pseudo-header (`nat6::rewrite6`). Neighbour Discovery and MLD never reach here: `nat6`
//! parses them as `Other`.
use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext,
};
use twill_common::{
    BE_F_LOCAL, Backend6, CT_F_REPLY, CT_F_SNAT, CT_SCOPE_NAT, CT_STATE_NEW, CtKey6, CtValue6,
    PROTO_TCP, Reason, SCOPE_EXTERNAL, SVC_F_LOCAL_ONLY, SVC_F_SOURCE_RANGES, ServiceValue,
    SrcRangeKey6, affinity_client6, flow_hash6,
};

use crate::{
    lb::{Pick, V6, is_node_addr6, lookup_scoped6, select_backend_by},
    maps::{TWL_CT6_V1, TWL_LBSRC6_V1, count},
    nat6::{Pkt6, forward6, rewrite6, route_src_to6},
    natport::{self, Ct6},
    tc::{EXTERNAL_KINDS, SNAT_PORT_MIN, SNAT_PORT_SPAN, Verdict},
};

/// The external frontend `p` is addressed to: its exact address (External IP, LoadBalancer
/// IP), else the NodePort wildcard when the destination is a NodePort address. A ClusterIP is
/// not served to traffic from outside.
#[inline(always)]
fn lookup6(p: &Pkt6) -> Option<ServiceValue> {
    if let Some(v) = lookup_scoped6(p.daddr, p.dport, p.proto, SCOPE_EXTERNAL) {
        return (v.flags & EXTERNAL_KINDS != 0).then_some(v);
    }
    if !is_node_addr6(&p.daddr) {
        return None;
    }
    lookup_scoped6([0; 4], p.dport, p.proto, SCOPE_EXTERNAL)
        .filter(|v| v.flags & EXTERNAL_KINDS != 0)
}

/// A `TWL_LBSRC6_V1` lookup matches its whole key: the Service id and the client's address.
const LB_SRC6_KEY_BITS: u32 = 32 + 128;

/// Whether `saddr` lies in one of the IPv6 `loadBalancerSourceRanges` of `svc_id` (the
/// compiler flags only frontends whose family has ranges, so none here admits nobody).
#[inline(always)]
fn source_allowed6(svc_id: u32, saddr: &[u32; 4]) -> bool {
    let key = Key::new(
        LB_SRC6_KEY_BITS,
        SrcRangeKey6 {
            svc_id_be: svc_id.to_be(),
            addr_be: *saddr,
        },
    );
    TWL_LBSRC6_V1.get(&key).is_some()
}

/// A new IPv6 flow from outside (no CT6 entry): translated when it is for an external
/// frontend, else untouched.
#[inline(always)]
pub fn open(ctx: &TcContext, p: &Pkt6) -> Result<Verdict, Reason> {
    let Some(svc) = lookup6(p) else {
        return Ok((Reason::NotService, TC_ACT_OK));
    };
    if p.proto == PROTO_TCP && !p.is_syn() {
        // The middle of a flow we do not track: the stack answers for the frontend (a reset),
        // as on IPv4, rather than a backend that never saw the connection.
        return Ok((Reason::CtNonSynMiss, TC_ACT_OK));
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed6(svc.svc_id, &p.saddr) {
        return Err(Reason::Ns6SourceRangeDenied);
    }
    let (be, reason) = select_backend_by::<V6>(
        &svc,
        affinity_client6(&p.saddr),
        Pick::Flow(flow_hash6(&p.saddr, &p.daddr, p.sport, p.dport, p.proto)),
    )?;
    if reason != Reason::Translated {
        // An affinity hit: counted as on IPv4, next to this path's own verdict.
        count(reason);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if be.flags & BE_F_LOCAL != 0 || svc.flags & SVC_F_LOCAL_ONLY != 0 {
        dnat_local6(ctx, p, svc.svc_id, &be, now)?;
        return Ok((Reason::Ns6Dnat, TC_ACT_OK));
    }
    dnat_snat6(ctx, p, svc.svc_id, &be, now)
}

/// DNAT only: the backend sees the client's address. One key and one value, the reply entry's
/// first and then the original's (the IPv6 path has little stack to spare).
#[inline(always)]
fn dnat_local6(
    ctx: &TcContext,
    p: &Pkt6,
    svc_id: u32,
    be: &Backend6,
    now: u64,
) -> Result<(), Reason> {
    let mut value = CtValue6 {
        new_saddr_be: p.daddr,
        new_daddr_be: p.saddr,
        new_sport_be: p.dport,
        new_dport_be: p.sport,
        svc_id,
        flags: CT_F_REPLY,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    let reply_key = CtKey6 {
        saddr_be: be.addr_be,
        daddr_be: p.saddr,
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    };
    // Reply entry first: a reply never finds its flow missing. A full table drops the new flow
    // (its client retries), as on IPv4.
    TWL_CT6_V1
        .insert(&reply_key, &value, 0)
        .map_err(|_| Reason::CtMapFull)?;
    value.new_saddr_be = p.saddr;
    value.new_daddr_be = be.addr_be;
    value.new_sport_be = p.sport;
    value.new_dport_be = be.port_be;
    value.flags = 0;
    natport::open::<Ct6>(&p.key(), &value, &reply_key)?;
    rewrite6(ctx, p, &p.saddr, p.sport, &be.addr_be, be.port_be)
}

/// Backend on another node (externalTrafficPolicy=Cluster): DNAT and SNAT to this node's IPv6
/// address towards the backend, so the reply returns here to be translated back.
#[inline(always)]
fn dnat_snat6(
    ctx: &TcContext,
    p: &Pkt6,
    svc_id: u32,
    be: &Backend6,
    now: u64,
) -> Result<Verdict, Reason> {
    let snat = if is_node_addr6(&p.daddr) {
        p.daddr
    } else {
        route_src_to6(ctx, p.proto, &p.saddr, &be.addr_be)?
    };
    // The client's port first when it lies in the range (nothing to rewrite).
    let client_port = u32::from(u16::from_be(p.sport));
    let preferred = (SNAT_PORT_MIN..SNAT_PORT_MIN + SNAT_PORT_SPAN)
        .contains(&client_port)
        .then(|| client_port - SNAT_PORT_MIN);
    let mut value = CtValue6 {
        new_saddr_be: p.daddr,
        new_daddr_be: p.saddr,
        new_sport_be: p.dport,
        new_dport_be: p.sport,
        svc_id,
        flags: CT_F_REPLY | CT_F_SNAT,
        state: CT_STATE_NEW,
        tcp_fin: 0,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    // The reply tuple (backend → node address:port) claims the port: see `natport`.
    let mut reply_key = CtKey6 {
        saddr_be: be.addr_be,
        daddr_be: snat,
        sport_be: be.port_be,
        dport_be: 0,
        proto: p.proto,
        scope: CT_SCOPE_NAT,
        _pad: [0; 2],
    };
    let Some(port_be) = natport::claim::<Ct6>(
        ctx,
        &mut reply_key,
        &value,
        preferred,
        (SNAT_PORT_MIN, SNAT_PORT_SPAN),
        now,
    )?
    else {
        return Err(Reason::SnatPortsExhausted);
    };
    value.new_saddr_be = snat;
    value.new_daddr_be = be.addr_be;
    value.new_sport_be = port_be;
    value.new_dport_be = be.port_be;
    value.flags = CT_F_SNAT;
    natport::open::<Ct6>(&p.key(), &value, &reply_key)?;
    rewrite6(ctx, p, &snat, port_be, &be.addr_be, be.port_be)?;
    Ok((
        Reason::Ns6Forwarded,
        forward6(ctx, p.proto, &snat, &be.addr_be)?,
    ))
}
