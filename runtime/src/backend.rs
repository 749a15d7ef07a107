//! The interface both tiers implement.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::exec::{EventSink, ExecRequest, Language, Termination, Tier};
use crate::process::{ProcessError, ProcessRequest, SpawnedProcess};
use crate::sandbox::{Sandbox, SandboxId};

/// Whether a backend can run a language now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LanguageStatus {
    /// Installed and ready.
    Ready,
    /// Known, but its runtime is not installed; `install_command` installs it.
    NotInstalled {
        /// The exact command that installs it.
        install_command: String,
    },
}

/// A language a backend knows, and whether it can run it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanguageSupport {
    /// The language.
    pub language: Language,
    /// Whether it can run now.
    pub status: LanguageStatus,
}

/// How a backend's execution went: the guest's termination and where the time went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOutcome {
    /// How the guest ended.
    pub termination: Termination,
    /// Time spent making the interpreter or process ready.
    pub startup: Duration,
    /// Time spent running the guest's code.
    pub run: Duration,
}

/// What a sandbox uses in a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// CPU time used since the sandbox started in the tier.
    pub cpu_time: Duration,
    /// Memory held now, in bytes.
    pub memory_bytes: u64,
}

/// SoulBox failed to build or enforce a sandbox; the guest's code did not run (further).
#[derive(Debug, thiserror::Error)]
#[error("{tier} tier: {message}")]
pub struct BackendError {
    /// The tier that failed.
    pub tier: Tier,
    /// What failed, for people.
    pub message: String,
}

/// A tier. Implementations say what they can do; they never route.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Which tier this is.
    fn tier(&self) -> Tier;

    /// The languages this backend knows, with their status.
    fn languages(&self) -> Vec<LanguageSupport>;

    /// Whether it runs [`crate::ExecKind::Command`] executions.
    fn runs_commands(&self) -> bool;

    /// Runs one execution in `sandbox`, sending its output to `events` as it is produced.
    /// Guest failures are an `Ok` [`Termination`]; `Err` means the sandbox could not be built
    /// or enforced.
    async fn exec(
        &self,
        sandbox: &Sandbox,
        request: ExecRequest,
        events: &EventSink,
    ) -> Result<BackendOutcome, BackendError>;

    /// Starts a long-lived process in `sandbox` (see [`crate::ProcessTable`]). Only a tier
    /// that [runs commands](Backend::runs_commands) implements it.
    async fn spawn(
        &self,
        _sandbox: &Sandbox,
        _request: &ProcessRequest,
    ) -> Result<SpawnedProcess, ProcessError> {
        Err(ProcessError::Unavailable(format!("the {} tier does not run processes", self.tier())))
    }

    /// What the sandbox uses in this tier now (nothing when it holds nothing for it).
    fn usage(&self, _sandbox: &SandboxId) -> ResourceUsage {
        ResourceUsage::default()
    }

    /// Forgets the kernels of the cells run with `context` (see [`ExecRequest::context`]), so
    /// that the next cell in it starts from a fresh state.
    async fn reset_context(&self, _sandbox: &SandboxId, _context: &str) {}

    /// Releases everything this backend holds for the sandbox (kernels, processes).
    async fn close(&self, sandbox: &SandboxId);

    /// Stops every use of CPU by the sandbox until [`Backend::resume`], keeping its state
    /// (memory, processes). The default does nothing: a backend whose idle state uses no CPU
    /// (an idle WASM kernel) has nothing to stop.
    async fn pause(&self, _sandbox: &SandboxId) -> Result<(), BackendError> {
        Ok(())
    }

    /// Continues a paused sandbox where it stopped.
    async fn resume(&self, _sandbox: &SandboxId) -> Result<(), BackendError> {
        Ok(())
    }
}
