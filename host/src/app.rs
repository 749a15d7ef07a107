//! The composition root: the tiers this binary was built with, wired into one dispatcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use soulbox_runtime::{Dispatcher, Sandbox, SandboxId, SandboxManager, SandboxSpec, Tier};

/// WASM kernels (and plugin runs) alive at once, by default.
#[cfg(feature = "wasm")]
pub const DEFAULT_MAX_KERNELS: u32 = soulbox_wasm::DEFAULT_MAX_INSTANCES;
/// WASM kernels alive at once: none without the WASM tier.
#[cfg(not(feature = "wasm"))]
pub const DEFAULT_MAX_KERNELS: u32 = 0;

/// The most warm kernels kept per language, by default.
pub const DEFAULT_WARM_KERNELS: usize = 16;

/// How often expired sandboxes are looked for.
const REAPER_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything a command or the server needs: the data directory and the dispatcher.
#[derive(Debug, Clone)]
pub struct App {
    data_dir: PathBuf,
    dispatcher: Dispatcher,
    tiers: Vec<TierStatus>,
    /// The long-lived sandboxes, for a server ([`App::with_manager`]); a one-shot command
    /// has none (and does not lock the store).
    manager: Option<Arc<SandboxManager>>,
    /// The API keys, kept beside the sandboxes' records (a server has them, as it has a
    /// manager).
    keys: Option<Arc<crate::auth::Keys>>,
    /// The audit log, beside them.
    audit: Option<Arc<crate::audit::AuditLog>>,
    /// The teams' quotas, beside them.
    quotas: Option<Arc<crate::quotas::Quotas>>,
    /// Signed requests and session tokens (the server's secret).
    tokens: Option<Arc<crate::tokens::Tokens>>,
    /// The server's Prometheus metrics.
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// The limits on new work.
    admission: Arc<crate::admission::Admission>,
    /// The most warm kernels kept per language.
    warm_kernels: usize,
    /// The data plane's per-sandbox state: polled directory watchers, cell contexts.
    watchers: Arc<crate::envd::Watchers>,
    contexts: Arc<crate::interpreter::Contexts>,
    /// The size limits of ephemeral sandboxes' workspaces (where the native tier runs: they
    /// need root).
    #[cfg(feature = "native")]
    workspace_limits: Option<Arc<WorkspaceLimits>>,
    #[cfg(feature = "native")]
    native: Option<Arc<soulbox_native::NativeBackend>>,
    /// The templates built from Dockerfiles, for a server with the native tier.
    #[cfg(feature = "native")]
    templates: Option<Arc<crate::templates::Templates>>,
    #[cfg(feature = "wasm")]
    wasm: Arc<soulbox_wasm::WasmBackend>,
}

#[cfg(feature = "native")]
type WorkspaceLimits =
    std::sync::Mutex<std::collections::HashMap<SandboxId, soulbox_native::WorkspaceLimit>>;

/// Whether a tier runs in this process, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierStatus {
    /// The tier.
    pub tier: Tier,
    /// Whether it takes executions.
    pub available: bool,
    /// Why it does not, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Extra kernel slots each WASM worker has beyond its equal share (workers are filled
/// evenly, but not exactly).
#[cfg(feature = "wasm")]
const WORKER_SPARE_KERNELS: u32 = 32;

/// The WASM worker processes of a server: `count` of them, each `soulbox_binary wasm-worker`.
#[derive(Debug, Clone)]
pub struct WasmWorkers {
    /// How many (0: none, kernels run on the server's threads).
    pub count: usize,
    /// The `soulbox` executable (for `soulbox serve`, itself).
    pub soulbox_binary: PathBuf,
}

#[cfg(feature = "wasm")]
impl WasmWorkers {
    /// The command that starts each of them, with an equal share of the kernel slots.
    fn command(self, data_dir: &Path, max_kernels: u32) -> soulbox_wasm::worker::WorkerCommand {
        let count = u32::try_from(self.count).unwrap_or(u32::MAX);
        let share = max_kernels.div_ceil(count) + WORKER_SPARE_KERNELS;
        let args = vec![
            "--data-dir".to_owned(),
            data_dir.to_string_lossy().into_owned(),
            "wasm-worker".to_owned(),
            "--max-kernels".to_owned(),
            share.to_string(),
        ];
        soulbox_wasm::worker::WorkerCommand {
            program: self.soulbox_binary,
            args,
            count: self.count,
        }
    }
}

/// The data directory when none is given: `$XDG_DATA_HOME/soulbox` (on Linux usually
/// `~/.local/share/soulbox`).
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("soulbox")
}

impl App {
    /// Opens the data directory and builds the tiers.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(data_dir, DEFAULT_MAX_KERNELS)
    }

    /// [`App::open`], with room for `max_kernels` WASM kernels (and plugin runs) at once.
    pub fn open_with(data_dir: &Path, max_kernels: u32) -> anyhow::Result<Self> {
        Self::open_serving(data_dir, max_kernels, None)
    }

    /// [`App::open_with`] for a server: WASM kernels run in worker processes when `workers`
    /// says so (see [`soulbox_wasm::worker`]), else on this process's threads.
    pub fn open_serving(
        data_dir: &Path,
        max_kernels: u32,
        workers: Option<WasmWorkers>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create the data directory {}: {e}", data_dir.display())
        })?;
        let mut tiers = Vec::new();
        #[cfg(feature = "wasm")]
        let wasm = {
            let mut builder =
                soulbox_wasm::WasmBackend::builder(data_dir).max_instances(max_kernels);
            if let Some(workers) = workers.filter(|w| w.count > 0) {
                builder = builder.workers(workers.command(data_dir, max_kernels));
            }
            Arc::new(builder.build()?)
        };
        #[cfg(not(feature = "wasm"))]
        let _ = workers;
        let telemetry = Arc::new(crate::telemetry::Telemetry::default());
        let dispatcher = Dispatcher::new().with_observer(telemetry.clone());
        #[cfg(feature = "wasm")]
        let dispatcher = {
            tiers.push(TierStatus { tier: Tier::Wasm, available: true, reason: None });
            dispatcher.with_backend(wasm.clone())
        };
        #[cfg(feature = "native")]
        let mut workspace_limits = None;
        #[cfg(feature = "native")]
        let mut native = None;
        #[cfg(feature = "native")]
        let dispatcher = {
            let config = soulbox_native::NativeConfig::new(data_dir.join("native"));
            match soulbox_native::NativeTier::new(config) {
                Ok(tier) => {
                    tiers.push(TierStatus { tier: Tier::Native, available: true, reason: None });
                    workspace_limits = Some(Arc::default());
                    let backend = Arc::new(soulbox_native::NativeBackend::new(tier));
                    native = Some(backend.clone());
                    dispatcher.with_backend(backend)
                }
                Err(error) => {
                    let reason = error.to_string();
                    tiers.push(TierStatus {
                        tier: Tier::Native,
                        available: false,
                        reason: Some(reason.clone()),
                    });
                    dispatcher.with_unavailable(Tier::Native, reason)
                }
            }
        };
        #[cfg(not(feature = "native"))]
        tiers.push(TierStatus {
            tier: Tier::Native,
            available: false,
            reason: Some("this soulbox was built without the `native` feature".to_owned()),
        });
        Ok(Self {
            data_dir: data_dir.to_owned(),
            dispatcher,
            tiers,
            manager: None,
            keys: None,
            audit: None,
            quotas: None,
            tokens: None,
            telemetry,
            admission: Arc::new(crate::admission::Admission::new(
                crate::admission::AdmissionConfig::default(),
            )),
            warm_kernels: DEFAULT_WARM_KERNELS,
            watchers: Arc::default(),
            contexts: Arc::default(),
            #[cfg(feature = "native")]
            workspace_limits,
            #[cfg(feature = "native")]
            native,
            #[cfg(feature = "native")]
            templates: None,
            #[cfg(feature = "wasm")]
            wasm,
        })
    }

    /// The app with these limits on new work.
    pub fn with_admission(mut self, config: crate::admission::AdmissionConfig) -> Self {
        self.admission = Arc::new(crate::admission::Admission::new(config));
        self
    }

    /// The app keeping at most `max` warm kernels per language (0: none).
    pub fn with_warm_kernels(mut self, max: usize) -> Self {
        self.warm_kernels = max;
        self
    }

    /// The limits on new work.
    pub fn admission(&self) -> &crate::admission::Admission {
        &self.admission
    }

    /// Starts preparing what the tiers keep ready (the native tier's pool of prepared
    /// sandboxes, the WASM tier's warm kernels), for a long-running server; a one-shot
    /// command does not need it.
    pub fn warm(&self) {
        #[cfg(feature = "native")]
        if let Some(native) = &self.native {
            native.tier().warm();
        }
        // Warm kernels are made in directories that new sandboxes adopt: a server's only.
        #[cfg(feature = "wasm")]
        if let Some(manager) = &self.manager {
            let root = manager.prepared_root().join("kernels");
            let config = soulbox_wasm::warm::WarmConfig {
                max: self.warm_kernels,
                ..soulbox_wasm::warm::WarmConfig::default()
            };
            if let Err(error) = self.wasm.start_warm_pools(root, config) {
                tracing::warn!(%error, "no warm kernels: new sandboxes start theirs on their first cell");
            }
        }
    }

    /// Opens the sandbox manager on `root` (its store and its sandboxes, restored by the
    /// restart rule of [`SandboxManager`]; `soulbox serve` uses the data directory) and starts
    /// its deadline reaper. Must be called within a tokio runtime.
    pub fn with_manager(mut self, root: &Path) -> anyhow::Result<Self> {
        let manager = SandboxManager::open(root, self.dispatcher.clone())
            .map_err(|e| anyhow::anyhow!("opening the sandboxes of {}: {e}", root.display()))?;
        let manager = Arc::new(manager);
        manager.spawn_reaper(REAPER_INTERVAL);
        self.keys = Some(Arc::new(crate::auth::Keys::new(manager.store().clone())));
        self.audit = Some(Arc::new(crate::audit::AuditLog::new(manager.store().clone())));
        self.quotas = Some(Arc::new(crate::quotas::Quotas::new(manager.store().clone())));
        let tokens = crate::tokens::Tokens::open(root, None)
            .map_err(|e| anyhow::anyhow!("opening the server's secret: {e}"))?;
        self.tokens = Some(Arc::new(tokens));
        #[cfg(feature = "native")]
        if let Some(native) = &self.native {
            let templates = crate::templates::Templates::open(
                manager.store().clone(),
                &root.join("templates"),
                native.tier().clone(),
                crate::templates::TemplateSettings::default(),
            )
            .map_err(|e| anyhow::anyhow!("opening the templates: {e}"))?;
            self.templates = Some(Arc::new(templates));
        }
        self.manager = Some(manager);
        Ok(self)
    }

    /// Builds templates as `settings` say (after [`App::with_manager`]).
    #[cfg(feature = "native")]
    pub fn with_template_settings(mut self, settings: crate::templates::TemplateSettings) -> Self {
        if let Some(templates) = self.templates.take() {
            let templates = Arc::try_unwrap(templates)
                .map(|templates| Arc::new(templates.with_settings(settings)))
                .unwrap_or_else(|shared| shared);
            self.templates = Some(templates);
        }
        self
    }

    /// The templates built from Dockerfiles, when this is a server with the native tier.
    #[cfg(feature = "native")]
    pub fn templates(&self) -> Option<&Arc<crate::templates::Templates>> {
        self.templates.as_ref()
    }

    /// The sandbox manager, when this is a server.
    pub fn manager(&self) -> Option<&Arc<SandboxManager>> {
        self.manager.as_ref()
    }

    /// The API keys, when this is a server.
    pub fn keys(&self) -> Option<&Arc<crate::auth::Keys>> {
        self.keys.as_ref()
    }

    /// The audit log, when this is a server.
    pub fn audit(&self) -> Option<&Arc<crate::audit::AuditLog>> {
        self.audit.as_ref()
    }

    /// Accepts the tokens of an OpenID Connect issuer too (after [`App::with_manager`]).
    pub fn with_oidc(mut self, oidc: crate::tokens::OidcIssuer) -> Self {
        if let Some(tokens) = self.tokens.take() {
            let tokens = Arc::try_unwrap(tokens).map_or_else(
                |shared| {
                    tracing::warn!("the tokens are in use; the OIDC issuer is not added");
                    shared
                },
                |tokens| Arc::new(tokens.with_oidc(oidc)),
            );
            self.tokens = Some(tokens);
        }
        self
    }

    /// Signed requests and session tokens, when this is a server.
    pub fn tokens(&self) -> Option<&Arc<crate::tokens::Tokens>> {
        self.tokens.as_ref()
    }

    /// The teams' quotas, when this is a server.
    pub fn quotas(&self) -> Option<&Arc<crate::quotas::Quotas>> {
        self.quotas.as_ref()
    }

    /// The server's metrics.
    pub fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.telemetry
    }

    /// The native tier's pool of prepared sandboxes: ready, target, hits, misses (none
    /// without the native tier).
    #[cfg(feature = "native")]
    pub fn native_pool(&self) -> Option<soulbox_native::PoolStats> {
        self.native.as_ref().map(|native| native.tier().pool_stats())
    }

    /// The pools of the templates in use, by template build (none without the native tier).
    #[cfg(feature = "native")]
    pub fn template_pools(&self) -> Vec<(String, soulbox_native::PoolStats)> {
        self.native.as_ref().map(|native| native.tier().template_pool_stats()).unwrap_or_default()
    }

    /// The polled directory watchers of the data plane.
    pub(crate) fn watchers(&self) -> &crate::envd::Watchers {
        &self.watchers
    }

    /// The cell contexts of the code interpreter.
    pub(crate) fn contexts(&self) -> &crate::interpreter::Contexts {
        &self.contexts
    }

    /// The `/tmp` of a sandbox's native side, started if it is not running: its directory (in
    /// the sandbox's mount namespace) and the host uid of the sandbox user.
    pub(crate) async fn native_tmp(
        &self,
        sandbox: &Sandbox,
    ) -> Result<(cap_std::fs::Dir, u32), String> {
        #[cfg(feature = "native")]
        {
            let native = self.native.as_ref().ok_or_else(|| {
                "the native tier, which holds it, is not available here".to_owned()
            })?;
            let live = native
                .live_sandbox(sandbox, &sandbox.spec().limits)
                .await
                .map_err(|e| e.to_string())?;
            let path = format!("/proc/{}/root/tmp", live.init_pid());
            let dir = cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())
                .map_err(|e| e.to_string())?;
            Ok((dir, soulbox_native::SANDBOX_UID_BASE + soulbox_native::SANDBOX_UID))
        }
        #[cfg(not(feature = "native"))]
        {
            let _ = sandbox;
            Err("this soulbox was built without the native tier, which holds it".to_owned())
        }
    }

    /// The tiers, available or not (with the reason).
    pub fn tiers(&self) -> &[TierStatus] {
        &self.tiers
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

    /// Refuses (429) a cell in `language` that would need a new WASM kernel when every kernel
    /// slot is taken; `sandbox` and `context` name a kernel the cell may already have.
    pub fn check_kernel_room(
        &self,
        language: &soulbox_runtime::Language,
        sandbox: Option<(&SandboxId, Option<&str>)>,
    ) -> Result<(), crate::admission::Refusal> {
        #[cfg(feature = "wasm")]
        {
            let wasm = self.wasm();
            let has_kernel = sandbox
                .is_some_and(|(sandbox, context)| wasm.has_kernel(sandbox, language, context));
            if wasm.pack(language).is_some() && !has_kernel {
                let (live, max) = wasm.kernels();
                return self.admission.check_kernels(live, max);
            }
        }
        Ok(())
    }

    /// A new sandbox for one execution; remove it with [`App::discard`]. Where the native
    /// tier runs, its workspace is a tmpfs of
    /// [`soulbox_native::DEFAULT_EPHEMERAL_WORKSPACE_BYTES`]: writing more fails with ENOSPC
    /// in both tiers and never reaches the host's disk.
    pub fn ephemeral_sandbox(&self, spec: SandboxSpec) -> anyhow::Result<Arc<Sandbox>> {
        let sandbox = Sandbox::create(&self.data_dir.join("sandboxes"), spec)?;
        #[cfg(feature = "native")]
        if let Some(limits) = &self.workspace_limits {
            let size = soulbox_native::DEFAULT_EPHEMERAL_WORKSPACE_BYTES;
            match soulbox_native::WorkspaceLimit::tmpfs(sandbox.workspace(), size) {
                Ok(limit) => {
                    limits
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(sandbox.id().clone(), limit);
                }
                Err(error) => {
                    let _ = sandbox.remove_files();
                    return Err(error.into());
                }
            }
        }
        Ok(Arc::new(sandbox))
    }

    /// Releases a sandbox in every tier and removes its files.
    pub async fn discard(&self, sandbox: &Sandbox) {
        self.dispatcher.close(sandbox).await;
        #[cfg(feature = "native")]
        if let Some(limits) = &self.workspace_limits {
            let limit = limits
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(sandbox.id());
            if let Some(Err(error)) = limit.map(soulbox_native::WorkspaceLimit::remove) {
                tracing::warn!(%error, "could not unmount a sandbox's workspace");
            }
        }
        if let Err(error) = sandbox.remove_files() {
            tracing::warn!(%error, "could not remove a sandbox's files");
        }
    }
}
