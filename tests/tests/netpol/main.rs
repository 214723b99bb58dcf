//! Lab e2e of NetworkPolicy through the real agents and kernel programs, on upstream's topology
//! (kubernetes/kubernetes test/e2e/network/netpol): namespaces x, y, z with pods a, b, c each
//! (spread over two nodes), every pod serving ports 80 and 81 over TCP and UDP; the whole
//! reachability matrix is probed from every pod at once and compared with the expected one, as
//! upstream does. Pods are made by the real twill-cni; their Pod objects (labels, IP, named
//! ports), the Namespaces and the policies are written to the manifests directory the agents
//! watch.
//!
//! Every expected matrix is also checked against the independent model of the API
//! (`twill-policy-model`) before it is probed, so a hand-written expectation and the model keep
//! each other honest.
//!
//! - `upstream`: one test per case of upstream's `network_policy.go`, named after it;
//! - `services`: policy through ClusterIP, NodePort and LoadBalancer/External IP frontends;
//! - `random`: random policies (seeded), the datapath against the model (Cyclonus-style);
//! - `restart`: enforcement while the agents restart;
//! - `dualstack`: cases on a dual-stack lab, probed over the pods' IPv6 addresses.
#[path = "../agent_common/mod.rs"]
mod agent_common;
mod dualstack;
mod random;
mod restart;
mod services;
mod upstream;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_common::{AgentProc, start_agent};
use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize as _;
use twill_lab::{Lab, LabSpec, Pod, require};
use twill_policy_model::{ContainerPort, Member, Topology};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// How long a policy change may take to show in the matrix (the bound is 1 s p99; the
/// lab machine is shared, so the test allows more before it calls a mismatch a failure).
const CONVERGE: Duration = Duration::from_secs(15);
/// How long the cluster may take to be fully connected after its agents start (routes between
/// nodes programmed, servers up): on a loaded 2-core machine agents have taken 8–16 s to start.
/// Not a policy change, so not held to [`CONVERGE`].
const STARTUP: Duration = Duration::from_mins(1);
/// A probe that gets no answer within this time counts as blocked.
const PROBE_TIMEOUT_MS: &str = "800";

/// `namespace/pod`.
type PodName = (&'static str, &'static str);

/// The protocol argument of [`Cluster::expect`] (`udp`).
const TCP: bool = false;
const UDP: bool = true;

/// One row of a probe table: the matrix expected on a port over [`TCP`] or [`UDP`].
type Probe<'a> = (&'a Reachability, u16, bool);

/// The manifest [`Cluster::enforcing`] writes its policies to.
const POLICY_FILE: &str = "p.yaml";

/// Named container ports as upstream's agnhost pods declare them.
const NAMED_PORTS: [(&str, u16, &str); 4] = [
    ("serve-80-tcp", 80, "TCP"),
    ("serve-80-udp", 80, "UDP"),
    ("serve-81-tcp", 81, "TCP"),
    ("serve-81-udp", 81, "UDP"),
];

/// The upstream topology on a two-node lab with an agent per node.
struct Cluster {
    pods: BTreeMap<PodName, Pod>,
    agents: Vec<AgentProc>,
    /// The Pod and Namespace objects as written (tests change labels and rewrite them).
    objects: Vec<serde_json::Value>,
    /// The NetworkPolicies of each manifest written, for the model.
    policies: Mutex<BTreeMap<String, Vec<NetworkPolicy>>>,
    /// Probe (and model) the pods' IPv6 addresses (a dual-stack lab's) instead of IPv4.
    probe6: bool,
    lab: Lab,
}

impl Cluster {
    fn new() -> Result<Option<Self>> {
        Self::with(LabSpec::nodes(2))
    }

    /// The topology on a lab of `spec` (two nodes at least).
    fn with(spec: LabSpec) -> Result<Option<Self>> {
        let Some(lab) = require(spec)? else {
            return Ok(None);
        };
        let mut pods = BTreeMap::new();
        let mut objects = Vec::new();
        let mut i = 0;
        for ns in NAMESPACES {
            objects.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ns": ns}},
            }));
            for name in PODS {
                // Alternate nodes so that every policy is exercised both within a node and
                // across the overlay.
                let node = lab.node(i % 2);
                i += 1;
                let pod = node.add_pod(&format!("{ns}{name}"))?;
                for port in [80, 81] {
                    let name = format!("{ns}/{name}");
                    if pod.ip6.is_some() {
                        lab.serve_dual(&pod, &name, Some(port), Some(port))?;
                    } else {
                        lab.serve(&pod, &name, Some(port), Some(port))?;
                    }
                }
                objects.push(pod.pod_object(ns, name, &[("pod", name)], &NAMED_PORTS));
                pods.insert((ns, name), pod);
            }
        }
        let agents = (0..2)
            .map(|n| start_agent(&lab, n, &[]))
            .collect::<Result<Vec<_>>>()?;
        let cluster = Self {
            pods,
            agents,
            objects,
            policies: Mutex::default(),
            probe6: false,
            lab,
        };
        cluster.write_objects()?;
        // Before any policy every pod reaches every other on every port.
        cluster.expect_within(&Reachability::all(true), 80, false, STARTUP)?;
        Ok(Some(cluster))
    }

    /// The topology on a dual-stack lab (every pod also has an IPv6 address, in its Pod
    /// object's `podIPs`), probed over IPv6.
    fn dual_stack() -> Result<Option<Self>> {
        Ok(
            Self::with(LabSpec::nodes(2).with_dual_stack())?.map(|mut c| {
                c.probe6 = true;
                c
            }),
        )
    }

    /// `pod`'s address on `port` in the probed family.
    fn target(&self, pod: &Pod, port: u16) -> String {
        match pod.ip6 {
            Some(ip6) if self.probe6 => format!("[{ip6}]:{port}"),
            _ => format!("{}:{port}", pod.ip),
        }
    }

    /// Most of upstream's cases: the topology, the policies of `yaml` written (as
    /// [`POLICY_FILE`]), then every row of `probes` expected in order. `None` where the lab
    /// cannot run (see [`require`]).
    fn enforcing(yaml: &str, probes: &[Probe<'_>]) -> Result<Option<Self>> {
        let Some(cluster) = Self::new()? else {
            return Ok(None);
        };
        cluster.apply(POLICY_FILE, yaml)?;
        cluster.expect_each(probes)?;
        Ok(Some(cluster))
    }

    /// [`Cluster::expect`] for every row of `probes`, in order.
    fn expect_each(&self, probes: &[Probe<'_>]) -> Result<()> {
        for (want, port, udp) in probes {
            self.expect(want, *port, *udp)?;
        }
        Ok(())
    }

    /// Writes the Pod and Namespace objects into the manifests directory.
    fn write_objects(&self) -> Result<()> {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": self.objects});
        self.lab
            .apply_manifest("pods.json", &serde_json::to_string_pretty(&list)?)
    }

    /// Sets label `key=value` on the Pod or Namespace object `kind` `ns/name` (`ns` empty for a
    /// Namespace) without writing the objects.
    fn set_label(
        &mut self,
        kind: &str,
        ns: &str,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<()> {
        let obj = self
            .objects
            .iter_mut()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == name
                    && (ns.is_empty() || o["metadata"]["namespace"] == ns)
            })
            .ok_or_else(|| anyhow::anyhow!("no {kind} {ns}/{name}"))?;
        obj["metadata"]["labels"][key] = value.into();
        Ok(())
    }

    /// Sets label `key=value` on the Pod or Namespace object `kind` `ns/name` (`ns` empty for a
    /// Namespace) and writes the objects.
    fn label(&mut self, kind: &str, ns: &str, name: &str, key: &str, value: &str) -> Result<()> {
        self.set_label(kind, ns, name, key, value)?;
        self.write_objects()
    }

    fn pod(&self, ns: &str, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|((n, p), _)| *n == ns && *p == name)
            .map(|(_, pod)| pod)
            .expect("a pod of the topology")
    }

    /// Writes a manifest (`file` names it in the manifests directory); its NetworkPolicies
    /// replace those the model had for `file`.
    fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let mut policies = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(doc)?;
            let items = match value.get("kind").and_then(serde_yaml::Value::as_str) {
                Some("List") => value
                    .get("items")
                    .and_then(serde_yaml::Value::as_sequence)
                    .cloned()
                    .unwrap_or_default(),
                _ => vec![value],
            };
            for item in items {
                if item.get("kind").and_then(serde_yaml::Value::as_str) == Some("NetworkPolicy") {
                    policies.push(serde_yaml::from_value(item)?);
                }
            }
        }
        self.lab.apply_manifest(file, yaml)?;
        self.policies
            .lock()
            .expect("not poisoned")
            .insert(file.to_owned(), policies);
        Ok(())
    }

    /// Removes manifest `file`.
    fn delete(&self, file: &str) -> Result<()> {
        self.lab.delete_manifest(file)?;
        self.policies.lock().expect("not poisoned").remove(file);
        Ok(())
    }

    /// Every NetworkPolicy written.
    fn all_policies(&self) -> Vec<NetworkPolicy> {
        self.policies
            .lock()
            .expect("not poisoned")
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// The topology as the model sees it: the objects as written, the pods' addresses.
    fn topology(&self) -> Topology {
        let labels = |o: &serde_json::Value| -> BTreeMap<String, String> {
            o["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        };
        let mut topo = Topology::default();
        for o in &self.objects {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            if o["kind"] == "Namespace" {
                topo.namespaces.push(twill_policy_model::Namespace {
                    name: name.to_owned(),
                    labels: labels(o),
                });
                continue;
            }
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            topo.pods.push(twill_policy_model::Pod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                ip: self.pod(ns, name).ip,
                ip6: self.pod(ns, name).ip6,
                labels: labels(o),
                ports: NAMED_PORTS
                    .iter()
                    .map(|(name, port, proto)| ContainerPort {
                        name: (*name).to_owned(),
                        protocol: (*proto).to_owned(),
                        port: *port,
                    })
                    .collect(),
            });
        }
        topo
    }

    /// The matrix the model expects for the policies written.
    fn model(&self, port: u16, udp: bool) -> Reachability {
        let topo = self.topology();
        let policies = self.all_policies();
        let proto = if udp { "UDP" } else { "TCP" };
        let mut m = Reachability::default();
        for from in all_pods() {
            for to in all_pods() {
                let client = topo.pod(from.0, from.1).expect("a pod of the topology");
                let server = topo.pod(to.0, to.1).expect("a pod of the topology");
                let member = if self.probe6 {
                    Member::pod6
                } else {
                    Member::pod
                };
                let allowed = topo.allows(&policies, member(client), member(server), proto, port);
                m.set(from, to, allowed);
            }
        }
        m
    }

    /// One row of the matrix: from `from` to every pod on `port`.
    fn probe_row(&self, from: &Pod, port: u16, udp: bool) -> Result<BTreeMap<PodName, bool>> {
        let targets: Vec<String> = self.pods.values().map(|p| self.target(p, port)).collect();
        let targets = targets.join(",");
        let mut args = vec!["probe", "--to", &targets, "--timeout-ms", PROBE_TIMEOUT_MS];
        if udp {
            args.push("--udp");
        }
        let (code, out) = from.labtool(&args)?;
        ensure!(code == 0, "labtool probe failed: {out}");
        let mut row = BTreeMap::new();
        for line in out.lines() {
            let (addr, result) = line
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("probe output {line:?}"))?;
            let to = self
                .pods
                .iter()
                .find(|(_, p)| addr == self.target(p, port))
                .map(|(k, _)| *k)
                .ok_or_else(|| anyhow::anyhow!("probe of unknown {addr}"))?;
            row.insert(to, result == "ok");
        }
        Ok(row)
    }

    /// The whole matrix: every row at once (9 probing processes, each probing its 9 targets
    /// in parallel), as upstream probes.
    fn probe(&self, port: u16, udp: bool) -> Result<Reachability> {
        let rows: Vec<(PodName, Result<BTreeMap<PodName, bool>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|(k, pod)| (*k, s.spawn(move || self.probe_row(pod, port, udp))))
                .collect();
            handles
                .into_iter()
                .map(|(k, h)| {
                    (
                        k,
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked"))),
                    )
                })
                .collect()
        });
        let mut m = Reachability::default();
        for (from, row) in rows {
            for (to, ok) in row? {
                m.cells.insert((from, to), ok);
            }
        }
        Ok(m)
    }

    /// Checks `want` against the model, then waits (bounded by [`CONVERGE`]) until the probed
    /// matrix on `port` equals it.
    fn expect(&self, want: &Reachability, port: u16, udp: bool) -> Result<()> {
        self.expect_within(want, port, udp, CONVERGE)
    }

    /// [`Cluster::expect`] waiting at most `limit`.
    fn expect_within(
        &self,
        want: &Reachability,
        port: u16,
        udp: bool,
        limit: Duration,
    ) -> Result<()> {
        let proto = if udp { "UDP" } else { "TCP" };
        let model = self.model(port, udp);
        ensure!(
            model == *want,
            "the test's expectation on port {port}/{proto} disagrees with the model of the API \
             (expected / model):\n{}",
            want.diff(&model)
        );
        let deadline = Instant::now() + limit;
        loop {
            let got = self.probe(port, udp)?;
            if got == *want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "reachability on port {port}/{proto} after {limit:?}:\n{}",
                    want.diff(&got)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `twill-agent debug ARGS` on the node of pod `ns/name`.
    fn debug_on_node_of(&self, ns: &str, name: &str, args: &[&str]) -> Result<String> {
        let node = &self.pod(ns, name).node;
        let node = self
            .lab
            .nodes
            .iter()
            .find(|n| &n.name == node)
            .expect("the pod's node");
        node.debug(args)
    }

    /// Waits (bounded) until every agent compiled as many policies as were written (its
    /// `twill_network_policies` gauge) and has each of its pods selected by the policies the
    /// model says select it (`debug policy -o json`): the policies written are the ones being
    /// enforced, not their predecessors.
    fn wait_compiled(&self) -> Result<()> {
        let topo = self.topology();
        let policies = self.all_policies();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let mut pending = Vec::new();
            for node in &self.lab.nodes {
                let (code, metrics) =
                    node.labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
                ensure!(code == 0, "GET /metrics on {}: {metrics}", node.name);
                let compiled = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("twill_network_policies "))
                    .and_then(|v| v.trim().parse::<f64>().ok());
                if compiled != Some(f64::from(u32::try_from(policies.len())?)) {
                    pending.push(format!(
                        "{}: {compiled:?} policies compiled, {} written",
                        node.name,
                        policies.len()
                    ));
                }
                let views: Vec<serde_json::Value> =
                    serde_json::from_str(&node.debug(&["policy", "-o", "json"])?)
                        .context("debug policy -o json")?;
                let names = |v: &serde_json::Value| -> Vec<String> {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                };
                for ((ns, name), pod) in &self.pods {
                    if pod.node != node.name {
                        continue;
                    }
                    let want = topo.selecting(&policies, topo.pod(ns, name).expect("a pod"));
                    let got = views
                        .iter()
                        .find(|v| v["namespace"] == *ns && v["name"] == *name)
                        .map_or_else(Default::default, |v| {
                            (names(&v["ingress_policies"]), names(&v["egress_policies"]))
                        });
                    if got != want {
                        pending.push(format!("{ns}/{name}: {got:?}, want {want:?}"));
                    }
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agents' compiled policies after {CONVERGE:?}:\n{}",
                    pending.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Expected (or observed) reachability: `(from, to)` → connected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Reachability {
    cells: BTreeMap<(PodName, PodName), bool>,
}

/// A pod pattern as upstream's `Peer`: `*` every pod, `x` the pods of namespace x, `x/a` one
/// pod, `*/a` pod a of every namespace.
fn pattern_matches(pattern: &str, (ns, pod): PodName) -> bool {
    match pattern.split_once('/') {
        None => pattern == "*" || pattern == ns,
        Some((want_ns, want_pod)) => (want_ns == "*" || want_ns == ns) && want_pod == pod,
    }
}

impl Reachability {
    /// Every pair `value`; a pod always reaches itself (that traffic never leaves its netns;
    /// upstream ignores loopback too).
    fn all(value: bool) -> Self {
        let mut m = Self::default();
        for from in all_pods() {
            for to in all_pods() {
                m.cells.insert((from, to), value || from == to);
            }
        }
        m
    }

    fn set(&mut self, from: PodName, to: PodName, value: bool) -> &mut Self {
        self.cells.insert((from, to), value || from == to);
        self
    }

    /// Every pod matching pattern `from` → every pod matching `to` (upstream's `ExpectPeer`).
    fn peer(&mut self, from: &str, to: &str, value: bool) -> &mut Self {
        for f in all_pods().filter(|p| pattern_matches(from, *p)) {
            for t in all_pods().filter(|p| pattern_matches(to, *p)) {
                self.set(f, t, value);
            }
        }
        self
    }

    /// Every pod → `to`.
    fn ingress(&mut self, to: PodName, value: bool) -> &mut Self {
        for from in all_pods() {
            self.set(from, to, value);
        }
        self
    }

    /// `from` → every pod.
    fn egress(&mut self, from: PodName, value: bool) -> &mut Self {
        for to in all_pods() {
            self.set(from, to, value);
        }
        self
    }

    /// Upstream's truth-table rendering: the value where both agree, `X<this>/<other>` where
    /// they differ.
    fn diff(&self, got: &Reachability) -> String {
        let name = |(ns, p): PodName| format!("{ns}/{p}");
        let mut out = String::from("expected (1 = connected) / observed, rows = from\n      ");
        for to in all_pods() {
            let _ = write!(out, "{:>5}", name(to));
        }
        out.push('\n');
        for from in all_pods() {
            let _ = write!(out, "{:>5} ", name(from));
            for to in all_pods() {
                let w = self.cells.get(&(from, to)).copied().unwrap_or(false);
                let g = got.cells.get(&(from, to)).copied().unwrap_or(false);
                let cell = if w == g {
                    format!("{}", u8::from(w))
                } else {
                    format!("X{}/{}", u8::from(w), u8::from(g))
                };
                let _ = write!(out, "{cell:>5}");
            }
            out.push('\n');
        }
        out
    }
}

fn all_pods() -> impl Iterator<Item = PodName> {
    NAMESPACES
        .into_iter()
        .flat_map(|ns| PODS.into_iter().map(move |p| (ns, p)))
}

/// A NetworkPolicy manifest; `spec` is the YAML of its spec, indented by two spaces.
fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\nspec:\n{spec}"
    )
}

/// The default-deny-ingress matrix of upstream: nothing reaches namespace x.
fn deny_into_x() -> Reachability {
    let mut want = Reachability::all(true);
    want.peer("*", "x", false);
    want
}
