//! The base fingerprint: what makes two copies of a base model "the same base".
//!
//! It is the blake3 of the sorted tensor table, one line per tensor:
//! `<name>\t<dtype>\t<d0>,<d1>,...\t<blake3 hex of the tensor's bytes>\n`. File sharding,
//! header order, padding and `__metadata__` do not enter it, so the same weights always give
//! the same fingerprint.

use crate::digest::Digest;
use crate::manifest::TensorInfo;

/// One row of the fingerprinted table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintEntry {
    /// Name, dtype and shape.
    pub info: TensorInfo,
    /// blake3 of the tensor's little-endian bytes.
    pub digest: Digest,
}

/// The fingerprint of a tensor table (any order; sorted here by name).
pub fn fingerprint(entries: &mut [FingerprintEntry]) -> Digest {
    entries.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    let mut h = blake3::Hasher::new();
    for e in entries.iter() {
        let shape: Vec<String> = e.info.shape.iter().map(u64::to_string).collect();
        h.update(e.info.name.as_bytes());
        h.update(b"\t");
        h.update(e.info.dtype.as_bytes());
        h.update(b"\t");
        h.update(shape.join(",").as_bytes());
        h.update(b"\t");
        h.update(e.digest.hex().as_bytes());
        h.update(b"\n");
    }
    Digest::from_hash(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, bytes: &[u8]) -> FingerprintEntry {
        FingerprintEntry {
            info: TensorInfo {
                name: name.into(),
                dtype: "U8".into(),
                shape: vec![bytes.len() as u64],
            },
            digest: Digest::of(bytes),
        }
    }

    #[test]
    fn order_independent_and_content_sensitive() {
        let a = fingerprint(&mut [e("a", b"1"), e("b", b"2")]);
        let b = fingerprint(&mut [e("b", b"2"), e("a", b"1")]);
        assert_eq!(a, b);
        assert_ne!(a, fingerprint(&mut [e("a", b"1"), e("b", b"3")]));
        assert_ne!(a, fingerprint(&mut [e("a", b"1"), e("c", b"2")]));
    }
}
