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
    responder_in("cluster.local", endpoints)
}

/// [`responder`] serving the zone `zone` instead of `cluster.local`.
fn responder_in(zone: &str, endpoints: usize) -> (Arc<DnsResponder>, Arc<Metrics>) {
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
    let mut table = DnsTable::new(zone).with_negative_ttl(5);
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

/// The answer to `packet`, outside a runtime (the table's answers never wait).
fn answer_now(r: &DnsResponder, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(r.answer(packet, transport))
}

fn ask(r: &DnsResponder, name: &str, t: RecordType) -> Message {
    Message::from_vec(&answer_now(r, &query(name, t, false), Transport::Udp).unwrap()).unwrap()
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
    assert_eq!(answer_now(&r, &[], Transport::Udp), None);
    assert_eq!(answer_now(&r, &[0xff; 7], Transport::Udp), None);
    let mut q = query("web.demo.svc.cluster.local.", RecordType::A, false);
    q.truncate(q.len() - 3);
    assert_eq!(answer_now(&r, &q, Transport::Udp), None);
    let mut resp = Message::query();
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(
        answer_now(&r, &resp.to_vec().unwrap(), Transport::Udp),
        None
    );
    assert!(metrics.render().contains("twill_dns_dropped_total 4"));
    // And the next query is answered.
    let m = ask(&r, "web.demo.svc.cluster.local.", RecordType::A);
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn a_udp_answer_too_big_is_truncated_and_tcp_carries_it_whole() {
    let (r, _) = responder(300);
    let q = query("big.demo.svc.cluster.local.", RecordType::A, false);
    let udp = Message::from_vec(&answer_now(&r, &q, Transport::Udp).unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let tcp = Message::from_vec(&answer_now(&r, &q, Transport::Tcp).unwrap()).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 300);
    // With EDNS the datagram may reach 1232 bytes: 30 records fit, 300 do not.
    let (small, _) = responder(30);
    let q = query("big.demo.svc.cluster.local.", RecordType::A, true);
    let udp = Message::from_vec(&answer_now(&small, &q, Transport::Udp).unwrap()).unwrap();
    assert!(!udp.metadata.truncation);
    assert_eq!(udp.answers.len(), 30);
    assert!(udp.edns.is_some());
}

#[test]
fn negative_answers_carry_the_zone_soa_with_the_negative_ttl() {
    let (r, _) = responder(1);
    for (name, t, rcode) in [
        (
            "nope.demo.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.demo.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
    ] {
        let m = ask(&r, name, t);
        assert_eq!(m.metadata.response_code, rcode, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        let [soa] = m.authorities.as_slice() else {
            panic!("{name}: authorities {:?}", m.authorities);
        };
        assert_eq!(soa.name.to_ascii(), "cluster.local.");
        assert_eq!(soa.ttl, 5);
        let WireData::SOA(data) = &soa.data else {
            panic!("{name}: not an SOA: {soa:?}");
        };
        assert_eq!(data.minimum, 5);
        assert_eq!(data.mname.to_ascii(), "ns.dns.cluster.local.");
    }
    // A positive answer has no authority section.
    assert!(
        ask(&r, "web.demo.svc.cluster.local.", RecordType::A)
            .authorities
            .is_empty()
    );
}

/// Serves `r` on loopback (UDP and TCP on one port) and returns the address.
async fn serve_on_loopback(r: Arc<DnsResponder>) -> std::net::SocketAddr {
    // TCP first: its port is then free for UDP too almost always; retry otherwise.
    for _ in 0..20 {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        if let Ok(udp) = tokio::net::UdpSocket::bind(addr).await {
            tokio::spawn(super::serve_udp(r.clone(), Arc::new(udp)));
            tokio::spawn(super::serve_tcp(r, tcp));
            return addr;
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

/// A front responder (cluster.local) forwarding to an upstream responder serving
/// `upstream.test` on loopback.
async fn forwarding_pair(endpoints: usize) -> (Arc<DnsResponder>, Arc<Metrics>) {
    let (upstream, _) = responder_in("upstream.test", endpoints);
    let addr = serve_on_loopback(upstream).await;
    let (front, metrics) = responder(1);
    front.set_forwarder(super::Forwarder::new(vec![addr], metrics.dns_forward.clone()).unwrap());
    (front, metrics)
}

async fn ask_async(r: &DnsResponder, name: &str, t: RecordType, transport: Transport) -> Message {
    Message::from_vec(&r.answer(&query(name, t, false), transport).await.unwrap()).unwrap()
}

#[tokio::test]
async fn out_of_zone_names_are_forwarded_and_the_second_answer_comes_from_the_cache() {
    let (front, metrics) = forwarding_pair(1).await;
    let name = "web.demo.svc.upstream.test.";
    let m = ask_async(&front, name, RecordType::A, Transport::Udp).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(
        m.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
        [WireData::A(Ipv4Addr::new(10, 96, 0, 10).into())]
    );
    assert_eq!(metrics.dns_forward.hits(), 0);
    let again = ask_async(&front, name, RecordType::A, Transport::Udp).await;
    assert_eq!(again.answers.len(), 1);
    assert!(again.answers[0].ttl <= 30);
    assert_eq!(metrics.dns_forward.hits(), 1);
    let text = metrics.render();
    assert!(
        text.contains("twill_dns_forward_cache_total{result=\"miss\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("twill_dns_upstream_duration_seconds_count 1"),
        "{text}"
    );
    // The cluster's own names never go upstream.
    let _ = ask_async(
        &front,
        "web.demo.svc.cluster.local.",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    assert!(
        metrics
            .render()
            .contains("twill_dns_forward_cache_total{result=\"miss\"} 1")
    );
    // `debug dns` shows what the cache holds of a forwarded name.
    let d = front.debug(name, "A");
    assert_eq!(d.result, "out of zone (forwarded upstream; cached)");
    assert_eq!(d.records, ["rcode NOERROR", "A 10.96.0.10"]);
}

#[tokio::test]
async fn upstream_nxdomain_and_nodata_are_relayed_with_their_soa_and_cached() {
    let (front, metrics) = forwarding_pair(1).await;
    for (name, t, rcode) in [
        (
            "nope.demo.svc.upstream.test.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.demo.svc.upstream.test.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
    ] {
        for round in 0..2 {
            let m = ask_async(&front, name, t, Transport::Udp).await;
            assert_eq!(m.metadata.response_code, rcode, "{name} round {round}");
            assert!(m.answers.is_empty());
            assert!(
                matches!(m.authorities.as_slice(), [soa] if soa.record_type() == RecordType::SOA),
                "{name}: {:?}",
                m.authorities
            );
        }
    }
    assert_eq!(metrics.dns_forward.hits(), 2);
}

#[tokio::test]
async fn a_truncated_upstream_answer_is_fetched_over_tcp_and_truncated_again_for_a_udp_client() {
    // 300 addresses do not fit the upstream's UDP answer: the forwarder must retry over TCP.
    let (front, _) = forwarding_pair(300).await;
    let name = "big.demo.svc.upstream.test.";
    let tcp = ask_async(&front, name, RecordType::A, Transport::Tcp).await;
    assert_eq!(tcp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(tcp.answers.len(), 300);
    let udp = ask_async(&front, name, RecordType::A, Transport::Udp).await;
    assert!(udp.metadata.truncation);
}

#[tokio::test]
async fn an_unreachable_upstream_is_servfail_and_not_cached() {
    // A port nothing listens on (bound, then closed).
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (front, metrics) = responder(1);
    front.set_forwarder(super::Forwarder::new(vec![addr], metrics.dns_forward.clone()).unwrap());
    for _ in 0..2 {
        let m = ask_async(&front, "example.test.", RecordType::A, Transport::Udp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    assert_eq!(metrics.dns_forward.hits(), 0);
}

#[test]
fn upstreams_come_from_resolv_conf_without_the_responders_own_address() {
    use crate::config::DnsUpstream;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        "search example.test\nnameserver 169.254.20.10\nnameserver 10.0.0.2\noptions ndots:5\n",
    )
    .unwrap();
    let own = "169.254.20.10:53".parse().ok();
    assert_eq!(
        super::forward::upstream_servers(&DnsUpstream::ResolvConf(path.clone()), own).unwrap(),
        Some(vec!["10.0.0.2:53".parse().unwrap()])
    );
    std::fs::write(&path, "nameserver 169.254.20.10\n").unwrap();
    assert!(matches!(
        super::forward::upstream_servers(&DnsUpstream::ResolvConf(path), own),
        Err(super::forward::ForwardError::NoServers)
    ));
    assert_eq!(
        super::forward::upstream_servers(&DnsUpstream::None, own).unwrap(),
        None
    );
}

#[tokio::test]
async fn an_external_name_a_question_gets_the_cname_and_the_targets_addresses_from_upstream() {
    let (upstream, _) = responder_in("upstream.test", 1);
    let addr = serve_on_loopback(upstream).await;
    let ext: Service = serde_yaml::from_str(
        "metadata: {name: ext, namespace: demo}\n\
         spec: {type: ExternalName, externalName: web.demo.svc.upstream.test}",
    )
    .unwrap();
    let mut table = DnsTable::new("cluster.local");
    table.update(&[ServiceGroup {
        namespace: "demo".into(),
        name: "ext".into(),
        service: Some(Arc::new(ServiceInput::parse(
            &ext,
            &mut Interner::default(),
        ))),
        slices: vec![],
    }]);
    let metrics = Arc::new(Metrics::new());
    let front = DnsResponder::new(30, metrics.clone());
    front.publish(Arc::new(table));
    let name = "ext.demo.svc.cluster.local.";
    // Without an upstream: the CNAME alone.
    let m = ask_async(&front, name, RecordType::A, Transport::Udp).await;
    assert_eq!(m.answers.len(), 1);
    front.set_forwarder(super::Forwarder::new(vec![addr], metrics.dns_forward.clone()).unwrap());
    let m = ask_async(&front, name, RecordType::A, Transport::Udp).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let got: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
        .collect();
    assert_eq!(
        got,
        [
            "ext.demo.svc.cluster.local. CNAME web.demo.svc.upstream.test.",
            "web.demo.svc.upstream.test. A 10.96.0.10",
        ]
    );
    // A CNAME question is answered from the table alone.
    let m = ask_async(&front, name, RecordType::CNAME, Transport::Udp).await;
    assert_eq!(m.answers.len(), 1);
}
