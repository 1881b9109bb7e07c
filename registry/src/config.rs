//! [`RegistryConfig`]: everything the registry needs to start, as plain data. `main.rs`
//! builds it from flags and the environment; tests use [`RegistryConfig::for_test`].

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where SQLite lives (unless `database_url` says otherwise), the blobs too unless
    /// `store_url` does, and upload staging files.
    pub data_dir: PathBuf,
    /// The metadata database: `postgres://user:password@host:port/db` for replicas sharing
    /// one PostgreSQL. `None`: SQLite at `data_dir/registry.sqlite`.
    pub database_url: Option<String>,
    /// An object_store URL (`s3://bucket/prefix`, `file:///path`, `memory:///`). `None`:
    /// the local filesystem under `data_dir/store`.
    pub store_url: Option<String>,
    /// Options for the object store (for S3: `aws_endpoint`, `aws_region`, credentials).
    pub store_options: Vec<(String, String)>,
    /// Largest blob accepted.
    pub max_blob_bytes: u64,
    /// Largest manifest accepted.
    pub max_manifest_bytes: usize,
    /// Largest safetensors header accepted.
    pub max_header_bytes: u64,
    /// Most tensors in one delta.
    pub max_tensors: usize,
    /// Largest gRPC message accepted (uploads stream in chunks well below it). A manifest
    /// travels in one message, so this bounds the manifest limit, and the tensor count
    /// with it (each tensor is a line of the manifest).
    pub max_message_bytes: usize,
    /// Most upload sessions open at once.
    pub max_open_uploads: usize,
    /// Idle upload sessions older than this are aborted.
    pub upload_ttl: Duration,
    /// Staging files (`#N`) older than this are removed at start-up.
    pub staging_grace: Duration,
    /// Garbage collection keeps blobs referenced more recently than this.
    pub gc_grace: Duration,
    /// An upload stream that sends nothing for this long is cut (its session stays
    /// resumable).
    pub stream_idle_timeout: Duration,
    /// Most upload sessions one token may hold open (without a token, in an open
    /// registry: one peer address).
    pub max_uploads_per_token: usize,
    /// Most upload sessions the tokens of one namespace may hold open together.
    pub max_uploads_per_namespace: usize,
    /// Upload sessions that never received a byte are aborted after this long idle.
    pub empty_upload_ttl: Duration,
    /// Serve TLS with this PEM certificate chain and private key (`None`: plain HTTP/2).
    pub tls: Option<TlsFiles>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl RegistryConfig {
    /// The defaults for a registry on local disk under `data_dir`.
    pub fn local(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            database_url: None,
            store_url: None,
            store_options: Vec::new(),
            metrics_addr: None,
            max_blob_bytes: 64 << 30,
            max_manifest_bytes: 4 << 20,
            max_header_bytes: delta_proto::safetensors::DEFAULT_MAX_HEADER,
            max_tensors: 100_000,
            max_message_bytes: 5 << 20,
            max_open_uploads: 1024,
            upload_ttl: Duration::from_secs(24 * 3600),
            staging_grace: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
            stream_idle_timeout: Duration::from_secs(60),
            max_uploads_per_token: 64,
            max_uploads_per_namespace: 256,
            empty_upload_ttl: Duration::from_secs(300),
            tls: None,
        }
    }

    /// The same as [`RegistryConfig::local`]; named for tests.
    pub fn for_test(data_dir: &Path) -> Self {
        Self::local(data_dir)
    }
}
