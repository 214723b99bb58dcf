//! What socket-level Service translation adds to a `connect()`, timed on real sockets: a client
//! pod of a lab node (the datapath loaded and attached to the node's cgroup, no agent) runs
//! `loadgen connect-cost` against a ClusterIP and, interleaved in every round, against a backend
//! pod's own address. Both run the same hooks; the ClusterIP's connect also looks the Service up,
//! picks a backend and remembers it for `getpeername`/`recvmsg`. The per-round difference is that
//! work; rounds interleave, so a change of the machine's load falls on both targets alike.
//!
//! UDP (the default) sends no packet: the difference is the hook's work alone, against the rest
//! of `socket()` + `connect()` + `close()`. TCP adds the handshake and the reset, which is the
//! connection a `connect + close` client pays for.
//!
//! Numbers only, no assertions. Root (the lab's rules: its own namespaces and cgroup):
//! `cargo run -p twill-lab --example sock_connect_cost -- [--proto udp|tcp] [--rounds 21]
//! [--per-round 20000] [--warmup 300000]`. The warm-up connects to the ClusterIP first, so a
//! table filled per connection (the reverse-NAT LRU, 262,144 entries) is measured full, as it
//! is on a node that has been serving for a while.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use twill_agent::{
    datapath::{AyaLbMaps, Datapath, DatapathOptions},
    lbmap::LbMaps,
};
use twill_common::{
    Backend, PROTO_TCP, PROTO_UDP, Reason, SCOPE_ANY, SVC_F_CLUSTER_IP, ServiceKey, ServiceValue,
    SlotKey,
};
use twill_lab::{LabSpec, addr_be as be, bench::loadgen::ConnectCostReport, bin, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name}: a value")),
        None => Ok(default),
    }
}

/// `VIP:PORT/proto` → the backends (ids 1, 2, …), as the agent's compiler would write it.
fn program(maps: &mut AyaLbMaps, proto: u8, backends: &[Ipv4Addr]) -> Result<()> {
    for (i, ip) in backends.iter().enumerate() {
        let id = u32::try_from(i)? + 1;
        let backend = Backend {
            addr_be: be(*ip),
            port_be: PORT.to_be(),
            proto,
            flags: 0,
        };
        maps.upsert_backend(id, backend)?;
        let slot = SlotKey {
            svc_id: 1,
            slot: u32::try_from(i)?,
        };
        maps.upsert_slot(slot, id)?;
    }
    let key = ServiceKey {
        addr_be: be(VIP),
        port_be: PORT.to_be(),
        proto,
        scope: SCOPE_ANY,
    };
    let value = ServiceValue {
        svc_id: 1,
        backend_count: u16::try_from(backends.len())?,
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout_s: 0,
        maglev_size: 0,
    };
    maps.upsert_service(key, value)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let proto: String = flag(&args, "--proto", "udp".to_owned())?;
    let tcp = proto == "tcp";
    let rounds: u32 = flag(&args, "--rounds", 21)?;
    let per_round: u32 = flag(&args, "--per-round", if tcp { 2_000 } else { 20_000 })?;
    let warmup: u32 = flag(&args, "--warmup", 300_000)?;
    let Some(lab) = require(LabSpec::nodes(1))? else {
        bail!("the lab needs root, cgroup v2 and bpffs");
    };
    let node = lab.node(0);
    let mut dp = Datapath::load(&DatapathOptions::unpinned())?;
    dp.attach_cgroup(&node.cgroup)?;
    let mut maps = dp.lb_maps()?;
    let client = node.add_pod("client")?;
    let mut backends = Vec::new();
    for i in 0..2 {
        let pod = node.add_pod(&format!("be{i}"))?;
        lab.serve(&pod, &format!("be{i}"), Some(PORT), None)?;
        backends.push(pod.ip);
    }
    program(
        &mut maps,
        if tcp { PROTO_TCP } else { PROTO_UDP },
        &backends,
    )?;
    let vip = format!("{VIP}:{PORT}");
    let direct = format!("{}:{PORT}", backends[0]);
    let run = |to: &str, rounds: u32, per_round: u32| -> Result<ConnectCostReport> {
        let out = client
            .cmd(bin("loadgen"))
            .args(["connect-cost", "--to", to, "--proto", &proto])
            .args(["--rounds", &rounds.to_string()])
            .args(["--per-round", &per_round.to_string()])
            .output()
            .context("loadgen")?;
        if !out.status.success() {
            bail!("loadgen: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    if warmup > 0 {
        run(&vip, 1, warmup)?;
    }
    let before = maps.stats()?;
    let r = run(&format!("{vip},{direct}"), rounds, per_round)?;
    let after = maps.stats()?;
    if r.failures > 0 {
        bail!("{} failed connects: {:?}", r.failures, r.first_error);
    }
    let translated = after.get(&Reason::Translated).copied().unwrap_or(0)
        - before.get(&Reason::Translated).copied().unwrap_or(0);
    let full = after.get(&Reason::RevNatMapFull).copied().unwrap_or(0);
    println!(
        "{proto}: {rounds} rounds x {per_round} connects per target, {translated} translated, reverse-NAT full {full}"
    );
    println!("ns per socket+connect+close, median of rounds (per-round difference min .. max)");
    println!(
        "{:<16} {:>10} {:>10} {:>10}",
        "clock", "ClusterIP", "backend", "adds"
    );
    for (clock, ns) in [("thread CPU", &r.cpu_ns), ("wall", &r.ns)] {
        let via: Vec<f64> = ns.iter().map(|row| row[0]).collect();
        let to_be: Vec<f64> = ns.iter().map(|row| row[1]).collect();
        let diff: Vec<f64> = ns.iter().map(|row| row[0] - row[1]).collect();
        let (lo, hi) = diff
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
        println!(
            "{clock:<16} {:>10.0} {:>10.0} {:>10.0}   ({lo:.0} .. {hi:.0})",
            median(via),
            median(to_be),
            median(diff)
        );
    }
    drop(maps);
    drop(dp);
    drop(lab);
    Ok(())
}
