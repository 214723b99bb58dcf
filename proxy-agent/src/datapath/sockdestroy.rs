//! Destroying connected UDP sockets that still point at a removed backend.
//!
//! Socket-level load balancing translates a connected UDP socket once, at `connect()`; after
//! that its datagrams go straight to the backend, so removing the backend from the maps does not
//! move it (the classic stale-UDP problem: kubernetes #19029, cilium #27300). Cilium destroys such
//! sockets with a BPF socket iterator calling the `bpf_sock_destroy` kfunc. aya-ebpf 0.2.1 has no
//! `iter` program macro and no kfunc declarations, so we use the older kernel interface that does
//! the same thing: `sock_diag` over netlink (`SOCK_DIAG_BY_FAMILY` dump, then `SOCK_DESTROY` per
//! socket, like `ss -K`; needs `CONFIG_INET_DIAG_DESTROY`, present here and on the major
//! distributions' kernels). The application sees `ECONNABORTED` on its next call and reconnects,
//! which balances it afresh.
//!
//! `sock_diag` only sees the calling thread's network namespace, and every pod has its own; the
//! namespaces are found through the processes of the cgroup subtree the socket programs are
//! attached to (exactly the sockets the datapath translated), and entered from a short-lived
//! thread (`setns` only changes the calling thread).
use std::{
    collections::BTreeMap,
    fs, io,
    mem::size_of,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCP_ESTABLISHED: u32 = 1;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_sockid`: sport, dport (network order), src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, id, expires, rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// Result of one sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
}

/// Network namespaces of every process in the cgroup subtree `cgroup` (deduplicated by the
/// namespace's inode), as paths under /proc to open.
pub fn netns_of_cgroup(cgroup: &Path) -> io::Result<Vec<PathBuf>> {
    let mut pids = Vec::new();
    collect_pids(cgroup, &mut pids)?;
    let mut by_inode = BTreeMap::new();
    for pid in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // Processes exit while we look; those are simply skipped.
        if let Ok(meta) = fs::metadata(&path) {
            by_inode.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    }
    Ok(by_inode.into_values().collect())
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> io::Result<()> {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
        // A child cgroup removed while we walk.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// Destroys every connected UDP socket whose peer is `addr:port`, in each of `namespaces`.
pub fn destroy_udp_to(
    namespaces: &[PathBuf],
    addr: Ipv4Addr,
    port: u16,
) -> io::Result<DestroyReport> {
    let mut report = DestroyReport::default();
    for ns in namespaces {
        let file = match fs::File::open(ns) {
            Ok(f) => f,
            // The process owning this namespace exited: nothing left to clean there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let n = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this (short-lived, dedicated) thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                destroy_in_current_netns(addr, port)
            })
            .join()
            .map_err(|_| io::Error::other("socket destroy thread panicked"))?
        })?;
        report.namespaces += 1;
        report.destroyed += n;
    }
    Ok(report)
}

/// Dumps the connected UDP sockets of the calling thread's namespace and destroys those whose
/// peer is `addr:port`: AF_INET sockets, and AF_INET6 ones connected to `::ffff:addr` (the
/// socket programs translate those too).
pub fn destroy_in_current_netns(addr: Ipv4Addr, port: u16) -> io::Result<usize> {
    let nl = NlSock::open()?;
    let mut destroyed = 0;
    let mut seq = 1;
    for family in [AF_INET, AF_INET6] {
        let mut req = [0u8; REQ_LEN];
        req[0] = family;
        req[1] = IPPROTO_UDP;
        // A connected UDP socket is in state TCP_ESTABLISHED in sock_diag's view.
        req[4..8].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
        nl.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)?;
        let mut victims: Vec<[u8; SOCKID_LEN]> = Vec::new();
        nl.recv_until_done(seq, |msg_type, payload| {
            if msg_type == SOCK_DIAG_BY_FAMILY && payload.len() >= MSG_LEN {
                let id: [u8; SOCKID_LEN] = payload[4..4 + SOCKID_LEN]
                    .try_into()
                    .unwrap_or([0; SOCKID_LEN]);
                let dport = u16::from_be_bytes([id[2], id[3]]);
                if peer_v4(family, &id) == Some(addr) && dport == port {
                    victims.push(id);
                }
            }
        })?;
        for id in &victims {
            seq += 1;
            let mut req = [0u8; REQ_LEN];
            req[0] = family;
            req[1] = IPPROTO_UDP;
            req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
            req[8..].copy_from_slice(id);
            nl.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, &req)?;
            match nl.recv_ack(seq) {
                Ok(()) => destroyed += 1,
                // Closed by its owner meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        seq += 1;
    }
    Ok(destroyed)
}

/// The IPv4 peer in a `struct inet_diag_sockid` (`dst` at bytes 20..36): its first four bytes
/// for AF_INET, the low four of an IPv4-mapped address for AF_INET6.
fn peer_v4(family: u8, id: &[u8; SOCKID_LEN]) -> Option<Ipv4Addr> {
    let dst = &id[20..36];
    let v4 = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    match family {
        AF_INET => Some(v4(&dst[..4])),
        AF_INET6 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(dst);
            std::net::Ipv6Addr::from(b).to_ipv4_mapped()
        }
        _ => None,
    }
}

struct NlSock(OwnedFd);

impl NlSock {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is new and owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> io::Result<()> {
        let len = NLMSG_HDR_LEN + payload.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(payload);
        // The kernel is the default destination of an unbound, unconnected netlink socket.
        // SAFETY: buf is valid for len bytes.
        let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads messages of request `seq` until `NLMSG_DONE`, handing each to `f`.
    fn recv_until_done(&self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + NLMSG_HDR_LEN <= n {
                let (len, msg_type, msg_seq) = header(&buf[off..n]);
                if len < NLMSG_HDR_LEN || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &buf[off + NLMSG_HDR_LEN..off + len];
                if msg_seq == seq {
                    match msg_type {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => error_of(payload)?,
                        t => f(t, payload),
                    }
                }
                off += len.next_multiple_of(4);
            }
        }
    }

    fn recv_ack(&self, seq: u32) -> io::Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + NLMSG_HDR_LEN <= n {
                let (len, msg_type, msg_seq) = header(&buf[off..n]);
                if len < NLMSG_HDR_LEN || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                if msg_seq == seq && msg_type == NLMSG_ERROR {
                    return error_of(&buf[off + NLMSG_HDR_LEN..off + len]);
                }
                off += len.next_multiple_of(4);
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid and writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

fn header(b: &[u8]) -> (usize, u16, u32) {
    let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let msg_type = u16::from_ne_bytes([b[4], b[5]]);
    let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
    (len, msg_type, seq)
}

/// `struct nlmsgerr` starts with a negative errno (0 = ACK).
fn error_of(payload: &[u8]) -> io::Result<()> {
    let code = payload.get(..size_of::<i32>()).map_or(-libc::EBADMSG, |b| {
        i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    });
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nlmsgerr_decodes_ack_and_errno() {
        assert!(error_of(&0i32.to_ne_bytes()).is_ok());
        let e = error_of(&(-libc::ENOENT).to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(error_of(&[]).is_err());
    }

    #[test]
    fn peer_of_v4_and_v4_mapped_sockets() {
        let mut id = [0u8; SOCKID_LEN];
        id[20..24].copy_from_slice(&[10, 244, 0, 5]);
        assert_eq!(peer_v4(AF_INET, &id), Some(Ipv4Addr::new(10, 244, 0, 5)));
        // Not a mapped IPv6 address.
        assert_eq!(peer_v4(AF_INET6, &id), None);
        let mut id = [0u8; SOCKID_LEN];
        id[30..36].copy_from_slice(&[0xff, 0xff, 10, 244, 0, 5]);
        assert_eq!(peer_v4(AF_INET6, &id), Some(Ipv4Addr::new(10, 244, 0, 5)));
    }

    #[test]
    fn netns_of_missing_cgroup_is_empty() {
        let dir = std::env::temp_dir().join("twill-no-such-cgroup-for-test");
        assert_eq!(netns_of_cgroup(&dir).unwrap(), Vec::<PathBuf>::new());
    }
}
