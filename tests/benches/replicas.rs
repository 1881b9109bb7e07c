//! Scale-out figures next to the embedded ones, in one run: blob push and pull
//! throughput, manifest pushes per second and resolve latency on
//!
//! 1. the embedded registry (SQLite + local disk, one process);
//! 2. one replica on PostgreSQL + local disk (what the database alone costs);
//! 3. two replicas on PostgreSQL + S3 (moto): blobs pushed through one, pulled through the
//!    other; manifests and resolves spread over both.
//!
//! Needs moto and a PostgreSQL cluster: `./scripts/bench-replicas.sh` sets both up.

use std::path::Path;
use std::time::{Duration, Instant};

use delta_client::{Remote, hub};
use delta_registry::RegistryConfig;
use delta_tests::postgres::fresh_database;
use delta_tests::s3::Moto;
use delta_tests::{TestRegistry, fixtures};
use indicatif::ProgressBar;
use serde_json::json;

const BLOB_MIB: usize = 64;
const MANIFESTS: usize = 60;
const RESOLVES: usize = 4000;
const CALLERS: usize = 16;

struct Row {
    setup: &'static str,
    push_mib_s: f64,
    pull_mib_s: f64,
    manifests_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Runs the workload: `a` takes the writes, `b` serves the reads (the same registry for
/// one-node setups).
async fn measure(setup: &'static str, a: &Remote, b: &Remote, work: &Path) -> Row {
    let hidden = ProgressBar::hidden();
    let base = work.join("base.safetensors");
    fixtures::write_base(&base, 1);
    let model = delta_client::tensors::Model::open(&base).expect("base");
    a.add_base("tiny", &model.entries())
        .await
        .expect("add base");

    // One big blob up through `a`, down through `b` (both sides hash every byte).
    let blob = work.join("blob.bin");
    let bytes: Vec<u8> = (0..BLOB_MIB << 20)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    std::fs::write(&blob, &bytes).expect("write blob");
    let t = Instant::now();
    let digest = a.upload_blob_file(&blob, &hidden).await.expect("upload");
    let push = t.elapsed();
    let back = work.join("back.bin");
    let t = Instant::now();
    b.download_to(digest, &back, &hidden)
        .await
        .expect("download");
    let pull = t.elapsed();
    assert!(std::fs::read(&back).expect("read back") == bytes);

    // Small deltas pushed one after another, alternating replicas.
    let dirs: Vec<_> = (0..MANIFESTS)
        .map(|i| {
            let d = work.join(format!("d{i}"));
            fixtures::write_native_lora(&d, i as u64, 4, json!({"n": i.to_string()}));
            d
        })
        .collect();
    let t = Instant::now();
    for (i, d) in dirs.iter().enumerate() {
        let remote = if i % 2 == 0 { a } else { b };
        hub::push(remote, d, "bench/delta:prod", "tiny", &[], &hidden)
            .await
            .expect("push");
    }
    let manifests = t.elapsed();

    // Resolves from concurrent callers spread over both.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let remote = if c % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..RESOLVES / CALLERS {
                let t = Instant::now();
                remote.resolve("bench/delta:prod").await.expect("resolve");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await.expect("task"));
    }
    let _ = t.elapsed();
    lat.sort();
    let mib = BLOB_MIB as f64;
    Row {
        setup,
        push_mib_s: mib / push.as_secs_f64(),
        pull_mib_s: mib / pull.as_secs_f64(),
        manifests_s: MANIFESTS as f64 / manifests.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

fn with_database(
    url: String,
    store: Option<(String, Vec<(String, String)>)>,
) -> impl Fn(&Path) -> RegistryConfig {
    move |dir: &Path| {
        let mut c = RegistryConfig::for_test(dir);
        c.database_url = Some(url.clone());
        if let Some((store, options)) = &store {
            c.store_url = Some(store.clone());
            c.store_options = options.clone();
        }
        c
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("error")
        .try_init();
    let mut rows = Vec::new();

    let embedded = TestRegistry::start().await;
    let r = embedded.remote().await;
    let work = tempfile::tempdir().expect("tempdir");
    rows.push(measure("embedded: SQLite + local disk", &r, &r, work.path()).await);
    embedded.stop().await;

    let db = fresh_database();
    let dir = tempfile::tempdir().expect("tempdir");
    let one = TestRegistry::start_in(dir, with_database(db, None)).await;
    let r = one.remote().await;
    let work = tempfile::tempdir().expect("tempdir");
    rows.push(measure("1 replica: PostgreSQL + local disk", &r, &r, work.path()).await);
    one.stop().await;

    let moto = Moto::start("bench");
    let db = fresh_database();
    let store = Some((moto.url("hub"), moto.options()));
    let a = TestRegistry::start_in(
        tempfile::tempdir().expect("tempdir"),
        with_database(db.clone(), store.clone()),
    )
    .await;
    let b = TestRegistry::start_in(
        tempfile::tempdir().expect("tempdir"),
        with_database(db, store),
    )
    .await;
    let (ra, rb) = (a.remote().await, b.remote().await);
    let work = tempfile::tempdir().expect("tempdir");
    rows.push(measure("2 replicas: PostgreSQL + S3 (moto)", &ra, &rb, work.path()).await);
    a.stop().await;
    b.stop().await;

    let first = &rows[0];
    println!(
        "| setup | push {BLOB_MIB} MiB | pull {BLOB_MIB} MiB | manifest pushes | resolve p50 | resolve p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} MiB/s ({:.0}%) | {:.0} MiB/s ({:.0}%) | {:.1}/s ({:.0}%) | {:.2} ms | {:.2} ms |",
            r.setup,
            r.push_mib_s,
            100.0 * r.push_mib_s / first.push_mib_s,
            r.pull_mib_s,
            100.0 * r.pull_mib_s / first.pull_mib_s,
            r.manifests_s,
            100.0 * r.manifests_s / first.manifests_s,
            r.p50_ms,
            r.p99_ms
        );
    }
    println!("(percentages: of the embedded registry's figure in this run)");
}
