//! `loadgen`: the benchmark's load client and server, run inside lab pods.
//!
//! ```text
//! loadgen serve --port P --id C [--threads 4] [--max-seconds 3600]
//!     answers every 1-byte request with the byte C (the backend id), until the peer closes
//! loadgen crr --to IP:PORT[,IP:PORT..] --duration-ms D [--threads T]
//!     connect, 1-byte request, 1-byte response, close; repeated until D passes
//! loadgen rr --to IP:PORT --duration-ms D
//!     1-byte request/response on one kept-alive connection; p50/p99 latency
//! loadgen probe --to IP:PORT --limit-ms L [--until ok|refused]
//!     prints `ready`, then retries request/response until the first success (or L passes);
//!     `--until refused`: until the first connection refused (a reset from a port nothing
//!     listens on: the path is open, e.g. a NetworkPolicy now allows it, where before the SYN
//!     was dropped)
//! loadgen connect-cost --to IP:PORT[,IP:PORT..] [--proto udp|tcp] [--rounds R] [--per-round N]
//!     R rounds of N × (socket, connect, close) to each target, the order rotated per round;
//!     the mean ns per connect of each (round, target), wall-clock and this thread's CPU time. UDP: no packet is sent, so this is the
//!     connect path alone (the socket hooks and the route lookup); TCP: the handshake too, and
//!     the close resets (SO_LINGER 0) so no TIME_WAIT holds the client's ports
//! ```
//! crr and rr: `--from-ns F --until-ns U --slot-ms S --slot K/N` instead of `--duration-ms`:
//!     between Unix times F and U, work only in the S-ms windows whose index is K modulo N (the
//!     bench's contenders taking turns; `twill_lab::bench::loadgen::Slots`); crr's rate is per
//!     second of its own windows
//! Every mode prints one JSON line (see `twill_lab::bench::loadgen`) and is bounded in time.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use twill_lab::bench::loadgen::{
    ConnectCostReport, CrrReport, ProbeReport, RrReport, Slots, unix_ns,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(1);

struct Args(Vec<String>);

impl Args {
    fn get(&self, flag: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }
    fn req(&self, flag: &str) -> Result<&str> {
        self.get(flag).ok_or_else(|| anyhow!("missing {flag}"))
    }
    fn num<T: std::str::FromStr>(&self, flag: &str, default: T) -> Result<T> {
        self.get(flag).map_or(Ok(default), |v| {
            v.parse().map_err(|_| anyhow!("{flag}: not a number: {v}"))
        })
    }
}

fn addrs(list: &str) -> Result<Vec<SocketAddr>> {
    list.split(',')
        .map(|a| a.parse().with_context(|| format!("bad address {a}")))
        .collect()
}

/// One request/response on `s`; returns the response byte.
fn exchange(s: &mut TcpStream) -> std::io::Result<u8> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn connect(to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn serve(args: &Args) -> Result<()> {
    let port: u16 = args.num("--port", 0)?;
    let id = args
        .req("--id")?
        .bytes()
        .next()
        .ok_or_else(|| anyhow!("--id must not be empty"))?;
    let threads: usize = args.num("--threads", 4)?;
    let max = Duration::from_secs(args.num("--max-seconds", 3600)?);
    // `--addr ::` listens on both families (an IPv6 socket accepting v4-mapped peers too).
    let addr: std::net::IpAddr = args
        .get("--addr")
        .unwrap_or("0.0.0.0")
        .parse()
        .context("bad --addr")?;
    let listener =
        TcpListener::bind((addr, port)).with_context(|| format!("binding {addr} port {port}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for _ in 0..threads {
        let l = listener.try_clone()?;
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                // Serve until the client closes; a kept-alive (rr) connection holds this
                // thread, which is why there are several.
                while matches!(s.read(&mut b), Ok(1)) {
                    if s.write_all(&[id]).is_err() {
                        break;
                    }
                }
            }
        });
    }
    // The server is killed by the lab's teardown; this bound is the backstop.
    std::thread::sleep(max);
    Ok(())
}

/// The schedule of a crr or rr run: `--from-ns/--until-ns/--slot-ms/--slot K/N` (the bench's
/// contenders taking turns), else from now on for `--duration-ms` alone.
fn schedule(args: &Args) -> Result<Slots> {
    let Some(slot) = args.get("--slot") else {
        return Ok(Slots::whole(Duration::from_millis(
            args.num("--duration-ms", 1000)?,
        )));
    };
    let (k, n) = slot
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse().ok()?, n.parse().ok()?)))
        .filter(|&(k, n): &(u32, u32)| k < n)
        .ok_or_else(|| anyhow!("--slot: K/N with K < N, not {slot}"))?;
    let slot_ms: u128 = args.num("--slot-ms", 100)?;
    Ok(Slots {
        from_ns: args.num("--from-ns", 0)?,
        until_ns: args.num("--until-ns", 0)?,
        slot_ns: (slot_ms * 1_000_000).max(1),
        slots: n,
        k,
    })
}

/// Waits until the schedule lets this client work; `false` once it is over.
fn my_turn(slots: &Slots) -> bool {
    loop {
        match slots.wait(unix_ns()) {
            None => return false,
            Some(0) => return true,
            Some(ns) => std::thread::sleep(Duration::from_nanos(u64::try_from(ns).unwrap_or(0))),
        }
    }
}

fn crr(args: &Args) -> Result<CrrReport> {
    let targets = addrs(args.req("--to")?)?;
    let slots = schedule(args)?;
    let threads: usize = args.num("--threads", 2)?;
    let total = Arc::new(Mutex::new(CrrReport::default()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.clone();
            let total = Arc::clone(&total);
            std::thread::spawn(move || {
                let mut mine = CrrReport::default();
                let mut k = t;
                while my_turn(&slots) {
                    let to = targets[k % targets.len()];
                    k += 1;
                    match connect(to, CONNECT_TIMEOUT).and_then(|mut s| exchange(&mut s)) {
                        Ok(b) => {
                            mine.connections += 1;
                            *mine
                                .per_backend
                                .entry(char::from(b).to_string())
                                .or_default() += 1;
                        }
                        Err(e) => {
                            mine.failures += 1;
                            mine.first_error.get_or_insert_with(|| format!("{to}: {e}"));
                        }
                    }
                }
                let mut tot = total
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tot.connections += mine.connections;
                tot.failures += mine.failures;
                for (k, v) in mine.per_backend {
                    *tot.per_backend.entry(k).or_default() += v;
                }
                if tot.first_error.is_none() {
                    tot.first_error = mine.first_error;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow!("crr thread panicked"))?;
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds from nanoseconds")]
    let elapsed = slots.active_ns() as f64 / 1e9;
    let mut report = std::mem::take(
        &mut *total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    report.elapsed_s = elapsed;
    #[expect(
        clippy::cast_precision_loss,
        reason = "connection counts are far below 2^52"
    )]
    let rate = report.connections as f64 / elapsed;
    report.rate = rate;
    Ok(report)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "index of a small slice"
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanosecond latencies are far below 2^52"
    )]
    let ns = sorted[i] as f64;
    ns / 1000.0
}

fn rr(args: &Args) -> Result<RrReport> {
    let to: SocketAddr = args.req("--to")?.parse()?;
    let slots = schedule(args)?;
    let mut report = RrReport::default();
    let mut s = connect(to, CONNECT_TIMEOUT).with_context(|| format!("connecting to {to}"))?;
    // Warm-up: the first exchanges pay for cold caches and the conntrack entry's creation.
    for _ in 0..100 {
        exchange(&mut s)?;
    }
    let mut lat: Vec<u64> = Vec::with_capacity(200_000);
    while my_turn(&slots) {
        let t = Instant::now();
        match exchange(&mut s) {
            Ok(b) => {
                lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                *report
                    .per_backend
                    .entry(char::from(b).to_string())
                    .or_default() += 1;
            }
            Err(e) => {
                report.failures += 1;
                report.first_error = Some(format!("{to}: {e}"));
                break;
            }
        }
    }
    lat.sort_unstable();
    report.requests = lat.len() as u64;
    report.p50_us = percentile(&lat, 0.50);
    report.p99_us = percentile(&lat, 0.99);
    Ok(report)
}

/// Staggered workers of the probe, and how long each attempt may wait for an answer.
const PROBE_WORKERS: u32 = 10;
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(10);

fn probe(args: &Args) -> Result<ProbeReport> {
    let to: SocketAddr = args.req("--to")?.parse()?;
    let limit = Duration::from_millis(args.num("--limit-ms", 60_000)?);
    let until_refused = match args.get("--until").unwrap_or("ok") {
        "ok" => false,
        "refused" => true,
        other => return Err(anyhow!("--until: ok or refused, not {other}")),
    };
    println!("ready");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + limit;
    // A SYN to a VIP that is not programmed yet is forwarded to nowhere: the node's ICMP
    // "unreachable" answers are rate-limited by the kernel (route.c ip_error(): a burst of 5,
    // then 1/s per source, a global sysctl a lab must not touch), so most attempts get no
    // answer at all and can only time out. Staggered workers with short timeouts keep the
    // resolution at PROBE_ATTEMPT_TIMEOUT / PROBE_WORKERS (1 ms) anyway.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let report = Arc::new(Mutex::new(ProbeReport::default()));
    let handles: Vec<_> = (0..PROBE_WORKERS)
        .map(|w| {
            let (done, report) = (Arc::clone(&done), Arc::clone(&report));
            std::thread::spawn(move || {
                std::thread::sleep(PROBE_ATTEMPT_TIMEOUT / PROBE_WORKERS * w);
                while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let outcome =
                        connect(to, PROBE_ATTEMPT_TIMEOUT).and_then(|mut s| exchange(&mut s));
                    let outcome = if until_refused {
                        match outcome {
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(0),
                            Ok(_) => Err(std::io::Error::other("answered, not refused")),
                            Err(e) => Err(e),
                        }
                    } else {
                        outcome
                    };
                    let at = unix_ns();
                    let mut r = report
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    r.attempts += 1;
                    match outcome {
                        Ok(_) => {
                            if !r.ok || at < r.success_unix_ns {
                                r.success_unix_ns = at;
                            }
                            r.ok = true;
                            done.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            r.last_error = Some(e.to_string());
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                r.timeouts += 1;
                            } else {
                                // An immediate error (ICMP unreachable, refused): pause so
                                // the loop does not spin.
                                drop(r);
                                std::thread::sleep(Duration::from_micros(500));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow!("probe worker panicked"))?;
    }
    let r = report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(r)
}

/// One `socket()` + `connect()` + `close()` to `to` (IPv4), with raw calls so nothing else is
/// timed.
fn connect_once(to: std::net::SocketAddrV4, tcp: bool) -> std::io::Result<()> {
    let kind = if tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain syscalls on a descriptor owned here and closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len =
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or_default();
        let rc = libc::connect(fd, (&raw const sa).cast(), len);
        let err = (rc != 0).then(std::io::Error::last_os_error);
        if tcp {
            // Reset on close: no TIME_WAIT, so the client's ports never run out.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let size =
                libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or_default();
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size,
            );
        }
        libc::close(fd);
        err.map_or(Ok(()), Err)
    }
}

/// This thread's CPU time (user + system), in ns: what the calls cost this thread, without the
/// time other processes of a loaded machine held the CPU.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; this clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn connect_cost(args: &Args) -> Result<ConnectCostReport> {
    let targets: Vec<std::net::SocketAddrV4> = args
        .req("--to")?
        .split(',')
        .map(|a| a.parse().with_context(|| format!("bad IPv4 address {a}")))
        .collect::<Result<_>>()?;
    let proto = args.get("--proto").unwrap_or("udp");
    let tcp = match proto {
        "tcp" => true,
        "udp" => false,
        other => return Err(anyhow!("--proto: tcp or udp, not {other}")),
    };
    let rounds: usize = args.num("--rounds", 21)?;
    let per_round: u32 = args.num("--per-round", 10_000)?;
    // Bounded: a round is at most this many connects per target.
    let per_round = per_round.min(1_000_000);
    let mut report = ConnectCostReport {
        targets: targets.iter().map(ToString::to_string).collect(),
        proto: proto.to_owned(),
        per_round,
        ..ConnectCostReport::default()
    };
    for round in 0..rounds.min(1_000) {
        let mut row = vec![0.0; targets.len()];
        let mut cpu_row = vec![0.0; targets.len()];
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let start = Instant::now();
            let cpu_start = thread_cpu_ns();
            for _ in 0..per_round {
                if let Err(e) = connect_once(targets[i], tcp) {
                    report.failures += 1;
                    report
                        .first_error
                        .get_or_insert_with(|| format!("{}: {e}", targets[i]));
                }
            }
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one round")]
            let (ns, cpu) = (
                start.elapsed().as_nanos() as f64,
                thread_cpu_ns().saturating_sub(cpu_start) as f64,
            );
            row[i] = ns / f64::from(per_round.max(1));
            cpu_row[i] = cpu / f64::from(per_round.max(1));
        }
        report.ns.push(row);
        report.cpu_ns.push(cpu_row);
    }
    Ok(report)
}

fn main() -> ExitCode {
    let cli: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = cli.split_first() else {
        eprintln!("usage: loadgen serve|crr|rr|probe|connect-cost [flags]");
        return ExitCode::from(64);
    };
    let args = Args(rest.to_vec());
    let out = match mode.as_str() {
        "serve" => serve(&args).map(|()| String::new()),
        "crr" => crr(&args).and_then(|r| Ok(serde_json::to_string(&r)?)),
        "rr" => rr(&args).and_then(|r| Ok(serde_json::to_string(&r)?)),
        "probe" => probe(&args).and_then(|r| Ok(serde_json::to_string(&r)?)),
        "connect-cost" => connect_cost(&args).and_then(|r| Ok(serde_json::to_string(&r)?)),
        other => Err(anyhow!("unknown mode {other}")),
    };
    match out {
        Ok(s) => {
            if !s.is_empty() {
                println!("{s}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentile_picks_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert!((super::percentile(&v, 0.5) - 51.0).abs() < 1e-9);
        assert!((super::percentile(&v, 0.99) - 99.0).abs() < 1e-9);
        assert!(super::percentile(&[], 0.5).abs() < f64::EPSILON);
    }
}
