//! Expiry of the flows NetworkPolicy let through (`CT_SCOPE_POLICY` entries of the shared
//! conntrack table). The kernel refreshes an entry's `last_seen_ns` on every packet and marks it
//! closing on a FIN or RST; the agent removes idle entries with Cilium's default lifetimes. The
//! table is an LRU as well, so under pressure the least recently used flows go first.
use std::time::Duration;

use twill_common::{CT_F_POLICY_CLOSING, CT_SCOPE_POLICY, CtKey, CtValue, PROTO_TCP};

/// An established TCP flow idle this long is forgotten (Cilium's `CT_CONNECTION_LIFETIME_TCP`).
pub const TCP_IDLE: Duration = Duration::from_hours(6);
/// Non-TCP flows (UDP, ICMP echo, SCTP) (Cilium's `CT_CONNECTION_LIFETIME_NONTCP`).
pub const OTHER_IDLE: Duration = Duration::from_mins(1);
/// A TCP flow after its FIN or RST: long enough for the last ACKs (Cilium's
/// `CT_CLOSE_TIMEOUT`).
pub const CLOSING_IDLE: Duration = Duration::from_secs(10);
/// How often the agent sweeps.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(10);

/// Whether a policy conntrack entry is done at `now_ns` (`CLOCK_MONOTONIC`). Entries of other
/// scopes are never this module's business.
pub fn expired(key: &CtKey, value: &CtValue, now_ns: u64) -> bool {
    if key.scope != CT_SCOPE_POLICY {
        return false;
    }
    let limit = if value.flags & CT_F_POLICY_CLOSING != 0 {
        CLOSING_IDLE
    } else if key.proto == PROTO_TCP {
        TCP_IDLE
    } else {
        OTHER_IDLE
    };
    u128::from(now_ns.saturating_sub(value.last_seen_ns)) > limit.as_nanos()
}

#[cfg(test)]
mod tests {
    use twill_common::{CT_SCOPE_NAT, PROTO_UDP};

    use super::*;

    fn entry(proto: u8, scope: u8, flags: u32, last_seen_ns: u64) -> (CtKey, CtValue) {
        (
            CtKey {
                saddr_be: 1,
                daddr_be: 2,
                sport_be: 3,
                dport_be: 4,
                proto,
                scope,
                _pad: [0; 2],
            },
            CtValue {
                new_saddr_be: 1,
                new_daddr_be: 2,
                new_sport_be: 3,
                new_dport_be: 4,
                svc_id: 0,
                flags,
                _pad: 0,
                last_seen_ns,
            },
        )
    }

    #[test]
    fn idle_limits_by_protocol_and_state() {
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let (k, v) = entry(PROTO_UDP, CT_SCOPE_POLICY, 0, now - 59 * s);
        assert!(!expired(&k, &v, now));
        let (k, v) = entry(PROTO_UDP, CT_SCOPE_POLICY, 0, now - 61 * s);
        assert!(expired(&k, &v, now));
        let (k, v) = entry(PROTO_TCP, CT_SCOPE_POLICY, 0, now - 3600 * s);
        assert!(!expired(&k, &v, now), "an idle hour keeps a TCP flow");
        let (k, v) = entry(
            PROTO_TCP,
            CT_SCOPE_POLICY,
            CT_F_POLICY_CLOSING,
            now - 11 * s,
        );
        assert!(expired(&k, &v, now), "closing flows go after 10 s");
        let (k, v) = entry(PROTO_UDP, CT_SCOPE_NAT, 0, 0);
        assert!(!expired(&k, &v, now), "NAT entries are not ours");
        let (k, v) = entry(PROTO_UDP, CT_SCOPE_POLICY, 0, now + s);
        assert!(
            !expired(&k, &v, now),
            "a timestamp ahead of the reader's clock"
        );
    }
}
