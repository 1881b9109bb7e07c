//! Composed run-time modules (`delta compose` output: `adapter.<i>.…` with
//! `config.composition`) mount as their layout says.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use delta_proto::manifest::MethodConfig;
use delta_worker::bert::{BaseWeights, encode};
use delta_worker::data::{Tok, sentiment_simple, sentiment_vocabulary};
use delta_worker::mounts::Mounts;
use delta_worker::rng::Rng;

fn adapter(seed: u64, prefix: &str, h: usize, b: usize) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let p = "encoder.layer.1.output";
    let mut m = HashMap::new();
    m.insert(format!("{prefix}{p}.down.weight"), t(&[b, h]));
    m.insert(format!("{prefix}{p}.down.bias"), t(&[b]));
    m.insert(format!("{prefix}{p}.up.weight"), t(&[h, b]));
    m.insert(format!("{prefix}{p}.up.bias"), t(&[h]));
    m
}

fn renamed(m: &HashMap<String, Tensor>, i: usize) -> HashMap<String, Tensor> {
    m.iter()
        .map(|(k, v)| {
            (
                k.replacen("adapter.", &format!("adapter.{i}."), 1),
                v.clone(),
            )
        })
        .collect()
}

fn composed(layout: &str, weights: [f64; 2]) -> MethodConfig {
    let mut c = MethodConfig::default();
    c.other.insert(
        "composition".into(),
        serde_json::json!({"layout": layout, "members": [{"weight": weights[0]}, {"weight": weights[1]}]}),
    );
    c
}

#[test]
fn stacked_and_parallel_compositions_mount_as_recorded() {
    let cfg = delta_worker::tiny::config();
    let base = BaseWeights::random(cfg.clone(), 5, &Device::Cpu).unwrap();
    let tok = Tok::word_level(&sentiment_vocabulary(), 64).unwrap();
    let data = tok.encode_all(&sentiment_simple(8, 3), &[]).unwrap();
    let refs: Vec<_> = data.iter().collect();
    let batch = delta_worker::data::batch(&refs, &Device::Cpu).unwrap();
    let run = |m: &Mounts<'_>| -> Vec<Vec<Vec<f32>>> {
        encode(&cfg, m, &batch).unwrap().0.to_vec3().unwrap()
    };
    let (a, b) = (adapter(1, "adapter.", 64, 8), adapter(2, "adapter.", 64, 8));
    let plain = MethodConfig::default();

    // Stacked: the same as mounting the two deltas one after the other.
    let mut one_by_one = Mounts::new(&base);
    one_by_one.mount(&plain, a.clone()).unwrap();
    one_by_one.mount(&plain, b.clone()).unwrap();
    let mut both = renamed(&a, 0);
    both.extend(renamed(&b, 1));
    let mut stacked = Mounts::new(&base);
    stacked
        .mount(&composed("stack", [1.0, 1.0]), both.clone())
        .unwrap();
    assert_eq!(run(&stacked), run(&one_by_one));

    // Parallel with weights (1, 0) is the first member alone; with (1, 1) it differs
    // from the stack (the second adapter sees the input, not the first one's output).
    let mut first = Mounts::new(&base);
    first.mount(&plain, a.clone()).unwrap();
    let mut par = Mounts::new(&base);
    par.mount(&composed("parallel", [1.0, 0.0]), both.clone())
        .unwrap();
    assert_eq!(run(&par), run(&first));
    let mut par = Mounts::new(&base);
    par.mount(&composed("parallel", [1.0, 1.0]), both).unwrap();
    assert_ne!(run(&par), run(&stacked));
}
