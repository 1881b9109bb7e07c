//! Yank, delete, garbage collection, fsck, corruption.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use delta_client::delta::Format;
use delta_client::{Error, hub};
use delta_proto::{Digest, UploadChunk};
use delta_registry::maintenance::{collect_garbage, fsck};
use delta_registry::meta::Actor;
use delta_registry::{BlobStore, MetaStore, SqlMeta};
use serde_json::json;

use super::{Env, hidden};
use crate::fixtures;

fn stores(env: &Env) -> (Arc<dyn MetaStore>, BlobStore) {
    let meta = SqlMeta::open(&env.registry.dir.path().join("registry.sqlite")).unwrap();
    (
        Arc::new(meta),
        BlobStore::local(&env.registry.dir.path().join("store")).unwrap(),
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 5
}

async fn push(env: &Env, name: &str, seed: u64, repo: &str) -> hub::PushReport {
    let dir = env.path(name);
    fixtures::write_native_lora(&dir, seed, 2, json!({}));
    hub::push(&env.remote, &dir, repo, "tiny", &[], &hidden())
        .await
        .unwrap()
}

#[tokio::test]
async fn yank_and_delete_versions() {
    let env = Env::start().await;
    let v1 = push(&env, "a", 1, "team/r").await;
    let v2 = push(&env, "b", 2, "team/r").await;
    env.remote.yank("team/r:v2", false).await.unwrap();
    assert_eq!(
        env.remote.resolve("team/r").await.unwrap().digest,
        v1.digest,
        "latest skips yanked"
    );
    assert_eq!(
        env.remote.resolve("team/r:v2").await.unwrap().digest,
        v2.digest,
        "still pullable by version"
    );
    assert_eq!(
        env.remote
            .resolve(&format!("team/r@{}", v2.digest))
            .await
            .unwrap()
            .version,
        2
    );
    let versions: Vec<u64> = env
        .remote
        .list_versions("team/r")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [1]);
    assert_eq!(
        env.remote
            .search("team", None, "", Default::default())
            .await
            .unwrap()
            .len(),
        1
    );
    // Every version yanked: `latest` says so and names the newest, rather than "not found".
    env.remote.yank("team/r:v1", false).await.unwrap();
    let err = env.remote.resolve("team/r").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("team/r: all 2 of its versions are yanked; pull one by number (team/r:v2)"),
        "{err}"
    );
    env.remote.yank("team/r:v1", true).await.unwrap();
    env.remote.yank("team/r:v2", true).await.unwrap();
    assert_eq!(env.remote.resolve("team/r").await.unwrap().version, 2);

    env.cli(&["delete", "team/r:v2"]).await.unwrap();
    assert!(matches!(
        env.remote.resolve("team/r:v2").await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(env.remote.resolve("team/r").await.unwrap().version, 1);
    // Numbers are never reused: the next push is v3, even with v2's exact bytes.
    let again = push(&env, "b", 2, "team/r").await;
    assert_eq!((again.version, again.digest), (3, v2.digest));
    env.cli(&["tag", "team/r:v1", "stable"]).await.unwrap();
    env.cli(&["untag", "team/r:stable"]).await.unwrap();
    assert!(env.remote.resolve("team/r:stable").await.is_err());
}

#[tokio::test]
async fn gc_frees_only_unreferenced_blobs_after_the_grace_period() {
    let env = Env::start().await;
    let (meta, blobs) = stores(&env);
    let shared = push(&env, "s", 1, "team-a/shared").await;
    push(&env, "s", 1, "team-b/shared").await; // same bytes, another team
    push(&env, "only", 2, "team-a/only").await;
    assert_eq!(env.stored_blobs(), 2);

    // Deleting one team's use of the shared blob frees nothing.
    env.remote.delete_version("team-a/shared:v1").await.unwrap();
    env.remote.delete_version("team-a/only:v1").await.unwrap();
    // Inside the grace period nothing is collected.
    let r = collect_garbage(
        meta.clone(),
        &blobs,
        Duration::from_secs(3600),
        false,
        Actor::local(now()),
    )
    .await
    .unwrap();
    assert!(r.removed.is_empty());
    // Dry run lists the candidate and deletes nothing.
    let dry = collect_garbage(
        meta.clone(),
        &blobs,
        Duration::ZERO,
        true,
        Actor::local(now()),
    )
    .await
    .unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(env.stored_blobs(), 2);
    let real = collect_garbage(
        meta.clone(),
        &blobs,
        Duration::ZERO,
        false,
        Actor::local(now()),
    )
    .await
    .unwrap();
    assert_eq!(real.removed, dry.removed);
    assert!(real.bytes > 0);
    assert_eq!(env.stored_blobs(), 1);
    // The shared blob is still pullable through team b.
    hub::pull(
        &env.remote,
        &env.cache,
        "team-b/shared",
        &env.path("out"),
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(
        env.remote.resolve("team-b/shared").await.unwrap().digest,
        shared.digest
    );

    // Re-publishing the freed bytes uploads them again and works.
    let back = push(&env, "only", 2, "team-a/only").await;
    assert!(back.bytes_uploaded > 0);
    let report = fsck(meta, &blobs, false, Duration::ZERO, now())
        .await
        .unwrap();
    assert!(report.clean(), "{report:?}");
}

#[tokio::test]
async fn gc_during_an_upload_in_flight_keeps_it() {
    let env = Env::start().await;
    let (meta, blobs) = stores(&env);
    let data = Bytes::from(vec![5u8; 3 << 20]);
    let d = Digest::of(&data);
    let (id, _) = env
        .remote
        .start_upload(d, data.len() as u64)
        .await
        .unwrap()
        .unwrap();
    let first = futures::stream::iter(vec![UploadChunk {
        upload_id: id.clone(),
        offset: 0,
        data: data.slice(..1 << 20),
    }]);
    env.remote.upload_stream(first).await.unwrap();
    collect_garbage(
        meta.clone(),
        &blobs,
        Duration::ZERO,
        false,
        Actor::local(now()),
    )
    .await
    .unwrap();
    let rest = futures::stream::iter(vec![UploadChunk {
        upload_id: id,
        offset: 1 << 20,
        data: data.slice(1 << 20..),
    }]);
    assert!(env.remote.upload_stream(rest).await.unwrap().0);
    // Through the registry's own RPC too (exclusive with blob commits).
    env.remote.collect_garbage(false, 3600).await.unwrap();
    let back = env.path("back");
    env.remote.download_to(d, &back, &hidden()).await.unwrap();
    assert_eq!(std::fs::read(back).unwrap(), data);
}

/// A stored blob cut short or gone (local disk): a download ends with DATA_LOSS, never a
/// clean end of stream.
#[tokio::test]
async fn a_truncated_or_missing_blob_file_is_data_loss() {
    let env = Env::start().await;
    push(&env, "a", 1, "team/r").await;
    let blob = env.remote.resolve("team/r").await.unwrap().manifest.files[0].digest;
    let path = env.registry.dir.path().join("store").join(blob.blob_key());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = env.path("cut.partial");
    let e = env
        .remote
        .download_to(blob, &out, &hidden())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Rejected {
                code: tonic::Code::DataLoss,
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::remove_file(&path).unwrap();
    let e = env
        .remote
        .download_to(blob, &out, &hidden())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Rejected { code: tonic::Code::DataLoss, message } if message.contains("missing")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_flipped_byte_is_refused_on_pull_reported_by_fsck_and_healed_by_a_repush() {
    let env = Env::start().await;
    let (meta, blobs) = stores(&env);
    let pushed = push(&env, "a", 1, "team/r").await;
    let blob = env.remote.resolve("team/r").await.unwrap().manifest.files[0].digest;
    let path = env.registry.dir.path().join("store").join(blob.blob_key());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    // Pull refuses it (the registry ends the stream with DATA_LOSS, the client re-hashes).
    let err = hub::pull(
        &env.remote,
        &env.cache,
        "team/r",
        &env.path("out"),
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Rejected {
                code: tonic::Code::DataLoss,
                ..
            } | Error::Integrity { .. }
        ),
        "{err:?}"
    );
    assert!(!env.cache.has(&blob));

    // fsck reports it; --repair quarantines it; a re-push of the same delta heals it.
    let report = fsck(meta.clone(), &blobs, false, Duration::ZERO, now())
        .await
        .unwrap();
    assert_eq!(report.corrupt, vec![blob]);
    // And names what the loss breaks.
    assert_eq!(report.users[&blob], ["team/r:v1"]);
    let repaired = fsck(meta.clone(), &blobs, true, Duration::ZERO, now())
        .await
        .unwrap();
    assert_eq!(repaired.quarantined, 1);
    assert!(
        env.registry
            .dir
            .path()
            .join("store/quarantine/blake3")
            .join(blob.hex())
            .exists()
    );
    assert_eq!(env.remote.missing(&[blob]).await.unwrap(), vec![blob]);
    let healed = push(&env, "a", 1, "team/r").await;
    assert_eq!((healed.digest, healed.created), (pushed.digest, false));
    assert!(healed.bytes_uploaded > 0);
    let report = fsck(meta.clone(), &blobs, false, Duration::ZERO, now())
        .await
        .unwrap();
    assert!(report.clean(), "{report:?}");

    // An object without a row is an orphan.
    let orphan = env
        .registry
        .dir
        .path()
        .join("store/blobs/blake3/00")
        .join("00".repeat(32));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"stray").unwrap();
    let report = fsck(meta.clone(), &blobs, false, Duration::ZERO, now())
        .await
        .unwrap();
    assert_eq!(report.orphans.len(), 1);
    assert!(!report.clean());
    fsck(meta.clone(), &blobs, true, Duration::ZERO, now())
        .await
        .unwrap();
    assert!(!orphan.exists());
    // A missing object is reported too.
    std::fs::remove_file(env.registry.dir.path().join("store").join(blob.blob_key())).unwrap();
    assert_eq!(
        fsck(meta, &blobs, false, Duration::ZERO, now())
            .await
            .unwrap()
            .missing,
        vec![blob]
    );
}

/// The registry writes `DownloadBlob`'s stream by hand (`service/download.rs`); tonic's own
/// generated client reads it as any gRPC stream: every chunk at its offset, a start inside
/// a chunk and at the end, refusals, and DATA_LOSS after the bytes of a rotted blob.
#[tokio::test]
async fn tonic_s_generated_client_reads_the_hand_written_download_stream() {
    use delta_proto::{self as pb, CHUNK_SIZE};
    let env = Env::start().await;
    let data: Bytes = (0..(5usize << 19) + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let d = Digest::of(&data);
    let file = env.path("blob");
    std::fs::write(&file, &data).unwrap();
    let sent = env
        .remote
        .upload_file(&file, d, data.len() as u64, &hidden())
        .await
        .unwrap();
    assert_eq!(sent, data.len() as u64);

    let mut raw = pb::registry_client::RegistryClient::connect(env.registry.url())
        .await
        .unwrap();
    let get = |digest: String, offset| pb::DownloadBlobRequest { digest, offset };
    for offset in [0, 1 << 20, (1 << 20) + 5, data.len() as u64] {
        let mut stream = raw
            .download_blob(get(d.to_string(), offset))
            .await
            .unwrap()
            .into_inner();
        let (mut at, mut back) = (offset, Vec::new());
        while let Some(c) = stream.message().await.unwrap() {
            assert_eq!(c.offset, at);
            assert!(!c.data.is_empty() && c.data.len() <= CHUNK_SIZE);
            at += c.data.len() as u64;
            back.extend_from_slice(&c.data);
        }
        assert_eq!(back, data[offset as usize..], "from offset {offset}");
    }

    let absent = Digest::of(b"nobody has this");
    let e = raw
        .download_blob(get(absent.to_string(), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains(&absent.to_string()), "{e:?}");
    let e = raw
        .download_blob(get("blake3:xyz".into(), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = raw
        .download_blob(get(d.to_string(), data.len() as u64 + 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let path = env.registry.dir.path().join("store").join(d.blob_key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mut stream = raw
        .download_blob(get(d.to_string(), 0))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(c)) => received += c.data.len(),
            Ok(None) => panic!("a rotted blob's stream ended cleanly"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), tonic::Code::DataLoss, "{end:?}");
    assert_eq!(received, data.len());
}
