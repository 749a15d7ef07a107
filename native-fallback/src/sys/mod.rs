//! Kernel calls of the native tier. This is the one place in SoulBox allowed `unsafe`; every
//! block says why it is sound. (`init.rs` holds init's own and is compiled into init only.)

pub(crate) mod mounts;
pub(crate) mod pty;
pub(crate) mod spawn;

#[cfg(test)]
pub(crate) mod probe;

/// Registers a non-blocking descriptor with tokio's reactor.
pub(crate) fn register_async(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use tokio::io::Interest;
    // SAFETY: `OwnedFd` owns a valid descriptor, and the `AsyncFd` owns the `OwnedFd`, so it
    // is neither closed nor replaced while registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            fd,
            Interest::READABLE | Interest::WRITABLE,
        )
    }
    .map_err(std::io::Error::from)
}
