//! The two address families in the desired state (docs/design/dualstack.md). The kernel keeps
//! twin frontend and backend tables per family (`SERVICES`/`SERVICES6`, `BACKENDS`/`BACKENDS6`)
//! sharing one value type and one id space; the compiler plans both with the same code and
//! these types carry either family's entry between its steps.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use twill_common::{Backend, Backend6, ServiceKey, ServiceKey6};

/// `ServiceKey6::addr_be` form of an address: four words in network order, as the kernel's
/// `bpf_sock_addr.user_ip6` holds it (the 16 bytes as they stand in the packet).
pub fn addr6_be(ip: Ipv6Addr) -> [u32; 4] {
    twill_common::addr6_from_octets(ip.octets())
}

/// Inverse of [`addr6_be`].
pub fn addr6_from_be(words: [u32; 4]) -> Ipv6Addr {
    Ipv6Addr::from(twill_common::addr6_octets(words))
}

/// `ServiceKey::addr_be` form of an IPv4 address (see `compile::addr_be`).
fn addr4_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// An address family (Kubernetes `ipFamilies` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpFamily {
    #[default]
    V4,
    V6,
}

impl IpFamily {
    /// The Kubernetes spelling (`spec.ipFamilies`, `addressType`).
    pub const fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

impl serde::Serialize for IpFamily {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A frontend of either family: the key of a `SERVICES` or `SERVICES6` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl FrontendKey {
    /// The key for `addr` (`None`: the `NodePort` wildcard, IPv4 address 0).
    pub fn new(addr: Option<IpAddr>, port_be: u16, proto: u8, scope: u8) -> Self {
        match addr {
            None => FrontendKey::V4(ServiceKey {
                addr_be: 0,
                port_be,
                proto,
                scope,
            }),
            Some(IpAddr::V4(a)) => FrontendKey::V4(ServiceKey {
                addr_be: addr4_be(a),
                port_be,
                proto,
                scope,
            }),
            Some(IpAddr::V6(a)) => FrontendKey::V6(ServiceKey6 {
                addr_be: addr6_be(a),
                port_be,
                proto,
                scope,
            }),
        }
    }

    /// The frontend's address; `None` for the `NodePort` wildcard.
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            FrontendKey::V4(k) if k.addr_be == 0 => None,
            FrontendKey::V4(k) => Some(IpAddr::V4(Ipv4Addr::from(k.addr_be.to_ne_bytes()))),
            FrontendKey::V6(k) => Some(IpAddr::V6(addr6_from_be(k.addr_be))),
        }
    }

    pub fn port_be(&self) -> u16 {
        match self {
            FrontendKey::V4(k) => k.port_be,
            FrontendKey::V6(k) => k.port_be,
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            FrontendKey::V4(k) => k.proto,
            FrontendKey::V6(k) => k.proto,
        }
    }

    pub fn scope(&self) -> u8 {
        match self {
            FrontendKey::V4(k) => k.scope,
            FrontendKey::V6(k) => k.scope,
        }
    }

    pub fn family(&self) -> IpFamily {
        match self {
            FrontendKey::V4(_) => IpFamily::V4,
            FrontendKey::V6(_) => IpFamily::V6,
        }
    }
}

impl From<ServiceKey> for FrontendKey {
    fn from(k: ServiceKey) -> Self {
        FrontendKey::V4(k)
    }
}

impl From<ServiceKey6> for FrontendKey {
    fn from(k: ServiceKey6) -> Self {
        FrontendKey::V6(k)
    }
}

/// A backend of either family: the value of a `BACKENDS` or `BACKENDS6` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyBackend {
    V4(Backend),
    V6(Backend6),
}

impl AnyBackend {
    pub fn new(addr: IpAddr, port: u16, proto: u8, flags: u8) -> Self {
        match addr {
            IpAddr::V4(a) => AnyBackend::V4(Backend {
                addr_be: addr4_be(a),
                port_be: port.to_be(),
                proto,
                flags,
            }),
            IpAddr::V6(a) => AnyBackend::V6(Backend6 {
                addr_be: addr6_be(a),
                port_be: port.to_be(),
                proto,
                flags,
            }),
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            AnyBackend::V4(b) => IpAddr::V4(Ipv4Addr::from(b.addr_be.to_ne_bytes())),
            AnyBackend::V6(b) => IpAddr::V6(addr6_from_be(b.addr_be)),
        }
    }

    /// Host order.
    pub fn port(&self) -> u16 {
        match self {
            AnyBackend::V4(b) => u16::from_be(b.port_be),
            AnyBackend::V6(b) => u16::from_be(b.port_be),
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            AnyBackend::V4(b) => b.proto,
            AnyBackend::V6(b) => b.proto,
        }
    }

    pub fn flags(&self) -> u8 {
        match self {
            AnyBackend::V4(b) => b.flags,
            AnyBackend::V6(b) => b.flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_round_trip_in_kernel_word_order() {
        let ip: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        let words = addr6_be(ip);
        // Each word holds four address bytes in memory order, as `user_ip6[i]` does.
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x10]);
        assert_eq!(words[3].to_ne_bytes(), [0, 0, 0, 0x0a]);
        assert_eq!(addr6_from_be(words), ip);
        let key = FrontendKey::new(Some(IpAddr::V6(ip)), 80u16.to_be(), 6, 0);
        assert_eq!(key.addr(), Some(IpAddr::V6(ip)));
        assert_eq!(key.family(), IpFamily::V6);
        let be = AnyBackend::new("fd00:1::5".parse().unwrap(), 8080, 17, 1);
        assert_eq!(be.addr(), "fd00:1::5".parse::<IpAddr>().unwrap());
        assert_eq!((be.port(), be.proto(), be.flags()), (8080, 17, 1));
    }
}
