//! Pulling images from a registry (the OCI distribution API, as Docker registries and their
//! successors speak it) into the [`LayerStore`], through `oci-client`.
//!
//! A pull resolves the reference to one image manifest (from an image index or Docker
//! manifest list, the entry for Linux on the host's architecture), reads the image's
//! configuration, and downloads each layer the store lacks to a file under the store's
//! `tmp/`, then unpacks it with [`LayerStore::import`]. Both digests are checked: `oci-client`
//! checks each download against the digest the manifest declares, the store checks the
//! unpacked content against the configuration's diff id. A layer already in the store (layers
//! are shared between templates) is not downloaded again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::{Client, Reference};
use oci_spec::image::{Arch, Os};

use crate::image::{ImageError, LayerStore, StoredImage, read_config, sha256_digest};

/// How long connecting to a registry may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a registry may stay silent in the middle of an answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest image configuration read (it is held in memory); real ones are kilobytes.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// How to log in to a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No credentials: public images (a registry that asks for a token gets an anonymous one).
    Anonymous,
    /// A user name and a password (or an access token used as one).
    Basic {
        /// The user name.
        username: String,
        /// The password or token.
        password: String,
    },
}

impl std::fmt::Debug for RegistryAuth {
    /// Shows the user name, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl RegistryAuth {
    fn to_client(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            Self::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            Self::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
        }
    }
}

/// An image that could not be pulled.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference is not an image reference.
    #[error(
        "`{reference}` is not an image reference ({reason}); write it as `name`, `name:tag`, `host:port/name:tag` or `name@sha256:<digest>`, with a lowercase name"
    )]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry could not be reached.
    #[error(
        "cannot reach registry `{registry}`: {cause}; check the registry's address and the network (a registry that serves plain HTTP must be listed as insecure)"
    )]
    Unreachable {
        /// The registry (`host[:port]`).
        registry: String,
        /// Why, as the connection reported it.
        cause: String,
    },
    /// The registry has no such repository, tag or digest.
    #[error("image `{image}` not found in registry `{registry}`; check its name and tag")]
    NotFound {
        /// The image (`repository:tag` or `repository@digest`).
        image: String,
        /// The registry.
        registry: String,
    },
    /// The registry refused an anonymous pull.
    #[error(
        "registry `{registry}` refused to let image `{image}` be pulled without credentials ({cause}); give a user name and password that may pull it (or check the image's name: some registries answer so for images that do not exist)"
    )]
    CredentialsRequired {
        /// The image.
        image: String,
        /// The registry.
        registry: String,
        /// The registry's answer.
        cause: String,
    },
    /// The registry refused the credentials given.
    #[error(
        "registry `{registry}` refused the credentials given for image `{image}` ({cause}); check the user name and password, and that this user may pull the image"
    )]
    CredentialsRefused {
        /// The image.
        image: String,
        /// The registry.
        registry: String,
        /// The registry's answer.
        cause: String,
    },
    /// The image is an index with no entry for this host's platform.
    #[error(
        "image `{image}` in registry `{registry}` has no variant for {platform}, the platform of this host"
    )]
    NoPlatform {
        /// The image.
        image: String,
        /// The registry.
        registry: String,
        /// `linux/<architecture>`.
        platform: String,
    },
    /// The image is not a container image SoulBox can use.
    #[error("image `{image}` cannot be used: {reason}")]
    Unsupported {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// The registry answered with an error not covered above.
    #[error("registry `{registry}` failed to serve image `{image}`: {message}")]
    Registry {
        /// The image.
        image: String,
        /// The registry.
        registry: String,
        /// What it said.
        message: String,
    },
    /// The HTTP client could not be made (its TLS setup failed).
    #[error("cannot make an HTTP client for registries: {cause}")]
    Client {
        /// Why.
        cause: String,
    },
    /// A layer could not be stored, or does not have the content its image declares.
    #[error("storing image `{image}`: {source}")]
    Store {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: ImageError,
    },
}

/// Pulls `reference` (e.g. `busybox`, `library/debian:12`, `127.0.0.1:5000/team/app:v1`,
/// `name@sha256:...`) into `store`; `insecure` lists registries (`host:port`) spoken to over
/// plain HTTP. `progress` hears one line per layer, as it is done.
///
/// Every other registry is spoken to over HTTPS with its certificate verified against the
/// system's roots. Of an image index (a multi-platform image), the Linux image for the host's
/// architecture is pulled.
pub async fn pull(
    store: &LayerStore,
    reference: &str,
    auth: &RegistryAuth,
    insecure: &[String],
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<StoredImage, RegistryError> {
    let parsed = Reference::try_from(reference).map_err(|e| RegistryError::BadReference {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })?;
    let target = Target::new(&parsed, auth);
    // `Client::new` would fall back to a default configuration (HTTPS everywhere) on error.
    let client = Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
        platform_resolver: Some(Box::new(host_platform_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..ClientConfig::default()
    })
    .map_err(|e| RegistryError::Client { cause: error_chain(&e) })?;
    // Logging in first keeps a token server's own reason for a refusal (the pull alone would
    // report only the registry's 401).
    client
        .auth(&parsed, &auth.to_client(), oci_client::RegistryOperation::Pull)
        .await
        .map_err(|e| target.error(e))?;
    let (manifest, _digest) = client
        .pull_image_manifest(&parsed, &auth.to_client())
        .await
        .map_err(|e| target.error(e))?;
    let config_bytes = pull_config(&client, &parsed, &manifest.config, &target).await?;
    let (diff_ids, config) = read_config(&config_bytes).map_err(|e| target.store(e))?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(target.unsupported(format!(
            "its manifest lists {} layers, its configuration {}",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    if let Some(layer) = manifest.layers.iter().find(|l| !is_image_layer(&l.media_type)) {
        return Err(target.unsupported(format!(
            "layer {} has media type `{}`, not a container image layer",
            layer.digest, layer.media_type
        )));
    }
    let count = diff_ids.len();
    for (i, (diff_id, layer)) in diff_ids.iter().zip(&manifest.layers).enumerate() {
        let done = if store.contains(diff_id) {
            "stored"
        } else {
            pull_layer(&client, &parsed, store, layer, diff_id, &target).await?;
            "pulled"
        };
        progress(&format!("layer {}/{count}: {diff_id} ({done})", i + 1));
    }
    Ok(StoredImage { layers: diff_ids, config })
}

/// The image's configuration, read whole (it is small) and checked against its digest.
async fn pull_config(
    client: &Client,
    reference: &Reference,
    descriptor: &OciDescriptor,
    target: &Target,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = || {
        target.unsupported(format!(
            "its configuration is larger than {MAX_CONFIG_BYTES} bytes, SoulBox's limit"
        ))
    };
    if usize::try_from(descriptor.size).map_or(true, |size| size > MAX_CONFIG_BYTES) {
        return Err(too_large());
    }
    let mut stream =
        client.pull_blob_stream(reference, descriptor).await.map_err(|e| target.error(e))?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.stream.next().await {
        let chunk =
            chunk.map_err(|e| target.registry(format!("reading its configuration: {e}")))?;
        if bytes.len() + chunk.len() > MAX_CONFIG_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = sha256_digest(&bytes);
    if descriptor.digest.starts_with("sha256:") && !actual.eq_ignore_ascii_case(&descriptor.digest)
    {
        return Err(target
            .store(ImageError::DigestMismatch { declared: descriptor.digest.clone(), actual }));
    }
    Ok(bytes)
}

/// Downloads `layer` to a file under the store's `tmp/` (checked against the manifest's
/// digest as it is written), then unpacks it into the store as `diff_id`.
async fn pull_layer(
    client: &Client,
    reference: &Reference,
    store: &LayerStore,
    layer: &OciDescriptor,
    diff_id: &str,
    target: &Target,
) -> Result<(), RegistryError> {
    let download = Download::new(store, diff_id).map_err(|e| target.store(e))?;
    let path = download.dir.join("blob");
    let file = tokio::fs::File::create(&path)
        .await
        .map_err(|source| target.store(io_error(format!("creating {}", path.display()), source)))?;
    client.pull_blob(reference, layer, file).await.map_err(|e| match e {
        OciDistributionError::IoError(source) => target.store(io_error(
            format!("writing layer {} to {}", layer.digest, path.display()),
            source,
        )),
        other => target.error(other),
    })?;
    let file = fs::File::open(&path)
        .map_err(|source| target.store(io_error(format!("opening {}", path.display()), source)))?;
    let store = store.clone();
    let declared = diff_id.to_owned();
    let imported =
        tokio::task::spawn_blocking(move || store.import(file, Some(&declared))).await.map_err(
            |e| target.store(io_error(format!("unpacking layer {diff_id}"), io::Error::other(e))),
        )?;
    imported.map_err(|e| target.store(e))?;
    Ok(())
}

fn io_error(what: String, source: io::Error) -> ImageError {
    ImageError::Io { what, source }
}

/// A directory for one download, `<store>/tmp/pull-<pid>-<n>`, removed when dropped (a store
/// also empties its `tmp/` when opened, for downloads a crash left behind).
struct Download {
    dir: PathBuf,
}

impl Download {
    fn new(store: &LayerStore, diff_id: &str) -> Result<Self, ImageError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A layer's directory is `<store>/sha256/<hex>`.
        let layer = store.path(diff_id)?;
        let root = layer.parent().and_then(Path::parent).ok_or_else(|| {
            ImageError::Format(format!("the store has no root above {}", layer.display()))
        })?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = root.join("tmp").join(format!("pull-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)
            .map_err(|source| io_error(format!("creating {}", dir.display()), source))?;
        Ok(Self { dir })
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `media_type` is one of the OCI or Docker layer tarballs (plain, gzip, zstd).
fn is_image_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// The host's architecture as image indexes name it (`amd64` for x86_64, `arm64` for
/// aarch64).
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Of an image index, the first entry for Linux on the host's architecture.
fn host_platform_resolver(entries: &[ImageIndexEntry]) -> Option<String> {
    let architecture = Arch::from(host_architecture());
    entries
        .iter()
        .find(|entry| {
            entry
                .platform
                .as_ref()
                .is_some_and(|p| p.os == Os::Linux && p.architecture == architecture)
        })
        .map(|entry| entry.digest.clone())
}

/// What is being pulled, to name in errors.
struct Target {
    /// `host[:port]`.
    registry: String,
    /// `repository:tag` or `repository@digest`.
    image: String,
    anonymous: bool,
}

impl Target {
    fn new(reference: &Reference, auth: &RegistryAuth) -> Self {
        let mut image = reference.repository().to_owned();
        if let Some(tag) = reference.tag() {
            image = format!("{image}:{tag}");
        }
        if let Some(digest) = reference.digest() {
            image = format!("{image}@{digest}");
        }
        Self {
            registry: reference.registry().to_owned(),
            image,
            anonymous: *auth == RegistryAuth::Anonymous,
        }
    }

    fn store(&self, source: ImageError) -> RegistryError {
        RegistryError::Store { image: self.image.clone(), source }
    }

    fn unsupported(&self, reason: String) -> RegistryError {
        RegistryError::Unsupported { image: self.image.clone(), reason }
    }

    fn registry(&self, message: String) -> RegistryError {
        RegistryError::Registry {
            image: self.image.clone(),
            registry: self.registry.clone(),
            message,
        }
    }

    fn not_found(&self) -> RegistryError {
        RegistryError::NotFound { image: self.image.clone(), registry: self.registry.clone() }
    }

    fn refused(&self, cause: String) -> RegistryError {
        let (image, registry) = (self.image.clone(), self.registry.clone());
        if self.anonymous {
            RegistryError::CredentialsRequired { image, registry, cause }
        } else {
            RegistryError::CredentialsRefused { image, registry, cause }
        }
    }

    /// What an error of `oci-client` means for this pull.
    fn error(&self, error: OciDistributionError) -> RegistryError {
        use OciDistributionError as E;
        match error {
            E::RequestError(e) if e.is_connect() || e.is_timeout() => RegistryError::Unreachable {
                registry: self.registry.clone(),
                cause: error_chain(&e),
            },
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => {
                self.refused(error.to_string())
            }
            E::RegistryError { envelope, .. } => {
                let has = |codes: &[OciErrorCode]| {
                    envelope.errors.iter().any(|e| codes.contains(&e.code))
                };
                if has(&[
                    OciErrorCode::ManifestUnknown,
                    OciErrorCode::NameUnknown,
                    OciErrorCode::NotFound,
                    OciErrorCode::BlobUnknown,
                ]) {
                    self.not_found()
                } else if has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]) {
                    self.refused(envelope.to_string())
                } else {
                    self.registry(envelope.to_string())
                }
            }
            E::ServerError { code: 404, .. } => self.not_found(),
            E::ServerError { code: 401 | 403, message, .. } => self.refused(message),
            E::ImageManifestNotFoundError(_) => RegistryError::NoPlatform {
                image: self.image.clone(),
                registry: self.registry.clone(),
                platform: format!("linux/{}", host_architecture()),
            },
            E::DigestError(DigestError::VerificationError { expected, actual }) => {
                self.store(ImageError::DigestMismatch { declared: expected, actual })
            }
            E::UnsupportedSchemaVersionError(_)
            | E::UnsupportedMediaTypeError(_)
            | E::ManifestParsingError(_)
            | E::VersionedParsingError(_) => self.unsupported(format!(
                "its manifest is neither an OCI nor a Docker schema 2 image ({error})"
            )),
            other => self.registry(error_chain(&other)),
        }
    }
}

/// An error and its causes, `outer: inner: innermost`, each said once.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = cause.source();
    }
    text
}
