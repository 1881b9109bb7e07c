//! [`BlobStore`]: immutable, content-addressed bytes over any `object_store` backend.
//!
//! A blob lives at `blobs/blake3/<hex[..2]>/<hex>`. An upload writes a private staging
//! object (`staging/<hex>.<id>`) with a multipart upload, which every backend makes visible
//! only on `complete` (on local disk the registry's own writer, [`local`], stages to a
//! hidden `path#0` file, starting its writeback part by part, then fsyncs and renames; S3
//! assembles the parts); the upload layer completes it only after the bytes hashed to the
//! declared digest, then [`BlobStore::publish`] copies it to the blob's key with a
//! conditional create: of racing uploads of one digest exactly one wins, the others find
//! the blob there and count as dedup. No partial or mismatched blob is ever readable. Blob
//! keys derive only from digests, never from user-provided names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use delta_proto::Digest;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::config::RegistryConfig;
use crate::error::{Error, Result};

mod local;
mod s3;

/// Where staged uploads live until they are published or cleaned up, under keys
/// `staging/<hex>.<created unix seconds>.<random>`.
const STAGING: &str = "staging";

/// The creation time a staging key spells.
fn staging_created(key: &str) -> Option<i64> {
    key.rsplit('/').next()?.split('.').nth(1)?.parse().ok()
}

/// What [`BlobStore::cleanup_staging`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Completed staging objects never published.
    pub objects: usize,
    /// Incomplete multipart uploads aborted (S3).
    pub uploads: usize,
}

/// S3 copies at most 5 GiB in one part, so larger blobs cannot be published by the
/// conditional copy: they are written to their key directly.
const MAX_COPY: u64 = 5 << 30;

/// Where an upload's bytes wait for [`BlobStore::publish`]: a staging key of its own
/// (or, for blobs too big to copy on S3, the blob's own key).
#[derive(Debug, Clone)]
pub struct Staging {
    key: StorePath,
    digest: Digest,
    direct: bool,
}

/// Content-addressed blob storage.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The root directory when the backend is the local filesystem: blobs are read
    /// ([`read_local`]) and uploads written ([`local::WritebackUpload`]) there directly,
    /// and partial files that `list` does not show are swept
    /// ([`BlobStore::remove_stale_staging`]).
    local_root: Option<PathBuf>,
    /// On S3: lists and aborts incomplete multipart uploads, which `list` cannot see.
    s3: Option<Arc<s3::Janitor>>,
    /// Largest blob published by a conditional copy on S3 ([`MAX_COPY`]).
    copy_limit: u64,
}

fn key(digest: &Digest) -> StorePath {
    StorePath::from(digest.blob_key())
}

/// A local blob file in blocks of `block` bytes, read ahead by one block on a blocking
/// thread. Unlike `LocalFileSystem::get_range`, which zero-fills each buffer before
/// reading into it (a tenth of the registry's CPU time when serving), buffers are read
/// into uninitialised. A file shorter than `size` ends the stream early (the caller's
/// length and digest checks turn that into DATA_LOSS); a missing one is the object store's
/// NotFound, as from `get_range`.
fn read_local(path: PathBuf, size: u64, block: u64) -> BoxStream<'static, Result<Bytes>> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(1);
    tokio::task::spawn_blocking(move || {
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let e = if e.kind() == std::io::ErrorKind::NotFound {
                    Error::Blob(object_store::Error::NotFound {
                        path: path.display().to_string(),
                        source: Box::new(e),
                    })
                } else {
                    Error::Io(e)
                };
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let mut pos = 0;
        while pos < size {
            let n = block.min(size - pos);
            let mut buf = Vec::with_capacity(n as usize);
            if let Err(e) = (&mut file).take(n).read_to_end(&mut buf) {
                let _ = tx.blocking_send(Err(Error::Io(e)));
                return;
            }
            let short = (buf.len() as u64) < n;
            pos += buf.len() as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() || short {
                return; // the reader went away, or the file ended early
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

impl BlobStore {
    /// Opens the backend the config names: `store_url`, or the local filesystem under
    /// `data_dir/store` with fsync on every write.
    pub fn open(config: &RegistryConfig) -> Result<Self> {
        match &config.store_url {
            None => {
                let root = config.data_dir.join("store");
                std::fs::create_dir_all(&root)?;
                Self::local(&root)
            }
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| Error::InvalidArgument(format!("store url {url:?}: {e}")))?;
                if parsed.scheme() == "file" {
                    let path = parsed.to_file_path().map_err(|()| {
                        Error::InvalidArgument(format!("store url {url:?} is not a local path"))
                    })?;
                    std::fs::create_dir_all(&path)?;
                    return Self::local(&path);
                }
                let mut options = config.store_options.clone();
                // Conditional copies decide upload races; on S3 they are a multipart copy
                // completed with `If-None-Match: *`, unless the operator chose another way.
                if parsed.scheme() == "s3"
                    && !options.iter().any(|(k, _)| k == "aws_copy_if_not_exists")
                {
                    options.push(("aws_copy_if_not_exists".into(), "multipart".into()));
                }
                let (store, prefix, s3): (Box<dyn ObjectStore>, _, _) = if parsed.scheme() == "s3" {
                    let (store, janitor) = s3::open(&parsed, &options)?;
                    let prefix = StorePath::parse(parsed.path())
                        .map_err(|e| Error::InvalidArgument(format!("store url {url:?}: {e}")))?;
                    (Box::new(store), prefix, Some(Arc::new(janitor)))
                } else {
                    let (store, prefix) = object_store::parse_url_opts(&parsed, options)?;
                    (store, prefix, None)
                };
                let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
                    Arc::from(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
                };
                Ok(Self {
                    store,
                    local_root: None,
                    s3,
                    copy_limit: MAX_COPY,
                })
            }
        }
    }

    /// Writes and removes a small object under the staging prefix: the store answers and
    /// takes writes (a bucket that does not exist, refuses the credentials or cannot be
    /// reached fails here, not on the first push). A probe left behind by a crash is an
    /// ordinary stale staging object for the janitor.
    pub async fn probe(&self) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = StorePath::from(format!("{STAGING}/probe.{now}.{}", uuid::Uuid::new_v4()));
        self.store
            .put(&path, PutPayload::from_static(b"probe"))
            .await?;
        self.store.delete(&path).await?;
        Ok(())
    }

    /// The local filesystem under `root`, fsync'd.
    pub fn local(root: &Path) -> Result<Self> {
        let fs = LocalFileSystem::new_with_prefix(root)?.with_fsync(true);
        Ok(Self {
            store: Arc::new(fs),
            local_root: Some(root.to_owned()),
            s3: None,
            copy_limit: MAX_COPY,
        })
    }

    /// Lowers the size above which S3 blobs skip the conditional copy, so tests can reach
    /// that path without 5 GiB uploads.
    #[doc(hidden)]
    pub fn with_copy_limit(mut self, limit: u64) -> Self {
        self.copy_limit = limit;
        self
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(InMemory::new()),
            local_root: None,
            s3: None,
            copy_limit: MAX_COPY,
        }
    }

    /// Starts a multipart write of `digest` (`size` bytes) to a staging key of its own.
    /// The caller completes it only after checking the bytes, then publishes it; or aborts
    /// it. On S3, blobs over 5 GiB (beyond one copy part) are written to their own key:
    /// racing uploads of those both complete with the same bytes, without a single winner.
    pub async fn begin(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<(Staging, Box<dyn MultipartUpload>)> {
        if self.s3.is_some() && size > self.copy_limit {
            let key = key(digest);
            let upload = self.store.put_multipart(&key).await?;
            return Ok((
                Staging {
                    key,
                    digest: *digest,
                    direct: true,
                },
                upload,
            ));
        }
        let key = StorePath::from(format!(
            "{STAGING}/{}.{}.{}",
            digest.hex(),
            crate::clock::now(),
            uuid::Uuid::new_v4().simple()
        ));
        let upload: Box<dyn MultipartUpload> = match &self.local_root {
            Some(root) => Box::new(local::WritebackUpload::create(root.join(key.as_ref())).await?),
            None => self.store.put_multipart(&key).await?,
        };
        Ok((
            Staging {
                key,
                digest: *digest,
                direct: false,
            },
            upload,
        ))
    }

    /// Publishes a completed, checked staging object under its digest with a conditional
    /// create. `Ok(true)`: this upload stored the blob; `Ok(false)`: the blob was already
    /// there (a racing upload won; same bytes, so dedup). The staging object is removed.
    pub async fn publish(&self, staged: &Staging) -> Result<bool> {
        if staged.direct {
            return Ok(true);
        }
        let published = self
            .store
            .copy_if_not_exists(&staged.key, &key(&staged.digest))
            .await;
        if let Err(e) = self.store.delete(&staged.key).await {
            // Harmless: `cleanup_staging` removes it after the grace period.
            tracing::warn!(key = %staged.key, error = %e, "removing a staging object failed");
        }
        match published {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a small blob whose digest the caller has checked (a conditional create, so
    /// an existing blob is left as it is). `Ok(false)`: it was already there.
    pub async fn put_small(&self, digest: &Digest, bytes: Bytes) -> Result<bool> {
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&key(digest), PutPayload::from_bytes(bytes), create)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes what killed uploads left in the store: completed staging objects older than
    /// `completed_grace` (a replica died between completing and publishing) and, on S3,
    /// incomplete multipart uploads older than `incomplete_grace` (a replica died
    /// mid-upload; keep it at least as long as upload sessions stay resumable). Ages come
    /// from the time in the staging key, so every backend and every replica agrees.
    /// Incomplete uploads on local disk are staging files, which
    /// [`BlobStore::remove_stale_staging`] removes.
    pub async fn cleanup_staging(
        &self,
        completed_grace: Duration,
        incomplete_grace: Duration,
        now: i64,
    ) -> Result<Cleanup> {
        let stale = |key: &str, grace: Duration, fallback: i64| {
            staging_created(key).unwrap_or(fallback) < now - grace.as_secs() as i64
        };
        let mut done = Cleanup::default();
        let prefix = StorePath::from(STAGING);
        let mut old = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if stale(
                meta.location.as_ref(),
                completed_grace,
                meta.last_modified.timestamp(),
            ) {
                old.push(meta.location);
            }
        }
        for key in &old {
            match self.store.delete(key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => done.objects += 1,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(s3) = &self.s3 {
            for upload in s3.list(&format!("{STAGING}/")).await? {
                let key = s3.store_key(&upload.key).unwrap_or(&upload.key);
                if stale(key, incomplete_grace, now) {
                    s3.abort(&upload).await?;
                    done.uploads += 1;
                }
            }
        }
        Ok(done)
    }

    /// Whether the object exists (a `head` on the backend).
    pub async fn exists(&self, digest: &Digest) -> Result<bool> {
        match self.store.head(&key(digest)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads `range` of a blob.
    pub async fn read_range(&self, digest: &Digest, range: std::ops::Range<u64>) -> Result<Bytes> {
        Ok(self.store.get_range(&key(digest), range).await?)
    }

    /// Streams a whole blob of `size` bytes from the start, as ranged reads of `block`
    /// bytes with the next one in flight while the current one is consumed. (A plain `get`
    /// stream reads local files 8 KiB at a time, one blocking task each: 20× slower.)
    pub fn stream(
        &self,
        digest: &Digest,
        size: u64,
        block: u64,
    ) -> BoxStream<'static, Result<Bytes>> {
        let block = block.max(1);
        if let Some(root) = &self.local_root {
            return read_local(root.join(digest.blob_key()), size, block);
        }
        let store = self.store.clone();
        let path = key(digest);
        let ranges: Vec<std::ops::Range<u64>> = (0..size.div_ceil(block))
            .map(|i| i * block..((i + 1) * block).min(size))
            .collect();
        futures::stream::iter(ranges)
            .map(move |r| {
                let (store, path) = (store.clone(), path.clone());
                async move { store.get_range(&path, r).await.map_err(Error::from) }
            })
            .buffered(2)
            .boxed()
    }

    /// Deletes a blob; a missing blob is not an error (same on every backend).
    pub async fn delete(&self, digest: &Digest) -> Result<()> {
        match self.store.delete(&key(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Size of the stored object, `None` if absent.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.store.head(&key(digest)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a blob unless its object was written after `cutoff` (seconds since the
    /// epoch): a concurrent re-upload of the same content wins over garbage collection.
    pub async fn delete_unless_newer(&self, digest: &Digest, cutoff: i64) -> Result<()> {
        match self.store.head(&key(digest)).await {
            Ok(m) if m.last_modified.timestamp() > cutoff => Ok(()),
            Ok(_) => self.delete(digest).await,
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves a blob's bytes to `quarantine/blake3/<hex>` (kept for inspection).
    pub async fn quarantine(&self, digest: &Digest) -> Result<()> {
        let to = StorePath::from(format!("quarantine/blake3/{}", digest.hex()));
        match self.store.copy(&key(digest), &to).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.delete(digest).await
    }

    /// Every stored blob object: its key, the digest its name spells (if it does), and its
    /// modification time (seconds since the epoch).
    pub async fn list(&self) -> Result<Vec<(String, Option<Digest>, i64)>> {
        let prefix = StorePath::from("blobs");
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            let digest = key
                .rsplit('/')
                .next()
                .and_then(|hex| format!("blake3:{hex}").parse().ok());
            out.push((key, digest, meta.last_modified.timestamp()));
        }
        Ok(out)
    }

    /// Deletes an object by key (for orphans whose name is not a digest).
    pub async fn delete_key(&self, key: &str) -> Result<()> {
        match self.store.delete(&StorePath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes local staging files (`<blob>#N`) older than `grace`, left behind by a process
    /// killed mid-write; `list` cannot see them. Returns how many were removed.
    pub fn remove_stale_staging(&self, grace: Duration) -> Result<usize> {
        let stale = self.stale_local_staging(grace)?;
        for path in &stale {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(stale.len())
    }

    /// What killed uploads left behind, older than `grace` (for `fsck`): staging objects
    /// never published, and on local disk the partial files of interrupted writes. The
    /// running registry removes them after its grace periods; `fsck --repair` at once.
    pub async fn stale_staging(&self, grace: Duration, now: i64) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&StorePath::from(STAGING)));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            let created = staging_created(&key).unwrap_or(meta.last_modified.timestamp());
            if created < now - grace.as_secs() as i64 {
                out.push(key);
            }
        }
        for path in self.stale_local_staging(grace)? {
            out.push(path.display().to_string());
        }
        out.sort();
        Ok(out)
    }

    /// Local staging files (`<blob>#N`) whose modification time is `grace` or more ago.
    fn stale_local_staging(&self, grace: Duration) -> Result<Vec<PathBuf>> {
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        let mut stack = vec![root.join("blobs"), root.join(STAGING)];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for entry in entries {
                let entry = entry?;
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let staged = entry.file_name().to_string_lossy().contains('#');
                // An unreadable modification time is never taken as "old".
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .is_some_and(|age| age >= grace);
                if staged && old {
                    stale.push(entry.path());
                }
            }
        }
        Ok(stale)
    }
}

#[cfg(test)]
mod tests;
