//! The central delta service over loopback gRPC against a real registry: many teams'
//! deltas in one mixed batch, each answer equal to its delta run alone; references
//! resolved with each caller's token; bad input, moved tags, a caller that leaves and a
//! registry that goes down.

mod common;

use common::max_diff;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use clap::Parser;
use delta_client::jobs::{Method, TrainSpec};
use delta_proto::inference as pb;
use delta_proto::inference::inference_client::InferenceClient;
use delta_registry::auth::Scope;
use delta_tests::TestRegistry;
use delta_worker::data::{Split, Tok, sentiment_split};
use delta_worker::infer::{InferOptions, InferenceService};
use delta_worker::mixed::{Output, forward_alone};
use delta_worker::run::{Delta, LocalBase, TrainRequest, mount_all, train_to_dir};
use tonic::Code;
use tonic::transport::Channel;

struct Env {
    registry: Option<TestRegistry>,
    url: String,
    work: tempfile::TempDir,
}

impl Env {
    fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }

    fn token(&self, namespace: &str, scope: Scope) -> String {
        let db = self
            .registry
            .as_ref()
            .unwrap()
            .dir
            .path()
            .join("registry.sqlite");
        let namespace = namespace.to_owned();
        std::thread::spawn(move || {
            let meta = delta_registry::SqlMeta::open(&db).unwrap();
            delta_tests::new_token(&meta, &namespace, scope, false)
        })
        .join()
        .unwrap()
    }

    async fn cli(&self, token: &str, args: &[&str]) {
        let cache = self.path("cli-cache");
        let creds = self.path("credentials.json");
        let mut argv = vec![
            "delta",
            "--registry",
            &self.url,
            "--token",
            token,
            "--cache",
            cache.to_str().unwrap(),
            "--credentials",
            creds.to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        delta_client::cli::run(delta_client::cli::Cli::try_parse_from(argv).unwrap())
            .await
            .unwrap_or_else(|e| panic!("delta {args:?}: {e:#}"));
    }
}

/// Trains a small delta on the tiny base (a few real steps) into `out`.
fn train(base: &LocalBase, out: &Path, methods: &[Method], seed: u64) -> Delta {
    let mut spec = TrainSpec::new(methods);
    spec.epochs = 1;
    spec.seed = seed;
    spec.prompt_len = 4 + seed as usize % 3;
    spec.prefix_len = 2 + seed as usize % 4;
    spec.rank = 4;
    let data = sentiment_split(48, seed, false, Split::Train);
    let req = TrainRequest {
        spec: &spec,
        parents: &[],
        train: &data,
        eval: None,
        base_name: Some("tiny".into()),
        provenance: Default::default(),
    };
    train_to_dir(base, &req, out, &mut |_| Ok(())).unwrap();
    Delta::load_dir(out).unwrap()
}

/// What a delta gives for `texts` run alone, one text at a time.
fn alone(base: &LocalBase, chain: &[Delta], texts: &[&str], out: Output) -> Vec<Vec<f32>> {
    let tok: Tok = base.tokenizer(64).unwrap();
    let m = mount_all(base, chain).unwrap();
    texts
        .iter()
        .flat_map(|t| {
            let (ids, type_ids) = tok.encode(t, None).unwrap();
            let e = delta_worker::data::Encoded {
                ids,
                type_ids,
                label: None,
            };
            let b = delta_worker::data::batch(&[&e], &Device::Cpu).unwrap();
            forward_alone(&base.weights.config, &m, &b, out).unwrap()
        })
        .collect()
}

fn request<T>(body: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn inputs(texts: &[&str]) -> Vec<pb::Input> {
    texts
        .iter()
        .map(|t| pb::Input {
            text: (*t).to_owned(),
            text_pair: None,
        })
        .collect()
}

fn target(deltas: &[&str]) -> Option<pb::Target> {
    Some(pb::Target {
        deltas: deltas.iter().map(|d| (*d).to_owned()).collect(),
        base: String::new(),
    })
}

async fn predict(
    client: &InferenceClient<Channel>,
    token: Option<&str>,
    deltas: &[&str],
    texts: &[&str],
) -> Result<pb::PredictResponse, tonic::Status> {
    let body = pb::PredictRequest {
        target: target(deltas),
        inputs: inputs(texts),
    };
    Ok(client
        .clone()
        .predict(request(body, token))
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_service_runs_many_teams_deltas_in_mixed_batches() {
    let registry = TestRegistry::start().await;
    let env = Env {
        url: registry.url(),
        registry: Some(registry),
        work: tempfile::tempdir().unwrap(),
    };
    let admin = env.token("*", Scope::Admin);
    let a = env.token("team-a", Scope::Write);
    let b = env.token("team-b", Scope::Write);
    delta_worker::tiny::write_base(&env.path("models/tiny"), 1).unwrap();
    delta_worker::tiny::write_base(&env.path("elsewhere/tiny2"), 2).unwrap();
    for (name, dir) in [("tiny", "models/tiny"), ("tiny2", "elsewhere/tiny2")] {
        let dir = env.path(dir);
        env.cli(&admin, &["base", "add", name, dir.to_str().unwrap()])
            .await;
    }
    let base = LocalBase::open(&env.path("models/tiny"), &Device::Cpu).unwrap();
    let other = LocalBase::open(&env.path("elsewhere/tiny2"), &Device::Cpu).unwrap();

    // Deltas of every kind that mixes, one that does not (last layer), a spare nobody
    // asks for until the registry is down, and one for a base the service lacks.
    let kinds: [(&str, &str, &[Method], u64); 8] = [
        ("team-a", "lora", &[Method::Lora], 1),
        ("team-a", "prompt", &[Method::Prompt], 2),
        ("team-a", "prefix", &[Method::Prefix], 3),
        ("team-a", "adapter", &[Method::Adapter], 4),
        ("team-b", "bitfit", &[Method::Bitfit], 5),
        (
            "team-b",
            "mix",
            &[Method::Lora, Method::Prompt, Method::Bitfit],
            6,
        ),
        ("team-b", "last", &[Method::LastLayer], 7),
        ("team-a", "spare", &[Method::Lora], 8),
    ];
    let mut local = std::collections::HashMap::new();
    for (ns, name, methods, seed) in kinds {
        let dir = env.path(&format!("deltas/{name}"));
        let d = train(&base, &dir, methods, seed);
        let token = if ns == "team-a" { &a } else { &b };
        let target = format!("{ns}/{name}:prod");
        env.cli(
            token,
            &["push", dir.to_str().unwrap(), &target, "--base", "tiny"],
        )
        .await;
        local.insert(format!("{ns}/{name}:prod"), d);
    }
    let foreign = env.path("deltas/foreign");
    train(&other, &foreign, &[Method::Lora], 9);
    env.cli(
        &a,
        &[
            "push",
            foreign.to_str().unwrap(),
            "team-a/foreign:prod",
            "--base",
            "tiny2",
        ],
    )
    .await;

    // The service, on a lazily connected registry client (no token of its own).
    let remote = delta_client::Remote::connect_opts(
        &env.url,
        &delta_client::remote::ConnectOptions {
            token: None,
            ca_cert: None,
            lazy: true,
        },
    )
    .await
    .unwrap();
    let mut opts = InferOptions::new(env.path("models"), env.path("service-cache"));
    opts.max_wait = Duration::from_millis(300);
    opts.resolve_ttl = Duration::from_secs(1);
    let service = InferenceService::open(remote, opts).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.clone().serve(listener, async {
        stopped.await.ok();
    }));
    let client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "delta.inference.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // 1. Concurrent calls from both teams, each with its own delta and token, in one
    // batch; every answer equals the delta alone.
    let texts: [&[&str]; 4] = [
        &["a great and wonderful film"],
        &["the plot was dull", "boring acting and a messy script"],
        &["a charming delightful story", "awful", "lovely music"],
        &["tedious"],
    ];
    let calls: Vec<(&str, &String)> = vec![
        ("team-a/lora:prod", &a),
        ("team-a/prompt:prod", &a),
        ("team-a/prefix:prod", &a),
        ("team-a/adapter:prod", &a),
        ("team-b/bitfit:prod", &b),
        ("team-b/mix:prod", &b),
        ("team-b/last:prod", &b),
    ];
    let client = Arc::new(client);
    let mut handles = Vec::new();
    for (i, (reference, token)) in calls.iter().enumerate() {
        let (c, r, t) = (client.clone(), (*reference).to_owned(), (*token).clone());
        let these: Vec<String> = texts[i % 4].iter().map(|s| (*s).to_owned()).collect();
        handles.push(tokio::spawn(async move {
            let these: Vec<&str> = these.iter().map(String::as_str).collect();
            predict(&c, Some(&t), &[&r], &these).await
        }));
    }
    // The bare base's embeddings ride in the same batch.
    let embed = {
        let c = client.clone();
        tokio::spawn(async move {
            let body = pb::EmbedRequest {
                target: target(&[]),
                inputs: inputs(&["superb", "a poor and bland film"]),
                normalize: false,
            };
            c.as_ref().clone().embed(request(body, None)).await
        })
    };
    for (i, h) in handles.into_iter().enumerate() {
        let (reference, _) = calls[i];
        let got = h
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{reference}: {s:?}"));
        let chain = [local[reference].clone()];
        let want = alone(&base, &chain, texts[i % 4], Output::Logits);
        let logits: Vec<Vec<f32>> = got.predictions.iter().map(|p| p.logits.clone()).collect();
        let d = max_diff(&logits, &want);
        assert!(
            d <= 1e-5,
            "{reference}: the service differs from the delta alone by {d}"
        );
        assert_eq!(
            got.deltas[0].digest,
            local[reference].manifest.digest().to_string()
        );
        assert_eq!(got.labels, ["negative", "positive"]);
        for p in &got.predictions {
            let sum: f64 = p.probabilities.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9);
            assert_eq!(p.label, got.labels[p.label_index as usize]);
        }
    }
    let embedded = embed.await.unwrap().unwrap().into_inner();
    let values: Vec<Vec<f32>> = embedded
        .embeddings
        .iter()
        .map(|e| e.values.clone())
        .collect();
    let want = alone(
        &base,
        &[],
        &["superb", "a poor and bland film"],
        Output::Embedding,
    );
    assert!(max_diff(&values, &want) <= 1e-5);
    let stats = service.stats();
    assert!(
        stats.max_deltas_in_a_pass >= 4,
        "calls made together should share a forward pass: {stats:?}"
    );

    // 1b. The binary and the CLI: `delta-worker infer` on the same models answers
    // `delta predict --json` and `delta embed` with what the deltas give alone.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_delta-worker"))
        .args([
            "infer",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &env.url,
            "--models",
        ])
        .arg(env.path("models"))
        .arg("--cache")
        .arg(env.path("bin-cache"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let service_url = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            assert!(
                !line.contains('\x1b'),
                "colour codes in a log that is not a terminal: {line:?}"
            );
            if let Some(rest) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("listening"))
            {
                let addr = rest.split_whitespace().next().unwrap().to_owned();
                // Keep draining so the child never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return format!("http://{addr}");
            }
        }
        panic!("delta-worker infer exited before listening");
    })
    .await
    .unwrap();
    let input = env.path("input.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"a superb film\"}\n{\"text\": \"dull\"}\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut argv = vec!["delta", "--registry", &env.url, "--token", &a];
        argv.extend_from_slice(args);
        delta_client::cli::Cli::try_parse_from(argv).unwrap()
    };
    let ctx = delta_client::cli::Ctx {
        registry: env.url.clone(),
        cache: delta_client::Cache::new(&env.path("cli-cache")),
        json: true,
        token: Some(a.clone()),
        credentials: env.path("credentials.json"),
        ca_cert: None,
    };
    let parsed = cli(&[
        "--json",
        "predict",
        "team-a/prefix:prod",
        "--input",
        input.to_str().unwrap(),
        "--service",
        &service_url,
    ]);
    let delta_client::cli::Command::Predict(args) = parsed.command else {
        panic!("not predict")
    };
    let mut printed = Vec::new();
    delta_client::cli::infer::predict_to(args, &ctx, &mut printed)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(printed)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logits: Vec<Vec<f32>> = lines
        .iter()
        .map(|l| serde_json::from_value(l["logits"].clone()).unwrap())
        .collect();
    let want = alone(
        &base,
        &[local["team-a/prefix:prod"].clone()],
        &["a superb film", "dull"],
        Output::Logits,
    );
    assert!(max_diff(&logits, &want) <= 1e-5);
    assert_eq!(lines[1]["text"], "dull");
    let parsed = cli(&[
        "embed",
        "team-a/adapter:prod",
        "--input",
        input.to_str().unwrap(),
        "--service",
        &service_url,
    ]);
    let delta_client::cli::Command::Embed(args) = parsed.command else {
        panic!("not embed")
    };
    let human = delta_client::cli::Ctx { json: false, ..ctx };
    let mut printed = Vec::new();
    delta_client::cli::infer::embed_to(args, &human, &mut printed)
        .await
        .unwrap();
    let values: Vec<Vec<f32>> = String::from_utf8(printed)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    let want = alone(
        &base,
        &[local["team-a/adapter:prod"].clone()],
        &["a superb film", "dull"],
        Output::Embedding,
    );
    assert!(max_diff(&values, &want) <= 1e-5);
    child.kill().unwrap();
    child.wait().unwrap();

    // 2. Another team's delta is answered exactly like one that does not exist, even
    // once it is in the service's memory; without a token, likewise.
    let theirs = predict(&client, Some(&b), &["team-a/lora:prod"], &["great"])
        .await
        .unwrap_err();
    let nobody = predict(&client, Some(&b), &["team-a/nothing:prod"], &["great"])
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), nobody.code(), "{theirs:?} vs {nobody:?}");
    assert_eq!(
        theirs.message().replace("lora", "X"),
        nobody.message().replace("nothing", "X")
    );
    let anonymous = predict(&client, None, &["team-a/lora:prod"], &["great"])
        .await
        .unwrap_err();
    let anonymous_nobody = predict(&client, None, &["team-a/nothing:prod"], &["great"])
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), anonymous_nobody.code());
    assert!(
        !theirs
            .message()
            .contains(&local["team-a/lora:prod"].manifest.digest().to_string())
    );

    // 3. Bad input: one clear status each.
    let empty = predict(&client, Some(&a), &["team-a/lora:prod"], &[])
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("no inputs"), "{empty:?}");
    let long = ["great "; 80].concat();
    let too_long = predict(&client, Some(&a), &["team-a/lora:prod"], &[&long])
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        too_long.message().contains("limit of 64 tokens"),
        "{too_long:?}"
    );
    let foreign = predict(&client, Some(&a), &["team-a/foreign:prod"], &["great"])
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::FailedPrecondition);
    assert!(
        foreign.message().contains("does not hold base"),
        "{foreign:?}"
    );
    let mut body = pb::PredictRequest {
        target: target(&["team-a/lora:prod"]),
        inputs: inputs(&["great"]),
    };
    if let Some(t) = body.target.as_mut() {
        t.base = "nowhere".into();
    }
    let named = client
        .as_ref()
        .clone()
        .predict(request(body, Some(&a)))
        .await
        .unwrap_err();
    assert_eq!(named.code(), Code::FailedPrecondition);
    assert!(
        named.message().contains("does not hold base nowhere"),
        "{named:?}"
    );
    let headless = predict(&client, None, &[], &["great"]).await.unwrap_err();
    assert_eq!(headless.code(), Code::FailedPrecondition);
    assert!(
        headless.message().contains("classification head"),
        "{headless:?}"
    );

    // 4. A caller that leaves mid-batch: its rows are dropped, the others' answers are
    // their own.
    let leaving = {
        let c = client.clone();
        let t = a.clone();
        tokio::spawn(async move {
            let mut r = request(
                pb::PredictRequest {
                    target: target(&["team-a/prompt:prod"]),
                    inputs: inputs(&["lovely"]),
                },
                Some(&t),
            );
            r.set_timeout(Duration::from_millis(50));
            c.as_ref().clone().predict(r).await
        })
    };
    let staying = predict(&client, Some(&a), &["team-a/lora:prod"], &["dreadful"])
        .await
        .unwrap();
    let want = alone(
        &base,
        &[local["team-a/lora:prod"].clone()],
        &["dreadful"],
        Output::Logits,
    );
    assert!(max_diff(&[staying.predictions[0].logits.clone()], &want) <= 1e-5);
    let left = leaving.await.unwrap().unwrap_err();
    assert!(
        matches!(left.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{left:?}"
    );

    // 5. A moved tag is seen within the resolution TTL.
    let v2 = env.path("deltas/lora-v2");
    let newer = train(&base, &v2, &[Method::Lora], 11);
    env.cli(
        &a,
        &[
            "push",
            v2.to_str().unwrap(),
            "team-a/lora:prod",
            "--base",
            "tiny",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Six callers at once for the delta nobody has loaded yet: one pull, six answers.
    let mut same = Vec::new();
    for _ in 0..6 {
        let (c, t) = (client.clone(), a.clone());
        same.push(tokio::spawn(async move {
            predict(&c, Some(&t), &["team-a/lora:prod"], &["dreadful"]).await
        }));
    }
    let want = alone(
        &base,
        std::slice::from_ref(&newer),
        &["dreadful"],
        Output::Logits,
    );
    for h in same {
        let moved = h.await.unwrap().unwrap();
        assert_eq!(moved.deltas[0].digest, newer.manifest.digest().to_string());
        assert!(max_diff(&[moved.predictions[0].logits.clone()], &want) <= 1e-5);
    }

    // 6. The registry goes down: what callers resolved keeps serving (past the TTL), a
    // delta never loaded fails with UNAVAILABLE.
    let registry = {
        let mut env = env;
        let r = env.registry.take().unwrap();
        (r, env)
    };
    let (reg, env) = registry;
    reg.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let still = predict(&client, Some(&b), &["team-b/mix:prod"], &["great"])
        .await
        .unwrap();
    let want = alone(
        &base,
        &[local["team-b/mix:prod"].clone()],
        &["great"],
        Output::Logits,
    );
    assert!(max_diff(&[still.predictions[0].logits.clone()], &want) <= 1e-5);
    let new = predict(&client, Some(&a), &["team-a/spare:prod"], &["great"])
        .await
        .unwrap_err();
    assert_eq!(new.code(), Code::Unavailable, "{new:?}");
    drop(env);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
