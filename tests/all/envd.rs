//! A sandbox's data plane (envd and the code interpreter) over a real socket: routing, access
//! tokens, signed URLs, and bad input — unknown sandboxes, malformed requests, paths that
//! escape, clients that leave mid-stream. The happy paths are driven by the official SDKs in
//! `e2b_sdk.rs`.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use soulbox_tests::{connect_envelope, http_request, http_request_with, serve_with_manager};

/// A server and a new `base` sandbox on it: base URL, id, access token.
async fn sandbox() -> (String, String, String, tempfile::TempDir) {
    let (base, data) = serve_with_manager().await;
    let body = serde_json::to_vec(&json!({"templateID": "base", "timeout": 120})).expect("json");
    let (status, _, bytes) =
        http_request("POST", &format!("{base}/v2/sandboxes"), Some(body)).await;
    assert_eq!(status, 201);
    let created: Value = serde_json::from_slice(&bytes).expect("json");
    let id = created["sandboxID"].as_str().expect("an id").to_owned();
    let token = created["envdAccessToken"].as_str().expect("a token").to_owned();
    assert!(token.len() >= 32, "{created}");
    (base, id, token, data)
}

/// A data-plane request to envd of sandbox `id`.
async fn envd(
    base: &str,
    id: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let mut headers = vec![("e2b-sandbox-id", id), ("e2b-sandbox-port", "49983")];
    headers.push(("content-type", content_type));
    if let Some(token) = token {
        headers.push(("x-access-token", token));
    }
    let (status, _, body) =
        http_request_with(method, &format!("{base}{path}"), &headers, Some(body)).await;
    (status, body)
}

/// A unary Connect call with JSON.
async fn rpc(base: &str, id: &str, token: &str, method: &str, message: Value) -> (u16, Value) {
    let body = serde_json::to_vec(&message).expect("json");
    let (status, bytes) =
        envd(base, id, Some(token), "POST", method, "application/json", body).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(bytes)))
}

#[tokio::test]
async fn unknown_paused_and_killed_sandboxes_answer_502_not_found() {
    let (base, id, token, _data) = sandbox().await;
    let health = |id: String| {
        let base = base.clone();
        async move { envd(&base, &id, None, "GET", "/health", "text/plain", vec![]).await }
    };
    assert_eq!(health(id.clone()).await.0, 204);
    let (status, body) = health("aaaaaaaaaaaaaaaaaaaa".to_owned()).await;
    assert_eq!(status, 502);
    assert!(json_of(&body)["message"].as_str().is_some_and(|m| m.contains("was not found")));

    http_request("POST", &format!("{base}/sandboxes/{id}/pause"), None).await;
    assert_eq!(health(id.clone()).await.0, 502, "a paused sandbox's envd does not answer");
    let (status, _) = rpc(&base, &id, &token, "/process.Process/List", json!({})).await;
    assert_eq!(status, 502);
    http_request("POST", &format!("{base}/v2/sandboxes/{id}/connect"), None).await;
    assert_eq!(health(id.clone()).await.0, 204, "connect resumed it");

    http_request("DELETE", &format!("{base}/sandboxes/{id}"), None).await;
    let (status, body) = health(id.clone()).await;
    assert_eq!(status, 502);
    assert_eq!(json_of(&body)["sandboxId"], id.as_str());
}

#[tokio::test]
async fn every_call_but_health_needs_the_access_token() {
    let (base, id, token, _data) = sandbox().await;
    let stat = serde_json::to_vec(&json!({"path": "/home/user"})).expect("json");
    for given in [None, Some("wrong"), Some("")] {
        let (status, body) = envd(
            &base,
            &id,
            given,
            "POST",
            "/filesystem.Filesystem/Stat",
            "application/json",
            stat.clone(),
        )
        .await;
        assert_eq!(status, 401, "token {given:?}: {}", String::from_utf8_lossy(&body));
        let (status, _) =
            envd(&base, &id, given, "GET", "/files?path=a.txt", "text/plain", vec![]).await;
        assert_eq!(status, 401, "token {given:?}");
    }
    let (status, answer) =
        rpc(&base, &id, &token, "/filesystem.Filesystem/Stat", json!({"path": "/home/user"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(answer["entry"]["path"], "/home/user");
    let (status, body) = envd(&base, &id, Some(&token), "GET", "/metrics", "", vec![]).await;
    assert_eq!(status, 200);
    let metrics = json_of(&body);
    assert_eq!(metrics["cpu_count"], 1, "{metrics}");
    assert!(metrics["mem_total"].as_u64().is_some_and(|m| m > 0), "{metrics}");
    assert!(metrics["disk_total"].as_u64().is_some_and(|d| d > 0), "{metrics}");
    // Another sandbox's token opens nothing here.
    let body = serde_json::to_vec(&json!({"templateID": "base"})).expect("json");
    let (_, _, other) = http_request("POST", &format!("{base}/v2/sandboxes"), Some(body)).await;
    let other_token = json_of(&other)["envdAccessToken"].as_str().expect("a token").to_owned();
    let (status, _) = rpc(&base, &id, &other_token, "/process.Process/List", json!({})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn host_names_route_to_the_sandbox_and_its_ports() {
    let (base, id, token, _data) = sandbox().await;
    let host = format!("49983-{id}.sandbox.example.test");
    let (status, _, _) =
        http_request_with("GET", &format!("{base}/health"), &[("host", &host)], None).await;
    assert_eq!(status, 204, "envd's health, not the control plane's");
    let (status, _, body) = http_request_with(
        "POST",
        &format!("{base}/filesystem.Filesystem/ListDir"),
        &[("host", &host), ("x-access-token", &token), ("content-type", "application/json")],
        Some(br#"{"path":"/home/user"}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = http_request_with(
        "GET",
        &format!("{base}/health"),
        &[("host", &format!("50000-{id}.sandbox.example.test"))],
        None,
    )
    .await;
    assert_eq!(status, 502);
    assert!(json_of(&body)["message"].as_str().is_some_and(|m| m.contains("port is not open")));
    // A host without the form is the control plane's.
    let (status, _, body) =
        http_request_with("GET", &format!("{base}/health"), &[("host", "localhost")], None).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["status"], "ok");
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_in_the_protocols_shape() {
    let (base, id, token, _data) = sandbox().await;
    let (status, body) = envd(
        &base,
        &id,
        Some(&token),
        "POST",
        "/filesystem.Filesystem/Stat",
        "application/json",
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["code"], "invalid_argument", "{}", json_of(&body));

    let (status, body) = envd(
        &base,
        &id,
        Some(&token),
        "POST",
        "/filesystem.Filesystem/Stat",
        "text/xml",
        br#"{"path":"/home/user"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400, "a wrong content type");
    assert_eq!(json_of(&body)["code"], "invalid_argument", "{}", json_of(&body));

    // A stream whose envelope is cut short: the answer is an end-of-stream error frame.
    let (status, body) = envd(
        &base,
        &id,
        Some(&token),
        "POST",
        "/process.Process/Start",
        "application/connect+json",
        vec![0, 0, 0, 0, 50, b'{'],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body[0], 2, "an end-of-stream frame: {body:?}");
    assert_eq!(json_of(&body[5..])["error"]["code"], "invalid_argument");

    // A body larger than a call may carry.
    let big = vec![b' '; 17 << 20];
    let (status, body) = envd(
        &base,
        &id,
        Some(&token),
        "POST",
        "/process.Process/SendInput",
        "application/json",
        big,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(json_of(&body)["code"], "resource_exhausted", "{}", json_of(&body));

    let (status, body) =
        envd(&base, &id, Some(&token), "POST", "/files", "application/octet-stream", b"x".to_vec())
            .await;
    assert_eq!(status, 400, "a raw upload without a path");
    assert_eq!(json_of(&body)["code"], 400);

    let (status, body) =
        envd(&base, &id, Some(&token), "GET", "/files?path=/home/user", "", vec![]).await;
    assert_eq!(status, 400, "a directory is not downloadable: {}", json_of(&body));
    let (status, body) =
        envd(&base, &id, Some(&token), "GET", "/files?path=nope.txt", "", vec![]).await;
    assert_eq!(status, 404);
    assert_eq!(json_of(&body)["code"], 404);

    let (status, answer) = rpc(
        &base,
        &id,
        &token,
        "/process.Process/SendSignal",
        json!({"process": {"pid": 4242}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    assert_eq!((status, answer["code"].as_str()), (404, Some("not_found")), "{answer}");
    let (status, answer) = rpc(
        &base,
        &id,
        &token,
        "/process.Process/SendSignal",
        json!({"process": {"pid": 1}, "signal": "SIGNAL_SIGHUP"}),
    )
    .await;
    assert_eq!(status, 501, "{answer}");
}

#[tokio::test]
async fn paths_that_escape_the_sandbox_are_refused_and_touch_nothing() {
    let (base, id, token, data) = sandbox().await;
    let outside = tempfile::tempdir().expect("a directory outside");
    std::fs::write(outside.path().join("secret.txt"), "host secret").expect("write");
    // A link planted in the workspace, as a command could make it.
    let workspace = data.path().join("sandboxes").join(&id).join("workspace");
    std::os::unix::fs::symlink(outside.path(), workspace.join("out")).expect("a link");

    for path in
        ["../../etc/passwd", "/etc/passwd", "/home/user/out/secret.txt", "~/../../etc/hostname"]
    {
        let url = format!("/files?path={}", path.replace('/', "%2F"));
        let (status, body) = envd(&base, &id, Some(&token), "GET", &url, "", vec![]).await;
        assert_eq!(status, 403, "{path}: {}", String::from_utf8_lossy(&body));
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("root:x:0:0") && !text.contains("host secret"), "{text}");
    }
    for path in ["../escaped.txt", "/etc/escaped.txt", "/home/user/out/planted.txt"] {
        let url = format!("/files?path={}", path.replace('/', "%2F"));
        let (status, _) =
            envd(&base, &id, Some(&token), "POST", &url, "application/octet-stream", b"x".to_vec())
                .await;
        assert_eq!(status, 403, "{path}");
        let (status, answer) = rpc(
            &base,
            &id,
            &token,
            "/filesystem.Filesystem/MakeDir",
            json!({"path": format!("{path}.d")}),
        )
        .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (403, Some("permission_denied")),
            "{path}: {answer}"
        );
    }
    let (status, answer) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/ListDir",
        json!({"path": "/home/user/out"}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, _) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/Remove",
        json!({"path": "/home/user/out/secret.txt"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/Move",
        json!({"source": "/home/user/out/secret.txt", "destination": "/home/user/stolen.txt"}),
    )
    .await;
    assert_eq!(status, 403);
    let left: Vec<_> = std::fs::read_dir(outside.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("secret.txt")], "nothing was added outside");
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).expect("read"),
        "host secret"
    );
    assert!(!data.path().join("sandboxes").join(&id).join("escaped.txt").exists());
}

/// E2B's signature of a file URL.
fn signature(path: &str, operation: &str, token: &str, expiration: Option<u64>) -> String {
    let mut text = format!("{path}:{operation}::{token}");
    if let Some(expiration) = expiration {
        text.push_str(&format!(":{expiration}"));
    }
    let digest = Sha256::digest(text.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn signed_urls_stand_in_for_the_token_until_they_expire() {
    let (base, id, token, _data) = sandbox().await;
    let path = "/home/user/signed.txt";
    // Upload and download with signatures only, and no sandbox id: single-URL mode.
    let write = signature(path, "write", &token, None);
    let url =
        format!("{base}/files?path={}&signature={}", query_escape(path), query_escape(&write));
    let (status, _, body) = http_request_with(
        "POST",
        &url,
        &[("content-type", "application/octet-stream")],
        Some(b"signed content".to_vec()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let later =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs()
            + 60;
    let read = signature(path, "read", &token, Some(later));
    let url = format!(
        "{base}/files?path={}&signature={}&signature_expiration={later}",
        query_escape(path),
        query_escape(&read)
    );
    let (status, _, body) = http_request_with("GET", &url, &[], None).await;
    assert_eq!((status, body.as_slice()), (200, b"signed content".as_slice()));

    // A read signature does not write; an expired or altered one does nothing.
    let url = format!(
        "{base}/files?path={}&signature={}",
        query_escape(path),
        query_escape(&signature(path, "read", &token, None))
    );
    let (status, _, _) = http_request_with(
        "POST",
        &url,
        &[("e2b-sandbox-id", &id), ("content-type", "application/octet-stream")],
        Some(b"overwritten".to_vec()),
    )
    .await;
    assert_eq!(status, 401);
    let past = later - 3600;
    let expired = signature(path, "read", &token, Some(past));
    let url = format!(
        "{base}/files?path={}&signature={}&signature_expiration={past}",
        query_escape(path),
        query_escape(&expired)
    );
    let (status, _, _) = http_request_with("GET", &url, &[("e2b-sandbox-id", &id)], None).await;
    assert_eq!(status, 401);
    let url = format!("{base}/files?path={}&signature=v1_forged", query_escape(path));
    let (status, _, _) = http_request_with("GET", &url, &[("e2b-sandbox-id", &id)], None).await;
    assert_eq!(status, 401);
    let (status, body) =
        envd(&base, &id, Some(&token), "GET", "/files?path=signed.txt", "", vec![]).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, b"signed content".as_slice()),
        "nothing was overwritten"
    );
}

/// Sends `Start` for a shell command and returns the pid from the first frame, then hangs up.
async fn start_and_leave(base: &str, id: &str, token: &str, script: &str, stdin: bool) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let envelope = connect_envelope(
        &json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": stdin}),
    );
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /process.Process/Start HTTP/1.1\r\nhost: {address}\r\ne2b-sandbox-id: {id}\r\nx-access-token: {token}\r\ncontent-type: application/connect+json\r\ncontent-length: {}\r\n\r\n",
        envelope.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(&envelope).await.expect("write");
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    let pid = loop {
        let n = stream.read(&mut buffer).await.expect("read");
        assert!(
            n > 0,
            "the stream ended before its start event: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(at) = text.find(r#"{"event":{"start":{"pid":"#) {
            let rest = &text[at + 25..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !digits.is_empty() && rest[digits.len()..].starts_with('}') {
                break digits.parse().expect("a pid");
            }
        }
    };
    drop(stream);
    pid
}

#[tokio::test]
async fn a_process_outlives_the_client_that_left_its_stream() {
    let (base, id, token, _data) = sandbox().await;
    let pid = start_and_leave(
        &base,
        &id,
        &token,
        "sleep 1; echo finished > /home/user/left.txt; sleep 30",
        false,
    )
    .await;
    let (status, listed) = rpc(&base, &id, &token, "/process.Process/List", json!({})).await;
    assert_eq!(status, 200);
    let pids: Vec<u64> = listed["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert!(pids.contains(&pid), "{listed}");
    let mut content = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, body) =
            envd(&base, &id, Some(&token), "GET", "/files?path=left.txt", "", vec![]).await;
        if status == 200 {
            content = body;
            break;
        }
    }
    assert_eq!(content, b"finished\n", "the process ran on after its client left");
    let (status, _) = rpc(
        &base,
        &id,
        &token,
        "/process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..50 {
        let (_, listed) = rpc(&base, &id, &token, "/process.Process/List", json!({})).await;
        if listed["processes"].as_array().is_some_and(Vec::is_empty) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the killed process is still listed");
}

/// The messages of a whole Connect stream: (flags, JSON) per envelope.
fn envelopes(mut body: &[u8]) -> Vec<(u8, Value)> {
    let mut frames = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        frames.push((body[0], json_of(&body[5..5 + len])));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "a truncated frame");
    frames
}

/// Runs `script` with `Start` to its end; every frame of the answer.
async fn start_to_end(
    base: &str,
    id: &str,
    token: &str,
    script: &str,
    headers: &[(&str, &str)],
) -> Vec<(u8, Value)> {
    let body = connect_envelope(
        &json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false}),
    );
    let mut all = vec![
        ("e2b-sandbox-id", id),
        ("x-access-token", token),
        ("content-type", "application/connect+json"),
    ];
    all.extend_from_slice(headers);
    let (status, response_headers, bytes) =
        http_request_with("POST", &format!("{base}/process.Process/Start"), &all, Some(body)).await;
    assert_eq!(status, 200);
    assert_eq!(
        response_headers["content-type"], "application/connect+json",
        "exactly, or the SDK refuses it"
    );
    envelopes(&bytes)
}

#[tokio::test]
async fn streams_carry_keepalives_and_a_deadline_ends_the_process() {
    let (base, id, token, _data) = sandbox().await;
    let frames = start_to_end(
        &base,
        &id,
        &token,
        "sleep 2.5; echo done",
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    let kinds: Vec<String> = frames
        .iter()
        .map(|(flags, message)| {
            match message["event"].as_object().and_then(|e| e.keys().next().cloned()) {
                Some(kind) => kind,
                None => format!("trailer {flags} {message}"),
            }
        })
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("start"), "{kinds:?}");
    assert!(kinds.iter().filter(|k| *k == "keepalive").count() >= 2, "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2], "end", "{kinds:?}");
    assert_eq!(frames.last().map(|(flags, m)| (*flags, m.clone())), Some((2, json!({}))));
    let data =
        frames.iter().find_map(|(_, m)| m["event"]["data"]["stdout"].as_str()).expect("output");
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(data).expect("base64"), b"done\n");

    // `connect-timeout-ms` is the process's lifetime.
    let began = std::time::Instant::now();
    let frames =
        start_to_end(&base, &id, &token, "sleep 30", &[("connect-timeout-ms", "500")]).await;
    let elapsed = began.elapsed();
    let end =
        frames.iter().find_map(|(_, m)| m["event"].get("end").cloned()).expect("an end event");
    assert_eq!(
        end,
        json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"})
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "killed at its deadline, not at its end: {elapsed:?}"
    );
    let (_, listed) = rpc(&base, &id, &token, "/process.Process/List", json!({})).await;
    assert_eq!(listed["processes"], json!([]), "{listed}");
}

/// Runs a shell command in the sandbox to its end; its stdout.
async fn shell_in(base: &str, id: &str, token: &str, script: &str) -> String {
    let frames = start_to_end(base, id, token, script, &[]).await;
    let mut stdout = Vec::new();
    for (_, message) in &frames {
        if let Some(data) = message["event"]["data"]["stdout"].as_str() {
            stdout.extend(base64::engine::general_purpose::STANDARD.decode(data).expect("base64"));
        }
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

#[tokio::test]
async fn the_files_api_reaches_the_native_tmp_as_the_sandbox_user() {
    let (base, id, token, _data) = sandbox().await;
    // A WASM-first sandbox too: its native side starts when /tmp is first reached.
    let upload = [
        ("e2b-sandbox-id", id.as_str()),
        ("x-access-token", token.as_str()),
        ("content-type", "application/octet-stream"),
    ];
    let (status, _, body) = http_request_with(
        "POST",
        &format!("{base}/files?path=%2Ftmp%2Fdeep%2Fin%2Ftmp.txt"),
        &upload,
        Some(b"in tmp".to_vec()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen = shell_in(&base, &id, &token, "cat /tmp/deep/in/tmp.txt; echo; stat -c '%U %n' /tmp/deep /tmp/deep/in /tmp/deep/in/tmp.txt; echo more >> /tmp/deep/in/tmp.txt").await;
    assert_eq!(
        seen, "in tmp\nuser /tmp/deep\nuser /tmp/deep/in\nuser /tmp/deep/in/tmp.txt\n",
        "made by the files API, owned by the sandbox user"
    );
    let (status, body) = envd(
        &base,
        &id,
        Some(&token),
        "GET",
        "/files?path=%2Ftmp%2Fdeep%2Fin%2Ftmp.txt",
        "",
        vec![],
    )
    .await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (200, "in tmpmore\n".to_owned())
    );
    let (status, listed) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/ListDir",
        json!({"path": "/tmp/deep", "depth": 2}),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let paths: Vec<&str> = listed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(paths, ["/tmp/deep/in", "/tmp/deep/in/tmp.txt"]);
    assert_eq!(listed["entries"][1]["owner"], "user", "{listed}");
    // A link made in the sandbox leads nowhere outside /tmp, even inside the sandbox.
    shell_in(&base, &id, &token, "ln -s /etc/hostname /tmp/host-link; ln -s ../etc /tmp/etc-link")
        .await;
    for path in ["%2Ftmp%2Fhost-link", "%2Ftmp%2Fetc-link%2Fhostname"] {
        let (status, body) =
            envd(&base, &id, Some(&token), "GET", &format!("/files?path={path}"), "", vec![]).await;
        assert_eq!(status, 403, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/Move",
        json!({"source": "/tmp/deep/in/tmp.txt", "destination": "/home/user/moved.txt"}),
    )
    .await;
    assert_eq!(status, 400, "no move between the two file systems");
    let (status, _) =
        rpc(&base, &id, &token, "/filesystem.Filesystem/Remove", json!({"path": "/tmp"})).await;
    assert_eq!(status, 400, "/tmp itself stays");
    let (status, _) =
        rpc(&base, &id, &token, "/filesystem.Filesystem/Remove", json!({"path": "/tmp/deep"}))
            .await;
    assert_eq!(status, 200);
    assert_eq!(
        shell_in(&base, &id, &token, "ls /tmp/deep 2>&1 || echo gone").await.lines().last(),
        Some("gone")
    );
}

#[tokio::test]
async fn terminal_sizes_of_zero_or_absurd_are_refused() {
    let (base, id, token, _data) = sandbox().await;
    for (cols, rows) in [(0, 24), (80, 0), (5000, 24), (80, 70_000)] {
        let message =
            json!({"process": {"cmd": "/bin/bash"}, "pty": {"size": {"cols": cols, "rows": rows}}});
        let envelope = connect_envelope(&message);
        let (status, answer) = envd(
            &base,
            &id,
            Some(&token),
            "POST",
            "/process.Process/Start",
            "application/connect+json",
            envelope,
        )
        .await;
        assert_eq!(status, 200);
        let frames = envelopes(&answer);
        assert_eq!(frames.len(), 1, "no process started: {frames:?}");
        assert_eq!(frames[0].1["error"]["code"], "invalid_argument", "{cols}x{rows}: {frames:?}");
    }
    // A real terminal refuses a bad resize and takes a good one; a process without one has
    // nothing to resize.
    let message = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 30"]}, "pty": {"size": {"cols": 80, "rows": 24}}});
    let envelope = connect_envelope(&message);
    let started = tokio::spawn({
        let (base, id, token) = (base.clone(), id.clone(), token.clone());
        async move {
            envd(
                &base,
                &id,
                Some(&token),
                "POST",
                "/process.Process/Start",
                "application/connect+json",
                envelope,
            )
            .await
        }
    });
    let mut pid = None;
    for _ in 0..100 {
        let (_, listed) = rpc(&base, &id, &token, "/process.Process/List", json!({})).await;
        pid = listed["processes"][0]["pid"].as_u64();
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = pid.expect("the terminal's process");
    let resize = |cols: u32, rows: u32| json!({"process": {"pid": pid}, "pty": {"size": {"cols": cols, "rows": rows}}});
    let (status, answer) = rpc(&base, &id, &token, "/process.Process/Update", resize(0, 0)).await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("invalid_argument")), "{answer}");
    let (status, answer) =
        rpc(&base, &id, &token, "/process.Process/Update", resize(120, 50)).await;
    assert_eq!(status, 200, "{answer}");
    rpc(
        &base,
        &id,
        &token,
        "/process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    started.await.expect("the stream ends");
    let plain = start_and_leave(&base, &id, &token, "sleep 30", false).await;
    let (status, answer) = rpc(
        &base,
        &id,
        &token,
        "/process.Process/Update",
        json!({"process": {"pid": plain}, "pty": {"size": {"cols": 80, "rows": 24}}}),
    )
    .await;
    assert_eq!((status, answer["code"].as_str()), (412, Some("failed_precondition")), "{answer}");
}

#[tokio::test]
async fn watchers_per_sandbox_obeyed_and_violated() {
    let (base, id, token, _data) = sandbox().await;
    let watch = json!({"path": "/home/user"});
    let mut ids = Vec::new();
    for _ in 0..64 {
        let (status, answer) =
            rpc(&base, &id, &token, "/filesystem.Filesystem/CreateWatcher", watch.clone()).await;
        assert_eq!(status, 200, "{answer}");
        ids.push(answer["watcherId"].as_str().expect("an id").to_owned());
    }
    let (status, answer) =
        rpc(&base, &id, &token, "/filesystem.Filesystem/CreateWatcher", watch.clone()).await;
    assert_eq!((status, answer["code"].as_str()), (429, Some("resource_exhausted")), "{answer}");
    let (status, _) = rpc(
        &base,
        &id,
        &token,
        "/filesystem.Filesystem/RemoveWatcher",
        json!({"watcherId": ids[0]}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = rpc(&base, &id, &token, "/filesystem.Filesystem/CreateWatcher", watch).await;
    assert_eq!(status, 200, "a removed watcher makes room");
}

#[tokio::test]
async fn contexts_per_sandbox_obeyed_and_violated() {
    let (base, id, token, _data) = sandbox().await;
    let headers = [
        ("e2b-sandbox-id", id.as_str()),
        ("e2b-sandbox-port", "49999"),
        ("x-access-token", token.as_str()),
        ("content-type", "application/json"),
    ];
    let url = format!("{base}/contexts");
    let create =
        || http_request_with("POST", &url, &headers, Some(br#"{"language":"python"}"#.to_vec()));

    let mut first = String::new();
    for n in 0..64 {
        let (status, _, body) = create().await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        if n == 0 {
            first = json_of(&body)["id"].as_str().expect("an id").to_owned();
        }
    }
    let (status, _, body) = create().await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) =
        http_request_with("DELETE", &format!("{base}/contexts/{first}"), &headers, None).await;
    assert_eq!(status, 200);
    assert_eq!(create().await.0, 200, "a removed context makes room");
}

#[tokio::test]
async fn call_size_obeyed() {
    let (base, id, token, _data) = sandbox().await;
    let pid = start_and_leave(&base, &id, &token, "wc -c > /home/user/count.txt", true).await;
    let data = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 8 << 20]);
    let message = json!({"process": {"pid": pid}, "input": {"stdin": data}});
    let (status, answer) = rpc(&base, &id, &token, "/process.Process/SendInput", message).await;
    assert_eq!(status, 200, "an 11 MiB call under the 16 MiB cap: {answer}");
    let (status, _) =
        rpc(&base, &id, &token, "/process.Process/CloseStdin", json!({"process": {"pid": pid}}))
            .await;
    assert_eq!(status, 200);
    let mut count = Vec::new();
    for _ in 0..100 {
        let (status, body) =
            envd(&base, &id, Some(&token), "GET", "/files?path=count.txt", "", vec![]).await;
        if status == 200 && body.ends_with(b"\n") {
            count = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(String::from_utf8_lossy(&count).trim(), (8 << 20).to_string());
}

#[tokio::test]
async fn every_data_plane_route_refuses_a_missing_wrong_or_foreign_token_and_changes_nothing() {
    let (base, id, _token, data) = sandbox().await;
    let body = serde_json::to_vec(&json!({"templateID": "base"})).expect("json");
    let (_, _, other) = http_request("POST", &format!("{base}/v2/sandboxes"), Some(body)).await;
    let foreign = json_of(&other)["envdAccessToken"].as_str().expect("a token").to_owned();
    let workspace = data.path().join("sandboxes").join(&id).join("workspace");
    let unary = "application/json";
    let stream = "application/connect+json";
    let envelope = |message: Value| connect_envelope(&message);
    let routes: Vec<(&str, &str, &str, Vec<u8>)> = vec![
        (
            "POST",
            "/process.Process/Start",
            stream,
            envelope(json!({"process": {"cmd": "/bin/touch", "args": ["/home/user/started"]}})),
        ),
        ("POST", "/process.Process/Connect", stream, envelope(json!({"process": {"pid": 1}}))),
        ("POST", "/process.Process/List", unary, b"{}".to_vec()),
        (
            "POST",
            "/process.Process/SendInput",
            unary,
            br#"{"process":{"pid":1},"input":{"stdin":"eA=="}}"#.to_vec(),
        ),
        (
            "POST",
            "/process.Process/StreamInput",
            stream,
            envelope(json!({"start": {"process": {"pid": 1}}})),
        ),
        (
            "POST",
            "/process.Process/SendSignal",
            unary,
            br#"{"process":{"pid":1},"signal":"SIGNAL_SIGKILL"}"#.to_vec(),
        ),
        ("POST", "/process.Process/CloseStdin", unary, br#"{"process":{"pid":1}}"#.to_vec()),
        ("POST", "/process.Process/Update", unary, br#"{"process":{"pid":1}}"#.to_vec()),
        ("POST", "/filesystem.Filesystem/Stat", unary, br#"{"path":"/home/user"}"#.to_vec()),
        (
            "POST",
            "/filesystem.Filesystem/MakeDir",
            unary,
            br#"{"path":"/home/user/made"}"#.to_vec(),
        ),
        (
            "POST",
            "/filesystem.Filesystem/Move",
            unary,
            br#"{"source":"/home/user/kept","destination":"/home/user/moved"}"#.to_vec(),
        ),
        ("POST", "/filesystem.Filesystem/ListDir", unary, br#"{"path":"/home/user"}"#.to_vec()),
        ("POST", "/filesystem.Filesystem/Remove", unary, br#"{"path":"/home/user/kept"}"#.to_vec()),
        (
            "POST",
            "/filesystem.Filesystem/WatchDir",
            stream,
            envelope(json!({"path": "/home/user"})),
        ),
        (
            "POST",
            "/filesystem.Filesystem/CreateWatcher",
            unary,
            br#"{"path":"/home/user"}"#.to_vec(),
        ),
        (
            "POST",
            "/filesystem.Filesystem/GetWatcherEvents",
            unary,
            br#"{"watcherId":"x"}"#.to_vec(),
        ),
        ("POST", "/filesystem.Filesystem/RemoveWatcher", unary, br#"{"watcherId":"x"}"#.to_vec()),
        ("GET", "/files?path=kept", "", vec![]),
        ("POST", "/files?path=kept", "application/octet-stream", b"overwritten".to_vec()),
        ("GET", "/metrics", "", vec![]),
    ];
    std::fs::write(workspace.join("kept"), "original").expect("a file");
    for (method, path, content_type, body) in &routes {
        for (token, what) in [
            (None, "no token"),
            (Some("wrong"), "a wrong token"),
            (Some(foreign.as_str()), "another sandbox's token"),
        ] {
            let (status, answer) =
                envd(&base, &id, token, method, path, content_type, body.clone()).await;
            assert_eq!(
                status,
                401,
                "{method} {path} with {what}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    // The code interpreter's /execute too.
    for token in [None, Some(foreign.as_str())] {
        let mut headers = vec![
            ("e2b-sandbox-id", id.as_str()),
            ("e2b-sandbox-port", "49999"),
            ("content-type", "application/json"),
        ];
        if let Some(token) = token {
            headers.push(("x-access-token", token));
        }
        let url = format!("{base}/execute");
        let code = br#"{"code": "open('/home/user/ran', 'w')"}"#.to_vec();
        assert_eq!(http_request_with("POST", &url, &headers, Some(code)).await.0, 401);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut left: Vec<String> = std::fs::read_dir(&workspace)
        .expect("the workspace")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["kept"], "nothing was made, moved or removed");
    assert_eq!(std::fs::read_to_string(workspace.join("kept")).expect("read"), "original");
}

#[tokio::test]
async fn a_terminal_passes_binary_output_through_untouched() {
    let (base, id, token, _data) = sandbox().await;
    let message = json!({
        "process": {"cmd": "/bin/sh", "args": ["-c", "printf '\\377\\376\\000\\200abc'"]},
        "pty": {"size": {"cols": 80, "rows": 24}},
    });
    let body = connect_envelope(&message);
    let (status, answer) = envd(
        &base,
        &id,
        Some(&token),
        "POST",
        "/process.Process/Start",
        "application/connect+json",
        body,
    )
    .await;
    assert_eq!(status, 200);
    let mut screen = Vec::new();
    for (_, frame) in envelopes(&answer) {
        if let Some(data) = frame["event"]["data"]["pty"].as_str() {
            screen.extend(base64::engine::general_purpose::STANDARD.decode(data).expect("base64"));
        }
    }
    assert_eq!(screen, b"\xff\xfe\x00\x80abc", "invalid UTF-8 and NUL pass untouched");
}
