//! `apply`: merges deltas into a base model and writes one safetensors file in the base's
//! dtype (arithmetic in f32).
//!
//! Per delta, on each base tensor, in this order: replacements, then additive terms (LoRA
//! `w·s·B·A`, LoRA bias, dense and sparse diffs), then IA3 scaling. With a weight `w`, a
//! replacement becomes `T + w·(R − T)` and an IA3 vector `1 + w·(l − 1)`, so `w = 1` is the
//! delta itself and `w = 0` is the base.
//!
//! - *Sequential* (`--sequential`, or any delta with parents): each delta acts on the result
//!   of the ones before it, so `IA3 then LoRA` is `(W ⊙ l) + BA` and `LoRA then IA3` is
//!   `(W + BA) ⊙ l`.
//! - *Parallel* (default): each delta's change is computed against the base and the changes
//!   are added: `W + Σ (f_i(W) − W)`. For additive deltas both modes give `W + Σ w_i ΔW_i`.
//!
//! The output is laid out and filled in a memory-mapped temp file next to `out`, tensors in
//! parallel, then fsync'd and renamed: a half-written output is never visible.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use delta_proto::Digest;
use delta_proto::manifest::{Manifest, Role, TensorInfo, classify};
use delta_proto::safetensors::{TensorEntry, dtype_size};
use memmap2::MmapMut;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::numeric::{LoraShape, add_lora, as_f32_mut, from_f32, to_f32, to_i64};
use crate::tensors::{Model, TensorFile};

/// A delta loaded for merging: its manifest and mapped tensor files.
#[derive(Debug)]
pub struct LoadedDelta {
    /// Where it came from (a reference or a folder), for messages.
    pub label: String,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its manifest digest.
    pub digest: Digest,
    files: Vec<TensorFile>,
    index: HashMap<String, (usize, usize)>,
}

impl LoadedDelta {
    /// Opens the files of `manifest` (in manifest order) and checks they hold what it says.
    pub fn open(label: &str, manifest: Manifest, paths: &[std::path::PathBuf]) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| TensorFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                index.insert(t.name.clone(), (fi, ti));
            }
        }
        for (_, t) in manifest.tensors() {
            if !index.contains_key(&t.name) {
                return Err(Error::Invalid(format!(
                    "{label}: tensor {} is in the manifest but not in the files",
                    t.name
                )));
            }
        }
        Ok(Self {
            label: label.to_owned(),
            digest: manifest.digest(),
            manifest,
            files,
            index,
        })
    }

    /// A tensor's header entry (dtype, shape) and raw little-endian bytes.
    pub fn tensor(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        let &(fi, ti) = self
            .index
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("{}: no tensor {name}", self.label)))?;
        let f = &self.files[fi];
        let t = &f.tensors()[ti];
        Ok((t, f.data(t)))
    }

    /// Checks every file hashes to the digest its manifest entry states (for files that
    /// did not come through the verifying cache: a local folder).
    pub fn verify_files(&self) -> Result<()> {
        for (entry, file) in self.manifest.files.iter().zip(&self.files) {
            let actual = Digest::of(file.bytes());
            if actual != entry.digest {
                return Err(Error::Invalid(format!(
                    "{}: {} hashes to {actual}, but the manifest says {}",
                    self.label,
                    file.path().display(),
                    entry.digest
                )));
            }
        }
        Ok(())
    }

    /// A tensor's raw bytes.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        Ok(self.tensor(name)?.1)
    }

    /// A tensor as f32.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, data) = self.tensor(name)?;
        to_f32(&t.dtype, data)
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Result<Vec<u64>> {
        Ok(self.tensor(name)?.0.shape.clone())
    }

    /// Names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.manifest.tensors().map(|(_, t)| t.name.as_str())
    }

    /// Fails if any float tensor holds NaN or ±Inf, naming it.
    pub fn check_finite(&self) -> Result<()> {
        for name in self.names() {
            let (t, data) = self.tensor(name)?;
            if let Some(pos) = crate::numeric::first_nonfinite(&t.dtype, data) {
                return Err(Error::Invalid(format!(
                    "{}: tensor {name} has a non-finite value (NaN or Inf) at index {pos}; --allow-nonfinite accepts it anyway",
                    self.label
                )));
            }
        }
        Ok(())
    }
}

/// One weight per delta: `given`, or 1 each when none are given.
pub fn per_delta_weights(given: &[f32], deltas: usize) -> Result<Vec<f32>> {
    match given.len() {
        0 => Ok(vec![1.0; deltas]),
        n if n == deltas => Ok(given.to_vec()),
        n => Err(Error::Invalid(format!("{n} weights for {deltas} deltas"))),
    }
}

/// Options for [`apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// One weight per delta (default 1).
    pub weights: Vec<f32>,
    /// Each delta acts on the result of the previous ones.
    pub sequential: bool,
    /// Apply even when a delta's base fingerprint differs from the base's.
    pub force: bool,
    /// Accept NaN/Inf in deltas.
    pub allow_nonfinite: bool,
    /// Replace an existing output file.
    pub overwrite: bool,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Base tensors changed.
    pub changed: usize,
    /// Tensors added (heads).
    pub added: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Deltas whose base fingerprint did not match, applied because of `force`.
    pub forced: Vec<String>,
}

/// One operation on one base tensor.
#[derive(Debug, Clone)]
enum Op {
    Replace {
        name: String,
    },
    Lora {
        a: String,
        b: String,
        scale: f32,
        transposed: bool,
    },
    LoraBias {
        name: String,
        scale: f32,
    },
    Diff {
        name: String,
    },
    Sparse {
        indices: String,
        values: String,
    },
    Ia3 {
        name: String,
        input_side: bool,
    },
    /// An output-side IA3 vector on the module's bias (PEFT scales the bias with the rows).
    Ia3Bias {
        name: String,
    },
}

impl Op {
    fn rank(&self) -> u8 {
        match self {
            Op::Replace { .. } => 0,
            Op::Ia3 { .. } | Op::Ia3Bias { .. } => 2,
            _ => 1,
        }
    }
}

/// A base tensor's plan: `(delta index, weight, op)` in application order.
type Plan = Vec<(usize, f32, Op)>;
/// Plans by base tensor name.
type Plans = BTreeMap<String, Plan>;
/// Safetensors metadata key of a merged model: what its classification head reads
/// (`cls`: the pooler; `mean`: the mean of the tokens).
pub const HEAD_POOLING: &str = "delta.head.pooling";

/// Added tensors: name → (delta index, weight).
type Added = BTreeMap<String, (usize, f32)>;

/// `sequential`: a later delta's added tensor (a head trained in a later stage) replaces
/// an earlier one's, as each stage acts on the model the previous ones made; in parallel
/// two deltas adding the same tensor conflict.
fn plan(
    base: &Model,
    deltas: &[LoadedDelta],
    weights: &[f32],
    sequential: bool,
) -> Result<(Plans, Added)> {
    let mut plans = Plans::new();
    let mut added = Added::new();
    for (di, d) in deltas.iter().enumerate() {
        let w = weights[di];
        let mut ops: Vec<(String, Op)> = Vec::new();
        for name in d.names() {
            if let Role::New(t) = classify(name) {
                if let Some((other, _)) = added.insert(t.to_owned(), (di, w))
                    && other != di
                    && !sequential
                {
                    return Err(Error::Invalid(format!(
                        "{} and {} both add tensor {t}; apply them separately or in order (--sequential: the later one's wins)",
                        deltas[other].label, d.label
                    )));
                }
                continue;
            }
            ops.extend(merge_ops(base, d, name)?);
        }
        ops.sort_by_key(|(_, op)| op.rank());
        for (target, op) in ops {
            if base.get(&target).is_none() {
                return Err(Error::Invalid(format!(
                    "{}: targets {target}, which the base does not have",
                    d.label
                )));
            }
            plans.entry(target).or_default().push((di, w, op));
        }
    }
    Ok((plans, added))
}

/// What merging tensor `name` of delta `d` does: `(base tensor, op)` pairs, none for the
/// second half of a pair (`lora_B`, `diff_values`: their first half's op reads them) and
/// for added tensors (`plan` collects those).
fn merge_ops(base: &Model, d: &LoadedDelta, name: &str) -> Result<Vec<(String, Op)>> {
    let lora = d.manifest.config.lora.as_ref();
    let lora_scale = |m: &str| {
        lora.map(|cfg| cfg.scale_for(m) as f32).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: {name} but no LoRA settings in the manifest",
                d.label
            ))
        })
    };
    Ok(match classify(name) {
        Role::LoraA(m) => vec![(
            format!("{m}.weight"),
            Op::Lora {
                a: name.to_owned(),
                b: format!("{m}.lora_B"),
                scale: lora_scale(m)?,
                transposed: lora.is_some_and(|l| l.fan_in_fan_out),
            },
        )],
        Role::LoraBias(m) => vec![(
            format!("{m}.bias"),
            Op::LoraBias {
                name: name.to_owned(),
                scale: lora_scale(m)?,
            },
        )],
        Role::Ia3(m) => ia3_ops(base, d, name, m)?,
        Role::Diff(t) => vec![(
            t.to_owned(),
            Op::Diff {
                name: name.to_owned(),
            },
        )],
        Role::DiffIndices(t) => vec![(
            t.to_owned(),
            Op::Sparse {
                indices: name.to_owned(),
                values: format!("{t}.diff_values"),
            },
        )],
        Role::Replace(t) => vec![(
            t.to_owned(),
            Op::Replace {
                name: name.to_owned(),
            },
        )],
        Role::New(_) | Role::LoraB(_) | Role::DiffValues(_) => Vec::new(),
        Role::Runtime => {
            return Err(Error::Invalid(format!(
                "{}: tensor {name} belongs to an adapter, prefix or prompt, which runs beside the model and cannot be merged into its weights; run it with `delta-worker predict` instead",
                d.label
            )));
        }
        Role::Unknown => {
            return Err(Error::Invalid(format!(
                "{}: tensor {name} has no known role",
                d.label
            )));
        }
    })
}

/// An IA3 vector `name` on module `m`: it scales the weight's input columns or its output
/// rows (and then, as PEFT's merge does for a module that is not feed-forward, the bias
/// too, since the vector multiplies the layer's whole output).
fn ia3_ops(base: &Model, d: &LoadedDelta, name: &str, m: &str) -> Result<Vec<(String, Op)>> {
    let target = format!("{m}.weight");
    let (entry, _) = base.get(&target).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: {name} targets {target}, which the base lacks",
            d.label
        ))
    })?;
    let len = d.shape(name)?.first().copied().unwrap_or(0);
    let ia3 = d.manifest.config.ia3.as_ref();
    let ff = ia3.is_some_and(|c| c.is_feedforward(m));
    let transposed = ia3.is_some_and(|c| c.fan_in_fan_out);
    let (out, inp) = match entry.shape.as_slice() {
        [o, i] if transposed => (*i, *o),
        [o, i] => (*o, *i),
        _ => {
            return Err(Error::Invalid(format!(
                "{}: {name} targets a tensor that is not 2-D",
                d.label
            )));
        }
    };
    let input_side = if out == inp { ff } else { len == inp };
    let mut ops = Vec::with_capacity(2);
    let bias = format!("{m}.bias");
    if !input_side && base.get(&bias).is_some() {
        ops.push((
            bias,
            Op::Ia3Bias {
                name: name.to_owned(),
            },
        ));
    }
    ops.push((
        target,
        Op::Ia3 {
            name: name.to_owned(),
            input_side: input_side != transposed,
        },
    ));
    Ok(ops)
}

fn apply_op(w: &mut [f32], shape: &[u64], d: &LoadedDelta, weight: f32, op: &Op) -> Result<()> {
    match op {
        Op::Replace { name } => {
            let r = d.f32(name)?;
            w.iter_mut()
                .zip(&r)
                .for_each(|(x, r)| *x += weight * (r - *x));
        }
        Op::Lora {
            a,
            b,
            scale,
            transposed,
        } => {
            let (av, bv) = (d.f32(a)?, d.f32(b)?);
            let a_shape = d.shape(a)?;
            let (r, inp) = (a_shape[0] as usize, a_shape[1] as usize);
            let out = bv.len() / r.max(1);
            add_lora(
                w,
                &bv,
                &av,
                LoraShape {
                    out,
                    inp,
                    r,
                    transposed: *transposed,
                },
                weight * scale,
            )?;
        }
        Op::LoraBias { name, scale } => {
            let b = d.f32(name)?;
            w.iter_mut()
                .zip(&b)
                .for_each(|(x, b)| *x += weight * scale * b);
        }
        Op::Diff { name } => {
            let diff = d.f32(name)?;
            w.iter_mut().zip(&diff).for_each(|(x, v)| *x += weight * v);
        }
        Op::Sparse { indices, values } => {
            let idx = to_i64(d.tensor(indices)?.1);
            let vals = d.f32(values)?;
            for (i, v) in idx.iter().zip(&vals) {
                let slot = usize::try_from(*i)
                    .ok()
                    .and_then(|i| w.get_mut(i))
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "{}: sparse index {i} in {indices} is outside the tensor ({} values)",
                            d.label,
                            shape.iter().product::<u64>()
                        ))
                    })?;
                *slot += weight * v;
            }
        }
        Op::Ia3Bias { name } => {
            let l = d.f32(name)?;
            w.iter_mut()
                .zip(&l)
                .for_each(|(x, l)| *x *= ia3_factor(*l, weight));
        }
        Op::Ia3 { name, input_side } => {
            let l: Vec<f32> = d
                .f32(name)?
                .iter()
                .map(|l| ia3_factor(*l, weight))
                .collect();
            let cols = shape.get(1).copied().unwrap_or(1) as usize;
            for (row, chunk) in w.chunks_mut(cols).enumerate() {
                if *input_side {
                    chunk.iter_mut().zip(&l).for_each(|(x, s)| *x *= s);
                } else {
                    let s = l.get(row).copied().unwrap_or(1.0);
                    chunk.iter_mut().for_each(|x| *x *= s);
                }
            }
        }
    }
    Ok(())
}

/// An IA3 vector entry at `weight`: `1 + weight·(l − 1)`, and `l` itself at weight 1, so
/// a plain merge multiplies by exactly the stored value, as PEFT's does (the general form
/// rounds twice).
fn ia3_factor(l: f32, weight: f32) -> f32 {
    if weight == 1.0 {
        l
    } else {
        1.0 + weight * (l - 1.0)
    }
}

/// Runs one tensor's plan on its f32 values.
fn run_plan(
    w: &mut [f32],
    shape: &[u64],
    plan: &Plan,
    deltas: &[LoadedDelta],
    sequential: bool,
) -> Result<()> {
    let additive = plan.iter().all(|(_, _, op)| op.rank() == 1);
    // One delta's ops on a tensor need no base-relative bookkeeping: applying them in
    // place gives the same change without rounding `base + (own − base)` a second time
    // (so a lone IA3 merge is exactly PEFT's product).
    let one_delta = plan.windows(2).all(|p| p[0].0 == p[1].0);
    if sequential || additive || one_delta {
        for (di, weight, op) in plan {
            apply_op(w, shape, &deltas[*di], *weight, op)?;
        }
        return Ok(());
    }
    // Parallel with replacements or scaling: each delta's change is taken against the base.
    let base = w.to_vec();
    let mut i = 0;
    while i < plan.len() {
        let di = plan[i].0;
        let mut own = base.clone();
        while i < plan.len() && plan[i].0 == di {
            apply_op(&mut own, shape, &deltas[di], plan[i].1, &plan[i].2)?;
            i += 1;
        }
        w.iter_mut()
            .zip(own.iter().zip(&base))
            .for_each(|(x, (o, b))| *x += o - b);
    }
    Ok(())
}

/// Merges `deltas` into `base` and writes `out`: the merged safetensors file is laid out
/// first (header and tensor offsets), then every tensor is written into a memory-mapped
/// temp file in parallel, fsync'd and renamed over `out`.
pub fn apply(
    base: &Model,
    base_fingerprint: Digest,
    deltas: &[LoadedDelta],
    opts: &ApplyOptions,
    out: &Path,
) -> Result<ApplyReport> {
    if deltas.is_empty() {
        return Err(Error::Invalid(
            "nothing to apply: name at least one delta".into(),
        ));
    }
    let weights = per_delta_weights(&opts.weights, deltas.len())?;
    if out.exists() && !opts.overwrite {
        return Err(Error::Invalid(format!(
            "{} exists; pass --overwrite to replace it",
            out.display()
        )));
    }
    let forced = check_deltas(base, base_fingerprint, deltas, opts)?;
    let sequential = opts.sequential || deltas.iter().any(|d| !d.manifest.parents.is_empty());
    let (plans, added) = plan(base, deltas, &weights, sequential)?;
    let layout = layout(base, deltas, &added)?;
    let (header_bytes, sizes, data_len) = header(base, deltas, &layout);
    let total = 8 + header_bytes.len() as u64 + data_len;

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).at(dir)?;
    tmp.as_file().set_len(total).at(out)?;
    // SAFETY: the temp file was just created by us, is not shared, and is not resized
    // while the map lives.
    let mut map = unsafe { MmapMut::map_mut(tmp.as_file()) }.at(out)?;
    map[..8].copy_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    map[8..8 + header_bytes.len()].copy_from_slice(&header_bytes);
    let mut rest = &mut map[8 + header_bytes.len()..];
    let mut slots = Vec::with_capacity(layout.len());
    for n in &sizes {
        let (head, tail) = rest.split_at_mut(*n);
        slots.push(head);
        rest = tail;
    }
    let fill = Fill {
        base,
        deltas,
        plans: &plans,
        sequential,
    };
    let changed = layout
        .par_iter()
        .zip(slots.into_par_iter())
        .map(|(entry, slot)| fill.tensor(entry, slot))
        .collect::<Result<Vec<usize>>>()?
        .into_iter()
        .sum();
    map.flush().at(out)?;
    drop(map);
    tmp.as_file().sync_all().at(out)?;
    if out.exists() && !opts.overwrite {
        return Err(Error::Invalid(format!(
            "{} appeared while applying; pass --overwrite to replace it",
            out.display()
        )));
    }
    tmp.persist(out).map_err(|e| Error::Io {
        path: out.to_owned(),
        source: e.error,
    })?;
    Ok(ApplyReport {
        changed,
        added: added.len(),
        bytes: total,
        forced,
    })
}

/// Checks every delta against the base (its fingerprint, unless `--force`; its tensors'
/// names and shapes; finite values, unless allowed). Returns the labels applied by force.
fn check_deltas(
    base: &Model,
    base_fingerprint: Digest,
    deltas: &[LoadedDelta],
    opts: &ApplyOptions,
) -> Result<Vec<String>> {
    let mut forced = Vec::new();
    let table: BTreeMap<String, TensorInfo> = base
        .table()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    for d in deltas {
        if d.manifest.base.fingerprint != base_fingerprint {
            if !opts.force {
                return Err(Error::Invalid(format!(
                    "{} belongs to base {}, but the base given has fingerprint {}; refusing (--force applies it anyway)",
                    d.label, d.manifest.base.fingerprint, base_fingerprint
                )));
            }
            tracing::warn!(delta = %d.label, expected = %d.manifest.base.fingerprint, actual = %base_fingerprint, "applying to a different base because of --force");
            forced.push(d.label.clone());
        }
        d.manifest
            .check_against_base(&table)
            .map_err(|e| Error::Invalid(format!("{}: {e}", d.label)))?;
        if !opts.allow_nonfinite {
            d.check_finite()?;
        }
    }
    Ok(forced)
}

/// Where an output tensor's values come from.
enum Source<'a> {
    /// The base tensor of this name, merged with its plan if it has one.
    Base(&'a str),
    /// A tensor a delta adds (`NAME.new` of delta `.0`, scaled by `.1`).
    Added(usize, f32, &'a str),
}

/// One output tensor: name, dtype, shape and source.
type Entry<'a> = (String, String, Vec<u64>, Source<'a>);

/// The output's tensors: the base's and the added ones, by dtype size (largest first)
/// then name, so every tensor is aligned to its element size.
fn layout<'a>(base: &'a Model, deltas: &[LoadedDelta], added: &'a Added) -> Result<Vec<Entry<'a>>> {
    let mut layout: Vec<Entry<'a>> = Vec::new();
    for name in base.names() {
        let (t, _) = base
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("base tensor {name} vanished")))?;
        layout.push((
            name.to_owned(),
            t.dtype.clone(),
            t.shape.clone(),
            Source::Base(name),
        ));
    }
    for (name, (di, w)) in added {
        let t = &deltas[*di].tensor(&format!("{name}.new"))?.0;
        layout.push((
            name.clone(),
            t.dtype.clone(),
            t.shape.clone(),
            Source::Added(*di, *w, name),
        ));
    }
    layout.sort_by(|a, b| {
        let (sa, sb) = (dtype_size(&a.1).unwrap_or(1), dtype_size(&b.1).unwrap_or(1));
        sb.cmp(&sa).then_with(|| a.0.cmp(&b.0))
    });
    Ok(layout)
}

/// The output's safetensors header (padded to 8 bytes; the base's metadata, plus the
/// head's pooling), each tensor's size in bytes and the size of the data after it.
fn header(
    base: &Model,
    deltas: &[LoadedDelta],
    layout: &[Entry<'_>],
) -> (Vec<u8>, Vec<usize>, u64) {
    let mut header = serde_json::Map::new();
    let metadata: serde_json::Map<String, serde_json::Value> = base
        .files()
        .first()
        .map(|f| {
            f.metadata()
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect()
        })
        .unwrap_or_default();
    // The merged model's head reads what the last delta with a head trained it on (the
    // pooler or the mean of the tokens): recorded for runtimes that load the file.
    let mut metadata = metadata;
    if let Some(pooling) = deltas.iter().rev().find_map(|d| {
        d.manifest.config.other.get("head").map(|h| {
            h.get("pooling")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("mean")
                .to_owned()
        })
    }) {
        metadata.insert(HEAD_POOLING.into(), serde_json::Value::String(pooling));
    }
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(layout.len());
    for (name, dtype, shape, _) in layout {
        let n = shape.iter().product::<u64>() * dtype_size(dtype).unwrap_or(1);
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}));
        sizes.push(n as usize);
        offset += n;
    }
    let mut header_bytes =
        serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }

    (header_bytes, sizes, offset)
}

/// What filling one output tensor reads.
struct Fill<'a> {
    base: &'a Model,
    deltas: &'a [LoadedDelta],
    plans: &'a Plans,
    sequential: bool,
}

impl Fill<'_> {
    /// Writes one output tensor into its slot; returns 1 if a delta changed it.
    fn tensor(&self, (name, dtype, shape, source): &Entry<'_>, slot: &mut [u8]) -> Result<usize> {
        let (base, deltas, plans, sequential) =
            (self.base, self.deltas, self.plans, self.sequential);
        match source {
            Source::Added(di, w, t) => {
                let v: Vec<f32> = deltas[*di]
                    .f32(&format!("{t}.new"))?
                    .iter()
                    .map(|x| x * w)
                    .collect();
                from_f32(dtype, &v, slot)?;
                Ok(0)
            }
            Source::Base(b) => {
                let (_, data) = base
                    .get(b)
                    .ok_or_else(|| Error::Invalid(format!("base tensor {b} vanished")))?;
                match plans.get(*b) {
                    None => {
                        slot.copy_from_slice(data);
                        Ok(0)
                    }
                    Some(plan) => {
                        // f32: merge in place in the output (one pass over the bytes).
                        if dtype == "F32" {
                            slot.copy_from_slice(data);
                            if let Some(w) = as_f32_mut(slot) {
                                run_plan(w, shape, plan, deltas, sequential)?;
                                return Ok(1);
                            }
                        }
                        let mut w = to_f32(dtype, data)
                            .map_err(|e| Error::Invalid(format!("base tensor {name}: {e}")))?;
                        run_plan(&mut w, shape, plan, deltas, sequential)?;
                        from_f32(dtype, &w, slot)?;
                        Ok(1)
                    }
                }
            }
        }
    }
}
