//! Reading safetensors: one file or a sharded folder (`model.safetensors.index.json`),
//! memory-mapped and validated with the hub's strict header parser, plus the base
//! fingerprint computed over it in parallel.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use delta_proto::Digest;
use delta_proto::fingerprint::{FingerprintEntry, fingerprint};
use delta_proto::manifest::TensorInfo;
use delta_proto::safetensors::{DEFAULT_MAX_HEADER, Header, TensorEntry, parse_header};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};

/// Tensors larger than this are hashed with several threads.
const PARALLEL_HASH_BYTES: usize = 8 << 20;

/// One memory-mapped, validated safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl TensorFile {
    /// Maps and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: the file is opened read-only and the hub never writes a file it has
        // mapped; as with every mmap reader, another process truncating it meanwhile is
        // outside what we can guard against.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let header =
            parse_header(&map, map.len() as u64, DEFAULT_MAX_HEADER).map_err(|source| {
                Error::Safetensors {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in data order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.header.tensors
    }

    /// `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        let start = (self.header.data_start + t.start) as usize;
        let end = (self.header.data_start + t.end) as usize;
        &self.map[start..end]
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// A model's weights: one safetensors file or a folder of shards.
#[derive(Debug)]
pub struct Model {
    files: Vec<TensorFile>,
    /// Tensor name → (file index, tensor index), sorted by name.
    index: BTreeMap<String, (usize, usize)>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The weight files of a model path: the file itself, the shards an index names, or a
/// folder's `model.safetensors`.
pub fn model_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let index = path.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let parsed: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", index.display())))?;
        let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        for s in &shards {
            if s.contains('/') || s.contains("..") {
                return Err(Error::Invalid(format!(
                    "{}: shard name {s:?} leaves the folder",
                    index.display()
                )));
            }
        }
        return Ok(shards.into_iter().map(|s| path.join(s)).collect());
    }
    let single = path.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Invalid(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        path.display()
    )))
}

impl Model {
    /// Opens a file or sharded folder. A tensor present in two shards is an error.
    pub fn open(path: &Path) -> Result<Self> {
        let files = model_files(path)?
            .iter()
            .map(|p| TensorFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                if index.insert(t.name.clone(), (fi, ti)).is_some() {
                    return Err(Error::Invalid(format!(
                        "{}: tensor {} appears in two shards",
                        path.display(),
                        t.name
                    )));
                }
            }
        }
        Ok(Self { files, index })
    }

    /// The files it was read from.
    pub fn files(&self) -> &[TensorFile] {
        &self.files
    }

    /// A tensor's entry and bytes by name.
    pub fn get(&self, name: &str) -> Option<(&TensorEntry, &[u8])> {
        let &(fi, ti) = self.index.get(name)?;
        let f = &self.files[fi];
        let t = &f.tensors()[ti];
        Some((t, f.data(t)))
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor table (name, dtype, shape), sorted by name.
    pub fn table(&self) -> Vec<TensorInfo> {
        self.index
            .keys()
            .filter_map(|n| self.get(n))
            .map(|(t, _)| TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    /// The base fingerprint (see `delta_proto::fingerprint`), hashing tensors in parallel.
    pub fn fingerprint(&self) -> Digest {
        fingerprint(&mut self.entries())
    }

    /// The model as a base record named `name` (not registered: `created_at` 0): table,
    /// per-tensor digests and fingerprint, from one pass of hashing.
    pub fn base_record(&self, name: &str) -> delta_proto::catalog::BaseRecord {
        let mut entries = self.entries();
        let fingerprint = fingerprint(&mut entries);
        let (tensors, digests) = entries.into_iter().map(|e| (e.info, e.digest)).unzip();
        delta_proto::catalog::BaseRecord {
            name: name.to_owned(),
            fingerprint,
            tensors,
            digests,
            created_at: 0,
        }
    }

    /// The tensor table with the blake3 of every tensor's bytes (hashed in parallel),
    /// sorted by name: what the fingerprint is computed from, and what a base record
    /// carries as the proof of its table.
    pub fn entries(&self) -> Vec<FingerprintEntry> {
        let names: Vec<&str> = self.names().collect();
        names
            .par_iter()
            .filter_map(|n| self.get(n))
            .map(|(t, data)| {
                let mut h = blake3::Hasher::new();
                if data.len() >= PARALLEL_HASH_BYTES {
                    h.update_rayon(data);
                } else {
                    h.update(data);
                }
                FingerprintEntry {
                    info: TensorInfo {
                        name: t.name.clone(),
                        dtype: t.dtype.clone(),
                        shape: t.shape.clone(),
                    },
                    digest: Digest::from_hash(h.finalize()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Vec<f32>)], meta: Option<(&str, &str)>) {
        let bytes: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.len(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, len)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                        .unwrap(),
                )
            })
            .collect();
        let meta = meta.map(|(k, v)| [(k.to_string(), v.to_string())].into_iter().collect());
        std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
    }

    #[test]
    fn fingerprint_ignores_sharding_order_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.safetensors");
        write(&one, &[("a", vec![1.0, 2.0]), ("b", vec![3.0])], None);

        let sharded = dir.path().join("sharded");
        std::fs::create_dir(&sharded).unwrap();
        write(
            &sharded.join("s2.safetensors"),
            &[("a", vec![1.0, 2.0])],
            Some(("format", "pt")),
        );
        write(&sharded.join("s1.safetensors"), &[("b", vec![3.0])], None);
        std::fs::write(
            sharded.join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"s2.safetensors","b":"s1.safetensors"}}"#,
        )
        .unwrap();

        let f1 = Model::open(&one).unwrap().fingerprint();
        let f2 = Model::open(&sharded).unwrap().fingerprint();
        assert_eq!(f1, f2);

        let changed = dir.path().join("changed.safetensors");
        write(&changed, &[("a", vec![1.0, 2.5]), ("b", vec![3.0])], None);
        assert_ne!(Model::open(&changed).unwrap().fingerprint(), f1);
    }

    #[test]
    fn truncated_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write(&p, &[("a", vec![1.0, 2.0])], None);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let err = Model::open(&p).unwrap_err().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
    }
}
