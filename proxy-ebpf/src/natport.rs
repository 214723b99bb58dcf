//! The one search for a node port of every translation that gives a flow one: NodePort SNAT
//! towards a remote backend (`tc.rs`) and the IPv4 and IPv6 masquerade (`masq.rs`, `nat6.rs`).
//! All three draw from the range the agent reserves and claim a port by inserting the flow's
//! reply entry (peer → node address:port) into their conntrack table with `BPF_NOEXIST`, so a
//! port is unique per (node address, peer address and port, protocol) whichever feature took it.
//!
//! ```text
//!  try 1: the preferred port (SNAT keeps a client port inside the range), else random
//!  try 2..PORT_TRIES: random (independent probes: consecutive ones would run into the clusters
//!                     earlier claims form and fail long before the range is full)
//!  each: a node socket would receive replies on that tuple ─► next
//!        reply entry inserted (BPF_NOEXIST) ─► claimed
//!        taken by a flow that no longer needs it (expired, or closed by its client and quiet,
//!        `ct_nat_port_reusable`, both entries) ─► its entries removed, insert again
//! ```
//!
//! Taking over closed flows is what lets a node open more than a few hundred connections per
//! second to one backend: without it a port stays held for the whole closing lifetime (10 s,
//! and until the next collection), and a burst of new connections exhausts the 4,536 ports.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use twill_common::{
    CT_F_REPLY, CtKey, CtKey6, CtValue, CtValue6, PROTO_TCP, PROTO_UDP, Reason,
    ct_nat_port_reusable,
};

use crate::maps::{TWL_CT_V2, TWL_CT6_V1};

/// Ports tried for one new flow before it is dropped (Cilium's `SNAT_COLLISION_RETRIES`): with
/// independent probes a flow fails only when nearly every port towards that peer is in use.
const PORT_TRIES: u32 = 32;
/// `-EEXIST`: a `BPF_NOEXIST` insert met an existing key.
const EEXIST: i64 = -17;

/// One family's conntrack table, as the port search reads and writes it.
pub trait NatTable {
    type Key: Copy + PartialEq;
    type Value: Copy;
    /// Sets the reply tuple's node port (its destination port).
    fn set_port(key: &mut Self::Key, port_be: u16);
    fn get(key: &Self::Key) -> Option<Self::Value>;
    /// Creates `key` unless it exists (`Err(-EEXIST)`); any other error is a full table.
    fn insert_new(key: &Self::Key, value: &Self::Value) -> Result<(), i64>;
    /// Creates or replaces `key`; any error is a full table.
    fn insert(key: &Self::Key, value: &Self::Value) -> Result<(), i64>;
    fn remove(key: &Self::Key);
    /// The key of the other direction of the flow `value` translates.
    fn counterpart(key: &Self::Key, value: &Self::Value) -> Self::Key;
    /// Whether the entry is a reply (`CT_F_REPLY`) entry.
    fn is_reply(value: &Self::Value) -> bool;
    /// [`ct_nat_port_reusable`] of the entry at `now`.
    fn reusable(key: &Self::Key, value: &Self::Value, now: u64) -> bool;
    /// Whether a socket of the node would receive a packet with the reply tuple `key`
    /// (connected to that peer from the port, bound to it, or in TIME_WAIT on it): such a port
    /// is never taken, so a reply meant for the node's own connection is never taken for a
    /// translated flow's, nor the other way round. Only TCP and UDP have sockets to look up.
    fn node_socket_owns(ctx: &TcContext, key: &Self::Key) -> bool;
}

/// `TWL_CT_V2` (IPv4).
pub struct Ct4;
/// `TWL_CT6_V1` (IPv6).
pub struct Ct6;

impl NatTable for Ct4 {
    type Key = CtKey;
    type Value = CtValue;

    #[inline(always)]
    fn set_port(key: &mut CtKey, port_be: u16) {
        key.dport_be = port_be;
    }
    #[inline(always)]
    fn get(key: &CtKey) -> Option<CtValue> {
        TWL_CT_V2.get_ptr(key).map(|p| {
            // SAFETY: a valid map value pointer for the program's duration; copied out at once.
            unsafe { *p }
        })
    }
    #[inline(always)]
    fn insert_new(key: &CtKey, value: &CtValue) -> Result<(), i64> {
        TWL_CT_V2
            .insert(key, value, u64::from(BPF_NOEXIST))
            .map_err(i64::from)
    }
    #[inline(always)]
    fn insert(key: &CtKey, value: &CtValue) -> Result<(), i64> {
        TWL_CT_V2.insert(key, value, 0).map_err(i64::from)
    }
    #[inline(always)]
    fn remove(key: &CtKey) {
        let _ = TWL_CT_V2.remove(key);
    }
    #[inline(always)]
    fn counterpart(key: &CtKey, value: &CtValue) -> CtKey {
        key.counterpart(value)
    }
    #[inline(always)]
    fn is_reply(value: &CtValue) -> bool {
        value.flags & CT_F_REPLY != 0
    }
    #[inline(always)]
    fn reusable(key: &CtKey, v: &CtValue, now: u64) -> bool {
        ct_nat_port_reusable(key.proto, v.state, v.tcp_fin, v.last_seen_ns, now)
    }
    #[inline(always)]
    fn node_socket_owns(ctx: &TcContext, key: &CtKey) -> bool {
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: key.saddr_be,
                    daddr: key.daddr_be,
                    sport: key.sport_be,
                    dport: key.dport_be,
                },
            },
        };
        #[expect(clippy::cast_possible_truncation, reason = "12 bytes")]
        let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
        socket_at(ctx, key.proto, &mut tuple, size)
    }
}

impl NatTable for Ct6 {
    type Key = CtKey6;
    type Value = CtValue6;

    #[inline(always)]
    fn set_port(key: &mut CtKey6, port_be: u16) {
        key.dport_be = port_be;
    }
    #[inline(always)]
    fn get(key: &CtKey6) -> Option<CtValue6> {
        TWL_CT6_V1.get_ptr(key).map(|p| {
            // SAFETY: a valid map value pointer for the program's duration; copied out at once.
            unsafe { *p }
        })
    }
    #[inline(always)]
    fn insert_new(key: &CtKey6, value: &CtValue6) -> Result<(), i64> {
        TWL_CT6_V1
            .insert(key, value, u64::from(BPF_NOEXIST))
            .map_err(i64::from)
    }
    #[inline(always)]
    fn insert(key: &CtKey6, value: &CtValue6) -> Result<(), i64> {
        TWL_CT6_V1.insert(key, value, 0).map_err(i64::from)
    }
    #[inline(always)]
    fn remove(key: &CtKey6) {
        let _ = TWL_CT6_V1.remove(key);
    }
    #[inline(always)]
    fn counterpart(key: &CtKey6, value: &CtValue6) -> CtKey6 {
        key.counterpart(value)
    }
    #[inline(always)]
    fn is_reply(value: &CtValue6) -> bool {
        value.flags & CT_F_REPLY != 0
    }
    #[inline(always)]
    fn reusable(key: &CtKey6, v: &CtValue6, now: u64) -> bool {
        ct_nat_port_reusable(key.proto, v.state, v.tcp_fin, v.last_seen_ns, now)
    }
    #[inline(always)]
    fn node_socket_owns(ctx: &TcContext, key: &CtKey6) -> bool {
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                    saddr: key.saddr_be,
                    daddr: key.daddr_be,
                    sport: key.sport_be,
                    dport: key.dport_be,
                },
            },
        };
        #[expect(clippy::cast_possible_truncation, reason = "36 bytes")]
        let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32;
        socket_at(ctx, key.proto, &mut tuple, size)
    }
}

/// Whether the node's network namespace (the one of the packet's device) has a TCP socket
/// (full, request or TIME_WAIT) or a UDP socket that a packet with `tuple` would reach.
#[inline(always)]
fn socket_at(ctx: &TcContext, proto: u8, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // ICMP echo identifiers: the helpers know no ping sockets.
        return false;
    }
    // Negative (all ones): the network namespace of the packet's device.
    #[expect(clippy::cast_sign_loss, reason = "the kernel ABI's encoding of -1")]
    let netns = i64::from(BPF_F_CURRENT_NETNS) as u64;
    // SAFETY: `tuple` is a valid, writable tuple of the size passed; the context pointer is the
    // program's own. Any socket returned holds a reference, released just below.
    let sk = unsafe {
        if proto == PROTO_TCP {
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the non-null socket reference the lookup returned, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// Claims a port of `min..min + span` for a new flow: inserts `reply` at `reply_key` with the
/// port set, trying `preferred` (an offset into the range) first. Returns the port (network
/// order), `None` when every try was taken, or `CtMapFull`. `reply_key` is left holding the
/// claimed port.
#[inline(always)]
pub fn claim<T: NatTable>(
    ctx: &TcContext,
    reply_key: &mut T::Key,
    reply: &T::Value,
    preferred: Option<u32>,
    range: (u32, u32),
    now: u64,
) -> Result<Option<u16>, Reason> {
    let (min, span) = range;
    for i in 0..PORT_TRIES {
        let offset = match preferred {
            Some(p) if i == 0 => p,
            // SAFETY: helper without arguments.
            _ => unsafe { bpf_get_prandom_u32() },
        };
        // Inside min..min + span ≤ 65536: always fits.
        let port_be = u16::try_from(min + offset % span)
            .unwrap_or(u16::MAX)
            .to_be();
        T::set_port(reply_key, port_be);
        if T::node_socket_owns(ctx, reply_key) {
            continue;
        }
        match T::insert_new(reply_key, reply) {
            Ok(()) => return Ok(Some(port_be)),
            Err(EEXIST) => {
                if take_over::<T>(reply_key, now) && T::insert_new(reply_key, reply).is_ok() {
                    return Ok(Some(port_be));
                }
            }
            Err(_) => return Err(Reason::CtMapFull),
        }
    }
    Ok(None)
}

/// Frees the reply tuple `key` when the flow holding it no longer needs it (both of its
/// entries [`NatTable::reusable`]); whether the caller may insert again. Another CPU may be
/// taking over the same port: whoever inserts first (`BPF_NOEXIST`) has it, and the entry is
/// read again just before its removal so a flow that has just claimed it is not removed.
#[inline(always)]
fn take_over<T: NatTable>(key: &T::Key, now: u64) -> bool {
    let Some(old) = T::get(key) else {
        // Removed in the meantime: free.
        return true;
    };
    if !T::is_reply(&old) || !T::reusable(key, &old, now) {
        return false;
    }
    let other = T::counterpart(key, &old);
    if let Some(o) = T::get(&other) {
        // Only the old flow's own original entry (its client may have opened a new flow with
        // the same tuple since, which holds another port and stays).
        if T::counterpart(&other, &o) == *key {
            if !T::reusable(&other, &o, now) {
                return false;
            }
            T::remove(&other);
        }
    }
    match T::get(key) {
        Some(v) if T::is_reply(&v) && T::reusable(key, &v, now) => T::remove(key),
        Some(_) => return false,
        None => {}
    }
    true
}

/// Completes a new flow whose reply entry is in place: inserts its original-direction entry
/// `orig` at `key`; on a full table the reply entry at `reply_key` is removed again, so no
/// half flow holds a port.
#[inline(always)]
pub fn open<T: NatTable>(key: &T::Key, orig: &T::Value, reply_key: &T::Key) -> Result<(), Reason> {
    if T::insert(key, orig).is_err() {
        T::remove(reply_key);
        return Err(Reason::CtMapFull);
    }
    Ok(())
}
