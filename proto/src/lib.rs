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
//! - `jobs`: job kinds and states.
//! - generated: `registry_client`, `registry_server` and the messages (re-exported here);
//!   [`inference`]: the worker's inference service.

/// `as_str`, `FromStr` and `Display` over the names of a closed set.
macro_rules! names {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+) => {
        impl $ty {
            /// Every value.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name on the wire and in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::UnknownName;
            fn from_str(s: &str) -> Result<Self, $crate::UnknownName> {
                $ty::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| $crate::UnknownName {
                        what: $what,
                        name: $crate::excerpt(s),
                        expected: concat!($($name, ", "),+).trim_end_matches(", "),
                    })
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod catalog;
pub mod digest;
pub mod fingerprint;
pub mod jobs;
pub mod manifest;
pub mod reference;
pub mod safetensors;
pub mod tokens;

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

/// The worker's inference service (`delta/inference/v1/inference.proto`): many callers'
/// deltas served in mixed batches over shared bases.
pub mod inference {
    #[allow(
        missing_docs,
        unreachable_pub,
        missing_debug_implementations,
        clippy::all
    )]
    mod generated {
        tonic::include_proto!("delta.inference.v1");
    }
    pub use generated::*;

    /// The encoded file descriptor set of the inference service, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("inference_descriptor");
}

/// A name that is none of a closed set's (a job kind, a token scope, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} is not one of {expected}")]
pub struct UnknownName {
    pub(crate) what: &'static str,
    pub(crate) name: String,
    pub(crate) expected: &'static str,
}

/// How much of a caller's input an error message repeats, in bytes.
pub const EXCERPT_BYTES: usize = 200;

/// `input` as an error message may quote it: whole when it is short, else its first
/// [`EXCERPT_BYTES`] (at a character boundary) and its length. A 10 kB name in a refusal
/// would otherwise make standard gRPC clients fail on the size of the status header and
/// never show the refusal at all.
pub fn excerpt(input: &str) -> String {
    if input.len() <= EXCERPT_BYTES {
        return input.to_owned();
    }
    let mut end = EXCERPT_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &input[..end], input.len())
}

/// An error and its causes on one line, `what: why: root cause`, as anyhow's `{:#}` prints
/// a chain, less each cause that only repeats what the line already ends with (hyper's
/// connect error says "tcp connect error: tcp connect error: Connection refused").
/// `chain`: the error, then its sources (`anyhow::Error::chain`).
pub fn error_line<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for e in chain {
        let msg = e.to_string();
        if line.is_empty() {
            line = msg;
        } else if line != msg && !line.ends_with(&format!(": {msg}")) {
            line.push_str(": ");
            line.push_str(&msg);
        }
    }
    line
}

/// HTTP/2 flow-control windows, the same on both ends of a registry connection: large
/// enough that one blob stream can fill loopback (per stream, per connection).
pub const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
/// See [`HTTP2_STREAM_WINDOW`].
pub const HTTP2_CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 frames of up to 1 MiB instead of 16 KiB, on both ends: a 1 MiB chunk is one
/// frame, not 64.
pub const HTTP2_MAX_FRAME: u32 = (1 << 20) - 1;

/// Largest payload of one `UploadChunk` or `BlobChunk`. tonic's default receive limit is
/// 4 MiB per message, so 1 MiB chunks leave headroom.
pub const CHUNK_SIZE: usize = 1 << 20;

impl From<manifest::TensorInfo> for generated::TensorInfo {
    fn from(t: manifest::TensorInfo) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            digest: String::new(),
        }
    }
}

impl From<fingerprint::FingerprintEntry> for generated::TensorInfo {
    fn from(e: fingerprint::FingerprintEntry) -> Self {
        Self {
            digest: e.digest.to_string(),
            ..e.info.into()
        }
    }
}

impl TryFrom<generated::TensorInfo> for fingerprint::FingerprintEntry {
    type Error = digest::DigestError;

    /// A base tensor with its digest (a malformed or missing digest is an error).
    fn try_from(t: generated::TensorInfo) -> Result<Self, Self::Error> {
        let digest = t.digest.parse()?;
        Ok(Self {
            info: t.into(),
            digest,
        })
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

#[cfg(test)]
mod tests {
    #[test]
    fn excerpts_are_bounded_and_cut_at_character_boundaries() {
        assert_eq!(super::excerpt("team-a/x"), "team-a/x");
        let long = "é".repeat(5000);
        let e = super::excerpt(&long);
        assert!(e.len() < super::EXCERPT_BYTES + 20, "{e}");
        assert!(e.ends_with("… (10000 bytes)"), "{e}");
        let err = format!("a/{}", "x".repeat(10_000))
            .parse::<crate::Repository>()
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{err}");
        let err = format!("blake3:{}", "0".repeat(10_000))
            .parse::<crate::Digest>()
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{err}");
    }

    /// An error whose message is `msg`, caused by `source`.
    #[derive(Debug)]
    struct Link(&'static str, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Link {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    fn chain(e: &Link) -> Vec<&(dyn std::error::Error + 'static)> {
        let mut out: Vec<&(dyn std::error::Error + 'static)> = vec![e];
        while let Some(next) = out[out.len() - 1].source() {
            out.push(next);
        }
        out
    }

    #[test]
    fn error_lines_drop_causes_that_only_repeat_the_line() {
        let link = |m, next| Link(m, Some(Box::new(next)));
        // hyper's connect error, as `delta` printed it.
        let refused = Link("Connection refused (os error 111)", None);
        let e = link(
            "cannot connect to the registry at http://127.0.0.1:1",
            link(
                "transport error",
                link("tcp connect error", link("tcp connect error", refused)),
            ),
        );
        assert_eq!(
            super::error_line(chain(&e)),
            "cannot connect to the registry at http://127.0.0.1:1: transport error: \
             tcp connect error: Connection refused (os error 111)"
        );
        // A message that already quotes its cause.
        let e = link("reading a.json: not found", Link("not found", None));
        assert_eq!(super::error_line(chain(&e)), "reading a.json: not found");
        // A cause that merely ends like the line is kept.
        let e = link("limit 1", Link("1", None));
        assert_eq!(super::error_line(chain(&e)), "limit 1: 1");
    }
}
