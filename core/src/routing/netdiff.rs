//! What the netlink executor must do, as values: [`diff`] compares what the kernel holds
//! (`have`, one [`Observed`] per dumped route, neighbour or FDB entry) with what the plan wants
//! (`want`, keyed by destination) and returns the [`Op`]s that converge one to the other. The
//! agent's executor dumps, translates each message into an [`Observed`], calls [`diff`] and
//! performs the ops in order; it decides nothing itself. IPv4 and IPv6 routes and neighbours
//! and the VXLAN FDB all go through this one function, so a rule (prune only after the node
//! store synced, never touch a foreign route, replace without a gap) is written once and tested
//! here without a kernel.
//!
//! # Two scopes
//! - [`Scope::SharedTable`] (routes in the main table): other software's routes sit beside the
//!   agent's (told apart by the agent's route protocol). Foreign entries are never touched; a
//!   wanted destination that a foreign route holds is refused ([`Op::Refuse`]). A route of ours
//!   with the wrong nexthop is corrected in place with `NLM_F_REPLACE`, so traffic to a moved
//!   pod CIDR switches over without a gap; a new route is an exclusive create, which fails
//!   rather than overwrite a foreign route that appeared after the dump.
//! - [`Scope::OwnDevice`] (neighbours and FDB entries on the agent's VXLAN device): everything
//!   there is the agent's except what the kernel keeps for itself (the caller marks those
//!   `owned: false`). An entry in the way of a wanted one (wrong MAC, not permanent, wrong
//!   remote) is deleted, then the wanted entry is written with `NLM_F_REPLACE`, which also
//!   wins a race with the kernel creating an incomplete entry in between.
//!
//! # Order
//! Removals come first, in dump order, then sets and refusals in key order. The executor keeps
//! the plan's wider order (FDB and neighbours before the routes that use them).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{PeerReach, PeerVia, PeerVia6, RoutePlan, RoutePlan6};

/// Where the entries being diffed live, which decides how entries that are not the agent's are
/// treated and how a wrong entry of the agent's is corrected (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A table shared with other software: the main routing table.
    SharedTable,
    /// The agent's own device: its neighbour table and its FDB.
    OwnDevice,
}

/// One entry as dumped from the kernel, in the diff's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed<H, K, V> {
    /// The executor's handle on the entry (the netlink message it deletes it with).
    pub handle: H,
    /// The entry's destination; `None` when the message has none the diff can key on.
    pub key: Option<K>,
    /// The entry as the agent would have written it; `None` when it is not one the agent
    /// would write (a neighbour that is not permanent, an FDB entry without a remote).
    pub value: Option<V>,
    /// Whether the entry is the agent's to remove when the plan no longer wants it.
    pub owned: bool,
}

/// One step of converging the kernel; performed in the order [`diff`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<H, K, V> {
    /// Delete the dumped entry.
    Remove(H),
    /// Write `key → value`. `replace`: with `NLM_F_REPLACE`; otherwise an exclusive create.
    Set { key: K, value: V, replace: bool },
    /// Not written: an entry that is not the agent's holds the key (logged and counted).
    Refuse(K),
}

/// The ops that turn `have` into `want`. With `prune` false (the node store has not completed
/// its first sync, e.g. right after an agent restart) entries the plan does not mention stay:
/// the agent may just not know their node yet. Only entries in the way of a wanted one go then.
pub fn diff<H, K: Ord + Clone, V: PartialEq + Clone>(
    have: Vec<Observed<H, K, V>>,
    want: &BTreeMap<K, V>,
    scope: Scope,
    prune: bool,
) -> Vec<Op<H, K, V>> {
    let mut ops = Vec::new();
    // Keys already held by a matching entry of ours: nothing to write.
    let mut matched: BTreeSet<K> = BTreeSet::new();
    // Keys held by an entry of ours (matching or not): a write there may replace.
    let mut ours: BTreeSet<K> = BTreeSet::new();
    // Keys held by someone else's entry in a shared table: refused.
    let mut foreign: BTreeSet<K> = BTreeSet::new();
    for e in have {
        let Some(key) = e.key else {
            // Nothing the plan could want; ours, so stale.
            if e.owned && prune {
                ops.push(Op::Remove(e.handle));
            }
            continue;
        };
        if !e.owned && scope == Scope::SharedTable {
            foreign.insert(key);
            continue;
        }
        let wanted = want.get(&key);
        if e.owned {
            ours.insert(key.clone());
        }
        if e.owned && wanted.is_some() && wanted == e.value.as_ref() {
            // Duplicates that match (same route at another metric) stay, as before.
            matched.insert(key);
        } else if wanted.is_some() {
            if scope == Scope::OwnDevice {
                ops.push(Op::Remove(e.handle));
            }
            // SharedTable: replaced in place below (no gap).
        } else if e.owned && prune {
            ops.push(Op::Remove(e.handle));
        }
    }
    for (key, value) in want {
        if matched.contains(key) {
            continue;
        }
        if foreign.contains(key) {
            ops.push(Op::Refuse(key.clone()));
            continue;
        }
        ops.push(Op::Set {
            key: key.clone(),
            value: value.clone(),
            replace: scope == Scope::OwnDevice || ours.contains(key),
        });
    }
    ops
}

/// A route's nexthop as the agent writes it (its destination is the diff key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Nexthop<A> {
    pub gateway: Option<A>,
    /// An IPv6 gateway of an IPv4 route (`via inet6 …`, RTA_VIA): a peer's IPv4 pod CIDR
    /// reached directly over an IPv6 underlay. Always `None` on IPv6 routes.
    pub via6: Option<Ipv6Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

impl RoutePlan {
    /// The permanent neighbours `peer VTEP → peer MAC` the overlay device should hold.
    pub fn wanted_neighbours(&self) -> BTreeMap<Ipv4Addr, [u8; 6]> {
        self.peers
            .iter()
            .filter_map(|p| match p.via {
                PeerVia::Vxlan { vtep, mac } => Some((vtep, mac)),
                PeerVia::Direct { .. } => None,
            })
            .collect()
    }

    /// The FDB entries `peer MAC → peer underlay address` the overlay device should hold:
    /// one per peer over the overlay, whichever families its pod CIDRs are (the IPv6 plan's
    /// neighbours use them too). A peer whose every pod CIDR was refused keeps its entry: with
    /// no neighbour pointing at its MAC, nothing is sent to it.
    pub fn wanted_fdb(&self) -> BTreeMap<[u8; 6], IpAddr> {
        self.peer_nodes
            .iter()
            .filter_map(|p| match p.reach {
                PeerReach::Vxlan { mac } => Some((mac, p.node_ip)),
                PeerReach::Direct { .. } => None,
            })
            .collect()
    }

    /// The routes the main table should hold, given the overlay device's index (`None`: no
    /// device yet, so overlay peers get no route this round).
    pub fn wanted_routes(&self, vx_index: Option<u32>) -> BTreeMap<Ipv4Network, Nexthop<Ipv4Addr>> {
        self.peers
            .iter()
            .filter_map(|p| {
                let hop = match (&p.via, p.node_ip) {
                    (PeerVia::Direct { ifindex }, IpAddr::V4(gateway)) => Nexthop {
                        gateway: Some(gateway),
                        via6: None,
                        oif: Some(*ifindex),
                        onlink: false,
                    },
                    (PeerVia::Direct { ifindex }, IpAddr::V6(via6)) => Nexthop {
                        gateway: None,
                        via6: Some(via6),
                        oif: Some(*ifindex),
                        onlink: false,
                    },
                    (PeerVia::Vxlan { vtep, .. }, _) => Nexthop {
                        gateway: Some(*vtep),
                        via6: None,
                        oif: Some(vx_index?),
                        onlink: true,
                    },
                };
                Some((p.pod_cidr, hop))
            })
            .collect()
    }
}

impl RoutePlan6 {
    /// The permanent neighbours `peer VTEP6 → peer MAC` the overlay device should hold.
    pub fn wanted_neighbours(&self) -> BTreeMap<Ipv6Addr, [u8; 6]> {
        self.peers
            .iter()
            .filter_map(|p| match p.via {
                PeerVia6::Vxlan { vtep, mac } => Some((vtep, mac)),
                PeerVia6::Direct { .. } => None,
            })
            .collect()
    }

    /// The IPv6 routes the main table should hold (`vx_index` as for IPv4).
    pub fn wanted_routes(&self, vx_index: Option<u32>) -> BTreeMap<Ipv6Network, Nexthop<Ipv6Addr>> {
        self.peers
            .iter()
            .filter_map(|p| {
                let hop = match p.via {
                    PeerVia6::Direct { gateway, ifindex } => Nexthop {
                        gateway: Some(gateway),
                        via6: None,
                        oif: Some(ifindex),
                        onlink: false,
                    },
                    PeerVia6::Vxlan { vtep, .. } => Nexthop {
                        gateway: Some(vtep),
                        via6: None,
                        oif: Some(vx_index?),
                        onlink: true,
                    },
                };
                Some((p.pod_cidr, hop))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Obs = Observed<&'static str, u8, char>;

    fn ours(handle: &'static str, key: u8, value: char) -> Obs {
        Observed {
            handle,
            key: Some(key),
            value: Some(value),
            owned: true,
        }
    }

    fn theirs(handle: &'static str, key: u8) -> Obs {
        Observed {
            handle,
            key: Some(key),
            value: None,
            owned: false,
        }
    }

    fn want(entries: &[(u8, char)]) -> BTreeMap<u8, char> {
        entries.iter().copied().collect()
    }

    fn set(key: u8, value: char, replace: bool) -> Op<&'static str, u8, char> {
        Op::Set {
            key,
            value,
            replace,
        }
    }

    #[test]
    fn converged_kernel_needs_nothing() {
        for scope in [Scope::SharedTable, Scope::OwnDevice] {
            let ops = diff(
                vec![ours("a", 1, 'a'), ours("b", 2, 'b')],
                &want(&[(1, 'a'), (2, 'b')]),
                scope,
                true,
            );
            assert_eq!(ops, vec![], "{scope:?}");
        }
    }

    #[test]
    fn shared_table_replaces_ours_in_place_and_creates_new_exclusively() {
        let ops = diff(
            vec![ours("old", 1, 'x')],
            &want(&[(1, 'a'), (2, 'b')]),
            Scope::SharedTable,
            true,
        );
        // No removal of the wrong route: it is replaced, so there is no gap.
        assert_eq!(ops, vec![set(1, 'a', true), set(2, 'b', false)]);
    }

    #[test]
    fn own_device_deletes_what_is_in_the_way_then_writes_with_replace() {
        let ops = diff(
            vec![ours("wrong-mac", 1, 'x'), theirs("incomplete", 2)],
            &want(&[(1, 'a'), (2, 'b'), (3, 'c')]),
            Scope::OwnDevice,
            false,
        );
        assert_eq!(
            ops,
            vec![
                Op::Remove("wrong-mac"),
                Op::Remove("incomplete"),
                set(1, 'a', true),
                set(2, 'b', true),
                set(3, 'c', true),
            ]
        );
    }

    #[test]
    fn stale_entries_go_only_when_pruning() {
        for scope in [Scope::SharedTable, Scope::OwnDevice] {
            let have = || vec![ours("gone", 9, 'z'), ours("keep", 1, 'a')];
            let w = want(&[(1, 'a')]);
            assert_eq!(diff(have(), &w, scope, false), vec![], "{scope:?}");
            assert_eq!(
                diff(have(), &w, scope, true),
                vec![Op::Remove("gone")],
                "{scope:?}"
            );
        }
    }

    #[test]
    fn entries_without_a_key_are_stale_when_ours() {
        let have = vec![
            Observed {
                handle: "keyless-ours",
                key: None,
                value: None,
                owned: true,
            },
            Observed {
                handle: "keyless-theirs",
                key: None,
                value: None,
                owned: false,
            },
        ];
        let ops = diff(have, &want(&[]), Scope::OwnDevice, true);
        assert_eq!(ops, vec![Op::Remove("keyless-ours")]);
    }

    #[test]
    fn foreign_entries_are_never_touched_and_block_their_key() {
        let ops = diff(
            vec![theirs("foreign-1", 1), theirs("foreign-9", 9)],
            &want(&[(1, 'a'), (2, 'b')]),
            Scope::SharedTable,
            true,
        );
        assert_eq!(ops, vec![Op::Refuse(1), set(2, 'b', false)]);
    }

    #[test]
    fn a_matching_route_of_ours_wins_over_a_foreign_one() {
        // Ours already carries the traffic; nothing to refuse or write.
        let ops = diff(
            vec![theirs("foreign", 1), ours("ours", 1, 'a')],
            &want(&[(1, 'a')]),
            Scope::SharedTable,
            true,
        );
        assert_eq!(ops, vec![]);
        // A wrong route of ours beside a foreign one is left, and the key refused.
        let ops = diff(
            vec![theirs("foreign", 1), ours("ours", 1, 'x')],
            &want(&[(1, 'a')]),
            Scope::SharedTable,
            true,
        );
        assert_eq!(ops, vec![Op::Refuse(1)]);
    }

    #[test]
    fn kernel_entries_on_own_device_stay_unless_in_the_way() {
        // The kernel's own entries (not permanent, no remote) are not pruned.
        let ops = diff(
            vec![theirs("kernel", 7)],
            &want(&[]),
            Scope::OwnDevice,
            true,
        );
        assert_eq!(ops, vec![]);
    }

    #[test]
    fn matching_duplicates_stay() {
        let ops = diff(
            vec![ours("a1", 1, 'a'), ours("a2", 1, 'a')],
            &want(&[(1, 'a')]),
            Scope::SharedTable,
            true,
        );
        assert_eq!(ops, vec![]);
    }

    /// Applying the ops to a model of the kernel converges it, from any start, in one round.
    #[test]
    fn applying_the_ops_converges() {
        let starts: Vec<Vec<Obs>> = vec![
            vec![],
            vec![ours("1x", 1, 'x'), ours("5e", 5, 'e')],
            vec![ours("1a", 1, 'a'), theirs("3", 3), ours("4d", 4, 'q')],
        ];
        let w = want(&[(1, 'a'), (2, 'b'), (4, 'd')]);
        for start in starts {
            let mut kernel: BTreeMap<&str, (u8, char)> = start
                .iter()
                .filter(|o| o.owned)
                .map(|o| (o.handle, (o.key.unwrap(), o.value.unwrap())))
                .collect();
            for op in diff(start.clone(), &w, Scope::OwnDevice, true) {
                match op {
                    Op::Remove(h) => {
                        kernel.remove(h);
                    }
                    Op::Set { key, value, .. } => {
                        kernel.retain(|_, (k, _)| *k != key);
                        kernel.insert(["n1", "n2", "n3", "n4"][usize::from(key) - 1], (key, value));
                    }
                    Op::Refuse(_) => unreachable!("own device refuses nothing"),
                }
            }
            let got: BTreeMap<u8, char> = kernel.into_values().collect();
            assert_eq!(got, w, "from {start:?}");
        }
    }

    #[test]
    fn plan_wants_overlay_routes_only_once_the_device_exists() {
        use crate::routing::{PeerNode, PeerRoute, PeerRoute6};
        let plan = RoutePlan {
            node_name: "n0".into(),
            node_ip: Ipv4Addr::new(192, 168, 0, 10).into(),
            local_pod_cidrs: vec![],
            underlay_mtu: 1500,
            vxlan: None,
            peers: vec![
                PeerRoute {
                    node: "n1".into(),
                    node_ip: Ipv4Addr::new(192, 168, 0, 11).into(),
                    pod_cidr: "10.244.1.0/24".parse().unwrap(),
                    via: PeerVia::Direct { ifindex: 2 },
                },
                PeerRoute {
                    node: "n2".into(),
                    node_ip: Ipv4Addr::new(10, 0, 0, 12).into(),
                    pod_cidr: "10.244.2.0/24".parse().unwrap(),
                    via: PeerVia::Vxlan {
                        vtep: Ipv4Addr::new(10, 244, 2, 0),
                        mac: [0x0e, 0x77, 10, 0, 0, 12],
                    },
                },
            ],
            peer_nodes: vec![
                PeerNode {
                    node: "n1".into(),
                    node_ip: Ipv4Addr::new(192, 168, 0, 11).into(),
                    reach: PeerReach::Direct { ifindex: 2 },
                },
                PeerNode {
                    node: "n2".into(),
                    node_ip: Ipv4Addr::new(10, 0, 0, 12).into(),
                    reach: PeerReach::Vxlan {
                        mac: [0x0e, 0x77, 10, 0, 0, 12],
                    },
                },
            ],
            skipped: vec![],
            masquerade: None,
        };
        assert_eq!(plan.wanted_routes(None).len(), 1);
        let routes = plan.wanted_routes(Some(7));
        assert_eq!(
            routes[&"10.244.2.0/24".parse().unwrap()],
            Nexthop {
                gateway: Some(Ipv4Addr::new(10, 244, 2, 0)),
                via6: None,
                oif: Some(7),
                onlink: true
            }
        );
        assert_eq!(
            plan.wanted_neighbours(),
            BTreeMap::from([(Ipv4Addr::new(10, 244, 2, 0), [0x0e, 0x77, 10, 0, 0, 12])])
        );
        assert_eq!(
            plan.wanted_fdb(),
            BTreeMap::from([(
                [0x0e, 0x77, 10, 0, 0, 12],
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12))
            )])
        );
        let vtep6: Ipv6Addr = "fd00:10:244:2::".parse().unwrap();
        let plan6 = RoutePlan6 {
            peers: vec![PeerRoute6 {
                node: "n2".into(),
                pod_cidr: "fd00:10:244:2::/64".parse().unwrap(),
                via: PeerVia6::Vxlan {
                    vtep: vtep6,
                    mac: [0x0e, 0x77, 10, 0, 0, 12],
                },
            }],
            ..RoutePlan6::default()
        };
        assert!(plan6.wanted_routes(None).is_empty());
        assert_eq!(plan6.wanted_routes(Some(7)).len(), 1);
        assert_eq!(
            plan6.wanted_neighbours(),
            BTreeMap::from([(vtep6, [0x0e, 0x77, 10, 0, 0, 12])])
        );
    }
}
