//! The side-by-side benchmark (`cargo xtask bench`): Twill against kube-proxy-shaped
//! iptables and nftables rules and the direct pod-to-pod path, in one lab, as ratios.
//!
//! The pieces are here (not in xtask) so the smoke test `tests/tests/bench_smoke.rs` runs the
//! same code path as the full benchmark.
pub mod harness;
pub mod loadgen;
pub mod policies;
pub mod report;
pub mod rules;
pub mod stats;

use serde::{Deserialize, Serialize};

/// A Service translation under test. Each runs in its own lab node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Contender {
    /// The client connects to the backend pods' addresses: the physical limit of the box.
    Direct,
    /// kube-proxy iptables mode, loaded with the default `iptables-restore` (nf_tables backend
    /// on Debian 12).
    Iptables,
    /// The same rules through the legacy (x_tables) backend.
    IptablesLegacy,
    /// kube-proxy nftables mode, loaded with `nft -f`.
    Nftables,
    /// `twill-agent run` with the Services as manifests (socket-level load balancing).
    Twill,
    /// The direct path in a node that also holds Twill's egress-masquerade nftables table (no
    /// agent): what the table's netfilter hooks cost untranslated pod traffic. Opt-in
    /// (`--only direct-masq,...`), not part of the default run.
    DirectMasq,
    /// The direct path's pod pair in a node running `twill-agent` with no Service: the client
    /// connects to the pod IPs as `direct` does, but the packets take Twill's eBPF host routing.
    /// Against `direct` it shows the host-routing gain; against `twill`, the Service's cost.
    TwillNoService,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::Iptables,
        Contender::IptablesLegacy,
        Contender::Nftables,
        Contender::Twill,
        Contender::TwillNoService,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Iptables => "iptables",
            Contender::IptablesLegacy => "iptables-legacy",
            Contender::Nftables => "nftables",
            Contender::Twill => "twill",
            Contender::DirectMasq => "direct-masq",
            Contender::TwillNoService => "twill-fastpath-no-service",
        }
    }

    /// Contenders `--only` accepts: the default set plus the opt-in diagnostics.
    pub const SELECTABLE: [Contender; 7] = [
        Contender::Direct,
        Contender::Iptables,
        Contender::IptablesLegacy,
        Contender::Nftables,
        Contender::Twill,
        Contender::TwillNoService,
        Contender::DirectMasq,
    ];

    /// Connects to the pod IPs itself (no Service translation).
    pub fn is_direct(self) -> bool {
        matches!(
            self,
            Contender::Direct | Contender::DirectMasq | Contender::TwillNoService
        )
    }

    /// Runs `twill-agent` on its node.
    pub fn runs_twill(self) -> bool {
        matches!(self, Contender::Twill | Contender::TwillNoService)
    }
}
