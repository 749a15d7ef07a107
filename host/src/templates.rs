//! Templates built from Dockerfiles: their records, builds, tags and visibility, and the API
//! that builds and manages them.
//!
//! A template belongs to a team and has a name; each successful build is immutable and has
//! an id; tags (`latest` by default) point at builds and can be moved. A failed build leaves
//! no template behind (only the layers of its finished steps, content-addressed and shared).
//!
//! - `POST /v1/templates/build?name=&tag=&dockerfile=&no_cache=&public=&build_arg=K=V&memory_mib=&disk_mib=`
//!   with the build context as a tar (or gzip tar) body; the answer streams the build's
//!   events as JSON lines, the last `done` or `error`. `X-Registry-Auth: base64(user:password)`
//!   logs in to the registry of `FROM`.
//! - `GET /v1/templates`; `GET /v1/templates/{name}` (tags, builds, layers, size, start
//!   command); `DELETE /v1/templates/{name}` (refused while sandboxes use it);
//!   `PUT /v1/templates/{name}/tags/{tag}` `{"build_id"}`; `PATCH /v1/templates/{name}`
//!   `{"public": bool}`.
//!
//! `FROM` names `base` (SoulBox's default root: the host's `/usr`), a template of the team
//! (or a public one), `oci:PATH[:TAG]` or `docker-archive:PATH[:NAME:TAG]` (a path in the
//! build context), or an image in a registry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use soulbox_native::build::{
    BuildError, BuildEvent, BuildOptions, Builder, BuiltImage, in_context,
};
use soulbox_native::image::{
    ImageError, LayerStore, StoredImage, import_docker_archive, import_oci_layout,
};
use soulbox_native::registry::RegistryAuth;
use soulbox_native::{NativeTier, dockerfile};
use soulbox_runtime::{Store, StoreError, TemplateImage};
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::auth::Principal;
use crate::server::ApiError;

mod e2b;

/// The store's tree of templates, by `team\0name`.
const TEMPLATES: &str = "templates";
/// The store's tree of builds, by id.
const BUILDS: &str = "template_builds";

/// The largest build context accepted.
const MAX_CONTEXT_BYTES: u64 = 2 << 30;
/// The largest Dockerfile accepted.
const MAX_DOCKERFILE_BYTES: u64 = 1 << 20;
/// Builds that run at once; more wait.
const PARALLEL_BUILDS: usize = 2;

/// Names SoulBox's own templates have: no built template may take them.
const RESERVED_NAMES: [&str; 5] = ["base", "code-interpreter-v1", "python", "javascript", "ruby"];

/// A template: a named line of builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Its id.
    pub id: String,
    /// The team that owns it.
    pub team: String,
    /// Its name.
    pub name: String,
    /// Whether other teams may use it.
    pub public: bool,
    /// Tags, each naming a build.
    pub tags: BTreeMap<String, String>,
    /// When it was first built (ms since the epoch).
    pub created_at_ms: u64,
}

/// One successful, immutable build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Its id.
    pub build_id: String,
    /// The template's id.
    pub template_id: String,
    /// The template's team and name.
    pub team: String,
    /// The template's name.
    pub name: String,
    /// What `FROM` named.
    pub from: String,
    /// The image.
    pub image: BuiltImage,
    /// The bytes of its layers on disk.
    pub size_bytes: u64,
    /// How long the build took.
    pub duration_ms: u64,
    /// When it finished (ms since the epoch).
    pub created_at_ms: u64,
}

/// A template name and tag (`latest` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    name: String,
    tag: String,
}

fn parse_reference(text: &str) -> Result<Reference, String> {
    let (name, tag) = match text.rsplit_once(':') {
        Some((name, tag)) => (name, tag),
        None => (text, "latest"),
    };
    check_name(name)?;
    check_tag(tag)?;
    Ok(Reference { name: name.to_owned(), tag: tag.to_owned() })
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a template name: 1-63 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
        ))
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!("`{tag}` is not a tag: 1-128 of A-Z, a-z, 0-9, `.`, `_`, `-`"))
    }
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A new build id: a UUID, as E2B's are (its SDK parses them).
fn new_build_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn template_key(team: &str, name: &str) -> String {
    format!("{team}\u{0}{name}")
}

/// A template resolved for a sandbox or a build: its record and the build a tag names.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The template.
    pub template: TemplateRecord,
    /// The build.
    pub build: BuildRecord,
}

/// How a server builds templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateSettings {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The network of build steps: none, or the host's.
    pub build_network: soulbox_native::SandboxNetwork,
}

/// The templates of a server.
#[derive(Debug)]
pub struct Templates {
    store: Store,
    builder: Builder,
    dir: PathBuf,
    settings: TemplateSettings,
    /// The builds asked for through E2B's API.
    e2b_builds: e2b::E2bBuilds,
    /// A place for each build running.
    builds: tokio::sync::Semaphore,
}

impl Templates {
    /// The templates kept in `store`, with layers and builds under `dir`, built on `tier`.
    pub fn open(
        store: Store,
        dir: &Path,
        tier: Arc<NativeTier>,
        settings: TemplateSettings,
    ) -> anyhow::Result<Self> {
        let layers = LayerStore::open(dir.join("layers"))?;
        let builder = Builder::new(tier, layers, dir.join("builds"))?;
        let contexts = dir.join("contexts");
        let _ = std::fs::remove_dir_all(&contexts);
        std::fs::create_dir_all(&contexts)?;
        Ok(Self {
            store,
            builder,
            dir: dir.to_owned(),
            settings,
            e2b_builds: e2b::E2bBuilds::default(),
            builds: tokio::sync::Semaphore::new(PARALLEL_BUILDS),
        })
    }

    /// The same, built as `settings` say.
    pub fn with_settings(mut self, settings: TemplateSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The layer store.
    pub fn layers(&self) -> &LayerStore {
        self.builder.store()
    }

    fn record(&self, team: &str, name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.store.get(TEMPLATES, &template_key(team, name))
    }

    /// Saves `template`'s record.
    fn save(&self, template: &TemplateRecord) -> Result<(), StoreError> {
        self.store.put(TEMPLATES, &template_key(&template.team, &template.name), template)
    }

    /// Every template.
    pub fn all(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        self.store.all(TEMPLATES)
    }

    /// The build `id`.
    pub fn build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError> {
        self.store.get(BUILDS, id)
    }

    /// The template `reference` (`name[:tag]`) as `team` sees it: its own, else a public one.
    /// `Ok(None)` when there is none.
    pub fn resolve(&self, team: &str, reference: &str) -> Result<Option<Resolved>, ApiError> {
        let Ok(reference) = parse_reference(reference) else { return Ok(None) };
        let own = self.record(team, &reference.name).map_err(store_error)?;
        let template = match own {
            Some(template) => Some(template),
            None => self
                .all()
                .map_err(store_error)?
                .into_iter()
                .find(|t| t.public && t.name == reference.name),
        };
        let Some(template) = template else { return Ok(None) };
        let Some(build_id) = template.tags.get(&reference.tag) else {
            let tags: Vec<&str> = template.tags.keys().map(String::as_str).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "template {} has no tag `{}` (its tags: {})",
                    template.name,
                    reference.tag,
                    tags.join(", ")
                ),
            ));
        };
        let build = self.build(build_id).map_err(store_error)?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("build {build_id} is gone"))
        })?;
        Ok(Some(Resolved { template, build }))
    }

    /// What a sandbox of `build` starts with.
    pub fn sandbox_image(&self, build: &BuildRecord) -> Result<TemplateImage, ApiError> {
        let layers = self.layers().paths(&build.image.layers).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        if let Some(missing) = layers.iter().find(|path| !path.is_dir()) {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("a layer of build {} is missing: {}", build.build_id, missing.display()),
            ));
        }
        Ok(TemplateImage {
            build_id: build.build_id.clone(),
            layers,
            host_system: build.image.host_system,
            user: build.image.user(),
            workdir: build.image.config.workdir.clone(),
            env: build.image.config.env.iter().cloned().collect(),
        })
    }

    /// The base `from` names, for `team`'s build with `context`.
    async fn base(
        &self,
        team: &str,
        from: &str,
        context: &Path,
        login: &RegistryAuth,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<BuiltImage, String> {
        if from == "base" || from == "soulbox/base" {
            return Ok(BuiltImage::host_system());
        }
        if let Some(resolved) = self.resolve(team, from).map_err(|e| e.message().to_owned())? {
            progress(&format!("base: template {} build {}", from, resolved.build.build_id));
            return Ok(resolved.build.image);
        }
        // A local image in the context: an OCI layout or a `docker save` archive.
        type Import = fn(
            &LayerStore,
            &Path,
            Option<&str>,
            &mut dyn FnMut(&str),
        ) -> Result<StoredImage, ImageError>;
        let local = match from.split_once(':') {
            Some(("oci", rest)) => Some((import_oci_layout as Import, rest)),
            Some(("docker-archive", rest)) => Some((import_docker_archive as Import, rest)),
            _ => None,
        };
        let stored = match local {
            Some((import, rest)) => {
                let (path, reference) = match rest.split_once(':') {
                    Some((path, reference)) => (path, Some(reference.to_owned())),
                    None => (rest, None),
                };
                let path = in_context(context, path)?;
                let layers = self.layers().clone();
                let (image, lines) = tokio::task::spawn_blocking(move || {
                    let mut lines = Vec::new();
                    let mut record = |line: &str| lines.push(line.to_owned());
                    import(&layers, &path, reference.as_deref(), &mut record)
                        .map(|image| (image, lines))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                lines.iter().for_each(|line| progress(line));
                image
            }
            None => soulbox_native::registry::pull(
                self.layers(),
                from,
                login,
                &self.settings.insecure_registries,
                progress,
            )
            .await
            .map_err(|e| e.to_string())?,
        };
        Ok(BuiltImage { layers: stored.layers, config: stored.config, ..BuiltImage::default() })
    }

    /// Records a finished build and points its tags at it, making the template if it is new.
    fn record_build(
        &self,
        job: &BuildJob,
        image: BuiltImage,
        duration_ms: u64,
    ) -> Result<BuildRecord, StoreError> {
        let (team, reference) = (&job.team, &job.reference);
        let mut template = self.record(team, &reference.name)?.unwrap_or_else(|| TemplateRecord {
            id: job
                .template_id
                .clone()
                .unwrap_or_else(|| format!("tpl_{}", uuid::Uuid::new_v4().simple())),
            team: team.to_owned(),
            name: reference.name.clone(),
            public: false,
            tags: BTreeMap::new(),
            created_at_ms: now_ms(),
        });
        if let Some(public) = job.public {
            template.public = public;
        }
        let size_bytes = self
            .layers()
            .paths(&image.layers)
            .map(|paths| paths.iter().map(|p| dir_size(p)).sum())
            .unwrap_or(0);
        let build = BuildRecord {
            build_id: job.build_id.clone().unwrap_or_else(new_build_id),
            template_id: template.id.clone(),
            team: team.to_owned(),
            name: reference.name.clone(),
            from: job.plan.from.clone(),
            image,
            size_bytes,
            duration_ms,
            created_at_ms: now_ms(),
        };
        self.store.put(BUILDS, &build.build_id, &build)?;
        for tag in std::iter::once(&reference.tag).chain(&job.extra_tags) {
            template.tags.insert(tag.clone(), build.build_id.clone());
        }
        self.save(&template)?;
        Ok(build)
    }

    /// The builds of `template`, oldest first.
    fn builds_of(&self, template: &TemplateRecord) -> Result<Vec<BuildRecord>, StoreError> {
        let mut builds: Vec<BuildRecord> = self
            .store
            .all::<BuildRecord>(BUILDS)?
            .into_iter()
            .filter(|b| b.template_id == template.id)
            .collect();
        builds.sort_by_key(|b| b.created_at_ms);
        Ok(builds)
    }

    /// Removes `template` and its builds, then the layers no build and no live sandbox uses.
    fn delete(
        &self,
        template: &TemplateRecord,
        in_use: &BTreeSet<PathBuf>,
    ) -> Result<(), StoreError> {
        for build in self.builds_of(template)? {
            self.store.remove(BUILDS, &build.build_id)?;
        }
        self.store.remove(TEMPLATES, &template_key(&template.team, &template.name))?;
        let mut kept: BTreeSet<PathBuf> = in_use.clone();
        for build in self.store.all::<BuildRecord>(BUILDS)? {
            kept.extend(self.layers().paths(&build.image.layers).unwrap_or_default());
        }
        let layers = self.dir.join("layers").join("sha256");
        if let Ok(entries) = std::fs::read_dir(&layers) {
            for entry in entries.flatten() {
                if !kept.contains(&entry.path()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// How long a sandbox's ready check may take to pass.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the ready check runs until it passes.
const READY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Makes a new sandbox of `build` what its template says: its workspace gets what the build
/// left in the user's home, its start command runs (in the background, as a process of the
/// sandbox), and its ready check passes. On failure the caller kills the sandbox.
pub(crate) async fn start_sandbox(
    app: &App,
    sandbox_id: &str,
    build: &BuildRecord,
) -> Result<(), ApiError> {
    let manager = app.manager().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server keeps no sandboxes",
        )
    })?;
    let internal =
        |message: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message);
    let (sandbox, table) = manager.processes(sandbox_id).map_err(|e| internal(e.to_string()))?;
    let layers =
        sandbox.spec().image.as_ref().map(|image| image.layers.clone()).unwrap_or_default();
    let workspace = sandbox.workspace().to_owned();
    tokio::task::spawn_blocking(move || soulbox_native::image::seed_home(&layers, &workspace))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(format!("copying the template's home into the workspace: {e}")))?;
    if let Some(start) = &build.image.start {
        let request = soulbox_runtime::ProcessRequest {
            argv: start.clone(),
            tag: Some("start".to_owned()),
            ..soulbox_runtime::ProcessRequest::default()
        };
        table.start(app.dispatcher(), &sandbox, request).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "start_failed",
                format!("the template's start command {start:?} did not start: {e}"),
            )
        })?;
    }
    let Some(ready) = &build.image.ready else { return Ok(()) };
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    loop {
        let request = soulbox_runtime::ProcessRequest {
            argv: ready.clone(),
            tag: Some("ready-check".to_owned()),
            ..soulbox_runtime::ProcessRequest::default()
        };
        match table.start(app.dispatcher(), &sandbox, request).await {
            Ok((_, mut follower)) => {
                let mut output = Vec::new();
                while let Some(event) = follower.next().await {
                    match event {
                        soulbox_runtime::ProcessEvent::Stdout(bytes)
                        | soulbox_runtime::ProcessEvent::Stderr(bytes) => {
                            output.extend_from_slice(&bytes)
                        }
                        soulbox_runtime::ProcessEvent::End(
                            soulbox_runtime::ProcessEnd::Exited(0),
                        ) => {
                            return Ok(());
                        }
                        soulbox_runtime::ProcessEvent::End(end) => {
                            last = format!("{end:?}: {}", String::from_utf8_lossy(&output).trim());
                        }
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "not_ready",
                format!(
                    "the template's ready check {ready:?} did not pass within {} s (last: {last})",
                    READY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(READY_INTERVAL).await;
    }
}

/// One build to run: what, for whom, under which name.
#[derive(Debug)]
struct BuildJob {
    team: String,
    reference: Reference,
    /// More tags to point at the build.
    extra_tags: Vec<String>,
    /// Whether the template becomes public (or private); unchanged when `None`.
    public: Option<bool>,
    plan: dockerfile::BuildPlan,
    login: RegistryAuth,
    options: BuildOptions,
    /// The build's id, when it was given out before the build ran (E2B's API does that).
    build_id: Option<String>,
    /// The template's id, likewise, for a template that is new.
    template_id: Option<String>,
}

impl Templates {
    /// Runs `job` on `context` (waiting for a turn), sending its events as JSON (the last
    /// `done` or `error`); the build's record when it succeeded.
    async fn run(
        &self,
        job: BuildJob,
        context: &Path,
        send: &mut (dyn FnMut(Value) + Send),
    ) -> Option<BuildRecord> {
        let _turn = self.builds.acquire().await.ok()?;
        let began = Instant::now();
        let plan = &job.plan;
        let mut progress = |line: &str| send(json!({ "type": "base", "message": line }));
        let base = self.base(&job.team, &plan.from, context, &job.login, &mut progress).await;
        let base = match base {
            Ok(base) => base,
            Err(message) => {
                let message = format!("FROM {}: {message}", plan.from);
                send(json!({ "type": "error", "line": 1, "message": message }));
                return None;
            }
        };
        let mut events =
            |event: BuildEvent| send(serde_json::to_value(event).unwrap_or(Value::Null));
        let options = BuildOptions { network: self.settings.build_network, ..job.options.clone() };
        let built = self.builder.build(plan, base, context, &options, &mut events).await;
        let image = match built {
            Ok(image) => image,
            Err(BuildError::Step { line, message, output }) => {
                send(
                    json!({ "type": "error", "line": line, "message": message, "output": output }),
                );
                return None;
            }
            Err(error) => {
                send(json!({ "type": "error", "message": error.to_string() }));
                return None;
            }
        };
        let duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        match self.record_build(&job, image, duration_ms) {
            Ok(build) => {
                send(json!({
                    "type": "done",
                    "template": build.name,
                    "tag": job.reference.tag,
                    "build_id": build.build_id,
                    "layers": build.image.layers.len(),
                    "size_bytes": build.size_bytes,
                    "duration_ms": build.duration_ms,
                }));
                Some(build)
            }
            Err(error) => {
                send(json!({ "type": "error", "message": error.to_string() }));
                None
            }
        }
    }
}

/// The total size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_size(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn store_error(error: StoreError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn templates_of(app: &App) -> Result<&Arc<Templates>, ApiError> {
    app.templates().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "templates_unavailable",
            "templates are built by the native tier, which is not available on this server",
        )
    })
}

/// The routes of the templates API.
pub(crate) fn routes() -> Router<App> {
    e2b::routes()
        .route("/v1/templates/build", post(build))
        .route("/v1/templates", get(list))
        .route("/v1/templates/{name}", get(inspect).delete(delete).patch(update))
        .route("/v1/templates/{name}/tags/{tag}", put(set_tag))
}

/// The options of a build request.
#[derive(Debug, Default)]
struct BuildQuery {
    reference: Option<Reference>,
    dockerfile: String,
    public: Option<bool>,
    options: BuildOptions,
}

fn build_query(pairs: Vec<(String, String)>) -> Result<BuildQuery, ApiError> {
    let mut query = BuildQuery { dockerfile: "Dockerfile".to_owned(), ..BuildQuery::default() };
    let mut name = None;
    let mut tag = "latest".to_owned();
    let flag = |key: &str, value: &str| match value {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_request(format!("`{key}` is true or false"))),
    };
    let mib = |key: &str, value: &str| {
        value
            .parse::<u64>()
            .ok()
            .filter(|v| (16..=1 << 20).contains(v))
            .map(|v| v << 20)
            .ok_or_else(|| bad_request(format!("`{key}` is a number of MiB from 16")))
    };
    for (key, value) in pairs {
        match key.as_str() {
            "name" => name = Some(value),
            "tag" => tag = value,
            "dockerfile" => query.dockerfile = value,
            "no_cache" => query.options.no_cache = flag(&key, &value)?,
            "public" => query.public = Some(flag(&key, &value)?),
            "memory_mib" => query.options.memory_bytes = mib(&key, &value)?,
            "disk_mib" => query.options.disk_bytes = mib(&key, &value)?,
            "build_arg" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| bad_request("`build_arg` is NAME=VALUE"))?;
                query.options.build_args.insert(k.to_owned(), v.to_owned());
            }
            other => return Err(bad_request(format!("unknown parameter `{other}`"))),
        }
    }
    let name = name.ok_or_else(|| bad_request("`name` is required"))?;
    check_name(&name).map_err(bad_request)?;
    check_tag(&tag).map_err(bad_request)?;
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(bad_request(format!(
            "`{name}` is one of SoulBox's own templates; choose another name"
        )));
    }
    query.reference = Some(Reference { name, tag });
    Ok(query)
}

fn registry_login(headers: &HeaderMap) -> Result<RegistryAuth, ApiError> {
    use base64::Engine;
    let Some(value) = headers.get("x-registry-auth") else { return Ok(RegistryAuth::Anonymous) };
    let bad = || bad_request("X-Registry-Auth is base64 of `user:password`");
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(value.as_bytes()).map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = text.split_once(':').ok_or_else(bad)?;
    Ok(RegistryAuth::Basic { username: user.to_owned(), password: password.to_owned() })
}

/// Receives the build context into a directory of its own (removed when dropped).
struct Context {
    dir: PathBuf,
}

impl Drop for Context {
    fn drop(&mut self) {
        let dir = self.dir.clone();
        let archive = self.dir.with_extension("tar");
        // Unpacked as root, the files belong to the sandboxes' ids: removal needs no care.
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(archive);
    }
}

async fn receive_context(
    templates: &Templates,
    body: axum::body::Body,
) -> Result<Context, ApiError> {
    let base = templates.dir.join("contexts").join(uuid::Uuid::new_v4().simple().to_string());
    let context = Context { dir: base.clone() };
    let archive = base.with_extension("tar");
    let failed = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("receiving the build context: {e}"),
        )
    };
    let mut file = tokio::fs::File::create(&archive).await.map_err(failed)?;
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("reading the build context: {e}")))?;
        received += chunk.len() as u64;
        if received > MAX_CONTEXT_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "context_too_large",
                format!(
                    "the build context is larger than {} MiB; leave out what the build does not need",
                    MAX_CONTEXT_BYTES >> 20
                ),
            ));
        }
        file.write_all(&chunk).await.map_err(failed)?;
    }
    file.flush().await.map_err(failed)?;
    drop(file);
    let into = base.clone();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&archive)?;
        soulbox_native::layers::unpack(std::io::BufReader::new(file), &into)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    })
    .await
    .map_err(|e| failed(std::io::Error::other(e.to_string())))?
    .map_err(|e| bad_request(format!("the build context is not a tar archive: {e}")))?;
    Ok(context)
}

/// `POST /v1/templates/build`.
async fn build(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let templates = Arc::clone(templates_of(&app)?);
    let query = build_query(pairs)?;
    let login = registry_login(&headers)?;
    let context = receive_context(&templates, body).await?;
    let dockerfile_path = in_context(&context.dir, &query.dockerfile).map_err(bad_request)?;
    let too_large =
        std::fs::metadata(&dockerfile_path).is_ok_and(|m| m.len() > MAX_DOCKERFILE_BYTES);
    let text =
        std::fs::read_to_string(&dockerfile_path).ok().filter(|_| !too_large).ok_or_else(|| {
            bad_request(format!("the build context has no Dockerfile `{}`", query.dockerfile))
        })?;
    let plan = dockerfile::plan(&text)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_dockerfile", e.to_string()))?;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let job = BuildJob {
        team: principal.team.clone(),
        reference: query
            .reference
            .clone()
            .unwrap_or_else(|| Reference { name: String::new(), tag: "latest".into() }),
        extra_tags: Vec::new(),
        public: query.public,
        plan,
        login,
        options: query.options,
        build_id: None,
        template_id: None,
    };
    tokio::spawn(async move {
        let context = context;
        let mut send = |value: Value| {
            let _ = sender.send(value);
        };
        templates.run(job, &context.dir, &mut send).await;
    });
    let lines = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver).map(|value| {
        let mut line = serde_json::to_vec(&value).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// A template as the API shows it.
fn template_json(template: &TemplateRecord, builds: &[BuildRecord]) -> Value {
    let latest =
        template.tags.get("latest").and_then(|id| builds.iter().find(|b| &b.build_id == id));
    json!({
        "id": template.id,
        "name": template.name,
        "team": template.team,
        "public": template.public,
        "tags": template.tags,
        "created_at_ms": template.created_at_ms,
        "builds": builds.iter().map(|b| json!({
            "build_id": b.build_id,
            "from": b.from,
            "layers": b.image.layers,
            "size_bytes": b.size_bytes,
            "start": b.image.start,
            "ready": b.image.ready,
            "env": b.image.config.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "workdir": b.image.config.workdir,
            "user": b.image.user().name(),
            "duration_ms": b.duration_ms,
            "created_at_ms": b.created_at_ms,
        })).collect::<Vec<_>>(),
        "size_bytes": latest.map(|b| b.size_bytes),
    })
}

/// `GET /v1/templates`: the team's templates and the public ones.
async fn list(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let templates = templates_of(&app)?;
    let mut shown = Vec::new();
    for template in templates.all().map_err(store_error)? {
        if template.team == principal.team || template.public {
            let builds = templates.builds_of(&template).map_err(store_error)?;
            shown.push(template_json(&template, &builds));
        }
    }
    Ok(Json(Value::Array(shown)))
}

fn own_template(templates: &Templates, team: &str, name: &str) -> Result<TemplateRecord, ApiError> {
    templates.record(team, name).map_err(store_error)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no template {name} in team {team}"),
        )
    })
}

/// `GET /v1/templates/{name}`.
async fn inspect(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let templates = templates_of(&app)?;
    let template = match templates.resolve(&principal.team, &name)? {
        Some(resolved) => resolved.template,
        None => own_template(templates, &principal.team, &name)?,
    };
    let builds = templates.builds_of(&template).map_err(store_error)?;
    Ok(Json(template_json(&template, &builds)))
}

/// `DELETE /v1/templates/{name}`: refused while a sandbox uses one of its builds.
async fn delete(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let templates = templates_of(&app)?;
    let template = own_template(templates, &principal.team, &name)?;
    let manager = app.manager().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server keeps no sandboxes",
        )
    })?;
    let builds: BTreeSet<String> = templates
        .builds_of(&template)
        .map_err(store_error)?
        .into_iter()
        .map(|b| b.build_id)
        .collect();
    let mut in_use = BTreeSet::new();
    let mut users = Vec::new();
    for record in manager.live_records() {
        if let Some(image) = &record.image {
            in_use.extend(image.layers.iter().cloned());
            if builds.contains(&image.build_id) {
                users.push(record.id.to_string());
            }
        }
    }
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "template_in_use",
            format!("template {name} is used by sandboxes {}; kill them first", users.join(", ")),
        ));
    }
    templates.delete(&template, &in_use).map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagRequest {
    build_id: String,
}

/// `PUT /v1/templates/{name}/tags/{tag}` `{"build_id"}`: points the tag at one of the
/// template's builds.
async fn set_tag(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath((name, tag)): UrlPath<(String, String)>,
    Json(request): Json<TagRequest>,
) -> Result<Json<Value>, ApiError> {
    let templates = templates_of(&app)?;
    check_tag(&tag).map_err(bad_request)?;
    let mut template = own_template(templates, &principal.team, &name)?;
    let build = templates.build(&request.build_id).map_err(store_error)?;
    if build.is_none_or(|b| b.template_id != template.id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("template {name} has no build {}", request.build_id),
        ));
    }
    template.tags.insert(tag, request.build_id);
    templates.save(&template).map_err(store_error)?;
    Ok(Json(json!({ "name": template.name, "tags": template.tags })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    public: bool,
}

/// `PATCH /v1/templates/{name}` `{"public"}`.
async fn update(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    UrlPath(name): UrlPath<String>,
    Json(request): Json<UpdateRequest>,
) -> Result<Json<Value>, ApiError> {
    let templates = templates_of(&app)?;
    let mut template = own_template(templates, &principal.team, &name)?;
    template.public = request.public;
    templates.save(&template).map_err(store_error)?;
    Ok(Json(json!({ "name": template.name, "public": template.public })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_template_and_a_tag() {
        let parsed = parse_reference("my-app").expect("valid");
        assert_eq!((parsed.name.as_str(), parsed.tag.as_str()), ("my-app", "latest"));
        let parsed = parse_reference("my-app:v1.2").expect("valid");
        assert_eq!((parsed.name.as_str(), parsed.tag.as_str()), ("my-app", "v1.2"));
        assert!(parse_reference("My-App").is_err());
        assert!(parse_reference("app:").is_err());
        assert!(parse_reference("../x").is_err());
    }
}
