//! What every part of a sync reads and reports to (kube-runtime's `Context`): the validated
//! configuration and the handles the sync shares with the sources and the servers.
use std::sync::{Arc, RwLock};

use crate::api::Published;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::source::Stores;

#[derive(Clone)]
pub struct Context {
    pub cfg: Arc<Config>,
    /// What the sources parsed; the sync reads them, never the events.
    pub stores: Arc<Stores>,
    pub metrics: Arc<Metrics>,
    /// `/healthz` and `/livez`.
    pub health: Arc<Health>,
    /// The copy the API socket serves (`debug …`).
    pub published: Arc<RwLock<Published>>,
}

impl Context {
    /// Fresh stores, metrics, health and published copy for `cfg`.
    pub fn new(cfg: Config) -> Self {
        let stores = Stores::new();
        Self {
            health: Health::new(stores.clone(), cfg.sync_period * 2),
            cfg: Arc::new(cfg),
            stores,
            metrics: Arc::new(Metrics::new()),
            published: Arc::default(),
        }
    }

    /// This node's Node object, if the sources have it.
    pub fn node(&self) -> Option<Arc<k8s_openapi::api::core::v1::Node>> {
        self.stores.node(&self.cfg.node_name)
    }
}
