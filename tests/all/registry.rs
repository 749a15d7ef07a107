//! Pulling images from a registry (`native-fallback/src/registry.rs`) against a real one:
//! Debian's `docker-registry` serving on a free loopback port, with images pushed to it by
//! `skopeo` from the busybox OCI layout of `soulbox_tests::busybox_image`.

use std::fs;
use std::path::Path;
use std::process::Command;

use soulbox_native::image::{LayerStore, StoredImage, import_oci_layout, sha256_digest};
use soulbox_native::registry::{RegistryAuth, RegistryError, pull};
use soulbox_tests::{REGISTRY_PASSWORD, REGISTRY_USER, Registry, free_port, registry_with_busybox};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The manifest of `image` (`repository:tag`) with `accept`: its bytes and content type.
async fn manifest(
    registry: &Registry,
    repository: &str,
    tag: &str,
    accept: &str,
) -> (Vec<u8>, String) {
    let url = format!("http://{}/v2/{repository}/manifests/{tag}", registry.address);
    let (status, headers, body) =
        soulbox_tests::http_request_with("GET", &url, &[("accept", accept)], None).await;
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    let content_type =
        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (body, content_type)
}

/// Stores the image index `index` as `repository:tag`.
async fn put_index(registry: &Registry, repository: &str, tag: &str, index: &serde_json::Value) {
    let url = format!("http://{}/v2/{repository}/manifests/{tag}", registry.address);
    let body = serde_json::to_vec(index).expect("json");
    let (status, _, answer) =
        soulbox_tests::http_request_with("PUT", &url, &[("content-type", OCI_INDEX)], Some(body))
            .await;
    assert_eq!(status, 201, "PUT {url}: {}", String::from_utf8_lossy(&answer));
}

/// The image as the OCI layout itself imports it, in a store of its own.
fn imported_from_layout(layout: &Path) -> StoredImage {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LayerStore::open(dir.path()).expect("store");
    import_oci_layout(&store, layout, Some("latest"), &mut |_| {}).expect("the layout imports")
}

/// Pulls `reference` anonymously from `registry` into `store`; the result and the progress.
async fn pull_from(
    registry: &Registry,
    store: &LayerStore,
    reference: &str,
) -> (Result<StoredImage, RegistryError>, Vec<String>) {
    let mut lines = Vec::new();
    let result = pull(
        store,
        &registry.reference(reference),
        &RegistryAuth::Anonymous,
        &registry.insecure(),
        &mut |line: &str| lines.push(line.to_owned()),
    )
    .await;
    (result, lines)
}

/// The host's architecture as image indexes name it.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[tokio::test]
async fn a_pushed_image_pulls_as_its_layout_imports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((registry, layout)) = registry_with_busybox(dir.path(), false).await else { return };
    let store = LayerStore::open(dir.path().join("store")).expect("store");

    let (pulled, progress) = pull_from(&registry, &store, "tests/busybox:latest").await;
    let pulled = pulled.expect("the image pulls");
    let expected = imported_from_layout(&layout);
    assert_eq!(pulled.layers, expected.layers);
    assert_eq!(pulled.config, expected.config);
    assert_eq!(pulled.config.env_value("PATH"), Some("/bin"));
    assert!(pulled.layers.iter().all(|layer| store.contains(layer)), "layers stored");
    let busybox = store.path(&pulled.layers[0]).expect("path").join("bin/busybox");
    assert!(busybox.is_file(), "the layer is unpacked: {}", busybox.display());
    assert_eq!(progress.len(), pulled.layers.len(), "one line per layer: {progress:?}");
    assert!(progress.iter().all(|line| line.ends_with("(pulled)")), "{progress:?}");
    assert!(progress[0].starts_with("layer 1/1: sha256:"), "{progress:?}");
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("store/tmp")).expect("tmp").collect();
    assert!(leftovers.is_empty(), "downloads are removed: {leftovers:?}");

    // Layers are shared: a second pull downloads nothing.
    let (again, progress) = pull_from(&registry, &store, "tests/busybox:latest").await;
    assert_eq!(again.expect("the image pulls again"), pulled);
    assert!(progress.iter().all(|line| line.ends_with("(stored)")), "{progress:?}");
}

#[tokio::test]
async fn a_docker_schema_2_image_pulls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((registry, layout)) = registry_with_busybox(dir.path(), false).await else { return };
    registry.push(&layout, "tests/busybox:docker", &["--format=v2s2"]);
    let (_, content_type) = manifest(&registry, "tests/busybox", "docker", DOCKER_MANIFEST).await;
    assert_eq!(content_type, DOCKER_MANIFEST, "the registry holds a Docker schema 2 manifest");

    let store = LayerStore::open(dir.path().join("store")).expect("store");
    let (pulled, _) = pull_from(&registry, &store, "tests/busybox:docker").await;
    let pulled = pulled.expect("the image pulls");
    let expected = imported_from_layout(&layout);
    assert_eq!(pulled.layers, expected.layers);
    assert_eq!(pulled.config.env_value("PATH"), Some("/bin"));
}

#[tokio::test]
async fn an_image_index_resolves_to_the_hosts_platform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((registry, layout)) = registry_with_busybox(dir.path(), false).await else { return };
    // A second image, told apart by its configuration, stands for the other platforms.
    let other = dir.path().join("other-oci");
    let copied = Command::new("cp").arg("-a").arg(&layout).arg(&other).status().expect("cp");
    assert!(copied.success());
    let image = format!("{}:latest", other.display());
    let configured = Command::new("umoci")
        .args(["config", "--image", &image, "--config.env", "MARKER=other-platform"])
        .status()
        .expect("umoci");
    assert!(configured.success());
    registry.push(&other, "tests/busybox:other", &[]);

    let entry = |tag_manifest: &(Vec<u8>, String), os: &str, architecture: &str| {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": sha256_digest(&tag_manifest.0),
            "size": tag_manifest.0.len(),
            "platform": { "architecture": architecture, "os": os },
        })
    };
    let host = host_architecture();
    let foreign = if host == "s390x" { "ppc64le" } else { "s390x" };
    let ours = manifest(&registry, "tests/busybox", "latest", OCI_MANIFEST).await;
    let theirs = manifest(&registry, "tests/busybox", "other", OCI_MANIFEST).await;
    let index = |entries: Vec<serde_json::Value>| serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries });
    // The host's entry comes last, after one for another architecture and one for Windows.
    let multi = index(vec![
        entry(&theirs, "linux", foreign),
        entry(&theirs, "windows", host),
        entry(&ours, "linux", host),
    ]);
    put_index(&registry, "tests/busybox", "multi", &multi).await;
    put_index(
        &registry,
        "tests/busybox",
        "foreign",
        &index(vec![entry(&theirs, "linux", foreign)]),
    )
    .await;

    let store = LayerStore::open(dir.path().join("store")).expect("store");
    let (pulled, _) = pull_from(&registry, &store, "tests/busybox:multi").await;
    let pulled = pulled.expect("the image pulls");
    assert_eq!(pulled.config.env_value("MARKER"), None, "the host's image was chosen");
    assert_eq!(pulled.config.env_value("PATH"), Some("/bin"));
    assert_eq!(pulled.layers, imported_from_layout(&layout).layers);

    let (refused, _) = pull_from(&registry, &store, "tests/busybox:foreign").await;
    let error = refused.expect_err("no image for this host");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::NoPlatform { .. }), "{error:?}");
    assert!(message.contains(&format!("linux/{host}")), "{message}");
    assert!(message.contains("tests/busybox:foreign"), "{message}");
}

#[tokio::test]
async fn missing_images_are_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((registry, _layout)) = registry_with_busybox(dir.path(), false).await else { return };
    let store = LayerStore::open(dir.path().join("store")).expect("store");
    for image in ["tests/busybox:no-such-tag", "tests/no-such-repository:latest"] {
        let (result, _) = pull_from(&registry, &store, image).await;
        let error = result.expect_err("nothing to pull");
        let message = error.to_string();
        assert!(matches!(error, RegistryError::NotFound { .. }), "{error:?}");
        let expected = format!("image `{image}` not found in registry `{}`", registry.address);
        assert!(message.contains(&expected), "{message}");
    }
}

#[tokio::test]
async fn an_unreachable_registry_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LayerStore::open(dir.path()).expect("store");
    let address = format!("127.0.0.1:{}", free_port());
    let result = pull(
        &store,
        &format!("{address}/tests/busybox:latest"),
        &RegistryAuth::Anonymous,
        std::slice::from_ref(&address),
        &mut |_| {},
    )
    .await;
    let error = result.expect_err("nothing listens");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::Unreachable { .. }), "{error:?}");
    assert!(message.contains(&format!("cannot reach registry `{address}`")), "{message}");
    assert!(message.contains("Connection refused"), "the cause is said: {message}");
    assert!(message.contains("check the registry's address"), "{message}");
}

#[tokio::test]
async fn a_plain_http_registry_not_listed_insecure_is_unreachable() {
    let Some(registry) = Registry::start(false).await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LayerStore::open(dir.path()).expect("store");
    let result = pull(
        &store,
        &registry.reference("tests/busybox:latest"),
        &RegistryAuth::Anonymous,
        &[],
        &mut |_| {},
    )
    .await;
    let error = result.expect_err("HTTPS to a plain HTTP registry");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::Unreachable { .. }), "{error:?}");
    assert!(message.contains("must be listed as insecure"), "{message}");
}

#[tokio::test]
async fn a_malformed_reference_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LayerStore::open(dir.path()).expect("store");
    for reference in ["", "Not A Reference!", "Busybox:latest", "busybox@sha256:abc", "busybox:"] {
        let result = pull(&store, reference, &RegistryAuth::Anonymous, &[], &mut |_| {}).await;
        let error = result.expect_err("a bad reference");
        let message = error.to_string();
        assert!(matches!(error, RegistryError::BadReference { .. }), "{reference}: {error:?}");
        assert!(message.contains(&format!("`{reference}` is not an image reference")), "{message}");
    }
}

#[tokio::test]
async fn registry_credentials_are_required_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((registry, layout)) = registry_with_busybox(dir.path(), true).await else { return };
    let store = LayerStore::open(dir.path().join("store")).expect("store");
    let reference = registry.reference("tests/busybox:latest");
    let pull_as = |auth: RegistryAuth| {
        let (store, reference, insecure) = (store.clone(), reference.clone(), registry.insecure());
        async move { pull(&store, &reference, &auth, &insecure, &mut |_| {}).await }
    };

    let error = pull_as(RegistryAuth::Anonymous).await.expect_err("credentials required");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::CredentialsRequired { .. }), "{error:?}");
    assert!(message.contains("give a user name and password"), "{message}");

    let wrong = RegistryAuth::Basic {
        username: REGISTRY_USER.to_owned(),
        password: "not-the-password".to_owned(),
    };
    let error = pull_as(wrong).await.expect_err("wrong password");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::CredentialsRefused { .. }), "{error:?}");
    assert!(message.contains("check the user name and password"), "{message}");
    assert!(!message.contains("not-the-password"), "the password is never shown: {message}");

    let right = RegistryAuth::Basic {
        username: REGISTRY_USER.to_owned(),
        password: REGISTRY_PASSWORD.to_owned(),
    };
    assert!(!format!("{right:?}").contains(REGISTRY_PASSWORD), "Debug hides the password");
    let pulled = pull_as(right).await.expect("the image pulls with credentials");
    assert_eq!(pulled.layers, imported_from_layout(&layout).layers);
}
