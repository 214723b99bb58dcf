use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use twill_common::ServiceKey;

use super::*;
use crate::lbmap::FakeLbMaps;
use crate::reconcile::Reconciler;

fn svc(name: &str, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn slice(svc: &str, addrs: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc}-1")),
            namespace: Some("default".into()),
            labels: Some([(LABEL_SERVICE_NAME.to_owned(), svc.to_owned())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            addrs
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![(*a).to_owned()],
                    node_name: Some("node-b".into()),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            ..EndpointPort::default()
        }]),
    }
}

fn run(services: &[Service], slices: &[EndpointSlice], ids: &IdAllocation) -> Compiled {
    let config = CompileConfig::new("node-a");
    compile(&Inputs {
        services: services.iter().collect(),
        endpoint_slices: slices.iter().collect(),
        node: None,
        config: &config,
        ids,
    })
}

fn svc_id(c: &Compiled, ip: [u8; 4]) -> u32 {
    let key = ServiceKey {
        addr_be: u32::from_ne_bytes(ip),
        port_be: 80u16.to_be(),
        proto: 6,
        scope: SCOPE_ANY,
    };
    c.state.services[&key].svc_id
}

#[test]
fn ids_are_stable_when_services_come_and_go() {
    let a = svc("a", "10.96.0.1");
    let c = svc("c", "10.96.0.3");
    let first = run(
        &[a.clone(), c.clone()],
        &[slice("a", &["10.244.1.1"]), slice("c", &["10.244.1.3"])],
        &IdAllocation::default(),
    );
    let (id_a, id_c) = (
        svc_id(&first, [10, 96, 0, 1]),
        svc_id(&first, [10, 96, 0, 3]),
    );

    // "b" sorts between them: no renumbering of a or c, and its backend gets a fresh id too.
    let b = svc("b", "10.96.0.2");
    let slices = [
        slice("a", &["10.244.1.1"]),
        slice("b", &["10.244.1.2"]),
        slice("c", &["10.244.1.3"]),
    ];
    let second = run(&[a.clone(), b.clone(), c.clone()], &slices, &first.ids);
    assert_eq!(svc_id(&second, [10, 96, 0, 1]), id_a);
    assert_eq!(svc_id(&second, [10, 96, 0, 3]), id_c);
    let id_b = svc_id(&second, [10, 96, 0, 2]);
    assert!(id_b > id_c);
    for (id, be) in &first.state.backends {
        assert_eq!(
            second.state.backends.get(id),
            Some(be),
            "backend {id} renumbered"
        );
    }

    // Delete b, then re-add it: its old id is not reused right away.
    let third = run(
        &[a.clone(), c.clone()],
        &[slice("a", &["10.244.1.1"]), slice("c", &["10.244.1.3"])],
        &second.ids,
    );
    let fourth = run(&[a, b, c], &slices, &third.ids);
    assert_ne!(svc_id(&fourth, [10, 96, 0, 2]), id_b);
}

#[test]
fn ids_survive_an_agent_restart_through_adopted_maps() {
    let services = [svc("a", "10.96.0.1"), svc("b", "10.96.0.2")];
    let slices = [
        slice("a", &["10.244.1.1", "10.244.1.9"]),
        slice("b", &["10.244.1.2"]),
    ];
    // Ids far from 1, as after a long-running agent.
    let mut ids = IdAllocation::default();
    for _ in 0..3 {
        ids = run(&[], &[], &ids).ids;
        ids = run(
            &[svc("x", "10.96.0.99")],
            &[slice("x", &["10.244.9.9"])],
            &ids,
        )
        .ids;
        ids = run(&[], &[], &ids).ids;
    }
    let before = run(&services, &slices, &ids);
    let mut rec = Reconciler::new(FakeLbMaps::default());
    rec.apply(&before.state, true).unwrap();

    // New agent: no memory, only the pinned maps.
    let adopted = Reconciler::adopt(rec.into_maps()).unwrap();
    let after = run(
        &services,
        &slices,
        &IdAllocation::from_adopted(adopted.applied()),
    );
    assert_eq!(after.state, before.state);
}

#[test]
fn output_is_sorted_and_independent_of_input_order() {
    let services: Vec<Service> = (1..=20)
        .map(|i| svc(&format!("s{i:02}"), &format!("10.96.1.{i}")))
        .collect();
    let slices: Vec<EndpointSlice> = (1..=20)
        .map(|i| slice(&format!("s{i:02}"), &[&format!("10.244.2.{i}")]))
        .collect();
    let forward = run(&services, &slices, &IdAllocation::default());
    let mut rs = services.clone();
    rs.reverse();
    let mut rsl = slices.clone();
    rsl.reverse();
    let backward = run(&rs, &rsl, &IdAllocation::default());
    assert_eq!(forward.state, backward.state);
    assert_eq!(forward.model, backward.model);
    assert_eq!(
        forward.counts,
        ServiceCounts {
            services: 20,
            service_ports: 20,
            frontends: 20,
            endpoints: 20
        }
    );
    let names: Vec<&str> = forward.model.services.iter().map(|s| &*s.name).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
}

#[test]
fn duplicate_service_objects_count_once() {
    let a = svc("a", "10.96.0.1");
    let c = run(
        &[a.clone(), a],
        &[slice("a", &["10.244.1.1"])],
        &IdAllocation::default(),
    );
    assert_eq!(c.counts.services, 1);
    assert!(c.rejected().is_empty(), "{:?}", c.rejected());
}

#[test]
fn json_view_serializes() {
    let c = run(
        &[svc("a", "10.96.0.1")],
        &[slice("a", &["10.244.1.1"])],
        &IdAllocation::default(),
    );
    let json = serde_json::to_value(dump_view(&c.state, &c.model)).unwrap();
    assert_eq!(
        json["services"][0]["frontends"][0]["slots"][0]["backend"],
        "10.244.1.1:8080/TCP"
    );
    assert_eq!(json["services"][0]["type"], "ClusterIP");
}

#[test]
fn type_changes_keep_the_backend_set_id() {
    let mut np = svc("a", "10.96.0.1");
    let spec = np.spec.as_mut().unwrap();
    spec.type_ = Some("NodePort".into());
    spec.session_affinity = Some("ClientIP".into());
    spec.ports.as_mut().unwrap()[0].node_port = Some(30_001);
    let slices = [slice("a", &["10.244.1.1"])];

    let cluster_ip = run(&[svc("a", "10.96.0.1")], &slices, &IdAllocation::default());
    let node_port = run(std::slice::from_ref(&np), &slices, &cluster_ip.ids);
    // The NodePort joins the ClusterIP's set: affinity entries stay valid across the switch.
    let id = svc_id(&cluster_ip, [10, 96, 0, 1]);
    assert_eq!(svc_id(&node_port, [10, 96, 0, 1]), id);
    let nodeport_key = ServiceKey {
        addr_be: 0,
        port_be: 30_001u16.to_be(),
        proto: 6,
        scope: SCOPE_ANY,
    };
    let value = node_port.state.services[&nodeport_key];
    assert_eq!(value.svc_id, id);
    assert_eq!(value.flags, SVC_F_NODEPORT | SVC_F_AFFINITY);
    assert_eq!(value.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);

    // Back to ClusterIP: the NodePort frontend is gone (the port is released).
    let back = run(&[svc("a", "10.96.0.1")], &slices, &node_port.ids);
    assert!(!back.state.services.contains_key(&nodeport_key));
    assert_eq!(back.state, cluster_ip.state);

    // ExternalName: nothing at all.
    let mut ext = svc("a", "10.96.0.1");
    ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    let gone = run(&[ext], &slices, &back.ids);
    assert!(gone.state.services.is_empty() && gone.state.backends.is_empty());
}

#[test]
fn dump_shows_what_the_maps_hold_not_what_the_model_expects() {
    let c = run(
        &[svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
        &[
            slice("a", &["10.244.1.1", "10.244.1.2"]),
            slice("b", &["10.244.1.3"]),
        ],
        &IdAllocation::default(),
    );
    let mut maps = c.state.clone();
    // Frontend of "b" never written; slot 1 of "a" lost; a stale entry from an older agent.
    let b_key = ServiceKey {
        addr_be: addr_be(Ipv4Addr::new(10, 96, 0, 2)),
        port_be: 80u16.to_be(),
        proto: 6,
        scope: SCOPE_ANY,
    };
    maps.services.remove(&b_key);
    let a_id = svc_id(&c, [10, 96, 0, 1]);
    maps.slots.remove(&SlotKey {
        svc_id: a_id,
        slot: 1,
    });
    maps.slots.insert(
        SlotKey {
            svc_id: 999,
            slot: 0,
        },
        77,
    );
    let text = render_dump(&maps, &c.model);
    assert!(
        text.contains("frontend ClusterIP 10.96.0.2:80/TCP scope=any MISSING"),
        "{text}"
    );
    assert!(text.contains("    slot 1 MISSING"), "{text}");
    assert!(text.contains("unowned slot 999/0 -> 77"), "{text}");
    // The backend only "b" used is now unreachable through the model: listed as unowned.
    assert!(text.contains("unowned backend"), "{text}");
    assert!(!render_dump(&c.state, &c.model).contains("MISSING"));
}

fn lb(name: &str, ip: &str, lb_ip: &str, ranges: &[&str]) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": ip,
            "ports": [{"port": 80, "nodePort": 30_080}],
            "loadBalancerSourceRanges": ranges,
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
    }))
    .unwrap()
}

#[test]
fn source_ranges_are_desired_state_under_the_lb_frontends_id() {
    let net = |s: &str| s.parse::<IpNetwork>().unwrap();
    let slices = [slice("a", &["10.244.1.1"])];
    let c = run(
        &[lb(
            "a",
            "10.96.0.1",
            "203.0.113.1",
            &["10.1.2.3/8", "172.16.0.0/12"],
        )],
        &slices,
        &IdAllocation::default(),
    );
    let id = svc_id(&c, [10, 96, 0, 1]);
    // Canonical, under the id of the one filtered frontend.
    assert_eq!(
        c.state.source_ranges,
        BTreeSet::from([(id, net("10.0.0.0/8")), (id, net("172.16.0.0/12"))])
    );
    let filtered: Vec<_> = c
        .state
        .services
        .iter()
        .filter(|(_, v)| v.flags & SVC_F_SOURCE_RANGES != 0)
        .map(|(k, _)| addr_from_be(k.addr_be))
        .collect();
    assert_eq!(filtered, vec![Ipv4Addr::new(203, 0, 113, 1)]);
    let text = render_dump(&c.state, &c.model);
    assert!(text.contains("allow=10.0.0.0/8,172.16.0.0/12"), "{text}");

    // Editing the ranges changes only the ranges.
    let edited = run(
        &[lb("a", "10.96.0.1", "203.0.113.1", &["172.16.0.0/12"])],
        &slices,
        &c.ids,
    );
    assert_eq!(
        edited.state.source_ranges,
        BTreeSet::from([(id, net("172.16.0.0/12"))])
    );
    assert_eq!(edited.state.services, c.state.services);

    // No ranges, or not a LoadBalancer: nothing filtered, nothing in the trie.
    let open = run(&[lb("a", "10.96.0.1", "203.0.113.1", &[])], &slices, &c.ids);
    assert!(open.state.source_ranges.is_empty());
    assert!(
        open.state
            .services
            .values()
            .all(|v| v.flags & SVC_F_SOURCE_RANGES == 0)
    );
    let mut cluster_ip = svc("a", "10.96.0.1");
    cluster_ip
        .spec
        .as_mut()
        .unwrap()
        .load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into()]);
    let plain = run(&[cluster_ip], &slices, &c.ids);
    assert!(plain.state.source_ranges.is_empty());
}

#[test]
fn dump_shows_the_ranges_the_maps_hold() {
    let c = run(
        &[lb("a", "10.96.0.1", "203.0.113.1", &["10.0.0.0/8"])],
        &[slice("a", &["10.244.1.1"])],
        &IdAllocation::default(),
    );
    let mut maps = c.state.clone();
    // The frontend's range never written; a range of an id no frontend filters on.
    maps.source_ranges.clear();
    maps.source_ranges
        .insert((999, "192.168.0.0/16".parse().unwrap()));
    let text = render_dump(&maps, &c.model);
    assert!(text.contains("source-ranges allow=NONE"), "{text}");
    assert!(
        text.contains("unowned source-range 999 192.168.0.0/16"),
        "{text}"
    );
    let json = serde_json::to_value(dump_view(&c.state, &c.model)).unwrap();
    let lb_fe = json["services"][0]["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "LoadBalancer")
        .unwrap();
    // The JSON view and the text dump spell a frontend kind the same way.
    assert!(
        text.contains("frontend LoadBalancer 203.0.113.1:"),
        "{text}"
    );
    assert_eq!(lb_fe["source_ranges"], serde_json::json!(["10.0.0.0/8"]));
}

/// An endpoint without `nodeName` is local when its address is in this node's pod CIDRs (only
/// this node's pods hold them): north-south traffic to it must not be SNATed, since its replies
/// never cross the node's device. With a `nodeName`, the name decides, as in kube-proxy.
#[test]
fn endpoints_without_node_name_are_local_by_pod_cidr() {
    let mut s = slice("a", &["10.244.0.5", "10.244.1.5"]);
    for e in s.endpoints.iter_mut().flatten() {
        e.node_name = None;
    }
    let mut named = slice("b", &["10.244.0.6"]);
    named
        .endpoints
        .iter_mut()
        .flatten()
        .for_each(|e| e.node_name = Some("node-b".into()));
    let mut config = CompileConfig::new("node-a");
    config.pod_cidrs = vec!["10.244.0.0/24".parse().expect("valid CIDR")];
    let ids = IdAllocation::default();
    let c = compile(&Inputs {
        services: vec![&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2")],
        endpoint_slices: vec![&s, &named],
        node: None,
        config: &config,
        ids: &ids,
    });
    let local_of = |ip: [u8; 4]| {
        c.state
            .backends
            .values()
            .find(|b| b.addr_be == u32::from_ne_bytes(ip))
            .map(|b| b.flags & BE_F_LOCAL != 0)
    };
    assert_eq!(
        local_of([10, 244, 0, 5]),
        Some(true),
        "inside this node's pod CIDR"
    );
    assert_eq!(
        local_of([10, 244, 1, 5]),
        Some(false),
        "another node's pod CIDR"
    );
    assert_eq!(
        local_of([10, 244, 0, 6]),
        Some(false),
        "nodeName names another node"
    );
}

fn group(svc: Option<&Service>, ns: &str, name: &str) -> ServiceGroup {
    let mut interner = Interner::default();
    ServiceGroup {
        namespace: ns.into(),
        name: name.into(),
        service: svc.map(|s| Arc::new(ServiceInput::parse(s, &mut interner))),
        slices: Vec::new(),
    }
}

fn in_ns(mut s: Service, ns: &str) -> Service {
    s.metadata.namespace = Some(ns.into());
    s
}

/// The issue-12 hijack, change by change: an externalIP equal to another Service's ClusterIP
/// never takes that frontend while the ClusterIP exists, whichever Service came first and
/// however their names sort ("apps" < "kube-system").
#[test]
fn a_cluster_ip_wins_over_an_equal_external_ip_incrementally() {
    let config = CompileConfig::new("node-a");
    let dns = in_ns(svc("kube-dns", "10.96.0.10"), "kube-system");
    let mut hijack = in_ns(svc("hijack", "10.96.0.66"), "apps");
    hijack.spec.as_mut().expect("spec").external_ips = Some(vec!["10.96.0.10".into()]);
    let key = ServiceKey {
        addr_be: addr_be(Ipv4Addr::new(10, 96, 0, 10)),
        port_be: 80u16.to_be(),
        proto: 6,
        scope: SCOPE_ANY,
    };
    let flags = |c: &Compiler| c.state().services.get(&key).map(|v| v.flags);
    let conflict = |c: &Compiler| {
        c.rejected()
            .iter()
            .filter(|r| r.reason.metric_label() == "cluster_ip_conflict")
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect::<Vec<_>>()
    };

    let mut c = Compiler::new(IdAllocation::default());
    c.update(
        &config,
        None,
        [group(Some(&dns), "kube-system", "kube-dns")],
    );
    assert_eq!(flags(&c), Some(SVC_F_CLUSTER_IP));
    c.update(&config, None, [group(Some(&hijack), "apps", "hijack")]);
    assert_eq!(flags(&c), Some(SVC_F_CLUSTER_IP), "the ClusterIP stays");
    assert_eq!(conflict(&c), ["apps/hijack"]);

    // Without the ClusterIP the address is an ordinary external one; it goes back to the
    // ClusterIP as soon as that returns.
    c.update(&config, None, [group(None, "kube-system", "kube-dns")]);
    assert_eq!(flags(&c), Some(SVC_F_EXTERNAL_IP));
    assert!(conflict(&c).is_empty());
    c.update(
        &config,
        None,
        [group(Some(&dns), "kube-system", "kube-dns")],
    );
    assert_eq!(flags(&c), Some(SVC_F_CLUSTER_IP));
    assert_eq!(conflict(&c), ["apps/hijack"]);
}

/// Addresses that are never Service frontends, and a node's own address, which is refused only
/// while some Node has it (the Service is replanned when the nodes' addresses change).
#[test]
fn special_and_node_addresses_are_refused_as_external_ips() {
    for (ip, refused) in [
        ("0.0.0.0", true),
        ("0.1.2.3", true),
        ("127.0.0.53", true),
        ("169.254.1.1", true),
        ("224.0.0.251", true),
        ("239.255.255.250", true),
        ("255.255.255.255", true),
        ("192.0.2.1", false),
        ("10.96.0.10", false),
    ] {
        let ip: Ipv4Addr = ip.parse().expect("address");
        assert_eq!(special_address(ip).is_some(), refused, "{ip}");
    }

    let mut s = svc("web", "10.96.0.20");
    s.spec.as_mut().expect("spec").external_ips =
        Some(vec!["172.30.0.12".into(), "192.0.2.20".into()]);
    let external = |c: &Compiler| -> Vec<Ipv4Addr> {
        c.state()
            .services
            .iter()
            .filter(|(_, v)| v.flags & SVC_F_EXTERNAL_IP != 0)
            .map(|(k, _)| addr_from_be(k.addr_be))
            .collect()
    };
    let mut config = CompileConfig::new("node-a");
    let mut c = Compiler::new(IdAllocation::default());
    c.update(&config, None, [group(Some(&s), "default", "web")]);
    assert_eq!(
        external(&c),
        [Ipv4Addr::new(172, 30, 0, 12), Ipv4Addr::new(192, 0, 2, 20)]
    );
    config.node_ips = vec![Ipv4Addr::new(172, 30, 0, 12)];
    c.update(&config, None, []);
    assert_eq!(external(&c), [Ipv4Addr::new(192, 0, 2, 20)]);
    assert_eq!(
        c.rejected()
            .iter()
            .map(|r| r.reason.metric_label())
            .collect::<Vec<_>>(),
        ["refused_address"]
    );
    config.node_ips.clear();
    c.update(&config, None, []);
    assert_eq!(external(&c).len(), 2);
    assert!(c.rejected().is_empty());
}

#[test]
fn object_kinds_have_one_spelling() {
    for (kind, name) in [
        (ObjectKind::Service, "Service"),
        (ObjectKind::EndpointSlice, "EndpointSlice"),
        (ObjectKind::Node, "Node"),
    ] {
        assert_eq!(kind.as_str(), name);
        // The JSON view spells it the same way.
        assert_eq!(serde_json::to_value(kind).unwrap(), name);
    }
}

/// A Service over `max_frontends_per_service` is rejected whole, alone: it programs nothing and
/// claims nothing (a later Service asking for the same external address gets it), and raising
/// the cap programs it.
#[test]
fn a_service_over_the_frontend_cap_is_rejected_alone() {
    let mut big = svc("a-big", "10.96.0.30");
    let spec = big.spec.as_mut().expect("spec");
    spec.external_ips = Some(vec!["192.0.2.30".into(), "192.0.2.31".into()]);
    spec.ports = Some(
        (1..=3)
            .map(|p| ServicePort {
                name: Some(format!("p{p}")),
                port: p,
                ..ServicePort::default()
            })
            .collect(),
    );
    let mut small = svc("b-small", "10.96.0.31");
    small.spec.as_mut().expect("spec").external_ips = Some(vec!["192.0.2.30".into()]);
    small.spec.as_mut().expect("spec").ports = Some(vec![ServicePort {
        port: 1,
        ..ServicePort::default()
    }]);

    let mut config = CompileConfig::new("node-a");
    config.max_frontends_per_service = 8; // a-big needs 3 ports × (1 ClusterIP + 2 external) = 9
    let mut c = Compiler::new(IdAllocation::default());
    c.update(
        &config,
        None,
        [
            group(Some(&big), "default", "a-big"),
            group(Some(&small), "default", "b-small"),
        ],
    );
    let addrs: BTreeSet<Ipv4Addr> = c
        .state()
        .services
        .keys()
        .map(|k| addr_from_be(k.addr_be))
        .collect();
    assert_eq!(
        addrs,
        [Ipv4Addr::new(10, 96, 0, 31), Ipv4Addr::new(192, 0, 2, 30)].into(),
        "only b-small, with the external address a-big would have owned"
    );
    let rejected = c.rejected();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(&*rejected[0].name, "a-big");
    assert_eq!(
        rejected[0].reason,
        RejectReason::TooManyFrontends { count: 9, max: 8 }
    );
    assert_eq!(c.counts().services, 1);

    config.max_frontends_per_service = 9;
    c.update(&config, None, []);
    assert_eq!(c.counts().services, 2);
    assert_eq!(
        c.state().services.len(),
        9 + 2 - 1,
        "b-small lost 192.0.2.30:1 to a-big"
    );
}

#[test]
fn ipv6_endpoints_without_node_name_are_local_by_ipv6_pod_cidr() {
    let mut s = slice("a", &["fd00:244::5", "fd00:244:1::5"]);
    s.address_type = "IPv6".into();
    for e in s.endpoints.iter_mut().flatten() {
        e.node_name = None;
    }
    let mut config = CompileConfig::new("node-a");
    config.pod_cidrs6 = vec!["fd00:244::/64".parse().expect("valid CIDR")];
    let ids = IdAllocation::default();
    let c = compile(&Inputs {
        services: vec![&svc("a", "fd00:10:96::1")],
        endpoint_slices: vec![&s],
        node: None,
        config: &config,
        ids: &ids,
    });
    let local_of = |ip: &str| {
        let ip: std::net::Ipv6Addr = ip.parse().unwrap();
        c.state
            .backends6
            .values()
            .find(|b| b.addr_be == crate::family::addr6_be(ip))
            .map(|b| b.flags & BE_F_LOCAL != 0)
    };
    assert_eq!(local_of("fd00:244::5"), Some(true), "{:?}", c.state);
    assert_eq!(local_of("fd00:244:1::5"), Some(false), "{:?}", c.state);
    assert_eq!(c.state.services6.len(), 1);
    assert!(c.state.services.is_empty() && c.state.backends.is_empty());
}
