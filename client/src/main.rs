//! `delta`: the command-line client.

use std::process::ExitCode;

use clap::Parser;
use delta_client::cli::{Cli, run};
use tracing_subscriber::EnvFilter;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    // `delta show … | head -1`: a closed pipe ends the command quietly, as it ends any Unix
    // tool, instead of a "Broken pipe" panic.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread writes.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(id) = delta_client::error::last_request_id() {
                eprintln!("request id: {id} (the registry's logs carry it)");
            }
            ExitCode::FAILURE
        }
    }
}
