//! Images as templates use them: a content-addressed store of unpacked layers shared by every
//! template, and the readers that fill it from an OCI image layout or a `docker save`
//! archive (registries are in [`crate::registry`]).
//!
//! A layer is stored once, unpacked (by [`crate::layers::unpack`], which neutralises what a
//! hostile archive could do), under the digest of its uncompressed tarball: its OCI "diff
//! id". The digest is computed while the layer is unpacked and checked against the one the
//! image's configuration declares, so a layer whose content does not match is refused.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layers::{self, LayerError};
use crate::rootfs::SANDBOX_UID_BASE;

/// What SoulBox uses of an image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// `ENTRYPOINT`.
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    pub cmd: Option<Vec<String>>,
    /// `WORKDIR`.
    pub workdir: Option<String>,
    /// `USER`.
    pub user: Option<String>,
}

impl ImageConfig {
    /// Sets `key` to `value`, replacing an earlier value.
    pub fn set_env(&mut self, key: &str, value: &str) {
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some(pair) => pair.1 = value.to_owned(),
            None => self.env.push((key.to_owned(), value.to_owned())),
        }
    }

    /// The value of `key`, if set.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn from_oci(config: &ImageConfiguration) -> Self {
        let Some(config) = config.config() else { return Self::default() };
        let env = config
            .env()
            .iter()
            .flatten()
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (pair.clone(), String::new()),
            })
            .collect();
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Self {
            env,
            entrypoint: config.entrypoint().clone(),
            cmd: config.cmd().clone(),
            workdir: non_empty(config.working_dir()),
            user: non_empty(config.user()),
        }
    }
}

/// An image whose layers are in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The layers' diff ids (`sha256:…`), lowest first.
    pub layers: Vec<String>,
    /// Its configuration.
    pub config: ImageConfig,
}

/// An image that could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file of the image could not be read, or the store written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The image's JSON documents are not what the OCI or Docker formats say.
    #[error("{0}")]
    Format(String),
    /// A layer was refused.
    #[error("layer {digest}: {source}")]
    Layer {
        /// Its digest.
        digest: String,
        /// Why.
        #[source]
        source: LayerError,
    },
    /// A layer's content does not have the digest the image declares.
    #[error("layer content has digest {actual}, the image declares {declared}")]
    DigestMismatch {
        /// The declared digest.
        declared: String,
        /// The digest of what was read.
        actual: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// The unpacked layers of every template, by diff id: `<dir>/sha256/<hex>/`.
#[derive(Debug, Clone)]
pub struct LayerStore {
    dir: PathBuf,
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The `sha256:<hex>` digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl LayerStore {
    /// The store under `dir` (made if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        for sub in ["sha256", "tmp"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_error(format!("creating {}", path.display())))?;
        }
        // Half-imported layers of an earlier server.
        if let Ok(entries) = fs::read_dir(dir.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self { dir })
    }

    /// The directory of the layer `digest` (which may not be stored).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| ImageError::Format(format!("`{digest}` is not a sha256 digest")))?;
        Ok(self.dir.join("sha256").join(hex.to_ascii_lowercase()))
    }

    /// Whether the layer `digest` is stored.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|path| path.is_dir())
    }

    /// The directories of `layers`, lowest first.
    pub fn paths(&self, layers: &[String]) -> Result<Vec<PathBuf>, ImageError> {
        layers.iter().map(|digest| self.path(digest)).collect()
    }

    /// Unpacks the layer tarball `archive` (plain or gzip) into the store, unless a layer of
    /// the same content is there already, and returns its diff id. With `declared`, a
    /// content of another digest is refused and nothing is stored.
    pub fn import(&self, archive: impl Read, declared: Option<&str>) -> Result<String, ImageError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let staging = self.dir.join("tmp").join(format!("{}-{n}", std::process::id()));
        let result = self.import_into(archive, declared, &staging);
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn import_into(
        &self,
        archive: impl Read,
        declared: Option<&str>,
        staging: &Path,
    ) -> Result<String, ImageError> {
        let mut reader = BufReader::new(archive);
        let head = reader.fill_buf().map_err(io_error("reading a layer"))?;
        let gzip = head.starts_with(&[0x1f, 0x8b]);
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(ImageError::Format(
                "zstd-compressed layers are not supported; use gzip or plain tar layers".into(),
            ));
        }
        let plain: Box<dyn Read> =
            if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) };
        let mut hashing = Hashing { inner: plain, hasher: Sha256::new() };
        let named = declared.unwrap_or("(new layer)").to_owned();
        layers::unpack(&mut hashing, staging)
            .map_err(|source| ImageError::Layer { digest: named.clone(), source })?;
        // The end-of-archive padding belongs to the digest too.
        io::copy(&mut hashing, &mut io::sink()).map_err(io_error("reading a layer"))?;
        let digest = format!("sha256:{:x}", hashing.hasher.finalize());
        if let Some(declared) = declared
            && !declared.eq_ignore_ascii_case(&digest)
        {
            return Err(ImageError::DigestMismatch {
                declared: declared.to_owned(),
                actual: digest,
            });
        }
        let path = self.path(&digest)?;
        if !path.is_dir() {
            fs::rename(staging, &path)
                .or_else(|e| if path.is_dir() { Ok(()) } else { Err(e) })
                .map_err(io_error(format!("storing layer {digest}")))?;
        }
        Ok(digest)
    }

    /// Imports `image`'s layers, reading each (by its position) from `open` unless a layer of
    /// that diff id is stored already. `progress` hears of each layer as it is done.
    pub fn import_image(
        &self,
        diff_ids: &[String],
        mut open: impl FnMut(usize) -> Result<Box<dyn Read>, ImageError>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        for (i, diff_id) in diff_ids.iter().enumerate() {
            if self.contains(diff_id) {
                progress(&format!("layer {}/{}: {diff_id} (stored)", i + 1, diff_ids.len()));
                continue;
            }
            self.import(open(i)?, Some(diff_id))?;
            progress(&format!("layer {}/{}: {diff_id} (unpacked)", i + 1, diff_ids.len()));
        }
        Ok(())
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Format(format!("{what}: {e}")))
}

/// The configuration's diff ids and what SoulBox uses of it, from its JSON.
pub(crate) fn read_config(bytes: &[u8]) -> Result<(Vec<String>, ImageConfig), ImageError> {
    let config: ImageConfiguration = parse_json(bytes, "the image configuration")?;
    Ok((config.rootfs().diff_ids().clone(), ImageConfig::from_oci(&config)))
}

/// Reads the image `reference` (a tag, or the only image when `None`) of the OCI image
/// layout at `layout` into `store`.
pub fn import_oci_layout(
    store: &LayerStore,
    layout: &Path,
    reference: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage, ImageError> {
    let read = |path: PathBuf| {
        let what = format!("reading {}", path.display());
        fs::read(&path).map_err(io_error(what))
    };
    let blob = |digest: &str| -> Result<PathBuf, ImageError> {
        let (algorithm, hex) = digest
            .split_once(':')
            .filter(|(_, hex)| !hex.contains('/') && !hex.contains(".."))
            .ok_or_else(|| ImageError::Format(format!("bad digest `{digest}`")))?;
        Ok(layout.join("blobs").join(algorithm).join(hex))
    };
    let index: ImageIndex = parse_json(&read(layout.join("index.json"))?, "index.json")?;
    let manifests = index.manifests();
    let name = |m: &oci_spec::image::Descriptor| {
        m.annotations().as_ref().and_then(|a| a.get("org.opencontainers.image.ref.name")).cloned()
    };
    let chosen = match reference {
        Some(tag) => manifests.iter().find(|m| name(m).as_deref() == Some(tag)),
        None if manifests.len() == 1 => manifests.first(),
        None => None,
    };
    let Some(chosen) = chosen else {
        let tags: Vec<String> = manifests.iter().filter_map(name).collect();
        return Err(ImageError::Format(format!(
            "the OCI layout {} has no image {} (it has: {})",
            layout.display(),
            reference.map_or_else(|| "without a tag".to_owned(), |t| format!("tagged `{t}`")),
            if tags.is_empty() { "none tagged".to_owned() } else { tags.join(", ") }
        )));
    };
    let manifest_bytes = read(blob(chosen.digest().as_ref())?)?;
    check_digest(&manifest_bytes, chosen.digest().as_ref())?;
    let manifest: ImageManifest = parse_json(&manifest_bytes, "the image manifest")?;
    let config_bytes = read(blob(manifest.config().digest().as_ref())?)?;
    check_digest(&config_bytes, manifest.config().digest().as_ref())?;
    let (diff_ids, config) = read_config(&config_bytes)?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::Format(
            "the manifest and the configuration differ in layers".into(),
        ));
    }
    store.import_image(
        &diff_ids,
        |i| {
            let path = blob(manifest.layers()[i].digest().as_ref())?;
            let file =
                File::open(&path).map_err(io_error(format!("opening {}", path.display())))?;
            Ok(Box::new(file))
        },
        progress,
    )?;
    Ok(StoredImage { layers: diff_ids, config })
}

fn check_digest(bytes: &[u8], declared: &str) -> Result<(), ImageError> {
    let actual = sha256_digest(bytes);
    if actual.eq_ignore_ascii_case(declared) {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch { declared: declared.to_owned(), actual })
    }
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Reads the image `reference` (a `name:tag`, or the only image when `None`) of the
/// `docker save` archive `archive` into `store`.
pub fn import_docker_archive(
    store: &LayerStore,
    archive: &Path,
    reference: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage, ImageError> {
    let open = || File::open(archive).map_err(io_error(format!("opening {}", archive.display())));
    // Small members are read in one pass; layers are read in a pass each, when needed.
    let mut small = BTreeMap::new();
    let mut tar = tar::Archive::new(open()?);
    for entry in tar.entries().map_err(io_error("reading the archive"))? {
        let mut entry = entry.map_err(io_error("reading the archive"))?;
        let path = entry.path().map_err(io_error("reading the archive"))?.into_owned();
        let path = path.to_string_lossy().into_owned();
        if path == "manifest.json" || path.ends_with(".json") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(io_error("reading the archive"))?;
            small.insert(path, bytes);
        }
    }
    let manifest = small
        .get("manifest.json")
        .ok_or_else(|| ImageError::Format("the archive has no manifest.json".into()))?;
    let images: Vec<DockerManifest> = parse_json(manifest, "manifest.json")?;
    // A tag names its registry or not (`host/team/app:v1` is `team/app:v1` there too).
    let names = |tag: &str, reference: &str| {
        tag == reference || tag.strip_suffix(reference).is_some_and(|host| host.ends_with('/'))
    };
    let chosen = match reference {
        Some(reference) => images.iter().find(|i| i.repo_tags.iter().any(|t| names(t, reference))),
        None if images.len() == 1 => images.first(),
        None => None,
    };
    let chosen = chosen.ok_or_else(|| {
        let tags: Vec<&str> =
            images.iter().flat_map(|i| &i.repo_tags).map(String::as_str).collect();
        ImageError::Format(format!("the archive has no such image (it has: {})", tags.join(", ")))
    })?;
    let config_bytes = small.get(&chosen.config).ok_or_else(|| {
        ImageError::Format(format!("the archive lacks the configuration {}", chosen.config))
    })?;
    let (diff_ids, config) = read_config(config_bytes)?;
    if diff_ids.len() != chosen.layers.len() {
        return Err(ImageError::Format(
            "the manifest and the configuration differ in layers".into(),
        ));
    }
    store.import_image(
        &diff_ids,
        |i| {
            let wanted = &chosen.layers[i];
            let mut tar = tar::Archive::new(open()?);
            for entry in tar.entries().map_err(io_error("reading the archive"))? {
                let mut entry = entry.map_err(io_error("reading the archive"))?;
                let path = entry.path().map_err(io_error("reading the archive"))?;
                if path.to_string_lossy() == wanted.as_str() {
                    // The layer is unpacked from memory: tar entries borrow their archive.
                    let mut bytes = Vec::new();
                    entry.read_to_end(&mut bytes).map_err(io_error("reading a layer"))?;
                    return Ok(Box::new(io::Cursor::new(bytes)));
                }
            }
            Err(ImageError::Format(format!("the archive lacks the layer {wanted}")))
        },
        progress,
    )?;
    Ok(StoredImage { layers: diff_ids, config })
}

/// Writes the overlayfs upper directory `upper` as a layer tarball to `out`: whiteouts
/// (0:0 character devices) become `.wh.` entries, opaque directories a `.wh..wh..opq`
/// entry, and host ids the sandbox's own. Returns whether it holds anything.
pub fn write_upper_as_layer(upper: &Path, out: impl Write) -> io::Result<bool> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut any = false;
    append_upper(&mut tar, upper, Path::new(""), &mut any)?;
    tar.into_inner()?.flush()?;
    Ok(any)
}

/// The id inside the sandbox of a host id of a layer's file.
pub(crate) fn sandbox_id(host: u32) -> u64 {
    u64::from(host.saturating_sub(SANDBOX_UID_BASE))
}

fn append_upper<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    relative: &Path,
    any: &mut bool,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        let metadata = fs::symlink_metadata(&path)?;
        let kind = metadata.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mtime(metadata.mtime().try_into().unwrap_or(0));
        header.set_uid(sandbox_id(metadata.uid()));
        header.set_gid(sandbox_id(metadata.gid()));
        header.set_mode(metadata.mode() & 0o7777);
        *any = true;
        if kind.is_char_device() && metadata.rdev() == 0 {
            let whiteout = format!(".wh.{}", entry.file_name().to_string_lossy());
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(0);
            header.set_mode(0o644);
            tar.append_data(&mut header, relative.join(whiteout), io::empty())?;
        } else if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, &name, io::empty())?;
            let opaque = xattr::get(&path, "trusted.overlay.opaque").ok().flatten();
            if opaque.as_deref() == Some(b"y") {
                let mut marker = tar::Header::new_gnu();
                marker.set_entry_type(tar::EntryType::Regular);
                marker.set_size(0);
                marker.set_mode(0o644);
                tar.append_data(&mut marker, name.join(".wh..wh..opq"), io::empty())?;
            }
            append_upper(tar, &path, &name, any)?;
        } else if kind.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &name, fs::read_link(&path)?)?;
        } else if kind.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(metadata.len());
            tar.append_data(&mut header, &name, File::open(&path)?)?;
        }
    }
    Ok(())
}

/// Copies what `layers` (lowest first) hold under `home/user` into `workspace`, honouring
/// whiteouts and opaque directories, so that a sandbox made from a template finds in its
/// workspace what the build put in the user's home. Ids become the workspace's: the
/// sandbox user's files belong to the server's user on disk (the workspace's idmapped mount
/// shows them as the sandbox user's), others keep their ids.
pub fn seed_home(layers: &[PathBuf], workspace: &Path) -> io::Result<()> {
    for layer in layers {
        let home = layer.join("home/user");
        if home.is_dir() {
            merge_dir(&home, workspace)?;
        }
    }
    Ok(())
}

fn merge_dir(from: &Path, to: &Path) -> io::Result<()> {
    if xattr::get(from, "trusted.overlay.opaque").ok().flatten().as_deref() == Some(b"y") {
        // An opaque directory hides what lower layers had there.
        for entry in fs::read_dir(to)? {
            remove_any(&entry?.path())?;
        }
    }
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let metadata = fs::symlink_metadata(&source)?;
        let kind = metadata.file_type();
        if kind.is_char_device() && metadata.rdev() == 0 {
            remove_any(&target)?;
            continue;
        }
        if kind.is_dir() {
            if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                remove_any(&target)?;
                fs::create_dir(&target)?;
            }
            merge_dir(&source, &target)?;
        } else if kind.is_symlink() {
            remove_any(&target)?;
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
        } else if kind.is_file() {
            remove_any(&target)?;
            fs::copy(&source, &target)?;
        } else {
            continue;
        }
        let owner = |id: u32| {
            if id == SANDBOX_UID_BASE + crate::rootfs::SANDBOX_UID { 0 } else { id }
        };
        std::os::unix::fs::lchown(
            &target,
            Some(owner(metadata.uid())),
            Some(owner(metadata.gid())),
        )?;
        if !kind.is_symlink() {
            fs::set_permissions(&target, fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
        }
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
