//! The DaemonSet of `deploy/` run from the image under a real runtime: the test reads the pod
//! template of `deploy/daemonset.yaml` and plays the kubelet for it against containerd's CRI
//! (hostNetwork sandbox, the init containers in order to completion, then the agent),
//! passing each container's command, args, env, volume mounts with their propagation, and
//! securityContext (privileged, capabilities, read-only root filesystem, no_new_privs) as the
//! kubelet does. The image is `localhost/twill:<version>` built by the same recipe as `cargo
//! xtask image` (from the debug binaries, stripped of debug info). A capability or mount missing
//! from the manifest makes the agent fail here as it would on a node.
//!
//! Lab mapping, the only places this differs from a node:
//! - each `hostPath` is mapped to the lab node's own directory for it (its bpffs dir, cgroup,
//!   CNI dirs, state dir); a hostPath the table does not know fails the test;
//! - the lab has no API server: the ConfigMap's config file gets `manifests: <lab cluster dir>`
//!   and that directory is mounted read-only into the agent (the manifests source stands in for
//!   the API server, as in every lab test);
//! - capabilities root itself lacks on this machine kind (CAP_SYS_RESOURCE, LAB.md; the manifest
//!   no longer asks for it) cannot be granted by any runtime and are left out, with a printed
//!   note.
mod cri_common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use cri_common::Kubelet;
use k8s_cri::v1::{
    self as cri, Capability, ContainerConfig, ContainerMetadata, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, SeLinuxOption, StartContainerRequest, StopPodSandboxRequest,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use twill_lab::cri::Containerd;
use twill_lab::{LabSpec, Node, require, run_cmd, wait_for};

const VIP: &str = "10.96.0.10";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read_yaml<T: serde::de::DeserializeOwned>(file: &str) -> Result<T> {
    let text = std::fs::read_to_string(deploy_dir().join(file))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing deploy/{file}"))
}

/// Capability bit numbers (linux/capability.h) of the names the manifest may use.
fn capability_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => bail!("capability {other} is not in the test's table: add its bit"),
    })
}

/// Whether this process's bounding set holds the capability (a runtime can grant no more).
fn root_has(name: &str) -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .ok_or_else(|| anyhow!("no CapBnd in /proc/self/status"))?;
    let mask = u64::from_str_radix(bnd.trim(), 16)?;
    Ok(mask & (1 << capability_bit(name)?) != 0)
}

/// The volumes of the pod template as lab host paths: hostPaths through the node mapping,
/// ConfigMaps written out as files.
fn volumes(
    spec: &PodSpec,
    node: &Node,
    containerd: &Containerd,
    config_maps: &HashMap<String, ConfigMap>,
) -> Result<HashMap<String, PathBuf>> {
    let host_paths: HashMap<&str, PathBuf> = HashMap::from([
        ("/sys/fs/bpf", node.bpffs.clone()),
        ("/sys/fs/cgroup", node.cgroup.clone()),
        ("/opt/cni/bin", containerd.cni_bin_dir()),
        ("/etc/cni/net.d", node.cni_conf_dir()),
        ("/var/lib/twill", node.state_dir()),
        ("/run/twill", node.dir.join("run-twill")),
        // The lab's containerd keeps sandbox namespaces under its state dir
        // (`netns_mounts_under_state_dir`) where a node's runtime uses /var/run/netns.
        ("/var/run/netns", containerd.dir().join("state/netns")),
    ]);
    let mut out = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let path = if let Some(hp) = &v.host_path {
            let path = host_paths
                .get(hp.path.as_str())
                .ok_or_else(|| anyhow!("hostPath {} has no lab mapping", hp.path))?
                .clone();
            // The kubelet's hostPath type checks.
            match hp.type_.as_deref() {
                Some("DirectoryOrCreate") => std::fs::create_dir_all(&path)?,
                Some("Directory") => ensure!(path.is_dir(), "hostPath {} missing", hp.path),
                other => bail!("hostPath type {other:?} not handled"),
            }
            path
        } else if let Some(cm) = &v.config_map {
            let map = config_maps
                .get(&cm.name)
                .ok_or_else(|| anyhow!("ConfigMap {} is not in deploy/", cm.name))?;
            let dir = node.dir.join("configmaps").join(&cm.name);
            std::fs::create_dir_all(&dir)?;
            for (key, value) in map.data.iter().flatten() {
                std::fs::write(dir.join(key), value)?;
            }
            dir
        } else {
            bail!("volume {} of a kind the test does not map", v.name);
        };
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// The CRI container config the kubelet makes from a pod template's container.
fn container_config(
    c: &Container,
    node: &Node,
    volumes: &HashMap<String, PathBuf>,
    namespaces: &NamespaceOption,
    extra_mounts: &[Mount],
) -> Result<ContainerConfig> {
    let mut envs = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from))
                if from
                    .field_ref
                    .as_ref()
                    .is_some_and(|f| f.field_path == "spec.nodeName") =>
            {
                node.name.clone()
            }
            _ => bail!("env {} of a kind the test does not resolve", e.name),
        };
        envs.push(KeyValue {
            key: e.name.clone(),
            value,
        });
    }
    for from in c.env_from.iter().flatten() {
        // The only envFrom is the optional API server ConfigMap, which a lab cluster lacks.
        ensure!(
            from.config_map_ref
                .as_ref()
                .is_some_and(|r| r.optional == Some(true)),
            "envFrom that is not an optional ConfigMap"
        );
    }
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let host = volumes
            .get(&m.name)
            .ok_or_else(|| anyhow!("mount of unknown volume {}", m.name))?;
        mounts.push(Mount {
            container_path: m.mount_path.clone(),
            host_path: host.display().to_string(),
            readonly: m.read_only == Some(true),
            propagation: match m.mount_propagation.as_deref() {
                Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
                Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
                None | Some("None") => cri::MountPropagation::PropagationPrivate,
                Some(other) => bail!("mountPropagation {other}"),
            }
            .into(),
            ..Mount::default()
        });
    }
    mounts.extend_from_slice(extra_mounts);
    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    let mut add = Vec::new();
    for cap in caps.add.iter().flatten() {
        if root_has(cap)? {
            add.push(cap.clone());
        } else {
            eprintln!(
                "note: {} asks for {cap}, which root lacks on this machine: left out",
                c.name
            );
        }
    }
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: c.image.clone().unwrap_or_default(),
            ..ImageSpec::default()
        }),
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        envs,
        mounts,
        log_path: format!("{}/0.log", c.name),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: add,
                    drop_capabilities: caps.drop.unwrap_or_default(),
                    add_ambient_capabilities: Vec::new(),
                }),
                privileged: sc.privileged == Some(true),
                namespace_options: Some(namespaces.clone()),
                selinux_options: sc.se_linux_options.map(|o| SeLinuxOption {
                    user: o.user.unwrap_or_default(),
                    role: o.role.unwrap_or_default(),
                    r#type: o.type_.unwrap_or_default(),
                    level: o.level.unwrap_or_default(),
                }),
                readonly_rootfs: sc.read_only_root_filesystem == Some(true),
                no_new_privs: sc.allow_privilege_escalation == Some(false),
                ..LinuxContainerSecurityContext::default()
            }),
            ..LinuxContainerConfig::default()
        }),
        ..ContainerConfig::default()
    })
}

/// Creates and starts a container; for an init container, waits (bounded) for it to exit 0.
fn run_container(
    kubelet: &Kubelet,
    sandbox: &str,
    sandbox_config: &PodSandboxConfig,
    config: ContainerConfig,
    wait_exit: bool,
) -> Result<String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let log = Path::new(&sandbox_config.log_directory).join(&config.log_path);
    let mut client = kubelet.client.clone();
    let id = kubelet.rt.block_on(async {
        let id = client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        client
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {name}"))?;
        anyhow::Ok(id)
    })?;
    if wait_exit {
        let status = wait_for(Duration::from_secs(30), &format!("{name} to exit"), || {
            let mut client = kubelet.client.clone();
            let status = kubelet
                .rt
                .block_on(client.container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                }))?
                .into_inner()
                .status
                .ok_or_else(|| anyhow!("no status"))?;
            Ok((status.state == i32::from(cri::ContainerState::ContainerExited)).then_some(status))
        })?;
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        ensure!(
            status.exit_code == 0,
            "init container {name} exited {}: {output}",
            status.exit_code
        );
        eprintln!("init container {name}: {}", output.trim());
    }
    Ok(id)
}

/// Copies of the binaries without debug info (the image carries what a release build would,
/// at a fraction of the debug build's size).
fn stripped_binaries(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for bin in ["twill-agent", "twill-cni"] {
        run_cmd(
            std::process::Command::new("objcopy")
                .arg("--strip-debug")
                .arg(twill_lab::bin(bin))
                .arg(dir.join(bin)),
        )?;
    }
    Ok(())
}

/// GET on the agent's health port from the node (where the kubelet's probes come from).
fn probe(node: &Node, path: &str) -> Result<bool> {
    let (code, out) = node.labtool(&[
        "http",
        "--to",
        &format!("{}:10256", node.ip),
        "--path",
        path,
    ])?;
    Ok(code == 0 && out.starts_with("status=200"))
}

/// The image the manifest names, built the way `cargo xtask image` builds it: (dir of the
/// binaries in it, image tarball).
fn build_image(spec: &PodSpec, node: &Node) -> Result<(PathBuf, PathBuf)> {
    let image = twill_lab::image::image_name(env!("CARGO_PKG_VERSION"));
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        ensure!(
            c.image.as_deref() == Some(image.as_str()),
            "{} runs {:?}, not this version's image {image}",
            c.name,
            c.image
        );
    }
    let bins = node.dir.join("image-bin");
    stripped_binaries(&bins)?;
    let tarball = node.dir.join("twill-image.tar");
    twill_lab::image::build(&bins, &image, &tarball)?;
    Ok((bins, tarball))
}

/// Runs the pod template as the kubelet would: its sandbox, each init container to completion
/// in order, then the containers. Returns the sandbox id.
fn run_pod_template(
    kubelet: &Kubelet,
    spec: &PodSpec,
    node: &Node,
    containerd: &Containerd,
    volumes: &HashMap<String, PathBuf>,
    cluster: &str,
) -> Result<String> {
    let mode = |host: Option<bool>, otherwise| {
        if host == Some(true) {
            cri::NamespaceMode::Node.into()
        } else {
            otherwise
        }
    };
    let namespaces = NamespaceOption {
        network: mode(spec.host_network, cri::NamespaceMode::Pod.into()),
        pid: mode(spec.host_pid, cri::NamespaceMode::Container.into()),
        ipc: cri::NamespaceMode::Pod.into(),
        ..NamespaceOption::default()
    };
    let privileged = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("twill-agent-{}", node.name),
            uid: "twill-agent-uid".to_owned(),
            namespace: "twill-system".to_owned(),
            attempt: 0,
        }),
        // The kubelet names only pods with their own UTS namespace; a hostNetwork pod keeps the
        // node's (runc refuses a hostname without a private UTS namespace).
        hostname: if spec.host_network == Some(true) {
            String::new()
        } else {
            node.name.clone()
        },
        log_directory: node.dir.join("pods/twill-agent").display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: containerd.pod_cgroup_parent().to_owned(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                privileged,
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    };
    let mut client = kubelet.client.clone();
    let sandbox = kubelet
        .rt
        .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        }))
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;

    for c in spec.init_containers.iter().flatten() {
        let config = container_config(c, node, volumes, &namespaces, &[])?;
        run_container(kubelet, &sandbox, &sandbox_config, config, true)?;
    }
    let cluster_mount = Mount {
        container_path: cluster.to_owned(),
        host_path: cluster.to_owned(),
        readonly: true,
        ..Mount::default()
    };
    for c in &spec.containers {
        let config = container_config(
            c,
            node,
            volumes,
            &namespaces,
            std::slice::from_ref(&cluster_mount),
        )?;
        run_container(kubelet, &sandbox, &sandbox_config, config, false)?;
    }
    Ok(sandbox)
}

/// Service `web` (ClusterIP VIP:80) with one ready endpoint `ip`:8080 on `node`.
fn web_service(ip: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{type: ClusterIP, clusterIP: {VIP}, clusterIPs: [{VIP}], ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}]\n\
         ports: [{{port: 8080, protocol: TCP}}]\n"
    )
}

#[test]
fn daemonset_pod_template_runs_from_the_image_under_containerd() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let ds: DaemonSet = read_yaml("daemonset.yaml")?;
    let config_map: ConfigMap = read_yaml("configmap.yaml")?;
    let spec = ds
        .spec
        .template
        .spec
        .ok_or_else(|| anyhow!("DaemonSet without a pod template"))?;

    // A backend pod wired by the lab's own CNI driver before the agent exists.
    let web = n0.add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;

    let start = std::time::Instant::now();
    let (bins, tarball) = build_image(&spec, n0)?;
    eprintln!("image built in {:?}", start.elapsed());

    // The node's /sys/fs/bpf as a systemd host has it: a shared mount (Bidirectional and
    // HostToContainer propagation require one; the Lab guard unmounts it).
    let bpffs = n0.bpffs.display().to_string();
    run_cmd(std::process::Command::new("mount").args(["--bind", &bpffs, &bpffs]))?;
    run_cmd(std::process::Command::new("mount").args(["--make-shared", &bpffs]))?;

    let containerd = Containerd::start_with(n0, false)?;
    // The runtime's netns directory as a node has it: a shared mount point (iproute2 makes
    // /run/netns one, and /run is shared on systemd hosts), so the agent's HostToContainer mount
    // follows new pod namespaces. Under containerd's dir: its teardown unmounts it.
    let netns_dir = containerd.dir().join("state/netns");
    std::fs::create_dir_all(&netns_dir)?;
    let netns_dir = netns_dir.display().to_string();
    run_cmd(std::process::Command::new("mount").args(["--rbind", &netns_dir, &netns_dir]))?;
    run_cmd(std::process::Command::new("mount").args(["--make-shared", &netns_dir]))?;
    containerd.import(&tarball)?;
    eprintln!("image imported at {:?}", start.elapsed());
    let kubelet = Kubelet::new(&containerd, &n0.dir.join("pods"))?;

    let mut config_maps = HashMap::from([(
        config_map.metadata.name.clone().unwrap_or_default(),
        config_map,
    )]);
    // The lab's stand-in for the API server (see the module doc).
    let cluster = lab.manifests_dir().display().to_string();
    for map in config_maps.values_mut() {
        if let Some(conf) = map.data.as_mut().and_then(|d| d.get_mut("config.yaml")) {
            let _ = writeln!(conf, "manifests: {cluster}");
        }
    }
    let volumes = volumes(&spec, n0, &containerd, &config_maps)?;
    let sandbox = run_pod_template(&kubelet, &spec, n0, &containerd, &volumes, &cluster)?;
    let agent_log = n0.dir.join("pods/twill-agent/twill-agent/0.log");
    let show_log = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    eprintln!("containers started at {:?}", start.elapsed());
    // startupProbe (/livez) then readinessProbe (/healthz), as the kubelet would probe them; the
    // manifest gives start-up 2 s x 60 = 120 s.
    wait_for(Duration::from_mins(2), "the agent's /livez", || {
        Ok(probe(n0, "/livez")?.then_some(()))
    })
    .with_context(|| format!("agent log: {}", show_log()))?;
    wait_for(Duration::from_secs(30), "the agent's /healthz", || {
        Ok(probe(n0, "/healthz")?.then_some(()))
    })
    .with_context(|| format!("agent log: {}", show_log()))?;

    // install-cni put the image's twill-cni into the node's CNI bin dir; the agent wrote the
    // CNI config; its maps are pinned in the node's bpffs through the mounts.
    let installed = containerd.cni_bin_dir().join("twill-cni");
    ensure!(
        std::fs::read(&installed)? == std::fs::read(bins.join("twill-cni"))?,
        "{} is not the image's twill-cni",
        installed.display()
    );
    let conflist = std::fs::read_to_string(n0.conflist_path())?;
    ensure!(
        conflist.contains("cniVersions"),
        "not the agent's conflist: {conflist}"
    );
    ensure!(
        n0.bpffs.join("twill").read_dir()?.next().is_some(),
        "nothing pinned under the node's bpffs"
    );

    eprintln!("agent healthy at {:?}", start.elapsed());
    // It serves a Service: a connection from the node to the ClusterIP reaches the pod.
    std::fs::write(
        lab.manifests_dir().join("web.yaml"),
        web_service(&web.ip.to_string(), &n0.name),
    )?;
    wait_for(
        Duration::from_secs(20),
        "ClusterIP answered by web0",
        || {
            let (code, out) =
                n0.labtool(&["tcp", "--to", &format!("{VIP}:80"), "--timeout-ms", "1000"])?;
            Ok((code == 0 && out.contains("reply=web0")).then_some(()))
        },
    )
    .with_context(|| format!("agent log: {}", show_log()))?;

    // The kubelet's teardown: the agent gets SIGTERM through StopPodSandbox.
    let mut client = kubelet.client.clone();
    kubelet.rt.block_on(async {
        client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await?;
        client
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
