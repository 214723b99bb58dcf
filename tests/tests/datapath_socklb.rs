//! Socket-level load balancing on real traffic: the kernel programs loaded and attached to a lab
//! node's cgroup by `twill_agent::datapath`, the maps programmed through `AyaLbMaps` directly (no
//! agent), and pods created by the real twill-cni talking through ClusterIPs with `labtool`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use twill_agent::{
    datapath::{
        AttachOutcome, AyaLbMaps, Datapath, DatapathOptions, DestroyMethod, MapSizes,
        SOCK_PROGRAMS, SockDestroyMode, monotonic_now_ns,
    },
    lbmap::{LbMaps, MapError, MapKind},
};
use twill_common::{
    Backend, PROTO_TCP, PROTO_UDP, Reason, SCOPE_ANY, SVC_F_AFFINITY, SVC_F_CLUSTER_IP,
    SVC_F_NODEPORT, ServiceKey, ServiceValue, SlotKey, UDP_FLOW_TIMEOUT_S,
};
use twill_lab::{Lab, LabSpec, Node, Pod, addr_be as be, replier, require, wait_for};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Programs one frontend `vip:port/proto` with `backends` (ids `svc_id * 100 + i`).
fn program(
    maps: &mut AyaLbMaps,
    svc_id: u32,
    frontend: (Ipv4Addr, u16, u8),
    backends: &[(Ipv4Addr, u16)],
    flags: u16,
    affinity_timeout_s: u32,
) -> Result<()> {
    let (addr, port, proto) = frontend;
    for (i, (ip, p)) in backends.iter().enumerate() {
        let id = svc_id * 100 + u32::try_from(i)?;
        maps.upsert_backend(
            id,
            Backend {
                addr_be: be(*ip),
                port_be: p.to_be(),
                proto,
                flags: 0,
            },
        )?;
        maps.upsert_slot(
            SlotKey {
                svc_id,
                slot: u32::try_from(i)?,
            },
            id,
        )?;
    }
    let key = ServiceKey {
        addr_be: be(addr),
        port_be: port.to_be(),
        proto,
        scope: SCOPE_ANY,
    };
    let value = ServiceValue {
        svc_id,
        backend_count: u16::try_from(backends.len())?,
        flags: flags
            | if addr == Ipv4Addr::UNSPECIFIED {
                SVC_F_NODEPORT
            } else {
                SVC_F_CLUSTER_IP
            },
        affinity_timeout_s,
        maglev_size: 0,
    };
    maps.upsert_service(key, value)?;
    Ok(())
}

/// A lab with one node, the datapath attached to its cgroup, a client pod and `n` backend pods
/// serving TCP 8080 and UDP 5353 under the names `be0`, `be1`, ….
struct Setup {
    lab: Lab,
    dp: Datapath,
    maps: AyaLbMaps,
    client: Pod,
    backends: Vec<Pod>,
}

fn setup(n: usize, opts: impl FnOnce(&Node) -> DatapathOptions) -> Result<Option<Setup>> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(None);
    };
    let node = lab.node(0);
    let mut dp = Datapath::load(&opts(node))?;
    dp.attach_cgroup(&node.cgroup)?;
    let maps = dp.lb_maps()?;
    let client = node.add_pod("client")?;
    let mut backends = Vec::new();
    for i in 0..n {
        let pod = node.add_pod(&format!("be{i}"))?;
        lab.serve(&pod, &format!("be{i}"), Some(8080), Some(5353))?;
        backends.push(pod);
    }
    Ok(Some(Setup {
        lab,
        dp,
        maps,
        client,
        backends,
    }))
}

fn ips(pods: &[Pod]) -> Vec<(Ipv4Addr, u16)> {
    pods.iter().map(|p| (p.ip, 8080)).collect()
}

fn udp_ips(pods: &[Pod]) -> Vec<(Ipv4Addr, u16)> {
    pods.iter().map(|p| (p.ip, 5353)).collect()
}

/// Parses `labtool tcp-loop`/`udp-loop` JSON into (ok, failures, counts per backend).
fn loop_counts(out: &str) -> Result<(u64, u64, BTreeMap<String, u64>)> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("loop output {out}"))?;
    let counts = v["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        v["ok"].as_u64().unwrap_or(0),
        v["failures"].as_u64().unwrap_or(0),
        counts,
    ))
}

/// Writes the node's network-namespace cookie into the datapath config, as the agent does at
/// start: loopback NodePorts are translated only there.
fn set_host_netns(maps: &mut AyaLbMaps, node: &Node) -> Result<()> {
    let (code, out) = node.labtool(&["netns-cookie"])?;
    ensure!(code == 0, "labtool netns-cookie: {out}");
    let cookie: u64 = out
        .parse()
        .with_context(|| format!("netns cookie {out:?}"))?;
    let mut config = maps.dump()?.config;
    config.host_netns_cookie = cookie;
    maps.set_config(config)?;
    Ok(())
}

/// Leaves backend `keep` (an id) alone in Service `svc_id`'s frontend: slot 0, count 1.
fn keep_only(
    maps: &mut AyaLbMaps,
    svc_id: u32,
    (addr, port, proto): (Ipv4Addr, u16, u8),
    keep: u32,
) -> Result<()> {
    maps.upsert_slot(SlotKey { svc_id, slot: 0 }, keep)?;
    let key = ServiceKey {
        addr_be: be(addr),
        port_be: port.to_be(),
        proto,
        scope: SCOPE_ANY,
    };
    let mut value = maps.dump()?.services[&key];
    value.backend_count = 1;
    maps.upsert_service(key, value)?;
    Ok(())
}

#[test]
fn tcp_via_clusterip_reaches_a_backend_and_getpeername_shows_the_clusterip() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(
        &mut s.maps,
        1,
        (VIP, 80, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    let (code, out) = s.client.labtool(&["tcp", "--to", &format!("{VIP}:80")])?;
    ensure!(code == 0, "connect via ClusterIP failed: {out}");
    ensure!(
        matches!(replier(&out), Some("be0" | "be1")),
        "unexpected reply: {out}"
    );
    // getpeername() (labtool prints peer_addr) shows the ClusterIP, not the backend.
    ensure!(
        out.contains(&format!("peer={VIP}:80")),
        "getpeername did not show the ClusterIP: {out}"
    );
    // The backend saw the client pod's own address: no SNAT east-west.
    ensure!(
        out.contains(&format!(" {}:", s.client.ip)),
        "client source not preserved: {out}"
    );

    let stats = s.maps.stats()?;
    ensure!(
        stats[&Reason::Translated] >= 1,
        "translation not counted: {stats:?}"
    );
    ensure!(
        stats[&Reason::RevNatApplied] >= 1,
        "getpeername rewrite not counted: {stats:?}"
    );
    let revnat = s.maps.dump_revnat()?;
    ensure!(
        revnat
            .iter()
            .any(|(_, v)| v.frontend_addr_be == be(VIP) && v.svc_id == 1),
        "no reverse-NAT entry for the ClusterIP: {revnat:?}"
    );
    drop(s.dp);
    Ok(())
}

#[test]
fn udp_unconnected_and_connected_clients_see_the_clusterip_as_the_reply_source() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(
        &mut s.maps,
        2,
        (VIP, 53, PROTO_UDP),
        &udp_ips(&s.backends),
        0,
        0,
    )?;
    for mode in [&[][..], &["--connected"][..]] {
        let mut args = vec!["udp", "--to", "10.96.0.10:53"];
        args.extend_from_slice(mode);
        let (code, out) = s.client.labtool(&args)?;
        ensure!(code == 0, "UDP {mode:?} via ClusterIP failed: {out}");
        ensure!(
            matches!(replier(&out), Some("be0" | "be1")),
            "unexpected reply: {out}"
        );
        ensure!(
            out.ends_with(&format!("from={VIP}:53")),
            "reply source is not the ClusterIP ({mode:?}): {out}"
        );
    }
    // Unconnected sendto from 40 sockets (labtool's udp-loop opens one per datagram) is balanced
    // per socket: both backends answer.
    let (_, out) = s
        .client
        .labtool(&["udp-loop", "--to", "10.96.0.10:53", "--count", "40"])?;
    let (ok, failures, counts) = loop_counts(&out)?;
    ensure!(ok == 40 && failures == 0, "UDP loop failed: {out}");
    ensure!(
        counts.len() == 2,
        "unconnected sendto not balanced per datagram: {counts:?}"
    );
    Ok(())
}

#[test]
fn no_backends_is_refused_at_once_for_tcp_and_udp() -> Result<()> {
    let Some(mut s) = setup(0, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(&mut s.maps, 3, (VIP, 80, PROTO_TCP), &[], 0, 0)?;
    program(&mut s.maps, 4, (VIP, 53, PROTO_UDP), &[], 0, 0)?;
    let started = Instant::now();
    // Exit code 2 = ECONNREFUSED (3 would be a timeout).
    let (code, out) =
        s.client
            .labtool(&["tcp", "--to", "10.96.0.10:80", "--timeout-ms", "5000"])?;
    ensure!(
        code == 2,
        "TCP connect to a Service without endpoints was not refused: {code} {out}"
    );
    let (code, out) =
        s.client
            .labtool(&["udp", "--to", "10.96.0.10:53", "--timeout-ms", "5000"])?;
    ensure!(
        code == 2,
        "UDP sendto to a Service without endpoints was not refused: {code} {out}"
    );
    // Refused by the hook, not after a timeout (both together well under one client timeout).
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "refusal took {:?}",
        started.elapsed()
    );
    let stats = s.maps.stats()?;
    ensure!(
        stats[&Reason::NoBackends] >= 2,
        "refusals not counted: {stats:?}"
    );
    Ok(())
}

#[test]
fn a_thousand_connections_over_two_backends_are_balanced() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(
        &mut s.maps,
        5,
        (VIP, 80, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    let (_, out) = s
        .client
        .labtool(&["tcp-loop", "--to", "10.96.0.10:80", "--count", "1000"])?;
    let (ok, failures, counts) = loop_counts(&out)?;
    ensure!(ok == 1000 && failures == 0, "connections failed: {out}");
    for name in ["be0", "be1"] {
        let n = counts.get(name).copied().unwrap_or(0);
        ensure!(
            (400..=600).contains(&n),
            "{name} got {n} of 1000 (want 40–60%): {counts:?}"
        );
    }
    Ok(())
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() -> Result<()> {
    let Some(mut s) = setup(1, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(
        &mut s.maps,
        6,
        (VIP, 80, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    let me = &s.backends[0];
    let (code, out) = me.labtool(&["tcp", "--to", "10.96.0.10:80"])?;
    ensure!(code == 0, "hairpin connection failed: {out}");
    ensure!(replier(&out) == Some("be0"), "unexpected reply: {out}");
    ensure!(
        out.contains(&format!("be0 {}:", me.ip)),
        "hairpin source is not the pod itself: {out}"
    );
    ensure!(
        out.contains("peer=10.96.0.10:80"),
        "hairpin peer is not the ClusterIP: {out}"
    );
    Ok(())
}

#[test]
fn session_affinity_sticks_ignores_removed_backends_and_expires() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    let backends = ips(&s.backends);
    program(
        &mut s.maps,
        7,
        (VIP, 80, PROTO_TCP),
        &backends,
        SVC_F_AFFINITY,
        1,
    )?;

    // Sticks: 30 connections inside the timeout all land on one backend (chance without
    // affinity: 2^-29).
    let (_, out) = s
        .client
        .labtool(&["tcp-loop", "--to", "10.96.0.10:80", "--count", "30"])?;
    let (ok, _, counts) = loop_counts(&out)?;
    ensure!(
        ok == 30 && counts.len() == 1,
        "affinity did not stick: {out}"
    );
    let sticky = counts.keys().next().cloned().unwrap_or_default();
    let aff = s.maps.dump_affinity()?;
    ensure!(
        aff.len() == 1 && aff[0].0.svc_id == 7,
        "affinity table: {aff:?}"
    );
    let stats = s.maps.stats()?;
    ensure!(
        stats[&Reason::AffinityHit] >= 29,
        "affinity hits not counted: {stats:?}"
    );

    // Flushing the sticky backend's state removes its affinity entry (the reconciler does this
    // when a backend goes away); the next connection re-creates one.
    let sticky_id = if sticky == "be0" { 700 } else { 701 };
    let sticky_be = backends[usize::from(sticky != "be0")];
    let report = s.maps.flush_backend(
        sticky_id,
        Backend {
            addr_be: be(sticky_be.0),
            port_be: sticky_be.1.to_be(),
            proto: PROTO_TCP,
            flags: 0,
        },
    )?;
    ensure!(
        report.affinity_entries == 1,
        "affinity entry not flushed: {report:?}"
    );
    ensure!(
        s.maps.dump_affinity()?.is_empty(),
        "affinity table not empty after flush"
    );
    let (code, out) = s.client.labtool(&["tcp", "--to", "10.96.0.10:80"])?;
    ensure!(code == 0, "{out}");
    let sticky = replier(&out).unwrap_or_default().to_owned();

    // The sticky backend leaves the Service (only the other one stays in slot 0): the stale
    // affinity is ignored and the client goes to the remaining backend at once.
    let other = u32::from(sticky == "be0");
    s.maps
        .upsert_slot(SlotKey { svc_id: 7, slot: 0 }, 700 + other)?;
    let key = ServiceKey {
        addr_be: be(VIP),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    };
    let mut value = s.maps.dump()?.services[&key];
    value.backend_count = 1;
    s.maps.upsert_service(key, value)?;
    let (code, out) = s.client.labtool(&["tcp", "--to", "10.96.0.10:80"])?;
    ensure!(
        code == 0 && replier(&out) == Some(&format!("be{other}")),
        "stale affinity used: {out}"
    );

    // Both backends again; affinity now points at `other`. It expires after 1 s without use:
    // poll (bounded) until a connection after a pause lands elsewhere, which random selection
    // does with probability 1/2 per round.
    program(
        &mut s.maps,
        7,
        (VIP, 80, PROTO_TCP),
        &backends,
        SVC_F_AFFINITY,
        1,
    )?;
    let mut moved = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1300));
        let (code, out) = s.client.labtool(&["tcp", "--to", "10.96.0.10:80"])?;
        ensure!(code == 0, "connection failed: {out}");
        if replier(&out) != Some(&format!("be{other}")) {
            moved = true;
            break;
        }
    }
    ensure!(
        moved,
        "affinity never expired in 20 rounds past its 1 s timeout"
    );
    Ok(())
}

#[test]
fn nodeport_from_the_node_and_from_a_pod_via_node_address_and_loopback() -> Result<()> {
    let Some(mut s) = setup(1, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    set_host_netns(&mut s.maps, s.lab.node(0))?;
    let node_ip = s.lab.node(0).ip;
    s.maps.upsert_node_addr(be(node_ip), 0)?;
    program(
        &mut s.maps,
        8,
        (Ipv4Addr::UNSPECIFIED, 30080, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    let to = format!("{node_ip}:30080");
    let (code, out) = s.lab.node(0).labtool(&["tcp", "--to", &to])?;
    ensure!(
        code == 0 && replier(&out) == Some("be0"),
        "NodePort from the node failed: {out}"
    );
    ensure!(
        out.contains(&format!("peer={to}")),
        "peer is not the node address: {out}"
    );
    for family in [&[][..], &["--ipv6-mapped"][..]] {
        let mut args = vec!["tcp", "--to", "127.0.0.1:30080"];
        args.extend_from_slice(family);
        let (code, out) = s.lab.node(0).labtool(&args)?;
        ensure!(
            code == 0 && replier(&out) == Some("be0"),
            "NodePort via loopback {family:?} failed: {out}"
        );
    }
    let (code, out) = s.client.labtool(&["tcp", "--to", &to])?;
    ensure!(
        code == 0 && replier(&out) == Some("be0"),
        "NodePort from a pod failed: {out}"
    );
    // Hairpin via NodePort: the backend pod reaches itself through its node's NodePort.
    let me = &s.backends[0];
    let (code, out) = me.labtool(&["tcp", "--to", &to])?;
    ensure!(
        code == 0 && out.starts_with(&format!("reply=be0 {}:", me.ip)),
        "NodePort hairpin failed: {out}"
    );
    // Inside a pod, 127.0.0.1 is the pod itself: its own listener on the NodePort's number
    // answers, for AF_INET and AF_INET6 (v4-mapped) sockets alike.
    s.lab.serve(&s.client, "podlocal", Some(30080), None)?;
    let before = s.maps.stats()?[&Reason::LoopbackNotHostNetns];
    for family in [&[][..], &["--ipv6-mapped"][..]] {
        let mut args = vec!["tcp", "--to", "127.0.0.1:30080"];
        args.extend_from_slice(family);
        let (code, out) = s.client.labtool(&args)?;
        ensure!(
            code == 0 && replier(&out) == Some("podlocal"),
            "a pod's 127.0.0.1:<nodePort> {family:?} was translated: {out}"
        );
    }
    let after = s.maps.stats()?[&Reason::LoopbackNotHostNetns];
    ensure!(
        after >= before + 2,
        "loopback NodePort in a pod not counted: {before} → {after}"
    );
    // An address that is not the node's is not a NodePort frontend.
    let (code, _) =
        s.client
            .labtool(&["tcp", "--to", "172.30.0.99:30080", "--timeout-ms", "300"])?;
    ensure!(code != 0, "NodePort answered on a foreign address");
    Ok(())
}

#[test]
fn a_full_map_is_a_named_error() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let sizes = MapSizes::default()
        .with(MapKind::Services, 4)
        .with(MapKind::Backends, 3);
    let mut dp = Datapath::load(&DatapathOptions {
        bpffs_dir: None,
        map_sizes: sizes,
        ..DatapathOptions::default()
    })?;
    let mut maps = dp.lb_maps()?;
    ensure!(
        maps.capacities()[&MapKind::Services] == 4,
        "{:?}",
        maps.capacities()
    );
    let key = |i: u16| ServiceKey {
        addr_be: be(VIP),
        port_be: (80 + i).to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ANY,
    };
    let value = ServiceValue {
        svc_id: 1,
        backend_count: 0,
        flags: 0,
        affinity_timeout_s: 0,
        maglev_size: 0,
    };
    for i in 0..4 {
        maps.upsert_service(key(i), value)?;
    }
    match maps.upsert_service(key(4), value) {
        Err(MapError::Full {
            map: MapKind::Services,
            capacity: 4,
        }) => {}
        other => bail!("expected MapError::Full for the 5th service, got {other:?}"),
    }
    // Updating a present key in a full map still works.
    maps.upsert_service(
        key(0),
        ServiceValue {
            backend_count: 1,
            ..value
        },
    )?;
    let b = Backend {
        addr_be: 1,
        port_be: 1,
        proto: PROTO_TCP,
        flags: 0,
    };
    for i in 0..3 {
        maps.upsert_backend(i, b)?;
    }
    match maps.upsert_backend(3, b) {
        Err(
            e @ MapError::Full {
                map: MapKind::Backends,
                capacity: 3,
            },
        ) => {
            ensure!(
                e.to_string().contains("--map-size"),
                "message does not say what to change: {e}"
            );
        }
        other => bail!("expected MapError::Full for the 4th backend, got {other:?}"),
    }
    drop(lab);
    Ok(())
}

/// Pinned maps and links keep traffic flowing while no agent runs; a new agent adopts the maps
/// with their contents and swaps its programs into the pinned links with no failed connection;
/// `unpin_all` removes everything.
#[test]
fn pinned_datapath_survives_restarts_without_a_failed_connection() -> Result<()> {
    let Some(s) = setup(2, |n| DatapathOptions::pinned(n.bpffs.join("twill")))? else {
        return Ok(());
    };
    let Setup {
        lab,
        dp,
        mut maps,
        client,
        backends,
    } = s;
    let node = lab.node(0);
    let dir = node.bpffs.join("twill");
    program(&mut maps, 9, (VIP, 80, PROTO_TCP), &ips(&backends), 0, 0)?;
    let before = maps.dump()?;

    // Continuous connections while the "agent" restarts three times.
    let looper = client
        .cmd(twill_lab::bin("labtool"))
        .args([
            "tcp-loop",
            "--to",
            "10.96.0.10:80",
            "--duration-ms",
            "4000",
            "--interval-ms",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    drop(maps);
    drop(dp);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let mut dp = Datapath::load(&DatapathOptions::pinned(&dir))?;
        ensure!(
            dp.adopted_maps().len() == twill_common::MapKind::pinned().count(),
            "adopted {:?}",
            dp.adopted_maps()
        );
        let outcomes = dp.attach_cgroup(&node.cgroup)?;
        ensure!(
            outcomes.iter().all(|(_, o)| *o == AttachOutcome::Replaced),
            "pinned links were not reused: {outcomes:?}"
        );
        let maps = dp.lb_maps()?;
        ensure!(maps.dump()? == before, "adopted maps lost their contents");
    }
    let out = looper.wait_with_output()?;
    let out = String::from_utf8_lossy(&out.stdout);
    let (ok, failures, counts) = loop_counts(out.trim())?;
    ensure!(
        failures == 0 && ok > 100,
        "connections failed across restarts: {out}"
    );
    ensure!(counts.len() == 2, "{counts:?}");

    let removed = Datapath::unpin_all(&dir)?;
    ensure!(
        removed.len() == SOCK_PROGRAMS.len() + twill_common::MapKind::pinned().count() + 1,
        "removed {removed:?}"
    );
    let (code, out) = client.labtool(&["tcp", "--to", "10.96.0.10:80", "--timeout-ms", "300"])?;
    ensure!(
        code != 0,
        "the Service still answers after unpin_all: {out}"
    );
    Ok(())
}

/// A connected UDP socket keeps its backend forever with socket-level LB; removing the backend
/// must destroy it (the application gets an error and reconnects), not leave it talking to a
/// gone pod.
#[test]
fn removing_a_udp_backend_destroys_connected_sockets_to_it() -> Result<()> {
    // The kernels the project supports (6.6+) have the iterator and its kfunc.
    connected_udp_sockets_to_a_removed_backend_are_destroyed(
        SockDestroyMode::Auto,
        DestroyMethod::BpfIterator,
    )
}

/// The fallback for kernels without `bpf_sock_destroy` (< 6.5), forced here.
#[test]
fn removing_a_udp_backend_destroys_connected_sockets_to_it_with_sock_diag() -> Result<()> {
    connected_udp_sockets_to_a_removed_backend_are_destroyed(
        SockDestroyMode::SockDiag,
        DestroyMethod::SockDiag,
    )
}

fn connected_udp_sockets_to_a_removed_backend_are_destroyed(
    mode: SockDestroyMode,
    expected_method: DestroyMethod,
) -> Result<()> {
    let Some(mut s) = setup(1, |_| DatapathOptions {
        sock_destroy: mode,
        ..DatapathOptions::unpinned()
    })?
    else {
        return Ok(());
    };
    program(
        &mut s.maps,
        10,
        (VIP, 53, PROTO_UDP),
        &udp_ips(&s.backends),
        0,
        0,
    )?;
    // socat keeps one connected UDP socket open, sending each stdin line as a datagram: one
    // AF_INET socket, and one AF_INET6 socket connected to the v4-mapped ClusterIP.
    let mut clients = Vec::new();
    for target in ["UDP4:10.96.0.10:53", "UDP6:[::ffff:10.96.0.10]:53"] {
        let mut socat = s
            .client
            .cmd("socat")
            .args(["-T", "20", "-", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("socat (Debian package socat) is needed")?;
        let mut stdin = socat.stdin.take().context("stdin")?;
        let mut lines = BufReader::new(socat.stdout.take().context("stdout")?).lines();
        stdin.write_all(b"hi\n")?;
        let first = lines.next().context("no reply")??;
        ensure!(
            first.starts_with("be0 "),
            "unexpected reply {first} ({target})"
        );
        clients.push((target, socat, stdin));
    }

    let pod = &s.backends[0];
    // A socket connected to the backend's own address, not through the Service: not ours to
    // destroy.
    let mut direct = s
        .client
        .cmd("socat")
        .args(["-T", "20", "-", &format!("UDP4:{}:5353", pod.ip)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut direct_in = direct.stdin.take().context("stdin")?;
    let mut direct_out = BufReader::new(direct.stdout.take().context("stdout")?).lines();
    direct_in.write_all(b"hi\n")?;
    let first = direct_out.next().context("no direct reply")??;
    ensure!(first.starts_with("be0 "), "unexpected reply {first}");
    let backend = Backend {
        addr_be: be(pod.ip),
        port_be: 5353u16.to_be(),
        proto: PROTO_UDP,
        flags: 0,
    };
    let report = s.maps.flush_backend(1000, backend)?;
    ensure!(
        report.sockets_destroyed == 2,
        "connected UDP sockets (AF_INET and AF_INET6) not destroyed: {report:?}"
    );
    ensure!(
        report.socket_destroy_method == Some(expected_method),
        "destroyed with {:?}, expected {expected_method:?}",
        report.socket_destroy_method
    );
    ensure!(
        report.revnat_entries >= 1,
        "reverse-NAT entry not flushed: {report:?}"
    );
    // A destroyed socket fails its next use; socat exits with an error (bounded wait).
    for (target, mut socat, mut stdin) in clients {
        let _ = stdin.write_all(b"again\n");
        let status = wait_for(Duration::from_secs(10), "socat to exit", || {
            Ok(socat.try_wait()?)
        })?;
        ensure!(
            !status.success(),
            "socat kept using a destroyed socket ({target})"
        );
    }
    direct_in.write_all(b"again\n")?;
    let again = direct_out.next().context("direct socket lost")??;
    ensure!(again.starts_with("be0 "), "unexpected reply {again}");
    drop(direct_in);
    let _ = direct.kill();
    let _ = direct.wait();
    Ok(())
}

/// The agent mounts bpffs itself when missing (a fresh machine has none).
#[test]
fn ensure_bpffs_mounts_once() -> Result<()> {
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    // Already bpffs: nothing to do.
    ensure!(
        !twill_agent::datapath::ensure_bpffs(&lab.node(0).bpffs)?,
        "remounted an existing bpffs"
    );
    let dir = lab.node(0).dir.join("bpf");
    let guard = Unmount(dir.clone());
    ensure!(twill_agent::datapath::ensure_bpffs(&dir)?, "did not mount");
    ensure!(!twill_agent::datapath::ensure_bpffs(&dir)?, "mounted twice");
    // Now usable for pinning.
    let dp = Datapath::load(&DatapathOptions::pinned(dir.join("twill")))?;
    ensure!(
        dir.join("twill").join(twill_common::MAP_SERVICES).exists(),
        "maps not pinned"
    );
    drop(dp);
    drop(guard);
    Ok(())
}

/// A JVM-like client: sockets created AF_INET6 (the JVM's and .NET's default) talking to a
/// frontend's IPv4-mapped address (`::ffff:a.b.c.d`) are translated like AF_INET ones — TCP,
/// connected UDP and unconnected sendto/recvfrom, to a ClusterIP, an external address and a
/// NodePort on the node's address — and see the mapped frontend as their peer. A real IPv6
/// destination passes untouched.
#[test]
fn af_inet6_clients_reach_services_via_v4_mapped_addresses_and_see_them_as_peer() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    let external = Ipv4Addr::new(203, 0, 113, 10);
    let node_ip = s.lab.node(0).ip;
    s.maps.upsert_node_addr(be(node_ip), 0)?;
    program(
        &mut s.maps,
        11,
        (VIP, 80, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    program(
        &mut s.maps,
        12,
        (VIP, 53, PROTO_UDP),
        &udp_ips(&s.backends),
        0,
        0,
    )?;
    program(
        &mut s.maps,
        13,
        (external, 80, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    program(
        &mut s.maps,
        14,
        (Ipv4Addr::UNSPECIFIED, 30080, PROTO_TCP),
        &ips(&s.backends),
        0,
        0,
    )?;
    program(&mut s.maps, 15, (VIP, 81, PROTO_TCP), &[], 0, 0)?;

    for frontend in [VIP, external, node_ip] {
        let port = if frontend == node_ip { 30080 } else { 80 };
        let to = format!("[::ffff:{frontend}]:{port}");
        let (code, out) = s.client.labtool(&["tcp", "--to", &to])?;
        ensure!(code == 0, "AF_INET6 connect to {to} failed: {out}");
        ensure!(
            matches!(replier(&out), Some("be0" | "be1")),
            "unexpected reply via {to}: {out}"
        );
        // getpeername() on the AF_INET6 socket shows the mapped frontend, not the backend.
        ensure!(
            out.contains(&format!("peer={to}")),
            "getpeername did not show {to}: {out}"
        );
        // The backend saw the pod's own IPv4 address: no SNAT east-west.
        ensure!(
            out.contains(&format!(" {}:", s.client.ip)),
            "client source not preserved: {out}"
        );
    }
    // UDP: connected (getpeername6) and sendto/recvfrom (recvmsg6 shows the mapped ClusterIP
    // as the reply's source).
    let to = format!("[::ffff:{VIP}]:53");
    for mode in [&[][..], &["--connected"][..]] {
        let mut args = vec!["udp", "--to", &to];
        args.extend_from_slice(mode);
        let (code, out) = s.client.labtool(&args)?;
        ensure!(code == 0, "AF_INET6 UDP {mode:?} via {to} failed: {out}");
        ensure!(
            matches!(replier(&out), Some("be0" | "be1")),
            "unexpected reply: {out}"
        );
        ensure!(
            out.ends_with(&format!("from={to}")),
            "reply source is not the mapped ClusterIP ({mode:?}): {out}"
        );
    }
    // No backends: refused at once, as for AF_INET.
    let (code, out) = s.client.labtool(&[
        "tcp",
        "--to",
        &format!("[::ffff:{VIP}]:81"),
        "--timeout-ms",
        "5000",
    ])?;
    ensure!(
        code == 2,
        "AF_INET6 connect without endpoints not refused: {out}"
    );

    // A real IPv6 destination is not ours: untouched (nothing listens on the pod's [::1]:80).
    let before = s.maps.stats()?[&Reason::NotV4Mapped];
    let (code, out) = s
        .client
        .labtool(&["tcp", "--to", "[::1]:80", "--timeout-ms", "300"])?;
    ensure!(code != 0, "[::1]:80 answered: {out}");
    let stats = s.maps.stats()?;
    ensure!(
        stats[&Reason::NotV4Mapped] > before,
        "IPv6 destination not counted as untouched: {stats:?}"
    );
    ensure!(
        stats[&Reason::RevNatApplied] >= 5,
        "peer rewrites not counted: {stats:?}"
    );
    Ok(())
}

/// Unconnected UDP: the datagrams one socket sends to one frontend are one flow and stay on one
/// backend (QUIC, SIP and TFTP need it), for AF_INET and v4-mapped AF_INET6 sockets; other
/// sockets spread over the backends; a backend that leaves the Service loses its flows at once.
#[test]
fn unconnected_udp_datagrams_of_one_socket_stay_on_one_backend() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    let backends = udp_ips(&s.backends);
    program(&mut s.maps, 16, (VIP, 53, PROTO_UDP), &backends, 0, 0)?;

    // Each round is a new socket: 10 datagrams, all to one backend. Over up to 12 sockets both
    // backends get flows (all on one: 2^-11).
    let mut seen = BTreeSet::new();
    let mut rounds: u64 = 0;
    for round in 0..12 {
        let mut args = vec!["udp-loop", "--to", "10.96.0.10:53", "--count", "10"];
        args.push("--one-socket");
        if round % 2 == 1 {
            args.push("--ipv6-mapped");
        }
        let (_, out) = s.client.labtool(&args)?;
        let (ok, failures, counts) = loop_counts(&out)?;
        ensure!(ok == 10 && failures == 0, "UDP flow round failed: {out}");
        ensure!(
            counts.len() == 1,
            "one socket's datagrams spread over backends: {counts:?}"
        );
        seen.extend(counts.into_keys());
        rounds += 1;
        if seen.len() == 2 && round >= 3 {
            break;
        }
    }
    ensure!(seen.len() == 2, "{rounds} sockets all landed on {seen:?}");
    let stats = s.maps.stats()?;
    ensure!(
        stats[&Reason::UdpFlowHit] >= 9 * rounds,
        "flow hits not counted ({rounds} rounds): {stats:?}"
    );
    let flows = s.maps.dump_udp_flows()?;
    ensure!(
        u64::try_from(flows.len())? == rounds && flows.iter().all(|(k, _)| k.svc_id == 16),
        "one flow per socket expected ({rounds}): {flows:?}"
    );

    // A live flow whose backend leaves the Service moves to the remaining one.
    let started = monotonic_now_ns();
    let looper = s
        .client
        .cmd(twill_lab::bin("labtool"))
        .args([
            "udp-loop",
            "--to",
            "10.96.0.10:53",
            "--one-socket",
            "--count",
            "40",
            "--interval-ms",
            "50",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let sticky_id = wait_for(Duration::from_secs(5), "the new flow", || {
        Ok(s.maps
            .dump_udp_flows()?
            .into_iter()
            .find(|(_, v)| v.last_used_ns > started)
            .map(|(_, v)| v.backend_id))
    })?;
    let other_id = if sticky_id == 1600 { 1601 } else { 1600 };
    keep_only(&mut s.maps, 16, (VIP, 53, PROTO_UDP), other_id)?;
    let out = looper.wait_with_output()?;
    let out = String::from_utf8_lossy(&out.stdout);
    let (ok, failures, counts) = loop_counts(out.trim())?;
    ensure!(ok == 40 && failures == 0, "flow broke: {out}");
    let name = |id: u32| format!("be{}", id - 1600);
    ensure!(
        counts.get(&name(sticky_id)).is_some_and(|n| *n < 40)
            && counts.get(&name(other_id)).is_some_and(|n| *n > 0),
        "the flow did not leave the removed backend {}: {counts:?}",
        name(sticky_id)
    );

    // Flushing the removed backend's state drops the flows still pointing at it.
    let (addr, port) = backends[usize::try_from(sticky_id - 1600)?];
    let report = s.maps.flush_backend(
        sticky_id,
        Backend {
            addr_be: be(addr),
            port_be: port.to_be(),
            proto: PROTO_UDP,
            flags: 0,
        },
    )?;
    ensure!(
        report.udp_flow_entries >= 1,
        "no UDP flow flushed: {report:?}"
    );
    let left = s.maps.dump_udp_flows()?;
    ensure!(
        left.iter().all(|(_, v)| v.backend_id != sticky_id),
        "flows of the removed backend left: {left:?}"
    );
    Ok(())
}

/// A UDP flow idle for longer than `UDP_FLOW_TIMEOUT_S` is over: the socket's next datagram is
/// balanced afresh rather than following the old flow.
#[test]
fn an_idle_unconnected_udp_flow_expires() -> Result<()> {
    let Some(mut s) = setup(2, |_| DatapathOptions::unpinned())? else {
        return Ok(());
    };
    program(
        &mut s.maps,
        17,
        (VIP, 53, PROTO_UDP),
        &udp_ips(&s.backends),
        0,
        0,
    )?;
    let counters = |maps: &AyaLbMaps| -> Result<(u64, u64)> {
        let stats = maps.stats()?;
        Ok((stats[&Reason::Translated], stats[&Reason::UdpFlowHit]))
    };
    // Back to back: the second datagram follows the flow.
    let (t0, h0) = counters(&s.maps)?;
    let (_, out) = s.client.labtool(&[
        "udp-loop",
        "--to",
        "10.96.0.10:53",
        "--one-socket",
        "--count",
        "2",
    ])?;
    ensure!(loop_counts(&out)?.0 == 2, "{out}");
    let (t1, h1) = counters(&s.maps)?;
    ensure!(
        (t1 - t0, h1 - h0) == (1, 1),
        "back-to-back datagrams: translated +{}, flow hits +{}",
        t1 - t0,
        h1 - h0
    );
    // A pause past the timeout: the second datagram starts a new flow.
    let pause = (UDP_FLOW_TIMEOUT_S * 1000 + 1500).to_string();
    let (_, out) = s.client.labtool(&[
        "udp-loop",
        "--to",
        "10.96.0.10:53",
        "--one-socket",
        "--count",
        "2",
        "--interval-ms",
        &pause,
    ])?;
    ensure!(loop_counts(&out)?.0 == 2, "{out}");
    let (t2, h2) = counters(&s.maps)?;
    ensure!(
        (t2 - t1, h2 - h1) == (2, 0),
        "datagrams {pause} ms apart: translated +{}, flow hits +{}",
        t2 - t1,
        h2 - h1
    );
    Ok(())
}
