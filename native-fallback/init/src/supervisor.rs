//! Init's work once the sandbox is set up: start processes on the host's request, reap every
//! process that ends (its own children and the orphans the kernel hands to PID 1), tell the
//! host how its processes ended, and signal them on request.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use crate::control::Control;
use crate::protocol::{ExitStatus, HostMessage, InitMessage, SpawnRequest};

/// How long the reaper sleeps when init has no children, unless a spawn wakes it first.
const IDLE_REAPER_WAIT: Duration = Duration::from_millis(200);

/// The processes the host started, by pid, with the host's id for each.
#[derive(Debug, Default)]
struct Processes {
    by_pid: Mutex<HashMap<Pid, u64>>,
    spawned: Condvar,
}

impl Processes {
    fn lock(&self) -> MutexGuard<'_, HashMap<Pid, u64>> {
        self.by_pid.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves the host until it closes the control socket; then init exits and the kernel kills
/// the rest of the sandbox.
pub(crate) fn serve(control: Control) -> ExitCode {
    let control = Arc::new(control);
    let processes = Arc::new(Processes::default());
    // Signals sent to init (by the host, for a graceful stop) go to every other process of the
    // sandbox, as tini and docker-init do.
    for signal in FORWARDED_SIGNALS {
        let _ = crate::sys::forward_to_sandbox(signal);
    }
    {
        let control = Arc::clone(&control);
        let processes = Arc::clone(&processes);
        std::thread::spawn(move || reap(&control, &processes));
    }
    loop {
        match control.recv() {
            Ok(Some((HostMessage::Spawn(request), fds))) => {
                spawn(&control, &processes, request, fds);
            }
            Ok(Some((HostMessage::Signal { id, signal }, _))) => {
                let pid = processes.lock().iter().find(|(_, v)| **v == id).map(|(pid, _)| *pid);
                if let (Some(pid), Ok(signal)) = (pid, Signal::try_from(signal)) {
                    // The group may already be gone; that is not an error of the sandbox.
                    let _ = killpg(pid, signal);
                }
            }
            Ok(Some((HostMessage::Setup(_) | HostMessage::Enter, _))) => {}
            Ok(None) => return ExitCode::SUCCESS,
            Err(_) => return ExitCode::from(6),
        }
    }
}

fn spawn(control: &Control, processes: &Processes, request: SpawnRequest, fds: Vec<OwnedFd>) {
    let id = request.id;
    let fail = |errno: Errno, error: String| {
        let _ = control.send(&InitMessage::SpawnFailed { id, errno: errno as i32, error });
    };
    let Ok::<[OwnedFd; 3], _>([stdin, stdout, stderr]) = fds.try_into() else {
        return fail(Errno::EINVAL, "a spawn request needs exactly three descriptors".into());
    };
    let Some((program, args)) = request.argv.split_first() else {
        return fail(Errno::EINVAL, "the command is empty".into());
    };
    // Checked here, inside the sandbox, so that a missing directory is told apart from a
    // missing program.
    if !std::path::Path::new(&request.cwd).is_dir() {
        return fail(
            Errno::ENOTDIR,
            format!("working directory {}: no such directory", request.cwd),
        );
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&request.cwd)
        .uid(request.uid)
        .gid(request.gid)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    if request.terminal {
        crate::sys::with_controlling_terminal(&mut command);
    } else {
        command.process_group(0);
    }
    // Held across the spawn, so the reaper cannot report an exit before the host hears of
    // the start.
    let mut by_pid = processes.lock();
    match command.spawn() {
        Ok(child) => {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            by_pid.insert(pid, id);
            let _ = control.send(&InitMessage::Started { id, pid: pid.as_raw() });
            processes.spawned.notify_one();
        }
        Err(e) => {
            drop(by_pid);
            let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
            fail(errno, format!("{program}: {e}"));
        }
    }
}

/// Reaps every process that ends. A process is first only observed (`WNOWAIT`), so that a
/// spawn in progress, which may reap its own failed child, finishes before this one reaps.
fn reap(control: &Control, processes: &Processes) {
    loop {
        let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => status.pid(),
            Err(Errno::EINTR) => continue,
            Err(_) => {
                // No children: sleep until a spawn, unless one happened since `waitid` (the
                // spawn inserts under the lock, so a child started meanwhile is in the map
                // and its notification is not lost).
                let by_pid = processes.lock();
                if by_pid.is_empty() {
                    let _ = processes.spawned.wait_timeout(by_pid, IDLE_REAPER_WAIT);
                }
                continue;
            }
        };
        let Some(pid) = pid else { continue };
        let mut by_pid = processes.lock();
        let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => ExitStatus::Signal(signal as i32),
            _ => continue,
        };
        if let Some(id) = by_pid.remove(&pid) {
            let _ = control.send(&InitMessage::Exited { id, status });
        }
    }
}

/// The signals init passes on to the whole sandbox.
const FORWARDED_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];
