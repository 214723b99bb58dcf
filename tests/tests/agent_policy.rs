//! Lab e2e: traffic policies and endpoint conditions (sig-network "should respect
//! internalTrafficPolicy=Local Pod to Pod", "should fallback to terminating endpoints when there
//! are no ready endpoints", conntrack.go "should be able to preserve UDP traffic when server pod
//! cycles for a ClusterIP service").
mod agent_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{
    Ep, ready, replier, repliers, service, slice, start_agent, udp, wait_for, wait_tcp_refused,
    wait_tcp_reply,
};
use anyhow::{Result, ensure};
use twill_lab::{LabSpec, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 10);
const TO: &str = "10.96.2.10:80";

#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (local, client) = (n0.add_pod("local")?, n0.add_pod("client")?);
    lab.serve(&local, "local", Some(8080), None)?;
    // A second endpoint on another node (an address nothing answers on): with Cluster policy
    // some connections would go there and fail; with Local none may.
    let remote: Ep<'_> = (
        Ipv4Addr::new(10, 244, 200, 7),
        "elsewhere",
        true,
        true,
        false,
    );
    let eps = [ready(local.ip, &n0.name), remote];
    lab.apply_manifest(
        "itp.yaml",
        &format!(
            "{}---\n{}",
            service(
                "itp",
                VIP,
                &[("", 80, 8080, "TCP")],
                "  internalTrafficPolicy: Local\n",
                &[]
            ),
            slice("itp", "itp-1", &eps, &[("", 8080, "TCP")])
        ),
    )?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, TO, "local")?;
    let seen = repliers(&client, TO, 40)?;
    ensure!(seen.keys().collect::<Vec<_>>() == ["local"], "{seen:?}");
    // Only the remote endpoint left: no local endpoint, nothing to connect to.
    lab.apply_manifest(
        "itp.yaml",
        &format!(
            "{}---\n{}",
            service(
                "itp",
                VIP,
                &[("", 80, 8080, "TCP")],
                "  internalTrafficPolicy: Local\n",
                &[]
            ),
            slice("itp", "itp-1", &[remote], &[("", 8080, "TCP")])
        ),
    )?;
    wait_for(
        "no local endpoint: connections fail",
        Duration::from_secs(10),
        || Ok(agent_common::tcp(&client, TO)?.0 != 0),
    )?;
    Ok(())
}

#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (a, b, client) = (n0.add_pod("a")?, n0.add_pod("b")?, n0.add_pod("client")?);
    lab.serve(&a, "a", Some(8080), None)?;
    lab.serve(&b, "b", Some(8080), None)?;
    let write = |eps: &[Ep<'_>]| {
        lab.apply_manifest(
            "term.yaml",
            &format!(
                "{}---\n{}",
                service("term", VIP, &[("", 80, 8080, "TCP")], "", &[]),
                slice("term", "term-1", eps, &[("", 8080, "TCP")])
            ),
        )
    };
    // a ready, b serving+terminating: only a.
    let terminating = |ip| -> Ep<'_> { (ip, &n0.name, false, true, true) };
    write(&[ready(a.ip, &n0.name), terminating(b.ip)])?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_tcp_reply(&client, TO, "a")?;
    let seen = repliers(&client, TO, 30)?;
    ensure!(
        seen.keys().collect::<Vec<_>>() == ["a"],
        "terminating endpoint used while a ready one exists: {seen:?}"
    );
    // Both terminating but serving: fall back to them (KEP-1669).
    write(&[terminating(a.ip), terminating(b.ip)])?;
    wait_for(
        "fallback to both terminating endpoints",
        Duration::from_secs(10),
        || Ok(repliers(&client, TO, 40)?.len() == 2),
    )?;
    // Terminating and not serving: nothing usable, refused.
    write(&[(a.ip, &n0.name, false, false, true)])?;
    wait_tcp_refused(&client, TO)?;
    Ok(())
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service()
-> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (s1, client) = (n0.add_pod("udp1")?, n0.add_pod("client")?);
    lab.serve(&s1, "udp1", None, Some(5353))?;
    let write = |ip| {
        lab.apply_manifest(
            "udp.yaml",
            &format!(
                "{}---\n{}",
                service("udp", VIP, &[("", 80, 5353, "UDP")], "", &[]),
                slice("udp", "udp-1", &[ready(ip, &n0.name)], &[("", 5353, "UDP")])
            ),
        )
    };
    write(s1.ip)?;
    let _agent = start_agent(&lab, 0, &[])?;
    for connected in [false, true] {
        wait_for("reply from udp1", Duration::from_secs(20), || {
            let (code, out) = udp(&client, TO, connected)?;
            Ok(code == 0 && replier(&out).as_deref() == Some("udp1"))
        })?;
    }
    // The server pod is replaced by one with another IP.
    n0.del_pod(&s1)?;
    let s2 = n0.add_pod("udp2")?;
    lab.serve(&s2, "udp2", None, Some(5353))?;
    write(s2.ip)?;
    for connected in [false, true] {
        wait_for("reply from udp2", Duration::from_secs(20), || {
            let (code, out) = udp(&client, TO, connected)?;
            Ok(code == 0
                && replier(&out).as_deref() == Some("udp2")
                && out.contains("from=10.96.2.10:80"))
        })?;
    }
    Ok(())
}

/// "should fail health check node port if there are only terminating endpoints": the
/// healthCheckNodePort of an externalTrafficPolicy=Local Service answers kube-proxy's JSON, 200
/// with ready local endpoints, 503 when only terminating ones are left.
#[test]
fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let web = n0.add_pod("web0")?;
    lab.serve(&web, "web0", Some(8080), None)?;
    let write = |ep: Ep<'_>| {
        lab.apply_manifest(
            "lb.yaml",
            &format!(
                "{}---\n{}",
                service(
                    "lb",
                    VIP,
                    &[("", 80, 8080, "TCP")],
                    "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
                    &[]
                )
                .replace("type: ClusterIP", "type: LoadBalancer")
                .replace(
                    "    protocol: TCP",
                    "    protocol: TCP\n    nodePort: 30080"
                ),
                slice("lb", "lb-1", &[ep], &[("", 8080, "TCP")])
            ),
        )
    };
    write(ready(web.ip, &n0.name))?;
    let _agent = start_agent(&lab, 0, &[])?;
    let get = || -> Result<(String, serde_json::Value)> {
        let (code, out) = n0.labtool(&["http", "--to", "127.0.0.1:32100", "--path", "/"])?;
        ensure!(code == 0, "{out}");
        let (status, body) = out.split_once('\n').unwrap_or((&out, "{}"));
        Ok((
            status.trim_start_matches("status=").to_owned(),
            serde_json::from_str(body.trim())?,
        ))
    };
    wait_for(
        "health check node port 200",
        Duration::from_secs(20),
        || Ok(get()?.0 == "200"),
    )?;
    let (_, body) = get()?;
    ensure!(
        body == serde_json::json!({"service": {"namespace": "default", "name": "lb"}, "localEndpoints": 1,
            "serviceProxyHealthy": true}),
        "{body}"
    );
    write((web.ip, &n0.name, false, true, true))?;
    wait_for(
        "health check node port 503",
        Duration::from_secs(20),
        || Ok(get()?.0 == "503"),
    )?;
    ensure!(get()?.1["localEndpoints"] == 0);
    Ok(())
}
