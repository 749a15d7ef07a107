//! The native tier end to end: commands and toolchains in a namespace, cgroup and seccomp
//! sandbox, on the same workspace as the WASM tier; its limits obeyed and violated; nothing
//! left behind.

use std::time::{Duration, Instant};

use soulbox_runtime::{
    ExecRequest, Language, Limits, OutputStream, Termination, Tier, TierPreference,
};
use soulbox_tests::{command, native_backend, native_sandbox, run, shell};

fn limits(timeout: Duration, memory_bytes: u64) -> Limits {
    Limits { wall_timeout: timeout, memory_bytes, ..Limits::default() }
}

#[tokio::test]
async fn a_command_runs_as_the_sandbox_user_in_its_namespaces() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let output = run(&dispatcher, &sandbox, shell("id; hostname; echo $$; pwd; ls /")).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert_eq!(output.tier, Tier::Native);
    let stdout = output.stdout;
    assert!(stdout.starts_with("uid=1000(user) gid=1000(user) groups=1000(user)\n"), "{stdout}");
    assert!(stdout.contains("\nsandbox\n"), "{stdout}");
    assert!(stdout.contains("\n/home/user\n"), "{stdout}");
    // The new root holds only what the template gives.
    let root: Vec<&str> = stdout.lines().skip(4).collect();
    // (`root` is the sandbox root's own empty home.)
    for entry in ["bin", "dev", "etc", "home", "proc", "root", "tmp", "usr", "var"] {
        assert!(root.contains(&entry), "/ lacks {entry}: {root:?}");
    }
    for absent in ["sys", "work", "boot"] {
        assert!(!root.contains(&absent), "/ has {absent}: {root:?}");
    }
}

#[tokio::test]
async fn every_toolchain_compiles_and_runs_its_hello() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = native_backend().expect("the native tier is available");
    let installed: Vec<Language> = soulbox_runtime::Backend::languages(&*native)
        .into_iter()
        .filter(|l| l.status == soulbox_runtime::LanguageStatus::Ready)
        .map(|l| l.language)
        .collect();
    let programs = [
        ("bash", "echo hello from $0 | sed 's/from .*/from bash/'"),
        ("sh", "echo hello from sh"),
        ("python-native", "import sys; print('hello from python', sys.version_info[0])"),
        ("node", "console.log('hello from node', typeof process.versions.node)"),
        ("c", "#include <stdio.h>\nint main(void) { printf(\"hello from c\\n\"); return 0; }"),
        (
            "cpp",
            "#include <iostream>\nint main() { std::cout << \"hello from cpp\" << std::endl; }",
        ),
        ("rust", "fn main() { println!(\"hello from rust\"); }"),
        ("go", "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello from go\") }"),
        (
            "java",
            "public class Main { public static void main(String[] a) { System.out.println(\"hello from java\"); } }",
        ),
    ];
    for (language, code) in programs {
        let language = Language::parse(language);
        if !installed.contains(&language) {
            eprintln!("SKIPPED: {language} is not installed on this host (.ci/run installs it)");
            continue;
        }
        let request = ExecRequest::cell(language.clone(), code)
            .with_limits(limits(Duration::from_secs(120), 2 << 30));
        let output = run(&dispatcher, &sandbox, request).await;
        assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
        assert_eq!(output.tier, Tier::Native, "{language}");
        let expected = format!("hello from {}", language.as_str().trim_end_matches("-native"));
        assert!(output.stdout.starts_with(&expected), "{output:?}");
    }
}

#[tokio::test]
async fn a_compile_error_comes_back_as_an_error_with_the_compilers_output() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let request = ExecRequest::cell(Language::parse("c"), "int main(void) { return nope; }");
    let output = run(&dispatcher, &sandbox, request).await;
    let error = output.error.expect("a compile error");
    assert_eq!(error.name, "CompileError");
    assert!(error.traceback.contains("nope"), "{error:?}");
    assert!(error.traceback.contains("undeclared"), "{error:?}");
    assert_eq!(output.termination, Some(Termination::Exited { code: 1 }));
}

#[tokio::test]
async fn a_missing_command_exits_127_with_a_message() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let output = run(&dispatcher, &sandbox, command(&["no-such-program", "x"])).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 127 }), "{output:?}");
    assert_eq!(output.stderr, "soulbox: no-such-program: command not found\n");
}

#[tokio::test]
async fn wasm_and_native_share_the_workspace() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let python = Language::parse("python");
    let write = "open('/home/user/hello.c', 'w').write('#include <stdio.h>\\nint main(void) { puts(\"built natively\"); return 0; }\\n')";
    let output = run(&dispatcher, &sandbox, ExecRequest::cell(python.clone(), write)).await;
    assert_eq!(output.tier, Tier::Wasm, "{output:?}");
    let build = shell(
        "gcc -o hello hello.c && ./hello && ls -l hello.c | cut -d' ' -f3 && echo made-by-native > back.txt",
    );
    let output = run(&dispatcher, &sandbox, build).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    // Files the server wrote belong to the sandbox user inside.
    assert_eq!(output.stdout, "built natively\nuser\n");
    let read = "open('/home/user/back.txt').read().strip()";
    let output = run(&dispatcher, &sandbox, ExecRequest::cell(python, read)).await;
    assert_eq!(output.results[0].data["text/plain"], "'made-by-native'", "{output:?}");
}

#[tokio::test]
async fn the_tier_can_be_forced_and_is_reported() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let mut request = shell("echo hi");
    request.tier = TierPreference::Wasm;
    assert!(dispatcher.start(sandbox.clone(), request).is_err(), "commands never run in WASM");
    let mut request = ExecRequest::cell(Language::parse("python"), "1 + 1");
    request.tier = TierPreference::Native;
    let refused = dispatcher.start(sandbox.clone(), request).expect_err("no native `python`");
    assert!(refused.to_string().contains("python"), "{refused}");
    let output = run(&dispatcher, &sandbox, shell("echo hi")).await;
    assert_eq!(output.tier, Tier::Native);
}

#[tokio::test]
async fn processes_files_and_background_jobs_persist_between_executions() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let started =
        run(&dispatcher, &sandbox, shell("sleep 60 > /dev/null 2>&1 & echo ok > /tmp/state")).await;
    assert_eq!(started.termination, Some(Termination::Exited { code: 0 }), "{started:?}");
    let output = run(&dispatcher, &sandbox, shell("cat /tmp/state; ps -eo pid,comm")).await;
    assert!(output.stdout.starts_with("ok\n"), "{output:?}");
    assert!(output.stdout.contains(" sleep"), "{output:?}");
    // PID 1 is init; every process belongs to this sandbox.
    assert!(output.stdout.contains("    1 soulbox-init"), "{output:?}");
}

#[tokio::test]
async fn timeout_obeyed() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let request =
        shell("sleep 0.2; echo done").with_limits(limits(Duration::from_secs(10), 256 << 20));
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }));
    assert_eq!(output.stdout, "done\n");
}

#[tokio::test]
async fn timeout_violated_even_when_sigterm_is_ignored() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let limit = Duration::from_millis(500);
    let request =
        shell("trap '' TERM; while true; do :; done").with_limits(limits(limit, 256 << 20));
    let began = Instant::now();
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(output.termination, Some(Termination::TimedOut { limit_ms: 500 }), "{output:?}");
    assert_eq!(output.exit_code, Some(124));
    assert!(began.elapsed() < limit + Duration::from_millis(500), "{:?}", began.elapsed());
    let after = run(&dispatcher, &sandbox, shell("echo alive")).await;
    assert_eq!(after.stdout, "alive\n", "the sandbox outlives a timed-out command");
}

#[tokio::test]
async fn memory_limit_obeyed() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let code = "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); print(len(b))";
    let request =
        command(&["python3", "-c", code]).with_limits(limits(Duration::from_secs(30), 256 << 20));
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert_eq!(output.stdout, format!("{}\n", 64 << 20));
}

#[tokio::test]
async fn memory_limit_violated() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let code = "chunks = []\nwhile True:\n    b = bytearray(16 << 20); b[::4096] = b'x' * len(b[::4096]); chunks.append(b)";
    let request =
        command(&["python3", "-c", code]).with_limits(limits(Duration::from_secs(30), 128 << 20));
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(
        output.termination,
        Some(Termination::MemoryExceeded { limit_bytes: 128 << 20 }),
        "{output:?}"
    );
    assert_eq!(output.exit_code, Some(137));
    let after = run(&dispatcher, &sandbox, shell("echo alive")).await;
    assert_eq!(after.stdout, "alive\n", "the sandbox outlives an OOM kill");
}

#[tokio::test]
async fn output_limit_obeyed() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let request = shell("head -c 1000 /dev/zero | tr '\\0' x");
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }));
    assert_eq!(output.stdout, "x".repeat(1000));
}

#[tokio::test]
async fn output_limit_violated() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let request = shell("yes").with_limits(Limits { stdout_bytes: 100_000, ..Limits::default() });
    let output = run(&dispatcher, &sandbox, request).await;
    assert_eq!(
        output.termination,
        Some(Termination::OutputLimitExceeded {
            stream: OutputStream::Stdout,
            limit_bytes: 100_000
        }),
    );
    assert!(output.stdout.ends_with("\n[soulbox: stdout truncated at 100000 bytes]\n"));
    assert_eq!(
        output.stdout.len(),
        100_000 + "\n[soulbox: stdout truncated at 100000 bytes]\n".len()
    );
}

#[tokio::test]
async fn process_limit_stops_a_fork_bomb() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let bomb = shell("bomb() { bomb | bomb & }; bomb; sleep 2; echo survived")
        .with_limits(limits(Duration::from_secs(5), 512 << 20));
    let began = Instant::now();
    let output = run(&dispatcher, &sandbox, bomb).await;
    assert!(began.elapsed() < Duration::from_secs(7), "{:?}", began.elapsed());
    assert!(output.stderr.contains("fork") || output.stderr.contains("retry"), "{output:?}");
    // The host is fine; so is a fresh sandbox.
    let Some((dispatcher, other, _dir)) = native_sandbox().await else { return };
    let output = run(&dispatcher, &other, shell("echo fine")).await;
    assert_eq!(output.stdout, "fine\n");
}

#[tokio::test]
async fn tmp_size_obeyed_and_violated() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let fits = shell("head -c 1048576 /dev/zero > /tmp/small && stat -c %s /tmp/small");
    let output = run(&dispatcher, &sandbox, fits).await;
    assert_eq!(output.stdout, "1048576\n", "{output:?}");
    let fill = shell("head -c 300000000 /dev/zero > /tmp/fill; echo $?")
        .with_limits(limits(Duration::from_secs(30), 1 << 30));
    let output = run(&dispatcher, &sandbox, fill).await;
    assert!(output.stderr.contains("No space left on device"), "{output:?}");
    assert_eq!(output.stdout, "1\n");
}

#[tokio::test]
async fn closing_a_sandbox_leaves_no_process_cgroup_or_mount() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = native_backend().expect("the native tier is available");
    let output =
        run(&dispatcher, &sandbox, shell("sleep 300 & setsid sleep 300 & echo started")).await;
    assert_eq!(output.stdout, "started\n");
    let handle = native.sandbox(&sandbox, &Limits::default()).await.expect("the live sandbox");
    let init = handle.init_pid();
    let cgroup = handle.cgroup_memory_path().expect("a memory cgroup");
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).expect("cgroup.procs");
    let pids: Vec<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(pids.len() >= 3, "init and two sleeps: {pids:?}");
    drop(handle);
    dispatcher.close(&sandbox).await;
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} (init {init}) survived"
        );
    }
    assert!(!cgroup.exists(), "{} survived", cgroup.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let workspace = sandbox.workspace().display().to_string();
    assert!(!mounts.contains(&workspace), "a mount of the workspace survived");
}

#[tokio::test]
async fn control_groups_left_by_a_dead_server_are_removed_at_start() {
    if native_backend().is_none() {
        return;
    }
    // A pid that no process has: above the kernel's maximum.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("a number");
    let stale = format!("{}-7", pid_max + 1);
    let root = std::path::Path::new("/sys/fs/cgroup");
    let dirs: Vec<_> = if soulbox_native::cgroup_version() == 2 {
        vec![root.join("soulbox").join(&stale)]
    } else {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| root.join(c).join("soulbox").join(&stale))
            .collect()
    };
    for dir in &dirs {
        std::fs::create_dir_all(dir).expect("a stale group");
    }
    let state = tempfile::tempdir().expect("tempdir");
    let config = soulbox_native::NativeConfig {
        pool_min: 0,
        pool_max: 0,
        ..soulbox_native::NativeConfig::new(state.path())
    };
    soulbox_native::NativeTier::new(config).expect("a second tier");
    for dir in &dirs {
        assert!(!dir.exists(), "{} survived", dir.display());
    }
}

#[tokio::test]
async fn a_sandbox_whose_init_was_killed_restarts_on_the_same_workspace() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = native_backend().expect("the native tier is available");
    let output = run(&dispatcher, &sandbox, shell("echo kept > note.txt")).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    let handle = native.sandbox(&sandbox, &Limits::default()).await.expect("the live sandbox");
    let init = handle.init_pid();
    drop(handle);
    kill_process(init.as_raw());
    // Give the host a moment to see init's socket close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while native.sandbox(&sandbox, &Limits::default()).await.expect("sandbox").is_alive()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let output = run(&dispatcher, &sandbox, shell("cat note.txt")).await;
    assert_eq!(output.stdout, "kept\n", "{output:?}");
    dispatcher.close(&sandbox).await;
}

/// SIGKILL to a host pid, with the `kill` program (the tests forbid `unsafe`).
fn kill_process(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn init_passes_the_signals_it_receives_to_the_sandbox() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = native_backend().expect("the native tier is available");
    let script = "trap 'echo got TERM > /home/user/signalled; exit 0' TERM; \
                  echo ready > /home/user/ready; while true; do sleep 0.05; done";
    let started =
        run(&dispatcher, &sandbox, shell(&format!("({script}) > /dev/null 2>&1 &"))).await;
    assert_eq!(started.termination, Some(Termination::Exited { code: 0 }), "{started:?}");
    wait_for(&sandbox.workspace().join("ready")).await;
    let handle = native.sandbox(&sandbox, &Limits::default()).await.expect("the live sandbox");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &handle.init_pid().as_raw().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let signalled = sandbox.workspace().join("signalled");
    wait_for(&signalled).await;
    assert_eq!(std::fs::read_to_string(&signalled).expect("the trap ran"), "got TERM\n");
    assert!(handle.is_alive(), "init itself keeps running");
    // What init starts does not inherit anything of init's signal handling.
    let mask = run(&dispatcher, &sandbox, shell("grep -E '^Sig(Blk|Ign)' /proc/self/status")).await;
    assert_eq!(mask.stdout, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
    drop(handle);
    dispatcher.close(&sandbox).await;
}

/// Waits up to 5 s for a file to appear with something in it (a shell creates the file of a
/// redirection before it writes).
async fn wait_for(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(path).map_or(true, |m| m.len() == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_failing_isolation_step_refuses_the_sandbox() {
    let Some(native) = native_backend() else { return };
    let missing = std::path::Path::new("/nonexistent/soulbox/workspace");
    let refused = native
        .tier()
        .start_sandbox(&soulbox_native::SandboxRoot::Host, missing, 256 << 20)
        .await
        .expect_err("refused");
    assert!(refused.to_string().contains("/nonexistent/soulbox/workspace"), "{refused}");
}

#[tokio::test]
async fn command_size_obeyed_and_violated() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let fits = "x".repeat(30_000);
    let output = run(&dispatcher, &sandbox, command(&["printf", "%s", &fits])).await;
    assert_eq!(output.stdout.len(), 30_000, "{:?}", output.termination);
    let too_long = "x".repeat(100_000);
    let output = run(&dispatcher, &sandbox, command(&["printf", "%s", &too_long])).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 126 }), "{output:?}");
    assert!(output.stderr.contains("argument list too long"), "{output:?}");
    let after = run(&dispatcher, &sandbox, shell("echo alive")).await;
    assert_eq!(after.stdout, "alive\n", "a refused command leaves the sandbox as it was");
    dispatcher.close(&sandbox).await;
}

/// CPU seconds a busy loop gets in `wall` seconds, measured by Python from `os.times()`.
const CPU_PROBE: &str = "import os, time, sys\nwall = float(sys.argv[1])\nend = time.monotonic() + wall\nwhile time.monotonic() < end:\n    pass\nt = os.times()\nprint(round(t.user + t.system, 3))";

#[tokio::test]
async fn cpu_quota_obeyed_and_violated() {
    if native_backend().is_none() {
        return;
    }
    // Natively, the loop gets (nearly) a whole CPU.
    let native = std::process::Command::new("/usr/bin/python3")
        .args(["-c", CPU_PROBE, "1"])
        .output()
        .expect("python3 runs");
    let native_cpu: f64 = String::from_utf8_lossy(&native.stdout).trim().parse().expect("seconds");
    // A tier whose sandboxes get a fifth of a CPU.
    let state = tempfile::tempdir().expect("tempdir");
    let config = soulbox_native::NativeConfig {
        cpu_quota_us: 20_000,
        pool_min: 0,
        pool_max: 0,
        ..soulbox_native::NativeConfig::new(state.path())
    };
    let tier = soulbox_native::NativeTier::new(config).expect("a tier");
    let backend = std::sync::Arc::new(soulbox_native::NativeBackend::new(tier));
    let (dispatcher, sandbox, _dir) = soulbox_tests::sandbox().await;
    let dispatcher = dispatcher.with_backend(backend);
    let output = run(&dispatcher, &sandbox, command(&["python3", "-c", CPU_PROBE, "1"])).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    let sandboxed_cpu: f64 = output.stdout.trim().parse().expect("seconds");
    assert!(native_cpu > 0.5, "natively the loop got {native_cpu} s of CPU in 1 s");
    assert!(sandboxed_cpu < 0.35, "under a 20% quota the loop got {sandboxed_cpu} s in 1 s");
    // Within the quota, work is not slowed: many processes run side by side.
    let many = shell("for i in $(seq 50); do sleep 0.2 & done; wait; echo all done");
    let output = run(&dispatcher, &sandbox, many).await;
    assert_eq!(output.stdout, "all done\n", "{output:?}");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn a_paused_sandbox_stops_and_resumes_where_it_was() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = native_backend().expect("the native tier is available");
    let ticker =
        "(while true; do echo tick >> /home/user/ticks; sleep 0.01; done) > /dev/null 2>&1 &";
    run(&dispatcher, &sandbox, shell(ticker)).await;
    let ticks = sandbox.workspace().join("ticks");
    let count = || std::fs::read_to_string(&ticks).map_or(0, |t| t.lines().count());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(count() > 3, "the ticker runs");
    let handle = native.sandbox(&sandbox, &Limits::default()).await.expect("the live sandbox");
    handle.pause().await.expect("paused");
    let frozen_at = count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), frozen_at, "nothing runs while paused");
    handle.resume().await.expect("resumed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(count() > frozen_at + 3, "the same ticker continues after resume");
    // A paused sandbox can be closed: its frozen processes are thawed to die.
    handle.pause().await.expect("paused again");
    let cgroup = handle.cgroup_memory_path().expect("a cgroup");
    drop(handle);
    let began = Instant::now();
    dispatcher.close(&sandbox).await;
    assert!(began.elapsed() < Duration::from_secs(2), "{:?}", began.elapsed());
    assert!(!cgroup.exists(), "{} survived", cgroup.display());
}

/// Waits up to `patience` for `condition`; whether it came true.
async fn eventually(patience: Duration, condition: impl Fn() -> bool) -> bool {
    let began = Instant::now();
    while !condition() {
        if began.elapsed() > patience {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A tier of its own, with `config` changed by `configure`.
fn own_tier(
    state: &std::path::Path,
    configure: impl FnOnce(&mut soulbox_native::NativeConfig),
) -> std::sync::Arc<soulbox_native::NativeTier> {
    let mut config = soulbox_native::NativeConfig::new(state);
    configure(&mut config);
    std::sync::Arc::new(soulbox_native::NativeTier::new(config).expect("a tier"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_grows_with_demand_and_shrinks_back_when_idle() {
    if native_backend().is_none() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let tier = own_tier(state.path(), |config| {
        config.pool_min = 1;
        config.pool_max = 6;
    });
    tier.warm();
    assert!(eventually(Duration::from_secs(10), || tier.pooled() == 1).await, "filled to 1");
    // A burst of starts: the demand rises, and with it the target and the pool.
    let workspace = tempfile::tempdir().expect("tempdir");
    for _ in 0..20 {
        let sandbox = tier
            .start_sandbox(&soulbox_native::SandboxRoot::Host, workspace.path(), 256 << 20)
            .await
            .expect("a sandbox");
        sandbox.destroy().await.expect("destroyed");
    }
    let stats = tier.pool_stats();
    assert_eq!(stats.hits + stats.misses, 20, "{stats:?}");
    assert!(stats.hits >= 1 && stats.target >= 4, "{stats:?}");
    assert!(eventually(Duration::from_secs(10), || tier.pooled() >= 4).await, "{stats:?}");
    // Idle, the demand decays and the pool gives back what it no longer needs.
    let shrunk = eventually(Duration::from_secs(20), || tier.pooled() == 1).await;
    assert!(shrunk, "back to the minimum: {:?}", tier.pool_stats());
}

#[tokio::test]
async fn the_pool_leaves_memory_to_running_sandboxes() {
    if native_backend().is_none() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let tier = own_tier(state.path(), |config| {
        config.pool_min = 2;
        config.pool_min_free_memory_bytes = u64::MAX;
    });
    tier.warm();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(tier.pooled(), 0, "no host has that much memory free: the pool waits");
    // Sandboxes still start (prepared on demand).
    let workspace = tempfile::tempdir().expect("tempdir");
    let sandbox = tier
        .start_sandbox(&soulbox_native::SandboxRoot::Host, workspace.path(), 256 << 20)
        .await
        .expect("a sandbox");
    sandbox.destroy().await.expect("destroyed");
    assert_eq!((tier.pool_stats().hits, tier.pool_stats().misses), (0, 1));
}
