//! The ADD result, encoded for the configuration's CNI version, and the lenient
//! decoding of `prevResult` for CHECK.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use crate::version::CniVersion;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The netns path for the pod side; `None` for the host side.
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    /// The pod's resolver settings; empty encodes as `{}`.
    pub dns: crate::dns::Dns,
}

/// SPEC.md's DNS object: only the keys that have a value.
fn encode_dns(d: &crate::dns::Dns) -> Value {
    let mut o = serde_json::Map::new();
    if !d.nameservers.is_empty() {
        o.insert(
            "nameservers".into(),
            json!(
                d.nameservers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ),
        );
    }
    if let Some(domain) = &d.domain {
        o.insert("domain".into(), json!(domain));
    }
    if !d.search.is_empty() {
        o.insert("search".into(), json!(d.search));
    }
    if !d.options.is_empty() {
        o.insert("options".into(), json!(d.options));
    }
    Value::Object(o)
}

/// A `dns` section as another plugin may have written it: what does not parse is left out (it
/// is the runtime's to use, not ours to judge).
fn decode_dns(v: Option<&Value>) -> crate::dns::Dns {
    let strings = |k: &str| -> Vec<String> {
        v.and_then(|d| d.get(k))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    crate::dns::Dns {
        nameservers: strings("nameservers")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        domain: v
            .and_then(|d| d.get("domain"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        search: strings("search"),
        options: strings("options"),
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl AddResult {
    /// Encodes per SPEC.md "Success" for `version`: 0.3.x/0.4.0 carry `"version"` in IP
    /// entries; 1.1.0 adds interface `mtu`.
    pub fn encode(&self, version: CniVersion) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = json!({"name": i.name, "mac": mac_string(&i.mac)});
                if version.interfaces_carry_mtu() {
                    o["mtu"] = json!(i.mtu);
                }
                if let Some(s) = &i.sandbox {
                    o["sandbox"] = json!(s);
                }
                o
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = json!({"address": ip.address.to_string()});
                if version.ip_entries_carry_version() {
                    o["version"] = json!(if ip.address.is_ipv4() { "4" } else { "6" });
                }
                if let Some(i) = ip.interface {
                    o["interface"] = json!(i);
                }
                if let Some(g) = ip.gateway {
                    o["gateway"] = json!(g.to_string());
                }
                o
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = json!({"dst": r.dst.to_string()});
                if let Some(g) = r.gw {
                    o["gw"] = json!(g.to_string());
                }
                o
            })
            .collect();
        json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": encode_dns(&self.dns),
        })
    }

    /// Decodes a `prevResult` of any supported version. Unknown keys are ignored:
    /// chained plugins may have added to it.
    pub fn decode(v: &Value) -> Result<Self, String> {
        let arr = |k: &str| -> Result<Vec<Value>, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => Ok(a.clone()),
                Some(_) => Err(format!("\"{k}\" is not a list")),
            }
        };
        let str_field = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut interfaces = Vec::new();
        for (n, i) in arr("interfaces")?.iter().enumerate() {
            let name =
                str_field(i, "name").ok_or_else(|| format!("interfaces[{n}] has no name"))?;
            let mac = match str_field(i, "mac") {
                None => [0; 6],
                Some(m) => parse_mac(&m)
                    .ok_or_else(|| format!("interfaces[{n}].mac {m:?} is not a MAC address"))?,
            };
            let mtu = i
                .get("mtu")
                .and_then(Value::as_u64)
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0);
            interfaces.push(Interface {
                name,
                mac,
                mtu,
                sandbox: str_field(i, "sandbox").filter(|s| !s.is_empty()),
            });
        }
        let mut ips = Vec::new();
        for (n, ip) in arr("ips")?.iter().enumerate() {
            let a = str_field(ip, "address").ok_or_else(|| format!("ips[{n}] has no address"))?;
            let address = a
                .parse()
                .map_err(|_| format!("ips[{n}].address {a:?} is not a CIDR"))?;
            let gateway = match str_field(ip, "gateway") {
                None => None,
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| format!("ips[{n}].gateway {g:?} is not an IP"))?,
                ),
            };
            let interface = match ip.get("interface") {
                None | Some(Value::Null) => None,
                Some(i) => Some(
                    i.as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .filter(|i| *i < interfaces.len())
                        .ok_or_else(|| {
                            format!("ips[{n}].interface {i} is not an index into interfaces")
                        })?,
                ),
            };
            ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        let mut routes = Vec::new();
        for (n, r) in arr("routes")?.iter().enumerate() {
            let d = str_field(r, "dst").ok_or_else(|| format!("routes[{n}] has no dst"))?;
            let dst = d
                .parse()
                .map_err(|_| format!("routes[{n}].dst {d:?} is not a CIDR"))?;
            let gw = match str_field(r, "gw") {
                None => None,
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| format!("routes[{n}].gw {g:?} is not an IP"))?,
                ),
            };
            routes.push(Route { dst, gw });
        }
        Ok(AddResult {
            interfaces,
            ips,
            routes,
            dns: decode_dns(v.get("dns")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "twl0123456789a".into(),
                    mac: [2, 1, 2, 3, 4, 5],
                    mtu: 1500,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: [2, 0xaa, 0, 0, 0, 1],
                    mtu: 1500,
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: crate::dns::Dns::default(),
        }
    }

    #[test]
    fn encodes_1_0_0() {
        let v = sample().encode(CniVersion::V1_0_0);
        assert_eq!(
            v,
            json!({"cniVersion":"1.0.0",
              "interfaces":[{"name":"twl0123456789a","mac":"02:01:02:03:04:05"},
                            {"name":"eth0","mac":"02:aa:00:00:00:01","sandbox":"/run/netns/p"}],
              "ips":[{"address":"10.244.1.2/32","gateway":"169.254.1.1","interface":1}],
              "routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}],
              "dns":{}})
        );
    }

    #[test]
    fn encodes_per_version() {
        let v = sample().encode(CniVersion::V0_3_1);
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v["interfaces"][0].get("mtu").is_none());
        let v = sample().encode(CniVersion::V0_4_0);
        assert_eq!(v["ips"][0]["version"], "4");
        let v = sample().encode(CniVersion::V1_1_0);
        assert_eq!(v["interfaces"][1]["mtu"], 1500);
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn decode_round_trips_every_version() {
        for ver in CniVersion::ALL {
            let mut back = AddResult::decode(&sample().encode(ver)).unwrap();
            let mut want = sample();
            if !ver.interfaces_carry_mtu() {
                for i in &mut want.interfaces {
                    i.mtu = 0;
                }
            }
            back.interfaces
                .iter_mut()
                .zip(&want.interfaces)
                .for_each(|(b, w)| assert_eq!(b.mtu, w.mtu));
            back.interfaces.iter_mut().for_each(|i| i.mtu = 0);
            want.interfaces.iter_mut().for_each(|i| i.mtu = 0);
            assert_eq!(back, want, "{ver}");
        }
    }

    #[test]
    fn decode_rejects_nonsense() {
        assert!(AddResult::decode(&json!({"ips": 3})).is_err());
        assert!(AddResult::decode(&json!({"ips": [{"address": "x"}]})).is_err());
        assert!(
            AddResult::decode(&json!({"ips": [{"address": "10.0.0.1/32", "interface": 0}]}))
                .is_err()
        );
        assert!(AddResult::decode(&json!({"interfaces": [{"name": "a", "mac": "zz"}]})).is_err());
        assert_eq!(parse_mac("02:aa:00:00:00:01"), Some([2, 0xaa, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:aa:00:00:00"), None);
    }
}
