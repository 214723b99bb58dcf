//! A real runtime: podman with its CNI backend (libcni) runs containers on the
//! `twill` network inside a lab node. Two containers reach each other by IP with
//! real source addresses, and `podman rm` releases everything.
//!
//! podman runs through `nsenter --net` (not `ip netns exec`, which remounts /sys
//! and hides the cgroup mounts runc needs), with its own --root/--runroot under
//! the lab's scratch directory, the vfs storage driver (no overlay mounts left
//! behind) and a run-unique cgroup parent that the guard removes.
mod cni_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use cni_common::{host_links, pod_routes, reservations};
use serde_json::json;
use twill_lab::{LabSpec, Node, require, run_cmd, wait_for};

struct Podman {
    netns: String,
    dir: PathBuf,
    cgroup_parent: String,
}

impl Podman {
    fn new(node: &Node, run_id: &str) -> Result<Self> {
        let dir = node.dir.join("podman");
        for sub in ["root", "runroot", "tmp", "cni", "rootfs/bin", "rootfs/www"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // The lab's network config, at a version libcni in Debian's podman speaks.
        let mut plugin = node.plugin_conf()?;
        plugin
            .as_object_mut()
            .map(|o| (o.remove("name"), o.remove("cniVersion")));
        let conflist = json!({"cniVersion": "1.0.0", "name": "twill", "plugins": [plugin]});
        std::fs::write(
            dir.join("cni/10-twill.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let plugin_dir = twill_lab::bin("twill-cni")
            .parent()
            .context("twill-cni dir")?
            .to_owned();
        let conf = format!(
            "[containers]\ndefault_ulimits=[]\n[engine]\ncgroup_manager=\"cgroupfs\"\nevents_logger=\"file\"\n\
             [network]\nnetwork_backend=\"cni\"\ncni_plugin_dirs=[\"{}\",\"/usr/lib/cni\"]\nnetwork_config_dir=\"{}\"\n",
            plugin_dir.display(),
            dir.join("cni").display()
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        // busybox rootfs image
        std::fs::copy("/bin/busybox", dir.join("rootfs/bin/busybox"))
            .context("busybox-static is needed")?;
        for applet in ["sh", "ip", "ping", "wget", "httpd", "sleep", "cat"] {
            std::os::unix::fs::symlink("busybox", dir.join("rootfs/bin").join(applet))?;
        }
        std::fs::write(dir.join("rootfs/www/index.html"), "hello from twill\n")?;
        run_cmd(
            Command::new("tar")
                .arg("-C")
                .arg(dir.join("rootfs"))
                .arg("-cf")
                .arg(dir.join("rootfs.tar"))
                .arg("."),
        )?;
        let p = Podman {
            netns: node.netns.clone(),
            dir,
            cgroup_parent: format!("/twill-lab-podman-{run_id}"),
        };
        p.run(&[
            "import",
            &p.dir.join("rootfs.tar").display().to_string(),
            "localhost/bb:1",
        ])?;
        Ok(p)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args([
                "--runtime",
                "runc",
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
            ])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("TMPDIR", self.dir.join("tmp"));
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        run_cmd(&mut self.cmd(args))
    }

    fn start(&self, name: &str, command: &[&str]) -> Result<()> {
        let parent = format!("--cgroup-parent={}", self.cgroup_parent);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            &parent,
            "--ulimit",
            "host",
            "--pids-limit",
            "0",
            "--network",
            "twill",
            "localhost/bb:1",
        ];
        args.extend_from_slice(command);
        self.run(&args).map(|_| ())
    }

    fn ip_of(&self, name: &str) -> Result<String> {
        Ok(self
            .run(&[
                "inspect",
                "-f",
                "{{.NetworkSettings.Networks.twill.IPAddress}}",
                name,
            ])?
            .trim()
            .to_owned())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-af", "-t", "0"]);
        // podman's cgroupfs manager made the parent in every hierarchy; remove what is empty.
        for root in cgroup_roots() {
            let top = root.join(self.cgroup_parent.trim_start_matches('/'));
            remove_cgroup_dirs(&top);
        }
    }
}

fn cgroup_roots() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

fn remove_cgroup_dirs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_dirs(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

#[test]
fn podman_containers_on_the_twill_network() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(1))? else {
        return Ok(());
    };
    let n0 = lab.node(0);
    let podman = Podman::new(n0, &lab.run_id)?;
    podman.start("web", &["httpd", "-f", "-v", "-p", "8080", "-h", "/www"])?;
    podman.start("client", &["sleep", "600"])?;
    let (web, client) = (podman.ip_of("web")?, podman.ip_of("client")?);
    ensure!(
        web != client && !web.is_empty(),
        "addresses: web={web} client={client}"
    );
    for ip in [&web, &client] {
        ensure!(
            n0.pod_cidr.contains(ip.parse()?),
            "{ip} outside {}",
            n0.pod_cidr
        );
    }
    ensure!(reservations(&n0.state_dir(), "twill").len() == 2 && host_links(n0)?.len() == 2);

    // container -> container by IP; httpd logs the peer: the real source address.
    let url = format!("http://{web}:8080/index.html");
    let body = wait_for(
        Duration::from_secs(10),
        &format!("{url} from client"),
        || {
            podman
                .run(&["exec", "client", "wget", "-qO-", &url])
                .map(Some)
        },
    )?;
    ensure!(body.contains("hello from twill"), "{body}");
    let logs = wait_for(
        Duration::from_secs(5),
        "web's log to name the client",
        || {
            let out = podman.cmd(&["logs", "web"]).output()?;
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if all.contains(&client) {
                Ok(Some(all))
            } else {
                bail!("web's log does not name {client}: {all}")
            }
        },
    )?;
    ensure!(logs.contains(&client), "{logs}");
    // node -> container
    n0.run(&["ping", "-c1", "-W2", &web])?;

    // podman rm runs DEL: addresses, links and routes are gone.
    podman.run(&["rm", "-f", "-t", "0", "web", "client"])?;
    ensure!(
        reservations(&n0.state_dir(), "twill").is_empty(),
        "IPs not released"
    );
    ensure!(
        host_links(n0)?.is_empty() && pod_routes(n0)?.is_empty(),
        "links/routes left"
    );
    Ok(())
}
