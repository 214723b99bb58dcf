//! `twill-agent uninstall`: removes what the agent installed on this node, and only that (see
//! [`uninstall`]). Apart from the run loop: it needs no source, store or compiler.
use std::path::PathBuf;

use crate::cniconf::{self, CniConfError};
use crate::config::UninstallArgs;
use crate::datapath::{Datapath, DatapathError};
use crate::routing::{ApplyReport, RouteExecutor, RoutingError};

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub cni_conf: bool,
    /// Peer routes, the overlay device and the masquerade table that were removed.
    pub network: ApplyReport,
    pub pins: Vec<PathBuf>,
    pub api_socket: bool,
    /// The NAT port range was released from `ip_local_reserved_ports`.
    pub nat_ports: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("removing the CNI config")]
    CniConf(#[from] CniConfError),
    #[error("removing pinned maps and links")]
    Unpin(#[from] DatapathError),
    #[error("removing routes, the overlay device and the masquerade table")]
    Network(#[from] RoutingError),
    #[error("removing the DNS address")]
    DnsAddress(#[from] crate::dns::node_address::NodeAddressError),
    #[error("releasing the NAT ports from net.ipv4.ip_local_reserved_ports")]
    NatPorts(#[source] std::io::Error),
    #[error("removing the API socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `twill-agent uninstall`: removes the CNI config (so the runtime stops creating Twill pods),
/// then the pinned links (the socket and tc hooks detach) and maps, the agent's routes to other
/// nodes, its VXLAN device and masquerade table (all found by their ownership marks), the DNS
/// address it added (its `twill-dns` device, or the address on loopback), the NAT port range it
/// reserved in `ip_local_reserved_ports`, and the API socket. Pod routes and veths go with the
/// pods. Runs inside a tokio runtime (netlink).
pub async fn uninstall(args: &UninstallArgs) -> Result<Uninstalled, UninstallError> {
    let cni_conf = cniconf::remove(&args.cni_conf_dir)?;
    let pins = Datapath::unpin_all(&args.bpffs_dir)?;
    let network = RouteExecutor::connect()?.remove_all().await?;
    // An unparsable or empty address means DNS was off: nothing was added.
    let dns_ip = args
        .dns_bind_address
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip());
    crate::dns::node_address::remove(dns_ip).await?;
    // After the programs are gone: no translated flow needs the ports any more.
    let nat_ports = crate::fastpath::release_nat_ports().map_err(UninstallError::NatPorts)?;
    let api_socket = match std::fs::remove_file(&args.api_socket) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(UninstallError::Socket {
                path: args.api_socket.clone(),
                source,
            });
        }
    };
    Ok(Uninstalled {
        cni_conf,
        network,
        pins,
        api_socket,
        nat_ports,
    })
}
