//! Paths of a sandbox's files, as the files API and the filesystem service see them.
//!
//! Both reach two parts of a sandbox's file tree: its workspace, which every tier sees at
//! `/home/user` (persistent), and the native sandbox's private `/tmp` (reached through the
//! sandbox's mount namespace, the native sandbox started on first use; what is made there is
//! given to the sandbox user). A path is taken as envd takes it — `~` is the home, a relative
//! path is relative to the home, `.` and `..` are resolved lexically — and must then lie in
//! one of the two. Every operation goes through a `cap_std::fs::Dir` of that part, so a
//! symbolic link cannot lead outside it either: such a path is refused, and nothing outside
//! is read or written.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, Metadata, MetadataExt, PermissionsExt};
use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
use serde::Serialize;
use soulbox_runtime::Sandbox;

/// The sandbox's home, where its workspace is.
pub(crate) const HOME: &str = "/home/user";

/// What went wrong with a path, sorted for the error codes of each API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathErrorKind {
    NotFound,
    Invalid,
    AlreadyExists,
    Denied,
    NoSpace,
    Internal,
}

/// A failed file operation, with a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathError {
    pub(crate) kind: PathErrorKind,
    pub(crate) message: String,
}

impl PathError {
    pub(crate) fn new(kind: PathErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// An I/O error on `path`.
    pub(crate) fn io(path: &str, error: &io::Error) -> Self {
        let kind = match error.kind() {
            io::ErrorKind::NotFound => PathErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => PathErrorKind::AlreadyExists,
            io::ErrorKind::IsADirectory
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::DirectoryNotEmpty
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidFilename => PathErrorKind::Invalid,
            // cap-std refuses a path that leads outside the workspace with PermissionDenied.
            io::ErrorKind::PermissionDenied => PathErrorKind::Denied,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => PathErrorKind::NoSpace,
            _ => PathErrorKind::Internal,
        };
        // cap-std refuses a path that leads outside with an error of its own (no errno).
        let message = match (&kind, error.raw_os_error()) {
            (PathErrorKind::Denied, None) => {
                format!("{path}: permission denied (a path may not lead outside {HOME} or {TMP})")
            }
            _ => format!("{path}: {error}"),
        };
        Self { kind, message }
    }
}

/// The parts of a sandbox's file tree the files API reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    /// `/home/user`: the workspace, persistent, shared by both tiers.
    Home,
    /// `/tmp`: the native sandbox's private `/tmp` (made when first reached).
    Tmp,
}

impl Area {
    fn root(self) -> &'static str {
        match self {
            Self::Home => HOME,
            Self::Tmp => TMP,
        }
    }
}

/// The sandbox's `/tmp`.
pub(crate) const TMP: &str = "/tmp";

/// A path of the sandbox: as shown to the client (absolute), its area, and its path relative
/// to the area's root (`.` for the root itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SandboxPath {
    pub(crate) area: Area,
    pub(crate) shown: String,
    pub(crate) relative: PathBuf,
}

impl SandboxPath {
    /// Resolves a client's path.
    pub(crate) fn resolve(path: &str) -> Result<Self, PathError> {
        if path.contains('\0') {
            return Err(PathError::new(PathErrorKind::Invalid, "a path may not contain NUL"));
        }
        let absolute = match path {
            "" | "~" => HOME.to_owned(),
            _ if path.starts_with("~/") => format!("{HOME}/{}", &path[2..]),
            _ if path.starts_with('/') => path.to_owned(),
            _ => format!("{HOME}/{path}"),
        };
        let mut parts: Vec<&str> = Vec::new();
        for component in Path::new(&absolute).components() {
            match component {
                Component::Normal(part) => parts.push(part.to_str().unwrap_or_default()),
                Component::ParentDir => {
                    parts.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        let shown = format!("/{}", parts.join("/"));
        for area in [Area::Home, Area::Tmp] {
            let relative = match shown.strip_prefix(area.root()) {
                Some("") => PathBuf::from("."),
                Some(rest) if rest.starts_with('/') => PathBuf::from(&rest[1..]),
                _ => continue,
            };
            return Ok(Self { area, shown, relative });
        }
        Err(PathError::new(
            PathErrorKind::Denied,
            format!(
                "{path}: outside the sandbox's files; the files API reaches {HOME} (the \
                 workspace) and {TMP} — use a command for other paths"
            ),
        ))
    }

    /// The last component.
    pub(crate) fn name(&self) -> String {
        self.shown.rsplit('/').next().unwrap_or_default().to_owned()
    }

    /// The same path one component deeper.
    pub(crate) fn join(&self, name: &str) -> Self {
        let relative = if self.relative == Path::new(".") {
            PathBuf::from(name)
        } else {
            self.relative.join(name)
        };
        let shown =
            if self.shown == "/" { format!("/{name}") } else { format!("{}/{name}", self.shown) };
        Self { area: self.area, shown, relative }
    }

    /// The directory it is in, unless it is an area's root.
    pub(crate) fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        let relative = match self.relative.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let shown =
            self.shown.rsplit_once('/').map(|(head, _)| head.to_owned()).unwrap_or_default();
        Some(Self { area: self.area, shown, relative })
    }

    /// Whether this is an area's root (which cannot be removed or moved).
    pub(crate) fn is_root(&self) -> bool {
        self.relative == Path::new(".")
    }
}

/// The native sandbox's `/tmp`, as a capability, and the host id of the sandbox user, as
/// whom the files API acts there.
#[derive(Debug)]
pub(crate) struct NativeTmp {
    pub(crate) dir: Dir,
    pub(crate) owner: u32,
}

/// A directory of the sandbox's file tree, for one operation (see [`SandboxFiles::dir`]).
#[derive(Debug)]
pub(crate) struct AreaDir<'a> {
    dir: &'a Dir,
    _acting: Option<ActingAs>,
}

impl std::ops::Deref for AreaDir<'_> {
    type Target = Dir;

    fn deref(&self) -> &Dir {
        self.dir
    }
}

/// This thread's file-system ids set to another user's until dropped (`setfsuid` and
/// `setfsgid` are per thread; capabilities over files are dropped meanwhile, as the kernel
/// does for a file-system uid other than 0).
#[derive(Debug)]
struct ActingAs {
    previous_uid: Uid,
    previous_gid: Gid,
}

impl ActingAs {
    fn user(id: u32) -> Result<Self, String> {
        let previous_gid = setfsgid(Gid::from_raw(id));
        let previous_uid = setfsuid(Uid::from_raw(id));
        let acting = Self { previous_uid, previous_gid };
        // `setfsuid` reports no error; asking again returns the id now in force.
        if setfsuid(Uid::from_raw(id)) != Uid::from_raw(id) {
            return Err(
                "the server cannot act as the sandbox user (it needs to run as root)".into()
            );
        }
        Ok(acting)
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        setfsuid(self.previous_uid);
        setfsgid(self.previous_gid);
    }
}

/// A sandbox's file tree for one call, on a blocking thread: the workspace, and the native
/// `/tmp`, reached (and the native sandbox started) only when a path is in it.
pub(crate) struct SandboxFiles {
    home: Dir,
    /// The server's own uid: what the workspace's files are owned by on disk.
    server_id: u32,
    tmp: std::sync::OnceLock<Result<NativeTmp, PathError>>,
    open_tmp: Box<dyn Fn() -> Result<NativeTmp, PathError> + Send + Sync>,
}

impl std::fmt::Debug for SandboxFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxFiles").field("tmp", &self.tmp.get()).finish_non_exhaustive()
    }
}

impl SandboxFiles {
    /// Opens the workspace; `/tmp` is opened by `open_tmp` when first reached. Call it on a
    /// blocking thread.
    pub(crate) fn open(
        sandbox: &Sandbox,
        open_tmp: impl Fn() -> Result<NativeTmp, PathError> + Send + Sync + 'static,
    ) -> Result<Self, PathError> {
        let home = Dir::open_ambient_dir(sandbox.workspace(), ambient_authority())
            .map_err(|e| PathError::io(HOME, &e))?;
        let server_id = home.dir_metadata().map(|m| m.uid()).unwrap_or_default();
        Ok(Self { home, server_id, tmp: std::sync::OnceLock::new(), open_tmp: Box::new(open_tmp) })
    }

    /// The workspace, with the native `/tmp` already reached (or `None`: not to be reached).
    pub(crate) fn with_tmp(sandbox: &Sandbox, tmp: Option<NativeTmp>) -> Result<Self, PathError> {
        let files = Self::open(sandbox, || {
            Err(PathError::new(PathErrorKind::Invalid, "this call does not reach /tmp"))
        })?;
        if let Some(tmp) = tmp {
            let _ = files.tmp.set(Ok(tmp));
        }
        Ok(files)
    }

    /// A path that leads to the native `/tmp` through this process's descriptor of it
    /// (valid while `self` lives).
    pub(crate) fn tmp_descriptor_path(&self) -> Result<PathBuf, PathError> {
        use std::os::fd::AsRawFd;
        Ok(PathBuf::from(format!("/proc/self/fd/{}", self.tmp()?.dir.as_raw_fd())))
    }

    fn tmp(&self) -> Result<&NativeTmp, PathError> {
        self.tmp.get_or_init(|| (self.open_tmp)()).as_ref().map_err(Clone::clone)
    }

    /// The directory a path is relative to. While the answer lives, this thread acts on the
    /// native `/tmp` as the sandbox user: the tmpfs belongs to the sandbox's user namespace,
    /// where the server's own ids do not exist, and the user's permissions apply there.
    pub(crate) fn dir(&self, path: &SandboxPath) -> Result<AreaDir<'_>, PathError> {
        match path.area {
            Area::Home => Ok(AreaDir { dir: &self.home, _acting: None }),
            Area::Tmp => {
                let tmp = self.tmp()?;
                let acting = ActingAs::user(tmp.owner)
                    .map_err(|e| PathError::new(PathErrorKind::Internal, format!("{TMP}: {e}")))?;
                Ok(AreaDir { dir: &tmp.dir, _acting: Some(acting) })
            }
        }
    }

    /// Makes the directory `path` and its missing parents.
    pub(crate) fn make_dirs(&self, path: &SandboxPath) -> Result<(), PathError> {
        let dir = self.dir(path)?;
        let mut made = SandboxPath {
            area: path.area,
            shown: path.area.root().to_owned(),
            relative: PathBuf::from("."),
        };
        for component in path.relative.components() {
            let Component::Normal(name) = component else { continue };
            made = made.join(name.to_str().unwrap_or_default());
            match dir.metadata(&made.relative) {
                Ok(metadata) if metadata.is_dir() => continue,
                Ok(_) => {
                    return Err(PathError::new(
                        PathErrorKind::Invalid,
                        format!("{}: not a directory", made.shown),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    dir.create_dir(&made.relative).map_err(|e| PathError::io(&made.shown, &e))?;
                }
                Err(e) => return Err(PathError::io(&made.shown, &e)),
            }
        }
        Ok(())
    }

    /// The name a sandbox shows for an owner id on disk: the server's files in the
    /// workspace (idmapped) and the host ids of the sandbox's user and root.
    fn owner_name(&self, id: u32, area: Area) -> String {
        if (area == Area::Home && id == self.server_id)
            || self.tmp.get().and_then(|t| t.as_ref().ok()).is_some_and(|t| t.owner == id)
        {
            "user".to_owned()
        } else if id == SANDBOX_ROOT_HOST_ID {
            "root".to_owned()
        } else {
            id.to_string()
        }
    }
}

/// envd's `EntryInfo`, in protobuf-JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EntryInfo {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) file_type: &'static str,
    pub(crate) path: String,
    /// int64: a string in protobuf-JSON.
    pub(crate) size: String,
    pub(crate) mode: u32,
    pub(crate) permissions: String,
    pub(crate) owner: String,
    pub(crate) group: String,
    pub(crate) modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) symlink_target: Option<String>,
    pub(crate) is_symlink: bool,
}

pub(crate) const FILE_TYPE_FILE: &str = "FILE_TYPE_FILE";
pub(crate) const FILE_TYPE_DIRECTORY: &str = "FILE_TYPE_DIRECTORY";

/// The host id of the sandbox's root (the native tier's `SANDBOX_UID_BASE`).
const SANDBOX_ROOT_HOST_ID: u32 = 100_000;

/// Go's `FileMode.String()` of a type letter and permission bits.
fn permissions_string(type_letter: char, mode: u32) -> String {
    let mut text = String::with_capacity(10);
    text.push(type_letter);
    for (bit, letter) in
        [(8, 'r'), (7, 'w'), (6, 'x'), (5, 'r'), (4, 'w'), (3, 'x'), (2, 'r'), (1, 'w'), (0, 'x')]
    {
        text.push(if mode & (1 << bit) != 0 { letter } else { '-' });
    }
    text
}

/// Describes `path` (following a final symbolic link, which is reported as one).
pub(crate) fn entry_info(files: &SandboxFiles, path: &SandboxPath) -> Result<EntryInfo, PathError> {
    let dir = files.dir(path)?;
    let link = dir.symlink_metadata(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
    let is_symlink = link.file_type().is_symlink();
    let (metadata, symlink_target) = if is_symlink {
        let target = dir.read_link_contents(&path.relative).ok().map(|t| t.display().to_string());
        // A link to outside the workspace (or a dangling one) is described as itself.
        (dir.metadata(&path.relative).unwrap_or(link), target)
    } else {
        (link, None)
    };
    Ok(describe(files, path, &metadata, symlink_target, is_symlink))
}

fn describe(
    files: &SandboxFiles,
    path: &SandboxPath,
    metadata: &Metadata,
    symlink_target: Option<String>,
    is_symlink: bool,
) -> EntryInfo {
    let mode = metadata.permissions().mode() & 0o777;
    let (file_type, letter) = if metadata.is_dir() {
        (FILE_TYPE_DIRECTORY, 'd')
    } else if metadata.is_file() {
        (FILE_TYPE_FILE, '-')
    } else {
        ("FILE_TYPE_UNSPECIFIED", '?')
    };
    let modified =
        metadata.modified().map(cap_std::time::SystemTime::into_std).unwrap_or(UNIX_EPOCH);
    EntryInfo {
        name: path.name(),
        file_type,
        path: path.shown.clone(),
        size: metadata.len().to_string(),
        mode,
        permissions: permissions_string(if is_symlink { 'L' } else { letter }, mode),
        owner: files.owner_name(metadata.uid(), path.area),
        group: files.owner_name(metadata.gid(), path.area),
        modified_time: humantime::format_rfc3339_seconds(modified).to_string(),
        symlink_target,
        is_symlink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative(path: &str) -> Result<String, PathErrorKind> {
        SandboxPath::resolve(path).map(|p| p.relative.display().to_string()).map_err(|e| e.kind)
    }

    #[test]
    fn paths_resolve_as_envd_resolves_them() {
        assert_eq!(relative("a.txt"), Ok("a.txt".to_owned()));
        assert_eq!(relative("~/a/b"), Ok("a/b".to_owned()));
        assert_eq!(relative("/home/user/x/../y"), Ok("y".to_owned()));
        assert_eq!(relative(""), Ok(".".to_owned()));
        assert_eq!(relative("/home/user/"), Ok(".".to_owned()));
        let tmp = SandboxPath::resolve("/tmp/../tmp/a").expect("in /tmp");
        assert_eq!((tmp.area, tmp.relative), (Area::Tmp, PathBuf::from("a")));
    }

    #[test]
    fn paths_outside_the_home_are_refused() {
        for path in [
            "../../etc/passwd",
            "/etc/passwd",
            "/home/user/../user2/x",
            "/home/userx",
            "/",
            "~/../..",
        ] {
            assert_eq!(relative(path), Err(PathErrorKind::Denied), "{path}");
        }
    }

    #[test]
    fn permissions_print_as_go_prints_them() {
        assert_eq!(permissions_string('-', 0o644), "-rw-r--r--");
        assert_eq!(permissions_string('d', 0o755), "drwxr-xr-x");
    }
}
