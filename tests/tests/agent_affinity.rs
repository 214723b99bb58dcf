//! Lab e2e: session affinity (sig-network "should have session affinity work for service with
//! type clusterIP", "... timeout work ...", "should be able to switch session affinity").
mod agent_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use agent_common::{
    ready, replier, repliers, service, slice, start_agent, tcp, wait_for, wait_tcp_reply,
};
use anyhow::{Result, ensure};
use twill_lab::{Lab, LabSpec, Pod, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const TO: &str = "10.96.1.10:80";

/// Two backends `b0`, `b1` and a client; returns (client, manifest writer).
fn setup(lab: &Lab) -> Result<(Pod, Vec<Pod>)> {
    let n0 = lab.node(0);
    let b0 = n0.add_pod("b0")?;
    let b1 = n0.add_pod("b1")?;
    let client = n0.add_pod("client")?;
    lab.serve(&b0, "b0", Some(8080), None)?;
    lab.serve(&b1, "b1", Some(8080), None)?;
    Ok((client, vec![b0, b1]))
}

fn write(lab: &Lab, backends: &[Pod], affinity: &str) -> Result<()> {
    let node = &lab.node(0).name;
    let eps: Vec<_> = backends.iter().map(|p| ready(p.ip, node)).collect();
    lab.apply_manifest(
        "aff.yaml",
        &format!(
            "{}---\n{}",
            service("aff", VIP, &[("", 80, 8080, "TCP")], affinity, &[]),
            slice("aff", "aff-1", &eps, &[("", 8080, "TCP")])
        ),
    )
}

const CLIENT_IP: &str = "  sessionAffinity: ClientIP\n";

fn client_ip_timeout(s: u32) -> String {
    format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {s}\n"
    )
}

/// Waits until both backends answer within 60 requests (no affinity).
fn wait_distributed(client: &Pod) -> Result<()> {
    wait_for("both backends answering", Duration::from_secs(20), || {
        Ok(repliers(client, TO, 60)?.len() == 2)
    })
}

#[test]
fn should_have_session_affinity_work_for_service_with_type_clusterip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (client, backends) = setup(&lab)?;
    write(&lab, &backends, CLIENT_IP)?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_for("service up", Duration::from_secs(20), || {
        Ok(tcp(&client, TO)?.0 == 0)
    })?;
    let seen = repliers(&client, TO, 50)?;
    ensure!(seen.len() == 1, "affinity broken: {seen:?}");
    Ok(())
}

#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_clusterip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (client, backends) = setup(&lab)?;
    write(&lab, &backends, &client_ip_timeout(1))?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_for("service up", Duration::from_secs(20), || {
        Ok(tcp(&client, TO)?.0 == 0)
    })?;
    // Within the timeout: sticky.
    let seen = repliers(&client, TO, 20)?;
    ensure!(
        seen.len() == 1,
        "affinity broken within the timeout: {seen:?}"
    );
    let first = seen.keys().next().cloned().unwrap_or_default();
    // After the timeout the choice is random again: within 20 tries spaced beyond the timeout
    // the other backend shows up (a false failure has probability 2^-20).
    let mut other = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1300));
        let (code, out) = tcp(&client, TO)?;
        ensure!(code == 0, "{out}");
        if replier(&out).is_some_and(|r| r != first) {
            other = true;
            break;
        }
    }
    ensure!(other, "affinity did not expire after timeoutSeconds=1");
    Ok(())
}

#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let (client, backends) = setup(&lab)?;
    write(&lab, &backends, "")?;
    let _agent = start_agent(&lab, 0, &[])?;
    wait_distributed(&client)?;
    write(&lab, &backends, CLIENT_IP)?;
    wait_for("affinity on", Duration::from_secs(20), || {
        Ok(repliers(&client, TO, 30)?.len() == 1)
    })?;
    write(&lab, &backends, "")?;
    wait_distributed(&client)?;
    let _ = wait_tcp_reply;
    Ok(())
}
