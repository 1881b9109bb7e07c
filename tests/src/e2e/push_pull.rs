//! Push → pull round trips, dedup, caching, listing, tags.

use delta_client::delta::Format;
use delta_client::hub;
use delta_proto::Digest;
use serde_json::json;

use super::{Env, hidden};
use crate::fixtures;

#[tokio::test]
async fn peft_folder_round_trips_with_identical_tensor_bytes() {
    let env = Env::start().await;
    let peft = env.path("peft");
    fixtures::write_peft_lora(&peft, 7, 4);
    let pushed = hub::push(
        &env.remote,
        &peft,
        "team-a/sst2-lora:prod",
        "tiny",
        &[],
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(pushed.version, 1);
    assert!(pushed.bytes_uploaded > 0);

    let out = env.path("pulled-peft");
    hub::pull(
        &env.remote,
        &env.cache,
        "team-a/sst2-lora:prod",
        &out,
        Format::Peft,
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(
        fixtures::tensor_bytes(&out.join("adapter_model.safetensors")),
        fixtures::tensor_bytes(&peft.join("adapter_model.safetensors")),
    );
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    let back: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(original, back);

    // Without the cache (a fresh one stays empty): the same PEFT folder.
    let fresh = delta_client::Cache::new(&env.path("fresh-cache"));
    let again = env.path("pulled-peft-no-cache");
    let opts = hub::PullOptions {
        format: Format::Peft,
        overwrite: false,
        no_cache: true,
    };
    let report = hub::pull_with(
        &env.remote,
        &fresh,
        "team-a/sst2-lora:prod",
        &again,
        opts,
        &hidden(),
    )
    .await
    .unwrap();
    assert!(report.bytes_downloaded > 0 && report.blobs.is_empty());
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(again.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(fresh.blobs().is_empty());

    // The PEFT config fields are understood, not only carried.
    let resolved = env.remote.resolve("team-a/sst2-lora").await.unwrap();
    let lora = resolved.manifest.config.lora.clone().unwrap();
    assert!(lora.use_rslora);
    assert_eq!(lora.lora_alpha, 16.0);
    assert_eq!(lora.alpha_pattern["value"], 32.0);
    assert_eq!(
        lora.scale_for("encoder.layer.0.attention.self.value"),
        32.0 / 2.0
    );
    assert_eq!(resolved.manifest.base.name.as_deref(), Some("tiny"));
    assert!(
        resolved
            .manifest
            .tensors()
            .any(|(_, t)| t.name == "encoder.layer.0.attention.self.query.lora_A")
    );
}

/// `hub::pull` of `reference` as a native folder into `out`.
async fn pull_native(
    env: &Env,
    cache: &delta_client::Cache,
    reference: &str,
    out: &std::path::Path,
) -> hub::PullReport {
    hub::pull(
        &env.remote,
        cache,
        reference,
        out,
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap()
}

/// A pull renames what it downloads into the folder and only notes it in the cache; with
/// the cache on another filesystem (no rename across) the cache keeps its own copy and the
/// folder gets another.
#[tokio::test]
async fn a_cache_on_another_filesystem_keeps_its_own_copy() {
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &std::path::Path| std::fs::metadata(p).unwrap();
    let env = Env::start().await;
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm, a second filesystem");
    assert_ne!(
        meta(shm.path()).dev(),
        meta(&env.path("")).dev(),
        "/dev/shm is on the test folder's filesystem"
    );
    let native = env.path("native");
    fixtures::write_native_lora(&native, 3, 2, json!({}));
    let pushed = hub::push(&env.remote, &native, "team-a/x", "tiny", &[], &hidden())
        .await
        .unwrap();
    let digest = env.remote.resolve("team-a/x").await.unwrap().manifest.files[0].digest;
    assert_eq!(pushed.version, 1);

    let cache = delta_client::Cache::new(shm.path());
    let out = env.path("out");
    let pulled = pull_native(&env, &cache, "team-a/x", &out).await;
    assert!(pulled.bytes_downloaded > 0);
    let (file, cached) = (out.join("delta.safetensors"), cache.blob_path(&digest));
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(native.join("delta.safetensors")).unwrap()
    );
    assert!(cached.is_file());
    assert_ne!(meta(&file).ino(), meta(&cached).ino());
    assert!(!shm.path().join("copies").exists());

    // On one filesystem the same pull leaves the bytes in the folder alone.
    let near = delta_client::Cache::new(&env.path("cache-near"));
    let out2 = env.path("out2");
    let again = pull_native(&env, &near, "team-a/x", &out2).await;
    assert!(again.bytes_downloaded > 0);
    assert!(!near.blob_path(&digest).exists());
    assert_eq!(again.blobs, vec![out2.join("delta.safetensors")]);
    assert_eq!(
        env.pull_scratch(),
        Vec::<String>::new(),
        "scratch left behind"
    );
}

#[tokio::test]
async fn native_round_trip_dedup_and_cache() {
    let env = Env::start().await;
    let native = env.path("native");
    fixtures::write_native_lora(&native, 3, 2, json!({"task": "sentiment"}));
    let first = hub::push(
        &env.remote,
        &native,
        "team-a/native",
        "tiny",
        &[],
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!((first.version, first.blobs_uploaded), (1, 1));

    // Re-pushing the same delta sends no blob bytes and makes no new version.
    let again = hub::push(
        &env.remote,
        &native,
        "team-a/native",
        "tiny",
        &[],
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            again.version,
            again.created,
            again.bytes_uploaded,
            again.blobs_uploaded
        ),
        (1, false, 0, 0)
    );
    assert_eq!(again.digest, first.digest);

    let out = env.path("pulled");
    let pulled = hub::pull(
        &env.remote,
        &env.cache,
        "team-a/native:v1",
        &out,
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap();
    assert!(pulled.bytes_downloaded > 0);
    assert_eq!(
        std::fs::read(out.join("delta.safetensors")).unwrap(),
        std::fs::read(native.join("delta.safetensors")).unwrap()
    );
    // The pulled folder is itself a pushable native delta with the same digest.
    let repush = hub::push(&env.remote, &out, "team-a/native", "tiny", &[], &hidden())
        .await
        .unwrap();
    assert_eq!((repush.digest, repush.created), (first.digest, false));

    // Pulling what is cached transfers nothing.
    let by_digest = format!("team-a/native@{}", first.digest);
    let cached = hub::pull(
        &env.remote,
        &env.cache,
        &by_digest,
        &env.path("again"),
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(cached.bytes_downloaded, 0);

    // A second version of the same repository; latest follows it.
    let v2 = env.path("v2");
    fixtures::write_native_lora(&v2, 4, 2, json!({"task": "topic"}));
    let second = hub::push(
        &env.remote,
        &v2,
        "team-a/native:candidate",
        "tiny",
        &[],
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(
        env.remote.resolve("team-a/native").await.unwrap().version,
        2
    );
    assert_eq!(
        env.remote
            .resolve("team-a/native:candidate")
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        env.remote.resolve("team-a/native:v1").await.unwrap().digest,
        first.digest
    );
}

#[tokio::test]
async fn listing_search_tags_and_the_cli() {
    let env = Env::start().await;
    for (i, (repo, task)) in [
        ("team-a/one", "sentiment"),
        ("team-a/two", "topic"),
        ("team-b/three", "sentiment"),
    ]
    .iter()
    .enumerate()
    {
        let dir = env.path(&format!("d{i}"));
        fixtures::write_native_lora(&dir, 10 + i as u64, 2, json!({"task": task}));
        env.cli(&["push", dir.to_str().unwrap(), repo, "--base", "tiny"])
            .await
            .unwrap();
    }
    let team_a = env.remote.list_repositories("team-a").await.unwrap();
    assert_eq!(
        team_a
            .iter()
            .map(|r| r.repository.to_string())
            .collect::<Vec<_>>(),
        ["team-a/one", "team-a/two"]
    );

    let fp = env.remote.get_base("tiny").await.unwrap().fingerprint;
    let for_base = env
        .remote
        .search("", Some(fp), "", Default::default())
        .await
        .unwrap();
    assert_eq!(for_base.len(), 3);
    let sentiment = env
        .remote
        .search(
            "",
            None,
            "lora",
            [("task".to_owned(), "sentiment".to_owned())].into(),
        )
        .await
        .unwrap();
    assert_eq!(
        sentiment
            .iter()
            .map(|d| d.repository.to_string())
            .collect::<Vec<_>>(),
        ["team-a/one", "team-b/three"]
    );
    assert!(
        env.remote
            .search("", None, "ia3", Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    // A search names at most 32 annotations (each is a clause of its SQL).
    let many = |n: usize| -> std::collections::BTreeMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()
    };
    assert!(
        env.remote
            .search("", None, "", many(32))
            .await
            .unwrap()
            .is_empty()
    );
    let err = env.remote.search("", None, "", many(33)).await.unwrap_err();
    assert!(
        matches!(&err, delta_client::Error::Rejected { code: tonic::Code::InvalidArgument, message }
            if message.contains("at most 32 annotations; this one names 33")),
        "{err}"
    );

    // Tags: set, compare-and-swap, refuse reserved names.
    env.cli(&["tag", "team-a/one:v1", "prod"]).await.unwrap();
    assert_eq!(
        env.remote.resolve("team-a/one:prod").await.unwrap().version,
        1
    );
    let lost = env
        .cli(&["tag", "team-a/one:v1", "prod", "--expect", "none"])
        .await
        .unwrap_err();
    assert!(format!("{lost:#}").contains("points at v1"), "{lost:#}");
    for reserved in ["latest", "v2"] {
        assert!(
            env.cli(&["tag", "team-a/one:v1", reserved]).await.is_err(),
            "{reserved} accepted"
        );
    }

    // Every read-only command runs, in both output modes.
    for args in [
        vec!["ls"],
        vec!["ls", "team-a"],
        vec!["ls", "--base", "tiny"],
        vec!["ls", "--method", "lora", "--annotation", "task=topic"],
        vec!["show", "team-a/one:prod"],
        vec!["base", "ls"],
        vec!["fingerprint", env.base.to_str().unwrap()],
    ] {
        env.cli(&args).await.unwrap();
        let mut json = vec!["--json"];
        json.extend(args.iter());
        env.cli(&json).await.unwrap();
    }
    let out = env.path("cli-pull");
    env.cli(&[
        "pull",
        "team-b/three",
        "-o",
        out.to_str().unwrap(),
        "--format",
        "peft",
    ])
    .await
    .unwrap();
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("adapter_config.json").is_file());
}

#[tokio::test]
async fn restart_on_the_same_data_dir_serves_everything_again() {
    let env = Env::start().await;
    let native = env.path("native");
    fixtures::write_native_lora(&native, 5, 2, json!({}));
    let pushed = hub::push(&env.remote, &native, "team-a/keep", "tiny", &[], &hidden())
        .await
        .unwrap();
    let Env {
        registry,
        work,
        base,
        ..
    } = env;
    let dir = registry.stop().await;
    let again = crate::TestRegistry::start_in(dir, delta_registry::RegistryConfig::for_test).await;
    let remote = again.remote().await;
    let cache = delta_client::Cache::new(&work.path().join("fresh-cache"));
    let out = work.path().join("out");
    let pulled = hub::pull(
        &remote,
        &cache,
        "team-a/keep",
        &out,
        Format::Native,
        &hidden(),
    )
    .await
    .unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert!(base.is_file());
    assert_eq!(remote.list_bases().await.unwrap().len(), 1);
}

#[tokio::test]
async fn peft_ia3_round_trips_exports_and_applies() {
    let env = Env::start().await;
    let peft = env.path("ia3");
    fixtures::write_peft_ia3(&peft, 9);
    let pushed = hub::push(&env.remote, &peft, "team-a/ia3", "tiny", &[], &hidden())
        .await
        .unwrap();
    let m = env.remote.resolve("team-a/ia3").await.unwrap().manifest;
    assert_eq!(m.method, "ia3");
    assert_eq!(
        m.config.ia3.as_ref().unwrap().feedforward_modules,
        ["intermediate.dense"]
    );
    assert!(
        m.tensors()
            .any(|(_, t)| t.name == "encoder.layer.0.intermediate.dense.ia3_l" && t.shape == [8])
    );

    let out = env.path("exported");
    env.cli(&["export", "peft", "team-a/ia3", "-o", out.to_str().unwrap()])
        .await
        .unwrap();
    let original = fixtures::tensor_bytes(&peft.join("adapter_model.safetensors"));
    assert_eq!(
        fixtures::tensor_bytes(&out.join("adapter_model.safetensors")),
        original
    );
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(
        parsed
            .tensor("base_model.model.encoder.layer.0.intermediate.dense.ia3_l")
            .unwrap()
            .shape(),
        [1, 8]
    );
    assert_eq!(
        parsed
            .tensor("base_model.model.encoder.layer.0.attention.self.query.ia3_l")
            .unwrap()
            .shape(),
        [8, 1]
    );

    // apply: the feed-forward vector scales the input side (columns), the others the rows.
    let merged = env.path("merged.safetensors");
    let base = env.base.to_str().unwrap().to_owned();
    env.cli(&[
        "apply",
        "--base",
        &base,
        peft.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let read = |p: &std::path::Path, n: &str| {
        let b = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        delta_client::numeric::to_f32("F32", st.tensor(n).unwrap().data()).unwrap()
    };
    let ff = "encoder.layer.0.intermediate.dense.weight";
    let l: Vec<f32> = fixtures::values(9 + 50, 8)
        .iter()
        .map(|x| 1.0 + x)
        .collect();
    let expected: Vec<f32> = read(&env.base, ff)
        .iter()
        .enumerate()
        .map(|(i, w)| w * l[i % 8])
        .collect();
    assert_eq!(read(&merged, ff), expected);
    let q = "encoder.layer.1.attention.self.query.weight";
    let lq: Vec<f32> = fixtures::values(9 + 1, 8).iter().map(|x| 1.0 + x).collect();
    let expected: Vec<f32> = read(&env.base, q)
        .iter()
        .enumerate()
        .map(|(i, w)| w * lq[i / 8])
        .collect();
    assert_eq!(read(&merged, q), expected);
    assert_eq!(pushed.version, 1);
}

/// `delta cache` says what the cache holds; `delta cache clean` empties it, leaves pulled
/// folders and a partial download in progress (its lock held) alone, and what is needed
/// again is downloaded again.
#[tokio::test]
async fn the_cache_says_what_it_holds_and_cleans_without_touching_pulled_folders() {
    use delta_client::CacheUsage;
    let env = Env::start().await;
    for (seed, repo) in [(3, "team-a/x"), (4, "team-a/y")] {
        let dir = env.path(repo);
        fixtures::write_native_lora(&dir, seed, 2, json!({}));
        hub::push(&env.remote, &dir, repo, "tiny", &[], &hidden())
            .await
            .unwrap();
    }
    // x is pulled into a folder (the cache notes it), y fetched into the cache itself.
    let out = env.path("out");
    pull_native(&env, &env.cache, "team-a/x", &out).await;
    let y = hub::fetch(&env.remote, &env.cache, "team-a/y", &hidden())
        .await
        .unwrap();
    let y_bytes = y.manifest.files[0].size;
    // Two partial downloads, one of them in progress (its lock held).
    let partial = env.path("cache").join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    let (idle, busy) = (Digest::of(b"idle").hex(), Digest::of(b"busy").hex());
    std::fs::write(partial.join(format!("{idle}.partial")), [0u8; 10]).unwrap();
    std::fs::write(partial.join(format!("{busy}.partial")), [0u8; 7]).unwrap();
    let held = super::hold_lock(&partial.join(format!("{busy}.lock")));

    let usage = |blobs, blob_bytes, partials, partial_bytes, noted| CacheUsage {
        blobs,
        blob_bytes,
        partials,
        partial_bytes,
        noted,
    };
    assert_eq!(env.cache.usage(), usage(1, y_bytes, 2, 17, 1));
    // A pulled file moved away is no longer counted (nor once it is back: the rename moved
    // its ctime), and counting removes nothing.
    let pulled = out.join("delta.safetensors");
    let moved = env.path("moved.safetensors");
    std::fs::rename(&pulled, &moved).unwrap();
    assert_eq!(env.cache.usage(), usage(1, y_bytes, 2, 17, 0));
    std::fs::rename(&moved, &pulled).unwrap();
    assert_eq!(env.cache.usage(), usage(1, y_bytes, 2, 17, 0));
    let notes = std::fs::read_dir(env.path("cache").join("copies")).unwrap();
    assert_eq!(notes.count(), 1);
    env.cli(&["cache", "info"]).await.unwrap();
    assert_eq!(env.cache.clean().unwrap(), y_bytes + 10);
    assert_eq!(env.cache.usage(), usage(0, 0, 1, 7, 0));
    assert_eq!(
        std::fs::read(out.join("delta.safetensors")).unwrap(),
        std::fs::read(env.path("team-a/x").join("delta.safetensors")).unwrap()
    );
    drop(held);
    env.cli(&["cache", "clean"]).await.unwrap();
    assert_eq!(env.cache.usage(), usage(0, 0, 0, 0, 0));
    let again = hub::fetch(&env.remote, &env.cache, "team-a/x", &hidden())
        .await
        .unwrap();
    assert!(again.bytes_downloaded > 0, "the note went with the clean");
}
