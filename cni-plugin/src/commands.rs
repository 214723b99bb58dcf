//! Command dispatch: parse env and stdin, run one verb, write the result or the
//! error JSON. Commands only orchestrate IPAM and the [`Dataplane`] seam.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::Instant;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use crate::check::{self, CheckError, Expected};
use crate::config::{self, ConfigError, Family, NetConf};
use crate::dataplane::{self, Dataplane, DataplaneError, PodLinkSpec};
use crate::env::{self, Attachment, EnvError, Request};
use crate::ipam::{Ipam, IpamError};
use crate::logger::{Level, Logger};
use crate::result::{AddResult, Interface, IpConfig, Route};
use crate::version::CniVersion;

/// Plugin-specific error codes (SPEC.md reserves 100 and up for plugins).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const POOL_EXHAUSTED: u32 = 100;
    pub const NETLINK: u32 = 101;
    pub const LINK_EXISTS: u32 = 102;
    pub const SYSCTL: u32 = 103;
    pub const CHECK_FAILED: u32 = 104;
    pub const INTERNAL: u32 = 199;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("stdin is not a JSON network configuration: {0}")]
    Decode(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{verb} needs cniVersion {min} or newer; the configuration says {got}")]
    VerbNeedsVersion {
        verb: &'static str,
        min: CniVersion,
        got: CniVersion,
    },
    #[error(
        "GC needs \"cni.dev/valid-attachments\" in the configuration (an empty list releases everything)"
    )]
    GcWithoutValidAttachments,
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(
        "container {container_id} has no {ifname} attachment on this network (no IP reserved, no host interface)"
    )]
    UnknownContainer {
        container_id: String,
        ifname: String,
    },
    #[error("twill-cni cannot serve ADD: {0}")]
    NotAvailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            // A namespace path that does not open is an invalid CNI_NETNS.
            CniError::Env(_) | CniError::Dataplane(DataplaneError::Netns { .. }) => {
                code::INVALID_ENV
            }
            CniError::Decode(_) => code::DECODE,
            CniError::Config(c) => c.code(),
            CniError::VerbNeedsVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::GcWithoutValidAttachments
            | CniError::Check(CheckError::NoPrevResult | CheckError::BadPrevResult(_)) => {
                code::INVALID_CONFIG
            }
            CniError::Ipam(IpamError::Exhausted { .. }) => code::POOL_EXHAUSTED,
            CniError::Ipam(IpamError::Io { .. }) => code::IO,
            CniError::Ipam(IpamError::Busy { .. }) => code::TRY_AGAIN_LATER,
            CniError::Dataplane(DataplaneError::LinkExists { .. }) => code::LINK_EXISTS,
            CniError::Dataplane(DataplaneError::Sysctl { .. }) => code::SYSCTL,
            CniError::Dataplane(DataplaneError::Netlink { .. } | DataplaneError::Runtime(_)) => {
                code::NETLINK
            }
            CniError::Check(_) => code::CHECK_FAILED,
            CniError::UnknownContainer { .. } => code::UNKNOWN_CONTAINER,
            CniError::NotAvailable(_) => code::NOT_AVAILABLE,
            CniError::Internal(_) => code::INTERNAL,
        }
    }

    /// The error object of SPEC.md "Error": `msg` is this error, `details` its causes.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut details = Vec::new();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            details.push(s.to_string());
            src = s.source();
        }
        let mut v =
            json!({"cniVersion": version.as_str(), "code": self.code(), "msg": self.to_string()});
        if !details.is_empty() {
            v["details"] = json!(details.join(": "));
        }
        v
    }
}

/// Runs one invocation with injected environment, stdin and stdout. Returns the
/// process exit code (0 on success, 1 after writing an error object).
pub fn run<D: Dataplane, S: BuildHasher>(
    env: &HashMap<String, String, S>,
    stdin: &[u8],
    stdout: &mut dyn Write,
    dataplane: impl FnOnce() -> Result<D, DataplaneError>,
) -> i32 {
    let raw: Option<Value> = serde_json::from_slice(stdin).ok();
    let reply_version = raw
        .as_ref()
        .and_then(config::version_of)
        .unwrap_or(CniVersion::LATEST);
    let mut log = Logger::discard();
    let outcome = dispatch(env, stdin, raw.as_ref(), &mut log, dataplane);
    let written = match &outcome {
        Ok(None) => Ok(()),
        Ok(Some(v)) => write_json(stdout, v),
        Err(e) => {
            log.log(Level::Error, format_args!("{} (code {})", e, e.code()));
            write_json(stdout, &e.to_json(reply_version))
        }
    };
    match (outcome, written) {
        (Ok(_), Ok(())) => 0,
        (Ok(_), Err(e)) => {
            // stdout is gone; nothing can carry the error but the exit status.
            log.log(Level::Error, format_args!("writing the result failed: {e}"));
            1
        }
        (Err(_), _) => 1,
    }
}

fn write_json(out: &mut dyn Write, v: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    out.write_all(b"\n")?;
    out.flush()
}

fn dispatch<D: Dataplane, S: BuildHasher>(
    env: &HashMap<String, String, S>,
    stdin: &[u8],
    raw: Option<&Value>,
    log: &mut Logger,
    dataplane: impl FnOnce() -> Result<D, DataplaneError>,
) -> Result<Option<Value>, CniError> {
    let req = env::parse(env)?;
    if req == Request::Version {
        return Ok(Some(version_reply(raw)));
    }
    let Some(raw) = raw else {
        let why = serde_json::from_slice::<Value>(stdin)
            .err()
            .map_or_else(String::new, |e| e.to_string());
        return Err(CniError::Decode(why));
    };
    let conf = config::parse(raw)?;
    *log = Logger::open(&conf.log_file, conf.log_level);
    let started = Instant::now();
    let mut dp = dataplane()?;
    let out = match &req {
        Request::Add { att, netns } => {
            let namespace = env
                .get("CNI_ARGS")
                .and_then(|a| crate::dns::k8s_namespace(a));
            let dns = crate::dns::pod_dns(&conf.dns, namespace);
            add(&conf, att, netns, dns, &mut dp).map(Some)
        }
        Request::Del { att, .. } => del(&conf, att, &mut dp, log).map(|()| None),
        Request::Check { att, netns } => check(&conf, att, netns, &mut dp).map(|()| None),
        Request::Gc => gc(&conf, &mut dp).map(|()| None),
        Request::Status => status(&conf).map(|()| None),
        Request::Version => unreachable!("answered above"),
    };
    if out.is_ok() {
        let (id, ifname) = match &req {
            Request::Add { att, .. } | Request::Del { att, .. } | Request::Check { att, .. } => {
                (att.container_id.as_str(), att.ifname.as_str())
            }
            _ => ("-", "-"),
        };
        let ip = out
            .as_ref()
            .ok()
            .and_then(|o| o.as_ref())
            .and_then(|v| v["ips"].as_array())
            .map(|ips| {
                ips.iter()
                    .filter_map(|i| i["address"].as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        log.log(
            Level::Info,
            format_args!(
                "{} ok container={id} ifname={ifname} {ip} in {}us",
                req.command().as_str(),
                started.elapsed().as_micros()
            ),
        );
    }
    out
}

fn version_reply(raw: Option<&Value>) -> Value {
    let v = raw
        .and_then(config::version_of)
        .unwrap_or(CniVersion::LATEST);
    json!({
        "cniVersion": v.as_str(),
        "supportedVersions": CniVersion::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

/// Per family (primary first): its ranges and its gateway, as IPAM takes them.
fn ipam_families(conf: &NetConf) -> Vec<(Vec<IpNetwork>, IpAddr)> {
    conf.families()
        .into_iter()
        .map(|f| (conf.ranges(f), conf.gateway_of(f)))
        .collect()
}

fn add<D: Dataplane>(
    conf: &NetConf,
    att: &Attachment,
    netns: &std::path::Path,
    dns: crate::dns::Dns,
    dp: &mut D,
) -> Result<Value, CniError> {
    // Validate the namespace and make the node-wide setting before reserving
    // anything: these failures need no rollback.
    let ns = dp.open_netns(netns)?;
    let families = conf.families();
    dp.enable_forwarding(
        families.contains(&Family::V4),
        families.contains(&Family::V6),
    )?;
    let ipam = Ipam::new(&conf.state_dir, &conf.name);
    // The lock is held only for the reservations, not while links are made.
    let ips = ipam.lock()?.reserve_each(&ipam_families(conf), att)?;
    let spec = PodLinkSpec {
        host_if: dataplane::host_if_name(&att.container_id),
        host_mac: dataplane::host_mac(&att.container_id),
        pod_if: att.ifname.clone(),
        pod_mac: dataplane::pod_mac(&att.container_id, &att.ifname),
        mtu: conf.mtu,
        pod_ip4: ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }),
        gateway: conf.gateway,
        pod_ip6: ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }),
        gateway6: conf.gateway6,
    };
    let mut made = dp.create(&ns, &spec);
    if matches!(made, Err(DataplaneError::LinkExists { .. })) && dp.delete_retired_links()? > 0 {
        // A DEL for this container retired its link moments ago and the reaper
        // has not deleted it yet: the pod end still holds `CNI_IFNAME` in the pod
        // namespace. Delete retired links now and try once more.
        made = dp.create(&ns, &spec);
    }
    if let Err(e) = made {
        // `create` removed its links; give the addresses back too.
        if let Ok(l) = ipam.lock() {
            for ip in &ips {
                let _ = l.remove(*ip);
            }
        }
        return Err(e.into());
    }
    let result = AddResult {
        interfaces: vec![
            Interface {
                name: spec.host_if.clone(),
                mac: spec.host_mac,
                mtu: spec.mtu,
                sandbox: None,
            },
            Interface {
                name: spec.pod_if.clone(),
                mac: spec.pod_mac,
                mtu: spec.mtu,
                sandbox: Some(netns.to_string_lossy().into_owned()),
            },
        ],
        // In the order of the configuration's ranges: the primary family first.
        ips: ips
            .iter()
            .map(|ip| {
                let f = Family::of(*ip);
                IpConfig {
                    address: IpNetwork::new(*ip, f.host_prefix()).expect("host prefix is valid"),
                    gateway: Some(conf.gateway_of(f)),
                    interface: Some(1),
                }
            })
            .collect(),
        routes: ips
            .iter()
            .map(|ip| {
                let f = Family::of(*ip);
                let any = match f {
                    Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                };
                Route {
                    dst: IpNetwork::new(any, 0).expect("/0 is valid"),
                    gw: Some(conf.gateway_of(f)),
                }
            })
            .collect(),
        dns,
    };
    Ok(result.encode(conf.cni_version))
}

/// Links first, then addresses: a crash in between leaves an address reserved
/// with no link, which the next DEL or GC releases; never a link whose address
/// could be handed to another pod.
fn del<D: Dataplane>(
    conf: &NetConf,
    att: &Attachment,
    dp: &mut D,
    log: &mut Logger,
) -> Result<(), CniError> {
    let host_if = dataplane::host_if_name(&att.container_id);
    let ipam = Ipam::new(&conf.state_dir, &conf.name);
    // The host link is named after the container alone. When this attachment holds no
    // address but the container holds one under another interface name or in another
    // network, the link is that attachment's (a DEL for an interface this network never
    // attached, say after a failed ADD): leave it alone.
    let (mine, other_if) = {
        let locked = ipam.lock()?;
        let list = locked.list()?;
        let ours = |r: &&crate::ipam::Reservation| {
            r.owner
                .as_ref()
                .is_some_and(|o| o.container_id == att.container_id)
        };
        (
            list.iter()
                .filter(ours)
                .any(|r| r.owner.as_ref() == Some(att)),
            list.iter()
                .filter(ours)
                .any(|r| r.owner.as_ref() != Some(att)),
        )
    };
    let elsewhere = !mine
        && (other_if
            || ipam
                .other_networks_containers()?
                .contains(&att.container_id));
    let link = if elsewhere {
        "kept (another attachment's)"
    } else if dp.retire_host_link(&host_if)? {
        "retired"
    } else {
        "absent"
    };
    let released = ipam.lock()?.release(att)?;
    log.log(
        Level::Debug,
        format_args!(
            "DEL {} {}: link {host_if} {link}, released {released:?}",
            att.container_id, att.ifname
        ),
    );
    Ok(())
}

fn check<D: Dataplane>(
    conf: &NetConf,
    att: &Attachment,
    netns: &std::path::Path,
    dp: &mut D,
) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V0_4_0 {
        return Err(CniError::VerbNeedsVersion {
            verb: "CHECK",
            min: CniVersion::V0_4_0,
            got: conf.cni_version,
        });
    }
    let prev = conf.prev_result.as_ref().ok_or(CheckError::NoPrevResult)?;
    let prev = AddResult::decode(prev).map_err(CheckError::BadPrevResult)?;
    let host_if = dataplane::host_if_name(&att.container_id);
    let reserved = Ipam::new(&conf.state_dir, &conf.name).lock()?.find(att)?;
    let ns = dp.open_netns(netns)?;
    let observed = dp.observe(&ns, &host_if, &att.ifname)?;
    if reserved.is_empty() && observed.host_link.is_none() {
        return Err(CniError::UnknownContainer {
            container_id: att.container_id.clone(),
            ifname: att.ifname.clone(),
        });
    }
    for a in check::pod_addresses(&prev, &att.ifname) {
        if !reserved.contains(&a.ip()) {
            return Err(CheckError::ReservationMissing { ip: a.ip() }.into());
        }
    }
    check::compare(
        &Expected {
            prev: &prev,
            host_if: &host_if,
            host_mac: dataplane::host_mac(&att.container_id),
            pod_if: &att.ifname,
            mtu: conf.mtu,
            gateway: conf.gateway,
            gateway6: conf.gateway6,
        },
        &observed,
    )?;
    Ok(())
}

/// Releases every reservation and removes every host veth that does not belong
/// to an attachment the runtime still knows.
fn gc<D: Dataplane>(conf: &NetConf, dp: &mut D) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CniError::VerbNeedsVersion {
            verb: "GC",
            min: CniVersion::V1_1_0,
            got: conf.cni_version,
        });
    }
    let valid: HashSet<&Attachment> = conf
        .valid_attachments
        .as_ref()
        .ok_or(CniError::GcWithoutValidAttachments)?
        .iter()
        .collect();
    let valid_links: HashSet<String> = valid
        .iter()
        .map(|a| dataplane::host_if_name(&a.container_id))
        .collect();
    // Links of another Twill network's attachments are that network's GC's business (the
    // runtime lists only this network's attachments as valid).
    let ipam = Ipam::new(&conf.state_dir, &conf.name);
    let others: HashSet<String> = ipam
        .other_networks_containers()?
        .iter()
        .map(|c| dataplane::host_if_name(c))
        .collect();
    for link in dp.list_host_links()? {
        if !valid_links.contains(&link) && !others.contains(&link) {
            dp.delete_host_link(&link)?;
        }
    }
    // Links whose reaper never ran (killed, or the node rebooted mid-DEL).
    dp.delete_retired_links()?;
    let locked = ipam.lock()?;
    for r in locked.list()? {
        if !r.owner.as_ref().is_some_and(|o| valid.contains(o)) {
            locked.remove(r.ip)?;
        }
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CniError::VerbNeedsVersion {
            verb: "STATUS",
            min: CniVersion::V1_1_0,
            got: conf.cni_version,
        });
    }
    let ipam = Ipam::new(&conf.state_dir, &conf.name);
    let locked = ipam
        .lock()
        .map_err(|e| CniError::NotAvailable(format!("IPAM state is unusable: {e}")))?;
    // ADD needs an address of every family, so one exhausted family is enough to refuse.
    for (ranges, gateway) in ipam_families(conf) {
        let free = locked
            .free_count(&ranges, gateway)
            .map_err(|e| CniError::NotAvailable(format!("IPAM state is unusable: {e}")))?;
        if free == 0 {
            return Err(CniError::NotAvailable(format!(
                "no free address left in {}",
                ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}
