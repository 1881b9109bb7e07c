//! Fused CPU kernels with their own backward pass: GELU (erf form), layer norm over the
//! last dimension, the attention softmax (scale, key mask and softmax in one) and linear
//! layers on frozen weights (product and bias in one, no weight gradient).
//!
//! candle builds these from elementwise ops: nine passes over the activations for a layer
//! norm, seven for a masked softmax, a scalar `erf` per value for GELU, and each pass is
//! walked again backward. Here each is one pass forward and one backward, written so the
//! compiler vectorises it (AVX-512 or AVX2 chosen at run time) and split across candle's
//! own CPU threads. Off the CPU, or for inputs a kernel does not cover (per-row layer-norm
//! weights in mixed batches), each function falls back to candle's ops: the finite-
//! difference test (`tests/methods.rs`) checks the gradients of this path and the unit tests
//! below check each kernel against the fallback.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};

/// Values per block of work handed to one thread (64 KiB of f32).
const BLOCK: usize = 16 * 1024;

/// How products of activations and weights are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Mixed precision, as PyTorch's bf16 autocast: the products of linear layers and
    /// attention take bf16 operands (accumulated in f32 by the hardware) and give f32
    /// results; everything else (norms, softmax, residuals, the head, the loss) and every
    /// trained value (the f32 master copy the optimiser updates) stays f32. Gradients flow
    /// back through the casts. The base's linear weights are held in bf16 (half their
    /// memory). Meant for GPUs with bf16 units; candle's CPU widens bf16 to f32 for its
    /// products, so on the CPU it only costs time.
    Bf16,
}

impl Precision {
    /// Its name (`f32`, `bf16`), as recorded in a delta's provenance.
    pub const fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What a delta's provenance records (`precision`; absent: f32), so that a
    /// verification recomputes its metrics as training did.
    pub fn recorded(provenance: &std::collections::BTreeMap<String, serde_json::Value>) -> Self {
        match provenance.get("precision").and_then(|p| p.as_str()) {
            Some("bf16") => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// `a · b` with bf16 operands and an f32 result (see [`Precision::Bf16`]).
fn bf16_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.to_dtype(DType::BF16)?
        .matmul(&b.to_dtype(DType::BF16)?)?
        .to_dtype(DType::F32)?)
}

/// [`linear`] at a precision.
pub fn linear_at(p: Precision, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match p {
        Precision::F32 => linear(x, w, b),
        Precision::Bf16 => {
            let y = bf16_product(x, &w.t()?)?;
            Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        }
    }
}

/// [`matmul`] at a precision.
pub fn matmul_at(p: Precision, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match p {
        Precision::F32 => matmul(a, b),
        Precision::Bf16 => bf16_product(a, b),
    }
}

/// [`matmul_t`] at a precision.
pub fn matmul_t_at(p: Precision, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match p {
        Precision::F32 => matmul_t(a, b),
        Precision::Bf16 => bf16_product(a, &b.t()?),
    }
}

/// Whether a tensor can take the fused path: f32 on the CPU.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `x · Φ(x)`, BERT's `gelu`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

/// Layer norm over the last dimension with weight and bias of that dimension's size
/// (`[hidden]`). Other weight shapes (a leading row dimension, as mixed batches give) use
/// candle's ops.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if !(fusable(x) && fusable(w) && fusable(b) && w.dims() == [h] && b.dims() == [h]) {
        return layer_norm_ops(x, w, b, eps);
    }
    Ok(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )?)
}

/// Layer norm from candle's basic ops (its fused one has no backward pass).
pub fn layer_norm_ops(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Attention probabilities: `softmax(scores · scale + (key_mask - 1) · 1e9)` over the
/// last dimension, for scores `[batch, heads, queries, keys]` and a key mask
/// `[batch, keys]` (1 where a key may be attended). Hugging Face adds the dtype's minimum
/// where the mask is 0; any large negative gives the same softmax in f32. Gradients flow
/// to the scores only.
pub fn attention_softmax(scores: &Tensor, key_mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, _, k) = scores.dims4()?;
    if !(fusable(scores) && fusable(key_mask)) {
        let bias = ((key_mask - 1.0)? * 1e9)?.reshape((b, 1, 1, k))?;
        let scaled = (scores * scale)?;
        return Ok(candle_nn::ops::softmax(
            &scaled.broadcast_add(&bias)?,
            D::Minus1,
        )?);
    }
    Ok(scores.contiguous()?.apply_op2(
        &key_mask.contiguous()?.reshape((b, k))?,
        AttentionSoftmax {
            scale: scale as f32,
        },
    )?)
}

/// A linear layer `x Wᵀ + b`, `W` `[out, in]`, `x` `[rows, in]`: one product with the
/// bias written first (no separate pass to add it), and a backward that computes only
/// what is trained: the input's gradient `g W`, the weight's `gᵀ x` when it is trained
/// (full fine-tuning, selective, diff pruning; candle's matmul backward computes it for
/// frozen base weights too, a wasted `[out, in]` product per layer and step) and the
/// bias's column sums when it is trained (BitFit). Off the CPU, or with a bias that is not
/// `[out]`, it is candle's ops.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let out = w.dim(0)?;
    let fused = fusable(x) && fusable(w) && b.is_none_or(|b| fusable(b) && b.dims() == [out]);
    if !fused {
        let y = x.matmul(&w.t()?)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(out, DType::F32, x.device())?,
    };
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b, Linear)?)
}

/// Batched product `a · b` over the last two dimensions of `a` `[…, m, k]` and `b`
/// `[…, k, n]` (the same leading dimensions), with its backward. On the CPU each product
/// runs on candle's pool of threads like every op here, instead of on rayon's, which
/// candle's own `matmul` uses: two pools that take turns spinning on a 2-core machine
/// cost a fifth of a training step. Elsewhere it is candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(fusable(a) && fusable(b)) {
        return Ok(a.matmul(b)?);
    }
    Ok(bmm(a, b, false, false)?)
}

/// `a · bᵀ` over the last two dimensions (`b` `[…, n, k]`), as [`matmul`] computes it,
/// without copying `b` into its transposed layout.
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(fusable(a) && fusable(b)) {
        return Ok(a.matmul(&b.t()?)?);
    }
    Ok(bmm(a, b, false, true)?)
}

/// `op(a) · op(b)` for contiguous `a`, `b`, where `op` transposes the last two dimensions
/// when its flag is set.
fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op2(&b.contiguous()?, BatchedMatmul { ta, tb })
}

// ---- the ops ----

/// `op(a) · op(b)` per leading index; see [`bmm`].
struct BatchedMatmul {
    ta: bool,
    tb: bool,
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "fused-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32s(as_, al, "matmul left side")?;
        let b = f32s(bs, bl, "matmul right side")?;
        let (ad, bd) = (al.dims(), bl.dims());
        let bad = || candle_core::Error::Msg(format!("matmul of {ad:?} by {bd:?}"));
        if ad.len() < 2 || ad.len() != bd.len() || ad[..ad.len() - 2] != bd[..bd.len() - 2] {
            return Err(bad());
        }
        let r = ad.len();
        let (a0, a1, b0, b1) = (ad[r - 2], ad[r - 1], bd[r - 2], bd[r - 1]);
        let (m, k) = if self.ta { (a1, a0) } else { (a0, a1) };
        let (kb, n) = if self.tb { (b1, b0) } else { (b0, b1) };
        if k != kb {
            return Err(bad());
        }
        let items: usize = ad[..r - 2].iter().product();
        // (row stride, column stride) of each side's matrix as used.
        let (a_rs, a_cs) = if self.ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if self.tb { (1, k) } else { (n, 1) };
        let mut c = vec![0f32; items * m * n];
        par_blocks(&mut c, m * n, per_thread(items), |block, out| {
            for (i, dst) in block.zip(out.chunks_exact_mut(m * n)) {
                let (lhs, rhs) = (
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                );
                let lhs = View::new(lhs, m, k, a_rs, a_cs);
                let rhs = View::new(rhs, k, n, b_rs, b_cs);
                gemm_into(dst, lhs, rhs, false);
            }
        });
        let mut shape = ad[..r - 2].to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(c), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (ta, tb) = (self.ta, self.tb);
        // C = op(A)·op(B): d op(A) = G·op(B)ᵀ and d op(B) = op(A)ᵀ·G, transposed back
        // where A or B is stored transposed.
        let da = a
            .track_op()
            .then(|| {
                if ta {
                    bmm(b, g, tb, true)
                } else {
                    bmm(g, b, false, !tb)
                }
            })
            .transpose()?;
        let db = b
            .track_op()
            .then(|| {
                if tb {
                    bmm(g, a, true, ta)
                } else {
                    bmm(a, g, !ta, false)
                }
            })
            .transpose()?;
        Ok((da, db))
    }
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, "linear input")?;
        let w = f32s(ws, wl, "linear weight")?;
        let b = f32s(bs, bl, "linear bias")?;
        let (rows, n_in) = xl.shape().dims2()?;
        let (n_out, w_in) = wl.shape().dims2()?;
        if w_in != n_in || b.len() != n_out {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
        let mut y: Vec<f32> = Vec::with_capacity(rows * n_out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        // `w` read with row stride 1 and column stride `n_in` is `Wᵀ` (`n_in × n_out`).
        gemm_rows(&mut y, x, View::new(w, n_in, n_out, 1, n_in), true);
        Ok((CpuStorage::F32(y), Shape::from((rows, n_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x
            .track_op()
            .then(|| g.apply_op2_no_bwd(w, &LinearInputGrad))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| g.apply_op2_no_bwd(x, &LinearWeightGrad))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| g.apply_op1_no_bwd(&SumRows))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// `gᵀ x`: the weight's gradient of [`Linear`] from the output's gradient `[rows, out]`
/// and the input `[rows, in]`, split by output rows of the weight over the threads.
struct LinearWeightGrad;

impl CustomOp2 for LinearWeightGrad {
    fn name(&self) -> &'static str {
        "fused-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32s(gs, gl, "linear output gradient")?;
        let x = f32s(xs, xl, "linear input")?;
        let (rows, n_out) = gl.shape().dims2()?;
        let (x_rows, n_in) = xl.shape().dims2()?;
        if x_rows != rows {
            candle_core::bail!(
                "linear gradient {:?} against input {:?}",
                gl.dims(),
                xl.dims()
            );
        }
        let mut dw = vec![0f32; n_out * n_in];
        par_blocks(&mut dw, n_in, per_thread(n_out), |block, out| {
            // `gᵀ` from column `block.start` of `g`: `block.len()` rows of `rows` values.
            let gt = View::new(&g[block.start..], block.len(), rows, 1, n_out);
            gemm_into(out, gt, View::new(x, rows, n_in, n_in, 1), false);
        });
        Ok((CpuStorage::F32(dw), Shape::from((n_out, n_in))))
    }
}

/// The sums of a matrix's rows, `[rows, n]` to `[n]` (a bias's gradient), in one
/// partial sum per thread.
struct SumRows;

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "fused-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32s(s, l, "gradient")?;
        let (rows, n) = l.shape().dims2()?;
        let per = per_thread(rows);
        // Row `i` of `partial` sums rows `i·per ..` of `g`.
        let mut partial = vec![0f32; rows.div_ceil(per) * n];
        par_blocks(&mut partial, n, 1, |block, out| {
            for r in (block.start * per)..((block.start + 1) * per).min(rows) {
                for (o, v) in out.iter_mut().zip(&g[r * n..(r + 1) * n]) {
                    *o += v;
                }
            }
        });
        let mut sum = vec![0f32; n];
        for p in partial.chunks_exact(n) {
            for (s, v) in sum.iter_mut().zip(p) {
                *s += v;
            }
        }
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

/// `g W`: the input's gradient of [`Linear`] from the output's gradient `[rows, out]`
/// and the weight `[out, in]`.
struct LinearInputGrad;

impl CustomOp2 for LinearInputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32s(gs, gl, "linear output gradient")?;
        let w = f32s(ws, wl, "linear weight")?;
        let (rows, n_out) = gl.shape().dims2()?;
        let (w_out, n_in) = wl.shape().dims2()?;
        if w_out != n_out {
            candle_core::bail!(
                "linear gradient {:?} against weight {:?}",
                gl.dims(),
                wl.dims()
            );
        }
        let mut dx = vec![0f32; rows * n_in];
        gemm_rows(&mut dx, g, View::new(w, n_out, n_in, n_in, 1), false);
        Ok((CpuStorage::F32(dx), Shape::from((rows, n_in))))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "gelu input")?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, 1, |rows, out| simd::gelu(&x[rows], out));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfGrad)?))
    }
}

/// `g · Φ'(x)·x + g · Φ(x)`: the gradient of [`GeluErf`] from its input and the output's
/// gradient.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, "gelu input")?;
        let g = f32s(gs, gl, "gelu gradient")?;
        same_len(x, g)?;
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, 1, |rows, out| {
            simd::gelu_grad(&x[rows.clone()], &g[rows], out)
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, "layer norm input")?;
        let w = f32s(ws, wl, "layer norm weight")?;
        let b = f32s(bs, bl, "layer norm bias")?;
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, h, |rows, out| {
            for (r, o) in rows.zip(out.chunks_exact_mut(h)) {
                simd::layer_norm_row(&x[r * h..(r + 1) * h], w, b, self.eps, o);
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let rows = x.elem_count() / h;
        // One op gives all three: the input's gradient in the first `rows` rows, then
        // the weight's and the bias's.
        let all = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = w
            .track_op()
            .then(|| all.narrow(0, rows, 1)?.reshape(h))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| all.narrow(0, rows + 1, 1)?.reshape(h))
            .transpose()?;
        Ok((Some(dx), dw, db))
    }
}

/// The gradients of [`LayerNorm`] from its input, weight and the output's gradient:
/// `[rows + 2, hidden]`, the input's gradient, then the weight's, then the bias's.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, "layer norm input")?;
        let w = f32s(ws, wl, "layer norm weight")?;
        let g = f32s(gs, gl, "layer norm gradient")?;
        same_len(x, g)?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 2) * h];
        let (dx, sums) = out.split_at_mut(rows * h);
        // Each block returns its partial sums of g·x̂ and g over its rows.
        let partials = par_rows(dx, h, |rows, out| {
            let mut dw = vec![0f32; h];
            let mut db = vec![0f32; h];
            for (r, o) in rows.zip(out.chunks_exact_mut(h)) {
                let span = r * h..(r + 1) * h;
                simd::layer_norm_grad_row(&x[span.clone()], w, &g[span], self.eps, o, &mut dw);
                for (d, gv) in db.iter_mut().zip(&g[r * h..(r + 1) * h]) {
                    *d += gv;
                }
            }
            (dw, db)
        });
        let (dw_sum, db_sum) = sums.split_at_mut(h);
        for (dw, db) in partials {
            for (s, v) in dw_sum.iter_mut().zip(dw) {
                *s += v;
            }
            for (s, v) in db_sum.iter_mut().zip(db) {
                *s += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

struct AttentionSoftmax {
    scale: f32,
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = f32s(ss, sl, "attention scores")?;
        let m = f32s(ms, ml, "key mask")?;
        let (_, heads, queries, k) = sl.shape().dims4()?;
        if m.len() * heads * queries != s.len() {
            candle_core::bail!(
                "key mask {:?} does not match scores {:?}",
                ml.dims(),
                sl.dims()
            );
        }
        let per_batch = heads * queries;
        let mut y = vec![0f32; s.len()];
        par_rows(&mut y, k, |rows, out| {
            for (r, o) in rows.zip(out.chunks_exact_mut(k)) {
                let mask = &m[(r / per_batch) * k..(r / per_batch + 1) * k];
                simd::masked_softmax_row(&s[r * k..(r + 1) * k], mask, self.scale, o);
            }
        });
        Ok((CpuStorage::F32(y), sl.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `scale · y · (g - Σ g·y)` per row: the scores' gradient from the probabilities and
/// their gradient.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32s(ys, yl, "probabilities")?;
        let g = f32s(gs, gl, "probability gradient")?;
        same_len(y, g)?;
        let k = yl.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut ds = vec![0f32; y.len()];
        par_rows(&mut ds, k, |rows, out| {
            for (r, o) in rows.zip(out.chunks_exact_mut(k)) {
                let span = r * k..(r + 1) * k;
                simd::softmax_grad_row(&y[span.clone()], &g[span], self.scale, o);
            }
        });
        Ok((CpuStorage::F32(ds), yl.shape().clone()))
    }
}

// ---- plumbing ----

/// The f32 values of a contiguous CPU storage.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("fused op: {what} is not contiguous f32"),
    }
}

fn same_len(a: &[f32], b: &[f32]) -> candle_core::Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("fused op: {} values against {}", a.len(), b.len());
    }
    Ok(())
}

/// `y = x·w` (or `y += x·w` with `accumulate`), `x` `[rows, w.rows]` and `y`
/// `[rows, w.cols]` row-major. The rows are split into one block per CPU thread of
/// candle's pool, each a single-threaded gemm: one pool of threads for every fused op, so
/// none spins on a core the other needs (candle's own products run on rayon's).
fn gemm_rows(y: &mut [f32], x: &[f32], w: View<'_>, accumulate: bool) {
    let (k, n) = (w.rows, w.cols);
    if y.is_empty() || n == 0 {
        return;
    }
    let rows = y.len() / n;
    par_blocks(y, n, per_thread(rows), |block, out| {
        let lhs = View::new(&x[block.start * k..block.end * k], block.len(), k, k, 1);
        gemm_into(out, lhs, w, accumulate);
    });
}

/// How many of `items` each of candle's CPU threads takes when they are split evenly.
fn per_thread(items: usize) -> usize {
    items
        .div_ceil(candle_core::utils::get_num_threads().max(1))
        .max(1)
}

/// A matrix read from a slice: `rows × cols` values, element `(i, j)` at
/// `data[i·rs + j·cs]` (a transposed matrix is the same slice with the strides swapped).
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a·b`, or `dst += a·b` with `accumulate`, `dst` row-major `a.rows × b.cols`, on
/// this thread (the callers split the work over candle's pool). The one call into gemm's
/// unsafe interface: the shapes and bounds it relies on are checked here (a mismatch is
/// a bug in this module, not bad input: the ops check their inputs' shapes first).
fn gemm_into(dst: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool) {
    assert!(
        a.cols == b.rows && dst.len() == a.rows * b.cols && a.in_bounds() && b.in_bounds(),
        "gemm of {}×{} by {}×{} into {} values",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        dst.len()
    );
    if dst.is_empty() {
        return;
    }
    // SAFETY: `dst` holds `a.rows × b.cols` values written row-major, and every element
    // of `a` and `b` read through their strides lies inside their slices (checked above).
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs `f` over blocks of whole rows of `out` (rows of `width` values) on candle's CPU
/// threads; `f` gets the block's row numbers and its part of `out`. Returns what each
/// block returned, in row order.
fn par_rows<T: Send>(
    out: &mut [f32],
    width: usize,
    f: impl Fn(Range<usize>, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    par_blocks(out, width, (BLOCK / width.max(1)).max(1), f)
}

/// One block of [`par_blocks`]: its row numbers, its part of the output and what `f`
/// returned for it.
type Block<'a, T> = (Range<usize>, &'a mut [f32], Option<T>);

/// [`par_rows`] with `per_block` rows in each block.
fn par_blocks<T: Send>(
    out: &mut [f32],
    width: usize,
    per_block: usize,
    f: impl Fn(Range<usize>, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    if out.is_empty() || width == 0 {
        return Vec::new();
    }
    let per_block = per_block.max(1);
    let blocks: Vec<Mutex<Block<'_, T>>> = out
        .chunks_mut(per_block * width)
        .enumerate()
        .map(|(i, c)| {
            let first = i * per_block;
            Mutex::new((first..first + c.len() / width, c, None))
        })
        .collect();
    let run = |i: usize| {
        let mut guard = blocks[i].lock().unwrap_or_else(PoisonError::into_inner);
        let (rows, block, result) = &mut *guard;
        *result = Some(f(rows.clone(), block));
    };
    if blocks.len() == 1 {
        run(0);
    } else {
        candle_core::utils::barrier_pool()
            .execute_chunked(blocks.len(), |range| range.for_each(run));
    }
    blocks
        .into_iter()
        .filter_map(|b| b.into_inner().unwrap_or_else(PoisonError::into_inner).2)
        .collect()
}

/// The kernels: plain loops over slices, compiled three times (AVX-512, AVX2 + FMA and
/// the baseline) and chosen at run time. Reductions keep 16 partial sums so the compiler
/// may vectorise them without reordering a single sum.
mod simd {
    /// Generates a public function that runs `$body` compiled for the best instruction set
    /// this CPU has.
    macro_rules! multiversion {
        ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
            $(#[$doc])*
            pub(super) fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn v4($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    fn v3($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has the features `v4` was compiled for.
                        return unsafe { v4($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has the features `v3` was compiled for.
                        return unsafe { v3($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    multiversion!(
        /// `y = x · Φ(x)`.
        fn gelu(x: &[f32], y: &mut [f32]) => gelu_body
    );
    multiversion!(
        /// `dx = g · (Φ(x) + x · φ(x))`.
        fn gelu_grad(x: &[f32], g: &[f32], dx: &mut [f32]) => gelu_grad_body
    );
    multiversion!(
        /// One row of layer norm.
        fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) => ln_body
    );
    multiversion!(
        /// One row of layer norm's input gradient, adding `g · x̂` into `dw`.
        fn layer_norm_grad_row(
            x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]
        ) => ln_grad_body
    );
    multiversion!(
        /// One row of `softmax(s · scale + (mask - 1) · 1e9)`.
        fn masked_softmax_row(s: &[f32], mask: &[f32], scale: f32, y: &mut [f32]) => softmax_body
    );
    multiversion!(
        /// One row of `scale · y · (g - Σ g·y)`.
        fn softmax_grad_row(y: &[f32], g: &[f32], scale: f32, ds: &mut [f32]) => softmax_grad_body
    );

    const LANES: usize = 16;

    /// `eˣ` for `x ≤ 88`: Cephes' polynomial on `x - n·ln 2`, then `2ⁿ` from the exponent
    /// bits (about 1 ulp); 0 below -87.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        let xc = x.clamp(-87.0, 88.0);
        let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
        let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x < -87.0 { 0.0 } else { e * two_n }
    }

    /// `erf(x)` by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), the form
    /// PyTorch's vectorised CPU `erf` uses.
    #[inline(always)]
    pub(super) fn erf(x: f32) -> f32 {
        let a = x.abs();
        let t = 1.0 / (0.327_591_1 * a + 1.0);
        let mut r = 1.061_405_4_f32;
        r = r * t - 1.453_152;
        r = r * t + 1.421_413_7;
        r = r * t - 0.284_496_74;
        r = r * t + 0.254_829_6;
        let v = 1.0 - r * t * exp(-a * a);
        v.copysign(x)
    }

    #[inline(always)]
    fn gelu_body(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }

    #[inline(always)]
    fn gelu_grad_body(x: &[f32], g: &[f32], dx: &mut [f32]) {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    }

    /// `Σ f(i)` over `0..n` in 16 lanes.
    #[inline(always)]
    fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
        let mut acc = [0f32; LANES];
        let whole = n - n % LANES;
        for base in (0..whole).step_by(LANES) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += f(base + l);
            }
        }
        let mut total = acc.iter().sum::<f32>();
        for i in whole..n {
            total += f(i);
        }
        total
    }

    /// The largest value, in 16 lanes.
    #[inline(always)]
    fn lane_max(v: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = v.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = a.max(x);
            }
        }
        chunks
            .remainder()
            .iter()
            .chain(acc.iter())
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }

    /// Mean and `1/√(var + eps)` of a row.
    #[inline(always)]
    fn moments(x: &[f32], eps: f32) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = lane_sum(x.len(), |i| x[i]) / n;
        let var = lane_sum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
        (mean, 1.0 / (var + eps).sqrt())
    }

    #[inline(always)]
    fn ln_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let (mean, rstd) = moments(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
    }

    #[inline(always)]
    fn ln_grad_body(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
        let n = x.len() as f32;
        let (mean, rstd) = moments(x, eps);
        // dx = rstd · (g·w - mean(g·w) - x̂ · mean(g·w·x̂))
        let mean_gw = lane_sum(x.len(), |i| g[i] * w[i]) / n;
        let mean_gwx = lane_sum(x.len(), |i| g[i] * w[i] * (x[i] - mean) * rstd) / n;
        for i in 0..x.len() {
            let xhat = (x[i] - mean) * rstd;
            dx[i] = rstd * (g[i] * w[i] - mean_gw - xhat * mean_gwx);
            dw[i] += g[i] * xhat;
        }
    }

    #[inline(always)]
    fn softmax_body(s: &[f32], mask: &[f32], scale: f32, y: &mut [f32]) {
        for ((y, &s), &m) in y.iter_mut().zip(s).zip(mask) {
            *y = s * scale + (m - 1.0) * 1e9;
        }
        let max = lane_max(y);
        for y in y.iter_mut() {
            *y = exp(*y - max);
        }
        let inv = 1.0 / lane_sum(y.len(), |i| y[i]);
        for y in y.iter_mut() {
            *y *= inv;
        }
    }

    #[inline(always)]
    fn softmax_grad_body(y: &[f32], g: &[f32], scale: f32, ds: &mut [f32]) {
        let dot = lane_sum(y.len(), |i| y[i] * g[i]);
        for ((d, &y), &g) in ds.iter_mut().zip(y).zip(g) {
            *d = scale * y * (g - dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64, spread: f32) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * spread).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// erf in f64 by its Taylor series (exact to f64 rounding for |x| < 6).
    fn erf64(x: f64) -> f64 {
        let (mut sum, mut term, mut k) = (0.0, x, 0.0);
        while k < 200.0 {
            sum += term / (2.0 * k + 1.0);
            k += 1.0;
            term *= -x * x / k;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_and_erf_agree_with_exact_values() {
        for i in -1700..=1700 {
            let x = i as f32 * 0.05;
            let (e, want) = (simd::exp(x), f64::from(x).exp());
            assert!(
                (f64::from(e) - want).abs() <= want * 3e-7,
                "exp({x}) = {e}, want {want}"
            );
        }
        assert_eq!(simd::exp(-100.0), 0.0);
        for i in -500..=500 {
            let x = i as f32 * 0.01;
            let (e, want) = (simd::erf(x), erf64(f64::from(x)));
            assert!(
                (f64::from(e) - want).abs() < 3e-7,
                "erf({x}) = {e}, want {want}"
            );
        }
    }

    /// Every fused op and its gradients against candle's ops on the same values, with
    /// enough rows to be split across threads.
    #[test]
    fn fused_ops_match_candle_forward_and_backward() {
        let x = Var::from_tensor(&random(&[3, 70, 96], 1, 2.0)).unwrap();
        let w = Var::from_tensor(&(random(&[96], 2, 0.2) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&random(&[96], 3, 0.2)).unwrap();
        let up = random(&[3, 70, 96], 4, 1.0);
        // Forward within `tol`; each gradient within `tol` of its largest value.
        let check = |what: &str, fused: Tensor, plain: Tensor, tol: f32| {
            let diff = max_abs(&(&fused - &plain).unwrap());
            assert!(diff < tol, "{what}: forward differs by {diff}");
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                match (gf.get(v.as_tensor()), gp.get(v.as_tensor())) {
                    (Some(f), Some(p)) => {
                        let diff = max_abs(&(f - p).unwrap());
                        let scale = max_abs(p).max(1.0);
                        assert!(diff <= tol * scale, "{what}: d{name} differs by {diff}");
                    }
                    (None, None) => {}
                    (f, p) => panic!(
                        "{what}: d{name} fused {} plain {}",
                        f.is_some(),
                        p.is_some()
                    ),
                }
            }
        };
        check("gelu", gelu_erf(&x).unwrap(), x.gelu_erf().unwrap(), 1e-5);
        // A linear layer from 96 to 96 values, on a frozen and on a trained weight.
        let rows = x.reshape((210, 96)).unwrap();
        let frozen = random(&[96, 96], 5, 0.1);
        let trained = Var::from_tensor(&frozen).unwrap();
        for weight in [&frozen, trained.as_tensor()] {
            let plain = rows
                .matmul(&weight.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            check(
                "linear",
                linear(&rows, weight, Some(&b))
                    .unwrap()
                    .reshape((3, 70, 96))
                    .unwrap(),
                plain.reshape((3, 70, 96)).unwrap(),
                1e-5,
            );
            let fused = linear(&rows, weight, None).unwrap();
            let plain = rows.matmul(&weight.t().unwrap()).unwrap();
            let up = random(&[210, 96], 9, 1.0);
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            match (gf.get(&trained), gp.get(&trained)) {
                (Some(f), Some(p)) => {
                    let diff = max_abs(&(f - p).unwrap());
                    assert!(
                        diff < 1e-5 * max_abs(p).max(1.0),
                        "linear: dW differs by {diff}"
                    );
                }
                (f, p) => assert!(f.is_none() && p.is_none(), "linear: dW on one side only"),
            }
        }
        check(
            "layer norm",
            layer_norm(&x, &w, &b, 1e-12).unwrap(),
            layer_norm_ops(&x, &w, &b, 1e-12).unwrap(),
            1e-4,
        );
        // Batched products of [3, 70, 96] by [3, 96, 70] and by the transpose of
        // [3, 70, 96]: both sides' gradients.
        let y = Var::from_tensor(&random(&[3, 96, 70], 6, 1.0)).unwrap();
        let z = Var::from_tensor(&random(&[3, 70, 96], 7, 1.0)).unwrap();
        for (name, fused, plain) in [
            ("matmul", matmul(&x, &y).unwrap(), x.matmul(&y).unwrap()),
            (
                "matmul_t",
                matmul_t(&x, &z).unwrap(),
                x.matmul(&z.t().unwrap()).unwrap(),
            ),
        ] {
            let diff = max_abs(&(&fused - &plain).unwrap());
            assert!(diff < 1e-4, "{name}: forward differs by {diff}");
            let up = random(&[3, 70, 70], 8, 1.0);
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &y, &z] {
                if let Some(p) = gp.get(v.as_tensor()) {
                    let f = gf.get(v.as_tensor()).expect("fused gradient");
                    let diff = max_abs(&(f - p).unwrap());
                    assert!(
                        diff < 1e-4 * max_abs(p).max(1.0),
                        "{name}: gradient differs by {diff}"
                    );
                }
            }
        }
        // Scores [3, 2, 35, 96] viewed from x; two batch rows have masked keys.
        let s = x.reshape((3, 2, 35, 96)).unwrap();
        let mut mask = vec![1f32; 3 * 96];
        mask[86..96].fill(0.0);
        mask[2 * 96 + 50..].fill(0.0);
        let mask = Tensor::from_vec(mask, (3, 96), &Device::Cpu).unwrap();
        let bias = ((&mask - 1.0).unwrap() * 1e9)
            .unwrap()
            .reshape((3, 1, 1, 96))
            .unwrap();
        let plain = candle_nn::ops::softmax(
            &(&s * 0.125).unwrap().broadcast_add(&bias).unwrap(),
            D::Minus1,
        );
        check(
            "attention softmax",
            attention_softmax(&s, &mask, 0.125)
                .unwrap()
                .reshape((3, 70, 96))
                .unwrap(),
            plain.unwrap().reshape((3, 70, 96)).unwrap(),
            1e-6,
        );
    }
}
