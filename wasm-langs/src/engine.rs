//! The wasmtime engine every pack runs on, and the on-disk cache of precompiled modules.
//!
//! One [`WasmEngine`] per process: the pooling allocator with copy-on-write memory images,
//! epoch interruption driven by a ticker thread, and the exception-handling proposal that the
//! Python pack needs. Precompiled modules are cached under the data directory, keyed by the
//! wasm's sha256 and the engine's compatibility hash (wasmtime version, settings, CPU
//! features), so a module is compiled once and loaded afterwards as a memory map.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

use crate::WasmError;

/// How often the epoch advances. A running guest yields to the host at every tick, so this
/// is also the granularity of wall-clock timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Instances (kernels and plugin runs) that can be alive at once in one process, by default.
pub const DEFAULT_MAX_INSTANCES: u32 = 2048;

/// The largest linear memory a guest may grow to; limits per execution are lower.
const MAX_LINEAR_MEMORY_BYTES: usize = 4 << 30;

/// Table slots a module may declare: CPython 3.15 declares about 47,000.
const MAX_TABLE_ELEMENTS: usize = 65_536;

/// Instance metadata per module (functions, globals): CPython's is the largest.
const MAX_CORE_INSTANCE_SIZE: usize = 8 << 20;

/// Memory images up to this size are kept dense, so copy-on-write works for interpreters whose
/// pre-initialised heap is large and sparse (Ruby's 70 MiB heap otherwise instantiates 20x
/// slower).
const DENSE_IMAGE_BYTES: u64 = 256 << 20;

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Instances alive at once (pool slots).
    pub max_instances: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { max_instances: DEFAULT_MAX_INSTANCES }
    }
}

/// The engine, its epoch ticker and its module cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WasmEngine {
    inner: Arc<EngineInner>,
}

#[derive(Debug)]
struct EngineInner {
    engine: Engine,
    cache_dir: PathBuf,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl WasmEngine {
    /// Builds the engine and starts its epoch ticker. Precompiled modules are cached in
    /// `cache_dir`.
    pub fn new(settings: &EngineSettings, cache_dir: &Path) -> Result<Self, WasmError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(settings.max_instances)
            .total_memories(settings.max_instances)
            .total_tables(settings.max_instances)
            .total_stacks(settings.max_instances)
            .total_gc_heaps(settings.max_instances)
            .max_memory_size(MAX_LINEAR_MEMORY_BYTES)
            .table_elements(MAX_TABLE_ELEMENTS)
            .max_core_instance_size(MAX_CORE_INSTANCE_SIZE)
            .max_unused_warm_slots(32)
            // What a freed slot keeps resident (reset by memset rather than returned to the
            // kernel) stays resident for good once the slot was used: with thousands of
            // slots, 1 MiB each kept a server at 1 GB after a soak of 2000 sandboxes.
            .linear_memory_keep_resident(128 << 10)
            .table_keep_resident(1 << 16);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .memory_init_cow(true)
            .memory_guaranteed_dense_image_size(DENSE_IMAGE_BYTES)
            .wasm_exceptions(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| WasmError::Engine(e.to_string()))?;
        std::fs::create_dir_all(cache_dir)
            .map_err(|source| WasmError::Io { path: cache_dir.to_owned(), source })?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), stop_ticker.clone())?;
        Ok(Self {
            inner: Arc::new(EngineInner { engine, cache_dir: cache_dir.to_owned(), stop_ticker }),
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The cache file for a wasm with this sha256 under this engine's settings.
    fn cache_path(&self, wasm_sha256: &str) -> PathBuf {
        let mut hasher = DefaultHasher::new();
        self.inner.engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = format!("{wasm_sha256}-{:016x}.cwasm", hasher.finish());
        self.inner.cache_dir.join(key)
    }

    /// Whether a precompiled form of this wasm is cached.
    pub fn is_cached(&self, wasm_sha256: &str) -> bool {
        self.cache_path(wasm_sha256).is_file()
    }

    /// Deletes cached modules whose wasm sha256 `keep` refuses.
    pub(crate) fn prune_cache(&self, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.inner.cache_dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(sha256) = name.to_str().and_then(|n| n.split('-').next()) else { continue };
            if !keep(sha256) {
                tracing::debug!(file = ?entry.path(), "removing an unused precompiled module");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Loads a module: from the cache when it is there (a memory map), else compiles `wasm`
    /// and caches the result. `wasm_sha256` must be the sha256 of `wasm`'s contents.
    pub fn load_module(&self, wasm_sha256: &str, wasm: &Path) -> Result<Module, WasmError> {
        let cached = self.cache_path(wasm_sha256);
        if !cached.is_file() {
            let bytes = std::fs::read(wasm)
                .map_err(|source| WasmError::Io { path: wasm.to_owned(), source })?;
            self.precompile(&bytes, &cached)?;
        }
        self.load_cached(&cached)
    }

    /// Loads a module compiled by [`Self::precompile`] or cached by [`Self::load_module`].
    pub fn load_cached_module(&self, wasm_sha256: &str) -> Result<Module, WasmError> {
        self.load_cached(&self.cache_path(wasm_sha256))
    }

    /// Compiles `wasm` into the cache under `wasm_sha256`.
    pub fn precompile_into_cache(&self, wasm_sha256: &str, wasm: &[u8]) -> Result<(), WasmError> {
        self.precompile(wasm, &self.cache_path(wasm_sha256))
    }

    fn precompile(&self, wasm: &[u8], cached: &Path) -> Result<(), WasmError> {
        let compiled = self
            .inner
            .engine
            .precompile_module(wasm)
            .map_err(|e| WasmError::Compile(format!("{e:#}")))?;
        write_atomically(cached, &compiled)
    }

    #[allow(unsafe_code, reason = "the one place that loads precompiled machine code")]
    fn load_cached(&self, cached: &Path) -> Result<Module, WasmError> {
        // SAFETY: `deserialize_file` trusts the file to be machine code that this engine
        // produced. Only `precompile` writes into the cache directory, which lives in
        // SoulBox's own data directory, and it writes through a temporary file and an atomic
        // rename, so a file at this path is always a complete module of our own. Its name
        // carries the engine's compatibility hash, and wasmtime checks the header again.
        unsafe { Module::deserialize_file(&self.inner.engine, cached) }
            .map_err(|e| WasmError::Compile(format!("loading {}: {e:#}", cached.display())))
    }
}

/// Writes a file through a temporary file in the same directory and a rename, so readers see
/// the old file or the whole new one.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), WasmError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |source| WasmError::Io { path: path.to_owned(), source };
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut file, contents).map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Starts the thread that advances the epoch. Without it no timeout fires, so failing to start
/// it fails the engine.
fn spawn_ticker(engine: Engine, stop: Arc<AtomicBool>) -> Result<(), WasmError> {
    std::thread::Builder::new()
        .name("soulbox-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .map(drop)
        .map_err(|e| WasmError::Engine(format!("starting the epoch ticker thread: {e}")))
}
