//! The FullNAT rewrite: a packet matching a conntrack entry leaves with the entry's tuple.
//! Checksums are updated incrementally (RFC 1624); the L4 checksum covers the pseudo-header, so
//! it takes the address difference as well as the port difference.

use lb_common::{
    counters::Counter,
    csum::{apply, diff16, diff32, diff_addr},
    flow::{AddrBe, FAMILY_V4, PROTO_TCP},
    ConnEntry,
};

use crate::{
    copy,
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Packet, Ports, ICMP_CSUM_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    verdict::Verdict,
};

#[inline(always)]
pub fn rewrite(
    ctx: &aya_ebpf::programs::XdpContext,
    pkt: &Packet,
    e: &ConnEntry,
) -> Result<(), Verdict> {
    let bad = Verdict::drop(Counter::DropMalformed);
    let is_v4 = pkt.flow.family == FAMILY_V4;
    let diff = if is_v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*ip).set_addrs(e.nat_src_be[0], e.nat_dst_be[0]) }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*ip).set_addrs(&e.nat_src_be, &e.nat_dst_be) }
    };

    let udp = pkt.flow.proto != PROTO_TCP;
    let csum_off = if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    let ports: *mut Ports = ptr_at(ctx, pkt.l4_off).ok_or(bad)?;
    let check: *mut u16 = ptr_at(ctx, pkt.l4_off + csum_off).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { rewrite_l4(&mut *ports, &mut *check, udp, is_v4, diff, e) };
    Ok(())
}

/// The L4 half of `rewrite`: the ports, and the TCP or UDP checksum `check` by `diff` (the
/// addresses' change, for the pseudo-header) and the ports' change.
#[inline(always)]
pub fn rewrite_l4(
    ports: &mut Ports,
    check: &mut u16,
    udp: bool,
    is_v4: bool,
    diff: u64,
    e: &ConnEntry,
) {
    let diff = diff16(
        diff16(diff, ports.src_be, e.nat_sport_be),
        ports.dst_be,
        e.nat_dport_be,
    );
    ports.src_be = e.nat_sport_be;
    ports.dst_be = e.nat_dport_be;
    if !udp {
        *check = apply(*check, diff);
    } else if *check != 0 || !is_v4 {
        // IPv4 UDP checksum 0 means "none" and stays so; a computed 0 is sent as 0xffff
        // (RFC 768). IPv6 UDP always carries one (RFC 8200).
        let c = apply(*check, diff);
        *check = if c == 0 { 0xffff } else { c };
    }
}

/// Translates an ICMP error about a tracked flow (`pkt.is_icmp_error()`, and `pkt.flow`
/// matched entry `e`): the outer header goes from `e.nat_src` to `e.nat_dst` like the flow's
/// own packets, and the quoted packet becomes the one that peer sent (`e.nat_dst:dport` →
/// `e.nat_src:sport`), so its socket recognises the error. The quoted IP checksum and the ICMP
/// checksum are updated; the quoted L4 checksum is left alone (the quote is often truncated and
/// nobody checks it).
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &aya_ebpf::programs::XdpContext,
    pkt: &Packet,
    e: &ConnEntry,
) -> Result<(), Verdict> {
    let bad = Verdict::drop(Counter::DropMalformed);
    let (inner_l3, inner_l4) = pkt.icmp_inner;
    // Verifier: the offsets come back from the stack without bounds; both are below
    // 14 + 60 + 8 + 60 = 142, so the mask changes nothing but proves a range.
    let (inner_l3, inner_l4) = (inner_l3 as usize & 0xff, inner_l4 as usize & 0xff);
    let is_v4 = pkt.flow.family == FAMILY_V4;
    // Difference over the ICMP message (quoted headers), and for ICMPv6 its pseudo-header too.
    let mut icmp_diff = if is_v4 {
        let outer: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let (outer, inner) = unsafe { (&mut *outer, &mut *inner) };
        outer.set_addrs(e.nat_src_be[0], e.nat_dst_be[0]);
        let old_check = inner.check;
        let d = inner.set_addrs(e.nat_dst_be[0], e.nat_src_be[0]);
        // The quoted header's checksum field is part of the ICMP message too.
        diff16(d, old_check, inner.check)
    } else {
        let outer: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        let inner: *mut Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let (outer, inner) = unsafe { (&mut *outer, &mut *inner) };
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        outer.set_addrs(&e.nat_src_be, &e.nat_dst_be)
            + inner.set_addrs(&e.nat_dst_be, &e.nat_src_be)
    };
    let ports: *mut Ports = ptr_at(ctx, inner_l4).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &mut *ports };
    icmp_diff = diff16(
        diff16(icmp_diff, ports.src_be, e.nat_dport_be),
        ports.dst_be,
        e.nat_sport_be,
    );
    ports.src_be = e.nat_dport_be;
    ports.dst_be = e.nat_sport_be;
    let check: *mut u16 = ptr_at(ctx, pkt.l4_off + ICMP_CSUM_OFF).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = apply(*check, icmp_diff) };
    Ok(())
}

impl Ipv4Hdr {
    /// Rewrites both addresses, keeping the header checksum right. Returns the checksum
    /// difference of the change, for checksums over a pseudo-header (TCP, UDP).
    #[inline(always)]
    pub fn set_addrs(&mut self, src_be: u32, dst_be: u32) -> u64 {
        let d = diff32(diff32(0, self.saddr_be, src_be), self.daddr_be, dst_be);
        self.check = apply(self.check, d);
        self.saddr_be = src_be;
        self.daddr_be = dst_be;
        d
    }
}

impl Ipv6Hdr {
    /// Rewrites both addresses (IPv6 has no header checksum). Returns the checksum difference
    /// of the change, for checksums over a pseudo-header (TCP, UDP, ICMPv6).
    #[inline(always)]
    fn set_addrs(&mut self, src_be: &AddrBe, dst_be: &AddrBe) -> u64 {
        let d = diff_addr(diff_addr(0, &self.saddr_be, src_be), &self.daddr_be, dst_be);
        // SAFETY: fields of this header.
        unsafe {
            copy::elements(&raw mut self.saddr_be, src_be);
            copy::elements(&raw mut self.daddr_be, dst_be);
        }
        d
    }
}
