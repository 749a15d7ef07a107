//! envd's `filesystem.Filesystem` service (protocol.md, 3.5) on the sandbox's files (see
//! [`super::paths`]): `Stat`, `MakeDir`, `Move`, `ListDir` with a depth, `Remove`, and
//! directory watchers — streamed (`WatchDir`, the async SDK) or polled (`CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`, the sync SDK) — on the kernel's inotify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use notify::event::{EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::LiveSandbox;
use super::connect::{
    CallBody, Code, ConnectError, error_for, keepalive, request_message, server_stream,
    stream_error, unary,
};
use super::paths::{
    Area, EntryInfo, PathError, PathErrorKind, SandboxFiles, SandboxPath, entry_info,
};
use crate::app::App;

/// The most entries one `ListDir` returns.
const MAX_LISTED_ENTRIES: usize = 100_000;
/// The most watchers a sandbox may have at once.
const MAX_WATCHERS_PER_SANDBOX: usize = 64;
/// The most events a polled watcher keeps between two polls; older ones are dropped.
const MAX_PENDING_EVENTS: usize = 10_000;
/// How long a watch stream stays silent before a keepalive when the client asks none.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route("/filesystem.Filesystem/GetWatcherEvents", post(get_watcher_events))
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
}

impl From<PathError> for ConnectError {
    fn from(error: PathError) -> Self {
        let code = match error.kind {
            PathErrorKind::NotFound => Code::NotFound,
            PathErrorKind::Invalid => Code::InvalidArgument,
            PathErrorKind::AlreadyExists => Code::AlreadyExists,
            PathErrorKind::Denied => Code::PermissionDenied,
            PathErrorKind::NoSpace => Code::ResourceExhausted,
            PathErrorKind::Internal => Code::Internal,
        };
        Self::new(code, error.message)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListDirRequest {
    path: String,
    depth: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WatchRequest {
    path: String,
    recursive: bool,
    #[serde(alias = "include_entry")]
    include_entry: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WatcherRequest {
    #[serde(alias = "watcher_id")]
    watcher_id: String,
}

/// Runs a unary call: parses its message, runs `call` on the sandbox's files (on a blocking
/// thread), answers.
async fn unary_call<T, F>(
    app: App,
    live: LiveSandbox,
    headers: HeaderMap,
    body: Bytes,
    call: F,
) -> Response
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: FnOnce(&SandboxFiles, T) -> Result<Value, ConnectError> + Send + 'static,
{
    let result = match request_message::<T>(&headers, &body) {
        Ok(request) => tokio::task::spawn_blocking(move || {
            let files = super::sandbox_files(&app, &live)?;
            call(&files, request)
        })
        .await
        .unwrap_or_else(|e| Err(ConnectError::new(Code::Internal, e.to_string()))),
        Err(error) => Err(error),
    };
    match result {
        Ok(message) => unary(&message),
        Err(error) => error_for(&headers, error),
    }
}

async fn stat(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    unary_call(app, live, headers, body, |files, request: PathRequest| {
        let path = SandboxPath::resolve(&request.path)?;
        Ok(json!({ "entry": entry_info(files, &path)? }))
    })
    .await
}

async fn make_dir(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    unary_call(app, live, headers, body, |files, request: PathRequest| {
        let path = SandboxPath::resolve(&request.path)?;
        match files.dir(&path)?.symlink_metadata(&path.relative) {
            Ok(metadata) if metadata.is_dir() => {
                return Err(ConnectError::new(
                    Code::AlreadyExists,
                    format!("directory {} already exists", path.shown),
                ));
            }
            Ok(_) => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("{} exists and is not a directory", path.shown),
                ));
            }
            Err(_) => {}
        }
        files.make_dirs(&path)?;
        Ok(json!({ "entry": entry_info(files, &path)? }))
    })
    .await
}

async fn move_entry(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    unary_call(app, live, headers, body, |files, request: MoveRequest| {
        let source = SandboxPath::resolve(&request.source)?;
        let destination = SandboxPath::resolve(&request.destination)?;
        if source.area != destination.area {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!(
                    "{} and {} are on different file systems; copy, then remove",
                    source.shown, destination.shown
                ),
            ));
        }
        if source.is_root() || destination.is_root() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("{} cannot be moved or replaced", source.shown),
            ));
        }
        let dir = files.dir(&source)?;
        dir.symlink_metadata(&source.relative).map_err(|e| PathError::io(&source.shown, &e))?;
        if let Some(parent) = destination.parent() {
            files.make_dirs(&parent)?;
        }
        dir.rename(&source.relative, &dir, &destination.relative)
            .map_err(|e| PathError::io(&source.shown, &e))?;
        Ok(json!({ "entry": entry_info(files, &destination)? }))
    })
    .await
}

async fn list_dir(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    unary_call(app, live, headers, body, |files, request: ListDirRequest| {
        let path = SandboxPath::resolve(&request.path)?;
        // Opening it says whether it is a directory, and refuses one through a link that
        // leads outside.
        files.dir(&path)?.open_dir(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
        let mut entries = Vec::new();
        list(files, &path, request.depth.max(1), &mut entries)?;
        Ok(json!({ "entries": entries }))
    })
    .await
}

/// Appends the entries below `path`, `depth` levels deep (symbolic links are not followed).
fn list(
    files: &SandboxFiles,
    path: &SandboxPath,
    depth: u32,
    out: &mut Vec<EntryInfo>,
) -> Result<(), ConnectError> {
    let entries =
        files.dir(path)?.read_dir(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
    let mut children: Vec<SandboxPath> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str().map(|name| path.join(name)))
        .collect();
    children.sort_by(|a, b| a.shown.cmp(&b.shown));
    for child in children {
        // An entry removed meanwhile is skipped.
        let Ok(info) = entry_info(files, &child) else { continue };
        let descend =
            depth > 1 && info.file_type == super::paths::FILE_TYPE_DIRECTORY && !info.is_symlink;
        out.push(info);
        if out.len() > MAX_LISTED_ENTRIES {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("more than {MAX_LISTED_ENTRIES} entries; list with a smaller depth"),
            ));
        }
        if descend {
            list(files, &child, depth - 1, out)?;
        }
    }
    Ok(())
}

async fn remove(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    unary_call(app, live, headers, body, |files, request: PathRequest| {
        let path = SandboxPath::resolve(&request.path)?;
        if path.is_root() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("{} cannot be removed; remove what is in it instead", path.shown),
            ));
        }
        let dir = files.dir(&path)?;
        let metadata =
            dir.symlink_metadata(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
        let removed = if metadata.is_dir() {
            dir.remove_dir_all(&path.relative)
        } else {
            dir.remove_file(&path.relative)
        };
        removed.map_err(|e| PathError::io(&path.shown, &e))?;
        Ok(json!({}))
    })
    .await
}

/// The polled watchers of every sandbox, by id.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    watchers: Mutex<HashMap<String, PolledWatcher>>,
}

struct PolledWatcher {
    sandbox: String,
    /// Kept for its inotify watch; dropping it stops the watch.
    _watcher: RecommendedWatcher,
    events: Arc<Mutex<Vec<Value>>>,
}

impl std::fmt::Debug for PolledWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolledWatcher").field("sandbox", &self.sandbox).finish_non_exhaustive()
    }
}

impl Watchers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, PolledWatcher>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the watchers of sandboxes that are gone.
    fn prune(&self, app: &App) {
        let Some(manager) = app.manager() else { return };
        self.lock().retain(|_, w| manager.get(&w.sandbox).is_ok());
    }
}

/// A watch on a directory of the sandbox (of its workspace, or of its native `/tmp`).
async fn watch(
    app: &App,
    live: &LiveSandbox,
    request: &WatchRequest,
    on_event: impl Fn(Value) + Send + 'static,
) -> Result<RecommendedWatcher, ConnectError> {
    let path = SandboxPath::resolve(&request.path)?;
    let tmp = match path.area {
        Area::Home => None,
        Area::Tmp => Some(super::native_tmp(app, live).await?),
    };
    let files = SandboxFiles::with_tmp(&live.sandbox, tmp)?;
    files.dir(&path)?.open_dir(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
    let watched = match path.area {
        Area::Home => {
            let failed = |e: std::io::Error| PathError::io(&path.shown, &e);
            let root = live.sandbox.workspace().canonicalize().map_err(failed)?;
            let watched = root.join(&path.relative).canonicalize().map_err(failed)?;
            if !watched.starts_with(&root) {
                let message = format!("{}: leads outside the sandbox's files", path.shown);
                return Err(PathError::new(PathErrorKind::Denied, message).into());
            }
            watched
        }
        // The native /tmp is reached through the descriptor of its directory (in the
        // sandbox's mount namespace), which the watcher keeps open.
        Area::Tmp => files.tmp_descriptor_path()?.join(&path.relative),
    };
    let include_entry = request.include_entry;
    let shown = path.clone();
    let prefix = watched.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let Some(kind) = event_type(event.kind) else { return };
        for changed in &event.paths {
            let Ok(name) = changed.strip_prefix(&prefix) else { continue };
            let Some(name) = name.to_str().filter(|n| !n.is_empty()) else { continue };
            let mut message = json!({ "name": name, "type": kind });
            if include_entry && let Ok(info) = entry_info(&files, &shown.join(name)) {
                message["entry"] = json!(info);
            }
            on_event(message);
        }
    };
    let mut watcher = notify::recommended_watcher(handler)
        .map_err(|e| ConnectError::new(Code::Internal, format!("watching: {e}")))?;
    let mode =
        if request.recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
    watcher
        .watch(&watched, mode)
        .map_err(|e| ConnectError::new(Code::Internal, format!("watching {}: {e}", path.shown)))?;
    Ok(watcher)
}

/// envd's `EventType` of a change, or none for changes it does not report (reads).
fn event_type(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Create(_) => Some("EVENT_TYPE_CREATE"),
        EventKind::Modify(ModifyKind::Metadata(_)) => Some("EVENT_TYPE_CHMOD"),
        EventKind::Modify(ModifyKind::Name(_)) => Some("EVENT_TYPE_RENAME"),
        EventKind::Modify(_) => Some("EVENT_TYPE_WRITE"),
        EventKind::Remove(_) => Some("EVENT_TYPE_REMOVE"),
        EventKind::Access(_) | EventKind::Any | EventKind::Other => None,
    }
}

async fn watch_dir(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let request: WatchRequest = match request_message(&headers, &body) {
        Ok(request) => request,
        Err(error) => return stream_error(error),
    };
    let (events, mut received) = mpsc::channel::<Value>(MAX_PENDING_EVENTS);
    let watcher = match watch(&app, &live, &request, move |event| {
        let _ = events.try_send(event);
    })
    .await
    {
        Ok(watcher) => watcher,
        Err(error) => return stream_error(error),
    };
    let keepalive = keepalive(&headers).unwrap_or(DEFAULT_KEEPALIVE);
    let (sender, response) = server_stream();
    tokio::spawn(async move {
        let _watcher = watcher;
        if !sender.send(&json!({ "start": {} })).await {
            return;
        }
        loop {
            let message = tokio::select! {
                event = received.recv() => match event {
                    Some(event) => json!({ "filesystem": event }),
                    None => return sender.end(None).await,
                },
                () = tokio::time::sleep(keepalive) => json!({ "keepalive": {} }),
                () = sender.closed() => return,
            };
            if !sender.send(&message).await {
                return;
            }
        }
    });
    response
}

async fn create_watcher(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = async {
        let request: WatchRequest = request_message(&headers, &body)?;
        let watchers = app.watchers();
        watchers.prune(&app);
        let sandbox = live.record.id.to_string();
        if watchers.lock().values().filter(|w| w.sandbox == sandbox).count()
            >= MAX_WATCHERS_PER_SANDBOX
        {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("a sandbox may have {MAX_WATCHERS_PER_SANDBOX} watchers; remove one first"),
            ));
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let pending = Arc::clone(&events);
        let watcher = watch(&app, &live, &request, move |event| {
            let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len() < MAX_PENDING_EVENTS {
                pending.push(event);
            }
        })
        .await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        watchers.lock().insert(id.clone(), PolledWatcher { sandbox, _watcher: watcher, events });
        Ok::<_, ConnectError>(json!({ "watcherId": id }))
    }
    .await;
    match result {
        Ok(message) => unary(&message),
        Err(error) => error_for(&headers, error),
    }
}

fn watcher_not_found(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher {id} not found"))
}

async fn get_watcher_events(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = request_message::<WatcherRequest>(&headers, &body).and_then(|request| {
        let watchers = app.watchers().lock();
        let watcher = watchers
            .get(&request.watcher_id)
            .filter(|w| w.sandbox == live.record.id.as_str())
            .ok_or_else(|| watcher_not_found(&request.watcher_id))?;
        let events =
            std::mem::take(&mut *watcher.events.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(json!({ "events": events }))
    });
    match result {
        Ok(message) => unary(&message),
        Err(error) => error_for(&headers, error),
    }
}

async fn remove_watcher(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = request_message::<WatcherRequest>(&headers, &body).and_then(|request| {
        let mut watchers = app.watchers().lock();
        let owned =
            watchers.get(&request.watcher_id).is_some_and(|w| w.sandbox == live.record.id.as_str());
        if !owned {
            return Err(watcher_not_found(&request.watcher_id));
        }
        watchers.remove(&request.watcher_id);
        Ok(json!({}))
    });
    match result {
        Ok(message) => unary(&message),
        Err(error) => error_for(&headers, error),
    }
}
