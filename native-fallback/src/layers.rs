//! Image layers (OCI or `docker save` layer tarballs, plain or gzip) unpacked into
//! directories that overlayfs can stack, the first step of templates built from images.
//!
//! An archive is untrusted. Whatever it says, nothing is written outside the layer's
//! directory:
//! - every write goes through a [`cap_std::fs::Dir`] of that directory, which never resolves a
//!   path outside it (a symlink the layer made pointing out is not followed by a later entry);
//! - a leading `/` is dropped (paths are relative to the image's root); a `..` component
//!   refuses the layer;
//! - symlinks are written as they are (they are resolved only inside the sandbox); a hard
//!   link must name a file the same layer holds;
//! - device nodes and FIFOs are skipped (counted); setuid and setgid bits are dropped;
//! - whiteouts become overlayfs whiteouts: `.wh.NAME` a character device 0:0 named `NAME`,
//!   `.wh..wh..opq` the directory's `trusted.overlay.opaque` set to `y`;
//! - as root, files belong to the sandbox's ids (the layer's uid and gid plus
//!   [`crate::SANDBOX_UID_BASE`]), as a sandbox's own root sees them.

use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use cap_std::fs::{Dir, DirBuilder, OpenOptions, Permissions};
use cap_std::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// What an unpacked layer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackedLayer {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories, symlinks and hard links made.
    pub links_and_dirs: u64,
    /// Whiteouts (files and opaque directories).
    pub whiteouts: u64,
    /// Device nodes and FIFOs skipped.
    pub skipped: u64,
}

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The archive names a path that leaves the layer.
    #[error("the layer's entry {0:?} leaves the layer's directory (a `..` component)")]
    Escapes(String),
    /// A hard link names what the layer does not hold.
    #[error("the layer's hard link {path:?} names {target:?}, which the layer does not hold")]
    BadLink {
        /// The link.
        path: String,
        /// What it names.
        target: String,
    },
    /// The archive is not a tar archive (or a gzip of one).
    #[error("the layer is not a readable tar archive: {0}")]
    Archive(std::io::Error),
    /// Writing an entry failed (including a path that would resolve outside the layer).
    #[error("writing the layer's entry {path:?}: {source}")]
    Write {
        /// The entry.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// The prefix of whiteout files, and the name of the opaque-directory marker.
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks the layer tarball `archive` (plain or gzip) into the directory `into` (made if
/// missing).
pub fn unpack(archive: impl Read, into: &Path) -> Result<UnpackedLayer, LayerError> {
    let write_error =
        |path: &Path, source| LayerError::Write { path: path.display().to_string(), source };
    std::fs::create_dir_all(into).map_err(|e| write_error(into, e))?;
    let root = Dir::open_ambient_dir(into, cap_std::ambient_authority())
        .map_err(|e| write_error(into, e))?;
    let mut reader = BufReader::new(archive);
    let gzip = reader.fill_buf().map_err(LayerError::Archive)?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> =
        if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) };
    let mut tar = tar::Archive::new(reader);
    let as_root = nix::unistd::geteuid().is_root();
    let mut unpacked = UnpackedLayer::default();
    for entry in tar.entries().map_err(LayerError::Archive)? {
        let mut entry = entry.map_err(LayerError::Archive)?;
        let raw = entry.path().map_err(LayerError::Archive)?.into_owned();
        let Some(path) = inside(&raw)? else { continue };
        let written = |e| write_error(&path, e);
        let header = entry.header().clone();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            make_parents(&root, parent, as_root).map_err(written)?;
        }
        if name == OPAQUE_MARKER {
            let dir = path.parent().unwrap_or(Path::new(""));
            mark_opaque(&root, dir, as_root).map_err(written)?;
            unpacked.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            whiteout(&root, &path.with_file_name(hidden), as_root).map_err(written)?;
            unpacked.whiteouts += 1;
            continue;
        }
        // No setuid or setgid; the sticky bit and permissions stay.
        let mode = header.mode().unwrap_or(0o644) & 0o1777;
        match header.entry_type() {
            tar::EntryType::Directory => {
                let mut builder = DirBuilder::new();
                builder.recursive(true).mode(mode);
                root.create_dir_with(&path, &builder).map_err(written)?;
                root.set_permissions(&path, Permissions::from_mode(mode)).map_err(written)?;
                unpacked.links_and_dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let _ = root.remove_file(&path);
                let mut options = OpenOptions::new();
                options.write(true).create_new(true).mode(mode);
                let mut file = root.open_with(&path, &options).map_err(written)?;
                unpacked.bytes += std::io::copy(&mut entry, &mut file).map_err(written)?;
                file.set_permissions(Permissions::from_mode(mode)).map_err(written)?;
                unpacked.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = header.link_name().map_err(LayerError::Archive)?.unwrap_or_default();
                let _ = root.remove_file(&path);
                // Written as they are, absolute ones too: they are resolved inside the sandbox
                // only (and never followed by a later entry, as `Dir` refuses paths out).
                root.symlink_contents(target.as_ref(), &path).map_err(written)?;
                unpacked.links_and_dirs += 1;
            }
            tar::EntryType::Link => {
                let target = header.link_name().map_err(LayerError::Archive)?.unwrap_or_default();
                let bad = || LayerError::BadLink {
                    path: raw.display().to_string(),
                    target: target.display().to_string(),
                };
                let target = inside(&target)?.ok_or_else(bad)?;
                let _ = root.remove_file(&path);
                root.hard_link(&target, &root, &path).map_err(|_| bad())?;
                unpacked.links_and_dirs += 1;
                continue;
            }
            _ => {
                // Devices, FIFOs and what else a tarball can hold: not in a sandbox's root.
                unpacked.skipped += 1;
                continue;
            }
        }
        if as_root {
            own(&root, &path, &header).map_err(written)?;
        }
    }
    Ok(unpacked)
}

/// `path` relative to the layer's root: a leading `/` dropped, `.` ignored; `None` for the
/// root itself; an error for `..`.
fn inside(path: &Path) -> Result<Option<PathBuf>, LayerError> {
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::Escapes(path.display().to_string()));
            }
        }
    }
    Ok((!relative.as_os_str().is_empty()).then_some(relative))
}

/// The directory holding `path` (opened through `root`, so inside the layer) and `path`'s
/// name in it: calls on the pair resolve nothing but that name.
fn parent_of<'a>(root: &Dir, path: &'a Path) -> std::io::Result<(Dir, &'a std::ffi::OsStr)> {
    let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => root.open_dir(parent)?,
        None => root.try_clone()?,
    };
    Ok((parent, path.file_name().unwrap_or_default()))
}

/// Makes the directories of `dir` that the archive did not list (0755, the sandbox root's as
/// root: a directory the sandbox cannot map would deny even its root).
fn make_parents(root: &Dir, dir: &Path, as_root: bool) -> std::io::Result<()> {
    let mut so_far = PathBuf::new();
    for part in dir.components() {
        so_far.push(part);
        if root.symlink_metadata(&so_far).is_ok() {
            continue;
        }
        root.create_dir(&so_far)?;
        if as_root {
            own(root, &so_far, &tar::Header::new_gnu())?;
        }
    }
    Ok(())
}

/// Gives `path` the sandbox's ids for the entry's uid and gid (without following a symlink).
fn own(root: &Dir, path: &Path, header: &tar::Header) -> std::io::Result<()> {
    let id = |n: u64| u32::try_from(n).ok().and_then(|n| n.checked_add(crate::SANDBOX_UID_BASE));
    let (Some(uid), Some(gid)) = (id(header.uid().unwrap_or(0)), id(header.gid().unwrap_or(0)))
    else {
        return Ok(());
    };
    let (parent, name) = parent_of(root, path)?;
    nix::unistd::fchownat(
        &parent,
        name,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

/// Makes `path` an overlayfs whiteout: a character device 0:0 (as root; without root, which
/// cannot make one, an empty file of the whiteout's own name records it).
fn whiteout(root: &Dir, path: &Path, as_root: bool) -> std::io::Result<()> {
    let _ = root.remove_file(path);
    if !as_root {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let marker = path.with_file_name(format!("{WHITEOUT_PREFIX}{name}"));
        return root.write(marker, b"");
    }
    let (parent, name) = parent_of(root, path)?;
    nix::sys::stat::mknodat(
        &parent,
        name,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .map_err(std::io::Error::from)
}

/// Marks directory `dir` opaque for overlayfs (as root: `trusted.*` attributes need it;
/// without root the marker file is kept as it came).
fn mark_opaque(root: &Dir, dir: &Path, as_root: bool) -> std::io::Result<()> {
    if !as_root {
        return root.write(dir.join(OPAQUE_MARKER), b"");
    }
    // A readable descriptor of the directory itself (extended attributes cannot be set
    // through the path-only descriptors directories are opened with).
    let mut options = OpenOptions::new();
    options.read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW);
    let target = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let file = root.open_with(target, &options)?.into_std();
    xattr::FileExt::set_xattr(&file, "trusted.overlay.opaque", b"y")
}
