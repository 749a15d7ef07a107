//! Admission control: what keeps the server standing under any load. New work is admitted
//! only within limits, and refused with a status and a `Retry-After` beyond them, before it
//! takes memory or descriptors:
//!
//! - **Live sandboxes**, in all and per team (a team's quota may lower its own): a create past
//!   them is refused at once with 429. The count and the create happen under one lock, so
//!   concurrent creates cannot pass a limit together.
//! - **Concurrent executions** (cells, commands being started, `/v1/run`), in all and per
//!   team: past them a request waits in line up to [`AdmissionConfig::queue_timeout`], then is
//!   refused with 429. A team waits on its own line first, so one team's flood does not hold
//!   the server's places while it waits.
//! - **Host memory**: when the memory available (`MemAvailable`, or what the server's own
//!   cgroup still allows if that is less) falls under [`AdmissionConfig::min_free_memory_bytes`],
//!   new sandboxes and executions are refused with 503 until it recovers — before the kernel's
//!   OOM killer would have to act.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Live sandboxes (running or paused) at once.
    pub max_sandboxes: usize,
    /// Live sandboxes of one team at once.
    pub max_sandboxes_per_team: usize,
    /// Executions running at once.
    pub max_executions: usize,
    /// Executions of one team running at once.
    pub max_executions_per_team: usize,
    /// How long an execution waits for a place before it is refused.
    pub queue_timeout: Duration,
    /// New work is refused while less memory than this is available.
    pub min_free_memory_bytes: u64,
}

/// Default live sandboxes.
pub const DEFAULT_MAX_SANDBOXES: usize = 5000;
/// Default concurrent executions.
pub const DEFAULT_MAX_EXECUTIONS: usize = 256;
/// Default wait for an execution's place.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// The least default memory reserve: 256 MiB, or a twentieth of the host's memory if more.
const MIN_MEMORY_RESERVE_BYTES: u64 = 256 << 20;

impl Default for AdmissionConfig {
    fn default() -> Self {
        let total = soulbox_runtime::host_memory::total_bytes();
        Self {
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            max_sandboxes_per_team: DEFAULT_MAX_SANDBOXES,
            max_executions: DEFAULT_MAX_EXECUTIONS,
            max_executions_per_team: DEFAULT_MAX_EXECUTIONS,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            min_free_memory_bytes: MIN_MEMORY_RESERVE_BYTES.max(total / 20),
        }
    }
}

/// The reasons of refusals ([`Refusal::reason`]).
pub const REFUSAL_REASONS: [&str; 6] =
    ["sandboxes", "team_sandboxes", "executions", "team_executions", "memory", "kernels"];

/// Why new work was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 429 (a limit) or 503 (the host's memory).
    pub status: StatusCode,
    /// For people: which limit, and what to do.
    pub message: String,
    /// When to try again.
    pub retry_after: Duration,
    /// For the metrics: one of [`REFUSAL_REASONS`].
    pub reason: &'static str,
}

impl Refusal {
    fn limit(reason: &'static str, message: String, retry_after: Duration) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, message, retry_after, reason }
    }

    /// `Retry-After`'s value: whole seconds, at least one.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs().max(1)
    }
}

/// A place among the running executions; given back when dropped.
#[derive(Debug)]
pub struct ExecutionPermit {
    _team: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

/// The server's admission control.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    executions: Arc<Semaphore>,
    team_executions: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Held while a create counts the live sandboxes and makes its own.
    creating: Mutex<()>,
    memory: Mutex<Option<(Instant, u64)>>,
    refusals: Mutex<HashMap<&'static str, u64>>,
}

/// How long a memory reading is trusted.
const MEMORY_READING_TTL: Duration = Duration::from_millis(100);

impl Admission {
    /// Admission control with `config`.
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            executions: Arc::new(Semaphore::new(config.max_executions)),
            config,
            team_executions: Mutex::default(),
            creating: Mutex::default(),
            memory: Mutex::default(),
            refusals: Mutex::default(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> HashMap<&'static str, u64> {
        self.refusals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        *self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(refusal.reason)
            .or_insert(0) += 1;
        refusal
    }

    /// Refuses new work while the host is short of memory.
    pub fn check_memory(&self) -> Result<(), Refusal> {
        let available = {
            let mut reading = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
            match *reading {
                Some((at, bytes)) if at.elapsed() < MEMORY_READING_TTL => bytes,
                _ => {
                    let bytes = soulbox_runtime::host_memory::available_bytes();
                    *reading = Some((Instant::now(), bytes));
                    bytes
                }
            }
        };
        if available >= self.config.min_free_memory_bytes {
            return Ok(());
        }
        Err(self.refuse(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the server is short of memory ({} MiB available, {} MiB kept in reserve); \
                 try again shortly, or kill sandboxes you no longer need",
                available >> 20,
                self.config.min_free_memory_bytes >> 20
            ),
            retry_after: Duration::from_secs(5),
            reason: "memory",
        }))
    }

    /// Refuses work that needs a new WASM kernel when `live` kernels fill the engine's `max`
    /// slots.
    pub fn check_kernels(&self, live: usize, max: usize) -> Result<(), Refusal> {
        if live < max {
            return Ok(());
        }
        Err(self.refuse(Refusal::limit(
            "kernels",
            format!(
                "the server holds {live} live WASM kernels, its limit; try again when some \
                 sandboxes have ended, or kill those you no longer need"
            ),
            Duration::from_secs(5),
        )))
    }

    /// Makes a sandbox with `create` if the server's and `team`'s limits allow one more
    /// (`team_quota`: the team's own quota, if lower); `live(team)` counts the live ones
    /// (all of them for `None`). Counting and making are one step for concurrent creates.
    pub fn admit_sandbox<T, E: From<Refusal>>(
        &self,
        team: &str,
        team_quota: Option<usize>,
        live: impl Fn(Option<&str>) -> usize,
        create: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.check_memory()?;
        let _creating = self.creating.lock().unwrap_or_else(PoisonError::into_inner);
        let all = live(None);
        if all >= self.config.max_sandboxes {
            return Err(self
                .refuse(Refusal::limit(
                    "sandboxes",
                    format!(
                        "the server holds {all} live sandboxes, its limit; try again when some \
                         have ended"
                    ),
                    Duration::from_secs(5),
                ))
                .into());
        }
        let team_max = team_quota.map_or(self.config.max_sandboxes_per_team, |quota| {
            quota.min(self.config.max_sandboxes_per_team)
        });
        let ours = live(Some(team));
        if ours >= team_max {
            return Err(self
                .refuse(Refusal::limit(
                    "team_sandboxes",
                    format!("team {team} has {ours} live sandboxes, its limit; kill one first"),
                    Duration::from_secs(5),
                ))
                .into());
        }
        create()
    }

    /// A place for an execution of `team`, waiting in line up to the queue timeout.
    pub async fn execution(&self, team: &str) -> Result<ExecutionPermit, Refusal> {
        self.check_memory()?;
        let team_line = Arc::clone(
            self.team_executions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(team.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_executions_per_team))),
        );
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        let wait = self.config.queue_timeout;
        let team_place = tokio::time::timeout_at(deadline, team_line.acquire_owned()).await;
        let Ok(Ok(team_place)) = team_place else {
            return Err(self.refuse(Refusal::limit(
                "team_executions",
                format!(
                    "team {team} runs {} executions at once, its limit, and none ended within \
                     {wait:?}; try again shortly",
                    self.config.max_executions_per_team
                ),
                Duration::from_secs(1),
            )));
        };
        let place = tokio::time::timeout_at(deadline, Arc::clone(&self.executions).acquire_owned());
        let Ok(Ok(place)) = place.await else {
            return Err(self.refuse(Refusal::limit(
                "executions",
                format!(
                    "the server runs {} executions at once, its limit, and none ended within \
                     {wait:?}; try again shortly",
                    self.config.max_executions
                ),
                Duration::from_secs(1),
            )));
        };
        Ok(ExecutionPermit { _team: team_place, _all: place })
    }

    /// Executions running now.
    pub fn executions_running(&self) -> usize {
        self.config.max_executions - self.executions.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdmissionConfig {
        AdmissionConfig {
            max_sandboxes: 3,
            max_sandboxes_per_team: 2,
            max_executions: 2,
            max_executions_per_team: 1,
            queue_timeout: Duration::from_millis(200),
            min_free_memory_bytes: 0,
        }
    }

    #[test]
    fn sandboxes_are_admitted_up_to_the_server_and_team_limits() {
        let admission = Admission::new(config());
        let live = std::cell::RefCell::new(Vec::<&str>::new());
        let count = |team: Option<&str>| {
            live.borrow().iter().filter(|t| team.is_none_or(|team| **t == team)).count()
        };
        let create = |team: &'static str| {
            admission.admit_sandbox(team, None, count, || {
                live.borrow_mut().push(team);
                Ok::<(), Refusal>(())
            })
        };
        assert!(create("a").is_ok() && create("a").is_ok());
        let refused = create("a").expect_err("a's third");
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::TOO_MANY_REQUESTS, "team_sandboxes")
        );
        // A team's quota below the server's limit holds.
        let quota = admission.admit_sandbox("b", Some(0), count, || Ok::<(), Refusal>(()));
        assert_eq!(quota.expect_err("b's quota").reason, "team_sandboxes");
        assert!(create("b").is_ok(), "another team still fits");
        let refused = create("c").expect_err("the server's fourth");
        assert_eq!(refused.reason, "sandboxes");
        assert_eq!(live.borrow().len(), 3, "nothing was made for a refused create");
        assert_eq!(admission.refusals().values().sum::<u64>(), 3);
    }

    #[tokio::test]
    async fn executions_wait_in_line_then_are_refused() {
        let admission = Arc::new(Admission::new(config()));
        let first = admission.execution("a").await.expect("a place");
        // A's second waits for the first, and gets its place when it ends.
        let waiting = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.execution("a").await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(waiting.await.expect("joined").is_ok(), "the queue served it");
        // Held places: a team's second is refused after the queue timeout; B still runs.
        let _a = admission.execution("a").await.expect("a place");
        let began = Instant::now();
        let refused = admission.execution("a").await.expect_err("a's second");
        assert!(began.elapsed() >= Duration::from_millis(200), "it waited in line first");
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::TOO_MANY_REQUESTS, "team_executions")
        );
        assert_eq!(refused.retry_after_secs(), 1);
        let _b = admission.execution("b").await.expect("b's place");
        assert_eq!(admission.executions_running(), 2);
        let refused = admission.execution("c").await.expect_err("the server's third");
        assert_eq!(refused.reason, "executions");
    }

    #[test]
    fn work_is_refused_while_memory_is_short() {
        let short = Admission::new(AdmissionConfig { min_free_memory_bytes: u64::MAX, ..config() });
        let refused = short.check_memory().expect_err("no host has that much");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.message.contains("MiB available"), "{}", refused.message);
        let made = short.admit_sandbox("a", None, |_| 0, || Ok::<(), Refusal>(()));
        assert_eq!(made.expect_err("no create").reason, "memory");
        let enough = Admission::new(config());
        assert!(enough.check_memory().is_ok());
        assert!(soulbox_runtime::host_memory::available_bytes() > 0);
    }
}
