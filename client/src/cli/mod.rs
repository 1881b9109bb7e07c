//! The `delta` command line: argument types and dispatch. Each subcommand module has an
//! `Args` and a `run(args, ctx)`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::hub::Cache;
use crate::remote::Remote;

pub mod apply;
pub mod base;
pub mod cache;
pub mod compose;
pub mod doctor;
pub mod export;
pub mod fingerprint;
pub mod infer;
pub mod jobs;
pub mod lifecycle;
pub mod login;
pub mod ls;
pub mod pull;
pub mod push;
pub mod show;
pub mod tag;

/// Push, pull, compose and apply parameter deltas.
#[derive(Parser, Debug)]
#[command(
    name = "delta",
    version,
    about = "Push, pull, compose and apply parameter deltas"
)]
pub struct Cli {
    /// Registry URL.
    #[arg(
        long,
        global = true,
        env = "DELTA_REGISTRY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub registry: String,
    /// Cache directory (default: the user's cache dir + /delta).
    #[arg(long, global = true, env = "DELTA_CACHE")]
    pub cache: Option<PathBuf>,
    /// Re-hash every cached blob before using it (by default a blob is re-hashed only
    /// when its size, modification or change time, device or inode changed since it was
    /// last verified).
    #[arg(long, global = true)]
    pub verify_cache: bool,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// API token (default: what `delta login` saved for this registry).
    #[arg(long, global = true, env = "DELTA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM CA certificate to trust for https:// registries.
    #[arg(long, global = true, env = "DELTA_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Credentials file written by `delta login` (default: the user's config dir + /delta/credentials.json).
    #[arg(long, global = true, env = "DELTA_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the base fingerprint of a safetensors file or a folder of shards.
    Fingerprint(fingerprint::Args),
    /// Register and list base models.
    #[command(subcommand)]
    Base(base::Command),
    /// Push a delta folder (native or PEFT LoRA) as a new version.
    Push(push::Args),
    /// Pull a delta into the cache and materialise it as a folder.
    Pull(pull::Args),
    /// List repositories (or every delta of a base).
    Ls(ls::Args),
    /// Show a delta: manifest, versions, tags, size, base.
    Show(show::Args),
    /// Point a tag at a version.
    Tag(tag::Args),
    /// Merge deltas into a base model and write safetensors.
    Apply(apply::Args),
    /// Combine deltas into a new delta (parallel or sequential; cat, linear, ties, dare, ...).
    Compose(compose::Args),
    /// Yank a version: still pullable by version or digest, hidden from listings and latest.
    Yank(lifecycle::YankArgs),
    /// Delete a version (admin).
    Delete {
        /// The version.
        reference: String,
    },
    /// Remove a tag.
    Untag(lifecycle::UntagArgs),
    /// Remove unreferenced blobs on the registry (admin of every namespace).
    Gc(lifecycle::GcArgs),
    /// Save a token for this registry (in a 0600 credentials file).
    Login(login::Args),
    /// Forget the saved token for this registry.
    Logout,
    /// Show who the registry takes your token for: kind, namespace, scope, expiry.
    Whoami,
    /// Write a delta in another tool's format.
    #[command(subcommand)]
    Export(export::Command),
    /// Train a delta on a worker: upload the data, queue a job, push the result.
    Train(Box<jobs::TrainArgs>),
    /// Verify a delta on a worker and attach the report to it.
    Verify(jobs::VerifyArgs),
    /// Show (or follow) a job.
    Job(jobs::JobArgs),
    /// Check connectivity, auth, the cache and local bases' fingerprints.
    Doctor(doctor::Args),
    /// Show the local cache (where, what it holds) or empty it.
    #[command(subcommand)]
    Cache(cache::Command),
    /// Class predictions from deltas on an inference service (`delta-worker infer`).
    Predict(infer::PredictArgs),
    /// Embeddings from deltas on an inference service (`delta-worker infer`).
    Embed(infer::EmbedArgs),
    /// Print a shell completion script: `delta completions bash > /etc/bash_completion.d/delta`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-02T16:28:15Z`), `-` for none.
pub(crate) fn when(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(s) if s > 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        )
        .to_string(),
        _ => "-".to_owned(),
    }
}

/// What every subcommand gets.
#[derive(Debug)]
pub struct Ctx {
    /// Registry URL.
    pub registry: String,
    /// The local cache.
    pub cache: Cache,
    /// JSON output.
    pub json: bool,
    /// The token to send, if any.
    pub token: Option<String>,
    /// Where `delta login` keeps tokens.
    pub credentials: PathBuf,
    /// Custom CA for TLS.
    pub ca_cert: Option<PathBuf>,
}

/// The progress bars the CLI draws on stderr, so that log lines go above them
/// ([`LogWriter`]) instead of through them, as cargo prints its warnings.
static BARS: std::sync::LazyLock<MultiProgress> =
    std::sync::LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));

/// stderr for log lines: the progress bars are cleared while a line is written and drawn
/// again below it.
#[derive(Debug, Clone, Copy)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BARS.suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Ctx {
    /// Connects to the registry.
    pub async fn remote(&self) -> anyhow::Result<Remote> {
        let opts = crate::remote::ConnectOptions {
            token: self.token.clone(),
            ca_cert: self.ca_cert.clone(),
            lazy: false,
        };
        Ok(Remote::connect_opts(&self.registry, &opts).await?)
    }

    /// A byte progress bar on stderr when it is a terminal (hidden otherwise, and in
    /// `--json` mode).
    pub fn progress(&self, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if self.json || bar.is_hidden() {
            return ProgressBar::hidden();
        }
        let bar = BARS.add(bar);
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_owned());
        bar
    }

    /// Prints a value as JSON.
    pub fn print_json(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let cache_root = match cli.cache {
        Some(c) => c,
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("delta"),
    };
    let credentials = match cli.credentials {
        Some(c) => c,
        None => dirs::config_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("delta")
            .join("credentials.json"),
    };
    let token = match cli.token {
        Some(t) => Some(t),
        None => login::saved_token(&credentials, &cli.registry)?,
    };
    let ctx = Ctx {
        registry: cli.registry,
        cache: Cache::new(&cache_root).rehash_all(cli.verify_cache),
        json: cli.json,
        token,
        credentials,
        ca_cert: cli.ca_cert,
    };
    match cli.command {
        Command::Fingerprint(a) => fingerprint::run(a, &ctx).await,
        Command::Base(c) => base::run(c, &ctx).await,
        Command::Push(a) => push::run(a, &ctx).await,
        Command::Pull(a) => pull::run(a, &ctx).await,
        Command::Ls(a) => ls::run(a, &ctx).await,
        Command::Show(a) => show::run(a, &ctx).await,
        Command::Train(a) => jobs::train(*a, &ctx).await,
        Command::Verify(a) => jobs::verify(a, &ctx).await,
        Command::Job(a) => jobs::job(a, &ctx).await,
        Command::Doctor(a) => doctor::run(a, &ctx).await,
        Command::Cache(c) => cache::run(c, &ctx),
        Command::Predict(a) => infer::predict(a, &ctx).await,
        Command::Embed(a) => infer::embed(a, &ctx).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "delta", &mut std::io::stdout());
            Ok(())
        }
        Command::Tag(a) => tag::run(a, &ctx).await,
        Command::Apply(a) => apply::run(a, &ctx).await,
        Command::Compose(a) => compose::run(a, &ctx).await,
        Command::Export(c) => export::run(c, &ctx).await,
        Command::Login(a) => login::login(a, &ctx).await,
        Command::Whoami => login::whoami(&ctx).await,
        Command::Yank(a) => lifecycle::yank(a, &ctx).await,
        Command::Delete { reference } => lifecycle::delete(reference, &ctx).await,
        Command::Untag(a) => lifecycle::untag(a, &ctx).await,
        Command::Gc(a) => lifecycle::gc(a, &ctx).await,
        Command::Logout => login::logout(&ctx),
    }
}

/// A registry connection when any of `specs` is a reference rather than a folder.
pub async fn remote_if_needed(ctx: &Ctx, specs: &[String]) -> anyhow::Result<Option<Remote>> {
    if specs.iter().all(|d| std::path::Path::new(d).is_dir()) {
        return Ok(None);
    }
    Ok(Some(ctx.remote().await?))
}

/// Loads every delta named by `specs` (folders or references) for `base`.
pub async fn load_deltas(
    ctx: &Ctx,
    remote: Option<&Remote>,
    specs: &[String],
    base: &crate::remote::BaseRecord,
) -> anyhow::Result<Vec<crate::apply::LoadedDelta>> {
    use anyhow::Context;
    let progress = ctx.progress("pull");
    let mut deltas = Vec::new();
    for spec in specs {
        let d = crate::hub::load_delta(remote, &ctx.cache, spec, base, &progress)
            .await
            .with_context(|| format!("cannot load delta {spec}"))?;
        deltas.push(d);
    }
    Ok(deltas)
}

/// What pull and show print (on stderr) when a reference reaches a yanked version.
pub fn yanked_warning(reference: &str, repository: &str, version: u64) -> String {
    format!(
        "warning: {reference} is {repository}:v{version}, which is yanked: its publisher withdrew it (it is no longer latest); use it only if you mean to"
    )
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
