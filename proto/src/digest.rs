//! [`Digest`]: the blake3 content address of a blob, a manifest or a base model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only algorithm prefix the hub knows.
pub const ALGORITHM: &str = "blake3";

/// A blake3 digest, written `blake3:<64 lowercase hex>`.
///
/// Parsing is strict (lowercase hex only, exact length, known algorithm) so that a digest
/// can safely become part of a storage key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string has no `algorithm:` prefix or an unknown one.
    #[error("digest {0:?} must start with \"blake3:\"")]
    Algorithm(String),
    /// The hex part has the wrong length or a character outside `[0-9a-f]`.
    #[error("digest {0:?} must be \"blake3:\" followed by 64 lowercase hex digits")]
    Hex(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps a finished blake3 hash.
    pub fn from_hash(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The object-store key of the blob with this digest:
    /// `blobs/blake3/<first two hex digits>/<hex>`.
    pub fn blob_key(&self) -> String {
        let hex = self.hex();
        format!("blobs/{ALGORITHM}/{}/{hex}", &hex[..2])
    }

    /// Whether this is the digest of the empty byte string.
    pub fn is_empty_blob(&self) -> bool {
        *self == Self::of(b"")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(hex) = s.strip_prefix("blake3:") else {
            return Err(DigestError::Algorithm(crate::excerpt(s)));
        };
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::Hex(crate::excerpt(s)));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        Ok(Self(out))
    }
}

fn nibble(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_malformed() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert!(s.starts_with("blake3:"));
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(
            d.blob_key(),
            format!("blobs/blake3/{}/{}", &d.hex()[..2], d.hex())
        );

        let bad = [
            "",
            "blake3:",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            &s.to_uppercase(),
            &format!("{s}0"),
            &s[..s.len() - 1],
            "blake3:../../../../etc/passwd0000000000000000000000000000000000000000",
            "blake3:zz00000000000000000000000000000000000000000000000000000000000000",
        ];
        for b in bad {
            assert!(b.parse::<Digest>().is_err(), "{b:?} parsed");
        }
    }

    #[test]
    fn empty_blob_has_the_well_known_digest() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert!(Digest::of(b"").is_empty_blob());
    }
}
