//! What an execution is: the request, the events it streams, and how it ended.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::limits::{Limits, OutputStream};

/// The two tiers an execution can run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A WASI module in wasmtime.
    Wasm,
    /// A process in Linux namespaces.
    Native,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wasm => "wasm",
            Self::Native => "native",
        })
    }
}

/// Which tier a request wants; `Auto` lets the dispatcher choose (see [`crate::Dispatcher`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierPreference {
    /// The dispatcher's rule decides.
    #[default]
    Auto,
    /// Only the WASM tier; refused if it cannot run the request.
    Wasm,
    /// Only the native tier; refused if it cannot run the request.
    Native,
}

/// A language's canonical name, such as `python`. Parse user input with [`Language::parse`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Language(String);

/// Names users type for a language, mapped to its canonical name.
const LANGUAGE_ALIASES: &[(&str, &str)] = &[
    ("py", "python"),
    ("python3", "python"),
    ("js", "javascript"),
    ("rb", "ruby"),
    ("nodejs", "node"),
    ("shell", "bash"),
    ("c++", "cpp"),
    ("cxx", "cpp"),
    ("rs", "rust"),
    ("golang", "go"),
];

impl Language {
    /// Normalises a user-given name: lower case, with common aliases (`py`, `js`, `rb`, `c++`,
    /// `golang`...) mapped to the canonical name. `node` is Node.js itself (the native tier),
    /// not the WASM tier's `javascript`.
    pub fn parse(name: &str) -> Self {
        let lower = name.trim().to_ascii_lowercase();
        let canonical = LANGUAGE_ALIASES
            .iter()
            .find(|(alias, _)| *alias == lower)
            .map_or(lower.as_str(), |(_, canonical)| canonical);
        Self(canonical.to_owned())
    }

    /// The canonical name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExecKind {
    /// A code cell for a stateful kernel of `language`: variables persist between cells of the
    /// same sandbox, and the value of the last expression comes back as a result.
    Cell {
        /// The cell's language.
        language: Language,
        /// The source code.
        code: String,
    },
    /// A program with its arguments (the native tier).
    Command {
        /// The program and its arguments.
        argv: Vec<String>,
    },
}

/// One execution inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// What to run.
    pub kind: ExecKind,
    /// Environment variables added to the sandbox's own for this execution.
    pub env: BTreeMap<String, String>,
    /// The limits of this execution.
    pub limits: Limits,
    /// Which tier to use.
    pub tier: TierPreference,
    /// The cell context: cells of one context share a kernel per language, apart from the
    /// sandbox's default kernels (`None`). Commands ignore it.
    pub context: Option<String>,
}

impl ExecRequest {
    /// A code cell with default limits and no extra environment.
    pub fn cell(language: Language, code: impl Into<String>) -> Self {
        Self {
            kind: ExecKind::Cell { language, code: code.into() },
            env: BTreeMap::new(),
            limits: Limits::default(),
            tier: TierPreference::Auto,
            context: None,
        }
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// A rich value produced by a cell, keyed by MIME type as in Jupyter: `text/plain`,
/// `text/html`, `image/png` (base64), `image/svg+xml`, `application/json`...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellResult {
    /// The representations of the value, by MIME type.
    pub data: BTreeMap<String, String>,
    /// Whether this is the value of the cell's last expression (else a figure or display).
    pub is_main_result: bool,
}

/// An exception raised by the guest's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestError {
    /// The exception's type, such as `ZeroDivisionError`.
    pub name: String,
    /// Its message.
    pub value: String,
    /// The formatted traceback.
    pub traceback: String,
}

/// How an execution ended. Guest behaviour, including failure, is a `Termination`, never an
/// error of SoulBox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Termination {
    /// The program exited, or the cell finished (code 0) or raised (code 1).
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A native process was killed by a signal.
    Signalled {
        /// The signal number.
        signal: i32,
    },
    /// The wall-clock limit was reached and the execution was stopped.
    TimedOut {
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// The memory limit was reached and the execution was stopped.
    MemoryExceeded {
        /// The limit, in bytes.
        limit_bytes: u64,
    },
    /// An output stream passed its cap; output was cut and the execution stopped.
    OutputLimitExceeded {
        /// The stream that overflowed.
        stream: OutputStream,
        /// Its cap, in bytes.
        limit_bytes: u64,
    },
    /// The guest crashed (a WebAssembly trap such as an out-of-bounds access or stack
    /// overflow).
    Crashed {
        /// What happened, for people.
        reason: String,
    },
}

impl Termination {
    /// The exit code a command-line wrapper should use: the guest's own code, 128 + signal,
    /// 124 for a timeout (as `timeout(1)`), 137 for memory (as an OOM kill), 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Exited { code } => *code,
            Self::Signalled { signal } => 128 + signal,
            Self::TimedOut { .. } => 124,
            Self::MemoryExceeded { .. } => 137,
            Self::OutputLimitExceeded { .. } | Self::Crashed { .. } => 125,
        }
    }

    /// Whether the execution finished normally with code 0.
    pub fn is_success(&self) -> bool {
        *self == Self::Exited { code: 0 }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited { code } => write!(f, "exited with code {code}"),
            Self::Signalled { signal } => write!(f, "killed by signal {signal}"),
            Self::TimedOut { limit_ms } => write!(f, "timed out after {limit_ms} ms"),
            Self::MemoryExceeded { limit_bytes } => {
                write!(f, "memory limit of {limit_bytes} bytes exceeded")
            }
            Self::OutputLimitExceeded { stream, limit_bytes } => {
                write!(f, "{stream} passed its cap of {limit_bytes} bytes")
            }
            Self::Crashed { reason } => write!(f, "crashed: {reason}"),
        }
    }
}

/// Where the time of an execution went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Making the sandbox's interpreter or process ready (zero when a kernel was reused).
    pub startup_us: u64,
    /// Running the code.
    pub run_us: u64,
    /// From the dispatcher's acceptance to the end.
    pub total_us: u64,
}

impl Timings {
    /// Converts a duration to whole microseconds, saturating.
    pub fn micros(d: Duration) -> u64 {
        u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
    }
}

/// The last event of a successful dispatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSummary {
    /// How it ended.
    pub termination: Termination,
    /// Which tier ran it.
    pub tier: Tier,
    /// Where the time went.
    pub timings: Timings,
}

/// One thing an execution produced, in order. `End` or `Failed` is always last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes written to standard output.
    Stdout(Bytes),
    /// Bytes written to standard error.
    Stderr(Bytes),
    /// A value: the last expression, a figure, a display.
    Result(CellResult),
    /// An exception raised by the guest's code.
    Error(GuestError),
    /// The execution ended; no event follows.
    End(ExecSummary),
    /// SoulBox could not build or enforce the sandbox; nothing ran past this point.
    Failed(String),
}

/// Where a backend sends the events of one execution. Sending never blocks; every stream is
/// capped by the execution's limits, so what is queued is bounded.
#[derive(Debug, Clone)]
pub struct EventSink(mpsc::UnboundedSender<ExecEvent>);

impl EventSink {
    /// A sink and the receiving end of its events.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<ExecEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    /// Sends an event; a receiver that went away is not an error (the client left).
    pub fn send(&self, event: ExecEvent) {
        let _ = self.0.send(event);
    }

    /// Whether the receiver is gone, so the work can stop early.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Completes when the receiver is gone.
    pub async fn closed(&self) {
        self.0.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_aliases_map_to_canonical_names() {
        assert_eq!(Language::parse("Py").as_str(), "python");
        assert_eq!(Language::parse("node").as_str(), "node");
        assert_eq!(Language::parse("C++").as_str(), "cpp");
        assert_eq!(Language::parse(" ruby ").as_str(), "ruby");
        assert_eq!(Language::parse("cobol").as_str(), "cobol");
    }

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(Termination::TimedOut { limit_ms: 1 }.exit_code(), 124);
        assert_eq!(Termination::Exited { code: 3 }.exit_code(), 3);
        assert_eq!(Termination::Signalled { signal: 9 }.exit_code(), 137);
    }

    #[test]
    fn termination_serialises_with_a_kind_tag() {
        let json = serde_json::to_string(&Termination::TimedOut { limit_ms: 5 }).expect("json");
        assert_eq!(json, r#"{"kind":"timed_out","limit_ms":5}"#);
    }
}
