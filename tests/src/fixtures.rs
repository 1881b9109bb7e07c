//! Tiny fixtures: a 2-layer "encoder" base in safetensors, LoRA deltas in the native and
//! PEFT formats, written with the `safetensors` crate.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;

/// Hidden size of the tiny base.
pub const HIDDEN: usize = 8;
/// Layers of the tiny base.
pub const LAYERS: usize = 2;

/// A deterministic pseudo-random f32 sequence (xorshift), so fixtures need no RNG crate.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// An f32 tensor: name, shape, values.
pub type F32Tensor = (String, Vec<usize>, Vec<f32>);

/// Writes f32 tensors `(name, shape, values)` to a safetensors file.
pub fn write_f32(path: &Path, tensors: &[F32Tensor], metadata: Option<HashMap<String, String>>) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("valid view"),
            )
        })
        .collect();
    std::fs::write(
        path,
        safetensors::serialize(views, metadata).expect("serialize"),
    )
    .expect("write fixture");
}

/// The tiny base's tensors: per layer, query/value weights `[H, H]` with biases, and an
/// intermediate weight `[2H, H]`.
pub fn base_tensors(seed: u64) -> Vec<F32Tensor> {
    let mut out = Vec::new();
    for l in 0..LAYERS {
        for (i, m) in ["query", "value"].iter().enumerate() {
            let p = format!("encoder.layer.{l}.attention.self.{m}");
            out.push((
                format!("{p}.weight"),
                vec![HIDDEN, HIDDEN],
                values(seed + (l * 10 + i) as u64, HIDDEN * HIDDEN),
            ));
            out.push((
                format!("{p}.bias"),
                vec![HIDDEN],
                values(seed + 100 + (l * 10 + i) as u64, HIDDEN),
            ));
        }
        out.push((
            format!("encoder.layer.{l}.intermediate.dense.weight"),
            vec![2 * HIDDEN, HIDDEN],
            values(seed + 200 + l as u64, 2 * HIDDEN * HIDDEN),
        ));
    }
    out
}

/// Writes the tiny base to `path`.
pub fn write_base(path: &Path, seed: u64) {
    write_f32(path, &base_tensors(seed), None);
}

/// LoRA tensors on query and value of every layer, native names.
pub fn lora_tensors(seed: u64, r: usize) -> Vec<F32Tensor> {
    let mut out = Vec::new();
    for l in 0..LAYERS {
        for (i, m) in ["query", "value"].iter().enumerate() {
            let p = format!("encoder.layer.{l}.attention.self.{m}");
            let s = seed + (l * 10 + i) as u64;
            out.push((
                format!("{p}.lora_A"),
                vec![r, HIDDEN],
                values(s, r * HIDDEN),
            ));
            out.push((
                format!("{p}.lora_B"),
                vec![HIDDEN, r],
                values(s + 1000, HIDDEN * r),
            ));
        }
    }
    out
}

/// Writes a native LoRA delta folder (`delta.json` + `delta.safetensors`).
pub fn write_native_lora(dir: &Path, seed: u64, r: usize, annotations: serde_json::Value) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_f32(&dir.join("delta.safetensors"), &lora_tensors(seed, r), None);
    let manifest = json!({
        "method": "lora",
        "config": {"lora": {"r": r, "lora_alpha": 2.0 * r as f64, "target_modules": ["query", "value"]}},
        "annotations": annotations,
    });
    std::fs::write(
        dir.join("delta.json"),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("write");
}

/// Writes a PEFT LoRA folder as PEFT saves one for a `BertModel`: keys
/// `base_model.model.<module>.lora_A.weight`, `adapter_config.json` with PEFT's fields.
pub fn write_peft_lora(dir: &Path, seed: u64, r: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let tensors: Vec<_> = lora_tensors(seed, r)
        .into_iter()
        .map(|(n, s, v)| {
            let (m, role) = n.rsplit_once('.').expect("role suffix");
            (format!("base_model.model.{m}.{role}.weight"), s, v)
        })
        .collect();
    let meta = Some(
        [("format".to_owned(), "pt".to_owned())]
            .into_iter()
            .collect(),
    );
    write_f32(&dir.join("adapter_model.safetensors"), &tensors, meta);
    let config = json!({
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "base_model_name_or_path": "/home/someone/tiny",
        "r": r, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"],
        "use_rslora": true, "fan_in_fan_out": false, "bias": "none", "modules_to_save": null,
        "rank_pattern": {"encoder.layer.1.attention.self.value": r}, "alpha_pattern": {"value": 32},
        "inference_mode": true,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("write");
}

/// The tensors of a safetensors file as (name, raw bytes), sorted by name.
pub fn tensor_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}

/// Writes a PEFT IA3 folder: `(out, 1)` vectors on query/value, a `(1, in)` vector on the
/// feed-forward intermediate layer.
pub fn write_peft_ia3(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut tensors = Vec::new();
    for l in 0..LAYERS {
        for m in ["query", "value"] {
            let v: Vec<f32> = values(seed + l as u64, HIDDEN)
                .iter()
                .map(|x| 1.0 + x)
                .collect();
            tensors.push((
                format!("base_model.model.encoder.layer.{l}.attention.self.{m}.ia3_l"),
                vec![HIDDEN, 1],
                v,
            ));
        }
        let v: Vec<f32> = values(seed + 50 + l as u64, HIDDEN)
            .iter()
            .map(|x| 1.0 + x)
            .collect();
        tensors.push((
            format!("base_model.model.encoder.layer.{l}.intermediate.dense.ia3_l"),
            vec![1, HIDDEN],
            v,
        ));
    }
    let meta = Some(
        [("format".to_owned(), "pt".to_owned())]
            .into_iter()
            .collect(),
    );
    write_f32(&dir.join("adapter_model.safetensors"), &tensors, meta);
    let config = json!({
        "peft_type": "IA3", "task_type": "SEQ_CLS", "base_model_name_or_path": "tiny",
        "target_modules": ["query", "value", "dense"], "feedforward_modules": ["intermediate.dense"],
        "fan_in_fan_out": false, "modules_to_save": null, "init_ia3_weights": true, "inference_mode": true,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("write");
}
