//! `soulbox-init`: PID 1 of a SoulBox native sandbox.
//!
//! The host starts it from a sealed memfd inside fresh user, pid, mount, network, UTS and IPC
//! namespaces, with the control socket as descriptor 3 and `/dev/null` as 0, 1 and 2. It
//! waits for the host's [`HostMessage::Setup`], runs the isolation sequence ([`setup`]), says
//! [`InitMessage::Ready`] and from then on starts, reaps and signals processes on the host's
//! request ([`supervisor`]). When the control socket closes, init exits, and the kernel kills
//! every process of the sandbox with it.

#[path = "../../src/protocol.rs"]
mod protocol;
#[path = "../../src/sys/init.rs"]
#[allow(unsafe_code, reason = "the kernel calls without a safe wrapper, each block justified")]
mod sys;

mod control;
mod setup;
mod supervisor;

use std::process::ExitCode;

use control::Control;
use protocol::{HostMessage, INIT_CONTROL_FD, InitMessage};

fn main() -> ExitCode {
    // Nothing but 0-3 may survive from the host, whatever it forgot to mark close-on-exec.
    let first_unused = u32::try_from(INIT_CONTROL_FD + 1).unwrap_or(u32::MAX);
    if sys::close_descriptors_from(first_unused).is_err() {
        return ExitCode::from(2);
    }
    // Executed from a memfd, init would otherwise be named after it in `ps`.
    let _ = nix::sys::prctl::set_name(c"soulbox-init");
    let Ok(control) = Control::from_inherited() else {
        return ExitCode::from(2);
    };
    let Ok(Some((HostMessage::Setup(plan), mounts))) = control.recv() else {
        return ExitCode::from(3);
    };
    if let Err(failure) = setup::prepare(&plan, mounts) {
        return report(&control, &failure);
    }
    if control.send(&InitMessage::Prepared).is_err() {
        return ExitCode::from(5);
    }
    // The workspace, or none (a template build's sandbox keeps `/home/user` in its layer).
    let workspace = match control.recv() {
        Ok(Some((HostMessage::Enter, fds))) if fds.len() <= 1 => fds.into_iter().next(),
        // The host closed its end: a pooled sandbox that was never used.
        Ok(None) => return ExitCode::SUCCESS,
        _ => return ExitCode::from(3),
    };
    if let Err(failure) = setup::enter(&plan, workspace.as_ref()) {
        return report(&control, &failure);
    }
    drop(workspace);
    if control.send(&InitMessage::Ready).is_err() {
        return ExitCode::from(5);
    }
    supervisor::serve(control)
}

/// Tells the host which step failed; init then exits.
fn report(control: &Control, failure: &setup::SetupFailure) -> ExitCode {
    let message = InitMessage::SetupFailed {
        step: failure.step.to_owned(),
        error: failure.error.to_string(),
    };
    let _ = control.send(&message);
    ExitCode::from(4)
}
