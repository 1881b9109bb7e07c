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

/// Who opened a session, for the caps on open sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    /// The token (`None`: no token, in an open registry).
    pub(crate) token: Option<i64>,
    /// The token's namespace (`None`: open registry or `*` token).
    pub(crate) namespace: Option<String>,
    /// The peer's address, which stands for the caller when there is no token.
    pub(crate) peer: Option<std::net::IpAddr>,
}

/// How many sessions may be open at once: in all, per token (per peer address for
/// callers without a token) and per namespace, so one team (or one anonymous client of
/// an open registry) cannot take every slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) total: usize,
    pub(crate) per_token: usize,
    pub(crate) per_namespace: usize,
}

/// Every open upload session.
#[derive(Debug)]
pub(crate) struct Uploads {
    sessions: Mutex<HashMap<String, Arc<AsyncMutex<Session>>>>,
    /// Who holds each session, readable while the session is busy.
    holders: Mutex<HashMap<String, Holder>>,
    limits: Limits,
}

impl Uploads {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a new session `who` would hold beyond its caps.
    fn check_caps(&self, who: &Holder) -> Result<()> {
        let holders = self.holders();
        let count = |same: &dyn Fn(&Holder) -> bool| holders.values().filter(|h| same(h)).count();
        let l = self.limits;
        match (who.token, who.peer) {
            (Some(t), _) => {
                let held = count(&|h| h.token == Some(t));
                if held >= l.per_token {
                    return Err(Error::LimitExceeded(format!(
                        "token {t} already has {held} uploads open (limit {}); finish or abandon some first",
                        l.per_token
                    )));
                }
            }
            (None, Some(peer)) => {
                let held = count(&|h| h.token.is_none() && h.peer == Some(peer));
                if held >= l.per_token {
                    return Err(Error::LimitExceeded(format!(
                        "{peer} already has {held} uploads open without a token (limit {}); finish or abandon some first",
                        l.per_token
                    )));
                }
            }
            (None, None) => {}
        }
        if let Some(ns) = &who.namespace {
            let held = count(&|h| h.namespace.as_ref() == Some(ns));
            if held >= l.per_namespace {
                return Err(Error::LimitExceeded(format!(
                    "namespace {ns} already has {held} uploads open (limit {}); finish or abandon some first",
                    l.per_namespace
                )));
            }
        }
        if holders.len() >= l.total {
            return Err(Error::LimitExceeded(format!(
                "{} uploads are already open on this registry; retry later",
                l.total
            )));
        }
        Ok(())
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
        who: Holder,
    ) -> Result<(String, u64)> {
        let owner = who.namespace.as_deref();
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
        self.check_caps(&who)?;
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
        self.holders().insert(id.clone(), who);
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

    /// Where a session stands, without taking it. Another owner's session is as absent
    /// as one that does not exist.
    pub(crate) fn status(&self, id: &str, owner: Option<&str>) -> Result<(Digest, u64, u64)> {
        let not_found = || Error::NotFound {
            what: "upload",
            name: delta_proto::excerpt(id),
        };
        let s = self.map().get(id).cloned().ok_or_else(not_found)?;
        let guard = s.try_lock().map_err(|_| Error::Busy(id.to_owned()))?;
        if guard.owner.as_deref() != owner {
            return Err(not_found());
        }
        Ok((guard.digest, guard.size, guard.received))
    }

    /// Forgets a session (after commit or failure).
    pub(crate) fn remove(&self, id: &str) {
        self.map().remove(id);
        self.holders().remove(id);
    }

    /// Aborts sessions idle for longer than `ttl`, and those that never received a byte
    /// and have been idle for longer than `empty_ttl` (a slot taken and never used).
    /// Returns how many.
    pub(crate) async fn expire(&self, ttl: Duration, empty_ttl: Duration) -> usize {
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
            let idle = guard.last_active.elapsed();
            if idle >= ttl || (guard.received == 0 && idle >= empty_ttl) {
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
        let uploads = Uploads::new(limits(8, 4, 8));
        let data = Bytes::from_static(b"some bytes of a blob");
        let digest = Digest::of(&data);
        let (id, _) = uploads
            .start(&store, digest, data.len() as u64, holder(None, None, None))
            .await
            .unwrap();
        let (empty, _) = uploads
            .start(
                &store,
                Digest::of(b"never sent"),
                10,
                holder(None, None, None),
            )
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
        let hour = Duration::from_secs(3600);
        assert_eq!(uploads.expire(hour, hour).await, 0);
        assert_eq!(uploads.status(&id, None).unwrap().2, 5);
        // A session that never received a byte goes after the short TTL; one that did,
        // only after the long one.
        assert_eq!(uploads.expire(hour, Duration::ZERO).await, 1);
        assert!(matches!(
            uploads.status(&empty, None),
            Err(Error::NotFound { .. })
        ));
        assert_eq!(uploads.status(&id, None).unwrap().2, 5);
        // Idle past the TTL: aborted and forgotten.
        assert_eq!(uploads.expire(Duration::ZERO, hour).await, 1);
        assert!(matches!(
            uploads.status(&id, None),
            Err(Error::NotFound { .. })
        ));
        assert!(!store.exists(&digest).await.unwrap());
    }

    #[tokio::test]
    async fn a_parked_session_is_resumed_only_by_its_owner() {
        let store = BlobStore::in_memory();
        let uploads = Uploads::new(limits(8, 4, 8));
        let digest = Digest::of(b"x");
        let (id, _) = uploads
            .start(&store, digest, 10, holder(Some(1), Some("team-a"), None))
            .await
            .unwrap();
        uploads.acquire(&id).unwrap().park();
        let (other, _) = uploads
            .start(&store, digest, 10, holder(Some(2), Some("team-b"), None))
            .await
            .unwrap();
        assert_ne!(other, id);
        assert!(matches!(
            uploads.status(&id, Some("team-b")),
            Err(Error::NotFound { .. })
        ));
        let (same, _) = uploads
            .start(&store, digest, 10, holder(Some(1), Some("team-a"), None))
            .await
            .unwrap();
        assert_eq!(same, id);
    }

    fn limits(total: usize, per_token: usize, per_namespace: usize) -> Limits {
        Limits {
            total,
            per_token,
            per_namespace,
        }
    }

    fn holder(token: Option<i64>, namespace: Option<&str>, peer: Option<&str>) -> Holder {
        Holder {
            token,
            namespace: namespace.map(str::to_owned),
            peer: peer.map(|p| p.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn caps_per_token_per_namespace_and_per_anonymous_peer() {
        let store = BlobStore::in_memory();
        let uploads = Uploads::new(limits(7, 2, 3));
        let mut n = 0u32;
        let mut start = |who: Holder| {
            n += 1;
            let d = Digest::of(&n.to_le_bytes());
            let uploads = &uploads;
            let store = &store;
            async move { uploads.start(store, d, 10, who).await }
        };
        // Team a: two tokens of two sessions each would be four; the namespace stops at 3.
        start(holder(Some(1), Some("team-a"), None)).await.unwrap();
        start(holder(Some(1), Some("team-a"), None)).await.unwrap();
        let e = start(holder(Some(1), Some("team-a"), None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("token 1"), "{e}");
        start(holder(Some(2), Some("team-a"), None)).await.unwrap();
        let e = start(holder(Some(2), Some("team-a"), None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("namespace team-a"), "{e}");
        // Other teams still get slots.
        start(holder(Some(3), Some("team-b"), None)).await.unwrap();
        // Without a token (open registry), each peer address has the per-token cap.
        start(holder(None, None, Some("10.0.0.1"))).await.unwrap();
        start(holder(None, None, Some("10.0.0.1"))).await.unwrap();
        let e = start(holder(None, None, Some("10.0.0.1")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("10.0.0.1"), "{e}");
        start(holder(None, None, Some("10.0.0.2"))).await.unwrap();
        // The registry-wide cap holds for everyone.
        let e = start(holder(None, None, Some("10.0.0.3")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("7 uploads"), "{e}");
    }
}
