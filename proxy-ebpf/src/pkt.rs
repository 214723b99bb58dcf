//! The one IPv4 packet parser of the per-packet programs: the north-south translator (`tc.rs`)
//! and the NetworkPolicy programs (`pod.rs`) both read a frame through [`parse`], which walks
//! the headers once through a bounds-checked pointer into the packet ([`Data::read`]) instead
//! of a `bpf_skb_load_bytes` helper call per field.
//!
//! What each program makes of the result is its own: the translator serves TCP and UDP and the
//! ICMP errors about them, and follows later fragments through `TWL_FRAG_V1`; policy judges
//! every protocol and tracks ICMP echo as a flow.
//!
//! ICMP has no ports; echo requests and replies carry their identifier in the port that makes a
//! reply's tuple the reverse of its request's (request: source port = id; reply: destination
//! port = id), so connection tracking follows a ping like a UDP exchange. An ICMP error
//! (destination unreachable, time exceeded, parameter problem) is *related* to the flow whose
//! packet it quotes: its tuple is that flow's reply tuple, so conntrack lets it through wherever
//! the flow's replies pass (a UDP client learns ECONNREFUSED, TCP learns the path MTU).
use aya_ebpf::programs::TcContext;
use twill_common::{CT_SCOPE_NAT, CtKey, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Reason};

pub const ETH_HLEN: usize = 14;
/// Ethernet header: the EtherType.
pub const ETH_PROTO_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;

/// IPv4 header fields, from the start of the IP header (RFC 791).
const IP_VIHL: usize = 0;
const IP_ID: usize = 4;
const IP_FRAG: usize = 6;
const IP_TTL: usize = 8;
const IP_PROTO: usize = 9;
const IP_CSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
const IP_MIN_HLEN: usize = 20;
/// The flags/fragment-offset field: "more fragments" and the offset.
pub const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// The outer IPv4 header's fields as frame offsets (the header follows the Ethernet header).
pub const IP_CSUM_AT: usize = ETH_HLEN + IP_CSUM;
pub const IP_SRC_AT: usize = ETH_HLEN + IP_SRC;
pub const IP_DST_AT: usize = ETH_HLEN + IP_DST;
/// The quoted header's fields as offsets from the quote (an ICMP error's payload).
pub const QUOTE_CSUM: usize = IP_CSUM;
pub const QUOTE_SRC: usize = IP_SRC;
pub const QUOTE_DST: usize = IP_DST;

/// Transport header fields, from the start of the TCP/UDP/SCTP header: both ports lead.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
pub const UDP_HLEN: usize = 8;
/// The two ports every transport header here starts with.
pub const PORTS_LEN: usize = 4;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// ICMP header fields, from the start of the ICMP header (RFC 792).
pub const ICMP_CSUM: usize = 2;
pub const ICMP_ECHO_ID: usize = 4;
/// ICMP header bytes before a quoted packet.
const ICMP_HLEN: usize = 8;

/// The most any parse reads: Ethernet, an IPv4 header with options, an ICMP header, the quoted
/// IPv4 header with options and the quoted ports (more than the IPv6 parser's `nat6` needs:
/// 14 + 40 + 8 + 40 + 4). Only ICMP and headers with options need this much ([`Data::full`]).
#[expect(clippy::cast_possible_truncation, reason = "150 bytes")]
pub const MAX_PARSE_LEN: u32 = (ETH_HLEN + 60 + ICMP_HLEN + 60 + 4) as u32;
/// The headers of a usual IPv4 packet: Ethernet, IPv4 without options, a TCP header without
/// options (UDP's and ICMP echo's are shorter). A sending stack keeps at least these linear.
#[expect(clippy::cast_possible_truncation, reason = "54 bytes")]
pub const USUAL_LEN: u32 = (ETH_HLEN + IP_MIN_HLEN + 20) as u32;

/// Bounds-checked read access to the packet's linear data (`data..data_end`). Valid until the
/// packet is changed: every helper that writes the packet (`bpf_skb_store_bytes`, the checksum
/// helpers, `bpf_skb_pull_data`) invalidates it, so [`parse`] copies out everything a program
/// needs before any rewrite.
pub struct Data {
    start: usize,
    end: usize,
}

impl Data {
    /// The packet's linear data, pulling in its first `want` bytes (or all of a shorter packet)
    /// when the skb holds part of them in its paged part.
    ///
    /// `want` is what the parse at hand needs, never more: a TCP segment a local socket sent
    /// has its headers linear and its payload in pages, and is a clone (TCP keeps the original
    /// for retransmission), so pulling payload bytes would copy the whole head
    /// (`pskb_expand_head`) for every data packet — the most expensive step of a pod's packet
    /// when this pulled a fixed 146 bytes. Callers start with [`USUAL_LEN`] and ask for
    /// [`Data::full`] only for ICMP and IP options.
    #[inline(always)]
    pub fn new(ctx: &TcContext, want: u32) -> Self {
        let want = core::cmp::min(ctx.len(), want);
        if ctx.data_end() - ctx.data() < want as usize {
            // A failed pull leaves the data as it was: the reads beyond it then fail as a
            // truncated packet would.
            let _ = ctx.pull_data(want);
        }
        Data {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// The packet's linear data with everything any parse reads ([`MAX_PARSE_LEN`]): ICMP
    /// errors and their quotes, IP options.
    #[inline(always)]
    pub fn full(ctx: &TcContext) -> Self {
        Self::new(ctx, MAX_PARSE_LEN)
    }

    /// The `N` bytes at `off` (a whole header, or its part the programs read), or `None` when
    /// the packet ends before them. Headers are read whole rather than field by field: one
    /// bounds check each, and never a 1-byte check at a variable offset, which LLVM turns into
    /// `ptr >= data_end` — a comparison from which the verifier derives no readable range.
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let at = self.start + off;
        // The verifier accepts a packet access only after this comparison against data_end.
        if at + N > self.end {
            return None;
        }
        // SAFETY: `at..at + N` lies within the packet's linear data (checked just above), which
        // stays valid and unchanged while the program only reads it; a byte array has no
        // alignment requirement.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }
}

/// The two bytes at `i` as stored (a port or checksum in network order).
#[inline(always)]
pub fn u16_at<const N: usize>(b: &[u8; N], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

/// The four bytes at `i` as stored (an address in network order).
#[inline(always)]
fn u32_at<const N: usize>(b: &[u8; N], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// An IPv4 frame's headers as the per-packet programs need them (addresses and ports in network
/// order).
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// The IP identification (network order): with the addresses and protocol it names a
    /// fragmented datagram (RFC 791).
    pub id_be: u16,
    /// The flags/fragment-offset field (host order).
    pub frag: u16,
    /// Where the transport (or ICMP) header starts.
    pub l4_off: usize,
    pub l4: L4,
    /// TTL, protocol and header checksum as they lie in the header: what forwarding rewrites
    /// (`fwd.rs`), read here so that it takes no helper call there.
    pub ttl_word: [u8; 4],
}

impl Packet {
    /// The first fragment of a fragmented datagram (the one carrying the ports).
    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.frag & IP_MF != 0 && self.frag & IP_OFFSET_MASK == 0
    }
}

/// What follows the IPv4 header.
pub enum L4 {
    /// TCP, UDP or SCTP (or the first fragment of such a datagram).
    Ports(Ports),
    /// A fragment after the first: no transport header.
    LaterFragment,
    /// An ICMP echo request or reply and its identifier (network order).
    Echo { request: bool, id_be: u16 },
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting a
    /// packet with ports.
    IcmpError(Quote),
    /// Any other ICMP message, or an error quoting a packet without ports.
    Icmp,
    /// An ICMP message too short for what its type says, or quoting no IPv4 header.
    IcmpTruncated,
    /// Another protocol.
    Other,
}

/// The ports and what else the programs read of a TCP/UDP/SCTP header.
#[derive(Clone, Copy)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP and SCTP).
    pub tcp_flags: u8,
    /// UDP only: whether the datagram carries a checksum (0 means none, RFC 768).
    pub udp_csum: bool,
}

/// The packet an ICMP error quotes: its IPv4 header and at least the first 8 bytes of its
/// transport header, which hold the ports (RFC 792).
#[derive(Clone, Copy)]
pub struct Quote {
    pub icmp_type: u8,
    /// Where the quoted IPv4 header starts.
    pub off: usize,
    /// Where the quoted transport header starts.
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Quote {
    /// Whether the error is one the north-south translator carries back (destination
    /// unreachable, fragmentation needed among them, and time exceeded) about TCP, UDP or a
    /// ping (the masquerade translates pods' pings).
    #[inline(always)]
    pub fn translatable(&self) -> bool {
        (self.icmp_type == ICMP_DEST_UNREACH || self.icmp_type == ICMP_TIME_EXCEEDED)
            && (self.proto == PROTO_TCP || self.proto == PROTO_UDP || self.proto == PROTO_ICMP)
    }
}

/// `Ok(None)`: not an IPv4 frame. `Err(Malformed)`: a broken IPv4 header or a transport
/// header cut short.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, Reason> {
    let mut d = Data::new(ctx, USUAL_LEN);
    let eth: [u8; ETH_HLEN] = d.bytes(0).ok_or(Reason::Malformed)?;
    if u16::from_be(u16_at(&eth, ETH_PROTO_OFF)) != ETH_P_IP {
        return Ok(None);
    }
    let ip: [u8; IP_MIN_HLEN] = d.bytes(ETH_HLEN).ok_or(Reason::Malformed)?;
    let vihl = ip[IP_VIHL];
    // At most 60 bytes: the mask keeps the offset bounded for the verifier.
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IP_MIN_HLEN {
        return Err(Reason::Malformed);
    }
    let frag = u16::from_be(u16_at(&ip, IP_FRAG));
    let proto = ip[IP_PROTO];
    let l4_off = ETH_HLEN + ihl;
    if ihl > IP_MIN_HLEN || proto == PROTO_ICMP {
        // Options, or an ICMP error's quote: more than the usual headers (`d` above is
        // invalidated by the pull; `eth` and `ip` are copies).
        d = Data::full(ctx);
    }
    let l4 = if frag & IP_OFFSET_MASK != 0 {
        L4::LaterFragment
    } else if proto == PROTO_TCP {
        // Up to and with the flags byte.
        let h: [u8; TCP_FLAGS + 1] = d.bytes(l4_off).ok_or(Reason::Malformed)?;
        L4::Ports(Ports {
            sport: u16_at(&h, L4_SPORT),
            dport: u16_at(&h, L4_DPORT),
            tcp_flags: h[TCP_FLAGS],
            udp_csum: false,
        })
    } else if proto == PROTO_UDP {
        let h: [u8; UDP_HLEN] = d.bytes(l4_off).ok_or(Reason::Malformed)?;
        L4::Ports(Ports {
            sport: u16_at(&h, L4_SPORT),
            dport: u16_at(&h, L4_DPORT),
            tcp_flags: 0,
            udp_csum: u16_at(&h, UDP_CSUM) != 0,
        })
    } else if proto == PROTO_SCTP {
        let h: [u8; PORTS_LEN] = d.bytes(l4_off).ok_or(Reason::Malformed)?;
        L4::Ports(Ports {
            sport: u16_at(&h, L4_SPORT),
            dport: u16_at(&h, L4_DPORT),
            tcp_flags: 0,
            udp_csum: false,
        })
    } else if proto == PROTO_ICMP {
        parse_icmp(&d, l4_off)
    } else {
        L4::Other
    };
    Ok(Some(Packet {
        saddr: u32_at(&ip, IP_SRC),
        daddr: u32_at(&ip, IP_DST),
        proto,
        id_be: u16_at(&ip, IP_ID),
        frag,
        l4_off,
        l4,
        ttl_word: [ip[IP_TTL], ip[IP_PROTO], ip[IP_CSUM], ip[IP_CSUM + 1]],
    }))
}

#[inline(always)]
fn parse_icmp(d: &Data, off: usize) -> L4 {
    let Some(h) = d.bytes::<ICMP_HLEN>(off) else {
        return L4::IcmpTruncated;
    };
    let icmp_type = h[0];
    if icmp_type == ICMP_ECHO_REQUEST || icmp_type == ICMP_ECHO_REPLY {
        return L4::Echo {
            request: icmp_type == ICMP_ECHO_REQUEST,
            id_be: u16_at(&h, ICMP_ECHO_ID),
        };
    }
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROB
    {
        return L4::Icmp;
    }
    parse_quote(d, icmp_type, off + ICMP_HLEN).unwrap_or(L4::IcmpTruncated)
}

/// The quoted packet at `off`; `None` when it is cut short or no IPv4 header.
#[inline(always)]
fn parse_quote(d: &Data, icmp_type: u8, off: usize) -> Option<L4> {
    let ip: [u8; IP_MIN_HLEN] = d.bytes(off)?;
    let vihl = ip[IP_VIHL];
    // At most 60 bytes, as for the outer header.
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IP_MIN_HLEN {
        return None;
    }
    let proto = ip[IP_PROTO];
    let l4_off = off + ihl;
    let (sport, dport) = if proto == PROTO_ICMP {
        // An error about a ping: the quoted echo request's identifier is its flow's source
        // port, as for the ping itself (`Flow::of`). Errors about other ICMP are about no flow.
        let h: [u8; ICMP_HLEN] = d.bytes(l4_off)?;
        if h[0] != ICMP_ECHO_REQUEST {
            return Some(L4::Icmp);
        }
        (u16_at(&h, ICMP_ECHO_ID), 0)
    } else if proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP {
        let ports: [u8; PORTS_LEN] = d.bytes(l4_off)?;
        (u16_at(&ports, L4_SPORT), u16_at(&ports, L4_DPORT))
    } else {
        return Some(L4::Icmp);
    };
    Some(L4::IcmpError(Quote {
        icmp_type,
        off,
        l4_off,
        saddr: u32_at(&ip, IP_SRC),
        daddr: u32_at(&ip, IP_DST),
        sport,
        dport,
        proto,
    }))
}

/// The IPv4 flow a packet belongs to (addresses and ports in network order).
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// An ICMP error quoting a packet of this flow's reverse: the tuple and protocol are that
    /// flow's reply direction, not the ICMP packet's own.
    pub related: bool,
}

impl Flow {
    /// The flow of a packet for NetworkPolicy, which judges every protocol. `Ok(None)`: a
    /// later fragment (no transport header: the first fragment carried the ports and was
    /// judged; without it the datagram never reassembles).
    #[inline(always)]
    pub fn of(p: &Packet) -> Result<Option<Flow>, Reason> {
        let mut flow = Flow {
            saddr: p.saddr,
            daddr: p.daddr,
            sport: 0,
            dport: 0,
            proto: p.proto,
            tcp_flags: 0,
            related: false,
        };
        match &p.l4 {
            L4::Ports(ports) => {
                flow.sport = ports.sport;
                flow.dport = ports.dport;
                flow.tcp_flags = ports.tcp_flags;
            }
            L4::LaterFragment => return Ok(None),
            L4::Echo { request, id_be } => {
                if *request {
                    flow.sport = *id_be;
                } else {
                    flow.dport = *id_be;
                }
            }
            L4::IcmpError(q) => {
                // The quoted packet went from its source to its destination; the error travels
                // back, so its flow is the reverse of the quoted one.
                flow.saddr = q.daddr;
                flow.daddr = q.saddr;
                flow.sport = q.dport;
                flow.dport = q.sport;
                flow.proto = q.proto;
                flow.related = true;
            }
            L4::IcmpTruncated => return Err(Reason::Malformed),
            L4::Icmp | L4::Other => {}
        }
        Ok(Some(flow))
    }

    /// The port NetworkPolicy rules match: the destination port of TCP, UDP and SCTP; none (0)
    /// for other protocols, which only rules without `ports` allow.
    #[inline(always)]
    pub fn policy_port(&self) -> u16 {
        if self.proto == PROTO_TCP || self.proto == PROTO_UDP || self.proto == PROTO_SCTP {
            self.dport
        } else {
            0
        }
    }

    /// A TCP SYN without ACK: the only packet that may open a TCP flow.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// The conntrack key of this flow's direction in `scope`.
    #[inline(always)]
    pub fn ct_key(&self, scope: u8) -> CtKey {
        CtKey {
            saddr_be: self.saddr,
            daddr_be: self.daddr,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            scope,
            _pad: [0; 2],
        }
    }

    /// [`Flow::ct_key`] of the north-south translator.
    #[inline(always)]
    pub fn nat_key(&self) -> CtKey {
        self.ct_key(CT_SCOPE_NAT)
    }
}
