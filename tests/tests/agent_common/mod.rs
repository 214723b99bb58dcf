//! Helpers of the agent e2e tests: Service/EndpointSlice manifests and bounded polling.
#![allow(dead_code, reason = "each test file uses a different subset")]
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use twill_lab::{Lab, Node, Pod};

/// One Service port: (name, port, targetPort, protocol).
pub type PortSpec<'a> = (&'a str, u16, u16, &'a str);

/// A ClusterIP Service manifest. `extra_spec` is YAML appended inside `spec:` (2-space indent),
/// `labels` inside `metadata.labels`.
pub fn service(
    name: &str,
    ip: Ipv4Addr,
    ports: &[PortSpec<'_>],
    extra_spec: &str,
    labels: &[(&str, &str)],
) -> String {
    let mut y =
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n");
    if !labels.is_empty() {
        y.push_str("  labels:\n");
        for (k, v) in labels {
            let _ = writeln!(y, "    {k}: \"{v}\"");
        }
    }
    let _ = writeln!(
        y,
        "spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:"
    );
    for (pname, port, target, proto) in ports {
        let _ = writeln!(
            y,
            "  - name: \"{pname}\"\n    port: {port}\n    targetPort: {target}\n    protocol: {proto}"
        );
    }
    y.push_str(extra_spec);
    y
}

/// One endpoint: (address, node name, ready, serving, terminating).
pub type Ep<'a> = (Ipv4Addr, &'a str, bool, bool, bool);

/// Ready endpoint on `node`.
pub fn ready(ip: Ipv4Addr, node: &str) -> Ep<'_> {
    (ip, node, true, true, false)
}

/// An EndpointSlice of Service `svc`; ports: (name, port, protocol).
pub fn slice(svc: &str, name: &str, eps: &[Ep<'_>], ports: &[(&str, u16, &str)]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nendpoints:\n"
    );
    if eps.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    for (ip, node, r, s, t) in eps {
        let _ = writeln!(
            y,
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: {r}, serving: {s}, terminating: {t}}}"
        );
    }
    y.push_str("ports:\n");
    for (pname, port, proto) in ports {
        let _ = writeln!(
            y,
            "- name: \"{pname}\"\n  port: {port}\n  protocol: {proto}"
        );
    }
    y
}

/// The lab's [`twill_lab::wait_until`] (polls until `Ok(true)`, bounded), under the name these
/// tests have always imported it by.
pub use twill_lab::wait_until as wait_for;

/// `labtool tcp --to addr` from `pod`: (exit code, output).
pub fn tcp(pod: &Pod, to: &str) -> Result<(i32, String)> {
    pod.labtool(&["tcp", "--to", to, "--timeout-ms", "1000"])
}

/// `labtool udp --to addr` from `pod`.
pub fn udp(pod: &Pod, to: &str, connected: bool) -> Result<(i32, String)> {
    let mut args = vec!["udp", "--to", to, "--timeout-ms", "1000"];
    if connected {
        args.push("--connected");
    }
    pod.labtool(&args)
}

/// The backend name in a labtool reply (`reply=<name> ...`), owned ([`twill_lab::replier`]).
pub fn replier(out: &str) -> Option<String> {
    twill_lab::replier(out).map(str::to_owned)
}

/// Waits until a TCP request from `pod` to `to` is answered by `name`.
pub fn wait_tcp_reply(pod: &Pod, to: &str, name: &str) -> Result<()> {
    wait_for(
        &format!("{to} answered by {name}"),
        Duration::from_secs(10),
        || {
            let (code, out) = tcp(pod, to)?;
            Ok(code == 0 && replier(&out).as_deref() == Some(name))
        },
    )
}

/// Waits until a TCP connection from `pod` to `to` is refused (exit code 2).
pub fn wait_tcp_refused(pod: &Pod, to: &str) -> Result<()> {
    wait_for(&format!("{to} refused"), Duration::from_secs(20), || {
        Ok(tcp(pod, to)?.0 == 2)
    })
}

/// `twill-agent run` in a node (the lab's [`twill_lab::Agent`]) that prints the tail of its log
/// when dropped: the test harness shows captured output only for failed tests.
pub struct AgentProc(twill_lab::Agent);

impl AgentProc {
    pub fn start(node: &Node, extra: &[&str]) -> Result<Self> {
        Ok(Self(node.start_agent(extra)?))
    }

    pub fn stop(&mut self) -> Result<()> {
        self.0.stop()
    }

    pub fn restart(&mut self) -> Result<()> {
        self.0.restart()
    }

    pub fn is_running(&mut self) -> bool {
        self.0.is_running()
    }

    pub fn log(&self) -> String {
        self.0.log()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.stop();
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("--- agent log (last {} lines) ---", tail.len());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// Starts the agent on node `i` and waits until its API answers.
pub fn start_agent(lab: &Lab, i: usize, extra: &[&str]) -> Result<AgentProc> {
    let node = lab.node(i);
    let mut agent = AgentProc::start(node, extra)?;
    wait_agent_ready(node, &mut agent)?;
    Ok(agent)
}

/// Waits until the agent's API answers (it binds the socket before loading the datapath, so
/// also wait for the first apply: `debug maps` lists what is programmed).
pub fn wait_agent_ready(node: &Node, agent: &mut AgentProc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !agent.is_running() {
            bail!("the agent exited:\n{}", agent.log());
        }
        if node.debug(&["services"]).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent's API did not come up within 20 s:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `labtool tcp-loop` from `pod`: the JSON report (`ok`, `failures`, `counts`, `errors`).
pub fn tcp_loop(pod: &Pod, to: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["tcp-loop", "--to", to, "--timeout-ms", "2000"];
    args.extend_from_slice(extra);
    let (code, out) = pod.labtool(&args)?;
    anyhow::ensure!(code == 0, "tcp-loop failed ({code}): {out}");
    Ok(serde_json::from_str(&out)?)
}

/// Distinct backend names answering `n` TCP requests from `pod` to `to`.
pub fn repliers(pod: &Pod, to: &str, n: u32) -> Result<std::collections::BTreeMap<String, u64>> {
    let report = tcp_loop(pod, to, &["--count", &n.to_string()])?;
    anyhow::ensure!(report["failures"] == 0, "failures: {report}");
    Ok(report["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

/// A TCP connection from `pod` to `to` does not get through (refused, timed out, unreachable).
pub fn wait_tcp_fails(pod: &Pod, to: &str) -> Result<()> {
    wait_for(&format!("{to} failing"), Duration::from_secs(20), || {
        Ok(tcp(pod, to)?.0 != 0)
    })
}

/// On node 0: pod `web0` serving TCP 8080 (answering "web0") and a pod `client`.
pub fn web_and_client(lab: &Lab) -> Result<(Pod, Pod)> {
    let n0 = lab.node(0);
    let web = n0.add_pod("web0")?;
    let client = n0.add_pod("client")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    Ok((web, client))
}

/// Service `web` at `vip` (port `http` 80 → 8080/TCP) and its EndpointSlice with `web` ready
/// on `node`.
pub fn web_manifest(vip: Ipv4Addr, web: &Pod, node: &str) -> String {
    format!(
        "{}---\n{}",
        service("web", vip, &[("http", 80, 8080, "TCP")], "", &[]),
        slice(
            "web",
            "web-1",
            &[ready(web.ip, node)],
            &[("http", 8080, "TCP")]
        )
    )
}
