//! Network configuration: raw JSON from stdin parsed into a typed [`NetConf`].
//!
//! "Parse, don't validate": each field has one function that turns the raw JSON
//! value into its typed form or into one [`ConfigError`] variant whose message says
//! what to change. Unknown keys are ignored because runtimes inject their own
//! (`runtimeConfig`, `args`, `capabilities`, ...).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use crate::env::{self, Attachment};
use crate::logger::Level;
use crate::version::CniVersion;

/// The value of `"type"` that names this plugin (its binary in `CNI_PATH`).
pub const PLUGIN_TYPE: &str = "twill-cni";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop: link-local, so it is never inside a pod range, and the same
/// on every host veth (a link-local address is scoped to its link).
pub const DEFAULT_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/twill";
pub const DEFAULT_LOG_FILE: &str = "/var/log/twill-cni.log";
/// veth accepts 68 (IPv4 minimum) up to `ETH_MAX_MTU`.
const MTU_RANGE: std::ops::RangeInclusive<u64> = 68..=65535;
/// IPv6 needs every link to carry 1280 bytes (RFC 8200 section 5); below it the kernel
/// removes IPv6 from the interface altogether.
pub const IPV6_MIN_MTU: u32 = 1280;

/// An address family, in the order a Node lists its pod CIDRs (the first is the primary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// Host prefix length: a pod's address and its host-side route are one host wide.
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// The typed network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    /// Pod ranges of one or both families, in the order given (the first is the primary
    /// family: its address comes first in the result).
    pub pod_cidrs: Vec<IpNetwork>,
    pub mtu: u32,
    pub gateway: Ipv4Addr,
    /// The IPv6 next hop (`"gateway6"`), link-local.
    pub gateway6: Ipv6Addr,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
    pub log_level: Level,
    /// The previous plugin's (or, for DEL/CHECK, our own) result, still raw: it is
    /// only decoded by the verbs that need it.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments`, present for GC.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `dns`: the node's nameservers, the cluster zone (`domain`), extra search entries and
    /// resolver options the ADD result hands to the runtime (see [`crate::dns`]).
    pub dns: crate::dns::Dns,
}

impl NetConf {
    /// The families of the pod ranges, primary first, each once.
    pub fn families(&self) -> Vec<Family> {
        let mut out = Vec::with_capacity(2);
        for n in &self.pod_cidrs {
            let f = Family::of(n.ip());
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// The pod ranges of one family.
    pub fn ranges(&self, family: Family) -> Vec<IpNetwork> {
        self.pod_cidrs
            .iter()
            .copied()
            .filter(|n| Family::of(n.ip()) == family)
            .collect()
    }

    /// The pod's next hop in `family`.
    pub fn gateway_of(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.gateway),
            Family::V6 => IpAddr::V6(self.gateway6),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the network configuration must be a JSON object")]
    NotAnObject,
    #[error(
        "\"cniVersion\" is missing; set it to one of {}",
        CniVersion::supported_list()
    )]
    MissingVersion,
    #[error("\"cniVersion\": {0:?} is not supported; use one of {list}", list = CniVersion::supported_list())]
    IncompatibleVersion(String),
    #[error("\"name\" is missing; set it to the network name (e.g. \"twill\")")]
    MissingName,
    #[error(
        "\"name\": {0:?} is invalid; use letters, digits, '_', '.' and '-' only (it names the IPAM state directory)"
    )]
    BadName(String),
    #[error(
        "\"type\": {0} names another plugin; this is twill-cni, so set \"type\" to \"twill-cni\" (or point the runtime at the plugin that config is for)"
    )]
    WrongType(String),
    #[error(
        "\"podCIDRs\" is missing or empty; set it to the node's pod CIDR, e.g. [\"10.244.1.0/24\"]"
    )]
    MissingPodCidrs,
    #[error("\"podCIDRs\" entry {0} is not a CIDR string like \"10.244.1.0/24\"")]
    PodCidrNotString(String),
    #[error("\"podCIDRs\" entry {0:?} is not a valid CIDR ({1})")]
    BadPodCidr(String, String),
    #[error("\"podCIDRs\" entry {given:?} has host bits set; use {canonical:?}")]
    PodCidrHostBits { given: String, canonical: String },
    #[error(
        "\"podCIDRs\" entry {0:?} is too small: IPv4 ranges need a prefix of /30 or shorter to have usable addresses"
    )]
    PodCidrTooSmall(String),
    #[error(
        "\"podCIDRs\" entry {0:?} is too small: IPv6 ranges need a prefix of /126 or shorter to have usable addresses"
    )]
    PodCidr6TooSmall(String),
    #[error("\"podCIDRs\" entries {0:?} and {1:?} overlap; list each range once")]
    PodCidrsOverlap(String, String),
    #[error("\"mtu\": {0} is invalid; use an integer from 68 to 65535")]
    BadMtu(String),
    #[error("\"gateway\": {0} is invalid; use a unicast IPv4 address such as \"169.254.1.1\"")]
    BadGateway(String),
    #[error(
        "\"gateway6\": {0} is invalid; use a link-local unicast IPv6 address (fe80::/10) such as \"fe80::1\""
    )]
    BadGateway6(String),
    #[error(
        "\"mtu\": {0} is below 1280, the minimum IPv6 needs, and \"podCIDRs\" has an IPv6 range; raise the MTU or drop the IPv6 range"
    )]
    MtuTooSmallForIpv6(u32),
    #[error("\"{key}\": {value} is invalid; use an absolute path")]
    BadPath { key: &'static str, value: String },
    #[error(
        "\"logLevel\": {0} is invalid; use one of \"off\", \"error\", \"warn\", \"info\", \"debug\""
    )]
    BadLogLevel(String),
    #[error(
        "\"ipam\" is set, but twill-cni has built-in IPAM configured by \"podCIDRs\"; remove the \"ipam\" section"
    )]
    UnsupportedIpam,
    #[error(
        "\"cni.dev/valid-attachments\" is invalid: {0}; it must be a list of {{\"containerID\": ..., \"ifname\": ...}}"
    )]
    BadValidAttachments(String),
    #[error(
        "\"dns\" is invalid: {0}; use {{\"nameservers\": [\"169.254.20.10\"], \"domain\": \"cluster.local\", \"search\": [...], \"options\": [\"ndots:5\"]}}"
    )]
    BadDns(String),
}

impl ConfigError {
    /// The CNI error code (SPEC.md "Error codes").
    pub fn code(&self) -> u32 {
        match self {
            ConfigError::MissingVersion | ConfigError::IncompatibleVersion(_) => 1,
            ConfigError::UnsupportedIpam => 2,
            _ => 7,
        }
    }
}

/// Reads only `cniVersion`, so that even a config that fails later is answered in
/// the version it asked for.
pub fn version_of(raw: &Value) -> Option<CniVersion> {
    raw.get("cniVersion")
        .and_then(Value::as_str)
        .and_then(CniVersion::parse)
}

pub fn parse(raw: &Value) -> Result<NetConf, ConfigError> {
    let obj = raw.as_object().ok_or(ConfigError::NotAnObject)?;
    // The version first: an incompatible one is code 1 whatever else is wrong.
    let cni_version = cni_version(obj.get("cniVersion"))?;
    plugin_type(obj.get("type"))?;
    let pod_cidrs = pod_cidrs(obj.get("podCIDRs"))?;
    let mtu = mtu(obj.get("mtu"))?;
    if mtu < IPV6_MIN_MTU && pod_cidrs.iter().any(IpNetwork::is_ipv6) {
        return Err(ConfigError::MtuTooSmallForIpv6(mtu));
    }
    Ok(NetConf {
        cni_version,
        name: name(obj.get("name"))?,
        pod_cidrs,
        mtu,
        gateway: gateway(obj.get("gateway"))?,
        gateway6: gateway6(obj.get("gateway6"))?,
        state_dir: abs_path("stateDir", obj.get("stateDir"), DEFAULT_STATE_DIR)?,
        log_file: abs_path("logFile", obj.get("logFile"), DEFAULT_LOG_FILE)?,
        log_level: log_level(obj.get("logLevel"))?,
        prev_result: obj.get("prevResult").filter(|v| !v.is_null()).cloned(),
        valid_attachments: valid_attachments(obj.get("cni.dev/valid-attachments"))?,
        dns: dns(obj.get("dns"))?,
    })
    .and_then(|c| no_ipam(obj).map(|()| c))
}

/// The `dns` key (SPEC.md "Network configuration"): every field optional, each a string or a
/// list of strings; nameservers must be IP addresses.
fn dns(v: Option<&Value>) -> Result<crate::dns::Dns, ConfigError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(crate::dns::Dns::default()),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(ConfigError::BadDns(format!("{other} is not an object"))),
    };
    let strings = |key: &str| -> Result<Vec<String>, ConfigError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_owned).ok_or_else(|| {
                        ConfigError::BadDns(format!("{key} entry {x} is not a string"))
                    })
                })
                .collect(),
            Some(other) => Err(ConfigError::BadDns(format!("{key} {other} is not a list"))),
        }
    };
    let nameservers = strings("nameservers")?
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| ConfigError::BadDns(format!("nameserver {s:?} is not an IP address")))
        })
        .collect::<Result<_, _>>()?;
    let domain = match obj.get("domain") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) if !d.trim_matches('.').is_empty() => {
            Some(d.trim_matches('.').to_ascii_lowercase())
        }
        Some(other) => return Err(ConfigError::BadDns(format!("domain {other} is not a name"))),
    };
    Ok(crate::dns::Dns {
        nameservers,
        domain,
        search: strings("search")?,
        options: strings("options")?,
    })
}

fn cni_version(v: Option<&Value>) -> Result<CniVersion, ConfigError> {
    match v {
        None | Some(Value::Null) => Err(ConfigError::MissingVersion),
        Some(Value::String(s)) => {
            CniVersion::parse(s).ok_or_else(|| ConfigError::IncompatibleVersion(s.clone()))
        }
        Some(other) => Err(ConfigError::IncompatibleVersion(other.to_string())),
    }
}

fn name(v: Option<&Value>) -> Result<String, ConfigError> {
    let s = match v {
        None | Some(Value::Null) => return Err(ConfigError::MissingName),
        Some(Value::String(s)) => s,
        Some(other) => return Err(ConfigError::BadName(other.to_string())),
    };
    let ok = !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(s.clone())
    } else {
        Err(ConfigError::BadName(s.clone()))
    }
}

/// The runtime picks the binary by `type`, so a mismatch means the config was meant
/// for another plugin (or was copied and not edited); acting on it would wire pods
/// with a config nobody wrote for us. Absent is accepted for hand-fed stdin.
fn plugin_type(v: Option<&Value>) -> Result<(), ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == PLUGIN_TYPE => Ok(()),
        Some(other) => Err(ConfigError::WrongType(other.to_string())),
    }
}

fn pod_cidrs(v: Option<&Value>) -> Result<Vec<IpNetwork>, ConfigError> {
    let list = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => return Err(ConfigError::MissingPodCidrs),
    };
    let mut out: Vec<IpNetwork> = Vec::with_capacity(list.len());
    for item in list {
        let s = item
            .as_str()
            .ok_or_else(|| ConfigError::PodCidrNotString(item.to_string()))?;
        let net = pod_cidr(s)?;
        if let Some(other) = out
            .iter()
            .find(|o| o.contains(net.network()) || net.contains(o.network()))
        {
            return Err(ConfigError::PodCidrsOverlap(
                other.to_string(),
                s.to_owned(),
            ));
        }
        out.push(net);
    }
    Ok(out)
}

fn pod_cidr(s: &str) -> Result<IpNetwork, ConfigError> {
    let net: IpNetwork = s.parse().map_err(|e: ipnetwork::IpNetworkError| {
        ConfigError::BadPodCidr(s.to_owned(), e.to_string())
    })?;
    if !s.contains('/') {
        return Err(ConfigError::BadPodCidr(
            s.to_owned(),
            "no prefix length".into(),
        ));
    }
    let canonical = IpNetwork::new(net.network(), net.prefix()).expect("prefix already validated");
    if canonical.ip() != net.ip() {
        return Err(ConfigError::PodCidrHostBits {
            given: s.to_owned(),
            canonical: canonical.to_string(),
        });
    }
    match net {
        IpNetwork::V4(v4) if v4.prefix() > 30 => Err(ConfigError::PodCidrTooSmall(s.to_owned())),
        IpNetwork::V6(v6) if v6.prefix() > 126 => Err(ConfigError::PodCidr6TooSmall(s.to_owned())),
        IpNetwork::V4(_) | IpNetwork::V6(_) => Ok(canonical),
    }
}

fn mtu(v: Option<&Value>) -> Result<u32, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(DEFAULT_MTU),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|m| MTU_RANGE.contains(m))
            .and_then(|m| u32::try_from(m).ok())
            .ok_or_else(|| ConfigError::BadMtu(n.to_string())),
        Some(other) => Err(ConfigError::BadMtu(other.to_string())),
    }
}

fn gateway(v: Option<&Value>) -> Result<Ipv4Addr, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(DEFAULT_GATEWAY),
        Some(Value::String(s)) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a))
                if !(a.is_unspecified()
                    || a.is_multicast()
                    || a.is_broadcast()
                    || a.is_loopback()) =>
            {
                Ok(a)
            }
            _ => Err(ConfigError::BadGateway(format!("{s:?}"))),
        },
        Some(other) => Err(ConfigError::BadGateway(other.to_string())),
    }
}

/// Link-local only: the pod reaches it on its one link whatever the node's addressing, it
/// can never collide with a pod address, and the kernel accepts a link-local next hop
/// without an on-link route.
fn gateway6(v: Option<&Value>) -> Result<Ipv6Addr, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(DEFAULT_GATEWAY6),
        Some(Value::String(s)) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) if a.is_unicast_link_local() => Ok(a),
            _ => Err(ConfigError::BadGateway6(format!("{s:?}"))),
        },
        Some(other) => Err(ConfigError::BadGateway6(other.to_string())),
    }
}

fn abs_path(key: &'static str, v: Option<&Value>, default: &str) -> Result<PathBuf, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(PathBuf::from(default)),
        Some(Value::String(s)) if s.starts_with('/') && !s.contains('\0') => Ok(PathBuf::from(s)),
        Some(other) => Err(ConfigError::BadPath {
            key,
            value: other.to_string(),
        }),
    }
}

fn log_level(v: Option<&Value>) -> Result<Level, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Level::Info),
        Some(Value::String(s)) => {
            Level::parse(s).ok_or_else(|| ConfigError::BadLogLevel(format!("{s:?}")))
        }
        Some(other) => Err(ConfigError::BadLogLevel(other.to_string())),
    }
}

/// A delegated IPAM section would be silently ignored otherwise; refuse it instead.
fn no_ipam(obj: &Map<String, Value>) -> Result<(), ConfigError> {
    match obj.get("ipam") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(m)) if m.is_empty() => Ok(()),
        Some(_) => Err(ConfigError::UnsupportedIpam),
    }
}

fn valid_attachments(v: Option<&Value>) -> Result<Option<Vec<Attachment>>, ConfigError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ConfigError::BadValidAttachments("not a list".into())),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = |k: &str| {
            item.get(k).and_then(Value::as_str).ok_or_else(|| {
                ConfigError::BadValidAttachments(format!("entry {i} has no string {k:?}"))
            })
        };
        let container_id = field("containerID")?.to_owned();
        let ifname = env::ifname(field("ifname")?)
            .map_err(|e| ConfigError::BadValidAttachments(format!("entry {i}: {e}")))?;
        out.push(Attachment {
            container_id,
            ifname,
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"cniVersion": "1.0.0", "name": "twill", "type": "twill-cni", "podCIDRs": ["10.244.1.0/24"]})
    }

    fn with(key: &str, v: Value) -> Value {
        let mut b = base();
        b.as_object_mut().unwrap().insert(key.into(), v);
        b
    }

    #[test]
    fn defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "twill");
        assert_eq!(
            c.pod_cidrs,
            vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.gateway, DEFAULT_GATEWAY);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/twill"));
        assert_eq!(c.log_file, PathBuf::from("/var/log/twill-cni.log"));
        assert_eq!(c.log_level, Level::Info);
        assert!(c.prev_result.is_none() && c.valid_attachments.is_none());
    }

    #[test]
    fn the_agent_format_parses() {
        let raw = json!({"cniVersion":"1.1.0","name":"twill","type":"twill-cni","podCIDRs":["10.244.1.0/24"],
            "mtu":1450,"gateway":"169.254.1.1","stateDir":"/tmp/x","logFile":"/tmp/x.log","logLevel":"debug",
            "runtimeConfig":{"portMappings":[]},"capabilities":{"portMappings":true}});
        let c = parse(&raw).unwrap();
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.log_level, Level::Debug);
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "a table with one row per rule")]
    fn one_error_per_rule() {
        let cases: Vec<(Value, ConfigError)> = vec![
            (json!([]), ConfigError::NotAnObject),
            (with("cniVersion", Value::Null), ConfigError::MissingVersion),
            (
                with("cniVersion", json!("0.2.0")),
                ConfigError::IncompatibleVersion("0.2.0".into()),
            ),
            (with("name", Value::Null), ConfigError::MissingName),
            (
                with("name", json!("../x")),
                ConfigError::BadName("../x".into()),
            ),
            (
                with("type", json!("bridge")),
                ConfigError::WrongType("\"bridge\"".into()),
            ),
            (with("type", json!(1)), ConfigError::WrongType("1".into())),
            (with("podCIDRs", json!([])), ConfigError::MissingPodCidrs),
            (
                with("podCIDRs", json!([5])),
                ConfigError::PodCidrNotString("5".into()),
            ),
            (
                with("podCIDRs", json!(["10.0.0.0/33"])),
                ConfigError::BadPodCidr("10.0.0.0/33".into(), String::new()),
            ),
            (
                with("podCIDRs", json!(["10.0.0.1"])),
                ConfigError::BadPodCidr("10.0.0.1".into(), String::new()),
            ),
            (
                with("podCIDRs", json!(["10.244.1.7/24"])),
                ConfigError::PodCidrHostBits {
                    given: "10.244.1.7/24".into(),
                    canonical: "10.244.1.0/24".into(),
                },
            ),
            (
                with("podCIDRs", json!(["10.0.0.0/31"])),
                ConfigError::PodCidrTooSmall("10.0.0.0/31".into()),
            ),
            (
                with("podCIDRs", json!(["fd00::/127"])),
                ConfigError::PodCidr6TooSmall("fd00::/127".into()),
            ),
            (
                with("podCIDRs", json!(["fd00::1/64"])),
                ConfigError::PodCidrHostBits {
                    given: "fd00::1/64".into(),
                    canonical: "fd00::/64".into(),
                },
            ),
            (
                with(
                    "podCIDRs",
                    json!(["fd00::/48", "10.0.0.0/24", "fd00:0:0:1::/64"]),
                ),
                ConfigError::PodCidrsOverlap("fd00::/48".into(), "fd00:0:0:1::/64".into()),
            ),
            (
                with("podCIDRs", json!(["10.0.0.0/16", "10.0.1.0/24"])),
                ConfigError::PodCidrsOverlap("10.0.0.0/16".into(), "10.0.1.0/24".into()),
            ),
            (with("mtu", json!(67)), ConfigError::BadMtu("67".into())),
            (
                with("mtu", json!("1500")),
                ConfigError::BadMtu("\"1500\"".into()),
            ),
            (
                with("mtu", json!(1500.5)),
                ConfigError::BadMtu("1500.5".into()),
            ),
            (
                with("gateway", json!("224.0.0.1")),
                ConfigError::BadGateway("\"224.0.0.1\"".into()),
            ),
            (
                with("gateway", json!("fe80::1")),
                ConfigError::BadGateway("\"fe80::1\"".into()),
            ),
            (
                with("gateway6", json!("fd00::1")),
                ConfigError::BadGateway6("\"fd00::1\"".into()),
            ),
            (
                with("gateway6", json!("169.254.1.1")),
                ConfigError::BadGateway6("\"169.254.1.1\"".into()),
            ),
            (
                with("gateway6", json!(1)),
                ConfigError::BadGateway6("1".into()),
            ),
            (
                {
                    let mut b = with("podCIDRs", json!(["10.0.0.0/24", "fd00::/64"]));
                    b["mtu"] = json!(1000);
                    b
                },
                ConfigError::MtuTooSmallForIpv6(1000),
            ),
            (
                with("stateDir", json!("rel")),
                ConfigError::BadPath {
                    key: "stateDir",
                    value: "\"rel\"".into(),
                },
            ),
            (
                with("logFile", json!(1)),
                ConfigError::BadPath {
                    key: "logFile",
                    value: "1".into(),
                },
            ),
            (
                with("logLevel", json!("loud")),
                ConfigError::BadLogLevel("\"loud\"".into()),
            ),
            (
                with("ipam", json!({"type": "host-local"})),
                ConfigError::UnsupportedIpam,
            ),
            (
                with("cni.dev/valid-attachments", json!([{"containerID": "a"}])),
                ConfigError::BadValidAttachments("entry 0 has no string \"ifname\"".into()),
            ),
        ];
        for (raw, want) in cases {
            let got = parse(&raw).unwrap_err();
            // The parse error text of ipnetwork is not ours to pin.
            match (&got, &want) {
                (ConfigError::BadPodCidr(a, _), ConfigError::BadPodCidr(b, _)) => assert_eq!(a, b),
                _ => assert_eq!(got, want, "for {raw}"),
            }
            assert!(!got.to_string().is_empty());
        }
    }

    /// "[Feature:IPv6DualStack] should have ipv4 and ipv6 internal node ip": a Node's
    /// podCIDRs may be one range of each family in either order, or IPv6 only.
    #[test]
    fn dual_stack_and_ipv6_only_pod_cidrs() {
        let v4_first = parse(&with(
            "podCIDRs",
            json!(["10.244.1.0/24", "fd00:10:244:1::/64"]),
        ))
        .unwrap();
        assert_eq!(v4_first.families(), [Family::V4, Family::V6]);
        assert_eq!(v4_first.gateway6, DEFAULT_GATEWAY6);
        assert_eq!(
            v4_first.ranges(Family::V6),
            ["fd00:10:244:1::/64".parse::<IpNetwork>().unwrap()]
        );
        let v6_first = parse(&with(
            "podCIDRs",
            json!(["fd00:10:244:1::/64", "10.244.1.0/24"]),
        ))
        .unwrap();
        assert_eq!(v6_first.families(), [Family::V6, Family::V4]);
        assert_eq!(v6_first.gateway_of(Family::V4), IpAddr::V4(DEFAULT_GATEWAY));
        let only6 = parse(&with("podCIDRs", json!(["fd00:10:244:1::/64"]))).unwrap();
        assert_eq!(only6.families(), [Family::V6]);
        assert!(only6.ranges(Family::V4).is_empty());
        let mut custom = with("podCIDRs", json!(["fd00::/120"]));
        custom["gateway6"] = json!("fe80::a:1");
        custom["mtu"] = json!(1280);
        let c = parse(&custom).unwrap();
        assert_eq!(
            c.gateway_of(Family::V6),
            "fe80::a:1".parse::<IpAddr>().unwrap()
        );
        // A small MTU is fine while no range is IPv6.
        assert!(parse(&with("mtu", json!(576))).is_ok());
    }

    #[test]
    fn type_may_be_absent() {
        let mut b = base();
        b.as_object_mut().unwrap().remove("type");
        assert!(parse(&b).is_ok());
        assert!(parse(&with("type", Value::Null)).is_ok());
        let msg = parse(&with("type", json!("ptp"))).unwrap_err().to_string();
        assert!(
            msg.contains("\"twill-cni\"") && msg.contains("\"ptp\""),
            "{msg}"
        );
    }

    #[test]
    fn codes() {
        assert_eq!(ConfigError::IncompatibleVersion(String::new()).code(), 1);
        assert_eq!(ConfigError::UnsupportedIpam.code(), 2);
        assert_eq!(ConfigError::BadMtu(String::new()).code(), 7);
    }

    #[test]
    fn empty_ipam_and_valid_attachments() {
        assert!(parse(&with("ipam", json!({}))).is_ok());
        let c = parse(&with(
            "cni.dev/valid-attachments",
            json!([{"containerID": "a", "ifname": "eth0"}]),
        ))
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
    }
}
