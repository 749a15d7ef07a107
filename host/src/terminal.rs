//! The web terminal: a shell on a pseudo-terminal of a sandbox, in a browser.
//!
//! - `POST /v1/sandboxes/{id}/terminal/token` (a member's key): a terminal token for this
//!   sandbox (see [`crate::tokens`]), `{"ttl_secs"?}` (default five minutes, at most an hour)
//!   → `{"token", "expires_at", "url"}`; `url` is the page with the token in its fragment.
//! - `GET /sandboxes/{id}/terminal`: the page, with xterm.js (bundled into the binary at build
//!   time, see `build.rs`; nothing is fetched at run time). It takes the token from its URL's
//!   fragment (`#token=…`, which browsers never send to a server), or asks for an API key and
//!   gets a token with it.
//! - `GET /v1/sandboxes/{id}/terminal`: the WebSocket. Browsers cannot set headers on one, so
//!   the token comes as a subprotocol, `soulbox.token.<token>`, beside [`PROTOCOL`]; a request
//!   without a valid token for this sandbox is refused before the upgrade. The query may set
//!   `cols` and `rows` (the first size, 80x24 by default), `pid` (reattach to a terminal whose
//!   connection dropped) and `user` (`user`, the default, or `root`).
//!
//! On the socket, binary frames carry the terminal's bytes both ways, untouched. Text frames
//! are JSON: the client sends `{"type":"resize","cols","rows"}`; the server sends
//! `{"type":"started","pid"}` first, `{"type":"error","message"}` for a refused message (the
//! connection stays), and `{"type":"exit","exit_code"}` (or `"signal"`) last, then closes.
//! A connection that drops leaves the shell running until the sandbox ends, to reattach.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use soulbox_runtime::{
    ProcessEnd, ProcessError, ProcessEvent, ProcessFollower, ProcessRequest, ProcessTable,
    SandboxUser, TerminalSize,
};

use crate::app::App;
use crate::auth::{Principal, Role};
use crate::server::ApiError;

/// The subprotocol of the terminal's WebSocket.
pub const PROTOCOL: &str = "soulbox.terminal.v1";

/// The prefix of the subprotocol that carries the terminal token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "soulbox.token.";

/// The default life of a terminal token: long enough to open the page and reconnect.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The largest message a client may send (a paste, a resize).
const MAX_CLIENT_MESSAGE_BYTES: usize = 1 << 20;

/// How often the server pings an idle connection (so proxies keep it open).
const PING_INTERVAL: Duration = Duration::from_secs(25);

/// The page and its scripts, and xterm.js from npm (see `build.rs`).
const PAGE: &str = include_str!("../web/terminal.html");
const PAGE_SCRIPT: &str = include_str!("../web/terminal.js");
const XTERM_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/web/xterm.js"));
const XTERM_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/web/xterm.css"));
const XTERM_FIT_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/web/addon-fit.js"));

/// The routes that need an API key (behind the authentication layer).
pub(crate) fn authenticated_routes() -> Router<App> {
    Router::new().route("/v1/sandboxes/{id}/terminal/token", post(issue_token))
}

/// The routes that check their own credentials: the page (which holds none) and the
/// WebSocket (a terminal token).
pub(crate) fn open_routes() -> Router<App> {
    Router::new()
        .route("/sandboxes/{id}/terminal", get(page))
        .route("/terminal/assets/{name}", get(asset))
        .route("/v1/sandboxes/{id}/terminal", get(open))
}

/// `POST /v1/sandboxes/{id}/terminal/token`.
async fn issue_token(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Response> {
    let bytes: &[u8] = if body.is_empty() { b"{}" } else { &body };
    let request: crate::server::NewToken = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()).into_response()
    })?;
    crate::e2b::owned(&app, &principal, &id).map_err(IntoResponse::into_response)?;
    let tokens = app.tokens().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_tokens", "this server issues no tokens")
            .into_response()
    })?;
    let ttl = request.ttl_secs.map_or(DEFAULT_TOKEN_TTL, Duration::from_secs);
    let (token, expires_at) = tokens.issue_terminal(&principal, &id, ttl).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "token_failed", e.to_string())
            .into_response()
    })?;
    let url = format!("/sandboxes/{id}/terminal#token={token}");
    Ok((StatusCode::CREATED, Json(json!({ "token": token, "expires_at": expires_at, "url": url })))
        .into_response())
}

/// `GET /sandboxes/{id}/terminal`: the page. It holds no secret; what it may do comes from the
/// token it is given. Its scripts are its own files (no inline script runs).
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; font-src 'self'; \
                 frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /terminal/assets/{name}`: the page's script and xterm.js.
async fn asset(Path(name): Path<String>) -> Response {
    let (content_type, text) = match name.as_str() {
        "terminal.js" => ("text/javascript; charset=utf-8", PAGE_SCRIPT),
        "xterm.js" => ("text/javascript; charset=utf-8", XTERM_JS),
        "addon-fit.js" => ("text/javascript; charset=utf-8", XTERM_FIT_JS),
        "xterm.css" => ("text/css; charset=utf-8", XTERM_CSS),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=3600")], text)
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TerminalQuery {
    cols: Option<u32>,
    rows: Option<u32>,
    pid: Option<u32>,
    user: Option<String>,
}

/// A refusal of the WebSocket, before the upgrade.
fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

/// The terminal token among the offered subprotocols.
fn offered_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| protocol.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .map(str::to_owned)
}

/// `GET /v1/sandboxes/{id}/terminal`: checks the token, the caller's role and team, and the
/// sandbox; starts (or finds) the shell; then upgrades.
async fn open(
    State(app): State<App>,
    Path(id): Path<String>,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<TerminalQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let source = connect_info.map(|Extension(ConnectInfo(peer))| peer.ip());
    let audit = |principal: Option<&Principal>, status: StatusCode| {
        if let Some(log) = app.audit() {
            let (key_id, team) = principal.map_or(("-", "-"), |p| (&p.key_id, &p.team));
            let action = format!("GET /v1/sandboxes/{id}/terminal");
            let source = source.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
            if let Err(error) = log.append(key_id, team, action, status.as_u16(), source) {
                tracing::error!(%error, "could not append to the audit log");
            }
        }
    };
    let (Some(keys), Some(tokens)) = (app.keys(), app.tokens()) else {
        return refused(StatusCode::SERVICE_UNAVAILABLE, "no_tokens", "this server has no keys");
    };
    if let Err(error) = keys.check_source(source) {
        audit(None, StatusCode::TOO_MANY_REQUESTS);
        let mut response =
            refused(StatusCode::TOO_MANY_REQUESTS, "rate_limited", error.to_string());
        if let Ok(value) = crate::auth::FAILURE_WINDOW.as_secs().to_string().parse() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let principal = match offered_token(&headers) {
        None => Err((
            StatusCode::UNAUTHORIZED,
            format!(
                "a terminal token is needed, as the subprotocol `{TOKEN_PROTOCOL_PREFIX}<token>`: \
                 get one with `soulbox sandbox connect {id} --web` or \
                 POST /v1/sandboxes/{id}/terminal/token"
            ),
        )),
        Some(token) => tokens.verify_terminal(keys, &token, &id).map_err(|error| {
            let status = match error {
                crate::tokens::TokenError::KeyInvalid => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            (status, error.to_string())
        }),
    };
    let principal = match principal {
        Ok(principal) => principal,
        Err((status, message)) => {
            keys.count_failure(source);
            audit(None, status);
            return refused(status, "unauthorized", message);
        }
    };
    if principal.role < Role::Member {
        audit(Some(&principal), StatusCode::FORBIDDEN);
        let message = "a viewer's token opens no terminal; the call needs a member";
        return refused(StatusCode::FORBIDDEN, "unauthorized", message);
    }
    let Ok(Query(query)) = query else {
        let message = "the query takes cols, rows, pid and user";
        return refused(StatusCode::BAD_REQUEST, "invalid_request", message);
    };
    let manager = match crate::e2b::owned(&app, &principal, &id) {
        Ok(manager) => manager,
        Err(error) => {
            let response = error.into_response();
            audit(Some(&principal), response.status());
            return response;
        }
    };
    crate::envd::wake(manager, &id).await;
    let (sandbox, table) = match manager.processes(&id) {
        Ok(found) => found,
        Err(error) => return crate::e2b::E2bError::from(error).into_response(),
    };
    let size = match TerminalSize::new(query.cols.unwrap_or(80), query.rows.unwrap_or(24)) {
        Ok(size) => size,
        Err(error) => return refused(StatusCode::BAD_REQUEST, "invalid_size", error.to_string()),
    };
    let followed = match query.pid {
        Some(pid) => reattach(&table, pid),
        None => {
            let place = match app.admission().execution(&principal.team).await {
                Ok(place) => place,
                Err(refusal) => return ApiError::from(refusal).into_response(),
            };
            let user = match query.user.as_deref().map(|name| (name, SandboxUser::parse(name))) {
                None => None,
                Some((_, Some(user))) => Some(user),
                Some((name, None)) => {
                    let message = format!("no user {name}: `user` or `root`");
                    return refused(StatusCode::BAD_REQUEST, "invalid_user", message);
                }
            };
            let request = ProcessRequest {
                argv: vec!["/bin/bash".to_owned(), "-i".to_owned(), "-l".to_owned()],
                env: BTreeMap::from([("TERM".to_owned(), "xterm-256color".to_owned())]),
                user,
                stdin: true,
                tag: Some("web-terminal".to_owned()),
                terminal: Some(size),
                ..ProcessRequest::default()
            };
            let started = table.start(app.dispatcher(), &sandbox, request).await;
            drop(place);
            started
        }
    };
    let (pid, follower) = match followed {
        Ok(followed) => followed,
        Err(ProcessError::NotFound(pid)) => {
            let message = format!("no terminal with pid {pid} runs in sandbox {id}");
            return refused(StatusCode::NOT_FOUND, "not_found", message);
        }
        Err(ProcessError::Invalid(message)) => {
            return refused(StatusCode::BAD_REQUEST, "invalid_request", message);
        }
        Err(error) => {
            tracing::error!(sandbox = %id, %error, "web terminal");
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "terminal_failed",
                error.to_string(),
            );
        }
    };
    if query.pid.is_some() {
        // A reattached terminal takes the new window's size.
        let _ = table.resize(pid, size);
    } else {
        manager.count_execution(sandbox.id());
        app.telemetry().execution("terminal");
    }
    audit(Some(&principal), StatusCode::SWITCHING_PROTOCOLS);
    let failed_table = Arc::clone(&table);
    let started_here = query.pid.is_none();
    upgrade
        .protocols([PROTOCOL])
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        .on_failed_upgrade(move |error| {
            tracing::warn!(%error, "web terminal upgrade");
            // Nobody will ever see a shell started for this connection.
            if started_here {
                tokio::spawn(async move {
                    let _ = failed_table.signal(pid, soulbox_runtime::ProcessSignal::Kill).await;
                });
            }
        })
        .on_upgrade(move |socket| bridge(socket, table, pid, follower))
}

/// Follows terminal `pid` (a process with a terminal) from now on.
fn reattach(table: &ProcessTable, pid: u32) -> Result<(u32, ProcessFollower), ProcessError> {
    let is_terminal = table.list().iter().any(|p| p.pid == pid && p.request.terminal.is_some());
    if !is_terminal {
        return Err(ProcessError::NotFound(pid));
    }
    Ok((pid, table.connect(pid)?))
}

/// What a client may send as text.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Resize { cols: u32, rows: u32 },
}

async fn send_json(socket: &mut WebSocket, message: serde_json::Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(message.to_string().into())).await
}

/// Carries the terminal's bytes to the socket and the socket's to the terminal, until the
/// process ends (then says how, and closes) or the client leaves (the process runs on).
async fn bridge(
    mut socket: WebSocket,
    table: Arc<ProcessTable>,
    pid: u32,
    mut follower: ProcessFollower,
) {
    if send_json(&mut socket, json!({ "type": "started", "pid": pid })).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            event = follower.next() => match event {
                Some(ProcessEvent::Stdout(data) | ProcessEvent::Stderr(data)) => {
                    if socket.send(Message::Binary(data)).await.is_err() {
                        return;
                    }
                }
                Some(ProcessEvent::End(end)) => {
                    let end = match end {
                        ProcessEnd::Exited(code) => json!({ "type": "exit", "exit_code": code }),
                        ProcessEnd::Signalled(signal) => json!({ "type": "exit", "signal": signal }),
                        ProcessEnd::Lost => json!({ "type": "exit", "lost": true }),
                    };
                    let _ = send_json(&mut socket, end).await;
                    let close = CloseFrame { code: 1000, reason: "the process ended".into() };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    return;
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            message = socket.recv() => {
                let refusal = match message {
                    Some(Ok(Message::Binary(data))) => {
                        table.send_input(pid, &data).await.err().map(|e| e.to_string())
                    }
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ClientMessage>(text.as_str()) {
                            Ok(ClientMessage::Resize { cols, rows }) => TerminalSize::new(cols, rows)
                                .and_then(|size| table.resize(pid, size))
                                .err()
                                .map(|e| e.to_string()),
                            Err(error) => Some(format!(
                                "a text message is JSON, {{\"type\":\"resize\",\"cols\",\"rows\"}} \
                                 (keys go in binary messages): {error}"
                            )),
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                    // The client left: the shell runs on, to reattach.
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Some(message) = refusal
                    && send_json(&mut socket, json!({ "type": "error", "message": message }))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
    }
}
