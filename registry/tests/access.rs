//! The registry binary as an operator runs it: the README's token commands give workers
//! what they need, refusals are logged, a full disk is named (issue 11).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{
    Client, base_and_lora_blob, client_with, create_token, request_id, start, start_command,
    start_with, token_secret, upload,
};
use delta_proto::{self as pb, Digest};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_delta-registry");

/// Every `delta-registry token create …` command in the README, as written there (in
/// code blocks and inline), the data dir aside.
fn readme_token_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut out = Vec::new();
    let mut rest = readme.as_str();
    while let Some(at) = rest.find("delta-registry token create") {
        let cmd = &rest[at..];
        let end = cmd.find(['`', ')', '\n', ';']).unwrap_or(cmd.len());
        out.push(cmd[..end].trim().to_owned());
        rest = &cmd[end..];
    }
    out
}

/// Runs one README command against `data` through the shell (its quoting as written);
/// returns the secret (the last line of its output).
fn run_readme_command(cmd: &str, data: &Path) -> String {
    let mut line = cmd.replacen("delta-registry", BIN, 1);
    if line.contains("--data-dir delta-data") {
        line = line.replace(
            "--data-dir delta-data",
            &format!("--data-dir '{}'", data.display()),
        );
    } else {
        line.push_str(&format!(" --data-dir '{}'", data.display()));
    }
    let out = Command::new("sh").args(["-c", &line]).output().unwrap();
    token_secret(&out, cmd)
}

fn lora_manifest(fp: &Digest, file: &[u8], job: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schema_version": 1, "method": "lora", "config": {"lora": {"r": 1, "lora_alpha": 1.0}},
        "base": {"fingerprint": fp.to_string()}, "annotations": {"job": job.to_string()},
        "files": [{"path": "delta.safetensors", "digest": Digest::of(file).to_string(), "size": file.len(),
                   "tensors": [{"name": "w.lora_A", "dtype": "F32", "shape": [1, 4]}, {"name": "w.lora_B", "dtype": "F32", "shape": [4, 1]}]}],
    }))
    .unwrap()
}

async fn lease(
    c: &mut Client,
    kinds: &[&str],
) -> Result<Option<(pb::JobInfo, String)>, tonic::Status> {
    let r = c
        .lease_job(pb::LeaseJobRequest {
            worker: "w".into(),
            lease_seconds: 60,
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            bases: vec![],
            wait_seconds: 0,
        })
        .await?
        .into_inner();
    Ok(r.job.map(|j| (j, r.lease)))
}

/// The README's commands, run as written: the team's write token submits a training job,
/// the worker tokens it shows lease and publish it (the scope is checked at lease time),
/// and a read-scope worker is told at once that it may only verify.
#[tokio::test]
async fn the_readmes_token_commands_give_workers_what_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("delta-data");
    let commands = readme_token_commands();
    assert!(commands.len() >= 4, "{commands:?}");
    let reg = start(&data);
    let mut secrets = Vec::new();
    for cmd in &commands {
        secrets.push((cmd.clone(), run_readme_command(cmd, &data)));
    }
    let find = |want: &[&str]| {
        secrets
            .iter()
            .find(|(c, _)| want.iter().all(|w| c.contains(w)))
            .unwrap_or_else(|| panic!("no README command with {want:?}: {commands:?}"))
            .1
            .clone()
    };
    let user = find(&["--namespace team-a", "--scope write", "--expires"]);
    let admin = find(&["--scope admin"]);
    let team_worker = find(&["--namespace team-a", "--worker"]);
    let any_worker = find(&["--namespace '*'", "--worker"]);

    // The admin registers the base; the team submits two training jobs.
    let mut a = client_with(&reg.url, Some(&admin)).await;
    let (fp, file) = base_and_lora_blob(&mut a).await;
    let mut u = client_with(&reg.url, Some(&user)).await;
    let dataset = b"{\"text\":\"a\",\"label\":0}\n";
    assert!(upload(&mut u, dataset, dataset.len()).await.committed);
    let spec = serde_json::json!({
        "base": fp.to_string(),
        "train": Digest::of(dataset).to_string(),
        "spec": {"methods": ["lora"]},
    });
    for _ in 0..2 {
        u.submit_job(pb::SubmitJobRequest {
            kind: "train".into(),
            spec: spec.to_string(),
            repository: "team-a/model".into(),
            tags: vec!["prod".into()],
            blobs: vec![],
        })
        .await
        .unwrap();
    }
    // Each worker token leases a job and publishes what it trained.
    for secret in [team_worker, any_worker] {
        let mut w = client_with(&reg.url, Some(&secret)).await;
        let (job, lease_id) = lease(&mut w, &["train", "verify"]).await.unwrap().unwrap();
        assert!(upload(&mut w, &file, file.len()).await.committed);
        let done = w
            .complete_job(pb::CompleteJobRequest {
                id: job.id,
                lease: lease_id,
                manifest: lora_manifest(&fp, &file, job.id),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("publishing with a README worker token: {e:?}"))
            .into_inner();
        assert_eq!(done.state, "succeeded");
    }
    let versions = u
        .list_versions(pb::ListVersionsRequest {
            repository: "team-a/model".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 2);

    // A read-scope worker token: refused training when it asks, welcome to verify.
    let reader = create_token(
        &data,
        &["--worker", "--namespace", "team-a", "--scope", "read"],
    );
    let mut r = client_with(&reg.url, Some(&reader)).await;
    let e = lease(&mut r, &["train"]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(lease(&mut r, &["verify"]).await.unwrap().is_none());

    // A kind no worker runs is named, at lease and at submission, not silently unmatched.
    let e = lease(&mut r, &["deploy"]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "job kind \"deploy\" is not one of train, verify"
    );
    let e = u
        .submit_job(pb::SubmitJobRequest {
            kind: "deploy".into(),
            spec: "{}".into(),
            repository: "team-a/model".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"deploy\""), "{e:?}");
}

/// Failed authentications and refusals are logged with the request id, never the secret.
#[tokio::test]
async fn refusals_are_logged_with_the_request_id_and_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let b_secret = create_token(&data, &["--namespace", "team-b", "--scope", "write"]);
    let log = dir.path().join("registry.log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let reg = start_command(cmd);

    let bogus = format!("dlt_{}", "7".repeat(64));
    let mut anon = client_with(&reg.url, Some(&bogus)).await;
    let e = anon.list_bases(pb::ListBasesRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let bogus_id = request_id(&e);
    let mut b = client_with(&reg.url, Some(&b_secret)).await;
    let e = b
        .set_tag(pb::SetTagRequest {
            reference: "team-a/x:v1".into(),
            tag: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let denied_id = request_id(&e);
    drop(reg);

    let text = std::fs::read_to_string(&log).unwrap();
    for id in [&bogus_id, &denied_id] {
        let line = text
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("request {id} not logged:\n{text}"));
        assert!(line.contains("refused"), "{line}");
    }
    assert!(!text.contains(&bogus[4..]), "a secret was logged:\n{text}");
    assert!(
        !text.contains(&b_secret[4..]),
        "a secret was logged:\n{text}"
    );
}

/// A full disk answers RESOURCE_EXHAUSTED naming the storage, and nothing stored changes.
/// The store is a 2 MiB tmpfs mounted in a user namespace of the registry's own
/// (`unshare -Urm`, no root needed); skipped with a message where the kernel forbids it.
#[tokio::test]
async fn a_full_disk_is_named_and_loses_nothing() {
    let probe = Command::new("unshare")
        .args(["-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: this kernel does not allow unprivileged mount namespaces");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = data.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-Urm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=2m tmpfs '{}' && exec '{BIN}' serve --listen 127.0.0.1:0 --data-dir '{}'",
            store.display(),
            data.display()
        ))
        .env("RUST_LOG", "off");
    let reg = start_command(cmd);
    let mut c = common::client(&reg.url).await;
    let (_, small) = base_and_lora_blob(&mut c).await;
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&big);
    let start = c
        .start_upload(pb::StartUploadRequest {
            digest: d.to_string(),
            size: big.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    let chunks: Vec<pb::UploadChunk> = (0..big.len())
        .step_by(delta_proto::CHUNK_SIZE)
        .map(|off| pb::UploadChunk {
            upload_id: start.upload_id.clone(),
            offset: off as u64,
            data: bytes::Bytes::copy_from_slice(
                &big[off..(off + delta_proto::CHUNK_SIZE).min(big.len())],
            ),
        })
        .collect();
    let e = c
        .upload_blob(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("full"), "{e:?}");
    // What was stored before is intact and the registry still serves.
    let missing = c
        .missing_blobs(pb::MissingBlobsRequest {
            digests: vec![Digest::of(&small).to_string(), d.to_string()],
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![d.to_string()]);
}

/// `fsck` lists what killed uploads left behind, and `--repair` removes it.
#[tokio::test]
async fn fsck_reports_stale_staging_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let reg = start_with(&data, &[], &[]);
        let mut c = common::client(&reg.url).await;
        base_and_lora_blob(&mut c).await;
    }
    let leftover = data.join("store/staging/0123.1.killed");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"half an upload").unwrap();
    let fsck = |repair: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["fsck", "--grace", "0s", "--data-dir"]).arg(&data);
        if repair {
            cmd.arg("--repair");
        }
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    let report = fsck(false);
    assert!(
        report.contains("staging\tstaging/0123.1.killed"),
        "{report}"
    );
    assert!(report.contains("1 stale staging"), "{report}");
    assert!(leftover.exists());
    fsck(true);
    assert!(!leftover.exists());
    assert!(fsck(false).contains("0 stale staging"));
}

/// `token ls` and `audit` print times as RFC 3339 UTC, not raw Unix seconds.
#[test]
fn token_ls_and_audit_print_readable_times() {
    let data = tempfile::tempdir().unwrap();
    create_token(
        data.path(),
        &["--namespace", "team", "--scope", "write", "--expires", "2h"],
    );
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let year = |s: &str| {
        s.split(|c: char| c.is_whitespace())
            .any(|w| w.len() == 20 && w.ends_with('Z') && w.as_bytes()[10] == b'T')
    };
    let ls = run(&["token", "ls"]);
    assert!(ls.contains("expires 20") && year(&ls), "{ls}");
    // One audited action: an upload, its row written with it.
    {
        use delta_registry::MetaStore;
        let meta = delta_registry::SqlMeta::open(&data.path().join("registry.sqlite")).unwrap();
        let who = delta_registry::meta::Actor {
            token: Some(1),
            at: 1_796_000_000,
        };
        meta.store_blob(&delta_proto::Digest::of(b"x"), 1, None, &who)
            .unwrap();
    }
    let audit = run(&["audit"]);
    assert!(audit.contains("2026-11-30T"), "{audit}");
    assert!(audit.lines().count() >= 1, "{audit}");
    for line in audit.lines() {
        assert!(year(line), "{line}");
    }
}
