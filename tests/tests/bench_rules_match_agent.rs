//! The bench's copy of Twill's masquerade table (`direct-masq` contender) must be the agent's.
use twill_lab::bench::rules::twill_masquerade_table;

#[test]
fn direct_masq_loads_exactly_the_agents_table() {
    let nets = |v: &[&str]| -> Vec<ipnetwork::Ipv4Network> {
        v.iter().map(|s| s.parse().expect("valid CIDR")).collect()
    };
    let strs = |v: &[&str]| -> Vec<String> { v.iter().map(|s| (*s).to_owned()).collect() };
    let (src, exempt, pods) = (
        ["10.244.1.0/24"],
        ["10.244.0.0/16", "172.30.0.10/32", "172.30.0.11/32"],
        ["10.244.0.0/16"],
    );
    let agent =
        twill_agent::routing::masq::MasqueradeRules::new(nets(&src), nets(&exempt), nets(&pods))
            .render();
    assert_eq!(
        twill_masquerade_table(&strs(&src), &strs(&exempt), &strs(&pods)),
        agent
    );
    let agent_empty =
        twill_agent::routing::masq::MasqueradeRules::new(vec![], vec![], vec![]).render();
    assert_eq!(twill_masquerade_table(&[], &[], &[]), agent_empty);
}
