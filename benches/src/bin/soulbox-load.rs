//! `soulbox-load`: a load driver for `soulbox serve`, run as a process of its own and speaking
//! real HTTP to it, as E2B's SDKs do.
//!
//! Load mode (`--scenario`): `--clients` concurrent clients, each with its own keep-alive
//! connection, loop for `--duration`: create a sandbox, run one cell (`1+1`) or one command
//! (`/bin/true`) in it, kill it; or, for `control-plane`, read the list of sandboxes or one of a
//! few pre-created sandboxes. It reports the iterations per second, the latency percentiles of
//! an iteration and of each step, the errors and refusals (429), and the server's resident
//! memory before, after and at its peak (with `--server-pid`).
//!
//! Soak mode (`--soak`): creates sandboxes and keeps them open (each with a live kernel or
//! after one command) until the server refuses one or `--max` fit, reports how many fit and the
//! server's memory per live sandbox, then kills them all and checks that none is left.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Value, json};
use soulbox_benches::{mebibytes, millis, percentile, server_resident_bytes};

/// Clients of a load run when `--clients` is not given.
const DEFAULT_LOAD_CLIENTS: usize = 32;
/// Clients of a soak run when `--clients` is not given: sandboxes are made a few at a time.
const DEFAULT_SOAK_CLIENTS: usize = 8;
/// The most WASM sandboxes a soak opens when `--max` is not given.
const DEFAULT_WASM_SOAK_MAX: usize = 2000;
/// The most native sandboxes a soak opens when `--max` is not given.
const DEFAULT_NATIVE_SOAK_MAX: usize = 400;
/// The lifetime asked for each sandbox (seconds): longer than any run, so none expires.
const SANDBOX_TIMEOUT_SECS: u64 = 300;
/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the server's resident memory is sampled during a load run.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest pause after a refusal, whatever its `Retry-After` says: a refused client tries
/// again soon, so that a long `Retry-After` does not idle it for the rest of the run.
const MAX_REFUSAL_PAUSE: Duration = Duration::from_secs(1);
/// The pause after a refusal without `Retry-After`.
const DEFAULT_REFUSAL_PAUSE: Duration = Duration::from_millis(100);
/// How many distinct error messages a report keeps.
const MAX_ERROR_MESSAGES: usize = 5;
/// How much of an answer's body an error message quotes.
const MAX_MESSAGE_CHARS: usize = 300;
/// The sandboxes a control-plane run reads (`GET /sandboxes/{id}`).
const CONTROL_PLANE_SANDBOXES: usize = 4;
/// How many kills run at once when a soak cleans up.
const CLEANUP_CONCURRENCY: usize = 64;
/// envd's port, where commands run.
const ENVD_PORT: &str = "49983";
/// The code interpreter's port, where cells run.
const INTERPRETER_PORT: &str = "49999";
/// Connect envelope flag: the end of the stream.
const FLAG_END_STREAM: u8 = 0b10;

/// Drives `soulbox serve` over HTTP and reports throughput, latency and memory.
#[derive(Debug, Parser)]
#[command(
    name = "soulbox-load",
    about = "A load driver for `soulbox serve`: concurrent create/run/kill loops or a soak of \
             live sandboxes, over real HTTP",
    after_help = "Examples:\n  \
        soulbox-load --url http://127.0.0.1:3000 --scenario js-cell --clients 32 --duration 10s\n  \
        soulbox-load --scenario control-plane --clients 100 --server-pid $(pidof soulbox)\n  \
        soulbox-load --soak wasm --max 1000 --server-pid $(pidof soulbox) --json\n\n\
        Exit code: 0 when the run completed (errors are counted in the report), 1 when it \
        could not run (bad options, the server unreachable or refusing the key)."
)]
struct Options {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// An API key of the server (`e2b_` and 40 hex digits).
    #[arg(long, env = "SOULBOX_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Concurrent clients, each with its own keep-alive connection [default: 32 for a load
    /// run, 8 for a soak].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    clients: Option<u32>,
    /// How long a load run lasts (`10s`, `1m`...).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Untimed iterations run by one client before a load run starts, so that one-time
    /// loads (a language's module) are not in the figures.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// What each client does in a load run.
    #[arg(long, value_enum, required_unless_present = "soak", conflicts_with = "soak")]
    scenario: Option<Scenario>,
    /// Instead of a load run, open sandboxes of this tier until the server refuses one or
    /// `--max` are live.
    #[arg(long, value_enum)]
    soak: Option<SoakTier>,
    /// The most sandboxes a soak opens [default: 2000 WASM, 400 native].
    #[arg(long, requires = "soak")]
    max: Option<usize>,
    /// The template of the sandboxes, instead of the scenario's own.
    #[arg(long)]
    template: Option<String>,
    /// The server's process id, to read its resident memory (with its WASM workers') from
    /// `/proc`.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// What each client of a load run does, again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// Create a sandbox, run the JavaScript cell `1+1` (the WASM tier), kill it.
    JsCell,
    /// Create a sandbox, run the Python cell `1+1` (the WASM tier), kill it.
    PythonCell,
    /// Create a sandbox, run the command `/bin/true` (the native tier), kill it.
    NativeTrue,
    /// Read the list of sandboxes or one of a few pre-created sandboxes.
    ControlPlane,
}

impl Scenario {
    /// Its name on the command line.
    fn name(self) -> String {
        self.to_possible_value().map(|value| value.get_name().to_owned()).unwrap_or_default()
    }

    /// The template of its sandboxes.
    fn template(self) -> &'static str {
        match self {
            Self::JsCell => "javascript",
            Self::PythonCell => "code-interpreter-v1",
            Self::NativeTrue | Self::ControlPlane => "base",
        }
    }
}

/// The tier whose sandboxes a soak keeps open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum SoakTier {
    /// `javascript` sandboxes, each with a live kernel (one cell `1+1`).
    Wasm,
    /// `base` sandboxes, each after one `/bin/true`.
    Native,
}

impl SoakTier {
    /// Its name on the command line.
    fn name(self) -> &'static str {
        match self {
            Self::Wasm => "wasm",
            Self::Native => "native",
        }
    }
}

/// A request that did not get the answer it needed.
#[derive(Debug, Clone)]
struct Failure {
    /// The HTTP status, when there was an answer.
    status: Option<u16>,
    /// The answer's `Retry-After`, when it had one.
    retry_after: Option<Duration>,
    /// What went wrong, starting with the step.
    message: String,
}

impl Failure {
    fn new(message: String) -> Self {
        Self { status: None, retry_after: None, message }
    }

    /// Whether the server refused the request for now (429).
    fn is_refusal(&self) -> bool {
        self.status == Some(StatusCode::TOO_MANY_REQUESTS.as_u16())
    }
}

/// One answer of the server, read to its end.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    next_token: Option<String>,
    body: Bytes,
}

impl Answer {
    /// A failure of `step` unless the status is `expected`.
    fn expect(self, step: &str, expected: StatusCode) -> Result<Self, Failure> {
        if self.status == expected {
            return Ok(self);
        }
        Err(Failure {
            status: Some(self.status.as_u16()),
            retry_after: self.retry_after,
            message: format!("{step}: HTTP {}: {}", self.status.as_u16(), excerpt(&self.body)),
        })
    }

    fn json(&self, step: &str) -> Result<Value, Failure> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Failure::new(format!("{step}: the answer is not JSON ({e})")))
    }
}

/// The start of a body, as text, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// A client of the server's API. Each clone of one `Api` shares its connections; a new `Api`
/// has its own.
#[derive(Debug, Clone)]
struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
    api_key: Arc<str>,
}

impl Api {
    fn new(base: &str, api_key: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { client, base: base.trim_end_matches('/').into(), api_key: api_key.into() }
    }

    /// A new client of the same server, with connections of its own.
    fn fresh(&self) -> Self {
        Self::new(&self.base, &self.api_key)
    }

    /// Sends one request with the API key and `headers`, and reads the whole answer.
    async fn send(
        &self,
        step: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, Failure> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-api-key", &*self.api_key);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Failure::new(format!("{step}: cannot build the request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Failure::new(format!("{step}: {}", error_chain(&e))))?;
            let status = response.status();
            let header = |name: &str| {
                response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
            };
            let retry_after = header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let next_token = header("x-next-token").filter(|token| !token.is_empty());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Failure::new(format!("{step}: reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer { status, retry_after, next_token, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.unwrap_or_else(|_| {
            Err(Failure::new(format!("{step}: no answer within {}", humantime_of(REQUEST_TIMEOUT))))
        })
    }

    /// `POST /sandboxes`: a new sandbox of `template`.
    async fn create(&self, template: &str) -> Result<Created, Failure> {
        let body = json!({ "templateID": template, "timeout": SANDBOX_TIMEOUT_SECS });
        let answer = self
            .send(
                "create",
                Method::POST,
                "/sandboxes",
                &[("content-type", "application/json")],
                Bytes::from(body.to_string()),
            )
            .await?
            .expect("create", StatusCode::CREATED)?;
        let created = answer.json("create")?;
        let field = |name: &str| created[name].as_str().map(str::to_owned);
        match (field("sandboxID"), field("envdAccessToken")) {
            (Some(id), Some(token)) => Ok(Created { id, token }),
            _ => Err(Failure::new(format!(
                "create: no sandboxID or envdAccessToken in {}",
                excerpt(&answer.body)
            ))),
        }
    }

    /// `DELETE /sandboxes/{id}`.
    async fn kill(&self, id: &str) -> Result<(), Failure> {
        let path = format!("/sandboxes/{id}");
        self.send("kill", Method::DELETE, &path, &[], Bytes::new())
            .await?
            .expect("kill", StatusCode::NO_CONTENT)?;
        Ok(())
    }

    /// `GET /sandboxes/{id}`.
    async fn info(&self, id: &str) -> Result<(), Failure> {
        let path = format!("/sandboxes/{id}");
        self.send("info", Method::GET, &path, &[], Bytes::new())
            .await?
            .expect("info", StatusCode::OK)?;
        Ok(())
    }

    /// One page of `GET /v2/sandboxes`: how many sandboxes it lists, and the token of the next.
    async fn list_page(
        &self,
        next_token: Option<&str>,
    ) -> Result<(usize, Option<String>), Failure> {
        let path = match next_token {
            Some(token) => format!("/v2/sandboxes?nextToken={token}"),
            None => "/v2/sandboxes".to_owned(),
        };
        let answer = self
            .send("list", Method::GET, &path, &[], Bytes::new())
            .await?
            .expect("list", StatusCode::OK)?;
        let listed = answer.json("list")?;
        let count = listed
            .as_array()
            .ok_or_else(|| Failure::new(format!("list: not an array: {}", excerpt(&answer.body))))?
            .len();
        Ok((count, answer.next_token))
    }

    /// How many live sandboxes the server lists, over all pages.
    async fn count_live(&self) -> Result<usize, Failure> {
        let (mut total, mut next) = self.list_page(None).await?;
        while let Some(token) = next {
            let (count, following) = self.list_page(Some(&token)).await?;
            total += count;
            next = following;
        }
        Ok(total)
    }

    /// `POST /execute` of the code interpreter: runs `1+1` in `language` and checks that the
    /// result is `2`.
    async fn run_cell(&self, sandbox: &Created, language: &str) -> Result<(), Failure> {
        let body = json!({ "code": "1+1", "language": language });
        let answer = self
            .send(
                "cell",
                Method::POST,
                "/execute",
                &[
                    ("e2b-sandbox-id", &sandbox.id),
                    ("e2b-sandbox-port", INTERPRETER_PORT),
                    ("x-access-token", &sandbox.token),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body.to_string()),
            )
            .await?
            .expect("cell", StatusCode::OK)?;
        let mut result = None;
        for line in answer.body.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
            let message: Value = serde_json::from_slice(line).map_err(|e| {
                Failure::new(format!("cell: a line is not JSON ({e}): {}", excerpt(line)))
            })?;
            match message["type"].as_str() {
                Some("error") => {
                    return Err(Failure::new(format!(
                        "cell: {}: {}",
                        message["name"].as_str().unwrap_or("error"),
                        excerpt(message["value"].as_str().unwrap_or_default().as_bytes())
                    )));
                }
                Some("result") => result = message["text"].as_str().map(str::to_owned),
                _ => {}
            }
        }
        match result.as_deref() {
            Some("2") => Ok(()),
            Some(other) => Err(Failure::new(format!("cell: the result is {other:?}, not 2"))),
            None => Err(Failure::new(format!("cell: no result in {}", excerpt(&answer.body)))),
        }
    }

    /// envd's `process.Process/Start` of `/bin/true`, followed to its end; checks that it
    /// exited with 0.
    async fn run_true(&self, sandbox: &Created) -> Result<(), Failure> {
        let message = json!({ "process": { "cmd": "/bin/true", "args": [] }, "stdin": false });
        let answer = self
            .send(
                "command",
                Method::POST,
                "/process.Process/Start",
                &[
                    ("e2b-sandbox-id", &sandbox.id),
                    ("e2b-sandbox-port", ENVD_PORT),
                    ("x-access-token", &sandbox.token),
                    ("content-type", "application/connect+json"),
                ],
                connect_envelope(0, message.to_string().as_bytes())?,
            )
            .await?
            .expect("command", StatusCode::OK)?;
        let mut ended = None;
        for (flags, message) in connect_frames(&answer.body)? {
            if flags & FLAG_END_STREAM != 0 {
                if let Some(error) = message.get("error") {
                    return Err(Failure::new(format!("command: the stream failed: {error}")));
                }
            } else if let Some(end) = message.pointer("/event/end") {
                ended = Some(end.clone());
            }
        }
        let end =
            ended.ok_or_else(|| Failure::new("command: the stream has no end event".into()))?;
        let exit_code = end.get("exitCode").and_then(Value::as_i64).unwrap_or(0);
        let exited = end.get("exited").and_then(Value::as_bool).unwrap_or(false);
        if exit_code == 0 && exited {
            Ok(())
        } else {
            Err(Failure::new(format!("command: /bin/true ended with {end}")))
        }
    }
}

/// The full text of an error and its sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A duration as `humantime` writes it.
fn humantime_of(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// One Connect envelope: flags, the big-endian length, the message.
fn connect_envelope(flags: u8, message: &[u8]) -> Result<Bytes, Failure> {
    let length = u32::try_from(message.len())
        .map_err(|_| Failure::new("command: the request is too large".into()))?;
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(flags);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    Ok(Bytes::from(frame))
}

/// The Connect envelopes of a whole stream: (flags, message) each.
fn connect_frames(mut stream: &[u8]) -> Result<Vec<(u8, Value)>, Failure> {
    let cut = || Failure::new(format!("command: a cut envelope in {}", excerpt(stream)));
    let mut frames = Vec::new();
    while !stream.is_empty() {
        let [flags, a, b, c, d, ref rest @ ..] = *stream else { return Err(cut()) };
        let length = usize::try_from(u32::from_be_bytes([a, b, c, d])).map_err(|_| cut())?;
        let message = rest.get(..length).ok_or_else(cut)?;
        let message = serde_json::from_slice(message).map_err(|e| {
            Failure::new(format!("command: an envelope is not JSON ({e}): {}", excerpt(message)))
        })?;
        frames.push((flags, message));
        stream = &rest[length..];
    }
    Ok(frames)
}

/// A sandbox just created: its id and envd access token.
#[derive(Debug, Clone)]
struct Created {
    id: String,
    token: String,
}

/// The latency percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Serialize)]
struct Latency {
    count: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        Self {
            count: samples.len(),
            p50_ms: millis(percentile(samples, 50)),
            p95_ms: millis(percentile(samples, 95)),
            p99_ms: millis(percentile(samples, 99)),
            max_ms: millis(samples.last().copied().unwrap_or_default()),
        }
    }
}

/// What went wrong in a run: how often, and the first few distinct messages.
#[derive(Debug, Default, Clone, Serialize)]
struct Errors {
    count: usize,
    messages: Vec<String>,
}

impl Errors {
    fn add(&mut self, message: String) {
        self.count += 1;
        if self.messages.len() < MAX_ERROR_MESSAGES && !self.messages.contains(&message) {
            self.messages.push(message);
        }
    }

    fn merge(&mut self, other: Self) {
        self.count += other.count;
        for message in other.messages {
            if self.messages.len() < MAX_ERROR_MESSAGES && !self.messages.contains(&message) {
                self.messages.push(message);
            }
        }
    }
}

/// What one client of a load run measured.
#[derive(Debug, Default)]
struct ClientTally {
    iterations: Vec<Duration>,
    steps: BTreeMap<&'static str, Vec<Duration>>,
    errors: Errors,
    refused: usize,
}

impl ClientTally {
    fn step(&mut self, name: &'static str, took: Duration) {
        self.steps.entry(name).or_default().push(took);
    }

    fn merge(&mut self, other: Self) {
        self.iterations.extend(other.iterations);
        for (name, samples) in other.steps {
            self.steps.entry(name).or_default().extend(samples);
        }
        self.errors.merge(other.errors);
        self.refused += other.refused;
    }
}

/// The server's resident memory over a run.
#[derive(Debug, Clone, Serialize)]
struct MemoryReport {
    before_bytes: u64,
    after_bytes: u64,
    peak_bytes: u64,
}

/// The report of a load run.
#[derive(Debug, Serialize)]
struct LoadReport {
    mode: &'static str,
    scenario: Scenario,
    template: String,
    clients: usize,
    duration_s: f64,
    elapsed_s: f64,
    iterations: usize,
    throughput_per_s: f64,
    iteration: Latency,
    steps: BTreeMap<String, Latency>,
    errors: Errors,
    refused: usize,
    /// The server's resident memory (with `--server-pid`).
    server_rss: Option<MemoryReport>,
    /// Sandboxes the server still lists after the run (it should be none).
    left_live: Option<usize>,
}

/// Samples a process's resident memory every [`RSS_SAMPLE_INTERVAL`] until stopped; its peak.
#[derive(Debug)]
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(server_resident_bytes(pid).unwrap_or(0));
                if stopped.load(Ordering::Relaxed) {
                    return peak;
                }
                tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
            }
        });
        Self { stop, task }
    }

    async fn peak(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

/// The pause a client takes after a refusal: its `Retry-After`, at most
/// [`MAX_REFUSAL_PAUSE`], and never past the end of the run.
fn refusal_pause(failure: &Failure, deadline: Instant) -> Duration {
    failure
        .retry_after
        .unwrap_or(DEFAULT_REFUSAL_PAUSE)
        .min(MAX_REFUSAL_PAUSE)
        .min(deadline.saturating_duration_since(Instant::now()))
}

/// One create, run and kill; the steps' latencies go to `tally`.
async fn create_run_kill(
    api: &Api,
    scenario: Scenario,
    template: &str,
    tally: &mut ClientTally,
) -> Result<(), Failure> {
    let began = Instant::now();
    let sandbox = api.create(template).await?;
    tally.step("create", began.elapsed());
    let began = Instant::now();
    let (step, ran) = match scenario {
        Scenario::JsCell => ("cell", api.run_cell(&sandbox, "javascript").await),
        Scenario::PythonCell => ("cell", api.run_cell(&sandbox, "python").await),
        Scenario::NativeTrue | Scenario::ControlPlane => ("command", api.run_true(&sandbox).await),
    };
    if ran.is_ok() {
        tally.step(step, began.elapsed());
    }
    // The sandbox is killed whether or not its execution worked, so that none is left.
    let began = Instant::now();
    let killed = api.kill(&sandbox.id).await;
    if killed.is_ok() {
        tally.step("kill", began.elapsed());
    }
    ran.and(killed)
}

/// One control-plane read: the list, or one of `sandboxes`, taking turns.
async fn control_plane_read(
    api: &Api,
    sandboxes: &[Created],
    turn: usize,
    tally: &mut ClientTally,
) -> Result<(), Failure> {
    let began = Instant::now();
    if turn.is_multiple_of(2) || sandboxes.is_empty() {
        api.list_page(None).await?;
        tally.step("list", began.elapsed());
    } else {
        api.info(&sandboxes[(turn / 2) % sandboxes.len()].id).await?;
        tally.step("info", began.elapsed());
    }
    Ok(())
}

/// One client of a load run: its loop until `deadline`.
async fn load_client(
    api: Api,
    scenario: Scenario,
    template: Arc<str>,
    sandboxes: Arc<[Created]>,
    client: usize,
    deadline: Instant,
) -> ClientTally {
    let mut tally = ClientTally::default();
    let mut turn = client;
    while Instant::now() < deadline {
        let began = Instant::now();
        let outcome = match scenario {
            Scenario::ControlPlane => control_plane_read(&api, &sandboxes, turn, &mut tally).await,
            _ => create_run_kill(&api, scenario, &template, &mut tally).await,
        };
        turn += 1;
        match outcome {
            Ok(()) => tally.iterations.push(began.elapsed()),
            Err(failure) if failure.is_refusal() => {
                tally.refused += 1;
                tokio::time::sleep(refusal_pause(&failure, deadline)).await;
            }
            Err(failure) => tally.errors.add(failure.message),
        }
    }
    tally
}

/// A load run.
async fn run_load(options: &Options, api: &Api, scenario: Scenario) -> anyhow::Result<LoadReport> {
    let clients = client_count(options, DEFAULT_LOAD_CLIENTS)?;
    let template: Arc<str> = options.template.as_deref().unwrap_or(scenario.template()).into();
    let mut sandboxes = Vec::new();
    if scenario == Scenario::ControlPlane {
        for _ in 0..CONTROL_PLANE_SANDBOXES {
            let created = api.create(&template).await.map_err(|failure| {
                anyhow::anyhow!("cannot create the sandboxes to read: {}", failure.message)
            })?;
            sandboxes.push(created);
        }
    }
    let sandboxes: Arc<[Created]> = sandboxes.into();
    for _ in 0..options.warmup {
        // Untimed: the first use of a language loads its pack's module into the server.
        let mut ignored = ClientTally::default();
        let warmed = match scenario {
            Scenario::ControlPlane => control_plane_read(api, &sandboxes, 0, &mut ignored).await,
            _ => create_run_kill(api, scenario, &template, &mut ignored).await,
        };
        if let Err(failure) = warmed {
            eprintln!("soulbox-load: the warm-up iteration failed: {}", failure.message);
        }
    }
    let before = options.server_pid.and_then(server_resident_bytes);
    let sampler = options.server_pid.map(RssSampler::start);
    let began = Instant::now();
    let deadline = began + options.duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let api = api.fresh();
            tokio::spawn(load_client(
                api,
                scenario,
                template.clone(),
                sandboxes.clone(),
                client,
                deadline,
            ))
        })
        .collect();
    let mut tally = ClientTally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    let elapsed = began.elapsed();
    let peak = match sampler {
        Some(sampler) => sampler.peak().await,
        None => 0,
    };
    let after = options.server_pid.and_then(server_resident_bytes);
    for sandbox in sandboxes.iter() {
        if let Err(failure) = api.kill(&sandbox.id).await {
            tally.errors.add(failure.message);
        }
    }
    let left_live = api.count_live().await.ok();
    let server_rss = match (before, after) {
        (Some(before_bytes), Some(after_bytes)) => Some(MemoryReport {
            before_bytes,
            after_bytes,
            peak_bytes: peak.max(before_bytes).max(after_bytes),
        }),
        _ => None,
    };
    let iterations = tally.iterations.len();
    Ok(LoadReport {
        mode: "load",
        scenario,
        template: template.to_string(),
        clients,
        duration_s: options.duration.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        iterations,
        throughput_per_s: iterations as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        iteration: Latency::of(&mut tally.iterations),
        steps: tally
            .steps
            .into_iter()
            .map(|(name, mut samples)| (name.to_owned(), Latency::of(&mut samples)))
            .collect(),
        errors: tally.errors,
        refused: tally.refused,
        server_rss,
        left_live,
    })
}

/// The clients of a run: `--clients`, or `default`.
fn client_count(options: &Options, default: usize) -> anyhow::Result<usize> {
    match options.clients {
        Some(clients) => Ok(usize::try_from(clients)?),
        None => Ok(default),
    }
}

/// The first request of a soak that did not succeed.
#[derive(Debug, Clone, Serialize)]
struct SoakStop {
    /// `create` or `warm` (the sandbox's first cell or command).
    step: &'static str,
    /// The HTTP status, when there was an answer.
    status: Option<u16>,
    message: String,
}

/// What one worker of a soak did.
#[derive(Debug, Default)]
struct SoakTally {
    created: Vec<String>,
    warmed: usize,
    creates: Vec<Duration>,
    warms: Vec<Duration>,
    stop: Option<(Instant, SoakStop)>,
}

/// A worker of a soak: opens sandboxes until `stop` is set or `claimed` reaches `max`.
async fn soak_worker(
    api: Api,
    tier: SoakTier,
    template: Arc<str>,
    max: usize,
    claimed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> SoakTally {
    let mut tally = SoakTally::default();
    let halt = |tally: &mut SoakTally, step: &'static str, failure: Failure| {
        stop.store(true, Ordering::Relaxed);
        let stopped = SoakStop { step, status: failure.status, message: failure.message };
        tally.stop = Some((Instant::now(), stopped));
    };
    while !stop.load(Ordering::Relaxed) && claimed.fetch_add(1, Ordering::Relaxed) < max {
        let began = Instant::now();
        let sandbox = match api.create(&template).await {
            Ok(sandbox) => sandbox,
            Err(failure) => {
                halt(&mut tally, "create", failure);
                break;
            }
        };
        tally.creates.push(began.elapsed());
        tally.created.push(sandbox.id.clone());
        let began = Instant::now();
        let warmed = match tier {
            SoakTier::Wasm => api.run_cell(&sandbox, "javascript").await,
            SoakTier::Native => api.run_true(&sandbox).await,
        };
        match warmed {
            Ok(()) => {
                tally.warms.push(began.elapsed());
                tally.warmed += 1;
            }
            Err(failure) => {
                halt(&mut tally, "warm", failure);
                break;
            }
        }
    }
    tally
}

/// The report of a soak.
#[derive(Debug, Serialize)]
struct SoakReport {
    mode: &'static str,
    tier: SoakTier,
    template: String,
    clients: usize,
    max: usize,
    /// Sandboxes open and warmed (a live kernel, or after one command).
    live: usize,
    /// Sandboxes created (some may have failed to warm).
    created: usize,
    /// What ended the filling: `max`, or the first failure.
    stopped_by: Option<SoakStop>,
    fill_s: f64,
    /// Wall time per live sandbox while filling.
    per_sandbox_ms: f64,
    create: Latency,
    warm: Latency,
    /// How many the server listed when full.
    listed_when_full: Option<usize>,
    server_rss_start_bytes: Option<u64>,
    server_rss_full_bytes: Option<u64>,
    server_rss_per_sandbox_bytes: Option<f64>,
    server_rss_after_cleanup_bytes: Option<u64>,
    /// The machine's `MemAvailable` drop per live sandbox (native sandboxes' processes are not
    /// the server's).
    system_memory_per_sandbox_bytes: Option<f64>,
    cleanup_s: f64,
    cleanup_errors: Errors,
    /// Sandboxes the server still lists after the cleanup (it should be none).
    left_live: Option<usize>,
}

/// A soak run.
async fn run_soak(options: &Options, api: &Api, tier: SoakTier) -> anyhow::Result<SoakReport> {
    let clients = client_count(options, DEFAULT_SOAK_CLIENTS)?;
    let max = options.max.unwrap_or(match tier {
        SoakTier::Wasm => DEFAULT_WASM_SOAK_MAX,
        SoakTier::Native => DEFAULT_NATIVE_SOAK_MAX,
    });
    let default_template = match tier {
        SoakTier::Wasm => "javascript",
        SoakTier::Native => "base",
    };
    let template: Arc<str> = options.template.as_deref().unwrap_or(default_template).into();
    let rss_start = options.server_pid.and_then(server_resident_bytes);
    let available_start = Some(soulbox_runtime::host_memory::available_bytes());
    let claimed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(soak_worker(
                api.fresh(),
                tier,
                template.clone(),
                max,
                claimed.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut created = Vec::new();
    let (mut live, mut creates, mut warms) = (0, Vec::new(), Vec::new());
    let mut first_stop: Option<(Instant, SoakStop)> = None;
    for worker in workers {
        let tally = worker.await?;
        created.extend(tally.created);
        live += tally.warmed;
        creates.extend(tally.creates);
        warms.extend(tally.warms);
        if let Some((at, stopped)) = tally.stop
            && first_stop.as_ref().is_none_or(|(first, _)| at < *first)
        {
            first_stop = Some((at, stopped));
        }
    }
    let fill = began.elapsed();
    let rss_full = options.server_pid.and_then(server_resident_bytes);
    let available_full = Some(soulbox_runtime::host_memory::available_bytes());
    let listed_when_full = api.count_live().await.ok();
    let per_live = |used: f64| (live > 0).then(|| used / live as f64);
    let server_rss_per_sandbox_bytes = match (rss_start, rss_full) {
        (Some(start), Some(full)) => per_live(full as f64 - start as f64),
        _ => None,
    };
    let system_memory_per_sandbox_bytes = match (available_start, available_full) {
        (Some(start), Some(full)) => per_live(start as f64 - full as f64),
        _ => None,
    };
    eprintln!("soulbox-load: {live} sandboxes open; killing them all");
    let began = Instant::now();
    let cleanup_errors = kill_all(api, created.clone()).await;
    let cleanup = began.elapsed();
    let left_live = api.count_live().await.ok();
    let rss_after_cleanup = options.server_pid.and_then(server_resident_bytes);
    Ok(SoakReport {
        mode: "soak",
        tier,
        template: template.to_string(),
        clients,
        max,
        live,
        created: created.len(),
        stopped_by: first_stop.map(|(_, stopped)| stopped),
        fill_s: fill.as_secs_f64(),
        per_sandbox_ms: millis(fill) / live.max(1) as f64,
        create: Latency::of(&mut creates),
        warm: Latency::of(&mut warms),
        listed_when_full,
        server_rss_start_bytes: rss_start,
        server_rss_full_bytes: rss_full,
        server_rss_per_sandbox_bytes,
        server_rss_after_cleanup_bytes: rss_after_cleanup,
        system_memory_per_sandbox_bytes,
        cleanup_s: cleanup.as_secs_f64(),
        cleanup_errors,
        left_live,
    })
}

/// Kills every sandbox of `ids`, [`CLEANUP_CONCURRENCY`] at a time; what failed.
async fn kill_all(api: &Api, ids: Vec<String>) -> Errors {
    let permits = Arc::new(tokio::sync::Semaphore::new(CLEANUP_CONCURRENCY));
    let kills: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let (api, permits) = (api.clone(), permits.clone());
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                api.kill(&id).await
            })
        })
        .collect();
    let mut errors = Errors::default();
    for kill in kills {
        match kill.await {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => errors.add(failure.message),
            Err(panicked) => errors.add(format!("kill: the task failed: {panicked}")),
        }
    }
    errors
}

/// Checks that the server answers and takes the key, before a run.
async fn preflight(api: &Api) -> anyhow::Result<()> {
    let health =
        api.send("health", Method::GET, "/health", &[], Bytes::new()).await.map_err(|failure| {
            anyhow::anyhow!("the server at {} does not answer: {}", api.base, failure.message)
        })?;
    if health.status != StatusCode::OK {
        anyhow::bail!(
            "{}/health answers HTTP {}: {}",
            api.base,
            health.status,
            excerpt(&health.body)
        );
    }
    api.list_page(None).await.map_err(|failure| {
        anyhow::anyhow!("the server refuses the API key: {}", failure.message)
    })?;
    Ok(())
}

/// A byte count in MiB, or a dash when unknown.
fn mib(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), |b| format!("{:.1} MiB", mebibytes(b)))
}

/// A byte count per sandbox in KiB, or a dash when unknown.
fn kib(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), |b| format!("{:.0} KiB", b / 1024.0))
}

fn print_latency_row(name: &str, latency: &Latency) {
    println!(
        "  {name:<10} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        latency.count, latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms
    );
}

fn print_errors(errors: &Errors) {
    for message in &errors.messages {
        println!("    {message}");
    }
}

fn print_load(report: &LoadReport) {
    println!(
        "{} ({}), {} clients, {:.1} s: {} iterations, {:.1}/s",
        report.scenario.name(),
        report.template,
        report.clients,
        report.elapsed_s,
        report.iterations,
        report.throughput_per_s
    );
    println!(
        "  {:<10} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "step", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    print_latency_row("iteration", &report.iteration);
    for (name, latency) in &report.steps {
        print_latency_row(name, latency);
    }
    println!("  errors {}, refused (429) {}", report.errors.count, report.refused);
    print_errors(&report.errors);
    if let Some(rss) = &report.server_rss {
        println!(
            "  server RSS: before {}, after {}, peak {}",
            mib(Some(rss.before_bytes as f64)),
            mib(Some(rss.after_bytes as f64)),
            mib(Some(rss.peak_bytes as f64))
        );
    }
    if let Some(left) = report.left_live {
        println!("  sandboxes left live: {left}");
    }
}

fn print_soak(report: &SoakReport) {
    println!(
        "soak {} ({}), {} clients: {} live of at most {} ({} created) in {:.1} s, {:.2} ms each",
        report.tier.name(),
        report.template,
        report.clients,
        report.live,
        report.max,
        report.created,
        report.fill_s,
        report.per_sandbox_ms
    );
    match &report.stopped_by {
        Some(stop) => println!(
            "  stopped by the {} step: HTTP {}: {}",
            stop.step,
            stop.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            stop.message
        ),
        None => println!("  stopped at --max"),
    }
    println!(
        "  {:<10} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "step", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    print_latency_row("create", &report.create);
    print_latency_row("warm", &report.warm);
    println!(
        "  listed when full {}; server RSS {} -> {} ({} per sandbox), {} after cleanup",
        report.listed_when_full.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        mib(report.server_rss_start_bytes.map(|b| b as f64)),
        mib(report.server_rss_full_bytes.map(|b| b as f64)),
        kib(report.server_rss_per_sandbox_bytes),
        mib(report.server_rss_after_cleanup_bytes.map(|b| b as f64)),
    );
    println!("  machine memory per sandbox {}", kib(report.system_memory_per_sandbox_bytes));
    println!(
        "  cleanup {:.2} s, {} errors, left live {}",
        report.cleanup_s,
        report.cleanup_errors.count,
        report.left_live.map_or_else(|| "-".to_owned(), |n| n.to_string())
    );
    print_errors(&report.cleanup_errors);
}

async fn run(options: Options) -> anyhow::Result<()> {
    let api = Api::new(&options.url, &options.api_key);
    preflight(&api).await?;
    if let Some(tier) = options.soak {
        let report = run_soak(&options, &api, tier).await?;
        if options.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_soak(&report);
        }
    } else if let Some(scenario) = options.scenario {
        let report = run_load(&options, &api, scenario).await?;
        if options.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_load(&report);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let options = match Options::try_parse() {
        Ok(options) => options,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soulbox-load: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("soulbox-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}
