//! The WASM tier of SoulBox: Python, JavaScript and Ruby interpreters compiled to WASI, run in
//! wasmtime from pre-initialised images.
//!
//! - [`pack`]: language packs as data (a checked-in manifest of registry packages pinned by
//!   sha256), installing them, loading them.
//! - [`WasmBackend`]: the tier behind the dispatcher: stateful kernels per sandbox and
//!   language, each a fresh instance of its pack's image, with memory, time and output limits.
//! - [`plugin`]: the plugin host, for any WASI preview-1 command module.
//!
//! # Embedding
//!
//! ```no_run
//! use std::sync::Arc;
//! use soulbox_runtime::{Dispatcher, ExecRequest, Language, Limits, Sandbox, SandboxSpec};
//! use soulbox_wasm::WasmBackend;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let data_dir = std::path::Path::new("/var/lib/soulbox");
//! let wasm = Arc::new(WasmBackend::builder(data_dir).build()?);
//! let dispatcher = Dispatcher::new().with_backend(wasm.clone());
//! let sandbox = Arc::new(Sandbox::create(&data_dir.join("sandboxes"), SandboxSpec::default())?);
//!
//! let request = ExecRequest::cell(Language::parse("python"), "x = 6 * 7\nx")
//!     .with_limits(Limits { memory_bytes: 256 << 20, ..Limits::default() });
//! let output = dispatcher.start(sandbox.clone(), request)?.collect().await;
//! assert_eq!(output.results[0].data["text/plain"], "42");
//!
//! // Any WASI command module, with arguments, environment, stdin and one directory:
//! let module = soulbox_wasm::plugin::compile_module(wasm.engine(), b"(module (func (export \"_start\")))")?;
//! let (events, _receiver) = soulbox_runtime::EventSink::channel();
//! let run = soulbox_wasm::plugin::ModuleRun { argv: vec!["tool".into()], ..Default::default() };
//! let termination = soulbox_wasm::plugin::run_module(wasm.engine(), &module, run, &events).await?;
//! assert!(termination.is_success());
//!
//! dispatcher.close(&sandbox).await;
//! sandbox.remove_files()?;
//! # Ok(())
//! # }
//! ```

mod backend;
mod engine;
mod guest;
mod kernel;
mod lang;
mod output;
pub mod pack;
pub mod plugin;
mod snapshot;
pub mod warm;
pub mod worker;

use std::path::PathBuf;

pub use backend::{WasmBackend, WasmBackendBuilder};
pub use engine::{DEFAULT_MAX_INSTANCES, EPOCH_TICK, EngineSettings, WasmEngine};
pub use kernel::KernelState;
pub use lang::{Driver, GUEST_WORKSPACE};
pub use soulbox_runtime::Language;

/// A failure of the WASM tier itself (never of the guest's code).
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The wasmtime engine could not be built.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// A module could not be compiled or loaded.
    #[error("compiling a module: {0}")]
    Compile(String),
    /// Pre-initialising an interpreter failed.
    #[error("pre-initialising the interpreter: {0}")]
    Snapshot(String),
    /// Installing a pack failed.
    #[error("installing a pack: {0}")]
    Install(String),
    /// A pinned checksum did not match; nothing was installed.
    #[error(
        "checksum mismatch for {what}: expected sha256 {expected}, got {actual}; nothing was installed"
    )]
    ChecksumMismatch {
        /// What was checked.
        what: String,
        /// The pinned sha256.
        expected: String,
        /// The sha256 found.
        actual: String,
    },
    /// The language's pack is not installed.
    #[error("language `{language}` is not installed; install it with `{install_command}`")]
    NotInstalled {
        /// The language.
        language: Language,
        /// The command that installs it.
        install_command: String,
    },
    /// A sandbox could not be set up.
    #[error("setting up the sandbox: {0}")]
    Sandbox(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
