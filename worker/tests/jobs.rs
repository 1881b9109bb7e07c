//! Registry + worker processes on loopback: `delta train --follow`, pull, apply, the same
//! predictions as the worker's; verification; a worker killed mid-job; co-training. The
//! worker runs on the test device (`DELTA_TEST_DEVICE`, the CPU unless
//! `scripts/test-cuda.sh` sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use delta_client::jobs::{JobState, TrainSpec};
use delta_tests::TestRegistry;
use delta_worker::data::{Split, sentiment_split, to_jsonl};
use delta_worker::run::{Delta, LocalBase, TrainRequest, train_to_dir};

struct Env {
    registry: TestRegistry,
    work: tempfile::TempDir,
}

impl Env {
    async fn start() -> Self {
        let registry = TestRegistry::start().await;
        let work = tempfile::tempdir().unwrap();
        let env = Self { registry, work };
        delta_worker::tiny::write_base(&env.path("models/tiny"), 1).unwrap();
        std::fs::write(
            env.path("train.jsonl"),
            to_jsonl(&sentiment_split(480, 11, false, Split::Train)),
        )
        .unwrap();
        std::fs::write(
            env.path("eval.jsonl"),
            to_jsonl(&sentiment_split(160, 12, false, Split::Eval)),
        )
        .unwrap();
        let base = env.path("models/tiny");
        env.cli(&["base", "add", "tiny", base.to_str().unwrap()])
            .await
            .unwrap();
        env
    }

    fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }

    async fn cli(&self, args: &[&str]) -> anyhow::Result<()> {
        let url = self.registry.url();
        let cache = self.path("cache");
        let creds = self.path("credentials.json");
        let mut argv = vec![
            "delta",
            "--registry",
            &url,
            "--cache",
            cache.to_str().unwrap(),
            "--credentials",
            creds.to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        delta_client::cli::run(delta_client::cli::Cli::try_parse_from(argv)?).await
    }

    fn worker(&self, extra: &[&str]) -> Child {
        Command::new(common::worker_bin())
            .args(["serve", "--registry", &self.registry.url(), "--models"])
            .arg(self.path("models"))
            .arg("--cache")
            .arg(self.path("worker-cache"))
            .args(["--device", &common::test_device_name()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }
}

fn predict(base: &Path, deltas: &[&str], input: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(common::worker_bin())
        .arg("predict")
        .args(["--device", &common::test_device_name()])
        .arg("--base")
        .arg(base)
        .args(deltas)
        .arg("--input")
        .arg(input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "worker exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("worker did not finish within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_follow_pull_apply_predicts_like_the_worker() {
    let env = Env::start().await;
    let mut worker = env.worker(&["--max-jobs", "2"]);
    let (train, eval) = (env.path("train.jsonl"), env.path("eval.jsonl"));
    env.cli(&[
        "train",
        "--base",
        "tiny",
        "--method",
        "lora",
        "--rank",
        "4",
        "--lr",
        "0.01",
        "--epochs",
        "3",
        "--eval-every",
        "20",
        "--train",
        train.to_str().unwrap(),
        "--eval",
        eval.to_str().unwrap(),
        "--push",
        "team/sentiment:best",
        "--follow",
    ])
    .await
    .unwrap();
    let remote = env.registry.remote().await;
    let r = remote.resolve("team/sentiment:best").await.unwrap();
    let m = &r.manifest;
    assert_eq!(m.method, "lora");
    let metrics = &m.provenance["metrics"];
    assert!(
        metrics["eval_accuracy"].as_f64().unwrap() >= 0.7,
        "{metrics}"
    );
    assert!(
        m.provenance["datasets"]["train"].is_string(),
        "dataset digests recorded"
    );
    assert_eq!(m.provenance["spec"]["rank"], 4);

    // Pull, apply, and run the applied model: the same predictions as the worker's
    // runtime with the delta mounted.
    let pulled = env.path("pulled");
    let applied = env.path("applied/model.safetensors");
    env.cli(&[
        "pull",
        "team/sentiment:best",
        "-o",
        pulled.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let base = env.path("models/tiny");
    env.cli(&[
        "apply",
        "--base",
        base.to_str().unwrap(),
        "team/sentiment:best",
        "-o",
        applied.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let mounted = predict(&base, &[pulled.to_str().unwrap()], &eval);
    // A registry reference mounts the same delta.
    let by_ref = predict(
        &base,
        &["--registry", &env.registry.url(), "team/sentiment:best"],
        &eval,
    );
    assert_eq!(by_ref, mounted);
    let merged = predict(applied.parent().unwrap(), &[], &eval);
    assert_eq!(mounted.len(), 160);
    let same = mounted
        .iter()
        .zip(&merged)
        .filter(|(a, b)| a["label_index"] == b["label_index"])
        .count();
    assert_eq!(same, 160, "merged and mounted predictions differ");

    // Verification on the worker reproduces the recorded metrics exactly and is listed.
    env.cli(&[
        "verify",
        "team/sentiment:best",
        "--eval",
        eval.to_str().unwrap(),
        "--follow",
    ])
    .await
    .unwrap();
    let reports = remote.list_reports("team/sentiment:best").await.unwrap();
    assert_eq!(reports.len(), 1);
    let report: serde_json::Value = serde_json::from_str(&reports[0].body).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["matches_recorded"], true, "{report}");
    assert_eq!(report["metrics"]["eval_accuracy"], metrics["eval_accuracy"]);
    env.cli(&["show", "team/sentiment:best"]).await.unwrap();
    wait(&mut worker, Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_nothing_and_the_job_finishes_elsewhere() {
    let env = Env::start().await;
    let train = env.path("train.jsonl");
    env.cli(&[
        "train",
        "--base",
        "tiny",
        "--method",
        "lora",
        "--max-steps",
        "600",
        "--eval-every",
        "1000",
        "--train",
        train.to_str().unwrap(),
        "--push",
        "team/long",
    ])
    .await
    .unwrap();
    let remote = env.registry.remote().await;
    let mut first = env.worker(&["--lease-seconds", "2"]);
    // Wait until the first worker is training, then kill it (SIGKILL).
    let start = Instant::now();
    loop {
        let (job, events) = remote.get_job(1, 0).await.unwrap();
        if job.state == JobState::Running && events.iter().any(|e| e.body.contains("\"step\":1")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job never started: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let (job, _) = remote.get_job(1, 0).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    assert!(
        remote.list_versions("team/long").await.is_err(),
        "nothing half-pushed"
    );

    // A second worker picks the job up once the dead worker's lease expires.
    let mut second = env.worker(&["--lease-seconds", "2", "--max-jobs", "1"]);
    wait(&mut second, Duration::from_secs(120));
    let (job, _) = remote.get_job(1, 0).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 2);
    let versions = remote.list_versions("team/long").await.unwrap();
    assert_eq!(versions.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_with_a_clear_error() {
    let env = Env::start().await;
    let bad = env.path("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"x\"}\nnot json\n").unwrap();
    let err = env
        .cli(&[
            "train",
            "--base",
            "tiny",
            "--method",
            "lora",
            "--train",
            bad.to_str().unwrap(),
            "--push",
            "team/x",
        ])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    let train = env.path("train.jsonl");
    let err = env
        .cli(&[
            "train",
            "--base",
            "tiny",
            "--method",
            "nope",
            "--train",
            train.to_str().unwrap(),
            "--push",
            "team/x",
        ])
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("invalid value 'nope' for '--method") && err.contains("possible values: lora"),
        "{err}"
    );
    // A job the worker cannot run (no such target module) fails and says why.
    let mut worker = env.worker(&["--max-jobs", "1"]);
    let err = env
        .cli(&[
            "train",
            "--base",
            "tiny",
            "--method",
            "lora",
            "--targets",
            "nosuchmodule",
            "--train",
            train.to_str().unwrap(),
            "--push",
            "team/x",
            "--follow",
        ])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("\"nosuchmodule\" matches no module"),
        "{err:#}"
    );
    wait(&mut worker, Duration::from_secs(30));
}

/// `--co-train 3`: three queued training jobs train in one mixed batch, each published on
/// its own, each equal to the same job trained alone (locally, same seed and data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_co_trains_queued_jobs_and_each_equals_its_job_alone() {
    let env = Env::start().await;
    let train = env.path("train.jsonl");
    let jobs: [(&str, &[&str]); 3] = [
        ("lora", &["--method", "lora", "--rank", "4", "--seed", "3"]),
        (
            "prompt",
            &[
                "--method",
                "prompt",
                "--prompt-len",
                "6",
                "--seed",
                "4",
                "--batch-size",
                "12",
            ],
        ),
        (
            "adapter",
            &[
                "--method",
                "adapter,bitfit",
                "--seed",
                "5",
                "--batch-size",
                "8",
            ],
        ),
    ];
    for (name, args) in jobs {
        let target = format!("team/{name}:co");
        let mut argv = vec![
            "train",
            "--base",
            "tiny",
            "--max-steps",
            "6",
            "--train",
            train.to_str().unwrap(),
            "--push",
            &target,
        ];
        argv.extend_from_slice(args);
        env.cli(&argv).await.unwrap();
    }
    let mut worker = env.worker(&["--max-jobs", "3", "--co-train", "3"]);
    tokio::task::block_in_place(|| wait(&mut worker, Duration::from_secs(120)));

    let remote = env.registry.remote().await;
    let base = LocalBase::open(&env.path("models/tiny"), &common::test_device()).unwrap();
    let examples = delta_worker::data::load_jsonl(&train).unwrap();
    for (name, _) in jobs {
        let r = remote.resolve(&format!("team/{name}:co")).await.unwrap();
        let m = &r.manifest;
        assert_eq!(
            m.provenance["co_trained_with"], 2,
            "{name}: {:?}",
            m.provenance
        );
        // The same job alone: the spec the worker recorded, the same data.
        let spec: TrainSpec = serde_json::from_value(m.provenance["spec"].clone()).unwrap();
        let out = env.path(&format!("alone-{name}"));
        let req = TrainRequest {
            spec: &spec,
            parents: &[],
            train: &examples,
            eval: None,
            base_name: Some("tiny".into()),
            provenance: Default::default(),
        };
        train_to_dir(&base, &req, &out, &mut |_| Ok(())).unwrap();
        let alone = Delta::load_dir(&out).unwrap();
        let pulled = delta_worker::serve::fetch_chain(
            &remote,
            &delta_client::Cache::new(&env.path("c")),
            &format!("team/{name}:co"),
        )
        .await
        .unwrap();
        let co = &pulled[0];
        assert_eq!(co.tensors.len(), alone.tensors.len());
        for (k, a) in &alone.tensors {
            let b = &co.tensors[k];
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-4, "{name}: {k} differs from the job alone by {d}");
        }
    }
}

/// A spec queued by an older registry that today's checks refuse (written into the queue's
/// database directly, as an upgrade would find it: here a dropout of 1.5) fails at lease,
/// the worker naming the setting, instead of training and failing at completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_spec_todays_checks_refuse_fails_at_lease_naming_it() {
    use delta_client::jobs::{JobKind, TrainJob};
    use delta_registry::meta::jobs::JobStore;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        spec: TrainSpec,
    }
    let env = Env::start().await;
    let base = LocalBase::open(&env.path("models/tiny"), &candle_core::Device::Cpu).unwrap();
    let job = TrainJob {
        base: base.fingerprint,
        base_name: None,
        train: delta_proto::Digest::of(b"{\"text\": \"x\", \"label\": \"positive\"}\n"),
        eval: None,
        parents: Vec::new(),
        spec: Flags::try_parse_from(["t", "--method", "lora"])
            .unwrap()
            .spec,
    };
    let mut spec = serde_json::to_value(&job).unwrap();
    spec["spec"]["dropout"] = serde_json::json!(1.5);
    let db =
        delta_registry::SqlMeta::open(&env.registry.dir.path().join("registry.sqlite")).unwrap();
    let queued = db
        .submit_job(
            JobKind::Train,
            &spec.to_string(),
            "team/old",
            "team",
            &base.fingerprint.to_string(),
            &[],
            &delta_registry::meta::Actor::local(0),
        )
        .unwrap();

    let mut worker = env.worker(&["--max-jobs", "1"]);
    wait(&mut worker, Duration::from_secs(30));
    let remote = env.registry.remote().await;
    let (job, _) = remote.get_job(queued.id, 0).await.unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert!(
        job.error.contains("job spec") && job.error.contains("--dropout 1.5"),
        "{}",
        job.error
    );
    assert!(remote.list_versions("team/old").await.is_err());
}
