//! The messages between the host and a sandbox's init process.
//!
//! They travel over a `SOCK_SEQPACKET` socket pair, one JSON document per datagram, so a
//! message is never split or merged. File descriptors ride along as `SCM_RIGHTS`: the
//! detached mounts with [`HostMessage::Setup`], the three standard streams with
//! [`HostMessage::Spawn`]. The host treats everything init says as untrusted: once setup is
//! done, init runs with the guest's privileges and a guest could take it over.
//!
//! This file is compiled into both the library and the `soulbox-init` binary.

use serde::{Deserialize, Serialize};

/// The largest message either side sends or accepts.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The most file descriptors one message carries.
pub(crate) const MAX_MESSAGE_FDS: usize = 8;

/// The control socket's descriptor number in init.
pub(crate) const INIT_CONTROL_FD: i32 = 3;

/// What the host asks of init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum HostMessage {
    /// The first message: run the first part of the isolation sequence (everything but the
    /// workspace and the dropping of privileges), then answer [`InitMessage::Prepared`].
    /// Carries one detached mount per entry of [`SetupPlan::mounts`], in order.
    Setup(SetupPlan),
    /// The second message: attach the workspace (the one descriptor carried) and finish the
    /// isolation sequence, then answer [`InitMessage::Ready`]. A prepared sandbox may wait in
    /// a pool for this; no guest code has run in it before.
    Enter,
    /// Start a process. Carries its stdin, stdout and stderr, in that order.
    Spawn(SpawnRequest),
    /// Send a signal to the process group of a process started by [`HostMessage::Spawn`].
    Signal {
        /// The host's id of the process.
        id: u64,
        /// The signal number.
        signal: i32,
    },
}

/// What init tells the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum InitMessage {
    /// The first part of the isolation sequence is complete; init waits for
    /// [`HostMessage::Enter`].
    Prepared,
    /// The isolation sequence is complete; init now runs as the sandbox user, under seccomp.
    Ready,
    /// A step of the isolation sequence failed; init exits.
    SetupFailed {
        /// The step, as named in the crate docs.
        step: String,
        /// What the kernel answered.
        error: String,
    },
    /// A process was started.
    Started {
        /// The host's id of the process.
        id: u64,
        /// Its pid inside the sandbox.
        pid: i32,
    },
    /// A process could not be started.
    SpawnFailed {
        /// The host's id of the process.
        id: u64,
        /// The errno of the failure (`ENOENT` for a command that does not exist).
        errno: i32,
        /// What failed, for people.
        error: String,
    },
    /// A process ended.
    Exited {
        /// The host's id of the process.
        id: u64,
        /// How it ended.
        status: ExitStatus,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(unreachable_pub, reason = "the library re-exports it; init does not")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// The isolation sequence's parameters; the steps themselves are fixed in init's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetupPlan {
    /// The sandbox's host name.
    pub(crate) hostname: String,
    /// Where each detached mount sent with the message is attached in the new root.
    pub(crate) mounts: Vec<String>,
    /// Whether the first mount is the root itself (a template's layers under the sandbox's
    /// writable layer), which stays writable. Otherwise the root is a small tmpfs, made
    /// read-only once built.
    pub(crate) layered_root: bool,
    /// Where the workspace sent with [`HostMessage::Enter`] is attached: the home of the
    /// sandbox user.
    pub(crate) workspace: String,
    /// The sandbox user's id (and its group's).
    pub(crate) user_id: u32,
    /// Whether the sandbox shares the host's network namespace (a template build that is
    /// allowed the network) instead of having one of its own with only loopback.
    pub(crate) host_network: bool,
    /// Symbolic links made in the new root: `(path, target)`.
    pub(crate) symlinks: Vec<(String, String)>,
    /// The size of the private `/tmp`.
    pub(crate) tmp_bytes: u64,
    /// The size of the private `/dev/shm`.
    pub(crate) shm_bytes: u64,
    /// The device nodes bound from the host's `/dev` (names only).
    pub(crate) devices: Vec<String>,
    /// Paths of `/proc` hidden: files get `/dev/null` bound over them, directories an empty
    /// read-only tmpfs.
    pub(crate) masked_proc_paths: Vec<String>,
    /// Paths of `/proc` made read-only.
    pub(crate) readonly_proc_paths: Vec<String>,
    /// Resource limits set on init, inherited by every process.
    pub(crate) rlimits: Vec<Rlimit>,
    /// The seccomp programs, in installation order.
    pub(crate) seccomp: Vec<Vec<BpfInstruction>>,
}

/// A resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rlimit {
    /// Which resource.
    pub(crate) resource: RlimitResource,
    /// The soft and hard limit.
    pub(crate) limit: u64,
}

/// The resources SoulBox limits with rlimits (the cgroup is the real limit; these are a
/// backstop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RlimitResource {
    /// Open files per process.
    Nofile,
    /// The largest file a process may write.
    Fsize,
    /// Core dump size.
    Core,
    /// Stack size.
    Stack,
}

/// One classic BPF instruction, as in `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BpfInstruction {
    /// The operation.
    pub(crate) code: u16,
    /// Jump offset if true.
    pub(crate) jt: u8,
    /// Jump offset if false.
    pub(crate) jf: u8,
    /// The operand.
    pub(crate) k: u32,
}

/// A process to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpawnRequest {
    /// The host's id for it, unique within the sandbox.
    pub(crate) id: u64,
    /// The program and its arguments; the program is looked up in the `PATH` of `env`.
    pub(crate) argv: Vec<String>,
    /// Its whole environment.
    pub(crate) env: Vec<(String, String)>,
    /// Its working directory.
    pub(crate) cwd: String,
    /// The user it runs as, inside the user namespace.
    pub(crate) uid: u32,
    /// Its group.
    pub(crate) gid: u32,
    /// Whether its standard streams are a terminal that becomes its controlling terminal (in
    /// a new session).
    #[serde(default)]
    pub(crate) terminal: bool,
}
