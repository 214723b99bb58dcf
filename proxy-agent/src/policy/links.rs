//! Which pod veths exist: one rtnetlink link dump on demand, and a subscription to link events
//! (`RTMGRP_LINK`) that wakes the run loop when a pod veth appears, is renamed (retired by CNI
//! DEL) or goes, so a new pod's veth carries the policy programs within milliseconds of its
//! creation rather than at the next periodic sweep. Neighbour events (`RTMGRP_NEIGH`) on pod
//! veths wake it too when they tell a pod MAC the fast path does not know yet
//! (`crate::fastpath`).
use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{StreamExt as _, TryStreamExt as _};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
use tokio::sync::Notify;

use crate::datapath::is_pod_veth;

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening a netlink socket for link {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("dumping the links")]
    Dump(#[source] rtnetlink::Error),
    #[error("dumping the {what}")]
    DumpOf {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The pod veths of the network namespace the agent runs in.
pub struct PodVeths {
    handle: rtnetlink::Handle,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What the fast path knows, so neighbour events that tell nothing new wake nobody.
    known: Arc<std::sync::Mutex<crate::fastpath::KnownNeighbours>>,
}

impl Drop for PodVeths {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A link event about a pod veth, or about a retired one (renamed away from its pod name).
fn concerns_pods(name: &str) -> bool {
    is_pod_veth(name) || twill_cni::dataplane::is_retired_if_name(name)
}

impl PodVeths {
    /// Opens the netlink sockets (dump and events) on the current tokio runtime.
    pub fn start() -> Result<Self, LinksError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| LinksError::Socket {
                what: "dumps",
                source,
            })?;
        let mut tasks = vec![tokio::spawn(conn)];
        let (mut conn, _, mut messages) =
            rtnetlink::new_connection().map_err(|source| LinksError::Socket {
                what: "events",
                source,
            })?;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(
                0,
                rtnetlink::constants::RTMGRP_LINK | rtnetlink::constants::RTMGRP_NEIGH,
            ))
            .map_err(|source| LinksError::Socket {
                what: "events",
                source,
            })?;
        tasks.push(tokio::spawn(conn));
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let known = Arc::new(std::sync::Mutex::new(
            crate::fastpath::KnownNeighbours::default(),
        ));
        let known_events = known.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((msg, _)) = messages.next().await {
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) =
                    &msg.payload
                {
                    let news = known_events
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .is_news(n);
                    if news {
                        notify.notify_one();
                    }
                    continue;
                }
                let NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
                ) = &msg.payload
                else {
                    continue;
                };
                if link_name(link).is_some_and(concerns_pods) {
                    notify.notify_one();
                }
            }
        }));
        Ok(Self {
            handle,
            changed,
            tasks,
            known,
        })
    }

    /// Pod veths by name, with their ifindex.
    pub async fn list(&self) -> Result<BTreeMap<String, u32>, LinksError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(LinksError::Dump)?;
        Ok(links
            .iter()
            .filter_map(|l| {
                let name = link_name(l)?;
                is_pod_veth(name).then(|| (name.to_owned(), l.header.index))
            })
            .collect())
    }

    /// The local endpoints as the kernel shows them now (see `crate::fastpath`); remembers the
    /// pod MACs so that only news about them wakes the loop.
    pub async fn endpoints(
        &self,
    ) -> Result<twill_core::routing::fastpath::LocalEndpoints, LinksError> {
        let (eps, known) = crate::fastpath::dump_endpoints(&self.handle).await?;
        *self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = known;
        Ok(eps)
    }

    /// Resolves after a pod veth changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
