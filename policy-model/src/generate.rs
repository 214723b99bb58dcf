//! Random NetworkPolicies over a topology (proptest strategies): selectors over the label keys
//! and values the topology uses (matchLabels and every matchExpressions operator, empty ones
//! too), ipBlocks around the pods' addresses with excepts inside them, numeric, ranged and named
//! ports over TCP, UDP and SCTP, absent and empty lists, and every `policyTypes` form. Only
//! policies the API server would accept are made.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

use crate::model::{Topology, parse_cidr};

/// Label keys with the values they can take.
pub type Keys = Vec<(String, Vec<String>)>;

/// What random policies are made of.
#[derive(Clone, Debug)]
pub struct Space {
    /// Namespaces a policy can live in.
    pub namespaces: Vec<String>,
    pub pod_keys: Keys,
    /// Namespace label keys, `kubernetes.io/metadata.name` included.
    pub namespace_keys: Keys,
    /// ipBlock CIDRs.
    pub cidrs: Vec<String>,
    /// Addresses whose /32 or /31 can be an ipBlock's `except` (when inside its CIDR).
    pub except_hosts: Vec<Ipv4Addr>,
    pub ports: Vec<u16>,
    /// `(port, endPort)` pairs.
    pub ranges: Vec<(u16, u16)>,
    pub port_names: Vec<String>,
    /// At most this many policies at once.
    pub max_policies: usize,
}

impl Space {
    /// The space of `topology`: its namespaces and label keys and values; CIDRs of /32, /31,
    /// /30, /24 and /16 around every pod address and one block with no pod; its container ports,
    /// the port below them and ranges over and around them; its port names and one no pod has.
    pub fn of(topology: &Topology) -> Self {
        let keys = |sets: Vec<&BTreeMap<String, String>>| -> Keys {
            let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for labels in sets {
                for (k, v) in labels {
                    keys.entry(k.clone()).or_default().insert(v.clone());
                }
            }
            keys.into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect()
        };
        let namespaces: Vec<String> = topology.namespaces.iter().map(|n| n.name.clone()).collect();
        let mut namespace_keys = keys(topology.namespaces.iter().map(|n| &n.labels).collect());
        namespace_keys.push(("kubernetes.io/metadata.name".into(), namespaces.clone()));
        let mut cidrs = BTreeSet::new();
        for p in &topology.pods {
            for len in [32u32, 31, 30, 24, 16] {
                let mask = u32::MAX << (32 - len);
                cidrs.insert(format!("{}/{len}", Ipv4Addr::from(u32::from(p.ip) & mask)));
            }
        }
        cidrs.insert("192.0.2.0/24".into());
        let ports: BTreeSet<u16> = topology
            .pods
            .iter()
            .flat_map(|p| p.ports.iter().map(|c| c.port))
            .collect();
        let (lo, hi) = (
            ports.first().copied().unwrap_or(80),
            ports.last().copied().unwrap_or(80),
        );
        let mut port_names: BTreeSet<String> = topology
            .pods
            .iter()
            .flat_map(|p| p.ports.iter().map(|c| c.name.clone()))
            .collect();
        port_names.insert("none".into());
        Self {
            namespaces,
            pod_keys: keys(topology.pods.iter().map(|p| &p.labels).collect()),
            namespace_keys,
            cidrs: cidrs.into_iter().collect(),
            except_hosts: topology.pods.iter().map(|p| p.ip).collect(),
            ports: ports
                .iter()
                .copied()
                .chain([lo.saturating_sub(1).max(1)])
                .collect(),
            ranges: vec![
                (lo, hi),
                (lo.saturating_sub(1).max(1), lo),
                (hi, hi.saturating_add(9)),
                (1, 65535),
            ],
            port_names: port_names.into_iter().collect(),
            max_policies: 4,
        }
    }

    /// 1 to `max_policies` policies named `{prefix}{i}`.
    pub fn policies(&self, prefix: &str) -> impl Strategy<Value = Vec<NetworkPolicy>> + use<> {
        let space = self.clone();
        let prefix = prefix.to_owned();
        (1..=self.max_policies.max(1)).prop_flat_map(move |n| {
            (0..n)
                .map(|i| policy(&space, format!("{prefix}{i}")))
                .collect::<Vec<_>>()
        })
    }

    /// One draw of [`Space::policies`] from `seed` (the same seed gives the same policies).
    pub fn sample(&self, prefix: &str, seed: u64) -> Vec<NetworkPolicy> {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
        );
        self.policies(prefix)
            .new_tree(&mut runner)
            .expect("the generator never rejects")
            .current()
    }
}

fn label_selector(keys: &Keys) -> BoxedStrategy<Value> {
    if keys.is_empty() {
        return Just(json!({})).boxed();
    }
    let key = prop::sample::select(keys.clone());
    let value_sets = key.clone().prop_flat_map(|(k, vals)| {
        let n = vals.len();
        (Just(k), prop::sample::subsequence(vals, 1..=n))
    });
    prop_oneof![
        Just(json!({})),
        key.clone().prop_flat_map(|(k, vals)| {
            let k = k.clone();
            prop::sample::select(vals).prop_map(move |v| {
                let mut labels = serde_json::Map::new();
                labels.insert(k.clone(), Value::String(v));
                json!({"matchLabels": labels})
            })
        }),
        (value_sets, prop::sample::select(&["In", "NotIn"][..])).prop_map(|((k, vs), op)| {
            json!({"matchExpressions": [{"key": k, "operator": op, "values": vs}]})
        }),
        (key, prop::sample::select(&["Exists", "DoesNotExist"][..]))
            .prop_map(|((k, _), op)| json!({"matchExpressions": [{"key": k, "operator": op}]})),
    ]
    .boxed()
}

/// A CIDR of the space with 0 to 2 excepts strictly inside it (a pod's /32 or /31).
fn ip_block(space: &Space) -> impl Strategy<Value = Value> + use<> {
    let hosts = space.except_hosts.clone();
    let excepts = if hosts.is_empty() {
        Just(Vec::new()).boxed()
    } else {
        prop::collection::vec((prop::sample::select(hosts), prop::bool::ANY), 0..=2).boxed()
    };
    (prop::sample::select(space.cidrs.clone()), excepts).prop_map(|(cidr, excepts)| {
        let (net, mask) = parse_cidr(&cidr);
        let len = mask.count_ones();
        let except: BTreeSet<String> = excepts
            .into_iter()
            .filter_map(|(ip, wide)| {
                let (e, elen) = if wide {
                    (u32::from(ip) & !1, 31)
                } else {
                    (u32::from(ip), 32)
                };
                (elen > len && (e & mask) == net).then(|| format!("{}/{elen}", Ipv4Addr::from(e)))
            })
            .collect();
        if except.is_empty() {
            json!({"ipBlock": {"cidr": cidr}})
        } else {
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
    })
}

fn peer(space: &Space) -> impl Strategy<Value = Value> + use<> {
    let (pods, namespaces) = (
        label_selector(&space.pod_keys),
        label_selector(&space.namespace_keys),
    );
    prop_oneof![
        pods.clone().prop_map(|p| json!({"podSelector": p})),
        namespaces
            .clone()
            .prop_map(|n| json!({"namespaceSelector": n})),
        (pods, namespaces).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        ip_block(space),
    ]
}

fn port(space: &Space) -> impl Strategy<Value = Value> + use<> {
    let proto = prop::sample::select(&[None, Some("TCP"), Some("UDP"), Some("SCTP")][..]);
    let port = prop_oneof![
        Just(Value::Null),
        prop::sample::select(space.ports.clone()).prop_map(|p| json!({"port": p})),
        prop::sample::select(space.ranges.clone())
            .prop_map(|(p, e)| json!({"port": p, "endPort": e})),
        prop::sample::select(space.port_names.clone()).prop_map(|n| json!({"port": n})),
    ];
    (proto, port).prop_map(|(proto, port)| {
        let mut p = if port.is_null() { json!({}) } else { port };
        if let Some(proto) = proto {
            p["protocol"] = json!(proto);
        }
        p
    })
}

/// `None` = field absent; `Some(vec![])` = present and empty (same meaning, both made).
fn opt_list<S: Strategy<Value = Value> + 'static>(
    s: S,
) -> impl Strategy<Value = Option<Vec<Value>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => prop::collection::vec(s, 1..=3).prop_map(Some),
    ]
}

fn rule(space: &Space, peers_field: &'static str) -> impl Strategy<Value = Value> + use<> {
    (opt_list(peer(space)), opt_list(port(space))).prop_map(move |(peers, ports)| {
        let mut r = json!({});
        if let Some(p) = peers {
            r[peers_field] = json!(p);
        }
        if let Some(p) = ports {
            r["ports"] = json!(p);
        }
        r
    })
}

fn policy(space: &Space, name: String) -> impl Strategy<Value = NetworkPolicy> + use<> {
    let types = prop::sample::select(vec![
        None,
        Some(vec!["Ingress"]),
        Some(vec!["Egress"]),
        Some(vec!["Ingress", "Egress"]),
    ]);
    (
        prop::sample::select(space.namespaces.clone()),
        label_selector(&space.pod_keys),
        types,
        prop::option::of(prop::collection::vec(rule(space, "from"), 0..=2)),
        prop::option::of(prop::collection::vec(rule(space, "to"), 0..=2)),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let mut spec = json!({"podSelector": sel});
            if let Some(t) = types {
                spec["policyTypes"] = json!(t);
            }
            if let Some(r) = ingress {
                spec["ingress"] = json!(r);
            }
            if let Some(r) = egress {
                spec["egress"] = json!(r);
            }
            serde_json::from_value(json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name.clone(), "namespace": ns},
                "spec": spec,
            }))
            .expect("a well-formed NetworkPolicy")
        })
}
