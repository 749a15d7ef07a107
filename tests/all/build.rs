//! Templates built from Dockerfiles (`native-fallback/src/build.rs`): a base image read from
//! an OCI layout, `RUN` steps in real native sandboxes on overlayfs, `COPY`, `ENV`, `ARG`,
//! `WORKDIR`, `USER`; the cache on a rebuild; a failing step and a full disk quota failing
//! the build with the step's line and output; and a sandbox started on the result.

use std::path::Path;

use soulbox_native::build::{BuildError, BuildEvent, BuildOptions, Builder, BuiltImage};
use soulbox_native::image::{LayerStore, import_oci_layout};
use soulbox_native::{
    ExitStatus, LayeredRoot, NativeSandbox, ProcessSpec, SandboxNetwork, SandboxRoot, dockerfile,
};
use soulbox_runtime::SandboxUser;
use tokio::io::AsyncReadExt;

struct Setup {
    builder: Builder,
    base: BuiltImage,
    context: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

fn setup() -> Option<Setup> {
    let native = soulbox_tests::native_backend()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = soulbox_tests::busybox_image(dir.path())?;
    let store = LayerStore::open(dir.path().join("layers")).expect("store");
    let stored = import_oci_layout(&store, &layout, Some("latest"), &mut |_| {}).expect("import");
    assert_eq!(stored.config.env_value("PATH"), Some("/bin"));
    let base = BuiltImage { layers: stored.layers, config: stored.config, ..BuiltImage::default() };
    let builder =
        Builder::new(native.tier().clone(), store, dir.path().join("builds")).expect("builder");
    let context = tempfile::tempdir().expect("context");
    soulbox_tests::write_template_context(context.path());
    Some(Setup { builder, base, context, _dir: dir })
}

async fn build(
    setup: &Setup,
    dockerfile: &str,
    options: &BuildOptions,
) -> (Result<BuiltImage, BuildError>, Vec<BuildEvent>) {
    let plan = dockerfile::plan(dockerfile).expect("a valid Dockerfile");
    let mut events = Vec::new();
    let built = setup
        .builder
        .build(&plan, setup.base.clone(), setup.context.path(), options, &mut |e| events.push(e))
        .await;
    (built, events)
}

/// Runs `script` in a sandbox started on `image`, as its default user, in its workdir.
async fn run_in(
    setup: &Setup,
    image: &BuiltImage,
    workspace: &Path,
    writable: &Path,
    script: &str,
) -> (ExitStatus, String) {
    let native = soulbox_tests::native_backend().expect("native");
    let root = SandboxRoot::Layers(LayeredRoot {
        layers: setup.builder.store().paths(&image.layers).expect("paths"),
        writable: writable.to_owned(),
        host_system: image.host_system,
        template: String::new(),
    });
    let sandbox: NativeSandbox =
        native.tier().start_sandbox(&root, workspace, 256 << 20).await.expect("a sandbox");
    let mut env: Vec<(String, String)> = image.config.env.clone();
    env.push(("HOME".into(), "/home/user".into()));
    let spec = ProcessSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env,
        cwd: image.config.workdir.clone().unwrap_or_else(|| "/".into()),
        user: image.user(),
    };
    let mut process = sandbox.spawn(spec).await.expect("spawn");
    let mut output = String::new();
    process.stdout.read_to_string(&mut output).await.expect("stdout");
    let status = process.exit.wait().await.expect("exit");
    sandbox.destroy().await.expect("destroy");
    (status, output)
}

#[tokio::test]
async fn a_dockerfile_builds_into_layers_that_a_sandbox_runs_on() {
    let Some(setup) = setup() else { return };
    let (built, events) =
        build(&setup, &soulbox_tests::template_dockerfile("busybox"), &BuildOptions::default())
            .await;
    let image = built.expect("the build succeeds");
    // FROM's layer, WORKDIR's directory, two COPYs and two RUNs.
    assert_eq!(image.layers.len(), setup.base.layers.len() + 5, "{events:?}");
    assert_eq!(image.config.workdir.as_deref(), Some("/app"));
    assert_eq!(image.user(), SandboxUser::User);
    assert_eq!(image.config.env_value("MESSAGE"), Some("hello world"));
    assert_eq!(
        image.start.as_deref(),
        Some(&["/bin/sh".to_owned(), "-c".into(), "echo started > /home/user/started".into()][..])
    );
    assert!(
        events.iter().any(|e| matches!(e, BuildEvent::Step { number: 6, total: 8, line: 7, .. }))
    );
    assert!(!events.iter().any(|e| matches!(e, BuildEvent::Cached { .. })), "nothing cached yet");

    let workspace = tempfile::tempdir().expect("workspace");
    let writable = tempfile::tempdir().expect("writable");
    let script = "cat /app/out.txt /app/greeting.txt; test -e /bin/vi && echo vi-present; \
                  id -u; pwd; cat /home/user/uid.txt 2>&1; \
                  echo $MESSAGE; touch /app/x 2>&1 | head -c 0; echo written > /tmp/t; \
                  ls /bin/sh && echo root-writable > /root-test 2>&1; echo done";
    let (status, output) = run_in(&setup, &image, workspace.path(), writable.path(), script).await;
    assert_eq!(status, ExitStatus::Code(0), "{output}");
    assert!(output.contains("hello world\nhi from the context\n"), "{output}");
    assert!(!output.contains("vi-present"), "the whiteout of a RUN step hides /bin/vi: {output}");
    assert!(output.contains("\n1000\n/app\n"), "USER and WORKDIR are the defaults: {output}");
    assert!(output.contains("hello world\n"), "{output}");
    // The workspace is mounted over /home/user: the template's home is not visible there.
    assert!(output.contains("No such file"), "{output}");
    assert!(output.ends_with("done\n"), "{output}");
    // What a sandbox writes lands in its own writable layer, never in the template's.
    let upper = writable.path().join("upper");
    assert!(upper.is_dir());
    for layer in setup.builder.store().paths(&image.layers).expect("paths") {
        assert!(!layer.join("root-test").exists(), "a template layer was written");
    }

    // The second RUN ran as the user; COPY --chown gave the user the files.
    let last = setup.builder.store().paths(&image.layers).expect("paths").pop().expect("layer");
    let uid = std::fs::read_to_string(last.join("home/user/uid.txt")).expect("uid.txt");
    assert_eq!(uid.trim(), "1000");
    let owner = std::fs::read_to_string(last.join("home/user/owner.txt")).expect("owner.txt");
    assert!(owner.contains(" 1000 ") && owner.contains("settings.ini"), "{owner}");

    // An unchanged Dockerfile rebuilds from the cache: no RUN runs, the same layers.
    let began = std::time::Instant::now();
    let (rebuilt, events) =
        build(&setup, &soulbox_tests::template_dockerfile("busybox"), &BuildOptions::default())
            .await;
    let rebuilt = rebuilt.expect("the rebuild succeeds");
    assert_eq!(rebuilt, image);
    let cached = events.iter().filter(|e| matches!(e, BuildEvent::Cached { .. })).count();
    assert_eq!(cached, 2, "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, BuildEvent::Output { .. })), "{events:?}");
    eprintln!("rebuild from the cache: {:?}", began.elapsed());

    // A changed build argument changes what the RUN steps see: they run again.
    let options = BuildOptions {
        build_args: [("GREETING".to_owned(), "bonjour".to_owned())].into(),
        ..BuildOptions::default()
    };
    let (changed, events) =
        build(&setup, &soulbox_tests::template_dockerfile("busybox"), &options).await;
    let changed = changed.expect("the build succeeds");
    assert_eq!(changed.config.env_value("MESSAGE"), Some("bonjour world"));
    assert!(!events.iter().any(|e| matches!(e, BuildEvent::Cached { .. })), "{events:?}");
}

#[tokio::test]
async fn a_failing_step_fails_the_build_with_its_line_and_output() {
    let Some(setup) = setup() else { return };
    let dockerfile = "FROM busybox\nRUN echo before\nRUN echo oops-on-stdout; echo oops-on-stderr >&2; exit 3\nRUN echo never\n";
    let (built, events) = build(&setup, dockerfile, &BuildOptions::default()).await;
    match built {
        Err(BuildError::Step { line, message, output }) => {
            assert_eq!(line, 3);
            assert!(message.contains("exited with code 3"), "{message}");
            assert!(
                output.contains("oops-on-stdout") && output.contains("oops-on-stderr"),
                "{output}"
            );
        }
        other => panic!("expected a failed step, got {other:?}"),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BuildEvent::Output { text, .. } if text == "oops-on-stderr"))
    );
    assert!(
        !events.iter().any(|e| matches!(e, BuildEvent::Output { text, .. } if text == "never"))
    );

    // A command that does not exist, and a USER that is neither root nor user.
    let (built, _) =
        build(&setup, "FROM busybox\nRUN [\"/no/such/program\"]\n", &BuildOptions::default()).await;
    assert!(matches!(built, Err(BuildError::Step { line: 2, .. })), "{built:?}");
    let (built, _) = build(&setup, "FROM busybox\nUSER www-data\n", &BuildOptions::default()).await;
    assert!(
        matches!(&built, Err(BuildError::Step { line: 2, message, .. }) if message.contains("`root` (0) or `user` (1000)")),
        "{built:?}"
    );
    // A COPY of a path outside the context.
    let (built, _) =
        build(&setup, "FROM busybox\nCOPY ../../etc/passwd /x\n", &BuildOptions::default()).await;
    assert!(
        matches!(&built, Err(BuildError::Step { line: 2, message, .. }) if message.contains("leaves the build context")),
        "{built:?}"
    );
}

#[tokio::test]
async fn a_step_that_fills_the_disk_quota_is_stopped_with_a_clear_error() {
    let Some(setup) = setup() else { return };
    let options = BuildOptions { disk_bytes: 8 << 20, ..BuildOptions::default() };
    // Within the quota.
    let small = "FROM busybox\nRUN dd if=/dev/zero of=/small bs=1M count=2\n";
    let (built, _) = build(&setup, small, &options).await;
    built.expect("2 MiB fit in 8 MiB");
    // Beyond it.
    let big = "FROM busybox\nRUN dd if=/dev/zero of=/big bs=1M count=64\n";
    let (built, _) = build(&setup, big, &options).await;
    match built {
        Err(BuildError::Step { line, message, .. }) => {
            assert_eq!(line, 2);
            assert!(message.contains("disk quota (8 MiB)"), "{message}");
        }
        other => panic!("expected the quota to stop the step, got {other:?}"),
    }
}

/// Serves `body` to every HTTP request on a loopback port of the host; its port.
async fn serve_once_more(body: &'static str) -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
            let answer = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    port
}

#[tokio::test]
async fn build_steps_have_the_network_only_where_the_server_allows_it() {
    let Some(setup) = setup() else { return };
    let port = serve_once_more("fetched over the network\n").await;
    let dockerfile = format!(
        "FROM busybox\nRUN wget -q -O /fetched http://127.0.0.1:{port}/file && cp /etc/resolv.conf /dns.txt\n"
    );
    // By default a step has only its own loopback: the host's server is out of reach.
    let (built, _) = build(&setup, &dockerfile, &BuildOptions::default()).await;
    assert!(matches!(&built, Err(BuildError::Step { line: 2, .. })), "{built:?}");

    // On the host's network, it fetches, with the host's DNS settings, which stay out of the
    // layer.
    let host = BuildOptions { network: SandboxNetwork::Host, ..BuildOptions::default() };
    let (built, events) = build(&setup, &dockerfile, &host).await;
    let image = built.unwrap_or_else(|e| panic!("{e}: {events:?}"));
    let layer = setup.builder.store().paths(&image.layers).expect("paths").pop().expect("layer");
    let fetched = std::fs::read_to_string(layer.join("fetched")).expect("fetched");
    assert_eq!(fetched, "fetched over the network\n");
    let host_dns = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert_eq!(std::fs::read_to_string(layer.join("dns.txt")).expect("dns.txt"), host_dns);
    assert!(
        !layer.join("etc/resolv.conf").exists(),
        "the host's resolv.conf stays out of the layer"
    );

    // A step on the host's system (FROM base) gets the DNS settings too.
    let from_base = Setup {
        base: BuiltImage::host_system(),
        builder: setup.builder.clone(),
        context: tempfile::tempdir().expect("context"),
        _dir: tempfile::tempdir().expect("dir"),
    };
    let dockerfile = format!(
        "FROM base\nRUN python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/').read().decode(), end='')\" > /fetched && cp /etc/resolv.conf /dns.txt\n"
    );
    let (built, events) = build(&from_base, &dockerfile, &host).await;
    let image = built.unwrap_or_else(|e| panic!("{e}: {events:?}"));
    let layer = setup.builder.store().paths(&image.layers).expect("paths").pop().expect("layer");
    assert_eq!(
        std::fs::read_to_string(layer.join("fetched")).expect("fetched"),
        "fetched over the network\n"
    );
    assert_eq!(std::fs::read_to_string(layer.join("dns.txt")).expect("dns.txt"), host_dns);
}

#[tokio::test]
async fn a_build_step_changes_only_its_own_layer_never_the_ones_below() {
    let Some(setup) = setup() else { return };
    let layers = setup.builder.store().paths(&setup.base.layers).expect("paths");
    let passwd = layers[0].join("etc/passwd");
    let before = std::fs::read(&passwd).expect("passwd");
    // As the sandbox's root, a step overwrites and deletes what the base layer holds, and tries
    // to mount over it.
    let dockerfile = "FROM busybox\nRUN echo pwned > /etc/passwd; rm -f /bin/vi; mount -t tmpfs none /bin && echo mounted; true\n";
    let (built, events) = build(&setup, dockerfile, &BuildOptions::default()).await;
    let image = built.unwrap_or_else(|e| panic!("{e}: {events:?}"));
    let mounted =
        |e: &BuildEvent| matches!(e, BuildEvent::Output { text, .. } if text == "mounted");
    assert!(!events.iter().any(mounted), "{events:?}");
    assert_eq!(std::fs::read(&passwd).expect("passwd"), before, "the base layer is unchanged");
    assert!(std::fs::symlink_metadata(layers[0].join("bin/vi")).is_ok(), "and keeps its files");
    // The step's own layer holds the change and the deletion (a whiteout).
    let own = setup.builder.store().paths(&image.layers).expect("paths").pop().expect("layer");
    assert_eq!(std::fs::read(own.join("etc/passwd")).expect("changed"), b"pwned\n");
    let whiteout = std::fs::symlink_metadata(own.join("bin/vi")).expect("a whiteout");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&whiteout.file_type()));
}

#[tokio::test]
async fn a_docker_save_archive_imports_as_its_oci_layout_does() {
    let Some(setup) = setup() else { return };
    if std::process::Command::new("skopeo").arg("--version").output().is_err() {
        eprintln!("SKIPPED: making a docker-save archive needs skopeo (apt-get install skopeo)");
        return;
    }
    // The setup's own image: another one made a second later has other file times, so
    // other layer digests.
    let layout = setup._dir.path().join("busybox-oci");
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("busybox.tar");
    let copied = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker-archive:{}:tests/busybox:latest", archive.display()))
        .output()
        .expect("skopeo runs");
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let store = setup.builder.store();
    let mut progress = Vec::new();
    let imported = soulbox_native::image::import_docker_archive(
        store,
        &archive,
        Some("tests/busybox:latest"),
        &mut |line| progress.push(line.to_owned()),
    )
    .expect("the archive imports");
    // The same layers (by their content) and configuration as the layout, already stored.
    assert_eq!(imported.layers, setup.base.layers);
    assert_eq!(imported.config.env_value("PATH"), Some("/bin"));
    assert!(progress.iter().all(|line| line.ends_with("(stored)")), "{progress:?}");
    let missing =
        soulbox_native::image::import_docker_archive(store, &archive, Some("nope:1"), &mut |_| {});
    let message = missing.expect_err("no such image").to_string();
    assert!(message.contains("tests/busybox:latest"), "the error lists what it has: {message}");
}
