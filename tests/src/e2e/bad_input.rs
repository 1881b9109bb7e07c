//! Bad input: each fails with a clear message and leaves the registry's listing unchanged.

use bytes::Bytes;
use delta_client::Error;
use delta_client::hub;
use delta_proto::{Digest, UploadChunk};
use serde_json::json;
use tonic::Code;

use super::{Env, hidden};
use crate::fixtures;

async fn upload(env: &Env, bytes: &[u8]) -> Digest {
    let path = env.path(&format!("blob-{}", Digest::of(bytes).hex()));
    std::fs::write(&path, bytes).unwrap();
    let d = Digest::of(bytes);
    env.remote
        .upload_file(&path, d, bytes.len() as u64, &hidden())
        .await
        .unwrap();
    d
}

fn raw_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

/// A manifest naming one uploaded file with the given tensor table.
fn manifest(
    env_fp: Digest,
    file: Digest,
    size: usize,
    tensors: serde_json::Value,
) -> delta_proto::Manifest {
    let m = json!({
        "schema_version": 1, "method": "lora",
        "config": {"lora": {"r": 2, "lora_alpha": 4.0}},
        "base": {"fingerprint": env_fp.to_string()},
        "files": [{"path": "delta.safetensors", "digest": file.to_string(), "size": size, "tensors": tensors}],
    });
    delta_proto::Manifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap()
}

fn rejected(err: Error, code: Code, needle: &str) {
    match err {
        Error::Rejected {
            code: c,
            ref message,
        } => {
            assert_eq!(c, code, "{message}");
            assert!(
                message.contains(needle),
                "{message:?} does not mention {needle:?}"
            );
        }
        Error::NotFound(ref message) => {
            assert_eq!(code, Code::NotFound, "{message}");
            assert!(
                message.contains(needle),
                "{message:?} does not mention {needle:?}"
            );
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn upload_whose_bytes_do_not_match_the_digest_is_refused() {
    let env = Env::start().await;
    let data = vec![1u8; 3000];
    let claimed = Digest::of(b"something else");
    let path = env.path("liar");
    std::fs::write(&path, &data).unwrap();
    let err = env
        .remote
        .upload_file(&path, claimed, data.len() as u64, &hidden())
        .await
        .unwrap_err();
    rejected(err, Code::InvalidArgument, "not the declared");
    assert_eq!(
        env.remote
            .missing(&[claimed, Digest::of(&data)])
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(env.stored_blobs(), 0);
}

#[tokio::test]
async fn truncated_and_overlong_uploads_leave_nothing_visible() {
    let env = Env::start().await;
    let data = Bytes::from(vec![9u8; 5000]);
    let d = Digest::of(&data);
    let (id, offset) = env.remote.start_upload(d, 5000).await.unwrap().unwrap();
    assert_eq!(offset, 0);
    let short = futures::stream::iter(vec![UploadChunk {
        upload_id: id.clone(),
        offset: 0,
        data: data.slice(..4000),
    }]);
    assert_eq!(
        env.remote.upload_stream(short).await.unwrap(),
        (false, 4000)
    );
    assert_eq!(env.remote.missing(&[d]).await.unwrap(), vec![d]);
    let err = env
        .remote
        .download_to(d, &env.path("nothing"), &hidden())
        .await
        .unwrap_err();
    rejected(err, Code::NotFound, "not found");

    // Chunks must continue exactly where the session stands.
    let gap = futures::stream::iter(vec![UploadChunk {
        upload_id: id.clone(),
        offset: 4500,
        data: data.slice(4500..),
    }]);
    rejected(
        env.remote.upload_stream(gap).await.unwrap_err(),
        Code::OutOfRange,
        "at offset 4000",
    );

    // More bytes than declared kill the session.
    let long = futures::stream::iter(vec![UploadChunk {
        upload_id: id.clone(),
        offset: 4000,
        data: Bytes::from(vec![9u8; 2000]),
    }]);
    rejected(
        env.remote.upload_stream(long).await.unwrap_err(),
        Code::InvalidArgument,
        "declared 5000 bytes",
    );
    assert!(matches!(
        env.remote.upload_offset(&id).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(env.stored_blobs(), 0);
    assert!(env.listing().await.is_empty());
}

#[tokio::test]
async fn malformed_safetensors_are_refused_at_push() {
    let env = Env::start().await;
    let fp = env.remote.get_base("tiny").await.unwrap().fingerprint;
    let a = json!([{"name": "encoder.layer.0.attention.self.query.lora_A", "dtype": "F32", "shape": [2, 8]}]);
    let cases: Vec<(&str, Vec<u8>, serde_json::Value, &str)> = vec![
        (
            "bad header length",
            {
                let mut f = u64::MAX.to_le_bytes().to_vec();
                f.extend_from_slice(b"{}");
                f
            },
            a.clone(),
            "header length",
        ),
        (
            "overlapping offsets",
            raw_file(
                r#"{"x.lora_A":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x.lora_B":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            a.clone(),
            "overlaps",
        ),
        (
            "unknown dtype",
            raw_file(
                r#"{"x.lora_A":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}}"#,
                2,
            ),
            a.clone(),
            "Q4_K",
        ),
        (
            "not json",
            raw_file("{not json at all}", 0),
            a.clone(),
            "not a JSON object",
        ),
        (
            "pickle",
            b"\x80\x04\x95 this is a pickle".to_vec(),
            a.clone(),
            "not valid safetensors",
        ),
    ];
    for (what, bytes, tensors, needle) in cases {
        let d = upload(&env, &bytes).await;
        let m = manifest(fp, d, bytes.len(), tensors);
        let err = env
            .remote
            .push_manifest("team-a/bad", &m, &[])
            .await
            .unwrap_err();
        rejected(err, Code::InvalidArgument, needle);
        assert!(env.listing().await.is_empty(), "{what} left a trace");
    }
}

#[tokio::test]
async fn lora_that_does_not_fit_the_base_is_refused_naming_the_tensor() {
    let env = Env::start().await;
    let dir = env.path("misfit");
    std::fs::create_dir_all(&dir).unwrap();
    // lora_A for a [8, 8] weight must be [r, 8]; this one is [2, 5].
    fixtures::write_f32(
        &dir.join("delta.safetensors"),
        &[
            (
                "encoder.layer.0.attention.self.query.lora_A".into(),
                vec![2, 5],
                fixtures::values(1, 10),
            ),
            (
                "encoder.layer.0.attention.self.query.lora_B".into(),
                vec![8, 2],
                fixtures::values(2, 16),
            ),
        ],
        None,
    );
    std::fs::write(
        dir.join("delta.json"),
        r#"{"method":"lora","config":{"lora":{"r":2,"lora_alpha":4}}}"#,
    )
    .unwrap();
    let err = hub::push(&env.remote, &dir, "team-a/misfit", "tiny", &[], &hidden())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.layer.0.attention.self.query.lora_A") && err.contains("[8, 8]"),
        "{err}"
    );

    // The registry checks too, for clients that skip the local check.
    let bytes = std::fs::read(dir.join("delta.safetensors")).unwrap();
    let d = upload(&env, &bytes).await;
    let fp = env.remote.get_base("tiny").await.unwrap().fingerprint;
    let m = manifest(
        fp,
        d,
        bytes.len(),
        json!([
            {"name": "encoder.layer.0.attention.self.query.lora_A", "dtype": "F32", "shape": [2, 5]},
            {"name": "encoder.layer.0.attention.self.query.lora_B", "dtype": "F32", "shape": [8, 2]},
        ]),
    );
    let err = env
        .remote
        .push_manifest("team-a/misfit", &m, &[])
        .await
        .unwrap_err();
    rejected(
        err,
        Code::InvalidArgument,
        "do not fit base weight encoder.layer.0.attention.self.query.weight",
    );

    // A manifest whose table disagrees with the file's header.
    let lying = manifest(
        fp,
        d,
        bytes.len(),
        json!([
            {"name": "encoder.layer.0.attention.self.query.lora_A", "dtype": "F32", "shape": [2, 8]},
            {"name": "encoder.layer.0.attention.self.query.lora_B", "dtype": "F32", "shape": [8, 2]},
        ]),
    );
    rejected(
        env.remote
            .push_manifest("team-a/misfit", &lying, &[])
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "does not hold",
    );
    assert!(env.listing().await.is_empty());
}

#[tokio::test]
async fn unregistered_base_missing_blob_and_bad_names_are_refused() {
    let env = Env::start().await;
    let dir = env.path("native");
    fixtures::write_native_lora(&dir, 3, 2, json!({}));
    let err = hub::push(
        &env.remote,
        &dir,
        "team-a/x",
        "no-such-base",
        &[],
        &hidden(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("no-such-base is not registered"), "{err}");

    // Straight to the registry: a manifest for a base nobody registered.
    let good = hub::push(&env.remote, &dir, "team-a/x", "tiny", &[], &hidden())
        .await
        .unwrap();
    let mut m = env.remote.resolve("team-a/x").await.unwrap().manifest;
    m.base.fingerprint = Digest::of(b"some other model");
    rejected(
        env.remote
            .push_manifest("team-a/y", &m, &[])
            .await
            .unwrap_err(),
        Code::FailedPrecondition,
        "is not registered",
    );

    // A manifest naming a blob that was never uploaded.
    let mut m = env.remote.resolve("team-a/x").await.unwrap().manifest;
    m.files[0].digest = Digest::of(b"never uploaded");
    rejected(
        env.remote
            .push_manifest("team-a/y", &m, &[])
            .await
            .unwrap_err(),
        Code::FailedPrecondition,
        "not uploaded",
    );

    let m = env.remote.resolve("team-a/x").await.unwrap().manifest;
    for bad in [
        "../etc/passwd",
        "Team/x",
        "team/x/y",
        "team/%2e%2e",
        "tеam/x",
        "team/x\0",
        &format!("team/{}", "x".repeat(65)),
    ] {
        rejected(
            env.remote.push_manifest(bad, &m, &[]).await.unwrap_err(),
            Code::InvalidArgument,
            "invalid",
        );
    }
    for bad_tag in ["latest!", "v7", "-x", "a/b"] {
        rejected(
            env.remote
                .push_manifest("team-a/z", &m, &[bad_tag.to_owned()])
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "invalid tag",
        );
    }
    let err = env
        .remote
        .resolve("team-a/x@blake3:../../etc")
        .await
        .unwrap_err();
    rejected(err, Code::InvalidArgument, "blake3");
    assert_eq!(env.listing().await, vec![("team-a/x".to_owned(), 1)]);
    assert_eq!(
        env.remote.resolve("team-a/x").await.unwrap().digest,
        good.digest
    );
}
