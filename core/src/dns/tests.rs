use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{DnsTable, Lookup, QType, RData};
use crate::compile::{Interner, ServiceGroup, ServiceInput, SliceInput};

fn service(yaml: &str) -> Arc<ServiceInput> {
    let svc: Service = serde_yaml::from_str(yaml).expect("service yaml");
    Arc::new(ServiceInput::parse(&svc, &mut Interner::default()))
}

fn slice(yaml: &str) -> Arc<SliceInput> {
    let s: EndpointSlice = serde_yaml::from_str(yaml).expect("slice yaml");
    Arc::new(SliceInput::parse(&s, &mut Interner::default()))
}

fn group(
    ns: &str,
    name: &str,
    svc: Option<Arc<ServiceInput>>,
    slices: Vec<Arc<SliceInput>>,
) -> ServiceGroup {
    ServiceGroup {
        namespace: ns.into(),
        name: name.into(),
        service: svc,
        slices,
    }
}

const CLUSTER_IP: &str = "
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
  - {port: 8080}
";

const HEADLESS: &str = "
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  ports:
  - {name: pg, port: 5432}
";

const HEADLESS_SLICE: &str = "
metadata:
  name: db-abc
  namespace: demo
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
- {name: pg, port: 5433}
endpoints:
- addresses: [10.244.1.5]
  hostname: db-0
- addresses: [10.244.2.7]
- addresses: [10.244.2.9]
  conditions: {ready: false}
";

const EXTERNAL: &str = "
metadata: {name: ext, namespace: demo}
spec:
  type: ExternalName
  externalName: Example.COM.
";

fn table() -> DnsTable {
    let mut t = DnsTable::new("cluster.local.");
    t.update(&[
        group("demo", "web", Some(service(CLUSTER_IP)), vec![]),
        group(
            "demo",
            "db",
            Some(service(HEADLESS)),
            vec![slice(HEADLESS_SLICE)],
        ),
        group("demo", "ext", Some(service(EXTERNAL)), vec![]),
    ]);
    t
}

fn a(ips: &[[u8; 4]]) -> Lookup {
    Lookup::Answer(ips.iter().map(|o| RData::A(Ipv4Addr::from(*o))).collect())
}

#[test]
fn cluster_ip_service_has_an_a_record_in_any_case_with_or_without_the_final_dot() {
    let t = table();
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::A),
        a(&[[10, 96, 0, 10]])
    );
    assert_eq!(
        t.lookup("WEB.Demo.svc.cluster.local.", QType::A),
        a(&[[10, 96, 0, 10]])
    );
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::Other),
        Lookup::NoData
    );
    assert_eq!(
        t.lookup("web.other.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        t.lookup("nope.demo.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
}

#[test]
fn named_ports_have_srv_records_and_unnamed_ones_none() {
    let t = table();
    let srv = |port| {
        Lookup::Answer(vec![RData::Srv {
            priority: 0,
            weight: 100,
            port,
            target: "web.demo.svc.cluster.local".into(),
        }])
    };
    assert_eq!(
        t.lookup("_http._tcp.web.demo.svc.cluster.local", QType::Srv),
        srv(80)
    );
    assert_eq!(
        t.lookup("_dns._udp.web.demo.svc.cluster.local", QType::Srv),
        srv(53)
    );
    assert_eq!(
        t.lookup("_dns._tcp.web.demo.svc.cluster.local", QType::Srv),
        Lookup::NxDomain
    );
    // `_udp.<svc>` exists as the parent of `_dns._udp.<svc>`: NODATA, not NXDOMAIN.
    assert_eq!(
        t.lookup("_udp.web.demo.svc.cluster.local", QType::Srv),
        Lookup::NoData
    );
    assert_eq!(
        t.lookup("_http._tcp.web.demo.svc.cluster.local", QType::A),
        Lookup::NoData
    );
}

#[test]
fn headless_service_returns_every_ready_endpoint_and_names_each() {
    let t = table();
    assert_eq!(
        t.lookup("db.demo.svc.cluster.local", QType::A),
        a(&[[10, 244, 1, 5], [10, 244, 2, 7]])
    );
    assert_eq!(
        t.lookup("db-0.db.demo.svc.cluster.local", QType::A),
        a(&[[10, 244, 1, 5]])
    );
    assert_eq!(
        t.lookup("10-244-2-7.db.demo.svc.cluster.local", QType::A),
        a(&[[10, 244, 2, 7]])
    );
    // Not ready: no record at all.
    assert_eq!(
        t.lookup("10-244-2-9.db.demo.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    let Lookup::Answer(srv) = t.lookup("_pg._tcp.db.demo.svc.cluster.local", QType::Srv) else {
        panic!("no SRV for the headless named port");
    };
    assert_eq!(
        srv,
        vec![
            RData::Srv {
                priority: 0,
                weight: 100,
                port: 5433,
                target: "10-244-2-7.db.demo.svc.cluster.local".into()
            },
            RData::Srv {
                priority: 0,
                weight: 100,
                port: 5433,
                target: "db-0.db.demo.svc.cluster.local".into()
            },
        ]
    );
}

#[test]
fn publish_not_ready_addresses_serves_not_ready_endpoints() {
    let mut t = DnsTable::new("cluster.local");
    let svc = HEADLESS.replace(
        "clusterIP: None",
        "clusterIP: None\n  publishNotReadyAddresses: true",
    );
    t.update(&[group(
        "demo",
        "db",
        Some(service(&svc)),
        vec![slice(HEADLESS_SLICE)],
    )]);
    assert_eq!(
        t.lookup("db.demo.svc.cluster.local", QType::A),
        a(&[[10, 244, 1, 5], [10, 244, 2, 7], [10, 244, 2, 9]])
    );
}

#[test]
fn headless_service_without_endpoints_exists_with_no_address() {
    let mut t = DnsTable::new("cluster.local");
    t.update(&[group("demo", "db", Some(service(HEADLESS)), vec![])]);
    assert_eq!(
        t.lookup("db.demo.svc.cluster.local", QType::A),
        Lookup::NoData
    );
    assert_eq!(
        t.lookup("_pg._tcp.db.demo.svc.cluster.local", QType::Srv),
        Lookup::NoData
    );
}

#[test]
fn external_name_is_a_cname_for_every_type() {
    let t = table();
    let cname = Lookup::Answer(vec![RData::Cname("example.com".into())]);
    assert_eq!(t.lookup("ext.demo.svc.cluster.local", QType::Cname), cname);
    assert_eq!(t.lookup("ext.demo.svc.cluster.local", QType::A), cname);
    assert_eq!(t.lookup("ext.demo.svc.cluster.local", QType::Srv), cname);
}

#[test]
fn ptr_records_for_cluster_ips_and_headless_endpoints_only() {
    let t = table();
    assert_eq!(
        t.lookup("10.0.96.10.in-addr.arpa.", QType::Ptr),
        Lookup::Answer(vec![RData::Ptr("web.demo.svc.cluster.local".into())])
    );
    assert_eq!(
        t.lookup("5.1.244.10.in-addr.arpa", QType::Ptr),
        Lookup::Answer(vec![RData::Ptr("db-0.db.demo.svc.cluster.local".into())])
    );
    assert_eq!(
        t.lookup("5.1.244.10.in-addr.arpa", QType::A),
        Lookup::NoData
    );
    // Not a cluster address: the upstream resolvers' business.
    assert_eq!(
        t.lookup("8.8.8.8.in-addr.arpa", QType::Ptr),
        Lookup::OutOfZone
    );
}

#[test]
fn pod_names_spell_their_address() {
    let t = table();
    assert_eq!(
        t.lookup("10-244-1-5.demo.pod.cluster.local", QType::A),
        a(&[[10, 244, 1, 5]])
    );
    assert_eq!(
        t.lookup("10-244-1-5.demo.pod.cluster.local", QType::Srv),
        Lookup::NoData
    );
    assert_eq!(
        t.lookup("10-244-1-500.demo.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        t.lookup("010-244-1-5.demo.pod.cluster.local", QType::A),
        Lookup::NxDomain
    );
}

#[test]
fn zone_structure_names_are_nodata_and_other_names_out_of_zone() {
    let t = table();
    assert_eq!(t.lookup("cluster.local", QType::A), Lookup::NoData);
    assert_eq!(t.lookup("svc.cluster.local", QType::A), Lookup::NoData);
    assert_eq!(t.lookup("demo.svc.cluster.local", QType::A), Lookup::NoData);
    assert_eq!(
        t.lookup("empty.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(t.lookup("foo.cluster.local", QType::A), Lookup::NxDomain);
    assert_eq!(t.lookup("example.com", QType::A), Lookup::OutOfZone);
    assert_eq!(t.lookup("notcluster.local", QType::A), Lookup::OutOfZone);
    assert_eq!(
        t.lookup("dns-version.cluster.local", QType::Txt),
        Lookup::Answer(vec![RData::Txt("1.1.0".into())])
    );
}

#[test]
fn updates_replace_a_group_and_removal_forgets_its_names_and_ptrs() {
    let mut t = table();
    let moved = CLUSTER_IP.replace("10.96.0.10", "10.96.0.11");
    t.update(&[group("demo", "web", Some(service(&moved)), vec![])]);
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::A),
        a(&[[10, 96, 0, 11]])
    );
    assert_eq!(
        t.lookup("10.0.96.10.in-addr.arpa", QType::Ptr),
        Lookup::OutOfZone
    );
    t.update(&[
        group("demo", "web", None, vec![]),
        group("demo", "db", None, vec![]),
        group("demo", "ext", None, vec![]),
    ]);
    assert!(t.is_empty());
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        t.lookup("demo.svc.cluster.local", QType::A),
        Lookup::NxDomain
    );
    assert_eq!(
        t.lookup("11.0.96.10.in-addr.arpa", QType::Ptr),
        Lookup::OutOfZone
    );
}

#[test]
fn ipv4_only_service_answers_aaaa_with_nodata_not_nxdomain() {
    // The race glibc runs (A and AAAA in parallel): the AAAA half must come back as an empty
    // NOERROR, never NXDOMAIN, or the resolver discards the A answer too.
    let t = table();
    for name in [
        "web.demo.svc.cluster.local",
        "db.demo.svc.cluster.local",
        "db-0.db.demo.svc.cluster.local",
        "10-244-1-5.demo.pod.cluster.local",
    ] {
        assert_eq!(t.lookup(name, QType::Aaaa), Lookup::NoData, "{name}");
    }
}

#[test]
fn dual_stack_cluster_ips_answer_a_and_aaaa_from_one_record_set() {
    let mut t = DnsTable::new("cluster.local");
    let dual = CLUSTER_IP.replace(
        "clusterIP: 10.96.0.10",
        "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::a\"]",
    );
    t.update(&[group("demo", "web", Some(service(&dual)), vec![])]);
    let v6: std::net::Ipv6Addr = "fd00:96::a".parse().unwrap();
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::A),
        a(&[[10, 96, 0, 10]])
    );
    assert_eq!(
        t.lookup("web.demo.svc.cluster.local", QType::Aaaa),
        Lookup::Answer(vec![RData::Aaaa(v6)])
    );
    // The nibble reverse name of fd00:96::a.
    let rev = "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.";
    assert_eq!(
        t.lookup(rev, QType::Ptr),
        Lookup::Answer(vec![RData::Ptr("web.demo.svc.cluster.local".into())])
    );
    assert_eq!(t.lookup("a.ip6.arpa", QType::Ptr), Lookup::OutOfZone);
}

#[test]
fn apex_has_an_soa_whose_serial_moves_with_each_update_and_minimum_is_the_negative_ttl() {
    let mut t = table().with_negative_ttl(7);
    let soa = t.soa();
    assert_eq!(&*soa.mname, "ns.dns.cluster.local");
    assert_eq!(&*soa.rname, "hostmaster.cluster.local");
    assert_eq!(soa.minimum, 7);
    assert_eq!(
        t.lookup("cluster.local.", QType::Soa),
        Lookup::Answer(vec![RData::Soa(soa.clone())])
    );
    t.update(&[group("demo", "web", None, vec![])]);
    assert_ne!(t.soa().serial, soa.serial);
}
