//! Per-listener client ACLs, checked when a flow is created (a refused client never gets a
//! conntrack entry, so all its packets come here). Deny wins over allow.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    counters::Counter,
    flow::{VIP_F_ACL_ALLOW, VIP_F_ACL_DENY},
    AclKey, FlowKey, VipMeta,
};

use crate::{
    maps::{ACL_ALLOW, ACL_DENY},
    verdict::Verdict,
};

/// Key length in bits: the listener id plus a full 128-bit address (IPv4 keys are zero-padded,
/// and their prefixes never reach past bit 32 + 32).
const FULL_PREFIX: u32 = 32 + 128;

#[inline(always)]
pub fn check(vip: &VipMeta, flow: &FlowKey) -> Result<(), Verdict> {
    if vip.flags & (VIP_F_ACL_ALLOW | VIP_F_ACL_DENY) == 0 {
        return Ok(());
    }
    let key = Key::new(
        FULL_PREFIX,
        AclKey {
            listener_id: vip.listener_id,
            addr_be: flow.src_be,
        },
    );
    let refused = Verdict::drop(Counter::DropAcl);
    if vip.flags & VIP_F_ACL_DENY != 0 && ACL_DENY.get(&key).is_some() {
        return Err(refused);
    }
    if vip.flags & VIP_F_ACL_ALLOW != 0 && ACL_ALLOW.get(&key).is_none() {
        return Err(refused);
    }
    Ok(())
}
