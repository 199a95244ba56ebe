//! Flow, VIP and backend keys/values.

/// Address family tags used in keys (not `AF_*`, which differ between ABIs).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A 16-byte address in network byte order; IPv4 uses word 0 only.
pub type AddrBe = [u32; 4];

/// The 5-tuple of a packet as it arrives. Key of the IPv6 conntrack tables (`CONNTRACK6`,
/// `CONNTRACK6_SYN`); IPv4 flows are keyed by its `v4()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: AddrBe,
    pub dst_be: AddrBe,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key of an IPv4 flow in the IPv4 conntrack tables.
    #[inline(always)]
    pub const fn v4(&self) -> FlowKey4 {
        FlowKey4 {
            src_be: self.src_be[0],
            dst_be: self.dst_be[0],
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// An IPv4 flow's 5-tuple: the key of the IPv4 conntrack tables (`CONNTRACK`,
/// `CONNTRACK_SYN`). The kernel hashes and compares the whole key on every lookup; for an
/// established packet this key costs 20 ns less than the 40-byte `FlowKey` on this machine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Not a [u8; 3]: LLVM zeroes that with a call to memset on BPF.
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);

impl FlowKey4 {
    /// The same flow as a `FlowKey` (IPv4 in word 0 of each address).
    pub const fn widen(&self) -> FlowKey {
        FlowKey {
            src_be: [self.src_be, 0, 0, 0],
            dst_be: [self.dst_be, 0, 0, 0],
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

/// VIP:port:protocol. Key of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// What the datapath needs to know about one L4 listener. Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the per-listener counters and the Maglev ring slices.
    pub listener_id: u32,
    /// Length of the live Maglev table (a prime); 0 means no backend can take new flows.
    pub ring_size: u32,
    /// Which of the listener's two ring slices is live (0 or 1): the agent fills the other one
    /// and then flips this, so a packet never sees a half-written table.
    pub ring_half: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}

/// Hash only the client address (source-IP scheduling).
pub const VIP_F_SOURCE_IP: u32 = 1 << 0;
/// Weighted round robin: the ring holds a weighted sequence walked by a per-CPU cursor.
pub const VIP_F_WRR: u32 = 1 << 3;
/// DNAT only: backends see the client's address and route their replies through the LB.
pub const VIP_F_PASSTHROUGH: u32 = 1 << 4;
/// Weighted least connections: the ring holds the pool's backends (weight > 0), and a new flow
/// goes to the lowest `active / weight`.
pub const VIP_F_WLC: u32 = 1 << 5;
/// FullNAT with the client's address in TCP option 254 (TOA) on the first packets.
pub const VIP_F_TOA: u32 = 1 << 6;
/// TCP flows that idle out are reset at both ends (`reset_on_idle`).
pub const VIP_F_RESET_IDLE: u32 = 1 << 7;
/// The listener has an allow list: clients must match it.
pub const VIP_F_ACL_ALLOW: u32 = 1 << 1;
/// The listener has a deny list.
pub const VIP_F_ACL_DENY: u32 = 1 << 2;

/// Data part of an ACL LPM-trie key: the listener id (always fully matched, so its byte
/// order does not matter) followed by the client address in network order. The prefix length
/// of a key is `32 + address prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclKey {
    pub listener_id: u32,
    pub addr_be: AddrBe,
}
const _: () = assert!(core::mem::size_of::<AclKey>() == 20);
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

/// One backend, by global id. Value of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    /// Configured weight (weighted least connections divides by it).
    pub weight: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Datapath-wide settings. The single element of `GLOBAL`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// SNAT (local) addresses live in `SNAT_ADDRS[v4_start..v4_start + v4_count]` and likewise
    /// for IPv6.
    pub snat_v4_start: u32,
    pub snat_v4_count: u32,
    pub snat_v6_start: u32,
    pub snat_v6_count: u32,
    /// Inclusive SNAT source-port range, host byte order.
    pub port_min: u16,
    pub port_max: u16,
    /// Bumped by the agent after it deletes or writes conntrack entries: the CPUs' flow-cache
    /// copies taken before are stale (see the datapath's `flowcache`).
    pub flow_gen: u32,
    /// The datapath's clock (see the agent's `clock`): CLOCK_MONOTONIC nanoseconds are
    /// `(jiffies - jiffies_base) * ns_per_jiffy`.
    pub jiffies_base: u64,
    pub ns_per_jiffy: u64,
    /// How long, in jiffies, a CPU's flow-cache copy of a conntrack entry serves packets
    /// before the entry itself is looked up again (0: the cache is off).
    pub flow_cache_jiffies: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::AclKey {}
}

#[cfg(test)]
mod tests;
