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

/// The initial values of a [`Trainable`], method by method (see [`Trainable::new`]).
struct Init<'a> {
    spec: &'a TrainSpec,
    base: &'a BaseWeights,
    rng: Rng,
    /// Trainable tensors by native name.
    vars: BTreeMap<String, Tensor>,
    /// Method settings for the manifest's config.
    other: BTreeMap<String, serde_json::Value>,
}

impl Init<'_> {
    fn normal(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.normal() * std).collect();
        Ok(Tensor::from_vec(v, shape, &self.base.device)?)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, DType::F32, &self.base.device)?)
    }

    /// Adds a trainable tensor of normal values (drawn now, in call order).
    fn add_normal(&mut self, name: String, shape: &[usize], std: f32) -> Result<()> {
        let t = self.normal(shape, std)?;
        self.vars.insert(name, t);
        Ok(())
    }

    /// Adds a trainable tensor of zeros.
    fn add_zeros(&mut self, name: String, shape: &[usize]) -> Result<()> {
        let t = self.zeros(shape)?;
        self.vars.insert(name, t);
        Ok(())
    }

    /// A base tensor in f32 (a linear weight held in bf16 widens: trained values are f32).
    fn base_tensor(&self, name: &str) -> Result<Tensor> {
        let t = self
            .base
            .tensors
            .get(name)
            .with_context(|| format!("the base has no tensor {name}"))?;
        Ok(t.to_dtype(candle_core::DType::F32)?)
    }

    /// Methods that train base tensors whole (full, BitFit, last layer, selective): a
    /// `.replace` copy of each.
    fn replaced(&mut self) -> Result<()> {
        let (spec, base) = (self.spec, self.base);
        let cfg = &base.config;
        let layers = cfg.num_hidden_layers;
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
            self.other
                .insert("last_layer".into(), json!({ "layer": layers - 1 }));
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
                self.rng.shuffle(&mut pool);
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
            self.other
                .insert("selective".into(), json!({ "modules": chosen }));
        }
        replaced.sort();
        replaced.dedup();
        for name in &replaced {
            self.vars
                .insert(format!("{name}.replace"), self.base_tensor(name)?.copy()?);
        }
        Ok(())
    }

    /// LoRA: `A` Kaiming-like, `B` zero, on every target module.
    fn lora(&mut self) -> Result<()> {
        let (spec, cfg) = (self.spec, &self.base.config);
        let targets = select(&cfg.linear_modules(), &spec.targets)?;
        for m in &targets {
            let w = self.base_tensor(&format!("{m}.weight"))?;
            let (out, inp) = w.dims2()?;
            let a = self.normal(&[spec.rank, inp], 1.0 / (inp as f32).sqrt())?;
            self.vars.insert(format!("{m}.lora_A"), a);
            self.add_zeros(format!("{m}.lora_B"), &[out, spec.rank])?;
        }
        Ok(())
    }

    /// Diff pruning: a zero difference on every target module's weight.
    fn diff(&mut self) -> Result<()> {
        let (spec, cfg) = (self.spec, &self.base.config);
        let targets = select(&cfg.linear_modules(), &spec.targets)?;
        for m in &targets {
            let name = format!("{m}.weight");
            let shape = self.base_tensor(&name)?.dims().to_vec();
            self.add_zeros(format!("{name}.diff"), &shape)?;
        }
        self.other.insert(
            "diff".into(),
            json!({ "targets": targets, "sparsity": spec.sparsity, "l1": spec.l1 }),
        );
        Ok(())
    }

    /// Adapters after each layer's feed-forward (and attention, Houlsby) output.
    fn adapters(&mut self) -> Result<()> {
        let spec = self.spec;
        let (h, layers) = (
            self.base.config.hidden_size,
            self.base.config.num_hidden_layers,
        );
        let b = spec.bottleneck;
        for l in 0..layers {
            let mut points = vec![format!("encoder.layer.{l}.output")];
            if spec.adapter_kind == "houlsby" {
                points.push(format!("encoder.layer.{l}.attention.output"));
            }
            for p in points {
                self.add_normal(format!("adapter.{p}.down.weight"), &[b, h], 0.02)?;
                self.add_zeros(format!("adapter.{p}.down.bias"), &[b])?;
                // Zero up-projection: the adapter starts as the identity.
                self.add_zeros(format!("adapter.{p}.up.weight"), &[h, b])?;
                self.add_zeros(format!("adapter.{p}.up.bias"), &[h])?;
            }
        }
        self.other.insert(
            "adapter".into(),
            json!({ "kind": spec.adapter_kind, "bottleneck": b, "activation": "relu" }),
        );
        Ok(())
    }

    /// Prefixes: per-layer keys and values, or the MLP that makes them.
    fn prefix(&mut self) -> Result<()> {
        let spec = self.spec;
        let (h, layers) = (
            self.base.config.hidden_size,
            self.base.config.num_hidden_layers,
        );
        let n = spec.prefix_len;
        match spec.prefix_mlp {
            None => {
                for l in 0..layers {
                    self.add_normal(format!("prefix.layer.{l}.key"), &[n, h], 0.02)?;
                    self.add_normal(format!("prefix.layer.{l}.value"), &[n, h], 0.02)?;
                }
            }
            Some(mid) => {
                let p = PREFIX_MLP;
                self.add_normal(format!("{p}embedding"), &[n, h], 0.02)?;
                let s0 = 1.0 / (h as f32).sqrt();
                self.add_normal(format!("{p}0.weight"), &[mid, h], s0)?;
                self.add_zeros(format!("{p}0.bias"), &[mid])?;
                self.add_normal(format!("{p}2.weight"), &[2 * layers * h, mid], 0.02)?;
                self.add_zeros(format!("{p}2.bias"), &[2 * layers * h])?;
            }
        }
        self.other.insert(
            "prefix".into(),
            json!({ "length": n, "reparameterization": spec.prefix_mlp.map(|m| json!({"mlp_hidden": m, "folded": true})) }),
        );
        Ok(())
    }

    /// A soft prompt.
    fn prompt(&mut self) -> Result<()> {
        let spec = self.spec;
        // Initialised from the embeddings of random vocabulary tokens (Lester et al.).
        let word = self.base_tensor("embeddings.word_embeddings.weight")?;
        let vocab = word.dim(0)?;
        let ids: Vec<u32> = (0..spec.prompt_len)
            .map(|_| self.rng.below(vocab) as u32)
            .collect();
        let ids = Tensor::new(ids.as_slice(), &self.base.device)?;
        self.vars.insert(
            "prompt.embeddings".into(),
            word.index_select(&ids, 0)?.copy()?,
        );
        self.other
            .insert("prompt".into(), json!({ "length": spec.prompt_len }));
        Ok(())
    }

    /// The classification head, part of every delta, and what it reads.
    fn head(&mut self, labels: &[String]) -> Result<()> {
        let (spec, base) = (self.spec, self.base);
        let h = base.config.hidden_size;
        self.add_normal(format!("{HEAD_WEIGHT}.new"), &[labels.len(), h], 0.02)?;
        self.add_zeros(format!("{HEAD_BIAS}.new"), &[labels.len()])?;
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
        let head = json!({
            "task": "sequence-classification",
            "labels": labels,
            "pooling": pooling.as_str(),
        });
        self.other.insert("head".into(), head);
        Ok(())
    }
}

const PREFIX_MLP: &str = "prefix_mlp.";

impl Trainable {
    /// Builds the trainable tensors (seeded), with a fresh head over `labels`. Each
    /// method's tensors come from its own step of [`Init`], in a fixed order: the seeded
    /// generator is drawn in that order, so a spec and a seed give the same values.
    pub fn new(spec: &TrainSpec, base: &BaseWeights, labels: &[String]) -> Result<Self> {
        spec.check().map_err(anyhow::Error::msg)?;
        if labels.len() < 2 {
            bail!(
                "training data has {} label(s); at least 2 are needed",
                labels.len()
            );
        }
        let (h, layers) = (base.config.hidden_size, base.config.num_hidden_layers);
        let mut init = Init {
            spec,
            base,
            rng: Rng::new(spec.seed),
            vars: BTreeMap::new(),
            other: BTreeMap::new(),
        };
        init.replaced()?;
        if spec.has(Method::Lora) {
            init.lora()?;
        }
        if spec.has(Method::Diff) {
            init.diff()?;
        }
        if spec.has(Method::Adapter) {
            init.adapters()?;
        }
        if spec.has(Method::Prefix) {
            init.prefix()?;
        }
        if spec.has(Method::Prompt) {
            init.prompt()?;
        }
        init.head(labels)?;
        let Init {
            vars, mut other, ..
        } = init;
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
