//! The native tier as a [`Backend`]: one native sandbox per SoulBox sandbox, started on its
//! first native execution and kept (with its background processes) until the sandbox
//! closes. Commands run as given; cells of a native language are written to the sandbox's
//! private `/tmp`, compiled there when the language needs it, and run in `/home/user`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use nix::sys::signal::Signal;
use soulbox_runtime::{
    Backend, BackendError, BackendOutcome, EventSink, ExecEvent, ExecKind, ExecRequest, GuestError,
    Language, LanguageStatus, LanguageSupport, Limits, OutputStream, ProcessControl, ProcessEnd,
    ProcessError, ProcessRequest, ProcessSignal, ResourceUsage, Sandbox, SandboxId, SandboxUser,
    SpawnedProcess, TerminalSize, Termination, Tier,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::rootfs::{LayeredRoot, ROOT_HOME, SANDBOX_HOME, SandboxRoot};
use crate::{
    ExitStatus, NativeError, NativeProcess, NativeSandbox, NativeTier, ProcessExit, ProcessId,
    ProcessSpec, TerminalProcess, set_terminal_size,
};

/// How long output is still read after a command exits, for what a background process
/// keeping its stdout open writes meanwhile.
const OUTPUT_GRACE: Duration = Duration::from_millis(50);

/// The most compiler output kept for a compile error.
const MAX_COMPILER_OUTPUT_BYTES: usize = 256 << 10;

/// The `PATH` of every process.
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the host looks for a toolchain's program: the sandbox sees the host's `/usr`.
const PROGRAM_DIRS: [&str; 4] = ["/usr/local/bin", "/usr/bin", "/usr/local/sbin", "/usr/sbin"];

/// Exit code of a command that does not exist (as the shell's).
const COMMAND_NOT_FOUND: i32 = 127;

/// Exit code of a command that cannot be executed (as the shell's).
const COMMAND_NOT_EXECUTABLE: i32 = 126;

/// How a native language is run. In the commands, `{src}` is the cell's source file and
/// `{bin}` the compiled program, both in the cell's build directory.
#[derive(Debug)]
struct Toolchain {
    language: &'static str,
    /// The program whose presence on the host means the toolchain is installed.
    program: &'static str,
    /// The Debian package that installs it.
    package: &'static str,
    source_file: &'static str,
    compile: Option<&'static [&'static str]>,
    run: &'static [&'static str],
    /// Extra environment (caches in `/tmp`, not in the workspace).
    env: &'static [(&'static str, &'static str)],
}

/// The native languages, as data.
const TOOLCHAINS: [Toolchain; 9] = [
    Toolchain {
        language: "bash",
        program: "bash",
        package: "bash",
        source_file: "main.sh",
        compile: None,
        run: &["bash", "{src}"],
        env: &[],
    },
    Toolchain {
        language: "sh",
        program: "sh",
        package: "dash",
        source_file: "main.sh",
        compile: None,
        run: &["sh", "{src}"],
        env: &[],
    },
    Toolchain {
        language: "python-native",
        program: "python3",
        package: "python3",
        source_file: "main.py",
        compile: None,
        run: &["python3", "{src}"],
        env: &[],
    },
    Toolchain {
        language: "node",
        program: "node",
        package: "nodejs",
        source_file: "main.js",
        compile: None,
        run: &["node", "{src}"],
        env: &[],
    },
    Toolchain {
        language: "c",
        program: "gcc",
        package: "gcc",
        source_file: "main.c",
        compile: Some(&["gcc", "-O2", "-o", "{bin}", "{src}", "-lm"]),
        run: &["{bin}"],
        env: &[],
    },
    Toolchain {
        language: "cpp",
        program: "g++",
        package: "g++",
        source_file: "main.cpp",
        compile: Some(&["g++", "-O2", "-o", "{bin}", "{src}"]),
        run: &["{bin}"],
        env: &[],
    },
    Toolchain {
        language: "rust",
        program: "rustc",
        package: "rustc",
        source_file: "main.rs",
        compile: Some(&["rustc", "-O", "-o", "{bin}", "{src}"]),
        run: &["{bin}"],
        env: &[],
    },
    Toolchain {
        language: "go",
        program: "go",
        package: "golang-go",
        source_file: "main.go",
        compile: Some(&["go", "build", "-o", "{bin}", "{src}"]),
        run: &["{bin}"],
        env: &[("GOCACHE", "/tmp/.cache/go-build"), ("GOPATH", "/tmp/go")],
    },
    Toolchain {
        language: "java",
        program: "java",
        package: "default-jdk-headless",
        source_file: "Main.java",
        compile: None,
        run: &["java", "{src}"],
        env: &[],
    },
];

/// A native language and whether this host has its toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeLanguage {
    /// The language.
    pub language: Language,
    /// Whether its program is installed on the host (and so in the default template).
    pub installed: bool,
    /// The command that installs it.
    pub install_command: String,
}

type SandboxSlot = Arc<OnceCell<Arc<NativeSandbox>>>;

/// The native tier. Defaults are closed: see the crate docs for the isolation sequence.
#[derive(Debug)]
pub struct NativeBackend {
    tier: Arc<NativeTier>,
    languages: Vec<NativeLanguage>,
    sandboxes: Mutex<HashMap<SandboxId, SandboxSlot>>,
    next_cell: AtomicU64,
}

impl NativeBackend {
    /// A backend on a prepared tier; finds which toolchains the host has.
    pub fn new(tier: NativeTier) -> Self {
        let languages = TOOLCHAINS
            .iter()
            .map(|t| NativeLanguage {
                language: Language::parse(t.language),
                installed: program_installed(t.program),
                install_command: format!("apt-get install {}", t.package),
            })
            .collect();
        Self {
            tier: Arc::new(tier),
            languages,
            sandboxes: Mutex::default(),
            next_cell: AtomicU64::new(0),
        }
    }

    /// The tier.
    pub fn tier(&self) -> &Arc<NativeTier> {
        &self.tier
    }

    /// The native sandbox of `sandbox`, started on first use.
    pub async fn sandbox(
        &self,
        sandbox: &Sandbox,
        limits: &Limits,
    ) -> Result<Arc<NativeSandbox>, NativeError> {
        let slot = {
            let mut sandboxes = self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner);
            sandboxes.entry(sandbox.id().clone()).or_default().clone()
        };
        let native = slot
            .get_or_try_init(|| async {
                let root = root_of(sandbox);
                let started = self
                    .tier
                    .start_sandbox(&root, sandbox.workspace(), limits.memory_bytes)
                    .await?;
                Ok::<_, NativeError>(Arc::new(started))
            })
            .await?;
        Ok(Arc::clone(native))
    }

    /// The native sandbox of `sandbox` if one runs.
    fn live(&self, sandbox: &SandboxId) -> Option<Arc<NativeSandbox>> {
        let sandboxes = self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner);
        sandboxes.get(sandbox).and_then(|slot| slot.get().cloned())
    }

    fn forget(&self, sandbox: &SandboxId) -> Option<SandboxSlot> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner).remove(sandbox)
    }

    /// The native sandbox of `sandbox`, started on first use, and replaced first if its init
    /// was killed from outside (a fresh one on the same workspace).
    pub async fn live_sandbox(
        &self,
        sandbox: &Sandbox,
        limits: &Limits,
    ) -> Result<Arc<NativeSandbox>, NativeError> {
        let native = self.sandbox(sandbox, limits).await?;
        if native.is_alive() {
            return Ok(native);
        }
        drop(native);
        self.forget(sandbox.id());
        self.sandbox(sandbox, limits).await
    }

    /// A process's whole environment: the basics for `user`, then its template's variables,
    /// the sandbox's, then the request's (later ones win).
    fn environment<'a>(
        sandbox: &'a Sandbox,
        user: SandboxUser,
        extra: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Vec<(String, String)> {
        let home = match user {
            SandboxUser::User => SANDBOX_HOME,
            SandboxUser::Root => ROOT_HOME,
        };
        let mut env: Vec<(String, String)> = [
            ("PATH", SANDBOX_PATH),
            ("HOME", home),
            ("USER", user.name()),
            ("LOGNAME", user.name()),
            ("LANG", "C.UTF-8"),
            ("TMPDIR", "/tmp"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let template = sandbox.spec().image.iter().flat_map(|image| &image.env);
        for (key, value) in template.chain(&sandbox.spec().env).chain(extra) {
            env.retain(|(k, _)| k != key);
            env.push((key.clone(), value.clone()));
        }
        env
    }

    /// Starts a long-lived process for the runtime's process table.
    async fn start_process(
        &self,
        sandbox: &Sandbox,
        request: &ProcessRequest,
    ) -> Result<SpawnedProcess, ProcessError> {
        let failed = |e: NativeError| ProcessError::Backend(backend_error(e));
        let native = self.live_sandbox(sandbox, &sandbox.spec().limits).await.map_err(failed)?;
        let user = request.user.unwrap_or_else(|| sandbox.spec().default_user());
        let spec = ProcessSpec {
            argv: request.argv.clone(),
            env: Self::environment(sandbox, user, &request.env),
            cwd: request.cwd.clone().unwrap_or_else(|| default_cwd(sandbox)),
            user,
        };
        if let Some(size) = request.terminal {
            let process = match native.spawn_terminal(spec, size.cols, size.rows).await {
                Ok(process) => process,
                Err(NativeError::Spawn { message, .. }) => {
                    return Err(ProcessError::Invalid(message));
                }
                Err(e) => return Err(failed(e)),
            };
            return terminal_process(&native, process);
        }
        let mut process = match native.spawn(spec).await {
            Ok(process) => process,
            Err(NativeError::Spawn { message, .. }) => return Err(ProcessError::Invalid(message)),
            Err(e) => return Err(failed(e)),
        };
        let pid = u32::try_from(process.pid()).unwrap_or_default();
        let stdin = process.stdin.take().filter(|_| request.stdin);
        let control = Arc::new(NativeControl {
            native: Arc::downgrade(&native),
            id: process.id(),
            pid,
            terminal: None,
        });
        let NativeProcess { stdout, stderr, exit, .. } = process;
        Ok(SpawnedProcess {
            pid,
            stdin: stdin
                .map(|pipe| Box::new(pipe) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            exit: process_end(exit),
            control,
        })
    }

    async fn run(
        &self,
        sandbox: &Sandbox,
        request: &ExecRequest,
        events: &EventSink,
    ) -> Result<BackendOutcome, NativeError> {
        let began = Instant::now();
        let deadline = tokio::time::Instant::now() + request.limits.wall_timeout;
        let native = self.live_sandbox(sandbox, &request.limits).await?;
        native.set_memory_limit(request.limits.memory_bytes)?;
        let startup = began.elapsed();
        tracing::debug!(?startup, "native sandbox ready");
        let user = sandbox.spec().default_user();
        let env = Self::environment(sandbox, user, &request.env);
        let run_began = Instant::now();
        let mut run = Run { native: &native, limits: &request.limits, deadline };
        let termination = match &request.kind {
            ExecKind::Command { argv } => {
                let spec = ProcessSpec { argv: argv.clone(), env, cwd: default_cwd(sandbox), user };
                run.process(spec, None, &mut Output::Stream { events, sent: [0, 0] }).await?
            }
            ExecKind::Cell { language, code } => {
                let toolchain = TOOLCHAINS
                    .iter()
                    .find(|t| t.language == language.as_str())
                    .ok_or_else(|| NativeError::Spawn {
                        errno: libc::ENOENT,
                        message: format!("the native tier has no language `{language}`"),
                    })?;
                let cell = self.next_cell.fetch_add(1, Ordering::Relaxed);
                run.cell(toolchain, cell, code, env, events).await?
            }
        };
        Ok(BackendOutcome { termination, startup, run: run_began.elapsed() })
    }
}

/// One execution's processes, sharing its limits and deadline.
struct Run<'a> {
    native: &'a NativeSandbox,
    limits: &'a Limits,
    deadline: tokio::time::Instant,
}

/// Where a process's output goes.
enum Output<'a> {
    /// To the execution's events, each stream up to its cap.
    Stream { events: &'a EventSink, sent: [u64; 2] },
    /// Kept (compiler output), up to [`MAX_COMPILER_OUTPUT_BYTES`].
    Capture(Vec<u8>),
}

/// A stream passed its cap.
struct Overflow(OutputStream, u64);

impl Output<'_> {
    fn write(
        &mut self,
        stream: OutputStream,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<(), Overflow> {
        match self {
            Self::Capture(kept) => {
                let room = MAX_COMPILER_OUTPUT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
                Ok(())
            }
            Self::Stream { events, sent } => {
                let index = usize::from(stream == OutputStream::Stderr);
                let cap = limits.output_cap(stream);
                let room = cap.saturating_sub(sent[index]);
                let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                let allowed = usize::try_from(len.min(room)).unwrap_or(usize::MAX);
                if allowed > 0 {
                    events.send(event(stream, Bytes::copy_from_slice(&bytes[..allowed])));
                }
                sent[index] += u64::try_from(allowed).unwrap_or(u64::MAX);
                if len > room {
                    let marker = format!("\n[soulbox: {stream} truncated at {cap} bytes]\n");
                    events.send(event(stream, Bytes::from(marker)));
                    return Err(Overflow(stream, cap));
                }
                Ok(())
            }
        }
    }
}

fn event(stream: OutputStream, bytes: Bytes) -> ExecEvent {
    match stream {
        OutputStream::Stdout => ExecEvent::Stdout(bytes),
        OutputStream::Stderr => ExecEvent::Stderr(bytes),
    }
}

impl Run<'_> {
    /// Writes a cell's source into a fresh build directory in `/tmp`, compiles it if its
    /// language needs it (a failed compile is a `CompileError` with the compiler's output),
    /// then runs it in `/home/user`.
    async fn cell(
        &mut self,
        toolchain: &Toolchain,
        cell: u64,
        code: &str,
        mut env: Vec<(String, String)>,
        events: &EventSink,
    ) -> Result<Termination, NativeError> {
        env.extend(toolchain.env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let dir = format!("/tmp/.soulbox/cells/{cell}");
        let src = format!("{dir}/{}", toolchain.source_file);
        let bin = format!("{dir}/main");
        let expand = |args: &[&str]| -> Vec<String> {
            args.iter().map(|a| a.replace("{src}", &src).replace("{bin}", &bin)).collect()
        };
        let write = ProcessSpec {
            argv: ["sh", "-c", "mkdir -p \"$1\" && cat > \"$2\"", "sh", &dir, &src]
                .map(str::to_owned)
                .to_vec(),
            env: env.clone(),
            cwd: "/".to_owned(),
            user: SandboxUser::User,
        };
        let mut written = Output::Capture(Vec::new());
        let termination = self.process(write, Some(code.as_bytes()), &mut written).await?;
        if !termination.is_success() {
            let Output::Capture(output) = written else { return Ok(termination) };
            events.send(ExecEvent::Stderr(Bytes::from(output)));
            return Ok(termination);
        }
        if let Some(compile) = toolchain.compile {
            let spec = ProcessSpec {
                argv: expand(compile),
                env: env.clone(),
                cwd: dir.clone(),
                user: SandboxUser::User,
            };
            let mut compiler = Output::Capture(Vec::new());
            let termination = self.process(spec, None, &mut compiler).await?;
            if !termination.is_success() {
                let Output::Capture(output) = compiler else { return Ok(termination) };
                let output = String::from_utf8_lossy(&output).into_owned();
                if matches!(termination, Termination::Exited { .. }) {
                    let value = output.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    events.send(ExecEvent::Error(GuestError {
                        name: "CompileError".to_owned(),
                        value: value.to_owned(),
                        traceback: output.clone(),
                    }));
                }
                return Ok(termination);
            }
        }
        let spec = ProcessSpec {
            argv: expand(toolchain.run),
            env,
            cwd: SANDBOX_HOME.to_owned(),
            user: SandboxUser::User,
        };
        self.process(spec, None, &mut Output::Stream { events, sent: [0, 0] }).await
    }

    /// Runs one process to its end, the deadline or an output cap; `stdin` is written to it
    /// and then closed.
    async fn process(
        &mut self,
        spec: ProcessSpec,
        stdin: Option<&[u8]>,
        output: &mut Output<'_>,
    ) -> Result<Termination, NativeError> {
        let oom_kills_before = self.native.oom_kills();
        let program = spec.argv.first().cloned().unwrap_or_default();
        let mut process = match self.native.spawn(spec).await {
            Ok(process) => process,
            Err(NativeError::Spawn { errno, .. }) if errno == libc::ENOENT => {
                let message = format!("soulbox: {program}: command not found\n");
                let _ = output.write(OutputStream::Stderr, message.as_bytes(), self.limits);
                return Ok(Termination::Exited { code: COMMAND_NOT_FOUND });
            }
            Err(NativeError::Spawn { errno, message })
                if errno == libc::EACCES || errno == libc::E2BIG =>
            {
                let message = format!("soulbox: {message}\n");
                let _ = output.write(OutputStream::Stderr, message.as_bytes(), self.limits);
                return Ok(Termination::Exited { code: COMMAND_NOT_EXECUTABLE });
            }
            Err(e) => return Err(e),
        };
        let id = process.id();
        let mut stdin_pipe = process.stdin.take();
        if let (Some(pipe), Some(data)) = (stdin_pipe.as_mut(), stdin) {
            // A process that does not read its input must not block the host: the write is
            // bounded by the deadline like everything else.
            let written = tokio::time::timeout_at(self.deadline, pipe.write_all(data)).await;
            if written.is_err() {
                self.native.signal(id, Signal::SIGKILL).await?;
                let _ = process.exit.wait().await;
                return Ok(self.timed_out());
            }
        }
        drop(stdin_pipe);
        let mut out = vec![0u8; 64 << 10];
        let mut err = vec![0u8; 64 << 10];
        let (mut out_open, mut err_open) = (true, true);
        let mut status: Option<ExitStatus> = None;
        // Armed (reset) when the process exits; its branch is disabled until then.
        let grace = tokio::time::sleep(OUTPUT_GRACE);
        tokio::pin!(grace);
        loop {
            if status.is_some() && !out_open && !err_open {
                break;
            }
            let overflow = tokio::select! {
                read = process.stdout.read(&mut out), if out_open => match read {
                    Ok(n) if n > 0 => output.write(OutputStream::Stdout, &out[..n], self.limits).err(),
                    _ => { out_open = false; None }
                },
                read = process.stderr.read(&mut err), if err_open => match read {
                    Ok(n) if n > 0 => output.write(OutputStream::Stderr, &err[..n], self.limits).err(),
                    _ => { err_open = false; None }
                },
                ended = process.exit.wait(), if status.is_none() => {
                    status = Some(ended?);
                    grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
                    None
                },
                () = &mut grace, if status.is_some() => break,
                // Once the process has exited, only the grace period is left to wait.
                () = tokio::time::sleep_until(self.deadline), if status.is_none() => {
                    self.native.signal(id, Signal::SIGKILL).await?;
                    let _ = process.exit.wait().await;
                    return Ok(self.timed_out());
                }
            };
            if let Some(Overflow(stream, limit_bytes)) = overflow {
                self.native.signal(id, Signal::SIGKILL).await?;
                if status.is_none() {
                    let _ = process.exit.wait().await;
                }
                return Ok(Termination::OutputLimitExceeded { stream, limit_bytes });
            }
        }
        if self.native.oom_kills() > oom_kills_before {
            return Ok(Termination::MemoryExceeded { limit_bytes: self.limits.memory_bytes });
        }
        Ok(match status {
            Some(ExitStatus::Code(code)) => Termination::Exited { code },
            Some(ExitStatus::Signal(signal)) => Termination::Signalled { signal },
            None => return Err(NativeError::SandboxEnded),
        })
    }

    fn timed_out(&self) -> Termination {
        let limit_ms = u64::try_from(self.limits.wall_timeout.as_millis()).unwrap_or(u64::MAX);
        Termination::TimedOut { limit_ms }
    }
}

/// A long-lived process on a terminal, for the runtime's process table: the terminal's
/// output is its standard output, its input the terminal's.
fn terminal_process(
    native: &Arc<NativeSandbox>,
    process: TerminalProcess,
) -> Result<SpawnedProcess, ProcessError> {
    let pid = u32::try_from(process.pid()).unwrap_or_default();
    let failed = |e: std::io::Error| {
        ProcessError::Backend(BackendError {
            tier: Tier::Native,
            message: format!("the terminal: {e}"),
        })
    };
    let id = process.id();
    let TerminalProcess { master, exit, .. } = process;
    let reader =
        tokio::fs::File::from_std(std::fs::File::from(master.try_clone().map_err(failed)?));
    let writer =
        tokio::fs::File::from_std(std::fs::File::from(master.try_clone().map_err(failed)?));
    let control =
        Arc::new(NativeControl { native: Arc::downgrade(native), id, pid, terminal: Some(master) });
    Ok(SpawnedProcess {
        pid,
        stdin: Some(Box::new(writer)),
        stdout: Box::new(reader),
        stderr: Box::new(tokio::io::empty()),
        exit: process_end(exit),
        control,
    })
}

/// How a process ended, as the runtime reports it.
fn process_end(
    mut exit: ProcessExit,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ProcessEnd> + Send>> {
    Box::pin(async move {
        match exit.wait().await {
            Ok(ExitStatus::Code(code)) => ProcessEnd::Exited(code),
            Ok(ExitStatus::Signal(signal)) => ProcessEnd::Signalled(signal),
            Err(_) => ProcessEnd::Lost,
        }
    })
}

/// Signals a long-lived process and resizes its terminal; the sandbox may have gone
/// meanwhile.
struct NativeControl {
    native: Weak<NativeSandbox>,
    id: ProcessId,
    pid: u32,
    /// The master of its terminal, if it has one.
    terminal: Option<OwnedFd>,
}

#[async_trait]
impl ProcessControl for NativeControl {
    async fn signal(&self, signal: ProcessSignal) -> Result<(), BackendError> {
        let Some(native) = self.native.upgrade() else { return Ok(()) };
        let signal = match signal {
            ProcessSignal::Terminate => Signal::SIGTERM,
            ProcessSignal::Kill => Signal::SIGKILL,
        };
        native.signal(self.id, signal).await.map_err(backend_error)
    }

    fn resize(&self, size: TerminalSize) -> Result<(), ProcessError> {
        let master = self.terminal.as_ref().ok_or(ProcessError::NoTerminal(self.pid))?;
        set_terminal_size(master.as_fd(), size.cols, size.rows)
            .map_err(|e| ProcessError::Backend(backend_error(e)))
    }
}

/// A failure of the tier, as the dispatcher reports it.
fn backend_error(e: NativeError) -> BackendError {
    BackendError { tier: Tier::Native, message: e.to_string() }
}

/// What a sandbox's root is made of: its template's layers under a writable layer kept in
/// its state directory, or the host's system.
fn root_of(sandbox: &Sandbox) -> SandboxRoot {
    match &sandbox.spec().image {
        None => SandboxRoot::Host,
        Some(image) => SandboxRoot::Layers(LayeredRoot {
            layers: image.layers.clone(),
            writable: sandbox.state_dir().join("root"),
            host_system: image.host_system,
            template: image.build_id.clone(),
        }),
    }
}

/// Where a sandbox's processes start unless a request says otherwise: its template's
/// `WORKDIR`, else the user's home.
fn default_cwd(sandbox: &Sandbox) -> String {
    let workdir = sandbox.spec().image.as_ref().and_then(|image| image.workdir.clone());
    workdir.unwrap_or_else(|| SANDBOX_HOME.to_owned())
}

fn program_installed(program: &str) -> bool {
    PROGRAM_DIRS.iter().any(|dir| {
        let path = Path::new(dir).join(program);
        std::fs::metadata(path).is_ok_and(|m| m.is_file())
    })
}

#[async_trait]
impl Backend for NativeBackend {
    fn tier(&self) -> Tier {
        Tier::Native
    }

    fn languages(&self) -> Vec<LanguageSupport> {
        self.languages
            .iter()
            .map(|l| LanguageSupport {
                language: l.language.clone(),
                status: if l.installed {
                    LanguageStatus::Ready
                } else {
                    LanguageStatus::NotInstalled { install_command: l.install_command.clone() }
                },
            })
            .collect()
    }

    fn runs_commands(&self) -> bool {
        true
    }

    async fn exec(
        &self,
        sandbox: &Sandbox,
        request: ExecRequest,
        events: &EventSink,
    ) -> Result<BackendOutcome, BackendError> {
        match self.run(sandbox, &request, events).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                if matches!(e, NativeError::SandboxEnded) {
                    // Its init is gone (killed from outside): the next execution starts a
                    // fresh one on the same workspace.
                    self.forget(sandbox.id());
                }
                Err(backend_error(e))
            }
        }
    }

    async fn spawn(
        &self,
        sandbox: &Sandbox,
        request: &ProcessRequest,
    ) -> Result<SpawnedProcess, ProcessError> {
        self.start_process(sandbox, request).await
    }

    fn usage(&self, sandbox: &SandboxId) -> ResourceUsage {
        let Some(native) = self.live(sandbox) else { return ResourceUsage::default() };
        let (cpu_time, memory_bytes) = native.usage();
        ResourceUsage { cpu_time, memory_bytes }
    }

    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let Some(native) = self.live(sandbox) else { return Ok(()) };
        native.pause().await.map_err(backend_error)
    }

    async fn resume(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let Some(native) = self.live(sandbox) else { return Ok(()) };
        native.resume().await.map_err(backend_error)
    }

    async fn close(&self, sandbox: &SandboxId) {
        let Some(slot) = self.forget(sandbox) else { return };
        let Some(native) = Arc::into_inner(slot).and_then(OnceCell::into_inner) else { return };
        // When an execution still holds it, it is torn down as that one lets go.
        if let Some(native) = Arc::into_inner(native)
            && let Err(e) = native.destroy().await
        {
            tracing::warn!(%sandbox, error = %e, "tearing down a native sandbox");
        }
    }
}
