//! Metadata: bases, manifests, repositories, versions, tags and the blob index.
//!
//! [`MetaStore`] is the trait the service talks to; [`SqliteMeta`] is the embedded
//! implementation (WAL, `synchronous=FULL`, foreign keys, `BEGIN IMMEDIATE` for every
//! write). Its methods are blocking: the service calls them inside `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use delta_proto::Digest;
use delta_proto::manifest::{Manifest, TensorInfo};
use delta_proto::reference::{LATEST, Reference, Repository, Selector};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, Result};

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_auth.sql"),
    include_str!("../migrations/0003_lifecycle.sql"),
    include_str!("../migrations/0004_jobs.sql"),
];

/// `versions.yanked` values.
const LIVE: i64 = 0;
const YANKED: i64 = 1;
const DELETED: i64 = 2;

/// A stored token (never the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// Id.
    pub id: i64,
    /// Namespace or `*`.
    pub namespace: String,
    /// `read`, `write` or `admin`.
    pub scope: String,
    /// `user` or `worker`.
    pub kind: String,
    /// Free text.
    pub description: String,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Expiry, if any.
    pub expires_at: Option<i64>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// One audit-log row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// When.
    pub at: i64,
    /// Which token (`None`: open registry).
    pub token: Option<i64>,
    /// What (`push`, `tag`, `upload`, `add-base`, ...).
    pub action: String,
    /// On what (repository, tag, blob).
    pub target: String,
    /// The digest involved, if any.
    pub digest: String,
}

/// A registered base model.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseRecord {
    /// Registered name.
    pub name: String,
    /// Fingerprint of its weights.
    pub fingerprint: Digest,
    /// Its tensor table.
    pub tensors: Vec<TensorInfo>,
    /// Seconds since the epoch.
    pub created_at: i64,
}

/// A resolved reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The repository.
    pub repository: Repository,
    /// The version number.
    pub version: u64,
    /// The manifest digest.
    pub digest: Digest,
    /// The canonical manifest bytes.
    pub manifest: Vec<u8>,
    /// Tags pointing at the version.
    pub tags: Vec<String>,
    /// When the version was pushed.
    pub created_at: i64,
}

/// One row of a repository listing.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoSummary {
    /// The repository.
    pub repository: Repository,
    /// Newest version.
    pub latest_version: u64,
    /// Its manifest digest.
    pub latest_digest: Digest,
    /// Its base.
    pub base_fingerprint: Digest,
    /// Its method.
    pub method: String,
    /// Number of versions.
    pub versions: u64,
    /// When the newest version was pushed.
    pub updated_at: i64,
}

/// One version of a repository.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    /// Version number.
    pub version: u64,
    /// Manifest digest.
    pub digest: Digest,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// Total size of its files.
    pub size: u64,
    /// When it was pushed.
    pub created_at: i64,
}

/// A delta in a search result.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaRow {
    /// Repository.
    pub repository: Repository,
    /// Version.
    pub version: u64,
    /// Manifest digest.
    pub digest: Digest,
    /// Base fingerprint.
    pub base_fingerprint: Digest,
    /// Method.
    pub method: String,
    /// Total size.
    pub size: u64,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Search filters; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    /// Namespace.
    pub namespace: Option<String>,
    /// Base fingerprint.
    pub base: Option<Digest>,
    /// Method.
    pub method: Option<String>,
    /// Annotations that must all match.
    pub annotations: BTreeMap<String, String>,
}

/// The outcome of a manifest push.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// The version the manifest is at.
    pub version: u64,
    /// False when it already was the latest version (idempotent re-push).
    pub created: bool,
}

/// The metadata operations the registry needs. Implementations must make every write
/// atomic and must refuse to record anything that names a blob without a row.
pub trait MetaStore: crate::jobs::JobStore + Send + Sync + std::fmt::Debug {
    /// Records a durable blob, or refreshes its `last_referenced` time.
    fn insert_blob(&self, digest: &Digest, size: u64, now: i64) -> Result<()>;
    /// Sizes of the given blobs that have rows.
    fn blob_sizes(&self, digests: &[Digest]) -> Result<HashMap<Digest, u64>>;
    /// Registers a base. `Ok(false)` if the identical record exists; an error if the name is
    /// taken by another fingerprint.
    fn add_base(&self, base: &BaseRecord) -> Result<bool>;
    /// A base by name or fingerprint.
    fn get_base(&self, name_or_fingerprint: &str) -> Result<Option<BaseRecord>>;
    /// Every base.
    fn list_bases(&self) -> Result<Vec<BaseRecord>>;
    /// Records a validated manifest as the next version of `repo` and moves `tags` and
    /// `latest` to it. Re-pushing the latest version's manifest is a no-op that still
    /// applies the tags.
    fn push_manifest(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        body: &[u8],
        tags: &[String],
        now: i64,
    ) -> Result<Pushed>;
    /// Resolves a reference.
    fn resolve(&self, reference: &Reference) -> Result<Option<Resolved>>;
    /// Repositories, optionally in one namespace.
    fn list_repositories(&self, namespace: Option<&str>) -> Result<Vec<RepoSummary>>;
    /// Versions of a repository, newest first. `None` if the repository does not exist.
    fn list_versions(&self, repo: &Repository) -> Result<Option<Vec<VersionRow>>>;
    /// Deltas matching a filter (every version).
    fn search(&self, filter: &SearchFilter) -> Result<Vec<DeltaRow>>;
    /// Points `tag` at `version`; with `expected`, only if the tag is there now (0: absent).
    /// Returns the previous version (0: none).
    fn set_tag(
        &self,
        repo: &Repository,
        tag: &str,
        version: u64,
        expected: Option<u64>,
        now: i64,
    ) -> Result<u64>;

    /// How many tokens exist (revoked ones included: once tokens exist, the registry is closed).
    fn token_count(&self) -> Result<u64>;
    /// Stores a token hash. Returns its id.
    fn create_token(&self, hash: &str, record: &TokenRecord) -> Result<i64>;
    /// A token by the hash of its secret.
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    /// Every token.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token. `false` if no such token.
    fn revoke_token(&self, id: i64, now: i64) -> Result<bool>;
    /// Whether anyone may read `namespace`.
    fn is_public(&self, namespace: &str) -> Result<bool>;
    /// Marks a namespace public-read, or private again.
    fn set_public(&self, namespace: &str, public: bool) -> Result<()>;
    /// Links a stored blob to a namespace (the uploader's).
    fn link_blob(&self, digest: &Digest, namespace: &str) -> Result<()>;
    /// Whether a blob is visible from `namespace` (or from a public namespace).
    fn blob_visible(&self, digest: &Digest, namespace: &str) -> Result<bool>;
    /// Appends to the audit log.
    fn audit(&self, entry: &AuditEntry) -> Result<()>;
    /// The audit log, oldest first.
    fn list_audit(&self) -> Result<Vec<AuditEntry>>;

    /// Yanks (or un-yanks) a version: still pullable by version or digest, hidden from
    /// listings, and `latest` moves to the newest version that is not yanked.
    fn yank(&self, repo: &Repository, version: u64, yanked: bool) -> Result<()>;
    /// Deletes a version: unresolvable from now on, its tags removed, its number never
    /// reused; its blobs become garbage unless other versions use them.
    fn delete_version(&self, repo: &Repository, version: u64, now: i64) -> Result<()>;
    /// Deletes a tag. `false` if it did not exist.
    fn delete_tag(&self, repo: &Repository, tag: &str) -> Result<bool>;
    /// Blobs no live version references and nobody referenced since `cutoff`. Unless
    /// `dry_run`, their rows are removed in the same transaction (the caller then deletes
    /// the bytes).
    fn collect_garbage(&self, cutoff: i64, dry_run: bool) -> Result<Vec<(Digest, u64)>>;
    /// Every blob row: digest, size, whether marked corrupt.
    fn all_blobs(&self) -> Result<Vec<(Digest, u64, bool)>>;
    /// Marks a blob corrupt (after quarantining its bytes).
    fn mark_corrupt(&self, digest: &Digest) -> Result<()>;
}

/// The embedded SQLite metadata store.
#[derive(Debug)]
pub struct SqliteMeta {
    conn: Mutex<Connection>,
}

impl SqliteMeta {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Connection::open(path)?)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // journal_mode returns a row, so it is a query, not an execute.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // A poisoned lock means a panic mid-call; SQLite rolled back the transaction, so
        // the connection itself is still consistent.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// `PRAGMA` values, for tests that assert the durability settings.
    pub fn pragma(&self, name: &str) -> Result<String> {
        self.with(|c| {
            Ok(c.query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })?)
        })
        .map(|v| match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(t) => t,
            other => format!("{other:?}"),
        })
    }
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_repo(ns: String, name: String) -> rusqlite::Result<Repository> {
    Repository::new(&ns, &name).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn repo_id(tx: &Connection, repo: &Repository) -> Result<Option<i64>> {
    Ok(tx
        .prepare_cached("SELECT id FROM repositories WHERE namespace = ?1 AND name = ?2")?
        .query_row(params![repo.namespace(), repo.name()], |r| r.get(0))
        .optional()?)
}

fn tags_of(conn: &Connection, repo: i64, version: u64) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT tag FROM tags WHERE repository = ?1 AND version = ?2 ORDER BY tag",
    )?;
    let tags = stmt
        .query_map(params![repo, version as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(tags)
}

fn base_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn base_record(
    (name, fp, tensors, created_at): (String, String, String, i64),
) -> Result<BaseRecord> {
    let tensors: Vec<TensorInfo> = serde_json::from_str(&tensors).map_err(|e| {
        Error::FailedPrecondition(format!("base {name}: corrupt tensor table: {e}"))
    })?;
    Ok(BaseRecord {
        name,
        fingerprint: fp.parse()?,
        tensors,
        created_at,
    })
}

impl MetaStore for SqliteMeta {
    fn insert_blob(&self, digest: &Digest, size: u64, now: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO blobs (digest, size, created_at, last_referenced) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO UPDATE SET last_referenced = excluded.last_referenced, corrupt = 0",
                params![digest.to_string(), size as i64, now],
            )?;
            Ok(())
        })
    }

    fn blob_sizes(&self, digests: &[Digest]) -> Result<HashMap<Digest, u64>> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT size FROM blobs WHERE digest = ?1 AND corrupt = 0")?;
            let mut out = HashMap::new();
            for d in digests {
                if let Some(size) = stmt
                    .query_row([d.to_string()], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    out.insert(*d, size as u64);
                }
            }
            Ok(out)
        })
    }

    fn add_base(&self, base: &BaseRecord) -> Result<bool> {
        let tensors = serde_json::to_string(&base.tensors)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<String> =
                tx.query_row("SELECT fingerprint FROM bases WHERE name = ?1", [&base.name], |r| r.get(0)).optional()?;
            match existing {
                Some(fp) if fp == base.fingerprint.to_string() => Ok(false),
                Some(fp) => Err(Error::AlreadyExists(format!(
                    "base {} is already registered with fingerprint {fp}, not {}",
                    base.name, base.fingerprint
                ))),
                None => {
                    tx.execute(
                        "INSERT INTO bases (name, fingerprint, tensors, created_at) VALUES (?1, ?2, ?3, ?4)",
                        params![base.name, base.fingerprint.to_string(), tensors, base.created_at],
                    )?;
                    tx.commit()?;
                    Ok(true)
                }
            }
        })
    }

    fn get_base(&self, key: &str) -> Result<Option<BaseRecord>> {
        let row = self.with(|c| {
            Ok(c.query_row(
                "SELECT name, fingerprint, tensors, created_at FROM bases WHERE name = ?1 OR fingerprint = ?1
                 ORDER BY created_at LIMIT 1",
                [key],
                base_from_row,
            )
            .optional()?)
        })?;
        row.map(base_record).transpose()
    }

    fn list_bases(&self) -> Result<Vec<BaseRecord>> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, fingerprint, tensors, created_at FROM bases ORDER BY name",
            )?;
            let rows = stmt
                .query_map([], base_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(base_record).collect()
    }

    fn push_manifest(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        body: &[u8],
        tags: &[String],
        now: i64,
    ) -> Result<Pushed> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let pushed = push_in(&tx, repo, manifest, body, tags, now)?;
            tx.commit()?;
            Ok(pushed)
        })
    }

    fn resolve(&self, reference: &Reference) -> Result<Option<Resolved>> {
        self.with(|c| {
            let Some(id) = repo_id(c, &reference.repository)? else { return Ok(None) };
            let select = "SELECT v.version, v.manifest, m.body, v.created_at FROM versions v
                          JOIN manifests m ON m.digest = v.manifest WHERE v.repository = ?1 AND v.yanked < 2";
            let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, String, Vec<u8>, i64)> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            };
            let found = match &reference.selector {
                Selector::Version(v) => c
                    .prepare_cached(&format!("{select} AND v.version = ?2"))?
                    .query_row(params![id, *v as i64], row)
                    .optional()?,
                Selector::Digest(d) => c
                    .prepare_cached(&format!("{select} AND v.manifest = ?2 ORDER BY v.version DESC LIMIT 1"))?
                    .query_row(params![id, d.to_string()], row)
                    .optional()?,
                Selector::Tag(t) => c
                    .prepare_cached(&format!(
                        "{select} AND v.version = (SELECT version FROM tags WHERE repository = ?1 AND tag = ?2)"
                    ))?
                    .query_row(params![id, t], row)
                    .optional()?,
            };
            let Some((version, digest, manifest, created_at)) = found else { return Ok(None) };
            let tags = tags_of(c, id, version as u64)?;
            Ok(Some(Resolved {
                repository: reference.repository.clone(),
                version: version as u64,
                digest: digest.parse()?,
                manifest,
                tags,
                created_at,
            }))
        })
    }

    fn list_repositories(&self, namespace: Option<&str>) -> Result<Vec<RepoSummary>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT r.namespace, r.name, v.version, v.manifest, m.base_fingerprint, m.method, v.created_at,
                        (SELECT COUNT(*) FROM versions WHERE repository = r.id AND yanked = 0)
                 FROM repositories r
                 JOIN versions v ON v.repository = r.id
                   AND v.version = (SELECT MAX(version) FROM versions WHERE repository = r.id AND yanked = 0)
                 JOIN manifests m ON m.digest = v.manifest
                 WHERE ?1 IS NULL OR r.namespace = ?1
                 ORDER BY r.namespace, r.name",
            )?;
            let rows = stmt
                .query_map([namespace], |r| {
                    Ok(RepoSummary {
                        repository: parse_repo(r.get(0)?, r.get(1)?)?,
                        latest_version: r.get::<_, i64>(2)? as u64,
                        latest_digest: parse_digest(r.get(3)?)?,
                        base_fingerprint: parse_digest(r.get(4)?)?,
                        method: r.get(5)?,
                        updated_at: r.get(6)?,
                        versions: r.get::<_, i64>(7)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn list_versions(&self, repo: &Repository) -> Result<Option<Vec<VersionRow>>> {
        self.with(|c| {
            let Some(id) = repo_id(c, repo)? else { return Ok(None) };
            let mut stmt = c.prepare(
                "SELECT v.version, v.manifest, m.size, v.created_at FROM versions v
                 JOIN manifests m ON m.digest = v.manifest WHERE v.repository = ?1 AND v.yanked = 0 ORDER BY v.version DESC",
            )?;
            let rows: Vec<(i64, String, i64, i64)> = stmt
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for (version, digest, size, created_at) in rows {
                out.push(VersionRow {
                    version: version as u64,
                    digest: digest.parse()?,
                    tags: tags_of(c, id, version as u64)?,
                    size: size as u64,
                    created_at,
                });
            }
            Ok(Some(out))
        })
    }

    fn search(&self, filter: &SearchFilter) -> Result<Vec<DeltaRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT r.namespace, r.name, v.version, m.digest, m.base_fingerprint, m.method, m.size
                 FROM versions v JOIN repositories r ON r.id = v.repository JOIN manifests m ON m.digest = v.manifest
                 WHERE v.yanked = 0 AND (?1 IS NULL OR r.namespace = ?1) AND (?2 IS NULL OR m.base_fingerprint = ?2)
                   AND (?3 IS NULL OR m.method = ?3)
                 ORDER BY r.namespace, r.name, v.version",
            )?;
            let base = filter.base.map(|d| d.to_string());
            let rows: Vec<DeltaRow> = stmt
                .query_map(params![filter.namespace, base, filter.method], |r| {
                    Ok(DeltaRow {
                        repository: parse_repo(r.get(0)?, r.get(1)?)?,
                        version: r.get::<_, i64>(2)? as u64,
                        digest: parse_digest(r.get(3)?)?,
                        base_fingerprint: parse_digest(r.get(4)?)?,
                        method: r.get(5)?,
                        size: r.get::<_, i64>(6)? as u64,
                        annotations: BTreeMap::new(),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut ann = c.prepare_cached("SELECT key, value FROM annotations WHERE manifest = ?1")?;
            let mut out = Vec::new();
            for mut row in rows {
                row.annotations = ann
                    .query_map([row.digest.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                if filter.annotations.iter().all(|(k, v)| row.annotations.get(k) == Some(v)) {
                    out.push(row);
                }
            }
            Ok(out)
        })
    }

    fn set_tag(
        &self,
        repo: &Repository,
        tag: &str,
        version: u64,
        expected: Option<u64>,
        now: i64,
    ) -> Result<u64> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = repo_id(&tx, repo)?.ok_or_else(|| Error::NotFound { what: "repository", name: repo.to_string() })?;
            let current: u64 = tx
                .query_row("SELECT version FROM tags WHERE repository = ?1 AND tag = ?2", params![id, tag], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .map_or(0, |v| v as u64);
            if let Some(expected) = expected
                && expected != current
            {
                return Err(Error::FailedPrecondition(format!(
                    "tag {repo}:{tag} points at {}, not the expected {}",
                    version_name(current),
                    version_name(expected)
                )));
            }
            tx.execute(
                "INSERT INTO tags (repository, tag, version, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repository, tag) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                params![id, tag, version as i64, now],
            )?;
            tx.commit()?;
            Ok(current)
        })
    }

    fn token_count(&self) -> Result<u64> {
        self.with(|c| {
            Ok(c.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    fn create_token(&self, hash: &str, t: &TokenRecord) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, namespace, scope, kind, description, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![hash, t.namespace, t.scope, t.kind, t.description, t.created_at, t.expires_at],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("{TOKEN_COLUMNS} WHERE hash = ?1"),
                [hash],
                token_row,
            )
            .optional()?)
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("{TOKEN_COLUMNS} ORDER BY id"))?;
            let rows = stmt
                .query_map([], token_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn revoke_token(&self, id: i64, now: i64) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )? > 0
                || c.query_row("SELECT 1 FROM tokens WHERE id = ?1", [id], |_| Ok(()))
                    .optional()?
                    .is_some())
        })
    }

    fn is_public(&self, namespace: &str) -> Result<bool> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT 1 FROM public_namespaces WHERE namespace = ?1",
                [namespace],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
    }

    fn set_public(&self, namespace: &str, public: bool) -> Result<()> {
        self.with(|c| {
            if public {
                c.execute(
                    "INSERT INTO public_namespaces (namespace) VALUES (?1) ON CONFLICT DO NOTHING",
                    [namespace],
                )?;
            } else {
                c.execute(
                    "DELETE FROM public_namespaces WHERE namespace = ?1",
                    [namespace],
                )?;
            }
            Ok(())
        })
    }

    fn link_blob(&self, digest: &Digest, namespace: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO blob_links (blob, namespace) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![digest.to_string(), namespace],
            )?;
            Ok(())
        })
    }

    fn blob_visible(&self, digest: &Digest, namespace: &str) -> Result<bool> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT 1 FROM blob_links WHERE blob = ?1
                   AND (namespace = ?2 OR namespace IN (SELECT namespace FROM public_namespaces)) LIMIT 1",
                params![digest.to_string(), namespace],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
    }

    fn audit(&self, e: &AuditEntry) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at, token, action, target, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.at, e.token, e.action, e.target, e.digest],
            )?;
            Ok(())
        })
    }

    fn list_audit(&self) -> Result<Vec<AuditEntry>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT at, token, action, target, digest FROM audit ORDER BY id")?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(AuditEntry {
                        at: r.get(0)?,
                        token: r.get(1)?,
                        action: r.get(2)?,
                        target: r.get(3)?,
                        digest: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn yank(&self, repo: &Repository, version: u64, yanked: bool) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = existing_version(&tx, repo, version)?;
            let state = if yanked { YANKED } else { LIVE };
            tx.execute(
                "UPDATE versions SET yanked = ?3 WHERE repository = ?1 AND version = ?2",
                params![id, version as i64, state],
            )?;
            refresh_latest(&tx, id)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_version(&self, repo: &Repository, version: u64, now: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = existing_version(&tx, repo, version)?;
            tx.execute("DELETE FROM tags WHERE repository = ?1 AND version = ?2", params![id, version as i64])?;
            tx.execute("UPDATE versions SET yanked = ?3 WHERE repository = ?1 AND version = ?2", params![id, version as i64, DELETED])?;
            // Its blobs start their grace period now.
            tx.execute(
                "UPDATE blobs SET last_referenced = ?3 WHERE digest IN
                   (SELECT mb.blob FROM manifest_blobs mb JOIN versions v ON v.manifest = mb.manifest
                    WHERE v.repository = ?1 AND v.version = ?2)",
                params![id, version as i64, now],
            )?;
            refresh_latest(&tx, id)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_tag(&self, repo: &Repository, tag: &str) -> Result<bool> {
        self.with(|c| {
            let Some(id) = repo_id(c, repo)? else {
                return Ok(false);
            };
            Ok(c.execute(
                "DELETE FROM tags WHERE repository = ?1 AND tag = ?2",
                params![id, tag],
            )? > 0)
        })
    }

    fn collect_garbage(&self, cutoff: i64, dry_run: bool) -> Result<Vec<(Digest, u64)>> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows: Vec<(String, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT b.digest, b.size FROM blobs b WHERE b.last_referenced < ?1 AND NOT EXISTS (
                       SELECT 1 FROM manifest_blobs mb JOIN versions v ON v.manifest = mb.manifest
                       WHERE mb.blob = b.digest AND v.yanked < 2)
                     ORDER BY b.digest",
                )?;
                stmt.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
            };
            if !dry_run {
                for (d, _) in &rows {
                    tx.execute("DELETE FROM manifest_blobs WHERE blob = ?1", [d])?;
                    tx.execute("DELETE FROM blob_links WHERE blob = ?1", [d])?;
                    tx.execute("DELETE FROM blobs WHERE digest = ?1", [d])?;
                }
                tx.commit()?;
            }
            rows.into_iter().map(|(d, n)| Ok((d.parse()?, n as u64))).collect()
        })
    }

    fn all_blobs(&self) -> Result<Vec<(Digest, u64, bool)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT digest, size, corrupt FROM blobs ORDER BY digest")?;
            let rows: Vec<(String, i64, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(d, n, k)| Ok((d.parse()?, n as u64, k != 0)))
                .collect()
        })
    }

    fn mark_corrupt(&self, digest: &Digest) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE blobs SET corrupt = 1 WHERE digest = ?1",
                [digest.to_string()],
            )?;
            Ok(())
        })
    }
}

/// The repository id, after checking the version exists (and is not deleted).
fn existing_version(tx: &Connection, repo: &Repository, version: u64) -> Result<i64> {
    let not_found = || Error::NotFound {
        what: "version",
        name: format!("{repo}:v{version}"),
    };
    let id = repo_id(tx, repo)?.ok_or_else(not_found)?;
    tx.query_row(
        "SELECT 1 FROM versions WHERE repository = ?1 AND version = ?2 AND yanked < 2",
        params![id, version as i64],
        |_| Ok(()),
    )
    .optional()?
    .ok_or_else(not_found)?;
    Ok(id)
}

/// Points `latest` at the newest version that is neither yanked nor deleted (or removes it).
fn refresh_latest(tx: &Connection, repo: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM tags WHERE repository = ?1 AND tag = 'latest'",
        [repo],
    )?;
    tx.execute(
        "INSERT INTO tags (repository, tag, version, updated_at)
         SELECT ?1, 'latest', MAX(version), strftime('%s','now') FROM versions WHERE repository = ?1 AND yanked = 0
         HAVING MAX(version) IS NOT NULL",
        [repo],
    )?;
    Ok(())
}

const TOKEN_COLUMNS: &str = "SELECT id, namespace, scope, kind, description, created_at, expires_at, revoked_at FROM tokens";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        namespace: r.get(1)?,
        scope: r.get(2)?,
        kind: r.get(3)?,
        description: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
        revoked_at: r.get(7)?,
    })
}

fn version_name(v: u64) -> String {
    if v == 0 {
        "nothing".to_owned()
    } else {
        format!("v{v}")
    }
}

#[cfg(test)]
mod tests;

/// Publishes a manifest inside an open write transaction: the version (a new number, or
/// the latest one when the same manifest is pushed again), `latest` and `tags`.
pub(crate) fn push_in(
    tx: &rusqlite::Transaction<'_>,
    repo: &Repository,
    manifest: &Manifest,
    body: &[u8],
    tags: &[String],
    now: i64,
) -> Result<Pushed> {
    let digest = Digest::of(body).to_string();
    tx.execute(
        "INSERT INTO manifests (digest, body, base_fingerprint, method, size, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (digest) DO NOTHING",
        params![
            digest,
            body,
            manifest.base.fingerprint.to_string(),
            manifest.method,
            manifest.size() as i64,
            now
        ],
    )?;
    for f in &manifest.files {
        let blob = f.digest.to_string();
        let n = tx.execute(
            "UPDATE blobs SET last_referenced = ?2 WHERE digest = ?1 AND corrupt = 0",
            params![blob, now],
        )?;
        if n == 0 {
            return Err(Error::FailedPrecondition(format!(
                "blob {blob} ({}) is not stored",
                f.path
            )));
        }
        tx.execute(
            "INSERT INTO manifest_blobs (manifest, blob) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![digest, blob],
        )?;
        tx.execute(
            "INSERT INTO blob_links (blob, namespace) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![blob, repo.namespace()],
        )?;
    }
    for (k, v) in &manifest.annotations {
        tx.execute(
                "INSERT INTO annotations (manifest, key, value) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![digest, k, v],
            )?;
    }
    tx.execute(
            "INSERT INTO repositories (namespace, name, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![repo.namespace(), repo.name(), now],
        )?;
    let id = repo_id(tx, repo)?.ok_or_else(|| Error::NotFound {
        what: "repository",
        name: repo.to_string(),
    })?;
    // Version numbers are never reused, even after a delete.
    let highest: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM versions WHERE repository = ?1",
        [id],
        |r| r.get(0),
    )?;
    let latest: Option<(i64, String)> = tx
            .query_row(
                "SELECT version, manifest FROM versions WHERE repository = ?1 AND yanked = 0 ORDER BY version DESC LIMIT 1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
    let (version, created) = match latest {
        Some((v, d)) if d == digest => (v, false),
        _ => (highest + 1, true),
    };
    if created {
        tx.execute(
                "INSERT INTO versions (repository, version, manifest, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, version, digest, now],
            )?;
    }
    for tag in tags.iter().map(String::as_str).chain([LATEST]) {
        tx.execute(
                "INSERT INTO tags (repository, tag, version, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repository, tag) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                params![id, tag, version, now],
            )?;
    }
    Ok(Pushed {
        version: version as u64,
        created,
    })
}
