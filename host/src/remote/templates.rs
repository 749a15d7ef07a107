//! `soulbox template`: build templates from Dockerfiles on a server, list, inspect, tag,
//! publish and delete them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::{ApiClient, ServerArgs, file_chunks, print_json, refusal, report, transfer_bar};

/// `soulbox template`.
#[derive(Debug, Subcommand)]
pub(crate) enum TemplateCommand {
    /// Build a template from a Dockerfile (no Docker needed: the steps run in SoulBox's
    /// native sandboxes); prints the build's steps and output as it goes.
    #[command(after_help = "Examples:
  soulbox template build -t my-app .
  soulbox template build -f docker/Dockerfile -t my-app:v2 --build-arg VERSION=2 .
  soulbox template build -t web --no-cache --disk-mib 8192 ./web

FROM may name `base` (SoulBox's default root), one of your templates, an image in a
registry (`debian:12`, `registry.example:5000/team/app:v1`), or a local image inside the
context: `oci:PATH[:TAG]` (an OCI layout) or `docker-archive:PATH` (a `docker save` file).")]
    Build {
        /// The template's name and tag (`latest` when none is given).
        #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
        name: String,
        /// The Dockerfile (default: CONTEXT/Dockerfile).
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        dockerfile: Option<PathBuf>,
        /// The build context: the directory COPY and ADD read from.
        #[arg(default_value = ".")]
        context: PathBuf,
        /// A build argument, NAME=VALUE (repeatable).
        #[arg(long = "build-arg", value_name = "NAME=VALUE")]
        build_args: Vec<String>,
        /// Run every step, even those built before.
        #[arg(long)]
        no_cache: bool,
        /// Let every team use the template.
        #[arg(long)]
        public: bool,
        /// Memory of each RUN step, in MiB.
        #[arg(long, value_name = "MIB")]
        memory_mib: Option<u64>,
        /// The most a RUN step may write, in MiB.
        #[arg(long, value_name = "MIB")]
        disk_mib: Option<u64>,
        /// The user for the registry of FROM (the password is read from
        /// SOULBOX_REGISTRY_PASSWORD).
        #[arg(long, value_name = "USER")]
        registry_user: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your team's templates and the public ones.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a template: tags, builds, layers, size, start command.
    Inspect {
        /// The template's name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Point a tag at one of a template's builds.
    Tag {
        /// The template's name.
        name: String,
        /// The build's id (see `soulbox template inspect`).
        build_id: String,
        /// The tag.
        tag: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Let every team use a template (or, with --private, only yours).
    Publish {
        /// The template's name.
        name: String,
        /// Make it private again.
        #[arg(long)]
        private: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a template and its builds (refused while sandboxes use it).
    Delete {
        /// The template's name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub(crate) async fn template(command: TemplateCommand) -> ExitCode {
    // A usage error, before anything is packed or sent.
    if let TemplateCommand::Build { build_args, .. } = &command
        && let Some(arg) = build_args.iter().find(|arg| !arg.contains('='))
    {
        eprintln!("soulbox: --build-arg {arg}: write NAME=VALUE");
        return ExitCode::from(2);
    }
    match command {
        TemplateCommand::Build { .. } => match build(command).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("soulbox: {error:#}");
                ExitCode::from(super::EXIT_REFUSED)
            }
        },
        other => report(manage(other).await),
    }
}

async fn manage(command: TemplateCommand) -> anyhow::Result<()> {
    let encode = |name: &str| -> String {
        serde_urlencoded::to_string([("", name)]).unwrap_or_default()[1..].to_owned()
    };
    match command {
        TemplateCommand::List { server } => {
            let client = ApiClient::resolve(&server)?;
            let listed = client.expect("GET", "/v1/templates", None).await?;
            if server.json {
                return print_json(&listed);
            }
            println!("{:<28} {:<16} {:<8} {:>10}  TAGS", "NAME", "TEAM", "PUBLIC", "SIZE");
            for template in listed.as_array().into_iter().flatten() {
                let tags: Vec<&str> = template["tags"]
                    .as_object()
                    .map(|tags| tags.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                println!(
                    "{:<28} {:<16} {:<8} {:>10}  {}",
                    template["name"].as_str().unwrap_or_default(),
                    template["team"].as_str().unwrap_or_default(),
                    template["public"].as_bool().unwrap_or_default(),
                    template["size_bytes"].as_u64().map(mib).unwrap_or_default(),
                    tags.join(","),
                );
            }
            Ok(())
        }
        TemplateCommand::Inspect { name, server } => {
            let client = ApiClient::resolve(&server)?;
            let template =
                client.expect("GET", &format!("/v1/templates/{}", encode(&name)), None).await?;
            if server.json {
                return print_json(&template);
            }
            println!("name     {}", template["name"].as_str().unwrap_or_default());
            println!("id       {}", template["id"].as_str().unwrap_or_default());
            println!("public   {}", template["public"]);
            for (tag, build) in template["tags"].as_object().into_iter().flatten() {
                println!("tag      {tag} -> {}", build.as_str().unwrap_or_default());
            }
            for build in template["builds"].as_array().into_iter().flatten() {
                println!();
                println!("build    {}", build["build_id"].as_str().unwrap_or_default());
                println!("  from     {}", build["from"].as_str().unwrap_or_default());
                println!("  created  {}", super::time_of(build["created_at_ms"].as_u64()));
                println!(
                    "  size     {}",
                    build["size_bytes"].as_u64().map(mib).unwrap_or_default()
                );
                println!("  start    {}", build["start"]);
                println!("  ready    {}", build["ready"]);
                println!("  workdir  {}", build["workdir"]);
                println!("  user     {}", build["user"].as_str().unwrap_or_default());
                for layer in build["layers"].as_array().into_iter().flatten() {
                    println!("  layer    {}", layer.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
        TemplateCommand::Tag { name, build_id, tag, server } => {
            let client = ApiClient::resolve(&server)?;
            let path = format!("/v1/templates/{}/tags/{}", encode(&name), encode(&tag));
            let answer = client.expect("PUT", &path, Some(json!({ "build_id": build_id }))).await?;
            if server.json {
                return print_json(&answer);
            }
            println!("{name}:{tag} -> {build_id}");
            Ok(())
        }
        TemplateCommand::Publish { name, private, server } => {
            let client = ApiClient::resolve(&server)?;
            let path = format!("/v1/templates/{}", encode(&name));
            let answer = client.expect("PATCH", &path, Some(json!({ "public": !private }))).await?;
            if server.json {
                return print_json(&answer);
            }
            println!("{name} is {}", if private { "private" } else { "public" });
            Ok(())
        }
        TemplateCommand::Delete { name, server } => {
            let client = ApiClient::resolve(&server)?;
            client.expect("DELETE", &format!("/v1/templates/{}", encode(&name)), None).await?;
            if server.json {
                return print_json(&json!({ "template": name, "deleted": true }));
            }
            println!("deleted {name}");
            Ok(())
        }
        TemplateCommand::Build { .. } => bail!("not a management command"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Where the Dockerfile goes in the context's archive when it lies outside the context.
const OUTSIDE_DOCKERFILE: &str = ".soulbox-dockerfile";

/// Packs `context` (and the Dockerfile, when it lies outside) into a gzip tar in a temporary
/// file, removed when dropped (also when packing fails part way); returns it and the
/// Dockerfile's path inside.
fn pack_context(context: &Path, dockerfile: &Path) -> anyhow::Result<(TempFile, String)> {
    let context = context
        .canonicalize()
        .with_context(|| format!("the build context {}", context.display()))?;
    let dockerfile = dockerfile
        .canonicalize()
        .with_context(|| format!("the Dockerfile {}", dockerfile.display()))?;
    let archive = TempFile(std::env::temp_dir().join(format!(
        "soulbox-context-{}-{}.tar.gz",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    let file = std::fs::File::create(&archive.0)
        .with_context(|| format!("creating {}", archive.0.display()))?;
    let gzip = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gzip);
    tar.follow_symlinks(false);
    let ignored = dockerignore(&context)?;
    let inside = dockerfile.strip_prefix(&context).ok().map(Path::to_path_buf);
    append_context(&mut tar, &context, Path::new(""), &ignored, inside.as_deref())
        .with_context(|| format!("packing the build context {}", context.display()))?;
    let inside = match inside {
        Some(relative) => relative.to_string_lossy().into_owned(),
        None => {
            tar.append_path_with_name(&dockerfile, OUTSIDE_DOCKERFILE)
                .with_context(|| format!("packing {}", dockerfile.display()))?;
            OUTSIDE_DOCKERFILE.to_owned()
        }
    };
    tar.into_inner()?.finish()?;
    Ok((archive, inside))
}

/// The context's `.dockerignore`, as Docker reads it: patterns relative to the context's root
/// (`**` for any depth, `!` to keep again, `#` comments).
fn dockerignore(context: &Path) -> anyhow::Result<ignore::gitignore::Gitignore> {
    let mut builder = ignore::gitignore::GitignoreBuilder::new(context);
    if let Ok(text) = std::fs::read_to_string(context.join(".dockerignore")) {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (keep, pattern) = match line.strip_prefix('!') {
                Some(pattern) => ("!", pattern),
                None => ("", line),
            };
            // Anchored at the root, as Docker matches them.
            let pattern = pattern.trim_start_matches("./").trim_start_matches('/');
            builder
                .add_line(None, &format!("{keep}/{pattern}"))
                .with_context(|| format!(".dockerignore: `{line}`"))?;
        }
    }
    Ok(builder.build()?)
}

/// Appends what `dir` (the context's `relative`) holds, but what `.dockerignore` leaves out
/// (never the Dockerfile).
fn append_context(
    tar: &mut tar::Builder<flate2::write::GzEncoder<std::fs::File>>,
    context: &Path,
    relative: &Path,
    ignored: &ignore::gitignore::Gitignore,
    dockerfile: Option<&Path>,
) -> std::io::Result<()> {
    let mut entries: Vec<std::fs::DirEntry> =
        std::fs::read_dir(context.join(relative))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = relative.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        if ignored.matched(&path, is_dir).is_ignore() && Some(path.as_path()) != dockerfile {
            continue;
        }
        tar.append_path_with_name(entry.path(), &path)?;
        if is_dir {
            append_context(tar, context, &path, ignored, dockerfile)?;
        }
    }
    Ok(())
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn build(command: TemplateCommand) -> anyhow::Result<ExitCode> {
    let TemplateCommand::Build {
        name,
        dockerfile,
        context,
        build_args,
        no_cache,
        public,
        memory_mib,
        disk_mib,
        registry_user,
        server,
    } = command
    else {
        bail!("not a build");
    };
    let client = ApiClient::resolve(&server)?;
    let (template, tag) = match name.rsplit_once(':') {
        Some((template, tag)) => (template.to_owned(), tag.to_owned()),
        None => (name.clone(), "latest".to_owned()),
    };
    let dockerfile = dockerfile.unwrap_or_else(|| context.join("Dockerfile"));
    let (archive, inside) = {
        let context = context.clone();
        tokio::task::spawn_blocking(move || pack_context(&context, &dockerfile)).await??
    };
    let mut query: Vec<(&str, String)> =
        vec![("name", template.clone()), ("tag", tag.clone()), ("dockerfile", inside)];
    if no_cache {
        query.push(("no_cache", "true".into()));
    }
    if public {
        query.push(("public", "true".into()));
    }
    if let Some(mib) = memory_mib {
        query.push(("memory_mib", mib.to_string()));
    }
    if let Some(mib) = disk_mib {
        query.push(("disk_mib", mib.to_string()));
    }
    query.extend(build_args.iter().map(|arg| ("build_arg", arg.clone())));
    let file = tokio::fs::File::open(&archive.0).await?;
    let size = file.metadata().await?.len();
    let bar = transfer_bar(Some(size), "sending the build context");
    let progress = bar.clone();
    let chunks = file_chunks(file).map(move |chunk| {
        if let Ok(bytes) = &chunk {
            progress.inc(u64::try_from(bytes.len()).unwrap_or(0));
        }
        chunk.map(hyper::body::Frame::data)
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let http = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();
    let mut request = hyper::Request::builder()
        .method("POST")
        .uri(format!("{}/v1/templates/build?{}", client.base, serde_urlencoded::to_string(&query)?))
        .header("authorization", format!("Bearer {}", client.key))
        .header("content-type", "application/gzip")
        .header("content-length", size.to_string());
    if let Some(user) = registry_user {
        use base64::Engine;
        let password = std::env::var("SOULBOX_REGISTRY_PASSWORD")
            .context("--registry-user needs the password in SOULBOX_REGISTRY_PASSWORD")?;
        let login = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request = request.header("x-registry-auth", login);
    }
    let response = http
        .request(request.body(body)?)
        .await
        .with_context(|| format!("cannot reach the server at {}", client.base))?;
    bar.finish_and_clear();
    let status = response.status();
    if !status.is_success() {
        let body = response.into_body().collect().await?.to_bytes();
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(refusal(status, &answer));
    }
    let mut body = response.into_body().into_data_stream();
    let mut pending = Vec::new();
    let mut outcome = None;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.context("the build's answer was cut short")?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else { continue };
            if server.json {
                println!("{event}");
            } else {
                show(&event);
            }
            if matches!(event["type"].as_str(), Some("done" | "error")) {
                outcome = Some(event);
            }
        }
    }
    match outcome {
        Some(event) if event["type"] == "done" => Ok(ExitCode::SUCCESS),
        Some(_) => Ok(ExitCode::from(super::EXIT_REFUSED)),
        None => bail!("the build's answer ended before the build did"),
    }
}

/// Prints one build event for people.
fn show(event: &Value) {
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
    match event["type"].as_str() {
        Some("base") => eprintln!("  {}", text("message")),
        Some("step") => eprintln!(
            "Step {}/{} (line {}): {}",
            event["number"],
            event["total"],
            event["line"],
            text("instruction")
        ),
        Some("cached") => eprintln!("  cached"),
        Some("output") => println!("  | {}", text("text")),
        Some("layer") => eprintln!("  layer {}", text("digest")),
        Some("done") => println!(
            "built {}:{} ({}, {} layers, {}, {:.1} s)",
            text("template"),
            text("tag"),
            text("build_id"),
            event["layers"],
            mib(event["size_bytes"].as_u64().unwrap_or_default()),
            event["duration_ms"].as_u64().unwrap_or_default() as f64 / 1000.0,
        ),
        Some("error") => {
            let output = text("output");
            if !output.is_empty() {
                eprintln!("{}", output.trim_end());
            }
            match event["line"].as_u64() {
                Some(line) => eprintln!(
                    "soulbox: the build failed at Dockerfile line {line}: {}",
                    text("message")
                ),
                None => eprintln!("soulbox: the build failed: {}", text("message")),
            }
        }
        _ => {}
    }
}
