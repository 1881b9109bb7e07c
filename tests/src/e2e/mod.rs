//! End-to-end tests against real registries on 127.0.0.1.

mod auth;
mod bad_input;
mod compose_apply;
mod concurrency;
mod grpc_python;
mod isolation;
mod lifecycle;
mod limits;
mod operate;
mod peft;
mod postgres;
mod push_pull;
mod resume;
mod storage;
mod tls;
mod trust;

use std::path::PathBuf;

use clap::Parser;
use delta_client::{Cache, Remote};
use indicatif::ProgressBar;
use tempfile::TempDir;

use crate::TestRegistry;
use crate::fixtures;

/// A running registry with the tiny base registered as `tiny`, a work dir and a cache.
pub(crate) struct Env {
    pub(crate) registry: TestRegistry,
    pub(crate) remote: Remote,
    pub(crate) work: TempDir,
    pub(crate) cache: Cache,
    pub(crate) base: PathBuf,
    /// The PostgreSQL database, when the registry runs on one (else SQLite in its dir).
    pub(crate) database: Option<String>,
}

/// The metadata engines a test that touches metadata runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

impl Env {
    pub(crate) async fn start() -> Self {
        Self::start_on(Engine::Sqlite).await
    }

    /// [`Env::start`] with the registry's metadata on `engine` (a fresh database).
    pub(crate) async fn start_on(engine: Engine) -> Self {
        Self::start_tuned(engine, |_| {}).await
    }

    /// [`Env::start_on`] with the registry's test config changed by `tune` (a limit, say).
    pub(crate) async fn start_tuned(
        engine: Engine,
        tune: impl FnOnce(&mut delta_registry::RegistryConfig),
    ) -> Self {
        let database = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => Some(crate::postgres::fresh_database()),
        };
        let url = database.clone();
        let registry = TestRegistry::start_in(tempfile::tempdir().unwrap(), move |p| {
            let mut c = delta_registry::RegistryConfig::for_test(p);
            c.database_url = url;
            tune(&mut c);
            c
        })
        .await;
        let remote = registry.remote().await;
        let work = tempfile::tempdir().unwrap();
        let base = work.path().join("base.safetensors");
        fixtures::write_base(&base, 1);
        let model = delta_client::tensors::Model::open(&base).unwrap();
        assert!(remote.add_base("tiny", &model.entries()).await.unwrap());
        let cache = Cache::new(&work.path().join("cache"));
        Self {
            registry,
            remote,
            work,
            cache,
            base,
            database,
        }
    }

    /// A training job spec on the tiny base, training LoRA on `train` (a blob digest).
    pub(crate) fn train_spec(&self, train: delta_proto::Digest) -> serde_json::Value {
        let base = delta_client::tensors::Model::open(&self.base)
            .unwrap()
            .fingerprint();
        serde_json::json!({
            "base": base.to_string(),
            "train": train.to_string(),
            "spec": {"methods": ["lora"]},
        })
    }

    /// Uploads a one-example dataset through `remote` (so into its namespace) and returns
    /// a training job spec on it ([`Env::train_spec`]).
    pub(crate) async fn train_job(&self, remote: &Remote) -> serde_json::Value {
        let data = self.path("one-example.jsonl");
        std::fs::write(&data, "{\"text\":\"a\",\"label\":0}\n").unwrap();
        let digest = remote.upload_blob_file(&data, &hidden()).await.unwrap();
        self.train_spec(digest)
    }

    /// The registry's metadata store, opened beside it (as the admin commands do). Its
    /// calls block, and the PostgreSQL one runs a runtime of its own: use it from a plain
    /// thread ([`Env::with_meta`]), not from the test's runtime.
    pub(crate) fn meta(&self) -> delta_registry::SqlMeta {
        match &self.database {
            Some(url) => delta_registry::SqlMeta::connect_postgres(url).unwrap(),
            None => {
                delta_registry::SqlMeta::open(&self.registry.dir.path().join("registry.sqlite"))
                    .unwrap()
            }
        }
    }

    /// Runs `f` on the metadata store, on a thread of its own.
    pub(crate) fn with_meta<T: Send>(
        &self,
        f: impl FnOnce(&delta_registry::SqlMeta) -> T + Send,
    ) -> T {
        std::thread::scope(|s| s.spawn(|| f(&self.meta())).join().unwrap())
    }

    /// A new token on this registry; returns its secret.
    pub(crate) fn token(
        &self,
        namespace: &str,
        scope: delta_registry::auth::Scope,
        worker: bool,
    ) -> String {
        self.with_meta(|m| crate::new_token(m, namespace, scope, worker))
    }

    /// A client that sends `secret` (or no token).
    pub(crate) async fn client(&self, secret: Option<&str>) -> Remote {
        Remote::connect_with(&self.registry.url(), secret)
            .await
            .unwrap()
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs the `delta` CLI in-process against this registry and cache.
    pub(crate) async fn cli(&self, args: &[&str]) -> anyhow::Result<()> {
        let url = self.registry.url();
        let cache = self.path("cache").to_string_lossy().into_owned();
        // Never the user's own credentials file.
        let creds = self.path("credentials.json").to_string_lossy().into_owned();
        let mut argv = vec![
            "delta",
            "--registry",
            url.as_str(),
            "--cache",
            cache.as_str(),
            "--credentials",
            creds.as_str(),
        ];
        argv.extend_from_slice(args);
        delta_client::cli::run(delta_client::cli::Cli::try_parse_from(argv)?).await
    }

    /// Every repository's name and version count: what "the listing" shows.
    pub(crate) async fn listing(&self) -> Vec<(String, u64)> {
        self.remote
            .list_repositories("")
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.repository.to_string(), r.versions))
            .collect()
    }

    /// Number of blob objects in the local store.
    pub(crate) fn stored_blobs(&self) -> usize {
        count_files(&self.registry.dir.path().join("store/blobs"))
    }

    /// Pull scratch folders (`.delta-pull-*`) left in the test folder: none, after any
    /// pull that returned.
    pub(crate) fn pull_scratch(&self) -> Vec<String> {
        std::fs::read_dir(self.path(""))
            .expect("the test folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".delta-pull-"))
            .collect()
    }
}

pub(crate) fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                usize::from(!e.file_name().to_string_lossy().contains('#'))
            }
        })
        .sum()
}

/// The gRPC code of a refusal.
pub(crate) fn code(e: &delta_client::Error) -> tonic::Code {
    use delta_client::Error;
    match e {
        Error::Rejected { code, .. } => *code,
        Error::NotFound(_) => tonic::Code::NotFound,
        Error::Rpc(s) => s.code(),
        other => panic!("not a gRPC refusal: {other:?}"),
    }
}

/// An exclusive flock on `path` (created if absent) for as long as the file is kept: what
/// another process downloading a blob into a cache holds (`partial/<hex>.lock`).
pub(crate) fn hold_lock(path: &std::path::Path) -> std::fs::File {
    let held = std::fs::File::create(path).expect("lock file");
    // SAFETY: flock on a descriptor `held` owns and keeps open.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    held
}

pub(crate) fn hidden() -> ProgressBar {
    ProgressBar::hidden()
}
