//! The SoulBox runtime: the vocabulary shared by every part of SoulBox, the [`Backend`] trait
//! that both tiers implement, the [`Dispatcher`], the single entry point of every execution,
//! and the [`SandboxManager`], which keeps long-lived sandboxes in the [`Store`] (sled).
//!
//! This crate knows nothing of wasmtime, HTTP or libc. An embedder depends on it plus the tiers
//! it wants (`soulbox-wasm`, `soulbox-native`).
//!
//! ```
//! use soulbox_runtime::{Dispatcher, ExecRequest, Language, Limits};
//!
//! let dispatcher = Dispatcher::new(); // add tiers with `with_backend`
//! assert!(dispatcher.tiers().is_empty());
//! let request = ExecRequest::cell(Language::parse("py"), "print(1)").with_limits(Limits::default());
//! assert!(matches!(request.kind, soulbox_runtime::ExecKind::Cell { .. }));
//! ```

mod backend;
pub mod demand;
mod dispatch;
mod exec;
pub mod host_memory;
mod limits;
mod logs;
mod manager;
mod process;
mod sandbox;
mod store;

pub use backend::{
    Backend, BackendError, BackendOutcome, LanguageStatus, LanguageSupport, ResourceUsage,
};
pub use dispatch::{
    DispatchError, Dispatcher, ExecOutput, Execution, ExecutionObserver, execution_threads,
};
pub use exec::{
    CellResult, EventSink, ExecEvent, ExecKind, ExecRequest, ExecSummary, GuestError, Language,
    Termination, Tier, TierPreference, Timings,
};
pub use limits::{
    DEFAULT_MEMORY_BYTES, DEFAULT_STDERR_BYTES, DEFAULT_STDOUT_BYTES, DEFAULT_WALL_TIMEOUT, Limits,
    LimitsError, MAX_CODE_BYTES, MAX_MEMORY_BYTES, MAX_OUTPUT_BYTES, MAX_WALL_TIMEOUT,
    MIN_MEMORY_BYTES, OutputStream,
};
pub use logs::{LogEntry, MAX_LOG_BYTES, SandboxLog};
pub use manager::{
    CreateSandbox, DEFAULT_SANDBOX_TIMEOUT, ListFilter, MAX_ENV_ENTRIES, MAX_KEY_BYTES,
    MAX_LIST_PAGE, MAX_METADATA_ENTRIES, MAX_SANDBOX_TIMEOUT, MAX_VALUE_BYTES, ManagerError,
    OnTimeout, SANDBOX_CPU_COUNT, SandboxManager, SandboxMetrics, SandboxPage, SandboxRecord,
    SandboxState, TierLoad, Usage,
};
pub use process::{
    MAX_TERMINAL_CELLS, ProcessControl, ProcessEnd, ProcessError, ProcessEvent, ProcessFollower,
    ProcessInfo, ProcessRequest, ProcessSignal, ProcessTable, SandboxUser, SpawnedProcess,
    TerminalSize,
};
pub use sandbox::{Sandbox, SandboxDirError, SandboxId, SandboxSpec, TemplateImage};
pub use store::{Store, StoreError};
