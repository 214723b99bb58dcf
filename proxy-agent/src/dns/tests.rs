use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData as WireData, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use twill_core::compile::{Interner, ServiceGroup, ServiceInput, SliceInput};
use twill_core::dns::DnsTable;

use super::{DnsResponder, Transport};
use crate::metrics::Metrics;

/// A responder serving `web` (ClusterIP 10.96.0.10) and `big`, a headless Service with
/// `endpoints` ready endpoints.
fn responder(endpoints: usize) -> (Arc<DnsResponder>, Arc<Metrics>) {
    let mut interner = Interner::default();
    let web: Service = serde_yaml::from_str(
        "metadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
    )
    .unwrap();
    let big: Service = serde_yaml::from_str(
        "metadata: {name: big, namespace: demo}\nspec: {clusterIP: None, ports: [{port: 80}]}",
    )
    .unwrap();
    let mut slice = String::from(
        "metadata: {name: big-1, namespace: demo, labels: {kubernetes.io/service-name: big}}\naddressType: IPv4\nendpoints:\n",
    );
    for i in 0..endpoints {
        writeln!(slice, "- addresses: [10.244.{}.{}]", i / 200, i % 200 + 1).unwrap();
    }
    let slice: EndpointSlice = serde_yaml::from_str(&slice).unwrap();
    let group = |name: &str, svc: &Service, slices| ServiceGroup {
        namespace: "demo".into(),
        name: name.into(),
        service: Some(Arc::new(ServiceInput::parse(svc, &mut Interner::default()))),
        slices,
    };
    let mut table = DnsTable::new("cluster.local");
    table.update(&[
        group("web", &web, vec![]),
        group(
            "big",
            &big,
            vec![Arc::new(SliceInput::parse(&slice, &mut interner))],
        ),
    ]);
    let metrics = Arc::new(Metrics::new());
    let r = DnsResponder::new(30, metrics.clone());
    r.publish(Arc::new(table));
    (r, metrics)
}

fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(r: &DnsResponder, name: &str, t: RecordType) -> Message {
    Message::from_vec(&r.answer(&query(name, t, false), Transport::Udp).unwrap()).unwrap()
}

#[test]
fn answers_a_cluster_ip_with_the_ttl_and_the_question_case() {
    let (r, metrics) = responder(1);
    let m = ask(&r, "Web.demo.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].name.to_ascii(), "Web.demo.svc.cluster.local.");
    assert_eq!(m.answers[0].ttl, 30);
    assert_eq!(
        m.answers[0].data,
        WireData::A(Ipv4Addr::new(10, 96, 0, 10).into())
    );
    assert!(
        metrics
            .render()
            .contains("twill_dns_queries_total{type=\"A\",rcode=\"NOERROR\",transport=\"udp\"} 1")
    );
}

#[test]
fn servfail_until_the_first_sync_publishes_a_table() {
    let r = DnsResponder::new(30, Arc::new(Metrics::new()));
    let m = ask(&r, "web.demo.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn nxdomain_nodata_and_refused_out_of_zone() {
    let (r, _) = responder(1);
    let m = ask(&r, "nope.demo.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(&r, "web.demo.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = ask(&r, "example.com.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn malformed_packets_and_responses_are_dropped() {
    let (r, metrics) = responder(1);
    assert_eq!(r.answer(&[], Transport::Udp), None);
    assert_eq!(r.answer(&[0xff; 7], Transport::Udp), None);
    let mut q = query("web.demo.svc.cluster.local.", RecordType::A, false);
    q.truncate(q.len() - 3);
    assert_eq!(r.answer(&q, Transport::Udp), None);
    let mut resp = Message::query();
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(r.answer(&resp.to_vec().unwrap(), Transport::Udp), None);
    assert!(metrics.render().contains("twill_dns_dropped_total 4"));
    // And the next query is answered.
    let m = ask(&r, "web.demo.svc.cluster.local.", RecordType::A);
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn a_udp_answer_too_big_is_truncated_and_tcp_carries_it_whole() {
    let (r, _) = responder(300);
    let q = query("big.demo.svc.cluster.local.", RecordType::A, false);
    let udp = Message::from_vec(&r.answer(&q, Transport::Udp).unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let tcp = Message::from_vec(&r.answer(&q, Transport::Tcp).unwrap()).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 300);
    // With EDNS the datagram may reach 1232 bytes: 30 records fit, 300 do not.
    let (small, _) = responder(30);
    let q = query("big.demo.svc.cluster.local.", RecordType::A, true);
    let udp = Message::from_vec(&small.answer(&q, Transport::Udp).unwrap()).unwrap();
    assert!(!udp.metadata.truncation);
    assert_eq!(udp.answers.len(), 30);
    assert!(udp.edns.is_some());
}
