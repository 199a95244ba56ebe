//! One conntrack table (the handshake or the established one) as the agent sees it. The
//! datapath keeps IPv4 flows in a map keyed by the 16-byte `FlowKey4` and IPv6 flows in one
//! keyed by `FlowKey` (a shorter key is a cheaper kernel lookup); here both are read and
//! written with `FlowKey`s.

use std::os::fd::AsFd as _;

use aya::{
    maps::{HashMap, IterableMap as _, Map, MapData},
    Pod,
};
use lb_common::{flow::FAMILY_V4, ConnEntry, FlowKey, FlowKey4};
use tracing::debug;

use super::{map_err, DataplaneError};

pub struct Table {
    v4: HashMap<MapData, FlowKey4, ConnEntry>,
    v6: HashMap<MapData, FlowKey, ConnEntry>,
    /// The maps' names, IPv4 first, for errors.
    names: [&'static str; 2],
}

impl Table {
    pub(super) fn new(
        v4: (&'static str, Map),
        v6: (&'static str, Map),
    ) -> Result<Self, DataplaneError> {
        Ok(Table {
            v4: HashMap::try_from(v4.1).map_err(map_err(v4.0))?,
            v6: HashMap::try_from(v6.1).map_err(map_err(v6.0))?,
            names: [v4.0, v6.0],
        })
    }

    fn name(&self, key: &FlowKey) -> &'static str {
        self.names[usize::from(key.family != FAMILY_V4)]
    }

    pub fn get(&self, key: &FlowKey) -> Result<ConnEntry, DataplaneError> {
        if key.family == FAMILY_V4 {
            self.v4.get(&key.v4(), 0)
        } else {
            self.v6.get(key, 0)
        }
        .map_err(map_err(self.name(key)))
    }

    pub fn insert(
        &mut self,
        key: FlowKey,
        entry: ConnEntry,
        flags: u64,
    ) -> Result<(), DataplaneError> {
        let name = self.name(&key);
        if key.family == FAMILY_V4 {
            self.v4.insert(key.v4(), entry, flags)
        } else {
            self.v6.insert(key, entry, flags)
        }
        .map_err(map_err(name))
    }

    pub fn remove(&mut self, key: &FlowKey) -> Result<(), DataplaneError> {
        let name = self.name(key);
        if key.family == FAMILY_V4 {
            self.v4.remove(&key.v4())
        } else {
            self.v6.remove(key)
        }
        .map_err(map_err(name))
    }

    /// `f` on every entry, read with batch lookups (see `batch`). A map whose batch read fails
    /// is walked key by key instead, so `f` may see some of its entries twice.
    pub fn for_each(&self, mut f: impl FnMut(FlowKey, ConnEntry)) {
        read(self.names[0], &self.v4, FlowKey4::widen, &mut f);
        read(self.names[1], &self.v6, |k| *k, &mut f);
    }

    /// Every entry, read with batch lookups only (the sweep's read, for tests).
    pub fn batched(&self) -> std::io::Result<Vec<(FlowKey, ConnEntry)>> {
        let mut out = Vec::new();
        batch(&self.v4, FlowKey4::widen, |k, v| out.push((k, v)))?;
        batch(&self.v6, |k| *k, |k, v| out.push((k, v)))?;
        Ok(out)
    }

    /// Every entry, read key by key (two syscalls per entry: for tests and diagnostics).
    pub fn walk(&self) -> Vec<(FlowKey, ConnEntry)> {
        let mut out = Vec::new();
        walk(&self.v4, FlowKey4::widen, |k, v| out.push((k, v)));
        walk(&self.v6, |k| *k, |k, v| out.push((k, v)));
        out
    }
}

fn read<K: Pod>(
    name: &str,
    map: &HashMap<MapData, K, ConnEntry>,
    widen: impl Fn(&K) -> FlowKey,
    mut f: impl FnMut(FlowKey, ConnEntry),
) {
    if let Err(e) = batch(map, &widen, &mut f) {
        debug!(map = name, error = %e, "batch read failed; reading entry by entry");
        walk(map, widen, f);
    }
}

fn batch<K: Pod>(
    map: &HashMap<MapData, K, ConnEntry>,
    widen: impl Fn(&K) -> FlowKey,
    mut f: impl FnMut(FlowKey, ConnEntry),
) -> std::io::Result<()> {
    crate::batch::for_each(map.map().fd().as_fd(), |k: K, v| f(widen(&k), v))
}

fn walk<K: Pod>(
    map: &HashMap<MapData, K, ConnEntry>,
    widen: impl Fn(&K) -> FlowKey,
    mut f: impl FnMut(FlowKey, ConnEntry),
) {
    for (k, v) in map.iter().filter_map(Result::ok) {
        f(widen(&k), v);
    }
}
