//! The `bpf(2)` commands aya 0.14 does not expose. For cgroup links: opening a pinned object,
//! reading a link's target, and swapping the program of an existing link in place
//! (`BPF_LINK_UPDATE`, which aya only uses internally for XDP and tc). Replacing the program of
//! the pinned link is what makes an agent upgrade gap-free: the hook never has zero programs.
//! For the socket iterator: an iterator link, and iterators made from it.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

// bpf(2) commands and link types (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// `union bpf_attr` is at most a few hundred bytes; every command here uses the first 24. The
/// kernel requires the unused tail to be zero, which a zeroed buffer guarantees.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap_or_default())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_ne_bytes(self.0[off..off + 8].try_into().unwrap_or_default())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_ulong,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// Opens a pinned BPF object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// What a link is attached to (the parts of `struct bpf_link_info` used here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    pub link_type: u32,
    pub prog_id: u32,
    /// For cgroup links: the cgroup's id (its inode number in cgroup2), 0 when the cgroup is
    /// gone (a defunct link).
    pub cgroup_id: u64,
    pub attach_type: u32,
    /// For tcx links: the device and the direction (`BPF_TCX_INGRESS`/`EGRESS`); ifindex 0
    /// when the device is gone.
    pub tcx_ifindex: u32,
    pub tcx_attach_type: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    // struct bpf_link_info: u32 type, u32 id, u32 prog_id, then an 8-aligned union whose cgroup
    // member is { u64 cgroup_id; u32 attach_type; }.
    let info = obj_info(link)?;
    Ok(LinkTarget {
        link_type: info.u32_at(0),
        prog_id: info.u32_at(8),
        cgroup_id: info.u64_at(16),
        attach_type: info.u32_at(24),
        tcx_ifindex: info.u32_at(16),
        tcx_attach_type: info.u32_at(20),
    })
}

/// Atomically replaces the program of `link` by `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(link));
    attr.put_u32(4, fd_u32(prog.as_fd()));
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Id of the loaded program behind `prog` (to check a link now runs it).
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_prog_info: u32 type, u32 id, ...
    Ok(obj_info(prog)?.u32_at(4))
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a zeroed 128-byte buffer (the kernel fills what fits).
fn obj_info(fd: BorrowedFd<'_>) -> io::Result<Attr> {
    let mut info = Attr::new();
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(fd));
    attr.put_u32(4, u32::try_from(info.0.len()).unwrap_or(0));
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Attaches the iterator program `prog` (`BPF_LINK_CREATE` with `BPF_TRACE_ITER`). aya's
/// `Iter::attach` gives a link that can make a single iterator (`IterLink::into_file` consumes
/// it); the socket destroyer makes one per network namespace and sweep from the same link.
pub fn iter_link_create(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // struct { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(prog));
    attr.put_u32(
        8,
        aya_obj::generated::bpf_attach_type::BPF_TRACE_ITER as u32,
    );
    let fd = bpf(
        aya_obj::generated::bpf_cmd::BPF_LINK_CREATE as libc::c_long,
        &mut attr,
    )?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// A new iterator of `link` (`BPF_ITER_CREATE`): reading it runs the program over the objects
/// of the calling thread's network namespace (for socket iterators).
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // struct { u32 link_fd; u32 flags; }
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(link));
    let fd = bpf(
        aya_obj::generated::bpf_cmd::BPF_ITER_CREATE as libc::c_long,
        &mut attr,
    )?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, for ages of affinity
/// entries.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+): the
/// value `bpf_get_netns_cookie` returns for sockets of that namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: valid fd, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    #[test]
    fn netns_cookie_is_stable_and_nonzero() {
        let a = super::current_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(super::current_netns_cookie().unwrap(), a);
    }
}
