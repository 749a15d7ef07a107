//! The new mount API (Linux 5.12+): detached copies of a host directory, with attributes set
//! on the copy only, ready for init to attach inside the sandbox's mount namespace.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// A detached, recursive copy of the mount tree at `path` (`open_tree(OPEN_TREE_CLONE)`).
pub(crate) fn clone_tree(path: &CStr) -> nix::Result<OwnedFd> {
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    let fd = i32::try_from(Errno::result(fd)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `attributes` (`MOUNT_ATTR_*`) on every mount of a detached tree, and its id mapping
/// when `idmap` is a user namespace.
pub(crate) fn set_attributes(
    tree: BorrowedFd<'_>,
    attributes: u64,
    idmap: Option<BorrowedFd<'_>>,
) -> nix::Result<()> {
    let mut attr =
        libc::mount_attr { attr_set: attributes, attr_clr: 0, propagation: 0, userns_fd: 0 };
    if let Some(userns) = idmap {
        attr.attr_set |= libc::MOUNT_ATTR_IDMAP;
        attr.userns_fd = u64::try_from(userns.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    }
    let flags = libc::AT_EMPTY_PATH | libc::AT_RECURSIVE;
    // SAFETY: the path is an empty NUL-terminated string, `attr` is a `struct mount_attr` that lives across the call, and its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &raw const attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(rc).map(drop)
}
