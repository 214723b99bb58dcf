//! Model-based test of the datapath (Cyclonus-style): rounds of random policies over the
//! topology, each round's expected matrices (TCP and UDP, ports 80 and 81) from the independent
//! model of the API, compared with what the kernel programs let through.
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use twill_policy_model::generate::Space;

use super::{Cluster, NAMESPACES, PODS};

/// Rounds per run: each is a fresh set of 1 to 4 policies and four probed matrices.
const ROUNDS: u64 = 6;
/// Replays a run: `TWILL_NETPOL_SEED=<seed printed by the failing run>`.
const SEED_VAR: &str = "TWILL_NETPOL_SEED";

#[test]
fn random_policies_are_enforced_as_the_model_of_the_api_says() -> Result<()> {
    let seed = match std::env::var(SEED_VAR) {
        Ok(s) => s.parse().with_context(|| format!("{SEED_VAR}={s}"))?,
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)?
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    eprintln!("random policies: seed {seed} (replay with {SEED_VAR}={seed})");
    let Some(mut c) = Cluster::new()? else {
        return Ok(());
    };
    // A second label key on pods and namespaces, so selectors can pick sets upstream's labels
    // cannot; from round 1 on its values change with the policies (identities change under
    // rules that stay, and the other way round).
    // Round 0: pods a, b, c are front, back, batch; namespaces prod, dev, prod. Later rounds
    // draw each value from the seed.
    let draw = |round: u64, what: u64, n: u64, first: u64| {
        let pick = if round == 0 {
            first
        } else {
            mix(seed ^ (round << 32) ^ what)
        };
        usize::try_from(pick % n).unwrap_or(0)
    };
    let relabel = |c: &mut Cluster, round: u64| -> Result<String> {
        let mut labels = String::new();
        for (i, ns) in (0u64..).zip(NAMESPACES) {
            let env = ["prod", "dev"][draw(round, i, 2, i)];
            c.set_label("Namespace", "", ns, "env", env)?;
            writeln!(labels, "namespace {ns}: env={env}")?;
            for (j, pod) in (0u64..).zip(PODS) {
                let tier = ["front", "back", "batch"][draw(round, 16 + 4 * i + j, 3, j)];
                c.set_label("Pod", ns, pod, "tier", tier)?;
                writeln!(labels, "pod {ns}/{pod}: tier={tier}")?;
            }
        }
        c.write_objects()?;
        Ok(labels)
    };
    relabel(&mut c, 0)?;
    let space = Space::of(&c.topology());
    for round in 0..ROUNDS {
        let labels = relabel(&mut c, round)?;
        let policies = space.sample(&format!("r{round}-p"), seed.wrapping_add(round));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": policies});
        let yaml = serde_yaml::to_string(&list)?;
        let context = || format!("seed {seed}, round {round}, labels:\n{labels}policies:\n{yaml}");
        c.apply("random.yaml", &yaml).with_context(context)?;
        c.wait_compiled().with_context(context)?;
        let mut denied = 0;
        for (port, udp) in [(80, false), (81, false), (80, true), (81, true)] {
            let want = c.model(port, udp);
            denied += want.cells.values().filter(|ok| !**ok).count();
            c.expect(&want, port, udp).with_context(context)?;
        }
        eprintln!(
            "round {round}: {} policies, {denied} of {} probes denied, as the model says",
            policies.len(),
            4 * 81
        );
    }
    Ok(())
}

/// splitmix64: the label draws, a pure function of the seed.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
