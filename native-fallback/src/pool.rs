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

use std::time::Duration;

use crate::sandbox::PreparedSandbox;

/// How often the pool is looked after when nothing is taken.
pub(crate) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// Sandboxes prepared at once when the pool is short.
pub(crate) const PARALLEL_PREPARES: usize = 2;

/// Prepared sandboxes and the demand for them.
pub(crate) type Pool = soulbox_runtime::demand::Pool<PreparedSandbox>;
