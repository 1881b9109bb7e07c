//! Every method trains on a tiny random BERT (loss falls, held-out accuracy clearly beats
//! chance), saves in the native format, and reloads to the same predictions.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::bert::{BaseWeights, Batch};
use delta_worker::data::{
    Example, Split, Tok, sentiment_simple as sentiment, sentiment_split, sentiment_vocabulary,
};
use delta_worker::methods::Trainable;
use delta_worker::mounts::Mounts;
use delta_worker::mounts::classify;
use delta_worker::run::{Delta, LocalBase, TrainRequest, mount_all, train_to_dir};
use delta_worker::train::evaluate;

struct Setup {
    _dir: tempfile::TempDir,
    base: LocalBase,
    train: Vec<Example>,
    eval: Vec<Example>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    delta_worker::tiny::write_base(dir.path(), 1).unwrap();
    let base = LocalBase::open(dir.path(), &Device::Cpu).unwrap();
    Setup {
        _dir: dir,
        base,
        train: sentiment_split(480, 11, false, Split::Train),
        eval: sentiment_split(160, 12, false, Split::Eval),
    }
}

fn spec(methods: &[Method]) -> TrainSpec {
    let mut s = TrainSpec::new(methods);
    s.epochs = 4;
    s.eval_every = 10;
    s.lr = if methods.contains(&Method::Full) || methods.contains(&Method::Diff) {
        Some(2e-3)
    } else if methods
        .iter()
        .all(|m| matches!(m, Method::Prompt | Method::Prefix))
    {
        None
    } else {
        Some(1e-2)
    };
    s.rank = 4;
    s.bottleneck = 8;
    s.prefix_len = 4;
    s.prompt_len = 4;
    s
}

/// Trains `s` on `st` into `out`, checking that the loss falls and held-out accuracy clearly
/// beats chance.
fn train_learns(
    st: &Setup,
    s: &TrainSpec,
    parents: &[Delta],
    out: &std::path::Path,
) -> delta_worker::run::Trained {
    let req = TrainRequest {
        spec: s,
        parents,
        train: &st.train,
        eval: Some(&st.eval),
        base_name: Some("tiny".into()),
        provenance: BTreeMap::new(),
    };
    let trained = train_to_dir(&st.base, &req, out, &mut |_| Ok(())).unwrap();
    let losses: Vec<f64> = trained.history.iter().filter_map(|p| p.loss).collect();
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first - 0.1,
        "{:?}: loss did not fall ({first:.3} → {last:.3})",
        s.methods
    );
    let acc = trained.metrics["eval_accuracy"];
    assert!(acc >= 0.7, "{:?}: held-out accuracy {acc}", s.methods);
    trained
}

fn train_and_check(s: &TrainSpec, parents: &[Delta]) -> (Delta, BTreeMap<String, f64>) {
    let st = setup();
    let out = tempfile::tempdir().unwrap();
    let trained = train_learns(&st, s, parents, out.path());
    let acc = trained.metrics["eval_accuracy"];
    // The saved folder reloads and reproduces the recorded metrics exactly.
    let delta = Delta::load_dir(out.path()).unwrap();
    assert_eq!(delta.manifest, trained.manifest);
    let mut chain = parents.to_vec();
    chain.push(delta.clone());
    let tok = st.base.tokenizer(s.max_len).unwrap();
    let labels = delta.labels().unwrap();
    let data = tok.encode_all(&st.eval, &labels).unwrap();
    let e = evaluate(&mount_all(&st.base, &chain).unwrap(), &data, s.batch_size).unwrap();
    assert_eq!(e.accuracy, acc);
    assert_eq!(e.loss, trained.metrics["eval_loss"]);
    (delta, trained.metrics)
}

#[test]
fn lora_trains_and_round_trips() {
    let (d, _) = train_and_check(&spec(&[Method::Lora]), &[]);
    assert_eq!(d.manifest.method, "lora");
    assert!(
        d.tensors
            .contains_key("encoder.layer.0.attention.self.query.lora_A")
    );
    assert!(d.tensors.contains_key("classifier.weight.new"));
    assert!(
        !d.tensors
            .contains_key("encoder.layer.0.attention.self.key.lora_A")
    );
}

#[test]
fn houlsby_and_pfeiffer_adapters_train() {
    let (d, _) = train_and_check(&spec(&[Method::Adapter]), &[]);
    assert!(
        d.tensors
            .contains_key("adapter.encoder.layer.1.attention.output.up.weight")
    );
    let mut s = spec(&[Method::Adapter]);
    s.adapter_kind = "pfeiffer".into();
    let (d, _) = train_and_check(&s, &[]);
    assert!(
        !d.tensors
            .contains_key("adapter.encoder.layer.1.attention.output.up.weight")
    );
    assert!(
        d.tensors
            .contains_key("adapter.encoder.layer.1.output.up.weight")
    );
}

#[test]
fn bitfit_trains_only_biases() {
    let (d, _) = train_and_check(&spec(&[Method::Bitfit]), &[]);
    for name in d.tensors.keys() {
        assert!(
            name.ends_with(".bias.replace") || name.starts_with("classifier."),
            "{name}"
        );
    }
}

#[test]
fn prefix_tuning_trains_with_and_without_reparameterisation() {
    let (d, _) = train_and_check(&spec(&[Method::Prefix]), &[]);
    assert_eq!(d.tensors["prefix.layer.1.key"].dims(), &[4, 64]);
    let mut s = spec(&[Method::Prefix]);
    s.prefix_mlp = Some(16);
    let (d, _) = train_and_check(&s, &[]);
    // The MLP is folded away: only plain prefixes are saved.
    assert!(d.tensors.keys().all(|k| !k.starts_with("prefix_mlp")));
    assert_eq!(d.tensors["prefix.layer.0.value"].dims(), &[4, 64]);
}

#[test]
fn prompt_tuning_trains() {
    let (d, _) = train_and_check(&spec(&[Method::Prompt]), &[]);
    assert_eq!(d.tensors["prompt.embeddings"].dims(), &[4, 64]);
}

#[test]
fn last_layer_and_selective_modules_train() {
    let (d, _) = train_and_check(&spec(&[Method::LastLayer]), &[]);
    assert!(
        d.tensors
            .keys()
            .all(|k| k.starts_with("encoder.layer.1.") || k.starts_with("classifier."))
    );
    let mut s = spec(&[Method::Selective]);
    s.modules = vec!["intermediate.dense".into()];
    s.random_modules = Some(2);
    let (d, _) = train_and_check(&s, &[]);
    let chosen = d.manifest.config.other["selective"]["modules"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(chosen, 4, "2 named + 2 random modules");
    // Random choice is seeded: the same seed picks the same modules.
    let (d2, _) = train_and_check(&s, &[]);
    assert_eq!(
        d.manifest.config.other["selective"],
        d2.manifest.config.other["selective"]
    );
}

#[test]
fn diff_pruning_reports_its_sparsity() {
    let mut s = spec(&[Method::Diff]);
    s.sparsity = 0.9;
    s.l1 = 1e-5;
    s.targets = vec!["dense".into()];
    let (d, m) = train_and_check(&s, &[]);
    let achieved = m["diff_achieved_sparsity"];
    assert!(achieved >= 0.9, "sparsity {achieved}");
    let idx = &d.tensors["encoder.layer.0.output.dense.weight.diff_indices"];
    assert_eq!(idx.dtype(), candle_core::DType::I64);
    assert_eq!(
        d.manifest.provenance["metrics"]["diff_achieved_sparsity"],
        achieved
    );
}

#[test]
fn full_fine_tuning_is_the_baseline() {
    let (d, m) = train_and_check(&spec(&[Method::Full]), &[]);
    assert!(
        d.tensors
            .contains_key("embeddings.word_embeddings.weight.replace")
    );
    let lora = train_and_check(&spec(&[Method::Lora]), &[]).1;
    assert!(m["trainable_parameters"] > 20.0 * lora["trainable_parameters"]);
}

#[test]
fn several_methods_at_once_and_sequential_stages() {
    let (d, _) = train_and_check(
        &spec(&[Method::Prompt, Method::Bitfit, Method::Adapter]),
        &[],
    );
    assert_eq!(d.manifest.method, "composite");
    assert!(d.tensors.contains_key("prompt.embeddings"));
    assert!(d.tensors.keys().any(|k| k.starts_with("adapter.")));
    // A second stage trains LoRA on top of the frozen first delta and names it as parent.
    let (d2, _) = train_and_check(&spec(&[Method::Lora]), std::slice::from_ref(&d));
    assert_eq!(d2.manifest.parents.len(), 1);
    assert_eq!(d2.manifest.parents[0].digest, d.manifest.digest());
}

#[test]
fn the_same_seed_gives_identical_deltas() {
    let s = spec(&[Method::Lora]);
    let (a, _) = train_and_check(&s, &[]);
    let (b, _) = train_and_check(&s, &[]);
    assert_eq!(a.manifest.files[0].digest, b.manifest.files[0].digest);
    let mut s2 = s.clone();
    s2.seed = 7;
    let (c, _) = train_and_check(&s2, &[]);
    assert_ne!(a.manifest.files[0].digest, c.manifest.files[0].digest);
}

#[test]
fn gradient_accumulation_matches_a_bigger_batch() {
    // Two micro-batches of 8 and one batch of 16 see the same examples; with no dropout
    // the steps agree to rounding.
    let st = setup();
    let mut a = spec(&[Method::Lora]);
    a.max_steps = Some(3);
    a.eval_every = 1000;
    let mut b = a.clone();
    b.batch_size = 8;
    b.grad_accum = 2;
    let labels = vec!["negative".to_owned(), "positive".to_owned()];
    let tok = st.base.tokenizer(64).unwrap();
    let data = tok.encode_all(&st.train, &labels).unwrap();
    let run = |s: &TrainSpec| {
        let t = Trainable::new(s, &st.base.weights, &labels).unwrap();
        let frozen = Mounts::new(&st.base.weights);
        delta_worker::train::train(&t, &frozen, &data, None, &mut |_| Ok(())).unwrap();
        t.snapshot().unwrap()
    };
    let (x, y) = (run(&a), run(&b));
    for (p, q) in x.iter().zip(&y) {
        let diff = (p - q)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "accumulated step differs by {diff}");
    }
}

/// A finite-difference check of every trainable tensor kind: catches ops whose backward
/// silently cuts the graph (fused layer norm, softmax_last_dim, sdpa).
#[test]
fn gradients_match_finite_differences() {
    let mut cfg = delta_worker::tiny::config();
    cfg.hidden_size = 8;
    cfg.num_attention_heads = 2;
    cfg.intermediate_size = 16;
    let base = BaseWeights::random(cfg.clone(), 3, &Device::Cpu).unwrap();
    let tok = Tok::word_level(&sentiment_vocabulary(), 16).unwrap();
    let ex = sentiment(4, 5);
    let labels = vec!["negative".to_owned(), "positive".to_owned()];
    let data = tok.encode_all(&ex, &labels).unwrap();
    let refs: Vec<_> = data.iter().collect();
    let batch: Batch = delta_worker::data::batch(&refs, &Device::Cpu).unwrap();
    let gold: Vec<u32> = data.iter().map(|e| e.label.unwrap() as u32).collect();
    let gold = Tensor::new(gold.as_slice(), &Device::Cpu).unwrap();
    let mut s = TrainSpec::new(&[
        Method::Lora,
        Method::Adapter,
        Method::Prefix,
        Method::Prompt,
        Method::Bitfit,
    ]);
    s.rank = 2;
    s.bottleneck = 2;
    s.prefix_len = 2;
    s.prompt_len = 2;
    let t = Trainable::new(&s, &base, &labels).unwrap();
    // Move every tensor off zero so that no gradient vanishes by symmetry.
    let mut rng = delta_worker::rng::Rng::new(9);
    for (_, v) in &t.vars {
        let noise: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() * 0.3).collect();
        let noise = Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    let frozen = Mounts::new(&base);
    let loss = |t: &Trainable| -> Tensor {
        let m = t.mount(&frozen).unwrap();
        let logits = classify(&cfg, &m, &batch).unwrap();
        candle_nn::loss::cross_entropy(&logits, &gold).unwrap()
    };
    let grads = loss(&t).backward().unwrap();
    let eps = 1e-2f32;
    for (name, v) in &t.vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} gets no gradient: the graph is cut"));
        let flat = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Check the largest-gradient entry of each tensor.
        let i = gv
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        let eval_at = |delta: f32| -> f32 {
            let mut w = flat.clone();
            w[i] += delta;
            v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = loss(&t).to_scalar::<f32>().unwrap();
            v.set(&Tensor::from_vec(flat.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            l
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps);
        let analytic = gv[i];
        assert!(
            (numeric - analytic).abs() <= 2e-2 * analytic.abs().max(1e-2),
            "{name}[{i}]: analytic {analytic}, numeric {numeric}"
        );
    }
}

/// Dropout as Hugging Face trains (the base's config, or `--dropout`): seeded, so a seed
/// still fixes the delta byte for byte, and it changes what is learnt.
#[test]
fn dropout_is_seeded_and_takes_effect() {
    let st = setup();
    let run = |dropout: Option<f64>| {
        let mut s = TrainSpec::new(&[Method::Lora]);
        s.max_steps = Some(6);
        s.rank = 4;
        s.dropout = dropout;
        let out = tempfile::tempdir().unwrap();
        let req = TrainRequest {
            spec: &s,
            parents: &[],
            train: &st.train,
            eval: Some(&st.eval),
            base_name: Some("tiny".into()),
            provenance: BTreeMap::new(),
        };
        let t = train_to_dir(&st.base, &req, out.path(), &mut |_| Ok(())).unwrap();
        (t.manifest.files[0].digest, t.metrics["eval_loss"])
    };
    let (a, loss_a) = run(Some(0.2));
    let (b, loss_b) = run(Some(0.2));
    assert_eq!(a, b, "the same seed gives the same delta with dropout on");
    assert_eq!(
        loss_a, loss_b,
        "evaluation is deterministic (no dropout there)"
    );
    let (off, _) = run(None); // the tiny base's config has no dropout
    assert_ne!(a, off, "dropout changes the training");
    assert_eq!(run(Some(0.0)).0, off);
}

/// Mixed precision (`--precision bf16`): LoRA trains as well with bf16 products, the delta
/// records its precision, and a verification that follows the record reproduces its
/// metrics exactly (one in f32 measures close to them, not equal).
#[test]
fn lora_trains_in_mixed_precision_and_verifies_as_recorded() {
    use delta_worker::fused::Precision;
    let mut st = setup();
    st.base.weights.set_precision(Precision::Bf16).unwrap();
    let s = spec(&[Method::Lora]);
    let out = tempfile::tempdir().unwrap();
    let trained = train_learns(&st, &s, &[], out.path());
    let delta = Delta::load_dir(out.path()).unwrap();
    assert_eq!(delta.manifest.provenance["precision"], "bf16");
    let recorded = Precision::recorded(&delta.manifest.provenance);
    assert_eq!(recorded, Precision::Bf16);

    let mut fresh = LocalBase::open(&st.base.dir, &Device::Cpu).unwrap();
    fresh.weights.set_precision(recorded).unwrap();
    let report =
        delta_worker::run::verify(&fresh, std::slice::from_ref(&delta), &st.eval, "t", "cpu")
            .unwrap();
    assert!(report.passed, "{:?}", report.checks);
    assert_eq!(report.matches_recorded, Some(true), "{:?}", report.metrics);
    // Bf16 holds the linear weights in bf16 (half their bytes): no way back to f32
    // but opening the base again.
    let err = fresh.weights.set_precision(Precision::F32).unwrap_err();
    assert!(err.to_string().contains("open it again"), "{err}");
    let fresh = LocalBase::open(&st.base.dir, &Device::Cpu).unwrap();
    let mut half = LocalBase::open(&st.base.dir, &Device::Cpu).unwrap();
    half.weights.set_precision(Precision::Bf16).unwrap();
    let linear: usize = st
        .base
        .weights
        .config
        .linear_modules()
        .iter()
        .map(|m| fresh.weights.tensors[&format!("{m}.weight")].elem_count())
        .sum();
    assert_eq!(
        fresh.weights.bytes() - half.weights.bytes(),
        linear * 2,
        "bf16 halves the linear weights"
    );
    let f32_report =
        delta_worker::run::verify(&fresh, std::slice::from_ref(&delta), &st.eval, "t", "cpu")
            .unwrap();
    let (a, b) = (
        f32_report.metrics["eval_loss"],
        trained.metrics["eval_loss"],
    );
    assert!(a != b && (a - b).abs() < 1e-2, "f32 {a} vs bf16 {b}");
}
