//! CRuby 3.4 from `@ruby/3.4-wasm-wasi`: the browser build's reactor, whose JavaScript-bridge
//! imports are denied. Strings and lists cross the boundary in the (old) canonical ABI:
//! memory from `cabi_realloc`, results as a pointer to a (value, value) pair.

use wasmtime::Linker;

use super::{CellInput, CellReport, MAX_REPORT_BYTES, parse_report};
use crate::guest::{self, Guest};
use crate::kernel::KernelState;

pub(super) const DRIVER_SOURCE: &str = include_str!("ruby_driver.rb");

/// The interpreter's command line: UTF-8 source, and an empty script.
const RUBY_ARGS: &[&str] = &["ruby.wasm", "-EUTF-8", "-e_=0"];

pub(super) fn define_imports(linker: &mut Linker<KernelState>) -> wasmtime::Result<()> {
    // Ruby values are handed out as raw values; the JavaScript side is never reached.
    linker.func_wrap("canonical_abi", "resource_new_rb-abi-value", |value: i32| value)?;
    linker.func_wrap("canonical_abi", "resource_get_rb-abi-value", |value: i32| value)?;
    linker.func_wrap("canonical_abi", "resource_drop_js-abi-value", |_: i32| {})?;
    Ok(())
}

/// Copies bytes (plus a NUL) into memory from `cabi_realloc`; the callee takes ownership.
async fn alloc(guest: &mut Guest<'_>, bytes: &[u8], align: i32) -> wasmtime::Result<i32> {
    let len = u32::try_from(bytes.len())?;
    let ptr: i32 = guest.call("cabi_realloc", (0, 0, align, guest::abi(len + 1))).await?;
    if ptr == 0 {
        wasmtime::bail!("the Ruby heap could not allocate {len} bytes");
    }
    guest.write(guest::ptr(ptr), bytes)?;
    guest.write(guest::ptr(ptr) + len, &[0])?;
    Ok(ptr)
}

/// Evaluates Ruby source; returns the result's handle and the protect state (0: no exception).
async fn eval(guest: &mut Guest<'_>, source: &str) -> wasmtime::Result<(u32, u32)> {
    let ptr = alloc(guest, source.as_bytes(), 1).await?;
    let len = guest::abi(u32::try_from(source.len())?);
    let pair: i32 = guest
        .call(
            "rb-eval-string-protect: func(str: string) -> tuple<handle<rb-abi-value>, s32>",
            (ptr, len),
        )
        .await?;
    let handle = guest.read_u32(guest::ptr(pair))?;
    let state = guest.read_u32(guest::ptr(pair) + 4)?;
    Ok((handle, state))
}

pub(super) async fn initialize(guest: &mut Guest<'_>) -> wasmtime::Result<()> {
    guest.call::<(), ()>("_initialize", ()).await?;
    let mut list = Vec::new();
    for arg in RUBY_ARGS {
        let ptr = alloc(guest, arg.as_bytes(), 1).await?;
        list.extend_from_slice(&ptr.to_le_bytes());
        list.extend_from_slice(&u32::try_from(arg.len())?.to_le_bytes());
    }
    let list_ptr = alloc(guest, &list, 4).await?;
    let count = i32::try_from(RUBY_ARGS.len())?;
    guest
        .call::<(i32, i32), ()>("ruby-init: func(args: list<string>) -> ()", (list_ptr, count))
        .await?;
    guest.call::<(), ()>("ruby-init-loadpath: func() -> ()", ()).await?;
    let (_, state) = eval(guest, DRIVER_SOURCE).await?;
    if state != 0 {
        wasmtime::bail!("loading the Ruby driver raised an exception (state {state})");
    }
    Ok(())
}

/// A Ruby single-quoted string literal: only `\` and `'` need escaping there.
fn single_quoted(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('\'');
    for c in text.chars() {
        if c == '\\' || c == '\'' {
            literal.push('\\');
        }
        literal.push(c);
    }
    literal.push('\'');
    literal
}

pub(super) async fn run_cell(
    guest: &mut Guest<'_>,
    cell: &CellInput<'_>,
) -> wasmtime::Result<CellReport> {
    if cell.code.contains('\0') {
        return Ok(CellReport {
            error: Some(soulbox_runtime::GuestError {
                name: "ArgumentError".into(),
                value: "source code contains a NUL byte".into(),
                traceback: String::new(),
            }),
            exit_code: 1,
            ..CellReport::default()
        });
    }
    let env = serde_json::to_string(cell.env)?;
    let source = format!(
        "SoulBox.run({}, {}, {})",
        single_quoted(cell.code),
        single_quoted(&env),
        cell.fresh
    );
    let (handle, state) = eval(guest, &source).await?;
    if state != 0 {
        wasmtime::bail!("the cell replaced or broke the kernel's driver (state {state})");
    }
    let pair: i32 = guest
        .call("rstring-ptr: func(value: handle<rb-abi-value>) -> string", guest::abi(handle))
        .await?;
    let ptr = guest.read_u32(guest::ptr(pair))?;
    let len = guest.read_u32(guest::ptr(pair) + 4)?;
    let json = guest.read(ptr, len, MAX_REPORT_BYTES)?;
    guest.call::<i32, ()>("cabi_post_rstring-ptr", pair).await?;
    guest.call::<i32, ()>("canonical_abi_drop_rb-abi-value", guest::abi(handle)).await?;
    parse_report(&json)
}

#[cfg(test)]
mod tests {
    use super::single_quoted;

    #[test]
    fn single_quoted_escapes_quotes_and_backslashes() {
        assert_eq!(single_quoted(r"a'b\c#{x}"), r"'a\'b\\c#{x}'");
    }
}
