//! Blob store conformance on InMemory and on the local filesystem.

use super::*;

async fn check_write_read(store: &BlobStore) {
    let data = Bytes::from(vec![7u8; 3 << 20]);
    let digest = Digest::of(&data);
    assert!(!store.exists(&digest).await.unwrap());
    let (staging, mut up) = store.begin(&digest, data.len() as u64).await.unwrap();
    // Nothing is visible before complete.
    up.put_part(PutPayload::from_bytes(data.slice(..1 << 20)))
        .await
        .unwrap();
    assert!(!store.exists(&digest).await.unwrap());
    up.put_part(PutPayload::from_bytes(data.slice(1 << 20..)))
        .await
        .unwrap();
    up.complete().await.unwrap();
    assert!(
        !store.exists(&digest).await.unwrap(),
        "visible before publish"
    );
    assert!(store.publish(&staging).await.unwrap());
    assert!(store.exists(&digest).await.unwrap());
    assert_eq!(
        store.read_range(&digest, 5..9).await.unwrap(),
        data.slice(5..9)
    );
    let mut all = Vec::new();
    let mut s = store.stream(&digest, data.len() as u64, 1 << 20);
    while let Some(b) = s.next().await {
        all.extend_from_slice(&b.unwrap());
    }
    assert_eq!(all, data);

    // An aborted write leaves nothing.
    let other = Digest::of(b"other");
    let (_, mut up) = store.begin(&other, 5).await.unwrap();
    up.put_part(PutPayload::from_static(b"other"))
        .await
        .unwrap();
    up.abort().await.unwrap();
    assert!(!store.exists(&other).await.unwrap());

    // Deleting a missing blob succeeds on every backend.
    store.delete(&other).await.unwrap();
    store.delete(&digest).await.unwrap();
    assert!(!store.exists(&digest).await.unwrap());
}

#[tokio::test]
async fn conformance_in_memory() {
    check_write_read(&BlobStore::in_memory()).await;
}

#[tokio::test]
async fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    check_write_read(&BlobStore::local(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn stale_staging_files_are_removed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    let staged = dir.path().join("blobs/blake3/ab/abcd#1");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::write(&staged, b"partial").unwrap();
    assert_eq!(
        store
            .remove_stale_staging(Duration::from_secs(3600))
            .unwrap(),
        0
    );
    assert!(staged.exists());
    assert_eq!(store.remove_stale_staging(Duration::ZERO).unwrap(), 1);
    assert!(!staged.exists());
}
