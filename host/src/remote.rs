//! The commands that talk to a `soulbox serve`, local or remote: `soulbox auth`, `soulbox
//! keys`, `soulbox audit`, `soulbox usage`, `soulbox quota`. The server is `--api-url`, `SOULBOX_API_URL`, the one saved by
//! `soulbox auth login`, or `http://127.0.0.1:3000`; the key is `SOULBOX_API_KEY` or the saved
//! one. Credentials are saved in the user's config directory (`soulbox/credentials.json`),
//! readable by the user only (mode 0600).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[cfg(feature = "native")]
mod templates;
#[cfg(feature = "native")]
pub(crate) use templates::{TemplateCommand, template};

/// The server when none is named.
const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";

/// Exit code when the server refused the call or could not be reached.
const EXIT_REFUSED: u8 = 1;

/// Where to reach the server.
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// The server's URL (else `SOULBOX_API_URL`, the one saved by `soulbox auth login`, or
    /// http://127.0.0.1:3000).
    #[arg(long, env = "SOULBOX_API_URL", value_name = "URL")]
    api_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `soulbox auth`.
#[derive(Debug, Subcommand)]
pub(crate) enum AuthCommand {
    /// Check a key against the server and save both for later commands.
    #[command(after_help = "Examples:
  soulbox auth login --api-url http://10.0.0.5:3000 --key e2b_...
  echo \"$KEY\" | soulbox auth login")]
    Login {
        /// The key (read from standard input when absent).
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Forget the saved key.
    Logout,
}

/// `soulbox keys`.
#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Make a key; it is printed once and never again.
    #[command(after_help = "Examples:
  soulbox keys create --role member --name ci
  soulbox keys create --team research --role admin")]
    Create {
        /// viewer (reads), member (creates and runs) or admin (also manages keys).
        #[arg(long)]
        role: String,
        /// Another team (only for admins of the default team).
        #[arg(long)]
        team: Option<String>,
        /// A name, for people.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the team's keys (their ids, never the keys).
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a key by id; the next request with it is refused.
    Revoke {
        /// The key's id (as `list` shows it).
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `soulbox audit`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox audit --since 1h
  soulbox audit --team research --json")]
pub(crate) struct AuditArgs {
    /// How far back, such as 30m, 2h or 7d.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    since: std::time::Duration,
    /// Another team (only for admins of the default team).
    #[arg(long)]
    team: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

/// `soulbox usage`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox usage
  soulbox usage --team research --json")]
pub(crate) struct UsageArgs {
    /// Another team (only for admins of the default team).
    #[arg(long)]
    team: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

/// `soulbox quota`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox quota research                                  # show it
  soulbox quota research --max-sandboxes 20 --max-timeout 1h --max-memory-mib 2048")]
pub(crate) struct QuotaArgs {
    /// The team.
    team: String,
    /// Live sandboxes (running or paused) at once.
    #[arg(long)]
    max_sandboxes: Option<u32>,
    /// The longest timeout of a sandbox, such as 30m or 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_timeout: Option<std::time::Duration>,
    /// The largest memory limit of a sandbox, in MiB.
    #[arg(long)]
    max_memory_mib: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
}

/// What `soulbox auth login` saves.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Credentials {
    api_url: String,
    api_key: String,
}

fn credentials_path() -> anyhow::Result<PathBuf> {
    let config = dirs::config_dir().context("this user has no config directory (set HOME)")?;
    Ok(config.join("soulbox").join("credentials.json"))
}

fn saved_credentials() -> Option<Credentials> {
    let text = std::fs::read_to_string(credentials_path().ok()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// A client of one server with one key.
struct ApiClient {
    base: String,
    key: String,
}

impl ApiClient {
    /// The server and key to use, by the rules of the module docs.
    fn resolve(server: &ServerArgs) -> anyhow::Result<Self> {
        let saved = saved_credentials();
        let base = server
            .api_url
            .clone()
            .or_else(|| saved.as_ref().map(|c| c.api_url.clone()))
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        let key = std::env::var("SOULBOX_API_KEY").ok().or_else(|| saved.map(|c| c.api_key));
        let Some(key) = key else {
            bail!("no API key: run `soulbox auth login` or set SOULBOX_API_KEY");
        };
        Ok(Self { base: base.trim_end_matches('/').to_owned(), key })
    }

    /// One call; the status and the JSON answer (`null` when there is none).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let bytes = body.map(|b| serde_json::to_vec(&b)).transpose()?.unwrap_or_default();
        let url = format!("{}{path}", self.base);
        let request = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .with_context(|| format!("the URL {url}"))?;
        let response = client
            .request(request)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// A call that must succeed; a refusal becomes an error with the server's message.
    async fn expect(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, answer) = self.call(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(answer);
        }
        Err(refusal(status, &answer))
    }
}

/// A server's refusal as an error, with its message in either API's shape (E2B's
/// `{"message"}`, the native API's `{"error": {"message"}}`).
fn refusal(status: impl std::fmt::Display, answer: &Value) -> anyhow::Error {
    let message = answer["error"]["message"]
        .as_str()
        .or_else(|| answer["message"].as_str())
        .unwrap_or("no message");
    anyhow::anyhow!("the server answered {status}: {message}")
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The exit code of a remote command; an error is printed and becomes [`EXIT_REFUSED`].
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("soulbox: {error:#}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

pub(crate) async fn auth(command: AuthCommand) -> ExitCode {
    report(
        async {
            match command {
                AuthCommand::Login { key, server } => login(key, &server).await,
                AuthCommand::Logout => logout(),
            }
        }
        .await,
    )
}

async fn login(key: Option<String>, server: &ServerArgs) -> anyhow::Result<()> {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim().to_owned()
        }
    };
    let api_url = server.api_url.clone().unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    let client = ApiClient { base: api_url.trim_end_matches('/').to_owned(), key: key.clone() };
    client
        .expect("GET", "/v2/sandboxes?limit=1", None)
        .await
        .context("the key was not accepted")?;
    let path = credentials_path()?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let credentials = Credentials { api_url: client.base, api_key: key };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("saving {}", path.display()))?;
    serde_json::to_writer(&mut file, &credentials)?;
    if server.json {
        print_json(&json!({ "api_url": credentials.api_url, "saved": path }))?;
    } else {
        println!("logged in to {}; the key is saved in {}", credentials.api_url, path.display());
    }
    Ok(())
}

fn logout() -> anyhow::Result<()> {
    let path = credentials_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => println!("logged out: {} removed", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("not logged in"),
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

pub(crate) async fn keys(command: KeysCommand) -> ExitCode {
    report(
        async {
            match command {
                KeysCommand::Create { role, team, name, server } => {
                    let client = ApiClient::resolve(&server)?;
                    let mut body = json!({ "role": role, "name": name });
                    if let Some(team) = team {
                        body["team"] = json!(team);
                    }
                    let made = client.expect("POST", "/v1/keys", Some(body)).await?;
                    if server.json {
                        return print_json(&made);
                    }
                    let key = made["key"].as_str().unwrap_or_default();
                    let info = &made["info"];
                    eprintln!(
                        "made key {} ({} of team {}); it is shown only now:",
                        info["id"].as_str().unwrap_or_default(),
                        info["role"].as_str().unwrap_or_default(),
                        info["team"].as_str().unwrap_or_default(),
                    );
                    println!("{key}");
                    Ok(())
                }
                KeysCommand::List { server } => {
                    let client = ApiClient::resolve(&server)?;
                    let listed = client.expect("GET", "/v1/keys", None).await?;
                    if server.json {
                        return print_json(&listed);
                    }
                    println!("{:<14} {:<8} {:<8} {:<20} NAME", "ID", "ROLE", "STATE", "CREATED");
                    for key in listed.as_array().into_iter().flatten() {
                        println!(
                            "{:<14} {:<8} {:<8} {:<20} {}",
                            key["id"].as_str().unwrap_or_default(),
                            key["role"].as_str().unwrap_or_default(),
                            if key["revoked"].as_bool() == Some(true) {
                                "revoked"
                            } else {
                                "active"
                            },
                            time_of(key["created_at_ms"].as_u64()),
                            key["name"].as_str().unwrap_or_default(),
                        );
                    }
                    Ok(())
                }
                KeysCommand::Revoke { id, server } => {
                    let client = ApiClient::resolve(&server)?;
                    client.expect("DELETE", &format!("/v1/keys/{id}"), None).await?;
                    if server.json {
                        return print_json(&json!({ "revoked": id }));
                    }
                    println!("revoked key {id}");
                    Ok(())
                }
            }
        }
        .await,
    )
}

pub(crate) async fn audit(args: AuditArgs) -> ExitCode {
    report(
        async {
            let client = ApiClient::resolve(&args.server)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let since = now.saturating_sub(args.since).as_millis();
            let mut path = format!("/v1/audit?since={since}");
            if let Some(team) = &args.team {
                path.push_str(&format!(
                    "&team={}",
                    serde_urlencoded::to_string([("", team)])?.trim_start_matches('=')
                ));
            }
            let records = client.expect("GET", &path, None).await?;
            if args.server.json {
                return print_json(&records);
            }
            println!(
                "{:<24} {:<14} {:<10} {:<6} {:<16} ACTION",
                "WHEN", "KEY", "TEAM", "STATUS", "SOURCE"
            );
            for record in records.as_array().into_iter().flatten() {
                let at = record["at_ms"].as_u64().unwrap_or_default();
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at);
                println!(
                    "{:<24} {:<14} {:<10} {:<6} {:<16} {}",
                    humantime::format_rfc3339_millis(at).to_string(),
                    record["key_id"].as_str().unwrap_or_default(),
                    record["team"].as_str().unwrap_or_default(),
                    record["status"].as_u64().unwrap_or_default(),
                    record["source"].as_str().unwrap_or_default(),
                    record["action"].as_str().unwrap_or_default(),
                );
            }
            Ok(())
        }
        .await,
    )
}

pub(crate) async fn usage(args: UsageArgs) -> ExitCode {
    report(
        async {
            let client = ApiClient::resolve(&args.server)?;
            let mut path = "/v1/usage".to_owned();
            if let Some(team) = &args.team {
                path.push_str(&format!("?{}", serde_urlencoded::to_string([("team", team)])?));
            }
            let rows = client.expect("GET", &path, None).await?;
            if args.server.json {
                return print_json(&rows);
            }
            println!(
                "{:<12} {:<20} {:>9} {:>12} {:>10} {:>14} {:>10}",
                "TEAM", "TEMPLATE", "SANDBOXES", "SANDBOX-S", "CPU-S", "MEMORY-GIB-S", "EXECUTIONS"
            );
            for row in rows.as_array().into_iter().flatten() {
                println!(
                    "{:<12} {:<20} {:>9} {:>12.1} {:>10.1} {:>14.1} {:>10}",
                    row["team"].as_str().unwrap_or_default(),
                    row["template"].as_str().unwrap_or_default(),
                    row["sandboxes"].as_u64().unwrap_or_default(),
                    row["sandbox_seconds"].as_f64().unwrap_or_default(),
                    row["cpu_seconds"].as_f64().unwrap_or_default(),
                    row["memory_gib_seconds"].as_f64().unwrap_or_default(),
                    row["executions"].as_u64().unwrap_or_default(),
                );
            }
            Ok(())
        }
        .await,
    )
}

pub(crate) async fn quota(args: QuotaArgs) -> ExitCode {
    report(
        async {
            let client = ApiClient::resolve(&args.server)?;
            let path = format!("/v1/quotas/{}", args.team);
            let setting = args.max_sandboxes.is_some()
                || args.max_timeout.is_some()
                || args.max_memory_mib.is_some();
            if setting {
                let mut quota = client.expect("GET", &path, None).await?;
                if let Some(max) = args.max_sandboxes {
                    quota["max_live_sandboxes"] = json!(max);
                }
                if let Some(max) = args.max_timeout {
                    quota["max_timeout_secs"] = json!(max.as_secs());
                }
                if let Some(max) = args.max_memory_mib {
                    quota["max_memory_mib"] = json!(max);
                }
                client.expect("PUT", &path, Some(quota)).await?;
            }
            let quota = client.expect("GET", &path, None).await?;
            if args.server.json {
                return print_json(&quota);
            }
            let show = |field: &str| {
                quota[field].as_u64().map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
            };
            println!("team {}", args.team);
            println!("  live sandboxes   {}", show("max_live_sandboxes"));
            println!("  timeout (s)      {}", show("max_timeout_secs"));
            println!("  memory (MiB)     {}", show("max_memory_mib"));
            Ok(())
        }
        .await,
    )
}

/// `soulbox sandbox`.
#[derive(Debug, Subcommand)]
pub(crate) enum SandboxCommand {
    /// Make a sandbox; prints its id.
    #[command(after_help = "Examples:
  soulbox sandbox create
  soulbox sandbox create --template python --timeout 1h --json")]
    Create {
        /// The template: base, code-interpreter-v1, python, javascript, ruby.
        #[arg(long, default_value = "base")]
        template: String,
        /// How long it lives, such as 10m or 2h.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the team's sandboxes.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a sandbox.
    Info {
        /// The sandbox's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Pause a sandbox (its processes stop where they are; its files stay).
    Pause {
        /// The sandbox's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Resume a paused sandbox.
    Resume {
        /// The sandbox's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Open an interactive shell in a sandbox, like ssh (exits with the shell's code); with
    /// --pid, reattach to a terminal left running; with --web, print a link that opens the
    /// shell in a browser instead.
    #[command(after_help = "Examples:
  soulbox sandbox connect $ID
  soulbox sandbox connect $ID --pid 12      # a shell whose connection dropped
  soulbox sandbox connect $ID --web         # a link to the terminal in a browser")]
    Connect {
        /// The sandbox's id.
        id: String,
        /// Reattach to this terminal's process instead of starting a shell.
        #[arg(long, conflicts_with = "web")]
        pid: Option<u32>,
        /// Start the shell as the sandbox's root.
        #[arg(long, conflicts_with = "web")]
        root: bool,
        /// Print a link to the web terminal (with a token that opens it, for one sandbox only).
        #[arg(long)]
        web: bool,
        /// How long the link's token opens the terminal (e.g. 5m, 1h; at most 1h).
        #[arg(long, value_name = "DURATION", default_value = "5m", requires = "web")]
        ttl: humantime::Duration,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Kill a sandbox and remove its files.
    Kill {
        /// The sandbox's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `soulbox exec`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox exec $ID -- ls -la
  soulbox exec $ID -- sh -c 'make && ./test'
  soulbox exec -it $ID -- python3")]
pub(crate) struct ExecArgs {
    /// The sandbox's id.
    id: String,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    /// Run it as the sandbox's root.
    #[arg(long)]
    root: bool,
    /// Keep standard input open to it (with -t: type into it).
    #[arg(short, long)]
    interactive: bool,
    /// Run it on a terminal (with -i: interactively, as `docker exec -it`).
    #[arg(short, long)]
    tty: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `soulbox ps`.
#[derive(Debug, Args)]
pub(crate) struct PsArgs {
    /// The sandbox's id.
    id: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// `soulbox logs`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox logs $ID
  soulbox logs -f $ID")]
pub(crate) struct LogsArgs {
    /// The sandbox's id.
    id: String,
    /// Keep following what its processes write.
    #[arg(short, long)]
    follow: bool,
    #[command(flatten)]
    server: ServerArgs,
}

impl ApiClient {
    /// A call whose answer is read as it comes: the response. A sandbox's data plane takes
    /// its access token (in `headers`), not the API key.
    async fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let url = format!("{}{path}", self.base);
        let mut request = hyper::Request::builder().method(method).uri(&url);
        if !headers.iter().any(|(name, _)| *name == "e2b-sandbox-id") {
            request = request.header("authorization", format!("Bearer {}", self.key));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        client
            .request(request)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))
    }

    /// The data-plane headers of sandbox `id` (its access token comes from `connect`, which
    /// also resumes it if it was paused).
    async fn sandbox_headers(&self, id: &str) -> anyhow::Result<Vec<(String, String)>> {
        let connected =
            self.expect("POST", &format!("/v2/sandboxes/{id}/connect"), Some(json!({}))).await?;
        let token = connected["envdAccessToken"].as_str().unwrap_or_default().to_owned();
        Ok(vec![("e2b-sandbox-id".to_owned(), id.to_owned()), ("x-access-token".to_owned(), token)])
    }
}

fn time_of(ms: Option<u64>) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unwrap_or_default());
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(crate) async fn sandbox(command: SandboxCommand) -> ExitCode {
    report(
        async {
            match command {
                SandboxCommand::Create { template, timeout, server } => {
                    let client = ApiClient::resolve(&server)?;
                    let body = json!({ "templateID": template, "timeout": timeout.as_secs() });
                    let made = client.expect("POST", "/v2/sandboxes", Some(body)).await?;
                    if server.json {
                        return print_json(&made);
                    }
                    println!("{}", made["sandboxID"].as_str().unwrap_or_default());
                    Ok(())
                }
                SandboxCommand::List { server } => {
                    let client = ApiClient::resolve(&server)?;
                    let listed = client.expect("GET", "/v2/sandboxes", None).await?;
                    if server.json {
                        return print_json(&listed);
                    }
                    println!(
                        "{:<22} {:<20} {:<8} {:<22} ENDS",
                        "ID", "TEMPLATE", "STATE", "STARTED"
                    );
                    for sandbox in listed.as_array().into_iter().flatten() {
                        println!(
                            "{:<22} {:<20} {:<8} {:<22} {}",
                            sandbox["sandboxID"].as_str().unwrap_or_default(),
                            sandbox["templateID"].as_str().unwrap_or_default(),
                            sandbox["state"].as_str().unwrap_or_default(),
                            sandbox["startedAt"].as_str().unwrap_or_default(),
                            sandbox["endAt"].as_str().unwrap_or_default(),
                        );
                    }
                    Ok(())
                }
                SandboxCommand::Info { id, server } => {
                    let client = ApiClient::resolve(&server)?;
                    let info = client.expect("GET", &format!("/sandboxes/{id}"), None).await?;
                    if server.json {
                        return print_json(&info);
                    }
                    for field in
                        ["sandboxID", "templateID", "state", "startedAt", "endAt", "memoryMB"]
                    {
                        println!("{field:<11} {}", info[field].to_string().trim_matches('"'));
                    }
                    Ok(())
                }
                SandboxCommand::Pause { id, server } => {
                    simple(&server, "POST", &format!("/sandboxes/{id}/pause"), "paused", &id).await
                }
                SandboxCommand::Resume { id, server } => {
                    simple(&server, "POST", &format!("/sandboxes/{id}/resume"), "resumed", &id)
                        .await
                }
                SandboxCommand::Connect { id, web: true, ttl, server, .. } => {
                    let client = ApiClient::resolve(&server)?;
                    let body = json!({ "ttl_secs": ttl.as_secs() });
                    let path = format!("/v1/sandboxes/{id}/terminal/token");
                    let answer = client.expect("POST", &path, Some(body)).await?;
                    let url = format!("{}{}", client.base, answer["url"].as_str().unwrap_or("/"));
                    if server.json {
                        return print_json(&json!({ "url": url, "expires_at": answer["expires_at"] }));
                    }
                    println!("{url}");
                    eprintln!("(open it in a browser within {ttl}; the link opens this sandbox's terminal only)");
                    Ok(())
                }
                SandboxCommand::Connect { id, pid, root, server, .. } => {
                    let code = connect(&id, pid, root, &server).await?;
                    if code != 0 {
                        // The shell's own code, after the terminal is restored.
                        std::process::exit(i32::from(code));
                    }
                    Ok(())
                }
                SandboxCommand::Kill { id, server } => {
                    simple(&server, "DELETE", &format!("/sandboxes/{id}"), "killed", &id).await
                }
            }
        }
        .await,
    )
}

/// A call with no answer worth showing: says what was done.
async fn simple(
    server: &ServerArgs,
    method: &str,
    path: &str,
    done: &str,
    id: &str,
) -> anyhow::Result<()> {
    let client = ApiClient::resolve(server)?;
    client.expect(method, path, Some(json!({}))).await?;
    if server.json {
        return print_json(&json!({ "sandbox": id, "state": done }));
    }
    println!("{done} {id}");
    Ok(())
}

/// Runs a command in a sandbox, streaming its output; exits with its exit code.
pub(crate) async fn exec(args: ExecArgs) -> ExitCode {
    match run_exec(&args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("soulbox: {error:#}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

async fn run_exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    use base64::Engine;
    if args.tty {
        let code = terminal(&args.id, None, Some(&args.command), args.root, &args.server).await?;
        return Ok(ExitCode::from(code));
    }
    let client = ApiClient::resolve(&args.server)?;
    let mut headers = client.sandbox_headers(&args.id).await?;
    if args.root {
        let user = base64::engine::general_purpose::STANDARD.encode("root:");
        headers.push(("authorization".to_owned(), format!("Basic {user}")));
    }
    let code = client
        .run(
            &headers,
            &args.command,
            args.interactive,
            &mut |out: &[u8]| {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(out);
                let _ = stdout.flush();
            },
            &mut |err: &[u8]| {
                let _ = std::io::stderr().write_all(err);
            },
        )
        .await?;
    Ok(ExitCode::from(code))
}

impl ApiClient {
    /// Runs `argv` in a sandbox (with its data-plane `headers`), handing its output over as it
    /// comes; its exit code (128 + 9 when killed).
    async fn run(
        &self,
        headers: &[(String, String)],
        argv: &[String],
        forward_stdin: bool,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<u8> {
        use base64::Engine;
        let (cmd, rest) = argv.split_first().context("no command given")?;
        let message = serde_json::to_vec(
            &json!({ "process": { "cmd": cmd, "args": rest }, "stdin": forward_stdin }),
        )?;
        let mut feeder: Option<tokio::task::JoinHandle<()>> = None;
        let body = crate::envd::connect::envelope(0, &message).to_vec();
        let mut all: Vec<(&str, &str)> =
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.push(("content-type", "application/connect+json"));
        let response = self.open("POST", "/process.Process/Start", &all, body).await?;
        let mut incoming = response.into_body();
        let mut buffer = Vec::new();
        let decode =
            |text: &str| base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_default();
        while let Some(frame) = incoming.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            buffer.extend_from_slice(&data);
            for (flags, message) in take_frames(&mut buffer) {
                if flags & 2 != 0 {
                    if let Some(error) = message["error"]["message"].as_str() {
                        bail!("the command could not run: {error}");
                    }
                    continue;
                }
                let event = &message["event"];
                if let Some(pid) = event["start"]["pid"].as_u64()
                    && forward_stdin
                {
                    feeder = Some(tokio::spawn(feed_stdin(
                        ApiClient { base: self.base.clone(), key: self.key.clone() },
                        headers.to_vec(),
                        pid,
                    )));
                }
                if let Some(out) =
                    event["data"]["stdout"].as_str().or(event["data"]["pty"].as_str())
                {
                    on_stdout(&decode(out));
                }
                if let Some(err) = event["data"]["stderr"].as_str() {
                    on_stderr(&decode(err));
                }
                if event.get("end").is_some() {
                    if let Some(feeder) = feeder.take() {
                        feeder.abort();
                    }
                    let code = event["end"]["exitCode"].as_i64().unwrap_or(0);
                    // Killed by a signal: 128 + 9, as a shell reports it.
                    return Ok(if code < 0 { 137 } else { u8::try_from(code).unwrap_or(1) });
                }
            }
        }
        bail!("the stream ended without the command's end")
    }
}

/// Sends this process's standard input to process `pid` of a sandbox, then closes its input.
async fn feed_stdin(client: ApiClient, mut headers: Vec<(String, String)>, pid: u64) {
    use base64::Engine;
    use tokio::io::AsyncReadExt;
    headers.push(("content-type".to_owned(), "application/json".to_owned()));
    let all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut stdin = tokio::io::stdin();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match stdin.read(&mut chunk).await {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        let data = base64::engine::general_purpose::STANDARD.encode(&chunk[..n]);
        let message = json!({ "process": { "pid": pid }, "input": { "stdin": data } });
        let Ok(body) = serde_json::to_vec(&message) else { return };
        if client.open("POST", "/process.Process/SendInput", &all, body).await.is_err() {
            return;
        }
    }
    let Ok(body) = serde_json::to_vec(&json!({ "process": { "pid": pid } })) else { return };
    let _ = client.open("POST", "/process.Process/CloseStdin", &all, body).await;
}

pub(crate) async fn ps(args: PsArgs) -> ExitCode {
    report(
        async {
            let client = ApiClient::resolve(&args.server)?;
            let mut headers = client.sandbox_headers(&args.id).await?;
            headers.push(("content-type".to_owned(), "application/json".to_owned()));
            let borrowed: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let response =
                client.open("POST", "/process.Process/List", &borrowed, b"{}".to_vec()).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            let listed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if !status.is_success() {
                return Err(refusal(status, &listed));
            }
            if args.server.json {
                return print_json(&listed["processes"]);
            }
            println!("{:>7}  COMMAND", "PID");
            for process in listed["processes"].as_array().into_iter().flatten() {
                let config = &process["config"];
                let mut command = vec![config["cmd"].as_str().unwrap_or_default().to_owned()];
                command.extend(
                    config["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str().map(str::to_owned)),
                );
                println!("{:>7}  {}", process["pid"], command.join(" "));
            }
            Ok(())
        }
        .await,
    )
}

pub(crate) async fn logs(args: LogsArgs) -> ExitCode {
    report(
        async {
            let client = ApiClient::resolve(&args.server)?;
            let path = format!("/v1/sandboxes/{}/logs?follow={}", args.id, args.follow);
            let response = client.open("GET", &path, &[], Vec::new()).await?;
            let status = response.status();
            let mut incoming = response.into_body();
            if !status.is_success() {
                let body = incoming.collect().await?.to_bytes();
                let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                return Err(refusal(status, &answer));
            }
            let mut pending = Vec::new();
            while let Some(frame) = incoming.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let entry: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                    if args.server.json {
                        println!("{}", String::from_utf8_lossy(&line).trim_end());
                    } else if let Some(missed) = entry["missed"].as_u64() {
                        eprintln!("soulbox: {missed} chunks were missed (the log moved on)");
                    } else {
                        let text = entry["text"].as_str().unwrap_or_default();
                        for part in text.split_inclusive('\n') {
                            print!(
                                "{} {:>5} {:<6} {part}",
                                time_of(entry["at_ms"].as_u64()),
                                entry["pid"],
                                entry["stream"].as_str().unwrap_or_default()
                            );
                        }
                        if !text.ends_with('\n') {
                            println!();
                        }
                    }
                    std::io::stdout().flush()?;
                }
            }
            Ok(())
        }
        .await,
    )
}

/// `soulbox files`.
#[derive(Debug, Subcommand)]
pub(crate) enum FilesCommand {
    /// Send a local file to a sandbox (a progress bar on a terminal).
    #[command(after_help = "Examples:
  soulbox files upload $ID data.csv /home/user/data.csv")]
    Upload {
        /// The sandbox's id.
        id: String,
        /// The local file.
        local: PathBuf,
        /// Where in the sandbox (under /home/user or /tmp).
        remote: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Fetch a file of a sandbox (a progress bar on a terminal).
    #[command(after_help = "Examples:
  soulbox files download $ID /home/user/out.png out.png")]
    Download {
        /// The sandbox's id.
        id: String,
        /// The file in the sandbox.
        remote: String,
        /// Where to write it.
        local: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Send a local directory to a sandbox, only the files whose content differs there (by
    /// SHA-256); with --watch, keep sending changes.
    #[command(after_help = "Examples:
  soulbox files sync ./project $ID:/home/user/project
  soulbox files sync ./project $ID:/home/user/project --watch")]
    Sync {
        /// The local directory.
        local: PathBuf,
        /// The sandbox and the directory there, as ID:PATH.
        target: String,
        /// Keep watching the local directory and send what changes.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// A progress bar for `total` bytes on a terminal's standard error (hidden elsewhere).
fn transfer_bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = total.map_or_else(indicatif::ProgressBar::new_spinner, indicatif::ProgressBar::new);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

impl ApiClient {
    /// Sends `local` to `remote` in sandbox `id` as one streamed octet-stream upload.
    async fn upload(
        &self,
        headers: &[(String, String)],
        local: &std::path::Path,
        remote: &str,
    ) -> anyhow::Result<u64> {
        use futures::StreamExt;
        use http_body_util::StreamBody;
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("opening {}", local.display()))?;
        let size = file.metadata().await?.len();
        let bar = transfer_bar(Some(size), &format!("upload {}", local.display()));
        let progress = bar.clone();
        let chunks = file_chunks(file).map(move |chunk| {
            if let Ok(bytes) = &chunk {
                progress.inc(u64::try_from(bytes.len()).unwrap_or(0));
            }
            chunk.map(hyper::body::Frame::data)
        });
        let body = http_body_util::BodyExt::boxed(StreamBody::new(chunks));
        let client = Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();
        let query = serde_urlencoded::to_string([("path", remote)])?;
        let mut request = hyper::Request::builder()
            .method("POST")
            .uri(format!("{}/files?{query}", self.base))
            .header("content-type", "application/octet-stream")
            .header("content-length", size.to_string());
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = client.request(request.body(body)?).await.context("uploading")?;
        bar.finish_and_clear();
        let status = response.status();
        if !status.is_success() {
            let body = response.into_body().collect().await?.to_bytes();
            let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(refusal(status, &answer));
        }
        Ok(size)
    }
}

/// A file read as a stream of chunks.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buffer = vec![0u8; 256 << 10];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok(Bytes::from(buffer)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

pub(crate) async fn files(command: FilesCommand) -> ExitCode {
    report(
        async {
            match command {
                FilesCommand::Upload { id, local, remote, server } => {
                    let client = ApiClient::resolve(&server)?;
                    let headers = client.sandbox_headers(&id).await?;
                    let size = client.upload(&headers, &local, &remote).await?;
                    if server.json {
                        return print_json(&json!({ "path": remote, "bytes": size }));
                    }
                    println!("sent {} ({size} bytes) to {id}:{remote}", local.display());
                    Ok(())
                }
                FilesCommand::Download { id, remote, local, server } => {
                    let client = ApiClient::resolve(&server)?;
                    let headers = client.sandbox_headers(&id).await?;
                    let size = client.download(&headers, &remote, &local).await?;
                    if server.json {
                        return print_json(&json!({ "path": local, "bytes": size }));
                    }
                    println!("fetched {id}:{remote} ({size} bytes) to {}", local.display());
                    Ok(())
                }
                FilesCommand::Sync { local, target, watch, server } => {
                    let (id, remote) = target
                        .split_once(':')
                        .context("the target is ID:PATH, such as $ID:/home/user/project")?;
                    let client = ApiClient::resolve(&server)?;
                    let headers = client.sandbox_headers(id).await?;
                    sync_once(&client, &headers, &local, remote, server.json).await?;
                    if watch {
                        watch_and_sync(&client, &headers, &local, remote, server.json).await?;
                    }
                    Ok(())
                }
            }
        }
        .await,
    )
}

impl ApiClient {
    /// Fetches `remote` into `local` (written beside it first, then renamed: a failed
    /// download leaves nothing half-written).
    async fn download(
        &self,
        headers: &[(String, String)],
        remote: &str,
        local: &std::path::Path,
    ) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        let query = serde_urlencoded::to_string([("path", remote)])?;
        let all: Vec<(&str, &str)> =
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let response = self.open("GET", &format!("/files?{query}"), &all, Vec::new()).await?;
        let status = response.status();
        let total = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut incoming = response.into_body();
        if !status.is_success() {
            let body = incoming.collect().await?.to_bytes();
            let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(refusal(status, &answer));
        }
        let partial = local.with_extension("soulbox-partial");
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("writing {}", partial.display()))?;
        let bar = transfer_bar(total, &format!("download {remote}"));
        let mut written = 0u64;
        let copied: anyhow::Result<()> = async {
            while let Some(frame) = incoming.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                file.write_all(&data).await?;
                written += u64::try_from(data.len()).unwrap_or(0);
                bar.set_position(written);
            }
            file.flush().await?;
            Ok(())
        }
        .await;
        bar.finish_and_clear();
        if let Err(error) = copied {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
        tokio::fs::rename(&partial, local).await?;
        Ok(written)
    }
}

/// The SHA-256 (hex) of every file under `dir`, by path relative to it.
fn local_hashes(
    dir: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use sha2::{Digest, Sha256};
    let mut hashes = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in
            std::fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let relative = entry.path().strip_prefix(dir)?.to_string_lossy().into_owned();
                let mut hasher = Sha256::new();
                std::io::copy(&mut std::fs::File::open(entry.path())?, &mut hasher)?;
                hashes.insert(relative, crate::auth::hex(&hasher.finalize()));
            }
        }
    }
    Ok(hashes)
}

/// Sends the files of `local` whose content differs under `remote`; says how many.
async fn sync_once(
    client: &ApiClient,
    headers: &[(String, String)],
    local: &std::path::Path,
    remote: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let local_dir = local.to_owned();
    let ours = tokio::task::spawn_blocking(move || local_hashes(&local_dir)).await??;
    // What is there, hashed in the sandbox.
    let script = "cd \"$1\" 2>/dev/null && find . -type f -print0 | xargs -0 -r sha256sum";
    let argv: Vec<String> = ["sh", "-c", script, "sh", remote].map(str::to_owned).to_vec();
    let mut listing = Vec::new();
    client
        .run(
            headers,
            &argv,
            false,
            &mut |out: &[u8]| listing.extend_from_slice(out),
            &mut |_: &[u8]| {},
        )
        .await?;
    let theirs: std::collections::BTreeMap<String, String> = String::from_utf8_lossy(&listing)
        .lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(hash, path)| (path.trim_start_matches("./").to_owned(), hash.to_owned()))
        .collect();
    let mut sent = Vec::new();
    for (relative, hash) in &ours {
        if theirs.get(relative) == Some(hash) {
            continue;
        }
        let target = format!("{}/{relative}", remote.trim_end_matches('/'));
        client.upload(headers, &local.join(relative), &target).await?;
        sent.push(relative.clone());
    }
    if json_out {
        print_json(&json!({ "sent": sent, "unchanged": ours.len() - sent.len() }))?;
    } else {
        println!("sent {} changed file(s), {} unchanged", sent.len(), ours.len() - sent.len());
        for path in &sent {
            println!("  {path}");
        }
    }
    Ok(())
}

/// Watches `local` and syncs after each burst of changes, until interrupted.
async fn watch_and_sync(
    client: &ApiClient,
    headers: &[(String, String)],
    local: &std::path::Path,
    remote: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    use notify::{RecursiveMode, Watcher};
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changes.send(());
        }
    })?;
    watcher.watch(local, RecursiveMode::Recursive)?;
    eprintln!("watching {} (Ctrl-C to stop)", local.display());
    while changed.recv().await.is_some() {
        // A burst of changes (an editor's save) is one sync.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        while changed.try_recv().is_ok() {}
        sync_once(client, headers, local, remote, json_out).await?;
    }
    Ok(())
}

/// The local terminal in raw mode until dropped (restored even on an error).
struct RawTerminal {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawTerminal {
    fn enter() -> Self {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else { return Self { saved: None } };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The local terminal's size (80x24 when there is none).
fn local_size() -> (u16, u16) {
    terminal_size::terminal_size().map_or((80, 24), |(w, h)| (w.0, h.0))
}

/// Splits whole Connect envelopes off the front of `buffer`: (flags, message) each.
fn take_frames(buffer: &mut Vec<u8>) -> Vec<(u8, Value)> {
    let mut frames = Vec::new();
    while buffer.len() >= 5 {
        let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + len {
            break;
        }
        let message = serde_json::from_slice(&buffer[5..5 + len]).unwrap_or(Value::Null);
        frames.push((buffer[0], message));
        buffer.drain(..5 + len);
    }
    frames
}

/// An interactive shell on a terminal of the sandbox: local keys go to it, its screen comes
/// back, the window's size follows the local one. Its exit code.
async fn connect(
    id: &str,
    pid: Option<u32>,
    root: bool,
    server: &ServerArgs,
) -> anyhow::Result<u8> {
    terminal(id, pid, None, root, server).await
}

/// `command` (a login shell when `None`) on a terminal of the sandbox, or the terminal of
/// process `pid`, interactively. Its exit code.
async fn terminal(
    id: &str,
    pid: Option<u32>,
    command: Option<&[String]>,
    root: bool,
    server: &ServerArgs,
) -> anyhow::Result<u8> {
    use base64::Engine;
    use tokio::io::AsyncReadExt;
    let engine = base64::engine::general_purpose::STANDARD;
    let client = ApiClient::resolve(server)?;
    let mut headers = client.sandbox_headers(id).await?;
    if root {
        headers.push(("authorization".to_owned(), format!("Basic {}", engine.encode("root:"))));
    }
    let (cols, rows) = local_size();
    let (path, message) = match pid {
        Some(pid) => ("/process.Process/Connect", json!({ "process": { "pid": pid } })),
        None => {
            let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".to_owned());
            let (cmd, args) = match command.and_then(<[String]>::split_first) {
                Some((cmd, args)) => (cmd.clone(), args.to_vec()),
                None => ("/bin/bash".to_owned(), vec!["-i".to_owned(), "-l".to_owned()]),
            };
            let process = json!({ "cmd": cmd, "args": args, "envs": { "TERM": term } });
            (
                "/process.Process/Start",
                json!({ "process": process, "pty": { "size": { "cols": cols, "rows": rows } } }),
            )
        }
    };
    let body = crate::envd::connect::envelope(0, &serde_json::to_vec(&message)?).to_vec();
    let mut all: Vec<(&str, &str)> =
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.push(("content-type", "application/connect+json"));
    let response = client.open("POST", path, &all, body).await?;
    let mut incoming = response.into_body();
    let mut buffer = Vec::new();
    let _raw = RawTerminal::enter();
    let mut pid_seen = pid;
    let mut input_task: Option<tokio::task::JoinHandle<()>> = None;
    let unary_headers: Vec<(String, String)> = headers
        .iter()
        .cloned()
        .chain([("content-type".to_owned(), "application/json".to_owned())])
        .collect();
    let result = 'stream: loop {
        let Some(frame) = incoming.frame().await else {
            break Err(anyhow::anyhow!("the connection ended"));
        };
        let Ok(data) = frame?.into_data() else { continue };
        buffer.extend_from_slice(&data);
        for (flags, message) in take_frames(&mut buffer) {
            if flags & 2 != 0 {
                if let Some(error) = message["error"]["message"].as_str() {
                    break 'stream Err(anyhow::anyhow!("the terminal could not start: {error}"));
                }
                continue;
            }
            let event = &message["event"];
            if let Some(started) = event["start"]["pid"].as_u64() {
                let started = u32::try_from(started)?;
                pid_seen = Some(started);
                // Keys typed here go to the terminal; the window's size follows this one.
                let (client, headers) = (
                    ApiClient { base: client.base.clone(), key: client.key.clone() },
                    unary_headers.clone(),
                );
                input_task = Some(tokio::spawn(async move {
                    let mut stdin = tokio::io::stdin();
                    let mut resized = tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::window_change(),
                    )
                    .ok();
                    let mut keys = [0u8; 4096];
                    let all: Vec<(&str, &str)> =
                        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    loop {
                        let (path, message) = tokio::select! {
                            read = stdin.read(&mut keys) => match read {
                                Ok(n) if n > 0 => ("/process.Process/SendInput", json!({ "process": { "pid": started }, "input": { "pty": base64::engine::general_purpose::STANDARD.encode(&keys[..n]) } })),
                                _ => return,
                            },
                            Some(()) = async { match resized.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                                let (cols, rows) = local_size();
                                ("/process.Process/Update", json!({ "process": { "pid": started }, "pty": { "size": { "cols": cols, "rows": rows } } }))
                            }
                        };
                        let Ok(body) = serde_json::to_vec(&message) else { return };
                        if client.open("POST", path, &all, body).await.is_err() {
                            return;
                        }
                    }
                }));
            }
            if let Some(out) = event["data"]["pty"].as_str().or(event["data"]["stdout"].as_str()) {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&engine.decode(out).unwrap_or_default())?;
                stdout.flush()?;
            }
            if event.get("end").is_some() {
                let code = event["end"]["exitCode"].as_i64().unwrap_or(0);
                if let Some(task) = input_task.take() {
                    task.abort();
                }
                return Ok(if code < 0 { 137 } else { u8::try_from(code).unwrap_or(1) });
            }
        }
    };
    if let Some(task) = input_task.take() {
        task.abort();
    }
    drop(_raw);
    if let Some(pid) = pid_seen {
        eprintln!(
            "\r\nsoulbox: the terminal (pid {pid}) keeps running; reattach with `soulbox sandbox connect {id} --pid {pid}`"
        );
    }
    result
}
