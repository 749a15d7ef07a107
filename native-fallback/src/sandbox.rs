//! A native sandbox: its init process, its control group and the processes it runs.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid, pipe2, setfsgid, setfsuid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::NativeTier;
use crate::cgroup::{CgroupLimits, SandboxCgroup};
use crate::control::ControlSocket;
use crate::protocol::{ExitStatus, HostMessage, InitMessage, MAX_MESSAGE_BYTES, SpawnRequest};
use crate::rootfs::{SANDBOX_ID_COUNT, SANDBOX_UID, SANDBOX_UID_BASE, SandboxNetwork, SandboxRoot};
use crate::sys::spawn::{InitFds, clone_init};
use crate::{NativeError, SetupStep, io_errno};
use soulbox_runtime::SandboxUser;

/// How long init may take to run the isolation sequence.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A process to start in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program and its arguments; the program is looked up in `env`'s `PATH`.
    pub argv: Vec<String>,
    /// Its whole environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Its working directory inside the sandbox.
    pub cwd: String,
    /// Who it runs as.
    pub user: SandboxUser,
}

/// What the host waits for, per process.
#[derive(Debug)]
struct Waiters {
    started: Option<oneshot::Sender<Result<i32, (i32, String)>>>,
    exited: Option<oneshot::Sender<ExitStatus>>,
}

#[derive(Debug, Default)]
struct Shared {
    waiters: Mutex<HashMap<u64, Waiters>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waiters>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running native sandbox. Dropping it kills every process in it and removes its control
/// group; [`NativeSandbox::destroy`] does the same and reports failures.
#[derive(Debug)]
pub struct NativeSandbox {
    init: Pid,
    control: Arc<ControlSocket>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    cgroup: Mutex<Option<SandboxCgroup>>,
    reader: tokio::task::JoinHandle<()>,
}

/// A sandbox whose init has run the first part of the isolation sequence (namespaces, cgroup,
/// root, `/dev`, `/proc`, network, rlimits) and waits, still privileged inside its own user
/// namespace and with no guest code run, for its workspace. The tier keeps a few in a pool.
/// Dropping one kills its init and removes its control group.
#[derive(Debug)]
pub(crate) struct PreparedSandbox {
    init: Pid,
    control: Option<ControlSocket>,
    cgroup: Option<SandboxCgroup>,
}

impl PreparedSandbox {
    /// Creates the control group `name`, clones init into new namespaces, maps its ids and has
    /// it prepare the root.
    pub(crate) async fn prepare(
        tier: &NativeTier,
        name: &str,
        limits: CgroupLimits,
        root: &SandboxRoot,
        network: SandboxNetwork,
    ) -> Result<Self, NativeError> {
        let cgroup = SandboxCgroup::create(name, limits)?;
        let socket =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| NativeError::host(SetupStep::ControlSocket, e));
        let (host_end, init_end) = match socket {
            Ok(pair) => pair,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
                return Err(e);
            }
        };
        let init = match launch_init(tier, init_end, &cgroup, network) {
            Ok(init) => init,
            Err((init, e)) => {
                let _ = tokio::task::spawn_blocking(move || match init {
                    Some(init) => teardown(init, cgroup),
                    None => cgroup.remove(),
                })
                .await;
                return Err(e);
            }
        };
        // From here on, dropping `prepared` cleans up.
        let mut prepared = Self { init, control: None, cgroup: Some(cgroup) };
        let socket_error =
            |e: std::io::Error| NativeError::host(SetupStep::ControlSocket, io_errno(&e));
        set_nonblocking(host_end.as_fd())
            .map_err(|e| NativeError::host(SetupStep::ControlSocket, e))?;
        let control = prepared.control.insert(ControlSocket::new(host_end).map_err(socket_error)?);
        let (layers, targets) = tier.rootfs.mounts(root, network)?;
        let borrowed: Vec<BorrowedFd<'_>> = layers.iter().map(AsFd::as_fd).collect();
        control
            .send(&HostMessage::Setup(tier.plan(root, targets, network)), &borrowed)
            .await
            .map_err(socket_error)?;
        drop(layers);
        expect(control, &InitMessage::Prepared).await?;
        Ok(prepared)
    }

    /// Attaches `workspace` (if any) at `/home/user` and has init finish the isolation
    /// sequence; the sandbox is then ready for the guest.
    pub(crate) async fn enter(
        mut self,
        tier: &NativeTier,
        workspace: Option<&Path>,
        memory_bytes: u64,
    ) -> Result<NativeSandbox, NativeError> {
        if let Some(cgroup) = &self.cgroup {
            cgroup.set_memory_limit(memory_bytes)?;
        }
        let control = self.control.take().ok_or(NativeError::SandboxEnded)?;
        let mount = match workspace {
            Some(workspace) => Some(tier.rootfs.workspace_mount(workspace, &tier.idmap)?),
            None => None,
        };
        let fds: Vec<BorrowedFd<'_>> = mount.iter().map(AsFd::as_fd).collect();
        let sent = control.send(&HostMessage::Enter, &fds).await;
        sent.map_err(|e| NativeError::host(SetupStep::ControlSocket, io_errno(&e)))?;
        drop(mount);
        expect(&control, &InitMessage::Ready).await?;
        let control = Arc::new(control);
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_messages(Arc::clone(&control), Arc::clone(&shared)));
        Ok(NativeSandbox {
            init: self.init,
            control,
            shared,
            next_id: AtomicU64::new(1),
            cgroup: Mutex::new(self.cgroup.take()),
            reader,
        })
    }
}

impl Drop for PreparedSandbox {
    fn drop(&mut self) {
        let Some(cgroup) = self.cgroup.take() else { return };
        if let Err(e) = teardown(self.init, cgroup) {
            tracing::warn!(error = %e, "removing a prepared sandbox's control group");
        }
    }
}

/// Waits for init's answer to a setup message.
async fn expect(control: &ControlSocket, wanted: &InitMessage) -> Result<(), NativeError> {
    let failed = |error: String| NativeError::Setup { step: "start init".into(), error };
    match tokio::time::timeout(SETUP_TIMEOUT, control.recv()).await {
        Ok(Ok(Some(Ok(answer)))) if answer == *wanted => Ok(()),
        Ok(Ok(Some(Ok(InitMessage::SetupFailed { step, error })))) => {
            Err(NativeError::Setup { step, error })
        }
        Ok(Ok(Some(Ok(other)))) => Err(failed(format!("unexpected answer {other:?}"))),
        Ok(Ok(Some(Err(e)))) => Err(failed(e.to_string())),
        Ok(Ok(None)) => Err(failed("init exited before finishing the isolation sequence".into())),
        Ok(Err(e)) => Err(NativeError::host(SetupStep::ControlSocket, io_errno(&e))),
        Err(_) => Err(failed(format!("no answer within {} s", SETUP_TIMEOUT.as_secs()))),
    }
}

impl NativeSandbox {
    /// Whether init is still there (it has not closed its control socket).
    pub fn is_alive(&self) -> bool {
        !self.reader.is_finished()
    }

    /// Init's pid on the host.
    pub fn init_pid(&self) -> Pid {
        self.init
    }

    /// Starts a process; its standard streams are pipes to the host.
    pub async fn spawn(&self, spec: ProcessSpec) -> Result<NativeProcess, NativeError> {
        let pipe_error = |e| NativeError::host(SetupStep::Pipes, e);
        let (stdin_read, stdin_write) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
        let (stdout_read, stdout_write) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
        let (stderr_read, stderr_write) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
        let fds = [stdin_read, stdout_write, stderr_write];
        let (id, pid, exit) = self.start(spec, false, fds).await?;
        Ok(NativeProcess {
            id,
            pid,
            stdin: Some(sender(stdin_write).map_err(pipe_error)?),
            stdout: receiver(stdout_read).map_err(pipe_error)?,
            stderr: receiver(stderr_read).map_err(pipe_error)?,
            exit,
        })
    }

    /// Starts a process on a new pseudo-terminal of the sandbox's own devpts, `cols` by
    /// `rows`, as its controlling terminal (in a session of its own); the host keeps the
    /// terminal's master.
    pub async fn spawn_terminal(
        &self,
        spec: ProcessSpec,
        cols: u16,
        rows: u16,
    ) -> Result<TerminalProcess, NativeError> {
        let pty_error = |e| NativeError::host(SetupStep::Pipes, e);
        let ptmx = std::path::PathBuf::from(format!("/proc/{}/root/dev/ptmx", self.init));
        // Made as the user who will own it, so that its slave belongs to that user inside.
        let owner = sandbox_host_id(spec.user);
        let (master, slave) = {
            let previous_gid = setfsgid(Gid::from_raw(owner));
            let previous_uid = setfsuid(Uid::from_raw(owner));
            let opened = crate::sys::pty::open_pty(&ptmx);
            setfsuid(previous_uid);
            setfsgid(previous_gid);
            opened.map_err(pty_error)?
        };
        crate::sys::pty::set_window_size(master.as_fd(), cols, rows).map_err(pty_error)?;
        let copies = [slave.try_clone(), slave.try_clone()];
        let [Ok(out), Ok(err)] = copies else { return Err(pty_error(nix::Error::EMFILE)) };
        let (id, pid, exit) = self.start(spec, true, [slave, out, err]).await?;
        Ok(TerminalProcess { id, pid, master, exit })
    }

    /// Has init start `spec` with `fds` as its standard streams.
    async fn start(
        &self,
        spec: ProcessSpec,
        terminal: bool,
        fds: [OwnedFd; 3],
    ) -> Result<(u64, i32, ProcessExit), NativeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.shared
            .lock()
            .insert(id, Waiters { started: Some(started_tx), exited: Some(exited_tx) });
        let uid = match spec.user {
            SandboxUser::User => SANDBOX_UID,
            SandboxUser::Root => 0,
        };
        let request = SpawnRequest {
            id,
            argv: spec.argv.clone(),
            env: spec.env,
            cwd: spec.cwd,
            uid,
            gid: uid,
            terminal,
        };
        let borrowed = [fds[0].as_fd(), fds[1].as_fd(), fds[2].as_fd()];
        let sent = self.control.send(&HostMessage::Spawn(request), &borrowed).await;
        drop(fds);
        if let Err(e) = sent {
            self.shared.lock().remove(&id);
            // A request too large for one message is the caller's; any other failure to send
            // on the pair means init closed its end.
            if e.kind() == std::io::ErrorKind::InvalidInput {
                let message = format!(
                    "{}: argument list too long (the command and its environment may take {} KiB)",
                    spec.argv.first().map_or("", String::as_str),
                    MAX_MESSAGE_BYTES >> 10
                );
                return Err(NativeError::Spawn { errno: libc::E2BIG, message });
            }
            return Err(NativeError::SandboxEnded);
        }
        match started_rx.await {
            Ok(Ok(pid)) => Ok((id, pid, ProcessExit(exited_rx))),
            Ok(Err((errno, message))) => {
                self.shared.lock().remove(&id);
                Err(NativeError::Spawn { errno, message })
            }
            Err(_) => Err(NativeError::SandboxEnded),
        }
    }

    /// Sends `signal` to the process group of `process`.
    pub async fn signal(&self, process: ProcessId, signal: Signal) -> Result<(), NativeError> {
        let message = HostMessage::Signal { id: process.0, signal: signal as i32 };
        self.control.send(&message, &[]).await.map_err(|_| NativeError::SandboxEnded)
    }

    /// Sets the memory limit of the whole sandbox.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<(), NativeError> {
        match &*self.lock_cgroup() {
            Some(cgroup) => Ok(cgroup.set_memory_limit(bytes)?),
            None => Err(NativeError::SandboxEnded),
        }
    }

    /// Pauses the sandbox: every process of it (init included) stops where it is and uses no
    /// CPU until [`NativeSandbox::resume`]. Nothing can be started in it meanwhile.
    pub async fn pause(&self) -> Result<(), NativeError> {
        self.set_frozen(true).await
    }

    /// Resumes a paused sandbox: its processes continue where they stopped.
    pub async fn resume(&self) -> Result<(), NativeError> {
        self.set_frozen(false).await
    }

    async fn set_frozen(&self, frozen: bool) -> Result<(), NativeError> {
        // The freeze completes asynchronously in the kernel; waiting for it polls, so it runs
        // off the async workers. The group is reached through a clone of its handle.
        let path = self
            .lock_cgroup()
            .as_ref()
            .map(SandboxCgroup::handle)
            .ok_or(NativeError::SandboxEnded)?;
        tokio::task::spawn_blocking(move || path.set_frozen(frozen))
            .await
            .map_err(|e| NativeError::Teardown(e.to_string()))?
            .map_err(NativeError::from)
    }

    /// The CPU time the sandbox has used and the memory it holds now (its cgroup's).
    pub fn usage(&self) -> (Duration, u64) {
        self.lock_cgroup().as_ref().map_or((Duration::ZERO, 0), SandboxCgroup::usage)
    }

    /// How many of the sandbox's processes the OOM killer has killed.
    pub fn oom_kills(&self) -> u64 {
        self.lock_cgroup().as_ref().map_or(0, SandboxCgroup::oom_kills)
    }

    /// The sandbox's control group directory in the memory hierarchy.
    pub fn cgroup_memory_path(&self) -> Option<std::path::PathBuf> {
        self.lock_cgroup().as_ref().and_then(SandboxCgroup::memory_path)
    }

    fn lock_cgroup(&self) -> MutexGuard<'_, Option<SandboxCgroup>> {
        self.cgroup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills every process of the sandbox (init's death takes its whole pid namespace with
    /// it) and removes its control group.
    pub async fn destroy(self) -> Result<(), NativeError> {
        self.reader.abort();
        let Some(cgroup) = self.lock_cgroup().take() else { return Ok(()) };
        let init = self.init;
        tokio::task::spawn_blocking(move || teardown(init, cgroup))
            .await
            .map_err(|e| NativeError::Teardown(e.to_string()))??;
        Ok(())
    }
}

impl Drop for NativeSandbox {
    fn drop(&mut self) {
        let Some(cgroup) = self.lock_cgroup().take() else { return };
        self.reader.abort();
        if let Err(e) = teardown(self.init, cgroup) {
            tracing::warn!(error = %e, "removing a sandbox's control group");
        }
    }
}

/// Kills init (and with it its pid namespace), thaws the group in case the sandbox was paused
/// (a frozen process cannot die), reaps init and removes the group.
fn teardown(init: Pid, cgroup: SandboxCgroup) -> Result<(), crate::CgroupError> {
    let _ = kill(init, Signal::SIGKILL);
    let _ = cgroup.set_frozen(false);
    let _ = waitpid(init, None);
    cgroup.remove()
}

/// The host's handle on a process of a sandbox, for [`NativeSandbox::signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId(u64);

/// A process running in a sandbox. Its fields are separate so that its output can be read
/// while its end is awaited.
#[derive(Debug)]
pub struct NativeProcess {
    id: u64,
    pid: i32,
    /// Its standard input; drop it to close.
    pub stdin: Option<pipe::Sender>,
    /// Its standard output.
    pub stdout: pipe::Receiver,
    /// Its standard error.
    pub stderr: pipe::Receiver,
    /// Its end.
    pub exit: ProcessExit,
}

impl NativeProcess {
    /// Its handle for signals.
    pub fn id(&self) -> ProcessId {
        ProcessId(self.id)
    }

    /// Its pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

/// A process running on a pseudo-terminal of its sandbox.
#[derive(Debug)]
pub struct TerminalProcess {
    id: u64,
    pid: i32,
    /// The terminal's master: what the process writes is read here, and what is written here
    /// is its input.
    pub master: OwnedFd,
    /// Its end.
    pub exit: ProcessExit,
}

impl TerminalProcess {
    /// Its handle for signals.
    pub fn id(&self) -> ProcessId {
        ProcessId(self.id)
    }

    /// Its pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

/// Sets the window size of a terminal from its master (a [`TerminalProcess::master`]).
pub fn set_terminal_size(master: BorrowedFd<'_>, cols: u16, rows: u16) -> Result<(), NativeError> {
    crate::sys::pty::set_window_size(master, cols, rows)
        .map_err(|e| NativeError::host(SetupStep::Pipes, e))
}

/// The host id of a sandbox user.
fn sandbox_host_id(user: SandboxUser) -> u32 {
    match user {
        SandboxUser::User => SANDBOX_UID_BASE + SANDBOX_UID,
        SandboxUser::Root => SANDBOX_UID_BASE,
    }
}

/// The end of a process, reported by init.
#[derive(Debug)]
pub struct ProcessExit(oneshot::Receiver<ExitStatus>);

impl ProcessExit {
    /// Waits until the process ends.
    pub async fn wait(&mut self) -> Result<ExitStatus, NativeError> {
        (&mut self.0).await.map_err(|_| NativeError::SandboxEnded)
    }
}

/// Routes init's messages to the waiting processes until init's end closes. A malformed
/// message ends the sandbox's use: init is no longer trusted.
async fn read_messages(control: Arc<ControlSocket>, shared: Arc<Shared>) {
    loop {
        let message = match control.recv().await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "ignoring the rest of a sandbox's messages");
                break;
            }
            Ok(None) | Err(_) => break,
        };
        let mut waiters = shared.lock();
        match message {
            InitMessage::Started { id, pid } => {
                if let Some(tx) = waiters.get_mut(&id).and_then(|w| w.started.take()) {
                    let _ = tx.send(Ok(pid));
                }
            }
            InitMessage::SpawnFailed { id, errno, error } => {
                if let Some(tx) = waiters.remove(&id).and_then(|mut w| w.started.take()) {
                    let _ = tx.send(Err((errno, error)));
                }
            }
            InitMessage::Exited { id, status } => {
                if let Some(tx) = waiters.remove(&id).and_then(|mut w| w.exited.take()) {
                    let _ = tx.send(status);
                }
            }
            InitMessage::Prepared | InitMessage::Ready | InitMessage::SetupFailed { .. } => {}
        }
    }
    // Every waiter learns that the sandbox ended.
    shared.lock().clear();
}

/// Clones init, writes its id maps, puts it in its control group, and lets it become root of
/// its user namespace and execute the init image.
fn launch_init(
    tier: &NativeTier,
    init_end: OwnedFd,
    cgroup: &SandboxCgroup,
    network: SandboxNetwork,
) -> Result<Pid, (Option<Pid>, NativeError)> {
    let fds =
        InitFds { image: tier.image.as_fd(), control: init_end.as_fd(), null: tier.null.as_fd() };
    let host_network = network == SandboxNetwork::Host;
    let child = clone_init(fds, host_network)
        .map_err(|e| (None, NativeError::host(SetupStep::Clone, e)))?;
    drop(init_end);
    let init = child.pid();
    let fail = |step: SetupStep| move |e: nix::Error| (Some(init), NativeError::host(step, e));
    let map = format!("0 {SANDBOX_UID_BASE} {SANDBOX_ID_COUNT}\n");
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{init}/{file}"), &map)
            .map_err(|e| fail(SetupStep::IdMap)(io_errno(&e)))?;
    }
    cgroup.add(init).map_err(|e| (Some(init), e.into()))?;
    child.release().map_err(fail(SetupStep::Exec))?;
    Ok(init)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

fn sender(fd: OwnedFd) -> nix::Result<pipe::Sender> {
    set_nonblocking(fd.as_fd())?;
    pipe::Sender::from_owned_fd(fd).map_err(|e| io_errno(&e))
}

fn receiver(fd: OwnedFd) -> nix::Result<pipe::Receiver> {
    set_nonblocking(fd.as_fd())?;
    pipe::Receiver::from_owned_fd(fd).map_err(|e| io_errno(&e))
}
