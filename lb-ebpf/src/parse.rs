//! Header parsing: the only place that computes packet offsets.
//!
//! Rules (each counted): non-IP frames, and IP packets carrying anything but TCP or UDP (IPv6
//! extension headers included), pass to the kernel untouched; IPv4 fragments pass
//! (`PassFragment`; the kernel reassembles them); IP or L4 headers that are truncated or
//! inconsistent (version, IHL < 5, total length beyond the frame, TCP data offset < 5) are
//! dropped as `DropMalformed`: the kernel would drop them too. IPv4 options are honoured
//! through IHL.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    conn::{TCP_ACK, TCP_RST, TCP_SYN},
    counters::Counter,
    flow::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP},
    FlowKey,
};

use crate::verdict::Verdict;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len_be: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
}

/// Ports sit at the same offsets in TCP and UDP.
#[repr(C)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// Offset of the checksum field inside the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

pub struct Packet {
    pub flow: FlowKey,
    pub l3_off: usize,
    pub l4_off: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Frame length, for byte counters.
    pub len: u64,
    /// IP total length (header included), host order, for the FIB's MTU check.
    pub ip_len: u16,
    /// For an ICMP error about a TCP/UDP packet: offsets of the quoted IP and L4 headers, else
    /// (0, 0). `flow` is then the *reverse* of the quoted tuple, i.e. the key of the conntrack
    /// entry of the direction the error travels in. Not an `Option`: LLVM may fill a `None`'s
    /// payload with any register, a packet pointer included, which the verifier rejects. Not
    /// `usize`s: LLVM stored those as two 32-bit halves and loaded them whole, a store
    /// forwarding stall (5 ns) on every packet.
    pub icmp_inner: (u16, u16),
}

impl Packet {
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.icmp_inner.0 != 0
    }

    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

/// Bounds-checked pointer into the frame. The check against `data_end` is what the verifier
/// needs before any access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let pass = Verdict::pass(Counter::Pass);
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(pass)?;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let mut flow = FlowKey::default();
    // SAFETY: ptr_at checked the bounds of each header read below.
    let (l4_off, ip_len) = match unsafe { (*eth).proto_be } {
        ETH_P_IP_BE => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(pass)?;
            let ip = unsafe { &*ip };
            let ihl = (ip.ver_ihl & 0x0f) as usize;
            let tot_len = u16::from_be(ip.tot_len_be);
            if ip.ver_ihl >> 4 != 4
                || ihl < 5
                || (tot_len as u64) < (ihl as u64) * 4
                || ETH_HLEN as u64 + tot_len as u64 > len
            {
                return Err(Verdict::drop(Counter::DropMalformed));
            }
            // MF set or a non-zero offset: a fragment (ports only in the first one).
            if u16::from_be(ip.frag_off_be) & 0x3fff != 0 {
                return Err(Verdict::pass(Counter::PassFragment));
            }
            flow.family = FAMILY_V4;
            flow.proto = ip.proto;
            flow.src_be[0] = ip.saddr_be;
            flow.dst_be[0] = ip.daddr_be;
            (ETH_HLEN + ihl * 4, tot_len)
        }
        ETH_P_IPV6_BE => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(pass)?;
            let ip = unsafe { &*ip };
            let tot_len = u16::from_be(ip.payload_len_be) as u64 + size_of::<Ipv6Hdr>() as u64;
            if u32::from_be(ip.ver_tc_flow) >> 28 != 6 || ETH_HLEN as u64 + tot_len > len {
                return Err(Verdict::drop(Counter::DropMalformed));
            }
            flow.family = FAMILY_V6;
            flow.proto = ip.next_hdr;
            flow.src_be = ip.saddr_be;
            flow.dst_be = ip.daddr_be;
            (ETH_HLEN + size_of::<Ipv6Hdr>(), tot_len as u16)
        }
        _ => return Err(pass),
    };
    let mut tcp_flags = 0;
    match flow.proto {
        PROTO_TCP => {
            // Flags at byte 13, data offset in the high nibble of byte 12.
            let hdr: *const [u8; TCP_HLEN] =
                ptr_at(ctx, l4_off).ok_or(Verdict::drop(Counter::DropMalformed))?;
            let hdr = unsafe { &*hdr };
            if hdr[12] >> 4 < 5 {
                return Err(Verdict::drop(Counter::DropMalformed));
            }
            tcp_flags = hdr[13];
        }
        PROTO_UDP => {
            ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off).ok_or(Verdict::drop(Counter::DropMalformed))?;
        }
        PROTO_ICMP | PROTO_ICMPV6 => return icmp_error(ctx, flow, l4_off, len, ip_len),
        _ => return Err(pass),
    }
    let ports: *const Ports = ptr_at(ctx, l4_off).ok_or(pass)?;
    // SAFETY: bounds checked just above (and by the L4 header check).
    unsafe {
        flow.sport_be = (*ports).src_be;
        flow.dport_be = (*ports).dst_be;
    }
    Ok(Packet {
        flow,
        l3_off: ETH_HLEN,
        l4_off,
        tcp_flags,
        len,
        ip_len,
        icmp_inner: (0, 0),
    })
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMP header: type, code, checksum, 4 bytes that depend on the type.
pub const ICMP_HLEN: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;

/// ICMP (v4: destination unreachable, time exceeded, parameter problem; v6: the same plus
/// packet too big) quoting a TCP or UDP packet. Anything else (echo, neighbour discovery, …)
/// passes to the kernel.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    mut flow: FlowKey,
    l4_off: usize,
    len: u64,
    ip_len: u16,
) -> Result<Packet, Verdict> {
    let pass = Verdict::pass(Counter::Pass);
    // The whole header, not just its type byte: for a 1-byte read LLVM folds the bounds check
    // into `p >= end`, from which the verifier grants no readable range.
    let icmp: *const [u8; ICMP_HLEN] = ptr_at(ctx, l4_off).ok_or(pass)?;
    // SAFETY: bounds checked by ptr_at.
    let icmp_type = unsafe { (*icmp)[0] };
    let is_v4 = flow.family == FAMILY_V4;
    let is_error = if is_v4 {
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        matches!(icmp_type, 1..=4)
    };
    if (is_v4 && flow.proto != PROTO_ICMP) || (!is_v4 && flow.proto != PROTO_ICMPV6) || !is_error {
        return Err(pass);
    }
    let inner_l3 = l4_off + ICMP_HLEN;
    let inner_l4 = if is_v4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(pass)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let ihl = (ip.ver_ihl & 0x0f) as usize;
        if ihl < 5 {
            return Err(pass);
        }
        flow.proto = ip.proto;
        flow.src_be[0] = ip.daddr_be;
        flow.dst_be[0] = ip.saddr_be;
        inner_l3 + ihl * 4
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(pass)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        flow.proto = ip.next_hdr;
        flow.src_be = ip.daddr_be;
        flow.dst_be = ip.saddr_be;
        inner_l3 + size_of::<Ipv6Hdr>()
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Err(pass);
    }
    // RFC 792 guarantees the first 8 bytes of the quoted L4 header: the ports are there.
    let ports: *const Ports = ptr_at(ctx, inner_l4).ok_or(pass)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        flow.sport_be = (*ports).dst_be;
        flow.dport_be = (*ports).src_be;
    }
    Ok(Packet {
        flow,
        l3_off: ETH_HLEN,
        l4_off,
        tcp_flags: 0,
        len,
        ip_len,
        icmp_inner: (inner_l3 as u16, inner_l4 as u16),
    })
}
