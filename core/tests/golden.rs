//! Golden tests of the compiler: `tests/golden/<case>.yaml` (multi-document YAML of Services,
//! `EndpointSlices`, a Node and an optional `CompileConfig`) → `tests/golden/<case>.dump`, the text
//! `twill-agent debug maps` prints, plus the health-check lines. Regenerate with
//! `TWILL_BLESS=1 cargo test -p twill-core --test golden` and review the diff.
//!
//! Each case also checks that the output does not depend on input order and that applying the
//! compiled state to the fake maps and dumping it back renders the same text.
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize as _;
use twill_core::compile::{
    CompileConfig, Compiled, IdAllocation, Inputs, all_node_ips, all_node_ips6, compile,
    render_dump,
};
use twill_core::lbmap::{FakeLbMaps, LbMaps};
use twill_core::reconcile::Reconciler;

#[derive(Default)]
struct Case {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    node: Option<Node>,
    config: Option<CompileConfig>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestConfig {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    node_name: String,
    #[serde(default)]
    node_port_addresses: Vec<IpAddr>,
    #[serde(default, rename = "nodePortCIDRs")]
    node_port_cidrs: Vec<String>,
    #[serde(default)]
    node_port_range: Option<[u16; 2]>,
    /// Other Nodes' addresses (the case's Node adds its own).
    #[serde(default, rename = "nodeIPs")]
    node_ips: Vec<IpAddr>,
}

fn load(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut case = Case::default();
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
            "Service" => case.services.push(typed(path, value)),
            "EndpointSlice" => case.slices.push(typed(path, value)),
            "Node" => case.node = Some(typed(path, value)),
            "CompileConfig" => {
                let t: TestConfig = typed(path, value);
                let mut c = CompileConfig::new(t.node_name);
                for a in t.node_port_addresses {
                    match a {
                        IpAddr::V4(a) => c.nodeport_addresses.push(a),
                        IpAddr::V6(a) => c.nodeport_addresses6.push(a),
                    }
                }
                for s in &t.node_port_cidrs {
                    match s.parse::<IpNetwork>() {
                        Ok(IpNetwork::V4(n)) => c.nodeport_cidrs.push(n),
                        Ok(IpNetwork::V6(n)) => c.nodeport_cidrs6.push(n),
                        Err(e) => panic!("{}: {s}: {e}", path.display()),
                    }
                }
                if let Some([lo, hi]) = t.node_port_range {
                    c.nodeport_range = lo..=hi;
                }
                for a in t.node_ips {
                    match a {
                        IpAddr::V4(a) => c.node_ips.push(a),
                        IpAddr::V6(a) => c.node_ips6.push(a),
                    }
                }
                c.node_ips.sort_unstable();
                c.node_ips6.sort_unstable();
                case.config = Some(c);
            }
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        }
    }
    case
}

fn typed<T: serde::de::DeserializeOwned>(path: &Path, value: serde_yaml::Value) -> T {
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(case: &Case, config: &CompileConfig, reverse: bool) -> Compiled {
    let mut services: Vec<&Service> = case.services.iter().collect();
    let mut slices: Vec<&EndpointSlice> = case.slices.iter().collect();
    if reverse {
        services.reverse();
        slices.reverse();
    }
    let ids = IdAllocation::default();
    compile(&Inputs {
        services,
        endpoint_slices: slices,
        node: case.node.as_ref(),
        config,
        ids: &ids,
    })
}

fn render(c: &Compiled) -> String {
    let mut out = render_dump(&c.state, &c.model);
    for h in &c.health {
        let _ = writeln!(
            out,
            "health {}/{} nodePort={} localEndpoints={}",
            h.namespace, h.name, h.node_port, h.local_endpoints
        );
    }
    let n = c.counts;
    let _ = writeln!(
        out,
        "counts services={} ports={} frontends={} endpoints={} invalid={}",
        n.services,
        n.service_ports,
        n.frontends,
        n.endpoints,
        c.invalid_count()
    );
    out
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden exists")
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
        cases.len() >= 15,
        "expected the golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for path in &cases {
        let case = load(path);
        let mut config = case
            .config
            .clone()
            .unwrap_or_else(|| CompileConfig::new("node-a"));
        // As the agent does: every Node's addresses, the case's Node among them.
        config.node_ips.extend(all_node_ips(case.node.as_ref()));
        config.node_ips.sort_unstable();
        config.node_ips.dedup();
        config.node_ips6.extend(all_node_ips6(case.node.as_ref()));
        config.node_ips6.sort_unstable();
        config.node_ips6.dedup();
        let compiled = run(&case, &config, false);
        let got = render(&compiled);

        let reversed = render(&run(&case, &config, true));
        assert_eq!(
            got,
            reversed,
            "{}: output depends on input order",
            path.display()
        );

        let mut rec = Reconciler::new(FakeLbMaps::default());
        rec.apply(&compiled.state, true)
            .unwrap_or_else(|e| panic!("{}: apply: {e}", path.display()));
        let from_maps = rec.maps().dump().expect("fake dump");
        assert_eq!(
            from_maps,
            compiled.state,
            "{}: applied maps differ from desired",
            path.display()
        );
        assert_eq!(
            render_dump(&from_maps, &compiled.model),
            render_dump(&compiled.state, &compiled.model)
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
