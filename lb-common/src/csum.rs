//! Internet checksum helpers (RFC 1071) with incremental update (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`).
//!
//! Values are the raw 16/32-bit words as they sit in memory (network byte order loaded
//! natively). One's-complement addition is byte-order independent as long as every operand and
//! the checksum field are read the same way, so the result can be stored back as is.

/// Folds a one's-complement accumulator to 16 bits. Fixed number of steps (no loop) so the BPF
/// verifier sees straight-line code: 2^64 → <2^33 → <2^18 → <2^16+4 → ≤ 0xffff.
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Adds the difference between `old` and `new` 32-bit words to an accumulator.
#[inline(always)]
pub const fn diff32(acc: u64, old: u32, new: u32) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// Adds the difference between `old` and `new` 16-bit words to an accumulator.
#[inline(always)]
pub const fn diff16(acc: u64, old: u16, new: u16) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// Adds the difference between two 16-byte addresses (4 words).
#[inline(always)]
pub const fn diff_addr(acc: u64, old: &[u32; 4], new: &[u32; 4]) -> u64 {
    let acc = diff32(acc, old[0], new[0]);
    let acc = diff32(acc, old[1], new[1]);
    let acc = diff32(acc, old[2], new[2]);
    diff32(acc, old[3], new[3])
}

/// Applies an accumulated difference (from `diff*`, starting at 0) to a stored checksum.
#[inline(always)]
pub const fn apply(check: u16, diff: u64) -> u16 {
    !fold((!check) as u64 + diff)
}

/// Full one's-complement sum over `bytes`, added to `initial` (use for pseudo-headers). Bytes
/// are taken as big-endian 16-bit words; the result is in host order.
pub fn sum_be(bytes: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_be_bytes([*last, 0]) as u64;
    }
    acc
}

/// The Internet checksum of `bytes` (checksum field zeroed by the caller), in host order.
pub fn checksum_be(bytes: &[u8], initial: u64) -> u16 {
    !fold(sum_be(bytes, initial))
}

#[cfg(test)]
mod tests;
