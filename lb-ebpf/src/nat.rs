//! The FullNAT rewrite: a packet matching a conntrack entry leaves with the entry's tuple.
//! Checksums are updated incrementally (RFC 1624); the L4 checksum covers the pseudo-header, so
//! it takes the address difference as well as the port difference.

use lb_common::{
    counters::Counter,
    csum::{apply, diff16, diff32, diff_addr},
    flow::{FAMILY_V4, PROTO_TCP},
    ConnEntry,
};

use crate::{
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Packet, Ports, TCP_CSUM_OFF, UDP_CSUM_OFF},
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
    let mut diff = if is_v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let d = diff32(
            diff32(0, ip.saddr_be, e.nat_src_be[0]),
            ip.daddr_be,
            e.nat_dst_be[0],
        );
        ip.check = apply(ip.check, d);
        ip.saddr_be = e.nat_src_be[0];
        ip.daddr_be = e.nat_dst_be[0];
        d
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3_off).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let d = diff_addr(
            diff_addr(0, &ip.saddr_be, &e.nat_src_be),
            &ip.daddr_be,
            &e.nat_dst_be,
        );
        ip.saddr_be = e.nat_src_be;
        ip.daddr_be = e.nat_dst_be;
        d
    };

    let ports: *mut Ports = ptr_at(ctx, pkt.l4_off).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &mut *ports };
    diff = diff16(
        diff16(diff, ports.src_be, e.nat_sport_be),
        ports.dst_be,
        e.nat_dport_be,
    );
    ports.src_be = e.nat_sport_be;
    ports.dst_be = e.nat_dport_be;

    if pkt.flow.proto == PROTO_TCP {
        let check: *mut u16 = ptr_at(ctx, pkt.l4_off + TCP_CSUM_OFF).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *check = apply(*check, diff) };
    } else {
        let check: *mut u16 = ptr_at(ctx, pkt.l4_off + UDP_CSUM_OFF).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            // IPv4 UDP checksum 0 means "none" and stays so; a computed 0 is sent as 0xffff
            // (RFC 768). IPv6 UDP always carries one (RFC 8200).
            if *check != 0 || !is_v4 {
                let c = apply(*check, diff);
                *check = if c == 0 { 0xffff } else { c };
            }
        }
    }
    Ok(())
}
