//! The lab itself: its shape ([`LabSpec`]), building it (underlay bridge, router, nodes, the
//! external client), the shared manifests directory, background servers, and the teardown guard.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::{
    BPFFS_ROOT, LAB_DIR_NAME, Node, PREFIX, Pod, available, bin, cgroup2_mount, ensure_bpffs, ip,
    kill_cgroup_tree, labtool_in, list_netns, netns_command, ns_ip, random_id, remove_cgroup_tree,
    remove_v1_cgroup_dirs, spawn_and_wait_ready, sysctl, unmount_under, wait_until, write_atomic,
    write_owner,
};

/// Shape of a lab.
#[derive(Clone, Copy, Debug)]
pub struct LabSpec {
    pub nodes: usize,
    /// An extra namespace on the underlay that is not a node: the "outside world" client.
    pub external_client: bool,
    /// Put nodes alternately on two subnets joined by a router namespace (no shared L2), for
    /// the VXLAN overlay.
    pub two_subnets: bool,
    /// MTU written into the lab's CNI config.
    pub mtu: u32,
    /// Dual-stack: every node also gets an IPv6 underlay address and an IPv6 pod CIDR
    /// (listed after the IPv4 one, so IPv4 stays the primary family).
    pub dual_stack: bool,
    /// The underlay's family (and the pods' in an IPv6-only cluster).
    pub underlay: Underlay,
    /// A mixed cluster: the last this many nodes of a dual-stack lab are IPv6-only (IPv6
    /// InternalIP and pod CIDR only, no IPv4 on their uplink), the others dual-stack.
    pub ipv6_only_nodes: usize,
}

/// The family of a lab's underlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Underlay {
    /// IPv4 (and IPv6 beside it with `dual_stack`).
    #[default]
    Ipv4,
    /// IPv6 only: the nodes' uplinks hold only their IPv6 address and each Node object lists
    /// only its IPv6 InternalIP; pod CIDRs of both families (one subnet, no external client).
    Ipv6,
    /// An IPv6-only cluster: the IPv6 underlay and an IPv6 pod CIDR only (pods get no IPv4).
    Ipv6Only,
}

impl LabSpec {
    pub fn nodes(n: usize) -> Self {
        Self {
            nodes: n,
            external_client: false,
            two_subnets: false,
            mtu: 1500,
            dual_stack: false,
            underlay: Underlay::Ipv4,
            ipv6_only_nodes: 0,
        }
    }
    /// A dual-stack lab whose last `k` nodes are IPv6-only: a cluster mixing dual-stack and
    /// IPv6-only nodes on one subnet.
    #[must_use]
    pub fn with_ipv6_only_nodes(mut self, k: usize) -> Self {
        self.dual_stack = true;
        self.ipv6_only_nodes = k;
        self
    }
    /// Nodes joined by an IPv6-only underlay, with pod CIDRs of both families.
    #[must_use]
    pub fn with_ipv6_underlay(mut self) -> Self {
        self.dual_stack = true;
        self.underlay = Underlay::Ipv6;
        self
    }
    /// An IPv6-only cluster: IPv6 underlay, IPv6 InternalIPs and IPv6 pod CIDRs only.
    #[must_use]
    pub fn with_ipv6_only(mut self) -> Self {
        self.dual_stack = true;
        self.underlay = Underlay::Ipv6Only;
        self
    }
    #[must_use]
    pub fn with_dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }
    #[must_use]
    pub fn with_external_client(mut self) -> Self {
        self.external_client = true;
        self
    }
    #[must_use]
    pub fn with_two_subnets(mut self) -> Self {
        self.two_subnets = true;
        self
    }
}

/// A running lab. Drop tears it down.
pub struct Lab {
    pub run_id: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub external: Option<External>,
    underlay_netns: String,
    router_netns: Option<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    children: Mutex<Vec<Child>>,
}

/// The external client namespace.
pub struct External {
    pub netns: String,
    pub ip: Ipv4Addr,
    cgroup: PathBuf,
}

/// Returns a lab, or explains why there is none. Privileged tests start with
/// `let Some(lab) = twill_lab::require(spec)? else { return Ok(()) };` — outside CI a machine
/// without root skips with a printed reason; under `CI=true` it is an error.
pub fn require(spec: LabSpec) -> Result<Option<Lab>> {
    if let Err(e) = available() {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            return Err(e.context("CI=true: a privileged test cannot run here"));
        }
        eprintln!("SKIPPED (not CI): {e:#}");
        return Ok(None);
    }
    Lab::new(spec).map(Some)
}

impl Lab {
    /// Builds a lab. On error, whatever was already made is torn down.
    pub fn new(spec: LabSpec) -> Result<Self> {
        available()?;
        anyhow::ensure!(
            spec.underlay == Underlay::Ipv4 || (!spec.two_subnets && !spec.external_client),
            "an IPv6-underlay lab has one subnet and no external client (its router and client \
             are IPv4)"
        );
        ensure_bpffs()?;
        let run_id = random_id();
        let prefix = format!("{PREFIX}-{run_id}");
        let dir = std::env::temp_dir().join(LAB_DIR_NAME).join(&run_id);
        let cgroup = cgroup2_mount()?.join(LAB_DIR_NAME).join(&run_id);
        let bpffs = Path::new(BPFFS_ROOT).join(LAB_DIR_NAME).join(&run_id);
        let mut lab = Lab {
            run_id: run_id.clone(),
            dir: dir.clone(),
            nodes: Vec::new(),
            external: None,
            underlay_netns: format!("{prefix}-ul"),
            router_netns: None,
            cgroup: cgroup.clone(),
            bpffs: bpffs.clone(),
            children: Mutex::new(Vec::new()),
        };
        // From here on `lab` is a guard: an early return drops it and tears down.
        fs::create_dir_all(dir.join("cluster")).context("lab scratch dir")?;
        write_owner(&dir)?;
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        fs::create_dir_all(&bpffs).context("lab bpffs dir")?;
        ip(&["netns", "add", &lab.underlay_netns])?;
        ns_ip(&lab.underlay_netns, &["link", "set", "lo", "up"])?;
        let subnets = if spec.two_subnets { 2 } else { 1 };
        for s in 0..subnets {
            ns_ip(
                &lab.underlay_netns,
                &["link", "add", &format!("br{s}"), "type", "bridge"],
            )?;
            ns_ip(
                &lab.underlay_netns,
                &["link", "set", &format!("br{s}"), "up"],
            )?;
        }
        if spec.two_subnets {
            // A router namespace with a leg on each subnet: nodes on different subnets reach
            // each other only through it (no shared L2), which is what the overlay is for.
            let router = format!("{prefix}-rt");
            ip(&["netns", "add", &router])?;
            lab.router_netns = Some(router.clone());
            for s in 0..2u8 {
                let ul_end = format!("{PREFIX}{run_id}r{s}");
                ns_ip(
                    &lab.underlay_netns,
                    &[
                        "link",
                        "add",
                        &ul_end,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &format!("eth{s}"),
                        "netns",
                        &router,
                    ],
                )?;
                ns_ip(
                    &lab.underlay_netns,
                    &["link", "set", &ul_end, "master", &format!("br{s}"), "up"],
                )?;
                ns_ip(
                    &router,
                    &[
                        "addr",
                        "add",
                        &format!("172.30.{s}.1/24"),
                        "dev",
                        &format!("eth{s}"),
                    ],
                )?;
                ns_ip(&router, &["link", "set", &format!("eth{s}"), "up"])?;
            }
            ns_ip(&router, &["link", "set", "lo", "up"])?;
            sysctl(&router, "net.ipv4.ip_forward", "1")?;
        }
        for i in 0..spec.nodes {
            let node = lab.add_node(i, &spec)?;
            lab.nodes.push(node);
        }
        if spec.external_client {
            lab.external = Some(lab.add_external(&spec)?);
        }
        lab.write_nodes_manifest()?;
        Ok(lab)
    }

    fn attach_to_underlay(
        &self,
        netns: &str,
        tag: &str,
        subnet: usize,
        addr: Option<Ipv4Addr>,
    ) -> Result<()> {
        let ul_end = format!("{PREFIX}{}{tag}", self.run_id);
        ns_ip(
            &self.underlay_netns,
            &[
                "link", "add", &ul_end, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        ns_ip(
            &self.underlay_netns,
            &[
                "link",
                "set",
                &ul_end,
                "master",
                &format!("br{subnet}"),
                "up",
            ],
        )?;
        if let Some(addr) = addr {
            ns_ip(
                netns,
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            )?;
        }
        ns_ip(netns, &["link", "set", "eth0", "up"])?;
        ns_ip(netns, &["link", "set", "lo", "up"])?;
        if self.router_netns.is_some() {
            // Only the other lab subnet is routed via the lab router; there is still no default
            // route, so nothing can leave the lab.
            let other = 1 - subnet;
            ns_ip(
                netns,
                &[
                    "route",
                    "add",
                    &format!("172.30.{other}.0/24"),
                    "via",
                    &format!("172.30.{subnet}.1"),
                ],
            )?;
        }
        Ok(())
    }

    fn add_node(&self, i: usize, spec: &LabSpec) -> Result<Node> {
        let name = format!("n{i}");
        let netns = format!("{PREFIX}-{}-{name}", self.run_id);
        ip(&["netns", "add", &netns])?;
        let subnet = if spec.two_subnets { i % 2 } else { 0 };
        let host = u8::try_from(10 + i).context("too many nodes")?;
        let addr = Ipv4Addr::new(172, 30, u8::try_from(subnet)?, host);
        let underlay = if i + spec.ipv6_only_nodes >= spec.nodes {
            Underlay::Ipv6Only
        } else {
            spec.underlay
        };
        // An IPv6 underlay: no IPv4 address on the uplink at all.
        let uplink4 = (underlay == Underlay::Ipv4).then_some(addr);
        self.attach_to_underlay(&netns, &format!("n{i}"), subnet, uplink4)?;
        // Pods are routed, not bridged: the node forwards between its uplink and pod veths.
        sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        let cgroup = self.cgroup.join(&name);
        fs::create_dir_all(&cgroup)?;
        let bpffs = self.bpffs.join(&name);
        fs::create_dir_all(&bpffs)?;
        let dir = self.dir.join(&name);
        for sub in ["cni", "state", "run", "log"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let pod_cidr: Ipv4Network = format!("10.244.{i}.0/24").parse()?;
        let (ip6, pod_cidr6) = if spec.dual_stack {
            let ip6: Ipv6Addr = format!("fd00:172:30:{subnet}::{host}").parse()?;
            // No DAD: the lab's addresses are unique by construction and must work at once.
            ns_ip(
                &netns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
            let cidr: Ipv6Network = format!("fd00:10:244:{i}::/64").parse()?;
            (Some(ip6), Some(cidr))
        } else {
            (None, None)
        };
        // The agent's DNS forwards to the resolvers named here, never to the machine's own
        // /etc/resolv.conf: none until a test names a lab resolver.
        fs::write(
            dir.join("resolv.conf"),
            "# lab node: no upstream resolver unless a test names one\n",
        )?;
        let node = Node {
            index: i,
            name,
            netns,
            ip: addr,
            underlay_prefix: 24,
            underlay_gateway: spec
                .two_subnets
                .then(|| Ipv4Addr::new(172, 30, u8::try_from(subnet).unwrap_or(0), 1)),
            pod_cidr,
            ip6,
            pod_cidr6,
            ipv6_underlay: underlay != Underlay::Ipv4,
            ipv6_only: underlay == Underlay::Ipv6Only,
            cgroup,
            bpffs,
            dir,
            cluster_dir: self.dir.join("cluster"),
            run_id: self.run_id.clone(),
            mtu: spec.mtu,
        };
        node.write_cni_conf()?;
        Ok(node)
    }

    fn add_external(&self, spec: &LabSpec) -> Result<External> {
        let netns = format!("{PREFIX}-{}-ext", self.run_id);
        ip(&["netns", "add", &netns])?;
        let addr = Ipv4Addr::new(172, 30, 0, 200);
        self.attach_to_underlay(&netns, "ext", 0, Some(addr))?;
        if spec.dual_stack {
            // On the nodes' IPv6 subnet, with no route to any pod range: only a masqueraded
            // pod (seen as a node address) gets an answer.
            ns_ip(
                &netns,
                &[
                    "-6",
                    "addr",
                    "add",
                    "fd00:172:30:0::200/64",
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        let cgroup = self.cgroup.join("ext");
        fs::create_dir_all(&cgroup)?;
        Ok(External {
            netns,
            ip: addr,
            cgroup,
        })
    }

    /// Writes the Node objects of the cluster (name, InternalIP, podCIDRs) into the shared
    /// manifests directory every agent of this lab watches, as an API server would hold them.
    pub fn write_nodes_manifest(&self) -> Result<()> {
        let items: Vec<serde_json::Value> = self.nodes.iter().map(Node::node_object).collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        write_atomic(
            &self.dir.join("cluster").join("nodes.json"),
            &serde_json::to_vec_pretty(&list)?,
        )
    }

    /// The shared "API server" directory: every agent runs with `--manifests` pointing here.
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// Writes (atomically) a manifest file into the shared manifests directory.
    pub fn apply_manifest(&self, file_name: &str, yaml: &str) -> Result<()> {
        write_atomic(&self.manifests_dir().join(file_name), yaml.as_bytes())
    }

    /// Removes a manifest file from the shared manifests directory.
    pub fn delete_manifest(&self, file_name: &str) -> Result<()> {
        match fs::remove_file(self.manifests_dir().join(file_name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn external(&self) -> &External {
        self.external
            .as_ref()
            .expect("lab built without with_external_client()")
    }

    /// Keeps a background process; it is killed on teardown.
    pub fn track(&self, child: Child) {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
    }

    /// Starts dnsmasq (Debian's dnsmasq-base) in `pod` on port 53 of its address, answering the
    /// names of `hosts` (a hosts file's text) with a 60 s TTL, `extra` flags appended (say
    /// `--server=IP` to forward the rest, or `--local=/zone/` to answer NXDOMAIN there), and
    /// waits (bounded) until it answers. Returns `IP:53`. It is killed on teardown.
    pub fn dnsmasq(&self, pod: &Pod, hosts: &str, extra: &[&str]) -> Result<String> {
        let file = self.dir.join(format!("dnsmasq-hosts-{}", pod.netns));
        fs::write(&file, hosts)?;
        let child = pod
            .cmd("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file=",
                "--bind-interfaces",
                "--local-ttl=60",
                &format!("--listen-address={}", pod.ip),
                &format!("--addn-hosts={}", file.display()),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning dnsmasq (Debian dnsmasq-base; run cargo xtask setup)")?;
        self.track(child);
        let addr = format!("{}:53", pod.ip);
        // Any answer (even REFUSED for a name it does not know) means it serves.
        wait_until(
            &format!("dnsmasq in {} to answer", pod.name),
            Duration::from_secs(20),
            || {
                let ask = [
                    "dns",
                    "--to",
                    &addr,
                    "--name",
                    "localhost",
                    "--timeout-ms",
                    "500",
                ];
                Ok(pod.labtool(&ask)?.0 == 0)
            },
        )?;
        Ok(addr)
    }

    /// Starts `labtool serve` in a pod and waits until it listens.
    pub fn serve(&self, pod: &Pod, name: &str, tcp: Option<u16>, udp: Option<u16>) -> Result<()> {
        self.serve_with(pod, name, tcp, udp, &[])
    }

    /// [`Lab::serve`] listening on both families (`[::]`, IPv4 peers reported as IPv4).
    pub fn serve_dual(
        &self,
        pod: &Pod,
        name: &str,
        tcp: Option<u16>,
        udp: Option<u16>,
    ) -> Result<()> {
        self.serve_with(pod, name, tcp, udp, &["--ipv6"])
    }

    fn serve_with(
        &self,
        pod: &Pod,
        name: &str,
        tcp: Option<u16>,
        udp: Option<u16>,
        extra: &[&str],
    ) -> Result<()> {
        let mut cmd = pod.cmd(bin("labtool"));
        cmd.args(["serve", "--name", name]).args(extra);
        if let Some(p) = tcp {
            cmd.args(["--tcp", &p.to_string()]);
        }
        if let Some(p) = udp {
            cmd.args(["--udp", &p.to_string()]);
        }
        let child = spawn_and_wait_ready(cmd)?;
        self.track(child);
        Ok(())
    }

    /// Tears the lab down now (also done on drop).
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut children = std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_cgroup_tree(&self.cgroup);
        let mut namespaces: Vec<String> = list_netns()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{PREFIX}-{}-", self.run_id)))
            .collect();
        // Pods first, then nodes, then the underlay (deleting a namespace destroys its veths).
        namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for ns in namespaces {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = remove_cgroup_tree(&self.cgroup) {
            errors.push(format!("cgroup {}: {e:#}", self.cgroup.display()));
        }
        // A container runtime in a node (cri.rs) makes cgroup-v1 directories and mounts under
        // the lab's scratch dir; its own guard removes them, this catches a guard that leaked.
        errors.extend(remove_v1_cgroup_dirs(
            &Path::new(LAB_DIR_NAME).join(&self.run_id),
        ));
        errors.extend(unmount_under(&self.dir));
        // A test may bind the node's bpffs dir onto itself as a shared mount (the propagation a
        // systemd host gives /sys/fs/bpf, which mountPropagation needs).
        errors.extend(unmount_under(&self.bpffs));
        if let Err(e) = fs::remove_dir_all(&self.bpffs)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("bpffs {}: {e}", self.bpffs.display()));
        }
        if std::env::var_os("TWILL_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("lab teardown: {e}");
        }
    }
}

impl External {
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, Some(&self.cgroup), program)
    }
    pub fn labtool(&self, args: &[&str]) -> Result<(i32, String)> {
        labtool_in(self.cmd(bin("labtool")).args(args))
    }
}
