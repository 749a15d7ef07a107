//! Fresh sandbox plus a trivial cell, per language, from the pre-initialised image; compared in
//! the same run with the same cell without pre-initialisation (the interpreter as shipped,
//! through the same engine) and with the native interpreters where installed.
//!
//! `cargo bench -p soulbox-benches` (set `SOULBOX_BENCH_ITERATIONS` to change the sample count).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soulbox_benches::{ms, percentile, resident_bytes};
use soulbox_runtime::{Dispatcher, ExecRequest, Language, Sandbox, SandboxSpec};

const CASES: [(&str, &str, &str); 3] =
    [("python", "1 + 1", "python3"), ("javascript", "1 + 1", "node"), ("ruby", "1 + 1", "ruby")];

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    runtime.block_on(bench());
}

/// One fresh sandbox with one cell: returns the time from nothing to the cell's end (what a
/// caller waits for) and the dispatcher's split (kernel start-up, cell run). Tearing the
/// sandbox down happens after the answer and is left out here (the throughput run includes it).
async fn fresh_cell(
    dispatcher: &Dispatcher,
    root: &std::path::Path,
    language: &Language,
    code: &str,
) -> (Duration, Duration, Duration) {
    let began = Instant::now();
    let sandbox = Arc::new(Sandbox::create(root, SandboxSpec::default()).expect("sandbox"));
    let output = dispatcher
        .start(sandbox.clone(), ExecRequest::cell(language.clone(), code))
        .expect("dispatch")
        .collect()
        .await;
    let took = began.elapsed();
    assert_eq!(output.results[0].data["text/plain"], "2", "{output:?}");
    dispatcher.close(&sandbox).await;
    sandbox.remove_files().expect("cleanup");
    let timings = output.timings;
    (took, Duration::from_micros(timings.startup_us), Duration::from_micros(timings.run_us))
}

/// The real path of a program (`python3` is often a shim script that adds its own start-up).
fn resolve(program: &str) -> Option<String> {
    if program == "python3" {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .ok()?;
        return Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    Some(program.to_owned())
}

/// The p50 of a trivial cell in a kernel that has already run one (the stateful-kernel case).
async fn warm_cell(
    dispatcher: &Dispatcher,
    root: &std::path::Path,
    language: &Language,
    iterations: usize,
) -> Duration {
    let sandbox = Arc::new(Sandbox::create(root, SandboxSpec::default()).expect("sandbox"));
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..=iterations {
        let began = Instant::now();
        let output = dispatcher
            .start(sandbox.clone(), ExecRequest::cell(language.clone(), "1 + 1"))
            .expect("dispatch")
            .collect()
            .await;
        samples.push(began.elapsed());
        assert_eq!(output.results[0].data["text/plain"], "2", "{output:?}");
    }
    dispatcher.close(&sandbox).await;
    sandbox.remove_files().expect("cleanup");
    samples.remove(0);
    samples.sort();
    percentile(&samples, 50)
}

fn native(program: &str, language: &str) -> Option<Duration> {
    let program = resolve(program)?;
    let args: &[&str] = match language {
        "python" => &["-c", "1 + 1"],
        "javascript" => &["-e", "1 + 1"],
        _ => &["-e", "1 + 1"],
    };
    let mut samples = Vec::new();
    for _ in 0..20 {
        let began = Instant::now();
        let status = Command::new(&program).args(args).status().ok()?;
        if !status.success() {
            return None;
        }
        samples.push(began.elapsed());
    }
    samples.sort();
    Some(percentile(&samples, 50))
}

async fn bench() {
    let iterations: usize =
        std::env::var("SOULBOX_BENCH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let backend = soulbox_tests::wasm_backend().await;
    let dispatcher = Dispatcher::new().with_backend(backend.clone());
    let root = tempfile::tempdir().expect("tempdir");
    println!(
        "fresh sandbox + trivial cell, {iterations} iterations per language, 2-core machine\n"
    );
    println!(
        "{:<11} {:>11} {:>11} {:>14} {:>9} {:>14} {:>9}",
        "language", "p50", "p99", "no pre-init", "ratio", "native", "ratio"
    );
    let mut splits = Vec::new();
    for (name, code, program) in CASES {
        let language = Language::parse(name);
        for _ in 0..10 {
            fresh_cell(&dispatcher, root.path(), &language, code).await;
        }
        let mut samples = Vec::with_capacity(iterations);
        let mut startups = Vec::with_capacity(iterations);
        let mut runs = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let (took, startup, run) = fresh_cell(&dispatcher, root.path(), &language, code).await;
            samples.push(took);
            startups.push(startup);
            runs.push(run);
        }
        samples.sort();
        startups.sort();
        runs.sort();
        splits.push((name, percentile(&startups, 50), percentile(&runs, 50)));
        let p50 = percentile(&samples, 50);
        let p99 = percentile(&samples, 99);
        // The first call compiles the shipped module once (cached on disk afterwards).
        backend.run_without_preinit(&language, code).await.expect("cold run");
        let mut cold = Vec::new();
        for _ in 0..5 {
            let began = Instant::now();
            backend.run_without_preinit(&language, code).await.expect("cold run");
            cold.push(began.elapsed());
        }
        cold.sort();
        let cold = percentile(&cold, 50);
        let ratio = |other: Duration| format!("{:.1}x", other.as_secs_f64() / p50.as_secs_f64());
        let (native_p50, native_ratio) = match native(program, name) {
            Some(d) => (ms(d), ratio(d)),
            None => (format!("({program} n/a)"), "-".to_owned()),
        };
        println!(
            "{:<11} {:>11} {:>11} {:>14} {:>9} {:>14} {:>9}",
            name,
            ms(p50),
            ms(p99),
            ms(cold),
            ratio(cold),
            native_p50,
            native_ratio
        );
    }

    println!(
        "\nwhere the time goes (p50): kernel start-up from the image, its first cell, a later cell"
    );
    for (name, startup, run) in splits {
        let warm = warm_cell(&dispatcher, root.path(), &Language::parse(name), iterations).await;
        println!(
            "{name:<11} start-up {:>11}   first cell {:>11}   later cell {:>11}",
            ms(startup),
            ms(run),
            ms(warm)
        );
    }

    println!("\nthroughput: fresh sandbox + cell, 2 concurrent clients, 5 s per language");
    for (name, code, _) in CASES {
        let language = Language::parse(name);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut clients = Vec::new();
        for _ in 0..2 {
            let dispatcher = dispatcher.clone();
            let language = language.clone();
            let root = root.path().to_owned();
            clients.push(tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    fresh_cell(&dispatcher, &root, &language, code).await;
                    done += 1;
                }
                done
            }));
        }
        let mut total = 0;
        for client in clients {
            total += client.await.expect("client");
        }
        println!("{name:<11} {:>10.0} executions/s", total as f64 / 5.0);
    }

    println!("\nresident memory per idle kernel (20 kernels kept alive)");
    for (name, code, _) in CASES {
        let language = Language::parse(name);
        let before = resident_bytes();
        let mut kept = Vec::new();
        for _ in 0..20 {
            let sandbox =
                Arc::new(Sandbox::create(root.path(), SandboxSpec::default()).expect("sandbox"));
            dispatcher
                .start(sandbox.clone(), ExecRequest::cell(language.clone(), code))
                .expect("dispatch")
                .collect()
                .await;
            kept.push(sandbox);
        }
        let per_kernel = resident_bytes().saturating_sub(before) / 20;
        println!("{name:<11} {:>8.1} MiB", per_kernel as f64 / f64::from(1 << 20));
        for sandbox in kept {
            dispatcher.close(&sandbox).await;
        }
    }
}
