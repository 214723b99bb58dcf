//! Kernel-program tests of IPv6 north-south translation (`proxy-ebpf/src/ns6.rs` on
//! `nat6.rs`) with `BPF_PROG_TEST_RUN`: hand-built IPv6 frames in, translated frames out, the
//! TCP/UDP and ICMPv6 checksums (pseudo-header included) verified byte for byte. The IPv6 twin
//! of `datapath_tc_fixtures.rs`; the programs run inside a dual-stack lab node's network
//! namespace and are attached nowhere.
use std::{net::Ipv6Addr, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, ensure};
use ipnetwork::IpNetwork;
use twill_agent::{
    datapath::{AyaLbMaps, Datapath, DatapathOptions},
    lbmap::LbMaps,
};
use twill_common::{
    BE_F_LOCAL, Backend6, MAGLEV_SLOT_BASE, PROTO_TCP, PROTO_UDP, Reason, SCOPE_ANY,
    SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceKey6, ServiceValue, SlotKey, addr6_from_octets,
    flow_hash6,
};
use twill_core::maglev;
use twill_lab::{LabSpec, in_netns, require};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const INGRESS: &str = "twill_tc_ingress";
const EGRESS: &str = "twill_tc_egress";
const PROTO_ICMPV6: u8 = 58;
/// Node 0 of a dual-stack lab (`fd00:172:30:{subnet}::{host}`), its NodePort address.
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x10);
const PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x11);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x200);
const CLIENT2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x201);
const POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5);
const REMOTE_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const LB_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x31);
const CLUSTER_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x30);
/// A client port inside the reserved NAT range (kept by SNAT when free).
const SNAT_KEPT: u16 = 61_234;

fn a6(ip: Ipv6Addr) -> [u32; 4] {
    addr6_from_octets(ip.octets())
}

/// One's-complement sum folded to 16 bits.
fn csum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0)
}

/// The IPv6 pseudo-header's sum (RFC 8200 8.1).
fn pseudo_sum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    u32::from(csum(&p, 0))
}

/// Ethernet + IPv6 + `l4` (whose checksum at `csum_off` is computed here).
fn frame(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, mut l4: Vec<u8>, csum_off: usize) -> Vec<u8> {
    let c = !csum(&l4, pseudo_sum(src, dst, proto, l4.len()));
    l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&u16::try_from(l4.len()).unwrap_or(0).to_be_bytes());
    ip[6] = proto;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let mut pkt = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&l4);
    pkt
}

/// A TCP segment with `flags` and a small payload.
fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20 + 5];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    l4[20..].copy_from_slice(b"hello");
    frame(src.0, dst.0, PROTO_TCP, l4, 16)
}

/// A UDP datagram (IPv6 requires its checksum).
fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut l4 = vec![0u8; 8 + 5];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    l4[4..6].copy_from_slice(&13u16.to_be_bytes());
    l4[8..].copy_from_slice(b"hello");
    frame(src.0, dst.0, PROTO_UDP, l4, 6)
}

/// An ICMPv6 message `(icmp_type, code)` from `from` to `to` whose body follows the 4-byte
/// unused/MTU word: `quoted` (a whole frame) from its IPv6 header on.
fn icmp6(from: Ipv6Addr, to: Ipv6Addr, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0x00];
    l4.extend_from_slice(&quoted[14..]);
    frame(from, to, PROTO_ICMPV6, l4, 2)
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

fn port(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

type Seen = ((Ipv6Addr, u16), (Ipv6Addr, u16));

/// The addresses and ports of a TCP/UDP frame, after checking its checksum.
fn inspect(pkt: &[u8]) -> Result<Seen> {
    ensure!(pkt.len() > 14 + 40 + 8, "short packet {}", pkt.len());
    ensure!(pkt[12..14] == [0x86, 0xdd], "not IPv6");
    let ip = &pkt[14..54];
    let (src, dst, proto) = (addr(&ip[8..]), addr(&ip[24..]), ip[6]);
    let l4 = &pkt[54..];
    ensure!(
        csum(l4, pseudo_sum(src, dst, proto, l4.len())) == 0xffff,
        "bad {} checksum",
        if proto == PROTO_TCP { "TCP" } else { "UDP" }
    );
    Ok(((src, port(&l4[0..])), (dst, port(&l4[2..]))))
}

/// An ICMPv6 error after checking its checksum: (outer source, outer destination, the quoted
/// packet's source and destination).
fn inspect_icmp(pkt: &[u8]) -> Result<(Ipv6Addr, Ipv6Addr, Seen)> {
    ensure!(pkt.len() >= 14 + 40 + 8 + 40 + 4, "short ICMPv6 packet");
    let ip = &pkt[14..54];
    let (src, dst) = (addr(&ip[8..]), addr(&ip[24..]));
    let l4 = &pkt[54..];
    ensure!(
        csum(l4, pseudo_sum(src, dst, PROTO_ICMPV6, l4.len())) == 0xffff,
        "bad ICMPv6 checksum"
    );
    let q = &l4[8..];
    let ports = &q[40..];
    Ok((
        src,
        dst,
        (
            (addr(&q[8..]), port(&ports[0..])),
            (addr(&q[24..]), port(&ports[2..])),
        ),
    ))
}

/// `BPF_PROG_TEST_RUN` (aya 0.14 has no wrapper): (program return value, packet out).
fn test_run(dp: &Datapath, prog: &str, data: &[u8]) -> Result<(u32, Vec<u8>)> {
    let p: &aya::programs::SchedClassifier =
        dp.ebpf.program(prog).context("program")?.try_into()?;
    let fd = p.fd()?;
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = [0u8; 80];
    let fd_raw = u32::try_from(std::os::fd::AsFd::as_fd(fd).as_raw_fd())?;
    attr[0..4].copy_from_slice(&fd_raw.to_ne_bytes());
    attr[8..12].copy_from_slice(&u32::try_from(data.len())?.to_ne_bytes());
    attr[12..16].copy_from_slice(&u32::try_from(out.len())?.to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr describes valid in/out buffers of the sizes given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 10, attr.as_mut_ptr(), attr.len()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    let retval = u32::from_ne_bytes(attr[4..8].try_into()?);
    let size_out = u32::from_ne_bytes(attr[12..16].try_into()?) as usize;
    out.truncate(size_out);
    Ok((retval, out))
}

/// Runs `pkt` through `prog`, expects `want` and returns what came out.
fn run(dp: &Datapath, prog: &str, pkt: &[u8], want: u32) -> Result<Vec<u8>> {
    let (rc, out) = test_run(dp, prog, pkt)?;
    ensure!(rc == want, "{prog} verdict {rc}, want {want}");
    Ok(out)
}

/// The programs loaded (not attached) and their maps, `NODE` an IPv6 NodePort address.
fn loaded() -> Result<(Datapath, AyaLbMaps)> {
    let mut dp = Datapath::load(&DatapathOptions::unpinned())?;
    for name in [INGRESS, EGRESS] {
        let p: &mut aya::programs::SchedClassifier =
            dp.ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut maps = dp.lb_maps()?;
    maps.upsert_node_addr6(a6(NODE), 0)?;
    Ok((dp, maps))
}

/// An IPv6 frontend `addr`:`port` (`::` for NodePort) of Service `svc_id` at `scope` with
/// `flags`, over `backends` (ids `svc_id * 10 + i`; `local` marks them `BE_F_LOCAL`).
fn frontend6(
    maps: &mut AyaLbMaps,
    svc_id: u32,
    (addr, port, proto, scope): (Ipv6Addr, u16, u8, u8),
    flags: u16,
    affinity_timeout_s: u32,
    backends: &[(Ipv6Addr, u16)],
    local: bool,
) -> Result<()> {
    for (i, (be_addr, be_port)) in backends.iter().enumerate() {
        let id = svc_id * 10 + u32::try_from(i)?;
        maps.upsert_backend6(
            id,
            Backend6 {
                addr_be: a6(*be_addr),
                port_be: be_port.to_be(),
                proto,
                flags: if local { BE_F_LOCAL } else { 0 },
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
    maps.upsert_service6(
        ServiceKey6 {
            addr_be: a6(addr),
            port_be: port.to_be(),
            proto,
            scope,
        },
        ServiceValue {
            svc_id,
            backend_count: u16::try_from(backends.len())?,
            flags,
            affinity_timeout_s,
            maglev_size: 0,
        },
    )?;
    Ok(())
}

fn nat_range(port: u16) -> bool {
    (twill_common::MASQ_PORT_MIN..=twill_common::MASQ_PORT_MAX).contains(&port)
}

/// The frontends of [`tc6_nodeport_dnat_to_local_backends_keeps_the_client`]: NodePorts
/// 30080/TCP and 30053/UDP, a ClusterIP, 30090 with eTP Local and no local backend, 30070 with
/// session affinity over two backends; all backends local.
fn local_frontends(maps: &mut AyaLbMaps) -> Result<()> {
    let any = Ipv6Addr::UNSPECIFIED;
    frontend6(
        maps,
        1,
        (any, 30080, PROTO_TCP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &[(POD, 8080)],
        true,
    )?;
    frontend6(
        maps,
        2,
        (any, 30053, PROTO_UDP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &[(POD, 5353)],
        true,
    )?;
    frontend6(
        maps,
        3,
        (CLUSTER_IP, 80, PROTO_TCP, SCOPE_ANY),
        SVC_F_CLUSTER_IP,
        0,
        &[(POD, 8080)],
        true,
    )?;
    // eTP Local on this node: the EXTERNAL frontend lists no local backend.
    frontend6(
        maps,
        4,
        (any, 30090, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODEPORT | SVC_F_LOCAL_ONLY,
        0,
        &[],
        true,
    )?;
    // Session affinity over two local backends.
    let pod2 = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 6);
    frontend6(
        maps,
        5,
        (any, 30070, PROTO_TCP, SCOPE_ANY),
        SVC_F_NODEPORT | SVC_F_AFFINITY,
        600,
        &[(POD, 8080), (pod2, 8080)],
        true,
    )?;
    Ok(())
}

/// An IPv6 NodePort to a local backend: DNAT keeping the client (TCP and UDP, checksums over
/// the new pseudo-header), the backend's reply translated back on egress, later segments by
/// conntrack; a non-SYN segment of no flow, a ClusterIP reached from outside, a port that is
/// no Service and Neighbour Discovery pass untouched; externalTrafficPolicy Local without a
/// local backend drops; session affinity keeps a client on its backend.
#[test]
fn tc6_nodeport_dnat_to_local_backends_keeps_the_client() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let (dp, mut maps) = loaded()?;
    local_frontends(&mut maps)?;
    let np = (NODE, 30080);
    in_netns(&n0.netns, || {
        let out = run(&dp, INGRESS, &tcp((CLIENT, 40000), np, TCP_SYN), TC_ACT_OK)?;
        let seen = inspect(&out)?;
        ensure!(seen == ((CLIENT, 40000), (POD, 8080)), "DNAT: {seen:?}");
        let out = run(
            &dp,
            EGRESS,
            &tcp((POD, 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK),
            TC_ACT_OK,
        )?;
        let seen = inspect(&out)?;
        ensure!(seen == (np, (CLIENT, 40000)), "reply: {seen:?}");
        let out = run(&dp, INGRESS, &tcp((CLIENT, 40000), np, TCP_ACK), TC_ACT_OK)?;
        ensure!(inspect(&out)?.1 == (POD, 8080), "later segment");

        let out = run(
            &dp,
            INGRESS,
            &udp((CLIENT, 41000), (NODE, 30053)),
            TC_ACT_OK,
        )?;
        let seen = inspect(&out)?;
        ensure!(seen == ((CLIENT, 41000), (POD, 5353)), "UDP DNAT: {seen:?}");
        let out = run(&dp, EGRESS, &udp((POD, 5353), (CLIENT, 41000)), TC_ACT_OK)?;
        ensure!(
            inspect(&out)? == ((NODE, 30053), (CLIENT, 41000)),
            "UDP reply"
        );

        // Untouched: the middle of an unknown flow, a ClusterIP from outside, no Service.
        for pkt in [
            tcp((CLIENT, 40001), np, TCP_ACK),
            tcp((CLIENT, 40002), (CLUSTER_IP, 80), TCP_SYN),
            tcp((CLIENT, 40003), (NODE, 22), TCP_SYN),
        ] {
            let out = run(&dp, INGRESS, &pkt, TC_ACT_OK)?;
            ensure!(out == pkt, "changed: {:?}", inspect(&pkt)?);
        }
        // Neighbour Discovery (a solicitation for the node's address) and MLD: untouched on
        // both directions even while NodePort flows are tracked.
        for icmp_type in [135, 136, 143] {
            let nd = icmp6(CLIENT, NODE, icmp_type, 0, &tcp((CLIENT, 1), np, TCP_SYN));
            for prog in [INGRESS, EGRESS] {
                let out = run(&dp, prog, &nd, TC_ACT_OK)?;
                ensure!(out == nd, "ICMPv6 type {icmp_type} changed on {prog}");
            }
        }
        // eTP Local without a local backend: dropped.
        run(
            &dp,
            INGRESS,
            &tcp((CLIENT, 40004), (NODE, 30090), TCP_SYN),
            TC_ACT_SHOT,
        )?;
        // Affinity: every connection of one client goes to the same backend.
        let mut to = std::collections::BTreeSet::new();
        for sport in 42000..42010 {
            let out = run(
                &dp,
                INGRESS,
                &tcp((CLIENT, sport), (NODE, 30070), TCP_SYN),
                TC_ACT_OK,
            )?;
            to.insert(inspect(&out)?.1);
        }
        ensure!(to.len() == 1, "affinity: {to:?}");

        let stats = maps.stats()?;
        ensure!(stats[&Reason::Ns6Dnat] == 12, "{stats:?}");
        ensure!(stats[&Reason::AffinityHit] == 9, "{stats:?}");
        ensure!(stats[&Reason::NoLocalBackend] == 1, "{stats:?}");
        ensure!(stats[&Reason::CtNonSynMiss] == 1, "{stats:?}");
        Ok(())
    })
}

/// The frontends of [`tc6_nodeport_to_a_remote_backend_snats_and_translates_icmp_errors`]:
/// NodePorts 30080/TCP and 30053/UDP and a LoadBalancer IP, each over one remote backend.
fn remote_frontends(maps: &mut AyaLbMaps) -> Result<()> {
    let any = Ipv6Addr::UNSPECIFIED;
    frontend6(
        maps,
        1,
        (any, 30080, PROTO_TCP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &[(REMOTE_POD, 8080)],
        false,
    )?;
    frontend6(
        maps,
        2,
        (any, 30053, PROTO_UDP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &[(REMOTE_POD, 5353)],
        false,
    )?;
    // A LoadBalancer IP (no node address): SNAT to the route's preferred source.
    frontend6(
        maps,
        3,
        (LB_IP, 80, PROTO_TCP, SCOPE_ANY),
        SVC_F_LOADBALANCER,
        0,
        &[(REMOTE_POD, 8080)],
        false,
    )?;
    Ok(())
}

/// An IPv6 NodePort to a backend on another node (externalTrafficPolicy Cluster): DNAT + SNAT
/// to the node address and a port of the reserved range (the client's own when free, another
/// when that reply tuple is taken or the client's port is outside the range), both directions
/// redirected out (a LoadBalancer IP's flows SNATed to the route's preferred source); a router's
/// Packet Too Big about a reply reaches the remote backend about the
/// segment it sent, and a backend's port unreachable reaches the client about its datagram.
#[test]
fn tc6_nodeport_to_a_remote_backend_snats_and_translates_icmp_errors() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    n0.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:10:244:1::/64",
        "via",
        &PEER.to_string(),
    ])?;
    let (dp, mut maps) = loaded()?;
    remote_frontends(&mut maps)?;
    let np = (NODE, 30080);
    in_netns(&n0.netns, || {
        let redirected = |prog: &str, pkt: &[u8]| -> Result<Seen> {
            inspect(&run(&dp, prog, pkt, TC_ACT_REDIRECT)?)
        };
        let a = (CLIENT, SNAT_KEPT);
        let seen = redirected(INGRESS, &tcp(a, np, TCP_SYN))?;
        ensure!(
            seen == ((NODE, SNAT_KEPT), (REMOTE_POD, 8080)),
            "SNAT: {seen:?}"
        );
        let b = redirected(INGRESS, &tcp((CLIENT2, SNAT_KEPT), np, TCP_SYN))?;
        ensure!(
            b.0.0 == NODE && b.0.1 != SNAT_KEPT && nat_range(b.0.1) && b.1 == (REMOTE_POD, 8080),
            "SNAT port collision not avoided: {b:?}"
        );
        let c = redirected(INGRESS, &tcp((CLIENT, 40000), np, TCP_SYN))?;
        ensure!(
            c.0.0 == NODE && nat_range(c.0.1),
            "outside the range: {c:?}"
        );
        // The backend's answers come back here and go out to each client.
        let seen = redirected(
            INGRESS,
            &tcp((REMOTE_POD, 8080), (NODE, SNAT_KEPT), TCP_SYN | TCP_ACK),
        )?;
        ensure!(seen == (np, a), "reply: {seen:?}");
        let seen = redirected(INGRESS, &tcp((REMOTE_POD, 8080), b.0, TCP_SYN | TCP_ACK))?;
        ensure!(seen == (np, (CLIENT2, SNAT_KEPT)), "reply: {seen:?}");

        // A router's Packet Too Big about the reply to the first client.
        let router = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 1);
        let out = run(
            &dp,
            INGRESS,
            &icmp6(router, NODE, 2, 0, &tcp(np, a, TCP_ACK)),
            TC_ACT_REDIRECT,
        )?;
        let seen = inspect_icmp(&out)?;
        ensure!(
            seen == (router, REMOTE_POD, ((REMOTE_POD, 8080), (NODE, SNAT_KEPT))),
            "Packet Too Big of a SNATed flow: {seen:?}"
        );

        // UDP, and the backend's port unreachable about it reaching the client.
        let u = redirected(INGRESS, &udp((CLIENT, 41000), (NODE, 30053)))?;
        ensure!(
            u.0.0 == NODE && nat_range(u.0.1) && u.1 == (REMOTE_POD, 5353),
            "{u:?}"
        );
        let unreach = icmp6(REMOTE_POD, NODE, 1, 4, &udp(u.0, u.1));
        let out = run(&dp, INGRESS, &unreach, TC_ACT_REDIRECT)?;
        let seen = inspect_icmp(&out)?;
        ensure!(
            seen == (NODE, CLIENT, ((CLIENT, 41000), (NODE, 30053))),
            "port unreachable of a SNATed flow: {seen:?}"
        );

        let lb = redirected(INGRESS, &tcp((CLIENT, 40001), (LB_IP, 80), TCP_SYN))?;
        ensure!(
            lb.0.0 == NODE && nat_range(lb.0.1) && lb.1 == (REMOTE_POD, 8080),
            "LoadBalancer IP SNAT: {lb:?}"
        );
        let seen = redirected(INGRESS, &tcp((REMOTE_POD, 8080), lb.0, TCP_SYN | TCP_ACK))?;
        ensure!(seen == ((LB_IP, 80), (CLIENT, 40001)), "LB reply: {seen:?}");

        let stats = maps.stats()?;
        ensure!(stats[&Reason::Ns6Forwarded] == 5, "{stats:?}");
        ensure!(stats[&Reason::IcmpErrorTranslated] == 2, "{stats:?}");
        Ok(())
    })
}

/// An IPv6 LoadBalancer IP with `loadBalancerSourceRanges`: a client inside an IPv6 range of
/// its Service id gets in (DNAT), one outside is dropped and counted (`Ns6SourceRangeDenied`),
/// also when another Service's ranges hold it; widening the ranges admits it; the Service's
/// NodePort, which shares the backend set but carries no filter flag, admits everyone.
#[test]
fn tc6_load_balancer_ip_admits_only_its_ipv6_source_ranges() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (dp, mut maps) = loaded()?;
    let lb = (LB_IP, 80);
    frontend6(
        &mut maps,
        7,
        (LB_IP, 80, PROTO_TCP, SCOPE_ANY),
        SVC_F_LOADBALANCER | SVC_F_SOURCE_RANGES,
        0,
        &[(POD, 8080)],
        true,
    )?;
    frontend6(
        &mut maps,
        7,
        (Ipv6Addr::UNSPECIFIED, 30080, PROTO_TCP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &[(POD, 8080)],
        true,
    )?;
    let net = |s: &str| s.parse::<IpNetwork>();
    // CLIENT (::200) alone; CLIENT2 (::201) is only in another Service's range.
    maps.upsert_source_range(7, net("fd00:172:30::200/128")?)?;
    maps.upsert_source_range(8, net("fd00:172:30::/64")?)?;
    in_netns(&lab.node(0).netns, || {
        let out = run(&dp, INGRESS, &tcp((CLIENT, 40000), lb, TCP_SYN), TC_ACT_OK)?;
        ensure!(
            inspect(&out)? == ((CLIENT, 40000), (POD, 8080)),
            "allowed client"
        );
        run(
            &dp,
            INGRESS,
            &tcp((CLIENT2, 40000), lb, TCP_SYN),
            TC_ACT_SHOT,
        )?;
        // The NodePort of the same set is not filtered.
        let out = run(
            &dp,
            INGRESS,
            &tcp((CLIENT2, 40001), (NODE, 30080), TCP_SYN),
            TC_ACT_OK,
        )?;
        ensure!(inspect(&out)?.1 == (POD, 8080), "NodePort");
        let stats = maps.stats()?;
        ensure!(stats[&Reason::Ns6SourceRangeDenied] == 1, "{stats:?}");
        ensure!(stats[&Reason::Ns6Dnat] == 2, "{stats:?}");
        // A wider range of this Service's own admits the second client too.
        maps.upsert_source_range(7, net("fd00:172:30::200/127")?)?;
        let out = run(&dp, INGRESS, &tcp((CLIENT2, 40002), lb, TCP_SYN), TC_ACT_OK)?;
        ensure!(inspect(&out)?.1 == (POD, 8080), "widened range");
        let ranges = maps.dump()?.source_ranges;
        ensure!(
            ranges.len() == 3 && ranges.contains(&(7, net("fd00:172:30::200/127")?)),
            "{ranges:?}"
        );
        Ok(())
    })
}

/// The backend the Maglev table of `backends` (size `m`) gives the IPv6 flow `client` → `to`,
/// as the compiler builds the table and the kernel hashes the tuple (`flow_hash6`).
fn maglev_owner6(
    backends: &[Ipv6Addr],
    m: u32,
    client: (Ipv6Addr, u16),
    to: (Ipv6Addr, u16),
) -> Ipv6Addr {
    let identities: Vec<maglev::Identity> = backends
        .iter()
        .map(|&addr| maglev::Identity {
            addr: addr.into(),
            port: 8080,
        })
        .collect();
    let table = maglev::table(&identities, m);
    let h = flow_hash6(
        &a6(client.0),
        &a6(to.0),
        client.1.to_be(),
        to.1.to_be(),
        PROTO_TCP,
    );
    backends[table[usize::try_from(h % m).unwrap_or(0)]]
}

/// An IPv6 backend set with a Maglev table (one table format for both families: backend ids
/// in `BACKEND_SLOTS` above `MAGLEV_SLOT_BASE`): the kernel picks exactly the table's backend
/// for each flow's tuple, and a flow whose conntrack entries were lost returns to it.
#[test]
fn tc6_maglev_brings_evicted_flows_back_to_their_backend() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1).with_dual_stack())? else {
        return Ok(());
    };
    let (dp, mut maps) = loaded()?;
    let pods: Vec<Ipv6Addr> = (5..9)
        .map(|i| Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i))
        .collect();
    let set: Vec<(Ipv6Addr, u16)> = pods.iter().map(|p| (*p, 8080)).collect();
    frontend6(
        &mut maps,
        9,
        (Ipv6Addr::UNSPECIFIED, 30080, PROTO_TCP, SCOPE_ANY),
        SVC_F_NODEPORT,
        0,
        &set,
        true,
    )?;
    // The table over the set, as the compiler writes it, then the frontend pointing at it.
    let m = maglev::table_size(pods.len()).context("table size")?;
    let identities: Vec<maglev::Identity> = pods
        .iter()
        .map(|&addr| maglev::Identity {
            addr: addr.into(),
            port: 8080,
        })
        .collect();
    for (slot, owner) in (MAGLEV_SLOT_BASE..).zip(maglev::table(&identities, m)) {
        maps.upsert_slot(SlotKey { svc_id: 9, slot }, 90 + u32::try_from(owner)?)?;
    }
    maps.upsert_service6(
        ServiceKey6 {
            addr_be: [0; 4],
            port_be: 30080u16.to_be(),
            proto: PROTO_TCP,
            scope: SCOPE_ANY,
        },
        ServiceValue {
            svc_id: 9,
            backend_count: 4,
            flags: SVC_F_NODEPORT,
            affinity_timeout_s: 0,
            maglev_size: m,
        },
    )?;
    let np = (NODE, 30080);
    in_netns(&lab.node(0).netns, || {
        let mut used = std::collections::BTreeSet::new();
        for i in 0..32u16 {
            let c = (if i % 2 == 0 { CLIENT } else { CLIENT2 }, 43000 + i);
            let dst = inspect(&run(&dp, INGRESS, &tcp(c, np, TCP_SYN), TC_ACT_OK)?)?.1;
            ensure!(
                dst == (maglev_owner6(&pods, m, c, np), 8080),
                "{c:?} on {dst:?}"
            );
            // The flow's entries are lost (a reset removes them); the same tuple's next SYN
            // comes back to the same backend.
            run(&dp, INGRESS, &tcp(c, np, 0x04), TC_ACT_OK)?;
            let again = inspect(&run(&dp, INGRESS, &tcp(c, np, TCP_SYN), TC_ACT_OK)?)?.1;
            ensure!(again == dst, "{c:?}: {dst:?} then {again:?}");
            run(&dp, INGRESS, &tcp(c, np, 0x04), TC_ACT_OK)?;
            used.insert(dst);
        }
        ensure!(used.len() == pods.len(), "32 flows on {used:?}");
        Ok(())
    })
}
