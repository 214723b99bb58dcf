//! Enforcement lives in the kernel: it outlives the agents.
use anyhow::{Result, ensure};

use super::{Cluster, PODS, Reachability, policy};

/// Enforcement lives in the kernel: with the agents stopped the pinned links keep the programs
/// on every pod veth, and restarted agents adopt maps and links without a gap.
#[test]
fn policies_stay_enforced_while_the_agents_restart() -> Result<()> {
    let Some(mut c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    c.expect(&want, 80, false)?;
    for a in &mut c.agents {
        a.stop()?;
    }
    ensure!(
        c.probe(80, false)? == want,
        "enforcement stopped with the agents"
    );
    for a in &mut c.agents {
        a.restart()?;
    }
    ensure!(c.probe(80, false)? == want, "enforcement gap at restart");
    // The restarted agents still follow changes.
    c.delete("deny.yaml")?;
    c.expect(&Reachability::all(true), 80, false)?;
    Ok(())
}
