//! Tensor arithmetic the client needs: dtype conversion, the LoRA product accumulated in
//! place (`W += s·B·A` through an SGEMM), and a truncated SVD for re-factorising merged
//! deltas. Arithmetic is f32 (f64 inside the SVD); storage keeps the tensor's dtype.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// Views little-endian bytes as `u16`s when they are aligned (the common case: safetensors
/// writers align tensors to their element size), for the vectorised half conversions.
fn as_u16(bytes: &[u8]) -> Option<&[u16]> {
    // SAFETY: every bit pattern is a valid u16; `align_to` only returns the aligned middle.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    (cfg!(target_endian = "little") && pre.is_empty() && post.is_empty()).then_some(mid)
}

fn as_u16_mut(bytes: &mut [u8]) -> Option<&mut [u16]> {
    // SAFETY: as in `as_u16`.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<u16>() };
    (cfg!(target_endian = "little") && pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Views little-endian bytes as `f32`s when aligned, to work on them in place.
pub fn as_f32_mut(bytes: &mut [u8]) -> Option<&mut [f32]> {
    // SAFETY: every bit pattern is a valid f32; `align_to_mut` only returns the aligned
    // middle, and the bytes are little-endian like the target.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<f32>() };
    (cfg!(target_endian = "little") && pre.is_empty() && post.is_empty()).then_some(mid)
}

/// The index of the first NaN or ±Inf in a little-endian tensor of `dtype` (floats in
/// their own width: a large F64 is not "infinite" just because f32 cannot hold it), or
/// `None`. Integer and boolean tensors hold neither.
pub fn first_nonfinite(dtype: &str, bytes: &[u8]) -> Option<usize> {
    match dtype {
        "F64" => bytes.chunks_exact(8).position(|c| {
            !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
        }),
        "F32" => bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        "F16" => bytes
            .chunks_exact(2)
            .position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
        "BF16" => bytes
            .chunks_exact(2)
            .position(|c| !bf16::from_le_bytes([c[0], c[1]]).is_finite()),
        // FP8 E4M3 has no infinity and NaN is 0x7f/0xff; E5M2 is IEEE-like (exponent all
        // ones).
        "F8_E4M3" => bytes.iter().position(|b| b & 0x7f == 0x7f),
        "F8_E5M2" => bytes.iter().position(|b| b & 0x7c == 0x7c),
        _ => None,
    }
}

/// Decodes little-endian tensor bytes into f32.
pub fn to_f32(dtype: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    if let (Some(bits), "F16" | "BF16") = (as_u16(bytes), dtype) {
        let mut out = vec![0f32; bits.len()];
        if dtype == "F16" {
            bits.reinterpret_cast::<f16>()
                .convert_to_f32_slice(&mut out);
        } else {
            bits.reinterpret_cast::<bf16>()
                .convert_to_f32_slice(&mut out);
        }
        return Ok(out);
    }
    Ok(match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "F64" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => return Err(Error::Invalid(format!("dtype {other} is not a float type"))),
    })
}

/// Decodes little-endian I64 bytes.
pub fn to_i64(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encodes f32 values into `out` in `dtype` (round to nearest even for f16/bf16).
pub fn from_f32(dtype: &str, values: &[f32], out: &mut [u8]) -> Result<()> {
    if matches!(dtype, "F16" | "BF16")
        && out.len() == values.len() * 2
        && let Some(bits) = as_u16_mut(out)
    {
        if dtype == "F16" {
            bits.reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(values);
        } else {
            bits.reinterpret_cast_mut::<bf16>()
                .convert_from_f32_slice(values);
        }
        return Ok(());
    }
    match dtype {
        "F32" => out
            .chunks_exact_mut(4)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        "F16" => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
        "BF16" => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        "F64" => out
            .chunks_exact_mut(8)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&(*v as f64).to_le_bytes())),
        other => return Err(Error::Invalid(format!("dtype {other} is not a float type"))),
    }
    Ok(())
}

/// Views f32 storage as bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The dimensions of a LoRA product: `B` is `[out, r]`, `A` is `[r, inp]`, and the weight is
/// `[out, inp]`, or `[inp, out]` when `transposed` (PEFT's `fan_in_fan_out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Rank.
    pub r: usize,
    /// The weight is stored `[inp, out]`.
    pub transposed: bool,
}

/// `w += alpha · B · A` (or its transpose, see [`LoraShape`]).
pub fn add_lora(w: &mut [f32], b: &[f32], a: &[f32], shape: LoraShape, alpha: f32) -> Result<()> {
    let LoraShape {
        out,
        inp,
        r,
        transposed,
    } = shape;
    if w.len() != out * inp || b.len() != out * r || a.len() != r * inp {
        return Err(Error::Invalid(format!(
            "LoRA product shapes disagree: W {} values, B {} ([{out}, {r}]), A {} ([{r}, {inp}])",
            w.len(),
            b.len(),
            a.len()
        )));
    }
    let (rsc, csc) = if transposed {
        (1, out as isize)
    } else {
        (inp as isize, 1)
    };
    // SAFETY: the lengths are checked above against the dimensions, and the strides
    // describe row-major [out, r], [r, inp] and [out, inp] (or its transpose) layouts that
    // stay inside those lengths; `w` does not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            out,
            r,
            inp,
            alpha,
            b.as_ptr(),
            r as isize,
            1,
            a.as_ptr(),
            inp as isize,
            1,
            1.0,
            w.as_mut_ptr(),
            rsc,
            csc,
        );
    }
    Ok(())
}

/// The dense `s · B · A` (`[out, inp]`).
pub fn lora_dense(
    b: &[f32],
    a: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let mut w = vec![0.0; out * inp];
    add_lora(
        &mut w,
        b,
        a,
        LoraShape {
            out,
            inp,
            r,
            transposed: false,
        },
        scale,
    )?;
    Ok(w)
}

/// A rank-`k` factorisation `m ≈ B·A` of a row-major `[rows, cols]` matrix, by randomized
/// subspace iteration with a Jacobi eigen-solve of the small Gram matrix (f64). Returns
/// `(B [rows, k], A [k, cols], relative Frobenius error of the truncation)`.
pub fn truncated_svd(
    m: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, f64) {
    let k = k.min(rows).min(cols).max(1);
    let p = (k + 8).min(rows.min(cols));
    let mf: Vec<f64> = m.iter().map(|&v| v as f64).collect();
    // Y = M·Ω with Ω [cols, p] seeded Gaussian-ish; then power iterations.
    let mut rng = SplitMix(seed);
    let omega: Vec<f64> = (0..cols * p).map(|_| rng.normal()).collect();
    let mut q = matmul(&mf, &omega, rows, cols, p);
    orthonormalize(&mut q, rows, p);
    for _ in 0..3 {
        let z = matmul_tn(&mf, &q, rows, cols, p); // Mᵀ·Q [cols, p]
        let mut z = z;
        orthonormalize(&mut z, cols, p);
        q = matmul(&mf, &z, rows, cols, p);
        orthonormalize(&mut q, rows, p);
    }
    // Small = Qᵀ·M [p, cols]; its SVD from the eigen-decomposition of Small·Smallᵀ.
    let small = matmul_tn(&q, &mf, rows, p, cols); // [p, cols]
    let mut gram = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            gram[i * p + j] = (0..cols)
                .map(|c| small[i * cols + c] * small[j * cols + c])
                .sum();
        }
    }
    let (evals, evecs) = jacobi_eigen(&mut gram, p);
    let mut order: Vec<usize> = (0..p).collect();
    order.sort_by(|&x, &y| evals[y].total_cmp(&evals[x]));
    // B = Q·U_k·Σ_k, A = V_kᵀ = Σ_k⁻¹·U_kᵀ·Small.
    let mut b = vec![0f32; rows * k];
    let mut a = vec![0f32; k * cols];
    for (slot, &e) in order.iter().take(k).enumerate() {
        let sigma = evals[e].max(0.0).sqrt();
        let u: Vec<f64> = (0..p).map(|i| evecs[i * p + e]).collect();
        for r in 0..rows {
            b[r * k + slot] = ((0..p).map(|i| q[r * p + i] * u[i]).sum::<f64>() * sigma) as f32;
        }
        if sigma > 0.0 {
            for c in 0..cols {
                a[slot * cols + c] =
                    ((0..p).map(|i| u[i] * small[i * cols + c]).sum::<f64>() / sigma) as f32;
            }
        }
    }
    let approx = lora_dense(&b, &a, rows, cols, k, 1.0).unwrap_or_default();
    let err: f64 = m
        .iter()
        .zip(&approx)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = m.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (b, a, if norm > 0.0 { err / norm } else { 0.0 })
}

/// `[n, k] = [n, m]·[m, k]`.
fn matmul(x: &[f64], y: &[f64], n: usize, m: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * k];
    // SAFETY: x is [n, m], y is [m, k], out is [n, k], all row-major with exact lengths.
    unsafe {
        matrixmultiply::dgemm(
            n,
            m,
            k,
            1.0,
            x.as_ptr(),
            m as isize,
            1,
            y.as_ptr(),
            k as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            k as isize,
            1,
        );
    }
    out
}

/// `[m, k] = xᵀ·y` for `x` `[n, m]`, `y` `[n, k]`.
fn matmul_tn(x: &[f64], y: &[f64], n: usize, m: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * k];
    // SAFETY: xᵀ is read with strides (1, m) from the [n, m] buffer; y is [n, k]; out [m, k].
    unsafe {
        matrixmultiply::dgemm(
            m,
            n,
            k,
            1.0,
            x.as_ptr(),
            1,
            m as isize,
            y.as_ptr(),
            k as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            k as isize,
            1,
        );
    }
    out
}

/// Modified Gram-Schmidt on the columns of a row-major `[n, p]` matrix.
fn orthonormalize(x: &mut [f64], n: usize, p: usize) {
    for j in 0..p {
        for i in 0..j {
            let dot: f64 = (0..n).map(|r| x[r * p + i] * x[r * p + j]).sum();
            for r in 0..n {
                x[r * p + j] -= dot * x[r * p + i];
            }
        }
        let norm: f64 = (0..n).map(|r| x[r * p + j].powi(2)).sum::<f64>().sqrt();
        for r in 0..n {
            x[r * p + j] = if norm > 1e-300 {
                x[r * p + j] / norm
            } else {
                0.0
            };
        }
    }
}

/// Cyclic Jacobi eigen-decomposition of a symmetric `[n, n]` matrix (destroyed). Returns
/// eigenvalues and eigenvectors (columns of a row-major `[n, n]`).
fn jacobi_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        let total: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// A small seeded generator (SplitMix64): deterministic across platforms, unlike the
/// thread RNG, so seeded merges (DARE) and factorisations are reproducible.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_round_trips() {
        let v = [1.0f32, -2.5, 0.125, 3.0e-3];
        for dt in ["F32", "F16", "BF16", "F64"] {
            let size = delta_proto::safetensors::dtype_size(dt).unwrap() as usize;
            let mut bytes = vec![0u8; v.len() * size];
            from_f32(dt, &v, &mut bytes).unwrap();
            let back = to_f32(dt, &bytes).unwrap();
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 0.01, "{dt}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn lora_product_matches_the_definition() {
        // B = [[1], [2]] ([2, 1]), A = [[3, 4, 5]] ([1, 3]): B·A = [[3, 4, 5], [6, 8, 10]].
        let (b, a) = ([1.0f32, 2.0], [3.0f32, 4.0, 5.0]);
        let mut w = vec![1.0f32; 6];
        add_lora(
            &mut w,
            &b,
            &a,
            LoraShape {
                out: 2,
                inp: 3,
                r: 1,
                transposed: false,
            },
            0.5,
        )
        .unwrap();
        assert_eq!(w, [2.5, 3.0, 3.5, 4.0, 5.0, 6.0]);
        // Transposed storage: W is [3, 2] and receives (B·A)ᵀ.
        let mut wt = vec![0.0f32; 6];
        add_lora(
            &mut wt,
            &b,
            &a,
            LoraShape {
                out: 2,
                inp: 3,
                r: 1,
                transposed: true,
            },
            1.0,
        )
        .unwrap();
        assert_eq!(wt, [3.0, 6.0, 4.0, 8.0, 5.0, 10.0]);
        assert!(
            add_lora(
                &mut w,
                &b,
                &a,
                LoraShape {
                    out: 3,
                    inp: 3,
                    r: 1,
                    transposed: false
                },
                1.0
            )
            .is_err()
        );
    }

    #[test]
    fn truncated_svd_is_exact_for_low_rank_and_reports_error_otherwise() {
        let mut rng = SplitMix(3);
        let (rows, cols, r) = (12, 9, 3);
        let b: Vec<f32> = (0..rows * r).map(|_| rng.normal() as f32).collect();
        let a: Vec<f32> = (0..r * cols).map(|_| rng.normal() as f32).collect();
        let m = lora_dense(&b, &a, rows, cols, r, 1.0).unwrap();
        let (_, _, err) = truncated_svd(&m, rows, cols, r, 1);
        assert!(err < 1e-5, "{err}");
        let (_, _, err1) = truncated_svd(&m, rows, cols, 1, 1);
        assert!(err1 > 0.05, "{err1}");
    }
}
