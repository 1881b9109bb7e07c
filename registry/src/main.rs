//! `delta-registry`: the registry server binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use delta_registry::admin::NewToken;
use delta_registry::auth::{Scope, TokenKind};
use delta_registry::clock::now;
use delta_registry::service::SQLITE_FILE;
use delta_registry::{MetaStore, RegistryConfig, SqlMeta};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "delta-registry",
    version,
    about = "The delta hub registry server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the registry (gRPC, with health and reflection).
    Serve(ServeArgs),
    /// Print the configuration `serve` would run with (file, environment and flags
    /// merged; secrets redacted) and check it; exits 1 if it is unusable.
    CheckConfig(ServeArgs),
    /// Manage API tokens (on the data dir; safe while the registry runs).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mark a namespace public-read, or private again.
    Namespace(NamespaceArgs),
    /// Print the audit log of writes.
    Audit(DataDir),
    /// Remove blobs no live version references (also an admin RPC: `delta gc`).
    Gc(GcArgs),
    /// Re-hash every blob and check the database against the store; exits 1 on any problem.
    Fsck(FsckArgs),
    /// TLS certificates.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Subcommand, Debug)]
enum TlsCommand {
    /// Write a self-signed server certificate (`cert.pem`) and its key (`key.pem`, 0600):
    /// serve with `--tls-cert DIR/cert.pem --tls-key DIR/key.pem`, and clients trust it with
    /// `--ca-cert DIR/cert.pem`.
    SelfSigned {
        /// Folder to write into (created).
        #[arg(long)]
        out: PathBuf,
        /// Host names and IP addresses clients use to reach the registry (repeatable).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The object_store URL the registry serves from (default: the data dir's own store).
    #[arg(long, env = "DELTA_STORE")]
    store: Option<String>,
    /// An object_store option, e.g. `aws_endpoint=http://127.0.0.1:9000` (repeatable;
    /// overrides the AWS_* variables).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    store_option: Vec<(String, String)>,
}

#[derive(clap::Args, Debug)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep blobs referenced within this period (uploads in flight, racing pushes).
    #[arg(long, default_value = "1h")]
    grace: humantime::Duration,
}

#[derive(clap::Args, Debug)]
struct FsckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Quarantine corrupt blobs (a re-push heals them) and delete orphans.
    #[arg(long)]
    repair: bool,
    /// Objects younger than this are uploads in flight, not orphans.
    #[arg(long, default_value = "1h")]
    grace: humantime::Duration,
}

#[derive(clap::Args, Debug)]
struct DataDir {
    /// The registry's data directory.
    #[arg(long, env = "DELTA_DATA_DIR", default_value = "delta-data")]
    data_dir: PathBuf,
    /// The metadata database, when it is PostgreSQL (`postgres://...`) rather than the
    /// data dir's SQLite file.
    #[arg(long, env = "DELTA_DATABASE")]
    database: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token; the secret is printed once, as the last line.
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// The namespace it grants access to, or '*' for all.
        #[arg(long)]
        namespace: String,
        /// read, write or admin.
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. 30d, 12h (default: until revoked).
        #[arg(long)]
        expires: Option<humantime::Duration>,
        /// A worker token (for delta-worker) instead of a user token.
        #[arg(long)]
        worker: bool,
        /// Free text shown by `token ls`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    Ls(DataDir),
    /// Revoke a token by id.
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        /// Token id (from `token ls`).
        id: i64,
    },
}

#[derive(clap::Args, Debug)]
struct NamespaceArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The namespace.
    namespace: String,
    /// Make it readable by anyone.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// Make it readable only with a token again.
    #[arg(long)]
    private: bool,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// A TOML file with any of these settings (same names, with underscores); the
    /// environment overrides it, flags override both.
    #[arg(long, env = "DELTA_CONFIG")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "DELTA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format: `text` or `json` (one JSON object per line).
    #[arg(long, env = "DELTA_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Directory for the SQLite database (unless --database), the blobs (unless --store)
    /// and upload staging files.
    #[arg(long, env = "DELTA_DATA_DIR", default_value = "delta-data")]
    data_dir: PathBuf,
    /// The metadata database: `postgres://user:password@host:port/db` for several
    /// replicas sharing one PostgreSQL (default: SQLite in the data dir).
    #[arg(long, env = "DELTA_DATABASE")]
    database: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "DELTA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// An object_store URL for blobs (`s3://bucket/prefix` reads the usual AWS_* variables).
    #[arg(long, env = "DELTA_STORE")]
    store: Option<String>,
    /// An object_store option, e.g. `aws_endpoint=http://127.0.0.1:9000` or
    /// `aws_region=eu-west-1` (repeatable; overrides the AWS_* variables and the file's
    /// [store_options]).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    store_option: Vec<(String, String)>,
    /// Largest blob accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_blob_bytes)]
    max_blob_bytes: u64,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_manifest_bytes)]
    max_manifest_bytes: usize,
    /// Most tensors in one delta.
    #[arg(long, default_value_t = defaults().max_tensors)]
    max_tensors: usize,
    /// Largest safetensors header accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_header_bytes)]
    max_header_bytes: u64,
    /// Largest gRPC message accepted, in bytes (uploads stream in 1 MiB chunks). A
    /// manifest travels in one message: this must exceed --max-manifest-bytes by 64 KiB.
    #[arg(long, default_value_t = defaults().max_message_bytes)]
    max_message_bytes: usize,
    /// Most upload sessions open at once.
    #[arg(long, default_value_t = defaults().max_open_uploads)]
    max_open_uploads: usize,
    /// Most upload sessions one token may hold open (without tokens: one client address).
    #[arg(long, default_value_t = defaults().max_uploads_per_token)]
    max_uploads_per_token: usize,
    /// Most upload sessions the tokens of one namespace may hold open together.
    #[arg(long, default_value_t = defaults().max_uploads_per_namespace)]
    max_uploads_per_namespace: usize,
    /// Abort upload sessions that never received a byte after this long.
    #[arg(long, default_value_t = defaults().empty_upload_ttl.into())]
    empty_upload_ttl: humantime::Duration,
    /// Cut an upload stream that sends nothing for this long (it stays resumable).
    #[arg(long, default_value_t = defaults().stream_idle_timeout.into())]
    idle_timeout: humantime::Duration,
    /// Abort upload sessions idle for this long.
    #[arg(long, default_value_t = defaults().upload_ttl.into())]
    upload_ttl: humantime::Duration,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The file's `[store_options]`, below the AWS_* variables and --store-option.
    #[arg(skip)]
    file_store_options: Vec<(String, String)>,
}

/// The registry's defaults, shown by `--help` and used for every setting left unset: one
/// place, `RegistryConfig::local`.
fn defaults() -> RegistryConfig {
    RegistryConfig::local(std::path::Path::new("delta-data"))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The configuration file fills what neither a flag nor the environment set.
    let sub = matches
        .subcommand_matches("serve")
        .or_else(|| matches.subcommand_matches("check-config"));
    if let (Command::Serve(args) | Command::CheckConfig(args), Some(sub)) = (&cli.command, sub)
        && let Some(path) = args.config.clone()
    {
        match with_file(&path, sub) {
            Ok(merged) => cli = merged,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    // `check-config | head -2`: a closed pipe ends a command quietly, as it ends any Unix
    // tool. Not for `serve`, which must outlive whoever read its first line.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve(_)) {
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let json = matches!(&cli.command, Command::Serve(a) | Command::CheckConfig(a) if a.log_format == "json");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::CheckConfig(args) => {
            let config = build_config(&args)?;
            print!("{}", describe(&args, &config));
            check(&config)?;
            println!("configuration OK");
            Ok(())
        }
        // PostgreSQL calls block on the runtime: the synchronous commands step off it.
        Command::Token(cmd) => tokio::task::block_in_place(|| token(cmd)),
        Command::Namespace(args) => tokio::task::block_in_place(|| {
            let meta = open_meta(&args.dir)?;
            delta_registry::admin::check_namespace(&args.namespace)?;
            if !args.public && !args.private {
                let public = meta.is_public(&args.namespace)?;
                println!(
                    "{} is {}",
                    args.namespace,
                    if public { "public-read" } else { "private" }
                );
                return Ok(());
            }
            meta.set_public(&args.namespace, args.public)?;
            println!(
                "{} is now {}",
                args.namespace,
                if args.public {
                    "public-read"
                } else {
                    "private"
                }
            );
            Ok(())
        }),
        Command::Gc(args) => {
            let (meta, blobs) = open_stores(&args.store)?;
            let r = delta_registry::maintenance::collect_garbage(
                meta,
                &blobs,
                args.grace.into(),
                args.dry_run,
                delta_registry::meta::Actor::local(now()),
            )
            .await?;
            for d in &r.removed {
                println!("{d}");
            }
            let verb = if r.dry_run { "would free" } else { "freed" };
            println!("{verb} {} bytes in {} blobs", r.bytes, r.removed.len());
            Ok(())
        }
        Command::Fsck(args) => {
            let (meta, blobs) = open_stores(&args.store)?;
            let r = delta_registry::maintenance::fsck(
                meta,
                &blobs,
                args.repair,
                args.grace.into(),
                now(),
            )
            .await?;
            let used_by = |d: &delta_proto::Digest| match r.users.get(d) {
                Some(u) if !u.is_empty() => format!("\tused by {}", u.join(", ")),
                _ => "\tused by no version".to_owned(),
            };
            for d in &r.corrupt {
                println!("corrupt\t{d}{}", used_by(d));
            }
            for d in &r.missing {
                println!("missing\t{d}{}", used_by(d));
            }
            for k in &r.orphans {
                println!("orphan\t{k}");
            }
            for k in &r.stale_staging {
                println!("staging\t{k}");
            }
            println!(
                "checked {} blobs ({} bytes): {} corrupt, {} missing, {} orphans, {} quarantined, \
                 {} stale staging files{}",
                r.checked,
                r.bytes,
                r.corrupt.len(),
                r.missing.len(),
                r.orphans.len(),
                r.quarantined,
                r.stale_staging.len(),
                if args.repair { " (removed)" } else { "" }
            );
            if !r.clean() {
                anyhow::bail!("fsck found problems");
            }
            Ok(())
        }
        Command::Tls(TlsCommand::SelfSigned { out, names }) => {
            let (cert, key) = delta_registry::tls::self_signed(&names)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
            std::fs::write(&cert_path, cert)
                .with_context(|| format!("writing {}", cert_path.display()))?;
            write_private(&key_path, key.as_bytes())?;
            println!("wrote {} and {}", cert_path.display(), key_path.display());
            println!(
                "serve:  delta-registry serve --tls-cert {} --tls-key {}",
                cert_path.display(),
                key_path.display()
            );
            println!(
                "client: delta --registry https://{}:50051 --ca-cert {} ls",
                names.first().map(String::as_str).unwrap_or("localhost"),
                cert_path.display()
            );
            Ok(())
        }
        Command::Audit(dir) => tokio::task::block_in_place(|| {
            for e in open_meta(&dir)?.list_audit()? {
                let who = e
                    .token
                    .map_or("no token".to_owned(), |t| format!("token {t}"));
                println!(
                    "{}\t{who}\t{}\t{}\t{}",
                    when(e.at),
                    e.action,
                    e.target,
                    e.digest
                );
            }
            Ok(())
        }),
    }
}

fn open_meta(dir: &DataDir) -> anyhow::Result<SqlMeta> {
    if let Some(url) = &dir.database {
        return tokio::task::block_in_place(|| SqlMeta::open_url(url))
            .with_context(|| format!("cannot open the database {}", redact_url(url)));
    }
    let db = dir.data_dir.join(SQLITE_FILE);
    if !db.exists() {
        anyhow::bail!(
            "{} has no registry database (start `delta-registry serve --data-dir {}` once first)",
            dir.data_dir.display(),
            dir.data_dir.display()
        );
    }
    SqlMeta::open(&db).with_context(|| format!("cannot open {}", db.display()))
}

fn open_stores(
    args: &StoreArgs,
) -> anyhow::Result<(std::sync::Arc<dyn MetaStore>, delta_registry::BlobStore)> {
    let meta = open_meta(&args.dir)?;
    let mut config = RegistryConfig::local(&args.dir.data_dir);
    config.store_url = args.store.clone();
    config.store_options = merge_options(&[aws_options(), args.store_option.clone()]);
    let blobs = delta_registry::BlobStore::open(&config).context("cannot open the blob store")?;
    Ok((std::sync::Arc::new(meta), blobs))
}

/// `KEY=VALUE`.
fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_lowercase(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Options from several sources, later ones winning, one entry per key.
fn merge_options(sources: &[Vec<(String, String)>]) -> Vec<(String, String)> {
    let merged: std::collections::BTreeMap<String, String> =
        sources.iter().flatten().cloned().collect();
    merged.into_iter().collect()
}

fn aws_options() -> Vec<(String, String)> {
    // The S3 backend's settings come from the usual AWS_* variables, read here and nowhere
    // else (libraries never read the environment).
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect()
}

fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            dir,
            namespace,
            scope,
            expires,
            worker,
            description,
        } => {
            let meta = match &dir.database {
                Some(_) => open_meta(&dir)?,
                None => {
                    std::fs::create_dir_all(&dir.data_dir)?;
                    SqlMeta::open(&dir.data_dir.join(SQLITE_FILE))?
                }
            };
            let new = NewToken {
                namespace,
                scope: scope.parse::<Scope>()?,
                worker,
                expires_in: expires.map(Into::into),
                description,
            };
            let (id, secret) = delta_registry::admin::create_token(&meta, &new, now())?;
            let kind = if worker {
                TokenKind::Worker
            } else {
                TokenKind::User
            };
            println!(
                "created {kind} token {id}: {} on {}",
                new.scope, new.namespace
            );
            println!("{secret}");
            Ok(())
        }
        TokenCommand::Ls(dir) => {
            for t in open_meta(&dir)?.list_tokens()? {
                let state = match (t.revoked_at, t.expires_at) {
                    (Some(_), _) => "revoked".to_owned(),
                    (None, Some(e)) if e <= now() => "expired".to_owned(),
                    (None, Some(e)) => format!("expires {}", when(e)),
                    (None, None) => "active".to_owned(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{state}\t{}",
                    t.id, t.kind, t.scope, t.namespace, t.description
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { dir, id } => {
            if !open_meta(&dir)?.revoke_token(id, now())? {
                anyhow::bail!("no token {id}");
            }
            println!("token {id} revoked");
            Ok(())
        }
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-02T16:28:15Z`).
fn when(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(s) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        )
        .to_string(),
        Err(_) => unix.to_string(),
    }
}

/// The command line again with the TOML file's settings added for everything no flag or
/// environment variable set: each `key = value` becomes `--key value`, so the file is
/// parsed and checked by the same flags (one list of settings, `ServeArgs`), and the
/// flags and environment keep their precedence. `[store_options]` is kept apart for
/// `build_config`.
fn with_file(path: &std::path::Path, given: &clap::ArgMatches) -> anyhow::Result<Cli> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    let store_options = match table.remove("store_options") {
        None => Vec::new(),
        Some(toml::Value::Table(t)) => t
            .into_iter()
            .map(|(k, v)| match scalar(&v) {
                Some(v) => Ok((k, v)),
                None => anyhow::bail!(
                    "config file {}: store_options.{k} must be a string or a number",
                    path.display()
                ),
            })
            .collect::<anyhow::Result<_>>()?,
        Some(_) => anyhow::bail!(
            "config file {}: store_options must be a table ([store_options])",
            path.display()
        ),
    };
    let settings: Vec<String> =
        <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "config" && id != "store_option")
            .collect();
    let mut extra = Vec::new();
    for (key, value) in &table {
        if !settings.contains(key) {
            anyhow::bail!(
                "config file {}: unknown setting {key:?} (the settings are: {}, store_options)",
                path.display(),
                settings.join(", ")
            );
        }
        let unset = matches!(
            given.value_source(key),
            None | Some(clap::parser::ValueSource::DefaultValue)
        );
        if unset {
            let Some(value) = scalar(value) else {
                anyhow::bail!(
                    "config file {}: {key} must be a string or a number",
                    path.display()
                );
            };
            extra.push(format!("--{}", key.replace('_', "-")));
            extra.push(value);
        }
    }
    let argv = std::env::args_os().chain(extra.into_iter().map(Into::into));
    let mut cli = Cli::try_parse_from(argv).map_err(|e| {
        // The flags alone parsed: what fails now came from the file.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "config file {}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        )
    })?;
    if let Command::Serve(args) | Command::CheckConfig(args) = &mut cli.command {
        args.file_store_options = store_options;
    }
    Ok(cli)
}

/// A TOML scalar as the text a flag would take.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn build_config(args: &ServeArgs) -> anyhow::Result<RegistryConfig> {
    if !matches!(args.log_format.as_str(), "text" | "json") {
        anyhow::bail!(
            "--log-format must be text or json, not {:?}",
            args.log_format
        );
    }
    // A manifest (and a job spec) travels in one message, with room for the rest of it.
    let room = args.max_manifest_bytes.saturating_add(64 << 10);
    if args.max_message_bytes < room {
        anyhow::bail!(
            "--max-message-bytes ({}) must be at least --max-manifest-bytes + 64 KiB ({room}): a manifest travels in one message",
            args.max_message_bytes
        );
    }
    let mut config = RegistryConfig::local(&args.data_dir);
    config.max_blob_bytes = args.max_blob_bytes;
    config.max_manifest_bytes = args.max_manifest_bytes;
    config.max_tensors = args.max_tensors;
    config.max_header_bytes = args.max_header_bytes;
    config.max_message_bytes = args.max_message_bytes;
    config.max_open_uploads = args.max_open_uploads;
    config.max_uploads_per_token = args.max_uploads_per_token;
    config.max_uploads_per_namespace = args.max_uploads_per_namespace;
    config.empty_upload_ttl = args.empty_upload_ttl.into();
    config.stream_idle_timeout = args.idle_timeout.into();
    config.upload_ttl = args.upload_ttl.into();
    config.store_url = args.store.clone();
    config.database_url = args.database.clone();
    config.tls = match (args.tls_cert.clone(), args.tls_key.clone()) {
        (Some(cert), Some(key)) => Some(delta_registry::config::TlsFiles { cert, key }),
        (None, None) => None,
        _ => anyhow::bail!("TLS needs both tls_cert and tls_key"),
    };
    // File options first, AWS_* variables override them.
    // The file's options, then AWS_* variables, then --store-option flags.
    config.store_options = merge_options(&[
        args.file_store_options.clone(),
        aws_options(),
        args.store_option.clone(),
    ]);
    config.metrics_addr = args.metrics_listen;
    Ok(config)
}

/// The effective configuration, one `key = value` line each, secrets redacted.
fn describe(args: &ServeArgs, c: &RegistryConfig) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    line("config", format!("{:?}", args.config));
    line("listen", args.listen.to_string());
    line("data_dir", c.data_dir.display().to_string());
    line(
        "database",
        c.database_url.as_deref().map_or_else(
            || format!("sqlite ({})", c.data_dir.join(SQLITE_FILE).display()),
            redact_url,
        ),
    );
    line(
        "store",
        c.store_url
            .clone()
            .unwrap_or_else(|| "local (data_dir/store)".into()),
    );
    for (k, v) in &c.store_options {
        let secret = ["secret", "token", "password", "session"]
            .iter()
            .any(|s| k.to_lowercase().contains(s));
        line(
            &format!("store_options.{k}"),
            if secret {
                "<redacted>".into()
            } else {
                v.clone()
            },
        );
    }
    line("max_blob_bytes", c.max_blob_bytes.to_string());
    line("max_manifest_bytes", c.max_manifest_bytes.to_string());
    line("max_tensors", c.max_tensors.to_string());
    line("max_header_bytes", c.max_header_bytes.to_string());
    line("max_message_bytes", c.max_message_bytes.to_string());
    line("max_open_uploads", c.max_open_uploads.to_string());
    line("max_uploads_per_token", c.max_uploads_per_token.to_string());
    line(
        "max_uploads_per_namespace",
        c.max_uploads_per_namespace.to_string(),
    );
    line(
        "empty_upload_ttl",
        humantime::format_duration(c.empty_upload_ttl).to_string(),
    );
    line(
        "idle_timeout",
        humantime::format_duration(c.stream_idle_timeout).to_string(),
    );
    line(
        "upload_ttl",
        humantime::format_duration(c.upload_ttl).to_string(),
    );
    line(
        "tls",
        c.tls
            .as_ref()
            .map_or("off".into(), |t| t.cert.display().to_string()),
    );
    line(
        "metrics_listen",
        c.metrics_addr.map_or("off".into(), |a| a.to_string()),
    );
    line("log_format", args.log_format.clone());
    out
}

/// A URL with its password replaced by `<redacted>`.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable URL>".into(),
    }
}

/// What `check-config` checks beyond parsing: the store opens, TLS files read.
fn check(config: &RegistryConfig) -> anyhow::Result<()> {
    let store = delta_registry::BlobStore::open(config).context("the blob store does not open")?;
    // An unreachable bucket would otherwise pass here and fail every push.
    let probe = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(15), store.probe()).await
        })
    });
    match probe {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the blob store {} does not take a write",
                config.store_url.as_deref().unwrap_or("(data dir)")
            )));
        }
        Err(_) => anyhow::bail!(
            "the blob store {} did not answer within 15 s",
            config.store_url.as_deref().unwrap_or("(data dir)")
        ),
    }
    if let Some(url) = &config.database_url {
        // Connecting also applies missing migrations, as `serve` would.
        tokio::task::block_in_place(|| SqlMeta::open_url(url))
            .with_context(|| format!("the database {} does not open", redact_url(url)))?;
    }
    if let Some(t) = &config.tls {
        for p in [&t.cert, &t.key] {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    for l in describe(&args, &config).lines() {
        tracing::info!(setting = l, "config");
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // The database is migrated before the port opens: nothing connects to a registry
    // that is still creating its tables.
    let registry = delta_registry::Server::open(config)
        .await
        .context("cannot open the registry")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Signal handlers are installed before the address is announced, so a SIGTERM sent
    // right after start-up is a graceful shutdown, not a kill.
    let shutdown = shutdown_signal()?;
    // The one line on stdout: where to connect (useful with --listen 127.0.0.1:0).
    println!("delta-registry listening on {scheme}://{addr}");
    registry
        .serve(listener, shutdown)
        .await
        .context("registry failed")
}

fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        tracing::info!("shutting down");
    })
}
