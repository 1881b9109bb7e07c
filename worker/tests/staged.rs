//! A delta trained in stages (`--parent`), merged by `delta apply`, predicts what the
//! worker predicts with the stages mounted: same weights, same head, same pooling. It runs
//! on the test device (`DELTA_TEST_DEVICE`, the CPU unless `scripts/test-cuda.sh` sets it).

mod common;

use std::collections::BTreeMap;

use delta_client::apply::{ApplyOptions, LoadedDelta, apply};
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::data::{Example, Split, sentiment_split};
use delta_worker::run::{Delta, LocalBase, TrainRequest, predict, train_to_dir};

fn train(base: &LocalBase, methods: &[Method], parents: &[Delta], out: &std::path::Path) -> Delta {
    let train = sentiment_split(64, 1, true, Split::Train);
    let mut spec = TrainSpec::new(methods);
    spec.max_steps = Some(4);
    spec.max_len = 24;
    spec.batch_size = 8;
    spec.lr = Some(5e-3);
    let req = TrainRequest {
        spec: &spec,
        parents,
        train: &train,
        eval: None,
        base_name: Some("all-MiniLM-L6-v2".into()),
        provenance: BTreeMap::new(),
    };
    train_to_dir(base, &req, out, &mut |_| Ok(())).unwrap();
    Delta::load_dir(out).unwrap()
}

fn loaded(dir: &std::path::Path) -> LoadedDelta {
    let (manifest, paths) = delta_client::delta::read_native(dir).unwrap();
    LoadedDelta::open(&dir.display().to_string(), manifest, &paths).unwrap()
}

#[test]
fn an_applied_staged_delta_predicts_what_the_mounted_stages_predict() {
    let dir = delta_worker::run::minilm_dir().unwrap();
    let device = common::test_device();
    let base = LocalBase::open(&dir, &device).unwrap();
    let work = tempfile::tempdir().unwrap();
    let parent = train(&base, &[Method::Lora], &[], &work.path().join("parent"));
    let child = train(
        &base,
        &[Method::Bitfit],
        std::slice::from_ref(&parent),
        &work.path().join("child"),
    );
    assert_eq!(child.manifest.parents.len(), 1);

    // `delta apply` of the child (its parent first), as a model folder.
    let merged = work.path().join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), merged.join(f)).unwrap();
    }
    let model = delta_client::tensors::Model::open(&dir.join("model.safetensors")).unwrap();
    apply(
        &model,
        base.fingerprint,
        &[
            loaded(&work.path().join("parent")),
            loaded(&work.path().join("child")),
        ],
        &ApplyOptions::default(),
        &merged.join("model.safetensors"),
    )
    .unwrap();
    let merged_base = LocalBase::open(&merged, &device).unwrap();

    let examples: Vec<Example> = sentiment_split(6, 9, true, Split::Eval);
    let mounted = predict(&base, &[parent, child], &examples, 64, 8).unwrap();
    let applied = predict(&merged_base, &[], &examples, 64, 8).unwrap();
    for (m, a) in mounted.iter().zip(&applied) {
        let (pm, pa): (Vec<f64>, Vec<f64>) = (
            serde_json::from_value(m["probabilities"].clone()).unwrap(),
            serde_json::from_value(a["probabilities"].clone()).unwrap(),
        );
        for (x, y) in pm.iter().zip(&pa) {
            assert!(
                (x - y).abs() <= f64::from(common::device_tolerance(1e-5)),
                "{}: mounted {pm:?} vs applied {pa:?}",
                m["text"]
            );
        }
    }
}
