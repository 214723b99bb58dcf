//! Per-packet cost of the pod programs with and without NetworkPolicy, measured with
//! `BPF_PROG_TEST_RUN` (the kernel times the runs itself, so the machine's load shows only as
//! spread, not as the scheduler's share): a client → server pair on one node with the eBPF host
//! routing on, as in `cargo xtask bench policy`, where the client's `twill_pod_ingress` judges
//! the client's egress and, for the redirect into the server, the server's ingress.
//!
//! Packets: a new flow's SYN (a fresh tuple each run), a later packet of the established flow,
//! and a reply (server → client, through the server's `twill_pod_ingress`). "none": no pod is
//! selected by a policy; "policy": both pods isolated both ways with one allow rule, among
//! `FILLER_PODS` pod identities and `FILLER_RULES` rule entries. The pod identities are placed
//! both ways in interleaved samples: as /32 entries of the ipcache trie (the layout before the
//! host hash; the program's hash lookup then misses first) and in the host hash.
//!
//! Numbers only, no assertions. Root, in a network namespace of its own (the test-run skb
//! lives on its loopback; nothing is attached anywhere):
//! `unshare -n target/release/examples/pod_prog_cost`.
use std::{net::Ipv4Addr, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key};
use twill_agent::datapath::{Datapath, DatapathOptions};
use twill_common::{
    CtKey, CtValue, FP_F_HOST_ROUTING, FastPathConfig, IpCacheKey, LXC_F_MAC_KNOWN, LocalEndpoint,
    PEP_F_EGRESS_ISOLATED, PEP_F_INGRESS_ISOLATED, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
    POLICY_PREFIX_PORT_BASE, PeerIdentity, PolicyEndpoint, PolicyKey, PolicyVerdict,
};

const PROG: &str = "twill_pod_ingress";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
const PORT: u16 = 8080;
const FILLER_PODS: u32 = 10_000;
const FILLER_RULES: u32 = 2_000;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Runs per timed test run of an established-flow packet: the run repeats on the same skb, and
/// each delivery decrements its TTL (255 at the start), so at most 250.
const REPEAT: u32 = 200;
/// Timed test runs per established-flow sample.
const BATCHES: u32 = 50;
/// New flows per timed sample (one test run each).
const NEW_FLOWS: u16 = 2_000;
const SAMPLES: usize = 7;

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// Ethernet + IPv4 + TCP, checksums left zero (the programs do not verify them).
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20 + 1];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&41u16.to_be_bytes());
    ip[8] = 255;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.0.octets());
    ip[16..20].copy_from_slice(&dst.0.octets());
    let l4 = &mut p[34..54];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    p
}

/// `BPF_PROG_TEST_RUN` with `repeat`: (return value, mean ns per run as the kernel timed it).
fn test_run(fd: u32, data: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&fd.to_ne_bytes());
    attr[8..12].copy_from_slice(&u32::try_from(data.len())?.to_ne_bytes());
    attr[12..16].copy_from_slice(&u32::try_from(out.len())?.to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    // SAFETY: attr describes valid in/out buffers of the sizes given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 10, attr.as_mut_ptr(), attr.len()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    Ok((
        u32::from_ne_bytes(attr[4..8].try_into()?),
        u32::from_ne_bytes(attr[36..40].try_into()?),
    ))
}

struct Maps {
    pep: HashMap<MapData, u32, PolicyEndpoint>,
    /// Pod identities go where the agent writes /32 entries: the host hash in front of the trie
    /// (`twill_core::policymap::IpCacheSlot`); the trie holds one ipBlock-like /16, so a peer
    /// outside every pod still walks it.
    ipc_hosts: HashMap<MapData, IpCacheKey, PeerIdentity>,
    ipc: LpmTrie<MapData, IpCacheKey, PeerIdentity>,
    pol: LpmTrie<MapData, PolicyKey, PolicyVerdict>,
    ct: HashMap<MapData, CtKey, CtValue>,
}

fn rule(ep: u32, dir: u8, id: u32, port: u16) -> Key<PolicyKey> {
    Key::new(
        POLICY_PREFIX_PORT_BASE + 16,
        PolicyKey {
            ep_id_be: ep.to_be(),
            direction: dir,
            _pad: [0; 3],
            identity_be: id.to_be(),
            proto: 6,
            _pad2: 0,
            port_be: port.to_be(),
        },
    )
}

fn ipc(addr: u32, id: u32) -> (IpCacheKey, PeerIdentity) {
    (IpCacheKey { addr_be: addr }, PeerIdentity { id })
}

fn bytemuck_zeroed<T: aya::Pod>() -> T {
    // SAFETY: aya::Pod types are plain old data; zero is a valid value.
    unsafe { core::mem::zeroed() }
}

impl Maps {
    fn setup(dp: &mut Datapath) -> Result<Self> {
        let mut take = |n: &str| dp.ebpf.take_map(n).with_context(|| n.to_owned());
        let mut lxc: HashMap<MapData, u32, LocalEndpoint> = take("TWL_LXC_V1")?.try_into()?;
        let mut fp: Array<MapData, FastPathConfig> = take("TWL_FPCFG_V1")?.try_into()?;
        let mut m = Self {
            pep: take("TWL_PEP_V1")?.try_into()?,
            ipc_hosts: take("TWL_IPCH_V1")?.try_into()?,
            ipc: take("TWL_IPC_V1")?.try_into()?,
            pol: take("TWL_POL_V1")?.try_into()?,
            ct: take("TWL_CT_V2")?.try_into()?,
        };
        for a in [CLIENT, SERVER] {
            // ifindex 1: the test run's loopback, so source-address validation passes.
            let ep = LocalEndpoint {
                ifindex: 1,
                flags: LXC_F_MAC_KNOWN,
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
            };
            lxc.insert(be(a), ep, 0)?;
        }
        fp.set(
            0,
            FastPathConfig {
                flags: FP_F_HOST_ROUTING,
                ..bytemuck_zeroed()
            },
            0,
        )?;
        // The cluster's other pods (placed by `place_pods`) and rules, for realistic depths.
        let block = Key::new(
            16,
            IpCacheKey {
                addr_be: be(Ipv4Addr::new(192, 168, 0, 0)),
            },
        );
        m.ipc.insert(&block, PeerIdentity { id: 999 }, 0)?;
        for i in 0..FILLER_RULES {
            let k = rule(100 + i, POLICY_DIR_INGRESS, 1000 + i % 1000, 8080);
            m.pol.insert(&k, PolicyVerdict { rule_id: i + 10 }, 0)?;
        }
        m.pol.insert(
            &rule(1, POLICY_DIR_EGRESS, 257, PORT),
            PolicyVerdict { rule_id: 1 },
            0,
        )?;
        m.pol.insert(
            &rule(2, POLICY_DIR_INGRESS, 256, PORT),
            PolicyVerdict { rule_id: 2 },
            0,
        )?;
        Ok(m)
    }

    /// Every pod identity (the fillers, client and server) as a /32 of the trie (`hosts`:
    /// false; the layout before the host hash, whose lookup then misses first) or in the host
    /// hash (true; where the agent writes them).
    fn place_pods(&mut self, hosts: bool) -> Result<()> {
        let pods = (0..FILLER_PODS)
            .map(|i| ipc(be(Ipv4Addr::from(0x0af4_1000 + i)), 1000 + i % 1000))
            .chain([ipc(be(CLIENT), 256), ipc(be(SERVER), 257)]);
        for (k, v) in pods {
            let trie_key = Key::new(32, k);
            if hosts {
                self.ipc_hosts.insert(k, v, 0)?;
                let _ = self.ipc.remove(&trie_key);
            } else {
                self.ipc.insert(&trie_key, v, 0)?;
                let _ = self.ipc_hosts.remove(&k);
            }
        }
        Ok(())
    }

    /// Selects both pods (isolated both ways) or none.
    fn policy(&mut self, on: bool) -> Result<()> {
        for (a, ep_id) in [(CLIENT, 1), (SERVER, 2)] {
            if on {
                let flags = PEP_F_INGRESS_ISOLATED | PEP_F_EGRESS_ISOLATED;
                self.pep.insert(be(a), PolicyEndpoint { ep_id, flags }, 0)?;
            } else {
                let _ = self.pep.remove(&be(a));
            }
        }
        Ok(())
    }

    fn clear_ct(&mut self) -> Result<()> {
        let keys: Vec<CtKey> = self.ct.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = self.ct.remove(&k);
        }
        Ok(())
    }
}

/// ns per packet: new flows, an established flow's packet, its reply.
fn sample(fd: u32, maps: &mut Maps, round: u16) -> Result<[f64; 3]> {
    maps.clear_ct()?;
    let base = 10_000 + (round % 8) * NEW_FLOWS;
    let mut total = 0u64;
    for i in 0..NEW_FLOWS {
        let (rc, ns) = test_run(fd, &tcp((CLIENT, base + i), (SERVER, PORT), TCP_SYN), 1)?;
        if rc != 7 {
            bail!("SYN: action {rc}, not a redirect");
        }
        total += u64::from(ns);
    }
    let client = (CLIENT, base);
    // The handshake's reply, so the flow is established, then the timed packets.
    test_run(fd, &tcp((SERVER, PORT), client, TCP_SYN | TCP_ACK), 1)?;
    let mut fwd = 0u64;
    let mut rev = 0u64;
    for _ in 0..BATCHES {
        let (rc1, f) = test_run(fd, &tcp(client, (SERVER, PORT), TCP_ACK), REPEAT)?;
        let (rc2, r) = test_run(fd, &tcp((SERVER, PORT), client, TCP_ACK), REPEAT)?;
        if rc1 != 7 || rc2 != 7 {
            bail!("established packets: actions {rc1}/{rc2}, not redirects");
        }
        fwd += u64::from(f);
        rev += u64::from(r);
    }
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    Ok([
        total as f64 / f64::from(NEW_FLOWS),
        fwd as f64 / f64::from(BATCHES),
        rev as f64 / f64::from(BATCHES),
    ])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut dp = Datapath::load(&DatapathOptions::unpinned())?;
    let p: &mut aya::programs::SchedClassifier =
        dp.ebpf.program_mut(PROG).context(PROG)?.try_into()?;
    p.load()?;
    let info = p.info()?;
    let fd = u32::try_from(std::os::fd::AsFd::as_fd(p.fd()?).as_raw_fd())?;
    println!(
        "{PROG}: {} instructions verified, {} bytes translated, {} bytes JITed",
        info.verified_instruction_count().unwrap_or(0),
        info.size_translated().unwrap_or(0),
        info.size_jitted()
    );
    let mut maps = Maps::setup(&mut dp)?;
    // [placement][policy off/on][packet]: placement 0 = pod identities in the trie, 1 = in the
    // host hash; every round samples all four, in a fixed order, so load changes fall on each.
    let mut ns: [[[Vec<f64>; 3]; 2]; 2] = Default::default();
    for round in 0..SAMPLES {
        let r = u16::try_from(round)?;
        for (placement, hosts) in [false, true].into_iter().enumerate() {
            maps.place_pods(hosts)?;
            for (policy, on) in [false, true].into_iter().enumerate() {
                maps.policy(on)?;
                let s = sample(fd, &mut maps, r)?;
                for (v, x) in ns[placement][policy].iter_mut().zip(s) {
                    v.push(x);
                }
            }
        }
    }
    println!("ns per packet (median of {SAMPLES} interleaved samples)");
    for (placement, title) in [
        "pod identities in the ipcache trie (before the host hash)",
        "pod identities in the host hash (as the agent writes them)",
    ]
    .iter()
    .enumerate()
    {
        println!("{title}");
        println!(
            "  {:<28} {:>8} {:>8} {:>8}",
            "packet", "none", "policy", "extra"
        );
        for (i, what) in [
            "SYN (new flow)",
            "established, client->server",
            "reply, server->client",
        ]
        .iter()
        .enumerate()
        {
            let [none, pol] = &mut ns[placement];
            let (a, b) = (median(&mut none[i]), median(&mut pol[i]));
            println!("  {what:<28} {a:>8.0} {b:>8.0} {:>8.0}", b - a);
        }
    }
    Ok(())
}
