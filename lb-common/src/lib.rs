//! Types shared by the XDP program (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Everything stored in a BPF map is `#[repr(C)]`, has explicit padding and a compile-time size
//! assert, so both sides agree on the layout byte for byte. Fields holding packet data in network
//! byte order end in `_be`; addresses are 16 bytes (`[u32; 4]` of raw network-order bytes) with
//! IPv4 in the first word and the rest zero, so one key type serves both families.
#![no_std]

pub mod conn;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod hash;
pub mod maps;
pub mod reuseport;

pub use conn::ConnEntry;
pub use flow::{AclKey, Backend, FlowKey, FlowKey4, GlobalConfig, VipKey, VipMeta};
