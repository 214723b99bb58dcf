//! The Twill lab: simulated Kubernetes nodes and pods in network namespaces, on one machine,
//! without touching the machine's own network namespace or root cgroup.
//!
//! ```text
//!              netns twl-<id>-ul: bridge br0 (172.30.0.0/24)       [netns twl-<id>-ext]
//!                 |            |             |                          (external client)
//!   netns twl-<id>-n0   twl-<id>-n1   twl-<id>-n2   <- nodes: eth0 172.30.0.1x, own cgroup,
//!      |   \                                            own bpffs dir, own scratch dir
//!   twl-<id>-n0-web0 ...                                <- pods: netns wired by real twill-cni
//! ```
//!
//! Every name carries a random run id, so labs of parallel tests never collide. [`Lab`] is a
//! guard: dropping it (also while unwinding from a panic) kills every process of the lab (via
//! `cgroup.kill` of the node cgroups), deletes the namespaces, cgroups, bpffs pins and scratch
//! files. [`clean_leftovers`] removes what a killed run left behind, and never a lab whose owning
//! process still runs (a parallel test run).
//!
//! One module per concept; everything public is re-exported here, so tests name it
//! `twill_lab::Foo` whichever module defines it:
//! - [`lab`]: [`LabSpec`], [`Lab`] (build, manifests, background servers, teardown guard),
//!   [`External`], [`require`];
//! - [`node`]: [`Node`] (CNI config, twill-cni, pods, agent flags, debug CLI);
//! - [`pod`]: [`Pod`]; [`agent`]: [`Agent`];
//! - [`machine`]: root, cgroup2, bpffs, [`bin`], [`cache_dir`];
//! - [`exec`]: [`run_cmd`], commands in a namespace and cgroup, [`spawn_and_wait_ready`];
//! - [`helpers`]: the small helpers every test file uses: [`wait_for`], [`wait_until`],
//!   [`NetnsGuard`], [`in_netns`], [`netns_path`], [`addr_be`], [`replier`], [`write_atomic`];
//! - [`cleanup`]: cgroup/mount removal and [`clean_leftovers`].
pub mod agent;
pub mod bench;
pub mod cleanup;
pub mod cni_bench;
pub mod cri;
pub mod exec;
pub mod helpers;
pub mod image;
pub mod lab;
pub mod machine;
pub mod manifests;
pub mod node;
pub mod pod;

pub use agent::Agent;
pub use cleanup::clean_leftovers;
pub(crate) use cleanup::{
    kill_cgroup_tree, list_netns, remove_cgroup_tree, remove_v1_cgroup_dirs, unmount_under,
    write_owner,
};
pub(crate) use exec::{
    ip, labtool_in, netns_command, netns_only_command, ns_ip, sysctl, terminate,
};
pub use exec::{run_cmd, spawn_and_wait_ready};
pub use helpers::{
    NetnsGuard, addr_be, in_netns, netns_path, replier, wait_for, wait_until, write_atomic,
};
pub use lab::{External, Lab, LabSpec, Underlay, require};
pub use machine::{available, bin, cache_dir, cgroup2_mount, ensure_bpffs};
pub(crate) use machine::{random_id, scratch_dir, which};
pub use node::Node;
pub use pod::Pod;

/// Prefix of every lab object name (netns, cgroup, bpffs dir, scratch dir).
pub const PREFIX: &str = "twl";
const LAB_DIR_NAME: &str = "twill-lab";
const NETNS_RUN_DIR: &str = "/var/run/netns";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Gateway the pods use; answered by the host side of their veth (see twill-cni's README).
pub const POD_GATEWAY: &str = "169.254.1.1";
