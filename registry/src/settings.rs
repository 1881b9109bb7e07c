//! `delta-registry serve`'s settings, listed once ([`ServeArgs`]: flags and environment
//! through clap, a TOML file merged under them by [`read_file`]), turned into a
//! [`RegistryConfig`] ([`build_config`]), described ([`describe`]) and checked ([`check`])
//! for `check-config`. The binary only parses and dispatches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::service::SQLITE_FILE;
use crate::{RegistryConfig, SqlMeta};

/// `serve` and `check-config`: every setting once, with its flag, its environment variable
/// and its default (from `RegistryConfig::local` alone).
#[derive(clap::Args, serde::Serialize, Debug)]
pub struct ServeArgs {
    /// A TOML file with any of these settings (same names, with underscores); the
    /// environment overrides it, flags override both.
    #[arg(long, env = "DELTA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "DELTA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: `text` or `json` (one JSON object per line).
    #[arg(long, env = "DELTA_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Directory for the SQLite database (unless --database), the blobs (unless --store)
    /// and upload staging files.
    #[arg(long, env = "DELTA_DATA_DIR", default_value = "delta-data")]
    pub data_dir: PathBuf,
    /// The metadata database: `postgres://user:password@host:port/db` for several
    /// replicas sharing one PostgreSQL (default: SQLite in the data dir).
    #[arg(long, env = "DELTA_DATABASE")]
    pub database: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "DELTA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// An object_store URL for blobs (`s3://bucket/prefix` reads the usual AWS_* variables).
    #[arg(long, env = "DELTA_STORE")]
    pub store: Option<String>,
    /// An object_store option, e.g. `aws_endpoint=http://127.0.0.1:9000` or
    /// `aws_region=eu-west-1` (repeatable; overrides the AWS_* variables and the file's
    /// [store_options]).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    pub store_option: Vec<(String, String)>,
    /// Largest blob accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_blob_bytes)]
    pub max_blob_bytes: u64,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_manifest_bytes)]
    pub max_manifest_bytes: usize,
    /// Most tensors in one delta.
    #[arg(long, default_value_t = defaults().max_tensors)]
    pub max_tensors: usize,
    /// Largest safetensors header accepted, in bytes.
    #[arg(long, default_value_t = defaults().max_header_bytes)]
    pub max_header_bytes: u64,
    /// Largest gRPC message accepted, in bytes (uploads stream in 1 MiB chunks). A
    /// manifest travels in one message: this must exceed --max-manifest-bytes by 64 KiB.
    #[arg(long, default_value_t = defaults().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Most upload sessions open at once.
    #[arg(long, default_value_t = defaults().max_open_uploads)]
    pub max_open_uploads: usize,
    /// Most upload sessions one token may hold open (without tokens: one client address).
    #[arg(long, default_value_t = defaults().max_uploads_per_token)]
    pub max_uploads_per_token: usize,
    /// Most upload sessions the tokens of one namespace may hold open together.
    #[arg(long, default_value_t = defaults().max_uploads_per_namespace)]
    pub max_uploads_per_namespace: usize,
    /// Abort upload sessions that never received a byte after this long.
    #[arg(long, default_value_t = defaults().empty_upload_ttl.into())]
    #[serde(serialize_with = "as_text")]
    pub empty_upload_ttl: humantime::Duration,
    /// Cut an upload stream that sends nothing for this long (it stays resumable).
    #[arg(long, default_value_t = defaults().stream_idle_timeout.into())]
    #[serde(serialize_with = "as_text")]
    pub idle_timeout: humantime::Duration,
    /// Abort upload sessions idle for this long.
    #[arg(long, default_value_t = defaults().upload_ttl.into())]
    #[serde(serialize_with = "as_text")]
    pub upload_ttl: humantime::Duration,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The file's `[store_options]`, below the AWS_* variables and --store-option.
    #[arg(skip)]
    #[serde(skip)]
    pub file_store_options: Vec<(String, String)>,
}

/// A value as its `Display` text (durations as `5m`, as their flags take them).
fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The settings' names (underscored, as a file spells them), in `--help`'s order: the ids
/// clap gives [`ServeArgs`]' fields, so a new field is a new setting everywhere at once.
fn setting_names() -> Vec<String> {
    <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect()
}

/// The registry's defaults, shown by `--help` and used for every setting left unset: one
/// place, `RegistryConfig::local`.
pub fn defaults() -> RegistryConfig {
    RegistryConfig::local(Path::new("delta-data"))
}

/// `KEY=VALUE`.
pub fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_lowercase(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Options from several sources, later ones winning, one entry per key.
pub fn merge_options(sources: &[Vec<(String, String)>]) -> Vec<(String, String)> {
    let merged: std::collections::BTreeMap<String, String> =
        sources.iter().flatten().cloned().collect();
    merged.into_iter().collect()
}

/// The `AWS_*` variables as store options (`aws_region`, …).
pub fn aws_options() -> Vec<(String, String)> {
    // The S3 backend's settings come from the usual AWS_* variables, read here and nowhere
    // else (libraries never read the environment).
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect()
}

/// What a configuration file adds to the command line ([`read_file`]).
#[derive(Debug, Clone, Default)]
pub struct FileSettings {
    /// `--name value` pairs for the settings the command line left unset.
    pub flags: Vec<String>,
    /// The file's `[store_options]`.
    pub store_options: Vec<(String, String)>,
}

/// What a configuration file adds: flags for the settings neither a flag nor the
/// environment set (`given`: the subcommand's matches), to parse again after the command
/// line's own, and its `[store_options]`, which rank below the `AWS_*` variables and
/// `--store-option`. Unknown settings and values that are not scalars are refused, named.
pub fn read_file(path: &Path, given: &clap::ArgMatches) -> anyhow::Result<FileSettings> {
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
    let settings: Vec<String> = setting_names()
        .into_iter()
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
    Ok(FileSettings {
        flags: extra,
        store_options,
    })
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

/// The registry's configuration from the merged settings, refusing combinations no
/// registry could run with.
pub fn build_config(args: &ServeArgs) -> anyhow::Result<RegistryConfig> {
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
        (Some(cert), Some(key)) => Some(crate::config::TlsFiles { cert, key }),
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

/// The effective configuration, one `key = value` line per setting in `--help`'s order
/// (each as `ServeArgs` holds it after the merge; unset ones say so), the store options
/// merged, secrets redacted.
pub fn describe(args: &ServeArgs, c: &RegistryConfig) -> String {
    let values = serde_json::to_value(args).unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k} = {v}\n"));
    for name in setting_names() {
        match name.as_str() {
            "database" => line(
                &name,
                &c.database_url.as_deref().map_or_else(
                    || format!("sqlite ({})", c.data_dir.join(SQLITE_FILE).display()),
                    redact_url,
                ),
            ),
            "store" => line(
                &name,
                c.store_url.as_deref().unwrap_or("local (data_dir/store)"),
            ),
            "store_option" => {
                for (k, v) in &c.store_options {
                    let secret = ["secret", "token", "password", "session"]
                        .iter()
                        .any(|s| k.to_lowercase().contains(s));
                    line(
                        &format!("store_options.{k}"),
                        if secret { "<redacted>" } else { v },
                    );
                }
            }
            _ => match values.get(&name) {
                None | Some(serde_json::Value::Null) => line(&name, "unset"),
                Some(serde_json::Value::String(s)) => line(&name, s),
                Some(v) => line(&name, &v.to_string()),
            },
        }
    }
    out
}

/// A URL with its password replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
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
pub fn check(config: &RegistryConfig) -> anyhow::Result<()> {
    let store = crate::BlobStore::open(config).context("the blob store does not open")?;
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
