//! Kernel-program tests of the per-packet tc programs with `BPF_PROG_TEST_RUN`: hand-built
//! packets in, translated packets out, checksums verified byte for byte (like Katran's
//! fixtures). The programs run inside a lab node's network namespace (the test-run skb lives on
//! its loopback device); nothing is attached anywhere.
use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail, ensure};
use twill_agent::{
    datapath::{AyaLbMaps, Datapath, DatapathOptions},
    lbmap::LbMaps,
};
use twill_common::{
    BE_F_LOCAL, Backend, PROTO_TCP, PROTO_UDP, Reason, SCOPE_ANY, SVC_F_LOADBALANCER,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SlotKey,
};
use twill_lab::{LabSpec, require};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const NODE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 200);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
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

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
    u32::from(csum(&p, 0))
}

/// Ethernet + IPv4 + TCP (SYN) or UDP with valid checksums; `udp_csum: false` leaves the UDP
/// checksum 0 ("none").
fn packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, udp_csum: bool) -> Vec<u8> {
    let payload = b"hello";
    let l4_len = if proto == PROTO_TCP { 20 } else { 8 } + payload.len();
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    if proto == PROTO_TCP {
        l4[12] = 5 << 4; // data offset
        l4[13] = 0x02; // SYN
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        l4[20..].copy_from_slice(payload);
    } else {
        l4[4..6].copy_from_slice(&u16::try_from(l4_len).unwrap_or(0).to_be_bytes());
        l4[8..].copy_from_slice(payload);
    }
    let csum_off = if proto == PROTO_TCP { 16 } else { 6 };
    if proto == PROTO_TCP || udp_csum {
        let c = !csum(&l4, pseudo_sum(src.0, dst.0, proto, l4_len));
        l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&u16::try_from(20 + l4_len).unwrap_or(0).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.0.octets());
    ip[16..20].copy_from_slice(&dst.0.octets());
    let c = !csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&l4);
    pkt
}

/// What a translated packet says, after checking both checksums.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    l4_csum: u16,
}

fn inspect(pkt: &[u8]) -> Result<Seen> {
    ensure!(pkt.len() >= 14 + 20 + 8, "short packet {}", pkt.len());
    let ip = &pkt[14..34];
    ensure!(csum(ip, 0) == 0xffff, "bad IPv4 header checksum");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &pkt[34..];
    let csum_off = if proto == PROTO_TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    if proto == PROTO_TCP || l4_csum != 0 {
        ensure!(
            csum(l4, pseudo_sum(src, dst, proto, l4.len())) == 0xffff,
            "bad {} checksum",
            if proto == PROTO_TCP { "TCP" } else { "UDP" }
        );
    }
    Ok(Seen {
        src: (src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: (dst, u16::from_be_bytes([l4[2], l4[3]])),
        l4_csum,
    })
}

/// `BPF_PROG_TEST_RUN` (aya 0.14 has no wrapper): returns (program return value, packet out).
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

fn service(
    maps: &mut AyaLbMaps,
    svc_id: u32,
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    flags: u16,
) -> Result<()> {
    let id = svc_id * 10;
    let backend_port = if proto == PROTO_TCP { 8080u16 } else { 5353 };
    maps.upsert_backend(
        id,
        Backend {
            addr_be: be(POD),
            port_be: backend_port.to_be(),
            proto,
            flags: BE_F_LOCAL,
        },
    )?;
    maps.upsert_slot(SlotKey { svc_id, slot: 0 }, id)?;
    let key = ServiceKey {
        addr_be: be(addr),
        port_be: port.to_be(),
        proto,
        scope: SCOPE_ANY,
    };
    maps.upsert_service(
        key,
        ServiceValue {
            svc_id,
            backend_count: 1,
            flags,
            affinity_timeout_s: 0,
            _pad: 0,
        },
    )?;
    Ok(())
}

fn in_netns<T>(netns: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: setns on this thread with a namespace fd we hold.
            unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
        }
    }
    let home = Restore(File::open("/proc/thread-self/ns/net")?);
    let target = File::open(format!("/var/run/netns/{netns}"))?;
    // SAFETY: as above.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let r = f();
    drop(home);
    r
}

/// Runs every fixture through the programs (inside a lab netns).
fn run_fixtures(dp: &Datapath) -> Result<()> {
    // TCP SYN to the NodePort: DNAT to the local backend, client kept.
    let (rc, out) = test_run(
        dp,
        "twill_tc_ingress",
        &packet((CLIENT, 40000), (NODE, 30080), PROTO_TCP, true),
    )?;
    ensure!(rc == TC_ACT_OK, "ingress verdict {rc}");
    let seen = inspect(&out)?;
    ensure!(
        seen.src == (CLIENT, 40000) && seen.dst == (POD, 8080),
        "{seen:?}"
    );
    // The backend's reply leaving the node: source back to the NodePort.
    let (rc, out) = test_run(
        dp,
        "twill_tc_egress",
        &packet((POD, 8080), (CLIENT, 40000), PROTO_TCP, true),
    )?;
    ensure!(rc == TC_ACT_OK, "egress verdict {rc}");
    let seen = inspect(&out)?;
    ensure!(
        seen.src == (NODE, 30080) && seen.dst == (CLIENT, 40000),
        "{seen:?}"
    );

    // A reset from the client ends the flow: both CT entries go (checked below by count).
    let mut rst = packet((CLIENT, 40001), (NODE, 30080), PROTO_TCP, true);
    let (rc, _) = test_run(dp, "twill_tc_ingress", &rst)?;
    ensure!(rc == TC_ACT_OK, "second SYN verdict {rc}");
    // Turn the SYN into a RST (flags 0x04) and fix the TCP checksum for the changed word.
    let flags_word = |p: &[u8]| u32::from(u16::from_be_bytes([p[34 + 12], p[34 + 13]]));
    let old = flags_word(&rst);
    rst[34 + 13] = 0x04;
    let new = flags_word(&rst);
    let c = u32::from(!u16::from_be_bytes([rst[34 + 16], rst[34 + 17]]));
    let c = !csum(&[], c + (!old & 0xffff) + new);
    rst[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    let (rc, out) = test_run(dp, "twill_tc_ingress", &rst)?;
    ensure!(rc == TC_ACT_OK, "RST verdict {rc}");
    let seen = inspect(&out)?;
    ensure!(seen.dst == (POD, 8080), "RST not translated: {seen:?}");

    // UDP with and without a checksum: a zero checksum stays zero ("no checksum").
    for with_csum in [true, false] {
        let sport = if with_csum { 41000 } else { 41001 };
        let (rc, out) = test_run(
            dp,
            "twill_tc_ingress",
            &packet((CLIENT, sport), (NODE, 30053), PROTO_UDP, with_csum),
        )?;
        ensure!(rc == TC_ACT_OK, "UDP ingress verdict {rc}");
        let seen = inspect(&out)?;
        ensure!(seen.dst == (POD, 5353), "{seen:?}");
        ensure!(
            (seen.l4_csum == 0) != with_csum,
            "UDP checksum presence changed: {seen:?}"
        );
    }

    // Not a Service: untouched.
    let pkt = packet((CLIENT, 40000), (NODE, 22), PROTO_TCP, true);
    let (rc, out) = test_run(dp, "twill_tc_ingress", &pkt)?;
    ensure!(
        rc == TC_ACT_OK && out == pkt,
        "a non-Service packet was changed"
    );

    // loadBalancerSourceRanges without any matching range: dropped.
    let (rc, _) = test_run(
        dp,
        "twill_tc_ingress",
        &packet((CLIENT, 40000), (LB_IP, 80), PROTO_TCP, true),
    )?;
    ensure!(
        rc == TC_ACT_SHOT,
        "source-range violation not dropped: {rc}"
    );

    // An IPv4 header length below the minimum (IHL 3): dropped as malformed. (Shorter
    // buffers never reach the program: the test-run path itself rejects them.)
    let mut bad = packet((CLIENT, 40000), (NODE, 30080), PROTO_TCP, true);
    bad[14] = 0x43;
    let (rc, _) = test_run(dp, "twill_tc_ingress", &bad)?;
    ensure!(rc == TC_ACT_SHOT, "malformed packet not dropped: {rc}");
    Ok(())
}

#[test]
fn tc_fixtures_translate_both_directions_with_valid_checksums() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let mut dp = Datapath::load(&DatapathOptions::unpinned())?;
    for name in ["twill_tc_ingress", "twill_tc_egress"] {
        let p: &mut aya::programs::SchedClassifier =
            dp.ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut maps = dp.lb_maps()?;
    maps.upsert_node_addr(be(NODE), 0)?;
    service(
        &mut maps,
        1,
        Ipv4Addr::UNSPECIFIED,
        30080,
        PROTO_TCP,
        SVC_F_NODEPORT,
    )?;
    service(
        &mut maps,
        2,
        Ipv4Addr::UNSPECIFIED,
        30053,
        PROTO_UDP,
        SVC_F_NODEPORT,
    )?;
    service(
        &mut maps,
        3,
        LB_IP,
        80,
        PROTO_TCP,
        SVC_F_LOADBALANCER | SVC_F_SOURCE_RANGES,
    )?;

    in_netns(&lab.node(0).netns, || run_fixtures(&dp))?;

    let stats = maps.stats()?;
    for (reason, min) in [
        (Reason::Translated, 3),
        (Reason::RevNatApplied, 1),
        (Reason::SourceRangeDenied, 1),
        (Reason::Malformed, 1),
        (Reason::NotService, 1),
    ] {
        if stats[&reason] < min {
            bail!("{reason:?} counted {} < {min}: {stats:?}", stats[&reason]);
        }
    }
    let ct = maps.dump_ct()?;
    ensure!(
        ct.len() == 6,
        "expected 2 CT entries for each of 3 flows, got {ct:?}"
    );
    Ok(())
}
