//! Pools of prepared things (native sandboxes, warm kernels) sized by the demand for them: a
//! [`Pool`] keeps [`LEAD_TIME`] of the recent rate of takes ready, within its minimum and
//! maximum, so that it grows under load and shrinks back when idle. Its owner fills it (what
//! [`Pool::missing`] says) and tears down what [`Pool::surplus`] hands back.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The span over which demand is averaged.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(2);
/// How much demand a pool keeps ready.
pub const LEAD_TIME: Duration = Duration::from_millis(500);

/// A pool's state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Prepared things waiting.
    pub ready: usize,
    /// How many the pool aims to keep now.
    pub target: usize,
    /// Takes served from the pool.
    pub hits: u64,
    /// Takes that found it empty.
    pub misses: u64,
    /// The demand now, in takes per second.
    pub demand_per_sec: f64,
}

/// A rate of takes, an exponentially decaying average over about [`DEMAND_WINDOW`].
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    per_sec: f64,
    at: Instant,
}

impl Default for Demand {
    fn default() -> Self {
        Self { per_sec: 0.0, at: Instant::now() }
    }
}

impl Demand {
    /// The rate at `now`, in takes per second.
    pub fn rate(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.per_sec * (-elapsed / DEMAND_WINDOW.as_secs_f64()).exp()
    }

    /// Counts a take at `now`.
    pub fn record(&mut self, now: Instant) {
        self.per_sec = self.rate(now) + 1.0 / DEMAND_WINDOW.as_secs_f64();
        self.at = now;
    }

    /// How many a pool between `min` and `max` should hold at `now`.
    pub fn target(&self, now: Instant, min: usize, max: usize) -> usize {
        let wanted = self.rate(now) * LEAD_TIME.as_secs_f64();
        (min.min(max)..max).find(|&n| n as f64 >= wanted).unwrap_or(max)
    }
}

/// Prepared things of one kind, and the demand for them.
#[derive(Debug)]
pub struct Pool<T> {
    min: usize,
    max: usize,
    state: Mutex<PoolState<T>>,
}

#[derive(Debug)]
struct PoolState<T> {
    ready: VecDeque<T>,
    demand: Demand,
    hits: u64,
    misses: u64,
}

impl<T> Pool<T> {
    /// A pool keeping between `min` and `max` ready (none when `max` is 0).
    pub fn new(min: usize, max: usize) -> Self {
        let state =
            PoolState { ready: VecDeque::new(), demand: Demand::default(), hits: 0, misses: 0 };
        Self { min: min.min(max), max, state: Mutex::new(state) }
    }

    /// Whether the pool keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    fn lock(&self) -> MutexGuard<'_, PoolState<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One ready thing, if one waits; counts the demand, the hit or the miss.
    pub fn take(&self) -> Option<T> {
        let mut state = self.lock();
        state.demand.record(Instant::now());
        let taken = state.ready.pop_front();
        if taken.is_some() {
            state.hits += 1;
        } else {
            state.misses += 1;
        }
        taken
    }

    /// Puts a freshly prepared thing in.
    pub fn put(&self, prepared: T) {
        self.lock().ready.push_back(prepared);
    }

    /// How many are ready.
    pub fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// How many the pool lacks to reach its target now.
    pub fn missing(&self) -> usize {
        let state = self.lock();
        state.demand.target(Instant::now(), self.min, self.max).saturating_sub(state.ready.len())
    }

    /// Takes out (for the caller to tear down) those beyond the target now, the oldest first.
    pub fn surplus(&self) -> Vec<T> {
        let mut state = self.lock();
        let target = state.demand.target(Instant::now(), self.min, self.max);
        let extra = state.ready.len().saturating_sub(target);
        state.ready.drain(..extra).collect()
    }

    /// Its state, for metrics.
    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        let now = Instant::now();
        PoolStats {
            ready: state.ready.len(),
            target: state.demand.target(now, self.min, self.max),
            hits: state.hits,
            misses: state.misses,
            demand_per_sec: state.demand.rate(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_demand_within_its_bounds() {
        let start = Instant::now();
        let mut demand = Demand { per_sec: 0.0, at: start };
        assert_eq!(demand.target(start, 1, 16), 1, "idle: the minimum");
        demand.per_sec = 10.0;
        assert_eq!(demand.target(start, 1, 16), 5, "half a second of 10/s");
        demand.per_sec = 1000.0;
        assert_eq!(demand.target(start, 1, 16), 16, "capped");
        assert_eq!(demand.target(start, 0, 0), 0, "a disabled pool");
    }

    #[test]
    fn a_pool_counts_hits_and_misses_and_trims_to_its_target() {
        let pool = Pool::new(1, 4);
        assert_eq!(pool.missing(), 1, "idle: the minimum");
        assert_eq!(pool.take(), None::<u32>);
        for n in 0..3 {
            pool.put(n);
        }
        assert_eq!(pool.take(), Some(0), "the oldest first");
        let stats = pool.stats();
        assert_eq!((stats.ready, stats.hits, stats.misses), (2, 1, 1));
        assert!(stats.demand_per_sec > 0.0 && stats.target >= 1, "{stats:?}");
        // Two takes at a rate under a take per half-second leave a target of one or two:
        // what is beyond it comes back, the oldest first.
        let surplus = pool.surplus();
        assert_eq!(pool.ready() + surplus.len(), 2);
        assert_eq!(surplus.first().copied().unwrap_or(2), 1, "{surplus:?}");
        assert!(!Pool::<u32>::new(0, 0).enabled());
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
