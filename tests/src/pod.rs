//! A pod: a network namespace wired by the real `twill-cni` ADD, and the Pod object an API
//! server would hold for it.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
};

use anyhow::{Result, anyhow};

use crate::{bin, labtool_in, netns_command, run_cmd};

/// A pod created through twill-cni.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    /// The pod's IPv4 address (`0.0.0.0` for a pod of an IPv6-only network).
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (dual-stack labs).
    pub ip6: Option<Ipv6Addr>,
    /// The CNI result JSON of ADD.
    pub result: serde_json::Value,
    /// Name of the node the pod runs on (`spec.nodeName`).
    pub node: String,
    pub(crate) node_netns: String,
    pub(crate) cgroup: PathBuf,
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
        labtool_in(self.cmd(bin("labtool")).args(args))
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
        // Every address, IPv4 first, as the kubelet reports a dual-stack pod.
        let ips: Vec<serde_json::Value> = std::iter::once(self.ip.to_string())
            .chain(self.ip6.map(|a| a.to_string()))
            .map(|ip| serde_json::json!({"ip": ip}))
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
                "podIPs": ips,
            },
        })
    }
}
