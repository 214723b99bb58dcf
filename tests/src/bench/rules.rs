//! The Service sets a benchmark programs, and their translations into each contender's
//! configuration language: kube-proxy-shaped `iptables-restore` input, kube-proxy-shaped `nft -f`
//! input, and Kubernetes manifests for Twill. Pure text generation, no I/O, so the shapes are
//! unit-tested and the same text is what the lab loads.
//!
//! The shapes follow kube-proxy's proxiers (`pkg/proxy/iptables/proxier.go`,
//! `pkg/proxy/nftables/proxier.go`): per-service-port chains reached from one dispatch point,
//! random endpoint choice, one DNAT per endpoint, masquerade marking for off-cluster sources.
use std::{fmt::Write as _, net::Ipv4Addr};

/// Cluster CIDR used in the masquerade rules (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Endpoints per filler Service in the side-by-side runs.
pub const FILLER_ENDPOINTS: usize = 2;

/// One port of a Service (always TCP here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// Also a NodePort Service (externalTrafficPolicy Cluster) on this port of every node.
    pub node_port: Option<u16>,
}

/// A ClusterIP Service with its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Ipv4Addr>,
    /// The node the endpoints run on (their EndpointSlice `nodeName`), when they are real pods.
    pub node: Option<String>,
}

impl BenchService {
    pub fn new(
        name: &str,
        vip: Ipv4Addr,
        port: u16,
        target_port: u16,
        endpoints: Vec<Ipv4Addr>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            vip,
            ports: vec![ServicePort {
                name: "p".into(),
                port,
                target_port,
                node_port: None,
            }],
            endpoints,
            node: None,
        }
    }

    /// The same Service with its endpoints on node `node` (EndpointSlice `nodeName`).
    #[must_use]
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// The same Service, also exposed as a NodePort on `node_port`.
    #[must_use]
    pub fn with_node_port(mut self, node_port: u16) -> Self {
        for p in &mut self.ports {
            p.node_port = Some(node_port);
        }
        self
    }

    /// A filler Service: unique VIP in 10.97.0.0/16.., endpoints in 10.128.0.0/10 that no pod
    /// owns (never connected to; they only make the rule sets as large as a real cluster's).
    pub fn filler(i: usize, endpoints: usize) -> Self {
        let vip = Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 97, 0, 0)) + u32::try_from(i).unwrap_or(u32::MAX >> 8),
        );
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
        let eps = (0..endpoints)
            .map(|j| {
                Ipv4Addr::from(base + u32::try_from(i * endpoints + j).unwrap_or(u32::MAX >> 10))
            })
            .collect();
        Self::new(&format!("fill-{i:05}"), vip, 80, 8080, eps)
    }
}

/// `n` Services in dispatch order: fillers, with `specials` placed at their positions (a
/// position past the end is clamped to the end). The total count is `n` (specials included)
/// unless there are more specials than `n`.
pub fn service_set(
    n: usize,
    filler_endpoints: usize,
    specials: &[(usize, BenchService)],
) -> Vec<BenchService> {
    let fillers = n.saturating_sub(specials.len());
    let mut out: Vec<BenchService> = (0..fillers)
        .map(|i| BenchService::filler(i, filler_endpoints))
        .collect();
    let mut sorted: Vec<&(usize, BenchService)> = specials.iter().collect();
    sorted.sort_by_key(|(pos, _)| *pos);
    for (pos, svc) in sorted {
        let at = (*pos).min(out.len());
        out.insert(at, svc.clone());
    }
    out
}

/// kube-proxy names chains after a hash of the service port name; 16 base32 characters. The
/// exact hash is irrelevant to the kernel, the name length (and so the restore size) is not.
fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| char::from(ALPHABET[usize::try_from((bits >> (i * 5)) & 31).unwrap_or(0)]))
        .collect()
}

fn svc_port_name(svc: &BenchService, port: &ServicePort) -> String {
    format!("default/{}:{}", svc.name, port.name)
}

fn svc_chain(svc: &BenchService, port: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}tcp", svc_port_name(svc, port)))
    )
}

fn ext_chain(svc: &BenchService, port: &ServicePort) -> String {
    format!(
        "KUBE-EXT-{}",
        chain_hash(&format!("{}tcp", svc_port_name(svc, port)))
    )
}

fn sep_chain(svc: &BenchService, port: &ServicePort, ep: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!(
            "{}tcp{ep}:{}",
            svc_port_name(svc, port),
            port.target_port
        ))
    )
}

/// The static part of kube-proxy's nat table (jumps from the base chains, masquerade marking).
fn iptables_nat_header(out: &mut String) {
    out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
}

fn iptables_nat_static_rules(out: &mut String) {
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
}

fn iptables_dispatch_rule(out: &mut String, svc: &BenchService, port: &ServicePort) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
        svc_port_name(svc, port),
        svc.vip,
        port.port,
        svc_chain(svc, port)
    );
}

fn iptables_nodeports_rule(out: &mut String) {
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

fn iptables_service_chains_decl(out: &mut String, svc: &BenchService) {
    for port in &svc.ports {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(svc, port));
        if port.node_port.is_some() {
            let _ = writeln!(out, ":{} - [0:0]", ext_chain(svc, port));
        }
        for ep in &svc.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(svc, port, *ep));
        }
    }
}

fn iptables_service_chains_rules(out: &mut String, svc: &BenchService) {
    for port in &svc.ports {
        let name = svc_port_name(svc, port);
        let chain = svc_chain(svc, port);
        if let Some(np) = port.node_port {
            // kube-proxy's externalTrafficPolicy: Cluster shape: KUBE-NODEPORTS matches the
            // port, KUBE-EXT marks for masquerade and continues into the Service chain.
            let ext = ext_chain(svc, port);
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment \"{name}\" -m tcp -p tcp --dport {np} -j {ext}"
            );
            let _ = writeln!(
                out,
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(out, "-A {ext} -j {chain}");
        }
        let _ = writeln!(
            out,
            "-A {chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            svc.vip, port.port
        );
        let n = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let sep = sep_chain(svc, port, *ep);
            let comment = format!(
                "-m comment --comment \"{name} -> {ep}:{}\"",
                port.target_port
            );
            if i + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "endpoint counts are tiny")]
                let p = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    out,
                    "-A {chain} {comment} -m statistic --mode random --probability {p:.10} -j {sep}"
                );
            } else {
                let _ = writeln!(out, "-A {chain} {comment} -j {sep}");
            }
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{name}\" -s {ep}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{name}\" -m tcp -p tcp -j DNAT --to-destination {ep}:{}",
                port.target_port
            );
        }
    }
}

/// The filter table kube-proxy keeps next to the nat table (forwarding of marked and tracked
/// traffic), so contenders pay the same per-packet filter cost kube-proxy nodes pay.
fn iptables_filter_table(out: &mut String) {
    out.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\n");
    out.push_str(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
    );
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");
}

/// A full kube-proxy-style ruleset for `iptables-restore` (replaces the nat and filter tables).
pub fn iptables_full(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 1200 + 4096);
    iptables_filter_table(&mut out);
    iptables_nat_header(&mut out);
    for svc in services {
        iptables_service_chains_decl(&mut out, svc);
    }
    iptables_nat_static_rules(&mut out);
    for svc in services {
        for port in &svc.ports {
            iptables_dispatch_rule(&mut out, svc, port);
        }
    }
    iptables_nodeports_rule(&mut out);
    for svc in services {
        iptables_service_chains_rules(&mut out, svc);
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy's partial sync writes when one Service is added while `existing` are
/// present (`iptables-restore --noflush`): `KUBE-SERVICES` is redeclared (so flushed) and
/// rewritten in full, the new Service's chains are created; unchanged Services' chains are not
/// touched.
pub fn iptables_add_one(existing: &[BenchService], new: &BenchService) -> String {
    let mut out = String::with_capacity(existing.len() * 200 + 4096);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    iptables_service_chains_decl(&mut out, new);
    for svc in existing.iter().chain(std::iter::once(new)) {
        for port in &svc.ports {
            iptables_dispatch_rule(&mut out, svc, port);
        }
    }
    iptables_nodeports_rule(&mut out);
    iptables_service_chains_rules(&mut out, new);
    out.push_str("COMMIT\n");
    out
}

/// Input that empties what [`iptables_full`] made (run before a from-scratch measurement).
pub fn iptables_empty() -> String {
    "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
        .to_owned()
}

/// The nftables table kube-proxy's nftables mode owns.
pub const NFT_TABLE: &str = "kube-proxy";

fn nft_svc_chain(svc: &BenchService, port: &ServicePort) -> String {
    let id = format!("{}/{}/tcp/{}", "default", svc.name, port.name);
    format!("service-{}-{id}", &chain_hash(&id)[..8])
}

fn nft_ext_chain(svc: &BenchService, port: &ServicePort) -> String {
    let id = format!("{}/{}/tcp/{}", "default", svc.name, port.name);
    format!("external-{}-{id}", &chain_hash(&id)[..8])
}

fn nft_ep_chain(svc: &BenchService, port: &ServicePort, ep: Ipv4Addr) -> String {
    let id = format!(
        "{}/{}/tcp/{}__{ep}/{}",
        "default", svc.name, port.name, port.target_port
    );
    format!("endpoint-{}-{id}", &chain_hash(&id)[..8])
}

fn nft_service_chains(out: &mut String, svc: &BenchService) {
    for port in &svc.ports {
        let chain = nft_svc_chain(svc, port);
        let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
        if port.node_port.is_some() {
            let ext = nft_ext_chain(svc, port);
            let _ = writeln!(out, "add chain ip {NFT_TABLE} {ext}");
            let _ = writeln!(
                out,
                "add rule ip {NFT_TABLE} {ext} jump mark-for-masquerade"
            );
            let _ = writeln!(out, "add rule ip {NFT_TABLE} {ext} goto {chain}");
        }
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, port.port
        );
        if svc.endpoints.is_empty() {
            continue;
        }
        let mut vmap = String::new();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let ep_chain = nft_ep_chain(svc, port, *ep);
            let _ = writeln!(out, "add chain ip {NFT_TABLE} {ep_chain}");
            let _ = writeln!(
                out,
                "add rule ip {NFT_TABLE} {ep_chain} ip saddr {ep} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip {NFT_TABLE} {ep_chain} meta l4proto tcp dnat to {ep}:{}",
                port.target_port
            );
            if i > 0 {
                vmap.push_str(", ");
            }
            let _ = write!(vmap, "{i} : goto {ep_chain}");
        }
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} numgen random mod {} vmap {{ {vmap} }}",
            svc.endpoints.len()
        );
    }
}

fn nft_service_elements(out: &mut String, services: &[BenchService]) {
    for chunk in services.chunks(1000) {
        let mut elems = String::new();
        for svc in chunk {
            for port in &svc.ports {
                if !elems.is_empty() {
                    elems.push_str(", ");
                }
                let _ = write!(
                    elems,
                    "{} . tcp . {} : goto {}",
                    svc.vip,
                    port.port,
                    nft_svc_chain(svc, port)
                );
            }
        }
        let _ = writeln!(out, "add element ip {NFT_TABLE} service-ips {{ {elems} }}");
    }
    let nodeports: Vec<String> = services
        .iter()
        .flat_map(|svc| {
            svc.ports.iter().filter_map(move |port| {
                let np = port.node_port?;
                Some(format!("tcp . {np} : goto {}", nft_ext_chain(svc, port)))
            })
        })
        .collect();
    if !nodeports.is_empty() {
        let _ = writeln!(
            out,
            "add element ip {NFT_TABLE} service-nodeports {{ {} }}",
            nodeports.join(", ")
        );
    }
}

/// A full kube-proxy-nftables-style table for `nft -f`: the table is created, deleted and
/// recreated in one transaction, as kube-proxy does on a full resync.
pub fn nft_full(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 900 + 4096);
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add table ip {t}\ndelete table ip {t}\nadd table ip {t} {{ comment \"rules for kube-proxy\"; }}"
    );
    let _ = writeln!(
        out,
        "add chain ip {t} mark-for-masquerade\nadd rule ip {t} mark-for-masquerade mark set mark or 0x4000"
    );
    let _ = writeln!(out, "add chain ip {t} masquerading");
    let _ = writeln!(
        out,
        "add rule ip {t} masquerading mark and 0x4000 == 0 return"
    );
    let _ = writeln!(out, "add rule ip {t} masquerading mark set mark xor 0x4000");
    let _ = writeln!(out, "add rule ip {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"; }}"
    );
    let _ = writeln!(out, "add chain ip {t} services");
    let _ = writeln!(
        out,
        "add map ip {t} service-nodeports {{ type inet_proto . inet_service : verdict; comment \"NodePort traffic\"; }}"
    );
    let _ = writeln!(
        out,
        "add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    // After the ClusterIP lookup, as in kube-proxy: local destinations try the NodePorts.
    let _ = writeln!(
        out,
        "add rule ip {t} services fib daddr type local meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(
        out,
        "add chain ip {t} nat-prerouting {{ type nat hook prerouting priority -100; policy accept; }}"
    );
    let _ = writeln!(out, "add rule ip {t} nat-prerouting jump services");
    let _ = writeln!(
        out,
        "add chain ip {t} nat-output {{ type nat hook output priority -100; policy accept; }}"
    );
    let _ = writeln!(out, "add rule ip {t} nat-output jump services");
    let _ = writeln!(
        out,
        "add chain ip {t} nat-postrouting {{ type nat hook postrouting priority 100; policy accept; }}"
    );
    let _ = writeln!(out, "add rule ip {t} nat-postrouting jump masquerading");
    let _ = writeln!(
        out,
        "add chain ip {t} filter-forward {{ type filter hook forward priority -110; policy accept; }}"
    );
    let _ = writeln!(out, "add rule ip {t} filter-forward ct state invalid drop");
    for svc in services {
        nft_service_chains(&mut out, svc);
    }
    nft_service_elements(&mut out, services);
    out
}

/// What kube-proxy's nftables mode sends when one Service is added: only the new chains and
/// one map element (its transactions are incremental).
pub fn nft_add_one(new: &BenchService) -> String {
    let mut out = String::new();
    nft_service_chains(&mut out, new);
    nft_service_elements(&mut out, std::slice::from_ref(new));
    out
}

/// Input that removes the kube-proxy table (before a from-scratch measurement).
pub fn nft_empty() -> String {
    format!("add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")
}

/// The Services as Kubernetes objects (Service + EndpointSlice per Service), multi-document
/// YAML, for Twill's `--manifests` directory.
pub fn k8s_manifests(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 700);
    for svc in services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| {
                let node_port = p
                    .node_port
                    .map_or_else(String::new, |np| format!(", nodePort: {np}"));
                format!(
                    "{{name: {}, port: {}, targetPort: {}, protocol: TCP{node_port}}}",
                    p.name, p.port, p.target_port
                )
            })
            .collect();
        let kind = if svc.ports.iter().any(|p| p.node_port.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: default}}\nspec:\n  type: {kind}\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports: [{ports}]\n",
            n = svc.name,
            vip = svc.vip,
            ports = ports.join(", ")
        );
        let ep_ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{{name: {}, port: {}, protocol: TCP}}",
                    p.name, p.target_port
                )
            })
            .collect();
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-s1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {n}}}\naddressType: IPv4\nports: [{p}]\nendpoints:\n",
            n = svc.name,
            p = ep_ports.join(", ")
        );
        let node = svc
            .node
            .as_ref()
            .map_or_else(String::new, |n| format!("\n  nodeName: {n}"));
        for ep in &svc.endpoints {
            let _ = writeln!(
                out,
                "- addresses: [{ep}]\n  conditions: {{ready: true, serving: true, terminating: false}}{node}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_svc() -> BenchService {
        BenchService::new(
            "bench",
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            8080,
            vec![Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)],
        )
    }

    #[test]
    fn service_set_places_specials_and_keeps_the_count() {
        let set = service_set(
            10,
            2,
            &[(5, bench_svc()), (99, BenchService::filler(9999, 1))],
        );
        assert_eq!(set.len(), 10);
        assert_eq!(set[5].name, "bench");
        assert_eq!(set[9].name, "fill-09999");
        let mut vips: Vec<_> = set.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        assert_eq!(vips.len(), 10, "VIPs must be unique");
    }

    #[test]
    fn filler_addresses_stay_out_of_pod_and_service_ranges() {
        let f = BenchService::filler(9_999, 5);
        assert_eq!(f.vip, Ipv4Addr::new(10, 97, 39, 15));
        assert_eq!(f.endpoints[4], Ipv4Addr::new(10, 128, 195, 79));
    }

    #[test]
    fn iptables_shape_matches_kube_proxy() {
        let text = iptables_full(&[bench_svc()]);
        let svc_chain = svc_chain(&bench_svc(), &bench_svc().ports[0]);
        assert_eq!(svc_chain.len(), "KUBE-SVC-".len() + 16);
        assert!(text.contains(&format!("-d 10.96.0.10/32 --dport 80 -j {svc_chain}")));
        assert!(
            text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(text.contains("-j DNAT --to-destination 10.244.1.3:8080"));
        // The last endpoint is the fall-through: exactly one probability rule for two endpoints.
        assert_eq!(text.matches("--probability").count(), 1);
        assert_eq!(text.matches("COMMIT").count(), 2);
        let nodeports = text.find("KUBE-NODEPORTS\n").unwrap_or(0);
        assert!(
            nodeports > text.find("--dport 80 -j KUBE-SVC").unwrap_or(usize::MAX),
            "nodeports rule must come last"
        );
    }

    #[test]
    fn iptables_add_one_rewrites_dispatch_and_adds_only_the_new_chains() {
        let existing = service_set(3, 2, &[]);
        let new = bench_svc();
        let text = iptables_add_one(&existing, &new);
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), 4 + 1);
        assert_eq!(text.matches("\n:KUBE-SEP-").count(), 2);
        assert!(!text.contains(&format!(
            ":{}",
            svc_chain(&existing[0], &existing[0].ports[0])
        )));
    }

    #[test]
    fn nft_shape_uses_a_verdict_map_and_numgen() {
        let text = nft_full(&service_set(2, 3, &[]));
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 10.97.0.0 . tcp . 80 : goto service-"
        ));
        let delta = nft_add_one(&bench_svc());
        assert!(delta.contains("10.96.0.10 . tcp . 80"));
        assert!(!delta.contains("delete table"));
    }

    #[test]
    fn node_ports_follow_kube_proxy_shapes() {
        let svc = bench_svc().with_node_port(30080);
        let ipt = iptables_full(std::slice::from_ref(&svc));
        let ext = ext_chain(&svc, &svc.ports[0]);
        assert!(ipt.contains(&format!("\n:{ext} - [0:0]")));
        assert!(ipt.contains(&format!("-m tcp -p tcp --dport 30080 -j {ext}")));
        assert!(ipt.contains(&format!("-A {ext} -j KUBE-SVC-")));
        let nft = nft_full(std::slice::from_ref(&svc));
        assert!(
            nft.contains("fib daddr type local meta l4proto . th dport vmap @service-nodeports")
        );
        assert!(nft.contains("service-nodeports { tcp . 30080 : goto external-"));
        let yaml = k8s_manifests(&[svc.on_node("n0")]);
        assert!(yaml.contains("type: NodePort") && yaml.contains("nodePort: 30080"));
        assert_eq!(yaml.matches("\n  nodeName: n0\n").count(), 2);
        assert!(!iptables_full(&[bench_svc()]).contains("KUBE-EXT-"));
        assert!(!nft_full(&[bench_svc()]).contains("service-nodeports { tcp"));
    }

    #[test]
    fn manifests_hold_a_service_and_a_slice_per_service() {
        let text = k8s_manifests(&[bench_svc()]);
        assert_eq!(text.matches("kind: Service\n").count(), 1);
        assert_eq!(text.matches("kind: EndpointSlice\n").count(), 1);
        assert!(text.contains("kubernetes.io/service-name: bench"));
        assert!(text.contains("- addresses: [10.244.1.3]"));
    }
}
