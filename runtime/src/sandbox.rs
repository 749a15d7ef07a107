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
    /// Creates a sandbox with a fresh id and empty directories under `root`.
    pub fn create(root: &Path, spec: SandboxSpec) -> Result<Self, SandboxDirError> {
        let id = SandboxId::generate();
        let base = root.join(id.as_str());
        let workspace = base.join("workspace");
        let state_dir = base.join("state");
        for dir in [&workspace, &state_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|source| SandboxDirError { path: dir.clone(), source })?;
        }
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
        for dir in [&workspace, &state_dir] {
            if !dir.is_dir() {
                let source = std::io::Error::new(std::io::ErrorKind::NotFound, "missing");
                return Err(SandboxDirError { path: dir.clone(), source });
            }
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

    /// The directory for backends' private per-sandbox state.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Removes the sandbox's directories. Backends must have released it first
    /// ([`crate::Dispatcher::close`]).
    pub fn remove_files(&self) -> Result<(), SandboxDirError> {
        let Some(base) = self.workspace.parent() else { return Ok(()) };
        match std::fs::remove_dir_all(base) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxDirError { path: base.to_owned(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
