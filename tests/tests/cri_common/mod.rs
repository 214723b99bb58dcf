//! The kubelet's side of CRI for the containerd lab tests: a blocking facade over the tonic
//! client of the CRI protobufs (`k8s-cri`), talking to a lab [`Containerd`] over its unix socket.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
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

/// The cluster DNS the kubelet would hand every pod (`--cluster-dns`).
pub const CLUSTER_DNS: &str = "10.96.0.10";

/// The kubelet's side of CRI: a blocking facade over the tonic client.
pub struct Kubelet {
    pub rt: tokio::runtime::Runtime,
    pub client: RuntimeServiceClient<Channel>,
    pub cgroup_parent: String,
    pub log_root: PathBuf,
}

/// A pod as the kubelet knows it: sandbox id, IP, and the ids of its containers.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub name: String,
    pub sandbox: String,
    pub config: PodSandboxConfig,
    pub ip: Ipv4Addr,
    pub containers: Vec<String>,
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
    pub fn new(containerd: &Containerd, log_root: &Path) -> Result<Self> {
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
    pub fn reconnect(&mut self, containerd: &Containerd) -> Result<()> {
        self.client = RuntimeServiceClient::new(channel(&self.rt, &containerd.socket())?);
        Ok(())
    }

    /// The sandbox config the kubelet builds for a pod (pkg/kubelet/kuberuntime
    /// `generatePodSandboxConfig`): metadata, hostname, log dir, DNS, port mappings, the
    /// kubelet's labels, cgroup parent and namespace options.
    pub fn sandbox_config(&self, name: &str, host_ports: &[(i32, i32)]) -> PodSandboxConfig {
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
    pub async fn run_sandbox(
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

    pub fn run_pod(
        &self,
        name: &str,
        host_ports: &[(i32, i32)],
        command: &[&str],
    ) -> Result<PodRef> {
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
    pub fn exec(&self, pod: &PodRef, cmd: &[&str]) -> Result<(i32, String)> {
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

    pub async fn stop_and_remove(
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

    pub fn stop(&self, pod: &PodRef) -> Result<()> {
        let mut client = self.client.clone();
        self.rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))
            .with_context(|| format!("StopPodSandbox {}", pod.name))?;
        Ok(())
    }

    pub fn remove(&self, pod: &PodRef) -> Result<()> {
        let mut client = self.client.clone();
        self.rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))
            .with_context(|| format!("RemovePodSandbox {}", pod.name))?;
        Ok(())
    }
}
