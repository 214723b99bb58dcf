//! The lab itself: nodes reach each other on the underlay, nothing reaches outside the lab, and a
//! dropped lab (also by panic) leaves nothing behind.
use std::path::Path;

use anyhow::Result;
use twill_lab::{LabSpec, require};

fn netns_with(run_id: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(run_id))
        .map(str::to_owned)
        .collect()
}

#[test]
fn nodes_share_an_underlay_and_nothing_else() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2).with_external_client())? else {
        return Ok(());
    };
    let (n0, n1) = (lab.node(0), lab.node(1));
    n0.run(&["ping", "-c1", "-W2", &n1.ip.to_string()])?;
    lab.external()
        .cmd("ping")
        .args(["-c1", "-W2", &n0.ip.to_string()])
        .status()?
        .success()
        .then_some(())
        .ok_or_else(|| anyhow::anyhow!("external client cannot reach n0"))?;
    // No default route in a node: the lab cannot reach a real network.
    let routes = n0.run(&["ip", "route"])?;
    assert!(
        !routes.contains("default"),
        "lab node has a default route: {routes}"
    );
    // Node processes land in the node's cgroup.
    let out = n0.run(&["cat", "/proc/self/cgroup"])?;
    assert!(
        out.contains(&format!("twill-lab/{}/n0", lab.run_id)),
        "not in the node cgroup: {out}"
    );
    Ok(())
}

#[test]
fn teardown_removes_everything_even_on_panic() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let run_id = lab.run_id.clone();
    let (cgroup, bpffs, dir) = (
        lab.node(0).cgroup.clone(),
        lab.node(0).bpffs.clone(),
        lab.dir.clone(),
    );
    assert!(!netns_with(&run_id).is_empty());
    // A background process in the node must die with the lab.
    let child = lab.node(0).cmd("sleep").arg("300").spawn()?;
    let pid = child.id();
    lab.track(child);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    assert!(
        netns_with(&run_id).is_empty(),
        "namespaces left: {:?}",
        netns_with(&run_id)
    );
    for p in [&cgroup, &bpffs, &dir] {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} survived teardown"
    );
    Ok(())
}
