//! Paths of a sandbox's files, as the files API and the filesystem service see them.
//!
//! Both reach the sandbox's persistent files: its workspace, which every tier sees at
//! `/home/user`. A path is taken as envd takes it — `~` is the home, a relative path is
//! relative to the home, `.` and `..` are resolved lexically — and must then lie in
//! `/home/user`. Every operation goes through a `cap_std::fs::Dir` of the workspace, so a
//! symbolic link cannot lead outside it either: such a path is refused, and nothing outside
//! is read or written.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, Metadata, MetadataExt, PermissionsExt};
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
        let message = match kind {
            PathErrorKind::Denied => {
                format!("{path}: permission denied (a path may not lead outside {HOME})")
            }
            _ => format!("{path}: {error}"),
        };
        Self { kind, message }
    }
}

/// A path in the sandbox's home: as shown to the client (absolute) and relative to the
/// workspace (`.` for the home itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HomePath {
    pub(crate) shown: String,
    pub(crate) relative: PathBuf,
}

impl HomePath {
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
        let relative = match shown.strip_prefix(HOME) {
            Some("") => PathBuf::from("."),
            Some(rest) if rest.starts_with('/') => PathBuf::from(&rest[1..]),
            _ => {
                return Err(PathError::new(
                    PathErrorKind::Denied,
                    format!(
                        "{path}: outside the sandbox's files; the files API reaches {HOME} (the \
                         workspace) — use a command for other paths"
                    ),
                ));
            }
        };
        Ok(Self { shown, relative })
    }

    /// The last component (the home's own name for the home).
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
        Self { shown, relative }
    }
}

/// The workspace of `sandbox`, as a capability.
pub(crate) fn workspace(sandbox: &Sandbox) -> Result<Dir, PathError> {
    Dir::open_ambient_dir(sandbox.workspace(), ambient_authority())
        .map_err(|e| PathError::io(HOME, &e))
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

/// The name a sandbox shows for an owner id on disk: the server's files are the sandbox
/// user's (the workspace is idmapped), the sandbox root's keep its own host id.
fn owner_name(id: u32, server_id: u32) -> String {
    if id == server_id {
        "user".to_owned()
    } else if id == SANDBOX_ROOT_HOST_ID {
        "root".to_owned()
    } else {
        id.to_string()
    }
}

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
pub(crate) fn entry_info(dir: &Dir, path: &HomePath) -> Result<EntryInfo, PathError> {
    let link = dir.symlink_metadata(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
    let server_id = dir.dir_metadata().map(|m| m.uid()).unwrap_or_default();
    let is_symlink = link.file_type().is_symlink();
    let (metadata, symlink_target) = if is_symlink {
        let target = dir.read_link_contents(&path.relative).ok().map(|t| t.display().to_string());
        // A link to outside the workspace (or a dangling one) is described as itself.
        (dir.metadata(&path.relative).unwrap_or(link), target)
    } else {
        (link, None)
    };
    Ok(describe(path, &metadata, symlink_target, is_symlink, server_id))
}

fn describe(
    path: &HomePath,
    metadata: &Metadata,
    symlink_target: Option<String>,
    is_symlink: bool,
    server_id: u32,
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
        owner: owner_name(metadata.uid(), server_id),
        group: owner_name(metadata.gid(), server_id),
        modified_time: humantime::format_rfc3339_seconds(modified).to_string(),
        symlink_target,
        is_symlink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative(path: &str) -> Result<String, PathErrorKind> {
        HomePath::resolve(path).map(|p| p.relative.display().to_string()).map_err(|e| e.kind)
    }

    #[test]
    fn paths_resolve_as_envd_resolves_them() {
        assert_eq!(relative("a.txt"), Ok("a.txt".to_owned()));
        assert_eq!(relative("~/a/b"), Ok("a/b".to_owned()));
        assert_eq!(relative("/home/user/x/../y"), Ok("y".to_owned()));
        assert_eq!(relative(""), Ok(".".to_owned()));
        assert_eq!(relative("/home/user/"), Ok(".".to_owned()));
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
