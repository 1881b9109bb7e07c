//! Delta methods as trainable tensors named like the native delta format.
//!
//! Every trainable tensor is a candle `Var` whose name is the native delta tensor it will
//! be saved as (`M.lora_A`, `T.replace`, `adapter.P.down.weight`, `prefix.layer.N.key`,
//! `prompt.embeddings`, `classifier.weight.new`, …). Training mounts them on the frozen
//! base through the same [`Mounts::mount`] that loads a saved delta, so what is trained is
//! exactly what is saved and re-run. Two kinds are transformed when saved: dense
//! differences are sparsified (diff pruning) and the prefix MLP is folded into plain
//! prefixes.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use delta_client::jobs::{Method, TrainSpec};
use delta_proto::manifest::{LoraConfig, MethodConfig};
use serde_json::json;

use crate::bert::BaseWeights;
use crate::mounts::{HEAD_BIAS, HEAD_WEIGHT, Mounts};
use crate::rng::Rng;

/// Selects names by patterns: equal, a `.`-suffix (`query` selects
/// `encoder.layer.0.attention.self.query`), or `re:REGEX` matching the whole name. A
/// pattern that selects nothing is an error naming it, with an example of a valid name.
pub fn select(candidates: &[String], patterns: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in patterns {
        let hits: Vec<&String> = match p.strip_prefix("re:") {
            Some(re) => {
                let re = regex::Regex::new(&format!("^(?:{re})$"))
                    .with_context(|| format!("pattern {p:?} is not a valid regex"))?;
                candidates.iter().filter(|c| re.is_match(c)).collect()
            }
            None => candidates
                .iter()
                .filter(|c| delta_proto::manifest::module_matches(p, c))
                .collect(),
        };
        if hits.is_empty() {
            bail!(
                "module pattern {p:?} matches no module of the base (modules look like {})",
                candidates.first().map(String::as_str).unwrap_or("?")
            );
        }
        out.extend(hits.into_iter().cloned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The modules of a base (tensor names without `.weight`/`.bias`), sorted.
pub fn modules(base: &BaseWeights) -> Vec<String> {
    let mut m: Vec<String> = base
        .config
        .tensor_shapes()
        .into_iter()
        .filter_map(|(n, _)| n.rsplit_once('.').map(|(m, _)| m.to_owned()))
        .collect();
    m.sort();
    m.dedup();
    m
}

/// Trainable delta tensors for one spec on one base.
#[derive(Debug)]
pub struct Trainable {
    /// Trainable tensors, sorted by name.
    pub vars: Vec<(String, Var)>,
    /// Method settings (LoRA scale etc.), as saved in the manifest.
    pub config: MethodConfig,
    /// The spec it was built from.
    pub spec: TrainSpec,
    layers: usize,
    hidden: usize,
}

const PREFIX_MLP: &str = "prefix_mlp.";

impl Trainable {
    /// Builds the trainable tensors (seeded), with a fresh head over `labels`.
    pub fn new(spec: &TrainSpec, base: &BaseWeights, labels: &[String]) -> Result<Self> {
        spec.check().map_err(anyhow::Error::msg)?;
        if labels.len() < 2 {
            bail!(
                "training data has {} label(s); at least 2 are needed",
                labels.len()
            );
        }
        let cfg = &base.config;
        let (h, layers) = (cfg.hidden_size, cfg.num_hidden_layers);
        let device = base.device.clone();
        let mut rng = Rng::new(spec.seed);
        let mut vars: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut other: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        let normal = |rng: &mut Rng, shape: &[usize], std: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
            Ok(Tensor::from_vec(v, shape, &device)?)
        };
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &device);
        let base_tensor = |name: &str| -> Result<Tensor> {
            base.tensors
                .get(name)
                .cloned()
                .with_context(|| format!("the base has no tensor {name}"))
        };
        // Methods that replace base tensors whole.
        let mut replaced: Vec<String> = Vec::new();
        let tensor_names: Vec<String> = cfg.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        if spec.has(Method::Full) {
            replaced.extend(tensor_names.iter().cloned());
        }
        if spec.has(Method::Bitfit) {
            replaced.extend(
                tensor_names
                    .iter()
                    .filter(|n| n.ends_with(".bias"))
                    .cloned(),
            );
        }
        if spec.has(Method::LastLayer) {
            let p = format!("encoder.layer.{}.", layers - 1);
            replaced.extend(tensor_names.iter().filter(|n| n.starts_with(&p)).cloned());
            other.insert("last_layer".into(), json!({ "layer": layers - 1 }));
        }
        if spec.has(Method::Selective) {
            let all = modules(base);
            let mut chosen = if spec.modules.is_empty() {
                Vec::new()
            } else {
                select(&all, &spec.modules)?
            };
            if let Some(k) = spec.random_modules {
                let mut pool: Vec<String> = all
                    .iter()
                    .filter(|m| !chosen.contains(m))
                    .cloned()
                    .collect();
                rng.shuffle(&mut pool);
                chosen.extend(pool.into_iter().take(k));
                chosen.sort();
            }
            for m in &chosen {
                replaced.extend(
                    tensor_names
                        .iter()
                        .filter(|n| n.rsplit_once('.').is_some_and(|(p, _)| p == m))
                        .cloned(),
                );
            }
            other.insert("selective".into(), json!({ "modules": chosen }));
        }
        replaced.sort();
        replaced.dedup();
        for name in &replaced {
            vars.insert(format!("{name}.replace"), base_tensor(name)?.copy()?);
        }
        if spec.has(Method::Lora) {
            let targets = select(&cfg.linear_modules(), &spec.targets)?;
            for m in &targets {
                let w = base_tensor(&format!("{m}.weight"))?;
                let (out, inp) = w.dims2()?;
                let a = normal(&mut rng, &[spec.rank, inp], 1.0 / (inp as f32).sqrt())?;
                vars.insert(format!("{m}.lora_A"), a);
                vars.insert(format!("{m}.lora_B"), zeros(&[out, spec.rank])?);
            }
        }
        let lora = spec.has(Method::Lora).then(|| LoraConfig {
            r: spec.rank as u64,
            lora_alpha: spec.lora_alpha(),
            use_rslora: spec.rslora,
            fan_in_fan_out: false,
            target_modules: spec.targets.clone(),
            bias: "none".into(),
            modules_to_save: vec!["classifier".into()],
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            lora_bias: false,
        });
        if spec.has(Method::Diff) {
            let targets = select(&cfg.linear_modules(), &spec.targets)?;
            for m in &targets {
                let name = format!("{m}.weight");
                let shape = base_tensor(&name)?.dims().to_vec();
                vars.insert(format!("{name}.diff"), zeros(&shape)?);
            }
            other.insert(
                "diff".into(),
                json!({ "targets": targets, "sparsity": spec.sparsity, "l1": spec.l1 }),
            );
        }
        if spec.has(Method::Adapter) {
            let b = spec.bottleneck;
            for l in 0..layers {
                let mut points = vec![format!("encoder.layer.{l}.output")];
                if spec.adapter_kind == "houlsby" {
                    points.push(format!("encoder.layer.{l}.attention.output"));
                }
                for p in points {
                    vars.insert(
                        format!("adapter.{p}.down.weight"),
                        normal(&mut rng, &[b, h], 0.02)?,
                    );
                    vars.insert(format!("adapter.{p}.down.bias"), zeros(&[b])?);
                    // Zero up-projection: the adapter starts as the identity.
                    vars.insert(format!("adapter.{p}.up.weight"), zeros(&[h, b])?);
                    vars.insert(format!("adapter.{p}.up.bias"), zeros(&[h])?);
                }
            }
            other.insert(
                "adapter".into(),
                json!({ "kind": spec.adapter_kind, "bottleneck": b, "activation": "relu" }),
            );
        }
        if spec.has(Method::Prefix) {
            let n = spec.prefix_len;
            match spec.prefix_mlp {
                None => {
                    for l in 0..layers {
                        vars.insert(
                            format!("prefix.layer.{l}.key"),
                            normal(&mut rng, &[n, h], 0.02)?,
                        );
                        vars.insert(
                            format!("prefix.layer.{l}.value"),
                            normal(&mut rng, &[n, h], 0.02)?,
                        );
                    }
                }
                Some(mid) => {
                    let p = PREFIX_MLP;
                    vars.insert(format!("{p}embedding"), normal(&mut rng, &[n, h], 0.02)?);
                    let s0 = 1.0 / (h as f32).sqrt();
                    vars.insert(format!("{p}0.weight"), normal(&mut rng, &[mid, h], s0)?);
                    vars.insert(format!("{p}0.bias"), zeros(&[mid])?);
                    vars.insert(
                        format!("{p}2.weight"),
                        normal(&mut rng, &[2 * layers * h, mid], 0.02)?,
                    );
                    vars.insert(format!("{p}2.bias"), zeros(&[2 * layers * h])?);
                }
            }
            other.insert(
                "prefix".into(),
                json!({ "length": n, "reparameterization": spec.prefix_mlp.map(|m| json!({"mlp_hidden": m, "folded": true})) }),
            );
        }
        if spec.has(Method::Prompt) {
            // Initialised from the embeddings of random vocabulary tokens (Lester et al.).
            let word = base_tensor("embeddings.word_embeddings.weight")?;
            let vocab = word.dim(0)?;
            let ids: Vec<u32> = (0..spec.prompt_len)
                .map(|_| rng.below(vocab) as u32)
                .collect();
            let ids = Tensor::new(ids.as_slice(), &device)?;
            vars.insert(
                "prompt.embeddings".into(),
                word.index_select(&ids, 0)?.copy()?,
            );
            other.insert("prompt".into(), json!({ "length": spec.prompt_len }));
        }
        // The classification head is part of every delta.
        vars.insert(
            format!("{HEAD_WEIGHT}.new"),
            normal(&mut rng, &[labels.len(), h], 0.02)?,
        );
        vars.insert(format!("{HEAD_BIAS}.new"), zeros(&[labels.len()])?);
        // The head reads what Hugging Face's classifier reads when the base has a pooler,
        // unless the spec says otherwise.
        let pooling = match spec.pooling.as_deref() {
            Some(p) => crate::bert::Pooling::parse(p)?,
            None if base.tensors.contains_key(crate::bert::POOLER_WEIGHT) => {
                crate::bert::Pooling::Cls
            }
            None => crate::bert::Pooling::Mean,
        };
        if pooling == crate::bert::Pooling::Cls
            && !base.tensors.contains_key(crate::bert::POOLER_WEIGHT)
        {
            bail!(
                "--pooling cls needs the base's pooler ({}), which this base lacks: use --pooling mean",
                crate::bert::POOLER_WEIGHT
            );
        }
        other.insert(
            "head".into(),
            json!({ "task": "sequence-classification", "labels": labels, "pooling": pooling.as_str() }),
        );
        other.insert("methods".into(), json!(spec.methods));
        let vars = vars
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            config: MethodConfig {
                lora,
                ia3: None,
                other,
            },
            spec: spec.clone(),
            layers,
            hidden: h,
        })
    }

    /// The manifest's `method`: the one method, or `composite`.
    pub fn method(&self) -> String {
        match self.spec.methods.as_slice() {
            [one] => one.to_string(),
            _ => "composite".into(),
        }
    }

    /// Number of trainable values.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The tensors to mount, by native name (the prefix MLP evaluated into prefixes).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let mut mlp: HashMap<&str, &Tensor> = HashMap::new();
        for (name, var) in &self.vars {
            match name.strip_prefix(PREFIX_MLP) {
                Some(rest) => {
                    mlp.insert(rest, var.as_tensor());
                }
                None => {
                    out.insert(name.clone(), var.as_tensor().clone());
                }
            }
        }
        if !mlp.is_empty() {
            let get = |k: &str| mlp.get(k).copied().context("prefix MLP is incomplete");
            let x = get("embedding")?
                .matmul(&get("0.weight")?.t()?)?
                .broadcast_add(get("0.bias")?)?
                .tanh()?;
            let y = x
                .matmul(&get("2.weight")?.t()?)?
                .broadcast_add(get("2.bias")?)?;
            let h = self.hidden;
            for l in 0..self.layers {
                out.insert(format!("prefix.layer.{l}.key"), y.narrow(1, 2 * l * h, h)?);
                out.insert(
                    format!("prefix.layer.{l}.value"),
                    y.narrow(1, (2 * l + 1) * h, h)?,
                );
            }
        }
        Ok(out)
    }

    /// Mounts the trainable tensors on top of `on` (the base, or the base with frozen
    /// parent deltas).
    pub fn mount<'a>(&self, on: &Mounts<'a>) -> Result<Mounts<'a>> {
        let mut m = on.clone();
        m.mount(&self.config, self.tensors()?)?;
        Ok(m)
    }

    /// L1 norm of the dense differences (diff pruning's penalty), if any.
    pub fn l1(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for (name, v) in &self.vars {
            if name.ends_with(".diff") {
                let s = v.as_tensor().abs()?.sum_all()?;
                total = Some(match total {
                    None => s,
                    Some(t) => (t + s)?,
                });
            }
        }
        Ok(total)
    }

    /// Current values (for keeping the best checkpoint).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().detach().copy()?))
            .collect()
    }

    /// Restores values taken by [`Trainable::snapshot`].
    pub fn restore(&self, values: &[Tensor]) -> Result<()> {
        for ((_, v), t) in self.vars.iter().zip(values) {
            v.set(t)?;
        }
        Ok(())
    }

    /// The tensors to save, by native name, and facts about the saving (diff pruning's
    /// achieved sparsity). Dense differences keep their largest `1 - sparsity` share of
    /// entries by magnitude, as `.diff_indices`/`.diff_values`.
    pub fn export(&self) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, f64>)> {
        let mut out = BTreeMap::new();
        let mut facts = BTreeMap::new();
        let (mut kept, mut total) = (0usize, 0usize);
        for (name, t) in self.tensors()? {
            let t = t.detach();
            match name.strip_suffix(".diff") {
                Some(target) => {
                    let values = t.flatten_all()?.to_vec1::<f32>()?;
                    let keep =
                        ((values.len() as f64) * (1.0 - self.spec.sparsity)).floor() as usize;
                    let mut order: Vec<usize> = (0..values.len()).collect();
                    order.sort_by(|&a, &b| {
                        values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b))
                    });
                    let mut idx: Vec<i64> = order
                        .into_iter()
                        .take(keep)
                        .filter(|&i| values[i] != 0.0)
                        .map(|i| i as i64)
                        .collect();
                    idx.sort_unstable();
                    let vals: Vec<f32> = idx.iter().map(|&i| values[i as usize]).collect();
                    kept += idx.len();
                    total += values.len();
                    let device = Device::Cpu;
                    let n = idx.len();
                    out.insert(
                        format!("{target}.diff_indices"),
                        Tensor::from_vec(idx, n, &device)?,
                    );
                    out.insert(
                        format!("{target}.diff_values"),
                        Tensor::from_vec(vals, n, &device)?,
                    );
                }
                None => {
                    out.insert(name, t.to_device(&Device::Cpu)?);
                }
            }
        }
        if total > 0 {
            facts.insert(
                "diff_achieved_sparsity".into(),
                1.0 - kept as f64 / total as f64,
            );
            facts.insert("diff_nonzero".into(), kept as f64);
        }
        Ok((out, facts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn patterns_match_suffixes_and_regexes() {
        let c = names(&[
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.value",
            "encoder.layer.1.attention.self.query",
            "encoder.layer.1.output.dense",
        ]);
        assert_eq!(select(&c, &names(&["query"])).unwrap().len(), 2);
        assert_eq!(
            select(&c, &names(&["re:encoder\\.layer\\.1\\..*"]))
                .unwrap()
                .len(),
            2
        );
        // Suffixes match whole components only.
        let err = select(&c, &names(&["uery"])).unwrap_err().to_string();
        assert!(err.contains("\"uery\" matches no module"), "{err}");
        assert!(select(&c, &names(&["re:("])).is_err());
    }
}
