//! The `soulbox` binary, run as a user would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
        "POST /v1/run HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
