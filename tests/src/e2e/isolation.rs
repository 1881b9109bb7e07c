//! Another team's attacks on a shared registry (issue 11): borrowing blobs through
//! manifests and job specs, workers reaching across namespaces, forged and squatted bases.
//! Each runs on SQLite and on PostgreSQL: the rules live in the metadata queries.

use delta_client::hub;
use delta_proto::fingerprint::{FingerprintEntry, fingerprint};
use delta_proto::jobs::JobKind;
use delta_proto::manifest::TensorInfo;
use delta_proto::{self as pb, Digest, Manifest};
use delta_registry::MetaStore;
use delta_registry::auth::Scope;
use serde_json::json;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Engine, Env, code, hidden};
use crate::fixtures;

/// Sends a bearer token on every call of a raw gRPC client.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Raw = pb::registry_client::RegistryClient<InterceptedService<Channel, Bearer>>;

/// A raw gRPC client, for requests the client library would never send.
async fn raw(env: &Env, secret: Option<&str>) -> Raw {
    let channel = tonic::transport::Endpoint::from_shared(env.registry.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(secret.map(|s| format!("Bearer {s}").parse().unwrap()));
    pb::registry_client::RegistryClient::with_interceptor(channel, bearer)
}

/// The error text with the given digests replaced, to compare two refusals' shapes.
fn shape(e: &delta_client::Error, digests: &[Digest]) -> String {
    let mut s = e.to_string();
    for d in digests {
        s = s.replace(&d.to_string(), "<digest>");
    }
    s
}

/// One change to a manifest.
type Change = Box<dyn Fn(&mut Manifest)>;

// ---- 1. No blob crosses a namespace through a manifest or a job spec ----

async fn blobs_never_cross_namespaces(engine: Engine) {
    let env = Env::start_on(engine).await;
    let a = env
        .client(Some(&env.token("team-a", Scope::Write, false)))
        .await;
    let b = env
        .client(Some(&env.token("team-b", Scope::Write, false)))
        .await;
    let a_worker = env
        .client(Some(&env.token("team-a", Scope::Write, true)))
        .await;

    let dir = env.path("b-delta");
    fixtures::write_native_lora(&dir, 7, 2, json!({}));
    hub::push(&b, &dir, "team-b/private", "tiny", &[], &hidden())
        .await
        .unwrap();
    let theirs = b.resolve("team-b/private").await.unwrap().manifest;
    let blob = theirs.files[0].digest;
    let real_size = theirs.files[0].size;
    let nobody = Digest::of(b"bytes nobody uploaded");

    // The exact manifest, a wrong size and a wrong tensor list: each answered exactly as
    // the same manifest naming a digest nobody has, without the blob's size or tensors.
    let variants: Vec<(&str, Change)> = vec![
        ("exact", Box::new(|_| {})),
        ("size", Box::new(|m| m.files[0].size = 1)),
        ("tensors", Box::new(|m| m.files[0].tensors.truncate(1))),
    ];
    for (what, change) in &variants {
        let mut stolen = theirs.clone();
        change(&mut stolen);
        let mut absent = stolen.clone();
        absent.files[0].digest = nobody;
        let e_stolen = a
            .push_manifest("team-a/stolen", &stolen, &[])
            .await
            .unwrap_err();
        let e_absent = a
            .push_manifest("team-a/stolen", &absent, &[])
            .await
            .unwrap_err();
        assert_eq!(code(&e_stolen), code(&e_absent), "{what}");
        assert_eq!(
            shape(&e_stolen, &[blob, nobody]),
            shape(&e_absent, &[blob, nobody]),
            "{what}"
        );
        let text = e_stolen.to_string();
        assert!(text.contains("not uploaded"), "{what}: {text}");
        assert!(!text.contains(&real_size.to_string()), "{what}: {text}");
        assert!(!text.contains("lora_"), "{what}: {text}");
    }
    assert!(
        a.list_repositories("team-a").await.unwrap().is_empty(),
        "nothing was published"
    );

    // A job's datasets: another team's digest is as absent as nobody's.
    let spec = |d: Digest| env.train_spec(d);
    let e_stolen = a
        .submit_job(JobKind::Train, &spec(blob), "team-a/m", &[], &[])
        .await
        .unwrap_err();
    let e_absent = a
        .submit_job(JobKind::Train, &spec(nobody), "team-a/m", &[], &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e_stolen), Code::NotFound);
    assert_eq!(shape(&e_stolen, &[blob]), shape(&e_absent, &[nobody]));
    let data = env.path("train.jsonl");
    std::fs::write(&data, "{\"text\":\"a\",\"label\":0}\n").unwrap();
    let own = a.upload_blob_file(&data, &hidden()).await.unwrap();
    let e = a
        .submit_job(JobKind::Train, &spec(own), "team-a/m", &[], &[blob])
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::NotFound);

    // A worker publishing a trained delta: the same rule, at CompleteJob.
    let job = a
        .submit_job(JobKind::Train, &spec(own), "team-a/m", &[], &[])
        .await
        .unwrap();
    let (leased, lease) = a_worker
        .lease_job("w", &[JobKind::Train], 60)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leased.id, job.id);
    let mut absent = theirs.clone();
    absent.files[0].digest = nobody;
    let e_stolen = a_worker
        .complete_job(job.id, &lease, None, Some(&theirs), None)
        .await
        .unwrap_err();
    let e_absent = a_worker
        .complete_job(job.id, &lease, None, Some(&absent), None)
        .await
        .unwrap_err();
    assert_eq!(code(&e_stolen), code(&e_absent));
    assert_eq!(
        shape(&e_stolen, &[blob, nobody]),
        shape(&e_absent, &[blob, nobody])
    );
    assert!(a.list_repositories("team-a").await.unwrap().is_empty());

    // Once team a uploads the bytes itself, the same manifest is accepted.
    hub::push(&a, &dir, "team-a/own", "tiny", &[], &hidden())
        .await
        .unwrap();
    a.push_manifest("team-a/stolen", &theirs, &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn blobs_never_cross_namespaces_on_sqlite() {
    blobs_never_cross_namespaces(Engine::Sqlite).await;
}

#[tokio::test]
async fn blobs_never_cross_namespaces_on_postgres() {
    blobs_never_cross_namespaces(Engine::Postgres).await;
}

// ---- 2. Worker tokens are confined to their namespaces ----

async fn workers_stay_in_their_namespaces(engine: Engine) {
    let env = Env::start_on(engine).await;
    let a = env
        .client(Some(&env.token("team-a", Scope::Write, false)))
        .await;
    let b = env
        .client(Some(&env.token("team-b", Scope::Write, false)))
        .await;
    let a_worker = env
        .client(Some(&env.token("team-a", Scope::Write, true)))
        .await;
    let a_reader = env
        .client(Some(&env.token("team-a", Scope::Read, true)))
        .await;
    let any_worker = env.client(Some(&env.token("*", Scope::Write, true))).await;
    let kinds = [JobKind::Train, JobKind::Verify];

    let b_job = b
        .submit_job(
            JobKind::Train,
            &env.train_job(&b).await,
            "team-b/model",
            &["prod".into()],
            &[],
        )
        .await
        .unwrap();
    let a_job = a
        .submit_job(
            JobKind::Train,
            &env.train_job(&a).await,
            "team-a/model",
            &[],
            &[],
        )
        .await
        .unwrap();

    // Team a's worker sees only team a's job, though team b's is older.
    let (job, lease) = a_worker.lease_job("wa", &kinds, 60).await.unwrap().unwrap();
    assert_eq!(job.id, a_job.id);
    assert!(
        a_worker
            .lease_job("wa", &kinds, 60)
            .await
            .unwrap()
            .is_none()
    );

    // Every job RPC on team b's job answers as for a job that does not exist.
    let absent = b_job.id + a_job.id + 1000;
    for id in [b_job.id, absent] {
        let e = a_worker.get_job(id, 0).await.unwrap_err();
        assert_eq!(code(&e), Code::NotFound, "get {id}");
        let e = a_worker.renew_lease(id, &lease, 60).await.unwrap_err();
        assert_eq!(code(&e), Code::NotFound, "renew {id}");
        let e = a_worker
            .report_progress(id, &lease, "{}")
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::NotFound, "progress {id}");
        let e = a_worker
            .complete_job(id, &lease, Some("sabotage"), None, None)
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::NotFound, "complete {id}");
    }
    let e1 = a_worker.get_job(b_job.id, 0).await.unwrap_err().to_string();
    let e2 = a_worker.get_job(absent, 0).await.unwrap_err().to_string();
    assert_eq!(
        e1.replace(&b_job.id.to_string(), "N"),
        e2.replace(&absent.to_string(), "N")
    );
    // Users: a job is visible to its submitter and to tokens covering its namespace.
    assert_eq!(
        code(&a.get_job(b_job.id, 0).await.unwrap_err()),
        Code::NotFound
    );
    a.get_job(a_job.id, 0).await.unwrap();
    b.get_job(b_job.id, 0).await.unwrap();
    // Watching is reading: the same refusal, before any stream starts.
    let watched = |r: delta_client::Result<Option<_>>| match r {
        Ok(_) => panic!("another namespace's job was watched"),
        Err(e) => e.to_string(),
    };
    let w1 = watched(a.watch_job(b_job.id, 0).await.map(|s| s.map(|_| ())));
    let w2 = watched(a.watch_job(absent, 0).await.map(|s| s.map(|_| ())));
    assert_eq!(
        w1.replace(&b_job.id.to_string(), "N"),
        w2.replace(&absent.to_string(), "N")
    );
    assert!(w1.contains("not found"), "{w1}");
    {
        let mut own = std::pin::pin!(b.watch_job(b_job.id, 0).await.unwrap().unwrap());
        let (job, _) = futures::StreamExt::next(&mut own).await.unwrap().unwrap();
        assert_eq!(job.id, b_job.id);
    }

    // A read-scope worker is refused training jobs when it asks, before any training;
    // it may verify.
    let e = a_reader
        .lease_job("ro", &[JobKind::Train], 60)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied);
    assert!(e.to_string().contains("write"), "{e}");
    assert!(
        a_reader
            .lease_job("ro", &[JobKind::Verify], 60)
            .await
            .unwrap()
            .is_none()
    );

    // A worker for every namespace takes team b's job, untouched by team a's worker.
    let (job, b_lease) = any_worker
        .lease_job("w*", &kinds, 60)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.id, b_job.id);
    assert_eq!(job.state, delta_proto::jobs::JobState::Running);
    any_worker
        .renew_lease(b_job.id, &b_lease, 60)
        .await
        .unwrap();
    a_worker
        .complete_job(a_job.id, &lease, Some("done here"), None, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn workers_stay_in_their_namespaces_on_sqlite() {
    workers_stay_in_their_namespaces(Engine::Sqlite).await;
}

#[tokio::test]
async fn workers_stay_in_their_namespaces_on_postgres() {
    workers_stay_in_their_namespaces(Engine::Postgres).await;
}

// ---- 3. Base records cannot be forged or squatted ----

fn entry(name: &str, shape: &[u64], bytes: &[u8]) -> FingerprintEntry {
    FingerprintEntry {
        info: TensorInfo {
            name: name.into(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
        },
        digest: Digest::of(bytes),
    }
}

async fn bases_cannot_be_forged_or_squatted(engine: Engine) {
    let env = Env::start_on(engine).await;
    let a_secret = env.token("team-a", Scope::Write, false);
    let a = env.client(Some(&a_secret)).await;
    let b_secret = env.token("team-b", Scope::Write, false);
    let b = env.client(Some(&b_secret)).await;
    let anon = env.client(None).await;
    let tiny = delta_client::tensors::Model::open(&env.base)
        .unwrap()
        .entries();

    // A record whose fingerprint is not its table's is refused, whatever the name: the
    // real base's fingerprint with a wrong shape (the attack that broke other teams'
    // pushes), and a table whose digests are missing.
    let real_fp = fingerprint(&mut tiny.clone());
    let mut wrong = tiny.clone();
    wrong[0].info.shape = vec![33, 32];
    let mut raw_a = raw(&env, Some(&a_secret)).await;
    let forged = raw_a
        .add_base(pb::AddBaseRequest {
            name: "team-a/forged".into(),
            fingerprint: real_fp.to_string(),
            tensors: wrong.iter().cloned().map(Into::into).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument, "{forged:?}");
    assert!(forged.message().contains("fingerprint"), "{forged:?}");
    let mut undigested: Vec<pb::TensorInfo> = tiny.iter().cloned().map(Into::into).collect();
    undigested[0].digest.clear();
    let e = raw_a
        .add_base(pb::AddBaseRequest {
            name: "team-a/forged".into(),
            fingerprint: real_fp.to_string(),
            tensors: undigested,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Team b's valid pushes on the real base still work.
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    hub::push(&b, &dir, "team-b/ok", "tiny", &[], &hidden())
        .await
        .unwrap();

    // Names: a team writes only its own; global names need admin on `*`.
    let mine = vec![entry("w", &[2, 2], b"a's weight")];
    assert!(a.add_base("team-a/enc", &mine).await.unwrap());
    let e = b.add_base("team-a/enc2", &mine).await.unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied);
    let e = a.add_base("minilm", &mine).await.unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied);
    assert!(e.to_string().contains("admin"), "{e}");
    // Team b can name its own base the same, without touching team a's.
    let theirs = vec![entry("w", &[2, 2], b"b's weight")];
    assert!(b.add_base("team-b/enc", &theirs).await.unwrap());
    assert_eq!(
        a.get_base("team-a/enc").await.unwrap().fingerprint,
        fingerprint(&mut mine.clone())
    );

    // Reads follow the repositories' rules: another team's base is as absent as none.
    let e1 = b.get_base("team-a/enc").await.unwrap_err().to_string();
    let e2 = b.get_base("team-a/none").await.unwrap_err().to_string();
    assert_eq!(e1.replace("enc", "X"), e2.replace("none", "X"));
    let names = |bases: Vec<delta_client::remote::BaseRecord>| {
        let mut n: Vec<String> = bases.into_iter().map(|b| b.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(a.list_bases().await.unwrap()), ["team-a/enc", "tiny"]);
    assert_eq!(names(b.list_bases().await.unwrap()), ["team-b/enc", "tiny"]);
    // Without a token: nothing private, and a global name asks for one.
    assert!(anon.list_bases().await.unwrap().is_empty());
    assert_eq!(
        code(&anon.get_base("tiny").await.unwrap_err()),
        Code::Unauthenticated
    );
    env.with_meta(|m| m.set_public("team-a", true).unwrap());
    assert_eq!(names(anon.list_bases().await.unwrap()), ["team-a/enc"]);
}

#[tokio::test]
async fn bases_cannot_be_forged_or_squatted_on_sqlite() {
    bases_cannot_be_forged_or_squatted(Engine::Sqlite).await;
}

#[tokio::test]
async fn bases_cannot_be_forged_or_squatted_on_postgres() {
    bases_cannot_be_forged_or_squatted(Engine::Postgres).await;
}

/// A training job names its base; a worker that lacks it leaves the job for one that has
/// it, and a job on a base nobody registered (or this caller cannot read) is refused at
/// submission, not failed by the first worker.
#[tokio::test]
async fn jobs_wait_for_a_worker_holding_their_base() {
    let env = Env::start().await;
    let tiny = delta_client::tensors::Model::open(&env.base)
        .unwrap()
        .fingerprint();
    let other = Digest::of(b"a base this worker holds");
    let spec = env.train_job(&env.remote).await;
    let on_base = |base: &str| {
        let mut s = spec.clone();
        s["base"] = json!(base);
        s
    };
    let job = env
        .remote
        .submit_job(JobKind::Train, &spec, "team/m", &[], &[])
        .await
        .unwrap();
    let kinds = [JobKind::Train];
    assert!(
        env.remote
            .lease_job_on("elsewhere", &kinds, &[other], 60, 0)
            .await
            .unwrap()
            .is_none(),
        "a worker without the base leaves the job"
    );
    let (got, lease) = env
        .remote
        .lease_job_on("here", &kinds, &[other, tiny], 60, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, job.id);
    // What it publishes must be on the job's base.
    let dir = env.path("d");
    crate::fixtures::write_native_lora(&dir, 1, 2, json!({}));
    hub::push(&env.remote, &dir, "team/other", "tiny", &[], &hidden())
        .await
        .unwrap();
    let mut manifest = env.remote.resolve("team/other").await.unwrap().manifest;
    manifest.base.fingerprint = other;
    let e = env
        .remote
        .complete_job(job.id, &lease, None, Some(&manifest), None)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument);
    assert!(e.to_string().contains("trains on base"), "{e}");

    let e = env
        .remote
        .submit_job(
            JobKind::Train,
            &on_base(&other.to_string()),
            "team/m",
            &[],
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::NotFound);
    let e = env
        .remote
        .submit_job(JobKind::Train, &on_base("minilm"), "team/m", &[], &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument);
}

/// An idle worker's lease call waits at the registry (long poll) and gets a job submitted
/// meanwhile, instead of asking again and again; with nothing submitted it answers empty
/// when its wait is over.
#[tokio::test]
async fn an_idle_worker_waits_for_the_next_job() {
    let env = Env::start().await;
    let spec = env.train_job(&env.remote).await;
    let kinds = [JobKind::Train];
    let start = std::time::Instant::now();
    assert!(
        env.remote
            .lease_job_on("idle", &kinds, &[], 60, 1)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(900),
        "it waited"
    );

    let waiting = {
        let remote = env.remote.clone();
        tokio::spawn(async move { remote.lease_job_on("w", &kinds, &[], 60, 30).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let job = env
        .remote
        .submit_job(JobKind::Train, &spec, "team/m", &[], &[])
        .await
        .unwrap();
    let (got, _) = waiting
        .await
        .unwrap()
        .unwrap()
        .expect("the waiting call got the job");
    assert_eq!(got.id, job.id);
}
