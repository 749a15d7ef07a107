//! Starting processes in new namespaces from the multi-threaded server.
//!
//! Init is started with a raw `clone(CLONE_VM)`, as `posix_spawn` does: the child runs on a
//! stack of its own in our memory, touches nothing but that stack and the [`ChildArgs`]
//! prepared before the call, and makes only async-signal-safe system calls, so no lock held by
//! another thread of the server can trip it; all signals are blocked in it until `execveat`.
//! Unlike `posix_spawn` it does not suspend us (`CLONE_VFORK`): the child must wait, still with
//! every capability of its new user namespace, until we have written its id maps, so that it
//! can become root of that namespace before it executes init (an `execve` by a user that is
//! not the namespace's root drops every capability).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sched::{CloneFlags, clone};
use nix::unistd::{Pid, pipe2};

use crate::protocol::INIT_CONTROL_FD;

/// The stack of a cloned child; it runs a few system calls only.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The number of signals the kernel has on x86_64 (1-64).
const KERNEL_SIGNALS: libc::c_int = 64;

/// The exit code of a child whose setup or `execveat` failed.
const EXEC_FAILED: i32 = 127;

/// Descriptors the child holds are moved at least this high first, so that setting 0-3
/// never overwrites one of them.
const FIRST_HIGH_FD: RawFd = 16;

/// The descriptors the init child is given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InitFds<'a> {
    /// The sealed memfd holding the init binary.
    pub(crate) image: BorrowedFd<'a>,
    /// Init's end of the control socket, to become descriptor 3.
    pub(crate) control: BorrowedFd<'a>,
    /// `/dev/null`, to become descriptors 0, 1 and 2.
    pub(crate) null: BorrowedFd<'a>,
}

/// What the child reads; prepared and kept alive by the parent.
#[repr(C)]
struct ChildArgs {
    image: RawFd,
    control: RawFd,
    null: RawFd,
    go: RawFd,
    /// The parent's end of `go`, which the child's copy of the descriptor table holds too.
    go_parent: RawFd,
    report: RawFd,
    argv: [*mut libc::c_char; 2],
    envp: [*mut libc::c_char; 1],
    signal_mask: libc::sigset_t,
}

/// A cloned init child waiting for [`InitChild::release`]. Dropping it unreleased makes the
/// child exit before it executes anything.
#[derive(Debug)]
pub(crate) struct InitChild {
    pid: Pid,
    // Field order matters for drop: the descriptors first (the child sees EOF and exits),
    // then `wait_for_exit` in `Drop` before the stack and arguments go.
    go: Option<OwnedFd>,
    report: Option<OwnedFd>,
    stack: Vec<u8>,
    args: Box<ChildArgsCell>,
}

/// `ChildArgs` holds raw pointers to static strings only; the wrapper makes that explicit.
struct ChildArgsCell(ChildArgs);

impl std::fmt::Debug for ChildArgsCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChildArgs")
    }
}

impl InitChild {
    /// The child's pid.
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// Lets the child become root of its user namespace and execute init; returns once it
    /// has, or with the errno of the step that failed.
    pub(crate) fn release(mut self) -> nix::Result<()> {
        let go = self.go.take().ok_or(Errno::EBADF)?;
        nix::unistd::write(&go, &[1])?;
        drop(go);
        read_report(self.report.take().ok_or(Errno::EBADF)?)
    }
}

impl Drop for InitChild {
    fn drop(&mut self) {
        // Unreleased: closing `go` makes the child exit; wait for that (EOF on the report
        // pipe) before its stack is freed.
        self.go = None;
        if let Some(report) = self.report.take() {
            let _ = read_report(report);
        }
        // Only now may `stack` and `args` be freed.
        let _ = (&self.stack, &self.args);
    }
}

/// Reads the child's report: EOF means it executed init (the report pipe is close-on-exec),
/// four bytes are the errno of what failed.
fn read_report(report: OwnedFd) -> nix::Result<()> {
    let mut errno = [0u8; 4];
    let mut filled = 0;
    loop {
        match nix::unistd::read(&report, &mut errno[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        if filled == errno.len() {
            break;
        }
    }
    if filled == errno.len() {
        return Err(Errno::from_raw(i32::from_ne_bytes(errno)));
    }
    Ok(())
}

fn high_copy(fd: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(FIRST_HIGH_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Clones init's child into new user, pid, mount, network (unless `host_network`), UTS and
/// IPC namespaces. It waits for [`InitChild::release`]: write its id maps and put it in its
/// cgroup first.
pub(crate) fn clone_init(fds: InitFds<'_>, host_network: bool) -> nix::Result<InitChild> {
    let network = if host_network { 0 } else { libc::CLONE_NEWNET };
    let flags = libc::CLONE_VM
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | network
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::SIGCHLD;
    let (go_read, go_write) = pipe2(OFlag::O_CLOEXEC)?;
    let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC)?;
    let high_fds = vec![
        high_copy(fds.image)?,
        high_copy(fds.control)?,
        high_copy(fds.null)?,
        high_copy(go_read.as_fd())?,
        high_copy(report_write.as_fd())?,
    ];
    drop((go_read, report_write));
    // SAFETY: an all-zero sigset_t is a valid (empty) set; sigfillset writes only `all`.
    let (all, previous) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        (all, std::mem::zeroed::<libc::sigset_t>())
    };
    let mut args = Box::new(ChildArgsCell(ChildArgs {
        image: high_fds[0].as_raw_fd(),
        control: high_fds[1].as_raw_fd(),
        null: high_fds[2].as_raw_fd(),
        go: high_fds[3].as_raw_fd(),
        go_parent: go_write.as_raw_fd(),
        report: high_fds[4].as_raw_fd(),
        argv: [c"soulbox-init".as_ptr().cast_mut(), std::ptr::null_mut()],
        envp: [std::ptr::null_mut()],
        signal_mask: previous,
    }));
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // SAFETY: pthread_sigmask writes the previous mask into memory we own.
    Errno::result(unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.0.signal_mask)
    })?;
    // SAFETY: the child runs `init_child` on `stack` with `args`, both owned by the returned
    // `InitChild`, which outlives the child's use of them (it waits for the child to execute
    // or exit before freeing them). The child shares our memory but writes only its stack.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        libc::clone(init_child, top.cast(), flags, (&raw mut args.0).cast())
    };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &args.0.signal_mask, std::ptr::null_mut()) };
    // The child has its own copy of the descriptor table: ours of its descriptors must close
    // (so that it sees EOF on `go` if we drop it, and we see EOF on `report` when it executes).
    drop(high_fds);
    let pid = Errno::result(pid)?;
    Ok(InitChild {
        pid: Pid::from_raw(pid),
        go: Some(go_write),
        report: Some(report_read),
        stack,
        args,
    })
}

/// The cloned child: waits for the go, becomes root of its user namespace, sets its
/// descriptors, resets its signal dispositions and mask, and executes init. Any failure writes the errno to the report
/// pipe and exits.
extern "C" fn init_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `ChildArgs` the parent keeps alive until we have executed or
    // exited; every call below is async-signal-safe and takes only its integers and the
    // static, NUL-terminated strings and null-terminated arrays it holds.
    unsafe {
        let args = &*arg.cast::<ChildArgs>();
        let fail = || -> ! {
            let errno = (*libc::__errno_location()).to_ne_bytes();
            libc::write(args.report, errno.as_ptr().cast(), errno.len());
            libc::_exit(EXEC_FAILED)
        };
        // Our copy of the parent's end of `go` must go first: if the parent dies before the
        // go, the read below then sees EOF and we exit, instead of waiting forever holding
        // copies of every descriptor the parent had (other sandboxes' control sockets among
        // them, which would keep those sandboxes alive after the server).
        libc::close(args.go_parent);
        let mut go = 0u8;
        if libc::read(args.go, (&raw mut go).cast(), 1) != 1 {
            libc::_exit(EXEC_FAILED);
        }
        if libc::setresgid(0, 0, 0) != 0 || libc::setresuid(0, 0, 0) != 0 {
            fail();
        }
        for (from, to) in
            [(args.null, 0), (args.null, 1), (args.null, 2), (args.control, INIT_CONTROL_FD)]
        {
            if libc::dup2(from, to) < 0 {
                fail();
            }
        }
        // A signal the server ignores would stay ignored across `execve` (and in everything
        // init starts); the raw call also reaches the signals glibc reserves for itself. The
        // handler table is our own (no CLONE_SIGHAND), and an all-zero `struct
        // kernel_sigaction` is SIG_DFL with no flags and an empty mask.
        let default_action = [0usize; 4];
        for signal in 1..=KERNEL_SIGNALS {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    default_action.as_ptr(),
                    0usize,
                    8usize,
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execveat(
            args.image,
            c"".as_ptr(),
            args.argv.as_ptr(),
            args.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        fail()
    }
}

/// Starts a child that only waits in a new user namespace, for the caller to write its id
/// maps and open `/proc/<pid>/ns/user`; the caller kills it afterwards. Unlike init, this
/// child gets a copy of our memory (no `CLONE_VM`): it outlives this call.
pub(crate) fn clone_user_namespace_holder() -> nix::Result<Pid> {
    let child = Box::new(|| -> isize {
        loop {
            // SAFETY: pause takes no arguments and touches no memory.
            unsafe { libc::pause() };
        }
    });
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // SAFETY: the child runs only `pause`, on its own copy of `stack`; it calls nothing that
    // could need a lock another thread of ours held at the time of the clone.
    unsafe { clone(child, &mut stack, CloneFlags::CLONE_NEWUSER, Some(libc::SIGCHLD)) }
}
