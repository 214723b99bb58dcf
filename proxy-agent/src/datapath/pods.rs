//! The NetworkPolicy programs on pod veths: twill-cni's host-side veths (`twl` + hash, see
//! `twill_cni::dataplane::host_if_name`) each carry `twill_pod_ingress` (the pod's egress) and
//! `twill_pod_egress` (its ingress) on tcx links, pinned like the device links so a restarted
//! agent swaps its programs in without a moment of no enforcement.
//!
//! [`Datapath::sync_pod_links`] is level-triggered: given the pod veths that exist now (one link
//! dump), it attaches to the new ones and drops the links and pins of the gone ones (a deleted
//! veth takes its tcx links with it; a retired one, renamed by CNI DEL, keeps them until our pin
//! goes). Safe to repeat.
use std::collections::{BTreeMap, BTreeSet};
use std::io;

use super::{Datapath, DatapathError, LINK_PIN_PREFIX, POD_PIN_INFIX, POD_PROGRAMS, pod_pin_name};

/// Whether `name` is a pod's host-side veth as twill-cni names them.
pub fn is_pod_veth(name: &str) -> bool {
    twill_cni::dataplane::is_host_if_name(name)
}

/// What one [`Datapath::sync_pod_links`] did.
#[derive(Debug, Default)]
pub struct PodLinkReport {
    /// Veths that got their programs (new links or adopted pins).
    pub attached: Vec<String>,
    /// Veths no longer present whose links and pins were dropped.
    pub detached: Vec<String>,
    /// Veths whose attach failed (retried by the next sync).
    pub failed: Vec<(String, DatapathError)>,
}

impl Datapath {
    /// Pod veths the policy programs are attached to, by name (with their ifindex).
    pub fn pod_links(&self) -> &BTreeMap<String, u32> {
        &self.pod_links
    }

    /// Attaches the policy programs to every veth of `veths` (name → ifindex, pod veths only)
    /// that lacks them, and detaches from (and unpins) every one no longer listed. A veth that
    /// was replaced by another of the same name (new ifindex) is re-attached.
    pub fn sync_pod_links(&mut self, veths: &BTreeMap<String, u32>) -> PodLinkReport {
        let mut report = PodLinkReport::default();
        let gone: Vec<String> = self
            .pod_links
            .iter()
            .filter(|(name, index)| veths.get(*name) != Some(index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.pod_links.remove(&name);
            match self.detach_tcx(&name, POD_PROGRAMS, pod_pin_name) {
                Ok(()) => report.detached.push(name),
                Err(e) => report.failed.push((name, e)),
            }
        }
        // Pins of veths gone while no agent ran (or while this one had not seen them yet).
        for name in self.pinned_pod_veths() {
            if !veths.contains_key(&name) && !self.pod_links.contains_key(&name) {
                match self.detach_tcx(&name, POD_PROGRAMS, pod_pin_name) {
                    Ok(()) => report.detached.push(name),
                    Err(e) => report.failed.push((name, e)),
                }
            }
        }
        for (name, &index) in veths {
            if self.pod_links.get(name) == Some(&index) {
                continue;
            }
            match self.attach_tcx(name, POD_PROGRAMS, pod_pin_name) {
                Ok(_) => {
                    self.pod_links.insert(name.clone(), index);
                    report.attached.push(name.clone());
                }
                Err(e) => report.failed.push((name.clone(), e)),
            }
        }
        report
    }

    /// Veth names that have a pod link pinned under the bpffs directory.
    fn pinned_pod_veths(&self) -> BTreeSet<String> {
        let Some(dir) = &self.opts.bpffs_dir else {
            return BTreeSet::new();
        };
        let prefix = format!("{LINK_PIN_PREFIX}{POD_PIN_INFIX}");
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return BTreeSet::new(),
            Err(e) => {
                log::warn!("listing pinned pod links in {}: {e}", dir.display());
                return BTreeSet::new();
            }
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let rest = file.strip_prefix(&prefix)?;
                POD_PROGRAMS.iter().find_map(|(prog, _, _)| {
                    rest.strip_suffix(prog)?
                        .strip_suffix('_')
                        .map(str::to_owned)
                })
            })
            .collect()
    }
}
