//! Start-up, in the order `run` documents: servers, datapath, node network, pod veths, the
//! conntrack collector, sources, the Service syncer and DNS.
use std::sync::Arc;

use super::housekeeping::CtCollector;
use super::report::VerdictStats;
use super::{Agent, Context, RunError, Syncer};
use crate::api::{ApiState, PinnedKernelView};
use crate::config::{Config, SourceConfig};
use crate::datapath::{AyaLbMaps, CtTable, Datapath, DatapathOptions};
use crate::lbmap::LbMaps;
use crate::node_net::NodeNetwork;
use crate::policy::PolicyReconciler;
use crate::policy::task::PolicyTask;
use crate::reconcile::Reconciler;
use crate::source::manifests::ManifestDir;

/// Starts everything `run` needs before its first sync; the returned tasks (servers, sources,
/// DNS) are aborted when it exits.
pub(super) async fn start(
    cfg: Config,
    cgroup: &std::path::Path,
) -> Result<(Agent, Vec<tokio::task::JoinHandle<()>>), RunError> {
    let ctx = Context::new(cfg);
    let dns = crate::dns::DnsResponder::new(ctx.cfg.dns_ttl, ctx.metrics.clone());
    let monitor = Arc::new(crate::policy::monitor::MonitorHub::default());
    let mut tasks = start_servers(&ctx, &dns, &monitor).await?;
    let (mut datapath, reconciler, pol) = start_datapath(&ctx.cfg, cgroup)?;
    // The denied-flow stream (`debug monitor`): read for as long as the agent runs.
    let (ring, budget) = datapath.monitor_maps()?;
    tasks.push(tokio::spawn(crate::policy::monitor::read_events(
        ring,
        budget,
        monitor,
        ctx.published.clone(),
        ctx.metrics.clone(),
    )));
    let network = NodeNetwork::new(&ctx.cfg).map_err(RunError::Network)?;
    // Pod veths are watched before the sources start: a pod created meanwhile is an event.
    let policy =
        PolicyTask::start(&ctx.cfg, pol, &mut datapath, &ctx.metrics, &ctx.published).await?;
    let collector = CtCollector::new(
        CtTable::open_pinned(&ctx.cfg.bpffs_dir)?,
        ctx.metrics.clone(),
    );
    tasks.extend(start_sources(&ctx).await?);
    let mut syncer = Syncer::new(ctx, reconciler);
    syncer.set_host_netns_cookie(host_netns_cookie());
    tasks.extend(start_dns(&mut syncer, dns).await);
    Ok((
        Agent::new(syncer, datapath, network, policy, collector),
        tasks,
    ))
}

async fn bind_tcp(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Binds the health, metrics and API servers. A port clash is a start-up error, not a silent
/// half-working agent.
async fn start_servers(
    ctx: &Context,
    dns: &Arc<crate::dns::DnsResponder>,
    monitor: &Arc<crate::policy::monitor::MonitorHub>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    let (cfg, health, metrics) = (&ctx.cfg, &ctx.health, &ctx.metrics);
    let mut servers = Vec::new();
    if let Some(addr) = cfg.healthz_bind_address {
        let l = bind_tcp("healthz", addr).await?;
        let h = health.clone();
        servers.push(tokio::spawn(crate::api::serve_tcp(l, move |r| h.handle(r))));
    }
    if let Some(addr) = cfg.metrics_bind_address {
        let l = bind_tcp("metrics", addr).await?;
        let m = metrics.clone();
        servers.push(tokio::spawn(crate::api::serve_tcp(l, move |r| {
            if r.path == "/metrics" {
                crate::api::Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: m.render().into_bytes(),
                }
            } else {
                crate::api::Response::not_found()
            }
        })));
    }
    let api_listener = crate::api::bind(&cfg.api_socket).map_err(|source| RunError::Bind {
        what: "API",
        addr: cfg.api_socket.display().to_string(),
        source,
    })?;
    let api_state = ApiState {
        published: ctx.published.clone(),
        dns: Some(dns.clone()),
        monitor: Some(monitor.clone()),
        kernel: Arc::new(PinnedKernelView {
            bpffs_dir: cfg.bpffs_dir.clone(),
        }),
    };
    servers.push(tokio::spawn(crate::api::serve_unix(
        api_listener,
        api_state,
    )));
    Ok(servers)
}

/// Loads the datapath (adopting pinned maps with their contents), swaps our programs into the
/// pinned links and adopts what the maps hold.
fn start_datapath(
    cfg: &Config,
    cgroup: &std::path::Path,
) -> Result<
    (
        Datapath,
        Reconciler<AyaLbMaps>,
        PolicyReconciler<crate::datapath::AyaPolicyMaps>,
    ),
    RunError,
> {
    let mut datapath = Datapath::load(&DatapathOptions {
        bpffs_dir: Some(cfg.bpffs_dir.clone()),
        map_sizes: cfg.map_sizes,
        monitor_rate: cfg.monitor_rate,
        ..DatapathOptions::default()
    })?;
    for a in datapath.adopted_maps() {
        log::info!(
            "adopted pinned map {} ({} entries max)",
            a.name,
            a.max_entries
        );
    }
    let outcomes = datapath.attach_cgroup(cgroup)?;
    log::info!("socket programs on {}: {outcomes:?}", cgroup.display());
    let policy_maps = datapath.policy_maps()?;
    let maps = datapath.lb_maps()?;
    let reconciler = Reconciler::adopt(maps).map_err(RunError::Adopt)?;
    log::info!(
        "adopted {} service entries from the pinned maps",
        reconciler.applied().services.len()
    );
    let policy = PolicyReconciler::adopt(policy_maps).map_err(RunError::AdoptPolicy)?;
    Ok((datapath, reconciler, policy))
}

/// This network namespace's cookie (the agent runs in the node's): 0, which translates
/// loopback NodePorts nowhere, when the kernel cannot tell it.
fn host_netns_cookie() -> u64 {
    crate::datapath::current_netns_cookie().unwrap_or_else(|e| {
        log::warn!(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {e}; \
             127.0.0.1:<nodePort> is not translated"
        );
        0
    })
}

async fn start_sources(ctx: &Context) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    let (stores, metrics) = (&ctx.stores, &ctx.metrics);
    Ok(match &ctx.cfg.source {
        SourceConfig::Manifests(dir) => {
            log::info!(
                "reading Services, EndpointSlices and Nodes from {}",
                dir.display()
            );
            vec![tokio::spawn(
                ManifestDir::new(dir.clone()).run(stores.clone(), metrics.clone()),
            )]
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = crate::source::kube::client(kubeconfig.as_deref()).await?;
            crate::source::kube::spawn(&client, stores, metrics)
        }
    })
}

/// Hands the DNS table's publisher to the syncer (`debug dns` answers from it even with DNS
/// off) and starts the responder when `--dns-bind-address` is set.
async fn start_dns<M: LbMaps + VerdictStats>(
    agent: &mut Syncer<M>,
    responder: Arc<crate::dns::DnsResponder>,
) -> Vec<tokio::task::JoinHandle<()>> {
    agent.set_dns(responder.clone());
    match agent.ctx().cfg.dns_bind_address {
        Some(addr) => crate::dns::start(responder, addr, &agent.ctx().cfg.dns_upstream).await,
        None => Vec::new(),
    }
}

pub(super) fn log_start(cfg: &Config, cgroup: &std::path::Path) {
    log::info!(
        "twill-agent {} on node {}: cgroup {}, bpffs {}",
        env!("CARGO_PKG_VERSION"),
        cfg.node_name,
        cgroup.display(),
        cfg.bpffs_dir.display()
    );
}
