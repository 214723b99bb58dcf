//! Destroying connected UDP sockets that still point at a removed backend.
//!
//! Socket-level load balancing translates a connected UDP socket once, at `connect()`; after
//! that its datagrams go straight to the backend, so removing the backend from the maps does not
//! move it (the classic stale-UDP problem: kubernetes #19029, cilium #27300). The application
//! sees `ECONNABORTED` on its next call after its socket is destroyed and reconnects, which
//! balances it afresh.
//!
//! Two ways to destroy, picked once at start ([`SocketDestroyer`]):
//! - a BPF socket iterator calling the `bpf_sock_destroy` kfunc (kernel >= 6.5,
//!   [`super::sockiter`]): the kernel walks the sockets and destroys in place;
//! - `sock_diag` over netlink otherwise (`SOCK_DIAG_BY_FAMILY` dump, then `SOCK_DESTROY` per
//!   socket, like `ss -K`; needs `CONFIG_INET_DIAG_DESTROY`).
//!
//! Both see only the calling thread's network namespace (a socket iterator filters by
//! `seq_file_net`, `seq_sk_match` in net/ipv4/udp.c), and every pod has its own, so both run
//! once per namespace from a short-lived thread that entered it (`setns` only changes the
//! calling thread). The namespaces are this one (host-network pods and node processes) and the
//! bind mounts the container runtime keeps for pod sandboxes under `/var/run/netns`
//! (iproute2, containerd and CRI-O all put them there): opening those needs no access to other
//! processes, so the agent needs neither the host's PID namespace nor `CAP_SYS_PTRACE`, only
//! `CAP_SYS_ADMIN` for `setns`. Only sockets this datapath translated are touched: their
//! (socket cookie, backend) is in `SOCK_REVNAT` (a pod talking to a backend's address directly,
//! or a socket another Twill instance translated, is left alone).
use std::ops::ControlFlow;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

use twill_common::{DEFAULT_SOCK_DESTROY_MAX, SockDestroyKey};

use super::sockiter::UdpSockIter;

/// Where container runtimes bind-mount pod network namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";
/// `statfs` magic of nsfs (include/uapi/linux/magic.h): a namespace file, not a leftover.
const NSFS_MAGIC: i64 = 0x6e73_6673;

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

/// How sockets are destroyed on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestroyMethod {
    /// `iter/udp` + `bpf_sock_destroy` (kernel >= 6.5).
    BpfIterator,
    /// `sock_diag` `SOCK_DESTROY` over netlink.
    SockDiag,
}

/// Which method the agent may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SockDestroyMode {
    /// The BPF iterator where the kernel has it, else `sock_diag`.
    #[default]
    Auto,
    /// `sock_diag` only.
    SockDiag,
}

/// Result of one sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
}

/// Destroys connected UDP sockets to removed backends, in this network namespace and in every
/// namespace bind-mounted under its directories.
pub struct SocketDestroyer {
    netns_dirs: Vec<PathBuf>,
    iter: Option<UdpSockIter>,
}

impl SocketDestroyer {
    /// With the iterator when given, else `sock_diag`.
    pub fn new(netns_dirs: Vec<PathBuf>, iter: Option<UdpSockIter>) -> Self {
        Self { netns_dirs, iter }
    }

    pub fn method(&self) -> DestroyMethod {
        if self.iter.is_some() {
            DestroyMethod::BpfIterator
        } else {
            DestroyMethod::SockDiag
        }
    }

    /// Destroys every connected UDP socket whose peer is one of `targets` and whose (cookie,
    /// peer) is in `cookies` (the socket reverse-NAT entries of the targets: the iterator checks
    /// the map itself, `sock_diag` checks this set). Returns the report and the method used.
    ///
    /// IPv6 peers are always destroyed through `sock_diag`: the iterator reads a socket's peer
    /// from `struct sock_common` at fixed offsets, and the IPv6 peer (`skc_v6_daddr`) sits
    /// behind members whose size depends on the kernel's configuration, so its offset is not
    /// fixed the way the IPv4 one is.
    pub fn destroy_udp(
        &mut self,
        targets: &BTreeSet<(IpAddr, u16)>,
        cookies: &BTreeSet<(u64, IpAddr, u16)>,
    ) -> io::Result<(DestroyReport, DestroyMethod)> {
        let namespaces = namespaces(&self.netns_dirs)?;
        let mut report = DestroyReport {
            namespaces: namespaces.len(),
            destroyed: 0,
        };
        let v4: Vec<(Ipv4Addr, u16)> = targets
            .iter()
            .filter_map(|(a, p)| match a {
                IpAddr::V4(a) => Some((*a, *p)),
                IpAddr::V6(_) => None,
            })
            .collect();
        match &mut self.iter {
            Some(iter) if v4.len() == targets.len() => {
                let keys: Vec<SockDestroyKey> = v4
                    .iter()
                    .map(|(a, p)| SockDestroyKey {
                        addr_be: u32::from(*a).to_be(),
                        port_be: p.to_be(),
                        _pad: 0,
                    })
                    .collect();
                for chunk in keys.chunks(DEFAULT_SOCK_DESTROY_MAX as usize) {
                    iter.set_targets(chunk).map_err(io::Error::other)?;
                    let swept = in_each(&namespaces, || iter.sweep_current_netns());
                    // Emptied even when a sweep failed: a stale target would doom a later socket.
                    iter.clear().map_err(io::Error::other)?;
                    report.destroyed += swept?;
                }
            }
            _ => {
                report.destroyed += in_each(&namespaces, || destroy_in_current_netns(cookies))?;
                return Ok((report, DestroyMethod::SockDiag));
            }
        }
        Ok((report, DestroyMethod::BpfIterator))
    }
}

/// This thread's network namespace, then each distinct namespace file under `dirs` (a missing
/// directory is empty; files that are not namespaces, such as the placeholder of a namespace
/// being created, are skipped), deduplicated by the namespace's inode.
pub fn namespaces(dirs: &[PathBuf]) -> io::Result<Vec<fs::File>> {
    let mut seen = BTreeMap::new();
    let own = fs::File::open("/proc/thread-self/ns/net")?;
    let own_meta = own.metadata()?;
    seen.insert((own_meta.dev(), own_meta.ino()), own);
    for dir in dirs {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            // Removed while we look (the pod went away): nothing to clean there.
            let Ok(file) = fs::File::open(&path) else {
                continue;
            };
            if !is_nsfs(&file) {
                continue;
            }
            let meta = file.metadata()?;
            seen.entry((meta.dev(), meta.ino())).or_insert(file);
        }
    }
    Ok(seen.into_values().collect())
}

fn is_nsfs(file: &fs::File) -> bool {
    // SAFETY: fstatfs on an open fd with a valid out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) }) == 0 && st.f_type == NSFS_MAGIC
}

/// Runs `f` in each of `namespaces` from a thread that entered it; sums the counts.
fn in_each(namespaces: &[fs::File], f: impl Fn() -> io::Result<usize> + Sync) -> io::Result<usize> {
    let mut total = 0;
    for ns in namespaces {
        total += std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this (short-lived, dedicated) thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| io::Error::other("socket destroy thread panicked"))?
        })?;
    }
    Ok(total)
}

/// Dumps the connected UDP sockets of the calling thread's namespace and destroys those whose
/// (cookie, peer) is in `cookies`: AF_INET sockets, AF_INET6 ones connected to `::ffff:addr`
/// (the socket programs translate those too, and their peer is the IPv4 address), and AF_INET6
/// ones connected to an IPv6 backend.
pub fn destroy_in_current_netns(cookies: &BTreeSet<(u64, IpAddr, u16)>) -> io::Result<usize> {
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
                if let Some(peer) = peer_of(family, &id)
                    && cookies.contains(&(cookie_of(&id), peer, dport))
                {
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

/// The socket's cookie in a `struct inet_diag_sockid` (`idiag_cookie[2]` at bytes 40..48, low
/// half first: `sock_diag_save_cookie`).
fn cookie_of(id: &[u8; SOCKID_LEN]) -> u64 {
    let lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    u64::from(hi) << 32 | u64::from(lo)
}

/// The peer in a `struct inet_diag_sockid` (`dst` at bytes 20..36): its first four bytes for
/// AF_INET; for AF_INET6 the IPv4 address of an IPv4-mapped peer, else the IPv6 address.
fn peer_of(family: u8, id: &[u8; SOCKID_LEN]) -> Option<IpAddr> {
    let dst = &id[20..36];
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]))),
        AF_INET6 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(dst);
            let v6 = std::net::Ipv6Addr::from(b);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
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
        self.walk(32 * 1024, seq, |msg_type, payload| match msg_type {
            NLMSG_DONE => Ok(ControlFlow::Break(())),
            NLMSG_ERROR => error_of(payload).map(|()| ControlFlow::Continue(())),
            t => {
                f(t, payload);
                Ok(ControlFlow::Continue(()))
            }
        })
    }

    /// Reads until the kernel's acknowledgement (or error) of request `seq`.
    fn recv_ack(&self, seq: u32) -> io::Result<()> {
        self.walk(4096, seq, |msg_type, payload| {
            if msg_type == NLMSG_ERROR {
                error_of(payload).map(|()| ControlFlow::Break(()))
            } else {
                Ok(ControlFlow::Continue(()))
            }
        })
    }

    /// The one walk over the kernel's replies: receives into a `buf_len` buffer, checks each
    /// message's length, and hands the type and payload of request `seq`'s messages to `f`
    /// until it breaks (or fails). Messages of other requests are skipped.
    fn walk(
        &self,
        buf_len: usize,
        seq: u32,
        mut f: impl FnMut(u16, &[u8]) -> io::Result<ControlFlow<()>>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; buf_len];
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
                if msg_seq == seq && f(msg_type, &buf[off + NLMSG_HDR_LEN..off + len])?.is_break() {
                    return Ok(());
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
    fn peer_of_v4_v4_mapped_and_v6_sockets() {
        let pod4 = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5));
        let mut id = [0u8; SOCKID_LEN];
        id[20..24].copy_from_slice(&[10, 244, 0, 5]);
        assert_eq!(peer_of(AF_INET, &id), Some(pod4));
        // An AF_INET6 socket: the same bytes are an IPv6 address, not the IPv4 peer.
        assert_eq!(
            peer_of(AF_INET6, &id),
            Some(IpAddr::V6("af4:5::".parse().unwrap()))
        );
        let mut id = [0u8; SOCKID_LEN];
        id[30..36].copy_from_slice(&[0xff, 0xff, 10, 244, 0, 5]);
        assert_eq!(peer_of(AF_INET6, &id), Some(pod4));
        let pod6: std::net::Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        id[20..36].copy_from_slice(&pod6.octets());
        assert_eq!(peer_of(AF_INET6, &id), Some(IpAddr::V6(pod6)));
        assert_eq!(peer_of(99, &id), None);
    }

    #[test]
    fn cookie_is_low_half_first() {
        let mut id = [0u8; SOCKID_LEN];
        id[40..44].copy_from_slice(&0x0506_0708u32.to_ne_bytes());
        id[44..48].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        assert_eq!(cookie_of(&id), 0x0102_0304_0506_0708);
    }

    /// Only this thread's namespace when the directories are missing; plain files (a namespace
    /// being created, a leftover) are skipped.
    #[test]
    fn namespaces_skip_missing_dirs_and_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("not-a-netns"), b"").unwrap();
        let missing = dir.path().join("missing");
        let found = namespaces(&[dir.path().to_owned(), missing]).unwrap();
        assert_eq!(found.len(), 1);
        assert!(is_nsfs(&found[0]));
    }
}
