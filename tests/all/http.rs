//! The HTTP API over a real socket.

use std::time::Duration;

use serde_json::{Value, json};

/// Starts the API on an ephemeral local port; returns its base URL and its data directory.
async fn serve() -> (String, tempfile::TempDir) {
    soulbox_tests::serve_with_manager().await
}

async fn request(method: &str, url: &str, body: Option<Vec<u8>>) -> (u16, Vec<u8>) {
    let (status, _, body) = soulbox_tests::http_request(method, url, body).await;
    (status, body)
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let (status, body) = request("POST", url, Some(serde_json::to_vec(&body).expect("json"))).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn health_lists_tiers_and_languages() {
    let (base, _data) = serve().await;
    let (status, body) = request("GET", &format!("{base}/health"), None).await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["tiers"][0], json!({"tier": "wasm", "available": true}));
    let native = &health["tiers"][1];
    assert_eq!(native["tier"], "native");
    // Where the native tier cannot run, /health says why.
    assert_eq!(native["available"], soulbox_tests::native_backend().is_some(), "{native}");
    if native["available"] == false {
        assert!(native["reason"].as_str().is_some_and(|r| !r.is_empty()), "{native}");
    }
    let ready = |tier: &str| -> Vec<String> {
        health["languages"]
            .as_array()
            .expect("languages")
            .iter()
            .filter(|l| l["status"]["status"] == "ready" && l["tier"] == tier)
            .filter_map(|l| l["language"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(ready("wasm"), ["python", "javascript", "ruby"]);
    if native["available"] == true {
        assert!(ready("native").contains(&"bash".to_owned()), "{health}");
    }
}

#[tokio::test]
async fn run_returns_the_whole_result() {
    let (base, _data) = serve().await;
    let (status, body) = post(
        &format!("{base}/v1/run"),
        json!({"language": "python", "code": "print('hi')\n6 * 7"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tier"], "wasm");
    assert_eq!(body["stdout"], "hi\n");
    assert_eq!(body["results"][0]["data"]["text/plain"], "42");
    assert_eq!(body["termination"], json!({"kind": "exited", "code": 0}));
    assert_eq!(body["exit_code"], 0);
    assert!(body["timings"]["total_us"].as_u64().expect("timings") > 0);
}

#[tokio::test]
async fn run_streams_json_lines_ending_with_end() {
    let (base, _data) = serve().await;
    let body =
        json!({"language": "js", "code": "console.log('a'); console.log('b'); 1", "stream": true});
    let (status, raw) =
        request("POST", &format!("{base}/v1/run"), Some(serde_json::to_vec(&body).expect("json")))
            .await;
    assert_eq!(status, 200);
    let lines: Vec<Value> = String::from_utf8(raw)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let types: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(types.last(), Some(&"end"), "{lines:?}");
    assert!(types.contains(&"stdout") && types.contains(&"result"), "{types:?}");
    assert_eq!(lines.last().expect("end")["exit_code"], 0);
}

#[tokio::test]
async fn run_timeout_is_reported() {
    let (base, _data) = serve().await;
    let (status, body) = post(
        &format!("{base}/v1/run"),
        json!({"language": "ruby", "code": "loop {}", "limits": {"timeout_ms": 200}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["termination"], json!({"kind": "timed_out", "limit_ms": 200}));
    assert_eq!(body["exit_code"], 124);
}

#[tokio::test]
async fn oversized_code_is_refused_with_413() {
    let (base, _data) = serve().await;
    let code = "#".repeat(soulbox_runtime::MAX_CODE_BYTES + 1);
    let (status, body) =
        post(&format!("{base}/v1/run"), json!({"language": "python", "code": code})).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "code_too_large");
    assert!(body["error"]["message"].as_str().expect("message").contains("maximum"));
}

#[tokio::test]
async fn oversized_body_is_refused_with_413_in_json() {
    let (base, _data) = serve().await;
    let body = vec![b' '; soulbox_host::server::MAX_REQUEST_BODY_BYTES + 1];
    let (status, body) = request("POST", &format!("{base}/v1/run"), Some(body)).await;
    assert_eq!(status, 413);
    let body: Value = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(body["error"]["code"], "request_rejected");
}

#[tokio::test]
async fn unknown_language_and_bad_json_are_400_with_clear_messages() {
    let (base, _data) = serve().await;
    let (status, body) =
        post(&format!("{base}/v1/run"), json!({"language": "cobol", "code": "x"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "unknown_language");
    assert!(body["error"]["message"].as_str().expect("message").contains("python"));
    let (status, body) = post(&format!("{base}/v1/run"), json!({"lang": "python"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    let (status, body) = post(
        &format!("{base}/v1/run"),
        json!({"language": "python", "code": "1", "limits": {"memory_bytes": 1}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_limits");
}

#[tokio::test]
async fn run_takes_a_command_for_the_native_tier() {
    if soulbox_tests::native_backend().is_none() {
        return;
    }
    let (base, _data) = serve().await;
    let url = format!("{base}/v1/run");
    let (status, body) = post(&url, json!({"command": ["sh", "-c", "echo hi; id -u"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tier"], "native");
    assert_eq!(body["stdout"], "hi\n1000\n");
    assert_eq!(body["exit_code"], 0);
    let (status, body) =
        post(&url, json!({"command": ["true"], "language": "python", "code": "1"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    let (status, body) = post(&url, json!({"command": []})).await;
    assert_eq!(status, 400, "{body}");
}

/// Sends `bytes` on a new connection to `base`; the connection.
async fn connect_and_send(base: &str, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connected");
    stream.write_all(bytes).await.expect("sent");
    stream
}

/// Reads what the server sends until it closes the connection, within `patience`.
async fn read_to_close(stream: &mut tokio::net::TcpStream, patience: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(patience, stream.read_to_end(&mut answer)).await;
    read.ok().map(|_| String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn slow_and_excess_connections_are_bounded() {
    let limits = soulbox_host::server::ConnectionLimits {
        max_connections: 4,
        header_read_timeout: Duration::from_millis(500),
    };
    let setup = soulbox_tests::ServerSetup { limits, ..Default::default() };
    let (base, _data, _app) = soulbox_tests::serve_setup(|app| app, setup).await;
    // A client that sends its headers slowly (slowloris) is cut off at the timeout.
    let mut slow = connect_and_send(&base, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
    let began = std::time::Instant::now();
    let answer = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(answer.is_some(), "the server closed the slow connection");
    assert!(began.elapsed() < Duration::from_secs(2), "{:?}", began.elapsed());
    // Four connections that send nothing hold every place: a fifth request waits...
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_and_send(&base, b"").await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut waiting = connect_and_send(&base, health).await;
    let early = read_to_close(&mut waiting, Duration::from_millis(200)).await;
    assert!(early.is_none(), "served past the connection limit: {early:?}");
    // ...and is served once one of them ends (here: their header timeout).
    let answer = read_to_close(&mut waiting, Duration::from_secs(5)).await.expect("served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);
    // The server stands.
    let (status, _) = request("GET", &format!("{base}/health"), None).await;
    assert_eq!(status, 200);
}
