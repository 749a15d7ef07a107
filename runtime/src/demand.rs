//! The demand for prepared things (native sandboxes, warm kernels), and how many to keep
//! ready for it: a pool keeps [`LEAD_TIME`] of the recent rate of takes ready, within its
//! minimum and maximum, so that it grows under load and shrinks back when idle.

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
