//! Flow hashing shared by the datapath (to index the Maglev table) and the agent (tests,
//! stickiness checks). Deterministic, no seed from the kernel.

use crate::flow::FlowKey;

const SEED: u32 = 0x4c42_5844; // "LBXD"

/// murmur3's 32-bit finaliser: good avalanche for a few instructions.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn step(h: u32, w: u32) -> u32 {
    (h ^ fmix32(w))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Hash of a 16-byte address only (source-IP scheduling).
#[inline(always)]
pub const fn addr_hash(a: &[u32; 4]) -> u32 {
    fmix32(step(step(step(step(SEED, a[0]), a[1]), a[2]), a[3]))
}

/// Hash of the full 5-tuple.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = step(h, k.src_be[0]);
    h = step(h, k.src_be[1]);
    h = step(h, k.src_be[2]);
    h = step(h, k.src_be[3]);
    h = step(h, k.dst_be[0]);
    h = step(h, k.dst_be[1]);
    h = step(h, k.dst_be[2]);
    h = step(h, k.dst_be[3]);
    h = step(h, ((k.sport_be as u32) << 16) | k.dport_be as u32);
    h = step(h, k.proto as u32);
    fmix32(h)
}
