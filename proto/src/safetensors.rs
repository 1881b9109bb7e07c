//! A strict safetensors header parser, shared by the registry (which validates every
//! uploaded tensor file before a manifest may point at it) and the client (which reads
//! base models and deltas).
//!
//! The `safetensors` crate accepts duplicate names (last wins), NUL bytes in names,
//! whitespace before `{` and trailing bytes after the last tensor; two parsers could then
//! disagree about one file. This parser refuses all of those, and never allocates more
//! than the declared header length, which is bounded before anything is read.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// The largest header the hub reads unless configured otherwise (the crate's own limit).
pub const DEFAULT_MAX_HEADER: u64 = 100_000_000;

/// Dtypes the hub accepts, with their size in bytes.
pub const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("I64", 8),
    ("U64", 8),
    ("F64", 8),
];

/// Bytes per element of an accepted dtype.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    DTYPES.iter().find(|(d, _)| *d == dtype).map(|(_, s)| *s)
}

/// Why a file is not acceptable safetensors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes.
    #[error("file is {0} bytes: too short for a safetensors header length")]
    TooShort(u64),
    /// The declared header length is over the limit or past the end of the file.
    #[error("declared header length {len} is larger than {limit}")]
    HeaderTooLarge {
        /// Declared length.
        len: u64,
        /// The limit it broke (the configured maximum or what the file can hold).
        limit: u64,
    },
    /// The header is not `{`-initial UTF-8 JSON object text.
    #[error("header is not a JSON object: {0}")]
    NotJson(String),
    /// A tensor name appears twice.
    #[error("tensor {0:?} appears twice in the header")]
    Duplicate(String),
    /// A tensor name is empty, has control characters or is reserved.
    #[error("tensor name {0:?} is empty, reserved or contains control characters")]
    BadName(String),
    /// A tensor entry is malformed.
    #[error("tensor {name:?}: {reason}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A dtype outside the allow-list.
    #[error("tensor {name:?} has unsupported dtype {dtype:?}")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The data section is not exactly covered by the tensors.
    #[error("tensor data layout: {0}")]
    Layout(String),
    /// `__metadata__` is not a map of strings.
    #[error("__metadata__ must map strings to strings")]
    Metadata,
}

/// One tensor of a parsed header. Offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Safetensors dtype (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Start of the data, from the start of the data section.
    pub start: u64,
    /// End (exclusive) of the data.
    pub end: u64,
}

/// A validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in data order.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__`, if any.
    pub metadata: BTreeMap<String, String>,
    /// File offset of the data section (8 + header length).
    pub data_start: u64,
}

/// Reads the header length from the first 8 bytes and bounds it by `max_header` and by
/// what a file of `file_len` bytes can hold. Returns the length of the JSON text.
pub fn header_len(first8: &[u8], file_len: u64, max_header: u64) -> Result<u64, HeaderError> {
    let Some(bytes) = first8.get(..8) else {
        return Err(HeaderError::TooShort(file_len));
    };
    if file_len < 8 {
        return Err(HeaderError::TooShort(file_len));
    }
    let mut arr = [0u8; 8];
    arr.copy_from_slice(bytes);
    let len = u64::from_le_bytes(arr);
    let limit = max_header.min(file_len - 8);
    if len > limit {
        return Err(HeaderError::HeaderTooLarge { len, limit });
    }
    Ok(len)
}

/// Parses and validates a header. `prefix` starts at byte 0 of the file and holds at least
/// the 8 length bytes and the header; `file_len` is the whole file's length.
pub fn parse_header(prefix: &[u8], file_len: u64, max_header: u64) -> Result<Header, HeaderError> {
    let len = header_len(prefix, file_len, max_header)?;
    let end = 8 + len as usize;
    let Some(text) = prefix.get(8..end) else {
        return Err(HeaderError::TooShort(prefix.len() as u64));
    };
    if text.first() != Some(&b'{') {
        return Err(HeaderError::NotJson("the first byte is not '{'".into()));
    }
    // Writers pad the header with spaces to an 8-byte boundary; nothing else may follow.
    let trimmed_len = text.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    let text = std::str::from_utf8(&text[..trimmed_len])
        .map_err(|e| HeaderError::NotJson(format!("not UTF-8: {e}")))?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            // Our own visitor's errors carry their message through serde.
            let msg = e.to_string();
            if let Some(name) = msg.strip_prefix("duplicate:") {
                let name = name.split(" at line").next().unwrap_or(name);
                HeaderError::Duplicate(name.to_owned())
            } else {
                HeaderError::NotJson(msg)
            }
        }
        _ => HeaderError::NotJson(e.to_string()),
    })?;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if name == "__metadata__" {
            let serde_json::Value::Object(map) = value else {
                return Err(HeaderError::Metadata);
            };
            for (k, v) in map {
                let serde_json::Value::String(v) = v else {
                    return Err(HeaderError::Metadata);
                };
                metadata.insert(k, v);
            }
            continue;
        }
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(HeaderError::BadName(name));
        }
        tensors.push(parse_tensor(name, value)?);
    }

    let data_len = file_len - 8 - len;
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut cursor = 0u64;
    for t in &tensors {
        if t.start != cursor {
            let what = if t.start < cursor {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(HeaderError::Layout(format!(
                "tensor {:?} at offset {} {what}",
                t.name, t.start
            )));
        }
        cursor = t.end;
    }
    if cursor != data_len {
        let what = if cursor > data_len {
            "past the end of the file"
        } else {
            "followed by trailing bytes"
        };
        return Err(HeaderError::Layout(format!(
            "tensors cover {cursor} bytes but the data section is {data_len} bytes: {what}"
        )));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + len,
    })
}

fn parse_tensor(name: String, value: serde_json::Value) -> Result<TensorEntry, HeaderError> {
    let bad = |reason: &str| HeaderError::BadTensor {
        name: name.clone(),
        reason: reason.to_owned(),
    };
    let serde_json::Value::Object(map) = value else {
        return Err(bad("entry is not an object"));
    };
    let dtype = match map.get("dtype") {
        Some(serde_json::Value::String(d)) => d.clone(),
        _ => return Err(bad("missing string \"dtype\"")),
    };
    let Some(size) = dtype_size(&dtype) else {
        return Err(HeaderError::Dtype { name, dtype });
    };
    let shape: Vec<u64> = match map.get("shape") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| bad("shape has a non-integer")))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("missing \"shape\" array")),
    };
    let offsets: Vec<u64> = match map.get("data_offsets") {
        Some(serde_json::Value::Array(a)) if a.len() == 2 => a
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| bad("bad data_offsets")))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("missing \"data_offsets\" pair")),
    };
    if map.len() != 3 {
        return Err(bad(
            "unexpected fields besides dtype, shape and data_offsets",
        ));
    }
    let (start, end) = (offsets[0], offsets[1]);
    if end < start {
        return Err(bad("data_offsets are reversed"));
    }
    let bytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if bytes != end - start {
        return Err(bad(&format!(
            "{dtype} {shape:?} needs {bytes} bytes but data_offsets span {}",
            end - start
        )));
    }
    Ok(TensorEntry {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

/// The header's top-level object, in file order, refusing duplicate keys.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawHeader, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate:{k}")));
                    }
                    out.push((k, m.next_value()?));
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests;
