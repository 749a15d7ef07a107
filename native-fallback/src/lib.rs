//! The native tier of SoulBox: processes in Linux namespaces with cgroup limits and a seccomp
//! filter, for what a WASI module cannot run (native toolchains, shell, Docker-style
//! templates, browsers).
//!
//! Built so far: the seccomp policy ([`seccomp`]), as checked-in data, with probes showing that
//! each refused syscall reaches the kernel natively and is refused under the filter. Until the
//! rest exists the dispatcher has no native tier, and executions that need it are refused with
//! a clear error (never run with less isolation).
//!
//! # Plan for the rest of the isolation sequence
//!
//! In the order the code will run it, failing closed at every step (the spike that proved each
//! step on these machines is `shared/reference/native-and-wasmtime-notes.md`, section 3):
//!
//! 1. `clone` with user, pid, mount, net, uts, ipc and cgroup namespaces from a small
//!    single-threaded helper (a multi-threaded server must not allocate between `clone` and
//!    `execve`); the parent writes `uid_map`/`gid_map`, joins the cgroup, then releases the
//!    child through a pipe; a second pipe carries any setup error back.
//! 2. In the child: `setresuid/setresgid(0)`, mounts made private, a tmpfs root with `/usr`
//!    bound read-only (plus the merged-usr symlinks), an allow-listed `/etc`, the workspace
//!    read-write at `/home/user`, a size-limited tmpfs `/tmp`, a private `/dev` and devpts, a
//!    fresh `/proc` with the usual paths masked, then `pivot_root` and the old root detached.
//! 3. Hostname, rlimits, capability bounding set cleared, `setgroups([])` and the sandbox user,
//!    `no_new_privs`, every fd but 0-2 closed, the seccomp filters, `execve` with an
//!    allow-listed environment.
//!
//! Open design point, to settle first: the uid mapping. The WASM tier writes workspace files as
//! the server's own user, and the sandbox's user must be able to change them (and the other
//! way round). Either the workspace is bound through an idmapped mount (`mount_setattr` with
//! `MOUNT_ATTR_IDMAP`, kernel 5.12+, supported by ext4, xfs and tmpfs 6.3+) so the server's uid
//! appears as the sandbox user inside, or the sandbox user is mapped to the server's uid
//! directly (simpler, but then a namespace escape lands as that user).

pub mod seccomp;
#[allow(unsafe_code, reason = "the native tier's kernel calls live here, each block justified")]
mod sys;
