//! MetaStore conformance: each behaviour once, run on `:memory:` and on a file.

use delta_proto::manifest::{BaseRef, FileEntry, MethodConfig, SCHEMA_VERSION};

use super::*;

fn base() -> BaseRecord {
    BaseRecord {
        name: "tiny".into(),
        fingerprint: Digest::of(b"tiny-weights"),
        tensors: vec![TensorInfo {
            name: "w".into(),
            dtype: "F32".into(),
            shape: vec![2, 2],
        }],
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
        annotations: [("task".to_owned(), note.to_owned())].into(),
    }
}

fn push(m: &SqliteMeta, repo: &Repository, man: &Manifest, tags: &[&str]) -> Result<Pushed> {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    m.push_manifest(repo, man, &man.canonical_json(), &tags, 5)
}

fn check_versions_tags_and_search(m: &SqliteMeta) {
    assert!(m.add_base(&base()).unwrap());
    assert!(!m.add_base(&base()).unwrap());
    let mut other = base();
    other.fingerprint = Digest::of(b"other");
    assert!(matches!(m.add_base(&other), Err(Error::AlreadyExists(_))));
    assert_eq!(
        m.get_base("tiny").unwrap().unwrap().fingerprint,
        base().fingerprint
    );
    assert_eq!(
        m.get_base(&base().fingerprint.to_string())
            .unwrap()
            .unwrap()
            .name,
        "tiny"
    );

    let blob = Digest::of(b"blob");
    let repo: Repository = "team/sst2".parse().unwrap();
    // A manifest naming a blob without a row is refused, and nothing is recorded.
    assert!(matches!(
        push(m, &repo, &manifest(blob, "a"), &[]),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(m.list_repositories(None).unwrap().is_empty());

    m.insert_blob(&blob, 10, 2).unwrap();
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
    assert_eq!(m.set_tag(&repo, "prod", 2, Some(1), 6).unwrap(), 1);
    assert!(matches!(
        m.set_tag(&repo, "prod", 1, Some(1), 7),
        Err(Error::FailedPrecondition(_))
    ));
    assert_eq!(m.set_tag(&repo, "new", 1, Some(0), 7).unwrap(), 0);

    let versions = m.list_versions(&repo).unwrap().unwrap();
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(versions[0].tags, vec!["latest", "prod"]);

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
    assert!(
        m.search(&SearchFilter {
            method: Some("lora".into()),
            ..SearchFilter::default()
        })
        .unwrap()
        .is_empty()
    );
    assert_eq!(m.list_repositories(Some("team")).unwrap()[0].versions, 2);
    assert!(m.list_repositories(Some("other")).unwrap().is_empty());
}

#[test]
fn conformance_in_memory() {
    check_versions_tags_and_search(&SqliteMeta::in_memory().unwrap());
}

#[test]
fn conformance_on_file_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    check_versions_tags_and_search(&SqliteMeta::open(&path).unwrap());
    let reopened = SqliteMeta::open(&path).unwrap();
    assert_eq!(reopened.list_repositories(None).unwrap().len(), 1);
    assert_eq!(reopened.pragma("integrity_check").unwrap(), "ok");
}

#[test]
fn durability_pragmas_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let m = SqliteMeta::open(&dir.path().join("db.sqlite")).unwrap();
    assert_eq!(m.pragma("journal_mode").unwrap(), "wal");
    assert_eq!(m.pragma("synchronous").unwrap(), "2"); // FULL
    assert_eq!(m.pragma("foreign_keys").unwrap(), "1");
    assert_eq!(m.pragma("busy_timeout").unwrap(), "10000");
    assert_eq!(
        m.pragma("user_version").unwrap(),
        MIGRATIONS.len().to_string()
    );
}

#[test]
fn concurrent_pushes_never_duplicate_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let first = SqliteMeta::open(&path).unwrap();
    first.add_base(&base()).unwrap();
    let blob = Digest::of(b"blob");
    first.insert_blob(&blob, 10, 1).unwrap();
    let repo: Repository = "team/race".parse().unwrap();
    // Two connections, as two processes would have.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            let repo = repo.clone();
            std::thread::spawn(move || {
                let m = SqliteMeta::open(&path).unwrap();
                push(&m, &repo, &manifest(blob, &format!("n{i}")), &[])
                    .unwrap()
                    .version
            })
        })
        .collect();
    let mut versions: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
}
