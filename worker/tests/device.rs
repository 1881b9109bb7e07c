//! The device-generic path: one training step of every method on the test device
//! (`DELTA_TEST_DEVICE`, `cpu` unless `scripts/test-cuda.sh` runs these on a GPU) gives
//! the loss and gradients the CPU gives, from the same seeded weights and batch.
//!
//! On the CPU this runs the same code twice (device placement of base, batch and
//! trainable tensors; the result must be bit-identical). On `cuda:N` it is the check
//! that the GPU step is the CPU step.

mod common;

use candle_core::{Device, Tensor};
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::bert::BaseWeights;
use delta_worker::data::{Split, Tok, sentiment_split, sentiment_vocabulary};
use delta_worker::fused::Precision;
use delta_worker::methods::Trainable;
use delta_worker::mounts::{Mounts, classify};

/// One method's step: the loss, and each trainable tensor's gradient, read back to the CPU.
struct Step {
    loss: f32,
    grads: Vec<(String, Vec<f32>)>,
}

fn step(spec: &TrainSpec, device: &Device) -> Step {
    step_at(spec, device, Precision::F32)
}

fn step_at(spec: &TrainSpec, device: &Device, precision: Precision) -> Step {
    let cfg = delta_worker::tiny::config();
    let mut base = BaseWeights::random(cfg.clone(), 3, device).unwrap();
    base.set_precision(precision).unwrap();
    let labels = vec!["negative".to_owned(), "positive".to_owned()];
    let tok = Tok::word_level(&sentiment_vocabulary(), 24).unwrap();
    let examples = sentiment_split(16, 5, false, Split::Train);
    let data = tok.encode_all(&examples, &labels).unwrap();
    let refs: Vec<_> = data.iter().collect();
    let batch = delta_worker::data::batch(&refs, device).unwrap();
    let gold: Vec<u32> = data.iter().map(|e| e.label.unwrap() as u32).collect();
    let gold = Tensor::new(gold.as_slice(), device).unwrap();

    let t = Trainable::new(spec, &base, &labels).unwrap();
    // Move every trainable tensor off its initial value (LoRA's B and adapters start at
    // zero), from a CPU generator, so that every gradient is non-trivial on both devices.
    let mut rng = delta_worker::rng::Rng::new(17);
    for (_, v) in &t.vars {
        let noise: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() * 0.05).collect();
        let noise = Tensor::from_vec(noise, v.shape(), device).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    let frozen = Mounts::new(&base);
    let mounted = t.mount(&frozen).unwrap();
    let logits = classify(&cfg, &mounted, &batch).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &gold).unwrap();
    let grads = loss.backward().unwrap();
    Step {
        loss: loss.to_scalar::<f32>().unwrap(),
        grads: t
            .vars
            .iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name} gets no gradient"));
                let g = g.to_device(&Device::Cpu).unwrap();
                (name.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect(),
    }
}

fn spec(method: Method) -> TrainSpec {
    let mut s = TrainSpec::new(&[method]);
    s.rank = 4;
    s.bottleneck = 8;
    s.prefix_len = 4;
    s.prompt_len = 4;
    if method == Method::Selective {
        s.modules = vec!["intermediate.dense".into()];
    }
    s
}

#[test]
fn every_method_steps_on_the_test_device_as_on_the_cpu() {
    let device = common::test_device();
    let name = common::test_device_name();
    // Relative to the largest gradient of each tensor: f32 kernels on a GPU sum in
    // another order than the CPU's.
    let tol = common::device_tolerance(0.0);
    for &method in Method::ALL {
        let s = spec(method);
        let cpu = step(&s, &Device::Cpu);
        let dev = step(&s, &device);
        assert!(
            (cpu.loss - dev.loss).abs() <= tol * cpu.loss.abs().max(1.0),
            "{method}: loss {} on the CPU, {} on {name}",
            cpu.loss,
            dev.loss
        );
        assert_eq!(cpu.grads.len(), dev.grads.len(), "{method}");
        for ((tensor, g_cpu), (_, g_dev)) in cpu.grads.iter().zip(&dev.grads) {
            let scale = g_cpu.iter().fold(0f32, |m, g| m.max(g.abs()));
            assert!(scale > 0.0, "{method}: {tensor} has a zero gradient");
            let worst = g_cpu
                .iter()
                .zip(g_dev)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tol * scale,
                "{method}: gradient of {tensor} differs by {worst} (largest {scale}) on {name}"
            );
        }
    }
}

/// Mixed precision (`--precision bf16`): every method's step on the test device with bf16
/// products gives the f32 step's loss and gradients to bf16's resolution (8 bits of
/// mantissa). Measured on the CPU (tiny base): loss within 4.9e-5, gradients within 2.5e-3
/// of the largest.
#[test]
fn every_method_steps_in_bf16_as_in_f32() {
    let device = common::test_device();
    let name = common::test_device_name();
    for &method in Method::ALL {
        let s = spec(method);
        let full = step_at(&s, &device, Precision::F32);
        let mixed = step_at(&s, &device, Precision::Bf16);
        let loss_err = (full.loss - mixed.loss).abs() / full.loss.abs().max(1.0);
        // Relative to the step's largest gradient: a tensor whose exact gradient is zero
        // (the key bias: softmax ignores a shift shared by every key) holds only rounding
        // noise, larger in bf16 than in f32.
        let scale = full
            .grads
            .iter()
            .flat_map(|(_, g)| g.iter())
            .fold(0f32, |m, g| m.max(g.abs()));
        let mut grad_err = 0f32;
        for ((tensor, g32), (_, g16)) in full.grads.iter().zip(&mixed.grads) {
            assert!(g16.iter().all(|g| g.is_finite()), "{method}: {tensor}");
            let worst = g32
                .iter()
                .zip(g16)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            grad_err = grad_err.max(worst / scale);
        }
        println!("{method}: loss {loss_err:.2e} gradient {grad_err:.2e} on {name}");
        assert!(grad_err > 0.0, "{method}: no product ran in bf16 on {name}");
        assert!(
            loss_err <= 1e-3,
            "{method}: bf16 loss off by {loss_err} on {name}"
        );
        assert!(
            grad_err <= 1e-2,
            "{method}: bf16 gradients off by {grad_err} on {name}"
        );
    }
}
