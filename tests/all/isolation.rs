//! Two sandboxes never see each other's files or variables.

use soulbox_runtime::{ExecRequest, Language};
use soulbox_tests::{run, sandbox};

#[tokio::test]
async fn two_sandboxes_never_share_variables() {
    let (dispatcher, first, _a) = sandbox().await;
    let (_, second, _b) = sandbox().await;
    for (language, set, get) in [
        ("python", "secret = 'first'", "globals().get('secret', 'absent')"),
        ("javascript", "var secret = 'first'", "typeof secret"),
        ("ruby", "$secret = 'first'", "$secret.inspect"),
    ] {
        let language = Language::parse(language);
        run(&dispatcher, &first, ExecRequest::cell(language.clone(), set)).await;
        let output = run(&dispatcher, &second, ExecRequest::cell(language.clone(), get)).await;
        let text = &output.results[0].data["text/plain"];
        assert!(!text.contains("first"), "{language}: {text}");
    }
}

#[tokio::test]
async fn two_sandboxes_never_share_files() {
    let (dispatcher, first, _a) = sandbox().await;
    let (_, second, _b) = sandbox().await;
    let python = Language::parse("python");
    let write = "open('/home/user/mine.txt', 'w').write('first'); open('/tmp/mine.txt', 'w').write('first')";
    run(&dispatcher, &first, ExecRequest::cell(python.clone(), write)).await;
    let read =
        "import os\n[os.path.exists('/home/user/mine.txt'), os.path.exists('/tmp/mine.txt')]";
    let output = run(&dispatcher, &second, ExecRequest::cell(python, read)).await;
    assert_eq!(output.results[0].data["text/plain"], "[False, False]", "{output:?}");
    assert!(first.workspace().join("mine.txt").exists());
}

#[tokio::test]
async fn closing_a_sandbox_releases_its_kernels_and_scratch() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    run(&dispatcher, &sandbox, ExecRequest::cell(Language::parse("python"), "x = 1")).await;
    let scratch_dirs = || std::fs::read_dir(sandbox.state_dir()).expect("state dir").count();
    assert_eq!(scratch_dirs(), 1, "a kernel's scratch directory exists while it lives");
    dispatcher.close(&sandbox).await;
    assert_eq!(scratch_dirs(), 0, "closing removes it");
    let output = run(
        &dispatcher,
        &sandbox,
        ExecRequest::cell(Language::parse("python"), "'x' in globals()"),
    )
    .await;
    assert_eq!(output.results[0].data["text/plain"], "False", "a closed sandbox's state is gone");
}

#[tokio::test]
async fn dropping_an_execution_stops_it_and_frees_its_kernel() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let python = Language::parse("python");
    run(&dispatcher, &sandbox, ExecRequest::cell(python.clone(), "before = 1")).await;
    let spinning = dispatcher
        .start(sandbox.clone(), ExecRequest::cell(python.clone(), "while True:\n    pass"))
        .expect("dispatched");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(spinning);
    let began = std::time::Instant::now();
    dispatcher.close(&sandbox).await;
    assert!(
        began.elapsed() < std::time::Duration::from_secs(1),
        "closing waited {:?} for a cell nobody listens to",
        began.elapsed()
    );
    let output =
        run(&dispatcher, &sandbox, ExecRequest::cell(python, "'before' in globals()")).await;
    assert_eq!(output.results[0].data["text/plain"], "False", "the stopped kernel was replaced");
}
