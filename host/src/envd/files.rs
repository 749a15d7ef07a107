//! envd's file transfer (protocol.md, 3.1.1–3.1.3): `GET /files` downloads a file (gzip when
//! the client accepts it), `POST /files` uploads one or more — multipart parts named `file`
//! whose `filename` is the full target path, or one raw body (octet-stream, gzip allowed) for
//! the `path` in the query. Parent directories are made; a target that is a directory is a
//! 400. Errors are E2B's JSON `{"code", "message"}`. A signed URL (`signature`,
//! `signature_expiration`) stands in for the access token.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use cap_std::fs::OpenOptions;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use soulbox_runtime::{SandboxRecord, SandboxState, SandboxUser};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::paths::{PathError, PathErrorKind, SandboxFiles, SandboxPath};
use super::{ENVD_PORT, LiveSandbox, Target};
use crate::app::App;

/// The largest upload accepted in one request.
pub(crate) const MAX_UPLOAD_BYTES: usize = 4 << 30;

/// The size of the chunks a download is sent in.
const DOWNLOAD_CHUNK: usize = 256 << 10;

pub(super) fn routes() -> Router<crate::app::App> {
    Router::new()
        .route("/files", get(download).post(upload))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
}

/// An error of the files API, in E2B's shape.
#[derive(Debug)]
struct FilesError {
    status: StatusCode,
    message: String,
}

impl FilesError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl From<PathError> for FilesError {
    fn from(error: PathError) -> Self {
        let status = match error.kind {
            PathErrorKind::NotFound => StatusCode::NOT_FOUND,
            PathErrorKind::Invalid | PathErrorKind::AlreadyExists => StatusCode::BAD_REQUEST,
            PathErrorKind::Denied => StatusCode::FORBIDDEN,
            PathErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            PathErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.message)
    }
}

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// The user a `username` names (unknown users are refused, as envd refuses them).
fn user_of(query: &HashMap<String, String>) -> Result<SandboxUser, FilesError> {
    match query.get("username").map(String::as_str) {
        None | Some("") => Ok(SandboxUser::User),
        Some(name) => SandboxUser::parse(name).ok_or_else(|| {
            FilesError::new(StatusCode::UNAUTHORIZED, format!("unknown user '{name}'"))
        }),
    }
}

/// E2B's URL signature: `v1_` + base64 (no padding) of the SHA-256 of
/// `path:operation:user:token[:expiration]`.
fn signature(
    path: &str,
    operation: &str,
    user: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let mut text = format!("{path}:{operation}:{user}:{token}");
    if let Some(expiration) = expiration {
        text.push(':');
        text.push_str(expiration);
    }
    let digest = Sha256::digest(text.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

fn query_of(request: &Request) -> HashMap<String, String> {
    request.uri().query().and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default()
}

/// Whether the request's signature is valid for the sandbox and not expired.
pub(super) fn signature_valid(record: &SandboxRecord, request: &Request) -> bool {
    let query = query_of(request);
    let Some(given) = query.get("signature") else { return false };
    let operation = if request.method() == axum::http::Method::GET { "read" } else { "write" };
    let expiration = query.get("signature_expiration").map(String::as_str);
    if let Some(expiration) = expiration {
        let Ok(expiration) = expiration.parse::<u64>() else { return false };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if expiration < now {
            return false;
        }
    }
    let path = query.get("path").map(String::as_str).unwrap_or_default();
    let user = query.get("username").map(String::as_str).unwrap_or_default();
    let expected = signature(path, operation, user, &record.access_token, expiration);
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// The sandbox a signed `/files` URL without a sandbox id belongs to: the running sandbox
/// whose token its signature verifies with.
pub(super) fn signed_target(app: &App, request: &Request) -> Option<Target> {
    if request.uri().path() != "/files" || !query_of(request).contains_key("signature") {
        return None;
    }
    let manager = app.manager()?;
    let filter =
        soulbox_runtime::ListFilter { states: vec![SandboxState::Running], ..Default::default() };
    manager
        .list(&filter)
        .sandboxes
        .into_iter()
        .find(|record| !record.access_token.is_empty() && signature_valid(record, request))
        .map(|record| Target { sandbox_id: record.id.to_string(), port: ENVD_PORT })
}

async fn download(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, FilesError> {
    user_of(&query)?;
    let path = SandboxPath::resolve(query.get("path").map(String::as_str).unwrap_or_default())?;
    let shown = path.shown.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let files = super::sandbox_files(&app, &live)?;
        let dir = files.dir(&path)?;
        let metadata = dir.metadata(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
        if metadata.is_dir() {
            return Err(PathError::new(
                PathErrorKind::Invalid,
                format!("{} is a directory", path.shown),
            ));
        }
        let file = dir.open(&path.relative).map_err(|e| PathError::io(&path.shown, &e))?;
        Ok((file.into_std(), metadata.len()))
    })
    .await
    .map_err(|e| FilesError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (file, len) = opened;
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().split(';').next() == Some("gzip")));
    let (chunks, receiver) = mpsc::channel::<io::Result<Bytes>>(4);
    // The file is read (and compressed) on a blocking thread, a chunk at a time.
    tokio::task::spawn_blocking(move || {
        let sender = ChunkSender(chunks.clone());
        let sent = if gzip {
            let mut encoder = flate2::write::GzEncoder::new(sender, flate2::Compression::fast());
            copy_in_chunks(file, &mut encoder).and_then(|()| encoder.finish().map(drop))
        } else {
            copy_in_chunks(file, &mut ChunkSender(chunks.clone()))
        };
        if let Err(e) = sent {
            tracing::debug!(path = %shown, error = %e, "download stopped");
            let _ = chunks.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    if gzip {
        response.headers_mut().insert(header::CONTENT_ENCODING, "gzip".parse().expect("a header"));
    } else if let Ok(value) = len.to_string().parse() {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    Ok(response)
}

/// Writes what it is given to a response body as chunks.
struct ChunkSender(mpsc::Sender<io::Result<Bytes>>);

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client left"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn copy_in_chunks(mut file: std::fs::File, out: &mut impl Write) -> io::Result<()> {
    let mut buffer = vec![0u8; DOWNLOAD_CHUNK];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buffer[..n])?;
    }
}

/// What an upload wrote, as the SDK expects it.
fn written(path: &SandboxPath) -> serde_json::Value {
    json!({ "path": path.shown, "name": path.name(), "type": "file" })
}

/// Opens `path` for writing (truncating it), making its parent directories.
fn create_file(files: &SandboxFiles, path: &SandboxPath) -> Result<std::fs::File, PathError> {
    if let Some(parent) = path.parent() {
        files.make_dirs(&parent)?;
    }
    let dir = files.dir(path)?;
    if dir.metadata(&path.relative).is_ok_and(|m| m.is_dir()) {
        return Err(PathError::new(
            PathErrorKind::Invalid,
            format!("{} is a directory", path.shown),
        ));
    }
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    let file =
        dir.open_with(&path.relative, &options).map_err(|e| PathError::io(&path.shown, &e))?;
    Ok(file.into_std())
}

/// A file being written on a blocking thread, fed chunk by chunk.
struct FileWriter {
    chunks: mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<Result<(), PathError>>,
}

impl FileWriter {
    fn start(app: &App, live: &LiveSandbox, path: SandboxPath, gunzip: bool) -> Self {
        let (chunks, mut received) = mpsc::channel::<Bytes>(8);
        let (app, live) = (app.clone(), live.clone());
        let done = tokio::task::spawn_blocking(move || {
            let files = super::sandbox_files(&app, &live)?;
            let file = create_file(&files, &path)?;
            let mut out: Box<dyn Write> =
                if gunzip { Box::new(flate2::write::GzDecoder::new(file)) } else { Box::new(file) };
            let failed = |e: io::Error| PathError::io(&path.shown, &e);
            while let Some(chunk) = received.blocking_recv() {
                out.write_all(&chunk).map_err(failed)?;
            }
            out.flush().map_err(failed)
        });
        Self { chunks, done }
    }

    async fn write(&self, chunk: Bytes) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    async fn finish(self) -> Result<(), FilesError> {
        drop(self.chunks);
        self.done
            .await
            .map_err(|e| FilesError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(FilesError::from)
    }
}

async fn upload(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Response, FilesError> {
    user_of(&query)?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let query_path =
        query.get("path").filter(|p| !p.is_empty()).map(|p| SandboxPath::resolve(p)).transpose()?;
    if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| FilesError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        return upload_multipart(&app, &live, multipart, query_path).await;
    }
    let path = query_path.ok_or_else(|| {
        FilesError::new(
            StatusCode::BAD_REQUEST,
            "a raw upload needs the target `path` in the query",
        )
    })?;
    let gunzip = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let writer = FileWriter::start(&app, &live, path.clone(), gunzip);
    let mut body = request.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| FilesError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        if !writer.write(chunk).await {
            break; // the writer failed; `finish` says why
        }
    }
    writer.finish().await?;
    Ok(axum::Json(json!([written(&path)])).into_response())
}

async fn upload_multipart(
    app: &App,
    live: &LiveSandbox,
    mut multipart: Multipart,
    query_path: Option<SandboxPath>,
) -> Result<Response, FilesError> {
    let bad = |message: String| FilesError::new(StatusCode::BAD_REQUEST, message);
    let mut written_paths: Vec<SandboxPath> = Vec::new();
    while let Some(mut field) = multipart.next_field().await.map_err(|e| bad(e.body_text()))? {
        if field.name() != Some("file") {
            continue;
        }
        // The file name is the full target path; the query's path wins for a single file.
        let path = match (&query_path, field.file_name()) {
            (Some(path), _) => path.clone(),
            (None, Some(name)) => SandboxPath::resolve(name)?,
            (None, None) => {
                return Err(bad("a `file` part needs a filename (its target path)".into()));
            }
        };
        if written_paths.iter().any(|p| p.shown == path.shown) {
            return Err(bad(format!("{} is written twice in one request", path.shown)));
        }
        let writer = FileWriter::start(app, live, path.clone(), false);
        while let Some(chunk) = field.chunk().await.map_err(|e| bad(e.body_text()))? {
            if !writer.write(chunk).await {
                break;
            }
        }
        writer.finish().await?;
        written_paths.push(path);
    }
    if written_paths.is_empty() {
        return Err(bad("the upload carries no `file` part".to_owned()));
    }
    let answer: Vec<_> = written_paths.iter().map(written).collect();
    Ok(axum::Json(answer).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_sdk() {
        // protocol.md, 3.1.3: the SDK's own example.
        assert_eq!(
            signature("/home/user/a.txt", "read", "", "tok", None),
            "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY"
        );
    }
}
