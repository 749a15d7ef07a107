//! The native tier end to end: commands and toolchains in a namespace, cgroup and seccomp
//! sandbox, on the same workspace as the WASM tier.

use soulbox_runtime::Termination;
use soulbox_tests::{native_sandbox, run, shell};

#[tokio::test]
async fn a_command_runs_as_the_sandbox_user_in_its_namespaces() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let output = run(&dispatcher, &sandbox, shell("id; hostname; echo $$; pwd; ls /")).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    let stdout = output.stdout;
    assert!(stdout.starts_with("uid=1000(user) gid=1000(user)"), "{stdout}");
    assert!(stdout.contains("\nsandbox\n"), "{stdout}");
    assert!(stdout.contains("\n/home/user\n"), "{stdout}");
}
