//! One forward pass over a batch whose rows carry different deltas on one shared base.
//!
//! The rows of a batch are grouped by delta into contiguous segments. The base's linear
//! layers run once over every row; what each delta adds is applied to its own rows only:
//! LoRA branches as one low-rank product per segment on that segment's rows (no copy of a
//! weight per delta), IA3 vectors and bias differences (BitFit) as per-row vectors, soft
//! prompts and prefixes padded to the longest in the batch (left padding, masked),
//! adapters on their segment's rows, and each segment's own pooling and head. A delta
//! that changes a matrix the encoder shares (a replaced or differenced weight or
//! embedding: selective, last-layer, full, diff pruning) cannot share the base's matmuls;
//! [`shares_base`] says so and the caller runs it in a group of its own with
//! [`crate::mounts::classify`].
//!
//! Every row's result equals running its delta alone up to float summation order: padded
//! prompt and prefix positions are masked out of attention (their weight is exactly 0).

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};

use crate::bert::{Batch, BertConfig, Inject, encode, mean_pool};
use crate::fused::{linear_at, matmul_t_at};
use crate::mounts::{DropPoint, HEAD_BIAS, HEAD_WEIGHT, Mounts};

/// Rows `start..start + len` of a batch, all with one delta.
#[derive(Debug, Clone)]
pub struct Segment<'m, 'a> {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// The delta (or nothing: the bare base) mounted for these rows.
    pub mounts: &'m Mounts<'a>,
}

/// Several deltas, each on its own rows of one batch, over one shared base.
#[derive(Debug)]
pub struct MixedMounts<'m, 'a> {
    segments: Vec<Segment<'m, 'a>>,
    rows: usize,
    /// Longest soft prompt among the segments (0 without one).
    prompt_max: usize,
    /// Each segment's own padded input length (the longest of its rows), for dropout.
    input_lens: Vec<usize>,
    /// The batch's padded input length.
    batch_len: usize,
}

/// Whether a delta can share the base's matmuls with others in one batch: it replaces or
/// changes no base tensor of two or more dimensions (embeddings and linear weights).
/// Heads, poolers and one-dimensional tensors (biases, layer norms) are applied per row.
pub fn shares_base(m: &Mounts<'_>) -> bool {
    let base = m.base();
    let shared = |name: &String| {
        base.tensors.get(name).is_some_and(|t| t.rank() >= 2)
            && !matches!(
                name.as_str(),
                HEAD_WEIGHT | crate::bert::POOLER_WEIGHT | crate::bert::POOLER_BIAS | HEAD_BIAS
            )
    };
    !m.replace.keys().any(shared) && !m.diff.keys().any(shared)
}

impl<'m, 'a> MixedMounts<'m, 'a> {
    /// Rows in order: `(rows, mounts)` for each segment. Every mounts must be on the same
    /// base and share it (see [`shares_base`]).
    pub fn new(parts: &[(usize, &'m Mounts<'a>)]) -> Result<Self> {
        let first = parts.first().context("an empty batch has no segments")?;
        let base = first.1.base();
        let mut segments = Vec::with_capacity(parts.len());
        let mut start = 0;
        let mut prompt_max = 0;
        for &(len, mounts) in parts {
            ensure!(len > 0, "a segment has no rows");
            ensure!(
                std::ptr::eq(mounts.base(), base),
                "the deltas of one batch must be mounted on one base"
            );
            ensure!(
                shares_base(mounts),
                "a delta that changes the base's weights cannot share a batch"
            );
            prompt_max = prompt_max.max(prompt_len(mounts)?);
            segments.push(Segment { start, len, mounts });
            start += len;
        }
        Ok(Self {
            segments,
            rows: start,
            prompt_max,
            input_lens: Vec::new(),
            batch_len: 0,
        })
    }

    /// Records each segment's own padded length from the batch's mask. Needed for
    /// training-time dropout: each segment draws its masks from its own generator over
    /// exactly the positions its rows would have alone, so a job trained in a mixed batch
    /// draws the same masks as trained alone.
    pub fn with_input_lengths(mut self, batch: &Batch) -> Result<Self> {
        let counts: Vec<f32> = batch.mask.sum(1)?.to_vec1()?;
        self.batch_len = batch.ids.dim(1)?;
        self.input_lens = self
            .segments
            .iter()
            .map(|s| {
                counts[s.start..s.start + s.len]
                    .iter()
                    .fold(0f32, |a, &b| a.max(b)) as usize
            })
            .map(|n| n.max(1))
            .collect();
        Ok(self)
    }

    fn dropping(&self) -> bool {
        self.segments.iter().any(|s| s.mounts.dropout.is_some())
    }

    /// The segment's own positions along a hidden state's sequence axis of length `seq`:
    /// (start, length), after its prompt's left padding.
    fn own_positions(&self, i: usize, seq: usize) -> Result<(usize, usize)> {
        let own = *self
            .input_lens
            .get(i)
            .context("dropout in a mixed batch needs with_input_lengths")?;
        let p = prompt_len(self.segments[i].mounts)?;
        // Before the prompt is prepended (the embeddings' dropout) the axis is the input.
        if self.prompt_max > 0 && seq == self.prompt_max + self.batch_len {
            Ok((self.prompt_max - p, p + own))
        } else {
            Ok((0, own))
        }
    }

    /// The segments, in row order.
    pub fn segments(&self) -> &[Segment<'m, 'a>] {
        &self.segments
    }

    fn base(&self) -> &'a crate::bert::BaseWeights {
        self.segments[0].mounts.base()
    }

    /// One `[rows, 1, n]` tensor from a per-segment vector (or `fill` where a segment has
    /// none); `None` when no segment has one.
    fn per_row(
        &self,
        n: usize,
        fill: f64,
        vector: impl Fn(&Mounts<'a>) -> Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let vectors: Vec<Option<Tensor>> = self
            .segments
            .iter()
            .map(|s| vector(s.mounts))
            .collect::<Result<_>>()?;
        if vectors.iter().all(Option::is_none) {
            return Ok(None);
        }
        let device = &self.base().device;
        let parts: Vec<Tensor> = self
            .segments
            .iter()
            .zip(vectors)
            .map(|(s, v)| {
                let v = match v {
                    Some(v) => v,
                    None => (Tensor::ones(n, DType::F32, device)? * fill)?,
                };
                Ok(v.reshape((1, 1, n))?.broadcast_as((s.len, 1, n))?)
            })
            .collect::<Result<_>>()?;
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    /// Applies `f` to each segment's rows of `x` (or keeps them, where `f` gives `None`)
    /// and puts the rows back together; `x` itself when no segment changes anything.
    fn per_segment(
        &self,
        x: &Tensor,
        f: impl Fn(&Segment<'m, 'a>, Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.segments.len());
        let mut changed = false;
        for s in &self.segments {
            let rows = x.narrow(0, s.start, s.len)?;
            match f(s, rows.clone())? {
                Some(y) => {
                    changed = true;
                    parts.push(y);
                }
                None => parts.push(rows),
            }
        }
        if !changed {
            return Ok(x.clone());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Per-segment `[n, hidden]` tensors padded on the left to the longest: `[rows, max,
    /// hidden]` and the mask `[rows, max]`.
    fn padded(&self, each: &[Option<Tensor>]) -> Result<Option<(Tensor, Tensor)>> {
        let max = each
            .iter()
            .flatten()
            .map(|t| t.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max();
        let Some(max) = max else {
            return Ok(None);
        };
        let device = &self.base().device;
        let h = self.base().config.hidden_size;
        let (mut values, mut masks) = (Vec::new(), Vec::new());
        for (s, t) in self.segments.iter().zip(each) {
            let n = match t {
                Some(t) => t.dim(0)?,
                None => 0,
            };
            let pad = max - n;
            let mut v = Tensor::zeros((pad, h), DType::F32, device)?;
            if let Some(t) = t {
                v = Tensor::cat(&[&v, t], 0)?;
            }
            values.push(v.unsqueeze(0)?.broadcast_as((s.len, max, h))?);
            let mut m = vec![0f32; pad];
            m.resize(max, 1.0);
            masks.push(
                Tensor::from_vec(m, (1, max), device)?
                    .broadcast_as((s.len, max))?
                    .contiguous()?,
            );
        }
        Ok(Some((Tensor::cat(&values, 0)?, Tensor::cat(&masks, 0)?)))
    }
}

impl MixedMounts<'_, '_> {
    /// Adds each row's LoRA branches on `module` to `y`. At inference, where every segment
    /// has at most one LoRA there, all rows go through one batched low-rank product: each
    /// row gathers its segment's `A` and `B` (zero-padded to the largest rank; zeros for a
    /// row without LoRA, which adds exactly nothing), as Punica's BGMV does; otherwise
    /// (and in training) each segment's products run on its own rows, as its SGMV does.
    fn lora(&self, module: &str, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let loras = |s: &Segment<'_, '_>| s.mounts.lora.get(module).map_or(0, Vec::len);
        if self.segments.iter().all(|s| loras(s) == 0) {
            return Ok(y);
        }
        let (rows, len, n_in) = x.dims3()?;
        let n_out = y.dim(2)?;
        let p = self.base().precision();
        // Per segment where a segment stacks LoRAs here, or while training them: a
        // gathered product gives every row its own gradient of its `A` and `B`, which the
        // backward pass then sums back per delta (rows x rank x (in + out) floats, fresh
        // each step); four co-trained jobs of 16 rows ran 1.2x faster per segment.
        let training = self
            .segments
            .iter()
            .filter_map(|s| s.mounts.lora.get(module))
            .flatten()
            .any(|l| l.a.is_variable() || l.b.is_variable());
        if training || self.segments.iter().any(|s| loras(s) > 1) {
            return self.per_segment(&y, |s, ys| {
                let Some(ls) = s.mounts.lora.get(module) else {
                    return Ok(None);
                };
                let xs = x.narrow(0, s.start, s.len)?.reshape((s.len * len, n_in))?;
                let mut ys = ys;
                for l in ls {
                    let down = linear_at(p, &xs, &l.a, None)?;
                    let branch = linear_at(p, &down, &l.b, None)?.reshape((s.len, len, n_out))?;
                    ys = (ys + (branch * l.scale)?)?;
                }
                Ok(Some(ys))
            });
        }
        let rank = self
            .segments
            .iter()
            .filter_map(|s| s.mounts.lora.get(module)?.first())
            .map(|l| l.a.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let device = x.device();
        let (mut a_rows, mut b_rows, mut scales) = (Vec::new(), Vec::new(), Vec::new());
        for s in &self.segments {
            let (a, b, scale) = match s.mounts.lora.get(module).and_then(|v| v.first()) {
                Some(l) => {
                    let r = l.a.dim(0)?;
                    let (mut a, mut b) = (l.a.clone(), l.b.clone());
                    if r < rank {
                        a = Tensor::cat(
                            &[&a, &Tensor::zeros((rank - r, n_in), DType::F32, device)?],
                            0,
                        )?;
                        b = Tensor::cat(
                            &[&b, &Tensor::zeros((n_out, rank - r), DType::F32, device)?],
                            1,
                        )?;
                    }
                    (a, b, l.scale as f32)
                }
                None => (
                    Tensor::zeros((rank, n_in), DType::F32, device)?,
                    Tensor::zeros((n_out, rank), DType::F32, device)?,
                    0.0,
                ),
            };
            a_rows.push(a.unsqueeze(0)?.broadcast_as((s.len, rank, n_in))?);
            b_rows.push(b.unsqueeze(0)?.broadcast_as((s.len, n_out, rank))?);
            scales.extend(std::iter::repeat_n(scale, s.len));
        }
        let a = Tensor::cat(&a_rows, 0)?;
        let b = Tensor::cat(&b_rows, 0)?;
        let scales = Tensor::from_vec(scales, (rows, 1, 1), device)?;
        let down = matmul_t_at(p, x, &a)?;
        let branch = matmul_t_at(p, &down, &b)?.broadcast_mul(&scales)?;
        Ok((y + branch)?)
    }
}

fn prompt_len(m: &Mounts<'_>) -> Result<usize> {
    Ok(match m.prompt()? {
        Some(p) => p.dim(0)?,
        None => 0,
    })
}

impl Inject for MixedMounts<'_, '_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let base = self
            .base()
            .tensors
            .get(name)
            .with_context(|| format!("no tensor {name} in the base"))?;
        if base.rank() != 1 || self.segments.iter().all(|s| s.mounts.untouched(name)) {
            return Ok(base.clone());
        }
        // Each segment's own values (the base's where it leaves them alone).
        let n = base.dim(0)?;
        let parts: Vec<Tensor> = self
            .segments
            .iter()
            .map(|s| {
                let v = s.mounts.tensor(name)?;
                Ok(v.reshape((1, 1, n))?.broadcast_as((s.len, 1, n))?)
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn precision(&self) -> crate::fused::Precision {
        self.base().precision()
    }

    fn linear(&self, module: &str, x: &Tensor) -> Result<Tensor> {
        let (rows, len, n_in) = x.dims3()?;
        ensure!(
            rows == self.rows,
            "a batch of {rows} rows for {} mounted",
            self.rows
        );
        let w = self.tensor(&format!("{module}.weight"))?;
        let n_out = w.dim(0)?;
        // Input-side IA3 (feed-forward modules), one vector per row.
        let input_scale = self.per_row(n_in, 1.0, |m| ia3_product(m, module, true))?;
        let x = match &input_scale {
            Some(s) => x.broadcast_mul(s)?,
            None => x.clone(),
        };
        let flat = x.reshape((rows * len, n_in))?;
        // No gradient for the frozen base weight (see `fused::linear`); the bias
        // may differ per row, so it is added below.
        let y = crate::fused::linear_at(self.base().precision(), &flat, &w, None)?;
        let mut y = y.reshape((rows, len, n_out))?;
        let bias = format!("{module}.bias");
        if self.base().tensors.contains_key(&bias) {
            y = y.broadcast_add(&self.tensor(&bias)?)?;
        }
        y = self.lora(module, &x, y)?;
        if let Some(s) = self.per_row(n_out, 1.0, |m| ia3_product(m, module, false))? {
            y = y.broadcast_mul(&s)?;
        }
        Ok(y)
    }

    fn adapt(&self, point: &str, x: &Tensor) -> Result<Tensor> {
        self.per_segment(x, |s, xs| {
            if s.mounts.adapters.get(point).is_none_or(Vec::is_empty) {
                return Ok(None);
            }
            Ok(Some(s.mounts.adapt(point, &xs)?))
        })
    }

    fn prefix_rows(&self, layer: usize, rows: usize) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        ensure!(
            rows == self.rows,
            "a batch of {rows} rows for {} mounted",
            self.rows
        );
        let each: Vec<Option<(Tensor, Tensor)>> = self
            .segments
            .iter()
            .map(|s| s.mounts.prefix(layer))
            .collect::<Result<_>>()?;
        let keys: Vec<Option<Tensor>> = each
            .iter()
            .map(|p| p.as_ref().map(|p| p.0.clone()))
            .collect();
        let values: Vec<Option<Tensor>> = each
            .iter()
            .map(|p| p.as_ref().map(|p| p.1.clone()))
            .collect();
        let (Some((k, mask)), Some((v, _))) = (self.padded(&keys)?, self.padded(&values)?) else {
            return Ok(None);
        };
        Ok(Some((k, v, mask)))
    }

    fn prompt_rows(&self, rows: usize) -> Result<Option<(Tensor, Tensor)>> {
        ensure!(
            rows == self.rows,
            "a batch of {rows} rows for {} mounted",
            self.rows
        );
        let each: Vec<Option<Tensor>> = self
            .segments
            .iter()
            .map(|s| s.mounts.prompt())
            .collect::<Result<_>>()?;
        self.padded(&each)
    }

    fn drop_hidden(&self, x: &Tensor) -> Result<Tensor> {
        if !self.dropping() {
            return Ok(x.clone());
        }
        let dims = x.dims();
        ensure!(dims.len() >= 2, "hidden states without a sequence axis");
        let seq = dims[1];
        let inner: usize = dims[2..].iter().product();
        let mut factors = Factors::new(x);
        for (i, s) in self.segments.iter().enumerate() {
            if s.mounts.dropout.is_none() {
                continue;
            }
            // The segment's rows, its own positions: what it would draw for alone.
            let (start, len) = self.own_positions(i, seq)?;
            ensure!(
                start + len <= seq && inner > 0,
                "dropout span outside the batch"
            );
            let Some(f) = s
                .mounts
                .dropout_factors(DropPoint::Hidden, s.len * len * inner)
            else {
                continue;
            };
            let all = factors.get();
            for (k, run) in f.chunks_exact(len * inner).enumerate() {
                let to = ((s.start + k) * seq + start) * inner;
                all[to..to + run.len()].copy_from_slice(run);
            }
        }
        factors.apply(x)
    }

    fn drop_attention(&self, probs: &Tensor) -> Result<Tensor> {
        if !self.dropping() {
            return Ok(probs.clone());
        }
        let (_, heads, q, kv) = probs.dims4()?;
        let prefix_max = kv - q;
        let mut factors = Factors::new(probs);
        for (i, s) in self.segments.iter().enumerate() {
            if s.mounts.dropout.is_none() {
                continue;
            }
            let (q0, qn) = self.own_positions(i, q)?;
            // A prefix delta has the same length at every layer.
            let pf = s.mounts.prefix(0)?.map_or(Ok(0), |(k, _)| k.dim(0))?;
            // Alone, its keys would be its prefix, then its prompt and input: drawn as
            // `[rows, heads, qn, pf + qn]` and put back where those keys sit here.
            ensure!(
                pf <= prefix_max && q0 + qn <= q,
                "dropout span outside the batch"
            );
            let (k0, k1, width) = (prefix_max - pf, prefix_max + q0, pf + qn);
            let n = s.len * heads * qn * width;
            let Some(f) = s.mounts.dropout_factors(DropPoint::Attention, n) else {
                continue;
            };
            let all = factors.get();
            for (k, row) in f.chunks_exact(width).enumerate() {
                // Row k of the draw: query q0 + k % qn of head (k / qn) % heads of the
                // segment's row k / (qn * heads).
                let (query, head, r) = (k % qn, (k / qn) % heads, k / (qn * heads));
                let at = (((s.start + r) * heads + head) * q + q0 + query) * kv;
                all[at + k0..at + k0 + pf].copy_from_slice(&row[..pf]);
                all[at + k1..at + k1 + qn].copy_from_slice(&row[pf..]);
            }
        }
        factors.apply(probs)
    }
}

/// Dropout factors for a whole mixed batch: 1 where no segment drops (padding, or a
/// segment without dropout), each segment's own draw on its own positions. One product
/// with the batch replaces a narrow, a product and concatenations per segment, whose
/// backward passes allocate the whole batch's size for every piece (candle pads a
/// narrow's gradient to its input).
struct Factors {
    n: usize,
    all: Option<Vec<f32>>,
}

impl Factors {
    fn new(like: &Tensor) -> Self {
        Self {
            n: like.elem_count(),
            all: None,
        }
    }

    /// The factors, all 1 until written.
    fn get(&mut self) -> &mut Vec<f32> {
        let n = self.n;
        self.all.get_or_insert_with(|| vec![1.0; n])
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self.all {
            None => Ok(x.clone()),
            Some(all) => {
                let f = Tensor::from_vec(all, x.shape(), x.device())?.to_dtype(x.dtype())?;
                Ok(x.mul(&f)?)
            }
        }
    }
}

/// The product of a module's IA3 vectors on one side (input or output), if it has any.
fn ia3_product(m: &Mounts<'_>, module: &str, input_side: bool) -> Result<Option<Tensor>> {
    let mut out: Option<Tensor> = None;
    for (l, side) in m.ia3.get(module).into_iter().flatten() {
        if *side == input_side {
            out = Some(match out {
                None => l.clone(),
                Some(o) => o.mul(l)?,
            });
        }
    }
    Ok(out)
}

/// What a forward pass returns per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The classification head's logits (each delta's own head and pooling).
    Logits,
    /// The mean of the input tokens' last hidden states (sentence-transformers pooling).
    Embedding,
}

/// Each segment's logits `[rows, labels]` (with their graph: co-training takes each
/// job's loss from its own segment).
pub fn logits(cfg: &BertConfig, m: &MixedMounts<'_, '_>, batch: &Batch) -> Result<Vec<Tensor>> {
    let (hidden, pool_mask) = encode(cfg, m, batch)?;
    m.segments
        .iter()
        .map(|s| {
            let h = hidden.narrow(0, s.start, s.len)?;
            let mask = pool_mask.narrow(0, s.start, s.len)?;
            let first = m.prompt_max - prompt_len(s.mounts)?;
            head(s.mounts, &h, &mask, first)
        })
        .collect()
}

/// Runs a batch of segments that share the base: per segment, per row, the values asked
/// for (logits `[labels]` or an embedding `[hidden]`).
pub fn forward(
    cfg: &BertConfig,
    m: &MixedMounts<'_, '_>,
    batch: &Batch,
    out: Output,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let (hidden, pool_mask) = encode(cfg, m, batch)?;
    let mut result = Vec::with_capacity(m.segments.len());
    for s in &m.segments {
        let h = hidden.narrow(0, s.start, s.len)?;
        let mask = pool_mask.narrow(0, s.start, s.len)?;
        let values = match out {
            Output::Embedding => mean_pool(&h, &mask)?,
            Output::Logits => {
                // A row's first real position: after the padding of shorter prompts.
                let first = m.prompt_max - prompt_len(s.mounts)?;
                head(s.mounts, &h, &mask, first)?
            }
        };
        result.push(values.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(result)
}

/// Runs one delta's rows alone (a delta that does not share the base, or any delta when
/// mixing is off), with the same outputs as [`forward`].
pub fn forward_alone(
    cfg: &BertConfig,
    m: &Mounts<'_>,
    batch: &Batch,
    out: Output,
) -> Result<Vec<Vec<f32>>> {
    let (hidden, pool_mask) = encode(cfg, m, batch)?;
    let values = match out {
        Output::Embedding => mean_pool(&hidden, &pool_mask)?,
        Output::Logits => head(m, &hidden, &pool_mask, 0)?,
    };
    Ok(values.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Pooling (as the delta's head says; `first` is the position the pooler reads) and the
/// classification head.
fn head(m: &Mounts<'_>, hidden: &Tensor, mask: &Tensor, first: usize) -> Result<Tensor> {
    if !m.replace.contains_key(HEAD_WEIGHT) && !m.base().tensors.contains_key(HEAD_WEIGHT) {
        bail!("neither the base nor the delta has a classification head (classifier.weight)");
    }
    crate::mounts::head(m, hidden, mask, first)
}
