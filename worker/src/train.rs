//! The training loop: AdamW, warm-up then linear decay, gradient accumulation, periodic
//! evaluation and the best checkpoint kept. Deterministic on CPU for a given seed.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{D, DType, Tensor, Var};
use delta_client::jobs::Progress;

use crate::bert::{BaseWeights, classify};
use crate::data::{Encoded, batch};
use crate::methods::Trainable;
use crate::mounts::Mounts;
use crate::rng::Rng;

/// Evaluation results.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Fraction of examples whose predicted label is the gold one.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Predicted label index per example, in input order.
    pub predictions: Vec<usize>,
    /// The head's logits per example, in input order.
    pub logits: Vec<Vec<f32>>,
}

/// Runs the model over examples in batches (no graph is kept) and scores them; examples
/// without a known label count as wrong and add no loss.
pub fn evaluate(m: &Mounts<'_>, data: &[Encoded], batch_size: usize) -> Result<Evaluation> {
    let m = m.detached();
    let cfg = &m.base().config;
    let device = m.base().device.clone();
    let (mut correct, mut loss_sum, mut labelled) = (0usize, 0f64, 0usize);
    let mut predictions = Vec::with_capacity(data.len());
    let mut all_logits = Vec::with_capacity(data.len());
    for chunk in data.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let logits = classify(cfg, &m, &batch(&refs, &device)?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        all_logits.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        for (e, row) in chunk.iter().zip(&logp) {
            let pred = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i)
                .unwrap_or(0);
            predictions.push(pred);
            if let Some(gold) = e.label {
                labelled += 1;
                loss_sum -= f64::from(row[gold]);
                correct += usize::from(pred == gold);
            }
        }
    }
    Ok(Evaluation {
        accuracy: correct as f64 / data.len().max(1) as f64,
        loss: loss_sum / labelled.max(1) as f64,
        predictions,
        logits: all_logits,
    })
}

/// What a run produced besides the trained tensors.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Final metrics of the kept checkpoint (`eval_accuracy`, `eval_loss`, `train_loss`,
    /// `best_step`, `steps`, …).
    pub metrics: BTreeMap<String, f64>,
    /// Every progress event, in order.
    pub history: Vec<Progress>,
}

/// AdamW over name-sorted vars. On the CPU the update runs in plain Rust over the values
/// (one pass, no intermediate tensors: candle's tensor-op version allocates eight tensors
/// per parameter per step, which made full fine-tuning steps several times slower);
/// elsewhere it uses tensor ops.
struct AdamW {
    state: Vec<Moments>,
    decay: Vec<bool>,
    t: i32,
}

enum Moments {
    Cpu(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[(String, Var)]) -> Result<Self> {
        let mut state = Vec::new();
        let mut decay = Vec::new();
        for (name, var) in vars {
            let t = var.as_tensor();
            state.push(if t.device().is_cpu() && t.dtype() == DType::F32 {
                Moments::Cpu(vec![0.0; t.elem_count()], vec![0.0; t.elem_count()])
            } else {
                Moments::Device(t.zeros_like()?, t.zeros_like()?)
            });
            // Matrices decay; vectors (biases, norms, heads' biases) and prompts do not.
            decay.push(var.rank() >= 2 && !name.starts_with("prompt."));
        }
        Ok(Self { state, decay, t: 0 })
    }

    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &[Option<Tensor>],
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let shrink = if self.decay[i] { 1.0 - lr * wd } else { 1.0 };
            match &mut self.state[i] {
                Moments::Cpu(m, v) => {
                    let g = g.flatten_all()?.to_vec1::<f32>()?;
                    let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    let (b1, b2) = (Self::B1 as f32, Self::B2 as f32);
                    let (c1, c2, lr, eps, shrink) = (
                        c1 as f32,
                        c2 as f32,
                        lr as f32,
                        Self::EPS as f32,
                        shrink as f32,
                    );
                    for j in 0..p.len() {
                        m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                        v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                        let update = (m[j] / c1) / ((v[j] / c2).sqrt() + eps);
                        p[j] = p[j] * shrink - lr * update;
                    }
                    var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
                }
                Moments::Device(m, v) => {
                    let m2 = ((&*m * Self::B1)? + (g * (1.0 - Self::B1))?)?;
                    let v2 = ((&*v * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
                    let update = ((&m2 / c1)? / ((&v2 / c2)?.sqrt()? + Self::EPS)?)?;
                    let p = (var.as_tensor() * shrink)?;
                    var.set(&(p - (update * lr)?)?)?;
                    *m = m2;
                    *v = v2;
                }
            }
        }
        Ok(())
    }
}

/// The learning rate at `step` (1-based): linear warm-up over `warmup` steps, then linear
/// decay that would reach 0 one step after the last.
pub fn learning_rate(peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let rest = total.saturating_sub(warmup).max(1);
    peak * ((total + 1).saturating_sub(step) as f64 / rest as f64).clamp(0.0, 1.0)
}

/// Trains `t` mounted on `frozen` (the base, possibly with parent deltas). Calls
/// `progress` after every step (with evaluation results every `eval_every` steps and at
/// the end); an error from it stops training. With evaluation data the best checkpoint
/// (highest accuracy, then lowest loss) is restored at the end.
pub fn train(
    t: &Trainable,
    frozen: &Mounts<'_>,
    train: &[Encoded],
    eval: Option<&[Encoded]>,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Outcome> {
    let spec = &t.spec;
    if train.is_empty() {
        bail!("the training set is empty");
    }
    if train.iter().any(|e| e.label.is_none()) {
        bail!("every training example needs a label");
    }
    let base: &BaseWeights = frozen.base();
    let device = base.device.clone();
    let per_step = spec.batch_size * spec.grad_accum;
    let steps_per_epoch = train.len().div_ceil(per_step);
    let total = spec
        .max_steps
        .unwrap_or(steps_per_epoch * spec.epochs)
        .max(1);
    let warmup = (spec.warmup * total as f64).ceil() as usize;
    let peak = spec.learning_rate();
    let mut opt = AdamW::new(&t.vars)?;
    let mut rng = Rng::new(spec.seed ^ 0xDA7A);
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0usize;
    let mut outcome = Outcome::default();
    let mut best: Option<(f64, f64, usize, Vec<Tensor>)> = None;
    let dropout = Some(crate::mounts::Dropout::new(
        &base.config,
        spec.dropout,
        spec.seed,
    ))
    .filter(crate::mounts::Dropout::active);
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    for step in 1..=total {
        let lr = learning_rate(peak, step, total, warmup);
        let mut grads: Vec<Option<Tensor>> = vec![None; t.vars.len()];
        let mut loss_sum = 0f64;
        for _ in 0..spec.grad_accum {
            let mut idx = Vec::with_capacity(spec.batch_size);
            while idx.len() < spec.batch_size {
                if cursor >= order.len() {
                    order = (0..train.len()).collect();
                    rng.shuffle(&mut order);
                    cursor = 0;
                }
                idx.push(order[cursor]);
                cursor += 1;
            }
            let items: Vec<&Encoded> = idx.iter().map(|&i| &train[i]).collect();
            let labels: Vec<u32> = items.iter().map(|e| e.label.unwrap_or(0) as u32).collect();
            let labels = Tensor::new(labels.as_slice(), &device)?;
            let mut m = t.mount(frozen)?;
            m.dropout = dropout.clone();
            let logits = classify(&base.config, &m, &batch(&items, &device)?)?;
            let mut loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if spec.l1 > 0.0
                && let Some(l1) = t.l1()?
            {
                loss = (loss + (l1 * spec.l1)?)?;
            }
            let loss = (loss / spec.grad_accum as f64)?;
            let store = loss.backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(&t.vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        None => g.clone(),
                        Some(acc) => (acc + g)?,
                    });
                }
            }
        }
        opt.step(&t.vars, &grads, lr, spec.weight_decay)?;
        last_loss = loss_sum / spec.grad_accum as f64;
        if !last_loss.is_finite() {
            bail!("training diverged: loss is {last_loss} at step {step} (try a lower --lr)");
        }
        let mut p = Progress {
            step,
            total_steps: total,
            loss: Some(last_loss),
            steps_per_sec: Some(step as f64 / started.elapsed().as_secs_f64().max(1e-9)),
            ..Progress::default()
        };
        if let Some(eval) = eval
            && (step % spec.eval_every == 0 || step == total)
        {
            let e = evaluate(&t.mount(frozen)?, eval, spec.batch_size)?;
            p.eval_accuracy = Some(e.accuracy);
            p.eval_loss = Some(e.loss);
            let better = match &best {
                None => true,
                Some((acc, loss, _, _)) => {
                    e.accuracy > *acc || (e.accuracy == *acc && e.loss < *loss)
                }
            };
            if better {
                best = Some((e.accuracy, e.loss, step, t.snapshot()?));
            }
        }
        progress(&p)?;
        outcome.history.push(p);
    }
    outcome.metrics.insert("steps".into(), total as f64);
    outcome.metrics.insert("train_loss".into(), last_loss);
    if let Some((acc, loss, step, values)) = best {
        t.restore(&values)?;
        outcome.metrics.insert("eval_accuracy".into(), acc);
        outcome.metrics.insert("eval_loss".into(), loss);
        outcome.metrics.insert("best_step".into(), step as f64);
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(learning_rate(1.0, 1, 10, 2), 0.5);
        assert_eq!(learning_rate(1.0, 2, 10, 2), 1.0);
        assert_eq!(learning_rate(1.0, 3, 10, 2), 1.0);
        assert_eq!(learning_rate(1.0, 7, 10, 2), 0.5);
        assert_eq!(learning_rate(1.0, 10, 10, 2), 0.125);
        assert_eq!(learning_rate(1.0, 1, 1, 0), 1.0);
    }
}
