//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016), built by the agent; the
//! datapath only indexes the table with the flow hash.
//!
//! Weights follow Katran's MaglevV2: every round each backend adds its weight to a credit and
//! places one slot per `max_weight` of credit, so slot shares track weights while each backend
//! keeps walking its own permutation (which is what limits disruption when the set changes).

use lb_common::hash::fmix32;

/// Default (and largest) table size: a prime, so every `skip` generates a full permutation.
pub const DEFAULT_TABLE_SIZE: u32 = lb_common::maps::MAX_RING;

/// One backend as Maglev sees it: a stable identity (its hash) and a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Identity hash: must not depend on the member's position, so removing one member leaves
    /// the others' permutations unchanged.
    pub key: u64,
    pub weight: u32,
}

/// Builds a table of `size` (prime) slots holding indices into `members`. Empty when no member
/// has a positive weight.
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    let m = size as u64;
    let max_weight = members.iter().map(|b| b.weight).max().unwrap_or(0);
    if max_weight == 0 || m < 2 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let lo = b.key as u32;
            let hi = (b.key >> 32) as u32;
            let offset = fmix32(lo ^ fmix32(hi)) as u64 % m;
            let skip = fmix32(hi ^ 0x9e37_79b9 ^ fmix32(lo.rotate_left(16))) as u64 % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u64; members.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    while filled < m {
        for (i, b) in members.iter().enumerate() {
            credit[i] += b.weight as u64;
            while credit[i] >= max_weight as u64 && filled < m {
                credit[i] -= max_weight as u64;
                let (offset, skip) = perms[i];
                // Walk this member's permutation to its next free slot.
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    table
}

/// The identity key of a backend address and port.
pub fn member_key(addr: std::net::IpAddr, port: u16) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: stable across runs and releases of this agent.
    #[allow(
        deprecated,
        reason = "SipHasher's fixed keys are what makes the key stable"
    )]
    let mut h = std::hash::SipHasher::new_with_keys(0x4c42_4d41_474c_4556, 0x4d41_474c_4556_3031);
    addr.hash(&mut h);
    port.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
