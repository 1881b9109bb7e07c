//! Configured limits and misbehaving clients: each gets a clear refusal, nothing hangs.

use std::time::Duration;

use bytes::Bytes;
use delta_client::{Remote, hub};
use delta_proto::jobs::JobKind;
use delta_proto::{Digest, UploadChunk};
use delta_registry::RegistryConfig;
use futures::StreamExt;
use serde_json::json;
use tonic::Code;

use super::{Engine, Env, code, hidden};
use crate::{TestRegistry, fixtures};

async fn registry(tune: impl FnOnce(&mut RegistryConfig)) -> (TestRegistry, Remote) {
    let dir = tempfile::tempdir().unwrap();
    let reg = TestRegistry::start_in(dir, |p| {
        let mut c = RegistryConfig::for_test(p);
        tune(&mut c);
        c
    })
    .await;
    let remote = reg.remote().await;
    (reg, remote)
}

#[tokio::test]
async fn a_stalled_upload_is_cut_and_stays_resumable() {
    let (_reg, remote) = registry(|c| c.stream_idle_timeout = Duration::from_millis(300)).await;
    let data = Bytes::from(vec![1u8; 3000]);
    let d = Digest::of(&data);
    let (id, _) = remote.start_upload(d, 3000).await.unwrap().unwrap();
    let stalled = futures::stream::iter(vec![UploadChunk {
        upload_id: id.clone(),
        offset: 0,
        data: data.slice(..1000),
    }])
    .chain(futures::stream::pending());
    let r = tokio::time::timeout(Duration::from_secs(20), remote.upload_stream(stalled))
        .await
        .expect("the registry must cut a stalled stream");
    assert_eq!(code(&r.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(remote.upload_offset(&id).await.unwrap(), 1000);
}

#[tokio::test]
async fn oversized_messages_and_blobs_are_refused() {
    let (_reg, remote) = registry(|c| c.max_blob_bytes = 1 << 20).await;
    let e = remote
        .start_upload(Digest::of(b"big"), 2 << 20)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted);
    assert!(e.to_string().contains("limit"), "{e}");

    // A message over the 5 MiB decoding limit: RESOURCE_EXHAUSTED naming the limit.
    let data = Bytes::from(vec![2u8; 900 << 10]);
    let (id, _) = remote
        .start_upload(Digest::of(&data), data.len() as u64)
        .await
        .unwrap()
        .unwrap();
    let huge = futures::stream::iter(vec![UploadChunk {
        upload_id: id,
        offset: 0,
        data: Bytes::from(vec![0u8; 6 << 20]),
    }]);
    let e = remote.upload_stream(huge).await.unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted, "{e:?}");
    assert!(e.to_string().contains("limit"), "{e}");
    // The registry still serves.
    remote.list_bases().await.unwrap();
}

#[tokio::test]
async fn manifest_tensor_and_upload_limits() {
    let env = Env::start_tuned(Engine::Sqlite, |c| {
        c.max_tensors = 3;
        c.max_uploads_per_token = 2;
    })
    .await;
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({})); // 8 tensors
    let e = hub::push(&env.remote, &dir, "team/many", "tiny", &[], &hidden())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted);
    assert!(e.to_string().contains("8 tensors"), "{e}");

    // Per-token upload sessions.
    let secret = env.token("team", delta_registry::auth::Scope::Write, false);
    let t = env.client(Some(&secret)).await;
    for i in 0..2u8 {
        t.start_upload(Digest::of(&[i]), 1).await.unwrap();
    }
    let e = t.start_upload(Digest::of(&[9]), 1).await.unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted);
}

/// A manifest over `max_manifest_bytes` is refused before it is parsed, naming its size
/// and the limit, whether it comes in a push or as a trained job's result; nothing is
/// published and the job stays leased, to be completed within the limit or failed.
#[tokio::test]
async fn manifests_over_the_size_limit_are_refused_in_push_and_in_a_job_result() {
    let limit = 400;
    let env = Env::start_tuned(Engine::Sqlite, |c| c.max_manifest_bytes = limit).await;
    let remote = &env.remote;
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    let base = remote.get_base("tiny").await.unwrap();
    let manifest = delta_client::delta::prepare(&dir, &base).unwrap().manifest;
    let size = manifest.canonical_json().len();
    assert!(
        size > limit,
        "the fixture's manifest ({size} bytes) must exceed the limit"
    );
    let wanted = format!("manifest is {size} bytes; the limit is {limit}");
    // Refused naming size and limit, and nothing published.
    let refused = async |e: delta_client::Error| {
        assert_eq!(code(&e), Code::ResourceExhausted, "{e:?}");
        assert!(e.to_string().contains(&wanted), "{e}");
        assert_eq!(
            code(&remote.resolve("team/big").await.unwrap_err()),
            Code::NotFound
        );
    };

    let e = hub::push(remote, &dir, "team/big", "tiny", &[], &hidden())
        .await
        .unwrap_err();
    refused(e).await;

    // The same manifest as a training job's result (the spec itself fits the limit).
    let spec = env.train_job(remote).await;
    assert!(spec.to_string().len() < limit);
    let job = remote
        .submit_job(JobKind::Train, &spec, "team/big", &[], &[])
        .await
        .unwrap();
    let (leased, lease) = remote.lease_job("w", &[], 60).await.unwrap().unwrap();
    assert_eq!(leased.id, job.id);
    let e = remote
        .complete_job(job.id, &lease, None, Some(&manifest), None)
        .await
        .unwrap_err();
    refused(e).await;
    // Still the worker's to finish.
    let done = remote
        .complete_job(job.id, &lease, Some("result too large"), None, None)
        .await
        .unwrap();
    assert_eq!(done.state, delta_proto::jobs::JobState::Failed);
}
