//! The WASM tier as a [`Backend`]: one kernel per sandbox and language, started on the first
//! cell from the pack's pre-initialised image and kept until the sandbox closes (or until a
//! cell stops it mid-way: a timeout, a memory or output limit, a crash).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use soulbox_runtime::{
    Backend, BackendError, BackendOutcome, EventSink, ExecKind, ExecRequest, Language,
    LanguageStatus, LanguageSupport, ResourceUsage, Sandbox, SandboxId, Tier,
};

use crate::WasmError;
use crate::engine::{EngineSettings, WasmEngine};
use crate::kernel::{HostedKernel, Kernel, KernelPlace};
use crate::pack::{self, InstallProgress, LoadedPack};
use crate::warm::{self, WarmConfig, WarmKernel, WarmPools};
use crate::worker::{WorkerCommand, Workers};
use soulbox_runtime::Limits;
use soulbox_runtime::demand::PoolStats;

/// How often the warm pools are looked after when nothing is taken.
const WARM_INTERVAL: Duration = Duration::from_millis(250);
/// How long the warm pools wait after a take before they refill.
const WARM_REFILL_DELAY: Duration = Duration::from_millis(20);

type KernelSlot = Arc<tokio::sync::Mutex<Option<HostedKernel>>>;

/// A kernel's key: its sandbox, language and cell context (`None`: the default one).
type KernelKey = (SandboxId, Language, Option<String>);

/// The WASM tier. Build it with [`WasmBackend::builder`].
///
/// Defaults are closed: a kernel sees only its sandbox's workspace (read-write, at
/// `/home/user`), its private scratch directory (`/`), and its pack's read-only libraries; no
/// sockets; no environment but the interpreter's own and what the sandbox and request give;
/// memory, wall time and output bounded by the execution's [`soulbox_runtime::Limits`].
#[derive(Debug)]
pub struct WasmBackend {
    engine: WasmEngine,
    data_dir: PathBuf,
    packs: RwLock<BTreeMap<Language, Arc<LoadedPack>>>,
    kernels: Mutex<HashMap<KernelKey, KernelSlot>>,
    /// The memory size of each started kernel, for [`Backend::usage`].
    memory: Mutex<HashMap<KernelKey, Arc<AtomicU64>>>,
    /// The time each sandbox's cells have run (on the server's threads, each cell on one).
    cell_time: Mutex<HashMap<SandboxId, Duration>>,
    next_kernel: AtomicU64,
    /// Kernels alive now, and how many the engine's pool can hold.
    live_kernels: Arc<std::sync::atomic::AtomicUsize>,
    max_kernels: usize,
    /// Warm kernels, for a server ([`WasmBackend::start_warm_pools`]).
    warm: std::sync::OnceLock<WarmPools>,
    warm_taken: Arc<tokio::sync::Notify>,
    /// Worker processes the kernels run in, if any (else on this process's threads).
    workers: Option<Workers>,
}

/// Builds a [`WasmBackend`].
#[derive(Debug, Clone)]
pub struct WasmBackendBuilder {
    data_dir: PathBuf,
    settings: EngineSettings,
    workers: Option<WorkerCommand>,
}

impl WasmBackendBuilder {
    /// How many instances may be alive at once (default
    /// [`crate::engine::DEFAULT_MAX_INSTANCES`]).
    pub fn max_instances(mut self, max_instances: u32) -> Self {
        self.settings.max_instances = max_instances;
        self
    }

    /// Runs kernels in worker processes started with `command` (see [`crate::worker`])
    /// instead of on this process's threads. Each worker gets an equal share of the instance
    /// slots, and some room to spare.
    pub fn workers(mut self, command: WorkerCommand) -> Self {
        self.workers = Some(command);
        self
    }

    /// Builds the engine and loads every installed pack.
    pub fn build(self) -> Result<WasmBackend, WasmError> {
        let engine = WasmEngine::new(&self.settings, &pack::module_cache_dir(&self.data_dir))?;
        let backend = WasmBackend {
            engine,
            data_dir: self.data_dir,
            packs: RwLock::default(),
            kernels: Mutex::default(),
            memory: Mutex::default(),
            cell_time: Mutex::default(),
            next_kernel: AtomicU64::new(0),
            live_kernels: Arc::default(),
            max_kernels: usize::try_from(self.settings.max_instances).unwrap_or(usize::MAX),
            warm: std::sync::OnceLock::new(),
            warm_taken: Arc::default(),
            workers: self.workers.map(Workers::new),
        };
        for record in pack::installed_packs(&backend.data_dir) {
            backend.load(record)?;
        }
        Ok(backend)
    }
}

impl WasmBackend {
    /// A builder whose packs and module cache live under `data_dir`.
    pub fn builder(data_dir: impl Into<PathBuf>) -> WasmBackendBuilder {
        WasmBackendBuilder {
            data_dir: data_dir.into(),
            settings: EngineSettings::default(),
            workers: None,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &WasmEngine {
        &self.engine
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kernels alive now, and the most that can be (the engine's instance slots, which plugin
    /// runs share).
    pub fn kernels(&self) -> (usize, usize) {
        (self.live_kernels.load(Ordering::Relaxed), self.max_kernels)
    }

    /// Whether sandbox `sandbox` has had a kernel for `language` in `context` (its next cell
    /// needs no new slot, unless a limit ended that kernel).
    pub fn has_kernel(
        &self,
        sandbox: &SandboxId,
        language: &Language,
        context: Option<&str>,
    ) -> bool {
        let key = (sandbox.clone(), language.clone(), context.map(str::to_owned));
        self.kernels.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&key)
    }

    /// Starts keeping warm kernels of every installed language (see [`crate::warm`]), their
    /// prepared directories under `root` (on the sandboxes' filesystem), until the backend is
    /// dropped. Once; must be called within a tokio runtime.
    pub fn start_warm_pools(
        self: &Arc<Self>,
        root: PathBuf,
        config: WarmConfig,
    ) -> Result<(), WasmError> {
        if config.max == 0 || self.warm.get().is_some() {
            return Ok(());
        }
        if self.warm.set(WarmPools::new(root, config)?).is_err() {
            return Ok(());
        }
        let backend = Arc::downgrade(self);
        let taken = Arc::clone(&self.warm_taken);
        // Warm-up cells are executions: on the execution threads, apart from the API's.
        soulbox_runtime::execution_threads().spawn(async move {
            while let Some(backend) = backend.upgrade() {
                backend.keep_warm().await;
                drop(backend);
                tokio::select! {
                    // A sandbox that took a kernel runs its cell at once: let it.
                    () = taken.notified() => tokio::time::sleep(WARM_REFILL_DELAY).await,
                    () = tokio::time::sleep(WARM_INTERVAL) => {}
                }
            }
        });
        Ok(())
    }

    /// A warm kernel of `language` for a new sandbox, if one waits (see
    /// [`WasmBackend::adopt`]).
    pub fn take_warm(&self, language: &Language) -> Option<WarmKernel> {
        let pools = self.warm.get()?;
        if !self.pack(language)?.record.spec.driver.warms() {
            return None;
        }
        let taken = pools.of(language).take();
        self.warm_taken.notify_one();
        taken
    }

    /// Gives `sandbox` (made in `warm`'s directory) its warm kernel, as the kernel of its
    /// default context.
    pub fn adopt(&self, sandbox: &Sandbox, warm: WarmKernel) {
        let language = warm.language().clone();
        let Some(base) = sandbox.workspace().parent() else { return };
        let Some(kernel) = warm.into_kernel(base) else { return };
        let key = (sandbox.id().clone(), language, None);
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), kernel.memory_gauge());
        let slot = Arc::new(tokio::sync::Mutex::new(Some(kernel)));
        self.kernels.lock().unwrap_or_else(PoisonError::into_inner).insert(key, slot);
    }

    /// The warm pools' state, by language.
    pub fn warm_stats(&self) -> Vec<(Language, PoolStats)> {
        self.warm.get().map(WarmPools::stats).unwrap_or_default()
    }

    /// Trims each language's pool to its target, then fills it, one kernel at a time, while
    /// memory and kernel slots allow.
    async fn keep_warm(&self) {
        let Some(pools) = self.warm.get() else { return };
        let languages: Vec<Language> = self
            .packs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|pack| pack.record.spec.driver.warms())
            .map(|pack| pack.language().clone())
            .collect();
        for language in languages {
            let pool = pools.of(&language);
            drop(pool.surplus());
            for _ in 0..pool.missing() {
                let (live, max) = self.kernels();
                let room = live < max / 4 * 3;
                let memory = soulbox_runtime::host_memory::available_bytes()
                    >= pools.config.min_free_memory_bytes;
                if !room || !memory {
                    return;
                }
                match self.prepare_warm(pools, &language).await {
                    Ok(warm) => pool.put(warm),
                    Err(error) => {
                        tracing::warn!(%language, %error, "preparing a warm kernel");
                        break;
                    }
                }
            }
        }
    }

    async fn prepare_warm(
        &self,
        pools: &WarmPools,
        language: &Language,
    ) -> Result<WarmKernel, WasmError> {
        let pack = self.installed(language)?;
        let n = self.next_kernel.fetch_add(1, Ordering::Relaxed);
        let dir = pools.root.join(format!("{language}-{n}"));
        warm::prepare(dir, language.clone(), |workspace, state| async move {
            let scratch = state.join(format!("wasm-{language}-{n}"));
            let started = self.start_kernel(&pack, &workspace, scratch, &Limits::default()).await?;
            started.map_err(|termination| {
                WasmError::Sandbox(format!("starting a warm {language} kernel: {termination}"))
            })
        })
        .await
    }

    /// Starts a kernel of `pack` in a worker process, or here when there are none; it counts
    /// among the live kernels while it exists.
    async fn start_kernel(
        &self,
        pack: &LoadedPack,
        workspace: &Path,
        scratch: PathBuf,
        limits: &Limits,
    ) -> Result<Result<HostedKernel, soulbox_runtime::Termination>, WasmError> {
        let place = match &self.workers {
            Some(workers) => workers
                .start(pack.language(), workspace, scratch, limits)
                .await?
                .map(KernelPlace::InWorker),
            None => {
                let driver = pack.record.spec.driver;
                Kernel::start(&pack.image, driver, &pack.dir, workspace, scratch, limits)
                    .await?
                    .map(KernelPlace::InProcess)
            }
        };
        Ok(place.map(|place| HostedKernel::new(place, &self.live_kernels)))
    }

    /// The process ids of the worker processes running now (none when kernels run here).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.as_ref().map(Workers::pids).unwrap_or_default()
    }

    /// The loaded pack of `language`, loading the packs installed since (by another process)
    /// if it is not loaded yet.
    pub(crate) fn installed_or_rescan(
        &self,
        language: &Language,
    ) -> Result<Arc<LoadedPack>, WasmError> {
        if let Some(pack) = self.pack(language) {
            return Ok(pack);
        }
        for record in pack::installed_packs(&self.data_dir) {
            if record.spec.language == *language {
                return self.load(record);
            }
        }
        self.installed(language)
    }

    /// The loaded pack of `language`, or the error that says how to install it.
    fn installed(&self, language: &Language) -> Result<Arc<LoadedPack>, WasmError> {
        self.pack(language).ok_or_else(|| WasmError::NotInstalled {
            language: language.clone(),
            install_command: pack::install_command(language),
        })
    }

    /// A loaded pack.
    pub fn pack(&self, language: &Language) -> Option<Arc<LoadedPack>> {
        self.packs.read().unwrap_or_else(PoisonError::into_inner).get(language).cloned()
    }

    fn load(&self, record: pack::InstalledPack) -> Result<Arc<LoadedPack>, WasmError> {
        let loaded = Arc::new(LoadedPack::load(&self.engine, &self.data_dir, record)?);
        self.packs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(loaded.language().clone(), loaded.clone());
        Ok(loaded)
    }

    /// Installs a pack (see [`pack::install`]) and loads it; kernels started afterwards use it.
    pub async fn install(
        &self,
        spec: &pack::PackSpec,
        progress: &dyn InstallProgress,
    ) -> Result<Arc<LoadedPack>, WasmError> {
        let record = pack::install(&self.engine, &self.data_dir, spec, progress).await?;
        self.load(record)
    }

    /// Runs one cell of `language` on its interpreter as shipped, starting it from scratch
    /// instead of from the pre-initialised image (for benchmarks: what the image saves).
    pub async fn run_without_preinit(
        &self,
        language: &Language,
        code: &str,
    ) -> Result<soulbox_runtime::Termination, WasmError> {
        let pack = self.installed(language)?;
        let spec = &pack.record.spec;
        let module = self.engine.load_module(&spec.wasm.sha256, pack.plain_module_path())?;
        let linker = pack::linker(&self.engine, spec.driver, &module)
            .map_err(|e| WasmError::Sandbox(format!("linking: {e:#}")))?;
        crate::kernel::run_without_image(
            self.engine.engine(),
            &linker,
            &module,
            spec.driver,
            &pack.dir,
            code,
        )
        .await
    }

    fn slot(&self, sandbox: &SandboxId, language: &Language, context: Option<&str>) -> KernelSlot {
        let mut kernels = self.kernels.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (sandbox.clone(), language.clone(), context.map(str::to_owned));
        kernels.entry(key).or_default().clone()
    }

    /// Takes the kernels matching `which` out of the table and drops them.
    async fn drop_kernels(&self, which: impl Fn(&KernelKey) -> bool) {
        let slots: Vec<KernelSlot> = {
            let mut kernels = self.kernels.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<_> = kernels.keys().filter(|key| which(key)).cloned().collect();
            self.memory.lock().unwrap_or_else(PoisonError::into_inner).retain(|key, _| !which(key));
            keys.iter().filter_map(|key| kernels.remove(key)).collect()
        };
        for slot in slots {
            slot.lock().await.take();
        }
    }

    async fn run_cell(
        &self,
        sandbox: &Sandbox,
        request: &ExecRequest,
        language: &Language,
        code: &str,
        events: &EventSink,
    ) -> Result<BackendOutcome, WasmError> {
        let pack = self.installed(language)?;
        let slot = self.slot(sandbox.id(), language, request.context.as_deref());
        let mut parked = slot.lock().await;
        let startup_began = Instant::now();
        // The kernel is taken out of its slot while it runs and put back only if it can run
        // another cell: if this future is dropped mid-cell (the caller left, the sandbox is
        // closing), the half-run kernel is dropped with it.
        let mut kernel = match parked.take() {
            Some(kernel) => kernel,
            None => {
                let n = self.next_kernel.fetch_add(1, Ordering::Relaxed);
                let scratch = sandbox.state_dir().join(format!("wasm-{language}-{n}"));
                tracing::debug!(%language, "starting a kernel");
                let started =
                    self.start_kernel(&pack, sandbox.workspace(), scratch, &request.limits).await?;
                match started {
                    Ok(kernel) => {
                        let key = (sandbox.id().clone(), language.clone(), request.context.clone());
                        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
                        memory.insert(key, kernel.memory_gauge());
                        kernel
                    }
                    Err(termination) => {
                        let startup = startup_began.elapsed();
                        return Ok(BackendOutcome { termination, startup, run: Duration::ZERO });
                    }
                }
            }
        };
        let startup = startup_began.elapsed();
        tracing::debug!(?startup, "running the cell");
        let mut env = sandbox.spec().env.clone();
        env.extend(request.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let run_began = Instant::now();
        let end = kernel.run_cell(code, &env, &request.limits, events).await;
        let run = run_began.elapsed();
        *self
            .cell_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(sandbox.id().clone())
            .or_default() += run;
        if end.reusable {
            *parked = Some(kernel);
        }
        Ok(BackendOutcome { termination: end.termination, startup, run })
    }
}

#[async_trait]
impl Backend for WasmBackend {
    fn tier(&self) -> Tier {
        Tier::Wasm
    }

    fn languages(&self) -> Vec<LanguageSupport> {
        pack::manifest()
            .iter()
            .map(|spec| {
                let status = if self.pack(&spec.language).is_some() {
                    LanguageStatus::Ready
                } else {
                    LanguageStatus::NotInstalled {
                        install_command: pack::install_command(&spec.language),
                    }
                };
                LanguageSupport { language: spec.language.clone(), status }
            })
            .collect()
    }

    fn runs_commands(&self) -> bool {
        false
    }

    async fn exec(
        &self,
        sandbox: &Sandbox,
        request: ExecRequest,
        events: &EventSink,
    ) -> Result<BackendOutcome, BackendError> {
        let failed = |e: WasmError| BackendError { tier: Tier::Wasm, message: e.to_string() };
        match &request.kind {
            ExecKind::Cell { language, code } => {
                self.run_cell(sandbox, &request, language, code, events).await.map_err(failed)
            }
            ExecKind::Command { .. } => {
                Err(failed(WasmError::Sandbox("the WASM tier runs cells, not commands".into())))
            }
        }
    }

    fn usage(&self, sandbox: &SandboxId) -> ResourceUsage {
        let memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let memory_bytes = memory
            .iter()
            .filter(|((id, _, _), _)| id == sandbox)
            .map(|(_, size)| size.load(Ordering::Relaxed))
            .sum();
        // A cell runs on one of the server's threads, busy for as long as it runs.
        let cell_time = self.cell_time.lock().unwrap_or_else(PoisonError::into_inner);
        let cpu_time = cell_time.get(sandbox).copied().unwrap_or_default();
        ResourceUsage { cpu_time, memory_bytes }
    }

    async fn reset_context(&self, sandbox: &SandboxId, context: &str) {
        self.drop_kernels(|(id, _, c)| id == sandbox && c.as_deref() == Some(context)).await;
    }

    async fn close(&self, sandbox: &SandboxId) {
        self.cell_time.lock().unwrap_or_else(PoisonError::into_inner).remove(sandbox);
        self.drop_kernels(|(id, _, _)| id == sandbox).await;
    }
}
