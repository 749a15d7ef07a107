//! The official E2B Python SDK (from PyPI) drives `soulbox serve`: the acceptance check of
//! E2B compatibility. `.ci/run` installs it into `target/e2b-venv`; elsewhere set
//! `SOULBOX_E2B_PYTHON` to a Python that has the `e2b` package.

use std::path::PathBuf;

use soulbox_tests::serve_with_manager;

/// The Python with the SDK, or why there is none.
fn sdk_python() -> Result<PathBuf, String> {
    let python = std::env::var_os("SOULBOX_E2B_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2b-venv/bin/python")
    });
    let probe = std::process::Command::new(&python).args(["-c", "import e2b"]).output();
    match probe {
        Ok(out) if out.status.success() => Ok(python),
        _ => Err(format!(
            "no Python with the e2b package at {} (.ci/run installs it)",
            python.display()
        )),
    }
}

async fn run_script(script: &str) {
    let python = match sdk_python() {
        Ok(python) => python,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let (base, _data) = serve_with_manager().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk").join(script);
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .env("E2B_API_URL", &base)
        .env("E2B_SANDBOX_URL", &base)
        .env("E2B_API_KEY", "e2b_0000000000000000000000000000000000000000")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}:\n{stdout}\n{stderr}", script.display());
    assert_eq!(stdout.trim_end().lines().last(), Some("ok"), "{stdout}");
}

#[tokio::test]
async fn the_e2b_sdk_drives_the_control_plane() {
    run_script("control_plane.py").await;
}
