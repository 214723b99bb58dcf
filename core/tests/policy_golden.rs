//! Golden tests of the NetworkPolicy compiler: `tests/policy_golden/<case>.yaml` (multi-document
//! YAML of Pods, Namespaces, NetworkPolicies and one `PolicyTestConfig`) →
//! `tests/policy_golden/<case>.dump`: the rejected policies, the map dump, `debug policy`'s per-pod
//! view when asked for (`podViews: true`), and, for each probed port, the reachability matrix `PolicyState::verdict` answers (rows are
//! clients, columns servers, `.` allowed, `X` denied), as upstream's e2e suite prints it; with
//! IPv6 addresses among the members, a second matrix (`matrix6`) of the IPv6 ones.
//! Regenerate with `TWILL_BLESS=1 cargo test -p twill-core --test policy_golden` and review the
//! diff.
//!
//! Each case also checks that the output does not depend on input order.
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize as _;
use twill_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use twill_core::policy::{
    ParsedPolicy, PolicyIds, PolicyNamespace, PolicyPod, PolicyState, compile, pod_views,
    render_pod_views,
};

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestConfig {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    node_name: String,
    #[serde(default)]
    node_addrs: Vec<IpAddr>,
    /// `PROTO/PORT` pairs to print the matrix for.
    probes: Vec<String>,
    /// Addresses that are no pod (outside the cluster, other nodes), added to the matrix.
    #[serde(default)]
    extra_addrs: Vec<IpAddr>,
    /// Adds upstream's e2e topology: namespaces x, y, z (label `ns`), pods a, b, c in each
    /// (label `pod`) at 10.244.<1..3>.<1..3>, serving 80 and 81 over TCP, UDP and SCTP with
    /// named ports `serve-<port>-<proto>`, on `nodeName` unless their namespace is listed in
    /// `remoteNamespaces` (then on `node-remote`).
    #[serde(default)]
    upstream_topology: bool,
    #[serde(default)]
    remote_namespaces: Vec<String>,
    /// The topology's pods are dual-stack: also `fd00:10:244:<i>::<j>` (listed second, as a
    /// cluster whose primary family is IPv4 lists them).
    #[serde(default)]
    dual_stack: bool,
    /// Also print `debug policy`'s per-pod view.
    #[serde(default)]
    pod_views: bool,
}

/// Upstream's topology (test/e2e/network/netpol/model.go), as Kubernetes objects.
fn upstream_topology(config: &TestConfig) -> (Vec<Pod>, Vec<Namespace>) {
    let (mut pods, mut namespaces) = (Vec::new(), Vec::new());
    for (i, ns) in ["x", "y", "z"].into_iter().enumerate() {
        namespaces.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": ns, "labels": {"ns": ns}},
            }))
            .expect("valid Namespace"),
        );
        let node = if config.remote_namespaces.iter().any(|r| r == ns) {
            "node-remote"
        } else {
            &config.node_name
        };
        for (j, pod) in ["a", "b", "c"].into_iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    ports.push(serde_json::json!({
                        "name": format!("serve-{port}-{}", proto.to_lowercase()),
                        "containerPort": port,
                        "protocol": proto,
                    }));
                }
            }
            let mut ips = vec![serde_json::json!({"ip": format!("10.244.{}.{}", i + 1, j + 1)})];
            if config.dual_stack {
                ips.push(serde_json::json!({"ip": format!("fd00:10:244:{}::{}", i + 1, j + 1)}));
            }
            pods.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                    "spec": {
                        "nodeName": node,
                        "containers": [{"name": "c", "ports": ports}],
                    },
                    "status": {"phase": "Running", "podIPs": ips},
                }))
                .expect("valid Pod"),
            );
        }
    }
    (pods, namespaces)
}

struct Case {
    pods: Vec<PolicyPod>,
    namespaces: Vec<PolicyNamespace>,
    policies: Vec<ParsedPolicy>,
    rejected: Vec<String>,
    config: TestConfig,
}

fn typed<T: serde::de::DeserializeOwned>(path: &Path, value: serde_yaml::Value) -> T {
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut pods, mut namespaces, mut policies, mut rejected) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut config = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        match kind.as_str() {
            "Pod" => pods.push(
                PolicyPod::from_k8s(&typed::<Pod>(path, value))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            ),
            "Namespace" => namespaces.push(
                PolicyNamespace::from_k8s(&typed::<Namespace>(path, value))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            ),
            "NetworkPolicy" => {
                let np: NetworkPolicy = typed(path, value);
                match ParsedPolicy::from_k8s(&np) {
                    Ok(p) => policies.push(p),
                    Err(e) => rejected.push(format!(
                        "rejected {}/{}: {e} ({})",
                        np.metadata.namespace.as_deref().unwrap_or("default"),
                        np.metadata.name.as_deref().unwrap_or("?"),
                        e.kind.metric_label()
                    )),
                }
            }
            "PolicyTestConfig" => config = Some(typed(path, value)),
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        }
    }
    let config: TestConfig =
        config.unwrap_or_else(|| panic!("{}: no PolicyTestConfig", path.display()));
    if config.upstream_topology {
        let (p, n) = upstream_topology(&config);
        pods.extend(
            p.iter()
                .map(|p| PolicyPod::from_k8s(p).expect("valid topology pod")),
        );
        namespaces.extend(
            n.iter()
                .map(|n| PolicyNamespace::from_k8s(n).expect("valid topology namespace")),
        );
    }
    Case {
        pods,
        namespaces,
        policies,
        rejected,
        config,
    }
}

fn run(case: &Case, reverse: bool) -> PolicyState {
    let mut pods: Vec<&PolicyPod> = case.pods.iter().collect();
    let mut namespaces: Vec<&PolicyNamespace> = case.namespaces.iter().collect();
    let mut policies: Vec<&ParsedPolicy> = case.policies.iter().collect();
    if reverse {
        pods.reverse();
        namespaces.reverse();
        policies.reverse();
    }
    compile(
        pods,
        namespaces,
        policies,
        &case.config.node_name,
        &case.config.node_addrs,
        &PolicyIds::default(),
    )
}

fn parse_probe(path: &Path, probe: &str) -> (u8, u16) {
    let (proto, port) = probe
        .split_once('/')
        .unwrap_or_else(|| panic!("{}: probe {probe:?} is not PROTO/PORT", path.display()));
    let proto = match proto {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        other => panic!("{}: unknown probe protocol {other:?}", path.display()),
    };
    let port = port
        .parse()
        .unwrap_or_else(|e| panic!("{}: probe {probe:?}: {e}", path.display()));
    (proto, port)
}

fn render(path: &Path, case: &Case, state: &PolicyState) -> String {
    let mut out = String::new();
    for r in &case.rejected {
        let _ = writeln!(out, "{r}");
    }
    out.push_str(&state.dump());
    let c = state.counts;
    let _ = writeln!(
        out,
        "counts policies={} peer-pods={} endpoints={} identities={} ipblocks={} ip-conflicts={} \
         ipcache={} policy={}",
        c.policies,
        c.peer_pods,
        c.local_endpoints,
        c.identities,
        c.ipblocks,
        c.ip_conflicts,
        state.maps.ipcache.len(),
        state.maps.policy.len()
    );
    if !state.maps.ipcache6.is_empty() {
        let _ = writeln!(out, "counts ipcache6={}", state.maps.ipcache6.len());
    }
    if case.config.pod_views {
        out.push_str(&render_pod_views(&pod_views(&state.maps, state)));
    }
    // Matrix members per family: pods with an address of it (named ns/name), then the extra
    // addresses of it.
    for v6 in [false, true] {
        let mut members: Vec<(String, IpAddr)> = case
            .pods
            .iter()
            .filter_map(|p| {
                let ip = if v6 {
                    p.ip6.map(IpAddr::V6)
                } else {
                    p.ip.map(IpAddr::V4)
                };
                ip.map(|ip| (format!("{}/{}", p.namespace, p.name), ip))
            })
            .collect();
        members.sort();
        members.extend(
            case.config
                .extra_addrs
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| (a.to_string(), *a)),
        );
        if members.is_empty() {
            continue;
        }
        matrices(
            path,
            case,
            state,
            &members,
            if v6 { "matrix6" } else { "matrix" },
            &mut out,
        );
    }
    out
}

/// One matrix per probed port over `members`.
fn matrices(
    path: &Path,
    case: &Case,
    state: &PolicyState,
    members: &[(String, IpAddr)],
    title: &str,
    out: &mut String,
) {
    let width = members.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for probe in &case.config.probes {
        let (proto, port) = parse_probe(path, probe);
        let _ = writeln!(out, "{title} {probe}");
        for (i, (name, _)) in members.iter().enumerate() {
            let _ = writeln!(out, "  {i:>2} {name}");
        }
        let _ = write!(out, "  {:>2} {:width$}", "", "");
        for i in 0..members.len() {
            let _ = write!(out, "{i:>3}");
        }
        out.push('\n');
        for (i, (name, src)) in members.iter().enumerate() {
            let _ = write!(out, "  {i:>2} {name:width$}");
            for (_, dst) in members {
                let v = state.verdict(*src, *dst, proto, port);
                let _ = write!(out, "{:>3}", if v.allowed() { "." } else { "X" });
            }
            out.push('\n');
        }
    }
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/policy_golden exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    cases
}

#[test]
fn golden() {
    let bless = std::env::var_os("TWILL_BLESS").is_some_and(|v| v == "1");
    let cases = cases();
    assert!(
        cases.len() >= 10,
        "expected the golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for path in &cases {
        let case = load(path);
        let state = run(&case, false);
        let got = render(path, &case, &state);
        let reversed = render(path, &case, &run(&case, true));
        assert_eq!(
            got,
            reversed,
            "{}: output depends on input order",
            path.display()
        );

        let want_path = path.with_extension("dump");
        if bless {
            std::fs::write(&want_path, &got).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&want_path) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{}: dump differs (TWILL_BLESS=1 to regenerate)\n--- want\n{want}--- got\n{got}",
                path.display()
            )),
            Err(e) => failures.push(format!(
                "{}: {e} (TWILL_BLESS=1 to create it)",
                want_path.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
