//! `delta-registry`: the registry server binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use delta_registry::admin::NewToken;
use delta_registry::auth::{Scope, TokenKind};
use delta_registry::clock::now;
use delta_registry::service::SQLITE_FILE;
use delta_registry::settings::{
    self, ServeArgs, aws_options, build_config, check, describe, merge_options, parse_option,
    redact_url,
};
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
                eprintln!("error: {}", delta_proto::error_line(e.chain()));
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
            eprintln!("error: {}", delta_proto::error_line(e.chain()));
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
/// The command line again, with the file's settings for what it left unset (see
/// `settings::read_file`).
fn with_file(path: &std::path::Path, given: &clap::ArgMatches) -> anyhow::Result<Cli> {
    let file = settings::read_file(path, given)?;
    let argv = std::env::args_os().chain(file.flags.into_iter().map(Into::into));
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
        args.file_store_options = file.store_options;
    }
    Ok(cli)
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
