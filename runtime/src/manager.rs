//! The sandbox manager: sandboxes that outlive one execution, with a deadline, metadata and a
//! state, kept in the [`Store`] so that a restart of the server loses none of them.
//!
//! The restart rule: every sandbox recorded comes back with its files; one that was running
//! comes back **paused** (its processes and kernels did not survive the server), and resumes
//! on its next `resume` or `connect`, as a paused sandbox does. A sandbox past its deadline is
//! killed, or paused when it was created with [`OnTimeout::Pause`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::ResourceUsage;
use crate::dispatch::Dispatcher;
use crate::exec::{Tier, TierPreference};
use crate::limits::{Limits, LimitsError};
use crate::process::ProcessTable;
use crate::sandbox::TemplateImage;
use crate::sandbox::{Sandbox, SandboxDirError, SandboxId, SandboxSpec};
use crate::store::{Store, StoreError};

/// A sandbox's lifetime when the request gives none (E2B's default).
pub const DEFAULT_SANDBOX_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest lifetime a sandbox may be given at once.
pub const MAX_SANDBOX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The most metadata entries a sandbox may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// The longest metadata key or environment variable name, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The longest metadata value or environment variable value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;
/// The most environment variables a sandbox may carry.
pub const MAX_ENV_ENTRIES: usize = 256;
/// The largest page [`SandboxManager::list`] returns.
pub const MAX_LIST_PAGE: usize = 1000;

/// The store's tree of sandbox records.
const SANDBOXES: &str = "sandboxes";

/// The store's tree of what ended sandboxes used, by team and template.
const USAGE: &str = "usage";

/// Whether a sandbox runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// It takes executions.
    Running,
    /// Its processes are stopped (or gone, after a restart); its files are kept.
    Paused,
}

/// What happens at a sandbox's deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// It is killed and its files removed.
    #[default]
    Kill,
    /// It is paused, keeping its files.
    Pause,
}

/// What a sandbox is, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its id.
    pub id: SandboxId,
    /// The template it was made from.
    pub template: String,
    /// The caller's labels.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables of every execution.
    pub env: BTreeMap<String, String>,
    /// Default limits of its executions.
    pub limits: Limits,
    /// Which tier its executions prefer.
    pub tier: TierPreference,
    /// When it was created, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Its deadline, in milliseconds since the Unix epoch.
    pub end_at_ms: u64,
    /// Whether it runs.
    pub state: SandboxState,
    /// What happens at the deadline.
    pub on_timeout: OnTimeout,
    /// The secret a client shows to reach the sandbox's data plane (E2B's envd access token).
    #[serde(default)]
    pub access_token: String,
    /// Whether traffic to it while paused resumes it (E2B's auto-resume).
    #[serde(default)]
    pub auto_resume: bool,
    /// The lifetime it was created with, in milliseconds; an auto-resume gives it again.
    #[serde(default)]
    pub lifetime_ms: u64,
    /// The team it belongs to (empty: none named).
    #[serde(default)]
    pub team: String,
    /// When it last started running, in milliseconds since the Unix epoch (0 while paused).
    #[serde(default)]
    pub running_since_ms: u64,
    /// How long it ran before that, in milliseconds (pauses excluded).
    #[serde(default)]
    pub running_ms: u64,
    /// The built template it was made from, if any.
    #[serde(default)]
    pub image: Option<TemplateImage>,
}

impl SandboxRecord {
    /// How long it has run in all, up to `now_ms`.
    fn ran_ms(&self, now_ms: u64) -> u64 {
        let current = match self.running_since_ms {
            0 => 0,
            since => now_ms.saturating_sub(since),
        };
        self.running_ms.saturating_add(current)
    }
}

/// What the sandboxes of a team and template have used: the ended ones, plus the live ones
/// so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// The team.
    pub team: String,
    /// The template.
    pub template: String,
    /// Sandboxes made.
    pub sandboxes: u64,
    /// Time they ran (pauses excluded).
    pub sandbox_seconds: f64,
    /// CPU time they used.
    pub cpu_seconds: f64,
    /// The same, by tier (`wasm`, `native`).
    #[serde(default)]
    pub cpu_seconds_by_tier: BTreeMap<Tier, f64>,
    /// Memory they held reserved (their limit) while running, in GiB times seconds.
    pub memory_gib_seconds: f64,
    /// Executions (commands, processes, cells) run in them.
    pub executions: u64,
}

impl Usage {
    fn add(&mut self, other: &Self) {
        self.sandboxes += other.sandboxes;
        self.sandbox_seconds += other.sandbox_seconds;
        self.cpu_seconds += other.cpu_seconds;
        for (tier, seconds) in &other.cpu_seconds_by_tier {
            *self.cpu_seconds_by_tier.entry(*tier).or_default() += seconds;
        }
        self.memory_gib_seconds += other.memory_gib_seconds;
        self.executions += other.executions;
    }
}

/// How to make a sandbox. The defaults are closed: no environment, default limits, five
/// minutes, killed at the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSandbox {
    /// The template.
    pub template: String,
    /// Its lifetime, at most [`MAX_SANDBOX_TIMEOUT`].
    pub timeout: Duration,
    /// Labels, at most [`MAX_METADATA_ENTRIES`].
    pub metadata: BTreeMap<String, String>,
    /// Environment variables of every execution, at most [`MAX_ENV_ENTRIES`].
    pub env: BTreeMap<String, String>,
    /// Default limits of its executions.
    pub limits: Limits,
    /// Which tier its executions prefer.
    pub tier: TierPreference,
    /// What happens at the deadline.
    pub on_timeout: OnTimeout,
    /// Whether traffic to it while paused resumes it.
    pub auto_resume: bool,
    /// The team it belongs to.
    pub team: String,
    /// The built template it is made from, if any.
    pub image: Option<TemplateImage>,
}

impl CreateSandbox {
    /// A sandbox of `template` with the defaults.
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
            timeout: DEFAULT_SANDBOX_TIMEOUT,
            metadata: BTreeMap::new(),
            env: BTreeMap::new(),
            limits: Limits::default(),
            tier: TierPreference::Auto,
            on_timeout: OnTimeout::Kill,
            auto_resume: false,
            team: String::new(),
            image: None,
        }
    }
}

/// Which sandboxes [`SandboxManager::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only those carrying every one of these labels.
    pub metadata: BTreeMap<String, String>,
    /// Only those in one of these states (all when empty).
    pub states: Vec<SandboxState>,
    /// Only those of this team (all when absent).
    pub team: Option<String>,
    /// At most this many (at most [`MAX_LIST_PAGE`]; that many when absent).
    pub limit: Option<usize>,
    /// Continue after the page that returned this token.
    pub next_token: Option<String>,
}

/// A page of sandboxes, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPage {
    /// The sandboxes.
    pub sandboxes: Vec<SandboxRecord>,
    /// The token of the next page; `None` on the last one.
    pub next_token: Option<String>,
}

/// A request the manager refuses, or a failure of its own.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such sandbox (or it was killed).
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// The sandbox is paused; resume it first.
    #[error("sandbox {0} is paused")]
    Paused(SandboxId),
    /// The sandbox is already running.
    #[error("sandbox {0} is already running")]
    AlreadyRunning(SandboxId),
    /// A field of the request is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A limit is out of range.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sandbox's directories could not be made or found.
    #[error(transparent)]
    Files(#[from] SandboxDirError),
    /// A tier failed to pause or resume the sandbox.
    #[error("{0}")]
    Tier(String),
}

#[derive(Debug)]
struct Entry {
    record: SandboxRecord,
    sandbox: Arc<Sandbox>,
    processes: Arc<ProcessTable>,
    /// The last CPU sample ([`SandboxManager::metrics`]): when, and the CPU time then.
    last_cpu: Option<(Instant, Duration)>,
    /// Executions run in it (counted in memory; a crash loses the count of live sandboxes).
    executions: u64,
}

impl Entry {
    fn new(record: SandboxRecord, sandbox: Sandbox) -> Self {
        Self {
            record,
            sandbox: Arc::new(sandbox),
            processes: Arc::default(),
            last_cpu: None,
            executions: 0,
        }
    }

    /// What it has used so far, given what each tier says it used.
    fn usage(&self, now_ms: u64, by_tier: &[(Tier, ResourceUsage)]) -> Usage {
        let cpu_seconds_by_tier: BTreeMap<Tier, f64> =
            by_tier.iter().map(|(tier, used)| (*tier, used.cpu_time.as_secs_f64())).collect();
        let cpu_time: Duration = by_tier.iter().map(|(_, used)| used.cpu_time).sum();
        let seconds = Duration::from_millis(self.record.ran_ms(now_ms)).as_secs_f64();
        let memory_gib = self.record.limits.memory_bytes as f64 / f64::from(1u32 << 30);
        Usage {
            team: self.record.team.clone(),
            template: self.record.template.clone(),
            sandboxes: 1,
            sandbox_seconds: seconds,
            cpu_seconds: cpu_time.as_secs_f64(),
            cpu_seconds_by_tier,
            memory_gib_seconds: memory_gib * seconds,
            executions: self.executions,
        }
    }
}

/// How many CPUs a sandbox has: the native tier's quota is one CPU, and a cell runs on one
/// thread.
pub const SANDBOX_CPU_COUNT: u32 = 1;

/// The most files [`SandboxManager::metrics`] counts for the disk use of one workspace.
const MAX_COUNTED_FILES: usize = 1_000_000;

/// What a team's live sandboxes hold in one tier now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierLoad {
    /// Sandboxes active in the tier (a kernel started, a native sandbox running).
    pub sandboxes: usize,
    /// CPU time they have used in it.
    pub cpu_time: Duration,
    /// Memory they hold in it now.
    pub memory_bytes: u64,
}

/// What a sandbox uses, sampled now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SandboxMetrics {
    /// When, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its CPUs.
    pub cpu_count: u32,
    /// Its CPU use since the previous sample (or since it started), in percent of its CPUs.
    pub cpu_used_pct: f64,
    /// Memory held by its processes and kernels.
    pub memory_used_bytes: u64,
    /// Its memory limit.
    pub memory_total_bytes: u64,
    /// The size of its files.
    pub disk_used_bytes: u64,
    /// The size of the file system its files are on.
    pub disk_total_bytes: u64,
}

/// The sandboxes of a server. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SandboxManager {
    root: PathBuf,
    store: Store,
    dispatcher: Dispatcher,
    sandboxes: Mutex<HashMap<SandboxId, Entry>>,
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn deadline_ms(timeout: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

fn check_timeout(timeout: Duration) -> Result<(), ManagerError> {
    if timeout > MAX_SANDBOX_TIMEOUT {
        let max = MAX_SANDBOX_TIMEOUT.as_secs();
        return Err(ManagerError::Invalid(format!(
            "timeout {} s is longer than the maximum of {max} s",
            timeout.as_secs()
        )));
    }
    Ok(())
}

fn check_pairs(
    what: &str,
    pairs: &BTreeMap<String, String>,
    max_entries: usize,
) -> Result<(), ManagerError> {
    if pairs.len() > max_entries {
        return Err(ManagerError::Invalid(format!(
            "{} {what} entries, more than the maximum of {max_entries}",
            pairs.len()
        )));
    }
    for (key, value) in pairs {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(ManagerError::Invalid(format!(
                "{what} `{}`: keys take 1 to {MAX_KEY_BYTES} bytes and values at most \
                 {MAX_VALUE_BYTES}",
                key.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

impl SandboxManager {
    /// Opens the manager whose sandboxes live under `root` (`root/store` for the records,
    /// `root/sandboxes/<id>` for their files), restoring every recorded sandbox by the restart
    /// rule of the module docs.
    pub fn open(root: &Path, dispatcher: Dispatcher) -> Result<Self, ManagerError> {
        let store = Store::open(&root.join("store"))?;
        let manager =
            Self { root: root.join("sandboxes"), store, dispatcher, sandboxes: Mutex::default() };
        for mut record in manager.store.all::<SandboxRecord>(SANDBOXES)? {
            let spec = spec_of(&record);
            let sandbox = match Sandbox::open(&manager.root, record.id.clone(), spec) {
                Ok(sandbox) => sandbox,
                Err(e) => {
                    tracing::error!(sandbox = %record.id, error = %e, "a recorded sandbox has lost its files; keeping its record");
                    continue;
                }
            };
            if record.state == SandboxState::Running {
                // When the server went down is not known: the time since its last start is
                // not counted.
                record.state = SandboxState::Paused;
                record.running_since_ms = 0;
                manager.store.put(SANDBOXES, record.id.as_str(), &record)?;
            }
            let entry = Entry::new(record, sandbox);
            manager.lock().insert(entry.record.id.clone(), entry);
        }
        Ok(manager)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SandboxId, Entry>> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn find(&self, id: &str) -> Result<SandboxId, ManagerError> {
        SandboxId::parse(id)
            .filter(|id| self.lock().contains_key(id))
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))
    }

    /// The store the records are kept in (other records of the server may share it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The dispatcher executions of these sandboxes go through.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Creates a running sandbox.
    pub fn create(&self, request: CreateSandbox) -> Result<SandboxRecord, ManagerError> {
        self.create_in(request, None)
    }

    /// Where directories prepared for new sandboxes are made: beside the sandboxes, on
    /// their filesystem (see [`SandboxManager::create_in`]).
    pub fn prepared_root(&self) -> PathBuf {
        self.root.with_file_name("prepared")
    }

    /// [`SandboxManager::create`], in `prepared` (a directory under
    /// [`SandboxManager::prepared_root`] with `workspace` and `state`) when given.
    pub fn create_in(
        &self,
        request: CreateSandbox,
        prepared: Option<&Path>,
    ) -> Result<SandboxRecord, ManagerError> {
        check_timeout(request.timeout)?;
        request.limits.validate()?;
        check_pairs("metadata", &request.metadata, MAX_METADATA_ENTRIES)?;
        check_pairs("environment", &request.env, MAX_ENV_ENTRIES)?;
        let spec = SandboxSpec {
            env: request.env.clone(),
            limits: request.limits,
            tier: request.tier,
            image: request.image.clone(),
        };
        let sandbox = match prepared {
            Some(prepared) => Sandbox::adopt(&self.root, spec, prepared)?,
            None => Sandbox::create(&self.root, spec)?,
        };
        let record = SandboxRecord {
            id: sandbox.id().clone(),
            template: request.template,
            metadata: request.metadata,
            env: request.env,
            limits: request.limits,
            tier: request.tier,
            started_at_ms: now_ms(),
            end_at_ms: deadline_ms(request.timeout),
            state: SandboxState::Running,
            on_timeout: request.on_timeout,
            access_token: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            auto_resume: request.auto_resume,
            lifetime_ms: u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX),
            team: request.team,
            running_since_ms: now_ms(),
            running_ms: 0,
            image: request.image,
        };
        if let Err(e) = self.store.put(SANDBOXES, record.id.as_str(), &record) {
            let _ = sandbox.remove_files();
            return Err(e.into());
        }
        self.lock().insert(record.id.clone(), Entry::new(record.clone(), sandbox));
        Ok(record)
    }

    /// A sandbox's record.
    pub fn get(&self, id: &str) -> Result<SandboxRecord, ManagerError> {
        let id = self.find(id)?;
        self.lock().get(&id).map(|e| e.record.clone()).ok_or(ManagerError::NotFound(id.to_string()))
    }

    /// A running sandbox, for an execution.
    pub fn running(&self, id: &str) -> Result<Arc<Sandbox>, ManagerError> {
        let id = self.find(id)?;
        let sandboxes = self.lock();
        let entry = sandboxes.get(&id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        match entry.record.state {
            SandboxState::Running => Ok(entry.sandbox.clone()),
            SandboxState::Paused => Err(ManagerError::Paused(id)),
        }
    }

    /// A running sandbox's long-lived processes (E2B's commands), with the sandbox.
    pub fn processes(&self, id: &str) -> Result<(Arc<Sandbox>, Arc<ProcessTable>), ManagerError> {
        let sandbox = self.running(id)?;
        let sandboxes = self.lock();
        let entry =
            sandboxes.get(sandbox.id()).ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        Ok((sandbox, entry.processes.clone()))
    }

    /// Samples what a sandbox uses now (a paused sandbox uses no CPU).
    pub async fn metrics(&self, id: &str) -> Result<SandboxMetrics, ManagerError> {
        let id = self.find(id)?;
        let (sandbox, record) = {
            let sandboxes = self.lock();
            let entry = sandboxes.get(&id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
            (entry.sandbox.clone(), entry.record.clone())
        };
        let usage = self.dispatcher.usage(&sandbox);
        let workspace = sandbox.workspace().to_owned();
        let (disk_used_bytes, disk_total_bytes) = tokio::task::spawn_blocking(move || {
            (tree_size(&workspace), fs4::total_space(&workspace).unwrap_or(0))
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let previous = {
            let mut sandboxes = self.lock();
            let entry =
                sandboxes.get_mut(&id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
            entry.last_cpu.replace((now, usage.cpu_time))
        };
        let (wall, cpu) = match previous {
            Some((then, cpu_then)) => (now - then, usage.cpu_time.saturating_sub(cpu_then)),
            None => {
                let age = now_ms().saturating_sub(record.started_at_ms);
                (Duration::from_millis(age), usage.cpu_time)
            }
        };
        let cpu_used_pct = if wall.is_zero() {
            0.0
        } else {
            (cpu.as_secs_f64() / wall.as_secs_f64() / f64::from(SANDBOX_CPU_COUNT) * 100.0)
                .min(100.0)
        };
        Ok(SandboxMetrics {
            timestamp_ms: now_ms(),
            cpu_count: SANDBOX_CPU_COUNT,
            cpu_used_pct,
            memory_used_bytes: usage.memory_bytes,
            memory_total_bytes: record.limits.memory_bytes,
            disk_used_bytes,
            disk_total_bytes,
        })
    }

    /// A sandbox's process table, running or paused (for its log).
    pub fn process_table(&self, id: &str) -> Result<Arc<ProcessTable>, ManagerError> {
        let id = self.find(id)?;
        let sandboxes = self.lock();
        let entry = sandboxes.get(&id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        Ok(entry.processes.clone())
    }

    /// Sandboxes by filter, oldest first, a page at a time.
    pub fn list(&self, filter: &ListFilter) -> SandboxPage {
        let mut records: Vec<SandboxRecord> = self
            .lock()
            .values()
            .map(|e| e.record.clone())
            .filter(|r| filter.states.is_empty() || filter.states.contains(&r.state))
            .filter(|r| filter.team.as_ref().is_none_or(|team| &r.team == team))
            .filter(|r| filter.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
            .collect();
        records.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        if let Some(token) = &filter.next_token
            && let Some((started, id)) = token.split_once('-')
            && let Ok(started) = started.parse::<u64>()
        {
            records.retain(|r| (r.started_at_ms, r.id.as_str()) > (started, id));
        }
        let limit = filter.limit.unwrap_or(MAX_LIST_PAGE).clamp(1, MAX_LIST_PAGE);
        let next_token = (records.len() > limit)
            .then(|| records.get(limit - 1).map(|r| format!("{}-{}", r.started_at_ms, r.id)))
            .flatten();
        records.truncate(limit);
        SandboxPage { sandboxes: records, next_token }
    }

    /// How many sandboxes are live (running or paused): all of them, or `team`'s.
    pub fn count_live(&self, team: Option<&str>) -> usize {
        let sandboxes = self.lock();
        match team {
            None => sandboxes.len(),
            Some(team) => sandboxes.values().filter(|e| e.record.team == team).count(),
        }
    }

    /// What the live sandboxes hold now, by team and tier (for metrics).
    pub fn load_by_team(&self) -> BTreeMap<(String, Tier), TierLoad> {
        let live: Vec<(String, Arc<Sandbox>)> =
            self.lock().values().map(|e| (e.record.team.clone(), e.sandbox.clone())).collect();
        let mut load: BTreeMap<(String, Tier), TierLoad> = BTreeMap::new();
        for (team, sandbox) in live {
            for (tier, used) in self.dispatcher.usage_by_tier(&sandbox) {
                if used.cpu_time.is_zero() && used.memory_bytes == 0 {
                    continue;
                }
                let entry = load.entry((team.clone(), tier)).or_default();
                entry.sandboxes += 1;
                entry.cpu_time += used.cpu_time;
                entry.memory_bytes += used.memory_bytes;
            }
        }
        load
    }

    /// The records of the live sandboxes (running or paused), in no order.
    pub fn live_records(&self) -> Vec<SandboxRecord> {
        self.lock().values().map(|entry| entry.record.clone()).collect()
    }

    /// The live sandboxes counted by `key` of their records (for metrics).
    pub fn count_by<K: Ord>(&self, key: impl Fn(&SandboxRecord) -> K) -> BTreeMap<K, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.lock().values() {
            *counts.entry(key(&entry.record)).or_insert(0) += 1;
        }
        counts
    }

    fn update(
        &self,
        id: &SandboxId,
        change: impl FnOnce(&mut SandboxRecord),
    ) -> Result<SandboxRecord, ManagerError> {
        let mut sandboxes = self.lock();
        let entry = sandboxes.get_mut(id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let mut record = entry.record.clone();
        change(&mut record);
        self.store.put(SANDBOXES, id.as_str(), &record)?;
        entry.record = record.clone();
        Ok(record)
    }

    /// Counts an execution (a command, a process, a cell) run in sandbox `id`.
    pub fn count_execution(&self, id: &SandboxId) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.executions += 1;
        }
    }

    fn add_usage(&self, used: &Usage) -> Result<(), ManagerError> {
        let key = format!("{}\u{0}{}", used.team, used.template);
        let mut total: Usage = self.store.get(USAGE, &key)?.unwrap_or_else(|| Usage {
            team: used.team.clone(),
            template: used.template.clone(),
            ..Usage::default()
        });
        total.add(used);
        self.store.put(USAGE, &key, &total)?;
        Ok(())
    }

    /// What the sandboxes of `team` (of every team when `None`) used, by team and template:
    /// the ended ones, plus the live ones so far.
    pub fn usage(&self, team: Option<&str>) -> Result<Vec<Usage>, ManagerError> {
        let mut totals: BTreeMap<(String, String), Usage> = BTreeMap::new();
        for used in self.store.all::<Usage>(USAGE)? {
            totals.insert((used.team.clone(), used.template.clone()), used);
        }
        let now = now_ms();
        let live: Vec<Usage> = self
            .lock()
            .values()
            .map(|entry| entry.usage(now, &self.dispatcher.usage_by_tier(&entry.sandbox)))
            .collect();
        for used in live {
            totals
                .entry((used.team.clone(), used.template.clone()))
                .or_insert_with(|| Usage {
                    team: used.team.clone(),
                    template: used.template.clone(),
                    ..Usage::default()
                })
                .add(&used);
        }
        Ok(totals.into_values().filter(|u| team.is_none_or(|team| u.team == team)).collect())
    }

    /// Sets the deadline to `timeout` from now (shorter or longer).
    pub fn set_timeout(&self, id: &str, timeout: Duration) -> Result<SandboxRecord, ManagerError> {
        check_timeout(timeout)?;
        let id = self.find(id)?;
        self.update(&id, |r| r.end_at_ms = deadline_ms(timeout))
    }

    /// Kills a sandbox: every tier releases it, its files and record are removed. Whether it
    /// existed.
    pub async fn kill(&self, id: &str) -> Result<bool, ManagerError> {
        let Ok(id) = self.find(id) else { return Ok(false) };
        let Some(entry) = self.lock().remove(&id) else { return Ok(false) };
        entry.processes.clear();
        let used = entry.usage(now_ms(), &self.dispatcher.usage_by_tier(&entry.sandbox));
        self.dispatcher.close(&entry.sandbox).await;
        self.add_usage(&used)?;
        self.store.remove(SANDBOXES, id.as_str())?;
        entry.sandbox.remove_files()?;
        Ok(true)
    }

    /// Pauses a running sandbox: its native processes are frozen, its files kept.
    pub async fn pause(&self, id: &str) -> Result<SandboxRecord, ManagerError> {
        let sandbox = self.running(id)?;
        self.dispatcher.pause(&sandbox).await.map_err(|e| ManagerError::Tier(e.to_string()))?;
        let now = now_ms();
        self.update(sandbox.id(), |r| {
            r.running_ms = r.ran_ms(now);
            r.running_since_ms = 0;
            r.state = SandboxState::Paused;
        })
    }

    /// Resumes a paused sandbox with a new deadline `timeout` from now.
    pub async fn resume(&self, id: &str, timeout: Duration) -> Result<SandboxRecord, ManagerError> {
        check_timeout(timeout)?;
        let id = self.find(id)?;
        let sandbox = {
            let sandboxes = self.lock();
            let entry = sandboxes.get(&id).ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
            if entry.record.state == SandboxState::Running {
                return Err(ManagerError::AlreadyRunning(id));
            }
            entry.sandbox.clone()
        };
        self.dispatcher.resume(&sandbox).await.map_err(|e| ManagerError::Tier(e.to_string()))?;
        self.update(&id, |r| {
            r.state = SandboxState::Running;
            r.end_at_ms = deadline_ms(timeout);
            r.running_since_ms = now_ms();
        })
    }

    /// A sandbox's own lifetime (what it was created with), for an auto-resume.
    pub fn lifetime(record: &SandboxRecord) -> Duration {
        match record.lifetime_ms {
            0 => DEFAULT_SANDBOX_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// E2B's connect: a paused sandbox is resumed (`true`), a running one has its deadline
    /// extended when `timeout` from now is later than it.
    pub async fn connect(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<(SandboxRecord, bool), ManagerError> {
        check_timeout(timeout)?;
        let record = self.get(id)?;
        if record.state == SandboxState::Paused {
            return Ok((self.resume(id, timeout).await?, true));
        }
        let wanted = deadline_ms(timeout);
        let record = self.update(&record.id, |r| r.end_at_ms = r.end_at_ms.max(wanted))?;
        Ok((record, false))
    }

    /// Kills or pauses every running sandbox past its deadline; returns how many.
    pub async fn reap_expired(&self) -> usize {
        let now = now_ms();
        let expired: Vec<(SandboxId, OnTimeout)> = self
            .lock()
            .values()
            .filter(|e| e.record.state == SandboxState::Running && e.record.end_at_ms <= now)
            .map(|e| (e.record.id.clone(), e.record.on_timeout))
            .collect();
        for (id, on_timeout) in &expired {
            let done = match on_timeout {
                OnTimeout::Kill => self.kill(id.as_str()).await.map(drop),
                OnTimeout::Pause => self.pause(id.as_str()).await.map(drop),
            };
            if let Err(e) = done {
                tracing::warn!(sandbox = %id, error = %e, "ending an expired sandbox");
            }
        }
        expired.len()
    }

    /// Runs [`SandboxManager::reap_expired`] every `interval` until the manager is dropped.
    pub fn spawn_reaper(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                let Some(manager) = manager.upgrade() else { return };
                manager.reap_expired().await;
            }
        })
    }
}

/// The size of the files under `dir` (links not followed), up to [`MAX_COUNTED_FILES`] of
/// them.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut counted = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            counted += 1;
            if counted > MAX_COUNTED_FILES {
                return total;
            }
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    total
}

fn spec_of(record: &SandboxRecord) -> SandboxSpec {
    SandboxSpec {
        env: record.env.clone(),
        limits: record.limits,
        tier: record.tier,
        image: record.image.clone(),
    }
}
