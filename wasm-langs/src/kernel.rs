//! A kernel: one interpreter instance bound to one sandbox and one language, kept between
//! cells so that state persists, and never shared with another sandbox.
//!
//! Each kernel is a fresh instance of its pack's pre-initialised image, with its own store,
//! its own WASI context (the sandbox's workspace and a private scratch directory preopened, no
//! sockets, no inherited environment or stdio), a memory limiter and an epoch deadline that
//! yields to the host at every tick, so a wall-clock timeout can stop it at any point.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use soulbox_runtime::{EventSink, ExecEvent, Limits, OutputStream, Termination};
use wasmtime::{Instance, InstancePre, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::WasmError;
use crate::lang::{CellInput, Driver, DriverState, Preopen};
use crate::output::CellOutput;

/// What a store holds for its instance.
pub struct KernelState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
}

impl std::fmt::Debug for KernelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelState").field("limiter", &self.limiter).finish_non_exhaustive()
    }
}

/// Refuses linear-memory growth past the execution's limit, and remembers that it did;
/// keeps the size the guest's memory has grown to where the host can read it while the
/// guest runs (zero once the store is gone).
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit_bytes: u64,
    exceeded: bool,
    size_bytes: Arc<AtomicU64>,
}

/// The most table elements a guest may grow a table to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryLimiter {
    pub(crate) fn new(limit_bytes: u64) -> Self {
        Self { limit_bytes, exceeded: false, size_bytes: Arc::default() }
    }

    /// Sets the limit for the next execution, forgetting that an earlier one was exceeded.
    pub(crate) fn set_limit(&mut self, limit_bytes: u64) {
        self.limit_bytes = limit_bytes;
        self.exceeded = false;
    }

    /// The size of the guest's memory, readable from anywhere.
    pub(crate) fn size_gauge(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.size_bytes)
    }

    /// Whether the guest tried to grow past the limit.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.size_bytes.store(0, Ordering::Relaxed);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if u64::try_from(desired).unwrap_or(u64::MAX) > self.limit_bytes {
            self.exceeded = true;
            // An error (not `Ok(false)`) traps the guest: the limit is a hard stop, like the
            // cgroup OOM kill of the native tier, not an allocation failure it may catch.
            wasmtime::bail!("memory limit of {} bytes exceeded", self.limit_bytes);
        }
        self.size_bytes.store(u64::try_from(desired).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Builds the WASI context of an instance. Closed by default: stdin empty, no arguments
/// beyond the program name, only the listed environment, only the listed directories, no
/// network (wasmtime-wasi denies sockets unless allowed).
pub(crate) fn wasi_context(
    argv: &[impl AsRef<str>],
    env: &[(impl AsRef<str>, impl AsRef<str>)],
    stdin: Vec<u8>,
    preopens: &[Preopen],
    output: &CellOutput,
) -> Result<WasiP1Ctx, WasmError> {
    let mut builder = WasiCtxBuilder::new();
    builder
        // File operations run on the guest's own thread rather than tokio's blocking pool:
        // cheaper, and a worker process stays on one thread (see `crate::worker`).
        .allow_blocking_current_thread(true)
        .args(argv)
        .envs(env)
        .stdin(MemoryInputPipe::new(stdin))
        .stdout(output.stream(OutputStream::Stdout))
        .stderr(output.stream(OutputStream::Stderr));
    for preopen in preopens {
        let perms = if preopen.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
        builder.preopened_dir(&preopen.host, &preopen.guest, perms).map_err(|e| {
            let host = preopen.host.display();
            WasmError::Sandbox(format!("preopening {host} at {}: {e}", preopen.guest))
        })?;
    }
    Ok(builder.build_p1())
}

/// The store of a language driver's guest: the driver's arguments and environment, its
/// preopens (the pack's libraries, `scratch` as `/` where it has one, `workspace` as
/// `/home/user`), output into `output`, memory capped at `memory_limit_bytes`. The one way a
/// kernel, a snapshot and the no-image benchmark set up their guest.
pub(crate) fn driver_store(
    engine: &wasmtime::Engine,
    driver: Driver,
    pack_dir: &Path,
    scratch: &Path,
    workspace: &Path,
    output: &CellOutput,
    memory_limit_bytes: u64,
) -> Result<Store<KernelState>, WasmError> {
    let preopens = driver.preopens(pack_dir, scratch, workspace);
    let wasi = wasi_context(driver.argv(), driver.base_env(), Vec::new(), &preopens, output)?;
    Ok(new_store(engine, wasi, memory_limit_bytes))
}

/// A store configured for a guest: limiter installed, epoch deadline yielding every tick.
pub(crate) fn new_store(
    engine: &wasmtime::Engine,
    wasi: WasiP1Ctx,
    memory_limit_bytes: u64,
) -> Store<KernelState> {
    let state = KernelState { wasi, limiter: MemoryLimiter::new(memory_limit_bytes) };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    store
}

/// A live interpreter for one sandbox and one language.
#[derive(Debug)]
pub(crate) struct Kernel {
    store: Store<KernelState>,
    instance: Instance,
    driver: Driver,
    state: DriverState,
    output: CellOutput,
    scratch: Option<ScratchDir>,
    cells_run: u64,
}

/// One among a count of live things, for as long as it lives.
#[derive(Debug)]
pub(crate) struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    pub(crate) fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A kernel's private scratch directory (its `/`), with a capability handle for the host's
/// own reads there; removed when dropped.
#[derive(Debug)]
struct ScratchDir {
    path: PathBuf,
    dir: cap_std::fs::Dir,
}

impl ScratchDir {
    fn create(driver: Driver, path: PathBuf) -> Result<Self, WasmError> {
        prepare_scratch(driver, &path)?;
        let dir = cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority())
            .map_err(|source| WasmError::Io { path: path.clone(), source })?;
        Ok(Self { path, dir })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How a cell ended, and whether the kernel can run another.
#[derive(Debug)]
pub(crate) struct CellEnd {
    pub(crate) termination: Termination,
    /// False when the interpreter was stopped mid-way; the kernel must be dropped.
    pub(crate) reusable: bool,
}

impl Kernel {
    /// Follows its directory's move from `from` to `to` (a warm kernel's prepared directory
    /// adopted by a sandbox): its scratch directory, if inside, is then removed where it is.
    pub(crate) fn moved(&mut self, from: &Path, to: &Path) {
        if let Some(scratch) = &mut self.scratch
            && let Ok(rest) = scratch.path.strip_prefix(from)
        {
            scratch.path = to.join(rest);
        }
    }

    /// The size of its memory, readable while it runs.
    pub(crate) fn memory_gauge(&self) -> Arc<AtomicU64> {
        self.store.data().limiter.size_gauge()
    }

    /// Starts a kernel from a pack's image, with `workspace` at `/home/user` and a fresh
    /// scratch directory at `scratch`.
    pub(crate) async fn start(
        pre: &InstancePre<KernelState>,
        driver: Driver,
        pack_dir: &Path,
        workspace: &Path,
        scratch: PathBuf,
        limits: &Limits,
    ) -> Result<Result<Self, Termination>, WasmError> {
        let scratch =
            if driver.has_scratch() { Some(ScratchDir::create(driver, scratch)?) } else { None };
        let output = CellOutput::default();
        let scratch_path = scratch.as_ref().map_or(Path::new(""), |s| s.path.as_path());
        let engine = pre.module().engine();
        let mut store = driver_store(
            engine,
            driver,
            pack_dir,
            scratch_path,
            workspace,
            &output,
            limits.memory_bytes,
        )?;
        let instance = match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(error) => {
                if store.data().limiter.exceeded() {
                    return Ok(Err(Termination::MemoryExceeded {
                        limit_bytes: limits.memory_bytes,
                    }));
                }
                return Err(WasmError::Sandbox(format!(
                    "instantiating the {driver:?} image: {error:#}"
                )));
            }
        };
        let state = driver.attach(&mut store, &instance).await.map_err(|e| {
            WasmError::Sandbox(format!("attaching to the {driver:?} kernel: {e:#}"))
        })?;
        Ok(Ok(Self { store, instance, driver, state, output, scratch, cells_run: 0 }))
    }

    /// Runs one cell under `limits`, streaming its output and results to `events`.
    pub(crate) async fn run_cell(
        &mut self,
        code: &str,
        env: &std::collections::BTreeMap<String, String>,
        limits: &Limits,
        events: &EventSink,
    ) -> CellEnd {
        self.output.begin(events, limits);
        self.store.data_mut().limiter.set_limit(limits.memory_bytes);
        let scratch = self.scratch.as_ref().map(|s| &s.dir);
        let cell =
            CellInput { code, env, number: self.cells_run, fresh: self.cells_run == 0, scratch };
        self.cells_run += 1;
        let run = self.driver.run_cell(&mut self.store, &self.instance, self.state, &cell);
        let outcome = tokio::time::timeout(limits.wall_timeout, run).await;
        let overflowed = self.output.end();
        let memory_exceeded = self.store.data().limiter.exceeded();
        match outcome {
            Err(_elapsed) => CellEnd {
                termination: Termination::TimedOut { limit_ms: millis(limits.wall_timeout) },
                reusable: false,
            },
            Ok(Ok(report)) => {
                for result in report.results {
                    events.send(ExecEvent::Result(result));
                }
                if let Some(error) = report.error {
                    events.send(ExecEvent::Error(error));
                }
                CellEnd {
                    termination: Termination::Exited { code: report.exit_code },
                    reusable: true,
                }
            }
            Ok(Err(error)) => CellEnd {
                termination: stopped(&error, memory_exceeded, overflowed, limits),
                reusable: false,
            },
        }
    }
}

/// A kernel of a backend, where it runs (on this process's threads, or in a worker process,
/// [`crate::worker`]), counted among the backend's live kernels while it exists.
#[derive(Debug)]
pub(crate) struct HostedKernel {
    place: KernelPlace,
    _counted: Counted,
}

#[derive(Debug)]
pub(crate) enum KernelPlace {
    InProcess(Kernel),
    InWorker(crate::worker::RemoteKernel),
}

impl HostedKernel {
    /// `place`'s kernel, counted in `live` while it exists.
    pub(crate) fn new(place: KernelPlace, live: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Self { place, _counted: Counted::new(live) }
    }

    /// See [`Kernel::moved`].
    pub(crate) fn moved(&mut self, from: &Path, to: &Path) {
        match &mut self.place {
            KernelPlace::InProcess(kernel) => kernel.moved(from, to),
            KernelPlace::InWorker(kernel) => kernel.moved(from, to),
        }
    }

    /// See [`Kernel::memory_gauge`] (a worker's kernel reports it after each cell).
    pub(crate) fn memory_gauge(&self) -> Arc<AtomicU64> {
        match &self.place {
            KernelPlace::InProcess(kernel) => kernel.memory_gauge(),
            KernelPlace::InWorker(kernel) => kernel.memory_gauge(),
        }
    }

    /// See [`Kernel::run_cell`].
    pub(crate) async fn run_cell(
        &mut self,
        code: &str,
        env: &std::collections::BTreeMap<String, String>,
        limits: &Limits,
        events: &EventSink,
    ) -> CellEnd {
        match &mut self.place {
            KernelPlace::InProcess(kernel) => kernel.run_cell(code, env, limits, events).await,
            KernelPlace::InWorker(kernel) => kernel.run_cell(code, env, limits, events).await,
        }
    }
}

/// The termination of a guest whose call failed: a limit it hit, its own exit, or a trap.
pub(crate) fn stopped(
    error: &wasmtime::Error,
    memory_exceeded: bool,
    overflowed: Option<OutputStream>,
    limits: &Limits,
) -> Termination {
    if memory_exceeded {
        Termination::MemoryExceeded { limit_bytes: limits.memory_bytes }
    } else if let Some(stream) = overflowed {
        Termination::OutputLimitExceeded { stream, limit_bytes: limits.output_cap(stream) }
    } else if let Some(exit) = error.downcast_ref::<I32Exit>() {
        Termination::Exited { code: exit.0 }
    } else if let Some(trap) = error.downcast_ref::<Trap>() {
        Termination::Crashed { reason: trap.to_string() }
    } else {
        Termination::Crashed { reason: format!("{error:#}") }
    }
}

fn prepare_scratch(driver: Driver, scratch: &Path) -> Result<(), WasmError> {
    for dir in driver.scratch_dirs() {
        let path = scratch.join(dir);
        std::fs::create_dir_all(&path).map_err(|source| WasmError::Io { path, source })?;
    }
    Ok(())
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one cell on the interpreter as shipped, without the pre-initialised image: the
/// interpreter starts, loads its driver and preloads its libraries, then runs the cell. This
/// is what every execution would cost without pre-initialisation; the benchmarks compare it.
pub(crate) async fn run_without_image(
    engine: &wasmtime::Engine,
    linker: &wasmtime::Linker<KernelState>,
    module: &wasmtime::Module,
    driver: Driver,
    pack_dir: &Path,
    code: &str,
) -> Result<Termination, WasmError> {
    let dirs = tempfile::tempdir()
        .map_err(|source| WasmError::Io { path: std::env::temp_dir(), source })?;
    let scratch = dirs.path().join("scratch");
    let workspace = dirs.path().join("workspace");
    let scratch_dir = if driver.has_scratch() {
        Some(ScratchDir::create(driver, scratch.clone())?)
    } else {
        None
    };
    std::fs::create_dir_all(&workspace)
        .map_err(|source| WasmError::Io { path: workspace.clone(), source })?;
    let output = CellOutput::default();
    let (sink, _events) = EventSink::channel();
    let limits = Limits::default();
    output.begin(&sink, &limits);
    let mut store =
        driver_store(engine, driver, pack_dir, &scratch, &workspace, &output, limits.memory_bytes)?;
    let failed = |e: wasmtime::Error| WasmError::Sandbox(format!("{e:#}"));
    let instance = linker.instantiate_async(&mut store, module).await.map_err(failed)?;
    driver.initialize(&mut store, &instance).await.map_err(failed)?;
    let state = driver.attach(&mut store, &instance).await.map_err(failed)?;
    let env = std::collections::BTreeMap::new();
    let cell = CellInput {
        code,
        env: &env,
        number: 0,
        fresh: true,
        scratch: scratch_dir.as_ref().map(|s| &s.dir),
    };
    let report = driver.run_cell(&mut store, &instance, state, &cell).await.map_err(failed)?;
    Ok(Termination::Exited { code: report.exit_code })
}
