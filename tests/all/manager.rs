//! The sandbox manager: lifecycle, listing, deadlines, pause and resume, and what a restart
//! keeps, on the real store (sled) and the real tiers.

use std::collections::BTreeMap;
use std::time::Duration;

use soulbox_runtime::{
    CreateSandbox, Dispatcher, ExecRequest, Language, ListFilter, ManagerError, OnTimeout,
    SandboxManager, SandboxState, Termination,
};
use soulbox_tests::{native_backend, run, shell, wasm_backend};

async fn dispatcher() -> Dispatcher {
    let dispatcher = Dispatcher::new().with_backend(wasm_backend().await);
    match native_backend() {
        Some(native) => dispatcher.with_backend(native),
        None => dispatcher,
    }
}

fn labelled(key: &str, value: &str) -> CreateSandbox {
    let mut request = CreateSandbox::new("base");
    request.metadata = BTreeMap::from([(key.to_owned(), value.to_owned())]);
    request
}

#[tokio::test]
async fn a_sandbox_lives_from_create_to_kill() {
    let root = tempfile::tempdir().expect("tempdir");
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
    let created = manager.create(labelled("owner", "alice")).expect("created");
    assert_eq!(created.state, SandboxState::Running);
    assert_eq!(manager.get(created.id.as_str()).expect("found"), created);
    let sandbox = manager.running(created.id.as_str()).expect("running");
    let python =
        ExecRequest::cell(Language::parse("python"), "open('/home/user/f', 'w').write('x')");
    let output = run(manager.dispatcher(), &sandbox, python).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert!(sandbox.workspace().join("f").exists());

    let later = manager.set_timeout(created.id.as_str(), Duration::from_secs(3600)).expect("set");
    assert!(later.end_at_ms > created.end_at_ms);

    assert!(manager.kill(created.id.as_str()).await.expect("killed"));
    assert!(!sandbox.workspace().exists(), "its files are removed");
    assert!(matches!(manager.get(created.id.as_str()), Err(ManagerError::NotFound(_))));
    assert!(!manager.kill(created.id.as_str()).await.expect("a second kill"), "already gone");
    assert!(matches!(manager.get("../../etc"), Err(ManagerError::NotFound(_))));
}

#[tokio::test]
async fn list_filters_by_metadata_and_state_and_pages() {
    let root = tempfile::tempdir().expect("tempdir");
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(manager.create(labelled("suite", "paging")).expect("created").id);
    }
    manager.create(labelled("suite", "other")).expect("created");
    manager.pause(ids[4].as_str()).await.expect("paused");

    let mut filter = ListFilter {
        metadata: BTreeMap::from([("suite".to_owned(), "paging".to_owned())]),
        limit: Some(2),
        ..ListFilter::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = manager.list(&filter);
        assert!(page.sandboxes.len() <= 2);
        seen.extend(page.sandboxes.into_iter().map(|r| r.id));
        match page.next_token {
            Some(token) => filter.next_token = Some(token),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.sort_by_key(|id| manager.get(id.as_str()).map(|r| (r.started_at_ms, r.id)).ok());
    assert_eq!(seen, expected, "every labelled sandbox once, oldest first");

    let paused = ListFilter { states: vec![SandboxState::Paused], ..ListFilter::default() };
    let page = manager.list(&paused);
    assert_eq!(page.sandboxes.iter().map(|r| &r.id).collect::<Vec<_>>(), [&ids[4]]);
}

#[tokio::test]
async fn requests_out_of_range_are_refused_and_create_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
    let mut too_long = CreateSandbox::new("base");
    too_long.timeout = Duration::from_secs(25 * 3600);
    assert!(matches!(manager.create(too_long), Err(ManagerError::Invalid(_))));
    let mut too_many = CreateSandbox::new("base");
    too_many.metadata = (0..100).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    assert!(matches!(manager.create(too_many), Err(ManagerError::Invalid(_))));
    let mut empty_key = CreateSandbox::new("base");
    empty_key.env = BTreeMap::from([(String::new(), "v".to_owned())]);
    assert!(matches!(manager.create(empty_key), Err(ManagerError::Invalid(_))));
    let mut at_the_maximum = CreateSandbox::new("base");
    at_the_maximum.timeout = Duration::from_secs(24 * 3600);
    at_the_maximum.metadata = (0..64).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let created = manager.create(at_the_maximum).expect("the maximum is allowed");
    let all = manager.list(&ListFilter::default());
    assert_eq!(all.sandboxes.len(), 1, "only the valid request made a sandbox");
    let sandboxes = std::fs::read_dir(root.path().join("sandboxes")).expect("dir").count();
    assert_eq!(sandboxes, 1);
    assert_eq!(all.sandboxes[0].id, created.id);
}

#[tokio::test]
async fn a_restart_keeps_every_sandbox_and_its_files_and_running_ones_come_back_paused() {
    let root = tempfile::tempdir().expect("tempdir");
    let (running, paused) = {
        let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
        let running = manager.create(labelled("name", "running")).expect("created");
        let paused = manager.create(labelled("name", "paused")).expect("created");
        manager.pause(paused.id.as_str()).await.expect("paused");
        let sandbox = manager.running(running.id.as_str()).expect("running");
        std::fs::write(sandbox.workspace().join("kept.txt"), "kept").expect("a file");
        (running, paused)
    };
    // The manager and its store are gone, as after a stop of the server; open them again.
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("reopened");
    let back = manager.get(running.id.as_str()).expect("the running one is back");
    assert_eq!(back.state, SandboxState::Paused, "it comes back paused");
    assert_eq!(back.metadata, running.metadata);
    assert_eq!(manager.get(paused.id.as_str()).expect("back").state, SandboxState::Paused);
    assert!(matches!(manager.running(running.id.as_str()), Err(ManagerError::Paused(_))));

    let (resumed, was_paused) =
        manager.connect(running.id.as_str(), Duration::from_secs(60)).await.expect("connect");
    assert!(was_paused);
    assert_eq!(resumed.state, SandboxState::Running);
    let sandbox = manager.running(running.id.as_str()).expect("running again");
    let read = ExecRequest::cell(Language::parse("python"), "open('/home/user/kept.txt').read()");
    let output = run(manager.dispatcher(), &sandbox, read).await;
    assert_eq!(output.results[0].data["text/plain"], "'kept'", "{output:?}");
}

#[tokio::test]
async fn connect_extends_a_running_sandbox_only_when_later() {
    let root = tempfile::tempdir().expect("tempdir");
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
    let created = manager.create(CreateSandbox::new("base")).expect("created");
    let (same, resumed) =
        manager.connect(created.id.as_str(), Duration::from_secs(1)).await.expect("connect");
    assert!(!resumed);
    assert_eq!(same.end_at_ms, created.end_at_ms, "a shorter timeout does not shorten it");
    let (longer, _) =
        manager.connect(created.id.as_str(), Duration::from_secs(3600)).await.expect("connect");
    assert!(longer.end_at_ms > created.end_at_ms);
    assert!(matches!(
        manager.resume(created.id.as_str(), Duration::from_secs(60)).await,
        Err(ManagerError::AlreadyRunning(_))
    ));
}

#[tokio::test]
async fn expired_sandboxes_are_killed_or_paused_as_they_asked() {
    let root = tempfile::tempdir().expect("tempdir");
    let manager = std::sync::Arc::new(
        SandboxManager::open(root.path(), dispatcher().await).expect("manager"),
    );
    let mut killed = CreateSandbox::new("base");
    killed.timeout = Duration::from_millis(100);
    let killed = manager.create(killed).expect("created");
    let mut paused = CreateSandbox::new("base");
    paused.timeout = Duration::from_millis(100);
    paused.on_timeout = OnTimeout::Pause;
    let paused = manager.create(paused).expect("created");
    let lasting = manager.create(CreateSandbox::new("base")).expect("created");
    let reaper = manager.spawn_reaper(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(400)).await;
    reaper.abort();
    assert!(matches!(manager.get(killed.id.as_str()), Err(ManagerError::NotFound(_))));
    let paused = manager.get(paused.id.as_str()).expect("kept");
    assert_eq!(paused.state, SandboxState::Paused);
    assert!(root.path().join("sandboxes").join(paused.id.as_str()).join("workspace").exists());
    assert_eq!(manager.get(lasting.id.as_str()).expect("kept").state, SandboxState::Running);
}

#[tokio::test]
async fn pausing_stops_native_processes_and_resuming_continues_them() {
    if native_backend().is_none() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let manager = SandboxManager::open(root.path(), dispatcher().await).expect("manager");
    let created = manager.create(CreateSandbox::new("base")).expect("created");
    let sandbox = manager.running(created.id.as_str()).expect("running");
    let ticker =
        "(while true; do echo tick >> /home/user/ticks; sleep 0.01; done) > /dev/null 2>&1 &";
    run(manager.dispatcher(), &sandbox, shell(ticker)).await;
    let ticks = sandbox.workspace().join("ticks");
    let count = || std::fs::read_to_string(&ticks).map_or(0, |t| t.lines().count());
    tokio::time::sleep(Duration::from_millis(200)).await;
    manager.pause(created.id.as_str()).await.expect("paused");
    let at_pause = count();
    assert!(at_pause > 3, "the ticker ran");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), at_pause, "nothing runs while paused");
    manager.resume(created.id.as_str(), Duration::from_secs(60)).await.expect("resumed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(count() > at_pause + 3, "the ticker continues");
    assert!(manager.kill(created.id.as_str()).await.expect("killed"));
}
