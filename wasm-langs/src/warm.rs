//! Warm kernels: for each language, kernels started ahead of time from the pre-initialised
//! image, each bound to a prepared sandbox directory of its own (its `workspace` and `state`)
//! and run once, so that the pages a first cell touches are already faulted in. A new sandbox
//! adopts one together with its directory (`SandboxManager::create_in` moves the directory
//! into place; the kernel holds it open, so it follows); its first cell then costs what a
//! later cell costs.
//!
//! Each language's pool is sized by demand ([`soulbox_runtime::demand`]) within
//! [`WarmConfig`]'s bounds, shrinks when idle, and does not grow while the host is short of
//! memory or most kernel slots are taken (running sandboxes come first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use soulbox_runtime::demand::{Pool, PoolStats};
use soulbox_runtime::{EventSink, Language, Limits};

use crate::WasmError;
use crate::kernel::HostedKernel;

/// How a server keeps warm kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmConfig {
    /// The fewest warm kernels of each language kept, even when idle.
    pub min: usize,
    /// The most of each, however high the demand; 0 keeps none.
    pub max: usize,
    /// The pools do not grow while less memory than this is available.
    pub min_free_memory_bytes: u64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        Self { min: 1, max: 16, min_free_memory_bytes: 1 << 30 }
    }
}

/// A kernel waiting for a sandbox, with the directory it is bound to. Dropped unadopted, both
/// go (adopted, its directory has moved away).
#[derive(Debug)]
pub struct WarmKernel {
    dir: PathBuf,
    language: Language,
    kernel: Option<HostedKernel>,
}

impl WarmKernel {
    /// The prepared directory (`workspace`, `state`) to make the sandbox in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its language.
    pub fn language(&self) -> &Language {
        &self.language
    }

    /// The kernel, now that its directory moved to `to`.
    pub(crate) fn into_kernel(mut self, to: &Path) -> Option<HostedKernel> {
        let mut kernel = self.kernel.take()?;
        kernel.moved(&self.dir, to);
        Some(kernel)
    }
}

impl Drop for WarmKernel {
    fn drop(&mut self) {
        drop(self.kernel.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The warm kernels of a backend, a pool per language.
#[derive(Debug)]
pub(crate) struct WarmPools {
    pub(crate) root: PathBuf,
    pub(crate) config: WarmConfig,
    pools: std::sync::Mutex<BTreeMap<Language, Arc<Pool<WarmKernel>>>>,
}

impl WarmPools {
    /// Pools whose prepared directories live under `root` (emptied: what an earlier server
    /// left there is stale).
    pub(crate) fn new(root: PathBuf, config: WarmConfig) -> Result<Self, WasmError> {
        let io = |source| WasmError::Io { path: root.clone(), source };
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        std::fs::create_dir_all(&root).map_err(io)?;
        Ok(Self { root, config, pools: std::sync::Mutex::default() })
    }

    /// The pool of `language`'s warm kernels.
    pub(crate) fn of(&self, language: &Language) -> Arc<Pool<WarmKernel>> {
        let mut pools = self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (min, max) = (self.config.min, self.config.max);
        Arc::clone(pools.entry(language.clone()).or_insert_with(|| Arc::new(Pool::new(min, max))))
    }

    pub(crate) fn stats(&self) -> Vec<(Language, PoolStats)> {
        let pools = self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pools.iter().map(|(language, pool)| (language.clone(), pool.stats())).collect()
    }
}

/// Makes a warm kernel of `language` in `dir`: the directory, the kernel from `start`, and
/// one empty cell run in it.
pub(crate) async fn prepare<F>(
    dir: PathBuf,
    language: Language,
    start: impl FnOnce(PathBuf, PathBuf) -> F,
) -> Result<WarmKernel, WasmError>
where
    F: std::future::Future<Output = Result<HostedKernel, WasmError>>,
{
    let workspace = dir.join("workspace");
    let state = dir.join("state");
    for made in [&workspace, &state] {
        std::fs::create_dir_all(made)
            .map_err(|source| WasmError::Io { path: made.clone(), source })?;
    }
    // From here on, a failure removes the directory with the half-made warm kernel.
    let mut warm = WarmKernel { dir, language, kernel: None };
    let mut kernel = start(workspace, state).await?;
    let (sink, events) = EventSink::channel();
    let end = kernel.run_cell("", &BTreeMap::new(), &Limits::default(), &sink).await;
    drop(events);
    if !end.reusable {
        return Err(WasmError::Sandbox(format!(
            "the warm-up cell of a {} kernel ended: {}",
            warm.language, end.termination
        )));
    }
    warm.kernel = Some(kernel);
    Ok(warm)
}
