//! Command line and configuration file of `twill-agent`.
//!
//! Every `run` flag can also come from `--config FILE` (YAML or JSON, the flag names as keys, e.g.
//! `bpffs-dir: /sys/fs/bpf/twill`); a flag given on the command line (or through its environment
//! variable) overrides the file. Raw input (flags + file) is turned into a validated [`Config`]
//! by [`RunArgs::resolve`], one check per rule, each with an error that says what to change.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use twill_core::routing::fastpath::MasqueradeMode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;

/// `twill-agent`: the per-node agent of Twill (eBPF kube-proxy replacement).
#[derive(Debug, Parser)]
#[command(name = "twill-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch Services/EndpointSlices/Nodes and program the datapath.
    Run(Box<RunArgs>),
    /// Inspect a running agent through its API socket.
    Debug(DebugArgs),
    /// Remove what the agent installed on this node: the CNI config and the pinned maps/links.
    Uninstall(UninstallArgs),
}

/// How cross-node pod traffic is carried (`--routing-mode`; planned by `twill_core::routing`,
/// executed by `routing`).
pub use twill_core::routing::RoutingMode;

/// Flags of `twill-agent run`. All optional here so that a config file can supply them; defaults
/// are applied in [`RunArgs::resolve`].
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Configuration file (YAML or JSON) with the same keys as these flags; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Name of this node's Node object.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig file (default: in-cluster config, then $KUBECONFIG/~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Read Services, EndpointSlices and Nodes from the manifests in DIR instead of an API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// cgroup-v2 directory the socket programs attach to (default: the cgroup2 mount).
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/twill].
    #[arg(long, value_name = "PATH")]
    pub bpffs_dir: Option<PathBuf>,
    /// Where the CNI config for twill-cni is written [default: /etc/cni/net.d].
    #[arg(long, value_name = "PATH")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Agent and CNI state directory [default: /var/lib/twill].
    #[arg(long, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,
    /// Unix socket of the debug API [default: /run/twill/agent.sock].
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// kube-proxy compatible health server [default: 0.0.0.0:10256]; empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// Prometheus metrics server [default: 127.0.0.1:10249]; empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// NodePort range, `MIN-MAX` [default: 30000-32767].
    #[arg(long, value_name = "MIN-MAX")]
    pub nodeport_range: Option<String>,
    /// MTU written into the CNI config [default: 1500].
    #[arg(long, value_name = "BYTES")]
    pub cni_mtu: Option<u32>,
    /// Chain the reference `portmap` plugin after twill-cni in the CNI config, for pods'
    /// hostPorts; it must be installed in the runtime's CNI bin dir [default: false].
    #[arg(long, value_name = "BOOL", num_args = 1, require_equals = true)]
    pub cni_chain_portmap: Option<bool>,
    /// Period of the periodic full resync; /healthz turns 503 when changes wait longer than
    /// twice this [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub sync_period: Option<String>,
    /// `--map-size-*`: one flag per map of the catalogue whose size is an operator choice.
    #[command(flatten)]
    pub map_sizes: MapSizeArgs,
    /// Devices NodePort/north-south programs attach to (default: the node's underlay devices).
    #[arg(long, value_delimiter = ',', value_name = "DEV,...")]
    pub devices: Option<Vec<String>>,
    /// Only node addresses inside these CIDRs answer NodePorts (default: all). Each family is
    /// filtered by its own CIDRs; a family none is given for answers on all its addresses.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub nodeport_addresses: Option<Vec<String>>,
    /// Cross-node routing mode [default: auto].
    #[arg(long, value_enum)]
    pub routing_mode: Option<RoutingMode>,
    /// The cluster's pod CIDR (all nodes' pod CIDRs fall inside it); on a dual-stack cluster one
    /// per family, comma-separated (as kube-proxy's: 10.244.0.0/16,fd00:10:244::/56).
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,
    /// Destinations reached without masquerading pod traffic, IPv4 and IPv6 alike.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub non_masquerade_cidrs: Option<Vec<String>>,
    /// Masquerade pod egress to destinations outside the cluster to the node IP [default:
    /// true]; `--masquerade=false` when the network routes pod CIDRs itself.
    #[arg(long, value_name = "BOOL", num_args = 1, require_equals = true)]
    pub masquerade: Option<bool>,
    /// eBPF host routing [default: true]: pods' packets are routed by the programs on their
    /// veths (into local pods with bpf_redirect_peer, elsewhere after a FIB lookup with
    /// bpf_redirect_neigh) instead of the node's IP stack; `--host-routing=false` leaves every
    /// packet to the stack. Off by default with `--cni-chain-portmap`: portmap's netfilter
    /// DNAT needs its replies to cross the stack.
    #[arg(long, value_name = "BOOL", num_args = 1, require_equals = true)]
    pub host_routing: Option<bool>,
    /// Who masquerades pod egress [default: ebpf]: `ebpf`, the devices' tc egress program (no
    /// netfilter rule on the node), or `nftables`, an `ip twill` table (the fallback).
    #[arg(long, value_name = "ebpf|nftables", value_parser = parse_masquerade_mode)]
    pub masquerade_mode: Option<MasqueradeMode>,
    /// A Service needing more services-map entries (ports × addresses × scopes) than this is
    /// rejected whole and reported, so one object cannot fill the map [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_frontends_per_service: Option<usize>,
    /// The node-local DNS responder's UDP and TCP address [default: 169.254.20.10:53, the
    /// NodeLocal DNSCache convention]; empty disables it. An address not configured on the node
    /// is logged and DNS stays off; everything else keeps running.
    #[arg(long, value_name = "ADDR")]
    pub dns_bind_address: Option<String>,
    /// The cluster's DNS zone [default: cluster.local].
    #[arg(long, value_name = "DOMAIN")]
    pub cluster_domain: Option<String>,
    /// TTL in seconds of the cluster's DNS records [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub dns_ttl: Option<u32>,
    /// Where the DNS responder forwards names outside the cluster: `IP[:PORT],...`, a
    /// resolv.conf path (its `nameserver` lines) or `none` (answer REFUSED)
    /// [default: /etc/resolv.conf, the node's resolvers].
    #[arg(long, value_name = "SERVERS|PATH")]
    pub dns_upstream: Option<String>,
    /// Denied-flow events each CPU may send to `twill-agent debug monitor` per second; the
    /// rest are only counted (reported as lost). Bounds what a flood of denied packets costs
    /// the datapath; 0 turns the stream off [default: 200].
    #[arg(long, value_name = "N")]
    pub monitor_rate: Option<u32>,
}

/// `twill-agent debug …`
#[derive(Debug, Args)]
pub struct DebugArgs {
    #[command(subcommand)]
    pub what: DebugCommand,
    /// The agent's API socket.
    #[arg(long, global = true, default_value = DEFAULT_API_SOCKET, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum DebugCommand {
    /// Service frontends as programmed.
    Services,
    /// Backends as programmed.
    Backends,
    /// Session affinity entries.
    Affinity,
    /// Datapath verdict and drop counters.
    Drops,
    /// eBPF host routing: packets redirected into local pods and forwarded after a FIB lookup,
    /// those left to the stack and why, and the local endpoints.
    Fastpath,
    /// The load-balancing maps in the compiler's golden dump format.
    Maps,
    /// The effective NetworkPolicy rules of this node's pods, and which policies select them.
    Policy {
        /// Only this pod (`NAMESPACE/POD`).
        #[arg(value_name = "NAMESPACE/POD")]
        pod: Option<String>,
    },
    /// Whether NetworkPolicy allows a connection, and which rule does (from the compiled state
    /// the kernel maps hold; a Service is resolved to its backends as the datapath would).
    Explain {
        /// The client: `NAMESPACE/POD` or an IPv4 address.
        #[arg(long, value_name = "POD|IP")]
        from: String,
        /// The server: `NAMESPACE/POD`, `NAMESPACE/SERVICE` or an IPv4 address (a ClusterIP
        /// too), with `:PORT` (optional for a Service: all its ports).
        #[arg(long, value_name = "POD|IP|SERVICE[:PORT]")]
        to: String,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp"])]
        proto: String,
    },
    /// Denied flows as they happen (rate-limited in the kernel; lost events are reported), one
    /// line each: time, direction, from, to, protocol, reason. Runs until interrupted.
    Monitor {
        /// Stop after this many denied flows.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
    },
    /// What the node-local DNS responder answers for NAME, from the table it serves.
    Dns {
        name: String,
        /// The question type (A, SRV, PTR, CNAME, TXT, ...).
        #[arg(long = "type", default_value = "A")]
        qtype: String,
    },
    /// The per-packet connection-tracking table (north-south NAT and NetworkPolicy flows): tuple,
    /// state, backend, expiry.
    Conntrack {
        /// Only flows of this Service's frontends.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Option<String>,
        /// Only flows to this backend address (NetworkPolicy flows: with it at either end).
        #[arg(long, value_name = "IP")]
        backend: Option<std::net::IpAddr>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// `twill-agent uninstall`
#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, value_name = "PATH")]
    pub bpffs_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_CNI_CONF_DIR, value_name = "PATH")]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_API_SOCKET, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// The DNS address the agent added to the node (removed with its `twill-dns` device).
    #[arg(long, default_value = DEFAULT_DNS, value_name = "ADDR")]
    pub dns_bind_address: String,
}

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/twill";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/twill";
pub const DEFAULT_API_SOCKET: &str = "/run/twill/agent.sock";
pub const DEFAULT_HEALTHZ: &str = "0.0.0.0:10256";
pub const DEFAULT_METRICS: &str = "127.0.0.1:10249";
/// NodeLocal DNSCache's link-local address: pods' resolv.conf can name it on every node.
pub const DEFAULT_DNS: &str = "169.254.20.10:53";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_DNS_TTL: u32 = 30;
pub const DEFAULT_DNS_UPSTREAM: &str = "/etc/resolv.conf";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
/// Name of the CNI config file the agent owns.
pub const CNI_CONF_FILE: &str = "10-twill.conflist";

/// The config file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub manifests: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub bpffs_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub nodeport_range: Option<String>,
    pub cni_mtu: Option<u32>,
    pub cni_chain_portmap: Option<bool>,
    pub sync_period: Option<String>,
    /// The `map-size-*` keys (taken out by [`parse_file`]: their names come from the
    /// catalogue, not from this struct).
    #[serde(skip)]
    pub map_sizes: MapSizeArgs,
    pub devices: Option<Vec<String>>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub routing_mode: Option<RoutingMode>,
    pub cluster_cidr: Option<String>,
    pub non_masquerade_cidrs: Option<Vec<String>>,
    pub masquerade: Option<bool>,
    pub host_routing: Option<bool>,
    pub masquerade_mode: Option<MasqueradeMode>,
    pub max_frontends_per_service: Option<usize>,
    pub dns_bind_address: Option<String>,
    pub cluster_domain: Option<String>,
    pub dns_ttl: Option<u32>,
    pub dns_upstream: Option<String>,
    pub monitor_rate: Option<u32>,
}

/// Where Services/EndpointSlices/Nodes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    Manifests(PathBuf),
    /// The Kubernetes API; `None` = in-cluster / default kubeconfig discovery.
    Kube {
        kubeconfig: Option<PathBuf>,
    },
}

pub use crate::datapath::MapSizes;
use twill_common::MapKind;

/// The validated configuration of `twill-agent run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    pub source: SourceConfig,
    /// `None`: discover the cgroup2 mount at start.
    pub cgroup_root: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub nodeport_range: (u16, u16),
    pub cni_mtu: u32,
    pub cni_chain_portmap: bool,
    pub sync_period: Duration,
    pub map_sizes: MapSizes,
    pub devices: Vec<String>,
    pub nodeport_addresses: Vec<Ipv4Network>,
    /// The IPv6 entries of `--nodeport-addresses`.
    pub nodeport_addresses6: Vec<Ipv6Network>,
    pub routing_mode: RoutingMode,
    pub cluster_cidr: Option<Ipv4Network>,
    pub non_masquerade_cidrs: Vec<Ipv4Network>,
    /// The IPv6 entries of `--cluster-cidr` and `--non-masquerade-cidrs`.
    pub cluster_cidr6: Option<Ipv6Network>,
    pub non_masquerade_cidrs6: Vec<Ipv6Network>,
    pub masquerade: bool,
    /// eBPF host routing (`twill_common::FP_F_HOST_ROUTING`).
    pub host_routing: bool,
    /// Who masquerades, when `masquerade` is on.
    pub masquerade_mode: MasqueradeMode,
    pub max_frontends_per_service: usize,
    /// `None`: no DNS responder.
    pub dns_bind_address: Option<SocketAddr>,
    /// Lower case, without the trailing dot.
    pub cluster_domain: String,
    pub dns_ttl: u32,
    pub dns_upstream: DnsUpstream,
    /// `--monitor-rate`: denied-flow events per CPU and second.
    pub monitor_rate: u32,
}

/// Where names outside the cluster's zone go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsUpstream {
    /// These servers, in order.
    Servers(Vec<SocketAddr>),
    /// The `nameserver` lines of this resolv.conf, read when DNS starts.
    ResolvConf(PathBuf),
    /// No forwarding: REFUSED.
    None,
}

/// A configuration the agent cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML/JSON with the agent's flag names as keys")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "no node name: pass --node-name, set NODE_NAME (downward API spec.nodeName) or `node-name` in the config file"
    )]
    MissingNodeName,
    #[error("--manifests and --kubeconfig are exclusive: pick one source of Services")]
    TwoSources,
    #[error("--{flag} {value:?} is not an address:port (e.g. 0.0.0.0:10256), nor empty to disable")]
    BindAddress { flag: &'static str, value: String },
    #[error(
        "--nodeport-range {0:?} must be MIN-MAX with 1 <= MIN <= MAX <= 65535, e.g. 30000-32767"
    )]
    NodePortRange(String),
    #[error("--cni-mtu {0} is outside 576..=65535")]
    Mtu(u32),
    #[error("--sync-period {0:?} must be a duration like 30s, 500ms or 1m, greater than zero")]
    Duration(String),
    #[error("--{flag} {value} must be at least 1")]
    MapSize { flag: &'static str, value: u32 },
    #[error("--max-frontends-per-service must be at least 1")]
    MaxFrontends,
    #[error(
        "--dns-upstream: {0:?} is not an address like 10.0.0.2 or 10.0.0.2:53 (or give a \
         resolv.conf path, or none)"
    )]
    DnsUpstream(String),
    #[error("--cluster-domain {0:?} is not a DNS name like cluster.local")]
    ClusterDomain(String),
    #[error("--{flag} {value:?} is not a CIDR like 10.244.0.0/16")]
    Cidr { flag: &'static str, value: String },
    #[error(
        "--cluster-cidr {0:?}: at most one CIDR per family, like 10.244.0.0/16,fd00:10:244::/56"
    )]
    ClusterCidrPerFamily(String),
}

/// `Some(v)` from the flag, else from the file.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

impl RunArgs {
    /// Reads `--config` (if given), merges it under the flags and validates the result.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        merge(self, file)
    }
}

/// Parses a config file (YAML is a superset of JSON, so one parser serves both).
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_owned(),
        source,
    })
}

/// Parses config file text; an empty file is an empty config. The `map-size-*` keys are taken
/// out first (by the catalogue's flag names), the rest must be [`FileConfig`]'s keys.
pub fn parse_file(text: &str) -> Result<FileConfig, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    let mut value: serde_yaml::Value = serde_yaml::from_str(text)?;
    let mut map_sizes = MapSizeArgs::default();
    if let serde_yaml::Value::Mapping(keys) = &mut value {
        for (kind, flag) in sized_maps() {
            if let Some(size) = keys.remove(flag) {
                map_sizes = map_sizes.with(kind, serde_yaml::from_value(size)?);
            }
        }
    }
    let mut file: FileConfig = serde_yaml::from_value(value)?;
    file.map_sizes = map_sizes;
    Ok(file)
}

/// Flags over file, then defaults and validation (map sizes in [`map_sizes`]).
pub fn merge(flags: RunArgs, file: FileConfig) -> Result<Config, ConfigError> {
    let map_sizes = map_sizes(&flags, &file)?;
    let (cluster_cidr, cluster_cidr6) = cluster_cidrs(pick(
        flags.cluster_cidr.as_deref(),
        file.cluster_cidr.as_deref(),
    ))?;
    let (non_masquerade_cidrs, non_masquerade_cidrs6) = cidrs_by_family(
        "non-masquerade-cidrs",
        pick(
            flags.non_masquerade_cidrs.as_deref(),
            file.non_masquerade_cidrs.as_deref(),
        )
        .unwrap_or_default(),
    )?;
    let (nodeport_addresses, nodeport_addresses6) = cidrs_by_family(
        "nodeport-addresses",
        pick(flags.nodeport_addresses, file.nodeport_addresses)
            .as_deref()
            .unwrap_or_default(),
    )?;
    let node_name = pick(flags.node_name, file.node_name)
        .filter(|n| !n.trim().is_empty())
        .ok_or(ConfigError::MissingNodeName)?;
    let manifests = pick(flags.manifests, file.manifests);
    let kubeconfig = pick(flags.kubeconfig, file.kubeconfig);
    let source = match (manifests, kubeconfig) {
        (Some(_), Some(_)) => return Err(ConfigError::TwoSources),
        (Some(dir), None) => SourceConfig::Manifests(dir),
        (None, kubeconfig) => SourceConfig::Kube { kubeconfig },
    };
    let healthz = pick(flags.healthz_bind_address, file.healthz_bind_address)
        .unwrap_or_else(|| DEFAULT_HEALTHZ.into());
    let metrics = pick(flags.metrics_bind_address, file.metrics_bind_address)
        .unwrap_or_else(|| DEFAULT_METRICS.into());
    let dns =
        pick(flags.dns_bind_address, file.dns_bind_address).unwrap_or_else(|| DEFAULT_DNS.into());
    let cluster_domain = parse_domain(
        &pick(flags.cluster_domain, file.cluster_domain)
            .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.into()),
    )?;
    let nodeport_range = pick(flags.nodeport_range, file.nodeport_range)
        .map_or(Ok((30000, 32767)), |r| parse_port_range(&r))?;
    let cni_mtu = pick(flags.cni_mtu, file.cni_mtu).unwrap_or(DEFAULT_MTU);
    if !(576..=65535).contains(&cni_mtu) {
        return Err(ConfigError::Mtu(cni_mtu));
    }
    let sync_period = pick(flags.sync_period, file.sync_period)
        .map_or(Ok(DEFAULT_SYNC_PERIOD), |s| parse_duration(&s))?;
    let max_frontends_per_service = match pick(
        flags.max_frontends_per_service,
        file.max_frontends_per_service,
    ) {
        None => crate::compile::DEFAULT_MAX_FRONTENDS_PER_SERVICE,
        Some(0) => return Err(ConfigError::MaxFrontends),
        Some(n) => n,
    };
    Ok(Config {
        node_name,
        source,
        cgroup_root: pick(flags.cgroup_root, file.cgroup_root),
        bpffs_dir: pick(flags.bpffs_dir, file.bpffs_dir)
            .unwrap_or_else(|| DEFAULT_BPFFS_DIR.into()),
        cni_conf_dir: pick(flags.cni_conf_dir, file.cni_conf_dir)
            .unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
        state_dir: pick(flags.state_dir, file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        api_socket: pick(flags.api_socket, file.api_socket)
            .unwrap_or_else(|| DEFAULT_API_SOCKET.into()),
        healthz_bind_address: parse_bind("healthz-bind-address", &healthz)?,
        metrics_bind_address: parse_bind("metrics-bind-address", &metrics)?,
        nodeport_range,
        cni_mtu,
        cni_chain_portmap: pick(flags.cni_chain_portmap, file.cni_chain_portmap).unwrap_or(false),
        sync_period,
        map_sizes,
        devices: pick(flags.devices, file.devices).unwrap_or_default(),
        nodeport_addresses,
        nodeport_addresses6,
        routing_mode: pick(flags.routing_mode, file.routing_mode).unwrap_or_default(),
        cluster_cidr,
        non_masquerade_cidrs,
        cluster_cidr6,
        non_masquerade_cidrs6,
        masquerade: pick(flags.masquerade, file.masquerade).unwrap_or(true),
        // Chained portmap DNATs hostPorts in netfilter: replies routed by the programs would skip
        // netfilter's reverse translation, so host routing defaults off there.
        host_routing: pick(flags.host_routing, file.host_routing)
            .unwrap_or(!pick(flags.cni_chain_portmap, file.cni_chain_portmap).unwrap_or(false)),
        masquerade_mode: pick(flags.masquerade_mode, file.masquerade_mode).unwrap_or_default(),
        max_frontends_per_service,
        dns_bind_address: parse_bind("dns-bind-address", &dns)?,
        cluster_domain,
        dns_ttl: pick(flags.dns_ttl, file.dns_ttl).unwrap_or(DEFAULT_DNS_TTL),
        dns_upstream: parse_dns_upstream(
            &pick(flags.dns_upstream, file.dns_upstream)
                .unwrap_or_else(|| DEFAULT_DNS_UPSTREAM.into()),
        )?,
        monitor_rate: pick(flags.monitor_rate, file.monitor_rate)
            .unwrap_or(twill_common::POLICY_EVENTS_PER_CPU_SECOND),
    })
}

/// The `--map-size-*` flags over the file, then the catalogue's defaults.
fn map_sizes(flags: &RunArgs, file: &FileConfig) -> Result<MapSizes, ConfigError> {
    let mut sizes = MapSizes::default();
    for (kind, flag) in sized_maps() {
        let value = pick(flags.map_sizes.get(kind), file.map_sizes.get(kind));
        sizes = sizes.with(kind, map_size(flag, value, sizes.get(kind))?);
    }
    Ok(sizes)
}

/// The maps whose size is an operator choice, with their flag (catalogue order).
fn sized_maps() -> impl Iterator<Item = (MapKind, &'static str)> {
    MapKind::ALL
        .iter()
        .filter_map(|k| k.spec().size_flag.map(|flag| (*k, flag)))
}

/// The `--map-size-*` flags (or file keys) given: one per catalogue entry with a size flag,
/// defined from the catalogue rather than spelled here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapSizeArgs(BTreeMap<MapKind, u32>);

impl MapSizeArgs {
    /// The size given for `kind`, if any.
    pub fn get(&self, kind: MapKind) -> Option<u32> {
        self.0.get(&kind).copied()
    }

    /// With `kind` sized `max_entries`.
    #[must_use]
    pub fn with(mut self, kind: MapKind, max_entries: u32) -> Self {
        self.0.insert(kind, max_entries);
        self
    }
}

impl clap::FromArgMatches for MapSizeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for (kind, flag) in sized_maps() {
            if let Some(v) = matches.get_one::<u32>(flag) {
                self.0.insert(kind, *v);
            }
        }
        Ok(())
    }
}

impl Args for MapSizeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        sized_maps().fold(cmd, |cmd, (kind, flag)| {
            cmd.arg(
                clap::Arg::new(flag)
                    .long(flag)
                    .value_name("N")
                    .value_parser(clap::value_parser!(u32))
                    .help(kind.spec().size_help),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// A DNS zone: dot-separated labels of letters, digits and hyphens (RFC 1123), lower-cased,
/// without the trailing dot.
fn parse_domain(value: &str) -> Result<String, ConfigError> {
    let d = value.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(ConfigError::ClusterDomain(value.to_owned()))
    }
}

fn map_size(flag: &'static str, value: Option<u32>, default: u32) -> Result<u32, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::MapSize { flag, value: 0 }),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// An empty value disables the server (as with kube-proxy's `--healthz-bind-address=""`).
/// `none`, a path (starts with `/`), or `IP[:PORT],...` (port 53 when left out).
fn parse_dns_upstream(value: &str) -> Result<DnsUpstream, ConfigError> {
    let value = value.trim();
    if value == "none" {
        return Ok(DnsUpstream::None);
    }
    if value.starts_with('/') {
        return Ok(DnsUpstream::ResolvConf(value.into()));
    }
    let servers = value
        .split(',')
        .map(|s| {
            let s = s.trim();
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| ConfigError::DnsUpstream(s.to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DnsUpstream::Servers(servers))
}

fn parse_bind(flag: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| ConfigError::BindAddress {
            flag,
            value: value.to_owned(),
        })
}

/// `MIN-MAX` (kube-apiserver's `--service-node-port-range` syntax).
pub fn parse_port_range(value: &str) -> Result<(u16, u16), ConfigError> {
    let err = || ConfigError::NodePortRange(value.to_owned());
    let (lo, hi) = value.trim().split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

/// `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(value: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration(value.to_owned());
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if d.is_zero() {
        return Err(err());
    }
    Ok(d)
}

fn parse_masquerade_mode(value: &str) -> Result<MasqueradeMode, String> {
    value.parse()
}

/// CIDRs of either family, split by family (`--cluster-cidr`, `--non-masquerade-cidrs`,
/// `--nodeport-addresses`).
fn cidrs_by_family(
    flag: &'static str,
    values: &[String],
) -> Result<(Vec<Ipv4Network>, Vec<Ipv6Network>), ConfigError> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        match v.parse::<IpNetwork>() {
            Ok(IpNetwork::V4(n)) => v4.push(n),
            Ok(IpNetwork::V6(n)) => v6.push(n),
            Err(_) => {
                return Err(ConfigError::Cidr {
                    flag,
                    value: v.to_owned(),
                });
            }
        }
    }
    Ok((v4, v6))
}

/// `--cluster-cidr`: one CIDR, or one per family.
fn cluster_cidrs(
    value: Option<&str>,
) -> Result<(Option<Ipv4Network>, Option<Ipv6Network>), ConfigError> {
    let Some(value) = value else {
        return Ok((None, None));
    };
    let parts: Vec<String> = value.split(',').map(str::to_owned).collect();
    let (v4, v6) = cidrs_by_family("cluster-cidr", &parts)?;
    if v4.len() > 1 || v6.len() > 1 {
        return Err(ConfigError::ClusterCidrPerFamily(value.to_owned()));
    }
    Ok((v4.first().copied(), v6.first().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(argv: &[&str]) -> RunArgs {
        let mut full = vec!["twill-agent", "run"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("parses").command {
            Command::Run(parsed) => *parsed,
            other => panic!("not run: {other:?}"),
        }
    }

    /// The config of `run --node-name n1 FLAGS` without a config file.
    fn with_flags(flags: &[&str]) -> Config {
        merge(
            run_args(&[&["--node-name", "n1"], flags].concat()),
            FileConfig::default(),
        )
        .unwrap()
    }

    /// The config of `run --node-name n1` with config file `yaml`.
    fn with_file(yaml: &str) -> Config {
        merge(run_args(&["--node-name", "n1"]), parse_file(yaml).unwrap()).unwrap()
    }

    /// The error `merge` gives for config file `f` (no flags).
    fn rejected(f: FileConfig) -> ConfigError {
        merge(RunArgs::default(), f).expect_err("the config is invalid")
    }

    #[test]
    fn defaults_match_kube_proxy_and_the_issue() {
        let cfg = with_flags(&[]);
        assert_eq!(cfg.node_name, "n1");
        assert_eq!(cfg.source, SourceConfig::Kube { kubeconfig: None });
        assert_eq!(cfg.bpffs_dir, PathBuf::from("/sys/fs/bpf/twill"));
        assert_eq!(cfg.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/twill"));
        assert_eq!(cfg.api_socket, PathBuf::from("/run/twill/agent.sock"));
        assert_eq!(
            cfg.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            cfg.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(cfg.nodeport_range, (30000, 32767));
        assert_eq!(cfg.cni_mtu, 1500);
        assert_eq!(cfg.cgroup_root, None);
        assert_eq!(cfg.routing_mode, RoutingMode::Auto);
        assert_eq!(cfg.map_sizes, MapSizes::default());
        assert!(cfg.masquerade);
        assert!(!cfg.cni_chain_portmap);
    }

    #[test]
    fn monitor_rate_by_flag_or_file() {
        let default = with_flags(&[]);
        assert_eq!(
            default.monitor_rate,
            twill_common::POLICY_EVENTS_PER_CPU_SECOND
        );
        let flag = merge(
            run_args(&["--node-name", "n1", "--monitor-rate", "50"]),
            parse_file("monitor-rate: 7\n").unwrap(),
        )
        .unwrap();
        assert_eq!(flag.monitor_rate, 50, "the flag wins over the file");
        let file = with_file("monitor-rate: 0\n");
        assert_eq!(file.monitor_rate, 0);
    }

    #[test]
    fn portmap_chaining_by_flag_or_file() {
        let on = with_flags(&["--cni-chain-portmap=true"]);
        assert!(on.cni_chain_portmap);
        let cfg = with_file("cni-chain-portmap: true\n");
        assert!(cfg.cni_chain_portmap);
    }

    #[test]
    fn masquerade_can_be_turned_off_by_flag_or_file() {
        let off = with_flags(&["--masquerade=false"]);
        assert!(!off.masquerade);
        assert!(!crate::routing::RoutingConfig::from(&off).masquerade);
        assert!(off.host_routing, "host routing is on by default");
        let stack = with_flags(&["--host-routing=false"]);
        assert!(!stack.host_routing);
        let portmap = with_flags(&["--cni-chain-portmap=true"]);
        assert!(!portmap.host_routing, "portmap's DNAT needs the stack");
        let both = with_flags(&["--cni-chain-portmap=true", "--host-routing=true"]);
        assert!(both.host_routing, "an explicit flag wins");
        assert_eq!(off.masquerade_mode, MasqueradeMode::Ebpf);
        let nft = with_flags(&["--masquerade-mode", "nftables"]);
        assert_eq!(nft.masquerade_mode, MasqueradeMode::Nftables);
        let cfg = with_file("masquerade-mode: nftables\n");
        assert_eq!(cfg.masquerade_mode, MasqueradeMode::Nftables);
        let cfg = with_file("masquerade: false\n");
        assert!(!cfg.masquerade);
    }

    #[test]
    fn flags_override_the_file_and_the_file_fills_the_rest() {
        let file = parse_file(
            "node-name: from-file\nmanifests: /m\nbpffs-dir: /file/bpf\ncni-mtu: 1400\n\
             nodeport-range: 20000-20100\nrouting-mode: vxlan\nnon-masquerade-cidrs: [10.0.0.0/8]\n",
        )
        .unwrap();
        let cfg = merge(
            run_args(&["--node-name", "from-flag", "--bpffs-dir", "/flag/bpf"]),
            file,
        )
        .unwrap();
        assert_eq!(cfg.node_name, "from-flag");
        assert_eq!(cfg.bpffs_dir, PathBuf::from("/flag/bpf"));
        assert_eq!(cfg.source, SourceConfig::Manifests("/m".into()));
        assert_eq!(cfg.cni_mtu, 1400);
        assert_eq!(cfg.nodeport_range, (20000, 20100));
        assert_eq!(cfg.routing_mode, RoutingMode::Vxlan);
        assert_eq!(
            cfg.non_masquerade_cidrs,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
    }

    #[test]
    fn json_config_files_parse_too() {
        let file =
            parse_file(r#"{"node-name":"j","healthz-bind-address":"","map-size-services":10}"#)
                .unwrap();
        let cfg = merge(RunArgs::default(), file).unwrap();
        assert_eq!(cfg.node_name, "j");
        assert_eq!(cfg.healthz_bind_address, None);
        assert_eq!(cfg.map_sizes.get(MapKind::Services), 10);
    }

    #[test]
    fn every_sized_map_has_a_flag_and_a_file_key() {
        let flags: Vec<_> = sized_maps().collect();
        assert!(flags.contains(&(MapKind::Frags, "map-size-frags")));
        for (kind, flag) in flags {
            let cfg = merge(
                run_args(&["--node-name", "n", &format!("--{flag}"), "7"]),
                FileConfig::default(),
            )
            .unwrap();
            assert_eq!(cfg.map_sizes.get(kind), 7, "{flag}");
            let file = parse_file(&format!("node-name: n\n{flag}: 9\n")).unwrap();
            let cfg = merge(RunArgs::default(), file).unwrap();
            assert_eq!(cfg.map_sizes.get(kind), 9, "{flag}");
            let file = parse_file(&format!("{flag}: 9\n")).unwrap();
            let cfg = merge(
                run_args(&["--node-name", "n", &format!("--{flag}=5")]),
                file,
            )
            .unwrap();
            assert_eq!(
                cfg.map_sizes.get(kind),
                5,
                "the flag wins over the file: {flag}"
            );
            assert!(parse_file(&format!("{flag}: lots\n")).is_err(), "{flag}");
        }
        let cfg = merge(run_args(&["--node-name", "n"]), FileConfig::default()).unwrap();
        assert_eq!(cfg.map_sizes.get(MapKind::Stats), twill_common::STATS_MAX);
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        assert!(parse_file("node-nmae: typo\n").is_err());
    }

    #[test]
    fn config_file_is_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "node-name: disk\ncni-conf-dir: /cni\n").unwrap();
        let mut args = run_args(&[]);
        args.node_name = None; // NODE_NAME may be set in the environment of the test runner
        args.config = Some(path);
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node_name, "disk");
        assert_eq!(cfg.cni_conf_dir, PathBuf::from("/cni"));
        let missing = RunArgs {
            config: Some(dir.path().join("nope.yaml")),
            ..RunArgs::default()
        };
        assert!(matches!(
            missing.resolve(),
            Err(ConfigError::ReadFile { .. })
        ));
    }

    #[test]
    fn invalid_values_are_typed_errors() {
        let base = || FileConfig {
            node_name: Some("n".into()),
            ..FileConfig::default()
        };
        assert!(matches!(
            merge(RunArgs::default(), FileConfig::default()),
            Err(ConfigError::MissingNodeName)
        ));
        assert!(matches!(
            rejected(FileConfig {
                manifests: Some("/m".into()),
                kubeconfig: Some("/k".into()),
                ..base()
            }),
            ConfigError::TwoSources
        ));
        assert!(matches!(
            rejected(FileConfig {
                healthz_bind_address: Some("localhost".into()),
                ..base()
            }),
            ConfigError::BindAddress { .. }
        ));
        for bad in ["32767-30000", "0-10", "abc", "1-70000"] {
            let f = FileConfig {
                nodeport_range: Some(bad.into()),
                ..base()
            };
            assert!(
                matches!(rejected(f), ConfigError::NodePortRange(_)),
                "{bad}"
            );
        }
        assert!(matches!(
            rejected(FileConfig {
                cni_mtu: Some(100),
                ..base()
            }),
            ConfigError::Mtu(100)
        ));
        assert!(matches!(
            rejected(FileConfig {
                map_sizes: MapSizeArgs::default().with(MapKind::Backends, 0),
                ..base()
            }),
            ConfigError::MapSize { .. }
        ));
        assert!(matches!(
            rejected(FileConfig {
                cluster_cidr: Some("10.0.0.0/33".into()),
                ..base()
            }),
            ConfigError::Cidr { .. }
        ));
        assert!(parse_file("routing-mode: ipip\n").is_err());
        assert!(matches!(
            rejected(FileConfig {
                sync_period: Some("0s".into()),
                ..base()
            }),
            ConfigError::Duration(_)
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_mins(2));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn multi_node_flags_parse() {
        let args = run_args(&[
            "--node-name",
            "n",
            "--devices",
            "eth0,eth1",
            "--nodeport-addresses",
            "172.30.0.0/24,fd00:172:30::/64",
            "--routing-mode",
            "direct",
            "--cluster-cidr",
            "10.244.0.0/16",
        ]);
        let cfg = merge(args, FileConfig::default()).unwrap();
        assert_eq!(cfg.devices, vec!["eth0", "eth1"]);
        assert_eq!(
            cfg.nodeport_addresses,
            vec!["172.30.0.0/24".parse().unwrap()]
        );
        assert_eq!(
            cfg.nodeport_addresses6,
            vec!["fd00:172:30::/64".parse().unwrap()]
        );
        assert_eq!(cfg.routing_mode, RoutingMode::Direct);
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
    }

    #[test]
    fn debug_accepts_the_socket_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "twill-agent",
            "debug",
            "maps",
            "--api-socket",
            "/x.sock",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Debug(d) = cli.command else {
            panic!("not debug")
        };
        assert_eq!(d.what, DebugCommand::Maps);
        assert_eq!(d.api_socket, PathBuf::from("/x.sock"));
        assert_eq!(d.output, OutputFormat::Json);
    }

    #[test]
    fn cluster_and_non_masquerade_cidrs_take_both_families() {
        let args = run_args(&[
            "--node-name",
            "n0",
            "--cluster-cidr",
            "fd00:10:244::/56,10.244.0.0/16",
            "--non-masquerade-cidrs",
            "192.168.0.0/16,2001:db8::/32,10.0.0.0/8",
        ]);
        let cfg = merge(args, FileConfig::default()).unwrap();
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(cfg.cluster_cidr6, Some("fd00:10:244::/56".parse().unwrap()));
        assert_eq!(
            cfg.non_masquerade_cidrs,
            vec![
                "192.168.0.0/16".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(
            cfg.non_masquerade_cidrs6,
            vec!["2001:db8::/32".parse().unwrap()]
        );
        let rc = crate::routing::RoutingConfig::from(&cfg);
        assert_eq!(rc.cluster_cidrs6, vec!["fd00:10:244::/56".parse().unwrap()]);
        // IPv6 only.
        let args = run_args(&["--node-name", "n0", "--cluster-cidr", "fd00:10:244::/56"]);
        let cfg = merge(args, FileConfig::default()).unwrap();
        assert_eq!(
            (cfg.cluster_cidr.is_none(), cfg.cluster_cidr6.is_some()),
            (true, true)
        );
        for bad in ["10.244.0.0/16,10.245.0.0/16", "fd00::/56,fd01::/56"] {
            let args = run_args(&["--node-name", "n0", "--cluster-cidr", bad]);
            assert!(
                matches!(
                    merge(args, FileConfig::default()),
                    Err(ConfigError::ClusterCidrPerFamily(_))
                ),
                "{bad}"
            );
        }
        let args = run_args(&["--node-name", "n0", "--non-masquerade-cidrs", "fd00::/129"]);
        assert!(matches!(
            merge(args, FileConfig::default()),
            Err(ConfigError::Cidr { .. })
        ));
    }
}
