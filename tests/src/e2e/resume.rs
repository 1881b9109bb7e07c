//! Interrupted uploads and downloads resume from where they stopped.

use std::time::Duration;

use bytes::Bytes;
use delta_client::hub;
use delta_proto::{CHUNK_SIZE, Digest, UploadChunk};
use futures::StreamExt;

use super::{Env, hidden};

#[tokio::test]
async fn an_interrupted_upload_resumes_and_completes() {
    let env = Env::start().await;
    let data: Vec<u8> = (0..(6 * CHUNK_SIZE + 123))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let d = Digest::of(&data);
    let path = env.path("big");
    std::fs::write(&path, &data).unwrap();

    // Send three chunks, then stall forever: the client gives up and drops the stream,
    // as a dead network would.
    let (id, _) = env
        .remote
        .start_upload(d, data.len() as u64)
        .await
        .unwrap()
        .unwrap();
    let chunks: Vec<UploadChunk> = (0..3)
        .map(|i| UploadChunk {
            upload_id: id.clone(),
            offset: (i * CHUNK_SIZE) as u64,
            data: Bytes::copy_from_slice(&data[i * CHUNK_SIZE..(i + 1) * CHUNK_SIZE]),
        })
        .collect();
    let stalled = futures::stream::iter(chunks).chain(futures::stream::pending());
    let attempt =
        tokio::time::timeout(Duration::from_secs(2), env.remote.upload_stream(stalled)).await;
    assert!(attempt.is_err(), "the stalled upload should not finish");

    // The registry kept what arrived; wait until it has noticed the broken stream.
    let mut offset = 0;
    for _ in 0..100 {
        if let Ok(o) = env.remote.upload_offset(&id).await {
            offset = o;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(offset, (3 * CHUNK_SIZE) as u64);
    assert_eq!(
        env.remote.missing(&[d]).await.unwrap(),
        vec![d],
        "nothing visible before completion"
    );

    // A fresh upload of the same blob finds the session and sends only the rest.
    let sent = env
        .remote
        .upload_file(&path, d, data.len() as u64, &hidden())
        .await
        .unwrap();
    assert_eq!(sent, (data.len() - 3 * CHUNK_SIZE) as u64);
    assert!(env.remote.missing(&[d]).await.unwrap().is_empty());
    let back = env.path("back");
    env.remote.download_to(d, &back, &hidden()).await.unwrap();
    assert_eq!(std::fs::read(back).unwrap(), data);
}

#[tokio::test]
async fn an_interrupted_download_resumes_from_its_offset() {
    let env = Env::start().await;
    let data: Vec<u8> = (0..(3 * CHUNK_SIZE + 77))
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    let d = Digest::of(&data);
    let path = env.path("blob");
    std::fs::write(&path, &data).unwrap();
    env.remote
        .upload_file(&path, d, data.len() as u64, &hidden())
        .await
        .unwrap();

    // A partial file with the first part of the blob, as a killed download leaves it.
    let partial = env.path("partial");
    let have = CHUNK_SIZE + 5;
    std::fs::write(&partial, &data[..have]).unwrap();
    let received = env
        .remote
        .download_to(d, &partial, &hidden())
        .await
        .unwrap();
    assert_eq!(received, (data.len() - have) as u64);
    assert_eq!(std::fs::read(&partial).unwrap(), data);

    // A partial file with wrong bytes is detected by the final hash and discarded.
    std::fs::write(&partial, vec![0u8; have]).unwrap();
    let err = env
        .remote
        .download_to(d, &partial, &hidden())
        .await
        .unwrap_err();
    assert!(
        matches!(err, delta_client::Error::Integrity { .. }),
        "{err:?}"
    );
    assert!(!partial.exists());

    // The cache path: a stale partial in the cache is resumed by fetch.
    let cache = &env.cache;
    let report = {
        let blob_partial = env.path("cache/partial");
        std::fs::create_dir_all(&blob_partial).unwrap();
        std::fs::write(
            blob_partial.join(format!("{}.partial", d.hex())),
            &data[..have],
        )
        .unwrap();
        cache.fetch(&env.remote, d, &hidden()).await.unwrap()
    };
    assert_eq!(report, (cache.blob_path(&d), (data.len() - have) as u64));
    hub::verify_cached(cache, &d).unwrap();
}
