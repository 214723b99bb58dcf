//! containerd's CRI as the CNI client, driven over gRPC the way the kubelet drives it.
//!
//! A lab node runs its `twill-agent` and a private containerd (`twill_lab::cri`); the test is
//! the kubelet: RunPodSandbox with Kubernetes metadata, hostPort mappings and DNS config,
//! CreateContainer/StartContainer from the lab's busybox image, ExecSync for probes (busybox
//! `nc`), StopPodSandbox and RemovePodSandbox. containerd runs `twill-cni` from the conflist the
//! agent wrote, with `portmap` chained for hostPorts.
mod agent_common;
mod cni_common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_common::{AgentProc, ready, service, slice};
use anyhow::{Context as _, Result, anyhow, bail, ensure};
use cni_common::{assert_clean, host_links, reservations};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as cri, ContainerConfig, ContainerMetadata, CreateContainerRequest, DnsConfig,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, PortMapping,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};
use twill_lab::cri::{BUSYBOX_IMAGE, Containerd};
use twill_lab::{LabSpec, Node, require, wait_for};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster DNS the kubelet would hand every pod (`--cluster-dns`).
const CLUSTER_DNS: &str = "10.96.0.10";
const SERVER_PORT: u16 = 8080;
const HOST_PORT: i32 = 8081;

/// The kubelet's side of CRI: a blocking facade over the tonic client.
struct Kubelet {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    cgroup_parent: String,
    log_root: PathBuf,
}

/// A pod as the kubelet knows it: sandbox id, IP, and the ids of its containers.
#[derive(Clone, Debug)]
struct PodRef {
    name: String,
    sandbox: String,
    config: PodSandboxConfig,
    ip: Ipv4Addr,
    containers: Vec<String>,
}

fn channel(rt: &tokio::runtime::Runtime, socket: &Path) -> Result<Channel> {
    let socket = socket.to_owned();
    // The URI is a placeholder: the connector dials the unix socket (tonic's documented way).
    let endpoint =
        Endpoint::try_from("http://[::1]:50051")?.connect_timeout(Duration::from_secs(5));
    let channel = rt.block_on(endpoint.connect_with_connector(tower::service_fn(
        move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        },
    )))?;
    Ok(channel)
}

impl Kubelet {
    fn new(containerd: &Containerd, log_root: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = RuntimeServiceClient::new(channel(&rt, &containerd.socket())?);
        let kubelet = Kubelet {
            rt,
            client,
            cgroup_parent: containerd.pod_cgroup_parent().to_owned(),
            log_root: log_root.to_owned(),
        };
        let version = kubelet
            .rt
            .block_on(kubelet.client.clone().version(cri::VersionRequest {
                version: "v1".into(),
            }))?
            .into_inner();
        ensure!(
            version.runtime_name == "containerd" && version.runtime_api_version == "v1",
            "unexpected runtime: {version:?}"
        );
        Ok(kubelet)
    }

    /// Reconnects (after a containerd restart).
    fn reconnect(&mut self, containerd: &Containerd) -> Result<()> {
        self.client = RuntimeServiceClient::new(channel(&self.rt, &containerd.socket())?);
        Ok(())
    }

    /// The sandbox config the kubelet builds for a pod (pkg/kubelet/kuberuntime
    /// `generatePodSandboxConfig`): metadata, hostname, log dir, DNS, port mappings, the
    /// kubelet's labels, cgroup parent and namespace options.
    fn sandbox_config(&self, name: &str, host_ports: &[(i32, i32)]) -> PodSandboxConfig {
        let uid = format!("{name}-uid");
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_owned(), name.to_owned()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                "default".to_owned(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), uid.clone()),
        ]);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.clone(),
                namespace: "default".to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: self
                .log_root
                .join(format!("default_{name}_{uid}"))
                .display()
                .to_string(),
            dns_config: Some(DnsConfig {
                servers: vec![CLUSTER_DNS.to_owned()],
                searches: vec![
                    "default.svc.cluster.local".to_owned(),
                    "svc.cluster.local".to_owned(),
                    "cluster.local".to_owned(),
                ],
                options: vec!["ndots:5".to_owned()],
            }),
            port_mappings: host_ports
                .iter()
                .map(|&(container_port, host_port)| PortMapping {
                    protocol: cri::Protocol::Tcp.into(),
                    container_port,
                    host_port,
                    host_ip: String::new(),
                })
                .collect(),
            labels,
            annotations: HashMap::from([(
                "kubernetes.io/config.source".to_owned(),
                "api".to_owned(),
            )]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: cri::NamespaceMode::Pod.into(),
                        pid: cri::NamespaceMode::Container.into(),
                        ipc: cri::NamespaceMode::Pod.into(),
                        ..NamespaceOption::default()
                    }),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }

    /// RunPodSandbox, then PodSandboxStatus for its IP.
    async fn run_sandbox(
        mut client: RuntimeServiceClient<Channel>,
        name: String,
        config: PodSandboxConfig,
    ) -> Result<PodRef> {
        let sandbox = client
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("RunPodSandbox {name}"))?
            .into_inner()
            .pod_sandbox_id;
        let status = client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .ok_or_else(|| anyhow!("no sandbox status"))?;
        let ip = status
            .network
            .map(|n| n.ip)
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("sandbox {name} has no IPv4 address"))?;
        Ok(PodRef {
            name,
            sandbox,
            config,
            ip,
            containers: Vec::new(),
        })
    }

    fn run_pod(&self, name: &str, host_ports: &[(i32, i32)], command: &[&str]) -> Result<PodRef> {
        let config = self.sandbox_config(name, host_ports);
        let mut pod = self.rt.block_on(Self::run_sandbox(
            self.client.clone(),
            name.to_owned(),
            config,
        ))?;
        let mut client = self.client.clone();
        let id = self.rt.block_on(async {
            let id = client
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.sandbox.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: name.to_owned(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: BUSYBOX_IMAGE.to_owned(),
                            ..ImageSpec::default()
                        }),
                        command: command.iter().map(|s| (*s).to_owned()).collect(),
                        log_path: format!("{name}/0.log"),
                        ..ContainerConfig::default()
                    }),
                    sandbox_config: Some(pod.config.clone()),
                })
                .await
                .with_context(|| format!("CreateContainer in {name}"))?
                .into_inner()
                .container_id;
            client
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .with_context(|| format!("StartContainer in {name}"))?;
            anyhow::Ok(id)
        })?;
        pod.containers.push(id);
        Ok(pod)
    }

    /// ExecSync in the pod's first container: (exit code, stdout + stderr).
    fn exec(&self, pod: &PodRef, cmd: &[&str]) -> Result<(i32, String)> {
        let mut client = self.client.clone();
        let resp = self
            .rt
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: pod.containers[0].clone(),
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: 5,
            }))
            .with_context(|| format!("ExecSync {cmd:?} in {}", pod.name))?
            .into_inner();
        Ok((
            resp.exit_code,
            format!(
                "{}{}",
                String::from_utf8_lossy(&resp.stdout),
                String::from_utf8_lossy(&resp.stderr)
            ),
        ))
    }

    async fn stop_and_remove(
        mut client: RuntimeServiceClient<Channel>,
        sandbox: String,
    ) -> Result<()> {
        client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await
            .context("StopPodSandbox")?;
        client
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox,
            })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }

    fn stop(&self, pod: &PodRef) -> Result<()> {
        let mut client = self.client.clone();
        self.rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))
            .with_context(|| format!("StopPodSandbox {}", pod.name))?;
        Ok(())
    }

    fn remove(&self, pod: &PodRef) -> Result<()> {
        let mut client = self.client.clone();
        self.rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))
            .with_context(|| format!("RemovePodSandbox {}", pod.name))?;
        Ok(())
    }
}

/// Waits until `nc` from `pod` to `addr port` prints `want` (the server answers with its name).
fn wait_nc(kubelet: &Kubelet, pod: &PodRef, addr: &str, port: u16, want: &str) -> Result<()> {
    let mut last = String::new();
    wait_for(
        Duration::from_secs(10),
        &format!("{addr}:{port} answered by {want} from {}", pod.name),
        || {
            let (code, out) = kubelet.exec(pod, &["nc", "-w", "2", addr, &port.to_string()])?;
            last = format!("exit {code}: {out}");
            Ok((code == 0 && out.trim() == want).then_some(()))
        },
    )
    .with_context(|| format!("last probe: {last}"))
}

/// A server that answers every connection with its pod's hostname (persistent `nc -ll`).
const NAME_SERVER: &[&str] = &["nc", "-ll", "-p", "8080", "-e", "hostname"];

fn write_service(lab: &twill_lab::Lab, node: &Node, web: &PodRef) -> Result<()> {
    lab.apply_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", VIP, &[("", 80, SERVER_PORT, "TCP")], "", &[]),
            slice(
                "web",
                "web-1",
                &[ready(web.ip, &node.name)],
                &[("", SERVER_PORT, "TCP")]
            )
        ),
    )
}

/// Starts the node's agent and waits for the conflist it writes (replacing the lab's
/// hand-written one, which only the agent's has `cniVersions`), which containerd then reads.
fn start_agent(node: &Node, chain_portmap: bool) -> Result<AgentProc> {
    let flag = format!("--cni-chain-portmap={chain_portmap}");
    let agent = AgentProc::start(node, &[&flag])?;
    wait_for(Duration::from_secs(20), "the agent's conflist", || {
        let text = std::fs::read_to_string(node.conflist_path()).unwrap_or_default();
        Ok(
            (text.contains("cniVersions") && text.contains("portmap") == chain_portmap)
                .then_some(()),
        )
    })?;
    Ok(agent)
}

fn sandbox_ips_reserved_for(node: &Node, pod: &PodRef) -> Result<()> {
    let ip = pod.ip.to_string();
    ensure!(
        node.pod_cidr.contains(pod.ip),
        "{} got {ip}, outside the node's pod CIDR {}",
        pod.name,
        node.pod_cidr
    );
    let owner = std::fs::read_to_string(node.state_dir().join("ipam/twill").join(&ip))
        .with_context(|| format!("no IPAM reservation for {ip}"))?;
    ensure!(
        owner.starts_with(&pod.sandbox),
        "reservation of {ip} names {owner:?}, not sandbox {}",
        pod.sandbox
    );
    Ok(())
}

/// The kubelet's ordinary life of two pods: addresses from Twill's IPAM, pod to pod, pod to a
/// ClusterIP Service, a hostPort from outside the node through the chained portmap, DEL on
/// StopPodSandbox, nothing left after RemovePodSandbox.
#[test]
fn cri_pods_get_twill_networking_and_release_it() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_external_client())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let _agent = start_agent(n0, true)?;
    let containerd = Containerd::start(n0)?;
    let kubelet = Kubelet::new(&containerd, &n0.dir.join("pods"))?;

    let web = kubelet.run_pod("web", &[(i32::from(SERVER_PORT), HOST_PORT)], NAME_SERVER)?;
    let client = kubelet.run_pod("client", &[], &["sleep", "3600"])?;
    for pod in [&web, &client] {
        sandbox_ips_reserved_for(n0, pod)?;
    }
    ensure!(web.ip != client.ip, "both pods got {}", web.ip);
    ensure!(host_links(n0)?.len() == 2, "links: {:?}", host_links(n0)?);
    // DNS config reaches the pod as the kubelet asked.
    let (_, resolv) = kubelet.exec(&client, &["cat", "/etc/resolv.conf"])?;
    ensure!(
        resolv.contains(&format!("nameserver {CLUSTER_DNS}")) && resolv.contains("ndots:5"),
        "{resolv}"
    );

    // pod -> pod by IP, and pod -> ClusterIP Service (socket-level LB in the node's cgroup).
    wait_nc(&kubelet, &client, &web.ip.to_string(), SERVER_PORT, "web")?;
    write_service(&lab, n0, &web)?;
    wait_nc(&kubelet, &client, &VIP.to_string(), 80, "web")?;

    // hostPort: from outside the node to <node IP>:8081, DNAT by the chained portmap.
    let host_port = HOST_PORT.to_string();
    let node_ip = n0.ip.to_string();
    wait_for(Duration::from_secs(10), "hostPort from outside", || {
        let out = lab
            .external()
            .cmd("busybox")
            .args(["nc", "-w", "2", &node_ip, &host_port])
            .output()?;
        Ok((String::from_utf8_lossy(&out.stdout).trim() == "web").then_some(()))
    })?;

    // StopPodSandbox runs DEL: web's address and veth are released at once, its hostPort rule
    // goes; RemovePodSandbox then leaves nothing.
    kubelet.stop(&web)?;
    ensure!(
        !reservations(&n0.state_dir(), "twill").contains(&web.ip.to_string()),
        "web's address still reserved after StopPodSandbox"
    );
    ensure!(host_links(n0)?.len() == 1, "links: {:?}", host_links(n0)?);
    let nat = n0.run(&["iptables-save", "-t", "nat"])?;
    ensure!(
        !nat.contains(&format!("--dport {HOST_PORT}")),
        "hostPort rule left after StopPodSandbox: {nat}"
    );
    kubelet.remove(&web)?;
    kubelet.stop(&client)?;
    kubelet.remove(&client)?;
    assert_clean(n0, &n0.state_dir())?;
    ensure_no_sandbox_netns(&containerd)?;
    Ok(())
}

/// Pod network namespaces containerd still holds (bind mounts under its state dir).
fn ensure_no_sandbox_netns(containerd: &Containerd) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*containerd.dir().to_string_lossy()) && l.contains("nsfs"))
        .collect();
    ensure!(left.is_empty(), "sandbox netns mounts left: {left:?}");
    Ok(())
}

/// 50 sandboxes created, then removed, all at once (the kubelet's pod workers run in parallel):
/// 50 distinct addresses from the pod CIDR, and afterwards no reservation, veth, route or netns
/// mount left. Bounded: both phases must finish within 150 s.
#[test]
fn cri_fifty_parallel_sandboxes_leak_nothing() -> Result<()> {
    const N: usize = 50;
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let _agent = start_agent(n0, false)?;
    let containerd = Containerd::start(n0)?;
    let kubelet = Kubelet::new(&containerd, &n0.dir.join("pods"))?;
    let start = Instant::now();
    let pods: Vec<PodRef> = kubelet.rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let name = format!("p{i}");
            let config = kubelet.sandbox_config(&name, &[]);
            set.spawn(Kubelet::run_sandbox(kubelet.client.clone(), name, config));
        }
        let mut pods = Vec::new();
        while let Some(r) = set.join_next().await {
            pods.push(r??);
        }
        anyhow::Ok(pods)
    })?;
    let created = start.elapsed();
    let mut ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ips.sort_unstable();
    ips.dedup();
    ensure!(
        ips.len() == N,
        "{} distinct addresses for {N} sandboxes",
        ips.len()
    );
    for pod in &pods {
        sandbox_ips_reserved_for(n0, pod)?;
    }
    ensure!(host_links(n0)?.len() == N);

    let start_remove = Instant::now();
    kubelet.rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for pod in &pods {
            set.spawn(Kubelet::stop_and_remove(
                kubelet.client.clone(),
                pod.sandbox.clone(),
            ));
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })?;
    let removed = start_remove.elapsed();
    eprintln!("{N} sandboxes: created in {created:?}, stopped and removed in {removed:?}");
    ensure!(
        created + removed < Duration::from_secs(150),
        "too slow: created in {created:?}, removed in {removed:?}"
    );
    assert_clean(n0, &n0.state_dir())?;
    ensure_no_sandbox_netns(&containerd)?;
    Ok(())
}

/// containerd restarted (as on an upgrade) while its pods run: the pods keep their addresses and
/// connectivity (nothing re-runs ADD), the restarted daemon still tears them down with DEL, and
/// new sandboxes get networking.
#[test]
fn cri_containerd_restart_keeps_pod_networking() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let _agent = start_agent(n0, false)?;
    let mut containerd = Containerd::start(n0)?;
    let mut kubelet = Kubelet::new(&containerd, &n0.dir.join("pods"))?;
    let web = kubelet.run_pod("web", &[], NAME_SERVER)?;
    let client = kubelet.run_pod("client", &[], &["sleep", "3600"])?;
    wait_nc(&kubelet, &client, &web.ip.to_string(), SERVER_PORT, "web")?;
    let before = reservations(&n0.state_dir(), "twill");

    containerd.restart()?;
    kubelet.reconnect(&containerd)?;
    ensure!(
        reservations(&n0.state_dir(), "twill") == before,
        "reservations changed across the restart"
    );
    wait_nc(&kubelet, &client, &web.ip.to_string(), SERVER_PORT, "web")?;
    let late = kubelet.run_pod("late", &[], NAME_SERVER)?;
    sandbox_ips_reserved_for(n0, &late)?;
    wait_nc(&kubelet, &client, &late.ip.to_string(), SERVER_PORT, "late")?;

    for pod in [&web, &client, &late] {
        kubelet.stop(pod)?;
        kubelet.remove(pod)?;
    }
    assert_clean(n0, &n0.state_dir())?;
    ensure_no_sandbox_netns(&containerd)?;
    if let Some(line) = containerd
        .log()
        .lines()
        .find(|l| l.contains("level=error") && l.contains("cni"))
    {
        bail!("containerd logged a CNI error: {line}");
    }
    Ok(())
}
