//! The delta hub client: a library over the registry's gRPC API, local safetensors
//! handling, and the `delta` CLI built on it.
//!
//! # Layout
//! - `apply`: merging deltas into a base model ([`apply::apply`]).
//! - `compose`: combining deltas into a new delta ([`compose::compose`]).
//! - `numeric`: dtype conversion, the LoRA SGEMM, truncated SVD, seeded RNG.
//! - `remote`: [`Remote`], the typed registry client (resumable uploads and downloads).
//! - `service`: [`service::Service`], the client of a worker's inference service.
//! - `jobs`: training and verification job specs shared with `delta-worker`.
//! - `hub`: push, fetch and pull as library calls, and the content-addressed [`Cache`].
//! - `delta`: native and PEFT delta folders, read and written.
//! - `tensors`: memory-mapped safetensors files and models, and the base fingerprint.
//! - `cli`: the `delta` command line (one module per subcommand).
//! - `error`: [`Error`].

pub mod apply;
pub mod cli;
pub mod compose;
pub mod delta;
pub mod error;
pub mod hub;
pub mod jobs;
pub mod numeric;
pub mod remote;
pub mod service;
pub mod tensors;

pub use error::{Error, Result};
pub use hub::{Cache, CacheUsage};
pub use remote::Remote;
