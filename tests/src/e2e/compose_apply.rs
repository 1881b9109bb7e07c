//! `apply` and `compose` against a plain reference implementation written here.

use std::path::{Path, PathBuf};

use delta_client::apply::{ApplyOptions, LoadedDelta, apply};
use delta_client::compose::{ComposeOptions, Merge, Mode, compose};
use delta_client::hub;
use delta_client::remote::BaseRecord;
use delta_client::tensors::Model;
use serde_json::json;

use super::{Env, hidden};
use crate::fixtures::{self, F32Tensor, HIDDEN, values, write_f32};

const Q: &str = "encoder.layer.0.attention.self.query";

/// A base on disk, its model, fingerprint and table.
struct Fixture {
    dir: tempfile::TempDir,
    base_path: PathBuf,
    model: Model,
    base: BaseRecord,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.safetensors");
        fixtures::write_base(&base_path, 1);
        let model = Model::open(&base_path).unwrap();
        let base = model.base_record("tiny");
        Self {
            dir,
            base_path,
            model,
            base,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a native delta folder with the given tensors and manifest fields.
    fn delta(
        &self,
        name: &str,
        tensors: &[(String, Vec<usize>, Vec<f32>)],
        manifest: serde_json::Value,
    ) -> LoadedDelta {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_f32(&dir.join("delta.safetensors"), tensors, None);
        std::fs::write(
            dir.join("delta.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        self.load(&dir)
    }

    fn load(&self, dir: &Path) -> LoadedDelta {
        let prepared = delta_client::delta::prepare(dir, &self.base).unwrap();
        LoadedDelta::open(
            &dir.display().to_string(),
            prepared.manifest.clone(),
            &prepared.paths,
        )
        .unwrap()
    }

    fn apply(&self, deltas: &[LoadedDelta], opts: ApplyOptions, out: &str) -> PathBuf {
        let out = self.path(out);
        apply(&self.model, self.base.fingerprint, deltas, &opts, &out).unwrap();
        out
    }

    fn base_tensor(&self, name: &str) -> Vec<f32> {
        read(&self.base_path, name)
    }
}

fn read(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    delta_client::numeric::to_f32(&format!("{:?}", t.dtype()), t.data()).unwrap()
}

/// Reference `s·B·A` with loops: `b` [out, r], `a` [r, inp].
fn ref_lora(b: &[f32], a: &[f32], out: usize, inp: usize, r: usize, s: f32) -> Vec<f32> {
    let mut d = vec![0.0; out * inp];
    for i in 0..out {
        for j in 0..inp {
            let mut acc = 0.0f64;
            for k in 0..r {
                acc += b[i * r + k] as f64 * a[k * inp + j] as f64;
            }
            d[i * inp + j] = (acc * s as f64) as f32;
        }
    }
    d
}

fn add(x: &[f32], y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(a, b)| a + b).collect()
}

fn assert_close(actual: &[f32], expected: &[f32], rel: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    let norm = expected
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(1e-12);
    let err = actual
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    assert!(
        err / norm <= rel,
        "{what}: relative error {} > {rel}",
        err / norm
    );
}

fn lora(seed: u64, r: usize, alpha: f64) -> (Vec<F32Tensor>, serde_json::Value) {
    let a = values(seed, r * HIDDEN);
    let b = values(seed + 1, HIDDEN * r);
    (
        vec![
            (format!("{Q}.lora_A"), vec![r, HIDDEN], a),
            (format!("{Q}.lora_B"), vec![HIDDEN, r], b),
        ],
        json!({"method": "lora", "config": {"lora": {"r": r, "lora_alpha": alpha}}}),
    )
}

fn lora_delta(f: &Fixture, name: &str, seed: u64, r: usize, alpha: f64) -> (LoadedDelta, Vec<f32>) {
    let (t, m) = lora(seed, r, alpha);
    let expected = ref_lora(
        &t[1].2,
        &t[0].2,
        HIDDEN,
        HIDDEN,
        r,
        (alpha / r as f64) as f32,
    );
    (f.delta(name, &t, m), expected)
}

#[test]
fn lora_merge_matches_the_reference() {
    let f = Fixture::new();
    let (d, delta) = lora_delta(&f, "a", 10, 3, 6.0);
    let out = f.apply(&[d], ApplyOptions::default(), "out.safetensors");
    assert_close(
        &read(&out, &format!("{Q}.weight")),
        &add(&f.base_tensor(&format!("{Q}.weight")), &delta),
        1e-6,
        "W + sBA",
    );
    // Untouched tensors are byte-identical.
    let v = "encoder.layer.1.attention.self.value.weight";
    assert_eq!(read(&out, v), f.base_tensor(v));
    assert_eq!(Model::open(&out).unwrap().table(), f.model.table());
}

#[test]
fn each_lora_factor_is_honoured() {
    let f = Fixture::new();
    let w = f.base_tensor(&format!("{Q}.weight"));
    let (r, alpha) = (4usize, 8.0);
    let (t, _) = lora(20, r, alpha);
    let plain = ref_lora(
        &t[1].2,
        &t[0].2,
        HIDDEN,
        HIDDEN,
        r,
        (alpha / r as f64) as f32,
    );
    let rs = ref_lora(
        &t[1].2,
        &t[0].2,
        HIDDEN,
        HIDDEN,
        r,
        (alpha / (r as f64).sqrt()) as f32,
    );
    let patterned = ref_lora(
        &t[1].2,
        &t[0].2,
        HIDDEN,
        HIDDEN,
        r,
        (32.0 / r as f64) as f32,
    );

    // rsLoRA: alpha / sqrt(r).
    let d = f.delta("rs", &t, json!({"method": "lora", "config": {"lora": {"r": r, "lora_alpha": alpha, "use_rslora": true}}}));
    let got = read(
        &f.apply(&[d], ApplyOptions::default(), "rs.safetensors"),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &add(&w, &rs), 1e-6, "rslora");
    assert!(got != add(&w, &plain));

    // alpha_pattern (and rank_pattern naming the same rank) on this module only.
    let d = f.delta(
        "pat",
        &t,
        json!({"method": "lora", "config": {"lora": {"r": 2, "lora_alpha": alpha, "rank_pattern": {"query": r}, "alpha_pattern": {"layer.0.attention.self.query": 32.0}}}}),
    );
    let got = read(
        &f.apply(&[d], ApplyOptions::default(), "pat.safetensors"),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &add(&w, &patterned), 1e-6, "alpha_pattern");

    // fan_in_fan_out: the intermediate weight [16, 8] read as [in=16, out=8]: A [r, 16], B [8, r].
    let ff = "encoder.layer.0.intermediate.dense";
    let a = values(30, r * 16);
    let b = values(31, 8 * r);
    let d = f.delta(
        "fan",
        &[(format!("{ff}.lora_A"), vec![r, 16], a.clone()), (format!("{ff}.lora_B"), vec![8, r], b.clone())],
        json!({"method": "lora", "config": {"lora": {"r": r, "lora_alpha": alpha, "fan_in_fan_out": true}}}),
    );
    let got = read(
        &f.apply(&[d], ApplyOptions::default(), "fan.safetensors"),
        &format!("{ff}.weight"),
    );
    let delta = ref_lora(&b, &a, 8, 16, r, (alpha / r as f64) as f32); // [8, 16]
    let mut transposed = vec![0.0; 16 * 8];
    for i in 0..8 {
        for j in 0..16 {
            transposed[j * 8 + i] = delta[i * 16 + j];
        }
    }
    assert_close(
        &got,
        &add(&f.base_tensor(&format!("{ff}.weight")), &transposed),
        1e-6,
        "fan_in_fan_out",
    );

    // LoRA bias, scaled like the product; a trained bias replaced; a saved module added.
    let bias = values(40, HIDDEN);
    let new_bias = values(41, HIDDEN);
    let head = values(42, 2 * HIDDEN);
    let mut tensors = t.clone();
    tensors.push((format!("{Q}.lora_bias"), vec![HIDDEN], bias.clone()));
    tensors.push((
        "encoder.layer.1.attention.self.value.bias.replace".into(),
        vec![HIDDEN],
        new_bias.clone(),
    ));
    tensors.push((
        "classifier.weight.new".into(),
        vec![2, HIDDEN],
        head.clone(),
    ));
    let d = f.delta("bias", &tensors, json!({"method": "lora", "config": {"lora": {"r": r, "lora_alpha": alpha, "lora_bias": true, "bias": "all", "modules_to_save": ["classifier"]}}}));
    let out = f.apply(&[d], ApplyOptions::default(), "bias.safetensors");
    let s = (alpha / r as f64) as f32;
    let expected: Vec<f32> = f
        .base_tensor(&format!("{Q}.bias"))
        .iter()
        .zip(&bias)
        .map(|(x, b)| x + s * b)
        .collect();
    assert_close(
        &read(&out, &format!("{Q}.bias")),
        &expected,
        1e-6,
        "lora_bias",
    );
    assert_eq!(
        read(&out, "encoder.layer.1.attention.self.value.bias"),
        new_bias
    );
    assert_eq!(read(&out, "classifier.weight"), head);
}

#[test]
fn peft_modules_to_save_and_bias_arrive_as_whole_tensors() {
    let f = Fixture::new();
    let dir = f.path("peft");
    fixtures::write_peft_lora(&dir, 5, 2);
    // Add a trained bias and a classifier head as PEFT saves them.
    let st = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = parsed
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.shape().to_vec(),
                delta_client::numeric::to_f32("F32", v.data()).unwrap(),
            )
        })
        .collect();
    let head = values(77, 3 * HIDDEN);
    let bias = values(78, HIDDEN);
    tensors.push((
        "base_model.model.classifier.weight".into(),
        vec![3, HIDDEN],
        head.clone(),
    ));
    tensors.push((
        format!("base_model.model.{Q}.bias"),
        vec![HIDDEN],
        bias.clone(),
    ));
    write_f32(&dir.join("adapter_model.safetensors"), &tensors, None);
    let d = f.load(&dir);
    assert!(d.names().any(|n| n == "classifier.weight.new"));
    assert!(d.names().any(|n| n == format!("{Q}.bias.replace")));
    let out = f.apply(&[d], ApplyOptions::default(), "peft.safetensors");
    assert_eq!(read(&out, "classifier.weight"), head);
    assert_eq!(read(&out, &format!("{Q}.bias")), bias);
}

fn compose_opts(merge: Merge) -> ComposeOptions {
    ComposeOptions {
        mode: Mode::Parallel,
        merge,
        weights: vec![],
        rank: None,
        density: 1.0,
        seed: 7,
    }
}

#[test]
fn one_delta_with_weight_one_is_an_identity_for_every_merge() {
    let f = Fixture::new();
    let (d, _) = lora_delta(&f, "a", 50, 3, 5.0);
    let direct = read(
        &f.apply(
            &[f.load(&f.path("a"))],
            ApplyOptions::default(),
            "direct.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    for merge in [
        Merge::Cat,
        Merge::Linear,
        Merge::Svd,
        Merge::Ties,
        Merge::DareLinear,
        Merge::DareTies,
        Merge::MagnitudePrune,
    ] {
        let out = f.path(&format!("c-{}", merge.name()));
        let report = compose(std::slice::from_ref(&d), &compose_opts(merge), &out).unwrap();
        assert!(
            report.truncation_error.values().all(|e| *e < 1e-5),
            "{}: {:?}",
            merge.name(),
            report.truncation_error
        );
        let composed = f.load(&out);
        let got = read(
            &f.apply(
                &[composed],
                ApplyOptions::default(),
                &format!("{}.safetensors", merge.name()),
            ),
            &format!("{Q}.weight"),
        );
        assert_close(&got, &direct, 1e-5, merge.name());
    }
}

#[test]
fn cat_of_two_loras_is_their_sum_and_sequential_additive_is_the_sum() {
    let f = Fixture::new();
    let (a, da) = lora_delta(&f, "a", 60, 2, 4.0);
    let (b, db) = lora_delta(&f, "b", 70, 3, 3.0);
    let w = f.base_tensor(&format!("{Q}.weight"));
    let expected = add(&add(&w, &da), &db);

    let out = f.path("cat");
    let report = compose(&[a, b], &compose_opts(Merge::Cat), &out).unwrap();
    assert_eq!(report.manifest.config.lora.as_ref().unwrap().r, 5);
    let cat = read(
        &f.apply(&[f.load(&out)], ApplyOptions::default(), "cat.safetensors"),
        &format!("{Q}.weight"),
    );
    assert_close(&cat, &expected, 1e-5, "cat");

    let both = [f.load(&f.path("a")), f.load(&f.path("b"))];
    let par = read(
        &f.apply(&both, ApplyOptions::default(), "par.safetensors"),
        &format!("{Q}.weight"),
    );
    let seq = read(
        &f.apply(
            &both,
            ApplyOptions {
                sequential: true,
                ..Default::default()
            },
            "seq.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    assert_close(&par, &expected, 1e-6, "parallel");
    assert_close(&seq, &expected, 1e-6, "sequential");

    // Weighted: 0.5·A + 2·B, through compose and through apply.
    let weighted = add(
        &add(&w, &da.iter().map(|x| 0.5 * x).collect::<Vec<_>>()),
        &db.iter().map(|x| 2.0 * x).collect::<Vec<_>>(),
    );
    let wout = f.path("wcat");
    compose(
        &both,
        &ComposeOptions {
            weights: vec![0.5, 2.0],
            ..compose_opts(Merge::Cat)
        },
        &wout,
    )
    .unwrap();
    let got = read(
        &f.apply(
            &[f.load(&wout)],
            ApplyOptions::default(),
            "wcat.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &weighted, 1e-5, "weighted cat");
    let got = read(
        &f.apply(
            &both,
            ApplyOptions {
                weights: vec![0.5, 2.0],
                ..Default::default()
            },
            "wapply.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &weighted, 1e-6, "weighted apply");

    // linear re-factorised at the full rank is exact; at rank 1 it reports its error.
    let lin = f.path("lin");
    let report = compose(&both, &compose_opts(Merge::Linear), &lin).unwrap();
    assert!(report.truncation_error[Q] < 1e-5);
    let got = read(
        &f.apply(&[f.load(&lin)], ApplyOptions::default(), "lin.safetensors"),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &expected, 1e-5, "linear");
    let low = compose(
        &both,
        &ComposeOptions {
            rank: Some(1),
            ..compose_opts(Merge::Linear)
        },
        &f.path("low"),
    )
    .unwrap();
    assert!(low.truncation_error[Q] > 1e-3, "{:?}", low.truncation_error);
}

#[test]
fn ia3_and_lora_order_follows_the_math() {
    let f = Fixture::new();
    let (lora_d, dl) = lora_delta(&f, "lora", 80, 2, 2.0);
    let l = values(81, HIDDEN)
        .iter()
        .map(|x| 1.0 + x)
        .collect::<Vec<_>>();
    let ia3 = f.delta(
        "ia3",
        &[(format!("{Q}.ia3_l"), vec![HIDDEN], l.clone())],
        json!({"method": "ia3", "config": {"ia3": {"target_modules": ["query"]}}}),
    );
    let w = f.base_tensor(&format!("{Q}.weight"));
    let scale_rows = |m: &[f32]| -> Vec<f32> {
        m.iter()
            .enumerate()
            .map(|(i, x)| x * l[i / HIDDEN])
            .collect()
    };
    let ia3_then_lora = add(&scale_rows(&w), &dl);
    let lora_then_ia3 = scale_rows(&add(&w, &dl));
    let seq = ApplyOptions {
        sequential: true,
        ..Default::default()
    };

    let got = read(
        &f.apply(&[ia3, lora_d], seq.clone(), "il.safetensors"),
        &format!("{Q}.weight"),
    );
    assert_close(&got, &ia3_then_lora, 1e-6, "ia3 then lora");
    let got2 = read(
        &f.apply(
            &[f.load(&f.path("lora")), f.load(&f.path("ia3"))],
            seq,
            "li.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    assert_close(&got2, &lora_then_ia3, 1e-6, "lora then ia3");
    assert!(got != got2);
    // Parallel: both changes taken against the base.
    let par = read(
        &f.apply(
            &[f.load(&f.path("lora")), f.load(&f.path("ia3"))],
            ApplyOptions::default(),
            "p.safetensors",
        ),
        &format!("{Q}.weight"),
    );
    assert_close(
        &par,
        &add(&scale_rows(&w), &dl),
        1e-6,
        "parallel ia3 + lora",
    );
}

#[test]
fn dare_and_ties_are_seeded() {
    let f = Fixture::new();
    let both = [
        lora_delta(&f, "a", 90, 2, 2.0).0,
        lora_delta(&f, "b", 91, 2, 2.0).0,
    ];
    let run = |merge, seed, name: &str| {
        let out = f.path(name);
        compose(
            &both,
            &ComposeOptions {
                density: 0.5,
                seed,
                ..compose_opts(merge)
            },
            &out,
        )
        .unwrap();
        std::fs::read(out.join("delta.safetensors")).unwrap()
    };
    for merge in [Merge::DareLinear, Merge::DareTies, Merge::Ties] {
        let n = merge.name();
        assert_eq!(
            run(merge, 1, &format!("{n}1")),
            run(merge, 1, &format!("{n}1b")),
            "{n} not deterministic"
        );
    }
    assert_ne!(
        run(Merge::DareLinear, 1, "x1"),
        run(Merge::DareLinear, 2, "x2")
    );
    assert_ne!(run(Merge::DareTies, 1, "y1"), run(Merge::DareTies, 2, "y2"));
}

#[test]
fn bad_input_is_refused_and_leaves_no_output() {
    let f = Fixture::new();
    let (good, _) = lora_delta(&f, "good", 100, 2, 2.0);
    let out = f.path("out.safetensors");
    let err = |deltas: &[LoadedDelta], opts: ApplyOptions| {
        apply(&f.model, f.base.fingerprint, deltas, &opts, &out)
            .unwrap_err()
            .to_string()
    };

    // A different base: refused naming both fingerprints, unless forced.
    let other = f.path("other.safetensors");
    fixtures::write_base(&other, 2);
    let other_model = Model::open(&other).unwrap();
    let e = apply(
        &other_model,
        other_model.fingerprint(),
        std::slice::from_ref(&good),
        &ApplyOptions::default(),
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&f.base.fingerprint.to_string())
            && e.contains(&other_model.fingerprint().to_string()),
        "{e}"
    );
    assert!(!out.exists());
    let forced = apply(
        &other_model,
        other_model.fingerprint(),
        std::slice::from_ref(&good),
        &ApplyOptions {
            force: true,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    assert_eq!(forced.forced.len(), 1);
    std::fs::remove_file(&out).unwrap();

    // NaN refused unless allowed.
    let (mut t, m) = lora(101, 2, 2.0);
    t[0].2[3] = f32::NAN;
    let nan = f.delta("nan", &t, m);
    assert!(err(std::slice::from_ref(&nan), ApplyOptions::default()).contains("non-finite"));
    assert!(!out.exists());
    apply(
        &f.model,
        f.base.fingerprint,
        &[nan],
        &ApplyOptions {
            allow_nonfinite: true,
            ..Default::default()
        },
        &out,
    )
    .unwrap();

    // The output exists: refused without --overwrite, and left untouched.
    let before = std::fs::read(&out).unwrap();
    assert!(err(std::slice::from_ref(&good), ApplyOptions::default()).contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), before);
    apply(
        &f.model,
        f.base.fingerprint,
        std::slice::from_ref(&good),
        &ApplyOptions {
            overwrite: true,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    std::fs::remove_file(&out).unwrap();

    // Tensors missing from the base, and shapes that do not fit, are refused at load.
    for (name, shape) in [
        (
            "encoder.layer.9.attention.self.query.lora_A",
            vec![2, HIDDEN],
        ),
        (&*format!("{Q}.lora_A"), vec![2, HIDDEN + 1]),
    ] {
        let dir = f.path(&format!("bad-{}", shape[1]));
        std::fs::create_dir_all(&dir).unwrap();
        let b_name = name.replace("lora_A", "lora_B");
        write_f32(
            &dir.join("delta.safetensors"),
            &[
                (name.into(), shape.clone(), values(1, shape[0] * shape[1])),
                (b_name, vec![HIDDEN, 2], values(2, 2 * HIDDEN)),
            ],
            None,
        );
        std::fs::write(
            dir.join("delta.json"),
            r#"{"method":"lora","config":{"lora":{"r":2,"lora_alpha":2}}}"#,
        )
        .unwrap();
        let e = delta_client::delta::prepare(&dir, &f.base)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
    }

    // Adapters cannot be merged: the message says why and what to use.
    let adapter = f.delta(
        "adapter",
        &[(
            "adapter.layer.0.down".into(),
            vec![HIDDEN, 2],
            values(3, 2 * HIDDEN),
        )],
        json!({"method": "adapter"}),
    );
    let e = err(&[adapter], ApplyOptions::default());
    assert!(
        e.contains("cannot be merged") && e.contains("delta-worker predict"),
        "{e}"
    );

    // A truncated base file is refused at open with its path.
    let bytes = std::fs::read(&f.base_path).unwrap();
    let truncated = f.path("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let e = Model::open(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");
    assert!(!out.exists());
    // No temp files were left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn half_precision_bases_keep_their_dtype() {
    let f = Fixture::new();
    let (_, delta) = lora_delta(&f, "a", 110, 2, 2.0);
    for dtype in ["F16", "BF16"] {
        // The same base in half precision.
        let path = f.path(&format!("base-{dtype}.safetensors"));
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = fixtures::base_tensors(1)
            .into_iter()
            .map(|(n, s, v)| {
                let mut b = vec![0u8; v.len() * 2];
                delta_client::numeric::from_f32(dtype, &v, &mut b).unwrap();
                (n, s, b)
            })
            .collect();
        let dt = if dtype == "F16" {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::BF16
        };
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let model = Model::open(&path).unwrap();
        let out = f.path(&format!("out-{dtype}.safetensors"));
        apply(
            &model,
            model.fingerprint(),
            &[f.load(&f.path("a"))],
            &ApplyOptions {
                force: true,
                ..Default::default()
            },
            &out,
        )
        .unwrap();
        let merged = Model::open(&out).unwrap();
        assert!(merged.table().iter().all(|t| t.dtype == dtype));
        let expected = add(&read(&path, &format!("{Q}.weight")), &delta);
        assert_close(&read(&out, &format!("{Q}.weight")), &expected, 1e-2, dtype);
    }
}

/// The parent walker the CLI and the worker share: each parent is pulled by the digest
/// its child recorded, even when the recorded reference is a tag that has moved since,
/// and each delta comes once, whether a manifest lists its whole chain or only its
/// direct parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_chains_are_pinned_by_digest_and_walked_once() {
    let env = Env::start().await;
    let push = |name: &'static str, seed: u64, parents: serde_json::Value| {
        let dir = env.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_f32(
            &dir.join("delta.safetensors"),
            &[(
                format!("{Q}.weight.diff"),
                vec![HIDDEN, HIDDEN],
                values(seed, HIDDEN * HIDDEN),
            )],
            None,
        );
        let manifest = json!({"method": "diff", "parents": parents});
        std::fs::write(
            dir.join("delta.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let remote = env.remote.clone();
        async move {
            hub::push(
                &remote,
                &dir,
                &format!("team/{name}"),
                "tiny",
                &[],
                &hidden(),
            )
            .await
            .unwrap()
            .digest
        }
    };
    let a = push("a", 130, json!([])).await;
    // `team/a:latest` moves on to another delta after b and c were trained on a.
    let b = push(
        "b",
        131,
        json!([{"digest": a.to_string(), "reference": "team/a:latest"}]),
    )
    .await;
    let c = push(
        "c",
        132,
        json!([
            {"digest": a.to_string(), "reference": "team/a:latest"},
            {"digest": b.to_string(), "reference": "team/b:v1"},
        ]),
    )
    .await;
    let d = push(
        "d",
        133,
        json!([{"digest": c.to_string(), "reference": "team/c"}]),
    )
    .await;
    let moved = push("a", 134, json!([])).await;
    assert_ne!(moved, a);

    let digests = |chain: Vec<hub::PullReport>| chain.iter().map(|r| r.digest).collect::<Vec<_>>();
    let chain = |reference: &'static str| {
        let (remote, cache) = (env.remote.clone(), env.cache.clone());
        async move {
            hub::fetch_chain(&remote, &cache, reference, &hidden())
                .await
                .unwrap()
        }
    };
    // c lists its whole chain; d only its direct parent.
    assert_eq!(digests(chain("team/c").await), [a, b, c]);
    assert_eq!(digests(chain("team/d").await), [a, b, c, d]);

    // A parent recorded without a reference cannot be pulled: refused, naming it.
    let e_digest = push("e", 135, json!([{"digest": moved.to_string()}])).await;
    let e = hub::fetch_chain(&env.remote, &env.cache, "team/e", &hidden())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("has no reference to pull it from"),
        "{e}"
    );
    assert!(e.to_string().contains(&e_digest.to_string()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_pulls_missing_parents_unless_no_deps() {
    let env = Env::start().await;
    let parent = env.path("parent");
    fixtures::write_native_lora(&parent, 120, 2, json!({}));
    let p = hub::push(&env.remote, &parent, "team/parent", "tiny", &[], &hidden())
        .await
        .unwrap();
    let child = env.path("child");
    std::fs::create_dir_all(&child).unwrap();
    write_f32(
        &child.join("delta.safetensors"),
        &[(
            format!("{Q}.weight.diff"),
            vec![HIDDEN, HIDDEN],
            values(121, HIDDEN * HIDDEN),
        )],
        None,
    );
    let manifest = json!({"method": "diff", "parents": [{"digest": p.digest.to_string(), "reference": "team/parent:v1"}]});
    std::fs::write(
        child.join("delta.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    hub::push(&env.remote, &child, "team/child", "tiny", &[], &hidden())
        .await
        .unwrap();

    let base = env.base.to_str().unwrap().to_owned();
    let refused = env.path("refused.safetensors");
    let e = env
        .cli(&[
            "apply",
            "--base",
            &base,
            "team/child",
            "-o",
            refused.to_str().unwrap(),
            "--no-deps",
        ])
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("must be applied before it"),
        "{e:#}"
    );
    assert!(!refused.exists());

    let with_parent = env.path("with-parent.safetensors");
    env.cli(&[
        "apply",
        "--base",
        &base,
        "team/child",
        "-o",
        with_parent.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let explicit = env.path("explicit.safetensors");
    env.cli(&[
        "apply",
        "--base",
        &base,
        "team/parent",
        "team/child",
        "-o",
        explicit.to_str().unwrap(),
        "--sequential",
    ])
    .await
    .unwrap();
    assert_eq!(
        read(&with_parent, &format!("{Q}.weight")),
        read(&explicit, &format!("{Q}.weight"))
    );
    assert_ne!(
        read(&with_parent, &format!("{Q}.weight")),
        read(&env.base, &format!("{Q}.weight"))
    );

    // compose through the CLI, from the registry, and push the result.
    let composed = env.path("composed");
    env.cli(&[
        "compose",
        "team/parent",
        "team/child",
        "-o",
        composed.to_str().unwrap(),
        "--merge",
        "linear",
        "--rank",
        "3",
    ])
    .await
    .unwrap();
    env.cli(&[
        "push",
        composed.to_str().unwrap(),
        "team/merged",
        "--base",
        "tiny",
    ])
    .await
    .unwrap();
    assert_eq!(
        env.remote
            .resolve("team/merged")
            .await
            .unwrap()
            .manifest
            .method,
        "composite"
    );
}

#[test]
fn sharded_base_and_composition_records() {
    let f = Fixture::new();
    // The same base split over two shards applies identically.
    let shards = f.path("sharded");
    std::fs::create_dir_all(&shards).unwrap();
    let tensors = fixtures::base_tensors(1);
    let (first, second) = tensors.split_at(3);
    write_f32(&shards.join("model-1.safetensors"), first, None);
    write_f32(&shards.join("model-2.safetensors"), second, None);
    let map: serde_json::Map<String, serde_json::Value> = first
        .iter()
        .map(|t| (t.0.clone(), json!("model-1.safetensors")))
        .chain(
            second
                .iter()
                .map(|t| (t.0.clone(), json!("model-2.safetensors"))),
        )
        .collect();
    std::fs::write(
        shards.join("model.safetensors.index.json"),
        serde_json::to_vec(&json!({"weight_map": map})).unwrap(),
    )
    .unwrap();
    let sharded = Model::open(&shards).unwrap();
    assert_eq!(sharded.fingerprint(), f.base.fingerprint);
    let (d, _) = lora_delta(&f, "a", 130, 2, 2.0);
    let one = f.apply(
        &[f.load(&f.path("a"))],
        ApplyOptions::default(),
        "one.safetensors",
    );
    let out = f.path("from-shards.safetensors");
    apply(
        &sharded,
        sharded.fingerprint(),
        &[d],
        &ApplyOptions::default(),
        &out,
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&one).unwrap());

    // Adapters compose side by side (parallel) or stacked (sequential), recorded for the runtime.
    let a1 = f.delta(
        "ad1",
        &[(
            "adapter.layer.0.down".into(),
            vec![HIDDEN, 2],
            values(1, 16),
        )],
        json!({"method": "adapter"}),
    );
    let a2 = f.delta(
        "ad2",
        &[(
            "adapter.layer.0.down".into(),
            vec![HIDDEN, 2],
            values(2, 16),
        )],
        json!({"method": "adapter"}),
    );
    for (mode, layout) in [(Mode::Parallel, "parallel"), (Mode::Sequential, "stack")] {
        let out = f.path(&format!("adapters-{layout}"));
        let opts = ComposeOptions {
            mode,
            weights: vec![0.25, 0.75],
            ..compose_opts(Merge::Cat)
        };
        let r = compose(
            &[f.load(&f.path("ad1")), f.load(&f.path("ad2"))],
            &opts,
            &out,
        )
        .unwrap();
        let comp = &r.manifest.config.other["composition"];
        assert_eq!(comp["layout"], layout);
        assert_eq!(comp["members"][1]["weight"], 0.75);
        assert_eq!(comp["members"][0]["digest"], a1.digest.to_string());
        let names: Vec<&str> = r.manifest.tensors().map(|(_, t)| t.name.as_str()).collect();
        assert_eq!(names, ["adapter.0.layer.0.down", "adapter.1.layer.0.down"]);
    }
    let _ = a2;

    // The output manifest records inputs, weights, method, seed and tool version.
    let r = compose(
        &[f.load(&f.path("a"))],
        &ComposeOptions {
            seed: 42,
            weights: vec![0.5],
            ..compose_opts(Merge::Ties)
        },
        &f.path("rec"),
    )
    .unwrap();
    let p = &r.manifest.provenance["composed_from"];
    assert_eq!(p["merge"], "ties");
    assert_eq!(p["seed"], 42);
    assert_eq!(p["inputs"][0]["weight"], 0.5);
    assert!(p["tool"].as_str().unwrap().starts_with("delta "));

    // A sequential chain with IA3 cannot be folded without the base: refused with the way out.
    f.delta(
        "ia3",
        &[(format!("{Q}.ia3_l"), vec![HIDDEN], values(3, HIDDEN))],
        json!({"method": "ia3"}),
    );
    let e = compose(
        &[f.load(&f.path("a")), f.load(&f.path("ia3"))],
        &ComposeOptions {
            mode: Mode::Sequential,
            ..compose_opts(Merge::Cat)
        },
        &f.path("x"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("delta apply --sequential"), "{e}");
}

/// A delta trained in stages (`--parent`): each stage brings its own head. Applying the
/// child applies the parent, then the child, and the head is the last stage's; applying
/// both at once in parallel still refuses, naming the conflict.
#[test]
fn staged_deltas_apply_in_order_and_the_last_head_wins() {
    let f = Fixture::new();
    let head = |seed: u64| -> Vec<F32Tensor> {
        vec![
            (
                "classifier.weight.new".into(),
                vec![2, HIDDEN],
                values(seed, 2 * HIDDEN),
            ),
            ("classifier.bias.new".into(), vec![2], values(seed + 1, 2)),
        ]
    };
    let diff = |seed: u64| {
        (
            format!("{Q}.weight.diff"),
            vec![HIDDEN, HIDDEN],
            values(seed, HIDDEN * HIDDEN),
        )
    };
    let mut parent_tensors = head(10);
    parent_tensors.push(diff(11));
    let parent = f.delta("parent", &parent_tensors, json!({"method": "diff"}));
    let mut child_tensors = head(20);
    child_tensors.push(diff(21));
    let child = f.delta(
        "child",
        &child_tensors,
        json!({"method": "diff", "parents": [{"digest": parent.digest.to_string(), "reference": "team/parent:v1"}]}),
    );
    let (parent_dir, child_dir) = (f.path("parent"), f.path("child"));

    let out = f.apply(
        &[parent, child],
        ApplyOptions::default(),
        "staged.safetensors",
    );
    assert_eq!(read(&out, "classifier.weight"), values(20, 2 * HIDDEN));
    assert_eq!(read(&out, "classifier.bias"), values(21, 2));
    let want = add(
        &add(
            &f.base_tensor(&format!("{Q}.weight")),
            &values(11, HIDDEN * HIDDEN),
        ),
        &values(21, HIDDEN * HIDDEN),
    );
    assert_close(
        &read(&out, &format!("{Q}.weight")),
        &want,
        1e-6,
        "parent then child",
    );

    // compose folds the chain the same way (diffs add, the child's head wins), and
    // refuses the child without the parent it was trained on.
    let opts = ComposeOptions {
        mode: Mode::Sequential,
        ..compose_opts(Merge::Linear)
    };
    let folded = f.path("folded");
    compose(&[f.load(&parent_dir), f.load(&child_dir)], &opts, &folded).unwrap();
    let tensors = folded.join("delta.safetensors");
    assert_eq!(
        read(&tensors, "classifier.weight.new"),
        values(20, 2 * HIDDEN)
    );
    assert_close(
        &read(&tensors, &format!("{Q}.weight.diff")),
        &add(&values(11, HIDDEN * HIDDEN), &values(21, HIDDEN * HIDDEN)),
        1e-6,
        "folded diffs",
    );
    let alone = f.path("alone");
    let e = compose(&[f.load(&child_dir)], &opts, &alone).unwrap_err();
    assert!(
        e.to_string().contains("trained on top of team/parent:v1"),
        "{e}"
    );
    assert!(!alone.exists());

    // Two unrelated deltas adding the same head, in parallel: refused, nothing written.
    let a = f.delta("a", &head(30), json!({"method": "diff"}));
    let b = f.delta("b", &head(40), json!({"method": "diff"}));
    let out = f.path("conflict.safetensors");
    let e = apply(
        &f.model,
        f.base.fingerprint,
        &[a, b],
        &ApplyOptions::default(),
        &out,
    )
    .unwrap_err();
    assert!(e.to_string().contains("both add tensor classifier"), "{e}");
    assert!(!out.exists());
}
