//! WASM worker processes: kernels run in single-threaded child processes of the server, one
//! per CPU, instead of on the server's own threads.
//!
//! Why: a kernel starts from its pack's image by copy-on-write, and its first cells take
//! hundreds of write faults on image pages. In a process whose threads run on several CPUs at
//! once, each such fault must flush the page from the other CPUs' TLBs with an interrupt
//! (a costly VM exit on a virtual machine). A worker runs its kernels on one thread, so its
//! faults stay on the CPU that takes them: on this project's 2-core VM, Python's create +
//! cell + kill costs less than half the CPU it did in the server's threads (README,
//! "Under load"). A worker that crashes takes only its own kernels with it.
//!
//! The server ([`Workers`]) starts `program args...` with one end of a Unix socket pair as its
//! standard input; the worker ([`serve`]) answers on it. Messages are frames: a 4-byte length,
//! a 1-byte kind, then JSON (a [`Request`] or a [`Reply`]) or, for output, a kernel id and
//! raw bytes. A worker exits when its socket closes, so it never outlives the server.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use soulbox_runtime::{
    CellResult, EventSink, ExecEvent, GuestError, Language, Limits, OutputStream, Termination,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::WasmError;
use crate::backend::WasmBackend;
use crate::engine::EngineSettings;
use crate::kernel::{CellEnd, Kernel};

/// The largest frame either side accepts (a cell's source is at most a few MiB).
const MAX_FRAME_BYTES: usize = 256 << 20;
/// How long past its own wall-clock limit the server waits for a worker's cell before it
/// gives the kernel up (the worker enforces the limit; this catches a worker that hangs).
const CELL_GRACE: Duration = Duration::from_secs(10);

/// How long a worker may take to start a kernel (it takes milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a kernel could not start in a worker that died.
const WORKER_ENDED_AT_START: &str = "the WASM worker process ended while starting a kernel";

/// What a cell of a kernel whose worker died says.
const WORKER_GONE: &str = "the kernel's WASM worker process ended, and the kernel's state with \
    it; the next cell starts a new kernel";

const FRAME_JSON: u8 = 0;
const FRAME_STDOUT: u8 = 1;
const FRAME_STDERR: u8 = 2;

/// What the server asks of a worker.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Start kernel `kernel` of `language` from its pack's image.
    Start { kernel: u64, language: Language, workspace: PathBuf, scratch: PathBuf, limits: Limits },
    /// Run a cell on an idle kernel.
    Cell { kernel: u64, code: String, env: BTreeMap<String, String>, limits: Limits },
    /// The kernel's sandbox directory moved (a warm kernel adopted).
    Moved { kernel: u64, from: PathBuf, to: PathBuf },
    /// Drop the kernel, stopping its cell if one runs.
    Drop { kernel: u64 },
}

/// What a worker answers.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// The kernel started (`Ok`), or its start was stopped by a limit, or failed.
    Started { kernel: u64, outcome: StartOutcome },
    /// A value the cell produced.
    Result { kernel: u64, result: CellResult },
    /// The exception the cell raised.
    Error { kernel: u64, error: GuestError },
    /// The cell ended; no more of its events follow.
    CellEnd { kernel: u64, termination: Termination, reusable: bool, memory_bytes: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
enum StartOutcome {
    Ready { memory_bytes: u64 },
    Stopped(Termination),
    Failed(String),
}

/// One message on the socket.
#[derive(Debug)]
enum Frame {
    Json(Vec<u8>),
    Output { kernel: u64, stream: OutputStream, bytes: Bytes },
}

impl Frame {
    fn json(message: &impl Serialize) -> Self {
        // Our own message types always serialise.
        Self::Json(serde_json::to_vec(message).unwrap_or_default())
    }

    async fn write(&self, to: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        let (kind, head, body): (u8, &[u8], &[u8]) = match self {
            Self::Json(json) => (FRAME_JSON, &[], json),
            Self::Output { kernel, stream, bytes } => {
                let kind = match stream {
                    OutputStream::Stdout => FRAME_STDOUT,
                    OutputStream::Stderr => FRAME_STDERR,
                };
                (kind, &kernel.to_be_bytes(), bytes)
            }
        };
        let invalid = |_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large");
        let len = u32::try_from(1 + head.len() + body.len()).map_err(invalid)?;
        let mut header = [0; 5];
        header[..4].copy_from_slice(&len.to_be_bytes());
        header[4] = kind;
        to.write_all(&header).await?;
        to.write_all(head).await?;
        to.write_all(body).await
    }

    /// The next frame, or `None` at the end of the stream.
    async fn read(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Self>> {
        let len = match from.read_u32().await {
            Ok(len) => usize::try_from(len).unwrap_or(usize::MAX),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes"),
            ));
        }
        let kind = from.read_u8().await?;
        let mut body = vec![0; len - 1];
        from.read_exact(&mut body).await?;
        let output = |stream, body: Vec<u8>| -> std::io::Result<Self> {
            if body.len() < 8 {
                let short = "a short output frame";
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, short));
            }
            let mut bytes = Bytes::from(body);
            let id = bytes.split_to(8);
            let kernel = u64::from_be_bytes(id.as_ref().try_into().unwrap_or_default());
            Ok(Self::Output { kernel, stream, bytes })
        };
        match kind {
            FRAME_JSON => Ok(Some(Self::Json(body))),
            FRAME_STDOUT => output(OutputStream::Stdout, body).map(Some),
            FRAME_STDERR => output(OutputStream::Stderr, body).map(Some),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of unknown kind {other}"),
            )),
        }
    }
}

/// Writes the frames sent to `frames` until every sender is gone, then shuts the socket's
/// writing side.
fn spawn_writer(
    mut socket: impl AsyncWrite + Unpin + Send + 'static,
) -> mpsc::UnboundedSender<Frame> {
    let (frames, mut queued) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        while let Some(frame) = queued.recv().await {
            if let Err(error) = frame.write(&mut socket).await {
                tracing::debug!(%error, "the WASM worker socket closed");
                return;
            }
        }
        let _ = socket.shutdown().await;
    });
    frames
}

// ---- The worker process ----

/// A kernel in the worker: idle between cells, or busy (starting or running a cell) in a task
/// that aborting stops.
enum WorkerKernel {
    Idle(Kernel),
    Busy(tokio::task::AbortHandle),
}

/// A worker's kernels and where its replies go. Its runtime has one thread, so a task spawned
/// by a request runs only after the request's handler has marked the kernel busy.
#[derive(Clone)]
struct WorkerState {
    backend: Arc<WasmBackend>,
    kernels: Arc<Mutex<HashMap<u64, WorkerKernel>>>,
    replies: mpsc::UnboundedSender<Frame>,
}

/// Runs a worker: kernels of the packs installed under `data_dir`, driven by requests on the
/// socket that is this process's standard input. Returns when the socket closes (the server
/// went away); blocks the calling thread, on a single-threaded runtime of its own.
pub fn serve(data_dir: &Path, settings: EngineSettings) -> Result<(), WasmError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WasmError::Engine(format!("starting the worker's runtime: {e}")))?;
    let io = |source| WasmError::Io { path: "standard input".into(), source };
    let socket = std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned().map_err(io)?;
    let socket = std::fs::File::from(socket);
    if !std::os::unix::fs::FileTypeExt::is_socket(&socket.metadata().map_err(io)?.file_type()) {
        return Err(WasmError::Engine(
            "a WASM worker serves `soulbox serve` over a socket on its standard input, and \
             this standard input is not one: workers are started by `soulbox serve`"
                .into(),
        ));
    }
    let socket = std::os::fd::OwnedFd::from(socket);
    let backend = WasmBackend::builder(data_dir).max_instances(settings.max_instances).build()?;
    runtime.block_on(async move {
        let socket = std::os::unix::net::UnixStream::from(socket);
        socket.set_nonblocking(true).map_err(io)?;
        let (mut reader, writer) =
            tokio::net::UnixStream::from_std(socket).map_err(io)?.into_split();
        let state = WorkerState {
            backend: Arc::new(backend),
            kernels: Arc::default(),
            replies: spawn_writer(writer),
        };
        loop {
            let frame = match Frame::read(&mut reader).await {
                Ok(Some(Frame::Json(json))) => json,
                Ok(Some(Frame::Output { .. })) => continue,
                Ok(None) => return Ok(()),
                Err(source) => return Err(io(source)),
            };
            match serde_json::from_slice::<Request>(&frame) {
                Ok(request) => state.handle(request),
                Err(error) => tracing::warn!(%error, "a WASM worker request it cannot read"),
            }
        }
    })
}

impl WorkerState {
    fn kernels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, WorkerKernel>> {
        self.kernels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reply(&self, reply: &Reply) {
        let _ = self.replies.send(Frame::json(reply));
    }

    fn handle(&self, request: Request) {
        match request {
            Request::Start { kernel, language, workspace, scratch, limits } => {
                let state = self.clone();
                let task = tokio::spawn(async move {
                    let outcome =
                        state.start(kernel, &language, &workspace, scratch, &limits).await;
                    state.reply(&Reply::Started { kernel, outcome });
                });
                self.kernels().insert(kernel, WorkerKernel::Busy(task.abort_handle()));
            }
            Request::Cell { kernel: id, code, env, limits } => {
                let idle = {
                    let mut kernels = self.kernels();
                    match kernels.remove(&id) {
                        Some(WorkerKernel::Idle(kernel)) => Some(kernel),
                        Some(busy) => {
                            kernels.insert(id, busy);
                            None
                        }
                        None => None,
                    }
                };
                let Some(kernel) = idle else {
                    let reason = "the WASM worker has no idle kernel with this id".to_owned();
                    let termination = Termination::Crashed { reason };
                    let end = Reply::CellEnd {
                        kernel: id,
                        termination,
                        reusable: false,
                        memory_bytes: 0,
                    };
                    self.reply(&end);
                    return;
                };
                let state = self.clone();
                let task =
                    tokio::spawn(
                        async move { state.run_cell(id, kernel, code, env, limits).await },
                    );
                self.kernels().insert(id, WorkerKernel::Busy(task.abort_handle()));
            }
            Request::Moved { kernel, from, to } => {
                if let Some(WorkerKernel::Idle(kernel)) = self.kernels().get_mut(&kernel) {
                    kernel.moved(&from, &to);
                }
            }
            Request::Drop { kernel } => {
                // An idle kernel drops here; a busy one with its task.
                if let Some(WorkerKernel::Busy(task)) = self.kernels().remove(&kernel) {
                    task.abort();
                }
            }
        }
    }

    async fn start(
        &self,
        id: u64,
        language: &Language,
        workspace: &Path,
        scratch: PathBuf,
        limits: &Limits,
    ) -> StartOutcome {
        let pack = match self.backend.installed_or_rescan(language) {
            Ok(pack) => pack,
            Err(error) => return StartOutcome::Failed(error.to_string()),
        };
        let driver = pack.record.spec.driver;
        let started =
            Kernel::start(&pack.image, driver, &pack.dir, workspace, scratch, limits).await;
        let mut kernels = self.kernels();
        match started {
            Ok(Ok(kernel)) => {
                let memory_bytes = kernel.memory_gauge().load(Ordering::Relaxed);
                // A kernel dropped while it started is not put back.
                if kernels.contains_key(&id) {
                    kernels.insert(id, WorkerKernel::Idle(kernel));
                }
                StartOutcome::Ready { memory_bytes }
            }
            Ok(Err(termination)) => {
                kernels.remove(&id);
                StartOutcome::Stopped(termination)
            }
            Err(error) => {
                kernels.remove(&id);
                StartOutcome::Failed(error.to_string())
            }
        }
    }

    /// Runs a cell, sending its events as they come and its end last.
    async fn run_cell(
        &self,
        id: u64,
        mut kernel: Kernel,
        code: String,
        env: BTreeMap<String, String>,
        limits: Limits,
    ) {
        let (sink, mut events) = EventSink::channel();
        let run = async {
            let end = kernel.run_cell(&code, &env, &limits, &sink).await;
            drop(sink);
            end
        };
        let forward = async {
            while let Some(event) = events.recv().await {
                if let Some(frame) = event_frame(id, event) {
                    let _ = self.replies.send(frame);
                }
            }
        };
        let (CellEnd { termination, reusable }, ()) = tokio::join!(run, forward);
        let memory_bytes = kernel.memory_gauge().load(Ordering::Relaxed);
        {
            let mut kernels = self.kernels();
            if reusable && kernels.contains_key(&id) {
                kernels.insert(id, WorkerKernel::Idle(kernel));
            } else {
                kernels.remove(&id);
            }
        }
        self.reply(&Reply::CellEnd { kernel: id, termination, reusable, memory_bytes });
    }
}

/// The frame that carries a kernel's event to the server (a kernel sends only these four).
fn event_frame(kernel: u64, event: ExecEvent) -> Option<Frame> {
    Some(match event {
        ExecEvent::Stdout(bytes) => Frame::Output { kernel, stream: OutputStream::Stdout, bytes },
        ExecEvent::Stderr(bytes) => Frame::Output { kernel, stream: OutputStream::Stderr, bytes },
        ExecEvent::Result(result) => Frame::json(&Reply::Result { kernel, result }),
        ExecEvent::Error(error) => Frame::json(&Reply::Error { kernel, error }),
        ExecEvent::End(_) | ExecEvent::Failed(_) => return None,
    })
}

// ---- The server's side ----

/// How the server starts a worker: `program` with `args`, which must end up in [`serve`].
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The executable (for `soulbox serve`, its own binary).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// How many workers to keep (one per CPU is right for most hosts).
    pub count: usize,
}

/// A kernel's events, routed to it by the worker's reader.
#[derive(Debug)]
enum Incoming {
    Started(StartOutcome),
    Event(ExecEvent),
    CellEnd { termination: Termination, reusable: bool, memory_bytes: u64 },
}

/// Where a worker's replies go, by kernel; `None` once the worker is gone (so a kernel cannot
/// be routed to a worker that will never answer).
type Routes = Arc<Mutex<Option<HashMap<u64, mpsc::UnboundedSender<Incoming>>>>>;

fn lock_routes(
    routes: &Routes,
) -> std::sync::MutexGuard<'_, Option<HashMap<u64, mpsc::UnboundedSender<Incoming>>>> {
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One worker process as the server sees it.
#[derive(Debug)]
struct Worker {
    requests: mpsc::UnboundedSender<Frame>,
    routes: Routes,
    kernels: AtomicUsize,
    pid: Option<u32>,
}

impl Worker {
    fn spawn(command: &WorkerCommand) -> Result<Self, WasmError> {
        let io = |source| WasmError::Io { path: command.program.clone(), source };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io)?;
        let mut child = tokio::process::Command::new(&command.program)
            .args(&command.args)
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io)?;
        let pid = child.id();
        ours.set_nonblocking(true).map_err(io)?;
        let (mut reader, writer) = tokio::net::UnixStream::from_std(ours).map_err(io)?.into_split();
        let routes = Routes::new(Mutex::new(Some(HashMap::new())));
        let replies = routes.clone();
        tokio::spawn(async move {
            loop {
                match Frame::read(&mut reader).await {
                    Ok(Some(frame)) => route(frame, &replies),
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "reading from a WASM worker");
                        break;
                    }
                }
            }
            // Every kernel of this worker is gone with it: their channels close.
            *lock_routes(&replies) = None;
            drop(reader);
            match child.wait().await {
                Ok(status) if status.success() => {}
                Ok(status) => tracing::warn!(?pid, %status, "a WASM worker process ended"),
                Err(error) => tracing::warn!(?pid, %error, "waiting for a WASM worker"),
            }
        });
        tracing::debug!(?pid, "started a WASM worker");
        Ok(Self { requests: spawn_writer(writer), routes, kernels: AtomicUsize::new(0), pid })
    }

    fn send(&self, request: &Request) {
        let _ = self.requests.send(Frame::json(request));
    }

    fn alive(&self) -> bool {
        lock_routes(&self.routes).is_some()
    }
}

fn route(frame: Frame, routes: &Routes) {
    let (kernel, incoming) = match frame {
        Frame::Output { kernel, stream, bytes } => {
            let event = match stream {
                OutputStream::Stdout => ExecEvent::Stdout(bytes),
                OutputStream::Stderr => ExecEvent::Stderr(bytes),
            };
            (kernel, Incoming::Event(event))
        }
        Frame::Json(json) => match serde_json::from_slice::<Reply>(&json) {
            Ok(Reply::Started { kernel, outcome }) => (kernel, Incoming::Started(outcome)),
            Ok(Reply::Result { kernel, result }) => {
                (kernel, Incoming::Event(ExecEvent::Result(result)))
            }
            Ok(Reply::Error { kernel, error }) => {
                (kernel, Incoming::Event(ExecEvent::Error(error)))
            }
            Ok(Reply::CellEnd { kernel, termination, reusable, memory_bytes }) => {
                (kernel, Incoming::CellEnd { termination, reusable, memory_bytes })
            }
            Err(error) => {
                tracing::warn!(%error, "a WASM worker reply the server cannot read");
                return;
            }
        },
    };
    let routes = lock_routes(routes);
    if let Some(to) = routes.as_ref().and_then(|routes| routes.get(&kernel)) {
        let _ = to.send(incoming);
    }
}

/// The worker processes of a server. Workers start on first use and are replaced when they
/// die. Dropping this ends them: each worker's writer shuts its socket when its last sender
/// goes, the worker exits at that end of its input, and `kill_on_drop` ends one that does not.
#[derive(Debug)]
pub struct Workers {
    command: WorkerCommand,
    workers: Mutex<Vec<Option<Arc<Worker>>>>,
    next_kernel: AtomicU64,
}

impl Workers {
    /// Workers started with `command` (at least one).
    pub fn new(mut command: WorkerCommand) -> Self {
        command.count = command.count.max(1);
        let workers = Mutex::new(vec![None; command.count]);
        Self { command, workers, next_kernel: AtomicU64::new(0) }
    }

    /// The process ids of the workers running now.
    pub fn pids(&self) -> Vec<u32> {
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        workers.iter().flatten().filter(|w| w.alive()).filter_map(|w| w.pid).collect()
    }

    /// The live worker with the fewest kernels, started (again) if it is not running.
    fn least_loaded(&self) -> Result<Arc<Worker>, WasmError> {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in workers.iter_mut() {
            if !slot.as_ref().is_some_and(|w| w.alive()) {
                *slot = Some(Arc::new(Worker::spawn(&self.command)?));
            }
        }
        workers
            .iter()
            .flatten()
            .min_by_key(|w| w.kernels.load(Ordering::Relaxed))
            .cloned()
            .ok_or_else(|| WasmError::Engine("no WASM worker".into()))
    }

    /// Starts a kernel of `language` on the least loaded worker.
    pub(crate) async fn start(
        &self,
        language: &Language,
        workspace: &Path,
        scratch: PathBuf,
        limits: &Limits,
    ) -> Result<Result<RemoteKernel, Termination>, WasmError> {
        let worker = self.least_loaded()?;
        let id = self.next_kernel.fetch_add(1, Ordering::Relaxed);
        let (to_kernel, incoming) = mpsc::unbounded_channel();
        match lock_routes(&worker.routes).as_mut() {
            Some(routes) => routes.insert(id, to_kernel),
            None => return Err(WasmError::Sandbox(WORKER_ENDED_AT_START.into())),
        };
        worker.kernels.fetch_add(1, Ordering::Relaxed);
        // From here on, dropping the kernel tells the worker and frees its place.
        let mut kernel = RemoteKernel { id, worker, incoming, memory: Arc::default() };
        kernel.worker.send(&Request::Start {
            kernel: id,
            language: language.clone(),
            workspace: workspace.to_owned(),
            scratch,
            limits: *limits,
        });
        let Ok(started) = tokio::time::timeout(START_TIMEOUT, kernel.incoming.recv()).await else {
            return Err(WasmError::Sandbox(format!(
                "a WASM worker did not start a kernel within {START_TIMEOUT:?}"
            )));
        };
        match started {
            Some(Incoming::Started(StartOutcome::Ready { memory_bytes })) => {
                kernel.memory.store(memory_bytes, Ordering::Relaxed);
                Ok(Ok(kernel))
            }
            Some(Incoming::Started(StartOutcome::Stopped(termination))) => Ok(Err(termination)),
            Some(Incoming::Started(StartOutcome::Failed(message))) => {
                Err(WasmError::Sandbox(message))
            }
            Some(other) => {
                Err(WasmError::Sandbox(format!("a WASM worker answered {other:?} to a start")))
            }
            None => Err(WasmError::Sandbox(WORKER_ENDED_AT_START.into())),
        }
    }
}

/// A kernel living in a worker process.
#[derive(Debug)]
pub(crate) struct RemoteKernel {
    id: u64,
    worker: Arc<Worker>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    memory: Arc<AtomicU64>,
}

impl RemoteKernel {
    /// Its memory size as of its last start or cell.
    pub(crate) fn memory_gauge(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.memory)
    }

    /// Follows its directory's move (see [`Kernel::moved`]).
    pub(crate) fn moved(&mut self, from: &Path, to: &Path) {
        self.worker.send(&Request::Moved {
            kernel: self.id,
            from: from.to_owned(),
            to: to.to_owned(),
        });
    }

    /// Runs one cell in the worker, forwarding its events.
    pub(crate) async fn run_cell(
        &mut self,
        code: &str,
        env: &BTreeMap<String, String>,
        limits: &Limits,
        events: &EventSink,
    ) -> CellEnd {
        let lost = |reason: &str| CellEnd {
            termination: Termination::Crashed { reason: reason.to_owned() },
            reusable: false,
        };
        self.worker.send(&Request::Cell {
            kernel: self.id,
            code: code.to_owned(),
            env: env.clone(),
            limits: *limits,
        });
        let deadline = tokio::time::Instant::now() + limits.wall_timeout + CELL_GRACE;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Incoming::Event(event))) => events.send(event),
                Ok(Some(Incoming::CellEnd { termination, reusable, memory_bytes })) => {
                    self.memory.store(memory_bytes, Ordering::Relaxed);
                    return CellEnd { termination, reusable };
                }
                Ok(Some(Incoming::Started(_))) => {
                    return lost("the WASM worker answered out of turn");
                }
                Ok(None) => return lost(WORKER_GONE),
                Err(_) => return lost("the WASM worker did not end the cell in time"),
            }
        }
    }
}

impl Drop for RemoteKernel {
    fn drop(&mut self) {
        if let Some(routes) = lock_routes(&self.worker.routes).as_mut() {
            routes.remove(&self.id);
        }
        self.worker.kernels.fetch_sub(1, Ordering::Relaxed);
        self.worker.send(&Request::Drop { kernel: self.id });
    }
}
