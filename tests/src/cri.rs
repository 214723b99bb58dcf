//! containerd as a lab node's container runtime: the CNI client the kubelet really uses.
//!
//! [`Containerd::start`] runs Debian's `containerd` (1.6, CRI plugin built in) inside a lab node
//! with everything private to the run: root, state, temp, runc root, gRPC/ttrpc sockets and CNI
//! directories all live in the node's scratch directory; the CRI plugin reads its network config
//! from the node's CNI config dir (where the lab, then the node's agent, writes
//! `10-twill.conflist`) and runs plugins from a private bin dir holding `twill-cni` and the
//! reference plugins it chains (`portmap`) or calls itself (`loopback`). Tests talk CRI to
//! [`Containerd::socket`] over gRPC as the kubelet does.
//!
//! Facts of this machine kind the configuration encodes (LAB.md):
//! - root lacks CAP_SYS_RESOURCE: without `restrict_oom_score_adj` every sandbox fails with
//!   runc's "can't get final child's PID from pipe: EOF";
//! - `netns_mounts_under_state_dir`: pod network namespaces are bind-mounted under our own state
//!   dir, not /var/run/netns;
//! - cgroups are v1 + v2 (hybrid) and there is no systemd: the cgroupfs driver;
//! - the daemon is started with only its network namespace switched (setns, the same as
//!   `nsenter --net`), never `ip netns exec`, which remounts /sys and hides the host's cgroup
//!   and bpffs mounts from runc.
//!
//! Processes: containerd runs in `<node cgroup>/cri/daemon`; the shims it forks stay there, and
//! pods get `cri/pods` as their cgroup parent (runc also joins the cgroup-v2 side of a hybrid
//! host), so everything is inside the node's cgroup, where the node's agent attached its socket
//! programs, and one `cgroup.kill` of `cri` stops it all. Dropping [`Containerd`] does that,
//! unmounts whatever the runtime left mounted under its directory (pod netns and /dev/shm
//! mounts, container overlay root filesystems), removes the cgroup-v1 directories runc made and the
//! shim sockets containerd 1.6 always puts in `/run/containerd/s/`.
//!
//! Images are built here, never pulled ([`images`]): a pause image from Debian's `catatonit`
//! and a busybox image from `busybox-static`, each `FROM scratch` with `buildah` (vfs storage in a
//! throw-away directory), saved as docker-archive tarballs in the machine's cache directory so
//! later runs only import them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Node, cache_dir, cgroup2_mount, netns_only_command, scratch_dir, terminate, wait_for, which,
};

/// The sandbox ("pause") image: catatonit in pause mode.
pub const PAUSE_IMAGE: &str = "localhost/twill-lab/pause:1";
/// A busybox image: the static busybox with its applets as symlinks.
pub const BUSYBOX_IMAGE: &str = "localhost/twill-lab/busybox:1";
/// Applets linked in the busybox image (Debian's busybox `wget` segfaults: use `nc`).
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "nc", "sleep", "hostname", "ip", "cat", "echo", "ls", "ping", "true", "httpd",
];
/// Bumped when the image recipes change, so cached tarballs of an older recipe are not used.
const RECIPE_VERSION: u32 = 1;
/// CNI plugins the runtime may run besides twill-cni: `portmap` (chained for hostPort) and
/// `loopback` (containerd's CRI brings up each pod's `lo` with it).
const REFERENCE_PLUGINS: &[&str] = &["portmap", "loopback"];
const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Where containerd 1.6 puts shim sockets whatever its configured state dir.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// overlayfs: the node image is ~190 MB, which the native snapshotter would copy for every
/// container (11 s more for the DaemonSet test); the rootfs mounts it makes are under our state
/// dir, where teardown unmounts whatever a killed shim left.
const SNAPSHOTTER: &str = "overlayfs";
/// The containerd namespace the CRI plugin works in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Paths of the two image tarballs.
#[derive(Clone, Debug)]
pub struct Images {
    pub pause: PathBuf,
    pub busybox: PathBuf,
}

/// The image tarballs, built on first use and then taken from `<cache>/twill/images/`.
pub fn images() -> Result<Images> {
    let cache = cache_dir().join("images");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let catatonit = which("catatonit").context("the pause image is built from catatonit")?;
    let busybox = which("busybox").context("the busybox image is built from busybox-static")?;
    let pause = cached_image(&cache, "pause", &catatonit, PAUSE_IMAGE, |rootfs| {
        fs::copy(&catatonit, rootfs.join("pause"))?;
        Ok(ImageConfig {
            entrypoint: Some(r#"["/pause","-P"]"#),
            cmd: None,
        })
    })?;
    let busybox = cached_image(&cache, "busybox", &busybox, BUSYBOX_IMAGE, |rootfs| {
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin)?;
        fs::copy(&busybox, bin.join("busybox"))?;
        for applet in BUSYBOX_APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
        Ok(ImageConfig {
            entrypoint: None,
            cmd: Some(r#"["/bin/sh"]"#),
        })
    })?;
    Ok(Images { pause, busybox })
}

struct ImageConfig {
    entrypoint: Option<&'static str>,
    cmd: Option<&'static str>,
}

/// The tarball of image `name` built from `source` (a binary whose content keys the cache), or
/// builds it: `fill` populates a root filesystem that becomes the single layer.
fn cached_image(
    cache: &Path,
    kind: &str,
    source: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<ImageConfig>,
) -> Result<PathBuf> {
    let content = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let digest = &sha256_hex(&content)[..16];
    let tarball = cache.join(format!("{kind}-r{RECIPE_VERSION}-{digest}.tar"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    // A private build directory: buildah's storage (vfs: plain files, no mounts) and the root
    // filesystem go away with it; parallel builders never share one.
    let work = scratch_dir(cache, &format!(".build-{kind}"))?;
    let result = (|| -> Result<()> {
        let rootfs = work.join("rootfs");
        fs::create_dir_all(&rootfs)?;
        let config = fill(&rootfs)?;
        let buildah = |args: &[&str]| crate::image::Buildah(&work).run(args);
        let ctr = buildah(&["from", "scratch"])?;
        buildah(&["copy", &ctr, &rootfs.display().to_string(), "/"])?;
        let mut cfg = vec!["config", "--env", "PATH=/bin"];
        if let Some(e) = config.entrypoint {
            cfg.extend(["--entrypoint", e]);
        }
        if let Some(c) = config.cmd {
            cfg.extend(["--cmd", c]);
        }
        cfg.push(&ctr);
        buildah(&cfg)?;
        buildah(&["commit", "--quiet", &ctr, name])?;
        let partial = work.join("image.tar");
        buildah(&[
            "push",
            "--quiet",
            name,
            &format!("docker-archive:{}:{name}", partial.display()),
        ])?;
        // Rename into place: a concurrent builder of the same image wins or loses atomically.
        fs::rename(&partial, &tarball)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&work);
    result
        .with_context(|| format!("building image {name} with buildah"))
        .map(|()| tarball)
}

/// A containerd daemon serving CRI inside a lab node. Drop stops it and removes what it made.
pub struct Containerd {
    dir: PathBuf,
    node_netns: String,
    /// `<node cgroup>/cri`: the daemon (and its shims) in `daemon/`, pods below `pods/`.
    cgroup: PathBuf,
    /// `pods/` relative to the cgroup2 root: the CRI `cgroup_parent` of every sandbox.
    pod_cgroup_parent: String,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd in `node` with its CRI plugin reading the node's CNI config dir, waits
    /// until it serves, and imports the lab images into its `k8s.io` namespace. Its CNI bin dir
    /// already holds `twill-cni`.
    pub fn start(node: &Node) -> Result<Self> {
        Self::start_with(node, true)
    }

    /// As [`Containerd::start`]; with `install_twill_cni` false the CNI bin dir holds only the
    /// reference plugins, for a DaemonSet's install-cni init container to fill.
    pub fn start_with(node: &Node, install_twill_cni: bool) -> Result<Self> {
        for prog in ["containerd", "containerd-shim-runc-v2", "runc", "ctr"] {
            which(prog)?;
        }
        let images = images()?;
        let dir = node.dir.join("containerd");
        let cgroup = node.cgroup.join("cri");
        let rel = cgroup
            .strip_prefix(cgroup2_mount()?)
            .context("the node cgroup is not under the cgroup2 mount")?;
        let mut c = Containerd {
            pod_cgroup_parent: format!("/{}/pods", rel.display()),
            dir,
            node_netns: node.netns.clone(),
            cgroup,
            child: None,
        };
        // From here on `c` is a guard: an early return drops it and cleans up.
        for sub in ["root", "state", "tmp", "runc", "cni-bin"] {
            fs::create_dir_all(c.dir.join(sub))?;
        }
        fs::create_dir_all(c.cgroup.join("daemon"))?;
        let bin_dir = c.dir.join("cni-bin");
        if install_twill_cni {
            std::os::unix::fs::symlink(crate::bin("twill-cni"), bin_dir.join("twill-cni"))?;
        }
        for plugin in REFERENCE_PLUGINS {
            let src = Path::new(REFERENCE_PLUGIN_DIR).join(plugin);
            if !src.is_file() {
                bail!("{} is missing (containernetworking-plugins)", src.display());
            }
            std::os::unix::fs::symlink(src, bin_dir.join(plugin))?;
        }
        fs::write(c.config_path(), c.config(&node.cni_conf_dir()))?;
        c.spawn()?;
        for tarball in [&images.pause, &images.busybox] {
            c.import(tarball)?;
        }
        Ok(c)
    }

    /// Imports an image tarball (docker-archive or OCI) into the CRI namespace, unpacked for the
    /// CRI plugin's snapshotter.
    pub fn import(&self, tarball: &Path) -> Result<()> {
        let out = self
            .ctr(&["images", "import", "--snapshotter", SNAPSHOTTER])
            .arg(tarball)
            .output()
            .context("spawning ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                tarball.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The CNI bin dir the CRI plugin runs plugins from (the node's `/opt/cni/bin`).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The daemon's private directory (root, state, sockets, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gRPC socket serving CRI (and containerd's own API).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The `cgroup_parent` to give every sandbox (`LinuxPodSandboxConfig.cgroup_parent`), so its
    /// processes stay inside the node's cgroup (cgroupfs driver: a path, not a systemd slice).
    pub fn pod_cgroup_parent(&self) -> &str {
        &self.pod_cgroup_parent
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn config(&self, cni_conf_dir: &Path) -> String {
        let d = self.dir.display();
        let bin = self.dir.join("cni-bin");
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
# Storage drivers that cannot work here only clutter the log.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"

  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # root here has no CAP_SYS_RESOURCE (LAB.md).
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{SNAPSHOTTER}"
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{d}/runc"

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{bin}"
      conf_dir = "{conf}"
      max_conf_num = 1
"#,
            bin = bin.display(),
            conf = cni_conf_dir.display(),
        )
    }

    /// Starts the daemon and waits (bounded) until its socket answers.
    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let mut cmd =
            netns_only_command(&self.node_netns, &self.cgroup.join("daemon"), "containerd");
        cmd.arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning containerd")?;
        self.child = Some(child);
        wait_for(Duration::from_secs(20), "containerd to serve", || {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited with {status}: {}", self.log());
            }
            Ok(self
                .ctr(&["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                .then_some(()))
        })
    }

    /// A `ctr` command against this daemon, in the CRI namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .args(["--namespace", CRI_NAMESPACE])
            .args(args);
        cmd
    }

    /// Stops the daemon with SIGTERM and waits (bounded); shims and pods keep running, as when a
    /// node's containerd is restarted or upgraded.
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(child) => terminate(child, "containerd", Duration::from_secs(10)),
            None => Ok(()),
        }
    }

    /// Stops and starts the daemon again; it reconnects to the running shims.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// The ids of tasks (sandboxes and containers) whose bundles are in the state dir.
    fn task_ids(&self) -> Vec<String> {
        fs::read_dir(
            self.dir
                .join("state/io.containerd.runtime.v2.task")
                .join(CRI_NAMESPACE),
        )
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
    }

    /// Kills the daemon, its shims and every pod process, then removes mounts, cgroups and
    /// sockets it left. Returns what could not be removed.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let tasks = self.task_ids();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        crate::kill_cgroup_tree(&self.cgroup);
        // containerd 1.6 names a shim's socket after sha256(<grpc address>/<namespace>/<id>)
        // (runtime/v2/shim/util_unix.go `SocketAddress`); a killed shim leaves it behind.
        let grpc = self.socket().display().to_string();
        for id in tasks {
            let hash = sha256_hex(format!("{grpc}/{CRI_NAMESPACE}/{id}").as_bytes());
            let _ = fs::remove_file(Path::new(SHIM_SOCKET_DIR).join(hash));
        }
        errors.extend(crate::unmount_under(&self.dir));
        if let Ok(rel) = self
            .cgroup
            .strip_prefix(cgroup2_mount().unwrap_or_default())
        {
            errors.extend(crate::remove_v1_cgroup_dirs(rel));
        }
        if let Err(e) = crate::remove_cgroup_tree(&self.cgroup) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("{}: {e}", self.dir.display()));
        }
        errors
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The test harness shows captured output only for failed tests: the log's tail is what
        // explains a failed CRI call.
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- containerd log (last 40 lines) ---");
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
        for e in self.teardown() {
            eprintln!("containerd teardown: {e}");
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .fold(String::new(), |mut out, b| {
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
            out
        })
}
