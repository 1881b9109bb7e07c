//! Metadata: bases, manifests, repositories, versions, tags and the blob index.
//!
//! [`MetaStore`] is the trait the service talks to; [`SqlMeta`] implements it once, in SQL
//! both engines share ([`crate::sql`]): on SQLite (embedded: WAL, `synchronous=FULL`,
//! foreign keys, `BEGIN IMMEDIATE` for every write) or on PostgreSQL (shared by replicas:
//! row locks where a write decides something). Its methods are blocking: the service calls
//! them inside `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use delta_proto::Digest;
use delta_proto::manifest::{Manifest, TensorInfo};
use delta_proto::reference::{LATEST, Reference, Repository, Selector};
use delta_proto::tokens::{Scope, TokenKind};

pub use delta_proto::catalog::{BaseRecord, DeltaSummary, RepoSummary, Report, VersionInfo};

use crate::error::{Error, Result};
use crate::sql::{Db, Row, Sql, Value, p};

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
    /// What it may do.
    pub scope: Scope,
    /// A user's or a worker's.
    pub kind: TokenKind,
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

/// Who makes a change, and when. Every write that changes what callers see takes one and
/// records its audit row in the transaction that makes the change: the log never names a
/// change that did not happen, nor misses one that did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// The caller's token (`None`: an open registry, or an administrator on the data dir).
    pub token: Option<i64>,
    /// Unix seconds.
    pub at: i64,
}

impl Actor {
    /// An administrator working on the data dir (`delta-registry gc`, tests): no token.
    pub const fn local(at: i64) -> Self {
        Actor { token: None, at }
    }
}

/// Appends `who`'s audit row inside the open transaction of the change it describes.
pub(crate) fn audit_in(
    c: &mut dyn Sql,
    who: &Actor,
    action: &str,
    target: &str,
    digest: &str,
) -> Result<()> {
    c.exec(
        "INSERT INTO audit (at, token, action, target, digest) VALUES ($1, $2, $3, $4, $5)",
        p![who.at, who.token, action, target, digest],
    )?;
    Ok(())
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
    /// Yanked: reachable by tag, number or digest, but no longer `latest`.
    pub yanked: bool,
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
    /// Only namespaces this viewer may read (as in [`MetaStore::visible_blobs`]: `*`
    /// every one, a namespace itself and the public ones, `""` the public ones); `None`:
    /// every namespace.
    pub viewer: Option<String>,
}

/// A stored blob as its row describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlob {
    /// Size in bytes.
    pub size: u64,
    /// Quarantined by `fsck --repair`: its bytes were corrupt; a re-upload heals it.
    pub corrupt: bool,
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
pub trait MetaStore: jobs::JobStore + Send + Sync + std::fmt::Debug {
    /// How many calls it serves at once to good effect; the service runs no more database
    /// trips together than this, and the rest wait as async tasks.
    fn parallelism(&self) -> usize;
    /// Whether its reads are quick and never wait on a writer, so the service may run
    /// them on its async threads (see `sql::inline`) instead of the blocking pool.
    fn reads_inline(&self) -> bool;
    /// Records a durable blob (or refreshes its `last_referenced` time and lifts a
    /// quarantine) and links it to `namespace` (the uploader's; `None`: no namespace, as
    /// for `*` tokens): an `upload` audit row.
    fn store_blob(
        &self,
        digest: &Digest,
        size: u64,
        namespace: Option<&str>,
        who: &Actor,
    ) -> Result<()>;
    /// Sizes of the given blobs that have rows.
    fn blob_sizes(&self, digests: &[Digest]) -> Result<HashMap<Digest, u64>>;
    /// Registers a base. `Ok(false)` if the name already holds this fingerprint (a
    /// record without digests then gets the new record's proof); an error if the name
    /// holds another fingerprint.
    /// An `add-base` audit row.
    fn add_base(&self, base: &BaseRecord, who: &Actor) -> Result<bool>;
    /// The records of a name or fingerprint: proven ones first, then oldest first.
    fn find_bases(&self, name_or_fingerprint: &str) -> Result<Vec<BaseRecord>>;
    /// Every base.
    fn list_bases(&self) -> Result<Vec<BaseRecord>>;
    /// Records a validated manifest as the next version of `repo` and moves `tags` and
    /// `latest` to it. Re-pushing the latest version's manifest is a no-op that still
    /// applies the tags. A `push` audit row.
    fn push_manifest(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        body: &[u8],
        tags: &[String],
        who: &Actor,
    ) -> Result<Pushed>;
    /// Resolves a reference.
    fn resolve(&self, reference: &Reference) -> Result<Option<Resolved>>;
    /// Repositories, optionally in one namespace, of the namespaces `viewer` may read (as
    /// in [`MetaStore::visible_blobs`]: `*` every namespace, a namespace itself and the
    /// public ones, `""` the public ones): a listing costs what it returns, not what the
    /// registry holds. The service still checks each row it answers with.
    fn list_repositories(&self, namespace: Option<&str>, viewer: &str) -> Result<Vec<RepoSummary>>;
    /// Versions of a repository, newest first. `None` if the repository does not exist.
    fn list_versions(&self, repo: &Repository) -> Result<Option<Vec<VersionInfo>>>;
    /// For a repository whose versions are all yanked: how many, and the newest. `None`
    /// when it has a live version, or none at all. One indexed statement (it answers
    /// `latest` inline, on an async thread).
    fn all_yanked(&self, repo: &Repository) -> Result<Option<(u64, u64)>>;
    /// Deltas matching a filter (every version).
    fn search(&self, filter: &SearchFilter) -> Result<Vec<DeltaSummary>>;
    /// Points `tag` at `version`; with `expected`, only if the tag is there now (0: absent).
    /// Returns the previous version (0: none). The version must exist and not be deleted.
    /// A `tag` audit row.
    fn set_tag(
        &self,
        repo: &Repository,
        tag: &str,
        version: u64,
        expected: Option<u64>,
        who: &Actor,
    ) -> Result<u64>;

    /// How many tokens exist (revoked ones included: once tokens exist, the registry is closed).
    fn token_count(&self) -> Result<u64>;
    /// Stores a token hash (a `token-create` audit row, by the administrator on the data
    /// dir: no token). Returns its id.
    fn create_token(&self, hash: &str, record: &TokenRecord) -> Result<i64>;
    /// A token by the hash of its secret.
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    /// Every token.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token (a `token-revoke` audit row when it was live). `false` if no such
    /// token.
    fn revoke_token(&self, id: i64, now: i64) -> Result<bool>;
    /// Whether anyone may read `namespace`.
    fn is_public(&self, namespace: &str) -> Result<bool>;
    /// Marks a namespace public-read, or private again (a `namespace-public` or
    /// `namespace-private` audit row when it changes).
    fn set_public(&self, namespace: &str, public: bool) -> Result<()>;
    /// The blobs among `digests` that have a row *and* are visible to `viewer` (see
    /// [`crate::auth::Caller::blob_viewer`]: `*` sees every blob, a namespace sees the blobs
    /// linked to it or to a public namespace, `""` only those of public namespaces). One
    /// answer for "absent" and "someone else's", found in one statement per 500 digests.
    fn visible_blobs(
        &self,
        digests: &[Digest],
        viewer: &str,
    ) -> Result<HashMap<Digest, StoredBlob>>;
    /// The versions (`ns/name:vN`, yanked ones too) whose manifest names a blob: what a
    /// corrupt or missing blob breaks (`fsck`).
    fn blob_users(&self, digest: &Digest) -> Result<Vec<String>>;
    /// The audit log, oldest first.
    fn list_audit(&self) -> Result<Vec<AuditEntry>>;

    /// Yanks (or un-yanks) a version: still pullable by version or digest, hidden from
    /// listings, and `latest` moves to the newest version that is not yanked. Returns the
    /// tags that point at the version afterwards (`latest` included when it does). A
    /// `yank` or `unyank` audit row.
    fn yank(
        &self,
        repo: &Repository,
        version: u64,
        yanked: bool,
        who: &Actor,
    ) -> Result<Vec<String>>;
    /// Deletes a version: unresolvable from now on, its tags removed, its number never
    /// reused; its blobs become garbage unless other versions use them. A `delete` audit
    /// row.
    fn delete_version(&self, repo: &Repository, version: u64, who: &Actor) -> Result<()>;
    /// Deletes a tag. `false` if it did not exist; else an `untag` audit row.
    fn delete_tag(&self, repo: &Repository, tag: &str, who: &Actor) -> Result<bool>;
    /// Blobs no live version references and nobody referenced since `cutoff`. Unless
    /// `dry_run`, their rows are removed in the same transaction (the caller then deletes
    /// the bytes), with a `gc` audit row.
    fn collect_garbage(
        &self,
        cutoff: i64,
        dry_run: bool,
        who: &Actor,
    ) -> Result<Vec<(Digest, u64)>>;
    /// Every blob row: digest, size, whether marked corrupt.
    fn all_blobs(&self) -> Result<Vec<(Digest, u64, bool)>>;
    /// Marks a blob corrupt (after quarantining its bytes): a `quarantine` audit row.
    fn mark_corrupt(&self, digest: &Digest) -> Result<()>;
}

/// The metadata store, on SQLite or PostgreSQL.
#[derive(Debug)]
pub struct SqlMeta {
    pub(crate) db: Db,
}

/// Connections one registry process opens to PostgreSQL at most.
pub const POSTGRES_POOL: usize = 16;

impl SqlMeta {
    /// Opens (creating and migrating) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::sqlite(rusqlite::Connection::open(path)?)
    }

    /// An in-memory SQLite database, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::sqlite(rusqlite::Connection::open_in_memory()?)
    }

    fn sqlite(conn: rusqlite::Connection) -> Result<Self> {
        Ok(Self {
            db: crate::sql::open_sqlite(conn)?,
        })
    }

    /// Connects to PostgreSQL (`postgres://user:password@host:port/database`) and applies
    /// missing migrations. Blocking.
    pub fn connect_postgres(url: &str) -> Result<Self> {
        Ok(Self {
            db: Db::Postgres(Box::new(crate::sql::postgres::Pool::connect(
                url,
                POSTGRES_POOL,
            )?)),
        })
    }

    /// Opens the database `url` names: `postgres://...` (or `postgresql://...`), or a SQLite
    /// file (`sqlite://PATH` or a plain path). Blocking.
    pub fn open_url(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::connect_postgres(url)
        } else {
            Self::open(Path::new(url.strip_prefix("sqlite://").unwrap_or(url)))
        }
    }

    /// `PRAGMA` values (SQLite only), for tests that assert the durability settings: the
    /// value on every connection when they agree, else all of them (writer first).
    pub fn pragma(&self, name: &str) -> Result<String> {
        let Db::Sqlite(db) = &self.db else {
            return Err(Error::FailedPrecondition("PRAGMA is SQLite's".into()));
        };
        let mut values = db
            .each(|conn| {
                let row = crate::sql::SqliteSql(conn).one(&format!("PRAGMA {name}"), &[])?;
                Ok(match row.0.first() {
                    Some(crate::sql::Value::Int(i)) => i.to_string(),
                    Some(crate::sql::Value::Text(t)) => t.clone(),
                    other => format!("{other:?}"),
                })
            })
            .into_iter()
            .collect::<Result<Vec<String>>>()?;
        values.dedup();
        Ok(values.join(" / "))
    }
}

/// The repository's id. With `lock`, its row stays locked until the transaction ends:
/// every write that decides a version number or moves a tag takes this lock first.
fn repo_id(c: &mut dyn Sql, repo: &Repository, lock: bool) -> Result<Option<i64>> {
    let lock = if lock { c.engine().for_update() } else { "" };
    c.opt(
        &format!("SELECT id FROM repositories WHERE namespace = $1 AND name = $2{lock}"),
        p![repo.namespace(), repo.name()],
    )?
    .map(|r| r.int(0))
    .transpose()
}

fn tags_of(c: &mut dyn Sql, repo: i64, version: u64) -> Result<Vec<String>> {
    c.query(
        "SELECT tag FROM tags WHERE repository = $1 AND version = $2 ORDER BY tag",
        p![repo, version],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// SQL that holds when namespace `column` may be read by the viewer in `param` (a token's
/// namespace, or `""` for anonymous callers): its own namespace and the public ones. The
/// `*` viewer, who reads everything, is each query's own case.
fn readable(column: &str, param: &str) -> String {
    format!("({column} = {param} OR {column} IN (SELECT namespace FROM public_namespaces))")
}

const BASE_COLUMNS: &str = "SELECT name, fingerprint, tensors, created_at, digests FROM bases";

fn base_record(r: &Row) -> Result<BaseRecord> {
    let name = r.text(0)?;
    let corrupt =
        |e: serde_json::Error| Error::Database(format!("base {name}: corrupt tensor table: {e}"));
    let tensors: Vec<TensorInfo> = serde_json::from_str(&r.text(2)?).map_err(corrupt)?;
    let digests = match r.text(4)?.as_str() {
        "" => Vec::new(),
        json => serde_json::from_str(json).map_err(corrupt)?,
    };
    Ok(BaseRecord {
        fingerprint: r.digest(1)?,
        tensors,
        digests,
        created_at: r.int(3)?,
        name,
    })
}

impl MetaStore for SqlMeta {
    /// SQLite: two (measured when every call shared one connection: one call ran while the
    /// next waited on its thread, ready; one permit left the connection idle between
    /// calls, 13 200-13 500 resolves/s, two 18 900-19 100/s, three or more only lengthened
    /// the tail). Short reads no longer take a trip (see `reads_inline`). PostgreSQL: its
    /// pool.
    fn parallelism(&self) -> usize {
        match self.db {
            Db::Sqlite(_) => 2,
            Db::Postgres(_) => POSTGRES_POOL,
        }
    }

    /// A SQLite file: yes (see `sql::Sqlite`). In memory (one connection, which writes
    /// hold through their commits) and PostgreSQL (a trip over the network): no.
    fn reads_inline(&self) -> bool {
        self.db.reads_inline()
    }

    fn store_blob(
        &self,
        digest: &Digest,
        size: u64,
        namespace: Option<&str>,
        who: &Actor,
    ) -> Result<()> {
        self.db.write(|c| {
            c.exec(
                "INSERT INTO blobs (digest, size, created_at, last_referenced) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (digest) DO UPDATE SET last_referenced = excluded.last_referenced, corrupt = 0",
                p![digest, size, who.at],
            )?;
            if let Some(ns) = namespace {
                c.exec(
                    "INSERT INTO blob_links (blob, namespace) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    p![digest, ns],
                )?;
            }
            let d = digest.to_string();
            audit_in(c, who, "upload", &d, &d)
        })
    }

    fn blob_sizes(&self, digests: &[Digest]) -> Result<HashMap<Digest, u64>> {
        self.db.read(|c| {
            let mut out = HashMap::new();
            for d in digests {
                if let Some(r) = c.opt(
                    "SELECT size FROM blobs WHERE digest = $1 AND corrupt = 0",
                    p![d],
                )? {
                    out.insert(*d, r.uint(0)?);
                }
            }
            Ok(out)
        })
    }

    fn add_base(&self, base: &BaseRecord, who: &Actor) -> Result<bool> {
        let bad = |e: serde_json::Error| Error::InvalidArgument(e.to_string());
        let tensors = serde_json::to_string(&base.tensors).map_err(bad)?;
        let digests = if base.proven() {
            serde_json::to_string(&base.digests).map_err(bad)?
        } else {
            String::new()
        };
        let fingerprint = base.fingerprint.to_string();
        self.db.write(|c| {
            let added = c.exec(
                "INSERT INTO bases (name, fingerprint, tensors, created_at, digests) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO NOTHING",
                p![&base.name, &base.fingerprint, &tensors, base.created_at, &digests],
            )? > 0;
            audit_in(c, who, "add-base", &base.name, &fingerprint)?;
            if added {
                return Ok(true);
            }
            let lock = c.engine().for_update();
            let fp = c
                .one(
                    &format!("SELECT fingerprint FROM bases WHERE name = $1{lock}"),
                    p![&base.name],
                )?
                .text(0)?;
            if fp == fingerprint {
                // A record from before proofs existed gets this one's table and digests.
                if base.proven() {
                    c.exec(
                        "UPDATE bases SET tensors = $2, digests = $3 WHERE name = $1 AND digests = ''",
                        p![&base.name, &tensors, &digests],
                    )?;
                }
                Ok(false)
            } else {
                Err(Error::AlreadyExists(format!(
                    "base {} is already registered with fingerprint {fp}, not {}",
                    base.name, base.fingerprint
                )))
            }
        })
    }

    fn find_bases(&self, key: &str) -> Result<Vec<BaseRecord>> {
        self.db.read(|c| {
            c.query(
                &format!(
                    "{BASE_COLUMNS} WHERE name = $1 OR fingerprint = $1
                     ORDER BY CASE WHEN digests = '' THEN 1 ELSE 0 END, created_at, name"
                ),
                p![key],
            )?
            .iter()
            .map(base_record)
            .collect()
        })
    }

    fn list_bases(&self) -> Result<Vec<BaseRecord>> {
        self.db.read(|c| {
            c.query(&format!("{BASE_COLUMNS} ORDER BY name"), &[])?
                .iter()
                .map(base_record)
                .collect()
        })
    }

    fn push_manifest(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        body: &[u8],
        tags: &[String],
        who: &Actor,
    ) -> Result<Pushed> {
        self.db.write(|c| {
            let pushed = push_in(c, repo, manifest, body, tags, who.at)?;
            let target = format!("{repo}:v{}", pushed.version);
            audit_in(c, who, "push", &target, &Digest::of(body).to_string())?;
            Ok(pushed)
        })
    }

    fn resolve(&self, reference: &Reference) -> Result<Option<Resolved>> {
        // One statement finds the repository and the version (each round trip counts on
        // PostgreSQL), a second reads its tags.
        self.db.read(|c| {
            let repo = &reference.repository;
            let select = "SELECT v.version, v.manifest, m.body, v.created_at, r.id, v.yanked FROM repositories r
                          JOIN versions v ON v.repository = r.id JOIN manifests m ON m.digest = v.manifest
                          WHERE r.namespace = $1 AND r.name = $2 AND v.yanked < 2";
            let (ns, name) = (repo.namespace(), repo.name());
            let found = match &reference.selector {
                Selector::Version(v) => {
                    c.opt(&format!("{select} AND v.version = $3"), p![ns, name, *v])?
                }
                Selector::Digest(d) => c.opt(
                    &format!("{select} AND v.manifest = $3 ORDER BY v.version DESC LIMIT 1"),
                    p![ns, name, d],
                )?,
                Selector::Tag(t) => c.opt(
                    &format!(
                        "{select} AND v.version = (SELECT version FROM tags WHERE repository = r.id AND tag = $3)"
                    ),
                    p![ns, name, t],
                )?,
            };
            let Some(r) = found else { return Ok(None) };
            let version = r.uint(0)?;
            Ok(Some(Resolved {
                repository: repo.clone(),
                version,
                digest: r.digest(1)?,
                manifest: r.bytes(2)?,
                tags: tags_of(c, r.int(4)?, version)?,
                created_at: r.int(3)?,
                yanked: r.int(5)? == YANKED,
            }))
        })
    }

    fn list_repositories(&self, namespace: Option<&str>, viewer: &str) -> Result<Vec<RepoSummary>> {
        self.db.read(|c| {
            c.query(
                // The newest live version; for a repository whose versions are all yanked,
                // the newest yanked one (listed as such, not hidden).
                &format!("SELECT r.namespace, r.name, v.version, v.manifest, m.base_fingerprint, m.method, v.created_at,
                        (SELECT COUNT(*) FROM versions WHERE repository = r.id AND yanked = v.yanked), v.yanked
                 FROM repositories r
                 JOIN versions v ON v.repository = r.id
                   AND v.version = COALESCE(
                     (SELECT MAX(version) FROM versions WHERE repository = r.id AND yanked = 0),
                     (SELECT MAX(version) FROM versions WHERE repository = r.id AND yanked = 1))
                 JOIN manifests m ON m.digest = v.manifest
                 WHERE (CAST($1 AS TEXT) IS NULL OR r.namespace = $1)
                   AND ($2 = '*' OR {})
                 ORDER BY r.namespace, r.name", readable("r.namespace", "$2")),
                p![namespace, viewer],
            )?
            .iter()
            .map(|r| {
                Ok(RepoSummary {
                    repository: r.repo(0)?,
                    latest_version: r.uint(2)?,
                    latest_digest: r.digest(3)?,
                    base_fingerprint: r.digest(4)?,
                    method: r.text(5)?,
                    updated_at: r.int(6)?,
                    versions: r.uint(7)?,
                    yanked: r.int(8)? == YANKED,
                })
            })
            .collect()
        })
    }

    fn all_yanked(&self, repo: &Repository) -> Result<Option<(u64, u64)>> {
        self.db.read(|c| {
            let r = c.one(
                "SELECT COUNT(CASE WHEN v.yanked = 0 THEN 1 END),
                        COUNT(CASE WHEN v.yanked = 1 THEN 1 END),
                        COALESCE(MAX(CASE WHEN v.yanked = 1 THEN v.version END), 0)
                 FROM versions v JOIN repositories r ON r.id = v.repository
                 WHERE r.namespace = $1 AND r.name = $2",
                p![repo.namespace(), repo.name()],
            )?;
            let (live, yanked, newest) = (r.uint(0)?, r.uint(1)?, r.uint(2)?);
            Ok((live == 0 && yanked > 0).then_some((yanked, newest)))
        })
    }

    fn list_versions(&self, repo: &Repository) -> Result<Option<Vec<VersionInfo>>> {
        self.db.read(|c| {
            let Some(id) = repo_id(c, repo, false)? else {
                return Ok(None);
            };
            // The push's audit row names the version as `ns/name:vN`.
            let rows = c.query(
                "SELECT v.version, v.manifest, m.size, v.created_at,
                        (SELECT COALESCE(a.token, 0) FROM audit a WHERE a.action = 'push'
                           AND a.target = CAST($2 AS TEXT) || CAST(v.version AS TEXT)
                         ORDER BY a.at DESC LIMIT 1)
                 FROM versions v
                 JOIN manifests m ON m.digest = v.manifest WHERE v.repository = $1 AND v.yanked = 0
                 ORDER BY v.version DESC",
                p![id, format!("{repo}:v")],
            )?;
            // Every tag of the repository in one statement, and each pusher's token
            // once, rather than statements per version.
            let mut tags: HashMap<u64, Vec<String>> = HashMap::new();
            let all_tags = c.query(
                "SELECT version, tag FROM tags WHERE repository = $1 ORDER BY tag",
                p![id],
            )?;
            for t in all_tags {
                tags.entry(t.uint(0)?).or_default().push(t.text(1)?);
            }
            let mut pushers: HashMap<i64, String> = HashMap::new();
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let version = r.uint(0)?;
                // No push row: published by a job; token 0: no token (ids start at 1).
                let pushed_by = match r.opt_int(4)? {
                    None => None,
                    Some(0) => Some("open registry".to_owned()),
                    Some(t) if pushers.contains_key(&t) => pushers.get(&t).cloned(),
                    Some(t) => {
                        let description = c
                            .query("SELECT description FROM tokens WHERE id = $1", p![t])?
                            .first()
                            .map(|d| d.text(0))
                            .transpose()?
                            .unwrap_or_default();
                        let who = if description.is_empty() {
                            format!("token {t}")
                        } else {
                            format!("token {t} ({description})")
                        };
                        pushers.insert(t, who.clone());
                        Some(who)
                    }
                };
                out.push(VersionInfo {
                    version,
                    digest: r.digest(1)?,
                    tags: tags.remove(&version).unwrap_or_default(),
                    size: r.uint(2)?,
                    created_at: r.int(3)?,
                    pushed_by,
                });
            }
            Ok(Some(out))
        })
    }

    fn blob_users(&self, digest: &Digest) -> Result<Vec<String>> {
        self.db.read(|c| {
            let rows = c.query(
                "SELECT r.namespace, r.name, v.version FROM manifest_blobs mb
                 JOIN versions v ON v.manifest = mb.manifest
                 JOIN repositories r ON r.id = v.repository
                 WHERE mb.blob = $1 AND v.yanked <> $2 ORDER BY r.namespace, r.name, v.version",
                p![digest.to_string(), DELETED],
            )?;
            rows.iter()
                .map(|r| Ok(format!("{}/{}:v{}", r.text(0)?, r.text(1)?, r.uint(2)?)))
                .collect()
        })
    }

    fn search(&self, filter: &SearchFilter) -> Result<Vec<DeltaSummary>> {
        // Two statements however many rows: the matching versions (annotations matched
        // in SQL, one indexed lookup each), then all their annotations by the same filter.
        let mut matching = format!(
            "FROM versions v JOIN repositories r ON r.id = v.repository
                 JOIN manifests m ON m.digest = v.manifest
                 WHERE v.yanked = 0 AND (CAST($1 AS TEXT) IS NULL OR r.namespace = $1)
                   AND (CAST($2 AS TEXT) IS NULL OR m.base_fingerprint = $2)
                   AND (CAST($3 AS TEXT) IS NULL OR m.method = $3)
                   AND (CAST($4 AS TEXT) IS NULL OR $4 = '*' OR {})",
            readable("r.namespace", "$4")
        );
        let mut params = vec![
            Value::from(filter.namespace.as_deref()),
            Value::from(filter.base.as_ref()),
            Value::from(filter.method.as_deref()),
            Value::from(filter.viewer.as_deref()),
        ];
        for (key, value) in &filter.annotations {
            let n = params.len();
            matching.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM annotations a
                     WHERE a.manifest = m.digest AND a.key = ${} AND a.value = ${})",
                n + 1,
                n + 2
            ));
            params.extend([Value::from(key.as_str()), Value::from(value.as_str())]);
        }
        self.db.read(|c| {
            let rows = c.query(
                &format!(
                    "SELECT r.namespace, r.name, v.version, m.digest, m.base_fingerprint, m.method, m.size
                     {matching} ORDER BY r.namespace, r.name, v.version"
                ),
                &params,
            )?;
            let mut annotations: HashMap<Digest, BTreeMap<String, String>> = HashMap::new();
            let sql = format!(
                "SELECT manifest, key, value FROM annotations
                 WHERE manifest IN (SELECT m.digest {matching})"
            );
            for a in c.query(&sql, &params)? {
                let entry = annotations.entry(a.digest(0)?).or_default();
                entry.insert(a.text(1)?, a.text(2)?);
            }
            let mut out = Vec::new();
            for r in rows {
                let digest = r.digest(3)?;
                out.push(DeltaSummary {
                    repository: r.repo(0)?,
                    version: r.uint(2)?,
                    digest,
                    base_fingerprint: r.digest(4)?,
                    method: r.text(5)?,
                    size: r.uint(6)?,
                    annotations: annotations.get(&digest).cloned().unwrap_or_default(),
                });
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
        who: &Actor,
    ) -> Result<u64> {
        self.db.write(|c| {
            let (id, digest) = existing_version(c, repo, version)?;
            let current = c
                .opt(
                    "SELECT version FROM tags WHERE repository = $1 AND tag = $2",
                    p![id, tag],
                )?
                .map(|r| r.uint(0))
                .transpose()?
                .unwrap_or(0);
            if let Some(expected) = expected
                && expected != current
            {
                return Err(Error::FailedPrecondition(format!(
                    "tag {repo}:{tag} points at {}, not the expected {}",
                    version_name(current),
                    version_name(expected)
                )));
            }
            upsert_tag(c, id, tag, version, who.at)?;
            let target = format!("{repo}:{tag} -> v{version}");
            audit_in(c, who, "tag", &target, &digest.to_string())?;
            Ok(current)
        })
    }

    fn token_count(&self) -> Result<u64> {
        self.db
            .read(|c| c.one("SELECT COUNT(*) FROM tokens", &[])?.uint(0))
    }

    fn create_token(&self, hash: &str, t: &TokenRecord) -> Result<i64> {
        self.db.write(|c| {
            let id = c
                .one(
                    "INSERT INTO tokens (hash, namespace, scope, kind, description, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    p![hash, &t.namespace, t.scope.as_str(), t.kind.as_str(), &t.description, t.created_at, t.expires_at],
                )?
                .int(0)?;
            let target = format!("token {id}: {} {} on {}", t.kind, t.scope, t.namespace);
            audit_in(c, &Actor::local(t.created_at), "token-create", &target, "")?;
            Ok(id)
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.db.read(|c| {
            c.opt(&format!("{TOKEN_COLUMNS} WHERE hash = $1"), p![hash])?
                .as_ref()
                .map(token_row)
                .transpose()
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.db.read(|c| {
            c.query(&format!("{TOKEN_COLUMNS} ORDER BY id"), &[])?
                .iter()
                .map(token_row)
                .collect()
        })
    }

    fn revoke_token(&self, id: i64, now: i64) -> Result<bool> {
        self.db.write(|c| {
            let revoked = c.exec(
                "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                p![id, now],
            )?;
            if revoked > 0 {
                audit_in(
                    c,
                    &Actor::local(now),
                    "token-revoke",
                    &format!("token {id}"),
                    "",
                )?;
            }
            Ok(c.opt("SELECT 1 FROM tokens WHERE id = $1", p![id])?
                .is_some())
        })
    }

    fn is_public(&self, namespace: &str) -> Result<bool> {
        self.db.read(|c| {
            Ok(c.opt(
                "SELECT 1 FROM public_namespaces WHERE namespace = $1",
                p![namespace],
            )?
            .is_some())
        })
    }

    fn set_public(&self, namespace: &str, public: bool) -> Result<()> {
        self.db.write(|c| {
            let (changed, action) = if public {
                let n = c.exec(
                    "INSERT INTO public_namespaces (namespace) VALUES ($1) ON CONFLICT DO NOTHING",
                    p![namespace],
                )?;
                (n, "namespace-public")
            } else {
                let n = c.exec(
                    "DELETE FROM public_namespaces WHERE namespace = $1",
                    p![namespace],
                )?;
                (n, "namespace-private")
            };
            if changed > 0 {
                audit_in(c, &Actor::local(crate::clock::now()), action, namespace, "")?;
            }
            Ok(())
        })
    }

    fn visible_blobs(
        &self,
        digests: &[Digest],
        viewer: &str,
    ) -> Result<HashMap<Digest, StoredBlob>> {
        self.db.read(|c| {
            let mut out = HashMap::new();
            for part in digests.chunks(500) {
                let slots: Vec<String> = (0..part.len()).map(|i| format!("${}", i + 2)).collect();
                let mut params = vec![Value::from(viewer)];
                params.extend(part.iter().map(Value::from));
                let rows = c.query(
                    &format!(
                        "SELECT b.digest, b.size, b.corrupt FROM blobs b WHERE b.digest IN ({})
                           AND ($1 = '*' OR EXISTS (SELECT 1 FROM blob_links l WHERE l.blob = b.digest
                             AND {}))",
                        slots.join(", "),
                        readable("l.namespace", "$1")
                    ),
                    &params,
                )?;
                for r in rows {
                    out.insert(
                        r.digest(0)?,
                        StoredBlob {
                            size: r.uint(1)?,
                            corrupt: r.int(2)? != 0,
                        },
                    );
                }
            }
            Ok(out)
        })
    }

    fn list_audit(&self) -> Result<Vec<AuditEntry>> {
        self.db.read(|c| {
            c.query(
                "SELECT at, token, action, target, digest FROM audit ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.int(0)?,
                    token: r.opt_int(1)?,
                    action: r.text(2)?,
                    target: r.text(3)?,
                    digest: r.text(4)?,
                })
            })
            .collect()
        })
    }

    fn yank(
        &self,
        repo: &Repository,
        version: u64,
        yanked: bool,
        who: &Actor,
    ) -> Result<Vec<String>> {
        self.db.write(|c| {
            let (id, digest) = existing_version(c, repo, version)?;
            let state = if yanked { YANKED } else { LIVE };
            c.exec(
                "UPDATE versions SET yanked = $3 WHERE repository = $1 AND version = $2",
                p![id, version, state],
            )?;
            refresh_latest(c, id, who.at)?;
            let action = if yanked { "yank" } else { "unyank" };
            audit_in(
                c,
                who,
                action,
                &format!("{repo}:v{version}"),
                &digest.to_string(),
            )?;
            tags_of(c, id, version)
        })
    }

    fn delete_version(&self, repo: &Repository, version: u64, who: &Actor) -> Result<()> {
        let now = who.at;
        self.db.write(|c| {
            let (id, digest) = existing_version(c, repo, version)?;
            c.exec(
                "DELETE FROM tags WHERE repository = $1 AND version = $2",
                p![id, version],
            )?;
            c.exec(
                "UPDATE versions SET yanked = $3 WHERE repository = $1 AND version = $2",
                p![id, version, DELETED],
            )?;
            // Its blobs start their grace period now.
            c.exec(
                "UPDATE blobs SET last_referenced = $3 WHERE digest IN
                   (SELECT mb.blob FROM manifest_blobs mb JOIN versions v ON v.manifest = mb.manifest
                    WHERE v.repository = $1 AND v.version = $2)",
                p![id, version, now],
            )?;
            refresh_latest(c, id, now)?;
            audit_in(c, who, "delete", &format!("{repo}:v{version}"), &digest.to_string())
        })
    }

    fn delete_tag(&self, repo: &Repository, tag: &str, who: &Actor) -> Result<bool> {
        self.db.write(|c| {
            let Some(id) = repo_id(c, repo, true)? else {
                return Ok(false);
            };
            let deleted = c.exec(
                "DELETE FROM tags WHERE repository = $1 AND tag = $2",
                p![id, tag],
            )? > 0;
            if deleted {
                audit_in(c, who, "untag", &format!("{repo}:{tag}"), "")?;
            }
            Ok(deleted)
        })
    }

    fn collect_garbage(
        &self,
        cutoff: i64,
        dry_run: bool,
        who: &Actor,
    ) -> Result<Vec<(Digest, u64)>> {
        let collect = |c: &mut dyn Sql| -> Result<Vec<(Digest, u64)>> {
            // Locking the candidates makes a concurrent push (which refreshes
            // `last_referenced` on the blobs it names) either finish first, and then the
            // row no longer qualifies, or find the row gone and refuse.
            let lock = c.engine().for_update();
            let rows = c.query(
                &format!(
                    "SELECT b.digest, b.size FROM blobs b WHERE b.last_referenced < $1 AND NOT EXISTS (
                       SELECT 1 FROM manifest_blobs mb JOIN versions v ON v.manifest = mb.manifest
                       WHERE mb.blob = b.digest AND v.yanked < 2)
                     ORDER BY b.digest{lock}"
                ),
                p![cutoff],
            )?;
            let rows = rows
                .iter()
                .map(|r| Ok((r.digest(0)?, r.uint(1)?)))
                .collect::<Result<Vec<_>>>()?;
            if !dry_run {
                for (d, _) in &rows {
                    c.exec("DELETE FROM manifest_blobs WHERE blob = $1", p![d])?;
                    c.exec("DELETE FROM blob_links WHERE blob = $1", p![d])?;
                    c.exec("DELETE FROM blobs WHERE digest = $1", p![d])?;
                }
                audit_in(c, who, "gc", &format!("{} blobs", rows.len()), "")?;
            }
            Ok(rows)
        };
        if dry_run {
            self.db.read(collect)
        } else {
            self.db.write(collect)
        }
    }

    fn all_blobs(&self) -> Result<Vec<(Digest, u64, bool)>> {
        self.db.read(|c| {
            c.query(
                "SELECT digest, size, corrupt FROM blobs ORDER BY digest",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.digest(0)?, r.uint(1)?, r.int(2)? != 0)))
            .collect()
        })
    }

    fn mark_corrupt(&self, digest: &Digest) -> Result<()> {
        self.db.write(|c| {
            if c.exec("UPDATE blobs SET corrupt = 1 WHERE digest = $1", p![digest])? > 0 {
                let d = digest.to_string();
                audit_in(c, &Actor::local(crate::clock::now()), "quarantine", &d, &d)?;
            }
            Ok(())
        })
    }
}

/// The repository id (locked) and the version's manifest digest, after checking the
/// version exists and is not deleted.
fn existing_version(c: &mut dyn Sql, repo: &Repository, version: u64) -> Result<(i64, Digest)> {
    let not_found = || Error::NotFound {
        what: "version",
        name: format!("{repo}:v{version}"),
    };
    let id = repo_id(c, repo, true)?.ok_or_else(not_found)?;
    let row = c
        .opt(
            "SELECT manifest FROM versions WHERE repository = $1 AND version = $2 AND yanked < 2",
            p![id, version],
        )?
        .ok_or_else(not_found)?;
    Ok((id, row.digest(0)?))
}

/// Points `latest` at the newest version that is neither yanked nor deleted (or removes it).
fn refresh_latest(c: &mut dyn Sql, repo: i64, now: i64) -> Result<()> {
    c.exec(
        "DELETE FROM tags WHERE repository = $1 AND tag = 'latest'",
        p![repo],
    )?;
    let newest = c
        .one(
            "SELECT MAX(version) FROM versions WHERE repository = $1 AND yanked = 0",
            p![repo],
        )?
        .opt_int(0)?;
    if let Some(v) = newest {
        upsert_tag(c, repo, LATEST, v as u64, now)?;
    }
    Ok(())
}

fn upsert_tag(c: &mut dyn Sql, repo: i64, tag: &str, version: u64, now: i64) -> Result<()> {
    c.exec(
        "INSERT INTO tags (repository, tag, version, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (repository, tag) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
        p![repo, tag, version, now],
    )?;
    Ok(())
}

const TOKEN_COLUMNS: &str = "SELECT id, namespace, scope, kind, description, created_at, expires_at, revoked_at FROM tokens";

/// A scope or kind the token table holds that this version does not know.
fn stored_token(e: delta_proto::UnknownName) -> Error {
    Error::Database(format!("tokens table: {e}"))
}

fn token_row(r: &Row) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.int(0)?,
        namespace: r.text(1)?,
        scope: r.text(2)?.parse().map_err(stored_token)?,
        kind: r.text(3)?.parse().map_err(stored_token)?,
        description: r.text(4)?,
        created_at: r.int(5)?,
        expires_at: r.opt_int(6)?,
        revoked_at: r.opt_int(7)?,
    })
}

fn version_name(v: u64) -> String {
    if v == 0 {
        "nothing".to_owned()
    } else {
        format!("v{v}")
    }
}

#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
pub mod jobs;
#[cfg(test)]
mod tests;

/// Publishes a manifest inside an open write transaction: the version (a new number, or
/// the latest one when the same manifest is pushed again), `latest` and `tags`.
pub(crate) fn push_in(
    c: &mut dyn Sql,
    repo: &Repository,
    manifest: &Manifest,
    body: &[u8],
    tags: &[String],
    now: i64,
) -> Result<Pushed> {
    let digest = Digest::of(body);
    c.exec(
        "INSERT INTO manifests (digest, body, base_fingerprint, method, size, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (digest) DO NOTHING",
        p![
            &digest,
            body,
            &manifest.base.fingerprint,
            &manifest.method,
            manifest.size(),
            now
        ],
    )?;
    // In digest order, so two pushes naming the same blobs lock them in the same order.
    let mut files: Vec<_> = manifest.files.iter().collect();
    files.sort_by_key(|f| f.digest.to_string());
    for f in files {
        let n = c.exec(
            "UPDATE blobs SET last_referenced = $2 WHERE digest = $1 AND corrupt = 0",
            p![&f.digest, now],
        )?;
        if n == 0 {
            return Err(Error::FailedPrecondition(format!(
                "blob {} ({}) is not stored",
                f.digest, f.path
            )));
        }
        c.exec(
            "INSERT INTO manifest_blobs (manifest, blob) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            p![&digest, &f.digest],
        )?;
        c.exec(
            "INSERT INTO blob_links (blob, namespace) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            p![&f.digest, repo.namespace()],
        )?;
    }
    for (k, v) in &manifest.annotations {
        c.exec(
            "INSERT INTO annotations (manifest, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            p![&digest, k, v],
        )?;
    }
    c.exec(
        "INSERT INTO repositories (namespace, name, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        p![repo.namespace(), repo.name(), now],
    )?;
    let id = repo_id(c, repo, true)?.ok_or_else(|| Error::NotFound {
        what: "repository",
        name: repo.to_string(),
    })?;
    // Version numbers are never reused, even after a delete.
    let highest = c
        .one(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE repository = $1",
            p![id],
        )?
        .uint(0)?;
    let latest = c.opt(
        "SELECT version, manifest FROM versions WHERE repository = $1 AND yanked = 0
         ORDER BY version DESC LIMIT 1",
        p![id],
    )?;
    let (version, created) = match latest {
        Some(r) if r.digest(1)? == digest => (r.uint(0)?, false),
        _ => (highest + 1, true),
    };
    if created {
        c.exec(
            "INSERT INTO versions (repository, version, manifest, created_at) VALUES ($1, $2, $3, $4)",
            p![id, version, &digest, now],
        )?;
    }
    for tag in tags.iter().map(String::as_str).chain([LATEST]) {
        upsert_tag(c, id, tag, version, now)?;
    }
    Ok(Pushed { version, created })
}
