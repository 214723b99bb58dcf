//! Lab e2e of NetworkPolicy through the real agents and kernel programs, each test named after
//! the upstream case it mirrors (kubernetes/kubernetes test/e2e/network/netpol/network_policy.go)
//! and using its topology: namespaces x, y, z with pods a, b, c each (spread over two nodes),
//! every pod serving ports 80 and 81 over TCP and UDP; the whole reachability matrix is probed
//! from every pod at once and compared with the expected one, as upstream does. Pods are made by
//! the real twill-cni; their Pod objects (labels, IP, named ports), the Namespaces and the
//! policies are written to the manifests directory the agents watch.
mod agent_common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use agent_common::{AgentProc, ready, service, slice, start_agent};
use anyhow::{Result, bail, ensure};
use twill_lab::{Lab, LabSpec, Pod, require};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// How long a policy change may take to show in the matrix (the bound is 1 s p99; the
/// lab machine is shared, so the test allows more before it calls a mismatch a failure).
const CONVERGE: Duration = Duration::from_secs(15);
/// A probe that gets no answer within this time counts as blocked.
const PROBE_TIMEOUT_MS: &str = "800";

/// `namespace/pod`.
type PodName = (&'static str, &'static str);

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
                    lab.serve(&pod, &format!("{ns}/{name}"), Some(port), Some(port))?;
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
            lab,
        };
        cluster.write_objects()?;
        // Before any policy every pod reaches every other on every port.
        cluster.expect(&Reachability::all(true), 80, false)?;
        Ok(Some(cluster))
    }

    /// Writes the Pod and Namespace objects into the manifests directory.
    fn write_objects(&self) -> Result<()> {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": self.objects});
        self.lab
            .apply_manifest("pods.json", &serde_json::to_string_pretty(&list)?)
    }

    /// Sets label `key=value` on the Pod or Namespace object `kind` `ns/name` (`ns` empty for a
    /// Namespace) and writes the objects.
    fn label(&mut self, kind: &str, ns: &str, name: &str, key: &str, value: &str) -> Result<()> {
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
        self.write_objects()
    }

    fn pod(&self, ns: &str, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|((n, p), _)| *n == ns && *p == name)
            .map(|(_, pod)| pod)
            .expect("a pod of the topology")
    }

    /// Writes a NetworkPolicy manifest (`file` names it in the manifests directory).
    fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        self.lab.apply_manifest(file, yaml)
    }

    /// One row of the matrix: from `from` to every pod on `port`.
    fn probe_row(&self, from: &Pod, port: u16, udp: bool) -> Result<BTreeMap<PodName, bool>> {
        let targets: Vec<String> = self
            .pods
            .values()
            .map(|p| format!("{}:{port}", p.ip))
            .collect();
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
                .find(|(_, p)| addr == format!("{}:{port}", p.ip))
                .map(|(k, _)| *k)
                .ok_or_else(|| anyhow::anyhow!("probe of unknown {addr}"))?;
            row.insert(to, result == "ok");
        }
        Ok(row)
    }

    /// The whole matrix, every row probed at once.
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

    /// Waits (bounded) until the probed matrix on `port` equals `want`.
    fn expect(&self, want: &Reachability, port: u16, udp: bool) -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let got = self.probe(port, udp)?;
            if got == *want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "reachability on port {port}/{} after {CONVERGE:?}:\n{}",
                    if udp { "UDP" } else { "TCP" },
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
}

/// Expected (or observed) reachability: `(from, to)` → connected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Reachability {
    cells: BTreeMap<(PodName, PodName), bool>,
}

impl Reachability {
    /// Every pair `value`; a pod always reaches itself (that traffic never leaves its netns).
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

    /// Upstream's truth-table rendering: `.` as expected, `X` a mismatch.
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

/// "should support a 'default-deny-ingress' policy"
#[test]
fn should_support_a_default_deny_ingress_policy() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    c.expect(&want, 80, false)?;
    c.expect(&want, 81, true)?;

    // Visible: the drops by reason, and the verdict explained from the compiled state.
    let drops = c.debug_on_node_of("x", "a", &["drops", "-o", "json"])?;
    let drops: Vec<serde_json::Value> = serde_json::from_str(&drops)?;
    let denied = drops
        .iter()
        .find(|d| d["reason"] == "policy_denied_ingress")
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0);
    ensure!(
        denied > 0,
        "no policy_denied_ingress drops counted: {drops:?}"
    );
    let explain = c.debug_on_node_of("x", "a", &["explain", "--from", "y/b", "--to", "x/a:80"])?;
    ensure!(
        explain.contains("DENIED") && explain.contains("ingress of x/a: denied"),
        "{explain}"
    );
    let shown = c.debug_on_node_of("x", "a", &["policy", "x/a"])?;
    ensure!(
        shown.contains("ingress: isolated by x/deny-ingress")
            && shown.contains("egress: not isolated"),
        "{shown}"
    );
    Ok(())
}

/// "should support 'allow-all' policy"
#[test]
fn should_support_allow_all_policy() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    c.apply(
        "allow.yaml",
        &policy(
            "x",
            "allow-all",
            "  podSelector: {}\n  ingress:\n  - {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 80, false)?;
    c.expect(&Reachability::all(true), 81, true)?;
    // Allowed, and by which rule.
    let explain = c.debug_on_node_of("x", "b", &["explain", "--from", "z/c", "--to", "x/b:81"])?;
    ensure!(
        explain.contains("ALLOWED") && explain.contains("x/allow-all ingress[0]"),
        "{explain}"
    );
    Ok(())
}

/// "should allow ingress access on one named port"
#[test]
fn should_allow_ingress_access_on_one_named_port() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "named.yaml",
        &policy(
            "x",
            "allow-all-81",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n",
        ),
    )?;
    let mut denied_80 = Reachability::all(true);
    denied_80.ingress(("x", "a"), false);
    c.expect(&denied_80, 80, false)?;
    c.expect(&Reachability::all(true), 81, false)?;
    // The name is TCP's: UDP 81 is not allowed.
    c.expect(&denied_80, 81, true)?;
    Ok(())
}

/// "should enforce policy to allow traffic only from a pod in a different namespace based on
/// PodSelector and NamespaceSelector"
#[test]
fn should_enforce_policy_to_allow_traffic_only_from_a_pod_in_a_different_namespace_based_on_pod_selector_and_namespace_selector()
-> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-ns-y-pod-a",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: \
             {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .set(("y", "a"), ("x", "a"), true);
    c.expect(&want, 80, false)?;
    c.expect(&want, 81, true)?;
    Ok(())
}

/// "should deny egress from all pods in a namespace"
#[test]
fn should_deny_egress_from_all_pods_in_a_namespace() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.egress(("x", p), false);
    }
    c.expect(&want, 80, false)?;
    c.expect(&want, 80, true)?;
    let drops = c.debug_on_node_of("x", "a", &["drops"])?;
    ensure!(
        drops
            .lines()
            .any(|l| l.starts_with("policy_denied_egress") && !l.ends_with(" 0")),
        "{drops}"
    );
    Ok(())
}

/// "should enforce updated policy"
#[test]
fn should_enforce_updated_policy() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-all-mutate-to-deny-all",
            "  podSelector: {}\n  ingress:\n  - {}\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 81, false)?;
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-all-mutate-to-deny-all",
            "  podSelector: {}\n  ingress: []\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    c.expect(&want, 81, false)?;
    Ok(())
}

/// "should stop enforcing policies after they are deleted"
#[test]
fn should_stop_enforcing_policies_after_they_are_deleted() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false).egress(("x", p), false);
    }
    c.expect(&want, 80, false)?;
    c.lab.delete_manifest("deny.yaml")?;
    c.expect(&Reachability::all(true), 80, false)?;
    c.expect(&Reachability::all(true), 80, true)?;
    Ok(())
}

/// "should allow ingress access from namespace on one named port"
#[test]
fn should_allow_ingress_access_from_namespace_on_one_named_port() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-client-a-via-ns-selector-80",
            "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        \
             matchExpressions: [{key: ns, operator: In, values: [y, z]}]\n    ports:\n    - \
             port: serve-80-tcp\n",
        ),
    )?;
    let mut want_80 = Reachability::all(true);
    for to in PODS {
        for from in PODS {
            want_80.set(("x", from), ("x", to), false);
        }
    }
    c.expect(&want_80, 80, false)?;
    let mut want_81 = Reachability::all(true);
    for p in PODS {
        want_81.ingress(("x", p), false);
    }
    c.expect(&want_81, 81, false)?;
    Ok(())
}

/// "should enforce except clause while egress access to server in CIDR block"
#[test]
fn should_enforce_except_clause_while_egress_access_to_server_in_cidr_block() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    // As upstream: x/a may reach the /4 around x/b's address, except x/b itself.
    let server = c.pod("x", "b").ip;
    let allow = ipnetwork::Ipv4Network::new(server, 4)?;
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "deny-client-a-via-except-cidr-egress-rule",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  \
                 - to:\n    - ipBlock:\n        cidr: {}/4\n        except: [{server}/32]\n",
                allow.network()
            ),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.set(("x", "a"), ("x", "b"), false);
    c.expect(&want, 80, false)?;
    Ok(())
}

/// "should not allow access by TCP when a policy specifies only UDP"
#[test]
fn should_not_allow_access_by_tcp_when_a_policy_specifies_only_udp() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-only-udp-ingress-on-port-81",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - protocol: UDP\n      \
             port: 81\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    c.expect(&want, 81, false)?;
    c.expect(&Reachability::all(true), 81, true)?;
    Ok(())
}

/// A connection to a ClusterIP is judged as the connection to the backend it reaches: the
/// client's egress against the backend pod (never the virtual IP), the backend's ingress against
/// the real client (kube-router #905, Calico #1683 and #2088 are this confusion).
#[test]
fn should_judge_a_connection_to_a_cluster_ip_by_its_backend_and_real_client() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    let backend = c.pod("x", "b");
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 80);
    c.apply(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("web", vip, &[("http", 80, 80, "TCP")], "", &[]).replace("default", "x"),
            slice(
                "web",
                "web-1",
                &[ready(backend.ip, &backend.node)],
                &[("http", 80, "TCP")]
            )
            .replace("default", "x"),
        ),
    )?;
    // x/a may only talk to x/b (its egress names the pod, not the Service); x/b accepts only
    // y/a.
    c.apply(
        "p.yaml",
        &format!(
            "{}---\n{}",
            policy(
                "x",
                "a-egress-to-b",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - \
                 to:\n    - podSelector: {matchLabels: {pod: b}}\n",
            ),
            policy(
                "x",
                "b-ingress-from-x-a-and-y-a",
                "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from:\n    - \
                 podSelector: {matchLabels: {pod: a}}\n    - namespaceSelector: {matchLabels: \
                 {ns: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
            ),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.egress(("x", "a"), false)
        .ingress(("x", "b"), false)
        .set(("x", "a"), ("x", "b"), true)
        .set(("y", "a"), ("x", "b"), true);
    c.expect(&want, 80, false)?;
    let through_vip = |ns: &str, name: &str| -> Result<bool> {
        let (code, _) = c.pod(ns, name).labtool(&[
            "tcp",
            "--to",
            &format!("{vip}:80"),
            "--timeout-ms",
            PROBE_TIMEOUT_MS,
        ])?;
        Ok(code == 0)
    };
    ensure!(
        through_vip("x", "a")?,
        "x/a's egress to its allowed backend through the ClusterIP"
    );
    ensure!(
        through_vip("y", "a")?,
        "the backend's ingress saw the real client y/a"
    );
    ensure!(
        !through_vip("z", "a")?,
        "z/a is not allowed into the backend, ClusterIP or not"
    );
    // explain resolves the Service to its backend, as the datapath does.
    let explain = c.debug_on_node_of("x", "b", &["explain", "--from", "z/a", "--to", "x/web"])?;
    ensure!(
        explain.contains("via Service x/web")
            && explain.contains(&format!("{}:80  DENIED", backend.ip)),
        "{explain}"
    );
    Ok(())
}

/// "should allow ingress access from updated pod"
#[test]
fn should_allow_ingress_access_from_updated_pod() -> Result<()> {
    let Some(mut c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "p.yaml",
        &policy(
            "x",
            "allow-client-a-via-pod-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: \
             {matchLabels: {pod: b}}\n      namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .set(("y", "b"), ("x", "a"), true);
    c.expect(&want, 80, false)?;
    // z/c becomes pod=b: still not in a namespace labelled ns=y, so nothing changes; then z
    // gets that label and both its pod=b pods are let in.
    c.label("Pod", "z", "c", "pod", "b")?;
    c.expect(&want, 80, false)?;
    c.label("Namespace", "", "z", "ns", "y")?;
    want.set(("z", "b"), ("x", "a"), true)
        .set(("z", "c"), ("x", "a"), true);
    c.expect(&want, 80, false)?;
    Ok(())
}

/// Enforcement lives in the kernel: with the agents stopped the pinned links keep the programs
/// on every pod veth, and restarted agents adopt maps and links without a gap.
#[test]
fn policies_stay_enforced_while_the_agents_restart() -> Result<()> {
    let Some(mut c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    c.expect(&want, 80, false)?;
    for a in &mut c.agents {
        a.stop()?;
    }
    ensure!(
        c.probe(80, false)? == want,
        "enforcement stopped with the agents"
    );
    for a in &mut c.agents {
        a.restart()?;
    }
    ensure!(c.probe(80, false)? == want, "enforcement gap at restart");
    // The restarted agents still follow changes.
    c.lab.delete_manifest("deny.yaml")?;
    c.expect(&Reachability::all(true), 80, false)?;
    Ok(())
}

/// NodePort traffic reaches a backend DNATed: with the backend on the node the client came in
/// through, the backend's ingress judges the real client; through another node (eTP=Cluster) it
/// judges that node's address, which the SNAT put there (the documented behaviour, tested).
#[test]
fn should_judge_nodeport_traffic_by_the_client_or_the_forwarding_node() -> Result<()> {
    let Some(c) = Cluster::with(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let backend = c.pod("x", "b");
    let home = c
        .lab
        .nodes
        .iter()
        .find(|n| n.name == backend.node)
        .expect("the backend's node");
    let other = c
        .lab
        .nodes
        .iter()
        .find(|n| n.name != backend.node)
        .expect("a second node");
    let external = c.lab.external().ip;
    c.apply(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\nspec:\n  \
             type: NodePort\n  clusterIP: 10.96.0.81\n  clusterIPs: [10.96.0.81]\n  ports:\n  - \
             {{name: http, port: 80, targetPort: 80, nodePort: 30081, protocol: TCP}}\n---\n{}",
            slice(
                "web",
                "web-1",
                &[ready(backend.ip, &backend.node)],
                &[("http", 80, "TCP")]
            )
            .replace("default", "x"),
        ),
    )?;
    let from_outside = |node: &twill_lab::Node| -> Result<bool> {
        let (code, _) = c.lab.external().labtool(&[
            "tcp",
            "--to",
            &format!("{}:30081", node.ip),
            "--timeout-ms",
            PROBE_TIMEOUT_MS,
        ])?;
        Ok(code == 0)
    };
    let wait = |what: &str, f: &dyn Fn() -> Result<bool>| -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        while !f()? {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    wait("the NodePort to answer before any policy", &|| {
        Ok(from_outside(home)? && from_outside(other)?)
    })?;
    let allow = |cidrs: &[String]| -> Result<()> {
        let mut blocks = String::new();
        for c in cidrs {
            let _ = writeln!(blocks, "    - ipBlock: {{cidr: {c}}}");
        }
        c.apply(
            "p.yaml",
            &policy(
                "x",
                "b-from-outside",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: b}}}}\n  ingress:\n  - from:\n{blocks}"
                ),
            ),
        )
    };
    allow(&[format!("{external}/32")])?;
    wait("the client through the backend's node only", &|| {
        Ok(from_outside(home)? && !from_outside(other)?)
    })?;
    allow(&[format!("{external}/32"), format!("{}/32", other.ip)])?;
    wait("the forwarding node's address admitted", &|| {
        Ok(from_outside(home)? && from_outside(other)?)
    })?;
    Ok(())
}
