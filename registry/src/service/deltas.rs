//! Delta handlers: bases, manifests (validated against their base before a version is
//! written), resolution, listing and search, tags, yank, delete, garbage collection.

use std::collections::BTreeMap;

use bytes::Bytes;
use delta_proto::fingerprint::FingerprintEntry;
use delta_proto::manifest::{Manifest, TensorInfo};
use delta_proto::reference::{Repository, check_tag};
use delta_proto::{self as pb, Digest, excerpt};
use tonic::{Request, Response, Status};

use super::{ReadFilter, RegistryService, actor};
use crate::auth::{Caller, Scope};
use crate::clock::now;
use crate::error::{Error, Result};
use crate::meta::{BaseRecord, SearchFilter};

impl RegistryService {
    /// The records of a base name or fingerprint that the caller may read, proven ones
    /// first (one trip to the database).
    pub(super) async fn visible_bases(
        &self,
        caller: &Caller,
        key: &str,
    ) -> Result<Vec<BaseRecord>> {
        let (caller, key) = (caller.clone(), key.to_owned());
        self.meta(move |m| ReadFilter::new(m, &caller).bases(m.find_bases(&key)?))
            .await
    }

    /// A manifest as a caller sent it (a push, a trained job's result): refused over the
    /// size limit before it is parsed, then parsed and checked on its own.
    pub(super) fn parse_manifest(&self, bytes: &[u8]) -> Result<Manifest> {
        let limit = self.inner.config.max_manifest_bytes;
        if bytes.len() > limit {
            return Err(Error::LimitExceeded(format!(
                "manifest is {} bytes; the limit is {limit}",
                bytes.len()
            )));
        }
        Ok(Manifest::from_json(bytes)?)
    }

    /// Validates a manifest against the stored blobs and its registered base. The blobs
    /// must be visible to `caller`, which is checked first, in one statement: a digest
    /// only another namespace holds gets the answer of one nobody holds, before any size,
    /// header or base check could tell the two apart.
    pub(super) async fn validate(
        &self,
        manifest: &Manifest,
        caller: &Caller,
    ) -> Result<BaseRecord> {
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
    pub(super) async fn check_file(&self, f: &delta_proto::manifest::FileEntry) -> Result<()> {
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

#[tracing::instrument(skip_all, fields(name = %excerpt(&req.get_ref().name)))]
pub(super) async fn add_base(
    svc: &RegistryService,
    req: Request<pb::AddBaseRequest>,
) -> Result<Response<pb::AddBaseResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    // Who may register the name, decided before anything is looked up: a team names
    // bases in its own namespace; global names are an admin's, so no team can take a
    // popular name (or a fingerprint) from the others.
    match base_namespace(&req.name)? {
        Some(ns) => svc.authorize(&caller, &ns, Scope::Write).await?,
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
        return Err(
            Error::InvalidArgument(format!("base {} has an empty tensor table", req.name)).into(),
        );
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
    let (tensors, digests) = entries.into_iter().map(|e| (e.info, e.digest)).unzip();
    let record = BaseRecord {
        name: req.name,
        fingerprint,
        tensors,
        digests,
        created_at: now(),
    };
    let who = actor(&caller);
    let created = svc.meta(move |m| m.add_base(&record, &who)).await?;
    Ok(Response::new(pb::AddBaseResponse {
        fingerprint: fingerprint.to_string(),
        created,
    }))
}

pub(super) async fn get_base(
    svc: &RegistryService,
    req: Request<pb::GetBaseRequest>,
) -> Result<Response<pb::BaseRecord>, Status> {
    let caller = svc.caller(&req).await?;
    let key = req.into_inner().name_or_fingerprint;
    // A name's namespace is checked before the lookup, as for repositories, so a
    // refusal says nothing about whether the base exists.
    if !key.starts_with("blake3:") {
        match base_namespace(&key)? {
            Some(ns) => svc.authorize(&caller, &ns, Scope::Read).await?,
            None if matches!(caller, Caller::Anonymous) => {
                return Err(
                    Error::Unauthenticated("reading global bases needs a token".into()).into(),
                );
            }
            None => {}
        }
    }
    let base = svc
        .visible_bases(&caller, &key)
        .await?
        .into_iter()
        .next()
        .ok_or(Error::NotFound {
            what: "base",
            name: excerpt(&key),
        })?;
    Ok(Response::new(base.into()))
}

pub(super) async fn list_bases(
    svc: &RegistryService,
    req: Request<pb::ListBasesRequest>,
) -> Result<Response<pb::ListBasesResponse>, Status> {
    let (_, bases) = svc
        .caller_and(&req, |m, caller| {
            ReadFilter::new(m, caller).bases(m.list_bases()?)
        })
        .await?;
    Ok(Response::new(pb::ListBasesResponse {
        bases: bases.into_iter().map(Into::into).collect(),
    }))
}

#[tracing::instrument(skip_all, fields(repository = %req.get_ref().repository))]
pub(super) async fn push_manifest(
    svc: &RegistryService,
    req: Request<pb::PushManifestRequest>,
) -> Result<Response<pb::PushManifestResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    let repo: Repository = req.repository.parse().map_err(Error::from)?;
    svc.authorize(&caller, repo.namespace(), Scope::Write)
        .await?;
    for t in &req.tags {
        check_tag(t).map_err(Error::from)?;
    }
    let manifest = svc.parse_manifest(&req.manifest)?;
    svc.validate(&manifest, &caller).await?;
    let body = manifest.canonical_json();
    let digest = Digest::of(&body);
    let tags = req.tags.clone();
    let (r, who) = (repo.clone(), actor(&caller));
    let pushed = svc
        .meta(move |m| m.push_manifest(&r, &manifest, &body, &tags, &who))
        .await?;
    tracing::info!(repository = %repo, version = pushed.version, digest = %digest, created = pushed.created, "manifest pushed");
    Ok(Response::new(pb::PushManifestResponse {
        repository: repo.to_string(),
        version: pushed.version,
        digest: digest.to_string(),
        created: pushed.created,
    }))
}

pub(super) async fn resolve(
    svc: &RegistryService,
    req: Request<pb::ResolveRequest>,
) -> Result<Response<pb::ResolveResponse>, Status> {
    // One trip to the database: authenticate, authorise, resolve (a few indexed reads).
    let reference = req.get_ref().reference.clone();
    let (_, r) = svc
        .caller_reads(&req, move |m, caller| {
            super::resolve_checked_in(m, caller, &reference, Scope::Read)
        })
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

pub(super) async fn list_repositories(
    svc: &RegistryService,
    req: Request<pb::ListRepositoriesRequest>,
) -> Result<Response<pb::ListRepositoriesResponse>, Status> {
    // One trip: authenticate, authorise a named namespace, list, filter.
    let ns = req.get_ref().namespace.clone();
    let (_, rows) = svc
        .caller_and(&req, move |m, caller| {
            if !ns.is_empty() {
                super::authorize_in(m, caller, &ns, Scope::Read)?;
            }
            let namespace = (!ns.is_empty()).then_some(ns.as_str());
            let all = m.list_repositories(namespace, caller.blob_viewer())?;
            ReadFilter::new(m, caller).keep(all, |r| r.repository.namespace())
        })
        .await?;
    let repositories = rows.into_iter().map(Into::into).collect();
    Ok(Response::new(pb::ListRepositoriesResponse { repositories }))
}

pub(super) async fn list_versions(
    svc: &RegistryService,
    req: Request<pb::ListVersionsRequest>,
) -> Result<Response<pb::ListVersionsResponse>, Status> {
    let repo: Repository = req.get_ref().repository.parse().map_err(Error::from)?;
    let (_, rows) = svc
        .caller_and(&req, move |m, caller| {
            super::authorize_in(m, caller, repo.namespace(), Scope::Read)?;
            m.list_versions(&repo)?.ok_or(Error::NotFound {
                what: "repository",
                name: repo.to_string(),
            })
        })
        .await?;
    let versions = rows.into_iter().map(Into::into).collect();
    Ok(Response::new(pb::ListVersionsResponse { versions }))
}

/// The most annotations one search may match on.
const MAX_SEARCH_ANNOTATIONS: usize = 32;

pub(super) async fn search_deltas(
    svc: &RegistryService,
    req: Request<pb::SearchDeltasRequest>,
) -> Result<Response<pb::SearchDeltasResponse>, Status> {
    // Each annotation is a clause of the search's SQL: a bounded number of them.
    let named = req.get_ref().annotations.len();
    if named > MAX_SEARCH_ANNOTATIONS {
        return Err(Error::InvalidArgument(format!(
            "a search matches at most {MAX_SEARCH_ANNOTATIONS} annotations; this one names {named}"
        ))
        .into());
    }
    // One trip: authenticate, authorise a named namespace, search, filter.
    let q = req.get_ref().clone();
    let (_, rows) = svc
        .caller_and(&req, move |m, caller| {
            if !q.namespace.is_empty() {
                super::authorize_in(m, caller, &q.namespace, Scope::Read)?;
            }
            let base = if q.base_fingerprint.is_empty() {
                None
            } else {
                Some(q.base_fingerprint.parse::<Digest>()?)
            };
            let filter = SearchFilter {
                namespace: (!q.namespace.is_empty()).then_some(q.namespace),
                base,
                method: (!q.method.is_empty()).then_some(q.method),
                annotations: q.annotations.into_iter().collect(),
                viewer: Some(caller.blob_viewer().to_owned()),
            };
            ReadFilter::new(m, caller).keep(m.search(&filter)?, |d| d.repository.namespace())
        })
        .await?;
    let deltas = rows.into_iter().map(Into::into).collect();
    Ok(Response::new(pb::SearchDeltasResponse { deltas }))
}

#[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference, tag = %req.get_ref().tag))]
pub(super) async fn set_tag(
    svc: &RegistryService,
    req: Request<pb::SetTagRequest>,
) -> Result<Response<pb::SetTagResponse>, Status> {
    check_tag(&req.get_ref().tag).map_err(Error::from)?;
    // One trip: authenticate, resolve with write checked, move the tag (and audit it).
    let q = req.get_ref().clone();
    let (_, (target, previous)) = svc
        .caller_and(&req, move |m, caller| {
            let target = super::resolve_checked_in(m, caller, &q.reference, Scope::Write)?;
            let (repo, version) = (&target.repository, target.version);
            let previous = m.set_tag(repo, &q.tag, version, q.expected_version, &actor(caller))?;
            Ok((target, previous))
        })
        .await?;
    tracing::info!(version = target.version, previous, "tag set");
    Ok(Response::new(pb::SetTagResponse {
        repository: target.repository.to_string(),
        tag: req.into_inner().tag,
        version: target.version,
        previous_version: previous,
    }))
}

pub(super) async fn delete_tag(
    svc: &RegistryService,
    req: Request<pb::DeleteTagRequest>,
) -> Result<Response<pb::DeleteTagResponse>, Status> {
    let repo: Repository = req.get_ref().repository.parse().map_err(Error::from)?;
    let tag = req.get_ref().tag.clone();
    let (_, deleted) = svc
        .caller_and(&req, move |m, caller| {
            super::authorize_in(m, caller, repo.namespace(), Scope::Write)?;
            check_tag(&tag)?;
            m.delete_tag(&repo, &tag, &actor(caller))
        })
        .await?;
    Ok(Response::new(pb::DeleteTagResponse { deleted }))
}

pub(super) async fn yank_version(
    svc: &RegistryService,
    req: Request<pb::YankVersionRequest>,
) -> Result<Response<pb::YankVersionResponse>, Status> {
    let q = req.get_ref().clone();
    let (_, (target, tags)) = svc
        .caller_and(&req, move |m, caller| {
            let target = super::resolve_checked_in(m, caller, &q.reference, Scope::Admin)?;
            let tags = m.yank(&target.repository, target.version, !q.undo, &actor(caller))?;
            Ok((target, tags))
        })
        .await?;
    Ok(Response::new(pb::YankVersionResponse {
        repository: target.repository.to_string(),
        version: target.version,
        tags,
    }))
}

pub(super) async fn delete_version(
    svc: &RegistryService,
    req: Request<pb::DeleteVersionRequest>,
) -> Result<Response<pb::DeleteVersionResponse>, Status> {
    let reference = req.get_ref().reference.clone();
    let (_, target) = svc
        .caller_and(&req, move |m, caller| {
            let target = super::resolve_checked_in(m, caller, &reference, Scope::Admin)?;
            m.delete_version(&target.repository, target.version, &actor(caller))?;
            Ok(target)
        })
        .await?;
    Ok(Response::new(pb::DeleteVersionResponse {
        repository: target.repository.to_string(),
        version: target.version,
    }))
}

pub(super) async fn collect_garbage(
    svc: &RegistryService,
    req: Request<pb::CollectGarbageRequest>,
) -> Result<Response<pb::CollectGarbageResponse>, Status> {
    let caller = svc.caller(&req).await?;
    // Garbage is global: only an admin of every namespace may collect it.
    caller.check("*", Scope::Admin, false)?;
    let req = req.into_inner();
    let grace = if req.grace_seconds == 0 {
        svc.inner.config.gc_grace
    } else {
        std::time::Duration::from_secs(req.grace_seconds)
    };
    let report = {
        let _exclusive = svc.inner.gc_lock.write().await;
        crate::maintenance::collect_garbage(
            svc.inner.meta.clone(),
            &svc.inner.blobs,
            grace,
            req.dry_run,
            actor(&caller),
        )
        .await?
    };
    Ok(Response::new(pb::CollectGarbageResponse {
        blobs: report.removed.len() as u64,
        bytes: report.bytes,
        digests: report.removed.iter().map(ToString::to_string).collect(),
        dry_run: report.dry_run,
    }))
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
