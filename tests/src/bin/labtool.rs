//! `labtool`: the tiny servers and clients the lab tests, the demo and the bench run inside lab
//! pods. Std only, so what the tests measure is the kernel path, not a client library.
//!
//! ```text
//! labtool serve --name N [--tcp PORT] [--udp PORT]   reply "N <peer-ip>:<peer-port>" per TCP
//!                                                    connection and per UDP datagram
//!               [--ipv6]                             listen on [::] (both families)
//! labtool tcp --to IP:PORT [--timeout-ms T]         one request; prints reply=.. peer=.. local=..
//! labtool udp --to IP:PORT [--connected] [--timeout-ms T]   prints reply=.. from=..
//! labtool tcp-loop --to IP:PORT [--count N] [--duration-ms D] [--interval-ms I] [--timeout-ms T]
//!                                                    JSON {"ok","failures","counts","errors"}
//! labtool udp-loop --to IP:PORT --count N [--connected | --one-socket] [--interval-ms I]
//!                                                    same JSON for UDP; a new socket per
//!                                                    datagram unless --one-socket
//! labtool udp-send --to IP:PORT --count N          N one-byte datagrams from one socket as
//!                                                    fast as it can (≤ 100,000), no replies
//!                                                    awaited; prints sent=<n>
//! labtool http --to IP:PORT [--path P]              HTTP/1.0 GET; prints status=<code> then the body
//! labtool probe --to IP:PORT,IP:PORT,... [--udp] [--timeout-ms T]
//!                                                    one request to each target at once (a row
//!                                                    of a reachability matrix); prints
//!                                                    "IP:PORT ok|refused|timeout|<error>" lines
//! labtool netns-cookie                               prints this network namespace's cookie
//! labtool flood --to IP:PORT --conns N --hold-ms D [--slow]
//!                                                    opens N (≤ 4096) connections and holds them
//!                                                    D ms (≤ 60 s), idle or (--slow) sending a
//!                                                    request head one byte per 200 ms; prints
//!                                                    opened=.. failed=.. closed_by_server=..
//! labtool dns --to IP:PORT --name NAME [--type A|AAAA|CNAME|SRV|PTR|TXT] [--tcp] [--timeout-ms T]
//!                                                    one DNS question (hickory-proto wire
//!                                                    format); prints rcode=.. then one line per
//!                                                    answer record: `<type> <data>`
//! labtool dns --to IP:PORT --garbage                 sends malformed DNS datagrams, no wait
//! labtool dns-load --to IP:PORT --name NAME [--threads T] [--duration-ms D] [--timeout-ms T]
//!                                                    closed-loop A questions, one UDP socket per
//!                                                    thread (≤ 64 threads, ≤ 60 s); JSON
//!                                                    {"answered","timeouts","errors","qps",
//!                                                    "p50_us","p99_us"}
//! labtool dns --to IP:PORT --oversized               sends a 9000-byte datagram and 65535
//!                                                    bytes of noise framed as one TCP message
//! labtool dns --to IP:PORT --flood N [--name NAME]   N (≤ 100000) A questions back to back
//!                                                    from one UDP socket, then waits up to
//!                                                    --timeout-ms for answers; prints
//!                                                    sent=.. answered=..
//! ```
//! The socket's family follows `--to`: `[::ffff:10.96.0.10]:80` (or `10.96.0.10:80` with
//! `--ipv6-mapped`) makes an AF_INET6 socket talking to an IPv4-mapped address, as the JVM and
//! .NET do by default.
//! Exit codes of the single-shot clients: 0 ok, 2 connection refused, 3 timeout, 1 anything else.
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

struct Args(Vec<String>);

impl Args {
    fn value(&self, flag: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }
    fn flag(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }
    fn num(&self, flag: &str, default: u64) -> Result<u64, String> {
        self.value(flag).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{flag} {v}: {e}"))
        })
    }
    fn addr(&self) -> Result<SocketAddr, String> {
        let v = self.value("--to").ok_or("--to IP:PORT is required")?;
        let addr: SocketAddr = v.parse().map_err(|e| format!("--to {v}: {e}"))?;
        Ok(match addr {
            SocketAddr::V4(a) if self.flag("--ipv6-mapped") => {
                SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
            }
            other => other,
        })
    }
}

fn main() -> ExitCode {
    let cli_args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = cli_args.split_first() else {
        eprintln!("usage: labtool serve|tcp|udp|tcp-loop|udp-loop ...");
        return ExitCode::from(1);
    };
    let args = Args(rest.to_vec());
    let result = match cmd.as_str() {
        "serve" => serve(&args),
        "tcp" => tcp_once(&args),
        "udp" => udp_once(&args),
        "tcp-loop" => tcp_loop(&args),
        "udp-loop" => udp_loop(&args),
        "udp-send" => udp_send(&args),
        "http" => http_get(&args),
        "probe" => probe(&args),
        "netns-cookie" => netns_cookie(),
        "flood" => flood(&args),
        "dns" => dns(&args),
        "dns-load" => dns_load(&args),
        other => Err(format!("unknown command {other}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("labtool: {e}");
            ExitCode::from(1)
        }
    }
}

/// A peer as the reply names it: a dual-mode (`--ipv6`) server sees IPv4 clients as
/// `::ffff:a.b.c.d`, reported as plain IPv4 so replies read the same in both modes.
fn canonical(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map_or(peer, |v4| SocketAddr::new(v4.into(), a.port())),
        SocketAddr::V4(_) => peer,
    }
}

fn serve(args: &Args) -> Result<ExitCode, String> {
    let name = args.value("--name").unwrap_or("server").to_owned();
    // `--ipv6`: listen on `[::]`, which (bindv6only=0, the default) takes both families.
    let any = if args.flag("--ipv6") {
        "[::]"
    } else {
        "0.0.0.0"
    };
    let mut threads = Vec::new();
    if let Some(port) = args.value("--udp") {
        let sock =
            UdpSocket::bind(format!("{any}:{port}")).map_err(|e| format!("udp bind: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{name} {}\n", canonical(peer)).as_bytes(), peer);
                }
            }
        }));
    }
    if let Some(port) = args.value("--tcp") {
        let listener =
            TcpListener::bind(format!("{any}:{port}")).map_err(|e| format!("tcp bind: {e}"))?;
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || handle_tcp(&stream, &name));
            }
        }));
    }
    if threads.is_empty() {
        return Err("serve needs --tcp PORT and/or --udp PORT".into());
    }
    // Readiness marker for the lab, which waits for this line before sending traffic.
    println!("ready");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn handle_tcp(stream: &TcpStream, name: &str) {
    let Ok(peer) = stream.peer_addr().map(canonical) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    // One request line per reply; a client that sends nothing still gets one reply.
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap_or(0);
        if (&*stream)
            .write_all(format!("{name} {peer}\n").as_bytes())
            .is_err()
            || n == 0
        {
            break;
        }
        if line.trim() != "again" {
            break;
        }
    }
}

enum Failure {
    Refused,
    Timeout,
    Other(String),
}

impl Failure {
    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Other(e.to_string()),
        }
    }
    fn label(&self) -> String {
        match self {
            Failure::Refused => "refused".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Other(e) => e.clone(),
        }
    }
    fn exit(&self) -> ExitCode {
        match self {
            Failure::Refused => ExitCode::from(2),
            Failure::Timeout => ExitCode::from(3),
            Failure::Other(_) => ExitCode::from(1),
        }
    }
}

struct TcpReply {
    reply: String,
    peer: SocketAddr,
    local: SocketAddr,
}

fn tcp_request(to: SocketAddr, timeout: Duration) -> Result<TcpReply, Failure> {
    let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| Failure::from_io(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Failure::from_io(&e))?;
    s.write_all(b"hi\n").map_err(|e| Failure::from_io(&e))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| Failure::from_io(&e))?;
    if reply.is_empty() {
        return Err(Failure::Other("empty reply".into()));
    }
    let peer = s.peer_addr().map_err(|e| Failure::from_io(&e))?;
    let local = s.local_addr().map_err(|e| Failure::from_io(&e))?;
    Ok(TcpReply {
        reply: reply.trim().to_owned(),
        peer,
        local,
    })
}

fn tcp_once(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let timeout = Duration::from_millis(args.num("--timeout-ms", 3000)?);
    match tcp_request(to, timeout) {
        Ok(r) => {
            println!("reply={} peer={} local={}", r.reply, r.peer, r.local);
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            println!("error={}", f.label());
            Ok(f.exit())
        }
    }
}

/// An unbound UDP socket of `to`'s family (AF_INET6 is dual-stack: it reaches mapped addresses).
fn udp_socket(to: SocketAddr, timeout: Duration) -> Result<UdpSocket, Failure> {
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let s = UdpSocket::bind(any).map_err(|e| Failure::from_io(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Failure::from_io(&e))?;
    Ok(s)
}

/// One datagram over an unconnected socket and its reply: (reply, its source).
fn udp_exchange(s: &UdpSocket, to: SocketAddr) -> Result<(String, SocketAddr), Failure> {
    let mut buf = [0u8; 2048];
    s.send_to(b"hi\n", to).map_err(|e| Failure::from_io(&e))?;
    let (n, from) = s.recv_from(&mut buf).map_err(|e| Failure::from_io(&e))?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
}

fn udp_request(
    to: SocketAddr,
    connected: bool,
    timeout: Duration,
) -> Result<(String, SocketAddr), Failure> {
    let s = udp_socket(to, timeout)?;
    let mut buf = [0u8; 2048];
    if connected {
        s.connect(to).map_err(|e| Failure::from_io(&e))?;
        s.send(b"hi\n").map_err(|e| Failure::from_io(&e))?;
        let n = s.recv(&mut buf).map_err(|e| Failure::from_io(&e))?;
        let from = s.peer_addr().map_err(|e| Failure::from_io(&e))?;
        Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
    } else {
        udp_exchange(&s, to)
    }
}

fn probe(args: &Args) -> Result<ExitCode, String> {
    let targets: Vec<SocketAddr> = args
        .value("--to")
        .ok_or("--to IP:PORT,... is required")?
        .split(',')
        .map(|t| t.parse().map_err(|e| format!("--to {t}: {e}")))
        .collect::<Result<_, _>>()?;
    let udp = args.flag("--udp");
    let timeout = Duration::from_millis(args.num("--timeout-ms", 1000)?);
    let results: Vec<(SocketAddr, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&to| {
                scope.spawn(move || {
                    let r = if udp {
                        udp_request(to, true, timeout).map(|_| ())
                    } else {
                        tcp_request(to, timeout).map(|_| ())
                    };
                    (to, r.map_or_else(|f| f.label(), |()| "ok".into()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| (targets[0], "panic".into())))
            .collect()
    });
    for (to, result) in results {
        println!("{to} {result}");
    }
    Ok(ExitCode::SUCCESS)
}

fn udp_once(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let timeout = Duration::from_millis(args.num("--timeout-ms", 3000)?);
    match udp_request(to, args.flag("--connected"), timeout) {
        Ok((reply, from)) => {
            println!("reply={reply} from={from}");
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            println!("error={}", f.label());
            Ok(f.exit())
        }
    }
}

#[derive(serde::Serialize, Default)]
struct LoopReport {
    ok: u64,
    failures: u64,
    /// Replies per backend name (first word of the reply).
    counts: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl LoopReport {
    fn record(&mut self, r: Result<String, Failure>) {
        match r {
            Ok(reply) => {
                self.ok += 1;
                let name = reply.split_whitespace().next().unwrap_or("").to_owned();
                *self.counts.entry(name).or_default() += 1;
            }
            Err(f) => {
                self.failures += 1;
                *self.errors.entry(f.label()).or_default() += 1;
            }
        }
    }
}

fn tcp_loop(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let count = args.num("--count", 0)?;
    let duration = Duration::from_millis(args.num("--duration-ms", 0)?);
    let interval = Duration::from_millis(args.num("--interval-ms", 0)?);
    let timeout = Duration::from_millis(args.num("--timeout-ms", 3000)?);
    if count == 0 && duration.is_zero() {
        return Err("tcp-loop needs --count N or --duration-ms D".into());
    }
    let start = Instant::now();
    let mut report = LoopReport::default();
    let mut i = 0;
    // Bounded by count and/or duration (lab rule 4).
    while (count == 0 || i < count) && (duration.is_zero() || start.elapsed() < duration) {
        report.record(tcp_request(to, timeout).map(|r| r.reply));
        i += 1;
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

/// A burst of datagrams (a flood of denied packets for the monitor's rate limit, say);
/// `--from IP` sends from that local address (one added to the pod to send as another).
fn udp_send(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let count = args.num("--count", 1)?.min(100_000);
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let from = match args.value("--from") {
        // Either family: an IPv6 address needs its brackets before the port.
        Some(ip) => {
            std::net::SocketAddr::new(ip.parse().map_err(|e| format!("--from {ip}: {e}"))?, 0)
                .to_string()
        }
        None => any.to_owned(),
    };
    let s = UdpSocket::bind(from.as_str()).map_err(|e| format!("bind {from}: {e}"))?;
    let mut sent = 0u64;
    for _ in 0..count {
        if s.send_to(b"x", to).is_ok() {
            sent += 1;
        }
    }
    println!("sent={sent}");
    Ok(ExitCode::SUCCESS)
}

fn udp_loop(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let count = args.num("--count", 1)?;
    let timeout = Duration::from_millis(args.num("--timeout-ms", 2000)?);
    let interval = Duration::from_millis(args.num("--interval-ms", 0)?);
    let pause = |i: u64| {
        if i + 1 < count && !interval.is_zero() {
            std::thread::sleep(interval);
        }
    };
    let mut report = LoopReport::default();
    if args.flag("--one-socket") {
        // One unconnected socket for every datagram: one flow, as QUIC, SIP or TFTP send.
        let s = match udp_socket(to, timeout) {
            Ok(s) => s,
            Err(f) => return Err(format!("udp socket: {}", f.label())),
        };
        for i in 0..count {
            report.record(udp_exchange(&s, to).map(|r| r.0));
            pause(i);
        }
    } else {
        for i in 0..count {
            report.record(udp_request(to, args.flag("--connected"), timeout).map(|r| r.0));
            pause(i);
        }
    }
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn http_get(args: &Args) -> Result<ExitCode, String> {
    let to = args.addr()?;
    let path = args.value("--path").unwrap_or("/");
    let timeout = Duration::from_millis(args.num("--timeout-ms", 3000)?);
    let mut s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => {
            let f = Failure::from_io(&e);
            println!("error={}", f.label());
            return Ok(f.exit());
        }
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let status = resp.split_whitespace().nth(1).unwrap_or("none");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    println!("status={status}");
    println!("{body}");
    Ok(ExitCode::SUCCESS)
}

/// Prints the cookie of this process's network namespace (`SO_NETNS_COOKIE`), the value the
/// socket programs compare with `DatapathConfig::host_netns_cookie`.
fn netns_cookie() -> Result<ExitCode, String> {
    use std::os::fd::AsRawFd as _;
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("udp bind: {e}"))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: valid fd, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "getsockopt(SO_NETNS_COOKIE): {}",
            io::Error::last_os_error()
        ));
    }
    println!("{cookie}");
    Ok(ExitCode::SUCCESS)
}

/// A bounded connection flood (and slow-loris client) against an HTTP server: what its
/// connection limits must survive. Stops by itself after `--hold-ms`.
fn flood(args: &Args) -> Result<ExitCode, String> {
    const HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: 0123456789012345678901234567890123456789\r\n\r\n";
    let to = args.addr()?;
    let conns = args.num("--conns", 100)?.min(4096);
    let hold = Duration::from_millis(args.num("--hold-ms", 5000)?.min(60_000));
    let slow = args.flag("--slow");
    let mut open: Vec<(TcpStream, usize)> = Vec::new();
    let mut failed = 0u64;
    for _ in 0..conns {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(s) => {
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                open.push((s, 0));
            }
            Err(_) => failed += 1,
        }
    }
    let opened = open.len();
    let mut closed_by_server = 0u64;
    let deadline = Instant::now() + hold;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !open.is_empty() {
        open.retain_mut(|(s, sent)| {
            // Drain whatever came back; a closed or reset connection leaves the set.
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed_by_server += 1;
                        return false;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed_by_server += 1;
                        return false;
                    }
                }
            }
            if slow && *sent < HEAD.len() {
                if s.write(&HEAD[*sent..=*sent]).is_err() {
                    closed_by_server += 1;
                    return false;
                }
                *sent += 1;
            }
            true
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("opened={opened} failed={failed} closed_by_server={closed_by_server}");
    Ok(ExitCode::SUCCESS)
}

/// Closed-loop DNS load: each thread asks, waits for the answer (or the timeout), asks again.
fn dns_load(args: &Args) -> Result<ExitCode, String> {
    use hickory_proto::rr::Name;
    let to = args.addr()?;
    let name = args.value("--name").ok_or("--name NAME is required")?;
    let qname = Name::from_ascii(name).map_err(|e| format!("--name {name}: {e}"))?;
    let threads = args.num("--threads", 4)?.clamp(1, 64);
    let duration = Duration::from_millis(args.num("--duration-ms", 3000)?.min(60_000));
    let timeout = Duration::from_millis(args.num("--timeout-ms", 1000)?);
    let end = Instant::now() + duration;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let qname = qname.clone();
            let seed = u16::try_from(t).unwrap_or(0).wrapping_mul(4099);
            std::thread::spawn(move || dns_load_worker(to, &qname, seed, end, timeout))
        })
        .collect();
    let (mut lat, mut timeouts, mut errors) = (Vec::new(), 0u64, 0u64);
    for w in workers {
        let (l, t, e) = w.join().map_err(|_| "worker panicked")??;
        lat.extend(l);
        timeouts += t;
        errors += e;
    }
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a list of at most a few million latencies"
        )]
        let i = ((lat.len() - 1) as f64 * p).round() as usize;
        lat[i]
    };
    #[expect(
        clippy::cast_precision_loss,
        reason = "a count of questions, far below 2^52"
    )]
    let qps = lat.len() as f64 / duration.as_secs_f64();
    println!(
        "{}",
        format_args!(
            "{{\"answered\":{},\"timeouts\":{timeouts},\"errors\":{errors},\"qps\":{qps:.0},\"p50_us\":{},\"p99_us\":{}}}",
            lat.len(),
            pct(0.50),
            pct(0.99)
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// One closed-loop client of `dns_load`: (latencies of good answers in µs, timeouts, errors).
fn dns_load_worker(
    to: SocketAddr,
    qname: &hickory_proto::rr::Name,
    mut id: u16,
    end: Instant,
    timeout: Duration,
) -> Result<(Vec<u32>, u64, u64), String> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::RecordType;
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
    sock.connect(to).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let (mut lat, mut timeouts, mut errors) = (Vec::new(), 0u64, 0u64);
    let mut buf = vec![0u8; 4096];
    while Instant::now() < end {
        id = id.wrapping_add(1);
        let mut q = Message::query();
        q.metadata.id = id;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(qname.clone(), RecordType::A));
        let bytes = q.to_vec().map_err(|e| format!("encode: {e}"))?;
        let start = Instant::now();
        if sock.send(&bytes).is_err() {
            errors += 1;
            continue;
        }
        // Skip stale answers (of an earlier, timed-out question).
        loop {
            let Ok(n) = sock.recv(&mut buf) else {
                timeouts += 1;
                break;
            };
            let Ok(m) = Message::from_vec(&buf[..n]) else {
                errors += 1;
                break;
            };
            if m.metadata.id != id {
                continue;
            }
            if m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty() {
                lat.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
            } else {
                errors += 1;
            }
            break;
        }
    }
    Ok((lat, timeouts, errors))
}

/// A datagram larger than any DNS message a client may send, and a TCP message of the largest
/// length the framing allows, all noise.
fn dns_oversized(to: SocketAddr, timeout: Duration) -> Result<ExitCode, String> {
    let noise: Vec<u8> = (0..65_535u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[2])
        .collect();
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
    sock.send_to(&noise[..9000], to)
        .map_err(|e| format!("send: {e}"))?;
    let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(&u16::MAX.to_be_bytes())
        .and_then(|()| s.write_all(&noise))
        .map_err(|e| format!("send: {e}"))?;
    // Either the server closes (it could not parse the message) or it sends nothing: both fine,
    // as long as it keeps serving others.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2];
    let _ = s.read(&mut buf);
    println!("sent");
    Ok(ExitCode::SUCCESS)
}

/// `n` questions as fast as one socket sends them, then the answers that arrive in `timeout`.
fn dns_flood(
    to: SocketAddr,
    n: u32,
    name: Option<&str>,
    timeout: Duration,
) -> Result<ExitCode, String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
    let reader = sock.try_clone().map_err(|e| e.to_string())?;
    reader
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut answered = 0u32;
        while reader.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        answered
    });
    let mut sent = 0u32;
    for i in 0..n {
        let qname = name.map_or_else(
            || format!("flood-{i}.default.svc.cluster.local."),
            str::to_owned,
        );
        let mut q = Message::query();
        q.metadata.id = u16::try_from(i % 65_536).unwrap_or(0);
        q.add_query(Query::query(
            Name::from_ascii(&qname).map_err(|e| format!("{qname}: {e}"))?,
            RecordType::A,
        ));
        let bytes = q.to_vec().map_err(|e| format!("encode: {e}"))?;
        // A full send buffer (ENOBUFS) just means the flood outran the kernel: keep going.
        if sock.send_to(&bytes, to).is_ok() {
            sent += 1;
        }
    }
    let answered = counter.join().map_err(|_| "reader panicked")?;
    println!("sent={sent} answered={answered}");
    Ok(ExitCode::SUCCESS)
}

/// One DNS question to `--to`, over UDP or (`--tcp`) TCP, or (`--garbage`) malformed datagrams.
fn dns(args: &Args) -> Result<ExitCode, String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let to = args.addr()?;
    let timeout = Duration::from_millis(args.num("--timeout-ms", 2000)?);
    if args.flag("--oversized") {
        return dns_oversized(to, timeout);
    }
    if let Some(n) = args.value("--flood") {
        let n: u32 = n.parse().map_err(|e| format!("--flood {n}: {e}"))?;
        return dns_flood(to, n.min(100_000), args.value("--name"), timeout);
    }
    if args.flag("--garbage") {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
        // Shorter than a header, a header promising a question that is not there, and a
        // datagram of noise larger than any DNS message without EDNS.
        let noise: Vec<u8> = (0..1500u32)
            .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[1])
            .collect();
        for pkt in [
            &[0x12u8, 0x34, 0x01][..],
            &[0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
            &noise,
        ] {
            sock.send_to(pkt, to).map_err(|e| format!("send: {e}"))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let name = args.value("--name").ok_or("--name NAME is required")?;
    let qtype: RecordType = args
        .value("--type")
        .unwrap_or("A")
        .parse()
        .map_err(|e| format!("--type: {e}"))?;
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).map_err(|e| format!("--name {name}: {e}"))?,
        qtype,
    ));
    let bytes = q.to_vec().map_err(|e| format!("encode: {e}"))?;
    let reply = if args.flag("--tcp") {
        let mut s =
            TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let len = u16::try_from(bytes.len()).map_err(|e| e.to_string())?;
        s.write_all(&len.to_be_bytes())
            .and_then(|()| s.write_all(&bytes))
            .map_err(|e| format!("send: {e}"))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| format!("read: {e}"))?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        buf
    } else {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
        sock.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        sock.send_to(&bytes, to).map_err(|e| format!("send: {e}"))?;
        let mut buf = vec![0u8; 65_535];
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => buf.truncate(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                println!("timeout");
                return Ok(ExitCode::from(3));
            }
            Err(e) => return Err(format!("recv: {e}")),
        }
        buf
    };
    let m = Message::from_vec(&reply).map_err(|e| format!("decode: {e}"))?;
    if m.metadata.id != q.metadata.id {
        return Err("reply to another question".into());
    }
    println!("rcode={}", u16::from(m.metadata.response_code));
    for r in &m.answers {
        println!("{} {}", r.record_type(), r.data);
    }
    Ok(ExitCode::SUCCESS)
}
