//! End-to-end test harness: a real registry (SQLite + local object store in a temp dir)
//! serving gRPC on 127.0.0.1, and tiny safetensors fixtures written by the tests.
//!
//! # Layout
//! - [`TestRegistry`]: start, address, stop.
//! - [`fixtures`]: tiny base models, native deltas and PEFT LoRA folders.
//! - `e2e` (tests only): the end-to-end tests, one module per area; `tidy` (tests only):
//!   checks over the workspace's source (no import loops).

use std::net::SocketAddr;
use std::path::Path;

use delta_registry::RegistryConfig;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod fixtures;
pub mod postgres;
pub mod s3;

#[cfg(test)]
mod e2e;
#[cfg(test)]
mod tidy;

/// A new token on a registry's metadata store (as `delta-registry token create` makes
/// one); returns its secret. Blocking: call it from a plain thread.
pub fn new_token(
    meta: &delta_registry::SqlMeta,
    namespace: &str,
    scope: delta_registry::auth::Scope,
    worker: bool,
) -> String {
    let new = delta_registry::admin::NewToken {
        namespace: namespace.into(),
        scope,
        worker,
        expires_in: None,
        description: String::new(),
    };
    delta_registry::admin::create_token(meta, &new, delta_registry::clock::now())
        .expect("create token")
        .1
}

/// Runs `cmd` with its standard output closed before it writes (`cmd | head -0`) and
/// checks it ends quietly: no panic, no "Broken pipe" message, not exit code 101.
pub fn assert_closed_pipe_is_quiet(cmd: &mut std::process::Command) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// A registry on 127.0.0.1:<ephemeral> over a temp dir.
#[derive(Debug)]
pub struct TestRegistry {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data dir.
    pub dir: TempDir,
    stop: oneshot::Sender<()>,
    task: JoinHandle<delta_registry::Result<()>>,
}

impl TestRegistry {
    /// Starts a registry with the default test config.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, RegistryConfig::for_test).await
    }

    /// Starts a registry on `dir` with a config built from it.
    pub async fn start_in(dir: TempDir, config: impl FnOnce(&Path) -> RegistryConfig) -> Self {
        Self::launch(dir, config, None).await
    }

    /// [`TestRegistry::start_in`] with `/metrics` served on a loopback listener bound
    /// here (no free-port race); returns its address too.
    pub async fn start_with_metrics(
        dir: TempDir,
        config: impl FnOnce(&Path) -> RegistryConfig,
    ) -> (Self, SocketAddr) {
        let metrics = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let metrics_addr = metrics.local_addr().expect("local addr");
        (Self::launch(dir, config, Some(metrics)).await, metrics_addr)
    }

    async fn launch(
        dir: TempDir,
        config: impl FnOnce(&Path) -> RegistryConfig,
        metrics: Option<TcpListener>,
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("warn")
            .try_init();
        // Bound before the server task starts: no port race, no sleep.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, rx) = oneshot::channel();
        let config = config(dir.path());
        let task = tokio::spawn(async move {
            let mut server = delta_registry::Server::open(config).await?;
            if let Some(m) = metrics {
                server = server.with_metrics_listener(m);
            }
            server
                .serve(listener, async {
                    rx.await.ok();
                })
                .await
        });
        Self {
            addr,
            dir,
            stop,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connects a client.
    pub async fn remote(&self) -> delta_client::Remote {
        delta_client::Remote::connect(&self.url())
            .await
            .expect("connect to test registry")
    }

    /// Stops the server gracefully and returns its data dir, for a restart.
    pub async fn stop(self) -> TempDir {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("registry task panicked")
            .expect("registry failed");
        self.dir
    }
}
