//! NetworkPolicy, compiled (design and reasoning: `docs/design/policy.md`).
//!
//! ```text
//!  Pod, Namespace, NetworkPolicy ──parse──► PolicyPod, PolicyNamespace, ParsedPolicy (stores)
//!  stores + node ──compile──► PolicyState { maps: PEP, IPCACHE, POLICY; identities; rules }
//!  PolicyState ──verdict──► the kernel's lookups replayed (debug explain, model tests)
//!  PolicyState ──dump──► stable text (golden tests, debug policy)
//! ```
//!
//! Pure: no I/O, no aya. Map keys and values are the types of `twill_common::policy`.

mod compile;
mod dump;
mod parse;
mod verdict;

pub use compile::{
    CidrClass, Direction, IdentityKind, LocalPod, LpmKey, PolicyCounts, PolicyEntries, PolicyIds,
    PolicyState, RuleRef, addr_be, addr_from_be, addr6_be, addr6_from_be, compile, port_prefixes,
};
pub use dump::{
    EntryView, ExplainView, JudgementView, PodPolicyView, class_text, explain_view, identity_short,
    identity_text, pod_views, port_text, proto_name, render_dump, render_explain, render_pod_views,
    rule_text,
};
pub use parse::{
    IpBlockSel, LABEL_NAMESPACE_NAME, LabelSet, Labels, NamedPort, ObjectError, ParsedPolicy, Peer,
    PodLabels, PodPhase, PolicyError, PolicyErrorKind, PolicyNamespace, PolicyPod, PortMatch,
    PortSel, Requirement, Rule, Selector, SelectorOp, canonical,
};
pub use verdict::{Judgement, Verdict, key_bytes};

#[cfg(test)]
mod tests;
