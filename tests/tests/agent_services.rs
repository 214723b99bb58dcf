//! Lab e2e of the agent with the manifests source, each test named after the upstream
//! sig-network `Services` test it mirrors (kubernetes/kubernetes test/e2e/network/service.go).
mod agent_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{
    ready, replier, service, slice, start_agent, tcp, udp, wait_for, wait_tcp_fails,
    wait_tcp_refused, wait_tcp_reply, web_and_client, web_manifest,
};
use anyhow::{Result, ensure};
use twill_lab::{LabSpec, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// "should serve a basic endpoint from pods" (+ "should preserve source pod IP for traffic thru
/// service cluster IP").
#[test]
fn should_serve_a_basic_endpoint_from_pods() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = web_and_client(&lab)?;
    lab.apply_manifest("web.yaml", &web_manifest(VIP, &web, &n0.name))?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    // A JVM-like client (AF_INET6 socket, v4-mapped ClusterIP) is served too and sees the
    // mapped ClusterIP as its peer.
    let (code, out) = tcp(&client, "[::ffff:10.96.0.10]:80")?;
    ensure!(
        code == 0 && replier(&out).as_deref() == Some("web0"),
        "AF_INET6 client via ::ffff:10.96.0.10: {out}"
    );
    ensure!(
        out.contains("peer=[::ffff:10.96.0.10]:80"),
        "the AF_INET6 client does not see the mapped ClusterIP as peer: {out}"
    );
    Ok(())
}

/// "should preserve source pod IP for traffic thru service cluster IP"
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let web = n0.add_pod("web0")?;
    let client = n0.add_pod("client")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", VIP, &[("", 80, 8080, "TCP")], "", &[]),
            slice(
                "web",
                "web-1",
                &[ready(web.ip, &n0.name)],
                &[("", 8080, "TCP")]
            )
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    let (code, out) = tcp(&client, "10.96.0.10:80")?;
    ensure!(code == 0, "{out}");
    ensure!(
        out.contains(&format!("reply=web0 {}:", client.ip)),
        "the server did not see the client pod's IP: {out}"
    );
    // The client sees the ClusterIP as its peer (getpeername4).
    ensure!(
        out.contains("peer=10.96.0.10:80"),
        "the client does not see the ClusterIP as peer: {out}"
    );
    Ok(())
}

/// "should serve multiport endpoints from pods"
#[test]
fn should_serve_multiport_endpoints_from_pods() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (a, b, client) = (n0.add_pod("a")?, n0.add_pod("b")?, n0.add_pod("client")?);
    lab.serve(&a, "a", Some(8080), None)?;
    lab.serve(&b, "b", Some(8081), None)?;
    lab.apply_manifest(
        "multi.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service(
                "multi",
                VIP,
                &[
                    ("portname1", 80, 8080, "TCP"),
                    ("portname2", 81, 8081, "TCP")
                ],
                "",
                &[]
            ),
            slice(
                "multi",
                "multi-a",
                &[ready(a.ip, &n0.name)],
                &[("portname1", 8080, "TCP")]
            ),
            slice(
                "multi",
                "multi-b",
                &[ready(b.ip, &n0.name)],
                &[("portname2", 8081, "TCP")]
            ),
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "a")?;
    wait_tcp_reply(&client, "10.96.0.10:81", "b")?;
    Ok(())
}

/// "should be updated after adding or deleting ports"
#[test]
fn should_be_updated_after_adding_or_deleting_ports() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = (n0.add_pod("web0")?, n0.add_pod("client")?);
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.serve(&web, "web0-b", Some(8081), None)?;
    let eps = [ready(web.ip, &n0.name)];
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("edit", VIP, &[("p1", 80, 8080, "TCP")], "", &[]),
            slice("edit", "edit-1", &eps, &[("p1", 8080, "TCP")])
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    // Add a port.
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service(
                "edit",
                VIP,
                &[("p1", 80, 8080, "TCP"), ("p2", 81, 8081, "TCP")],
                "",
                &[]
            ),
            slice(
                "edit",
                "edit-1",
                &eps,
                &[("p1", 8080, "TCP"), ("p2", 8081, "TCP")]
            )
        ),
    )?;
    wait_tcp_reply(&client, "10.96.0.10:81", "web0-b")?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    // Delete the first port: it stops being served, the second stays.
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("edit", VIP, &[("p2", 81, 8081, "TCP")], "", &[]),
            slice("edit", "edit-1", &eps, &[("p2", 8081, "TCP")])
        ),
    )?;
    wait_tcp_fails(&client, "10.96.0.10:80")?;
    wait_tcp_reply(&client, "10.96.0.10:81", "web0-b")?;
    Ok(())
}

/// "should allow pods to hairpin back to themselves through services"
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let web = n0.add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    lab.apply_manifest(
        "hairpin.yaml",
        &format!(
            "{}---\n{}",
            service("hairpin", VIP, &[("", 8080, 8080, "TCP")], "", &[]),
            slice(
                "hairpin",
                "hairpin-1",
                &[ready(web.ip, &n0.name)],
                &[("", 8080, "TCP")]
            )
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&web, "10.96.0.10:8080", "web0")?;
    let (_, out) = tcp(&web, "10.96.0.10:8080")?;
    ensure!(
        out.contains(&format!("reply=web0 {}:", web.ip)),
        "hairpin reply did not come from the pod itself: {out}"
    );
    Ok(())
}

/// "should be able to up and down services"
#[test]
fn should_be_able_to_up_and_down_services() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (s1, s2, client) = (n0.add_pod("s1")?, n0.add_pod("s2")?, n0.add_pod("client")?);
    lab.serve(&s1, "s1", Some(8080), None)?;
    lab.serve(&s2, "s2", Some(8080), None)?;
    let svc1 = format!(
        "{}---\n{}",
        service("up-down-1", VIP, &[("", 80, 8080, "TCP")], "", &[]),
        slice(
            "up-down-1",
            "up-down-1-a",
            &[ready(s1.ip, &n0.name)],
            &[("", 8080, "TCP")]
        )
    );
    let svc2 = format!(
        "{}---\n{}",
        service("up-down-2", VIP2, &[("", 80, 8080, "TCP")], "", &[]),
        slice(
            "up-down-2",
            "up-down-2-a",
            &[ready(s2.ip, &n0.name)],
            &[("", 8080, "TCP")]
        )
    );
    lab.apply_manifest("svc1.yaml", &svc1)?;
    lab.apply_manifest("svc2.yaml", &svc2)?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "s1")?;
    wait_tcp_reply(&client, "10.96.0.11:80", "s2")?;
    lab.delete_manifest("svc2.yaml")?;
    wait_tcp_fails(&client, "10.96.0.11:80")?;
    wait_tcp_reply(&client, "10.96.0.10:80", "s1")?;
    lab.apply_manifest("svc2.yaml", &svc2)?;
    wait_tcp_reply(&client, "10.96.0.11:80", "s2")?;
    wait_tcp_reply(&client, "10.96.0.10:80", "s1")?;
    Ok(())
}

/// "should work after the service has been recreated"
#[test]
fn should_work_after_the_service_has_been_recreated() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = (n0.add_pod("web0")?, n0.add_pod("client")?);
    lab.serve(&web, "web0", Some(8080), None)?;
    let manifest = format!(
        "{}---\n{}",
        service("recreate", VIP, &[("", 80, 8080, "TCP")], "", &[]),
        slice(
            "recreate",
            "recreate-1",
            &[ready(web.ip, &n0.name)],
            &[("", 8080, "TCP")]
        )
    );
    lab.apply_manifest("svc.yaml", &manifest)?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    lab.delete_manifest("svc.yaml")?;
    wait_tcp_fails(&client, "10.96.0.10:80")?;
    lab.apply_manifest("svc.yaml", &manifest)?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    Ok(())
}

/// "should be rejected when no endpoints exist": refused at once, not timed out.
#[test]
fn should_be_rejected_when_no_endpoints_exist() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let client = n0.add_pod("client")?;
    lab.apply_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service("no-pods", VIP, &[("", 80, 8080, "TCP")], "", &[]),
            slice("no-pods", "no-pods-1", &[], &[("", 8080, "TCP")])
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_refused(&client, "10.96.0.10:80")?;
    let started = std::time::Instant::now();
    let (code, out) = tcp(&client, "10.96.0.10:80")?;
    ensure!(
        code == 2,
        "expected ECONNREFUSED (exit 2), got {code}: {out}"
    );
    ensure!(
        started.elapsed() < Duration::from_millis(900),
        "refusal took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// "should implement service.kubernetes.io/service-proxy-name" and
/// "should implement service.kubernetes.io/headless": labelled Services are not programmed;
/// removing the label programs them.
#[test]
fn should_implement_service_proxy_name_and_headless_labels() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = (n0.add_pod("web0")?, n0.add_pod("client")?);
    lab.serve(&web, "web0", Some(8080), None)?;
    let eps = [ready(web.ip, &n0.name)];
    let with = |name: &str, ip: Ipv4Addr, labels: &[(&str, &str)]| {
        format!(
            "{}---\n{}",
            service(name, ip, &[("", 80, 8080, "TCP")], "", labels),
            slice(name, &format!("{name}-1"), &eps, &[("", 8080, "TCP")])
        )
    };
    lab.apply_manifest(
        "plain.yaml",
        &with("plain", Ipv4Addr::new(10, 96, 0, 12), &[]),
    )?;
    lab.apply_manifest(
        "proxy-name.yaml",
        &with(
            "other-proxy",
            VIP,
            &[("service.kubernetes.io/service-proxy-name", "foo-bar")],
        ),
    )?;
    lab.apply_manifest(
        "headless.yaml",
        &with("headless", VIP2, &[("service.kubernetes.io/headless", "")]),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    // The unlabelled one works, so the agent has applied everything.
    wait_tcp_reply(&client, "10.96.0.12:80", "web0")?;
    ensure!(
        tcp(&client, "10.96.0.10:80")?.0 != 0,
        "service-proxy-name labelled Service is served"
    );
    ensure!(
        tcp(&client, "10.96.0.11:80")?.0 != 0,
        "headless labelled Service is served"
    );
    // Toggle the labels off.
    lab.apply_manifest("proxy-name.yaml", &with("other-proxy", VIP, &[]))?;
    lab.apply_manifest("headless.yaml", &with("headless", VIP2, &[]))?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    wait_tcp_reply(&client, "10.96.0.11:80", "web0")?;
    // And on again.
    lab.apply_manifest(
        "headless.yaml",
        &with("headless", VIP2, &[("service.kubernetes.io/headless", "")]),
    )?;
    wait_tcp_fails(&client, "10.96.0.11:80")?;
    Ok(())
}

/// "should serve a basic endpoint from pods" for UDP and TCP on the same port number
/// ("same port number but different protocols").
#[test]
fn should_be_able_to_use_same_port_number_with_different_protocols() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (t, u, client) = (n0.add_pod("t")?, n0.add_pod("u")?, n0.add_pod("client")?);
    lab.serve(&t, "tcp-server", Some(5353), None)?;
    lab.serve(&u, "udp-server", None, Some(5353))?;
    lab.apply_manifest(
        "dns.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service(
                "dns",
                VIP,
                &[("dns-tcp", 53, 5353, "TCP"), ("dns-udp", 53, 5353, "UDP")],
                "",
                &[]
            ),
            slice(
                "dns",
                "dns-tcp",
                &[ready(t.ip, &n0.name)],
                &[("dns-tcp", 5353, "TCP")]
            ),
            slice(
                "dns",
                "dns-udp",
                &[ready(u.ip, &n0.name)],
                &[("dns-udp", 5353, "UDP")]
            ),
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:53", "tcp-server")?;
    for connected in [false, true] {
        wait_for("UDP reply from udp-server", Duration::from_secs(20), || {
            let (code, out) = udp(&client, "10.96.0.10:53", connected)?;
            // Unconnected clients (the DNS pattern) must see the reply come from the ClusterIP.
            Ok(code == 0
                && replier(&out).as_deref() == Some("udp-server")
                && out.contains("from=10.96.0.10:53"))
        })?;
    }
    Ok(())
}

/// "should have working kube-proxy URLs": /healthz (lastUpdated), /livez, /metrics; a Node being
/// deleted fails /healthz but not /livez.
#[test]
fn should_check_kube_proxy_urls() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let _agent = start_agent(&lab, 0, &[])?;
    let get = |port: &str, path: &str| -> Result<(String, String)> {
        let (code, out) =
            n0.labtool(&["http", "--to", &format!("127.0.0.1:{port}"), "--path", path])?;
        ensure!(code == 0, "GET {path}: {out}");
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        Ok((
            status.trim_start_matches("status=").to_owned(),
            body.to_owned(),
        ))
    };
    wait_for("/healthz 200", Duration::from_secs(20), || {
        Ok(get("10256", "/healthz")?.0 == "200")
    })?;
    let (_, body) = get("10256", "/healthz")?;
    let v: serde_json::Value = serde_json::from_str(body.trim())?;
    ensure!(
        v["lastUpdated"]
            .as_str()
            .is_some_and(|s| !s.starts_with("0001")),
        "{v}"
    );
    ensure!(
        v["currentTime"].is_string() && v["nodeEligible"] == true,
        "{v}"
    );
    ensure!(get("10256", "/livez")?.0 == "200");
    let (status, metrics) = get("10249", "/metrics")?;
    ensure!(status == "200");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_network_programming_duration_seconds",
        "twill_services",
    ] {
        ensure!(metrics.contains(name), "{name} missing from /metrics");
    }
    // The node gets a deletionTimestamp: /healthz 503 (nodeEligible false), /livez still 200.
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n0.name,
        "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"podCIDRs": [n0.pod_cidr.to_string()]}});
    lab.apply_manifest("zz-node-deleting.json", &node.to_string())?;
    wait_for("/healthz 503", Duration::from_secs(20), || {
        Ok(get("10256", "/healthz")?.0 == "503")
    })?;
    let v: serde_json::Value = serde_json::from_str(get("10256", "/healthz")?.1.trim())?;
    ensure!(v["nodeEligible"] == false, "{v}");
    ensure!(get("10256", "/livez")?.0 == "200");
    Ok(())
}

/// Invalid objects are logged, counted (`twill_invalid_objects_total`) and skipped; a broken
/// manifest file is counted and its last good objects stay served; everything else keeps
/// working.
#[test]
fn should_skip_invalid_objects_and_keep_serving_the_rest() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = (n0.add_pod("web0")?, n0.add_pod("client")?);
    lab.serve(&web, "web0", Some(8080), None)?;
    let good = format!(
        "{}---\n{}",
        service("good", VIP, &[("", 80, 8080, "TCP")], "", &[]),
        slice(
            "good",
            "good-1",
            &[ready(web.ip, &n0.name)],
            &[("", 8080, "TCP")]
        )
    );
    lab.apply_manifest("good.yaml", &good)?;
    lab.apply_manifest(
        "bad.yaml",
        &service("bad", VIP2, &[("", 80, 8080, "TCP")], "", &[])
            .replace("10.96.0.11", "10.96.0.300"),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    let metrics = || -> Result<String> {
        let (code, out) = n0.labtool(&["http", "--to", "127.0.0.1:10249", "--path", "/metrics"])?;
        ensure!(code == 0, "{out}");
        Ok(out)
    };
    wait_for("invalid object counted", Duration::from_secs(20), || {
        Ok(
            metrics()?
                .contains("twill_invalid_objects_total{kind=\"Service\",reason=\"bad_ip\"} 1"),
        )
    })?;
    // A broken edit of good.yaml: counted, and the Service keeps being served.
    lab.apply_manifest(
        "good.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [broken\n",
    )?;
    wait_for("manifest error counted", Duration::from_secs(20), || {
        Ok(metrics()?.contains("twill_manifest_errors_total 1"))
    })?;
    wait_tcp_reply(&client, "10.96.0.10:80", "web0")?;
    Ok(())
}
