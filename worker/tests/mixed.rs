//! A batch whose rows carry different deltas gives every row what its delta gives alone.

mod common;

use common::max_diff;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use delta_client::jobs::TrainSpec;
use delta_proto::manifest::{Ia3Config, MethodConfig};
use delta_worker::bert::{BaseWeights, POOLER_BIAS, POOLER_WEIGHT};
use delta_worker::data::{Encoded, Tok, batch, sentiment, sentiment_vocabulary};
use delta_worker::methods::Trainable;
use delta_worker::mixed::{MixedMounts, Output, forward, forward_alone, shares_base};
use delta_worker::mounts::Mounts;
use delta_worker::rng::Rng;

fn noise(rng: &mut Rng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| mean + rng.normal() * std).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A base with a pooler and a head of its own (so the bare base can classify too).
fn base() -> BaseWeights {
    let mut b = BaseWeights::random(delta_worker::tiny::config(), 11, &Device::Cpu).unwrap();
    let mut rng = Rng::new(12);
    b.tensors
        .insert(POOLER_WEIGHT.into(), noise(&mut rng, &[64, 64], 0.0, 0.1));
    b.tensors
        .insert(POOLER_BIAS.into(), noise(&mut rng, &[64], 0.0, 0.1));
    b.tensors.insert(
        "classifier.weight".into(),
        noise(&mut rng, &[2, 64], 0.0, 0.3),
    );
    b.tensors
        .insert("classifier.bias".into(), noise(&mut rng, &[2], 0.0, 0.1));
    b
}

/// A delta as training would leave it, with every value moved off its initialisation
/// (LoRA's B and adapters' up projections start at zero).
fn trained(base: &BaseWeights, spec: serde_json::Value, labels: usize, seed: u64) -> Mounts<'_> {
    let spec: TrainSpec = serde_json::from_value(spec).unwrap();
    let labels: Vec<String> = (0..labels).map(|i| format!("l{i}")).collect();
    let t = Trainable::new(&spec, base, &labels).unwrap();
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    for (name, t) in t.tensors().unwrap() {
        let moved = (&t + noise(&mut rng, t.dims(), 0.0, 0.05)).unwrap();
        tensors.insert(name, moved);
    }
    let mut m = Mounts::new(base);
    m.mount(&t.config, tensors).unwrap();
    m
}

/// A parent LoRA and a child LoRA on the same modules, mounted one over the other (a
/// staged chain): two branches on one module, which the batched path does not take.
fn stacked(base: &BaseWeights) -> Mounts<'_> {
    let parent = trained(
        base,
        serde_json::json!({"methods": ["lora"], "rank": 2}),
        2,
        30,
    );
    let spec: TrainSpec =
        serde_json::from_value(serde_json::json!({"methods": ["lora"], "rank": 6})).unwrap();
    let labels = ["x".to_owned(), "y".to_owned()];
    let t = Trainable::new(&spec, base, &labels).unwrap();
    let mut rng = Rng::new(31);
    let tensors = t
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let moved = (&v + noise(&mut rng, v.dims(), 0.0, 0.05)).unwrap();
            (k, moved)
        })
        .collect();
    let mut m = parent;
    m.mount(&t.config, tensors).unwrap();
    m
}

fn ia3(base: &BaseWeights, seed: u64) -> Mounts<'_> {
    let mut rng = Rng::new(seed);
    let config = MethodConfig {
        ia3: Some(Ia3Config {
            target_modules: vec!["key".into(), "value".into(), "output.dense".into()],
            feedforward_modules: vec!["output.dense".into()],
            fan_in_fan_out: false,
        }),
        ..MethodConfig::default()
    };
    let mut tensors = HashMap::new();
    for l in 0..2 {
        let p = format!("encoder.layer.{l}");
        for (m, n) in [
            ("attention.self.key", 64),
            ("attention.self.value", 64),
            ("attention.output.dense", 64),
            ("output.dense", 128),
        ] {
            tensors.insert(format!("{p}.{m}.ia3_l"), noise(&mut rng, &[n], 1.0, 0.2));
        }
    }
    let mut m = Mounts::new(base);
    m.mount(&config, tensors).unwrap();
    m
}

#[test]
fn every_row_of_a_mixed_batch_equals_its_delta_alone() {
    let base = base();
    let cfg = base.config.clone();
    let deltas: Vec<(&str, Mounts<'_>)> = vec![
        (
            "lora",
            trained(
                &base,
                serde_json::json!({"methods": ["lora"], "rank": 4}),
                2,
                1,
            ),
        ),
        ("ia3", ia3(&base, 2)),
        ("lora over lora", stacked(&base)),
        ("base", Mounts::new(&base)),
        (
            "prompt-6",
            trained(
                &base,
                serde_json::json!({"methods": ["prompt"], "prompt_len": 6}),
                3,
                3,
            ),
        ),
        (
            "prefix-3",
            trained(
                &base,
                serde_json::json!({"methods": ["prefix"], "prefix_len": 3}),
                2,
                4,
            ),
        ),
        (
            "adapter",
            trained(
                &base,
                serde_json::json!({"methods": ["adapter"], "bottleneck": 8}),
                2,
                5,
            ),
        ),
        (
            "bitfit",
            trained(&base, serde_json::json!({"methods": ["bitfit"]}), 4, 6),
        ),
        (
            "lora+prompt-2, cls",
            trained(
                &base,
                serde_json::json!({"methods": ["lora", "prompt"], "prompt_len": 2, "pooling": "cls", "targets": ["query", "value", "intermediate.dense"]}),
                2,
                7,
            ),
        ),
        (
            "prefix-5+adapter+bitfit, cls",
            trained(
                &base,
                serde_json::json!({"methods": ["prefix", "adapter", "bitfit"], "prefix_len": 5, "pooling": "cls"}),
                3,
                8,
            ),
        ),
    ];
    for (name, m) in &deltas {
        assert!(shares_base(m), "{name} should share the base");
    }
    let last = trained(&base, serde_json::json!({"methods": ["last-layer"]}), 2, 9);
    assert!(
        !shares_base(&last),
        "a last-layer delta replaces shared weights"
    );
    let err = MixedMounts::new(&[(1, &deltas[0].1), (1, &last)]).unwrap_err();
    assert!(err.to_string().contains("cannot share a batch"), "{err}");

    // Rows of different lengths, 1 to 3 per delta.
    let tok = Tok::word_level(&sentiment_vocabulary(), 64).unwrap();
    let texts = sentiment(40, 21);
    let encoded: Vec<Encoded> = tok.encode_all(&texts, &[]).unwrap();
    let mut rows: Vec<Vec<&Encoded>> = Vec::new();
    let mut next = encoded.iter();
    for i in 0..deltas.len() {
        rows.push((0..1 + i % 3).map(|_| next.next().unwrap()).collect());
    }
    let parts: Vec<(usize, &Mounts<'_>)> = deltas
        .iter()
        .zip(&rows)
        .map(|((_, m), r)| (r.len(), m))
        .collect();
    let mixed = MixedMounts::new(&parts).unwrap();
    let all: Vec<&Encoded> = rows.iter().flatten().copied().collect();
    let lengths: Vec<usize> = all.iter().map(|e| e.ids.len()).collect();
    assert!(
        lengths.iter().min() != lengths.iter().max(),
        "the batch should pad: {lengths:?}"
    );
    let b = batch(&all, &Device::Cpu).unwrap();
    for out in [Output::Logits, Output::Embedding] {
        let together = forward(&cfg, &mixed, &b, out).unwrap();
        for (((name, m), r), got) in deltas.iter().zip(&rows).zip(&together) {
            let alone: Vec<Vec<f32>> = r
                .iter()
                .flat_map(|e| {
                    forward_alone(&cfg, m, &batch(&[e], &Device::Cpu).unwrap(), out).unwrap()
                })
                .collect();
            let d = max_diff(got, &alone);
            assert!(
                d <= 1e-5,
                "{name} ({out:?}): mixed differs from alone by {d}"
            );
        }
        // And the heads differ from each other: the test is not comparing one model.
        if out == Output::Logits {
            assert_eq!(together[4][0].len(), 3);
            assert_eq!(together[7][0].len(), 4);
        }
    }
}
