//! The Twill lab: simulated Kubernetes nodes and pods in network namespaces, on one machine,
//! without touching the machine's own network namespace or root cgroup.
//!
//! ```text
//!              netns twl-<id>-ul: bridge br0 (172.30.0.0/24)       [netns twl-<id>-ext]
//!                 |            |             |                          (external client)
//!   netns twl-<id>-n0   twl-<id>-n1   twl-<id>-n2   <- nodes: eth0 172.30.0.1x, own cgroup,
//!      |   \                                            own bpffs dir, own scratch dir
//!   twl-<id>-n0-web0 ...                                <- pods: netns wired by real twill-cni
//! ```
//!
//! Every name carries a random run id, so labs of parallel tests never collide. [`Lab`] is a
//! guard: dropping it (also while unwinding from a panic) kills every process of the lab (via
//! `cgroup.kill` of the node cgroups), deletes the namespaces, cgroups, bpffs pins and scratch
//! files. [`clean_leftovers`] removes what a killed run left behind, and never a lab whose owning
//! process still runs (a parallel test run).
pub mod bench;
pub mod cni_bench;
pub mod cri;
pub mod image;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};

/// Prefix of every lab object name (netns, cgroup, bpffs dir, scratch dir).
pub const PREFIX: &str = "twl";
const LAB_DIR_NAME: &str = "twill-lab";
const NETNS_RUN_DIR: &str = "/var/run/netns";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Gateway the pods use; answered by the host side of their veth (see twill-cni's README).
pub const POD_GATEWAY: &str = "169.254.1.1";

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
}

impl LabSpec {
    pub fn nodes(n: usize) -> Self {
        Self {
            nodes: n,
            external_client: false,
            two_subnets: false,
            mtu: 1500,
            dual_stack: false,
        }
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
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub dir: PathBuf,
    cluster_dir: PathBuf,
    run_id: String,
    mtu: u32,
}

/// The external client namespace.
pub struct External {
    pub netns: String,
    pub ip: Ipv4Addr,
    cgroup: PathBuf,
}

/// A pod created through twill-cni.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (dual-stack labs).
    pub ip6: Option<Ipv6Addr>,
    /// The CNI result JSON of ADD.
    pub result: serde_json::Value,
    /// Name of the node the pod runs on (`spec.nodeName`).
    pub node: String,
    node_netns: String,
    cgroup: PathBuf,
}

/// A `twill-agent run` process in a node.
pub struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    node_netns: String,
    cgroup: PathBuf,
    log: PathBuf,
}

/// Path of a workspace binary (`target/<profile>/<name>`). Build first (`cargo xtask test` does).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TWILL_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // Integration tests run from target/<profile>/deps/; binaries live one level up.
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
    {
        for dir in [deps, deps.parent().unwrap_or(deps)] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug").join(name)
}

/// Whether the lab can run here (root, cgroup2, `ip`). Under `CI=true` tests must fail, not
/// skip, when this is false: use [`require`].
pub fn available() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, cgroups, bpffs)");
    }
    cgroup2_mount()?;
    which("ip")?;
    Ok(())
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

fn which(prog: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{prog}` not found on PATH (run `cargo xtask setup`)"))
}

/// The cgroup-v2 mount point, read from /proc/self/mountinfo (never hard-coded: it is
/// /sys/fs/cgroup/unified on hybrid hosts and /sys/fs/cgroup on most Kubernetes nodes).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted"))
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    })
}

/// Mounts bpffs at /sys/fs/bpf when missing (a fresh machine has none).
pub fn ensure_bpffs() -> Result<()> {
    if !bpffs_mounted() {
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]))
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    Ok(())
}

/// The machine's cache directory for Twill (`$XDG_CACHE_HOME/twill`, else `~/.cache/twill`),
/// where `cargo xtask setup` keeps its LLVM links and the lab its built images.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("twill")
}

/// A fresh uniquely named directory under `parent` (pid + random suffix), for work that is
/// renamed into place when done so concurrent builders never share one.
fn scratch_dir(parent: &Path, prefix: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{prefix}-{}-{}", std::process::id(), random_id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn random_id() -> String {
    let mut buf = [0u8; 3];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Runs a command; error with its stderr on a non-zero exit; returns stdout.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

fn ns_ip(netns: &str, args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").arg("-n").arg(netns).args(args))
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run_cmd(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]))
    .map(|_| ())
}

/// A command running inside `netns` and, when given, inside `cgroup` (moved there between fork
/// and exec, so the program's sockets are created inside it and the node's socket hooks see
/// them). Goes through `ip netns exec`, which also mounts the namespace's own sysfs in a private
/// mount namespace, so `/sys/class/net` shows the lab's devices (podman and the reference CNI
/// plugins read it).
fn netns_command(
    netns: &str,
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    if let Some(cg) = cgroup {
        join_cgroup_before_exec(&mut cmd, cg);
    }
    cmd
}

/// A command that switches only its network namespace to `netns` (setns(2) between fork and
/// exec) and joins `cgroup`, keeping the machine's mounts. The agent needs that: the private
/// sysfs of `ip netns exec` hides the cgroup2 mount under `/sys/fs/cgroup` that it attaches its
/// socket hooks to and the bpffs under `/sys/fs/bpf` it pins in.
fn netns_only_command(netns: &str, cgroup: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // Opened before fork: the child may only make async-signal-safe calls.
    let ns = fs::File::open(Path::new(NETNS_RUN_DIR).join(netns));
    // SAFETY: setns(2) on an fd opened before fork; no allocation in the child.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd as _;
            let fd = match &ns {
                Ok(f) => f.as_raw_fd(),
                Err(_) => return Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            };
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    join_cgroup_before_exec(&mut cmd, cgroup);
    cmd
}

/// Moves the child into `cgroup` between fork and exec.
fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: only async-signal-safe calls in the child (open/write/close on a path built
    // before fork).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Lab {
    /// Builds a lab. On error, whatever was already made is torn down.
    pub fn new(spec: LabSpec) -> Result<Self> {
        available()?;
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
        addr: Ipv4Addr,
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
        ns_ip(
            netns,
            &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
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
        self.attach_to_underlay(&netns, &format!("n{i}"), subnet, addr)?;
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
        self.attach_to_underlay(&netns, "ext", 0, addr)?;
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
        let deadline = Instant::now() + Duration::from_secs(20);
        // Any answer (even REFUSED for a name it does not know) means it serves.
        while pod
            .labtool(&[
                "dns",
                "--to",
                &addr,
                "--name",
                "localhost",
                "--timeout-ms",
                "500",
            ])?
            .0
            != 0
        {
            if Instant::now() > deadline {
                bail!("dnsmasq in {} did not answer within 20 s", pod.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

impl Node {
    fn node_object(&self) -> serde_json::Value {
        let mut addresses =
            vec![serde_json::json!({"type": "InternalIP", "address": self.ip.to_string()})];
        if let Some(ip6) = self.ip6 {
            addresses.push(serde_json::json!({"type": "InternalIP", "address": ip6.to_string()}));
        }
        addresses.push(serde_json::json!({"type": "Hostname", "address": self.name}));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name}},
            "spec": {"podCIDR": self.pod_cidr.to_string(), "podCIDRs": self.pod_cidrs()},
            "status": {"addresses": addresses},
        })
    }

    /// `spec.podCIDRs`: IPv4, then IPv6 in dual-stack labs.
    pub fn pod_cidrs(&self) -> Vec<String> {
        std::iter::once(self.pod_cidr.to_string())
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
    fn write_cni_conf(&self) -> Result<()> {
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

    /// Creates a pod: a network namespace wired by the real `twill-cni` ADD.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let netns = format!("{PREFIX}-{}-{}-{name}", self.run_id, self.name);
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
        let addr = result["ips"][0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("CNI result without ips[0].address: {stdout}"))?;
        let ip: Ipv4Addr = addr.split('/').next().unwrap_or_default().parse()?;
        let ip6 = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .find(|a: &std::net::IpAddr| a.is_ipv6())
            .and_then(|a| match a {
                std::net::IpAddr::V6(a) => Some(a),
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

    /// Default `twill-agent run` flags for this node.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
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
            "0.0.0.0:10256".into(),
            "--metrics-bind-address".into(),
            "127.0.0.1:10249".into(),
            "--dns-upstream".into(),
            self.resolv_conf_path().display().to_string(),
        ]
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

impl Agent {
    fn start(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = netns_only_command(&self.node_netns, &self.cgroup, bin("twill-agent"));
        cmd.args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("spawning twill-agent")?);
        Ok(())
    }

    /// Stops the agent with SIGTERM (graceful: pinned maps and links stay), then waits; an
    /// agent that ignores SIGTERM for 10 s is killed and reported.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id())?;
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the agent did not exit within 10 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The agent's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Pod {
    /// A command inside the pod's netns and the node's cgroup.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, Some(&self.cgroup), program)
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
        run_cmd(self.cmd(prog).args(rest))
    }

    /// `labtool` inside the pod; returns (exit code, stdout).
    pub fn labtool(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.cmd(bin("labtool")).args(args).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ))
    }

    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// The Pod object an API server would hold for this pod, as `namespace/name` (the lab's
    /// pod names are unique per node, object names only per namespace): `labels`, its node and
    /// IP, Running, and the named container ports `(name, port, protocol)` that NetworkPolicy
    /// named ports resolve against. Write it with [`Lab::apply_manifest`].
    pub fn pod_object(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u16, &str)],
    ) -> serde_json::Value {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(name, port, proto)| {
                serde_json::json!({"name": name, "containerPort": port, "protocol": proto})
            })
            .collect();
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": self.node,
                "containers": [{"name": "main", "image": "labtool", "ports": ports}],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip.to_string(),
                "podIPs": [{"ip": self.ip.to_string()}],
            },
        })
    }
}

impl External {
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, Some(&self.cgroup), program)
    }
    pub fn labtool(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.cmd(bin("labtool")).args(args).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ))
    }
}

impl Node {
    /// `labtool` inside the node's netns and cgroup; returns (exit code, stdout).
    pub fn labtool(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.cmd(bin("labtool")).args(args).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ))
    }
}

/// Spawns a command that prints `ready` once it serves, and waits (bounded) for that line.
pub fn spawn_and_wait_ready(mut cmd: Command) -> Result<Child> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "ready" => Ok(child),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not become ready: {other:?}")
        }
    }
}

/// Polls `f` until it returns `Ok(Some(v))` or `timeout` passes (bounded waits instead of fixed
/// sleeps, so tests are fast when things are fast and still finish when they are not).
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a file atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("no parent dir for {}", path.display()))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn list_netns() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Kills every process in a cgroup subtree (cgroup.kill, kernel ≥ 5.14).
fn kill_cgroup_tree(cg: &Path) {
    if !cg.exists() {
        return;
    }
    let _ = fs::write(cg.join("cgroup.kill"), "1");
    // cgroup.kill is asynchronous; wait (bounded) for the subtree to empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !cgroup_tree_empty(cg) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_tree_empty(cg: &Path) -> bool {
    fs::read_to_string(cg.join("cgroup.events"))
        .map_or(true, |e| e.lines().any(|l| l == "populated 0"))
}

fn remove_cgroup_tree(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(cg)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // Removing a cgroup directory also detaches every BPF program attached to it.
    fs::remove_dir(cg).with_context(|| format!("rmdir {}", cg.display()))
}

/// Every cgroup-v1 hierarchy's mount point (hybrid hosts; none on a cgroup-v2-only host).
fn cgroup_v1_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Removes `<v1 hierarchy>/<rel>` with its subtree in every cgroup-v1 hierarchy, deepest first
/// (what runc's cgroupfs driver made for a lab's pods). The processes must be gone already;
/// returns what could not be removed.
fn remove_v1_cgroup_dirs(rel: &Path) -> Vec<String> {
    cgroup_v1_mounts()
        .into_iter()
        .map(|root| root.join(rel))
        .filter(|dir| dir.is_dir())
        .filter_map(|dir| remove_cgroup_tree(&dir).err().map(|e| format!("{e:#}")))
        .collect()
}

/// Lazily unmounts every mount point at or below `dir`, deepest first: a container runtime's
/// pod network namespaces, shm and root filesystem mounts outlive it when it is killed, and
/// removing a directory tree must never descend into (or trip over) them.
fn unmount_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal (`\040`).
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    let mut errors = Vec::new();
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: already unmounted (a parent's lazy unmount took it along).
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                errors.push(format!("umount {}: {e}", p.display()));
            }
        }
    }
    errors
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes leftovers of killed lab runs: namespaces named `twl-*`, the lab cgroup subtree, lab
/// bpffs pins and scratch directories. Returns a description of what was removed.
pub fn clean_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let cg_root = cgroup2_mount()?.join(LAB_DIR_NAME);
    let bpffs_root = Path::new(BPFFS_ROOT).join(LAB_DIR_NAME);
    let tmp_root = std::env::temp_dir().join(LAB_DIR_NAME);
    let netns = list_netns();
    // Every run id with anything left on the machine, from each kind of lab object.
    let mut ids: Vec<String> = netns
        .iter()
        .filter_map(|n| n.strip_prefix(&format!("{PREFIX}-")))
        .filter_map(|rest| rest.split('-').next())
        .map(str::to_owned)
        .collect();
    for root in [&cg_root, &bpffs_root, &tmp_root] {
        if let Ok(entries) = fs::read_dir(root) {
            ids.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        // A lab whose owner still runs belongs to a parallel test run (another checkout's
        // `xtask test`, a bench): never touch it.
        if owner_alive(&tmp_root.join(&id)) {
            continue;
        }
        let cg = cg_root.join(&id);
        kill_cgroup_tree(&cg);
        let mut namespaces: Vec<&String> = netns
            .iter()
            .filter(|n| n.starts_with(&format!("{PREFIX}-{id}-")))
            .collect();
        namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for ns in namespaces {
            ip(&["netns", "del", ns])?;
            removed.push(format!("netns {ns}"));
        }
        if cg.exists() {
            remove_cgroup_tree(&cg)?;
            removed.push(format!("cgroup {}", cg.display()));
        }
        let v1_errors = remove_v1_cgroup_dirs(&Path::new(LAB_DIR_NAME).join(&id));
        if let Some(e) = v1_errors.first() {
            bail!("{e}");
        }
        let mut unmount_errors = unmount_under(&tmp_root.join(&id));
        unmount_errors.extend(unmount_under(&bpffs_root.join(&id)));
        if let Some(e) = unmount_errors.first() {
            bail!("{e}");
        }
        for dir in [bpffs_root.join(&id), tmp_root.join(&id)] {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
                removed.push(format!("dir {}", dir.display()));
            }
        }
    }
    Ok(removed)
}

/// File in a lab's scratch dir naming the process that owns the lab: `<pid> <start time>`
/// (the start time, field 22 of /proc/<pid>/stat, tells a reused pid apart).
const OWNER_FILE: &str = "owner";

fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing paren don't.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned)
}

fn write_owner(dir: &Path) -> Result<()> {
    let pid = std::process::id();
    let start = process_start_time(pid).context("reading own /proc stat")?;
    fs::write(dir.join(OWNER_FILE), format!("{pid} {start}\n")).context("writing lab owner file")
}

fn owner_alive(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next())
    else {
        return false;
    };
    process_start_time(pid).is_some_and(|s| s == start)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(super::unescape_mountinfo(r"/tmp/a\040b/c"), "/tmp/a b/c");
        assert_eq!(super::unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(super::unescape_mountinfo("/plain/é"), "/plain/é");
        assert_eq!(super::unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }
}
