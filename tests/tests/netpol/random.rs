//! Model-based test of the datapath (Cyclonus-style): rounds of random policies over the
//! topology, each round's expected matrices (TCP and UDP, ports 80 and 81) from the independent
//! model of the API, compared with what the kernel programs let through.
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use twill_policy_model::generate::Space;

use super::{Cluster, NAMESPACES};

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
    // cannot (pods a and b, namespaces x and y).
    for ns in NAMESPACES {
        c.set_label("Pod", ns, "a", "tier", "front")?;
        c.set_label("Pod", ns, "b", "tier", "back")?;
    }
    c.set_label("Namespace", "", "x", "env", "prod")?;
    c.set_label("Namespace", "", "y", "env", "dev")?;
    c.write_objects()?;
    let space = Space::of(&c.topology());
    for round in 0..ROUNDS {
        let policies = space.sample(&format!("r{round}-p"), seed.wrapping_add(round));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": policies});
        let yaml = serde_yaml::to_string(&list)?;
        let context = || format!("seed {seed}, round {round}, policies:\n{yaml}");
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
