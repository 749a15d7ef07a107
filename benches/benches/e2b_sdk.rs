//! The official E2B Python SDK against `soulbox serve` on loopback: per template, a new
//! sandbox to its first command's result, and a new sandbox to `run_code('1+1')`'s result,
//! p50 and p99, with E2B's and Daytona's published medians for the same flow beside them.
//! The templates are SoulBox's own and one built from a Dockerfile for the run
//! ([`BUILT_TEMPLATE`]: its own layers, start command, ready check and pool).
//!
//! The timing is done by `benches/sdk/e2b_flow.py` with the real SDK (from the virtualenv
//! `.ci/run` makes in `target/e2b-venv`, or `SOULBOX_E2B_PYTHON`); without it, or without root
//! for the native tier, this prints why and exits successfully.
//! `cargo bench -p soulbox-benches --bench e2b_sdk` (`SOULBOX_BENCH_ITERATIONS` samples a row).

use std::path::PathBuf;

use serde_json::Value;

/// E2B's measured median for create + first command, including the network (seconds).
const E2B_MEDIAN_MS: f64 = 440.0;
/// Daytona's, likewise.
const DAYTONA_MEDIAN_MS: f64 = 110.0;
/// The targets at p50: a WASM template, and the native `base`.
const TARGET_WASM_MS: f64 = 20.0;
const TARGET_NATIVE_MS: f64 = 50.0;

fn sdk_python() -> Option<PathBuf> {
    let python = std::env::var_os("SOULBOX_E2B_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2b-venv/bin/python")
    });
    let probe = std::process::Command::new(&python)
        .args(["-c", "import e2b, e2b_code_interpreter"])
        .output();
    probe.is_ok_and(|out| out.status.success()).then_some(python)
}

/// The template built for the run, and its Dockerfile.
const BUILT_TEMPLATE: &str = "built-app";
const BUILT_DOCKERFILE: &str = "FROM base\n\
    RUN mkdir -p /opt/app && echo 'print(\"app\")' > /opt/app/main.py\n\
    ENV APP_HOME=/opt/app\n\
    WORKDIR /home/user\n\
    CMD [\"sleep\", \"infinity\"]\n\
    HEALTHCHECK CMD [\"test\", \"-d\", \"/opt/app\"]\n";

/// The target of a row: commands in `base`, `code-interpreter-v1` and built templates run
/// natively.
fn target_ms(flow: &str, template: &str) -> f64 {
    let native = flow.contains("command")
        && matches!(template, "base" | "code-interpreter-v1" | BUILT_TEMPLATE);
    if native { TARGET_NATIVE_MS } else { TARGET_WASM_MS }
}

fn main() {
    let Some(python) = sdk_python() else {
        println!(
            "SKIPPED: no Python with the e2b and e2b-code-interpreter packages (.ci/run installs them into target/e2b-venv)"
        );
        return;
    };
    if soulbox_tests::native_backend().is_none() {
        println!("SKIPPED: the native tier is unavailable here (it needs root)");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let (base, _data) = runtime.block_on(soulbox_tests::serve_with_manager());
    let context = tempfile::tempdir().expect("a build context");
    std::fs::write(context.path().join("Dockerfile"), BUILT_DOCKERFILE).expect("Dockerfile");
    let query = format!("name={BUILT_TEMPLATE}");
    let (status, events) =
        runtime.block_on(soulbox_tests::build_template(&base, context.path(), &query));
    let done = events.last().is_some_and(|event| event["type"] == "done");
    assert!(status == 200 && done, "building {BUILT_TEMPLATE}: {events:?}");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/e2b_flow.py");
    let output = std::process::Command::new(python)
        .arg(&script)
        .env("E2B_API_URL", &base)
        .env("E2B_SANDBOX_URL", &base)
        .env("E2B_API_KEY", soulbox_tests::TEST_API_KEY)
        .env("SOULBOX_BENCH_BUILT_TEMPLATE", BUILT_TEMPLATE)
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{}:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("The E2B SDK on loopback, a new sandbox each sample (the kill is not timed)");
    println!(
        "{:<26} {:<20} {:>9} {:>9} {:>8} {:>10} {:>12}",
        "flow", "template", "p50", "p99", "target", "vs E2B", "vs Daytona"
    );
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON row");
        let flow = row["flow"].as_str().unwrap_or_default();
        let template = row["template"].as_str().unwrap_or_default();
        let p50 = row["p50_ms"].as_f64().unwrap_or_default();
        let p99 = row["p99_ms"].as_f64().unwrap_or_default();
        let target = target_ms(flow, template);
        let verdict = if p50 < target { "met" } else { "MISSED" };
        println!(
            "{flow:<26} {template:<20} {p50:>6.1} ms {p99:>6.1} ms {:>5} {verdict:<6} {:>6.0}x {:>10.0}x",
            format!("<{target:.0}"),
            E2B_MEDIAN_MS / p50,
            DAYTONA_MEDIAN_MS / p50,
        );
    }
}
