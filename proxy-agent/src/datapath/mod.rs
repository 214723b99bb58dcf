//! Loading, attaching and pinning the embedded kernel object.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};

/// The kernel object built by `build.rs` from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twill"));

/// Errors of loading and attaching the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the embedded eBPF object is empty: it was built with AYA_BUILD_SKIP; rebuild without it")]
    EmptyObject,
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no map named {0} (twill-common and proxy-ebpf disagree)")]
    MissingMap(&'static str),
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
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating bpffs directory {path}")]
    BpffsDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A loaded datapath: the programs and maps of one agent.
pub struct Datapath {
    pub ebpf: Ebpf,
    links: Vec<FdLink>,
}

impl Datapath {
    /// Loads the embedded object. Maps are pinned by name under `bpffs_dir` when given, so a
    /// restarted agent finds (and reuses) the same maps.
    pub fn load(bpffs_dir: Option<&Path>) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = bpffs_dir {
            std::fs::create_dir_all(dir)
                .map_err(|source| DatapathError::BpffsDir { path: dir.to_owned(), source })?;
            loader.default_map_pin_directory(dir);
        }
        let ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        for name in twill_common::ALL_MAPS {
            if ebpf.map(name).is_none() {
                return Err(DatapathError::MissingMap(name));
            }
        }
        Ok(Self { ebpf, links: Vec::new() })
    }

    /// Attaches the socket-level programs to the cgroup-v2 directory `cgroup`.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        const CONNECT4: &str = "twill_connect4";
        let file = std::fs::File::open(cgroup)
            .map_err(|source| DatapathError::Cgroup { path: cgroup.to_owned(), source })?;
        let prog: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(CONNECT4)
            .ok_or(DatapathError::MissingProgram(CONNECT4))?
            .try_into()
            .map_err(|source| DatapathError::Program { name: CONNECT4, action: "type", source })?;
        prog.load()
            .map_err(|source| DatapathError::Program { name: CONNECT4, action: "load", source })?;
        let link_id = prog
            .attach(&file, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program { name: CONNECT4, action: "attach", source })?;
        let link = prog
            .take_link(link_id)
            .map_err(|source| DatapathError::Program { name: CONNECT4, action: "take link", source })?;
        let link = FdLink::try_from(link)
            .map_err(|source| DatapathError::Link { name: CONNECT4, source })?;
        self.links.push(link);
        Ok(())
    }
}
