//! Every limit, obeyed and violated.

use std::time::{Duration, Instant};

use soulbox_runtime::{ExecRequest, Language, Limits, OutputStream, Termination};
use soulbox_tests::{run, sandbox};

fn cell(language: &str, code: &str, limits: Limits) -> ExecRequest {
    ExecRequest::cell(Language::parse(language), code).with_limits(limits)
}

const LOOPS: [(&str, &str); 3] =
    [("python", "while True:\n    pass"), ("javascript", "for (;;) {}"), ("ruby", "loop {}")];

#[tokio::test]
async fn timeout_violated_stops_within_the_limit_plus_100ms() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { wall_timeout: Duration::from_millis(300), ..Limits::default() };
    for (language, code) in LOOPS {
        let began = Instant::now();
        let output = run(&dispatcher, &sandbox, cell(language, code, limits)).await;
        let took = began.elapsed();
        assert_eq!(output.termination, Some(Termination::TimedOut { limit_ms: 300 }), "{language}");
        assert_eq!(output.exit_code, Some(124));
        assert!(took < Duration::from_millis(400), "{language}: stopped after {took:?}");
        // A fresh kernel takes over after the timeout.
        let output = run(&dispatcher, &sandbox, cell(language, "1 + 1", Limits::default())).await;
        assert_eq!(output.results[0].data["text/plain"], "2", "{language}: {output:?}");
    }
}

#[tokio::test]
async fn timeout_obeyed_by_a_short_sleep() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { wall_timeout: Duration::from_secs(5), ..Limits::default() };
    let output =
        run(&dispatcher, &sandbox, cell("python", "import time\ntime.sleep(0.2)\n'done'", limits))
            .await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert_eq!(output.results[0].data["text/plain"], "'done'");
}

#[tokio::test]
async fn timeout_violated_while_sleeping_in_a_host_call() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { wall_timeout: Duration::from_millis(200), ..Limits::default() };
    let began = Instant::now();
    let output =
        run(&dispatcher, &sandbox, cell("python", "import time\ntime.sleep(30)", limits)).await;
    assert_eq!(output.termination, Some(Termination::TimedOut { limit_ms: 200 }));
    assert!(began.elapsed() < Duration::from_millis(300), "{:?}", began.elapsed());
}

const MEMORY_BOMBS: [(&str, &str); 3] = [
    ("python", "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))"),
    ("javascript", "const blocks = []; for (;;) blocks.push(new ArrayBuffer(16 << 20))"),
    ("ruby", "blocks = []\nloop { blocks << ('x' * (16 << 20)) }"),
];

#[tokio::test]
async fn memory_violated_by_a_bomb_in_each_language() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    // A neighbour with state of its own, which the bombs must not disturb.
    let (_, neighbour, _other) = soulbox_tests::sandbox().await;
    let keep = cell("python", "kept = 'still here'", Limits::default());
    run(&dispatcher, &neighbour, keep).await;
    let limits = Limits { memory_bytes: 256 << 20, ..Limits::default() };
    for (language, code) in MEMORY_BOMBS {
        let output = run(&dispatcher, &sandbox, cell(language, code, limits)).await;
        assert_eq!(
            output.termination,
            Some(Termination::MemoryExceeded { limit_bytes: 256 << 20 }),
            "{language}: {output:?}"
        );
        assert_eq!(output.exit_code, Some(137));
        // The host and the sandbox go on: a fresh kernel answers.
        let output = run(&dispatcher, &sandbox, cell(language, "2 + 2", Limits::default())).await;
        assert_eq!(output.results[0].data["text/plain"], "4", "{language}: {output:?}");
    }
    let output = run(&dispatcher, &neighbour, cell("python", "kept", Limits::default())).await;
    assert_eq!(
        output.results[0].data["text/plain"], "'still here'",
        "the neighbour kept its state"
    );
}

#[tokio::test]
async fn memory_obeyed_by_a_large_allocation_under_the_limit() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { memory_bytes: 512 << 20, ..Limits::default() };
    let output =
        run(&dispatcher, &sandbox, cell("python", "b = bytearray(100 << 20)\nlen(b)", limits))
            .await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert_eq!(output.results[0].data["text/plain"], (100 << 20).to_string());
}

#[tokio::test]
async fn memory_limit_below_the_image_is_memory_exceeded_at_start() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { memory_bytes: 8 << 20, ..Limits::default() };
    let output = run(&dispatcher, &sandbox, cell("python", "1", limits)).await;
    assert_eq!(output.termination, Some(Termination::MemoryExceeded { limit_bytes: 8 << 20 }));
}

#[tokio::test]
async fn output_violated_is_cut_at_the_cap_with_a_marker() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { stdout_bytes: 10_000, ..Limits::default() };
    for (language, code) in [
        ("python", "while True:\n    print('x' * 100)"),
        ("javascript", "for (;;) console.log('x'.repeat(100))"),
        ("ruby", "loop { puts 'x' * 100 }"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, code, limits)).await;
        assert_eq!(
            output.termination,
            Some(Termination::OutputLimitExceeded {
                stream: OutputStream::Stdout,
                limit_bytes: 10_000
            }),
            "{language}"
        );
        let marker = "\n[soulbox: stdout truncated at 10000 bytes]\n";
        assert!(
            output.stdout.ends_with(marker),
            "{language}: {:?}",
            &output.stdout[output.stdout.len() - 80..]
        );
        assert_eq!(output.stdout.len(), 10_000 + marker.len(), "{language}");
    }
}

#[tokio::test]
async fn output_obeyed_just_under_the_cap() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { stdout_bytes: 10_000, stderr_bytes: 100, ..Limits::default() };
    let output = run(&dispatcher, &sandbox, cell("python", "print('x' * 9998)", limits)).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }));
    assert_eq!(output.stdout.len(), 9999);
}

#[tokio::test]
async fn stderr_violated_is_cut_too() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits = Limits { stderr_bytes: 1000, ..Limits::default() };
    let code = "import sys\nwhile True:\n    sys.stderr.write('e' * 100 + '\\n')";
    let output = run(&dispatcher, &sandbox, cell("python", code, limits)).await;
    assert_eq!(
        output.termination,
        Some(Termination::OutputLimitExceeded { stream: OutputStream::Stderr, limit_bytes: 1000 })
    );
    assert!(output.stderr.contains("[soulbox: stderr truncated at 1000 bytes]"));
}

#[tokio::test]
async fn limits_above_their_maximum_are_refused_before_running() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let limits =
        Limits { memory_bytes: soulbox_runtime::MAX_MEMORY_BYTES + 1, ..Limits::default() };
    let error =
        dispatcher.start(sandbox.clone(), cell("python", "1", limits)).expect_err("refused");
    assert!(error.to_string().contains("memory_bytes"), "{error}");
}

#[tokio::test]
async fn code_above_the_maximum_is_refused() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let code = "#".repeat(soulbox_runtime::MAX_CODE_BYTES + 1);
    let error = dispatcher
        .start(sandbox.clone(), cell("python", &code, Limits::default()))
        .expect_err("refused");
    assert!(matches!(error, soulbox_runtime::DispatchError::CodeTooLarge { .. }), "{error}");
}
