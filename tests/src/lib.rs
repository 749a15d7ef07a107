//! Shared set-up for SoulBox's end-to-end tests and benchmarks: one data directory with every
//! language pack installed, made once per machine and shared by every test process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use soulbox_native::{NativeBackend, NativeConfig, NativeTier};
use soulbox_runtime::{
    Dispatcher, ExecKind, ExecOutput, ExecRequest, Language, Sandbox, SandboxSpec,
};
use soulbox_wasm::WasmBackend;

/// The data directory the tests share: `$SOULBOX_TEST_DATA_DIR`, or `target/soulbox-test-data`.
pub fn test_data_dir() -> PathBuf {
    std::env::var_os("SOULBOX_TEST_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("soulbox-test-data")
    })
}

/// Installs every pack of the manifest into the shared data directory (once; later calls and
/// other processes find them installed), and returns a backend with all of them loaded.
pub async fn wasm_backend() -> Arc<WasmBackend> {
    static BACKEND: tokio::sync::OnceCell<Arc<WasmBackend>> = tokio::sync::OnceCell::const_new();
    BACKEND.get_or_init(install_all).await.clone()
}

async fn install_all() -> Arc<WasmBackend> {
    let data_dir = test_data_dir();
    let backend = WasmBackend::builder(&data_dir).build().expect("the wasm backend builds");
    for spec in soulbox_wasm::pack::manifest() {
        if backend.pack(&spec.language).is_none() {
            eprintln!("installing the {} pack into {} (once)", spec.language, data_dir.display());
            backend
                .install(spec, &soulbox_wasm::pack::NoProgress)
                .await
                .unwrap_or_else(|e| panic!("installing the {} pack: {e}", spec.language));
        }
    }
    Arc::new(backend)
}

/// A dispatcher with the WASM tier, and a fresh sandbox in a temporary directory.
pub async fn sandbox() -> (Dispatcher, Arc<Sandbox>, tempfile::TempDir) {
    let backend = wasm_backend().await;
    let root = tempfile::tempdir().expect("a temporary directory");
    let sandbox = Sandbox::create(root.path(), SandboxSpec::default()).expect("a sandbox");
    (Dispatcher::new().with_backend(backend), Arc::new(sandbox), root)
}

/// Runs a request to its end and gathers its output.
pub async fn run(
    dispatcher: &Dispatcher,
    sandbox: &Arc<Sandbox>,
    request: ExecRequest,
) -> ExecOutput {
    dispatcher.start(sandbox.clone(), request).expect("the request is dispatched").collect().await
}

/// The native tier, made once per test process; `None`, with the reason printed, on a machine
/// that cannot run it (CI machines here can: root, namespaces, cgroups).
pub fn native_backend() -> Option<Arc<NativeBackend>> {
    static BACKEND: OnceLock<Result<Arc<NativeBackend>, String>> = OnceLock::new();
    let backend = BACKEND.get_or_init(|| {
        let state = tempfile::tempdir().map_err(|e| e.to_string())?;
        let tier = NativeTier::new(NativeConfig::new(state.path())).map_err(|e| e.to_string())?;
        // The prepared /etc lives as long as the process.
        std::mem::forget(state);
        Ok(Arc::new(NativeBackend::new(tier)))
    });
    match backend {
        Ok(backend) => Some(backend.clone()),
        Err(reason) => {
            eprintln!("SKIPPED: the native tier is unavailable here: {reason}");
            None
        }
    }
}

/// A dispatcher with both tiers and a fresh sandbox, or `None` (printed) without the native
/// tier.
pub async fn native_sandbox() -> Option<(Dispatcher, Arc<Sandbox>, tempfile::TempDir)> {
    let native = native_backend()?;
    let (dispatcher, sandbox, dir) = sandbox().await;
    Some((dispatcher.with_backend(native), sandbox, dir))
}

/// A command execution (the native tier) with default limits.
pub fn command(argv: &[&str]) -> ExecRequest {
    let mut request = ExecRequest::cell(Language::parse("bash"), "");
    request.kind = ExecKind::Command { argv: argv.iter().map(|a| (*a).to_owned()).collect() };
    request
}

/// `bash -c script` as a command execution.
pub fn shell(script: &str) -> ExecRequest {
    command(&["bash", "-c", script])
}

/// The admin key of the default team that [`serve_with_manager`] registers.
pub const TEST_API_KEY: &str = "e2b_0000000000000000000000000000000000000000";

/// One HTTP request over a real socket, with [`TEST_API_KEY`]; its status, headers and body.
pub async fn http_request(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let headers = [("content-type", "application/json"), ("x-api-key", TEST_API_KEY)];
    http_request_with(method, url, &headers, body).await
}

/// A cell run through the code interpreter's `POST /execute` in sandbox `id` (with its access
/// token): the events it streamed, as JSON.
pub async fn execute_cell(base: &str, id: &str, token: &str, code: &str) -> Vec<serde_json::Value> {
    let headers = [
        ("e2b-sandbox-id", id),
        ("e2b-sandbox-port", "49999"),
        ("x-access-token", token),
        ("content-type", "application/json"),
        ("x-api-key", TEST_API_KEY),
    ];
    let body = serde_json::to_vec(&serde_json::json!({"code": code})).expect("json");
    let (status, _, bytes) =
        http_request_with("POST", &format!("{base}/execute"), &headers, Some(body)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    String::from_utf8_lossy(&bytes).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// One HTTP request over a real socket with these headers; its status, headers and body.
pub async fn http_request_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    http_request_from(None, method, url, headers, body).await
}

/// [`http_request_with`] from a chosen local address (any of 127.0.0.0/8 reaches a loopback
/// server), for what a server counts per client address.
pub async fn http_request_from(
    source: Option<std::net::IpAddr>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    let mut connector = HttpConnector::new();
    connector.set_local_address(source);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<bytes::Bytes>>(connector);
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request =
        request.body(Full::new(bytes::Bytes::from(body.unwrap_or_default()))).expect("request");
    let response = client.request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    (status, headers, body)
}

/// `message` in a Connect protocol envelope (flags 0, the length big-endian, the JSON), as
/// a streaming call of envd takes it.
pub fn connect_envelope(message: &serde_json::Value) -> Vec<u8> {
    let payload = serde_json::to_vec(message).expect("json");
    let mut envelope = vec![0u8];
    envelope.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    envelope.extend_from_slice(&payload);
    envelope
}

/// `soulbox serve` with its sandbox manager, in this process, on an ephemeral local port, with
/// the shared packs, a directory of its own for its sandboxes and store, and
/// [`TEST_API_KEY`] as an admin key; its base URL.
pub async fn serve_with_manager() -> (String, tempfile::TempDir) {
    let (base, data, _app) = serve_app().await;
    (base, data)
}

/// [`serve_with_manager`], also giving the server's `App` (to reach its keys directly).
pub async fn serve_app() -> (String, tempfile::TempDir, soulbox_host::app::App) {
    serve_configured(|app| app).await
}

/// [`serve_app`] with the app configured by `configure` before it serves.
pub async fn serve_configured(
    configure: impl FnOnce(soulbox_host::app::App) -> soulbox_host::app::App,
) -> (String, tempfile::TempDir, soulbox_host::app::App) {
    serve_setup(configure, ServerSetup::default()).await
}

/// How a test server differs from the default one.
#[derive(Debug, Default)]
pub struct ServerSetup {
    /// Its connection limits.
    pub limits: soulbox_host::server::ConnectionLimits,
    /// Its WASM kernel slots (the default when `None`).
    pub max_kernels: Option<u32>,
}

/// [`serve_configured`] set up as `setup` says.
pub async fn serve_setup(
    configure: impl FnOnce(soulbox_host::app::App) -> soulbox_host::app::App,
    setup: ServerSetup,
) -> (String, tempfile::TempDir, soulbox_host::app::App) {
    // The packs come from the shared data directory; the sandboxes live in a fresh one.
    wasm_backend().await;
    let data = tempfile::tempdir().expect("tempdir");
    let max_kernels = setup.max_kernels.unwrap_or(soulbox_host::app::DEFAULT_MAX_KERNELS);
    let limits = setup.limits;
    let app = soulbox_host::app::App::open_serving(&test_data_dir(), max_kernels, wasm_workers())
        .expect("app")
        .with_manager(data.path())
        .expect("manager");
    let keys = app.keys().expect("a server has keys");
    keys.register(
        TEST_API_KEY,
        soulbox_host::auth::DEFAULT_TEAM,
        soulbox_host::auth::Role::Admin,
        "tests",
    )
    .expect("the test key");
    let app = configure(app);
    // As `soulbox serve` does: the pools of prepared sandboxes and warm kernels fill.
    app.warm();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let address = listener.local_addr().expect("address");
    let served = app.clone();
    tokio::spawn(async move { soulbox_host::server::serve_with(listener, served, limits).await });
    (format!("http://{address}"), data, app)
}

/// The `soulbox` binary that `cargo test --workspace` builds beside the test executables.
pub fn soulbox_binary() -> Option<PathBuf> {
    // A test runs as target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().ok()?;
    let binary = exe.parent()?.parent()?.join("soulbox");
    binary.is_file().then_some(binary)
}

/// The process ids of the WASM workers of `soulbox serve` with process id `server`: its
/// children running `soulbox wasm-worker`, in order.
pub fn wasm_worker_pids(server: u32) -> Vec<u32> {
    // Each thread lists the children it started.
    let Ok(threads) = std::fs::read_dir(format!("/proc/{server}/task")) else { return Vec::new() };
    let mut workers: Vec<u32> = threads
        .filter_map(Result::ok)
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("children")).ok())
        .flat_map(|children| {
            children.split_whitespace().filter_map(|c| c.parse().ok()).collect::<Vec<u32>>()
        })
        .filter(|child| {
            std::fs::read(format!("/proc/{child}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("wasm-worker"))
        })
        .collect();
    workers.sort_unstable();
    workers
}

/// The WASM workers of a test server, as `soulbox serve` has them (two, whatever the CPUs):
/// `None`, with the reason printed once, when the `soulbox` binary is not built (run the
/// tests with `cargo test --workspace`), or when `SOULBOX_TEST_WASM_WORKERS=0` asks for
/// kernels on the server's threads.
pub fn wasm_workers() -> Option<soulbox_host::app::WasmWorkers> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if std::env::var("SOULBOX_TEST_WASM_WORKERS").is_ok_and(|v| v == "0") {
        return None;
    }
    let Some(soulbox_binary) = soulbox_binary() else {
        WARNED.call_once(|| {
            eprintln!(
                "note: no target/<profile>/soulbox (build it with `cargo test --workspace`): \
                 test servers run WASM kernels on their own threads, not in workers"
            );
        });
        return None;
    };
    Some(soulbox_host::app::WasmWorkers { count: 2, soulbox_binary })
}

/// A small OCI image layout at `dir`, tagged `latest`: Debian's static busybox with its
/// applets as links in `/bin`, the host's `/bin/bash` with the libraries it links (the E2B
/// SDK runs commands with `/bin/bash`), an `/etc/passwd`, `PATH=/bin`. Made with `umoci`, as a user
/// would pack a base image by hand. `None`, with the reason printed, when `umoci` or
/// `busybox-static` is missing (`.ci/run` installs both).
pub fn busybox_image(dir: &Path) -> Option<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    let umoci_missing = std::process::Command::new("umoci").arg("--version").output().is_err();
    if umoci_missing || !busybox.exists() {
        eprintln!(
            "SKIPPED: making a base image needs umoci and busybox-static (apt-get install umoci busybox-static)"
        );
        return None;
    }
    let layout = dir.join("busybox-oci");
    let bundle = dir.join("busybox-bundle");
    let umoci = |args: &[&str]| {
        let status = std::process::Command::new("umoci").args(args).status().expect("umoci runs");
        assert!(status.success(), "umoci {args:?} failed");
    };
    let image = format!("{}:latest", layout.display());
    umoci(&["init", "--layout", &layout.to_string_lossy()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, &bundle.to_string_lossy()]);
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("bin");
    std::fs::create_dir_all(rootfs.join("etc")).expect("etc");
    std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let applets = std::process::Command::new(busybox).arg("--list").output().expect("applets");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("link");
        }
    }
    std::fs::remove_file(rootfs.join("bin/bash")).ok();
    std::fs::copy("/bin/bash", rootfs.join("bin/bash")).expect("copy bash");
    let linked = std::process::Command::new("ldd").arg("/bin/bash").output().expect("ldd");
    for library in String::from_utf8_lossy(&linked.stdout).split_whitespace() {
        if library.starts_with('/') {
            let inside = rootfs.join(library.trim_start_matches('/'));
            std::fs::create_dir_all(inside.parent().expect("a parent")).expect("lib dir");
            std::fs::copy(library, &inside).expect("copy a library");
        }
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .expect("passwd");
    umoci(&["repack", "--image", &image, &bundle.to_string_lossy()]);
    umoci(&["config", "--image", &image, "--config.env", "PATH=/bin", "--config.cmd", "/bin/sh"]);
    Some(layout)
}

/// A Dockerfile from `from` that uses every instruction a template build runs: `ARG`, `ENV`
/// (with substitution), `WORKDIR`, `COPY` (with `--chown`), `RUN` as root (writing, deleting
/// a base file, filling the user's home) and as the user, `CMD` as the start command. Its
/// context is [`write_template_context`]'s.
pub fn template_dockerfile(from: &str) -> String {
    format!(
        r#"FROM {from}
ARG GREETING=hello
ENV APP_HOME=/app MESSAGE="$GREETING world"
WORKDIR $APP_HOME
COPY greeting.txt ./
COPY --chown=user conf/ ./conf/
RUN echo "$MESSAGE" > /app/out.txt && rm /bin/vi && mkdir -p /home/user/.cache && echo kept > /home/user/.cache/x && chown -R 1000:1000 /home/user/.cache
USER user
RUN id -u > /home/user/uid.txt && ls -ln /app/conf/settings.ini > /home/user/owner.txt
CMD ["/bin/sh", "-c", "echo started > /home/user/started"]
"#
    )
}

/// Writes the files [`template_dockerfile`] copies into `context`.
pub fn write_template_context(context: &Path) {
    std::fs::write(context.join("greeting.txt"), "hi from the context\n").expect("write");
    std::fs::create_dir_all(context.join("conf")).expect("conf");
    std::fs::write(context.join("conf/settings.ini"), "a=1\n").expect("write");
}

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
/// How long a registry may take to answer its first request.
const REGISTRY_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// The user of the registries that ask for credentials.
pub const REGISTRY_USER: &str = "soulbox";
/// Its password.
pub const REGISTRY_PASSWORD: &str = "registry-secret";
/// The registry's htpasswd line for [`REGISTRY_USER`]: the bcrypt hash (cost 4) of [`REGISTRY_PASSWORD`],
/// made once (`crypt.crypt` with `METHOD_BLOWFISH`), so that the test needs no htpasswd tool.
const HTPASSWD: &str = "soulbox:$2b$04$Vu5QTy/45l8rlhcbEKyBUOXgMy6yFJMj6IYgwV5c6GO5s0URW10JW";

/// A `docker-registry` serving on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: std::process::Child,
    /// `127.0.0.1:<port>`.
    pub address: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry, asking for [`REGISTRY_USER`]'s credentials when `with_auth`. `None`, with the
    /// reason printed, when `docker-registry` or `skopeo` is missing.
    pub async fn start(with_auth: bool) -> Option<Self> {
        let skopeo_missing =
            std::process::Command::new("skopeo").arg("--version").output().is_err();
        if skopeo_missing || !Path::new(REGISTRY_BINARY).exists() {
            eprintln!(
                "SKIPPED: registry tests need docker-registry and skopeo (apt-get install docker-registry skopeo)"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = if with_auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{HTPASSWD}\n")).expect("htpasswd");
            format!(
                "auth:\n  htpasswd:\n    realm: soulbox-tests\n    path: {}\n",
                htpasswd.display()
            )
        } else {
            String::new()
        };
        Some(Self::serve(dir, &auth).await)
    }

    /// Starts a registry keeping its files in `dir`, with `auth` (the `auth:` section of its
    /// configuration, or nothing), and waits until it answers.
    pub async fn serve(dir: tempfile::TempDir, auth: &str) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n{auth}",
                dir.path().join("storage").display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = std::process::Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let mut registry = Self { child, address, dir };
        registry.wait_ready().await;
        registry
    }

    /// Waits until `GET /v2/` answers (200, or 401 when it asks for credentials).
    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + REGISTRY_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("registry status") {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            if tokio::net::TcpStream::connect(&self.address).await.is_ok() {
                let url = format!("http://{}/v2/", self.address);
                let (status, _, _) = crate::http_request_with("GET", &url, &[], None).await;
                assert!(status == 200 || status == 401, "GET /v2/ answered {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not start: {}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The full reference of `image` (`repository:tag`) in this registry.
    pub fn reference(&self, image: &str) -> String {
        format!("{}/{image}", self.address)
    }

    /// The registries to speak plain HTTP to: this one.
    pub fn insecure(&self) -> Vec<String> {
        vec![self.address.clone()]
    }

    /// Pushes the image tagged `latest` of the OCI layout `layout` as `image`, with `skopeo`
    /// (`extra` are more of its `copy` options).
    pub fn push(&self, layout: &Path, image: &str, extra: &[&str]) {
        let output = std::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}", self.reference(image)))
            .output()
            .expect("skopeo runs");
        assert!(
            output.status.success(),
            "skopeo copy to {image} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on (at the moment it is returned).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// A registry holding the busybox image as `tests/busybox:latest`, and that image's OCI
/// layout; `None` (the reason printed) when a tool is missing.
pub async fn registry_with_busybox(dir: &Path, with_auth: bool) -> Option<(Registry, PathBuf)> {
    let registry = Registry::start(with_auth).await?;
    let layout = crate::busybox_image(dir)?;
    let credentials = format!("--dest-creds={REGISTRY_USER}:{REGISTRY_PASSWORD}");
    let extra: &[&str] = if with_auth { &[&credentials] } else { &[] };
    registry.push(&layout, "tests/busybox:latest", extra);
    Some((registry, layout))
}

/// Builds a template on the server at `base` with `POST /v1/templates/build?{query}`, the
/// directory `context` sent as a gzip tar; the status and the build's events.
pub async fn build_template(
    base: &str,
    context: &Path,
    query: &str,
) -> (u16, Vec<serde_json::Value>) {
    let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gzip);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", context).expect("pack the context");
    let packed = tar.into_inner().expect("tar").finish().expect("gzip");
    let url = format!("{base}/v1/templates/build?{query}");
    let headers = [("x-api-key", TEST_API_KEY), ("content-type", "application/gzip")];
    let (status, _, body) = http_request_with("POST", &url, &headers, Some(packed)).await;
    let events = body
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line).unwrap_or_else(
                |_| serde_json::json!({ "unparsed": String::from_utf8_lossy(line) }),
            )
        })
        .collect();
    (status, events)
}
