//! Agreement with the real PEFT, through fixtures `scripts/peft-interop.sh` wrote with
//! torch, transformers and peft (their versions are in each fixture's `versions.json`).

use std::path::{Path, PathBuf};

use super::Env;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The MiniLM weights `scripts/test.sh` fetches (`scripts/fetch-minilm.sh`).
fn minilm() -> PathBuf {
    let p = repo("target/models/all-MiniLM-L6-v2/model.safetensors");
    assert!(
        p.is_file(),
        "{} is missing: run ./scripts/fetch-minilm.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A PEFT IA3 adapter (key/value scale outputs, both `output.dense` modules inputs),
/// pushed and applied here, equals PEFT's `merge_and_unload` bit for bit: weights and the
/// biases of the output-side modules, which PEFT scales with the rows.
#[tokio::test]
async fn ia3_apply_equals_peft_merge_and_unload() {
    let fixture = repo("tests/fixtures/peft-ia3");
    let model = minilm();
    let env = Env::start().await;
    let entries = delta_client::tensors::Model::open(&model)
        .unwrap()
        .entries();
    env.remote.add_base("minilm", &entries).await.unwrap();
    let adapter = fixture.join("adapter").to_string_lossy().into_owned();
    env.cli(&["push", &adapter, "team/ia3", "--base", "minilm"])
        .await
        .unwrap();
    let out = env.path("merged.safetensors");
    env.cli(&[
        "apply",
        "--base",
        &model.to_string_lossy(),
        "team/ia3",
        "-o",
        &out.to_string_lossy(),
    ])
    .await
    .unwrap();

    let merged: std::collections::HashMap<String, Vec<u8>> =
        crate::fixtures::tensor_bytes(&out).into_iter().collect();
    let base: std::collections::HashMap<String, Vec<u8>> =
        crate::fixtures::tensor_bytes(&model).into_iter().collect();
    let expected = crate::fixtures::tensor_bytes(&fixture.join("merged.safetensors"));
    assert_eq!(expected.len(), 8);
    for (name, want) in expected {
        let want = f32s(&want);
        // Weights: the fixture holds the first rows only.
        let got = &f32s(&merged[&name])[..want.len()];
        // Both multiply f32 by the same f32: equal to the last bit.
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(differ, 0, "{name}: {differ} values differ from PEFT's");
        // The fixture is not the base: weights and the output-side modules' biases
        // changed; a feed-forward (input-side) module keeps its bias.
        let unchanged = f32s(&base[&name])[..want.len()] == want[..];
        let ff_bias = name.ends_with("output.dense.bias");
        assert_eq!(
            unchanged, ff_bias,
            "{name}: changed by the merge: {}",
            !unchanged
        );
    }
}
