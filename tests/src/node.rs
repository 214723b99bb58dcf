//! A simulated node: its network namespace, cgroup, bpffs and scratch directories, its CNI
//! config, and what runs in it (twill-cni, pods, the agent, the debug CLI, labtool).
use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::{
    Agent, NETNS_RUN_DIR, POD_GATEWAY, PREFIX, Pod, bin, ip, labtool_in, netns_command,
    netns_only_command, ns_ip, run_cmd, write_atomic,
};

/// The node-local DNS address of IPv6-only lab nodes (the IPv4 default is `169.254.20.10`).
pub const IPV6_DNS_BIND: &str = "[fd00:169:254::10]:53";

/// A simulated node.
pub struct Node {
    pub index: usize,
    /// Kubernetes node name (`n0`, `n1`, …).
    pub name: String,
    pub netns: String,
    /// Underlay address (the node's InternalIP).
    pub ip: Ipv4Addr,
    pub underlay_prefix: u8,
    /// Gateway on the underlay towards other subnets (two-subnet labs only).
    pub underlay_gateway: Option<Ipv4Addr>,
    pub pod_cidr: Ipv4Network,
    /// Dual-stack labs: the node's IPv6 underlay address (`fd00:172:30:<subnet>::<10+i>`)
    /// and IPv6 pod CIDR (`fd00:10:244:<i>::/64`).
    pub ip6: Option<Ipv6Addr>,
    pub pod_cidr6: Option<Ipv6Network>,
    /// IPv6-underlay labs: `ip` is on no interface and not in the Node object (only `ip6`).
    pub ipv6_underlay: bool,
    /// IPv6-only labs: `pod_cidr` is not the Node's either (only `pod_cidr6`).
    pub ipv6_only: bool,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub dir: PathBuf,
    pub(crate) cluster_dir: PathBuf,
    pub(crate) run_id: String,
    pub(crate) mtu: u32,
}

impl Node {
    pub(crate) fn node_object(&self) -> serde_json::Value {
        let mut addresses = Vec::new();
        if !self.ipv6_underlay {
            addresses
                .push(serde_json::json!({"type": "InternalIP", "address": self.ip.to_string()}));
        }
        if let Some(ip6) = self.ip6 {
            addresses.push(serde_json::json!({"type": "InternalIP", "address": ip6.to_string()}));
        }
        addresses.push(serde_json::json!({"type": "Hostname", "address": self.name}));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name}},
            "spec": {"podCIDR": self.pod_cidrs()[0], "podCIDRs": self.pod_cidrs()},
            "status": {"addresses": addresses},
        })
    }

    /// `spec.podCIDRs`: IPv4, then IPv6 in dual-stack labs; only IPv6 in IPv6-only ones.
    pub fn pod_cidrs(&self) -> Vec<String> {
        (!self.ipv6_only)
            .then(|| self.pod_cidr.to_string())
            .into_iter()
            .chain(self.pod_cidr6.map(|c| c.to_string()))
            .collect()
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The shared cluster manifests directory (same for every node of the lab).
    pub fn manifests_dir(&self) -> PathBuf {
        self.cluster_dir.clone()
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("run").join("agent.sock")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }
    /// The resolv.conf the node's agent forwards DNS to (`--dns-upstream`).
    pub fn resolv_conf_path(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }
    pub fn conflist_path(&self) -> PathBuf {
        self.cni_conf_dir().join("10-twill.conflist")
    }

    /// The lab's hand-written CNI config (the agent writes the same plugin entry once it runs;
    /// its list is at `cniVersion` 1.0.0 with `cniVersions` up to 1.1.0, which the CRI tests use,
    /// while the CNI tests call 1.1.0-only verbs with this one).
    pub(crate) fn write_cni_conf(&self) -> Result<()> {
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "twill",
            "plugins": [{
                "type": "twill-cni",
                "podCIDRs": self.pod_cidrs(),
                "mtu": self.mtu,
                "gateway": POD_GATEWAY,
                "stateDir": self.state_dir(),
                "logFile": self.log_dir().join("cni.log"),
            }]
        });
        write_atomic(&self.conflist_path(), &serde_json::to_vec_pretty(&conf)?)
    }

    /// A command inside the node's netns and cgroup.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, Some(&self.cgroup), program)
    }

    /// A command in the node's network namespace and cgroup that keeps the machine's mounts
    /// (cgroup2 and bpffs under /sys), as the agent runs: for `twill-agent` subcommands that
    /// touch pins or attach points, e.g. `uninstall`.
    pub fn cmd_with_host_mounts(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_only_command(&self.netns, &self.cgroup, program)
    }

    /// Runs `args` in the node; stdout, or an error with stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
        run_cmd(self.cmd(prog).args(rest))
    }

    /// The network config twill-cni receives for this node: the conflist's plugin entry with
    /// `name` and `cniVersion` injected, as libcni does.
    pub fn plugin_conf(&self) -> Result<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_slice(&fs::read(self.conflist_path())?)?;
        let mut plugin = list["plugins"][0].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        Ok(plugin)
    }

    /// Runs twill-cni inside the node's netns with the CNI environment.
    pub fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns_path: &str,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> Result<std::process::Output> {
        let mut cmd = netns_command(&self.netns, None, bin("twill-cni"));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns_path)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/usr/lib/cni")
            // As Kubernetes runtimes pass it (the lab's pods live in `default`): twill-cni
            // derives the pod's DNS search list from it.
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning twill-cni")?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(&serde_json::to_vec(conf)?)?;
        Ok(child.wait_with_output()?)
    }

    /// The network namespace name of this node's pod `name`, `twl-<run id>-<node>-<name>`: unique
    /// per run, and found by the teardown through its run id.
    pub fn pod_netns_name(&self, name: &str) -> String {
        format!("{PREFIX}-{}-{}-{name}", self.run_id, self.name)
    }

    /// Creates a pod: a network namespace wired by the real `twill-cni` ADD.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let netns = self.pod_netns_name(name);
        ip(&["netns", "add", &netns])?;
        let container_id = format!("{}{}{}", self.run_id, self.name, name).replace(['-', '_'], "");
        let netns_path = format!("{NETNS_RUN_DIR}/{netns}");
        let out = self.cni(
            "ADD",
            &container_id,
            &netns_path,
            "eth0",
            &self.plugin_conf()?,
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let _ = ip(&["netns", "del", &netns]);
            bail!(
                "twill-cni ADD for pod {name} failed ({}): {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: serde_json::Value =
            serde_json::from_str(&stdout).with_context(|| format!("CNI result {stdout}"))?;
        let addrs: Vec<std::net::IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        if addrs.is_empty() {
            bail!("CNI result without an address in ips: {stdout}");
        }
        // An IPv6-only pod has no IPv4 address: `ip` stays unspecified.
        let ip = addrs
            .iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(a) => Some(*a),
                std::net::IpAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let ip6 = addrs.iter().find_map(|a| match a {
            std::net::IpAddr::V6(a) => Some(*a),
            std::net::IpAddr::V4(_) => None,
        });
        ns_ip(&netns, &["link", "set", "lo", "up"])?;
        Ok(Pod {
            name: name.to_owned(),
            netns,
            container_id,
            ifname: "eth0".into(),
            ip,
            ip6,
            result,
            node: self.name.clone(),
            node_netns: self.netns.clone(),
            cgroup: self.cgroup.clone(),
        })
    }

    /// Deletes a pod through twill-cni DEL, then its namespace.
    pub fn del_pod(&self, pod: &Pod) -> Result<()> {
        let mut conf = self.plugin_conf()?;
        conf["prevResult"] = pod.result.clone();
        let out = self.cni(
            "DEL",
            &pod.container_id,
            &format!("{NETNS_RUN_DIR}/{}", pod.netns),
            &pod.ifname,
            &conf,
        )?;
        if !out.status.success() {
            bail!(
                "twill-cni DEL failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        ip(&["netns", "del", &pod.netns])?;
        Ok(())
    }

    /// Default `twill-agent run` flags for this node. A node of an IPv6-underlay lab binds its
    /// servers to IPv6 addresses, and an IPv6-only one its DNS responder too: no IPv4 in its
    /// config at all.
    pub fn agent_args(&self) -> Vec<String> {
        let (healthz, metrics) = if self.ipv6_underlay {
            ("[::]:10256", "[::1]:10249")
        } else {
            ("0.0.0.0:10256", "127.0.0.1:10249")
        };
        let mut args = vec![
            "run".into(),
            "--node-name".into(),
            self.name.clone(),
            "--manifests".into(),
            self.manifests_dir().display().to_string(),
            "--cgroup-root".into(),
            self.cgroup.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs.display().to_string(),
            "--cni-conf-dir".into(),
            self.cni_conf_dir().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--api-socket".into(),
            self.api_socket().display().to_string(),
            "--healthz-bind-address".into(),
            healthz.into(),
            "--metrics-bind-address".into(),
            metrics.into(),
            "--dns-upstream".into(),
            self.resolv_conf_path().display().to_string(),
        ];
        if self.ipv6_only {
            args.extend(["--dns-bind-address".into(), IPV6_DNS_BIND.into()]);
        }
        args
    }

    /// Starts `twill-agent run` in this node (its netns and cgroup) with extra flags appended.
    pub fn start_agent(&self, extra: &[&str]) -> Result<Agent> {
        let mut args = self.agent_args();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut agent = Agent {
            child: None,
            args,
            node_netns: self.netns.clone(),
            cgroup: self.cgroup.clone(),
            log: self.log_dir().join("agent.log"),
        };
        agent.start()?;
        Ok(agent)
    }

    /// Runs `twill-agent debug ...` against this node's agent.
    pub fn debug(&self, args: &[&str]) -> Result<String> {
        let sock = self.api_socket().display().to_string();
        let mut cmd = netns_command(&self.netns, None, bin("twill-agent"));
        cmd.arg("debug").args(args).args(["--api-socket", &sock]);
        run_cmd(&mut cmd)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }
}

impl Node {
    /// `labtool` inside the node's netns and cgroup; returns (exit code, stdout).
    pub fn labtool(&self, args: &[&str]) -> Result<(i32, String)> {
        labtool_in(self.cmd(bin("labtool")).args(args))
    }
}
