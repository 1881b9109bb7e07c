//! The worker's runtime against the real PEFT, through fixtures written by
//! `scripts/peft-interop.sh` (torch, transformers and peft; versions in
//! `tests/fixtures/peft-ia3/versions.json`).

use std::path::PathBuf;

use candle_core::Device;
use delta_worker::data::Example;
use delta_worker::run::{Delta, LocalBase, predict};

#[derive(serde::Deserialize)]
struct Expected {
    text: String,
    logits: Vec<f32>,
    probabilities: Vec<f64>,
}

/// A PEFT SEQ_CLS LoRA (BertForSequenceClassification: pooler over [CLS], then the
/// classifier kept in `modules_to_save`), imported and run by `predict`, gives PEFT's
/// logits and probabilities: the head is Hugging Face's, not a mean-pooled one.
#[test]
fn a_peft_seq_cls_lora_predicts_what_peft_predicts() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft-seq-cls");
    let expected: Vec<Expected> =
        serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).unwrap()).unwrap();
    let dir = delta_worker::run::minilm_dir().unwrap();
    let base = LocalBase::open(&dir, &Device::Cpu).unwrap();
    let client_base = delta_client::tensors::Model::open(&dir.join("model.safetensors"))
        .unwrap()
        .base_record("minilm");
    assert_eq!(client_base.fingerprint, base.fingerprint);
    let prepared = delta_client::delta::prepare(&fixture.join("adapter"), &client_base).unwrap();
    let delta = Delta::load_files(prepared.manifest.clone(), &prepared.paths).unwrap();
    let examples: Vec<Example> = expected
        .iter()
        .map(|e| Example {
            text: e.text.clone(),
            text_pair: None,
            label: String::new(),
        })
        .collect();
    let got = predict(&base, &[delta], &examples, 128, 8).unwrap();
    for (g, want) in got.iter().zip(&expected) {
        let logits: Vec<f32> = serde_json::from_value(g["logits"].clone()).unwrap();
        let probs: Vec<f64> = serde_json::from_value(g["probabilities"].clone()).unwrap();
        for (a, b) in logits.iter().zip(&want.logits) {
            assert!(
                (a - b).abs() <= 1e-4,
                "{}: logits {logits:?} vs PEFT {:?}",
                want.text,
                want.logits
            );
        }
        for (a, b) in probs.iter().zip(&want.probabilities) {
            assert!(
                (a - b).abs() <= 1e-4,
                "{}: probabilities {probs:?} vs PEFT {:?}",
                want.text,
                want.probabilities
            );
        }
    }
}

#[derive(serde::Deserialize)]
struct ExportRow {
    text: String,
    probabilities: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct WorkerExport {
    rows: Vec<ExportRow>,
}

/// The worker-trained classifier of `tests/fixtures/worker-seq-cls` predicts what PEFT
/// predicted from its `delta export peft` (PeftModel, AutoPeftModelForSequenceClassification).
#[test]
fn a_worker_classifier_predicts_what_peft_predicts_from_its_export() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/worker-seq-cls");
    let expected: WorkerExport =
        serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).unwrap()).unwrap();
    let base = LocalBase::open(&delta_worker::run::minilm_dir().unwrap(), &Device::Cpu).unwrap();
    let delta = Delta::load_dir(&fixture.join("delta")).unwrap();
    let examples: Vec<Example> = expected
        .rows
        .iter()
        .map(|r| Example {
            text: r.text.clone(),
            text_pair: None,
            label: String::new(),
        })
        .collect();
    let got = predict(&base, &[delta], &examples, 128, 8).unwrap();
    for (g, want) in got.iter().zip(&expected.rows) {
        let probs: Vec<f64> = serde_json::from_value(g["probabilities"].clone()).unwrap();
        for (a, b) in probs.iter().zip(&want.probabilities) {
            assert!(
                (a - b).abs() <= 1e-4,
                "{}: {probs:?} vs PEFT {:?}",
                want.text,
                want.probabilities
            );
        }
    }
}

/// A delta folder whose file no longer hashes to its manifest's digest is refused,
/// naming the file; its tensors load otherwise (dtype and shape from the header).
#[test]
fn a_local_delta_is_loaded_only_if_its_files_match_the_manifest() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/worker-seq-cls/delta");
    let good = Delta::load_dir(&fixture).unwrap();
    let listed = good.manifest.tensors().count();
    assert_eq!(good.tensors.len(), listed);
    let dir = tempfile::tempdir().unwrap();
    for f in ["delta.json", "delta.safetensors"] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    let file = dir.path().join("delta.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let e = Delta::load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("delta.safetensors hashes to") && e.contains("but the manifest says"),
        "{e}"
    );
}
