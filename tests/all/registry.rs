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

/// The service a token-mode registry names in its challenge, and the audience of its tokens.
const TOKEN_SERVICE: &str = "soulbox-tests";
/// The issuer a token-mode registry trusts.
const TOKEN_ISSUER: &str = "soulbox-test-issuer";
/// How long the token server's tokens last.
const TOKEN_LIFETIME_SECS: u64 = 300;
/// The one repository the token server lets anyone pull, as a public image on Docker Hub.
const PUBLIC_REPOSITORY: &str = "tests/public";
/// How long pushing the busybox image with `skopeo` may take.
const PUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One request the token server answered.
#[derive(Debug, Clone)]
struct TokenRequest {
    /// The `service` asked for.
    service: Option<String>,
    /// The `scope`s asked for (`repository:NAME:ACTIONS`).
    scopes: Vec<String>,
    /// The user of the Basic credentials sent, if any.
    user: Option<String>,
    /// Whether a token was issued.
    granted: bool,
}

/// A token server as Docker Hub's: it issues JWTs signed with an EC P-256 key whose
/// self-signed certificate rides in the `x5c` header. The holder of [`REGISTRY_USER`]'s
/// credentials gets every action it asks for; anyone else may only pull [`PUBLIC_REPOSITORY`];
/// every other request is answered 401, wrong credentials included.
struct TokenIssuer {
    key: jsonwebtoken::EncodingKey,
    /// The certificate, base64 (standard) of its DER.
    certificate: String,
    next_id: std::sync::atomic::AtomicU64,
    requests: std::sync::Mutex<Vec<TokenRequest>>,
}

impl TokenIssuer {
    /// The answer to one request for `/token`.
    fn answer(&self, request: &hyper::Request<hyper::body::Incoming>) -> (u16, serde_json::Value) {
        use base64::Engine;
        if request.uri().path() != "/token" {
            return (404, serde_json::json!({ "details": "no such path" }));
        }
        let query = query_pairs(request.uri().query().unwrap_or_default());
        let service = query.iter().find(|(name, _)| name == "service").map(|(_, v)| v.clone());
        let scopes: Vec<String> = query
            .iter()
            .filter(|(name, _)| name == "scope")
            .flat_map(|(_, value)| value.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .collect();
        let credentials = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Basic "))
            .and_then(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded).ok())
            .and_then(|decoded| String::from_utf8(decoded).ok())
            .and_then(|pair| pair.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
        let user = credentials.as_ref().map(|(user, _)| user.clone());
        let access: Option<Vec<serde_json::Value>> = match &credentials {
            Some((user, password)) if user == REGISTRY_USER && password == REGISTRY_PASSWORD => {
                scopes.iter().map(|scope| resource_access(scope, &["pull", "push"])).collect()
            }
            Some(_) => None,
            None => scopes
                .iter()
                .map(|scope| {
                    resource_access(scope, &["pull"])
                        .filter(|access| access["name"] == PUBLIC_REPOSITORY)
                })
                .collect(),
        };
        let granted = access.is_some() && service.as_deref() == Some(TOKEN_SERVICE);
        self.requests.lock().expect("requests").push(TokenRequest {
            service: service.clone(),
            scopes: scopes.clone(),
            user: user.clone(),
            granted,
        });
        let Some(access) = access.filter(|_| granted) else {
            return (401, serde_json::json!({ "details": "incorrect username or password" }));
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": user.unwrap_or_default(),
            "aud": TOKEN_SERVICE,
            "exp": now + TOKEN_LIFETIME_SECS,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("soulbox-test-{}-{id}", std::process::id()),
            "access": access,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![self.certificate.clone()]);
        let token = jsonwebtoken::encode(&header, &claims, &self.key).expect("a token");
        (
            200,
            serde_json::json!({ "token": token, "access_token": token, "expires_in": TOKEN_LIFETIME_SECS }),
        )
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().expect("requests").clone()
    }
}

/// The `access` claim entry granting of `scope` (`repository:NAME:ACTIONS`) the actions it
/// asks for among `allowed`; `None` when it is not a repository scope.
fn resource_access(scope: &str, allowed: &[&str]) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions.split(',').filter(|action| allowed.contains(action)).collect();
    (kind == "repository")
        .then(|| serde_json::json!({ "type": kind, "name": name, "actions": actions }))
}

/// The pairs of a URL's query, percent-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut decoded = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%')
                .then(|| bytes.get(i + 1..i + 3))
                .flatten()
                .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
            match (bytes[i], escaped) {
                (_, Some(byte)) => {
                    decoded.push(byte);
                    i += 3;
                }
                (b'+', None) => {
                    decoded.push(b' ');
                    i += 1;
                }
                (byte, None) => {
                    decoded.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&decoded).into_owned()
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

/// The token server, serving [`TokenIssuer`] on a loopback port until dropped.
struct TokenServer {
    issuer: std::sync::Arc<TokenIssuer>,
    /// `http://127.0.0.1:<port>/token`.
    realm: String,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    /// Serves tokens signed with the PKCS#8 PEM key `key`, whose certificate is `certificate`
    /// (DER).
    async fn start(key: &[u8], certificate: &[u8]) -> Self {
        use base64::Engine;
        let issuer = std::sync::Arc::new(TokenIssuer {
            key: jsonwebtoken::EncodingKey::from_ec_pem(key).expect("an EC key"),
            certificate: base64::engine::general_purpose::STANDARD.encode(certificate),
            next_id: std::sync::atomic::AtomicU64::new(0),
            requests: std::sync::Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let realm = format!("http://{}/token", listener.local_addr().expect("address"));
        let serving = issuer.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let issuer = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (status, body) = issuer.answer(&request);
                        let response = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())));
                        async move { response }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self { issuer, realm, task }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a `docker-registry` that trusts tokens of [`TOKEN_ISSUER`] for [`TOKEN_SERVICE`]
/// signed by the certificate of `root_certificate` (PEM) and sends clients to `realm` for
/// them; checks its challenge.
async fn token_registry(realm: &str, root_certificate: &Path) -> Registry {
    let auth = format!(
        "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
        root_certificate.display()
    );
    let registry = Registry::serve(tempfile::tempdir().expect("tempdir"), &auth).await;
    let url = format!("http://{}/v2/", registry.address);
    let (status, headers, _) = soulbox_tests::http_request_with("GET", &url, &[], None).await;
    assert_eq!(status, 401, "GET /v2/ asks for a token: {}", registry.log());
    let challenge = headers
        .get("www-authenticate")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let expected = format!("Bearer realm=\"{realm}\",service=\"{TOKEN_SERVICE}\"");
    assert_eq!(challenge, expected, "the registry's challenge");
    registry
}

/// Pushes the image tagged `latest` of `layout` as `image` with `skopeo`, which goes
/// through the token flow itself, as [`REGISTRY_USER`]. It runs without blocking: the
/// token server it asks is served by this test's runtime.
async fn push_with_token(registry: &Registry, layout: &Path, image: &str) {
    let mut skopeo = tokio::process::Command::new("skopeo");
    skopeo
        .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("--dest-creds={REGISTRY_USER}:{REGISTRY_PASSWORD}"))
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}/{image}", registry.address))
        .kill_on_drop(true);
    let output = tokio::time::timeout(PUSH_TIMEOUT, skopeo.output())
        .await
        .unwrap_or_else(|_| panic!("skopeo copy to {image} timed out: {}", registry.log()))
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo copy to {image} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        registry.log()
    );
}

/// An EC P-256 key (PKCS#8 PEM) and its self-signed certificate (PEM and DER) for the token
/// issuer, made with `openssl` in `dir`; `None`, the reason printed, without `openssl`.
fn issuer_key_and_certificate(dir: &Path) -> Option<(Vec<u8>, std::path::PathBuf, Vec<u8>)> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!(
            "SKIPPED: the token issuer's certificate is made with openssl (apt-get install openssl)"
        );
        return None;
    }
    let (key, pem, der) = (dir.join("issuer.key"), dir.join("issuer.pem"), dir.join("issuer.der"));
    let run = |openssl: &mut Command| {
        let output = openssl.output().expect("openssl runs");
        assert!(
            output.status.success(),
            "{openssl:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={TOKEN_ISSUER}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&pem));
    run(Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&der));
    Some((fs::read(&key).expect("key"), pem, fs::read(&der).expect("certificate")))
}

#[tokio::test]
async fn a_registry_that_asks_for_a_bearer_token_gets_one_from_its_token_server() {
    let registry_missing = !Path::new("/usr/bin/docker-registry").exists()
        || Command::new("skopeo").arg("--version").output().is_err();
    if registry_missing {
        eprintln!(
            "SKIPPED: registry tests need docker-registry and skopeo (apt-get install docker-registry skopeo)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((key, certificate_pem, certificate_der)) = issuer_key_and_certificate(dir.path())
    else {
        return;
    };
    let Some(layout) = soulbox_tests::busybox_image(dir.path()) else { return };
    let tokens = TokenServer::start(&key, &certificate_der).await;
    let registry = token_registry(&tokens.realm, &certificate_pem).await;
    push_with_token(&registry, &layout, "tests/busybox:latest").await;
    push_with_token(&registry, &layout, &format!("{PUBLIC_REPOSITORY}:latest")).await;
    let pushed = tokens.issuer.requests();
    assert!(
        pushed.iter().any(|r| r.granted
            && r.scopes
                .iter()
                .any(|s| s.starts_with("repository:tests/busybox:") && s.contains("push"))),
        "skopeo got a push token: {pushed:?}"
    );

    let store = LayerStore::open(dir.path().join("store")).expect("store");
    let insecure = vec![registry.address.clone()];
    let pull_as = |image: &str, auth: RegistryAuth| {
        let (store, insecure) = (store.clone(), insecure.clone());
        let reference = format!("{}/{image}", registry.address);
        async move { pull(&store, &reference, &auth, &insecure, &mut |_| {}).await }
    };
    let expected = imported_from_layout(&layout);

    // The holder of the credentials gets a token for the private repository and pulls.
    let right = RegistryAuth::Basic {
        username: REGISTRY_USER.to_owned(),
        password: REGISTRY_PASSWORD.to_owned(),
    };
    let before = tokens.issuer.requests().len();
    let pulled = pull_as("tests/busybox:latest", right)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", tokens.issuer.requests(), registry.log()));
    assert_eq!(pulled.layers, expected.layers);
    assert_eq!(pulled.config, expected.config);
    let asked = tokens.issuer.requests().split_off(before);
    assert!(
        asked.iter().any(|r| r.granted
            && r.user.as_deref() == Some(REGISTRY_USER)
            && r.service.as_deref() == Some(TOKEN_SERVICE)
            && r.scopes.iter().any(|s| s == "repository:tests/busybox:pull")),
        "the pull asked for a token for its repository with its credentials: {asked:?}"
    );

    // Anyone gets an anonymous token for the public repository.
    let store_public = LayerStore::open(dir.path().join("store-public")).expect("store");
    let reference = format!("{}/{PUBLIC_REPOSITORY}:latest", registry.address);
    let before = tokens.issuer.requests().len();
    let public = pull(&store_public, &reference, &RegistryAuth::Anonymous, &insecure, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", tokens.issuer.requests(), registry.log()));
    assert_eq!(public.layers, expected.layers);
    let asked = tokens.issuer.requests().split_off(before);
    assert!(
        asked.iter().any(|r| r.granted
            && r.user.is_none()
            && r.scopes.iter().any(|s| s == &format!("repository:{PUBLIC_REPOSITORY}:pull"))),
        "the anonymous pull got an anonymous token: {asked:?}"
    );

    // Without credentials, the private repository is refused a token, hence the image.
    let before = tokens.issuer.requests().len();
    let error =
        pull_as("tests/busybox:latest", RegistryAuth::Anonymous).await.expect_err("no token");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::CredentialsRequired { .. }), "{error:?}");
    assert!(message.contains("give a user name and password"), "{message}");
    let asked = tokens.issuer.requests().split_off(before);
    assert!(
        !asked.is_empty() && asked.iter().all(|r| !r.granted && r.user.is_none()),
        "an anonymous token was asked for and refused: {asked:?}"
    );

    // With a wrong password, likewise.
    let wrong = RegistryAuth::Basic {
        username: REGISTRY_USER.to_owned(),
        password: "not-the-password".to_owned(),
    };
    let before = tokens.issuer.requests().len();
    let error = pull_as("tests/busybox:latest", wrong).await.expect_err("wrong password");
    let message = error.to_string();
    assert!(matches!(error, RegistryError::CredentialsRefused { .. }), "{error:?}");
    assert!(message.contains("check the user name and password"), "{message}");
    assert!(
        message.contains("incorrect username or password"),
        "the token server's reason: {message}"
    );
    assert!(!message.contains("not-the-password"), "the password is never shown: {message}");
    let asked = tokens.issuer.requests().split_off(before);
    assert!(
        !asked.is_empty()
            && asked.iter().all(|r| !r.granted && r.user.as_deref() == Some(REGISTRY_USER)),
        "a token was asked for with the wrong password and refused: {asked:?}"
    );
}
