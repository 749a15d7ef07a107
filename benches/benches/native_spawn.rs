//! The native tier's spawn latency beside what a user would pick instead, in one run: a plain
//! fork/exec of `/bin/true`, the same under bubblewrap (every namespace, a read-only `/usr`),
//! and SoulBox's native tier, once as a command in a sandbox that is already running and once
//! as a whole new sandbox (start, the command, teardown).
//!
//! Needs root (the native tier maps user ids and manages cgroups); elsewhere it prints why and
//! exits successfully. `cargo bench -p soulbox-benches --bench native_spawn` (set
//! `SOULBOX_BENCH_ITERATIONS` to change the sample count).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use soulbox_benches::{ms, percentile};
use soulbox_native::{
    ExitStatus, NativeConfig, NativeSandbox, NativeTier, ProcessSpec, SandboxRoot,
};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Samples taken when `SOULBOX_BENCH_ITERATIONS` is not set.
const DEFAULT_ITERATIONS: usize = 200;

/// Runs of each row before its samples are taken (page cache, the tier's first sandbox).
const WARMUP_ITERATIONS: usize = 10;

/// Memory limit of every sandbox the bench starts.
const SANDBOX_MEMORY_BYTES: u64 = 256 << 20;

/// A command in a running sandbox may cost at most this much more than a plain fork/exec.
const TARGET_COMMAND_OVERHEAD: Duration = Duration::from_millis(1);

/// A new sandbox with one command and its teardown should take less than this at p50.
const TARGET_NEW_SANDBOX: Duration = Duration::from_millis(5);

/// Samples above this are counted apart: a stall, not the row's usual cost.
const SLOW_SAMPLE: Duration = Duration::from_millis(50);

/// bubblewrap with every namespace unshared and a minimal merged-usr root, as a user of it
/// would write for a short command.
const BWRAP_ARGS: [&str; 20] = [
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
];

fn main() {
    let iterations: usize = std::env::var("SOULBOX_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let state = tempfile::tempdir().expect("tempdir");
    let tier = match NativeTier::new(NativeConfig::new(state.path().join("pooled"))) {
        Ok(tier) => Arc::new(tier),
        Err(e) => {
            println!("SKIPPED: the native tier is unavailable here: {e}");
            return;
        }
    };
    let cold_config =
        NativeConfig { pool_min: 0, pool_max: 0, ..NativeConfig::new(state.path().join("cold")) };
    let cold = Arc::new(NativeTier::new(cold_config).expect("a second tier"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "spawn /bin/true and wait for its exit, {iterations} iterations per row after \
         {WARMUP_ITERATIONS} warm-ups, {} cores, cgroup v{}, load average {load}; ratio is \
         p50 over row 1's p50, `> {}` counts the samples slower than that\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        soulbox_native::cgroup_version(),
        ms_whole(SLOW_SAMPLE),
    );

    let fork_exec = summarize(measure(iterations, plain_fork_exec));
    let bwrap = bwrap_available().map(|()| summarize(measure(iterations, bwrap_true)));
    let command = summarize(runtime.block_on(command_in_running_sandbox(&tier, iterations)));
    let phases = runtime.block_on(new_sandbox(&tier, iterations, true));
    let pooled_sandbox = summarize(phases.iter().map(NewSandboxSample::total).collect());
    let cold_phases = runtime.block_on(new_sandbox(&cold, iterations, false));
    let cold_sandbox = summarize(cold_phases.iter().map(NewSandboxSample::total).collect());

    println!(
        "{:<46} {:>11} {:>11} {:>8} {:>8}   target",
        "",
        "p50",
        "p99",
        "ratio",
        &format!("> {}", ms_whole(SLOW_SAMPLE))
    );
    let row = |name: &str, figures: &Figures, target: &str| {
        let ratio = figures.p50.as_secs_f64() / fork_exec.p50.as_secs_f64();
        println!(
            "{name:<46} {:>11} {:>11} {ratio:>7.1}x {:>8}   {target}",
            ms(figures.p50),
            ms(figures.p99),
            figures.slow
        );
    };
    row("1. plain fork/exec", &fork_exec, "");
    match &bwrap {
        Ok(figures) => row("2. bubblewrap (--unshare-all)", figures, ""),
        Err(reason) => println!("{:<46} SKIPPED: {reason}", "2. bubblewrap (--unshare-all)"),
    }
    let overhead = command.p50.saturating_sub(fork_exec.p50);
    let command_target = format!(
        "p50 within {} of row 1: {} (+{})",
        ms(TARGET_COMMAND_OVERHEAD),
        verdict(overhead <= TARGET_COMMAND_OVERHEAD),
        ms(overhead)
    );
    row("3. SoulBox: command in a running sandbox", &command, &command_target);
    let new_target = format!(
        "p50 under {}: {}",
        ms(TARGET_NEW_SANDBOX),
        verdict(pooled_sandbox.p50 < TARGET_NEW_SANDBOX)
    );
    row("4. SoulBox: new sandbox + command + teardown", &pooled_sandbox, &new_target);
    row("5. ... the same, no pool (prepared on demand)", &cold_sandbox, "");

    for (title, phases) in [("row 4 (from the pool)", &phases), ("row 5 (no pool)", &cold_phases)] {
        println!("\nwhere {title}'s time goes, timed from outside the tier");
        println!(
            "{:<46} {:>11} {:>11} {:>11} {:>8}",
            "",
            "min",
            "p50",
            "p99",
            &format!("> {}", ms_whole(SLOW_SAMPLE))
        );
        let phase = |name: &str, pick: fn(&NewSandboxSample) -> Duration| {
            let figures = summarize(phases.iter().map(pick).collect());
            println!(
                "{name:<46} {:>11} {:>11} {:>11} {:>8}",
                ms(figures.min),
                ms(figures.p50),
                ms(figures.p99),
                figures.slow
            );
        };
        phase("start_sandbox", |s| s.start);
        phase("spawn + wait /bin/true (first command)", |s| s.command);
        phase("destroy (kill init, remove the cgroup)", |s| s.destroy);
    }
}

/// A duration in whole milliseconds, for labels.
fn ms_whole(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// What the tables show of a row's samples.
#[derive(Debug, Clone, Copy)]
struct Figures {
    min: Duration,
    p50: Duration,
    p99: Duration,
    /// How many samples took longer than [`SLOW_SAMPLE`].
    slow: usize,
}

fn summarize(mut samples: Vec<Duration>) -> Figures {
    samples.sort();
    Figures {
        min: samples.first().copied().unwrap_or_default(),
        p50: percentile(&samples, 50),
        p99: percentile(&samples, 99),
        slow: samples.iter().filter(|d| **d > SLOW_SAMPLE).count(),
    }
}

/// Times `run` `iterations` times after the warm-ups.
fn measure(iterations: usize, run: fn()) -> Vec<Duration> {
    for _ in 0..WARMUP_ITERATIONS {
        run();
    }
    (0..iterations)
        .map(|_| {
            let began = Instant::now();
            run();
            began.elapsed()
        })
        .collect()
}

fn plain_fork_exec() {
    let status = Command::new("/bin/true").status().expect("fork/exec /bin/true");
    assert!(status.success(), "/bin/true: {status}");
}

fn bwrap_true() {
    let status = Command::new("bwrap").args(BWRAP_ARGS).arg("/bin/true").status().expect("bwrap");
    assert!(status.success(), "bwrap /bin/true: {status}");
}

/// Whether bubblewrap is installed and can run here; if not, why.
fn bwrap_available() -> Result<(), String> {
    let output = match Command::new("bwrap").args(BWRAP_ARGS).arg("/bin/true").output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("bwrap is not installed".to_owned());
        }
        Err(e) => return Err(format!("running bwrap: {e}")),
    };
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!("bwrap cannot run here ({}): {}", output.status, stderr.trim()))
    }
}

/// Runs `/bin/true` in `sandbox`, reading its output to the end, and waits for its exit.
async fn run_true(sandbox: &NativeSandbox) {
    let spec = ProcessSpec {
        argv: vec!["/bin/true".to_owned()],
        env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        cwd: "/home/user".to_owned(),
        user: soulbox_runtime::SandboxUser::User,
    };
    let mut process = sandbox.spawn(spec).await.expect("spawn /bin/true in the sandbox");
    drop(process.stdin.take());
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (out, err, status) = tokio::join!(
        process.stdout.read_to_end(&mut stdout),
        process.stderr.read_to_end(&mut stderr),
        process.exit.wait(),
    );
    out.expect("stdout");
    err.expect("stderr");
    assert_eq!(status.expect("exit"), ExitStatus::Code(0), "/bin/true in the sandbox");
}

async fn start(tier: &Arc<NativeTier>, workspace: &Path) -> NativeSandbox {
    tier.start_sandbox(&SandboxRoot::Host, workspace, SANDBOX_MEMORY_BYTES)
        .await
        .expect("start a native sandbox")
}

/// Row 3: one sandbox started beforehand; each sample is one command in it.
async fn command_in_running_sandbox(tier: &Arc<NativeTier>, iterations: usize) -> Vec<Duration> {
    let workspace = tempfile::tempdir().expect("workspace");
    let sandbox = start(tier, workspace.path()).await;
    for _ in 0..WARMUP_ITERATIONS {
        run_true(&sandbox).await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let began = Instant::now();
        run_true(&sandbox).await;
        samples.push(began.elapsed());
    }
    sandbox.destroy().await.expect("destroy the sandbox");
    samples
}

/// One sample of row 4, split at the tier's calls.
#[derive(Debug, Clone, Copy)]
struct NewSandboxSample {
    start: Duration,
    command: Duration,
    destroy: Duration,
}

impl NewSandboxSample {
    fn total(&self) -> Duration {
        self.start + self.command + self.destroy
    }
}

/// Rows 4 and 5: each sample starts a sandbox, runs one command in it and destroys it. The
/// workspace directory is made before the clock starts (a caller's workspace already exists);
/// with `from_pool`, the pool is also left to refill between samples, as between the requests
/// of a server that is not saturated.
async fn new_sandbox(
    tier: &Arc<NativeTier>,
    iterations: usize,
    from_pool: bool,
) -> Vec<NewSandboxSample> {
    let mut samples = Vec::with_capacity(iterations);
    for index in 0..WARMUP_ITERATIONS + iterations {
        let workspace = tempfile::tempdir().expect("workspace");
        if from_pool {
            wait_for_the_pool(tier).await;
        }
        let began = Instant::now();
        let sandbox = start(tier, workspace.path()).await;
        let started = Instant::now();
        run_true(&sandbox).await;
        let ran = Instant::now();
        sandbox.destroy().await.expect("destroy the sandbox");
        let destroyed = Instant::now();
        if index >= WARMUP_ITERATIONS {
            samples.push(NewSandboxSample {
                start: started - began,
                command: ran - started,
                destroy: destroyed - ran,
            });
        }
    }
    samples
}

/// Waits until the tier's pool has a prepared sandbox again.
async fn wait_for_the_pool(tier: &NativeTier) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tier.pooled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
