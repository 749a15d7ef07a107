//! SoulBox under load: `soulbox serve` started as a child process on loopback, driven over
//! real HTTP by the `soulbox-load` driver (another process) in each scenario — JavaScript and
//! Python create + cell + kill, native create + `/bin/true` + kill, control-plane reads — and
//! two soaks of live idle sandboxes, with the targets beside the figures.
//!
//! The server is the binary already built in `target/` (the bench's own profile first, then
//! release, then debug; or `$SOULBOX_BIN`): build it first with
//! `cargo build --release -p soulbox-host`. Its data directory is fresh, with the packs and
//! module cache of the shared test data directory (`$SOULBOX_TEST_DATA_DIR`, or
//! `target/soulbox-test-data`) linked in. A scenario the server cannot run (no pack, no native
//! tier without root) prints `SKIPPED` with the reason. A missed target is printed, not a
//! failure.
//!
//! `SOULBOX_LOAD_SECONDS=10 SOULBOX_SOAK_WASM_MAX=1000 SOULBOX_SOAK_NATIVE_MAX=200
//! cargo bench -p soulbox-benches --bench load`

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use soulbox_benches::mebibytes;

/// The admin key the server is started with.
const ADMIN_KEY: &str = "e2b_0000000000000000000000000000000000000000";
/// Seconds of each load scenario when `SOULBOX_LOAD_SECONDS` is not set.
const DEFAULT_LOAD_SECONDS: u64 = 10;
/// The most WASM sandboxes the soak opens when `SOULBOX_SOAK_WASM_MAX` is not set.
const DEFAULT_WASM_SOAK_MAX: usize = 1000;
/// The most native sandboxes the soak opens when `SOULBOX_SOAK_NATIVE_MAX` is not set.
const DEFAULT_NATIVE_SOAK_MAX: usize = 200;
/// Clients of the create/run/kill scenarios.
const LOAD_CLIENTS: usize = 32;
/// Clients of the control-plane scenario.
const CONTROL_PLANE_CLIENTS: usize = 100;
/// How long the server may take to start serving.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How many of the server's warnings and errors are quoted after the table.
const MAX_QUOTED_LOG_LINES: usize = 5;

/// The targets.
const TARGET_JS_PER_S: f64 = 1000.0;
const TARGET_PYTHON_PER_S: f64 = 300.0;
const TARGET_NATIVE_PER_S: f64 = 200.0;
const TARGET_CONTROL_PLANE_P95_MS: f64 = 5.0;
const TARGET_WASM_LIVE: usize = 1000;
const TARGET_NATIVE_LIVE: usize = 200;

/// What the server logged at WARN or ERROR while the bench ran.
#[derive(Debug, Default)]
struct ServerLog {
    warnings: usize,
    errors: usize,
    first: Vec<String>,
}

/// `soulbox serve` as a child process, killed when dropped.
#[derive(Debug)]
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<ServerLog>>,
    _data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `soulbox` binary to serve with: `$SOULBOX_BIN`, or the one built beside this bench (its
/// profile), or the release or debug one of the workspace's `target/`.
fn soulbox_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SOULBOX_BIN") {
        return Some(PathBuf::from(path));
    }
    // This bench runs as target/<profile>/deps/load-<hash>, as tests do.
    if let Some(beside) = soulbox_tests::soulbox_binary() {
        return Some(beside);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target");
    ["release", "debug"]
        .map(|profile| target.join(profile).join("soulbox"))
        .into_iter()
        .find(|path| path.is_file())
}

/// Text without its terminal colour codes.
fn plain(line: &str) -> String {
    let mut text = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for end in chars.by_ref() {
                if end.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    text
}

/// Starts `soulbox serve` on a free loopback port with a fresh data directory whose packs and
/// module cache are those of `packs_from`.
fn start_server(binary: &Path, packs_from: &Path) -> Result<Server, String> {
    let data = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    for shared in ["packs", "cache"] {
        let from = packs_from.join(shared);
        if from.is_dir() {
            std::os::unix::fs::symlink(&from, data.path().join(shared))
                .map_err(|e| format!("linking {}: {e}", from.display()))?;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("a free port: {e}"))?
        .port();
    let mut child = Command::new(binary)
        .args(["serve", "--no-install", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data.path())
        .env("SOULBOX_ADMIN_KEY", ADMIN_KEY)
        .env_remove("SOULBOX_DATA_DIR")
        .env_remove("SOULBOX_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        return Err("the server's stderr is not piped".to_owned());
    };
    let log = Arc::new(Mutex::new(ServerLog::default()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let tally = log.clone();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        let mut printed = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = plain(&line);
            if let Some(ready_tx) = &ready {
                if line.contains("soulbox is serving") {
                    let _ = ready_tx.send(Ok(()));
                    ready = None;
                } else {
                    printed.push_str(&line);
                    printed.push('\n');
                }
                continue;
            }
            let (error, warning) = (line.contains(" ERROR "), line.contains(" WARN "));
            if error || warning {
                let mut log = tally.lock().unwrap_or_else(PoisonError::into_inner);
                log.errors += usize::from(error);
                log.warnings += usize::from(warning);
                if log.first.len() < MAX_QUOTED_LOG_LINES {
                    log.first.push(line);
                }
            }
        }
        if let Some(ready_tx) = ready {
            let _ = ready_tx.send(Err(printed));
        }
    });
    let server = Server { child, url: format!("http://127.0.0.1:{port}"), log, _data: data };
    match ready_rx.recv_timeout(SERVER_START_TIMEOUT) {
        Ok(Ok(())) => Ok(server),
        Ok(Err(printed)) => Err(format!("the server exited before serving:\n{printed}")),
        Err(_) => Err(format!("the server did not serve within {SERVER_START_TIMEOUT:?}")),
    }
}

/// `GET /health` of the server, as JSON (HTTP/1.0: the server closes the connection).
fn health(url: &str) -> Result<Value, String> {
    let address = url.trim_start_matches("http://");
    let mut stream =
        std::net::TcpStream::connect(address).map_err(|e| format!("connecting to {url}: {e}"))?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("asking {url}/health: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("reading {url}/health: {e}"))?;
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|head| &answer[head + 4..])
        .ok_or_else(|| format!("{url}/health answered no HTTP"))?;
    serde_json::from_slice(body).map_err(|e| format!("{url}/health is not JSON: {e}"))
}

/// Why the server cannot run `language`'s cells, if it cannot.
fn language_missing(health: &Value, language: &str) -> Option<String> {
    let languages = health["languages"].as_array()?;
    let found = languages
        .iter()
        .find(|l| l["language"] == language && l["tier"] == "wasm")
        .map(|l| l["status"]["status"].as_str().unwrap_or_default().to_owned());
    match found.as_deref() {
        Some("ready") => None,
        Some(status) => Some(format!("the {language} pack is {status}")),
        None => Some(format!("the {language} pack is not installed")),
    }
}

/// Why the server has no native tier, if it has none.
fn native_missing(health: &Value) -> Option<String> {
    let tiers = health["tiers"].as_array()?;
    let native = tiers.iter().find(|t| t["tier"] == "native");
    match native {
        Some(tier) if tier["available"] == true => None,
        Some(tier) => Some(format!(
            "the native tier is unavailable: {}",
            tier["reason"].as_str().unwrap_or("no reason given")
        )),
        None => Some("the server has no native tier".to_owned()),
    }
}

/// Runs the driver against the server with `args` and `--json`; its report.
fn drive(server: &Server, args: &[String]) -> Result<Value, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_soulbox-load"))
        .args(["--url", &server.url, "--server-pid", &server.child.id().to_string(), "--json"])
        .args(args)
        .env("SOULBOX_API_KEY", ADMIN_KEY)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("starting soulbox-load: {e}"))?;
    if !output.status.success() {
        return Err(format!("soulbox-load {} failed ({})", args.join(" "), output.status));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("soulbox-load's report: {e}"))
}

/// An environment variable as a number, or `default`.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    scenario: String,
    clients: String,
    measured: String,
    target: String,
    met: Option<bool>,
    latency: String,
    failures: String,
    memory: String,
}

impl Row {
    /// A row without figures: `outcome` (`SKIPPED`, `FAILED`) in their place.
    fn unmeasured(scenario: &str, target: String, outcome: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            clients: "-".to_owned(),
            measured: outcome.to_owned(),
            target,
            met: None,
            latency: String::new(),
            failures: String::new(),
            memory: String::new(),
        }
    }
}

/// A number of a report, or zero.
fn number(report: &Value, pointer: &str) -> f64 {
    report.pointer(pointer).and_then(Value::as_f64).unwrap_or_default()
}

/// `p50 / p95 / p99` of a latency of a report, in milliseconds.
fn percentiles(latency: &Value) -> String {
    let at = |p: &str| latency[p].as_f64().unwrap_or_default();
    format!("{:.1} / {:.1} / {:.1}", at("p50_ms"), at("p95_ms"), at("p99_ms"))
}

/// Bytes of a report in MiB.
fn mib_of(report: &Value, pointer: &str) -> String {
    format!("{:.0}", mebibytes(number(report, pointer)))
}

/// A row of a load scenario's report, and its notes (errors, leftovers).
fn load_row(label: &str, report: &Value, target: &Target) -> (Row, Vec<String>) {
    let throughput = number(report, "/throughput_per_s");
    let p95 = number(report, "/iteration/p95_ms");
    let (measured, met) = match target {
        Target::PerSecond(per_s) => (format!("{throughput:.1} /s"), throughput >= *per_s),
        Target::P95Below(ms) => (format!("p95 {p95:.2} ms"), p95 < *ms),
        Target::Live(_) => (String::new(), false),
    };
    let memory = if report["server_rss"].is_object() {
        format!(
            "{} -> {} (peak {}) MiB",
            mib_of(report, "/server_rss/before_bytes"),
            mib_of(report, "/server_rss/after_bytes"),
            mib_of(report, "/server_rss/peak_bytes")
        )
    } else {
        "-".to_owned()
    };
    let mut notes = Vec::new();
    if let Some(messages) = report["errors"]["messages"].as_array() {
        notes.extend(messages.iter().filter_map(Value::as_str).map(|m| format!("{label}: {m}")));
    }
    if let Some(steps) = report["steps"].as_object() {
        let steps: Vec<String> = steps
            .iter()
            .map(|(name, latency)| format!("{name} {}", percentiles(latency)))
            .collect();
        notes.push(format!("{label}: steps p50 / p95 / p99 ms: {}", steps.join("; ")));
    }
    let left = report["left_live"].as_u64().unwrap_or_default();
    if left > 0 {
        notes.push(format!("{label}: {left} sandboxes still live after the run"));
    }
    let row = Row {
        scenario: label.to_owned(),
        clients: report["clients"].to_string(),
        measured,
        target: target.to_string(),
        met: Some(met),
        latency: percentiles(&report["iteration"]),
        failures: format!(
            "{} / {}",
            report["errors"]["count"].as_u64().unwrap_or_default(),
            report["refused"].as_u64().unwrap_or_default()
        ),
        memory,
    };
    (row, notes)
}

/// A row of a soak's report, and its notes (what stopped it, the cleanup).
fn soak_row(label: &str, report: &Value, target: &Target) -> (Row, Vec<String>) {
    let live = report["live"].as_u64().unwrap_or_default();
    let met = match target {
        Target::Live(want) => usize::try_from(live).unwrap_or(usize::MAX) >= *want,
        _ => false,
    };
    let per_sandbox = report["server_rss_per_sandbox_bytes"].as_f64();
    let machine = report["system_memory_per_sandbox_bytes"].as_f64();
    let memory = format!(
        "{} KiB/sandbox (machine {} KiB)",
        per_sandbox.map_or_else(|| "-".to_owned(), |b| format!("{:.0}", b / 1024.0)),
        machine.map_or_else(|| "-".to_owned(), |b| format!("{:.0}", b / 1024.0)),
    );
    let mut notes = Vec::new();
    match report["stopped_by"].as_object() {
        Some(stop) => notes.push(format!(
            "{label}: stopped by the {} step: HTTP {}: {}",
            stop["step"].as_str().unwrap_or_default(),
            stop["status"],
            stop["message"].as_str().unwrap_or_default()
        )),
        None => notes.push(format!("{label}: reached --max {}", report["max"])),
    }
    notes.push(format!(
        "{label}: {:.2} ms per sandbox filling; warm p50 / p95 / p99 {} ms; listed when full {}; \
         cleanup {:.2} s ({} errors), {} left live; server RSS after cleanup {} MiB",
        number(report, "/per_sandbox_ms"),
        percentiles(&report["warm"]),
        report["listed_when_full"],
        number(report, "/cleanup_s"),
        report["cleanup_errors"]["count"],
        report["left_live"],
        mib_of(report, "/server_rss_after_cleanup_bytes"),
    ));
    if let Some(messages) = report["cleanup_errors"]["messages"].as_array() {
        notes.extend(
            messages.iter().filter_map(Value::as_str).map(|m| format!("{label} cleanup: {m}")),
        );
    }
    let row = Row {
        scenario: label.to_owned(),
        clients: report["clients"].to_string(),
        measured: format!("{live} live"),
        target: target.to_string(),
        met: Some(met),
        latency: format!("create {}", percentiles(&report["create"])),
        failures: "-".to_owned(),
        memory,
    };
    (row, notes)
}

/// A target of the issue.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Iterations per second, at least.
    PerSecond(f64),
    /// The p95 of an iteration below this many milliseconds.
    P95Below(f64),
    /// Live sandboxes, at least.
    Live(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PerSecond(per_s) => write!(f, "≥ {per_s:.0} /s"),
            Self::P95Below(ms) => write!(f, "p95 < {ms:.0} ms"),
            Self::Live(count) => write!(f, "≥ {count} live"),
        }
    }
}

/// One run of the bench: a load scenario or a soak.
#[derive(Debug)]
struct Run {
    label: &'static str,
    args: Vec<String>,
    target: Target,
    /// Why the server cannot run it, if it cannot.
    missing: Option<String>,
    soak: bool,
}

fn main() {
    let Some(binary) = soulbox_binary() else {
        println!("SKIPPED: build soulbox first (cargo build --release -p soulbox-host)");
        return;
    };
    let packs_from = soulbox_tests::test_data_dir();
    if !packs_from.join("packs").is_dir() {
        println!(
            "SKIPPED: no language packs in {} (run the tests once to install them there, or set \
             SOULBOX_TEST_DATA_DIR)",
            packs_from.display()
        );
        return;
    }
    let server = match start_server(&binary, &packs_from) {
        Ok(server) => server,
        Err(reason) => {
            println!("SKIPPED: cannot start {}: {reason}", binary.display());
            return;
        }
    };
    let health = match health(&server.url) {
        Ok(health) => health,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let seconds: u64 = env_number("SOULBOX_LOAD_SECONDS", DEFAULT_LOAD_SECONDS);
    let wasm_max: usize = env_number("SOULBOX_SOAK_WASM_MAX", DEFAULT_WASM_SOAK_MAX);
    let native_max: usize = env_number("SOULBOX_SOAK_NATIVE_MAX", DEFAULT_NATIVE_SOAK_MAX);
    let load = |scenario: &str, clients: usize| {
        ["--scenario", scenario, "--clients", &clients.to_string(), "--duration"]
            .map(str::to_owned)
            .into_iter()
            .chain([format!("{seconds}s")])
            .collect::<Vec<_>>()
    };
    let soak = |tier: &str, max: usize| {
        ["--soak", tier, "--max", &max.to_string()].map(str::to_owned).to_vec()
    };
    let runs = [
        Run {
            label: "js-cell create+cell+kill",
            args: load("js-cell", LOAD_CLIENTS),
            target: Target::PerSecond(TARGET_JS_PER_S),
            missing: language_missing(&health, "javascript"),
            soak: false,
        },
        Run {
            label: "python-cell create+cell+kill",
            args: load("python-cell", LOAD_CLIENTS),
            target: Target::PerSecond(TARGET_PYTHON_PER_S),
            missing: language_missing(&health, "python"),
            soak: false,
        },
        Run {
            label: "native create+true+kill",
            args: load("native-true", LOAD_CLIENTS),
            target: Target::PerSecond(TARGET_NATIVE_PER_S),
            missing: native_missing(&health),
            soak: false,
        },
        Run {
            label: "control-plane reads",
            args: load("control-plane", CONTROL_PLANE_CLIENTS),
            target: Target::P95Below(TARGET_CONTROL_PLANE_P95_MS),
            missing: None,
            soak: false,
        },
        Run {
            label: "soak wasm (js kernel)",
            args: soak("wasm", wasm_max),
            target: Target::Live(TARGET_WASM_LIVE),
            missing: language_missing(&health, "javascript"),
            soak: true,
        },
        Run {
            label: "soak native",
            args: soak("native", native_max),
            target: Target::Live(TARGET_NATIVE_LIVE),
            missing: native_missing(&health),
            soak: true,
        },
    ];
    println!(
        "SoulBox under load: {} serve on loopback, driven by soulbox-load ({seconds} s per \
         scenario, {} CPUs)",
        binary.display(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let began = Instant::now();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    for run in &runs {
        if let Some(reason) = &run.missing {
            println!("SKIPPED: {}: {reason}", run.label);
            rows.push(Row::unmeasured(run.label, run.target.to_string(), "SKIPPED"));
            continue;
        }
        eprintln!("load: {} ({})", run.label, run.args.join(" "));
        match drive(&server, &run.args) {
            Ok(report) => {
                let (row, more) = if run.soak {
                    soak_row(run.label, &report, &run.target)
                } else {
                    load_row(run.label, &report, &run.target)
                };
                rows.push(row);
                notes.extend(more);
            }
            Err(reason) => {
                println!("FAILED: {}: {reason}", run.label);
                rows.push(Row::unmeasured(run.label, run.target.to_string(), "FAILED"));
                failed.push(reason);
            }
        }
    }
    println!();
    println!(
        "{:<30} {:>7} {:>14} {:>14} {:>3}  {:<28} {:>9}  server memory",
        "scenario", "clients", "measured", "target", "met", "p50 / p95 / p99 ms", "err / 429",
    );
    for row in &rows {
        let met = match row.met {
            Some(true) => "✓",
            Some(false) => "✗",
            None => "-",
        };
        println!(
            "{:<30} {:>7} {:>14} {:>14} {:>3}  {:<28} {:>9}  {}",
            row.scenario,
            row.clients,
            row.measured,
            row.target,
            met,
            row.latency,
            row.failures,
            row.memory
        );
    }
    println!();
    for note in &notes {
        println!("  {note}");
    }
    let log = server.log.lock().unwrap_or_else(PoisonError::into_inner);
    println!(
        "  server log: {} errors, {} warnings while loaded{}",
        log.errors,
        log.warnings,
        if log.first.is_empty() { "" } else { "; the first:" }
    );
    for line in &log.first {
        println!("    {line}");
    }
    println!("  total {:.0} s", began.elapsed().as_secs_f64());
    drop(log);
    drop(server);
    if !failed.is_empty() {
        eprintln!("the driver failed: {}", failed.join("; "));
        std::process::exit(1);
    }
}
