//! Agreement with the real PEFT, through fixtures `scripts/peft-interop.sh` wrote with
//! torch, transformers and peft (versions in `tests/fixtures/peft-ia3/versions.json` and
//! the README table).

use std::path::{Path, PathBuf};

use super::Env;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The MiniLM weights: `DELTA_MINILM_DIR`, or the folder `scripts/fetch-minilm.sh`
/// fetches (idempotent; `scripts/test.sh` runs it first), as the worker's tests find it.
fn minilm() -> PathBuf {
    let dir = match std::env::var_os("DELTA_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let out = std::process::Command::new(repo("scripts/fetch-minilm.sh"))
                .output()
                .expect("run scripts/fetch-minilm.sh");
            assert!(
                out.status.success(),
                "fetching MiniLM failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            repo(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    dir.join("model.safetensors")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Pushes a PEFT adapter folder as a delta on MiniLM and applies it with the CLI, as a
/// user would. Returns the environment (alive while the caller reads), the base's path
/// and the merged file.
async fn push_and_apply(adapter: &Path) -> (Env, PathBuf, PathBuf) {
    let model = minilm();
    let env = Env::start().await;
    let entries = delta_client::tensors::Model::open(&model)
        .unwrap()
        .entries();
    env.remote.add_base("minilm", &entries).await.unwrap();
    let adapter = adapter.to_string_lossy().into_owned();
    env.cli(&["push", &adapter, "team/adapter", "--base", "minilm"])
        .await
        .unwrap();
    let out = env.path("merged.safetensors");
    env.cli(&[
        "apply",
        "--base",
        &model.to_string_lossy(),
        "team/adapter",
        "-o",
        &out.to_string_lossy(),
    ])
    .await
    .unwrap();
    (env, model, out)
}

/// A PEFT IA3 adapter (key/value scale outputs, both `output.dense` modules inputs),
/// pushed and applied here, equals PEFT's `merge_and_unload` bit for bit: weights and the
/// biases of the output-side modules, which PEFT scales with the rows.
#[tokio::test]
async fn ia3_apply_equals_peft_merge_and_unload() {
    let fixture = repo("tests/fixtures/peft-ia3");
    let (_env, model, out) = push_and_apply(&fixture.join("adapter")).await;

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

#[derive(serde::Deserialize)]
struct WorkerExport {
    keys: Vec<String>,
}

/// A classifier the worker trained, exported: exactly the keys PEFT expects of a SEQ_CLS
/// LoRA on `BertForSequenceClassification` (the script checked that PeftModel and
/// AutoPeftModelForSequenceClassification load them and predict the worker's
/// probabilities), a config naming the task and the base given, files the user's umask
/// allows. What PEFT cannot carry is refused, naming it, and nothing is written.
#[tokio::test]
async fn a_worker_classifier_exports_as_peft_loads_it() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = repo("tests/fixtures/worker-seq-cls");
    let expected: WorkerExport =
        serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).unwrap()).unwrap();
    let env = Env::start().await;
    let out = env.path("export");
    env.cli(&[
        "export",
        "peft",
        &fixture.join("delta").to_string_lossy(),
        "-o",
        &out.to_string_lossy(),
        "--base-model",
        "sentence-transformers/all-MiniLM-L6-v2",
    ])
    .await
    .unwrap();
    let keys: Vec<String> = crate::fixtures::tensor_bytes(&out.join("adapter_model.safetensors"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, expected.keys);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    assert_eq!(
        config["base_model_name_or_path"],
        "sentence-transformers/all-MiniLM-L6-v2"
    );
    let plain = env.path("plain");
    std::fs::write(&plain, b"x").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(mode(&out.join(f)), mode(&plain), "{f}");
    }

    // A head that mean-pools, and BitFit biases beside LoRA: refused, nothing written.
    let dir = env.path("mean");
    copy_dir(&fixture.join("delta"), &dir);
    let mpath = dir.join("delta.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["config"]["head"]["pooling"] = serde_json::json!("mean");
    std::fs::write(&mpath, m.to_string()).unwrap();
    let refused = env.path("refused");
    let e = env
        .cli(&[
            "export",
            "peft",
            &dir.to_string_lossy(),
            "-o",
            &refused.to_string_lossy(),
        ])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("pooler"), "{e:#}");
    assert!(!refused.exists());

    let bitfit = env.path("bitfit");
    let mut tensors = crate::fixtures::lora_tensors(1, 2);
    tensors.push((
        "encoder.layer.0.attention.self.query.bias.replace".into(),
        vec![crate::fixtures::HIDDEN],
        crate::fixtures::values(9, crate::fixtures::HIDDEN),
    ));
    std::fs::create_dir_all(&bitfit).unwrap();
    crate::fixtures::write_f32(&bitfit.join("delta.safetensors"), &tensors, None);
    std::fs::write(
        bitfit.join("delta.json"),
        serde_json::json!({"method": "lora", "config": {"lora": {"r": 2, "lora_alpha": 4.0, "target_modules": ["query", "value"]}}}).to_string(),
    )
    .unwrap();
    env.cli(&[
        "push",
        &bitfit.to_string_lossy(),
        "team/lora-bitfit",
        "--base",
        "tiny",
    ])
    .await
    .unwrap();
    let e = env
        .cli(&[
            "export",
            "peft",
            "team/lora-bitfit",
            "-o",
            &refused.to_string_lossy(),
        ])
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("encoder.layer.0.attention.self.query.bias.replace"),
        "{e:#}"
    );
    assert!(!refused.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A PEFT rsLoRA with rank and alpha patterns (value at rank 4, query at alpha 32), pushed
/// and applied here, equals PEFT's `merge_and_unload` within 1e-5 relative (the LoRA
/// product is summed in a different order than torch's).
#[tokio::test]
async fn lora_patterns_apply_equals_peft_merge_and_unload() {
    let fixture = repo("tests/fixtures/peft-lora");
    let (_env, _model, out) = push_and_apply(&fixture.join("adapter")).await;
    let merged: std::collections::HashMap<String, Vec<u8>> =
        crate::fixtures::tensor_bytes(&out).into_iter().collect();
    let expected = crate::fixtures::tensor_bytes(&fixture.join("merged.safetensors"));
    assert_eq!(expected.len(), 12);
    for (name, want) in expected {
        let want = f32s(&want);
        let got = &f32s(&merged[&name])[..want.len()];
        let norm = want.iter().map(|w| w * w).sum::<f32>().sqrt();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w) * (g - w))
            .sum::<f32>()
            .sqrt();
        assert!(
            diff / norm <= 1e-5,
            "{name}: relative difference {}",
            diff / norm
        );
    }
}
