//! The `soulbox` binary, run as a user would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn soulbox(data_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("SOULBOX_DATA_DIR")
        .output()
        .expect("soulbox runs")
}

/// The shared data directory, with every pack installed.
fn installed() -> std::path::PathBuf {
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    runtime.block_on(soulbox_tests::wasm_backend());
    soulbox_tests::test_data_dir()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_streams_output_and_exits_with_the_code_of_the_code() {
    let data = installed();
    let out =
        soulbox(&data, &["run", "--lang", "python", "-c", "print('hi')\nimport sys\nsys.exit(4)"]);
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn run_prints_the_last_value_and_errors_with_tracebacks() {
    let data = installed();
    let out = soulbox(&data, &["run", "-l", "rb", "-c", "[1, 2].sum"]);
    assert_eq!(text(&out.stdout), "3\n");
    assert_eq!(out.status.code(), Some(0));
    let out = soulbox(&data, &["run", "-l", "js", "-c", "null.x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("TypeError"), "{}", text(&out.stderr));
}

#[test]
fn run_reads_code_from_a_file() {
    let data = installed();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hello.js");
    std::fs::write(&file, "console.log('from a file')").expect("write");
    let out = soulbox(&data, &["run", "--lang", "javascript", file.to_str().expect("utf-8")]);
    assert_eq!(text(&out.stdout), "from a file\n");
}

#[test]
fn run_json_has_the_documented_fields() {
    let data = installed();
    let out = soulbox(
        &data,
        &["run", "--lang", "python", "-c", "while True: pass", "--timeout-ms", "200", "--json"],
    );
    assert_eq!(out.status.code(), Some(124));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["tier"], "wasm");
    assert_eq!(json["termination"]["kind"], "timed_out");
    assert_eq!(json["exit_code"], 124);
    for field in ["stdout", "stderr", "results", "timings"] {
        assert!(json.get(field).is_some(), "missing {field}: {json}");
    }
}

#[test]
fn unknown_language_exits_2_and_lists_installed_ones() {
    let data = installed();
    let out = soulbox(&data, &["run", "--lang", "cobol", "-c", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let listed = stderr.split("installed languages: ").nth(1).expect("a list").trim();
    let listed: Vec<&str> = listed.split(", ").collect();
    for language in ["javascript", "python", "ruby"] {
        assert!(listed.contains(&language), "{stderr}");
    }
    // Where the native tier runs (root), its languages are listed too.
    if soulbox_tests::native_backend().is_some() {
        assert!(listed.contains(&"bash") && listed.contains(&"c"), "{stderr}");
    }
}

#[test]
fn missing_pack_names_the_install_command() {
    let empty = tempfile::tempdir().expect("tempdir");
    let out = soulbox(empty.path(), &["run", "--lang", "ruby", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("install it with `soulbox langs install ruby`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn langs_list_shows_every_pack() {
    let data = installed();
    let out = soulbox(&data, &["langs", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let installed: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|p| p["installed"] == true && p["tier"] == "wasm")
        .filter_map(|p| p["language"].as_str())
        .collect();
    assert_eq!(installed, ["python", "javascript", "ruby"]);
    if soulbox_tests::native_backend().is_some() {
        let native: Vec<&str> = list
            .as_array()
            .expect("array")
            .iter()
            .filter(|p| p["tier"] == "native")
            .filter_map(|p| p["language"].as_str())
            .collect();
        assert!(native.contains(&"bash") && native.contains(&"c"), "{native:?}");
    }
    let table = text(&soulbox(&data, &["langs", "list"]).stdout);
    assert!(table.starts_with("LANGUAGE"), "{table}");
}

#[test]
fn unknown_pack_to_install_is_a_usage_error() {
    let empty = tempfile::tempdir().expect("tempdir");
    let out = soulbox(empty.path(), &["langs", "install", "cobol"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("known languages: python, javascript, ruby"));
}

#[test]
fn a_wasm_worker_is_for_soulbox_serve_only() {
    let empty = tempfile::tempdir().expect("tempdir");
    // `Command::output` gives it /dev/null as standard input, not the socket `serve` gives.
    let out = soulbox(empty.path(), &["wasm-worker", "--max-kernels", "4"]);
    assert_eq!(out.status.code(), Some(70), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("workers are started by `soulbox serve`"));
    // It is not offered as a command.
    let help = soulbox(empty.path(), &["--help"]);
    assert!(!text(&help.stdout).contains("wasm-worker"), "{}", text(&help.stdout));
}

#[test]
fn serve_answers_over_http() {
    let data = installed();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["serve", "--no-install", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .env("SOULBOX_ADMIN_KEY", soulbox_tests::TEST_API_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = server.stderr.take().expect("stderr");
    let began = Instant::now();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines.next().expect("the server logs").expect("a line");
        if line.contains("soulbox is serving") {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(60), "server did not start");
    }
    let body = r#"{"language":"python","code":"21 * 2"}"#;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /v1/run HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        soulbox_tests::TEST_API_KEY,
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    server.kill().expect("kill");
    server.wait().expect("wait");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let json: Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(json["results"][0]["data"]["text/plain"], "42");
}

#[test]
fn without_root_native_executions_are_refused_with_the_reason() {
    if !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED: setpriv (util-linux) is not installed");
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    // The unprivileged user must be able to write its data directory.
    std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let as_nobody = |args: &[&str]| {
        Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_soulbox"))
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .output()
            .expect("soulbox runs as nobody")
    };
    let out = as_nobody(&["run", "--lang", "bash", "-c", "echo hi"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("native tier is unavailable") && stderr.contains("root"), "{stderr}");
    let out = as_nobody(&["langs", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("json");
    let tiers: Vec<&str> =
        rows.as_array().expect("rows").iter().filter_map(|r| r["tier"].as_str()).collect();
    assert!(tiers.iter().all(|t| *t == "wasm"), "{tiers:?}");
}

#[test]
fn filling_the_workspace_stops_at_its_size_in_both_tiers_and_spares_the_host_disk() {
    let data = installed();
    if soulbox_tests::native_backend().is_none() {
        return;
    }
    let free_before = free_bytes(&data);
    let out = soulbox(
        &data,
        &["run", "--lang", "bash", "-c", "head -c 400000000 /dev/zero > big; echo $?; ls -s big"],
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("1\n"), "{stdout}");
    let python =
        "f = open('/home/user/big', 'wb')\nfor _ in range(400):\n    f.write(b'x' * (1 << 20))";
    let out = soulbox(&data, &["run", "--lang", "python", "-c", python]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("No space left on device"), "{}", text(&out.stderr));
    // Nothing of it reached the disk of the data directory.
    let free_after = free_bytes(&data);
    assert!(free_before.saturating_sub(free_after) < 100 << 20, "{free_before} -> {free_after}");
}

/// Free bytes of the file system holding `path`, from `df`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().expect("df");
    text(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("a number")
}

#[test]
fn nothing_of_the_servers_environment_reaches_a_native_sandbox() {
    let data = installed();
    if soulbox_tests::native_backend().is_none() {
        return;
    }
    let canary = "soulbox-canary-5f1e2d";
    let out = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .arg("--data-dir")
        .arg(&data)
        .args(["run", "--lang", "bash", "-e", "ASKED=yes", "-c", "env"])
        .env("SOULBOX_TEST_SECRET", canary)
        .output()
        .expect("soulbox runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains(canary), "the canary leaked: {stdout}");
    assert!(stdout.contains("ASKED=yes\n"), "{stdout}");
    let names: Vec<&str> =
        stdout.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for name in &names {
        assert!(
            ["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "ASKED", "PWD", "SHLVL", "_"]
                .contains(name),
            "unexpected variable {name}: {stdout}"
        );
    }
}

/// `soulbox serve` on a free port of a data directory, started and ready.
struct Server {
    child: std::process::Child,
    port: u16,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Self {
        Self::start_with(data_dir, Some(soulbox_tests::TEST_API_KEY)).0
    }

    /// Starts it, with `admin_key` as `SOULBOX_ADMIN_KEY`; also returns what it printed
    /// before it was ready.
    fn start_with(data_dir: &std::path::Path, admin_key: Option<&str>) -> (Self, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_soulbox"));
        command
            .args(["serve", "--no-install", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .env_remove("SOULBOX_ADMIN_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(key) = admin_key {
            command.env("SOULBOX_ADMIN_KEY", key);
        }
        let mut child = command.spawn().expect("serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let began = Instant::now();
        let mut lines = BufReader::new(stderr).lines();
        let mut printed = String::new();
        loop {
            let line = lines.next().expect("the server logs").expect("a line");
            if line.contains("soulbox is serving") {
                break;
            }
            printed.push_str(&line);
            printed.push('\n');
            assert!(began.elapsed() < Duration::from_secs(60), "server did not start");
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        (Self { child, port }, printed)
    }

    /// One request; the status and the body (de-chunked).
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("x-api-key")) {
            head.push_str(&format!("X-API-KEY: {}\r\n", soulbox_tests::TEST_API_KEY));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).expect("send");
        stream.write_all(body).expect("send");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("read");
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a head");
        let head = text(&response[..split]).to_ascii_lowercase();
        let status = head[9..12].parse().expect("a status");
        let mut body = response[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let mut plain = Vec::new();
            let mut rest = body.as_slice();
            while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(text(&rest[..eol]).trim(), 16).expect("a chunk size");
                if size == 0 {
                    break;
                }
                plain.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 4 + size..];
            }
            body = plain;
        }
        (status, body)
    }

    /// Kills it with SIGKILL and reaps it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(&body).expect("json");
        let (status, body) =
            self.call(method, path, &[("Content-Type", "application/json")], &bytes);
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a process whose command line contains `marker` runs on this host.
fn host_runs(marker: &str) -> bool {
    std::fs::read_dir("/proc").expect("/proc").filter_map(Result::ok).any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|cmdline| text(&cmdline).replace('\0', " ").contains(marker))
    })
}

#[test]
fn after_kill_9_every_sandbox_and_file_comes_back_and_running_ones_are_paused() {
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let (status, created) = server.json(
        "POST",
        "/v2/sandboxes",
        serde_json::json!({"templateID": "base", "timeout": 600, "metadata": {"k": "v"}}),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().expect("an id").to_owned();
    let token = created["envdAccessToken"].as_str().expect("a token").to_owned();
    let (status, other) =
        server.json("POST", "/v2/sandboxes", serde_json::json!({"templateID": "python"}));
    assert_eq!(status, 201);
    let paused_id = other["sandboxID"].as_str().expect("an id").to_owned();
    assert_eq!(server.call("POST", &format!("/sandboxes/{paused_id}/pause"), &[], b"").0, 204);
    let envd = [("E2b-Sandbox-Id", id.as_str()), ("X-Access-Token", token.as_str())];
    let upload = [envd[0], envd[1], ("Content-Type", "application/octet-stream")];
    let (status, body) = server.call("POST", "/files?path=kept.txt", &upload, b"survives kill -9");
    assert_eq!(status, 200, "{}", text(&body));
    // A process that the crash must not leave behind on the host.
    let marker = "sleep 4242";
    let envelope = soulbox_tests::connect_envelope(
        &json!({"process": {"cmd": "/bin/bash", "args": ["-c", marker]}, "stdin": false}),
    );
    let started = std::thread::spawn({
        let port = server.port;
        let (id, token) = (id.clone(), token.clone());
        move || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let head = format!(
                "POST /process.Process/Start HTTP/1.1\r\nHost: localhost\r\nE2b-Sandbox-Id: {id}\r\nX-Access-Token: {token}\r\nContent-Type: application/connect+json\r\nContent-Length: {}\r\n\r\n",
                envelope.len()
            );
            stream.write_all(head.as_bytes()).expect("send");
            stream.write_all(&envelope).expect("send");
            // The head and the first frame may come in separate reads.
            let mut seen = Vec::new();
            let mut buffer = [0u8; 1024];
            while !text(&seen).contains("start") {
                let n = stream.read(&mut buffer).expect("the start event");
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..n]);
            }
            text(&seen)
        }
    });
    let first = started.join().expect("the stream");
    assert!(first.contains("start"), "{first}");
    let began = Instant::now();
    while !host_runs(marker) {
        assert!(began.elapsed() < Duration::from_secs(10), "the process never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    // `Child::kill` is SIGKILL: the server gets no chance to tidy up.
    server.kill();
    // Its sandboxes' processes end with it: init leaves when the server's end of its control
    // socket closes, and the kernel ends the whole sandbox.
    let began = Instant::now();
    while host_runs(marker) {
        assert!(began.elapsed() < Duration::from_secs(10), "a sandbox process outlived the server");
        std::thread::sleep(Duration::from_millis(50));
    }

    let server = Server::start(data.path());
    let (status, info) = server.json("GET", &format!("/sandboxes/{id}"), Value::Null);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["state"], "paused", "a running sandbox comes back paused: {info}");
    assert_eq!(info["metadata"]["k"], "v");
    let (_, info) = server.json("GET", &format!("/sandboxes/{paused_id}"), Value::Null);
    assert_eq!(info["state"], "paused", "{info}");
    let (_, listed) = server.json("GET", "/v2/sandboxes", Value::Null);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    // Its data plane waits for a resume; connect resumes it with its files.
    assert_eq!(server.call("GET", "/health", &envd, b"").0, 502);
    let (status, connected) = server.json(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        serde_json::json!({"timeout": 60}),
    );
    assert_eq!(status, 201, "{connected}");
    assert_eq!(connected["envdAccessToken"], token.as_str(), "the token is kept");
    let (status, body) = server.call("GET", "/files?path=kept.txt", &envd, b"");
    assert_eq!((status, text(&body)), (200, "survives kill -9".to_owned()));
    let rpc = [envd[0], envd[1], ("Content-Type", "application/json")];
    let (status, body) = server.call("POST", "/process.Process/List", &rpc, b"{}");
    assert_eq!(status, 200);
    let processes: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(processes["processes"], serde_json::json!([]), "processes did not survive");
}

#[test]
fn the_first_start_makes_an_admin_key_and_prints_it_once() {
    let data = tempfile::tempdir().expect("a data directory");
    let (mut server, printed) = Server::start_with(data.path(), None);
    let key = printed
        .split_whitespace()
        .find(|word| word.starts_with("e2b_") && word.len() == 44)
        .unwrap_or_else(|| panic!("no key printed: {printed}"))
        .to_owned();
    let (status, _) = server.call("GET", "/v2/sandboxes", &[("X-API-KEY", &key)], b"");
    assert_eq!(status, 200, "the printed key works");
    let (status, _) =
        server.call("GET", "/v2/sandboxes", &[("X-API-KEY", soulbox_tests::TEST_API_KEY)], b"");
    assert_eq!(status, 401, "no other key does");
    server.kill();
    let (mut again, printed) = Server::start_with(data.path(), None);
    assert!(!printed.contains("e2b_"), "a key is printed only once: {printed}");
    assert_eq!(again.call("GET", "/v2/sandboxes", &[("X-API-KEY", &key)], b"").0, 200, "and kept");
    again.kill();
    // Nowhere in the data directory is the key written in clear.
    let secret = &key[4..];
    for file in files_under(data.path()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{}", file.display());
    }
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(files_under(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn the_cli_logs_in_manages_keys_and_reads_the_audit_log() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let home = tempfile::tempdir().expect("a home");
    let config = home.path().join(".config");
    let cli = |args: &[&str], key: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_soulbox"));
        command
            .args(args)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("SOULBOX_API_KEY")
            .env_remove("SOULBOX_API_URL");
        if let Some(key) = key {
            command.env("SOULBOX_API_KEY", key);
        }
        command.output().expect("soulbox runs")
    };
    let url = format!("http://127.0.0.1:{}", server.port);

    let out = cli(&["keys", "list"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("soulbox auth login"), "{}", text(&out.stderr));
    let wrong = "e2b_ffffffffffffffffffffffffffffffffffffffff";
    let out = cli(&["auth", "login", "--api-url", &url, "--key", wrong], None);
    assert_eq!(out.status.code(), Some(1), "a wrong key is not saved");
    assert!(text(&out.stderr).contains("not accepted"), "{}", text(&out.stderr));

    let out =
        cli(&["auth", "login", "--api-url", &url, "--key", soulbox_tests::TEST_API_KEY], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let saved = config.join("soulbox/credentials.json");
    let mode = std::fs::metadata(&saved).expect("saved").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the user reads the saved key");

    let out = cli(&["keys", "create", "--role", "viewer", "--name", "from-cli"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let viewer = text(&out.stdout).trim().to_owned();
    assert!(viewer.starts_with("e2b_") && viewer.len() == 44, "only the key on stdout: {viewer}");
    let out = cli(&["keys", "list", "--json"], None);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let id = listed
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == "from-cli")
        .and_then(|k| k["id"].as_str())
        .expect("the new key listed")
        .to_owned();
    assert!(viewer[4..].starts_with(&id));
    assert!(text(&cli(&["keys", "list"], None).stdout).starts_with("ID"), "a table by default");

    // A viewer may not manage keys: a clear refusal and exit code 1.
    let out = cli(&["keys", "list"], Some(&viewer));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));
    assert!(cli(&["keys", "revoke", &id], None).status.success());
    let out = cli(&["keys", "list"], Some(&viewer));
    assert!(text(&out.stderr).contains("401"), "revoked: {}", text(&out.stderr));

    let out = cli(&["audit", "--json", "--since", "1h"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let actions: Vec<&str> =
        records.as_array().expect("records").iter().filter_map(|r| r["action"].as_str()).collect();
    assert!(actions.contains(&"POST /v1/keys"), "{actions:?}");
    assert!(actions.contains(&format!("DELETE /v1/keys/{id}").as_str()), "{actions:?}");

    let out =
        cli(&["quota", "research", "--max-sandboxes", "3", "--max-timeout", "1h", "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let quota: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(quota, serde_json::json!({"max_live_sandboxes": 3, "max_timeout_secs": 3600}));
    let out = cli(&["usage"], None);
    assert!(out.status.success() && text(&out.stdout).starts_with("TEAM"), "{}", text(&out.stderr));

    assert!(cli(&["auth", "logout"], None).status.success());
    assert!(!saved.exists(), "logged out");
    server.kill();
}

#[test]
fn the_cli_makes_a_sandbox_runs_in_it_lists_its_processes_and_follows_its_logs() {
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let url = format!("http://127.0.0.1:{}", server.port);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_soulbox"))
            .args(args)
            .env("SOULBOX_API_URL", &url)
            .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
            .env("HOME", data.path())
            .output()
            .expect("soulbox runs")
    };
    let out = cli(&["sandbox", "create", "--template", "base", "--timeout", "10m"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 20, "the id alone: {id}");
    let listed = text(&cli(&["sandbox", "list"]).stdout);
    assert!(listed.starts_with("ID") && listed.contains(&id), "{listed}");

    let out = cli(&["exec", &id, "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "the command's exit code");
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("out\n".to_owned(), "err\n".to_owned()));
    let out = cli(&["exec", "--root", &id, "--", "id", "-u"]);
    assert_eq!(text(&out.stdout), "0\n", "{}", text(&out.stderr));
    // -i sends standard input (then closes it); -t runs on a terminal.
    let mut piped = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z; echo done"])
        .env("SOULBOX_API_URL", &url)
        .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec -i starts");
    piped.stdin.take().expect("stdin").write_all(b"piped in\n").expect("write");
    let out = piped.wait_with_output().expect("exec -i ends");
    assert_eq!(text(&out.stdout), "PIPED IN\ndone\n");
    let out = cli(&["exec", "-t", &id, "--", "tty"]);
    assert!(text(&out.stdout).starts_with("/dev/pts/"), "{}", text(&out.stdout));

    // A long command, seen by `ps`; then `logs -f` follows what it writes.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["logs", "-f", &id])
        .env("SOULBOX_API_URL", &url)
        .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .expect("logs -f starts");
    let mut runner = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["exec", &id, "--", "sh", "-c", "sleep 1; echo followed-line; sleep 30"])
        .env("SOULBOX_API_URL", &url)
        .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
        .stdout(Stdio::null())
        .spawn()
        .expect("exec starts");
    let began = Instant::now();
    let mut seen = String::new();
    while !seen.contains("sleep 1; echo followed-line") {
        assert!(began.elapsed() < Duration::from_secs(10), "ps never showed it: {seen}");
        seen = text(&cli(&["ps", &id]).stdout);
    }
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    let followed = loop {
        let line = lines.next().expect("logs -f is still following").expect("a line");
        if line.contains("followed-line") {
            break line;
        }
    };
    assert!(
        followed.contains(" stdout ") && followed.contains('Z'),
        "a time and a stream: {followed}"
    );
    let _ = follower.kill();
    let _ = runner.kill();
    let _ = (follower.wait(), runner.wait());
    let past = text(&cli(&["logs", &id]).stdout);
    assert!(past.contains("out") && past.contains("followed-line"), "{past}");

    // `connect --web` prints a link to the web terminal, with a token for this sandbox only.
    let out = cli(&["sandbox", "connect", &id, "--web", "--ttl", "2m", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let link: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let page = format!("{url}/sandboxes/{id}/terminal#token=");
    assert!(link["url"].as_str().is_some_and(|u| u.starts_with(&page)), "{link}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now");
    let left = link["expires_at"].as_u64().expect("an expiry").saturating_sub(now.as_secs());
    assert!((100..=121).contains(&left), "a two-minute token: {link}");
    let out = cli(&["sandbox", "connect", &id, "--web", "--pid", "1"]);
    assert_eq!(out.status.code(), Some(2), "--web and --pid exclude each other");

    assert!(cli(&["sandbox", "pause", &id]).status.success());
    assert!(text(&cli(&["sandbox", "info", &id]).stdout).contains("paused"));
    assert!(cli(&["sandbox", "kill", &id]).status.success());
    let out = cli(&["sandbox", "info", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    server.kill();
}

#[test]
fn the_cli_moves_files_and_syncs_only_what_changed() {
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let url = format!("http://127.0.0.1:{}", server.port);
    let local = tempfile::tempdir().expect("a local directory");
    let soulbox = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_soulbox"));
        command
            .args(args)
            .env("SOULBOX_API_URL", &url)
            .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
            .env("HOME", data.path());
        command
    };
    let cli = |args: &[&str]| soulbox(args).output().expect("soulbox runs");
    let id = text(&cli(&["sandbox", "create"]).stdout).trim().to_owned();

    // A binary file there and back, unchanged.
    let bytes: Vec<u8> =
        (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let original = local.path().join("blob.bin");
    std::fs::write(&original, &bytes).expect("write");
    let out =
        cli(&["files", "upload", &id, original.to_str().expect("UTF-8"), "/home/user/blob.bin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = local.path().join("back.bin");
    let out =
        cli(&["files", "download", &id, "/home/user/blob.bin", back.to_str().expect("UTF-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(&back).expect("read") == bytes, "the same bytes came back");
    let out = cli(&["files", "download", &id, "/home/user/missing", back.to_str().expect("UTF-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    assert!(std::fs::read(&back).expect("read") == bytes, "a failed download leaves the file");

    // Sync sends only what differs.
    let project = local.path().join("project");
    std::fs::create_dir_all(project.join("sub")).expect("mkdir");
    std::fs::write(project.join("a.txt"), "one").expect("write");
    std::fs::write(project.join("sub/b.txt"), "two").expect("write");
    let target = format!("{id}:/home/user/project");
    let project_arg = project.to_str().expect("UTF-8");
    let out = cli(&["files", "sync", project_arg, &target]);
    assert!(
        text(&out.stdout).starts_with("sent 2 changed file(s), 0 unchanged"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    std::fs::write(project.join("a.txt"), "one, changed").expect("write");
    let out = cli(&["files", "sync", project_arg, &target, "--json"]);
    let synced: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(synced, serde_json::json!({"sent": ["a.txt"], "unchanged": 1}));
    let shown = text(
        &cli(&[
            "exec",
            &id,
            "--",
            "cat",
            "/home/user/project/a.txt",
            "/home/user/project/sub/b.txt",
        ])
        .stdout,
    );
    assert_eq!(shown, "one, changedtwo");

    // --watch sends a change as it happens.
    let mut watching = soulbox(&["files", "sync", project_arg, &target, "--watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sync --watch starts");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(project.join("sub/b.txt"), "two, watched").expect("write");
    let began = Instant::now();
    loop {
        let shown = text(&cli(&["exec", &id, "--", "cat", "/home/user/project/sub/b.txt"]).stdout);
        if shown == "two, watched" {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(15), "the change never arrived: {shown}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = watching.kill();
    let _ = watching.wait();
    server.kill();
}

#[test]
fn the_cli_builds_a_template_from_a_dockerfile_and_manages_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: template builds run in native sandboxes, which need root");
        return;
    }
    // A build context with the base image inside it.
    let context = tempfile::tempdir().expect("a build context");
    if soulbox_tests::busybox_image(context.path()).is_none() {
        return;
    }
    // The bundle umoci unpacked is not part of the context.
    std::fs::remove_dir_all(context.path().join("busybox-bundle")).expect("remove the bundle");
    soulbox_tests::write_template_context(context.path());
    let dockerfile = soulbox_tests::template_dockerfile("oci:busybox-oci:latest");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    let context_arg = context.path().to_str().expect("UTF-8");

    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let url = format!("http://127.0.0.1:{}", server.port);
    // The CLI packs the context in its temporary directory; nothing of it may be left there.
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let soulbox_at = |url: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_soulbox"))
            .args(args)
            .args(["--api-url", url])
            .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
            .env_remove("SOULBOX_API_URL")
            .env("HOME", data.path())
            .env("TMPDIR", scratch.path())
            .output()
            .expect("soulbox runs")
    };
    let cli = |args: &[&str]| soulbox_at(&url, args);
    let inspect = |name: &str| -> Value {
        let out = cli(&["template", "inspect", name, "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };

    // The steps on stderr, the result on stdout.
    let out = cli(&["template", "build", "-t", "cli-app:v1", context_arg]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("Step 1/8"), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("Step ") && l.contains("(line 7): RUN echo")),
        "{stderr}"
    );
    let first_build = stdout
        .split("built cli-app:v1 (")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .filter(|id| id.len() == 36 && id.matches('-').count() == 4)
        .unwrap_or_else(|| panic!("no build line: {stdout}"))
        .to_owned();

    // Unchanged, it rebuilds from the cache; --json is one event a line.
    let out = cli(&["template", "build", "-t", "cli-app", "--json", context_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert_eq!(events.iter().filter(|e| e["type"] == "cached").count(), 2, "{events:?}");
    let done = events.last().expect("events");
    assert_eq!(
        (done["type"].as_str(), done["template"].as_str(), done["tag"].as_str()),
        (Some("done"), Some("cli-app"), Some("latest")),
        "{done}"
    );
    let latest_build = done["build_id"].as_str().expect("a build id").to_owned();
    assert_ne!(latest_build, first_build, "every build has its own id");
    assert!(!text(&out.stderr).contains("Step "), "no text with --json: {}", text(&out.stderr));

    // Listed with its tags, in a table and in JSON; inspected with both builds.
    let out = cli(&["template", "list"]);
    let table = text(&out.stdout);
    assert!(out.status.success() && table.starts_with("NAME"), "{table}{}", text(&out.stderr));
    let row = table
        .lines()
        .find(|l| l.starts_with("cli-app "))
        .unwrap_or_else(|| panic!("cli-app is not listed: {table}"));
    assert!(row.ends_with(" latest,v1"), "{row}");
    let out = cli(&["template", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let template = listed
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == "cli-app"))
        .unwrap_or_else(|| panic!("cli-app is not listed: {listed}"));
    assert_eq!(template["tags"]["v1"], first_build.as_str(), "{template}");
    assert_eq!(template["tags"]["latest"], latest_build.as_str(), "{template}");
    let inspected = inspect("cli-app");
    let builds = inspected["builds"].as_array().expect("builds");
    assert_eq!(builds.len(), 2, "{inspected}");
    assert!(builds.iter().all(|b| b["workdir"] == "/app"), "{inspected}");
    assert_eq!(inspected["public"], false);

    // Tagged and published.
    let out = cli(&["template", "tag", "cli-app", &first_build, "stable"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("cli-app:stable -> {first_build}\n"));
    assert_eq!(inspect("cli-app")["tags"]["stable"], first_build.as_str());
    let out = cli(&["template", "publish", "cli-app"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(inspect("cli-app")["public"], true);

    // A failing step: its output, then its line and why (-f: a Dockerfile outside the context).
    let elsewhere = tempfile::tempdir().expect("a directory outside the context");
    let failing = elsewhere.path().join("failing.Dockerfile");
    std::fs::write(&failing, "FROM oci:busybox-oci:latest\nRUN echo from-the-step; exit 4\n")
        .expect("write");
    let failing_arg = failing.to_str().expect("UTF-8");
    let out = cli(&["template", "build", "-t", "cli-broken", "-f", failing_arg, context_arg]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("from-the-step") || stderr.contains("from-the-step"), "{stderr}");
    assert!(stderr.contains("the build failed at Dockerfile line 2"), "{stderr}");
    assert!(stderr.contains("exited with code 4"), "{stderr}");
    // A Dockerfile the server cannot read is refused with its line.
    std::fs::write(&failing, "FROM base\nNOPE x\n").expect("write");
    let out = cli(&["template", "build", "-t", "cli-broken", "-f", failing_arg, context_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("line 2"), "{}", text(&out.stderr));
    let out = cli(&["template", "inspect", "cli-broken"]);
    assert_eq!(out.status.code(), Some(1), "failed builds make no template");

    // Deleted, it is gone.
    let out = cli(&["template", "delete", "cli-app"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["template", "inspect", "cli-app"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("404") && stderr.contains("no template cli-app"), "{stderr}");

    // A malformed --build-arg is refused before the CLI sends anything: where nothing listens,
    // the refusal is about the argument, not the connection.
    let nowhere = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let out = soulbox_at(
        &nowhere,
        &["template", "build", "-t", "cli-app", "--build-arg", "V", context_arg],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("NAME=VALUE") && !stderr.contains("cannot reach"), "{stderr}");
    // So is a context that cannot be packed (a socket in it); the half-made archive goes too.
    let unpackable = tempfile::tempdir().expect("a context");
    std::fs::write(unpackable.path().join("Dockerfile"), "FROM base\n").expect("write");
    let _socket = std::os::unix::net::UnixListener::bind(unpackable.path().join("app.sock"))
        .expect("a socket");
    let unpackable_arg = unpackable.path().to_str().expect("UTF-8");
    let out = soulbox_at(&nowhere, &["template", "build", "-t", "cli-app", unpackable_arg]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("app.sock") && !stderr.contains("cannot reach"), "{stderr}");

    // What .dockerignore names stays out of the context (but the Dockerfile never does).
    let ignoring = tempfile::tempdir().expect("a context");
    for (path, contents) in [
        (
            "Dockerfile",
            "FROM base\nCOPY . /ctx/\nRUN cd /ctx && find . -type f | sort | tr '\\n' ' '\n",
        ),
        (".dockerignore", "# not sent\nsecret.txt\n**/*.log\n!logs/keep.log\nDockerfile\n"),
        ("app.py", "print(1)\n"),
        ("secret.txt", "s3cret\n"),
        ("logs/debug.log", "noise\n"),
        ("logs/keep.log", "kept\n"),
        ("src/deep/trace.log", "noise\n"),
        ("src/deep/main.py", "print(2)\n"),
    ] {
        let path = ignoring.path().join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("dirs");
        std::fs::write(path, contents).expect("write");
    }
    let ignoring_arg = ignoring.path().to_str().expect("UTF-8");
    let out = cli(&["template", "build", "-t", "cli-ignoring", ignoring_arg]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let listed = "  | ./.dockerignore ./Dockerfile ./app.py ./logs/keep.log ./src/deep/main.py ";
    assert!(stdout.lines().any(|l| l == listed), "{stdout}");

    let left: Vec<_> = std::fs::read_dir(scratch.path()).expect("read").collect();
    assert!(left.is_empty(), "the CLI left files in its temporary directory: {left:?}");
    server.kill();
}

#[test]
fn completions_are_valid_scripts_for_each_shell() {
    let data = tempfile::tempdir().expect("a directory");
    let out = soulbox(data.path(), &["completions", "bash"]);
    assert!(out.status.success());
    let script = text(&out.stdout);
    assert!(script.contains("sandbox") && script.contains("exec"), "the subcommands are there");
    let path = data.path().join("soulbox.bash");
    std::fs::write(&path, &script).expect("write");
    let checked = Command::new("bash").arg("-n").arg(&path).output().expect("bash runs");
    assert!(checked.status.success(), "bash -n: {}", text(&checked.stderr));
    for shell in ["zsh", "fish"] {
        let out = soulbox(data.path(), &["completions", shell]);
        assert!(out.status.success() && text(&out.stdout).contains("soulbox"), "{shell}");
    }
    assert_eq!(
        soulbox(data.path(), &["completions", "tcsh"]).status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Runs tmux with `args`; its output.
fn tmux(socket: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("tmux").arg("-S").arg(socket).args(args).output().expect("tmux runs");
    text(&out.stdout)
}

/// Waits until the tmux pane shows `expected`; the screen.
fn screen_shows(socket: &std::path::Path, session: &str, expected: &str) -> String {
    let began = Instant::now();
    loop {
        let screen = tmux(socket, &["capture-pane", "-t", session, "-p"]);
        if screen.contains(expected) {
            return screen;
        }
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "the screen never showed {expected:?}:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connect_is_a_terminal_with_resize_ctrl_c_and_reattach() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed (.ci/run installs it)");
        return;
    }
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path());
    let url = format!("http://127.0.0.1:{}", server.port);
    let id = text(
        &Command::new(env!("CARGO_BIN_EXE_soulbox"))
            .args(["sandbox", "create"])
            .env("SOULBOX_API_URL", &url)
            .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
            .output()
            .expect("soulbox runs")
            .stdout,
    )
    .trim()
    .to_owned();
    let socket = data.path().join("tmux.sock");
    let connect = |extra: &str| {
        format!(
            "SOULBOX_API_URL={url} SOULBOX_API_KEY={} {} sandbox connect {id} {extra}; echo exited=$?; sleep 60",
            soulbox_tests::TEST_API_KEY,
            env!("CARGO_BIN_EXE_soulbox")
        )
    };
    tmux(&socket, &["new-session", "-d", "-s", "one", "-x", "100", "-y", "30", &connect("")]);
    screen_shows(&socket, "one", "user@sandbox");
    tmux(
        &socket,
        &[
            "send-keys",
            "-t",
            "one",
            "echo typed-$((6*7)); stty size; echo pid=$$; echo done-$((1+1))",
            "Enter",
        ],
    );
    // `done-2` is in the output only (the typed line shows `done-$((1+1))`).
    let screen = screen_shows(&socket, "one", "done-2");
    assert!(screen.contains("typed-42") && screen.contains("30 100"), "{screen}");
    let pid: String = screen
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .expect("the shell's pid")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    tmux(&socket, &["resize-window", "-t", "one", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&socket, &["send-keys", "-t", "one", "stty size; sleep 100", "Enter"]);
    screen_shows(&socket, "one", "40 120");
    tmux(&socket, &["send-keys", "-t", "one", "C-c"]);
    tmux(&socket, &["send-keys", "-t", "one", "echo interrupted=$?", "Enter"]);
    screen_shows(&socket, "one", "interrupted=130");

    // The connection drops (the client is killed); the shell keeps running and takes a
    // reattached terminal.
    tmux(&socket, &["kill-session", "-t", "one"]);
    let listed = Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["ps", &id])
        .env("SOULBOX_API_URL", &url)
        .env("SOULBOX_API_KEY", soulbox_tests::TEST_API_KEY)
        .output()
        .expect("soulbox runs");
    assert!(text(&listed.stdout).contains(&pid), "the shell still runs: {}", text(&listed.stdout));
    tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "two",
            "-x",
            "100",
            "-y",
            "30",
            &connect(&format!("--pid {pid}")),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    tmux(&socket, &["send-keys", "-t", "two", "echo reattached-$$; exit 5", "Enter"]);
    let screen = screen_shows(&socket, "two", "exited=");
    assert!(
        screen.contains(&format!("reattached-{pid}")) && screen.contains("exited=5"),
        "{screen}"
    );
    tmux(&socket, &["kill-server"]);
    server.kill();
}

/// The control groups of server `pid`'s native sandboxes (prepared ones included).
fn sandbox_cgroups(pid: u32) -> usize {
    let prefix = format!("{pid}-");
    ["/sys/fs/cgroup/soulbox", "/sys/fs/cgroup/memory/soulbox"]
        .iter()
        .filter_map(|parent| std::fs::read_dir(parent).ok())
        .flat_map(|entries| entries.filter_map(Result::ok))
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

/// Waits up to 30 s for `condition`; whether it came true.
fn eventually(condition: impl Fn() -> bool) -> bool {
    let began = Instant::now();
    while !condition() {
        if began.elapsed() > Duration::from_secs(30) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[test]
fn a_load_run_leaves_no_sandbox_cgroup_or_descriptor_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: native sandboxes need root");
        return;
    }
    // The language packs of the tests' shared data directory (installed there once).
    tokio::runtime::Runtime::new().expect("tokio").block_on(soulbox_tests::wasm_backend());
    let data = tempfile::tempdir().expect("a data directory");
    for shared in ["packs", "cache"] {
        let from = soulbox_tests::test_data_dir().join(shared);
        std::os::unix::fs::symlink(&from, data.path().join(shared)).expect("linked");
    }
    let mut server = Server::start(data.path());
    let pid = server.child.id();
    let descriptors_of =
        |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let descriptors = || descriptors_of(pid);
    let workers = || soulbox_tests::wasm_worker_pids(pid);
    let worker_descriptors = || workers().into_iter().map(descriptors_of).sum::<usize>();
    // One cycle of what the load does: a sandbox, a cell and a command in it, its kill; and a
    // one-off run of each kind.
    let cycle = || {
        let (status, created) = server.json("POST", "/v2/sandboxes", json!({"templateID": "base"}));
        assert_eq!(status, 201, "{created}");
        let id = created["sandboxID"].as_str().expect("an id");
        let token = created["envdAccessToken"].as_str().expect("a token");
        let cell =
            serde_json::to_vec(&json!({"code": "1 + 1", "language": "javascript"})).expect("json");
        let data_plane = |port: &'static str, content_type: &'static str| {
            [
                ("E2b-Sandbox-Id", id),
                ("E2b-Sandbox-Port", port),
                ("X-Access-Token", token),
                ("Content-Type", content_type),
            ]
        };
        let (status, answer) =
            server.call("POST", "/execute", &data_plane("49999", "application/json"), &cell);
        assert!(status == 200 && text(&answer).contains(r#""text":"2""#), "{}", text(&answer));
        let envelope = soulbox_tests::connect_envelope(&json!({"process": {"cmd": "/bin/true"}}));
        let (status, answer) = server.call(
            "POST",
            "/process.Process/Start",
            &data_plane("49983", "application/connect+json"),
            &envelope,
        );
        assert!(status == 200 && text(&answer).contains(r#""exited":true"#), "{}", text(&answer));
        let (status, _) = server.json("DELETE", &format!("/sandboxes/{id}"), Value::Null);
        assert_eq!(status, 204);
        for run in [json!({"language": "python", "code": "1"}), json!({"command": ["true"]})] {
            let (status, answer) = server.json("POST", "/v1/run", run);
            assert_eq!((status, &answer["exit_code"]), (200, &json!(0)), "{answer}");
        }
    };
    // Warm up (a first use opens what stays open: modules, the store's files), then let the
    // pool settle at its minimum.
    cycle();
    assert!(eventually(|| sandbox_cgroups(pid) == 2), "the pool settles at 2");
    let before = descriptors();
    let running = workers();
    assert!(!running.is_empty(), "the kernels run in WASM workers");
    let workers_before = worker_descriptors();
    for _ in 0..20 {
        cycle();
    }
    let (_, listed) = server.json("GET", "/v2/sandboxes", Value::Null);
    assert_eq!(listed, json!([]), "no sandbox is left");
    assert!(
        eventually(|| sandbox_cgroups(pid) == 2),
        "only the pool's control groups are left: {}",
        sandbox_cgroups(pid)
    );
    assert!(
        eventually(|| descriptors() <= before + 2),
        "descriptors: {before} before, {} after",
        descriptors()
    );
    assert_eq!(workers(), running, "the same workers served the whole run");
    assert!(
        eventually(|| worker_descriptors() <= workers_before + 2),
        "the workers' descriptors: {workers_before} before, {} after",
        worker_descriptors()
    );
    // Killed with SIGKILL, the server leaves no worker behind: each leaves at the end of its
    // socket.
    server.kill();
    assert!(
        eventually(|| running.iter().all(|worker| {
            // Gone, or a zombie waiting for whoever inherited it.
            std::fs::read_to_string(format!("/proc/{worker}/stat")).map_or(true, |stat| {
                stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'))
            })
        })),
        "a WASM worker outlived the server"
    );
}
