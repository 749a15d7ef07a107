//! E2B's code interpreter (port 49999, protocol.md section 4): `POST /execute` runs a cell and
//! answers one JSON object per line (`number_of_executions`, `stdout`, `stderr`, `result`,
//! `error`, `end_of_execution`); `/contexts` creates, lists, restarts and removes cell
//! contexts, each with its own stateful kernel per language. Cells go through the
//! dispatcher: Python, JavaScript and Ruby to the WASM tier's kernels, native languages to
//! the native tier. A client that hangs up stops its cell.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use soulbox_runtime::{
    CellResult, ExecEvent, ExecKind, ExecRequest, Language, LanguageStatus, Termination,
    TierPreference,
};
use tokio::sync::mpsc;

use crate::app::App;
use crate::envd::LiveSandbox;

/// How long a cell may run: E2B's default `run_code` timeout. A client that gives up sooner
/// hangs up, which stops the cell.
const CELL_TIMEOUT: Duration = Duration::from_secs(300);

/// The language of a cell that names none.
const DEFAULT_LANGUAGE: &str = "python";

/// The most contexts a sandbox may have.
const MAX_CONTEXTS_PER_SANDBOX: usize = 64;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/health", get(|| async { Json("OK") }))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}", delete(remove_context))
        .route("/contexts/{id}/restart", post(restart_context))
}

/// A cell context.
#[derive(Debug, Clone)]
struct Context {
    language: String,
    cwd: String,
}

/// The contexts of one sandbox, and how many cells each kernel has run.
#[derive(Debug, Default)]
struct SandboxContexts {
    contexts: BTreeMap<String, Context>,
    /// By context (`None`: the default one) and language.
    executions: HashMap<(Option<String>, String), u64>,
}

/// The contexts of every sandbox.
#[derive(Debug, Default)]
pub(crate) struct Contexts {
    sandboxes: Mutex<HashMap<String, SandboxContexts>>,
}

impl Contexts {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, SandboxContexts>> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the contexts of sandboxes that are gone.
    fn prune(&self, app: &App) {
        let Some(manager) = app.manager() else { return };
        self.lock().retain(|id, _| manager.get(id).is_ok());
    }
}

/// An error: a status and a plain-text body (the SDK shows the body).
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Refusal(status, message.into()).into_response()
}

/// A request refused, with its status and why.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// The canonical language of a request (`js` is JavaScript, and so on).
fn language_of(name: Option<&str>) -> String {
    Language::parse(name.filter(|n| !n.is_empty()).unwrap_or(DEFAULT_LANGUAGE)).as_str().to_owned()
}

/// Whether a tier of this server can run `language` now.
fn runnable(app: &App, language: &str) -> Result<(), Refusal> {
    let languages = app.dispatcher().languages();
    let ready = languages
        .iter()
        .any(|(_, l)| l.language.as_str() == language && l.status == LanguageStatus::Ready);
    if ready {
        return Ok(());
    }
    let mut known: Vec<String> = languages
        .iter()
        .filter(|(_, l)| l.status == LanguageStatus::Ready)
        .map(|(_, l)| l.language.to_string())
        .collect();
    known.sort();
    known.dedup();
    Err(Refusal(
        StatusCode::BAD_REQUEST,
        format!("language '{language}' is not available here; languages: {}", known.join(", ")),
    ))
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

async fn execute(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    body: Bytes,
) -> Response {
    let request: ExecuteRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    if request.context_id.is_some() && request.language.is_some() {
        return error(StatusCode::BAD_REQUEST, "give either `context_id` or `language`, not both");
    }
    let sandbox_id = live.record.id.to_string();
    let language = match &request.context_id {
        Some(id) => {
            let contexts = app.contexts().lock();
            match contexts.get(&sandbox_id).and_then(|s| s.contexts.get(id)) {
                Some(context) => context.language.clone(),
                None => return error(StatusCode::NOT_FOUND, format!("context {id} not found")),
            }
        }
        None => language_of(request.language.as_deref()),
    };
    if let Err(refusal) = runnable(&app, &language) {
        return refusal.into_response();
    }
    let kernel = Some((&live.record.id, request.context_id.as_deref()));
    if let Err(refusal) = app.check_kernel_room(&Language::parse(&language), kernel) {
        return crate::e2b::E2bError::from(refusal).into_response();
    }
    // A refused cell counts for nothing.
    let place = match app.admission().execution(&live.record.team).await {
        Ok(place) => place,
        Err(refusal) => return crate::e2b::E2bError::from(refusal).into_response(),
    };
    let count = {
        let mut contexts = app.contexts().lock();
        let executions = &mut contexts.entry(sandbox_id).or_default().executions;
        let count = executions.entry((request.context_id.clone(), language.clone())).or_default();
        *count += 1;
        *count
    };
    let mut limits = live.sandbox.spec().limits;
    limits.wall_timeout = CELL_TIMEOUT;
    let exec = ExecRequest {
        kind: ExecKind::Cell { language: Language::parse(&language), code: request.code },
        env: request.env_vars.unwrap_or_default(),
        limits,
        tier: TierPreference::Auto,
        context: request.context_id,
    };
    let mut execution = match app.dispatcher().start(live.sandbox.clone(), exec) {
        Ok(execution) => execution,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(manager) = app.manager() {
        manager.count_execution(&live.record.id);
    }
    app.telemetry().execution("cell");
    let (lines, receiver) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let _place = place;
        let mut text = TextStreams::default();
        let first = json!({ "type": "number_of_executions", "execution_count": count });
        if lines.send(Ok(line_of(&first))).await.is_err() {
            return;
        }
        while let Some(event) = execution.next_event().await {
            let messages = match event {
                ExecEvent::Stdout(bytes) => text.stdout(&bytes),
                ExecEvent::Stderr(bytes) => text.stderr(&bytes),
                ExecEvent::Result(result) => vec![result_line(&result)],
                ExecEvent::Error(e) => vec![json!({
                    "type": "error", "name": e.name, "value": e.value, "traceback": e.traceback,
                })],
                ExecEvent::End(summary) => match &summary.termination {
                    Termination::Exited { .. } => vec![],
                    other => vec![termination_error(other)],
                },
                ExecEvent::Failed(message) => vec![json!({
                    "type": "error", "name": "SandboxError", "value": message, "traceback": message,
                })],
            };
            for message in messages {
                if lines.send(Ok(line_of(&message))).await.is_err() {
                    return; // the client hung up: dropping the execution stops the cell
                }
            }
        }
        let _ = lines.send(Ok(line_of(&json!({ "type": "end_of_execution" })))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn line_of(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A cell stopped by SoulBox, as an error the SDK shows.
fn termination_error(termination: &Termination) -> Value {
    let name = match termination {
        Termination::TimedOut { .. } => "TimeoutError",
        Termination::MemoryExceeded { .. } => "MemoryError",
        Termination::OutputLimitExceeded { .. } => "OutputLimitError",
        _ => "ExecutionError",
    };
    let value = termination.to_string();
    json!({ "type": "error", "name": name, "value": value, "traceback": format!("{name}: {value}") })
}

/// Standard output and error as text, keeping a multibyte character split between two
/// chunks whole.
#[derive(Debug, Default)]
struct TextStreams {
    pending: [Vec<u8>; 2],
}

impl TextStreams {
    fn stdout(&mut self, bytes: &[u8]) -> Vec<Value> {
        self.text(0, "stdout", bytes)
    }

    fn stderr(&mut self, bytes: &[u8]) -> Vec<Value> {
        self.text(1, "stderr", bytes)
    }

    fn text(&mut self, index: usize, kind: &str, bytes: &[u8]) -> Vec<Value> {
        let pending = &mut self.pending[index];
        pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(pending) {
            Ok(_) => pending.len(),
            // An incomplete character at the end waits for the next chunk; invalid bytes
            // elsewhere are replaced.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let rest = pending.split_off(complete);
        let text = String::from_utf8_lossy(pending).into_owned();
        *pending = rest;
        if text.is_empty() {
            return vec![];
        }
        let timestamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        vec![json!({ "type": kind, "text": text, "timestamp": timestamp })]
    }
}

/// A `result` line from a Jupyter MIME bundle.
fn result_line(result: &CellResult) -> Value {
    let mut line = Map::new();
    line.insert("type".into(), json!("result"));
    let mut extra = Map::new();
    for (mime, value) in &result.data {
        let field = match mime.as_str() {
            "text/plain" => "text",
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/javascript" => "javascript",
            "application/json" => "json",
            "e2b/data" => "data",
            "e2b/chart" => "chart",
            _ => {
                extra.insert(mime.clone(), json!(value));
                continue;
            }
        };
        let value = match field {
            "json" | "data" | "chart" => {
                serde_json::from_str(value).unwrap_or_else(|_| json!(value))
            }
            "text" => json!(strip_quotes(value)),
            _ => json!(value),
        };
        line.insert(field.into(), value);
    }
    line.insert("extra".into(), Value::Object(extra));
    line.insert("is_main_result".into(), json!(result.is_main_result));
    Value::Object(line)
}

/// The text of a string value without its quotes, as E2B's server gives it.
fn strip_quotes(text: &str) -> &str {
    let quoted = text.len() >= 2
        && ((text.starts_with('\'') && text.ends_with('\''))
            || (text.starts_with('"') && text.ends_with('"')));
    if quoted { &text[1..text.len() - 1] } else { text }
}

/// Where a kernel starts.
const DEFAULT_CWD: &str = "/home/user";

/// Makes `cwd` the working directory of a new context's kernel, with a first, silent cell.
async fn change_directory(
    app: &App,
    live: &LiveSandbox,
    context: &str,
    language: &str,
    cwd: &str,
) -> Result<(), Refusal> {
    // A JSON string is a valid string literal in both languages.
    let literal = serde_json::to_string(cwd).unwrap_or_default();
    let code = match language {
        "python" => format!("__import__('os').chdir({literal})"),
        "ruby" => format!("Dir.chdir({literal}); nil"),
        _ => {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "a `cwd` other than {DEFAULT_CWD} is supported for python and ruby contexts"
                ),
            ));
        }
    };
    let mut exec = ExecRequest::cell(Language::parse(language), code);
    exec.context = Some(context.to_owned());
    let output = match app.dispatcher().start(live.sandbox.clone(), exec) {
        Ok(execution) => execution.collect().await,
        Err(e) => return Err(Refusal(StatusCode::BAD_REQUEST, e.to_string())),
    };
    match (output.error, output.failure) {
        (None, None) => Ok(()),
        (Some(e), _) => {
            Err(Refusal(StatusCode::BAD_REQUEST, format!("cwd {cwd}: {}: {}", e.name, e.value)))
        }
        (None, Some(failure)) => Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, failure)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CreateContext {
    language: Option<String>,
    cwd: Option<String>,
}

fn context_json(id: &str, context: &Context) -> Value {
    json!({ "id": id, "language": context.language, "cwd": context.cwd })
}

async fn create_context(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    body: Bytes,
) -> Response {
    let bytes: &[u8] = if body.is_empty() { b"{}" } else { &body };
    let request: CreateContext = match serde_json::from_slice(bytes) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    let language = language_of(request.language.as_deref());
    if let Err(refusal) = runnable(&app, &language) {
        return refusal.into_response();
    }
    app.contexts().prune(&app);
    let cwd = request.cwd.filter(|c| !c.is_empty()).unwrap_or_else(|| DEFAULT_CWD.to_owned());
    let id = uuid::Uuid::new_v4().to_string();
    if cwd != DEFAULT_CWD
        && let Err(refusal) = change_directory(&app, &live, &id, &language, &cwd).await
    {
        return refusal.into_response();
    }
    let context = Context { language, cwd };
    let mut contexts = app.contexts().lock();
    let sandbox = contexts.entry(live.record.id.to_string()).or_default();
    if sandbox.contexts.len() >= MAX_CONTEXTS_PER_SANDBOX {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("a sandbox may have {MAX_CONTEXTS_PER_SANDBOX} contexts; remove one first"),
        );
    }
    let answer = context_json(&id, &context);
    sandbox.contexts.insert(id, context);
    Json(answer).into_response()
}

async fn list_contexts(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
) -> Response {
    let contexts = app.contexts().lock();
    let listed: Vec<Value> = contexts
        .get(live.record.id.as_str())
        .map(|s| s.contexts.iter().map(|(id, c)| context_json(id, c)).collect())
        .unwrap_or_default();
    Json(listed).into_response()
}

/// Forgets a context's kernels (and its execution counts); with `remove`, the context too.
async fn reset(app: &App, live: &LiveSandbox, id: &str, remove: bool) -> Response {
    let known = {
        let mut contexts = app.contexts().lock();
        let sandbox = contexts.entry(live.record.id.to_string()).or_default();
        let known = sandbox.contexts.contains_key(id);
        if known {
            sandbox.executions.retain(|(context, _), _| context.as_deref() != Some(id));
            if remove {
                sandbox.contexts.remove(id);
            }
        }
        known
    };
    if !known {
        return error(StatusCode::NOT_FOUND, format!("context {id} not found"));
    }
    app.dispatcher().reset_context(&live.sandbox, id).await;
    Json(json!({})).into_response()
}

async fn remove_context(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    Path(id): Path<String>,
) -> Response {
    reset(&app, &live, &id, true).await
}

async fn restart_context(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    Path(id): Path<String>,
) -> Response {
    reset(&app, &live, &id, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_chunks_stays_whole() {
        let mut streams = TextStreams::default();
        let euro = "€".as_bytes();
        assert!(streams.stdout(&euro[..1]).is_empty());
        let lines = streams.stdout(&euro[1..]);
        assert_eq!(lines[0]["text"], "€");
    }

    #[test]
    fn mime_bundles_become_result_fields() {
        let mut data = BTreeMap::new();
        data.insert("text/plain".to_owned(), "'y'".to_owned());
        data.insert("application/json".to_owned(), r#"{"k":1}"#.to_owned());
        data.insert("application/x-custom".to_owned(), "z".to_owned());
        let line = result_line(&CellResult { data, is_main_result: true });
        assert_eq!(line["text"], "y");
        assert_eq!(line["json"], json!({"k": 1}));
        assert_eq!(line["extra"], json!({"application/x-custom": "z"}));
        assert_eq!(line["is_main_result"], true);
    }
}
