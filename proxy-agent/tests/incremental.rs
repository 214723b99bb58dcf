//! The incremental path equals the from-scratch one: random sequences of Service, EndpointSlice
//! and Node changes go (a) through the stores, the run loop's [`Compiler`] and a reconciler
//! applying only the changed keys (with injected write failures), and (b) through a
//! from-scratch [`compile`] of all objects after every change, fed the previous compile's ids as
//! the agent used to. After every change both must agree on the desired state, ids, dump model,
//! health checks and counts, and the maps must hold the desired state once an apply succeeds.
//!
//! The object universe is small on purpose, so that changes collide: a few ClusterIPs shared by
//! several Services (frontend conflicts and owner changes), endpoints shared by Services (backend
//! flag unions), invalid and unsupported fields, and small id spaces (exhaustion, wrap-around).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{Value, json};
use twill_agent::compile::{
    CompileConfig, Compiler, IdAllocation, Inputs, Interner, all_node_ips, compile, render_dump,
};
use twill_agent::lbmap::{FakeLbMaps, FaultPlan, FaultyLbMaps, LbMaps, LbState};
use twill_agent::reconcile::{Reconciler, check_invariant};
use twill_agent::source::{Kind, Object, Stores};

const NAMESPACES: [&str; 2] = ["a", "b"];
const SERVICES: [&str; 4] = ["s0", "s1", "s2", "s3"];

#[derive(Clone, Debug)]
struct PortSpec {
    name: &'static str,
    port: u16,
    proto: &'static str,
    node_port: u16,
}

#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent Service switches"
)]
struct SvcSpec {
    ty: &'static str,
    cluster_ip: &'static str,
    ports: Vec<PortSpec>,
    external_ip: Option<&'static str>,
    lb_ip: Option<&'static str>,
    etp_local: bool,
    itp_local: bool,
    affinity: bool,
    publish_not_ready: bool,
    ranges: bool,
    health_check: bool,
    /// A second ClusterIP of the other family (dual-stack), when the first is an address.
    dual: bool,
}

#[derive(Clone, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "the endpoint conditions")]
struct EpSpec {
    addr: &'static str,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    service: Option<usize>,
    ipv6: bool,
    port_name: &'static str,
    port: u16,
    endpoints: Vec<EpSpec>,
}

#[derive(Clone, Debug)]
enum Op {
    UpsertService(usize, usize, SvcSpec),
    DeleteService(usize, usize),
    UpsertSlice(usize, usize, SliceSpec),
    DeleteSlice(usize, usize),
    Node(Vec<&'static str>),
    /// The next apply fails at this write (and all later ones when `true`).
    Fault(u64, bool),
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        prop::sample::select(vec!["", "http", "https"]),
        prop::sample::select(vec![80u16, 443]),
        prop::sample::select(vec!["TCP", "TCP", "UDP", "SCTP"]),
        prop::sample::select(vec![30_001u16, 30_002, 29_999]),
    )
        .prop_map(|(name, port, proto, node_port)| PortSpec {
            name,
            port,
            proto,
            node_port,
        })
}

fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        prop::sample::select(vec![
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
        ]),
        prop::sample::select(vec![
            "10.96.0.1",
            "10.96.0.2",
            "10.96.0.3",
            "fd00:10:96::1",
            "None",
            "x",
        ]),
        prop::collection::vec(port_spec(), 1..3),
        // Another Service's ClusterIP, a node's address (while a Node has it), loopback.
        prop::option::of(prop::sample::select(vec![
            "10.96.0.2",
            "198.51.100.1",
            "172.30.0.12",
            "127.0.0.1",
        ])),
        prop::option::of(prop::sample::select(vec![
            "203.0.113.1",
            "203.0.113.2",
            "10.96.0.1",
            "172.30.0.11",
        ])),
        any::<[bool; 7]>(),
    )
        .prop_map(|(ty, cluster_ip, ports, external_ip, lb_ip, b)| SvcSpec {
            ty,
            cluster_ip,
            ports,
            external_ip,
            lb_ip,
            etp_local: b[0],
            itp_local: b[1],
            affinity: b[2],
            publish_not_ready: b[3],
            ranges: b[4],
            health_check: b[5],
            dual: b[6],
        })
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    let ep = (
        prop::sample::select(vec![
            "10.244.0.1",
            "10.244.0.2",
            "10.244.1.1",
            "10.244.1.2",
            "10.244.1.3",
        ]),
        any::<[bool; 4]>(),
    )
        .prop_map(|(addr, b)| EpSpec {
            addr,
            local: b[0],
            ready: b[1],
            serving: b[2],
            terminating: b[3],
        });
    (
        prop::option::weighted(0.9, 0..SERVICES.len()),
        prop::bool::weighted(0.3),
        prop::sample::select(vec!["", "http", "https"]),
        prop::sample::select(vec![8080u16, 8443]),
        prop::collection::vec(ep, 0..4),
    )
        .prop_map(|(service, ipv6, port_name, port, endpoints)| SliceSpec {
            service,
            ipv6,
            port_name,
            port,
            endpoints,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let ns = 0..NAMESPACES.len();
    let svc = 0..SERVICES.len();
    prop_oneof![
        5 => (ns.clone(), svc.clone(), svc_spec()).prop_map(|(n, s, spec)| Op::UpsertService(n, s, spec)),
        1 => (ns.clone(), svc).prop_map(|(n, s)| Op::DeleteService(n, s)),
        5 => (ns.clone(), 0..5usize, slice_spec()).prop_map(|(n, s, spec)| Op::UpsertSlice(n, s, spec)),
        1 => (ns, 0..5usize).prop_map(|(n, s)| Op::DeleteSlice(n, s)),
        1 => prop::collection::vec(prop::sample::select(vec!["172.30.0.11", "172.30.0.12", "bad"]), 0..3).prop_map(Op::Node),
        1 => (0..20u64, any::<bool>()).prop_map(|(n, after)| Op::Fault(n, after)),
    ]
}

fn service(ns: usize, name: usize, spec: &SvcSpec) -> Service {
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            json!({"name": p.name, "port": p.port, "protocol": p.proto, "nodePort": p.node_port,
                "targetPort": 8080})
        })
        .collect();
    let mut s = json!({
        "metadata": {"name": SERVICES[name], "namespace": NAMESPACES[ns]},
        "spec": {
            "type": spec.ty,
            "clusterIP": spec.cluster_ip,
            "ports": ports,
            "externalTrafficPolicy": if spec.etp_local { "Local" } else { "Cluster" },
            "internalTrafficPolicy": if spec.itp_local { "Local" } else { "Cluster" },
            "publishNotReadyAddresses": spec.publish_not_ready,
        },
    });
    if spec.dual && spec.cluster_ip.parse::<std::net::IpAddr>().is_ok() {
        // The other family's address: IPv6 for an IPv4 primary and the other way round.
        let second = if spec.cluster_ip.contains(':') {
            "10.96.0.4"
        } else {
            "fd00:10:96::2"
        };
        s["spec"]["clusterIPs"] = json!([spec.cluster_ip, second]);
        s["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
    }
    if let Some(ip) = spec.external_ip {
        s["spec"]["externalIPs"] = json!([ip]);
    }
    if spec.affinity {
        s["spec"]["sessionAffinity"] = json!("ClientIP");
    }
    if spec.ranges {
        s["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/8", "192.0.2.7/24"]);
    }
    if spec.health_check {
        s["spec"]["healthCheckNodePort"] = json!(31_000);
    }
    if let Some(ip) = spec.lb_ip {
        s["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
    }
    serde_json::from_value(s).expect("a Service")
}

fn slice(ns: usize, idx: usize, spec: &SliceSpec) -> EndpointSlice {
    let endpoints: Vec<Value> = spec
        .endpoints
        .iter()
        .map(|e| {
            // An IPv6 slice gets the IPv6 twin of the address (`10.244.1.2` → `fd00:244:1::2`),
            // except the last one, left IPv4 so such a slice is rejected now and then.
            let addr = match e.addr.split('.').collect::<Vec<_>>()[..] {
                [_, _, c, d] if spec.ipv6 && e.addr != "10.244.1.3" => format!("fd00:244:{c}::{d}"),
                _ => e.addr.to_owned(),
            };
            json!({"addresses": [addr], "nodeName": if e.local { "node-a" } else { "node-b" },
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating}})
        })
        .collect();
    let mut metadata = json!({"name": format!("slice-{idx}"), "namespace": NAMESPACES[ns]});
    if let Some(s) = spec.service {
        metadata["labels"] = json!({"kubernetes.io/service-name": SERVICES[s]});
    }
    serde_json::from_value(json!({
        "metadata": metadata,
        "addressType": if spec.ipv6 { "IPv6" } else { "IPv4" },
        "endpoints": endpoints,
        "ports": [{"name": spec.port_name, "port": spec.port, "protocol": "TCP"}],
    }))
    .expect("an EndpointSlice")
}

fn node(addrs: &[&str]) -> Node {
    let addresses: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    serde_json::from_value(
        json!({"metadata": {"name": "node-a"}, "status": {"addresses": addresses}}),
    )
    .expect("a Node")
}

/// The raw objects, as a from-scratch compile reads them.
#[derive(Default)]
struct Cluster {
    services: BTreeMap<(usize, usize), Service>,
    slices: BTreeMap<(usize, usize), EndpointSlice>,
    node: Option<Node>,
}

#[expect(
    clippy::too_many_lines,
    reason = "one scenario step: change, both paths, every comparison"
)]
fn check(ops: &[Op], max_id: u32) -> Result<(), TestCaseError> {
    let mut config = CompileConfig::new("node-a");
    let stores = Stores::new();
    let mut interner = Interner::default();
    let mut compiler = Compiler::new(IdAllocation::with_max_id(max_id));
    let mut rec = Reconciler::new(FaultyLbMaps::new(FakeLbMaps::default(), FaultPlan::none()));
    // What the run loop publishes for the API: kept equal to the reconciler's bookkeeping.
    let mut published = LbState::default();
    let mut cluster = Cluster::default();
    let mut ids = IdAllocation::with_max_id(max_id);
    let mut first = true;
    let mut fault = None;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::UpsertService(n, s, spec) => {
                let raw = service(*n, *s, spec);
                stores.upsert(Object::service(&raw, &mut interner).expect("keyed"));
                cluster.services.insert((*n, *s), raw);
            }
            Op::DeleteService(n, s) => {
                stores.delete(Kind::Service, &(NAMESPACES[*n].into(), SERVICES[*s].into()));
                cluster.services.remove(&(*n, *s));
            }
            Op::UpsertSlice(n, i, spec) => {
                let raw = slice(*n, *i, spec);
                stores.upsert(Object::slice(&raw, &mut interner).expect("keyed"));
                cluster.slices.insert((*n, *i), raw);
            }
            Op::DeleteSlice(n, i) => {
                stores.delete(
                    Kind::EndpointSlice,
                    &(NAMESPACES[*n].into(), format!("slice-{i}").into()),
                );
                cluster.slices.remove(&(*n, *i));
            }
            Op::Node(addrs) => {
                let raw = node(addrs);
                stores.upsert(Object::node(raw.clone()).expect("keyed"));
                cluster.node = Some(raw);
            }
            Op::Fault(n, after) => {
                // For the next change's apply (this step writes nothing).
                fault = Some(if *after {
                    FaultPlan::none().fail_after(*n)
                } else {
                    FaultPlan::none().fail_nth(*n)
                });
                continue;
            }
        }
        if let Some(plan) = fault.take() {
            let maps = rec.maps_mut();
            maps.plan = plan;
            maps.ops = 0;
        }

        // (a) The run loop's way (the nodes' addresses as the run loop reads them).
        config.node_ips = all_node_ips(stores.nodes().values().map(AsRef::as_ref));
        let dirty = stores.take_changes(first);
        first = false;
        let node = stores.node("node-a");
        compiler.update(&config, node.as_deref(), dirty.groups);
        let changes = compiler.take_changes();
        let result = rec.apply_changes(compiler.state(), &changes, true);
        match &result {
            Ok(stats) if !stats.compared_all => published.copy_changes(rec.applied(), &changes),
            Err(e) if e.stats().is_some_and(|s| !s.compared_all) => {
                published.copy_changes(rec.applied(), &changes);
            }
            _ => published.clone_from(rec.applied()),
        }
        rec.maps_mut().plan = FaultPlan::none();

        // (b) From scratch.
        let reference = compile(&Inputs {
            services: cluster.services.values().collect(),
            endpoint_slices: cluster.slices.values().collect(),
            node: cluster.node.as_ref(),
            config: &config,
            ids: &ids,
        });
        ids = reference.ids.clone();

        let model = compiler.model();
        prop_assert_eq!(
            render_dump(compiler.state(), &model),
            render_dump(&reference.state, &reference.model),
            "step {}: dump differs",
            step
        );
        prop_assert_eq!(compiler.state(), &reference.state, "step {}: state", step);
        prop_assert_eq!(&model, &reference.model, "step {}: model", step);
        prop_assert_eq!(compiler.ids(), &reference.ids, "step {}: ids", step);
        prop_assert_eq!(compiler.health(), reference.health.clone(), "step {}", step);
        prop_assert_eq!(compiler.counts(), reference.counts, "step {}: counts", step);

        let maps = rec.maps().inner.dump().expect("fake dump");
        prop_assert_eq!(rec.applied(), &maps, "step {}: bookkeeping drifted", step);
        prop_assert_eq!(
            &published,
            rec.applied(),
            "step {}: published copy drifted",
            step
        );
        if let Err(e) = check_invariant(&maps) {
            return Err(TestCaseError::fail(format!("step {step}: {e}")));
        }
        if result.is_ok() {
            prop_assert_eq!(&maps, compiler.state(), "step {}: maps", step);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_from_scratch(
        ops in prop::collection::vec(op(), 1..40),
        max_id in prop::sample::select(vec![u32::MAX, u32::MAX, 5, 9]),
    ) {
        check(&ops, max_id)?;
    }
}

/// A fixed scenario of the couplings, so a regression shows without shrinking.
#[test]
fn owner_changes_and_shared_backends() {
    let spec = |ip| SvcSpec {
        ty: "NodePort",
        cluster_ip: ip,
        ports: vec![PortSpec {
            name: "http",
            port: 80,
            proto: "TCP",
            node_port: 30_001,
        }],
        external_ip: None,
        lb_ip: None,
        etp_local: true,
        itp_local: false,
        affinity: false,
        publish_not_ready: false,
        ranges: false,
        health_check: true,
        dual: true,
    };
    let ep = |addr, local| EpSpec {
        addr,
        local,
        ready: true,
        serving: true,
        terminating: false,
    };
    let slice_of = |svc, eps| SliceSpec {
        service: Some(svc),
        ipv6: false,
        port_name: "http",
        port: 8080,
        endpoints: eps,
    };
    let ops = vec![
        Op::UpsertService(0, 1, spec("10.96.0.1")),
        Op::UpsertSlice(0, 0, slice_of(1, vec![ep("10.244.0.1", true)])),
        // s2 wants the same ClusterIP and NodePort: rejected while s1 owns them.
        Op::UpsertService(0, 2, spec("10.96.0.1")),
        Op::UpsertSlice(0, 1, slice_of(2, vec![ep("10.244.0.1", false)])),
        // s0 sorts first and takes both over; s1 and s2 are now rejected.
        Op::UpsertService(0, 0, spec("10.96.0.1")),
        Op::UpsertSlice(
            0,
            2,
            slice_of(0, vec![ep("10.244.0.1", true), ep("10.244.1.1", false)]),
        ),
        Op::DeleteService(0, 0),
        Op::DeleteService(0, 1),
        Op::UpsertService(0, 1, spec("10.96.0.3")),
        Op::DeleteSlice(0, 1),
    ];
    check(&ops, u32::MAX).unwrap();
    check(&ops, 3).unwrap();
}
