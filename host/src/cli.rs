//! The command line: `soulbox langs`, `soulbox run`, `soulbox serve`, and the commands that
//! talk to a server (`soulbox auth`, `soulbox keys`, `soulbox audit`, in [`crate::remote`]).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use soulbox_runtime::{
    ExecEvent, ExecRequest, Language, LanguageStatus, Limits, SandboxSpec, Tier, TierPreference,
};

use crate::app::{App, default_data_dir};

/// Exit code for a usage or setup error (bad flags, unknown language, missing pack).
const EXIT_USAGE: u8 = 2;
/// Exit code after Ctrl-C, as a shell reports SIGINT.
const EXIT_INTERRUPTED: u8 = 130;
/// Exit code when SoulBox itself failed.
const EXIT_INTERNAL: u8 = 70;

/// SoulBox runs untrusted code: Python, JavaScript and Ruby in WebAssembly, native toolchains in
/// Linux namespaces, behind an E2B-compatible API.
#[derive(Debug, Parser)]
#[command(name = "soulbox", version, propagate_version = true, after_help = EXAMPLES)]
struct Cli {
    /// Where packs, caches and sandboxes live.
    #[arg(long, global = true, env = "SOULBOX_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  soulbox langs install                 install every language pack
  soulbox run --lang python -c 'print(6 * 7)'
  soulbox run --lang js script.js --json
  soulbox serve --listen 127.0.0.1:3000
  soulbox auth login --api-url http://127.0.0.1:3000 --key e2b_...
  soulbox keys create --role member --name ci";

#[derive(Debug, Subcommand)]
enum Command {
    /// Install and list language packs.
    #[command(subcommand)]
    Langs(LangsCommand),
    /// Run code in a fresh sandbox and print what it prints; exits with the code's exit code.
    Run(RunArgs),
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Save a server's URL and a key for the commands below, or forget them.
    #[command(subcommand)]
    Auth(crate::remote::AuthCommand),
    /// Make, list and revoke API keys (admins).
    #[command(subcommand)]
    Keys(crate::remote::KeysCommand),
    /// Read the audit log (admins).
    Audit(crate::remote::AuditArgs),
    /// What a team's sandboxes used, by template (admins).
    Usage(crate::remote::UsageArgs),
    /// Show or set a team's quota (setting: admins of the default team).
    Quota(crate::remote::QuotaArgs),
    /// Create, list, show, pause, resume and kill sandboxes of a server.
    #[command(subcommand)]
    Sandbox(crate::remote::SandboxCommand),
    /// Run a command in a sandbox; exits with its exit code.
    Exec(crate::remote::ExecArgs),
    /// A WASM worker process of `soulbox serve` (started by it, never by hand): runs kernels
    /// for the server over the socket on its standard input.
    #[cfg(feature = "wasm")]
    #[command(hide = true)]
    WasmWorker {
        /// Kernels it may hold at once.
        #[arg(long)]
        max_kernels: u32,
    },
    /// List the processes running in a sandbox.
    Ps(crate::remote::PsArgs),
    /// Show (and with -f follow) what a sandbox's processes write.
    Logs(crate::remote::LogsArgs),
    /// Upload, download and sync files of a sandbox.
    #[command(subcommand)]
    Files(crate::remote::FilesCommand),
    /// Build templates from Dockerfiles; list, inspect, tag, publish and delete them.
    #[cfg(feature = "native")]
    #[command(subcommand)]
    Template(crate::remote::TemplateCommand),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  soulbox completions bash > /etc/bash_completion.d/soulbox
  soulbox completions zsh > \"${fpath[1]}/_soulbox\"
  soulbox completions fish > ~/.config/fish/completions/soulbox.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum LangsCommand {
    /// Fetch, verify, pre-initialise and precompile packs (all when none are named).
    Install {
        /// Languages to install: python, javascript, ruby.
        languages: Vec<String>,
    },
    /// Show every known pack and whether it is installed.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  soulbox run --lang python -c 'import numpy; numpy.arange(5).sum()'
  soulbox run --lang ruby hello.rb
  echo 'console.log(1)' > a.js && soulbox run --lang js a.js --json
  soulbox run --lang c main.c
  soulbox run --lang bash -c 'uname -a; ls /usr/bin | wc -l'")]
struct RunArgs {
    /// The language: python, javascript (js), ruby (rb) in WebAssembly; bash, sh, c, cpp,
    /// rust, go, java, node, python-native natively (`soulbox langs list` shows what is
    /// installed).
    #[arg(long, short = 'l')]
    lang: String,
    /// The code to run.
    #[arg(short = 'c', value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// A file with the code to run.
    #[arg(value_name = "FILE", required_unless_present = "code")]
    file: Option<PathBuf>,
    /// Print one JSON object with the result instead of streaming the output.
    #[arg(long)]
    json: bool,
    /// Wall-clock limit in milliseconds.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Memory limit in MiB.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Environment variables, as KEY=VALUE.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Which tier to use.
    #[arg(long, value_enum, default_value = "auto")]
    tier: TierArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TierArg {
    Auto,
    Wasm,
    Native,
}

fn parse_env(pair: &str) -> Result<(String, String), String> {
    pair.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{pair}` is not KEY=VALUE"))
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000", env = "SOULBOX_LISTEN")]
    listen: SocketAddr,
    /// Do not install missing language packs at start.
    #[arg(long)]
    no_install: bool,
    /// An API key (`e2b_` and 40 hex digits) registered as an admin of the default team.
    /// Without it, the first start makes one and prints it once.
    #[arg(long, env = "SOULBOX_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// An OpenID Connect issuer whose tokens are accepted (its `iss`); needs the two below.
    #[arg(long, env = "SOULBOX_OIDC_ISSUER", requires_all = ["oidc_audience", "oidc_jwks_url"])]
    oidc_issuer: Option<String>,
    /// The audience (`aud`) its tokens must carry.
    #[arg(long, env = "SOULBOX_OIDC_AUDIENCE")]
    oidc_audience: Option<String>,
    /// Where its signing keys (JWKS) are, fetched at start.
    #[arg(long, env = "SOULBOX_OIDC_JWKS_URL")]
    oidc_jwks_url: Option<String>,
    /// Live sandboxes at once; creates past it are refused with 429.
    #[arg(long, env = "SOULBOX_MAX_SANDBOXES", default_value_t = crate::admission::DEFAULT_MAX_SANDBOXES)]
    max_sandboxes: usize,
    /// Live sandboxes of one team at once (a team's quota may lower its own).
    #[arg(long, env = "SOULBOX_MAX_SANDBOXES_PER_TEAM")]
    max_sandboxes_per_team: Option<usize>,
    /// Executions (cells, commands starting, runs) at once; past it, requests wait in line.
    #[arg(long, env = "SOULBOX_MAX_EXECUTIONS", default_value_t = crate::admission::DEFAULT_MAX_EXECUTIONS)]
    max_executions: usize,
    /// Executions of one team at once.
    #[arg(long, env = "SOULBOX_MAX_EXECUTIONS_PER_TEAM")]
    max_executions_per_team: Option<usize>,
    /// How long a request waits in line for an execution before it is refused with 429.
    #[arg(long, env = "SOULBOX_QUEUE_TIMEOUT", default_value = "2s", value_name = "DURATION")]
    queue_timeout: humantime::Duration,
    /// New sandboxes and executions are refused (503) while less memory than this is
    /// available, in MiB (default: 256 MiB or a twentieth of the host's memory, if more).
    #[arg(long, env = "SOULBOX_MIN_FREE_MEMORY_MIB", value_name = "MIB")]
    min_free_memory_mib: Option<u64>,
    /// Worker processes that WASM kernels run in (default: one per CPU); 0 runs them on the
    /// server's own threads.
    #[arg(long, env = "SOULBOX_WASM_WORKERS", value_name = "N")]
    wasm_workers: Option<usize>,
    /// WASM kernels alive at once (each live sandbox holds one per language it ran); cells
    /// that need one more are refused with 429.
    #[arg(long, env = "SOULBOX_MAX_KERNELS", default_value_t = crate::app::DEFAULT_MAX_KERNELS)]
    max_kernels: u32,
    /// The most warm kernels kept ready per language (started and run once, for new
    /// sandboxes to adopt; the pools follow demand down to one each); 0 keeps none.
    #[arg(long, env = "SOULBOX_WARM_KERNELS", default_value_t = crate::app::DEFAULT_WARM_KERNELS, value_name = "MAX")]
    warm_kernels: usize,
    /// Connections open at once; past it, new ones wait until one ends.
    #[arg(long, env = "SOULBOX_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// How long a client may take to send a request's headers (or keep an idle connection).
    #[arg(long, env = "SOULBOX_HEADER_TIMEOUT", default_value = "30s", value_name = "DURATION")]
    header_timeout: humantime::Duration,
    /// A registry (HOST:PORT) that template builds pull from over plain HTTP instead of
    /// HTTPS (repeatable; for a registry on a private network or loopback).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// The network of template build steps: `none` (only loopback), or `host` (the server's
    /// own network and DNS, for `RUN apt-get install` and the like). Sandboxes never have it.
    #[arg(long, env = "SOULBOX_BUILD_NETWORK", default_value = "none", value_parser = ["none", "host"])]
    build_network: String,
}

impl ServeArgs {
    /// The limits these options set.
    fn admission(&self) -> crate::admission::AdmissionConfig {
        let defaults = crate::admission::AdmissionConfig::default();
        crate::admission::AdmissionConfig {
            max_sandboxes: self.max_sandboxes,
            max_sandboxes_per_team: self.max_sandboxes_per_team.unwrap_or(self.max_sandboxes),
            max_executions: self.max_executions,
            max_executions_per_team: self.max_executions_per_team.unwrap_or(self.max_executions),
            queue_timeout: self.queue_timeout.into(),
            min_free_memory_bytes: self
                .min_free_memory_mib
                .map_or(defaults.min_free_memory_bytes, |mib| mib << 20),
        }
    }
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOULBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    #[cfg(feature = "wasm")]
    if let Command::WasmWorker { max_kernels } = cli.command {
        // Single-threaded, on a runtime of its own: the point of a worker.
        let settings = soulbox_wasm::EngineSettings { max_instances: max_kernels };
        return match soulbox_wasm::worker::serve(&data_dir, settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("soulbox wasm-worker: {error}");
                ExitCode::from(EXIT_INTERNAL)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soulbox: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    match runtime.block_on(dispatch(cli.command, data_dir)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("soulbox: {error:#}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

async fn dispatch(command: Command, data_dir: PathBuf) -> anyhow::Result<ExitCode> {
    // The data directory (and its tiers) is opened only by the commands that work locally;
    // the ones that talk to a server need nothing here.
    let open = || App::open(&data_dir);
    match command {
        Command::Langs(LangsCommand::Install { languages }) => install(&open()?, &languages).await,
        Command::Langs(LangsCommand::List { json }) => list(&open()?, json),
        Command::Run(args) => run(&open()?, args).await,
        Command::Serve(args) => {
            let count = args.wasm_workers.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            let soulbox_binary = std::env::current_exe().map_err(|e| {
                anyhow::anyhow!("cannot find this executable to start WASM workers: {e}")
            })?;
            let workers = crate::app::WasmWorkers { count, soulbox_binary };
            let app = App::open_serving(&data_dir, args.max_kernels, Some(workers))?
                .with_manager(&data_dir)?;
            serve(app, args).await
        }
        Command::Auth(command) => Ok(crate::remote::auth(command).await),
        Command::Keys(command) => Ok(crate::remote::keys(command).await),
        Command::Audit(args) => Ok(crate::remote::audit(args).await),
        Command::Usage(args) => Ok(crate::remote::usage(args).await),
        Command::Quota(args) => Ok(crate::remote::quota(args).await),
        Command::Sandbox(command) => Ok(crate::remote::sandbox(command).await),
        Command::Exec(args) => Ok(crate::remote::exec(args).await),
        #[cfg(feature = "wasm")]
        Command::WasmWorker { .. } => anyhow::bail!("a WASM worker is started by `soulbox serve`"),
        Command::Ps(args) => Ok(crate::remote::ps(args).await),
        Command::Logs(args) => Ok(crate::remote::logs(args).await),
        Command::Files(command) => Ok(crate::remote::files(command).await),
        #[cfg(feature = "native")]
        Command::Template(command) => Ok(crate::remote::template(command).await),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "soulbox", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Draws one spinner per pack being installed.
#[derive(Debug)]
struct Progress {
    bars: indicatif::MultiProgress,
    by_language: std::sync::Mutex<std::collections::HashMap<Language, indicatif::ProgressBar>>,
}

impl Progress {
    fn new() -> Self {
        Self { bars: indicatif::MultiProgress::new(), by_language: Default::default() }
    }
}

impl soulbox_wasm::pack::InstallProgress for Progress {
    fn step(&self, language: &Language, step: soulbox_wasm::pack::InstallStep) {
        use soulbox_wasm::pack::InstallStep;
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            eprintln!("{language}: {}", step_message(step));
            return;
        }
        let mut bars = self.by_language.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = bars.entry(language.clone()).or_insert_with(|| {
            let bar = self.bars.add(indicatif::ProgressBar::new_spinner());
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {prefix:<11} [{elapsed:>4}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(language.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if step == InstallStep::Installed {
            bar.finish_with_message(step_message(step));
        } else {
            bar.set_message(step_message(step));
        }
    }
}

fn step_message(step: soulbox_wasm::pack::InstallStep) -> &'static str {
    use soulbox_wasm::pack::InstallStep;
    match step {
        InstallStep::Downloading => "downloading with the registry's client",
        InstallStep::Verifying => "verifying sha256 sums and unpacking",
        InstallStep::PreInitialising => {
            "pre-initialising the interpreter (Python: about 2 minutes)"
        }
        InstallStep::Compiling => "compiling the image to machine code",
        InstallStep::Installed => "installed",
    }
}

async fn install(app: &App, languages: &[String]) -> anyhow::Result<ExitCode> {
    let manifest = soulbox_wasm::pack::manifest();
    let mut specs = Vec::new();
    for name in languages {
        let language = Language::parse(name);
        match manifest.iter().find(|p| p.language == language) {
            Some(spec) => specs.push(spec.clone()),
            None => {
                let known: Vec<&str> = manifest.iter().map(|p| p.language.as_str()).collect();
                eprintln!("soulbox: no pack for `{name}`; known languages: {}", known.join(", "));
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        }
    }
    if specs.is_empty() {
        specs = manifest.to_vec();
    }
    let progress = Progress::new();
    let mut failed = false;
    for spec in &specs {
        if let Err(error) = app.wasm().install(spec, &progress).await {
            eprintln!("soulbox: {}: {error}", spec.language);
            failed = true;
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn list(app: &App, json: bool) -> anyhow::Result<ExitCode> {
    let rows: Vec<serde_json::Value> = soulbox_wasm::pack::manifest()
        .iter()
        .map(|spec| {
            let installed = soulbox_wasm::pack::installed(app.data_dir(), &spec.language);
            serde_json::json!({
                "language": spec.language,
                "tier": Tier::Wasm,
                "installed": installed.is_some(),
                "package": spec.package,
                "version": spec.version,
                "registry": spec.registry,
                "runtime": spec.runtime,
                "install_command": soulbox_wasm::pack::install_command(&spec.language),
            })
        })
        .chain(
            app.dispatcher().languages().into_iter().filter(|(tier, _)| *tier == Tier::Native).map(
                |(tier, support)| {
                    let install_command = match &support.status {
                        LanguageStatus::Ready => None,
                        LanguageStatus::NotInstalled { install_command } => {
                            Some(install_command.clone())
                        }
                    };
                    serde_json::json!({
                        "language": support.language,
                        "tier": tier,
                        "installed": install_command.is_none(),
                        "package": "",
                        "version": "",
                        "runtime": "the host's toolchain, in a namespace sandbox",
                        "install_command": install_command,
                    })
                },
            ),
        )
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<14} {:<7} {:<14} {:<24} {:<9} RUNTIME",
        "LANGUAGE", "TIER", "STATUS", "PACKAGE", "VERSION"
    )?;
    for row in &rows {
        let status = if row["installed"] == true { "installed" } else { "not installed" };
        writeln!(
            out,
            "{:<14} {:<7} {:<14} {:<24} {:<9} {}",
            row["language"].as_str().unwrap_or_default(),
            row["tier"].as_str().unwrap_or_default(),
            status,
            row["package"].as_str().unwrap_or_default(),
            row["version"].as_str().unwrap_or_default(),
            row["runtime"].as_str().unwrap_or_default(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(app: &App, args: RunArgs) -> anyhow::Result<ExitCode> {
    let code = match (&args.code, &args.file) {
        (Some(code), _) => code.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        (None, None) => unreachable!("clap requires CODE or FILE"),
    };
    let mut limits = Limits::default();
    if let Some(ms) = args.timeout_ms {
        limits.wall_timeout = Duration::from_millis(ms);
    }
    if let Some(mib) = args.memory_mib {
        limits.memory_bytes = mib.saturating_mul(1 << 20);
    }
    let request = ExecRequest {
        kind: soulbox_runtime::ExecKind::Cell { language: Language::parse(&args.lang), code },
        env: args.env.into_iter().collect(),
        limits,
        tier: match args.tier {
            TierArg::Auto => TierPreference::Auto,
            TierArg::Wasm => TierPreference::Wasm,
            TierArg::Native => TierPreference::Native,
        },
        context: None,
    };
    let sandbox = app.ephemeral_sandbox(SandboxSpec::default())?;
    let execution = match app.dispatcher().start(sandbox.clone(), request) {
        Ok(execution) => execution,
        Err(error) => {
            app.discard(&sandbox).await;
            eprintln!("soulbox: {error}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let finished =
        async { if args.json { print_json(execution).await } else { stream(execution).await } };
    // Ctrl-C stops the code and still removes the sandbox, as a shell's child would be stopped.
    let exit = tokio::select! {
        exit = finished => exit?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("soulbox: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    };
    app.discard(&sandbox).await;
    Ok(exit)
}

async fn print_json(execution: soulbox_runtime::Execution) -> anyhow::Result<ExitCode> {
    let output = execution.collect().await;
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(match (&output.failure, output.exit_code) {
        (Some(_), _) | (None, None) => ExitCode::from(EXIT_INTERNAL),
        (None, Some(code)) => exit_code(code),
    })
}

async fn stream(mut execution: soulbox_runtime::Execution) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(event) = execution.next_event().await {
        match event {
            ExecEvent::Stdout(bytes) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            ExecEvent::Stderr(bytes) => {
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            ExecEvent::Result(result) => {
                if result.is_main_result
                    && let Some(text) = result.data.get("text/plain")
                {
                    writeln!(stdout, "{text}")?;
                }
            }
            ExecEvent::Error(error) => {
                let traceback = if error.traceback.is_empty() {
                    format!("{}: {}", error.name, error.value)
                } else {
                    error.traceback
                };
                writeln!(stderr, "{}", traceback.trim_end())?;
            }
            ExecEvent::End(summary) => {
                if !matches!(summary.termination, soulbox_runtime::Termination::Exited { .. }) {
                    writeln!(stderr, "soulbox: {}", summary.termination)?;
                }
                return Ok(exit_code(summary.termination.exit_code()));
            }
            ExecEvent::Failed(message) => {
                writeln!(stderr, "soulbox: {message}")?;
                return Ok(ExitCode::from(EXIT_INTERNAL));
            }
        }
    }
    Ok(ExitCode::from(EXIT_INTERNAL))
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.rem_euclid(256)).unwrap_or(1))
}

/// Registers the admin key given at start, or makes the first one when there is none.
fn bootstrap_keys(keys: &crate::auth::Keys, admin_key: Option<&str>) -> anyhow::Result<()> {
    use crate::auth::{DEFAULT_TEAM, Role};
    if let Some(key) = admin_key {
        keys.register(key, DEFAULT_TEAM, Role::Admin, "SOULBOX_ADMIN_KEY")
            .map_err(|e| anyhow::anyhow!("SOULBOX_ADMIN_KEY: {e}"))?;
        return Ok(());
    }
    if keys.is_empty()? {
        let (key, _) = keys.create(DEFAULT_TEAM, Role::Admin, "first start")?;
        eprintln!(
            "soulbox: made the first API key, an admin of team `{DEFAULT_TEAM}`; it is shown \
             only now:\n\n    {key}\n\nexport E2B_API_KEY={key}   # for the E2B SDKs\n"
        );
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one: every connection and every native
/// sandbox holds descriptors, and the usual soft limit (1024) is far below what a server of
/// thousands of sandboxes needs.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(%error, soft, hard, "could not raise the open files limit");
    }
}

async fn serve(app: App, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let app = match (&args.oidc_issuer, &args.oidc_audience, &args.oidc_jwks_url) {
        (Some(issuer), Some(audience), Some(jwks_url)) => {
            let jwks = crate::tokens::fetch_jwks(jwks_url).await.map_err(|e| {
                anyhow::anyhow!("fetching the OIDC issuer's keys from {jwks_url}: {e}")
            })?;
            app.with_oidc(crate::tokens::OidcIssuer {
                issuer: issuer.clone(),
                audience: audience.clone(),
                jwks,
            })
        }
        _ => app,
    };
    let app = app.with_admission(args.admission()).with_warm_kernels(args.warm_kernels);
    #[cfg(feature = "native")]
    let app = app.with_template_settings(crate::templates::TemplateSettings {
        insecure_registries: args.insecure_registries.clone(),
        build_network: match args.build_network.as_str() {
            "host" => soulbox_native::SandboxNetwork::Host,
            _ => soulbox_native::SandboxNetwork::Isolated,
        },
    });
    if !args.no_install {
        let missing: Vec<_> = soulbox_wasm::pack::manifest()
            .iter()
            .filter(|spec| app.wasm().pack(&spec.language).is_none())
            .collect();
        if !missing.is_empty() {
            tracing::info!(
                count = missing.len(),
                "installing missing language packs (first start only)"
            );
            let progress = Progress::new();
            for spec in &missing {
                if let Err(error) = app.wasm().install(spec, &progress).await {
                    tracing::error!(language = %spec.language, %error, "could not install a pack; serving without it");
                }
            }
        }
    }
    if let Some(keys) = app.keys() {
        bootstrap_keys(keys, args.admin_key.as_deref())?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    app.warm();
    for status in app.tiers() {
        match &status.reason {
            None => tracing::info!(tier = %status.tier, "tier available"),
            Some(reason) => tracing::warn!(tier = %status.tier, %reason, "tier unavailable"),
        }
    }
    raise_open_files_limit();
    let limits = crate::server::ConnectionLimits {
        max_connections: args.max_connections,
        header_read_timeout: args.header_timeout.into(),
    };
    tracing::info!(address = %args.listen, data_dir = %app.data_dir().display(), "soulbox is serving");
    crate::server::serve_with(listener, app, limits).await?;
    Ok(ExitCode::SUCCESS)
}
