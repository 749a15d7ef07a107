//! Warm kernels (`wasm-langs/src/warm.rs`) through the API: a new sandbox of a WASM template
//! adopts a kernel made ahead of time together with its directory, so the kernel works in
//! that sandbox's own workspace, and nobody else's; the pool refills and is counted.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soulbox_runtime::Language;
use soulbox_tests::{TEST_API_KEY, execute_cell, http_request_with, serve_app};

/// A cell in sandbox `id`: its result's text, or the error line.
async fn cell(base: &str, id: &str, token: &str, code: &str) -> String {
    let lines = execute_cell(base, id, token, code).await;
    lines
        .iter()
        .find_map(|l| (l["type"] == "result").then(|| l["text"].as_str().unwrap_or("").to_owned()))
        .or_else(|| lines.iter().find(|l| l["type"] == "error").map(Value::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_new_sandbox_adopts_a_warm_kernel_bound_to_its_own_workspace() {
    let (base, _data, app) = serve_app().await;
    let python = Language::parse("python");
    let ready = |app: &soulbox_host::app::App| {
        app.wasm().warm_stats().iter().find(|(l, _)| *l == python).map_or(0, |(_, s)| s.ready)
    };
    let began = Instant::now();
    while ready(&app) == 0 {
        assert!(began.elapsed() < Duration::from_secs(60), "no warm Python kernel was made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let headers = [("x-api-key", TEST_API_KEY), ("content-type", "application/json")];
    let mut sandboxes = Vec::new();
    for _ in 0..2 {
        let body = serde_json::to_vec(&json!({"templateID": "python"})).expect("json");
        let (status, _, bytes) =
            http_request_with("POST", &format!("{base}/v2/sandboxes"), &headers, Some(body)).await;
        assert_eq!(status, 201);
        let created: Value = serde_json::from_slice(&bytes).expect("json");
        let id = created["sandboxID"].as_str().expect("an id").to_owned();
        let token = created["envdAccessToken"].as_str().expect("a token").to_owned();
        sandboxes.push((id, token));
    }
    let stats = app.wasm().warm_stats();
    let (_, python_pool) = stats.iter().find(|(l, _)| *l == python).expect("a Python pool");
    assert!(python_pool.hits >= 1, "the first create took a warm kernel: {python_pool:?}");

    // The kernel works in its sandbox's workspace: what A writes is in A's directory, not B's.
    let ((a, a_token), (b, b_token)) = (&sandboxes[0], &sandboxes[1]);
    let write = "open('/home/user/from-a.txt', 'w').write('hello from a')";
    assert_eq!(cell(&base, a, a_token, write).await, "12");
    let list = "sorted(__import__('os').listdir('/home/user'))";
    assert_eq!(cell(&base, a, a_token, list).await, "['from-a.txt']");
    assert_eq!(cell(&base, b, b_token, list).await, "[]");
    let manager = app.manager().expect("a manager");
    let (sandbox, _) = manager.processes(a).expect("A runs");
    let on_disk = std::fs::read_to_string(sandbox.workspace().join("from-a.txt"));
    assert_eq!(on_disk.expect("in A's workspace on disk"), "hello from a");
    // State persists between cells of the adopted kernel.
    assert_eq!(cell(&base, a, a_token, "x = 6 * 7").await, "");
    assert_eq!(cell(&base, a, a_token, "x").await, "42");

    // A kill removes the sandbox's directory with its kernel; the pool refills.
    let (status, _, _) =
        http_request_with("DELETE", &format!("{base}/sandboxes/{a}"), &headers, None).await;
    assert_eq!(status, 204);
    assert!(!sandbox.workspace().exists(), "A's directory is gone");
    let began = Instant::now();
    while ready(&app) == 0 {
        assert!(began.elapsed() < Duration::from_secs(60), "the pool did not refill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, metrics) =
        http_request_with("GET", &format!("{base}/metrics"), &headers, None).await;
    let metrics = String::from_utf8(metrics).expect("UTF-8");
    assert!(metrics.contains(r#"soulbox_pool_hits_total{tier="wasm",pool="python"}"#), "{metrics}");
}
