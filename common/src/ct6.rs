//! IPv6 twins of the connection-tracking key and value, and of the masquerade prefix key
//! (design: `docs/design/dualstack.md`, "Addresses").
//!
//! One table per address size (`TWL_CT_V2` for IPv4, `TWL_CT6_V1` here) rather than one table
//! with 40-byte keys for every IPv4 flow; the meaning of every field is the one of [`CtKey`] and
//! [`CtValue`] (same scopes, flags, states and lifetimes), so the kernel's state machine
//! ([`ct_next_state`]) and the agent's collector are one code path for both families.
//!
//! Addresses are the 16 bytes as they stand in the packet, held as four words
//! ([`addr6_from_octets`] of `Ipv6Addr::octets()`): word-aligned, so the kernel programs copy
//! and compare them four words at a time rather than byte by byte (which costs a BPF program
//! stack it does not have), and `bpf_fib_lookup` and `bpf_sock_tuple` take them as they are.
#[cfg(doc)]
use crate::CtKey;
use crate::{
    CT_FIN_ORIG, CT_FIN_ORIG_FIRST, CT_FIN_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_NEW, CtValue,
};

/// Key of `CT6`: one direction of a tracked IPv6 flow, as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey6 {
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_SCOPE_*`, as in [`CtKey`].
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);

/// Value of `CT6`: what [`CtValue`] holds, with 16-byte addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue6 {
    pub new_saddr_be: [u32; 4],
    pub new_daddr_be: [u32; 4],
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub svc_id: u32,
    /// `CT_F_*`.
    pub flags: u32,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_FIN_*` (TCP).
    pub tcp_fin: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns()` of the last packet matching this entry.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue6>() == 56);

impl CtKey6 {
    /// The key of the other direction of the flow `value` translates (as
    /// [`CtKey::counterpart`]).
    #[must_use]
    pub const fn counterpart(&self, value: &CtValue6) -> CtKey6 {
        CtKey6 {
            saddr_be: value.new_daddr_be,
            daddr_be: value.new_saddr_be,
            sport_be: value.new_dport_be,
            dport_be: value.new_sport_be,
            proto: self.proto,
            scope: self.scope,
            _pad: [0; 2],
        }
    }

    /// The same flow seen from the other side (as [`CtKey::reversed`]).
    #[must_use]
    pub const fn reversed(&self) -> CtKey6 {
        CtKey6 {
            saddr_be: self.daddr_be,
            daddr_be: self.saddr_be,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            scope: self.scope,
            _pad: [0; 2],
        }
    }
}

/// An IPv6 address (`Ipv6Addr::octets()`) in the maps' form: the same 16 bytes in memory.
#[must_use]
pub const fn addr6_from_octets(o: [u8; 16]) -> [u32; 4] {
    let mut a = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        a[i] = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
        i += 1;
    }
    a
}

/// The octets of an address in the maps' form (for `Ipv6Addr::from`).
#[must_use]
pub const fn addr6_octets(a: [u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        o[i * 4] = b[0];
        o[i * 4 + 1] = b[1];
        o[i * 4 + 2] = b[2];
        o[i * 4 + 3] = b[3];
        i += 1;
    }
    o
}

/// TCP flags the state machine reads.
const TCP_FIN: u8 = 0x01;

/// The state machine of a tracked flow, shared by both families' tables: from an entry's
/// `(state, tcp_fin)`, whether the packet travels the reply direction, and its TCP flags (0 for
/// other protocols), the new `(state, tcp_fin)`. The first answer establishes the flow; once
/// both sides sent a FIN it is closing. (A reset removes the entries instead: the caller's.)
#[must_use]
pub const fn ct_next_state(state: u8, tcp_fin: u8, reply: bool, tcp_flags: u8) -> (u8, u8) {
    let mut state = state;
    let mut fin = tcp_fin;
    if reply && state == CT_STATE_NEW {
        state = CT_STATE_ESTABLISHED;
    }
    if tcp_flags & TCP_FIN != 0 {
        if !reply && fin & (CT_FIN_ORIG | CT_FIN_REPLY) == 0 {
            fin |= CT_FIN_ORIG_FIRST;
        }
        fin |= if reply { CT_FIN_REPLY } else { CT_FIN_ORIG };
        if fin & (CT_FIN_ORIG | CT_FIN_REPLY) == CT_FIN_ORIG | CT_FIN_REPLY {
            state = CT_STATE_CLOSING;
        }
    }
    (state, fin)
}

/// TCP flags a policy entry's step reads besides FIN.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the NetworkPolicy programs do to a tracked entry (`CT_SCOPE_POLICY`), one definition
/// for both tables' values ([`CtValue`], [`CtValue6`]): the same fields, the same rules.
pub trait PolicyEntry: Sized {
    /// Whether a packet passes as part of the flow this entry tracks with `flag` (the side
    /// that passed it); if so, refreshes the entry and steps its state ([`ct_next_state`]; a
    /// RST closes). A SYN reusing a closed flow's tuple does not pass: it is judged afresh.
    /// `reply`: the packet travels against the entry's tuple.
    fn policy_pass(&mut self, flag: u32, now: u64, tcp_flags: u8, reply: bool) -> bool;

    /// Records `flag`'s pass on an entry that exists already (the other side of a node-local
    /// flow made it): the flag added, or, on a closed flow's tuple, `fresh` in its place (the
    /// other side's pass was for the old flow).
    fn policy_record(&mut self, fresh: &Self, flag: u32, now: u64);
}

macro_rules! policy_entry {
    ($value:ty) => {
        impl PolicyEntry for $value {
            #[inline]
            fn policy_pass(&mut self, flag: u32, now: u64, tcp_flags: u8, reply: bool) -> bool {
                if self.flags & flag == 0 {
                    return false;
                }
                if self.state == CT_STATE_CLOSING && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    return false;
                }
                self.last_seen_ns = now;
                let (state, fin) = ct_next_state(self.state, self.tcp_fin, reply, tcp_flags);
                self.state = if tcp_flags & TCP_RST != 0 {
                    CT_STATE_CLOSING
                } else {
                    state
                };
                self.tcp_fin = fin;
                true
            }

            #[inline]
            fn policy_record(&mut self, fresh: &Self, flag: u32, now: u64) {
                if self.state == CT_STATE_CLOSING {
                    *self = *fresh;
                } else {
                    self.flags |= flag;
                    self.last_seen_ns = now;
                }
            }
        }
    };
}
policy_entry!(CtValue);
policy_entry!(CtValue6);

/// Data of the `MASQ6` LPM-trie key: a prefix `p/n` of `MASQ_KIND_*` is stored with
/// `prefix_len = MASQ_PREFIX_BASE + n` (the kind and its padding always match in full, as in
/// the IPv4 `MasqKey`); the value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MasqKey6 {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<MasqKey6>() == 20);

/// Key of `FRAGS6`: one fragmented IPv6 datagram as it arrived, identified as RFC 8200 4.5
/// does (source, destination, the fragment header's 32-bit identification) and by its
/// transport protocol; the value is IPv4's `FragValue` (the first fragment's ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey6 {
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    /// As in the fragment header (network order).
    pub id_be: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragKey6>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::CtKey6 {}
    unsafe impl aya::Pod for super::CtValue6 {}
    unsafe impl aya::Pod for super::MasqKey6 {}
    unsafe impl aya::Pod for super::FragKey6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_value(flags: u32, state: u8) -> CtValue {
        CtValue {
            new_saddr_be: 1,
            new_daddr_be: 2,
            new_sport_be: 3,
            new_dport_be: 4,
            svc_id: 0,
            flags,
            state,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: 5,
        }
    }

    #[test]
    fn a_policy_entry_passes_only_its_sides_flows_and_steps_the_one_state_machine() {
        let mut v = policy_value(crate::CT_F_POLICY_EGRESS, CT_STATE_NEW);
        // The other side's flag: not this side's pass.
        assert!(!v.policy_pass(crate::CT_F_POLICY_INGRESS, 9, TCP_ACK, false));
        assert_eq!(v.last_seen_ns, 5);
        // A reply establishes, and refreshes.
        assert!(v.policy_pass(crate::CT_F_POLICY_EGRESS, 9, TCP_ACK | TCP_SYN, true));
        assert_eq!((v.state, v.last_seen_ns), (CT_STATE_ESTABLISHED, 9));
        // A reset closes; a new SYN on the closed tuple is judged afresh.
        assert!(v.policy_pass(crate::CT_F_POLICY_EGRESS, 10, TCP_RST, false));
        assert_eq!(v.state, CT_STATE_CLOSING);
        assert!(!v.policy_pass(crate::CT_F_POLICY_EGRESS, 11, TCP_SYN, false));
    }

    #[test]
    fn recording_a_pass_adds_the_flag_or_replaces_a_closed_flow() {
        let fresh = policy_value(crate::CT_F_POLICY_INGRESS, CT_STATE_NEW);
        let mut open = policy_value(crate::CT_F_POLICY_EGRESS, CT_STATE_ESTABLISHED);
        open.policy_record(&fresh, crate::CT_F_POLICY_INGRESS, 7);
        assert_eq!(
            open.flags,
            crate::CT_F_POLICY_EGRESS | crate::CT_F_POLICY_INGRESS
        );
        assert_eq!((open.state, open.last_seen_ns), (CT_STATE_ESTABLISHED, 7));
        let mut closed = policy_value(crate::CT_F_POLICY_EGRESS, CT_STATE_CLOSING);
        closed.policy_record(&fresh, crate::CT_F_POLICY_INGRESS, 7);
        assert_eq!(closed, fresh);
    }

    #[test]
    fn state_machine() {
        // A SYN-ACK (or any answer) establishes.
        assert_eq!(
            ct_next_state(CT_STATE_NEW, 0, true, 0x12),
            (CT_STATE_ESTABLISHED, 0)
        );
        // The original direction's packets do not.
        assert_eq!(ct_next_state(CT_STATE_NEW, 0, false, 0), (CT_STATE_NEW, 0));
        // One FIN is noted (and that the client's came first); the second side's closes.
        let (s, f) = ct_next_state(CT_STATE_ESTABLISHED, 0, false, TCP_FIN);
        assert_eq!(
            (s, f),
            (CT_STATE_ESTABLISHED, CT_FIN_ORIG | CT_FIN_ORIG_FIRST)
        );
        assert_eq!(
            ct_next_state(s, f, true, TCP_FIN | 0x10),
            (
                CT_STATE_CLOSING,
                CT_FIN_ORIG | CT_FIN_REPLY | CT_FIN_ORIG_FIRST
            )
        );
        // The peer closing first is not marked, nor is a client FIN after it.
        let (s, f) = ct_next_state(CT_STATE_ESTABLISHED, 0, true, TCP_FIN);
        assert_eq!((s, f), (CT_STATE_ESTABLISHED, CT_FIN_REPLY));
        assert_eq!(
            ct_next_state(s, f, false, TCP_FIN),
            (CT_STATE_CLOSING, CT_FIN_ORIG | CT_FIN_REPLY)
        );
    }

    #[test]
    fn a_port_is_reusable_once_expired_or_quietly_closed_by_its_client() {
        use crate::{
            CT_LIFETIME_TCP_CLOSING_NS, CT_NAT_PORT_QUIET_NS, PROTO_TCP, PROTO_UDP,
            ct_nat_port_reusable,
        };
        let both = CT_FIN_ORIG | CT_FIN_REPLY;
        let t0 = 1_000;
        let quiet = t0 + CT_NAT_PORT_QUIET_NS;
        // Closed by the client: reusable after the quiet time, not before.
        let client_first = both | CT_FIN_ORIG_FIRST;
        assert!(!ct_nat_port_reusable(
            PROTO_TCP,
            CT_STATE_CLOSING,
            client_first,
            t0,
            quiet - 1
        ));
        assert!(ct_nat_port_reusable(
            PROTO_TCP,
            CT_STATE_CLOSING,
            client_first,
            t0,
            quiet
        ));
        // Closed by the peer: only once expired.
        assert!(!ct_nat_port_reusable(
            PROTO_TCP,
            CT_STATE_CLOSING,
            both,
            t0,
            quiet
        ));
        assert!(ct_nat_port_reusable(
            PROTO_TCP,
            CT_STATE_CLOSING,
            both,
            t0,
            t0 + CT_LIFETIME_TCP_CLOSING_NS + 1
        ));
        // Half closed, established or UDP: only once expired.
        let half = CT_FIN_ORIG | CT_FIN_ORIG_FIRST;
        assert!(!ct_nat_port_reusable(
            PROTO_TCP,
            CT_STATE_ESTABLISHED,
            half,
            t0,
            quiet
        ));
        assert!(!ct_nat_port_reusable(
            PROTO_UDP,
            CT_STATE_ESTABLISHED,
            0,
            t0,
            quiet
        ));
        assert!(ct_nat_port_reusable(
            PROTO_UDP,
            CT_STATE_NEW,
            0,
            t0,
            t0 + 31_000_000_000
        ));
    }

    #[test]
    fn counterparts_pair_up() {
        let k = CtKey6 {
            saddr_be: [1; 4],
            daddr_be: [2; 4],
            sport_be: 1,
            dport_be: 2,
            proto: 6,
            scope: 0,
            _pad: [0; 2],
        };
        let v = CtValue6 {
            new_saddr_be: [3; 4],
            new_daddr_be: [2; 4],
            new_sport_be: 9,
            new_dport_be: 2,
            svc_id: 0,
            flags: 0,
            state: CT_STATE_NEW,
            tcp_fin: 0,
            _pad: [0; 2],
            last_seen_ns: 0,
        };
        let r = k.counterpart(&v);
        assert_eq!(
            (r.saddr_be, r.daddr_be, r.sport_be, r.dport_be),
            ([2; 4], [3; 4], 2, 9)
        );
        let o: [u8; 16] = core::array::from_fn(|i| u8::try_from(i).unwrap_or(0));
        assert_eq!(addr6_octets(addr6_from_octets(o)), o);
        assert_eq!(k.reversed().reversed(), k);
    }
}
