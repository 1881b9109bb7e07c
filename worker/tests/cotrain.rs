//! Several training runs in shared batches produce, each, the delta it produces alone.

use candle_core::Device;
use delta_client::jobs::{Progress, TrainSpec};
use delta_worker::bert::BaseWeights;
use delta_worker::data::{Encoded, Split, Tok, sentiment_split, sentiment_vocabulary};
use delta_worker::methods::Trainable;
use delta_worker::mounts::Mounts;
use delta_worker::train::{Session, co_train, train};

fn specs() -> Vec<TrainSpec> {
    let spec = |v: serde_json::Value| -> TrainSpec { serde_json::from_value(v).unwrap() };
    vec![
        spec(
            serde_json::json!({"methods": ["lora"], "rank": 4, "batch_size": 8, "seed": 1, "max_steps": 6}),
        ),
        spec(
            serde_json::json!({"methods": ["prompt"], "prompt_len": 5, "batch_size": 6, "seed": 2, "max_steps": 4}),
        ),
        spec(
            serde_json::json!({"methods": ["prefix"], "prefix_len": 3, "batch_size": 4, "seed": 3, "max_steps": 6, "lr": 0.01, "dropout": 0.1}),
        ),
        spec(
            serde_json::json!({"methods": ["adapter", "bitfit"], "batch_size": 5, "grad_accum": 2, "seed": 4, "max_steps": 3}),
        ),
        // Dropout on: each run draws its own masks over its own rows, as alone.
        spec(
            serde_json::json!({"methods": ["lora", "prompt"], "batch_size": 7, "seed": 5, "max_steps": 5, "dropout": 0.2, "prompt_len": 3, "targets": ["query", "value", "output.dense"]}),
        ),
        // A longer prefix than the dropout run's: its keys sit after padding.
        spec(
            serde_json::json!({"methods": ["prefix"], "prefix_len": 5, "batch_size": 3, "seed": 6, "max_steps": 2}),
        ),
    ]
}

fn data(seed: u64) -> Vec<Encoded> {
    let tok = Tok::word_level(&sentiment_vocabulary(), 64).unwrap();
    let labels = ["negative".to_owned(), "positive".to_owned()];
    tok.encode_all(&sentiment_split(40, seed, false, Split::Train), &labels)
        .unwrap()
}

fn values(t: &Trainable) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = t
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn fresh(specs: &[TrainSpec], base: &BaseWeights, labels: &[String]) -> Vec<Trainable> {
    specs
        .iter()
        .map(|s| Trainable::new(s, base, labels).unwrap())
        .collect()
}

fn start<'t, 'a>(
    ts: &'t [Trainable],
    frozen: &'t Mounts<'a>,
    sets: &'t [Vec<Encoded>],
) -> Vec<Session<'t, 'a>> {
    ts.iter()
        .zip(sets)
        .map(|(t, set)| Session::new(t, frozen, set, None).unwrap())
        .collect()
}

#[test]
fn each_co_trained_run_equals_its_run_alone_and_a_failing_run_leaves_the_others() {
    let base = BaseWeights::random(delta_worker::tiny::config(), 3, &Device::Cpu).unwrap();
    let frozen = Mounts::new(&base);
    let labels = ["negative".to_owned(), "positive".to_owned()];
    let specs = specs();
    let sets: Vec<Vec<Encoded>> = (0..specs.len()).map(|i| data(10 + i as u64)).collect();

    // Alone, one after the other.
    let mut alone = Vec::new();
    for (spec, set) in specs.iter().zip(&sets) {
        let t = Trainable::new(spec, &base, &labels).unwrap();
        let before = values(&t);
        train(&t, &frozen, set, None, &mut |_| Ok(())).unwrap();
        assert!(
            max_diff(&before, &values(&t)) > 1e-3,
            "training moved nothing"
        );
        alone.push(values(&t));
    }

    // Together.
    let ts = fresh(&specs, &base, &labels);
    let sessions = start(&ts, &frozen, &sets);
    let mut steps = vec![0usize; specs.len()];
    let results = co_train(sessions, &mut |i, p: &Progress| {
        steps[i] = p.step;
        Ok(())
    });
    for (i, r) in results.iter().enumerate() {
        let outcome = r.as_ref().unwrap();
        assert_eq!(outcome.metrics["steps"] as usize, steps[i]);
        let d = max_diff(&alone[i], &values(&ts[i]));
        assert!(
            d <= 1e-4,
            "run {i} ({:?}) differs from alone by {d}",
            specs[i].methods
        );
    }
    assert_eq!(steps, [6, 4, 6, 3, 5, 2]);

    // A run whose progress fails (a lost lease) drops out; the others are unchanged.
    let ts = fresh(&specs, &base, &labels);
    let sessions = start(&ts, &frozen, &sets);
    let results = co_train(sessions, &mut |i, p: &Progress| {
        if i == 1 && p.step == 2 {
            anyhow::bail!("the lease was lost");
        }
        Ok(())
    });
    let err = results[1].as_ref().unwrap_err();
    assert!(err.to_string().contains("lease was lost"), "{err}");
    for i in [0, 2, 3, 4, 5] {
        assert!(results[i].is_ok());
        let d = max_diff(&alone[i], &values(&ts[i]));
        assert!(
            d <= 1e-4,
            "run {i} differs from alone by {d} after run 1 left"
        );
    }
}
