//! The composition root: the tiers this binary was built with, wired into one dispatcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use soulbox_runtime::{Dispatcher, Sandbox, SandboxSpec};

/// Everything a command or the server needs: the data directory and the dispatcher.
#[derive(Debug, Clone)]
pub struct App {
    data_dir: PathBuf,
    dispatcher: Dispatcher,
    #[cfg(feature = "wasm")]
    wasm: Arc<soulbox_wasm::WasmBackend>,
}

/// The data directory when none is given: `$XDG_DATA_HOME/soulbox` (on Linux usually
/// `~/.local/share/soulbox`).
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("soulbox")
}

impl App {
    /// Opens the data directory and builds the tiers.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create the data directory {}: {e}", data_dir.display())
        })?;
        #[cfg(feature = "wasm")]
        let wasm = Arc::new(soulbox_wasm::WasmBackend::builder(data_dir).build()?);
        let dispatcher = Dispatcher::new();
        #[cfg(feature = "wasm")]
        let dispatcher = dispatcher.with_backend(wasm.clone());
        Ok(Self {
            data_dir: data_dir.to_owned(),
            dispatcher,
            #[cfg(feature = "wasm")]
            wasm,
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The WASM tier.
    #[cfg(feature = "wasm")]
    pub fn wasm(&self) -> &Arc<soulbox_wasm::WasmBackend> {
        &self.wasm
    }

    /// A new sandbox for one execution; remove it with [`App::discard`].
    pub fn ephemeral_sandbox(&self, spec: SandboxSpec) -> anyhow::Result<Arc<Sandbox>> {
        Ok(Arc::new(Sandbox::create(&self.data_dir.join("sandboxes"), spec)?))
    }

    /// Releases a sandbox in every tier and removes its files.
    pub async fn discard(&self, sandbox: &Sandbox) {
        self.dispatcher.close(sandbox).await;
        if let Err(error) = sandbox.remove_files() {
            tracing::warn!(%error, "could not remove a sandbox's files");
        }
    }
}
