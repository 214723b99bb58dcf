//! Loading, pinning, adopting and attaching the embedded kernel object.
//!
//! ```text
//!  <bpffs-dir>/<MapKind::name()>          pinned maps (adopted by the next agent as they are)
//!  <bpffs-dir>/link_twill_connect4 …6      pinned cgroup links (keep the hooks attached while
//!                                          no agent runs; a new agent swaps their program in
//!                                          place with BPF_LINK_UPDATE, leaving no gap)
//!  <bpffs-dir>/link_tc_<dev>_twill_tc_ingress / _egress   pinned tcx links, same treatment
//!  <bpffs-dir>/link_pod_<veth>_twill_pod_ingress / _egress  NetworkPolicy on each pod's host veth
//! ```
//!
//! Start-up never deletes or rewrites map contents: the control plane adopts what is pinned
//! (`LbMaps::dump`) and prunes only after its sources have synced (HOUSE_STYLE §7).
//!
//! Use: [`ensure_bpffs`] → [`Datapath::load`] → [`Datapath::attach_cgroup`] (socket-level LB)
//! and [`Datapath::attach_tc`] per device (north-south, from inside the node's netns) →
//! [`Datapath::lb_maps`] (the [`LbMaps`](crate::lbmap::LbMaps) implementation, counters, dumps,
//! source ranges). [`Datapath::unpin_all`] removes everything for uninstall.
mod fastpath_maps;
mod maps;
mod pods;
mod policy_maps;
mod sockdestroy;
mod sockiter;
mod sys;

use std::{
    io,
    os::{fd::AsFd as _, fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use twill_common::{BpfMapType, MapKind};

pub use self::{
    fastpath_maps::{AyaFastPathMaps, EndpointSync},
    maps::{AyaLbMaps, CtTable, FlushReport, ReasonCounts},
    pods::{PodLinkReport, is_pod_veth},
    policy_maps::AyaPolicyMaps,
    sockdestroy::{DEFAULT_NETNS_DIR, DestroyMethod, DestroyReport, SockDestroyMode},
    sockiter::SockIterError,
    sys::{current_netns_cookie, monotonic_now_ns},
};

/// The kernel object built by `build.rs` from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twill"));

/// The socket-level programs and the cgroup hook each one is attached to (attach type numbers
/// from `enum bpf_attach_type`, used to recognise our pinned links).
/// The IPv6 hooks serve AF_INET6 sockets talking to IPv4-mapped addresses.
pub const SOCK_PROGRAMS: &[(&str, u32)] = &[
    ("twill_connect4", 10),     // BPF_CGROUP_INET4_CONNECT
    ("twill_sendmsg4", 14),     // BPF_CGROUP_UDP4_SENDMSG
    ("twill_recvmsg4", 19),     // BPF_CGROUP_UDP4_RECVMSG
    ("twill_getpeername4", 29), // BPF_CGROUP_INET4_GETPEERNAME
    ("twill_connect6", 11),     // BPF_CGROUP_INET6_CONNECT
    ("twill_sendmsg6", 15),     // BPF_CGROUP_UDP6_SENDMSG
    ("twill_recvmsg6", 20),     // BPF_CGROUP_UDP6_RECVMSG
    ("twill_getpeername6", 30), // BPF_CGROUP_INET6_GETPEERNAME
];

/// The per-packet programs and their tcx hooks (`BPF_TCX_INGRESS` = 46, `BPF_TCX_EGRESS` = 47).
pub const TC_PROGRAMS: &[(&str, TcAttachType, u32)] = &[
    ("twill_tc_ingress", TcAttachType::Ingress, 46),
    ("twill_tc_egress", TcAttachType::Egress, 47),
];

/// The NetworkPolicy programs on a pod's host-side veth: tc ingress is the pod's egress, tc
/// egress its ingress.
pub const POD_PROGRAMS: &[(&str, TcAttachType, u32)] = &[
    ("twill_pod_ingress", TcAttachType::Ingress, 46),
    ("twill_pod_egress", TcAttachType::Egress, 47),
];

/// Prefix of pinned link files under the bpffs directory.
const LINK_PIN_PREFIX: &str = "link_";
/// `statfs(2)` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of loading, adopting and attaching the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "the embedded eBPF object is empty: it was built with AYA_BUILD_SKIP; rebuild without it"
    )]
    EmptyObject,
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no map named {0} (twill-common and proxy-ebpf disagree)")]
    MissingMap(&'static str),

    #[error("map {name} has an unexpected type")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening pinned map {path}")]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} does not match this agent's layout ({detail}); it was made by an incompatible \
         version: run `twill-agent uninstall` (or remove the pin) and restart"
    )]
    PinnedMapIncompatible { path: PathBuf, detail: String },
    #[error("the eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {action} failed")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: link is not an fd link (kernel without bpf_link support?)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("program {name}: {op} of pinned link {path} failed")]
    PinnedLink {
        name: &'static str,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("program {name}: pinning its link at {path} failed")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating bpffs directory {path}")]
    BpffsDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network interface {name} not found in this network namespace")]
    Interface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting a BPF filesystem at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("removing pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `max_entries` of every map (defaults and flags from the catalogue).
pub use twill_common::MapSizes;

/// How to load the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Pin maps and links here (on bpffs) and adopt what an earlier agent pinned. `None`: nothing
    /// is pinned and everything goes away with the [`Datapath`] (tests).
    pub bpffs_dir: Option<PathBuf>,
    pub map_sizes: MapSizes,
    /// Directories of pod network namespace bind mounts, searched (with this namespace) for
    /// connected UDP sockets to destroy when a backend goes away.
    pub netns_dirs: Vec<PathBuf>,
    pub sock_destroy: SockDestroyMode,
    /// Denied-flow events each CPU may send to `debug monitor` per second (`--monitor-rate`).
    pub monitor_rate: u32,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            bpffs_dir: None,
            map_sizes: MapSizes::default(),
            netns_dirs: vec![DEFAULT_NETNS_DIR.into()],
            sock_destroy: SockDestroyMode::default(),
            monitor_rate: twill_common::POLICY_EVENTS_PER_CPU_SECOND,
        }
    }
}

impl DatapathOptions {
    /// Pinned under `dir` with default map sizes.
    pub fn pinned(dir: impl Into<PathBuf>) -> Self {
        Self {
            bpffs_dir: Some(dir.into()),
            ..Self::default()
        }
    }
    /// Nothing pinned, default map sizes.
    pub fn unpinned() -> Self {
        Self::default()
    }
}

/// What `load` found pinned and reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedMap {
    pub name: &'static str,
    pub max_entries: u32,
    /// The size the options asked for, when it differs: a pinned map keeps its size (resizing
    /// would drop every live entry); uninstall and restart to apply a new size.
    pub requested: Option<u32>,
}

/// How a socket program got onto the cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A new link was created (and pinned, when pinning).
    Created,
    /// The pinned link of an earlier agent now runs this agent's program (`BPF_LINK_UPDATE`).
    Replaced,
}

enum HeldLink {
    /// Unpinned: detached when dropped.
    Fd(#[expect(dead_code, reason = "held only to keep the link attached")] FdLink),
    /// Pinned: stays attached after the agent exits.
    Pinned(
        #[expect(dead_code, reason = "held for symmetry; the pin keeps it attached")] PinnedLink,
    ),
    Adopted(#[expect(dead_code, reason = "held for symmetry; the pin keeps it attached")] OwnedFd),
}

/// A loaded datapath: the programs and maps of one agent.
pub struct Datapath {
    pub ebpf: Ebpf,
    opts: DatapathOptions,
    adopted: Vec<AdoptedMap>,
    /// (pin file name, outcome, link)
    links: Vec<(String, AttachOutcome, HeldLink)>,
    cgroup: Option<PathBuf>,
    /// Pod veths carrying the policy programs: name → ifindex.
    pod_links: std::collections::BTreeMap<String, u32>,
    /// Whether the socket iterator can run here (until [`Datapath::lb_maps`] uses it).
    sock_iter: Option<Result<sockiter::KernelSupport, SockIterError>>,
    /// The host routing and masquerade maps, once taken out of the object.
    fastpath: Option<AyaFastPathMaps>,
}

/// The aya map type of a catalogue entry.
fn aya_map_type(t: BpfMapType) -> MapType {
    match t {
        BpfMapType::Hash => MapType::Hash,
        BpfMapType::Array => MapType::Array,
        BpfMapType::PerCpuArray => MapType::PerCpuArray,
        BpfMapType::LruHash => MapType::LruHash,
        BpfMapType::LpmTrie => MapType::LpmTrie,
        BpfMapType::RingBuf => MapType::RingBuf,
    }
}

/// Mounts a BPF filesystem at `mount_point` unless one is there already (a fresh machine has
/// none; Cilium's agent mounts it the same way). Returns whether it mounted.
pub fn ensure_bpffs(mount_point: &Path) -> Result<bool, DatapathError> {
    use std::os::unix::ffi::OsStrExt as _;
    if is_bpffs(mount_point) {
        return Ok(false);
    }
    let err = |source| DatapathError::MountBpffs {
        path: mount_point.to_owned(),
        source,
    };
    std::fs::create_dir_all(mount_point).map_err(err)?;
    let target = std::ffi::CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(true)
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid path and out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) }) == 0 && st.f_type == BPF_FS_MAGIC
}

impl Datapath {
    /// Loads the embedded object. With a bpffs directory, maps already pinned there (by an
    /// earlier agent) are adopted with their contents; the others are created and pinned.
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(twill_common::GLOBAL_MONITOR_RATE, &opts.monitor_rate, true);
        let mut adopted = Vec::new();
        for kind in MapKind::ALL {
            loader.map_max_entries(kind.name(), opts.map_sizes.get(*kind));
        }
        if let Some(dir) = &opts.bpffs_dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::BpffsDir {
                path: dir.clone(),
                source,
            })?;
            if !is_bpffs(dir) {
                return Err(DatapathError::NotBpffs { path: dir.clone() });
            }
            // Maps marked not pinned (the monitor's) are made afresh by each agent.
            for kind in MapKind::pinned() {
                let path = dir.join(kind.name());
                if path.exists() {
                    adopted.push(check_pinned(&path, kind, opts.map_sizes.get(kind))?);
                }
                loader.map_pin_path(kind.name(), path);
            }
        }
        // The socket iterator's kfunc call is patched in before aya sees the object; where the
        // kernel lacks it, the object loads as built and the iterator is simply not used.
        let sock_iter = match opts.sock_destroy {
            SockDestroyMode::Auto => Some(sockiter::kernel_support().and_then(|k| {
                let patched = sockiter::patch(EBPF_OBJECT, k.sock_destroy_id())?;
                Ok((k, patched))
            })),
            SockDestroyMode::SockDiag => None,
        };
        let object = match &sock_iter {
            Some(Ok((_, patched))) => patched.bytes(),
            _ => EBPF_OBJECT,
        };
        let ebpf = loader.load(object).map_err(DatapathError::Load)?;
        let sock_iter = sock_iter.map(|r| r.map(|(k, _)| k));
        for name in twill_common::ALL_MAPS {
            if ebpf.map(name).is_none() {
                return Err(DatapathError::MissingMap(name));
            }
        }
        for a in &adopted {
            if let Some(req) = a.requested {
                log::warn!(
                    "adopted pinned map {} keeps its size {} (requested {req}); uninstall to resize",
                    a.name,
                    a.max_entries
                );
            }
        }
        Ok(Self {
            ebpf,
            opts: opts.clone(),
            adopted,
            links: Vec::new(),
            cgroup: None,
            pod_links: std::collections::BTreeMap::new(),
            sock_iter,
            fastpath: None,
        })
    }

    /// Maps found pinned and reused by [`Datapath::load`] (empty on a first start).
    pub fn adopted_maps(&self) -> &[AdoptedMap] {
        &self.adopted
    }

    /// Attaches the socket-level programs (connect, sendmsg, recvmsg, getpeername; IPv4 and IPv6)
    /// to the cgroup-v2 directory `cgroup`. When pinning, a link an earlier agent pinned for the same
    /// cgroup and hook gets this agent's program swapped in atomically; a pinned link for another
    /// cgroup (configuration changed) or a defunct one (cgroup removed) is replaced.
    pub fn attach_cgroup(
        &mut self,
        cgroup: &Path,
    ) -> Result<Vec<(&'static str, AttachOutcome)>, DatapathError> {
        let file = std::fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = file
            .metadata()
            .map_err(|source| DatapathError::Cgroup {
                path: cgroup.to_owned(),
                source,
            })?
            .ino();
        let mut outcomes = Vec::new();
        for &(name, attach_type) in SOCK_PROGRAMS {
            let outcome = self.attach_or_adopt::<CgroupSockAddr>(
                name,
                format!("{LINK_PIN_PREFIX}{name}"),
                &file,
                |t| {
                    t.link_type == sys::BPF_LINK_TYPE_CGROUP
                        && t.cgroup_id == cgroup_id
                        && t.attach_type == attach_type
                },
            )?;
            outcomes.push((name, outcome));
        }
        self.cgroup = Some(cgroup.to_owned());
        Ok(outcomes)
    }

    /// Attaches the per-packet north-south programs to `ifname` (ingress and egress, tcx links,
    /// Linux 6.6+) in the current network namespace; the agent runs inside the node's. Pinned
    /// links of an earlier agent for the same device are updated in place, like the cgroup ones.
    pub fn attach_tc(
        &mut self,
        ifname: &str,
    ) -> Result<Vec<(&'static str, AttachOutcome)>, DatapathError> {
        self.attach_tcx(ifname, TC_PROGRAMS, tc_pin_name)
    }

    /// Attaches `programs` to `ifname` with tcx links, pinned as `pin_name(ifname, program)`;
    /// pinned links of an earlier agent for the same device and hook get the program swapped in.
    fn attach_tcx(
        &mut self,
        ifname: &str,
        programs: &[(&'static str, TcAttachType, u32)],
        pin_name: fn(&str, &str) -> String,
    ) -> Result<Vec<(&'static str, AttachOutcome)>, DatapathError> {
        let ifindex = if_index(ifname)?;
        let mut outcomes = Vec::new();
        for &(name, direction, tcx_type) in programs {
            let outcome = self.attach_or_adopt::<SchedClassifier>(
                name,
                pin_name(ifname, name),
                (ifname, direction),
                |t| {
                    t.link_type == sys::BPF_LINK_TYPE_TCX
                        && t.tcx_ifindex == ifindex
                        && t.tcx_attach_type == tcx_type
                },
            )?;
            outcomes.push((name, outcome));
        }
        Ok(outcomes)
    }

    /// Puts program `name` on `hook` through a link pinned as `pin_key` (when pinning): a link
    /// an earlier agent pinned there for the same hook (`same_hook` recognises its target) is
    /// adopted and gets this agent's program swapped in atomically; otherwise (nothing pinned,
    /// or a pin for another target, which is removed) a new link is made and pinned. The one
    /// path for every program type the agent attaches; [`LinkProgram`] holds what differs.
    fn attach_or_adopt<P: LinkProgram>(
        &mut self,
        name: &'static str,
        pin_key: String,
        hook: P::Hook<'_>,
        same_hook: impl FnOnce(&sys::LinkTarget) -> bool,
    ) -> Result<AttachOutcome, DatapathError>
    where
        for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        let prog: &mut P = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name,
                action: "type",
                source,
            })?;
        prog.ensure_loaded()
            .map_err(|source| DatapathError::Program {
                name,
                action: "load",
                source,
            })?;
        let pin = self.opts.bpffs_dir.as_ref().map(|d| d.join(&pin_key));
        if let Some(pin) = &pin
            && let Some(fd) = adopt_link(name, pin, same_hook)?
        {
            let prog_fd = prog.prog_fd().map_err(|source| DatapathError::Program {
                name,
                action: "fd",
                source,
            })?;
            replace_program(name, pin, &fd, prog_fd)?;
            self.links
                .push((pin_key, AttachOutcome::Replaced, HeldLink::Adopted(fd)));
            return Ok(AttachOutcome::Replaced);
        }
        let link = prog.new_link(name, hook)?;
        let held = match pin {
            Some(pin) => {
                HeldLink::Pinned(link.pin(&pin).map_err(|source| DatapathError::PinLink {
                    name,
                    path: pin,
                    source,
                })?)
            }
            None => HeldLink::Fd(link),
        };
        self.links.push((pin_key, AttachOutcome::Created, held));
        Ok(AttachOutcome::Created)
    }

    /// Detaches the per-packet programs from `ifname` (and removes their pins).
    pub fn detach_tc(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.detach_tcx(ifname, TC_PROGRAMS, tc_pin_name)
    }

    fn detach_tcx(
        &mut self,
        ifname: &str,
        programs: &[(&'static str, TcAttachType, u32)],
        pin_name: fn(&str, &str) -> String,
    ) -> Result<(), DatapathError> {
        let keys: Vec<String> = programs
            .iter()
            .map(|(name, _, _)| pin_name(ifname, name))
            .collect();
        self.links.retain(|(k, _, _)| !keys.contains(k));
        if let Some(dir) = &self.opts.bpffs_dir {
            for k in keys {
                let path = dir.join(k);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(DatapathError::Unpin { path, source: e });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The load-balancing maps (the [`LbMaps`](crate::lbmap::LbMaps) implementation, counters,
    /// dumps). Takes them out of the loaded object, so call it once. When the socket programs
    /// are attached, removing a UDP backend also destroys the connected sockets they aimed at it
    /// (see [`sockdestroy`]).
    pub fn lb_maps(&mut self) -> Result<AyaLbMaps, DatapathError> {
        let maps = AyaLbMaps::from_maps(|name| Ok(self.ebpf.take_map(name)))?;
        if self.cgroup.is_none() {
            return Ok(maps);
        }
        let iter = match self.sock_iter.take() {
            Some(Ok(kernel)) => match sockiter::UdpSockIter::load(&mut self.ebpf, &kernel) {
                Ok(iter) => Some(iter),
                Err(e) => {
                    log::info!(
                        "{}; destroying stale UDP sockets with sock_diag",
                        crate::source::manifests::error_chain(&e)
                    );
                    None
                }
            },
            Some(Err(e)) => {
                log::info!(
                    "{}; destroying stale UDP sockets with sock_diag",
                    crate::source::manifests::error_chain(&e)
                );
                None
            }
            None => None,
        };
        let destroyer = sockdestroy::SocketDestroyer::new(self.opts.netns_dirs.clone(), iter);
        log::info!(
            "stale UDP sockets are destroyed with {:?}",
            destroyer.method()
        );
        Ok(maps.with_socket_destroyer(destroyer))
    }

    /// The NetworkPolicy maps (the [`PolicyMaps`](crate::policy::PolicyMaps) implementation).
    /// Takes them out of the loaded object, so call it once.
    pub fn policy_maps(&mut self) -> Result<AyaPolicyMaps, DatapathError> {
        AyaPolicyMaps::from_maps(|name| Ok(self.ebpf.take_map(name)))
    }

    /// The denied-flow ring buffer and its per-CPU budget (lost-event counters), for
    /// `crate::policy::monitor::read_events`. Once: the maps move out of the object.
    pub fn monitor_maps(
        &mut self,
    ) -> Result<
        (
            aya::maps::RingBuf<aya::maps::MapData>,
            aya::maps::PerCpuArray<aya::maps::MapData, twill_common::EventBudget>,
        ),
        DatapathError,
    > {
        let mut take = |name: &'static str| {
            self.ebpf
                .take_map(name)
                .ok_or(DatapathError::MissingMap(name))
        };
        let ring = take(twill_common::MAP_POLICY_EVENTS)?;
        let budget = take(twill_common::MAP_POLICY_EVENT_BUDGET)?;
        let ring = aya::maps::RingBuf::try_from(ring).map_err(|source| DatapathError::MapType {
            name: twill_common::MAP_POLICY_EVENTS,
            source,
        })?;
        let budget =
            aya::maps::PerCpuArray::try_from(budget).map_err(|source| DatapathError::MapType {
                name: twill_common::MAP_POLICY_EVENT_BUDGET,
                source,
            })?;
        Ok((ring, budget))
    }

    /// The eBPF host routing and masquerade maps (taken out of the loaded object on first use).
    pub fn fastpath_maps(&mut self) -> Result<&mut AyaFastPathMaps, DatapathError> {
        if self.fastpath.is_none() {
            self.fastpath = Some(AyaFastPathMaps::from_maps(|name| {
                Ok(self.ebpf.take_map(name))
            })?);
        }
        self.fastpath
            .as_mut()
            .ok_or(DatapathError::MissingMap(twill_common::MAP_LOCAL_ENDPOINTS))
    }

    /// Removes every pin Twill made under `bpffs_dir` (links first: the hooks detach as soon as
    /// no process holds them; then maps) and the directory itself when empty. For uninstall.
    /// Returns the removed paths.
    pub fn unpin_all(bpffs_dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
        let mut removed = Vec::new();
        // Every link pin (cgroup and tc links of any device), then the maps.
        let mut link_pins: Vec<PathBuf> = match std::fs::read_dir(bpffs_dir) {
            Ok(dir) => dir
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(LINK_PIN_PREFIX))
                .map(|e| e.path())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(source) => {
                return Err(DatapathError::Unpin {
                    path: bpffs_dir.to_owned(),
                    source,
                });
            }
        };
        link_pins.sort();
        let map_pins = MapKind::pinned()
            .map(MapKind::name)
            .chain(twill_common::RETIRED_MAPS.iter().copied())
            .map(|n| bpffs_dir.join(n));
        for path in link_pins.into_iter().chain(map_pins) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Unpin { path, source }),
            }
        }
        // Only when empty: somebody else's pins in the same directory stay.
        match std::fs::remove_dir(bpffs_dir) {
            Ok(()) => removed.push(bpffs_dir.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(source) => {
                return Err(DatapathError::Unpin {
                    path: bpffs_dir.to_owned(),
                    source,
                });
            }
        }
        Ok(removed)
    }
}

/// Opens the map pinned as `name` under `bpffs_dir`.
pub(crate) fn open_pinned_map(
    bpffs_dir: &Path,
    name: &str,
) -> Result<aya::maps::Map, DatapathError> {
    let path = bpffs_dir.join(name);
    let data = aya::maps::MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.clone(),
        source,
    })?;
    aya::maps::Map::from_map_data(data).map_err(|source| DatapathError::OpenPinned { path, source })
}

/// The pin file of a tc link. bpffs refuses names holding a dot (`bpf_lookup()` in
/// kernel/bpf/inode.c returns EPERM), which device names may hold (`twill.vxlan`, VLANs such
/// as `eth0.100`); a colon, which no device name may hold (`dev_valid_name()`), stands in for
/// it, so the mapping stays one to one.
fn tc_pin_name(ifname: &str, prog: &str) -> String {
    let ifname = ifname.replace('.', ":");
    format!("{LINK_PIN_PREFIX}tc_{ifname}_{prog}")
}

/// Pin of a pod veth's policy link.
fn pod_pin_name(ifname: &str, prog: &str) -> String {
    format!("{LINK_PIN_PREFIX}{POD_PIN_INFIX}{ifname}_{prog}")
}

/// After [`LINK_PIN_PREFIX`]: marks the pins of pod veth links.
const POD_PIN_INFIX: &str = "pod_";

fn if_index(ifname: &str) -> Result<u32, DatapathError> {
    let err = |source| DatapathError::Interface {
        name: ifname.to_owned(),
        source,
    };
    let c = std::ffi::CString::new(ifname)
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(err(io::Error::last_os_error())),
        i => Ok(i),
    }
}

/// Swaps `prog` into the pinned link `link` atomically (`BPF_LINK_UPDATE`: the hook never runs
/// zero programs) and confirms the link now runs it.
fn replace_program(
    name: &'static str,
    pin: &Path,
    link: &OwnedFd,
    prog: &aya::programs::ProgramFd,
) -> Result<(), DatapathError> {
    let err = |op, source| DatapathError::PinnedLink {
        name,
        op,
        path: pin.to_owned(),
        source,
    };
    sys::link_update(link.as_fd(), prog.as_fd()).map_err(|e| err("BPF_LINK_UPDATE", e))?;
    let running = sys::link_info(link.as_fd()).map_err(|e| err("BPF_OBJ_GET_INFO_BY_FD", e))?;
    let ours = sys::prog_id(prog.as_fd()).map_err(|e| err("BPF_OBJ_GET_INFO_BY_FD", e))?;
    if running.prog_id != ours {
        return Err(err(
            "verify BPF_LINK_UPDATE",
            io::Error::other(format!(
                "link runs program {}, loaded {ours}",
                running.prog_id
            )),
        ));
    }
    Ok(())
}

/// Validates a pinned map against its catalogue entry.
fn check_pinned(path: &Path, kind: MapKind, requested: u32) -> Result<AdoptedMap, DatapathError> {
    let info = MapInfo::from_pin(path).map_err(|source| DatapathError::OpenPinned {
        path: path.to_owned(),
        source,
    })?;
    layout_mismatch(&info, kind).map_or(Ok(()), |detail| {
        Err(DatapathError::PinnedMapIncompatible {
            path: path.to_owned(),
            detail,
        })
    })?;
    let max_entries = info.max_entries();
    Ok(AdoptedMap {
        name: kind.name(),
        max_entries,
        requested: (max_entries != requested).then_some(requested),
    })
}

/// How `info` differs from `kind`'s catalogue entry (type, key or value size), if it does.
fn layout_mismatch(info: &MapInfo, kind: MapKind) -> Option<String> {
    let spec = kind.spec();
    let expected = aya_map_type(spec.map_type);
    match info.map_type() {
        Err(e) => return Some(e.to_string()),
        Ok(found) if found != expected => {
            return Some(format!("type {found:?}, expected {expected:?}"));
        }
        Ok(_) => {}
    }
    let (key, value) = (info.key_size() as usize, info.value_size() as usize);
    (key != spec.key_size || value != spec.value_size).then(|| {
        format!(
            "key/value size {key}/{value}, expected {}/{}",
            spec.key_size, spec.value_size
        )
    })
}

/// A program type the agent attaches through a bpf_link it pins, so that a restarted agent can
/// adopt the link (cgroup socket hooks, tcx). Only making a fresh link differs between them;
/// [`Datapath::attach_or_adopt`] does the rest once.
trait LinkProgram {
    /// Where the program attaches.
    type Hook<'h>;
    /// Loads the program into the kernel unless an earlier attach already did.
    fn ensure_loaded(&mut self) -> Result<(), ProgramError>;
    fn prog_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError>;
    /// Attaches the program to `hook` with a new link, taken out of aya's bookkeeping so that
    /// it can be pinned.
    fn new_link(
        &mut self,
        name: &'static str,
        hook: Self::Hook<'_>,
    ) -> Result<FdLink, DatapathError>;
}

/// aya's errors of making a link, with the program's name and the step.
fn link_step(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        action,
        source,
    }
}

impl LinkProgram for CgroupSockAddr {
    /// The cgroup-v2 directory, opened.
    type Hook<'h> = &'h std::fs::File;

    fn ensure_loaded(&mut self) -> Result<(), ProgramError> {
        if self.fd().is_err() {
            self.load()?;
        }
        Ok(())
    }

    fn prog_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError> {
        self.fd()
    }

    fn new_link(
        &mut self,
        name: &'static str,
        cgroup: &std::fs::File,
    ) -> Result<FdLink, DatapathError> {
        let id = self
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(link_step(name, "attach"))?;
        let link = self.take_link(id).map_err(link_step(name, "take link"))?;
        FdLink::try_from(link).map_err(|source| DatapathError::Link { name, source })
    }
}

impl LinkProgram for SchedClassifier {
    /// The device name and the direction.
    type Hook<'h> = (&'h str, TcAttachType);

    fn ensure_loaded(&mut self) -> Result<(), ProgramError> {
        if self.fd().is_err() {
            self.load()?;
        }
        Ok(())
    }

    fn prog_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError> {
        self.fd()
    }

    fn new_link(
        &mut self,
        name: &'static str,
        (ifname, direction): (&str, TcAttachType),
    ) -> Result<FdLink, DatapathError> {
        let id = self
            .attach(ifname, direction)
            .map_err(link_step(name, "attach"))?;
        let link = self.take_link(id).map_err(link_step(name, "take link"))?;
        // A netlink (pre-6.6) attachment is not a bpf_link and could not be pinned.
        FdLink::try_from(link).map_err(|source| DatapathError::Link { name, source })
    }
}

/// Opens the pinned link at `pin` when `ours` recognises its target; removes it when not
/// (another cgroup or device, a removed one, another hook) so a fresh link can take its place.
fn adopt_link(
    name: &'static str,
    pin: &Path,
    ours: impl FnOnce(&sys::LinkTarget) -> bool,
) -> Result<Option<OwnedFd>, DatapathError> {
    let fd = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DatapathError::PinnedLink {
                name,
                op: "BPF_OBJ_GET",
                path: pin.to_owned(),
                source,
            });
        }
    };
    let info = sys::link_info(fd.as_fd()).map_err(|source| DatapathError::PinnedLink {
        name,
        op: "BPF_OBJ_GET_INFO_BY_FD",
        path: pin.to_owned(),
        source,
    })?;
    if ours(&info) {
        return Ok(Some(fd));
    }
    log::info!(
        "pinned link {} is for another target or hook ({info:?}); replacing it",
        pin.display()
    );
    std::fs::remove_file(pin).map_err(|source| DatapathError::Unpin {
        path: pin.to_owned(),
        source,
    })?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent moves these into its async tasks.
    #[test]
    fn handles_are_send() {
        fn send<T: Send>() {}
        send::<Datapath>();
        send::<AyaLbMaps>();
        send::<AyaPolicyMaps>();
    }

    #[test]
    fn tc_pin_names_avoid_the_dot_bpffs_refuses() {
        assert_eq!(
            tc_pin_name("twill.vxlan", "twill_tc_ingress"),
            "link_tc_twill:vxlan_twill_tc_ingress"
        );
        assert_eq!(tc_pin_name("eth0", "p"), "link_tc_eth0_p");
    }

    /// The kernel crate's map definitions agree with the catalogue (name, type, key and value
    /// size, default size): the catalogue is the one description the agent sizes, checks and
    /// adopts maps by, so a definition that drifted from it would be created one way and
    /// checked another.
    #[test]
    fn kernel_object_maps_match_the_catalogue() {
        assert!(
            !EBPF_OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP: the object cannot be checked"
        );
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        for kind in MapKind::ALL {
            let spec = kind.spec();
            let def = obj
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("the object defines no map {}", spec.name));
            let map_type = aya_map_type(spec.map_type) as u32;
            assert_eq!(def.map_type(), map_type, "{} type", spec.name);
            assert_eq!(def.key_size() as usize, spec.key_size, "{} key", spec.name);
            assert_eq!(
                def.value_size() as usize,
                spec.value_size,
                "{} value",
                spec.name
            );
            assert_eq!(def.max_entries(), spec.default_size, "{} size", spec.name);
        }
    }
}
