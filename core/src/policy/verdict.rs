//! The kernel's per-packet lookups, replayed in user space over the same map contents, for
//! `debug explain` and the model-based tests. The order is the design's (`docs/design/policy.md`,
//! "Per packet"): endpoint, isolation, ipcache longest match, then the policy trie's longest
//! match for the peer's identity and, failing that, for ANY.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use twill_common::{
    IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, IpCacheKey, IpCacheKey6, PEP_F_EGRESS_ISOLATED,
    PEP_F_INGRESS_ISOLATED, PolicyEndpoint, PolicyKey,
};

use super::compile::{Direction, LpmKey, PolicyEntries, PolicyState, addr_be, addr6_be};

/// How one side (the client's egress or the server's ingress) judges a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The address is no local pod of this node: its own node judges it (or nobody, for
    /// addresses that are no pod).
    Unmanaged,
    /// A local pod no policy isolates in this direction.
    NotIsolated { ep_id: u32 },
    /// Ingress from this node's own address: always allowed (kubelet probes).
    FromHost { ep_id: u32 },
    /// A policy entry matched.
    Allowed {
        ep_id: u32,
        identity: u32,
        rule_id: u32,
        /// The matching trie entry.
        key: LpmKey<PolicyKey>,
    },
    /// Isolated and no entry matched: the kernel drops (`PolicyDenied{Ingress,Egress}`).
    Denied { ep_id: u32, identity: u32 },
}

impl Judgement {
    pub fn allows(&self) -> bool {
        !matches!(self, Judgement::Denied { .. })
    }
}

/// Both sides of a new connection: it passes only if both allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The source pod's egress.
    pub egress: Judgement,
    /// The destination pod's ingress.
    pub ingress: Judgement,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

impl PolicyEntries {
    /// The identity the ipcache of `ip`'s family gives it: the longest matching prefix, WORLD
    /// when none.
    pub fn identity_of(&self, ip: impl Into<IpAddr>) -> u32 {
        match ip.into() {
            IpAddr::V4(a) => self.identity_of4(a),
            IpAddr::V6(a) => self.identity_of6(a),
        }
    }

    fn identity_of6(&self, ip: Ipv6Addr) -> u32 {
        let a = u128::from(ip);
        for len in (0..=128u32).rev() {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            let key = LpmKey {
                data: IpCacheKey6 {
                    addr_be: addr6_be(Ipv6Addr::from(a & mask)),
                },
                prefix_len: len,
            };
            if let Some(v) = self.ipcache6.get(&key) {
                return v.id;
            }
        }
        IDENTITY_WORLD
    }

    fn identity_of4(&self, ip: Ipv4Addr) -> u32 {
        let a = u32::from(ip);
        for len in (0..=32u32).rev() {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let key = LpmKey {
                data: IpCacheKey {
                    addr_be: addr_be(Ipv4Addr::from(a & mask)),
                },
                prefix_len: len,
            };
            if let Some(v) = self.ipcache.get(&key) {
                return v.id;
            }
        }
        IDENTITY_WORLD
    }

    /// Longest-prefix match in the policy trie, as `bpf_map_lookup_elem` on the LPM trie with
    /// a full-length key does. Only entries sharing the (endpoint, direction, identity) bytes can
    /// match, since every entry is at least that long (96 bits).
    pub fn lookup_policy(
        &self,
        ep_id: u32,
        dir: Direction,
        identity: u32,
        proto: u8,
        port: u16,
    ) -> Option<(LpmKey<PolicyKey>, u32)> {
        let probe = PolicyKey {
            ep_id_be: ep_id.to_be(),
            direction: dir.as_u8(),
            _pad: [0; 3],
            identity_be: identity.to_be(),
            proto,
            _pad2: 0,
            port_be: port.to_be(),
        };
        let lo = LpmKey {
            data: PolicyKey {
                proto: 0,
                _pad2: 0,
                port_be: 0,
                ..probe
            },
            prefix_len: 0,
        };
        let hi = LpmKey {
            data: PolicyKey {
                proto: u8::MAX,
                _pad2: u8::MAX,
                port_be: u16::MAX,
                ..probe
            },
            prefix_len: u32::MAX,
        };
        let want = key_bytes(&probe);
        self.policy
            .range(lo..=hi)
            .filter(|(k, _)| prefix_matches(&key_bytes(&k.data), &want, k.prefix_len))
            .max_by_key(|(k, _)| k.prefix_len)
            .map(|(k, v)| (*k, v.rule_id))
    }

    /// One side's judgement, as the kernel program of that direction makes it.
    fn judge(
        &self,
        local: IpAddr,
        peer: IpAddr,
        dir: Direction,
        proto: u8,
        port: u16,
    ) -> Judgement {
        let Some(ep) = self.endpoint(local) else {
            return Judgement::Unmanaged;
        };
        let ep_id = ep.ep_id;
        let isolated = match dir {
            Direction::Ingress => ep.flags & PEP_F_INGRESS_ISOLATED != 0,
            Direction::Egress => ep.flags & PEP_F_EGRESS_ISOLATED != 0,
        };
        if !isolated {
            return Judgement::NotIsolated { ep_id };
        }
        let identity = self.identity_of(peer);
        if dir == Direction::Ingress && identity == IDENTITY_HOST {
            return Judgement::FromHost { ep_id };
        }
        let found = self
            .lookup_policy(ep_id, dir, identity, proto, port)
            .or_else(|| self.lookup_policy(ep_id, dir, IDENTITY_ANY, proto, port));
        match found {
            Some((key, rule_id)) => Judgement::Allowed {
                ep_id,
                identity,
                rule_id,
                key,
            },
            None => Judgement::Denied { ep_id, identity },
        }
    }

    /// The endpoint map of `ip`'s family's entry for it.
    pub fn endpoint(&self, ip: impl Into<IpAddr>) -> Option<&PolicyEndpoint> {
        match ip.into() {
            IpAddr::V4(a) => self.endpoints.get(&addr_be(a)),
            IpAddr::V6(a) => self.endpoints6.get(&addr6_be(a)),
        }
    }

    /// A new connection `src → dst:dport/proto` (both of one family): the source's egress (if
    /// it is a local pod) and the destination's ingress (if it is one).
    pub fn verdict(
        &self,
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        proto: u8,
        dport: u16,
    ) -> Verdict {
        let (src, dst) = (src.into(), dst.into());
        Verdict {
            egress: self.judge(src, dst, Direction::Egress, proto, dport),
            ingress: self.judge(dst, src, Direction::Ingress, proto, dport),
        }
    }
}

impl PolicyState {
    /// See [`PolicyEntries::verdict`].
    pub fn verdict(
        &self,
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        proto: u8,
        dport: u16,
    ) -> Verdict {
        self.maps.verdict(src, dst, proto, dport)
    }
}

/// The key as the kernel's trie sees it: its bytes in memory order.
pub fn key_bytes(k: &PolicyKey) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&k.ep_id_be.to_ne_bytes());
    b[4] = k.direction;
    b[5..8].copy_from_slice(&k._pad);
    b[8..12].copy_from_slice(&k.identity_be.to_ne_bytes());
    b[12] = k.proto;
    b[13] = k._pad2;
    b[14..16].copy_from_slice(&k.port_be.to_ne_bytes());
    b
}

/// The first `bits` bits of `a` and `b` are equal (most significant bit of each byte first, as
/// the kernel's `longest_prefix_match` compares).
fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    let Ok(bits) = usize::try_from(bits) else {
        return false;
    };
    if bits > a.len() * 8 {
        return false;
    }
    let (full, rest) = (bits / 8, bits % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}
