//! The pool of prepared sandboxes, sized by demand: a new sandbox is a hand-over of one that
//! is already prepared (namespaces, control group, root, init running), and the pool is
//! refilled in the background.
//!
//! The demand is the rate of sandboxes taken (see [`soulbox_runtime::demand`]). The pool
//! keeps half a second of that demand ready, within
//! [`NativeConfig::pool_min`](crate::NativeConfig) and `pool_max`: it grows
//! under load, shrinks back to the minimum when idle, and does not grow while the host has
//! less than [`NativeConfig::pool_min_free_memory_bytes`](crate::NativeConfig) available
//! (running sandboxes come first).
//!
//! Templates have pools of their own, made when a template's sandboxes are first asked for:
//! the same demand rule, from none up to
//! [`NativeConfig::template_pool_max`](crate::NativeConfig), forgotten when idle. Their
//! sandboxes are prepared on the template's layers with a writable layer of the tier's, which
//! the sandbox that takes one renames into its own directory (overlayfs keeps working across
//! the rename).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use soulbox_runtime::demand::PoolStats;

use crate::rootfs::LayeredRoot;
use crate::sandbox::PreparedSandbox;

/// How often the pool is looked after when nothing is taken.
pub(crate) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// Sandboxes prepared at once when the pool is short.
pub(crate) const PARALLEL_PREPARES: usize = 2;

/// Prepared sandboxes and the demand for them.
pub(crate) type Pool = soulbox_runtime::demand::Pool<PreparedSandbox>;

/// A prepared sandbox of a template, with its writable layer: a directory of the tier's that
/// the sandbox that takes it renames into its own state directory.
#[derive(Debug)]
pub(crate) struct PreparedRoot {
    pub(crate) prepared: Option<PreparedSandbox>,
    pub(crate) writable: PathBuf,
}

impl Drop for PreparedRoot {
    fn drop(&mut self) {
        // Init (and the overlay it holds) first, then the writable layer.
        drop(self.prepared.take());
        let _ = std::fs::remove_dir_all(&self.writable);
    }
}

/// The pool of one template's prepared sandboxes.
#[derive(Debug)]
pub(crate) struct TemplatePool {
    /// The root its sandboxes are prepared on (its `writable` is unused: each has its own).
    pub(crate) root: LayeredRoot,
    pub(crate) pool: soulbox_runtime::demand::Pool<PreparedRoot>,
}

/// The pools of the templates in use, by template build.
#[derive(Debug, Default)]
pub(crate) struct TemplatePools {
    pools: Mutex<HashMap<String, Arc<TemplatePool>>>,
}

impl TemplatePools {
    /// The pool of `root`'s template, made on first use with at most `max` ready.
    pub(crate) fn of(&self, root: &LayeredRoot, max: usize) -> Arc<TemplatePool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = pools.entry(root.template.clone()).or_insert_with(|| {
            Arc::new(TemplatePool {
                root: root.clone(),
                pool: soulbox_runtime::demand::Pool::new(0, max),
            })
        });
        Arc::clone(pool)
    }

    /// Every pool, dropping those that are idle and empty.
    pub(crate) fn all(&self) -> Vec<Arc<TemplatePool>> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|_, pool| {
            let stats = pool.pool.stats();
            stats.ready > 0 || stats.target > 0 || stats.demand_per_sec > IDLE_DEMAND_PER_SEC
        });
        pools.values().cloned().collect()
    }

    /// Each pool's state, by template.
    pub(crate) fn stats(&self) -> Vec<(String, PoolStats)> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.iter().map(|(template, pool)| (template.clone(), pool.pool.stats())).collect()
    }
}

/// Below this rate of takes a template's empty pool is forgotten.
const IDLE_DEMAND_PER_SEC: f64 = 0.01;
