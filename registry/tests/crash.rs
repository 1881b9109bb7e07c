//! SIGKILL the registry process in the middle of an upload, restart it on the same data
//! dir: everything committed before is intact, nothing partial is visible.

mod common;

use std::process::Command;

use common::{base_and_lora_blob, client, start, upload};
use delta_proto::{self as pb, Digest};

#[tokio::test]
async fn sigkill_mid_upload_keeps_committed_data_and_hides_partial_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = start(dir.path());
    let mut c = client(&reg.url).await;

    // Committed before the crash: a base, a blob and a manifest.
    let (fp, file) = base_and_lora_blob(&mut c).await;
    let manifest = serde_json::json!({
        "schema_version": 1, "method": "lora", "config": {"lora": {"r": 1, "lora_alpha": 1.0}},
        "base": {"fingerprint": fp.to_string()},
        "files": [{"path": "delta.safetensors", "digest": Digest::of(&file).to_string(), "size": file.len(),
                   "tensors": [{"name": "w.lora_A", "dtype": "F32", "shape": [1, 4]}, {"name": "w.lora_B", "dtype": "F32", "shape": [4, 1]}]}],
    });
    let pushed = c
        .push_manifest(pb::PushManifestRequest {
            repository: "t/a".into(),
            manifest: serde_json::to_vec(&manifest).unwrap(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();

    // Half of a 12 MiB blob, then SIGKILL.
    let big: Vec<u8> = (0..12 << 20).map(|i: u32| (i % 241) as u8).collect();
    let half = upload(&mut c, &big, 6 << 20).await;
    assert!(!half.committed);
    reg.child.kill().unwrap();
    reg.child.wait().unwrap();

    let mut reg = start(dir.path());
    let mut c = client(&reg.url).await;
    let resolved = c
        .resolve(pb::ResolveRequest {
            reference: "t/a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.digest, pushed.digest);
    let mut stream = c
        .download_blob(pb::DownloadBlobRequest {
            digest: Digest::of(&file).to_string(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        back.extend_from_slice(&chunk.data);
    }
    assert_eq!(back, file);

    // The partial blob is not visible, its session is gone, and re-uploading it works.
    let big_d = Digest::of(&big).to_string();
    let missing = c
        .missing_blobs(pb::MissingBlobsRequest {
            digests: vec![big_d.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing, vec![big_d.clone()]);
    let err = c
        .download_blob(pb::DownloadBlobRequest {
            digest: big_d.clone(),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(upload(&mut c, &big, big.len()).await.committed);

    reg.child.kill().unwrap();
    reg.child.wait().unwrap();
    let meta = delta_registry::SqlMeta::open(&dir.path().join("registry.sqlite")).unwrap();
    assert_eq!(meta.pragma("integrity_check").unwrap(), "ok");
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let mut c = client(&reg.url).await;
    c.list_bases(pb::ListBasesRequest {}).await.unwrap();
    drop(c);
    let status = Command::new("kill")
        .args(["-TERM", &reg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Wait off the runtime, so the client side can answer the server's GOAWAY (a blocked
    // runtime would only end when the registry's drain timeout expired).
    let exit = tokio::task::spawn_blocking(move || {
        let mut reg = reg;
        reg.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_pushes_tag_moves_and_gc_leaves_everything_acknowledged_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = start(dir.path());
    let mut c = client(&reg.url).await;
    let (fp, file) = base_and_lora_blob(&mut c).await;

    // Three clients: one pushes versions, one moves a tag with compare-and-swap, one runs
    // gc; each records what the registry acknowledged.
    let url = reg.url.clone();
    let file_digest = Digest::of(&file).to_string();
    let size = file.len();
    // Acknowledged pushes so far: the kill comes after the registry has acknowledged
    // some (and while more are in flight), not after a guessed sleep.
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = acks.clone();
    let pusher = tokio::spawn(async move {
        let mut c = client(&url).await;
        let mut acked = Vec::new();
        for i in 0.. {
            let manifest = serde_json::json!({
                "schema_version": 1, "method": "lora", "config": {"lora": {"r": 1, "lora_alpha": 1.0}},
                "base": {"fingerprint": fp.to_string()}, "annotations": {"n": i.to_string()},
                "files": [{"path": "delta.safetensors", "digest": file_digest, "size": size,
                           "tensors": [{"name": "w.lora_A", "dtype": "F32", "shape": [1, 4]}, {"name": "w.lora_B", "dtype": "F32", "shape": [4, 1]}]}],
            });
            let req = pb::PushManifestRequest {
                repository: "t/r".into(),
                manifest: serde_json::to_vec(&manifest).unwrap(),
                tags: vec![],
            };
            match c.push_manifest(req).await {
                Ok(r) => {
                    acked.push((r.get_ref().version, r.get_ref().digest.clone()));
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(_) => return acked,
            }
        }
        acked
    });
    let url = reg.url.clone();
    let tagger = tokio::spawn(async move {
        let mut c = client(&url).await;
        let mut moves = 0u64;
        loop {
            let current = c
                .resolve(pb::ResolveRequest {
                    reference: "t/r:moving".into(),
                })
                .await
                .map(|r| r.get_ref().version)
                .unwrap_or(0);
            let req = pb::SetTagRequest {
                reference: "t/r".into(),
                tag: "moving".into(),
                expected_version: Some(current),
            };
            match c.set_tag(req).await {
                Ok(_) => moves += 1,
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        || s.code() == tonic::Code::NotFound => {}
                Err(_) => return moves,
            }
        }
    });
    let url = reg.url.clone();
    let collector = tokio::spawn(async move {
        let mut c = client(&url).await;
        while c
            .collect_garbage(pb::CollectGarbageRequest {
                dry_run: false,
                grace_seconds: 1,
            })
            .await
            .is_ok()
        {}
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while acks.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no 20 pushes acknowledged within a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    reg.child.kill().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut reg = reg;
        reg.child.wait().unwrap()
    })
    .await
    .unwrap();
    let acked = pusher.await.unwrap();
    let _moves = tagger.await.unwrap();
    collector.await.unwrap();
    assert!(
        !acked.is_empty(),
        "no push was acknowledged before the kill"
    );

    let mut reg = start(dir.path());
    let mut c = client(&reg.url).await;
    for (version, digest) in &acked {
        let r = c
            .resolve(pb::ResolveRequest {
                reference: format!("t/r:v{version}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&r.digest, digest, "v{version} changed");
    }
    // Versions are contiguous, and the tag (if any) points at one of them.
    let versions = c
        .list_versions(pb::ListVersionsRequest {
            repository: "t/r".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let mut numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    assert!(numbers.len() >= acked.len());
    if let Ok(t) = c
        .resolve(pb::ResolveRequest {
            reference: "t/r:moving".into(),
        })
        .await
    {
        assert!(numbers.contains(&t.get_ref().version));
    }
    // The blob every version uses survived the collections, and fsck is clean.
    let mut stream = c
        .download_blob(pb::DownloadBlobRequest {
            digest: Digest::of(&file).to_string(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        back.extend_from_slice(&chunk.data);
    }
    assert_eq!(back, file);
    reg.child.kill().unwrap();
    reg.child.wait().unwrap();
    let meta = delta_registry::SqlMeta::open(&dir.path().join("registry.sqlite")).unwrap();
    assert_eq!(meta.pragma("integrity_check").unwrap(), "ok");
    let blobs = delta_registry::BlobStore::local(&dir.path().join("store")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let report = delta_registry::maintenance::fsck(
        std::sync::Arc::new(meta),
        &blobs,
        false,
        std::time::Duration::from_secs(3600),
        now,
    )
    .await
    .unwrap();
    assert!(report.clean(), "{report:?}");
}
