use super::*;

fn ti(name: &str, shape: &[u64]) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        dtype: "F32".into(),
        shape: shape.to_vec(),
    }
}

fn base() -> BTreeMap<String, TensorInfo> {
    [
        ti("enc.q.weight", &[8, 4]),
        ti("enc.q.bias", &[8]),
        ti("enc.ff.weight", &[16, 8]),
    ]
    .into_iter()
    .map(|t| (t.name.clone(), t))
    .collect()
}

fn lora(tensors: Vec<TensorInfo>) -> Manifest {
    Manifest {
        schema_version: SCHEMA_VERSION,
        method: "lora".into(),
        config: MethodConfig {
            lora: Some(LoraConfig {
                r: 2,
                lora_alpha: 4.0,
                use_rslora: false,
                fan_in_fan_out: false,
                target_modules: vec!["q".into()],
                bias: "none".into(),
                modules_to_save: vec![],
                rank_pattern: BTreeMap::new(),
                alpha_pattern: BTreeMap::new(),
                lora_bias: false,
            }),
            ..MethodConfig::default()
        },
        base: BaseRef {
            fingerprint: Digest::of(b"base"),
            name: Some("tiny".into()),
        },
        files: vec![FileEntry {
            path: "delta.safetensors".into(),
            digest: Digest::of(b"f"),
            size: 10,
            tensors,
        }],
        parents: vec![],
        provenance: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

#[test]
fn canonical_json_is_stable_and_sorted() {
    let m = lora(vec![
        ti("enc.q.lora_A", &[2, 4]),
        ti("enc.q.lora_B", &[8, 2]),
    ]);
    let bytes = m.canonical_json();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.starts_with("{\"base\":"), "{text}");
    assert!(!text.contains(' '));
    let back = Manifest::from_json(&bytes).unwrap();
    assert_eq!(back.canonical_json(), bytes);
    assert_eq!(back.digest(), m.digest());
}

#[test]
fn lora_shapes_are_checked_against_the_base() {
    let good = lora(vec![
        ti("enc.q.lora_A", &[2, 4]),
        ti("enc.q.lora_B", &[8, 2]),
    ]);
    good.check_against_base(&base()).unwrap();

    let wrong_in = lora(vec![
        ti("enc.q.lora_A", &[2, 5]),
        ti("enc.q.lora_B", &[8, 2]),
    ]);
    let err = wrong_in
        .check_against_base(&base())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enc.q.lora_A") && err.contains("[8, 4]"),
        "{err}"
    );

    let rank_mismatch = lora(vec![
        ti("enc.q.lora_A", &[2, 4]),
        ti("enc.q.lora_B", &[8, 3]),
    ]);
    assert!(rank_mismatch.check_against_base(&base()).is_err());

    let missing = lora(vec![
        ti("enc.k.lora_A", &[2, 4]),
        ti("enc.k.lora_B", &[8, 2]),
    ]);
    let err = missing.check_against_base(&base()).unwrap_err().to_string();
    assert!(err.contains("enc.k.weight"), "{err}");

    let unpaired = lora(vec![ti("enc.q.lora_A", &[2, 4])]);
    assert!(unpaired.check_against_base(&base()).is_err());

    // The config's rank must match the tensors (RELIABILITY C29).
    let wrong_rank = lora(vec![
        ti("enc.q.lora_A", &[3, 4]),
        ti("enc.q.lora_B", &[8, 3]),
    ]);
    let err = wrong_rank
        .check_against_base(&base())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank 3") && err.contains("declares 2"),
        "{err}"
    );
    let mut patterned = wrong_rank.clone();
    patterned
        .config
        .lora
        .as_mut()
        .unwrap()
        .rank_pattern
        .insert("q".into(), 3);
    patterned.check_against_base(&base()).unwrap();
}

fn typed(name: &str, dtype: &str, shape: &[u64]) -> TensorInfo {
    TensorInfo {
        dtype: dtype.into(),
        ..ti(name, shape)
    }
}

#[test]
fn other_roles_are_checked() {
    let ok = lora(vec![
        ti("enc.q.bias.replace", &[8]),
        ti("enc.ff.weight.diff", &[16, 8]),
        ti("enc.ff.ia3_l", &[8]),
        ti("enc.q.ia3_l", &[8]),
        ti("enc.q.lora_bias", &[8]),
        typed("enc.q.weight.diff_indices", "I64", &[3]),
        ti("enc.q.weight.diff_values", &[3]),
        ti("classifier.weight.new", &[2, 8]),
        ti("adapter.layer0.down", &[8, 2]),
    ]);
    ok.check_against_base(&base()).unwrap();
    // Each refusal names the tensor and the reason.
    let cases: Vec<(Vec<TensorInfo>, &str)> = vec![
        (
            vec![ti("enc.q.bias.replace", &[9])],
            "differs from base enc.q.bias",
        ),
        (
            vec![ti("enc.q.weight.diff", &[4, 8])],
            "differs from base enc.q.weight",
        ),
        (
            vec![ti("enc.k.weight.diff", &[8, 4])],
            "targets enc.k.weight, which the base does not have",
        ),
        (
            vec![ti("enc.q.weight.new", &[8, 4])],
            "which the base already has",
        ),
        (
            vec![ti("enc.q.ia3_l", &[3])],
            "fits neither side of enc.q.weight",
        ),
        (
            vec![ti("enc.q.lora_bias", &[4])],
            "does not match the output size of enc.q.weight",
        ),
        (
            vec![ti("enc.q.weight.mystery", &[8, 4])],
            "has no known role",
        ),
        (
            vec![typed("enc.q.weight.diff", "I32", &[8, 4])],
            "dtype I32 is not a float type",
        ),
        (
            vec![ti("enc.q.lora_B", &[8, 2])],
            "has no matching enc.q.lora_A",
        ),
        (
            vec![ti("enc.q.lora_A", &[2, 4])],
            "has no matching enc.q.lora_B",
        ),
        (
            vec![ti("enc.q.weight.diff_values", &[3])],
            "has no matching enc.q.weight.diff_indices",
        ),
        (
            vec![typed("enc.q.weight.diff_indices", "I64", &[3])],
            "has no matching enc.q.weight.diff_values",
        ),
        (
            vec![
                typed("enc.q.weight.diff_indices", "F32", &[3]),
                ti("enc.q.weight.diff_values", &[3]),
            ],
            "sparse diff needs I64 indices [k] and values [k]",
        ),
        (
            vec![
                typed("enc.q.weight.diff_indices", "I64", &[3]),
                ti("enc.q.weight.diff_values", &[4]),
            ],
            "sparse diff needs I64 indices [k] and values [k]",
        ),
    ];
    for (tensors, reason) in cases {
        let first = tensors[0].name.clone();
        let err = lora(tensors)
            .check_against_base(&base())
            .expect_err(&first)
            .to_string();
        assert!(
            err.contains(&first) && err.contains(reason),
            "{first}: {err}"
        );
    }
}

#[test]
fn fan_in_fan_out_lora_reads_the_base_weight_transposed() {
    let mut m = lora(vec![
        ti("enc.q.lora_A", &[2, 8]),
        ti("enc.q.lora_B", &[4, 2]),
        ti("enc.q.lora_bias", &[4]),
    ]);
    let err = m.check_against_base(&base()).unwrap_err().to_string();
    assert!(err.contains("expected A [r, 4] and B [8, r]"), "{err}");
    m.config.lora.as_mut().unwrap().fan_in_fan_out = true;
    m.check_against_base(&base()).unwrap();
}

#[test]
fn scale_honours_patterns_and_rslora() {
    let mut cfg = lora(vec![]).config.lora.unwrap();
    assert_eq!(cfg.scale_for("enc.q"), 2.0);
    cfg.alpha_pattern.insert("q".into(), 8.0);
    cfg.rank_pattern.insert("enc.q".into(), 4);
    assert_eq!(cfg.scale_for("enc.q"), 2.0);
    assert_eq!(cfg.rank_for("enc.q"), 4);
    assert_eq!(cfg.scale_for("enc.k"), 2.0);
    cfg.use_rslora = true;
    assert_eq!(cfg.scale_for("enc.q"), 4.0);
    assert!(!module_matches("q", "enc.qq"));
}

#[test]
fn self_consistency() {
    let mut m = lora(vec![
        ti("enc.q.lora_A", &[2, 4]),
        ti("enc.q.lora_B", &[8, 2]),
    ]);
    m.files[0].path = "../evil.safetensors".into();
    assert!(m.check_shape().is_err());
    let mut m = lora(vec![ti("a.lora_A", &[2, 4])]);
    m.method = "magic".into();
    assert!(m.check_shape().unwrap_err().to_string().contains("method"));
    assert!(Manifest::from_json(b"{\"schema_version\":1}").is_err());
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        // Arbitrary bytes never panic the manifest parser.
        #[test]
        fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::from_json(&bytes);
        }

        // Mutations of a valid manifest never panic parsing or the base check, and what is
        // accepted re-serialises to the same digest.
        #[test]
        fn mutated_manifests(pos in 0usize..2000, byte in 32u8..127) {
            let m = lora(vec![ti("enc.q.lora_A", &[2, 4]), ti("enc.q.lora_B", &[8, 2])]);
            let mut bytes = m.canonical_json();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(parsed) = Manifest::from_json(&bytes) {
                let _ = parsed.check_against_base(&base());
                let again = Manifest::from_json(&parsed.canonical_json()).unwrap();
                prop_assert_eq!(again.digest(), parsed.digest());
            }
        }

        // Random tensor names and shapes never panic the role and shape checks.
        #[test]
        fn random_tensor_tables(names in proptest::collection::vec("[a-z.]{0,12}(lora_A|lora_B|lora_bias|ia3_l|diff|diff_indices|diff_values|replace|new)?", 1..6),
                                shapes in proptest::collection::vec(proptest::collection::vec(0u64..20, 0..3), 6)) {
            let tensors: Vec<TensorInfo> = names.iter().zip(&shapes).map(|(n, s)| ti(n, s)).collect();
            let m = lora(tensors);
            let _ = m.check_shape();
            let _ = m.check_against_base(&base());
        }
    }
}
