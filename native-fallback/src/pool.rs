//! The pool of prepared sandboxes, sized by demand: a new sandbox is a hand-over of one that
//! is already prepared (namespaces, control group, root, init running), and the pool is
//! refilled in the background.
//!
//! The demand is the rate of sandboxes taken (see [`soulbox_runtime::demand`]). The pool
//! keeps half a second of that demand ready, within
//! [`NativeConfig::pool_min`](crate::NativeConfig) and `pool_max`: it grows
//! under load, shrinks back to the minimum when idle, and does not grow while the host has
//! less than [`NativeConfig::pool_min_free_memory_bytes`](crate::NativeConfig) available
//! (running sandboxes come first).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use soulbox_runtime::demand::{Demand, PoolStats};

use crate::sandbox::PreparedSandbox;

/// How often the pool is looked after when nothing is taken.
pub(crate) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// Sandboxes prepared at once when the pool is short.
pub(crate) const PARALLEL_PREPARES: usize = 2;

/// Prepared sandboxes and the demand for them.
#[derive(Debug)]
pub(crate) struct Pool {
    min: usize,
    max: usize,
    ready: Mutex<VecDeque<PreparedSandbox>>,
    demand: Mutex<Demand>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Pool {
    pub(crate) fn new(min: usize, max: usize) -> Self {
        Self {
            min: min.min(max),
            max,
            ready: Mutex::default(),
            demand: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether the pool keeps anything at all.
    pub(crate) fn enabled(&self) -> bool {
        self.max > 0
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<PreparedSandbox>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A prepared sandbox for a start, if one waits; counts the demand, the hit or the miss.
    pub(crate) fn take(&self) -> Option<PreparedSandbox> {
        self.demand.lock().unwrap_or_else(PoisonError::into_inner).record(Instant::now());
        let taken = self.lock().pop_front();
        let counter = if taken.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        taken
    }

    /// Puts a freshly prepared sandbox in.
    pub(crate) fn put(&self, prepared: PreparedSandbox) {
        self.lock().push_back(prepared);
    }

    /// How many sandboxes the pool should hold now.
    pub(crate) fn target(&self) -> usize {
        let demand = self.demand.lock().unwrap_or_else(PoisonError::into_inner);
        demand.target(Instant::now(), self.min, self.max)
    }

    /// Takes out the sandboxes beyond the target (the oldest first), to be torn down.
    pub(crate) fn surplus(&self) -> Vec<PreparedSandbox> {
        let target = self.target();
        let mut ready = self.lock();
        let extra = ready.len().saturating_sub(target);
        ready.drain(..extra).collect()
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let demand = *self.demand.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        PoolStats {
            ready: self.lock().len(),
            target: demand.target(now, self.min, self.max),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            demand_per_sec: demand.rate(now),
        }
    }
}
