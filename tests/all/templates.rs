//! Templates end to end over real HTTP: a Dockerfile and its context sent to
//! `POST /v1/templates/build`, the build's events streamed back, the cache on a rebuild,
//! list/inspect/tag/publish/delete, and the official E2B SDK making sandboxes of the template
//! (`tests/sdk/templates.py`). Bad builds leave no template behind.

use std::path::Path;

use serde_json::Value;
use soulbox_tests::{TEST_API_KEY, http_request, http_request_with};

fn last(events: &[Value]) -> &Value {
    events.last().expect("at least one event")
}

/// A context with the shared Dockerfile on `from` (and, for `oci:busybox-oci:latest`, the
/// busybox base image inside); `None` (printed) without the tools to make the image or
/// without the native tier.
fn context(from: &str) -> Option<tempfile::TempDir> {
    soulbox_tests::native_backend()?;
    let context = tempfile::tempdir().expect("context");
    if from.starts_with("oci:busybox-oci") {
        soulbox_tests::busybox_image(context.path())?;
        // The bundle umoci unpacked is not part of the context.
        std::fs::remove_dir_all(context.path().join("busybox-bundle")).expect("remove the bundle");
    }
    soulbox_tests::write_template_context(context.path());
    let dockerfile = soulbox_tests::template_dockerfile(from);
    std::fs::write(context.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    Some(context)
}

#[tokio::test]
async fn a_template_built_over_http_makes_sandboxes_for_the_e2b_sdk() {
    // The base image comes from a registry on loopback.
    let images = tempfile::tempdir().expect("tempdir");
    let Some((registry, _)) = soulbox_tests::registry_with_busybox(images.path(), false).await
    else {
        return;
    };
    let Some(context) = context(&registry.reference("tests/busybox:latest")) else { return };
    let insecure = registry.insecure();
    let (base, _data, _app) = soulbox_tests::serve_configured(|app| {
        app.with_template_settings(soulbox_host::templates::TemplateSettings {
            insecure_registries: insecure,
            ..Default::default()
        })
    })
    .await;
    let (status, events) =
        soulbox_tests::build_template(&base, context.path(), "name=my-app&tag=v1").await;
    assert_eq!(status, 200, "{events:?}");
    let done = last(&events);
    assert_eq!(done["type"], "done", "{events:?}");
    assert_eq!((done["template"].as_str(), done["tag"].as_str()), (Some("my-app"), Some("v1")));
    let first_build = done["build_id"].as_str().expect("a build id").to_owned();
    assert!(
        events.iter().any(|e| e["type"] == "base"
            && e["message"].as_str().is_some_and(|m| m.contains("(pulled)"))),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["type"] == "step"
            && e["line"] == 7
            && e["instruction"].as_str().is_some_and(|i| i.starts_with("RUN echo"))),
        "{events:?}"
    );

    // Unchanged, it rebuilds from the cache: no RUN runs.
    let (status, events) =
        soulbox_tests::build_template(&base, context.path(), "name=my-app").await;
    assert_eq!(status, 200);
    assert_eq!(last(&events)["type"], "done", "{events:?}");
    assert_eq!(events.iter().filter(|e| e["type"] == "cached").count(), 2, "{events:?}");
    assert!(!events.iter().any(|e| e["type"] == "output"), "{events:?}");
    let latest_build = last(&events)["build_id"].as_str().expect("id").to_owned();
    assert_ne!(latest_build, first_build, "every build has its own id");

    // Listed and inspected, with both tags.
    let (status, _, body) = http_request("GET", &format!("{base}/v1/templates"), None).await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&body).expect("json");
    let template = &listed[0];
    assert_eq!(template["name"], "my-app");
    assert_eq!(template["public"], false);
    assert_eq!(template["tags"]["v1"], first_build.as_str());
    assert_eq!(template["tags"]["latest"], latest_build.as_str());
    let (status, _, body) = http_request("GET", &format!("{base}/v1/templates/my-app"), None).await;
    assert_eq!(status, 200);
    let inspected: Value = serde_json::from_slice(&body).expect("json");
    let build = &inspected["builds"][0];
    assert_eq!(build["workdir"], "/app");
    assert_eq!(build["user"], "user");
    assert_eq!(build["start"][2], "echo started > /home/user/started");
    assert!(build["size_bytes"].as_u64().is_some_and(|size| size > 500_000), "{build}");

    // Tags move; a build of another template cannot be tagged.
    let tag = |build: &str| serde_json::to_vec(&serde_json::json!({ "build_id": build })).ok();
    let url = format!("{base}/v1/templates/my-app/tags/stable");
    let (status, _, _) = http_request("PUT", &url, tag(&first_build)).await;
    assert_eq!(status, 200);
    let (status, _, _) =
        http_request("PUT", &url, tag("00000000-0000-4000-8000-000000000000")).await;
    assert_eq!(status, 404);

    // The official SDK makes sandboxes of it (by name, and by name:tag).
    match crate::e2b_sdk::sdk_pythons() {
        Err(reason) => eprintln!("SKIPPED (the SDK part): {reason}"),
        Ok(pythons) => {
            for (python, template) in pythons.iter().zip(["my-app", "my-app:stable"].iter().cycle())
            {
                let env = [("TEMPLATE", std::ffi::OsStr::new(template))];
                crate::e2b_sdk::sdk_script(python, "templates.py", &base, &env).await;
            }
        }
    }

    // Sandboxes of the template after the first came from its pool of prepared ones (the
    // SDK's checks above ran on them: a pooled sandbox starts from the template too).
    let (_, _, metrics) = http_request("GET", &format!("{base}/metrics"), None).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let hits = metrics
        .lines()
        .find(|l| l.starts_with("soulbox_pool_hits_total{") && l.contains("pool=\"template:"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    if crate::e2b_sdk::sdk_pythons().is_ok() {
        assert!(hits.is_some_and(|hits| hits >= 1), "{metrics}");
    }

    // Deleting is refused while a sandbox uses the template.
    let create = serde_json::to_vec(&serde_json::json!({ "templateID": "my-app" })).ok();
    let (status, _, body) =
        http_request("POST", &format!("{base}/sandboxes"), create.clone()).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let sandbox: Value = serde_json::from_slice(&body).expect("json");
    let id = sandbox["sandboxID"].as_str().expect("id");
    let (status, _, body) =
        http_request("DELETE", &format!("{base}/v1/templates/my-app"), None).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = http_request("DELETE", &format!("{base}/sandboxes/{id}"), None).await;
    assert_eq!(status, 204);
    let (status, _, _) = http_request("DELETE", &format!("{base}/v1/templates/my-app"), None).await;
    assert_eq!(status, 204);
    let (status, _, body) = http_request("POST", &format!("{base}/sandboxes"), create).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn bad_builds_are_refused_with_their_line_and_leave_no_template() {
    let Some(context) = context("oci:busybox-oci:latest") else { return };
    let (base, _data, _app) = soulbox_tests::serve_app().await;
    let template = |name: &str| format!("{base}/v1/templates/{name}");

    // A malformed Dockerfile: refused at once, with the line.
    std::fs::write(context.path().join("Dockerfile"), "FROM base\nRUN true\nFROBNICATE x\n")
        .expect("write");
    let (status, events) = soulbox_tests::build_template(&base, context.path(), "name=bad").await;
    assert_eq!(status, 400, "{events:?}");
    assert!(
        events[0]["error"]["message"].as_str().is_some_and(|m| m.contains("line 3")),
        "{events:?}"
    );

    // A failing RUN: the error names the line and carries the output; no template is made.
    let failing = "FROM oci:busybox-oci:latest\nRUN echo building\nRUN echo broken >&2; exit 7\n";
    std::fs::write(context.path().join("Dockerfile"), failing).expect("write");
    let (status, events) =
        soulbox_tests::build_template(&base, context.path(), "name=broken").await;
    assert_eq!(status, 200);
    let error = last(&events);
    assert_eq!(error["type"], "error", "{events:?}");
    assert_eq!(error["line"], 3);
    assert!(error["message"].as_str().is_some_and(|m| m.contains("exited with code 7")), "{error}");
    assert!(error["output"].as_str().is_some_and(|o| o.contains("broken")), "{error}");
    let (status, _, _) = http_request("GET", &template("broken"), None).await;
    assert_eq!(status, 404, "a failed build leaves no template");

    // A base that is neither a template, a local image nor reachable: a clear error.
    std::fs::write(context.path().join("Dockerfile"), "FROM oci:missing-layout\nRUN true\n")
        .expect("write");
    let (_, events) = soulbox_tests::build_template(&base, context.path(), "name=nobase").await;
    let error = last(&events);
    assert_eq!(error["type"], "error", "{events:?}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("FROM oci:missing-layout")),
        "{error}"
    );

    // A registry that does not answer: a clear error naming it.
    let nowhere = format!("127.0.0.1:{}", soulbox_tests::free_port());
    let dockerfile = format!("FROM {nowhere}/team/app:v1\nRUN true\n");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).expect("write");
    let (_, events) =
        soulbox_tests::build_template(&base, context.path(), "name=unreachable").await;
    let error = last(&events);
    assert_eq!(error["type"], "error", "{events:?}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(&nowhere) && message.contains("cannot reach"), "{message}");

    // Names: one of SoulBox's own, an invalid one, a missing one; an unknown parameter.
    for query in ["name=python", "name=Bad_Name", "tag=v1", "name=ok&colour=blue"] {
        let (status, events) = soulbox_tests::build_template(&base, context.path(), query).await;
        assert_eq!(status, 400, "{query}: {events:?}");
    }
    // A context that is not a tar archive.
    let url = format!("{base}/v1/templates/build?name=garbage");
    let headers = [("x-api-key", TEST_API_KEY)];
    let (status, _, body) =
        http_request_with("POST", &url, &headers, Some(b"not a tar".to_vec())).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // Without a key, nothing is built.
    let (status, _, _) = http_request_with("POST", &url, &[], Some(Vec::new())).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_playwright_script_in_a_sandbox_clicks_a_page_served_there_and_returns_screenshots() {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../native-fallback/templates/playwright");
    if !Path::new("/usr/bin/chromium").exists()
        || !template.join("node_modules/playwright-core").is_dir()
    {
        eprintln!(
            "SKIPPED: the Playwright template needs Debian's chromium and `npm ci` in {} (.ci/run does both)",
            template.display()
        );
        return;
    }
    if soulbox_tests::native_backend().is_none() {
        return;
    }
    let pythons = match crate::e2b_sdk::sdk_pythons() {
        Ok(pythons) => pythons,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let (base, data, _app) = soulbox_tests::serve_app().await;
    let (status, events) = soulbox_tests::build_template(&base, &template, "name=playwright").await;
    assert_eq!(status, 200);
    assert_eq!(last(&events)["type"], "done", "{events:?}");
    let screenshot = data.path().join("after.png");
    let env = [
        ("TEMPLATE", std::ffi::OsStr::new("playwright")),
        ("SCREENSHOT_OUT", screenshot.as_os_str()),
    ];
    let stdout = crate::e2b_sdk::sdk_script(&pythons[0], "playwright.py", &base, &env).await;
    eprintln!("{}", stdout.trim_end());
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
}

#[tokio::test]
async fn the_e2b_sdk_builds_a_template_through_e2b_s_own_api() {
    if soulbox_tests::native_backend().is_none() {
        return;
    }
    let pythons = match crate::e2b_sdk::sdk_pythons() {
        Ok(pythons) => pythons,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    for python in pythons {
        // A server of its own for each SDK: the first build is not cached.
        let (base, _data, _app) = soulbox_tests::serve_app().await;
        crate::e2b_sdk::sdk_script(&python, "template_build.py", &base, &[]).await;
    }
}
