//! The new mount API (Linux 5.12+): detached copies of a host directory, with attributes set
//! on the copy only, ready for init to attach inside the sandbox's mount namespace.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_string, fsmount,
    fsopen,
};

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

/// A detached overlay mount (`fsopen("overlay")` + `fsmount`): `lower` (topmost first) under
/// the writable `upper`, with `work` as overlayfs's scratch directory on the same file system.
/// Made by the server, in the host's user namespace, so that overlayfs's `trusted.*`
/// attributes (whiteouts, opaque directories) work; it is attached nowhere on the host.
pub(crate) fn overlay(lower: &[&Path], upper: &Path, work: &Path) -> nix::Result<OwnedFd> {
    let errno = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    let context = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(errno)?;
    // One layer at a time (Linux 6.8+), or all in one `:`-separated option before that.
    let mut one_by_one = true;
    for layer in lower {
        match fsconfig_set_string(&context, "lowerdir+", *layer) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL) if layer == &lower[0] => {
                one_by_one = false;
                break;
            }
            Err(e) => return Err(errno(e)),
        }
    }
    if !one_by_one {
        let mut joined = Vec::new();
        for (i, layer) in lower.iter().enumerate() {
            let bytes = layer.as_os_str().as_encoded_bytes();
            // The option separates layers with `:` and options with `,`.
            if bytes.iter().any(|b| matches!(b, b':' | b',')) {
                return Err(Errno::EINVAL);
            }
            if i > 0 {
                joined.push(b':');
            }
            joined.extend_from_slice(bytes);
        }
        fsconfig_set_string(&context, "lowerdir", joined.as_slice()).map_err(errno)?;
    }
    fsconfig_set_string(&context, "upperdir", upper).map_err(errno)?;
    fsconfig_set_string(&context, "workdir", work).map_err(errno)?;
    fsconfig_create(&context).map_err(errno)?;
    let attributes = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    fsmount(&context, FsMountFlags::FSMOUNT_CLOEXEC, attributes).map_err(errno)
}
