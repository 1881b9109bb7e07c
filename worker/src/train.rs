//! The training loop: AdamW, warm-up then linear decay, gradient accumulation, periodic
//! evaluation and the best checkpoint kept. Deterministic on CPU for a given seed.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Tensor, Var};
use delta_client::jobs::Progress;

use crate::bert::BaseWeights;
use crate::data::{Encoded, batch};
use crate::methods::Trainable;
use crate::mounts::Mounts;
use crate::mounts::classify;
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

/// The index of the largest score (the first of equal ones; 0 for none).
pub fn argmax(scores: &[f32]) -> usize {
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// Class probabilities from logits: the softmax in f64 from the f32 logits, as a reader
/// would compute it.
pub fn probabilities(logits: &[f32]) -> Vec<f64> {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - top).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|x| x / sum).collect()
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
            let pred = argmax(row);
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

/// One training run between steps: its data order, schedule, optimiser, dropout
/// generator, accumulated gradients and best checkpoint. [`train`] drives one session
/// alone; [`co_train`] drives several in shared batches. Either way a session sees the
/// same examples in the same order and takes the same steps.
pub struct Session<'t, 'a> {
    t: &'t Trainable,
    frozen: &'t Mounts<'a>,
    train: &'t [Encoded],
    eval: Option<&'t [Encoded]>,
    total: usize,
    warmup: usize,
    peak: f64,
    opt: AdamW,
    rng: Rng,
    order: Vec<usize>,
    cursor: usize,
    dropout: Option<crate::mounts::Dropout>,
    best: Option<(f64, f64, usize, Vec<Tensor>)>,
    started: Instant,
    /// Steps taken.
    step: usize,
    /// Micro-batches into the current step.
    micro: usize,
    grads: Vec<Option<Tensor>>,
    loss_sum: f64,
    last_loss: f64,
    outcome: Outcome,
}

impl std::fmt::Debug for Session<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("method", &self.t.method())
            .field("step", &self.step)
            .field("total", &self.total)
            .finish()
    }
}

impl<'t, 'a> Session<'t, 'a> {
    /// A run of `t` mounted on `frozen` (the base, possibly with parent deltas).
    pub fn new(
        t: &'t Trainable,
        frozen: &'t Mounts<'a>,
        train: &'t [Encoded],
        eval: Option<&'t [Encoded]>,
    ) -> Result<Self> {
        let spec = &t.spec;
        if train.is_empty() {
            bail!("the training set is empty");
        }
        if train.iter().any(|e| e.label.is_none()) {
            bail!("every training example needs a label");
        }
        let base: &BaseWeights = frozen.base();
        let per_step = spec.batch_size * spec.grad_accum;
        let steps_per_epoch = train.len().div_ceil(per_step);
        let total = spec
            .max_steps
            .unwrap_or(steps_per_epoch * spec.epochs)
            .max(1);
        Ok(Self {
            t,
            frozen,
            train,
            eval,
            total,
            warmup: (spec.warmup * total as f64).ceil() as usize,
            peak: spec.learning_rate(),
            opt: AdamW::new(&t.vars)?,
            rng: Rng::new(spec.seed ^ 0xDA7A),
            order: Vec::new(),
            cursor: 0,
            dropout: Some(crate::mounts::Dropout::new(
                &base.config,
                spec.dropout,
                spec.seed,
            ))
            .filter(crate::mounts::Dropout::active),
            best: None,
            started: Instant::now(),
            step: 0,
            micro: 0,
            grads: vec![None; t.vars.len()],
            loss_sum: 0.0,
            last_loss: f64::NAN,
            outcome: Outcome::default(),
        })
    }

    /// Whether every step has been taken.
    pub fn done(&self) -> bool {
        self.step >= self.total
    }

    /// The next micro-batch's examples (reshuffled, by the run's own seed, each epoch).
    pub fn next_items(&mut self) -> Vec<&'t Encoded> {
        let n = self.t.spec.batch_size;
        let mut items = Vec::with_capacity(n);
        while items.len() < n {
            if self.cursor >= self.order.len() {
                self.order = (0..self.train.len()).collect();
                self.rng.shuffle(&mut self.order);
                self.cursor = 0;
            }
            items.push(&self.train[self.order[self.cursor]]);
            self.cursor += 1;
        }
        items
    }

    /// The trainable delta mounted for a training forward pass (with its dropout).
    pub fn mounts(&self) -> Result<Mounts<'a>> {
        let mut m = self.t.mount(self.frozen)?;
        m.dropout = self.dropout.clone();
        Ok(m)
    }

    /// The loss to differentiate for `items`' logits (scaled for accumulation, with the
    /// L1 penalty) and the plain cross-entropy.
    pub fn loss(&self, logits: &Tensor, items: &[&Encoded]) -> Result<(Tensor, f64)> {
        let spec = &self.t.spec;
        let labels: Vec<u32> = items.iter().map(|e| e.label.unwrap_or(0) as u32).collect();
        let labels = Tensor::new(labels.as_slice(), logits.device())?;
        let mut loss = candle_nn::loss::cross_entropy(logits, &labels)?;
        let plain = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        if spec.l1 > 0.0
            && let Some(l1) = self.t.l1()?
        {
            loss = (loss + (l1 * spec.l1)?)?;
        }
        Ok(((loss / spec.grad_accum as f64)?, plain))
    }

    /// Adds this run's gradients from a backward pass; true when the step's micro-batches
    /// are all in (call [`Session::step`] then).
    pub fn accumulate(
        &mut self,
        store: &candle_core::backprop::GradStore,
        loss: f64,
    ) -> Result<bool> {
        for (slot, (_, var)) in self.grads.iter_mut().zip(&self.t.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        self.loss_sum += loss;
        self.micro += 1;
        Ok(self.micro >= self.t.spec.grad_accum)
    }

    /// Takes the optimiser step, evaluates when due, and reports progress (an error from
    /// `progress` stops the run).
    pub fn step(&mut self, progress: &mut dyn FnMut(&Progress) -> Result<()>) -> Result<()> {
        let spec = &self.t.spec;
        self.step += 1;
        let step = self.step;
        let lr = learning_rate(self.peak, step, self.total, self.warmup);
        let grads = std::mem::replace(&mut self.grads, vec![None; self.t.vars.len()]);
        self.opt.step(&self.t.vars, &grads, lr, spec.weight_decay)?;
        self.last_loss = self.loss_sum / spec.grad_accum as f64;
        self.loss_sum = 0.0;
        self.micro = 0;
        if !self.last_loss.is_finite() {
            bail!(
                "training diverged: loss is {} at step {step} (try a lower --lr)",
                self.last_loss
            );
        }
        let mut p = Progress {
            step,
            total_steps: self.total,
            loss: Some(self.last_loss),
            steps_per_sec: Some(step as f64 / self.started.elapsed().as_secs_f64().max(1e-9)),
            ..Progress::default()
        };
        if let Some(eval) = self.eval
            && (step.is_multiple_of(spec.eval_every) || step == self.total)
        {
            let e = evaluate(&self.t.mount(self.frozen)?, eval, spec.batch_size)?;
            p.eval_accuracy = Some(e.accuracy);
            p.eval_loss = Some(e.loss);
            let better = match &self.best {
                None => true,
                Some((acc, loss, _, _)) => {
                    e.accuracy > *acc || (e.accuracy == *acc && e.loss < *loss)
                }
            };
            if better {
                self.best = Some((e.accuracy, e.loss, step, self.t.snapshot()?));
            }
        }
        progress(&p)?;
        self.outcome.history.push(p);
        Ok(())
    }

    /// Ends the run: the best checkpoint (if evaluated) restored, the final metrics.
    pub fn finish(mut self) -> Result<Outcome> {
        self.outcome
            .metrics
            .insert("steps".into(), self.total as f64);
        self.outcome
            .metrics
            .insert("train_loss".into(), self.last_loss);
        if let Some((acc, loss, step, values)) = self.best.take() {
            self.t.restore(&values)?;
            self.outcome.metrics.insert("eval_accuracy".into(), acc);
            self.outcome.metrics.insert("eval_loss".into(), loss);
            self.outcome.metrics.insert("best_step".into(), step as f64);
        }
        Ok(self.outcome)
    }
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
    let mut s = Session::new(t, frozen, train, eval)?;
    let base = frozen.base();
    while !s.done() {
        let items = s.next_items();
        let m = s.mounts()?;
        let logits = classify(&base.config, &m, &batch(&items, &base.device)?)?;
        let (loss, plain) = s.loss(&logits, &items)?;
        let store = loss.backward()?;
        if s.accumulate(&store, plain)? {
            s.step(progress)?;
        }
    }
    s.finish()
}

/// Trains several runs on one base in shared batches: each round, every unfinished run
/// contributes its next micro-batch as its own rows of one mixed batch (its trainable
/// delta acting on its rows only, see [`crate::mixed`]); one forward and one backward
/// pass serve them all, and each run takes its own optimiser step on its own schedule.
/// Rows never interact, so each run's gradients are its own, and a run ends (or fails:
/// a diverged loss, an error from its `progress`, such as a lost lease) without
/// disturbing the others. Every run's delta must share the base ([`crate::mixed::shares_base`]).
///
/// Returns each run's outcome, in order; `progress` gets the run's index.
pub fn co_train(
    sessions: Vec<Session<'_, '_>>,
    progress: &mut dyn FnMut(usize, &Progress) -> Result<()>,
) -> Vec<Result<Outcome>> {
    let n = sessions.len();
    let mut results: Vec<Option<Result<Outcome>>> = (0..n).map(|_| None).collect();
    let mut live: Vec<Option<Session<'_, '_>>> = sessions.into_iter().map(Some).collect();
    loop {
        // Finished runs leave the batch.
        for i in 0..n {
            if live[i].as_ref().is_some_and(Session::done)
                && let Some(s) = live[i].take()
            {
                results[i] = Some(s.finish());
            }
        }
        let running: Vec<usize> = (0..n).filter(|&i| live[i].is_some()).collect();
        if running.is_empty() {
            break;
        }
        if let Err(e) = co_round(&mut live, &running, progress, &mut results) {
            // A failure of the shared pass fails every run in it.
            let msg = format!("{e:#}");
            for &i in &running {
                if live[i].take().is_some() {
                    results[i] = Some(Err(anyhow::anyhow!("{msg}")));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("the run never finished"))))
        .collect()
}

/// One micro-batch of every running session in one forward and backward pass.
fn co_round(
    live: &mut [Option<Session<'_, '_>>],
    running: &[usize],
    progress: &mut dyn FnMut(usize, &Progress) -> Result<()>,
    results: &mut [Option<Result<Outcome>>],
) -> Result<()> {
    let mut items = Vec::with_capacity(running.len());
    let mut mounts = Vec::with_capacity(running.len());
    for &i in running {
        let s = live[i].as_mut().context("a running session")?;
        items.push(s.next_items());
        mounts.push(s.mounts()?);
    }
    let base = mounts[0].base();
    let parts: Vec<(usize, &Mounts<'_>)> = items.iter().map(Vec::len).zip(&mounts).collect();
    let rows: Vec<&Encoded> = items.iter().flatten().copied().collect();
    let batch = batch(&rows, &base.device)?;
    let mixed = crate::mixed::MixedMounts::new(&parts)?.with_input_lengths(&batch)?;
    let logits = crate::mixed::logits(&base.config, &mixed, &batch)?;
    let mut total: Option<Tensor> = None;
    let mut plain = Vec::with_capacity(running.len());
    for (k, &i) in running.iter().enumerate() {
        let s = live[i].as_ref().context("a running session")?;
        let (loss, p) = s.loss(&logits[k], &items[k])?;
        plain.push(p);
        total = Some(match total {
            None => loss,
            Some(t) => (t + loss)?,
        });
    }
    let store = total.context("no running session")?.backward()?;
    for (k, &i) in running.iter().enumerate() {
        let Some(s) = live[i].as_mut() else { continue };
        let stepped = s.accumulate(&store, plain[k]).and_then(|full| {
            if full {
                s.step(&mut |p| progress(i, p))
            } else {
                Ok(())
            }
        });
        if let Err(e) = stepped {
            live[i] = None;
            results[i] = Some(Err(e));
        }
    }
    Ok(())
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
