//! The `iter/udp` socket iterator that destroys stale connected UDP sockets with the
//! `bpf_sock_destroy` kfunc (kernel >= 6.5), and what it takes to load it with aya 0.14.
//!
//! The kernel program (`proxy-ebpf/src/sockiter.rs`) calls the kfunc through a placeholder
//! helper number; aya 0.14 cannot resolve kfunc externs, so [`patch`] turns each placeholder call
//! in the program's section into a real kfunc call (`src_reg = BPF_PSEUDO_KFUNC_CALL`,
//! `imm` = the function's id in the running kernel's BTF) before the object is handed to aya.
//! aya leaves such instructions alone: it only relocates `BPF_PSEUDO_CALL`s.
//!
//! Where this cannot work (no BTF, a kernel without the kfunc, an older kernel without BPF
//! iterators), [`kernel_support`] or [`UdpSockIter::load`] says why and the agent destroys
//! sockets through `sock_diag` instead (see [`super::sockdestroy`]).
use std::{
    fs::File,
    io::{self, Read as _},
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    Btf, Ebpf,
    maps::{HashMap, MapData},
    programs::Iter,
};
use aya_obj::btf::BtfKind;
use object::{Object as _, ObjectSection as _};
use twill_common::{
    KFUNC_PLACEHOLDER_SOCK_DESTROY, MAP_SOCK_DESTROY, PROG_UDP_SOCK_DESTROY, SockDestroyKey,
};

use super::sys;

/// ELF section of the iterator program (`SEC("iter/udp")`).
const SECTION: &str = "iter/udp";
/// `BPF_JMP | BPF_CALL`.
const OP_CALL: u8 = 0x85;
/// `src_reg` of a kfunc call (include/uapi/linux/bpf.h); the id is looked up in vmlinux BTF when
/// the instruction's `off` (the BTF fd index) is 0.
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const INSN_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SockIterError {
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")]
    Btf(#[source] aya::BtfError),
    #[error("the kernel has no bpf_sock_destroy kfunc (Linux 6.5 added it)")]
    NoKfunc(#[source] aya::BtfError),
    #[error("the embedded eBPF object: {0}")]
    Object(String),
    #[error("loading the {PROG_UDP_SOCK_DESTROY} iterator program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("the {MAP_SOCK_DESTROY} map")]
    Map(#[source] aya::maps::MapError),
    #[error("{call}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the running kernel offers the iterator: its BTF and the kfunc's id in it.
pub struct KernelSupport {
    btf: Btf,
    sock_destroy_id: u32,
}

impl KernelSupport {
    pub fn sock_destroy_id(&self) -> u32 {
        self.sock_destroy_id
    }
}

/// Reads vmlinux BTF and finds `bpf_sock_destroy` in it.
pub fn kernel_support() -> Result<KernelSupport, SockIterError> {
    let btf = Btf::from_sys_fs().map_err(SockIterError::Btf)?;
    let sock_destroy_id = btf
        .id_by_type_name_kind("bpf_sock_destroy", BtfKind::Func)
        .map_err(SockIterError::NoKfunc)?;
    Ok(KernelSupport {
        btf,
        sock_destroy_id,
    })
}

/// An ELF object copied into 8-aligned memory (the object parser reads its headers in place).
pub struct PatchedObject {
    words: Vec<u64>,
    len: usize,
}

impl PatchedObject {
    fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` owns at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A copy of `object` whose placeholder calls in the iterator's section call the kfunc with BTF
/// id `kfunc_id`. Fails when the section or the placeholder is missing (an object built without
/// the iterator must not pass for one with it).
pub fn patch(object: &[u8], kfunc_id: u32) -> Result<PatchedObject, SockIterError> {
    let range = {
        let file = object::File::parse(object).map_err(|e| SockIterError::Object(e.to_string()))?;
        let section = file
            .section_by_name(SECTION)
            .ok_or_else(|| SockIterError::Object(format!("no {SECTION} section")))?;
        let (off, len) = section
            .file_range()
            .ok_or_else(|| SockIterError::Object(format!("{SECTION} has no file data")))?;
        let start = usize::try_from(off).map_err(|e| SockIterError::Object(e.to_string()))?;
        let len = usize::try_from(len).map_err(|e| SockIterError::Object(e.to_string()))?;
        start..start + len
    };
    let mut patched = PatchedObject::new(object);
    let n = patch_insns(&mut patched.bytes_mut()[range], kfunc_id);
    if n == 0 {
        return Err(SockIterError::Object(format!(
            "no bpf_sock_destroy placeholder call in {SECTION}"
        )));
    }
    Ok(patched)
}

/// Rewrites every `call KFUNC_PLACEHOLDER_SOCK_DESTROY` (a helper call: `src_reg` 0, `off` 0)
/// in `insns` into a kfunc call of `kfunc_id`; returns how many. The second half of a 16-byte
/// `ld_imm64` has opcode 0, so it never looks like a call.
fn patch_insns(insns: &mut [u8], kfunc_id: u32) -> usize {
    let mut n = 0;
    for insn in insns.chunks_exact_mut(INSN_LEN) {
        let imm = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        if insn[0] == OP_CALL
            && insn[1] == 0
            && insn[2..4] == [0, 0]
            && imm == KFUNC_PLACEHOLDER_SOCK_DESTROY
        {
            // Byte 1 is dst_reg (low nibble) and src_reg (high nibble) on little-endian BPF.
            insn[1] = BPF_PSEUDO_KFUNC_CALL << 4;
            insn[4..8].copy_from_slice(&kfunc_id.to_le_bytes());
            n += 1;
        }
    }
    n
}

/// The loaded iterator: a link to make iterators from, and the map of backends it destroys
/// sockets to.
pub struct UdpSockIter {
    link: OwnedFd,
    targets: HashMap<MapData, SockDestroyKey, u8>,
}

impl UdpSockIter {
    /// Loads the (patched) iterator program of `ebpf` and links it.
    pub fn load(ebpf: &mut Ebpf, support: &KernelSupport) -> Result<Self, SockIterError> {
        let targets = ebpf
            .take_map(MAP_SOCK_DESTROY)
            .ok_or_else(|| SockIterError::Object(format!("no map {MAP_SOCK_DESTROY}")))?;
        let targets = HashMap::try_from(targets).map_err(SockIterError::Map)?;
        let prog: &mut Iter = ebpf
            .program_mut(PROG_UDP_SOCK_DESTROY)
            .ok_or_else(|| SockIterError::Object(format!("no program {PROG_UDP_SOCK_DESTROY}")))?
            .try_into()
            .map_err(SockIterError::Program)?;
        prog.load("udp", &support.btf)
            .map_err(SockIterError::Program)?;
        let fd = prog.fd().map_err(SockIterError::Program)?;
        let link = sys::iter_link_create(fd.as_fd()).map_err(|source| SockIterError::Syscall {
            call: "BPF_LINK_CREATE (iter/udp)",
            source,
        })?;
        Ok(Self { link, targets })
    }

    /// Replaces the backends whose sockets the next sweeps destroy.
    pub fn set_targets(&mut self, targets: &[SockDestroyKey]) -> Result<(), SockIterError> {
        self.clear()?;
        for k in targets {
            self.targets.insert(k, 1, 0).map_err(SockIterError::Map)?;
        }
        Ok(())
    }

    /// Empties the target map.
    pub fn clear(&mut self) -> Result<(), SockIterError> {
        let keys: Vec<SockDestroyKey> = self.targets.keys().filter_map(Result::ok).collect();
        for k in &keys {
            match self.targets.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(SockIterError::Map(e)),
            }
        }
        Ok(())
    }

    /// Runs the iterator over the UDP sockets of the calling thread's network namespace;
    /// returns how many it destroyed (it writes each one's 8-byte cookie).
    pub fn sweep_current_netns(&self) -> io::Result<usize> {
        let iter = sys::iter_create(self.link.as_fd())?;
        let mut out = Vec::new();
        File::from(iter).read_to_end(&mut out)?;
        Ok(out.len() / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, regs: u8, off: u16, imm: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = regs;
        b[2..4].copy_from_slice(&off.to_le_bytes());
        b[4..8].copy_from_slice(&imm.to_le_bytes());
        b
    }

    #[test]
    fn only_placeholder_helper_calls_become_kfunc_calls() {
        let placeholder = insn(OP_CALL, 0, 0, KFUNC_PLACEHOLDER_SOCK_DESTROY);
        let mut prog: Vec<u8> = [
            insn(OP_CALL, 0, 0, 46),                                // a real helper
            placeholder,                                            // the kfunc
            insn(OP_CALL, 0x10, 0, KFUNC_PLACEHOLDER_SOCK_DESTROY), // a BPF-to-BPF call
            insn(0x18, 0x01, 0, 0),                                 // ld_imm64 ...
            insn(0, 0, 0, KFUNC_PLACEHOLDER_SOCK_DESTROY),          // ... its second half
            placeholder,
        ]
        .concat();
        assert_eq!(patch_insns(&mut prog, 1234), 2);
        let want = insn(OP_CALL, 0x20, 0, 1234);
        assert_eq!(&prog[8..16], &want);
        assert_eq!(&prog[40..48], &want);
        assert_eq!(&prog[0..8], &insn(OP_CALL, 0, 0, 46));
        assert_eq!(
            &prog[16..24],
            &insn(OP_CALL, 0x10, 0, KFUNC_PLACEHOLDER_SOCK_DESTROY)
        );
        assert_eq!(
            &prog[32..40],
            &insn(0, 0, 0, KFUNC_PLACEHOLDER_SOCK_DESTROY)
        );
    }

    /// The embedded object has the iterator with exactly one placeholder call, and patching
    /// changes nothing outside that instruction.
    #[test]
    fn the_embedded_object_patches_once() {
        let object = super::super::EBPF_OBJECT;
        let patched = patch(object, 4242).unwrap();
        let diff: Vec<usize> = object
            .iter()
            .zip(patched.bytes())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(patched.bytes().len(), object.len());
        assert!(!diff.is_empty() && diff.len() <= 5, "{diff:?}");
        assert!(diff.last().unwrap() - diff[0] < INSN_LEN);
        assert!(patch(b"not an ELF object", 1).is_err());
    }
}
