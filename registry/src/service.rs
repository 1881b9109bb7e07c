//! [`RegistryService`]: the gRPC `Registry` service. The only registry module that touches
//! generated types; it converts them to domain types, checks them and calls [`MetaStore`]
//! and [`BlobStore`].

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use delta_proto::fingerprint::FingerprintEntry;
use delta_proto::manifest::{Manifest, TensorInfo};
use delta_proto::reference::{Reference, Repository, check_tag};
use delta_proto::registry_server::Registry;
use delta_proto::{self as pb, Digest, excerpt};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Scope};
use crate::blobs::BlobStore;
use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::jobs::{Completion, JobRow};
use crate::meta::{AuditEntry, BaseRecord, MetaStore, SearchFilter, SqlMeta, StoredBlob};
use crate::uploads::{Holder, Progress, Uploads};

/// The registry's state, shared by every request.
#[derive(Debug, Clone)]
pub struct RegistryService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RegistryConfig,
    meta: Arc<dyn MetaStore>,
    blobs: BlobStore,
    uploads: Uploads,
    /// Commits of blob bytes hold it shared; garbage collection holds it exclusively, so
    /// a collection never deletes bytes a concurrent upload just wrote.
    gc_lock: tokio::sync::RwLock<()>,
    /// Set once any token exists; tokens are never deleted (only revoked), so a closed
    /// registry never reopens and the check can skip the database from then on.
    closed: std::sync::atomic::AtomicBool,
    /// Woken when a job is submitted here, so long-polling workers lease it at once
    /// (jobs submitted through another replica are found by the once-a-second retry).
    jobs_submitted: tokio::sync::Notify,
    /// Woken when a job gets an event or a new state on this replica (`WatchJob`; other
    /// replicas' changes are seen within a second).
    jobs_changed: tokio::sync::Notify,
}

/// The embedded database's file name in the data dir.
pub const SQLITE_FILE: &str = "registry.sqlite";

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl RegistryService {
    /// Opens the metadata database (migrating it) and the blob store the config names, and
    /// removes stale staging files a killed process left behind.
    pub async fn open(config: &RegistryConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)?;
        let db = config.database_url.clone();
        let file = config.data_dir.join(SQLITE_FILE);
        let meta = tokio::task::spawn_blocking(move || match db {
            Some(url) => SqlMeta::open_url(&url),
            None => SqlMeta::open(&file),
        })
        .await??;
        let blobs = BlobStore::open(config)?;
        let removed = blobs.remove_stale_staging(config.staging_grace)?;
        if removed > 0 {
            tracing::info!(removed, "removed stale staging files");
        }
        Ok(Self::with_parts(config.clone(), Arc::new(meta), blobs))
    }

    /// A service over the given stores.
    pub fn with_parts(config: RegistryConfig, meta: Arc<dyn MetaStore>, blobs: BlobStore) -> Self {
        let uploads = Uploads::new(crate::uploads::Limits {
            total: config.max_open_uploads,
            per_token: config.max_uploads_per_token,
            per_namespace: config.max_uploads_per_namespace,
        });
        Self {
            inner: Arc::new(Inner {
                config,
                meta,
                blobs,
                uploads,
                gc_lock: tokio::sync::RwLock::new(()),
                closed: std::sync::atomic::AtomicBool::new(false),
                jobs_submitted: tokio::sync::Notify::new(),
                jobs_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// Whether the registry runs open (no tokens exist).
    pub async fn is_open(&self) -> Result<bool> {
        Ok(self.meta(|m| m.token_count()).await? == 0)
    }

    /// Aborts idle upload sessions older than the configured TTL.
    pub async fn expire_uploads(&self) -> usize {
        self.inner
            .uploads
            .expire(
                self.inner.config.upload_ttl,
                self.inner.config.empty_upload_ttl,
            )
            .await
    }

    /// Removes what killed uploads left in the store (completed staging objects never
    /// published, and on S3 incomplete multipart uploads); failures are logged, not fatal.
    pub async fn cleanup_staging(&self) {
        let c = &self.inner.config;
        // An interrupted upload stays resumable for `upload_ttl`: its parts stay that long.
        let incomplete = c.staging_grace.max(c.upload_ttl);
        match self
            .inner
            .blobs
            .cleanup_staging(c.staging_grace, incomplete, now())
            .await
        {
            Ok(done) if done == crate::blobs::Cleanup::default() => {}
            Ok(done) => tracing::info!(
                staging_objects = done.objects,
                multipart_uploads = done.uploads,
                "removed what killed uploads left"
            ),
            Err(e) => tracing::warn!(error = %e, "cleaning up staging objects failed"),
        }
    }

    /// What the metrics endpoint reports besides counters: stored blobs and bytes, jobs
    /// by state, live leases.
    pub async fn gauges(&self) -> Result<crate::telemetry::Gauges> {
        self.meta(|m| {
            let blobs = m.all_blobs()?;
            let (jobs, leases) = m.job_counts(now())?;
            Ok(crate::telemetry::Gauges {
                blobs: blobs.len() as u64,
                blob_bytes: blobs.iter().map(|b| b.1).sum(),
                jobs,
                leases,
            })
        })
        .await
    }

    async fn meta<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn MetaStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let meta = self.inner.meta.clone();
        tokio::task::spawn_blocking(move || f(meta.as_ref())).await?
    }

    async fn commit_blob(&self, digest: Digest, size: u64, caller: &Caller) -> Result<()> {
        let ns = caller.blob_namespace().map(str::to_owned);
        self.meta(move |m| {
            m.insert_blob(&digest, size, now())?;
            match ns {
                Some(ns) => m.link_blob(&digest, &ns),
                None => Ok(()),
            }
        })
        .await?;
        self.record(caller, "upload", &digest.to_string(), &digest.to_string())
            .await?;
        tracing::info!(digest = %digest, bytes = size, "blob stored");
        Ok(())
    }

    /// Who is calling (see `admin::authenticate`).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller> {
        let header = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        Error::Unauthenticated("the authorization header is not text".into())
                    })?
                    .to_owned(),
            ),
        };
        use std::sync::atomic::Ordering;
        if header.is_none() && self.inner.closed.load(Ordering::Relaxed) {
            return Ok(Caller::Anonymous);
        }
        let caller = self
            .meta(move |m| crate::admin::authenticate(m, header.as_deref(), now()))
            .await?;
        if caller != Caller::Open {
            self.inner.closed.store(true, Ordering::Relaxed);
        }
        Ok(caller)
    }

    /// Checks `need` on the namespace of `repo`.
    async fn authorize(&self, caller: &Caller, namespace: &str, need: Scope) -> Result<()> {
        if matches!(caller, Caller::Open) {
            return Ok(());
        }
        let ns = namespace.to_owned();
        let public = self.meta(move |m| m.is_public(&ns)).await?;
        caller.check(namespace, need, public)
    }

    /// Whether the caller may read repositories of `namespace` (for filtering listings).
    async fn readable(&self, caller: &Caller, namespace: &str) -> Result<bool> {
        Ok(self.authorize(caller, namespace, Scope::Read).await.is_ok())
    }

    /// The stored blobs among `digests` the caller may see. A blob another namespace
    /// holds is as absent as one nobody has: one database statement answers both, and no
    /// caller learns more (or sooner) about the one than about the other.
    async fn visible_blobs(
        &self,
        caller: &Caller,
        digests: Vec<Digest>,
    ) -> Result<HashMap<Digest, StoredBlob>> {
        let viewer = caller.blob_viewer().to_owned();
        self.meta(move |m| m.visible_blobs(&digests, &viewer)).await
    }

    /// Whether the caller may read a base record registered under `name`: a
    /// `namespace/name` like that namespace's repositories, a global name with any token
    /// (anonymous callers see the bases of public namespaces only).
    async fn base_readable(&self, caller: &Caller, name: &str) -> Result<bool> {
        match name.split_once('/') {
            Some((ns, _)) => self.readable(caller, ns).await,
            None => Ok(!matches!(caller, Caller::Anonymous)),
        }
    }

    /// The records of a base name or fingerprint that the caller may read, proven ones
    /// first.
    async fn visible_bases(&self, caller: &Caller, key: &str) -> Result<Vec<BaseRecord>> {
        let lookup = key.to_owned();
        let mut out = Vec::new();
        for b in self.meta(move |m| m.find_bases(&lookup)).await? {
            if self.base_readable(caller, &b.name).await? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// A job as `caller` may see it, with its events after `after`. A job is visible to
    /// tokens covering its namespace (its team's users and workers, `*` tokens) and to its
    /// submitter; to anyone else it looks missing, whether it exists or not.
    async fn job_snapshot(
        &self,
        caller: &Caller,
        id: u64,
        after: u64,
    ) -> std::result::Result<pb::GetJobResponse, Status> {
        let job = self.meta(move |m| m.get_job(id)).await?;
        let job = job
            .filter(|j| {
                caller.covers(&j.namespace)
                    || (j.submitter.is_some() && j.submitter == caller.token_id())
            })
            .ok_or_else(|| Error::NotFound {
                what: "job",
                name: id.to_string(),
            })?;
        let events = self.meta(move |m| m.job_events(id, after)).await?;
        Ok(pb::GetJobResponse {
            job: Some(job_info(job)),
            events: events
                .into_iter()
                .map(|(seq, at, body)| pb::JobEvent { seq, at, body })
                .collect(),
        })
    }

    /// Appends to the audit log.
    async fn record(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        digest: &str,
    ) -> Result<()> {
        let entry = AuditEntry {
            at: now(),
            token: caller.token_id(),
            action: action.to_owned(),
            target: target.to_owned(),
            digest: digest.to_owned(),
        };
        self.meta(move |m| m.audit(&entry)).await
    }

    /// Resolves a reference after checking `need` on its namespace, so a refusal says
    /// nothing about whether the reference exists.
    async fn resolve_checked(
        &self,
        caller: &Caller,
        reference: &str,
        need: Scope,
    ) -> Result<crate::meta::Resolved> {
        let parsed: Reference = reference.parse()?;
        self.authorize(caller, parsed.repository.namespace(), need)
            .await?;
        self.resolve_ref(reference).await
    }

    async fn resolve_ref(&self, reference: &str) -> Result<crate::meta::Resolved> {
        let parsed: Reference = reference.parse()?;
        let repo = parsed.repository.clone();
        let latest =
            parsed.selector == delta_proto::Selector::Tag(delta_proto::reference::LATEST.into());
        if let Some(r) = self.meta(move |m| m.resolve(&parsed)).await? {
            return Ok(r);
        }
        // `latest` of a repository whose versions are all yanked: say so (the caller may
        // read the namespace; resolve_checked authorised it) rather than "not found".
        if latest {
            let ns = repo.namespace().to_owned();
            let all_yanked = self
                .meta(move |m| m.list_repositories(Some(&ns)))
                .await?
                .into_iter()
                .find(|s| s.repository == repo && s.yanked);
            if let Some(s) = all_yanked {
                return Err(Error::NotFound {
                    what: "live version of",
                    name: format!(
                        "{repo}: all {} of its versions are yanked; pull one by number ({repo}:v{}) or un-yank it",
                        s.versions, s.latest_version
                    ),
                });
            }
        }
        Err(Error::NotFound {
            what: "reference",
            name: excerpt(reference),
        })
    }

    /// Validates a manifest against the stored blobs and its registered base. The blobs
    /// must be visible to `caller`, which is checked first, in one statement: a digest
    /// only another namespace holds gets the answer of one nobody holds, before any size,
    /// header or base check could tell the two apart.
    async fn validate(&self, manifest: &Manifest, caller: &Caller) -> Result<BaseRecord> {
        let cfg = &self.inner.config;
        let count: usize = manifest.files.iter().map(|f| f.tensors.len()).sum();
        if count > cfg.max_tensors {
            return Err(Error::LimitExceeded(format!(
                "delta has {count} tensors; the limit is {}",
                cfg.max_tensors
            )));
        }
        let digests: Vec<Digest> = manifest.files.iter().map(|f| f.digest).collect();
        let stored = self.visible_blobs(caller, digests).await?;
        for f in &manifest.files {
            if stored.get(&f.digest).is_none_or(|b| b.corrupt) {
                return Err(Error::FailedPrecondition(format!(
                    "file {} references blob {}, which is not uploaded",
                    f.path, f.digest
                )));
            }
        }
        let fp = manifest.base.fingerprint;
        let base = self
            .visible_bases(caller, &fp.to_string())
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "base {fp} is not registered: register it first with `delta base add`"
                ))
            })?;
        for f in &manifest.files {
            let size = stored.get(&f.digest).map_or(0, |b| b.size);
            if size != f.size {
                return Err(Error::InvalidManifest(format!(
                    "file {} states {} bytes but blob {} has {size}",
                    f.path, f.size, f.digest
                )));
            }
            self.check_file(f).await?;
        }
        let table: BTreeMap<String, TensorInfo> = base
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        manifest.check_against_base(&table)?;
        Ok(base)
    }

    /// Reads a tensor file's header from the store and checks it is valid safetensors that
    /// lists exactly the manifest's tensors.
    async fn check_file(&self, f: &delta_proto::manifest::FileEntry) -> Result<()> {
        let max = self.inner.config.max_header_bytes;
        let bad = |e: delta_proto::safetensors::HeaderError| {
            Error::InvalidManifest(format!("file {} is not valid safetensors: {e}", f.path))
        };
        let first8 = if f.size >= 8 {
            self.inner.blobs.read_range(&f.digest, 0..8).await?
        } else {
            Bytes::new()
        };
        let len = delta_proto::safetensors::header_len(&first8, f.size, max).map_err(bad)?;
        let prefix = self.inner.blobs.read_range(&f.digest, 0..8 + len).await?;
        let header = delta_proto::safetensors::parse_header(&prefix, f.size, max).map_err(bad)?;
        let mut actual: Vec<TensorInfo> = header
            .tensors
            .into_iter()
            .map(|t| TensorInfo {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
            })
            .collect();
        actual.sort_by(|a, b| a.name.cmp(&b.name));
        let mut stated = f.tensors.clone();
        stated.sort_by(|a, b| a.name.cmp(&b.name));
        if actual != stated {
            let diff = stated
                .iter()
                .find(|s| !actual.contains(s))
                .map(|s| {
                    format!(
                        "manifest lists {} {} {:?}, which the file does not hold as stated",
                        s.name, s.dtype, s.shape
                    )
                })
                .or_else(|| {
                    actual.iter().find(|a| !stated.contains(a)).map(|a| {
                        format!(
                            "file holds {} {} {:?}, which the manifest does not list",
                            a.name, a.dtype, a.shape
                        )
                    })
                })
                .unwrap_or_default();
            return Err(Error::InvalidManifest(format!("file {}: {diff}", f.path)));
        }
        Ok(())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

fn base_to_pb(b: BaseRecord) -> pb::BaseRecord {
    let digests = b.digests.iter().map(ToString::to_string);
    pb::BaseRecord {
        name: b.name,
        fingerprint: b.fingerprint.to_string(),
        tensors: b
            .tensors
            .into_iter()
            .zip(digests.chain(std::iter::repeat(String::new())))
            .map(|(t, digest)| pb::TensorInfo { digest, ..t.into() })
            .collect(),
        created_at: b.created_at,
    }
}

/// The namespace a base name belongs to: `Some(ns)` for `ns/name` (its owners register
/// it), `None` for a global name (registered by admins of `*`).
fn base_namespace(name: &str) -> Result<Option<String>> {
    if name.contains('/') {
        let repo: Repository = name.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "invalid base name {:?}: use namespace/name (the syntax of repositories) or a global name of 1-128 [A-Za-z0-9._-]",
                excerpt(name)
            ))
        })?;
        return Ok(Some(repo.namespace().to_owned()));
    }
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with("blake3");
    if ok {
        Ok(None)
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid base name {:?}: use namespace/name or a global name of 1-128 [A-Za-z0-9._-]",
            excerpt(name)
        )))
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
    async fn start_upload(
        &self,
        req: Request<pb::StartUploadRequest>,
    ) -> Result<Response<pb::StartUploadResponse>, Status> {
        let caller = self.caller(&req).await?;
        caller.check_any(Scope::Write)?;
        let peer = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        let digest: Digest = req.digest.parse().map_err(Error::from)?;
        if req.size > self.inner.config.max_blob_bytes {
            return Err(Error::LimitExceeded(format!(
                "blob {digest} is {} bytes; the limit is {}",
                req.size, self.inner.config.max_blob_bytes
            ))
            .into());
        }
        // A blob another team stored is not "present" for this caller: it must send the
        // bytes, so dedup never reveals what others hold.
        let visible = self.visible_blobs(&caller, vec![digest]).await?;
        if visible
            .get(&digest)
            .is_some_and(|b| b.size == req.size && !b.corrupt)
        {
            // Refresh: a re-upload counts as a new reference (git's freshen rule).
            self.commit_blob(digest, req.size, &caller).await?;
            return Ok(Response::new(pb::StartUploadResponse {
                present: true,
                upload_id: String::new(),
                offset: req.size,
            }));
        }
        if req.size == 0 {
            if !digest.is_empty_blob() {
                return Err(Error::DigestMismatch {
                    declared: digest,
                    actual: Digest::of(b""),
                }
                .into());
            }
            self.inner.blobs.put_small(&digest, Bytes::new()).await?;
            self.commit_blob(digest, 0, &caller).await?;
            return Ok(Response::new(pb::StartUploadResponse {
                present: true,
                upload_id: String::new(),
                offset: 0,
            }));
        }
        let who = Holder {
            token: caller.token_id(),
            namespace: caller.blob_namespace().map(str::to_owned),
            peer,
        };
        let uploads = &self.inner.uploads;
        let started = match uploads
            .start(&self.inner.blobs, digest, req.size, who.clone())
            .await
        {
            // At a cap, sessions past their TTLs (the janitor runs once a minute) give their
            // slots back first, so an abandoned empty session holds one for `empty_upload_ttl`
            // at most.
            Err(Error::LimitExceeded(_)) if self.expire_uploads().await > 0 => {
                uploads
                    .start(&self.inner.blobs, digest, req.size, who)
                    .await
            }
            other => other,
        };
        let (upload_id, offset) = started?;
        Ok(Response::new(pb::StartUploadResponse {
            present: false,
            upload_id,
            offset,
        }))
    }

    async fn upload_blob(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadBlobResponse>, Status> {
        // Checked before any byte is read or stored.
        let caller = self.caller(&req).await?;
        caller.check_any(Scope::Write)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await
            .map_err(|e| crate::error::message_limit_status(e.code(), e.message()).unwrap_or(e))?;
        let Some(first) = first else {
            return Err(Status::invalid_argument(
                "empty upload stream: the first chunk must name the upload",
            ));
        };
        let mut session = self.inner.uploads.acquire(&first.upload_id)?;
        if session.owner.as_deref() != caller.blob_namespace() {
            session.park();
            return Err(Error::NotFound {
                what: "upload",
                name: excerpt(&first.upload_id),
            }
            .into());
        }
        let mut chunk = Some(first);
        while let Some(c) = chunk.take() {
            if c.data.len() > delta_proto::CHUNK_SIZE * 4 {
                return Err(Error::LimitExceeded(format!(
                    "chunk of {} bytes is over the limit",
                    c.data.len()
                ))
                .into());
            }
            crate::telemetry::metrics()
                .bytes_in
                .fetch_add(c.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            match session.append(c.offset, c.data).await {
                Ok(Progress::Complete) => {
                    let _commit = self.inner.gc_lock.read().await;
                    let id = session.id.clone();
                    let result = session.commit(&self.inner.blobs).await;
                    self.inner.uploads.remove(&id);
                    if !result? {
                        tracing::debug!(digest = %session.digest, "a racing upload stored the same bytes first");
                    }
                    let (digest, size) = (session.digest, session.size);
                    self.commit_blob(digest, size, &caller).await?;
                    let idle = self.inner.config.stream_idle_timeout;
                    if let Ok(Ok(Some(_))) = tokio::time::timeout(idle, stream.message()).await {
                        tracing::warn!(digest = %digest, "data after the declared size was ignored");
                    }
                    return Ok(Response::new(pb::UploadBlobResponse {
                        digest: digest.to_string(),
                        size,
                        committed: true,
                        offset: size,
                    }));
                }
                Ok(Progress::Partial) => {}
                Err(e @ Error::OutOfRange { .. }) => {
                    session.park();
                    return Err(e.into());
                }
                Err(e) => {
                    // Size overflow or a store failure: the session cannot continue.
                    session.abort().await;
                    self.inner.uploads.remove(&session.id);
                    return Err(e.into());
                }
            }
            // A broken stream leaves the session parked for a resume.
            let idle = self.inner.config.stream_idle_timeout;
            chunk = match tokio::time::timeout(idle, stream.message()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    session.park();
                    return Err(
                        crate::error::message_limit_status(e.code(), e.message()).unwrap_or(e)
                    );
                }
                Err(_) => {
                    session.park();
                    return Err(Error::Timeout(format!(
                        "upload {} received nothing for {idle:?}; resume from offset {}",
                        session.id, session.received
                    ))
                    .into());
                }
            };
        }
        session.park();
        Ok(Response::new(pb::UploadBlobResponse {
            digest: session.digest.to_string(),
            size: session.size,
            committed: false,
            offset: session.received,
        }))
    }

    async fn get_upload(
        &self,
        req: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::GetUploadResponse>, Status> {
        let caller = self.caller(&req).await?;
        caller.check_any(Scope::Write)?;
        let (digest, size, offset) = self
            .inner
            .uploads
            .status(&req.get_ref().upload_id, caller.blob_namespace())?;
        Ok(Response::new(pb::GetUploadResponse {
            digest: digest.to_string(),
            size,
            offset,
        }))
    }

    type DownloadBlobStream = BoxStream<pb::BlobChunk>;

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
    async fn download_blob(
        &self,
        req: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let digest: Digest = req.digest.parse().map_err(Error::from)?;
        let not_found = || Error::NotFound {
            what: "blob",
            name: digest.to_string(),
        };
        // A blob the caller may not see is answered exactly like one nobody has.
        let blob = *self
            .visible_blobs(&caller, vec![digest])
            .await?
            .get(&digest)
            .ok_or_else(not_found)?;
        if blob.corrupt {
            return Err(Error::Quarantined(digest).into());
        }
        let size = blob.size;
        if req.offset > size {
            return Err(Error::InvalidArgument(format!(
                "offset {} is past the end of blob {digest} ({size} bytes)",
                req.offset
            ))
            .into());
        }
        let mut source = self.inner.blobs.stream(&digest, size, 8 << 20);
        let (tx, rx) = mpsc::channel(8);
        let offset = req.offset;
        tokio::spawn(async move {
            // Every byte is re-hashed, including a skipped prefix, so corruption anywhere is
            // caught; the last message is DATA_LOSS instead of a clean end if it is found.
            let mut hasher = blake3::Hasher::new();
            let mut pos = 0u64;
            while let Some(item) = source.next().await {
                let bytes = match item {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                hasher.update(&bytes);
                let start = pos;
                pos += bytes.len() as u64;
                if pos <= offset {
                    continue;
                }
                let skip = offset.saturating_sub(start) as usize;
                let mut rest = bytes.slice(skip..);
                let mut at = start + skip as u64;
                while !rest.is_empty() {
                    let piece = rest.split_to(rest.len().min(delta_proto::CHUNK_SIZE));
                    let n = piece.len() as u64;
                    if tx
                        .send(Ok(pb::BlobChunk {
                            offset: at,
                            data: piece,
                        }))
                        .await
                        .is_err()
                    {
                        return; // the client went away
                    }
                    crate::telemetry::metrics()
                        .bytes_out
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    at += n;
                }
            }
            if pos != size || Digest::from_hash(hasher.finalize()) != digest {
                let _ = tx.send(Err(Status::from(Error::Corrupt(digest)))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn missing_blobs(
        &self,
        req: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        let caller = self.caller(&req).await?;
        caller.check_any(Scope::Read)?;
        let digests: Vec<Digest> = req
            .into_inner()
            .digests
            .iter()
            .map(|d| d.parse::<Digest>())
            .collect::<Result<_, _>>()
            .map_err(Error::from)?;
        let present = self.visible_blobs(&caller, digests.clone()).await?;
        let missing = digests
            .iter()
            .filter(|d| present.get(d).is_none_or(|b| b.corrupt))
            .map(ToString::to_string)
            .collect();
        Ok(Response::new(pb::MissingBlobsResponse { missing }))
    }

    #[tracing::instrument(skip_all, fields(name = %excerpt(&req.get_ref().name)))]
    async fn add_base(
        &self,
        req: Request<pb::AddBaseRequest>,
    ) -> Result<Response<pb::AddBaseResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        // Who may register the name, decided before anything is looked up: a team names
        // bases in its own namespace; global names are an admin's, so no team can take a
        // popular name (or a fingerprint) from the others.
        match base_namespace(&req.name)? {
            Some(ns) => self.authorize(&caller, &ns, Scope::Write).await?,
            None => caller.check("*", Scope::Admin, false).map_err(|_| {
                Error::PermissionDenied(format!(
                    "{} cannot register the global base name {:?}: global names need an admin token for '*'; register it in your namespace (NAMESPACE/{})",
                    caller.describe(),
                    req.name,
                    req.name
                ))
            })?,
        }
        let fingerprint: Digest = req.fingerprint.parse().map_err(Error::from)?;
        if req.tensors.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "base {} has an empty tensor table",
                req.name
            ))
            .into());
        }
        let mut entries = Vec::with_capacity(req.tensors.len());
        let mut seen = std::collections::HashSet::new();
        for t in req.tensors {
            if t.name.is_empty()
                || t.name.chars().any(char::is_control)
                || delta_proto::safetensors::dtype_size(&t.dtype).is_none()
            {
                return Err(Error::InvalidArgument(format!(
                    "base tensor {:?} {:?}: bad name or dtype",
                    excerpt(&t.name),
                    excerpt(&t.dtype)
                ))
                .into());
            }
            if !seen.insert(t.name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "base tensor {:?} appears twice",
                    excerpt(&t.name)
                ))
                .into());
            }
            let name = t.name.clone();
            let entry = FingerprintEntry::try_from(t).map_err(|_| {
                Error::InvalidArgument(format!(
                    "base tensor {:?} carries no blake3 digest of its bytes: a base record proves its table (`delta base add` sends one per tensor)",
                    excerpt(&name)
                ))
            })?;
            entries.push(entry);
        }
        // The record proves itself: its table, with the digests, must hash to the
        // fingerprint it claims. A wrong table can no longer block anyone's pushes.
        let actual = delta_proto::fingerprint::fingerprint(&mut entries);
        if actual != fingerprint {
            return Err(Error::InvalidArgument(format!(
                "the tensor table hashes to {actual}, not the stated fingerprint {fingerprint}: a base record must list the real tensors and their digests"
            ))
            .into());
        }
        let name_for_audit = req.name.clone();
        let (tensors, digests) = entries.into_iter().map(|e| (e.info, e.digest)).unzip();
        let record = BaseRecord {
            name: req.name,
            fingerprint,
            tensors,
            digests,
            created_at: now(),
        };
        let created = self.meta(move |m| m.add_base(&record)).await?;
        self.record(
            &caller,
            "add-base",
            &name_for_audit,
            &fingerprint.to_string(),
        )
        .await?;
        Ok(Response::new(pb::AddBaseResponse {
            fingerprint: fingerprint.to_string(),
            created,
        }))
    }

    async fn get_base(
        &self,
        req: Request<pb::GetBaseRequest>,
    ) -> Result<Response<pb::BaseRecord>, Status> {
        let caller = self.caller(&req).await?;
        let key = req.into_inner().name_or_fingerprint;
        // A name's namespace is checked before the lookup, as for repositories, so a
        // refusal says nothing about whether the base exists.
        if !key.starts_with("blake3:") {
            match base_namespace(&key)? {
                Some(ns) => self.authorize(&caller, &ns, Scope::Read).await?,
                None if matches!(caller, Caller::Anonymous) => {
                    return Err(Error::Unauthenticated(
                        "reading global bases needs a token".into(),
                    )
                    .into());
                }
                None => {}
            }
        }
        let base = self
            .visible_bases(&caller, &key)
            .await?
            .into_iter()
            .next()
            .ok_or(Error::NotFound {
                what: "base",
                name: excerpt(&key),
            })?;
        Ok(Response::new(base_to_pb(base)))
    }

    async fn list_bases(
        &self,
        req: Request<pb::ListBasesRequest>,
    ) -> Result<Response<pb::ListBasesResponse>, Status> {
        let caller = self.caller(&req).await?;
        let mut bases = Vec::new();
        for b in self.meta(|m| m.list_bases()).await? {
            if self.base_readable(&caller, &b.name).await? {
                bases.push(base_to_pb(b));
            }
        }
        Ok(Response::new(pb::ListBasesResponse { bases }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = self.caller(&req).await?;
        Ok(Response::new(match caller {
            Caller::Open => pb::WhoAmIResponse {
                kind: "open".into(),
                namespace: "*".into(),
                scope: Scope::Admin.to_string(),
                ..Default::default()
            },
            Caller::Anonymous => pb::WhoAmIResponse {
                kind: "anonymous".into(),
                ..Default::default()
            },
            Caller::Token(p) => pb::WhoAmIResponse {
                kind: p.kind,
                token_id: p.token_id as u64,
                namespace: p.namespace,
                scope: p.scope.to_string(),
                expires_at: p.expires_at.unwrap_or(0),
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(repository = %req.get_ref().repository))]
    async fn push_manifest(
        &self,
        req: Request<pb::PushManifestRequest>,
    ) -> Result<Response<pb::PushManifestResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let repo: Repository = req.repository.parse().map_err(Error::from)?;
        self.authorize(&caller, repo.namespace(), Scope::Write)
            .await?;
        for t in &req.tags {
            check_tag(t).map_err(Error::from)?;
        }
        if req.manifest.len() > self.inner.config.max_manifest_bytes {
            return Err(Error::LimitExceeded(format!(
                "manifest is {} bytes; the limit is {}",
                req.manifest.len(),
                self.inner.config.max_manifest_bytes
            ))
            .into());
        }
        let manifest = Manifest::from_json(&req.manifest).map_err(Error::from)?;
        self.validate(&manifest, &caller).await?;
        let body = manifest.canonical_json();
        let digest = Digest::of(&body);
        let tags = req.tags.clone();
        let r = repo.clone();
        let pushed = self
            .meta(move |m| m.push_manifest(&r, &manifest, &body, &tags, now()))
            .await?;
        tracing::info!(repository = %repo, version = pushed.version, digest = %digest, created = pushed.created, "manifest pushed");
        self.record(
            &caller,
            "push",
            &format!("{repo}:v{}", pushed.version),
            &digest.to_string(),
        )
        .await?;
        Ok(Response::new(pb::PushManifestResponse {
            repository: repo.to_string(),
            version: pushed.version,
            digest: digest.to_string(),
            created: pushed.created,
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = self
            .resolve_checked(&caller, &req.get_ref().reference, Scope::Read)
            .await?;
        Ok(Response::new(pb::ResolveResponse {
            repository: r.repository.to_string(),
            version: r.version,
            digest: r.digest.to_string(),
            manifest: r.manifest,
            tags: r.tags,
            created_at: r.created_at,
            yanked: r.yanked,
        }))
    }

    async fn list_repositories(
        &self,
        req: Request<pb::ListRepositoriesRequest>,
    ) -> Result<Response<pb::ListRepositoriesResponse>, Status> {
        let caller = self.caller(&req).await?;
        let ns = req.into_inner().namespace;
        if !ns.is_empty() {
            self.authorize(&caller, &ns, Scope::Read).await?;
        }
        let ns = (!ns.is_empty()).then_some(ns);
        let all = self
            .meta(move |m| m.list_repositories(ns.as_deref()))
            .await?;
        let mut rows = Vec::with_capacity(all.len());
        for r in all {
            if self.readable(&caller, r.repository.namespace()).await? {
                rows.push(r);
            }
        }
        let repositories = rows
            .into_iter()
            .map(|r| pb::RepositorySummary {
                repository: r.repository.to_string(),
                latest_version: r.latest_version,
                latest_digest: r.latest_digest.to_string(),
                base_fingerprint: r.base_fingerprint.to_string(),
                method: r.method,
                versions: r.versions,
                updated_at: r.updated_at,
                yanked: r.yanked,
            })
            .collect();
        Ok(Response::new(pb::ListRepositoriesResponse { repositories }))
    }

    async fn list_versions(
        &self,
        req: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let repo: Repository = req.get_ref().repository.parse().map_err(Error::from)?;
        self.authorize(&caller, repo.namespace(), Scope::Read)
            .await?;
        let r = repo.clone();
        let rows = self
            .meta(move |m| m.list_versions(&r))
            .await?
            .ok_or(Error::NotFound {
                what: "repository",
                name: repo.to_string(),
            })?;
        let versions = rows
            .into_iter()
            .map(|v| pb::VersionInfo {
                version: v.version,
                digest: v.digest.to_string(),
                tags: v.tags,
                size: v.size,
                created_at: v.created_at,
                pushed_by: v.pushed_by,
            })
            .collect();
        Ok(Response::new(pb::ListVersionsResponse { versions }))
    }

    async fn search_deltas(
        &self,
        req: Request<pb::SearchDeltasRequest>,
    ) -> Result<Response<pb::SearchDeltasResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        if !req.namespace.is_empty() {
            self.authorize(&caller, &req.namespace, Scope::Read).await?;
        }
        let base = if req.base_fingerprint.is_empty() {
            None
        } else {
            Some(
                req.base_fingerprint
                    .parse::<Digest>()
                    .map_err(Error::from)?,
            )
        };
        let filter = SearchFilter {
            namespace: (!req.namespace.is_empty()).then_some(req.namespace),
            base,
            method: (!req.method.is_empty()).then_some(req.method),
            annotations: req.annotations.into_iter().collect(),
        };
        let all = self.meta(move |m| m.search(&filter)).await?;
        let mut rows = Vec::with_capacity(all.len());
        for d in all {
            if self.readable(&caller, d.repository.namespace()).await? {
                rows.push(d);
            }
        }
        let deltas = rows
            .into_iter()
            .map(|d| pb::DeltaSummary {
                repository: d.repository.to_string(),
                version: d.version,
                digest: d.digest.to_string(),
                base_fingerprint: d.base_fingerprint.to_string(),
                method: d.method,
                size: d.size,
                annotations: d.annotations.into_iter().collect(),
            })
            .collect();
        Ok(Response::new(pb::SearchDeltasResponse { deltas }))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference, tag = %req.get_ref().tag))]
    async fn set_tag(
        &self,
        req: Request<pb::SetTagRequest>,
    ) -> Result<Response<pb::SetTagResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        check_tag(&req.tag).map_err(Error::from)?;
        let target = self
            .resolve_checked(&caller, &req.reference, Scope::Write)
            .await?;
        let (repo, tag, version) = (target.repository.clone(), req.tag.clone(), target.version);
        let expected = req.expected_version;
        let previous = self
            .meta(move |m| m.set_tag(&repo, &tag, version, expected, now()))
            .await?;
        tracing::info!(version, previous, "tag set");
        self.record(
            &caller,
            "tag",
            &format!("{}:{} -> v{version}", target.repository, req.tag),
            &target.digest.to_string(),
        )
        .await?;
        Ok(Response::new(pb::SetTagResponse {
            repository: target.repository.to_string(),
            tag: req.tag,
            version,
            previous_version: previous,
        }))
    }

    async fn delete_tag(
        &self,
        req: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let repo: Repository = req.repository.parse().map_err(Error::from)?;
        self.authorize(&caller, repo.namespace(), Scope::Write)
            .await?;
        check_tag(&req.tag).map_err(Error::from)?;
        let (r, tag) = (repo.clone(), req.tag.clone());
        let deleted = self.meta(move |m| m.delete_tag(&r, &tag)).await?;
        if deleted {
            self.record(&caller, "untag", &format!("{repo}:{}", req.tag), "")
                .await?;
        }
        Ok(Response::new(pb::DeleteTagResponse { deleted }))
    }

    async fn yank_version(
        &self,
        req: Request<pb::YankVersionRequest>,
    ) -> Result<Response<pb::YankVersionResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let target = self
            .resolve_checked(&caller, &req.reference, Scope::Admin)
            .await?;
        let (repo, version, yanked) = (target.repository.clone(), target.version, !req.undo);
        let tags = self.meta(move |m| m.yank(&repo, version, yanked)).await?;
        let action = if req.undo { "unyank" } else { "yank" };
        self.record(
            &caller,
            action,
            &format!("{}:v{version}", target.repository),
            &target.digest.to_string(),
        )
        .await?;
        Ok(Response::new(pb::YankVersionResponse {
            repository: target.repository.to_string(),
            version,
            tags,
        }))
    }

    async fn delete_version(
        &self,
        req: Request<pb::DeleteVersionRequest>,
    ) -> Result<Response<pb::DeleteVersionResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let target = self
            .resolve_checked(&caller, &req.reference, Scope::Admin)
            .await?;
        let (repo, version) = (target.repository.clone(), target.version);
        self.meta(move |m| m.delete_version(&repo, version, now()))
            .await?;
        self.record(
            &caller,
            "delete",
            &format!("{}:v{version}", target.repository),
            &target.digest.to_string(),
        )
        .await?;
        Ok(Response::new(pb::DeleteVersionResponse {
            repository: target.repository.to_string(),
            version,
        }))
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let caller = self.caller(&req).await?;
        // Garbage is global: only an admin of every namespace may collect it.
        caller.check("*", Scope::Admin, false)?;
        let req = req.into_inner();
        let grace = if req.grace_seconds == 0 {
            self.inner.config.gc_grace
        } else {
            std::time::Duration::from_secs(req.grace_seconds)
        };
        let report = {
            let _exclusive = self.inner.gc_lock.write().await;
            crate::maintenance::collect_garbage(
                self.inner.meta.clone(),
                &self.inner.blobs,
                grace,
                req.dry_run,
                now(),
            )
            .await?
        };
        if !req.dry_run {
            self.record(
                &caller,
                "gc",
                &format!("{} blobs", report.removed.len()),
                "",
            )
            .await?;
        }
        Ok(Response::new(pb::CollectGarbageResponse {
            blobs: report.removed.len() as u64,
            bytes: report.bytes,
            digests: report.removed.iter().map(ToString::to_string).collect(),
            dry_run: report.dry_run,
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        if req.spec.len() > self.inner.config.max_manifest_bytes {
            return Err(Error::LimitExceeded(format!(
                "job spec is {} bytes; the limit is {}",
                req.spec.len(),
                self.inner.config.max_manifest_bytes
            ))
            .into());
        }
        let mut spec: serde_json::Value = serde_json::from_str(&req.spec)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| Error::InvalidArgument("job spec is not a JSON object".into()))?;
        // The base the job runs on, so it waits for a worker that holds it.
        let (repository, namespace, base) = match req.kind.as_str() {
            "train" => {
                let repo: Repository = req.repository.parse().map_err(Error::from)?;
                self.authorize(&caller, repo.namespace(), Scope::Write)
                    .await?;
                for t in &req.tags {
                    check_tag(t).map_err(Error::from)?;
                }
                let base = match &spec["base"] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(fp) => {
                        let fp: Digest = fp.parse().map_err(|_| {
                            Error::InvalidArgument(
                                "job spec field base must be a base fingerprint (blake3:…)".into(),
                            )
                        })?;
                        if self
                            .visible_bases(&caller, &fp.to_string())
                            .await?
                            .is_empty()
                        {
                            return Err(Error::NotFound {
                                what: "base",
                                name: fp.to_string(),
                            }
                            .into());
                        }
                        fp.to_string()
                    }
                    _ => {
                        return Err(Error::InvalidArgument(
                            "job spec field base must be a base fingerprint (blake3:…)".into(),
                        )
                        .into());
                    }
                };
                (repo.to_string(), repo.namespace().to_owned(), base)
            }
            "verify" => {
                let r = self
                    .resolve_checked(&caller, &req.repository, Scope::Read)
                    .await?;
                spec["manifest"] = serde_json::Value::String(r.digest.to_string());
                let base = Manifest::from_json(&r.manifest)
                    .map(|m| m.base.fingerprint.to_string())
                    .unwrap_or_default();
                (
                    format!("{}:v{}", r.repository, r.version),
                    r.repository.namespace().to_owned(),
                    base,
                )
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "job kind {:?} is not train or verify",
                    excerpt(other)
                ))
                .into());
            }
        };
        // Whatever the worker will read on the submitter's behalf must be the submitter's
        // to read: the datasets (a digest only another namespace holds is as absent as one
        // nobody holds) and the parent deltas.
        let (datasets, parents) = job_inputs(&spec, &req.blobs)?;
        let visible = self.visible_blobs(&caller, datasets.clone()).await?;
        if let Some(d) = datasets.iter().find(|d| !visible.contains_key(d)) {
            return Err(Error::NotFound {
                what: "blob",
                name: d.to_string(),
            }
            .into());
        }
        for p in &parents {
            self.resolve_checked(&caller, p, Scope::Read).await?;
        }
        let (kind, tags, submitter) = (req.kind.clone(), req.tags.clone(), caller.token_id());
        let spec = spec.to_string();
        let job = self
            .meta(move |m| {
                m.submit_job(
                    &kind,
                    &spec,
                    &repository,
                    &namespace,
                    &base,
                    &tags,
                    submitter,
                    now(),
                )
            })
            .await?;
        tracing::info!(job = job.id, kind = %job.kind, repository = %job.repository, "job queued");
        self.inner.jobs_submitted.notify_waiters();
        self.record(&caller, "submit-job", &job.repository, &job.id.to_string())
            .await?;
        Ok(Response::new(job_info(job)))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        Ok(Response::new(
            self.job_snapshot(&caller, req.id, req.after).await?,
        ))
    }

    type WatchJobStream = BoxStream<pb::GetJobResponse>;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        // Refusals (a job the caller may not see) come before the stream starts.
        let first = self.job_snapshot(&caller, req.id, req.after).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut snapshot = first;
            let mut last: Option<(String, u32)> = None;
            let mut seen = req.after;
            loop {
                let Some(job) = snapshot.job.clone() else {
                    return;
                };
                seen = snapshot.events.last().map_or(seen, |e| e.seq.max(seen));
                let state = (job.state.clone(), job.attempts);
                let changed = last.as_ref() != Some(&state) || !snapshot.events.is_empty();
                let ended = matches!(job.state.as_str(), "succeeded" | "failed");
                if changed && tx.send(Ok(snapshot)).await.is_err() {
                    return; // the watcher went away
                }
                if ended {
                    return;
                }
                last = Some(state);
                // Woken by a change on this replica, or once a second for the others'.
                let changed = this.inner.jobs_changed.notified();
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    () = tx.closed() => return,
                }
                snapshot = match this.job_snapshot(&caller, req.id, seen).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_job(
        &self,
        req: Request<pb::LeaseJobRequest>,
    ) -> Result<Response<pb::LeaseJobResponse>, Status> {
        let caller = self.caller(&req).await?;
        let scope = caller.worker_scope()?;
        let req = req.into_inner();
        // Refused now, not after the work: a worker that may not publish asks for
        // training jobs in vain.
        if !scope.train && req.kinds.iter().any(|k| k == "train") {
            return Err(Error::PermissionDenied(format!(
                "{} has read scope: it runs verify jobs only; training jobs publish deltas and need a worker token with --scope write",
                caller.describe()
            ))
            .into());
        }
        let mut bases = Vec::with_capacity(req.bases.len());
        for b in &req.bases {
            bases.push(b.parse::<Digest>().map_err(Error::from)?.to_string());
        }
        let secs = i64::from(lease_seconds(req.lease_seconds));
        let lease = uuid::Uuid::new_v4().to_string();
        // An idle worker waits here instead of asking again and again: one lease attempt
        // now, then one when a job is submitted to this replica or a second has passed
        // (a lease expiring, a job submitted elsewhere), until the wait is over.
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_secs(u64::from(req.wait_seconds.min(60)));
        let job = loop {
            let submitted = self.inner.jobs_submitted.notified();
            let (worker, kinds, bases, scope, l) = (
                req.worker.clone(),
                req.kinds.clone(),
                bases.clone(),
                scope.clone(),
                lease.clone(),
            );
            let t = now();
            let job = self
                .meta(move |m| m.lease_job(&worker, &kinds, &bases, &scope, &l, t, t + secs))
                .await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if job.is_some() || left.is_zero() {
                break job;
            }
            let _ =
                tokio::time::timeout(left.min(std::time::Duration::from_secs(1)), submitted).await;
        };
        if let Some(j) = &job {
            tracing::info!(job = j.id, worker = %excerpt(&req.worker), attempt = j.attempts, "job leased");
            self.inner.jobs_changed.notify_waiters();
        }
        Ok(Response::new(pb::LeaseJobResponse {
            job: job.map(job_info),
            lease: lease.to_string(),
        }))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let caller = self.caller(&req).await?;
        let scope = caller.worker_scope()?;
        let req = req.into_inner();
        let t = now();
        let expires = t + i64::from(lease_seconds(req.lease_seconds));
        self.meta(move |m| m.renew_lease(req.id, &req.lease, &scope, t, expires))
            .await?;
        Ok(Response::new(pb::RenewLeaseResponse { expires }))
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let caller = self.caller(&req).await?;
        let scope = caller.worker_scope()?;
        let req = req.into_inner();
        if req.body.len() > 64 << 10 {
            return Err(Error::LimitExceeded("progress events are at most 64 KiB".into()).into());
        }
        self.meta(move |m| m.report_progress(req.id, &req.lease, &scope, &req.body, now()))
            .await?;
        self.inner.jobs_changed.notify_waiters();
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn complete_job(
        &self,
        req: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let caller = self.caller(&req).await?;
        let scope = caller.worker_scope()?;
        let req = req.into_inner();
        let id = req.id;
        let not_found = || Error::NotFound {
            what: "job",
            name: id.to_string(),
        };
        // Another namespace's job is as absent as a missing one, before anything else.
        let job = self
            .meta(move |m| m.get_job(id))
            .await?
            .filter(|j| scope.covers(&j.namespace))
            .ok_or_else(not_found)?;
        let lease = req.lease.clone();
        let done = if !req.error.is_empty() {
            let msg = req.error.clone();
            self.meta(move |m| m.complete_job(id, &lease, &scope, &Completion::Failed(&msg), now()))
                .await?
        } else if job.kind == "train" {
            // Publishing needs write on the job's namespace (checked again at lease time).
            self.authorize(&caller, &job.namespace, Scope::Write)
                .await?;
            if req.manifest.len() > self.inner.config.max_manifest_bytes {
                return Err(Error::LimitExceeded(format!(
                    "manifest is {} bytes; the limit is {}",
                    req.manifest.len(),
                    self.inner.config.max_manifest_bytes
                ))
                .into());
            }
            let manifest = Manifest::from_json(&req.manifest).map_err(Error::from)?;
            check_against_job(&job, &manifest)?;
            self.validate(&manifest, &caller).await?;
            let body = manifest.canonical_json();
            self.meta(move |m| {
                m.complete_job(
                    id,
                    &lease,
                    &scope,
                    &Completion::Trained {
                        manifest: &manifest,
                        body: &body,
                    },
                    now(),
                )
            })
            .await?
        } else {
            let spec: serde_json::Value = serde_json::from_str(&job.spec).unwrap_or_default();
            let digest = spec["manifest"].as_str().unwrap_or_default().to_owned();
            serde_json::from_str::<serde_json::Value>(&req.report)
                .map_err(|e| Error::InvalidArgument(format!("report is not JSON: {e}")))?;
            let report = req.report.clone();
            self.meta(move |m| {
                m.complete_job(
                    id,
                    &lease,
                    &scope,
                    &Completion::Verified {
                        manifest: &digest,
                        report: &report,
                    },
                    now(),
                )
            })
            .await?
        };
        tracing::info!(job = id, state = %done.state, error = %excerpt(&done.error), "job completed");
        self.inner.jobs_changed.notify_waiters();
        self.record(
            &caller,
            "complete-job",
            &done.repository,
            &done.id.to_string(),
        )
        .await?;
        Ok(Response::new(job_info(done)))
    }

    async fn list_reports(
        &self,
        req: Request<pb::ListReportsRequest>,
    ) -> Result<Response<pb::ListReportsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let r = self
            .resolve_checked(&caller, &req.reference, Scope::Read)
            .await?;
        let digest = r.digest.to_string();
        let rows = self.meta(move |m| m.list_reports(&digest)).await?;
        Ok(Response::new(pb::ListReportsResponse {
            reports: rows
                .into_iter()
                .map(|r| pb::Report {
                    manifest: r.manifest,
                    at: r.at,
                    job: r.job,
                    body: r.body,
                })
                .collect(),
        }))
    }
}

/// What a job spec makes a worker read: the dataset blobs (`train`, `eval`, and every
/// digest the request lists in `blobs`) and the parent deltas (`parents`, references).
fn job_inputs(spec: &serde_json::Value, listed: &[String]) -> Result<(Vec<Digest>, Vec<String>)> {
    let mut datasets = Vec::new();
    for d in listed {
        datasets.push(d.parse::<Digest>()?);
    }
    for key in ["train", "eval"] {
        match &spec[key] {
            serde_json::Value::Null => {}
            serde_json::Value::String(d) => datasets.push(d.parse::<Digest>()?),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "job spec field {key} must be a blob digest"
                )));
            }
        }
    }
    datasets.sort_by_key(ToString::to_string);
    datasets.dedup();
    let parents = match &spec["parents"] {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|p| {
                p.as_str().map(str::to_owned).ok_or_else(|| {
                    Error::InvalidArgument("job spec parents must be references".into())
                })
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(Error::InvalidArgument(
                "job spec parents must be a list of references".into(),
            ));
        }
    };
    Ok((datasets, parents))
}

/// A trained delta must be what its job asked for: on the job's base, on top of the
/// job's parents (those the job names by digest must be among the manifest's).
fn check_against_job(job: &JobRow, manifest: &Manifest) -> Result<()> {
    let spec: serde_json::Value = serde_json::from_str(&job.spec).unwrap_or_default();
    if let Some(base) = spec["base"].as_str()
        && base != manifest.base.fingerprint.to_string()
    {
        return Err(Error::InvalidArgument(format!(
            "job {} trains on base {}, but the manifest's base is {}",
            job.id,
            excerpt(base),
            manifest.base.fingerprint
        )));
    }
    // The manifest lists each parent's whole chain (ancestors first), so it holds at least
    // the job's parents, and every one the job named by digest.
    let parents: Vec<&str> = spec["parents"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    if manifest.parents.len() < parents.len() {
        return Err(Error::InvalidArgument(format!(
            "job {} trains on {} parent(s), but the manifest names {}",
            job.id,
            parents.len(),
            manifest.parents.len()
        )));
    }
    for want in &parents {
        if let Some((_, digest)) = want.split_once('@')
            && !manifest
                .parents
                .iter()
                .any(|p| p.digest.to_string() == digest)
        {
            return Err(Error::InvalidArgument(format!(
                "job {} trains on parent {}, which the manifest does not name",
                job.id,
                excerpt(want)
            )));
        }
    }
    Ok(())
}

/// A lease length: the worker's request within 1 s..1 h (default 60 s).
fn lease_seconds(asked: u32) -> u32 {
    if asked == 0 { 60 } else { asked.clamp(1, 3600) }
}

fn job_info(j: JobRow) -> pb::JobInfo {
    pb::JobInfo {
        id: j.id,
        kind: j.kind,
        state: j.state,
        spec: j.spec,
        repository: j.repository,
        tags: j.tags,
        attempts: j.attempts,
        worker: j.worker,
        result: j.result,
        error: j.error,
        created: j.created,
        updated: j.updated,
        lease_expires: j.lease_expires,
    }
}
