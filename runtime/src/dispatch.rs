//! The dispatch layer: the single entry point of every execution.
//!
//! The rule for [`TierPreference::Auto`]: a cell goes to the WASM tier when that tier has the
//! cell's language, else to the native tier when it has it; a command goes to the native
//! tier. A forced tier is used as asked or refused with the reason. The chosen tier is
//! reported with every execution.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError, LanguageStatus, LanguageSupport, ResourceUsage};
use crate::exec::{
    CellResult, EventSink, ExecEvent, ExecKind, ExecRequest, ExecSummary, GuestError, Language,
    Termination, Tier, TierPreference, Timings,
};
use crate::limits::{LimitsError, MAX_CODE_BYTES};
use crate::process::{ProcessError, ProcessRequest, SpawnedProcess};
use crate::sandbox::Sandbox;

/// Why an execution was refused before it started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// No tier knows the language.
    #[error("unknown language `{language}`; installed languages: {}", list_or_none(.installed))]
    UnknownLanguage {
        /// The language asked for.
        language: Language,
        /// The languages that can run now.
        installed: Vec<Language>,
    },
    /// The language is known but its pack is not installed.
    #[error("language `{language}` is not installed; install it with `{install_command}`")]
    LanguageNotInstalled {
        /// The language asked for.
        language: Language,
        /// The command that installs it.
        install_command: String,
    },
    /// The request forces a tier that is not available or cannot run it.
    #[error("the {tier} tier cannot run this execution: {reason}")]
    TierCannotRun {
        /// The tier asked for.
        tier: Tier,
        /// Why not.
        reason: String,
    },
    /// The code is larger than [`MAX_CODE_BYTES`].
    #[error("code is {size} bytes, more than the maximum of {max} bytes")]
    CodeTooLarge {
        /// Its size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// A limit is out of range.
    #[error(transparent)]
    InvalidLimits(#[from] LimitsError),
}

fn list_or_none(languages: &[Language]) -> String {
    if languages.is_empty() {
        return "none (install one with `soulbox langs install`)".to_owned();
    }
    languages.iter().map(Language::as_str).collect::<Vec<_>>().join(", ")
}

/// The threads executions run on, apart from the caller's (the API's): a guest that computes
/// without pause (a WASM cell yields to its runtime only every epoch tick) then competes with
/// the API for the CPU through the kernel's scheduler, which serves a woken API thread at
/// once, instead of queueing the API's tasks behind it. One per process, as many threads as
/// CPUs, never dropped.
pub fn execution_threads() -> &'static tokio::runtime::Runtime {
    static EXECUTIONS: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    EXECUTIONS.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("soulbox-exec")
            // Look at I/O (a native process's output, a timer) often, even while guests
            // keep every thread busy.
            .event_interval(8)
            .enable_all()
            .build()
            .expect("the execution threads start")
    })
}

/// Sees every execution end (for metrics): its tier, how it ended (`None`: SoulBox failed
/// it), and how long it took from acceptance.
pub trait ExecutionObserver: Send + Sync + std::fmt::Debug {
    /// An execution ended.
    fn execution_ended(&self, tier: Tier, termination: Option<&Termination>, took: Duration);
}

/// Routes executions to the tiers. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Dispatcher {
    backends: Vec<Arc<dyn Backend>>,
    /// Tiers that could not start here, with the reason, for refusals that say why.
    unavailable: Vec<(Tier, String)>,
    observer: Option<Arc<dyn ExecutionObserver>>,
}

impl Dispatcher {
    /// A dispatcher with no tiers; add them with [`Dispatcher::with_backend`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells `observer` of every execution's end.
    pub fn with_observer(mut self, observer: Arc<dyn ExecutionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Adds a tier. At most one backend per tier; a second one replaces the first.
    pub fn with_backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backends.retain(|b| b.tier() != backend.tier());
        self.backends.push(backend);
        self
    }

    /// Records that `tier` could not start here and why; executions that need it are refused
    /// with that reason.
    pub fn with_unavailable(mut self, tier: Tier, reason: impl Into<String>) -> Self {
        self.unavailable.push((tier, reason.into()));
        self
    }

    fn unavailable_reason(&self, tier: Tier) -> Option<&str> {
        self.unavailable.iter().find(|(t, _)| *t == tier).map(|(_, reason)| reason.as_str())
    }

    /// The tiers available.
    pub fn tiers(&self) -> Vec<Tier> {
        self.backends.iter().map(|b| b.tier()).collect()
    }

    /// Every language known by any tier, with the tier and its status.
    pub fn languages(&self) -> Vec<(Tier, LanguageSupport)> {
        self.backends
            .iter()
            .flat_map(|b| b.languages().into_iter().map(move |l| (b.tier(), l)))
            .collect()
    }

    fn backend(&self, tier: Tier) -> Option<&Arc<dyn Backend>> {
        self.backends.iter().find(|b| b.tier() == tier)
    }

    /// Picks the backend for a request, or says why none can run it.
    pub fn route(
        &self,
        sandbox: &Sandbox,
        request: &ExecRequest,
    ) -> Result<Arc<dyn Backend>, DispatchError> {
        request.limits.validate()?;
        let preference = match request.tier {
            TierPreference::Auto => sandbox.spec().tier,
            forced => forced,
        };
        let candidates: Vec<Tier> = match preference {
            TierPreference::Auto => vec![Tier::Wasm, Tier::Native],
            TierPreference::Wasm => vec![Tier::Wasm],
            TierPreference::Native => vec![Tier::Native],
        };
        match &request.kind {
            ExecKind::Cell { language, code } => {
                if code.len() > MAX_CODE_BYTES {
                    return Err(DispatchError::CodeTooLarge {
                        size: code.len(),
                        max: MAX_CODE_BYTES,
                    });
                }
                self.route_cell(language, &candidates)
            }
            ExecKind::Command { .. } => candidates
                .iter()
                .filter_map(|tier| self.backend(*tier))
                .find(|b| b.runs_commands())
                .cloned()
                .ok_or_else(|| DispatchError::TierCannotRun {
                    tier: Tier::Native,
                    reason: match self.unavailable_reason(Tier::Native) {
                        Some(why) => format!(
                            "commands need the native tier, which is unavailable here: {why}"
                        ),
                        None => {
                            "commands need the native tier, which is not available in this server"
                                .to_owned()
                        }
                    },
                }),
        }
    }

    fn route_cell(
        &self,
        language: &Language,
        candidates: &[Tier],
    ) -> Result<Arc<dyn Backend>, DispatchError> {
        let mut not_installed = None;
        for tier in candidates {
            let Some(backend) = self.backend(*tier) else { continue };
            let support = backend.languages().into_iter().find(|l| &l.language == language);
            match support.map(|l| l.status) {
                Some(LanguageStatus::Ready) => return Ok(backend.clone()),
                Some(LanguageStatus::NotInstalled { install_command }) => {
                    not_installed.get_or_insert(install_command);
                }
                None => {}
            }
        }
        if let Some(install_command) = not_installed {
            return Err(DispatchError::LanguageNotInstalled {
                language: language.clone(),
                install_command,
            });
        }
        if let [tier] = candidates
            && self.backend(*tier).is_none()
        {
            let reason = self
                .unavailable_reason(*tier)
                .unwrap_or("this tier is not available in this server")
                .to_owned();
            return Err(DispatchError::TierCannotRun { tier: *tier, reason });
        }
        if let Some(tier) = candidates.iter().find(|t| self.backend(**t).is_none())
            && let Some(why) = self.unavailable_reason(*tier)
        {
            return Err(DispatchError::TierCannotRun {
                tier: *tier,
                reason: format!(
                    "`{language}` is not a language of the tiers available here, and the {tier} tier is unavailable: {why}"
                ),
            });
        }
        let mut installed: Vec<Language> = self
            .languages()
            .into_iter()
            .filter(|(_, l)| l.status == LanguageStatus::Ready)
            .map(|(_, l)| l.language)
            .collect();
        installed.sort();
        installed.dedup();
        Err(DispatchError::UnknownLanguage { language: language.clone(), installed })
    }

    /// Starts an execution: routes it, then runs it in the background. Its events arrive on the
    /// returned [`Execution`] as they are produced; the last is `End` or `Failed`. Dropping the
    /// `Execution` stops the execution (the backend's work is cancelled). Must be called from
    /// within a tokio runtime.
    pub fn start(
        &self,
        sandbox: Arc<Sandbox>,
        request: ExecRequest,
    ) -> Result<Execution, DispatchError> {
        let backend = self.route(&sandbox, &request)?;
        let tier = backend.tier();
        let (sink, events) = EventSink::channel();
        let accepted = Instant::now();
        let observer = self.observer.clone();
        // The execution's span is a child of the request's, so one slow request can be
        // followed from the API through the dispatch into its tier.
        let span = tracing::info_span!("execution", sandbox = %sandbox.id(), %tier);
        tracing::debug!(parent: &span, "dispatching execution");
        let work = async move {
            let outcome = tokio::select! {
                outcome = backend.exec(&sandbox, request, &sink) => outcome,
                () = sink.closed() => {
                    tracing::debug!(sandbox = %sandbox.id(), "execution abandoned by its caller; stopped");
                    return;
                }
            };
            let event = match outcome {
                Ok(outcome) => ExecEvent::End(ExecSummary {
                    termination: outcome.termination,
                    tier,
                    timings: Timings {
                        startup_us: Timings::micros(outcome.startup),
                        run_us: Timings::micros(outcome.run),
                        total_us: Timings::micros(accepted.elapsed()),
                    },
                }),
                Err(error) => {
                    tracing::error!(sandbox = %sandbox.id(), %error, "execution failed");
                    ExecEvent::Failed(error.to_string())
                }
            };
            if let Some(observer) = &observer {
                let termination = match &event {
                    ExecEvent::End(summary) => Some(&summary.termination),
                    _ => None,
                };
                observer.execution_ended(tier, termination, accepted.elapsed());
            }
            sink.send(event);
        };
        execution_threads().spawn(tracing::Instrument::instrument(work, span));
        Ok(Execution { tier, events })
    }

    /// Starts a long-lived process in the tier that runs commands (the native tier); the rule
    /// is the one of commands, and the sandbox's tier preference is honoured.
    pub async fn spawn(
        &self,
        sandbox: &Sandbox,
        request: &ProcessRequest,
    ) -> Result<SpawnedProcess, ProcessError> {
        if sandbox.spec().tier == TierPreference::Wasm {
            return Err(ProcessError::Unavailable(
                "this sandbox runs only in the WASM tier, which runs no processes".to_owned(),
            ));
        }
        match self.backends.iter().find(|b| b.runs_commands()) {
            Some(backend) => backend.spawn(sandbox, request).await,
            None => Err(ProcessError::Unavailable(match self.unavailable_reason(Tier::Native) {
                Some(why) => {
                    format!("processes need the native tier, which is unavailable here: {why}")
                }
                None => "processes need the native tier, which is not available in this server"
                    .to_owned(),
            })),
        }
    }

    /// What the sandbox uses, summed over the tiers.
    pub fn usage(&self, sandbox: &Sandbox) -> ResourceUsage {
        self.backends.iter().map(|b| b.usage(sandbox.id())).fold(
            ResourceUsage::default(),
            |sum, u| ResourceUsage {
                cpu_time: sum.cpu_time + u.cpu_time,
                memory_bytes: sum.memory_bytes + u.memory_bytes,
            },
        )
    }

    /// What the sandbox uses, by tier.
    pub fn usage_by_tier(&self, sandbox: &Sandbox) -> Vec<(Tier, ResourceUsage)> {
        self.backends.iter().map(|b| (b.tier(), b.usage(sandbox.id()))).collect()
    }

    /// Forgets the kernels of a cell context in every tier ([`Backend::reset_context`]).
    pub async fn reset_context(&self, sandbox: &Sandbox, context: &str) {
        for backend in &self.backends {
            backend.reset_context(sandbox.id(), context).await;
        }
    }

    /// Releases what every tier holds for the sandbox.
    pub async fn close(&self, sandbox: &Sandbox) {
        for backend in &self.backends {
            backend.close(sandbox.id()).await;
        }
    }

    /// Pauses the sandbox in every tier ([`Backend::pause`]).
    pub async fn pause(&self, sandbox: &Sandbox) -> Result<(), BackendError> {
        for backend in &self.backends {
            backend.pause(sandbox.id()).await?;
        }
        Ok(())
    }

    /// Resumes the sandbox in every tier ([`Backend::resume`]).
    pub async fn resume(&self, sandbox: &Sandbox) -> Result<(), BackendError> {
        for backend in &self.backends {
            backend.resume(sandbox.id()).await?;
        }
        Ok(())
    }
}

/// A running execution: the tier that runs it and its stream of events.
#[derive(Debug)]
pub struct Execution {
    tier: Tier,
    events: mpsc::UnboundedReceiver<ExecEvent>,
}

impl Execution {
    /// The tier chosen for it.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The next event, or `None` after the last.
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Waits for the end and gathers every event into one [`ExecOutput`].
    pub async fn collect(mut self) -> ExecOutput {
        let mut stdout = BytesMut::new();
        let mut stderr = BytesMut::new();
        let mut output = ExecOutput {
            tier: self.tier,
            stdout: String::new(),
            stderr: String::new(),
            results: Vec::new(),
            error: None,
            termination: None,
            exit_code: None,
            timings: Timings::default(),
            failure: None,
        };
        while let Some(event) = self.events.recv().await {
            match event {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Result(r) => output.results.push(r),
                ExecEvent::Error(e) => output.error = Some(e),
                ExecEvent::End(summary) => {
                    output.exit_code = Some(summary.termination.exit_code());
                    output.termination = Some(summary.termination);
                    output.timings = summary.timings;
                }
                ExecEvent::Failed(message) => output.failure = Some(message),
            }
        }
        output.stdout = String::from_utf8_lossy(&stdout).into_owned();
        output.stderr = String::from_utf8_lossy(&stderr).into_owned();
        output
    }
}

/// Everything an execution produced, gathered. This is the shape of `soulbox run --json` and
/// of `POST /v1/run`'s final result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    /// The tier that ran it.
    pub tier: Tier,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Values produced by the cell.
    pub results: Vec<CellResult>,
    /// The exception the code raised, if any.
    pub error: Option<GuestError>,
    /// How it ended; absent when SoulBox failed (see `failure`).
    pub termination: Option<Termination>,
    /// The exit code matching `termination`.
    pub exit_code: Option<i32>,
    /// Where the time went.
    pub timings: Timings,
    /// Why SoulBox could not run it, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}
