//! `cargo xtask demo`: placeholder replaced below.
use anyhow::Result;

pub fn run() -> Result<()> {
    crate::setup::run()?;
    Ok(())
}
