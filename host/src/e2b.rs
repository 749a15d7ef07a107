//! E2B's control plane, as the official SDKs speak it (`shared/reference/e2b/protocol.md`,
//! section 2): create, list, info, kill, timeout, pause, resume and connect, with E2B's JSON
//! shapes (camelCase, RFC 3339 times), its exact success codes (the SDK parses a body only for
//! the documented one) and its error shape `{"code", "message"}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, FromRequest, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use soulbox_runtime::{
    CreateSandbox, DEFAULT_SANDBOX_TIMEOUT, ListFilter, ManagerError, OnTimeout, SandboxManager,
    SandboxRecord, SandboxState, TierPreference,
};

use crate::app::App;
use crate::auth::{DEFAULT_TEAM, Principal};

/// The envd version reported to the SDKs: a modern one, so that they use every feature
/// (older versions make them refuse calls or kill the sandbox).
pub const ENVD_VERSION: &str = "0.6.13";

/// The templates a sandbox can be made from: the tier their executions prefer, and the
/// language of their cells when it is a WASM tier's (its first cell needs a kernel, which a
/// warm one can be).
const TEMPLATES: [(&str, TierPreference, Option<&str>); 5] = [
    ("base", TierPreference::Auto, None),
    ("code-interpreter-v1", TierPreference::Auto, Some("python")),
    ("python", TierPreference::Auto, Some("python")),
    ("javascript", TierPreference::Auto, Some("javascript")),
    ("ruby", TierPreference::Auto, Some("ruby")),
];

/// The routes of the control plane.
pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .layer(axum::middleware::from_fn(require_json))
}

/// Refuses a body that says it is not JSON (a body without a content type is read as JSON,
/// as the SDKs' bodies are).
async fn require_json(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let content_type =
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let has_body = headers.get(header::CONTENT_LENGTH).is_some_and(|v| v != "0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    if has_body && !content_type.is_empty() && !content_type.starts_with("application/json") {
        let message =
            format!("content type `{content_type}` is not supported; send application/json");
        return E2bError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, message).into_response();
    }
    next.run(request).await
}

/// An error in E2B's shape.
#[derive(Debug)]
pub(crate) struct E2bError {
    status: StatusCode,
    message: String,
    /// `Retry-After`, in seconds, for a refusal that passes.
    retry_after: Option<u64>,
}

impl E2bError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.status.as_u16(), "message": self.message });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<crate::server::ApiError> for E2bError {
    fn from(error: crate::server::ApiError) -> Self {
        Self::new(error.status(), error.message())
    }
}

impl From<crate::admission::Refusal> for E2bError {
    fn from(refusal: crate::admission::Refusal) -> Self {
        let retry_after = Some(refusal.retry_after_secs());
        Self { status: refusal.status, message: refusal.message, retry_after }
    }
}

impl From<ManagerError> for E2bError {
    fn from(error: ManagerError) -> Self {
        let status = match &error {
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::Paused(_) | ManagerError::AlreadyRunning(_) => StatusCode::CONFLICT,
            ManagerError::Invalid(_) | ManagerError::Limits(_) => StatusCode::BAD_REQUEST,
            ManagerError::Store(_) | ManagerError::Files(_) | ManagerError::Tier(_) => {
                tracing::error!(%error, "control plane");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, error.to_string())
    }
}

/// The manager, with sandbox `id` checked to be of the caller's team: another team's sandbox
/// is not found, exactly as a missing one.
pub(crate) fn owned<'a>(
    app: &'a App,
    principal: &Principal,
    id: &str,
) -> Result<&'a Arc<SandboxManager>, E2bError> {
    let manager = manager(app)?;
    let record = manager.get(id)?;
    if team_of(&record) != principal.team {
        return Err(ManagerError::NotFound(id.to_owned()).into());
    }
    Ok(manager)
}

/// A record's team (records made before teams belong to the default one).
fn team_of(record: &SandboxRecord) -> &str {
    if record.team.is_empty() { DEFAULT_TEAM } else { &record.team }
}

/// Refuses a sandbox its team's quota does not allow (400 for a timeout or memory limit above
/// it); the team's quota of live sandboxes, which admission control holds.
fn check_quota(app: &App, create: &CreateSandbox) -> Result<Option<usize>, E2bError> {
    let Some(quotas) = app.quotas() else { return Ok(None) };
    let quota = quotas
        .get(&create.team)
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(max) = quota.max_timeout_secs
        && create.timeout.as_secs() > max
    {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a timeout of {} s is above the quota of team {} ({max} s)",
                create.timeout.as_secs(),
                create.team
            ),
        ));
    }
    if let Some(max) = quota.max_memory_mib
        && create.limits.memory_bytes > max.saturating_mul(1 << 20)
    {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a memory limit of {} MiB is above the quota of team {} ({max} MiB)",
                create.limits.memory_bytes >> 20,
                create.team
            ),
        ));
    }
    Ok(quota.max_live_sandboxes.map(|max| usize::try_from(max).unwrap_or(usize::MAX)))
}

fn manager(app: &App) -> Result<&Arc<SandboxManager>, E2bError> {
    app.manager().ok_or_else(|| {
        E2bError::new(StatusCode::SERVICE_UNAVAILABLE, "this server keeps no sandboxes")
    })
}

/// A request's body; one that cannot be read (too large, cut short) is an error in E2B's
/// shape.
#[derive(Debug)]
pub(crate) struct E2bBody(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for E2bBody {
    type Rejection = E2bError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, E2bError> {
        Bytes::from_request(request, state)
            .await
            .map(Self)
            .map_err(|rejection| E2bError::new(rejection.status(), rejection.body_text()))
    }
}

/// Parses a JSON body; an empty body is `{}`.
pub(crate) fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, E2bError> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn rfc3339(ms: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// `NewSandbox` (v1) and `NewSandboxV2`; fields the SDK may send that SoulBox does not use
/// yet (network, mcp, volumes) are ignored, as the SDK ignores unknown answers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(default)]
    auto_pause: bool,
    #[serde(default)]
    auto_resume: Option<AutoResume>,
    /// Snake case, as the SDK sends it.
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<serde_json::Value>,
    #[serde(default)]
    mcp: Option<serde_json::Value>,
    #[serde(default)]
    volume_mounts: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
struct AutoResume {
    #[serde(default)]
    enabled: bool,
}

impl NewSandbox {
    /// Refuses what the request asks for and SoulBox cannot give, rather than ignore it.
    fn check_supported(&self) -> Result<(), E2bError> {
        let refuse = |what: &str| {
            Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("{what} is not supported by this server: create the sandbox without it"),
            ))
        };
        if self.allow_internet_access == Some(true) {
            return refuse(
                "`allow_internet_access: true` (sandboxes here have loopback only, no internet)",
            );
        }
        if self.network.is_some() {
            return refuse("`network` (egress rules)");
        }
        if self.mcp.is_some() {
            return refuse("`mcp` (the MCP gateway)");
        }
        if self.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse("`volumeMounts`");
        }
        Ok(())
    }
}

/// The fields every sandbox answer starts with.
#[derive(Debug, Serialize)]
struct SandboxIdentity {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    alias: String,
}

impl From<&SandboxRecord> for SandboxIdentity {
    fn from(record: &SandboxRecord) -> Self {
        Self {
            template_id: record.template.clone(),
            sandbox_id: record.id.to_string(),
            client_id: "soulbox",
            envd_version: ENVD_VERSION,
            alias: record.template.clone(),
        }
    }
}

/// The `Sandbox` answer of create, resume and connect.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxCreated {
    #[serde(flatten)]
    identity: SandboxIdentity,
    envd_access_token: String,
    domain: Option<String>,
}

impl From<&SandboxRecord> for SandboxCreated {
    fn from(record: &SandboxRecord) -> Self {
        Self {
            identity: record.into(),
            envd_access_token: record.access_token.clone(),
            domain: None,
        }
    }
}

/// `ListedSandbox` and `SandboxDetail`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxInfo {
    #[serde(flatten)]
    identity: SandboxIdentity,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
    lifecycle: serde_json::Value,
    envd_access_token: String,
    domain: Option<String>,
}

impl From<&SandboxRecord> for SandboxInfo {
    fn from(record: &SandboxRecord) -> Self {
        Self {
            identity: record.into(),
            started_at: rfc3339(record.started_at_ms),
            end_at: rfc3339(record.end_at_ms),
            cpu_count: soulbox_runtime::SANDBOX_CPU_COUNT,
            memory_mb: record.limits.memory_bytes >> 20,
            disk_size_mb: 0,
            state: match record.state {
                SandboxState::Running => "running",
                SandboxState::Paused => "paused",
            },
            metadata: record.metadata.clone(),
            lifecycle: json!({
                "autoResume": record.auto_resume,
                "onTimeout": match record.on_timeout {
                    OnTimeout::Kill => "kill",
                    OnTimeout::Pause => "pause",
                },
            }),
            envd_access_token: record.access_token.clone(),
            domain: None,
        }
    }
}

async fn create(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    E2bBody(bytes): E2bBody,
) -> Result<Response, E2bError> {
    let manager = manager(&app)?;
    let request: NewSandbox = body(&bytes)?;
    request.check_supported()?;
    let builtin = TEMPLATES.iter().find(|(name, ..)| *name == request.template_id);
    let built = match builtin {
        Some(_) => None,
        None => built_template(&app, &principal.team, &request.template_id)?,
    };
    let (tier, first_language) = match (builtin, &built) {
        (Some(&(_, tier, first_language)), _) => (tier, first_language),
        (None, Some(_)) => (TierPreference::Native, None),
        (None, None) => {
            let known = TEMPLATES.map(|(name, ..)| name).join(", ");
            let message = format!(
                "template '{}' not found (SoulBox's: {known}; your team's: `soulbox template list`)",
                request.template_id
            );
            return Err(E2bError::new(StatusCode::NOT_FOUND, message));
        }
    };
    let mut create = CreateSandbox::new(request.template_id.clone());
    create.image = built.as_ref().map(|(image, _)| image.clone());
    create.timeout = request.timeout.map_or(DEFAULT_SANDBOX_TIMEOUT, Duration::from_secs);
    create.metadata = request.metadata;
    create.env = request.env_vars;
    create.tier = tier;
    create.on_timeout = if request.auto_pause { OnTimeout::Pause } else { OnTimeout::Kill };
    create.auto_resume = request.auto_resume.is_some_and(|a| a.enabled);
    create.team = principal.team.clone();
    let began = std::time::Instant::now();
    let template = create.template.clone();
    let team = create.team.clone();
    // A template whose cells run in the WASM tier needs a kernel slot for its first cell.
    let room = first_language.map_or(Ok(()), |language| {
        app.check_kernel_room(&soulbox_runtime::Language::parse(language), None)
    });
    let created = room.map_err(E2bError::from).and_then(|()| check_quota(&app, &create)).and_then(
        |live_quota| {
            let live = |team: Option<&str>| manager.count_live(team);
            app.admission().admit_sandbox(&team, live_quota, live, || {
                create_warm(&app, manager, create, first_language)
            })
        },
    );
    let outcome = match &created {
        Ok(_) => "created",
        Err(e) if e.status.is_client_error() => "refused",
        Err(_) => "failed",
    };
    let record = created?;
    #[cfg(feature = "native")]
    if let Some((_, build)) = &built
        && let Err(error) = crate::templates::start_sandbox(&app, record.id.as_str(), build).await
    {
        let _ = manager.kill(record.id.as_str()).await;
        app.telemetry().sandbox_create(&template, "failed", began.elapsed().as_secs_f64());
        return Err(error.into());
    }
    app.telemetry().sandbox_create(&template, outcome, began.elapsed().as_secs_f64());
    Ok(sandbox_answer(StatusCode::CREATED, &record))
}

/// A template the team built (or a public one): what its sandboxes start with, and its
/// build. `None` when there is no such template.
#[cfg(feature = "native")]
fn built_template(
    app: &App,
    team: &str,
    reference: &str,
) -> Result<Option<(soulbox_runtime::TemplateImage, crate::templates::BuildRecord)>, E2bError> {
    let Some(templates) = app.templates() else { return Ok(None) };
    let Some(resolved) = templates.resolve(team, reference)? else { return Ok(None) };
    let image = templates.sandbox_image(&resolved.build)?;
    Ok(Some((image, resolved.build)))
}

/// Without the native tier there are no built templates.
#[cfg(not(feature = "native"))]
fn built_template(
    _app: &App,
    _team: &str,
    _reference: &str,
) -> Result<Option<(soulbox_runtime::TemplateImage, ())>, E2bError> {
    Ok(None)
}

/// Makes the sandbox, with a warm kernel of `language` (its template's first) when one waits:
/// the sandbox is made in the kernel's directory, and its first cell is a later one.
fn create_warm(
    app: &App,
    manager: &SandboxManager,
    create: CreateSandbox,
    language: Option<&str>,
) -> Result<SandboxRecord, E2bError> {
    #[cfg(feature = "wasm")]
    if let Some(warm) =
        language.and_then(|l| app.wasm().take_warm(&soulbox_runtime::Language::parse(l)))
    {
        let record = manager.create_in(create, Some(warm.dir()))?;
        match manager.running(record.id.as_str()) {
            Ok(sandbox) => app.wasm().adopt(&sandbox, warm),
            Err(error) => tracing::warn!(%error, "a new sandbox is gone before its kernel"),
        }
        return Ok(record);
    }
    #[cfg(not(feature = "wasm"))]
    let _ = (app, language);
    Ok(manager.create(create)?)
}

async fn list(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, E2bError> {
    let manager = manager(&app)?;
    let bad = |what: &str| E2bError::new(StatusCode::BAD_REQUEST, format!("invalid `{what}`"));
    let mut filter = ListFilter { team: Some(principal.team.clone()), ..ListFilter::default() };
    if let Some(metadata) = query.get("metadata") {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(metadata).map_err(|_| bad("metadata"))?;
        filter.metadata = pairs.into_iter().collect();
    }
    if let Some(states) = query.get("state") {
        for state in states.split(',').filter(|s| !s.is_empty()) {
            filter.states.push(match state {
                "running" => SandboxState::Running,
                "paused" => SandboxState::Paused,
                _ => return Err(bad("state")),
            });
        }
    }
    if let Some(limit) = query.get("limit") {
        filter.limit = Some(limit.parse().map_err(|_| bad("limit"))?);
    }
    filter.next_token = query.get("nextToken").cloned();
    let page = manager.list(&filter);
    let infos: Vec<SandboxInfo> = page.sandboxes.iter().map(SandboxInfo::from).collect();
    let mut response = Json(infos).into_response();
    // The SDK keeps asking while the header is present and not empty: only a page with more
    // after it carries it.
    if let Some(token) = page.next_token
        && let Ok(value) = HeaderValue::from_str(&token)
    {
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

async fn info(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, E2bError> {
    let record = owned(&app, &principal, &id)?.get(&id)?;
    Ok(Json(SandboxInfo::from(&record)).into_response())
}

async fn kill(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let manager = match owned(&app, &principal, &id) {
        Ok(manager) => manager,
        Err(_) => {
            return Err(E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found")));
        }
    };
    if manager.kill(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found")))
    }
}

#[derive(Debug, Deserialize)]
struct TimeoutBody {
    timeout: Option<u64>,
}

async fn set_timeout(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    E2bBody(bytes): E2bBody,
) -> Result<StatusCode, E2bError> {
    let request: TimeoutBody = body(&bytes)?;
    let timeout = request
        .timeout
        .ok_or_else(|| E2bError::new(StatusCode::BAD_REQUEST, "`timeout` (seconds) is required"))?;
    owned(&app, &principal, &id)?.set_timeout(&id, Duration::from_secs(timeout))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    owned(&app, &principal, &id)?.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The `timeout` of a resume or connect body, or the default lifetime.
fn timeout_or_default(bytes: &Bytes) -> Result<Duration, E2bError> {
    let request: TimeoutBody = body(bytes)?;
    Ok(request.timeout.map_or(DEFAULT_SANDBOX_TIMEOUT, Duration::from_secs))
}

/// The `Sandbox` answer with its status.
fn sandbox_answer(status: StatusCode, record: &SandboxRecord) -> Response {
    (status, Json(SandboxCreated::from(record))).into_response()
}

async fn resume(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    E2bBody(bytes): E2bBody,
) -> Result<Response, E2bError> {
    let record = owned(&app, &principal, &id)?.resume(&id, timeout_or_default(&bytes)?).await?;
    Ok(sandbox_answer(StatusCode::CREATED, &record))
}

async fn connect(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    E2bBody(bytes): E2bBody,
) -> Result<Response, E2bError> {
    let (record, resumed) =
        owned(&app, &principal, &id)?.connect(&id, timeout_or_default(&bytes)?).await?;
    let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
    Ok(sandbox_answer(status, &record))
}

/// `GET /sandboxes/{id}/metrics`: E2B answers a series over `start`..`end`; SoulBox keeps no
/// history and answers one sample, taken now.
async fn metrics(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, E2bError> {
    let sample = owned(&app, &principal, &id)?.metrics(&id).await?;
    let seconds = sample.timestamp_ms / 1000;
    Ok(Json(json!([{
        "timestamp": rfc3339(sample.timestamp_ms),
        "timestampUnix": seconds,
        "cpuCount": sample.cpu_count,
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.memory_used_bytes,
        "memTotal": sample.memory_total_bytes,
        "memCache": 0,
        "diskUsed": sample.disk_used_bytes,
        "diskTotal": sample.disk_total_bytes,
    }]))
    .into_response())
}
