//! The loaded XDP program and typed handles to its maps.

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError,
};
use lb_common::{
    counters::{Counter, ListenerStats},
    flow::AddrBe,
    maps::{self, ring_base},
    AclKey, Backend, ConnEntry, FlowKey, GlobalConfig, VipKey, VipMeta,
};
use tracing::{info, warn};

use crate::{config, gc, plan::Plan};

/// The object `build.rs` produced (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this lb-agent was built without its XDP program (AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("attaching XDP to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

pub struct Dataplane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipMeta>,
    backends: Array<MapData, Backend>,
    ring: Array<MapData, u32>,
    snat_addrs: Array<MapData, AddrBe>,
    global: Array<MapData, GlobalConfig>,
    counters: PerCpuArray<MapData, u64>,
    listener_stats: PerCpuArray<MapData, ListenerStats>,
    conntrack: HashMap<MapData, FlowKey, ConnEntry>,
    /// TCP flows until the client completes the handshake (the datapath then moves them to
    /// `conntrack`).
    conntrack_syn: HashMap<MapData, FlowKey, ConnEntry>,
    acl_allow: LpmTrie<MapData, AclKey, u8>,
    acl_deny: LpmTrie<MapData, AclKey, u8>,
    backend_active: Array<MapData, u64>,
    links: Vec<(String, XdpLinkId)>,
}

/// Per-listener totals over all CPUs.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub counters: Vec<(Counter, u64)>,
    pub listeners: Vec<ListenerStats>,
}

impl Snapshot {
    /// The total of one global counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }
}

impl Dataplane {
    /// Loads the embedded object into the kernel (maps created, program verified, nothing
    /// attached yet).
    pub fn load() -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(OBJECT)?;
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROG_LB)
            .ok_or(DataplaneError::Missing(maps::PROG_LB))?
            .try_into()?;
        prog.load()?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::Missing(name));
        let vips = HashMap::try_from(take(maps::VIPS)?).map_err(map_err(maps::VIPS))?;
        let backends = Array::try_from(take(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?;
        let ring = Array::try_from(take(maps::RING)?).map_err(map_err(maps::RING))?;
        let snat_addrs =
            Array::try_from(take(maps::SNAT_ADDRS)?).map_err(map_err(maps::SNAT_ADDRS))?;
        let global = Array::try_from(take(maps::GLOBAL)?).map_err(map_err(maps::GLOBAL))?;
        let counters =
            PerCpuArray::try_from(take(maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
        let listener_stats = PerCpuArray::try_from(take(maps::LISTENER_STATS)?)
            .map_err(map_err(maps::LISTENER_STATS))?;
        let conntrack =
            HashMap::try_from(take(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?;
        let conntrack_syn =
            HashMap::try_from(take(maps::CONNTRACK_SYN)?).map_err(map_err(maps::CONNTRACK_SYN))?;
        let acl_allow =
            LpmTrie::try_from(take(maps::ACL_ALLOW)?).map_err(map_err(maps::ACL_ALLOW))?;
        let acl_deny = LpmTrie::try_from(take(maps::ACL_DENY)?).map_err(map_err(maps::ACL_DENY))?;
        let backend_active =
            Array::try_from(take(maps::BACKEND_ACTIVE)?).map_err(map_err(maps::BACKEND_ACTIVE))?;
        Ok(Self {
            ebpf,
            vips,
            backends,
            ring,
            snat_addrs,
            global,
            counters,
            listener_stats,
            conntrack,
            conntrack_syn,
            acl_allow,
            acl_deny,
            backend_active,
            links: Vec::new(),
        })
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        // Checked to exist and be XDP in `load`.
        self.ebpf
            .program_mut(maps::PROG_LB)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("lb_xdp was loaded as an XDP program")
    }

    /// The object's trivial XDP_TX program, loaded on first use: the reference the benchmark
    /// measures the real program against, in the same run.
    pub fn baseline_program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(maps::PROG_BASELINE)
            .ok_or(DataplaneError::Missing(maps::PROG_BASELINE))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    /// Attaches to `iface`; `auto` tries native (driver) mode and falls back to generic.
    /// Returns the mode used.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: config::XdpMode,
    ) -> Result<&'static str, DataplaneError> {
        let tries: &[(XdpMode, &'static str)] = match mode {
            config::XdpMode::Native => &[(XdpMode::Driver, "native")],
            config::XdpMode::Generic => &[(XdpMode::Skb, "generic")],
            config::XdpMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for &(flags, name) in tries {
            match self.program().attach(iface, flags) {
                Ok(link) => {
                    info!(iface, mode = name, "XDP attached");
                    self.links.push((iface.to_string(), link));
                    return Ok(name);
                }
                Err(e) => {
                    if tries.len() > 1 {
                        warn!(iface, mode = name, error = %e, "XDP attach failed, trying the next mode");
                    }
                    last = Some(DataplaneError::Attach {
                        iface: iface.into(),
                        mode: name,
                        source: e,
                    });
                }
            }
        }
        Err(last.expect("at least one mode was tried"))
    }

    /// Detaches from every interface (also done when the dataplane is dropped).
    pub fn detach_all(&mut self) {
        for (iface, link) in std::mem::take(&mut self.links) {
            match self.program().detach(link) {
                Ok(()) => info!(iface, "XDP detached"),
                Err(e) => warn!(iface, error = %e, "XDP detach failed"),
            }
        }
    }

    /// Writes `plan` into the maps. Each listener's Maglev table goes into the half of its
    /// double buffer that packets are not reading, then the VIP entry flips to it.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        for (i, a) in plan.snat_addrs.iter().enumerate() {
            self.snat_addrs
                .set(i as u32, a, 0)
                .map_err(map_err(maps::SNAT_ADDRS))?;
        }
        self.global
            .set(0, plan.global, 0)
            .map_err(map_err(maps::GLOBAL))?;
        for (id, b) in plan.backends.iter().enumerate() {
            self.backends
                .set(id as u32, b.slot, 0)
                .map_err(map_err(maps::BACKENDS))?;
        }
        for (id, l) in plan.listeners.iter().enumerate() {
            let id = id as u32;
            let half = match self.vips.get(&l.key, 0) {
                Ok(old) if old.listener_id == id => old.ring_half ^ 1,
                _ => 0,
            };
            // Slots past ring_size are never read, so a shrinking table needs no clearing.
            let base = ring_base(id, half);
            for (slot, backend) in l.ring.iter().enumerate() {
                self.ring
                    .set(base + slot as u32, backend, 0)
                    .map_err(map_err(maps::RING))?;
            }
            let meta = VipMeta {
                listener_id: id,
                ring_size: l.ring.len() as u32,
                ring_half: half,
                flags: l.flags,
            };
            self.vips
                .insert(l.key, meta, 0)
                .map_err(map_err(maps::VIPS))?;
        }
        sync_acl(
            &mut self.acl_allow,
            maps::ACL_ALLOW,
            plan.listeners.iter().map(|l| &l.allow),
        )?;
        sync_acl(
            &mut self.acl_deny,
            maps::ACL_DENY,
            plan.listeners.iter().map(|l| &l.deny),
        )?;
        let stale: Vec<VipKey> = self
            .vips
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !plan.listeners.iter().any(|l| l.key == *k))
            .collect();
        for k in stale {
            self.vips.remove(&k).map_err(map_err(maps::VIPS))?;
        }
        Ok(())
    }

    /// Counter totals over all CPUs.
    pub fn snapshot(&self, listeners: usize) -> Result<Snapshot, DataplaneError> {
        let mut s = Snapshot::default();
        for c in Counter::ALL {
            let v = self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_err(maps::COUNTERS))?;
            s.counters.push((c, v.iter().sum()));
        }
        for id in 0..listeners as u32 {
            let v = self
                .listener_stats
                .get(&id, 0)
                .map_err(map_err(maps::LISTENER_STATS))?;
            let mut total = ListenerStats::default();
            v.iter().for_each(|x| total.add(x));
            s.listeners.push(total);
        }
        Ok(s)
    }

    /// Writes one conntrack entry (state restore, benchmarks).
    pub fn conntrack_insert(
        &mut self,
        key: FlowKey,
        entry: ConnEntry,
    ) -> Result<(), DataplaneError> {
        self.conntrack
            .insert(key, entry, 0)
            .map_err(map_err(maps::CONNTRACK))
    }

    /// Conntrack entries (both directions, both tables), for tests and diagnostics.
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, ConnEntry)> {
        self.conntrack
            .iter()
            .chain(self.conntrack_syn.iter())
            .filter_map(Result::ok)
            .collect()
    }
}

impl Dataplane {
    /// Deletes flows idle for longer than their state allows (`gc::timeout`), both entries at
    /// once, which frees their SNAT port. A flow's idle time is that of its more recent
    /// direction; an entry whose pair is gone (LRU eviction) is judged alone. `now_ns` is
    /// `gc::monotonic_ns()` in production.
    pub fn gc(&mut self, plan: &Plan, now_ns: u64) -> Result<gc::Report, DataplaneError> {
        let mut report = gc::Report {
            active: vec![0; plan.listeners.len()],
            backend_active: vec![0; plan.backends.len()],
            ..Default::default()
        };
        // A flow's two entries are always in the same table.
        sweep(&mut self.conntrack, plan, now_ns, &mut report);
        sweep(&mut self.conntrack_syn, plan, now_ns, &mut report);
        // The exact counts replace the datapath's running ones, which miss flows that expired
        // without closing (flows created since the scan are missed until the next sweep).
        for (id, n) in report.backend_active.iter().enumerate() {
            self.backend_active
                .set(id as u32, n, 0)
                .map_err(map_err(maps::BACKEND_ACTIVE))?;
        }
        Ok(report)
    }
}

/// One conntrack table's part of [`Dataplane::gc`], added to `report`.
fn sweep(
    table: &mut HashMap<MapData, FlowKey, ConnEntry>,
    plan: &Plan,
    now_ns: u64,
    report: &mut gc::Report,
) {
    use lb_common::conn::{DIR_ORIGINAL, STATE_CLOSED, STATE_CLOSING};
    let entries: std::collections::HashMap<FlowKey, ConnEntry> =
        table.iter().filter_map(Result::ok).collect();
    report.entries += entries.len();
    let mut doomed = Vec::new();
    for (key, e) in &entries {
        let pair_key = e.pair_key(key.proto, key.family);
        let pair = entries.get(&pair_key);
        // Each flow is judged once: from its original entry, or from an orphan reply.
        if e.dir != DIR_ORIGINAL && pair.is_some() {
            continue;
        }
        let last = pair.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
        let idle = plan
            .listeners
            .get(e.listener_id as usize)
            .map_or(std::time::Duration::from_secs(900), |l| l.idle_timeout);
        let limit = gc::timeout(e.state, idle).as_nanos() as u64;
        if now_ns.saturating_sub(last) > limit {
            doomed.push(*key);
            if pair.is_some() {
                doomed.push(pair_key);
            }
            report.expired += 1;
        } else if e.state != STATE_CLOSING && e.state != STATE_CLOSED {
            if let Some(n) = report.active.get_mut(e.listener_id as usize) {
                *n += 1;
            }
            if let Some(n) = report.backend_active.get_mut(e.backend_id as usize) {
                *n += 1;
            }
        }
    }
    for key in doomed {
        // Already gone (LRU eviction, or the datapath re-created it) is fine.
        let _ = table.remove(&key);
    }
}

/// Makes an ACL trie hold exactly the plan's prefixes (indexed by listener id): new ones are
/// inserted before stale ones go, so a list never passes through empty.
fn sync_acl<'a>(
    trie: &mut LpmTrie<MapData, AclKey, u8>,
    name: &'static str,
    lists: impl Iterator<Item = &'a Vec<(u32, AddrBe)>>,
) -> Result<(), DataplaneError> {
    let mut wanted = Vec::new();
    for (id, list) in lists.enumerate() {
        for &(prefix, addr_be) in list {
            wanted.push((
                32 + prefix,
                AclKey {
                    listener_id: id as u32,
                    addr_be,
                },
            ));
        }
    }
    for (len, data) in &wanted {
        trie.insert(&Key::new(*len, *data), 1, 0)
            .map_err(map_err(name))?;
    }
    let stale: Vec<Key<AclKey>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            !wanted
                .iter()
                .any(|(len, data)| k.prefix_len() == *len && k.data() == *data)
        })
        .collect();
    for k in stale {
        trie.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}
