//! A sandbox as the tiers see it: an id, a workspace directory and its settings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exec::TierPreference;
use crate::limits::Limits;
use crate::process::SandboxUser;

/// A sandbox's id: 20 lower-case letters and digits, as E2B's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SandboxId(String);

/// Length of a generated sandbox id.
const SANDBOX_ID_LEN: usize = 20;

impl SandboxId {
    /// A new random id.
    pub fn generate() -> Self {
        let id: String =
            uuid::Uuid::new_v4().simple().to_string().chars().take(SANDBOX_ID_LEN).collect();
        Self(id)
    }

    /// Accepts an id only if it has the form of one (so it is safe as a path component).
    pub fn parse(id: &str) -> Option<Self> {
        let ok = id.len() == SANDBOX_ID_LEN
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        ok.then(|| Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How to make a sandbox. The defaults are closed: no environment, default limits, the
/// dispatcher's own choice of tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Environment variables every execution in the sandbox sees.
    pub env: BTreeMap<String, String>,
    /// Default limits of its executions.
    pub limits: Limits,
    /// Which tier its executions prefer.
    pub tier: TierPreference,
    /// The built template it was made from, if any.
    pub image: Option<TemplateImage>,
}

impl SandboxSpec {
    /// Who its processes run as unless a request says otherwise.
    pub fn default_user(&self) -> SandboxUser {
        self.image.as_ref().map_or(SandboxUser::User, |image| image.user)
    }
}

/// What a sandbox made from a built template starts with: the template's layers (its root in
/// the native tier) and the defaults its Dockerfile set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateImage {
    /// The build it comes from.
    pub build_id: String,
    /// The layers' directories, lowest first.
    pub layers: Vec<PathBuf>,
    /// Whether the host's `/usr` and the allow-listed `/etc` are mounted over the layers (a
    /// template built `FROM base`).
    pub host_system: bool,
    /// Who processes run as unless a request says otherwise (`USER`).
    pub user: SandboxUser,
    /// Where processes start unless a request says otherwise (`WORKDIR`).
    pub workdir: Option<String>,
    /// Environment variables (`ENV`, and the base image's), under the sandbox's own.
    pub env: BTreeMap<String, String>,
}

/// A live sandbox: its files live in `workspace` (the guest's `/home/user`), and a backend
/// may keep private per-sandbox files (kernel scratch space) under `state_dir`.
#[derive(Debug)]
pub struct Sandbox {
    id: SandboxId,
    spec: SandboxSpec,
    workspace: PathBuf,
    state_dir: PathBuf,
}

/// Failure to make or remove a sandbox's directories.
#[derive(Debug, thiserror::Error)]
#[error("sandbox directory {path}: {source}")]
pub struct SandboxDirError {
    /// The directory.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

impl Sandbox {
    /// Creates a sandbox with a fresh id and an empty workspace under `root`. Its state
    /// directory is made by the first backend that needs one.
    pub fn create(root: &Path, spec: SandboxSpec) -> Result<Self, SandboxDirError> {
        let id = SandboxId::generate();
        let base = root.join(id.as_str());
        let workspace = base.join("workspace");
        let state_dir = base.join("state");
        let made = if reuse_base(root, &base) {
            std::fs::create_dir(&workspace)
        } else {
            std::fs::create_dir_all(&workspace)
        };
        made.map_err(|source| SandboxDirError { path: workspace.clone(), source })?;
        Ok(Self { id, spec, workspace, state_dir })
    }

    /// Creates a sandbox under `root` from `prepared`, a directory of the same filesystem
    /// holding its `workspace` and `state` (made ahead of time, with a warm kernel bound to
    /// them): the directory is moved into place, so what holds it open keeps it.
    pub fn adopt(root: &Path, spec: SandboxSpec, prepared: &Path) -> Result<Self, SandboxDirError> {
        let id = SandboxId::generate();
        let base = root.join(id.as_str());
        std::fs::create_dir_all(root)
            .and_then(|()| std::fs::rename(prepared, &base))
            .map_err(|source| SandboxDirError { path: prepared.to_owned(), source })?;
        Self::open(root, id, spec)
    }

    /// The sandbox `id` whose directories already exist under `root` (after a restart).
    pub fn open(root: &Path, id: SandboxId, spec: SandboxSpec) -> Result<Self, SandboxDirError> {
        let base = root.join(id.as_str());
        let workspace = base.join("workspace");
        let state_dir = base.join("state");
        if !workspace.is_dir() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "missing");
            return Err(SandboxDirError { path: workspace, source });
        }
        Ok(Self { id, spec, workspace, state_dir })
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// How it was made.
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// The workspace directory on the host.
    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// The directory for backends' private per-sandbox state; a backend makes it
    /// (`create_dir_all`) when it first needs it.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Removes the sandbox's directories. Backends must have released it first
    /// ([`crate::Dispatcher::close`]).
    pub fn remove_files(&self) -> Result<(), SandboxDirError> {
        let Some(base) = self.workspace.parent() else { return Ok(()) };
        let remove = |dir: &Path| match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxDirError { path: dir.to_owned(), source }),
        };
        remove(&self.workspace)?;
        remove(&self.state_dir)?;
        if recycle_base(base) {
            return Ok(());
        }
        remove(base)
    }
}

/// Empty base directories of ended sandboxes kept for new ones, at most this many.
///
/// A new sandbox takes one with a rename instead of making a directory. On this project's
/// machine (ext4 without a journal), every directory made while thousands are removed each
/// second takes longer to allocate, as the allocator skips the inodes freed recently: making
/// and removing them was a third of the CPU of JavaScript's create + cell + kill. Only the
/// base is kept, never the workspace or the state directory: nothing of a sandbox's, and no
/// handle a kernel or process still holds, can reach the next sandbox through it (its own
/// workspace is a new directory).
const MAX_RECYCLED_BASES: usize = 256;

/// Where the empty base directories wait: beside the sandboxes, on their filesystem.
fn recycled_bases(root: &Path) -> PathBuf {
    root.with_file_name("recycled")
}

/// Moves an empty base directory from the bin to `base`; whether one was there.
fn reuse_base(root: &Path, base: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(recycled_bases(root)) else { return false };
    // Another create may take the same one first: try a few.
    entries.filter_map(Result::ok).take(4).any(|entry| std::fs::rename(entry.path(), base).is_ok())
}

/// Moves `base`, if empty, to the bin while it has room; whether it did.
fn recycle_base(base: &Path) -> bool {
    let Some(bin) = base.parent().map(recycled_bases) else { return false };
    let empty = std::fs::read_dir(base).is_ok_and(|mut entries| entries.next().is_none());
    if !empty || std::fs::read_dir(&bin).map_or(0, Iterator::count) >= MAX_RECYCLED_BASES {
        return false;
    }
    let name = uuid::Uuid::new_v4().simple().to_string();
    std::fs::create_dir_all(&bin).is_ok() && std::fs::rename(base, bin.join(name)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_sandboxs_base_is_reused_and_nothing_inside_it() {
        let data = tempfile::tempdir().expect("tempdir");
        let root = data.path().join("sandboxes");
        let first = Sandbox::create(&root, SandboxSpec::default()).expect("create");
        std::fs::create_dir_all(first.workspace().join("a")).expect("mkdir");
        std::fs::write(first.workspace().join("a/secret"), "x").expect("write");
        std::fs::create_dir_all(first.state_dir()).expect("state");
        std::fs::write(first.state_dir().join("kernel"), "y").expect("write");
        // A handle into the first workspace, as a kernel would hold.
        let held = std::fs::File::open(first.workspace()).expect("open");
        first.remove_files().expect("remove");
        let bin = recycled_bases(&root);
        assert_eq!(std::fs::read_dir(&bin).expect("the bin").count(), 1, "the base is kept");
        assert_eq!(std::fs::read_dir(&root).expect("root").count(), 0);

        let second = Sandbox::create(&root, SandboxSpec::default()).expect("create");
        assert_eq!(std::fs::read_dir(&bin).expect("the bin").count(), 0, "taken");
        assert!(second.workspace().starts_with(root.join(second.id().as_str())));
        assert_eq!(std::fs::read_dir(second.workspace()).expect("workspace").count(), 0);
        assert!(!second.state_dir().exists(), "made by the backend that needs it");
        // The old workspace is not the new one: its handle leads to a removed directory.
        use std::os::unix::fs::MetadataExt;
        let (old, new) =
            (held.metadata().expect("stat"), second.workspace().metadata().expect("stat"));
        assert_ne!(old.ino(), new.ino());
        assert_eq!(old.nlink(), 0, "the old workspace is gone");

        // A base with something unexpected in it is removed, not kept.
        let stray = second.workspace().parent().expect("base").join("stray");
        std::fs::write(&stray, "z").expect("write");
        second.remove_files().expect("remove");
        assert_eq!(std::fs::read_dir(&bin).expect("the bin").count(), 0, "not kept");
        assert_eq!(std::fs::read_dir(&root).expect("root").count(), 0, "removed");
    }

    #[test]
    fn generated_ids_parse_back() {
        let id = SandboxId::generate();
        assert_eq!(SandboxId::parse(id.as_str()), Some(id));
    }

    #[test]
    fn ids_with_path_characters_are_refused() {
        assert_eq!(SandboxId::parse("../../../etc/passwd!"), None);
        assert_eq!(SandboxId::parse("abc"), None);
    }
}
