//! The native tier of SoulBox: processes in Linux namespaces with cgroup limits and a seccomp
//! filter, for what a WASI module cannot run (native toolchains, shell, Docker-style
//! templates, browsers).
//!
//! A sandbox is held by its init process, `soulbox-init` (the `init/` package beside this
//! crate): PID 1 of the sandbox's pid namespace, which runs the isolation sequence once and
//! then starts, reaps and signals the sandbox's processes on the host's request, so that
//! several commands and background processes share one sandbox over its lifetime. Init is
//! built with this crate, embedded in it and run from a sealed memfd: no file the guest can
//! reach is ever executed by the host, and the guest cannot write the binary it runs (the
//! CVE-2019-5736 class).
//!
//! # The isolation sequence
//!
//! In the order the code runs it. Every step either succeeds or the sandbox is refused (init
//! reports the failed step, the host kills it and removes what it made): there is no path
//! that runs guest code with less isolation than asked. The sequence has two parts: the first
//! builds everything but the workspace and may run ahead of time, for the tier's pool of
//! prepared sandboxes (see [`pool`]); the second runs when a sandbox is
//! started. No guest code runs before the second part is complete.
//!
//! **Prepare**, on the host ([`NativeTier`], `sandbox.rs`):
//!
//! 1. **Control group** `soulbox/<server pid>-<n>` in every hierarchy (cgroup v1) or the
//!    unified one (v2), through cgroups-rs: memory limit with swap forbidden, a process count,
//!    a CPU quota. (Groups of servers that are gone are removed when a tier starts.)
//! 2. **Detached mounts** of the template's layers (`open_tree(OPEN_TREE_CLONE)` +
//!    `mount_setattr`): the host's `/usr` (plus `/bin`, `/lib*`, `/sbin` where they are
//!    directories) and an allow-listed copy of `/etc`, read-only, nosuid, nodev. A template
//!    built from a Dockerfile ([`build`]) adds its root first: an overlayfs of its layers under
//!    the sandbox's own writable layer (`fsopen("overlay")` + `fsmount`, made here so that
//!    overlayfs's `trusted.*` whiteouts work; nosuid, nodev), and has the host's directories
//!    only if it was built `FROM base`.
//! 3. **Namespaces**: `clone(CLONE_VM)` with new user, pid, mount, network, UTS and IPC
//!    namespaces (a template build's step may share the host's network where the server
//!    allows it: [`SandboxNetwork`]). The child waits until step 5, becomes root of its user namespace (so that it
//!    keeps its capabilities there across `execve`), sets descriptors 0-2 to `/dev/null` and 3
//!    to its end of the control socket, resets every signal's disposition and its signal mask
//!    (nothing of the server's signal handling survives), and `execveat`s the sealed init image
//!    with an empty environment (`sys/spawn.rs`).
//! 4. **Id maps**: the sandbox's ids 0..65536 map to the host's 100000.. ([`SANDBOX_UID_BASE`]);
//!    nothing in a sandbox runs as a host user that exists.
//! 5. **Join the control group**, release the child, send the plan with the layers.
//!
//! **Prepare**, in init (`native-fallback/init/src/setup.rs`, `prepare`), as root of its own
//! user namespace:
//!
//! 6. Every descriptor above 3 closed, the control socket made close-on-exec; become root of
//!    the user namespace; make every mount private.
//! 7. **New root**: a small tmpfs (or the template's overlay) with the layers attached
//!    (`move_mount`), links for merged-usr, an empty `/home/user` (the sandbox user's), a
//!    private size-limited `/tmp`.
//! 8. **Private `/dev`**: a tmpfs with only null, zero, full, random, urandom and tty (bound
//!    from the host's), a new devpts instance, a size-limited `/dev/shm`.
//! 9. **Fresh `/proc`** for the new pid namespace, Docker's masked paths hidden (`kcore`,
//!    `keys`, `timer_list`, `sched_debug`, ...), `sys`, `sysrq-trigger`, `irq`, `bus`, `fs`
//!    read-only. No `/sys` at all.
//! 10. **`pivot_root`** into the new root, the old root detached; the root made read-only
//!     (a template's stays writable: its writes go to the sandbox's own layer).
//! 11. Host name; loopback up (the network namespace has nothing else: no network); a new
//!     cgroup namespace rooted at the sandbox's group.
//! 12. **rlimits** as a backstop: open files, file size, no core dumps, stack. Init answers
//!     `Prepared` and waits (in the pool, or at once).
//!
//! **Enter**, when a sandbox starts:
//!
//! 13. The host sets the memory limit and sends a detached mount of the sandbox's workspace,
//!     read-write, nosuid, nodev, **idmapped** so that files the server owns on disk belong to
//!     the sandbox user inside and files the sandbox user creates are the server's on disk
//!     (the WASM tier and the native tier share the workspace without `chown`). Init attaches
//!     it at `/home/user`. A template build's sandbox has none: its `/home/user` is part of
//!     the layer the step makes.
//! 14. **Capabilities**: the bounding set emptied; then no supplementary groups and the
//!     sandbox user (1000) for real, effective and saved ids, which clears the permitted and
//!     effective sets; the ambient and inheritable sets cleared.
//! 15. **`no_new_privs`**; init made undumpable (its memory and `/proc` files are not the
//!     guest's to read).
//! 16. **seccomp**: the filters of [`seccomp`], in order, inherited by every process.
//! 17. Init answers `Ready`. Every process it starts gets only the environment the host sends
//!     (built from an allow-list, never the server's own), descriptors 0-2 from the host and
//!     nothing else (every other descriptor init holds is close-on-exec), its own process
//!     group. Init reaps every process that ends (orphans included), reports how the host's
//!     processes ended, signals a process group on the host's request, and passes the signals
//!     it receives itself (TERM, INT, HUP, QUIT, USR1, USR2) to every process of the sandbox.
//!
//! When the sandbox ends, the host kills init, which takes every process of the pid
//! namespace with it, reaps it, kills whatever is left in the control group and removes the
//! group. The mounts existed only in the sandbox's mount namespace and vanish with it. If the
//! server itself dies, every init sees its control socket close and exits, taking its sandbox
//! with it.
//!
//! # Not yet
//!
//! - A disk quota for long-lived workspaces: the workspace of a sandbox made for one execution
//!   is a size-limited tmpfs ([`WorkspaceLimit`]), but a workspace that must outlive the server
//!   (persistent sandboxes) needs a disk-backed limit (a loop-mounted image, or project quotas
//!   where the file system has them; this kernel lacks `CONFIG_QFMT_V2`, so ext4 quotas cannot
//!   run here).
//! - The cgroup v2 path is written against cgroups-rs's v2 support and the kernel's
//!   documentation, but these development machines run v1 and could not exercise it.

mod backend;
pub mod build;
mod cgroup;
mod control;
pub mod dockerfile;
pub mod image;
pub mod layers;
pub mod pool;
mod protocol;
pub mod registry;
mod rootfs;
mod sandbox;
pub mod seccomp;
#[allow(unsafe_code, reason = "the native tier's kernel calls live here, each block justified")]
mod sys;
mod workspace;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;

pub use backend::{NativeBackend, NativeLanguage};
pub use cgroup::{CgroupError, CgroupLimits, host_version as cgroup_version};
use pool::Pool;
pub use protocol::ExitStatus;
use protocol::{BpfInstruction, SetupPlan};
use rootfs::{HostRootfs, RlimitSettings, TmpfsSizes};
pub use rootfs::{
    LayeredRoot, ROOT_HOME, RootfsError, SANDBOX_HOME, SANDBOX_HOSTNAME, SANDBOX_ID_COUNT,
    SANDBOX_UID, SANDBOX_UID_BASE, SandboxNetwork, SandboxRoot,
};
use sandbox::PreparedSandbox;
pub use sandbox::{
    NativeProcess, NativeSandbox, ProcessExit, ProcessId, ProcessSpec, TerminalProcess,
    set_terminal_size,
};
use seccomp::{SeccompError, SeccompFilters};
pub use soulbox_runtime::demand::PoolStats;
pub use workspace::{DEFAULT_EPHEMERAL_WORKSPACE_BYTES, WorkspaceLimit};

/// The init binary, built by `build.rs`.
static INIT_BINARY: &[u8] = include_bytes!(env!("SOULBOX_INIT_BINARY"));

/// A host-side step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    /// Creating the control socket.
    ControlSocket,
    /// Cloning init into new namespaces.
    Clone,
    /// Becoming root of the new user namespace and executing init.
    Exec,
    /// Writing init's uid and gid maps.
    IdMap,
    /// Making a process's pipes.
    Pipes,
    /// Loading the init image into a sealed memfd.
    InitImage,
    /// Making the user namespace of the workspace's idmapped mount.
    WorkspaceIdMap,
}

impl std::fmt::Display for SetupStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ControlSocket => "control socket",
            Self::Clone => "clone into new namespaces",
            Self::Exec => "become root of the user namespace and execute init",
            Self::IdMap => "write the id maps",
            Self::Pipes => "make the process's pipes",
            Self::InitImage => "load the init image",
            Self::WorkspaceIdMap => "make the workspace's id mapping",
        })
    }
}

/// SoulBox failed to build or use a native sandbox.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// A host-side step failed.
    #[error("native sandbox: {step}: {errno}")]
    Host {
        /// The step.
        step: SetupStep,
        /// The kernel's answer.
        errno: nix::Error,
    },
    /// A step of init's isolation sequence failed.
    #[error("native sandbox: isolation step `{step}` failed: {error}")]
    Setup {
        /// The step, as named in the crate docs.
        step: String,
        /// The kernel's answer.
        error: String,
    },
    /// The control group could not be made or used.
    #[error("native sandbox: {0}")]
    Cgroup(#[from] CgroupError),
    /// The root could not be prepared.
    #[error("native sandbox: {0}")]
    Rootfs(#[from] RootfsError),
    /// The seccomp policy did not compile.
    #[error("native sandbox: {0}")]
    Seccomp(#[from] SeccompError),
    /// A process could not be started.
    #[error("{message}")]
    Spawn {
        /// The errno (`ENOENT`: no such command).
        errno: i32,
        /// What failed.
        message: String,
    },
    /// The sandbox's init is gone.
    #[error("the native sandbox has ended")]
    SandboxEnded,
    /// Removing the sandbox failed.
    #[error("native sandbox teardown: {0}")]
    Teardown(String),
    /// A workspace's size limit could not be mounted or removed.
    #[error("workspace size limit on {path}: {errno}")]
    Workspace {
        /// The workspace directory.
        path: PathBuf,
        /// The kernel's answer.
        errno: nix::Error,
    },
    /// This host cannot run native sandboxes.
    #[error("the native tier is unavailable: {0}")]
    Unavailable(String),
}

impl NativeError {
    fn host(step: SetupStep, errno: nix::Error) -> Self {
        Self::Host { step, errno }
    }
}

/// Settings of the native tier. The defaults are closed: no network, the limits below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeConfig {
    /// Where the tier keeps its prepared files (the sandbox `/etc`).
    pub state_dir: PathBuf,
    /// Size of each sandbox's private `/tmp`.
    pub tmp_bytes: u64,
    /// Size of each sandbox's `/dev/shm`.
    pub shm_bytes: u64,
    /// Processes and threads per sandbox.
    pub max_processes: u64,
    /// CPU time per 100 ms, in microseconds (100 000 is one CPU).
    pub cpu_quota_us: u64,
    /// Open files per process.
    pub open_files: u64,
    /// The largest file a process may write.
    pub file_bytes: u64,
    /// The fewest prepared sandboxes (init started, root built, waiting for a workspace) the
    /// tier keeps ready, even when idle, so that a new sandbox is a hand-over.
    pub pool_min: usize,
    /// The most it keeps ready however high the demand; 0 prepares each on demand.
    pub pool_max: usize,
    /// The pool does not grow while less memory than this is available on the host.
    pub pool_min_free_memory_bytes: u64,
    /// The most prepared sandboxes kept ready per template in use (none when idle); 0
    /// prepares each on demand.
    pub template_pool_max: usize,
}

/// Default size of a sandbox's `/tmp`.
pub const DEFAULT_TMP_BYTES: u64 = 256 << 20;
/// Default size of a sandbox's `/dev/shm`.
pub const DEFAULT_SHM_BYTES: u64 = 64 << 20;
/// Default number of processes and threads per sandbox.
pub const DEFAULT_MAX_PROCESSES: u64 = 256;
/// Default CPU quota: one CPU.
pub const DEFAULT_CPU_QUOTA_US: u64 = 100_000;
/// Default open files per process.
pub const DEFAULT_OPEN_FILES: u64 = 1024;
/// Default largest file: 1 GiB.
pub const DEFAULT_FILE_BYTES: u64 = 1 << 30;
/// Default fewest prepared sandboxes kept ready.
pub const DEFAULT_POOL_MIN: usize = 2;
/// Default most prepared sandboxes kept ready.
pub const DEFAULT_POOL_MAX: usize = 32;
/// Default most prepared sandboxes kept ready per template.
pub const DEFAULT_TEMPLATE_POOL_MAX: usize = 8;
/// Default memory the pool leaves to running sandboxes: it does not grow below 1 GiB free.
pub const DEFAULT_POOL_MIN_FREE_MEMORY_BYTES: u64 = 1 << 30;
/// How long the pool waits after a sandbox was taken before it prepares another.
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(20);
/// Memory limit of a prepared sandbox until an execution sets its own.
const PREPARED_MEMORY_BYTES: u64 = soulbox_runtime::DEFAULT_MEMORY_BYTES;
/// Stack size of every process.
const STACK_BYTES: u64 = 8 << 20;

impl NativeConfig {
    /// The defaults, keeping prepared files under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            tmp_bytes: DEFAULT_TMP_BYTES,
            shm_bytes: DEFAULT_SHM_BYTES,
            max_processes: DEFAULT_MAX_PROCESSES,
            cpu_quota_us: DEFAULT_CPU_QUOTA_US,
            open_files: DEFAULT_OPEN_FILES,
            file_bytes: DEFAULT_FILE_BYTES,
            pool_min: DEFAULT_POOL_MIN,
            pool_max: DEFAULT_POOL_MAX,
            pool_min_free_memory_bytes: DEFAULT_POOL_MIN_FREE_MEMORY_BYTES,
            template_pool_max: DEFAULT_TEMPLATE_POOL_MAX,
        }
    }
}

/// What every native sandbox of a server shares: the init image, the prepared root, the
/// compiled seccomp policy and the workspace's id mapping.
#[derive(Debug)]
pub struct NativeTier {
    config: NativeConfig,
    image: OwnedFd,
    null: OwnedFd,
    idmap: OwnedFd,
    rootfs: HostRootfs,
    seccomp: Vec<Vec<BpfInstruction>>,
    pool: Pool,
    /// The pools of the templates in use.
    template_pools: pool::TemplatePools,
    /// Whether the pool's keeper runs; it is woken when a sandbox is taken.
    keeping: AtomicBool,
    taken: Arc<tokio::sync::Notify>,
}

/// Where the writable layers of prepared template sandboxes wait, under the state directory.
const POOLED_ROOTS: &str = "pooled-roots";

/// Numbers the control groups of this process (`soulbox/<pid>-<n>`), across all its tiers.
static NEXT_CGROUP: AtomicU64 = AtomicU64::new(0);

impl NativeTier {
    /// Prepares the tier. Fails with [`NativeError::Unavailable`] when this host cannot run
    /// native sandboxes (not root, no user namespaces, no cgroups), saying why.
    pub fn new(config: NativeConfig) -> Result<Self, NativeError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NativeError::Unavailable(
                "native sandboxes need root (to map user ids and manage cgroups); run `soulbox serve` as root, or use the WASM tier".to_owned(),
            ));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            NativeError::Unavailable(format!("creating {}: {e}", config.state_dir.display()))
        })?;
        let seccomp = SeccompFilters::for_host()?
            .programs()
            .iter()
            .map(|program| {
                program
                    .iter()
                    .map(|i| BpfInstruction { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
                    .collect()
            })
            .collect();
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| NativeError::Unavailable(format!("opening /dev/null: {e}")))?;
        cgroup::remove_stale();
        // The writable layers of an earlier server's prepared template sandboxes.
        let _ = std::fs::remove_dir_all(config.state_dir.join(POOLED_ROOTS));
        Ok(Self {
            image: init_image()?,
            null: null.into(),
            idmap: workspace_idmap()?,
            rootfs: HostRootfs::prepare(&config.state_dir)?,
            seccomp,
            pool: Pool::new(config.pool_min, config.pool_max),
            template_pools: pool::TemplatePools::default(),
            config,
            keeping: AtomicBool::new(false),
            taken: Arc::default(),
        })
    }

    /// The tier's settings.
    pub fn config(&self) -> &NativeConfig {
        &self.config
    }

    /// Starts a sandbox on `root` with `workspace` at `/home/user` and a memory limit for all
    /// its processes. A sandbox of the default root comes from the pool when one waits there
    /// (then the pool refills in the background); any other is prepared now.
    pub async fn start_sandbox(
        self: &Arc<Self>,
        root: &SandboxRoot,
        workspace: &Path,
        memory_bytes: u64,
    ) -> Result<NativeSandbox, NativeError> {
        if let SandboxRoot::Layers(layered) = root {
            return self.start_template_sandbox(layered, workspace, memory_bytes).await;
        }
        let pooled = self.pool.take();
        tracing::debug!(from_pool = pooled.is_some(), "starting a native sandbox");
        self.warm();
        self.taken.notify_one();
        match pooled {
            Some(prepared) => match prepared.enter(self, Some(workspace), memory_bytes).await {
                Ok(sandbox) => Ok(sandbox),
                // A pooled init that died meanwhile (killed from outside): prepare afresh.
                Err(e) => {
                    tracing::warn!(error = %e, "a prepared sandbox failed; preparing another");
                    self.prepare(root, SandboxNetwork::Isolated)
                        .await?
                        .enter(self, Some(workspace), memory_bytes)
                        .await
                }
            },
            None => {
                self.prepare(root, SandboxNetwork::Isolated)
                    .await?
                    .enter(self, Some(workspace), memory_bytes)
                    .await
            }
        }
    }

    /// Starts a sandbox of a template: a prepared one from the template's pool when one waits
    /// there and the sandbox has no writable layer yet (a sandbox that comes back keeps its
    /// own), else one prepared now.
    async fn start_template_sandbox(
        self: &Arc<Self>,
        root: &LayeredRoot,
        workspace: &Path,
        memory_bytes: u64,
    ) -> Result<NativeSandbox, NativeError> {
        let pooled = !root.template.is_empty()
            && self.config.template_pool_max > 0
            && !root.writable.exists();
        if pooled {
            let pool = self.template_pools.of(root, self.config.template_pool_max);
            let taken = pool.pool.take();
            self.warm();
            self.taken.notify_one();
            if let Some(mut taken) = taken
                && let Some(prepared) = taken.prepared.take()
            {
                let moved = root
                    .writable
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::rename(&taken.writable, &root.writable));
                match moved {
                    Ok(()) => match prepared.enter(self, Some(workspace), memory_bytes).await {
                        Ok(sandbox) => return Ok(sandbox),
                        Err(e) => {
                            tracing::warn!(error = %e, "a prepared template sandbox failed; preparing another");
                            let _ = std::fs::remove_dir_all(&root.writable);
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "moving a prepared writable layer"),
                }
            }
        }
        let fresh = SandboxRoot::Layers(root.clone());
        let prepared = self.prepare(&fresh, SandboxNetwork::Isolated).await?;
        prepared.enter(self, Some(workspace), memory_bytes).await
    }

    /// Each template pool's state, by template build.
    pub fn template_pool_stats(&self) -> Vec<(String, PoolStats)> {
        self.template_pools.stats()
    }

    /// Starts a sandbox on `root` without a workspace (its `/home/user` is part of the root),
    /// as a template build's steps run, on `network`.
    pub async fn start_build_sandbox(
        self: &Arc<Self>,
        root: &SandboxRoot,
        network: SandboxNetwork,
        memory_bytes: u64,
    ) -> Result<NativeSandbox, NativeError> {
        self.prepare(root, network).await?.enter(self, None, memory_bytes).await
    }

    /// Starts the pool's keeper in the background, once (a server calls it when it is up, so
    /// that its first sandboxes are hand-overs too; a start calls it too). It fills the pool
    /// to its target and trims what idle demand no longer needs, until the tier is dropped.
    /// Must be called within a tokio runtime.
    pub fn warm(self: &Arc<Self>) {
        let pools = self.pool.enabled() || self.config.template_pool_max > 0;
        if !pools || self.keeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let tier = Arc::downgrade(self);
        let taken = Arc::clone(&self.taken);
        tokio::spawn(async move {
            while let Some(tier) = tier.upgrade() {
                tier.keep_pool().await;
                drop(tier);
                tokio::select! {
                    // The request that took a sandbox usually runs its first command at
                    // once: let it, rather than compete with it for the CPU and the kernel's
                    // namespace and cgroup locks.
                    () = taken.notified() => tokio::time::sleep(REFILL_DELAY).await,
                    () = tokio::time::sleep(pool::MAINTENANCE_INTERVAL) => {}
                }
            }
        });
    }

    /// How many prepared sandboxes wait in the pool.
    pub fn pooled(&self) -> usize {
        self.pool.ready()
    }

    /// The pool's state: ready, target, hits and misses, demand.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Looks after the default root's pool and each template's.
    async fn keep_pool(&self) {
        self.keep_host_pool().await;
        for template in self.template_pools.all() {
            self.keep_template_pool(&template).await;
        }
    }

    /// Trims a template's pool to its target, then fills it while memory allows.
    async fn keep_template_pool(&self, template: &pool::TemplatePool) {
        let surplus = template.pool.surplus();
        if !surplus.is_empty() {
            let _ = tokio::task::spawn_blocking(move || drop(surplus)).await;
        }
        loop {
            let missing = template.pool.missing();
            if missing == 0
                || soulbox_runtime::host_memory::available_bytes()
                    < self.config.pool_min_free_memory_bytes
            {
                return;
            }
            let batch = missing.min(pool::PARALLEL_PREPARES);
            let prepared =
                futures::future::join_all((0..batch).map(|_| self.prepare_template(template)))
                    .await;
            for prepared in prepared {
                match prepared {
                    Ok(prepared) => template.pool.put(prepared),
                    Err(e) => {
                        tracing::warn!(error = %e, template = %template.root.template, "preparing a template sandbox for its pool");
                        return;
                    }
                }
            }
        }
    }

    /// A sandbox of a template's pool, with a writable layer of its own under the tier's
    /// state directory.
    async fn prepare_template(
        &self,
        template: &pool::TemplatePool,
    ) -> Result<pool::PreparedRoot, NativeError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let writable =
            self.config.state_dir.join(POOLED_ROOTS).join(format!("{}-{n}", std::process::id()));
        let root = LayeredRoot { writable: writable.clone(), ..template.root.clone() };
        let prepared = self.prepare(&SandboxRoot::Layers(root), SandboxNetwork::Isolated).await;
        match prepared {
            Ok(prepared) => Ok(pool::PreparedRoot { prepared: Some(prepared), writable }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&writable);
                Err(e)
            }
        }
    }

    /// Trims the default root's pool to its target, then fills it (a few at a time) while
    /// memory allows.
    async fn keep_host_pool(&self) {
        let surplus = self.pool.surplus();
        if !surplus.is_empty() {
            // Tearing down reaps init: off the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(surplus)).await;
        }
        loop {
            let missing = self.pool.missing();
            if missing == 0 {
                return;
            }
            if soulbox_runtime::host_memory::available_bytes()
                < self.config.pool_min_free_memory_bytes
            {
                tracing::debug!("the host is short of memory: the pool waits");
                return;
            }
            let batch = missing.min(pool::PARALLEL_PREPARES);
            let prepared = futures::future::join_all(
                (0..batch).map(|_| self.prepare(&SandboxRoot::Host, SandboxNetwork::Isolated)),
            )
            .await;
            for prepared in prepared {
                match prepared {
                    Ok(prepared) => self.pool.put(prepared),
                    Err(e) => {
                        tracing::warn!(error = %e, "preparing a sandbox for the pool");
                        return;
                    }
                }
            }
        }
    }

    async fn prepare(
        &self,
        root: &SandboxRoot,
        network: SandboxNetwork,
    ) -> Result<PreparedSandbox, NativeError> {
        let limits = CgroupLimits {
            memory_bytes: PREPARED_MEMORY_BYTES,
            max_processes: self.config.max_processes,
            cpu_quota_us: self.config.cpu_quota_us,
        };
        let n = NEXT_CGROUP.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}", std::process::id());
        PreparedSandbox::prepare(self, &name, limits, root, network).await
    }

    fn plan(&self, root: &SandboxRoot, mounts: Vec<String>, network: SandboxNetwork) -> SetupPlan {
        let tmpfs =
            TmpfsSizes { tmp_bytes: self.config.tmp_bytes, shm_bytes: self.config.shm_bytes };
        let rlimits = RlimitSettings {
            open_files: self.config.open_files,
            file_bytes: self.config.file_bytes,
            stack_bytes: STACK_BYTES,
        };
        let mut plan = self.rootfs.plan(root, mounts, tmpfs, rlimits, self.seccomp.clone());
        plan.host_network = network == SandboxNetwork::Host;
        plan
    }
}

/// The init binary in a sealed memfd: it can be executed, never written.
fn init_image() -> Result<OwnedFd, NativeError> {
    let error = |e| NativeError::host(SetupStep::InitImage, e);
    let memfd = memfd_create(c"soulbox-init", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(error)?;
    let mut file = File::from(memfd);
    file.write_all(INIT_BINARY).map_err(|e| error(io_errno(&e)))?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(error)?;
    Ok(file.into())
}

/// A user namespace mapping the server's uid 0 to the sandbox user's host uid, for the
/// workspace's idmapped mount: made once, by a child that waits in it while its maps are
/// written and the namespace is opened.
fn workspace_idmap() -> Result<OwnedFd, NativeError> {
    let error = |e| NativeError::host(SetupStep::WorkspaceIdMap, e);
    let holder = sys::spawn::clone_user_namespace_holder().map_err(error)?;
    let result = (|| {
        // On disk, the server's files are the sandbox user's, and the sandbox root's files
        // carry the root's own host uid (as in a rootless container).
        let map = format!(
            "0 {} 1\n{SANDBOX_UID_BASE} {SANDBOX_UID_BASE} 1\n",
            SANDBOX_UID_BASE + SANDBOX_UID
        );
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{holder}/{file}"), &map)
                .map_err(|e| error(io_errno(&e)))?;
        }
        let namespace =
            File::open(format!("/proc/{holder}/ns/user")).map_err(|e| error(io_errno(&e)))?;
        Ok(OwnedFd::from(namespace))
    })();
    let _ = kill(holder, Signal::SIGKILL);
    let _ = waitpid(holder, None);
    result
}

/// The errno of an I/O error (EIO when it has none).
pub(crate) fn io_errno(e: &std::io::Error) -> nix::Error {
    e.raw_os_error().map_or(nix::Error::EIO, nix::Error::from_raw)
}
