//! The official E2B Python SDKs (`e2b` and `e2b-code-interpreter`, from PyPI) drive
//! `soulbox serve`: the acceptance check of E2B compatibility. Each script in `tests/sdk`
//! runs with the pinned SDKs (`target/e2b-venv`) and with the newest (`target/e2b-venv-latest`),
//! both installed by `.ci/run`; elsewhere set `SOULBOX_E2B_PYTHON` to a Python that has both.

use std::path::PathBuf;

use soulbox_tests::serve_with_manager;

/// The Pythons with the SDKs (pinned, newest), or why there is none.
pub(crate) fn sdk_pythons() -> Result<Vec<PathBuf>, String> {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let candidates: Vec<PathBuf> = match std::env::var_os("SOULBOX_E2B_PYTHON") {
        Some(python) => vec![PathBuf::from(python)],
        None => ["e2b-venv", "e2b-venv-latest"]
            .iter()
            .map(|venv| target.join(venv).join("bin/python"))
            .collect(),
    };
    let found: Vec<PathBuf> = candidates
        .iter()
        .filter(|python| {
            let probe = std::process::Command::new(python)
                .args(["-c", "import e2b, e2b_code_interpreter"])
                .output();
            probe.is_ok_and(|out| out.status.success())
        })
        .cloned()
        .collect();
    if found.is_empty() {
        return Err(format!(
            "no Python with the e2b and e2b-code-interpreter packages among {candidates:?} \
             (.ci/run installs them)"
        ));
    }
    Ok(found)
}

/// Runs `script` against a fresh `soulbox serve` with each SDK Python; it must print `ok` last.
async fn run_script(script: &str) {
    let pythons = match sdk_pythons() {
        Ok(pythons) => pythons,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let (base, _data) = serve_with_manager().await;
    for python in pythons {
        sdk_script(&python, script, &base, &[]).await;
    }
}

/// Runs `tests/sdk/<script>` with `python` against the server at `base` (with `env` more);
/// it must succeed and print `ok` last. Its standard output.
pub(crate) async fn sdk_script(
    python: &std::path::Path,
    script: &str,
    base: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk").join(script);
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .env("E2B_API_URL", base)
        .env("E2B_SANDBOX_URL", base)
        .env("E2B_API_KEY", soulbox_tests::TEST_API_KEY)
        .envs(env.iter().copied())
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let what = format!("{} with {}", script.display(), python.display());
    assert!(output.status.success(), "{what} ({}):\n{stdout}\n{stderr}", output.status);
    assert_eq!(stdout.trim_end().lines().last(), Some("ok"), "{what}: {stdout}\n{stderr}");
    stdout
}

#[tokio::test]
async fn the_e2b_sdk_drives_the_control_plane() {
    run_script("control_plane.py").await;
}

#[tokio::test]
async fn the_e2b_sdk_runs_commands() {
    run_script("commands.py").await;
}

#[tokio::test]
async fn the_e2b_sdk_moves_files() {
    run_script("files.py").await;
}

#[tokio::test]
async fn the_e2b_code_interpreter_sdk_runs_code() {
    run_script("code_interpreter.py").await;
}
