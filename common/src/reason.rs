//! Verdicts and drop reasons: one enum, counted per CPU in `STATS` by the kernel programs (index =
//! discriminant) and decoded by the agent for metrics and `twill-agent debug drops`.
//!
//! Values are never reused: a retired reason keeps its number (like Cilium's
//! `bpf/lib/drop_reasons.h`), so an old agent reading a newer kernel object never mislabels.

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not addressed to a Service: left untouched.
    NotService = 1,
    /// Translated to a backend chosen at random among usable backends.
    Translated = 2,
    /// Translated to the backend remembered by session affinity.
    AffinityHit = 3,
    /// The Service has no usable backend: connection refused (ECONNREFUSED).
    NoBackends = 4,
    /// A slot or backend entry was missing (maps briefly inconsistent or corrupt).
    BackendMissing = 5,
    /// The client is outside `loadBalancerSourceRanges`.
    SourceRangeDenied = 6,
    /// externalTrafficPolicy/internalTrafficPolicy Local and no local backend: dropped.
    NoLocalBackend = 7,
    /// `SOCK_REVNAT` full: the reply address could not be remembered.
    RevNatMapFull = 8,
    /// `AFFINITY` full: affinity not recorded (the connection still proceeds).
    AffinityMapFull = 9,
    /// Connection-tracking map full: the first packet of a new flow is dropped (the client
    /// retries; entries are collected by state, see `ct_lifetime_ns`).
    CtMapFull = 10,
    /// Packet too short or malformed headers.
    Malformed = 11,
    /// Protocol the datapath does not load-balance.
    UnsupportedProto = 12,
    /// A reply's source was rewritten back to the Service frontend.
    RevNatApplied = 13,
    /// Per-packet: matched an existing tracked connection.
    CtHit = 14,
    /// Per-packet: NodePort traffic forwarded to a backend on another node.
    ForwardedRemote = 15,
    /// Per-packet: a checksum or header rewrite helper failed.
    RewriteFailed = 16,
    // 32..=39: NetworkPolicy (docs/design/policy.md). 40..=59 are kept for per-packet conntrack
    // and NAT, 60..=69 for the socket path, so parallel work never collides on a value.
    /// NetworkPolicy: the destination pod's ingress rules allow no such connection.
    PolicyDeniedIngress = 32,
    /// NetworkPolicy: the source pod's egress rules allow no such connection.
    PolicyDeniedEgress = 33,
    /// NetworkPolicy: the flow was allowed but the conntrack table is full, so its replies could
    /// not be let through later: dropped rather than half-allowed.
    PolicyCtFull = 34,
    /// NetworkPolicy: a new flow was allowed by a rule (counted once per flow).
    PolicyAllowed = 35,
    /// NetworkPolicy: a packet of a flow already allowed (conntrack hit), passed without a
    /// policy lookup.
    PolicyEstablished = 36,
    /// NetworkPolicy: the pod is not policy-managed or not isolated in this direction: passed
    /// without a policy lookup.
    PolicyNotEnforced = 37,
    /// A pod sent a packet whose source address is not its own (the node's route to that
    /// address does not lead back through the pod's veth; for IPv6 also a link-local source to a
    /// routed destination, or `::` to anything but link-local multicast): dropped on the pod's
    /// veth before any policy or routing sees it, so no pod can pass as another to a policy, a
    /// Service or a peer. Both families.
    SourceSpoofed = 38,
    /// Per-packet: a TCP packet other than a SYN, to a Service frontend, of no tracked flow (its
    /// entry expired or was flushed). Never balanced to a backend, which would answer with a
    /// reset: passed to the node's stack untouched.
    CtNonSynMiss = 40,
    /// Per-packet: a SYN reused the tuple of a closed (or expired) flow: balanced afresh.
    CtReopened = 41,
    /// Per-packet: no free source port for SNAT towards the backend: dropped.
    SnatPortsExhausted = 42,
    /// Per-packet: an ICMP error about a translated flow (fragmentation needed, unreachable,
    /// time exceeded) was translated back, outer and quoted header, towards the flow's other
    /// side.
    IcmpErrorTranslated = 43,
    // 44..=52: eBPF host routing of IPv6 packets (`fwd6.rs`). Their fallbacks to the stack are
    // counted with IPv4's reasons (80..=88), whose meaning they share.
    /// An IPv6 packet delivered into a local pod with `bpf_redirect_peer` (the IPv6 twin of
    /// `FastPathPeer`).
    FastPathPeer6 = 44,
    /// An IPv6 packet forwarded with `bpf_redirect_neigh` after a FIB lookup (the IPv6 twin of
    /// `FastPathNeigh`).
    FastPathNeigh6 = 45,
    /// Left to the stack: an IPv6 packet the node must handle itself: to or from a link-local
    /// or multicast address, a Neighbour Discovery or MLD message (sent with hop limit 255,
    /// which a router's decrement would make the receiver refuse), or one carrying a
    /// hop-by-hop options header (which every router on the path processes).
    FallbackLinkScope = 46,
    // 60..=69: socket path.
    /// An IPv6 socket's destination (or peer) is neither IPv4-mapped (`::ffff:a.b.c.d`) nor an
    /// IPv6 Service frontend (or its backend): left untouched. The IPv6 twin of `NotService`.
    NotV4Mapped = 60,
    /// `127.0.0.0/8:<nodePort>` from a socket outside the node's own network namespace (a pod's
    /// loopback is the pod itself): left untouched.
    LoopbackNotHostNetns = 61,
    /// An unconnected UDP datagram went to the backend its flow (socket, frontend) already uses.
    UdpFlowHit = 62,
    /// `UDP_FLOWS` full: the datagram was balanced but its flow not remembered.
    UdpFlowMapFull = 63,
    // 80..=89: eBPF host routing (the fast path). Each packet a pod program or a device's
    // ingress program could route itself counts one of these: delivered, or left to the stack
    // and why. The fallbacks count both families' packets; IPv6 deliveries are 44 and 45.
    /// Delivered into a local pod with `bpf_redirect_peer` (its host veth and the stack skipped).
    FastPathPeer = 80,
    /// Forwarded with `bpf_redirect_neigh` after a FIB lookup (the stack's forwarding skipped).
    FastPathNeigh = 81,
    /// Left to the stack: the destination is a local pod whose MAC is not known yet (the stack's
    /// ARP learns it; the agent then fills it in).
    FallbackNoMac = 82,
    /// Left to the stack: TTL (IPv6: hop limit) would expire (the stack sends the ICMP time
    /// exceeded).
    FallbackTtl = 83,
    /// Left to the stack: the FIB has no forwarding route (unreachable, blackhole, prohibit:
    /// the stack answers with the ICMP error).
    FallbackNoRoute = 84,
    /// Left to the stack: the packet exceeds the output device's MTU (the stack fragments it or
    /// sends fragmentation needed; IPv6: Packet Too Big, routers never fragment).
    FallbackFragNeeded = 85,
    /// Left to the stack: the destination is this node itself.
    FallbackToHost = 86,
    /// Left to the stack: the packet leaves the cluster and is masqueraded by netfilter
    /// (`--masquerade-mode=nftables`).
    FallbackMasqNft = 87,
    /// Left to the stack: anything else the FIB lookup could not decide (forwarding disabled on
    /// the device, a lightweight tunnel route, a lookup error).
    FallbackOther = 88,
    // 90..=99: eBPF masquerade.
    /// A local pod's new flow leaving the cluster was masqueraded (node address, a port of the
    /// masquerade range); its later packets and replies count as `ct_hit` / `revnat_applied`.
    MasqSnat = 90,
    /// No free masquerade port towards that destination: the new flow is dropped.
    MasqPortsExhausted = 91,
    /// A pod's packet that would be masqueraded but opens no flow (TCP without SYN, a later
    /// fragment) and has no entry: left untouched.
    MasqNotOpened = 92,
    /// A UDP flow from outside the cluster to a local pod's own address (not a Service) was
    /// tracked untranslated, so the pod's answers leave as replies from its own address
    /// instead of being masqueraded as a new flow.
    MasqInbound = 93,
    // 100..=109: IPv6 Services.
    /// `SOCK_REVNAT6` full: an IPv6 Service connection proceeds, but the application sees the
    /// backend's address as its peer.
    RevNat6MapFull = 100,
    /// Socket path: a connect()/sendmsg() to an IPv6 Service frontend went to a backend (the
    /// IPv6 twin of `Translated`; affinity and UDP flow hits count as for IPv4).
    Translated6 = 101,
    /// Socket path: recvmsg6/getpeername6 showed an IPv6 frontend instead of its backend.
    RevNatApplied6 = 102,
    /// Per-packet IPv6 north-south: a new flow from outside to an IPv6 NodePort, External IP or
    /// LoadBalancer IP went to a backend on this node (DNAT; the backend sees the client).
    Ns6Dnat = 103,
    /// Per-packet IPv6 north-south: a new flow went to a backend on another node
    /// (externalTrafficPolicy Cluster): DNAT and SNAT to this node's IPv6 address and a port
    /// of the reserved range, sent out through the route's device.
    Ns6Forwarded = 104,
    /// Per-packet IPv6 north-south: an IPv6 client outside the IPv6
    /// `loadBalancerSourceRanges` of the LoadBalancer IP it asked for, dropped (the IPv6 twin
    /// of `SourceRangeDenied`).
    Ns6SourceRangeDenied = 105,
    /// A later fragment of an IPv6 datagram arriving on a device that follows no flow (its
    /// first fragment was not seen, arrived after it, or opened no translation): left to the
    /// node's stack untranslated. Later fragments whose first fragment was seen follow its
    /// flow (`TWL_FRAG6_V1`) and count as the flow's packets.
    Ipv6Fragment = 106,
    // 110..=119: IPv6 pod network (eBPF masquerade of IPv6 pods).
    /// A local pod's new IPv6 flow leaving the cluster was masqueraded (the node's IPv6
    /// address, a port of the masquerade range); its later packets and replies count as
    /// `ct_hit` / `revnat_applied` like IPv4's.
    Masq6Snat = 110,
    /// A later fragment of an IPv6 datagram that would be masqueraded but whose first fragment
    /// opened no flow (unseen, out of order): dropped. Its ports are only in the first
    /// fragment, so it cannot be translated on its own (untranslated it would leak the pod
    /// address and its answer could not come back). Fragments whose first fragment was seen
    /// follow its flow (`TWL_FRAG6_V1`).
    Masq6Fragment = 111,
    /// An IPv6 packet on a device whose extension headers hide its transport header (a routing
    /// header with segments left, a chain longer than the walk follows): left untouched.
    /// Hop-by-hop, destination options, routing (segments left 0) and authentication headers
    /// before a TCP/UDP header are walked and the packet translated as any other.
    Ipv6ExtHeaders = 112,
    // 120..=129: IPv6 NetworkPolicy (the drops are `PolicyDenied{Ingress,Egress}`, as IPv4's).
    /// An IPv6 packet on a pod's veth that policy leaves alone by scope: a link-local or
    /// multicast address (the pod and its node's veth talking: Neighbour Discovery, MLD,
    /// router solicitations), or a Neighbour Discovery message.
    Policy6LinkScope = 120,
    /// A later fragment of an IPv6 datagram (fragment offset ≠ 0) on a pod's veth: passed
    /// unjudged, as IPv4's. It has no transport header; its datagram's first fragment carried
    /// the ports and was judged, and a datagram whose first fragment was dropped never
    /// reassembles.
    Policy6LaterFragment = 121,
}

impl Reason {
    /// Every reason, for iteration (metrics export a zero for each).
    pub const ALL: &'static [Reason] = &[
        Reason::NotService,
        Reason::Translated,
        Reason::AffinityHit,
        Reason::NoBackends,
        Reason::BackendMissing,
        Reason::SourceRangeDenied,
        Reason::NoLocalBackend,
        Reason::RevNatMapFull,
        Reason::AffinityMapFull,
        Reason::CtMapFull,
        Reason::Malformed,
        Reason::UnsupportedProto,
        Reason::RevNatApplied,
        Reason::CtHit,
        Reason::ForwardedRemote,
        Reason::RewriteFailed,
        Reason::PolicyDeniedIngress,
        Reason::PolicyDeniedEgress,
        Reason::PolicyCtFull,
        Reason::PolicyAllowed,
        Reason::PolicyEstablished,
        Reason::PolicyNotEnforced,
        Reason::SourceSpoofed,
        Reason::CtNonSynMiss,
        Reason::CtReopened,
        Reason::SnatPortsExhausted,
        Reason::IcmpErrorTranslated,
        Reason::FastPathPeer6,
        Reason::FastPathNeigh6,
        Reason::FallbackLinkScope,
        Reason::NotV4Mapped,
        Reason::LoopbackNotHostNetns,
        Reason::UdpFlowHit,
        Reason::UdpFlowMapFull,
        Reason::FastPathPeer,
        Reason::FastPathNeigh,
        Reason::FallbackNoMac,
        Reason::FallbackTtl,
        Reason::FallbackNoRoute,
        Reason::FallbackFragNeeded,
        Reason::FallbackToHost,
        Reason::FallbackMasqNft,
        Reason::FallbackOther,
        Reason::MasqSnat,
        Reason::MasqPortsExhausted,
        Reason::MasqNotOpened,
        Reason::MasqInbound,
        Reason::RevNat6MapFull,
        Reason::Translated6,
        Reason::RevNatApplied6,
        Reason::Ns6Dnat,
        Reason::Ns6Forwarded,
        Reason::Ns6SourceRangeDenied,
        Reason::Ipv6Fragment,
        Reason::Masq6Snat,
        Reason::Masq6Fragment,
        Reason::Ipv6ExtHeaders,
        Reason::Policy6LinkScope,
        Reason::Policy6LaterFragment,
    ];

    /// The eBPF host routing's and the eBPF masquerade's outcomes, both families: what
    /// `twill-agent debug fastpath` lists (delivered, forwarded, fell back to the stack and why,
    /// masqueraded).
    pub const fn is_fast_path(self) -> bool {
        matches!(
            self,
            Reason::FastPathPeer
                | Reason::FastPathNeigh
                | Reason::FastPathPeer6
                | Reason::FastPathNeigh6
                | Reason::FallbackLinkScope
                | Reason::FallbackNoMac
                | Reason::FallbackTtl
                | Reason::FallbackNoRoute
                | Reason::FallbackFragNeeded
                | Reason::FallbackToHost
                | Reason::FallbackMasqNft
                | Reason::FallbackOther
                | Reason::MasqSnat
                | Reason::MasqPortsExhausted
                | Reason::MasqNotOpened
                | Reason::MasqInbound
                | Reason::Masq6Snat
                | Reason::Masq6Fragment
        )
    }

    /// Stable snake_case name used as a metric label and in the debug CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotService => "not_service",
            Reason::Translated => "translated",
            Reason::AffinityHit => "affinity_hit",
            Reason::NoBackends => "no_backends",
            Reason::BackendMissing => "backend_missing",
            Reason::SourceRangeDenied => "source_range_denied",
            Reason::NoLocalBackend => "no_local_backend",
            Reason::RevNatMapFull => "revnat_map_full",
            Reason::AffinityMapFull => "affinity_map_full",
            Reason::CtMapFull => "ct_map_full",
            Reason::Malformed => "malformed",
            Reason::UnsupportedProto => "unsupported_proto",
            Reason::RevNatApplied => "revnat_applied",
            Reason::CtHit => "ct_hit",
            Reason::ForwardedRemote => "forwarded_remote",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::PolicyDeniedIngress => "policy_denied_ingress",
            Reason::PolicyDeniedEgress => "policy_denied_egress",
            Reason::PolicyCtFull => "policy_ct_full",
            Reason::PolicyAllowed => "policy_allowed",
            Reason::PolicyEstablished => "policy_established",
            Reason::PolicyNotEnforced => "policy_not_enforced",
            Reason::SourceSpoofed => "source_spoofed",
            Reason::CtNonSynMiss => "ct_non_syn_miss",
            Reason::CtReopened => "ct_reopened",
            Reason::SnatPortsExhausted => "snat_ports_exhausted",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::FastPathPeer6 => "fastpath_redirect_peer6",
            Reason::FastPathNeigh6 => "fastpath_redirect_neigh6",
            Reason::FallbackLinkScope => "fastpath_fallback_link_scope",
            Reason::NotV4Mapped => "not_v4_mapped",
            Reason::LoopbackNotHostNetns => "loopback_not_host_netns",
            Reason::UdpFlowHit => "udp_flow_hit",
            Reason::UdpFlowMapFull => "udp_flow_map_full",
            Reason::FastPathPeer => "fastpath_redirect_peer",
            Reason::FastPathNeigh => "fastpath_redirect_neigh",
            Reason::FallbackNoMac => "fastpath_fallback_no_mac",
            Reason::FallbackTtl => "fastpath_fallback_ttl",
            Reason::FallbackNoRoute => "fastpath_fallback_no_route",
            Reason::FallbackFragNeeded => "fastpath_fallback_frag_needed",
            Reason::FallbackToHost => "fastpath_fallback_to_host",
            Reason::FallbackMasqNft => "fastpath_fallback_masq_nft",
            Reason::FallbackOther => "fastpath_fallback_other",
            Reason::MasqSnat => "masq_snat",
            Reason::MasqPortsExhausted => "masq_ports_exhausted",
            Reason::MasqNotOpened => "masq_not_opened",
            Reason::MasqInbound => "masq_inbound",
            Reason::RevNat6MapFull => "revnat6_map_full",
            Reason::Translated6 => "translated6",
            Reason::RevNatApplied6 => "revnat6_applied",
            Reason::Ns6Dnat => "ns6_dnat",
            Reason::Ns6Forwarded => "ns6_forwarded",
            Reason::Ns6SourceRangeDenied => "ns6_source_range_denied",
            Reason::Ipv6Fragment => "ipv6_fragment",
            Reason::Masq6Snat => "masq6_snat",
            Reason::Masq6Fragment => "masq6_fragment",
            Reason::Ipv6ExtHeaders => "ipv6_ext_headers",
            Reason::Policy6LinkScope => "policy6_link_scope",
            Reason::Policy6LaterFragment => "policy6_later_fragment",
        }
    }

    /// Whether this reason means the packet or connection was refused or dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::NoBackends
                | Reason::BackendMissing
                | Reason::SourceRangeDenied
                | Reason::NoLocalBackend
                | Reason::CtMapFull
                | Reason::Malformed
                | Reason::RewriteFailed
                | Reason::PolicyDeniedIngress
                | Reason::PolicyDeniedEgress
                | Reason::PolicyCtFull
                | Reason::SourceSpoofed
                | Reason::SnatPortsExhausted
                | Reason::MasqPortsExhausted
                | Reason::Masq6Fragment
                | Reason::Ns6SourceRangeDenied
        )
    }
}

/// Unknown discriminant (e.g. a newer kernel object than this agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownReason(pub u8);

impl TryFrom<u8> for Reason {
    type Error = UnknownReason;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| *r as u8 == v)
            .ok_or(UnknownReason(v))
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn fast_path_reasons_are_the_routing_and_masquerade_outcomes() {
        for r in Reason::ALL {
            let name = r.name();
            let by_name = name.starts_with("fastpath_") || name.starts_with("masq");
            assert_eq!(r.is_fast_path(), by_name, "{r:?} ({name})");
        }
    }

    #[test]
    fn discriminants_round_trip_and_are_unique() {
        for r in Reason::ALL {
            assert_eq!(Reason::try_from(*r as u8), Ok(*r));
        }
        let mut seen = [false; 256];
        for r in Reason::ALL {
            assert!(!seen[*r as usize], "{r:?} reuses a value");
            seen[*r as usize] = true;
        }
        assert!(Reason::try_from(0).is_err());
    }
}
