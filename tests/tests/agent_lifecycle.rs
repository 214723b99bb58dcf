//! Lab e2e of the agent through Service lifecycles: type changes applied live, an established
//! connection across agent restarts, and connected UDP clients cut from a removed backend.
mod agent_common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use agent_common::{
    ready, service, slice, start_agent, tcp, wait_for, wait_tcp_reply, web_and_client, web_manifest,
};
use anyhow::{Context as _, Result, ensure};
use twill_lab::{LabSpec, manifests, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// In the lab's IPv6 Service range.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x40);

/// "should be able to change the type from ExternalName to ClusterIP", "... from ClusterIP to
/// NodePort", "... from NodePort to ExternalName": each edit is applied live, and a NodePort
/// is released when the Service stops being one.
#[test]
fn should_be_able_to_change_the_type_externalname_clusterip_nodeport_and_back() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = web_and_client(&lab)?;
    let eps = slice(
        "web",
        "web-1",
        &[ready(web.ip, &n0.name)],
        &[("http", 8080, "TCP")],
    );
    let external_name = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
                         spec:\n  type: ExternalName\n  externalName: web.example.invalid\n";
    lab.apply_manifest("web.yaml", &format!("{external_name}---\n{eps}"))?;
    let _agent = start_agent(&lab, 0, &[])?;
    let vip = format!("{VIP}:80");
    let node_port = format!("{}:30040", n0.ip);
    let (code, out) = tcp(&client, &vip)?;
    ensure!(code != 0, "ExternalName must program nothing: {out}");

    lab.apply_manifest(
        "web.yaml",
        &format!(
            "{}---\n{eps}",
            service("web", VIP, &[("http", 80, 8080, "TCP")], "", &[])
        ),
    )?;
    wait_tcp_reply(&client, &vip, "web0")?;

    let np_manifest = service("web", VIP, &[("http", 80, 8080, "TCP")], "", &[])
        .replace("type: ClusterIP", "type: NodePort")
        .replace("protocol: TCP", "protocol: TCP\n    nodePort: 30040");
    lab.apply_manifest("web.yaml", &format!("{np_manifest}---\n{eps}"))?;
    wait_tcp_reply(&client, &node_port, "web0")?;
    wait_tcp_reply(&client, &vip, "web0")?;

    lab.apply_manifest("web.yaml", &format!("{external_name}---\n{eps}"))?;
    wait_for(
        "ClusterIP and NodePort gone",
        Duration::from_secs(20),
        || Ok(tcp(&client, &vip)?.0 != 0 && tcp(&client, &node_port)?.0 != 0),
    )?;
    Ok(())
}

/// An established connection through a ClusterIP keeps working while the agent is stopped and
/// across five restarts (socket-level LB translated it once, at connect).
#[test]
fn an_established_connection_survives_agent_restarts() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (web, client) = web_and_client(&lab)?;
    lab.apply_manifest("web.yaml", &web_manifest(VIP, &web, &n0.name))?;
    let mut agent = start_agent(&lab, 0, &[])?;
    let vip = format!("{VIP}:80");
    wait_tcp_reply(&client, &vip, "web0")?;
    // socat holds one TCP connection; labtool's server answers every "again" line on it.
    let (mut conn, mut stdin, mut replies) = socat(&client, &format!("TCP4:{vip}"))?;
    let mut ask = |when: &str| -> Result<()> {
        stdin.write_all(b"again\n")?;
        let line = replies
            .next()
            .with_context(|| format!("connection closed {when}"))??;
        // The server's raw reply: "<name> <peer>".
        ensure!(line.starts_with("web0 "), "{when}: {line}");
        Ok(())
    };
    ask("before any restart")?;
    for i in 0..5 {
        agent.stop()?;
        ask(&format!("while the agent is stopped ({i})"))?;
        agent.restart()?;
        agent_common::wait_agent_ready(n0, &mut agent)?;
        ask(&format!("after restart {i}"))?;
    }
    drop(stdin);
    let _ = conn.kill();
    let _ = conn.wait();
    Ok(())
}

/// A connected UDP client (socat keeps one socket) is cut when its backend leaves the
/// EndpointSlice: the agent destroys the socket, so the application sees an error and
/// reconnects instead of sending into a gone pod forever (kubernetes #19029).
#[test]
fn connected_udp_clients_are_cut_from_a_removed_backend() -> Result<()> {
    connected_udp_clients_are_cut(false)
}

/// The same for an AF_INET6 client of an IPv6 ClusterIP in a dual-stack lab: the socket is
/// connected to the IPv6 backend, and destroyed through `sock_diag` (the iterator reads IPv4
/// peers only).
#[test]
fn connected_ipv6_udp_clients_are_cut_from_a_removed_backend() -> Result<()> {
    connected_udp_clients_are_cut(true)
}

fn connected_udp_clients_are_cut(ipv6: bool) -> Result<()> {
    let spec = if ipv6 {
        LabSpec::nodes(1).with_dual_stack()
    } else {
        LabSpec::nodes(1)
    };
    let Some(lab) = require(spec)? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let b0 = n0.add_pod("be0")?;
    let b1 = n0.add_pod("be1")?;
    let client = n0.add_pod("client")?;
    let addr = |pod: &twill_lab::Pod| -> Result<IpAddr> {
        if ipv6 {
            Ok(IpAddr::V6(pod.ip6.context("no IPv6 address")?))
        } else {
            Ok(IpAddr::V4(pod.ip))
        }
    };
    let vip = if ipv6 {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    for (pod, name) in [(&b0, "be0"), (&b1, "be1")] {
        lab.serve_dual(pod, name, None, Some(5353))?;
    }
    let svc = manifests::service(
        "default",
        "dns",
        &[vip],
        "SingleStack",
        &[("dns", 53, 5353, "UDP")],
    );
    let slice_of = |pods: &[&twill_lab::Pod]| -> Result<String> {
        let eps = pods
            .iter()
            .map(|p| Ok((addr(p)?, n0.name.as_str())))
            .collect::<Result<Vec<_>>>()?;
        Ok(manifests::endpoint_slice(
            "default",
            "dns",
            "dns-1",
            &eps,
            &[("dns", 5353, "UDP")],
        ))
    };
    lab.apply_manifest("dns.yaml", &format!("{svc}---\n{}", slice_of(&[&b0, &b1])?))?;
    let _agent = start_agent(&lab, 0, &[])?;
    let to = SocketAddr::new(vip, 53).to_string();
    wait_for("UDP via the ClusterIP", Duration::from_secs(20), || {
        Ok(agent_common::udp(&client, &to, false)?.0 == 0)
    })?;
    let socat_addr = if ipv6 {
        format!("UDP6:{to}")
    } else {
        format!("UDP4:{to}")
    };
    let (mut udp_client, mut stdin, mut lines) = socat(&client, &socat_addr)?;
    stdin.write_all(b"hi\n")?;
    let first = lines.next().context("no UDP reply")??;
    // The server's raw reply: "<name> <peer>".
    let chosen = first.split_whitespace().next().unwrap_or_default();
    ensure!(
        chosen == "be0" || chosen == "be1",
        "unexpected reply {first}"
    );
    let (gone, stays) = if chosen == "be0" {
        (&b0, &b1)
    } else {
        (&b1, &b0)
    };
    lab.apply_manifest("dns.yaml", &format!("{svc}---\n{}", slice_of(&[stays])?))?;
    let status = wait_for_exit(&mut udp_client, &mut stdin)?;
    ensure!(
        !status.success(),
        "the connected UDP socket to removed backend {} kept working",
        addr(gone)?
    );
    Ok(())
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// `socat - <address>` in `pod`: one socket kept open, each stdin line sent on it, each
/// received line on stdout.
fn socat(
    pod: &twill_lab::Pod,
    address: &str,
) -> Result<(std::process::Child, std::process::ChildStdin, Lines)> {
    let mut child = pod
        .cmd("socat")
        .args(["-T", "60", "-", address])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("socat (Debian package socat)")?;
    let stdin = child.stdin.take().context("stdin")?;
    let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    Ok((child, stdin, lines))
}

/// Keeps sending on the socket (a destroyed socket fails its next send) until socat exits,
/// bounded.
fn wait_for_exit(
    child: &mut std::process::Child,
    stdin: &mut std::process::ChildStdin,
) -> Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "socat still running 20 s after its backend was removed"
        );
        let _ = stdin.write_all(b"again\n");
        std::thread::sleep(Duration::from_millis(100));
    }
}
