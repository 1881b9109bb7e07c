//! Many clients at once.

use delta_client::hub;
use delta_proto::jobs::JobKind;
use serde_json::json;

use super::{Env, hidden};
use crate::fixtures;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_pushes_of_overlapping_deltas() {
    let env = Env::start().await;
    // Four distinct deltas, each pushed by four clients at once to four repositories:
    // 16 pushes, overlapping blobs.
    for seed in 0..4 {
        fixtures::write_native_lora(&env.path(&format!("d{seed}")), 100 + seed, 4, json!({}));
    }
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let url = env.registry.url();
        let dir = env.path(&format!("d{}", i % 4));
        tasks.push(tokio::spawn(async move {
            let remote = delta_client::Remote::connect(&url).await.unwrap();
            let repo = format!("team-{}/shared", i / 4);
            hub::push(&remote, &dir, &repo, "tiny", &[], &hidden())
                .await
                .unwrap()
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }
    // Each blob is stored once.
    assert_eq!(env.stored_blobs(), 4);
    // Each repository got each delta once, with versions 1..=n and no duplicates.
    for r in 0..4 {
        let versions = env
            .remote
            .list_versions(&format!("team-{r}/shared"))
            .await
            .unwrap();
        let mut numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        numbers.sort();
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
        assert!(!numbers.is_empty() && numbers.len() <= 4);
    }
    assert_eq!(reports.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tag_moves_with_compare_and_swap_lose_no_update() {
    let env = Env::start().await;
    // 41 versions of one repository.
    let dir = env.path("d");
    for i in 0..41u64 {
        fixtures::write_native_lora(&dir, 500 + i, 2, json!({"n": i.to_string()}));
        hub::push(&env.remote, &dir, "team/counter", "tiny", &[], &hidden())
            .await
            .unwrap();
    }
    env.remote
        .set_tag("team/counter:v1", "at", Some(0))
        .await
        .unwrap();

    // 8 clients each advance the tag 5 times by compare-and-swap (retrying when another
    // client moved it first), while 8 others pull and list the same repository.
    let mut movers = Vec::new();
    for _ in 0..8 {
        let url = env.registry.url();
        movers.push(tokio::spawn(async move {
            let remote = delta_client::Remote::connect(&url).await.unwrap();
            let mut done = 0;
            while done < 5 {
                let current = remote.resolve("team/counter:at").await.unwrap().version;
                let next = format!("team/counter:v{}", current + 1);
                if remote.set_tag(&next, "at", Some(current)).await.is_ok() {
                    done += 1;
                }
            }
        }));
    }
    let mut readers = Vec::new();
    for i in 0..8 {
        let url = env.registry.url();
        let cache = delta_client::Cache::new(&env.path(&format!("cache-{i}")));
        let out = env.path(&format!("out-{i}"));
        readers.push(tokio::spawn(async move {
            let remote = delta_client::Remote::connect(&url).await.unwrap();
            for _ in 0..5 {
                let opts = hub::PullOptions {
                    format: delta_client::delta::Format::Native,
                    overwrite: true,
                    no_cache: false,
                };
                hub::pull_with(&remote, &cache, "team/counter", &out, opts, &hidden())
                    .await
                    .unwrap();
                assert_eq!(
                    remote.list_versions("team/counter").await.unwrap().len(),
                    41
                );
            }
        }));
    }
    for t in movers.into_iter().chain(readers) {
        t.await.unwrap();
    }
    // 40 successful moves from v1: any lost update would leave the tag short of v41.
    assert_eq!(
        env.remote.resolve("team/counter:at").await.unwrap().version,
        41
    );
}

/// Workers racing for jobs: every job goes to exactly one of them, and a lease another
/// worker took cannot be renewed, reported on or completed by the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_never_share_a_job() {
    let env = Env::start().await;
    // Not run: the test leases only.
    let spec = env.train_job(&env.remote).await;
    for _ in 0..3 {
        env.remote
            .submit_job(JobKind::Train, &spec, "team/raced", &[], &[])
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let remote = env.remote.clone();
        tasks.push(tokio::spawn(async move {
            remote
                .lease_job(&format!("w{w}"), &[], 60)
                .await
                .unwrap()
                .map(|(j, lease)| (j.id, lease))
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        if let Some(x) = t.await.unwrap() {
            got.push(x);
        }
    }
    let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3], "each job leased exactly once");
    // A wrong lease token is refused everywhere, and nothing is published with it.
    let (id, lease) = &got[0];
    let e = env
        .remote
        .renew_lease(*id, "not-the-lease", 60)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no longer holds its lease"), "{e}");
    let e = env
        .remote
        .complete_job(*id, "not-the-lease", Some("x"), None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no longer holds its lease"), "{e}");
    // The lease is checked before the manifest: a caller without it learns nothing about
    // what the job expects (here, a manifest on another base).
    let dir = env.path("published");
    crate::fixtures::write_native_lora(&dir, 1, 2, serde_json::json!({}));
    delta_client::hub::push(
        &env.remote,
        &dir,
        "team/other",
        "tiny",
        &[],
        &super::hidden(),
    )
    .await
    .unwrap();
    let mut manifest = env.remote.resolve("team/other").await.unwrap().manifest;
    manifest.base.fingerprint = delta_proto::Digest::of(b"another base");
    let e = env
        .remote
        .complete_job(*id, "not-the-lease", None, Some(&manifest), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no longer holds its lease"), "{e}");
    let e = env
        .remote
        .complete_job(*id, lease, None, Some(&manifest), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("trains on base"), "{e}");
    env.remote.renew_lease(*id, lease, 60).await.unwrap();
    let done = env
        .remote
        .complete_job(*id, lease, Some("gave up"), None, None)
        .await
        .unwrap();
    assert_eq!(
        (done.state.as_str(), done.error.as_str()),
        ("failed", "gave up")
    );
    // A finished job cannot be completed again.
    assert!(
        env.remote
            .complete_job(*id, lease, Some("again"), None, None)
            .await
            .is_err()
    );
}
