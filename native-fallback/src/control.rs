//! The host's end of a sandbox's control socket.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::protocol::{HostMessage, InitMessage, MAX_MESSAGE_BYTES, MAX_MESSAGE_FDS};

/// A message init sent that the host cannot accept.
#[derive(Debug, thiserror::Error)]
#[error("init sent a malformed message: {0}")]
pub(crate) struct MalformedMessage(String);

/// The non-blocking host end of a `SOCK_SEQPACKET` pair.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    socket: AsyncFd<OwnedFd>,
}

impl ControlSocket {
    /// Wraps a non-blocking socket; must be called within a tokio runtime.
    pub(crate) fn new(socket: OwnedFd) -> io::Result<Self> {
        Ok(Self { socket: crate::sys::register_async(socket)? })
    }

    /// Sends a message with `fds` attached.
    pub(crate) async fn send(
        &self,
        message: &HostMessage,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE_BYTES || fds.len() > MAX_MESSAGE_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "control message too large"));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        self.socket
            .async_io(Interest::WRITABLE, |socket| {
                let iov = [IoSlice::new(&bytes)];
                let rights = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
                sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map(drop)
                    .map_err(io::Error::from)
            })
            .await
    }

    /// The next message; `Ok(None)` once init has closed its end (it exited).
    pub(crate) async fn recv(&self) -> io::Result<Option<Result<InitMessage, MalformedMessage>>> {
        let mut buffer = vec![0u8; MAX_MESSAGE_BYTES];
        let (len, truncated) = self
            .socket
            .async_io(Interest::READABLE, |socket| {
                let mut iov = [IoSliceMut::new(&mut buffer)];
                // Init never sends descriptors; a buffer for none makes any it tried arrive
                // truncated (and so closed by the kernel), never installed here.
                let message = recvmsg::<()>(socket.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                    .map_err(io::Error::from)?;
                let truncated =
                    message.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((message.bytes, truncated))
            })
            .await?;
        if len == 0 {
            return Ok(None);
        }
        if truncated {
            return Ok(Some(Err(MalformedMessage("message truncated".to_owned()))));
        }
        Ok(Some(
            serde_json::from_slice(&buffer[..len]).map_err(|e| MalformedMessage(e.to_string())),
        ))
    }
}
