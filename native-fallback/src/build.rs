//! Templates built from Dockerfiles without Docker: each step of a [`BuildPlan`] on the
//! layers of the steps before it.
//!
//! - `RUN` runs in a native sandbox (the tier's whole isolation sequence; no network, no
//!   workspace: `/home/user` is part of the root) whose root is the layers so far under a
//!   writable layer on a tmpfs the size of the build's disk quota. The writable layer becomes
//!   the step's layer. A step that fails fails the build, with its output.
//! - `COPY` and `ADD` write a layer on the host from the build context, with fixed times, so
//!   that the same files make the same layer (the same digest).
//! - `ENV`, `ARG`, `WORKDIR` and `USER` change the configuration; `WORKDIR` makes its
//!   directory if no layer has it.
//!
//! Every step folds into a cache key (the base's layers, the steps before, the step itself
//! and the build arguments it sees). A `RUN` whose key was built before reuses its layer, so
//! an unchanged Dockerfile rebuilds without running anything.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soulbox_runtime::SandboxUser;
use tokio::io::AsyncReadExt;

use crate::dockerfile::{Action, BuildPlan};
use crate::image::{ImageConfig, ImageError, LayerStore, sandbox_id, write_upper_as_layer};
use crate::rootfs::{
    LayeredRoot, ROOT_HOME, SANDBOX_HOME, SANDBOX_UID, SandboxNetwork, SandboxRoot,
};
use crate::{ExitStatus, NativeError, NativeTier, ProcessSpec};

/// `PATH` when the image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How much of a failed step's output its error keeps (the end of it).
const FAILED_OUTPUT_BYTES: usize = 16 * 1024;

/// A template's image: its layers and what its Dockerfile set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BuiltImage {
    /// The layers' diff ids, lowest first.
    pub layers: Vec<String>,
    /// Whether the host's `/usr` and allow-listed `/etc` are mounted over the layers (built
    /// `FROM base`, or from a template that was).
    pub host_system: bool,
    /// Environment, working directory, user.
    pub config: ImageConfig,
    /// The command a sandbox starts with, if any.
    pub start: Option<Vec<String>>,
    /// The command whose success makes a sandbox ready, if any.
    pub ready: Option<Vec<String>>,
}

impl BuiltImage {
    /// SoulBox's default root: the host's system, no layers.
    pub fn host_system() -> Self {
        Self { host_system: true, ..Self::default() }
    }

    /// Who a sandbox's processes run as: its `USER`, else `user` (as in E2B's sandboxes).
    pub fn user(&self) -> SandboxUser {
        self.config.user.as_deref().and_then(|u| sandbox_user(u).ok()).unwrap_or_default()
    }

    /// Who its build steps run as: its `USER`, else root (as in Docker's builds).
    fn build_user(&self) -> SandboxUser {
        let user = self.config.user.as_deref().and_then(|u| sandbox_user(u).ok());
        user.unwrap_or(SandboxUser::Root)
    }
}

/// The limits and switches of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// `--build-arg` values, over the Dockerfile's defaults.
    pub build_args: BTreeMap<String, String>,
    /// Run every step, even those built before.
    pub no_cache: bool,
    /// Memory of each `RUN` step's processes.
    pub memory_bytes: u64,
    /// The most a `RUN` step may write (its writable layer is a tmpfs of this size).
    pub disk_bytes: u64,
    /// The longest a `RUN` step may take.
    pub step_timeout: Duration,
    /// The network of `RUN` steps: none by default; the host's where the server allows it.
    pub network: SandboxNetwork,
}

/// Default memory of a build step: 2 GiB.
pub const DEFAULT_BUILD_MEMORY_BYTES: u64 = 2 << 30;
/// Default disk quota of a build step: 4 GiB.
pub const DEFAULT_BUILD_DISK_BYTES: u64 = 4 << 30;
/// Default time limit of a build step: 30 minutes.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            build_args: BTreeMap::new(),
            no_cache: false,
            memory_bytes: DEFAULT_BUILD_MEMORY_BYTES,
            disk_bytes: DEFAULT_BUILD_DISK_BYTES,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            network: SandboxNetwork::Isolated,
        }
    }
}

/// What a build reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step begins.
    Step {
        /// Its number, from 1.
        number: usize,
        /// How many there are.
        total: usize,
        /// Its line in the Dockerfile.
        line: usize,
        /// The instruction.
        instruction: String,
    },
    /// A step was built before: its layer is reused.
    Cached {
        /// Its number.
        number: usize,
    },
    /// A line of a `RUN` step's output (standard output and error together).
    Output {
        /// The step's number.
        number: usize,
        /// The text, without its newline.
        text: String,
    },
    /// A step made a layer.
    Layer {
        /// The step's number.
        number: usize,
        /// The layer's diff id.
        digest: String,
    },
}

/// A build that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A step failed.
    #[error("Dockerfile line {line}: {message}")]
    Step {
        /// Its line.
        line: usize,
        /// What went wrong.
        message: String,
        /// The end of its output.
        output: String,
    },
    /// A layer could not be stored.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A build sandbox could not be started.
    #[error(transparent)]
    Native(#[from] NativeError),
    /// The build's scratch space failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

fn step_error(line: usize, message: impl Into<String>) -> BuildError {
    BuildError::Step { line, message: message.into(), output: String::new() }
}

/// Builds templates on a native tier into a layer store.
#[derive(Debug, Clone)]
pub struct Builder {
    tier: Arc<NativeTier>,
    store: LayerStore,
    /// `<dir>/cache/<key>`: the layer a `RUN` made; `<dir>/scratch/`: steps in progress.
    dir: PathBuf,
}

/// What a cached `RUN` made.
#[derive(Debug, Serialize, Deserialize)]
struct CachedStep {
    layer: String,
}

impl Builder {
    /// A builder keeping its cache and scratch space under `dir`.
    pub fn new(tier: Arc<NativeTier>, store: LayerStore, dir: PathBuf) -> Result<Self, BuildError> {
        for sub in ["cache", "scratch"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_error(format!("creating {}", path.display())))?;
        }
        // Scratch space of builds a server did not finish (their tmpfs first).
        if let Ok(entries) = fs::read_dir(dir.join("scratch")) {
            for entry in entries.flatten() {
                let _ =
                    nix::mount::umount2(&entry.path().join("rw"), nix::mount::MntFlags::MNT_DETACH);
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self { tier, store, dir })
    }

    /// The layer store.
    pub fn store(&self) -> &LayerStore {
        &self.store
    }

    /// Builds `plan` on `base` with the files of `context`. Nothing of a failed build is
    /// kept but the layers of its finished steps (content-addressed, shared, reusable).
    pub async fn build(
        &self,
        plan: &BuildPlan,
        base: BuiltImage,
        context: &Path,
        options: &BuildOptions,
        events: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<BuiltImage, BuildError> {
        let mut image = base;
        image.start = plan.start.clone().or(image.start);
        image.ready = plan.ready.clone().or(image.ready);
        let mut key = Sha256::new();
        key.update(serde_json::to_vec(&(&image.layers, image.host_system)).unwrap_or_default());
        let mut args: BTreeMap<String, String> = BTreeMap::new();
        for (name, default) in &plan.global_args {
            if let Some(value) = options.build_args.get(name).or(default.as_ref()) {
                args.insert(name.clone(), value.clone());
            }
        }
        let total = plan.steps.len();
        for (i, step) in plan.steps.iter().enumerate() {
            let number = i + 1;
            let line = step.line;
            events(BuildEvent::Step { number, total, line, instruction: describe(&step.action) });
            let vars = |image: &BuiltImage, args: &BTreeMap<String, String>| {
                let mut vars = args.clone();
                vars.extend(image.config.env.iter().cloned());
                vars
            };
            match &step.action {
                Action::Arg(name, default) => {
                    let value = options.build_args.get(name).or(default.as_ref());
                    fold(&mut key, &format!("ARG {name}={value:?}"));
                    if let Some(value) = value {
                        let value = substitute(value, &vars(&image, &args));
                        args.insert(name.clone(), value);
                    }
                }
                Action::Env(pairs) => {
                    for (name, value) in pairs {
                        let value = substitute(value, &vars(&image, &args));
                        image.config.set_env(name, &value);
                        fold(&mut key, &format!("ENV {name}={value}"));
                    }
                }
                Action::User(name) => {
                    let name = substitute(name, &vars(&image, &args));
                    sandbox_user(&name).map_err(|message| step_error(line, message))?;
                    fold(&mut key, &format!("USER {name}"));
                    image.config.user = Some(name);
                }
                Action::Workdir(path) => {
                    let path = substitute(path, &vars(&image, &args));
                    let path = absolute(image.config.workdir.as_deref(), &path)
                        .map_err(|message| step_error(line, message))?;
                    fold(&mut key, &format!("WORKDIR {path}"));
                    if !self.exists(&image, &path)? {
                        let owner = uid_of(image.build_user());
                        let layer = self.directory_layer(&image, &path, owner)?;
                        fold(&mut key, &layer);
                        events(BuildEvent::Layer { number, digest: layer.clone() });
                        image.layers.push(layer);
                    }
                    image.config.workdir = Some(path);
                }
                Action::Copy { sources, dest, chown, chmod } => {
                    let vars = vars(&image, &args);
                    let (uid, gid) = match chown {
                        Some(chown) => owner_of(&substitute(chown, &vars))
                            .map_err(|message| step_error(line, message))?,
                        None => (0, 0),
                    };
                    let owner = CopyAs { uid, gid, mode: *chmod };
                    let dest = substitute(dest, &vars);
                    let sources: Vec<String> =
                        sources.iter().map(|s| substitute(s, &vars)).collect();
                    let layer = self
                        .copy_layer(context, &sources, &dest, &image, owner, false)
                        .map_err(|e| with_line(e, line))?;
                    fold(&mut key, &layer);
                    events(BuildEvent::Layer { number, digest: layer.clone() });
                    image.layers.push(layer);
                }
                Action::Add { sources, dest } => {
                    let vars = vars(&image, &args);
                    let dest = substitute(dest, &vars);
                    let sources: Vec<String> =
                        sources.iter().map(|s| substitute(s, &vars)).collect();
                    let layer = self
                        .copy_layer(context, &sources, &dest, &image, CopyAs::ROOT, true)
                        .map_err(|e| with_line(e, line))?;
                    fold(&mut key, &layer);
                    events(BuildEvent::Layer { number, digest: layer.clone() });
                    image.layers.push(layer);
                }
                Action::Run(argv) => {
                    fold(&mut key, &format!("RUN {argv:?} {args:?}"));
                    let cache_key = format!("{:x}", key.clone().finalize());
                    let cache = self.dir.join("cache").join(&cache_key);
                    let cached = fs::read(&cache)
                        .ok()
                        .and_then(|bytes| serde_json::from_slice::<CachedStep>(&bytes).ok())
                        .filter(|cached| !options.no_cache && self.store.contains(&cached.layer));
                    let layer = match cached {
                        Some(cached) => {
                            events(BuildEvent::Cached { number });
                            cached.layer
                        }
                        None => {
                            let layer = self
                                .run_step(&image, &args, argv, number, line, options, events)
                                .await?;
                            let record = serde_json::to_vec(&CachedStep { layer: layer.clone() })
                                .unwrap_or_default();
                            fs::write(&cache, record)
                                .map_err(io_error(format!("writing {}", cache.display())))?;
                            layer
                        }
                    };
                    fold(&mut key, &layer);
                    events(BuildEvent::Layer { number, digest: layer.clone() });
                    image.layers.push(layer);
                }
            }
        }
        Ok(image)
    }

    /// Runs one `RUN` step and stores what it wrote as a layer.
    #[allow(clippy::too_many_arguments, reason = "one step's whole context")]
    async fn run_step(
        &self,
        image: &BuiltImage,
        args: &BTreeMap<String, String>,
        argv: &[String],
        number: usize,
        line: usize,
        options: &BuildOptions,
        events: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<String, BuildError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let scratch = Scratch::new(
            self.dir.join("scratch").join(format!("{}-{n}", std::process::id())),
            options.disk_bytes,
        )?;
        let root = SandboxRoot::Layers(LayeredRoot {
            layers: self.store.paths(&image.layers)?,
            writable: scratch.writable(),
            host_system: image.host_system,
            template: String::new(),
        });
        let user = image.build_user();
        // The tmpfs's pages are charged to the step's memory, beside its processes'.
        let memory = options.memory_bytes.saturating_add(options.disk_bytes);
        if options.network == SandboxNetwork::Host && !image.host_system {
            // As Docker does: the host's DNS settings for the step, not kept in its layer.
            scratch.add_resolv_conf()?;
        }
        let sandbox = self.tier.start_build_sandbox(&root, options.network, memory).await?;
        let spec = ProcessSpec {
            argv: argv.to_vec(),
            env: step_environment(image, user, args),
            cwd: image.config.workdir.clone().unwrap_or_else(|| "/".to_owned()),
            user,
        };
        let ran = run_process(&sandbox, spec, number, options.step_timeout, events).await;
        sandbox.destroy().await?;
        let (status, output) = ran.map_err(|e| match e {
            NativeError::Spawn { message, .. } => step_error(line, message),
            e => BuildError::Native(e),
        })?;
        let failed = |message: String| BuildError::Step { line, message, output: output.clone() };
        if scratch.full() {
            return Err(failed(format!(
                "the step filled the build's disk quota ({} MiB); raise it with --disk",
                options.disk_bytes >> 20
            )));
        }
        match status {
            Some(ExitStatus::Code(0)) => {}
            Some(ExitStatus::Code(code)) => {
                return Err(failed(format!("`RUN {}` exited with code {code}", argv.join(" "))));
            }
            Some(ExitStatus::Signal(signal)) => {
                return Err(failed(format!(
                    "`RUN {}` was killed by signal {signal}",
                    argv.join(" ")
                )));
            }
            None => {
                return Err(failed(format!(
                    "the step ran longer than {} s and was stopped",
                    options.step_timeout.as_secs()
                )));
            }
        }
        scratch.remove_resolv_conf();
        let layer = self.store_upper(&scratch.writable().join("upper"))?;
        drop(scratch);
        Ok(layer)
    }

    /// Stores an overlayfs upper directory as a layer.
    fn store_upper(&self, upper: &Path) -> Result<String, BuildError> {
        let mut file = tempfile_in(&self.dir.join("scratch"))?;
        write_upper_as_layer(upper, &mut file).map_err(io_error("writing a step's layer"))?;
        file.rewind().map_err(io_error("reading a step's layer"))?;
        Ok(self.store.import(BufReader::new(file), None)?)
    }

    /// Whether a layer of `image` has `path` (a whiteout does not count; the host's system
    /// is not looked at).
    fn exists(&self, image: &BuiltImage, path: &str) -> Result<bool, BuildError> {
        let relative = path.trim_start_matches('/');
        for layer in self.store.paths(&image.layers)?.iter().rev() {
            if let Ok(metadata) = fs::symlink_metadata(layer.join(relative)) {
                let whiteout = metadata.file_type().is_char_device() && metadata.rdev() == 0;
                return Ok(!whiteout);
            }
        }
        Ok(false)
    }

    /// A layer holding the directory `path` (and its parents), owned by `owner`.
    fn directory_layer(
        &self,
        image: &BuiltImage,
        path: &str,
        owner: u64,
    ) -> Result<String, BuildError> {
        let mut tar = tar::Builder::new(Vec::new());
        self.append_dirs(&mut tar, image, Path::new(path), (owner, owner))?;
        let bytes = tar.into_inner().map_err(io_error("writing a WORKDIR layer"))?;
        Ok(self.store.import(bytes.as_slice(), None)?)
    }

    /// Appends the directories of `path` (relative to the root, itself included): those a
    /// layer of `image` has with the topmost one's owner and mode (a layer's entry replaces
    /// the directory below it), the others owned by `owner`, except the sandbox user's home,
    /// which is the user's wherever it is made (as init makes it).
    fn append_dirs(
        &self,
        tar: &mut tar::Builder<Vec<u8>>,
        image: &BuiltImage,
        path: &Path,
        owner: (u64, u64),
    ) -> Result<(), BuildError> {
        let layers = self.store.paths(&image.layers)?;
        let mut so_far = PathBuf::new();
        for part in path.components().filter(|c| matches!(c, Component::Normal(_))) {
            so_far.push(part);
            let existing = layers
                .iter()
                .rev()
                .find_map(|layer| fs::symlink_metadata(layer.join(&so_far)).ok())
                .filter(|metadata| metadata.is_dir());
            let user = u64::from(SANDBOX_UID);
            let (mode, uid, gid) = match existing {
                Some(m) => (m.mode() & 0o7777, sandbox_id(m.uid()), sandbox_id(m.gid())),
                None if Path::new("/").join(&so_far) == Path::new(SANDBOX_HOME) => {
                    (0o755, user, user)
                }
                None => (0o755, owner.0, owner.1),
            };
            let mut header = directory_header(mode, uid, gid);
            tar.append_data(&mut header, &so_far, io::empty())
                .map_err(io_error("writing a layer's directories"))?;
        }
        Ok(())
    }

    /// A layer with `sources` (paths in `context`) copied to `dest`, owned by `owner`; with
    /// `unpack_archives`, a local tar archive (plain or gzip) is unpacked there instead.
    fn copy_layer(
        &self,
        context: &Path,
        sources: &[String],
        dest: &str,
        image: &BuiltImage,
        owner: CopyAs,
        unpack_archives: bool,
    ) -> Result<String, BuildError> {
        let dest_is_dir = dest.ends_with('/') || sources.len() > 1;
        let dest = absolute(image.config.workdir.as_deref(), dest).map_err(|m| step_error(0, m))?;
        let dest = PathBuf::from(dest.trim_start_matches('/'));
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        // The destination's directories that are missing.
        let parents = if dest_is_dir { dest.as_path() } else { dest.parent().unwrap_or(&dest) };
        self.append_dirs(&mut tar, image, parents, (owner.uid, owner.gid))?;
        for source in sources {
            let path =
                in_context(context, source).map_err(|m| step_error(0, format!("COPY {m}")))?;
            let metadata = fs::symlink_metadata(&path).map_err(|e| {
                step_error(0, format!("COPY source `{source}` is not in the build context: {e}"))
            })?;
            if metadata.is_dir() {
                // A directory's contents are copied, not the directory itself.
                append_tree(&mut tar, &path, &dest, owner)?;
            } else if unpack_archives && is_archive(&path) {
                append_archive(&mut tar, &path, &dest)?;
            } else {
                let target = if dest_is_dir {
                    dest.join(path.file_name().unwrap_or_default())
                } else {
                    dest.clone()
                };
                append_entry(&mut tar, &path, &target, owner)?;
            }
        }
        let bytes = tar.into_inner().map_err(io_error("writing a COPY layer"))?;
        Ok(self.store.import(bytes.as_slice(), None)?)
    }
}

/// A step's scratch space: a tmpfs of the disk quota holding the writable layer, unmounted
/// and removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(dir: PathBuf, bytes: u64) -> Result<Self, BuildError> {
        let rw = dir.join("rw");
        fs::create_dir_all(&rw).map_err(io_error(format!("creating {}", rw.display())))?;
        let scratch = Self { dir };
        let options = format!("size={bytes},mode=0755");
        nix::mount::mount(
            Some("tmpfs"),
            &rw,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| BuildError::Io {
            what: format!("mounting the build's writable layer at {}", rw.display()),
            source: io::Error::from(e),
        })?;
        Ok(scratch)
    }

    fn writable(&self) -> PathBuf {
        self.dir.join("rw")
    }

    /// Puts the host's `/etc/resolv.conf` in the writable layer.
    fn add_resolv_conf(&self) -> Result<(), BuildError> {
        let etc = self.writable().join("upper/etc");
        fs::create_dir_all(&etc).map_err(io_error(format!("creating {}", etc.display())))?;
        let owner = Some(crate::SANDBOX_UID_BASE);
        std::os::unix::fs::chown(self.writable().join("upper"), owner, owner)
            .and_then(|()| std::os::unix::fs::chown(&etc, owner, owner))
            .and_then(|()| fs::copy("/etc/resolv.conf", etc.join("resolv.conf")).map(drop))
            .map_err(io_error("copying the host's /etc/resolv.conf"))
    }

    /// Takes the host's `resolv.conf` out of the writable layer again (the directory stays if
    /// the step put more in it).
    fn remove_resolv_conf(&self) {
        let etc = self.writable().join("upper/etc");
        let _ = fs::remove_file(etc.join("resolv.conf"));
        let _ = fs::remove_dir(etc);
    }

    /// Whether its tmpfs is (nearly) full.
    fn full(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.writable())
            .is_ok_and(|s| s.blocks_available() * s.fragment_size() < 64 * 1024)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.writable(), nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `spec`, sending its output as events, until it ends or `timeout` passes (then
/// `None`). Returns the end of its output too.
async fn run_process(
    sandbox: &crate::NativeSandbox,
    spec: ProcessSpec,
    number: usize,
    timeout: Duration,
    events: &mut (dyn FnMut(BuildEvent) + Send),
) -> Result<(Option<ExitStatus>, String), NativeError> {
    let mut process = sandbox.spawn(spec).await?;
    drop(process.stdin.take());
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    for mut pipe in [process.stdout, process.stderr] {
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 16 * 1024];
            while let Ok(n) = pipe.read(&mut buffer).await {
                if n == 0 || sender.send(buffer[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(sender);
    let mut exit = process.exit;
    let mut output = Vec::new();
    let mut partial = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut status = None;
    let mut pipes_open = true;
    loop {
        tokio::select! {
            chunk = receiver.recv(), if pipes_open => match chunk {
                Some(chunk) => {
                    output.extend_from_slice(&chunk);
                    if output.len() > 2 * FAILED_OUTPUT_BYTES {
                        output.drain(..output.len() - FAILED_OUTPUT_BYTES);
                    }
                    partial.extend_from_slice(&chunk);
                    while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=end).collect();
                        let text = String::from_utf8_lossy(&line[..end]).into_owned();
                        events(BuildEvent::Output { number, text });
                    }
                }
                None => pipes_open = false,
            },
            ended = exit.wait(), if status.is_none() => {
                status = Some(ended?);
                if !pipes_open { break; }
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
        if status.is_some() && !pipes_open {
            break;
        }
    }
    if !partial.is_empty() {
        events(BuildEvent::Output { number, text: String::from_utf8_lossy(&partial).into_owned() });
    }
    let start = output.len().saturating_sub(FAILED_OUTPUT_BYTES);
    Ok((status, String::from_utf8_lossy(&output[start..]).into_owned()))
}

/// A `RUN` step's environment: the basics, the image's variables, the build arguments.
fn step_environment(
    image: &BuiltImage,
    user: SandboxUser,
    args: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let home = match user {
        SandboxUser::User => SANDBOX_HOME,
        SandboxUser::Root => ROOT_HOME,
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home.into()),
        ("USER".into(), user.name().into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    for (key, value) in image.config.env.iter().map(|(k, v)| (k, v)).chain(args) {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

fn fold(key: &mut Sha256, part: &str) {
    key.update(part.as_bytes());
    key.update([0]);
}

fn with_line(error: BuildError, line: usize) -> BuildError {
    match error {
        BuildError::Step { message, output, .. } => BuildError::Step { line, message, output },
        other => other,
    }
}

/// The instruction a step came from, for its log line.
fn describe(action: &Action) -> String {
    match action {
        Action::Run(argv) => match argv.as_slice() {
            [_, flag, command] if flag == "-c" => format!("RUN {command}"),
            _ => format!("RUN {argv:?}"),
        },
        Action::Copy { sources, dest, .. } => format!("COPY {} {dest}", sources.join(" ")),
        Action::Add { sources, dest } => format!("ADD {} {dest}", sources.join(" ")),
        Action::Env(pairs) => {
            let pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("ENV {}", pairs.join(" "))
        }
        Action::Arg(name, Some(default)) => format!("ARG {name}={default}"),
        Action::Arg(name, None) => format!("ARG {name}"),
        Action::Workdir(path) => format!("WORKDIR {path}"),
        Action::User(user) => format!("USER {user}"),
    }
}

/// Replaces `$NAME`, `${NAME}` and `${NAME:-default}` by their values (an unset one by
/// nothing); `\$` is a literal `$`.
pub fn substitute(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let inner: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let (name, default) = match inner.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (inner.as_str(), None),
                };
                match (vars.get(name).filter(|v| !v.is_empty()), default) {
                    (Some(value), _) => out.push_str(value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => {}
                }
            }
            '$' if chars.peek().is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') => {
                let mut name = String::new();
                while let Some(&c) = chars.peek() {
                    if !(c.is_ascii_alphanumeric() || c == '_') {
                        break;
                    }
                    name.push(c);
                    chars.next();
                }
                out.push_str(vars.get(&name).map_or("", String::as_str));
            }
            c => out.push(c),
        }
    }
    out
}

/// `path` made absolute against the working directory, without `.` or `..`.
fn absolute(workdir: Option<&str>, path: &str) -> Result<String, String> {
    let joined = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(workdir.unwrap_or("/")).join(path)
    };
    let mut parts: Vec<String> = Vec::new();
    for component in joined.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    let absolute = format!("/{}", parts.join("/"));
    if absolute.contains([':', ',']) {
        return Err(format!(
            "the path `{absolute}` has a `:` or `,`, which SoulBox does not allow"
        ));
    }
    Ok(absolute)
}

/// The sandbox user a `USER` names: `root` (0) or `user` (1000), optionally with a group.
fn sandbox_user(name: &str) -> Result<SandboxUser, String> {
    let user = name.split(':').next().unwrap_or_default();
    match user {
        "root" | "0" => Ok(SandboxUser::Root),
        "user" | "1000" => Ok(SandboxUser::User),
        _ => Err(format!(
            "USER {name}: a sandbox runs as `root` (0) or `user` (1000); run other accounts with `su` or `setpriv` in the start command"
        )),
    }
}

fn uid_of(user: SandboxUser) -> u64 {
    match user {
        SandboxUser::Root => 0,
        SandboxUser::User => u64::from(SANDBOX_UID),
    }
}

/// The ids `--chown=USER[:GROUP]` names.
fn owner_of(chown: &str) -> Result<(u64, u64), String> {
    let id = |name: &str| -> Result<u64, String> {
        match name {
            "root" => Ok(0),
            "user" => Ok(u64::from(SANDBOX_UID)),
            number => number
                .parse()
                .map_err(|_| format!("--chown={chown}: name ids as numbers, `root` or `user`")),
        }
    };
    match chown.split_once(':') {
        Some((user, group)) => Ok((id(user)?, id(group)?)),
        None => {
            let uid = id(chown)?;
            Ok((uid, uid))
        }
    }
}

/// The path `source` names in the build context `context`; refuses one that is missing or
/// leaves the context (by `..` or through a symbolic link).
pub fn in_context(context: &Path, source: &str) -> Result<PathBuf, String> {
    let mut path = context.to_owned();
    for component in Path::new(source).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("`{source}` leaves the build context"));
            }
        }
    }
    // A symlink in the context must not lead out of it either.
    let real = fs::canonicalize(&path)
        .map_err(|e| format!("`{source}` is not in the build context: {e}"))?;
    let root = fs::canonicalize(context).map_err(|e| format!("the build context: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!("`{source}` leads out of the build context"));
    }
    Ok(path)
}

fn directory_header(mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(mode);
    header.set_uid(uid);
    header.set_gid(gid);
    header.set_mtime(0);
    header.set_size(0);
    header
}

/// Who owns what a `COPY` writes, and its mode (`--chmod`; else the source's).
#[derive(Debug, Clone, Copy)]
struct CopyAs {
    uid: u64,
    gid: u64,
    mode: Option<u32>,
}

impl CopyAs {
    /// Root's, with the sources' modes.
    const ROOT: Self = Self { uid: 0, gid: 0, mode: None };
}

/// Appends the file, link or directory at `path` as `target`, with fixed times.
fn append_entry(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    target: &Path,
    owner: CopyAs,
) -> Result<(), BuildError> {
    let failed = io_error(format!("copying {}", path.display()));
    let metadata =
        fs::symlink_metadata(path).map_err(io_error(format!("reading {}", path.display())))?;
    let mode = owner.mode.unwrap_or(metadata.mode() & 0o777);
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_uid(owner.uid);
    header.set_gid(owner.gid);
    header.set_mtime(0);
    let kind = metadata.file_type();
    if kind.is_dir() {
        let mut header = directory_header(mode, owner.uid, owner.gid);
        tar.append_data(&mut header, target, io::empty()).map_err(failed)
    } else if kind.is_symlink() {
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        let link = fs::read_link(path).map_err(io_error(format!("reading {}", path.display())))?;
        tar.append_link(&mut header, target, link).map_err(failed)
    } else if kind.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(metadata.len());
        let file = File::open(path).map_err(io_error(format!("reading {}", path.display())))?;
        tar.append_data(&mut header, target, file).map_err(failed)
    } else {
        Ok(())
    }
}

/// Appends what the directory `dir` holds under `target`, in name order.
fn append_tree(
    tar: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    target: &Path,
    owner: CopyAs,
) -> Result<(), BuildError> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
        .and_then(|entries| entries.collect())
        .map_err(io_error(format!("reading {}", dir.display())))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let inside = target.join(entry.file_name());
        append_entry(tar, &path, &inside, owner)?;
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            append_tree(tar, &path, &inside, owner)?;
        }
    }
    Ok(())
}

/// Whether `path` is a tar archive or a gzip of one.
fn is_archive(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut file) = File::open(path) else { return false };
    let Ok(n) = file.read(&mut head) else { return false };
    head[..n].starts_with(&[0x1f, 0x8b]) || (n >= 262 && &head[257..262] == b"ustar")
}

/// Appends the entries of the archive at `path` under `target`; paths that would leave it are
/// refused when the layer is unpacked.
fn append_archive(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    target: &Path,
) -> Result<(), BuildError> {
    let failed = || io_error(format!("reading the archive {}", path.display()));
    let file = File::open(path).map_err(failed())?;
    let mut reader = BufReader::new(file);
    let gzip = {
        use std::io::BufRead;
        reader.fill_buf().map_err(failed())?.starts_with(&[0x1f, 0x8b])
    };
    let reader: Box<dyn Read> =
        if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(failed())? {
        let mut entry = entry.map_err(failed())?;
        let inner = entry.path().map_err(failed())?.into_owned();
        let mut header = entry.header().clone();
        let inside = target.join(inner.strip_prefix("/").unwrap_or(&inner));
        match header.entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let link = entry.link_name().map_err(failed())?.unwrap_or_default().into_owned();
                let link = if header.entry_type() == tar::EntryType::Link {
                    target.join(link.strip_prefix("/").unwrap_or(&link))
                } else {
                    link
                };
                tar.append_link(&mut header, &inside, link).map_err(failed())?;
            }
            _ => tar.append_data(&mut header, &inside, &mut entry).map_err(failed())?,
        }
    }
    Ok(())
}

/// An unnamed file in `dir`, removed when closed.
fn tempfile_in(dir: &Path) -> Result<File, BuildError> {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(io_error(format!("making a temporary file in {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_substituted_as_docker_does() {
        let vars = BTreeMap::from([
            ("HOME".to_owned(), "/root".to_owned()),
            ("EMPTY".to_owned(), String::new()),
        ]);
        assert_eq!(substitute("$HOME/x", &vars), "/root/x");
        assert_eq!(substitute("${HOME}x", &vars), "/rootx");
        assert_eq!(substitute("${MISSING:-def}", &vars), "def");
        assert_eq!(substitute("${EMPTY:-def}", &vars), "def");
        assert_eq!(substitute("a$MISSING-b", &vars), "a-b");
        assert_eq!(substitute(r"\$HOME", &vars), "$HOME");
        assert_eq!(substitute("cost: 5$", &vars), "cost: 5$");
    }

    #[test]
    fn paths_are_made_absolute_against_the_working_directory() {
        assert_eq!(absolute(None, "app").as_deref(), Ok("/app"));
        assert_eq!(absolute(Some("/srv"), "app/../x/./y").as_deref(), Ok("/srv/x/y"));
        assert_eq!(absolute(Some("/srv"), "/../../etc").as_deref(), Ok("/etc"));
        assert!(absolute(None, "/a:b").is_err());
    }

    #[test]
    fn users_and_owners_are_the_sandbox_s_own() {
        assert_eq!(sandbox_user("root"), Ok(SandboxUser::Root));
        assert_eq!(sandbox_user("1000:1000"), Ok(SandboxUser::User));
        assert!(
            sandbox_user("www-data").expect_err("refused").contains("`root` (0) or `user` (1000)")
        );
        assert_eq!(owner_of("user"), Ok((1000, 1000)));
        assert_eq!(owner_of("0:1000"), Ok((0, 1000)));
        assert!(owner_of("nobody").is_err());
    }
}
