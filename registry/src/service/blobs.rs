//! Blob handlers: resumable uploads (hashed while they stream, committed only when the
//! digest matches), verified downloads, and which of a manifest's blobs are missing.

use bytes::Bytes;
use delta_proto::{self as pb, Digest, excerpt};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{BoxStream, RegistryService, actor};
use crate::auth::{Caller, Scope};
use crate::error::{Error, Result};
use crate::uploads::{Holder, Progress};

impl RegistryService {
    pub(super) async fn commit_blob(
        &self,
        digest: Digest,
        size: u64,
        caller: &Caller,
    ) -> Result<()> {
        let (ns, who) = (caller.blob_namespace().map(str::to_owned), actor(caller));
        self.meta(move |m| m.store_blob(&digest, size, ns.as_deref(), &who))
            .await?;
        tracing::info!(digest = %digest, bytes = size, "blob stored");
        Ok(())
    }
}

#[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
pub(super) async fn start_upload(
    svc: &RegistryService,
    req: Request<pb::StartUploadRequest>,
) -> Result<Response<pb::StartUploadResponse>, Status> {
    let caller = svc.caller(&req).await?;
    caller.check_any(Scope::Write)?;
    let peer = req.remote_addr().map(|a| a.ip());
    let req = req.into_inner();
    let digest: Digest = req.digest.parse().map_err(Error::from)?;
    if req.size > svc.inner.config.max_blob_bytes {
        return Err(Error::LimitExceeded(format!(
            "blob {digest} is {} bytes; the limit is {}",
            req.size, svc.inner.config.max_blob_bytes
        ))
        .into());
    }
    // A blob another team stored is not "present" for this caller: it must send the
    // bytes, so dedup never reveals what others hold.
    let visible = svc.visible_blobs(&caller, vec![digest]).await?;
    if visible
        .get(&digest)
        .is_some_and(|b| b.size == req.size && !b.corrupt)
    {
        // Refresh: a re-upload counts as a new reference (git's freshen rule).
        svc.commit_blob(digest, req.size, &caller).await?;
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
        svc.inner.blobs.put_small(&digest, Bytes::new()).await?;
        svc.commit_blob(digest, 0, &caller).await?;
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
    let uploads = &svc.inner.uploads;
    let started = match uploads
        .start(&svc.inner.blobs, digest, req.size, who.clone())
        .await
    {
        // At a cap, sessions past their TTLs (the janitor runs once a minute) give their
        // slots back first, so an abandoned empty session holds one for `empty_upload_ttl`
        // at most.
        Err(Error::LimitExceeded(_)) if svc.expire_uploads().await > 0 => {
            uploads.start(&svc.inner.blobs, digest, req.size, who).await
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

pub(super) async fn upload_blob(
    svc: &RegistryService,
    req: Request<Streaming<pb::UploadChunk>>,
) -> Result<Response<pb::UploadBlobResponse>, Status> {
    // Checked before any byte is read or stored.
    let caller = svc.caller(&req).await?;
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
    let mut session = svc.inner.uploads.acquire(&first.upload_id)?;
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
                let _commit = svc.inner.gc_lock.read().await;
                let id = session.id.clone();
                let result = session.commit(&svc.inner.blobs).await;
                svc.inner.uploads.remove(&id);
                if !result? {
                    tracing::debug!(digest = %session.digest, "a racing upload stored the same bytes first");
                }
                let (digest, size) = (session.digest, session.size);
                svc.commit_blob(digest, size, &caller).await?;
                let idle = svc.inner.config.stream_idle_timeout;
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
                svc.inner.uploads.remove(&session.id);
                return Err(e.into());
            }
        }
        // A broken stream leaves the session parked for a resume.
        let idle = svc.inner.config.stream_idle_timeout;
        chunk = match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                session.park();
                return Err(crate::error::message_limit_status(e.code(), e.message()).unwrap_or(e));
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

pub(super) async fn get_upload(
    svc: &RegistryService,
    req: Request<pb::GetUploadRequest>,
) -> Result<Response<pb::GetUploadResponse>, Status> {
    let caller = svc.caller(&req).await?;
    caller.check_any(Scope::Write)?;
    let (digest, size, offset) = svc
        .inner
        .uploads
        .status(&req.get_ref().upload_id, caller.blob_namespace())?;
    Ok(Response::new(pb::GetUploadResponse {
        digest: digest.to_string(),
        size,
        offset,
    }))
}

pub(super) async fn download_blob(
    svc: &RegistryService,
    req: Request<pb::DownloadBlobRequest>,
) -> Result<Response<BoxStream<pb::BlobChunk>>, Status> {
    let pieces = blob_pieces(svc, req).await?;
    Ok(Response::new(Box::pin(pieces.map(|piece| {
        piece.map(|(offset, data)| pb::BlobChunk { offset, data })
    }))))
}

/// What [`blob_pieces`] streams: each piece's offset in the blob and its bytes, or the
/// status that ends the stream.
pub(super) type Pieces = ReceiverStream<Result<(u64, Bytes), Status>>;

/// A verified download for its caller: `(offset, bytes)` pieces of at most
/// [`delta_proto::CHUNK_SIZE`] from the request's offset on, ending in `DATA_LOSS` instead
/// of a clean end if the stored bytes do not hash to the digest. Both the generated
/// `DownloadBlob` handler and the one that writes the wire itself
/// ([`super::download::Downloads`]) serve these.
#[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
pub(super) async fn blob_pieces(
    svc: &RegistryService,
    req: Request<pb::DownloadBlobRequest>,
) -> Result<Pieces, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    let digest: Digest = req.digest.parse().map_err(Error::from)?;
    let not_found = || Error::NotFound {
        what: "blob",
        name: digest.to_string(),
    };
    // A blob the caller may not see is answered exactly like one nobody has.
    let blob = *svc
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
    let mut source = svc.inner.blobs.stream(&digest, size, 8 << 20);
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
                if tx.send(Ok((at, piece))).await.is_err() {
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
    Ok(ReceiverStream::new(rx))
}

pub(super) async fn missing_blobs(
    svc: &RegistryService,
    req: Request<pb::MissingBlobsRequest>,
) -> Result<Response<pb::MissingBlobsResponse>, Status> {
    let caller = svc.caller(&req).await?;
    caller.check_any(Scope::Read)?;
    let digests: Vec<Digest> = req
        .into_inner()
        .digests
        .iter()
        .map(|d| d.parse::<Digest>())
        .collect::<Result<_, _>>()
        .map_err(Error::from)?;
    let present = svc.visible_blobs(&caller, digests.clone()).await?;
    let missing = digests
        .iter()
        .filter(|d| present.get(d).is_none_or(|b| b.corrupt))
        .map(ToString::to_string)
        .collect();
    Ok(Response::new(pb::MissingBlobsResponse { missing }))
}
