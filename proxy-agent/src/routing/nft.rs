//! Runs the egress masquerade ruleset ([`MasqueradeRules`], rendered in twill-core) through
//! `nft -f -` in the current network namespace: the one side effect of the masquerade.
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;

use super::{MasqueradeRules, RoutingError};

/// Replaces the agent's table in the current network namespace, in one transaction.
pub async fn apply(rules: &MasqueradeRules) -> Result<(), RoutingError> {
    nft(&rules.render()).await
}

/// Removes the agent's tables, IPv4 and IPv6 (no error when they are absent, nor when nftables
/// is not installed: then no table can exist).
pub async fn remove() -> Result<(), RoutingError> {
    for script in [
        <MasqueradeRules>::render_remove(),
        twill_core::routing::Masquerade6Rules::render_remove(),
    ] {
        match nft(&script).await {
            Err(RoutingError::NftSpawn(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

pub(super) async fn nft(script: &str) -> Result<(), RoutingError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(RoutingError::NftSpawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(RoutingError::NftSpawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(RoutingError::NftSpawn)?;
    if !out.status.success() {
        return Err(RoutingError::NftFailed {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
