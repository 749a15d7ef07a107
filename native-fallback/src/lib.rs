//! The native tier of SoulBox: processes in Linux namespaces with cgroup limits and a seccomp
//! filter, for what a WASI module cannot run (native toolchains, shell, Docker-style
//! templates, browsers).
//!
//! Built so far: the seccomp policy ([`seccomp`]), as checked-in data with probes showing each
//! refused syscall reaches the kernel natively and is refused under the filter. The rest of the
//! isolation sequence (namespaces, root, cgroups, the sandbox's init process) and the
//! [`soulbox_runtime::Backend`] implementation come next; until then the dispatcher has no
//! native tier, and executions that need it are refused with a clear error (never run with
//! less isolation).

pub mod seccomp;
#[allow(unsafe_code, reason = "the native tier's kernel calls live here, each block justified")]
mod sys;
