//! Long-lived processes of a sandbox, as E2B's envd runs them: a process is started, runs
//! until it exits, is signalled or reaches its own deadline, and any number of clients follow
//! its output from the moment they attach. A process whose clients have all left keeps
//! running; its output is read and dropped so that it never blocks on a full pipe.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backend::BackendError;
use crate::dispatch::Dispatcher;
use crate::logs::SandboxLog;
use crate::sandbox::Sandbox;

/// How long output is still read after a process exits, for what its last write left in the
/// pipes; a descendant that keeps them open does not hold the end back longer.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

/// How many events wait for a slow follower before the process's output is held back.
const FOLLOWER_QUEUE: usize = 64;

/// The largest read from a process's output, as envd's.
const READ_CHUNK: usize = 32 << 10;

/// Who a process runs as inside the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxUser {
    /// The unprivileged `user` (uid 1000, home `/home/user`).
    #[default]
    User,
    /// `root` of the sandbox: uid 0 in the sandbox's user namespace, no privilege on the host.
    Root,
}

impl SandboxUser {
    /// The user called `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "user" => Some(Self::User),
            "root" => Some(Self::Root),
            _ => None,
        }
    }

    /// The user's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Root => "root",
        }
    }
}

/// A process to start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessRequest {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Environment variables over the sandbox's own.
    pub env: BTreeMap<String, String>,
    /// The working directory; the user's home when absent.
    pub cwd: Option<String>,
    /// Who runs it; the sandbox's default user when absent (its template's `USER`, else
    /// `user`).
    pub user: Option<SandboxUser>,
    /// Whether it gets a standard input to write to (else it reads end of file).
    pub stdin: bool,
    /// Its lifetime: it is killed at this deadline. None: until it ends.
    pub timeout: Option<Duration>,
    /// A caller's label.
    pub tag: Option<String>,
    /// Run it on a pseudo-terminal of this size (its output then comes as standard output,
    /// and its input goes to the terminal).
    pub terminal: Option<TerminalSize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// The largest terminal side accepted, in cells.
pub const MAX_TERMINAL_CELLS: u16 = 2000;

impl TerminalSize {
    /// A size, if both sides are between 1 and [`MAX_TERMINAL_CELLS`].
    pub fn new(cols: u32, rows: u32) -> Result<Self, ProcessError> {
        let side = |n: u32| u16::try_from(n).ok().filter(|n| (1..=MAX_TERMINAL_CELLS).contains(n));
        match (side(cols), side(rows)) {
            (Some(cols), Some(rows)) => Ok(Self { cols, rows }),
            _ => Err(ProcessError::Invalid(format!(
                "a terminal of {cols}x{rows}: each side takes 1 to {MAX_TERMINAL_CELLS} cells"
            ))),
        }
    }
}

/// A process as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid inside the sandbox.
    pub pid: u32,
    /// How it was started.
    pub request: ProcessRequest,
}

/// Signals a client may send to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessSignal {
    /// `SIGTERM`.
    Terminate,
    /// `SIGKILL`.
    Kill,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEnd {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signalled(i32),
    /// The sandbox ended under it (killed or torn down); it is gone.
    Lost,
}

/// What a follower of a process sees, in order; `End` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes written to standard output.
    Stdout(Bytes),
    /// Bytes written to standard error.
    Stderr(Bytes),
    /// The process ended.
    End(ProcessEnd),
}

/// Controls a started process; given by the backend that started it.
#[async_trait]
pub trait ProcessControl: Send + Sync {
    /// Sends `signal` to the process (and what it started).
    async fn signal(&self, signal: ProcessSignal) -> Result<(), BackendError>;

    /// Resizes the process's terminal; an error for a process without one.
    fn resize(&self, size: TerminalSize) -> Result<(), ProcessError>;
}

/// A process a backend has started, handed to the [`ProcessTable`].
pub struct SpawnedProcess {
    /// Its pid inside the sandbox.
    pub pid: u32,
    /// Its standard input, when asked for.
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Its standard output.
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// Its standard error.
    pub stderr: Box<dyn AsyncRead + Send + Unpin>,
    /// Completes when it ends.
    pub exit: Pin<Box<dyn Future<Output = ProcessEnd> + Send>>,
    /// Its signals and terminal.
    pub control: Arc<dyn ProcessControl>,
}

impl fmt::Debug for SpawnedProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnedProcess").field("pid", &self.pid).finish_non_exhaustive()
    }
}

/// Why a process call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The request cannot be run as given (a missing working directory, a program that does
    /// not exist, an argument list too long).
    #[error("{0}")]
    Invalid(String),
    /// No process with this pid runs (it never did, or it has ended).
    #[error("process with pid {0} not found")]
    NotFound(u32),
    /// The process's standard input was not asked for or is closed.
    #[error("the standard input of process {0} is closed (start it with stdin enabled)")]
    StdinClosed(u32),
    /// Writing its input failed: it no longer reads it.
    #[error("writing to process {pid}: {message}")]
    Input {
        /// The process.
        pid: u32,
        /// What failed.
        message: String,
    },
    /// The process has no terminal to resize.
    #[error("process {0} has no terminal (start it with a PTY)")]
    NoTerminal(u32),
    /// No tier here runs processes.
    #[error("{0}")]
    Unavailable(String),
    /// The tier failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One process of the table.
struct Live {
    pid: u32,
    request: ProcessRequest,
    stdin: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    /// Its followers; `None` once it has ended (nobody can attach any more).
    followers: Mutex<Option<Vec<mpsc::Sender<ProcessEvent>>>>,
    control: Arc<dyn ProcessControl>,
}

impl Live {
    fn followers(&self) -> MutexGuard<'_, Option<Vec<mpsc::Sender<ProcessEvent>>>> {
        self.followers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a follower, unless the process has ended.
    fn follow(&self) -> Option<ProcessFollower> {
        let (sender, receiver) = mpsc::channel(FOLLOWER_QUEUE);
        self.followers().as_mut()?.push(sender);
        Some(ProcessFollower(receiver))
    }

    /// Sends `event` to every follower, waiting for slow ones (which holds the process's
    /// output back, as a full pipe would); followers that left are dropped.
    async fn publish(&self, event: ProcessEvent) {
        let followers: Vec<_> = self.followers().iter().flatten().cloned().collect();
        for follower in followers {
            let _ = follower.send(event.clone()).await;
        }
        if let Some(followers) = self.followers().as_mut() {
            followers.retain(|f| !f.is_closed());
        }
    }
}

/// The receiving end of a process's events.
#[derive(Debug)]
pub struct ProcessFollower(mpsc::Receiver<ProcessEvent>);

impl ProcessFollower {
    /// The next event; `None` after `End` (or if the table was dropped).
    pub async fn next(&mut self) -> Option<ProcessEvent> {
        self.0.recv().await
    }
}

/// The processes of one sandbox, by pid.
#[derive(Default)]
pub struct ProcessTable {
    processes: Mutex<HashMap<u32, Arc<Live>>>,
    /// The recent output of every process, for `logs`.
    log: SandboxLog,
}

impl fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pids: Vec<u32> = self.lock().keys().copied().collect();
        f.debug_struct("ProcessTable").field("pids", &pids).finish()
    }
}

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Arc<Live>>> {
        self.processes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self, pid: u32) -> Result<Arc<Live>, ProcessError> {
        self.lock().get(&pid).cloned().ok_or(ProcessError::NotFound(pid))
    }

    /// Starts a process in `sandbox` through the dispatcher; returns its pid and a follower
    /// that sees all of its output.
    pub async fn start(
        self: &Arc<Self>,
        dispatcher: &Dispatcher,
        sandbox: &Sandbox,
        request: ProcessRequest,
    ) -> Result<(u32, ProcessFollower), ProcessError> {
        let spawned = dispatcher.spawn(sandbox, &request).await?;
        let SpawnedProcess { pid, stdin, stdout, stderr, exit, control } = spawned;
        let timeout = request.timeout;
        let live = Arc::new(Live {
            pid,
            request,
            stdin: tokio::sync::Mutex::new(stdin),
            followers: Mutex::new(Some(Vec::new())),
            control,
        });
        let follower = live.follow().ok_or(ProcessError::NotFound(pid))?;
        self.lock().insert(pid, Arc::clone(&live));
        tokio::spawn(pump(Arc::downgrade(self), live, stdout, stderr, exit, timeout));
        Ok((pid, follower))
    }

    /// Follows a running process's output from now on.
    pub fn connect(&self, pid: u32) -> Result<ProcessFollower, ProcessError> {
        self.live(pid)?.follow().ok_or(ProcessError::NotFound(pid))
    }

    /// The running processes, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut list: Vec<ProcessInfo> = self
            .lock()
            .values()
            .map(|live| ProcessInfo { pid: live.pid, request: live.request.clone() })
            .collect();
        list.sort_by_key(|p| p.pid);
        list
    }

    /// Writes `data` to the process's standard input.
    pub async fn send_input(&self, pid: u32, data: &[u8]) -> Result<(), ProcessError> {
        let live = self.live(pid)?;
        let mut stdin = live.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or(ProcessError::StdinClosed(pid))?;
        let written = async {
            pipe.write_all(data).await?;
            pipe.flush().await
        };
        written.await.map_err(|e| ProcessError::Input { pid, message: e.to_string() })
    }

    /// Closes the process's standard input: it reads end of file.
    pub async fn close_stdin(&self, pid: u32) -> Result<(), ProcessError> {
        let live = self.live(pid)?;
        live.stdin.lock().await.take();
        Ok(())
    }

    /// Sends a signal to the process.
    pub async fn signal(&self, pid: u32, signal: ProcessSignal) -> Result<(), ProcessError> {
        let live = self.live(pid)?;
        Ok(live.control.signal(signal).await?)
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, pid: u32, size: TerminalSize) -> Result<(), ProcessError> {
        self.live(pid)?.control.resize(size)
    }

    /// The sandbox's live log of its processes' output.
    pub fn log(&self) -> &SandboxLog {
        &self.log
    }

    /// Forgets every process (the sandbox is going away; its tier ends them).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Reads a process's output to its followers until it ends, kills it at its deadline, then
/// tells the followers how it ended and removes it from the table.
async fn pump(
    table: Weak<ProcessTable>,
    live: Arc<Live>,
    mut stdout: Box<dyn AsyncRead + Send + Unpin>,
    mut stderr: Box<dyn AsyncRead + Send + Unpin>,
    mut exit: Pin<Box<dyn Future<Output = ProcessEnd> + Send>>,
    timeout: Option<Duration>,
) {
    let mut out = vec![0u8; READ_CHUNK];
    let mut err = vec![0u8; READ_CHUNK];
    let stdout_stream = if live.request.terminal.is_some() { "pty" } else { "stdout" };
    let (mut out_open, mut err_open) = (true, true);
    let mut end: Option<ProcessEnd> = None;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut killed_at_deadline = false;
    // Armed when the process ends; disabled until then.
    let grace = tokio::time::sleep(OUTPUT_GRACE);
    tokio::pin!(grace);
    while end.is_none() || out_open || err_open {
        tokio::select! {
            read = stdout.read(&mut out), if out_open => match read {
                Ok(n) if n > 0 => {
                    let chunk = Bytes::copy_from_slice(&out[..n]);
                    log(&table, &live, stdout_stream, &chunk);
                    live.publish(ProcessEvent::Stdout(chunk)).await;
                }
                _ => out_open = false,
            },
            read = stderr.read(&mut err), if err_open => match read {
                Ok(n) if n > 0 => {
                    let chunk = Bytes::copy_from_slice(&err[..n]);
                    log(&table, &live, "stderr", &chunk);
                    live.publish(ProcessEvent::Stderr(chunk)).await;
                }
                _ => err_open = false,
            },
            ended = &mut exit, if end.is_none() => {
                end = Some(ended);
                grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
            }
            () = &mut grace, if end.is_some() => break,
            () = sleep_until(deadline), if end.is_none() && !killed_at_deadline => {
                killed_at_deadline = true;
                if let Err(e) = live.control.signal(ProcessSignal::Kill).await {
                    tracing::warn!(pid = live.pid, error = %e, "killing a process at its deadline");
                }
            }
        }
    }
    let end = end.unwrap_or(ProcessEnd::Lost);
    if let Some(table) = table.upgrade() {
        let mut processes = table.lock();
        // Its pid may already belong to a newer process.
        if processes.get(&live.pid).is_some_and(|p| Arc::ptr_eq(p, &live)) {
            processes.remove(&live.pid);
        }
    }
    // No follower can attach any more; the ones there get the end.
    let followers = live.followers().take().unwrap_or_default();
    for follower in followers {
        let _ = follower.send(ProcessEvent::End(end)).await;
    }
}

/// Appends a chunk of a process's output to its sandbox's log.
fn log(table: &Weak<ProcessTable>, live: &Live, stream: &'static str, chunk: &Bytes) {
    if let Some(table) = table.upgrade() {
        table.log.append(live.pid, stream, chunk.clone());
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
