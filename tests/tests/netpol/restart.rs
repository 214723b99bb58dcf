//! Enforcement lives in the kernel: it outlives the agents.
use anyhow::{Result, ensure};

use super::{Cluster, PODS, POLICY_FILE, Reachability, TCP, policy};

/// Enforcement lives in the kernel: with the agents stopped the pinned links keep the programs
/// on every pod veth, and restarted agents adopt maps and links without a gap.
#[test]
fn policies_stay_enforced_while_the_agents_restart() -> Result<()> {
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    let Some(mut c) = Cluster::enforcing(
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
        &[(&want, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    for a in &mut c.agents {
        a.stop()?;
    }
    ensure!(
        c.probe(80, TCP)? == want,
        "enforcement stopped with the agents"
    );
    for a in &mut c.agents {
        a.restart()?;
    }
    ensure!(c.probe(80, TCP)? == want, "enforcement gap at restart");
    // The restarted agents still follow changes.
    c.delete(POLICY_FILE)?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    Ok(())
}
