//! Upstream's cases on a dual-stack lab, probed over the pods' IPv6 addresses (every pod lists
//! both addresses in its Pod object's `podIPs`, as the kubelet reports a dual-stack pod):
//! selectors select a pod on both families, ipBlocks match addresses of their own family.
//! Named after the upstream case each extends ("[Feature:IPv6DualStack]" runs of the netpol
//! suite probe the same matrices over IPv6).
use anyhow::{Result, ensure};

use super::{Cluster, PODS, Reachability, TCP, UDP, policy};

/// "should support a 'default-deny-ingress' policy" with "should allow ingress access from
/// namespace on one named port"'s peer: nothing reaches namespace x but y/b, into x/a; the
/// same matrix over IPv6 and IPv4.
#[test]
fn ipv6_should_support_a_default_deny_ingress_policy_and_allow_from_a_pod() -> Result<()> {
    let Some(mut c) = Cluster::dual_stack()? else {
        return Ok(());
    };
    c.apply(
        "deny.yaml",
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    c.apply(
        "allow.yaml",
        &policy(
            "x",
            "allow-y-b",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: \
             b}}\n    ports: [{port: serve-80-tcp}, {port: serve-81-udp, protocol: UDP}]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    want.set(("y", "b"), ("x", "a"), true);
    c.expect(&want, 80, TCP)?;
    c.expect(&want, 81, UDP)?;
    // Not on a port the rule does not name.
    let mut closed = want.clone();
    closed.set(("y", "b"), ("x", "a"), false);
    c.expect(&closed, 81, TCP)?;
    // The verdicts over IPv6 addresses, from the compiled state.
    let (yb, xa, zc) = (
        c.pod("y", "b").ip6.expect("dual-stack"),
        c.pod("x", "a").ip6.expect("dual-stack"),
        c.pod("z", "c").ip6.expect("dual-stack"),
    );
    let to = format!("[{xa}]:80");
    let out = c.debug_on_node_of(
        "x",
        "a",
        &["explain", "--from", &yb.to_string(), "--to", &to],
    )?;
    ensure!(
        out.contains("ALLOWED") && out.contains("x/allow-y-b"),
        "{out}"
    );
    let out = c.debug_on_node_of(
        "x",
        "a",
        &["explain", "--from", &zc.to_string(), "--to", &to],
    )?;
    ensure!(
        out.contains("DENIED") && out.contains("ingress of x/a: denied"),
        "{out}"
    );
    // IPv4 is judged by the same rules.
    c.probe6 = false;
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should enforce except clause while egress access to server in CIDR block" and "should
/// ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", with IPv6 blocks:
/// x/a may reach a /32 around x/b's IPv6 address except x/b's; then also x/b's /128 by a second
/// policy. IPv4, which no block covers, is closed to x/a.
#[test]
fn ipv6_should_enforce_except_clause_and_allow_an_ip_in_both_cidr_and_except() -> Result<()> {
    let Some(mut c) = Cluster::dual_stack()? else {
        return Ok(());
    };
    let server = c.pod("x", "b").ip6.expect("dual-stack");
    let wide = ipnetwork::Ipv6Network::new(server, 32)?.network();
    let egress = |name: &str, block: &str| {
        policy(
            "x",
            name,
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  \
                 - to:\n    - ipBlock:\n{block}"
            ),
        )
    };
    c.apply(
        "p1.yaml",
        &egress(
            "allow-client-a-via-cidr-egress-rule",
            &format!("        cidr: \"{wide}/32\"\n        except: [\"{server}/128\"]\n"),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.set(("x", "a"), ("x", "b"), false);
    c.expect(&want, 80, TCP)?;
    c.apply(
        "p2.yaml",
        &egress(
            "allow-client-a-to-b-via-cidr-egress-rule",
            &format!("        cidr: \"{server}/128\"\n"),
        ),
    )?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.expect(&Reachability::all(true), 81, UDP)?;
    // No IPv4 block: x/a's IPv4 egress is closed.
    c.probe6 = false;
    let mut closed = Reachability::all(true);
    closed.egress(("x", "a"), false);
    c.expect(&closed, 80, TCP)?;
    Ok(())
}
