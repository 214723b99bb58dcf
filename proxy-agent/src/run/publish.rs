//! What a sync hands to the readers outside the run loop: the copy of the applied state and
//! dump model the API socket serves (`debug maps`, `debug services`, …), and the cluster's DNS
//! names the responder answers from.
use std::sync::{Arc, RwLock};

use crate::api::Published;
use crate::compile::{Compiler, Rejection, ServiceGroup};
use crate::lbmap::{LbState, StateChanges};

/// Updates the copy the API serves: the applied state (whole after an apply that compared
/// everything, else the changed keys) and, when `model_changed` or after a whole compare, the
/// dump model with the Services a full map left out (`unprogrammed`).
pub fn publish(
    published: &RwLock<Published>,
    applied: &LbState,
    compiler: &Compiler,
    unprogrammed: &[Rejection],
    changes: &StateChanges,
    compared_all: bool,
    model_changed: bool,
) {
    let mut published = published
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if compared_all {
        published.applied.clone_from(applied);
    } else {
        published.applied.copy_changes(applied, changes);
    }
    if model_changed || compared_all {
        published.model = compiler.model();
        if !unprogrammed.is_empty() {
            let rejected = &mut published.model.rejected;
            rejected.extend(unprogrammed.iter().cloned());
            rejected.sort_by_cached_key(|r| {
                (
                    r.kind,
                    r.namespace.clone(),
                    r.name.clone(),
                    r.reason.to_string(),
                )
            });
        }
    }
}

/// The cluster's DNS names, fed the same Service groups as the compiler, and where each sync
/// publishes them.
pub struct Names {
    table: twill_core::dns::DnsTable,
    /// The responder's table (`debug dns` answers from it even with DNS off).
    responder: Option<Arc<crate::dns::DnsResponder>>,
}

impl Names {
    /// `negative_ttl`: how long clients cache the zone's NXDOMAIN/NODATA (`--dns-ttl`).
    pub fn new(cluster_domain: &str, negative_ttl: u32) -> Self {
        Self {
            table: twill_core::dns::DnsTable::new(cluster_domain).with_negative_ttl(negative_ttl),
            responder: None,
        }
    }

    /// Publishes the names to `responder` after every sync.
    pub fn set_responder(&mut self, responder: Arc<crate::dns::DnsResponder>) {
        self.responder = Some(responder);
    }

    /// Feeds the changed groups to the table and publishes a copy when it changed (and after
    /// the first sync, even of an empty cluster: until then the responder says SERVFAIL). The
    /// names follow the very groups the compiler reads, so DNS answers what the datapath serves
    /// after this sync; the responder swaps the whole table in at once.
    pub fn update(&mut self, groups: &[ServiceGroup], first: bool) {
        self.table.update(groups);
        if (first || !groups.is_empty())
            && let Some(responder) = &self.responder
        {
            responder.publish(Arc::new(self.table.clone()));
        }
    }
}
