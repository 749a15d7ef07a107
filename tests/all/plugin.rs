//! The plugin host: any WASI preview-1 command module, with stdin, a directory and limits.

use std::time::{Duration, Instant};

use soulbox_runtime::{EventSink, ExecEvent, Limits, Termination};
use soulbox_wasm::plugin::{ModuleRun, compile_module, run_module};

/// Echoes up to 100 bytes of stdin to stdout, writes "saved" to `out.txt` in its first
/// preopened directory (fd 3), and exits with code 7.
const ECHO_AND_SAVE: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 300) "out.txt")
  (data (i32.const 320) "saved")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 100))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 16) (i32.const 100))
    (i32.store (i32.const 20) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 300) (i32.const 7)
                   (i32.const 1) (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 40)))
      (then
        (i32.store (i32.const 48) (i32.const 320))
        (i32.store (i32.const 52) (i32.const 5))
        (drop (call $fd_write (i32.load (i32.const 40)) (i32.const 48) (i32.const 1) (i32.const 56)))))
    (call $exit (i32.const 7))))
"#;

const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

const GROW: &str = r#"
(module
  (memory 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))
"#;

async fn run(wat: &str, run: ModuleRun) -> (Termination, Vec<u8>) {
    let backend = soulbox_tests::wasm_backend().await;
    let module = compile_module(backend.engine(), wat.as_bytes()).expect("compiles");
    let (sink, mut events) = EventSink::channel();
    let termination = run_module(backend.engine(), &module, run, &sink).await.expect("runs");
    drop(sink);
    let mut stdout = Vec::new();
    while let Some(event) = events.recv().await {
        if let ExecEvent::Stdout(bytes) = event {
            stdout.extend_from_slice(&bytes);
        }
    }
    (termination, stdout)
}

#[tokio::test]
async fn plugin_gets_stdin_a_directory_and_its_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (termination, stdout) = run(
        ECHO_AND_SAVE,
        ModuleRun {
            stdin: b"hello plugin".to_vec(),
            dir: Some((dir.path().to_owned(), "/data".into())),
            ..ModuleRun::default()
        },
    )
    .await;
    assert_eq!(termination, Termination::Exited { code: 7 });
    assert_eq!(stdout, b"hello plugin");
    assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).expect("written"), "saved");
}

#[tokio::test]
async fn plugin_without_a_directory_cannot_write_anywhere() {
    let (termination, stdout) = run(ECHO_AND_SAVE, ModuleRun::default()).await;
    assert_eq!(termination, Termination::Exited { code: 7 });
    assert!(stdout.is_empty());
}

#[tokio::test]
async fn plugin_timeout_violated() {
    let limits = Limits { wall_timeout: Duration::from_millis(100), ..Limits::default() };
    let began = Instant::now();
    let (termination, _) = run(SPIN, ModuleRun { limits, ..ModuleRun::default() }).await;
    assert_eq!(termination, Termination::TimedOut { limit_ms: 100 });
    assert!(began.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn plugin_memory_violated() {
    let limits = Limits { memory_bytes: 8 << 20, ..Limits::default() };
    let (termination, _) = run(GROW, ModuleRun { limits, ..ModuleRun::default() }).await;
    assert_eq!(termination, Termination::MemoryExceeded { limit_bytes: 8 << 20 });
}

#[tokio::test]
async fn plugin_memory_obeyed() {
    let grow_a_little =
        r#"(module (memory 1) (func (export "_start") (drop (memory.grow (i32.const 10)))))"#;
    let limits = Limits { memory_bytes: 8 << 20, ..Limits::default() };
    let (termination, _) = run(grow_a_little, ModuleRun { limits, ..ModuleRun::default() }).await;
    assert_eq!(termination, Termination::Exited { code: 0 });
}
