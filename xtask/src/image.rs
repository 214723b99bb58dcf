//! `cargo xtask image`: Twill's node image `localhost/twill:<version>`, built here without
//! pulling anything (the recipe is `twill_lab::image`), as a docker-archive tarball.
use std::path::Path;

use anyhow::Result;

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::test::build_release_binaries()?;
    let version = env!("CARGO_PKG_VERSION");
    let name = twill_lab::image::image_name(version);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .to_owned();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let out = target.join("image").join(format!("twill-{version}.tar"));
    twill_lab::image::build(&target.join("release"), &name, &out)?;
    println!("image {name} written to {}", out.display());
    println!("load it with one of:");
    println!("  podman load -i {}", out.display());
    println!("  ctr -n k8s.io images import {}", out.display());
    Ok(())
}
