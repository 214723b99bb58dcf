//! containerd's CRI as the CNI client, driven over gRPC the way the kubelet drives it.
//!
//! A lab node runs its `twill-agent` and a private containerd (`twill_lab::cri`); the test is
//! the kubelet: RunPodSandbox with Kubernetes metadata, hostPort mappings and DNS config,
//! CreateContainer/StartContainer from the lab's busybox image, ExecSync for probes (busybox
//! `nc`), StopPodSandbox and RemovePodSandbox. containerd runs `twill-cni` from the conflist the
//! agent wrote, with `portmap` chained for hostPorts.
mod agent_common;
mod cni_common;
mod cri_common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use agent_common::{AgentProc, ready, service, slice};
use anyhow::{Context as _, Result, bail, ensure};
use cni_common::{assert_clean, host_links, reservations};
use cri_common::{CLUSTER_DNS, Kubelet, PodRef};
use twill_lab::cri::Containerd;
use twill_lab::{LabSpec, Node, require, wait_for};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVER_PORT: u16 = 8080;
const HOST_PORT: i32 = 8081;

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
