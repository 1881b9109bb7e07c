//! Deltas mounted on a frozen base: what the encoder's injection points consult.
//!
//! Native delta tensor names map one to one onto the fields here (see
//! `delta_proto::manifest`): `.replace`/`.new` → [`Mounts::replace`], `.diff` and sparse
//! `.diff_indices/.diff_values` → [`Mounts::diff`], `.lora_A/.lora_B` → [`Mounts::lora`],
//! `.ia3_l` → [`Mounts::ia3`], and the run-time modules `adapter.*`, `prefix.*`,
//! `prompt.*`. Several deltas mount side by side; additive parts add up, run-time modules
//! stack in mount order.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Tensor};
use delta_proto::manifest::MethodConfig;

use crate::bert::BaseWeights;
use crate::fused;

/// Name of the classification head's weight (`[labels, hidden]`); part of every delta.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// Name of the classification head's bias.
pub const HEAD_BIAS: &str = "classifier.bias";

/// A LoRA branch: `y += scale · (x Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f64,
}

/// A bottleneck adapter: `x + up(relu(down(x)))`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[bottleneck, hidden]`.
    pub down_w: Tensor,
    /// `[bottleneck]`.
    pub down_b: Tensor,
    /// `[hidden, bottleneck]`.
    pub up_w: Tensor,
    /// `[hidden]`.
    pub up_b: Tensor,
    /// Scale of its output (a composed delta's member weight; 1 otherwise).
    pub weight: f64,
    /// Runs on the hook point's input beside the others (a parallel composition) rather
    /// than on the previous adapter's output.
    pub parallel: bool,
}

/// Everything mounted on one base.
#[derive(Debug, Clone)]
pub struct Mounts<'a> {
    base: &'a BaseWeights,
    /// Tensors replaced whole, or added (a head).
    pub replace: HashMap<String, Tensor>,
    /// Differences added to base tensors.
    pub diff: HashMap<String, Vec<Tensor>>,
    /// LoRA branches by module.
    pub lora: HashMap<String, Vec<Lora>>,
    /// IA3 vectors by module, with whether they scale the input side.
    pub ia3: HashMap<String, Vec<(Tensor, bool)>>,
    /// Adapters by hook point (`encoder.layer.N.attention.output`, `encoder.layer.N.output`).
    pub adapters: HashMap<String, Vec<Adapter>>,
    /// Key/value prefixes by layer, each `[n, hidden]`.
    pub prefix: BTreeMap<usize, Vec<(Tensor, Tensor)>>,
    /// Soft prompt tokens, each `[n, hidden]`.
    pub prompt: Vec<Tensor>,
    /// What the classification head reads (the last mounted head's choice).
    pub pooling: crate::bert::Pooling,
    /// Dropout, while training only (`None`: off, as at evaluation).
    pub dropout: Option<Dropout>,
}

/// Training-time dropout with its own seeded generator, so a seed still fixes a run
/// (candle's CPU generator cannot be seeded). Masks are drawn in call order, which the
/// forward pass fixes.
#[derive(Debug, Clone)]
pub struct Dropout {
    hidden: f32,
    attention: f32,
    classifier: f32,
    rng: std::sync::Arc<std::sync::Mutex<crate::rng::Rng>>,
}

impl Dropout {
    /// Probabilities from the base's config, all replaced by `overall` when given.
    pub fn new(cfg: &crate::bert::BertConfig, overall: Option<f64>, seed: u64) -> Self {
        let hidden = overall.unwrap_or(cfg.hidden_dropout_prob);
        Self {
            hidden: hidden as f32,
            attention: overall.unwrap_or(cfg.attention_probs_dropout_prob) as f32,
            classifier: overall.unwrap_or(cfg.classifier_dropout.unwrap_or(hidden)) as f32,
            rng: std::sync::Arc::new(std::sync::Mutex::new(crate::rng::Rng::new(
                seed ^ 0x000D_4090_u64,
            ))),
        }
    }

    /// Whether any probability is non-zero.
    pub fn active(&self) -> bool {
        self.hidden > 0.0 || self.attention > 0.0 || self.classifier > 0.0
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    fn apply(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.draw(x.elem_count(), p);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }

    /// The next `n` factors of [`Dropout::apply`] at `p > 0`, in element order: 0 with
    /// probability `p`, else `1 / (1 - p)`.
    fn draw(&self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        // 16 bits of one draw per element, four elements per draw.
        let threshold = (f64::from(p) * 65536.0) as u64;
        let mut mask = Vec::with_capacity(n);
        {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            while mask.len() < n {
                let r = rng.next_u64();
                for k in 0..4 {
                    if mask.len() == n {
                        break;
                    }
                    let bits = (r >> (16 * k)) & 0xFFFF;
                    mask.push(if bits < threshold { 0.0 } else { keep });
                }
            }
        }
        mask
    }
}

/// Where dropout applies in the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPoint {
    /// Hidden states ([`Mounts::drop_hidden`]).
    Hidden,
    /// Attention probabilities ([`Mounts::drop_attention`]).
    Attention,
}

impl<'a> Mounts<'a> {
    /// Nothing mounted: the base as it is.
    pub fn new(base: &'a BaseWeights) -> Self {
        Self {
            base,
            replace: HashMap::new(),
            diff: HashMap::new(),
            lora: HashMap::new(),
            ia3: HashMap::new(),
            adapters: HashMap::new(),
            prefix: BTreeMap::new(),
            prompt: Vec::new(),
            pooling: base.head_pooling.unwrap_or(crate::bert::Pooling::Mean),
            dropout: None,
        }
    }

    /// Hidden-state dropout (embeddings, attention and feed-forward outputs).
    pub fn drop_hidden(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.apply(x, d.hidden),
            None => Ok(x.clone()),
        }
    }

    /// The factors [`Mounts::drop_hidden`] or [`Mounts::drop_attention`] would multiply
    /// `n` elements by, drawn from the same generator in the same order; `None` where
    /// that dropout is off (nothing drawn).
    pub fn dropout_factors(&self, point: DropPoint, n: usize) -> Option<Vec<f32>> {
        let d = self.dropout.as_ref()?;
        let p = match point {
            DropPoint::Hidden => d.hidden,
            DropPoint::Attention => d.attention,
        };
        (p > 0.0).then(|| d.draw(n, p))
    }

    /// Attention-probability dropout.
    pub fn drop_attention(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.apply(x, d.attention),
            None => Ok(x.clone()),
        }
    }

    /// Dropout before the classifier.
    pub fn drop_classifier(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.apply(x, d.classifier),
            None => Ok(x.clone()),
        }
    }

    /// The base these mounts sit on.
    pub fn base(&self) -> &'a BaseWeights {
        self.base
    }

    /// A tensor by name, with replacements and differences applied.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = match self.replace.get(name) {
            Some(t) => t.clone(),
            None => self
                .base
                .tensors
                .get(name)
                .cloned()
                .with_context(|| format!("no tensor {name} in the base or its deltas"))?,
        };
        match self.diff.get(name) {
            None => Ok(t),
            // Differences are f32; a base weight held in bf16 widens to meet them.
            Some(ds) => ds
                .iter()
                .try_fold(t.to_dtype(DType::F32)?, |acc, d| Ok(acc.add(d)?)),
        }
    }

    /// Whether a base tensor is used as it is (no replacement, no difference).
    pub(crate) fn untouched(&self, name: &str) -> bool {
        !self.replace.contains_key(name) && !self.diff.contains_key(name)
    }

    /// A linear layer `x Wᵀ + b` of `module`, with its LoRA branches and IA3 vectors.
    pub fn linear(&self, module: &str, x: &Tensor) -> Result<Tensor> {
        let wname = format!("{module}.weight");
        let w = self.tensor(&wname)?;
        let dims = x.dims().to_vec();
        let (last, lead) = dims
            .split_last()
            .context("linear input has no dimensions")?;
        let n: usize = lead.iter().product();
        let mut x2 = x.reshape((n, *last))?;
        let ia3 = self.ia3.get(module);
        for (l, input_side) in ia3.into_iter().flatten() {
            if *input_side {
                x2 = x2.broadcast_mul(l)?;
            }
        }
        let b = self.maybe(&format!("{module}.bias"))?;
        let p = self.base.precision();
        let mut y = fused::linear_at(p, &x2, &w, b.as_ref())?;
        for lora in self.lora.get(module).into_iter().flatten() {
            let down = fused::linear_at(p, &x2, &lora.a, None)?;
            let branch = fused::linear_at(p, &down, &lora.b, None)?;
            y = (y + (branch * lora.scale)?)?;
        }
        // Output-side IA3 scales the whole output, bias included, as PEFT's IA3 layer does
        // (`base_layer(x) * ia3_l`) and as `delta apply` merges it (weight rows and bias).
        for (l, input_side) in ia3.into_iter().flatten() {
            if !*input_side {
                y = y.broadcast_mul(l)?;
            }
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(y.dim(1)?);
        Ok(y.reshape(out_dims)?)
    }

    fn maybe(&self, name: &str) -> Result<Option<Tensor>> {
        if self.replace.contains_key(name) || self.base.tensors.contains_key(name) {
            Ok(Some(self.tensor(name)?))
        } else {
            Ok(None)
        }
    }

    /// The adapters at a hook point, applied in mount order.
    pub fn adapt(&self, point: &str, x: &Tensor) -> Result<Tensor> {
        let input = x.clone();
        let mut x = x.clone();
        for a in self.adapters.get(point).into_iter().flatten() {
            let src = if a.parallel { &input } else { &x };
            let h = src.dim(D::Minus1)?;
            let rows = src.elem_count() / h.max(1);
            let p = self.base.precision();
            let down = fused::linear_at(p, &src.reshape((rows, h))?, &a.down_w, Some(&a.down_b))?
                .relu()?;
            let mut up =
                fused::linear_at(p, &down, &a.up_w, Some(&a.up_b))?.reshape(src.shape())?;
            if a.weight != 1.0 {
                up = (up * a.weight)?;
            }
            x = (x + up)?;
        }
        Ok(x)
    }

    /// The key and value prefixes of a layer (all mounted ones, concatenated).
    pub fn prefix(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.prefix.get(&layer) {
            None => Ok(None),
            Some(ps) if ps.is_empty() => Ok(None),
            Some(ps) => {
                let ks: Vec<&Tensor> = ps.iter().map(|(k, _)| k).collect();
                let vs: Vec<&Tensor> = ps.iter().map(|(_, v)| v).collect();
                Ok(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)))
            }
        }
    }

    /// The soft prompt (all mounted ones, concatenated).
    pub fn prompt(&self) -> Result<Option<Tensor>> {
        if self.prompt.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&self.prompt, 0)?))
    }

    /// Mounts a native delta: its manifest's method settings and its tensors by name (any
    /// float dtype). A composed delta (`delta compose`) keeps each member's run-time
    /// modules under `adapter.<i>.`, `prefix.<i>.`, `prompt.<i>.` with the layout and
    /// member weights in `config.composition`: members mount in order, adapters stacked
    /// or side by side (parallel) and scaled by their weight; prefixes and prompts are
    /// concatenated either way.
    pub fn mount(&mut self, config: &MethodConfig, tensors: HashMap<String, Tensor>) -> Result<()> {
        // A delta with a head says what the head reads; deltas recorded before the choice
        // existed all used mean pooling.
        // An imported PEFT SEQ_CLS adapter was trained under Hugging Face's classifier,
        // which reads the pooler.
        if let Some(head) = config.other.get("head") {
            self.pooling = match head.get("pooling").and_then(|p| p.as_str()) {
                Some(p) => crate::bert::Pooling::parse(p)?,
                None => crate::bert::Pooling::Mean,
            };
        } else if config
            .other
            .get("peft")
            .and_then(|p| p.get("adapter_config"))
            .and_then(|c| c.get("task_type"))
            .and_then(|t| t.as_str())
            == Some("SEQ_CLS")
        {
            self.pooling = crate::bert::Pooling::Cls;
        }
        let Some(composition) = config.other.get("composition") else {
            return self.mount_group(config, tensors, 1.0, false);
        };
        let parallel = composition["layout"].as_str() == Some("parallel");
        let weights: Vec<f64> = composition["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|x| x["weight"].as_f64().unwrap_or(1.0))
                    .collect()
            })
            .unwrap_or_default();
        let mut groups: BTreeMap<Option<usize>, HashMap<String, Tensor>> = BTreeMap::new();
        for (name, t) in tensors {
            let member = ["adapter.", "prefix.", "prompt."].iter().find_map(|kind| {
                let rest = name.strip_prefix(kind)?;
                let (i, tail) = rest.split_once('.')?;
                Some((i.parse::<usize>().ok()?, format!("{kind}{tail}")))
            });
            match member {
                Some((i, renamed)) => groups.entry(Some(i)).or_default().insert(renamed, t),
                None => groups.entry(None).or_default().insert(name, t),
            };
        }
        for (member, group) in groups {
            let weight = member.and_then(|i| weights.get(i).copied()).unwrap_or(1.0);
            self.mount_group(config, group, weight, parallel && member.is_some())?;
        }
        Ok(())
    }

    fn mount_group(
        &mut self,
        config: &MethodConfig,
        tensors: HashMap<String, Tensor>,
        weight: f64,
        parallel: bool,
    ) -> Result<()> {
        let device = self.base.device.clone();
        let mut tensors: BTreeMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v = if v.dtype().is_float() {
                    v.to_dtype(candle_core::DType::F32)?
                } else {
                    v
                };
                Ok((k, v.to_device(&device)?))
            })
            .collect::<Result<_>>()?;
        let names: Vec<String> = tensors.keys().cloned().collect();
        let mut take = |name: &str| -> Result<Tensor> {
            tensors
                .remove(name)
                .with_context(|| format!("the delta lacks tensor {name}"))
        };
        let mut adapters: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for name in &names {
            if let Some(module) = name.strip_suffix(".lora_A") {
                let lc = config
                    .lora
                    .as_ref()
                    .context("the delta has LoRA tensors but no LoRA settings")?;
                if lc.fan_in_fan_out {
                    bail!("fan_in_fan_out LoRA does not fit a BERT base");
                }
                let lora = Lora {
                    a: take(name)?,
                    b: take(&format!("{module}.lora_B"))?,
                    scale: lc.scale_for(module),
                };
                self.lora.entry(module.to_owned()).or_default().push(lora);
            } else if name.ends_with(".lora_B") {
                if !names.contains(&format!("{}.lora_A", &name[..name.len() - 7])) {
                    bail!("tensor {name} has no matching lora_A");
                }
            } else if let Some(module) = name.strip_suffix(".lora_bias") {
                let t = take(name)?;
                self.diff
                    .entry(format!("{module}.bias"))
                    .or_default()
                    .push(t);
            } else if let Some(module) = name.strip_suffix(".ia3_l") {
                let input_side = config
                    .ia3
                    .as_ref()
                    .is_some_and(|c| c.is_feedforward(module));
                let t = take(name)?;
                self.ia3
                    .entry(module.to_owned())
                    .or_default()
                    .push((t, input_side));
            } else if let Some(t) = name.strip_suffix(".diff") {
                let d = take(name)?;
                self.diff.entry(t.to_owned()).or_default().push(d);
            } else if let Some(t) = name.strip_suffix(".diff_indices") {
                let indices = take(name)?;
                let values = take(&format!("{t}.diff_values"))?;
                let shape = self.tensor(t)?.dims().to_vec();
                let d = dense_diff(name, t, &indices, &values, &shape)?;
                self.diff.entry(t.to_owned()).or_default().push(d);
            } else if name.ends_with(".diff_values") {
                continue;
            } else if let Some(t) = name
                .strip_suffix(".replace")
                .or_else(|| name.strip_suffix(".new"))
            {
                let v = take(name)?;
                self.replace.insert(t.to_owned(), v);
            } else if let Some(rest) = name.strip_prefix("adapter.") {
                let (point, part) = rest
                    .rsplit_once('.')
                    .and_then(|(p, last)| {
                        let (point, which) = p.rsplit_once('.')?;
                        Some((point.to_owned(), format!("{which}.{last}")))
                    })
                    .with_context(|| {
                        format!(
                            "adapter tensor {name} is not adapter.POINT.(down|up).(weight|bias)"
                        )
                    })?;
                adapters.entry(point).or_default().insert(part, take(name)?);
            } else if let Some(rest) = name.strip_prefix("prefix.layer.") {
                if let Some(layer) = rest.strip_suffix(".key") {
                    let l: usize = layer
                        .parse()
                        .with_context(|| format!("bad prefix tensor {name}"))?;
                    let k = take(name)?;
                    let v = take(&format!("prefix.layer.{l}.value"))?;
                    self.prefix.entry(l).or_default().push((k, v));
                } else if !rest.ends_with(".value") {
                    bail!("prefix tensor {name} is not prefix.layer.N.(key|value)");
                }
            } else if name == "prompt.embeddings" {
                let p = take(name)?;
                self.prompt.push(p);
            } else {
                bail!("tensor {name} has no role this runtime knows");
            }
        }
        for (point, mut parts) in adapters {
            let mut part = |p: &str| {
                parts
                    .remove(p)
                    .with_context(|| format!("adapter at {point} lacks {p}"))
            };
            let a = Adapter {
                down_w: part("down.weight")?,
                down_b: part("down.bias")?,
                up_w: part("up.weight")?,
                up_b: part("up.bias")?,
                weight,
                parallel,
            };
            self.adapters.entry(point).or_default().push(a);
        }
        Ok(())
    }

    /// Every tensor detached from the autograd graph (for evaluation: no graph is kept).
    pub fn detached(&self) -> Self {
        let d = |t: &Tensor| t.detach();
        Self {
            base: self.base,
            replace: self
                .replace
                .iter()
                .map(|(k, v)| (k.clone(), d(v)))
                .collect(),
            diff: self
                .diff
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(d).collect()))
                .collect(),
            lora: self
                .lora
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .iter()
                        .map(|l| Lora {
                            a: d(&l.a),
                            b: d(&l.b),
                            scale: l.scale,
                        })
                        .collect();
                    (k.clone(), v)
                })
                .collect(),
            ia3: self
                .ia3
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|(t, s)| (d(t), *s)).collect()))
                .collect(),
            adapters: self
                .adapters
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .iter()
                        .map(|a| Adapter {
                            down_w: d(&a.down_w),
                            down_b: d(&a.down_b),
                            up_w: d(&a.up_w),
                            up_b: d(&a.up_b),
                            weight: a.weight,
                            parallel: a.parallel,
                        })
                        .collect();
                    (k.clone(), v)
                })
                .collect(),
            prefix: self
                .prefix
                .iter()
                .map(|(k, v)| (*k, v.iter().map(|(a, b)| (d(a), d(b))).collect()))
                .collect(),
            prompt: self.prompt.iter().map(d).collect(),
            pooling: self.pooling,
            // Evaluation never drops anything.
            dropout: None,
        }
    }
}

/// Sparse diff `name` of base tensor `target` (`indices` into the flattened tensor,
/// `values` added there) as a dense f32 tensor of `shape` on the values' device; repeated
/// indices add up.
fn dense_diff(
    name: &str,
    target: &str,
    indices: &Tensor,
    values: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    let idx = indices
        .to_dtype(candle_core::DType::I64)?
        .to_vec1::<i64>()?;
    let vals = values.to_vec1::<f32>()?;
    let n: usize = shape.iter().product();
    let mut dense = vec![0f32; n];
    for (i, v) in idx.iter().zip(vals) {
        let i = usize::try_from(*i)
            .ok()
            .filter(|i| *i < n)
            .with_context(|| format!("{name}: index {i} is outside {target}"))?;
        dense[i] += v;
    }
    Ok(Tensor::from_vec(dense, shape, values.device())?)
}

impl crate::bert::Inject for Mounts<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        Mounts::tensor(self, name)
    }

    fn linear(&self, module: &str, x: &Tensor) -> Result<Tensor> {
        Mounts::linear(self, module, x)
    }

    fn adapt(&self, point: &str, x: &Tensor) -> Result<Tensor> {
        Mounts::adapt(self, point, x)
    }

    fn precision(&self) -> fused::Precision {
        self.base.precision()
    }

    fn prefix_rows(&self, layer: usize, rows: usize) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some((k, v)) = self.prefix(layer)? else {
            return Ok(None);
        };
        let (n, h) = k.dims2()?;
        let ones = Tensor::ones((rows, n), candle_core::DType::F32, k.device())?;
        Ok(Some((
            k.unsqueeze(0)?.broadcast_as((rows, n, h))?,
            v.unsqueeze(0)?.broadcast_as((rows, n, h))?,
            ones,
        )))
    }

    fn prompt_rows(&self, rows: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(p) = self.prompt()? else {
            return Ok(None);
        };
        let (n, h) = p.dims2()?;
        let ones = Tensor::ones((rows, n), candle_core::DType::F32, p.device())?;
        Ok(Some((p.unsqueeze(0)?.broadcast_as((rows, n, h))?, ones)))
    }

    fn drop_hidden(&self, x: &Tensor) -> Result<Tensor> {
        Mounts::drop_hidden(self, x)
    }

    fn drop_attention(&self, x: &Tensor) -> Result<Tensor> {
        Mounts::drop_attention(self, x)
    }
}

/// Encoder, pooling (as the mounts' head says) and the classification head: logits
/// `[batch, labels]`.
pub fn classify(
    cfg: &crate::bert::BertConfig,
    m: &Mounts<'_>,
    batch: &crate::bert::Batch,
) -> Result<Tensor> {
    let (h, mask) = crate::bert::encode(cfg, m, batch)?;
    head(m, &h, &mask, 0)
}

/// Pooling of the last hidden states (as the mounts' head says; the pooler reads
/// position `first`) and the classification head: logits `[batch, labels]`.
pub fn head(m: &Mounts<'_>, hidden: &Tensor, mask: &Tensor, first: usize) -> Result<Tensor> {
    let pooled = match m.pooling {
        crate::bert::Pooling::Mean => crate::bert::mean_pool(hidden, mask)?,
        crate::bert::Pooling::Cls => {
            let first = hidden.narrow(1, first, 1)?.squeeze(1)?;
            let w = m.tensor(crate::bert::POOLER_WEIGHT)?;
            let b = m.tensor(crate::bert::POOLER_BIAS)?;
            fused::linear(&first, &w, Some(&b))?.tanh()?
        }
    };
    let pooled = m.drop_classifier(&pooled)?;
    let w = m.tensor(HEAD_WEIGHT)?;
    let b = m.tensor(HEAD_BIAS)?;
    fused::linear(&pooled, &w, Some(&b))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::dense_diff;

    #[test]
    fn a_sparse_diff_densifies_adding_repeated_indices_and_refuses_any_outside() {
        let values = Tensor::new(&[1f32, 2.0, 0.5], &Device::Cpu).unwrap();
        let indices = Tensor::new(&[5i64, 0, 5], &Device::Cpu).unwrap();
        let d = dense_diff("w.diff_indices", "w", &indices, &values, &[2, 3]).unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            vec![vec![2.0, 0.0, 0.0], vec![0.0, 0.0, 1.5]]
        );
        for bad in [6i64, -1] {
            let indices = Tensor::new(&[0i64, bad, 1], &Device::Cpu).unwrap();
            let e = dense_diff("w.diff_indices", "w", &indices, &values, &[2, 3]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("w.diff_indices: index {bad} is outside w")
            );
        }
    }
}
