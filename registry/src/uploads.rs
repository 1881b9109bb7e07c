//! Upload sessions: a blob streams in over one or more `UploadBlob` calls, hashed as it
//! arrives, and is committed only when all declared bytes are in and their blake3 matches.
//!
//! A session lives in memory while the registry runs, so a client whose stream broke can
//! resume from the last byte the registry received (ask with `GetUpload`, or `StartUpload`
//! again with the same digest). A registry restart forgets sessions: the client then gets
//! `NOT_FOUND` for its upload and starts over; a half-written blob is never visible either
//! way (RELIABILITY.md B10).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use delta_proto::Digest;
use object_store::WriteMultipart;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::blobs::{BlobStore, Staging};
use crate::error::{Error, Result};

/// Part size for multipart writes: ≥ 5 MiB, the S3 minimum for non-final parts.
const PART_SIZE: usize = 8 << 20;
/// Parts written concurrently per upload.
const PART_CONCURRENCY: usize = 4;

/// One upload in progress.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    pub(crate) received: u64,
    hasher: blake3::Hasher,
    writer: Option<WriteMultipart>,
    /// Where the bytes wait to be published under the digest.
    staging: Staging,
    last_active: Instant,
    /// The namespace of the token that opened it (`None`: open registry or `*` token). Only
    /// the same owner may resume it.
    pub(crate) owner: Option<String>,

    /// True once a stream on it ended before completion: only then may another
    /// `StartUpload` for the same digest pick it up (and claim it, clearing the flag).
    parked: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("digest", &self.digest)
            .field("received", &self.received)
            .finish()
    }
}

/// What happened to the bytes of one chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More bytes are expected.
    Partial,
    /// All bytes arrived and matched: the caller must [`Session::commit`].
    Complete,
}

impl Session {
    /// Appends a chunk that must start at `offset`.
    pub(crate) async fn append(&mut self, offset: u64, data: Bytes) -> Result<Progress> {
        if offset != self.received {
            return Err(Error::OutOfRange {
                upload_id: self.id.clone(),
                expected: self.received,
                got: offset,
            });
        }
        let new_total = self.received + data.len() as u64;
        if new_total > self.size {
            return Err(Error::SizeMismatch {
                digest: self.digest,
                declared: self.size,
                received: new_total,
            });
        }
        self.last_active = Instant::now();
        let writer = self.writer.as_mut().ok_or_else(|| Error::NotFound {
            what: "upload",
            name: self.id.clone(),
        })?;
        writer.wait_for_capacity(PART_CONCURRENCY).await?;
        self.hasher.update(&data);
        writer.put(data);
        self.received = new_total;
        Ok(if self.received == self.size {
            Progress::Complete
        } else {
            Progress::Partial
        })
    }

    /// Checks the digest and makes the blob visible. On a mismatch the write is aborted.
    /// Returns false when a racing upload of the same digest published it first.
    pub(crate) async fn commit(&mut self, store: &BlobStore) -> Result<bool> {
        let actual = Digest::from_hash(self.hasher.finalize());
        let writer = self.writer.take().ok_or_else(|| Error::NotFound {
            what: "upload",
            name: self.id.clone(),
        })?;
        if actual != self.digest {
            writer.abort().await?;
            return Err(Error::DigestMismatch {
                declared: self.digest,
                actual,
            });
        }
        writer.finish().await?;
        store.publish(&self.staging).await
    }

    /// Marks the session as interrupted, so a later `StartUpload` can resume it.
    pub(crate) fn park(&mut self) {
        self.parked = true;
    }

    /// Abandons the write; nothing becomes visible.
    pub(crate) async fn abort(&mut self) {
        if let Some(w) = self.writer.take()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(upload = %self.id, error = %e, "aborting an upload failed");
        }
    }
}

/// Every open upload session.
#[derive(Debug)]
pub(crate) struct Uploads {
    sessions: Mutex<HashMap<String, Arc<AsyncMutex<Session>>>>,
    /// The token of each session, readable while the session is busy.
    tokens: Mutex<HashMap<String, Option<i64>>>,
    max_open: usize,
}

impl Uploads {
    pub(crate) fn new(max_open: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            max_open,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AsyncMutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds an idle session for `digest` to resume, or opens a new one.
    pub(crate) async fn start(
        &self,
        store: &BlobStore,
        digest: Digest,
        size: u64,
        owner: Option<&str>,
        token: Option<i64>,
        per_token: usize,
    ) -> Result<(String, u64)> {
        let candidates: Vec<_> = self.map().values().cloned().collect();
        for s in candidates {
            if let Ok(mut guard) = s.try_lock()
                && guard.parked
                && guard.owner.as_deref() == owner
                && guard.digest == digest
                && guard.size == size
                && guard.writer.is_some()
            {
                guard.parked = false;
                return Ok((guard.id.clone(), guard.received));
            }
        }
        if let Some(t) = token {
            let held = self
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|x| **x == Some(t))
                .count();
            if held >= per_token {
                return Err(Error::LimitExceeded(format!(
                    "token {t} already has {held} uploads open (limit {per_token})"
                )));
            }
        }
        if self.map().len() >= self.max_open {
            return Err(Error::LimitExceeded(format!(
                "{} uploads are already open",
                self.max_open
            )));
        }
        let (staging, upload) = store.begin(&digest, size).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Session {
            id: id.clone(),
            digest,
            size,
            received: 0,
            hasher: blake3::Hasher::new(),
            writer: Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)),
            staging,
            last_active: Instant::now(),
            parked: false,
            owner: owner.map(str::to_owned),
        };
        self.map()
            .insert(id.clone(), Arc::new(AsyncMutex::new(session)));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), token);
        Ok((id, 0))
    }

    /// Takes exclusive use of a session for one stream.
    pub(crate) fn acquire(&self, id: &str) -> Result<OwnedMutexGuard<Session>> {
        let s = self.map().get(id).cloned().ok_or_else(|| Error::NotFound {
            what: "upload",
            name: id.to_owned(),
        })?;
        s.try_lock_owned().map_err(|_| Error::Busy(id.to_owned()))
    }

    /// Where a session stands, without taking it.
    pub(crate) fn status(&self, id: &str) -> Result<(Digest, u64, u64)> {
        let s = self.map().get(id).cloned().ok_or_else(|| Error::NotFound {
            what: "upload",
            name: id.to_owned(),
        })?;
        let guard = s.try_lock().map_err(|_| Error::Busy(id.to_owned()))?;
        Ok((guard.digest, guard.size, guard.received))
    }

    /// Forgets a session (after commit or failure).
    pub(crate) fn remove(&self, id: &str) {
        self.map().remove(id);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Aborts sessions idle for longer than `ttl`. Returns how many.
    pub(crate) async fn expire(&self, ttl: Duration) -> usize {
        let candidates: Vec<_> = self
            .map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (id, s) in candidates {
            let Ok(mut guard) = s.try_lock_owned() else {
                continue;
            };
            if guard.last_active.elapsed() >= ttl {
                guard.abort().await;
                self.remove(&id);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_sessions_expire_and_leave_nothing_visible() {
        let store = BlobStore::in_memory();
        let uploads = Uploads::new(8);
        let data = Bytes::from_static(b"some bytes of a blob");
        let digest = Digest::of(&data);
        let (id, _) = uploads
            .start(&store, digest, data.len() as u64, None, None, 4)
            .await
            .unwrap();
        {
            let mut s = uploads.acquire(&id).unwrap();
            assert_eq!(
                s.append(0, data.slice(..5)).await.unwrap(),
                Progress::Partial
            );
            s.park();
        }
        // Not idle long enough: kept.
        assert_eq!(uploads.expire(Duration::from_secs(3600)).await, 0);
        assert_eq!(uploads.status(&id).unwrap().2, 5);
        // Idle past the TTL: aborted and forgotten.
        assert_eq!(uploads.expire(Duration::ZERO).await, 1);
        assert!(matches!(uploads.status(&id), Err(Error::NotFound { .. })));
        assert!(!store.exists(&digest).await.unwrap());
    }

    #[tokio::test]
    async fn a_parked_session_is_resumed_only_by_its_owner() {
        let store = BlobStore::in_memory();
        let uploads = Uploads::new(8);
        let digest = Digest::of(b"x");
        let (id, _) = uploads
            .start(&store, digest, 10, Some("team-a"), Some(1), 4)
            .await
            .unwrap();
        uploads.acquire(&id).unwrap().park();
        let (other, _) = uploads
            .start(&store, digest, 10, Some("team-b"), Some(2), 4)
            .await
            .unwrap();
        assert_ne!(other, id);
        let (same, _) = uploads
            .start(&store, digest, 10, Some("team-a"), Some(1), 4)
            .await
            .unwrap();
        assert_eq!(same, id);
    }
}
