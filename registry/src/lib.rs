//! The delta hub registry: a gRPC server that stores fine-tuning deltas by content, keyed to
//! the base models they belong to.
//!
//! Blobs (tensor files) go through `object_store` (local disk by default, S3-compatible
//! storage by URL); metadata (bases, manifests, repositories, versions, tags) goes through
//! the [`MetaStore`] trait, implemented once ([`SqlMeta`]) on SQLite (embedded) or
//! PostgreSQL (shared by replicas). A blob becomes visible only once every
//! byte arrived and matched its blake3 digest, and a metadata row is written only after the
//! bytes it names are durable.
//!
//! # Layout
//! - `auth`: callers, scopes and the open/closed rule; `admin`: tokens, authentication.
//! - `config`: [`RegistryConfig`], plain settings; `settings`: `serve`'s flags, environment
//!   and file merged into one (`ServeArgs`), described and checked.
//! - `server`: [`Server`] (open, then serve) and [`run`], the entry point (registry +
//!   health + reflection).
//! - `service`: [`RegistryService`], the gRPC handlers (by concern: `blobs`, `deltas`,
//!   `jobs`) over a shared core, and manifest validation.
//! - `uploads`: resumable upload sessions, hashed while they stream.
//! - `blobs`: [`BlobStore`], content-addressed bytes over `object_store` (staged uploads,
//!   conditional publish, cleanup; `blobs/s3.rs`: incomplete multipart uploads on S3).
//! - `maintenance`: garbage collection and fsck.
//! - `meta`: [`MetaStore`] and [`SqlMeta`], with the job queue under it (`meta::jobs`);
//!   `sql`: the SQL layer both engines share (`sql/postgres.rs`: the PostgreSQL pool).
//! - `clock`: the one clock, at the bottom: every module may read it.
//! - `telemetry`: request ids, per-RPC metrics, the `/metrics` endpoint.
//! - `error`: [`Error`] and its mapping to gRPC status codes.

pub mod admin;
pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod error;
pub mod maintenance;
pub mod meta;
pub mod server;
pub mod service;
pub mod settings;
mod sql;
pub mod telemetry;
pub mod tls;
mod uploads;

pub use blobs::BlobStore;
pub use config::RegistryConfig;
pub use error::{Error, Result};
pub use meta::{MetaStore, SqlMeta};
pub use server::{Server, run};
pub use service::RegistryService;
