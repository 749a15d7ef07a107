//! The pool of prepared sandboxes, sized by demand: a new sandbox is a hand-over of one that
//! is already prepared (namespaces, control group, root, init running), and the pool is
//! refilled in the background.
//!
//! The demand is the rate of sandboxes taken, an exponentially decaying average over about
//! [`DEMAND_WINDOW`]. The pool keeps [`LEAD_TIME`] of that demand ready, within
//! [`NativeConfig::pool_min`] and [`NativeConfig::pool_max`](crate::NativeConfig): it grows
//! under load, shrinks back to the minimum when idle, and does not grow while the host has
//! less than [`NativeConfig::pool_min_free_memory_bytes`](crate::NativeConfig) available
//! (running sandboxes come first).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::sandbox::PreparedSandbox;

/// The span over which demand is averaged.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(2);
/// How much demand the pool keeps ready.
pub const LEAD_TIME: Duration = Duration::from_millis(500);
/// How often the pool is looked after when nothing is taken.
pub(crate) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// Sandboxes prepared at once when the pool is short.
pub(crate) const PARALLEL_PREPARES: usize = 2;

/// The pool's state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Prepared sandboxes waiting.
    pub ready: usize,
    /// How many the pool aims to keep now.
    pub target: usize,
    /// Starts served from the pool.
    pub hits: u64,
    /// Starts that had to prepare a sandbox first.
    pub misses: u64,
    /// The demand now, in sandboxes per second.
    pub demand_per_sec: f64,
}

/// A rate of events that decays exponentially.
#[derive(Debug)]
struct Demand {
    per_sec: f64,
    at: Instant,
}

impl Demand {
    fn rate(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.per_sec * (-elapsed / DEMAND_WINDOW.as_secs_f64()).exp()
    }

    fn record(&mut self, now: Instant) {
        self.per_sec = self.rate(now) + 1.0 / DEMAND_WINDOW.as_secs_f64();
        self.at = now;
    }
}

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
            demand: Mutex::new(Demand { per_sec: 0.0, at: Instant::now() }),
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
        let rate = self.demand.lock().unwrap_or_else(PoisonError::into_inner).rate(Instant::now());
        target_for(rate, self.min, self.max)
    }

    /// Takes out the sandboxes beyond the target (the oldest first), to be torn down.
    pub(crate) fn surplus(&self) -> Vec<PreparedSandbox> {
        let target = self.target();
        let mut ready = self.lock();
        let extra = ready.len().saturating_sub(target);
        ready.drain(..extra).collect()
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let rate = self.demand.lock().unwrap_or_else(PoisonError::into_inner).rate(Instant::now());
        PoolStats {
            ready: self.lock().len(),
            target: target_for(rate, self.min, self.max),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            demand_per_sec: rate,
        }
    }
}

/// [`LEAD_TIME`] of a demand of `rate` per second, within `min..=max`.
fn target_for(rate: f64, min: usize, max: usize) -> usize {
    let wanted = rate * LEAD_TIME.as_secs_f64();
    (min..max).find(|&n| n as f64 >= wanted).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_demand_within_its_bounds() {
        assert_eq!(target_for(0.0, 1, 16), 1, "idle: the minimum");
        assert_eq!(target_for(10.0, 1, 16), 5, "half a second of 10/s");
        assert_eq!(target_for(1000.0, 1, 16), 16, "capped");
        assert_eq!(target_for(50.0, 0, 0), 0, "a disabled pool");
    }

    #[test]
    fn demand_rises_with_takes_and_decays_when_idle() {
        let start = Instant::now();
        let mut demand = Demand { per_sec: 0.0, at: start };
        // 100 takes over one second: after half a two-second window, the average has caught
        // up with 1 - e^-0.5 (39%) of the true 100/s.
        for i in 0..100 {
            demand.record(start + Duration::from_millis(i * 10));
        }
        let busy = demand.rate(start + Duration::from_secs(1));
        assert!((35.0..45.0).contains(&busy), "{busy}");
        let idle = demand.rate(start + Duration::from_secs(7));
        assert!(idle < busy / 15.0, "three windows later: {idle}");
    }
}
