//! `compose`: combines several deltas on one base into a new native delta, without the
//! base weights.
//!
//! - `cat` (parallel LoRA): `A = rows(w_i·s_i·A_i)`, `B = cols(B_i)`, rank `Σ r_i`, scale 1:
//!   exactly the weighted sum of the deltas. Dense and sparse diffs are summed exactly
//!   (sparse ones by concatenating indices: `apply` adds per index).
//! - `linear`, `svd`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: on the dense
//!   `ΔW_i` of every target (never on A and B separately, which would add cross terms),
//!   then, where the inputs were LoRA, re-factorised to `--rank` by truncated SVD, with the
//!   relative Frobenius error of each truncation reported.
//! - IA3 vectors merge as their weighted sum in `linear`/`cat`; replacements and new tensors
//!   are carried over when only one input has them.
//! - Adapters, prefixes and prompts are kept side by side (parallel) or stacked
//!   (sequential) under `adapter.<i>.`, `prefix.<i>.`, `prompt.<i>.`, and the composition
//!   is recorded in `config.composition` for the runtime.
//! - Sequential composition of additive deltas is their sum (each was trained on the base
//!   plus the earlier ones, and `W + ΔA + ΔB` is what applying them in order gives); a chain
//!   with IA3 or replacements cannot be folded without the base and is refused with the
//!   command that applies it instead.
//!
//! The output manifest records the inputs' digests, the weights, the method, the seed and
//! the tool version under `provenance.composed_from`.

use std::collections::BTreeMap;
use std::path::Path;

use delta_proto::manifest::{
    BaseRef, Ia3Config, LoraConfig, Manifest, MethodConfig, Role, SCHEMA_VERSION, classify,
};
use serde_json::json;

use crate::apply::LoadedDelta;
use crate::delta::{NATIVE_TENSORS, write_manifest, write_tensors};
use crate::error::{Error, IoContext, Result};
use crate::numeric::{SplitMix, f32_bytes, lora_dense, to_i64, truncated_svd};

/// Parallel (simultaneous) or sequential composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Several deltas on one base at once.
    Parallel,
    /// Each delta trained on the base plus the earlier ones.
    Sequential,
}

/// How deltas are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Merge {
    /// LoRA concatenation: exact.
    Cat,
    /// Weighted sum of dense deltas.
    Linear,
    /// Weighted sum, always re-factorised to LoRA by SVD.
    Svd,
    /// TIES: trim, elect sign, disjoint mean.
    Ties,
    /// DARE (random drop and rescale), then weighted sum.
    DareLinear,
    /// DARE, then TIES sign election and disjoint mean.
    DareTies,
    /// Keep the largest magnitudes, then weighted sum.
    MagnitudePrune,
}

impl Merge {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Merge::Cat => "cat",
            Merge::Linear => "linear",
            Merge::Svd => "svd",
            Merge::Ties => "ties",
            Merge::DareLinear => "dare_linear",
            Merge::DareTies => "dare_ties",
            Merge::MagnitudePrune => "magnitude_prune",
        }
    }
}

/// Options for [`compose`].
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// Parallel or sequential.
    pub mode: Mode,
    /// Merge method.
    pub merge: Merge,
    /// One weight per delta (default 1).
    pub weights: Vec<f32>,
    /// Rank of re-factorised LoRA (default: the sum of the input ranks, which is exact for
    /// `linear`).
    pub rank: Option<usize>,
    /// Fraction kept by TIES, DARE and magnitude pruning.
    pub density: f32,
    /// Seed of DARE's random drops and the SVD's sketch.
    pub seed: u64,
}

/// What [`compose`] produced.
#[derive(Debug, Clone)]
pub struct ComposeReport {
    /// The new delta's manifest (as written to `delta.json`).
    pub manifest: Manifest,
    /// Relative Frobenius error of each SVD re-factorisation, by module.
    pub truncation_error: BTreeMap<String, f64>,
}

/// Per-target contributions of one kind.
#[derive(Default)]
struct Targets {
    /// module → (delta, A name, B name, scale)
    lora: BTreeMap<String, Vec<(usize, String, String, f32)>>,
    /// tensor → (delta, name)
    diff: BTreeMap<String, Vec<(usize, String)>>,
    /// tensor → (delta, indices name, values name)
    sparse: BTreeMap<String, Vec<(usize, String, String)>>,
    /// module → (delta, name)
    lora_bias: BTreeMap<String, Vec<(usize, String, f32)>>,
    /// module → (delta, name)
    ia3: BTreeMap<String, Vec<(usize, String)>>,
    /// carried tensors: output name → (delta, input name)
    carried: BTreeMap<String, (usize, String)>,
    /// run-time tensors: (delta, name)
    runtime: Vec<(usize, String)>,
}

/// `sequential`: a later delta's added tensor (a head trained in a later stage) replaces
/// an earlier one's, as `delta apply` does.
fn collect(deltas: &[LoadedDelta], sequential: bool) -> Result<Targets> {
    let mut t = Targets::default();
    for (di, d) in deltas.iter().enumerate() {
        let lora = d.manifest.config.lora.as_ref();
        for name in d.names() {
            match classify(name) {
                Role::LoraA(m) => {
                    let cfg = lora.ok_or_else(|| {
                        Error::Invalid(format!("{}: {name} without LoRA settings", d.label))
                    })?;
                    t.lora.entry(m.to_owned()).or_default().push((
                        di,
                        name.to_owned(),
                        format!("{m}.lora_B"),
                        cfg.scale_for(m) as f32,
                    ));
                }
                Role::LoraBias(m) => {
                    let cfg = lora.ok_or_else(|| {
                        Error::Invalid(format!("{}: {name} without LoRA settings", d.label))
                    })?;
                    t.lora_bias.entry(m.to_owned()).or_default().push((
                        di,
                        name.to_owned(),
                        cfg.scale_for(m) as f32,
                    ));
                }
                Role::Ia3(m) => t
                    .ia3
                    .entry(m.to_owned())
                    .or_default()
                    .push((di, name.to_owned())),
                Role::Diff(x) => t
                    .diff
                    .entry(x.to_owned())
                    .or_default()
                    .push((di, name.to_owned())),
                Role::DiffIndices(x) => {
                    t.sparse.entry(x.to_owned()).or_default().push((
                        di,
                        name.to_owned(),
                        format!("{x}.diff_values"),
                    ));
                }
                Role::Replace(_) | Role::New(_) => {
                    let later_head = sequential && matches!(classify(name), Role::New(_));
                    if let Some((other, _)) =
                        t.carried.insert(name.to_owned(), (di, name.to_owned()))
                        && !later_head
                    {
                        return Err(Error::Invalid(format!(
                            "{} and {} both set {name}; a merge of two replacements needs the base (apply them instead)",
                            deltas[other].label, d.label
                        )));
                    }
                }
                Role::Runtime => t.runtime.push((di, name.to_owned())),
                Role::LoraB(_) | Role::DiffValues(_) => {}
                Role::Unknown => {
                    return Err(Error::Invalid(format!(
                        "{}: tensor {name} has no known role",
                        d.label
                    )));
                }
            }
        }
    }
    Ok(t)
}

/// Keeps the `density` fraction of largest magnitudes, zeroing the rest.
fn magnitude_prune(v: &mut [f32], density: f32) {
    let keep = ((v.len() as f64) * density as f64).round() as usize;
    if keep >= v.len() {
        return;
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let cut = v.len() - keep;
    mags.select_nth_unstable_by(cut.min(v.len() - 1), f32::total_cmp);
    let threshold = mags[cut.min(v.len() - 1)];
    let mut above: usize = v.iter().filter(|x| x.abs() > threshold).count();
    for x in v.iter_mut() {
        let m = x.abs();
        if m < threshold || (m == threshold && above >= keep) {
            *x = 0.0;
        } else if m == threshold {
            above += 1;
        }
    }
}

/// DARE: drops each value with probability `1 − density`, rescales survivors by
/// `1 / density`.
fn dare(v: &mut [f32], density: f32, rng: &mut SplitMix) {
    if density >= 1.0 {
        return;
    }
    let scale = 1.0 / density.max(f32::MIN_POSITIVE);
    for x in v.iter_mut() {
        *x = if rng.uniform() < density as f64 {
            *x * scale
        } else {
            0.0
        };
    }
}

/// TIES sign election and disjoint mean over weighted (and already trimmed) tensors.
fn ties_merge(tensors: &[Vec<f32>]) -> Vec<f32> {
    let n = tensors.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let sum: f32 = tensors.iter().map(|t| t[i]).sum();
            let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
            let agree: Vec<f32> = tensors
                .iter()
                .map(|t| t[i])
                .filter(|v| *v != 0.0 && v.signum() == sign)
                .collect();
            if agree.is_empty() {
                0.0
            } else {
                agree.iter().sum::<f32>() / agree.len() as f32
            }
        })
        .collect()
}

/// Merges weighted dense tensors with a dense method. `seed` differs per target so DARE's
/// masks are independent across tensors but reproducible.
fn merge_dense(parts: Vec<(f32, Vec<f32>)>, merge: Merge, density: f32, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let weighted: Vec<Vec<f32>> = parts
        .into_iter()
        .map(|(w, mut v)| {
            match merge {
                Merge::Ties | Merge::MagnitudePrune => magnitude_prune(&mut v, density),
                Merge::DareLinear | Merge::DareTies => dare(&mut v, density, &mut rng),
                Merge::Cat | Merge::Linear | Merge::Svd => {}
            }
            v.iter_mut().for_each(|x| *x *= w);
            v
        })
        .collect();
    match merge {
        Merge::Ties | Merge::DareTies => ties_merge(&weighted),
        _ => {
            let n = weighted.first().map_or(0, Vec::len);
            (0..n)
                .map(|i| weighted.iter().map(|t| t[i]).sum())
                .collect()
        }
    }
}

/// An output tensor: name, shape, little-endian bytes, dtype.
type OutTensor = (String, Vec<u64>, Vec<u8>, &'static str);

/// Appends `M.lora_A` (`[r, inp]`) and `M.lora_B` (`[out, r]`) as f32.
fn push_lora(
    tensors: &mut Vec<OutTensor>,
    m: &str,
    a: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
    r: usize,
) {
    tensors.push((
        format!("{m}.lora_A"),
        vec![r as u64, inp as u64],
        f32_bytes(a),
        "F32",
    ));
    tensors.push((
        format!("{m}.lora_B"),
        vec![out as u64, r as u64],
        f32_bytes(b),
        "F32",
    ));
}

fn target_seed(seed: u64, name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    seed ^ u64::from_le_bytes(b)
}

/// Composes `deltas` into a new native delta folder at `out`.
pub fn compose(deltas: &[LoadedDelta], opts: &ComposeOptions, out: &Path) -> Result<ComposeReport> {
    let (first, weights, fan_in_fan_out) = check_inputs(deltas, opts)?;
    let t = collect(deltas, opts.mode == Mode::Sequential)?;
    let merge = effective_merge(deltas.len(), opts, &t)?;
    let mut c = Composer {
        deltas,
        weights: &weights,
        opts,
        merge,
        tensors: Vec::new(),
        truncation_error: BTreeMap::new(),
        ranks: BTreeMap::new(),
    };
    c.lora(&t.lora)?;
    c.vectors(&t)?;
    c.sparse(&t.sparse)?;
    let ia3 = c.ia3(&t.ia3)?;
    c.carried(&t.carried)?;
    c.runtime(&t.runtime)?;
    let Composer {
        tensors,
        truncation_error,
        ranks,
        ..
    } = c;
    if tensors.is_empty() {
        return Err(Error::Invalid(
            "the inputs have no tensors to compose".into(),
        ));
    }

    std::fs::create_dir_all(out).at(out)?;
    let path = out.join(NATIVE_TENSORS);
    write_tensors(
        &path,
        tensors
            .iter()
            .map(|(n, s, b, dt)| (n.clone(), (*dt).to_owned(), s.clone(), b.as_slice())),
        None,
    )?;

    let members: Vec<serde_json::Value> = deltas
        .iter()
        .zip(&weights)
        .map(|(d, w)| json!({"digest": d.digest.to_string(), "label": d.label, "weight": w, "method": d.manifest.method}))
        .collect();
    let mut config = MethodConfig {
        ia3,
        lora: lora_config(&ranks, fan_in_fan_out, !t.lora_bias.is_empty()),
        ..MethodConfig::default()
    };
    if !t.runtime.is_empty() {
        let layout = if opts.mode == Mode::Parallel {
            "parallel"
        } else {
            "stack"
        };
        config.other.insert(
            "composition".into(),
            json!({"layout": layout, "members": members}),
        );
    }
    let method = composed_method(deltas, &ranks, &t);
    let mut provenance = BTreeMap::new();
    provenance.insert(
        "composed_from".into(),
        json!({
            "mode": if opts.mode == Mode::Parallel { "parallel" } else { "sequential" },
            "merge": merge.name(),
            "inputs": members,
            "density": opts.density,
            "rank": opts.rank,
            "seed": opts.seed,
            "tool": format!("delta {}", env!("CARGO_PKG_VERSION")),
        }),
    );
    let file = crate::delta::file_entry(&path)?;
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        method,
        config,
        base: BaseRef {
            fingerprint: first.manifest.base.fingerprint,
            name: first.manifest.base.name.clone(),
        },
        files: vec![file],
        parents: Vec::new(),
        provenance,
        annotations: BTreeMap::new(),
    };
    manifest.check_shape()?;
    write_manifest(out, &manifest)?;
    Ok(ComposeReport {
        manifest,
        truncation_error,
    })
}

/// Refuses inputs that cannot be composed (none, other bases, mixed LoRA layouts, a
/// delta before its parents, a density out of range); returns the first input, each
/// input's weight and the LoRA layout (`fan_in_fan_out`).
fn check_inputs<'a>(
    deltas: &'a [LoadedDelta],
    opts: &ComposeOptions,
) -> Result<(&'a LoadedDelta, Vec<f32>, bool)> {
    let first = deltas
        .first()
        .ok_or_else(|| Error::Invalid("nothing to compose: name at least one delta".into()))?;
    let weights = crate::apply::per_delta_weights(&opts.weights, deltas.len())?;
    if !(opts.density > 0.0 && opts.density <= 1.0) {
        return Err(Error::Invalid(format!(
            "--density {} must be in (0, 1]",
            opts.density
        )));
    }
    for d in deltas {
        if d.manifest.base.fingerprint != first.manifest.base.fingerprint {
            return Err(Error::Invalid(format!(
                "{} belongs to base {}, {} to base {}: deltas on different bases cannot be composed",
                first.label, first.manifest.base.fingerprint, d.label, d.manifest.base.fingerprint
            )));
        }
    }
    let fans: Vec<bool> = deltas
        .iter()
        .filter_map(|d| d.manifest.config.lora.as_ref().map(|l| l.fan_in_fan_out))
        .collect();
    let fan_in_fan_out = fans.first().copied().unwrap_or(false);
    if fans.iter().any(|f| *f != fan_in_fan_out) {
        return Err(Error::Invalid(
            "the LoRA inputs disagree on fan_in_fan_out".into(),
        ));
    }
    // A delta trained on top of parents only means something after them: composing it
    // alone would drop what it was trained on.
    for (i, d) in deltas.iter().enumerate() {
        for p in &d.manifest.parents {
            if !deltas[..i].iter().any(|o| o.digest == p.digest) {
                return Err(Error::Invalid(format!(
                    "{} was trained on top of {} ({}): compose it after its parents, in order (--mode sequential)",
                    d.label,
                    p.reference.as_deref().unwrap_or("a parent"),
                    p.digest
                )));
            }
        }
    }
    Ok((first, weights, fan_in_fan_out))
}

/// The merge that runs: a sequential chain folds additive steps exactly (`cat` for
/// `linear` and `cat`), and refuses what cannot be folded without the base.
fn effective_merge(inputs: usize, opts: &ComposeOptions, t: &Targets) -> Result<Merge> {
    Ok(if opts.mode == Mode::Sequential {
        if let Some(m) = t.ia3.keys().next() {
            return Err(Error::Invalid(format!(
                "a sequential chain with IA3 scaling ({m}) cannot be folded into one delta without the base; apply it with `delta apply --sequential`"
            )));
        }
        if t.carried.keys().any(|n| n.ends_with(".replace")) && inputs > 1 {
            return Err(Error::Invalid(
                "a sequential chain with replaced tensors cannot be folded into one delta without the base; apply it with `delta apply --sequential`".into(),
            ));
        }
        // Additive steps in order sum exactly; cat keeps LoRA exact.
        if opts.merge == Merge::Cat || opts.merge == Merge::Linear {
            Merge::Cat
        } else {
            opts.merge
        }
    } else {
        opts.merge
    })
}

/// The output tensors of a composition, built kind by kind.
struct Composer<'a> {
    deltas: &'a [LoadedDelta],
    weights: &'a [f32],
    opts: &'a ComposeOptions,
    merge: Merge,
    tensors: Vec<OutTensor>,
    /// Per LoRA module, the relative error of truncating a dense merge to its rank.
    truncation_error: BTreeMap<String, f64>,
    /// Per LoRA module, the rank written.
    ranks: BTreeMap<String, u64>,
}

impl Composer<'_> {
    /// LoRA modules: concatenated (`cat`, exact) or merged dense and truncated back to a
    /// rank by SVD.
    fn lora(&mut self, lora: &BTreeMap<String, Vec<(usize, String, String, f32)>>) -> Result<()> {
        for (m, parts) in lora {
            let mut shapes = Vec::new();
            for (di, a, _, _) in parts {
                shapes.push(self.deltas[*di].shape(a)?);
            }
            let inp = shapes[0][1] as usize;
            let out_dim = self.deltas[parts[0].0].shape(&parts[0].2)?[0] as usize;
            if self.merge == Merge::Cat {
                let r_total: usize = shapes.iter().map(|s| s[0] as usize).sum();
                let mut a_cat = Vec::with_capacity(r_total * inp);
                let mut b_cat = vec![0f32; out_dim * r_total];
                let mut col = 0;
                for ((di, a, b, s), shape) in parts.iter().zip(&shapes) {
                    let r = shape[0] as usize;
                    let scale = self.weights[*di] * s;
                    a_cat.extend(self.deltas[*di].f32(a)?.iter().map(|x| x * scale));
                    let bv = self.deltas[*di].f32(b)?;
                    for row in 0..out_dim {
                        b_cat[row * r_total + col..row * r_total + col + r]
                            .copy_from_slice(&bv[row * r..(row + 1) * r]);
                    }
                    col += r;
                }
                push_lora(&mut self.tensors, m, &a_cat, &b_cat, out_dim, inp, r_total);
                self.ranks.insert(m.clone(), r_total as u64);
                continue;
            }
            let mut dense_parts = Vec::new();
            for ((di, a, b, s), shape) in parts.iter().zip(&shapes) {
                let r = shape[0] as usize;
                dense_parts.push((
                    self.weights[*di],
                    lora_dense(
                        &self.deltas[*di].f32(b)?,
                        &self.deltas[*di].f32(a)?,
                        out_dim,
                        inp,
                        r,
                        *s,
                    )?,
                ));
            }
            let merged = merge_dense(
                dense_parts,
                self.merge,
                self.opts.density,
                target_seed(self.opts.seed, m),
            );
            let default_rank: usize = shapes.iter().map(|s| s[0] as usize).sum();
            let k = self
                .opts
                .rank
                .unwrap_or(default_rank)
                .min(out_dim)
                .min(inp)
                .max(1);
            let (b, a, err) =
                truncated_svd(&merged, out_dim, inp, k, target_seed(self.opts.seed, m));
            self.truncation_error.insert(m.clone(), err);
            push_lora(&mut self.tensors, m, &a, &b, out_dim, inp, k);
            self.ranks.insert(m.clone(), k as u64);
        }

        Ok(())
    }

    /// LoRA biases (their scaled weighted sum, at scale 1) and dense diffs.
    fn vectors(&mut self, t: &Targets) -> Result<()> {
        let dense_merge = if self.merge == Merge::Cat {
            Merge::Linear
        } else {
            self.merge
        };
        let mut merge_vectors =
            |target: &str, suffix: &str, parts: Vec<(usize, &str, f32)>| -> Result<()> {
                let mut dense = Vec::new();
                for (di, name, scale) in &parts {
                    dense.push((self.weights[*di] * scale, self.deltas[*di].f32(name)?));
                }
                let shape = self.deltas[parts[0].0].shape(parts[0].1)?;
                let merged = merge_dense(
                    dense,
                    dense_merge,
                    self.opts.density,
                    target_seed(self.opts.seed, target),
                );
                self.tensors.push((
                    format!("{target}.{suffix}"),
                    shape,
                    f32_bytes(&merged),
                    "F32",
                ));
                Ok(())
            };
        for (m, parts) in &t.lora_bias {
            merge_vectors(
                m,
                "lora_bias",
                parts
                    .iter()
                    .map(|(di, n, s)| (*di, n.as_str(), *s))
                    .collect(),
            )?;
        }
        for (x, parts) in &t.diff {
            merge_vectors(
                x,
                "diff",
                parts.iter().map(|(di, n)| (*di, n.as_str(), 1.0)).collect(),
            )?;
        }

        Ok(())
    }

    /// Sparse diffs: exact sums by concatenation (linear and cat only).
    fn sparse(&mut self, sparse: &BTreeMap<String, Vec<(usize, String, String)>>) -> Result<()> {
        for (x, parts) in sparse {
            if !matches!(self.merge, Merge::Cat | Merge::Linear) {
                return Err(Error::Invalid(format!(
                    "sparse diff on {x}: only cat and linear merges keep sparse diffs exact"
                )));
            }
            let (mut idx, mut vals) = (Vec::new(), Vec::new());
            for (di, i, v) in parts {
                idx.extend(to_i64(self.deltas[*di].raw(i)?));
                vals.extend(
                    self.deltas[*di]
                        .f32(v)?
                        .iter()
                        .map(|x| x * self.weights[*di]),
                );
            }
            let idx_bytes: Vec<u8> = idx.iter().flat_map(|i| i.to_le_bytes()).collect();
            self.tensors.push((
                format!("{x}.diff_indices"),
                vec![idx.len() as u64],
                idx_bytes,
                "I64",
            ));
            self.tensors.push((
                format!("{x}.diff_values"),
                vec![vals.len() as u64],
                f32_bytes(&vals),
                "F32",
            ));
        }

        Ok(())
    }

    /// IA3: weighted sum of the vectors (PEFT's add_weighted_adapter). Returns the IA3
    /// config to record.
    fn ia3(&mut self, ia3: &BTreeMap<String, Vec<(usize, String)>>) -> Result<Option<Ia3Config>> {
        let mut config = None;
        for (m, parts) in ia3 {
            if !matches!(self.merge, Merge::Cat | Merge::Linear) {
                return Err(Error::Invalid(format!(
                    "IA3 vector {m}: only cat and linear merges are defined for IA3"
                )));
            }
            let mut dense = Vec::new();
            for (di, name) in parts {
                dense.push((self.weights[*di], self.deltas[*di].f32(name)?));
            }
            let shape = self.deltas[parts[0].0].shape(&parts[0].1)?;
            self.tensors.push((
                format!("{m}.ia3_l"),
                shape,
                f32_bytes(&merge_dense(dense, Merge::Linear, 1.0, 0)),
                "F32",
            ));
            config = self.deltas[parts[0].0].manifest.config.ia3.clone();
        }

        Ok(config)
    }

    /// Carried tensors: replacements and new tensors from exactly one input.
    fn carried(&mut self, carried: &BTreeMap<String, (usize, String)>) -> Result<()> {
        for (name, (di, input)) in carried {
            let d = &self.deltas[*di];
            let w = self.weights[*di];
            if (w - 1.0).abs() > f32::EPSILON {
                return Err(Error::Invalid(format!(
                    "{}: {name} is a whole tensor; it cannot be weighted by {w} without the base",
                    d.label
                )));
            }
            self.tensors.push((
                name.clone(),
                d.shape(input)?,
                f32_bytes(&d.f32(input)?),
                "F32",
            ));
        }

        Ok(())
    }

    /// Run-time modules, namespaced by input position.
    fn runtime(&mut self, runtime: &[(usize, String)]) -> Result<()> {
        for (di, name) in runtime {
            let (kind, rest) = name.split_once('.').unwrap_or((name.as_str(), ""));
            self.tensors.push((
                format!("{kind}.{di}.{rest}"),
                self.deltas[*di].shape(name)?,
                f32_bytes(&self.deltas[*di].f32(name)?),
                "F32",
            ));
        }
        Ok(())
    }
}

/// The composed delta's `method`: `lora` when only LoRA came out, the inputs' one method
/// when they share it and nothing runs at run time, else `composite`.
fn composed_method(deltas: &[LoadedDelta], ranks: &BTreeMap<String, u64>, t: &Targets) -> String {
    let methods: std::collections::BTreeSet<&str> =
        deltas.iter().map(|d| d.manifest.method.as_str()).collect();
    let only_lora = !ranks.is_empty()
        && t.diff.is_empty()
        && t.sparse.is_empty()
        && t.ia3.is_empty()
        && t.runtime.is_empty();
    match methods.iter().next() {
        _ if only_lora => "lora".to_owned(),
        Some(m) if methods.len() == 1 && t.runtime.is_empty() => (*m).to_owned(),
        _ => "composite".to_owned(),
    }
}

/// The LoRA config of the composed delta: every module's scale is 1 (alpha equals its
/// rank), the largest rank as `r` and the others in `rank_pattern`. `None` when no
/// LoRA was composed.
fn lora_config(
    ranks: &BTreeMap<String, u64>,
    fan_in_fan_out: bool,
    lora_bias: bool,
) -> Option<LoraConfig> {
    if ranks.is_empty() {
        return None;
    }
    let r = ranks.values().copied().max().unwrap_or(1);
    let mut cfg = LoraConfig {
        r,
        lora_alpha: r as f64,
        use_rslora: false,
        fan_in_fan_out,
        target_modules: ranks
            .keys()
            .filter_map(|m| m.rsplit('.').next())
            .map(str::to_owned)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        bias: "none".into(),
        modules_to_save: Vec::new(),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        lora_bias,
    };
    // Every module's scale is 1: alpha equals its rank.
    for (m, rank) in ranks {
        if *rank != r {
            cfg.rank_pattern.insert(m.clone(), *rank);
            cfg.alpha_pattern.insert(m.clone(), *rank as f64);
        }
    }
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        let mut v = vec![0.1, -3.0, 2.0, 0.5];
        magnitude_prune(&mut v, 0.5);
        assert_eq!(v, [0.0, -3.0, 2.0, 0.0]);
        let mut all = vec![1.0, 2.0];
        magnitude_prune(&mut all, 1.0);
        assert_eq!(all, [1.0, 2.0]);
    }

    #[test]
    fn ties_elects_the_sign_and_averages_agreeing_values() {
        // Column 0: +1, +3, -1 → sum +3 → mean of +1 and +3 = 2.
        let merged = ties_merge(&[vec![1.0, 0.0], vec![3.0, -2.0], vec![-1.0, 1.0]]);
        assert_eq!(merged, [2.0, -2.0]);
    }

    #[test]
    fn dare_is_seeded() {
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let run = |seed| {
            let mut x = v.clone();
            dare(&mut x, 0.5, &mut SplitMix(seed));
            x
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let kept = run(1).iter().filter(|x| **x != 0.0).count();
        assert!((30..70).contains(&kept), "{kept}");
    }
}
