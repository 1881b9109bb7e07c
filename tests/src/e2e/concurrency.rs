//! Many clients at once.

use delta_client::hub;
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
