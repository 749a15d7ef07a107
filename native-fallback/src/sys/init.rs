//! The kernel calls of `soulbox-init` that have no safe wrapper. This file is compiled into
//! the init binary only (it includes it with `#[path]`), so that all of SoulBox's `unsafe`
//! lives under `native-fallback/src/sys/`.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// Takes ownership of a descriptor that arrived in an `SCM_RIGHTS` message.
pub(crate) fn received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` in this process while receiving the message and
    // nothing else refers to it; this is its only owner.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Attaches a detached mount (from `open_tree(OPEN_TREE_CLONE)`) at `target`.
pub(crate) fn move_mount(tree: BorrowedFd<'_>, target: &CStr) -> nix::Result<()> {
    // SAFETY: both paths are NUL-terminated strings that outlive the call; the kernel reads
    // nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop)
}

/// Brings the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> nix::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(c"lo".to_bytes_with_nul()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads `ifr_name` and writes `ifr_flags` of the request we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) })?;
    // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    let up = i16::try_from(libc::IFF_UP | libc::IFF_RUNNING).map_err(|_| Errno::EINVAL)?;
    request.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the request we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request) })?;
    Ok(())
}

/// Closes every descriptor from `first` up.
pub(crate) fn close_descriptors_from(first: u32) -> nix::Result<()> {
    // SAFETY: close_range takes no pointers; descriptors it closes are not used afterwards
    // (init holds none above `first` that it still needs).
    Errno::result(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) }).map(drop)
}

/// Makes init pass `signal` on to every other process of its pid namespace, from a handler
/// (PID 1 of a namespace receives only the signals it has a handler for). A handler, not a
/// blocked mask and a waiting thread: the processes init starts would inherit the mask, while
/// a handler is reset by their `execve`.
pub(crate) fn forward_to_sandbox(signal: nix::sys::signal::Signal) -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    extern "C" fn forward(signal: libc::c_int) {
        // SAFETY: kill is async-signal-safe; -1 from PID 1 means every process of the
        // namespace but init.
        unsafe { libc::kill(-1, signal) };
    }
    let action = SigAction::new(SigHandler::Handler(forward), SaFlags::SA_RESTART, SigSet::empty());
    // SAFETY: the handler only calls kill, which is async-signal-safe.
    unsafe { sigaction(signal, &action) }.map(drop)
}

/// Has the child of `command` start a new session with its standard input (a terminal) as
/// its controlling terminal, as a login on a terminal does: job control and Ctrl-C then work.
pub(crate) fn with_controlling_terminal(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure calls only setsid and ioctl, both
    // async-signal-safe, and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
