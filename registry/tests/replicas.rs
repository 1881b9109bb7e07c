//! Two `delta-registry` processes on one PostgreSQL database and one S3 bucket (moto), run
//! as the README's deployment section runs them: whatever one replica accepts, the other
//! serves; racing writers through both never duplicate a version, lose a tag move or share
//! a job; killing one mid-push leaves nothing partial and the other keeps serving.

mod common;

use std::path::Path;

use delta_client::delta::Format;
use delta_client::{Cache, Remote, hub};
use delta_proto::Digest;
use delta_proto::jobs::JobKind;
use delta_tests::fixtures;
use delta_tests::postgres::fresh_database;
use delta_tests::s3::Moto;
use indicatif::ProgressBar;

/// Flags and environment for a replica: `--database`, `--store` and the S3 settings,
/// as AWS_* variables or (`flags`) as `--store-option` flags.
fn replica_settings(db: &str, moto: &Moto, flags: bool) -> (Vec<String>, Vec<(String, String)>) {
    let mut args = vec![
        "--database".to_owned(),
        db.to_owned(),
        "--store".to_owned(),
        moto.url("hub"),
    ];
    let mut env = Vec::new();
    for (k, v) in moto.options() {
        if flags {
            args.extend(["--store-option".to_owned(), format!("{k}={v}")]);
        } else {
            env.push((k.to_uppercase(), v));
        }
    }
    (args, env)
}

async fn push(remote: &Remote, dir: &Path, target: &str) -> u64 {
    hub::push(remote, dir, target, "tiny", &[], &ProgressBar::hidden())
        .await
        .unwrap()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_and_s3() {
    let moto = tokio::task::spawn_blocking(|| Moto::start("replicas"))
        .await
        .unwrap();
    let db = tokio::task::spawn_blocking(fresh_database).await.unwrap();
    // A reads the S3 settings from AWS_* variables, B from --store-option flags.
    let (args, env) = replica_settings(&db, &moto, false);
    let (args_b, env_b) = replica_settings(&db, &moto, true);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = common::start_with(dir_a.path(), &args, &env);
    let mut b = common::start_with(dir_b.path(), &args_b, &env_b);
    let ra = Remote::connect(&a.url).await.unwrap();
    let rb = Remote::connect(&b.url).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let hidden = ProgressBar::hidden();

    // A base registered through A is known to B.
    let base = work.path().join("base.safetensors");
    fixtures::write_base(&base, 1);
    let model = delta_client::tensors::Model::open(&base).unwrap();
    assert!(ra.add_base("tiny", &model.entries()).await.unwrap());
    assert_eq!(
        rb.get_base("tiny").await.unwrap().fingerprint,
        model.fingerprint()
    );

    // Push through A; pull, resolve and list through B.
    let d1 = work.path().join("d1");
    fixtures::write_native_lora(&d1, 1, 4, serde_json::json!({"task": "shared"}));
    assert_eq!(push(&ra, &d1, "team/shared:prod").await, 1);
    let cache = Cache::new(&work.path().join("cache"));
    let out = work.path().join("pulled");
    hub::pull(
        &rb,
        &cache,
        "team/shared:prod",
        &out,
        Format::Native,
        &hidden,
    )
    .await
    .unwrap();
    assert_eq!(
        fixtures::tensor_bytes(&out.join("delta.safetensors")),
        fixtures::tensor_bytes(&d1.join("delta.safetensors"))
    );
    let listed = rb.list_repositories("team").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].repository.to_string(), "team/shared");

    // Eight pushes to one repository, alternating replicas: eight distinct versions.
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let remote = if i % 2 == 0 { ra.clone() } else { rb.clone() };
        let dir = work.path().join(format!("race{i}"));
        fixtures::write_native_lora(&dir, 10 + i, 4, serde_json::json!({"n": i.to_string()}));
        tasks.push(tokio::spawn(async move {
            push(&remote, &dir, "team/race").await
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    assert_eq!(ra.list_versions("team/race").await.unwrap().len(), 8);

    // Compare-and-swap tag moves through both replicas: 12 moves from v1 end at v13 only
    // if none was lost. Versions 9..=13 first, so every target exists.
    for i in 8..13u64 {
        let dir = work.path().join(format!("more{i}"));
        fixtures::write_native_lora(&dir, 10 + i, 4, serde_json::json!({"n": i.to_string()}));
        push(&ra, &dir, "team/race").await;
    }
    ra.set_tag("team/race:v1", "at", None).await.unwrap();
    let mut movers = Vec::new();
    for m in 0..4 {
        let remote = if m % 2 == 0 { ra.clone() } else { rb.clone() };
        movers.push(tokio::spawn(async move {
            let mut moved = 0;
            while moved < 3 {
                let now = remote.resolve("team/race:at").await.unwrap().version;
                if remote
                    .set_tag(&format!("team/race:v{}", now + 1), "at", Some(now))
                    .await
                    .is_ok()
                {
                    moved += 1;
                }
            }
        }));
    }
    for m in movers {
        m.await.unwrap();
    }
    assert_eq!(rb.resolve("team/race:at").await.unwrap().version, 13);

    // Workers leasing through either replica never share a job.
    // Not run: the test leases only.
    let data = work.path().join("train.jsonl");
    std::fs::write(&data, "{\"text\":\"a\",\"label\":0}\n").unwrap();
    let spec = serde_json::json!({
        "base": model.fingerprint().to_string(),
        "train": ra.upload_blob_file(&data, &hidden).await.unwrap().to_string(),
        "spec": {"methods": ["lora"]},
    });
    let mut submitted = Vec::new();
    for i in 0..6 {
        let remote = if i % 2 == 0 { &ra } else { &rb };
        submitted.push(
            remote
                .submit_job(JobKind::Train, &spec, "team/jobs", &[], &[])
                .await
                .unwrap()
                .id,
        );
    }
    let mut leasers = Vec::new();
    for w in 0..12 {
        let remote = if w % 2 == 0 { ra.clone() } else { rb.clone() };
        leasers.push(tokio::spawn(async move {
            remote
                .lease_job(&format!("w{w}"), &[], 60)
                .await
                .unwrap()
                .map(|(job, _)| job.id)
        }));
    }
    let mut leased = Vec::new();
    for l in leasers {
        leased.extend(l.await.unwrap());
    }
    leased.sort_unstable();
    assert_eq!(leased, submitted, "each job leased exactly once");

    // Kill A in the middle of a 12 MiB upload and before its manifest: B keeps serving,
    // the half-uploaded blob is not visible anywhere, and B accepts the push whole.
    let before = rb.list_versions("team/race").await.unwrap().len();
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut raw = common::client(&a.url).await;
    let half = common::upload(&mut raw, &big, 6 << 20).await;
    assert!(!half.committed);
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let big_digest = Digest::of(&big);
    assert_eq!(rb.missing(&[big_digest]).await.unwrap(), vec![big_digest]);
    assert_eq!(rb.list_versions("team/race").await.unwrap().len(), before);
    let mut raw_b = common::client(&b.url).await;
    assert!(common::upload(&mut raw_b, &big, big.len()).await.committed);
    assert!(rb.missing(&[big_digest]).await.unwrap().is_empty());
    let d2 = work.path().join("after-kill");
    fixtures::write_native_lora(&d2, 99, 4, serde_json::json!({}));
    assert_eq!(push(&rb, &d2, "team/race").await, 14);

    // A restarted replica serves everything B accepted meanwhile.
    let mut a = common::start_with(dir_a.path(), &args, &env);
    let ra = Remote::connect(&a.url).await.unwrap();
    assert_eq!(ra.resolve("team/race").await.unwrap().version, 14);
    assert!(ra.missing(&[big_digest]).await.unwrap().is_empty());
    for r in [&mut a, &mut b] {
        r.child.kill().unwrap();
        r.child.wait().unwrap();
    }
}
