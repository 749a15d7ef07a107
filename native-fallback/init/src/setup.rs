//! The isolation sequence, run by init as root of its fresh user namespace before anything
//! of the guest runs. Every step either succeeds or ends the sandbox: there is no path that
//! continues with less isolation. The steps, in order, are documented in the crate docs of
//! `soulbox-native`; each is named here as it is there.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, chdir, pivot_root, setgroups, sethostname, setresgid, setresuid};

use crate::protocol::{RlimitResource, SetupPlan};
use crate::sys;

/// Where the new root is built before `pivot_root`: a tmpfs mounted over the host's `/tmp`
/// in init's private mount namespace (the host's own `/tmp` is not touched), or a template's
/// layered root attached there.
const NEW_ROOT: &str = "/tmp";

/// A step that failed, and the kernel's answer.
#[derive(Debug)]
pub(crate) struct SetupFailure {
    /// The step's name.
    pub(crate) step: &'static str,
    /// What went wrong.
    pub(crate) error: StepError,
}

/// What a step's system call answered.
#[derive(Debug)]
pub(crate) enum StepError {
    /// An errno.
    Sys(nix::Error),
    /// A file system operation.
    Io(std::io::Error),
    /// A capability operation.
    Caps(caps::errors::CapsError),
    /// The plan does not fit (more mounts named than sent).
    Plan(&'static str),
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sys(e) => write!(f, "{e}"),
            Self::Io(e) => write!(f, "{e}"),
            Self::Caps(e) => write!(f, "{e}"),
            Self::Plan(e) => f.write_str(e),
        }
    }
}

impl From<nix::Error> for StepError {
    fn from(e: nix::Error) -> Self {
        Self::Sys(e)
    }
}

impl From<std::io::Error> for StepError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<caps::errors::CapsError> for StepError {
    fn from(e: caps::errors::CapsError) -> Self {
        Self::Caps(e)
    }
}

/// Runs one named step.
fn step(
    name: &'static str,
    run: impl FnOnce() -> Result<(), StepError>,
) -> Result<(), SetupFailure> {
    run().map_err(|error| SetupFailure { step: name, error })
}

/// A path inside the new root, before the pivot.
fn in_root(path: &str) -> PathBuf {
    Path::new(NEW_ROOT).join(path.trim_start_matches('/'))
}

/// Runs the first part of the sequence, up to (not including) the workspace and the dropping
/// of privileges. `mounts` are the detached trees for `plan.mounts`.
pub(crate) fn prepare(plan: &SetupPlan, mounts: Vec<OwnedFd>) -> Result<(), SetupFailure> {
    let root = Uid::from_raw(0);
    let root_group = Gid::from_raw(0);
    step("become root of the user namespace", || {
        setresgid(root_group, root_group, root_group)?;
        setresuid(root, root, root)?;
        Ok(())
    })?;
    step("make every mount private", || {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )?;
        Ok(())
    })?;
    // A layered root is the first mount; a tmpfs root is made here.
    let attached = usize::from(plan.layered_root);
    step("mount the new root", || {
        if mounts.len() != plan.mounts.len() {
            return Err(StepError::Plan("the number of mounts sent does not match the plan"));
        }
        match mounts.first() {
            Some(root) if plan.layered_root => sys::move_mount(root.as_fd(), c"/tmp")?,
            _ => {
                let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
                let options = Some("mode=0755,size=1m");
                mount(Some("tmpfs"), NEW_ROOT, Some("tmpfs"), flags, options)?;
            }
        }
        // The sandbox user's home belongs to it when it is made here (it is where a
        // workspace goes, or, in a template build, part of the layer).
        let home = in_root(&plan.workspace);
        if !home.exists() {
            fs::create_dir_all(&home)?;
            let user = (Uid::from_raw(plan.user_id), Gid::from_raw(plan.user_id));
            nix::unistd::chown(&home, Some(user.0), Some(user.1))?;
        }
        let fixed = ["/tmp", "/dev", "/proc", "/root"];
        for dir in plan.mounts.iter().skip(attached).map(String::as_str).chain(fixed) {
            fs::create_dir_all(in_root(dir))?;
        }
        // The sandbox root's home: private to it, like any /root.
        fs::set_permissions(in_root("/root"), fs::Permissions::from_mode(0o700))?;
        for (path, target) in &plan.symlinks {
            let link = in_root(path);
            // A template's layers may have made the path already: theirs stays.
            if plan.layered_root && fs::symlink_metadata(&link).is_ok() {
                continue;
            }
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent)?;
            }
            symlink(target, link)?;
        }
        Ok(())
    })?;
    step("attach the template's layers", || {
        for (tree, target) in mounts.iter().zip(&plan.mounts).skip(attached) {
            let target = CString::new(in_root(target).into_os_string().into_encoded_bytes())
                .map_err(|_| StepError::Plan("a mount target contains a NUL byte"))?;
            sys::move_mount(tree.as_fd(), &target)?;
        }
        Ok(())
    })?;
    drop(mounts);
    step("mount a private /tmp", || {
        let options = format!("mode=1777,size={}", plan.tmp_bytes);
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(Some("tmpfs"), &in_root("/tmp"), Some("tmpfs"), flags, Some(options.as_str()))?;
        Ok(())
    })?;
    step("mount a private /dev", || mount_dev(plan))?;
    step("mount a fresh /proc", || {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("proc"), &in_root("/proc"), Some("proc"), flags, None::<&str>)?;
        Ok(())
    })?;
    step("mask /proc paths", || mask_proc_paths(&plan.masked_proc_paths))?;
    step("make /proc paths read-only", || readonly_proc_paths(&plan.readonly_proc_paths))?;
    step("pivot into the new root and detach the old one", || {
        chdir(NEW_ROOT)?;
        pivot_root(".", ".")?;
        umount2(".", MntFlags::MNT_DETACH)?;
        chdir("/")?;
        Ok(())
    })?;
    step("make the root read-only", || {
        if plan.layered_root {
            // A template's root is the sandbox's writable layer, as in a container.
            return Ok(());
        }
        let flags = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)?;
        Ok(())
    })?;
    step("set the host name", || Ok(sethostname(&plan.hostname)?))?;
    if !plan.host_network {
        step("bring up loopback", || Ok(sys::loopback_up()?))?;
    }
    step("enter a new cgroup namespace", || Ok(unshare(CloneFlags::CLONE_NEWCGROUP)?))?;
    step("set resource limits", || {
        for limit in &plan.rlimits {
            let resource = match limit.resource {
                RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
                RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
                RlimitResource::Core => Resource::RLIMIT_CORE,
                RlimitResource::Stack => Resource::RLIMIT_STACK,
            };
            setrlimit(resource, limit.limit, limit.limit)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The capabilities of the sandbox's root (uid 0 of its user namespace, no privilege on the
/// host): Docker's default set. Init keeps them to start processes as root or as the
/// sandbox user; a process of the sandbox user has none (it changes uid before `exec`, and
/// `no_new_privs` keeps it from gaining any).
const ROOT_CAPABILITIES: [Capability; 14] = [
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETUID,
    Capability::CAP_SYS_CHROOT,
];

/// Runs the rest of the sequence: attaches the workspace, then drops every privilege but the
/// sandbox root's.
pub(crate) fn enter(plan: &SetupPlan, workspace: Option<&OwnedFd>) -> Result<(), SetupFailure> {
    step("attach the workspace", || {
        let Some(workspace) = workspace else { return Ok(()) };
        let target = CString::new(plan.workspace.as_bytes())
            .map_err(|_| StepError::Plan("the workspace path contains a NUL byte"))?;
        Ok(sys::move_mount(workspace.as_fd(), &target)?)
    })?;
    step("limit the capability bounding set to the sandbox root's", || {
        for capability in caps::all() {
            if !ROOT_CAPABILITIES.contains(&capability) {
                caps::drop(None, CapSet::Bounding, capability)?;
            }
        }
        Ok(())
    })?;
    step("keep only the sandbox root's capabilities", || {
        setgroups(&[])?;
        let keep: caps::CapsHashSet = ROOT_CAPABILITIES.into_iter().collect();
        caps::clear(None, CapSet::Ambient)?;
        caps::clear(None, CapSet::Inheritable)?;
        caps::set(None, CapSet::Effective, &keep)?;
        caps::set(None, CapSet::Permitted, &keep)?;
        Ok(())
    })?;
    step("forbid new privileges", || Ok(nix::sys::prctl::set_no_new_privs()?))?;
    step("make init undumpable", || Ok(nix::sys::prctl::set_dumpable(false)?))?;
    step("install the seccomp filters", || {
        for program in &plan.seccomp {
            let program: Vec<seccompiler::sock_filter> = program
                .iter()
                .map(|i| seccompiler::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
                .collect();
            seccompiler::apply_filter(&program)
                .map_err(|e| StepError::Io(std::io::Error::other(e.to_string())))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// A tmpfs `/dev` with only the allowed devices (bound from the host's), a private devpts
/// and `/dev/shm`.
fn mount_dev(plan: &SetupPlan) -> Result<(), StepError> {
    let dev = in_root("/dev");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(Some("tmpfs"), &dev, Some("tmpfs"), flags, Some("mode=0755,size=64k"))?;
    for name in &plan.devices {
        let target = dev.join(name);
        fs::File::create(&target)?;
        let source = Path::new("/dev").join(name);
        mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    fs::create_dir(&shm)?;
    let options = format!("mode=1777,size={}", plan.shm_bytes);
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), &shm, Some("tmpfs"), flags, Some(options.as_str()))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name))?;
    }
    Ok(())
}

fn mask_proc_paths(paths: &[String]) -> Result<(), StepError> {
    let null = in_root("/dev/null");
    for path in paths {
        let target = in_root("/proc").join(path);
        let Ok(metadata) = fs::metadata(&target) else { continue };
        if metadata.is_dir() {
            let flags =
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            mount(Some("tmpfs"), &target, Some("tmpfs"), flags, Some("size=0"))?;
        } else {
            mount(Some(&null), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
        }
    }
    Ok(())
}

fn readonly_proc_paths(paths: &[String]) -> Result<(), StepError> {
    for path in paths {
        let target = in_root("/proc").join(path);
        if fs::symlink_metadata(&target).is_err() {
            continue;
        }
        mount(
            Some(&target),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
        let flags = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)?;
    }
    Ok(())
}
