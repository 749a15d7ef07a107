//! WASM worker processes (`wasm-langs/src/worker.rs`): kernels of a server run in child
//! processes, keep their state between cells there, and a worker that dies, idle or mid-cell,
//! costs only its own kernels: their next cell says so, the one after gets a new kernel in a
//! new worker, and no cell waits for a dead one.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soulbox_tests::{TEST_API_KEY, execute_cell, http_request_with, serve_app, wasm_workers};

/// A sandbox of `template`: its id and access token.
async fn create(base: &str, template: &str) -> (String, String) {
    let headers = [("x-api-key", TEST_API_KEY), ("content-type", "application/json")];
    let body = serde_json::to_vec(&json!({"templateID": template})).expect("json");
    let (status, _, bytes) =
        http_request_with("POST", &format!("{base}/v2/sandboxes"), &headers, Some(body)).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&bytes));
    let created: Value = serde_json::from_slice(&bytes).expect("json");
    let id = created["sandboxID"].as_str().expect("an id").to_owned();
    let token = created["envdAccessToken"].as_str().expect("a token").to_owned();
    (id, token)
}

fn result_text(events: &[Value]) -> Option<&str> {
    events.iter().find(|e| e["type"] == "result").and_then(|e| e["text"].as_str())
}

fn error_text(events: &[Value]) -> String {
    events.iter().filter(|e| e["type"] == "error").map(Value::to_string).collect()
}

fn kill(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the worker");
}

/// Whether the test servers run kernels in workers; prints why not when they do not.
fn workers_on() -> bool {
    if wasm_workers().is_none() {
        eprintln!("SKIPPED: test servers run WASM kernels on their own threads (see above)");
        return false;
    }
    true
}

#[tokio::test]
async fn kernels_live_in_workers_and_a_dead_worker_costs_only_its_kernels() {
    if !workers_on() {
        return;
    }
    let (base, _data, app) = serve_app().await;
    let (id, token) = create(&base, "code-interpreter-v1").await;
    let events = execute_cell(&base, &id, &token, "x = 41\nprint('hello from', 'a worker')").await;
    let stdout: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(stdout, "hello from a worker\n", "{events:?}");
    assert_eq!(result_text(&execute_cell(&base, &id, &token, "x + 1").await), Some("42"));

    // The kernel is in a child process, not in this one.
    let workers = app.wasm().worker_pids();
    assert_eq!(workers.len(), 2, "two workers run: {workers:?}");
    let own = std::process::id();
    for pid in &workers {
        assert_ne!(*pid, own);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim);
        assert_eq!(ppid, Some(own.to_string().as_str()), "a child of the server");
    }
    // A second sandbox's JavaScript kernel runs beside it.
    let (js, js_token) = create(&base, "javascript").await;
    assert_eq!(result_text(&execute_cell(&base, &js, &js_token, "6 * 7").await), Some("42"));

    // Both workers die between cells: the Python kernel's state is gone, and its next cell
    // says so instead of running somewhere without it.
    for pid in &workers {
        kill(*pid);
    }
    let began = Instant::now();
    while app.wasm().worker_pids().iter().any(|pid| workers.contains(pid)) {
        assert!(began.elapsed() < Duration::from_secs(10), "the dead workers are noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = execute_cell(&base, &id, &token, "x + 1").await;
    let error = error_text(&lost);
    assert!(error.contains("worker"), "the next cell reports the lost kernel: {lost:?}");
    // The one after starts a new kernel, in a new worker, from the image: `x` is gone.
    let fresh = execute_cell(&base, &id, &token, "'x' in globals(), 6 * 7").await;
    assert_eq!(result_text(&fresh), Some("(False, 42)"), "{fresh:?}");
    let replaced = app.wasm().worker_pids();
    assert_eq!(replaced.len(), 2, "the workers were replaced: {replaced:?}");
    assert!(replaced.iter().all(|pid| !workers.contains(pid)));
    // So did the JavaScript kernel, in the other worker.
    let lost = execute_cell(&base, &js, &js_token, "1 + 1").await;
    assert!(error_text(&lost).contains("worker"), "{lost:?}");
    assert_eq!(result_text(&execute_cell(&base, &js, &js_token, "1 + 1").await), Some("2"));
}

#[tokio::test]
async fn a_worker_killed_mid_cell_ends_the_cell_at_once() {
    if !workers_on() {
        return;
    }
    let (base, _data, app) = serve_app().await;
    let (id, token) = create(&base, "code-interpreter-v1").await;
    assert_eq!(result_text(&execute_cell(&base, &id, &token, "1").await), Some("1"));
    let before = app.wasm().worker_pids();
    let spinning = {
        let (base, id, token) = (base.clone(), id.clone(), token.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let events = execute_cell(&base, &id, &token, "while True: pass").await;
            (events, began.elapsed())
        })
    };
    // Once the cell spins, every worker dies (the spinning one among them).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pid in &before {
        kill(*pid);
    }
    let (events, took) = spinning.await.expect("the cell's request");
    assert!(took < Duration::from_secs(10), "the cell ended when its worker died: {took:?}");
    let error = error_text(&events);
    assert!(error.contains("worker"), "{events:?}");
    assert_eq!(result_text(&execute_cell(&base, &id, &token, "2 + 2").await), Some("4"));
}

/// `POST /v1/run` of a Python cell under `limits`: the answer.
async fn run(base: &str, code: &str, limits: Value) -> Value {
    let body = serde_json::to_vec(&json!({"language": "python", "code": code, "limits": limits}));
    let (status, _, answer) =
        soulbox_tests::http_request("POST", &format!("{base}/v1/run"), Some(body.expect("json")))
            .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    serde_json::from_slice(&answer).expect("json")
}

#[tokio::test]
async fn every_limit_holds_and_is_enforced_in_a_worker() {
    if !workers_on() {
        return;
    }
    let (base, _data, app) = serve_app().await;
    // Output: 3 MiB through the worker's socket, whole, under an 8 MiB cap; cut at a 1 MiB one.
    let big = "print('x' * (3 << 20))";
    let held = run(&base, big, json!({"stdout_bytes": 8 << 20})).await;
    assert_eq!(
        held["termination"],
        json!({"kind": "exited", "code": 0}),
        "{}",
        held["termination"]
    );
    let stdout = held["stdout"].as_str().expect("stdout");
    assert!(stdout.len() == (3 << 20) + 1 && stdout.bytes().all(|b| b == b'x' || b == b'\n'));
    let cut = run(&base, big, json!({"stdout_bytes": 1 << 20})).await;
    assert_eq!(cut["termination"]["kind"], "output_limit_exceeded", "{}", cut["termination"]);
    // Memory: 200 MiB fits in 512 MiB, not in 128 MiB.
    let grow = "b = bytearray(200 << 20)\nlen(b)";
    let fits = run(&base, grow, json!({"memory_bytes": 512u64 << 20})).await;
    assert_eq!(fits["results"][0]["data"]["text/plain"], "209715200", "{fits}");
    let over = run(&base, grow, json!({"memory_bytes": 128u64 << 20})).await;
    assert_eq!(over["termination"]["kind"], "memory_exceeded", "{}", over["termination"]);
    // Time: a spinning cell is stopped at its limit, by the worker.
    let spin = run(&base, "while True: pass", json!({"timeout_ms": 300})).await;
    assert_eq!(spin["termination"], json!({"kind": "timed_out", "limit_ms": 300}));
    // And the worker goes on serving.
    let after = run(&base, "6 * 7", json!({})).await;
    assert_eq!(after["results"][0]["data"]["text/plain"], "42", "{after}");
    assert_eq!(app.wasm().worker_pids().len(), 2, "the two workers served all of it");
}
