//! The plugin host: run any WASI preview-1 command module (`_start`) under the same limits
//! and isolation as a language kernel.

use std::collections::BTreeMap;
use std::path::PathBuf;

use soulbox_runtime::{EventSink, Limits, Termination};
use wasmtime::{Linker, Module};

use crate::WasmError;
use crate::engine::WasmEngine;
use crate::kernel::{KernelState, millis, new_store, stopped, wasi_context};
use crate::lang::Preopen;
use crate::output::CellOutput;

/// The largest stdin handed to a module: 16 MiB.
pub const MAX_STDIN_BYTES: usize = 16 << 20;

/// One run of a WASI command module. Closed by default: no arguments but the program name,
/// no environment, empty stdin, no directory, default limits.
#[derive(Debug, Clone)]
pub struct ModuleRun {
    /// The program name and arguments (`argv[0]` first).
    pub argv: Vec<String>,
    /// The environment.
    pub env: BTreeMap<String, String>,
    /// What the module reads from stdin.
    pub stdin: Vec<u8>,
    /// One host directory, preopened read-write at the given guest path.
    pub dir: Option<(PathBuf, String)>,
    /// The limits.
    pub limits: Limits,
}

impl Default for ModuleRun {
    fn default() -> Self {
        Self {
            argv: vec!["main.wasm".to_owned()],
            env: BTreeMap::new(),
            stdin: Vec::new(),
            dir: None,
            limits: Limits::default(),
        }
    }
}

/// Compiles a module for [`run_module`] (WebAssembly binary or text).
pub fn compile_module(engine: &WasmEngine, bytes: &[u8]) -> Result<Module, WasmError> {
    Module::new(engine.engine(), bytes).map_err(|e| WasmError::Compile(format!("{e:#}")))
}

/// Runs a command module's `_start` to its end, streaming its output to `events`. Imports
/// beyond WASI preview 1 trap when called.
pub async fn run_module(
    engine: &WasmEngine,
    module: &Module,
    run: ModuleRun,
    events: &EventSink,
) -> Result<Termination, WasmError> {
    if run.stdin.len() > MAX_STDIN_BYTES {
        return Err(WasmError::Sandbox(format!(
            "stdin is {} bytes, more than the maximum of {MAX_STDIN_BYTES}",
            run.stdin.len()
        )));
    }
    run.limits.validate().map_err(|e| WasmError::Sandbox(e.to_string()))?;
    let preopens: Vec<Preopen> = run
        .dir
        .iter()
        .map(|(host, guest)| Preopen { host: host.clone(), guest: guest.clone(), writable: true })
        .collect();
    let output = CellOutput::default();
    output.begin(events, &run.limits);
    let env: Vec<(&String, &String)> = run.env.iter().collect();
    let wasi = wasi_context(&run.argv, &env, run.stdin, &preopens, &output)?;
    let mut store = new_store(engine.engine(), wasi, run.limits.memory_bytes);
    let mut linker: Linker<KernelState> = Linker::new(engine.engine());
    let link = |linker: &mut Linker<KernelState>| -> wasmtime::Result<()> {
        wasmtime_wasi::p1::add_to_linker_async(linker, |s: &mut KernelState| &mut s.wasi)?;
        linker.define_unknown_imports_as_traps(module)
    };
    link(&mut linker).map_err(|e| WasmError::Sandbox(format!("linking the module: {e:#}")))?;

    let started = async {
        let instance = linker.instantiate_async(&mut store, module).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    };
    let outcome = tokio::time::timeout(run.limits.wall_timeout, started).await;
    let overflowed = output.end();
    let termination = match outcome {
        Err(_) => Termination::TimedOut { limit_ms: millis(run.limits.wall_timeout) },
        Ok(Ok(())) => Termination::Exited { code: 0 },
        Ok(Err(error)) => stopped(&error, store.data().limiter.exceeded(), overflowed, &run.limits),
    };
    Ok(termination)
}
