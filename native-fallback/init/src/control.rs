//! Init's end of the control socket.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, send};

use crate::protocol::{
    HostMessage, INIT_CONTROL_FD, InitMessage, MAX_MESSAGE_BYTES, MAX_MESSAGE_FDS,
};
use crate::sys;

/// Why a message could not be received.
#[derive(Debug)]
pub(crate) enum ReceiveError {
    /// The socket failed.
    Socket,
    /// The message was not a valid [`HostMessage`] or was cut.
    Malformed,
}

/// The control socket, inherited as [`INIT_CONTROL_FD`].
#[derive(Debug)]
pub(crate) struct Control {
    socket: OwnedFd,
}

impl Control {
    /// Takes the inherited socket and marks it close-on-exec (`dup2` cleared that), so that
    /// no process init starts inherits it.
    pub(crate) fn from_inherited() -> nix::Result<Self> {
        let socket = sys::received_fd(INIT_CONTROL_FD);
        fcntl(&socket, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        Ok(Self { socket })
    }

    /// The next message and the descriptors that came with it; `None` when the host has
    /// closed its end.
    pub(crate) fn recv(&self) -> Result<Option<(HostMessage, Vec<OwnedFd>)>, ReceiveError> {
        let mut buffer = vec![0u8; MAX_MESSAGE_BYTES];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_MESSAGE_FDS]);
        let (len, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let received = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let message = match received {
                Err(nix::Error::EINTR) => continue,
                other => other.map_err(|_| ReceiveError::Socket)?,
            };
            let mut fds = Vec::new();
            for control in message.cmsgs().map_err(|_| ReceiveError::Socket)? {
                if let ControlMessageOwned::ScmRights(raw) = control {
                    fds.extend(raw.into_iter().map(sys::received_fd));
                }
            }
            let truncated = message.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            break (message.bytes, fds, truncated);
        };
        if len == 0 {
            return Ok(None);
        }
        if truncated {
            return Err(ReceiveError::Malformed);
        }
        let message =
            serde_json::from_slice(&buffer[..len]).map_err(|_| ReceiveError::Malformed)?;
        Ok(Some((message, fds)))
    }

    /// Sends one message.
    pub(crate) fn send(&self, message: &InitMessage) -> nix::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(|_| nix::Error::EINVAL)?;
        loop {
            match send(self.socket.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                Err(nix::Error::EINTR) => continue,
                other => return other.map(drop),
            }
        }
    }
}
