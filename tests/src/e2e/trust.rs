//! A client and errors users can trust (issue 11): the cache cannot be poisoned, the CLI
//! stays in its folders, one team cannot starve the others, errors say what happened and
//! the CLI shows what a tag, a token or a delta really is.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use clap::Parser;

use delta_client::hub;
use delta_proto::{self as pb, Digest};
use delta_registry::RegistryConfig;
use delta_registry::auth::Scope;
use serde_json::json;
use tonic::Code;

use super::{Env, code, hidden};
use crate::{TestRegistry, fixtures};

fn s(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Flips one byte of a file in place (same inode, same size).
fn flip_byte(path: &std::path::Path, at: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut byte).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[byte[0] ^ 0xff]).unwrap();
}

/// Rewrites the cache's stamp of a blob from its file as it is now, as if the file had
/// not changed since it was verified: what bit rot looks like to the cache (the bytes
/// differ, nothing the kernel records does). The stamp's layout is the cache's own.
fn restamp(cache: &delta_client::Cache, digest: &Digest) {
    let m = std::fs::metadata(cache.blob_path(digest)).unwrap();
    let stamp = format!(
        "{} {}.{:09} {}.{:09} {}:{}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.dev(),
        m.ino()
    );
    let path = cache.root().join("verified").join(digest.hex());
    std::fs::write(path, stamp).unwrap();
}

// ---- 5. The cache cannot be poisoned ----

#[tokio::test]
async fn pulled_files_are_never_shared_and_a_changed_cache_is_fetched_again() {
    let env = Env::start().await;
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 3, 2, json!({}));
    let original = std::fs::read(dir.join("delta.safetensors")).unwrap();
    let digest = Digest::of(&original);
    let base = s(&env.base);
    env.cli(&["push", &s(&dir), "team/x:stable", "--base", "tiny"])
        .await
        .unwrap();
    let cached = env.cache.blob_path(&digest);
    let apply = |name: &'static str| {
        let out = env.path(name);
        let env = &env;
        let base = base.clone();
        async move {
            env.cli(&["apply", "--base", &base, "team/x:stable", "-o", &s(&out)])
                .await
                .unwrap();
            std::fs::read(out).unwrap()
        }
    };
    let progress = hidden();
    let fetch = || hub::fetch(&env.remote, &env.cache, "team/x:stable", &progress);

    // A pull writes the blob once, into the folder; the cache only notes where it is,
    // and later commands read it there without downloading it again.
    let out1 = env.path("out1");
    env.cli(&["pull", "team/x:stable", "-o", &s(&out1)])
        .await
        .unwrap();
    let pulled = out1.join("delta.safetensors");
    assert!(!cached.exists());
    let report = fetch().await.unwrap();
    assert_eq!(report.bytes_downloaded, 0);
    assert_eq!(report.blobs, vec![pulled.clone()]);
    let merged = apply("m1.safetensors").await;

    // Editing the pulled file ends the note: the edited bytes are never read as the
    // blob, the next pull downloads it again, and two folders never share a file.
    flip_byte(&pulled, 200);
    let out2 = env.path("out2");
    env.cli(&["pull", "team/x:stable", "-o", &s(&out2)])
        .await
        .unwrap();
    let pulled2 = out2.join("delta.safetensors");
    assert_eq!(std::fs::read(&pulled2).unwrap(), original);
    assert_ne!(original, std::fs::read(&pulled).unwrap());
    assert_ne!(
        std::fs::metadata(&pulled).unwrap().ino(),
        std::fs::metadata(&pulled2).unwrap().ino()
    );
    assert_eq!(apply("m2.safetensors").await, merged);

    // With the folder gone, the blob is downloaded into the cache itself; a pull then
    // copies it, and the pulled file is not the cache's file.
    std::fs::remove_dir_all(&out2).unwrap();
    assert!(fetch().await.unwrap().bytes_downloaded > 0);
    assert!(cached.is_file());
    let out3 = env.path("out3");
    env.cli(&["pull", "team/x:stable", "-o", &s(&out3)])
        .await
        .unwrap();
    let pulled3 = out3.join("delta.safetensors");
    assert_ne!(
        std::fs::metadata(&pulled3).unwrap().ino(),
        std::fs::metadata(&cached).unwrap().ino()
    );
    flip_byte(&pulled3, 200);
    assert_eq!(apply("m3.safetensors").await, merged);

    // A cache entry changed after it was verified (its size/mtime/inode stamp no longer
    // matches) is re-hashed, found bad, and fetched again.
    flip_byte(&cached, 200);
    assert!(fetch().await.unwrap().bytes_downloaded > 0);
    assert_eq!(std::fs::read(&cached).unwrap(), original);

    // An in-place edit that sets the mtime back still moves the ctime, which only the
    // kernel sets: the entry is re-hashed, found bad and fetched again.
    let mtime = std::fs::metadata(&cached).unwrap().modified().unwrap();
    flip_byte(&cached, 300);
    std::fs::File::options()
        .write(true)
        .open(&cached)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(fetch().await.unwrap().bytes_downloaded > 0);
    assert_eq!(std::fs::read(&cached).unwrap(), original);

    // Bytes that change under an unchanged stamp (bit rot: the disk, not a write) escape
    // the cheap check; `--verify-cache` re-hashes everything and still gets them right.
    flip_byte(&cached, 300);
    restamp(&env.cache, &digest);
    let trusted = fetch().await.unwrap();
    assert_eq!(
        trusted.bytes_downloaded, 0,
        "the stamp matches: not re-hashed"
    );
    let out4 = env.path("out4");
    env.cli(&["--verify-cache", "pull", "team/x:stable", "-o", &s(&out4)])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(out4.join("delta.safetensors")).unwrap(),
        original
    );

    // A corrupt partial download: one that cannot be a prefix (longer than the blob) is
    // dropped and the download starts over; a wrong prefix fails the hash once, is
    // removed, and the next pull succeeds.
    let partial = env
        .path("cache")
        .join("partial")
        .join(format!("{}.partial", digest.hex()));
    for (len, first_pull_fails) in [(original.len() + 10, false), (100, true)] {
        // Nothing the cache holds or knows of: the pull must download.
        let _ = std::fs::remove_file(&cached);
        let _ = std::fs::remove_dir_all(env.path("cache").join("copies"));
        std::fs::write(&partial, vec![0x5a; len]).unwrap();
        let out = env.path(&format!("partial-{len}"));
        let first = env.cli(&["pull", "team/x:stable", "-o", &s(&out)]).await;
        assert_eq!(first.is_err(), first_pull_fails, "{first:?}");
        if first_pull_fails {
            assert!(!partial.exists(), "bad bytes are not kept");
            env.cli(&["pull", "team/x:stable", "-o", &s(&out)])
                .await
                .unwrap();
        }
        assert!(!partial.exists());
        assert_eq!(
            std::fs::read(out.join("delta.safetensors")).unwrap(),
            original
        );
    }
}

/// A pull that fails part-way keeps the blobs it finished in the cache, as it keeps the
/// partial one: the next pull downloads only the rest, and no scratch is left behind.
#[tokio::test]
async fn a_failed_pull_keeps_the_blobs_it_finished() {
    let env = Env::start().await;
    // A delta in two files: layer 0's tensors and layer 1's.
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 3, 2, json!({}));
    std::fs::remove_file(dir.join("delta.safetensors")).unwrap();
    let (layer0, layer1): (Vec<_>, Vec<_>) = fixtures::lora_tensors(3, 2)
        .into_iter()
        .partition(|(name, _, _)| name.contains(".layer.0."));
    fixtures::write_f32(&dir.join("a.safetensors"), &layer0, None);
    fixtures::write_f32(&dir.join("b.safetensors"), &layer1, None);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("delta.json")).unwrap()).unwrap();
    m["files"] = json!([{"path": "a.safetensors"}, {"path": "b.safetensors"}]);
    std::fs::write(dir.join("delta.json"), m.to_string()).unwrap();
    env.cli(&["push", &s(&dir), "team/two", "--base", "tiny"])
        .await
        .unwrap();
    let files = env.remote.resolve("team/two").await.unwrap().manifest.files;
    assert_eq!(files.len(), 2);
    // The pull downloads in manifest order: the second blob's partial download is a
    // wrong prefix, so it fails the hash after the first blob is done.
    let (done, failing) = (&files[0], &files[1]);
    let partial = env
        .path("cache")
        .join("partial")
        .join(format!("{}.partial", failing.digest.hex()));
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, vec![0x5a; 100]).unwrap();
    let (out, progress) = (env.path("out"), hidden());
    let pull = || {
        hub::pull(
            &env.remote,
            &env.cache,
            "team/two",
            &out,
            delta_client::delta::Format::Native,
            &progress,
        )
    };
    let failed = pull().await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(!out.exists());
    assert!(env.cache.has(&done.digest), "the finished blob is kept");
    assert!(!env.cache.has(&failing.digest));
    assert_eq!(
        env.pull_scratch(),
        Vec::<String>::new(),
        "scratch left behind"
    );

    let pulled = pull().await.unwrap();
    assert_eq!(pulled.bytes_downloaded, failing.size);
    for f in ["a.safetensors", "b.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(dir.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// One download of a blob at a time into one cache (its partial file is appended to): a
/// pull waits while another process holds the blob's download lock and finishes once it
/// is released; several pulls of one delta sharing a cache all get the right bytes.
#[tokio::test]
async fn pulls_sharing_a_cache_take_turns_on_a_blob() {
    use delta_client::delta::Format;
    let env = Env::start().await;
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 3, 2, json!({}));
    env.cli(&["push", &s(&dir), "team/x", "--base", "tiny"])
        .await
        .unwrap();
    let original = std::fs::read(dir.join("delta.safetensors")).unwrap();
    let digest = env.remote.resolve("team/x").await.unwrap().manifest.files[0].digest;
    let progress = hidden();

    // Another process downloading the blob: the lock file it holds.
    let lock = env
        .path("cache")
        .join("partial")
        .join(format!("{}.lock", digest.hex()));
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = super::hold_lock(&lock);
    let out = env.path("out");
    let pull = hub::pull(
        &env.remote,
        &env.cache,
        "team/x",
        &out,
        Format::Native,
        &progress,
    );
    tokio::pin!(pull);
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut pull).await;
    assert!(
        waited.is_err(),
        "the pull did not wait for the lock: {waited:?}"
    );
    assert!(!out.exists());
    // It finishes as a download does: the lock file removed, then unlocked.
    std::fs::remove_file(&lock).unwrap();
    drop(held);
    pull.await.unwrap();
    assert_eq!(
        std::fs::read(out.join("delta.safetensors")).unwrap(),
        original
    );
    assert!(!lock.exists());

    // Six pulls at once into six folders, one cache, nothing cached or noted.
    std::fs::remove_dir_all(&out).unwrap();
    let _ = std::fs::remove_dir_all(env.path("cache").join("copies"));
    let outs: Vec<_> = (0..6).map(|i| env.path(&format!("out-{i}"))).collect();
    let pulls = outs.iter().map(|o| {
        hub::pull(
            &env.remote,
            &env.cache,
            "team/x",
            o,
            Format::Native,
            &progress,
        )
    });
    for (o, pulled) in outs.iter().zip(futures::future::join_all(pulls).await) {
        pulled.unwrap_or_else(|e| panic!("{}: {e}", o.display()));
        assert_eq!(
            std::fs::read(o.join("delta.safetensors")).unwrap(),
            original
        );
    }
    assert!(!lock.exists());
}

// ---- 6. The CLI stays inside the folders it is given ----

#[tokio::test]
async fn push_reads_only_files_inside_the_folder_and_pull_never_mixes_versions() {
    let env = Env::start().await;
    let secret = env.path("secret.safetensors");
    fixtures::write_native_lora(&env.path("other"), 5, 2, json!({}));
    std::fs::copy(env.path("other").join("delta.safetensors"), &secret).unwrap();

    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("delta.json")).unwrap()).unwrap();
    for listed in ["../secret.safetensors", &s(&secret)] {
        let mut m = manifest.clone();
        m["files"] = json!([{"path": listed}]);
        std::fs::write(dir.join("delta.json"), m.to_string()).unwrap();
        let e = env
            .cli(&["push", &s(&dir), "team/evil", "--base", "tiny"])
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("not a plain file name"), "{e:#}");
    }
    // A symbolic link out of the folder.
    std::fs::write(dir.join("delta.json"), manifest.to_string()).unwrap();
    std::fs::remove_file(dir.join("delta.safetensors")).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("delta.safetensors")).unwrap();
    let e = env
        .cli(&["push", &s(&dir), "team/evil", "--base", "tiny"])
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("leads out of the folder"),
        "{e:#}"
    );
    assert!(env.listing().await.is_empty(), "nothing was published");

    // Pull into a folder that holds something: refused, untouched; with --overwrite the
    // folder holds exactly the pulled delta.
    let ok = env.path("ok");
    fixtures::write_native_lora(&ok, 2, 2, json!({}));
    env.cli(&["push", &s(&ok), "team/ok", "--base", "tiny"])
        .await
        .unwrap();
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old-version.safetensors"), b"stale").unwrap();
    let e = env
        .cli(&["pull", "team/ok", "-o", &s(&out)])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("--overwrite"), "{e:#}");
    assert_eq!(
        std::fs::read(out.join("old-version.safetensors")).unwrap(),
        b"stale"
    );
    env.cli(&["pull", "team/ok", "-o", &s(&out), "--overwrite"])
        .await
        .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["delta.json", "delta.safetensors"]);
}

// ---- 7. One team cannot starve the others ----

#[tokio::test]
async fn open_uploads_are_capped_per_namespace_and_per_anonymous_peer() {
    let dir = tempfile::tempdir().unwrap();
    let reg = TestRegistry::start_in(dir, |p| {
        let mut c = RegistryConfig::for_test(p);
        c.max_uploads_per_token = 3;
        c.max_uploads_per_namespace = 4;
        c.empty_upload_ttl = Duration::from_millis(500);
        c
    })
    .await;
    // Anonymous callers in open mode are capped per peer address.
    let anon = reg.remote().await;
    for i in 0..3u8 {
        anon.start_upload(Digest::of(&[i]), 1).await.unwrap();
    }
    let e = anon.start_upload(Digest::of(&[9]), 1).await.unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted);

    // With tokens: two tokens of team a fill the namespace's 4 slots; team b still uploads.
    let meta = delta_registry::SqlMeta::open(&reg.dir.path().join("registry.sqlite")).unwrap();
    let token = |ns: &str| {
        let new = delta_registry::admin::NewToken {
            namespace: ns.into(),
            scope: Scope::Write,
            worker: false,
            expires_in: None,
            description: String::new(),
        };
        delta_registry::admin::create_token(&meta, &new, 0)
            .unwrap()
            .1
    };
    let (a1, a2, b) = (token("team-a"), token("team-a"), token("team-b"));
    let connect = |t: String| {
        let url = reg.url();
        async move {
            delta_client::Remote::connect_with(&url, Some(&t))
                .await
                .unwrap()
        }
    };
    let (a1, a2, b) = (connect(a1).await, connect(a2).await, connect(b).await);
    for i in 10..13u8 {
        a1.start_upload(Digest::of(&[i]), 1).await.unwrap();
    }
    a2.start_upload(Digest::of(&[13]), 1).await.unwrap();
    let e = a2.start_upload(Digest::of(&[14]), 1).await.unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted);
    assert!(e.to_string().contains("team-a"), "{e}");
    b.start_upload(Digest::of(&[15]), 1).await.unwrap();

    // Sessions that never received a byte expire quickly and free their slots.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while a2.start_upload(Digest::of(&[16]), 1).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "empty sessions never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- 8. Errors say what happened ----

#[tokio::test]
async fn errors_are_bounded_named_and_reveal_nothing() {
    let env = Env::start().await;
    // A 10 kB name: a short, readable refusal that standard clients can carry.
    let long = format!("team/{}", "n".repeat(10_000));
    let e = env.remote.resolve(&long).await.unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument);
    assert!(e.to_string().len() < 1024, "{} bytes", e.to_string().len());

    // A unary message over the limit: RESOURCE_EXHAUSTED naming the limit.
    let mut raw = pb::registry_client::RegistryClient::connect(env.registry.url())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let e = raw
        .push_manifest(pb::PushManifestRequest {
            repository: "team/big".into(),
            manifest: vec![b'x'; 6 << 20],
            tags: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limit"), "{e:?}");

    // Another namespace's upload session is as absent as a made-up id.
    let a = env
        .client(Some(&env.token("team-a", Scope::Write, false)))
        .await;
    let b = env
        .client(Some(&env.token("team-b", Scope::Write, false)))
        .await;
    let (id, _) = a
        .start_upload(Digest::of(b"a's bytes"), 9)
        .await
        .unwrap()
        .unwrap();
    let theirs = b.upload_offset(&id).await.unwrap_err();
    let made_up = b.upload_offset("no-such-upload").await.unwrap_err();
    assert_eq!(code(&theirs), Code::NotFound);
    assert_eq!(code(&made_up), Code::NotFound);
    assert_eq!(a.upload_offset(&id).await.unwrap(), 0);

    // A quarantined blob says so and how to heal it.
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 4, 2, json!({}));
    hub::push(&a, &dir, "team-a/q", "tiny", &[], &hidden())
        .await
        .unwrap();
    let d = Digest::of(&std::fs::read(dir.join("delta.safetensors")).unwrap());
    let stored = env
        .registry
        .dir
        .path()
        .join("store/blobs/blake3")
        .join(&d.hex()[..2])
        .join(d.hex());
    flip_byte(&stored, 100);
    let store = delta_registry::BlobStore::open(&RegistryConfig::for_test(env.registry.dir.path()))
        .unwrap();
    let meta: std::sync::Arc<dyn delta_registry::MetaStore> = std::sync::Arc::new(env.meta());
    let report =
        delta_registry::maintenance::fsck(meta, &store, true, Duration::ZERO, i64::MAX / 2)
            .await
            .unwrap();
    assert_eq!(report.quarantined, 1);
    let e = a
        .download_to(d, &env.path("q.partial"), &hidden())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::DataLoss, "{e:?}");
    assert!(e.to_string().contains("push it again"), "{e}");
}

/// The CLI's error for `args` with no registry listening: `delta --registry
/// http://127.0.0.1:1 ARGS`, in a throwaway cache and credentials folder.
async fn offline(work: &std::path::Path, args: &[&str]) -> anyhow::Error {
    let (cache, creds) = (work.join("cache"), work.join("credentials.json"));
    let mut argv = vec!["delta", "--registry", "http://127.0.0.1:1"];
    argv.extend(["--cache", cache.to_str().unwrap()]);
    argv.extend(["--credentials", creds.to_str().unwrap()]);
    argv.extend_from_slice(args);
    let cli = delta_client::cli::Cli::try_parse_from(argv).unwrap();
    delta_client::cli::run(cli).await.unwrap_err()
}

/// A push of a folder that is not there, or of a file, says so whether or not a registry
/// answers (as `git push` names a local mistake first); an unreachable registry is one
/// line that says so without repeating a cause.
#[tokio::test]
async fn local_mistakes_are_named_before_the_registry_is_asked() {
    let work = tempfile::tempdir().unwrap();
    let missing = s(&work.path().join("missing"));
    let e = offline(work.path(), &["push", &missing, "team/x", "--base", "b"]).await;
    assert!(e.to_string().ends_with(": no such folder"), "{e:#}");
    let file = work.path().join("delta.json");
    std::fs::write(&file, "{}").unwrap();
    let e = offline(work.path(), &["push", &s(&file), "team/x", "--base", "b"]).await;
    assert!(e.to_string().contains(": not a folder"), "{e:#}");

    let dir = work.path().join("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    let e = offline(work.path(), &["push", &s(&dir), "team/x", "--base", "b"]).await;
    let line = delta_proto::error_line(e.chain());
    assert!(
        line.starts_with("cannot connect to the registry at http://127.0.0.1:1: "),
        "{line}"
    );
    let parts: Vec<_> = line.split(": ").collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "a cause repeats: {line}"
    );
}

// ---- 9. Trust signals ----

#[tokio::test]
async fn yanked_tags_identity_and_nonfinite_tensors_are_shown() {
    let env = Env::start().await;
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    hub::push(
        &env.remote,
        &dir,
        "team/y",
        "tiny",
        &["prod".into()],
        &hidden(),
    )
    .await
    .unwrap();

    // Yanking says which tags still point at the version; pulls through them say so.
    let (_, _, tags) = env.remote.yank("team/y:v1", false).await.unwrap();
    assert!(tags.contains(&"prod".to_owned()), "{tags:?}");
    assert!(env.remote.resolve("team/y:prod").await.unwrap().yanked);
    let report = hub::pull(
        &env.remote,
        &env.cache,
        "team/y:prod",
        &env.path("out"),
        delta_client::delta::Format::Native,
        &hidden(),
    )
    .await
    .unwrap();
    assert!(report.yanked);
    // A repository whose versions are all yanked is listed as such, and `latest` explains.
    let listed = env.remote.list_repositories("team").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].yanked, "{listed:?}");
    let e = env.remote.resolve("team/y").await.unwrap_err();
    assert!(e.to_string().contains("yanked"), "{e}");

    // whoami, doctor and login check the token with the registry.
    let secret = env.token("team", Scope::Write, false);
    let me = env.client(Some(&secret)).await.whoami().await.unwrap();
    assert_eq!(
        (me.kind, me.namespace.as_str(), me.scope),
        (
            delta_proto::tokens::CallerKind::User,
            "team",
            Some(Scope::Write)
        )
    );
    let bogus = format!("dlt_{}", "1".repeat(64));
    assert!(env.cli(&["--token", &bogus, "doctor"]).await.is_err());
    assert!(env.cli(&["login", "--token", &bogus]).await.is_err());
    assert!(
        !env.path("credentials.json").exists(),
        "a bad token is not saved"
    );
    env.cli(&["login", "--token", &secret]).await.unwrap();
    env.cli(&["whoami"]).await.unwrap();

    // A delta holding NaN or Inf is refused unless asked for.
    let bad = env.path("nan");
    std::fs::create_dir_all(&bad).unwrap();
    let mut tensors = fixtures::lora_tensors(1, 2);
    tensors[0].2[3] = f32::NAN;
    fixtures::write_f32(&bad.join("delta.safetensors"), &tensors, None);
    std::fs::copy(dir.join("delta.json"), bad.join("delta.json")).unwrap();
    let e = env
        .cli(&["push", &s(&bad), "team/nan", "--base", "tiny"])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("NaN"), "{e:#}");
    env.cli(&[
        "push",
        &s(&bad),
        "team/nan",
        "--base",
        "tiny",
        "--allow-nonfinite",
    ])
    .await
    .unwrap();
}

/// A server (or a proxy in front of one) whose statuses carry a `grpc-status-details-bin`
/// that is not base64, on which tonic's status parser panics: calls to the registry and to
/// an inference service, and blob downloads, end with the status's code and message
/// instead, whether the status comes as headers only (the registry's calls here) or as
/// trailers after the headers (downloads, inference).
#[tokio::test]
async fn status_details_that_are_not_base64_do_not_crash_the_client() {
    use tonic::body::Body;
    use tonic::codegen::http;

    /// Answers every call with UNAVAILABLE "down" and bad details.
    #[derive(Clone)]
    struct Hostile<const TRAILERS_ONLY: bool>;
    impl tonic::server::NamedService for Hostile<true> {
        const NAME: &'static str = "delta.registry.v1.Registry";
    }
    impl tonic::server::NamedService for Hostile<false> {
        const NAME: &'static str = "delta.inference.v1.Inference";
    }
    impl<const TRAILERS_ONLY: bool> tonic::codegen::Service<http::Request<Body>>
        for Hostile<TRAILERS_ONLY>
    {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            let mut status = http::HeaderMap::new();
            status.insert("grpc-status", http::HeaderValue::from_static("14"));
            status.insert("grpc-message", http::HeaderValue::from_static("down"));
            status.insert(
                "grpc-status-details-bin",
                http::HeaderValue::from_static("not base64 !!"),
            );
            let head = http::Response::builder().header("content-type", "application/grpc");
            let download = req.uri().path().ends_with("/DownloadBlob");
            let response = if TRAILERS_ONLY && !download {
                let mut r = head.body(Body::empty()).unwrap();
                r.headers_mut().extend(status);
                r
            } else {
                let trailers = http_body::Frame::trailers(status);
                let frames = futures::stream::iter([Ok::<_, tonic::Status>(trailers)]);
                let body = Body::new(http_body_util::StreamBody::new(frames));
                head.body(body).unwrap()
            };
            std::future::ready(Ok(response))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Hostile::<true>)
            .add_service(Hostile::<false>)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let remote = delta_client::Remote::connect(&url).await.unwrap();
    let err = remote.resolve("team/delta").await.unwrap_err();
    assert_eq!(code(&err), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("down"), "{err}");
    let err = remote.list_repositories("").await.unwrap_err();
    assert_eq!(code(&err), Code::Unavailable, "{err}");
    let work = tempfile::tempdir().unwrap();
    let err = remote
        .download_to(Digest::of(b"x"), &work.path().join("x"), &hidden())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("down"), "{err}");

    let service = delta_client::service::Service::connect(&url, None, None)
        .await
        .unwrap();
    let err = service.predict(&Default::default(), &[]).await.unwrap_err();
    assert_eq!(code(&err), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("down"), "{err}");
    server.abort();
}
