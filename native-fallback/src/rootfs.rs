//! The default template's root: the host's `/usr` (and the merged-usr links or the
//! directories `/bin`, `/lib*`, `/sbin` beside it) read-only, an allow-listed copy of `/etc`
//! read-only, the sandbox's workspace read-write at `/home/user` through an idmapped mount,
//! and the fixed policy of the isolation sequence (devices, masked `/proc` paths, rlimits).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::{BpfInstruction, Rlimit, RlimitResource, SetupPlan};
use crate::sys::mounts;

/// The sandbox user's id inside the sandbox (and its group's).
pub const SANDBOX_UID: u32 = 1000;

/// The sandbox user's home, where the workspace is mounted.
pub const SANDBOX_HOME: &str = "/home/user";

/// The home of the sandbox's root (read-only: the root file system is).
pub const ROOT_HOME: &str = "/root";

/// The host uid that the sandbox's root maps to; the sandbox's ids 0..65536 are the host's
/// `SANDBOX_UID_BASE`.. (root's usual subordinate range).
pub const SANDBOX_UID_BASE: u32 = 100_000;

/// How many ids the sandbox's user namespace maps.
pub const SANDBOX_ID_COUNT: u32 = 65_536;

/// The sandbox's host name.
pub const SANDBOX_HOSTNAME: &str = "sandbox";

/// The device nodes a sandbox gets, bound from the host's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Paths of `/proc` hidden from the guest (Docker's list).
const MASKED_PROC_PATHS: [&str; 10] = [
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "scsi",
    "timer_list",
    "timer_stats",
];

/// Paths of `/proc` the guest may read but not write.
const READONLY_PROC_PATHS: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// What of the host's `/etc` a sandbox sees (entries missing on the host are skipped; names
/// ending in `*` are prefixes). Nothing with secrets or host identity: no `shadow`,
/// `machine-id`, `hostname`, `ssh`, `resolv.conf`.
const ETC_ALLOWED: [&str; 28] = [
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "chromium*",
    "debian_version",
    "fonts",
    "gai.conf",
    "host.conf",
    "inputrc",
    "java-*",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "profile",
    "profile.d",
    "protocols",
    "python3*",
    "services",
    "ssl",
    "terminfo",
    "timezone",
];

/// Files written into the sandbox's `/etc`, the same for every sandbox.
const ETC_GENERATED: [(&str, &str); 4] = [
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/bash\n\
         user:x:1000:1000:user:/home/user:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    ),
    ("group", "root:x:0:\ntty:x:5:\nuser:x:1000:\nnogroup:x:65534:\n"),
    ("hosts", "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("hostname", "sandbox\n"),
];

/// Top-level host directories a sandbox sees beside `/usr`: merged-usr links are recreated as
/// links, real directories are bound read-only.
const ROOT_ENTRIES: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// `MOUNT_ATTR_*` for the template's layers.
const READ_ONLY_LAYER: u64 =
    libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;

/// `MOUNT_ATTR_*` for the workspace.
const WORKSPACE_LAYER: u64 = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;

/// What a sandbox's `/` is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SandboxRoot {
    /// The default template: the host's `/usr` and the allow-listed `/etc`, read-only, on a
    /// small read-only root.
    #[default]
    Host,
    /// A built template: its layers, read-only, under the sandbox's own writable layer.
    Layers(LayeredRoot),
}

/// What network a sandbox has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SandboxNetwork {
    /// A network namespace of its own with only loopback: no network (every sandbox).
    #[default]
    Isolated,
    /// The host's network namespace, and its DNS settings (template builds, where the server
    /// allows it).
    Host,
}

/// A template's root: overlayfs over its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayeredRoot {
    /// The layers' directories, lowest first.
    pub layers: Vec<PathBuf>,
    /// Where the sandbox's writable layer lives (overlayfs's `upper` and `work` directories
    /// under it); it outlives the sandbox's processes, like its workspace.
    pub writable: PathBuf,
    /// Whether the host's `/usr` and the allow-listed `/etc` are mounted over the layers
    /// (a template built `FROM base`).
    pub host_system: bool,
    /// The template build it is made from: sandboxes of one build share a pool of prepared
    /// ones. Empty for none (a build step's root).
    pub template: String,
}

/// Failure to prepare the root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Copying the allow-listed `/etc` failed.
    #[error("preparing the sandbox /etc at {path}: {source}")]
    Etc {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The sandbox's writable layer could not be made.
    #[error("preparing the sandbox's writable layer at {path}: {source}")]
    Writable {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A detached mount could not be made.
    #[error("making a detached mount of {path}: {source}")]
    Mount {
        /// The directory.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

/// The read-only parts of the default template, prepared once per server.
#[derive(Debug)]
pub(crate) struct HostRootfs {
    /// Host directories bound read-only: `(host path, path in the sandbox)`.
    layers: Vec<(PathBuf, String)>,
    /// Links at the top of the sandbox's root.
    symlinks: Vec<(String, String)>,
    /// This tier's copy of `/etc`, removed with it.
    etc: PathBuf,
    /// The same with the host's `resolv.conf`, for sandboxes on the host's network.
    etc_with_dns: PathBuf,
}

impl Drop for HostRootfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.etc);
        let _ = fs::remove_dir_all(&self.etc_with_dns);
    }
}

/// The limits that are rlimits (the cgroup is the real limit; these are a backstop).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RlimitSettings {
    pub(crate) open_files: u64,
    pub(crate) file_bytes: u64,
    pub(crate) stack_bytes: u64,
}

/// The sizes of the sandbox's private tmpfs mounts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TmpfsSizes {
    pub(crate) tmp_bytes: u64,
    pub(crate) shm_bytes: u64,
}

impl HostRootfs {
    /// Builds the sandbox's `/etc` under `state_dir` and finds the host's top-level layout.
    /// Each tier has its own copy (`etc-<pid>-<n>`: servers sharing a data directory never
    /// change one another's), and removes the copies of servers that are gone.
    pub(crate) fn prepare(state_dir: &Path) -> Result<Self, RootfsError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        remove_stale_etc(state_dir);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let etc = state_dir.join(format!("etc-{}-{n}", std::process::id()));
        build_etc(&etc, Path::new("/etc"), false)?;
        let etc_with_dns = state_dir.join(format!("etc-{}-{n}-dns", std::process::id()));
        build_etc(&etc_with_dns, Path::new("/etc"), true)?;
        let mut layers =
            vec![(PathBuf::from("/usr"), "/usr".to_owned()), (etc.clone(), "/etc".to_owned())];
        let mut symlinks = Vec::new();
        for name in ROOT_ENTRIES {
            let host = Path::new("/").join(name);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = fs::read_link(&host) {
                        symlinks.push((format!("/{name}"), target.to_string_lossy().into_owned()));
                    }
                }
                Ok(m) if m.is_dir() => layers.push((host, format!("/{name}"))),
                _ => {}
            }
        }
        // Programs that keep temporary files in /var/tmp find the private /tmp there.
        symlinks.push(("/var/tmp".to_owned(), "/tmp".to_owned()));
        Ok(Self { layers, symlinks, etc, etc_with_dns })
    }

    /// Detached mounts of what `root` is made of, and where each goes (a layered root
    /// first, at `/`).
    pub(crate) fn mounts(
        &self,
        root: &SandboxRoot,
        network: SandboxNetwork,
    ) -> Result<(Vec<OwnedFd>, Vec<String>), RootfsError> {
        let mut fds = Vec::new();
        let mut targets = Vec::new();
        let host_system = match root {
            SandboxRoot::Host => true,
            SandboxRoot::Layers(layered) => {
                fds.push(overlay(layered)?);
                targets.push("/".to_owned());
                layered.host_system
            }
        };
        if host_system {
            for (host, target) in &self.layers {
                let host = match network {
                    SandboxNetwork::Host if *host == self.etc => &self.etc_with_dns,
                    _ => host,
                };
                fds.push(detached(host, READ_ONLY_LAYER, None)?);
                targets.push(target.clone());
            }
        }
        Ok((fds, targets))
    }

    /// A detached mount of the workspace, idmapped so that its files (owned by the server's
    /// user on disk) belong to the sandbox user inside, and the other way round.
    pub(crate) fn workspace_mount(
        &self,
        workspace: &Path,
        idmap: &OwnedFd,
    ) -> Result<OwnedFd, RootfsError> {
        detached(workspace, WORKSPACE_LAYER, Some(idmap))
    }

    /// The whole plan of the isolation sequence for one sandbox.
    pub(crate) fn plan(
        &self,
        root: &SandboxRoot,
        mounts: Vec<String>,
        tmpfs: TmpfsSizes,
        rlimits: RlimitSettings,
        seccomp: Vec<Vec<BpfInstruction>>,
    ) -> SetupPlan {
        let rlimit = |resource, limit| Rlimit { resource, limit };
        SetupPlan {
            hostname: SANDBOX_HOSTNAME.to_owned(),
            mounts,
            layered_root: matches!(root, SandboxRoot::Layers(_)),
            workspace: SANDBOX_HOME.to_owned(),
            user_id: SANDBOX_UID,
            host_network: false,
            symlinks: match root {
                SandboxRoot::Layers(layered) if !layered.host_system => Vec::new(),
                _ => self.symlinks.clone(),
            },
            tmp_bytes: tmpfs.tmp_bytes,
            shm_bytes: tmpfs.shm_bytes,
            devices: DEVICES.iter().map(|d| (*d).to_owned()).collect(),
            masked_proc_paths: MASKED_PROC_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            readonly_proc_paths: READONLY_PROC_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            rlimits: vec![
                rlimit(RlimitResource::Nofile, rlimits.open_files),
                rlimit(RlimitResource::Fsize, rlimits.file_bytes),
                rlimit(RlimitResource::Core, 0),
                rlimit(RlimitResource::Stack, rlimits.stack_bytes),
            ],
            seccomp,
        }
    }
}

fn detached(path: &Path, attributes: u64, idmap: Option<&OwnedFd>) -> Result<OwnedFd, RootfsError> {
    let error = |source| RootfsError::Mount { path: path.to_owned(), source };
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| error(nix::Error::EINVAL))?;
    let tree = mounts::clone_tree(&c_path).map_err(error)?;
    mounts::set_attributes(tree.as_fd(), attributes, idmap.map(AsFd::as_fd)).map_err(error)?;
    Ok(tree)
}

/// The overlay of a template's layers under the sandbox's writable layer. The writable
/// layer's root belongs to the sandbox's root, as the image's `/` does.
fn overlay(root: &LayeredRoot) -> Result<OwnedFd, RootfsError> {
    let upper = root.writable.join("upper");
    let work = root.writable.join("work");
    let writable_error = |path: &Path| {
        let path = path.to_owned();
        move |source| RootfsError::Writable { path, source }
    };
    // overlayfs needs a lower layer: an empty one for a template with none.
    let empty = root.writable.join("empty");
    for dir in [&upper, &work, &empty] {
        fs::create_dir_all(dir).map_err(writable_error(dir))?;
    }
    let owner = Some(SANDBOX_UID_BASE);
    std::os::unix::fs::chown(&upper, owner, owner).map_err(writable_error(&upper))?;
    let mut lower: Vec<&Path> = root.layers.iter().rev().map(PathBuf::as_path).collect();
    if lower.is_empty() {
        lower.push(&empty);
    }
    mounts::overlay(&lower, &upper, &work)
        .map_err(|source| RootfsError::Mount { path: upper.clone(), source })
}

/// Removes `etc-<pid>-<n>` copies whose process is gone.
fn remove_stale_etc(state_dir: &Path) {
    let Ok(entries) = fs::read_dir(state_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("etc-").and_then(|rest| rest.split(['-', '.']).next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies the allow-listed entries of `host_etc` (and its `resolv.conf` when `dns`) and writes
/// the generated files into a fresh `etc`, replacing the old one in one rename.
fn build_etc(etc: &Path, host_etc: &Path, dns: bool) -> Result<(), RootfsError> {
    let error = |path: &Path| {
        let path = path.to_owned();
        move |source| RootfsError::Etc { path, source }
    };
    let staging = etc.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(error(&staging))?;
    let entries = fs::read_dir(host_etc).map_err(error(host_etc))?;
    for entry in entries {
        let entry = entry.map_err(error(host_etc))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let allowed = ETC_ALLOWED.iter().any(|allowed| match allowed.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *allowed,
        }) || (dns && name == "resolv.conf");
        if allowed {
            copy_tree(&entry.path(), &staging.join(&*name)).map_err(error(&entry.path()))?;
        }
    }
    for (name, contents) in ETC_GENERATED {
        let path = staging.join(name);
        fs::write(&path, contents).map_err(error(&path))?;
    }
    let _ = fs::remove_dir_all(etc);
    fs::rename(&staging, etc).map_err(error(etc))
}

/// Copies files, directories and links (as links); skips anything else.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let metadata = fs::symlink_metadata(from)?;
    let kind = metadata.file_type();
    if kind.is_symlink() {
        symlink(fs::read_link(from)?, to)
    } else if kind.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            // Private keys (`/etc/ssl/private`) stay on the host.
            if entry.file_name() == "private" {
                continue;
            }
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, metadata.permissions())
    } else if kind.is_file() {
        fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}
