//! One lab test per case of upstream's test/e2e/network/netpol/network_policy.go, named after
//! its ginkgo name (the TCP cases; the UDP and SCTP contexts' cases are probed in the TCP case
//! of the same name, SCTP only as policy text since this kernel has no SCTP). Each expectation
//! is upstream's, extended to the whole topology (upstream creates only the pods a case needs).
use anyhow::{Result, ensure};

use super::{Cluster, PODS, POLICY_FILE, Reachability, TCP, UDP, deny_into_x, policy};

/// "should support a 'default-deny-ingress' policy"
#[test]
fn should_support_a_default_deny_ingress_policy() -> Result<()> {
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
        &[(&want, 80, TCP), (&want, 81, UDP)],
    )?
    else {
        return Ok(());
    };

    // Visible: the drops by reason, and the verdict explained from the compiled state.
    let drops = c.debug_on_node_of("x", "a", &["drops", "-o", "json"])?;
    let drops: Vec<serde_json::Value> = serde_json::from_str(&drops)?;
    let denied = drops
        .iter()
        .find(|d| d["reason"] == "policy_denied_ingress")
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0);
    ensure!(
        denied > 0,
        "no policy_denied_ingress drops counted: {drops:?}"
    );
    let explain = c.debug_on_node_of("x", "a", &["explain", "--from", "y/b", "--to", "x/a:80"])?;
    ensure!(
        explain.contains("DENIED") && explain.contains("ingress of x/a: denied"),
        "{explain}"
    );
    let shown = c.debug_on_node_of("x", "a", &["policy", "x/a"])?;
    ensure!(
        shown.contains("ingress: isolated by x/deny-ingress")
            && shown.contains("egress: not isolated"),
        "{shown}"
    );
    Ok(())
}

/// "should support 'allow-all' policy"
#[test]
fn should_support_allow_all_policy() -> Result<()> {
    let Some(c) = Cluster::new()? else {
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
            "allow-all",
            "  podSelector: {}\n  ingress:\n  - {}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.expect(&Reachability::all(true), 81, UDP)?;
    // Allowed, and by which rule.
    let explain = c.debug_on_node_of("x", "b", &["explain", "--from", "z/c", "--to", "x/b:81"])?;
    ensure!(
        explain.contains("ALLOWED") && explain.contains("x/allow-all ingress[0]"),
        "{explain}"
    );
    Ok(())
}

/// "should allow ingress access on one named port"
#[test]
fn should_allow_ingress_access_on_one_named_port() -> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-all",
            "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n",
        ),
        &[
            (&Reachability::all(true), 81, TCP),
            (&deny_into_x(), 80, TCP),
        ],
    )?
    else {
        return Ok(());
    };
    // The name is TCP's: UDP 81 is not allowed.
    c.expect(&deny_into_x(), 81, UDP)?;
    Ok(())
}

/// "should enforce policy to allow traffic only from a pod in a different namespace based on
/// PodSelector and NamespaceSelector"
#[test]
fn should_enforce_policy_to_allow_traffic_only_from_a_pod_in_a_different_namespace_based_on_pod_selector_and_namespace_selector()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .set(("y", "a"), ("x", "a"), true);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-pod-a",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: \
             {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
        ),
        &[(&want, 80, TCP), (&want, 81, UDP)],
    )?;
    Ok(())
}

/// "should deny egress from all pods in a namespace"
#[test]
fn should_deny_egress_from_all_pods_in_a_namespace() -> Result<()> {
    let mut want = Reachability::all(true);
    for p in PODS {
        want.egress(("x", p), false);
    }
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        ),
        &[(&want, 80, TCP), (&want, 80, UDP)],
    )?
    else {
        return Ok(());
    };
    let drops = c.debug_on_node_of("x", "a", &["drops"])?;
    ensure!(
        drops
            .lines()
            .any(|l| l.starts_with("policy_denied_egress") && !l.ends_with(" 0")),
        "{drops}"
    );
    Ok(())
}

/// "should enforce updated policy"
#[test]
fn should_enforce_updated_policy() -> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-all-mutate-to-deny-all",
            "  podSelector: {}\n  ingress:\n  - {}\n",
        ),
        &[(&Reachability::all(true), 81, TCP)],
    )?
    else {
        return Ok(());
    };
    c.apply(
        POLICY_FILE,
        &policy(
            "x",
            "allow-all-mutate-to-deny-all",
            "  podSelector: {}\n  ingress: []\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false);
    }
    c.expect(&want, 81, TCP)?;
    Ok(())
}

/// "should stop enforcing policies after they are deleted"
#[test]
fn should_stop_enforcing_policies_after_they_are_deleted() -> Result<()> {
    let mut want = Reachability::all(true);
    for p in PODS {
        want.ingress(("x", p), false).egress(("x", p), false);
    }
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        ),
        &[(&want, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    c.delete(POLICY_FILE)?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.expect(&Reachability::all(true), 80, UDP)?;
    Ok(())
}

/// "should allow ingress access from namespace on one named port"
#[test]
fn should_allow_ingress_access_from_namespace_on_one_named_port() -> Result<()> {
    let mut want_80 = Reachability::all(true);
    for to in PODS {
        for from in PODS {
            want_80.set(("x", from), ("x", to), false);
        }
    }
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-ns-selector-80",
            "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        \
             matchExpressions: [{key: ns, operator: In, values: [y, z]}]\n    ports:\n    - \
             port: serve-80-tcp\n",
        ),
        &[(&want_80, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    let mut want_81 = Reachability::all(true);
    for p in PODS {
        want_81.ingress(("x", p), false);
    }
    c.expect(&want_81, 81, TCP)?;
    Ok(())
}

/// "should enforce except clause while egress access to server in CIDR block"
#[test]
fn should_enforce_except_clause_while_egress_access_to_server_in_cidr_block() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    // As upstream: x/a may reach the /4 around x/b's address, except x/b itself.
    let server = c.pod("x", "b").ip;
    let allow = ipnetwork::Ipv4Network::new(server, 4)?;
    c.apply(
        POLICY_FILE,
        &policy(
            "x",
            "deny-client-a-via-except-cidr-egress-rule",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  \
                 - to:\n    - ipBlock:\n        cidr: {}/4\n        except: [{server}/32]\n",
                allow.network()
            ),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.set(("x", "a"), ("x", "b"), false);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should not allow access by TCP when a policy specifies only UDP"
#[test]
fn should_not_allow_access_by_tcp_when_a_policy_specifies_only_udp() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-only-udp-ingress-on-port-81",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - protocol: UDP\n      \
             port: 81\n",
        ),
        &[(&want, 81, TCP), (&Reachability::all(true), 81, UDP)],
    )?;
    Ok(())
}

/// "should allow ingress access from updated pod"
#[test]
fn should_allow_ingress_access_from_updated_pod() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .set(("y", "b"), ("x", "a"), true);
    let Some(mut c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-pod-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: \
             {matchLabels: {pod: b}}\n      namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
        &[(&want, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    // z/c becomes pod=b: still not in a namespace labelled ns=y, so nothing changes; then z
    // gets that label and both its pod=b pods are let in.
    c.label("Pod", "z", "c", "pod", "b")?;
    c.expect(&want, 80, TCP)?;
    c.label("Namespace", "", "z", "ns", "y")?;
    want.set(("z", "b"), ("x", "a"), true)
        .set(("z", "c"), ("x", "a"), true);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should support a 'default-deny-all' policy"
#[test]
fn should_support_a_default_deny_all_policy() -> Result<()> {
    let mut want = deny_into_x();
    want.peer("x", "*", false);
    Cluster::enforcing(
        &policy(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        ),
        &[(&want, 80, TCP), (&want, 81, UDP)],
    )?;
    Ok(())
}

/// "should enforce policy to allow traffic from pods within server namespace based on
/// PodSelector"
#[test]
fn should_enforce_policy_to_allow_traffic_from_pods_within_server_namespace_based_on_pod_selector()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false).peer("x/b", "x/a", true);
    Cluster::enforcing(
        &policy(
            "x",
            "x-a-allows-x-b",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: \
             {matchLabels: {pod: b}}\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy to allow ingress traffic for a target"
#[test]
fn should_enforce_policy_to_allow_ingress_traffic_for_a_target() -> Result<()> {
    let mut want = deny_into_x();
    want.ingress(("x", "a"), true);
    Cluster::enforcing(
        &format!(
            "{}---\n{}",
            policy(
                "x",
                "deny-all",
                "  podSelector: {}\n  policyTypes: [Ingress]\n"
            ),
            policy(
                "x",
                "allow-all-to-a",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
                 podSelector: {}\n      namespaceSelector: {}\n",
            ),
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy to allow ingress traffic from pods in all namespaces"
#[test]
fn should_enforce_policy_to_allow_ingress_traffic_from_pods_in_all_namespaces() -> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-from-another-ns",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {matchLabels: {}}\n",
        ),
        &[(&Reachability::all(true), 80, TCP)],
    )?
    else {
        return Ok(());
    };
    // Everything gets in because the rule lets it (x/a is isolated), not because nothing
    // applies.
    let explain = c.debug_on_node_of("x", "a", &["explain", "--from", "z/c", "--to", "x/a:80"])?;
    ensure!(
        explain.contains("ALLOWED") && explain.contains("x/allow-from-another-ns ingress[0]"),
        "{explain}"
    );
    Ok(())
}

/// The matrix of a policy on x/a admitting only namespace y.
fn only_y_into_x_a() -> Reachability {
    let mut want = Reachability::all(true);
    want.peer("x", "x/a", false).peer("z", "x/a", false);
    want
}

/// "should enforce policy to allow traffic only from a different namespace, based on
/// NamespaceSelector"
#[test]
fn should_enforce_policy_to_allow_traffic_only_from_a_different_namespace_based_on_namespace_selector()
-> Result<()> {
    Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-ns-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n",
        ),
        &[(&only_y_into_x_a(), 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on PodSelector with MatchExpressions"
#[test]
fn should_enforce_policy_based_on_pod_selector_with_match_expressions() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false).peer("x/b", "x/a", true);
    Cluster::enforcing(
        &policy(
            "x",
            "x-a-allows-x-b",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector:\n  \
             \x20     matchExpressions: [{key: pod, operator: In, values: [b]}]\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on NamespaceSelector with MatchExpressions"
#[test]
fn should_enforce_policy_based_on_namespace_selector_with_match_expressions() -> Result<()> {
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-match-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, \
             operator: In, values: [y]}]\n",
        ),
        &[(&only_y_into_x_a(), 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on PodSelector or NamespaceSelector"
#[test]
fn should_enforce_policy_based_on_pod_selector_or_namespace_selector() -> Result<()> {
    let mut want = Reachability::all(true);
    want.peer("x/c", "x/a", false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-match-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, \
             operator: NotIn, values: [x]}]\n    - podSelector: {matchLabels: {pod: b}}\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on PodSelector and NamespaceSelector"
#[test]
fn should_enforce_policy_based_on_pod_selector_and_namespace_selector() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .peer("*/b", "x/a", true)
        .peer("x/b", "x/a", false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-podselector-and-nsselector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, \
             operator: NotIn, values: [x]}]\n      podSelector: {matchLabels: {pod: b}}\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on Multiple PodSelectors and NamespaceSelectors"
#[test]
fn should_enforce_policy_based_on_multiple_pod_selectors_and_namespace_selectors() -> Result<()> {
    let mut want = Reachability::all(true);
    want.peer("x", "x/a", false).peer("*/a", "x/a", false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-z-pod-b-c",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, \
             operator: NotIn, values: [x]}]\n      podSelector:\n        matchExpressions: \
             [{key: pod, operator: In, values: [b, c]}]\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on any PodSelectors"
#[test]
fn should_enforce_policy_based_on_any_pod_selectors() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false)
        .peer("x/b", "x/a", true)
        .peer("x/c", "x/a", true);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-x-pod-b-c",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: \
             {matchLabels: {pod: b}}\n    - podSelector: {matchLabels: {pod: c}}\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// x/a admits namespace y on `port` of `protocol` only.
fn allow_y_on(name: &str, protocol: &str, port: u16) -> String {
    policy(
        "x",
        name,
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n    \
             ports:\n    - {{protocol: {protocol}, port: {port}}}\n"
        ),
    )
}

/// "should enforce policy based on Ports" (and the UDP context's case of the same name)
#[test]
fn should_enforce_policy_based_on_ports() -> Result<()> {
    let mut closed = Reachability::all(true);
    closed.ingress(("x", "a"), false);
    let Some(c) = Cluster::enforcing(
        &allow_y_on("allow-client-a-via-ns-selector", "TCP", 81),
        &[
            (&only_y_into_x_a(), 81, TCP),
            (&closed, 80, TCP),
            (&closed, 81, UDP),
        ],
    )?
    else {
        return Ok(());
    };
    // The UDP context: the same rule for UDP.
    c.apply(
        POLICY_FILE,
        &allow_y_on("allow-ingress-on-port-81-ns-x", "UDP", 81),
    )?;
    c.expect(&only_y_into_x_a(), 81, UDP)?;
    c.expect(&closed, 81, TCP)?;
    Ok(())
}

/// "should enforce multiple, stacked policies with overlapping podSelectors"
#[test]
fn should_enforce_multiple_stacked_policies_with_overlapping_pod_selectors() -> Result<()> {
    let Some(c) = Cluster::enforcing(
        &allow_y_on("allow-client-a-via-ns-selector", "TCP", 81),
        &[(&only_y_into_x_a(), 81, TCP)],
    )?
    else {
        return Ok(());
    };
    let mut closed = Reachability::all(true);
    closed.ingress(("x", "a"), false);
    c.expect(&closed, 80, TCP)?;
    c.apply(
        "p80.yaml",
        &allow_y_on("allow-client-a-via-ns-selector-80", "TCP", 80),
    )?;
    c.expect(&only_y_into_x_a(), 80, TCP)?;
    c.expect(&only_y_into_x_a(), 81, TCP)?;
    Ok(())
}

/// "should allow egress access on one named port"
#[test]
fn should_allow_egress_access_on_one_named_port() -> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: \
             serve-80-tcp\n",
        ),
        &[(&Reachability::all(true), 80, TCP)],
    )?
    else {
        return Ok(());
    };
    let mut want = Reachability::all(true);
    want.peer("x", "*", false);
    c.expect(&want, 81, TCP)?;
    // The name resolves to TCP 80 only.
    c.expect(&want, 80, UDP)?;
    Ok(())
}

/// "should allow ingress access from updated namespace"
#[test]
fn should_allow_ingress_access_from_updated_namespace() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    let Some(mut c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-ns-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {matchLabels: {ns2: updated}}\n",
        ),
        &[(&want, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    c.label("Namespace", "", "y", "ns2", "updated")?;
    want.peer("y", "x/a", true);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should deny ingress from pods on other namespaces"
#[test]
fn should_deny_ingress_from_pods_on_other_namespaces() -> Result<()> {
    let mut want = Reachability::all(true);
    want.peer("y", "x", false).peer("z", "x", false);
    Cluster::enforcing(
        &policy(
            "x",
            "deny-empty-policy",
            "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {}}\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should deny ingress access to updated pod"
#[test]
fn should_deny_ingress_access_to_updated_pod() -> Result<()> {
    let Some(mut c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        POLICY_FILE,
        &policy(
            "x",
            "deny-ingress-via-label-selector",
            "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    c.wait_compiled()?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.label("Pod", "x", "a", "target", "isolated")?;
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should deny egress from pods based on PodSelector"
#[test]
fn should_deny_egress_from_pods_based_on_pod_selector() -> Result<()> {
    let mut want = Reachability::all(true);
    want.egress(("x", "a"), false);
    Cluster::enforcing(
        &policy(
            "x",
            "deny-egress-pod-a",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
        ),
        &[(&want, 80, TCP), (&want, 81, UDP)],
    )?;
    Ok(())
}

/// "should work with Ingress, Egress specified together"
#[test]
fn should_work_with_ingress_egress_specified_together() -> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false).peer("x/b", "x/a", true);
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-pod-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress, Ingress]\n  \
             ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n  egress:\n  - \
             ports:\n    - port: 80\n",
        ),
        &[(&want, 80, TCP)],
    )?
    else {
        return Ok(());
    };
    want.egress(("x", "a"), false);
    c.expect(&want, 81, TCP)?;
    Ok(())
}

/// "should support denying of egress traffic on the client side (even if the server explicitly
/// allows this traffic)"
#[test]
fn should_support_denying_of_egress_traffic_on_the_client_side_even_if_the_server_explicitly_allows_this_traffic()
-> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    let from_x_a = "  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: \
                    {kubernetes.io/metadata.name: x}}\n      podSelector: {matchLabels: {pod: \
                    a}}\n";
    c.apply(
        POLICY_FILE,
        &format!(
            "{}---\n{}---\n{}",
            policy(
                "x",
                "allow-to-ns-y-pod-a",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - \
                 to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n \
                 \x20    podSelector: {matchLabels: {pod: a}}\n",
            ),
            policy(
                "y",
                "allow-from-xa-on-ya-match-selector",
                &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n{from_x_a}"),
            ),
            policy(
                "y",
                "allow-from-xa-on-yb-match-selector",
                &format!("  podSelector: {{matchLabels: {{pod: b}}}}\n{from_x_a}"),
            ),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.peer("x/a", "*", false)
        .peer("*", "y/a", false)
        .peer("x/a", "y/a", true)
        .peer("*", "y/b", false);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should enforce egress policy allowing traffic to a server in a different namespace based on
/// PodSelector and NamespaceSelector"
#[test]
fn should_enforce_egress_policy_allowing_traffic_to_a_server_in_a_different_namespace_based_on_pod_selector_and_namespace_selector()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.egress(("x", "a"), false).peer("x/a", "y/a", true);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-to-ns-y-pod-a",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n \
             \x20  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      \
             podSelector: {matchLabels: {pod: a}}\n",
        ),
        &[(&want, 80, TCP), (&want, 81, UDP)],
    )?;
    Ok(())
}

/// "should enforce ingress policy allowing any port traffic to a server on a specific protocol"
#[test]
fn should_enforce_ingress_policy_allowing_any_port_traffic_to_a_server_on_a_specific_protocol()
-> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-ingress-by-proto",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - protocol: TCP\n",
        ),
        &[
            (&Reachability::all(true), 80, TCP),
            (&Reachability::all(true), 81, TCP),
        ],
    )?
    else {
        return Ok(());
    };
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    c.expect(&want, 80, UDP)?;
    Ok(())
}

/// "should enforce multiple ingress policies with ingress allow-all policy taking precedence"
#[test]
fn should_enforce_multiple_ingress_policies_with_ingress_allow_all_policy_taking_precedence()
-> Result<()> {
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-ingress-port-80",
            "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n",
        ),
        &[(&deny_into_x(), 81, TCP)],
    )?
    else {
        return Ok(());
    };
    c.apply(
        "all.yaml",
        &policy(
            "x",
            "allow-ingress",
            "  podSelector: {}\n  ingress:\n  - {}\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 81, TCP)?;
    Ok(())
}

/// "should enforce multiple egress policies with egress allow-all policy taking precedence"
#[test]
fn should_enforce_multiple_egress_policies_with_egress_allow_all_policy_taking_precedence()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.peer("x", "*", false);
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-egress-port-80",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: 80\n",
        ),
        &[(&want, 81, TCP)],
    )?
    else {
        return Ok(());
    };
    c.apply(
        "all.yaml",
        &policy(
            "x",
            "allow-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - {}\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 81, TCP)?;
    Ok(())
}

/// x/a may reach only the addresses of `block` (YAML of an ipBlock's fields, 8 spaces in).
fn x_a_egress_to_block(name: &str, block: &str) -> String {
    policy(
        "x",
        name,
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - \
             to:\n    - ipBlock:\n{block}"
        ),
    )
}

/// "should allow egress access to server in CIDR block"
#[test]
fn should_allow_egress_access_to_server_in_cidr_block() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    let server = c.pod("y", "b").ip;
    c.apply(
        POLICY_FILE,
        &x_a_egress_to_block(
            "allow-client-a-via-cidr-egress-rule",
            &format!("        cidr: {server}/32\n"),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.egress(("x", "a"), false).peer("x/a", "y/b", true);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed": x/b is in
/// one policy's except and in another's CIDR, and the second lets it in. (Upstream then
/// replaces the first policy by the second's rule, which leaves x/b the only destination; that
/// step is here too.)
#[test]
fn should_ensure_an_ip_overlapping_both_ipblock_cidr_and_ipblock_except_is_allowed() -> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    let server = c.pod("x", "b").ip;
    let wide = ipnetwork::Ipv4Network::new(server, 4)?.network();
    c.apply(
        POLICY_FILE,
        &x_a_egress_to_block(
            "allow-client-a-via-cidr-egress-rule",
            &format!("        cidr: {wide}/4\n        except: [{server}/32]\n"),
        ),
    )?;
    let mut want = Reachability::all(true);
    want.set(("x", "a"), ("x", "b"), false);
    c.expect(&want, 80, TCP)?;
    let only_b = format!("        cidr: {server}/32\n");
    c.apply(
        "p2.yaml",
        &x_a_egress_to_block("allow-client-a-to-b-via-cidr-egress-rule", &only_b),
    )?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.apply(
        POLICY_FILE,
        &x_a_egress_to_block("allow-client-a-via-cidr-egress-rule", &only_b),
    )?;
    want.egress(("x", "a"), false).peer("x/a", "x/b", true);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should enforce policies to check ingress and egress policies can be controlled
/// independently based on PodSelector"
#[test]
fn should_enforce_policies_to_check_ingress_and_egress_policies_can_be_controlled_independently_based_on_pod_selector()
-> Result<()> {
    let Some(c) = Cluster::new()? else {
        return Ok(());
    };
    c.apply(
        "egress.yaml",
        &policy(
            "x",
            "allow-egress-for-target",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - {}\n",
        ),
    )?;
    c.wait_compiled()?;
    c.expect(&Reachability::all(true), 80, TCP)?;
    c.apply(
        "ingress.yaml",
        &policy(
            "x",
            "deny-ingress-via-label-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
        ),
    )?;
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    c.expect(&want, 80, TCP)?;
    Ok(())
}

/// "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't
/// support SCTP"
#[test]
fn should_not_mistakenly_treat_protocol_sctp_as_protocol_tcp_even_if_the_plugin_does_not_support_sctp()
-> Result<()> {
    Cluster::enforcing(
        &format!(
            "{}---\n{}",
            policy(
                "x",
                "deny-ingress",
                "  podSelector: {}\n  policyTypes: [Ingress]\n"
            ),
            policy(
                "x",
                "allow-only-sctp-ingress-on-port-81",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {protocol: \
                 SCTP, port: 81}\n",
            ),
        ),
        &[(&deny_into_x(), 81, TCP), (&deny_into_x(), 81, UDP)],
    )?;
    Ok(())
}

/// "should properly isolate pods that are selected by a policy allowing SCTP, even if the
/// plugin doesn't support SCTP"
#[test]
fn should_properly_isolate_pods_that_are_selected_by_a_policy_allowing_sctp_even_if_the_plugin_does_not_support_sctp()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.ingress(("x", "a"), false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-only-sctp-ingress-on-port-80",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {protocol: \
             SCTP, port: 80}\n",
        ),
        &[(&want, 81, TCP), (&want, 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using
/// default ns label"
#[test]
fn should_enforce_policy_to_allow_traffic_based_on_namespace_selector_with_match_labels_using_default_ns_label()
-> Result<()> {
    Cluster::enforcing(
        &policy(
            "x",
            "allow-client-a-via-ns-selector-for-immutable-ns-label",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - \
             namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n",
        ),
        &[(&only_y_into_x_a(), 80, TCP)],
    )?;
    Ok(())
}

/// "should enforce policy based on NamespaceSelector with MatchExpressions using default ns
/// label"
#[test]
fn should_enforce_policy_based_on_namespace_selector_with_match_expressions_using_default_ns_label()
-> Result<()> {
    let mut want = Reachability::all(true);
    want.peer("x/a", "y", false);
    Cluster::enforcing(
        &policy(
            "x",
            "allow-ns-y-match-selector-for-immutable-ns-label",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n \
             \x20  - namespaceSelector:\n        matchExpressions: [{key: \
             kubernetes.io/metadata.name, operator: NotIn, values: [y]}]\n",
        ),
        &[(&want, 80, TCP)],
    )?;
    Ok(())
}

/// endPort: upstream's suite has no datapath case for it (its one endPort case checks the API
/// server's validation); this is the case proposed for it, "should enforce policy to allow
/// ingress traffic using port range" (kubernetes#100291): x/a admits TCP 81-90 only.
#[test]
fn should_enforce_policy_to_allow_ingress_traffic_using_port_range() -> Result<()> {
    let mut closed = Reachability::all(true);
    closed.ingress(("x", "a"), false);
    let Some(c) = Cluster::enforcing(
        &policy(
            "x",
            "allow-port-range",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {protocol: TCP, \
             port: 81, endPort: 90}\n",
        ),
        &[
            (&Reachability::all(true), 81, TCP),
            (&closed, 80, TCP),
            (&closed, 81, UDP),
        ],
    )?
    else {
        return Ok(());
    };
    // A range below the ports served, ending on 80.
    c.apply(
        POLICY_FILE,
        &policy(
            "x",
            "allow-port-range",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {protocol: UDP, \
             port: 1, endPort: 80}\n",
        ),
    )?;
    c.expect(&Reachability::all(true), 80, UDP)?;
    c.expect(&closed, 81, UDP)?;
    c.expect(&closed, 80, TCP)?;
    Ok(())
}
