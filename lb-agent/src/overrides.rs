//! Weight and drain changes made at run time (the admin API's `POST /backends/...`), on top of
//! the config. The main loop owns the one instance: the plan takes L4 weights from it
//! (`plan::build_with`) and [`Overrides::apply_to`] hands them to the health members the L7
//! pools and the status read. They last until the config is reloaded, which clears them.

#[cfg(test)]
mod tests;

use std::{collections::HashMap, net::SocketAddr};

use crate::{
    config::{Config, MAX_WEIGHT},
    health::Health,
};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("no pool `{0}`")]
    NoPool(String),
    #[error("pool `{pool}` has no backend {backend}")]
    NoBackend { pool: String, backend: SocketAddr },
    #[error("weight {0} is out of range 0-{MAX_WEIGHT}")]
    Weight(u32),
}

/// What changed for one backend of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Override {
    /// Replaces the configured weight.
    pub weight: Option<u32>,
    /// No new flows or requests; established ones continue.
    pub drained: bool,
}

/// One change requested through the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Weight(u32),
    /// `true` drains, `false` undoes a drain.
    Drain(bool),
}

/// Overrides by pool name, then backend address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides(HashMap<String, HashMap<SocketAddr, Override>>);

impl Overrides {
    pub fn get(&self, pool: &str, backend: SocketAddr) -> Override {
        self.0
            .get(pool)
            .and_then(|p| p.get(&backend))
            .copied()
            .unwrap_or_default()
    }

    /// The weight new flows and requests see: 0 while drained, else the override or
    /// `configured`.
    pub fn weight(&self, pool: &str, backend: SocketAddr, configured: u32) -> u32 {
        let o = self.get(pool, backend);
        if o.drained {
            0
        } else {
            o.weight.unwrap_or(configured)
        }
    }

    /// Records `change` for a backend `cfg` has.
    pub fn set(
        &mut self,
        cfg: &Config,
        pool: &str,
        backend: SocketAddr,
        change: Change,
    ) -> Result<(), OverrideError> {
        let def = cfg
            .pools
            .iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| OverrideError::NoPool(pool.into()))?;
        if !def
            .backends
            .iter()
            .any(|b| SocketAddr::new(b.address, b.port.0) == backend)
        {
            return Err(OverrideError::NoBackend {
                pool: pool.into(),
                backend,
            });
        }
        if let Change::Weight(w) = change {
            if w > MAX_WEIGHT {
                return Err(OverrideError::Weight(w));
            }
        }
        let entry = self
            .0
            .entry(pool.into())
            .or_default()
            .entry(backend)
            .or_default();
        match change {
            Change::Weight(w) => entry.weight = Some(w),
            Change::Drain(d) => entry.drained = d,
        }
        Ok(())
    }

    /// Back to the config's weights (on reload).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Gives every health member its effective weight: the L7 pools pick by it and the status
    /// shows it.
    pub fn apply_to(&self, health: &Health) {
        for m in health.members() {
            m.set_weight_now(self.weight(&m.pool, m.addr, m.weight));
        }
    }
}
