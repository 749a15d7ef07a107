//! The HTTP API of `soulbox serve`. Handlers are thin: they parse, call the runtime, and
//! encode what it streams back.
//!
//! - `GET /health`: liveness, the tiers and the languages with their status.
//! - `POST /v1/run`: `{"language", "code", "limits"?, "env"?, "stream"?}` runs a cell in a
//!   fresh sandbox. The answer is one JSON object (the shape of `soulbox run --json`), or with
//!   `"stream": true` a stream of JSON lines, one per event, the last of type `end`.
//! - E2B's control plane (`/v2/sandboxes`, `/sandboxes/{id}`...), see [`crate::e2b`].
//! - The web terminal (`/sandboxes/{id}/terminal` and its WebSocket), see [`crate::terminal`].
//! - A sandbox's data plane (envd and the code interpreter), for requests that name a
//!   sandbox (`E2b-Sandbox-Id`, or a `{port}-{id}.{domain}` host), see `crate::envd`.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use soulbox_runtime::{
    DispatchError, ExecEvent, ExecRequest, Language, Limits, MAX_CODE_BYTES, SandboxSpec,
    TierPreference,
};
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::{AuthError, Principal, Role};

/// The largest request body accepted: room for the largest code plus JSON escaping.
pub const MAX_REQUEST_BODY_BYTES: usize = 4 * MAX_CODE_BYTES;

/// The router of the API.
pub fn router(app: App) -> Router {
    let data_plane = crate::envd::DataPlane::new(app.clone());
    let authenticated = Router::new()
        .route("/v1/run", post(run))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/audit", get(audit_log))
        .route("/v1/usage", get(usage))
        .route("/v1/tokens", post(issue_token))
        .route("/v1/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/metrics", get(metrics))
        .route("/v1/quotas/{team}", get(get_quota).put(set_quota))
        .merge(crate::e2b::routes())
        .merge(template_routes())
        .merge(crate::terminal::authenticated_routes())
        .layer(axum::middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .merge(crate::terminal::open_routes())
        .merge(authenticated)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .with_state(app)
        // A sandbox's traffic never reaches the control plane's routes (it is authorised by
        // the sandbox's access token).
        .layer(axum::middleware::from_fn_with_state(data_plane, crate::envd::route))
        // Outermost: every request in a span of its own.
        .layer(axum::middleware::from_fn(trace_request))
}

/// The templates API, with the native tier that builds them.
fn template_routes() -> Router<App> {
    #[cfg(feature = "native")]
    return crate::templates::routes();
    #[cfg(not(feature = "native"))]
    Router::new()
}

/// Requests slower than this (to their answer's head) are logged at `info`.
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a request in a `request` span (method, path, sandbox; then status and latency), the
/// parent of the spans of the executions it starts, so one slow request can be followed from
/// the API through the dispatch into its tier (`SOULBOX_LOG=soulbox=debug` shows them).
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let sandbox = request
        .headers()
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        sandbox = %sandbox,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    let began = std::time::Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let latency = began.elapsed();
    span.record("status", response.status().as_u16());
    span.record("latency_ms", latency.as_secs_f64() * 1000.0);
    if latency >= SLOW_REQUEST {
        tracing::info!(parent: &span, ?latency, "slow request");
    } else {
        tracing::debug!(parent: &span, ?latency, "answered");
    }
    response
}

/// The role a request needs: reading needs a viewer, key management an admin, everything
/// else a member.
fn required_role(method: &axum::http::Method, path: &str) -> Role {
    let admin_only = ["/v1/keys", "/v1/audit", "/v1/usage", "/v1/quotas"];
    if admin_only.iter().any(|prefix| path.starts_with(prefix)) {
        Role::Admin
    } else if path == "/v1/tokens" {
        // Any key may have a session token of its own (with its own role).
        Role::Viewer
    } else if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        Role::Viewer
    } else {
        Role::Member
    }
}

/// An error of the authentication layer, in the shape of the API the request was for.
fn auth_error(path: &str, status: StatusCode, message: String) -> Response {
    let mut response = if path.starts_with("/v1/") {
        ApiError::new(status, "unauthorized", message).into_response()
    } else {
        (status, Json(json!({ "code": status.as_u16(), "message": message }))).into_response()
    };
    if status == StatusCode::TOO_MANY_REQUESTS
        && let Ok(value) = crate::auth::FAILURE_WINDOW.as_secs().to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Who made a request, by the first of: a request signature (`X-Soulbox-Signature`), a JWT
/// bearer (a session token or an OIDC issuer's), an API key (`X-API-KEY` or bearer). The
/// request comes back whole (a signed one's body was read to check it). A missing or wrong key
/// is 401, a wrong, expired or replayed signature or token 403.
async fn identify(
    app: &App,
    keys: &crate::auth::Keys,
    request: axum::extract::Request,
    key: Option<&str>,
    source: Option<std::net::IpAddr>,
) -> Result<(Principal, axum::extract::Request), (StatusCode, String)> {
    use crate::tokens::TokenError;
    let auth_failed = |error: AuthError| {
        let status = match error {
            AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            AuthError::Missing | AuthError::Invalid | AuthError::Malformed => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, error.to_string())
    };
    let token_failed = |error: TokenError| {
        let status = match error {
            TokenError::Refused(_) => StatusCode::FORBIDDEN,
            TokenError::KeyInvalid => StatusCode::UNAUTHORIZED,
            TokenError::Secret { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, error.to_string())
    };
    keys.check_source(source).map_err(auth_failed)?;
    let headers = request.headers();
    let header = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned).unwrap_or_default()
    };
    let (signature, key_id, timestamp) =
        (header("x-soulbox-signature"), header("x-soulbox-key-id"), header("x-soulbox-timestamp"));
    let tokens = app.tokens();
    if !signature.is_empty() {
        let tokens =
            tokens.ok_or((StatusCode::SERVICE_UNAVAILABLE, "no server secret".to_owned()))?;
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, MAX_REQUEST_BODY_BYTES).await.map_err(|e| {
            (StatusCode::PAYLOAD_TOO_LARGE, format!("reading the signed body: {e}"))
        })?;
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let principal = tokens
            .verify_signed(
                keys,
                &key_id,
                &timestamp,
                &signature,
                parts.method.as_str(),
                &path_and_query,
                &body,
            )
            .map_err(token_failed)?;
        return Ok((principal, axum::extract::Request::from_parts(parts, Body::from(body))));
    }
    if let Some(token) = key.filter(|k| k.matches('.').count() == 2) {
        let tokens =
            tokens.ok_or((StatusCode::SERVICE_UNAVAILABLE, "no server secret".to_owned()))?;
        let principal = tokens.verify_jwt(keys, token).map_err(token_failed)?;
        return Ok((principal, request));
    }
    let principal = keys.verify(key, None).map_err(auth_failed)?;
    Ok((principal, request))
}

/// Checks the request's credentials (see [`identify`]) and role, audits it, and hands its
/// [`Principal`] to the handler.
async fn authenticate(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let Some(keys) = app.keys() else {
        let message = "this server keeps no API keys (start it with `soulbox serve`)".to_owned();
        return auth_error(&path, StatusCode::SERVICE_UNAVAILABLE, message);
    };
    let headers = request.headers();
    let key = headers
        .get("x-api-key")
        .or_else(|| headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_owned());
    let source = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let action = format!("{} {path}", request.method());
    let mutation =
        request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD;
    let audit = |key_id: &str, team: &str, status: StatusCode| {
        // Mutations, and attempts refused (whatever they were).
        let refused = matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        ) || status == StatusCode::TOO_MANY_REQUESTS;
        if let Some(log) = app.audit()
            && (mutation || refused)
        {
            let source = source.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
            if let Err(error) = log.append(key_id, team, action.clone(), status.as_u16(), source) {
                tracing::error!(%error, "could not append to the audit log");
            }
        }
    };
    let identified = match identify(&app, keys, request, key.as_deref(), source).await {
        Ok(identified) => identified,
        Err((status, message)) => {
            keys.count_failure(source);
            audit("-", "-", status);
            return auth_error(&path, status, message);
        }
    };
    let (principal, mut request) = identified;
    let needed = required_role(request.method(), &path);
    if principal.role < needed {
        let message = format!(
            "this key is a {:?} of team {}; the call needs a {needed:?}",
            principal.role, principal.team
        )
        .to_lowercase();
        audit(&principal.key_id, &principal.team, StatusCode::FORBIDDEN);
        return auth_error(&path, StatusCode::FORBIDDEN, message);
    }
    request.extensions_mut().insert(principal.clone());
    let response = next.run(request).await;
    audit(&principal.key_id, &principal.team, response.status());
    app.telemetry().response(response.status().as_u16());
    response
}

/// `GET /metrics`: the server's metrics in Prometheus' text format.
async fn metrics(State(app): State<App>) -> Response {
    let text = app.telemetry().render(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The team a call is about: the caller's own, or (for admins of the default team, the
/// server's operators) any.
fn team_for(principal: &Principal, asked: Option<&str>) -> Result<String, ApiError> {
    match asked {
        Some(team) if team != principal.team && principal.team != crate::auth::DEFAULT_TEAM => {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only admins of the default team reach other teams",
            ))
        }
        Some(team) => Ok(team.to_owned()),
        None => Ok(principal.team.clone()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    #[serde(default)]
    team: Option<String>,
}

/// `GET /v1/usage`: what the team's sandboxes used, by template (ended ones plus live ones so
/// far): sandboxes, sandbox-seconds, CPU-seconds, memory GiB-seconds, executions.
async fn usage(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Query(query): axum::extract::Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let team = team_for(&principal, query.team.as_deref())?;
    let manager = app.manager().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_sandboxes",
            "this server keeps no sandboxes",
        )
    })?;
    let usage = manager.usage(Some(&team)).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "usage_failed", e.to_string())
    })?;
    Ok(Json(usage).into_response())
}

fn quotas_of(app: &App) -> Result<&crate::quotas::Quotas, ApiError> {
    app.quotas().map(AsRef::as_ref).ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quotas", "this server keeps no quotas")
    })
}

/// `GET /v1/quotas/{team}`.
async fn get_quota(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Path(team): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let team = team_for(&principal, Some(&team))?;
    let quota = quotas_of(&app)?.get(&team).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "quota_failed", e.to_string())
    })?;
    Ok(Json(quota).into_response())
}

/// `PUT /v1/quotas/{team}`: sets a team's quota (admins of the default team only).
async fn set_quota(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Path(team): axum::extract::Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    if principal.team != crate::auth::DEFAULT_TEAM {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "quotas are set by admins of the default team",
        ));
    }
    let quota: crate::quotas::Quota = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    quotas_of(&app)?.set(&team, &quota).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "quota_failed", e.to_string())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LogsQuery {
    follow: bool,
}

/// One line of a sandbox's log, as `GET /v1/sandboxes/{id}/logs` answers it.
fn log_line(entry: &soulbox_runtime::LogEntry) -> Bytes {
    let line = json!({
        "at_ms": entry.at_ms,
        "pid": entry.pid,
        "stream": entry.stream,
        "text": String::from_utf8_lossy(&entry.data),
    });
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// `GET /v1/sandboxes/{id}/logs`: the recent output of the sandbox's processes, a JSON line
/// per chunk (`at_ms`, `pid`, `stream`, `text`); with `follow=true`, then what they write as
/// it happens, until the client leaves or the sandbox ends.
async fn sandbox_logs(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<LogsQuery>,
) -> Result<Response, Response> {
    let manager = crate::e2b::owned(&app, &principal, &id).map_err(IntoResponse::into_response)?;
    let table =
        manager.process_table(&id).map_err(|e| crate::e2b::E2bError::from(e).into_response())?;
    let (past, mut live) = table.log().follow();
    drop(table);
    let (lines, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let follow = query.follow;
    tokio::spawn(async move {
        for entry in &past {
            if lines.send(Ok(log_line(entry))).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            let line = tokio::select! {
                entry = live.recv() => match entry {
                    Ok(entry) => log_line(&entry),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let note = json!({ "missed": missed });
                        let mut bytes = serde_json::to_vec(&note).unwrap_or_default();
                        bytes.push(b'\n');
                        Bytes::from(bytes)
                    }
                    // The sandbox is gone.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                () = lines.closed() => return,
            };
            if lines.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream))
        .into_response())
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// From, in milliseconds since the Unix epoch (the beginning when absent).
    #[serde(default)]
    since: u64,
    /// Until (now when absent).
    #[serde(default)]
    until: Option<u64>,
    /// Another team's records: only for admins of the default team, the server's operators.
    #[serde(default)]
    team: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/audit`: the audit records of the caller's team, oldest first.
async fn audit_log(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Query(query): axum::extract::Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let log = app.audit().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_audit", "this server keeps no audit log")
    })?;
    let team = team_for(&principal, query.team.as_deref())?;
    let until = query.until.unwrap_or(u64::MAX / 2);
    let limit = query.limit.unwrap_or(crate::audit::MAX_AUDIT_PAGE);
    let records = log.query(query.since, until, Some(&team), limit).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit_failed", e.to_string())
    })?;
    Ok(Json(records).into_response())
}

/// The body of `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    role: String,
    #[serde(default)]
    name: String,
    /// Another team: only for admins of the default team, the server's operators.
    #[serde(default)]
    team: Option<String>,
}

fn keys_of(app: &App) -> Result<&crate::auth::Keys, ApiError> {
    app.keys().map(AsRef::as_ref).ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_keys", "this server keeps no API keys")
    })
}

fn key_failure(error: &AuthError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "keys_failed", error.to_string())
}

/// `POST /v1/keys`: a new key of the caller's team; the answer is the only time it is shown.
async fn create_key(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: NewKey = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    let role = Role::parse(&request.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("unknown role `{}`; roles are viewer, member and admin", request.role),
        )
    })?;
    let team = match request.team {
        Some(team) if team != principal.team && principal.team != crate::auth::DEFAULT_TEAM => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only admins of the default team make keys of other teams",
            ));
        }
        Some(team) if team.is_empty() || team.len() > 64 => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "a team name takes 1 to 64 bytes",
            ));
        }
        Some(team) => team,
        None => principal.team.clone(),
    };
    let (key, info) =
        keys_of(&app)?.create(&team, role, &request.name).map_err(|e| key_failure(&e))?;
    // The key's signing secret (for signed requests) is derived, stored nowhere: shown now.
    let signing_secret = app.tokens().map(|t| t.signing_secret(&info.id));
    let answer = json!({ "key": key, "info": info, "signing_secret": signing_secret });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// A request for a token (`POST /v1/tokens`, and a terminal's): how long it should live.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct NewToken {
    pub(crate) ttl_secs: Option<u64>,
}

/// `POST /v1/tokens`: a session token (a JWT) for the calling key, for a browser or a
/// terminal; it lives `ttl_secs` (default and maximum one hour) and ends with the key.
async fn issue_token(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bytes: &[u8] = if body.is_empty() { b"{}" } else { &body };
    let request: NewToken = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    let tokens = app.tokens().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_tokens", "this server issues no tokens")
    })?;
    let ttl = request.ttl_secs.map_or(crate::tokens::MAX_TOKEN_TTL, std::time::Duration::from_secs);
    let (token, expires_at) = tokens.issue(&principal, ttl).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "token_failed", e.to_string())
    })?;
    Ok((StatusCode::CREATED, Json(json!({ "token": token, "expires_at": expires_at })))
        .into_response())
}

/// `GET /v1/keys`: the caller's team's keys (ids, never the keys).
async fn list_keys(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    let keys = keys_of(&app)?.list(&principal.team).map_err(|e| key_failure(&e))?;
    Ok(Json(keys).into_response())
}

/// `DELETE /v1/keys/{id}`: revokes a key of the caller's team; the next request with it is
/// refused.
async fn revoke_key(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    if keys_of(&app)?.revoke(&id, &principal.team).map_err(|e| key_failure(&e))? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no key {id} in this team")))
    }
}

/// An API error: a status and a stable JSON body `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `Retry-After`, in seconds, for a refusal that passes.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// What went wrong, for people.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<crate::admission::Refusal> for ApiError {
    fn from(refusal: crate::admission::Refusal) -> Self {
        let code = if refusal.status == StatusCode::TOO_MANY_REQUESTS {
            "too_many_requests"
        } else {
            "overloaded"
        };
        let retry_after = Some(refusal.retry_after_secs());
        Self { status: refusal.status, code, message: refusal.message, retry_after }
    }
}

impl From<DispatchError> for ApiError {
    fn from(error: DispatchError) -> Self {
        let (status, code) = match &error {
            DispatchError::UnknownLanguage { .. } => (StatusCode::BAD_REQUEST, "unknown_language"),
            DispatchError::LanguageNotInstalled { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "language_not_installed")
            }
            DispatchError::TierCannotRun { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "tier_unavailable")
            }
            DispatchError::CodeTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "code_too_large"),
            DispatchError::InvalidLimits(_) => (StatusCode::BAD_REQUEST, "invalid_limits"),
        };
        Self::new(status, code, error.to_string())
    }
}

async fn health(State(app): State<App>) -> Json<serde_json::Value> {
    let languages: Vec<_> = app
        .dispatcher()
        .languages()
        .into_iter()
        .map(|(tier, support)| json!({ "language": support.language, "tier": tier, "status": support.status }))
        .collect();
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "tiers": app.tiers(),
        "languages": languages,
    }))
}

/// The body of `POST /v1/run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    /// A cell: its language and code.
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    code: Option<String>,
    /// Or a command (the native tier): the program and its arguments.
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    tier: TierPreference,
    #[serde(default)]
    stream: bool,
}

async fn run(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let message = format!(
            "{} (requests are limited to {MAX_REQUEST_BODY_BYTES} bytes)",
            rejection.body_text()
        );
        ApiError::new(rejection.status(), "request_rejected", message)
    })?;
    let request: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    let kind = match (request.language, request.code, request.command) {
        (Some(language), Some(code), None) => {
            if code.len() > MAX_CODE_BYTES {
                return Err(
                    DispatchError::CodeTooLarge { size: code.len(), max: MAX_CODE_BYTES }.into()
                );
            }
            soulbox_runtime::ExecKind::Cell { language: Language::parse(&language), code }
        }
        (None, None, Some(argv)) => {
            let size: usize = argv.iter().map(String::len).sum();
            if argv.is_empty() || size > MAX_CODE_BYTES {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!(
                        "`command` needs a program and at most {MAX_CODE_BYTES} bytes of arguments"
                    ),
                ));
            }
            soulbox_runtime::ExecKind::Command { argv }
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give either `language` and `code` (a cell) or `command` (a program and its arguments)".to_owned(),
            ));
        }
    };
    let exec = ExecRequest {
        kind,
        env: request.env,
        limits: request.limits,
        tier: request.tier,
        context: None,
    };
    if let soulbox_runtime::ExecKind::Cell { language, .. } = &exec.kind
        && exec.tier != TierPreference::Native
    {
        app.check_kernel_room(language, None)?;
    }
    let place = app.admission().execution(&principal.team).await?;
    let sandbox = app.ephemeral_sandbox(SandboxSpec::default()).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "sandbox_failed", e.to_string())
    })?;
    let execution = match app.dispatcher().start(sandbox.clone(), exec) {
        Ok(execution) => execution,
        Err(error) => {
            app.discard(&sandbox).await;
            return Err(error.into());
        }
    };
    // The execution is driven by its own task, so the sandbox is discarded even when the
    // client leaves before the end.
    if !request.stream {
        let (mut done, output) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _place = place;
            // A client that hangs up stops the execution (dropping it cancels the work).
            tokio::select! {
                output = execution.collect() => { let _ = done.send(output); }
                () = done.closed() => {}
            }
            app.discard(&sandbox).await;
        });
        let output = output.await.map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "execution_lost",
                "the execution ended without a result",
            )
        })?;
        return Ok(Json(output).into_response());
    }
    let (lines, body) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let tier = execution.tier();
    tokio::spawn(async move {
        let _place = place;
        let mut execution = execution;
        while let Some(event) = execution.next_event().await {
            if lines.send(Ok(event_line(tier, &event))).await.is_err() {
                break; // the client hung up: dropping the execution stops it
            }
        }
        drop(execution);
        app.discard(&sandbox).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream))
        .into_response())
}

/// One line of the streamed answer.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventLine<'a> {
    Stdout {
        text: String,
    },
    Stderr {
        text: String,
    },
    Result {
        result: &'a soulbox_runtime::CellResult,
    },
    Error {
        error: &'a soulbox_runtime::GuestError,
    },
    End {
        tier: soulbox_runtime::Tier,
        termination: &'a soulbox_runtime::Termination,
        exit_code: i32,
        timings: soulbox_runtime::Timings,
    },
    Failed {
        message: &'a str,
    },
}

fn event_line(tier: soulbox_runtime::Tier, event: &ExecEvent) -> Bytes {
    let line = match event {
        ExecEvent::Stdout(b) => EventLine::Stdout { text: String::from_utf8_lossy(b).into_owned() },
        ExecEvent::Stderr(b) => EventLine::Stderr { text: String::from_utf8_lossy(b).into_owned() },
        ExecEvent::Result(result) => EventLine::Result { result },
        ExecEvent::Error(error) => EventLine::Error { error },
        ExecEvent::End(summary) => EventLine::End {
            tier,
            termination: &summary.termination,
            exit_code: summary.termination.exit_code(),
            timings: summary.timings,
        },
        ExecEvent::Failed(message) => EventLine::Failed { message },
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Bounds on the server's connections, so that a client that opens many, or sends its
/// request slowly, cannot take the server's descriptors or memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; past it, new ones wait in the kernel's accept queue until
    /// one ends.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and a kept-alive connection
    /// may wait for its next request.
    pub header_read_timeout: std::time::Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { max_connections: 4096, header_read_timeout: std::time::Duration::from_secs(30) }
    }
}

/// How long requests in flight may finish after Ctrl-C.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the API on `listener` until Ctrl-C, with the default [`ConnectionLimits`].
pub async fn serve(listener: tokio::net::TcpListener, app: App) -> std::io::Result<()> {
    serve_with(listener, app, ConnectionLimits::default()).await
}

/// Serves the API on `listener` until Ctrl-C, within `limits`: HTTP/1.1 with upgrades (the
/// web terminal's WebSocket), each request carrying its peer's address (`ConnectInfo`).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: App,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    use std::sync::Arc;
    use tower::ServiceExt;
    let router = router(app);
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let place = tokio::select! {
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, say: wait a moment rather than spin.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Streamed answers (process output, cells) are many small writes: with Nagle's
        // algorithm each would wait for the client's delayed ACK, about 40 ms.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                router.clone().oneshot(request)
            },
        );
        let connection =
            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection");
            }
            drop(place);
        });
    }
    // Requests in flight may finish, for a while.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, places.acquire_many(all)).await;
    Ok(())
}
