//! The loaded XDP program and typed handles to its maps.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, ProgramArray},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    conn::CachedFlow,
    counters::{BackendStats, Counter, ListenerStats},
    flow::{AddrBe, FAMILY_V4},
    maps::{self, ring_base},
    AclKey, Backend, ConnEntry, FlowKey, GlobalConfig, VipKey, VipMeta,
};
use tracing::{debug, info, warn};

use crate::{config, gc, plan::Plan};

pub mod conntrack;

/// How long a CPU's flow-cache copy of a conntrack entry serves packets before the entry is
/// looked up again. Short next to every timeout (the entry's timestamp is refreshed at most
/// once a second anyway), long next to a stream's packet gaps: a stream pays one conntrack
/// lookup per CPU per window.
pub const FLOW_CACHE_WINDOW: Duration = Duration::from_millis(50);

/// `d` in the datapath's jiffies, rounded up.
fn jiffies_in(clock: &crate::clock::Clock, d: Duration) -> u32 {
    d.as_nanos()
        .div_ceil(u128::from(clock.ns_per_jiffy.max(1)))
        .try_into()
        .unwrap_or(u32::MAX)
}

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
    #[error("counting the CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("map {map}: batch update: {source}")]
    Batch {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("parsing the XDP object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataplaneError {
    /// A map lookup found no such key.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            DataplaneError::Map {
                source: aya::maps::MapError::KeyNotFound,
                ..
            }
        )
    }
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
    /// Written into `global` with each plan.
    clock: crate::clock::Clock,
    /// `GlobalConfig::flow_gen`: bumped after conntrack entries are deleted or written.
    flow_gen: u32,
    /// `GlobalConfig::flow_cache_jiffies` (0: the flow cache is off).
    flow_cache_jiffies: u32,
    counters: PerCpuArray<MapData, u64>,
    listener_stats: PerCpuArray<MapData, ListenerStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    conntrack: conntrack::Table,
    /// TCP flows until the client completes the handshake (the datapath then moves them to
    /// `conntrack`).
    conntrack_syn: conntrack::Table,
    acl_allow: LpmTrie<MapData, AclKey, u8>,
    acl_deny: LpmTrie<MapData, AclKey, u8>,
    backend_active: Array<MapData, u64>,
    flow_cache: PerCpuArray<MapData, CachedFlow>,
    links: Vec<(String, XdpLinkId)>,
    /// Where maps and links are pinned (`None`: nothing is, as in tests and benchmarks).
    pins: Option<PathBuf>,
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
        let btf = Btf::from_sys_fs().ok();
        Self::load_with(EbpfLoader::new().btf(btf.as_ref()), None)
    }

    /// Loads the program on the maps pinned in `pins`, creating and pinning the missing ones:
    /// a restarted or upgraded agent keeps the conntrack table, counters and tables of the
    /// one before. Pins whose layout no longer matches the program are replaced (and said so).
    /// `fresh` unpins everything first (links too, which detaches them).
    pub fn open(pins: &Path, fresh: bool) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        if fresh {
            remove_pins(pins)?;
        }
        let obj = aya_obj::Object::parse(OBJECT)?;
        let btf = Btf::from_sys_fs().ok();
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref());
        let mut adopted = 0;
        for (name, def) in &obj.maps {
            // Sections such as .rodata are the program's own data, filled in at load.
            if name.starts_with('.') {
                continue;
            }
            let path = pins.join(name);
            if let Ok(info) = MapInfo::from_pin(&path) {
                let same = (info.key_size(), info.value_size(), info.max_entries())
                    == (def.key_size(), def.value_size(), def.max_entries());
                if same {
                    adopted += 1;
                } else {
                    warn!(map = %name, "pinned map has another layout (an upgrade changed it): starting it empty");
                    std::fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
            loader.map_pin_path(name.as_str(), path);
        }
        let dp = Self::load_with(&mut loader, Some(pins.to_path_buf()))?;
        info!(pins = %pins.display(), adopted, "dataplane maps opened");
        Ok(dp)
    }

    /// The object through `loader` (the callers checked it was built).
    fn load_with(loader: &mut EbpfLoader, pins: Option<PathBuf>) -> Result<Self, DataplaneError> {
        let mut ebpf = loader.load(OBJECT)?;
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROG_LB)
            .ok_or(DataplaneError::Missing(maps::PROG_LB))?
            .try_into()?;
        prog.load()?;
        // The full pipeline, which the attached program's fast path hands the rest to. An
        // adopted (pinned) array then serves a still-attached earlier program too: both on
        // the same maps.
        let full: &mut Xdp = ebpf
            .program_mut(maps::PROG_FULL)
            .ok_or(DataplaneError::Missing(maps::PROG_FULL))?
            .try_into()?;
        full.load()?;
        let full = full.fd()?.try_clone().map_err(ProgramError::from)?;
        ProgramArray::try_from(
            ebpf.map_mut(maps::PIPELINE)
                .ok_or(DataplaneError::Missing(maps::PIPELINE))?,
        )
        .and_then(|mut a| a.set(0, &full, 0))
        .map_err(map_err(maps::PIPELINE))?;
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
        let backend_stats = PerCpuArray::try_from(take(maps::BACKEND_STATS)?)
            .map_err(map_err(maps::BACKEND_STATS))?;
        let conntrack = conntrack::Table::new(
            (maps::CONNTRACK, take(maps::CONNTRACK)?),
            (maps::CONNTRACK6, take(maps::CONNTRACK6)?),
        )?;
        let conntrack_syn = conntrack::Table::new(
            (maps::CONNTRACK_SYN, take(maps::CONNTRACK_SYN)?),
            (maps::CONNTRACK6_SYN, take(maps::CONNTRACK6_SYN)?),
        )?;
        let acl_allow =
            LpmTrie::try_from(take(maps::ACL_ALLOW)?).map_err(map_err(maps::ACL_ALLOW))?;
        let acl_deny = LpmTrie::try_from(take(maps::ACL_DENY)?).map_err(map_err(maps::ACL_DENY))?;
        let backend_active =
            Array::try_from(take(maps::BACKEND_ACTIVE)?).map_err(map_err(maps::BACKEND_ACTIVE))?;
        let flow_cache =
            PerCpuArray::try_from(take(maps::FLOW_CACHE)?).map_err(map_err(maps::FLOW_CACHE))?;
        let mut dp = Self {
            ebpf,
            vips,
            backends,
            ring,
            snat_addrs,
            global,
            counters,
            listener_stats,
            backend_stats,
            conntrack,
            conntrack_syn,
            acl_allow,
            acl_deny,
            backend_active,
            flow_cache,
            clock: crate::clock::Clock::default(),
            flow_gen: 0,
            flow_cache_jiffies: 0,
            links: Vec::new(),
            pins,
        };
        let first = dp.read_clock()?;
        dp.clock = crate::clock::Clock::calibrate(first, || {
            std::thread::sleep(crate::clock::SECOND_READING_AFTER);
            dp.read_clock()
        })?;
        debug!(clock = ?dp.clock, "datapath clock calibrated");
        dp.flow_cache_jiffies = jiffies_in(&dp.clock, FLOW_CACHE_WINDOW);
        // An adopted GLOBAL carries the generation the CPUs' (adopted) flow caches were
        // checked against: it only moves forward.
        dp.flow_gen = dp.global.get(&0, 0).map_or(0, |g| g.flow_gen);
        Ok(dp)
    }

    /// Both clocks at one instant, read by the `lb_clock` program (see `clock`).
    fn read_clock(&mut self) -> Result<crate::clock::Reading, DataplaneError> {
        let prog = self.helper_program(maps::PROG_CLOCK)?;
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        let word =
            |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Ok(crate::clock::Reading {
            jiffies: word(0),
            mono_ns: word(1),
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
        self.helper_program(maps::PROG_BASELINE)
    }

    /// One of the object's never-attached programs, loaded on first use.
    fn helper_program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    /// Attaches to `iface`; `auto` tries native (driver) mode and falls back to generic.
    /// With pins, a link an earlier agent pinned for `iface` is taken over by swapping this
    /// program in atomically (no packet sees the interface without a program; the mode stays
    /// the link's), else the new link is pinned, so the program stays attached when the agent
    /// exits. Returns the mode used, or `"adopted"`.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: config::XdpMode,
    ) -> Result<&'static str, DataplaneError> {
        let pin = self.pins.as_ref().map(|p| link_pin(p, iface));
        if let Some(pin) = pin.as_deref().filter(|p| p.exists()) {
            let link = PinnedLink::from_pin(pin)
                .map_err(|source| DataplaneError::Link {
                    path: pin.into(),
                    source,
                })
                .and_then(|l| {
                    XdpLink::try_from(FdLink::from(l)).map_err(|source| DataplaneError::Link {
                        path: pin.into(),
                        source,
                    })
                });
            match link.map(|l| self.program().attach_to_link(l)) {
                Ok(Ok(id)) => {
                    info!(iface, "XDP program swapped in on the pinned link");
                    self.links.push((iface.to_string(), id));
                    return Ok("adopted");
                }
                // The interface was deleted and created again: its old link is defunct.
                Ok(Err(e)) => {
                    warn!(iface, error = %e, "pinned XDP link not usable, attaching anew")
                }
                Err(e) => warn!(iface, error = %e, "pinned XDP link not usable, attaching anew"),
            }
            unpin(pin)?;
        }
        let tries: &[(XdpMode, &'static str)] = match mode {
            config::XdpMode::Native => &[(XdpMode::Driver, "native")],
            config::XdpMode::Generic => &[(XdpMode::Skb, "generic")],
            config::XdpMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for &(flags, name) in tries {
            match self.program().attach(iface, flags) {
                Ok(id) => {
                    info!(iface, mode = name, "XDP attached");
                    let id = match &pin {
                        Some(pin) => self.pin_link(id, pin)?,
                        None => id,
                    };
                    self.links.push((iface.to_string(), id));
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

    /// Pins the link `id` at `pin` and gives the program back an id for it.
    fn pin_link(&mut self, id: XdpLinkId, pin: &Path) -> Result<XdpLinkId, DataplaneError> {
        let link_err = |source| DataplaneError::Link {
            path: pin.into(),
            source,
        };
        let link = self.program().take_link(id)?;
        let pinned = FdLink::try_from(link)
            .map_err(link_err)?
            .pin(pin)
            .map_err(|e| DataplaneError::Pin {
                path: pin.into(),
                source: std::io::Error::other(e),
            })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        Ok(self.program().attach_to_link(link)?)
    }

    /// Detaches from the interfaces not in `keep` (pinned links are unpinned).
    pub fn detach_others(&mut self, keep: &[String]) -> Result<(), DataplaneError> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(iface, _)| !keep.contains(iface));
        self.links = kept;
        for (iface, link) in gone {
            if let Some(pins) = &self.pins {
                unpin(&link_pin(pins, &iface))?;
            }
            self.program().detach(link)?;
            info!(iface, "XDP detached");
        }
        // Links an earlier agent pinned for interfaces no longer configured.
        if let Some(pins) = self.pins.clone() {
            for (iface, pin) in pinned_links(&pins) {
                if !keep.contains(&iface) {
                    unpin(&pin)?;
                    info!(iface, "XDP detached (pinned by an earlier agent)");
                }
            }
        }
        Ok(())
    }

    /// Writes `plan` into the maps. Each listener's Maglev table goes into the half of its
    /// double buffer that packets are not reading, then the VIP entry flips to it.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        for (i, a) in plan.snat_addrs.iter().enumerate() {
            self.snat_addrs
                .set(i as u32, a, 0)
                .map_err(map_err(maps::SNAT_ADDRS))?;
        }
        let global = GlobalConfig {
            jiffies_base: self.clock.jiffies_base,
            ns_per_jiffy: self.clock.ns_per_jiffy,
            flow_gen: self.flow_gen,
            flow_cache_jiffies: self.flow_cache_jiffies,
            ..plan.global
        };
        self.global
            .set(0, global, 0)
            .map_err(map_err(maps::GLOBAL))?;
        for b in &plan.backends {
            self.backends
                .set(b.id, b.slot, 0)
                .map_err(map_err(maps::BACKENDS))?;
        }
        // The ring slices packets read now: (VIP, listener id, half).
        let mut reading: Vec<(VipKey, u32, u32)> = self
            .vips
            .iter()
            .filter_map(Result::ok)
            .map(|(k, m)| (k, m.listener_id, m.ring_half))
            .collect();
        for l in &plan.listeners {
            let id = l.id;
            // A listener whose id changed (a VIP another listener took over) must not write
            // into the slice another VIP still reads.
            let half = match self.vips.get(&l.key, 0) {
                Ok(old) if old.listener_id == id => old.ring_half ^ 1,
                _ => u32::from(reading.iter().any(|&(_, i, h)| (i, h) == (id, 0))),
            };
            reading.retain(|(k, ..)| *k != l.key);
            reading.push((l.key, id, half));
            // Slots past ring_size are never read, so a shrinking table needs no clearing.
            let base = ring_base(id, half);
            let slots: Vec<u32> = (base..base + l.ring.len() as u32).collect();
            use {aya::maps::IterableMap as _, std::os::fd::AsFd as _};
            crate::batch::update(self.ring.map().fd().as_fd(), &slots, &l.ring).map_err(
                |source| DataplaneError::Batch {
                    map: maps::RING,
                    source,
                },
            )?;
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
            plan.listeners.iter().map(|l| (l.id, &l.allow)),
        )?;
        sync_acl(
            &mut self.acl_deny,
            maps::ACL_DENY,
            plan.listeners.iter().map(|l| (l.id, &l.deny)),
        )?;
        let stale: Vec<VipKey> = self
            .vips
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !plan.listeners.iter().any(|l| l.key == *k))
            .collect();
        for k in &stale {
            self.vips.remove(k).map_err(map_err(maps::VIPS))?;
        }
        if !stale.is_empty() {
            self.purge(&stale)?;
        }
        Ok(())
    }

    /// Deletes the flows (both entries) of VIPs that are no listener any more, so a removed
    /// listener stops forwarding at once. Original entries are keyed client → VIP.
    fn purge(&mut self, gone: &[VipKey]) -> Result<(), DataplaneError> {
        use lb_common::conn::DIR_ORIGINAL;
        let mut flows = 0;
        for table in [&mut self.conntrack, &mut self.conntrack_syn] {
            let doomed: Vec<(FlowKey, FlowKey)> = table
                .walk()
                .into_iter()
                .filter(|(k, e)| {
                    e.dir == DIR_ORIGINAL
                        && gone.iter().any(|v| {
                            (v.addr_be, v.port_be, v.proto, v.family)
                                == (k.dst_be, k.dport_be, k.proto, k.family)
                        })
                })
                .map(|(k, e)| (k, e.pair_key(k.proto, k.family)))
                .collect();
            for (key, pair) in &doomed {
                // Gone already (LRU, the sweep) is fine.
                let _ = table.remove(key);
                let _ = table.remove(pair);
            }
            flows += doomed.len();
        }
        self.flow_cache_stale()?;
        info!(vips = gone.len(), flows, "removed listeners' flows dropped");
        Ok(())
    }

    /// Makes every CPU's flow-cache copies stale (see the datapath's `flowcache`): called
    /// after conntrack entries were deleted or written here, so no packet is forwarded from a
    /// copy of what the table no longer holds.
    fn flow_cache_stale(&mut self) -> Result<(), DataplaneError> {
        self.flow_gen = self.flow_gen.wrapping_add(1);
        self.write_flow_cache_settings()
    }

    /// Sets how long a flow-cache copy serves packets (`None`: the cache is off), for
    /// benchmarks that measure both paths and tests that must not depend on timing.
    pub fn set_flow_cache(&mut self, window: Option<Duration>) -> Result<(), DataplaneError> {
        self.flow_cache_jiffies = window.map_or(0, |w| jiffies_in(&self.clock, w));
        self.write_flow_cache_settings()
    }

    /// Packets forwarded from the CPUs' flow-cache copies since the program was loaded.
    pub fn flow_cache_hits(&self) -> Result<u64, DataplaneError> {
        let mut hits = 0;
        for slot in 0..maps::FLOW_CACHE_SLOTS {
            let per_cpu = self
                .flow_cache
                .get(&slot, 0)
                .map_err(map_err(maps::FLOW_CACHE))?;
            hits += per_cpu.iter().map(|c| c.hits).sum::<u64>();
        }
        Ok(hits)
    }

    /// Writes `flow_gen` and `flow_cache_jiffies` into GLOBAL, the rest as it is.
    fn write_flow_cache_settings(&mut self) -> Result<(), DataplaneError> {
        let mut g = self.global.get(&0, 0).map_err(map_err(maps::GLOBAL))?;
        g.flow_gen = self.flow_gen;
        g.flow_cache_jiffies = self.flow_cache_jiffies;
        self.global.set(0, g, 0).map_err(map_err(maps::GLOBAL))
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
        s.listeners = totals(&self.listener_stats, maps::LISTENER_STATS, listeners)?;
        Ok(s)
    }

    /// Per-backend traffic totals over all CPUs, indexed by backend id.
    pub fn backend_stats(&self, backends: usize) -> Result<Vec<BackendStats>, DataplaneError> {
        totals(&self.backend_stats, maps::BACKEND_STATS, backends)
    }

    /// Zeroes the traffic counters of listener and backend ids on every CPU (ids given to a
    /// new listener or backend, which must not inherit a removed one's figures).
    pub fn clear_counters(
        &mut self,
        listeners: &[u32],
        backends: &[u32],
    ) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        for (map, ids, name) in [
            (&mut self.listener_stats, listeners, maps::LISTENER_STATS),
            (&mut self.backend_stats, backends, maps::BACKEND_STATS),
        ] {
            for &id in ids {
                let zero = aya::maps::PerCpuValues::try_from(vec![ListenerStats::default(); cpus])
                    .map_err(DataplaneError::Cpus)?;
                map.set(id, zero, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// Writes one conntrack entry (state restore, benchmarks).
    pub fn conntrack_insert(
        &mut self,
        key: FlowKey,
        entry: ConnEntry,
    ) -> Result<(), DataplaneError> {
        self.conntrack.insert(key, entry, 0)?;
        self.flow_cache_stale()
    }

    /// The established (false) or handshake (true) conntrack table, for tests. The CPUs'
    /// flow-cache copies are made stale first; with no packet in flight meanwhile (as in a
    /// test), none is taken of what the caller then changes.
    pub fn conntrack_table(&mut self, handshake: bool) -> &mut conntrack::Table {
        if let Err(e) = self.flow_cache_stale() {
            warn!(error = %e, "flow cache not invalidated");
        }
        if handshake {
            &mut self.conntrack_syn
        } else {
            &mut self.conntrack
        }
    }

    /// Conntrack entries (both directions, both tables), for tests and diagnostics.
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, ConnEntry)> {
        let mut all = self.conntrack.walk();
        all.extend(self.conntrack_syn.walk());
        all
    }
}

impl Dataplane {
    /// Deletes flows idle for longer than their state allows (`gc::timeout`), both entries at
    /// once, which frees their SNAT port. A flow's idle time is that of its more recent
    /// direction; an entry whose pair is gone (LRU eviction) is judged alone. `now_ns` is
    /// `gc::monotonic_ns()` in production.
    pub fn gc(&mut self, plan: &Plan, now_ns: u64) -> Result<gc::Report, DataplaneError> {
        let mut report = gc::Report {
            active: vec![0; plan.listener_slots()],
            backend_active: vec![0; plan.backend_slots()],
            ..Default::default()
        };
        let mut resets = Vec::new();
        let mut snat = gc::SnatCount::new(&plan.snat_addrs);
        // A flow's two entries are always in the same table. `gc::TABLES`' order: established
        // (IPv4, IPv6), then handshake.
        for (first, table) in [(0, &mut self.conntrack), (2, &mut self.conntrack_syn)] {
            sweep(
                table,
                first,
                plan,
                now_ns,
                &mut report,
                &mut snat,
                &mut resets,
            );
        }
        report.snat = snat.finish();
        if report.expired > 0 {
            self.flow_cache_stale()?;
        }
        if !resets.is_empty() {
            match crate::reset::send(&resets) {
                Ok(n) => report.resets = n,
                Err(e) => warn!(error = %e, "sending idle-timeout resets"),
            }
        }
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

/// The first `n` entries of a per-CPU traffic map, each summed over the CPUs.
fn totals(
    map: &PerCpuArray<MapData, ListenerStats>,
    name: &'static str,
    n: usize,
) -> Result<Vec<ListenerStats>, DataplaneError> {
    (0..n as u32)
        .map(|id| {
            let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
            let mut total = ListenerStats::default();
            per_cpu.iter().for_each(|x| total.add(x));
            Ok(total)
        })
        .collect()
}

/// One conntrack table's part of [`Dataplane::gc`], added to `report` (its IPv4 map counted
/// at `gc::TABLES[first]`, its IPv6 map next); SNAT ports are counted into `snat`, and
/// idle-timeout RSTs to send collected in `resets`.
///
/// The table streams past once (nothing of it is kept: a full one is hundreds of MiB); only
/// entries idle beyond their own state's timeout are kept, and each looks its pair up. That
/// finds every expired flow: a flow is judged from its original entry (an orphan reply alone),
/// with that entry's state and the more recent of the two directions' times, so an original
/// that is not idle by its own time is not idle by the pair's either.
fn sweep(
    table: &mut conntrack::Table,
    first: usize,
    plan: &Plan,
    now_ns: u64,
    report: &mut gc::Report,
    snat: &mut gc::SnatCount,
    resets: &mut Vec<crate::reset::Reset>,
) {
    use lb_common::conn::{DIR_ORIGINAL, STATE_CLOSED, STATE_CLOSING};
    // Idle timeouts by listener id (ids are stable names, not positions in the plan).
    let mut idle_by_id = vec![gc::UNKNOWN_LISTENER_IDLE; plan.listener_slots()];
    for l in &plan.listeners {
        idle_by_id[l.id as usize] = l.idle_timeout;
    }
    let limit = |e: &ConnEntry| {
        let idle = idle_by_id
            .get(e.listener_id as usize)
            .copied()
            .unwrap_or(gc::UNKNOWN_LISTENER_IDLE);
        gc::timeout(e.state, idle).as_nanos() as u64
    };
    // Live flows, counted from their original entries; those found expired are taken back.
    let count = |report: &mut gc::Report, e: &ConnEntry, n: i64| {
        if e.dir == DIR_ORIGINAL && e.state != STATE_CLOSING && e.state != STATE_CLOSED {
            if let Some(c) = report.active.get_mut(e.listener_id as usize) {
                *c = c.saturating_add_signed(n);
            }
            if let Some(c) = report.backend_active.get_mut(e.backend_id as usize) {
                *c = c.saturating_add_signed(n);
            }
        }
    };
    let mut idle = Vec::new();
    table.for_each(|key, e| {
        report.entries += 1;
        report.tables[first + usize::from(key.family != FAMILY_V4)] += 1;
        snat.add(&key, &e);
        count(report, &e, 1);
        if now_ns.saturating_sub(e.last_seen_ns) > limit(&e) {
            idle.push((key, e));
        }
    });
    let mut doomed = Vec::new();
    for (key, e) in idle {
        let pair_key = e.pair_key(key.proto, key.family);
        let pair = match table.get(&pair_key) {
            Ok(p) => Some(p),
            Err(err) if err.is_not_found() => None,
            // Unknown: the flow waits for the next sweep rather than being judged half-seen.
            Err(err) => {
                debug!(error = %err, "conntrack pair lookup");
                continue;
            }
        };
        // Each flow is judged once: from its original entry, or from an orphan reply.
        if e.dir != DIR_ORIGINAL && pair.is_some() {
            continue;
        }
        let last = pair.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
        if now_ns.saturating_sub(last) <= limit(&e) {
            continue;
        }
        doomed.push(key);
        if let Some(pair) = pair {
            doomed.push(pair_key);
            resets.extend(crate::reset::for_flow(&key, &e, &pair_key, &pair));
        }
        report.expired += 1;
        count(report, &e, -1);
    }
    for key in doomed {
        // Already gone (LRU eviction, or the datapath re-created it) is fine.
        let _ = table.remove(&key);
    }
}

/// Makes an ACL trie hold exactly the plan's prefixes (each list with its listener's id):
/// new ones are inserted before stale ones go, so a list never passes through empty.
fn sync_acl<'a>(
    trie: &mut LpmTrie<MapData, AclKey, u8>,
    name: &'static str,
    lists: impl Iterator<Item = (u32, &'a Vec<(u32, AddrBe)>)>,
) -> Result<(), DataplaneError> {
    let mut wanted = Vec::new();
    for (listener_id, list) in lists {
        for &(prefix, addr_be) in list {
            wanted.push((
                32 + prefix,
                AclKey {
                    listener_id,
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

/// Unpinned links detach when the agent drops them; pinned ones stay (see `attach`).
fn link_pin(pins: &Path, iface: &str) -> PathBuf {
    pins.join(format!("link_{iface}"))
}

/// The links pinned in `pins`, by interface.
fn pinned_links(pins: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(pins)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((name.strip_prefix("link_")?.to_string(), e.path()))
        })
        .collect()
}

/// Removes a pin (a map's or a link's: the last reference to a link detaches it).
fn unpin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataplaneError::Pin {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether any link pinned in `pins` is still attached to an interface. Links of a deleted
/// network namespace lose their interface but live on (holding program and maps) while
/// pinned: `false` tells their state may go.
pub fn attached(pins: &Path) -> bool {
    pinned_links(pins)
        .iter()
        .any(|(_, pin)| link_ifindex(pin).is_none_or(|i| i != 0))
}

/// The interface an XDP link is attached to (0: none any more), by `BPF_OBJ_GET` and
/// `BPF_OBJ_GET_INFO_BY_FD` (aya 0.14 does not expose a link's interface).
fn link_ifindex(pin: &Path) -> Option<u32> {
    use aya_obj::generated::bpf_cmd::{BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD};
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).ok()?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `get` (a valid C string pointer) and returns a new fd.
    let fd = unsafe { crate::sys_bpf::bpf(BPF_OBJ_GET, &mut get) }.ok()?;
    // SAFETY: the syscall just returned this fd; the OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: all-zero is a valid bpf_link_info (plain integers and unions of them).
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`.
    unsafe { crate::sys_bpf::bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.ok()?;
    // SAFETY: an XDP link's info fills the union's `xdp` member.
    Some(unsafe { info.__bindgen_anon_1.xdp.ifindex })
}

/// Unpins everything in `pins`: links first (which detaches the program from every
/// interface), then the maps. The directory itself stays.
pub fn remove_pins(pins: &Path) -> Result<(), DataplaneError> {
    let links = pinned_links(pins);
    for (iface, pin) in &links {
        unpin(pin)?;
        info!(iface, "XDP detached");
    }
    for entry in std::fs::read_dir(pins).into_iter().flatten().flatten() {
        unpin(&entry.path())?;
    }
    Ok(())
}
