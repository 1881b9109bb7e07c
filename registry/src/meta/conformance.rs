//! MetaStore conformance: each behaviour once, for every engine. The registry's unit tests
//! run it on SQLite (in memory and on a file); `delta-tests` runs it on PostgreSQL.
//! Test support: it panics on the first difference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use delta_proto::Digest;
use delta_proto::jobs::{JobKind, JobState};
use delta_proto::manifest::{
    BaseRef, FileEntry, Manifest, MethodConfig, SCHEMA_VERSION, TensorInfo,
};
use delta_proto::reference::Repository;

use crate::error::{Error, Result};
use crate::meta::jobs::{Completion, MAX_ATTEMPTS, WorkerScope};
use crate::meta::{Actor, BaseRecord, MetaStore, Pushed, SearchFilter, TokenRecord};

/// A change at `t`, by no token.
fn at(t: i64) -> Actor {
    Actor::local(t)
}

/// A proven base record: its fingerprint is recomputed from its tensors' digests.
fn base() -> BaseRecord {
    let info = TensorInfo {
        name: "w".into(),
        dtype: "F32".into(),
        shape: vec![2, 2],
    };
    let digest = Digest::of(b"tiny-weights");
    let fingerprint =
        delta_proto::fingerprint::fingerprint(&mut [delta_proto::fingerprint::FingerprintEntry {
            info: info.clone(),
            digest,
        }]);
    BaseRecord {
        name: "tiny".into(),
        fingerprint,
        tensors: vec![info],
        digests: vec![digest],
        created_at: 1,
    }
}

fn manifest(blob: Digest, note: &str) -> Manifest {
    Manifest {
        schema_version: SCHEMA_VERSION,
        method: "diff".into(),
        config: MethodConfig::default(),
        base: BaseRef {
            fingerprint: base().fingerprint,
            name: None,
        },
        files: vec![FileEntry {
            path: "delta.safetensors".into(),
            digest: blob,
            size: 10,
            tensors: vec![TensorInfo {
                name: "w.diff".into(),
                dtype: "F32".into(),
                shape: vec![2, 2],
            }],
        }],
        parents: vec![],
        provenance: BTreeMap::new(),
        annotations: [
            ("task".to_owned(), note.to_owned()),
            ("tier".to_owned(), "gold".to_owned()),
        ]
        .into(),
    }
}

fn push(m: &dyn MetaStore, repo: &Repository, man: &Manifest, tags: &[&str]) -> Result<Pushed> {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    m.push_manifest(repo, man, &man.canonical_json(), &tags, &at(5))
}

/// Bases, pushes, versions, tags (with compare-and-swap), resolve and search.
pub fn versions_tags_and_search(m: &dyn MetaStore) {
    assert!(m.add_base(&base(), &at(1)).unwrap());
    assert!(!m.add_base(&base(), &at(1)).unwrap());
    let mut other = base();
    other.fingerprint = Digest::of(b"other");
    assert!(matches!(
        m.add_base(&other, &at(1)),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(m.find_bases("tiny").unwrap(), vec![base()]);
    assert_eq!(
        m.find_bases(&base().fingerprint.to_string()).unwrap()[0].name,
        "tiny"
    );
    assert!(m.find_bases("nothing").unwrap().is_empty());
    // A record from before proofs (no digests) is listed after proven ones, and a proven
    // registration of the same name and fingerprint upgrades it.
    let legacy = BaseRecord {
        name: "legacy".into(),
        tensors: vec![],
        digests: vec![],
        created_at: 0,
        ..base()
    };
    assert!(m.add_base(&legacy, &at(1)).unwrap());
    let by_fp = m.find_bases(&base().fingerprint.to_string()).unwrap();
    assert_eq!(
        by_fp.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["tiny", "legacy"],
        "proven first, though older"
    );
    assert!(!by_fp[1].proven());
    let proven = BaseRecord {
        name: "legacy".into(),
        ..base()
    };
    assert!(!m.add_base(&proven, &at(1)).unwrap());
    let upgraded = &m.find_bases("legacy").unwrap()[0];
    assert!(upgraded.proven());
    assert_eq!(upgraded.tensors, base().tensors);
    assert_eq!(upgraded.created_at, 0, "still the original registration");

    let blob = Digest::of(b"blob");
    let repo: Repository = "team/sst2".parse().unwrap();
    // A manifest naming a blob without a row is refused, and nothing is recorded.
    assert!(matches!(
        push(m, &repo, &manifest(blob, "a"), &[]),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(m.list_repositories(None, "*").unwrap().is_empty());
    // Refused writes leave no audit row: the base registrations that stood are there,
    // the conflicting one and the refused push are not.
    let actions = |m: &dyn MetaStore| -> Vec<String> {
        m.list_audit()
            .unwrap()
            .into_iter()
            .map(|e| format!("{} {}", e.action, e.target))
            .collect()
    };
    assert_eq!(
        actions(m),
        [
            "add-base tiny",
            "add-base tiny",
            "add-base legacy",
            "add-base legacy"
        ]
    );

    m.store_blob(&blob, 10, None, &at(2)).unwrap();
    assert_eq!(
        push(m, &repo, &manifest(blob, "a"), &["prod"]).unwrap(),
        Pushed {
            version: 1,
            created: true
        }
    );
    assert_eq!(
        push(m, &repo, &manifest(blob, "a"), &[]).unwrap(),
        Pushed {
            version: 1,
            created: false
        }
    );
    assert_eq!(
        push(m, &repo, &manifest(blob, "b"), &[]).unwrap(),
        Pushed {
            version: 2,
            created: true
        }
    );

    let latest = m.resolve(&"team/sst2".parse().unwrap()).unwrap().unwrap();
    assert_eq!(latest.version, 2);
    assert_eq!(latest.tags, vec!["latest"]);
    let prod = m
        .resolve(&"team/sst2:prod".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(prod.version, 1);
    let by_digest = m
        .resolve(
            &format!("team/sst2@{}", manifest(blob, "b").digest())
                .parse()
                .unwrap(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(by_digest.version, 2);
    assert!(
        m.resolve(&"team/sst2:v9".parse().unwrap())
            .unwrap()
            .is_none()
    );

    // Compare-and-swap on tags.
    assert_eq!(m.set_tag(&repo, "prod", 2, Some(1), &at(6)).unwrap(), 1);
    assert!(matches!(
        m.set_tag(&repo, "prod", 1, Some(1), &at(7)),
        Err(Error::FailedPrecondition(_))
    ));
    assert_eq!(m.set_tag(&repo, "new", 1, Some(0), &at(7)).unwrap(), 0);
    assert!(matches!(
        m.set_tag(&repo, "gone", 9, None, &at(8)),
        Err(Error::NotFound { .. })
    ));
    let log = actions(m);
    assert_eq!(
        log[log.len() - 3..],
        [
            "push team/sst2:v2",
            "tag team/sst2:prod -> v2",
            "tag team/sst2:new -> v1"
        ]
    );

    let versions = m.list_versions(&repo).unwrap().unwrap();
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(versions[0].tags, vec!["latest", "prod"]);
    assert_eq!(versions[1].tags, vec!["new"]);

    let all = m
        .search(&SearchFilter {
            base: Some(base().fingerprint),
            ..SearchFilter::default()
        })
        .unwrap();
    assert_eq!(all.len(), 2);
    let b = m
        .search(&SearchFilter {
            annotations: [("task".into(), "b".into())].into(),
            ..SearchFilter::default()
        })
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0].annotations.len(),
        2,
        "every annotation of a match comes back"
    );
    // Every named annotation must match, key and value.
    let found_with = |pairs: &[(&str, &str)]| {
        let filter = SearchFilter {
            annotations: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..SearchFilter::default()
        };
        m.search(&filter).unwrap().len()
    };
    assert_eq!(found_with(&[("task", "b"), ("tier", "gold")]), 1);
    assert_eq!(found_with(&[("tier", "gold")]), 2);
    assert_eq!(found_with(&[("task", "b"), ("tier", "silver")]), 0);
    assert_eq!(
        found_with(&[("task", "gold")]),
        0,
        "a value under another key"
    );
    assert_eq!(found_with(&[("absent", "b")]), 0);
    assert!(
        m.search(&SearchFilter {
            method: Some("lora".into()),
            ..SearchFilter::default()
        })
        .unwrap()
        .is_empty()
    );
    assert_eq!(
        m.list_repositories(Some("team"), "*").unwrap()[0].versions,
        2
    );
    assert!(m.list_repositories(Some("other"), "*").unwrap().is_empty());
    // What a viewer may read: its own namespace and the public ones.
    let listed = |viewer: &str| m.list_repositories(None, viewer).unwrap().len();
    let found = |viewer: &str| {
        let filter = SearchFilter {
            viewer: Some(viewer.to_owned()),
            ..SearchFilter::default()
        };
        m.search(&filter).unwrap().len()
    };
    assert_eq!((listed("team"), listed("other"), listed("")), (1, 0, 0));
    assert_eq!(
        (found("*"), found("team"), found("other"), found("")),
        (2, 2, 0, 0)
    );
    m.set_public("team", true).unwrap();
    assert_eq!((listed("team"), listed("other"), listed("")), (1, 1, 1));
    assert_eq!((found("other"), found("")), (2, 2));
    assert!(m.list_repositories(Some("team"), "other").unwrap().len() == 1);
    m.set_public("team", false).unwrap();
    assert_eq!((listed("other"), listed("")), (0, 0));
    assert_eq!((found("other"), found("")), (0, 0));
    assert!(
        m.list_repositories(Some("team"), "other")
            .unwrap()
            .is_empty()
    );
}

/// Opens another handle on the same database: another connection, as another replica or
/// process would have.
pub type Open<'a> = &'a (dyn Fn() -> Arc<dyn MetaStore> + Sync);

fn repo(s: &str) -> Repository {
    s.parse().unwrap()
}

fn stored_blob(m: &dyn MetaStore, name: &str) -> Digest {
    let blob = Digest::of(name.as_bytes());
    m.store_blob(&blob, 10, None, &at(2)).unwrap();
    blob
}

/// Yank, delete (numbers never reused), `latest`, garbage collection, corrupt marks.
pub fn lifecycle(m: &dyn MetaStore) {
    m.add_base(&base(), &at(1)).unwrap();
    let (kept, dropped) = (stored_blob(m, "kept"), stored_blob(m, "dropped"));
    let r = repo("team/life");
    // Who pushed: what the push's audit row says (written with the push).
    let first = manifest(kept, "1");
    let by_7 = Actor {
        token: Some(7),
        at: 5,
    };
    m.push_manifest(&r, &first, &first.canonical_json(), &[], &by_7)
        .unwrap();
    push(m, &r, &manifest(dropped, "2"), &["prod"]).unwrap();
    let by: Vec<Option<String>> = m
        .list_versions(&r)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|v| v.pushed_by)
        .collect();
    assert_eq!(
        by,
        [Some("open registry".into()), Some("token 7".into())],
        "newest first"
    );

    assert_eq!(
        m.yank(&r, 2, true, &at(60)).unwrap(),
        ["prod"],
        "yanking says which tags still point at the version"
    );
    let latest = m.resolve(&"team/life".parse().unwrap()).unwrap().unwrap();
    assert_eq!(latest.version, 1, "latest skips a yanked version");
    assert!(!latest.yanked);
    let prod = m
        .resolve(&"team/life:prod".parse().unwrap())
        .unwrap()
        .unwrap();
    assert!(
        prod.yanked,
        "a tag on a yanked version resolves, and says so"
    );
    assert_eq!(m.list_versions(&r).unwrap().unwrap().len(), 1);
    // Every version yanked: the repository is listed as such, not dropped.
    assert_eq!(m.yank(&r, 1, true, &at(60)).unwrap(), Vec::<String>::new());
    let listed = m.list_repositories(Some("team"), "*").unwrap();
    let life = listed
        .iter()
        .find(|x| x.repository == r)
        .expect("an all-yanked repository is still listed");
    assert!(life.yanked);
    assert_eq!((life.latest_version, life.versions), (2, 2));
    assert!(m.resolve(&"team/life".parse().unwrap()).unwrap().is_none());
    assert_eq!(
        m.all_yanked(&r).unwrap(),
        Some((2, 2)),
        "how many, the newest"
    );
    assert_eq!(m.yank(&r, 1, false, &at(60)).unwrap(), ["latest"]);
    assert_eq!(m.all_yanked(&r).unwrap(), None, "a live version again");
    assert_eq!(m.all_yanked(&"team/none".parse().unwrap()).unwrap(), None);
    assert!(!m.list_repositories(Some("team"), "*").unwrap()[0].yanked);
    m.yank(&r, 2, false, &at(60)).unwrap();
    assert_eq!(
        m.resolve(&"team/life".parse().unwrap())
            .unwrap()
            .unwrap()
            .version,
        2
    );

    m.delete_version(&r, 2, &at(100)).unwrap();
    assert!(
        m.resolve(&"team/life:v2".parse().unwrap())
            .unwrap()
            .is_none()
    );
    assert!(
        m.resolve(&"team/life:prod".parse().unwrap())
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        m.delete_version(&r, 2, &at(100)),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        push(m, &r, &manifest(kept, "3"), &[]).unwrap().version,
        3,
        "a deleted version's number is not reused"
    );
    // What each blob's loss would break: live and yanked versions, not deleted ones.
    assert_eq!(
        m.blob_users(&kept).unwrap(),
        ["team/life:v1", "team/life:v3"]
    );
    assert!(m.blob_users(&dropped).unwrap().is_empty());
    for v in [1, 3] {
        m.yank(&r, v, true, &at(100)).unwrap();
    }
    assert_eq!(
        m.all_yanked(&r).unwrap(),
        Some((2, 3)),
        "a deleted version is not counted"
    );
    for v in [1, 3] {
        m.yank(&r, v, false, &at(100)).unwrap();
    }
    assert!(m.delete_tag(&r, "latest", &at(100)).unwrap());
    assert!(!m.delete_tag(&r, "nope", &at(100)).unwrap());

    // The deleted version's blob is garbage once its grace period ends.
    assert!(m.collect_garbage(100, false, &at(120)).unwrap().is_empty());
    let dry = m.collect_garbage(101, true, &at(120)).unwrap();
    assert_eq!(dry, vec![(dropped, 10)]);
    assert_eq!(m.collect_garbage(101, false, &at(120)).unwrap(), dry);
    assert!(m.blob_sizes(&[dropped]).unwrap().is_empty());
    assert_eq!(m.blob_sizes(&[kept]).unwrap()[&kept], 10);

    m.mark_corrupt(&kept).unwrap();
    assert_eq!(m.all_blobs().unwrap(), vec![(kept, 10, true)]);
    assert!(m.blob_sizes(&[kept]).unwrap().is_empty());
    m.store_blob(&kept, 10, None, &at(200)).unwrap();
    assert_eq!(m.all_blobs().unwrap(), vec![(kept, 10, false)]);
}

/// Tokens, public namespaces, blob visibility and the audit log.
pub fn access(m: &dyn MetaStore) {
    assert_eq!(m.token_count().unwrap(), 0);
    let record = TokenRecord {
        id: 0,
        namespace: "team".into(),
        scope: delta_proto::tokens::Scope::Write,
        kind: delta_proto::tokens::TokenKind::User,
        description: "ci".into(),
        created_at: 1,
        expires_at: Some(99),
        revoked_at: None,
    };
    let id = m.create_token("hash-a", &record).unwrap();
    let found = m.find_token("hash-a").unwrap().unwrap();
    assert_eq!(
        found,
        TokenRecord {
            id,
            ..record.clone()
        }
    );
    assert!(m.find_token("hash-b").unwrap().is_none());
    assert!(m.revoke_token(id, 5).unwrap());
    assert!(!m.revoke_token(id + 100, 5).unwrap());
    assert_eq!(m.list_tokens().unwrap()[0].revoked_at, Some(5));
    assert_eq!(m.token_count().unwrap(), 1);

    let blob = stored_blob(m, "shared");
    let absent = Digest::of(b"nobody stored this");
    let visible = |viewer: &str| -> Vec<Digest> {
        let mut found: Vec<Digest> = m
            .visible_blobs(&[blob, absent], viewer)
            .unwrap()
            .into_keys()
            .collect();
        found.sort_by_key(ToString::to_string);
        found
    };
    assert!(visible("team").is_empty());
    assert_eq!(visible("*"), vec![blob], "`*` sees every stored blob");
    m.store_blob(&blob, 10, Some("team"), &at(3)).unwrap();
    m.store_blob(&blob, 10, Some("team"), &at(3)).unwrap();
    assert_eq!(visible("team"), vec![blob]);
    assert!(visible("other").is_empty());
    assert!(
        visible("").is_empty(),
        "anonymous callers see public blobs only"
    );
    assert!(!m.is_public("team").unwrap());
    m.set_public("team", true).unwrap();
    m.set_public("team", true).unwrap();
    assert!(m.is_public("team").unwrap());
    assert_eq!(visible("other"), vec![blob]);
    assert_eq!(visible(""), vec![blob]);
    m.set_public("team", false).unwrap();
    assert!(visible("other").is_empty());
    // Many digests at once (more than one statement's worth), and the quarantine mark.
    let many: Vec<Digest> = (0..1200u32)
        .map(|i| Digest::of(&i.to_le_bytes()))
        .chain([blob])
        .collect();
    let found = m.visible_blobs(&many, "team").unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[&blob].size, 10);
    assert!(!found[&blob].corrupt);
    m.mark_corrupt(&blob).unwrap();
    assert!(m.visible_blobs(&[blob], "team").unwrap()[&blob].corrupt);
    m.store_blob(&blob, 10, None, &at(3)).unwrap();
    assert!(!m.visible_blobs(&[blob], "team").unwrap()[&blob].corrupt);

    // Each change wrote its row with it: the administrator's (no token) for tokens,
    // namespaces and the quarantine; uploads naming the token that made them.
    let by_token = Actor {
        token: Some(id),
        at: 4,
    };
    m.store_blob(&blob, 10, Some("team"), &by_token).unwrap();
    let log = m.list_audit().unwrap();
    let admin: Vec<String> = log
        .iter()
        .filter(|e| e.action != "upload")
        .map(|e| format!("{} {}", e.action, e.target))
        .collect();
    assert_eq!(
        admin,
        [
            format!("token-create token {id}: user write on team"),
            format!("token-revoke token {id}"),
            "namespace-public team".into(),
            "namespace-private team".into(),
            format!("quarantine {blob}"),
        ],
        "a second revocation or an unchanged namespace writes nothing"
    );
    assert!(
        log.iter()
            .all(|e| e.action == "upload" || e.token.is_none())
    );
    let uploads: Vec<_> = log.iter().filter(|e| e.action == "upload").collect();
    assert!(
        uploads
            .iter()
            .all(|e| e.target == blob.to_string() && e.digest == blob.to_string())
    );
    assert_eq!(
        uploads.iter().map(|e| e.at).collect::<Vec<_>>(),
        [2, 3, 3, 3, 4]
    );
    assert_eq!(
        uploads.iter().map(|e| e.token).collect::<Vec<_>>(),
        [None, None, None, None, Some(id)]
    );
}

/// The job queue: leases, renewals, refusals of lost leases, progress, completion that
/// publishes, reports, and failure after [`MAX_ATTEMPTS`] lost leases.
pub fn jobs(m: &dyn MetaStore) {
    let all = WorkerScope::all();
    m.add_base(&base(), &at(1)).unwrap();
    let blob = stored_blob(m, "trained");
    let tags = vec!["nightly".to_owned()];
    let train = m
        .submit_job(
            JobKind::Train,
            "{}",
            "team/jobs",
            "team",
            "",
            &tags,
            &Actor {
                token: Some(7),
                at: 10,
            },
        )
        .unwrap();
    assert_eq!((train.state, train.submitter), (JobState::Queued, Some(7)));
    let verify = m
        .submit_job(
            JobKind::Verify,
            "{}",
            "team/jobs:v1",
            "team",
            "",
            &[],
            &Actor {
                token: None,
                at: 11,
            },
        )
        .unwrap();
    assert!(verify.id > train.id);

    // Kinds filter; oldest first.
    let got = m
        .lease_job("w1", &[JobKind::Verify], &[], &all, "L1", 20, 80)
        .unwrap()
        .unwrap();
    assert_eq!(got.id, verify.id);
    let got = m
        .lease_job("w2", &[], &[], &all, "L2", 20, 80)
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.id, got.attempts, got.worker.as_str()),
        (train.id, 1, "w2")
    );
    assert!(
        m.lease_job("w3", &[], &[], &all, "L3", 20, 80)
            .unwrap()
            .is_none()
    );

    assert!(matches!(
        m.renew_lease(train.id, "wrong", &all, 21, 90),
        Err(Error::FailedPrecondition(_))
    ));
    m.renew_lease(train.id, "L2", &all, 21, 90).unwrap();
    m.report_progress(train.id, "L2", &all, r#"{"step":1}"#, 22)
        .unwrap();
    m.report_progress(train.id, "L2", &all, r#"{"step":2}"#, 23)
        .unwrap();
    let events = m.job_events(train.id, 0).unwrap();
    assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(m.job_events(train.id, 1).unwrap()[0].2, r#"{"step":2}"#);

    let (states, leases) = m.job_counts(30).unwrap();
    assert_eq!((states.get("running"), leases), (Some(&2), 2));

    let man = manifest(blob, "trained");
    let body = man.canonical_json();
    let done = m
        .complete_job(
            train.id,
            "L2",
            &all,
            &Completion::Trained {
                manifest: &man,
                body: &body,
            },
            &at(30),
        )
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    let pushed = m
        .resolve(&"team/jobs:nightly".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(pushed.version, 1);
    // A job's publication is audited as the completion (by the worker), not as a push.
    let versions = m.list_versions(&repo("team/jobs")).unwrap().unwrap();
    assert_eq!(versions[0].pushed_by, None);
    let last = m.list_audit().unwrap().pop().unwrap();
    assert_eq!(
        (last.action.as_str(), last.target.as_str(), last.digest),
        ("complete-job", "team/jobs", train.id.to_string())
    );
    assert!(
        m.complete_job(train.id, "L2", &all, &Completion::Failed("late"), &at(31))
            .is_err(),
        "a finished job takes no second completion"
    );

    let digest = pushed.digest.to_string();
    m.complete_job(
        verify.id,
        "L1",
        &all,
        &Completion::Verified {
            manifest: &digest,
            report: r#"{"accuracy":1.0}"#,
        },
        &at(32),
    )
    .unwrap();
    let reports = m.list_reports(&digest).unwrap();
    assert_eq!((reports.len(), reports[0].job), (1, verify.id));

    // A job whose workers keep vanishing fails after MAX_ATTEMPTS leases.
    let flaky = m
        .submit_job(
            JobKind::Train,
            "{}",
            "team/flaky",
            "team",
            "",
            &[],
            &Actor {
                token: None,
                at: 40,
            },
        )
        .unwrap();
    let mut t = 40;
    for attempt in 1..=MAX_ATTEMPTS {
        let got = m
            .lease_job("w", &[], &[], &all, &format!("F{attempt}"), t, t + 5)
            .unwrap()
            .unwrap();
        assert_eq!((got.id, got.attempts), (flaky.id, attempt));
        // The lease runs out: its holder is refused from then on.
        t += 10;
        assert!(
            m.renew_lease(flaky.id, &format!("F{attempt}"), &all, t, t + 5)
                .is_err()
        );
    }
    assert!(
        m.lease_job("w", &[], &[], &all, "F-last", t, t + 5)
            .unwrap()
            .is_none()
    );
    let failed = m.get_job(flaky.id).unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.error.contains("lost its worker"), "{}", failed.error);

    // Workers are confined to their namespace; read-scope workers get verify jobs only.
    let t = 100;
    let b_train = m
        .submit_job(
            JobKind::Train,
            "{}",
            "team-b/x",
            "team-b",
            "",
            &[],
            &Actor { token: None, at: t },
        )
        .unwrap();
    let b_verify = m
        .submit_job(
            JobKind::Verify,
            "{}",
            "team-b/x:v1",
            "team-b",
            "",
            &[],
            &Actor { token: None, at: t },
        )
        .unwrap();
    assert_eq!(b_train.namespace, "team-b");
    let scope = |ns: &str, train: bool| WorkerScope {
        namespace: ns.into(),
        train,
    };
    assert!(
        m.lease_job("a", &[], &[], &scope("team-a", true), "A1", t, t + 50)
            .unwrap()
            .is_none(),
        "team-a's worker sees no team-b job"
    );
    let got = m
        .lease_job("b-read", &[], &[], &scope("team-b", false), "B1", t, t + 50)
        .unwrap()
        .unwrap();
    assert_eq!(got.id, b_verify.id, "a read-scope worker only verifies");
    assert!(
        m.lease_job("b-read", &[], &[], &scope("team-b", false), "B2", t, t + 50)
            .unwrap()
            .is_none()
    );
    // Another namespace's job is as absent as a missing one, lease or not.
    let a = scope("team-a", true);
    for call in [
        m.renew_lease(b_verify.id, "B1", &a, t, t + 50),
        m.report_progress(b_verify.id, "B1", &a, "{}", t),
        m.complete_job(b_verify.id, "B1", &a, &Completion::Failed("x"), &at(t))
            .map(|_| ()),
    ] {
        assert!(matches!(call, Err(Error::NotFound { .. })), "{call:?}");
    }
    let got = m
        .lease_job("b", &[], &[], &scope("*", true), "B3", t, t + 50)
        .unwrap()
        .unwrap();
    assert_eq!(got.id, b_train.id);
    m.complete_job(
        b_verify.id,
        "B1",
        &scope("team-b", false),
        &Completion::Failed("x"),
        &at(t),
    )
    .unwrap();

    // A job on a base waits for a worker that holds that base; one naming no base goes
    // to any worker.
    let t = 200;
    let (fp_x, fp_y) = ("blake3:x".to_owned(), "blake3:y".to_owned());
    let on_x = m
        .submit_job(
            JobKind::Train,
            "{}",
            "team-c/b1",
            "team-c",
            &fp_x,
            &[],
            &Actor { token: None, at: t },
        )
        .unwrap();
    let anywhere = m
        .submit_job(
            JobKind::Train,
            "{}",
            "team-c/b2",
            "team-c",
            "",
            &[],
            &Actor { token: None, at: t },
        )
        .unwrap();
    let all = scope("team-c", true);
    let got = m
        .lease_job(
            "y-only",
            &[],
            std::slice::from_ref(&fp_y),
            &all,
            "Y1",
            t,
            t + 50,
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        got.id, anywhere.id,
        "the job on x is left for a worker with x"
    );
    assert!(
        m.lease_job("y-only", &[], &[fp_y], &all, "Y2", t, t + 50)
            .unwrap()
            .is_none()
    );
    let got = m
        .lease_job("x-too", &[], &[fp_x], &all, "X1", t, t + 50)
        .unwrap()
        .unwrap();
    assert_eq!(got.id, on_x.id);
}

/// Pushes to one repository through separate handles never share a version number, and
/// compare-and-swap tag moves never lose an update.
pub fn concurrent_writers(open: Open<'_>) {
    let m = open();
    m.add_base(&base(), &at(1)).unwrap();
    let blob = stored_blob(m.as_ref(), "race");
    let r = repo("team/race");
    let versions: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let r = &r;
                s.spawn(move || {
                    let m = open();
                    (0..3)
                        .map(|k| {
                            push(m.as_ref(), r, &manifest(blob, &format!("{i}-{k}")), &[])
                                .unwrap()
                                .version
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (1..=24).collect::<Vec<_>>(),
        "version numbers: {versions:?}"
    );

    // Four writers move `counter` one version up at a time, each move conditional on the
    // version it read: 20 moves from v1 must end at v21, each starting version used once.
    m.set_tag(&r, "counter", 1, None, &at(1)).unwrap();
    let moved_from: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let r = &r;
                s.spawn(move || {
                    let m = open();
                    let mut from = Vec::new();
                    while from.len() < 5 {
                        let now = m
                            .resolve(&format!("{r}:counter").parse().unwrap())
                            .unwrap()
                            .unwrap()
                            .version;
                        match m.set_tag(r, "counter", now + 1, Some(now), &at(2)) {
                            Ok(prev) => from.push(prev),
                            Err(Error::FailedPrecondition(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    from
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut sorted = moved_from;
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=20).collect::<Vec<_>>());
    let end = m
        .resolve(&"team/race:counter".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(end.version, 21);
}

/// Workers leasing through separate handles never get the same job.
pub fn racing_leases(open: Open<'_>) {
    let m = open();
    let jobs: Vec<u64> = (0..24)
        .map(|i| {
            m.submit_job(
                JobKind::Train,
                "{}",
                &format!("team/j{i}"),
                "team",
                "",
                &[],
                &Actor { token: None, at: 1 },
            )
            .unwrap()
            .id
        })
        .collect();
    let leased: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || {
                    let m = open();
                    let mut got = Vec::new();
                    while let Some(job) = m
                        .lease_job(
                            &format!("w{w}"),
                            &[],
                            &[],
                            &WorkerScope::all(),
                            &format!("lease-{w}-{}", got.len()),
                            2,
                            1000,
                        )
                        .unwrap()
                    {
                        got.push(job.id);
                    }
                    got
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut sorted = leased;
    sorted.sort_unstable();
    assert_eq!(sorted, jobs, "every job leased exactly once");
}

/// Every check, each on a fresh database from `fresh`.
pub fn all(fresh: &dyn Fn() -> Box<dyn Fn() -> Arc<dyn MetaStore> + Sync>) {
    versions_tags_and_search(fresh()().as_ref());
    lifecycle(fresh()().as_ref());
    access(fresh()().as_ref());
    jobs(fresh()().as_ref());
    concurrent_writers(fresh().as_ref());
    racing_leases(fresh().as_ref());
}

#[cfg(test)]
mod sqlite {
    #[test]
    fn conformance_on_sqlite_files() {
        let dirs = std::sync::Mutex::new(Vec::new());
        super::all(&|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("registry.sqlite");
            dirs.lock().unwrap().push(dir);
            Box::new(move || {
                std::sync::Arc::new(crate::meta::SqlMeta::open(&path).unwrap())
                    as std::sync::Arc<dyn crate::meta::MetaStore>
            })
        });
    }
}
