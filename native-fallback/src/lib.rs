//! The native tier of SoulBox: processes in Linux namespaces with cgroup limits and a seccomp
//! filter, for what a WASI module cannot run (native toolchains, shell, Docker-style
//! templates, browsers).
//!
//! Not built yet: this crate only holds the tier's place in the workspace so that the
//! dependency direction is fixed from the start. Until it implements
//! [`soulbox_runtime::Backend`], the dispatcher has no native tier, and executions that need it
//! are refused with a clear error (never run with less isolation).
