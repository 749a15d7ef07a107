//! envd's `process.Process` service (protocol.md, 3.4) over the runtime's [`ProcessTable`]:
//! `Start` and `Connect` stream a process's events (`start` first, then data and keepalives,
//! then exactly one `end`); `List`, `SendInput`, `StreamInput`, `SendSignal`, `CloseStdin`
//! and `Update` are unary (`StreamInput` a client stream). A client that leaves a stream only
//! stops following: the process runs on until it ends, is signalled or reaches its deadline
//! (`connect-timeout-ms` of its `Start`).
//!
//! A process may run on a pseudo-terminal (`Start` with `pty`): its output is `pty` data,
//! `SendInput` with `pty` types into it, `Update` resizes it.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use soulbox_runtime::{
    ProcessEnd, ProcessError, ProcessEvent, ProcessFollower, ProcessRequest, ProcessSignal,
    SandboxUser, TerminalSize,
};

use super::LiveSandbox;
use super::connect::{
    CallBody, Code, ConnectError, StreamSender, client_stream_done, error_for, keepalive,
    request_message, request_messages, server_stream, stream_error, timeout, unary,
};
use crate::app::App;

/// How long a stream may stay silent when the client asks for no keepalive (envd's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

/// A `PTY`: its size.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: PtySize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PtySize {
    cols: u32,
    rows: u32,
}

impl Pty {
    fn size(&self) -> Result<TerminalSize, ConnectError> {
        TerminalSize::new(self.size.cols, self.size.rows).map_err(process_error)
    }
}

#[derive(Debug, Deserialize)]
struct StartRequest {
    #[serde(default)]
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

/// A `ProcessSelector`: a pid or a tag.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Selected {
    #[serde(default)]
    process: Selector,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessInput {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SendInputRequest {
    #[serde(default)]
    process: Selector,
    #[serde(default)]
    input: ProcessInput,
}

#[derive(Debug, Deserialize)]
struct SendSignalRequest {
    #[serde(default)]
    process: Selector,
    #[serde(default)]
    signal: Value,
}

/// One message of `StreamInput`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum StreamInputMessage {
    Start {
        #[serde(default)]
        process: Selector,
    },
    Data {
        #[serde(default)]
        input: ProcessInput,
    },
    Keepalive {},
}

fn invalid(message: impl Into<String>) -> ConnectError {
    ConnectError::new(Code::InvalidArgument, message)
}

fn process_error(error: ProcessError) -> ConnectError {
    let code = match &error {
        ProcessError::Invalid(_) => Code::InvalidArgument,
        ProcessError::NotFound(_) => Code::NotFound,
        ProcessError::StdinClosed(_) | ProcessError::Input { .. } | ProcessError::NoTerminal(_) => {
            Code::FailedPrecondition
        }
        ProcessError::Unavailable(_) => Code::Unimplemented,
        ProcessError::Backend(_) => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}

/// Decodes protobuf-JSON `bytes`: standard or URL-safe base64, padded or not.
fn decode_bytes(text: &str) -> Result<Vec<u8>, ConnectError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| invalid("input is not base64"))
}

fn encode_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The user of a call: `Authorization: Basic base64("<user>:")`, or the sandbox's default.
pub(super) fn user_of(headers: &HeaderMap) -> Result<Option<SandboxUser>, ConnectError> {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let unknown = || ConnectError::new(Code::Unauthenticated, "invalid user in Authorization");
    let encoded = value.strip_prefix("Basic ").ok_or_else(unknown)?;
    let decoded = decode_bytes(encoded.trim()).map_err(|_| unknown())?;
    let decoded = String::from_utf8(decoded).map_err(|_| unknown())?;
    let name = decoded.split(':').next().unwrap_or_default();
    let user = SandboxUser::parse(name).ok_or_else(|| {
        ConnectError::new(
            Code::Unauthenticated,
            format!("unknown user '{name}' (the users are `user` and `root`)"),
        )
    })?;
    Ok(Some(user))
}

impl LiveSandbox {
    /// The pid a selector names.
    fn select(&self, selector: &Selector) -> Result<u32, ConnectError> {
        if let Some(pid) = selector.pid {
            return Ok(pid);
        }
        let tag =
            selector.tag.as_deref().ok_or_else(|| invalid("select a process by pid or tag"))?;
        self.processes
            .list()
            .into_iter()
            .find(|p| p.request.tag.as_deref() == Some(tag))
            .map(|p| p.pid)
            .ok_or_else(|| {
                ConnectError::new(Code::NotFound, format!("process with tag {tag} not found"))
            })
    }
}

async fn start(
    State(app): State<App>,
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let prepared = (|| {
        let request: StartRequest = request_message(&headers, &body)?;
        let terminal = request.pty.as_ref().map(Pty::size).transpose()?;
        if request.process.cmd.is_empty() {
            return Err(invalid("`process.cmd` is required"));
        }
        let mut argv = vec![request.process.cmd];
        argv.extend(request.process.args);
        Ok(ProcessRequest {
            argv,
            env: request.process.envs,
            cwd: request.process.cwd.filter(|cwd| !cwd.is_empty()),
            user: user_of(&headers)?,
            stdin: request.stdin.unwrap_or(true),
            timeout: timeout(&headers),
            tag: request.tag,
            terminal,
        })
    })();
    let request = match prepared {
        Ok(request) => request,
        Err(error) => return stream_error(error),
    };
    let terminal = request.terminal.is_some();
    // A place among the executions while the process starts (what it runs afterwards is
    // held by its sandbox's own limits).
    let place = match app.admission().execution(&live.record.team).await {
        Ok(place) => place,
        Err(refusal) => {
            let code = if refusal.status == axum::http::StatusCode::TOO_MANY_REQUESTS {
                Code::ResourceExhausted
            } else {
                Code::Unavailable
            };
            return stream_error(ConnectError::new(code, refusal.message));
        }
    };
    let started = live.processes.start(app.dispatcher(), &live.sandbox, request).await;
    drop(place);
    let (pid, follower) = match started {
        Ok(started) => started,
        Err(error) => return stream_error(process_error(error)),
    };
    if let Some(manager) = app.manager() {
        manager.count_execution(&live.record.id);
    }
    app.telemetry().execution("process");
    follow(pid, terminal, follower, keepalive(&headers))
}

async fn connect(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let followed = request_message::<Selected>(&headers, &body)
        .and_then(|request| live.select(&request.process))
        .and_then(|pid| Ok((pid, live.processes.connect(pid).map_err(process_error)?)));
    match followed {
        Ok((pid, follower)) => {
            let terminal =
                live.processes.list().iter().any(|p| p.pid == pid && p.request.terminal.is_some());
            follow(pid, terminal, follower, keepalive(&headers))
        }
        Err(error) => stream_error(error),
    }
}

/// Streams a process's events to the client until the process ends or the client leaves.
/// A terminal's output is `pty` data, as raw bytes.
fn follow(
    pid: u32,
    terminal: bool,
    follower: ProcessFollower,
    keepalive: Option<Duration>,
) -> Response {
    let (sender, response) = server_stream();
    let keepalive = keepalive.unwrap_or(DEFAULT_KEEPALIVE);
    tokio::spawn(stream_events(sender, pid, terminal, follower, keepalive));
    response
}

async fn stream_events(
    sender: StreamSender,
    pid: u32,
    terminal: bool,
    mut follower: ProcessFollower,
    keepalive: Duration,
) {
    let stdout_key = if terminal { "pty" } else { "stdout" };
    if !sender.send(&json!({ "event": { "start": { "pid": pid } } })).await {
        return;
    }
    loop {
        let event = tokio::select! {
            event = follower.next() => event,
            () = tokio::time::sleep(keepalive) => {
                if sender.send(&json!({ "event": { "keepalive": {} } })).await { continue }
                return;
            }
            () = sender.closed() => return,
        };
        let message = match event {
            Some(ProcessEvent::Stdout(bytes)) => {
                json!({ "event": { "data": { stdout_key: encode_bytes(&bytes) } } })
            }
            Some(ProcessEvent::Stderr(bytes)) => {
                json!({ "event": { "data": { "stderr": encode_bytes(&bytes) } } })
            }
            Some(ProcessEvent::End(end)) => {
                if sender.send(&json!({ "event": { "end": end_event(end) } })).await {
                    sender.end(None).await;
                }
                return;
            }
            None => {
                let error = ConnectError::new(Code::Unavailable, "the sandbox ended");
                return sender.end(Some(error)).await;
            }
        };
        if !sender.send(&message).await {
            return;
        }
    }
}

/// An `EndEvent` as envd writes it (Go's `ProcessState`).
fn end_event(end: ProcessEnd) -> Value {
    match end {
        ProcessEnd::Exited(0) => json!({ "exited": true, "status": "exit status 0" }),
        ProcessEnd::Exited(code) => {
            let status = format!("exit status {code}");
            json!({ "exitCode": code, "exited": true, "status": status, "error": status })
        }
        ProcessEnd::Signalled(signal) => {
            let status = format!("signal: {}", signal_name(signal));
            json!({ "exitCode": -1, "exited": false, "status": status, "error": status })
        }
        ProcessEnd::Lost => json!({
            "exitCode": -1,
            "exited": false,
            "status": "signal: killed",
            "error": "the sandbox ended",
        }),
    }
}

/// A signal's description, as Go prints it.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

async fn list(Extension(live): Extension<LiveSandbox>) -> Response {
    let processes: Vec<Value> = live
        .processes
        .list()
        .into_iter()
        .map(|p| {
            let (cmd, args) = p
                .request
                .argv
                .split_first()
                .map_or((String::new(), Vec::new()), |(c, a)| (c.clone(), a.to_vec()));
            let config = ProcessConfig { cmd, args, envs: p.request.env, cwd: p.request.cwd };
            let mut info = json!({ "config": config, "pid": p.pid });
            if let Some(tag) = p.request.tag {
                info["tag"] = json!(tag);
            }
            info
        })
        .collect();
    unary(&json!({ "processes": processes }))
}

/// Writes one `ProcessInput` to a process.
async fn write_input(
    live: &LiveSandbox,
    pid: u32,
    input: ProcessInput,
) -> Result<(), ConnectError> {
    // A terminal's input goes where standard input goes: to the terminal.
    let Some(data) = input.stdin.or(input.pty) else { return Ok(()) };
    let data = decode_bytes(&data)?;
    live.processes.send_input(pid, &data).await.map_err(process_error)
}

async fn send_input(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = async {
        let request: SendInputRequest = request_message(&headers, &body)?;
        let pid = live.select(&request.process)?;
        write_input(&live, pid, request.input).await
    };
    match result.await {
        Ok(()) => unary(&json!({})),
        Err(error) => error_for(&headers, error),
    }
}

async fn stream_input(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = async {
        let messages: Vec<StreamInputMessage> = request_messages(&headers, &body)?;
        let mut pid = None;
        for message in messages {
            match message {
                StreamInputMessage::Start { process } => pid = Some(live.select(&process)?),
                StreamInputMessage::Data { input } => {
                    let pid = pid.ok_or_else(|| invalid("the first message must be `start`"))?;
                    write_input(&live, pid, input).await?;
                }
                StreamInputMessage::Keepalive {} => {}
            }
        }
        Ok::<(), ConnectError>(())
    };
    match result.await {
        Ok(()) => client_stream_done(),
        Err(error) => stream_error(error),
    }
}

async fn send_signal(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = async {
        let request: SendSignalRequest = request_message(&headers, &body)?;
        let pid = live.select(&request.process)?;
        let signal = match &request.signal {
            Value::String(name) if name == "SIGNAL_SIGKILL" => ProcessSignal::Kill,
            Value::String(name) if name == "SIGNAL_SIGTERM" => ProcessSignal::Terminate,
            Value::Number(n) if n.as_u64() == Some(9) => ProcessSignal::Kill,
            Value::Number(n) if n.as_u64() == Some(15) => ProcessSignal::Terminate,
            other => {
                return Err(ConnectError::new(
                    Code::Unimplemented,
                    format!("signal {other} is not supported (SIGNAL_SIGKILL, SIGNAL_SIGTERM)"),
                ));
            }
        };
        live.processes.signal(pid, signal).await.map_err(process_error)
    };
    match result.await {
        Ok(()) => unary(&json!({})),
        Err(error) => error_for(&headers, error),
    }
}

async fn close_stdin(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = async {
        let request: Selected = request_message(&headers, &body)?;
        let pid = live.select(&request.process)?;
        live.processes.close_stdin(pid).await.map_err(process_error)
    };
    match result.await {
        Ok(()) => unary(&json!({})),
        Err(error) => error_for(&headers, error),
    }
}

#[derive(Debug, Deserialize)]
struct UpdateRequest {
    #[serde(default)]
    process: Selector,
    #[serde(default)]
    pty: Option<Pty>,
}

async fn update(
    Extension(live): Extension<LiveSandbox>,
    headers: HeaderMap,
    CallBody(body): CallBody,
) -> Response {
    let result = (|| {
        let request: UpdateRequest = request_message(&headers, &body)?;
        let pid = live.select(&request.process)?;
        match request.pty {
            Some(pty) => live.processes.resize(pid, pty.size()?).map_err(process_error),
            None if live.processes.list().iter().any(|p| p.pid == pid) => Ok(()),
            None => Err(process_error(ProcessError::NotFound(pid))),
        }
    })();
    match result {
        Ok(()) => unary(&json!({})),
        Err(error) => error_for(&headers, error),
    }
}
