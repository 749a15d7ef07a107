//! Escape probes: one syscall tried in a forked child, natively or under the sandbox's seccomp
//! filters, reporting what the kernel answered. Each probe passes arguments that make the call
//! harmless where it is allowed (null pointers, a child that exits at once), so running it
//! natively shows that the call reaches the kernel and running it filtered shows it does not.

use std::os::fd::AsRawFd;

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pipe};

use crate::seccomp::SeccompFilters;

/// One syscall to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// `getpid()`: always allowed.
    Getpid,
    /// `unshare(CLONE_NEWUSER)`: a nested user namespace.
    UnshareUser,
    /// `clone3(NULL, 0)`: its flags cannot be inspected, so it must answer ENOSYS.
    Clone3,
    /// `ptrace(PTRACE_TRACEME)`.
    PtraceTraceme,
    /// `mount(NULL, NULL, NULL, 0, NULL)`.
    MountNull,
    /// `getpid` through the x32 ABI (syscall number with bit 30 set).
    X32Getpid,
    /// `personality(PER_BSD)`: a persona Docker does not allow.
    PersonalityBsd,
}

/// Why a probe could not run (not what it found).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// A system call of the probe harness failed.
    #[error("probe harness: {0}")]
    Harness(#[from] nix::Error),
    /// The child died without reporting.
    #[error("the probe's child ended without a report: {0:?}")]
    NoReport(WaitStatus),
    /// Installing the filters failed in the child.
    #[error("installing the seccomp filters failed in the child")]
    FilterNotInstalled,
}

/// The errno a child reports when it could not install the filters.
const FILTER_FAILED: i64 = -4242;

/// Runs `probe` in a forked child, under `filters` if given; returns the syscall's result or
/// its errno.
pub(crate) fn run(
    probe: Probe,
    filters: Option<&SeccompFilters>,
) -> Result<Result<i64, i32>, ProbeError> {
    let (read_end, write_end) = pipe()?;
    // SAFETY: the child only calls async-signal-safe functions (prctl and seccomp through
    // seccompiler's `apply_filter`, which does not allocate, the probed syscall, `write` and
    // `_exit`), so forking from a multi-threaded test process is sound.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(read_end);
            let mut report = [0i64; 2];
            let installed = filters
                .is_none_or(|f| f.programs().iter().all(|p| seccompiler::apply_filter(p).is_ok()));
            if installed {
                let ret = call(probe);
                let errno = if ret == -1 { i64::from(nix::errno::Errno::last_raw()) } else { 0 };
                report = [ret, errno];
            } else {
                report[0] = FILTER_FAILED;
            }
            let bytes: [u8; 16] = {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&report[0].to_ne_bytes());
                b[8..].copy_from_slice(&report[1].to_ne_bytes());
                b
            };
            // SAFETY: writing a stack buffer to a pipe we own, then leaving without running
            // destructors or atexit handlers of the parent's copy of the process.
            unsafe {
                libc::write(write_end.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut bytes = [0u8; 16];
            let mut read = 0;
            while read < bytes.len() {
                match nix::unistd::read(&read_end, &mut bytes[read..])? {
                    0 => break,
                    n => read += n,
                }
            }
            let status = waitpid(child, None)?;
            if read < bytes.len() {
                return Err(ProbeError::NoReport(status));
            }
            let ret = i64::from_ne_bytes(bytes[..8].try_into().unwrap_or_default());
            let errno = i64::from_ne_bytes(bytes[8..].try_into().unwrap_or_default());
            if ret == FILTER_FAILED {
                return Err(ProbeError::FilterNotInstalled);
            }
            Ok(if ret == -1 { Err(i32::try_from(errno).unwrap_or(i32::MAX)) } else { Ok(ret) })
        }
    }
}

fn call(probe: Probe) -> i64 {
    const X32_SYSCALL_BIT: i64 = 0x4000_0000;
    const PER_BSD: libc::c_ulong = 0x0006;
    let null = std::ptr::null::<libc::c_void>();
    // SAFETY: every call passes only integers and null pointers, which the kernel checks; none
    // writes to memory of this process.
    unsafe {
        match probe {
            Probe::Getpid => libc::syscall(libc::SYS_getpid),
            Probe::UnshareUser => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            Probe::Clone3 => libc::syscall(libc::SYS_clone3, null, 0),
            Probe::PtraceTraceme => {
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, null, null)
            }
            Probe::MountNull => libc::syscall(libc::SYS_mount, null, null, null, 0, null),
            Probe::X32Getpid => libc::syscall(X32_SYSCALL_BIT | libc::SYS_getpid),
            Probe::PersonalityBsd => libc::syscall(libc::SYS_personality, PER_BSD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> SeccompFilters {
        SeccompFilters::for_host().expect("the policy compiles")
    }

    /// Each escape works natively (reaches the kernel, which does not answer EPERM/ENOSYS),
    /// then is refused under the filters with the policy's errno.
    #[test]
    fn escape_syscalls_reach_the_kernel_natively_and_are_refused_filtered() {
        let cases = [
            (Probe::UnshareUser, libc::EPERM),
            (Probe::Clone3, libc::ENOSYS),
            (Probe::PtraceTraceme, libc::EPERM),
            (Probe::MountNull, libc::EPERM),
            (Probe::PersonalityBsd, libc::EPERM),
        ];
        for (probe, refused_with) in cases {
            let native = run(probe, None).expect("native probe runs");
            assert_ne!(
                native,
                Err(refused_with),
                "{probe:?} is already refused natively: {native:?}"
            );
            let filtered = run(probe, Some(&filters())).expect("filtered probe runs");
            assert_eq!(filtered, Err(refused_with), "{probe:?} under seccomp");
        }
    }

    #[test]
    fn x32_abi_is_refused() {
        assert_eq!(run(Probe::X32Getpid, Some(&filters())).expect("probe runs"), Err(libc::EPERM));
    }

    #[test]
    fn ordinary_syscalls_still_work_under_the_filters() {
        let pid = run(Probe::Getpid, Some(&filters())).expect("probe runs");
        assert!(matches!(pid, Ok(p) if p > 0), "{pid:?}");
    }
}
