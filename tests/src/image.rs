//! Twill's node image built on this machine without pulling anything (`cargo xtask image`).
//!
//! The `Dockerfile` builds from `debian:bookworm-slim` plus a few packages; no registry can be
//! reached here, so the same content comes from Debian's packages instead: `debootstrap
//! --variant=minbase` of the same suite with the same packages (from the mirror apt already
//! uses), as one layer, plus `twill-agent` and `twill-cni` in `/usr/local/bin`, assembled `FROM
//! scratch` with `buildah` (vfs storage in a throw-away directory) and written as a
//! docker-archive tarball that `podman load` and `ctr images import` read. The debootstrapped
//! base is cached in the machine's cache directory (it takes a few minutes to make).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{cache_dir, run_cmd, scratch_dir, which};

/// The Debian suite of the Dockerfile's runtime stage (`debian:bookworm-slim`).
pub const SUITE: &str = "bookworm";
/// The Dockerfile's `apt-get install` list: nftables for the agent's masquerade table (`nft
/// -f`), iproute2 for debugging and the uninstall guide, mount for the mount-bpffs init
/// container, ca-certificates for the API server's TLS.
pub const PACKAGES: &[&str] = &["ca-certificates", "iproute2", "nftables", "mount"];
/// Bumped when the base recipe changes, so an older cached base is not used.
const BASE_RECIPE: u32 = 1;

/// The image name for a version: what `deploy/daemonset.yaml` refers to.
pub fn image_name(version: &str) -> String {
    format!("localhost/twill:{version}")
}

/// Builds image `name` from the binaries in `bin_dir` into the docker-archive `out`.
pub fn build(bin_dir: &Path, name: &str, out: &Path) -> Result<()> {
    let base = base_tarball()?;
    for bin in ["twill-agent", "twill-cni"] {
        if !bin_dir.join(bin).is_file() {
            bail!("{} is missing: build it first", bin_dir.join(bin).display());
        }
    }
    let parent = out.parent().context("output path has no directory")?;
    fs::create_dir_all(parent)?;
    let work = scratch_dir(parent, ".twill-image")?;
    let result = (|| -> Result<()> {
        let buildah = |args: &[&str]| Buildah(&work).run(args);
        let ctr = buildah(&["from", "scratch"])?;
        // A local tar archive is extracted by `add`: the base becomes the image's first layer.
        buildah(&["add", &ctr, &base.display().to_string(), "/"])?;
        for bin in ["twill-agent", "twill-cni"] {
            buildah(&[
                "copy",
                "--chmod",
                "0755",
                &ctr,
                &bin_dir.join(bin).display().to_string(),
                &format!("/usr/local/bin/{bin}"),
            ])?;
        }
        // As the Dockerfile: no ENTRYPOINT, the DaemonSet names each container's command.
        buildah(&[
            "config",
            "--cmd",
            r#"["/usr/local/bin/twill-agent","--help"]"#,
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            &ctr,
        ])?;
        buildah(&["commit", "--quiet", &ctr, name])?;
        let partial = work.join("image.tar");
        buildah(&[
            "push",
            "--quiet",
            name,
            &format!("docker-archive:{}:{name}", partial.display()),
        ])?;
        fs::rename(&partial, out)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&work);
    result.with_context(|| format!("building {name} with buildah"))
}

/// The debootstrapped base as a tarball, built on first use.
pub fn base_tarball() -> Result<PathBuf> {
    let cache = cache_dir().join("images");
    fs::create_dir_all(&cache)?;
    let tarball = cache.join(format!(
        "base-{SUITE}-minbase-r{BASE_RECIPE}-{}.tar",
        PACKAGES.join("+")
    ));
    if tarball.is_file() {
        return Ok(tarball);
    }
    which("debootstrap")?;
    let mirror = debian_mirror()?;
    let work = scratch_dir(&cache, ".base")?;
    let rootfs = work.join("rootfs");
    eprintln!(
        "image: debootstrap {SUITE} (minbase + {PACKAGES:?}) from {mirror}: a few minutes, once per machine"
    );
    let result = (|| -> Result<()> {
        run_cmd(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    &format!("--include={}", PACKAGES.join(",")),
                ])
                .arg(SUITE)
                .arg(&rootfs)
                .arg(&mirror),
        )?;
        // What bookworm-slim does not carry either: downloaded packages and package lists.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            for entry in fs::read_dir(rootfs.join(dir))?.flatten() {
                if entry.file_type()?.is_file() {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        let partial = work.join("base.tar");
        run_cmd(
            Command::new("tar")
                .arg("--numeric-owner")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&partial)
                .arg("."),
        )?;
        fs::rename(&partial, &tarball)?;
        Ok(())
    })();
    // debootstrap mounts /proc and /sys in the target while it configures packages; a failed
    // run can leave them.
    let errors = crate::unmount_under(&work);
    let _ = fs::remove_dir_all(&work);
    if let Some(e) = errors.first() {
        bail!("{e}");
    }
    result
        .with_context(|| format!("debootstrap of {SUITE}"))
        .map(|()| tarball)
}

/// The Debian mirror apt uses on this machine (deb822 `.sources` or one-line `sources.list`),
/// so the image comes from the same place as the machine's own packages.
fn debian_mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list")),
        );
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = line
                .strip_prefix("URIs:")
                .map(|rest| rest.split_whitespace().next().unwrap_or_default())
                .or_else(|| {
                    let mut words = line.split_whitespace();
                    (words.next() == Some("deb"))
                        .then(|| words.find(|w| !w.starts_with('[')))
                        .flatten()
                });
            if let Some(uri) = uri
                && uri.trim_end_matches('/').ends_with("/debian")
            {
                return Ok(uri.to_owned());
            }
        }
    }
    Err(anyhow!(
        "no Debian mirror (a URI ending in /debian) in /etc/apt/sources.list{{,.d/}}"
    ))
}

/// `buildah` with its own vfs storage under a throw-away directory: nothing touches the machine's
/// container storage, and vfs makes no mounts.
pub(crate) struct Buildah<'a>(pub &'a Path);

impl Buildah<'_> {
    /// Runs `buildah ARGS`; its trimmed stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_cmd(
            Command::new("buildah")
                .args(["--storage-driver", "vfs", "--root"])
                .arg(self.0.join("storage"))
                .arg("--runroot")
                .arg(self.0.join("run"))
                .args(args)
                .env("TMPDIR", self.0)
                .stdin(Stdio::null()),
        )
        .map(|o| o.trim().to_owned())
    }
}
