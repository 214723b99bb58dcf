//! The IPv6 extension-header walk both IPv6 parsers share: `nat6.rs` (the devices: IPv6
//! north-south and masquerade) and `policy6.rs` (the pod veths) find the transport header
//! through [`walk`], once, with the same rules.
//!
//! ```text
//!  fixed header ─► next header:
//!    hop-by-hop (0), destination options (60)  skip (hdr ext len + 1) × 8 bytes
//!    routing (43), segments left 0             skip (hdr ext len + 1) × 8 bytes
//!    routing, segments left > 0                stop: the packet is not at its final destination
//!                                              (its transport checksum is over another address)
//!    fragment (44)                             offset 0: first fragment (or an atomic one,
//!                                              RFC 6946: a whole datagram), walk on;
//!                                              offset ≠ 0: a later fragment, stop (no ports)
//!    authentication header (51)                skip (payload len + 2) × 4 bytes
//!    anything else (TCP, UDP, ICMPv6, ESP 50, No Next Header 59, unknown)  ─► the upper layer
//!  at most MAX_EXT_HEADERS headers; a chain longer than that ends on an extension header
//! ```
//!
//! RFC 8200 4.1 orders at most one of each header before the upper layer (destination options
//! twice: before a routing header and last), so [`MAX_EXT_HEADERS`] covers every chain a
//! conforming sender builds; ESP (50) ends the walk as an upper layer whose "ports" are
//! encrypted. Callers find ports only for TCP, UDP and SCTP (and ICMPv6 identifiers): anything
//! the walk stops on — a routed packet, a later fragment, ESP, an overlong chain — carries none.
//!
//! The walk reads each header with `bpf_skb_load_bytes` rather than a packet pointer: its offset
//! then only ever reaches helpers, whose offset argument the verifier does not need to bound, so
//! the states after the walk (one offset range per chain shape) prune into each other instead of
//! multiplying the paths the parsers after it are verified on. The loop's bound is a constant,
//! which the verifier accepts whether the compiler unrolls it or not.
use aya_ebpf::programs::TcContext;
use twill_common::Reason;

use crate::pkt::{Data, ETH_HLEN};

/// Extension headers (RFC 8200 4, RFC 4302).
pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_AH: u8 = 51;
pub const NEXT_DEST_OPTS: u8 = 60;
/// The most extension headers walked (see the module doc).
pub const MAX_EXT_HEADERS: usize = 6;
/// Where the first header after the fixed IPv6 header starts.
pub const AFTER_FIXED: usize = ETH_HLEN + 40;
/// The headers of a usual IPv6 packet: Ethernet, the fixed header and a TCP header without
/// options; pulled into the linear data when missing, and nothing more (see [`Data::new`]).
#[expect(clippy::cast_possible_truncation, reason = "74 bytes")]
pub const USUAL6_LEN: u32 = (AFTER_FIXED + 20) as u32;
/// The fragment header's offset field: the top 13 bits of bytes 2-3, then the M flag.
const FRAG_OFFSET_MASK: u16 = 0xfff8;
const FRAG_MORE: u16 = 0x0001;

/// Whether the transport header sits in a fragmented datagram's first fragment, a later one, or
/// a whole datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag6 {
    Whole,
    First,
    /// No transport header: only the first fragment has one.
    Later,
}

/// Where the walk ended.
pub struct Upper6 {
    /// The upper-layer protocol, or the extension header the walk stopped on.
    pub proto: u8,
    /// Its frame offset.
    pub off: usize,
    pub frag: Frag6,
    /// A fragment's identification (network order; 0 for a whole datagram).
    pub frag_id: u32,
}

/// Whether `next` is an extension header [`walk`] follows.
#[inline(always)]
pub fn is_ext(next: u8) -> bool {
    matches!(
        next,
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_FRAGMENT | NEXT_AH | NEXT_DEST_OPTS
    )
}

/// Walks the extension headers after the fixed header, whose next header is `next`.
/// `Err(Malformed)`: the packet ends inside the chain.
#[inline(always)]
pub fn walk(ctx: &TcContext, next: u8) -> Result<Upper6, Reason> {
    let mut up = Upper6 {
        proto: next,
        off: AFTER_FIXED,
        frag: Frag6::Whole,
        frag_id: 0,
    };
    for _ in 0..MAX_EXT_HEADERS {
        match up.proto {
            NEXT_HOP_BY_HOP | NEXT_DEST_OPTS => {
                let h: [u8; 2] = ctx.load(up.off).map_err(|_| Reason::Malformed)?;
                up.proto = h[0];
                up.off += (usize::from(h[1]) + 1) * 8;
            }
            NEXT_ROUTING => {
                // Next header, length, routing type, segments left.
                let h: [u8; 4] = ctx.load(up.off).map_err(|_| Reason::Malformed)?;
                if h[3] != 0 {
                    return Ok(up);
                }
                up.proto = h[0];
                up.off += (usize::from(h[1]) + 1) * 8;
            }
            NEXT_FRAGMENT => {
                let h: [u8; 8] = ctx.load(up.off).map_err(|_| Reason::Malformed)?;
                let field = u16::from_be_bytes([h[2], h[3]]);
                up.proto = h[0];
                up.off += 8;
                up.frag_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                if field & FRAG_OFFSET_MASK != 0 {
                    up.frag = Frag6::Later;
                    return Ok(up);
                }
                if field & FRAG_MORE != 0 {
                    up.frag = Frag6::First;
                }
            }
            NEXT_AH => {
                let h: [u8; 2] = ctx.load(up.off).map_err(|_| Reason::Malformed)?;
                up.proto = h[0];
                up.off += (usize::from(h[1]) + 2) * 4;
            }
            _ => return Ok(up),
        }
    }
    Ok(up)
}

/// The `N` bytes of the transport header at `off`: through the packet pointer when no extension
/// header precedes it (`ext` false: `off` is then [`AFTER_FIXED`]), else through the helper,
/// which also reaches a header beyond the linear data [`Data`] covers (see the module doc).
#[inline(always)]
pub fn l4<const N: usize>(ctx: &TcContext, d: &Data, ext: bool, off: usize) -> Option<[u8; N]> {
    if ext {
        ctx.load(off).ok()
    } else {
        d.bytes(AFTER_FIXED)
    }
}
