//! E2B's own template-build API (the SDK's `Template.build`, "build system 2.0"), served by
//! the same builder: the SDK parses its template into steps on the client, uploads the files
//! of each `COPY` by their hash, starts the build and polls its status and logs.
//!
//! - `POST /v3/templates` `{"name": "app:tag", "tags"}`: 202 with the template's and the
//!   build's ids.
//! - `GET /templates/{id}/files/{hash}`: 201 `{"present", "url", "headers"}`; the SDK `PUT`s
//!   the files' tar to the URL (this server, with the caller's own key as the header).
//! - `POST /v2/templates/{id}/builds/{build}` with the steps: 202; the build runs.
//! - `GET /templates/{id}/builds/{build}/status?logsOffset=`: the status and the log entries
//!   after the offset (100 at most).
//! - `GET /templates/aliases/{alias}`: 200 (the team's), 403 (another team's, private) or 404.
//! - `POST /templates/tags` `{"target": "name:tag", "tags"}` (201), `DELETE /templates/tags`
//!   `{"name", "tags"}` (204), `GET /templates/{id or name}/tags`.
//!
//! Steps run as `user` unless they name `root` (as E2B's do); `fromImage` E2B's base image
//! (`e2bdev/base`) is SoulBox's `base`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use soulbox_native::build::BuildOptions;
use soulbox_native::dockerfile::{Action, BuildPlan, Step};
use soulbox_native::registry::RegistryAuth;
use tokio::io::AsyncWriteExt;

use super::{
    BuildJob, MAX_CONTEXT_BYTES, Reference, Templates, check_name, check_tag, parse_reference,
};
use crate::app::App;
use crate::auth::Principal;
use crate::e2b::{E2bBody, E2bError, body};

/// The most log entries one status answer carries (as E2B's API).
const MAX_LOG_ENTRIES: usize = 100;

/// E2B's default base image, which is SoulBox's `base` here.
const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// The routes of E2B's template-build API.
pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/v3/templates", post(request_build))
        .route("/templates/{template}/files/{hash}", get(file_link).put(upload_files))
        .route("/v2/templates/{template}/builds/{build}", post(start_build))
        .route("/templates/{template}/builds/{build}/status", get(build_status))
        .route("/templates/aliases/{alias}", get(alias_exists))
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{template}/tags", get(list_tags))
}

/// A build the SDK asked for, until it is done (then its logs stay for the SDK to read).
#[derive(Debug)]
struct E2bBuild {
    template_id: String,
    team: String,
    reference: Reference,
    extra_tags: Vec<String>,
    started: bool,
    status: &'static str,
    logs: Vec<Value>,
    reason: Option<Value>,
}

/// The builds asked for through E2B's API, by build id.
#[derive(Debug, Default)]
pub(crate) struct E2bBuilds {
    builds: Mutex<HashMap<String, E2bBuild>>,
}

impl E2bBuilds {
    fn with<T>(&self, build: &str, f: impl FnOnce(&mut E2bBuild) -> T) -> Option<T> {
        let mut builds = self.builds.lock().unwrap_or_else(PoisonError::into_inner);
        builds.get_mut(build).map(f)
    }
}

fn templates_of(app: &App) -> Result<&Arc<Templates>, E2bError> {
    app.templates().ok_or_else(|| {
        E2bError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "templates are built by the native tier, which is not available on this server",
        )
    })
}

fn bad(message: impl Into<String>) -> E2bError {
    E2bError::new(StatusCode::BAD_REQUEST, message)
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewBuild {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(flatten)]
    _other: HashMap<String, Value>,
}

/// `POST /v3/templates`.
async fn request_build(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    E2bBody(bytes): E2bBody,
) -> Result<Response, E2bError> {
    let templates = templates_of(&app)?;
    let request: NewBuild = body(&bytes)?;
    let name = request.name.or(request.alias).ok_or_else(|| bad("`name` is required"))?;
    let reference = parse_reference(&name).map_err(bad)?;
    if super::RESERVED_NAMES.contains(&reference.name.as_str()) {
        return Err(bad(format!("`{}` is one of SoulBox's own templates", reference.name)));
    }
    for tag in &request.tags {
        check_tag(tag).map_err(bad)?;
    }
    let existing = templates
        .record(&principal.team, &reference.name)
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let template_id = existing
        .as_ref()
        .map_or_else(|| format!("tpl_{}", uuid::Uuid::new_v4().simple()), |t| t.id.clone());
    let public = existing.is_some_and(|t| t.public);
    let build_id = super::new_build_id();
    let mut tags = vec![reference.tag.clone()];
    tags.extend(request.tags.iter().cloned());
    let answer = json!({
        "templateID": template_id,
        "buildID": build_id,
        "public": public,
        "names": [format!("{}:{}", reference.name, reference.tag)],
        "tags": tags,
        "aliases": [reference.name],
    });
    let build = E2bBuild {
        template_id,
        team: principal.team.clone(),
        reference,
        extra_tags: request.tags,
        started: false,
        status: "waiting",
        logs: Vec::new(),
        reason: None,
    };
    let mut builds = templates.e2b_builds.builds.lock().unwrap_or_else(PoisonError::into_inner);
    builds.insert(build_id, build);
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Where the files of `hash` are kept; `None` for a hash that is not a sha256.
fn files_path(templates: &Templates, hash: &str) -> Option<PathBuf> {
    let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| templates.dir.join("files").join(format!("{}.tar", hash.to_ascii_lowercase())))
}

/// Checks that `template` is a template id the team was given.
fn check_template(templates: &Templates, team: &str, template: &str) -> Result<(), E2bError> {
    let builds = templates.e2b_builds.builds.lock().unwrap_or_else(PoisonError::into_inner);
    let pending = builds.values().any(|b| b.template_id == template && b.team == team);
    drop(builds);
    let built = templates
        .all()
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .iter()
        .any(|t| t.id == template && t.team == team);
    if pending || built {
        Ok(())
    } else {
        Err(E2bError::new(StatusCode::NOT_FOUND, format!("template {template} not found")))
    }
}

/// `GET /templates/{id}/files/{hash}`: whether the files are here, and where to put them.
async fn file_link(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath((template, hash)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, E2bError> {
    let templates = templates_of(&app)?;
    check_template(templates, &principal.team, &template)?;
    let path = files_path(templates, &hash).ok_or_else(|| bad("the files hash is not a sha256"))?;
    let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1:3000");
    let scheme = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
    // The upload is this server's: the caller's own credentials go with it.
    let mut upload_headers = serde_json::Map::new();
    for name in ["x-api-key", "authorization"] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            upload_headers.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    let answer = json!({
        "present": path.is_file(),
        "url": format!("{scheme}://{host}/templates/{template}/files/{hash}"),
        "headers": upload_headers,
    });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `PUT /templates/{id}/files/{hash}`: the files of a `COPY`, as a (gzip) tar.
async fn upload_files(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath((template, hash)): UrlPath<(String, String)>,
    body: axum::body::Body,
) -> Result<StatusCode, E2bError> {
    let templates = templates_of(&app)?;
    check_template(templates, &principal.team, &template)?;
    let path = files_path(templates, &hash).ok_or_else(|| bad("the files hash is not a sha256"))?;
    let failed =
        |e: std::io::Error| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let partial = path.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(failed)?;
    }
    let mut file = tokio::fs::File::create(&partial).await.map_err(failed)?;
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(bad(format!("reading the files: {e}")));
            }
        };
        received += chunk.len() as u64;
        if received > MAX_CONTEXT_BYTES {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(E2bError::new(StatusCode::PAYLOAD_TOO_LARGE, "the files are too large"));
        }
        file.write_all(&chunk).await.map_err(failed)?;
    }
    file.flush().await.map_err(failed)?;
    tokio::fs::rename(&partial, &path).await.map_err(failed)?;
    Ok(StatusCode::CREATED)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBuild {
    from_image: Option<String>,
    from_template: Option<String>,
    from_image_registry: Option<Value>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    steps: Vec<E2bStep>,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct E2bStep {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    force: bool,
    files_hash: Option<String>,
}

fn shell(command: &str) -> Vec<String> {
    vec!["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()]
}

/// The build plan of E2B's steps, the files hashes its `COPY`s need, and whether a step
/// forces a rebuild.
fn plan_of(request: &StartBuild) -> Result<(BuildPlan, Vec<String>, bool), String> {
    let from = match (&request.from_template, &request.from_image) {
        (Some(template), _) => template.clone(),
        (None, Some(image)) if image.starts_with(E2B_BASE_IMAGE) => "base".to_owned(),
        (None, Some(image)) => image.clone(),
        (None, None) => return Err("`fromImage` or `fromTemplate` is required".to_owned()),
    };
    // E2B's steps run as `user` unless they say otherwise.
    let mut user = "user".to_owned();
    let mut steps = vec![Step { line: 0, action: Action::User(user.clone()) }];
    let mut hashes = Vec::new();
    let mut force = request.force;
    for (i, step) in request.steps.iter().enumerate() {
        let line = i + 1;
        force |= step.force;
        let arg = |n: usize| step.args.get(n).cloned().unwrap_or_default();
        let mut push = |action| steps.push(Step { line, action });
        match step.kind.as_str() {
            "RUN" => {
                let as_user = arg(1);
                if as_user.is_empty() || as_user == user {
                    push(Action::Run(shell(&arg(0))));
                } else {
                    push(Action::User(as_user));
                    push(Action::Run(shell(&arg(0))));
                    push(Action::User(user.clone()));
                }
            }
            "COPY" => {
                let hash = step.files_hash.clone().ok_or("a COPY step has no `filesHash`")?;
                hashes.push(hash);
                let chmod = match arg(3) {
                    mode if mode.is_empty() => None,
                    mode => Some(
                        u32::from_str_radix(&mode, 8).map_err(|_| format!("bad mode `{mode}`"))?,
                    ),
                };
                let chown = Some(arg(2)).filter(|owner| !owner.is_empty());
                push(Action::Copy { sources: vec![arg(0)], dest: arg(1), chown, chmod });
            }
            "ENV" => {
                let pairs = step
                    .args
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default()));
                push(Action::Env(pairs.collect()));
            }
            "WORKDIR" => push(Action::Workdir(arg(0))),
            "USER" => {
                user = arg(0);
                push(Action::User(user.clone()));
            }
            other => return Err(format!("step {line}: `{other}` steps are not supported")),
        }
    }
    let plan = BuildPlan {
        from,
        global_args: Vec::new(),
        steps,
        start: request.start_cmd.as_deref().map(shell),
        ready: request.ready_cmd.as_deref().map(shell),
    };
    Ok((plan, hashes, force))
}

fn registry_login(value: Option<&Value>) -> RegistryAuth {
    let login = value.filter(|v| v["type"] == "registry");
    match login.map(|v| (v["username"].as_str(), v["password"].as_str())) {
        Some((Some(username), Some(password))) => {
            RegistryAuth::Basic { username: username.to_owned(), password: password.to_owned() }
        }
        _ => RegistryAuth::Anonymous,
    }
}

/// `POST /v2/templates/{id}/builds/{build}`: starts the build.
async fn start_build(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath((template, build)): UrlPath<(String, String)>,
    E2bBody(bytes): E2bBody,
) -> Result<StatusCode, E2bError> {
    let templates = Arc::clone(templates_of(&app)?);
    let request: StartBuild = body(&bytes)?;
    let (plan, hashes, force) = plan_of(&request).map_err(bad)?;
    let owned = templates.e2b_builds.with(&build, |b| {
        (b.team == principal.team && b.template_id == template).then(|| {
            let first = !b.started;
            b.started = true;
            b.status = "building";
            (first, b.reference.clone(), b.extra_tags.clone())
        })
    });
    let Some(Some((first, reference, extra_tags))) = owned else {
        return Err(E2bError::new(StatusCode::NOT_FOUND, format!("build {build} not found")));
    };
    if !first {
        return Err(E2bError::new(StatusCode::CONFLICT, format!("build {build} has started")));
    }
    // The context: every COPY's files, unpacked side by side.
    let context = templates.dir.join("contexts").join(format!("e2b-{build}"));
    for hash in &hashes {
        let archive = files_path(&templates, hash)
            .filter(|path| path.is_file())
            .ok_or_else(|| bad(format!("the files {hash} were not uploaded")))?;
        let into = context.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&archive)?;
            soulbox_native::layers::unpack(std::io::BufReader::new(file), &into)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
        })
        .await
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| bad(format!("the files {hash} are not a tar archive: {e}")))?;
    }
    let job = BuildJob {
        team: principal.team.clone(),
        reference,
        extra_tags,
        public: None,
        plan,
        login: registry_login(request.from_image_registry.as_ref()),
        options: BuildOptions { no_cache: force, ..BuildOptions::default() },
        build_id: Some(build.clone()),
        template_id: Some(template),
    };
    tokio::spawn(async move {
        let builds = &templates.e2b_builds;
        let mut send = |event: Value| log_event(builds, &build, &event);
        let built = templates.run(job, &context, &mut send).await;
        let _ = std::fs::remove_dir_all(&context);
        builds.with(&build, |b| b.status = if built.is_some() { "ready" } else { "error" });
    });
    Ok(StatusCode::ACCEPTED)
}

/// Turns one of the builder's events into E2B log entries (and the failure's reason).
fn log_event(builds: &E2bBuilds, build: &str, event: &Value) {
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
    let step = event["line"].as_u64().or_else(|| event["number"].as_u64());
    let (level, messages) = match event["type"].as_str().unwrap_or_default() {
        "base" => ("info", vec![text("message")]),
        "step" => (
            "info",
            vec![format!("[{}/{}] {}", event["number"], event["total"], text("instruction"))],
        ),
        "cached" => ("info", vec!["CACHED".to_owned()]),
        "output" => ("info", vec![text("text")]),
        "done" => ("info", vec![format!("Build {} finished", text("build_id"))]),
        "error" => {
            let mut lines: Vec<String> = text("output").lines().map(str::to_owned).collect();
            lines.push(text("message"));
            ("error", lines)
        }
        _ => return,
    };
    builds.with(build, |b| {
        for message in messages {
            let mut entry = json!({ "timestamp": now(), "level": level, "message": message });
            if let Some(step) = step {
                entry["step"] = Value::String(step.to_string());
            }
            b.logs.push(entry);
        }
        if event["type"] == "error" {
            let mut reason = json!({ "message": text("message") });
            if let Some(line) = event["line"].as_u64() {
                reason["step"] = Value::String(line.to_string());
            }
            b.reason = Some(reason);
        }
    });
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    #[serde(rename = "logsOffset", default)]
    logs_offset: usize,
}

/// `GET /templates/{id}/builds/{build}/status`.
async fn build_status(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath((template, build)): UrlPath<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Result<Json<Value>, E2bError> {
    let templates = templates_of(&app)?;
    let answer = templates.e2b_builds.with(&build, |b| {
        (b.team == principal.team && b.template_id == template).then(|| {
            let entries: Vec<Value> =
                b.logs.iter().skip(query.logs_offset).take(MAX_LOG_ENTRIES).cloned().collect();
            let mut answer = json!({
                "templateID": b.template_id,
                "buildID": build,
                "status": b.status,
                "logs": [],
                "logEntries": entries,
            });
            if let Some(reason) = &b.reason {
                answer["reason"] = reason.clone();
            }
            answer
        })
    });
    match answer.flatten() {
        Some(answer) => Ok(Json(answer)),
        None => Err(E2bError::new(StatusCode::NOT_FOUND, format!("build {build} not found"))),
    }
}

/// `GET /templates/aliases/{alias}`.
async fn alias_exists(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath(alias): UrlPath<String>,
) -> Result<Response, E2bError> {
    let templates = templates_of(&app)?;
    check_name(&alias).map_err(bad)?;
    let all = templates
        .all()
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let found = all.iter().find(|t| t.name == alias && t.team == principal.team);
    if let Some(template) = found {
        let answer = json!({ "templateID": template.id, "public": template.public });
        return Ok(Json(answer).into_response());
    }
    if all.iter().any(|t| t.name == alias) {
        return Err(E2bError::new(
            StatusCode::FORBIDDEN,
            format!("template {alias} belongs to another team"),
        ));
    }
    Err(E2bError::new(StatusCode::NOT_FOUND, format!("template {alias} not found")))
}

fn internal(error: impl std::fmt::Display) -> E2bError {
    E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

#[derive(Debug, Deserialize)]
struct AssignTags {
    target: String,
    tags: Vec<String>,
}

/// `POST /templates/tags`: points more tags at the build `target` names.
async fn assign_tags(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    E2bBody(bytes): E2bBody,
) -> Result<Response, E2bError> {
    let templates = templates_of(&app)?;
    let request: AssignTags = body(&bytes)?;
    for tag in &request.tags {
        check_tag(tag).map_err(bad)?;
    }
    let target = parse_reference(&request.target).map_err(bad)?;
    let mut template =
        templates.record(&principal.team, &target.name).map_err(internal)?.ok_or_else(|| {
            E2bError::new(StatusCode::NOT_FOUND, format!("template {} not found", target.name))
        })?;
    let build = template.tags.get(&target.tag).cloned().ok_or_else(|| {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!("template {} has no tag {}", target.name, target.tag),
        )
    })?;
    for tag in &request.tags {
        template.tags.insert(tag.clone(), build.clone());
    }
    templates.save(&template).map_err(internal)?;
    let answer = json!({ "buildID": build, "tags": request.tags });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

#[derive(Debug, Deserialize)]
struct RemoveTags {
    name: String,
    tags: Vec<String>,
}

/// `DELETE /templates/tags`.
async fn remove_tags(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    E2bBody(bytes): E2bBody,
) -> Result<StatusCode, E2bError> {
    let templates = templates_of(&app)?;
    let request: RemoveTags = body(&bytes)?;
    let mut template =
        templates.record(&principal.team, &request.name).map_err(internal)?.ok_or_else(|| {
            E2bError::new(StatusCode::NOT_FOUND, format!("template {} not found", request.name))
        })?;
    for tag in &request.tags {
        template.tags.remove(tag);
    }
    templates.save(&template).map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id or name}/tags`.
async fn list_tags(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath(template): UrlPath<String>,
) -> Result<Json<Value>, E2bError> {
    let templates = templates_of(&app)?;
    let found = templates
        .all()
        .map_err(internal)?
        .into_iter()
        .find(|t| t.team == principal.team && (t.id == template || t.name == template))
        .ok_or_else(|| {
            E2bError::new(StatusCode::NOT_FOUND, format!("template {template} not found"))
        })?;
    let mut tags = Vec::new();
    for (tag, build) in &found.tags {
        let created = templates.build(build).map_err(internal)?.map_or(0, |b| b.created_at_ms);
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(created);
        let created_at = humantime::format_rfc3339_millis(at).to_string();
        tags.push(json!({ "tag": tag, "buildID": build, "createdAt": created_at }));
    }
    Ok(Json(Value::Array(tags)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2b_steps_become_a_plan_that_runs_as_user_unless_a_step_says_root() {
        let request: StartBuild = serde_json::from_value(json!({
            "fromImage": "e2bdev/base:latest",
            "steps": [
                {"type": "RUN", "args": ["apt-get install -y vim", "root"], "force": false},
                {"type": "COPY", "args": ["app.py", "/app/", "", "0755"], "force": false, "filesHash": "ab"},
                {"type": "ENV", "args": ["A", "1", "B", "2"], "force": false},
                {"type": "WORKDIR", "args": ["/app"], "force": false},
            ],
            "startCmd": "python app.py",
        }))
        .expect("a request");
        let (plan, hashes, force) = plan_of(&request).expect("a plan");
        assert_eq!(plan.from, "base");
        assert_eq!(hashes, ["ab"]);
        assert!(!force);
        let actions: Vec<&Action> = plan.steps.iter().map(|s| &s.action).collect();
        assert_eq!(actions[0], &Action::User("user".into()));
        assert_eq!(actions[1], &Action::User("root".into()));
        assert_eq!(actions[3], &Action::User("user".into()));
        assert!(matches!(actions[4], Action::Copy { chmod: Some(0o755), .. }));
        assert_eq!(plan.steps[4].line, 2, "each step keeps the SDK's step number");
        assert_eq!(plan.start, Some(shell("python app.py")));
        let unknown = json!({ "fromTemplate": "base", "steps": [{"type": "ONBUILD", "args": []}] });
        let unknown: StartBuild = serde_json::from_value(unknown).expect("a request");
        assert!(plan_of(&unknown).is_err());
    }
}
