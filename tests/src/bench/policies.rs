//! The NetworkPolicy benchmark's world: namespaces, pods and policies at the issue's scale, as
//! Kubernetes objects for Twill's `--manifests` source and as the nftables rule set the
//! kube-network-policies peer is compared with. Pure generation, no I/O, unit-tested; the same
//! text is what the lab loads.
//!
//! ```text
//!  pb-000 .. pb-099   100 namespaces (pb-000 role=monitoring), filler pods 10 apps each,
//!                     spread over 91 nodes (1 in 91 on the bench node)
//!  pb-bench           client (app=client), server (app=server), other (app=other): the lab's
//!                     real pods; default-deny (Ingress+Egress) and one allow policy
//!                     (client → server, TCP 8080 + the variant's marker port, both directions)
//!  fill-<j>           filler policies: app-a in pb-(j mod 100) from app-(a+1) on 8080 and from
//!                     the monitoring namespace on 9090
//! ```
//!
//! **The peer, kube-network-policies** (kubernetes-sigs, `pkg/dataplane/controller.go`): one
//! `inet` table whose `postrouting` chain (filter, priority srcnat − 5) accepts
//! `ct label <accept> ct state established,related`, and queues (`queue flags bypass to 100`)
//! every other packet from or to a pod some policy selects (set `podips-v4`) to its userspace
//! process, which evaluates the policies selecting the source (egress) and the destination
//! (ingress) and answers accept with the conntrack label set, or drop. This kernel has no
//! `nft_queue` (`CONFIG_NFT_QUEUE` unset), so [`knp_nft`] keeps that table rule for rule and puts
//! in place of the `queue` verdict the same decision rendered in nftables: a verdict map from
//! pod address to a chain per managed pod holding the rules of the policies that select it
//! (`return` on an allowing rule, `drop` at the end), then `ct label set` and accept. Established
//! traffic takes exactly knp's path; a new connection is judged in the kernel instead of a
//! round trip to userspace, so this peer is an upper bound of what knp itself achieves.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use serde_json::{Value, json};

/// Namespaces of filler pods and policies.
pub const NAMESPACES: usize = 100;
/// Apps (label `app`) per namespace.
pub const APPS: usize = 10;
/// Filler pods are spread over this many nodes; one in this many is on the bench node.
pub const NODES: usize = 91;
/// The bench pods' namespace.
pub const BENCH_NS: &str = "pb-bench";
/// The port the load goes to (the bench servers' port).
pub const SERVE_PORT: u16 = 8080;
/// A port no policy ever allows: refused (reset) without policies, dropped with the bench's
/// default deny.
pub const DENIED_PORT: u16 = 9999;
/// Ports a probe sees allowed (refused: nothing listens) once a change is enforced.
pub const MARKER_BASE: u16 = 9100;
/// Ports the enforcement-latency changes open, one per change.
pub const CHANGE_BASE: u16 = 9300;
/// The conntrack label bit kube-network-policies sets on accepted connections (its default
/// `--ct-label-accept`).
pub const KNP_CT_LABEL: u32 = 100;

/// A filler pod's address: 10.100.0.0/16 upwards, outside every lab range.
pub fn filler_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + n)
}

/// The bench namespace's three real pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchPods {
    pub client: Ipv4Addr,
    pub server: Ipv4Addr,
    pub other: Ipv4Addr,
}

/// A pod of the world.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WorldPod {
    ns: String,
    name: String,
    app: String,
    ip: Ipv4Addr,
    /// On the bench node (the only node whose policies are enforced in the bench).
    local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// Pods of the policy's namespace with this `app`.
    App(String),
    /// Every pod of the namespaces with this `role`.
    NamespaceRole(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    peer: Peer,
    ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Policy {
    ns: String,
    name: String,
    /// `None`: every pod of the namespace (`podSelector: {}`).
    app: Option<String>,
    /// `None`: the direction is not in policyTypes.
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

/// Which policies are in force: none at all, or the bench's default deny + allow with
/// `fillers` more.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Variant {
    NoPolicy,
    /// Only the bench namespace's default deny (the state a from-scratch timing starts from).
    DenyOnly,
    /// Default deny + the allow policy + this many filler policies; `marker` is the extra port
    /// the allow policy opens, `extra` further ports (enforcement-latency changes).
    Policies {
        fillers: usize,
        marker: u16,
        extra: Option<u16>,
    },
}

/// The pods and namespaces of one benchmark world.
#[derive(Clone, Debug)]
pub struct World {
    pods: Vec<WorldPod>,
    node: String,
}

impl World {
    /// `filler_pods` pods over [`NAMESPACES`] namespaces plus the bench pods, on `node`.
    pub fn new(filler_pods: usize, bench: BenchPods, node: &str) -> Self {
        let mut pods: Vec<WorldPod> = (0..filler_pods)
            .map(|i| WorldPod {
                ns: filler_ns(i % NAMESPACES),
                name: format!("p-{i}"),
                app: format!("app-{}", (i / NAMESPACES) % APPS),
                ip: filler_ip(i),
                local: i % NODES == 0,
            })
            .collect();
        for (name, ip) in [
            ("client", bench.client),
            ("server", bench.server),
            ("other", bench.other),
        ] {
            pods.push(WorldPod {
                ns: BENCH_NS.into(),
                name: name.into(),
                app: name.into(),
                ip,
                local: true,
            });
        }
        Self {
            pods,
            node: node.into(),
        }
    }

    /// Pods (filler and bench) the world holds.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Namespaces and Pods as a JSON `List` for the manifests directory.
    pub fn objects_json(&self) -> String {
        let mut items: Vec<Value> = (0..NAMESPACES)
            .map(|n| {
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                    "name": filler_ns(n),
                    "labels": {"role": if n == 0 { "monitoring" } else { "app" }, "team": format!("t{}", n % 7)},
                }})
            })
            .collect();
        items
            .push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": BENCH_NS}}));
        for (i, p) in self.pods.iter().enumerate() {
            let node = if p.local {
                self.node.clone()
            } else {
                format!("far-{}", i % NODES)
            };
            items.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.ns, "labels": {"app": p.app}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}]}]},
                "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]},
            }));
        }
        list(&items)
    }

    /// The NetworkPolicies of `variant` as a JSON `List` (an empty list for no policy).
    pub fn policies_json(variant: Variant) -> String {
        list(
            &policies(variant)
                .iter()
                .map(policy_object)
                .collect::<Vec<_>>(),
        )
    }

    /// The kube-network-policies table for `variant` (see the module doc): `nft -f` input that
    /// replaces the table as a whole, as knp's own sync does (add + delete + add).
    pub fn knp_nft(&self, variant: Variant) -> String {
        let policies = policies(variant);
        let mut by_app: BTreeMap<(&str, &str), Vec<Ipv4Addr>> = BTreeMap::new();
        let mut by_ns: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
        for p in &self.pods {
            by_app.entry((&p.ns, &p.app)).or_default().push(p.ip);
            by_ns.entry(&p.ns).or_default().push(p.ip);
        }
        // Namespaces by role: pb-000 is the monitoring namespace.
        let role_ns = |role: &str| -> Vec<String> {
            (0..NAMESPACES)
                .filter(|n| (*n == 0) == (role == "monitoring"))
                .map(filler_ns)
                .collect()
        };
        let mut sets = String::new();
        let mut chains = String::new();
        let mut managed: Vec<Ipv4Addr> = Vec::new();
        let (mut ingress_map, mut egress_map) = (Vec::new(), Vec::new());
        let mut set_names: BTreeMap<(usize, &str, usize), String> = BTreeMap::new();
        for (k, pod) in self.pods.iter().enumerate().filter(|(_, p)| p.local) {
            let selecting: Vec<(usize, &Policy)> = policies
                .iter()
                .enumerate()
                .filter(|(_, pol)| {
                    pol.ns == pod.ns && pol.app.as_ref().is_none_or(|a| *a == pod.app)
                })
                .collect();
            if selecting.is_empty() {
                continue;
            }
            managed.push(pod.ip);
            for (dir, addr_field, map) in [
                ("ingress", "saddr", &mut ingress_map),
                ("egress", "daddr", &mut egress_map),
            ] {
                let rules: Vec<(usize, usize, &Rule)> = selecting
                    .iter()
                    .filter_map(|(j, pol)| {
                        let rules = if dir == "ingress" {
                            pol.ingress.as_ref()
                        } else {
                            pol.egress.as_ref()
                        }?;
                        Some(rules.iter().enumerate().map(move |(r, rule)| (*j, r, rule)))
                    })
                    .flatten()
                    .collect();
                let isolated = selecting.iter().any(|(_, pol)| {
                    if dir == "ingress" {
                        pol.ingress.is_some()
                    } else {
                        pol.egress.is_some()
                    }
                });
                if !isolated {
                    continue;
                }
                let chain = format!("{dir}-{k}");
                let _ = writeln!(chains, "  chain {chain} {{");
                for (j, r, rule) in rules {
                    let key = (j, dir, r);
                    let set = if let Some(s) = set_names.get(&key) {
                        s.clone()
                    } else {
                        let name = format!("pol-{j}-{dir}-{r}");
                        let pol = &policies[j];
                        let ips: Vec<Ipv4Addr> = match &rule.peer {
                            Peer::App(app) => by_app
                                .get(&(pol.ns.as_str(), app.as_str()))
                                .cloned()
                                .unwrap_or_default(),
                            Peer::NamespaceRole(role) => role_ns(role)
                                .iter()
                                .flat_map(|ns| by_ns.get(ns.as_str()).cloned().unwrap_or_default())
                                .collect(),
                        };
                        write_set(&mut sets, &name, &ips);
                        set_names.insert(key, name.clone());
                        name
                    };
                    let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
                    let _ = writeln!(
                        chains,
                        "    ip {addr_field} @{set} tcp dport {{ {} }} return",
                        ports.join(", ")
                    );
                }
                let _ = writeln!(chains, "    drop\n  }}");
                map.push(format!("{} : jump {chain}", pod.ip));
            }
        }
        knp_table(&managed, &ingress_map, &egress_map, &sets, &chains)
    }
}

/// The whole table around the per-pod chains: knp's `postrouting` chain rule for rule, with the
/// jump to the in-kernel verdict where knp queues.
fn knp_table(
    managed: &[Ipv4Addr],
    ingress_map: &[String],
    egress_map: &[String],
    sets: &str,
    chains: &str,
) -> String {
    let mut out = String::with_capacity(sets.len() + chains.len() + 2048);
    let _ = writeln!(
        out,
        "add table inet kube-network-policies\ndelete table inet kube-network-policies\ntable inet kube-network-policies {{"
    );
    write_set(&mut out, "podips-v4", managed);
    out.push_str(sets);
    for (name, elems) in [("ingress-pods", ingress_map), ("egress-pods", egress_map)] {
        let _ = writeln!(out, "  map {name} {{\n    type ipv4_addr : verdict");
        if !elems.is_empty() {
            let _ = writeln!(out, "    elements = {{ {} }}", elems.join(", "));
        }
        out.push_str("  }\n");
    }
    out.push_str(chains);
    let _ = write!(
        out,
        "  # knp queues to userspace here; this kernel has no nft_queue: the same decision in nftables.
  chain evaluate {{
    ip saddr vmap @egress-pods
    ip daddr vmap @ingress-pods
    ct label set {KNP_CT_LABEL} accept
  }}
  chain postrouting {{
    type filter hook postrouting priority srcnat - 5; policy accept;
    meta l4proto ipv6-icmp icmpv6 type nd-router-solicit accept
    meta l4proto ipv6-icmp icmpv6 type nd-router-advert accept
    meta l4proto ipv6-icmp icmpv6 type nd-neighbor-solicit accept
    meta l4proto ipv6-icmp icmpv6 type nd-neighbor-advert accept
    meta l4proto ipv6-icmp icmpv6 type nd-redirect accept
    meta skuid 0 counter accept
    ct label {KNP_CT_LABEL} ct state established,related counter accept
    ip saddr @podips-v4 jump evaluate
    ip daddr @podips-v4 jump evaluate
    ct label set {KNP_CT_LABEL}
  }}
}}
"
    );
    out
}

/// Removes the peer's table (`nft -f` input; fine when it is absent).
pub fn knp_delete() -> String {
    "add table inet kube-network-policies\ndelete table inet kube-network-policies\n".into()
}

fn filler_ns(n: usize) -> String {
    format!("pb-{n:03}")
}

fn list(items: &[Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

fn write_set(out: &mut String, name: &str, ips: &[Ipv4Addr]) {
    let _ = writeln!(out, "  set {name} {{\n    type ipv4_addr");
    if !ips.is_empty() {
        let mut v: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
        v.sort();
        v.dedup();
        let _ = writeln!(out, "    elements = {{ {} }}", v.join(", "));
    }
    out.push_str("  }\n");
}

fn policies(variant: Variant) -> Vec<Policy> {
    let deny = Policy {
        ns: BENCH_NS.into(),
        name: "default-deny".into(),
        app: None,
        ingress: Some(Vec::new()),
        egress: Some(Vec::new()),
    };
    match variant {
        Variant::NoPolicy => Vec::new(),
        Variant::DenyOnly => vec![deny],
        Variant::Policies {
            fillers,
            marker,
            extra,
        } => {
            let mut ports = vec![SERVE_PORT, marker];
            ports.extend(extra);
            let mut out = vec![
                deny,
                Policy {
                    ns: BENCH_NS.into(),
                    name: "allow-client-server".into(),
                    app: None,
                    ingress: Some(vec![Rule {
                        peer: Peer::App("client".into()),
                        ports: ports.clone(),
                    }]),
                    egress: Some(vec![Rule {
                        peer: Peer::App("server".into()),
                        ports,
                    }]),
                },
            ];
            out.extend((0..fillers).map(|j| {
                let a = (j / NAMESPACES) % APPS;
                Policy {
                    ns: filler_ns(j % NAMESPACES),
                    name: format!("fill-{j}"),
                    app: Some(format!("app-{a}")),
                    ingress: Some(vec![
                        Rule {
                            peer: Peer::App(format!("app-{}", (a + 1) % APPS)),
                            ports: vec![SERVE_PORT],
                        },
                        Rule {
                            peer: Peer::NamespaceRole("monitoring".into()),
                            ports: vec![9090],
                        },
                    ]),
                    egress: None,
                }
            }));
            out
        }
    }
}

fn policy_object(p: &Policy) -> Value {
    let rules = |rules: &[Rule], key: &str| -> Vec<Value> {
        rules
            .iter()
            .map(|r| {
                let peer = match &r.peer {
                    Peer::App(app) => json!({"podSelector": {"matchLabels": {"app": app}}}),
                    Peer::NamespaceRole(role) => {
                        json!({"namespaceSelector": {"matchLabels": {"role": role}}})
                    }
                };
                let ports: Vec<Value> = r
                    .ports
                    .iter()
                    .map(|p| json!({"protocol": "TCP", "port": p}))
                    .collect();
                json!({key: [peer], "ports": ports})
            })
            .collect()
    };
    let mut types = Vec::new();
    let mut spec = json!({
        "podSelector": p.app.as_ref().map_or_else(|| json!({}), |a| json!({"matchLabels": {"app": a}})),
    });
    if let Some(r) = &p.ingress {
        types.push("Ingress");
        spec["ingress"] = json!(rules(r, "from"));
    }
    if let Some(r) = &p.egress {
        types.push("Egress");
        spec["egress"] = json!(rules(r, "to"));
    }
    spec["policyTypes"] = json!(types);
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": p.name, "namespace": p.ns},
        "spec": spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench() -> BenchPods {
        BenchPods {
            client: Ipv4Addr::new(10, 244, 3, 2),
            server: Ipv4Addr::new(10, 244, 3, 3),
            other: Ipv4Addr::new(10, 244, 3, 4),
        }
    }

    fn variant(fillers: usize) -> Variant {
        Variant::Policies {
            fillers,
            marker: MARKER_BASE,
            extra: None,
        }
    }

    #[test]
    fn objects_hold_every_pod_and_namespace_once() {
        let w = World::new(1_000, bench(), "n3");
        let v: Value = serde_json::from_str(&w.objects_json()).expect("json");
        let items = v["items"].as_array().expect("items");
        let pods: Vec<&Value> = items.iter().filter(|i| i["kind"] == "Pod").collect();
        assert_eq!(pods.len(), 1_003);
        assert_eq!(items.len() - pods.len(), NAMESPACES + 1);
        let local = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "n3")
            .count();
        // Fillers 0, 91, ..., 910 and the three bench pods.
        assert_eq!(local, 11 + 3);
        let mut ips: Vec<&str> = pods
            .iter()
            .map(|p| p["status"]["podIP"].as_str().expect("ip"))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        assert_eq!(ips.len(), 1_003, "addresses are unique");
    }

    #[test]
    fn policies_are_deny_allow_and_the_fillers() {
        let v: Value = serde_json::from_str(&World::policies_json(variant(100))).expect("json");
        let items = v["items"].as_array().expect("items");
        assert_eq!(items.len(), 102);
        assert_eq!(
            items[0]["spec"]["policyTypes"],
            json!(["Ingress", "Egress"])
        );
        assert!(
            items[0]["spec"]
                .get("ingress")
                .expect("ingress")
                .as_array()
                .expect("list")
                .is_empty()
        );
        let allow = &items[1]["spec"];
        assert_eq!(allow["ingress"][0]["ports"][1]["port"], json!(MARKER_BASE));
        assert_eq!(
            allow["egress"][0]["to"][0]["podSelector"]["matchLabels"]["app"],
            "server"
        );
        assert_eq!(items[101]["metadata"]["name"], "fill-99");
        assert_eq!(items[101]["spec"]["policyTypes"], json!(["Ingress"]));
        let none: Value =
            serde_json::from_str(&World::policies_json(Variant::NoPolicy)).expect("json");
        assert!(none["items"].as_array().expect("items").is_empty());
    }

    #[test]
    fn knp_table_judges_only_selected_local_pods() {
        let w = World::new(1_000, bench(), "n3");
        let nft = w.knp_nft(variant(1_000));
        // The bench pods and every local filler pod some filler selects (all of them at 1,000
        // policies: each (namespace, app) pair has one).
        let podips = nft
            .split("set podips-v4")
            .nth(1)
            .and_then(|s| s.split('}').next())
            .expect("podips set");
        assert!(podips.contains("10.244.3.2") && podips.contains("10.100.0.1,"));
        assert!(!podips.contains("10.100.0.2,"), "not local: {podips}");
        assert!(nft.contains("10.244.3.2 : jump egress-"));
        assert!(nft.contains("10.244.3.3 : jump ingress-"));
        assert!(nft.contains("ip saddr @pol-1-ingress-0 tcp dport { 8080, 9100 } return"));
        assert!(nft.contains("ct label 100 ct state established,related counter accept"));
        assert!(nft.starts_with("add table inet kube-network-policies\ndelete table"));
        // Without policies the table is still there, with nothing to judge.
        let empty = w.knp_nft(Variant::NoPolicy);
        assert!(!empty.contains("jump ingress-") && empty.contains("chain postrouting"));
    }
}
