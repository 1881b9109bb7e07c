//! A BERT-family encoder written against tensor *names*, with injection points for deltas.
//!
//! The backbone never knows which delta methods exist: every weight is looked up by its
//! Hugging Face name through [`Inject::tensor`] (the `mounts` module's `Mounts` applies
//! replacements and differences there), every linear layer goes through
//! [`Inject::linear`] (which adds LoRA branches), and three hooks take run-time modules:
//! adapters after a sub-layer's output projection, per-layer key/value prefixes, and soft
//! prompt tokens. A new method plugs in by filling `Mounts`; a decoder family would reuse
//! it with its own forward. The classification head over the encoder lives with `Mounts`
//! (`mounts::classify`), so this module depends on nothing above it.
//!
//! candle traps avoided here (see `CANDLE-NOTES.md`): layer norm, the attention softmax
//! and GELU come from `fused`, whose ops have a backward pass (candle's fused layer norm
//! and `softmax_last_dim` have none), and BERT's `gelu` is the erf form.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::fused;

/// What the encoder's injection points consult: one delta mounted on the base (`Mounts`)
/// or a batch whose rows each carry their own delta (`MixedMounts`). Tensors given per row have a leading row dimension
/// (`[rows, 1, hidden]` for a layer norm's weight) and broadcast against `[rows, len,
/// hidden]`.
pub trait Inject {
    /// A weight by name (embeddings, layer norms).
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// A linear layer of `module` on `x` (`[rows, len, in]`), with its delta branches.
    fn linear(&self, module: &str, x: &Tensor) -> Result<Tensor>;
    /// The adapters at a hook point.
    fn adapt(&self, point: &str, x: &Tensor) -> Result<Tensor>;
    /// A layer's key/value prefixes for `rows` rows: `[rows, n, hidden]` twice and the
    /// key mask `[rows, n]` (1 for a prefix position a row has).
    fn prefix_rows(&self, layer: usize, rows: usize) -> Result<Option<(Tensor, Tensor, Tensor)>>;
    /// Soft prompt tokens for `rows` rows, `[rows, n, hidden]`, and their mask `[rows, n]`;
    /// a row with fewer tokens than `n` has them at the end (left padding), so its first
    /// real position is `n - its count`.
    fn prompt_rows(&self, rows: usize) -> Result<Option<(Tensor, Tensor)>>;
    /// Hidden-state dropout (training only).
    fn drop_hidden(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Attention-probability dropout (training only).
    fn drop_attention(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// How the attention products are computed.
    fn precision(&self) -> fused::Precision {
        fused::Precision::F32
    }
}

/// The fields of a Hugging Face BERT `config.json` the encoder uses.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward size.
    pub intermediate_size: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// Segment vocabulary.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation; only `gelu` (erf form) and `gelu_new`/`relu` are supported.
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// `bert` (others of the family, such as `roberta`, differ in position ids).
    #[serde(default = "bert")]
    pub model_type: String,
    /// Dropout on embeddings and sub-layer outputs while training (Hugging Face's default
    /// 0.1).
    #[serde(default = "tenth")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities while training.
    #[serde(default = "tenth")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier (`None`: the hidden dropout), as
    /// `BertForSequenceClassification` has it.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
}

fn tenth() -> f64 {
    0.1
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn bert() -> String {
    "bert".into()
}

impl BertConfig {
    /// Reads `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Self = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a BERT config.json", path.display()))?;
        c.check()?;
        Ok(c)
    }

    /// Refuses configurations the encoder cannot run.
    pub fn check(&self) -> Result<()> {
        if self.model_type != "bert" {
            bail!(
                "model_type {:?} is not supported (only bert)",
                self.model_type
            );
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            bail!("hidden_size and num_attention_heads must be positive");
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            bail!("hidden_act {:?} is not supported", self.hidden_act);
        }
        Ok(())
    }

    /// Every tensor name and shape a BERT checkpoint of this config holds (without pooler).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for (m, o, n) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                out.push((format!("{p}.{m}.weight"), vec![o, n]));
                out.push((format!("{p}.{m}.bias"), vec![o]));
            }
            for m in ["attention.output.LayerNorm", "output.LayerNorm"] {
                out.push((format!("{p}.{m}.weight"), vec![h]));
                out.push((format!("{p}.{m}.bias"), vec![h]));
            }
        }
        out
    }

    /// The linear modules (names without `.weight`), in forward order.
    pub fn linear_modules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in 0..self.num_hidden_layers {
            for m in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ] {
                out.push(format!("encoder.layer.{l}.{m}"));
            }
        }
        out
    }
}

/// Frozen base weights by name, on one device.
#[derive(Debug, Clone)]
pub struct BaseWeights {
    /// The configuration.
    pub config: BertConfig,
    /// Tensors by Hugging Face name: f32, except the encoder's linear weights at
    /// [`fused::Precision::Bf16`] (see [`BaseWeights::set_precision`]).
    pub tensors: HashMap<String, Tensor>,
    /// The device every tensor is on.
    pub device: Device,
    /// What a classification head merged into these weights reads (`delta apply`
    /// records it), if one was.
    pub head_pooling: Option<Pooling>,
    /// How products are computed over these weights (f32 unless set).
    precision: fused::Precision,
}

impl BaseWeights {
    /// Loads `config.json` and `model.safetensors` from a folder. Extra tensors (a pooler,
    /// a classifier of an applied delta) are kept; missing ones are an error naming them.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let raw = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let header = delta_proto::safetensors::parse_header(&raw, raw.len() as u64, 100 << 20)
            .with_context(|| format!("{} is not valid safetensors", path.display()))?;
        let head_pooling = header
            .metadata
            .get(delta_client::apply::HEAD_POOLING)
            .map(|p| Pooling::parse(p))
            .transpose()
            .with_context(|| {
                format!("{}: {}", path.display(), delta_client::apply::HEAD_POOLING)
            })?;
        let loaded = candle_core::safetensors::load_buffer(&raw, device)
            .with_context(|| format!("loading {}", path.display()))?;
        let mut tensors = HashMap::with_capacity(loaded.len());
        for (name, t) in loaded {
            // Strip a `bert.` prefix (checkpoints saved from BertFor* heads).
            let name = name
                .strip_prefix("bert.")
                .map(str::to_owned)
                .unwrap_or(name);
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            tensors.insert(name, t);
        }
        let w = Self {
            config,
            tensors,
            device: device.clone(),
            head_pooling,
            precision: fused::Precision::F32,
        };
        w.check()?;
        Ok(w)
    }

    /// How products are computed over these weights.
    pub fn precision(&self) -> fused::Precision {
        self.precision
    }

    /// Sets how products are computed. At [`fused::Precision::Bf16`] the encoder's linear
    /// weights are held in bf16 from here on: half their memory, and no cast per step (the
    /// products take bf16 operands anyway). A method that trains such a weight whole starts
    /// its f32 master copy from the bf16 value, as training from a bf16 checkpoint does, and
    /// a verification that follows the delta's record rounds the same way. Going back to
    /// f32 would not restore the digits, so it is refused: open the base again.
    pub fn set_precision(&mut self, p: fused::Precision) -> Result<()> {
        match (self.precision, p) {
            (a, b) if a == b => return Ok(()),
            (fused::Precision::Bf16, _) => bail!(
                "this base's linear weights are held in bf16; open it again for {}",
                p.as_str()
            ),
            _ => {}
        }
        for module in self.config.linear_modules() {
            let name = format!("{module}.weight");
            if let Some(t) = self.tensors.get_mut(&name) {
                *t = t.to_dtype(DType::BF16)?;
            }
        }
        self.precision = p;
        Ok(())
    }

    /// Bytes the tensors hold.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Checks every tensor the config needs is present with its shape.
    pub fn check(&self) -> Result<()> {
        for (name, shape) in self.config.tensor_shapes() {
            match self.tensors.get(&name) {
                None => bail!("the base has no tensor {name}"),
                Some(t) if t.dims() != shape.as_slice() => bail!(
                    "base tensor {name} has shape {:?}, the config implies {shape:?}",
                    t.dims()
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A base of random weights for tests (seeded, N(0, 0.02), layer norms at 1/0).
    pub fn random(config: BertConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.tensor_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| rng.normal() * 0.02).collect()
            };
            tensors.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Ok(Self {
            config,
            tensors,
            device: device.clone(),
            head_pooling: None,
            precision: fused::Precision::F32,
        })
    }
}

/// One tokenised batch: `[batch, len]` ids, segment ids and the padding mask (1 = token).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids (u32).
    pub ids: Tensor,
    /// Segment ids (u32).
    pub type_ids: Tensor,
    /// Padding mask (f32, 1 for real tokens).
    pub mask: Tensor,
}

/// Runs the encoder: the last hidden state `[batch, prompt + len, hidden]` and the mask
/// over it (prompt positions are 0 there, so pooling sees only the input's tokens).
pub fn encode(cfg: &BertConfig, m: &impl Inject, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (b, len) = batch.ids.dims2()?;
    if len > cfg.max_position_embeddings {
        bail!(
            "sequence of {len} tokens is longer than the model's {}",
            cfg.max_position_embeddings
        );
    }
    let h = cfg.hidden_size;
    let word = m.tensor("embeddings.word_embeddings.weight")?;
    let pos = m
        .tensor("embeddings.position_embeddings.weight")?
        .narrow(0, 0, len)?;
    let typ = m.tensor("embeddings.token_type_embeddings.weight")?;
    let x = word
        .embedding(&batch.ids.flatten_all()?)?
        .reshape((b, len, h))?
        .broadcast_add(&pos)?
        .add(
            &typ.embedding(&batch.type_ids.flatten_all()?)?
                .reshape((b, len, h))?,
        )?;
    let x = fused::layer_norm(
        &x,
        &m.tensor("embeddings.LayerNorm.weight")?,
        &m.tensor("embeddings.LayerNorm.bias")?,
        cfg.layer_norm_eps,
    )?;
    let mut x = m.drop_hidden(&x)?;
    let mut mask = batch.mask.clone();
    let mut pool_mask = batch.mask.clone();
    if let Some((p, p_mask)) = m.prompt_rows(b)? {
        x = Tensor::cat(&[&p, &x], 1)?;
        mask = Tensor::cat(&[&p_mask, &mask], 1)?;
        pool_mask = Tensor::cat(&[&p_mask.zeros_like()?, &pool_mask], 1)?;
    }
    for l in 0..cfg.num_hidden_layers {
        x = layer(cfg, m, l, &x, &mask)?;
    }
    Ok((x, pool_mask))
}

fn layer(cfg: &BertConfig, m: &impl Inject, l: usize, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let p = format!("encoder.layer.{l}");
    let (b, len, h) = x.dims3()?;
    let heads = cfg.num_attention_heads;
    let d = h / heads;
    let split = |t: Tensor, n: usize| -> Result<Tensor> {
        Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let q = split(m.linear(&format!("{p}.attention.self.query"), x)?, len)?;
    let mut k = m.linear(&format!("{p}.attention.self.key"), x)?;
    let mut v = m.linear(&format!("{p}.attention.self.value"), x)?;
    let mut key_mask = mask.clone();
    if let Some((pk, pv, p_mask)) = m.prefix_rows(l, b)? {
        k = Tensor::cat(&[&pk, &k], 1)?;
        v = Tensor::cat(&[&pv, &v], 1)?;
        key_mask = Tensor::cat(&[&p_mask, &key_mask], 1)?;
    }
    let kv_len = k.dim(1)?;
    let k = split(k, kv_len)?;
    let v = split(v, kv_len)?;
    let scores = fused::matmul_t_at(m.precision(), &q, &k)?;
    let probs = fused::attention_softmax(&scores, &key_mask, 1.0 / (d as f64).sqrt())?;
    let probs = m.drop_attention(&probs)?;
    let ctx = fused::matmul_at(m.precision(), &probs, &v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, len, h))?;
    let a = m.linear(&format!("{p}.attention.output.dense"), &ctx)?;
    let a = m.drop_hidden(&a)?;
    let a = m.adapt(&format!("{p}.attention.output"), &a)?;
    let x1 = fused::layer_norm(
        &(a + x)?,
        &m.tensor(&format!("{p}.attention.output.LayerNorm.weight"))?,
        &m.tensor(&format!("{p}.attention.output.LayerNorm.bias"))?,
        cfg.layer_norm_eps,
    )?;
    let i = m.linear(&format!("{p}.intermediate.dense"), &x1)?;
    let i = match cfg.hidden_act.as_str() {
        "gelu" => fused::gelu_erf(&i)?,
        "gelu_new" => i.gelu()?,
        _ => i.relu()?,
    };
    let o = m.linear(&format!("{p}.output.dense"), &i)?;
    let o = m.drop_hidden(&o)?;
    let o = m.adapt(&format!("{p}.output"), &o)?;
    fused::layer_norm(
        &(o + x1)?,
        &m.tensor(&format!("{p}.output.LayerNorm.weight"))?,
        &m.tensor(&format!("{p}.output.LayerNorm.bias"))?,
        cfg.layer_norm_eps,
    )
}

/// Mean of the hidden states over the mask's tokens: `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// What the classification head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Hugging Face's pooler: `tanh(W_p · h[0] + b_p)` over the first position (the
    /// `[CLS]` token, or the first virtual token of a soft prompt, as PEFT places them).
    Cls,
    /// The mean of the input's tokens (sentence-transformers).
    Mean,
}

impl Pooling {
    /// `cls` or `mean`, as recorded in a delta's head.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => anyhow::bail!("pooling {other:?} is not cls or mean"),
        }
    }

    /// The name recorded in a delta's head.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

/// The pooler's weight (present in checkpoints saved from `BertModel`).
pub const POOLER_WEIGHT: &str = "pooler.dense.weight";
/// The pooler's bias.
pub const POOLER_BIAS: &str = "pooler.dense.bias";
