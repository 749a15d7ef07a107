//! A size limit on a workspace: a tmpfs of that size mounted on the workspace directory, for
//! sandboxes that live only as long as one execution (`soulbox run`, `POST /v1/run`). Writing
//! past the limit fails with ENOSPC, in both tiers, and the host's disk is never touched.
//! Its pages are memory: charged to the sandbox's control group when native processes write
//! them, to the server when the WASM tier does.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::NativeError;

/// Default size of an ephemeral sandbox's workspace.
pub const DEFAULT_EPHEMERAL_WORKSPACE_BYTES: u64 = 256 << 20;

/// A tmpfs mounted on a workspace directory; unmounted by [`WorkspaceLimit::remove`] or when
/// dropped.
#[derive(Debug)]
pub struct WorkspaceLimit {
    path: Option<PathBuf>,
}

impl WorkspaceLimit {
    /// Mounts a tmpfs of `bytes` on `dir` (which should be empty: what it holds is hidden).
    /// Needs root, as the native tier does.
    pub fn tmpfs(dir: &Path, bytes: u64) -> Result<Self, NativeError> {
        let options = format!("size={bytes},mode=0755");
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(options.as_str()))
            .map_err(|errno| NativeError::Workspace { path: dir.to_owned(), errno })?;
        Ok(Self { path: Some(dir.to_owned()) })
    }

    /// Unmounts it (its files are gone with it).
    pub fn remove(mut self) -> Result<(), NativeError> {
        let Some(path) = self.path.take() else { return Ok(()) };
        umount2(&path, MntFlags::MNT_DETACH).map_err(|errno| NativeError::Workspace { path, errno })
    }
}

impl Drop for WorkspaceLimit {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
        }
    }
}
