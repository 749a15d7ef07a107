//! Language packs: checksums, unknown and missing languages.

use soulbox_runtime::{DispatchError, Dispatcher, ExecRequest, Language, Sandbox, SandboxSpec};
use soulbox_wasm::WasmBackend;
use soulbox_wasm::pack::{self, NoProgress};

#[tokio::test]
async fn pack_with_a_wrong_checksum_is_refused_and_nothing_is_installed() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let backend = WasmBackend::builder(data_dir.path()).max_instances(4).build().expect("backend");
    let mut spec = pack::pack_spec(&Language::parse("javascript")).expect("in the manifest");
    spec.archive_sha256 = "0".repeat(64);
    let error = backend.install(&spec, &NoProgress).await.expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("checksum mismatch"), "{message}");
    assert!(message.contains("nothing was installed"), "{message}");
    assert!(pack::installed(data_dir.path(), &spec.language).is_none());
    assert!(!pack::pack_dir(data_dir.path(), &spec.language).exists());
    let leftovers: Vec<_> = std::fs::read_dir(pack::packs_dir(data_dir.path()))
        .expect("packs dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|name| name != ".lock")
        .collect();
    assert!(leftovers.is_empty(), "no staging directory left behind: {leftovers:?}");
}

#[tokio::test]
async fn pack_with_a_wrong_wasm_checksum_is_refused() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let backend = WasmBackend::builder(data_dir.path()).max_instances(4).build().expect("backend");
    let mut spec = pack::pack_spec(&Language::parse("javascript")).expect("in the manifest");
    spec.wasm.sha256 = "f".repeat(64);
    let error = backend.install(&spec, &NoProgress).await.expect_err("refused");
    assert!(error.to_string().contains("checksum mismatch for qjs-wasi-reactor"), "{error}");
    assert!(pack::installed(data_dir.path(), &spec.language).is_none());
}

#[tokio::test]
async fn language_not_installed_names_the_install_command() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let backend = WasmBackend::builder(data_dir.path()).max_instances(4).build().expect("backend");
    let dispatcher = Dispatcher::new().with_backend(std::sync::Arc::new(backend));
    let sandbox = Sandbox::create(data_dir.path(), SandboxSpec::default()).expect("sandbox");
    let error = dispatcher
        .start(std::sync::Arc::new(sandbox), ExecRequest::cell(Language::parse("py"), "1"))
        .expect_err("not installed");
    assert_eq!(
        error,
        DispatchError::LanguageNotInstalled {
            language: Language::parse("python"),
            install_command: "soulbox langs install python".into()
        }
    );
}

#[tokio::test]
async fn unknown_language_lists_the_installed_ones() {
    let (dispatcher, sandbox, _dir) = soulbox_tests::sandbox().await;
    let error = dispatcher
        .start(sandbox, ExecRequest::cell(Language::parse("cobol"), "DISPLAY 'HI'"))
        .expect_err("unknown");
    assert_eq!(
        error.to_string(),
        "unknown language `cobol`; installed languages: javascript, python, ruby"
    );
}

#[tokio::test]
async fn installed_packs_are_listed_with_their_pins() {
    soulbox_tests::wasm_backend().await;
    let installed = pack::installed_packs(&soulbox_tests::test_data_dir());
    let languages: Vec<&str> = installed.iter().map(|p| p.spec.language.as_str()).collect();
    assert_eq!(languages, ["python", "javascript", "ruby"]);
    for pack in installed {
        assert_eq!(pack.image_sha256.len(), 64);
    }
}
