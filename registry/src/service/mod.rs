//! [`RegistryService`]: the gRPC `Registry` service. The only registry module that touches
//! generated types; it converts them to domain types, checks them and calls [`MetaStore`]
//! and [`BlobStore`].
//!
//! This file is the shared core: the state, who is calling and what they may do
//! (`caller`, `authorize`, `ReadFilter` for listings, `visible_blobs`), resolving a
//! reference, and the `Registry` trait, whose methods hand each call to its handler:
//! [`blobs`] (uploads, downloads), [`deltas`] (bases, manifests, names, lifecycle) and
//! [`jobs`] (the job queue).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use delta_proto::reference::Reference;
use delta_proto::registry_server::Registry;
use delta_proto::tokens::CallerKind;
use delta_proto::{self as pb, Digest, excerpt};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Scope};
use crate::blobs::BlobStore;
use crate::clock::now;
use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::meta::{Actor, BaseRecord, MetaStore, SqlMeta, StoredBlob};
use crate::uploads::Uploads;

mod blobs;
mod deltas;
mod download;
mod jobs;

pub(crate) use download::Downloads;

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
    /// Database trips in flight at most (`MetaStore::parallelism`). Calls beyond it wait
    /// here, as cheap async tasks, rather than as blocking threads queueing on the
    /// database's locks: with 32 callers resolving, p99 2.75-3.1 ms became 2.32-2.6 ms.
    trips: tokio::sync::Semaphore,
}

/// The embedded database's file name in the data dir.
pub const SQLITE_FILE: &str = "registry.sqlite";

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
        let trips = tokio::sync::Semaphore::new(meta.parallelism().max(1));
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
                trips,
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
        let _permit = self.inner.trips.acquire().await;
        tokio::task::spawn_blocking(move || f(meta.as_ref())).await?
    }

    /// Who is calling (see `admin::authenticate`).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller> {
        // No header on a registry known to be closed: anonymous, without a database trip.
        if self.inner.closed.load(std::sync::atomic::Ordering::Relaxed)
            && authorization(req)?.is_none()
        {
            return Ok(Caller::Anonymous);
        }
        Ok(self.caller_reads(req, |_, _| Ok(())).await?.0)
    }

    /// Who is calling, and `f` run as them, in one trip to the database: one blocking
    /// task, instead of one to authenticate and more to act.
    async fn caller_and<T: Send + 'static, R>(
        &self,
        req: &Request<R>,
        f: impl FnOnce(&dyn MetaStore, &Caller) -> Result<T> + Send + 'static,
    ) -> Result<(Caller, T)> {
        let (caller, out) = self.meta(self.as_caller(req, f)?).await?;
        self.note_caller(&caller);
        Ok((caller, out))
    }

    /// [`Self::caller_and`] for an `f` that only reads a few indexed rows (see
    /// [`Self::read`]).
    async fn caller_reads<T: Send + 'static, R>(
        &self,
        req: &Request<R>,
        f: impl FnOnce(&dyn MetaStore, &Caller) -> Result<T> + Send + 'static,
    ) -> Result<(Caller, T)> {
        let (caller, out) = self.read(self.as_caller(req, f)?).await?;
        self.note_caller(&caller);
        Ok((caller, out))
    }

    /// `f`, which only reads, and only a few indexed rows: run here on the async thread
    /// where the store's reads never wait on a writer (a SQLite file, see `sql::Sqlite`),
    /// else as a database trip. Handing a call to the blocking pool and back cost a
    /// resolve more than its SQL did (two thread wake-ups; on 2 cores, a median of 14 400
    /// resolves/s against 22 000 inline: README). `f` holds this thread while it runs; a
    /// write inside it fails (`sql::inline`). Listings, which grow with the registry, stay
    /// trips.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn MetaStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if self.inner.meta.reads_inline() {
            crate::sql::inline(|| f(self.inner.meta.as_ref()))
        } else {
            self.meta(f).await
        }
    }

    /// `f` run after authenticating the request's token, as one database call.
    fn as_caller<T, R>(
        &self,
        req: &Request<R>,
        f: impl FnOnce(&dyn MetaStore, &Caller) -> Result<T> + Send + 'static,
    ) -> Result<impl FnOnce(&dyn MetaStore) -> Result<(Caller, T)> + Send + 'static> {
        let header = authorization(req)?;
        let closed = self.inner.closed.load(std::sync::atomic::Ordering::Relaxed);
        Ok(move |m: &dyn MetaStore| {
            let caller = if header.is_none() && closed {
                Caller::Anonymous
            } else {
                crate::admin::authenticate(m, header.as_deref(), now())?
            };
            let out = f(m, &caller)?;
            Ok((caller, out))
        })
    }

    /// A registry that named a caller other than `Open` has tokens, and always will.
    fn note_caller(&self, caller: &Caller) {
        if *caller != Caller::Open {
            self.inner
                .closed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Checks `need` on the namespace of `repo`.
    async fn authorize(&self, caller: &Caller, namespace: &str, need: Scope) -> Result<()> {
        if matches!(caller, Caller::Open) {
            return Ok(());
        }
        let (c, ns) = (caller.clone(), namespace.to_owned());
        self.read(move |m| authorize_in(m, &c, &ns, need)).await
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
        self.read(move |m| m.visible_blobs(&digests, &viewer)).await
    }

    /// Resolves a reference after checking `need` on its namespace, so a refusal says
    /// nothing about whether the reference exists.
    async fn resolve_checked(
        &self,
        caller: &Caller,
        reference: &str,
        need: Scope,
    ) -> Result<crate::meta::Resolved> {
        let (c, reference) = (caller.clone(), reference.to_owned());
        self.read(move |m| resolve_checked_in(m, &c, &reference, need))
            .await
    }
}

/// The `authorization` header's value, if any.
fn authorization<T>(req: &Request<T>) -> Result<Option<String>> {
    match req.metadata().get("authorization") {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.to_str()
                .map_err(|_| Error::Unauthenticated("the authorization header is not text".into()))?
                .to_owned(),
        )),
    }
}

/// `caller`, now: whom the audit row of a change names (written by the store in the
/// change's own transaction).
fn actor(caller: &Caller) -> Actor {
    Actor {
        token: caller.token_id(),
        at: now(),
    }
}

/// What a caller may read, decided inside one database trip: each namespace's public flag
/// is asked of the store once, however many listed rows name it (a listing costs one trip,
/// not one per row).
struct ReadFilter<'a> {
    m: &'a dyn MetaStore,
    caller: &'a Caller,
    public: HashMap<String, bool>,
}

impl<'a> ReadFilter<'a> {
    fn new(m: &'a dyn MetaStore, caller: &'a Caller) -> Self {
        Self {
            m,
            caller,
            public: HashMap::new(),
        }
    }

    /// Whether the caller may read repositories of `namespace`.
    fn namespace(&mut self, namespace: &str) -> Result<bool> {
        if self.caller.covers(namespace) {
            return Ok(true);
        }
        let public = match self.public.get(namespace) {
            Some(&p) => p,
            None => {
                let p = self.m.is_public(namespace)?;
                self.public.insert(namespace.to_owned(), p);
                p
            }
        };
        Ok(self.caller.check(namespace, Scope::Read, public).is_ok())
    }

    /// Whether the caller may read a base record registered under `name`: a
    /// `namespace/name` like that namespace's repositories, a global name with any token
    /// (anonymous callers see the bases of public namespaces only).
    fn base(&mut self, name: &str) -> Result<bool> {
        match name.split_once('/') {
            Some((ns, _)) => self.namespace(ns),
            None => Ok(!matches!(self.caller, Caller::Anonymous)),
        }
    }

    /// The items `allowed` passes, in order.
    fn retain<T>(
        &mut self,
        items: Vec<T>,
        allowed: impl Fn(&mut Self, &T) -> Result<bool>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if allowed(self, &item)? {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// The items whose namespace (`of`) the caller may read, in order.
    fn keep<T>(&mut self, items: Vec<T>, of: impl Fn(&T) -> &str) -> Result<Vec<T>> {
        self.retain(items, |f, item| f.namespace(of(item)))
    }

    /// The base records the caller may read, in order.
    fn bases(&mut self, records: Vec<BaseRecord>) -> Result<Vec<BaseRecord>> {
        self.retain(records, |f, b| f.base(&b.name))
    }
}

/// Checks `need` on `namespace` for `caller` (inside a database trip).
fn authorize_in(m: &dyn MetaStore, caller: &Caller, namespace: &str, need: Scope) -> Result<()> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    caller.check(namespace, need, m.is_public(namespace)?)
}

/// [`RegistryService::resolve_checked`] inside a database trip: `need` on the reference's
/// namespace first, so a refusal says nothing about whether the reference exists.
fn resolve_checked_in(
    m: &dyn MetaStore,
    caller: &Caller,
    reference: &str,
    need: Scope,
) -> Result<crate::meta::Resolved> {
    let parsed: Reference = reference.parse()?;
    let repo = parsed.repository.clone();
    authorize_in(m, caller, repo.namespace(), need)?;
    let latest =
        parsed.selector == delta_proto::Selector::Tag(delta_proto::reference::LATEST.into());
    if let Some(r) = m.resolve(&parsed)? {
        return Ok(r);
    }
    // `latest` of a repository whose versions are all yanked: say so (the caller may read
    // the namespace) rather than "not found".
    if latest && let Some((count, newest)) = m.all_yanked(&repo)? {
        return Err(Error::NotFound {
            what: "live version of",
            name: format!(
                "{repo}: all {count} of its versions are yanked; pull one by number ({repo}:v{newest}) or un-yank it"
            ),
        });
    }
    Err(Error::NotFound {
        what: "reference",
        name: excerpt(reference),
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn start_upload(
        &self,
        req: Request<pb::StartUploadRequest>,
    ) -> Result<Response<pb::StartUploadResponse>, Status> {
        blobs::start_upload(self, req).await
    }

    async fn upload_blob(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadBlobResponse>, Status> {
        blobs::upload_blob(self, req).await
    }

    async fn get_upload(
        &self,
        req: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::GetUploadResponse>, Status> {
        blobs::get_upload(self, req).await
    }

    type DownloadBlobStream = BoxStream<pb::BlobChunk>;

    async fn download_blob(
        &self,
        req: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        blobs::download_blob(self, req).await
    }

    async fn missing_blobs(
        &self,
        req: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        blobs::missing_blobs(self, req).await
    }

    async fn add_base(
        &self,
        req: Request<pb::AddBaseRequest>,
    ) -> Result<Response<pb::AddBaseResponse>, Status> {
        deltas::add_base(self, req).await
    }

    async fn get_base(
        &self,
        req: Request<pb::GetBaseRequest>,
    ) -> Result<Response<pb::BaseRecord>, Status> {
        deltas::get_base(self, req).await
    }

    async fn list_bases(
        &self,
        req: Request<pb::ListBasesRequest>,
    ) -> Result<Response<pb::ListBasesResponse>, Status> {
        deltas::list_bases(self, req).await
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = self.caller(&req).await?;
        Ok(Response::new(match caller {
            Caller::Open => pb::WhoAmIResponse {
                kind: CallerKind::Open.to_string(),
                namespace: "*".into(),
                scope: Scope::Admin.to_string(),
                ..Default::default()
            },
            Caller::Anonymous => pb::WhoAmIResponse {
                kind: CallerKind::Anonymous.to_string(),
                ..Default::default()
            },
            Caller::Token(p) => pb::WhoAmIResponse {
                kind: CallerKind::from(p.kind).to_string(),
                token_id: p.token_id as u64,
                namespace: p.namespace,
                scope: p.scope.to_string(),
                expires_at: p.expires_at.unwrap_or(0),
            },
        }))
    }

    async fn push_manifest(
        &self,
        req: Request<pb::PushManifestRequest>,
    ) -> Result<Response<pb::PushManifestResponse>, Status> {
        deltas::push_manifest(self, req).await
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        deltas::resolve(self, req).await
    }

    async fn list_repositories(
        &self,
        req: Request<pb::ListRepositoriesRequest>,
    ) -> Result<Response<pb::ListRepositoriesResponse>, Status> {
        deltas::list_repositories(self, req).await
    }

    async fn list_versions(
        &self,
        req: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        deltas::list_versions(self, req).await
    }

    async fn search_deltas(
        &self,
        req: Request<pb::SearchDeltasRequest>,
    ) -> Result<Response<pb::SearchDeltasResponse>, Status> {
        deltas::search_deltas(self, req).await
    }

    async fn set_tag(
        &self,
        req: Request<pb::SetTagRequest>,
    ) -> Result<Response<pb::SetTagResponse>, Status> {
        deltas::set_tag(self, req).await
    }

    async fn delete_tag(
        &self,
        req: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        deltas::delete_tag(self, req).await
    }

    async fn yank_version(
        &self,
        req: Request<pb::YankVersionRequest>,
    ) -> Result<Response<pb::YankVersionResponse>, Status> {
        deltas::yank_version(self, req).await
    }

    async fn delete_version(
        &self,
        req: Request<pb::DeleteVersionRequest>,
    ) -> Result<Response<pb::DeleteVersionResponse>, Status> {
        deltas::delete_version(self, req).await
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        deltas::collect_garbage(self, req).await
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        jobs::submit_job(self, req).await
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        jobs::get_job(self, req).await
    }

    type WatchJobStream = BoxStream<pb::GetJobResponse>;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        jobs::watch_job(self, req).await
    }

    async fn lease_job(
        &self,
        req: Request<pb::LeaseJobRequest>,
    ) -> Result<Response<pb::LeaseJobResponse>, Status> {
        jobs::lease_job(self, req).await
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        jobs::renew_lease(self, req).await
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        jobs::report_progress(self, req).await
    }

    async fn complete_job(
        &self,
        req: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        jobs::complete_job(self, req).await
    }

    async fn list_reports(
        &self,
        req: Request<pb::ListReportsRequest>,
    ) -> Result<Response<pb::ListReportsResponse>, Status> {
        jobs::list_reports(self, req).await
    }
}
