//! E2B's control plane over a real socket, in the shapes and with the status codes the
//! official SDKs expect (`shared/reference/e2b/protocol.md`, section 2).

use serde_json::{Value, json};
use soulbox_tests::{TEST_API_KEY, http_request, http_request_with, serve_with_manager as serve};

async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value, hyper::HeaderMap) {
    let body = body.map(|b| serde_json::to_vec(&b).expect("json"));
    let (status, headers, bytes) = http_request(method, url, body).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), headers)
}

#[tokio::test]
async fn a_sandbox_goes_through_create_info_list_timeout_pause_connect_and_kill() {
    let (base, _data) = serve().await;
    let create = json!({"templateID": "base", "timeout": 120, "metadata": {"owner": "e2b-test"}, "envVars": {}});
    let (status, created, _) = call("POST", &format!("{base}/v2/sandboxes"), Some(create)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["templateID"], "base");
    assert_eq!(created["envdVersion"], "0.6.13");
    let id = created["sandboxID"].as_str().expect("an id").to_owned();
    assert!(created["clientID"].is_string());

    let (status, info, _) = call("GET", &format!("{base}/sandboxes/{id}"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["state"], "running");
    assert_eq!(info["metadata"]["owner"], "e2b-test");
    let started = humantime::parse_rfc3339(info["startedAt"].as_str().expect("startedAt"));
    let ends = humantime::parse_rfc3339(info["endAt"].as_str().expect("endAt"));
    let lifetime =
        ends.expect("RFC 3339").duration_since(started.expect("RFC 3339")).expect("later");
    assert!((119..=121).contains(&lifetime.as_secs()), "{lifetime:?}");

    // The SDK sends the metadata filter as one URL-encoded `k=v` string.
    let url = format!("{base}/v2/sandboxes?metadata=owner%3De2b-test");
    let (status, listed, _) = call("GET", &url, None).await;
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let url = format!("{base}/v2/sandboxes?metadata=owner%3Dnobody");
    assert_eq!(call("GET", &url, None).await.1, json!([]));

    let url = format!("{base}/sandboxes/{id}/timeout");
    assert_eq!(call("POST", &url, Some(json!({"timeout": 600}))).await.0, 204);

    let url = format!("{base}/sandboxes/{id}/pause");
    assert_eq!(call("POST", &url, Some(json!({}))).await.0, 204);
    let (status, conflict, _) = call("POST", &url, Some(json!({}))).await;
    assert_eq!(status, 409, "pausing twice is a conflict: {conflict}");
    assert_eq!(conflict["code"], 409);
    let (_, info, _) = call("GET", &format!("{base}/sandboxes/{id}"), None).await;
    assert_eq!(info["state"], "paused");

    let url = format!("{base}/v2/sandboxes/{id}/connect");
    let (status, connected, _) = call("POST", &url, Some(json!({"timeout": 300}))).await;
    assert_eq!(status, 201, "connecting to a paused sandbox resumes it: {connected}");
    assert_eq!(connected["sandboxID"], id);
    let (status, _, _) = call("POST", &url, Some(json!({}))).await;
    assert_eq!(status, 200, "connecting to a running one does not");

    let url = format!("{base}/sandboxes/{id}");
    assert_eq!(call("DELETE", &url, None).await.0, 204);
    let (status, gone, _) = call("DELETE", &url, None).await;
    assert_eq!(status, 404);
    assert_eq!(gone["code"], 404);
    assert_eq!(call("GET", &url, None).await.0, 404);
}

#[tokio::test]
async fn list_pages_with_the_next_token_header_and_omits_it_on_the_last_page() {
    let (base, _data) = serve().await;
    for _ in 0..3 {
        let body = json!({"templateID": "python", "metadata": {}, "envVars": {}});
        assert_eq!(call("POST", &format!("{base}/sandboxes"), Some(body)).await.0, 201);
    }
    let mut url = format!("{base}/v2/sandboxes?limit=2");
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let (status, page, headers) = call("GET", &url, None).await;
        assert_eq!(status, 200);
        seen += page.as_array().map_or(0, Vec::len);
        pages += 1;
        match headers.get("x-next-token").and_then(|v| v.to_str().ok()).filter(|t| !t.is_empty()) {
            Some(token) => url = format!("{base}/v2/sandboxes?limit=2&nextToken={token}"),
            None => break,
        }
    }
    assert_eq!((seen, pages), (3, 2));
    let (status, running, _) =
        call("GET", &format!("{base}/v2/sandboxes?state=running,paused"), None).await;
    assert_eq!(status, 200);
    assert_eq!(running.as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn bad_requests_get_e2b_errors_and_create_nothing() {
    let (base, data) = serve().await;
    let url = format!("{base}/v2/sandboxes");
    let (status, error, _) =
        call("POST", &url, Some(json!({"templateID": "no-such-template"}))).await;
    assert_eq!((status, &error["code"]), (404, &json!(404)), "{error}");
    assert!(error["message"].as_str().is_some_and(|m| m.contains("no-such-template")));
    let (status, error, _) = call("POST", &url, Some(json!({"timeout": 5}))).await;
    assert_eq!((status, &error["code"]), (400, &json!(400)), "a template is required: {error}");
    let (status, _, _) =
        call("POST", &url, Some(json!({"templateID": "base", "timeout": 100_000_000}))).await;
    assert_eq!(status, 400, "longer than 24 h");
    let (status, _, bytes) = http_request("POST", &url, Some(b"{not json".to_vec())).await;
    assert_eq!(status, 400, "{bytes:?}");
    let body = br#"{"templateID": "base"}"#.to_vec();
    let (status, _, bytes) = http_request_with(
        "POST",
        &url,
        &[("content-type", "text/plain"), ("x-api-key", TEST_API_KEY)],
        Some(body),
    )
    .await;
    assert_eq!(status, 415, "a wrong content type: {bytes:?}");
    let error: Value = serde_json::from_slice(&bytes).expect("E2B's error shape");
    assert_eq!(error["code"], 415);
    let big = vec![b' '; 5 << 20];
    let (status, _, bytes) = http_request("POST", &url, Some(big)).await;
    assert_eq!(status, 413, "an oversized body");
    let error: Value = serde_json::from_slice(&bytes).expect("E2B's error shape");
    assert_eq!(error["code"], 413, "{error}");
    let (status, _, _) = call("GET", &format!("{base}/v2/sandboxes?state=sleeping"), None).await;
    assert_eq!(status, 400);
    let (status, _, _) = call("GET", &format!("{base}/sandboxes/..%2F..%2Fetc"), None).await;
    assert_eq!(status, 404);
    let (_, listed, _) = call("GET", &url, None).await;
    assert_eq!(listed, json!([]), "no refused request made a sandbox");
    let sandboxes = data.path().join("sandboxes");
    assert!(std::fs::read_dir(&sandboxes).map_or(0, |d| d.count()) == 0, "nothing on disk");
}

#[tokio::test]
async fn metrics_are_prometheus_text_named_soulbox() {
    let (base, _data) = serve().await;
    let (status, created, _) =
        call("POST", &format!("{base}/v2/sandboxes"), Some(json!({"templateID": "base"}))).await;
    assert_eq!(status, 201);
    // A cell in the sandbox (its team's load by tier), one in a sandbox of its own, and one
    // stopped at its time limit: each counted, by how it ended.
    let id = created["sandboxID"].as_str().expect("an id");
    let token = created["envdAccessToken"].as_str().expect("a token");
    let headers = [
        ("e2b-sandbox-id", id),
        ("e2b-sandbox-port", "49999"),
        ("x-access-token", token),
        ("content-type", "application/json"),
    ];
    let cell = serde_json::to_vec(&json!({"code": "1 + 1"})).expect("json");
    let (status, _, _) =
        http_request_with("POST", &format!("{base}/execute"), &headers, Some(cell)).await;
    assert_eq!(status, 200);
    let run = format!("{base}/v1/run");
    for (code, timeout_ms) in [("1 + 1", 10_000), ("while True: pass", 200)] {
        let body =
            json!({"language": "python", "code": code, "limits": {"timeout_ms": timeout_ms}});
        let (status, _, _) = call("POST", &run, Some(body)).await;
        assert_eq!(status, 200);
    }
    let (status, headers, body) = http_request("GET", &format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"].to_str().is_ok_and(|t| t.starts_with("text/plain")),
        "{headers:?}"
    );
    let text = String::from_utf8(body).expect("UTF-8");
    let samples: Vec<&str> =
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(!samples.is_empty(), "{text}");
    for sample in &samples {
        let (name, value) = sample.rsplit_once(' ').expect("a name and a value");
        assert!(name.starts_with("soulbox_"), "{sample}");
        assert!(value.parse::<f64>().is_ok(), "{sample}");
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(3) == Some(&"counter") {
            let name = fields[2];
            assert!(
                samples
                    .iter()
                    .all(|s| !s.starts_with(name) || s.starts_with(&format!("{name}_total"))),
                "counters end in _total: {line}"
            );
        }
    }
    for expected in [
        r#"soulbox_sandboxes{state="running",template="base"} 1"#,
        r#"soulbox_sandbox_creates_total{template="base",outcome="created"} 1"#,
        r#"soulbox_sandbox_create_duration_seconds_count{template="base"} 1"#,
        r#"soulbox_pool_sandboxes{tier="native",pool="native"} "#,
        r#"soulbox_pool_target_sandboxes{tier="native",pool="native"} "#,
        r#"soulbox_pool_misses_total{tier="native",pool="native"} "#,
        r#"soulbox_api_responses_total{class="2xx"}"#,
        r#"soulbox_execution_terminations_total{tier="wasm",termination="exited"} 2"#,
        r#"soulbox_execution_terminations_total{tier="wasm",termination="timed_out"} 1"#,
        r#"soulbox_execution_duration_seconds_count{tier="wasm"} 3"#,
        r#"soulbox_executions_total{kind="cell"} 1"#,
        r#"soulbox_tier_sandboxes{team="default",tier="wasm"} 1"#,
        r#"soulbox_admission_refusals_total{reason="memory"} 0"#,
        "soulbox_running_executions 0",
        "soulbox_memory_available_bytes ",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    // Every metric the Grafana dashboard in the repository plots is one the server exposes.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/grafana/soulbox.json"),
    )
    .expect("the dashboard");
    let exposed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let plotted: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("soulbox_"))
        .collect();
    assert!(plotted.len() > 10, "{plotted:?}");
    for metric in plotted {
        let family = ["_bucket", "_total"]
            .iter()
            .find_map(|suffix| metric.strip_suffix(suffix))
            .unwrap_or(metric);
        assert!(
            exposed.contains(&family),
            "the dashboard plots {metric}, not exposed: {exposed:?}"
        );
    }
    let (status, _, _) = http_request_with("GET", &format!("{base}/metrics"), &[], None).await;
    assert_eq!(status, 401, "metrics need a key too");
}
