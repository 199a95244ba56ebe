use super::*;

/// A tiny deterministic generator so the test needs no crate (lb-common has no dependencies).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn word32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}
fn word16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

/// Builds a random 20-byte IPv4 header with a valid checksum at bytes 10..12.
fn random_header(rng: &mut XorShift) -> [u8; 20] {
    let mut h = [0u8; 20];
    for b in h.iter_mut() {
        *b = rng.next() as u8;
    }
    h[10] = 0;
    h[11] = 0;
    let c = checksum_be(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

#[test]
fn checksum_of_known_ipv4_header() {
    // Example header from RFC 1071 discussions / Wikipedia: checksum 0xb861.
    let h: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(checksum_be(&h, 0), 0xb861);
}

#[test]
fn incremental_update_of_addresses_matches_full_recompute() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for _ in 0..100_000 {
        let mut h = random_header(&mut rng);
        let old_src = word32(&h[12..16]);
        let old_dst = word32(&h[16..20]);
        let new_src = rng.next() as u32;
        let new_dst = rng.next() as u32;
        let d = diff32(diff32(0, old_src, new_src), old_dst, new_dst);
        let new_check = apply(word16(&h[10..12]), d);
        h[12..16].copy_from_slice(&new_src.to_ne_bytes());
        h[16..20].copy_from_slice(&new_dst.to_ne_bytes());
        h[10..12].copy_from_slice(&new_check.to_ne_bytes());
        // A valid header sums to 0xffff (checksum over it, field included, is 0).
        assert_eq!(checksum_be(&h, 0), 0, "header {h:02x?}");
    }
}

#[test]
fn incremental_update_of_ports_and_v6_addresses_matches_full_recompute() {
    let mut rng = XorShift(42);
    for _ in 0..20_000 {
        // 32 bytes of "addresses" + 4 bytes of ports + 2 bytes checksum + 10 bytes payload.
        let mut seg = [0u8; 48];
        for b in seg.iter_mut() {
            *b = rng.next() as u8;
        }
        seg[36] = 0;
        seg[37] = 0;
        let c = checksum_be(&seg, 0);
        seg[36..38].copy_from_slice(&c.to_be_bytes());

        let mut old_a = [0u32; 4];
        let mut new_a = [0u32; 4];
        for i in 0..4 {
            old_a[i] = word32(&seg[i * 4..]);
            new_a[i] = rng.next() as u32;
        }
        let old_p = word16(&seg[32..]);
        let new_p = rng.next() as u16;
        let d = diff16(diff_addr(0, &old_a, &new_a), old_p, new_p);
        let nc = apply(word16(&seg[36..]), d);
        for i in 0..4 {
            seg[i * 4..i * 4 + 4].copy_from_slice(&new_a[i].to_ne_bytes());
        }
        seg[32..34].copy_from_slice(&new_p.to_ne_bytes());
        seg[36..38].copy_from_slice(&nc.to_ne_bytes());
        assert_eq!(checksum_be(&seg, 0), 0);
    }
}

#[test]
fn fold_handles_the_largest_accumulators() {
    assert_eq!(fold(u64::MAX), 0xffff);
    assert_eq!(fold(0), 0);
    assert_eq!(fold(0x1_0000), 1);
}
