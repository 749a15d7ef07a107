//! The data plane: what answers, in E2B, from inside a sandbox — envd (port 49983: processes,
//! the filesystem, file transfer) and the code interpreter (port 49999).
//!
//! A request belongs to a sandbox when it carries the `E2b-Sandbox-Id` header (and
//! `E2b-Sandbox-Port`, envd when absent), as the SDKs send it when `E2B_SANDBOX_URL` points
//! at SoulBox, or when its `Host` is `{port}-{id}.{domain}` (domain mode). Everything else is
//! the control plane. A signed `/files` URL carries no sandbox id in single-URL mode; it
//! belongs to the running sandbox whose access token its signature verifies with.
//!
//! Every data-plane request shows the sandbox's access token (`X-Access-Token`), or, for
//! `/files`, a valid signature — but `GET /health` and the code interpreter's `/contexts`
//! calls, which the SDKs send without it. A paused sandbox created with auto-resume resumes
//! on its first data-plane request, for the lifetime it was created with. An unknown, paused or killed
//! sandbox answers 502 "sandbox was not found", as E2B's edge proxy does.

pub(crate) mod connect;
mod files;
mod filesystem;
mod paths;
mod process;

pub(crate) use filesystem::Watchers;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use soulbox_runtime::{ManagerError, ProcessTable, Sandbox, SandboxRecord};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use crate::app::App;

/// envd's port.
pub(crate) const ENVD_PORT: u16 = 49983;
/// The code interpreter's port.
pub(crate) const INTERPRETER_PORT: u16 = 49999;

/// The sandbox and port a data-plane request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) sandbox_id: String,
    pub(crate) port: u16,
}

impl Target {
    /// The target named by the request's headers or host, if any.
    fn of(headers: &HeaderMap) -> Option<Self> {
        if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
            let port = headers
                .get("e2b-sandbox-port")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(ENVD_PORT);
            return Some(Self { sandbox_id: id.to_owned(), port });
        }
        let host = headers.get(header::HOST)?.to_str().ok()?;
        let label = host.split('.').next()?;
        let (port, id) = label.split_once('-')?;
        let port = port.parse().ok()?;
        // Only a host of the form `{port}-{id}.{domain}`, with an id's shape.
        (host.contains('.') && soulbox_runtime::SandboxId::parse(id).is_some())
            .then(|| Self { sandbox_id: id.to_owned(), port })
    }
}

/// A running sandbox, as a data-plane handler gets it.
#[derive(Debug, Clone)]
pub(crate) struct LiveSandbox {
    pub(crate) record: SandboxRecord,
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) processes: Arc<ProcessTable>,
}

/// The sandbox's files for a call running on a blocking thread (see [`paths`]).
pub(crate) fn sandbox_files(
    app: &App,
    live: &LiveSandbox,
) -> Result<paths::SandboxFiles, paths::PathError> {
    let runtime = tokio::runtime::Handle::current();
    let (app, tmp_live) = (app.clone(), live.clone());
    paths::SandboxFiles::open(&live.sandbox, move || runtime.block_on(native_tmp(&app, &tmp_live)))
}

/// The native sandbox's `/tmp` (the native sandbox started if it is not running).
pub(crate) async fn native_tmp(
    app: &App,
    live: &LiveSandbox,
) -> Result<paths::NativeTmp, paths::PathError> {
    let unavailable = |message: String| {
        paths::PathError::new(paths::PathErrorKind::Internal, format!("{}: {message}", paths::TMP))
    };
    let (dir, owner) = app.native_tmp(&live.sandbox).await.map_err(unavailable)?;
    Ok(paths::NativeTmp { dir, owner })
}

/// The routers of the data plane, built once.
#[derive(Clone)]
pub(crate) struct DataPlane {
    app: App,
    envd: Router,
    interpreter: Router,
}

impl DataPlane {
    pub(crate) fn new(app: App) -> Self {
        let envd = Router::new()
            .route("/health", get(|| async { StatusCode::NO_CONTENT }))
            .route("/metrics", get(metrics))
            .merge(process::routes())
            .merge(filesystem::routes())
            .layer(DefaultBodyLimit::max(connect::MAX_REQUEST_BYTES))
            .merge(files::routes())
            .with_state(app.clone());
        let interpreter = crate::interpreter::routes().with_state(app.clone());
        Self { app, envd, interpreter }
    }
}

/// envd's `GET /metrics`: what the sandbox uses now.
async fn metrics(
    State(app): State<App>,
    axum::extract::Extension(live): axum::extract::Extension<LiveSandbox>,
) -> Response {
    let Some(manager) = app.manager() else { return sandbox_not_found(live.record.id.as_str()) };
    match manager.metrics(live.record.id.as_str()).await {
        Ok(sample) => axum::Json(json!({
            "ts": sample.timestamp_ms / 1000,
            "cpu_count": sample.cpu_count,
            "cpu_used_pct": sample.cpu_used_pct,
            "mem_total": sample.memory_total_bytes,
            "mem_used": sample.memory_used_bytes,
            "mem_cache": 0,
            "disk_used": sample.disk_used_bytes,
            "disk_total": sample.disk_total_bytes,
        }))
        .into_response(),
        Err(_) => sandbox_not_found(live.record.id.as_str()),
    }
}

/// The answer of E2B's proxy for a sandbox that does not run; the SDKs turn it into
/// `SandboxNotRunningException`.
pub(crate) fn sandbox_not_found(id: &str) -> Response {
    let body = json!({
        "code": 502,
        "message": format!("The sandbox {id} was not found: it does not exist, was killed, or is paused"),
        "sandboxId": id,
    });
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

fn unauthorized(message: &str) -> Response {
    let body = json!({ "code": 401, "message": format!("unauthorized access, {message}") });
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

/// Whether `given` is the sandbox's token, compared in constant time.
pub(crate) fn token_matches(record: &SandboxRecord, given: &str) -> bool {
    record.access_token.as_bytes().ct_eq(given.as_bytes()).into()
}

/// Sends data-plane requests to envd or the code interpreter of their sandbox; lets every
/// other request through to the control plane.
pub(crate) async fn route(
    State(plane): State<DataPlane>,
    mut request: Request,
    next: Next,
) -> Response {
    let target = match Target::of(request.headers()) {
        Some(target) => target,
        None => match files::signed_target(&plane.app, &request) {
            Some(target) => target,
            None => return next.run(request).await,
        },
    };
    let Some(manager) = plane.app.manager() else {
        return sandbox_not_found(&target.sandbox_id);
    };
    wake(manager, &target.sandbox_id).await;
    let live = match manager.get(&target.sandbox_id).and_then(|record| {
        let (sandbox, processes) = manager.processes(&target.sandbox_id)?;
        Ok(LiveSandbox { record, sandbox, processes })
    }) {
        Ok(live) => live,
        Err(ManagerError::NotFound(_) | ManagerError::Paused(_)) => {
            return sandbox_not_found(&target.sandbox_id);
        }
        Err(e) => {
            tracing::error!(error = %e, "data plane");
            let body = json!({ "code": 500, "message": e.to_string() });
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response();
        }
    };
    if !open_without_token(&target, request.uri().path()) && !authorized(&live.record, &request) {
        return unauthorized("the sandbox's access token is missing or wrong (X-Access-Token)");
    }
    let router = match target.port {
        ENVD_PORT => plane.envd.clone(),
        INTERPRETER_PORT => plane.interpreter.clone(),
        port => {
            let body = json!({
                "code": 502,
                "message": format!("The sandbox is running but port is not open: {port}"),
                "sandboxId": target.sandbox_id,
                "port": port,
            });
            return (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response();
        }
    };
    request.extensions_mut().insert(live);
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Resumes sandbox `id` if it is paused and was created with auto-resume: it wakes on its
/// first traffic.
pub(crate) async fn wake(manager: &soulbox_runtime::SandboxManager, id: &str) {
    if let Ok(record) = manager.get(id)
        && record.state == soulbox_runtime::SandboxState::Paused
        && record.auto_resume
    {
        let lifetime = soulbox_runtime::SandboxManager::lifetime(&record);
        if let Err(e) = manager.resume(id, lifetime).await {
            tracing::warn!(sandbox = %id, error = %e, "auto-resume");
        }
    }
}

/// Whether a path is served without the access token: `/health` (the SDKs probe it bare),
/// and the code interpreter's `/contexts` calls, for which the SDK sends no token (it sends
/// it with `/execute` only); they run no code.
fn open_without_token(target: &Target, path: &str) -> bool {
    path == "/health" || (target.port == INTERPRETER_PORT && path.starts_with("/contexts"))
}

/// Whether the request shows the sandbox's token, or (for `/files`) a valid signature.
fn authorized(record: &SandboxRecord, request: &Request) -> bool {
    if record.access_token.is_empty() {
        return true;
    }
    let header = request.headers().get("x-access-token").and_then(|v| v.to_str().ok());
    if header.is_some_and(|token| token_matches(record, token)) {
        return true;
    }
    request.uri().path() == "/files" && files::signature_valid(record, request)
}
