//! Pre-initialisation: an interpreter is started once, its driver loaded and its common
//! libraries imported, and the instance's memory and globals are written out as a new module
//! (with `wasmtime-wizer`). Every kernel then starts from that image by copy-on-write.
//!
//! Preopens are frozen into the image (wasi-libc caches its preopen table in linear memory), so
//! the snapshot runs with placeholder directories at the same guest paths, in the same order,
//! as every kernel later gets.

use std::path::Path;

use soulbox_runtime::{EventSink, ExecEvent, Limits, MAX_MEMORY_BYTES};
use wasmtime::{Instance, Module, Store};
use wasmtime_wizer::{InstanceState, SnapshotVal, ValType, Wizer};

use crate::WasmError;
use crate::engine::WasmEngine;
use crate::kernel::{KernelState, driver_store};
use crate::lang::Driver;
use crate::output::CellOutput;

/// Reads an instance's state for the snapshot.
struct Snapshotter<'a> {
    store: &'a mut Store<KernelState>,
    instance: Instance,
}

impl InstanceState for Snapshotter<'_> {
    async fn global_get(&mut self, name: &str, _: ValType) -> SnapshotVal {
        let value = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|global| global.get(&mut *self.store));
        match value {
            Some(wasmtime::Val::I32(x)) => SnapshotVal::I32(x),
            Some(wasmtime::Val::I64(x)) => SnapshotVal::I64(x),
            Some(wasmtime::Val::F32(x)) => SnapshotVal::F32(x),
            Some(wasmtime::Val::F64(x)) => SnapshotVal::F64(x),
            Some(wasmtime::Val::V128(x)) => SnapshotVal::V128(x.as_u128()),
            // The instrumented module exports exactly the globals wizer asks for, all of
            // numeric type; anything else is a wizer bug we cannot recover from here.
            other => panic!("wizer asked for global `{name}` of unsupported value {other:?}"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(memory) => contents(memory.data(&*self.store)),
            None => panic!("wizer asked for memory `{name}`, which the instance does not export"),
        }
    }
}

/// Pre-initialises `wasm` with the driver's start-up sequence and returns the image.
pub(crate) async fn preinitialise(
    engine: &WasmEngine,
    driver: Driver,
    wasm: &[u8],
    pack_dir: &Path,
) -> Result<Vec<u8>, WasmError> {
    let failed = |step: &str, e: wasmtime::Error| WasmError::Snapshot(format!("{step}: {e:#}"));
    let wizer = Wizer::new();
    let (context, instrumented) = wizer.instrument(wasm).map_err(|e| failed("instrumenting", e))?;
    let module = Module::new(engine.engine(), &instrumented).map_err(|e| failed("compiling", e))?;

    let placeholders = tempfile::tempdir()
        .map_err(|source| WasmError::Io { path: std::env::temp_dir(), source })?;
    let scratch = placeholders.path().join("scratch");
    let workspace = placeholders.path().join("workspace");
    for dir in driver.scratch_dirs().iter().map(|d| scratch.join(d)).chain([workspace.clone()]) {
        std::fs::create_dir_all(&dir).map_err(|source| WasmError::Io { path: dir, source })?;
    }
    // The interpreter's own output during start-up is kept to explain a failure.
    let output = CellOutput::default();
    let (sink, mut startup_output) = EventSink::channel();
    output.begin(
        &sink,
        &Limits { stdout_bytes: 1 << 16, stderr_bytes: 1 << 16, ..Limits::default() },
    );
    let mut store = driver_store(
        engine.engine(),
        driver,
        pack_dir,
        &scratch,
        &workspace,
        &output,
        MAX_MEMORY_BYTES,
    )?;
    let linker = crate::pack::linker(engine, driver, &module).map_err(|e| failed("linking", e))?;
    let instance = linker
        .instantiate_async(&mut store, &module)
        .await
        .map_err(|e| failed("instantiating", e))?;
    if let Err(error) = driver.initialize(&mut store, &instance).await {
        output.end();
        let mut printed = Vec::new();
        while let Ok(ExecEvent::Stdout(b) | ExecEvent::Stderr(b)) = startup_output.try_recv() {
            printed.extend_from_slice(&b);
        }
        let printed = String::from_utf8_lossy(&printed);
        let message = format!("starting the interpreter: {error:#}\n{}", printed.trim());
        return Err(WasmError::Snapshot(message));
    }
    output.end();
    let mut snapshotter = Snapshotter { store: &mut store, instance };
    wizer.snapshot(&context, &mut snapshotter).await.map_err(|e| failed("snapshotting", e))
}
