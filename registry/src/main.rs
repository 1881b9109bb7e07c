//! `delta-registry`: the registry server binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use delta_registry::admin::NewToken;
use delta_registry::auth::Scope;
use delta_registry::service::now;
use delta_registry::{MetaStore, RegistryConfig, SqliteMeta};
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
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The object_store URL the registry serves from (default: the data dir's own store).
    #[arg(long, env = "DELTA_STORE")]
    store: Option<String>,
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
    /// Directory for the SQLite database, and the blobs unless --store says otherwise.
    #[arg(long, env = "DELTA_DATA_DIR", default_value = "delta-data")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "DELTA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// An object_store URL for blobs (`s3://bucket/prefix` reads the usual AWS_* variables).
    #[arg(long, env = "DELTA_STORE")]
    store: Option<String>,
    /// Largest blob accepted, in bytes.
    #[arg(long, default_value_t = 64 << 30)]
    max_blob_bytes: u64,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_manifest_bytes: usize,
    /// Most tensors in one delta.
    #[arg(long, default_value_t = 100_000)]
    max_tensors: usize,
    /// Largest safetensors header accepted, in bytes.
    #[arg(long, default_value_t = 100_000_000)]
    max_header_bytes: u64,
    /// Largest gRPC message accepted, in bytes (uploads stream in 1 MiB chunks).
    #[arg(long, default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Most upload sessions open at once.
    #[arg(long, default_value_t = 1024)]
    max_open_uploads: usize,
    /// Most upload sessions one token may hold open.
    #[arg(long, default_value_t = 64)]
    max_uploads_per_token: usize,
    /// Cut an upload stream that sends nothing for this long (it stays resumable).
    #[arg(long, default_value = "60s")]
    idle_timeout: humantime::Duration,
    /// Abort upload sessions idle for this long.
    #[arg(long, default_value = "24h")]
    upload_ttl: humantime::Duration,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
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
        Command::Token(cmd) => token(cmd),
        Command::Namespace(args) => {
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
        }
        Command::Gc(args) => {
            let (meta, blobs) = open_stores(&args.store)?;
            let r = delta_registry::maintenance::collect_garbage(
                meta,
                &blobs,
                args.grace.into(),
                args.dry_run,
                now(),
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
            for d in &r.corrupt {
                println!("corrupt\t{d}");
            }
            for d in &r.missing {
                println!("missing\t{d}");
            }
            for k in &r.orphans {
                println!("orphan\t{k}");
            }
            println!(
                "checked {} blobs ({} bytes): {} corrupt, {} missing, {} orphans, {} quarantined",
                r.checked,
                r.bytes,
                r.corrupt.len(),
                r.missing.len(),
                r.orphans.len(),
                r.quarantined
            );
            if !r.clean() {
                anyhow::bail!("fsck found problems");
            }
            Ok(())
        }
        Command::Audit(dir) => {
            for e in open_meta(&dir)?.list_audit()? {
                let who = e.token.map_or("open".to_owned(), |t| format!("token {t}"));
                println!("{}\t{who}\t{}\t{}\t{}", e.at, e.action, e.target, e.digest);
            }
            Ok(())
        }
    }
}

fn open_meta(dir: &DataDir) -> anyhow::Result<SqliteMeta> {
    let db = dir.data_dir.join("registry.sqlite");
    if !db.exists() {
        anyhow::bail!(
            "{} has no registry database (start `delta-registry serve --data-dir {}` once first)",
            dir.data_dir.display(),
            dir.data_dir.display()
        );
    }
    SqliteMeta::open(&db).with_context(|| format!("cannot open {}", db.display()))
}

fn open_stores(
    args: &StoreArgs,
) -> anyhow::Result<(std::sync::Arc<dyn MetaStore>, delta_registry::BlobStore)> {
    let meta = open_meta(&args.dir)?;
    let mut config = RegistryConfig::local(&args.dir.data_dir);
    config.store_url = args.store.clone();
    config.store_options = aws_options();
    let blobs = delta_registry::BlobStore::open(&config).context("cannot open the blob store")?;
    Ok((std::sync::Arc::new(meta), blobs))
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
            std::fs::create_dir_all(&dir.data_dir)?;
            let meta = SqliteMeta::open(&dir.data_dir.join("registry.sqlite"))?;
            let new = NewToken {
                namespace,
                scope: Scope::parse(&scope)?,
                worker,
                expires_in: expires.map(Into::into),
                description,
            };
            let (id, secret) = delta_registry::admin::create_token(&meta, &new, now())?;
            let kind = if worker { "worker" } else { "user" };
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
                    (None, Some(e)) => format!("expires {e}"),
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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = RegistryConfig::local(&args.data_dir);
    config.max_blob_bytes = args.max_blob_bytes;
    config.max_manifest_bytes = args.max_manifest_bytes;
    config.max_tensors = args.max_tensors;
    config.max_header_bytes = args.max_header_bytes;
    config.max_message_bytes = args.max_message_bytes;
    config.max_open_uploads = args.max_open_uploads;
    config.max_uploads_per_token = args.max_uploads_per_token;
    config.stream_idle_timeout = args.idle_timeout.into();
    config.upload_ttl = args.upload_ttl.into();
    config.store_url = args.store;
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(delta_registry::config::TlsFiles { cert, key }),
        _ => None,
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    config.store_options = aws_options();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Signal handlers are installed before the address is announced, so a SIGTERM sent
    // right after start-up is a graceful shutdown, not a kill.
    let shutdown = shutdown_signal()?;
    // The one line on stdout: where to connect (useful with --listen 127.0.0.1:0).
    println!("delta-registry listening on {scheme}://{addr}");
    delta_registry::run(config, listener, shutdown)
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
