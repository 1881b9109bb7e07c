//! The shared language of the delta hub: the gRPC service generated from
//! `delta/registry/v1/registry.proto`, and the domain types every side agrees on.
//!
//! Only this crate, `delta-registry`'s `service` module and `delta-client`'s `remote`
//! module touch generated types; everything else works with [`Digest`], [`Reference`],
//! [`Manifest`] and [`manifest::TensorInfo`].
//!
//! # Layout
//! - `digest`: [`Digest`], the blake3 content address, and its strict parser.
//! - `reference`: repository, tag and reference syntax.
//! - `manifest`: the delta manifest, its canonical JSON and the delta-vs-base shape rules.
//! - `fingerprint`: the base fingerprint over a tensor table.
//! - `safetensors`: a strict safetensors header parser.
//! - generated: `registry_client`, `registry_server` and the messages (re-exported here).

pub mod digest;
pub mod fingerprint;
pub mod manifest;
pub mod reference;
pub mod safetensors;

pub use digest::Digest;
pub use manifest::Manifest;
pub use reference::{Reference, Repository, Selector};

#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
mod generated {
    tonic::include_proto!("delta.registry.v1");
}
pub use generated::*;

/// The encoded file descriptor set of the service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("delta_descriptor");

/// Largest payload of one `UploadChunk` or `BlobChunk`. tonic's default receive limit is
/// 4 MiB per message, so 1 MiB chunks leave headroom.
pub const CHUNK_SIZE: usize = 1 << 20;

impl From<manifest::TensorInfo> for generated::TensorInfo {
    fn from(t: manifest::TensorInfo) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
        }
    }
}

impl From<generated::TensorInfo> for manifest::TensorInfo {
    fn from(t: generated::TensorInfo) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
        }
    }
}
