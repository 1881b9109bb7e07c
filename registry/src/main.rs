//! `delta-registry`: the registry server binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use delta_registry::RegistryConfig;
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
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = RegistryConfig::local(&args.data_dir);
    config.max_blob_bytes = args.max_blob_bytes;
    config.store_url = args.store;
    // The S3 backend's settings come from the usual AWS_* variables, read here and nowhere
    // else (libraries never read the environment).
    config.store_options = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Signal handlers are installed before the address is announced, so a SIGTERM sent
    // right after start-up is a graceful shutdown, not a kill.
    let shutdown = shutdown_signal()?;
    // The one line on stdout: where to connect (useful with --listen 127.0.0.1:0).
    println!("delta-registry listening on http://{addr}");
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
