//! End-to-end tests against real registries on 127.0.0.1.

mod auth;
mod bad_input;
mod compose_apply;
mod concurrency;
mod grpc_python;
mod lifecycle;
mod limits;
mod operate;
mod postgres;
mod push_pull;
mod resume;
mod storage;
mod tls;

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
}

impl Env {
    pub(crate) async fn start() -> Self {
        let registry = TestRegistry::start().await;
        let remote = registry.remote().await;
        let work = tempfile::tempdir().unwrap();
        let base = work.path().join("base.safetensors");
        fixtures::write_base(&base, 1);
        let model = delta_client::tensors::Model::open(&base).unwrap();
        assert!(
            remote
                .add_base("tiny", model.fingerprint(), model.table())
                .await
                .unwrap()
        );
        let cache = Cache::new(&work.path().join("cache"));
        Self {
            registry,
            remote,
            work,
            cache,
            base,
        }
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
            .map(|r| (r.repository, r.versions))
            .collect()
    }

    /// Number of blob objects in the local store.
    pub(crate) fn stored_blobs(&self) -> usize {
        count_files(&self.registry.dir.path().join("store/blobs"))
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

pub(crate) fn hidden() -> ProgressBar {
    ProgressBar::hidden()
}
