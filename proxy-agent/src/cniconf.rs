//! The CNI network config for `twill-cni` (`<cni-conf-dir>/10-twill.conflist`), written once
//! this Node's `spec.podCIDRs` are known. The format is the one `twill-cni` parses.
use std::io::Write;
use std::path::{Path, PathBuf};

use ipnetwork::{IpNetwork, Ipv4Network};
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use crate::config::CNI_CONF_FILE;

/// The pod gateway address twill-cni configures (link-local, answered by a static neighbour
/// entry in the pod pointing at the host veth's MAC; see cni-plugin/README.md).
pub const POD_GATEWAY: &str = "169.254.1.1";

#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The version runtimes that predate `cniVersions` read. libcni before 1.2 (containerd 1.6 and
/// 1.7, measured with containerd 1.6 in `tests/tests/cri_containerd.rs`) cannot decode a 1.1.0
/// result and fails every ADD with "unsupported CNI result version", so this stays 1.0.0.
const CNI_VERSION: &str = "1.0.0";
/// Every version the list works at (CNI spec 1.1 `cniVersions`): a runtime that reads it picks
/// the highest it supports, so libcni ≥ 1.2 runs the plugins at 1.1.0 (GC, STATUS).
/// <https://github.com/containernetworking/cni/blob/main/SPEC.md#version-considerations>
const CNI_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: &'static str,
    cni_versions: [&'static str; 2],
    name: &'static str,
    plugins: Vec<Entry<'a>>,
}

/// One plugin of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
enum Entry<'a> {
    Twill(Plugin<'a>),
    Portmap(Portmap),
}

/// The reference `portmap` plugin chained after twill-cni for pods' `hostPort`s: the runtime
/// passes the pod's port mappings to plugins declaring the `portMappings` capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Portmap {
    #[serde(rename = "type")]
    kind: &'static str,
    capabilities: PortmapCapabilities,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PortmapCapabilities {
    port_mappings: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Plugin<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
    mtu: u32,
    gateway: &'static str,
    state_dir: &'a Path,
    log_file: PathBuf,
    /// The pod's resolver settings, which twill-cni turns into its result's `dns` section.
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<PluginDns<'a>>,
}

/// The network configuration's `dns` key (SPEC.md "Network configuration").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct PluginDns<'a> {
    nameservers: [String; 1],
    domain: &'a str,
    options: [&'static str; 1],
}

/// The node-local DNS responder as pods use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodDns<'a> {
    pub nameserver: std::net::IpAddr,
    /// The cluster's DNS zone.
    pub domain: &'a str,
}

impl<'a> PodDns<'a> {
    /// The pods' nameserver when the responder listens on a specific address at port 53
    /// (resolv.conf has no port syntax; a wildcard is no address to give a pod).
    pub fn of(bind: Option<std::net::SocketAddr>, domain: &'a str) -> Option<Self> {
        let bind = bind?;
        (bind.port() == 53 && !bind.ip().is_unspecified() && !bind.ip().is_loopback()).then_some(
            Self {
                nameserver: bind.ip(),
                domain,
            },
        )
    }
}

/// The IPv4 pod CIDRs of a Node (`spec.podCIDRs`, else the older `spec.podCIDR`): the IPv4
/// part of [`pod_cidrs_all`], which the Service datapath (IPv4-only for now) uses.
pub fn pod_cidrs(node: &Node) -> Vec<Ipv4Network> {
    pod_cidrs_all(node)
        .into_iter()
        .filter_map(|n| match n {
            IpNetwork::V4(v4) => Some(v4),
            IpNetwork::V6(_) => None,
        })
        .collect()
}

/// Every pod CIDR of a Node in its order (the first is the primary family), IPv4 and IPv6:
/// what the conflist carries, so twill-cni gives pods an address of each family. Unparsable
/// entries are skipped with a warning.
pub fn pod_cidrs_all(node: &Node) -> Vec<IpNetwork> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let raw: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    raw.into_iter()
        .filter_map(|c| match c.parse::<IpNetwork>() {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!("Node podCIDR {c:?} is not a CIDR: {e}");
                None
            }
        })
        .collect()
}

/// The conflist bytes for these pod CIDRs; `chain_portmap` appends the `portmap` plugin (which
/// must then be installed next to twill-cni) so pods' hostPorts work.
pub fn render(
    pod_cidrs: &[IpNetwork],
    mtu: u32,
    state_dir: &Path,
    chain_portmap: bool,
    dns: Option<PodDns<'_>>,
) -> Vec<u8> {
    let mut plugins = vec![Entry::Twill(Plugin {
        kind: "twill-cni",
        pod_cidrs: pod_cidrs.iter().map(ToString::to_string).collect(),
        mtu,
        gateway: POD_GATEWAY,
        state_dir,
        log_file: state_dir.join("cni.log"),
        // ndots:5 as the kubelet writes for ClusterFirst pods: `web.demo` tries the search
        // list before the name as given.
        dns: dns.map(|d| PluginDns {
            nameservers: [d.nameserver.to_string()],
            domain: d.domain,
            options: ["ndots:5"],
        }),
    })];
    if chain_portmap {
        plugins.push(Entry::Portmap(Portmap {
            kind: "portmap",
            capabilities: PortmapCapabilities {
                port_mappings: true,
            },
        }));
    }
    let conf = Conflist {
        cni_version: CNI_VERSION,
        cni_versions: CNI_VERSIONS,
        name: "twill",
        plugins,
    };
    let mut out = serde_json::to_vec_pretty(&conf).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Writes the conflist when its content differs from what is on disk (temp file + fsync +
/// rename, so the runtime never reads a partial file). Returns whether it wrote.
pub fn write_if_changed(dir: &Path, content: &[u8]) -> Result<bool, CniConfError> {
    let path = dir.join(CNI_CONF_FILE);
    if std::fs::read(&path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let err = |source| CniConfError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    // A dot-name without the .conflist suffix: runtimes never pick up the temporary file.
    let tmp = dir.join(format!(".{CNI_CONF_FILE}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(true)
}

/// Writes this node's conflist whenever what goes into it changes: the Node's pod CIDRs and
/// the MTU pods must use (`--cni-mtu`, lowered to what the route plan allows). Node-level, so
/// it belongs to [`crate::node_net::NodeNetwork`].
#[derive(Debug)]
pub struct CniConfWriter {
    dir: PathBuf,
    state_dir: PathBuf,
    chain_portmap: bool,
    /// `--cni-mtu`.
    mtu_flag: u32,
    /// `--dns-bind-address` and `--cluster-domain`: the pods' resolver settings.
    dns_bind: Option<std::net::SocketAddr>,
    cluster_domain: String,
    /// The content last written (or found identical on disk).
    last: Option<Vec<u8>>,
}

impl CniConfWriter {
    pub fn new(cfg: &crate::config::Config) -> Self {
        Self {
            dir: cfg.cni_conf_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            chain_portmap: cfg.cni_chain_portmap,
            mtu_flag: cfg.cni_mtu,
            dns_bind: cfg.dns_bind_address,
            cluster_domain: cfg.cluster_domain.clone(),
            last: None,
        }
    }

    /// The MTU written: `--cni-mtu`, or the route plan's `pod_mtu` when that is lower.
    pub fn mtu(&self, pod_mtu: Option<u32>) -> u32 {
        pod_mtu.map_or(self.mtu_flag, |m| m.min(self.mtu_flag))
    }

    /// Writes the conflist for `node` when its content changed; a Node without pod CIDRs
    /// writes nothing (the runtime keeps waiting for a network). Returns whether it wrote;
    /// errors are logged and retried on the next call.
    pub fn write(&mut self, node: &Node, pod_mtu: Option<u32>) -> bool {
        let mtu = self.mtu(pod_mtu);
        let mut cidrs = pod_cidrs_all(node);
        if mtu < twill_cni::config::IPV6_MIN_MTU && cidrs.iter().any(IpNetwork::is_ipv6) {
            // twill-cni refuses the whole config otherwise: keep IPv4 pods working.
            log::error!(
                "pod MTU {mtu} is below IPv6's minimum of 1280: IPv6 pod CIDRs left out of the CNI config"
            );
            cidrs.retain(IpNetwork::is_ipv4);
        }
        if cidrs.is_empty() {
            return false;
        }
        let content = render(
            &cidrs,
            mtu,
            &self.state_dir,
            self.chain_portmap,
            PodDns::of(self.dns_bind, &self.cluster_domain),
        );
        if self.last.as_ref() == Some(&content) {
            return false;
        }
        match write_if_changed(&self.dir, &content) {
            Ok(wrote) => {
                if wrote {
                    log::info!(
                        "wrote CNI config for pod CIDRs {cidrs:?} into {}",
                        self.dir.display()
                    );
                }
                self.last = Some(content);
                wrote
            }
            Err(e) => {
                log::error!("{}", crate::source::manifests::error_chain(&e));
                false
            }
        }
    }
}

/// Removes the conflist (uninstall); absent is fine.
pub fn remove(dir: &Path) -> Result<bool, CniConfError> {
    let path = dir.join(CNI_CONF_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CniConfError::Remove { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSpec;

    use super::*;

    #[test]
    fn format_matches_twill_cni() {
        let bytes = render(
            &["10.244.1.0/24".parse().unwrap()],
            1450,
            Path::new("/var/lib/twill"),
            false,
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"twill",
                "plugins":[{"type":"twill-cni",
                "podCIDRs":["10.244.1.0/24"],"mtu":1450,"gateway":"169.254.1.1",
                "stateDir":"/var/lib/twill","logFile":"/var/lib/twill/cni.log"}]})
        );
    }

    #[test]
    fn dns_settings_reach_twill_cni_as_its_dns_key() {
        let dns = PodDns::of("169.254.20.10:53".parse().ok(), "cluster.local");
        let bytes = render(
            &["10.244.1.0/24".parse().unwrap()],
            1500,
            Path::new("/s"),
            false,
            dns,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mut plugin = v["plugins"][0].clone();
        plugin["cniVersion"] = v["cniVersion"].clone();
        plugin["name"] = v["name"].clone();
        let conf = twill_cni::config::parse(&plugin).unwrap();
        assert_eq!(
            conf.dns,
            twill_cni::dns::Dns {
                nameservers: vec!["169.254.20.10".parse().unwrap()],
                domain: Some("cluster.local".into()),
                search: Vec::new(),
                options: vec!["ndots:5".into()],
            }
        );
        // No address a pod could use: no DNS key.
        assert_eq!(PodDns::of("0.0.0.0:53".parse().ok(), "cluster.local"), None);
        assert_eq!(
            PodDns::of("10.0.0.1:5353".parse().ok(), "cluster.local"),
            None
        );
        assert_eq!(PodDns::of(None, "cluster.local"), None);
    }

    #[test]
    fn portmap_is_chained_on_request() {
        let bytes = render(
            &["10.244.1.0/24".parse().unwrap()],
            1500,
            Path::new("/s"),
            true,
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["plugins"][0]["type"], "twill-cni");
        assert_eq!(
            v["plugins"][1],
            serde_json::json!({"type":"portmap","capabilities":{"portMappings":true}})
        );
    }

    /// Each plugin entry of a conflist as libcni hands it to the plugin: the list's `name` and
    /// version injected into the entry (libcni `buildOneConfig` / `InjectConf`). A libcni that
    /// knows `cniVersions` (≥ 1.2) picks the highest listed version up to `runtime_max`; an
    /// older one takes `cniVersion`.
    fn as_libcni_feeds(conflist: &[u8], runtime_max: Option<&str>) -> Vec<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_slice(conflist).unwrap();
        let version = match runtime_max {
            None => list["cniVersion"].clone(),
            Some(max) => list["cniVersions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v.as_str().unwrap() <= max)
                .max_by_key(|v| v.as_str().unwrap().to_owned())
                .unwrap()
                .clone(),
        };
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p["name"] = list["name"].clone();
                p["cniVersion"] = version.clone();
                p
            })
            .collect()
    }

    #[test]
    fn twill_cni_parses_what_the_agent_writes() {
        // Dual-stack, IPv6 first: twill-cni takes both, in this order.
        let cidrs: Vec<IpNetwork> = vec![
            "fd00:10:244:1::/64".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            "10.245.0.0/16".parse().unwrap(),
        ];
        let state = Path::new("/var/lib/twill-node-7");
        // Old runtimes (containerd 1.6/1.7) run the list at 1.0.0, new ones at 1.1.0.
        for (runtime_max, want_version) in [
            (None, twill_cni::version::CniVersion::V1_0_0),
            (Some("1.0.0"), twill_cni::version::CniVersion::V1_0_0),
            (Some("1.1.0"), twill_cni::version::CniVersion::V1_1_0),
        ] {
            let feeds = as_libcni_feeds(&render(&cidrs, 1410, state, true, None), runtime_max);
            assert_eq!(feeds.len(), 2);
            let conf = twill_cni::config::parse(&feeds[0]).unwrap();
            assert_eq!(conf.name, "twill");
            assert_eq!(conf.cni_version, want_version);
            assert_eq!(conf.pod_cidrs, cidrs);
            assert_eq!(conf.mtu, 1410);
            assert_eq!(conf.gateway.to_string(), POD_GATEWAY);
            assert_eq!(conf.state_dir, state);
            assert_eq!(conf.log_file, state.join("cni.log"));
        }
    }

    #[test]
    fn twill_cni_answers_status_for_what_the_agent_writes() {
        // The real entry point and the real dataplane constructor: STATUS only touches the
        // IPAM store (under the temp state dir), so this needs no root and no netlink.
        let dir = tempfile::tempdir().unwrap();
        // STATUS is a 1.1.0 verb: only runtimes that pick 1.1.0 from `cniVersions` send it.
        let feeds = as_libcni_feeds(
            &render(
                &["10.244.1.0/24".parse().unwrap()],
                1500,
                dir.path(),
                false,
                None,
            ),
            Some("1.1.0"),
        );
        let env = std::collections::HashMap::from([
            ("CNI_COMMAND".to_owned(), "STATUS".to_owned()),
            ("CNI_PATH".to_owned(), "/opt/cni/bin".to_owned()),
        ]);
        let mut out = Vec::new();
        let rc = twill_cni::run(
            &env,
            feeds[0].to_string().as_bytes(),
            &mut out,
            twill_cni::netlink::Netlink::new,
        );
        assert_eq!(
            (rc, String::from_utf8_lossy(&out).as_ref()),
            (0, ""),
            "STATUS refused the agent's config"
        );
    }

    #[test]
    fn pod_cidrs_from_node() {
        let mut n = Node::default();
        assert!(pod_cidrs(&n).is_empty());
        n.spec = Some(NodeSpec {
            pod_cidrs: Some(vec![
                "10.244.2.0/24".into(),
                "fd00::/64".into(),
                "bogus".into(),
            ]),
            ..NodeSpec::default()
        });
        assert_eq!(
            pod_cidrs(&n),
            vec!["10.244.2.0/24".parse::<Ipv4Network>().unwrap()]
        );
        n.spec = Some(NodeSpec {
            pod_cidr: Some("10.244.3.0/24".into()),
            ..NodeSpec::default()
        });
        assert_eq!(
            pod_cidrs(&n),
            vec!["10.244.3.0/24".parse::<Ipv4Network>().unwrap()]
        );
    }

    #[test]
    fn writes_atomically_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let c1 = render(
            &["10.244.1.0/24".parse().unwrap()],
            1500,
            Path::new("/s"),
            false,
            None,
        );
        assert!(write_if_changed(&conf_dir, &c1).unwrap());
        assert!(!write_if_changed(&conf_dir, &c1).unwrap());
        let c2 = render(
            &["10.244.9.0/24".parse().unwrap()],
            1500,
            Path::new("/s"),
            false,
            None,
        );
        assert!(write_if_changed(&conf_dir, &c2).unwrap());
        assert_eq!(std::fs::read(conf_dir.join(CNI_CONF_FILE)).unwrap(), c2);
        let names: Vec<_> = std::fs::read_dir(&conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(CNI_CONF_FILE)],
            "no temp files left"
        );
        assert!(remove(&conf_dir).unwrap());
        assert!(!remove(&conf_dir).unwrap());
    }

    /// The writer turns a Node's podCIDRs into the conflist (the run loop calls it after every
    /// sync), lowers the MTU to the route plan's, and rewrites only on change.
    #[test]
    fn writer_writes_the_nodes_pod_cidrs_and_the_lower_mtu() {
        let dir = tempfile::tempdir().unwrap();
        let file = crate::config::FileConfig {
            node_name: Some("n1".into()),
            cni_conf_dir: Some(dir.path().join("net.d")),
            state_dir: Some(dir.path().join("state")),
            cni_mtu: Some(1500),
            ..crate::config::FileConfig::default()
        };
        let cfg = crate::config::merge(crate::config::RunArgs::default(), file).unwrap();
        let mut w = CniConfWriter::new(&cfg);
        let mut node = Node::default();
        assert!(!w.write(&node, None), "no pod CIDRs yet: nothing written");
        assert!(!dir.path().join("net.d").join(CNI_CONF_FILE).exists());
        node.spec = Some(NodeSpec {
            pod_cidrs: Some(vec!["10.244.1.0/24".into()]),
            ..NodeSpec::default()
        });
        assert!(w.write(&node, None));
        assert!(!w.write(&node, None), "unchanged: not rewritten");
        let read = || -> serde_json::Value {
            serde_json::from_slice(
                &std::fs::read(dir.path().join("net.d").join(CNI_CONF_FILE)).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            read()["plugins"][0]["podCIDRs"],
            serde_json::json!(["10.244.1.0/24"])
        );
        assert_eq!(read()["plugins"][0]["mtu"], 1500);
        assert!(w.write(&node, Some(1450)), "the overlay lowers the MTU");
        assert_eq!(read()["plugins"][0]["mtu"], 1450);
        assert!(w.write(&node, Some(9000)));
        assert_eq!(read()["plugins"][0]["mtu"], 1500, "never above --cni-mtu");
    }
}
