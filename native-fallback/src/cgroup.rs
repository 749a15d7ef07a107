//! A sandbox's control group, through cgroups-rs, on cgroup v1 and v2 alike: memory without
//! swap, a process count, a CPU quota, and the count of OOM kills that tells a memory limit
//! from any other SIGKILL.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use cgroups_rs::cpu::CpuController;
use cgroups_rs::freezer::{FreezerController, FreezerState};
use cgroups_rs::hierarchies;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, CgroupPid, Controller, MaxValue};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The parent of every sandbox's group, under each hierarchy's root.
const PARENT: &str = "soulbox";

/// How often removing a group is retried while its last processes finish dying.
const REMOVE_ATTEMPTS: u32 = 50;

/// How long a freeze or thaw may take to complete: polls of the group's state, and their
/// interval.
const FREEZE_POLLS: u32 = 500;
const FREEZE_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// The period of the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;

/// Failure to create, configure or remove a control group.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup operation failed.
    #[error("cgroup {path}: {operation}: {message}")]
    Operation {
        /// The group, relative to the hierarchy roots.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// What failed.
        message: String,
    },
}

/// The limits of a sandbox's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory of all its processes together (page cache and tmpfs included); no swap.
    pub memory_bytes: u64,
    /// How many processes and threads may exist at once.
    pub max_processes: u64,
    /// CPU time per 100 ms period, in microseconds (100 000 = one whole CPU).
    pub cpu_quota_us: u64,
}

/// Which cgroup version the host runs.
pub fn host_version() -> u8 {
    if hierarchies::is_cgroup2_unified_mode() { 2 } else { 1 }
}

/// Removes the groups that servers which are gone left behind (`soulbox/<pid>-<n>`, where no
/// process `<pid>` lives any more): their sandboxes died with them, so the groups are empty or
/// about to be.
pub(crate) fn remove_stale() {
    let v2 = hierarchies::is_cgroup2_unified_mode();
    let root = hierarchies::auto().root();
    let parent = if v2 { root.join(PARENT) } else { root.join("memory").join(PARENT) };
    let Ok(entries) = fs::read_dir(&parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, _)) = name.split_once('-') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = format!("{PARENT}/{name}");
        let cgroup = Cgroup::load(hierarchies::auto(), &path);
        if let Err(e) = (SandboxCgroup { cgroup, path: path.clone(), v2 }).remove() {
            tracing::warn!(%path, error = %e, "removing a stale control group");
        }
    }
}

/// One sandbox's control group. Removed by [`SandboxCgroup::remove`].
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    cgroup: Cgroup,
    path: String,
    v2: bool,
}

impl SandboxCgroup {
    /// Creates the group `soulbox/<name>` with `limits`.
    pub(crate) fn create(name: &str, limits: CgroupLimits) -> Result<Self, CgroupError> {
        let path = format!("{PARENT}/{name}");
        let v2 = hierarchies::is_cgroup2_unified_mode();
        let controllers = controllers(v2);
        // Never join a group that exists: it would be another sandbox's.
        if Cgroup::load_with_specified_controllers(hierarchies::auto(), &path, controllers.clone())
            .exists()
        {
            return Err(CgroupError::Operation {
                path,
                operation: "create",
                message: "it already exists".to_owned(),
            });
        }
        let cgroup =
            Cgroup::new_with_specified_controllers(hierarchies::auto(), &path, Some(controllers))
                .map_err(|e| operation_error(&path, "create", &e))?;
        let group = Self { cgroup, path, v2 };
        if let Err(e) = group.configure(limits) {
            let _ = group.cgroup.delete();
            return Err(e);
        }
        Ok(group)
    }

    fn configure(&self, limits: CgroupLimits) -> Result<(), CgroupError> {
        self.set_memory_limit(limits.memory_bytes)?;
        let pids: &PidController = self.controller("pids")?;
        let max = i64::try_from(limits.max_processes).unwrap_or(i64::MAX);
        pids.set_pid_max(MaxValue::Value(max))
            .map_err(|e| operation_error(&self.path, "set pids.max", &e))?;
        let cpu: &CpuController = self.controller("cpu")?;
        let quota = i64::try_from(limits.cpu_quota_us).unwrap_or(i64::MAX);
        cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
            .map_err(|e| operation_error(&self.path, "set the CPU quota", &e))?;
        Ok(())
    }

    fn controller<T>(&self, name: &'static str) -> Result<&T, CgroupError>
    where
        for<'a> &'a T: From<&'a cgroups_rs::Subsystem>,
        T: Controller + cgroups_rs::ControllIdentifier,
    {
        self.cgroup.controller_of::<T>().ok_or_else(|| CgroupError::Operation {
            path: self.path.clone(),
            operation: "find the controller",
            message: format!("the {name} controller is not available"),
        })
    }

    /// Another handle on the same group (for work off the async workers); removing the group
    /// stays the original's job.
    pub(crate) fn handle(&self) -> Self {
        let cgroup = Cgroup::load_with_specified_controllers(
            hierarchies::auto(),
            &self.path,
            controllers(self.v2),
        );
        Self { cgroup, path: self.path.clone(), v2: self.v2 }
    }

    /// Sets the memory limit of the whole group, swap forbidden.
    pub(crate) fn set_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        let memory: &MemController = self.controller("memory")?;
        let limit = i64::try_from(bytes).unwrap_or(i64::MAX);
        let set_memory = || {
            memory
                .set_limit(limit)
                .map_err(|e| operation_error(&self.path, "set the memory limit", &e))
        };
        if self.v2 {
            set_memory()?;
            return memory
                .set_memswap_limit(0)
                .map_err(|e| operation_error(&self.path, "forbid swap", &e));
        }
        // v1 limits memory+swap together, and it may never be below the memory limit: raise
        // it first when growing, lower it last when shrinking. Without swap accounting there
        // is no such file and no swap to limit.
        let memsw = memory.path().join("memory.memsw.limit_in_bytes");
        if !memsw.exists() {
            return set_memory();
        }
        let set_memsw = || {
            memory
                .set_memswap_limit(limit)
                .map_err(|e| operation_error(&self.path, "forbid swap", &e))
        };
        let current = memory.memory_stat().limit_in_bytes;
        if limit > current {
            set_memsw()?;
            set_memory()
        } else {
            set_memory()?;
            set_memsw()
        }
    }

    /// Freezes (`true`) or thaws (`false`) every process of the group, and waits until the
    /// kernel reports the group frozen or thawed.
    pub(crate) fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let operation = if frozen { "freeze" } else { "thaw" };
        let error = |message: String| CgroupError::Operation {
            path: self.path.clone(),
            operation,
            message,
        };
        if self.v2 {
            // The unified hierarchy freezes through the group's own `cgroup.freeze`.
            let dir = self.memory_path().ok_or_else(|| error("no group directory".to_owned()))?;
            fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
                .map_err(|e| error(e.to_string()))?;
            let wanted = if frozen { "frozen 1" } else { "frozen 0" };
            return self
                .wait_until(|| {
                    fs::read_to_string(dir.join("cgroup.events"))
                        .is_ok_and(|events| events.lines().any(|l| l == wanted))
                })
                .map_err(|()| error("the kernel did not report the change in time".to_owned()));
        }
        let freezer: &FreezerController = self.controller("freezer")?;
        let result = if frozen { freezer.freeze() } else { freezer.thaw() };
        result.map_err(|e| operation_error(&self.path, operation, &e))?;
        let reached = |state: FreezerState| match state {
            FreezerState::Frozen => frozen,
            FreezerState::Thawed => !frozen,
            FreezerState::Freezing => false,
        };
        self.wait_until(|| freezer.state().is_ok_and(reached))
            .map_err(|()| error("the kernel did not report the change in time".to_owned()))
    }

    fn wait_until(&self, mut done: impl FnMut() -> bool) -> Result<(), ()> {
        for _ in 0..FREEZE_POLLS {
            if done() {
                return Ok(());
            }
            std::thread::sleep(FREEZE_POLL_INTERVAL);
        }
        Err(())
    }

    /// Moves a process (all its threads) into the group.
    pub(crate) fn add(&self, pid: Pid) -> Result<(), CgroupError> {
        let pid = u64::try_from(pid.as_raw()).unwrap_or_default();
        self.cgroup
            .add_task_by_tgid(CgroupPid::from(pid))
            .map_err(|e| operation_error(&self.path, "add a process", &e))
    }

    /// How many processes of the group the kernel's OOM killer has killed so far.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Ok(memory) = self.controller::<MemController>("memory") else { return 0 };
        if !self.v2 {
            return memory.memory_stat().oom_control.oom_kill;
        }
        let events = fs::read_to_string(memory.path().join("memory.events")).unwrap_or_default();
        events
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The CPU time and memory the group uses now (zeros for what cannot be read).
    pub(crate) fn usage(&self) -> (Duration, u64) {
        let read = |path: PathBuf| fs::read_to_string(path).unwrap_or_default();
        let memory = self.controller::<MemController>("memory").ok();
        let cpu = self.controller::<CpuController>("cpu").ok();
        if self.v2 {
            let memory_bytes = memory
                .and_then(|m| read(m.path().join("memory.current")).trim().parse().ok())
                .unwrap_or(0);
            let cpu_us: u64 = cpu
                .map(|c| read(c.path().join("cpu.stat")))
                .and_then(|stat| {
                    stat.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0);
            return (Duration::from_micros(cpu_us), memory_bytes);
        }
        let memory_bytes = memory.map_or(0, |m| m.memory_stat().usage_in_bytes);
        let cpu_ns: u64 = self
            .controller::<cgroups_rs::cpuacct::CpuAcctController>("cpuacct")
            .ok()
            .and_then(|c| read(c.path().join("cpuacct.usage")).trim().parse().ok())
            .unwrap_or(0);
        (Duration::from_nanos(cpu_ns), memory_bytes)
    }

    /// The processes in the group.
    pub(crate) fn processes(&self) -> Vec<Pid> {
        self.cgroup
            .procs()
            .into_iter()
            .filter_map(|p| i32::try_from(p.pid).ok().map(Pid::from_raw))
            .collect()
    }

    /// The group's directory in the memory hierarchy (for tests and diagnostics).
    pub(crate) fn memory_path(&self) -> Option<PathBuf> {
        self.controller::<MemController>("memory").ok().map(|m| m.path().to_owned())
    }

    /// Kills whatever is left in the group and removes it from every hierarchy, retrying
    /// while the last processes finish dying.
    pub(crate) fn remove(self) -> Result<(), CgroupError> {
        let mut last_error = None;
        for _ in 0..REMOVE_ATTEMPTS {
            if self.v2 {
                let _ = self.cgroup.kill();
            } else {
                for pid in self.processes() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            match self.cgroup.delete() {
                Ok(()) if !self.cgroup.exists() => return Ok(()),
                Ok(()) => {}
                Err(e) => last_error = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let message = last_error.map_or_else(|| "still exists".to_owned(), |e| e.to_string());
        Err(CgroupError::Operation { path: self.path, operation: "remove", message })
    }
}

/// The controllers a sandbox's group uses (v2 freezes through `cgroup.freeze`, without a
/// controller).
fn controllers(v2: bool) -> Vec<String> {
    let names: &[&str] = if v2 {
        &["memory", "pids", "cpu"]
    } else {
        &["memory", "pids", "cpu", "cpuacct", "freezer"]
    };
    names.iter().map(|c| (*c).to_owned()).collect()
}

fn operation_error(
    path: &str,
    operation: &'static str,
    e: &cgroups_rs::error::Error,
) -> CgroupError {
    let mut message = e.to_string();
    if let Some(source) = std::error::Error::source(e) {
        message.push_str(&format!(": {source}"));
    }
    CgroupError::Operation { path: path.to_owned(), operation, message }
}
