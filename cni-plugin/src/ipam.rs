//! Host-local-style IP address management with crash-safe reservations.
//!
//! Layout under `<stateDir>/ipam/<network>/` (compatible in spirit with the
//! reference `host-local` plugin's disk store):
//! - `lock`: `flock(2)`ed exclusively around every operation; the kernel drops the
//!   lock when a holder dies, so a `kill -9` never wedges later calls.
//! - `<ip>`: one file per reserved address holding `containerID\nifname`.
//! - `last_reserved_ip.0` (IPv4) and `last_reserved_ip.1` (IPv6): round-robin cursors,
//!   one per family, so a just-freed address is not handed out again at once (a stale
//!   ARP/NDP/conntrack entry would hit the new pod). A dual-stack pod takes one address
//!   of each family, each by the same atomic reservation below.
//! - `.reserve.tmp`: scratch file for the atomic reservation below.
//!
//! A reservation is written to the scratch file and then moved to `<ip>` with
//! `renameat2(RENAME_NOREPLACE)`: the address file appears complete or not at all
//! and an existing reservation is never overwritten, even without the lock. So a
//! crash at any point leaves either no reservation or one that names its owner,
//! which DEL (by container ID and interface name) and GC (by valid attachments) can
//! find. The file's content is fsynced before the rename and the directory after it,
//! before ADD answers: otherwise a node losing power right after ADD could come back
//! with the pod's address unreserved and hand it to a second pod.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use crate::env::Attachment;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip.0";
const LAST_RESERVED6: &str = "last_reserved_ip.1";
const SCRATCH: &str = ".reserve.tmp";
/// Width of the cursor record: the longest textual IPv6 address is 45 characters
/// (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const CURSOR_WIDTH: usize = 45;

/// How long [`Ipam::lock`] waits for another holder before giving up with
/// [`IpamError::Busy`] (CNI code 11, "try again later").
///
/// A healthy holder keeps the lock for one directory scan and one rename (well
/// under a millisecond; a GC over a /16 takes tens of ms), so even 64 parallel
/// ADDs on a loaded node queue for far less than this. A lock held longer means
/// a stuck holder (stopped process, frozen cgroup, hung state filesystem). Five
/// seconds stays well inside the runtime's own deadline for the call (kubelet's
/// `--runtime-request-timeout` defaults to 2 min) so the runtime gets a
/// retryable answer instead of a timeout, and it retries pod setup anyway.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Polling interval bounds while the lock is held: start short because holds are
/// short, cap low so a waiter notices a release within ~2 ms (parallel ADDs queue
/// here); a stuck holder then costs ~2500 cheap `flock` calls, not a spin.
const POLL_MIN: Duration = Duration::from_micros(100);
const POLL_MAX: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "no free address left in {ranges} (every usable address is reserved); delete unused pods, run GC, or give the node a larger pod CIDR"
    )]
    Exhausted { ranges: String },
    #[error(
        "IPAM state {path} stayed locked by another invocation for {waited:?}; try again later (if it persists, find the holder with `lslocks` or `fuser {path}`)"
    )]
    Busy { path: PathBuf, waited: Duration },
    #[error("IPAM state {path}: {op} failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl IpamError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        IpamError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// The IPAM store of one network.
pub struct Ipam {
    dir: PathBuf,
}

/// Proof that the store's lock is held; all operations live here.
pub struct Locked<'a> {
    dir: &'a Path,
    _lock: File,
}

/// One reservation as found on disk. `owner` is `None` for a file whose content is
/// not `containerID\nifname` (written by something else): only GC removes those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub owner: Option<Attachment>,
}

impl Ipam {
    pub fn new(state_dir: &Path, network: &str) -> Self {
        Ipam {
            dir: state_dir.join("ipam").join(network),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Container IDs holding an address in another network's store under the same state
    /// directory (another Twill network on this node). Read without those stores' locks: a
    /// reservation appears or goes by one atomic rename or unlink, so a reader sees it or not.
    /// DEL and GC use it to leave the host links of those attachments alone.
    pub fn other_networks_containers(&self) -> Result<HashSet<String>, IpamError> {
        let mut out = HashSet::new();
        let Some(root) = self.dir.parent() else {
            return Ok(out);
        };
        let rd = match fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(IpamError::io("read directory", root, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| IpamError::io("read directory", root, e))?;
            let path = entry.path();
            if path == self.dir || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            out.extend(
                read_store(&path)?
                    .into_iter()
                    .filter_map(|r| r.owner.map(|o| o.container_id)),
            );
        }
        Ok(out)
    }

    /// Takes the store lock, creating the directory on first use. Waits up to
    /// [`LOCK_WAIT`] while another invocation holds it (runtimes run pods in
    /// parallel), then fails with [`IpamError::Busy`].
    pub fn lock(&self) -> Result<Locked<'_>, IpamError> {
        self.lock_within(LOCK_WAIT)
    }

    /// [`Ipam::lock`] with an explicit bound. `flock(2)` has no timeout, so this
    /// polls with `LOCK_NB`; the kernel drops a dead holder's lock, so a poll
    /// never waits on a crashed process.
    pub fn lock_within(&self, wait: Duration) -> Result<Locked<'_>, IpamError> {
        let path = self.dir.join(LOCK_FILE);
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        };
        let file = match open() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.dir)
                    .map_err(|e| IpamError::io("create directory", &self.dir, e))?;
                open().map_err(|e| IpamError::io("open lock", &path, e))?
            }
            Err(e) => return Err(IpamError::io("open lock", &path, e)),
        };
        let started = Instant::now();
        let mut pause = POLL_MIN;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(IpamError::io("flock", &path, e)),
            }
            let waited = started.elapsed();
            let Some(left) = wait.checked_sub(waited).filter(|l| !l.is_zero()) else {
                return Err(IpamError::Busy { path, waited });
            };
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(POLL_MAX);
        }
        Ok(Locked {
            dir: &self.dir,
            _lock: file,
        })
    }
}

/// The cursor file of a family: IPv4 keeps the name it always had (host-local's first
/// range set), IPv6 has its own, so reserving in one family never resets the other's
/// round-robin order.
fn cursor_name(v4: bool) -> &'static str {
    if v4 { LAST_RESERVED } else { LAST_RESERVED6 }
}

impl Locked<'_> {
    /// Reserves one address per entry of `families` (the ranges of one family and that
    /// family's gateway) for `owner`, in order. If one family has no free address, the
    /// addresses already reserved for the others are released again, so the pod gets
    /// every family or nothing; a crash in between leaves reservations naming `owner`,
    /// which DEL and GC release like any other.
    pub fn reserve_each(
        &self,
        families: &[(Vec<IpNetwork>, IpAddr)],
        owner: &Attachment,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut got = Vec::with_capacity(families.len());
        for (ranges, gateway) in families {
            match self.reserve(ranges, *gateway, owner) {
                Ok(ip) => got.push(ip),
                Err(e) => {
                    for ip in got {
                        let _ = self.remove(ip);
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Reserves one address from `ranges` (all of one family) for `owner`, round-robin
    /// after that family's last reservation. Never the network, broadcast or gateway
    /// address.
    pub fn reserve(
        &self,
        ranges: &[IpNetwork],
        gateway: IpAddr,
        owner: &Attachment,
    ) -> Result<IpAddr, IpamError> {
        let scratch = self.dir.join(SCRATCH);
        // Unlink first, never truncate: after a crash in the link(2) fallback of
        // `place` the scratch file may still be a second name of a reservation.
        match fs::remove_file(&scratch) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(IpamError::io("remove", &scratch, e));
            }
            _ => {}
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&scratch)
            .and_then(|mut f| {
                io::Write::write_all(
                    &mut f,
                    format!("{}\n{}", owner.container_id, owner.ifname).as_bytes(),
                )?;
                // The content is durable before any name points at it.
                f.sync_all()
            })
            .map_err(|e| IpamError::io("write", &scratch, e))?;
        let v4 = ranges.first().is_none_or(IpNetwork::is_ipv4);
        let last = self.last_reserved(v4);
        for ip in candidates(ranges, last).filter(|ip| *ip != gateway) {
            let target = self.dir.join(ip.to_string());
            if place(&scratch, &target)? {
                // The new name is durable before the runtime hears of the address.
                sync_dir(self.dir)?;
                self.write_cursor(ip)?;
                return Ok(ip);
            }
        }
        let _ = fs::remove_file(&scratch);
        Err(IpamError::Exhausted {
            ranges: ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Overwrites the cursor in place with a fixed-width record instead of
    /// `O_TRUNC` + write. On ext4 (`auto_da_alloc`, the default) truncating a file
    /// to zero and rewriting it makes close(2) start writeback at once (the
    /// "replace-via-truncate" heuristic, see
    /// https://docs.kernel.org/admin-guide/ext4.html), one I/O submission per ADD
    /// for a file that is only a hint. The record is wider than any address text,
    /// so it covers whatever an older version wrote. A torn cursor only costs
    /// round-robin order: it is re-parsed leniently, and an unparsable one
    /// restarts the search at the start of the ranges.
    fn write_cursor(&self, ip: IpAddr) -> Result<(), IpamError> {
        let cursor = self.dir.join(cursor_name(ip.is_ipv4()));
        let record = format!("{ip:<CURSOR_WIDTH$}\n");
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cursor)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, record.as_bytes(), 0))
            .map_err(|e| IpamError::io("write", &cursor, e))
    }

    fn last_reserved(&self, v4: bool) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(cursor_name(v4)))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Every reservation in the store.
    pub fn list(&self) -> Result<Vec<Reservation>, IpamError> {
        read_store(self.dir)
    }

    /// Addresses held by `owner`.
    pub fn find(&self, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| r.owner.as_ref() == Some(owner))
            .map(|r| r.ip)
            .collect())
    }

    /// Releases every address held by `owner`; releasing nothing is not an error.
    pub fn release(&self, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
        let ips = self.find(owner)?;
        for ip in &ips {
            self.remove(*ip)?;
        }
        if !ips.is_empty() {
            // A release lost in a crash would only leave a stale reservation for GC, but
            // DEL answering means the address is free: make it so.
            sync_dir(self.dir)?;
        }
        Ok(ips)
    }

    /// Removes one reservation (idempotent).
    pub fn remove(&self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(IpamError::io("remove", &path, e)),
            _ => Ok(()),
        }
    }

    /// How many addresses are still free (for STATUS).
    pub fn free_count(&self, ranges: &[IpNetwork], gateway: IpAddr) -> Result<u128, IpamError> {
        let taken = self.list()?;
        // Saturating: an IPv6 range can hold up to 2^128 - 1 addresses.
        let total: u128 = ranges
            .iter()
            .map(|r| usable(*r).map_or(0, |(a, b)| (b - a).saturating_add(1)))
            .fold(0, u128::saturating_add);
        let in_ranges = |ip: &IpAddr| {
            ranges
                .iter()
                .any(|r| r.contains(*ip) && usable_contains(*r, *ip))
        };
        let gw = u128::from(in_ranges(&gateway));
        let used = u128::try_from(
            taken
                .iter()
                .filter(|r| in_ranges(&r.ip) && r.ip != gateway)
                .count(),
        )
        .unwrap_or(u128::MAX);
        Ok(total.saturating_sub(gw).saturating_sub(used))
    }
}

/// The reservations in one store directory, sorted by address.
fn read_store(dir: &Path) -> Result<Vec<Reservation>, IpamError> {
    let rd = fs::read_dir(dir).map_err(|e| IpamError::io("read directory", dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| IpamError::io("read directory", dir, e))?;
        let Some(ip) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let content = match fs::read_to_string(entry.path()) {
            Ok(c) => c,
            // Released concurrently by a reader that did not take the lock.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IpamError::io("read", &entry.path(), e)),
        };
        out.push(Reservation {
            ip,
            owner: parse_owner(&content),
        });
    }
    out.sort_by_key(|r| r.ip);
    Ok(out)
}

/// fsync(2) of a directory: makes the names created or removed in it durable.
fn sync_dir(dir: &Path) -> Result<(), IpamError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IpamError::io("fsync directory", dir, e))
}

/// Atomically moves the scratch file to `target` unless `target` exists.
/// Returns `false` if the address is taken.
fn place(scratch: &Path, target: &Path) -> Result<bool, IpamError> {
    match renameat2(
        AT_FDCWD,
        scratch,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        // Filesystems without RENAME_NOREPLACE: link(2) is just as exclusive.
        Err(Errno::EINVAL) => match fs::hard_link(scratch, target) {
            Ok(()) => {
                fs::remove_file(scratch).map_err(|e| IpamError::io("remove", scratch, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(IpamError::io("link", target, e)),
        },
        Err(e) => Err(IpamError::io("rename", target, e.into())),
    }
}

fn parse_owner(content: &str) -> Option<Attachment> {
    let (id, ifname) = content.split_once('\n')?;
    let id = id.trim_end_matches('\r');
    let ifname = ifname.trim_end();
    (!id.is_empty() && !ifname.is_empty()).then(|| Attachment {
        container_id: id.to_owned(),
        ifname: ifname.to_owned(),
    })
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(
            u32::try_from(n).expect("IPv4 range arithmetic stays in u32"),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

/// First and last assignable address: IPv4 loses network and broadcast; IPv6 loses
/// the subnet-router anycast (network) address. `None` if nothing is assignable.
fn usable(r: IpNetwork) -> Option<(u128, u128)> {
    let first = to_u128(r.network()) + 1;
    let last = match r {
        IpNetwork::V4(n) => u128::from(u32::from(n.broadcast())) - 1,
        IpNetwork::V6(n) => u128::from(n.broadcast()),
    };
    (first <= last).then_some((first, last))
}

fn usable_contains(r: IpNetwork, ip: IpAddr) -> bool {
    usable(r).is_some_and(|(a, b)| (a..=b).contains(&to_u128(ip)))
}

/// Candidate addresses across `ranges`, starting right after `last` (if it lies in
/// a range) and wrapping around, each address once.
fn candidates(ranges: &[IpNetwork], last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
    let spans: Vec<(bool, u128, u128)> = ranges
        .iter()
        .filter_map(|r| usable(*r).map(|(a, b)| (r.is_ipv4(), a, b)))
        .collect();
    let start = last
        .and_then(|l| {
            let n = to_u128(l);
            spans
                .iter()
                .position(|(v4, a, b)| *v4 == l.is_ipv4() && (*a..=*b).contains(&n))
                .map(|i| (i, n))
        })
        .map_or((0, None), |(i, n)| (i, Some(n)));
    let (start_span, after) = start;
    let count = spans.len();
    // Order: rest of the start span, the other spans, then the start span's head.
    let mut pieces: Vec<(bool, u128, u128)> = Vec::with_capacity(count + 1);
    let (v4, a, b) = spans.get(start_span).copied().unwrap_or((true, 1, 0));
    match after {
        Some(n) if count > 0 => {
            if n < b {
                pieces.push((v4, n + 1, b));
            }
            for k in 1..count {
                pieces.push(spans[(start_span + k) % count]);
            }
            pieces.push((v4, a, n));
        }
        _ => pieces.extend(spans.iter().copied()),
    }
    pieces
        .into_iter()
        .flat_map(|(v4, a, b)| (a..=b).map(move |n| from_u128(v4, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));

    #[test]
    fn candidates_skip_network_and_broadcast_and_wrap() {
        let r = nets(&["10.0.0.0/29"]);
        let all: Vec<String> = candidates(&r, None).map(|i| i.to_string()).collect();
        assert_eq!(
            all,
            [
                "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"
            ]
        );
        let from4: Vec<String> = candidates(&r, Some("10.0.0.4".parse().unwrap()))
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            from4,
            [
                "10.0.0.5", "10.0.0.6", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"
            ]
        );
        let from_last: Vec<String> = candidates(&r, Some("10.0.0.6".parse().unwrap()))
            .map(|i| i.to_string())
            .collect();
        assert_eq!(from_last[0], "10.0.0.1");
        assert_eq!(from_last.len(), 6);
        // A cursor outside every range restarts at the beginning.
        assert_eq!(
            candidates(&r, Some("192.168.0.1".parse().unwrap()))
                .next()
                .unwrap()
                .to_string(),
            "10.0.0.1"
        );
    }

    #[test]
    fn candidates_span_several_ranges_and_ipv6() {
        let r = nets(&["10.0.0.0/30", "10.0.1.0/30"]);
        let got: Vec<String> = candidates(&r, Some("10.0.0.2".parse().unwrap()))
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, ["10.0.1.1", "10.0.1.2", "10.0.0.1", "10.0.0.2"]);
        let v6 = nets(&["fd00::/126"]);
        let got: Vec<String> = candidates(&v6, None).map(|i| i.to_string()).collect();
        assert_eq!(got, ["fd00::1", "fd00::2", "fd00::3"]);
    }

    #[test]
    fn reserves_round_robin_and_never_reuses_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let r = nets(&["10.0.0.0/29"]);
        let l = ipam.lock().unwrap();
        let a = l.reserve(&r, GW, &att("a")).unwrap();
        let b = l.reserve(&r, GW, &att("b")).unwrap();
        assert_eq!(
            (a.to_string().as_str(), b.to_string().as_str()),
            ("10.0.0.1", "10.0.0.2")
        );
        assert_eq!(l.release(&att("a")).unwrap(), vec![a]);
        // The freed .1 is not handed out next.
        assert_eq!(
            l.reserve(&r, GW, &att("c")).unwrap().to_string(),
            "10.0.0.3"
        );
        assert_eq!(
            fs::read_to_string(ipam.dir().join("10.0.0.3")).unwrap(),
            "c\neth0"
        );
        assert_eq!(l.find(&att("b")).unwrap(), vec![b]);
        // Releasing an unknown owner is fine.
        assert!(l.release(&att("zzz")).unwrap().is_empty());
    }

    #[test]
    fn the_cursor_is_overwritten_in_place_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let r = nets(&["10.0.0.0/24", "fd00::/120"]);
        fs::create_dir_all(ipam.dir()).unwrap();
        let cursor = ipam.dir().join(LAST_RESERVED);
        // What an older version (plain fs::write) left: the next search starts after it.
        fs::write(&cursor, "10.0.0.200").unwrap();
        let l = ipam.lock().unwrap();
        assert_eq!(
            l.reserve(&r, GW, &att("a")).unwrap().to_string(),
            "10.0.0.201"
        );
        assert_eq!(l.last_reserved(true), Some("10.0.0.201".parse().unwrap()));
        assert_eq!(fs::read(&cursor).unwrap().len(), CURSOR_WIDTH + 1);
        // A long address then a short one: no leftover bytes of the first.
        fs::write(&cursor, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.254").unwrap();
        l.write_cursor("10.0.0.7".parse().unwrap()).unwrap();
        assert_eq!(l.last_reserved(true), Some("10.0.0.7".parse().unwrap()));
        // Garbage restarts at the beginning instead of failing.
        fs::write(&cursor, "\0\0garbage").unwrap();
        assert_eq!(
            l.reserve(&r, GW, &att("b")).unwrap().to_string(),
            "10.0.0.1"
        );
    }

    const GW6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));

    /// One address per family, each family round-robin on its own cursor.
    #[test]
    fn dual_stack_reserves_one_address_per_family() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let v4 = nets(&["10.0.0.0/29"]);
        let v6 = nets(&["fd00:10:244:1::/64"]);
        let both = [(v4.clone(), GW), (v6.clone(), GW6)];
        let l = ipam.lock().unwrap();
        let a = l.reserve_each(&both, &att("a")).unwrap();
        assert_eq!(
            a,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::1".parse().unwrap()
            ]
        );
        // IPv6 first (a Node listing its IPv6 range first): the order is kept.
        let b = l
            .reserve_each(&[(v6.clone(), GW6), (v4.clone(), GW)], &att("b"))
            .unwrap();
        assert_eq!(
            b,
            [
                "fd00:10:244:1::2".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        assert_eq!(l.last_reserved(true), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(
            l.last_reserved(false),
            Some("fd00:10:244:1::2".parse().unwrap())
        );
        // The file names are the addresses, as for IPv4.
        assert_eq!(
            fs::read_to_string(ipam.dir().join("fd00:10:244:1::2")).unwrap(),
            "b\neth0"
        );
        // Release frees both families; neither cursor goes back.
        let mut freed = l.release(&att("a")).unwrap();
        freed.sort();
        assert_eq!(freed.len(), 2);
        let third = l.reserve_each(&both, &att("c")).unwrap();
        assert_eq!(third[0].to_string(), "10.0.0.3");
        assert_eq!(third[1].to_string(), "fd00:10:244:1::3");
        // IPv6 only.
        let only6 = l.reserve_each(&[(v6.clone(), GW6)], &att("d")).unwrap();
        assert_eq!(only6, ["fd00:10:244:1::4".parse::<IpAddr>().unwrap()]);
        assert_eq!(l.free_count(&v6, GW6).unwrap(), (1u128 << 64) - 1 - 3);
        assert_eq!(l.free_count(&v4, GW).unwrap(), 6 - 2);
    }

    /// A family without a free address fails the ADD and gives the other family's
    /// address back: a pod gets every family or nothing.
    #[test]
    fn dual_stack_exhaustion_of_one_family_releases_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let v4 = nets(&["10.0.0.0/24"]);
        let v6 = nets(&["fd00::/126"]);
        let both = [(v4.clone(), GW), (v6.clone(), GW6)];
        let l = ipam.lock().unwrap();
        for i in 0..3 {
            l.reserve_each(&both, &att(&format!("c{i}"))).unwrap();
        }
        let err = l.reserve_each(&both, &att("late")).unwrap_err();
        assert!(
            matches!(&err, IpamError::Exhausted { ranges } if ranges == "fd00::/126"),
            "{err}"
        );
        assert!(l.find(&att("late")).unwrap().is_empty());
        assert_eq!(l.list().unwrap().len(), 6);
        assert!(!ipam.dir().join(SCRATCH).exists());
        assert_eq!(l.free_count(&v4, GW).unwrap(), 254 - 3);
        assert_eq!(l.free_count(&v6, GW6).unwrap(), 0);
        // A huge range does not overflow the count.
        // ::/0 minus its gateway and the three IPv6 reservations.
        assert_eq!(l.free_count(&nets(&["::/0"]), GW6).unwrap(), u128::MAX - 4);
    }

    #[test]
    fn exhaustion_is_clean_and_gateway_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let r = nets(&["10.0.0.0/29"]);
        let gw: IpAddr = "10.0.0.3".parse().unwrap();
        let l = ipam.lock().unwrap();
        assert_eq!(l.free_count(&r, gw).unwrap(), 5);
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(
                l.reserve(&r, gw, &att(&format!("c{i}")))
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(
            got,
            ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert_eq!(l.free_count(&r, gw).unwrap(), 0);
        let err = l.reserve(&r, gw, &att("late")).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
        assert!(err.to_string().contains("10.0.0.0/29"));
        // Nothing half-made: no scratch file, no reservation for the loser.
        assert!(!ipam.dir().join(SCRATCH).exists());
        assert!(l.find(&att("late")).unwrap().is_empty());
        assert_eq!(l.list().unwrap().len(), 5);
    }

    #[test]
    fn existing_files_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let r = nets(&["10.0.0.0/30"]);
        fs::create_dir_all(ipam.dir()).unwrap();
        // host-local's "\r\n" format and a foreign file both block the address.
        fs::write(ipam.dir().join("10.0.0.1"), "x\r\neth0").unwrap();
        let l = ipam.lock().unwrap();
        assert_eq!(
            l.reserve(&r, GW, &att("a")).unwrap().to_string(),
            "10.0.0.2"
        );
        assert_eq!(l.find(&att("x")).unwrap().len(), 1);
        assert!(l.reserve(&r, GW, &att("b")).is_err());
        fs::write(ipam.dir().join("10.0.0.1"), "garbage").unwrap();
        let list = l.list().unwrap();
        assert_eq!(list[0].owner, None);
    }

    #[test]
    fn a_scratch_file_left_as_a_hard_link_never_truncates_a_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "twill");
        let r = nets(&["10.0.0.0/29"]);
        let l = ipam.lock().unwrap();
        let a = l.reserve(&r, GW, &att("a")).unwrap();
        // What a crash between link(2) and unlink(2) in the fallback leaves behind.
        fs::hard_link(ipam.dir().join(a.to_string()), ipam.dir().join(SCRATCH)).unwrap();
        l.reserve(&r, GW, &att("b")).unwrap();
        assert_eq!(l.find(&att("a")).unwrap(), vec![a]);
    }

    #[test]
    fn a_held_lock_times_out_as_busy() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), "n");
        let held = ipam.lock().unwrap();
        let other = Ipam::new(dir.path(), "n");
        let t0 = Instant::now();
        let err = other
            .lock_within(Duration::from_millis(100))
            .err()
            .expect("the lock is held");
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(
            matches!(&err, IpamError::Busy { waited, .. } if *waited >= Duration::from_millis(100)),
            "{err}"
        );
        assert!(err.to_string().contains("try again later"), "{err}");
        drop(held);
        other.lock_within(Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn lock_is_exclusive_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let ipam = Ipam::new(&path, "n");
        let held = ipam.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let ipam = Ipam::new(&path, "n");
            let _l = ipam.lock().unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }
}
