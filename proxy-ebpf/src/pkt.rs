//! Packet parsing shared by the per-packet programs: the IPv4 5-tuple of a frame on a tc hook.
//!
//! ICMP has no ports; echo requests and replies carry their identifier in the port that makes a
//! reply's tuple the reverse of its request's (request: source port = id; reply: destination
//! port = id), so connection tracking follows a ping like a UDP exchange. An ICMP error
//! (destination unreachable, time exceeded, parameter problem) is *related* to the flow whose
//! packet it quotes: its tuple is that flow's reply tuple, so conntrack lets it through wherever
//! the flow's replies pass (a UDP client learns ECONNREFUSED, TCP learns the path MTU).
use aya_ebpf::programs::TcContext;
use twill_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, Reason};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// ICMP header bytes before a quoted packet.
const ICMP_HLEN: usize = 8;
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

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
}

/// `Ok(None)`: not an IPv4 packet, or a non-first fragment (no transport header: the first
/// fragment carried the ports and was judged; without it the datagram never reassembles).
#[inline(always)]
pub fn parse_flow(ctx: &TcContext) -> Result<Option<Flow>, Reason> {
    let eth_proto: u16 = ctx.load(12).map_err(|_| Reason::Malformed)?;
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Reason::Malformed)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::Malformed);
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| Reason::Malformed)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return Ok(None);
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Reason::Malformed)?;
    let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| Reason::Malformed)?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| Reason::Malformed)?;
    let l4 = ETH_HLEN + ihl;
    let mut flow = Flow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        related: false,
    };
    if proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP {
        flow.sport = ctx.load(l4).map_err(|_| Reason::Malformed)?;
        flow.dport = ctx.load(l4 + 2).map_err(|_| Reason::Malformed)?;
        if proto == PROTO_TCP {
            flow.tcp_flags = ctx
                .load(l4 + TCP_FLAGS_OFF)
                .map_err(|_| Reason::Malformed)?;
        }
    } else if proto == PROTO_ICMP {
        let icmp_type: u8 = ctx.load(l4).map_err(|_| Reason::Malformed)?;
        if icmp_type == ICMP_ECHO_REQUEST {
            flow.sport = ctx.load(l4 + 4).map_err(|_| Reason::Malformed)?;
        } else if icmp_type == ICMP_ECHO_REPLY {
            flow.dport = ctx.load(l4 + 4).map_err(|_| Reason::Malformed)?;
        } else if icmp_type == ICMP_DEST_UNREACH
            || icmp_type == ICMP_TIME_EXCEEDED
            || icmp_type == ICMP_PARAMETER_PROB
        {
            parse_quoted(ctx, l4 + ICMP_HLEN, &mut flow)?;
        }
    }
    Ok(Some(flow))
}

/// Reads the packet an ICMP error quotes (at `off`: its IPv4 header and at least the first 8
/// bytes of its transport header, RFC 792) into `flow` as the quoted flow's reply tuple. A quote
/// of something without ports leaves `flow` the plain ICMP packet.
#[inline(always)]
fn parse_quoted(ctx: &TcContext, off: usize, flow: &mut Flow) -> Result<(), Reason> {
    let vihl: u8 = ctx.load(off).map_err(|_| Reason::Malformed)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::Malformed);
    }
    let proto: u8 = ctx.load(off + 9).map_err(|_| Reason::Malformed)?;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return Ok(());
    }
    // The quoted packet went from its source to its destination; the error travels back, so
    // its flow is the reverse of the quoted one.
    let q_saddr: u32 = ctx.load(off + 12).map_err(|_| Reason::Malformed)?;
    let q_daddr: u32 = ctx.load(off + 16).map_err(|_| Reason::Malformed)?;
    let q_sport: u16 = ctx.load(off + ihl).map_err(|_| Reason::Malformed)?;
    let q_dport: u16 = ctx.load(off + ihl + 2).map_err(|_| Reason::Malformed)?;
    flow.saddr = q_daddr;
    flow.daddr = q_saddr;
    flow.sport = q_dport;
    flow.dport = q_sport;
    flow.proto = proto;
    flow.related = true;
    Ok(())
}
