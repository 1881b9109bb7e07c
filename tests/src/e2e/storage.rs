//! The same storage conformance tests on local disk, in memory and S3 (moto on loopback),
//! and the registry end to end on S3: multipart blobs, pulls, garbage.

use bytes::Bytes;
use delta_proto::Digest;
use delta_registry::RegistryConfig;
use delta_registry::blobs::{BlobStore, Cleanup};
use futures::StreamExt;
use object_store::PutPayload;
use std::time::Duration;

use crate::TestRegistry;
use crate::s3::Moto;

fn data(n: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ u32::from(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The whole blob of `size` bytes, read with `BlobStore::stream` in 3 MiB blocks.
async fn streamed(store: &BlobStore, d: &Digest, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = store.stream(d, size as u64, 3 << 20);
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// What every backend must do: multipart writes (8 MiB parts: S3's 5 MiB minimum for
/// non-final parts holds) visible only once complete, aborts leaving nothing, ranged and
/// streamed reads, small puts, listing, idempotent deletes.
async fn conformance(store: BlobStore) {
    let big = data(12 << 20, 1);
    let d = Digest::of(&big);
    assert!(!store.exists(&d).await.unwrap());
    let (staging, mut up) = store.begin(&d, big.len() as u64).await.unwrap();
    up.put_part(PutPayload::from(big[..8 << 20].to_vec()))
        .await
        .unwrap();
    up.put_part(PutPayload::from(big[8 << 20..].to_vec()))
        .await
        .unwrap();
    assert!(
        !store.exists(&d).await.unwrap(),
        "an incomplete multipart write is visible"
    );
    up.complete().await.unwrap();
    assert!(store.publish(&staging).await.unwrap());
    assert!(store.exists(&d).await.unwrap());
    assert_eq!(store.size(&d).await.unwrap(), Some(big.len() as u64));
    assert_eq!(
        store.read_range(&d, 100..200).await.unwrap(),
        Bytes::copy_from_slice(&big[100..200])
    );
    assert!(
        streamed(&store, &d, big.len()).await == big,
        "streamed bytes differ"
    );

    // Aborted: nothing visible.
    let other = data(6 << 20, 2);
    let d2 = Digest::of(&other);
    let (_, mut up) = store.begin(&d2, other.len() as u64).await.unwrap();
    up.put_part(PutPayload::from(other.clone())).await.unwrap();
    up.abort().await.unwrap();
    assert!(!store.exists(&d2).await.unwrap());

    // Racing uploads of one digest: both complete, exactly one publish creates the blob,
    // the other finds it there (a conditional create; dedup); no staging object is left.
    let mut racers = Vec::new();
    for _ in 0..2 {
        let (staging, mut up) = store.begin(&d2, other.len() as u64).await.unwrap();
        up.put_part(PutPayload::from(other.clone())).await.unwrap();
        up.complete().await.unwrap();
        racers.push(staging);
    }
    // Published one after the other: moto checks the condition without a lock, so truly
    // simultaneous completes can both pass there (S3 itself decides them atomically).
    assert!(
        store.publish(&racers[0]).await.unwrap(),
        "the first publish creates the blob"
    );
    assert!(
        !store.publish(&racers[1]).await.unwrap(),
        "the second finds it there: dedup, not an overwrite"
    );
    assert_eq!(store.size(&d2).await.unwrap(), Some(other.len() as u64));
    let later = delta_registry::clock::now() + 10;
    let (nothing, hour) = (Cleanup::default(), Duration::from_secs(3600));
    let cleanup = |grace| store.cleanup_staging(grace, hour, later);
    assert_eq!(cleanup(Duration::ZERO).await.unwrap(), nothing);
    // A completed upload its registry never published is cleaned up after the grace period.
    let lost = data(6 << 20, 4);
    let (_, mut up) = store
        .begin(&Digest::of(&lost), lost.len() as u64)
        .await
        .unwrap();
    up.put_part(PutPayload::from(lost.clone())).await.unwrap();
    up.complete().await.unwrap();
    assert!(!store.exists(&Digest::of(&lost)).await.unwrap());
    assert_eq!(cleanup(hour).await.unwrap(), nothing);
    assert_eq!(cleanup(Duration::ZERO).await.unwrap().objects, 1);
    store.delete(&d2).await.unwrap();

    // Small puts, listing, deletes.
    let small = b"small blob".to_vec();
    let d3 = Digest::of(&small);
    store.put_small(&d3, Bytes::from(small)).await.unwrap();
    let listed: Vec<Option<Digest>> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert!(
        listed.contains(&Some(d)) && listed.contains(&Some(d3)),
        "{listed:?}"
    );
    assert!(!listed.contains(&Some(d2)));
    store.delete(&d3).await.unwrap();
    store.delete(&d3).await.unwrap();
    assert!(!store.exists(&d3).await.unwrap());
    assert_eq!(store.size(&d3).await.unwrap(), None);
}

#[tokio::test]
async fn conformance_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    conformance(BlobStore::local(dir.path()).unwrap()).await;
}

/// On local disk the registry writes uploads itself (writing back each part as it
/// lands): parts in flight together, finishing in any order, land at their offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_uploads_take_parts_in_flight_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    let bytes = data(20 << 20, 7);
    let d = Digest::of(&bytes);
    let (staging, mut up) = store.begin(&d, bytes.len() as u64).await.unwrap();
    let parts: Vec<_> = bytes
        .chunks(8 << 20)
        .map(|c| up.put_part(PutPayload::from(c.to_vec())))
        .collect();
    for part in parts.into_iter().rev() {
        part.await.unwrap();
    }
    up.complete().await.unwrap();
    assert!(store.publish(&staging).await.unwrap());
    assert!(
        streamed(&store, &d, bytes.len()).await == bytes,
        "the blob differs from what was written"
    );
}

/// A registry killed mid-upload on local disk leaves a partial file that listings do not
/// show: the start-up sweep removes it once it is older than the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_partial_uploads_are_swept_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    let bytes = data(1 << 20, 8);
    let d = Digest::of(&bytes);
    let (_, mut up) = store.begin(&d, bytes.len() as u64).await.unwrap();
    up.put_part(PutPayload::from(bytes)).await.unwrap();
    std::mem::forget(up); // killed: no destructor runs, the partial file stays
    assert!(
        store.list().await.unwrap().is_empty(),
        "a partial is listed"
    );
    let hour = Duration::from_secs(3600);
    assert_eq!(store.remove_stale_staging(hour).unwrap(), 0);
    assert_eq!(store.remove_stale_staging(Duration::ZERO).unwrap(), 1);
    assert!(!store.exists(&d).await.unwrap());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn conformance_in_memory() {
    conformance(BlobStore::in_memory()).await;
}

fn s3_config(moto: &Moto, prefix: &str) -> impl FnOnce(&std::path::Path) -> RegistryConfig {
    let (url, options) = (moto.url(prefix), moto.options());
    move |dir: &std::path::Path| {
        let mut c = RegistryConfig::for_test(dir);
        c.store_url = Some(url);
        c.store_options = options;
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3() {
    let moto = Moto::start("conformance");
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(&moto, "blobs-root")(dir.path());
    conformance(BlobStore::open(&config).unwrap()).await;
}

/// A replica killed mid-upload leaves an incomplete multipart upload (invisible, billed):
/// the cleanup aborts it once it is older than the grace period, and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_multipart_uploads_are_aborted_on_s3() {
    let moto = Moto::start("abandoned");
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&s3_config(&moto, "hub")(dir.path())).unwrap();
    let bytes = data(6 << 20, 9);
    let (_, mut up) = store
        .begin(&Digest::of(&bytes), bytes.len() as u64)
        .await
        .unwrap();
    up.put_part(PutPayload::from(bytes)).await.unwrap();
    drop(up); // killed: neither completed nor aborted
    let now = delta_registry::clock::now();
    let hour = Duration::from_secs(3600);
    let young = store.cleanup_staging(hour, hour, now + 60).await.unwrap();
    assert_eq!(
        young.uploads, 0,
        "an upload younger than the grace period stays"
    );
    let old = store.cleanup_staging(hour, hour, now + 7200).await.unwrap();
    assert_eq!(old.uploads, 1);
    let again = store.cleanup_staging(hour, hour, now + 7200).await.unwrap();
    assert_eq!(again.uploads, 0, "aborted for good");
}

/// Blobs too big for one S3 copy part (5 GiB; lowered here) are written to their key
/// directly: visible only once complete, nothing staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_beyond_one_copy_part_are_written_in_place_on_s3() {
    let moto = Moto::start("in-place");
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&s3_config(&moto, "hub")(dir.path()))
        .unwrap()
        .with_copy_limit(1 << 20);
    let bytes = data(6 << 20, 5);
    let d = Digest::of(&bytes);
    let (staging, mut up) = store.begin(&d, bytes.len() as u64).await.unwrap();
    up.put_part(PutPayload::from(bytes.clone())).await.unwrap();
    assert!(!store.exists(&d).await.unwrap());
    up.complete().await.unwrap();
    assert!(store.publish(&staging).await.unwrap());
    assert_eq!(
        store.read_range(&d, 0..16).await.unwrap(),
        Bytes::copy_from_slice(&bytes[..16])
    );
    let later = delta_registry::clock::now() + 10;
    let done = store
        .cleanup_staging(Duration::ZERO, Duration::ZERO, later)
        .await
        .unwrap();
    assert_eq!(done, Cleanup::default(), "nothing was staged");
}

/// The registry on S3: a 20 MiB blob goes up through resumable chunks and multipart parts,
/// comes back byte for byte, and dedups on a second upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_round_trip_on_s3() {
    let moto = Moto::start("registry");
    let dir = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start_in(dir, s3_config(&moto, "team-a")).await;
    let remote = registry.remote().await;
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("big.bin");
    let bytes = data(20 << 20, 3);
    std::fs::write(&path, &bytes).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let d = remote.upload_blob_file(&path, &bar).await.unwrap();
    assert_eq!(d, Digest::of(&bytes));
    assert!(remote.missing(&[d]).await.unwrap().is_empty());
    let back = work.path().join("back.bin");
    remote.download_to(d, &back, &bar).await.unwrap();
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "downloaded bytes differ"
    );
    // Uploading the same bytes again is a dedup, not a second write.
    assert_eq!(remote.upload_blob_file(&path, &bar).await.unwrap(), d);
    registry.stop().await;
}
