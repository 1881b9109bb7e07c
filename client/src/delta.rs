//! Delta folders on disk: the native format (`delta.json` + `*.safetensors`) and Hugging
//! Face PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors`), read into
//! a [`Manifest`] plus tensor files, and written back out.
//!
//! PEFT tensors are renamed to the native convention (`<base module>.lora_A`, ...; see
//! `delta_proto::manifest`) with their bytes untouched, and the original key of every
//! tensor and the original `adapter_config.json` are kept in the manifest
//! (`config.peft`), so `--format peft` gives back the same keys, config and tensor bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use delta_proto::manifest::{
    BaseRef, FileEntry, Ia3Config, LoraConfig, Manifest, MethodConfig, SCHEMA_VERSION, TensorInfo,
};
use serde_json::{Value, json};

use crate::error::{Error, IoContext, Result};
use crate::remote::{BaseRecord, hash_file};
use crate::tensors::TensorFile;

/// The native manifest file in a delta folder.
pub const NATIVE_MANIFEST: &str = "delta.json";
/// The native tensor file name the client writes.
pub const NATIVE_TENSORS: &str = "delta.safetensors";
/// PEFT's config file.
pub const PEFT_CONFIG: &str = "adapter_config.json";
/// PEFT's tensor file.
pub const PEFT_TENSORS: &str = "adapter_model.safetensors";
/// PEFT's key prefix.
const PEFT_PREFIX: &str = "base_model.model.";

/// A delta ready to push: its manifest and where each file's bytes are.
#[derive(Debug)]
pub struct PreparedDelta {
    /// The manifest (digests and tensor tables filled in).
    pub manifest: Manifest,
    /// Local path of each manifest file, in manifest order.
    pub paths: Vec<PathBuf>,
    /// Holds converted files alive until the push is done.
    _staging: Option<tempfile::TempDir>,
}

/// Which on-disk format a folder is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `delta.json` + safetensors.
    Native,
    /// PEFT `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
}

/// Detects a folder's format.
pub fn detect(dir: &Path) -> Result<Format> {
    if dir.join(NATIVE_MANIFEST).is_file() {
        Ok(Format::Native)
    } else if dir.join(PEFT_CONFIG).is_file() {
        if dir.join(PEFT_TENSORS).is_file() {
            Ok(Format::Peft)
        } else if dir.join("adapter_model.bin").is_file() {
            Err(Error::Invalid(format!(
                "{}: adapter_model.bin is a pickle; only safetensors is accepted (save with safe_serialization=True)",
                dir.display()
            )))
        } else {
            Err(Error::Invalid(format!(
                "{}: {PEFT_CONFIG} without {PEFT_TENSORS}",
                dir.display()
            )))
        }
    } else {
        Err(Error::Invalid(format!(
            "{}: neither a native delta ({NATIVE_MANIFEST}) nor a PEFT folder ({PEFT_CONFIG})",
            dir.display()
        )))
    }
}

/// `name` in `dir`, refusing anything that is not a plain file name or that leads out of
/// the folder (`..`, an absolute path, a symbolic link to a file elsewhere): a folder
/// someone else prepared must not make `delta push` publish files it does not hold.
pub fn file_inside(dir: &Path, name: &str) -> Result<PathBuf> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    if !plain {
        return Err(Error::Invalid(format!(
            "{}: {:?} is not a plain file name inside the folder",
            dir.display(),
            delta_proto::excerpt(name)
        )));
    }
    let path = dir.join(name);
    let real = std::fs::canonicalize(&path).at(&path)?;
    let root = std::fs::canonicalize(dir).at(dir)?;
    if real.parent() != Some(root.as_path()) {
        return Err(Error::Invalid(format!(
            "{} leads out of the folder (to {}): copy the file in (cp -L) to push it",
            path.display(),
            real.display()
        )));
    }
    Ok(path)
}

/// A complete native folder as written by `delta pull` or `delta-worker train` (its
/// manifest lists every file with its digest): the manifest and the files' paths, each
/// file checked against its digest.
pub fn read_native(dir: &Path) -> Result<(Manifest, Vec<PathBuf>)> {
    let mpath = file_inside(dir, NATIVE_MANIFEST)?;
    let bytes = std::fs::read(&mpath).at(&mpath)?;
    let manifest = Manifest::from_json(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", mpath.display())))?;
    let mut paths = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        let path = file_inside(dir, &f.path)?;
        let actual = crate::remote::hash_file(&path)?;
        if actual != f.digest {
            return Err(Error::Integrity {
                what: path.display().to_string(),
                expected: f.digest,
                actual,
            });
        }
        paths.push(path);
    }
    Ok((manifest, paths))
}

/// Reads a native or PEFT folder as a delta on `base`, checking it fits the base.
pub fn prepare(dir: &Path, base: &BaseRecord) -> Result<PreparedDelta> {
    let prepared = match detect(dir)? {
        Format::Native => prepare_native(dir, base)?,
        Format::Peft => prepare_peft(dir, base)?,
    };
    let table: BTreeMap<String, TensorInfo> = base
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    prepared.manifest.check_against_base(&table)?;
    Ok(prepared)
}

/// A manifest file entry for a safetensors file: digest, size, sorted tensor table.
pub fn file_entry(path: &Path) -> Result<FileEntry> {
    let file = TensorFile::open(path)?;
    let mut tensors: Vec<TensorInfo> = file
        .tensors()
        .iter()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry {
        path: name,
        digest: hash_file(path)?,
        size: file.bytes().len() as u64,
        tensors,
    })
}

fn prepare_native(dir: &Path, base: &BaseRecord) -> Result<PreparedDelta> {
    let mpath = file_inside(dir, NATIVE_MANIFEST)?;
    let text = std::fs::read(&mpath).at(&mpath)?;
    let mut value: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", mpath.display())))?;
    let Value::Object(obj) = &mut value else {
        return Err(Error::Invalid(format!(
            "{}: not a JSON object",
            mpath.display()
        )));
    };
    if let Some(fp) = obj
        .get("base")
        .and_then(|b| b.get("fingerprint"))
        .and_then(Value::as_str)
        && fp != base.fingerprint.to_string()
    {
        return Err(Error::Invalid(format!(
            "{} says the delta belongs to base {fp}, but --base {} is {}",
            mpath.display(),
            base.name,
            base.fingerprint
        )));
    }
    let mut names: Vec<String> = match obj.get("files").and_then(Value::as_array) {
        Some(files) => files
            .iter()
            .filter_map(|f| f.get("path").and_then(Value::as_str))
            .map(str::to_owned)
            .collect(),
        None => {
            let entries = std::fs::read_dir(dir).at(dir)?;
            let mut names = Vec::new();
            for e in entries {
                let name = e.at(dir)?.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    names.push(name);
                }
            }
            names
        }
    };
    names.sort();
    let paths = names
        .iter()
        .map(|n| file_inside(dir, n))
        .collect::<Result<Vec<_>>>()?;
    let files = paths
        .iter()
        .map(|p| file_entry(p))
        .collect::<Result<Vec<_>>>()?;
    obj.insert(
        "files".into(),
        serde_json::to_value(&files).unwrap_or(Value::Null),
    );
    obj.insert(
        "base".into(),
        json!({"fingerprint": base.fingerprint.to_string(), "name": base.name}),
    );
    obj.entry("schema_version").or_insert(json!(SCHEMA_VERSION));
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let manifest = Manifest::from_json(&bytes)?;
    Ok(PreparedDelta {
        manifest,
        paths,
        _staging: None,
    })
}

/// Finds which base module a PEFT module path names: the same path, the path without
/// leading wrapper components (`bert.`), or a unique base path ending with it.
fn resolve_module(
    peft_module: &str,
    base: &BTreeMap<&str, &TensorInfo>,
    suffix: &str,
) -> Option<String> {
    let exact = format!("{peft_module}{suffix}");
    if base.contains_key(exact.as_str()) {
        return Some(peft_module.to_owned());
    }
    let mut rest = peft_module;
    while let Some((_, tail)) = rest.split_once('.') {
        if base.contains_key(format!("{tail}{suffix}").as_str()) {
            return Some(tail.to_owned());
        }
        rest = tail;
    }
    let wanted = format!(".{peft_module}{suffix}");
    let mut found = base.keys().filter(|k| k.ends_with(&wanted));
    match (found.next(), found.next()) {
        (Some(k), None) => Some(k[..k.len() - suffix.len()].to_owned()),
        _ => None,
    }
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads PEFT's LoRA settings from `adapter_config.json`.
pub fn lora_config_from_peft(cfg: &Value) -> Result<LoraConfig> {
    let r = cfg
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Invalid("adapter_config.json: missing integer r".into()))?;
    let lora_alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let map_u = |k: &str| -> BTreeMap<String, u64> {
        cfg.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let map_f = |k: &str| -> BTreeMap<String, f64> {
        cfg.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(LoraConfig {
        r,
        lora_alpha,
        use_rslora: cfg
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        fan_in_fan_out: cfg
            .get("fan_in_fan_out")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        target_modules: str_list(cfg.get("target_modules")),
        bias: cfg
            .get("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned(),
        modules_to_save: str_list(cfg.get("modules_to_save")),
        rank_pattern: map_u("rank_pattern"),
        alpha_pattern: map_f("alpha_pattern"),
        lora_bias: cfg
            .get("lora_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

fn prepare_peft(dir: &Path, base: &BaseRecord) -> Result<PreparedDelta> {
    let cpath = file_inside(dir, PEFT_CONFIG)?;
    let text = std::fs::read(&cpath).at(&cpath)?;
    let cfg: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", cpath.display())))?;
    let peft_type = cfg
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    let ia3 = match peft_type {
        "LORA" => false,
        "IA3" => true,
        other => {
            return Err(Error::Invalid(format!(
                "{}: peft_type {other} is not supported (LORA and IA3 are)",
                cpath.display()
            )));
        }
    };
    let tpath = file_inside(dir, PEFT_TENSORS)?;
    let file = TensorFile::open(&tpath)?;
    let table: BTreeMap<&str, &TensorInfo> =
        base.tensors.iter().map(|t| (t.name.as_str(), t)).collect();

    let mut renamed: Vec<(String, Vec<u64>, &delta_proto::safetensors::TensorEntry)> = Vec::new();
    let mut keys = serde_json::Map::new();
    let mut shapes = serde_json::Map::new();
    for t in file.tensors() {
        let Some(path) = t.name.strip_prefix(PEFT_PREFIX) else {
            return Err(Error::Invalid(format!(
                "{}: tensor {} does not start with {PEFT_PREFIX}",
                tpath.display(),
                t.name
            )));
        };
        let native = native_name(&t.name, path, ia3, &table)?;
        keys.insert(native.clone(), Value::String(t.name.clone()));
        // IA3 vectors are stored (out, 1) or (1, in) by PEFT; natively they are 1-D.
        let shape = if native.ends_with(".ia3_l") {
            shapes.insert(native.clone(), json!(t.shape));
            vec![t.shape.iter().product()]
        } else {
            t.shape.clone()
        };
        renamed.push((native, shape, t));
    }
    if renamed.is_empty() {
        return Err(Error::Invalid(format!("{}: no tensors", tpath.display())));
    }

    let staging = tempfile::tempdir().at(std::env::temp_dir())?;
    let out = staging.path().join(NATIVE_TENSORS);
    write_tensors(
        &out,
        renamed
            .iter()
            .map(|(n, shape, t)| (n.clone(), t.dtype.clone(), shape.clone(), file.data(t))),
        None,
    )?;

    let mut config = method_config_from_peft(&cfg, ia3, &table)?;
    config.other.insert(
        "peft".into(),
        json!({"adapter_config": cfg, "keys": keys, "shapes": shapes}),
    );
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        method: if ia3 { "ia3" } else { "lora" }.into(),
        config,
        base: BaseRef {
            fingerprint: base.fingerprint,
            name: Some(base.name.clone()),
        },
        files: vec![file_entry(&out)?],
        parents: Vec::new(),
        provenance: [("imported_from".to_owned(), json!("peft"))].into(),
        annotations: BTreeMap::new(),
    };
    manifest.check_shape()?;
    Ok(PreparedDelta {
        manifest,
        paths: vec![out],
        _staging: Some(staging),
    })
}

/// The native name of a PEFT adapter's tensor (`path`: its name without PEFT's prefix):
/// LoRA's `A`/`B`/bias and IA3's vector on the base module the name resolves to, a trained
/// base tensor (`modules_to_save`, biases) as `.replace`, anything else the base lacks as
/// `.new`. What native deltas cannot hold (embedding LoRA, DoRA) is refused, named.
fn native_name(
    name: &str,
    path: &str,
    ia3: bool,
    table: &BTreeMap<&str, &TensorInfo>,
) -> Result<String> {
    let module_of = |module: &str| {
        resolve_module(module, table, ".weight").ok_or_else(|| {
            Error::Invalid(format!(
                "tensor {name}: the base has no {module}.weight (nor a module ending with it)"
            ))
        })
    };
    let role = [
        (".lora_A.weight", ".lora_A"),
        (".lora_B.weight", ".lora_B"),
        (".lora_B.bias", ".lora_bias"),
    ]
    .into_iter()
    .find_map(|(peft, native)| path.strip_suffix(peft).map(|m| (m, native)));
    Ok(match (role, path.strip_suffix(".ia3_l")) {
        (_, Some(module)) if ia3 => format!("{}.ia3_l", module_of(module)?),
        (Some((module, suffix)), _) if !ia3 => format!("{}{suffix}", module_of(module)?),
        (Some(_), _) => {
            return Err(Error::Invalid(format!(
                "tensor {name} is a LoRA tensor in an IA3 adapter"
            )));
        }
        _ if path.contains("lora_embedding_") || path.contains("lora_magnitude") => {
            return Err(Error::Invalid(format!(
                "tensor {name}: embedding LoRA and DoRA are not supported yet"
            )));
        }
        // modules_to_save and trained biases: whole tensors.
        _ => match path.rsplit_once('.').and_then(|(m, leaf)| {
            resolve_module(m, table, &format!(".{leaf}")).map(|m| format!("{m}.{leaf}"))
        }) {
            Some(target) => format!("{target}.replace"),
            None => format!("{path}.new"),
        },
    })
}

/// The native method settings of a PEFT `adapter_config.json` (IA3 or LoRA), with LoRA's
/// per-module patterns renamed to the base's module names where they name a whole module.
fn method_config_from_peft(
    cfg: &Value,
    ia3: bool,
    table: &BTreeMap<&str, &TensorInfo>,
) -> Result<MethodConfig> {
    let mut config = MethodConfig::default();
    if ia3 {
        config.ia3 = Some(Ia3Config {
            target_modules: str_list(cfg.get("target_modules")),
            feedforward_modules: str_list(cfg.get("feedforward_modules")),
            fan_in_fan_out: cfg
                .get("fan_in_fan_out")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        });
    } else {
        let mut lora = lora_config_from_peft(cfg)?;
        // Suffix keys like "value" already match both names.
        let rename = |k: &String| resolve_module(k, table, ".weight").unwrap_or_else(|| k.clone());
        lora.rank_pattern = lora
            .rank_pattern
            .iter()
            .map(|(k, v)| (rename(k), *v))
            .collect();
        lora.alpha_pattern = lora
            .alpha_pattern
            .iter()
            .map(|(k, v)| (rename(k), *v))
            .collect();
        config.lora = Some(lora);
    }
    Ok(config)
}

/// Writes tensors as a safetensors file (atomically: temp file + rename).
pub fn write_tensors<'a>(
    path: &Path,
    tensors: impl Iterator<Item = (String, String, Vec<u64>, &'a [u8])>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::new();
    for (name, dtype, shape, data) in tensors {
        let dt = parse_dtype(&dtype)?;
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let view = safetensors::tensor::TensorView::new(dt, shape, data)
            .map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))?;
        views.push((name, view));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_file_in(dir)?;
    let mode = tmp.as_file().metadata().at(path)?.permissions();
    // serialize_to_file writes a new file at the temporary path: it is that file that
    // must be synced, and given back the permissions the user's umask allows.
    safetensors::serialize_to_file(views, metadata, tmp.path())
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(tmp.path(), mode).at(path)?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .at(path)?;
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// A safetensors dtype name as the `safetensors` crate's enum.
pub fn parse_dtype(d: &str) -> Result<safetensors::Dtype> {
    use safetensors::Dtype;
    Ok(match d {
        "BOOL" => Dtype::BOOL,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "F8_E4M3" => Dtype::F8_E4M3,
        "F8_E5M2" => Dtype::F8_E5M2,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "F32" => Dtype::F32,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        "F64" => Dtype::F64,
        other => return Err(Error::Invalid(format!("unsupported dtype {other}"))),
    })
}

/// Writes a pulled delta as a native folder: `delta.json` and the tensor files (copies of
/// the cached blobs).
pub fn write_native(dir: &Path, manifest: &Manifest, blobs: &[PathBuf]) -> Result<()> {
    write_native_with(dir, manifest, blobs, None)
}

/// [`write_native`], moving the blob files that lie under `scratch` into `dir` instead of
/// copying them (they must be on its filesystem, and are gone afterwards): `delta pull`
/// downloads there. Blobs elsewhere (the cache) are copied.
pub fn move_native(
    dir: &Path,
    manifest: &Manifest,
    blobs: &[PathBuf],
    scratch: &Path,
) -> Result<()> {
    write_native_with(dir, manifest, blobs, Some(scratch))
}

/// Undoes [`move_native`] as far as it got: each blob it renamed out of `scratch` into
/// `dir` goes back, so that a pull failing after its downloads keeps them. Best effort:
/// what cannot be moved back is downloaded again next time.
pub fn unmove_native(dir: &Path, manifest: &Manifest, blobs: &[PathBuf], scratch: &Path) {
    for (f, blob) in manifest.files.iter().zip(blobs) {
        let moved = dir.join(&f.path);
        if blob.starts_with(scratch) && !blob.exists() && moved.is_file() {
            let _ = std::fs::rename(&moved, blob);
        }
    }
}

fn write_native_with(
    dir: &Path,
    manifest: &Manifest,
    blobs: &[PathBuf],
    scratch: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    // Where each moved blob went: two files with the same bytes share one blob.
    let mut moved: std::collections::HashMap<&Path, PathBuf> = Default::default();
    for (f, blob) in manifest.files.iter().zip(blobs) {
        let to = dir.join(&f.path);
        match moved.get(blob.as_path()) {
            Some(first) => place(first, &to)?,
            None if scratch.is_some_and(|s| blob.starts_with(s)) => {
                std::fs::rename(blob, &to).at(&to)?;
                moved.insert(blob, to);
            }
            None => place(blob, &to)?,
        }
    }
    write_manifest(dir, manifest)
}

/// Writes `delta.json` into `dir` (atomically): the manifest's canonical JSON, indented
/// for people. Every native folder's manifest is written here (pull, compose, the
/// worker's training runs).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let pretty = serde_json::to_vec_pretty(
        &serde_json::from_slice::<Value>(&manifest.canonical_json()).unwrap_or(Value::Null),
    )
    .unwrap_or_default();
    write_atomic(&dir.join(NATIVE_MANIFEST), &pretty)
}

/// Writes a pulled LoRA delta as a PEFT folder.
pub fn write_peft(dir: &Path, manifest: &Manifest, blobs: &[PathBuf]) -> Result<()> {
    let (lora, ia3) = (manifest.config.lora.as_ref(), manifest.config.ia3.as_ref());
    if lora.is_none() && ia3.is_none() {
        return Err(Error::Invalid(format!(
            "a {} delta has no PEFT equivalent (PEFT folders hold LoRA or IA3)",
            manifest.method
        )));
    }
    let peft = manifest.config.other.get("peft");
    let keys = peft.and_then(|p| p.get("keys")).and_then(Value::as_object);
    let shapes = peft
        .and_then(|p| p.get("shapes"))
        .and_then(Value::as_object);
    // A delta trained here with a classification head becomes a PEFT SEQ_CLS adapter for
    // `BertForSequenceClassification`: encoder keys under `bert.`, the head as the
    // `classifier` module PEFT saves whole. Its head must read what that class's does.
    let head = manifest.config.other.get("head");
    let seq_cls = peft.is_none()
        && head.and_then(|h| h.get("task")).and_then(Value::as_str)
            == Some("sequence-classification");
    if seq_cls {
        let pooling = head
            .and_then(|h| h.get("pooling"))
            .and_then(Value::as_str)
            .unwrap_or("mean");
        if pooling != "cls" {
            return Err(Error::Invalid(format!(
                "the delta's classifier reads the {pooling} of the tokens, but BertForSequenceClassification (what PEFT's SEQ_CLS loads) reads the pooler: PEFT would predict differently; retrain with --pooling cls"
            )));
        }
    }
    let files = blobs
        .iter()
        .map(|b| TensorFile::open(b))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    let mut lost = Vec::new();
    for f in &files {
        for t in f.tensors() {
            let key = match keys.and_then(|k| k.get(&t.name)).and_then(Value::as_str) {
                Some(k) => k.to_owned(),
                None => match peft_key(&t.name, seq_cls)? {
                    Some(k) => k,
                    None => {
                        lost.push(t.name.clone());
                        continue;
                    }
                },
            };
            let recorded: Option<Vec<u64>> = shapes
                .and_then(|s| s.get(&t.name))
                .and_then(|v| serde_json::from_value(v.clone()).ok());
            let shape = match (recorded, delta_proto::manifest::classify(&t.name)) {
                (Some(s), _) => s,
                // PEFT keeps IA3 vectors 2-D: (1, in) for feed-forward modules, else (out, 1).
                (None, delta_proto::manifest::Role::Ia3(m)) => {
                    let n = t.shape.iter().product();
                    let ff = ia3.is_some_and(|c| c.is_feedforward(m));
                    if ff { vec![1, n] } else { vec![n, 1] }
                }
                (None, _) => t.shape.clone(),
            };
            out.push((key, t.dtype.clone(), shape, f.data(t)));
        }
    }
    if !lost.is_empty() {
        return Err(Error::Invalid(format!(
            "PEFT's {} format has no place for {} trained tensor(s) of this delta ({}{}): PEFT would load the adapter without them, so it is not exported; use the native format",
            if ia3.is_some() { "IA3" } else { "LoRA" },
            lost.len(),
            lost.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if lost.len() > 3 { ", …" } else { "" }
        )));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let metadata = Some(
        [("format".to_owned(), "pt".to_owned())]
            .into_iter()
            .collect(),
    );
    write_tensors(&dir.join(PEFT_TENSORS), out.into_iter(), metadata)?;
    let config = match (peft.and_then(|p| p.get("adapter_config")), lora, ia3) {
        (Some(original), _, _) => original.clone(),
        (None, Some(lora), _) => json!({
            "peft_type": "LORA",
            "task_type": if seq_cls { json!("SEQ_CLS") } else { Value::Null },
            "base_model_name_or_path": manifest.base.name,
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "use_rslora": lora.use_rslora,
            "fan_in_fan_out": lora.fan_in_fan_out,
            "target_modules": lora.target_modules,
            "bias": lora.bias,
            "modules_to_save": if lora.modules_to_save.is_empty() { Value::Null } else { json!(lora.modules_to_save) },
            "rank_pattern": lora.rank_pattern,
            "alpha_pattern": lora.alpha_pattern,
            "lora_bias": lora.lora_bias,
            "lora_dropout": 0.0,
            "inference_mode": true,
        }),
        (None, None, Some(ia3)) => json!({
            "peft_type": "IA3",
            "task_type": null,
            "base_model_name_or_path": manifest.base.name,
            "target_modules": ia3.target_modules,
            "feedforward_modules": ia3.feedforward_modules,
            "fan_in_fan_out": ia3.fan_in_fan_out,
            "modules_to_save": null,
            "init_ia3_weights": true,
            "inference_mode": true,
        }),
        (None, None, None) => Value::Null,
    };
    write_atomic(
        &dir.join(PEFT_CONFIG),
        &serde_json::to_vec_pretty(&config).unwrap_or_default(),
    )
}

/// The key PEFT saves a native tensor under, or `None` for a tensor PEFT's LoRA/IA3
/// formats have no place for (whole replaced tensors outside `modules_to_save`, such as
/// BitFit's biases). `seq_cls`: the keys of an adapter on `BertForSequenceClassification`
/// (encoder under `bert.`, the head as the `classifier` module).
fn peft_key(native: &str, seq_cls: bool) -> Result<Option<String>> {
    use delta_proto::manifest::{Role, classify};
    let tail = match classify(native) {
        Role::LoraA(m) => format!("{m}.lora_A.weight"),
        Role::LoraB(m) => format!("{m}.lora_B.weight"),
        Role::LoraBias(m) => format!("{m}.lora_B.bias"),
        Role::Ia3(m) => format!("{m}.ia3_l"),
        Role::Replace(t) | Role::New(t) if t.starts_with("classifier.") => t.to_owned(),
        Role::Replace(_) | Role::New(_) => return Ok(None),
        _ => {
            return Err(Error::Invalid(format!(
                "tensor {native} has no PEFT LoRA or IA3 equivalent"
            )));
        }
    };
    let inside = if seq_cls && !tail.starts_with("classifier.") {
        "bert."
    } else {
        ""
    };
    Ok(Some(format!("{PEFT_PREFIX}{inside}{tail}")))
}

/// Copies a cached blob to a user's file. Never a hard link: the user may edit the file,
/// and the cache must not change with it. (`std::fs::copy` uses `copy_file_range`, which
/// filesystems with reflinks, such as btrfs and XFS, can serve without copying bytes.)
fn place(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = temp_file_in(dir)?;
    std::fs::copy(from, tmp.path()).at(to)?;
    tmp.persist(to).map_err(|e| Error::Io {
        path: to.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// A temporary file in `dir` created with the usual permissions (0666 less the umask,
/// like any file the user creates), not `tempfile`'s private 0600.
fn temp_file_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(".delta-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .at(dir)
}

/// Whether `out` can take a pulled folder: absent, or an empty folder, or any folder with
/// `overwrite`. Returns whether it exists.
pub fn check_output_dir(out: &Path, overwrite: bool) -> Result<bool> {
    let exists = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(Error::Invalid(format!(
                "{} exists and is not a folder",
                out.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Error::Io {
                path: out.to_owned(),
                source: e,
            });
        }
    };
    if exists && !overwrite && std::fs::read_dir(out).at(out)?.next().is_some() {
        return Err(Error::Invalid(format!(
            "{} is not empty: pass --overwrite to replace what it holds with the pulled delta",
            out.display()
        )));
    }
    Ok(exists)
}

/// The folder `out` is in (`.` for a bare name).
pub fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Fills `out` with exactly what `write` puts in a fresh folder: the folder is written
/// beside `out` and then renamed over it, so `out` never holds a mix of old and new files
/// (nor a half-written delta). An existing non-empty `out` is refused unless `overwrite`.
pub fn replace_dir(
    out: &Path,
    overwrite: bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    replace_dir_salvaging(out, overwrite, write, |_| {})
}

/// [`replace_dir`], calling `salvage` with the staging folder before it is removed when
/// the write or the swap fails: a pull that renamed downloaded files into it takes them
/// back out ([`unmove_native`]) so that they are not downloaded again.
pub fn replace_dir_salvaging(
    out: &Path,
    overwrite: bool,
    write: impl FnOnce(&Path) -> Result<()>,
    salvage: impl FnOnce(&Path),
) -> Result<()> {
    let exists = check_output_dir(out, overwrite)?;
    let parent = parent_dir(out);
    std::fs::create_dir_all(&parent).at(&parent)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "delta".into());
    let sibling = |what: &str| {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        parent.join(format!(".{name}.{what}-{}-{n}", std::process::id()))
    };
    let staging = sibling("pulling");
    std::fs::create_dir(&staging).at(&staging)?;
    let swapped = write(&staging).and_then(|()| {
        if !exists {
            // Fails if another process made `out` non-empty meanwhile: it keeps its files.
            return std::fs::rename(&staging, out).at(out);
        }
        let old = sibling("old");
        std::fs::rename(out, &old).at(out)?;
        if let Err(e) = std::fs::rename(&staging, out) {
            let _ = std::fs::rename(&old, out);
            return Err(Error::Io {
                path: out.to_owned(),
                source: e,
            });
        }
        // The new folder is in place: failing to remove the old one (now under a hidden
        // name beside it) must not turn a finished pull into an error, so it is said.
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove the replaced folder; remove it by hand");
        }
        Ok(())
    });
    if swapped.is_err() && staging.exists() {
        salvage(&staging);
        let _ = std::fs::remove_dir_all(&staging);
    }
    swapped
}

/// Writes a small file atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = temp_file_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes).at(path)?;
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta_proto::Digest;

    /// Two downloaded blobs in a scratch folder and a manifest of three files (two share
    /// the first blob), as a pull has them before it writes its folder.
    fn downloaded(scratch: &Path) -> (Manifest, Vec<PathBuf>) {
        let mut files = Vec::new();
        let mut blobs = Vec::new();
        for (path, bytes) in [
            ("a.safetensors", "A"),
            ("b.safetensors", "B"),
            ("c.safetensors", "A"),
        ] {
            let digest = Digest::of(bytes.as_bytes());
            let blob = scratch.join(digest.hex());
            std::fs::write(&blob, bytes).unwrap();
            files.push(FileEntry {
                path: path.into(),
                digest,
                size: 1,
                tensors: Vec::new(),
            });
            blobs.push(blob);
        }
        let manifest = Manifest {
            schema_version: delta_proto::manifest::SCHEMA_VERSION,
            method: "lora".into(),
            config: Default::default(),
            base: BaseRef {
                fingerprint: Digest::of(b"base"),
                name: None,
            },
            files,
            parents: Vec::new(),
            provenance: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        (manifest, blobs)
    }

    /// A pull whose folder cannot be put in place (here another process made `out`
    /// non-empty while the files were being moved) leaves that folder alone, leaves no
    /// staging folder, and has every downloaded blob back in its scratch folder; the
    /// same pull then succeeds once `out` is free.
    #[test]
    fn a_failed_swap_gives_the_moved_downloads_back() {
        let work = tempfile::tempdir().unwrap();
        let (scratch, out) = (work.path().join("scratch"), work.path().join("out"));
        std::fs::create_dir(&scratch).unwrap();
        let (manifest, blobs) = downloaded(&scratch);
        let move_in = |dir: &Path| move_native(dir, &manifest, &blobs, &scratch);
        let give_back = |dir: &Path| unmove_native(dir, &manifest, &blobs, &scratch);

        let err = replace_dir_salvaging(
            &out,
            false,
            |dir| {
                move_in(dir)?;
                std::fs::create_dir(&out).unwrap();
                std::fs::write(out.join("theirs"), "x").unwrap();
                Ok(())
            },
            give_back,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        for blob in &blobs {
            assert!(blob.is_file(), "{} was not given back", blob.display());
        }
        let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "only scratch and out: {left:?}");
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            1,
            "their file alone"
        );

        // A write that fails after moving gives them back as well.
        let err = replace_dir_salvaging(
            &out,
            true,
            |dir| {
                move_in(dir)?;
                Err(Error::Invalid("disk full".into()))
            },
            give_back,
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(blobs.iter().all(|b| b.is_file()));
        assert!(out.join("theirs").is_file());

        std::fs::remove_dir_all(&out).unwrap();
        replace_dir_salvaging(&out, false, move_in, give_back).unwrap();
        assert_eq!(std::fs::read(out.join("c.safetensors")).unwrap(), b"A");
        assert_eq!(std::fs::read(out.join("b.safetensors")).unwrap(), b"B");
        assert!(out.join(NATIVE_MANIFEST).is_file());
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "all moved");
    }
}
